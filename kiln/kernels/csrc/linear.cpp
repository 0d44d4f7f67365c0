// kiln::linear(x (M, K), weight (N, K), bias (N,)?) -> (M, N): y = x @ weight.T + bias for few rows M.
//
// At batch-1 decode a linear layer is a weight-streaming problem: every weight byte is read once per step
// and does M multiply-adds. This op streams each weight tile from memory once for all M rows: a register
// tile of ROWS x COLS fp32 accumulators (x rows x weight rows), each a 512-bit vector along K, reduced
// horizontally at the end. Threads (at::parallel_for, OpenMP in torch's CPU builds) split the output
// columns, so each reads a contiguous slab of the weight.
//   bf16 x bf16 -> bf16: _mm512_dpbf16_ps (AVX512-BF16), fp32 accumulation, one rounding at the end.
//   fp32 x fp32 -> fp32: _mm512_fmadd_ps (AVX-512F).
// With AVX2 and FMA but no AVX-512 (Zen 2/3, Intel client cores since Alder Lake): x is widened to fp32
// once, each tile is one weight row (bf16 widened by a shift) against up to 4 x rows, 256-bit FMAs into
// two accumulators per output that alternate along K (see tile_avx2).
// Without those instructions a scalar loop with fp32 accumulation gives the same results up to rounding.
// kiln/kernels/cpu_linear.py says when to call it (rows <= a measured threshold);
// tests/kernels/test_cpu_linear.py checks it against float64 references.
// Measured with `python -m kiln.bench.linear` (2-core AVX512-BF16 EPYC, 2 threads, 134M Llama weights read
// from memory, read bandwidth 43 GB/s): one row streams bf16 weights at 36-40 GB/s (torch 16-24) and fp32
// at 37-40 GB/s (torch 16-20).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"  // KILN_AVX2: hsum8, load8_ps

#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(KILN_AVX2)
#define KILN_LINEAR_AVX2 1
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int ROWS = 4;  // x rows per register tile
constexpr int COLS = 4;  // weight rows (output columns) per register tile: 16 accumulators + 8 loads
constexpr int64_t GRAIN_TILES = 16;  // COLS-wide tiles per thread at least: tiny layers stay on one thread
// Up to this many rows a tile is one weight row on AMD CPUs (see linear_impl). 2-vCPU Zen 4 EPYC, 2
// threads, a 32000 x 768 bf16 weight from memory: one row at a time streamed it at 47-52 GB/s, the read
// bandwidth of a plain sum (43-57), while four rows read side by side (k-interleaved) reached 24-27 GB/s
// with or without software prefetch, two rows side by side 21-24 (a standalone model of the loops).
// Intel is the other way round: on a 2-vCPU Xeon with AMX (Emerald Rapids, 2026-12-06, `python -m
// kiln.bench.linear --rows 1`, two interleaved runs each) one row per tile streamed the 134M model's bf16
// weights at 16-21 GB/s and fp32 at 19-28, four side by side (with the software prefetch below) at 22-27
// and 25-31, of a 23-26 GB/s read; so there every tile is four rows.
constexpr int64_t SEQUENTIAL_ROWS = 4;

inline int64_t sequential_rows() {
  static const int64_t rows = __builtin_cpu_is("amd") ? SEQUENTIAL_ROWS : 0;
  return rows;
}
// Software prefetch of the weight this far ahead (whole tiles, at least one). One thread, weights from
// memory, rows 1-8: the hardware prefetcher alone streamed 10-25 GB/s, prefetching 1, 2 or 4 tiles ahead
// 20-30 GB/s (the three alike within the shared machine's noise); 12 KB is 1-2 tiles at these shapes.
constexpr int64_t PREFETCH_BYTES = 12 * 1024;

// Elements from a tile's start to the weight to prefetch. Past the weight's end near the last tiles: a
// prefetch is a hint and never faults.
template <typename T>
inline int64_t prefetch_distance(int64_t K) {
  const int64_t tile_bytes = COLS * K * static_cast<int64_t>(sizeof(T));
  return COLS * K * std::max<int64_t>(1, (PREFETCH_BYTES + tile_bytes - 1) / tile_bytes);
}

// out[m * N + n] = result[m][n] + bias[n], rounded once to the output type.
template <typename T, int R, int C>
inline void store_tile(const float (&result)[R][C], const T* bias, T* out, int64_t N) {
  for (int m = 0; m < R; ++m) {
    for (int n = 0; n < C; ++n) {
      float value = result[m][n] + (bias != nullptr ? static_cast<float>(bias[n]) : 0.0f);
      out[m * N + n] = static_cast<T>(value);
    }
  }
}

// The portable path: the same tile order, one multiply-add at a time.
template <typename T, int R, int C>
inline void tile_scalar(const T* x, const T* w, int64_t K, float (&result)[R][C]) {
  for (int m = 0; m < R; ++m) {
    for (int n = 0; n < C; ++n) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += static_cast<float>(x[m * K + k]) * static_cast<float>(w[n * K + k]);
      result[m][n] = sum;
    }
  }
}

#if defined(__AVX512F__)
template <int R, int C>
inline void reduce_tile(__m512 (&acc)[R][C], float (&result)[R][C]) {
  for (int m = 0; m < R; ++m)
    for (int n = 0; n < C; ++n) result[m][n] = _mm512_reduce_add_ps(acc[m][n]);
}

// fp32: 16 values of K per vector; the K tail is a masked load (zeros add nothing).
template <int R, int C>
inline void tile_fp32(const float* x, const float* w, int64_t K, float (&result)[R][C]) {
  __m512 acc[R][C];
  for (int m = 0; m < R; ++m)
    for (int n = 0; n < C; ++n) acc[m][n] = _mm512_setzero_ps();
  const float* ahead = w + prefetch_distance<float>(K);
  auto step = [&](int64_t k, __mmask16 mask) {
    __m512 wv[C];
    for (int n = 0; n < C; ++n) {
      if constexpr (C > 1) _mm_prefetch(reinterpret_cast<const char*>(ahead + n * K + k), _MM_HINT_T0);
      wv[n] = _mm512_maskz_loadu_ps(mask, w + n * K + k);
    }
    for (int m = 0; m < R; ++m) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int n = 0; n < C; ++n) acc[m][n] = _mm512_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) step(k, static_cast<__mmask16>(0xFFFF));
  if (k < K) step(k, static_cast<__mmask16>((1u << (K - k)) - 1));
  reduce_tile<R, C>(acc, result);
}

#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16: 32 values of K per vector; dpbf16 multiplies pairs and adds both products into fp32 lanes.
template <int R, int C>
inline void tile_bf16(const at::BFloat16* x, const at::BFloat16* w, int64_t K, float (&result)[R][C]) {
  __m512 acc[R][C];
  for (int m = 0; m < R; ++m)
    for (int n = 0; n < C; ++n) acc[m][n] = _mm512_setzero_ps();
  const at::BFloat16* ahead = w + prefetch_distance<at::BFloat16>(K);
  auto step = [&](int64_t k, __mmask32 mask) {
    __m512bh wv[C];
    for (int n = 0; n < C; ++n) {
      if constexpr (C > 1) _mm_prefetch(reinterpret_cast<const char*>(ahead + n * K + k), _MM_HINT_T0);
      wv[n] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + n * K + k);
    }
    for (int m = 0; m < R; ++m) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
      for (int n = 0; n < C; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv, wv[n]);
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step(k, static_cast<__mmask32>(0xFFFFFFFFu));
  if (k < K) step(k, static_cast<__mmask32>((1u << (K - k)) - 1));
  reduce_tile<R, C>(acc, result);
}
#endif

#if defined(KILN_LINEAR_AVX2)
// AVX2 + FMA: a tile is one weight row n against R <= 4 rows of fp32 x. Each output keeps two 8-lane
// accumulators that take alternate 8-element steps along K (one dependent FMA chain per output held a
// batch-1 bf16 row to ~12 GB/s a thread: 16 bytes per 4-5-cycle FMA), summed in one fixed order at the end:
// every tile shape computes the same sums, so a row's result does not depend on how many rows come with it.
// The K tail is zero-padded through a small buffer (zeros add nothing).
template <typename T>
inline __m256 load8_tail_avx2(const T* p, int64_t n) {
  T buffer[8];
  std::memset(static_cast<void*>(buffer), 0, sizeof(buffer));
  std::memcpy(static_cast<void*>(buffer), p, n * sizeof(T));
  return load8_ps(static_cast<const T*>(buffer));
}

template <typename T, int R>
inline void tile_avx2(const float* x, const T* w, int64_t K, float (&result)[R][1]) {
  __m256 acc[2][R];
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < R; ++m) acc[h][m] = _mm256_setzero_ps();
  auto step = [&](int64_t k, __m256 wv, __m256 (&sums)[R]) {
    for (int m = 0; m < R; ++m) sums[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wv, sums[m]);
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    step(k, load8_ps(w + k), acc[0]);
    step(k + 8, load8_ps(w + k + 8), acc[1]);
  }
  if (k < K) {  // 1..15 left: the first 8 (or fewer) into acc[0], the rest into acc[1]
    float xt[R][16] = {};
    for (int m = 0; m < R; ++m) std::memcpy(xt[m], x + m * K + k, (K - k) * sizeof(float));
    const int64_t first = std::min<int64_t>(8, K - k);
    const __m256 w0 = load8_tail_avx2(w + k, first);
    for (int m = 0; m < R; ++m) acc[0][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xt[m]), w0, acc[0][m]);
    if (K - k > 8) {
      const __m256 w1 = load8_tail_avx2(w + k + 8, K - k - 8);
      for (int m = 0; m < R; ++m) acc[1][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xt[m] + 8), w1, acc[1][m]);
    }
  }
  for (int m = 0; m < R; ++m) result[m][0] = hsum8(_mm256_add_ps(acc[0][m], acc[1][m]));
}

template <typename T>
void linear_avx2(const at::Tensor& x, const at::Tensor& weight, const T* bias, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const T* w_data = weight.const_data_ptr<T>();
  T* out_data = out.mutable_data_ptr<T>();
  std::vector<float> widened;  // bf16 x as fp32, converted once for every weight row
  const float* x_data;
  if constexpr (std::is_same_v<T, float>) {
    x_data = x.const_data_ptr<float>();
  } else {
    widened.resize(M * K);
    const T* src = x.const_data_ptr<T>();
    for (int64_t i = 0; i < M * K; ++i) widened[i] = static_cast<float>(src[i]);
    x_data = widened.data();
  }
  // Each thread takes a contiguous slab of weight rows, BLOCK rows at a time: the block stays in L1/L2 while
  // every 4-row group of x passes over it (at up to 4 rows: one sequential stream of weight rows).
  constexpr int64_t BLOCK = 16;
  at::parallel_for(0, N, GRAIN_TILES * COLS, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += BLOCK) {
      const int64_t n1 = std::min(end, n0 + BLOCK);
      for (int64_t m = 0; m < M; m += ROWS) {
        for (int64_t n = n0; n < n1; ++n) {
          const float* xm = x_data + m * K;
          const T* wn = w_data + n * K;
          const T* b = bias != nullptr ? bias + n : nullptr;
          T* o = out_data + m * N + n;
          switch (std::min<int64_t>(ROWS, M - m)) {
            case 4: { float r[4][1]; tile_avx2<T, 4>(xm, wn, K, r); store_tile<T, 4, 1>(r, b, o, N); break; }
            case 3: { float r[3][1]; tile_avx2<T, 3>(xm, wn, K, r); store_tile<T, 3, 1>(r, b, o, N); break; }
            case 2: { float r[2][1]; tile_avx2<T, 2>(xm, wn, K, r); store_tile<T, 2, 1>(r, b, o, N); break; }
            default: { float r[1][1]; tile_avx2<T, 1>(xm, wn, K, r); store_tile<T, 1, 1>(r, b, o, N); }
          }
        }
      }
    }
  });
}
#endif

// One ROWS x COLS (or smaller, at the edges) block of the output.
template <typename T, int R, int C>
inline void run_tile(const T* x, const T* w, const T* bias, T* out, int64_t K, int64_t N) {
  float result[R][C];
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    tile_bf16<R, C>(x, w, K, result);
    store_tile<T, R, C>(result, bias, out, N);
    return;
  }
#endif
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    tile_fp32<R, C>(x, w, K, result);
    store_tile<T, R, C>(result, bias, out, N);
    return;
  }
#endif
  tile_scalar<T, R, C>(x, w, K, result);
  store_tile<T, R, C>(result, bias, out, N);
}

// Edge tiles have fewer rows or columns: pick the instantiation at run time.
template <typename T, int R>
inline void run_rows(int cols, const T* x, const T* w, const T* bias, T* out, int64_t K, int64_t N) {
  switch (cols) {
    case 4: return run_tile<T, R, 4>(x, w, bias, out, K, N);
    case 3: return run_tile<T, R, 3>(x, w, bias, out, K, N);
    case 2: return run_tile<T, R, 2>(x, w, bias, out, K, N);
    default: return run_tile<T, R, 1>(x, w, bias, out, K, N);
  }
}

template <typename T>
inline void run_block(int rows, int cols, const T* x, const T* w, const T* bias, T* out, int64_t K, int64_t N) {
  switch (rows) {
    case 4: return run_rows<T, 4>(cols, x, w, bias, out, K, N);
    case 3: return run_rows<T, 3>(cols, x, w, bias, out, K, N);
    case 2: return run_rows<T, 2>(cols, x, w, bias, out, K, N);
    default: return run_rows<T, 1>(cols, x, w, bias, out, K, N);
  }
}

template <typename T>
void linear_impl(const at::Tensor& x, const at::Tensor& weight, const T* bias, at::Tensor& out) {
#if defined(KILN_LINEAR_AVX2)
  linear_avx2<T>(x, weight, bias, out);
#else
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const T* x_data = x.const_data_ptr<T>();
  const T* w_data = weight.const_data_ptr<T>();
  T* out_data = out.mutable_data_ptr<T>();
  // Few rows on AMD: one weight row per tile, so each thread reads its slab as one sequential stream. More
  // rows, or Intel: four weight rows per tile, each x load used four times (the sums are the same either
  // way: one fp32 accumulator per output, over k in the same order, so a row's result does not depend on M).
  const int64_t tile_cols = M <= sequential_rows() ? 1 : COLS;
  const int64_t num_tiles = (N + tile_cols - 1) / tile_cols;
  at::parallel_for(0, num_tiles, GRAIN_TILES * COLS / tile_cols, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * tile_cols;
      const int cols = static_cast<int>(std::min<int64_t>(tile_cols, N - n));
      // The weight tile (cols x K) stays in L1/L2 while every row block of x passes over it.
      for (int64_t m = 0; m < M; m += ROWS) {
        const int rows = static_cast<int>(std::min<int64_t>(ROWS, M - m));
        run_block<T>(rows, cols, x_data + m * K, w_data + n * K, bias != nullptr ? bias + n : nullptr,
                     out_data + m * N + n, K, N);
      }
    }
  });
#endif
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "kiln::linear: x must be (M, K) and weight (N, K), got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "kiln::linear: x has K=", x.size(1), " but weight has K=",
              weight.size(1));
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "kiln::linear runs on CPU tensors only");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "kiln::linear: x is ", x.scalar_type(),
              " but weight is ", weight.scalar_type(), "; cast one to the other");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "kiln::linear supports float32 and bfloat16, got ", x.scalar_type());
  const int64_t N = weight.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type(),
                "kiln::linear: bias must be (", N, ",) of x's dtype, got ", bias->sizes(), " ",
                bias->scalar_type());
    b = bias->contiguous();
  }
  at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0 || N == 0) return out;
  if (x.size(1) == 0) return b.defined() ? out.copy_(b.expand({x.size(0), N})) : out.zero_();
  if (x.scalar_type() == at::kFloat) {
    linear_impl<float>(xc, wc, b.defined() ? b.const_data_ptr<float>() : nullptr, out);
  } else {
    linear_impl<at::BFloat16>(xc, wc, b.defined() ? b.const_data_ptr<at::BFloat16>() : nullptr, out);
  }
  return out;
}

// Shapes only, so torch.compile and meta-device tracing can see through the op.
at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("linear", &linear); }

TORCH_LIBRARY_IMPL(kiln, Meta, m) { m.impl("linear", &linear_meta); }
