"""What the app's routes share, held on `app.state.levante` (no module-level state)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from levante.config import ServerConfig
from levante.sampling_params import LogitsProcessor
from levante.server.auth import KeyStore
from levante.server.metrics import Metrics
from levante.server.serving import ModelManager, ServedModel


@dataclass
class AppState:
    models: ModelManager
    config: ServerConfig
    keys: KeyStore
    metrics: Metrics
    started: float
    _json_vocab: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def json_processor(self, served: ServedModel) -> LogitsProcessor:
        """A fresh JSON-mode processor; the per-vocabulary tables are built once per model."""
        from levante.engine.json_mode import JsonVocabulary, json_object_processor

        with self._lock:
            vocab = self._json_vocab.get(served.name)
            if vocab is None:
                vocab = self._json_vocab[served.name] = JsonVocabulary(served.loaded.tokenizer)
        return json_object_processor(vocab)
