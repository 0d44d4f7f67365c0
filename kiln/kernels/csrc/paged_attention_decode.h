// Decode items of paged_attention.cpp (one query per sequence, unquantized fp32/bf16 pool; AVX-512 over
// 16-token tiles, AVX2 over 8-token tiles) in two passes over the context in token order, instead of the
// online softmax over key tiles head by head.
//
// A token's KVH * D keys (and values) are contiguous in the pool, so reading every head of a tile of tokens
// before the next tile streams the pool; the tile loop read each head's rows KVH * D apart and did the
// online softmax's bookkeeping (running max, rescale of the accumulator, scalar exp) per 16 keys and row.
// For a decode the whole score row is small (4 bytes per context token and query head), so:
//   pass 1, tile by tile: the scores of every query row of the item (q . k * scale + ALiBi);
//   softmax of each row in place (max, exp, sum; vectorised over the context);
//   pass 2, tile by tile: acc[row] += p[row][j] * v[j] over the tile's value rows.
// The same sums as the tile loop up to fp32 association order (tests/kernels/test_cpu_paged_attention.py
// checks both against the torch reference). Measured on the 134M decode shape (64 x 256, 12 MHA heads,
// head dim 64, 2 threads, python -m kiln.bench.paged_attention --mode cpp): see BENCHMARKS.md. On the AMX
// Xeon (2026-12-06) the AVX-512 walk went from token by token (a horizontal sum per key and head, the
// accumulators through memory) to these tiles: 12 layers of 64 decodes over a 2k-block pool, 384 context
// tokens, 2 threads, two runs each: bf16 6.3-7.1 -> 4.6-5.9 ms a layer, fp32 10.1-11.7 -> 6.9-7.6.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "paged_attention_simd.h"

namespace {

// The keys sequence s's decode attends: its context, or the last `window` of it.
template <typename T>
int64_t decode_length(const Problem<T>& P, int64_t s) {
  const int64_t context = P.context_lens[s];
  return P.window > 0 ? std::min<int64_t>(P.window, context) : context;
}

#if defined(KILN_AVX512) || defined(KILN_AVX2)

#if defined(KILN_AVX512)
// Tokens per tile: 16 keys per `dots` call (one sum16 for 16 dot products). The pool types: fp32, and bf16
// with AVX512-BF16 (read as pairs, paged_attention_simd.h); D a multiple of the vector width, at most 256.
constexpr int64_t kDecodeTile = 16;
template <typename T>
constexpr bool kDecodeType = std::is_same_v<T, float> || kPairs<T>;
template <typename T>
inline bool decode_supported(int64_t head_dim) {
  return kDecodeType<T> && head_dim <= 256 && head_dim % (std::is_same_v<T, float> ? 16 : 32) == 0;
}
#else
// AVX2 + FMA: 8 keys per `dots` call; fp32 pools, and bf16 ones widened on load.
constexpr int64_t kDecodeTile = 8;
template <typename T>
constexpr bool kDecodeType = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
template <typename T>
inline bool decode_supported(int64_t head_dim) {
  return kDecodeType<T> && head_dim <= 256 && head_dim % 8 == 0;
}
#endif

// Keys [*begin, *end) of a decode item: part item.part of item.parts of its context's tiles of `tile` tokens
// (parts 1: all of it).
template <typename T>
inline void decode_keys(const Problem<T>& P, const Item& item, int64_t tile, int64_t* begin, int64_t* end) {
  const int64_t position = P.context_lens[item.seq] - 1;  // the query's position
  const int64_t first = position + 1 - decode_length(P, item.seq);
  const int64_t tiles = (position + 1 - first + tile - 1) / tile, per_part = (tiles + item.parts - 1) / item.parts;
  *begin = std::min(position + 1, first + item.part * per_part * tile);
  *end = std::min(position + 1, *begin + per_part * tile);
}

// Softmax in place of item row r's scores s of keys [begin, begin + n) (ALiBi: slope * (j - p), as the tile
// loop adds it): returns the sum; an item that is a part of its decode keeps the max in its partial.
template <typename T>
inline float decode_softmax(const Problem<T>& P, const Item& item, int64_t r, float* s, int64_t n, int64_t begin) {
  const int64_t G = P.num_heads / P.num_kv_heads, position = P.context_lens[item.seq] - 1;
  if (P.slopes) {
    const float slope = P.slopes[item.h0 * G + r];
    for (int64_t i = 0; i < n; ++i) s[i] += slope * float(begin + i - position);
  }
  float best = kNegInf;
  for (int64_t i = 0; i < n; ++i) best = std::max(best, s[i]);
  if (item.partial != nullptr) item.partial[r * (P.head_dim + 2) + P.head_dim] = best;
  return n > 0 ? exp_and_sum(s, n, best) : 0.0f;
}

// Item row r's fp32 accumulator: divided by its sum into the output, or for a part of a decode unnormalised
// with its sum (beside the max decode_softmax kept) for combine_parts.
template <typename T>
inline void decode_write(const Problem<T>& P, const Item& item, int64_t r, const float* acc, float sum) {
  const int64_t G = P.num_heads / P.num_kv_heads, D = P.head_dim;
  if (item.partial != nullptr) {
    std::copy(acc, acc + D, item.partial + r * (D + 2));
    item.partial[r * (D + 2) + D + 1] = sum;
    return;
  }
  from_float(acc, 1.0f / sum, P.out + (P.query_starts[item.seq] * P.num_heads + item.h0 * G + r) * D, D);
}

// Per-thread buffers of attend_decode, grown as needed.
struct DecodeScratch {
  std::vector<float> scores, acc, sums, qf, row;
  std::vector<c10::BFloat16> qb;
  std::vector<const void*> rows;
};

// One decode item: the query heads of kv heads [h0, h1) of sequence item.seq, over its whole context, in
// tiles of kDecodeTile tokens. A tile's K (or V) rows of every kv head are kDecodeTile x KVH x D values (24 KB
// of bf16 at the 134M shape: L1); per kv head `dots` scores the tile's keys at once (one transposing sum
// instead of a horizontal sum per key) and `accumulate` keeps a row's accumulator in registers while the
// tile's value rows pass. A bf16 pool with AVX512-BF16 multiplies bf16 pairs (dots_bf16: q unscaled, the
// scale applied to the scores) and accumulates in the pairs layout.
template <typename T>
void attend_decode(const Problem<T>& P, const Item& item) {
  constexpr int64_t kTile = kDecodeTile;
  int64_t begin, end;  // this item's keys
  decode_keys(P, item, kTile, &begin, &end);
  thread_local DecodeScratch w;
  const int64_t G = P.num_heads / P.num_kv_heads, D = P.head_dim, heads = item.h1 - item.h0;
  const int64_t rows = heads * G;
#ifdef KILN_BF16_PAIRS
  constexpr bool kBf16 = kPairs<T>;
  const int64_t width = kBf16 ? split_width(D) : D;  // an accumulator row (the pairs layout for bf16)
#else
  constexpr bool kBf16 = false;
  const int64_t width = D;
#endif
  const int64_t n = end - begin;
  const int64_t token = P.query_starts[item.seq];
  const int32_t* table = P.block_tables + item.seq * P.table_width;
  w.scores.resize(rows * n);
  w.acc.assign(rows * width, 0.0f);
  w.sums.resize(rows);
  w.row.resize(D);
  w.qf.resize(rows * D);
  w.qb.resize(rows * D);
  w.rows.resize(heads * kTile);
  for (int64_t r = 0; r < rows; ++r) {  // q rows: bf16 pairs as they are, else fp32 scaled once
    const T* q = P.q + token * P.q_stride_token + (item.h0 * G + r) * P.q_stride_head;
    if constexpr (kBf16) {
      std::copy(q, q + D, w.qb.data() + r * D);
    } else {
      for (int64_t d = 0; d < D; ++d) w.qf[r * D + d] = static_cast<float>(q[d]) * P.scale;
    }
  }
  const T** tile_rows = reinterpret_cast<const T**>(w.rows.data());  // [h * kTile + k]
#ifdef KILN_AVX512
  // A tile is first read once in address order, 64 bytes at a time (`point`), then head by head: the
  // head-by-head order alone (rows a slot apart) kept the DRAM reads from overlapping the arithmetic. On a
  // 2-vCPU Zen 4 (2026-12-07), 64 decodes over 12 layers' pools at 192 context, bf16: the op 12.7-14.0 ->
  // 14.4-17.6 GB/s in five interleaved rounds, the engine's bf16 offline 64 x (128, 128) 1.00-1.07x in three.
  // fp32 pools read no faster that way at the 134M shape there (24.4 -> 20.9 GB/s) or on a Zen 5 (64 x 256
  // decodes, 12 x 64 heads: 2.66-3.00 vs 2.81 ms a layer call), so stop 28 kept it to bf16; but at the demo
  // shape (6 heads over 2 kv heads of 32 fp32 values: 128-byte row pieces) the head-by-head walk alone ran
  // 2.4x slower (Zen 5, 8 decodes at 2k context, 4 layers: 2.90-2.99 -> 1.20-1.28 ms; the token-by-token walk
  // before stop 26 took 1.13-1.16), so every pool type touches (AVX-512; the AVX2 walk is unchanged).
  __m512i touched = _mm512_setzero_si512();
#endif
  // Point tile_rows at tokens [j0, j0 + count)'s rows of every kv head of the item in `cache` (AVX-512:
  // reading each token's rows once on the way).
  auto point = [&](const T* cache, int64_t stride_slot, int64_t stride_head, int64_t j0, int64_t count) {
    int64_t block = j0 / P.block_size, offset = j0 % P.block_size;
    for (int64_t k = 0; k < count; ++k) {
      const T* slot = cache + (int64_t(table[block]) * P.block_size + offset) * stride_slot + item.h0 * stride_head;
#ifdef KILN_AVX512
      {
        const char* bytes = reinterpret_cast<const char*>(slot);
        for (int64_t b = 0; b + 64 <= heads * stride_head * int64_t(sizeof(T)); b += 64)
          touched = _mm512_or_si512(touched, _mm512_loadu_si512(bytes + b));
      }
#endif
      for (int64_t h = 0; h < heads; ++h) tile_rows[h * kTile + k] = slot + h * stride_head;
      if (++offset == P.block_size) offset = 0, ++block;
    }
  };
  // visit(r, its kv head's tile rows, the tile's first score index, count) for every tile of `cache` in
  // token order and every row r of the item.
  auto walk = [&](const T* cache, int64_t stride_slot, int64_t stride_head, auto&& visit) {
    for (int64_t j0 = begin; j0 < end; j0 += kTile) {
      const int64_t count = std::min<int64_t>(kTile, end - j0);
      point(cache, stride_slot, stride_head, j0, count);
      for (int64_t r = 0; r < rows; ++r) visit(r, tile_rows + r / G * kTile, j0 - begin, count);
    }
  };
  float* scores = w.scores.data();
  // Pass 1: scores, tile by tile (every kv head of a tile, then the next tile).
  walk(P.keys, P.k_stride_slot, P.k_stride_head, [&](int64_t r, const T* const* keys, int64_t i0, int64_t count) {
#ifdef KILN_BF16_PAIRS
    if constexpr (kBf16) {
      dots_bf16(w.qb.data() + r * D, keys, count, D, scores + r * n + i0);
      return;
    }
#endif
    dots(w.qf.data() + r * D, keys, count, D, scores + r * n + i0);
  });
  for (int64_t r = 0; r < rows; ++r) {  // softmax of each row
    float* s = scores + r * n;
    if constexpr (kBf16)
      for (int64_t i = 0; i < n; ++i) s[i] *= P.scale;
    w.sums[r] = decode_softmax(P, item, r, s, n, begin);
  }
  // Pass 2: values, tile by tile; each row's weights of the tile against its kv head's value rows.
  walk(P.values, P.v_stride_slot, P.v_stride_head, [&](int64_t r, const T* const* values, int64_t i0, int64_t count) {
#ifdef KILN_BF16_PAIRS
    if constexpr (kBf16) {
      accumulate_bf16(w.acc.data() + r * width, 1.0f, scores + r * n + i0, values, count, D);
      return;
    }
#endif
    accumulate(w.acc.data() + r * width, 1.0f, scores + r * n + i0, values, count, D);
  });
#ifdef KILN_AVX512
  asm volatile("" : : "v"(touched));  // keep the touching loads
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const float* acc = w.acc.data() + r * width;
#ifdef KILN_BF16_PAIRS
    if constexpr (kBf16) {
      from_pairs(acc, w.row.data(), D);
      acc = w.row.data();
    }
#endif
    decode_write(P, item, r, acc, w.sums[r]);
  }
}

#else
constexpr int64_t kDecodeTile = 16;
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
