// First CUDA tests: views in kernels, the CUDA error layer, device discovery.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdlib>
#include <string>
#include <vector>

#include "gpu_test.cuh"
#include "moekit/core/view.hpp"
#include "moekit/cuda/error.cuh"

namespace {

using moekit::index_t;
using moekit::MatrixView;

// y = 2 x + 1 over a strided view: one thread per element.
__global__ void affine(MatrixView<const float> x, MatrixView<float> y) {
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < x.size()) {
    const index_t r = i / x.cols();
    const index_t c = i % x.cols();
    y(r, c) = 2.0f * x(r, c) + 1.0f;
  }
}

cudaError_t bad_step() {
  MOEKIT_CUDA_TRY(cudaErrorInvalidValue);
  return cudaSuccess;
}

// ---- host-side: runs everywhere, a GPU or not ---------------------------------

TEST(CudaError, TryPassesTheFirstFailureUp) { EXPECT_EQ(bad_step(), cudaErrorInvalidValue); }

TEST(CudaError, CheckNamesCallAndError) {
  try {
    MOEKIT_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL() << "no error";
  } catch (const moekit::Error& e) {
    EXPECT_EQ(e.code(), moekit::Errc::kCudaError);
    const std::string msg = e.what();
    EXPECT_NE(msg.find("cudaErrorInvalidValue failed: cudaErrorInvalidValue"), std::string::npos)
        << msg;
  }
}

TEST(CudaError, CublasCheckNamesStatus) {
  try {
    MOEKIT_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE);
    FAIL() << "no error";
  } catch (const moekit::Error& e) {
    EXPECT_EQ(e.code(), moekit::Errc::kCublasError);
    EXPECT_NE(std::string(e.what()).find("CUBLAS_STATUS_INVALID_VALUE"), std::string::npos)
        << e.what();
  }
}

// The switch the sanitizer runs set: only "1" turns it on.
TEST(CudaTestSupport, SanitizerSwitchReadsTheEnvironment) {
  const char* saved = std::getenv("MOEKIT_UNDER_COMPUTE_SANITIZER");
  const std::string before = saved != nullptr ? saved : "";
  ASSERT_EQ(0, unsetenv("MOEKIT_UNDER_COMPUTE_SANITIZER"));
  EXPECT_FALSE(moekit_test::under_compute_sanitizer());
  ASSERT_EQ(0, setenv("MOEKIT_UNDER_COMPUTE_SANITIZER", "0", 1));
  EXPECT_FALSE(moekit_test::under_compute_sanitizer());
  ASSERT_EQ(0, setenv("MOEKIT_UNDER_COMPUTE_SANITIZER", "1", 1));
  EXPECT_TRUE(moekit_test::under_compute_sanitizer());
  if (saved != nullptr) {
    ASSERT_EQ(0, setenv("MOEKIT_UNDER_COMPUTE_SANITIZER", before.c_str(), 1));
  } else {
    ASSERT_EQ(0, unsetenv("MOEKIT_UNDER_COMPUTE_SANITIZER"));
  }
}

TEST(CudaDevice, QueryReportsCountOrReason) {
  cudaError_t status = cudaSuccess;
  const int count = moekit::gpu::device_count(&status);
  EXPECT_GE(count, 0);
  if (status != cudaSuccess) EXPECT_EQ(count, 0) << cudaGetErrorName(status);
}

// ---- device-side: needs a GPU ---------------------------------------------------

TEST(CudaView, StridedViewInKernel) {
  MOEKIT_REQUIRE_GPU();
  constexpr index_t rows = 37, cols = 21, ld = 32;  // padded rows, odd sizes
  std::vector<float> host(rows * ld);
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = 0.25f * static_cast<float>(i % 97) - 3;
  const std::size_t bytes = host.size() * sizeof(float);

  float* x = nullptr;
  float* y = nullptr;
  MOEKIT_CUDA_CHECK(cudaMalloc(&x, bytes));
  MOEKIT_CUDA_CHECK(cudaMalloc(&y, bytes));
  MOEKIT_CUDA_CHECK(cudaMemcpy(x, host.data(), bytes, cudaMemcpyHostToDevice));
  MOEKIT_CUDA_CHECK(cudaMemset(y, 0xFF, bytes));  // poison: NaN everywhere

  affine<<<(rows * cols + 127) / 128, 128>>>(MatrixView<const float>(x, rows, cols, ld),
                                             MatrixView<float>(y, rows, cols, ld));
  MOEKIT_CUDA_CHECK(cudaGetLastError());
  std::vector<float> out(host.size());
  MOEKIT_CUDA_CHECK(cudaMemcpy(out.data(), y, bytes, cudaMemcpyDeviceToHost));
  MOEKIT_CUDA_CHECK(cudaFree(x));
  MOEKIT_CUDA_CHECK(cudaFree(y));

  for (index_t r = 0; r < rows; ++r) {
    for (index_t c = 0; c < ld; ++c) {
      const float v = out[r * ld + c];
      if (c < cols) {
        ASSERT_EQ(v, 2.0f * host[r * ld + c] + 1.0f) << "at (" << r << ", " << c << ")";
      } else {
        ASSERT_NE(v, v) << "padding written at (" << r << ", " << c << ")";  // still NaN
      }
    }
  }
}

// Fails an allocation on purpose, which compute-sanitizer reports as an API
// error (and counts against --error-exitcode): skipped under it.
TEST(CudaError, RealFailureFromTheRuntime) {
  MOEKIT_REQUIRE_GPU();
  MOEKIT_SKIP_UNDER_COMPUTE_SANITIZER("it makes cudaMalloc fail on purpose");
  void* p = nullptr;
  try {
    MOEKIT_CUDA_CHECK(cudaMalloc(&p, std::size_t{1} << 62));  // 4 EiB
    FAIL() << "allocation succeeded";
  } catch (const moekit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("cudaErrorMemoryAllocation"), std::string::npos)
        << e.what();
  }
  (void)cudaGetLastError();
}

}  // namespace
