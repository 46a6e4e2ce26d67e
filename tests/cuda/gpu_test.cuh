#pragma once
// Shared helpers for moekit's CUDA tests.

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/cuda/device.cuh"

// Skips the calling test where no CUDA device can be used, with the reason.
#define MOEKIT_REQUIRE_GPU()                                                        \
  do {                                                                              \
    cudaError_t moekit_query_status_ = cudaSuccess;                                 \
    if (::moekit::gpu::device_count(&moekit_query_status_) == 0) {                  \
      GTEST_SKIP() << "no CUDA device: " << cudaGetErrorName(moekit_query_status_); \
    }                                                                               \
  } while (false)

namespace moekit_test {

// A fake device pointer for argument checks that must throw before anything
// dereferences it (distinct, aligned addresses).
template <class T>
T* fake(std::uintptr_t n) {
  return reinterpret_cast<T*>(n * 4096);
}

// T x e normal logits (sigma 2) with non-finite ones in fixed rows: NaN in
// row 3, +inf in row 7 (its other experts get weight exactly 0: ties), -inf
// in row 11, where T > 12.
inline std::vector<float> random_logits(std::int64_t tokens, int e, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> x(static_cast<std::size_t>(tokens * e));
  for (float& v : x) v = normal(gen);
  if (tokens > 12) {
    x[3 * e + 0] = std::numeric_limits<float>::quiet_NaN();
    x[7 * e + (e - 1)] = std::numeric_limits<float>::infinity();
    x[11 * e + e / 2] = -std::numeric_limits<float>::infinity();
  }
  return x;
}

// n values uniform in [lo, hi).
inline std::vector<float> random_floats(std::size_t n, float lo, float hi, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = u(gen);
  return v;
}

// f() must throw moekit::Error with `code` and a message containing `needle`.
template <class F>
void expect_error(F&& f, moekit::Errc code, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const moekit::Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace moekit_test
