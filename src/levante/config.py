"""Configuration dataclasses, validated on construction.

`TransformerConfig` describes an architecture (read from HF `config.json` or GGUF
metadata); the other classes describe how the engine runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

ARCHITECTURES = ("llama", "mistral", "mixtral")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TransformerConfig:
    """Hyper-parameters of a Llama-family decoder (Llama, Mistral, Mixtral)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    num_experts: int = 0  # 0: dense MLP
    num_experts_per_tok: int = 2
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.model_type!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // max(self.num_heads, 1)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            self.sliding_window = None
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..{self.num_experts}")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> TransformerConfig:
        """Build from a HF `config.json` dictionary."""
        model_type = str(cfg.get("model_type", "")).lower()
        if model_type not in ARCHITECTURES:
            archs = cfg.get("architectures") or []
            raise ValueError(f"unsupported model_type {model_type!r} (architectures={archs}); supported: {', '.join(ARCHITECTURES)}")
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        window = cfg.get("sliding_window")
        if model_type == "mistral" or model_type == "mixtral":
            # HF keeps the key but sets use_sliding_window only for some families; Mistral honours the value.
            window = int(window) if window else None
        elif not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_hf_rope_scaling(cfg),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            sliding_window=window,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=int(cfg.get("num_local_experts", 0) or 0),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2) or 2),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], n_vocab_rows: int | None = None, has_output: bool = True) -> TransformerConfig:
        """Build from GGUF metadata (`{arch}.*` keys as llama.cpp writes them)."""
        arch = str(meta.get("general.architecture", ""))
        if arch not in ("llama", "mistral"):
            raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: llama (incl. Mistral, Mixtral)")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        kv = get("attention.head_count_kv", heads)
        if isinstance(kv, list):  # per-layer arrays exist in some converters; all equal for our families
            kv = kv[0]
        experts = int(get("expert_count", 0) or 0)
        vocab = get("vocab_size") or (len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else n_vocab_rows)
        if vocab is None:
            raise ValueError("GGUF metadata gives no vocabulary size")
        head_dim = int(get("attention.key_length", 0) or 0) or hidden // heads
        window = get("attention.sliding_window")
        scaling = None
        stype = get("rope.scaling.type")
        if stype and stype != "none":
            scaling = {"rope_type": stype, "factor": float(get("rope.scaling.factor", 1.0))}
            if get("rope.scaling.original_context_length"):
                scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        return cls(
            model_type="mixtral" if experts else ("mistral" if window else "llama"),
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("expert_feed_forward_length", 0) or get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            sliding_window=int(window) if window else None,
            tie_word_embeddings=not has_output,
            num_experts=experts,
            num_experts_per_tok=int(get("expert_used_count", 2) or 2),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        )


def _hf_rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    scaling = dict(scaling)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    scaling["rope_type"] = kind
    return scaling


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 where the hardware runs it natively (CUDA with bf16, x86 with AVX512-BF16/AMX), else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _cpu_has_fast_bf16() -> bool:
    try:
        caps = torch.backends.cpu.get_cpu_capability()
    except Exception:
        return False
    if "AVX512" not in caps and "AMX" not in caps:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class CacheConfig:
    """Paged KV cache: `block_size` tokens per block; pool sized from a byte budget or a fraction of free memory."""

    block_size: int = 16
    memory_bytes: int | None = None  # explicit budget; overrides fraction
    memory_fraction: float = 0.25  # of available host/device memory when no explicit budget
    num_blocks: int | None = None  # fixed block count (tests); overrides both
    enable_prefix_caching: bool = True
    # "auto": float16 on CPU when the projections run on quantised weights (the KV reads of a decode step
    # halve; the weights are approximate already), else the model dtype. Or "float32", "bfloat16", "float16".
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"KV cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if not 0 < self.memory_fraction <= 0.95:
            raise ValueError(f"memory_fraction must be in (0, 0.95], got {self.memory_fraction}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError("memory_bytes must be positive")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError("num_blocks must be positive")


@dataclass
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 64  # sequences decoded together
    max_num_batched_tokens: int = 512  # tokens (prefill chunks + decodes) per step
    max_waiting: int = 256  # queued requests beyond which new ones are refused
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class EngineConfig:
    """Everything `LLMEngine` needs besides the weights."""

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None  # default: the model's context length
    seed: int = 0
    num_threads: int | None = None  # CPU intra-op threads; default: cores available to this process
    attention_backend: str = "auto"  # "auto": native CPU kernels (paged decode attention, fused norm/rotary/silu) when they build; "torch": portable torch ops
    weight_format: str = "auto"  # "auto" (4-bit checkpoints: int4 kernels for small steps), "native", "int8", "int4"
    quant_max_rows: int = 8  # with "auto": steps of at most this many tokens use the quantised copy
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError("num_threads must be positive")
        if self.weight_format not in ("native", "int8", "int4", "auto"):
            raise ValueError(f"weight_format must be native, int8, int4 or auto, got {self.weight_format!r}")
        if self.quant_max_rows < 0:
            raise ValueError("quant_max_rows must be non-negative")
        if self.attention_backend not in ("auto", "torch"):
            raise ValueError(f"attention_backend must be auto or torch, got {self.attention_backend!r}")
        torch.device(self.device)  # raises on a malformed device string


@dataclass
class ServerConfig:
    """HTTP front door. Binds to loopback unless told otherwise."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # extra keys given on the command line (plain text)
    keys_file: str | None = None  # hashed keys managed by `levante keys`; default LEVANTE_HOME/keys.json
    max_body_bytes: int = 8 << 20
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    retry_after: int = 1  # seconds suggested to clients refused for overload
    cors_origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be non-negative")

    @property
    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
