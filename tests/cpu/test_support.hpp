#pragma once
// What the unit tests share to compare results: bit-for-bit equality, the
// relative error ||out - ref|| / ||ref|| against a float64 reference, and the
// expert activations in textbook float64 form (written from docs/math.md,
// not from moekit/core/activation.hpp, whose evaluation they check).

#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#include "moekit/core/activation.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace moekit_test {

// True when a and b hold the same floats bit for bit (NaN payloads and the
// sign of zero included).
inline bool same_bits(const float* a, std::size_t a_size, const float* b, std::size_t b_size) {
  return a_size == b_size && (a_size == 0 || std::memcmp(a, b, a_size * sizeof(float)) == 0);
}
inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return same_bits(a.data(), a.size(), b.data(), b.size());
}
inline bool same_bits(moekit::VectorView<const float> a, moekit::VectorView<const float> b) {
  return same_bits(a.data(), moekit::to_size(a.size()), b.data(), moekit::to_size(b.size()));
}

inline std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// ||out - ref|| / ||ref|| (2-norms). Where ||ref|| <= zero_scale the
// reference has no scale (zero, or zero up to rounding) and the error is
// absolute, ||out - ref||.
inline double rel_error(const std::vector<double>& out, const std::vector<double>& ref,
                        double zero_scale = 0.0) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(den) > zero_scale ? std::sqrt(num / den) : std::sqrt(num);
}
inline double rel_error(const std::vector<float>& out, const std::vector<double>& ref,
                        double zero_scale = 0.0) {
  return rel_error(to_double(out), ref, zero_scale);
}
inline double rel_error(moekit::VectorView<const float> out, const std::vector<double>& ref) {
  return rel_error(std::vector<double>(out.begin(), out.end()), ref);
}
// |out - ref| / |ref|, absolute where ref is 0.
inline double rel_error(double out, double ref) {
  return ref != 0.0 ? std::abs(out - ref) / std::abs(ref) : std::abs(out);
}

// ---- float64 activations (textbook forms) ----------------------------------------

inline double act64(moekit::Activation a, double x) {
  const double pi = 3.14159265358979323846;
  switch (a) {
    case moekit::Activation::kRelu:
      return x > 0 ? x : 0.0;
    case moekit::Activation::kGeluTanh:
      return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / pi) * (x + 0.044715 * x * x * x)));
    case moekit::Activation::kGeluErf:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case moekit::Activation::kSilu:
      return x / (1.0 + std::exp(-x));
  }
  return std::nan("");
}

// d act64 / dx.
inline double act64_grad(moekit::Activation a, double x) {
  const double pi = 3.14159265358979323846;
  switch (a) {
    case moekit::Activation::kRelu:
      return x > 0 ? 1.0 : 0.0;
    case moekit::Activation::kGeluTanh: {
      const double c = std::sqrt(2.0 / pi);
      const double t = std::tanh(c * (x + 0.044715 * x * x * x));
      return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x);
    }
    case moekit::Activation::kGeluErf:
      return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) +
             x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * pi);
    case moekit::Activation::kSilu: {
      const double s = 1.0 / (1.0 + std::exp(-x));
      return s * (1.0 + x * (1.0 - s));
    }
  }
  return std::nan("");
}

// OpenMP's thread count for a scope (no-op without OpenMP).
class ThreadCount {
 public:
  explicit ThreadCount(int threads) {
#if defined(_OPENMP)
    saved_ = omp_get_max_threads();
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
  }
  ~ThreadCount() {
#if defined(_OPENMP)
    omp_set_num_threads(saved_);
#endif
  }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int saved_ = 1;
};

}  // namespace moekit_test
