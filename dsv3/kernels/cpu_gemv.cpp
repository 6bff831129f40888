// Memory-bound bf16 matrix-vector products for CPU decode.
//
// At decode time every weight is read once per step and used for only a few rows of activations,
// so the speed limit is memory bandwidth. The stock bf16 CPU GEMM path on processors without
// native bf16 arithmetic reaches about half of it; these kernels widen each bf16 weight to fp32
// with a shift (bf16 is the top half of an fp32) and accumulate in fp32 with FMAs, reading each
// weight row exactly once for all M activation rows.
//
//   linear(x [M,K], w [N,K])                       -> y [M,N]        (M small, e.g. <= 16)
//   expert_linear(x [P,K], w [E,N,K], ids [P], n0, n1)   -> y [P,n1-n0]   y[p] = x[p] @ w[ids[p]][n0:n1].T,
//       with ids sorted so that rows of one expert are adjacent: each expert's rows are read once
//   expert_linear_t(x [P,n1-n0], w [E,N,K], ids [P], n0, n1) -> y [P,K]   y[p] = x[p] @ w[ids[p]][n0:n1]
//       (the transposed product: MLA's absorbed query q_nope·W_UK, heads as experts, kv_b_proj as stored)
//
// x is converted to fp32 once; y is fp32 (the caller casts). Work is split over output rows with
// at::parallel_for, so torch's thread settings apply.
//
// Also here, because it runs wherever these kernels do: RMSNorm of bf16 rows in two passes over each row
// (dsv3/model/norm.py's numerics, which its PyTorch ops take eight passes for):
//   rms_norm(x [R,D] bf16, w [D] bf16, eps, delta)  -> y [R,D] bf16:  y = w · bf16(x · rsqrt(mean(x²) + eps))
//       with delta [R,D] (not empty): x is first replaced by bf16(x + delta), written to h [R,D], and the result
//       is (h, y) — the residual add before a norm, as PyTorch's bf16 add rounds it
//   moe_residual(h [R,D] bf16, routed [R,D] fp32, shared [R,D] bf16 or empty) -> bf16(h + bf16(routed + shared)):
//       a MoE layer's end (routed sum + shared experts, cast, residual add) in one pass, the same bits as the ops
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

#include "expert_runs.h"
#include "vec_math.h"

namespace {

constexpr int64_t kMaxRows = 16;

#if defined(__AVX512F__)
inline __m512 load_bf16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load_bf16_masked(const at::BFloat16* p, __mmask16 m) {
  __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// the lanes of a 16-wide step with `left` values left: all 16, the first `left`, or none
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF)
                    : left <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << left) - 1);
}
#endif

// y[r*ldy + n] = dot(x[r], w[n]) for r < rows, n in [n0, n1)
template <int64_t R>
void rows_kernel(const float* x, int64_t K, const at::BFloat16* w, int64_t n0, int64_t n1, float* y,
                 int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const at::BFloat16* wr = w + n * K;
#if defined(__AVX512F__)
    // Two accumulators per row halve the FMA dependency chain; the row two ahead is prefetched into L2 (into L1,
    // or one row ahead, streamed ~20 % slower from DRAM).
    __m512 acc0[R], acc1[R];
    for (int64_t r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    const char* next = reinterpret_cast<const char*>(wr + 2 * K);   // two rows ahead
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      _mm_prefetch(next + 2 * k, _MM_HINT_T1);
      __m512 w0 = load_bf16(wr + k), w1 = load_bf16(wr + k + 16);
      for (int64_t r = 0; r < R; ++r) {
        acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + k), acc0[r]);
        acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + k + 16), acc1[r]);
      }
    }
    for (; k < K; k += 16) {
      __mmask16 m = tail_mask(K - k);
      __m512 w0 = load_bf16_masked(wr + k, m);
      for (int64_t r = 0; r < R; ++r)
        acc0[r] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + r * K + k), acc0[r]);
    }
    for (int64_t r = 0; r < R; ++r) y[r * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
#else
    for (int64_t r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += static_cast<float>(wr[k]) * x[r * K + k];
      y[r * ldy + n] = s;
    }
#endif
  }
}

#if defined(__AVX512F__)
// Several activation rows: two weight rows per pass share each load of x, halving the x traffic
// (with 8 rows of x the cache, not DRAM, would otherwise be the bottleneck).
template <int64_t R>
void rows_kernel_pairs(const float* x, int64_t K, const at::BFloat16* w, int64_t n0, int64_t n1, float* y,
                       int64_t ldy) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    const at::BFloat16* wa = w + n * K;
    const at::BFloat16* wb = wa + K;
    __m512 acc_a[R], acc_b[R];
    for (int64_t r = 0; r < R; ++r) acc_a[r] = acc_b[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m512 va = load_bf16(wa + k), vb = load_bf16(wb + k);
      for (int64_t r = 0; r < R; ++r) {
        __m512 xv = _mm512_loadu_ps(x + r * K + k);
        acc_a[r] = _mm512_fmadd_ps(va, xv, acc_a[r]);
        acc_b[r] = _mm512_fmadd_ps(vb, xv, acc_b[r]);
      }
    }
    if (k < K) {
      __mmask16 m = tail_mask(K - k);
      __m512 va = load_bf16_masked(wa + k, m), vb = load_bf16_masked(wb + k, m);
      for (int64_t r = 0; r < R; ++r) {
        __m512 xv = _mm512_maskz_loadu_ps(m, x + r * K + k);
        acc_a[r] = _mm512_fmadd_ps(va, xv, acc_a[r]);
        acc_b[r] = _mm512_fmadd_ps(vb, xv, acc_b[r]);
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      y[r * ldy + n] = _mm512_reduce_add_ps(acc_a[r]);
      y[r * ldy + n + 1] = _mm512_reduce_add_ps(acc_b[r]);
    }
  }
  if (n < n1) rows_kernel<R>(x, K, w, n, n1, y, ldy);
}
#endif

void dispatch_rows(int64_t rows, const float* x, int64_t K, const at::BFloat16* w, int64_t n0, int64_t n1,
                   float* y, int64_t ldy) {
#if defined(__AVX512F__)
  if (rows >= 3) {
    while (rows > 0) {
      int64_t r = rows >= 8 ? 8 : rows;
      switch (r) {
        case 8: rows_kernel_pairs<8>(x, K, w, n0, n1, y, ldy); break;
        case 7: rows_kernel_pairs<7>(x, K, w, n0, n1, y, ldy); break;
        case 6: rows_kernel_pairs<6>(x, K, w, n0, n1, y, ldy); break;
        case 5: rows_kernel_pairs<5>(x, K, w, n0, n1, y, ldy); break;
        case 4: rows_kernel_pairs<4>(x, K, w, n0, n1, y, ldy); break;
        case 3: rows_kernel_pairs<3>(x, K, w, n0, n1, y, ldy); break;
        case 2: rows_kernel_pairs<2>(x, K, w, n0, n1, y, ldy); break;
        default: rows_kernel<1>(x, K, w, n0, n1, y, ldy); break;
      }
      x += r * K;
      y += r * ldy;
      rows -= r;
    }
    return;
  }
#endif
  // Blocks of at most 8 rows keep the accumulators in registers.
  while (rows > 0) {
    int64_t r = rows >= 8 ? 8 : rows;
    switch (r) {
      case 8: rows_kernel<8>(x, K, w, n0, n1, y, ldy); break;
      case 7: rows_kernel<7>(x, K, w, n0, n1, y, ldy); break;
      case 6: rows_kernel<6>(x, K, w, n0, n1, y, ldy); break;
      case 5: rows_kernel<5>(x, K, w, n0, n1, y, ldy); break;
      case 4: rows_kernel<4>(x, K, w, n0, n1, y, ldy); break;
      case 3: rows_kernel<3>(x, K, w, n0, n1, y, ldy); break;
      case 2: rows_kernel<2>(x, K, w, n0, n1, y, ldy); break;
      default: rows_kernel<1>(x, K, w, n0, n1, y, ldy); break;
    }
    x += r * K;
    y += r * ldy;
    rows -= r;
  }
}

}  // namespace

torch::Tensor linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(), "w must be contiguous bf16 [N,K]");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "x must be [M,K] with K = w.size(1)");
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { dispatch_rows(M, xp, K, wp, n0, n1, yp, N); });
  return y;
}

static void check_stack(const torch::Tensor& w, const torch::Tensor& ids, int64_t P, int64_t n0, int64_t n1) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 3 && w.is_contiguous(), "w must be contiguous bf16 [E,N,K]");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == P && ids.scalar_type() == at::kLong, "ids must be int64 [P]");
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= w.size(1), "rows [", n0, ", ", n1, ") outside [0, ", w.size(1), ")");
}

torch::Tensor expert_linear(torch::Tensor x, torch::Tensor w, torch::Tensor ids, int64_t n0, int64_t n1) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(2), "x must be [P,K] with K = w.size(2)");
  if (n1 < 0) n1 = w.size(1);   // the op's default: every row
  check_stack(w, ids, x.size(0), n0, n1);
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t P = xf.size(0), K = xf.size(1), N = w.size(1), NY = n1 - n0;
  const std::vector<int64_t> runs = expert_runs(ids, w.size(0));
  const int64_t R = static_cast<int64_t>(runs.size()) / 3;
  auto y = torch::empty({P, NY}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t* rp = runs.data();
  // One flat range over (run, output row): threads stay busy however the rows split into experts.
  at::parallel_for(0, R * NY, 16, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t run = begin / NY, j0 = begin % NY;
      const int64_t j1 = std::min(NY, j0 + (end - begin));
      const int64_t e = rp[3 * run], first = rp[3 * run + 1], count = rp[3 * run + 2];
      // rows n0+j of the expert; y's column j is written at (y - n0)[n0 + j]
      dispatch_rows(count, xp + first * K, K, wp + e * N * K, n0 + j0, n0 + j1, yp + first * NY - n0, NY);
      begin += j1 - j0;
    }
  });
  return y;
}

constexpr int64_t kColumns = 512;   // output columns per job of expert_linear_t (MLA: r = 512, a whole row)
constexpr int64_t kAhead = 6;        // rows prefetched ahead by expert_linear_t

torch::Tensor expert_linear_t(torch::Tensor x, torch::Tensor w, torch::Tensor ids, int64_t n0, int64_t n1) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == n1 - n0, "x must be [P, n1-n0]");
  check_stack(w, ids, x.size(0), n0, n1);
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t P = xf.size(0), J = n1 - n0, N = w.size(1), K = w.size(2), cb = (K + kColumns - 1) / kColumns;
  const std::vector<int64_t> runs = expert_runs(ids, w.size(0));
  const int64_t R = static_cast<int64_t>(runs.size()) / 3;
  auto y = torch::empty({P, K}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t* rp = runs.data();
  // Jobs are (run, block of columns): the block's accumulators stay in registers while the run's rows stream
  // through (axpy-style: y += x[p, j] · row j); a run of several rows re-reads its block from L1/L2.
  at::parallel_for(0, R * cb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t run = job / cb, k0 = (job % cb) * kColumns, k1 = std::min(K, k0 + kColumns);
      const int64_t e = rp[3 * run], first = rp[3 * run + 1], count = rp[3 * run + 2];
      const at::BFloat16* w0 = wp + (e * N + n0) * K + k0;
      for (int64_t q = 0; q < count; ++q) {
        const float* xr = xp + (first + q) * J;
        float* yr = yp + (first + q) * K + k0;
#if defined(__AVX512F__)
        constexpr int kVec = kColumns / 16;
        __mmask16 m[kVec];
        for (int v = 0; v < kVec; ++v) m[v] = tail_mask(k1 - k0 - 16 * v);
        __m512 acc[kVec];
        for (int v = 0; v < kVec; ++v) acc[v] = _mm512_setzero_ps();
        for (int64_t j = 0; j < J; ++j) {
          const at::BFloat16* wr = w0 + j * K;
          // the block of the row kAhead rows on, into L2: the rows are K apart, too far for the hardware prefetcher
          const char* ahead = reinterpret_cast<const char*>(wr + kAhead * K);
          for (int64_t b = 0; b < 2 * (k1 - k0); b += 64) _mm_prefetch(ahead + b, _MM_HINT_T1);
          const __m512 a = _mm512_set1_ps(xr[j]);
          for (int v = 0; v < kVec; ++v) acc[v] = _mm512_fmadd_ps(a, load_bf16_masked(wr + 16 * v, m[v]), acc[v]);
        }
        for (int v = 0; v < kVec; ++v) _mm512_mask_storeu_ps(yr + 16 * v, m[v], acc[v]);
#else
        for (int64_t k = 0; k < k1 - k0; ++k) {
          float s = 0.f;
          for (int64_t j = 0; j < J; ++j) s += xr[j] * static_cast<float>(w0[j * K + k]);
          yr[k] = s;
        }
#endif
      }
    }
  });
  return y;
}

// ---- RMSNorm ----------------------------------------------------------------------------------------------------
// Row r of x at x + r·sx (unit column stride). Squares are rounded to fp32 before they are summed (PyTorch's pow,
// then mean); the sum's order differs from PyTorch's reduction (16 lanes, then across them), so the mean may
// differ in its last bit and, rarely, an output by one bf16 step. x · rsqrt is rounded to bf16 before the weight
// multiplies it, and that product is rounded again — the two roundings of DeepSeek's RMSNorm in bf16.
template <bool kAdd>
void norm_rows(const uint16_t* x, int64_t sx, const uint16_t* delta, int64_t sd, uint16_t* h, const uint16_t* w,
               uint16_t* y, int64_t r0, int64_t r1, int64_t D, float eps) {
  const float inv_d = 1.f / static_cast<float>(D);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* xr = x + r * sx;
    uint16_t* yr = y + r * D;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 16) {
      const __mmask16 m = tail_mask(D - c);
      __m512 v = load_bf16_masked(reinterpret_cast<const at::BFloat16*>(xr + c), m);
      if constexpr (kAdd) {
        v = _mm512_add_ps(v, load_bf16_masked(reinterpret_cast<const at::BFloat16*>(delta + r * sd + c), m));
        const __m512i bits = bf16_low(v);
        _mm256_mask_storeu_epi16(h + r * D + c, m, _mm512_cvtepi32_epi16(bits));
        v = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
      }
      acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    const float rs = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) * inv_d + eps);
    const uint16_t* src = kAdd ? h + r * D : xr;
    const __m512 vrs = _mm512_set1_ps(rs);
    for (int64_t c = 0; c < D; c += 16) {
      const __mmask16 m = tail_mask(D - c);
      const __m512 v = load_bf16_masked(reinterpret_cast<const at::BFloat16*>(src + c), m);
      const __m512 n = _mm512_castsi512_ps(_mm512_slli_epi32(bf16_low(_mm512_mul_ps(v, vrs)), 16));
      const __m512 o = _mm512_mul_ps(load_bf16_masked(reinterpret_cast<const at::BFloat16*>(w + c), m), n);
      _mm256_mask_storeu_epi16(yr + c, m, _mm512_cvtepi32_epi16(bf16_low(o)));
    }
#else
    auto round = [](float f) { return c10::BFloat16(f).x; };   // nearest even
    float sum = 0.f;
    for (int64_t c = 0; c < D; ++c) {
      float v = bf16_to_float(xr[c]);
      if constexpr (kAdd) {
        h[r * D + c] = round(v + bf16_to_float(delta[r * sd + c]));
        v = bf16_to_float(h[r * D + c]);
      }
      sum += v * v;
    }
    const float rs = 1.f / std::sqrt(sum * inv_d + eps);
    const uint16_t* src = kAdd ? h + r * D : xr;
    for (int64_t c = 0; c < D; ++c)
      yr[c] = round(bf16_to_float(w[c]) * bf16_to_float(round(bf16_to_float(src[c]) * rs)));
#endif
  }
}

std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor w, double eps, torch::Tensor delta) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "x and w must be bf16");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(),
              "x must be [R, D] with unit column stride and w [D] contiguous");
  const bool add = delta.numel() > 0;
  TORCH_CHECK(!add || (delta.scalar_type() == at::kBFloat16 && delta.sizes() == x.sizes() && delta.stride(1) == 1),
              "delta must be bf16 [R, D] with unit column stride, or empty");
  const int64_t R = x.size(0), D = x.size(1);
  auto y = torch::empty({R, D}, x.options());
  auto h = add ? torch::empty({R, D}, x.options()) : torch::empty({0}, x.options());
  auto ptr = [](const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
  const uint16_t* xp = ptr(x);
  const uint16_t* dp = add ? ptr(delta) : nullptr;
  uint16_t* hp = add ? reinterpret_cast<uint16_t*>(h.data_ptr<at::BFloat16>()) : nullptr;
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t sd = add ? delta.stride(0) : 0, grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    if (add) norm_rows<true>(xp, x.stride(0), dp, sd, hp, ptr(w), yp, r0, r1, D, static_cast<float>(eps));
    else norm_rows<false>(xp, x.stride(0), nullptr, 0, nullptr, ptr(w), yp, r0, r1, D, static_cast<float>(eps));
  });
  if (add) return {h, y};
  return {y};
}

torch::Tensor moe_residual(torch::Tensor h, torch::Tensor routed, torch::Tensor shared) {
  TORCH_CHECK(h.scalar_type() == at::kBFloat16 && h.dim() == 2 && h.is_contiguous(), "h must be contiguous bf16 [R, D]");
  TORCH_CHECK(routed.scalar_type() == at::kFloat && routed.sizes() == h.sizes() && routed.is_contiguous(),
              "routed must be contiguous fp32 [R, D]");
  const bool with_shared = shared.numel() > 0;
  TORCH_CHECK(!with_shared || (shared.scalar_type() == at::kBFloat16 && shared.sizes() == h.sizes() &&
                               shared.is_contiguous()),
              "shared must be contiguous bf16 [R, D], or empty");
  auto out = torch::empty_like(h);
  const uint16_t* hp = reinterpret_cast<const uint16_t*>(h.data_ptr<at::BFloat16>());
  const float* rp = routed.data_ptr<float>();
  const uint16_t* sp = with_shared ? reinterpret_cast<const uint16_t*>(shared.data_ptr<at::BFloat16>()) : nullptr;
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t n = h.numel();
  at::parallel_for(0, (n + 15) / 16, 2048, [&](int64_t v0, int64_t v1) {
    for (int64_t i = v0 * 16; i < std::min(n, v1 * 16); i += 16) {
#if defined(__AVX512F__)
      const __mmask16 m = tail_mask(n - i);
      __m512 t = _mm512_maskz_loadu_ps(m, rp + i);
      if (with_shared) t = _mm512_add_ps(t, load_bf16_masked(reinterpret_cast<const at::BFloat16*>(sp + i), m));
      const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(bf16_low(t), 16));
      const __m512 o = _mm512_add_ps(load_bf16_masked(reinterpret_cast<const at::BFloat16*>(hp + i), m), y);
      _mm256_mask_storeu_epi16(op + i, m, _mm512_cvtepi32_epi16(bf16_low(o)));
#else
      for (int64_t j = i; j < std::min(n, i + 16); ++j) {
        const float t = rp[j] + (with_shared ? bf16_to_float(sp[j]) : 0.f);
        op[j] = c10::BFloat16(bf16_to_float(hp[j]) + static_cast<float>(c10::BFloat16(t))).x;
      }
#endif
    }
  });
  return out;
}

// The same functions as dispatcher ops (dsv3/kernels/ops.py: a compiled graph calls them without Python).
TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("bf16_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("bf16_expert_linear(Tensor x, Tensor weight, Tensor ids, int row0=0, int row1=-1) -> Tensor");
  m.def("bf16_expert_linear_t(Tensor x, Tensor weight, Tensor ids, int row0, int row1) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("bf16_linear", &linear);
  m.impl("bf16_expert_linear", &expert_linear);
  m.impl("bf16_expert_linear_t", &expert_linear_t);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ w.T for a bf16 weight and a few rows of x (fp32 out)");
  m.def("expert_linear", &expert_linear, "y[p] = x[p] @ w[ids[p]][n0:n1].T with ids sorted (fp32 out)");
  m.def("expert_linear_t", &expert_linear_t, "y[p] = x[p] @ w[ids[p]][n0:n1] with ids sorted (fp32 out)");
  m.def("moe_residual", &moe_residual, "bf16(h + bf16(routed + shared)): a MoE layer's end in one pass");
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows (DeepSeek's roundings); with delta, of bf16(x + delta): [h, y]");
}
