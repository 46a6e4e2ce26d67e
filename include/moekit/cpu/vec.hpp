#pragma once
// F32x16: sixteen floats, the one vector type of moekit's hand-written CPU
// kernels, in one namespace per instruction set (see cpu/isa.hpp):
//
//   cpu::generic::F32x16   float[16], scalar code with std::fma
//   cpu::avx2::F32x16      two 256-bit registers
//   cpu::avx512::F32x16    one 512-bit register
//
// Every namespace offers the same operations under the same names, and each
// operation gives the same bits in every namespace: lane-wise arithmetic is
// IEEE single precision with fused multiply-adds where fmadd says so, and
// reduce_add sums the lanes in one fixed tree. A kernel body written once in
// these operations therefore computes the same result on every path, and the
// portable path is the reference the vector paths are tested against.
//
// Writing a kernel once for every path: put its body in a file without an
// include guard whose functions carry MOEKIT_KERNEL_TARGET, and include that
// file inside each of the namespaces with the macro set to the namespace's
// target (a function template needs its own target attribute to inline the
// vector operations; it does not inherit the caller's):
//
//   namespace cpu::avx2 {
//   #define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_AVX2
//   #include "moekit/cpu/detail/my_kernel-inl.hpp"
//   #undef MOEKIT_KERNEL_TARGET
//   }
//
// The operations are always inlined, so no vector crosses a call boundary
// (no ABI question between translation units built with different flags).
// Lambdas do not inherit a target attribute either: kernel bodies use none.

#include <cmath>
#include <cstring>

#include "moekit/core/config.hpp"
#include "moekit/cpu/isa.hpp"

#if MOEKIT_DETAIL_X86
#include <immintrin.h>
#endif

// GCC 12 reports its own AVX-512 intrinsics (which start from
// _mm512_undefined_ps) as "may be used uninitialized" once inlined.
#if defined(__GNUC__) && !defined(__clang__)
#define MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_BEGIN \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_END _Pragma("GCC diagnostic pop")
#else
#define MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_BEGIN
#define MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_END
#endif

// The portable path has no target; inside its namespace the macro is empty.
#define MOEKIT_TARGET_GENERIC

// Keeps a value's rounding: the compiler must assume the (empty) asm reads
// and rewrites the memory, so nothing computed before is fused with after.
#if defined(__GNUC__) || defined(__clang__)
#define MOEKIT_DETAIL_FP_FENCE_MEMORY(x) __asm__("" : "+m"(x))
#else
#define MOEKIT_DETAIL_FP_FENCE_MEMORY(x) ((void)0)
#endif

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

inline constexpr int kF32x16Lanes = 16;

namespace generic {

struct F32x16 {
  float lane[16];
};

MOEKIT_FORCE_INLINE F32x16 zero() { return F32x16{}; }
MOEKIT_FORCE_INLINE F32x16 set1(float s) {
  F32x16 v;
  for (float& x : v.lane) x = s;
  return v;
}
MOEKIT_FORCE_INLINE F32x16 load(const float* p) {
  F32x16 v;
  std::memcpy(v.lane, p, sizeof v.lane);
  return v;
}
// The first n lanes from p (0 <= n <= 16), zeros above; reads nothing past p[n-1].
MOEKIT_FORCE_INLINE F32x16 load_partial(const float* p, int n) {
  F32x16 v{};
  for (int i = 0; i < n; ++i) v.lane[i] = p[i];
  return v;
}
MOEKIT_FORCE_INLINE void store(float* p, F32x16 v) { std::memcpy(p, v.lane, sizeof v.lane); }
// Writes the first n lanes only.
MOEKIT_FORCE_INLINE void store_partial(float* p, F32x16 v, int n) {
  for (int i = 0; i < n; ++i) p[i] = v.lane[i];
}

#define MOEKIT_DETAIL_LANEWISE(name, expr)              \
  MOEKIT_FORCE_INLINE F32x16 name(F32x16 a, F32x16 b) { \
    F32x16 r;                                           \
    for (int i = 0; i < 16; ++i) {                      \
      const float x = a.lane[i];                        \
      const float y = b.lane[i];                        \
      r.lane[i] = (expr);                               \
    }                                                   \
    return r;                                           \
  }
MOEKIT_DETAIL_LANEWISE(add, x + y)
MOEKIT_DETAIL_LANEWISE(sub, x - y)
MOEKIT_DETAIL_LANEWISE(div, x / y)
// max/min as the x86 instructions define them: the second operand when
// either is NaN or both are zeros.
MOEKIT_DETAIL_LANEWISE(max, x > y ? x : y)
MOEKIT_DETAIL_LANEWISE(min, x < y ? x : y)
#undef MOEKIT_DETAIL_LANEWISE

// A product that is rounded on its own: the fence keeps the compiler from
// fusing it with a later add into an FMA (GCC does that under its default
// -ffp-contract=fast, only where the target has FMA, which would make the
// paths disagree). fmadd is the one fused operation.
MOEKIT_FORCE_INLINE F32x16 mul(F32x16 a, F32x16 b) {
  F32x16 r;
  for (int i = 0; i < 16; ++i) r.lane[i] = a.lane[i] * b.lane[i];
  MOEKIT_DETAIL_FP_FENCE_MEMORY(r.lane);
  return r;
}

// a * b + c with one rounding.
MOEKIT_FORCE_INLINE F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) {
  F32x16 r;
  for (int i = 0; i < 16; ++i) r.lane[i] = std::fma(a.lane[i], b.lane[i], c.lane[i]);
  return r;
}

// The lanes' sum in a fixed tree: lane i + lane i+8, then i + i+4, i + i+2,
// i + i+1 (the order the vector paths use).
MOEKIT_FORCE_INLINE float reduce_add(F32x16 v) {
  float s[16];
  std::memcpy(s, v.lane, sizeof s);
  for (int width = 8; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) s[i] = s[i] + s[i + width];
  }
  return s[0];
}

}  // namespace generic

#if MOEKIT_DETAIL_X86

namespace avx2 {

struct F32x16 {
  __m256 lo, hi;  // lanes 0-7, 8-15
};

#define MOEKIT_DETAIL_OP MOEKIT_FORCE_INLINE MOEKIT_TARGET_AVX2

// Lanes [0, n) of an 8-lane half set, for masked loads and stores.
MOEKIT_DETAIL_OP __m256i half_mask(int n) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), index);
}

MOEKIT_DETAIL_OP F32x16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
MOEKIT_DETAIL_OP F32x16 set1(float s) { return {_mm256_set1_ps(s), _mm256_set1_ps(s)}; }
MOEKIT_DETAIL_OP F32x16 load(const float* p) {
  return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}
MOEKIT_DETAIL_OP F32x16 load_partial(const float* p, int n) {
  // A masked load never touches the lanes it leaves out (no fault past p[n-1]).
  return {_mm256_maskload_ps(p, half_mask(n)), _mm256_maskload_ps(p + 8, half_mask(n - 8))};
}
MOEKIT_DETAIL_OP void store(float* p, F32x16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
MOEKIT_DETAIL_OP void store_partial(float* p, F32x16 v, int n) {
  _mm256_maskstore_ps(p, half_mask(n), v.lo);
  _mm256_maskstore_ps(p + 8, half_mask(n - 8), v.hi);
}

#define MOEKIT_DETAIL_LANEWISE(name, intrinsic)            \
  MOEKIT_DETAIL_OP F32x16 name(F32x16 a, F32x16 b) {       \
    return {intrinsic(a.lo, b.lo), intrinsic(a.hi, b.hi)}; \
  }
MOEKIT_DETAIL_LANEWISE(add, _mm256_add_ps)
MOEKIT_DETAIL_LANEWISE(sub, _mm256_sub_ps)
MOEKIT_DETAIL_LANEWISE(div, _mm256_div_ps)
MOEKIT_DETAIL_LANEWISE(max, _mm256_max_ps)
MOEKIT_DETAIL_LANEWISE(min, _mm256_min_ps)
#undef MOEKIT_DETAIL_LANEWISE

// Rounded on its own, as generic::mul.
MOEKIT_DETAIL_OP F32x16 mul(F32x16 a, F32x16 b) {
  __m256 lo = _mm256_mul_ps(a.lo, b.lo);
  __m256 hi = _mm256_mul_ps(a.hi, b.hi);
  __asm__("" : "+x"(lo), "+x"(hi));
  return {lo, hi};
}

MOEKIT_DETAIL_OP F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}

MOEKIT_DETAIL_OP float reduce_add(F32x16 v) {
  __m256 s8 = _mm256_add_ps(v.lo, v.hi);                                             // i + i+8
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));  // i + i+4
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                        // i + i+2
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));                                          // i + i+1
  return _mm_cvtss_f32(s4);
}

#undef MOEKIT_DETAIL_OP

}  // namespace avx2

MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_BEGIN
namespace avx512 {

struct F32x16 {
  __m512 v;
};

#define MOEKIT_DETAIL_OP MOEKIT_FORCE_INLINE MOEKIT_TARGET_AVX512

MOEKIT_DETAIL_OP __mmask16 lane_mask(int n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1U << n) - 1U);
}

MOEKIT_DETAIL_OP F32x16 zero() { return {_mm512_setzero_ps()}; }
MOEKIT_DETAIL_OP F32x16 set1(float s) { return {_mm512_set1_ps(s)}; }
MOEKIT_DETAIL_OP F32x16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
MOEKIT_DETAIL_OP F32x16 load_partial(const float* p, int n) {
  return {_mm512_maskz_loadu_ps(lane_mask(n), p)};
}
MOEKIT_DETAIL_OP void store(float* p, F32x16 v) { _mm512_storeu_ps(p, v.v); }
MOEKIT_DETAIL_OP void store_partial(float* p, F32x16 v, int n) {
  _mm512_mask_storeu_ps(p, lane_mask(n), v.v);
}

#define MOEKIT_DETAIL_LANEWISE(name, intrinsic) \
  MOEKIT_DETAIL_OP F32x16 name(F32x16 a, F32x16 b) { return {intrinsic(a.v, b.v)}; }
MOEKIT_DETAIL_LANEWISE(add, _mm512_add_ps)
MOEKIT_DETAIL_LANEWISE(sub, _mm512_sub_ps)
MOEKIT_DETAIL_LANEWISE(div, _mm512_div_ps)
MOEKIT_DETAIL_LANEWISE(max, _mm512_max_ps)
MOEKIT_DETAIL_LANEWISE(min, _mm512_min_ps)
#undef MOEKIT_DETAIL_LANEWISE

// Rounded on its own, as generic::mul.
MOEKIT_DETAIL_OP F32x16 mul(F32x16 a, F32x16 b) {
  __m512 r = _mm512_mul_ps(a.v, b.v);
  __asm__("" : "+v"(r));
  return {r};
}

MOEKIT_DETAIL_OP F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm512_fmadd_ps(a.v, b.v, c.v)};
}

MOEKIT_DETAIL_OP float reduce_add(F32x16 v) {
  const __m256 s8 =
      _mm256_add_ps(_mm512_castps512_ps256(v.v),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v.v), 1)));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}

#undef MOEKIT_DETAIL_OP

}  // namespace avx512
MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_END

#endif  // MOEKIT_DETAIL_X86

}  // namespace cpu
MOEKIT_NAMESPACE_END
