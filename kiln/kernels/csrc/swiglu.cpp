// kiln::swiglu(gate (..., F), up (..., F)) -> (..., F): silu(gate) * up in one pass, as the torch code in
// kiln/models/layers.py's MLP computes it: silu in fp32 rounded to T, then the product rounded to T.
// kiln/kernels/cpu_fused.py says when to call it; tests/kernels/test_cpu_fused.py checks it.

#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "fused_common.h"
#include "simd.h"

namespace {

// With AVX-512, 16 elements at a time (masked at the end, so every element takes the same path whatever its
// position: results do not depend on how a batch is split); exp is simd.h's exp512. With AVX2 + FMA, 8 at a
// time with exp256. A 2048-token bf16 prefill of the 134M shape spent a third of its time in the scalar loop
// before (std::exp, one element at a time, torch.profiler, issue 12).
template <typename T>
void swiglu_impl(const T* gate, const T* up, T* out, int64_t n) {
  at::parallel_for(0, n, kiln_fused::GRAIN_ELEMENTS, [&](int64_t begin, int64_t end) {
#ifdef KILN_AVX512
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = begin; i < end; i += 16) {
      const __mmask16 m = tail_mask(end - i);
      const __m512 g = load_ps(gate + i, m);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));  // exp(-g)
      const __m512 silu = round_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), gate);
      store_ps(out + i, m, _mm512_mul_ps(silu, load_ps(up + i, m)));
    }
#elif defined(KILN_AVX2)
    // 8 at a time; the tail through zero-padded copies, so every element takes the same path (as above).
    const __m256 one = _mm256_set1_ps(1.0f);
    auto eight = [&](const T* g_in, const T* u_in, T* o) {
      const __m256 g = load8_ps(g_in);
      const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));  // exp(-g)
      const __m256 silu = round8_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), gate);
      store8_ps(o, _mm256_mul_ps(silu, load8_ps(u_in)));
    };
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) eight(gate + i, up + i, out + i);
    if (i < end) {
      T g[8] = {}, u[8] = {}, o[8];
      std::copy(gate + i, gate + end, g);
      std::copy(up + i, up + end, u);
      eight(g, u, o);
      std::copy(o, o + (end - i), out + i);
    }
#else
    for (int64_t i = begin; i < end; ++i) {
      const float g = static_cast<float>(gate[i]);
      const float silu = static_cast<float>(static_cast<T>(g / (1.0f + std::exp(-g))));
      out[i] = static_cast<T>(silu * static_cast<float>(up[i]));
    }
#endif
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
