#pragma once
// What moekit's GPU benchmarks share: device memory that lives for one
// benchmark, CUDA-event timing, and the exit code for a machine without a
// device (77, which CTest reports as skipped).

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdio>

#include "moekit/cuda/device.cuh"
#include "moekit/cuda/error.cuh"

namespace moekit_bench {

// A zero-filled device allocation.
struct DeviceMemory {
  void* p = nullptr;
  std::size_t bytes;
  explicit DeviceMemory(std::size_t n) : bytes(n) {
    MOEKIT_CUDA_CHECK(cudaMalloc(&p, n < 1 ? 1 : n));
    MOEKIT_CUDA_CHECK(cudaMemset(p, 0, n < 1 ? 1 : n));
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() { (void)cudaFree(p); }
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// Milliseconds of `work` on the default stream, by CUDA events.
template <class F>
float time_ms(F&& work) {
  cudaEvent_t start, stop;
  MOEKIT_CUDA_CHECK(cudaEventCreate(&start));
  MOEKIT_CUDA_CHECK(cudaEventCreate(&stop));
  MOEKIT_CUDA_CHECK(cudaEventRecord(start));
  work();
  MOEKIT_CUDA_CHECK(cudaEventRecord(stop));
  MOEKIT_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.0f;
  MOEKIT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  MOEKIT_CUDA_CHECK(cudaEventDestroy(start));
  MOEKIT_CUDA_CHECK(cudaEventDestroy(stop));
  return ms;
}

// Seconds per call of `work`, over `reps` calls after one warm-up.
template <class F>
double seconds_per_call(F&& work, int reps) {
  work();
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  const float ms = time_ms([&] {
    for (int i = 0; i < reps; ++i) work();
  });
  return static_cast<double>(ms) * 1e-3 / reps;
}

// The ceiling: device-to-device copy bandwidth (read + write) for `bytes`.
inline double copy_gbps(std::size_t bytes) {
  DeviceMemory src(bytes), dst(bytes);
  MOEKIT_CUDA_CHECK(cudaMemset(src.p, 1, bytes));
  constexpr int kReps = 20;
  (void)time_ms(
      [&] { MOEKIT_CUDA_CHECK(cudaMemcpyAsync(dst.p, src.p, bytes, cudaMemcpyDeviceToDevice)); });
  const float ms = time_ms([&] {
    for (int i = 0; i < kReps; ++i) {
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(dst.p, src.p, bytes, cudaMemcpyDeviceToDevice));
    }
  });
  return 2.0 * static_cast<double>(bytes) * kReps / (static_cast<double>(ms) * 1e6);
}

// True (after saying why) where no CUDA device can be used: main then
// returns 77.
inline bool no_device() {
  cudaError_t status = cudaSuccess;
  if (moekit::gpu::device_count(&status) > 0) return false;
  std::printf("no CUDA device: %s; nothing to measure\n", cudaGetErrorName(status));
  return true;
}

}  // namespace moekit_bench
