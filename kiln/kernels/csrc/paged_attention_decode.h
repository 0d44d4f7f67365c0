// Decode items of paged_attention.cpp (one query per sequence, unquantized fp32/bf16 pool; AVX-512, or AVX2
// over 8-token tiles) in two passes over the context in token order, instead of the online softmax over key
// tiles head by head.
//
// A token's KVH * D keys (and values) are contiguous in the pool, so reading every head of one token before
// the next streams the pool; the tile loop read each head's rows KVH * D apart and did the online softmax's
// bookkeeping (running max, rescale of the accumulator, scalar exp) per 16 keys and row. For a decode the
// whole score row is small (4 bytes per context token and query head), so:
//   pass 1, token by token: the scores of every query row of the item (q . k * scale + ALiBi);
//   softmax of each row in place (max, exp, sum; vectorised over the context);
//   pass 2, token by token: acc[row] += p[row][j] * v[j], values widened once per kv head for its G rows.
// The same sums as the tile loop up to fp32 association order (tests/kernels/test_cpu_paged_attention.py
// checks both against the torch reference). Measured on the 134M decode shape (64 x 256, 12 MHA heads,
// head dim 64, 2 threads, python -m kiln.bench.paged_attention --mode cpp): see BENCHMARKS.md.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "paged_attention_simd.h"

namespace {

#if defined(KILN_AVX512)

// The pool types attend_decode is built for: fp32, and bf16 with AVX512-BF16.
template <typename T>
constexpr bool kDecodeType = std::is_same_v<T, float> || kPairs<T>;

// Whether attend_decode takes an item of this pool: one of those types, D a multiple of the vector width
// (16 fp32 values, 32 bf16 ones) and at most 256.
template <typename T>
inline bool decode_supported(int64_t head_dim) {
  return kDecodeType<T> && head_dim <= 256 && head_dim % (std::is_same_v<T, float> ? 16 : 32) == 0;
}

#ifdef KILN_BF16_PAIRS
// q . k over D values of bf16 rows by vdpbf16ps (exact products, fp32 sums); fp32 rows take dot().
inline float dot_bf16(const c10::BFloat16* q, const c10::BFloat16* k, int64_t D) {
  __m512 a = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32)
    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(k + d));
  return _mm512_reduce_add_ps(a);
}
#endif

// acc[r] += weights[r] * v for the G rows r sharing one value row: fp32 in natural order, bf16 in the pairs
// layout of paged_attention_simd.h (acc rows split_width(D) floats apart). Not the tile loop's accumulate
// / accumulate_bf16 with one key per row: those widen the value row once per row, not per kv head, and
// rescale the accumulator; with them a bf16 decode of the 134M shape ran 1.4-1.8x slower.
inline void add_value_row(float* acc, int64_t acc_stride, const float* weights, int64_t G, const float* v,
                          int64_t D) {
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 x = _mm512_loadu_ps(v + d);
    for (int64_t g = 0; g < G; ++g) {
      float* a = acc + g * acc_stride + d;
      _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(weights[g]), x, _mm512_loadu_ps(a)));
    }
  }
}

#ifdef KILN_BF16_PAIRS
inline void add_value_row(float* acc, int64_t acc_stride, const float* weights, int64_t G,
                          const c10::BFloat16* v, int64_t D) {
  const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  for (int64_t d = 0; d < D; d += 32) {
    const __m512i x = _mm512_loadu_si512(v + d);
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(x, high));
    for (int64_t g = 0; g < G; ++g) {
      float* a = acc + g * acc_stride + d;
      const __m512 w = _mm512_set1_ps(weights[g]);
      _mm512_storeu_ps(a, _mm512_fmadd_ps(w, even, _mm512_loadu_ps(a)));
      _mm512_storeu_ps(a + 16, _mm512_fmadd_ps(w, odd, _mm512_loadu_ps(a + 16)));
    }
  }
}
#endif

// Per-thread buffers of attend_decode, grown as needed.
struct DecodeScratch {
  std::vector<float> scores, acc, sums, weights, qf, row;
  std::vector<c10::BFloat16> qb;
};

// One decode item: the query heads of kv heads [h0, h1) of sequence item.seq, over its whole context.
template <typename T>
void attend_decode(const Problem<T>& P, const Item& item) {
  thread_local DecodeScratch w;
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const int64_t G = P.num_heads / P.num_kv_heads, D = P.head_dim, heads = item.h1 - item.h0;
  const int64_t rows = heads * G, width = kBf16 ? split_width(D) : D;
  const int64_t position = P.context_lens[item.seq] - 1;  // the query's position
  const int64_t begin = P.window > 0 ? std::max<int64_t>(0, position - P.window + 1) : 0;
  const int64_t n = position + 1 - begin;
  const int64_t token = P.query_starts[item.seq];
  const int32_t* table = P.block_tables + item.seq * P.table_width;
  auto slot_of = [&](int64_t j) { return int64_t(table[j / P.block_size]) * P.block_size + j % P.block_size; };
  w.scores.resize(rows * n);
  w.acc.assign(rows * width, 0.0f);
  w.sums.resize(rows);
  w.weights.resize(G);
  w.row.resize(D);
  // q rows: bf16 as they are (the scale is applied to the scores), fp32 scaled once.
  w.qf.resize(rows * D);
  w.qb.resize(rows * D);
  for (int64_t r = 0; r < rows; ++r) {
    const T* q = P.q + token * P.q_stride_token + (item.h0 * G + r) * P.q_stride_head;
    if constexpr (kBf16) {
      std::copy(q, q + D, w.qb.data() + r * D);
    } else {
      for (int64_t d = 0; d < D; ++d) w.qf[r * D + d] = q[d] * P.scale;
    }
  }
  const float score_scale = kBf16 ? P.scale : 1.0f;
  // Pass 1: scores, token by token (every kv head of a token, then the next token).
  for (int64_t j = begin; j <= position; ++j) {
    const T* keys = P.keys + slot_of(j) * P.k_stride_slot + item.h0 * P.k_stride_head;
    for (int64_t h = 0; h < heads; ++h) {
      const T* k = keys + h * P.k_stride_head;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = h * G + g;
        float s;
        if constexpr (kBf16)
          s = dot_bf16(w.qb.data() + r * D, k, D);
        else
          s = dot(w.qf.data() + r * D, k, D);
        w.scores[r * n + (j - begin)] = s * score_scale;
      }
    }
  }
  // Softmax of each row (ALiBi: slope * (j - p), as the tile loop adds it).
  for (int64_t r = 0; r < rows; ++r) {
    float* s = w.scores.data() + r * n;
    if (P.slopes) {
      const float slope = P.slopes[item.h0 * G + r];
      for (int64_t i = 0; i < n; ++i) s[i] += slope * float(begin + i - position);
    }
    const __m512 none = _mm512_set1_ps(kNegInf);
    __m512 m = none;
    for (int64_t i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(none, tail_mask(n - i), s + i));
    w.sums[r] = exp_and_sum(s, n, _mm512_reduce_max_ps(m));
  }
  // Pass 2: values, token by token; weights of the G rows of a kv head gathered for add_value_row.
  float* weights = w.weights.data();
  for (int64_t j = begin; j <= position; ++j) {
    const T* values = P.values + slot_of(j) * P.v_stride_slot + item.h0 * P.v_stride_head;
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t g = 0; g < G; ++g) weights[g] = w.scores[(h * G + g) * n + (j - begin)];
      add_value_row(w.acc.data() + h * G * width, width, weights, G, values + h * P.v_stride_head, D);
    }
  }
  float* row = w.row.data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* acc = w.acc.data() + r * width;
    if constexpr (kBf16) {
      from_pairs(acc, row, D);
      acc = row;
    }
    from_float(acc, 1.0f / w.sums[r], P.out + (token * P.num_heads + item.h0 * G + r) * D, D);
  }
}

#elif defined(KILN_AVX2)

// AVX2 + FMA (no AVX-512): the same two passes over 8-token tiles. A tile's K (or V) rows of every kv head
// are 8 x KVH x D values (24 KB at the 134M shape: L1), and paged_attention_simd.h's `dots` scores 8 keys of
// one head at a time (one transposing sum for 8 dot products instead of a horizontal sum each) while
// `accumulate` keeps up to 64 accumulator values in registers as the tile's 8 value rows pass. fp32 pools,
// and bf16 ones widened on load.
template <typename T>
constexpr bool kDecodeType = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

template <typename T>
inline bool decode_supported(int64_t head_dim) {
  return kDecodeType<T> && head_dim <= 256 && head_dim % 8 == 0;
}

struct DecodeScratch {
  std::vector<float> scores, acc, sums, qf;
  std::vector<const void*> rows;
};

// One decode item: the query heads of kv heads [h0, h1) of sequence item.seq, over its whole context.
template <typename T>
void attend_decode(const Problem<T>& P, const Item& item) {
  constexpr int64_t kTile = 8;
  thread_local DecodeScratch w;
  const int64_t G = P.num_heads / P.num_kv_heads, D = P.head_dim, heads = item.h1 - item.h0;
  const int64_t rows = heads * G;
  const int64_t position = P.context_lens[item.seq] - 1;  // the query's position
  const int64_t begin = P.window > 0 ? std::max<int64_t>(0, position - P.window + 1) : 0;
  const int64_t n = position + 1 - begin;
  const int64_t token = P.query_starts[item.seq];
  const int32_t* table = P.block_tables + item.seq * P.table_width;
  w.scores.resize(rows * n);
  w.acc.assign(rows * D, 0.0f);
  w.sums.resize(rows);
  w.qf.resize(rows * D);
  w.rows.resize(heads * kTile);
  for (int64_t r = 0; r < rows; ++r) {  // q rows in fp32, scaled once
    const T* q = P.q + token * P.q_stride_token + (item.h0 * G + r) * P.q_stride_head;
    for (int64_t d = 0; d < D; ++d) w.qf[r * D + d] = static_cast<float>(q[d]) * P.scale;
  }
  const T** tile_rows = reinterpret_cast<const T**>(w.rows.data());  // [h * kTile + k]
  // Point tile_rows at tokens [j0, j0 + count)'s rows of every kv head of the item in `cache`.
  auto point = [&](const T* cache, int64_t stride_slot, int64_t stride_head, int64_t j0, int64_t count) {
    int64_t block = j0 / P.block_size, offset = j0 % P.block_size;
    for (int64_t k = 0; k < count; ++k) {
      const T* slot = cache + (int64_t(table[block]) * P.block_size + offset) * stride_slot + item.h0 * stride_head;
      for (int64_t h = 0; h < heads; ++h) tile_rows[h * kTile + k] = slot + h * stride_head;
      if (++offset == P.block_size) offset = 0, ++block;
    }
  };
  // visit(r, its kv head's tile rows, the tile's first score index, count) for every tile of `cache` in
  // token order and every row r of the item.
  auto walk = [&](const T* cache, int64_t stride_slot, int64_t stride_head, auto&& visit) {
    for (int64_t j0 = begin; j0 <= position; j0 += kTile) {
      const int64_t count = std::min<int64_t>(kTile, position + 1 - j0);
      point(cache, stride_slot, stride_head, j0, count);
      for (int64_t r = 0; r < rows; ++r) visit(r, tile_rows + r / G * kTile, j0 - begin, count);
    }
  };
  float* scores = w.scores.data();
  // Pass 1: scores, tile by tile (every kv head of a tile, then the next tile).
  walk(P.keys, P.k_stride_slot, P.k_stride_head, [&](int64_t r, const T* const* keys, int64_t i0, int64_t count) {
    dots(w.qf.data() + r * D, keys, count, D, scores + r * n + i0);
  });
  // Softmax of each row (ALiBi: slope * (j - p), as the tile loop adds it).
  for (int64_t r = 0; r < rows; ++r) {
    float* s = w.scores.data() + r * n;
    if (P.slopes) {
      const float slope = P.slopes[item.h0 * G + r];
      for (int64_t i = 0; i < n; ++i) s[i] += slope * float(begin + i - position);
    }
    float best = kNegInf;
    for (int64_t i = 0; i < n; ++i) best = std::max(best, s[i]);
    w.sums[r] = exp_and_sum(s, n, best);
  }
  // Pass 2: values, tile by tile; each row's 8 weights of the tile against its kv head's 8 value rows.
  walk(P.values, P.v_stride_slot, P.v_stride_head, [&](int64_t r, const T* const* values, int64_t i0, int64_t count) {
    accumulate(w.acc.data() + r * D, 1.0f, scores + r * n + i0, values, count, D);
  });
  for (int64_t r = 0; r < rows; ++r)
    from_float(w.acc.data() + r * D, 1.0f / w.sums[r], P.out + (token * P.num_heads + item.h0 * G + r) * D, D);
}

#else
template <typename T>
constexpr bool kDecodeType = false;
template <typename T>
inline bool decode_supported(int64_t) {
  return false;
}
template <typename T>
void attend_decode(const Problem<T>&, const Item&) {}
#endif

}  // namespace
