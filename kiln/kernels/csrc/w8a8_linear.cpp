// kiln::w8a8_linear(x (M, K) fp32/bf16, qweight (N, K) int8, scale (N, 1) fp32, bias (N,)?, max_op_rows,
//   kiln_int8_mm) -> (M, N) in x's dtype: W8A8 (ZeroQuant) with x quantized per row on the fly.
//
// The same computation as QuantizedLinear.forward's w8a8 branch in kiln/quant/linear.py, step for step and
// with the same ATen kernels (so the results are identical), but called once from Python instead of about
// fifteen times: per-row absmax scale, round and clamp to int8, then the integer product (kiln::quant_linear
// on the integer rows for up to `max_op_rows` rows; above them exact int32 sums from torch._int_mm, VNNI
// where present, or from kiln::int8_mm where `kiln_int8_mm`: CPUs without VNNI, int8_mm.cpp), the per-row
// and per-channel scales, the cast to x's dtype and the bias. At the offline shape a step runs 84 such
// linears, so each op call it saves from Python is one per linear per step.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace {

using OptionalTensor = std::optional<at::Tensor>;

constexpr double TINY = 1e-12;  // kiln/quant/weights.py's floor of a scale

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln::quant_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptionalTensor&, const OptionalTensor&, int64_t)>();
  return op.call(x, qweight, scale, std::nullopt, std::nullopt, 8);
}

at::Tensor int8_mm(const at::Tensor& a, const at::Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln::int8_mm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(a, b);
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const OptionalTensor& bias, int64_t max_op_rows, bool kiln_int8_mm) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && qweight.scalar_type() == at::kChar &&
                  qweight.size(1) == x.size(1),
              "kiln::w8a8_linear: x (M, K) and an int8 qweight (N, K)");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == qweight.size(0) && scale.size(1) == 1 &&
                  scale.scalar_type() == at::kFloat,
              "kiln::w8a8_linear: scale must be (N, 1) float32");
  // quantize_rows: q (M, K) int8 in [-127, 127], x_scale (M, 1) = max |x| / 127
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor x_scale = (xf.abs().amax(-1, true) / 127).clamp_min(TINY);
  const at::Tensor q = at::round(xf / x_scale).clamp_(-127, 127).to(at::kChar);
  at::Tensor y;
  if (x.size(0) <= max_op_rows) {
    y = (quant_linear(q.to(at::kFloat), qweight, scale) * x_scale).to(x.scalar_type());
  } else {
    const at::Tensor sums = kiln_int8_mm ? int8_mm(q, qweight) : at::_int_mm(q, qweight.t());  // the same int32
    y = (sums.to(at::kFloat) * x_scale * scale.t()).to(x.scalar_type());
  }
  if (bias.has_value() && bias->defined()) y = y + bias->to(y.scalar_type());
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def(
      "w8a8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, int max_op_rows, bool kiln_int8_mm=False) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("w8a8_linear", &w8a8_linear); }
