"""What the app's routes share, held on `app.state.levante` (no module-level state)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from levante.config import ServerConfig
from levante.sampling_params import LogitsProcessor
from levante.server.auth import KeyStore
from levante.server.metrics import Metrics
from levante.server.serving import ModelManager, ServedModel

if TYPE_CHECKING:
    from levante.rag.service import RagConfig, RagService


@dataclass
class AppState:
    models: ModelManager
    config: ServerConfig
    keys: KeyStore
    metrics: Metrics
    started: float
    _json_vocab: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    rag_config: RagConfig | None = None  # where the vector store is; None: LEVANTE_HOME/qdrant
    _rag: RagService | None = None
    _rag_lock: threading.Lock = field(default_factory=threading.Lock)

    def rag(self) -> RagService:
        """The RAG service, opened on first use: it holds this process's vector store client (blocking: call in a thread)."""
        from levante.rag.service import RagConfig, RagService

        with self._rag_lock:
            if self._rag is None:
                self._rag = RagService(self.rag_config or RagConfig(), self.models.embedder)
            return self._rag

    def close_rag(self) -> None:
        with self._rag_lock:
            if self._rag is not None:
                self._rag.close()
                self._rag = None

    def json_processor(self, served: ServedModel) -> LogitsProcessor:
        """A fresh JSON-mode processor; the per-vocabulary tables are built once per model."""
        from levante.engine.json_mode import JsonVocabulary, json_object_processor

        with self._lock:
            vocab = self._json_vocab.get(served.name)
            if vocab is None:
                vocab = self._json_vocab[served.name] = JsonVocabulary(served.loaded.tokenizer)
        return json_object_processor(vocab)
