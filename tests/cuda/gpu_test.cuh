#pragma once
// Shared helpers for moekit's CUDA tests.

#include <gtest/gtest.h>

#include "moekit/cuda/device.cuh"

// Skips the calling test where no CUDA device can be used, with the reason.
#define MOEKIT_REQUIRE_GPU()                                                        \
  do {                                                                              \
    cudaError_t moekit_query_status_ = cudaSuccess;                                 \
    if (::moekit::gpu::device_count(&moekit_query_status_) == 0) {                  \
      GTEST_SKIP() << "no CUDA device: " << cudaGetErrorName(moekit_query_status_); \
    }                                                                               \
  } while (false)
