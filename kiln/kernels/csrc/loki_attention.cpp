// kiln::loki_decode_attention: Loki sparse attention (Singhania et al., NeurIPS 2024) of one decode query
// per sequence over the paged KV pool, read in place. The pool holds keys rotated by the layer's PCA basis
// and the query comes rotated the same way (kiln/kernels/loki_attention.py), so the first `rank`
// coordinates of each key are its top principal components.
//
// One work item per (sequence, KV head), run under OpenMP: score each visible key on its first `rank`
// coordinates for all the KV head's query heads at once (each key's first r elements read once), then per
// query head find the count-th largest score (a histogram pass, then std::nth_element inside one bucket:
// O(n), and ~10x fewer comparisons than nth_element over all n), keep the keys at or above it in pool order, and run exact softmax attention over those only, in fp32. With count = n nothing is scored or
// selected and every key is attended, in position order.

#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace {

template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  float total = 0.f;
  for (int64_t d = 0; d < n; ++d) total += q[d] * static_cast<float>(k[d]);
  return total;
}

// The count-th largest of scores[0, n): a 256-bucket histogram between min and max finds the bucket it
// falls in (one pass), then nth_element runs inside that bucket only.
inline float kth_largest(const float* scores, int64_t n, int64_t count, std::vector<float>& buffer) {
  float low = scores[0], high = scores[0];
  for (int64_t j = 1; j < n; ++j) {
    low = std::min(low, scores[j]);
    high = std::max(high, scores[j]);
  }
  if (!(high > low)) return high;
  constexpr int kBuckets = 256;
  const float inverse = kBuckets / (high - low);
  int64_t histogram[kBuckets] = {0};
  for (int64_t j = 0; j < n; ++j) {
    const int bucket = std::min(kBuckets - 1, static_cast<int>((scores[j] - low) * inverse));
    ++histogram[bucket];
  }
  int64_t above = 0;
  int bucket = kBuckets - 1;
  while (above + histogram[bucket] < count) above += histogram[bucket--];
  buffer.clear();
  for (int64_t j = 0; j < n; ++j) {
    const int b = std::min(kBuckets - 1, static_cast<int>((scores[j] - low) * inverse));
    if (b == bucket) buffer.push_back(scores[j]);
  }
  const int64_t within = count - above;  // 1 <= within <= buffer.size()
  std::nth_element(buffer.begin(), buffer.begin() + (within - 1), buffer.end(), std::greater<float>());
  return buffer[within - 1];
}

template <typename T>
void loki_impl(const T* q, const T* keys, const T* values, T* out, const int32_t* tables, const int32_t* lens,
               int64_t num_seqs, int64_t table_width, int64_t H, int64_t KVH, int64_t D, int64_t block_size,
               int64_t rank, double top_k, float scale, int64_t window) {
  const int64_t group = H / KVH;
  const int64_t row = KVH * D;  // elements per pool slot
#pragma omp parallel
  {
    std::vector<float> approx, bucket_buffer, scores, qf(group * D), acc(D);
    std::vector<int64_t> base;
    std::vector<int32_t> kept;
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
      if (sparse) {  // rank-r scores of all G heads, each key's first r coordinates read once
        approx.resize(group * n);
        for (int64_t j = 0; j < n; ++j) {
          const T* k = keys + base[j];
          for (int64_t g = 0; g < group; ++g) approx[g * n + j] = dot(qf.data() + g * D, k, rank);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        kept.resize(n);
        int64_t num_kept = n;
        if (sparse) {  // the keys at or above the count-th largest score, in pool order
          const float* row_scores = approx.data() + g * n;
          const float threshold = kth_largest(row_scores, n, count, bucket_buffer);
          int64_t above = 0;  // keys strictly above the threshold are all kept; ties fill the rest in order
          for (int64_t j = 0; j < n; ++j) above += row_scores[j] > threshold;
          int64_t ties = count - above;
          num_kept = 0;
          for (int64_t j = 0; j < n; ++j) {  // branch-free compaction
            const bool keep = row_scores[j] > threshold || (row_scores[j] == threshold && ties > 0);
            ties -= row_scores[j] == threshold && keep;
            kept[num_kept] = static_cast<int32_t>(j);
            num_kept += keep;
          }
        } else {
          std::iota(kept.begin(), kept.end(), 0);
        }
        const float* qg = qf.data() + g * D;
        scores.resize(num_kept);
        float best = -INFINITY;
        for (int64_t i = 0; i < num_kept; ++i) {
          scores[i] = dot(qg, keys + base[kept[i]], D) * scale;
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
