// AMX tiles: the configuration every dsv3 AMX kernel uses (8 tiles of 16 rows × 64 bytes) and a 16×16 transpose of
// 32-bit values in AVX-512 registers. Shared by cpu_amx.cpp and cpu_attention.cpp (each its own extension; the JIT
// build's ninja tracks this header). DSV3_AMX is defined where the compiler targets AMX-TILE, AMX-BF16 and
// AVX512-BF16 (-march=native on such a CPU); a tile instruction faults unless Linux granted the process the tile
// registers (arch_prctl ARCH_REQ_XCOMP_PERM): `amx_permission()` asks.
#pragma once
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>

constexpr int64_t kTileRows = 16;   // rows of every tile; each row 64 bytes (32 bf16 or 16 fp32)

inline bool amx_permission() {   // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18)
#if defined(__AMX_TILE__)
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
  return false;
#endif
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define DSV3_AMX 1

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void configure_tiles() {   // tiles 0-7, each 16 rows × 64 bytes
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = kTileRows;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}


// col[j][i] = r[i][j] for 16 rows of 16 32-bit values: unpack pairs, then 64-bit pairs, then 128-bit lanes twice
inline void transpose16(const __m512 (&r)[16], __m512 (&col)[16]) {
  __m512 a[16], b[16];
  for (int i = 0; i < 8; ++i) {   // lane L of a[2i]: r2i[4L], r2i+1[4L], r2i[4L+1], r2i+1[4L+1]; a[2i+1]: 4L+2, 4L+3
    a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {   // lane L of b[4i+j]: column 4L+j of rows 4i..4i+3
    b[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[4 * i]), _mm512_castps_pd(a[4 * i + 2])));
    b[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[4 * i]), _mm512_castps_pd(a[4 * i + 2])));
    b[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[4 * i + 1]), _mm512_castps_pd(a[4 * i + 3])));
    b[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[4 * i + 1]), _mm512_castps_pd(a[4 * i + 3])));
  }
  for (int j = 0; j < 4; ++j) {   // gather lane L of b[j], b[4+j], b[8+j], b[12+j] into column 4L+j
    const __m512 c0 = _mm512_shuffle_f32x4(b[j], b[4 + j], 0x88), c1 = _mm512_shuffle_f32x4(b[j], b[4 + j], 0xDD);
    const __m512 d0 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0x88), d1 = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0xDD);
    col[j] = _mm512_shuffle_f32x4(c0, d0, 0x88);
    col[8 + j] = _mm512_shuffle_f32x4(c0, d0, 0xDD);
    col[4 + j] = _mm512_shuffle_f32x4(c1, d1, 0x88);
    col[12 + j] = _mm512_shuffle_f32x4(c1, d1, 0xDD);
  }
}

#endif
