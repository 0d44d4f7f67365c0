// Rows of a quantized KV pool (int8 / int4, kiln/kernels/kv_quant.py's layout: codes, then an fp16 scale and
// a uint8 zero point a row) read in place, AVX-512 (16 lanes) or AVX2 + FMA (8), with each row's scale and zero
// point folded out of the inner loops:
//   score_j = scale_j * (q . (c_j - zero_j))          (the codes widened, the zero subtracted as integers)
//   acc    += (p_j * scale_j) * (c_j - zero_j)        (value rows the same way)
// so a code costs a widen, an integer subtract, a convert and an FMA. Paged attention's decode walk over a
// quantized pool (paged_attention_decode_quantized.h) and Loki's exact part (loki_attention.cpp) use them.
#pragma once

#include <algorithm>
#include <cstdint>

#include "paged_attention_simd.h"  // sum16 / sum8, tail_mask, KILN_AVX512 / KILN_AVX2

namespace {

#if defined(KILN_AVX512) || defined(KILN_AVX2)

// int8 rows of D codes, int4 rows of D / 2 bytes (low nibbles values [0, D / 2), high ones the rest): the
// walk takes D (int8) or D / 2 (int4) a multiple of the vector width, up to 256 values.
#if defined(KILN_AVX512)
constexpr int64_t kCodeLanes = 16;  // fp32 lanes, and keys a dots_codes call
#else
constexpr int64_t kCodeLanes = 8;
#endif
inline bool quantized_decode_supported(int64_t bits, int64_t head_dim) {
  return head_dim <= 256 && head_dim % (bits == 4 ? 2 * kCodeLanes : kCodeLanes) == 0;
}

#ifdef KILN_AVX512

// 16 codes at `codes` minus `zero`, as fp32.
inline __m512 codes8(const uint8_t* codes, __m512i zero) {
  const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(x, zero));
}

// 16 bytes of int4 codes at `codes` minus `zero`, as fp32: their low nibbles in *low, high ones in *high.
inline void codes4(const uint8_t* codes, __m512i zero, __m512* low, __m512* high) {
  const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  *low = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(x, _mm512_set1_epi32(15)), zero));
  *high = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(x, 4), zero));
}

// out[k] = q . (rows[k] - zeros[k]) for k < count (<= 16): D values a row, `bits` 8 or 4.
inline void dots_codes(const float* q, const uint8_t* const* rows, const int32_t* zeros, int64_t count, int64_t D,
                       int64_t bits, float* out) {
  __m512 p[16];
  for (int64_t i = 0; i < 16; ++i) p[i] = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; ++i) {
    const __m512i zero = _mm512_set1_epi32(zeros[i]);
    if (bits == 8) {
      for (int64_t d = 0; d < D; d += 16)
        p[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), codes8(rows[i] + d, zero), p[i]);
    } else {
      const int64_t half = D / 2;
      for (int64_t d = 0; d < half; d += 16) {
        __m512 low, high;
        codes4(rows[i] + d, zero, &low, &high);
        p[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), low, p[i]);
        p[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + half + d), high, p[i]);
      }
    }
  }
  _mm512_mask_storeu_ps(out, tail_mask(count), sum16(p));
}

// acc (D,) += weights[k] * (rows[k] - zeros[k]) for k < count.
inline void accumulate_codes(float* acc, const float* weights, const uint8_t* const* rows, const int32_t* zeros,
                             int64_t count, int64_t D, int64_t bits) {
  if (bits == 8) {
    for (int64_t d = 0; d < D; d += 16) {
      __m512 a = _mm512_loadu_ps(acc + d);
      for (int64_t k = 0; k < count; ++k)
        a = _mm512_fmadd_ps(_mm512_set1_ps(weights[k]), codes8(rows[k] + d, _mm512_set1_epi32(zeros[k])), a);
      _mm512_storeu_ps(acc + d, a);
    }
    return;
  }
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; d += 16) {
    __m512 low = _mm512_loadu_ps(acc + d), high = _mm512_loadu_ps(acc + half + d);
    for (int64_t k = 0; k < count; ++k) {
      __m512 row_low, row_high;
      codes4(rows[k] + d, _mm512_set1_epi32(zeros[k]), &row_low, &row_high);
      const __m512 weight = _mm512_set1_ps(weights[k]);
      low = _mm512_fmadd_ps(weight, row_low, low);
      high = _mm512_fmadd_ps(weight, row_high, high);
    }
    _mm512_storeu_ps(acc + d, low);
    _mm512_storeu_ps(acc + half + d, high);
  }
}

#else  // AVX2 + FMA: the same over 8 lanes and 8-key tiles
inline __m256 codes8(const uint8_t* codes, __m256i zero) {
  const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(x, zero));
}

inline void codes4(const uint8_t* codes, __m256i zero, __m256* low, __m256* high) {
  const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  *low = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(x, _mm256_set1_epi32(15)), zero));
  *high = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(x, 4), zero));
}

inline void dots_codes(const float* q, const uint8_t* const* rows, const int32_t* zeros, int64_t count, int64_t D,
                       int64_t bits, float* out) {
  __m256 p[8];
  for (int64_t i = 0; i < 8; ++i) p[i] = _mm256_setzero_ps();
  for (int64_t i = 0; i < count; ++i) {
    const __m256i zero = _mm256_set1_epi32(zeros[i]);
    if (bits == 8) {
      for (int64_t d = 0; d < D; d += 8)
        p[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), codes8(rows[i] + d, zero), p[i]);
    } else {
      const int64_t half = D / 2;
      for (int64_t d = 0; d < half; d += 8) {
        __m256 low, high;
        codes4(rows[i] + d, zero, &low, &high);
        p[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), low, p[i]);
        p[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + half + d), high, p[i]);
      }
    }
  }
  alignas(32) float sums[8];
  _mm256_store_ps(sums, sum8(p));
  std::copy(sums, sums + count, out);
}

inline void accumulate_codes(float* acc, const float* weights, const uint8_t* const* rows, const int32_t* zeros,
                             int64_t count, int64_t D, int64_t bits) {
  if (bits == 8) {
    for (int64_t d = 0; d < D; d += 8) {
      __m256 a = _mm256_loadu_ps(acc + d);
      for (int64_t k = 0; k < count; ++k)
        a = _mm256_fmadd_ps(_mm256_set1_ps(weights[k]), codes8(rows[k] + d, _mm256_set1_epi32(zeros[k])), a);
      _mm256_storeu_ps(acc + d, a);
    }
    return;
  }
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; d += 8) {
    __m256 low = _mm256_loadu_ps(acc + d), high = _mm256_loadu_ps(acc + half + d);
    for (int64_t k = 0; k < count; ++k) {
      __m256 row_low, row_high;
      codes4(rows[k] + d, _mm256_set1_epi32(zeros[k]), &row_low, &row_high);
      const __m256 weight = _mm256_set1_ps(weights[k]);
      low = _mm256_fmadd_ps(weight, row_low, low);
      high = _mm256_fmadd_ps(weight, row_high, high);
    }
    _mm256_storeu_ps(acc + d, low);
    _mm256_storeu_ps(acc + half + d, high);
  }
}
#endif

#else
inline bool quantized_decode_supported(int64_t, int64_t) { return false; }
#endif

}  // namespace
