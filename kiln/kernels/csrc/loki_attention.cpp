// kiln::loki_decode_attention: Loki sparse attention (Singhania et al., NeurIPS 2024) of one decode query
// per sequence over the paged KV pool, read in place. The pool holds keys rotated by the layer's PCA basis
// and the query comes rotated the same way (kiln/kernels/loki_attention.py), so the first `rank`
// coordinates of each key are its top principal components.
//
// One work item per (sequence, KV head), run under OpenMP: score each visible key on its first `rank`
// coordinates for all the KV head's query heads at once (each key's first r elements read once), then per
// query head keep the top `count` (`select_top`: a histogram pass and a compaction pass, O(n)), and run exact softmax attention over those only, in fp32. With count = n nothing is scored or
// selected and every key is attended, in position order.

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

namespace {

template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  float total = 0.f;
  for (int64_t d = 0; d < n; ++d) total += q[d] * static_cast<float>(k[d]);
  return total;
}

// Fixed-length dot products the compiler unrolls into a few vector FMAs (rank 8, head_dim 32/64/128).
template <int N, typename T>
inline float dot_fixed(const float* q, const T* k) {
  float total = 0.f;
  for (int d = 0; d < N; ++d) total += q[d] * static_cast<float>(k[d]);
  return total;
}

template <typename T>
inline float dot_any(const float* q, const T* k, int64_t n) {
  switch (n) {
    case 8: return dot_fixed<8>(q, k);
    case 16: return dot_fixed<16>(q, k);
    case 32: return dot_fixed<32>(q, k);
    case 64: return dot_fixed<64>(q, k);
    case 128: return dot_fixed<128>(q, k);
    default: return dot(q, k, n);
  }
}

constexpr int kBuckets = 256;

// Keep the `count` largest of scores[0, n) (lo/hi their min and max): a 256-bucket histogram finds the
// bucket the count-th largest falls in; one pass then keeps every key above that bucket and collects the
// bucket's own, of which nth_element picks the rest. O(n) with two passes, ~10x fewer comparisons than
// nth_element over all n. `kept` gets the indices (those above the bucket in pool order, then the rest).
inline int64_t select_top(const float* scores, int64_t n, int64_t count, float lo, float hi, int32_t* kept,
                          std::vector<std::pair<float, int32_t>>& bucket_members) {
  if (!(hi > lo)) {  // all equal: the first count
    for (int64_t j = 0; j < count; ++j) kept[j] = static_cast<int32_t>(j);
    return count;
  }
  const float inverse = kBuckets / (hi - lo);
  int32_t histogram[kBuckets] = {0};
  for (int64_t j = 0; j < n; ++j) ++histogram[std::min(kBuckets - 1, static_cast<int>((scores[j] - lo) * inverse))];
  int64_t above = 0;
  int bucket = kBuckets - 1;
  while (above + histogram[bucket] < count) above += histogram[bucket--];
  int64_t num_kept = 0;
  bucket_members.clear();
  for (int64_t j = 0; j < n; ++j) {
    const int b = std::min(kBuckets - 1, static_cast<int>((scores[j] - lo) * inverse));
    kept[num_kept] = static_cast<int32_t>(j);
    num_kept += b > bucket;
    if (b == bucket) bucket_members.emplace_back(scores[j], static_cast<int32_t>(j));
  }
  const int64_t within = count - above;  // 1 <= within <= bucket_members.size()
  std::nth_element(bucket_members.begin(), bucket_members.begin() + (within - 1), bucket_members.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
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
    std::vector<float> approx, scores, qf(group * D), acc(D), lo(group), hi(group);
    std::vector<int64_t> base;
    std::vector<int32_t> kept;
    std::vector<std::pair<float, int32_t>> bucket_members;
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < num_seqs * KVH; ++item) {
      const int64_t seq = item / KVH, kv = item % KVH;
      const int64_t length = lens[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      const int64_t n = length - first;
      const int32_t* table = tables + seq * table_width;
      base.resize(n);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t p = first + j;
        base[j] = (static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size) * row + kv * D;
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(q[(seq * H + kv * group + g) * D + d]);
      int64_t count = static_cast<int64_t>(std::ceil(top_k * n - 1e-9));
      count = std::max<int64_t>(1, std::min(count, n));
      const bool sparse = count < n;
      if (sparse) {  // rank-r scores of all G heads (each key's first r coordinates read once), min and max
        approx.resize(group * n);
        std::fill(lo.begin(), lo.end(), INFINITY);
        std::fill(hi.begin(), hi.end(), -INFINITY);
        for (int64_t j = 0; j < n; ++j) {
          const T* k = keys + base[j];
          for (int64_t g = 0; g < group; ++g) {
            const float a = rank == 8 ? dot_fixed<8>(qf.data() + g * D, k) : dot_any(qf.data() + g * D, k, rank);
            approx[g * n + j] = a;
            lo[g] = std::min(lo[g], a);
            hi[g] = std::max(hi[g], a);
          }
        }
      }
      kept.resize(n);
      for (int64_t g = 0; g < group; ++g) {
        int64_t num_kept = n;
        if (sparse) {
          num_kept = select_top(approx.data() + g * n, n, count, lo[g], hi[g], kept.data(), bucket_members);
        } else {
          std::iota(kept.begin(), kept.end(), 0);
        }
        const float* qg = qf.data() + g * D;
        scores.resize(num_kept);
        float best = -INFINITY;
        for (int64_t i = 0; i < num_kept; ++i) {
          scores[i] = dot_any(qg, keys + base[kept[i]], D) * scale;
          best = std::max(best, scores[i]);
        }
        float total = 0.f;
        for (int64_t i = 0; i < num_kept; ++i) {  // a plain loop over an array: vectorised expf
          scores[i] = std::exp(scores[i] - best);
          total += scores[i];
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t i = 0; i < num_kept; ++i) {
          const T* v = values + base[kept[i]];
          const float p = scores[i];
          for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(v[d]);
        }
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
