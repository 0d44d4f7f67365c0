// The int8 x int8 -> int32 GEMM behind kiln::int8_mm (int8_mm.cpp) and kiln::w8a8_linear's path for CPUs
// without VNNI (w8a8_linear.cpp): a (M, K) already widened to int16 rows of Kp = K rounded up to 16 (zero
// padded), b (N, K) int8; each exact int32 sum goes to `store(m, n, sum)`, so a caller can scale and cast it
// where it lands instead of in passes over an int32 matrix.
//
// With AVX2, vpmaddwd multiplies 16 int16 pairs and adds neighbours into 8 int32 lanes: each 16-weight chunk
// of b is sign-extended by one vpmovsxbw and used for up to ROWS rows of a. |a|, |b| <= 128, so a lane's pair
// sum (<= 2 * 128 * 128) and any K below 2^31 / 2^14 = 131072 stay exact in int32, as in torch._int_mm.
// Without AVX2 a scalar loop gives the same integers.
#pragma once

#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kiln_int8 {

constexpr int ROWS = 4;  // rows of a per register tile
constexpr int COLS = 2;  // rows of b per register tile: 8 accumulators, 2 weight vectors, 1 row vector
constexpr int64_t GRAIN = 16;  // rows of b per thread at least: tiny layers stay on one thread
constexpr int64_t CHUNK = 16;  // int16 lanes per 256-bit vector
constexpr int64_t SEQUENTIAL_ROWS = 4;  // up to this many rows of a, tiles of one row of b (see gemm)

inline int64_t padded(int64_t K) { return (K + CHUNK - 1) / CHUNK * CHUNK; }

// (M, K) int8 -> (M, padded(K)) int16, zero padded.
inline std::vector<int16_t> widen_rows(const int8_t* a, int64_t M, int64_t K) {
  const int64_t Kp = padded(K);
  std::vector<int16_t> widened(M * Kp, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) widened[m * Kp + k] = a[m * K + k];
  return widened;
}

#if defined(__AVX2__)
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// R rows of widened a from row m (stride Kp) against C rows of b from row n (stride K).
template <int R, int C, typename Store>
inline void tile(const int16_t* a, int64_t Kp, const int8_t* b, int64_t K, int64_t m, int64_t n, Store& store) {
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
    for (int c = 0; c < C; ++c) store(m + r, n + c, hsum_epi32(acc[r][c]));
}

template <int R, int C = COLS, typename Store>
inline void tile_cols(int cols, const int16_t* a, int64_t Kp, const int8_t* b, int64_t K, int64_t m, int64_t n,
                      Store& store) {
  if constexpr (C == 1) {
    tile<R, 1>(a, Kp, b, K, m, n, store);
  } else {
    if (cols == C) return tile<R, C>(a, Kp, b, K, m, n, store);
    tile_cols<R, C - 1>(cols, a, Kp, b, K, m, n, store);
  }
}
#endif

// store(m, n, sum of a[m, k] * b[n, k]) for every m < M, n < N; a widened (widen_rows or the caller's own).
template <typename Store>
void gemm(const int16_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, Store store) {
  const int64_t Kp = padded(K);
#if defined(__AVX2__)
  // Each thread takes a contiguous slab of b's rows, COLS at a time (one at up to SEQUENTIAL_ROWS rows of a, so
  // each thread streams its slab sequentially): a tile of b stays in L1 while every ROWS-row block of a passes
  // over it, so b streams from memory once.
  const int64_t per_tile = M <= SEQUENTIAL_ROWS ? 1 : COLS;
  at::parallel_for(0, (N + per_tile - 1) / per_tile, GRAIN / per_tile, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * per_tile;
      const int cols = static_cast<int>(std::min<int64_t>(per_tile, N - n));
      for (int64_t m = 0; m < M; m += ROWS) {
        const int16_t* am = a + m * Kp;
        switch (std::min<int64_t>(ROWS, M - m)) {
          case 4: tile_cols<4>(cols, am, Kp, b + n * K, K, m, n, store); break;
          case 3: tile_cols<3>(cols, am, Kp, b + n * K, K, m, n, store); break;
          case 2: tile_cols<2>(cols, am, Kp, b + n * K, K, m, n, store); break;
          default: tile_cols<1>(cols, am, Kp, b + n * K, K, m, n, store);
        }
      }
    }
  });
#else
  at::parallel_for(0, N, GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; ++m) {
        int32_t sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += int32_t(a[m * Kp + k]) * int32_t(b[n * K + k]);
        store(m, n, sum);
      }
  });
#endif
}

}  // namespace kiln_int8
