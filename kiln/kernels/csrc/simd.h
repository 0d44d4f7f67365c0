// AVX-512 helpers shared by kiln's CPU ops: masks for vector tails, fp32 lanes out of fp32/bf16/fp16
// memory and back (round to nearest even, as c10's conversions), and exp.
// KILN_AVX512 is defined when the compiler targets AVX-512 F/BW/VL; KILN_AVX2 when it targets AVX2 and FMA
// but not those (Zen 2/3, Intel client cores since Alder Lake): 8-lane versions of the helpers; callers keep
// a scalar path otherwise.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KILN_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KILN_AVX2 1
#include <immintrin.h>
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// a / b rounded once, as torch divides: the ops' -ffast-math build would otherwise multiply by a reciprocal
// (w8a8_linear.cpp's row scales, decoder_layer.cpp's KV quantization match their ATen steps bit for bit).
inline float divide(float a, float b) {
  asm volatile("" : "+x"(a), "+x"(b));
  return a / b;
}

#ifdef KILN_AVX512
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// exp(x): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a degree-7 Taylor polynomial (relative
// error ~5e-9) scaled by 2^n. -inf (and x below -104) gives 0; large x overflows to +inf.
inline __m512 exp512(__m512 x) {
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), clamped);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __mmask16 dead = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ);
  return _mm512_maskz_mov_ps(~dead, _mm512_scalef_ps(p, n));
}

// Up to 16 elements as fp32 lanes: bf16 widened by a shift, fp16 by vcvtph2ps.
inline __m512 load_ps(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_ps(const c10::BFloat16* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load_ps(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// fp32 lanes rounded to bf16 (nearest even; NaN stays NaN), as 16 bf16 values.
inline __m256i to_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i out = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(out, 16));
}

inline void store_ps(float* p, __mmask16 m, __m512 x) { _mm512_mask_storeu_ps(p, m, x); }
inline void store_ps(c10::BFloat16* p, __mmask16 m, __m512 x) { _mm256_mask_storeu_epi16(p, m, to_bf16(x)); }

// x rounded to T and widened back (a no-op for fp32): where the torch code rounds an intermediate to T.
inline __m512 round_ps(__m512 x, const float*) { return x; }
inline __m512 round_ps(__m512 x, const c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(x)), 16));
}
#endif

#ifdef KILN_AVX2
// exp(x) as exp512: Cody-Waite reduction and a degree-7 polynomial, scaled by 2^n built in the exponent
// field. x below -87.3 (exp under fp32's smallest normal, 1.2e-38) gives 0, as -inf does.
inline __m256 exp256(__m256 x) {
  const __m256 clamped = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693145751953125f), clamped);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n for n in [-126, 127]: (n + 127) << 23 as float bits (exp(88.7) and above overflow to +inf below)
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 scaled = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  const __m256 big = _mm256_cmp_ps(x, _mm256_set1_ps(88.72f), _CMP_GT_OQ);
  const __m256 dead = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  return _mm256_andnot_ps(dead, _mm256_blendv_ps(scaled, _mm256_set1_ps(std::numeric_limits<float>::infinity()), big));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Lane k of the result: the sum of p[k]'s 8 lanes (a transposing hadd tree).
inline __m256 sum8(const __m256 (&p)[8]) {
  const __m256 t0 = _mm256_hadd_ps(p[0], p[1]), t1 = _mm256_hadd_ps(p[2], p[3]);
  const __m256 t2 = _mm256_hadd_ps(p[4], p[5]), t3 = _mm256_hadd_ps(p[6], p[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// 8 elements as fp32 lanes: bf16 widened by a shift, fp16 by vcvtph2ps.
inline __m256 load8_ps(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_ps(const c10::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline __m256 load8_ps(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// fp32 lanes rounded to bf16 (nearest even; NaN stays NaN) as 32-bit lanes holding the bf16 in the top half.
inline __m256i round8_bits(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan));
}

// x rounded to T and widened back (a no-op for fp32), as round_ps.
inline __m256 round8_ps(__m256 x, const float*) { return x; }
inline __m256 round8_ps(__m256 x, const c10::BFloat16*) {
  return _mm256_castsi256_ps(_mm256_and_si256(round8_bits(x), _mm256_set1_epi32(int(0xFFFF0000u))));
}

inline void store8_ps(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
inline void store8_ps(c10::BFloat16* p, __m256 x) {
  const __m256i high = _mm256_srli_epi32(round8_bits(x), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#endif

// max |x[k]| over k < n, widened to fp32 (AVX-512 over 16 lanes, else a scalar loop): w8a8_linear.cpp's row
// scales and quant_linear.cpp's fixed-point rows. A NaN may be dropped (vmaxps keeps its second operand), so
// callers that must see one check isfinite themselves.
template <typename T>
inline float abs_max(const T* x, int64_t n) {
  float amax = 0.0f;
  int64_t k = 0;
#ifdef KILN_AVX512
  __m512 top = _mm512_setzero_ps();
  for (; k < n; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(load_ps(x + k, tail_mask(n - k))));
  amax = _mm512_reduce_max_ps(top);
#endif
  for (; k < n; ++k) amax = std::max(amax, std::abs(static_cast<float>(x[k])));
  return amax;
}

}  // namespace
