"""Native CPU kernels (csrc/cpu_ops.cpp), compiled once with the machine's compiler.

`load_cpu_kernels()` builds the extension with torch.utils.cpp_extension (gcc and ninja, cached
under ~/.cache/torch_extensions) and returns typed entry points, or None where it cannot be built;
every caller keeps a portable torch path for that case and for other devices. The kernels:

- `paged_decode`: decode attention that walks each sequence's block table in the paged cache
  (one task per sequence and KV head, float32 scores, AVX-512 where the CPU has it).
- `paged_prefill`: causal attention of a step's prefill chunks over their context in the paged
  cache (cached prefix and the chunk itself), in one call for every chunk.
- `block_gemm`: y = x W^T with block-quantised weights (layers/block_quant.py), on AVX512-VNNI.
- `rms_norm`, `rope_store`, `silu_mul`: fused versions of the small per-layer ops, which at
  decode batch sizes cost more in dispatch than in arithmetic.
- `decode_layers`: a whole decode step through a dense model's layers with the kernels above, in
  one call (no Python between ops; the GIL is released meanwhile). `argmax_rows`: greedy picks.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu_ops.cpp"


class CpuKernels:
    """Typed wrappers over the compiled module; tensors stay on the CPU."""

    def __init__(self, module: Any) -> None:
        self._m = module
        self.vnni: bool = bool(module.has_vnni())

    def paged_decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
        ctx_lens: torch.Tensor, scale: float, window: int | None,
    ) -> torch.Tensor:
        """q: [B, H, hd]; caches: [N, bs, Hkv, hd]; block_tables: [B, max_blocks]; ctx_lens: [B] -> [B, H, hd]."""
        out: torch.Tensor = self._m.paged_decode(q, k_cache, v_cache, block_tables, ctx_lens, scale, window or -1)
        return out

    def paged_prefill(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, chunks: torch.Tensor,
        out: torch.Tensor, scale: float, window: int | None,
    ) -> None:
        """q, out: [T, H, hd]; chunks: [C, 3] (q_start, q_len, ctx_len); tables: [C, max_blocks]. Writes the
        chunks' rows of out; their K/V must be in the cache already."""
        self._m.paged_prefill(q, k_cache, v_cache, tables, chunks, out, scale, window or -1)

    def block_gemm(
        self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, n: int, bits: int, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """x: [M, K] -> [M, n] (+ residual [M, n]) with packed block-quantised weights."""
        out: torch.Tensor = self._m.block_gemm(x, packed, scales, n, bits, residual)
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [T, D] -> weight * rms_norm(x) in float32 steps, in x's dtype."""
        out: torch.Tensor = self._m.rms_norm(x, weight, eps)
        return out

    def rope_store(
        self, qkv: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int,
    ) -> None:
        """Rotate the q and k heads of qkv [T, (H + 2 Hkv) hd] in place; write k and v of token t at slots[t]."""
        self._m.rope_store(qkv, table, positions, slots, k_cache, v_cache, num_heads, num_kv_heads)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2 I] (gate | up) -> silu(gate) * up: [T, I]."""
        out: torch.Tensor = self._m.silu_mul(gate_up)
        return out


    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [B, V] float32 -> [B] int64, the first maximum of each row (as torch.argmax)."""
        out: torch.Tensor = self._m.argmax_rows(logits)
        return out

    def decode_layers(
        self, x: torch.Tensor, layers: list[list[torch.Tensor]], block_tables: torch.Tensor, ctx_lens: torch.Tensor,
        positions: torch.Tensor, slots: torch.Tensor, table: torch.Tensor, eps: float, num_heads: int,
        num_kv_heads: int, intermediate: int, scale: float, window: int | None,
    ) -> torch.Tensor:
        """x: [B, D] embedded tokens of a decode-only step -> hidden states [B, D] before the final norm.

        layers[i]: input norm, post-attention norm, k cache, v cache, then (a, b) for qkv, o, gate_up and
        down: (packed uint8, fp16 scales) of block-quantised weights or (dense weight, empty tensor).
        """
        out: torch.Tensor = self._m.decode_layers(
            x, layers, block_tables, ctx_lens, positions, slots, table, eps, num_heads, num_kv_heads, intermediate,
            scale, window or -1,
        )
        return out


@functools.cache
def load_cpu_kernels() -> CpuKernels | None:
    """Compile (or load the cached build of) the kernels; None when that is impossible here."""
    logger.info("loading the native CPU kernels (compiled once with the local compiler, about a minute)")
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name="levante_cpu_ops",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            # OpenMP: at::parallel_for splits work only when built with it; the libgomp torch loaded
            # already (same soname) is the one used, so there is a single thread pool.
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, ...: the portable paths still work
        logger.warning("native CPU kernels unavailable (%s); using portable torch ops", e)
        return None
    return CpuKernels(module)


def release_openmp_threads() -> bool:
    """Free the OpenMP worker teams of the calling thread (`omp_pause_resource_all`); True if any.

    libgomp keeps one team per host thread that has run a parallel region, and once its teams hold
    more threads than there are CPUs it stops spinning at barriers: every parallel region then ends
    in a futex sleep and wake-up. A model built in one thread and stepped in another (AsyncLLMEngine)
    is such a case on a 2-core machine, and each of a step's few hundred regions paid for it (decode
    steps took up to twice as long). The thread that built the engine calls this once it is done;
    it gets a new team if it runs a parallel region again. Every OpenMP runtime in the process is
    paused (wheels bundle their own: sentencepiece ships a second libgomp beside torch's).
    """
    import ctypes

    runtimes = ("libgomp", "libomp", "libiomp")
    try:
        with open("/proc/self/maps") as maps:
            paths = {path for line in maps if (path := line.split()[-1]).rsplit("/", 1)[-1].startswith(runtimes)}
    except OSError:
        return False
    released = False
    for path in sorted(paths):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        released |= pause(1) == 0  # omp_pause_soft: the threads go, the runtime stays initialised
    return released
