// kiln::int8_mm(a (M, K) int8, b (N, K) int8) -> (M, N) int32: a @ b.T in exact integer arithmetic, the
// result torch._int_mm(a, b.t()) gives (its torch reference; tests/kernels/test_int8_mm.py checks equality).
//
// Why: W8A8's integer GEMM (kiln/quant, kiln::w8a8_linear) on CPUs without VNNI. There torch._int_mm has
// no fast kernel (34-42 ms for a 768 x 2048 layer at 64 rows on a Zen 3 EPYC against 2.4-3.2 ms for kiln's
// fp32 quant_linear on the same integer rows: BENCHMARKS.md, "Quantized weights", run 6), and kiln's fp32
// path widens every weight to fp32 and multiplies 8 at a time. The kernel (AVX2 vpmaddwd) is int8_gemm.h;
// w8a8_linear.cpp runs it with the scaling fused into the store.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "int8_gemm.h"

namespace {

at::Tensor int8_mm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "kiln::int8_mm: a must be (M, K) and b (N, K), got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar, "kiln::int8_mm takes int8 a and b, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(1), "kiln::int8_mm: a has K=", a.size(1), " but b has K=", b.size(1));
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "kiln::int8_mm runs on CPU tensors only");
  TORCH_CHECK(a.size(1) < (int64_t(1) << 17), "kiln::int8_mm: K=", a.size(1), " could overflow int32 sums");
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const std::vector<int16_t> widened = kiln_int8::widen_rows(ac.const_data_ptr<int8_t>(), M, K);
  int32_t* o = out.mutable_data_ptr<int32_t>();
  kiln_int8::gemm(widened.data(), bc.const_data_ptr<int8_t>(), M, N, K,
                  [o, N](int64_t m, int64_t n, int32_t sum) { o[m * N + n] = sum; });
  return out;
}

at::Tensor int8_mm_meta(const at::Tensor& a, const at::Tensor& b) {
  return at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) { m.def("int8_mm(Tensor a, Tensor b) -> Tensor"); }

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("int8_mm", &int8_mm); }

TORCH_LIBRARY_IMPL(kiln, Meta, m) { m.impl("int8_mm", &int8_mm_meta); }
