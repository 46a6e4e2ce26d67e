#pragma once
// The register-wide float vector of moekit's hand-written CPU kernels
// (cpu/low_rank_rows.hpp): as wide as the compiler's target allows
// (AVX-512: 16 lanes, AVX: 8, otherwise 4). GCC and Clang get a vector
// extension type and fused multiply-adds where the target has them; other
// compilers get a plain array whose loops they vectorise as they can.
// Everything is inline: no vector type crosses a function boundary the
// compiler does not see, so there is no ABI to worry about.

#include <cstring>

#include "moekit/core/config.hpp"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__AVX512F__) || defined(__FMA__))
#include <immintrin.h>
#endif

MOEKIT_NAMESPACE_BEGIN
namespace cpu::simd {

#if defined(__AVX512F__)
inline constexpr int kLanes = 16;
inline constexpr int kRegisters = 32;
#elif defined(__AVX__)
inline constexpr int kLanes = 8;
inline constexpr int kRegisters = 16;
#else
inline constexpr int kLanes = 4;
inline constexpr int kRegisters = 16;
#endif

#if defined(__GNUC__) || defined(__clang__)
using Floats = float __attribute__((vector_size(4 * kLanes)));

MOEKIT_FORCE_INLINE Floats zeros() { return Floats{}; }
MOEKIT_FORCE_INLINE Floats broadcast(float s) { return Floats{} + s; }

// acc + a * b, fused where the target has FMA (as Eigen's GEMM kernels are).
MOEKIT_FORCE_INLINE Floats fma(Floats a, Floats b, Floats acc) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, acc);
#elif defined(__FMA__) && defined(__AVX__)
  return _mm256_fmadd_ps(a, b, acc);
#else
  return acc + a * b;
#endif
}
#else
struct Floats {
  float lane[kLanes];
  float operator[](int i) const { return lane[i]; }
};
MOEKIT_FORCE_INLINE Floats zeros() { return Floats{}; }
MOEKIT_FORCE_INLINE Floats broadcast(float s) {
  Floats v;
  for (int i = 0; i < kLanes; ++i) v.lane[i] = s;
  return v;
}
MOEKIT_FORCE_INLINE Floats fma(Floats a, Floats b, Floats acc) {
  for (int i = 0; i < kLanes; ++i) acc.lane[i] += a.lane[i] * b.lane[i];
  return acc;
}
#endif

// Unaligned loads and stores (rows of a matrix view have any alignment).
MOEKIT_FORCE_INLINE Floats load(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
MOEKIT_FORCE_INLINE void store(float* p, Floats v) { std::memcpy(p, &v, sizeof v); }

// The sum of the lanes, pairwise (a fixed order: results do not depend on
// anything but the inputs).
MOEKIT_FORCE_INLINE float sum(Floats v) {
  float half[kLanes];
  std::memcpy(half, &v, sizeof v);
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) half[i] += half[i + width];
  }
  return half[0];
}

}  // namespace cpu::simd
MOEKIT_NAMESPACE_END
