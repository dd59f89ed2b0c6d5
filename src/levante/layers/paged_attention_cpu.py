"""A C++ decode-attention kernel for CPUs that reads K/V straight from the paged cache.

The portable path (layers/attention.py) gathers every sequence's blocks into a padded
tensor and calls SDPA: two copies of the whole context per layer per step, and a masked
GQA attention that is slow for one query. This kernel walks each sequence's block table
instead, one task per (sequence, query head), scores and sums in float32, in AVX-512
registers where the CPU has it (head sizes 64 and 128 unrolled; a vectorised exp):

    for t in window(ctx_len):  s[t] = q . K[block_table[t // bs], t % bs, kv_head(h)]
    p = softmax(s);            out  = sum_t p[t] V[block_table[t // bs], t % bs, kv_head(h)]

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

// One task per (sequence, query head): the head's scores over its window, softmax, weighted sum of V.
// K/V rows are read straight from their blocks (bf16/f16 widened to float32 in registers) and are
// hot in cache for the other query heads of the same KV head (GQA).

#if defined(__AVX512F__)
template <typename T> static inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// exp for x <= 0 (scores minus their max): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2]; ~1 ulp.
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 y = _mm512_set1_ps(1.f / 5040.f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 720.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 120.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 24.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 6.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}
#endif

// Scores of one query head over tokens [start, len) of one sequence. D16: head_dim / 16 when the
// AVX-512 path applies (compile-time for the common head sizes, so accumulators stay in registers).
template <typename T, int D16>
static void head_attention(const float* qh, const T* kp, const T* vp, const int64_t* table, int64_t bs, int64_t row,
                           int64_t start, int64_t len, int64_t D, float* scores, float* acc) {
  const int64_t n = len - start;
#if defined(__AVX512F__)
  if constexpr (D16 > 0) {
    __m512 q[D16];
    for (int i = 0; i < D16; ++i) q[i] = _mm512_loadu_ps(qh + 16 * i);
    float m = -INFINITY;
    for (int64_t t = start, blk = start / bs, off = start % bs; t < len; ++t) {
      const T* k = kp + (table[blk] * bs + off) * row;
      if (++off == bs) { off = 0; ++blk; }
      __m512 s = _mm512_mul_ps(q[0], load16(k));
      for (int i = 1; i < D16; ++i) s = _mm512_fmadd_ps(q[i], load16(k + 16 * i), s);
      const float v = _mm512_reduce_add_ps(s);
      scores[t - start] = v;
      m = std::max(m, v);
    }
    __m512 sum = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + i), mv));
      _mm512_storeu_ps(scores + i, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (i < n) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + i), mv));
      _mm512_mask_storeu_ps(scores + i, mask, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
    }
    const float inv = 1.f / _mm512_reduce_add_ps(sum);
    __m512 a[D16];
    for (int j = 0; j < D16; ++j) a[j] = _mm512_setzero_ps();
    for (int64_t t = start, blk = start / bs, off = start % bs; t < len; ++t) {
      const T* v = vp + (table[blk] * bs + off) * row;
      if (++off == bs) { off = 0; ++blk; }
      const __m512 p = _mm512_set1_ps(scores[t - start]);
      for (int j = 0; j < D16; ++j) a[j] = _mm512_fmadd_ps(p, load16(v + 16 * j), a[j]);
    }
    const __m512 iv = _mm512_set1_ps(inv);
    for (int j = 0; j < D16; ++j) _mm512_storeu_ps(acc + 16 * j, _mm512_mul_ps(a[j], iv));
    return;
  }
#endif
  float m = -INFINITY;
  for (int64_t t = start, blk = start / bs, off = start % bs; t < len; ++t) {
    const T* k = kp + (table[blk] * bs + off) * row;
    if (++off == bs) { off = 0; ++blk; }
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s += qh[d] * static_cast<float>(k[d]);
    scores[t - start] = s;
    m = std::max(m, s);
  }
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) { scores[i] = std::exp(scores[i] - m); sum += scores[i]; }
  std::fill(acc, acc + D, 0.f);
  for (int64_t t = start, blk = start / bs, off = start % bs; t < len; ++t) {
    const T* v = vp + (table[blk] * bs + off) * row;
    if (++off == bs) { off = 0; ++blk; }
    const float p = scores[t - start];
    for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(v[d]);
  }
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < D; ++d) acc[d] *= inv;
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
  const int64_t row = Hkv * D;  // elements per token in the cache
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lens[b]);

  // Tasks: (sequence, query head); consecutive heads share a KV head, so its rows stay in cache.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(D), acc(D), scores(longest + 16);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, g = h / G;
      const int64_t len = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      scalar_t* o = op + (b * H + h) * D;
      if (len - start <= 0) { std::fill(o, o + D, scalar_t(0)); continue; }
      const scalar_t* qh = qp + (b * H + h) * D;
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(qh[d]) * static_cast<float>(scale);
      const int64_t* table = bt + b * max_blocks;
      const scalar_t* kh = kp + g * D;
      const scalar_t* vh = vp + g * D;
      if (D == 64) head_attention<scalar_t, 4>(qf.data(), kh, vh, table, bs, row, start, len, D, scores.data(), acc.data());
      else if (D == 128) head_attention<scalar_t, 8>(qf.data(), kh, vh, table, bs, row, start, len, D, scores.data(), acc.data());
      else head_attention<scalar_t, 0>(qf.data(), kh, vh, table, bs, row, start, len, D, scores.data(), acc.data());
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
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
            name="levante_paged_attention_v5",
            cpp_sources=[_SOURCE],
            extra_cflags=["-O3", "-march=native", "-std=c++17", "-fopenmp"],
            # OpenMP: at::parallel_for splits the work only when built with it; the libgomp torch
            # loaded already (same soname) is the one used, so there is a single thread pool.
            extra_ldflags=["-fopenmp"],
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
