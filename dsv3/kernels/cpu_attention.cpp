// Single-query MLA decode over the latent cache (the absorbed path at S = 1), bf16 cache, CPU.
//
// Each new token's H query rows share one key/value "head": the cached latent [T, D] (D = r + dr,
// 576 for V3; the value is its first r = 512 columns). Two passes, each reading the cache once for
// all heads (groups of 16 heads = the 16 fp32 lanes of a vector):
//
//   scores(q [B,H,D] bf16, latent [B,T,D] bf16, scale) -> s [B,T,Hp] fp32    s[t,h] = scale·q[h]·latent[t]
//       q is packed as bf16 pairs [D/2][16 heads]; per token, D/2 vdpbf16ps (AVX512-BF16) with the
//       token's pair broadcast accumulate all 16 heads at once — no horizontal sums — 8 tokens in flight.
//   (the caller takes the softmax over T in fp32: torch's vectorised softmax)
//   values(p [B,T,Hp] fp32, latent, r) -> o [B,Hp,r] fp32                 o[h] = Σ_t p[t,h]·latent[t,:r]
//       16 head accumulators per 16-column chunk, fp32 FMAs with p broadcast; T in tiles that stay in L2.
//
// Hp is H rounded up to 16 (padding heads have zero queries; the caller drops them). Products of bf16
// values are exact in fp32 and sums are in fp32 (the stock path rounds scores and probabilities to bf16,
// so this path is the more accurate one). The latent may be a strided view (a slice of a preallocated
// cache): rows need only unit stride inside.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kTile = 256;  // tokens per L2 tile in the value pass (256 × 1152 B ≈ 295 KB)

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

bool fast_path() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

torch::Tensor scores(torch::Tensor q, torch::Tensor latent, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && latent.scalar_type() == at::kBFloat16, "q and latent must be bf16");
  TORCH_CHECK(q.dim() == 3 && latent.dim() == 3 && q.size(0) == latent.size(0) && q.size(2) == latent.size(2),
              "q [B,H,D] and latent [B,T,D]");
  TORCH_CHECK(latent.stride(2) == 1, "latent rows must be contiguous");
  auto qc = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), T = latent.size(1);
  const int64_t G = (H + kLanes - 1) / kLanes, Hp = G * kLanes, D2 = (D + 1) / 2;
  // packed[b][g][c2][lane] = (q[b, g*16+lane, 2c2], q[b, g*16+lane, 2c2+1]) as one 32-bit pair
  std::vector<uint32_t> packed(B * G * D2 * kLanes, 0);
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < D; ++c) {
        const int64_t g = h / kLanes, lane = h % kLanes;
        uint32_t& slot = packed[((b * G + g) * D2 + c / 2) * kLanes + lane];
        slot |= static_cast<uint32_t>(qp[(b * H + h) * D + c]) << (16 * (c % 2));
      }
  auto s = torch::empty({B, T, Hp}, q.options().dtype(at::kFloat));
  float* sp = s.data_ptr<float>();
  const uint16_t* lp = reinterpret_cast<const uint16_t*>(latent.data_ptr<at::BFloat16>());
  const int64_t sb = latent.stride(0), st = latent.stride(1);
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / T, t0 = i % T, t1 = std::min(T, t0 + (end - i));
      const uint16_t* lb = lp + b * sb;
      for (int64_t g = 0; g < G; ++g) {
        const uint32_t* pk = packed.data() + (b * G + g) * D2 * kLanes;
        int64_t t = t0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
        const bool odd = D % 2;
        for (; t + 8 <= t1 && !odd; t += 8) {
          __m512 acc[8];
          for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
          for (int64_t c2 = 0; c2 < D2; ++c2) {
            const __m512bh qv = (__m512bh)_mm512_loadu_si512(pk + c2 * kLanes);
            for (int j = 0; j < 8; ++j) {
              int32_t pair;
              std::memcpy(&pair, lb + (t + j) * st + 2 * c2, 4);
              acc[j] = _mm512_dpbf16_ps(acc[j], qv, (__m512bh)_mm512_set1_epi32(pair));
            }
          }
          for (int j = 0; j < 8; ++j)
            _mm512_storeu_ps(sp + (b * T + t + j) * Hp + g * kLanes, _mm512_mul_ps(acc[j], _mm512_set1_ps(fscale)));
        }
#endif
        for (; t < t1; ++t)
          for (int64_t lane = 0; lane < kLanes; ++lane) {
            float acc = 0.f;
            for (int64_t c = 0; c < D; ++c) {
              const uint32_t pair = pk[(c / 2) * kLanes + lane];
              acc += bf16_to_float(static_cast<uint16_t>(pair >> (16 * (c % 2)))) * bf16_to_float(lb[t * st + c]);
            }
            sp[(b * T + t) * Hp + g * kLanes + lane] = acc * fscale;
          }
      }
      i += t1 - t0;
    }
  });
  return s;
}

torch::Tensor values(torch::Tensor p, torch::Tensor latent, int64_t r) {
  TORCH_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous() && p.dim() == 3 && p.size(2) % kLanes == 0,
              "p must be contiguous fp32 [B,T,Hp], Hp a multiple of 16");
  TORCH_CHECK(latent.scalar_type() == at::kBFloat16 && latent.dim() == 3 && latent.stride(2) == 1 &&
              latent.size(0) == p.size(0) && latent.size(1) == p.size(1) && r > 0 && r <= latent.size(2),
              "latent must be bf16 [B,T,D] with unit-stride rows and r <= D");
  const int64_t B = p.size(0), T = p.size(1), Hp = p.size(2), G = Hp / kLanes;
  const int64_t C = (r + kLanes - 1) / kLanes;  // 16-column chunks
  auto o = torch::zeros({B, Hp, r}, p.options());
  float* op = o.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  const uint16_t* lp = reinterpret_cast<const uint16_t*>(latent.data_ptr<at::BFloat16>());
  const int64_t sb = latent.stride(0), st = latent.stride(1);
  // Jobs: (batch, head group, chunk). Each walks T in tiles; a thread's chunks of one tile share its cache lines.
  at::parallel_for(0, B * G * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = 0; t0 < T; t0 += kTile) {
      const int64_t t1 = std::min(T, t0 + kTile);
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / (G * C), g = (job / C) % G, c0 = (job % C) * kLanes;
        const int64_t width = std::min(kLanes, r - c0);
        const uint16_t* lb = lp + b * sb + c0;
        const float* pb = pp + b * T * Hp + g * kLanes;
        float* ob = op + (b * Hp + g * kLanes) * r + c0;
#if defined(__AVX512F__)
        const __mmask16 m = width == kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << width) - 1);
        __m512 acc[kLanes];
        for (int h = 0; h < kLanes; ++h) acc[h] = _mm512_maskz_loadu_ps(m, ob + h * r);
        for (int64_t t = t0; t < t1; ++t) {
          const __m256i raw = _mm256_maskz_loadu_epi16(m, lb + t * st);
          const __m512 lv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
          const float* pt = pb + t * Hp;
          for (int h = 0; h < kLanes; ++h) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(pt[h]), lv, acc[h]);
        }
        for (int h = 0; h < kLanes; ++h) _mm512_mask_storeu_ps(ob + h * r, m, acc[h]);
#else
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t h = 0; h < kLanes; ++h)
            for (int64_t c = 0; c < width; ++c) ob[h * r + c] += pb[t * Hp + h] * bf16_to_float(lb[t * st + c]);
#endif
      }
    }
  });
  return o;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fast_path", &fast_path, "whether the AVX512-BF16 path was compiled in");
  m.def("scores", &scores, "s[b,t,h] = scale * q[b,h] . latent[b,t] (fp32, heads padded to 16)");
  m.def("values", &values, "o[b,h] = sum_t p[b,t,h] * latent[b,t,:r] (fp32)");
}
