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
// On a CPU with AMX-BF16 (compiled in by -march=native there) `set_amx(true)` swaps each job for run_job_amx: the
// same blocks, roundings and merge, with the scores and the value sums as tile products (8192 latents × 16 heads:
// 1.75 → 0.42 ms on a 2-core Xeon, about the time to read the 9.4 MB of latents).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "amx_tiles.h"
#include "vec_math.h"

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kTile = 64;          // tokens per tile (scores and probabilities stay in L1)
constexpr int64_t kMinStretch = 64;    // tokens per job at least, when T is split across threads

inline uint16_t float_to_bf16(float f) {   // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}


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

#ifdef DSV3_AMX
// ---- the same job on AMX tiles (CPUs with AMX-BF16, once `set_amx(true)` is called) --------------------------------
// Same contract and rounding as run_job (probabilities rounded to bf16 for the value sum, Σp
// over the rounded values, fp32 sums), with both products on the tiles. Per job (batch row, 16 heads, stretch of
// tokens), blocks of 64 tokens:
//   scores  Sᵀ [16 tokens × 16 heads] = L·Qᵀ: A = 16 cached rows × 32 dims read in place, B = the query packed as
//           (dim pair) × head — 18 tile products per 16 tokens for D = 576
//   softmax online over the blocks (the running max rescales the accumulators when it grows), p rounded to bf16
//   values  O [16 heads × r] += P·V: A = P [16 heads × 32 tokens] (the (p_t, p_t+1) pairs transposed), B = two
//           latent rows interleaved per column — built per 32 tokens × 16 columns; the accumulators (r/16 tiles) live
//           in memory in tile order and pass through one tile register each
constexpr int64_t kBlockTokens = 64;   // tokens per block (two P tiles)
constexpr int64_t kDims = 32;           // latent dims per score tile product

struct MlaJob {
  const uint32_t* qpack;   // [D/2][16] (q[h][2i], q[h][2i+1]) pairs
  const uint16_t* lat;     // latent rows of this batch row, row stride st elements
  int64_t st, D, r;
  float scale;
};

// rows t..t+15 of the latent (n valid, the rest zero) as a tile source: in place when all 16 are valid
inline const uint16_t* rows16(const MlaJob& j, int64_t t, int64_t n, uint16_t* buf, int64_t& stride_bytes) {
  if (n == kTileRows) {
    stride_bytes = j.st * 2;
    return j.lat + t * j.st;
  }
  for (int64_t i = 0; i < kTileRows; ++i)
    if (i < n) std::memcpy(buf + i * j.D, j.lat + (t + i) * j.st, j.D * 2);
    else std::memset(buf + i * j.D, 0, j.D * 2);
  stride_bytes = j.D * 2;
  return buf;
}

// acc [r/16][16 heads][16] fp32 (tile order; zeroed by the caller) receives Σ p·v over tokens [t0, t1); max/sum per head
void run_job_amx(const MlaJob& j, int64_t t0, int64_t t1, float* acc, Partial& part) {
  const int64_t chunks = j.D / kDims, cblocks = j.r / kTileRows;
  alignas(64) float s[kBlockTokens][kTileRows];
  alignas(64) uint32_t pp[kBlockTokens / 2][kTileRows];   // (p_t, p_t+1) bf16 pairs per head
  alignas(64) uint32_t ptile[2][kTileRows][kTileRows];    // A tiles: [head][token pair]
  alignas(64) uint32_t btile[kTileRows][kTileRows];       // B tile: [token pair][column]
  std::vector<uint16_t> pad(kTileRows * j.D);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vsum = _mm512_setzero_ps();
  const __m512 vscale = _mm512_set1_ps(j.scale);
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                          39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  for (int64_t a = t0; a < t1; a += kBlockTokens) {
    const int64_t n = std::min(kBlockTokens, t1 - a);
    // scores, 16 tokens per tile
    for (int64_t sub = 0; sub < n; sub += kTileRows) {
      int64_t stride = 0;
      const uint16_t* src = rows16(j, a + sub, std::min(kTileRows, n - sub), pad.data(), stride);
      _tile_zero(0);
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(4, src + c * kDims, stride);
        _tile_loadd(6, j.qpack + c * kTileRows * kTileRows, 64);
        _tile_dpbf16ps(0, 4, 6);
      }
      _tile_stored(0, s[sub], 64);
    }
    for (int64_t t = 0; t < n; ++t) _mm512_store_ps(s[t], _mm512_mul_ps(_mm512_load_ps(s[t]), vscale));
    // online softmax: a larger max rescales what was summed so far
    __m512 tmax = vmax;
    for (int64_t t = 0; t < n; ++t) tmax = _mm512_max_ps(tmax, _mm512_load_ps(s[t]));
    if (_mm512_cmp_ps_mask(tmax, vmax, _CMP_GT_OQ)) {
      const __m512 alpha = exp512(_mm512_sub_ps(vmax, tmax));   // 0 on the first block (max was -inf)
      vsum = _mm512_mul_ps(vsum, alpha);
      if (a > t0) {
        alignas(64) float al[kTileRows];
        _mm512_store_ps(al, alpha);
        for (int64_t cb = 0; cb < cblocks; ++cb)
          for (int64_t h = 0; h < kTileRows; ++h) {
            float* row = acc + (cb * kTileRows + h) * kTileRows;
            _mm512_store_ps(row, _mm512_mul_ps(_mm512_set1_ps(al[h]), _mm512_load_ps(row)));
          }
      }
      vmax = tmax;
    }
    for (int64_t t = 0; t < kBlockTokens; t += 2) {   // tokens past n weigh 0
      const __m512i lo = t < n ? bf16_low(exp512(_mm512_sub_ps(_mm512_load_ps(s[t]), vmax))) : _mm512_setzero_si512();
      const __m512i hi = t + 1 < n ? bf16_low(exp512(_mm512_sub_ps(_mm512_load_ps(s[t + 1]), vmax)))
                                   : _mm512_setzero_si512();
      vsum = _mm512_add_ps(vsum, _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)));
      vsum = _mm512_add_ps(vsum, _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)));
      _mm512_store_si512(pp[t / 2], _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    const int64_t ptiles = (n + 2 * kTileRows - 1) / (2 * kTileRows);   // 32 tokens per P tile
    for (int64_t pt = 0; pt < ptiles; ++pt) {   // P tile pt: [head][pair] = pp[16·pt + pair][head]
      __m512 in[16], outv[16];
      for (int i = 0; i < 16; ++i) in[i] = _mm512_load_ps(reinterpret_cast<const float*>(pp[pt * kTileRows + i]));
      transpose16(in, outv);
      for (int i = 0; i < 16; ++i) _mm512_store_ps(reinterpret_cast<float*>(ptile[pt][i]), outv[i]);
    }
    _tile_loadd(4, ptile[0], 64);
    if (ptiles == 2) _tile_loadd(5, ptile[1], 64);
    // values: per 32 columns, B tiles of two interleaved latent rows per token pair (zero past n)
    for (int64_t cb = 0; cb < cblocks; cb += 2) {
      const bool two = cb + 1 < cblocks;
      _tile_loadd(0, acc + cb * kTileRows * kTileRows, 64);
      if (two) _tile_loadd(1, acc + (cb + 1) * kTileRows * kTileRows, 64);
      for (int64_t pt = 0; pt < ptiles; ++pt) {
        alignas(64) uint32_t bt2[kTileRows][kTileRows];   // the next 16 columns' B tile
        for (int64_t kk = 0; kk < kTileRows; ++kk) {
          const int64_t t = pt * 2 * kTileRows + 2 * kk;
          const __m512i va = t < n ? _mm512_loadu_si512(j.lat + (a + t) * j.st + cb * kTileRows) : _mm512_setzero_si512();
          const __m512i vb = t + 1 < n ? _mm512_loadu_si512(j.lat + (a + t + 1) * j.st + cb * kTileRows)
                                       : _mm512_setzero_si512();
          _mm512_store_si512(btile[kk], _mm512_permutex2var_epi16(va, lo_idx, vb));   // columns cb·16 .. +15
          if (two)
            _mm512_store_si512(bt2[kk], _mm512_permutex2var_epi16(va, _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16)), vb));
        }
        _tile_loadd(6, btile, 64);
        if (pt == 0) _tile_dpbf16ps(0, 4, 6);
        else _tile_dpbf16ps(0, 5, 6);
        if (two) {
          _tile_loadd(7, bt2, 64);
          if (pt == 0) _tile_dpbf16ps(1, 4, 7);
          else _tile_dpbf16ps(1, 5, 7);
        }
      }
      _tile_stored(0, acc + cb * kTileRows * kTileRows, 64);
      if (two) _tile_stored(1, acc + (cb + 1) * kTileRows * kTileRows, 64);
    }
  }
  _mm512_storeu_ps(part.max, vmax);
  _mm512_storeu_ps(part.sum, vsum);
}
#endif

bool g_amx = false;   // set_amx(): the AMX jobs replace run_job where r % 32 == 0 and D % 32 == 0

}  // namespace

bool fast_path() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// Use the AMX jobs from now on (true: only where compiled in and Linux grants the tile registers); the new state
bool set_amx(bool on) {
#ifdef DSV3_AMX
  g_amx = on && amx_permission();
#else
  g_amx = false;
#endif
  return g_amx;
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
#ifdef DSV3_AMX
  const bool amx = g_amx && D % 32 == 0 && r % 32 == 0;
#else
  const bool amx = false;
#endif
  at::parallel_for(0, jobs, 1, [&](int64_t begin, int64_t end) {
#ifdef DSV3_AMX
    if (amx) configure_tiles();
#endif
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
#ifdef DSV3_AMX
      if (amx) {
        run_job_amx(MlaJob{packed.data() + (b * G + g) * D2 * kLanes, lp + b * sb, st, D, r, fscale}, t0, t1,
                    ap + j * acc_size, parts[j]);
        continue;
      }
#endif
      run_job(packed.data() + (b * G + g) * D2 * kLanes, D2, lp + b * sb, st, t0, t1, r, fscale, ap + j * acc_size,
              parts[j]);
    }
#ifdef DSV3_AMX
    if (amx) _tile_release();
#endif
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
          // run_job keeps acc per head [16][r], run_job_amx in tile order [r/16][16 heads][16]
          const int64_t at = amx ? ((c / kLanes) * kLanes + h) * kLanes + c % kLanes : h * chunks * kLanes + c;
          for (int64_t s = 0; s < S; ++s) v += w[s] * ap[(j0 + s) * acc_size + at];
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
  m.def("set_amx", &set_amx, "use the AMX jobs (where compiled in and granted); returns the new state");
  m.def("decode", &decode, "o[b,h] = softmax_t(scale q[b,h].latent[b,t]) . latent[b,t,:r] (fp32, heads padded to 16)");
  m.def("mla_decode", &mla_decode, "decode without the padded heads: [B, H, r]");
}
