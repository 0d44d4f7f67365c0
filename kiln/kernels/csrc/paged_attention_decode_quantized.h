// Decode items of paged_attention.cpp over a quantized pool (int8 / int4 KV rows, kv_quant.py's layout:
// codes, then an fp16 scale and a uint8 zero point a row), AVX-512 (16 lanes) or AVX2 + FMA (8): the two
// passes of attend_decode (paged_attention_decode.h) reading the codes in place through kv_code_rows.h
// (each row's scale and zero point folded out of the inner loops). The tile loop it replaces dequantized
// every row into an fp32 buffer ((c - z) * s, stored) and read it back, under the online softmax's
// bookkeeping per 16 keys. Equal to dequantize-then-attend up to fp32 association order
// (tests/kernels/test_kv_quant.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kv_code_rows.h"  // codes8, codes4, dots_codes, accumulate_codes
#include "paged_attention_simd.h"

namespace {

#if defined(KILN_AVX512) || defined(KILN_AVX2)

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
  static_assert(kCodeLanes == kDecodeTile, "a tile of codes is a tile of the float walk");
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
template <typename T>
void attend_decode_quantized(const Problem<T>&, const Item&) {}
#endif

}  // namespace
