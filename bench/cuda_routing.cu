// GPU routing benchmarks: gpu::route (gating + statistics) and the aux
// losses for T = 16384 and 65536 tokens at (E, K) = (8, 2), (64, 8), (256, 8),
// timed with CUDA events. Each reports its achieved GB/s (the bytes it must
// move at least, over its time) beside a device-to-device copy of as many
// bytes measured in the same benchmark, and the ratio (goal >= 0.6).
//
// Without a CUDA device the binary prints the reason and exits with 77,
// which CTest reports as skipped.
#include <benchmark/benchmark.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "moekit/cuda/aux_losses.cuh"
#include "moekit/cuda/device.cuh"
#include "moekit/cuda/router.cuh"

namespace {

using moekit::index_t;
using moekit::MoeSpec;
namespace gpu = moekit::gpu;

// A device allocation that lives for one benchmark.
struct DeviceMemory {
  void* p = nullptr;
  explicit DeviceMemory(std::size_t bytes) {
    MOEKIT_CUDA_CHECK(cudaMalloc(&p, bytes < 1 ? 1 : bytes));
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

// The ceiling: device-to-device copy bandwidth (read + write) for `bytes`.
double copy_gbps(std::size_t bytes) {
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

template <class T>
T* upload_logits(DeviceMemory& m, index_t tokens, int experts) {
  std::vector<T> host(static_cast<std::size_t>(tokens) * experts);
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (T& v : host) v = static_cast<T>(normal(gen));
  MOEKIT_CUDA_CHECK(cudaMemcpy(m.p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return m.as<T>();
}

// `aux`: route, then the Switch loss and the z-loss with their gradients.
template <int E, int K, class T>
void bench_routing(benchmark::State& state, bool aux) {
  using S = MoeSpec<E, K>;
  const index_t tokens = state.range(0);
  const std::size_t te = static_cast<std::size_t>(tokens) * E;
  const std::size_t tk = static_cast<std::size_t>(tokens) * K;
  DeviceMemory logits(te * sizeof(T)), scores(te * 4), ids(tk * 4), weights(tk * 4),
      dlogits(te * 4), stats(sizeof(gpu::RoutingStats<S>)), loss(2 * sizeof(double));
  upload_logits<T>(logits, tokens, E);
  MOEKIT_CUDA_CHECK(cudaMemset(dlogits.p, 0, te * 4));

  gpu::RouteArgs<S, T> route;
  route.logits = {logits.as<const T>(), tokens, E};
  route.gating.renormalize = true;
  route.scores = {scores.as<float>(), tokens, E};
  route.expert_ids = {ids.as<std::int32_t>(), tokens, K};
  route.weights = {weights.as<float>(), tokens, K};
  route.stats = stats.as<gpu::RoutingStats<S>>();
  gpu::SwitchLossArgs<S, T> sw;
  sw.logits = route.logits;
  sw.scores = route.scores;
  sw.expert_ids = route.expert_ids;
  sw.coeff = 1e-2f;
  sw.loss = loss.as<double>();
  sw.dlogits = {dlogits.as<float>(), tokens, E};
  gpu::ZLossArgs<S, T> z;
  z.logits = route.logits;
  z.coeff = 1e-3f;
  z.loss = loss.as<double>() + 1;
  z.dlogits = sw.dlogits;

  std::size_t b_route = 0, b_switch = 0, b_z = 0;
  MOEKIT_CUDA_CHECK(gpu::route(nullptr, b_route, route));
  MOEKIT_CUDA_CHECK(gpu::switch_loss(nullptr, b_switch, sw));
  MOEKIT_CUDA_CHECK(gpu::z_loss(nullptr, b_z, z));
  DeviceMemory workspace(std::max({b_route, b_switch, b_z}));
  const auto run = [&] {
    MOEKIT_CUDA_CHECK(gpu::route(workspace.p, b_route, route));
    if (aux) {
      MOEKIT_CUDA_CHECK(gpu::switch_loss(workspace.p, b_switch, sw));
      MOEKIT_CUDA_CHECK(gpu::z_loss(workspace.p, b_z, z));
    }
  };
  run();  // warm-up
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  double seconds = 0.0;
  for (auto _ : state) {
    const double t = time_ms(run) * 1e-3;
    state.SetIterationTime(t);
    seconds += t;
  }

  // The least traffic: route reads the logits and writes scores, ids and
  // weights; the Switch loss reads scores and ids and then logits, scores and
  // dlogits for the gradient, writing dlogits; the z-loss reads logits and
  // reads and writes dlogits.
  double bytes = static_cast<double>(te * sizeof(T) + te * 4 + tk * 8);
  if (aux) {
    bytes += static_cast<double>(te * 4 + tk * 4);                   // switch: statistics
    bytes += static_cast<double>(te * sizeof(T) + te * 4 + te * 8);  // switch: gradient
    bytes += static_cast<double>(te * sizeof(T) + te * 8);           // z-loss
  }
  state.counters["GB/s"] =
      benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  const double ceiling = copy_gbps(static_cast<std::size_t>(bytes / 2));
  state.counters["copy_GB/s"] = ceiling;
  const double achieved =
      seconds > 0.0 ? bytes * static_cast<double>(state.iterations()) / seconds * 1e-9 : 0.0;
  state.counters["of_copy"] = ceiling > 0.0 ? achieved / ceiling : 0.0;
  state.SetLabel(aux ? "route+switch+z" : "route");
}

template <int E, int K, class T>
void register_pair(const char* name) {
  for (bool aux : {false, true}) {
    const std::string full = std::string(aux ? "route_aux/" : "route/") + name;
    benchmark::RegisterBenchmark(full.c_str(),
                                 [aux](benchmark::State& s) { bench_routing<E, K, T>(s, aux); })
        ->Arg(16384)
        ->Arg(65536)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  cudaError_t status = cudaSuccess;
  if (gpu::device_count(&status) == 0) {
    std::printf("no CUDA device: %s; nothing to measure\n", cudaGetErrorName(status));
    return 77;
  }
  register_pair<8, 2, float>("E8_K2_fp32");
  register_pair<64, 8, float>("E64_K8_fp32");
  register_pair<256, 8, float>("E256_K8_fp32");
  register_pair<8, 2, __nv_bfloat16>("E8_K2_bf16");
  register_pair<64, 8, __nv_bfloat16>("E64_K8_bf16");
  register_pair<256, 8, __nv_bfloat16>("E256_K8_bf16");
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
