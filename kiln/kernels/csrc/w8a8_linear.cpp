// kiln::w8a8_linear(x (M, K) fp32/bf16, qweight (N, K) int8, scale (N, 1) fp32, bias (N,)?, max_op_rows,
//   kiln_int8_mm) -> (M, N) in x's dtype: W8A8 (ZeroQuant) with x quantized per row on the fly.
//
// The same computation as QuantizedLinear.forward's w8a8 branch in kiln/quant/linear.py, step for step and
// with the same ATen kernels (so the results are identical), but called once from Python instead of about
// fifteen times: per-row absmax scale, round and clamp to int8, then the integer product (kiln::quant_linear
// on the integer rows for up to `max_op_rows` rows; above them exact int32 sums from torch._int_mm, VNNI
// where present, or from kiln's int8 GEMM where `kiln_int8_mm`: CPUs without VNNI, int8_gemm.h), the
// per-row and per-channel scales, the cast to x's dtype and the bias. With kiln's GEMM the quantization,
// scales, cast and bias are fused around it (w8a8_int8_gemm), bit for bit the same as the ATen steps. At the
// offline shape a step runs 84 such linears, so each op call it saves from Python is one per linear per step.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "int8_gemm.h"

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

// The build uses -ffast-math: a value passed through here is opaque to the optimiser, so a division by it is
// not turned into a multiplication by a hoisted reciprocal, a product with it is not reassociated and a product
// and a sum are not contracted into one FMA (each would change bits that torch's ops compute).
template <typename V>
inline V opaque(V v) {
  asm("" : "+x"(v));
  return v;
}

// One row of x quantized as quantize_rows does it (round(x / scale) clamped to [-127, 127], torch.round being
// round-half-even like nearbyint), written as int16 for the GEMM.
template <typename T>
void quantize_row(const T* x, float scale, int16_t* q, int64_t K) {
  int64_t k = 0;
#if defined(__AVX2__)
  const __m256 low = _mm256_set1_ps(-127.0f), high = _mm256_set1_ps(127.0f);
  __m256 s = _mm256_set1_ps(scale);
  for (; k + 8 <= K; k += 8) {
    __m256 xv;
    if constexpr (std::is_same_v<T, float>) {
      xv = _mm256_loadu_ps(x + k);
    } else {  // bf16: the upper half of an fp32
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k));
      xv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    s = opaque(s);
    __m256 d = _mm256_round_ps(_mm256_div_ps(xv, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(d, low), high));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
  }
#endif
  for (; k < K; ++k) {
    const float d = std::nearbyint(static_cast<float>(x[k]) / opaque(scale));
    q[k] = static_cast<int16_t>(std::min(127.0f, std::max(-127.0f, d)));
  }
}

// The w8a8 branch with kiln's int8 GEMM: the rows quantized straight into its int16 layout and each int32 sum
// scaled, cast and biased where it lands, op for op as the ATen steps in w8a8_linear below round them:
// float(sum) * x_scale, then * scale, cast to T, then + bias cast to T. tests/quant/test_linear.py checks the
// bits against those steps.
template <typename T>
at::Tensor w8a8_int8_gemm(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& qweight,
                          const at::Tensor& scale, const OptionalTensor& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), Kp = kiln_int8::padded(K);
  const at::Tensor xc = x.contiguous(), wc = qweight.contiguous(), sc = scale.contiguous();
  const at::Tensor xs = x_scale.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(x.scalar_type()).contiguous();
  std::vector<int16_t> q(M * Kp, 0);
  const T* x_data = xc.const_data_ptr<T>();
  const float* xs_data = xs.const_data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) quantize_row<T>(x_data + m * K, xs_data[m], q.data() + m * Kp, K);
  });
  at::Tensor out = at::empty({M, N}, x.options());
  T* o = out.mutable_data_ptr<T>();
  const float* ws = sc.const_data_ptr<float>();
  const T* bias_data = b.defined() ? b.const_data_ptr<T>() : nullptr;
  kiln_int8::gemm(q.data(), wc.const_data_ptr<int8_t>(), M, N, K, [&](int64_t m, int64_t n, int32_t sum) {
    const float y = opaque(opaque(static_cast<float>(sum) * xs_data[m]) * ws[n]);  // no FMA with the bias
    T t = static_cast<T>(y);
    if (bias_data != nullptr) t = static_cast<T>(static_cast<float>(t) + static_cast<float>(bias_data[n]));
    o[m * N + n] = t;
  });
  return out;
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
  if (kiln_int8_mm && x.size(0) > max_op_rows && x.size(0) > 0 && qweight.size(0) > 0 && x.size(1) > 0 &&
      x.size(1) < (int64_t(1) << 17) && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16)) {
    // max |x| is exact in x's dtype, so the scale equals the one below from fp32
    const at::Tensor x_scale = (x.abs().amax(-1, true).to(at::kFloat) / 127).clamp_min(TINY);
    return x.scalar_type() == at::kFloat ? w8a8_int8_gemm<float>(x, x_scale, qweight, scale, bias)
                                         : w8a8_int8_gemm<at::BFloat16>(x, x_scale, qweight, scale, bias);
  }
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
