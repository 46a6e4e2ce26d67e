// MoE layer benchmarks (issue 4): C1 (T=2048 d=1024 d_ff=4096 E=8 K=2), C2
// (d_ff=512 E=64 K=8) and C3 (T=512 d=512 d_ff=1024 E=8 K=2), SwiGLU experts,
// dropless, at 2 and 1 threads. Beside each, in the same run:
//   dense_gemm        the three GEMMs of a dense SwiGLU FFN over the same T K
//                     rows: the same FLOPs as the experts, as one matrix each
//                     (the rate the grouped expert GEMMs aim at);
//   dense_same_params a dense SwiGLU FFN of width E d_ff over the T tokens:
//                     the same total parameters as the experts, E/K times
//                     their FLOPs (the "active vs total" claim, measured).
// The expert FFNs run on moekit's GEMM engine (moekit/cpu/gemm/): experts_fwd
// is the training forward (fp32, weights packed per call), experts_fwd_<dtype>
// the inference forward on weights packed once in fp32, bf16 or int8
// (ExpertFfn::pack); layer_fwd_bf16 and layer_fwd_bwd_bf16 train the layer
// with the experts' products in bf16 (MoeLayerConfig::compute, fp32 master
// weights). The closing table gives the experts' rate as a fraction
// of the dense GEMM rate, and the share of the layer's time spent outside the
// expert FFNs (router GEMM and gating, dispatch, combine, aux losses; timed on
// its own).
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "ceiling.hpp"
#include "inputs.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "summary.hpp"

namespace {

using moekit::FfnKind;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::to_size;
using moekit::cpu::FfnThreading;
using moekit::cpu::GemmDtype;
using moekit_bench::random_vector;
using moekit_bench::RowMatrix;
using moekit_bench::set_rate;

struct Shape {
  const char* name;
  index_t tokens, d_model, d_ff;
  int experts, top_k;
  double expert_flops() const {  // forward, dropless: 3 GEMMs over T K rows
    return 6.0 * static_cast<double>(tokens * top_k) * static_cast<double>(d_model) *
           static_cast<double>(d_ff);
  }
  double dense_flops() const { return expert_flops() * experts / top_k; }
};

// The layer, its parameters, state and gradients for one shape.
template <class S>
struct Setup {
  static constexpr int E = S::num_experts, K = S::top_k;
  Shape shape;
  moekit::cpu::MoeLayer<S> layer;
  moekit::cpu::MoeLayerStorage<S> storage;
  std::vector<float> x, y, dy, dx, w_gate, w1, w3, w2, dw_gate, dw1, dw3, dw2;

  static moekit::cpu::MoeLayerConfig config(const Shape& s, FfnThreading threading,
                                            GemmDtype compute) {
    moekit::cpu::MoeLayerConfig c{.d_model = s.d_model,
                                  .d_ff = s.d_ff,
                                  .kind = FfnKind::kGated,
                                  .activation = moekit::Activation::kSilu,
                                  .switch_coeff = 1e-2f,
                                  .z_coeff = 1e-3f,
                                  .threading = threading,
                                  .compute = compute};
    c.router.gating.renormalize = true;  // Mixtral: softmax -> top-k -> renormalise; dropless
    return c;
  }

  // compute: the expert FFNs' products in training (fp32, or bf16 from fp32
  // master weights).
  Setup(const Shape& s, FfnThreading threading, GemmDtype compute = GemmDtype::kFloat32)
      : shape(s), layer(config(s, threading, compute)), storage(layer, s.tokens) {
    const index_t T = s.tokens, d = s.d_model, f = s.d_ff;
    x.resize(to_size(T * d));
    y.resize(to_size(T * d));
    dy.resize(to_size(T * d));
    dx.resize(to_size(T * d));
    w_gate.resize(to_size(E * d));
    w1.resize(to_size(E * f * d));
    w3.resize(to_size(E * f * d));
    w2.resize(to_size(E * d * f));
    x = random_vector(x.size(), 1.0f, 1);
    dy = random_vector(dy.size(), 1.0f, 2);
    w_gate =
        random_vector(w_gate.size(), 0.02f, 3);  // near-uniform routing, as after balance training
    w1 = random_vector(w1.size(), 0.02f, 4);
    w3 = random_vector(w3.size(), 0.02f, 5);
    w2 = random_vector(w2.size(), 0.02f, 6);
  }

  moekit::cpu::MoeLayerParams params() const {
    const index_t d = shape.d_model, f = shape.d_ff;
    return {.w_gate = {w_gate.data(), E, d},
            .experts = {{w1.data(), E * f, d}, {w3.data(), E * f, d}, {w2.data(), E * d, f}}};
  }

  void allocate_grads() {
    dw_gate.resize(w_gate.size());
    dw1.resize(w1.size());
    dw3.resize(w3.size());
    dw2.resize(w2.size());
  }

  moekit::cpu::MoeLayerGrads grads() {
    const index_t d = shape.d_model, f = shape.d_ff;
    return {.dw_gate = {dw_gate.data(), E, d},
            .dw1 = {dw1.data(), E * f, d},
            .dw3 = {dw3.data(), E * f, d},
            .dw2 = {dw2.data(), E * d, f}};
  }

  MatrixView<const float> in() const { return {x.data(), shape.tokens, shape.d_model}; }

  moekit::cpu::MoeAuxLosses forward(moekit::cpu::RoutingStats<S>* stats = nullptr) {
    return layer.forward(in(), params(), storage.state(), {y.data(), shape.tokens, shape.d_model},
                         stats, storage.workspace());
  }

  void backward() {
    layer.backward({dy.data(), shape.tokens, shape.d_model}, in(), params(), storage.state(),
                   {dx.data(), shape.tokens, shape.d_model}, grads(), storage.workspace());
  }
};

// The three GEMMs of a dense SwiGLU FFN over `rows` rows, without the
// element-wise part: a = x W1^T, g = x W3^T, y = h W2^T (W row-major like
// the experts' weights).
void dense_gemms(benchmark::State& state, index_t rows, index_t d, index_t f, int threads) {
  moekit_bench::set_threads(threads);
  const RowMatrix x = RowMatrix::Random(rows, d);
  const RowMatrix w1 = RowMatrix::Random(f, d), w3 = RowMatrix::Random(f, d);
  const RowMatrix w2 = RowMatrix::Random(d, f);
  RowMatrix a(rows, f), g(rows, f), y(rows, d);
  for (auto _ : state) {
    a.noalias() = x * w1.transpose();
    g.noalias() = x * w3.transpose();
    y.noalias() = a * w2.transpose();
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_rate(state,
           6.0 * static_cast<double>(rows) * static_cast<double>(d) * static_cast<double>(f));
}

// A dense SwiGLU FFN of width E d_ff over the T tokens, activation included.
void dense_same_params(benchmark::State& state, const Shape& s, int threads) {
  moekit_bench::set_threads(threads);
  const index_t f = s.d_ff * s.experts;
  const RowMatrix x = RowMatrix::Random(s.tokens, s.d_model);
  const RowMatrix w1 = RowMatrix::Random(f, s.d_model) * 0.02f;
  const RowMatrix w3 = RowMatrix::Random(f, s.d_model) * 0.02f;
  const RowMatrix w2 = RowMatrix::Random(s.d_model, f) * 0.02f;
  RowMatrix a(s.tokens, f), g(s.tokens, f), y(s.tokens, s.d_model);
  for (auto _ : state) {
    a.noalias() = x * w1.transpose();
    g.noalias() = x * w3.transpose();
    a.array() = a.array() / (1.0f + (-a.array()).exp()) * g.array();  // SiLU(a) * g
    y.noalias() = a * w2.transpose();
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_rate(state, s.dense_flops());
}

// The routed expert FFNs alone, on the buffer a layer forward dispatched: the
// training forward (fp32, saves kept) or, with a packed dtype, the inference
// forward on weights packed once.
enum class ExpertsRun { kTraining, kPackedFloat32, kPackedBfloat16, kPackedInt8 };

template <class S>
void experts_forward(benchmark::State& state, const Shape& s, ExpertsRun run, int threads) {
  moekit_bench::set_threads(threads);
  Setup<S> setup(s, FfnThreading::kAuto);
  setup.forward();
  const moekit::cpu::MoeLayerState st = setup.storage.state();
  const index_t n = st.offsets[S::num_experts];
  const moekit::cpu::ExpertFfn<S> ffn({.d_model = s.d_model,
                                       .d_ff = s.d_ff,
                                       .kind = FfnKind::kGated,
                                       .activation = moekit::Activation::kSilu});
  std::vector<std::byte> ws(static_cast<std::size_t>(ffn.workspace_size(n)) + 4);
  const auto ws_view = moekit::VectorView<std::byte>(ws.data(), ffn.workspace_size(n));
  using moekit::cpu::GemmDtype;
  const GemmDtype dtype = run == ExpertsRun::kPackedBfloat16 ? GemmDtype::kBfloat16
                          : run == ExpertsRun::kPackedInt8   ? GemmDtype::kInt8
                                                             : GemmDtype::kFloat32;
  moekit::cpu::PackedExpertWeights packed;
  if (run != ExpertsRun::kTraining) packed = ffn.pack(setup.params().experts, dtype);
  for (auto _ : state) {
    if (run == ExpertsRun::kTraining) {
      ffn.forward(st.buffer.middle_rows(0, n), st.offsets, setup.params().experts,
                  st.expert_out.middle_rows(0, n), st.saved_pre.middle_rows(0, n),
                  st.saved_gate.middle_rows(0, n), ws_view);
    } else {
      ffn.forward(st.buffer.middle_rows(0, n), st.offsets, packed, st.expert_out.middle_rows(0, n),
                  ws_view);
    }
    benchmark::DoNotOptimize(st.expert_out.data());
  }
  set_rate(state, s.expert_flops());
  state.SetLabel(moekit::cpu::gemm_kernel_name(dtype));
}

template <class S>
void layer_forward(benchmark::State& state, const Shape& s, GemmDtype compute, int threads) {
  moekit_bench::set_threads(threads);
  Setup<S> setup(s, FfnThreading::kAuto, compute);
  moekit::cpu::RoutingStats<S> stats;
  for (auto _ : state) benchmark::DoNotOptimize(setup.forward(&stats).total);
  set_rate(state, s.expert_flops());
  state.counters["max_load"] = stats.max_load_ratio();
}

// Everything of the layer forward but the expert FFNs: the router (GEMM,
// gating, statistics and the aux-loss values), offsets, dispatch and combine,
// on the layer's own state. Measured directly: the difference of two whole-
// layer timings is within their noise.
template <class S>
void layer_overhead(benchmark::State& state, const Shape& s, int threads) {
  moekit_bench::set_threads(threads);
  Setup<S> setup(s, FfnThreading::kAuto);
  setup.forward();
  const moekit::cpu::MoeLayerState st = setup.storage.state();
  const moekit::cpu::MoeLayerParams p = setup.params();
  const moekit::cpu::Routing& r = st.routing;
  const MatrixView<float> y(setup.y.data(), s.tokens, s.d_model);
  moekit::cpu::RoutingStats<S> stats;
  for (auto _ : state) {
    setup.layer.router().forward(setup.in(), p.w_gate, {}, {}, r, &stats);
    benchmark::DoNotOptimize(moekit::cpu::switch_loss<S>(stats) + stats.z_loss);
    const index_t n = moekit::cpu::dispatch_offsets<S>(r, st.offsets);
    moekit::cpu::dispatch<S>(setup.in(), r, st.offsets, st.buffer.middle_rows(0, n));
    moekit::cpu::combine<S>(st.expert_out.middle_rows(0, n), r, st.offsets, y);
    benchmark::DoNotOptimize(setup.y.data());
  }
}

template <class S>
void layer_forward_backward(benchmark::State& state, const Shape& s, GemmDtype compute,
                            int threads) {
  moekit_bench::set_threads(threads);
  Setup<S> setup(s, FfnThreading::kAuto, compute);
  setup.allocate_grads();
  for (auto _ : state) {
    benchmark::DoNotOptimize(setup.forward().total);
    setup.backward();
    benchmark::DoNotOptimize(setup.dx.data());
  }
  set_rate(state, 3.0 * s.expert_flops());  // backward: dX and dW GEMMs, twice forward's
}

struct Case {
  Shape shape;
  void (*experts)(benchmark::State&, const Shape&, ExpertsRun, int);
  void (*forward)(benchmark::State&, const Shape&, GemmDtype, int);
  void (*overhead)(benchmark::State&, const Shape&, int);
  void (*forward_backward)(benchmark::State&, const Shape&, GemmDtype, int);
};

template <class S>
Case make_case(const char* name, index_t tokens, index_t d, index_t f) {
  return {{name, tokens, d, f, S::num_experts, S::top_k},
          experts_forward<S>,
          layer_forward<S>,
          layer_overhead<S>,
          layer_forward_backward<S>};
}

std::string run_name(const std::string& what, const char* config, int threads) {
  return what + "/" + config + "/threads:" + std::to_string(threads);
}

const char* experts_name(ExpertsRun r) {
  return r == ExpertsRun::kTraining         ? "experts_fwd"
         : r == ExpertsRun::kPackedFloat32  ? "experts_fwd_fp32"
         : r == ExpertsRun::kPackedBfloat16 ? "experts_fwd_bf16"
                                            : "experts_fwd_int8";
}

void add(const std::string& name, std::function<void(benchmark::State&)> f) {
  benchmark::RegisterBenchmark(name.c_str(), std::move(f))
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<Case> cases = {make_case<MoeSpec<8, 2>>("C1_E8_K2", 2048, 1024, 4096),
                                   make_case<MoeSpec<64, 8>>("C2_E64_K8", 2048, 1024, 512),
                                   make_case<MoeSpec<8, 2>>("C3_E8_K2", 512, 512, 1024)};
  // 2 threads first (see bench/routing.cpp: libgomp after 1-thread runs).
  const int thread_counts[] = {2, 1};
  for (int threads : thread_counts) {
    add(run_name("sgemm_ceiling", "n2048", threads),
        [threads](benchmark::State& s) { moekit_bench::sgemm(s, 2048, 2048, 2048, threads); });
    for (const Case& c : cases) {
      const Shape sh = c.shape;
      add(run_name("dense_gemm", sh.name, threads), [sh, threads](benchmark::State& s) {
        dense_gemms(s, sh.tokens * sh.top_k, sh.d_model, sh.d_ff, threads);
      });
      for (ExpertsRun r : {ExpertsRun::kTraining, ExpertsRun::kPackedFloat32,
                           ExpertsRun::kPackedBfloat16, ExpertsRun::kPackedInt8}) {
        add(run_name(experts_name(r), sh.name, threads),
            [c, r, threads](benchmark::State& s) { c.experts(s, c.shape, r, threads); });
      }
      for (GemmDtype compute : {GemmDtype::kFloat32, GemmDtype::kBfloat16}) {
        const std::string suffix = compute == GemmDtype::kFloat32 ? "" : "_bf16";
        add(run_name("layer_fwd" + suffix, sh.name, threads),
            [c, compute, threads](benchmark::State& s) {
              c.forward(s, c.shape, compute, threads);
            });
        add(run_name("layer_fwd_bwd" + suffix, sh.name, threads),
            [c, compute, threads](benchmark::State& s) {
              c.forward_backward(s, c.shape, compute, threads);
            });
      }
      add(run_name("layer_overhead", sh.name, threads),
          [c, threads](benchmark::State& s) { c.overhead(s, c.shape, threads); });
      add(run_name("dense_same_params", sh.name, threads),
          [sh, threads](benchmark::State& s) { dense_same_params(s, sh, threads); });
    }
  }
#if defined(MOEKIT_BENCH_BLAS)
  benchmark::AddCustomContext("gemm", MOEKIT_BENCH_BLAS " through EIGEN_USE_BLAS");
  std::printf("GEMMs: %s through EIGEN_USE_BLAS\n", MOEKIT_BENCH_BLAS);
#else
  benchmark::AddCustomContext("gemm", "Eigen");
#endif
  benchmark::Initialize(&argc, argv);
  moekit_bench::RecordingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);

  std::printf("\n%-10s %3s %8s %9s %9s %6s %9s %7s %10s %9s %6s %10s %7s\n", "config", "thr",
              "SGEMM", "dense", "experts", "ratio", "layer", "other", "fwd+bwd", "fwd+bwd", "ratio",
              "same-param", "speedup");
  std::printf("%-10s %3s %8s %9s %9s %6s %9s %7s %10s %9s %6s %10s %7s\n", "", "", "GF/s", "GF/s",
              "GF/s", "", "fwd ms", "%", "ms", "GF/s", "", "dense ms", "");
  for (int threads : thread_counts) {
    const double sgemm = reporter.seconds(run_name("sgemm_ceiling", "n2048", threads));
    for (const Case& c : cases) {
      const Shape& s = c.shape;
      const double dense = reporter.seconds(run_name("dense_gemm", s.name, threads));
      const double experts = reporter.seconds(run_name("experts_fwd", s.name, threads));
      const double fwd = reporter.seconds(run_name("layer_fwd", s.name, threads));
      const double other = reporter.seconds(run_name("layer_overhead", s.name, threads));
      const double fb = reporter.seconds(run_name("layer_fwd_bwd", s.name, threads));
      const double same = reporter.seconds(run_name("dense_same_params", s.name, threads));
      if (dense <= 0 || experts <= 0 || fwd <= 0) continue;  // filtered out
      const double gf = 1e-9 * s.expert_flops();
      std::printf(
          "%-10s %3d %8.1f %9.1f %9.1f %6.2f %9.2f %6.1f%% %10.2f %9.1f %6.2f %10.2f %6.1fx\n",
          s.name, threads, sgemm > 0 ? 2.0 * 2048 * 2048 * 2048 * 1e-9 / sgemm : 0.0, gf / dense,
          gf / experts, dense / experts, fwd * 1e3, other > 0 ? 100.0 * other / fwd : 0.0,
          fb > 0 ? fb * 1e3 : 0.0, fb > 0 ? 3.0 * gf / fb : 0.0,
          fb > 0 ? 3.0 * gf / fb / (gf / dense) : 0.0, same > 0 ? same * 1e3 : 0.0,
          same > 0 ? same / fwd : 0.0);
    }
  }
  std::printf(
      "dense = the experts' three GEMMs as one dense matrix each (same FLOPs); ratio = experts "
      "(or fwd+bwd) rate / dense rate; other = router, dispatch, combine and aux-loss values "
      "(timed alone) / layer fwd; same-param dense = dense SwiGLU FFN of width E d_ff "
      "(E/K x the FLOPs); speedup = its time / layer fwd\n");

  // The experts' forward per dtype on the GEMM engine (int8: GOP/s).
  std::printf("\n%-10s %3s %9s %9s %9s %9s   kernels: fp32 %s, bf16 %s, int8 %s\n", "config", "thr",
              "train", "fp32", "bf16", "int8", moekit::cpu::gemm_kernel_name(GemmDtype::kFloat32),
              moekit::cpu::gemm_kernel_name(GemmDtype::kBfloat16),
              moekit::cpu::gemm_kernel_name(GemmDtype::kInt8));
  for (int threads : thread_counts) {
    for (const Case& c : cases) {
      const double gf = 1e-9 * c.shape.expert_flops();
      double rate[4] = {};
      int i = 0;
      for (ExpertsRun r : {ExpertsRun::kTraining, ExpertsRun::kPackedFloat32,
                           ExpertsRun::kPackedBfloat16, ExpertsRun::kPackedInt8}) {
        const double sec = reporter.seconds(run_name(experts_name(r), c.shape.name, threads));
        rate[i++] = sec > 0 ? gf / sec : 0.0;
      }
      if (rate[0] <= 0) continue;
      std::printf("%-10s %3d %9.1f %9.1f %9.1f %9.1f\n", c.shape.name, threads, rate[0], rate[1],
                  rate[2], rate[3]);
    }
  }
  std::printf(
      "train = fp32 forward with saves, weights packed per call; fp32 / bf16 / int8 = "
      "inference forward on weights packed once (GFLOP/s, int8 GOP/s)\n");

  // Training with the experts' products in bf16 beside fp32 (ms).
  std::printf("\n%-10s %3s %9s %9s %9s %9s\n", "config", "thr", "fwd fp32", "fwd bf16", "f+b fp32",
              "f+b bf16");
  for (int threads : thread_counts) {
    for (const Case& c : cases) {
      double t[4] = {};
      int i = 0;
      for (const char* what :
           {"layer_fwd", "layer_fwd_bf16", "layer_fwd_bwd", "layer_fwd_bwd_bf16"})
        t[i++] = 1e3 * reporter.seconds(run_name(what, c.shape.name, threads));
      if (t[1] <= 0 && t[3] <= 0) continue;
      std::printf("%-10s %3d %9.2f %9.2f %9.2f %9.2f\n", c.shape.name, threads, t[0], t[1], t[2],
                  t[3]);
    }
  }
  std::printf(
      "layer forward (fwd) and forward + backward (f+b), ms: the experts' products in fp32 "
      "or in bf16 from fp32 master weights (MoeLayerConfig::compute)\n");
  return 0;
}
