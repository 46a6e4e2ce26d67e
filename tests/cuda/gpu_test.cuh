#pragma once
// Shared helpers for moekit's CUDA tests.

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <string_view>
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

// Skips the calling test under compute-sanitizer (see under_compute_sanitizer).
#define MOEKIT_SKIP_UNDER_COMPUTE_SANITIZER(why)                                             \
  do {                                                                                       \
    if (::moekit_test::under_compute_sanitizer()) {                                          \
      GTEST_SKIP() << "under compute-sanitizer (MOEKIT_UNDER_COMPUTE_SANITIZER=1): " << why; \
    }                                                                                        \
  } while (false)

namespace moekit_test {

// Whether the run says it is under compute-sanitizer, by
// MOEKIT_UNDER_COMPUTE_SANITIZER=1 (tools/gpu_check.sh sets it). The
// sanitizer counts every failed CUDA API call as an error, so with
// --error-exitcode a test that makes a call fail on purpose must not run there.
inline bool under_compute_sanitizer() {
  const char* value = std::getenv("MOEKIT_UNDER_COMPUTE_SANITIZER");
  return value != nullptr && std::string_view(value) == "1";
}

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
