// Block-FP8 (e4m3) weight × few-row activation products for CPU decode, reading 1 byte per weight.
//
// DeepSeek's FP8 weights are e4m3 bytes w [N, K] with one fp32 scale_inv per (bo × bi) block
// (ragged edge blocks included): W[n, k] = e4m3(w[n, k]) · s[n / bo, k / bi]. These kernels never
// build the dense matrix: each byte is widened in registers and multiplied into fp32 accumulators.
//
//   linear(x [M,K], w [N,K] u8, s [ceil(N/bo), ceil(K/bi)], bo, bi)              -> y [M,N] fp32
//   expert_linear(x [P,K], w [E,N,K] u8, s [E, parts·ceil(N/parts/bo), ceil(K/bi)], ids [P], bo, bi, parts)
//       -> y [P,N],  y[p] = x[p] @ W[ids[p]]ᵀ  with ids sorted: only the experts that appear in ids are
//       read, each once for all its rows. `parts` row groups of N/parts rows carry their own block grids
//       (a gate_up stack stored from separate gate_proj/up_proj tensors).
//
// Conversion: e4m3 → fp16 bits is sign<<15 | (byte & 0x7f) << 7; the fp16 value is then exactly the
// e4m3 value × 2⁻⁸, subnormals included (both formats are subnormal for exponent field 0). With
// AVX-512 that is vpmovsxbw, a shift by 7 and an AND that clears bit 14 (the sign's second copy), then
// vcvtph2ps on 16 values. The ×256 is folded into the block scale, and the scale into the activations:
// for the rows of one row block, xs[m, k] = x[m, k] · s[rb, k / bi] · 256 is formed once (M·K values per
// row block, 1/bo of the work) and the inner loop is a plain dot product of converted bytes with xs —
// no block boundaries inside it, so any bi works.
// The e4m3 NaN bytes 0x7f / 0xff are not special-cased: they read as ±480 (the value their bit pattern
// would have with one more exponent step). Quantisers never write them (e4m3 saturates at ±448).
//
// x is any float dtype (converted to fp32 once); y is fp32. Work splits over output rows with
// at::parallel_for (torch's thread settings apply).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "expert_runs.h"
#include "fp8_convert.h"

namespace {

// Scalar form of the same conversion (used without AVX-512): the e4m3 value × 2⁻¹²⁰.
inline float e4m3_scaled(uint8_t b) {
  const int e = (b >> 3) & 0xF, m = b & 7;
  const float v = e == 0 ? std::ldexp(static_cast<float>(m), -129) : std::ldexp(1.f + m / 8.f, e - 127);
  return (b & 0x80) ? -v : v;
}

// y[r*ldy + n] = dot(xs[r], w[n]) for r < R, n in [n0, n1): two weight rows per pass share each xs load.
template <int R>
void dot_rows(const float* xs, int64_t K, const uint8_t* w, int64_t n0, int64_t n1, float* y, int64_t ldy) {
#if defined(__AVX512F__)
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    const uint8_t* wa = w + n * K;
    const uint8_t* wb = wa + K;
    __m512 acc_a[R], acc_b[R];
    for (int r = 0; r < R; ++r) acc_a[r] = acc_b[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      if ((k & 63) == 0) {   // into L2, four rows ahead: one thread streams ~1.7x faster from DRAM than without
        _mm_prefetch(reinterpret_cast<const char*>(wa + 4 * K + k), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * K + k), _MM_HINT_T1);
      }
      __m512 va0, va1, vb0, vb1;
      cvt32(wa + k, va0, va1);
      cvt32(wb + k, vb0, vb1);
      for (int r = 0; r < R; ++r) {
        __m512 x0 = _mm512_loadu_ps(xs + r * K + k), x1 = _mm512_loadu_ps(xs + r * K + k + 16);
        acc_a[r] = _mm512_fmadd_ps(va0, x0, acc_a[r]);
        acc_b[r] = _mm512_fmadd_ps(vb0, x0, acc_b[r]);
        acc_a[r] = _mm512_fmadd_ps(va1, x1, acc_a[r]);
        acc_b[r] = _mm512_fmadd_ps(vb1, x1, acc_b[r]);
      }
    }
    for (; k + 16 <= K; k += 16) {
      __m512 va = cvt16(wa + k), vb = cvt16(wb + k);
      for (int r = 0; r < R; ++r) {
        __m512 xv = _mm512_loadu_ps(xs + r * K + k);
        acc_a[r] = _mm512_fmadd_ps(va, xv, acc_a[r]);
        acc_b[r] = _mm512_fmadd_ps(vb, xv, acc_b[r]);
      }
    }
    if (k < K) {
      __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
      __m512 va = cvt16_masked(wa + k, m), vb = cvt16_masked(wb + k, m);
      for (int r = 0; r < R; ++r) {
        __m512 xv = _mm512_maskz_loadu_ps(m, xs + r * K + k);
        acc_a[r] = _mm512_fmadd_ps(va, xv, acc_a[r]);
        acc_b[r] = _mm512_fmadd_ps(vb, xv, acc_b[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      y[r * ldy + n] = _mm512_reduce_add_ps(acc_a[r]) * kHalfExp;
      y[r * ldy + n + 1] = _mm512_reduce_add_ps(acc_b[r]) * kHalfExp;
    }
  }
  for (; n < n1; ++n) {
    const uint8_t* wa = w + n * K;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      __mmask16 m = (K - k) >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
      __m512 va = cvt16_masked(wa + k, m);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, xs + r * K + k), acc[r]);
    }
    for (int r = 0; r < R; ++r) y[r * ldy + n] = _mm512_reduce_add_ps(acc[r]) * kHalfExp;
  }
#else
  for (int64_t n = n0; n < n1; ++n)
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += e4m3_scaled(w[n * K + k]) * xs[r * K + k];
      y[r * ldy + n] = s * kHalfExp;
    }
#endif
}

void dispatch_rows(int64_t rows, const float* xs, int64_t K, const uint8_t* w, int64_t n0, int64_t n1, float* y,
                   int64_t ldy) {
  // Blocks of at most 8 activation rows keep the 2·R accumulators in registers.
  while (rows > 0) {
    const int64_t r = rows >= 8 ? 8 : rows;
    switch (r) {
      case 8: dot_rows<8>(xs, K, w, n0, n1, y, ldy); break;
      case 7: dot_rows<7>(xs, K, w, n0, n1, y, ldy); break;
      case 6: dot_rows<6>(xs, K, w, n0, n1, y, ldy); break;
      case 5: dot_rows<5>(xs, K, w, n0, n1, y, ldy); break;
      case 4: dot_rows<4>(xs, K, w, n0, n1, y, ldy); break;
      case 3: dot_rows<3>(xs, K, w, n0, n1, y, ldy); break;
      case 2: dot_rows<2>(xs, K, w, n0, n1, y, ldy); break;
      default: dot_rows<1>(xs, K, w, n0, n1, y, ldy); break;
    }
    xs += r * K;
    y += r * ldy;
    rows -= r;
  }
}

// xs[m, k] = x[m, k] · srow[k / bi] · 2⁶⁰ for m < M
void scale_rows(const float* x, int64_t M, int64_t K, const float* srow, int64_t bi, float* xs) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k0 = 0; k0 < K; k0 += bi) {
      const float s = srow[k0 / bi] * kHalfExp;
      const int64_t k1 = std::min(K, k0 + bi);
      for (int64_t k = k0; k < k1; ++k) xs[m * K + k] = x[m * K + k] * s;
    }
}

// Rows [n0, n1) of one matrix with `parts` row groups of N/parts rows: y[m, n] for the M rows of x.
// Each stretch of rows inside one row block gets its own scaled activations.
void block_rows(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* s, int64_t N, int64_t parts,
                int64_t bo, int64_t bi, int64_t n0, int64_t n1, float* y, int64_t ldy, std::vector<float>& xs) {
  const int64_t part_rows = N / parts, rb_per_part = (part_rows + bo - 1) / bo, cb = (K + bi - 1) / bi;
  xs.resize(M * K);
  for (int64_t n = n0; n < n1;) {
    const int64_t part = n / part_rows, local = n % part_rows;
    const int64_t end = std::min({n1, part * part_rows + (local / bo + 1) * bo, (part + 1) * part_rows});
    scale_rows(x, M, K, s + (part * rb_per_part + local / bo) * cb, bi, xs.data());
    dispatch_rows(M, xs.data(), K, w, n, end, y, ldy);
    n = end;
  }
}

void check_common(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& s, int64_t bo, int64_t bi) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "w must be contiguous uint8 (e4m3 bytes)");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(), "scale_inv must be contiguous fp32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(-1), "x must be [M,K] with K = w.size(-1)");
  TORCH_CHECK(bo > 0 && bi > 0, "block sizes must be positive");
}

}  // namespace

torch::Tensor linear(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t bo, int64_t bi) {
  check_common(x, w, s, bo, bi);
  TORCH_CHECK(w.dim() == 2, "w must be [N,K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(s.dim() == 2 && s.size(0) == (N + bo - 1) / bo && s.size(1) == (K + bi - 1) / bi,
              "scale_inv must be [ceil(N/bo), ceil(K/bi)]");
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> xs;
    block_rows(xp, M, K, wp, sp, N, 1, bo, bi, n0, n1, yp, N, xs);
  });
  return y;
}

torch::Tensor expert_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s, torch::Tensor ids, int64_t bo,
                            int64_t bi, int64_t parts) {
  check_common(x, w, s, bo, bi);
  TORCH_CHECK(w.dim() == 3, "w must be [E,N,K]");
  TORCH_CHECK(parts >= 1 && w.size(1) % parts == 0, "parts must divide the rows of w");
  const int64_t E = w.size(0), N = w.size(1), K = w.size(2);
  const int64_t rb = parts * ((N / parts + bo - 1) / bo), cb = (K + bi - 1) / bi;
  TORCH_CHECK(s.dim() == 3 && s.size(0) == E && s.size(1) == rb && s.size(2) == cb,
              "scale_inv must be [E, parts*ceil(N/parts/bo), ceil(K/bi)]");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong, "ids must be int64 [P]");
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t P = xf.size(0);
  const std::vector<int64_t> runs = expert_runs(ids, E);
  const int64_t R = static_cast<int64_t>(runs.size()) / 3;
  auto y = torch::empty({P, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t* rp = runs.data();
  // One flat range over (run, output row): threads stay busy however the rows split into experts.
  at::parallel_for(0, R * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xs;
    while (begin < end) {
      const int64_t run = begin / N, n0 = begin % N;
      const int64_t n1 = std::min(N, n0 + (end - begin));
      const int64_t e = rp[3 * run], first = rp[3 * run + 1], count = rp[3 * run + 2];
      block_rows(xp + first * K, count, K, wp + e * N * K, sp + e * rb * cb, N, parts, bo, bi, n0, n1,
                 yp + first * N, N, xs);
      begin += n1 - n0;
    }
  });
  return y;
}

// The transposed product over a row range, for MLA's absorbed query (q_nope · W_UK with heads as experts):
//   y[p, :] = Σ_{j < n1-n0} x[p, j] · W[ids[p]][n0 + j, :]      x [P, n1-n0], w [E,N,K] (one grid), ids sorted
// Jobs are (run, column block): each streams its rows' bytes once and accumulates axpy-style into y.
torch::Tensor expert_linear_t(torch::Tensor x, torch::Tensor w, torch::Tensor s, torch::Tensor ids, int64_t n0,
                              int64_t n1, int64_t bo, int64_t bi) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 3, "w must be contiguous uint8 [E,N,K]");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(), "scale_inv must be contiguous fp32");
  const int64_t E = w.size(0), N = w.size(1), K = w.size(2), rb = (N + bo - 1) / bo, cb = (K + bi - 1) / bi;
  TORCH_CHECK(bo > 0 && bi > 0 && 0 <= n0 && n0 <= n1 && n1 <= N, "rows [n0, n1) must lie in [0, N)");
  TORCH_CHECK(s.dim() == 3 && s.size(0) == E && s.size(1) == rb && s.size(2) == cb,
              "scale_inv must be [E, ceil(N/bo), ceil(K/bi)]");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == n1 - n0, "x must be [P, n1-n0]");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong, "ids must be int64 [P]");
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t P = xf.size(0), J = n1 - n0;
  const std::vector<int64_t> runs = expert_runs(ids, E);
  const int64_t R = static_cast<int64_t>(runs.size()) / 3;
  auto y = torch::zeros({P, K}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t* rp = runs.data();
  at::parallel_for(0, R * cb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t run = job / cb, c = job % cb;
      const int64_t e = rp[3 * run], first = rp[3 * run + 1], count = rp[3 * run + 2];
      const int64_t k0 = c * bi, k1 = std::min(K, k0 + bi);
      a.resize(count);
      for (int64_t j = 0; j < J; ++j) {
        const int64_t n = n0 + j;
        const float sc = sp[(e * rb + n / bo) * cb + c] * kHalfExp;
        for (int64_t q = 0; q < count; ++q) a[q] = xp[(first + q) * J + j] * sc;
        const uint8_t* wr = wp + (e * N + n) * K;
#if defined(__AVX512F__)
        for (int64_t k = k0; k < k1; k += 16) {
          const __mmask16 m = (k1 - k) >= 16 ? static_cast<__mmask16>(0xFFFF)
                                             : static_cast<__mmask16>((1u << (k1 - k)) - 1);
          const __m512 wv = cvt16_masked(wr + k, m);
          for (int64_t q = 0; q < count; ++q) {
            float* yr = yp + (first + q) * K + k;
            _mm512_mask_storeu_ps(yr, m, _mm512_fmadd_ps(_mm512_set1_ps(a[q]), wv, _mm512_maskz_loadu_ps(m, yr)));
          }
        }
#else
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t q = 0; q < count; ++q) yp[(first + q) * K + k] += a[q] * e4m3_scaled(wr[k]);
#endif
      }
      for (int64_t q = 0; q < count; ++q)
        for (int64_t k = k0; k < k1; ++k) yp[(first + q) * K + k] *= kHalfExp;
    }
  });
  return y;
}

// For prefill (many activation rows): rows [r0, r1) of the listed experts (or of a matrix) dequantised to bf16
// (e4m3 · scale_inv in fp32, rounded once to nearest even) for a GEMM.
void dense(torch::Tensor w, torch::Tensor s, torch::Tensor experts, int64_t r0, int64_t r1, int64_t bo, int64_t bi,
           int64_t parts, torch::Tensor out) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && (w.dim() == 2 || w.dim() == 3),
              "w must be contiguous uint8 [N, K] or [E, N, K]");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(), "scale_inv must be contiguous fp32");
  const int64_t N = w.size(-2), K = w.size(-1), E = w.dim() == 3 ? w.size(0) : 1;
  TORCH_CHECK(bo > 0 && bi > 0 && parts >= 1 && N % parts == 0, "bad block sizes or parts");
  const int64_t part_rows = N / parts, rb_part = (part_rows + bo - 1) / bo, cb = (K + bi - 1) / bi;
  TORCH_CHECK(s.numel() == E * parts * rb_part * cb, "scale_inv must be [.., parts*ceil(N/parts/bo), ceil(K/bi)]");
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= N, "rows [", r0, ", ", r1, ") outside [0, ", N, ")");
  std::vector<int64_t> ex{0};
  if (w.dim() == 3) {
    TORCH_CHECK(experts.dim() == 1 && experts.scalar_type() == at::kLong, "experts must be int64 [U]");
    auto ec = experts.contiguous();
    ex.assign(ec.data_ptr<int64_t>(), ec.data_ptr<int64_t>() + ec.numel());
    for (int64_t e : ex) TORCH_CHECK(e >= 0 && e < E, "expert ", e, " out of range [0, ", E, ")");
  }
  const int64_t rows = r1 - r0, U = static_cast<int64_t>(ex.size());
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.numel() == U * rows * K,
              "out must be contiguous bf16 with ", U * rows * K, " values");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, U * rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = ex[i / rows], n = r0 + i % rows, part = n / part_rows, local = n % part_rows;
      const float* srow = sp + (e * parts * rb_part + part * rb_part + local / bo) * cb;
      const uint8_t* wr = wp + (e * N + n) * K;
      uint16_t* orow = op + i * K;
      for (int64_t k0 = 0; k0 < K; k0 += bi) {
        const int64_t k1 = std::min(K, k0 + bi);
        const float sc = srow[k0 / bi] * kHalfExp;   // with the second 2⁶⁰ below: undoes the conversion's 2⁻¹²⁰
#if defined(__AVX512F__) && defined(__AVX512BW__)
        const __m512 sv = _mm512_set1_ps(sc);
        for (int64_t k = k0; k < k1; k += 16) {
          const __mmask16 m = (k1 - k) >= 16 ? static_cast<__mmask16>(0xFFFF)
                                             : static_cast<__mmask16>((1u << (k1 - k)) - 1);
          const __m512i u = _mm512_castps_si512(
              _mm512_mul_ps(_mm512_mul_ps(cvt16_masked(wr + k, m), sv), _mm512_set1_ps(kHalfExp)));
          const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
          const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
          _mm256_mask_storeu_epi16(orow + k, m, _mm512_cvtepi32_epi16(r));
        }
#else
        for (int64_t k = k0; k < k1; ++k) {
          const float f = e4m3_scaled(wr[k]) * sc * kHalfExp;
          uint32_t u;
          std::memcpy(&u, &f, 4);
          orow[k] = static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
        }
#endif
      }
    }
  });
}

// The decode products as dispatcher ops (dsv3/kernels/ops.py): the e4m3 weight read as its bytes, the scales
// made contiguous. Python's eager path calls these same functions.
torch::Tensor fp8_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale_inv, int64_t block_rows,
                         int64_t block_cols) {
  return linear(x, weight.view(at::kByte), scale_inv.contiguous(), block_rows, block_cols);
}

torch::Tensor fp8_expert_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale_inv, torch::Tensor ids,
                                int64_t block_rows, int64_t block_cols, int64_t parts) {
  return expert_linear(x, weight.view(at::kByte), scale_inv.contiguous(), ids, block_rows, block_cols, parts);
}

torch::Tensor fp8_expert_linear_t(torch::Tensor x, torch::Tensor weight, torch::Tensor scale_inv, torch::Tensor ids,
                                  int64_t row0, int64_t row1, int64_t block_rows, int64_t block_cols) {
  return expert_linear_t(x, weight.view(at::kByte), scale_inv.contiguous(), ids, row0, row1, block_rows, block_cols);
}

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("fp8_linear(Tensor x, Tensor weight, Tensor scale_inv, int block_rows, int block_cols) -> Tensor");
  m.def("fp8_expert_linear(Tensor x, Tensor weight, Tensor scale_inv, Tensor ids, int block_rows, int block_cols, "
        "int parts) -> Tensor");
  m.def("fp8_expert_linear_t(Tensor x, Tensor weight, Tensor scale_inv, Tensor ids, int row0, int row1, "
        "int block_rows, int block_cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("fp8_linear", &fp8_linear);
  m.impl("fp8_expert_linear", &fp8_expert_linear);
  m.impl("fp8_expert_linear_t", &fp8_expert_linear_t);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp8_linear", &fp8_linear, "linear on the e4m3 weight tensor as stored");
  m.def("fp8_expert_linear", &fp8_expert_linear, "expert_linear on the e4m3 weight tensor as stored");
  m.def("fp8_expert_linear_t", &fp8_expert_linear_t, "expert_linear_t on the e4m3 weight tensor as stored");
  m.def("expert_linear_t", &expert_linear_t, "y[p] = x[p] @ W[ids[p]][n0:n1] (block FP8, ids sorted)");
  m.def("dense", &dense, "bf16 rows [r0, r1) of a block-FP8 weight (of the listed experts of a stack)");
  m.def("linear", &linear, "y = x @ W.T for a block-FP8 (e4m3) weight and a few rows of x (fp32 out)");
  m.def("expert_linear", &expert_linear, "y[p] = x[p] @ W[ids[p]].T for block-FP8 expert stacks, ids sorted");
}
