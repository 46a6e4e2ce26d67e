#pragma once
// Shared helpers for moekit's CUDA tests.

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

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
