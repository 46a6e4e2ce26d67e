#pragma once
// F32x16: sixteen floats, the one vector type of moekit's hand-written CPU
// kernels, in one namespace per instruction set (see cpu/isa.hpp):
//
//   cpu::generic::F32x16   float[16], scalar code with std::fma
//   cpu::avx2::F32x16      two 256-bit registers
//   cpu::avx512::F32x16    one 512-bit register
//
// beside it Mask16 (a lane mask from the comparisons), I32x16 (sixteen int32
// lanes, for bit tricks on floats and exact integer dot products of int8
// data) and F64x16 (sixteen doubles, for sums that must not lose small
// terms).
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
// Conversions (the GEMM engine's, moekit/cpu/gemm/): round_bf16 / store_bf16
// round to bfloat16 exactly as the x86 instruction VCVTNEPS2BF16 does (ties
// to even, denormals to a signed zero, NaN kept quiet), load_bf16_pairs widens
// bf16 pairs, store_int8 rounds to the nearest integer (ties to even) and
// clamps to [-127, 127], load_int32 converts int32 to float. Rounding to an
// integer and int32 -> float assume the default floating-point environment
// (round to nearest), which every path then shares.
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
// Restores the warnings ..._BEGIN silenced (empty where nothing was).
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

// Floats in one F32x16 on every path (one AVX-512 register, two AVX2 ones).
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

// Defines F32x16 name(a, b), lane i = expr of x = a's lane, y = b's lane.
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

// Defines Mask16 name(a, b), lane i set where expr of a's and b's lanes holds.
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

// ---- conversions ----

// The bf16 bits of one float (see the top of this file).
MOEKIT_FORCE_INLINE std::uint32_t bf16_rounded_bits(std::uint32_t u) {
  if ((u & 0x7FFFFFFFU) > 0x7F800000U) return (u | 0x00400000U) & 0xFFFF0000U;  // NaN: quiet
  if ((u & 0x7F800000U) == 0) return u & 0x80000000U;  // zero or denormal: signed zero
  return (u + 0x7FFFU + ((u >> 16) & 1U)) & 0xFFFF0000U;
}

// Each lane rounded to bf16, as a float.
MOEKIT_FORCE_INLINE F32x16 round_bf16(F32x16 v) {
  for (float& x : v.lane) {
    std::uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    u = bf16_rounded_bits(u);
    std::memcpy(&x, &u, sizeof u);
  }
  return v;
}

// The 16 lanes rounded to bf16, stored as 16 bf16 bit patterns.
MOEKIT_FORCE_INLINE void store_bf16(std::uint16_t* p, F32x16 v) {
  for (int i = 0; i < 16; ++i) {
    std::uint32_t u;
    std::memcpy(&u, &v.lane[i], sizeof u);
    p[i] = static_cast<std::uint16_t>(bf16_rounded_bits(u) >> 16);
  }
}

// 16 bf16 pairs p[2i], p[2i + 1] widened (exactly) into even[i] and odd[i].
MOEKIT_FORCE_INLINE void load_bf16_pairs(const std::uint16_t* p, F32x16& even, F32x16& odd) {
  for (int i = 0; i < 16; ++i) {
    const std::uint32_t e = std::uint32_t{p[2 * i]} << 16, o = std::uint32_t{p[2 * i + 1]} << 16;
    std::memcpy(&even.lane[i], &e, sizeof e);
    std::memcpy(&odd.lane[i], &o, sizeof o);
  }
}

// Each lane rounded to the nearest integer (ties to even), clamped to
// [-127, 127] (NaN to -127, max's rule), stored as 16 int8.
MOEKIT_FORCE_INLINE void store_int8(std::int8_t* p, F32x16 v) {
  for (float& x : v.lane) x = std::nearbyint(x);
  v = min(max(v, set1(-127.0f)), set1(127.0f));
  for (int i = 0; i < 16; ++i) p[i] = static_cast<std::int8_t>(v.lane[i]);
}

// 16 int32 converted to float (round to nearest).
MOEKIT_FORCE_INLINE F32x16 load_int32(const std::int32_t* p) {
  F32x16 v;
  for (int i = 0; i < 16; ++i) v.lane[i] = static_cast<float>(p[i]);
  return v;
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
// Sixteen int8 (or int32) values from memory, and int32 lanes to memory.
// Integer sums are exact (wrapping on overflow), so their order never
// changes a result: int8 dot products agree on every path.
MOEKIT_FORCE_INLINE I32x16 load_i8(const std::int8_t* p) {
  I32x16 v;
  for (int i = 0; i < 16; ++i) v.lane[i] = p[i];
  return v;
}
MOEKIT_FORCE_INLINE I32x16 load_i32(const std::int32_t* p) {
  I32x16 v;
  std::memcpy(v.lane, p, sizeof v.lane);
  return v;
}
MOEKIT_FORCE_INLINE void store_i32(std::int32_t* p, I32x16 v) {
  std::memcpy(p, v.lane, sizeof v.lane);
}
// The low 32 bits of the lanes' products.
MOEKIT_FORCE_INLINE I32x16 mul_i32(I32x16 a, I32x16 b) {
  for (int i = 0; i < 16; ++i) {
    a.lane[i] = static_cast<std::int32_t>(static_cast<std::uint32_t>(a.lane[i]) *
                                          static_cast<std::uint32_t>(b.lane[i]));
  }
  return a;
}
MOEKIT_FORCE_INLINE std::int32_t reduce_add_i32(I32x16 v) {
  std::uint32_t s = 0;
  for (const std::int32_t x : v.lane) s += static_cast<std::uint32_t>(x);
  return static_cast<std::int32_t>(s);
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

// ---- conversions (generic:: has the scalar rule) ----

// Eight floats' bf16 bits, in the upper halves of the 32-bit lanes.
MOEKIT_DETAIL_OP __m256i bf16_rounded_bits(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i magnitude = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F800000));
  const __m256i is_tiny = _mm256_cmpeq_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7F800000)),
                                             _mm256_setzero_si256());
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), is_nan);
  r = _mm256_blendv_epi8(r, _mm256_and_si256(u, _mm256_set1_epi32(int(0x80000000U))), is_tiny);
  return _mm256_and_si256(r, _mm256_set1_epi32(int(0xFFFF0000U)));
}

MOEKIT_DETAIL_OP F32x16 round_bf16(F32x16 v) {
  return {_mm256_castsi256_ps(bf16_rounded_bits(v.lo)),
          _mm256_castsi256_ps(bf16_rounded_bits(v.hi))};
}

MOEKIT_DETAIL_OP void store_bf16(std::uint16_t* p, F32x16 v) {
  const __m256i lo = _mm256_srli_epi32(bf16_rounded_bits(v.lo), 16);
  const __m256i hi = _mm256_srli_epi32(bf16_rounded_bits(v.hi), 16);
  // packus interleaves the 128-bit halves: lo0-3 hi0-3 | lo4-7 hi4-7; put them in order.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
}

MOEKIT_DETAIL_OP void load_bf16_pairs(const std::uint16_t* p, F32x16& even, F32x16& odd) {
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
  const __m256i high_half = _mm256_set1_epi32(int(0xFFFF0000U));
  even = {_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16))};
  odd = {_mm256_castsi256_ps(_mm256_and_si256(lo, high_half)),
         _mm256_castsi256_ps(_mm256_and_si256(hi, high_half))};
}

MOEKIT_DETAIL_OP void store_int8(std::int8_t* p, F32x16 v) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const F32x16 r =
      min(max({_mm256_round_ps(v.lo, kNearest), _mm256_round_ps(v.hi, kNearest)}, set1(-127.0f)),
          set1(127.0f));
  // packs interleaves the 128-bit halves as in store_bf16.
  const __m256i words = _mm256_permute4x64_epi64(
      _mm256_packs_epi32(_mm256_cvttps_epi32(r.lo), _mm256_cvttps_epi32(r.hi)), 0xD8);
  const __m128i bytes =
      _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bytes);
}

MOEKIT_DETAIL_OP F32x16 load_int32(const std::int32_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
          _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8)))};
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
MOEKIT_DETAIL_OP I32x16 load_i8(const std::int8_t* p) {
  return {_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)))};
}
MOEKIT_DETAIL_OP I32x16 load_i32(const std::int32_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8))};
}
MOEKIT_DETAIL_OP void store_i32(std::int32_t* p, I32x16 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v.lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 8), v.hi);
}
MOEKIT_DETAIL_OP I32x16 mul_i32(I32x16 a, I32x16 b) {
  return {_mm256_mullo_epi32(a.lo, b.lo), _mm256_mullo_epi32(a.hi, b.hi)};
}
MOEKIT_DETAIL_OP std::int32_t reduce_add_i32(I32x16 v) {
  const __m256i s8 = _mm256_add_epi32(v.lo, v.hi);
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
  s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
  return _mm_cvtsi128_si32(s4);
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

// ---- conversions (generic:: has the scalar rule) ----

MOEKIT_DETAIL_OP __m512i bf16_rounded_bits(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i magnitude = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  const __mmask16 is_nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7F800000));
  const __mmask16 is_tiny = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7F800000));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  r = _mm512_mask_or_epi32(r, is_nan, u, _mm512_set1_epi32(0x00400000));
  r = _mm512_mask_and_epi32(r, is_tiny, u, _mm512_set1_epi32(int(0x80000000U)));
  return _mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000U)));
}

MOEKIT_DETAIL_OP F32x16 round_bf16(F32x16 v) {
  return {_mm512_castsi512_ps(bf16_rounded_bits(v.v))};
}

MOEKIT_DETAIL_OP void store_bf16(std::uint16_t* p, F32x16 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_rounded_bits(v.v), 16)));
}

MOEKIT_DETAIL_OP void load_bf16_pairs(const std::uint16_t* p, F32x16& even, F32x16& odd) {
  const __m512i u = _mm512_loadu_si512(p);
  even = {_mm512_castsi512_ps(_mm512_slli_epi32(u, 16))};
  odd = {_mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(int(0xFFFF0000U))))};
}

MOEKIT_DETAIL_OP void store_int8(std::int8_t* p, F32x16 v) {
  // Clamping before rounding gives the same integers (the bounds are integers).
  const F32x16 r = min(max(v, set1(-127.0f)), set1(127.0f));
  const __m512i q = _mm512_cvt_roundps_epi32(r.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(q));
}

MOEKIT_DETAIL_OP F32x16 load_int32(const std::int32_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_loadu_si512(p))};
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
MOEKIT_DETAIL_OP I32x16 load_i8(const std::int8_t* p) {
  return {_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
MOEKIT_DETAIL_OP I32x16 load_i32(const std::int32_t* p) { return {_mm512_loadu_si512(p)}; }
MOEKIT_DETAIL_OP void store_i32(std::int32_t* p, I32x16 v) { _mm512_storeu_si512(p, v.v); }
MOEKIT_DETAIL_OP I32x16 mul_i32(I32x16 a, I32x16 b) { return {_mm512_mullo_epi32(a.v, b.v)}; }
MOEKIT_DETAIL_OP std::int32_t reduce_add_i32(I32x16 v) { return _mm512_reduce_add_epi32(v.v); }

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
