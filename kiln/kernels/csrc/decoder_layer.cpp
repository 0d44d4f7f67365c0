// kiln::decoder_layer: one pre-norm decoder layer (RMSNorm, q/k/v projections, RoPE, paged attention over
// the KV pool, output projection, residual, RMSNorm, SwiGLU MLP, residual) for a step of decode rows, in
// one call from Python instead of about twenty.
//
// At batch-1 decode of the 134M shape the layer's arithmetic is 10 weight-streaming linears and a few
// thousand elementwise values; in the Python forward each of its ~20 op calls costs 10-25 us of module
// dispatch and routing checks, ~2 ms per token over 12 layers, which is what kept batch-1 decode from its
// bandwidth roofline (BENCHMARKS.md, issue 12). Here the same registered ops run back to back through the
// dispatcher (under a microsecond each): kiln::linear for up to `max_linear_rows` rows (else at::linear),
// kiln::rms_norm, kiln::rope, kiln::swiglu, kiln::paged_attention. Each rounds exactly where the model's
// forward does, so the result equals the Python path bit for bit (tests/kernels/test_cpu_decoder_layer.py;
// the torch reference is kiln/kernels/cpu_decoder_layer.py's `decoder_layer_reference`).
//
// weights: [attn_norm, q, k, v, o, mlp_norm, gate, up, down]; biases: [q, k, v, o, gate, up, down] (None
// where absent). A projection may be weight-only quantized (kiln/quant's int8 or int4 QuantizedLinear): its
// entry in `weights` is then the integer weight, `bits` [q, k, v, o, gate, up, down] says 8 or 4 (0 for a
// float weight) and `scales`/`offsets` hold its scale and scale * zero point; it runs kiln::quant_linear,
// the op QuantizedLinear.forward calls for the same rows, so the result is still the Python path's bit for
// bit. A w8a8 projection (bits W8A8 = -8: int8 weight, (N, 1) scale, its `packed` entry the weight's oneDNN
// int8 copy or None) runs kiln::w8a8_linear with the row limit and int8_mm choice QuantizedLinear passes.
// kiln/engine/cpu_decoder.py sends a layer with weight-only projections here only for steps of as few rows
// as QuantizedLinear gives its op (a w8a8 layer: any decode step). The new tokens' keys/values are written
// into key_cache/value_cache (slots, KVH, D) at slot_mapping before attention reads the pool in place.
// kiln::decoder_layer_quantized is the same layer over a quantized KV pool (kv_cache_dtype int8/int4), and
// kiln::decoder_layers runs L layers in turn in one call (the engine's decode step).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "simd.h"  // divide

namespace {

using OptionalTensor = std::optional<at::Tensor>;

// F.linear through a weight reordered once into oneDNN's layout (kiln/kernels/packed_weight.py).
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const OptionalTensor& b) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, b, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          std::string()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// kiln::linear up to max_rows rows, then the packed weight (where given) up to packed_rows, else at::linear.
at::Tensor kiln_linear(const at::Tensor& x, const at::Tensor& w, const OptionalTensor& b, int64_t max_rows,
                       const OptionalTensor& packed, int64_t packed_rows) {
  if (x.size(0) > max_rows) {
    if (packed.has_value() && x.size(0) <= packed_rows) return packed_linear(x, *packed, b);
    return at::linear(x, w, b);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln::linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&)>();
  return op.call(x, w, b);
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                        const OptionalTensor& offset, const OptionalTensor& bias, int64_t bits) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln::quant_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptionalTensor&, const OptionalTensor&, int64_t)>();
  return op.call(x, qweight, scale, offset, bias, bits);
}

// bits of a w8a8 projection (kiln/quant's W8A8: int8 weight, activations quantized per row in the op).
constexpr int64_t W8A8 = -8;

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const OptionalTensor& bias, int64_t max_op_rows, bool kiln_int8_mm,
                       const OptionalTensor& packed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln::w8a8_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptionalTensor&, int64_t, bool, const OptionalTensor&)>();
  return op.call(x, qweight, scale, bias, max_op_rows, kiln_int8_mm, packed);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln::rms_norm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, w, eps);
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                        const at::Tensor& sin) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kiln::rope", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&)>();
  return op.call(q, k, cos, sin);
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln::swiglu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(gate, up);
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                           const at::Tensor& block_tables, const at::Tensor& query_starts,
                           const at::Tensor& query_lens, const at::Tensor& context_lens, int64_t block_size,
                           double scale, const OptionalTensor& slopes, int64_t window) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln::paged_attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, double, const OptionalTensor&, int64_t)>();
  return op.call(q, keys, values, block_tables, query_starts, query_lens, context_lens, block_size, scale, slopes,
                 window);
}

at::Tensor paged_attention_quantized(const at::Tensor& q, const at::Tensor& key_codes, const at::Tensor& value_codes,
                                     const at::Tensor& key_params, const at::Tensor& value_params, int64_t bits,
                                     const at::Tensor& block_tables, const at::Tensor& query_starts,
                                     const at::Tensor& query_lens, const at::Tensor& context_lens,
                                     int64_t block_size, double scale, const OptionalTensor& slopes, int64_t window) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln::paged_attention_quantized", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                                         const OptionalTensor&, int64_t)>();
  return op.call(q, key_codes, value_codes, key_params, value_params, bits, block_tables, query_starts, query_lens,
                 context_lens, block_size, scale, slopes, window);
}

at::Tensor loki_decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                 int64_t rank, double top_k, double scale, int64_t window,
                                 const OptionalTensor& key_params, const OptionalTensor& value_params,
                                 int64_t kv_bits) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln::loki_decode_attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, double,
                                         int64_t, const OptionalTensor&, const OptionalTensor&, int64_t)>();
  return op.call(q, keys, values, block_tables, context_lens, block_size, rank, top_k, scale, window, key_params,
                 value_params, kv_bits);
}

// Rows' keys or values (N, KVH * D), quantized as kiln/kernels/kv_quant.py's quantize_kv does it, written
// straight into the pool at slot_mapping: codes (slots, KVH, D or D / 2) and params (slots, KVH, 3). Per (row,
// head), op for op as the ATen steps round them (the engine's tests compare with the Python forward bit for
// bit): low = min(min x, 0), high = max(max x, 0), scale = fp16((high - low) / levels, at least 2^-24),
// zero = clamp(round(-low / scale), 0, levels), code = clamp(round(x / scale) + zero, 0, levels). One pass
// instead of ~20 ATen calls and four index_copy_ a layer (~1.5 ms of a 134M batch-1 token on a Zen 4).
void write_quantized(const at::Tensor& rows, at::Tensor& codes, at::Tensor& params, const at::Tensor& slot_mapping,
                     int64_t bits) {
  const int64_t N = rows.size(0), kv_heads = codes.size(1), width = codes.size(2);
  const int64_t D = rows.size(1) / kv_heads;
  TORCH_CHECK(codes.is_contiguous() && params.is_contiguous() && codes.scalar_type() == at::kByte &&
                  params.scalar_type() == at::kByte && params.size(2) == 3 && width == (bits == 8 ? D : D / 2),
              "kiln::decoder_layer_quantized: the pool must be contiguous uint8 codes (slots, KVH, ",
              bits == 8 ? "D" : "D / 2", ") and params (slots, KVH, 3)");
  const at::Tensor x32 = rows.to(at::kFloat).contiguous();
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const float* x = x32.const_data_ptr<float>();
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  uint8_t* code_data = codes.mutable_data_ptr<uint8_t>();
  uint8_t* param_data = params.mutable_data_ptr<uint8_t>();
  const float levels = static_cast<float>((int64_t(1) << bits) - 1);
  std::vector<uint8_t> q(D);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(slot[n] >= 0 && slot[n] < codes.size(0), "kiln::decoder_layer_quantized: slot ", slot[n],
                " is outside the pool");
    for (int64_t h = 0; h < kv_heads; ++h) {
      const float* r = x + (n * kv_heads + h) * D;
      float low = 0.0f, high = 0.0f;
      for (int64_t d = 0; d < D; ++d) low = std::min(low, r[d]), high = std::max(high, r[d]);
      const c10::Half scale_half(std::max(divide(high - low, levels), 5.9604644775390625e-08f));  // 2^-24
      const float scale = static_cast<float>(scale_half);
      const float zero = std::min(levels, std::max(0.0f, std::nearbyint(divide(-low, scale))));
      for (int64_t d = 0; d < D; ++d)
        q[d] = static_cast<uint8_t>(std::min(levels, std::max(0.0f, std::nearbyint(divide(r[d], scale)) + zero)));
      uint8_t* dst = code_data + (slot[n] * kv_heads + h) * width;
      if (bits == 8) {
        std::copy_n(q.data(), D, dst);
      } else {
        for (int64_t d = 0; d < width; ++d) dst[d] = static_cast<uint8_t>(q[d] | (q[d + width] << 4));
      }
      uint8_t* param = param_data + (slot[n] * kv_heads + h) * 3;
      std::memcpy(param, &scale_half.x, 2);  // little-endian fp16 bits, as Tensor.view(uint8) lays them out
      param[2] = static_cast<uint8_t>(zero);
    }
  }
}

// The per-projection lists of one layer inside longer ones (kiln::decoder_layers passes every layer's entries
// back to back): projection b of the layer is entry base + b of biases, scales, offsets, bits and packed.
struct Projections {
  const c10::List<OptionalTensor>& biases;
  const c10::List<OptionalTensor>& scales;
  const c10::List<OptionalTensor>& offsets;
  at::IntArrayRef bits;
  const c10::List<OptionalTensor>& packed;
  size_t base;
};

// The layer around its attention: `attend(q, k, v)` (q (N, H*D), k/v (N, KVH*D) after RoPE) writes the new
// keys/values into the pool and returns the attended rows (N, H, D). `op` names the op in errors; `weights`
// are the layer's nine.
template <typename Attend>
at::Tensor run_layer(const char* op, const at::Tensor& x, at::TensorList weights, const Projections& p, double eps,
                     const OptionalTensor& cos, const OptionalTensor& sin, int64_t max_linear_rows,
                     int64_t packed_rows, int64_t w8a8_max_op_rows, bool w8a8_kiln_int8_mm, Attend attend) {
  TORCH_CHECK(weights.size() == 9, op, ": weights must be [attn_norm, q, k, v, o, mlp_norm, gate, up, down]");
  TORCH_CHECK(x.dim() == 2, op, ": x must be (N, hidden), got ", x.sizes());
  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": cos and sin go together");
  for (size_t i = p.base; i < p.base + 7; ++i) {
    TORCH_CHECK(p.bits[i] == 0 || p.scales.get(i).has_value(), op, ": a quantized projection needs its scale");
  }
  auto project = [&](const at::Tensor& h, size_t w, size_t b) {
    b += p.base;
    if (p.bits[b] == W8A8) {  // its packed entry is the int8 weight's oneDNN copy (or None)
      return w8a8_linear(h, weights[w], *p.scales.get(b), p.biases.get(b), w8a8_max_op_rows, w8a8_kiln_int8_mm,
                         p.packed.get(b));
    }
    if (p.bits[b] != 0) {
      return quant_linear(h, weights[w], *p.scales.get(b), p.offsets.get(b), p.biases.get(b), p.bits[b]);
    }
    return kiln_linear(h, weights[w], p.biases.get(b), max_linear_rows, p.packed.get(b), packed_rows);
  };
  const int64_t N = x.size(0);
  at::Tensor h = rms_norm(x, weights[0], eps);
  at::Tensor q = project(h, 1, 0), k = project(h, 2, 1), v = project(h, 3, 2);  // (N, H*D), (N, KVH*D)
  if (cos.has_value()) std::tie(q, k) = rope(q, k, *cos, *sin);
  at::Tensor attended = attend(q, k, v);
  at::Tensor out = x + project(attended.view({N, -1}), 4, 3);
  h = rms_norm(out, weights[5], eps);
  at::Tensor gated = swiglu(project(h, 6, 4), project(h, 7, 5));
  return out.add_(project(gated, 8, 6));
}

// One layer's projection lists: seven entries each.
Projections one_layer(const char* op, const c10::List<OptionalTensor>& biases, const c10::List<OptionalTensor>& scales,
                      const c10::List<OptionalTensor>& offsets, at::IntArrayRef bits,
                      const c10::List<OptionalTensor>& packed) {
  TORCH_CHECK(biases.size() == 7, op, ": biases must be [q, k, v, o, gate, up, down]");
  TORCH_CHECK(scales.size() == 7 && offsets.size() == 7 && bits.size() == 7 && packed.size() == 7, op,
              ": scales, offsets, bits and packed must have one entry per projection");
  return {biases, scales, offsets, bits, packed, 0};
}

// Where a step's rows go in the pool and what each sequence attends (kiln/kernels/cpu_paged_attention.py).
struct Step {
  const at::Tensor& slot_mapping;
  const at::Tensor& block_tables;
  const at::Tensor& query_starts;
  const at::Tensor& query_lens;
  const at::Tensor& context_lens;
  int64_t block_size;
  double scale;
  const OptionalTensor& alibi_slopes;
  int64_t sliding_window;
};

// rows (N, KVH*D; unit stride along a row) into cache rows (slots, KVH, D) at slot_mapping: index_copy_'s
// result, by one memcpy a row where the pool is contiguous and of the rows' dtype (index_copy_'s dispatch,
// checks and TensorIterator cost ~1.6 us a call beyond a view's on the Zen 5 EPYC, two calls a layer: ~40 us
// of a 134M batch-1 step).
void write_rows(const at::Tensor& rows, at::Tensor& cache, const at::Tensor& slot_mapping) {
  const int64_t N = rows.size(0), width = cache.size(1) * cache.size(2);
  if (!cache.is_contiguous() || rows.scalar_type() != cache.scalar_type() || rows.size(1) != width ||
      rows.stride(1) != 1 || slot_mapping.scalar_type() != at::kLong || !slot_mapping.is_contiguous()) {
    cache.index_copy_(0, slot_mapping, rows.view({N, cache.size(1), cache.size(2)}));
    return;
  }
  TORCH_CHECK(slot_mapping.numel() == N, "kiln::decoder_layer: ", slot_mapping.numel(), " slots for ", N, " rows");
  const int64_t* slot = slot_mapping.const_data_ptr<int64_t>();
  const int64_t num_slots = cache.size(0), bytes = width * cache.element_size();
  const int64_t row_stride = rows.stride(0) * rows.element_size();
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  char* dst = static_cast<char*>(cache.data_ptr());
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(slot[n] >= 0 && slot[n] < num_slots, "kiln::decoder_layer: slot ", slot[n], " is outside the ",
                num_slots, "-slot KV pool");
    std::memcpy(dst + slot[n] * bytes, src + n * row_stride, bytes);
  }
}

// Writes rows' keys/values (N, KVH*D) into a float pool (slots, KVH, D) and attends over it in place.
struct FloatPool {
  at::Tensor& key_cache;
  at::Tensor& value_cache;
  const Step& step;

  at::Tensor operator()(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const {
    const int64_t N = q.size(0), D = key_cache.size(2);
    write_rows(k, key_cache, step.slot_mapping);
    write_rows(v, value_cache, step.slot_mapping);
    return paged_attention(q.view({N, -1, D}), key_cache, value_cache, step.block_tables, step.query_starts,
                           step.query_lens, step.context_lens, step.block_size, step.scale, step.alibi_slopes,
                           step.sliding_window);
  }
};

// rows (N, KVH * G * D) times each row's KV head's basis (KVH, D, D): kiln/engine/loki.py's `rotate`, the same
// bmm over the same (KVH, N * G, D) operand, so the same bits. Returns (N, KVH * G, D), contiguous.
at::Tensor rotate(const at::Tensor& rows, const at::Tensor& basis) {
  const int64_t N = rows.size(0), KVH = basis.size(0), D = basis.size(1);
  const at::Tensor grouped = rows.reshape({N, KVH, -1, D}).transpose(0, 1).reshape({KVH, -1, D});
  return at::bmm(grouped, basis).view({KVH, N, -1, D}).transpose(0, 1).contiguous().view({N, -1, D});
}

// Loki (kiln/engine/loki.py) for a step of decodes, one row per sequence in order: the query and the new keys
// rotated by the layer's basis, the keys written rotated and the values as they are (over an int8/int4 pool
// quantized as QuantizedPool writes them), and each row attended by kiln::loki_decode_attention over its top
// `top_k` keys scored on the first `rank` coordinates. pool: [keys, values] (kv_bits 0) or [key_codes,
// value_codes, key_params, value_params].
struct LokiPool {
  std::vector<at::Tensor>& pool;
  int64_t kv_bits;
  const at::Tensor& basis;  // (KVH, D, D)
  int64_t rank;
  double top_k;
  const Step& step;

  at::Tensor operator()(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const {
    const int64_t N = q.size(0);
    TORCH_CHECK(step.context_lens.size(0) == N, "kiln::decoder_layers: Loki takes steps of decodes only (",
                step.context_lens.size(0), " sequences for ", N, " rows)");
    const at::Tensor keys = rotate(k, basis).view({N, -1});
    OptionalTensor key_params, value_params;
    if (kv_bits == 0) {
      write_rows(keys, pool[0], step.slot_mapping);
      write_rows(v, pool[1], step.slot_mapping);
    } else {
      write_quantized(keys, pool[0], pool[2], step.slot_mapping, kv_bits);
      write_quantized(v, pool[1], pool[3], step.slot_mapping, kv_bits);
      key_params = pool[2], value_params = pool[3];
    }
    return loki_decode_attention(rotate(q, basis), pool[0], pool[1], step.block_tables, step.context_lens,
                                 step.block_size, rank, top_k, step.scale, step.sliding_window, key_params,
                                 value_params, kv_bits);
  }
};

at::Tensor decoder_layer(const at::Tensor& x, at::TensorList weights, const c10::List<OptionalTensor>& biases,
                         double eps, const OptionalTensor& cos, const OptionalTensor& sin, at::Tensor& key_cache,
                         at::Tensor& value_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                         const at::Tensor& query_starts, const at::Tensor& query_lens,
                         const at::Tensor& context_lens, int64_t block_size, double scale,
                         const OptionalTensor& alibi_slopes, int64_t sliding_window, int64_t max_linear_rows,
                         const c10::List<OptionalTensor>& scales, const c10::List<OptionalTensor>& offsets,
                         at::IntArrayRef bits, const c10::List<OptionalTensor>& packed, int64_t packed_rows,
                         int64_t w8a8_max_op_rows, bool w8a8_kiln_int8_mm) {
  constexpr const char* op = "kiln::decoder_layer";
  const Step step{slot_mapping, block_tables, query_starts,  query_lens,    context_lens,
                  block_size,   scale,        alibi_slopes, sliding_window};
  const FloatPool attend{key_cache, value_cache, step};
  return run_layer(op, x, weights, one_layer(op, biases, scales, offsets, bits, packed), eps, cos, sin,
                   max_linear_rows, packed_rows, w8a8_max_op_rows, w8a8_kiln_int8_mm, attend);
}

// Quantizes rows' keys/values into a quantized pool (kv_quant.py): codes (slots, KVH, D or D / 2) and params
// (slots, KVH, 3), and attends with kiln::paged_attention_quantized.
struct QuantizedPool {
  at::Tensor& key_codes;
  at::Tensor& value_codes;
  at::Tensor& key_params;
  at::Tensor& value_params;
  int64_t kv_bits;
  const Step& step;

  at::Tensor operator()(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const {
    const int64_t N = q.size(0), D = k.size(1) / key_codes.size(1);
    write_quantized(k, key_codes, key_params, step.slot_mapping, kv_bits);
    write_quantized(v, value_codes, value_params, step.slot_mapping, kv_bits);
    return paged_attention_quantized(q.view({N, -1, D}), key_codes, value_codes, key_params, value_params, kv_bits,
                                     step.block_tables, step.query_starts, step.query_lens, step.context_lens,
                                     step.block_size, step.scale, step.alibi_slopes, step.sliding_window);
  }
};

// decoder_layer over a quantized pool: the new keys/values are quantized and written as codes and params, and
// attention is kiln::paged_attention_quantized.
at::Tensor decoder_layer_quantized(const at::Tensor& x, at::TensorList weights,
                                   const c10::List<OptionalTensor>& biases, double eps, const OptionalTensor& cos,
                                   const OptionalTensor& sin, at::Tensor& key_codes, at::Tensor& value_codes,
                                   at::Tensor& key_params, at::Tensor& value_params, int64_t kv_bits,
                                   const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                   const at::Tensor& query_starts, const at::Tensor& query_lens,
                                   const at::Tensor& context_lens, int64_t block_size, double scale,
                                   const OptionalTensor& alibi_slopes, int64_t sliding_window,
                                   int64_t max_linear_rows, const c10::List<OptionalTensor>& scales,
                                   const c10::List<OptionalTensor>& offsets, at::IntArrayRef bits,
                                   const c10::List<OptionalTensor>& packed, int64_t packed_rows,
                                   int64_t w8a8_max_op_rows, bool w8a8_kiln_int8_mm) {
  TORCH_CHECK(kv_bits == 8 || kv_bits == 4, "kiln::decoder_layer_quantized: kv_bits must be 8 or 4");
  constexpr const char* op = "kiln::decoder_layer_quantized";
  const Step step{slot_mapping, block_tables, query_starts,  query_lens,    context_lens,
                  block_size,   scale,        alibi_slopes, sliding_window};
  const QuantizedPool attend{key_codes, value_codes, key_params, value_params, kv_bits, step};
  return run_layer(op, x, weights, one_layer(op, biases, scales, offsets, bits, packed), eps, cos, sin,
                   max_linear_rows, packed_rows, w8a8_max_op_rows, w8a8_kiln_int8_mm, attend);
}

// kiln::decoder_layers: L layers in turn, in one call (one Python call per decode step instead of L): weights
// holds the layers' nine tensors back to back (9 * L), the per-projection lists seven entries a layer (7 * L),
// max_linear_rows / packed_rows one entry a layer, and caches each layer's pool: [key_cache, value_cache] a
// layer over a float pool (kv_bits 0), [key_codes, value_codes, key_params, value_params] over a quantized one
// (kv_bits 8 or 4). Each layer runs exactly as kiln::decoder_layer / decoder_layer_quantized runs it, so the
// result is that op's, layer after layer, bit for bit. With loki_bases (one (KVH, D, D) basis a layer) each
// layer attends by Loki instead (LokiPool: what kiln/engine/loki.py's backend does for decodes).
at::Tensor decoder_layers(const at::Tensor& x, at::TensorList weights, const c10::List<OptionalTensor>& biases,
                          double eps, const OptionalTensor& cos, const OptionalTensor& sin, at::TensorList caches,
                          int64_t kv_bits, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                          const at::Tensor& query_starts, const at::Tensor& query_lens,
                          const at::Tensor& context_lens, int64_t block_size, double scale,
                          const OptionalTensor& alibi_slopes, int64_t sliding_window, at::IntArrayRef max_linear_rows,
                          const c10::List<OptionalTensor>& scales, const c10::List<OptionalTensor>& offsets,
                          at::IntArrayRef bits, const c10::List<OptionalTensor>& packed, at::IntArrayRef packed_rows,
                          int64_t w8a8_max_op_rows, bool w8a8_kiln_int8_mm, at::TensorList loki_bases,
                          int64_t loki_rank, double loki_top_k) {
  constexpr const char* op = "kiln::decoder_layers";
  TORCH_CHECK(kv_bits == 0 || kv_bits == 8 || kv_bits == 4, op, ": kv_bits must be 0 (a float pool), 8 or 4");
  const size_t L = max_linear_rows.size(), per_layer = kv_bits == 0 ? 2 : 4;
  TORCH_CHECK(caches.size() == per_layer * L && packed_rows.size() == L, op, ": caches need ", per_layer,
              " tensors a layer and max_linear_rows and packed_rows one entry a layer, for ", L, " layers");
  TORCH_CHECK(weights.size() == 9 * L && biases.size() == 7 * L, op, ": weights must hold 9 tensors a layer and ",
              "biases 7, for ", L, " layers");
  TORCH_CHECK(scales.size() == 7 * L && offsets.size() == 7 * L && bits.size() == 7 * L && packed.size() == 7 * L,
              op, ": scales, offsets, bits and packed must hold 7 entries a layer");
  TORCH_CHECK(loki_bases.empty() || (loki_bases.size() == L && !alibi_slopes.has_value()), op,
              ": loki_bases needs one basis a layer and no ALiBi");
  const Step step{slot_mapping, block_tables, query_starts,  query_lens,    context_lens,
                  block_size,   scale,        alibi_slopes, sliding_window};
  at::Tensor h = x;
  for (size_t layer = 0; layer < L; ++layer) {
    const Projections p{biases, scales, offsets, bits, packed, 7 * layer};
    std::vector<at::Tensor> pool(caches.begin() + per_layer * layer, caches.begin() + per_layer * (layer + 1));
    const at::TensorList layer_weights = weights.slice(9 * layer, 9);
    if (!loki_bases.empty()) {
      const LokiPool attend{pool, kv_bits, loki_bases[layer], loki_rank, loki_top_k, step};
      h = run_layer(op, h, layer_weights, p, eps, cos, sin, max_linear_rows[layer], packed_rows[layer],
                    w8a8_max_op_rows, w8a8_kiln_int8_mm, attend);
    } else if (kv_bits == 0) {
      const FloatPool attend{pool[0], pool[1], step};
      h = run_layer(op, h, layer_weights, p, eps, cos, sin, max_linear_rows[layer], packed_rows[layer],
                    w8a8_max_op_rows, w8a8_kiln_int8_mm, attend);
    } else {
      const QuantizedPool attend{pool[0], pool[1], pool[2], pool[3], kv_bits, step};
      h = run_layer(op, h, layer_weights, p, eps, cos, sin, max_linear_rows[layer], packed_rows[layer],
                    w8a8_max_op_rows, w8a8_kiln_int8_mm, attend);
    }
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def(
      "decoder_layer(Tensor x, Tensor[] weights, Tensor?[] biases, float eps, Tensor? cos, Tensor? sin, "
      "Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping, Tensor block_tables, "
      "Tensor query_starts, Tensor query_lens, Tensor context_lens, int block_size, float scale, "
      "Tensor? alibi_slopes, int sliding_window, int max_linear_rows, Tensor?[] scales, Tensor?[] offsets, "
      "int[] bits, Tensor?[] packed, int packed_rows, int w8a8_max_op_rows=16, bool w8a8_kiln_int8_mm=False) "
      "-> Tensor");
  m.def(
      "decoder_layers(Tensor x, Tensor[] weights, Tensor?[] biases, float eps, Tensor? cos, Tensor? sin, "
      "Tensor(a!)[] caches, int kv_bits, Tensor slot_mapping, Tensor block_tables, "
      "Tensor query_starts, Tensor query_lens, Tensor context_lens, int block_size, float scale, "
      "Tensor? alibi_slopes, int sliding_window, int[] max_linear_rows, Tensor?[] scales, Tensor?[] offsets, "
      "int[] bits, Tensor?[] packed, int[] packed_rows, int w8a8_max_op_rows=16, bool w8a8_kiln_int8_mm=False, "
      "Tensor[] loki_bases, int loki_rank=0, float loki_top_k=1.0) -> Tensor");
  m.def(
      "decoder_layer_quantized(Tensor x, Tensor[] weights, Tensor?[] biases, float eps, Tensor? cos, Tensor? sin, "
      "Tensor(a!) key_codes, Tensor(b!) value_codes, Tensor(c!) key_params, Tensor(d!) value_params, int kv_bits, "
      "Tensor slot_mapping, Tensor block_tables, Tensor query_starts, Tensor query_lens, Tensor context_lens, "
      "int block_size, float scale, Tensor? alibi_slopes, int sliding_window, int max_linear_rows, "
      "Tensor?[] scales, Tensor?[] offsets, int[] bits, Tensor?[] packed, int packed_rows, int w8a8_max_op_rows=16, "
      "bool w8a8_kiln_int8_mm=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("decoder_layer", &decoder_layer);
  m.impl("decoder_layers", &decoder_layers);
  m.impl("decoder_layer_quantized", &decoder_layer_quantized);
}

// Packed weights (oneDNN's opaque tensors) carry the MkldnnCPU dispatch key, which outranks CPU in the
// dispatch of a call that holds them: the same functions serve it.
TORCH_LIBRARY_IMPL(kiln, MkldnnCPU, m) {
  m.impl("decoder_layer", &decoder_layer);
  m.impl("decoder_layers", &decoder_layers);
  m.impl("decoder_layer_quantized", &decoder_layer_quantized);
}
