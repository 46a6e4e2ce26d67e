// GPU MoE layer benchmarks: gpu::MoeLayer (SwiGLU experts, bf16, fp32
// accumulation; softmax -> top-k -> renormalise, dropless, Switch and z
// losses on, no shared experts) forward and forward + backward, beside the
// same run's cuBLAS dense bf16 GEMMs of the experts' FLOPs, timed with CUDA
// events on the default stream after a warm-up. Counters:
//   GFLOP          the layer's FLOPs per call: the routed experts' GEMMs for
//                  the T K assignments (6 T K d d_ff forward) plus the gate
//                  GEMM (2 T d E); backward twice as much again (dX and dW)
//   TFLOP/s        GFLOP over the measured time
//   dense_TFLOP/s  a dense SwiGLU FFN's three GEMMs over the T K dispatched
//                  rows (moekit_bench::DenseFfnGemms, the ceiling
//                  bench_cuda_ffn uses), measured in the same benchmark
//   of_dense       TFLOP/s / dense_TFLOP/s: the whole layer against dense
//   experts_us     the routed expert FFNs alone (gpu::ExpertFfn forward, and
//                  backward for fwd+bwd) on the layer's own dispatched buffer
//                  and offsets (its real, uneven load), timed after the layer
//   experts_of_dense  their rate (expert GEMM FLOPs only) / dense_TFLOP/s
//                  (goals: >= 0.75 at C1, >= 0.60 at C2)
//   other_share    1 - experts_us / the layer's time: the share spent outside
//                  the expert FFNs (gate GEMM, gating, aux losses, plan, the
//                  host synchronisation, dispatch, combine and their backward)
//   max_load       the busiest expert's assignments over the mean (1 = even)
//   mem_GiB        device memory the benchmark holds (cudaMemGetInfo)
//
// gpu::MoeLayer::forward synchronises its stream once (it copies the expert
// offsets to the host for cuBLAS's grouped GEMM): that wait, and the idle GPU
// while the host launches the expert GEMMs after it, are part of the measured
// time, as they are of a training step.
//
// Shapes (docs/index.md#benchmark-sizes, scaled to fill the chip; bench_cuda_ffn's): C1
// T = 16384, d = 1024, d_ff = 4096, E = 8, K = 2; C2 T = 16384, d = 1024,
// d_ff = 512, E = 64, K = 8; and (E, K, d, d_ff) = (64, 8, 2048, 1408),
// (256, 8, 7168, 2048) at T = 4096. The largest holds 256 x 3 x 7168 x 2048
// bf16 expert weights (22.5 GB) and, for fwd+bwd, as many bf16 gradients
// (MoeLayerGrads<T> holds T): about 48.5 GB in all, which fits an 80 GB
// H100. A device with too little memory reports the benchmark skipped with
// the allocation's error. Without a CUDA device the binary exits with 77
// (CTest: skipped).
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "cuda_common.cuh"
#include "moekit/core/error.hpp"
#include "moekit/cuda/expert_ffn.cuh"
#include "moekit/cuda/moe_layer.cuh"

namespace {

using moekit::FfnKind;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using T = __nv_bfloat16;
namespace gpu = moekit::gpu;

using moekit_bench::DeviceMemory;
using moekit_bench::fill_uniform;
using moekit_bench::free_device_bytes;

std::size_t bytes(index_t rows, index_t cols) {
  return static_cast<std::size_t>(rows * cols) * sizeof(T);
}

// Mean seconds of one call of `work`, each timed on its own (as the layer is).
template <class F>
double seconds_each(F&& work, int reps) {
  double s = 0.0;
  for (int i = 0; i < reps; ++i) s += moekit_bench::time_ms(work) * 1e-3;
  return s / reps;
}

// One shape's layer, its parameters, state and (for backward) gradients,
// allocated and filled once per benchmark.
template <int E, int K>
struct Setup {
  using S = MoeSpec<E, K>;
  index_t tokens, d, f;
  bool backward;
  gpu::MoeLayer<S, T> layer;
  gpu::MoeLayerStorage<S, T> storage;
  DeviceMemory x, y, w_gate, w1, w3, w2;
  DeviceMemory dy, dx, dw_gate, dw1, dw3, dw2;  // 1 byte each (unused) for forward only

  static gpu::MoeLayerConfig config(index_t d, index_t f) {
    gpu::MoeLayerConfig c{.d_model = d,
                          .d_ff = f,
                          .kind = FfnKind::kGated,
                          .activation = moekit::Activation::kSilu,
                          .switch_coeff = 1e-2f,
                          .z_coeff = 1e-3f};
    c.router.gating.renormalize = true;  // Mixtral: softmax -> top-k -> renormalise; dropless
    return c;
  }

  Setup(index_t t, index_t d_model, index_t d_ff, bool with_backward)
      : tokens(t),
        d(d_model),
        f(d_ff),
        backward(with_backward),
        layer(config(d_model, d_ff)),
        storage(layer, t),
        x(bytes(t, d)),
        y(bytes(t, d)),
        w_gate(bytes(E, d)),
        w1(bytes(E * f, d)),
        w3(bytes(E * f, d)),
        w2(bytes(E * d, f)),
        dy(with_backward ? bytes(t, d) : 0),
        dx(with_backward ? bytes(t, d) : 0),
        dw_gate(with_backward ? w_gate.bytes : 0),
        dw1(with_backward ? w1.bytes : 0),
        dw3(with_backward ? w3.bytes : 0),
        dw2(with_backward ? w2.bytes : 0) {
    const auto fill = [](const DeviceMemory& m, float scale, std::uint32_t seed) {
      fill_uniform(m.as<T>(), m.bytes / sizeof(T), scale, seed);
    };
    const float wd = 1.0f / std::sqrt(static_cast<float>(d));
    fill(x, 1.0f, 1);
    // Logits of standard deviation about 1: every expert about equally likely.
    fill(w_gate, 3.0f * wd, 2);
    fill(w1, wd, 3);
    fill(w3, wd, 4);
    fill(w2, 1.0f / std::sqrt(static_cast<float>(f)), 5);
    if (backward) fill(dy, 1.0f, 6);
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  }

  gpu::MoeLayerParams<T> params() const {
    return {.w_gate = {w_gate.as<const T>(), E, d},
            .experts = {{w1.as<const T>(), E * f, d},
                        {w3.as<const T>(), E * f, d},
                        {w2.as<const T>(), E * d, f}}};
  }
  gpu::MoeLayerGrads<T> grads() const {
    if (!backward) return {};
    return {.dw_gate = {dw_gate.as<T>(), E, d},
            .dw1 = {dw1.as<T>(), E * f, d},
            .dw3 = {dw3.as<T>(), E * f, d},
            .dw2 = {dw2.as<T>(), E * d, f}};
  }
};

template <int E, int K>
void bench_layer(benchmark::State& state, index_t d, index_t f, bool backward) {
  using S = MoeSpec<E, K>;
  const index_t tokens = state.range(0);
  const std::size_t free_before = free_device_bytes();
  std::unique_ptr<Setup<E, K>> setup;
  try {
    setup = std::make_unique<Setup<E, K>>(tokens, d, f, backward);
  } catch (const moekit::Error& e) {  // too little device memory for this shape
    (void)cudaGetLastError();
    state.SkipWithError(e.what());
    return;
  }
  const Setup<E, K>& s = *setup;
  cublasHandle_t handle;
  MOEKIT_CUBLAS_CHECK(cublasCreate(&handle));
  const gpu::MoeLayerState<T>& st = s.storage.state();
  const gpu::MoeLayerWorkspace ws = s.storage.workspace(handle);  // default stream
  const gpu::MoeLayerParams<T> params = s.params();
  const gpu::MoeLayerGrads<T> grads = s.grads();
  const MatrixView<const T> x(s.x.template as<const T>(), tokens, d);
  const MatrixView<T> y(s.y.template as<T>(), tokens, d);
  const MatrixView<const T> dy(s.dy.template as<const T>(), tokens, d);
  const MatrixView<T> dx(s.dx.template as<T>(), tokens, d);
  gpu::MoeLayerStats<S> stats{};
  const auto run = [&] {
    (void)s.layer.forward(x, params, st, y, &stats, ws);
    if (backward) s.layer.backward(dy, x, params, st, dx, grads, ws);
  };
  run();  // warm-up; fills the state the ceiling and the experts read
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());

  // The ceiling: the experts' GEMMs dense, over the layer's dispatched rows
  // (expert 0's weights; the pre, gate and output buffers of the state).
  const index_t rows = st.host_offsets[E];  // T K: dropless
  const moekit_bench::DenseFfnGemms dense{st.buffer.data(),
                                          params.experts.w1.data(),
                                          params.experts.w3.data(),
                                          params.experts.w2.data(),
                                          st.saved_pre.data(),
                                          st.saved_gate.data(),
                                          st.expert_out.data(),
                                          rows,
                                          d,
                                          f};
  const double dense_rate = dense.rate(handle);

  double seconds = 0.0;
  for (auto _ : state) {
    const double t = moekit_bench::time_ms(run) * 1e-3;
    state.SetIterationTime(t);
    seconds += t;
  }
  const double layer_s = seconds / static_cast<double>(state.iterations());

  // The routed expert FFNs alone, on the buffer and offsets the layer left.
  const gpu::ExpertFfn<S, T> ffn(
      {.d_model = d, .d_ff = f, .kind = FfnKind::kGated, .activation = moekit::Activation::kSilu});
  const moekit::VectorView<const index_t> host_offsets = st.host_offsets;
  const MatrixView<T> buffer = st.buffer.middle_rows(0, rows);
  const MatrixView<T> out = st.expert_out.middle_rows(0, rows);
  const MatrixView<T> pre = st.saved_pre.middle_rows(0, rows);
  const MatrixView<T> gate = st.saved_gate.middle_rows(0, rows);
  DeviceMemory ffn_ws(ffn.workspace_size(rows)), d_buffer(backward ? bytes(rows, d) : 0);
  const auto experts = [&] {
    ffn.forward(handle, buffer, host_offsets, params.experts, out, pre, gate, ffn_ws.p,
                ffn_ws.bytes);
    if (backward) {
      ffn.backward(handle, out, buffer, host_offsets, params.experts, pre, gate,
                   {d_buffer.as<T>(), rows, d},
                   gpu::ExpertGrads<T>{grads.dw1, grads.dw3, grads.dw2}, ffn_ws.p, ffn_ws.bytes);
    }
  };
  experts();  // warm-up
  const double experts_s = seconds_each(experts, 10);
  const double held = static_cast<double>(free_before) - static_cast<double>(free_device_bytes());
  MOEKIT_CUBLAS_CHECK(cublasDestroy(handle));

  const double td = static_cast<double>(tokens) * static_cast<double>(d);
  const double expert_flops = (backward ? 3.0 : 1.0) * 6.0 * td * K * static_cast<double>(f);
  const double flops = expert_flops + (backward ? 3.0 : 1.0) * 2.0 * td * E;  // + the gate GEMM
  const double rate = flops / layer_s;
  state.counters["GFLOP"] = flops * 1e-9;
  state.counters["TFLOP/s"] = rate * 1e-12;
  state.counters["dense_TFLOP/s"] = dense_rate * 1e-12;
  state.counters["of_dense"] = rate / dense_rate;
  state.counters["experts_us"] = experts_s * 1e6;
  state.counters["experts_of_dense"] = expert_flops / experts_s / dense_rate;
  state.counters["other_share"] = std::max(0.0, 1.0 - experts_s / layer_s);
  state.counters["max_load"] = stats.routing.max_load_ratio();
  state.counters["mem_GiB"] = held / (1024.0 * 1024.0 * 1024.0);
  state.SetLabel(backward ? "fwd+bwd" : "fwd");
}

// bench_bench_layer as the class template register_expert_shapes wants.
template <int E, int K>
struct Bench {
  static void run(benchmark::State& s, index_t d, index_t f, bool backward) {
    bench_layer<E, K>(s, d, f, backward);
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (moekit_bench::no_device()) return 77;
  moekit_bench::register_expert_shapes<Bench>("layer");
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
