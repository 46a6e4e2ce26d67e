#pragma once
// What moekit's GPU benchmarks share: device memory that lives for one
// benchmark, a device-side fill, CUDA-event timing, the ceilings (copy
// bandwidth, cuBLAS dense GEMMs of an FFN's FLOPs), and the exit code for a
// machine without a device (77, which CTest reports as skipped).

#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "moekit/core/types.hpp"
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

// Fills n elements with values spread over [-scale, scale] from a hash of
// (index, seed): random-looking (routing on them does not collapse onto a
// few experts), cheap, and on the device, so tens of GB of weights need no
// host copy. Default stream.
template <class T>
__global__ void fill_uniform_kernel(T* p, std::size_t n, float scale, std::uint32_t seed) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    std::uint64_t z = i + (static_cast<std::uint64_t>(seed) << 40) + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;  // splitmix64's finaliser
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * 0x1.0p-24f;  // [0, 1)
    p[i] = static_cast<T>(scale * (2.0f * u - 1.0f));
  }
}

template <class T>
void fill_uniform(T* p, std::size_t n, float scale, std::uint32_t seed) {
  if (n == 0) return;
  const std::size_t blocks = std::min<std::size_t>((n + 255) / 256, 65536);
  fill_uniform_kernel<T><<<static_cast<unsigned>(blocks), 256>>>(p, n, scale, seed);
  MOEKIT_CUDA_CHECK(cudaGetLastError());
}

// Free device memory, bytes.
inline std::size_t free_device_bytes() {
  std::size_t free = 0, total = 0;
  MOEKIT_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return free;
}

// Whether `bytes` more fit in device memory, with 5 % and 512 MiB to spare
// for cuBLAS's workspace and the allocator's rounding; if not, the benchmark
// is skipped with both numbers (an allocation that fails halfway would
// leave a CUDA error behind).
inline bool fits_or_skip(benchmark::State& state, std::size_t bytes) {
  const std::size_t free = free_device_bytes();
  if (bytes + bytes / 20 + (std::size_t{512} << 20) <= free) return true;
  char message[160];
  std::snprintf(message, sizeof message, "needs %.1f GiB of device memory, %.1f GiB free",
                static_cast<double>(bytes) / (1 << 30), static_cast<double>(free) / (1 << 30));
  state.SkipWithError(message);
  return false;
}

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

// C (m x n, row-major) = A (m x k) B^T (B: n x k, row-major), bf16 with
// fp32 accumulation, on the handle's stream.
inline void dense_gemm(cublasHandle_t handle, const __nv_bfloat16* a, const __nv_bfloat16* b,
                       __nv_bfloat16* c, moekit::index_t m, moekit::index_t n, moekit::index_t k) {
  const float one = 1.0f, zero = 0.0f;
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  MOEKIT_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, ni, mi, ki, &one, b,
                                   CUDA_R_16BF, ki, a, CUDA_R_16BF, ki, &zero, c, CUDA_R_16BF, ni,
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// The ceiling of routed SwiGLU experts over `rows` rows (docs/index.md#benchmarks): the
// three GEMMs of one dense FFN over the same rows, pre = x W1^T,
// gate = x W3^T, y = pre W2^T (bf16, fp32 accumulation, no element-wise
// part): the experts' FLOPs (flops()), each GEMM as one matrix.
struct DenseFfnGemms {
  const __nv_bfloat16* x;   // rows x d
  const __nv_bfloat16* w1;  // d_ff x d
  const __nv_bfloat16* w3;  // d_ff x d
  const __nv_bfloat16* w2;  // d x d_ff
  __nv_bfloat16* pre;       // rows x d_ff
  __nv_bfloat16* gate;      // rows x d_ff
  __nv_bfloat16* y;         // rows x d
  moekit::index_t rows, d, d_ff;

  double flops() const {
    return 6.0 * static_cast<double>(rows) * static_cast<double>(d) * static_cast<double>(d_ff);
  }
  void run(cublasHandle_t handle) const {
    dense_gemm(handle, x, w1, pre, rows, d_ff, d);
    dense_gemm(handle, x, w3, gate, rows, d_ff, d);
    dense_gemm(handle, pre, w2, y, rows, d, d_ff);
  }
  // The rate, FLOP/s: 10 calls after a warm-up, on the handle's stream
  // (which must be the default stream that seconds_per_call times).
  double rate(cublasHandle_t handle) const {
    return flops() / seconds_per_call([&] { run(handle); }, 10);
  }
};

// The expert shapes of bench_cuda_ffn and bench_cuda_moe_layer, one list:
// C1 and C2 (docs/index.md#benchmark-sizes) scaled to T = 16384, and (E, K, d, d_ff) =
// (64, 8, 2048, 1408), (256, 8, 7168, 2048) at T = 4096. For each shape,
// bench<E, K>(state, d, d_ff, backward) is registered as
// "<prefix>_fwd/<shape>/<T>" and "<prefix>_fwd_bwd/<shape>/<T>".
template <template <int, int> class Bench>
void register_expert_shapes(const std::string& prefix) {
  const auto add = [&]<int E, int K>(const char* shape, moekit::index_t d, moekit::index_t d_ff,
                                     moekit::index_t tokens) {
    for (bool backward : {false, true}) {
      const std::string name = prefix + (backward ? "_fwd_bwd/" : "_fwd/") + shape;
      benchmark::RegisterBenchmark(
          name.c_str(), [=](benchmark::State& s) { Bench<E, K>::run(s, d, d_ff, backward); })
          ->Arg(tokens)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    }
  };
  add.template operator()<8, 2>("C1_bf16", 1024, 4096, 16384);
  add.template operator()<64, 8>("C2_bf16", 1024, 512, 16384);
  add.template operator()<64, 8>("E64_d2048_f1408_bf16", 2048, 1408, 4096);
  add.template operator()<256, 8>("E256_d7168_f2048_bf16", 7168, 2048, 4096);
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
