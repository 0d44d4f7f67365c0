// kiln::loki_decode_attention: Loki sparse attention (Singhania et al., NeurIPS 2024) of one decode query
// per sequence over the paged KV pool, read in place. The pool holds keys rotated by the layer's PCA basis
// and the query comes rotated the same way (kiln/kernels/loki_attention.py), so the first `rank`
// coordinates of each key are its top principal components.
//
// One work item per (sequence, KV head), run under OpenMP: score each visible key on its first `rank`
// coordinates for all the KV head's query heads (paged_attention_simd.h's `dots`, 8 or 16 keys at a time),
// per query head keep the top `count` (`select_top`: a histogram pass and a compaction pass, O(n)), then
// run exact softmax attention over those only, in fp32, again with the SIMD helpers over the kept rows'
// pointers (several scattered rows' loads in flight at once). With count = n nothing is scored or selected
// and every key is attended, in position order.

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include "paged_attention_simd.h"  // dots, accumulate, exp_and_sum

namespace {

constexpr int kBuckets = 256;
constexpr int64_t kValueTile = 16;  // value rows per accumulate call: each read whole while acc stays in registers

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

template <typename T>
void loki_impl(const T* q, const T* keys, const T* values, T* out, const int32_t* tables, const int32_t* lens,
               int64_t num_seqs, int64_t table_width, int64_t H, int64_t KVH, int64_t D, int64_t block_size,
               int64_t rank, double top_k, float scale, int64_t window) {
  const int64_t group = H / KVH;
  const int64_t row = KVH * D;  // elements per pool slot
#pragma omp parallel
  {
    std::vector<float> approx, scores, qf(group * D), acc(D);
    std::vector<int64_t> base;
    std::vector<int32_t> kept, buckets;
    std::vector<const T*> rows, key_rows, value_rows;
    std::vector<std::pair<float, int32_t>> bucket_members;
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < num_seqs * KVH; ++item) {
      const int64_t seq = item / KVH, kv = item % KVH;
      const int64_t length = lens[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      const int64_t n = length - first;
      const int32_t* table = tables + seq * table_width;
      base.resize(n);
      for (int64_t j = 0, p = first; j < n;) {  // block by block: no division per token
        const int64_t start = static_cast<int64_t>(table[p / block_size]) * block_size;
        for (int64_t o = p % block_size; o < block_size && j < n; ++o, ++j, ++p) base[j] = (start + o) * row + kv * D;
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(q[(seq * H + kv * group + g) * D + d]);
      int64_t count = static_cast<int64_t>(std::ceil(top_k * n - 1e-9));
      count = std::max<int64_t>(1, std::min(count, n));
      const bool sparse = count < n;
      if (sparse) {  // rank-r scores of all G heads, 8 or 16 keys at a time (paged_attention_simd.h's dots)
        approx.resize(group * n);
        rows.resize(n);
        for (int64_t j = 0; j < n; ++j) rows[j] = keys + base[j];
        for (int64_t g = 0; g < group; ++g) dots(qf.data() + g * D, rows.data(), n, rank, approx.data() + g * n);
      }
      kept.resize(n);
      buckets.resize(n);
      for (int64_t g = 0; g < group; ++g) {
        int64_t num_kept = n;
        if (sparse) {
          num_kept = select_top(approx.data() + g * n, n, count, kept.data(), buckets.data(), bucket_members);
        } else {
          std::iota(kept.begin(), kept.end(), 0);
        }
        // exact attention over the kept rows: dots and accumulate (paged_attention_simd.h) take 8-16 rows at
        // a time, so the scattered rows' loads overlap
        const float* qg = qf.data() + g * D;
        scores.resize(num_kept);
        key_rows.resize(num_kept);
        value_rows.resize(num_kept);
        for (int64_t i = 0; i < num_kept; ++i) {
          key_rows[i] = keys + base[kept[i]];
          value_rows[i] = values + base[kept[i]];
        }
        dots(qg, key_rows.data(), num_kept, D, scores.data());
        float best = -INFINITY;
        for (int64_t i = 0; i < num_kept; ++i) {
          scores[i] *= scale;
          best = std::max(best, scores[i]);
        }
        const float total = exp_and_sum(scores.data(), num_kept, best);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t i0 = 0; i0 < num_kept; i0 += kValueTile)
          accumulate(acc.data(), 1.f, scores.data() + i0, value_rows.data() + i0,
                     std::min<int64_t>(kValueTile, num_kept - i0), D);
        T* o = out + (seq * H + kv * group + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] / total);
      }
    }
  }
}

at::Tensor loki_decode_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens,
                                 int64_t block_size, int64_t rank, double top_k, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 3 && value_cache.dim() == 3, "q and the caches are 3-D");
  TORCH_CHECK(q.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "q and the caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == key_cache.scalar_type() && q.scalar_type() == value_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens are int32");
  const auto tables = block_tables.contiguous();
  const auto lens = context_lens.contiguous();
  const int64_t M = q.size(0), H = q.size(1), D = q.size(2), KVH = key_cache.size(1);
  TORCH_CHECK(H % KVH == 0 && key_cache.size(2) == D && rank >= 1 && rank <= D, "bad shapes or rank");
  auto out = at::empty_like(q);
  const int64_t width = tables.size(1);
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat) {
    loki_impl<float>(q.const_data_ptr<float>(), key_cache.const_data_ptr<float>(),
                     value_cache.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                     tables.const_data_ptr<int32_t>(), lens.const_data_ptr<int32_t>(), M, width, H, KVH, D,
                     block_size, rank, top_k, s, window);
  } else if (q.scalar_type() == at::kBFloat16) {
    loki_impl<at::BFloat16>(q.const_data_ptr<at::BFloat16>(), key_cache.const_data_ptr<at::BFloat16>(),
                            value_cache.const_data_ptr<at::BFloat16>(), out.mutable_data_ptr<at::BFloat16>(),
                            tables.const_data_ptr<int32_t>(), lens.const_data_ptr<int32_t>(), M, width, H, KVH,
                            D, block_size, rank, top_k, s, window);
  } else {
    TORCH_CHECK(false, "loki_decode_attention takes fp32 or bf16");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def(
      "loki_decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, int block_size, int rank, float top_k, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("loki_decode_attention", &loki_decode_attention); }
