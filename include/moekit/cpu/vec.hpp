#pragma once
// F32x16: sixteen floats, the one vector type of moekit's hand-written CPU
// kernels, in one namespace per instruction set (see cpu/isa.hpp):
//
//   cpu::generic::F32x16   float[16], scalar code with std::fma
//   cpu::avx2::F32x16      two 256-bit registers
//   cpu::avx512::F32x16    one 512-bit register
//
// beside it Mask16 (a lane mask from the comparisons), I32x16 (sixteen int32
// lanes, for bit tricks on floats) and F64x16 (sixteen doubles, for sums
// that must not lose small terms).
//
// Every namespace offers the same operations under the same names, and each
// operation gives the same bits in every namespace: lane-wise arithmetic is
// IEEE single (or double) precision with fused multiply-adds where fmadd and
// fnmadd say so, comparisons are ordered and quiet (false where a lane is
// NaN), conversions truncate and give INT32_MIN for NaN and out-of-range
// lanes (the x86 rule), and reduce_add / reduce_max combine the lanes in one
// fixed tree. NaN results are NaN on every path; their payload is not
// promised. A kernel body written once in
// these operations therefore computes the same result on every path, and the
// portable path is the reference the vector paths are tested against.
//
// Writing a kernel once for every path: put its body in a file without an
// include guard whose functions carry MOEKIT_KERNEL_TARGET, and include that
// file inside each of the namespaces with the macro set to the namespace's
// target (a function template needs its own target attribute to inline the
// vector operations; it does not inherit the caller's).
// moekit/cpu/detail/per_isa.hpp does the including:
//
//   namespace cpu {
//   #define MOEKIT_PER_ISA_FILE "moekit/cpu/detail/my_kernel-inl.hpp"
//   #include "moekit/cpu/detail/per_isa.hpp"
//   #undef MOEKIT_PER_ISA_FILE
//   }
//
// The operations are always inlined, so no vector crosses a call boundary
// (no ABI question between translation units built with different flags).
// Lambdas do not inherit a target attribute either: kernel bodies use none.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "moekit/core/config.hpp"
#include "moekit/cpu/isa.hpp"

#if MOEKIT_DETAIL_X86
#include <immintrin.h>
#endif

// GCC 12 reports its own AVX-512 intrinsics (which start from
// _mm512_undefined_ps) as "(may be) used uninitialized" once inlined.
#if defined(__GNUC__) && !defined(__clang__)
#define MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_BEGIN                                       \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
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

// Tags the path for with_vec_path (kernels take it first, so that the
// call finds the path's kernel by argument-dependent lookup).
struct Path {};

// F32x16 values a kernel may keep live at once (register blocking): the
// portable path leaves registers to the compiler.
inline constexpr int kF32x16Registers = 16;

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
// paths disagree). fmadd and fnmadd are the fused operations.
MOEKIT_FORCE_INLINE F32x16 mul(F32x16 a, F32x16 b) {
  F32x16 r;
  for (int i = 0; i < 16; ++i) r.lane[i] = a.lane[i] * b.lane[i];
  MOEKIT_DETAIL_FP_FENCE_MEMORY(r.lane);
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

// a * b + c and c - a * b with one rounding.
MOEKIT_FORCE_INLINE F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) {
  F32x16 r;
  for (int i = 0; i < 16; ++i) r.lane[i] = std::fma(a.lane[i], b.lane[i], c.lane[i]);
  return r;
}
MOEKIT_FORCE_INLINE F32x16 fnmadd(F32x16 a, F32x16 b, F32x16 c) {
  F32x16 r;
  for (int i = 0; i < 16; ++i) r.lane[i] = std::fma(-a.lane[i], b.lane[i], c.lane[i]);
  return r;
}

// Sign bit cleared, and flipped (exact, NaN and zeros included).
MOEKIT_FORCE_INLINE F32x16 abs(F32x16 a) {
  for (float& x : a.lane) x = std::fabs(x);
  return a;
}
MOEKIT_FORCE_INLINE F32x16 neg(F32x16 a) {
  for (float& x : a.lane) x = -x;
  return a;
}

MOEKIT_FORCE_INLINE float first_lane(F32x16 v) { return v.lane[0]; }

// ---- lane masks: comparisons and select ----

struct Mask16 {
  bool lane[16];
};

#define MOEKIT_DETAIL_COMPARE(name, expr)               \
  MOEKIT_FORCE_INLINE Mask16 name(F32x16 a, F32x16 b) { \
    Mask16 m;                                           \
    for (int i = 0; i < 16; ++i) {                      \
      const float x = a.lane[i];                        \
      const float y = b.lane[i];                        \
      m.lane[i] = (expr);                               \
    }                                                   \
    return m;                                           \
  }
MOEKIT_DETAIL_COMPARE(cmp_lt, x < y)
MOEKIT_DETAIL_COMPARE(cmp_le, x <= y)
MOEKIT_DETAIL_COMPARE(cmp_eq, x == y)
#undef MOEKIT_DETAIL_COMPARE
MOEKIT_FORCE_INLINE Mask16 is_nan(F32x16 a) {
  Mask16 m;
  for (int i = 0; i < 16; ++i) m.lane[i] = a.lane[i] != a.lane[i];
  return m;
}
// Lanes [0, n) set (0 <= n <= 16).
MOEKIT_FORCE_INLINE Mask16 first_lanes(int n) {
  Mask16 m;
  for (int i = 0; i < 16; ++i) m.lane[i] = i < n;
  return m;
}
MOEKIT_FORCE_INLINE Mask16 mask_or(Mask16 a, Mask16 b) {
  for (int i = 0; i < 16; ++i) a.lane[i] = a.lane[i] || b.lane[i];
  return a;
}
// Lane i of yes where m is set, of no elsewhere.
MOEKIT_FORCE_INLINE F32x16 select(Mask16 m, F32x16 yes, F32x16 no) {
  for (int i = 0; i < 16; ++i) no.lane[i] = m.lane[i] ? yes.lane[i] : no.lane[i];
  return no;
}

// The lanes' maximum in reduce_add's tree, with max's NaN rule at each step.
MOEKIT_FORCE_INLINE float reduce_max(F32x16 v) {
  float s[16];
  std::memcpy(s, v.lane, sizeof s);
  for (int width = 8; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) s[i] = s[i] > s[i + width] ? s[i] : s[i + width];
  }
  return s[0];
}

// ---- int32 lanes ----

struct I32x16 {
  std::int32_t lane[16];
};

MOEKIT_FORCE_INLINE I32x16 set1_i32(std::int32_t s) {
  I32x16 v;
  for (std::int32_t& x : v.lane) x = s;
  return v;
}
// The float's bits, and back.
MOEKIT_FORCE_INLINE I32x16 bits_of(F32x16 a) {
  I32x16 r;
  std::memcpy(r.lane, a.lane, sizeof r.lane);
  return r;
}
MOEKIT_FORCE_INLINE F32x16 float_of_bits(I32x16 a) {
  F32x16 r;
  std::memcpy(r.lane, a.lane, sizeof r.lane);
  return r;
}
// Truncation toward zero; NaN and lanes outside the int32 range give INT32_MIN.
MOEKIT_FORCE_INLINE I32x16 to_i32(F32x16 a) {
  I32x16 r;
  for (int i = 0; i < 16; ++i) {
    const float x = a.lane[i];
    r.lane[i] = x >= -2147483648.0f && x < 2147483648.0f ? static_cast<std::int32_t>(x)
                                                         : std::numeric_limits<std::int32_t>::min();
  }
  return r;
}
// Rounded to nearest, ties to even (exact below 2^24 in magnitude).
MOEKIT_FORCE_INLINE F32x16 to_f32(I32x16 a) {
  F32x16 r;
  for (int i = 0; i < 16; ++i) r.lane[i] = static_cast<float>(a.lane[i]);
  return r;
}
// Wrapping arithmetic and bit operations (through uint32: no signed overflow).
#define MOEKIT_DETAIL_INT_LANEWISE(name, expr)              \
  MOEKIT_FORCE_INLINE I32x16 name(I32x16 a, I32x16 b) {     \
    I32x16 r;                                               \
    for (int i = 0; i < 16; ++i) {                          \
      const auto x = static_cast<std::uint32_t>(a.lane[i]); \
      const auto y = static_cast<std::uint32_t>(b.lane[i]); \
      r.lane[i] = static_cast<std::int32_t>(expr);          \
    }                                                       \
    return r;                                               \
  }
MOEKIT_DETAIL_INT_LANEWISE(add_i32, x + y)
MOEKIT_DETAIL_INT_LANEWISE(sub_i32, x - y)
MOEKIT_DETAIL_INT_LANEWISE(and_i32, x& y)
#undef MOEKIT_DETAIL_INT_LANEWISE
// Shifts by a constant: left, and right with the sign copied in.
template <int kBits>
MOEKIT_FORCE_INLINE I32x16 shl_i32(I32x16 a) {
  for (std::int32_t& x : a.lane) {
    x = static_cast<std::int32_t>(static_cast<std::uint32_t>(x) << kBits);
  }
  return a;
}
template <int kBits>
MOEKIT_FORCE_INLINE I32x16 sra_i32(I32x16 a) {
  for (std::int32_t& x : a.lane) x = x >> kBits;  // arithmetic since C++20
  return a;
}

// ---- double lanes (sums in double) ----

struct F64x16 {
  double lane[16];
};

MOEKIT_FORCE_INLINE F64x16 zero_f64() { return F64x16{}; }
// Each lane widened to double (exact).
MOEKIT_FORCE_INLINE F64x16 to_f64(F32x16 a) {
  F64x16 r;
  for (int i = 0; i < 16; ++i) r.lane[i] = static_cast<double>(a.lane[i]);
  return r;
}
MOEKIT_FORCE_INLINE F64x16 add(F64x16 a, F64x16 b) {
  for (int i = 0; i < 16; ++i) a.lane[i] = a.lane[i] + b.lane[i];
  return a;
}
MOEKIT_FORCE_INLINE F64x16 sub(F64x16 a, F64x16 b) {
  for (int i = 0; i < 16; ++i) a.lane[i] = a.lane[i] - b.lane[i];
  return a;
}
// Rounded on its own, as mul of F32x16.
MOEKIT_FORCE_INLINE F64x16 mul(F64x16 a, F64x16 b) {
  for (int i = 0; i < 16; ++i) a.lane[i] = a.lane[i] * b.lane[i];
  MOEKIT_DETAIL_FP_FENCE_MEMORY(a.lane);
  return a;
}
MOEKIT_FORCE_INLINE double reduce_add(F64x16 v) {
  for (int width = 8; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) v.lane[i] = v.lane[i] + v.lane[i + width];
  }
  return v.lane[0];
}

}  // namespace generic

#if MOEKIT_DETAIL_X86

namespace avx2 {

struct Path {};

inline constexpr int kF32x16Registers = 8;  // 16 ymm registers, two per F32x16

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

MOEKIT_DETAIL_OP F32x16 fnmadd(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}

MOEKIT_DETAIL_OP F32x16 abs(F32x16 a) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  return {_mm256_and_ps(a.lo, magnitude), _mm256_and_ps(a.hi, magnitude)};
}
MOEKIT_DETAIL_OP F32x16 neg(F32x16 a) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(std::numeric_limits<int>::min()));
  return {_mm256_xor_ps(a.lo, sign), _mm256_xor_ps(a.hi, sign)};
}

MOEKIT_DETAIL_OP float first_lane(F32x16 v) { return _mm256_cvtss_f32(v.lo); }

struct Mask16 {
  __m256 lo, hi;  // all ones where set
};

#define MOEKIT_DETAIL_COMPARE(name, predicate)                                           \
  MOEKIT_DETAIL_OP Mask16 name(F32x16 a, F32x16 b) {                                     \
    return {_mm256_cmp_ps(a.lo, b.lo, predicate), _mm256_cmp_ps(a.hi, b.hi, predicate)}; \
  }
MOEKIT_DETAIL_COMPARE(cmp_lt, _CMP_LT_OQ)
MOEKIT_DETAIL_COMPARE(cmp_le, _CMP_LE_OQ)
MOEKIT_DETAIL_COMPARE(cmp_eq, _CMP_EQ_OQ)
#undef MOEKIT_DETAIL_COMPARE
MOEKIT_DETAIL_OP Mask16 is_nan(F32x16 a) {
  return {_mm256_cmp_ps(a.lo, a.lo, _CMP_UNORD_Q), _mm256_cmp_ps(a.hi, a.hi, _CMP_UNORD_Q)};
}
MOEKIT_DETAIL_OP Mask16 first_lanes(int n) {
  return {_mm256_castsi256_ps(half_mask(n)), _mm256_castsi256_ps(half_mask(n - 8))};
}
MOEKIT_DETAIL_OP Mask16 mask_or(Mask16 a, Mask16 b) {
  return {_mm256_or_ps(a.lo, b.lo), _mm256_or_ps(a.hi, b.hi)};
}
MOEKIT_DETAIL_OP F32x16 select(Mask16 m, F32x16 yes, F32x16 no) {
  return {_mm256_blendv_ps(no.lo, yes.lo, m.lo), _mm256_blendv_ps(no.hi, yes.hi, m.hi)};
}

// max(a, b) of the x86 rule is generic's a > b ? a : b, so each step of the
// tree keeps generic's operand order.
MOEKIT_DETAIL_OP float reduce_max(F32x16 v) {
  __m256 s8 = _mm256_max_ps(v.lo, v.hi);
  __m128 s4 = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_max_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_max_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}

struct I32x16 {
  __m256i lo, hi;
};

MOEKIT_DETAIL_OP I32x16 set1_i32(std::int32_t s) {
  return {_mm256_set1_epi32(s), _mm256_set1_epi32(s)};
}
MOEKIT_DETAIL_OP I32x16 bits_of(F32x16 a) {
  return {_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)};
}
MOEKIT_DETAIL_OP F32x16 float_of_bits(I32x16 a) {
  return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)};
}
MOEKIT_DETAIL_OP I32x16 to_i32(F32x16 a) {
  return {_mm256_cvttps_epi32(a.lo), _mm256_cvttps_epi32(a.hi)};
}
MOEKIT_DETAIL_OP F32x16 to_f32(I32x16 a) {
  return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)};
}
#define MOEKIT_DETAIL_INT_LANEWISE(name, intrinsic)        \
  MOEKIT_DETAIL_OP I32x16 name(I32x16 a, I32x16 b) {       \
    return {intrinsic(a.lo, b.lo), intrinsic(a.hi, b.hi)}; \
  }
MOEKIT_DETAIL_INT_LANEWISE(add_i32, _mm256_add_epi32)
MOEKIT_DETAIL_INT_LANEWISE(sub_i32, _mm256_sub_epi32)
MOEKIT_DETAIL_INT_LANEWISE(and_i32, _mm256_and_si256)
#undef MOEKIT_DETAIL_INT_LANEWISE
template <int kBits>
MOEKIT_DETAIL_OP I32x16 shl_i32(I32x16 a) {
  return {_mm256_slli_epi32(a.lo, kBits), _mm256_slli_epi32(a.hi, kBits)};
}
template <int kBits>
MOEKIT_DETAIL_OP I32x16 sra_i32(I32x16 a) {
  return {_mm256_srai_epi32(a.lo, kBits), _mm256_srai_epi32(a.hi, kBits)};
}

struct F64x16 {
  __m256d q0, q1, q2, q3;  // lanes 0-3, 4-7, 8-11, 12-15
};

MOEKIT_DETAIL_OP F64x16 zero_f64() {
  return {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
}
MOEKIT_DETAIL_OP F64x16 to_f64(F32x16 a) {
  return {_mm256_cvtps_pd(_mm256_castps256_ps128(a.lo)),
          _mm256_cvtps_pd(_mm256_extractf128_ps(a.lo, 1)),
          _mm256_cvtps_pd(_mm256_castps256_ps128(a.hi)),
          _mm256_cvtps_pd(_mm256_extractf128_ps(a.hi, 1))};
}
MOEKIT_DETAIL_OP F64x16 add(F64x16 a, F64x16 b) {
  return {_mm256_add_pd(a.q0, b.q0), _mm256_add_pd(a.q1, b.q1), _mm256_add_pd(a.q2, b.q2),
          _mm256_add_pd(a.q3, b.q3)};
}
MOEKIT_DETAIL_OP F64x16 sub(F64x16 a, F64x16 b) {
  return {_mm256_sub_pd(a.q0, b.q0), _mm256_sub_pd(a.q1, b.q1), _mm256_sub_pd(a.q2, b.q2),
          _mm256_sub_pd(a.q3, b.q3)};
}
MOEKIT_DETAIL_OP F64x16 mul(F64x16 a, F64x16 b) {
  F64x16 r{_mm256_mul_pd(a.q0, b.q0), _mm256_mul_pd(a.q1, b.q1), _mm256_mul_pd(a.q2, b.q2),
           _mm256_mul_pd(a.q3, b.q3)};
  __asm__("" : "+x"(r.q0), "+x"(r.q1), "+x"(r.q2), "+x"(r.q3));
  return r;
}
MOEKIT_DETAIL_OP double reduce_add(F64x16 v) {
  const __m256d s4a = _mm256_add_pd(v.q0, v.q2);  // i + i+8 for lanes 0-3
  const __m256d s4b = _mm256_add_pd(v.q1, v.q3);  // and 4-7
  const __m256d s4 = _mm256_add_pd(s4a, s4b);     // i + i+4
  __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));  // i + i+2
  s2 = _mm_add_sd(s2, _mm_unpackhi_pd(s2, s2));                                       // i + i+1
  return _mm_cvtsd_f64(s2);
}

#undef MOEKIT_DETAIL_OP

}  // namespace avx2

MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_BEGIN
namespace avx512 {

struct Path {};

inline constexpr int kF32x16Registers = 32;  // zmm0-31

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

MOEKIT_DETAIL_OP F32x16 fnmadd(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm512_fnmadd_ps(a.v, b.v, c.v)};
}

MOEKIT_DETAIL_OP F32x16 abs(F32x16 a) {
  return {_mm512_castsi512_ps(
      _mm512_and_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(0x7fffffff)))};
}
MOEKIT_DETAIL_OP F32x16 neg(F32x16 a) {
  return {_mm512_castsi512_ps(_mm512_xor_si512(
      _mm512_castps_si512(a.v), _mm512_set1_epi32(std::numeric_limits<int>::min())))};
}

MOEKIT_DETAIL_OP float first_lane(F32x16 v) { return _mm512_cvtss_f32(v.v); }

struct Mask16 {
  __mmask16 m;
};

#define MOEKIT_DETAIL_COMPARE(name, predicate)        \
  MOEKIT_DETAIL_OP Mask16 name(F32x16 a, F32x16 b) {  \
    return {_mm512_cmp_ps_mask(a.v, b.v, predicate)}; \
  }
MOEKIT_DETAIL_COMPARE(cmp_lt, _CMP_LT_OQ)
MOEKIT_DETAIL_COMPARE(cmp_le, _CMP_LE_OQ)
MOEKIT_DETAIL_COMPARE(cmp_eq, _CMP_EQ_OQ)
#undef MOEKIT_DETAIL_COMPARE
MOEKIT_DETAIL_OP Mask16 is_nan(F32x16 a) { return {_mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q)}; }
MOEKIT_DETAIL_OP Mask16 first_lanes(int n) { return {lane_mask(n)}; }
MOEKIT_DETAIL_OP Mask16 mask_or(Mask16 a, Mask16 b) { return {static_cast<__mmask16>(a.m | b.m)}; }
MOEKIT_DETAIL_OP F32x16 select(Mask16 m, F32x16 yes, F32x16 no) {
  return {_mm512_mask_blend_ps(m.m, no.v, yes.v)};
}

MOEKIT_DETAIL_OP float reduce_max(F32x16 v) {
  const __m256 s8 =
      _mm256_max_ps(_mm512_castps512_ps256(v.v),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v.v), 1)));
  __m128 s4 = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_max_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_max_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}

struct I32x16 {
  __m512i v;
};

MOEKIT_DETAIL_OP I32x16 set1_i32(std::int32_t s) { return {_mm512_set1_epi32(s)}; }
MOEKIT_DETAIL_OP I32x16 bits_of(F32x16 a) { return {_mm512_castps_si512(a.v)}; }
MOEKIT_DETAIL_OP F32x16 float_of_bits(I32x16 a) { return {_mm512_castsi512_ps(a.v)}; }
MOEKIT_DETAIL_OP I32x16 to_i32(F32x16 a) { return {_mm512_cvttps_epi32(a.v)}; }
MOEKIT_DETAIL_OP F32x16 to_f32(I32x16 a) { return {_mm512_cvtepi32_ps(a.v)}; }
MOEKIT_DETAIL_OP I32x16 add_i32(I32x16 a, I32x16 b) { return {_mm512_add_epi32(a.v, b.v)}; }
MOEKIT_DETAIL_OP I32x16 sub_i32(I32x16 a, I32x16 b) { return {_mm512_sub_epi32(a.v, b.v)}; }
MOEKIT_DETAIL_OP I32x16 and_i32(I32x16 a, I32x16 b) { return {_mm512_and_si512(a.v, b.v)}; }
template <int kBits>
MOEKIT_DETAIL_OP I32x16 shl_i32(I32x16 a) {
  return {_mm512_slli_epi32(a.v, kBits)};
}
template <int kBits>
MOEKIT_DETAIL_OP I32x16 sra_i32(I32x16 a) {
  return {_mm512_srai_epi32(a.v, kBits)};
}

struct F64x16 {
  __m512d lo, hi;  // lanes 0-7, 8-15
};

MOEKIT_DETAIL_OP F64x16 zero_f64() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
MOEKIT_DETAIL_OP F64x16 to_f64(F32x16 a) {
  return {_mm512_cvtps_pd(_mm512_castps512_ps256(a.v)),
          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)))};
}
MOEKIT_DETAIL_OP F64x16 add(F64x16 a, F64x16 b) {
  return {_mm512_add_pd(a.lo, b.lo), _mm512_add_pd(a.hi, b.hi)};
}
MOEKIT_DETAIL_OP F64x16 sub(F64x16 a, F64x16 b) {
  return {_mm512_sub_pd(a.lo, b.lo), _mm512_sub_pd(a.hi, b.hi)};
}
MOEKIT_DETAIL_OP F64x16 mul(F64x16 a, F64x16 b) {
  F64x16 r{_mm512_mul_pd(a.lo, b.lo), _mm512_mul_pd(a.hi, b.hi)};
  __asm__("" : "+v"(r.lo), "+v"(r.hi));
  return r;
}
MOEKIT_DETAIL_OP double reduce_add(F64x16 v) {
  const __m512d s8 = _mm512_add_pd(v.lo, v.hi);  // i + i+8
  const __m256d s4 =
      _mm256_add_pd(_mm512_castpd512_pd256(s8), _mm512_extractf64x4_pd(s8, 1));       // i + i+4
  __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));  // i + i+2
  s2 = _mm_add_sd(s2, _mm_unpackhi_pd(s2, s2));                                       // i + i+1
  return _mm_cvtsd_f64(s2);
}

#undef MOEKIT_DETAIL_OP

}  // namespace avx512
MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_END

#endif  // MOEKIT_DETAIL_X86

// Calls f with the Path tag of the F32x16 path active now (active_isa();
// AMX runs the AVX-512 kernels): f(generic::Path{}), f(avx2::Path{}) or
// f(avx512::Path{}). A kernel written once takes the tag as its first
// argument, so `with_vec_path([&](auto path) { my_kernel(path, ...); })`
// runs the kernel compiled for that path and no other.
template <class F>
decltype(auto) with_vec_path(F&& f) {
#if MOEKIT_DETAIL_X86
  switch (active_isa()) {
    case Isa::kAmx:
    case Isa::kAvx512:
      return f(avx512::Path{});
    case Isa::kAvx2:
      return f(avx2::Path{});
    case Isa::kGeneric:
      break;
  }
#endif
  return f(generic::Path{});
}

}  // namespace cpu
MOEKIT_NAMESPACE_END
