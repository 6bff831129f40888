// e4m3 -> fp32 conversion in registers, shared by cpu_fp8.cpp (decode products) and cpu_amx.cpp (prefill
// panels); each is built as its own extension and the JIT build's ninja tracks this header.
#pragma once
#include <immintrin.h>
#include <cstdint>

#if defined(__AVX512F__)
// 16 e4m3 bytes -> 16 fp32 values × 2⁻¹²⁰: sign-extend to 32 bits, shift the 7 magnitude bits under the
// fp32 exponent's low 4 bits (<< 20) and keep sign | those 7 bits.
inline __m512 cvt16(const uint8_t* p) {
  __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(v, 20), _mm512_set1_epi32(static_cast<int>(0x87F00000u))));
}
inline __m512 cvt16_masked(const uint8_t* p, __mmask16 m) {
  __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p));
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(v, 20), _mm512_set1_epi32(static_cast<int>(0x87F00000u))));
}
inline void cvt32(const uint8_t* p, __m512& lo, __m512& hi) {
  lo = cvt16(p);
  hi = cvt16(p + 16);
}
#endif

// The converted weights are the e4m3 values × 2⁻¹²⁰; multiplying by 2⁶⁰ twice gives them back exactly (the
// decode kernels instead fold one 2⁶⁰ into the activations and one into the sums, so that neither x·s·2⁶⁰ can
// overflow nor the products reach fp32's subnormals).
constexpr float kHalfExp = 1152921504606846976.f;  // 2⁶⁰
