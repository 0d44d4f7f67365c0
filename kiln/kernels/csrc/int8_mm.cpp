// kiln::int8_mm(a (M, K) int8, b (N, K) int8) -> (M, N) int32: a @ b.T in exact integer arithmetic, the
// result torch._int_mm(a, b.t()) gives (its torch reference; tests/kernels/test_int8_mm.py checks equality).
//
// Why: W8A8's integer GEMM (kiln/quant, kiln::w8a8_linear) on CPUs without VNNI. There torch._int_mm has
// no fast kernel (34-42 ms for a 768 x 2048 layer at 64 rows on a Zen 3 EPYC against 2.4-3.2 ms for kiln's
// fp32 quant_linear on the same integer rows: BENCHMARKS.md, "Quantized weights", run 6), and kiln's fp32
// path widens every weight to fp32 and multiplies 8 at a time. With AVX2, vpmaddwd multiplies 16 int16 pairs
// and adds neighbours into 8 int32 lanes: a row of `a` is widened to int16 once, each 16-weight chunk of `b`
// is sign-extended by one vpmovsxbw and used for up to ROWS rows of `a`. |a|, |b| <= 128, so a lane's pair
// sum (<= 2 * 128 * 128) and any K below 2^31 / 2^14 = 131072 stay exact in int32, as in _int_mm.
// Without AVX2 a scalar loop gives the same integers.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#ifndef KILN_I8_R
#define KILN_I8_R 4
#define KILN_I8_C 2
#endif
constexpr int ROWS = KILN_I8_R;  // rows of a per register tile
constexpr int COLS = KILN_I8_C;  // rows of b per register tile: 8 accumulators, 2 weight vectors, 1 row vector
constexpr int64_t GRAIN = 16;  // rows of b per thread at least: tiny layers stay on one thread
constexpr int64_t CHUNK = 16;  // int16 lanes per 256-bit vector
constexpr int64_t SEQUENTIAL_ROWS = 4;  // up to this many rows of a, tiles of one row of b (see int8_mm_avx2)

#if defined(__AVX2__)
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// R rows of widened a (stride Kp, zero-padded) against C rows of b (stride K): out (R, C) at stride N.
template <int R, int C>
inline void tile(const int16_t* a, int64_t Kp, const int8_t* b, int64_t K, int32_t* out, int64_t N) {
  __m256i acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_si256();
  auto step = [&](int64_t k, const __m256i (&wv)[C]) {
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + r * Kp + k));
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(xv, wv[c]));
    }
  };
  int64_t k = 0;
  __m256i wv[C];
  for (; k + CHUNK <= K; k += CHUNK) {
    for (int c = 0; c < C; ++c)
      wv[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + c * K + k)));
    step(k, wv);
  }
  if (k < K) {  // 1..15 left: zero-padded weights (a's padding is zeros too)
    for (int c = 0; c < C; ++c) {
      alignas(16) int8_t tail[CHUNK] = {};
      std::memcpy(tail, b + c * K + k, K - k);
      wv[c] = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
    }
    step(k, wv);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * N + c] = hsum_epi32(acc[r][c]);
}

template <int R, int C = COLS>
inline void tile_cols(int cols, const int16_t* a, int64_t Kp, const int8_t* b, int64_t K, int32_t* out, int64_t N) {
  if constexpr (C == 1) {
    tile<R, 1>(a, Kp, b, K, out, N);
  } else {
    if (cols == C) return tile<R, C>(a, Kp, b, K, out, N);
    tile_cols<R, C - 1>(cols, a, Kp, b, K, out, N);
  }
}

void int8_mm_avx2(const int8_t* a, const int8_t* b, int32_t* out, int64_t M, int64_t N, int64_t K) {
  const int64_t Kp = (K + CHUNK - 1) / CHUNK * CHUNK;
  std::vector<int16_t> widened(M * Kp, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) widened[m * Kp + k] = a[m * K + k];
  // Each thread takes a contiguous slab of b's rows, COLS at a time: a tile of b (COLS x K bytes) stays in L1
  // while every ROWS-row block of a passes over it, so b streams from memory once.
  const int64_t per_tile = M <= SEQUENTIAL_ROWS ? 1 : COLS;
  at::parallel_for(0, (N + per_tile - 1) / per_tile, GRAIN / per_tile, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * per_tile;
      const int cols = static_cast<int>(std::min<int64_t>(per_tile, N - n));
      for (int64_t m = 0; m < M; m += ROWS) {
        const int16_t* am = widened.data() + m * Kp;
        int32_t* o = out + m * N + n;
        switch (std::min<int64_t>(ROWS, M - m)) {
          case 4: tile_cols<4>(cols, am, Kp, b + n * K, K, o, N); break;
          case 3: tile_cols<3>(cols, am, Kp, b + n * K, K, o, N); break;
          case 2: tile_cols<2>(cols, am, Kp, b + n * K, K, o, N); break;
          default: tile_cols<1>(cols, am, Kp, b + n * K, K, o, N);
        }
      }
    }
  });
}
#endif

[[maybe_unused]] void int8_mm_scalar(const int8_t* a, const int8_t* b, int32_t* out, int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, N, GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; ++m) {
        int32_t sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += int32_t(a[m * K + k]) * int32_t(b[n * K + k]);
        out[m * N + n] = sum;
      }
  });
}

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
#if defined(__AVX2__)
  int8_mm_avx2(ac.const_data_ptr<int8_t>(), bc.const_data_ptr<int8_t>(), out.mutable_data_ptr<int32_t>(), M, N, K);
#else
  int8_mm_scalar(ac.const_data_ptr<int8_t>(), bc.const_data_ptr<int8_t>(), out.mutable_data_ptr<int32_t>(), M, N, K);
#endif
  return out;
}

at::Tensor int8_mm_meta(const at::Tensor& a, const at::Tensor& b) {
  return at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) { m.def("int8_mm(Tensor a, Tensor b) -> Tensor"); }

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("int8_mm", &int8_mm); }

TORCH_LIBRARY_IMPL(kiln, Meta, m) { m.impl("int8_mm", &int8_mm_meta); }
