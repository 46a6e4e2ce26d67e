#pragma once
// Device memory and element helpers shared by moekit's CUDA tests.

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstddef>
#include <type_traits>
#include <vector>

#include "moekit/cuda/error.cuh"

namespace moekit_test {

template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (n_ > 0) MOEKIT_CUDA_CHECK(cudaMalloc(&p_, n_ * sizeof(T)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (p_ != nullptr) (void)cudaFree(p_);
  }
  T* get() const { return p_; }
  std::size_t size() const { return n_; }
  void upload(const std::vector<T>& host) {
    if (n_ > 0) {
      MOEKIT_CUDA_CHECK(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
    }
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_ > 0) {
      MOEKIT_CUDA_CHECK(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    }
    return host;
  }
  // 0xFF bytes: NaN floats and doubles, id -1: an unwritten element shows.
  void poison() {
    if (n_ > 0) MOEKIT_CUDA_CHECK(cudaMemset(p_, 0xFF, n_ * sizeof(T)));
  }

 private:
  T* p_ = nullptr;
  std::size_t n_;
};

// Runs a two-phase call: size query, allocation, run, synchronise.
template <class F>
void two_phase(F&& call) {
  std::size_t bytes = 0;
  MOEKIT_CUDA_CHECK(call(nullptr, bytes));
  ASSERT_GE(bytes, 1u);
  DeviceBuffer<unsigned char> workspace(bytes);
  MOEKIT_CUDA_CHECK(cudaMemset(workspace.get(), 0xFF, bytes));  // stale workspace must not matter
  MOEKIT_CUDA_CHECK(call(workspace.get(), bytes));
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
}

template <class T>
T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(v);
  } else {
    return __float2half(v);
  }
}

template <class T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

// A cuBLAS handle for one test.
class Cublas {
 public:
  Cublas() { MOEKIT_CUBLAS_CHECK(cublasCreate(&handle_)); }
  ~Cublas() { (void)cublasDestroy(handle_); }
  Cublas(const Cublas&) = delete;
  Cublas& operator=(const Cublas&) = delete;
  cublasHandle_t get() const { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bf16";
  return "fp16";
}

}  // namespace moekit_test
