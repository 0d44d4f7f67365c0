// Shared checks and the row loop of kiln's fused elementwise CPU ops (rms_norm.cpp, rope.cpp, swiglu.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace kiln_fused {

// Elements per thread at least: decode-sized calls (one row of a few thousand values) stay on one thread,
// where waking a second one would cost more than the work.
constexpr int64_t GRAIN_ELEMENTS = 32768;

inline void check_float_or_bf16(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "kiln::", op, " runs on CPU tensors only");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "kiln::", op,
              " supports float32 and bfloat16, got ", t.scalar_type());
}

inline void check_same_dtype(const char* op, const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "kiln::", op, ": ", name, " is ", b.scalar_type(),
              " but x is ", a.scalar_type(), "; cast one to the other");
}

// body(begin, end) over rows [0, rows), split across threads only when the work is large.
template <typename F>
inline void for_rows(int64_t rows, int64_t row_elements, const F& body) {
  const int64_t grain = std::max<int64_t>(1, GRAIN_ELEMENTS / std::max<int64_t>(1, row_elements));
  at::parallel_for(0, rows, grain, body);
}

}  // namespace kiln_fused
