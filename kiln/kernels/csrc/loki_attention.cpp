// kiln::loki_decode_attention: Loki sparse attention (Singhania et al., NeurIPS 2024) of one decode query
// per sequence over the paged KV pool, read in place. The pool holds keys rotated by the layer's PCA basis
// and the query comes rotated the same way (kiln/kernels/loki_attention.py), so the first `rank`
// coordinates of each key are its top principal components.
//
// One work item per (sequence, KV head), run under OpenMP: score each visible key on its first `rank`
// coordinates for all the KV head's query heads (AVX-512: `rank_scores`, the keys transposed into lanes so
// each head's scores are `rank` FMAs a 16-key tile; else paged_attention_simd.h's `dots`), per query head
// keep the top `count` (AVX-512 from 256 keys: `select_top_vector`, compare-and-count passes that bracket
// the count-th score; else `select_top`, a histogram pass and a compaction pass; both O(n) and exact), then
// run exact softmax attention over those only, in fp32, again with the SIMD helpers over the kept rows'
// pointers (several scattered rows' loads in flight at once). With count = n nothing is scored or selected
// and every key is attended, in position order. The demo shape (6 heads over 2 KV heads of 32, rank 8, top
// 25%; `python -m kiln.bench.loki decode`) spent ~70% of the op scoring and selecting before the two AVX-512
// paths; see BENCHMARKS.md.

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "kv_code_rows.h"  // dots_codes, accumulate_codes
#include "paged_attention_simd.h"  // dots, accumulate, exp_and_sum

namespace {

constexpr int kBuckets = 256;
constexpr int64_t kValueTile = 16;  // value rows per accumulate call: each read whole while acc stays in registers
constexpr int64_t kVectorSelect = 256;  // keys from which select_top_vector runs
constexpr int64_t kMaxLokiGroup = 16;  // query heads a KV head that rank_scores takes (more: `dots` per head)

// Keep the `count` largest of scores[0, n): a 256-bucket histogram of the scores between their min and max
// finds the bucket the count-th largest falls in; one pass then keeps every key above that bucket and
// collects the bucket's own, of which nth_element picks the rest. O(n) in simple loops (min/max and bucket
// indices vectorise; the histogram counts into 4 tables so consecutive equal buckets do not wait on each
// other's increments), ~10x fewer comparisons than nth_element over all n. `kept` gets the indices (those
// above the bucket in pool order, then the rest); `buckets` is scratch of n.
inline int64_t select_top(const float* scores, int64_t n, int64_t count, int32_t* kept, int32_t* buckets,
                          std::vector<std::pair<float, int32_t>>& bucket_members) {
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    lo = std::min(lo, scores[j]);
    hi = std::max(hi, scores[j]);
  }
  if (!(hi > lo)) {  // all equal: the first count
    for (int64_t j = 0; j < count; ++j) kept[j] = static_cast<int32_t>(j);
    return count;
  }
  const float inverse = kBuckets / (hi - lo);
  for (int64_t j = 0; j < n; ++j) buckets[j] = std::min(kBuckets - 1, static_cast<int32_t>((scores[j] - lo) * inverse));
  int32_t tables[4][kBuckets] = {};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    ++tables[0][buckets[j]];
    ++tables[1][buckets[j + 1]];
    ++tables[2][buckets[j + 2]];
    ++tables[3][buckets[j + 3]];
  }
  for (; j < n; ++j) ++tables[0][buckets[j]];
  int64_t above = 0;
  int bucket = kBuckets - 1;
  auto in_bucket = [&](int b) { return tables[0][b] + tables[1][b] + tables[2][b] + tables[3][b]; };
  while (above + in_bucket(bucket) < count) above += in_bucket(bucket--);
  int64_t num_kept = 0;
  bucket_members.clear();
  for (int64_t i = 0; i < n; ++i) {
    kept[num_kept] = static_cast<int32_t>(i);
    num_kept += buckets[i] > bucket;
    if (buckets[i] == bucket) bucket_members.emplace_back(scores[i], static_cast<int32_t>(i));
  }
  const int64_t within = count - above;  // 1 <= within <= bucket_members.size()
  std::nth_element(bucket_members.begin(), bucket_members.begin() + (within - 1), bucket_members.end(),
                   [](const auto& x, const auto& y) { return x.first > y.first || (x.first == y.first && x.second < y.second); });
  for (int64_t i = 0; i < within; ++i) kept[num_kept++] = bucket_members[i].second;
  return num_kept;
}

#ifdef KILN_AVX512
// select_top with vector passes only, for n of a few hundred and more: returns the kept count, or -1 where
// select_top must run instead (all scores equal). Brackets the count-th largest score v between lo and hi
// (at least count scores above lo, fewer than count above hi) from the scores' min and max, and narrows it
// four ways a pass: one pass over the scores counts those above three thresholds at once (compare masks
// into vector counters, no branch per score). Once at most kBand scores lie in (lo, hi], one pass
// compress-stores the indices of those above hi into `kept` (in pool order) and of those inside into `band`,
// where nth_element picks the rest (ties to the lower index). Exact: the same set as select_top. Ties the
// bracket cannot split (it stops narrowing once it is a few ulps wide) stay inside it for nth_element. ~5
// passes at 4k keys, against select_top's scalar histogram and marking.
inline int64_t select_top_vector(const float* scores, int64_t n, int64_t count, int32_t* kept, int32_t* band) {
  constexpr int64_t kBand = 48;
  __m512 vmin = _mm512_set1_ps(std::numeric_limits<float>::max());
  __m512 vmax = _mm512_set1_ps(std::numeric_limits<float>::lowest());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(m, scores + j);
    vmin = _mm512_mask_min_ps(vmin, m, vmin, v);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
  }
  float lo = _mm512_reduce_min_ps(vmin);
  float hi = _mm512_reduce_max_ps(vmax);
  if (!(hi > lo)) return -1;
  // above(lo) counts the scores equal to the min out: step lo just below it
  lo = std::nextafter(lo, std::numeric_limits<float>::lowest());
  int64_t above_lo = n, above_hi = 0;
  for (int pass = 0; pass < 16 && above_lo - above_hi > kBand; ++pass) {
    const float step = (hi - lo) / 4;
    const float t1 = lo + step, t2 = lo + 2 * step, t3 = hi - step;
    if (!(t1 > lo && t3 < hi && t2 > t1 && t3 > t2)) break;  // the bracket is a few ulps wide: ties
    const __m512 v1 = _mm512_set1_ps(t1), v2 = _mm512_set1_ps(t2), v3 = _mm512_set1_ps(t3);
    __m512i c1 = _mm512_setzero_si512(), c2 = c1, c3 = c1;
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(n - j);
      const __m512 v = _mm512_maskz_loadu_ps(m, scores + j);
      c1 = _mm512_mask_add_epi32(c1, _mm512_mask_cmp_ps_mask(m, v, v1, _CMP_GT_OQ), c1, one);
      c2 = _mm512_mask_add_epi32(c2, _mm512_mask_cmp_ps_mask(m, v, v2, _CMP_GT_OQ), c2, one);
      c3 = _mm512_mask_add_epi32(c3, _mm512_mask_cmp_ps_mask(m, v, v3, _CMP_GT_OQ), c3, one);
    }
    const int64_t n1 = _mm512_reduce_add_epi32(c1), n2 = _mm512_reduce_add_epi32(c2);
    const int64_t n3 = _mm512_reduce_add_epi32(c3);
    if (n3 >= count) {
      lo = t3, above_lo = n3;
    } else if (n2 >= count) {
      lo = t2, above_lo = n2, hi = t3, above_hi = n3;
    } else if (n1 >= count) {
      lo = t1, above_lo = n1, hi = t2, above_hi = n2;
    } else {
      hi = t1, above_hi = n1;
    }
  }
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t above = 0, inside = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(m, scores + j);
    const __mmask16 over = _mm512_mask_cmp_ps_mask(m, v, vhi, _CMP_GT_OQ);
    const __mmask16 in = _mm512_mask_cmp_ps_mask(m, v, vlo, _CMP_GT_OQ) & ~over;
    _mm512_mask_compressstoreu_epi32(kept + above, over, index);
    _mm512_mask_compressstoreu_epi32(band + inside, in, index);
    above += _mm_popcnt_u32(over);
    inside += _mm_popcnt_u32(in);
    index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
  }
  if (above >= count || above + inside < count) return -1;  // cannot happen (the bracket's invariant)
  const int64_t within = count - above;
  std::nth_element(band, band + (within - 1), band + inside, [&](int32_t x, int32_t y) {
    return scores[x] > scores[y] || (scores[x] == scores[y] && x < y);
  });
  std::copy(band, band + within, kept + above);
  return count;
}

// Rank-r scores of 16 keys for each of G query heads, keys in lanes: the keys' first r coordinates are
// transposed 8 at a time (16 rows x 8 values -> 8 vectors of 16 keys), then each head's scores are r FMAs
// with its query's coordinates broadcast. `dots` instead does one FMA per key and a 45-op transposing sum
// per head and 16 keys: at rank 8 with 3 heads a KV head, 72 vector ops a tile against 231. out[g * stride +
// k] for k < count (<= 16); rows[k] for k >= count are not read.
template <typename T>
inline void rank_scores(const float* q, int64_t D, int64_t G, const T* const* rows, int64_t count, int64_t rank,
                        float* out, int64_t stride) {
  __m512 acc[kMaxLokiGroup];
  for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  // 128-bit lanes (a0, b0, a2, b2) and (a1, b1, a3, b3) of two vectors: the AVX 8x8 transpose's last step
  // (permute2f128) in each 256-bit half
  const __m512i low = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
  const __m512i high = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t d0 = 0; d0 < rank; d0 += 8) {
    const __mmask16 m = tail_mask(std::min<int64_t>(8, rank - d0));
    __m512 z[8], t[8], u[8];
    for (int64_t i = 0; i < 8; ++i) {  // z[i] = (row i, row i + 8), 8 values each
      const __m512 a = i < count ? load_ps(rows[i] + d0, m) : _mm512_setzero_ps();
      const __m512 b = i + 8 < count ? load_ps(rows[i + 8] + d0, m) : _mm512_setzero_ps();
      z[i] = _mm512_insertf32x8(a, _mm512_castps512_ps256(b), 1);
    }
    for (int64_t i = 0; i < 8; i += 2) {
      t[i] = _mm512_unpacklo_ps(z[i], z[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(z[i], z[i + 1]);
    }
    for (int64_t i = 0; i < 8; i += 4) {
      u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
      u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int64_t i = 0; i < 4; ++i) {  // z[d]: coordinate d0 + d of keys 0..15, one per lane
      z[i] = _mm512_permutex2var_ps(u[i], low, u[i + 4]);
      z[i + 4] = _mm512_permutex2var_ps(u[i], high, u[i + 4]);
    }
    const int64_t width = std::min<int64_t>(8, rank - d0);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < width; ++d)
        acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * D + d0 + d]), z[d], acc[g]);
  }
  for (int64_t g = 0; g < G; ++g) _mm512_mask_storeu_ps(out + g * stride, tail_mask(count), acc[g]);
}

// Whether rank_scores beats `dots` per head, by their vector ops a 16-key tile: 48 (16 loads, 24 shuffles,
// 8 inserts) per 8 coordinates plus rank FMAs per head, against (16 loads + 16 FMAs) per 16 coordinates
// plus a 45-op sum per head. At rank 8 with 3 heads a KV head 72 against 231; at rank 32 with one head (MHA,
// head_dim 128) 224 against 109, where the transposes measured slower (0.57-0.64x dense against 0.48-0.54x).
inline bool transposed_scores_pay(int64_t rank, int64_t group) {
  return (rank + 7) / 8 * 48 + rank * group < group * ((rank + 15) / 16 * 32 + 45);
}
#endif

// Where loki_impl reads pool rows (row r = slot * KVH + kv head): the scored keys' first `rank` coordinates
// (scored_key) and the exact part's sums over the kept rows (key_dots, accumulate_values; dots and
// accumulate take 8-16 rows at a time, so the scattered rows' loads overlap). PoolRows: a model-dtype pool,
// pointers into it. QuantizedRows: an int8/int4 pool (kiln/kernels/kv_quant.py: codes, then an fp16 scale and
// a zero point a row): the scored coordinates dequantized into a buffer, the kept rows read in place by
// kv_code_rows.h's dots_codes / accumulate_codes (scale and zero point folded out), or, for a head_dim those
// do not take, dequantized into fp32 rows once per work item (the GQA heads of a KV head share them).
// acc += sum_i weights[i] * rows[i] over `count` rows of D, kValueTile rows an accumulate call
template <typename R>
inline void accumulate_rows(float* acc, const float* weights, const R* const* rows, int64_t count, int64_t D) {
  for (int64_t i0 = 0; i0 < count; i0 += kValueTile)
    accumulate(acc, 1.f, weights + i0, rows + i0, std::min<int64_t>(kValueTile, count - i0), D);
}

template <typename T>
struct PoolRows {
  using Row = T;
  const T* keys;
  const T* values;
  int64_t D;
  struct Reader {
    const PoolRows& pool;
    std::vector<const T*> rows;
    void reset(int64_t /*n*/, int64_t /*rank*/) {}
    const T* scored_key(int64_t /*j*/, int64_t r) { return pool.keys + r * pool.D; }
    void key_dots(const float* q, const int32_t* kept, const int64_t* base, int64_t count, float* out) {
      rows.resize(count);
      for (int64_t i = 0; i < count; ++i) rows[i] = pool.keys + base[kept[i]] * pool.D;
      dots(q, rows.data(), count, pool.D, out);
    }
    void accumulate_values(float* acc, const float* weights, const int32_t* kept, const int64_t* base,
                           int64_t count) {
      rows.resize(count);
      for (int64_t i = 0; i < count; ++i) rows[i] = pool.values + base[kept[i]] * pool.D;
      accumulate_rows(acc, weights, rows.data(), count, pool.D);
    }
  };
  Reader reader() const { return Reader{*this}; }
};

struct QuantizedRows {
  using Row = float;
  const uint8_t* keys;  // (rows, P) codes, P = D (int8) or D / 2 (int4)
  const uint8_t* values;
  const uint8_t* key_params;  // (rows, 3): fp16 scale bits (little-endian), zero point
  const uint8_t* value_params;
  int64_t D;
  int bits;

  int64_t width() const { return bits == 8 ? D : D / 2; }
  static float scale_of(const uint8_t* p) {
    return static_cast<float>(c10::Half(static_cast<uint16_t>(p[0] | (p[1] << 8)), c10::Half::from_bits()));
  }

  // row r's first `count` values into out: (code - zero) * scale, as dequantize_kv computes them
  void dequantize(const uint8_t* codes, const uint8_t* params, int64_t r, int64_t count, float* out) const {
    const uint8_t* c = codes + r * width();
    const uint8_t* p = params + r * 3;
    const float scale = scale_of(p), zero = static_cast<float>(p[2]);
    if (bits == 8) {
      for (int64_t d = 0; d < count; ++d) out[d] = (static_cast<float>(c[d]) - zero) * scale;
      return;
    }
    const int64_t half = D / 2, low = std::min(count, half);  // value d: low nibble of byte d, d + D/2: high
    for (int64_t d = 0; d < low; ++d) out[d] = (static_cast<float>(c[d] & 15) - zero) * scale;
    for (int64_t d = half; d < count; ++d) out[d] = (static_cast<float>(c[d - half] >> 4) - zero) * scale;
  }

  struct Reader {
    const QuantizedRows& pool;
    int64_t rank = 0;
    std::vector<float> low, key_rows, value_rows, weights, scales;  // low (n, rank); rows (n, D) where dequantized
    std::vector<uint8_t> have_key, have_value;  // whether row j of the item is in key_rows / value_rows
    std::vector<const float*> float_rows;
    std::vector<const uint8_t*> code_rows;
    std::vector<int32_t> zeros;

    bool in_place() const { return quantized_decode_supported(pool.bits, pool.D); }
    void reset(int64_t n, int64_t scored_rank) {
      rank = scored_rank;
      low.resize(n * rank);
      if (!in_place()) key_rows.resize(n * pool.D), value_rows.resize(n * pool.D);
      have_key.assign(in_place() ? 0 : n, 0), have_value.assign(in_place() ? 0 : n, 0);
    }
    const float* scored_key(int64_t j, int64_t r) {
      pool.dequantize(pool.keys, pool.key_params, r, rank, low.data() + j * rank);
      return low.data() + j * rank;
    }
    void key_dots(const float* q, const int32_t* kept, const int64_t* base, int64_t count, float* out) {
      if (!in_place()) {
        float_rows.resize(count);
        for (int64_t i = 0; i < count; ++i)
          float_rows[i] = row(pool.keys, pool.key_params, have_key, key_rows, kept[i], base[kept[i]]);
        return dots(q, float_rows.data(), count, pool.D, out);
      }
#if defined(KILN_AVX512) || defined(KILN_AVX2)
      for (int64_t i0 = 0; i0 < count; i0 += kCodeLanes) {
        const int64_t tile = std::min<int64_t>(kCodeLanes, count - i0);
        gather(pool.keys, pool.key_params, kept + i0, base, tile);
        dots_codes(q, code_rows.data(), zeros.data(), tile, pool.D, pool.bits, out + i0);
        for (int64_t k = 0; k < tile; ++k) out[i0 + k] *= scales[k];
      }
#endif
    }
    void accumulate_values(float* acc, const float* p, const int32_t* kept, const int64_t* base, int64_t count) {
      if (!in_place()) {
        float_rows.resize(count);
        for (int64_t i = 0; i < count; ++i)
          float_rows[i] = row(pool.values, pool.value_params, have_value, value_rows, kept[i], base[kept[i]]);
        return accumulate_rows(acc, p, float_rows.data(), count, pool.D);
      }
#if defined(KILN_AVX512) || defined(KILN_AVX2)
      for (int64_t i0 = 0; i0 < count; i0 += kCodeLanes) {
        const int64_t tile = std::min<int64_t>(kCodeLanes, count - i0);
        gather(pool.values, pool.value_params, kept + i0, base, tile);
        weights.resize(tile);
        for (int64_t k = 0; k < tile; ++k) weights[k] = p[i0 + k] * scales[k];
        accumulate_codes(acc, weights.data(), code_rows.data(), zeros.data(), tile, pool.D, pool.bits);
      }
#endif
    }
    // the code rows, zero points and scales of kept rows kept[0, tile)
    void gather(const uint8_t* codes, const uint8_t* params, const int32_t* kept, const int64_t* base, int64_t tile) {
      code_rows.resize(tile), zeros.resize(tile), scales.resize(tile);
      for (int64_t k = 0; k < tile; ++k) {
        const int64_t r = base[kept[k]];
        code_rows[k] = codes + r * pool.width();
        zeros[k] = params[r * 3 + 2];
        scales[k] = scale_of(params + r * 3);
      }
    }
    const float* row(const uint8_t* codes, const uint8_t* params, std::vector<uint8_t>& have,
                     std::vector<float>& rows, int64_t j, int64_t r) {
      float* out = rows.data() + j * pool.D;
      if (!have[j]) pool.dequantize(codes, params, r, pool.D, out), have[j] = 1;
      return out;
    }
  };
  Reader reader() const { return Reader{*this}; }
};

template <typename T, typename Pool>
void loki_impl(const T* q, const Pool& pool, T* out, const int32_t* tables, const int32_t* lens, int64_t num_seqs,
               int64_t table_width, int64_t H, int64_t KVH, int64_t D, int64_t block_size, int64_t rank,
               double top_k, float scale, int64_t window) {
  using R = typename Pool::Row;
  const int64_t group = H / KVH;
#pragma omp parallel
  {
    std::vector<float> approx, scores, qf(group * D), acc(D);
    std::vector<int64_t> base;
    std::vector<int32_t> kept, buckets;
    std::vector<const R*> rows;
    std::vector<std::pair<float, int32_t>> bucket_members;
    auto reader = pool.reader();
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < num_seqs * KVH; ++item) {
      const int64_t seq = item / KVH, kv = item % KVH;
      const int64_t length = lens[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      const int64_t n = length - first;
      const int32_t* table = tables + seq * table_width;
      base.resize(n);  // each visible key's pool row, slot * KVH + kv
      for (int64_t j = 0, p = first; j < n;) {  // block by block: no division per token
        const int64_t start = static_cast<int64_t>(table[p / block_size]) * block_size;
        for (int64_t o = p % block_size; o < block_size && j < n; ++o, ++j, ++p) base[j] = (start + o) * KVH + kv;
      }
      reader.reset(n, rank);
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(q[(seq * H + kv * group + g) * D + d]);
      int64_t count = static_cast<int64_t>(std::ceil(top_k * n - 1e-9));
      count = std::max<int64_t>(1, std::min(count, n));
      const bool sparse = count < n;
      if (sparse) {  // rank-r scores of all G heads
        approx.resize(group * n);
        rows.resize(n);
        for (int64_t j = 0; j < n; ++j) rows[j] = reader.scored_key(j, base[j]);
#ifdef KILN_AVX512
        if (group <= kMaxLokiGroup && transposed_scores_pay(rank, group)) {
          for (int64_t j0 = 0; j0 < n; j0 += 16)
            rank_scores(qf.data(), D, group, rows.data() + j0, std::min<int64_t>(16, n - j0), rank,
                        approx.data() + j0, n);
        } else
#endif
          for (int64_t g = 0; g < group; ++g) dots(qf.data() + g * D, rows.data(), n, rank, approx.data() + g * n);
      }
      kept.resize(n);
      buckets.resize(n);
      for (int64_t g = 0; g < group; ++g) {
        int64_t num_kept = n;
        if (sparse) {
          num_kept = -1;
#ifdef KILN_AVX512
          if (n >= kVectorSelect)
            num_kept = select_top_vector(approx.data() + g * n, n, count, kept.data(), buckets.data());  // band scratch
#endif
          if (num_kept < 0)
            num_kept = select_top(approx.data() + g * n, n, count, kept.data(), buckets.data(), bucket_members);
        } else {
          std::iota(kept.begin(), kept.end(), 0);
        }
        // exact attention over the kept rows
        scores.resize(num_kept);
        reader.key_dots(qf.data() + g * D, kept.data(), base.data(), num_kept, scores.data());
        float best = -INFINITY;
        for (int64_t i = 0; i < num_kept; ++i) {
          scores[i] *= scale;
          best = std::max(best, scores[i]);
        }
        const float total = exp_and_sum(scores.data(), num_kept, best);
        std::fill(acc.begin(), acc.end(), 0.f);
        reader.accumulate_values(acc.data(), scores.data(), kept.data(), base.data(), num_kept);
        T* o = out + (seq * H + kv * group + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] / total);
      }
    }
  }
}

template <typename T>
void run_loki(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
              const c10::optional<at::Tensor>& key_params, const c10::optional<at::Tensor>& value_params,
              int64_t bits, at::Tensor& out, const at::Tensor& tables, const at::Tensor& lens, int64_t block_size,
              int64_t rank, double top_k, float scale, int64_t window) {
  const int64_t M = q.size(0), H = q.size(1), D = q.size(2), KVH = key_cache.size(1), width = tables.size(1);
  const T* qp = q.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  const int32_t *t = tables.const_data_ptr<int32_t>(), *l = lens.const_data_ptr<int32_t>();
  if (bits == 0) {
    const PoolRows<T> pool{key_cache.const_data_ptr<T>(), value_cache.const_data_ptr<T>(), D};
    loki_impl<T>(qp, pool, o, t, l, M, width, H, KVH, D, block_size, rank, top_k, scale, window);
  } else {
    const QuantizedRows pool{key_cache.const_data_ptr<uint8_t>(),   value_cache.const_data_ptr<uint8_t>(),
                             key_params->const_data_ptr<uint8_t>(), value_params->const_data_ptr<uint8_t>(),
                             D,                                     static_cast<int>(bits)};
    loki_impl<T>(qp, pool, o, t, l, M, width, H, KVH, D, block_size, rank, top_k, scale, window);
  }
}

at::Tensor loki_decode_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens,
                                 int64_t block_size, int64_t rank, double top_k, double scale, int64_t window,
                                 const c10::optional<at::Tensor>& key_params,
                                 const c10::optional<at::Tensor>& value_params, int64_t bits) {
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 3 && value_cache.dim() == 3, "q and the caches are 3-D");
  TORCH_CHECK(q.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "q and the caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens are int32");
  TORCH_CHECK(bits == 0 || bits == 8 || bits == 4, "bits is 0 (a model-dtype pool), 8 or 4");
  const int64_t H = q.size(1), D = q.size(2), KVH = key_cache.size(1);
  TORCH_CHECK(H % KVH == 0 && rank >= 1 && rank <= D, "bad shapes or rank");
  if (bits == 0) {
    TORCH_CHECK(q.scalar_type() == key_cache.scalar_type() && q.scalar_type() == value_cache.scalar_type(),
                "q and the caches must share a dtype");
    TORCH_CHECK(key_cache.size(2) == D, "bad shapes or rank");
  } else {
    TORCH_CHECK(key_cache.scalar_type() == at::kByte && value_cache.scalar_type() == at::kByte,
                "a quantized pool holds uint8 codes");
    TORCH_CHECK(key_cache.size(2) == (bits == 8 ? D : D / 2) && value_cache.sizes() == key_cache.sizes(),
                "the codes' row length does not match head_dim and bits");
    TORCH_CHECK(key_params.has_value() && value_params.has_value(), "a quantized pool needs key/value params");
    for (const auto& params : {*key_params, *value_params})
      TORCH_CHECK(params.scalar_type() == at::kByte && params.is_contiguous() && params.dim() == 3 &&
                      params.size(0) == key_cache.size(0) && params.size(1) == KVH && params.size(2) == 3,
                  "key/value params are contiguous (slots, KVH, 3) uint8");
  }
  const auto tables = block_tables.contiguous();
  const auto lens = context_lens.contiguous();
  auto out = at::empty_like(q);
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat) {
    run_loki<float>(q, key_cache, value_cache, key_params, value_params, bits, out, tables, lens, block_size, rank,
                    top_k, s, window);
  } else if (q.scalar_type() == at::kBFloat16) {
    run_loki<at::BFloat16>(q, key_cache, value_cache, key_params, value_params, bits, out, tables, lens,
                           block_size, rank, top_k, s, window);
  } else {
    TORCH_CHECK(false, "loki_decode_attention takes fp32 or bf16");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def(
      "loki_decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, int block_size, int rank, float top_k, float scale, int window, "
      "Tensor? key_params=None, Tensor? value_params=None, int bits=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("loki_decode_attention", &loki_decode_attention); }
