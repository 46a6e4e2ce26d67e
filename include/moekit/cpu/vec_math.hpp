#pragma once
// Vector math over F32x16 (cpu/vec.hpp) for the CPU backend's element-wise
// passes, in every ISA namespace (cpu::generic, cpu::avx2, cpu::avx512)
// under the same names, giving the same bits on every path:
//
//   exp(x)       e^x; exp_parts(x) gives it as q * 2^k, scaled last
//   log(x)       natural logarithm
//   sigmoid(z)   1 / (1 + e^-z); sigmoid_parts, times_sigmoid and
//                sigmoid_times_one_plus are the forms SiLU and tanh-GELU use
//   normal_parts(x)  Phi(x) and phi(x) of the standard normal (erf-GELU)
//
// Accuracy against float64, measured over every float by
// `moekit_vec_math_accuracy --all` (docs/cpu_vector_math.md has the table):
// exp within 1 ulp; log within 1 ulp; sigmoid within 2 ulp; subnormal
// results are rounded once from the accurate value. Special values: exp(-inf) = 0,
// exp(+inf) = +inf, overflow to +inf above ln(FLT_MAX), gradual underflow to
// 0 below -103.97; log(+-0) = -inf, log(x < 0) = NaN, log(+inf) = +inf; NaN
// in gives NaN out everywhere.
//
// How: see the comments in detail/vec_math-inl.hpp; tools/fit_vec_math.py
// fitted the polynomial and rational coefficients.

#include <cmath>
#include <limits>

#include "moekit/core/config.hpp"
#include "moekit/cpu/vec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// |x| beyond which normal_parts clamps: Phi(-14.5) e^... are below float's
// subnormals there, so callers return their limits.
inline constexpr float kNormalTailClamp = 14.5f;

// The kernels' file, which per_isa.hpp includes once per ISA namespace.
#define MOEKIT_PER_ISA_FILE "moekit/cpu/detail/vec_math-inl.hpp"
#include "moekit/cpu/detail/per_isa.hpp"
#undef MOEKIT_PER_ISA_FILE

}  // namespace cpu
MOEKIT_NAMESPACE_END
