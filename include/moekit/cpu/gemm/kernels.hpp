#pragma once
// The GEMM engine's kernels, one namespace per path (see cpu/isa.hpp for why):
//
//   cpu::generic::gemm_kernels   portable: fp32 / bf16 FMA 6 x 16, int8 4 x 16
//   cpu::generic::amx_emulated   the AMX kernels on EmulatedTiles (tests)
//   cpu::avx2::gemm_kernels      fp32 / bf16 FMA 6 x 16; int8 2 x 16 on VPMADDWD
//   cpu::avx512::gemm_kernels    fp32 / bf16 FMA 12 x 32; int8 12 x 32 on VPDPBUSD
//   cpu::avx512::amx_kernels     bf16 / int8 on AMX tiles (32 x 32 steps)
//
// The fp32 and bf16 FMA kernels, the int8 driver and the AMX kernels are
// written once (gemm/detail/*-inl.hpp) and included into each namespace with
// its target; only the int8 tile kernels, which work on integer vectors,
// are written per path below. Their int32 sums are exact, so they agree bit
// for bit; everything in floating point goes through F32x16 operations with
// the same bits on every path.

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "moekit/core/config.hpp"
#include "moekit/core/types.hpp"
#include "moekit/cpu/gemm/common.hpp"
#include "moekit/cpu/gemm/tiles.hpp"
#include "moekit/cpu/vec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// ---- portable ------------------------------------------------------------------

namespace generic::gemm_kernels {

// For t < cols: dst[stride t + r] = src[ld r + t] for r < rows, 0 for
// rows <= r < 8.
inline void transpose8(const float* src, index_t ld, int rows, int cols, float* dst,
                       index_t stride) {
  for (int t = 0; t < cols; ++t)
    for (int r = 0; r < 8; ++r) dst[stride * t + r] = r < rows ? src[ld * r + t] : 0.0f;
}

#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_GENERIC
#include "moekit/cpu/gemm/detail/epilogue-inl.hpp"
#include "moekit/cpu/gemm/detail/fma_kernel-inl.hpp"

// Plain int32 loops over the quad layouts (wrapping arithmetic in unsigned).
template <int MR, int NB, bool kOffsetA>
void int8_tile(index_t kq, const std::int8_t* a, const std::int8_t* b, index_t b_stride,
               std::int32_t* sums, bool resume) {
  constexpr int NR = NB * kF32x16Lanes;
  std::uint32_t acc[std::size_t{MR}][std::size_t{NR}];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      acc[i][j] = resume ? static_cast<std::uint32_t>(sums[i * NR + j]) : 0U;
  for (index_t q = 0; q < kq; ++q) {
    for (int i = 0; i < MR; ++i) {
      for (int t = 0; t < 4; ++t) {
        const std::int8_t raw = a[4 * (q * MR + i) + t];
        const int av = kOffsetA ? int{static_cast<std::uint8_t>(raw)} : int{raw};
        for (int j = 0; j < NR; ++j) {
          const int bv = b[(j / 16) * b_stride + q * 64 + 4 * (j % 16) + t];
          acc[i][j] += static_cast<std::uint32_t>(av * bv);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) sums[i * NR + j] = static_cast<std::int32_t>(acc[i][j]);
}

#include "moekit/cpu/gemm/detail/int8_kernel-inl.hpp"
#undef MOEKIT_KERNEL_TARGET
}  // namespace generic::gemm_kernels

namespace generic::amx_emulated {
using namespace generic::gemm_kernels;
using Tiles = EmulatedTiles;
#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_GENERIC
#include "moekit/cpu/gemm/detail/amx_kernel-inl.hpp"
#undef MOEKIT_KERNEL_TARGET
}  // namespace generic::amx_emulated

#if MOEKIT_DETAIL_X86

// ---- AVX2 --------------------------------------------------------------------------

namespace avx2::gemm_kernels {

// For t < cols: dst[stride t + r] = src[ld r + t] for r < rows, 0 for
// rows <= r < 8: the usual unpack / shuffle / lane-permute 8 x 8 transpose.
MOEKIT_FORCE_INLINE MOEKIT_TARGET_AVX2 void transpose8(const float* src, index_t ld, int rows,
                                                       int cols, float* dst, index_t stride) {
  const __m256i mask = half_mask(cols);
  __m256 r[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    r[i] = i < rows ? _mm256_maskload_ps(src + ld * i, mask) : _mm256_setzero_ps();
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  const __m256 out[8] = {
      _mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
      _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
      _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
      _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t)
    if (t < cols) _mm256_storeu_ps(dst + stride * t, out[t]);
}

#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_AVX2
#include "moekit/cpu/gemm/detail/epilogue-inl.hpp"
#include "moekit/cpu/gemm/detail/fma_kernel-inl.hpp"

// Quads sign-extended to int16 and multiplied with VPMADDWD (exact: never the
// saturating VPMADDUBSW). An accumulator covers 4 columns, two int32 halves
// of each column's quad; the halves are added at the end.
template <int MR, int NB, bool kOffsetA>
MOEKIT_TARGET_AVX2 void int8_tile(index_t kq, const std::int8_t* a, const std::int8_t* b,
                                  index_t b_stride, std::int32_t* sums, bool resume) {
  static_assert(!kOffsetA, "the AVX2 kernel multiplies signed bytes");
  constexpr int NR = NB * kF32x16Lanes, kChunks = NR / 4;
  __m256i acc[std::size_t{MR}][std::size_t{kChunks}];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChunks; ++c) acc[i][c] = _mm256_setzero_si256();
  }
  for (index_t q = 0; q < kq; ++q) {
    __m256i bw[std::size_t{kChunks}];
#pragma GCC unroll 16
    for (int c = 0; c < kChunks; ++c)
      bw[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(b + (c / 4) * b_stride + q * 64 + (c % 4) * 16)));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      std::int32_t quad;
      std::memcpy(&quad, a + 4 * (q * MR + i), sizeof quad);
      const __m256i aw = _mm256_cvtepi8_epi16(_mm_set1_epi32(quad));
#pragma GCC unroll 16
      for (int c = 0; c < kChunks; ++c)
        acc[i][c] = _mm256_add_epi32(acc[i][c], _mm256_madd_epi16(aw, bw[c]));
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChunks; c += 2) {
      // hadd gives columns 4c, 4c+1, 4c+4, 4c+5 | 4c+2, 4c+3, 4c+6, 4c+7; reorder.
      __m256i s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][c], acc[i][c + 1]), 0xD8);
      std::int32_t* out = sums + i * NR + 4 * c;
      if (resume) s = _mm256_add_epi32(s, _mm256_loadu_si256(reinterpret_cast<__m256i*>(out)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), s);
    }
  }
}

#include "moekit/cpu/gemm/detail/int8_kernel-inl.hpp"
#undef MOEKIT_KERNEL_TARGET
}  // namespace avx2::gemm_kernels

// ---- AVX-512 and AMX -----------------------------------------------------------------

MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_BEGIN
namespace avx512::gemm_kernels {
using avx2::gemm_kernels::transpose8;
#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_AVX512
#include "moekit/cpu/gemm/detail/epilogue-inl.hpp"
#include "moekit/cpu/gemm/detail/fma_kernel-inl.hpp"
#undef MOEKIT_KERNEL_TARGET

// VPDPBUSD: unsigned A (a + 128) times signed B, four products per int32.
template <int MR, int NB, bool kOffsetA>
MOEKIT_TARGET_AVX512_VNNI void int8_tile(index_t kq, const std::int8_t* a, const std::int8_t* b,
                                         index_t b_stride, std::int32_t* sums, bool resume) {
  static_assert(kOffsetA, "VPDPBUSD multiplies unsigned A bytes");
  constexpr int NR = NB * kF32x16Lanes;
  __m512i acc[std::size_t{MR}][std::size_t{NB}];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j)
      acc[i][j] = resume ? _mm512_loadu_si512(sums + i * NR + j * 16) : _mm512_setzero_si512();
  }
  for (index_t q = 0; q < kq; ++q) {
    __m512i bv[std::size_t{NB}];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) bv[j] = _mm512_loadu_si512(b + j * b_stride + q * 64);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      std::int32_t quad;
      std::memcpy(&quad, a + 4 * (q * MR + i), sizeof quad);
      const __m512i av = _mm512_set1_epi32(quad);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, bv[j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) _mm512_storeu_si512(sums + i * NR + j * 16, acc[i][j]);
  }
}

// The int8 driver with VNNI in its target, so the tile kernel inlines.
#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_AVX512_VNNI
#include "moekit/cpu/gemm/detail/int8_kernel-inl.hpp"
#undef MOEKIT_KERNEL_TARGET
}  // namespace avx512::gemm_kernels

namespace avx512::amx_kernels {
using namespace avx512::gemm_kernels;
#if MOEKIT_HAS_HARDWARE_TILES
using Tiles = HardwareTiles;
#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_AMX
#include "moekit/cpu/gemm/detail/amx_kernel-inl.hpp"
#undef MOEKIT_KERNEL_TARGET
#endif
}  // namespace avx512::amx_kernels
MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_END

#endif  // MOEKIT_DETAIL_X86

}  // namespace cpu
MOEKIT_NAMESPACE_END
