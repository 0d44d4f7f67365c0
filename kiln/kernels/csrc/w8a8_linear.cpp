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
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "int8_gemm.h"
#include "simd.h"  // KILN_AVX512: tail_mask, load_ps, store_ps, round_ps; abs_max, divide

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

// Exact int32 sums of q (M, K) int8 and the weight oneDNN packed (kiln/kernels/packed_weight.py), as fp32:
// onednn::qlinear_pointwise with unit scales and no zero points gives float(sum), what sums.to(float) gives
// for torch._int_mm's sums (the op converts its int32 accumulators once and multiplies by the scales, 1.0).
// Unlike torch._int_mm it does not reorder the weight into its VNNI/AMX layout on every call.
at::Tensor packed_sums(const at::Tensor& q, const at::Tensor& packed, int64_t N) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "");
  torch::jit::Stack stack{q,
                          1.0,
                          int64_t(0),
                          packed,
                          at::ones({N}, at::kFloat),
                          at::zeros({N}, at::kLong),
                          c10::IValue(),
                          1.0,
                          int64_t(0),
                          c10::IValue(at::kFloat),
                          std::string("none"),
                          c10::List<std::optional<at::Scalar>>(),
                          std::string()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// The build uses -ffast-math: a value passed through here is opaque to the optimiser, so a division by it is
// not turned into a multiplication by a hoisted reciprocal, a product with it is not reassociated and a product
// and a sum are not contracted into one FMA (each would change bits that torch's ops compute).
template <typename V>
inline V opaque(V v) {
  asm("" : "+x"(v));
  return v;
}
#if defined(KILN_AVX512)
inline __m512 opaque(__m512 v) {
  asm("" : "+v"(v));
  return v;
}
#endif

// One row of x quantized as quantize_rows does it (round(x / scale) clamped to [-127, 127], torch.round being
// round-half-even like nearbyint), written as int16 for the GEMM.
template <typename T, typename Q>
void quantize_row(const T* x, float scale, Q* q, int64_t K) {
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
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    if constexpr (std::is_same_v<Q, int16_t>) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), words);
    } else {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(words, words));
    }
  }
#endif
  for (; k < K; ++k) {
    const float d = std::nearbyint(static_cast<float>(x[k]) / opaque(scale));
    q[k] = static_cast<Q>(std::min(127.0f, std::max(-127.0f, d)));
  }
}

// One output of the w8a8 epilogue, rounded as the ATen steps in w8a8_linear round it: float(sum) * x_scale,
// then * scale, cast to T, then + bias (cast to T; none where null), cast to T.
template <typename T>
inline T finish(float sum, float x_scale, float scale, const T* bias) {
  const float y = opaque(opaque(sum * x_scale) * scale);  // no FMA with the bias
  const T t = static_cast<T>(y);
  return bias != nullptr ? static_cast<T>(static_cast<float>(t) + static_cast<float>(*bias)) : t;
}

// One row's x_scale as quantize_rows computes it: max |x| / 127, at least TINY (the max is exact in x's dtype).
template <typename T>
float row_scale(const T* x, int64_t K) {
  return std::max(divide(abs_max(x, K), 127.0f), static_cast<float>(TINY));
}

// The w8a8 branch with kiln's int8 GEMM: each row's scale (row_scale) and the row quantized straight into the
// GEMM's int16 layout, and each int32 sum scaled, cast and biased where it lands, op for op as the ATen steps in
// w8a8_linear below round them: float(sum) * x_scale, then * scale, cast to T, then + bias cast to T.
// tests/quant/test_linear.py checks the bits against those steps.
template <typename T>
at::Tensor w8a8_int8_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                          const OptionalTensor& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), Kp = kiln_int8::padded(K);
  const at::Tensor xc = x.contiguous(), wc = qweight.contiguous(), sc = scale.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(x.scalar_type()).contiguous();
  std::vector<int16_t> q(M * Kp, 0);
  std::vector<float> x_scale(M);
  const T* x_data = xc.const_data_ptr<T>();
  const float* xs_data = x_scale.data();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      x_scale[m] = row_scale(x_data + m * K, K);
      quantize_row<T, int16_t>(x_data + m * K, x_scale[m], q.data() + m * Kp, K);
    }
  });
  at::Tensor out = at::empty({M, N}, x.options());
  T* o = out.mutable_data_ptr<T>();
  const float* ws = sc.const_data_ptr<float>();
  const T* bias_data = b.defined() ? b.const_data_ptr<T>() : nullptr;
  kiln_int8::gemm(q.data(), wc.const_data_ptr<int8_t>(), M, N, K, [&](int64_t m, int64_t n, int32_t sum) {
    o[m * N + n] = finish<T>(static_cast<float>(sum), xs_data[m], ws[n], bias_data ? bias_data + n : nullptr);
  });
  return out;
}

// One row's row_scale, then the row quantized to int8 as quantize_row does. Returns the scale.
template <typename T>
float quantize_row_int8(const T* x, int8_t* q, int64_t K) {
  const float scale = row_scale(x, K);
  int64_t k = 0;
#if defined(KILN_AVX512)
  const __m512 low = _mm512_set1_ps(-127.0f), high = _mm512_set1_ps(127.0f);
  __m512 s = _mm512_set1_ps(scale);
  for (; k < K; k += 16) {
    const __mmask16 mask = tail_mask(K - k);
    s = opaque(s);  // no reciprocal hoisted out of the loop
    const __m512 d =
        _mm512_roundscale_ps(_mm512_div_ps(load_ps(x + k, mask), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm512_mask_cvtsepi32_storeu_epi8(q + k, mask, _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(d, low), high)));
  }
#endif
  if (k < K) quantize_row<T, int8_t>(x + k, scale, q + k, K - k);
  return scale;
}

// The w8a8 branch above the op's rows with the sums from oneDNN (a weight packed once, on AMX CPUs) or from
// torch._int_mm (VNNI without AMX: it reorders the weight on each call): the rows quantized to int8 in one
// pass, `sums(q)` the exact integer sums (M, N) as fp32 (packed) or int32 (torch._int_mm), then one pass that
// scales, casts and biases them, op for op as the ATen steps in w8a8_linear below round them
// (tests/quant/test_linear.py checks the bits). Those steps took ~18% of a 134M w8a8 offline run on a Zen 4.
template <typename T, typename Sums>
at::Tensor w8a8_fused(const at::Tensor& x, const at::Tensor& scale, const OptionalTensor& bias, Sums sums) {
  const int64_t M = x.size(0), K = x.size(1), N = scale.size(0);
  const at::Tensor xc = x.contiguous(), sc = scale.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(x.scalar_type()).contiguous();
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  const T* x_data = xc.const_data_ptr<T>();
  std::vector<float> x_scale(M);
  const float* xs_data = x_scale.data();
  int8_t* q_data = q.mutable_data_ptr<int8_t>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) x_scale[m] = quantize_row_int8<T>(x_data + m * K, q_data + m * K, K);
  });
  const at::Tensor totals = sums(q).contiguous();
  TORCH_CHECK(totals.scalar_type() == at::kFloat || totals.scalar_type() == at::kInt,
              "kiln::w8a8_linear: integer sums must be float32 or int32");
  at::Tensor out = at::empty({M, N}, x.options());
  const float* ws = sc.const_data_ptr<float>();
  const T* bias_data = b.defined() ? b.const_data_ptr<T>() : nullptr;
  T* o = out.mutable_data_ptr<T>();
  const bool int32 = totals.scalar_type() == at::kInt;
  const float* s = int32 ? nullptr : totals.const_data_ptr<float>();
  const int32_t* si = int32 ? totals.const_data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      T* om = o + m * N;
      int64_t n = 0;
#if defined(KILN_AVX512)
      const __m512 xv = _mm512_set1_ps(xs_data[m]);
      for (; n < N; n += 16) {
        const __mmask16 mask = tail_mask(N - n);
        const __m512 sum = int32 ? _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, si + m * N + n))
                                 : _mm512_maskz_loadu_ps(mask, s + m * N + n);
        __m512 y = opaque(_mm512_mul_ps(opaque(_mm512_mul_ps(sum, xv)), _mm512_maskz_loadu_ps(mask, ws + n)));
        if (bias_data != nullptr) y = _mm512_add_ps(round_ps(y, om), load_ps(bias_data + n, mask));
        store_ps(om + n, mask, y);
      }
#endif
      for (; n < N; ++n) {
        const float sum = int32 ? static_cast<float>(si[m * N + n]) : s[m * N + n];
        om[n] = finish<T>(sum, xs_data[m], ws[n], bias_data ? bias_data + n : nullptr);
      }
    }
  });
  return out;
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const OptionalTensor& bias, int64_t max_op_rows, bool kiln_int8_mm,
                       const OptionalTensor& packed) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && qweight.scalar_type() == at::kChar &&
                  qweight.size(1) == x.size(1),
              "kiln::w8a8_linear: x (M, K) and an int8 qweight (N, K)");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == qweight.size(0) && scale.size(1) == 1 &&
                  scale.scalar_type() == at::kFloat,
              "kiln::w8a8_linear: scale must be (N, 1) float32");
  // quantize_rows: q (M, K) int8 in [-127, 127], x_scale (M, 1) = max |x| / 127
  const bool fused_dtype = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  if (x.size(0) > max_op_rows && qweight.size(0) > 0 && fused_dtype && !kiln_int8_mm) {
    const int64_t N = qweight.size(0);
    const bool on_packed = packed.has_value() && packed->defined();
    auto sums = [&](const at::Tensor& q) {
      return on_packed ? packed_sums(q, *packed, N) : at::_int_mm(q, qweight.t());
    };
    return x.scalar_type() == at::kFloat ? w8a8_fused<float>(x, scale, bias, sums)
                                         : w8a8_fused<at::BFloat16>(x, scale, bias, sums);
  }
  if (kiln_int8_mm && x.size(0) > max_op_rows && x.size(0) > 0 && qweight.size(0) > 0 && x.size(1) > 0 &&
      x.size(1) < (int64_t(1) << 17) && fused_dtype) {
    return x.scalar_type() == at::kFloat ? w8a8_int8_gemm<float>(x, qweight, scale, bias)
                                         : w8a8_int8_gemm<at::BFloat16>(x, qweight, scale, bias);
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
      "w8a8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, int max_op_rows, bool kiln_int8_mm=False, "
      "Tensor? packed=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("w8a8_linear", &w8a8_linear); }

// A weight packed by onednn::qlinear_prepack is an MKLDNN tensor: a call with one dispatches here.
TORCH_LIBRARY_IMPL(kiln, MkldnnCPU, m) { m.impl("w8a8_linear", &w8a8_linear); }
