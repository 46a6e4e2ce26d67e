#pragma once
// Element-wise activations of the expert FFNs (docs/math.md, "Expert FFN"), shared by every
// backend: host-device, one float at a time.
//
// The functions, with u = sqrt(2/pi) (x + 0.044715 x^3) and sigma(z) = 1 / (1 + exp(-z)):
//
//   kRelu      f(x) = max(x, 0)                       f'(x) = 1 for x > 0, else 0
//   kGeluTanh  f(x) = 0.5 x (1 + tanh(u))             f'(x) = 0.5 (1 + tanh(u))
//                                                            + 0.5 x (1 - tanh(u)^2) u'(x),
//                                                     u'(x) = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
//   kGeluErf   f(x) = 0.5 x (1 + erf(x / sqrt 2))     f'(x) = Phi(x) + x phi(x),
//                                                     Phi(x) = 0.5 (1 + erf(x / sqrt 2)),
//                                                     phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//   kSilu      f(x) = x sigma(x)                      f'(x) = sigma(x) (1 + x (1 - sigma(x)))
//
// activate_grad is the derivative with respect to the pre-activation x. ReLU's
// derivative at 0 is taken as 0 (as in PyTorch).
//
// Evaluation. The formulas are evaluated in forms that are equal in exact
// arithmetic but do not cancel in float for negative x, where 1 + tanh(u) and
// 1 + erf(.) lose all their digits:
//   0.5 (1 + tanh(u)) = sigma(2u),    0.5 (1 + erf(x / sqrt 2)) = 0.5 erfc(-x / sqrt 2),
//   0.5 (1 - tanh(u)^2) = 2 sigma(2u) sigma(-2u),
// and sigma(z), sigma(-z) are computed from exp(-|z|), which never overflows.
// Beyond a cut-off where the float result is exactly the limit (|x| > 12 for
// GELU, 110 for SiLU) the limit is returned, so +-inf give the limits too:
// f(-inf) = 0, f(+inf) = +inf, f'(-inf) = 0, f'(+inf) = 1. NaN gives NaN.
// An Activation value outside the enumerators gives NaN (host APIs reject it
// before any kernel runs).

#include <cmath>
#include <type_traits>

#include "moekit/core/config.hpp"

MOEKIT_NAMESPACE_BEGIN

// The expert FFN's nonlinearity: ReLU, GELU (tanh approximation or exact
// erf form) or SiLU (x * sigmoid(x), the SwiGLU gate's).
enum class Activation { kRelu, kGeluTanh, kGeluErf, kSilu };

namespace activation_detail {

inline constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2 / pi)
inline constexpr float kGeluCubic = 0.044715f;
inline constexpr float kInvSqrt2 = 0.7071067811865476f;    // 1 / sqrt(2)
inline constexpr float kInvSqrt2Pi = 0.3989422804014327f;  // 1 / sqrt(2 pi)
// Beyond these |x| the float results are exactly the limits (see above).
inline constexpr float kGeluCutoff = 12.0f;
inline constexpr float kSiluCutoff = 110.0f;

MOEKIT_HOST_DEVICE inline float quiet_nan() {
  // 0 / 0 without a constant expression the compiler would warn about.
  volatile float zero = 0.0f;
  return zero / zero;
}

// sigma(z) and sigma(-z) = 1 - sigma(z), both without overflow or cancellation.
struct Sigmoids {
  float pos;  // sigma(z)
  float neg;  // sigma(-z)
};
MOEKIT_HOST_DEVICE inline Sigmoids sigmoids(float z) {
  using std::exp;
  const float e = exp(z < 0.0f ? z : -z);  // exp(-|z|), in (0, 1]
  const float r = 1.0f / (1.0f + e);       // sigma(|z|)
  const float small = e * r;               // sigma(-|z|)
  return z < 0.0f ? Sigmoids{small, r} : Sigmoids{r, small};
}

MOEKIT_HOST_DEVICE inline float gelu_u(float x) {
  return kSqrt2OverPi * (x + kGeluCubic * x * x * x);
}

}  // namespace activation_detail

// f(x) for the activation `act` (formulas at the top of this file).
MOEKIT_HOST_DEVICE inline float activate(Activation act, float x) {
  namespace ad = activation_detail;
  using std::erfc;
  switch (act) {
    case Activation::kRelu:
      return x < 0.0f ? 0.0f : x;  // NaN passes through
    case Activation::kGeluTanh:
      if (x < -ad::kGeluCutoff) return 0.0f;
      return x * ad::sigmoids(2.0f * ad::gelu_u(x)).pos;
    case Activation::kGeluErf:
      if (x < -ad::kGeluCutoff) return 0.0f;
      return 0.5f * x * erfc(-x * ad::kInvSqrt2);
    case Activation::kSilu:
      if (x < -ad::kSiluCutoff) return 0.0f;
      return x * ad::sigmoids(x).pos;
  }
  return ad::quiet_nan();
}

// f'(x), the derivative of activate(act, x) with respect to x.
MOEKIT_HOST_DEVICE inline float activate_grad(Activation act, float x) {
  namespace ad = activation_detail;
  using std::erfc;
  using std::exp;
  switch (act) {
    case Activation::kRelu:
      return x > 0.0f ? 1.0f : (x <= 0.0f ? 0.0f : x);  // 0 at x = 0; NaN passes through
    case Activation::kGeluTanh: {
      if (x > ad::kGeluCutoff) return 1.0f;
      if (x < -ad::kGeluCutoff) return 0.0f;
      const ad::Sigmoids s = ad::sigmoids(2.0f * ad::gelu_u(x));
      const float du = ad::kSqrt2OverPi * (1.0f + 3.0f * ad::kGeluCubic * x * x);
      return s.pos + 2.0f * x * s.pos * s.neg * du;
    }
    case Activation::kGeluErf:
      if (x > ad::kGeluCutoff) return 1.0f;
      if (x < -ad::kGeluCutoff) return 0.0f;
      return 0.5f * erfc(-x * ad::kInvSqrt2) + x * ad::kInvSqrt2Pi * exp(-0.5f * x * x);
    case Activation::kSilu: {
      if (x > ad::kSiluCutoff) return 1.0f;
      if (x < -ad::kSiluCutoff) return 0.0f;
      const ad::Sigmoids s = ad::sigmoids(x);
      return s.pos * (1.0f + x * s.neg);
    }
  }
  return ad::quiet_nan();
}

// Calls f(std::integral_constant<Activation, A>{}) for the run-time act, so
// element-wise loops and kernels see a constant activation (host code; every
// backend's FFN dispatches through it). act must be an enumerator.
template <class F>
void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kRelu:
      return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kGeluTanh:
      return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kGeluErf:
      return f(std::integral_constant<Activation, Activation::kGeluErf>{});
    case Activation::kSilu:
      return f(std::integral_constant<Activation, Activation::kSilu>{});
  }
}

MOEKIT_NAMESPACE_END
