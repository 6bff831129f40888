// Single-query MLA decode over the latent cache (the absorbed path at S = 1), bf16 cache, CPU.
//
// Each new token's H query rows share one key/value "head": the cached latent [T, D] (D = r + dr,
// 576 for V3; the value is its first r = 512 columns). One pass over the cache, flash-decoding style:
//
//   decode(q [B,H,D] bf16, latent [B,T,D] bf16, r, scale) -> o [B,Hp,r] fp32
//       o[h] = Σ_t softmax_t(scale·q[h]·latent[t]) · latent[t, :r]
//
// Jobs are (batch row, group of 16 heads = the 16 fp32 lanes of a vector, stretch of T); with one batch
// row and 16 heads the stretches are what keeps every thread busy. Each job walks its stretch in tiles of
// kTile tokens that stay in L1/L2 while they are used twice:
//   scores   q is packed as bf16 pairs [D/2][16 heads]; per token, D/2 vdpbf16ps with the token's pair
//            broadcast accumulate all 16 heads at once (products of bf16 values are exact in fp32, sums fp32)
//   softmax  online: the running max per head rescales the job's sums when it grows; p = exp(s - max)
//            (a vectorised exp, ~1e-7 relative) and the running Σp per head
//   values   p is rounded to bf16 (as FlashAttention and FlashMLA feed P to their second GEMM) and stored
//            as (token t, token t+1) pairs per head; two latent rows interleave into bf16 pairs and one
//            vdpbf16ps per head adds both tokens — half the instructions of fp32 FMAs, which bound this
//            pass. Σp sums the rounded p, so the weights stay a convex combination: |o - o_fp32| ≤ 2⁻⁸·max|v|.
// The stretches' (max, Σp, Σp·v) are merged at the end. Hp is H rounded up to 16 (padding heads have zero
// queries; the caller drops them). The latent may be a strided view (a slice of a preallocated cache):
// rows need only unit stride inside. Without AVX512-BF16 the module is not built (`fast_path()` false is
// never reached: the Python side checks the CPU first) — a scalar loop keeps it compiling anywhere.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kTile = 64;          // tokens per tile (scores and probabilities stay in L1)
constexpr int64_t kMinStretch = 64;    // tokens per job at least, when T is split across threads

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {   // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// e^x for x ≤ 0 (scores minus their max): 2^(x·log2 e) as 2^n · 2^f, f in [-1/2, 1/2], degree-7 Taylor
// polynomial of 2^f (truncation < 1e-8), scaled by vscalefps; very negative x underflows to 0.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// bf16 bits of 16 fp32 values (round to nearest even), in the low halves of the 32-bit lanes
inline __m512i bf16_low(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
}
#endif

struct Partial {   // one job's running state, per head lane
  float max[kLanes], sum[kLanes];
};

// One job: heads [16g, 16g+16) of batch row b over tokens [t0, t1). acc [16][r] (zeroed) receives Σ p·v.
void run_job(const uint32_t* pk, int64_t D2, const uint16_t* lb, int64_t st, int64_t t0, int64_t t1, int64_t r,
             float scale, float* acc, Partial& part) {
  for (int64_t h = 0; h < kLanes; ++h) {
    part.max[h] = -std::numeric_limits<float>::infinity();
    part.sum[h] = 0.f;
  }
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  alignas(64) float s[kTile][kLanes];
  alignas(64) uint32_t pp[kTile / 2][kLanes];   // (p[t], p[t+1]) bf16 pairs per head
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vsum = _mm512_setzero_ps();
  const __m512 vscale = _mm512_set1_ps(scale);
  const int64_t chunks = (r + kLanes - 1) / kLanes;
  for (int64_t a = t0; a < t1; a += kTile) {
    const int64_t n = std::min(kTile, t1 - a);
    // scores, 8 tokens in flight
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
      __m512 sc[8];
      for (int j = 0; j < 8; ++j) sc[j] = _mm512_setzero_ps();
      for (int64_t c2 = 0; c2 < D2; ++c2) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(pk + c2 * kLanes);
        for (int j = 0; j < 8; ++j) {
          int32_t pair;
          std::memcpy(&pair, lb + (a + t + j) * st + 2 * c2, 4);
          sc[j] = _mm512_dpbf16_ps(sc[j], qv, (__m512bh)_mm512_set1_epi32(pair));
        }
      }
      for (int j = 0; j < 8; ++j) _mm512_store_ps(s[t + j], _mm512_mul_ps(sc[j], vscale));
    }
    for (; t < n; ++t) {
      __m512 sc = _mm512_setzero_ps();
      for (int64_t c2 = 0; c2 < D2; ++c2) {
        int32_t pair;
        std::memcpy(&pair, lb + (a + t) * st + 2 * c2, 4);
        sc = _mm512_dpbf16_ps(sc, (__m512bh)_mm512_loadu_si512(pk + c2 * kLanes), (__m512bh)_mm512_set1_epi32(pair));
      }
      _mm512_store_ps(s[t], _mm512_mul_ps(sc, vscale));
    }
    // online softmax: a larger max rescales what was summed so far
    __m512 tmax = vmax;
    for (t = 0; t < n; ++t) tmax = _mm512_max_ps(tmax, _mm512_load_ps(s[t]));
    if (_mm512_cmp_ps_mask(tmax, vmax, _CMP_GT_OQ)) {
      const __m512 alpha = exp512(_mm512_sub_ps(vmax, tmax));   // 0 on the first tile (max was -inf)
      vsum = _mm512_mul_ps(vsum, alpha);
      alignas(64) float al[kLanes];
      _mm512_store_ps(al, alpha);
      if (a > t0)
        for (int64_t h = 0; h < kLanes; ++h) {
          const __m512 ah = _mm512_set1_ps(al[h]);
          for (int64_t c = 0; c < chunks * kLanes; c += kLanes)
            _mm512_store_ps(acc + h * chunks * kLanes + c, _mm512_mul_ps(ah, _mm512_load_ps(acc + h * chunks * kLanes + c)));
        }
      vmax = tmax;
    }
    for (t = 0; t < n; t += 2) {
      const __m512i lo = bf16_low(exp512(_mm512_sub_ps(_mm512_load_ps(s[t]), vmax)));
      const __m512i hi = t + 1 < n ? bf16_low(exp512(_mm512_sub_ps(_mm512_load_ps(s[t + 1]), vmax)))
                                   : _mm512_setzero_si512();
      // Σp over the rounded values: the bf16 bits back in the high halves are those floats exactly
      vsum = _mm512_add_ps(vsum, _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)));
      vsum = _mm512_add_ps(vsum, _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)));
      _mm512_store_si512(pp[t / 2], _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    // values: per 16-column chunk, 16 head accumulators in registers across the tile's token pairs
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t c0 = c * kLanes, width = std::min(kLanes, r - c0);
      const __mmask16 m = width == kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << width) - 1);
      __m512 ac[kLanes];
      for (int64_t h = 0; h < kLanes; ++h) ac[h] = _mm512_load_ps(acc + (h * chunks + c) * kLanes);
      for (t = 0; t < n; t += 2) {
        const __m512i va = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lb + (a + t) * st + c0));
        const __m512i vb = t + 1 < n ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lb + (a + t + 1) * st + c0))
                                     : _mm512_setzero_si512();
        const __m512bh v = (__m512bh)_mm512_or_si512(va, _mm512_slli_epi32(vb, 16));   // (v[t][i], v[t+1][i])
        for (int64_t h = 0; h < kLanes; ++h)
          ac[h] = _mm512_dpbf16_ps(ac[h], v, (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[t / 2][h])));
      }
      for (int64_t h = 0; h < kLanes; ++h) _mm512_store_ps(acc + (h * chunks + c) * kLanes, ac[h]);
    }
  }
  _mm512_storeu_ps(part.max, vmax);
  _mm512_storeu_ps(part.sum, vsum);
#else
  const int64_t chunks = (r + kLanes - 1) / kLanes;
  std::vector<float> sc(t1 - t0);
  for (int64_t h = 0; h < kLanes; ++h) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = t0; t < t1; ++t) {
      float v = 0.f;
      for (int64_t c = 0; c < 2 * D2; ++c)
        v += bf16_to_float(static_cast<uint16_t>(pk[(c / 2) * kLanes + h] >> (16 * (c % 2)))) * bf16_to_float(lb[t * st + c]);
      sc[t - t0] = v * scale;
      mx = std::max(mx, sc[t - t0]);
    }
    float sum = 0.f;
    for (int64_t t = t0; t < t1; ++t) {
      const float p = bf16_to_float(float_to_bf16(std::exp(sc[t - t0] - mx)));
      sum += p;
      for (int64_t c = 0; c < r; ++c) acc[h * chunks * kLanes + c] += p * bf16_to_float(lb[t * st + c]);
    }
    part.max[h] = mx;
    part.sum[h] = sum;
  }
#endif
}

}  // namespace

bool fast_path() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

torch::Tensor decode(torch::Tensor q, torch::Tensor latent, int64_t r, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && latent.scalar_type() == at::kBFloat16, "q and latent must be bf16");
  TORCH_CHECK(q.dim() == 3 && latent.dim() == 3 && q.size(0) == latent.size(0) && q.size(2) == latent.size(2),
              "q [B,H,D] and latent [B,T,D]");
  TORCH_CHECK(latent.stride(2) == 1, "latent rows must be contiguous");
  TORCH_CHECK(q.size(2) % 2 == 0, "D must be even");
  TORCH_CHECK(r > 0 && r <= latent.size(2), "r must be in [1, D]");
  TORCH_CHECK(latent.size(1) > 0, "the latent cache is empty");
  auto qc = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), T = latent.size(1);
  const int64_t G = (H + kLanes - 1) / kLanes, Hp = G * kLanes, D2 = D / 2, chunks = (r + kLanes - 1) / kLanes;
  // packed[b][g][c2][lane] = (q[b, g*16+lane, 2c2], q[b, g*16+lane, 2c2+1]) as one 32-bit pair
  std::vector<uint32_t> packed(B * G * D2 * kLanes, 0);
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < D; ++c) {
        const int64_t g = h / kLanes, lane = h % kLanes;
        packed[((b * G + g) * D2 + c / 2) * kLanes + lane] |= static_cast<uint32_t>(qp[(b * H + h) * D + c]) << (16 * (c % 2));
      }
  // stretches of T per (b, g): enough jobs for the threads, at least kMinStretch tokens each
  const int64_t threads = at::get_num_threads();
  const int64_t S = std::max<int64_t>(1, std::min((threads + B * G - 1) / (B * G), (T + kMinStretch - 1) / kMinStretch));
  const int64_t per = (T + S - 1) / S;
  const int64_t jobs = B * G * S, acc_size = kLanes * chunks * kLanes;
  auto accs = torch::zeros({jobs, acc_size}, q.options().dtype(at::kFloat));
  std::vector<Partial> parts(jobs);
  float* ap = accs.data_ptr<float>();
  const uint16_t* lp = reinterpret_cast<const uint16_t*>(latent.data_ptr<at::BFloat16>());
  const int64_t sb = latent.stride(0), st = latent.stride(1);
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, jobs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t b = j / (G * S), g = (j / S) % G, s = j % S;
      const int64_t t0 = s * per, t1 = std::min(T, t0 + per);
      if (t0 >= t1) {
        for (int64_t h = 0; h < kLanes; ++h) {
          parts[j].max[h] = -std::numeric_limits<float>::infinity();
          parts[j].sum[h] = 0.f;
        }
        continue;
      }
      run_job(packed.data() + (b * G + g) * D2 * kLanes, D2, lp + b * sb, st, t0, t1, r, fscale, ap + j * acc_size,
              parts[j]);
    }
  });
  // merge the stretches: o = Σ_s e^(max_s - M) acc_s / Σ_s e^(max_s - M) sum_s
  auto o = torch::empty({B, Hp, r}, q.options().dtype(at::kFloat));
  float* op = o.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t h = 0; h < kLanes; ++h) {
        const int64_t j0 = (b * G + g) * S;
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < S; ++s) M = std::max(M, parts[j0 + s].max[h]);
        float den = 0.f;
        std::vector<float> w(S);
        for (int64_t s = 0; s < S; ++s) {
          w[s] = parts[j0 + s].sum[h] > 0.f ? std::exp(parts[j0 + s].max[h] - M) : 0.f;
          den += w[s] * parts[j0 + s].sum[h];
        }
        float* out = op + (b * Hp + g * kLanes + h) * r;
        for (int64_t c = 0; c < r; ++c) {
          float v = 0.f;
          for (int64_t s = 0; s < S; ++s) v += w[s] * ap[(j0 + s) * acc_size + h * chunks * kLanes + c];
          out[c] = v / den;
        }
      }
  return o;
}

// dsv3::mla_decode: decode's heads without the padding, [B, H, r] (contiguous: a fresh tensor, as its fake)
torch::Tensor mla_decode(torch::Tensor query, torch::Tensor latent, int64_t r, double scale) {
  return decode(query, latent, r, scale).narrow(1, 0, query.size(1)).contiguous();
}

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("mla_decode(Tensor query, Tensor latent, int r, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("mla_decode", &mla_decode);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fast_path", &fast_path, "whether the AVX512-BF16 path was compiled in");
  m.def("decode", &decode, "o[b,h] = softmax_t(scale q[b,h].latent[b,t]) . latent[b,t,:r] (fp32, heads padded to 16)");
  m.def("mla_decode", &mla_decode, "decode without the padded heads: [B, H, r]");
}
