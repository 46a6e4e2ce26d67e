#pragma once
// Float64 references of the vector math and activations, and the ulp
// measure the accuracy tests and tools/vec_math_accuracy report.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "moekit/core/types.hpp"

namespace vec_math_test {

// The functions eval_math numbers (vec_math_kernel-inl.hpp), in order.
enum MathFn : int {
  kExp,
  kLog,
  kSigmoid,
  kSilu,
  kSiluGrad,
  kGeluTanh,
  kGeluTanhGrad,
  kGeluErf,
  kGeluErfGrad,
  kRelu,
  kReluGrad,
  kMathFnCount
};

inline const char* math_fn_name(int fn) {
  static const char* const names[] = {"exp",       "log",       "sigmoid",    "silu",
                                      "silu'",     "gelu_tanh", "gelu_tanh'", "gelu_erf",
                                      "gelu_erf'", "relu",      "relu'"};
  return names[fn];
}

// The exact value in double and the scale its error is measured against:
// |value| for a function, the largest of the terms for a derivative (a
// difference of terms cancels near its root; there the error is relative
// to the terms).
struct Reference {
  double value;
  double scale;
};

inline double sigmoid64(double z) {
  return z >= 0.0 ? 1.0 / (1.0 + std::exp(-z)) : std::exp(z) / (1.0 + std::exp(z));
}

inline Reference reference(int fn, float xf) {
  const double x = xf;
  // The activations' limits at +-inf (core/activation.hpp), where the
  // formulas below would give inf * 0.
  if (std::isinf(x) && fn >= kSilu && fn <= kGeluErfGrad) {
    const bool grad = (fn - kSilu) % 2 == 1;
    const double v = grad ? (x > 0 ? 1.0 : 0.0) : (x > 0 ? x : 0.0);
    return {v, std::fabs(v)};
  }
  constexpr double k = 0.7978845608028654;  // sqrt(2 / pi)
  constexpr double c = 0.044715;
  constexpr double inv_sqrt_2pi = 0.3989422804014327;
  switch (fn) {
    case kExp:
      return {std::exp(x), std::exp(x)};
    case kLog:
      return {std::log(x), std::fabs(std::log(x))};
    case kSigmoid:
      return {sigmoid64(x), sigmoid64(x)};
    case kSilu:
      return {x * sigmoid64(x), std::fabs(x * sigmoid64(x))};
    case kSiluGrad: {
      const double s = sigmoid64(x), t = x * s * sigmoid64(-x);
      return {s + t, std::max(std::fabs(s), std::fabs(t))};
    }
    case kGeluTanh: {
      const double z = 2.0 * k * (x + c * x * x * x);
      return {x * sigmoid64(z), std::fabs(x * sigmoid64(z))};
    }
    case kGeluTanhGrad: {
      const double z = 2.0 * k * (x + c * x * x * x);
      const double s = sigmoid64(z);
      const double t = x * s * sigmoid64(-z) * 2.0 * k * (1.0 + 3.0 * c * x * x);
      return {s + t, std::max(std::fabs(s), std::fabs(t))};
    }
    case kGeluErf: {
      const double f = 0.5 * x * std::erfc(-x / std::sqrt(2.0));
      return {f, std::fabs(f)};
    }
    case kGeluErfGrad: {
      const double cdf = 0.5 * std::erfc(-x / std::sqrt(2.0));
      const double t = x * inv_sqrt_2pi * std::exp(-0.5 * x * x);
      return {cdf + t, std::max(std::fabs(cdf), std::fabs(t))};
    }
    case kRelu:
      return {x < 0.0 ? 0.0 : x, std::fabs(x)};
    default:
      return {x > 0.0 ? 1.0 : (x <= 0.0 ? 0.0 : x), 1.0};  // NaN passes, as relu' does
  }
}

// One ulp of float at magnitude |v| (subnormal spacing below FLT_MIN).
inline double float_ulp(double v) {
  v = std::fabs(v);
  if (!(v >= 0x1p-126)) return 0x1p-149;
  if (v >= static_cast<double>(std::numeric_limits<float>::max())) return 0x1p104;
  int e = 0;
  std::frexp(v, &e);  // v = m 2^e, m in [0.5, 1)
  return std::ldexp(1.0, e - 24);
}

// Error of y in ulps of the reference's scale; 0 when both are the same
// infinity or both NaN; infinity for a NaN / infinity mismatch.
inline double ulp_error(float y, const Reference& ref) {
  const bool y_nan = std::isnan(y), r_nan = std::isnan(ref.value);
  if (y_nan || r_nan) return y_nan && r_nan ? 0.0 : std::numeric_limits<double>::infinity();
  const double rounded = static_cast<double>(static_cast<float>(ref.value));  // may overflow
  if (std::isinf(y) || std::isinf(rounded)) {
    return static_cast<double>(y) == rounded ? 0.0 : std::numeric_limits<double>::infinity();
  }
  return std::fabs(static_cast<double>(y) - ref.value) / float_ulp(ref.scale);
}

inline float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Test inputs: every `stride`-th float bit pattern (both signs), the special
// values, and 512 consecutive floats on each side of every boundary the
// functions have (overflow and underflow of exp, the cut-offs, the pieces of
// erf's approximation, the subnormal edge).
inline std::vector<float> sample_floats(std::uint64_t stride) {
  std::vector<float> x;
  for (std::uint64_t u = 0; u <= 0xffffffffULL; u += stride) {
    x.push_back(from_bits(static_cast<std::uint32_t>(u)));
  }
  const float specials[] = {0.0f,
                            -0.0f,
                            std::numeric_limits<float>::denorm_min(),
                            -std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::min(),
                            -std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            1.0f,
                            -1.0f};
  x.insert(x.end(), std::begin(specials), std::end(specials));
  const float edges[] = {88.7228394f, -87.3365479f, -103.972076f, -120.0f,     12.0f,    -12.0f,
                         14.5f,       -14.5f,       110.0f,       -110.0f,     0.75f,    -0.75f,
                         1.0f,        0.5f,         0.70710678f,  1.41421356f, 0x1p-126f};
  for (float e : edges) {
    float lo = e, hi = e;
    for (int i = 0; i < 512; ++i) {
      lo = std::nextafter(lo, -std::numeric_limits<float>::infinity());
      hi = std::nextafter(hi, std::numeric_limits<float>::infinity());
      x.push_back(lo);
      x.push_back(hi);
    }
    x.push_back(e);
  }
  return x;
}

}  // namespace vec_math_test
