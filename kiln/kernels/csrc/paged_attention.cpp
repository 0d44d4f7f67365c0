// kiln::paged_attention: attention of each sequence's new queries over its keys/values where the paged KV
// pool holds them (slot = block * block_size + offset), read in place: no per-step gather of the context.
//
// Work items are (sequence, query tile, range of kv heads), run under OpenMP with dynamic scheduling. An
// item holds all G = H / KVH query heads of its kv heads for up to `tile_queries` queries: its rows share
// every K/V row it loads. A range is all KVH heads unless there are too few (sequence, tile) pairs to
// keep the threads busy: a token's KVH * D keys are contiguous in the pool, and reading them together
// streams the pool (one head at a time read rows KVH * D apart, a new 4 KB page nearly every row, and
// ran ~1.5x slower in bf16 on the 134M decode shape, python -m kiln.bench.paged_attention --mode cpp).
// Keys are visited kKeyTile at a time with an online softmax (running max, running sum, fp32 accumulator
// per row), so no context-length score row is ever materialised. bf16/fp16 K/V tiles are widened to fp32
// once per tile when several rows share them (GQA, query tiles); fp32 ones, and those of an MHA decode,
// are read straight from the pool, converted on load (a bf16 MHA decode reads bf16 pairs: dot products by
// vdpbf16ps, values widened two at a time, paged_attention_simd.h). No software prefetch: on the 2-vCPU
// AVX-512/AMX Xeon of issue 12's final run, prefetching the next tile's rows (1.2-1.3x on one thread of the
// AMD EPYC it was written on) made the 134M decode of 64 x 192 tokens 1.2-1.5x slower at 2 threads (bf16
// 1.54-1.92 ms vs 1.23-1.55; fp32 2.29-3.05 vs 1.65-1.99; three interleaved runs of a temporary build
// with both variants, BENCHMARKS.md). The hardware prefetchers stream a block's rows there; the software
// requests probably competed with them for line fill buffers. Key tiles of 16 and 32 ran alike without it.
//
// Semantics follow kiln.engine.attention.TorchPagedAttention: query t of sequence s sits at position
// p = context_len - query_len + t and sees key positions j <= p (and p - j < sliding_window when it is
// > 0); ALiBi adds slope_h * j to the scaled score, computed as slope_h * (j - p), which softmax treats
// the same.

#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "paged_attention_simd.h"

namespace {

constexpr int64_t kKeyTile = 16;    // keys per online-softmax step; the score buffer is rows x kKeyTile
constexpr int64_t kTargetRows = 32; // query rows (queries x heads of a group) that share a K/V load

template <typename T>
struct Problem {
  const T* q;
  const T* keys;
  const T* values;
  T* out;
  const int32_t* block_tables;
  const int32_t* query_starts;
  const int32_t* query_lens;
  const int32_t* context_lens;
  const float* slopes;  // (H,) or nullptr
  int64_t q_stride_token, q_stride_head, k_stride_slot, k_stride_head, v_stride_slot, v_stride_head;
  int64_t table_width, num_heads, num_kv_heads, head_dim, block_size, window, tile_queries;
  float scale;
  // A quantized pool (paged_attention_quantized): keys/values are null, and rows (slot, kv head) are
  // `packed` bytes of codes with 3 bytes of params each (fp16 scale bits, uint8 zero point), all contiguous.
  // bits 0 = unquantized.
  int64_t bits = 0, packed = 0;
  const uint8_t* key_codes = nullptr;
  const uint8_t* value_codes = nullptr;
  const uint8_t* key_params = nullptr;
  const uint8_t* value_params = nullptr;
};

// Queries [t0, t1) of sequence `seq` with the query heads of kv heads [h0, h1). Its row r is kv head
// h0 + r / (tq * G), query t0 + (r / G) % tq, query head (that kv head) * G + r % G, for tq = t1 - t0.
struct Item {
  int64_t seq, t0, t1, h0, h1;
  // A decode split along its context (run: batch-1 decodes): this item takes part `part` of `parts` of the
  // context's tiles and writes its unnormalised result to `partial` (rows x (D + 2): acc, max, sum) for run
  // to combine; parts 1 writes the output itself.
  int64_t part = 0, parts = 1;
  float* partial = nullptr;
};

// Per-thread buffers, sized once for the largest item.
struct Scratch {
  std::vector<float> q, acc, max, sum, scores, keys, values;
  std::vector<const void*> key_rows, value_rows;  // (kv heads of an item, kKeyTile): fp32 or pool rows
  // An MHA decode of a bf16 pool (KILN_BF16_PAIRS): q rows as they are (bf16, unscaled) and accumulators
  // in the pairs layout of paged_attention_simd.h, split_width(head_dim) floats a row.
  std::vector<c10::BFloat16> q16;
  std::vector<float> pairs;
  // Room for an item of `rows` query rows over `kv_heads` heads. Each thread keeps one Scratch across calls
  // (grown, never shrunk or cleared: attend_item sets what it reads): allocating and zeroing it per call
  // was about a third of a batch-1 decode call at short contexts (perf, Zen 5 EPYC, ~11 us a call).
  void fit(int64_t rows, int64_t kv_heads, int64_t head_dim) {
    grow(q, rows * head_dim), grow(acc, rows * head_dim), grow(max, rows), grow(sum, rows);
    grow(scores, rows * kKeyTile), grow(keys, kv_heads * kKeyTile * head_dim);
    grow(values, kv_heads * kKeyTile * head_dim), grow(key_rows, kv_heads * kKeyTile);
    grow(value_rows, kv_heads * kKeyTile), grow(q16, rows * head_dim);
    grow(pairs, rows * ((head_dim + 31) / 32 * 32));
  }
  template <typename V>
  static void grow(std::vector<V>& buffer, int64_t size) {
    if (int64_t(buffer.size()) < size) buffer.resize(size);
  }
};

// Whether rows of type R (what attend_key_tile reads) take the bf16 pairs path.
template <typename R>
constexpr bool kPairs =
#ifdef KILN_BF16_PAIRS
    std::is_same_v<R, c10::BFloat16>;
#else
    false;
#endif

// Point rows[h * kKeyTile + k] at key position j0 + k's row of kv head h0 + h (fp32 pool), or widen it
// into `buffer`. Heads inside the loop: a token's KVH * D values are contiguous, so the pool is streamed.
template <typename T>
void load_rows(const Problem<T>& P, const T* cache, int64_t stride_slot, int64_t stride_head,
               const int32_t* table, const Item& item, int64_t j0, int64_t count, bool widen, float* buffer,
               const void** rows) {
  int64_t block = j0 / P.block_size, offset = j0 % P.block_size;
  for (int64_t k = 0; k < count; ++k) {
    const T* slot = cache + (int64_t(table[block]) * P.block_size + offset) * stride_slot;
    for (int64_t h = 0; h < item.h1 - item.h0; ++h) {
      const T* row = slot + (item.h0 + h) * stride_head;
      if (std::is_same_v<T, float> || !widen) {
        rows[h * kKeyTile + k] = row;
      } else {
        float* widened = buffer + (h * kKeyTile + k) * P.head_dim;
        to_float(row, widened, P.head_dim);
        rows[h * kKeyTile + k] = widened;
      }
    }
    if (++offset == P.block_size) offset = 0, ++block;
  }
}

// load_rows for a quantized pool: every row dequantized into `buffer` (kv_quant.py's layout).
template <typename T>
void load_quantized_rows(const Problem<T>& P, const uint8_t* codes, const uint8_t* params, const int32_t* table,
                         const Item& item, int64_t j0, int64_t count, float* buffer, const void** rows) {
  int64_t block = j0 / P.block_size, offset = j0 % P.block_size;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t slot = int64_t(table[block]) * P.block_size + offset;
    for (int64_t h = 0; h < item.h1 - item.h0; ++h) {
      const int64_t row = slot * P.num_kv_heads + item.h0 + h;
      float* widened = buffer + (h * kKeyTile + k) * P.head_dim;
      c10::Half scale16;
      std::memcpy(&scale16, params + 3 * row, 2);
      const float scale = float(scale16), zero = float(params[3 * row + 2]);
      if (P.bits == 8)
        dequantize_int8(codes + row * P.packed, scale, zero, widened, P.head_dim);
      else
        dequantize_int4(codes + row * P.packed, scale, zero, widened, P.packed);
      rows[h * kKeyTile + k] = widened;
    }
    if (++offset == P.block_size) offset = 0, ++block;
  }
}

// One key tile [j0, j0 + count) for every row: scores, online-softmax update, weighted sum of values.
// R: the element type the key/value rows point at (fp32 widened rows, or the pool's own).
template <typename T, typename R>
void attend_key_tile(const Problem<T>& P, Scratch& w, const Item& item, int64_t first_position, int64_t j0,
                     int64_t count) {
  const int64_t group = P.num_heads / P.num_kv_heads, D = P.head_dim, tq = item.t1 - item.t0;
  const int64_t rows = (item.h1 - item.h0) * tq * group;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t kv = r / (tq * group), position = first_position + (r / group) % tq;
    const int64_t lo = std::max(j0, P.window > 0 ? position - P.window + 1 : j0) - j0;
    const int64_t hi = std::min(j0 + count, position + 1) - j0;  // keys [lo, hi) of the tile are seen
    if (hi <= lo) continue;
    float* s = w.scores.data() + r * kKeyTile;
    const R* const* keys = reinterpret_cast<const R* const*>(w.key_rows.data()) + kv * kKeyTile;
    const float slope = P.slopes ? P.slopes[(item.h0 + kv) * group + r % group] : 0.0f;
    float tile_max = kNegInf, scale = 1.0f;  // fp32 q rows come scaled
#ifdef KILN_BF16_PAIRS
    if constexpr (kPairs<R>) {
      dots_bf16(w.q16.data() + r * D, keys + lo, hi - lo, D, s + lo);
      scale = P.scale;
    } else
#endif
      dots(w.q.data() + r * D, keys + lo, hi - lo, D, s + lo);
    for (int64_t k = lo; k < hi; ++k) {
      // slope * (j - p), not slope * j: the same softmax, without fp32 round-off of a bias near slope * p
      s[k] = s[k] * scale + slope * float(j0 + k - position);
      tile_max = std::max(tile_max, s[k]);
    }
    const float new_max = std::max(w.max[r], tile_max);
    const float correction = std::exp(w.max[r] - new_max);  // 0 on the first tile (max is -inf)
    w.sum[r] = w.sum[r] * correction + exp_and_sum(s + lo, hi - lo, new_max);
    w.max[r] = new_max;
    const R* const* values = reinterpret_cast<const R* const*>(w.value_rows.data()) + kv * kKeyTile + lo;
#ifdef KILN_BF16_PAIRS
    if constexpr (kPairs<R>) {
      accumulate_bf16(w.pairs.data() + r * split_width(D), correction, s + lo, values, hi - lo, D);
      continue;
    }
#endif
    accumulate(w.acc.data() + r * D, correction, s + lo, values, hi - lo, D);
  }
}

// The q row (scaled, fp32) and output row of item row r: element offsets of (token, query head).
template <typename T>
int64_t row_token_and_head(const Problem<T>& P, const Item& item, int64_t r, int64_t* head) {
  const int64_t group = P.num_heads / P.num_kv_heads, tq = item.t1 - item.t0;
  *head = (item.h0 + r / (tq * group)) * group + r % group;
  return P.query_starts[item.seq] + item.t0 + (r / group) % tq;
}

}  // namespace

#include "paged_attention_decode.h"  // attend_decode: needs Problem and Item above
#include "paged_attention_decode_quantized.h"  // attend_decode_quantized: the same over int8 / int4 codes

namespace {

// A decode item through the two-pass walk of its pool: the codes of a quantized one, else the rows.
template <typename T>
void walk_decode(const Problem<T>& P, const Item& item) {
  if (P.bits)
    attend_decode_quantized(P, item);
  else
    attend_decode(P, item);
}

template <typename T>
void attend_item(const Problem<T>& P, Scratch& w, const Item& item, bool decode_path) {
  if (decode_path && item.t1 - item.t0 == 1 && P.query_lens[item.seq] == 1) {  // run checked the walk supports it
    walk_decode(P, item);
    return;
  }
  const int64_t D = P.head_dim, tq = item.t1 - item.t0;
  const int64_t rows = (item.h1 - item.h0) * tq * (P.num_heads / P.num_kv_heads);
  // Widen bf16/fp16 rows once per tile when several rows (queries x heads of a group) share them; a decode
  // of MHA has one, and reads them straight from the pool (a bf16 pool as bf16 pairs, KILN_BF16_PAIRS).
  const bool widen = tq * (P.num_heads / P.num_kv_heads) > 2 || P.bits;
  const bool pairs = !widen && kPairs<T>;
  for (int64_t r = 0, head; r < rows; ++r) {
    const int64_t token = row_token_and_head(P, item, r, &head);
    const T* q = P.q + token * P.q_stride_token + head * P.q_stride_head;
    if constexpr (kPairs<T>) {
      if (pairs) {
        std::copy(q, q + D, w.q16.data() + r * D);
        continue;
      }
    }
    float* q_row = w.q.data() + r * D;
    to_float(q, q_row, D);
    for (int64_t d = 0; d < D; ++d) q_row[d] *= P.scale;
  }
  if (pairs)
    std::fill(w.pairs.begin(), w.pairs.begin() + rows * ((D + 31) / 32 * 32), 0.0f);
  else
    std::fill(w.acc.begin(), w.acc.begin() + rows * D, 0.0f);
  std::fill(w.max.begin(), w.max.begin() + rows, kNegInf);
  std::fill(w.sum.begin(), w.sum.begin() + rows, 0.0f);
  const int64_t first_position = P.context_lens[item.seq] - P.query_lens[item.seq] + item.t0;
  const int64_t key_end = first_position + tq;  // one past the last query's position
  const int64_t key_begin = P.window > 0 ? std::max<int64_t>(0, first_position - P.window + 1) : 0;
  const int32_t* table = P.block_tables + item.seq * P.table_width;
  for (int64_t j0 = key_begin; j0 < key_end; j0 += kKeyTile) {
    const int64_t count = std::min(kKeyTile, key_end - j0);
    if (P.bits) {
      load_quantized_rows(P, P.key_codes, P.key_params, table, item, j0, count, w.keys.data(), w.key_rows.data());
      load_quantized_rows(P, P.value_codes, P.value_params, table, item, j0, count, w.values.data(),
                          w.value_rows.data());
      attend_key_tile<T, float>(P, w, item, first_position, j0, count);
      continue;
    }
    load_rows(P, P.keys, P.k_stride_slot, P.k_stride_head, table, item, j0, count, widen, w.keys.data(),
              w.key_rows.data());
    load_rows(P, P.values, P.v_stride_slot, P.v_stride_head, table, item, j0, count, widen, w.values.data(),
              w.value_rows.data());
    if (widen)
      attend_key_tile<T, float>(P, w, item, first_position, j0, count);
    else
      attend_key_tile<T, T>(P, w, item, first_position, j0, count);
  }
  for (int64_t r = 0, head; r < rows; ++r) {
    const int64_t token = row_token_and_head(P, item, r, &head);
#ifdef KILN_BF16_PAIRS
    if (pairs) from_pairs(w.pairs.data() + r * split_width(D), w.acc.data() + r * D, D);
#endif
    from_float(w.acc.data() + r * D, 1.0f / w.sum[r], P.out + (token * P.num_heads + head) * D, D);
  }
}

constexpr int64_t kMinPartTiles = 2;

// Items that split each sequence's context into parts of whole decode tiles (at least kMinPartTiles each),
// about `wanted` items in all, with room in `partials` for their unnormalised results. False (nothing
// split) unless every sequence is a single-query decode and some context is long enough to split.
template <typename T>
bool split_decodes(const Problem<T>& P, int64_t num_seqs, int64_t wanted, std::vector<Item>& items,
                   std::vector<float>& partials) {
  const int64_t per_seq = (wanted + num_seqs - 1) / num_seqs, rows = P.num_heads, width = P.head_dim + 2;
  std::vector<int64_t> parts(num_seqs);
  bool split = false;
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (P.query_lens[s] != 1) return false;
    const int64_t tiles = (decode_length(P, s) + kDecodeTile - 1) / kDecodeTile;
    parts[s] = std::clamp<int64_t>(tiles / kMinPartTiles, 1, per_seq);
    split = split || parts[s] > 1;
  }
  if (!split) return false;
  int64_t total = 0;
  for (int64_t s = 0; s < num_seqs; ++s) total += parts[s];
  partials.resize(total * rows * width);
  float* next = partials.data();
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int64_t p = 0; p < parts[s]; ++p, next += rows * width)
      items.push_back({s, 0, 1, 0, P.num_kv_heads, p, parts[s], parts[s] > 1 ? next : nullptr});
  return true;
}

// Sequence s's output from its parts' partials (a sequence of one part wrote its output already): each
// part's accumulator and sum scaled by exp(its max - the overall max), summed, and divided.
template <typename T>
void combine_parts(const Problem<T>& P, const std::vector<Item>& items, int64_t s) {
  std::vector<const float*> parts;
  for (const Item& item : items)
    if (item.seq == s && item.partial != nullptr) parts.push_back(item.partial);
  if (parts.empty()) return;
  const int64_t D = P.head_dim, width = D + 2;
  std::vector<float> acc(D), factor(parts.size());
  for (int64_t r = 0; r < P.num_heads; ++r) {
    float best = kNegInf, sum = 0.0f;
    for (const float* part : parts) best = std::max(best, part[r * width + D]);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (size_t p = 0; p < parts.size(); ++p) {
      const float* part = parts[p] + r * width;
      factor[p] = part[D] == kNegInf ? 0.0f : std::exp(part[D] - best);
      sum += factor[p] * part[D + 1];
      for (int64_t d = 0; d < D; ++d) acc[d] += factor[p] * part[d];
    }
    from_float(acc.data(), 1.0f / sum, P.out + (P.query_starts[s] * P.num_heads + r) * D, D);
  }
}

// Items of (sequence, query tile) with all kv heads, or with ranges of them when there are too few
// sequences and tiles to keep every thread busy (batch-1 decode).
template <typename T>
void run(const Problem<T>& P, int64_t num_seqs) {
  at::init_num_threads();  // this thread's OpenMP team size follows torch.set_num_threads
  int64_t num_tiles = 0;
  for (int64_t s = 0; s < num_seqs; ++s) num_tiles += (P.query_lens[s] + P.tile_queries - 1) / P.tile_queries;
  const int64_t wanted_items = 4 * omp_get_max_threads();  // enough for dynamic scheduling to balance
  const int64_t splits = std::clamp<int64_t>((wanted_items + num_tiles - 1) / std::max<int64_t>(num_tiles, 1), 1,
                                             P.num_kv_heads);
  const int64_t heads_per_item = (P.num_kv_heads + splits - 1) / splits;
  const char* decode_env = std::getenv("KILN_PA_DECODE");
  const std::string_view decode_setting = decode_env != nullptr ? decode_env : "";
  const bool supported =
      P.bits ? quantized_decode_supported(P.bits, P.head_dim) : decode_supported<T>(P.head_dim);
  const bool decodes_supported = supported && decode_setting != "0";
  std::vector<Item> items;
  std::vector<float> partials;
  if (decodes_supported && splits > 1 && split_decodes(P, num_seqs, wanted_items, items, partials)) {
    // Too few decodes to keep every thread busy: each is split along its context, every kv head in an item
    // (a token's KVH x D row read in one piece), where splitting the heads read each token's row in pieces a
    // row apart. 2-vCPU Zen 5 EPYC, the 134M shape's batch-1 decodes inside the engine (bf16 pool, 12 x 64
    // heads, 2 threads, torch.profiler): 15.4 / 26.1 / 41.7 us a call at 32 / 80 / 144 context with the
    // heads split, 9.7 / 13.1 / 20.6 split along the context.
#pragma omp parallel if (items.size() > 1)
    {
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < int64_t(items.size()); ++i) walk_decode(P, items[i]);
#pragma omp for
      for (int64_t s = 0; s < num_seqs; ++s) combine_parts(P, items, s);
    }
    return;
  }
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int64_t t0 = 0; t0 < P.query_lens[s]; t0 += P.tile_queries)
      for (int64_t h0 = 0; h0 < P.num_kv_heads; h0 += heads_per_item)
        items.push_back({s, t0, std::min<int64_t>(t0 + P.tile_queries, P.query_lens[s]), h0,
                         std::min(h0 + heads_per_item, P.num_kv_heads)});
  const int64_t rows = P.tile_queries * (P.num_heads / P.num_kv_heads) * heads_per_item;
  // Decodes take attend_decode (attend_decode_quantized over a quantized pool) where it supports the head
  // dim and an item holds every kv head (its walk streams each token's KVH x D row; an item of a few heads
  // reads them strided, and on the Zen 4 EPYC a batch-1 decode at 2k context ran 1.7-2.2x slower that way
  // than in the tile loop). KILN_PA_DECODE=0 sends them all through the tile loop, =1 all that the op
  // supports (the tests run both).
  const bool decode_path = decodes_supported && (heads_per_item == P.num_kv_heads || decode_setting == "1");
#pragma omp parallel if (items.size() > 1)
  {
    thread_local Scratch w;
    w.fit(rows, heads_per_item, P.head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(items.size()); ++i) attend_item(P, w, items[i], decode_path);
  }
}

// The lengths and every block a sequence reads, checked before any thread starts. Returns the output:
// uninitialised when the sequences' queries cover every row of q (the engine's case), else zeros, so rows
// no sequence covers are zeros, not garbage.
at::Tensor check_tables(const at::Tensor& q, int64_t num_slots, const at::Tensor& block_tables,
                  const at::Tensor& query_starts, const at::Tensor& query_lens, const at::Tensor& context_lens,
                  int64_t block_size, const std::optional<at::Tensor>& slopes) {
  for (const auto* t : {&block_tables, &query_starts, &query_lens, &context_lens})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device().is_cpu(),
                "paged_attention: block_tables and the lengths must be contiguous int32 CPU tensors");
  const int64_t num_seqs = query_lens.numel(), width = block_tables.size(-1);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs && query_starts.numel() == num_seqs &&
                  context_lens.numel() == num_seqs,
              "paged_attention: block_tables (S, max_blocks) and the (S,) lengths disagree on S");
  TORCH_CHECK(block_size > 0 && num_slots % block_size == 0, "paged_attention: bad block_size");
  TORCH_CHECK(!slopes || (slopes->scalar_type() == at::kFloat && slopes->numel() == q.size(1) &&
                          slopes->is_contiguous() && slopes->device().is_cpu()),
              "paged_attention: alibi_slopes must be (H,) contiguous fp32 on CPU");
  const int32_t *tables = block_tables.data_ptr<int32_t>(), *starts = query_starts.data_ptr<int32_t>();
  const int32_t *lens = query_lens.data_ptr<int32_t>(), *contexts = context_lens.data_ptr<int32_t>();
  const int64_t num_blocks = num_slots / block_size;
  int64_t num_queries = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    num_queries += lens[s];
    TORCH_CHECK(lens[s] >= 0 && lens[s] <= contexts[s] && starts[s] >= 0 && starts[s] + lens[s] <= q.size(0),
                "paged_attention: sequence ", s, " has bad query_starts/query_lens/context_lens");
    const int64_t used = (int64_t(contexts[s]) + block_size - 1) / block_size;
    TORCH_CHECK(used <= width, "paged_attention: sequence ", s, " needs ", used, " blocks; its table has ", width);
    for (int64_t b = 0; b < used; ++b)
      TORCH_CHECK(tables[s * width + b] >= 0 && tables[s * width + b] < num_blocks,
                  "paged_attention: sequence ", s, " names block ", tables[s * width + b], " outside the pool");
  }
  return num_queries == q.size(0) ? at::empty(q.sizes(), q.options()) : at::zeros(q.sizes(), q.options());
}

// Shapes and dtypes of an unquantized pool, then the tables; returns check_tables' output.
at::Tensor check_inputs(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                        const at::Tensor& block_tables, const at::Tensor& query_starts,
                        const at::Tensor& query_lens, const at::Tensor& context_lens, int64_t block_size,
                        const std::optional<at::Tensor>& slopes) {
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 3 && value_cache.sizes() == key_cache.sizes(),
              "paged_attention: q must be (N, H, D) and key/value_cache (slots, KVH, D)");
  TORCH_CHECK(q.device().is_cpu() && key_cache.device().is_cpu() && value_cache.device().is_cpu(),
              "paged_attention: this op runs on CPU tensors");
  TORCH_CHECK(key_cache.scalar_type() == q.scalar_type() && value_cache.scalar_type() == q.scalar_type(),
              "paged_attention: q, key_cache and value_cache must share a dtype");
  TORCH_CHECK(q.size(2) == key_cache.size(2) && q.size(1) % key_cache.size(1) == 0,
              "paged_attention: head dims differ, or H is not a multiple of KVH");
  TORCH_CHECK(q.stride(2) == 1 && key_cache.stride(2) == 1 && value_cache.stride(2) == 1,
              "paged_attention: the head dim must be contiguous");
  return check_tables(q, key_cache.size(0), block_tables, query_starts, query_lens, context_lens, block_size,
                      slopes);
}

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, at::Tensor& out,
            const at::Tensor& block_tables, const at::Tensor& query_starts, const at::Tensor& query_lens,
            const at::Tensor& context_lens, const float* slopes, int64_t block_size, int64_t sliding_window,
            int64_t tile_queries, double scale) {
  const Problem<T> P{q.data_ptr<T>(), keys.data_ptr<T>(), values.data_ptr<T>(), out.data_ptr<T>(),
                     block_tables.data_ptr<int32_t>(), query_starts.data_ptr<int32_t>(),
                     query_lens.data_ptr<int32_t>(), context_lens.data_ptr<int32_t>(), slopes,
                     q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
                     block_tables.size(1), q.size(1), keys.size(1), q.size(2), block_size,
                     std::max<int64_t>(sliding_window, 0), tile_queries, float(scale)};
  run(P, query_lens.numel());
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& query_starts,
                           const at::Tensor& query_lens, const at::Tensor& context_lens, int64_t block_size,
                           double scale, const std::optional<at::Tensor>& alibi_slopes, int64_t sliding_window) {
  at::Tensor out = check_inputs(q, key_cache, value_cache, block_tables, query_starts, query_lens, context_lens,
                                block_size, alibi_slopes);
  const int64_t group = q.size(1) / key_cache.size(1);
  const float* slopes = alibi_slopes ? alibi_slopes->data_ptr<float>() : nullptr;
  const int64_t tile_queries = std::max<int64_t>(1, kTargetRows / group);
  AT_DISPATCH_V2(q.scalar_type(), "paged_attention", AT_WRAP([&] {
    launch<scalar_t>(q, key_cache, value_cache, out, block_tables, query_starts, query_lens, context_lens, slopes,
                     block_size, sliding_window, tile_queries, scale);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

// The op over a quantized pool: codes uint8 (slots, KVH, D or D / 2), params uint8 (slots, KVH, 3).
at::Tensor paged_attention_quantized(const at::Tensor& q, const at::Tensor& key_codes, const at::Tensor& value_codes,
                                     const at::Tensor& key_params, const at::Tensor& value_params, int64_t bits,
                                     const at::Tensor& block_tables, const at::Tensor& query_starts,
                                     const at::Tensor& query_lens, const at::Tensor& context_lens,
                                     int64_t block_size, double scale, const std::optional<at::Tensor>& alibi_slopes,
                                     int64_t sliding_window) {
  TORCH_CHECK(bits == 8 || (bits == 4 && q.size(2) % 2 == 0), "paged_attention_quantized: bits must be 8, or 4 "
              "with an even head dim");
  const int64_t packed = bits == 8 ? q.size(2) : q.size(2) / 2;
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.device().is_cpu(),
              "paged_attention_quantized: q must be (N, H, D) on CPU, the head dim contiguous");
  for (const auto* codes : {&key_codes, &value_codes})
    TORCH_CHECK(codes->scalar_type() == at::kByte && codes->dim() == 3 && codes->size(2) == packed &&
                    codes->sizes() == key_codes.sizes() && codes->is_contiguous() && codes->device().is_cpu() &&
                    q.size(1) % codes->size(1) == 0,
                "paged_attention_quantized: codes must be contiguous uint8 (slots, KVH, ", packed, ") on CPU");
  for (const auto* params : {&key_params, &value_params})
    TORCH_CHECK(params->scalar_type() == at::kByte && params->dim() == 3 && params->size(0) == key_codes.size(0) &&
                    params->size(1) == key_codes.size(1) && params->size(2) == 3 && params->is_contiguous() &&
                    params->device().is_cpu(),
                "paged_attention_quantized: params must be contiguous uint8 (slots, KVH, 3) on CPU");
  at::Tensor out = check_tables(q, key_codes.size(0), block_tables, query_starts, query_lens, context_lens,
                                block_size, alibi_slopes);
  const int64_t tile_queries = std::max<int64_t>(1, kTargetRows / (q.size(1) / key_codes.size(1)));
  AT_DISPATCH_V2(q.scalar_type(), "paged_attention_quantized", AT_WRAP([&] {
    Problem<scalar_t> P{q.data_ptr<scalar_t>(), nullptr, nullptr, out.data_ptr<scalar_t>(),
                        block_tables.data_ptr<int32_t>(), query_starts.data_ptr<int32_t>(),
                        query_lens.data_ptr<int32_t>(), context_lens.data_ptr<int32_t>(),
                        alibi_slopes ? alibi_slopes->data_ptr<float>() : nullptr,
                        q.stride(0), q.stride(1), 0, 0, 0, 0, block_tables.size(1), q.size(1), key_codes.size(1),
                        q.size(2), block_size, std::max<int64_t>(sliding_window, 0), tile_queries, float(scale)};
    P.bits = bits, P.packed = packed;
    P.key_codes = key_codes.data_ptr<uint8_t>(), P.value_codes = value_codes.data_ptr<uint8_t>();
    P.key_params = key_params.data_ptr<uint8_t>(), P.value_params = value_params.data_ptr<uint8_t>();
    run(P, query_lens.numel());
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def(
      "paged_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor query_starts, "
      "Tensor query_lens, Tensor context_lens, int block_size, float scale, Tensor? alibi_slopes, "
      "int sliding_window) -> Tensor");
  m.def(
      "paged_attention_quantized(Tensor q, Tensor key_codes, Tensor value_codes, Tensor key_params, "
      "Tensor value_params, int bits, Tensor block_tables, Tensor query_starts, Tensor query_lens, "
      "Tensor context_lens, int block_size, float scale, Tensor? alibi_slopes, int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("paged_attention_quantized", &paged_attention_quantized);
}
