// GPU expert FFN benchmarks: gpu::ExpertFfn (SwiGLU, bf16, fp32 accumulation)
// forward and forward + backward over a balanced expert-major buffer, beside
// the same run's cuBLAS dense bf16 GEMMs of equal FLOPs (all rows through one
// d x d_ff expert), timed with CUDA events. Reports TFLOP/s, the dense
// rate and their ratio (goals: >= 0.75 at C1, >= 0.60 at C2).
//
// Shapes (docs/index.md#benchmark-sizes, scaled to fill the chip): C1 T = 16384, d = 1024,
// d_ff = 4096, E = 8, K = 2; C2 T = 16384, d = 1024, d_ff = 512, E = 64,
// K = 8; and (E, K, d, d_ff) = (64, 8, 2048, 1408), (256, 8, 7168, 2048) at
// T = 4096. Inputs and weights are random (bf16 tensor-core GEMMs run faster
// on zeros); a shape that does not fit in free device memory (the largest
// needs about 47 GB with its gradients) is skipped, saying how much it needs.
// Without a CUDA device the binary exits with 77 (CTest: skipped).
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "moekit/cuda/expert_ffn.cuh"

namespace {

using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::VectorView;
using T = __nv_bfloat16;
namespace gpu = moekit::gpu;

using moekit_bench::DeviceMemory;

template <int E, int K>
void bench_ffn(benchmark::State& state, index_t d, index_t f, bool backward) {
  using S = MoeSpec<E, K>;
  const index_t tokens = state.range(0);
  const index_t rows = tokens * K;
  std::vector<index_t> offsets(E + 1);
  for (int e = 0; e <= E; ++e) offsets[e] = rows * e / E;  // balanced
  const auto bytes = [](index_t r, index_t c) { return static_cast<std::size_t>(r * c) * 2; };
  const gpu::ExpertFfn<S, T> ffn({.d_model = d,
                                  .d_ff = f,
                                  .kind = moekit::FfnKind::kGated,
                                  .activation = moekit::Activation::kSilu});
  // x, y, pre, gate and the weights; backward adds dx and the weight gradients.
  const std::size_t activations = 2 * bytes(rows, d) + 2 * bytes(rows, f);
  const std::size_t weights = 3 * bytes(E * f, d);
  const std::size_t needed =
      activations + weights + ffn.workspace_size(rows) + (backward ? bytes(rows, d) + weights : 0);
  if (!moekit_bench::fits_or_skip(state, needed)) return;
  const auto grad_bytes = [&](std::size_t b) { return backward ? b : 0; };
  DeviceMemory x(bytes(rows, d)), y(bytes(rows, d)), pre(bytes(rows, f)), gate(bytes(rows, f)),
      w1(bytes(E * f, d)), w3(bytes(E * f, d)), w2(bytes(E * d, f)), dx(grad_bytes(bytes(rows, d))),
      dw1(grad_bytes(w1.bytes)), dw3(grad_bytes(w3.bytes)), dw2(grad_bytes(w2.bytes));
  DeviceMemory workspace(ffn.workspace_size(rows));
  // Random inputs and weights, scaled to keep the activations of order 1
  // (y, written by forward, doubles as dy in backward).
  const float wd = 1.0f / std::sqrt(static_cast<float>(d));
  const float wf = 1.0f / std::sqrt(static_cast<float>(f));
  moekit_bench::fill_uniform(x.as<T>(), x.bytes / sizeof(T), 1.0f, 1);
  moekit_bench::fill_uniform(w1.as<T>(), w1.bytes / sizeof(T), wd, 3);
  moekit_bench::fill_uniform(w3.as<T>(), w3.bytes / sizeof(T), wd, 4);
  moekit_bench::fill_uniform(w2.as<T>(), w2.bytes / sizeof(T), wf, 5);
  cublasHandle_t handle;
  MOEKIT_CUBLAS_CHECK(cublasCreate(&handle));
  const VectorView<const index_t> off(offsets.data(), E + 1);
  const gpu::ExpertWeights<T> w{
      {w1.as<T>(), E * f, d}, {w3.as<T>(), E * f, d}, {w2.as<T>(), E * d, f}};
  const gpu::ExpertGrads<T> grads{
      {dw1.as<T>(), E * f, d}, {dw3.as<T>(), E * f, d}, {dw2.as<T>(), E * d, f}};
  const auto run = [&] {
    ffn.forward(handle, {x.as<T>(), rows, d}, off, w, {y.as<T>(), rows, d}, {pre.as<T>(), rows, f},
                {gate.as<T>(), rows, f}, workspace.p, workspace.bytes);
    if (backward) {
      ffn.backward(handle, {y.as<T>(), rows, d}, {x.as<T>(), rows, d}, off, w,
                   {pre.as<T>(), rows, f}, {gate.as<T>(), rows, f}, {dx.as<T>(), rows, d}, grads,
                   workspace.p, workspace.bytes);
    }
  };
  // The ceiling: the same GEMMs dense (all rows through expert 0's shapes).
  const moekit_bench::DenseFfnGemms dense{
      x.as<T>(),    w1.as<T>(), w3.as<T>(), w2.as<T>(), pre.as<T>(),
      gate.as<T>(), y.as<T>(),  rows,       d,          f};
  const double dense_rate = dense.rate(handle);
  run();  // warm-up
  double seconds = 0.0;
  for (auto _ : state) {
    const double t = moekit_bench::time_ms(run) * 1e-3;
    state.SetIterationTime(t);
    seconds += t;
  }
  MOEKIT_CUBLAS_CHECK(cublasDestroy(handle));
  // Forward: 3 GEMMs of 2 rows d f; backward: 6 more (dh, dW2, dW1, dW3, dx twice).
  const double fwd_flops = 6.0 * static_cast<double>(rows) * static_cast<double>(d * f);
  const double flops = backward ? 3.0 * fwd_flops : fwd_flops;
  const double rate = flops * static_cast<double>(state.iterations()) / seconds;
  state.counters["TFLOP/s"] = rate * 1e-12;
  state.counters["dense_TFLOP/s"] = dense_rate * 1e-12;
  state.counters["of_dense"] = rate / dense_rate;
  state.SetLabel(backward ? "fwd+bwd" : "fwd");
}

// bench_bench_ffn as the class template register_expert_shapes wants.
template <int E, int K>
struct Bench {
  static void run(benchmark::State& s, index_t d, index_t f, bool backward) {
    bench_ffn<E, K>(s, d, f, backward);
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (moekit_bench::no_device()) return 77;
  moekit_bench::register_expert_shapes<Bench>("ffn");
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
