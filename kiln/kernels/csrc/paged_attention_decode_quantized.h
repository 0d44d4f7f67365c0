// Decode items of paged_attention.cpp over a quantized pool (int8 / int4 KV rows, kv_quant.py's layout:
// codes, then an fp16 scale and a uint8 zero point a row), AVX-512 (16 lanes) or AVX2 + FMA (8): the two
// passes of attend_decode (paged_attention_decode.h) reading the codes in place, with each row's scale and
// zero point folded out of the inner loops:
//   score_j = scale_j * (q . (c_j - zero_j))          (the codes widened, the zero subtracted as integers)
//   acc    += (p_j * scale_j) * (c_j - zero_j)        (value rows the same way)
// so a code costs a widen, an integer subtract, a convert and an FMA. The tile loop it replaces dequantized
// every row into an fp32 buffer ((c - z) * s, stored) and read it back, under the online softmax's
// bookkeeping per 16 keys. Equal to dequantize-then-attend up to fp32 association order
// (tests/kernels/test_kv_quant.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "paged_attention_simd.h"

namespace {

#if defined(KILN_AVX512) || defined(KILN_AVX2)

// int8 rows of D codes, int4 rows of D / 2 bytes (low nibbles values [0, D / 2), high ones the rest): the
// walk takes D (int8) or D / 2 (int4) a multiple of the vector width, up to 256 values.
constexpr int64_t kCodeLanes = kDecodeTile;  // 16 (AVX-512) or 8 (AVX2): fp32 lanes, and keys a tile
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

// Per-thread buffers of attend_decode_quantized, grown as needed.
struct QuantizedDecodeScratch {
  std::vector<float> scores, acc, sums, qf, scales, weights;
  std::vector<int32_t> zeros;
  std::vector<const uint8_t*> rows;
};

// One decode item (as attend_decode: the query heads of kv heads [h0, h1) of item.seq, part `part` of
// `parts` of its context) over a quantized pool.
template <typename T>
void attend_decode_quantized(const Problem<T>& P, const Item& item) {
  constexpr int64_t kTile = kCodeLanes;
  int64_t begin, end;  // this item's keys
  decode_keys(P, item, kTile, &begin, &end);
  thread_local QuantizedDecodeScratch w;
  const int64_t G = P.num_heads / P.num_kv_heads, D = P.head_dim, heads = item.h1 - item.h0, rows = heads * G;
  const int64_t n = end - begin;
  const int64_t token = P.query_starts[item.seq];
  const int32_t* table = P.block_tables + item.seq * P.table_width;
  w.scores.resize(rows * n);
  w.acc.assign(rows * D, 0.0f);
  w.sums.resize(rows);
  w.qf.resize(rows * D);
  w.scales.resize(heads * kTile);
  w.weights.resize(kTile);
  w.zeros.resize(heads * kTile);
  w.rows.resize(heads * kTile);
  for (int64_t r = 0; r < rows; ++r) {  // q rows in fp32, scaled once
    const T* q = P.q + token * P.q_stride_token + (item.h0 * G + r) * P.q_stride_head;
    to_float(q, w.qf.data() + r * D, D);
    for (int64_t d = 0; d < D; ++d) w.qf[r * D + d] *= P.scale;
  }
  // Point w.rows at tokens [j0, j0 + count)'s code rows of every kv head of the item, with their scales and
  // zero points ([h * kTile + k]).
  auto point = [&](const uint8_t* codes, const uint8_t* params, int64_t j0, int64_t count) {
    int64_t block = j0 / P.block_size, offset = j0 % P.block_size;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t slot = int64_t(table[block]) * P.block_size + offset;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t row = slot * P.num_kv_heads + item.h0 + h;
        c10::Half scale;
        std::memcpy(&scale, params + 3 * row, 2);
        w.rows[h * kTile + k] = codes + row * P.packed;
        w.scales[h * kTile + k] = float(scale);
        w.zeros[h * kTile + k] = params[3 * row + 2];
      }
      if (++offset == P.block_size) offset = 0, ++block;
    }
  };
  float* scores = w.scores.data();
  for (int64_t j0 = begin; j0 < end; j0 += kTile) {  // pass 1: scores
    const int64_t count = std::min<int64_t>(kTile, end - j0);
    point(P.key_codes, P.key_params, j0, count);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = r / G;
      float* s = scores + r * n + (j0 - begin);
      dots_codes(w.qf.data() + r * D, w.rows.data() + h * kTile, w.zeros.data() + h * kTile, count, D, P.bits, s);
      for (int64_t k = 0; k < count; ++k) s[k] *= w.scales[h * kTile + k];
    }
  }
  for (int64_t r = 0; r < rows; ++r) w.sums[r] = decode_softmax(P, item, r, scores + r * n, n, begin);
  for (int64_t j0 = begin; j0 < end; j0 += kTile) {  // pass 2: values, each weight times its row's scale
    const int64_t count = std::min<int64_t>(kTile, end - j0);
    point(P.value_codes, P.value_params, j0, count);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = r / G;
      const float* p = scores + r * n + (j0 - begin);
      for (int64_t k = 0; k < count; ++k) w.weights[k] = p[k] * w.scales[h * kTile + k];
      accumulate_codes(w.acc.data() + r * D, w.weights.data(), w.rows.data() + h * kTile, w.zeros.data() + h * kTile,
                       count, D, P.bits);
    }
  }
  for (int64_t r = 0; r < rows; ++r) decode_write(P, item, r, w.acc.data() + r * D, w.sums[r]);
}

#else
inline bool quantized_decode_supported(int64_t, int64_t) { return false; }
template <typename T>
void attend_decode_quantized(const Problem<T>&, const Item&) {}
#endif

}  // namespace
