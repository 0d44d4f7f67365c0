// kiln::rms_norm(x (..., D), weight (D,), eps) -> (..., D): RMSNorm as kiln/models/layers.py's torch code
// computes it, in one pass per row instead of six ops (cast, pow, mean, rsqrt, mul, cast, mul).
//   normed = T(x * rsqrt(mean(x^2) + eps)) with fp32 statistics, then out = T(weight * normed):
// the same two roundings to T as the reference, so bf16 results match it up to the fp32 sum's order.
// kiln/kernels/cpu_fused.py says when to call it; tests/kernels/test_cpu_fused.py checks it.

#include <torch/library.h>

#include <cmath>

#include "fused_common.h"

namespace {

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* out, int64_t rows, int64_t D, float eps) {
  kiln_fused::for_rows(rows, D, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * D;
      T* yr = out + r * D;
      float sum = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float v = static_cast<float>(xr[d]);
        sum += v * v;
      }
      const float scale = 1.0f / std::sqrt(sum / static_cast<float>(D) + eps);
      for (int64_t d = 0; d < D; ++d) {
        const float normed = static_cast<float>(static_cast<T>(static_cast<float>(xr[d]) * scale));
        yr[d] = static_cast<T>(static_cast<float>(w[d]) * normed);
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  kiln_fused::check_float_or_bf16("rms_norm", x);
  kiln_fused::check_same_dtype("rms_norm", x, weight, "weight");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "kiln::rms_norm: weight must be (D,) for x (..., D), got ", weight.sizes(), " and ", x.sizes());
  TORCH_CHECK(weight.device().is_cpu(), "kiln::rms_norm runs on CPU tensors only");
  at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t D = x.size(-1);
  const int64_t rows = D == 0 ? 0 : xc.numel() / D;
  if (rows == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    rms_norm_impl<float>(xc.const_data_ptr<float>(), wc.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                         rows, D, static_cast<float>(eps));
  } else {
    rms_norm_impl<at::BFloat16>(xc.const_data_ptr<at::BFloat16>(), wc.const_data_ptr<at::BFloat16>(),
                                out.mutable_data_ptr<at::BFloat16>(), rows, D, static_cast<float>(eps));
  }
  return out;
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("rms_norm", &rms_norm); }

TORCH_LIBRARY_IMPL(kiln, Meta, m) { m.impl("rms_norm", &rms_norm_meta); }
