"""Build engines and the app from options, and run it under uvicorn."""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from levante.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from levante.engine.async_engine import AsyncLLMEngine
from levante.engine.llm_engine import LLMEngine
from levante.loaders.loader import DEFAULT_MODEL

logger = logging.getLogger("levante.server")


@dataclass
class ServeOptions:
    """Everything `levante serve` takes; a TOML file may set any of these (the command line wins)."""

    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    dtype: str = "auto"
    weight_format: str = "auto"  # layers/linear.py
    device: str = "cpu"
    max_model_len: int | None = None
    kv_cache_memory: int | None = None  # bytes
    kv_cache_fraction: float = 0.25
    kv_cache_dtype: str = "auto"  # config.py CacheConfig.dtype
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    enable_prefix_caching: bool = True
    max_body_bytes: int = 8 << 20
    shutdown_timeout: float = 30.0
    cors_origins: list[str] = field(default_factory=list)
    seed: int = 0
    log_level: str = "info"
    keep_alive: float | None = 300.0  # seconds an on-demand model stays loaded when idle; None: forever
    max_memory: int | None = None  # bytes of weights + KV pools across loaded models; None: no limit
    ui: bool = True  # the chat page at /ui
    qdrant_url: str | None = None  # a Qdrant server for /v1/rag (or ':memory:'); None: embedded store in LEVANTE_HOME/qdrant

    @classmethod
    def from_file(cls, path: Path) -> dict[str, Any]:
        """Options set in a TOML file (flat keys, or under [server] / [engine])."""
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: cannot read config: {e}") from e
        flat: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, dict) and key in ("server", "engine", "models"):
                flat.update(value)
            else:
                flat[key] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"{path}: unknown options {unknown}; known: {sorted(known)}")
        if isinstance(flat.get("models"), str):
            flat["models"] = [flat["models"]]
        return flat

    def engine_config(self, model: str) -> EngineConfig:
        return EngineConfig(
            model=model,
            dtype=self.dtype,
            weight_format=self.weight_format,
            device=self.device,
            max_model_len=self.max_model_len,
            seed=self.seed,
            cache=CacheConfig(
                block_size=self.block_size,
                memory_bytes=self.kv_cache_memory,
                memory_fraction=self.kv_cache_fraction / max(1, len(self.models)),
                enable_prefix_caching=self.enable_prefix_caching,
                dtype=self.kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens, max_waiting=self.max_waiting
            ),
        )

    def server_config(self) -> ServerConfig:
        return ServerConfig(
            host=self.host, port=self.port, api_keys=list(self.api_keys), max_body_bytes=self.max_body_bytes,
            shutdown_timeout=self.shutdown_timeout, cors_origins=list(self.cors_origins),
        )


def served_name(model: str) -> str:
    path = Path(model)
    if path.exists():
        return path.stem if path.suffix.lower() == ".gguf" else path.name
    return model


def build_app(opts: ServeOptions) -> Any:
    """The app with the first model loaded; the other named models (and any registry model) load on first use."""
    from levante.rag.service import RagConfig
    from levante.registry.store import Store
    from levante.server.app import create_app
    from levante.server.auth import KeyStore
    from levante.server.serving import ModelManager, ServedModel

    def load(source: str, name: str) -> ServedModel:
        engine = AsyncLLMEngine(LLMEngine(opts.engine_config(source)))
        logger.info("loaded %s as %r (context %d tokens)", source, name, engine.engine.max_model_len)
        return ServedModel(name, engine)

    names = [opts.served_model_name if (i == 0 and opts.served_model_name) else served_name(m) for i, m in enumerate(opts.models)]
    first = load(opts.models[0], names[0])  # pinned: the default model never unloads
    config = opts.server_config()
    keys = KeyStore(extra_keys=config.api_keys)
    if not config.is_loopback and not keys.enabled:
        logger.warning(
            "listening on %s without API keys: anyone who can reach this port can use the model. "
            "Create one with `levante keys create` or pass --api-key.", config.host,
        )
    manager = ModelManager(
        [first], loader=load, keep_alive=opts.keep_alive, memory_budget=opts.max_memory, store=Store(),
        sources=dict(zip(names, opts.models, strict=True)),
    )
    rag = RagConfig(qdrant_url=opts.qdrant_url, qdrant_api_key=os.environ.get("QDRANT_API_KEY"))
    return create_app(manager, config, keys, ui=opts.ui, rag=rag)


def serve(opts: ServeOptions) -> None:
    import uvicorn

    app = build_app(opts)
    if opts.ui:
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        logger.info("chat page: http://%s:%d/ui", host, opts.port)
    uvicorn.run(
        app, host=opts.host, port=opts.port, log_level=opts.log_level,
        timeout_graceful_shutdown=int(opts.shutdown_timeout), access_log=False,
    )
