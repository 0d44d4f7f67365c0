// kiln::rope(q (N, H * D), k (N, KVH * D), cos (N, D), sin (N, D)) -> (q', k'), both rotated in one call,
// out of place: Llama's rotate_half layout (the two halves of each head are the pair's coordinates), as
// kiln/kernels/rope.py's `apply_rope` computes it per element:
//   x1' = T(T(x1 cos1) + T(-x2 sin1)),  x2' = T(T(x2 cos2) + T(x1 sin2))
// with each product and the sum rounded to T like the torch ops, so bf16 results match them exactly.
// Both halves of cos/sin are read, so any tables work, not only ones whose halves repeat.
// kiln/kernels/cpu_fused.py says when to call it; tests/kernels/test_cpu_fused.py checks it.

#include <torch/library.h>

#include <tuple>

#include "fused_common.h"
#include "simd.h"

namespace {

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);
}

template <typename T>
void rotate_rows(const T* x, const T* cos, const T* sin, T* out, int64_t rows, int64_t heads, int64_t D) {
  const int64_t half = D / 2, width = heads * D;
  kiln_fused::for_rows(rows, width, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cos + r * D;
      const T* s = sin + r * D;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xh = x + r * width + h * D;
        T* yh = out + r * width + h * D;
#ifdef KILN_AVX512
        // 16 pairs at a time (masked at the end), the same roundings as the scalar loop below.
        for (int64_t d = 0; d < half; d += 16) {
          const __mmask16 m = tail_mask(half - d);
          const __m512 x1 = load_ps(xh + d, m), x2 = load_ps(xh + d + half, m);
          const __m512 a1 = round_ps(_mm512_mul_ps(x1, load_ps(c + d, m)), xh);
          const __m512 minus_x2 = _mm512_castsi512_ps(  // -x2 exactly (the sign bit flipped)
              _mm512_xor_si512(_mm512_castps_si512(x2), _mm512_set1_epi32(int32_t(0x80000000u))));
          const __m512 b1 = round_ps(_mm512_mul_ps(minus_x2, load_ps(s + d, m)), xh);
          const __m512 a2 = round_ps(_mm512_mul_ps(x2, load_ps(c + d + half, m)), xh);
          const __m512 b2 = round_ps(_mm512_mul_ps(x1, load_ps(s + d + half, m)), xh);
          store_ps(yh + d, m, _mm512_add_ps(a1, b1));
          store_ps(yh + d + half, m, _mm512_add_ps(a2, b2));
        }
#else
        for (int64_t d = 0; d < half; ++d) {
          const float x1 = static_cast<float>(xh[d]), x2 = static_cast<float>(xh[d + half]);
          const float a1 = round_to<T>(x1 * static_cast<float>(c[d]));
          const float b1 = round_to<T>(-x2 * static_cast<float>(s[d]));
          const float a2 = round_to<T>(x2 * static_cast<float>(c[d + half]));
          const float b2 = round_to<T>(x1 * static_cast<float>(s[d + half]));
          yh[d] = round_to<T>(a1 + b1);
          yh[d + half] = round_to<T>(a2 + b2);
        }
#endif
      }
    }
  });
}

void check_rows(const at::Tensor& t, const at::Tensor& cos, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == cos.size(0) && t.size(1) % cos.size(1) == 0, "kiln::rope: ", name,
              " must be (N, heads * D) for cos (N, D) = ", cos.sizes(), ", got ", t.sizes());
  kiln_fused::check_float_or_bf16("rope", t);
  kiln_fused::check_same_dtype("rope", cos, t, name);
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                        const at::Tensor& sin) {
  kiln_fused::check_float_or_bf16("rope", cos);
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) % 2 == 0,
              "kiln::rope: cos and sin must be (N, D) with D even, got ", cos.sizes(), " and ", sin.sizes());
  kiln_fused::check_same_dtype("rope", cos, sin, "sin");
  check_rows(q, cos, "q");
  check_rows(k, cos, "k");
  TORCH_CHECK(sin.device().is_cpu(), "kiln::rope runs on CPU tensors only");
  at::Tensor qc = q.contiguous(), kc = k.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor q_out = at::empty_like(qc), k_out = at::empty_like(kc);
  const int64_t N = cos.size(0), D = cos.size(1);
  if (N == 0 || D == 0) return {q_out, k_out};
  for (auto [x, out] : {std::pair{&qc, &q_out}, std::pair{&kc, &k_out}}) {
    const int64_t heads = x->size(1) / D;
    if (q.scalar_type() == at::kFloat) {
      rotate_rows<float>(x->const_data_ptr<float>(), cc.const_data_ptr<float>(), sc.const_data_ptr<float>(),
                         out->mutable_data_ptr<float>(), N, heads, D);
    } else {
      rotate_rows<at::BFloat16>(x->const_data_ptr<at::BFloat16>(), cc.const_data_ptr<at::BFloat16>(),
                                sc.const_data_ptr<at::BFloat16>(), out->mutable_data_ptr<at::BFloat16>(), N,
                                heads, D);
    }
  }
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rope_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin) {
  return {at::empty_like(q, at::MemoryFormat::Contiguous), at::empty_like(k, at::MemoryFormat::Contiguous)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("rope", &rope); }

TORCH_LIBRARY_IMPL(kiln, Meta, m) { m.impl("rope", &rope_meta); }
