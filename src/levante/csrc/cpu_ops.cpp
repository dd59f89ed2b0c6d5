// Native CPU kernels of Levante, built once with the machine's compiler (layers/cpu_kernels.py):
//   paged_decode   decode attention reading K/V straight from the paged cache
//   paged_prefill  causal attention of prefill chunks over their cached context and themselves
//   block_gemm     y = x W^T with block-quantised weights (4/8 bits) and int8 activations (AVX512-VNNI)
//   rms_norm       RMSNorm of rows, in float32
//   rope_store     rotary embedding of q and k in place, and K/V written into their cache slots
//   silu_mul       silu(gate) * up of the fused gate/up projection
// Each has a portable torch equivalent in layers/ that the tests compare it with; the fused ones
// exist because at decode batch sizes a step is dozens of tiny ops per layer, and each torch op
// costs microseconds of dispatch that these loops do not.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LEVANTE_AVX512 1
#include <immintrin.h>
#endif
#if LEVANTE_AVX512 && defined(__AVX512VNNI__)
#define LEVANTE_VNNI 1
#endif


// float32, bfloat16 and float16 (the model dtypes); anything else is refused with a clear error.
#define LEVANTE_DISPATCH_AS(TYPE, NAME, ALIAS, ...)                                           \
  switch (TYPE) {                                                                             \
    case at::kFloat: { using ALIAS = float; __VA_ARGS__(); break; }                           \
    case at::kBFloat16: { using ALIAS = c10::BFloat16; __VA_ARGS__(); break; }                \
    case at::kHalf: { using ALIAS = c10::Half; __VA_ARGS__(); break; }                        \
    default: TORCH_CHECK(false, NAME, ": float32, bfloat16 or float16 tensors only");         \
  }
#define LEVANTE_DISPATCH(TYPE, NAME, ...) LEVANTE_DISPATCH_AS(TYPE, NAME, scalar_t, __VA_ARGS__)

namespace {

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

#if LEVANTE_AVX512
// 16 values of T widened to float32, and back (bf16: round to nearest even, as torch does).
template <typename T> inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

template <typename T> inline void store16(T* p, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(p, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
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

// ================================================================ paged decode attention
// One task per (sequence, KV head): the G query heads that share the KV head, over its window of the
// sequence's context. Keys are stored transposed within each block ([D][bs] per head), so one vector
// load is one dimension of 16 keys and a score vector holds 16 keys: no horizontal sums. Values are
// rows ([bs][D] per head), accumulated with the probabilities broadcast. The head's K and V blocks
// are each one contiguous run in the block, prefetched a few blocks ahead (they are scattered over
// the pool, where no hardware prefetcher looks).

#if LEVANTE_AVX512
// A prefetch the compiler keeps (GCC deletes _mm_prefetch loops it deems to have no effect).
inline void prefetch(const char* p) { asm volatile("prefetcht0 %0" : : "m"(*p)); }
inline void prefetch_l2(const char* p) { asm volatile("prefetcht1 %0" : : "m"(*p)); }

// 16 consecutive values of T (lanes outside `m` read as 0), widened to float32.
template <typename T> inline __m512 load16_masked(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
}

// Scores of GC query heads (q: [GC][D], scaled) against `w` <= 16 keys of a transposed block (kt:
// [D][bs], the keys at columns sub .. sub + w). Four partial sums per head (dimensions d mod 4) keep
// 4 GC independent FMA chains in flight; their sum is always taken in the same order.
template <typename TC, int GC>
inline void key_scores(const float* q, int64_t D, const TC* kt, int64_t bs, __mmask16 lanes, __m512 out[GC]) {
  __m512 a[GC][4];
  for (int g = 0; g < GC; ++g)
    for (int r = 0; r < 4; ++r) a[g][r] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 4) {
    for (int r = 0; r < 4; ++r) {
      const __m512 k = load16_masked(kt + (d + r) * bs, lanes);
      for (int g = 0; g < GC; ++g) a[g][r] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * D + d + r]), k, a[g][r]);
    }
  }
  for (int g = 0; g < GC; ++g) out[g] = _mm512_add_ps(_mm512_add_ps(a[g][0], a[g][1]), _mm512_add_ps(a[g][2], a[g][3]));
}
#endif

// The G query heads of one KV head over tokens [start, len) of one sequence.
//   q: [G][D] float32, already scaled; kp, vp: this head's rows within block 0 (blocks are `row` * D
//   elements apart); scores: [G][ld] scratch, indexed from the first token of start's block; inv: [G]
//   scratch; acc: [G][D] float32 output. D16: D / 16 when the AVX-512 path applies (compile time), else 0.
template <typename TC, int D16>
void group_attention(const float* q, int64_t G, const TC* kp, const TC* vp, const int64_t* table, int64_t bs,
                     int64_t row, int64_t start, int64_t len, int64_t D, float* scores, int64_t ld, float* inv,
                     float* acc) {
  const int64_t block_elems = row * D;
#if LEVANTE_AVX512
  if constexpr (D16 > 0) {
    const int64_t first = start / bs, last = (len + bs - 1) / bs;  // blocks [first, last)
    const int64_t base = first * bs;
    const int64_t w = std::min<int64_t>(bs, 16);  // keys per score vector
    const __mmask16 wmask = static_cast<__mmask16>((1u << w) - 1);
    const int64_t lines = (bs * D * static_cast<int64_t>(sizeof(TC)) + 63) / 64;  // one head's K (or V) of a block
    const int64_t ahead = std::max<int64_t>(1, 64 / bs);  // blocks prefetched ahead: ~64 keys
    const auto prefetch_k = [&](int64_t b) {
      const char* p = reinterpret_cast<const char*>(kp + table[b] * block_elems);
      for (int64_t l = 0; l < lines; ++l) prefetch(p + 64 * l);
    };
    for (int64_t b = first; b < std::min(last, first + ahead); ++b) prefetch_k(b);
    for (int64_t b = first; b < last; ++b) {
      if (b + ahead < last) prefetch_k(b + ahead);
      {  // this block's values, into L2 for the weighted sum below
        const char* p = reinterpret_cast<const char*>(vp + table[b] * block_elems);
        for (int64_t l = 0; l < lines; ++l) prefetch_l2(p + 64 * l);
      }
      const TC* kt = kp + table[b] * block_elems;
      for (int64_t sub = 0; sub < bs; sub += w) {
        const int64_t t0 = b * bs + sub;
        const int64_t lo = std::clamp<int64_t>(start - t0, 0, w), hi = std::clamp<int64_t>(len - t0, 0, w);
        const __mmask16 live = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
        if (!live) {  // keys of a wide block past the context's end
          for (int64_t g = 0; g < G; ++g) _mm512_mask_storeu_ps(scores + g * ld + t0 - base, wmask, _mm512_set1_ps(-INFINITY));
          continue;
        }
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
          __m512 s[4];
          const int64_t gc = std::min<int64_t>(4, G - g0);
          switch (gc) {
            case 4: key_scores<TC, 4>(q + g0 * D, D, kt + sub, bs, wmask, s); break;
            case 3: key_scores<TC, 3>(q + g0 * D, D, kt + sub, bs, wmask, s); break;
            case 2: key_scores<TC, 2>(q + g0 * D, D, kt + sub, bs, wmask, s); break;
            default: key_scores<TC, 1>(q + g0 * D, D, kt + sub, bs, wmask, s); break;
          }
          for (int64_t g = 0; g < gc; ++g)
            _mm512_mask_storeu_ps(scores + (g0 + g) * ld + t0 - base, wmask, _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live, s[g]));
        }
      }
    }
    const int64_t n = last * bs - base;  // scored positions, -inf outside [start, len)
    for (int64_t g = 0; g < G; ++g) {  // softmax numerators in place (masked keys exactly 0), 1 / their sum
      float* sg = scores + g * ld;
      __m512 mv = _mm512_set1_ps(-INFINITY);
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
        mv = _mm512_mask_max_ps(mv, m, mv, _mm512_maskz_loadu_ps(m, sg + i));
      }
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, sg + i);
        const __mmask16 keep = _mm512_mask_cmp_ps_mask(m, v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 e = _mm512_maskz_mov_ps(keep, exp16(_mm512_sub_ps(v, mx)));
        _mm512_mask_storeu_ps(sg + i, m, e);
        sum = _mm512_add_ps(sum, e);
      }
      inv[g] = 1.f / _mm512_reduce_add_ps(sum);
    }
    constexpr int HC = D16 <= 4 ? 4 : 2;  // heads per pass over V: HC * D16 accumulators in registers
    for (int64_t g0 = 0; g0 < G; g0 += HC) {
      const int64_t hc = std::min<int64_t>(HC, G - g0);
      __m512 a[HC][D16];
      for (int h = 0; h < HC; ++h)
        for (int j = 0; j < D16; ++j) a[h][j] = _mm512_setzero_ps();
      for (int64_t t = start, blk = start / bs, off = start % bs; t < len; ++t) {
        const TC* v = vp + table[blk] * block_elems + off * D;
        if (++off == bs) { off = 0; ++blk; }
        __m512 vr[D16];
        for (int j = 0; j < D16; ++j) vr[j] = load16(v + 16 * j);
        for (int h = 0; h < HC; ++h) {
          if (h >= hc) break;
          const __m512 p = _mm512_set1_ps(scores[(g0 + h) * ld + t - base]);
          for (int j = 0; j < D16; ++j) a[h][j] = _mm512_fmadd_ps(p, vr[j], a[h][j]);
        }
      }
      for (int64_t h = 0; h < hc; ++h) {
        const __m512 iv = _mm512_set1_ps(inv[g0 + h]);
        for (int j = 0; j < D16; ++j) _mm512_storeu_ps(acc + (g0 + h) * D + 16 * j, _mm512_mul_ps(a[h][j], iv));
      }
    }
    return;
  }
#endif
  const int64_t base = start / bs * bs;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float* sg = scores + g * ld;
    float m = -INFINITY;
    for (int64_t t = start; t < len; ++t) {
      const TC* kt = kp + table[t / bs] * block_elems + t % bs;  // element d at kt[d * bs]
      float sc = 0.f;
      for (int64_t d = 0; d < D; ++d) sc += qg[d] * to_float(kt[d * bs]);
      sg[t - base] = sc;
      m = std::max(m, sc);
    }
    float sum = 0.f;
    for (int64_t t = start; t < len; ++t) { sg[t - base] = std::exp(sg[t - base] - m); sum += sg[t - base]; }
    float* ag = acc + g * D;
    std::fill(ag, ag + D, 0.f);
    for (int64_t t = start; t < len; ++t) {
      const TC* v = vp + table[t / bs] * block_elems + (t % bs) * D;
      const float pr = sg[t - base];
      for (int64_t d = 0; d < D; ++d) ag[d] += pr * to_float(v[d]);
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; ++d) ag[d] *= inv;
  }
}

// Runs body(claim) on every thread; claim() hands out 0, 1, 2, ... (then >= n) across them. Work taken
// as threads become free, not split in advance: on a shared machine one core is often slower.
template <typename F>
void for_each_dynamic(int64_t n, std::atomic<int64_t>& next, const F& body) {
  const auto claim = [&next]() { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { body(claim); });
}

// q, out: [B, H, D] of TQ; k_cache: [num_blocks, Hkv, D, bs], v_cache: [num_blocks, Hkv, bs, D] of TC.
// One task per (sequence, KV head).
template <typename TQ, typename TC>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& ctx_lens, at::Tensor& out, double scale,
                   int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = v_cache.size(1), bs = v_cache.size(2);
  const int64_t G = H / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  const TQ* qp = q.data_ptr<TQ>();
  const TC* kp = k_cache.data_ptr<TC>();
  const TC* vp = v_cache.data_ptr<TC>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  TQ* op = out.data_ptr<TQ>();
  const int64_t row = Hkv * bs;  // a block is Hkv * bs * D elements, each head's part contiguous
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lens[b]);
  const int64_t ld = (longest + 2 * bs + 15) / 16 * 16;  // scored positions: whole blocks around the window
  // Tasks (sequence, KV head) go to threads as they become free: sequences of a batch differ in
  // length, and on a shared machine one core is often slower, so a split made in advance leaves
  // one thread waiting for the other.
  const int64_t tasks = B * Hkv;
  std::atomic<int64_t> next{0};
  for_each_dynamic(tasks, next, [&](auto claim) {
    std::vector<float> qf(G * D), acc(G * D), scores(G * ld), inv(G);
    for (int64_t task = claim(); task < tasks; task = claim()) {
      const int64_t b = task / Hkv, kvh = task % Hkv;
      const int64_t len = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      TQ* o = op + (b * H + kvh * G) * D;
      if (len - start <= 0) { std::fill(o, o + G * D, TQ(0)); continue; }
      const TQ* qh = qp + (b * H + kvh * G) * D;
      for (int64_t i = 0; i < G * D; ++i) qf[i] = to_float(qh[i]) * static_cast<float>(scale);
      const int64_t* table = bt + b * max_blocks;
      const TC* kh = kp + kvh * D * bs;  // the head's [D][bs] keys within each block
      const TC* vh = vp + kvh * bs * D;  // and its [bs][D] values
      if (D == 64) group_attention<TC, 4>(qf.data(), G, kh, vh, table, bs, row, start, len, D, scores.data(), ld, inv.data(), acc.data());
      else if (D == 128) group_attention<TC, 8>(qf.data(), G, kh, vh, table, bs, row, start, len, D, scores.data(), ld, inv.data(), acc.data());
      else group_attention<TC, 0>(qf.data(), G, kh, vh, table, bs, row, start, len, D, scores.data(), ld, inv.data(), acc.data());
      for (int64_t i = 0; i < G * D; ++i) o[i] = static_cast<TQ>(acc[i]);
    }
  });
}

// ================================================================ paged prefill attention
// The new tokens of prefill chunks attend causally to their sequence's context in the paged cache
// (its cached prefix and the chunk itself, both written there by rope_store). One task per (chunk,
// KV head, tile of 16 consecutive tokens): the tile's keys are widened to float32 once for the G
// query heads of the KV head; per head, scores are laid out key by key with the 16 tokens in the
// lanes, so masking, the running max, exp and the sums are all lane-wise (no horizontal reductions).
// Each token's result depends only on the token and its context (keys in order from the first,
// masked keys contributing exact zeros), so chunking a prompt differently never changes it.
constexpr int64_t kQTile = 16;

struct PrefillTask {
  int64_t chunk, kvh, i0;  // tokens i0 .. i0 + 15 (chunk-relative) of the chunk, one KV head
  int64_t work;            // keys the tile reads (its cost, for ordering)
};

#if LEVANTE_AVX512
// Tokens i in [0, nq): query rows q + i * q_ld (H heads of D), context positions first_pos + i.
template <typename TQ, typename TC, int D16>
void prefill_tile(const TQ* q, int64_t q_ld, int64_t G, int64_t kvh, const TC* kh, const TC* vh, const int64_t* table,
                  int64_t bs, int64_t row, int64_t first_pos, int64_t nq, int64_t window, float scale, TQ* out,
                  int64_t out_ld, float* kf, float* vf, float* s, float* qt) {
  constexpr int64_t D = D16 * 16;
  const int64_t khi = first_pos + nq;  // keys [klo, khi): every key some token of the tile may see
  const int64_t klo = window > 0 ? std::max<int64_t>(0, first_pos - window + 1) : 0;
  const int64_t nk = khi - klo;
  const int64_t ldk = (nk + 15) / 16 * 16;  // kf: [D][ldk], keys transposed as in the cache
  for (int64_t t = klo; t < khi;) {  // each block's run of keys [t, t + run)
    const int64_t off = t % bs, run = std::min(bs - off, khi - t);
    const TC* kb = kh + table[t / bs] * row * D;  // [D][bs]
    const TC* vb = vh + table[t / bs] * row * D;  // [bs][D]
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t u = 0; u < run; u += 16) {
        const __mmask16 m = static_cast<__mmask16>(run - u >= 16 ? 0xFFFF : (1u << (run - u)) - 1);
        _mm512_mask_storeu_ps(kf + d * ldk + t - klo + u, m, load16_masked(kb + d * bs + off + u, m));
      }
    }
    for (int64_t u = 0; u < run; ++u)
      for (int i = 0; i < D16; ++i) _mm512_storeu_ps(vf + (t - klo + u) * D + 16 * i, load16(vb + (off + u) * D + 16 * i));
    t += run;
  }
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __mmask16 padding = static_cast<__mmask16>(~((1u << nq) - 1) & 0xFFFF);  // lanes past the tile: see every key
  // Lane i sees key t iff t <= first_pos + i and (no window or t > first_pos + i - window).
  const auto visible = [&](int64_t t) -> __mmask16 {
    const __m512i rel = _mm512_set1_epi32(static_cast<int32_t>(t - first_pos));
    __mmask16 m = _mm512_cmpge_epi32_mask(lane, rel);
    if (window > 0) m &= _mm512_cmplt_epi32_mask(lane, _mm512_add_epi32(rel, _mm512_set1_epi32(static_cast<int32_t>(window))));
    return m | padding;
  };
  for (int64_t g = 0; g < G; ++g) {
    const int64_t head = kvh * G + g;
    for (int64_t d = 0; d < D; ++d)
      for (int64_t i = 0; i < kQTile; ++i) qt[d * kQTile + i] = i < nq ? to_float(q[i * q_ld + head * D + d]) * scale : 0.f;
    // scores s[j][i] = q_i . k_j, 8 keys at a time; masked ones -inf
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    const auto finish_row = [&](int64_t jj, __m512 acc) {
      const __m512 v = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), visible(klo + jj), acc);
      _mm512_storeu_ps(s + jj * kQTile, v);
      mx = _mm512_max_ps(mx, v);
    };
    for (; j + 8 <= nk; j += 8) {
      __m512 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; ++d) {
        const __m512 qd = _mm512_loadu_ps(qt + d * kQTile);
        const float* kd = kf + d * ldk + j;
        for (int r = 0; r < 8; ++r) acc[r] = _mm512_fmadd_ps(qd, _mm512_set1_ps(kd[r]), acc[r]);
      }
      for (int r = 0; r < 8; ++r) finish_row(j + r, acc[r]);
    }
    for (; j < nk; ++j) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; ++d) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qt + d * kQTile), _mm512_set1_ps(kf[d * ldk + j]), acc);
      finish_row(j, acc);
    }
    // softmax numerators in place (masked keys exactly 0), and their sums
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j < nk; ++j) {
      const __m512 v = _mm512_loadu_ps(s + j * kQTile);
      const __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(v, mx)));
      _mm512_storeu_ps(s + j * kQTile, e);
      sum = _mm512_add_ps(sum, e);
    }
    alignas(64) float inv[kQTile];
    _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), sum));
    // out_i = sum_j p[j][i] v_j / sum_i, RB tokens at a time with their D16 accumulators in registers
    constexpr int RB = D16 <= 4 ? 4 : 2;
    for (int64_t i0 = 0; i0 < nq; i0 += RB) {
      const int64_t rb = std::min<int64_t>(RB, nq - i0);
      // keys any of these tokens sees: up to the last one's position, from the first one's window
      const int64_t jb = window > 0 ? std::max<int64_t>(0, first_pos + i0 - window + 1 - klo) : 0;
      const int64_t je = first_pos + i0 + rb - klo;
      __m512 a[RB][D16];
      for (int r = 0; r < RB; ++r)
        for (int dv = 0; dv < D16; ++dv) a[r][dv] = _mm512_setzero_ps();
      for (int64_t jj = jb; jj < je; ++jj) {
        __m512 v[D16];
        for (int dv = 0; dv < D16; ++dv) v[dv] = _mm512_loadu_ps(vf + jj * D + 16 * dv);
        for (int r = 0; r < RB; ++r) {
          const __m512 p = _mm512_set1_ps(s[jj * kQTile + i0 + r]);
          for (int dv = 0; dv < D16; ++dv) a[r][dv] = _mm512_fmadd_ps(p, v[dv], a[r][dv]);
        }
      }
      for (int64_t r = 0; r < rb; ++r) {
        const __m512 iv = _mm512_set1_ps(inv[i0 + r]);
        TQ* o = out + (i0 + r) * out_ld + head * D;
        for (int dv = 0; dv < D16; ++dv) store16(o + 16 * dv, _mm512_mul_ps(a[r][dv], iv));
      }
    }
  }
}

#endif

// Portable version of one tile (no AVX-512, or a head size that is not a multiple of 16): the same
// arithmetic token by token.
template <typename TQ, typename TC>
void prefill_tile_scalar(const TQ* q, int64_t q_ld, int64_t G, int64_t kvh, const TC* kh, const TC* vh,
                         const int64_t* table, int64_t bs, int64_t row, int64_t D, int64_t first_pos, int64_t nq,
                         int64_t window, float scale, TQ* out, int64_t out_ld, float* s) {
  for (int64_t g = 0; g < G; ++g) {
    const int64_t head = kvh * G + g;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t pos = first_pos + i;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const TQ* qi = q + i * q_ld + head * D;
      float m = -INFINITY;
      for (int64_t t = lo; t <= pos; ++t) {
        const TC* k = kh + table[t / bs] * row * D + t % bs;  // element d at k[d * bs]
        float sc = 0.f;
        for (int64_t d = 0; d < D; ++d) sc += to_float(qi[d]) * scale * to_float(k[d * bs]);
        s[t - lo] = sc;
        m = std::max(m, sc);
      }
      float sum = 0.f;
      for (int64_t t = lo; t <= pos; ++t) { s[t - lo] = std::exp(s[t - lo] - m); sum += s[t - lo]; }
      TQ* o = out + i * out_ld + head * D;
      for (int64_t d = 0; d < D; ++d) {
        float acc = 0.f;
        for (int64_t t = lo; t <= pos; ++t) acc += s[t - lo] * to_float(vh[(table[t / bs] * row + t % bs) * D + d]);
        o[d] = static_cast<TQ>(acc / sum);
      }
    }
  }
}

// q: [T, H, D] (token rows may be strided); out: [T, H, D] contiguous; chunks: [C, 3] (first token in
// the step, tokens, context length including them); tables: [C, max_blocks].
template <typename TQ, typename TC>
void prefill_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
                    const at::Tensor& chunks, at::Tensor& out, double scale, int64_t window) {
  const int64_t H = q.size(1), D = q.size(2), q_ld = q.stride(0);
  const int64_t Hkv = v_cache.size(1), bs = v_cache.size(2), G = H / Hkv, row = Hkv * bs;
  const int64_t C = chunks.size(0), max_blocks = tables.size(1);
  const int64_t* ch = chunks.data_ptr<int64_t>();
  const int64_t* bt = tables.data_ptr<int64_t>();
  std::vector<PrefillTask> tasks;
  int64_t widest = 1;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t len = ch[c * 3 + 1], cached = ch[c * 3 + 2] - len;
    for (int64_t i0 = 0; i0 < len; i0 += kQTile) {
      const int64_t last = cached + std::min(len, i0 + kQTile);  // one past the tile's last position
      const int64_t keys = window > 0 ? std::min(last, window + kQTile) : last;
      widest = std::max(widest, keys);
      for (int64_t h = 0; h < Hkv; ++h) tasks.push_back({c, h, i0, keys});
    }
  }
  // Longest tiles first, so that the last ones to finish are short.
  std::stable_sort(tasks.begin(), tasks.end(), [](const PrefillTask& a, const PrefillTask& b) { return a.work > b.work; });
  const TQ* qp = q.data_ptr<TQ>();
  const TC* kp = k_cache.data_ptr<TC>();
  const TC* vp = v_cache.data_ptr<TC>();
  TQ* op = out.data_ptr<TQ>();
  const int64_t n = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next{0};
  for_each_dynamic(n, next, [&](auto claim) {
    std::vector<float> kf((widest + 15) / 16 * 16 * D), vf(widest * D), s(widest * kQTile), qt(D * kQTile);
    for (int64_t k = claim(); k < n; k = claim()) {
      const PrefillTask& task = tasks[k];
      const int64_t start = ch[task.chunk * 3], len = ch[task.chunk * 3 + 1];
      const int64_t first_pos = ch[task.chunk * 3 + 2] - len + task.i0;
      const int64_t nq = std::min(kQTile, len - task.i0);
      const TQ* qt0 = qp + (start + task.i0) * q_ld;
      TQ* o = op + (start + task.i0) * H * D;
      const int64_t* table = bt + task.chunk * max_blocks;
      const TC* kh = kp + task.kvh * D * bs;  // [D][bs] keys of the head in each block
      const TC* vh = vp + task.kvh * bs * D;  // [bs][D] values
      const float sc = static_cast<float>(scale);
#if LEVANTE_AVX512
      if (D == 64) { prefill_tile<TQ, TC, 4>(qt0, q_ld, G, task.kvh, kh, vh, table, bs, row, first_pos, nq, window, sc, o, H * D, kf.data(), vf.data(), s.data(), qt.data()); continue; }
      if (D == 128) { prefill_tile<TQ, TC, 8>(qt0, q_ld, G, task.kvh, kh, vh, table, bs, row, first_pos, nq, window, sc, o, H * D, kf.data(), vf.data(), s.data(), qt.data()); continue; }
#endif
      prefill_tile_scalar<TQ, TC>(qt0, q_ld, G, task.kvh, kh, vh, table, bs, row, D, first_pos, nq, window, sc, o, H * D, s.data());
    }
  });
}


// ================================================================ block-quantised GEMM
constexpr int64_t kBlock = 32;
constexpr int64_t kTile = 16;

// One block of 32 activations: q = round(x * 127 / amax) (ties to even), dx = amax / 127, sum = sum(q).
// Both GEMM layouts quantise through this, so they see the same integers and scales.
template <typename T>
inline void quantize_block(const T* src, int8_t* q, float& dx, int32_t& sum) {
#if LEVANTE_VNNI
  const __m512 v0 = load16(src), v1 = load16(src + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));  // round to nearest even
  const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(q1));
  sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
  float buf[kBlock];
  float amax = 0.f;
  for (int64_t i = 0; i < kBlock; ++i) {
    buf[i] = to_float(src[i]);
    amax = std::max(amax, std::fabs(buf[i]));
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  sum = 0;
  for (int64_t i = 0; i < kBlock; ++i) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(buf[i] * inv));
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
#endif
  dx = amax / 127.f;
}

// Rows x [M, K] -> qx int8 [M, K], dx and sx = dx * sum(qx) [M, K / 32] (layout of the few-rows kernel).
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int64_t ldx, int8_t* qx, float* dx, float* sx) {
  const int64_t KB = K / kBlock;
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < KB; ++b) {
        int32_t sum;
        float d;
        quantize_block(x + r * ldx + b * kBlock, qx + r * K + b * kBlock, d, sum);
        dx[r * KB + b] = d;
        sx[r * KB + b] = d * static_cast<float>(sum);
      }
    }
  });
}

template <typename T>
inline void store_row(T* dst, const float* src, int64_t n, const T* residual) {
  int64_t j = 0;
#if LEVANTE_AVX512
  for (; j + 16 <= n; j += 16) {
    __m512 v = _mm512_loadu_ps(src + j);
    if (residual) v = _mm512_add_ps(v, load16(residual + j));
    store16(dst + j, v);
  }
#endif
  for (; j < n; ++j) dst[j] = static_cast<T>(residual ? src[j] + to_float(residual[j]) : src[j]);
}

struct Operands {
  const uint8_t* packed;
  const at::Half* scales;
  int64_t KB;
  int64_t steps;  // 4 (4-bit) or 8 (8-bit)
  const int8_t* qx;
  const float* dx;
  const float* sx;
  int64_t K;
};

// Reference path (no VNNI): the same arithmetic, one column at a time.
float dot_scalar(const Operands& op, int64_t tile, int64_t col, int64_t row) {
  const int64_t block_bytes = op.steps * 64;
  float acc = 0.f;
  for (int64_t b = 0; b < op.KB; ++b) {
    const uint8_t* w = op.packed + (tile * op.KB + b) * block_bytes;
    const int8_t* q = op.qx + row * op.K + b * kBlock;
    int32_t isum = 0;
    for (int64_t s = 0; s < op.steps; ++s) {
      for (int64_t i = 0; i < 4; ++i) {
        const uint8_t byte = w[s * 64 + col * 4 + i];
        if (op.steps == 4) {
          isum += static_cast<int32_t>(byte & 0x0F) * q[s * 8 + i];
          isum += static_cast<int32_t>(byte >> 4) * q[s * 8 + 4 + i];
        } else {
          isum += static_cast<int32_t>(byte) * q[s * 4 + i];
        }
      }
    }
    const at::Half* sc = op.scales + (tile * op.KB + b) * 2 * kTile;
    const float d = static_cast<float>(sc[col]), m = static_cast<float>(sc[kTile + col]);
    const float dxv = op.dx[row * op.KB + b], sxv = op.sx[row * op.KB + b];
    acc = std::fma(static_cast<float>(isum), d * dxv, acc);
    acc = std::fma(m, sxv, acc);
  }
  return acc;
}

#if LEVANTE_VNNI
// acc += u8 w . (the s8 dword at x, broadcast to 16 lanes). Written out so the broadcast stays an
// embedded memory operand of vpdpbusd (GCC otherwise broadcasts into a register first, a uop on
// port 5 per product; here port 0, the only one that runs vpdpbusd, is the bound).
inline __m512i dpbusd_bcast(__m512i acc, __m512i w, const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(v));
}

// TM rows x TN tiles of 16 columns, over all K blocks. Per block: TM x TN int32 accumulators (the
// block's integer dots), then the float steps into as many float32 accumulators. Each 64-byte weight
// load (4-bit: unpacked to two registers) serves all TM rows; each activation broadcast all TN tiles.
template <int TM, int TN, int STEPS>
inline void tile_kernel(const Operands& op, int64_t tile0, int64_t row0, float* out, int64_t ldo) {
  constexpr int64_t block_bytes = STEPS * 64;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[TM][TN];
  for (int r = 0; r < TM; ++r)
    for (int t = 0; t < TN; ++t) acc[r][t] = _mm512_setzero_ps();
  const uint8_t* wbase = op.packed + tile0 * op.KB * block_bytes;
  const at::Half* sbase = op.scales + tile0 * op.KB * 2 * kTile;
  const int64_t wstride = op.KB * block_bytes, sstride = op.KB * 2 * kTile;
  const int8_t* xrow[TM];
  for (int r = 0; r < TM; ++r) xrow[r] = op.qx + (row0 + r) * op.K;
  for (int64_t b = 0; b < op.KB; ++b) {
    __m512i iacc[TM][TN];
    for (int r = 0; r < TM; ++r)
      for (int t = 0; t < TN; ++t) iacc[r][t] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int s = 0; s < STEPS; ++s) {
      for (int t = 0; t < TN; ++t) {
        const __m512i raw = _mm512_loadu_si512(wbase + t * wstride + b * block_bytes + s * 64);
        if constexpr (STEPS == 4) {
          const __m512i lo = _mm512_and_si512(raw, low4);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
          for (int r = 0; r < TM; ++r) {
            iacc[r][t] = dpbusd_bcast(iacc[r][t], lo, xrow[r] + b * kBlock + s * 8);
            iacc[r][t] = dpbusd_bcast(iacc[r][t], hi, xrow[r] + b * kBlock + s * 8 + 4);
          }
        } else {
          for (int r = 0; r < TM; ++r) iacc[r][t] = dpbusd_bcast(iacc[r][t], raw, xrow[r] + b * kBlock + s * 4);
        }
      }
    }
    for (int t = 0; t < TN; ++t) {
      const at::Half* sc = sbase + t * sstride + b * 2 * kTile;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + kTile)));
      for (int r = 0; r < TM; ++r) {
        const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(op.dx[(row0 + r) * op.KB + b]));
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][t]), scale, acc[r][t]);
        acc[r][t] = _mm512_fmadd_ps(m, _mm512_set1_ps(op.sx[(row0 + r) * op.KB + b]), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < TM; ++r)
    for (int t = 0; t < TN; ++t) _mm512_storeu_ps(out + r * ldo + t * kTile, acc[r][t]);
}

// `rows` (1..4) rows of one or two tiles (measured best of 4x2, 6x2, 8x1 and 4x1 rows x tiles here).
template <int STEPS>
inline void group_kernel(const Operands& op, int64_t tile0, int64_t tiles, int64_t row0, int64_t rows, float* out, int64_t ldo) {
  if (tiles == 2) {
    switch (rows) {
      case 4: tile_kernel<4, 2, STEPS>(op, tile0, row0, out, ldo); break;
      case 3: tile_kernel<3, 2, STEPS>(op, tile0, row0, out, ldo); break;
      case 2: tile_kernel<2, 2, STEPS>(op, tile0, row0, out, ldo); break;
      default: tile_kernel<1, 2, STEPS>(op, tile0, row0, out, ldo); break;
    }
  } else {
    switch (rows) {
      case 4: tile_kernel<4, 1, STEPS>(op, tile0, row0, out, ldo); break;
      case 3: tile_kernel<3, 1, STEPS>(op, tile0, row0, out, ldo); break;
      case 2: tile_kernel<2, 1, STEPS>(op, tile0, row0, out, ldo); break;
      default: tile_kernel<1, 1, STEPS>(op, tile0, row0, out, ldo); break;
    }
  }
}
#endif

template <typename T>
void block_gemm_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t N,
                     int64_t steps, at::Tensor& out, const at::Tensor* residual) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t KB = K / kBlock, NT = packed.size(0);
  auto qx = at::empty({M, K}, x.options().dtype(at::kChar));
  auto dx = at::empty({M, KB}, x.options().dtype(at::kFloat));
  auto sx = at::empty({M, KB}, x.options().dtype(at::kFloat));
  quantize_rows<T>(x.data_ptr<T>(), M, K, x.stride(0), qx.data_ptr<int8_t>(), dx.data_ptr<float>(), sx.data_ptr<float>());
  const Operands op{packed.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), KB, steps,
                    qx.data_ptr<int8_t>(), dx.data_ptr<float>(), sx.data_ptr<float>(), K};
  T* o = out.data_ptr<T>();
  const T* res = residual ? residual->data_ptr<T>() : nullptr;
  // Units of 2 tiles (32 columns) split between threads (small units keep the two halves even for
  // N = 576, say); each unit runs all rows, 4 at a time, through a small float32 buffer that stays
  // in L1 on its way to the output (converted to T, residual added).
  constexpr int64_t kUnit = 2, kRows = 4;
  const int64_t units = (NT + kUnit - 1) / kUnit;
  std::atomic<int64_t> next{0};
  for_each_dynamic(units, next, [&](auto claim) {
    alignas(64) float tmp[kRows * kUnit * kTile];
    constexpr int64_t ldt = kUnit * kTile;
    for (int64_t u = claim(); u < units; u = claim()) {
      const int64_t tile0 = u * kUnit;
      const int64_t tiles = std::min(kUnit, NT - tile0);
      const int64_t col0 = tile0 * kTile;
      const int64_t ncols = std::min(tiles * kTile, N - col0);
      if (ncols <= 0) continue;
      for (int64_t r0 = 0; r0 < M; r0 += kRows) {
        const int64_t rows = std::min(kRows, M - r0);
#if LEVANTE_VNNI
        if (steps == 4) group_kernel<4>(op, tile0, tiles, r0, rows, tmp, ldt);
        else group_kernel<8>(op, tile0, tiles, r0, rows, tmp, ldt);
#else
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t t = 0; t < tiles; ++t)
            for (int64_t j = 0; j < kTile; ++j) tmp[r * ldt + t * kTile + j] = dot_scalar(op, tile0 + t, j, r0 + r);
#endif
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t at = (r0 + r) * N + col0;
          store_row<T>(o + at, tmp + r * ldt, ncols, res ? res + at : nullptr);
        }
      }
    }
  });
}


// ================================================================ fused elementwise ops

// RMSNorm of one row in float32, as the reference does: n = x / sqrt(mean(x^2) + eps), rounded to T,
// then times the weight (in T): weight * n.to(T).
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t D, float eps) {
  float ss = 0.f;
  int64_t i = 0;
#if LEVANTE_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= D; i += 16) {
    const __m512 v = load16(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  ss = _mm512_reduce_add_ps(acc);
#endif
  for (; i < D; ++i) ss += to_float(x[i]) * to_float(x[i]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  i = 0;
#if LEVANTE_AVX512
  const __m512 rv = _mm512_set1_ps(r);
  for (; i + 16 <= D; i += 16) {
    __m512 n = _mm512_mul_ps(load16(x + i), rv);
    if constexpr (!std::is_same_v<T, float>) {  // the reference rounds the normalised row to T first
      T tmp[16];
      store16(tmp, n);
      n = load16(tmp);
    }
    store16(out + i, _mm512_mul_ps(load16(w + i), n));
  }
#endif
  for (; i < D; ++i) out[i] = static_cast<T>(to_float(w[i]) * to_float(static_cast<T>(to_float(x[i]) * r)));
}

// Rotary embedding (HF rotate-half) of the q and k heads of one token, in place; table row: cos | sin.
template <typename T>
void rope_token(T* qk, int64_t heads, int64_t hd, const float* cs) {
  const int64_t half = hd / 2;
  const float* cos = cs;
  const float* sin = cs + hd;
  for (int64_t h = 0; h < heads; ++h) {
    T* x = qk + h * hd;
    int64_t i = 0;
#if LEVANTE_AVX512
    for (; i + 16 <= half; i += 16) {
      const __m512 a = load16(x + i), b = load16(x + i + half);
      store16(x + i, _mm512_fmsub_ps(a, _mm512_loadu_ps(cos + i), _mm512_mul_ps(b, _mm512_loadu_ps(sin + i))));
      store16(x + i + half, _mm512_fmadd_ps(b, _mm512_loadu_ps(cos + i + half), _mm512_mul_ps(a, _mm512_loadu_ps(sin + i + half))));
    }
#endif
    for (; i < half; ++i) {
      const float a = to_float(x[i]), b = to_float(x[i + half]);
      x[i] = static_cast<T>(a * cos[i] - b * sin[i]);
      x[i + half] = static_cast<T>(b * cos[i + half] + a * sin[i + half]);
    }
  }
}

// dst[i] = src[i] in dst's type (the KV cache may be narrower than the activations).
template <typename TD, typename TS>
void convert_row(TD* dst, const TS* src, int64_t n) {
  if constexpr (std::is_same_v<TD, TS>) {
    std::memcpy(dst, src, n * sizeof(TD));
  } else {
    int64_t i = 0;
#if LEVANTE_AVX512
    for (; i + 16 <= n; i += 16) store16(dst + i, load16(src + i));
#endif
    for (; i < n; ++i) dst[i] = static_cast<TD>(to_float(src[i]));
  }
}

// silu(g) * u, with silu(g) = g / (1 + e^-g) computed from e = exp(-|g|) so exp never overflows.
template <typename T>
void silu_mul_row(const T* g, const T* u, T* out, int64_t n) {
  int64_t i = 0;
#if LEVANTE_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = load16(g + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gv)));
    const __mmask16 neg = _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 num = _mm512_mask_mul_ps(gv, neg, gv, e);  // g >= 0: g; g < 0: g e
    store16(out + i, _mm512_mul_ps(_mm512_div_ps(num, _mm512_add_ps(one, e)), load16(u + i)));
  }
#endif
  for (; i < n; ++i) {
    const float gv = to_float(g[i]);
    const float e = std::exp(-std::fabs(gv));
    const float s = (gv >= 0.f ? gv : gv * e) / (1.f + e);
    out[i] = static_cast<T>(s * to_float(u[i]));
  }
}

// Index of the first maximum of a float32 row (NaN never wins, as in torch for finite rows).
int64_t argmax_row(const float* x, int64_t n) {
  int64_t i = 0;
  float best = -INFINITY;
#if LEVANTE_AVX512
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  best = _mm512_reduce_max_ps(m);
#endif
  for (; i < n; ++i) best = std::max(best, x[i]);
  for (i = 0; i < n; ++i)
    if (x[i] == best) return i;
  return 0;
}

}  // namespace

// ================================================================ entry points

// The pool of one layer: keys [num_blocks, Hkv, D, bs] (transposed in each block), values
// [num_blocks, Hkv, bs, D], same dtype, contiguous, bs a power of two.
static void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* name) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, name, ": caches must be 4-d");
  TORCH_CHECK(k_cache.size(0) == v_cache.size(0) && k_cache.size(1) == v_cache.size(1) && k_cache.size(2) == v_cache.size(3) &&
                  k_cache.size(3) == v_cache.size(2),
              name, ": keys must be [blocks, heads, head_dim, block_size] and values [blocks, heads, block_size, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), name, ": k and v caches have different dtypes");
  const int64_t bs = v_cache.size(2);
  TORCH_CHECK(bs > 0 && (bs & (bs - 1)) == 0, name, ": block size must be a power of two");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), name, ": caches must be contiguous");
}

at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                        at::Tensor ctx_lens, double scale, int64_t window) {
  check_caches(k_cache, v_cache, "paged_decode");
  TORCH_CHECK(q.dim() == 3 && q.size(1) % v_cache.size(1) == 0 && q.size(2) == v_cache.size(3), "paged_decode: q must be [B, H, head_dim], H a multiple of the KV heads");
  q = q.contiguous();
  block_tables = block_tables.to(at::kLong).contiguous();
  ctx_lens = ctx_lens.to(at::kLong).contiguous();
  TORCH_CHECK(block_tables.size(0) == q.size(0) && ctx_lens.numel() == q.size(0), "one block table and length per sequence");
  auto out = at::empty_like(q);
  LEVANTE_DISPATCH_AS(q.scalar_type(), "paged_decode", TQ, [&] {
    LEVANTE_DISPATCH_AS(k_cache.scalar_type(), "paged_decode", TC, [&] {
      decode_kernel<TQ, TC>(q, k_cache, v_cache, block_tables, ctx_lens, out, scale, window);
    });
  });
  return out;
}


// q: [T, H, D] (token rows may be strided, e.g. a view of the fused qkv); out: [T, H, D], whose rows of
// the chunks' tokens are written. chunks: [C, 3] int64 (first token in the step, tokens, context length
// including them); tables: [C, max_blocks] int64. The chunks' K/V must be in the cache already.
void paged_prefill(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor tables, at::Tensor chunks,
                   at::Tensor out, double scale, int64_t window) {
  check_caches(k_cache, v_cache, "paged_prefill");
  TORCH_CHECK(q.dim() == 3 && q.size(1) % v_cache.size(1) == 0 && q.size(2) == v_cache.size(3), "paged_prefill: q must be [T, H, head_dim], H a multiple of the KV heads");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "paged_prefill: each token's heads must be contiguous");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "paged_prefill: out must be like q, contiguous");
  chunks = chunks.to(at::kLong).contiguous();
  tables = tables.to(at::kLong).contiguous();
  TORCH_CHECK(chunks.dim() == 2 && chunks.size(1) == 3 && tables.dim() == 2 && tables.size(0) == chunks.size(0), "paged_prefill: one [start, len, ctx] row and block table per chunk");
  const int64_t T = q.size(0), bs = v_cache.size(2), nb = v_cache.size(0);
  const int64_t* ch = chunks.data_ptr<int64_t>();
  const int64_t* bt = tables.data_ptr<int64_t>();
  for (int64_t c = 0; c < chunks.size(0); ++c) {
    const int64_t start = ch[c * 3], len = ch[c * 3 + 1], ctx = ch[c * 3 + 2];
    TORCH_CHECK(start >= 0 && len > 0 && start + len <= T && ctx >= len, "paged_prefill: chunk outside the step");
    TORCH_CHECK((ctx + bs - 1) / bs <= tables.size(1), "paged_prefill: block table shorter than the context");
    for (int64_t b = 0; b < (ctx + bs - 1) / bs; ++b)
      TORCH_CHECK(0 <= bt[c * tables.size(1) + b] && bt[c * tables.size(1) + b] < nb, "paged_prefill: block id out of range");
  }
  LEVANTE_DISPATCH_AS(q.scalar_type(), "paged_prefill", TQ, [&] {
    LEVANTE_DISPATCH_AS(k_cache.scalar_type(), "paged_prefill", TC, [&] {
      prefill_kernel<TQ, TC>(q, k_cache, v_cache, tables, chunks, out, scale, window);
    });
  });
}


// x: [M, K] (float32, bfloat16 or float16; rows contiguous) -> [M, N] in x's dtype (+ residual, if given).
at::Tensor block_gemm(at::Tensor x, at::Tensor packed, at::Tensor scales, int64_t N, int64_t bits,
                      c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be uint8 [NT, KB, bytes]");
  TORCH_CHECK(scales.dim() == 4 && scales.scalar_type() == at::kHalf && scales.is_contiguous(), "scales must be fp16 [NT, KB, 2, 16]");
  const int64_t steps = bits == 4 ? 4 : 8;
  TORCH_CHECK(packed.size(2) == steps * 64, "packed block size does not match bits");
  TORCH_CHECK(x.size(1) == packed.size(1) * kBlock, "x has ", x.size(1), " inputs, the weights ", packed.size(1) * kBlock);
  TORCH_CHECK(N <= packed.size(0) * kTile && N > (packed.size(0) - 1) * kTile, "N does not match the packed tiles");
  TORCH_CHECK(scales.size(0) == packed.size(0) && scales.size(1) == packed.size(1), "scales do not match the packed weights");
  if (x.stride(1) != 1) x = x.contiguous();
  auto out = at::empty({x.size(0), N}, x.options());
  if (residual) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == x.scalar_type(), "residual must be [M, N] in x's dtype");
    *residual = residual->contiguous();
  }
  if (x.size(0) == 0) return out;
  LEVANTE_DISPATCH(x.scalar_type(), "block_gemm", [&] {
    block_gemm_impl<scalar_t>(x, packed, scales, N, steps, out, residual ? &*residual : nullptr);
  });
  return out;
}

// x: [T, D] -> weight * rms_norm(x), in x's dtype; weight: [D] in x's dtype.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "rms_norm: x [T, D], weight [D]");
  x = x.contiguous();
  weight = weight.to(x.scalar_type()).contiguous();
  auto out = at::empty_like(x);
  const int64_t T = x.size(0), D = x.size(1);
  LEVANTE_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) rms_norm_row(xp + t * D, wp, op + t * D, D, static_cast<float>(eps));
    });
  });
  return out;
}

// qkv: [T, (H + 2 Hkv) hd], rows contiguous: q and k heads rotated in place, then k and v of token t
// copied to cache slot slots[t]: slot s is offset s % block_size of each head in block s / block_size, a
// column of the keys' [hd][block_size] and a row of the values' [block_size][hd]. table: [P, 2 hd] float32.
void rope_store(at::Tensor qkv, at::Tensor table, at::Tensor positions, at::Tensor slots, at::Tensor k_cache,
                at::Tensor v_cache, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "rope_store: qkv must be [T, width] with contiguous rows");
  check_caches(k_cache, v_cache, "rope_store");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous(), "rope_store: float32 table");
  const int64_t T_ = qkv.size(0), hd = v_cache.size(3);
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * hd && table.size(1) == 2 * hd, "rope_store: widths");
  TORCH_CHECK(v_cache.size(1) == num_kv_heads, "rope_store: kv heads");
  positions = positions.to(at::kLong).contiguous();
  slots = slots.to(at::kLong).contiguous();
  TORCH_CHECK(positions.numel() == T_ && slots.numel() == T_, "rope_store: one position and slot per token");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t bs = v_cache.size(2), n_slots = v_cache.size(0) * bs, n_pos = table.size(0);
  for (int64_t t = 0; t < T_; ++t) {
    TORCH_CHECK(0 <= pos[t] && pos[t] < n_pos && 0 <= slot[t] && slot[t] < n_slots, "rope_store: position or slot out of range");
  }
  const int64_t ld = qkv.stride(0);
  LEVANTE_DISPATCH_AS(qkv.scalar_type(), "rope_store", T, [&] {
    LEVANTE_DISPATCH_AS(k_cache.scalar_type(), "rope_store", TC, [&] {
      T* base = qkv.data_ptr<T>();
      TC* kc = k_cache.data_ptr<TC>();
      TC* vc = v_cache.data_ptr<TC>();
      const float* tab = table.data_ptr<float>();
      at::parallel_for(0, T_, 64, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          T* row = base + t * ld;
          rope_token(row, num_heads + num_kv_heads, hd, tab + pos[t] * 2 * hd);
          const int64_t block = slot[t] / bs, off = slot[t] % bs;
          for (int64_t h = 0; h < num_kv_heads; ++h) {
            const int64_t head = (block * num_kv_heads + h) * bs * hd;
            const T* k = row + (num_heads + h) * hd;
            for (int64_t d = 0; d < hd; ++d) kc[head + d * bs + off] = static_cast<TC>(to_float(k[d]));
            convert_row(vc + head + off * hd, row + (num_heads + num_kv_heads + h) * hd, hd);
          }
        }
      });
    });
  });
}

// gate_up: [T, 2 I] (gate | up) -> silu(gate) * up: [T, I].
at::Tensor silu_mul(at::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: [T, 2 I]");
  gate_up = gate_up.contiguous();
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({T, I}, gate_up.options());
  LEVANTE_DISPATCH(gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* g = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 8192 / I), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) silu_mul_row(g + t * 2 * I, g + t * 2 * I + I, o + t * I, I);
    });
  });
  return out;
}

// logits: [B, V] float32 -> the index of each row's first maximum (greedy decoding's argmax).
at::Tensor argmax_rows(at::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "argmax_rows: float32 [B, V]");
  logits = logits.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  auto out = at::empty({B}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) op[b] = argmax_row(lp + b * V, V);
  });
  return out;
}

// A projection of the decode stack: block-quantised (packed uint8 + fp16 scales) or a dense weight.
static at::Tensor project(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, int64_t N, const c10::optional<at::Tensor>& residual) {
  if (a.scalar_type() == at::kByte) return block_gemm(x, a, b, N, a.size(2) == 4 * 64 ? 4 : 8, residual);
  if (residual) return at::addmm(*residual, x, a.t());
  return at::linear(x, a);
}

// One decode step (one new token per sequence) through every decoder layer of a dense Llama-family
// model, the same ops as models/llama.py with the CPU kernels, without Python between them.
// layers[i] = {input norm, post-attention norm, k cache, v cache, qkv a, qkv b, o a, o b, gate_up a,
// gate_up b, down a, down b}; a projection is (packed, scales) or (weight, empty).
// x: [B, D] embedded tokens -> [B, D] hidden states before the final norm.
at::Tensor decode_layers(at::Tensor x, const std::vector<std::vector<at::Tensor>>& layers, at::Tensor block_tables,
                         at::Tensor ctx_lens, at::Tensor positions, at::Tensor slots, at::Tensor table, double eps,
                         int64_t num_heads, int64_t num_kv_heads, int64_t intermediate, double scale, int64_t window) {
  const int64_t B = x.size(0), D = x.size(1);
  for (const auto& w : layers) {
    TORCH_CHECK(w.size() == 12, "decode_layers: 12 tensors per layer");
    const int64_t hd = w[3].size(3);
    at::Tensor h = rms_norm(x, w[0], eps);
    at::Tensor qkv = project(h, w[4], w[5], (num_heads + 2 * num_kv_heads) * hd, c10::nullopt);
    rope_store(qkv, table, positions, slots, w[2], w[3], num_heads, num_kv_heads);
    at::Tensor attn = paged_decode(qkv.narrow(1, 0, num_heads * hd).view({B, num_heads, hd}), w[2], w[3], block_tables,
                                   ctx_lens, scale, window);
    x = project(attn.view({B, num_heads * hd}), w[6], w[7], D, x);
    h = rms_norm(x, w[1], eps);
    at::Tensor act = silu_mul(project(h, w[8], w[9], 2 * intermediate, c10::nullopt));
    x = project(act, w[10], w[11], D, x);
  }
  return x;
}

bool has_vnni() {
#if LEVANTE_VNNI
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache");
  m.def("paged_prefill", &paged_prefill, "causal attention of prefill chunks over their context in the paged cache",
        py::call_guard<py::gil_scoped_release>());
  m.def("block_gemm", &block_gemm, "y = x W^T with block-quantised W (4/8 bits) and int8 activations",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("N"), py::arg("bits"), py::arg("residual") = py::none());
  m.def("rms_norm", &rms_norm, "weight * rms_norm(x)");
  m.def("rope_store", &rope_store, "rotary embedding of q/k in place and K/V into the paged cache");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("argmax_rows", &argmax_rows, "index of each row's first maximum");
  m.def("decode_layers", &decode_layers, "a decode step through every decoder layer", py::call_guard<py::gil_scoped_release>());
  m.def("has_vnni", &has_vnni, "whether the integer GEMM was built with AVX512-VNNI");
}
