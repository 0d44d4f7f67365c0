// kiln::swiglu(gate (..., F), up (..., F)) -> (..., F): silu(gate) * up in one pass, as the torch code in
// kiln/models/layers.py's MLP computes it: silu in fp32 rounded to T, then the product rounded to T.
// kiln/kernels/cpu_fused.py says when to call it; tests/kernels/test_cpu_fused.py checks it.

#include <torch/library.h>

#include <cmath>

#include "fused_common.h"

namespace {

template <typename T>
void swiglu_impl(const T* gate, const T* up, T* out, int64_t n) {
  at::parallel_for(0, n, kiln_fused::GRAIN_ELEMENTS, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = static_cast<float>(gate[i]);
      const float silu = static_cast<float>(static_cast<T>(g / (1.0f + std::exp(-g))));
      out[i] = static_cast<T>(silu * static_cast<float>(up[i]));
    }
  });
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  kiln_fused::check_float_or_bf16("swiglu", gate);
  kiln_fused::check_same_dtype("swiglu", gate, up, "up");
  TORCH_CHECK(up.device().is_cpu(), "kiln::swiglu runs on CPU tensors only");
  TORCH_CHECK(gate.sizes() == up.sizes(), "kiln::swiglu: gate and up must have one shape, got ", gate.sizes(),
              " and ", up.sizes());
  at::Tensor gc = gate.contiguous(), uc = up.contiguous();
  at::Tensor out = at::empty_like(gc);
  if (gc.numel() == 0) return out;
  if (gate.scalar_type() == at::kFloat) {
    swiglu_impl<float>(gc.const_data_ptr<float>(), uc.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                       gc.numel());
  } else {
    swiglu_impl<at::BFloat16>(gc.const_data_ptr<at::BFloat16>(), uc.const_data_ptr<at::BFloat16>(),
                              out.mutable_data_ptr<at::BFloat16>(), gc.numel());
  }
  return out;
}

at::Tensor swiglu_meta(const at::Tensor& gate, const at::Tensor& up) {
  return at::empty_like(gate, at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) { m.def("swiglu(Tensor gate, Tensor up) -> Tensor"); }

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("swiglu", &swiglu); }

TORCH_LIBRARY_IMPL(kiln, Meta, m) { m.impl("swiglu", &swiglu_meta); }
