"""A C++ decode-attention kernel for CPUs that reads K/V straight from the paged cache.

The portable path (layers/attention.py) gathers every sequence's blocks into a padded
tensor and calls SDPA: two copies of the whole context per layer per step, and a masked
GQA attention that is slow for one query. This kernel walks each sequence's block table
instead, one sequence per task (each token's row, all KV heads, is read once), keeping scores
and sums in float32:

    for t in window(ctx_len):  s[g, t] = q[g] . K[block_table[t // bs], t % bs]    (g: the query heads sharing the KV head)
    p = softmax(s);            out[g]  = sum_t p[g, t] V[...]

It is compiled once with the machine's own compiler (gcc via torch.utils.cpp_extension, cached
under ~/.cache/torch_extensions). When that is impossible the caller keeps the portable path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Rows of the cache are converted to float32 16 lanes at a time where AVX-512 exists.
template <typename T> static inline void row_to_float(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_loadu_ps(src + i));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; i + 16 <= n; i += 16) {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

static inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

static inline void axpy(float p, const float* x, float* y, int64_t n) {  // y += p * x
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += p * x[i];
}

template <typename scalar_t>
static void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const at::Tensor& ctx_lens, at::Tensor& out,
                          double scale, int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = H / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t row = Hkv * D;  // elements per token in the cache: every KV head, read in one sweep

  // One task per sequence: each token's row (all KV heads, contiguous within its block) is read once.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), acc(H * D), kv(row), scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - start;
      if (n <= 0) continue;
      row_to_float(qp + b * H * D, qf.data(), H * D);
      for (int64_t i = 0; i < H * D; ++i) qf[i] *= static_cast<float>(scale);
      scores.resize(H * n);
      const int64_t* table = bt + b * max_blocks;
      for (int64_t t = start; t < len; ++t) {
        row_to_float(kp + (table[t / bs] * bs + t % bs) * row, kv.data(), row);
        for (int64_t h = 0; h < H; ++h) scores[h * n + (t - start)] = dot(qf.data() + h * D, kv.data() + (h / G) * D, D);
      }
      for (int64_t h = 0; h < H; ++h) {
        float* sh = scores.data() + h * n;
        const float m = *std::max_element(sh, sh + n);
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) { sh[i] = std::exp(sh[i] - m); sum += sh[i]; }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < n; ++i) sh[i] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = start; t < len; ++t) {
        row_to_float(vp + (table[t / bs] * bs + t % bs) * row, kv.data(), row);
        for (int64_t h = 0; h < H; ++h) axpy(scores[h * n + (t - start)], kv.data() + (h / G) * D, acc.data() + h * D, D);
      }
      scalar_t* ob = op + b * H * D;
      for (int64_t i = 0; i < H * D; ++i) ob[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                        at::Tensor ctx_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && q.size(2) == k_cache.size(3), "head mismatch");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.to(at::kLong).contiguous();
  ctx_lens = ctx_lens.to(at::kLong).contiguous();
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode_kernel<scalar_t>(q, k_cache, v_cache, block_tables, ctx_lens, out, scale, window);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache");
}
"""


DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, int | None], torch.Tensor]


def load_paged_decode() -> DecodeKernel | None:
    """Compile (or load the cached build of) the kernel; None when that is impossible here.

    q: [B, H, hd]; caches: [N, bs, Hkv, hd]; block_tables: [B, max_blocks]; ctx_lens: [B] -> [B, H, hd].
    """
    try:
        from torch.utils.cpp_extension import load_inline

        module: Any = load_inline(
            name="levante_paged_attention_v3",
            cpp_sources=[_SOURCE],
            extra_cflags=["-O3", "-march=native", "-std=c++17"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, ...: the portable path still works
        logger.warning("CPU paged-attention kernel unavailable (%s); using the portable path", e)
        return None

    def paged_decode(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
        ctx_lens: torch.Tensor, scale: float, window: int | None,
    ) -> torch.Tensor:
        out: torch.Tensor = module.paged_decode(q, k_cache, v_cache, block_tables, ctx_lens, scale, window or -1)
        return out

    return paged_decode
