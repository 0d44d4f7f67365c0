// Vector helpers of paged_attention.cpp: fp32 lanes out of fp32/bf16/fp16 rows, dot products (one, or 16
// keys at a time), the online-softmax exp and the weighted row sum, fp32 <-> pool dtype conversion.
// AVX-512 (F, BW, VL; simd.h) when the compiler targets it, else AVX2 + FMA (8 lanes, scalar tails), else
// scalar loops.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace {

#ifdef KILN_AVX512
// Lane k of the result: the sum of p[k]'s 16 lanes. A transposing add tree (45 shuffles/adds) instead of
// 16 horizontal reductions.
inline __m512 sum16(const __m512 (&p)[16]) {
  __m512 t[8], u[4], v[2];
  for (int i = 0; i < 8; ++i)  // 128-bit lane positions (a, b, a, b) of keys 2i, 2i + 1
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]),
                         _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // position q of each 128-bit lane: key 4i + q
    const __m512d c = _mm512_castps_pd(t[2 * i]), e = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, e)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(c, e)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: keys 8i..8i+3 (twice), 8i+4..8i+7 (twice)
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
}
#endif

template <typename R>
inline float dot(const float* a, const R* b, int64_t n) {
#ifdef KILN_AVX512
  __m512 sum = _mm512_setzero_ps();
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = tail_mask(n - d);
    sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), load_ps(b + d, m), sum);
  }
  return _mm512_reduce_add_ps(sum);
#elif defined(KILN_AVX2)
  __m256 sum = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8_ps(b + d), sum);
  float total = hsum8(sum);
  for (; d < n; ++d) total += a[d] * static_cast<float>(b[d]);
  return total;
#else
  float sum = 0.0f;
  for (int64_t d = 0; d < n; ++d) sum += a[d] * static_cast<float>(b[d]);
  return sum;
#endif
}

// out[k] = dot(q, rows[k], n) for k in [0, count). With AVX-512, 16 keys at a time, summed by sum16.
template <typename R>
inline void dots(const float* q, const R* const* rows, int64_t count, int64_t n, float* out) {
#ifdef KILN_AVX512
  for (int64_t k0 = 0; k0 < count; k0 += 16) {
    const int64_t keys = std::min<int64_t>(16, count - k0);
    __m512 p[16];
    for (int64_t i = 0; i < 16; ++i) p[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 16) {
      const __mmask16 m = tail_mask(n - d);
      const __m512 qd = _mm512_maskz_loadu_ps(m, q + d);
      for (int64_t i = 0; i < keys; ++i) p[i] = _mm512_fmadd_ps(qd, load_ps(rows[k0 + i] + d, m), p[i]);
    }
    _mm512_mask_storeu_ps(out + k0, tail_mask(keys), sum16(p));  // lane k: key k0 + k
  }
#elif defined(KILN_AVX2)
  // 8 keys at a time, summed by sum8; a key's sum does not depend on the others in its group.
  const int64_t n8 = n / 8 * 8;
  for (int64_t k0 = 0; k0 < count; k0 += 8) {
    const int64_t keys = std::min<int64_t>(8, count - k0);
    __m256 p[8];
    for (int64_t i = 0; i < 8; ++i) p[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < n8; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      for (int64_t i = 0; i < keys; ++i) p[i] = _mm256_fmadd_ps(qd, load8_ps(rows[k0 + i] + d), p[i]);
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, sum8(p));
    for (int64_t i = 0; i < keys; ++i) {
      for (int64_t d = n8; d < n; ++d) sums[i] += q[d] * static_cast<float>(rows[k0 + i][d]);
      out[k0 + i] = sums[i];
    }
  }
#else
  for (int64_t k = 0; k < count; ++k) out[k] = dot(q, rows[k], n);
#endif
}

// acc (n,) = acc * correction + sum_k weights[k] * rows[k] (n,), for k in [0, count): one pass over acc.
template <typename R>
inline void accumulate(float* acc, float correction, const float* weights, const R* const* rows,
                       int64_t count, int64_t n) {
#ifdef KILN_AVX512
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = tail_mask(n - d);
    __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, acc + d), _mm512_set1_ps(correction));
    for (int64_t k = 0; k < count; ++k)
      a = _mm512_fmadd_ps(_mm512_set1_ps(weights[k]), load_ps(rows[k] + d, m), a);
    _mm512_mask_storeu_ps(acc + d, m, a);
  }
#elif defined(KILN_AVX2)
  // 64 values of acc in 8 registers while every row passes: each row is read front to back (the key-outer
  // order reads the tile's rows 32 bytes at a time, rows a pool stride apart, at ~half the bandwidth).
  int64_t d = 0;
  const __m256 c = _mm256_set1_ps(correction);
  for (; d + 64 <= n; d += 64) {
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_mul_ps(_mm256_loadu_ps(acc + d + 8 * j), c);
    for (int64_t k = 0; k < count; ++k) {
      const __m256 weight = _mm256_set1_ps(weights[k]);
      for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(weight, load8_ps(rows[k] + d + 8 * j), a[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(acc + d + 8 * j, a[j]);
  }
  for (; d + 8 <= n; d += 8) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + d), c);
    for (int64_t k = 0; k < count; ++k)
      a = _mm256_fmadd_ps(_mm256_set1_ps(weights[k]), load8_ps(rows[k] + d), a);
    _mm256_storeu_ps(acc + d, a);
  }
  for (; d < n; ++d) {
    float a = acc[d] * correction;
    for (int64_t k = 0; k < count; ++k) a += weights[k] * static_cast<float>(rows[k][d]);
    acc[d] = a;
  }
#else
  for (int64_t d = 0; d < n; ++d) {
    float a = acc[d] * correction;
    for (int64_t k = 0; k < count; ++k) a += weights[k] * static_cast<float>(rows[k][d]);
    acc[d] = a;
  }
#endif
}

// s[k] = exp(s[k] - max) in place for k in [0, n); returns their sum.
inline float exp_and_sum(float* s, int64_t n, float max) {
#ifdef KILN_AVX512
  __m512 sum = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + k), _mm512_set1_ps(max)));
    _mm512_mask_storeu_ps(s + k, m, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
  }
  return _mm512_reduce_add_ps(sum);
#elif defined(KILN_AVX2)
  __m256 sum = _mm256_setzero_ps();
  const __m256 top = _mm256_set1_ps(max);
  for (int64_t k = 0; k < n; k += 8) {
    const int64_t count = std::min<int64_t>(8, n - k);
    alignas(32) float tail[8];
    float* at = s + k;
    if (count < 8) {  // padded with -inf: exp gives 0
      std::fill(tail, tail + 8, kNegInf);
      std::copy(s + k, s + n, tail);
      at = tail;
    }
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(at), top));
    _mm256_storeu_ps(at, e);
    sum = _mm256_add_ps(sum, e);
    if (count < 8) std::copy(tail, tail + count, s + k);
  }
  return hsum8(sum);
#else
  float sum = 0.0f;
  for (int64_t k = 0; k < n; ++k) sum += (s[k] = std::exp(s[k] - max));
  return sum;
#endif
}

inline void to_float(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {  // bf16/fp16
#ifdef KILN_AVX512
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = tail_mask(n - d);
    _mm512_mask_storeu_ps(dst + d, m, load_ps(src + d, m));
  }
#elif defined(KILN_AVX2)
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(dst + d, load8_ps(src + d));
  for (; d < n; ++d) dst[d] = static_cast<float>(src[d]);
#else
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
#endif
}

// dst = src * factor, rounded to nearest even.
inline void from_float(const float* src, float factor, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = src[d] * factor;
}

inline void from_float(const float* src, float factor, c10::BFloat16* dst, int64_t n) {
#if defined(KILN_AVX512) && defined(__AVX512BF16__)
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = tail_mask(n - d);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + d), _mm512_set1_ps(factor));
    _mm256_mask_storeu_epi16(dst + d, m, (__m256i)_mm512_cvtneps_pbh(x));
  }
#else
  for (int64_t d = 0; d < n; ++d) dst[d] = c10::BFloat16(src[d] * factor);
#endif
}

inline void from_float(const float* src, float factor, c10::Half* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = c10::Half(src[d] * factor);
}

// dst (n,) = (codes - zero) * scale: one int8 KV row (kv_quant.py) in fp32, rounded as torch rounds it.
inline void dequantize_int8(const uint8_t* codes, float scale, float zero, float* dst, int64_t n) {
#ifdef KILN_AVX512
  const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero);
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = tail_mask(n - d);
    const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, codes + d)));
    _mm512_mask_storeu_ps(dst + d, m, _mm512_mul_ps(_mm512_sub_ps(x, z), s));
  }
#elif defined(KILN_AVX2)
  const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + d))));
    _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_sub_ps(x, z), s));
  }
  for (; d < n; ++d) dst[d] = (float(codes[d]) - zero) * scale;
#else
  for (int64_t d = 0; d < n; ++d) dst[d] = (float(codes[d]) - zero) * scale;
#endif
}

// One int4 KV row of `half` bytes: the low nibbles are values [0, half), the high ones [half, 2 * half).
inline void dequantize_int4(const uint8_t* codes, float scale, float zero, float* dst, int64_t half) {
#ifdef KILN_AVX512
  const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero);
  const __m512i low_bits = _mm512_set1_epi32(15);
  for (int64_t d = 0; d < half; d += 16) {
    const __mmask16 m = tail_mask(half - d);
    const __m512i x = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, codes + d));
    const __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(x, low_bits));
    const __m512 high = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 4));
    _mm512_mask_storeu_ps(dst + d, m, _mm512_mul_ps(_mm512_sub_ps(low, z), s));
    _mm512_mask_storeu_ps(dst + half + d, m, _mm512_mul_ps(_mm512_sub_ps(high, z), s));
  }
#else
  for (int64_t d = 0; d < half; ++d) {
    dst[d] = (float(codes[d] & 15) - zero) * scale;
    dst[half + d] = (float(codes[d] >> 4) - zero) * scale;
  }
#endif
}

#if defined(KILN_AVX512) && defined(__AVX512BF16__)
#define KILN_BF16_PAIRS 1
// bf16 rows read as pairs of values per 32-bit lane, never widened one value at a time: an MHA decode of a
// bf16 pool reads each K/V row once, and widening it (load, vpmovzxwd, shift per 16 values) cost more
// than the arithmetic.

inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1); }

// out[k] = sum_d q[d] * rows[k][d] for k in [0, count), q and rows bf16: vdpbf16ps multiplies bf16 pairs
// exactly and adds them into fp32 lanes; 16 keys at a time, summed by sum16.
inline void dots_bf16(const c10::BFloat16* q, const c10::BFloat16* const* rows, int64_t count, int64_t n,
                      float* out) {
  for (int64_t k0 = 0; k0 < count; k0 += 16) {
    const int64_t keys = std::min<int64_t>(16, count - k0);
    __m512 p[16];
    for (int64_t i = 0; i < 16; ++i) p[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 32) {
      const __mmask32 m = tail_mask32(n - d);
      const __m512bh qd = (__m512bh)_mm512_maskz_loadu_epi16(m, q + d);
      for (int64_t i = 0; i < keys; ++i)
        p[i] = _mm512_dpbf16_ps(p[i], qd, (__m512bh)_mm512_maskz_loadu_epi16(m, rows[k0 + i] + d));
    }
    _mm512_mask_storeu_ps(out + k0, tail_mask(keys), sum16(p));
  }
}

// The "pairs" layout of an fp32 accumulator row: per 32 values of the row, the 16 even ones, then the 16
// odd ones (a bf16 pair's low half widens by a shift, its high half by a mask). `split_width(n)` floats.
inline int64_t split_width(int64_t n) { return (n + 31) / 32 * 32; }

// acc = acc * correction + sum_k weights[k] * rows[k], acc in the pairs layout, rows bf16 (n,).
inline void accumulate_bf16(float* acc, float correction, const float* weights,
                            const c10::BFloat16* const* rows, int64_t count, int64_t n) {
  const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  const __m512 scale = _mm512_set1_ps(correction);
  for (int64_t d = 0; d < n; d += 32) {
    const __mmask32 m = tail_mask32(n - d);
    __m512 even = _mm512_mul_ps(_mm512_loadu_ps(acc + d), scale);
    __m512 odd = _mm512_mul_ps(_mm512_loadu_ps(acc + d + 16), scale);
    for (int64_t k = 0; k < count; ++k) {
      const __m512i x = _mm512_maskz_loadu_epi16(m, rows[k] + d);
      const __m512 weight = _mm512_set1_ps(weights[k]);
      even = _mm512_fmadd_ps(weight, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), even);
      odd = _mm512_fmadd_ps(weight, _mm512_castsi512_ps(_mm512_and_si512(x, high)), odd);
    }
    _mm512_storeu_ps(acc + d, even);
    _mm512_storeu_ps(acc + d + 16, odd);
  }
}

// row[d] = value d of an accumulator in the pairs layout, d in [0, n).
inline void from_pairs(const float* acc, float* row, int64_t n) {
  for (int64_t d = 0; d < n; ++d) row[d] = acc[d / 32 * 32 + (d % 2) * 16 + d % 32 / 2];
}
#endif

}  // namespace
