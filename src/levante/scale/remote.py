"""The server's view of a model whose engines run elsewhere (replicas of a deployment).

The HTTP routes need a model's tokenizer, chat format and limits in the process that serves
HTTP; the weights and the KV pool live in the replicas. `load_model_header` reads the first
without the second (the model is built on the meta device: no weight memory), and
`RemoteServedModel` answers what the routes ask of a served model from it and from facts the
replicas report. Nothing here knows which framework runs the replicas.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from levante.config import EngineConfig, TransformerConfig
from levante.engine.llm_engine import EngineStats
from levante.loaders.errors import WeightsError
from levante.loaders.gguf import GGUFFile
from levante.loaders.loader import LoadedModel, _build, _chat_format, _gguf_quantization, packaged_model_path
from levante.loaders.tokenizer import load_tokenizer, tokenizer_from_gguf
from levante.sampling_params import SamplingParams
from levante.server.serving import EngineClient, ServedModel


@dataclass(frozen=True)
class Accepted:
    """First item of a replica's stream: the replica took the request (it passed the engine's checks)."""

    replica: str


@dataclass(frozen=True)
class Refused:
    """Instead of Accepted: the engine refused the request (bad input, at capacity). Sent as an
    item rather than raised: it is the client's to fix or retry, not a failure of the replica."""

    error: Exception


@dataclass(frozen=True)
class JsonObjectMode:
    """Stands for a JSON-mode logits processor on the way to a replica: the replica builds its own
    from its vocabulary tables (built once per replica) instead of receiving them with each request."""

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("JsonObjectMode stands for a processor the replica builds; it never runs")


def portable(params: SamplingParams) -> SamplingParams:
    """The request's sampling parameters as sent to a replica (JSON-mode processors by name)."""
    from levante.engine.json_mode import JsonObjectProcessor

    if not params.logits_processors or not any(isinstance(p, JsonObjectProcessor) for p in params.logits_processors):
        return params
    sent = copy.copy(params)
    sent.logits_processors = [JsonObjectMode() if isinstance(p, JsonObjectProcessor) else p for p in params.logits_processors]
    return sent


@dataclass(frozen=True)
class ReplicaFacts:
    """What a model's replicas share and the HTTP side needs: limits, placement, engine settings."""

    replica: str
    max_model_len: int
    dtype: str  # "bfloat16"
    device: str  # "cpu", "cuda:0"
    memory_bytes: int  # weights + KV pool of one replica
    engine_config: EngineConfig


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's engine state, for /metrics and /health."""

    replica: str
    stats: EngineStats
    memory_bytes: int
    error: str | None = None


class ReplicatedEngine(EngineClient, Protocol):
    def memory_bytes(self) -> int: ...


class RemoteServedModel(ServedModel):
    """A served model whose engines are replicas elsewhere; the header (tokenizer, chat format,
    architecture) is loaded here, without weights."""

    def __init__(self, name: str, engine: ReplicatedEngine, header: LoadedModel, facts: ReplicaFacts) -> None:
        super().__init__(name, engine)
        self.remote = engine
        self.header = header
        self.facts = facts

    @property
    def loaded(self) -> LoadedModel:
        return self.header

    @property
    def max_model_len(self) -> int:
        return self.facts.max_model_len

    @property
    def engine_config(self) -> EngineConfig:
        return self.facts.engine_config

    @property
    def memory_bytes(self) -> int:
        return self.remote.memory_bytes() or self.facts.memory_bytes


def aggregate(reports: list[ReplicaReport]) -> EngineStats:
    """The replicas' engines as one: counts add up, fractions are weighted by KV blocks."""
    if not reports:
        return EngineStats(0, 0, 0, 0, 0.0, 0.0, 0.0, 0)
    blocks = sum(r.stats.num_blocks for r in reports)
    free = sum(r.stats.num_free_blocks for r in reports)

    def weighted(value: list[float]) -> float:
        return sum(v * r.stats.num_blocks for v, r in zip(value, reports, strict=True)) / blocks if blocks else 0.0

    return EngineStats(
        num_running=sum(r.stats.num_running for r in reports),
        num_waiting=sum(r.stats.num_waiting for r in reports),
        num_blocks=blocks,
        num_free_blocks=free,
        kv_usage=1 - free / blocks if blocks else 0.0,
        kv_waste=weighted([r.stats.kv_waste for r in reports]),
        prefix_cache_hit_rate=weighted([r.stats.prefix_cache_hit_rate for r in reports]),
        num_preemptions=sum(r.stats.num_preemptions for r in reports),
    )


def header_path(source: str) -> Path:
    """Where a model's files are, as the loader finds them, without re-hashing registry blobs
    (the replicas verify them when they load the weights)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    from levante.registry.store import ModelRef, RegistryError, Store

    try:
        ref = ModelRef.parse(source)
    except RegistryError:
        ref = None
    store = Store()
    if ref is not None and store.exists(ref):
        return store.model_path(store.get(ref))
    packaged = packaged_model_path(source)
    if packaged is None:
        raise FileNotFoundError(f"no model files for {source!r} on this node (path, registry name or packaged model)")
    return packaged


def load_model_header(source: str, dtype: str, device: str) -> LoadedModel:
    """Everything `load_model` gives but the weights: config, tokenizer, chat format; the model
    itself is built on the meta device (shapes only)."""
    path = header_path(source)
    torch_dtype = getattr(torch, dtype)
    if path.is_dir() and (path / "config.json").is_file():
        raw = json.loads((path / "config.json").read_text())
        cfg = TransformerConfig.from_hf(raw)
        tokenizer = load_tokenizer(path)
        from levante.loaders.chat_template import read_chat_template

        chat, err = _chat_format(tokenizer, read_chat_template(path), cfg.model_type)
        quant = str(raw.get("torch_dtype") or raw.get("dtype") or "unknown")
    else:
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise WeightsError(f"{path}: no config.json and not exactly one .gguf file")
            path = ggufs[0]
        gguf = GGUFFile(path)
        try:
            cfg = TransformerConfig.from_gguf(gguf.metadata, has_output="output.weight" in gguf.tensors)
            tokenizer = tokenizer_from_gguf(gguf.metadata)
            template = gguf.metadata.get("tokenizer.chat_template")
            chat, err = _chat_format(tokenizer, template if isinstance(template, str) else None, cfg.model_type)
            quant = _gguf_quantization(gguf)
        finally:
            gguf.close()
    name = path.name if Path(source).expanduser().exists() else source  # as load_model names it
    return LoadedModel(name, path, _build(cfg), cfg, tokenizer, chat, err, torch_dtype, torch.device(device), quant)
