// GPU routing benchmarks: gpu::route (gating + statistics), the aux losses
// and the dispatch plan for T = 16384 and 65536 tokens at (E, K) = (8, 2),
// (64, 8), (256, 8), then dispatch + combine of d = 1024 rows, all timed with
// CUDA events. Each reports its achieved GB/s (the bytes it must move at
// least, over its time) beside a device-to-device copy of as many bytes
// measured in the same benchmark, and the ratio (goal for the gating pass:
// >= 0.6). c1_share sets the whole routing + permutation beside cuBLAS GEMMs
// of the expert FLOPs at C1 scaled to T = 16384 (goal: <= 0.1).
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

#include "cuda_common.cuh"
#include "moekit/cuda/aux_losses.cuh"
#include "moekit/cuda/device.cuh"
#include "moekit/cuda/dispatch.cuh"
#include "moekit/cuda/router.cuh"

namespace {

using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::VectorView;
namespace gpu = moekit::gpu;

using moekit_bench::copy_gbps;
using moekit_bench::DeviceMemory;
using moekit_bench::time_ms;

template <class T>
T* upload_logits(DeviceMemory& m, index_t tokens, int experts) {
  std::vector<T> host(static_cast<std::size_t>(tokens) * experts);
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (T& v : host) v = static_cast<T>(normal(gen));
  MOEKIT_CUDA_CHECK(cudaMemcpy(m.p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return m.as<T>();
}

// The routing of T tokens on the device: gating, the Switch and z losses
// with their gradients, and the dropless dispatch plan, each one call.
template <int E, int K, class T>
struct RoutingPipeline {
  using S = MoeSpec<E, K>;
  index_t tokens;
  std::size_t te, tk;
  DeviceMemory logits, scores, ids, weights, dlogits, stats, loss, positions, offsets, row_slots;
  gpu::RouteArgs<S, T> route;
  gpu::SwitchLossArgs<S, T> sw;
  gpu::ZLossArgs<S, T> z;
  gpu::DispatchPlanArgs<S> plan;
  std::size_t b_route = 0, b_switch = 0, b_z = 0, b_plan = 0;
  DeviceMemory* workspace = nullptr;

  explicit RoutingPipeline(index_t t)
      : tokens(t),
        te(static_cast<std::size_t>(t) * E),
        tk(static_cast<std::size_t>(t) * K),
        logits(te * sizeof(T)),
        scores(te * 4),
        ids(tk * 4),
        weights(tk * 4),
        dlogits(te * 4),
        stats(sizeof(gpu::RoutingStats<S>)),
        loss(2 * sizeof(double)),
        positions(tk * 4),
        offsets((E + 1) * sizeof(index_t)),
        row_slots(tk * 4) {
    upload_logits<T>(logits, tokens, E);
    route.logits = {logits.as<const T>(), tokens, E};
    route.gating.renormalize = true;
    route.scores = {scores.as<float>(), tokens, E};
    route.expert_ids = {ids.as<std::int32_t>(), tokens, K};
    route.weights = {weights.as<float>(), tokens, K};
    route.stats = stats.as<gpu::RoutingStats<S>>();
    sw.logits = route.logits;
    sw.scores = route.scores;
    sw.expert_ids = route.expert_ids;
    sw.coeff = 1e-2f;
    sw.loss = loss.as<double>();
    sw.dlogits = {dlogits.as<float>(), tokens, E};
    z.logits = route.logits;
    z.coeff = 1e-3f;
    z.loss = loss.as<double>() + 1;
    z.dlogits = sw.dlogits;
    plan.expert_ids = route.expert_ids;
    plan.weights = route.weights;
    plan.positions = {positions.as<std::int32_t>(), tokens, K};
    plan.offsets = {offsets.as<index_t>(), E + 1};
    plan.row_slots = {row_slots.as<std::int32_t>(), static_cast<index_t>(tk)};
    MOEKIT_CUDA_CHECK(gpu::route(nullptr, b_route, route));
    MOEKIT_CUDA_CHECK(gpu::switch_loss(nullptr, b_switch, sw));
    MOEKIT_CUDA_CHECK(gpu::z_loss(nullptr, b_z, z));
    MOEKIT_CUDA_CHECK(gpu::plan_dispatch(nullptr, b_plan, plan));
    workspace = new DeviceMemory(std::max({b_route, b_switch, b_z, b_plan}));
  }
  RoutingPipeline(const RoutingPipeline&) = delete;
  RoutingPipeline& operator=(const RoutingPipeline&) = delete;
  ~RoutingPipeline() { delete workspace; }

  void run(bool aux, bool permute) {
    MOEKIT_CUDA_CHECK(gpu::route(workspace->p, b_route, route));
    if (aux) {
      MOEKIT_CUDA_CHECK(gpu::switch_loss(workspace->p, b_switch, sw));
      MOEKIT_CUDA_CHECK(gpu::z_loss(workspace->p, b_z, z));
    }
    if (permute) MOEKIT_CUDA_CHECK(gpu::plan_dispatch(workspace->p, b_plan, plan));
  }

  // The least traffic. route reads the logits and writes scores, ids and
  // weights; the Switch loss reads scores and ids, then logits, scores and
  // dlogits for the gradient, writing dlogits; the z-loss reads logits and
  // reads and writes dlogits; the plan reads the ids twice (count, number)
  // and writes positions and row_slots.
  double bytes(bool aux, bool permute) const {
    double b = static_cast<double>(te * sizeof(T) + te * 4 + tk * 8);
    if (aux) {
      b += static_cast<double>(te * 4 + tk * 4);                   // switch: statistics
      b += static_cast<double>(te * sizeof(T) + te * 4 + te * 8);  // switch: gradient
      b += static_cast<double>(te * sizeof(T) + te * 8);           // z-loss
    }
    if (permute) b += static_cast<double>(tk * 4 * 4);
    return b;
  }
};

// Sets GB/s, the same run's copy bandwidth for as many bytes, and the ratio.
void report_bandwidth(benchmark::State& state, double bytes, double seconds) {
  state.counters["GB/s"] =
      benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  const double ceiling = copy_gbps(static_cast<std::size_t>(bytes / 2));
  state.counters["copy_GB/s"] = ceiling;
  const double achieved =
      seconds > 0.0 ? bytes * static_cast<double>(state.iterations()) / seconds * 1e-9 : 0.0;
  state.counters["of_copy"] = ceiling > 0.0 ? achieved / ceiling : 0.0;
}

// Times `run` once per iteration with CUDA events (after one warm-up);
// returns the total seconds.
template <class F>
double time_iterations(benchmark::State& state, F&& run) {
  run();
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  double seconds = 0.0;
  for (auto _ : state) {
    const double t = time_ms(run) * 1e-3;
    state.SetIterationTime(t);
    seconds += t;
  }
  return seconds;
}

// route; route + Switch + z; route + Switch + z + the dispatch plan.
template <int E, int K, class T>
void bench_routing(benchmark::State& state, bool aux, bool permute) {
  RoutingPipeline<E, K, T> p(state.range(0));
  const double seconds = time_iterations(state, [&] { p.run(aux, permute); });
  report_bandwidth(state, p.bytes(aux, permute), seconds);
  state.SetLabel(permute ? "route+switch+z+plan" : (aux ? "route+switch+z" : "route"));
}

// Dispatch of x (T x d) into the expert-major buffer and the weighted
// combine back, on a plan made once: the row traffic the expert FFNs wrap.
template <int E, int K, class T>
void bench_dispatch_combine(benchmark::State& state) {
  using S = MoeSpec<E, K>;
  const index_t d = state.range(1);
  RoutingPipeline<E, K, T> p(state.range(0));
  p.run(false, true);
  const std::size_t row_bytes = static_cast<std::size_t>(d) * sizeof(T);
  DeviceMemory x(static_cast<std::size_t>(p.tokens) * row_bytes), y(x.bytes),
      buffer(p.tk * row_bytes);
  const MatrixView<const T> xv(x.as<const T>(), p.tokens, d);
  const MatrixView<T> bv(buffer.as<T>(), static_cast<index_t>(p.tk), d);
  const MatrixView<T> yv(y.as<T>(), p.tokens, d);
  const VectorView<const index_t> offsets(p.plan.offsets.data(), E + 1);
  const double seconds = time_iterations(state, [&] {
    MOEKIT_CUDA_CHECK(gpu::dispatch<S, T>(xv, p.plan.dispatch_map(), bv));
    MOEKIT_CUDA_CHECK(
        gpu::combine<S, T>(bv, p.plan.expert_ids, p.plan.weights, p.plan.positions, offsets, yv));
  });
  // dispatch reads x and writes T K rows; combine reads them and writes y.
  const double rows = static_cast<double>(p.tokens) * (2.0 + 2.0 * K);
  report_bandwidth(state, rows * static_cast<double>(row_bytes), seconds);
  state.SetLabel("dispatch+combine");
}

// The routing + permutation share of an MoE layer at C1 (docs/index.md#benchmark-sizes) scaled
// to T tokens: route + Switch + z + plan + dispatch + combine, over the
// same run's cuBLAS bf16 GEMMs of the experts' FLOPs (T K rows through
// d x d_ff and back: 4 T K d d_ff). Goal: at most 0.10.
void bench_c1_share(benchmark::State& state) {
  constexpr int E = 8, K = 2;
  using T = __nv_bfloat16;
  using S = MoeSpec<E, K>;
  const index_t tokens = state.range(0), d = 1024, d_ff = 4096;
  RoutingPipeline<E, K, T> p(tokens);
  const index_t rows = tokens * K;
  DeviceMemory x(static_cast<std::size_t>(tokens * d) * 2), y(x.bytes),
      buffer(static_cast<std::size_t>(rows * d) * 2),
      hidden(static_cast<std::size_t>(rows * d_ff) * 2), w1(static_cast<std::size_t>(d * d_ff) * 2),
      w2(w1.bytes);
  const MatrixView<const T> xv(x.as<const T>(), tokens, d);
  const MatrixView<T> bv(buffer.as<T>(), rows, d);
  const MatrixView<T> yv(y.as<T>(), tokens, d);
  const VectorView<const index_t> offsets(p.plan.offsets.data(), E + 1);
  const auto routing = [&] {
    p.run(true, true);
    MOEKIT_CUDA_CHECK(gpu::dispatch<S, T>(xv, p.plan.dispatch_map(), bv));
    MOEKIT_CUDA_CHECK(
        gpu::combine<S, T>(bv, p.plan.expert_ids, p.plan.weights, p.plan.positions, offsets, yv));
  };
  cublasHandle_t handle;
  MOEKIT_CUBLAS_CHECK(cublasCreate(&handle));
  const float one = 1.0f, zero = 0.0f;
  const int m = static_cast<int>(rows), n = static_cast<int>(d), f = static_cast<int>(d_ff);
  const auto gemms = [&] {  // column-major: hidden^T = w1^T buffer^T, out^T = w2^T hidden^T
    MOEKIT_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, f, m, n, &one, w1.p,
                                     CUDA_R_16BF, n, buffer.p, CUDA_R_16BF, n, &zero, hidden.p,
                                     CUDA_R_16BF, f, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    MOEKIT_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, f, &one, w2.p,
                                     CUDA_R_16BF, f, hidden.p, CUDA_R_16BF, f, &zero, buffer.p,
                                     CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  };
  const double gemm_s = moekit_bench::seconds_per_call(gemms, 10);
  const double seconds = time_iterations(state, routing);
  MOEKIT_CUBLAS_CHECK(cublasDestroy(handle));
  const double routing_s = seconds / static_cast<double>(state.iterations());
  const double flops = 4.0 * static_cast<double>(rows) * static_cast<double>(d * d_ff);
  state.counters["routing_us"] = routing_s * 1e6;
  state.counters["gemm_us"] = gemm_s * 1e6;
  state.counters["gemm_TFLOP/s"] = flops / gemm_s * 1e-12;
  state.counters["share"] = routing_s / gemm_s;
  state.SetLabel("C1 bf16: routing+permutation / expert GEMMs");
}

template <int E, int K, class T>
void register_pair(const char* name) {
  const char* stages[] = {"route/", "route_aux/", "route_aux_plan/"};
  for (int stage = 0; stage < 3; ++stage) {
    const std::string full = std::string(stages[stage]) + name;
    benchmark::RegisterBenchmark(
        full.c_str(),
        [stage](benchmark::State& s) { bench_routing<E, K, T>(s, stage >= 1, stage >= 2); })
        ->Arg(16384)
        ->Arg(65536)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (moekit_bench::no_device()) return 77;
  register_pair<8, 2, float>("E8_K2_fp32");
  register_pair<64, 8, float>("E64_K8_fp32");
  register_pair<256, 8, float>("E256_K8_fp32");
  register_pair<8, 2, __nv_bfloat16>("E8_K2_bf16");
  register_pair<64, 8, __nv_bfloat16>("E64_K8_bf16");
  register_pair<256, 8, __nv_bfloat16>("E256_K8_bf16");
  benchmark::RegisterBenchmark("dispatch_combine/E8_K2_bf16",
                               bench_dispatch_combine<8, 2, __nv_bfloat16>)
      ->Args({16384, 1024})
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("dispatch_combine/E64_K8_bf16",
                               bench_dispatch_combine<64, 8, __nv_bfloat16>)
      ->Args({16384, 1024})
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("c1_share", bench_c1_share)
      ->Arg(16384)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
