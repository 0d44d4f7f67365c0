// kiln::quant_linear(x (M, K), qweight, scale (N, G) fp32, offset (N, G) fp32?, bias (N,) fp32?, bits)
//   -> (M, N) in x's dtype: y = x @ dequantize(qweight).T + bias, for few rows M (decode).
//
// Weight-only quantized GEMV that streams the integer weight once for all M rows (kiln/quant/linear.py
// says when it is called). Dequantization is folded into the sums: with u the stored integer,
//   w[n, k] = (u[n, k] - z[n, g]) * s[n, g]   (g = k / group_size, G = K / group_size groups)
//   y[m, n] = sum_g s[n, g] * dot_g(x[m], u[n]) - sum_g offset[n, g] * xsum[m, g],  offset = s * z,
// so the inner loop only converts integers to fp32 and multiply-adds; the group scale is one fused
// multiply-add of a whole vector accumulator per group, and the zero point one scalar term per group.
//   bits == 8: qweight (N, K) int8 (signed, symmetric: no offset), G == 1 (per output channel).
//   bits == 4: qweight (N, K / 2) uint8, u in 0..15, in 32-element chunks of 16 bytes: byte j of a chunk
//              holds element j in its low nibble and element j + 16 in its high nibble, so one 16-byte
//              load widened to 16 int32 lanes gives elements 0..15 (& 0xF) and 16..31 (>> 4). K and the
//              group size are multiples of 32.
// x is converted to fp32 once; products of a bf16/fp32 x and a small integer are exact in fp32, and the
// sums accumulate in fp32 (AVX-512F), so the result matches the torch reference (dequantize, then matmul
// in fp32) to fp32 rounding. int8 on AMD CPUs with AVX512-VNNI sums in integers instead (tile_int8_vnni):
// x in 23-bit fixed point per row, exact integer multiply-adds, one rounding at the end. With AVX2
// and FMA but no AVX-512, 256-bit versions of the float tiles; without either, a scalar loop computes the
// same sums. Tiles are one weight row against 1-4 x rows on AMD (one
// sequential stream per thread, the Zen 4 EPYC's fastest read) and four weight rows side by side on Intel
// (cols_int8 says why).
// tests/quant/test_linear.py checks it against kiln/quant's torch reference.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"  // KILN_AVX2: hsum8; abs_max, load_ps, tail_mask

#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(KILN_AVX2)
#define KILN_QUANT_AVX2 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int ROWS = 4;  // x rows per register tile (two accumulators each)
constexpr int64_t GRAIN_ROWS = 64;  // weight rows per thread at least: tiny layers stay on one thread

struct QuantArgs {
  const float* x;       // (M, K) fp32
  const uint16_t* xb;   // (M, K) bf16 in the int4 pair order (see tile_int4_bf16), or null
  const uint8_t* w;     // (N, row_bytes)
  const float* scale;   // (N, G)
  const float* offset;  // (N, G) or null
  const float* xsum;    // (M, G): with an offset or a zero shift, else null
  const float* bias;    // (N,) or null
  float* out;           // (M, N) fp32
  int64_t M, K, N, G, group, row_bytes;
  int bits;
  float zero_shift = 0.0f;  // added to every zero point (the bf16 int4 tiles' weights are 128 + u, not u)
  // int8 in integers (tile_int8_vnni, x_digits): x's rows in fixed point, x[m, k] = (d0 + 2^8 d1 + 2^16 d2)
  // * x_unit[m] in signed byte digits (3, M, x_stride), and x_sum[m] = sum_k of the fixed-point values; null
  // where the float tiles run.
  const int8_t* x_digits = nullptr;
  const int64_t* x_sum = nullptr;
  const float* x_unit = nullptr;
  int64_t x_stride = 0;
};

// The offset term and bias of output column n for row m.
inline float correction(const QuantArgs& a, int64_t m, int64_t n) {
  float value = a.bias != nullptr ? a.bias[n] : 0.0f;
  if (a.xsum != nullptr) {
    for (int64_t g = 0; g < a.G; ++g) {
      const float offset = a.offset != nullptr ? a.offset[n * a.G + g] : 0.0f;
      value -= (offset + a.zero_shift * a.scale[n * a.G + g]) * a.xsum[m * a.G + g];
    }
  }
  return value;
}

inline float weight_value(const QuantArgs& a, int64_t n, int64_t k) {
  const uint8_t* row = a.w + n * a.row_bytes;
  if (a.bits == 8) return static_cast<float>(static_cast<int8_t>(row[k]));
  const uint8_t byte = row[(k / 32) * 16 + (k % 16)];
  return static_cast<float>((k % 32) < 16 ? (byte & 0xF) : (byte >> 4));
}

template <int R>
void tile_scalar(const QuantArgs& a, int64_t m0, int64_t n) {
  for (int m = 0; m < R; ++m) {
    float total = 0.0f;
    for (int64_t g = 0; g < a.G; ++g) {
      float sum = 0.0f;
      for (int64_t k = g * a.group; k < (g + 1) * a.group; ++k) sum += a.x[(m0 + m) * a.K + k] * weight_value(a, n, k);
      total += sum * a.scale[n * a.G + g];
    }
    a.out[(m0 + m) * a.N + n] = total + correction(a, m0 + m, n);
  }
}

#if defined(__AVX512F__)
// Row m's result: its lanes' sum, less the zero points' term (offset + zero_shift * scale) . xsum taken as
// vectors of 16 groups into the same lanes (a chain of scalar multiply-subtracts per group cost an int4
// layer 6-15% on the Zen 5 EPYC), plus the bias.
template <int R>
inline void finish(const QuantArgs& a, int64_t m0, int64_t n, __m512 (&total)[R]) {
  if (a.xsum != nullptr) {
    const float* offset = a.offset != nullptr ? a.offset + n * a.G : nullptr;
    const float* scale = a.scale + n * a.G;
    const __m512 shift = _mm512_set1_ps(a.zero_shift);
    for (int64_t g = 0; g < a.G; g += 16) {
      const __mmask16 mask = a.G - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (a.G - g)) - 1);
      __m512 o = offset != nullptr ? _mm512_maskz_loadu_ps(mask, offset + g) : _mm512_setzero_ps();
      if (a.zero_shift != 0.0f) o = _mm512_fmadd_ps(shift, _mm512_maskz_loadu_ps(mask, scale + g), o);
      for (int m = 0; m < R; ++m)
        total[m] = _mm512_fnmadd_ps(o, _mm512_maskz_loadu_ps(mask, a.xsum + (m0 + m) * a.G + g), total[m]);
    }
  }
  for (int m = 0; m < R; ++m)
    a.out[(m0 + m) * a.N + n] = _mm512_reduce_add_ps(total[m]) + (a.bias != nullptr ? a.bias[n] : 0.0f);
}

// The tiles below take one weight row (output n) and R rows of x, and keep two (int8: four) accumulators per
// x row that take the steps along k in turn: one chain of dependent multiply-adds per row held the int8 and
// int4 kernels to ~25 GB/s on the Zen 4 EPYC (a 4-cycle FMA per 16-byte step), the bf16 linear's rate; on
// the Zen 5 EPYC (full-width 512-bit units) four chains ran int8 layers 5-20% faster than two.

// int8: 16 weights per step, masked tail (zeros add nothing); one group (per-channel scale). Four
// accumulators per x row take the steps in turn (summed in one fixed order at the end, whatever R is).
template <int R>
void tile_int8(const QuantArgs& a, int64_t m0, int64_t n) {
  constexpr int CHAINS = 4;
  __m512 acc[CHAINS][R];
  for (int h = 0; h < CHAINS; ++h)
    for (int m = 0; m < R; ++m) acc[h][m] = _mm512_setzero_ps();
  const int8_t* w = reinterpret_cast<const int8_t*>(a.w + n * a.row_bytes);
  const int64_t K = a.K;
  const float* xr[R];
  for (int m = 0; m < R; ++m) xr[m] = a.x + (m0 + m) * K;
  auto step = [&](int64_t k, __mmask16 mask, __m512 (&sums)[R]) {
    const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + k)));
    for (int m = 0; m < R; ++m) sums[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, xr[m] + k), wv, sums[m]);
  };
  constexpr __mmask16 all = 0xFFFF;
  int64_t k = 0;
  for (; k + 16 * CHAINS <= K; k += 16 * CHAINS)
    for (int h = 0; h < CHAINS; ++h) step(k + 16 * h, all, acc[h]);
  for (int h = 0; h < CHAINS; ++h, k += 16)  // the last K % 64, a fixed count of steps (unrolled)
    if (k < K) step(k, K - k >= 16 ? all : static_cast<__mmask16>((1u << (K - k)) - 1), acc[h]);
  const __m512 s = _mm512_set1_ps(a.scale[n]);
  for (int m = 0; m < R; ++m) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]), _mm512_add_ps(acc[2][m], acc[3][m]));
    acc[0][m] = _mm512_mul_ps(sum, s);
  }
  finish<R>(a, m0, n, acc[0]);
}

#if defined(__AVX512VNNI__) && defined(KILN_AVX512)
#define KILN_INT8_VNNI 1
// int8 with x in fixed point (x_digits below): x[m, k] = (d0 + 2^8 d1 + 2^16 d2) * unit[m] with signed byte
// digits, and vpdpbusd (64 unsigned x signed byte products summed in fours into 16 int32 lanes) of the weight
// made unsigned (w + 128, one xor per 64 weights) with each digit: a step of 64 weights is a load, an xor and
// three multiply-adds, with no widening or conversion of the weight. tile_int8 widened and converted every 16
// weights (two 512-bit ops besides its multiply-add), and those conversions were what held it. One thread,
// weights in L3, 2-vCPU Zen 5 EPYC, in-features 768 / 2048 / 6144: tile_int8 29-31 / 36-41 / 32-45 GB/s (~2
// cycles per 16 weights); int16 digits with vpdpwssd (a widening and two multiply-adds per 32 weights) 30-35 /
// 41-42 / 26-45; these 32 / 49 / 37 (the VM's phase moves each by 15-30%). The sums are exact integers:
// per lane and step at most 4 * 255 * 128 < 2^17, a chunk's 64 steps under 2^23, summed into int64 per chunk;
// the 128 taken back as 128 * sum_k x (the row's fixed-point sum, also exact). So the result is the exact dot
// product of the weight with x rounded to 23 bits of its row's largest |x| (at most 2^-23 of it per element,
// below fp32's rounding of the products' sum), times unit and scale, rounded once.
// The weight is prefetched VNNI_PREFETCH_BYTES ahead of the step (the rows follow each other in memory, so
// this runs into the thread's next rows): the 134M model's 85 int8 linears of a batch-1 token, from memory,
// 2 threads, Zen 5 EPYC, alternating runs: 2.4-3.2 ms without, 2.4-2.6 at 8 KB, 2.4-2.8 at 16-24 KB.
constexpr int64_t VNNI_PREFETCH_BYTES = 8 * 1024;

template <int R>
void tile_int8_vnni(const QuantArgs& a, int64_t m0, int64_t n) {
  constexpr int64_t CHUNK = 4096;
  constexpr int H = R == 1 ? 2 : 1;  // accumulators per digit and x row, taking the steps in turn
  int64_t total[3][R] = {};
  const uint8_t* w = a.w + n * a.row_bytes;
  const int64_t K = a.K, plane = a.M * a.x_stride;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
    const int64_t k1 = std::min(K, k0 + CHUNK);
    __m512i acc[H][3][R];
    for (int h = 0; h < H; ++h)
      for (int d = 0; d < 3; ++d)
        for (int m = 0; m < R; ++m) acc[h][d][m] = _mm512_setzero_si512();
    auto step = [&](int64_t k, __m512i wv, __m512i (&sums)[3][R]) {
      wv = _mm512_xor_si512(wv, flip);  // w + 128: unsigned
      for (int m = 0; m < R; ++m) {
        const int8_t* xd = a.x_digits + (m0 + m) * a.x_stride + k;
        for (int d = 0; d < 3; ++d)
          sums[d][m] = _mm512_dpbusd_epi32(sums[d][m], wv, _mm512_loadu_si512(xd + d * plane));
      }
    };
    int64_t k = k0;
    for (; k + 64 * H <= k1; k += 64 * H) {
      for (int h = 0; h < H; ++h)  // a cache line per 64 weights
        _mm_prefetch(reinterpret_cast<const char*>(w + k + 64 * h + VNNI_PREFETCH_BYTES), _MM_HINT_T0);
      for (int h = 0; h < H; ++h) step(k + 64 * h, _mm512_loadu_si512(w + k + 64 * h), acc[h]);
    }
    for (int h = 0; h < H && k < k1; k += 64, ++h) {
      const __mmask64 mask = k1 - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (k1 - k)) - 1;
      step(k, _mm512_maskz_loadu_epi8(mask, w + k), acc[h]);
    }
    for (int d = 0; d < 3; ++d)
      for (int m = 0; m < R; ++m) {
        __m512i sum = acc[0][d][m];
        for (int h = 1; h < H; ++h) sum = _mm512_add_epi32(sum, acc[h][d][m]);
        total[d][m] += _mm512_reduce_add_epi32(sum);
      }
  }
  for (int m = 0; m < R; ++m) {
    const int64_t sums = total[0][m] + 256 * total[1][m] + 65536 * total[2][m] - 128 * a.x_sum[m0 + m];
    a.out[(m0 + m) * a.N + n] = static_cast<float>(static_cast<double>(sums) * a.x_unit[m0 + m] * a.scale[n]) +
                                (a.bias != nullptr ? a.bias[n] : 0.0f);
  }
}

#endif

// int4: 32 weights (16 bytes) per step, the low nibbles into one accumulator and the high into the other;
// each group's sums scaled into the running total.
template <int R>
void tile_int4(const QuantArgs& a, int64_t m0, int64_t n) {
  __m512 total[R];
  for (int m = 0; m < R; ++m) total[m] = _mm512_setzero_ps();
  const uint8_t* w = a.w + n * a.row_bytes;
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 acc[2][R];
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < R; ++m) acc[h][m] = _mm512_setzero_ps();
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 32) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low_nibble));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
      for (int m = 0; m < R; ++m) {
        const float* xr = a.x + (m0 + m) * a.K + k;
        acc[0][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), lo, acc[0][m]);
        acc[1][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), hi, acc[1][m]);
      }
    }
    const __m512 s = _mm512_set1_ps(a.scale[n * a.G + g]);
    for (int m = 0; m < R; ++m) total[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[0][m], acc[1][m]), s, total[m]);
  }
  finish<R>(a, m0, n, total);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define KILN_INT4_BF16 1
// int4 with a bf16 x (the bf16 models' decode): 64 weights (32 bytes) per step, each nibble u made the bf16
// of 128 + u by setting the bits of 128.0 (0x4300) above it (exact: 128 + u needs 8 significant bits), and
// multiplied with vdpbf16ps, about half the instructions per weight of tile_int4's widen-convert-fma; the 128
// is taken back through the zero-point term (QuantArgs::zero_shift). 2-vCPU Zen 5 EPYC, one row, 134M
// shapes: 5-8% faster than the 16-entry table lookup (vpermw) it replaced; four accumulator chains instead
// of two gave nothing.
// The step's 32 bytes widened to 16-bit lanes hold, in lane j < 16, elements j (low nibble) and j + 16
// (high) of the first chunk, in lane 16 + j elements 32 + j and 48 + j of the second: so the low nibbles
// pair with x[0..15], x[32..47] and the high ones with x[16..31], x[48..63], which is how quant_linear lays
// out `xb` per 64 elements. Products of a bf16 x and an integer below 256 are exact in fp32, so only the
// fp32 accumulation order differs from the reference. Groups are multiples of 64 here.
template <int R>
void tile_int4_bf16(const QuantArgs& a, int64_t m0, int64_t n) {
  __m512 total[R];
  for (int m = 0; m < R; ++m) total[m] = _mm512_setzero_ps();
  const uint8_t* w = a.w + n * a.row_bytes;
  const __m512i bf16_128 = _mm512_set1_epi16(0x4300), low_nibble = _mm512_set1_epi16(0xF);
  const uint16_t* xr[R];
  for (int m = 0; m < R; ++m) xr[m] = a.xb + (m0 + m) * a.K;
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 acc[2][R];
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < R; ++m) acc[h][m] = _mm512_setzero_ps();
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 64) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k / 2)));
      const __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(v, low_nibble, bf16_128, 0xEA);  // (v & 0xF) | 0x4300
      const __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), bf16_128);
      for (int m = 0; m < R; ++m) {
        acc[0][m] = _mm512_dpbf16_ps(acc[0][m], (__m512bh)_mm512_loadu_si512(xr[m] + k), lo);
        acc[1][m] = _mm512_dpbf16_ps(acc[1][m], (__m512bh)_mm512_loadu_si512(xr[m] + k + 32), hi);
      }
    }
    const __m512 s = _mm512_set1_ps(a.scale[n * a.G + g]);
    for (int m = 0; m < R; ++m) total[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[0][m], acc[1][m]), s, total[m]);
  }
  finish<R>(a, m0, n, total);
}
#endif
#endif

#if defined(__AVX512F__)
// Tiles of C weight rows (output columns n0..n0+C-1) against R rows of x, for Intel CPUs (see quant_linear):
// one accumulator per output, so R x C independent multiply-add chains where the one-row tiles above have two
// per x row. The C rows are read side by side, as kiln::linear does on Intel, with a software prefetch of the
// weight PREFETCH_BYTES ahead (12-96 KB measured alike). 2-vCPU Xeon with AMX (2026-12-07), one x row, the
// 134M model's layers and LM head cycled from memory, 2 threads, two runs each: int8 10-12.5 GB/s with the
// one-row tiles, 16-30 with these; int4 6-7.5 -> 9-17 (bf16's kiln::linear 21-41 beside them). A row's sums
// run over k in the same order whatever R is, so a row's result does not depend on how many rows are in the
// call.
constexpr int COLS = 4;
constexpr int64_t PREFETCH_BYTES = 12 * 1024;

// Bytes from a tile's rows to the weight to prefetch: whole tiles, at least one. Past the weight's end near
// the last tiles: a prefetch is a hint and never faults.
inline int64_t prefetch_distance(const QuantArgs& a) {
  const int64_t tile_bytes = COLS * a.row_bytes;
  return tile_bytes * std::max<int64_t>(1, (PREFETCH_BYTES + tile_bytes - 1) / tile_bytes);
}

template <int R, int C>
inline void finish_cols(const QuantArgs& a, int64_t m0, int64_t n0, __m512 (&total)[R][C]) {
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < C; ++c)
      a.out[(m0 + m) * a.N + n0 + c] = _mm512_reduce_add_ps(total[m][c]) + correction(a, m0 + m, n0 + c);
}

// int8: 16 weights of each row per step, 64 (one cache line) per prefetch; masked tail.
template <int R, int C>
void cols_int8(const QuantArgs& a, int64_t m0, int64_t n0) {
  __m512 acc[R][C];
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
  const int8_t* w = reinterpret_cast<const int8_t*>(a.w + n0 * a.row_bytes);
  const int64_t ahead = prefetch_distance(a);
  auto step = [&](int64_t k, __mmask16 mask, bool full) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) {
      const int8_t* wk = w + c * a.row_bytes + k;
      const __m128i bytes =
          full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(wk)) : _mm_maskz_loadu_epi8(mask, wk);
      wv[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    }
    for (int m = 0; m < R; ++m) {
      const float* xk = a.x + (m0 + m) * a.K + k;
      const __m512 xv = full ? _mm512_loadu_ps(xk) : _mm512_maskz_loadu_ps(mask, xk);
      for (int c = 0; c < C; ++c) acc[m][c] = _mm512_fmadd_ps(xv, wv[c], acc[m][c]);
    }
  };
  constexpr __mmask16 all = 0xFFFF;
  int64_t k = 0;
  for (; k + 64 <= a.K; k += 64) {
    for (int c = 0; c < C; ++c)
      _mm_prefetch(reinterpret_cast<const char*>(w + c * a.row_bytes + k + ahead), _MM_HINT_T0);
    step(k, all, true), step(k + 16, all, true), step(k + 32, all, true), step(k + 48, all, true);
  }
  for (; k + 16 <= a.K; k += 16) step(k, all, true);
  if (k < a.K) step(k, static_cast<__mmask16>((1u << (a.K - k)) - 1), false);
  for (int c = 0; c < C; ++c) {
    const __m512 s = _mm512_set1_ps(a.scale[n0 + c]);
    for (int m = 0; m < R; ++m) acc[m][c] = _mm512_mul_ps(acc[m][c], s);
  }
  finish_cols<R, C>(a, m0, n0, acc);
}

// int4, fp32 x: 32 weights (16 bytes) of each row per step; a group's sums scaled into the running total.
template <int R, int C>
void cols_int4(const QuantArgs& a, int64_t m0, int64_t n0) {
  __m512 total[R][C];
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < C; ++c) total[m][c] = _mm512_setzero_ps();
  const uint8_t* w = a.w + n0 * a.row_bytes;
  const int64_t ahead = prefetch_distance(a);
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 acc[R][C];
    for (int m = 0; m < R; ++m)
      for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 32) {
      if (k % 128 == 0)
        for (int c = 0; c < C; ++c)
          _mm_prefetch(reinterpret_cast<const char*>(w + c * a.row_bytes + k / 2 + ahead), _MM_HINT_T0);
      __m512 lo[C], hi[C];
      for (int c = 0; c < C; ++c) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * a.row_bytes + k / 2));
        const __m512i v = _mm512_cvtepu8_epi32(bytes);
        lo[c] = _mm512_cvtepi32_ps(_mm512_and_si512(v, low_nibble));
        hi[c] = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
      }
      for (int m = 0; m < R; ++m) {
        const float* xr = a.x + (m0 + m) * a.K + k;
        const __m512 xlo = _mm512_loadu_ps(xr), xhi = _mm512_loadu_ps(xr + 16);
        for (int c = 0; c < C; ++c) acc[m][c] = _mm512_fmadd_ps(xhi, hi[c], _mm512_fmadd_ps(xlo, lo[c], acc[m][c]));
      }
    }
    for (int c = 0; c < C; ++c) {
      const __m512 s = _mm512_set1_ps(a.scale[(n0 + c) * a.G + g]);
      for (int m = 0; m < R; ++m) total[m][c] = _mm512_fmadd_ps(acc[m][c], s, total[m][c]);
    }
  }
  finish_cols<R, C>(a, m0, n0, total);
}

#if defined(KILN_INT4_BF16)
// int4, bf16 x: tile_int4_bf16's 64-weight steps (its nibble conversion and x layout), C rows side by side.
template <int R, int C>
void cols_int4_bf16(const QuantArgs& a, int64_t m0, int64_t n0) {
  __m512 total[R][C];
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < C; ++c) total[m][c] = _mm512_setzero_ps();
  const uint8_t* w = a.w + n0 * a.row_bytes;
  const int64_t ahead = prefetch_distance(a);
  const __m512i bf16_128 = _mm512_set1_epi16(0x4300), low_nibble = _mm512_set1_epi16(0xF);
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 acc[R][C];
    for (int m = 0; m < R; ++m)
      for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 64) {
      if (k % 128 == 0)
        for (int c = 0; c < C; ++c)
          _mm_prefetch(reinterpret_cast<const char*>(w + c * a.row_bytes + k / 2 + ahead), _MM_HINT_T0);
      __m512bh lo[C], hi[C];
      for (int c = 0; c < C; ++c) {
        const __m512i v =
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * a.row_bytes + k / 2)));
        lo[c] = (__m512bh)_mm512_ternarylogic_epi32(v, low_nibble, bf16_128, 0xEA);  // (v & 0xF) | 0x4300
        hi[c] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), bf16_128);
      }
      for (int m = 0; m < R; ++m) {
        const uint16_t* xr = a.xb + (m0 + m) * a.K + k;
        const __m512bh xlo = (__m512bh)_mm512_loadu_si512(xr), xhi = (__m512bh)_mm512_loadu_si512(xr + 32);
        for (int c = 0; c < C; ++c) acc[m][c] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[m][c], xlo, lo[c]), xhi, hi[c]);
      }
    }
    for (int c = 0; c < C; ++c) {
      const __m512 s = _mm512_set1_ps(a.scale[(n0 + c) * a.G + g]);
      for (int m = 0; m < R; ++m) total[m][c] = _mm512_fmadd_ps(acc[m][c], s, total[m][c]);
    }
  }
  finish_cols<R, C>(a, m0, n0, total);
}
#endif

// The x rows one column tile takes at a time: int4 keeps a group accumulator and a total per output.
inline int cols_rows(const QuantArgs& a) { return a.bits == 8 ? 4 : 2; }

template <int R, int C>
inline void run_cols_tile(const QuantArgs& a, int64_t m0, int64_t n0) {
  if (a.bits == 8) return cols_int8<R, C>(a, m0, n0);
  if constexpr (R <= 2) {
#if defined(KILN_INT4_BF16)
    if (a.xb != nullptr) return cols_int4_bf16<R, C>(a, m0, n0);
#endif
    return cols_int4<R, C>(a, m0, n0);
  }
}

template <int R>
inline void run_cols_rows(int cols, const QuantArgs& a, int64_t m0, int64_t n0) {
  switch (cols) {
    case 4: return run_cols_tile<R, 4>(a, m0, n0);
    case 3: return run_cols_tile<R, 3>(a, m0, n0);
    case 2: return run_cols_tile<R, 2>(a, m0, n0);
    default: return run_cols_tile<R, 1>(a, m0, n0);
  }
}

inline void run_cols_block(int rows, int cols, const QuantArgs& a, int64_t m0, int64_t n0) {
  switch (rows) {
    case 4: return run_cols_rows<4>(cols, a, m0, n0);
    case 3: return run_cols_rows<3>(cols, a, m0, n0);
    case 2: return run_cols_rows<2>(cols, a, m0, n0);
    default: return run_cols_rows<1>(cols, a, m0, n0);
  }
}

inline bool column_tiles() {
  static const bool intel = !__builtin_cpu_is("amd");
  return intel;
}
#else
inline bool column_tiles() { return false; }
#endif

#if defined(KILN_QUANT_AVX2)
template <int R>
inline void finish_avx2(const QuantArgs& a, int64_t m0, int64_t n, __m256 (&total)[R]) {
  for (int m = 0; m < R; ++m) a.out[(m0 + m) * a.N + n] = hsum8(total[m]) + correction(a, m0 + m, n);
}

// int8 (AVX2): 8 weights per step into two accumulators per x row that alternate along k (as tile_int8);
// the K tail goes through zero-padded copies.
template <int R>
void tile_int8_avx2(const QuantArgs& a, int64_t m0, int64_t n) {
  __m256 acc[2][R];
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < R; ++m) acc[h][m] = _mm256_setzero_ps();
  const int8_t* w = reinterpret_cast<const int8_t*>(a.w + n * a.row_bytes);
  auto step = [&](const int8_t* wk, const float* const (&xk)[R], __m256 (&sums)[R]) {
    const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wk))));
    for (int m = 0; m < R; ++m) sums[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xk[m]), wv, sums[m]);
  };
  const float* xk[R];
  int64_t k = 0;
  for (; k + 16 <= a.K; k += 16) {
    for (int m = 0; m < R; ++m) xk[m] = a.x + (m0 + m) * a.K + k;
    step(w + k, xk, acc[0]);
    for (int m = 0; m < R; ++m) xk[m] += 8;
    step(w + k + 8, xk, acc[1]);
  }
  for (int h = 0; k < a.K; k += 8, ++h) {  // 1..15 left: padded to 8 (zeros add nothing)
    const int64_t count = std::min<int64_t>(8, a.K - k);
    int8_t wt[8] = {};
    float xt[R][8] = {};
    std::copy_n(w + k, count, wt);
    for (int m = 0; m < R; ++m) std::copy_n(a.x + (m0 + m) * a.K + k, count, xt[m]), xk[m] = xt[m];
    step(wt, xk, acc[h]);
  }
  const __m256 s = _mm256_set1_ps(a.scale[n]);
  for (int m = 0; m < R; ++m) acc[0][m] = _mm256_mul_ps(_mm256_add_ps(acc[0][m], acc[1][m]), s);
  finish_avx2<R>(a, m0, n, acc[0]);
}

// int4 (AVX2): a 16-byte chunk is 32 weights: bytes 0..7 and 8..15 widened to 8 lanes each, low nibbles
// elements 0..15 (into acc[0]), high nibbles 16..31 (into acc[1]); each group's sums scaled into the total.
template <int R>
void tile_int4_avx2(const QuantArgs& a, int64_t m0, int64_t n) {
  __m256 total[R];
  for (int m = 0; m < R; ++m) total[m] = _mm256_setzero_ps();
  const uint8_t* w = a.w + n * a.row_bytes;
  const __m256i low_nibble = _mm256_set1_epi32(0xF);
  for (int64_t g = 0; g < a.G; ++g) {
    __m256 acc[2][R];
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < R; ++m) acc[h][m] = _mm256_setzero_ps();
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 32) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2));
      const __m256i v0 = _mm256_cvtepu8_epi32(bytes), v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
      const __m256 lo0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, low_nibble));
      const __m256 lo1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, low_nibble));
      const __m256 hi0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
      const __m256 hi1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
      for (int m = 0; m < R; ++m) {
        const float* xr = a.x + (m0 + m) * a.K + k;
        acc[0][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), lo0, acc[0][m]);
        acc[1][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), hi0, acc[1][m]);
        acc[0][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), lo1, acc[0][m]);
        acc[1][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), hi1, acc[1][m]);
      }
    }
    const __m256 s = _mm256_set1_ps(a.scale[n * a.G + g]);
    for (int m = 0; m < R; ++m) total[m] = _mm256_fmadd_ps(_mm256_add_ps(acc[0][m], acc[1][m]), s, total[m]);
  }
  finish_avx2<R>(a, m0, n, total);
}
#endif

template <int R>
inline void run_tile(const QuantArgs& a, int64_t m0, int64_t n) {
#if defined(__AVX512F__)
#if defined(KILN_INT8_VNNI)
  if (a.bits == 8 && a.x_digits != nullptr) return tile_int8_vnni<R>(a, m0, n);
#endif
  if (a.bits == 8) return tile_int8<R>(a, m0, n);
#if defined(KILN_INT4_BF16)
  if (a.xb != nullptr) return tile_int4_bf16<R>(a, m0, n);
#endif
  return tile_int4<R>(a, m0, n);
#elif defined(KILN_QUANT_AVX2)
  if (a.bits == 8) return tile_int8_avx2<R>(a, m0, n);
  return tile_int4_avx2<R>(a, m0, n);
#else
  tile_scalar<R>(a, m0, n);
#endif
}

inline void run_block(int rows, const QuantArgs& a, int64_t m0, int64_t n) {
  switch (rows) {
    case 4: return run_tile<4>(a, m0, n);
    case 3: return run_tile<3>(a, m0, n);
    case 2: return run_tile<2>(a, m0, n);
    default: return run_tile<1>(a, m0, n);
  }
}

void check_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                const c10::optional<at::Tensor>& offset, int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && scale.dim() == 2,
              "kiln::quant_linear: x (M, K), qweight and scale (N, G) must be 2-D");
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "kiln::quant_linear runs on CPU tensors only");
  TORCH_CHECK(bits == 8 || bits == 4, "kiln::quant_linear: bits must be 8 or 4, got ", bits);
  const int64_t K = x.size(1), N = qweight.size(0), G = scale.size(1);
  TORCH_CHECK(scale.size(0) == N && scale.scalar_type() == at::kFloat, "kiln::quant_linear: scale must be (",
              N, ", G) float32");
  if (bits == 8) {
    TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.size(1) == K && G == 1,
                "kiln::quant_linear: 8-bit qweight must be (N, K) int8 with one scale per row");
  } else {
    TORCH_CHECK(qweight.scalar_type() == at::kByte && K % 32 == 0 && qweight.size(1) * 2 == K,
                "kiln::quant_linear: 4-bit qweight must be (N, K / 2) uint8 with K a multiple of 32");
    TORCH_CHECK(G > 0 && K % G == 0 && (K / G) % 32 == 0, "kiln::quant_linear: 4-bit groups must be ",
                "multiples of 32 that divide K");
  }
  if (offset.has_value() && offset->defined()) {
    TORCH_CHECK(offset->sizes() == scale.sizes() && offset->scalar_type() == at::kFloat,
                "kiln::quant_linear: offset must match scale");
  }
}

// x's rows widened to fp32 (src and dst M x K, contiguous), and fp32 results rounded to the output's
// dtype (round to nearest even, as Tensor::to rounds): plain loops on the op's own buffers, because the
// ATen conversions they replace cost a dispatch and an allocation each, ~0.5 ms of a ~5 ms int8 decode
// token at the 134M shape (3 per linear, 84 linears).
template <typename T>
void convert(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void convert(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

#if defined(KILN_INT8_VNNI)
// x's rows (M, K) fp32 as tile_int8_vnni takes them: each row scaled by a power of two so its largest |x|
// lands in [2^21, 2^22), rounded to an integer v (nearest, even), and v split into signed byte digits
// d0 + 2^8 d1 + 2^16 d2 (|d2| <= 64), with unit = that power of two's inverse and the row's sum of v. A row
// holding an inf or NaN gets unit NaN (its digits 0): its sums must come out inf/NaN as the reference's do,
// so quant_linear computes such rows again with the float tile. digits: (3, M, stride), zeros past K.
void x_digits(const float* x, int64_t M, int64_t K, int64_t stride, std::vector<int8_t>& digits,
             std::vector<int64_t>& sums, std::vector<float>& unit) {
  digits.assign(3 * M * stride, 0), sums.assign(M, 0), unit.assign(M, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    const float largest = abs_max(row, K);
    bool finite = std::isfinite(largest);
    for (int64_t k = 0; k < K && finite; ++k) finite = std::isfinite(row[k]);
    if (!finite) {
      unit[m] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (largest == 0.0f) continue;
    int exponent = 0;
    std::frexp(largest, &exponent);
    const __m512 to_fixed = _mm512_set1_ps(std::ldexp(1.0f, 22 - exponent));
    unit[m] = std::ldexp(1.0f, exponent - 22);
    __m512i total = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = tail_mask(K - k);
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load_ps(row + k, mask), to_fixed));
      total = _mm512_add_epi64(total, _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                                       _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
      for (int d = 0; d < 3; ++d) {
        const __m512i digit = d < 2 ? _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24) : v;  // low byte, signed
        _mm_mask_storeu_epi8(digits.data() + (d * M + m) * stride + k, mask, _mm512_cvtepi32_epi8(digit));
        v = _mm512_srai_epi32(_mm512_sub_epi32(v, digit), 8);
      }
    }
    sums[m] = _mm512_reduce_add_epi64(total);
  }
}
#endif

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                        const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias,
                        int64_t bits) {
  check_args(x, qweight, scale, offset, bits);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "kiln::quant_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), G = scale.size(1);
  const bool fp32 = x.scalar_type() == at::kFloat;
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  // fp32 x and results: the tensors themselves; bf16/fp16: fp32 copies in these buffers.
  std::vector<float> x_buffer(fp32 ? 0 : M * K), out_buffer(fp32 ? 0 : M * N);
  if (!fp32) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "quant_linear", [&] {
      convert(xc.const_data_ptr<scalar_t>(), x_buffer.data(), M * K);
    });
  }
  const float* x_data = fp32 ? xc.const_data_ptr<float>() : x_buffer.data();
  float* out_data = fp32 ? out.mutable_data_ptr<float>() : out_buffer.data();
  at::Tensor wc = qweight.contiguous(), sc = scale.contiguous();
  at::Tensor off, b;
  if (offset.has_value() && offset->defined()) off = offset->contiguous();
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  if (M == 0 || N == 0) return out;
  std::vector<uint16_t> xb;
#if defined(KILN_INT4_BF16)
  if (bits == 4 && x.scalar_type() == at::kBFloat16 && (K / G) % 64 == 0) {
    // per 64 elements [0..15, 32..47, 16..31, 48..63]: the lanes tile_int4_bf16's weights land in
    xb.resize(M * K);
    const uint16_t* src = reinterpret_cast<const uint16_t*>(xc.const_data_ptr());
    for (int64_t chunk = 0; chunk < M * K; chunk += 64)
      for (int64_t part = 0; part < 4; ++part)  // destination part: source quarter 0, 2, 1, 3
        std::copy_n(src + chunk + (part % 2) * 32 + (part / 2) * 16, 16, xb.data() + chunk + part * 16);
  }
#endif
  QuantArgs args{x_data,
                 xb.empty() ? nullptr : xb.data(),
                 reinterpret_cast<const uint8_t*>(wc.const_data_ptr()),
                 sc.const_data_ptr<float>(),
                 off.defined() ? off.const_data_ptr<float>() : nullptr,
                 nullptr,  // xsum, below
                 b.defined() ? b.const_data_ptr<float>() : nullptr,
                 out_data,
                 M, K, N, G, K / G, wc.size(1), static_cast<int>(bits)};
  if (!xb.empty()) args.zero_shift = 128.0f;  // the bf16 int4 tiles' weights are 128 + u, not u
#if defined(KILN_INT8_VNNI)
  std::vector<int8_t> x_digit_bytes;  // int8 on AMD: x in fixed point for tile_int8_vnni
  std::vector<int64_t> x_sum;
  std::vector<float> x_unit;
  if (bits == 8 && !column_tiles()) {
    args.x_stride = (K + 127) / 128 * 128;
    x_digits(x_data, M, K, args.x_stride, x_digit_bytes, x_sum, x_unit);
    args.x_digits = x_digit_bytes.data(), args.x_sum = x_sum.data(), args.x_unit = x_unit.data();
  }
#endif
  std::vector<float> xsum;  // (M, G): each group's sum of x, for the zero points' term (and the shift's)
  if (off.defined() || args.zero_shift != 0.0f) {
    xsum.assign(M * G, 0.0f);
    const int64_t group = K / G;
    for (int64_t mg = 0; mg < M * G; ++mg) {  // a plain reduction per group, which the compiler vectorises
      float sum = 0.0f;
      for (int64_t k = 0; k < group; ++k) sum += x_data[mg * group + k];
      xsum[mg] = sum;
    }
    args.xsum = xsum.data();
  }
  // AMD: one weight row per tile, so each thread reads its slab of the weight as one sequential stream (four
  // rows read side by side streamed at half the bandwidth on the Zen 4 EPYC: linear.cpp); a row block of
  // x passes over the row while it sits in L1.
#if defined(__AVX512F__)
  if (column_tiles()) {  // Intel: COLS weight rows side by side per tile (see cols_int8)
    const int64_t tiles = (N + COLS - 1) / COLS, rows = cols_rows(args);
    at::parallel_for(0, tiles, GRAIN_ROWS / COLS, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int cols = static_cast<int>(std::min<int64_t>(COLS, N - t * COLS));
        for (int64_t m = 0; m < M; m += rows)
          run_cols_block(static_cast<int>(std::min<int64_t>(rows, M - m)), cols, args, m, t * COLS);
      }
    });
  } else
#endif
  at::parallel_for(0, N, GRAIN_ROWS, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m = 0; m < M; m += ROWS) run_block(static_cast<int>(std::min<int64_t>(ROWS, M - m)), args, m, n);
    }
  });
#if defined(KILN_INT8_VNNI)
  for (int64_t m = 0; m < M && args.x_unit != nullptr; ++m) {  // rows with an inf or NaN: the float tile
    if (!std::isnan(args.x_unit[m])) continue;
    at::parallel_for(0, N, GRAIN_ROWS, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) tile_int8<1>(args, m, n);
    });
  }
#endif
  if (!fp32) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "quant_linear", [&] {
      convert(out_buffer.data(), out.mutable_data_ptr<scalar_t>(), M * N);
    });
  }
  return out;
}

at::Tensor quant_linear_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                             const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias,
                             int64_t bits) {
  return at::empty({x.size(0), qweight.size(0)}, x.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def(
      "quant_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? offset=None, Tensor? bias=None, "
      "int bits=8) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("quant_linear", &quant_linear); }

TORCH_LIBRARY_IMPL(kiln, Meta, m) { m.impl("quant_linear", &quant_linear_meta); }
