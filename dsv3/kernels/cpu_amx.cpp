// Expert GEMMs for prefill on AMX (Intel's bf16 tile unit): y[p] = x[p] · W[ids[p]]ᵀ for many rows per expert.
//
//   expert_gemm(x [rows,K] bf16, w [E,N,K], scale, ids [P] sorted, kind, group, bo, bi, parts, bf16_out,
//               src, swiglu, row_scale, dst, dst_rows, w_up) -> y [P,N] (swiglu: [P,N/2]) fp32, or bf16 (rounded
//               to nearest even); with dst: [dst_rows,N] fp32, the sum over p of row p into row dst[p]
//
// Fused around the product, for the MoE layer (each optional): `src` [P] int64 gathers the activations (row p is
// x[src[p]], read while they are repacked); `swiglu` makes W a gate_up stack [E, 2I, K] and y [P, I] = silu(gate)·up,
// rounded as PyTorch's bf16 ops round it after a bf16 GEMM (gate and up to bf16, silu in fp32 to bf16, the product
// to bf16); `row_scale` [P] fp32 multiplies output row p (the routing weights, on the fp32 sums); `dst` [P] int64
// adds output row p into row dst[p] of a zeroed [dst_rows, N] fp32 result (the sum over a token's experts).
// `w_up` (bf16 with swiglu; empty otherwise) holds the up rows [E, I, K] apart from the gate rows, w then [E, I, K]
// (a dense MLP's gate_proj and up_proj weights, two tensors).
//
// Weight kinds, each read as stored (no dense copy of a whole matrix):
//   0 bf16   w bf16 [E,N,K]
//   1 int8   w int8 [E,N,K] · scale fp32 [E,N]                       (Int8PerChannel)
//   2 int4   w uint8 [E,N,K/2] "rows" packing, scale bf16 [E,K/G,N,2] (Int4Grouped: (code-8)·s + z)
//   3 fp8    w e4m3 [E,N,K] · scale fp32 [E, parts·ceil(N/parts/bo), ceil(K/bi)]   (Fp8Blocks)
// A quantised weight is dequantised to bf16 one panel of 16 or 32 output rows at a time (fp32 math, one
// rounding: the same bits as the formats' dequantise-then-GEMM path), into a per-thread buffer that stays in L2
// while every row block of the expert's activations passes over it. The panel is written chunk by chunk inside the
// first row block's loop, two chunks ahead of the tiles that read it, so its vector work overlaps the tile products.
//
// The product is computed transposed, yᵀ = W·xᵀ, because AMX's A operand is row-major (16 rows × 32 values,
// read straight from W or the panel) while its B operand wants pairs of K values interleaved per column: the
// activations are small and reused across all N rows, so they are repacked once per expert —
// xpack[m-tile][k-chunk] = 16 rows kk × 16 columns m × (x[m][2kk], x[m][2kk+1]) — and W never is. Each work item
// (expert, 32 rows of W: consecutive, or 16 gate rows and their 16 up rows) keeps 2×2 fp32 accumulator tiles
// (2 row tiles of W × 2 tiles of 16 activation rows) over K, in chunks of 32; the 16×16 results are transposed
// into y on the way out. Products of bf16 values are
// exact in fp32 and the sums are fp32 (the order differs from oneDNN's).
//
// Needs K % 32 == 0 and N % 16 == 0 (every DeepSeek-V3 projection; the caller checks and otherwise keeps the
// stock path), AMX-TILE + AMX-BF16 compiled in, and the kernel's permission to use the tile registers, which
// Linux grants per process (arch_prctl ARCH_REQ_XCOMP_PERM); `init()` asks for it and says whether it got it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "amx_tiles.h"
#include "expert_runs.h"
#include "fp8_convert.h"
#include "vec_math.h"

namespace {

enum Kind : int64_t { kBf16 = 0, kInt8 = 1, kInt4 = 2, kFp8 = 3 };

constexpr int64_t kChunk = 32;      // K values per tile product
constexpr int64_t kPanelRows = 32;  // output rows per work item (two A tiles)

#ifdef DSV3_AMX
// 32 fp32 -> 32 bf16 (round to nearest even), stored at dst
inline void store_bf16x32(uint16_t* dst, __m512 lo, __m512 hi) {
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// Panel of `rows` (16 or 32) dequantised weight rows n0.. of expert e (int8, int4, FP8) as bf16 in tile order,
// [K/32][rows][32]: each A tile is 1 KB contiguous. bf16 weights are not copied: their tiles are read in place (a
// tile-order copy of them measured slower on the bench shape).
struct Weights {
  int64_t kind, N, K, group, bo, bi, parts, sc_rows, sc_cols;
  const uint8_t* w;      // expert-stacked bytes (bf16: 2 per value; int4: half a byte)
  const void* scale;

  // the bytes of one stored row, and where row n of expert e starts (int4's group scales are not counted)
  int64_t row_bytes() const { return kind == kBf16 ? 2 * K : kind == kInt4 ? K / 2 : K; }
  const char* row_at(int64_t e, int64_t n) const { return reinterpret_cast<const char*>(w) + (e * N + n) * row_bytes(); }

  // The panel of rows n_lo..n_lo+15 and n_hi..n_hi+15 of expert e (the second group absent when rows = 16; n_hi =
  // n_lo + 16 for consecutive rows, or the up rows of the gate rows n_lo): `begin_panel`, then `panel_chunk(c)` for
  // c = 0, 1, ... writes all rows' 32 values of chunk c (the panel fills front to back as the tiles read it; built
  // row by row, 2 KB between stores, it measured 1.6× slower on the bench shape's experts).
  int64_t pe = 0, prows = 0;
  int64_t rn[kPanelRows];          // each panel row's row of the expert
  const float* srow[kPanelRows];   // FP8: each row's block scales

  void begin_panel(int64_t e, int64_t n_lo, int64_t n_hi, int64_t rows) {
    pe = e, prows = rows;
    for (int64_t i = 0; i < rows; ++i) rn[i] = i < kTileRows ? n_lo + i : n_hi + i - kTileRows;
    if (kind != kFp8) return;
    const int64_t part_rows = N / parts, per_part = (part_rows + bo - 1) / bo;
    for (int64_t i = 0; i < rows; ++i) {   // the row's block of rows in its part (gate or up) of the expert
      const int64_t rb = (rn[i] / part_rows) * per_part + (rn[i] % part_rows) / bo;
      srow[i] = static_cast<const float*>(scale) + (e * sc_rows + rb) * sc_cols;
    }
  }

  // (Members are copied to locals first: the vector stores may alias anything, and a member reloaded after each
  // store, with its divisions, measured 1.5× slower for FP8.)
  void panel_chunk(int64_t c, uint16_t* panel) const {
    const int64_t k = c * kChunk, rows = prows, K = this->K, N = this->N, base = pe * N;
    int64_t rr[kPanelRows];   // the rows' rows in the stack
    for (int64_t i = 0; i < rows; ++i) rr[i] = base + rn[i];
    uint16_t* out = panel + c * rows * kChunk;
    if (kind == kInt8) {
      const int8_t* q = reinterpret_cast<const int8_t*>(w) + k;
      const float* sc = static_cast<const float*>(scale);
      for (int64_t i = 0; i < rows; ++i) {
        const __m512 s = _mm512_set1_ps(sc[rr[i]]);
        const int8_t* qi = q + rr[i] * K;
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qi))));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qi + 16))));
        store_bf16x32(out + i * kChunk, _mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s));
      }
    } else if (kind == kInt4) {
      const uint8_t* pk = w + k / 2;
      const uint16_t* g = static_cast<const uint16_t*>(scale) + (pe * (K / group) + k / group) * N * 2;
      const __m512 mid = _mm512_set1_ps(8.f);
      for (int64_t i = 0; i < rows; ++i) {
        const uint16_t* gi = g + (rr[i] - base) * 2;   // (scale, zero) of this row's group
        const __m512 s = _mm512_set1_ps(bf16_to_float(gi[0])), z = _mm512_set1_ps(bf16_to_float(gi[1]));
        // 16 bytes = 32 codes: byte j holds column 2j (low nibble) and 2j+1 (high)
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pk + rr[i] * (K / 2))));
        const __m256i codes = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi16(0x0F)),
                                              _mm256_slli_epi16(_mm256_srli_epi16(b, 4), 8));
        const __m512 lo = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(codes))), mid);
        const __m512 hi = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(codes, 1))), mid);
        store_bf16x32(out + i * kChunk, _mm512_add_ps(_mm512_mul_ps(lo, s), z), _mm512_add_ps(_mm512_mul_ps(hi, s), z));
      }
    } else {   // kFp8: (e4m3 · 2⁻¹²⁰) · 2⁶⁰ · 2⁶⁰ is the e4m3 value exactly; one rounding in the product with the scale
      const uint8_t* q = w + k;
      const int64_t kb = k / bi, kb2 = (k + 16) / bi;
      const float* srows[kPanelRows];
      std::copy(srow, srow + rows, srows);
      const __m512 up = _mm512_set1_ps(kHalfExp);
      for (int64_t i = 0; i < rows; ++i) {
        const __m512 s = _mm512_set1_ps(srows[i][kb]);
        const __m512 s2 = _mm512_set1_ps(srows[i][kb2]);
        const __m512 lo = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(cvt16(q + rr[i] * K), up), up), s);
        const __m512 hi = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(cvt16(q + rr[i] * K + 16), up), up), s2);
        store_bf16x32(out + i * kChunk, lo, hi);
      }
    }
  }
};

// What happens to the fp32 sums on their way out.
struct Epilogue {
  int64_t ldy;               // output row stride
  bool swiglu;               // an item's two row tiles are gate and up rows of the same 16 output columns: silu(g)·u
  const float* row_scale;    // output row p times row_scale[p], or null
  const int64_t* dst;        // non-null: row p is added to output row dst[p] (fp32; each column has one writer)
};

// silu(g)·u as PyTorch's bf16 ops compute it after a bf16 GEMM: g and u rounded to bf16, silu in fp32 (g / (1 +
// e^-g)) rounded to bf16, the product rounded by the caller
inline __m512 round_bf16(__m512 f) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_low(f), 16)); }
inline __m512 swiglu16(__m512 g, __m512 u) {
  g = round_bf16(g);
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));   // (e^-g overflows to inf for g < -88: silu -0)
  return _mm512_mul_ps(round_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e))), round_bf16(u));
}

// Output rows row..row+count-1, 16 columns from y: tile t (t[n][m]) transposed, or silu(t)·u with u the up rows'
// tile, times the row scales; fp32, or rounded to bf16 (nearest even)
template <typename Out>
inline void store_tile(const float (*t)[kTileRows], const float (*u)[kTileRows], Out* y, int64_t row, int64_t count,
                       const Epilogue& ep) {
  __m512 r[16], col[16], ucol[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(t[i]);
  transpose16(r, col);
  if (u != nullptr) {
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(u[i]);
    transpose16(r, ucol);
  }
  for (int64_t m = 0; m < count; ++m) {
    __m512 v = u != nullptr ? swiglu16(col[m], ucol[m]) : col[m];
    if (ep.row_scale != nullptr) v = _mm512_mul_ps(v, _mm512_set1_ps(ep.row_scale[row + m]));
    Out* out = y + (ep.dst != nullptr ? ep.dst[row + m] : row + m) * ep.ldy;
    if constexpr (sizeof(Out) == 4) _mm512_storeu_ps(out, ep.dst != nullptr ? _mm512_add_ps(_mm512_loadu_ps(out), v) : v);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// One work item: 16 or 32 rows of W (one or two row tiles) against all activation rows of its expert.
struct Item {
  const uint16_t* a[2];          // A tiles: chunk c of row tile j at a[j] + c·cstep, rows lda bytes apart
  int64_t cstep, lda;
  const uint16_t* xp;            // the expert's packed activations (B tiles)
  int64_t chunks, col, row0, mrows;   // output columns col.., rows row0..row0+mrows-1
  const char* pf[2];             // the next item's weight rows (each tile's 16 rows contiguous), fetched into L2
  int64_t pf_lines;              //   during the first pass: pf_lines cache lines from each (or null)
  const Weights* build;          // non-null: the first pass writes the panel (`a`) two chunks ahead of its tiles
  uint16_t* panel;
};

// Accumulate row tiles 0..NT-1 of the item against activation tiles mt0..mt0+MT-1 of the expert, then store the
// results through the epilogue. Building the panel inside the loop lets its vector work overlap the tile products.
template <int NT, int MT, typename Out>
void block(const Item& it, int64_t mt0, Out* y, bool first, const Epilogue& ep) {
  const int64_t chunks = it.chunks, lines = (it.pf[1] != nullptr ? 2 : 1) * it.pf_lines;
  const int64_t per = (lines + chunks - 1) / chunks;
  const bool pf = first && it.pf[0] != nullptr;
  const Weights* build = first ? it.build : nullptr;
  _tile_zero(0);
  if (MT == 2) _tile_zero(1);
  if (NT == 2) _tile_zero(2);
  if (NT == 2 && MT == 2) _tile_zero(3);
  const uint16_t* b0 = it.xp + mt0 * chunks * 512;
  const uint16_t* b1 = b0 + chunks * 512;
  if (build != nullptr)
    for (int64_t c = 0; c < std::min<int64_t>(2, chunks); ++c) build->panel_chunk(c, it.panel);
  for (int64_t c = 0; c < chunks; ++c) {
    const uint16_t* ac = it.a[0] + c * it.cstep;
    if (pf) {   // lines [lo, hi) of the next item's first stretch, then of its second
      const int64_t lo = c * per, hi = std::min(lines, lo + per), split = it.pf_lines;
      for (int64_t j = lo; j < std::min(hi, split); ++j) _mm_prefetch(it.pf[0] + j * 64, _MM_HINT_T2);
      for (int64_t j = std::max(lo, split); j < hi; ++j) _mm_prefetch(it.pf[1] + (j - split) * 64, _MM_HINT_T2);
    }
    _tile_loadd(4, ac, it.lda);
    _tile_loadd(6, b0 + c * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (MT == 2) {
      _tile_loadd(7, b1 + c * 512, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (NT == 2) {
      _tile_loadd(5, it.a[1] + c * it.cstep, it.lda);
      _tile_dpbf16ps(2, 5, 6);
      if (MT == 2) _tile_dpbf16ps(3, 5, 7);
    }
    if (build != nullptr && c + 2 < chunks) build->panel_chunk(c + 2, it.panel);
  }
  alignas(64) float t[4][kTileRows][kTileRows];   // t[2·nt + mt][n][m]
  _tile_stored(0, t[0], 64);
  if (MT == 2) _tile_stored(1, t[1], 64);
  if (NT == 2) _tile_stored(2, t[2], 64);
  if (NT == 2 && MT == 2) _tile_stored(3, t[3], 64);
  for (int mt = 0; mt < MT; ++mt) {
    const int64_t row = it.row0 + (mt0 + mt) * kTileRows;
    const int64_t count = std::min<int64_t>(kTileRows, it.mrows - (mt0 + mt) * kTileRows);
    if (ep.swiglu) store_tile(t[mt], t[2 + mt], y + it.col, row, count, ep);
    else
      for (int nt = 0; nt < NT; ++nt) store_tile(t[2 * nt + mt], nullptr, y + it.col + nt * kTileRows, row, count, ep);
  }
}

#endif

}  // namespace

bool init() {
#ifdef DSV3_AMX
  return amx_permission();
#else
  return false;
#endif
}

torch::Tensor expert_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor ids, int64_t kind,
                          int64_t group, int64_t bo, int64_t bi, int64_t parts, bool bf16_out, torch::Tensor src,
                          bool swiglu, torch::Tensor row_scale, torch::Tensor dst, int64_t dst_rows,
                          torch::Tensor w_up) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bf16 [rows, K]");
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous(), "w must be a contiguous [E, N, K] stack");
  TORCH_CHECK(kind >= kBf16 && kind <= kFp8, "kind must be 0 (bf16), 1 (int8), 2 (int4) or 3 (fp8)");
  const bool split_up = w_up.numel() > 0;
  TORCH_CHECK(!split_up || (swiglu && kind == kBf16 && w_up.scalar_type() == at::kBFloat16 && w_up.is_contiguous() &&
                            w_up.sizes() == w.sizes()),
              "w_up (the up rows apart) needs swiglu, bf16 weights and a contiguous stack shaped like w");
  const int64_t P = ids.size(0), K = x.size(1), E = w.size(0), N = split_up ? 2 * w.size(1) : w.size(1);
  TORCH_CHECK(w.size(2) == (kind == kInt4 ? K / 2 : K), "w's last dimension does not match x's K");
  TORCH_CHECK(K % kChunk == 0 && N % kTileRows == 0, "K must be a multiple of 32 and N of 16");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "ids must be int64 [P]");
  const bool gather = src.numel() > 0;
  TORCH_CHECK(gather ? src.dim() == 1 && src.size(0) == P && src.scalar_type() == at::kLong : x.size(0) == P,
              "src must be int64 [P] (row p reads x[src[p]]), or empty with x [P, K]");
  if (gather) {
    TORCH_CHECK(P == 0 || (src.min().item<int64_t>() >= 0 && src.max().item<int64_t>() < x.size(0)),
                "src holds a row outside x");
  }
  TORCH_CHECK(!swiglu || N % (2 * kTileRows) == 0, "swiglu needs N = 2·I with I a multiple of 16");
  TORCH_CHECK(row_scale.numel() == 0 || (row_scale.dim() == 1 && row_scale.size(0) == P && row_scale.scalar_type() == at::kFloat),
              "row_scale must be fp32 [P], or empty");
  if (kind == kInt4) TORCH_CHECK(group > 0 && group % kChunk == 0 && K % group == 0, "int4 group must divide K, multiple of 32");
  if (kind == kFp8)
    TORCH_CHECK(bo > 0 && bi > 0 && bi % 16 == 0 && parts > 0 && N % parts == 0 && scale.dim() == 3,
                "FP8 blocks: bo > 0, bi a multiple of 16, parts dividing N, scale [E, rows, cols]");
  const bool scatter = dst.numel() > 0;
  if (scatter) {
    TORCH_CHECK(dst.dim() == 1 && dst.size(0) == P && dst.scalar_type() == at::kLong && !swiglu && !bf16_out,
                "dst must be int64 [P] (row p added to output row dst[p]; fp32 output, no swiglu)");
    TORCH_CHECK(P == 0 || (dst.min().item<int64_t>() >= 0 && dst.max().item<int64_t>() < dst_rows),
                "dst holds a row outside [0, dst_rows)");
  }
  const int64_t out_cols = swiglu ? N / 2 : N;
  auto y = scatter ? torch::zeros({dst_rows, N}, x.options().dtype(at::kFloat))
                   : torch::empty({P, out_cols}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
#ifdef DSV3_AMX
  auto xc = x.contiguous();
  auto sc = scale.contiguous();
  auto srcc = src.contiguous();
  auto rsc = row_scale.contiguous();
  auto dstc = dst.contiguous();
  const int64_t* srcp = gather ? srcc.data_ptr<int64_t>() : nullptr;
  const Epilogue ep{out_cols, swiglu, row_scale.numel() > 0 ? rsc.data_ptr<float>() : nullptr,
                    scatter ? dstc.data_ptr<int64_t>() : nullptr};
  const std::vector<int64_t> runs = expert_runs(ids, E);   // (expert, first row, rows)
  const int64_t R = static_cast<int64_t>(runs.size()) / 3, chunks = K / kChunk;
  // activations repacked per expert: [m-tile][chunk][16 kk][16 m] 32-bit pairs
  std::vector<int64_t> xoff(R + 1, 0);
  for (int64_t r = 0; r < R; ++r) xoff[r + 1] = xoff[r] + (runs[3 * r + 2] + kTileRows - 1) / kTileRows * chunks * 256;
  std::unique_ptr<uint32_t[]> xpack(new uint32_t[xoff[R]]);   // (every element is written below)
  const uint32_t* xs = reinterpret_cast<const uint32_t*>(xc.data_ptr<at::BFloat16>());
  const int64_t half = K / 2;
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t first = runs[3 * r + 1], rows = runs[3 * r + 2];
      uint32_t* dst = xpack.get() + xoff[r];
      const int64_t mts = (rows + kTileRows - 1) / kTileRows;
      for (int64_t mt = 0; mt < mts; ++mt) {
        const int64_t valid = std::min<int64_t>(kTileRows, rows - mt * kTileRows);
        const uint32_t* xr[kTileRows];   // the tile's activation rows (gathered through src)
        for (int64_t m = 0; m < valid; ++m) {
          const int64_t p = first + mt * kTileRows + m;
          xr[m] = xs + (gather ? srcp[p] : p) * half;
        }
        for (int64_t c = 0; c < chunks; ++c) {   // the 16 rows' pairs of chunk c, transposed: [kk][m]
          __m512 in[16], out[16];
          for (int64_t m = 0; m < kTileRows; ++m)
            in[m] = m < valid ? _mm512_loadu_ps(reinterpret_cast<const float*>(xr[m] + c * 16)) : _mm512_setzero_ps();
          transpose16(in, out);
          float* d = reinterpret_cast<float*>(dst + (mt * chunks + c) * 256);
          for (int kk = 0; kk < 16; ++kk) _mm512_storeu_ps(d + kk * kTileRows, out[kk]);
        }
      }
    }
  });
  // work items (run, first row n_lo, second tile's first row n_hi, rows, output column): 32 consecutive rows of W,
  // the last one of a run 16 when N % 32 == 16; with swiglu 16 gate rows j.. and their 16 up rows I + j..
  // Each thread takes a contiguous range of items of about equal cost (weights + row tiles), so it knows its next
  // item; when rows are added into shared output rows (dst) the ranges are column ranges instead, all experts each,
  // so that no two threads write the same output value.
  std::vector<int64_t> items;
  auto add_items = [&](int64_t r, int64_t c0, int64_t c1) {
    if (swiglu)
      for (int64_t j = c0; j < c1; j += kTileRows) items.insert(items.end(), {r, j, N / 2 + j, kPanelRows, j});
    else
      for (int64_t n0 = c0; n0 < c1; n0 += kPanelRows)
        items.insert(items.end(), {r, n0, n0 + kTileRows, std::min<int64_t>(kPanelRows, c1 - n0), n0});
  };
  const int64_t want = std::max<int64_t>(1, at::get_num_threads());
  int64_t threads = 1;
  std::vector<int64_t> bounds;
  if (scatter) {
    threads = std::max<int64_t>(1, std::min<int64_t>(want, (N + kPanelRows - 1) / kPanelRows));
    for (int64_t t = 0; t < threads; ++t) {
      bounds.push_back(static_cast<int64_t>(items.size()) / 5);
      const int64_t c0 = (N * t / threads + kPanelRows - 1) / kPanelRows * kPanelRows;
      const int64_t c1 = t + 1 == threads ? N : (N * (t + 1) / threads + kPanelRows - 1) / kPanelRows * kPanelRows;
      for (int64_t r = 0; r < R; ++r) add_items(r, c0, c1);
    }
    bounds.push_back(static_cast<int64_t>(items.size()) / 5);
  } else {
    for (int64_t r = 0; r < R; ++r) add_items(r, 0, swiglu ? N / 2 : N);
    const int64_t I = static_cast<int64_t>(items.size()) / 5;
    threads = std::max<int64_t>(1, std::min<int64_t>(want, I));
    bounds.assign(threads + 1, I);
    auto cost = [&](int64_t i) { return 4 + (runs[3 * items[5 * i] + 2] + kTileRows - 1) / kTileRows; };
    int64_t total = 0, acc = 0, t = 1;
    for (int64_t i = 0; i < I; ++i) total += cost(i);
    bounds[0] = 0;
    for (int64_t i = 0; i < I && t < threads; ++i) {
      acc += cost(i);
      if (acc * threads >= total * t) bounds[t++] = i + 1;
    }
  }
  const uint16_t* wb = kind == kBf16 ? static_cast<const uint16_t*>(w.data_ptr()) : nullptr;
  const uint16_t* wu = split_up ? static_cast<const uint16_t*>(w_up.data_ptr()) : nullptr;
  auto bf16_row = [&](int64_t e, int64_t n) -> const uint16_t* {   // row n of expert e's N rows (up rows: w_up)
    const int64_t I = N / 2;
    if (split_up) return n < I ? wb + (e * I + n) * K : wu + (e * I + n - I) * K;
    return wb + (e * N + n) * K;
  };
  const Weights wt{kind, N, K, group, bo, bi, parts, kind == kFp8 ? scale.size(1) : 0, kind == kFp8 ? scale.size(2) : 0,
                   static_cast<const uint8_t*>(w.data_ptr()), sc.data_ptr()};
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    configure_tiles();
    std::vector<uint16_t> panel(kind == kBf16 ? 0 : kPanelRows * K);   // (bf16 is read in place)
    Weights tw = wt;   // this thread's panel state
    for (int64_t i = bounds[t0]; i < bounds[t1]; ++i) {
      const int64_t* item = items.data() + 5 * i;
      const int64_t r = item[0], n_lo = item[1], n_hi = item[2], nrows = item[3];
      const int64_t e = runs[3 * r], first = runs[3 * r + 1], rows = runs[3 * r + 2];
      const int64_t mts = (rows + kTileRows - 1) / kTileRows;
      // bf16 rows are read in place (strided tiles), other kinds from their dequantised panel (tile order)
      const bool direct = kind == kBf16;
      if (!direct) tw.begin_panel(e, n_lo, n_hi, nrows);   // (its chunks are written during the first pass)
      // the next item's weights are prefetched for a panel (its strided rows are read as vector loads); bf16 tiles
      // read in place stream well without (measured: gate_up 40 vs 44 ms, down 23 vs 26 on the bench shape)
      const int64_t* next = i + 1 < bounds[t1] ? item + 5 : nullptr;
      const int64_t ne = next != nullptr ? runs[3 * next[0]] : 0;
      const Item it{{direct ? bf16_row(e, n_lo) : panel.data(),
                     direct ? bf16_row(e, n_hi) : panel.data() + kTileRows * kChunk},
                    direct ? kChunk : nrows * kChunk, direct ? 2 * K : 64,
                    reinterpret_cast<const uint16_t*>(xpack.get() + xoff[r]), chunks, item[4], first, rows,
                    {next != nullptr && !direct ? wt.row_at(ne, next[1]) : nullptr,
                     next != nullptr && !direct && next[3] > kTileRows ? wt.row_at(ne, next[2]) : nullptr},
                    kTileRows * wt.row_bytes() / 64, direct ? nullptr : &tw, panel.data()};
      auto blocks = [&](auto* out) {
        for (int64_t mt = 0; mt < mts; mt += 2) {
          const bool two_m = mt + 1 < mts;
          if (nrows == kPanelRows && two_m) block<2, 2>(it, mt, out, mt == 0, ep);
          else if (nrows == kPanelRows) block<2, 1>(it, mt, out, mt == 0, ep);
          else if (two_m) block<1, 2>(it, mt, out, mt == 0, ep);
          else block<1, 1>(it, mt, out, mt == 0, ep);
        }
      };
      if (bf16_out) blocks(reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
      else blocks(y.data_ptr<float>());
    }
    _tile_release();
  });
#else
  TORCH_CHECK(false, "dsv3_cpu_amx was built without AMX (init() returned false; the caller should not get here)");
#endif
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("init", &init, "whether AMX was compiled in and Linux granted this process the tile registers");
  m.def("expert_gemm", &expert_gemm,
        "y[p] = x[src[p]] @ W[ids[p]]^T for sorted ids, AMX bf16 tiles (fp32 or bf16 out; optional SwiGLU and row scales)");
}
