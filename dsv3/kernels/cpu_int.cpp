// Memory-bound int8 / int4 weight × few-row activation products for CPU decode.
//
// The weights are read in the layouts dsv3.quant.int_formats stores (no repacking):
//   int8   q int8 [N, K] (expert stacks [E, N, K]), scale fp32 [N] ([E, N]):   W = q · scale[:, None]
//   int4   packed uint8 [N, K/2] ("rows": byte j = column 2j low nibble | column 2j+1 high nibble),
//          scale_zero bf16 [K/G, N, 2] ([E, K/G, N, 2]):                      W = (code - 8) · s + z per group
//
//   int8_linear(x [M,K], q, scale)              -> y [M,N] fp32
//   int4_linear(x [M,K], packed, sz, G)         -> y [M,N] fp32
//   *_expert_linear(x [P,K], ..., ids [P])      -> y[p] = x[p] · W[ids[p]]ᵀ, ids sorted so each used expert's
//                                                 weights are read once; unused experts are never touched
//
// Arithmetic (the Python references in dsv3/kernels/int_kernels.py do the same in PyTorch):
//   int8  dequantise in registers (int8 -> int32 -> fp32) and FMA with fp32 activations; the row's scale
//         once at the end. Exact w.r.t. x · Wᵀ up to fp32 summation order.
//   int4  activations quantised per row and per weight group of G values to int8 (symmetric, scale
//         amax/127 — llama.cpp's Q8 idea, at the weights' group granularity), then integer dot products of
//         codes × activation codes: AVX512-VNNI `vpdpbusd` (64 MACs per instruction) or AVX2
//         `vpmaddubsw`+`vpmaddwd`; per group  y += s·xs·Σ code·xq + (z - 8s)·xs·Σ xq.
//         Equal to x̂ · Ŵᵀ (x̂ the dequantised activations) up to fp32 rounding.
//
// ISA: each routine exists as an AVX-512 (F/BW/VL/VNNI) and an AVX2 (+FMA) variant, compiled here with
// target pragmas and chosen at run time by the caller (`isa`: 2 = AVX-512 VNNI, 1 = AVX2); `cpu_features()`
// says what this CPU has. Work is split over output rows with at::parallel_for (torch's OpenMP threads).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

#include "expert_runs.h"

namespace {

constexpr int64_t kBlockRows = 4;   // activation rows per register block
// Weight rows are prefetched into L2 this many rows ahead (int4: twice as many, its rows are half as long), one
// prefetch per cache line: without it one thread streamed int8 weights from DRAM at ~8 GB/s, with it ~14 (the
// out-of-order window alone keeps too few lines in flight).
constexpr int64_t kPrefetchRows = 4;

struct Int4Act {       // activations quantised per (row, group); per block of B columns: evens, then odds
  std::vector<int8_t> q;     // [M, K]
  std::vector<float> scale;  // [M, K/G]   xs
  std::vector<float> sum;    // [M, K/G]   xs · Σ q over the group (Σ of the dequantised activations)
};

// Activations are quantised per (row, group): xs = amax/127, code = clamp(round_half_even(x / xs), ±127) — the
// same divisions and rounding as intq.quantize_activations — and stored per block of B columns (the columns one
// kernel step unpacks: 32 AVX2, 64 or 128 AVX-512; G % B == 0) as the block's evens, then its odds. Vectorised in
// each ISA namespace below (`quantize_group`): a scalar loop (libm nearbyint per value) cost ~6 ns per value,
// 65 µs of a 130 µs product at K = 10944.
// quantize(group's G values, its codes, &xs, &xs·Σcode) for every (row, group) of x [M, K].
template <typename F>
Int4Act quantize_groups(const float* x, int64_t M, int64_t K, int64_t G, const F& quantize) {
  const int64_t ng = K / G;
  Int4Act a{std::vector<int8_t>(M * K), std::vector<float>(M * ng), std::vector<float>(M * ng)};
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < ng; ++g)
      quantize(x + r * K + g * G, a.q.data() + r * K + g * G, &a.scale[r * ng + g], &a.sum[r * ng + g]);
  return a;
}

// ---------------------------------------------------------------------------------------------- AVX-512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,avx2")

namespace k512 {

// One group of G values (G % 64 == 0) -> codes in block order (B = 64 or 128), xs, xs·Σcode.
void quantize_group(const float* xg, int64_t G, int64_t B, int8_t* tmp, int8_t* dst, float* xs_out, float* sum_out) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t i = 0; i < G; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xg + i)));
  const float amax = _mm512_reduce_max_ps(mx);
  const float xs = amax / 127.f;
  const __m512 div = _mm512_set1_ps(amax > 0.f ? xs : 1.f);
  const __m512 hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  __m512i total = _mm512_setzero_si512();
  for (int64_t i = 0; i < G; i += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xg + i), div), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, v)));
    total = _mm512_add_epi32(total, q);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp + i), _mm512_cvtepi32_epi8(q));
  }
  // per 64 codes: the low bytes of the 16-bit lanes are the evens, the high bytes the odds
  for (int64_t c0 = 0; c0 < G; c0 += B)
    for (int64_t j = 0; j < B; j += 64) {
      const __m512i v = _mm512_loadu_si512(tmp + c0 + j);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c0 + j / 2), _mm512_cvtepi16_epi8(v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c0 + B / 2 + j / 2), _mm512_cvtepi16_epi8(_mm512_srli_epi16(v, 8)));
    }
  *xs_out = xs;
  *sum_out = xs * static_cast<float>(_mm512_reduce_add_epi32(total));
}

// y[r*ldy + n] = scale[n] · Σ_k q[n,k] x[r,k] for r < R, n in [n0, n0 + P·⌊(n1-n0)/P⌋): P weight rows per pass
// share each load of x (with several activation rows the loads of x, not the FMAs, would limit).
template <int R, int P>
int64_t int8_rows(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t n0, int64_t n1, float* y,
                  int64_t ldy) {
  int64_t n = n0;
  for (; n + P <= n1; n += P) {
    __m512 a0[P][R], a1[P][R];
    for (int j = 0; j < P; ++j)
      for (int r = 0; r < R; ++r) a0[j][r] = a1[j][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m512 w0[P], w1[P];
      for (int j = 0; j < P; ++j) {
        const int8_t* wr = w + (n + j) * K + k;
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchRows * K), _MM_HINT_T1);
        w0[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr))));
        w1[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 16))));
      }
      for (int r = 0; r < R; ++r) {
        const __m512 x0 = _mm512_loadu_ps(x + r * K + k), x1 = _mm512_loadu_ps(x + r * K + k + 16);
        for (int j = 0; j < P; ++j) {
          a0[j][r] = _mm512_fmadd_ps(w0[j], x0, a0[j][r]);
          a1[j][r] = _mm512_fmadd_ps(w1[j], x1, a1[j][r]);
        }
      }
    }
    for (; k < K; k += 16) {
      const __mmask16 m = (K - k) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
      for (int j = 0; j < P; ++j) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + (n + j) * K + k)));
        for (int r = 0; r < R; ++r) a0[j][r] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + r * K + k), a0[j][r]);
      }
    }
    for (int j = 0; j < P; ++j)
      for (int r = 0; r < R; ++r)
        y[r * ldy + n + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0[j][r], a1[j][r])) * scale[n + j];
  }
  return n;
}

template <int R>
void int8_rows_all(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t n0, int64_t n1, float* y,
                   int64_t ldy) {
  const int64_t n = int8_rows<R, 2>(x, K, w, scale, n0, n1, y, ldy);
  int8_rows<R, 1>(x, K, w, scale, n, n1, y, ldy);
}

void int8_range(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t n0, int64_t n1,
                float* y, int64_t ldy) {
  // weight rows outermost within a block of 16, so rows beyond the first register block re-read them from L1
  for (int64_t b0 = n0; b0 < n1; b0 += 16) {
    const int64_t b1 = std::min(n1, b0 + 16);
    for (int64_t r0 = 0; r0 < M; r0 += kBlockRows) {
      const float* xr = x + r0 * K;
      float* yr = y + r0 * ldy;
      switch (std::min(kBlockRows, M - r0)) {
        case 4: int8_rows_all<4>(xr, K, w, scale, b0, b1, yr, ldy); break;
        case 3: int8_rows_all<3>(xr, K, w, scale, b0, b1, yr, ldy); break;
        case 2: int8_rows_all<2>(xr, K, w, scale, b0, b1, yr, ldy); break;
        default: int8_rows_all<1>(xr, K, w, scale, b0, b1, yr, ldy); break;
      }
    }
  }
}

// Int4 weight rows against R rows of quantised activations, P weight rows per pass (G % 64 == 0; x permuted per
// 128 columns when G % 128 == 0, else per 64: `quantize_act`). Returns the first row not done.
template <int R, int P>
int64_t int4_rows(const int8_t* xq, const float* xs, const float* xsum, int64_t K, int64_t G, const uint8_t* p,
                  const at::BFloat16* sz, int64_t N, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t ng = K / G;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m256i low256 = _mm256_set1_epi8(0x0F);
  int64_t n = n0;
  for (; n + P <= n1; n += P) {
    __m512 facc[P][R];
    float sc[P][R];
    for (int j = 0; j < P; ++j)
      for (int r = 0; r < R; ++r) {
        facc[j][r] = _mm512_setzero_ps();
        sc[j][r] = 0.f;
      }
    for (int64_t g = 0; g < ng; ++g) {
      __m512i acc[P][R];
      for (int j = 0; j < P; ++j)
        for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_si512();
      if (G % 128 == 0) {
        // 64 bytes = 128 columns: low nibbles = the even columns, high nibbles = the odd ones (x permuted so)
        for (int64_t c = 0; c < G; c += 128) {
          __m512i lo[P], hi[P];
          for (int j = 0; j < P; ++j) {
            const uint8_t* pr = p + (n + j) * (K / 2) + (g * G + c) / 2;
            _mm_prefetch(reinterpret_cast<const char*>(pr + 2 * kPrefetchRows * (K / 2)), _MM_HINT_T1);
            __m512i b = _mm512_loadu_si512(pr);
            lo[j] = _mm512_and_si512(b, low);
            hi[j] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
          }
          for (int r = 0; r < R; ++r) {
            const int8_t* xr = xq + r * K + g * G + c;
            const __m512i xa = _mm512_loadu_si512(xr), xb = _mm512_loadu_si512(xr + 64);
            for (int j = 0; j < P; ++j) {
              acc[j][r] = _mm512_dpbusd_epi32(acc[j][r], lo[j], xa);
              acc[j][r] = _mm512_dpbusd_epi32(acc[j][r], hi[j], xb);
            }
          }
        }
      } else {
        // 32 bytes = 64 columns -> [low nibbles (evens), high nibbles (odds)]
        for (int64_t c = 0; c < G; c += 64) {
          __m512i u[P];
          for (int j = 0; j < P; ++j) {
            const uint8_t* pr = p + (n + j) * (K / 2) + (g * G + c) / 2;
            if ((c & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(pr + 2 * kPrefetchRows * (K / 2)), _MM_HINT_T1);
            __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pr));
            __m256i lo = _mm256_and_si256(b, low256), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low256);
            u[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
          }
          for (int r = 0; r < R; ++r) {
            const __m512i xa = _mm512_loadu_si512(xq + r * K + g * G + c);
            for (int j = 0; j < P; ++j) acc[j][r] = _mm512_dpbusd_epi32(acc[j][r], u[j], xa);
          }
        }
      }
      // the group's scales: one stream per group, too many for the hardware prefetcher on its own
      _mm_prefetch(reinterpret_cast<const char*>(sz + (g * N + n + 8 * kPrefetchRows) * 2), _MM_HINT_T1);
      for (int j = 0; j < P; ++j) {
        const float s = static_cast<float>(sz[(g * N + n + j) * 2]), z = static_cast<float>(sz[(g * N + n + j) * 2 + 1]);
        for (int r = 0; r < R; ++r) {
          facc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j][r]), _mm512_set1_ps(s * xs[r * ng + g]), facc[j][r]);
          sc[j][r] += (z - 8.f * s) * xsum[r * ng + g];
        }
      }
    }
    for (int j = 0; j < P; ++j)
      for (int r = 0; r < R; ++r) y[r * ldy + n + j] = _mm512_reduce_add_ps(facc[j][r]) + sc[j][r];
  }
  return n;
}

template <int R>
void int4_rows_all(const int8_t* xq, const float* xs, const float* xsum, int64_t K, int64_t G, const uint8_t* p,
                   const at::BFloat16* sz, int64_t N, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t n = int4_rows<R, 2>(xq, xs, xsum, K, G, p, sz, N, n0, n1, y, ldy);
  int4_rows<R, 1>(xq, xs, xsum, K, G, p, sz, N, n, n1, y, ldy);
}

void int4_range(const Int4Act& a, int64_t row0, int64_t M, int64_t K, int64_t G, const uint8_t* p,
                const at::BFloat16* sz, int64_t N, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t ng = K / G;
  for (int64_t b0 = n0; b0 < n1; b0 += 16) {
    const int64_t b1 = std::min(n1, b0 + 16);
    for (int64_t r0 = 0; r0 < M; r0 += kBlockRows) {
      const int64_t r = row0 + r0;
      const int8_t* xq = a.q.data() + r * K;
      const float* xs = a.scale.data() + r * ng;
      const float* xsum = a.sum.data() + r * ng;
      float* yr = y + r0 * ldy;
      switch (std::min(kBlockRows, M - r0)) {
        case 4: int4_rows_all<4>(xq, xs, xsum, K, G, p, sz, N, b0, b1, yr, ldy); break;
        case 3: int4_rows_all<3>(xq, xs, xsum, K, G, p, sz, N, b0, b1, yr, ldy); break;
        case 2: int4_rows_all<2>(xq, xs, xsum, K, G, p, sz, N, b0, b1, yr, ldy); break;
        default: int4_rows_all<1>(xq, xs, xsum, K, G, p, sz, N, b0, b1, yr, ldy); break;
      }
    }
  }
}

// bf16 bits of 16 fp32 values, rounded to nearest even, in the high halves of the 32-bit lanes
inline __m512i bf16_high(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
}

// out[k] = bf16(q[k] · s) for one row of K values
void int8_dense_row(const int8_t* q, float s, int64_t K, uint16_t* out) {
  const __m512 sv = _mm512_set1_ps(s);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)))), sv);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high(f), 16)));
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + k))), sv);
    _mm256_mask_storeu_epi16(out + k, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high(f), 16)));
  }
}

// out[c] = bf16((code[c] - 8)·scale_g + zero_g) for one "rows"-packed row (K/2 bytes, G % 32 == 0); sz points
// at (scale, zero) of group 0 of this row, `sz_stride` values apart per group. 16 bytes hold 32 columns: the
// low nibbles are the even ones, the high nibbles the odd ones, so one 32-bit lane stores an (even, odd) pair.
void int4_dense_row(const uint8_t* p, const at::BFloat16* sz, int64_t sz_stride, int64_t K, int64_t G,
                    uint16_t* out) {
  const __m512i low = _mm512_set1_epi32(0x0F), eight = _mm512_set1_epi32(8);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t g = 0; g < K / G; ++g) {
    const __m512 sv = _mm512_set1_ps(static_cast<float>(sz[g * sz_stride]));
    const __m512 zv = _mm512_set1_ps(static_cast<float>(sz[g * sz_stride + 1]));
    for (int64_t c = g * G; c < (g + 1) * G; c += 32) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c / 2)));
      const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, low), eight)), sv, zv);
      const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight)), sv, zv);
      const __m512i pair = _mm512_or_si512(_mm512_srli_epi32(bf16_high(lo), 16), _mm512_and_si512(bf16_high(hi), high_half));
      _mm512_storeu_si512(out + c, pair);
    }
  }
}

}  // namespace k512
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------- AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace k256 {

// One group of G values (G % 32 == 0) -> codes in blocks of 32 (16 evens, 16 odds), xs, xs·Σcode.
void quantize_group(const float* xg, int64_t G, int32_t* tmp, int8_t* dst, float* xs_out, float* sum_out) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 mx = _mm256_setzero_ps();
  for (int64_t i = 0; i < G; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + i)));
  float lanes[8];
  _mm256_storeu_ps(lanes, mx);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  const float xs = amax / 127.f;
  const __m256 div = _mm256_set1_ps(amax > 0.f ? xs : 1.f);
  const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  for (int64_t i = 0; i < G; i += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xg + i), div), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tmp + i), _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v))));
  }
  int32_t total = 0;
  for (int64_t c0 = 0; c0 < G; c0 += 32)
    for (int64_t i = 0; i < 16; ++i) {
      dst[c0 + i] = static_cast<int8_t>(tmp[c0 + 2 * i]);
      dst[c0 + 16 + i] = static_cast<int8_t>(tmp[c0 + 2 * i + 1]);
      total += tmp[c0 + 2 * i] + tmp[c0 + 2 * i + 1];
    }
  *xs_out = xs;
  *sum_out = xs * static_cast<float>(total);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R>
void int8_rows(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchRows * K + k), _MM_HINT_T1);
      __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k))));
      __m256 w1 = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k + 8))));
      for (int r = 0; r < R; ++r) {
        a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), a0[r]);
        a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), a1[r]);
      }
    }
    float tail[R];
    for (int r = 0; r < R; ++r) tail[r] = 0.f;
    for (; k < K; ++k)
      for (int r = 0; r < R; ++r) tail[r] += static_cast<float>(wr[k]) * x[r * K + k];
    const float s = scale[n];
    for (int r = 0; r < R; ++r) y[r * ldy + n] = (hsum(_mm256_add_ps(a0[r], a1[r])) + tail[r]) * s;
  }
}

void int8_range(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t n0, int64_t n1,
                float* y, int64_t ldy) {
  for (int64_t b0 = n0; b0 < n1; b0 += 16) {
    const int64_t b1 = std::min(n1, b0 + 16);
    for (int64_t r0 = 0; r0 < M; r0 += kBlockRows) {
      const float* xr = x + r0 * K;
      float* yr = y + r0 * ldy;
      switch (std::min(kBlockRows, M - r0)) {
        case 4: int8_rows<4>(xr, K, w, scale, b0, b1, yr, ldy); break;
        case 3: int8_rows<3>(xr, K, w, scale, b0, b1, yr, ldy); break;
        case 2: int8_rows<2>(xr, K, w, scale, b0, b1, yr, ldy); break;
        default: int8_rows<1>(xr, K, w, scale, b0, b1, yr, ldy); break;
      }
    }
  }
}

// G % 32 == 0; vpmaddubsw (u8 code × s8 activation, pairs summed in int16: |sum| <= 2·15·127) + vpmaddwd
template <int R>
void int4_rows(const int8_t* xq, const float* xs, const float* xsum, int64_t K, int64_t G, const uint8_t* p,
               const at::BFloat16* sz, int64_t N, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t ng = K / G, nv = G / 32;
  const __m256i cnt = _mm256_set_epi64x(4, 4, 0, 0);
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* pr = p + n * (K / 2);
    __m256 facc[R];
    float sc[R];
    for (int r = 0; r < R; ++r) {
      facc[r] = _mm256_setzero_ps();
      sc[r] = 0.f;
    }
    for (int64_t g = 0; g < ng; ++g) {
      const float s = static_cast<float>(sz[(g * N + n) * 2]), z = static_cast<float>(sz[(g * N + n) * 2 + 1]);
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      for (int64_t v = 0; v < nv; ++v) {
        if ((v & 3) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(pr + 2 * kPrefetchRows * (K / 2) + g * G / 2 + v * 16), _MM_HINT_T1);
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pr + g * G / 2 + v * 16));
        __m256i u = _mm256_and_si256(_mm256_srlv_epi64(_mm256_broadcastsi128_si256(b), cnt), low);
        for (int r = 0; r < R; ++r) {
          __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + g * G + v * 32));
          acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), ones));
        }
      }
      for (int r = 0; r < R; ++r) {
        facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(s * xs[r * ng + g]), facc[r]);
        sc[r] += (z - 8.f * s) * xsum[r * ng + g];
      }
    }
    for (int r = 0; r < R; ++r) y[r * ldy + n] = hsum(facc[r]) + sc[r];
  }
}

void int4_range(const Int4Act& a, int64_t row0, int64_t M, int64_t K, int64_t G, const uint8_t* p,
                const at::BFloat16* sz, int64_t N, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t ng = K / G;
  for (int64_t b0 = n0; b0 < n1; b0 += 16) {
    const int64_t b1 = std::min(n1, b0 + 16);
    for (int64_t r0 = 0; r0 < M; r0 += kBlockRows) {
      const int64_t r = row0 + r0;
      const int8_t* xq = a.q.data() + r * K;
      const float* xs = a.scale.data() + r * ng;
      const float* xsum = a.sum.data() + r * ng;
      float* yr = y + r0 * ldy;
      switch (std::min(kBlockRows, M - r0)) {
        case 4: int4_rows<4>(xq, xs, xsum, K, G, p, sz, N, b0, b1, yr, ldy); break;
        case 3: int4_rows<3>(xq, xs, xsum, K, G, p, sz, N, b0, b1, yr, ldy); break;
        case 2: int4_rows<2>(xq, xs, xsum, K, G, p, sz, N, b0, b1, yr, ldy); break;
        default: int4_rows<1>(xq, xs, xsum, K, G, p, sz, N, b0, b1, yr, ldy); break;
      }
    }
  }
}

}  // namespace k256
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------- dispatch
constexpr int64_t kIsaAvx2 = 1, kIsaAvx512 = 2;

void check_isa(int64_t isa) {
  TORCH_CHECK(isa == kIsaAvx2 || isa == kIsaAvx512, "isa must be 1 (AVX2) or 2 (AVX-512 VNNI), got ", isa);
  if (isa == kIsaAvx512) {
    TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"),
                "isa=2 needs AVX-512 F/BW/VL/VNNI, which this CPU lacks");
  } else {
    TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), "isa=1 needs AVX2 and FMA");
  }
}

Int4Act quantize_act(const float* x, int64_t M, int64_t K, int64_t G, int64_t isa) {
  if (isa == kIsaAvx2) {
    std::vector<int32_t> tmp(G);
    return quantize_groups(x, M, K, G, [&](const float* xg, int8_t* dst, float* xs, float* sum) {
      k256::quantize_group(xg, G, tmp.data(), dst, xs, sum);
    });
  }
  const int64_t B = G % 128 == 0 ? 128 : 64;
  std::vector<int8_t> tmp(G);
  return quantize_groups(x, M, K, G, [&](const float* xg, int8_t* dst, float* xs, float* sum) {
    k512::quantize_group(xg, G, B, tmp.data(), dst, xs, sum);
  });
}

// Calls f(expert, first row, count, n0, n1) over a flat range of (run, output row) so that threads stay
// busy however the rows split into experts.
template <typename F>
void for_runs(const std::vector<int64_t>& runs, int64_t N, const F& f) {
  const int64_t R = static_cast<int64_t>(runs.size()) / 3;
  const int64_t* rp = runs.data();
  at::parallel_for(0, R * N, 16, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t run = begin / N, n0 = begin % N;
      const int64_t n1 = std::min(N, n0 + (end - begin));
      f(rp[3 * run], rp[3 * run + 1], rp[3 * run + 2], n0, n1);
      begin += n1 - n0;
    }
  });
}

void check_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& s, int64_t dim) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == dim && q.is_contiguous(), "q must be contiguous int8 with ",
              dim, " dims");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == dim - 1 &&
                  s.numel() * q.size(-1) == q.numel(), "scale must be contiguous fp32 [.., N]");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == q.size(-1), "x must be [M, K] with K = q.size(-1)");
}

void check_int4(const torch::Tensor& x, const torch::Tensor& p, const torch::Tensor& sz, int64_t G, int64_t dim) {
  TORCH_CHECK(p.scalar_type() == at::kByte && p.dim() == dim && p.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 2 * p.size(-1), "x must be [M, K] with K = 2 * packed.size(-1)");
  TORCH_CHECK(G % 32 == 0 && x.size(1) % G == 0, "group size ", G, " must be a multiple of 32 dividing K=", x.size(1));
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == dim + 1 &&
                  sz.size(-3) == x.size(1) / G && sz.size(-2) == p.size(-2) && sz.size(-1) == 2,
              "scale_zero must be contiguous bf16 [.., K/G, N, 2]");
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s, int64_t isa) {
  check_isa(isa);
  check_int8(x, q, s, 2);
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (isa == kIsaAvx512) k512::int8_range(xp, M, K, wp, sp, n0, n1, yp, N);
    else k256::int8_range(xp, M, K, wp, sp, n0, n1, yp, N);
  });
  return y;
}

torch::Tensor int8_expert_linear(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor ids, int64_t isa) {
  check_isa(isa);
  check_int8(x, q, s, 3);
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong, "ids must be int64 [P]");
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t P = xf.size(0), K = xf.size(1), N = q.size(1), E = q.size(0);
  auto runs = expert_runs(ids, E);
  auto y = torch::empty({P, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_runs(runs, N, [&](int64_t e, int64_t first, int64_t count, int64_t n0, int64_t n1) {
    if (isa == kIsaAvx512) k512::int8_range(xp + first * K, count, K, wp + e * N * K, sp + e * N, n0, n1, yp + first * N, N);
    else k256::int8_range(xp + first * K, count, K, wp + e * N * K, sp + e * N, n0, n1, yp + first * N, N);
  });
  return y;
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor p, torch::Tensor sz, int64_t G, int64_t isa) {
  check_isa(isa);
  check_int4(x, p, sz, G, 2);
  TORCH_CHECK(isa != kIsaAvx512 || G % 64 == 0, "the AVX-512 int4 kernel needs G % 64 == 0, got ", G);
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = p.size(0);
  const Int4Act a = quantize_act(xf.data_ptr<float>(), M, K, G, isa);
  auto y = torch::empty({M, N}, xf.options());
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const at::BFloat16* szp = sz.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (isa == kIsaAvx512) k512::int4_range(a, 0, M, K, G, pp, szp, N, n0, n1, yp, N);
    else k256::int4_range(a, 0, M, K, G, pp, szp, N, n0, n1, yp, N);
  });
  return y;
}

torch::Tensor int4_expert_linear(torch::Tensor x, torch::Tensor p, torch::Tensor sz, int64_t G, torch::Tensor ids,
                                 int64_t isa) {
  check_isa(isa);
  check_int4(x, p, sz, G, 3);
  TORCH_CHECK(isa != kIsaAvx512 || G % 64 == 0, "the AVX-512 int4 kernel needs G % 64 == 0, got ", G);
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong, "ids must be int64 [P]");
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t P = xf.size(0), K = xf.size(1), N = p.size(1), E = p.size(0);
  auto runs = expert_runs(ids, E);
  const Int4Act a = quantize_act(xf.data_ptr<float>(), P, K, G, isa);
  auto y = torch::empty({P, N}, xf.options());
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const at::BFloat16* szp = sz.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t pe = N * K / 2, se = (K / G) * N * 2;   // per-expert strides
  for_runs(runs, N, [&](int64_t e, int64_t first, int64_t count, int64_t n0, int64_t n1) {
    if (isa == kIsaAvx512) k512::int4_range(a, first, count, K, G, pp + e * pe, szp + e * se, N, n0, n1, yp + first * N, N);
    else k256::int4_range(a, first, count, K, G, pp + e * pe, szp + e * se, N, n0, n1, yp + first * N, N);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------- dequantise to bf16
// For prefill (many activation rows): rows [r0, r1) of the listed experts (or of a matrix) as a dense bf16
// tensor for a GEMM. The same values as intq.dequantize_int8 / dequantize_int4 in fp32, rounded once to bf16
// (round to nearest even); AVX-512 only (the caller keeps PyTorch's path elsewhere).
namespace {

// experts: int64 [U] (a stack [E, N, ..]) or empty (one matrix [N, ..]) -> (U or 1, expert pointer)
std::vector<int64_t> expert_list(const torch::Tensor& experts, int64_t dim, int64_t E) {
  if (dim == 2) return {0};
  TORCH_CHECK(experts.dim() == 1 && experts.scalar_type() == at::kLong, "experts must be int64 [U]");
  auto ec = experts.contiguous();
  std::vector<int64_t> out(ec.data_ptr<int64_t>(), ec.data_ptr<int64_t>() + ec.numel());
  for (int64_t e : out) TORCH_CHECK(e >= 0 && e < E, "expert ", e, " out of range [0, ", E, ")");
  return out;
}

// `out`: a caller's bf16 buffer (reused across calls: fresh pages would cost a page fault per 4 KB written)
uint16_t* dense_out(const torch::Tensor& out, int64_t numel) {
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.numel() == numel,
              "out must be contiguous bf16 with ", numel, " values");
  return reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
}

}  // namespace

void int8_dense(torch::Tensor q, torch::Tensor s, torch::Tensor experts, int64_t r0, int64_t r1, torch::Tensor out) {
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"), "int8_dense needs AVX-512");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && (q.dim() == 2 || q.dim() == 3),
              "q must be contiguous int8 [N, K] or [E, N, K]");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() * q.size(-1) == q.numel(),
              "scale must be contiguous fp32 [.., N]");
  const int64_t N = q.size(-2), K = q.size(-1), E = q.dim() == 3 ? q.size(0) : 1;
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= N, "rows [", r0, ", ", r1, ") outside [0, ", N, ")");
  const auto ex = expert_list(experts, q.dim(), E);
  const int64_t rows = r1 - r0;
  uint16_t* op = dense_out(out, static_cast<int64_t>(ex.size()) * rows * K);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(ex.size()) * rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = ex[i / rows] * N + r0 + i % rows;
      k512::int8_dense_row(qp + n * K, sp[n], K, op + i * K);
    }
  });
}

void int4_dense(torch::Tensor p, torch::Tensor sz, int64_t G, torch::Tensor experts, int64_t r0, int64_t r1,
                torch::Tensor out) {
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"), "int4_dense needs AVX-512");
  TORCH_CHECK(p.scalar_type() == at::kByte && p.is_contiguous() && (p.dim() == 2 || p.dim() == 3),
              "packed must be contiguous uint8 [N, K/2] or [E, N, K/2]");
  const int64_t N = p.size(-2), K = 2 * p.size(-1), E = p.dim() == 3 ? p.size(0) : 1;
  TORCH_CHECK(G % 32 == 0 && K % G == 0, "group size ", G, " must be a multiple of 32 dividing K=", K);
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == p.dim() + 1 &&
                  sz.size(-3) == K / G && sz.size(-2) == N && sz.size(-1) == 2,
              "scale_zero must be contiguous bf16 [.., K/G, N, 2]");
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= N, "rows [", r0, ", ", r1, ") outside [0, ", N, ")");
  const auto ex = expert_list(experts, p.dim(), E);
  const int64_t rows = r1 - r0;
  uint16_t* op = dense_out(out, static_cast<int64_t>(ex.size()) * rows * K);
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const at::BFloat16* szp = sz.data_ptr<at::BFloat16>();
  at::parallel_for(0, static_cast<int64_t>(ex.size()) * rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = ex[i / rows], n = r0 + i % rows;
      k512::int4_dense_row(pp + (e * N + n) * (K / 2), szp + (e * (K / G) * N + n) * 2, 2 * N, K, G, op + i * K);
    }
  });
}

std::map<std::string, bool> cpu_features() {
  return {{"avx2", __builtin_cpu_supports("avx2") != 0},
          {"fma", __builtin_cpu_supports("fma") != 0},
          {"avx512f", __builtin_cpu_supports("avx512f") != 0},
          {"avx512bw", __builtin_cpu_supports("avx512bw") != 0},
          {"avx512vl", __builtin_cpu_supports("avx512vl") != 0},
          {"avx512vnni", __builtin_cpu_supports("avx512vnni") != 0},
          {"avx512bf16", __builtin_cpu_supports("avx512bf16") != 0}};
}

// The decode products as dispatcher ops (dsv3/kernels/ops.py: a compiled graph calls them without Python).
TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale, int isa) -> Tensor");
  m.def("int8_expert_linear(Tensor x, Tensor q, Tensor scale, Tensor ids, int isa) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale_zero, int group_size, int isa) -> Tensor");
  m.def("int4_expert_linear(Tensor x, Tensor packed, Tensor scale_zero, int group_size, Tensor ids, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_expert_linear", &int8_expert_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_expert_linear", &int4_expert_linear);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "y = x @ (q * s[:, None]).T, fp32 out (isa 1 AVX2, 2 AVX-512)");
  m.def("int8_expert_linear", &int8_expert_linear, "y[p] = x[p] @ W[ids[p]].T for int8 W, ids sorted");
  m.def("int4_linear", &int4_linear, "y = x̂ @ Ŵ.T for int4 'rows' W (activations quantised per group)");
  m.def("int4_expert_linear", &int4_expert_linear, "y[p] = x̂[p] @ Ŵ[ids[p]].T for int4 W, ids sorted");
  m.def("int8_dense", &int8_dense, "bf16 rows [r0, r1) of int8 q·s (of the listed experts of a stack)");
  m.def("int4_dense", &int4_dense, "bf16 rows [r0, r1) of an int4 'rows' weight (of the listed experts of a stack)");
  m.def("cpu_features", &cpu_features, "the x86 ISA extensions this CPU reports");
}
