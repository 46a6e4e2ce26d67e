// The CPU backend's element-wise passes (cpu/elementwise.hpp) beside the same
// run's copy bandwidth, and their share of the C1 MoE layer (T=2048 d=1024
// d_ff=4096 E=8 K=2, SwiGLU, dropless), at 2 and 1 threads:
//   copy            a parallel memcpy of the pass's bytes: the ceiling of a
//                   memory-bound pass (GB/s, read + write counted);
//   swiglu_fwd      h = SiLU(a) * g over the layer's T K rows, experts in
//                   parallel as ExpertFfn runs them (vec: the vector pass;
//                   scalar: the scalar loop over core/activation.hpp that
//                   cpu::detail::activate_rows ran before it);
//   swiglu_bwd      dg = dh SiLU(a), da = dh g SiLU'(a), vec and scalar;
//   layer_fwd, layer_fwd_bwd   the C1 layer itself (vector passes inside);
//   ce_rows, kd_rows, router_softmax   cross-entropy (2048 rows x 1000
//                   classes), distillation (same) and the router's softmax
//                   (T rows of E = 8), vec and scalar (classify:: and the
//                   scalar routing rule).
// The closing table gives each pass's GB/s and its fraction of the copy
// rate, and the element-wise share of the layer: after = vec pass time /
// layer time; before = scalar pass time / (layer time - vec + scalar), the
// layer as it ran with the scalar loops (the rest of the layer unchanged).
// Run quietly, repeated:
//   bench_elementwise --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ceiling.hpp"
#include "inputs.hpp"
#include "moekit/core/classification.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/cpu/elementwise.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "summary.hpp"

namespace {

using moekit::Activation;
using moekit::index_t;
using moekit::MatrixView;
using moekit_bench::random_vector;
using S = moekit::MoeSpec<8, 2>;

constexpr index_t kTokens = 2048, kModel = 1024, kFf = 4096;
constexpr int kExperts = 8, kTopK = 2;
constexpr index_t kRows = kTokens * kTopK;  // dropless: every token's K rows
constexpr index_t kClasses = 1000;

void set_bytes(benchmark::State& state, double bytes) {
  state.counters["GB/s"] =
      benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// memcpy of `bytes` split over the threads (the ceiling of a pass moving them).
void parallel_copy(benchmark::State& state, std::size_t bytes, int threads) {
  moekit_bench::set_threads(threads);
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  const auto parts = static_cast<std::ptrdiff_t>(threads);
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel for num_threads(threads)
#endif
    for (std::ptrdiff_t p = 0; p < parts; ++p) {
      const std::size_t begin =
          bytes * static_cast<std::size_t>(p) / static_cast<std::size_t>(parts);
      const std::size_t end =
          bytes * static_cast<std::size_t>(p + 1) / static_cast<std::size_t>(parts);
      std::memcpy(dst.data() + begin, src.data() + begin, end - begin);
    }
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 2.0 * static_cast<double>(bytes));
}

// The SwiGLU middle over kRows rows in kExperts equal blocks, experts in parallel.
struct SwigluBuffers {
  std::vector<float> a = random_vector(static_cast<std::size_t>(kRows * kFf), 2.0f, 1);
  std::vector<float> g = random_vector(static_cast<std::size_t>(kRows * kFf), 1.0f, 2);
  std::vector<float> h = std::vector<float>(static_cast<std::size_t>(kRows * kFf));
  std::vector<float> dg = std::vector<float>(static_cast<std::size_t>(kRows * kFf));
  MatrixView<float> view(std::vector<float>& v, int e) const {
    const index_t rows = kRows / kExperts;
    return {v.data() + e * rows * kFf, rows, kFf};
  }
};

template <class Body>
void for_experts(Body&& body) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1)
#endif
  for (int e = 0; e < kExperts; ++e) body(e);
}

void swiglu(benchmark::State& state, bool backward, bool vec, int threads) {
  moekit_bench::set_threads(threads);
  SwigluBuffers b;
  const Activation act = Activation::kSilu;
  for (auto _ : state) {
    for_experts([&](int e) {
      const MatrixView<const float> a = b.view(b.a, e), g = b.view(b.g, e);
      const MatrixView<float> h = b.view(b.h, e), dg = b.view(b.dg, e);
      if (vec) {
        if (backward) {
          moekit::cpu::activation_rows_backward(act, a, g, h, dg);
        } else {
          moekit::cpu::activation_rows(act, a, g, h);
        }
        return;
      }
      for (index_t i = 0; i < a.rows(); ++i) {  // the scalar loop the passes replaced
        for (index_t j = 0; j < kFf; ++j) {
          if (backward) {
            const float dh = h(i, j);
            dg(i, j) = dh * moekit::activate(act, a(i, j));
            h(i, j) = dh * g(i, j) * moekit::activate_grad(act, a(i, j));
          } else {
            h(i, j) = moekit::activate(act, a(i, j)) * g(i, j);
          }
        }
      }
    });
    benchmark::DoNotOptimize(b.h.data());
    benchmark::ClobberMemory();
  }
  // forward reads a, g and writes h; backward reads a, g, dh, writes da, dg
  set_bytes(state, (backward ? 5.0 : 3.0) * 4.0 * static_cast<double>(kRows * kFf));
}

// Row losses over kTokens rows of kClasses logits, rows in parallel.
void row_losses(benchmark::State& state, bool distill, bool vec, int threads) {
  moekit_bench::set_threads(threads);
  const std::vector<float> z = random_vector(static_cast<std::size_t>(kTokens * kClasses), 3.0f, 3);
  const std::vector<float> t = random_vector(z.size(), 3.0f, 4);
  std::vector<float> dz(z.size());
  for (auto _ : state) {
    double sum = 0.0;
#if defined(_OPENMP)
#pragma omp parallel for reduction(+ : sum)
#endif
    for (index_t i = 0; i < kTokens; ++i) {
      const float* zi = z.data() + i * kClasses;
      const float* ti = t.data() + i * kClasses;
      float* di = dz.data() + i * kClasses;
      const int y = static_cast<int>(i % kClasses);
      if (distill) {
        const moekit::classify::DistillationTerms r =
            vec ? moekit::cpu::distillation_row(zi, ti, kClasses, y, 2.0f, 0.5f, 1.0f, di)
                : moekit::classify::distillation_row(zi, ti, kClasses, y, 2.0f, 0.5f, 1.0f, di);
        sum += r.kl + r.ce;
      } else {
        sum += vec ? moekit::cpu::cross_entropy_row(zi, kClasses, y, 1.0f, di)
                   : moekit::classify::cross_entropy_row(zi, kClasses, y, 1.0f, di);
      }
    }
    benchmark::DoNotOptimize(sum);
    benchmark::ClobberMemory();
  }
  set_bytes(state, (distill ? 3.0 : 2.0) * 4.0 * static_cast<double>(kTokens * kClasses));
}

// The router's softmax over kTokens rows of E = 8 logits (shifted_exp), and
// the scalar rule it replaced (routing::compute_scores).
void router_softmax(benchmark::State& state, bool vec, int threads) {
  moekit_bench::set_threads(threads);
  const std::vector<float> x = random_vector(static_cast<std::size_t>(kTokens * kExperts), 1.0f, 5);
  std::vector<float> s(x.size());
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel for
#endif
    for (index_t t = 0; t < kTokens; ++t) {
      const float* xt = x.data() + t * kExperts;
      float* st = s.data() + t * kExperts;
      if (vec) {
        const moekit::cpu::ShiftedExp z = moekit::cpu::shifted_exp<kExperts>(xt, st);
        for (int e = 0; e < kExperts; ++e) st[e] /= z.sum;
      } else {
        moekit::routing::compute_scores<kExperts>(moekit::GatingRule::kSoftmaxTopK, xt, st);
      }
    }
    benchmark::DoNotOptimize(s.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 2.0 * 4.0 * static_cast<double>(kTokens * kExperts));
}

// The C1 layer, SwiGLU, dropless, forward (and backward).
void layer(benchmark::State& state, bool backward, int threads) {
  moekit_bench::set_threads(threads);
  moekit::cpu::MoeLayerConfig config{.d_model = kModel,
                                     .d_ff = kFf,
                                     .kind = moekit::FfnKind::kGated,
                                     .activation = Activation::kSilu,
                                     .switch_coeff = 1e-2f,
                                     .z_coeff = 1e-3f};
  config.router.gating.renormalize = true;
  const moekit::cpu::MoeLayer<S> moe(config);
  moekit::cpu::MoeLayerStorage<S> storage(moe, kTokens);
  const auto n = [](index_t v) { return static_cast<std::size_t>(v); };
  const std::vector<float> x = random_vector(n(kTokens * kModel), 1.0f, 6);
  const std::vector<float> dy = random_vector(n(kTokens * kModel), 1.0f, 7);
  const std::vector<float> wg = random_vector(n(kExperts * kModel), 0.02f, 8);
  const std::vector<float> w1 = random_vector(n(kExperts * kFf * kModel), 0.02f, 9);
  const std::vector<float> w3 = random_vector(w1.size(), 0.02f, 10);
  const std::vector<float> w2 = random_vector(w1.size(), 0.02f, 11);
  std::vector<float> y(x.size()), dx(x.size()), dwg(wg.size()), dw1(w1.size()), dw3(w1.size()),
      dw2(w1.size());
  const moekit::cpu::MoeLayerParams p{.w_gate = {wg.data(), kExperts, kModel},
                                      .experts = {{w1.data(), kExperts * kFf, kModel},
                                                  {w3.data(), kExperts * kFf, kModel},
                                                  {w2.data(), kExperts * kModel, kFf}}};
  const moekit::cpu::MoeLayerGrads grads{.dw_gate = {dwg.data(), kExperts, kModel},
                                         .dw1 = {dw1.data(), kExperts * kFf, kModel},
                                         .dw3 = {dw3.data(), kExperts * kFf, kModel},
                                         .dw2 = {dw2.data(), kExperts * kModel, kFf}};
  const MatrixView<const float> in(x.data(), kTokens, kModel);
  for (auto _ : state) {
    benchmark::DoNotOptimize(moe.forward(in, p, storage.state(), {y.data(), kTokens, kModel},
                                         nullptr, storage.workspace())
                                 .total);
    if (backward) {
      moe.backward({dy.data(), kTokens, kModel}, in, p, storage.state(),
                   {dx.data(), kTokens, kModel}, grads, storage.workspace());
    }
    benchmark::ClobberMemory();
  }
}

std::string run_name(const std::string& what, int threads) {
  return what + "/threads:" + std::to_string(threads);
}

}  // namespace

int main(int argc, char** argv) {
  const int thread_counts[] = {2, 1};  // 2 first (see bench/routing.cpp: libgomp after 1 thread)
  const auto pass_bytes = static_cast<std::size_t>(kRows * kFf) * 4;
  for (int th : thread_counts) {
    moekit_bench::add_wall_ms(run_name("copy/C1_pass", th),
                              [=](benchmark::State& s) { parallel_copy(s, pass_bytes, th); });
    for (bool vec : {true, false}) {
      const std::string kind = vec ? "/vec" : "/scalar";
      moekit_bench::add_wall_ms(run_name("swiglu_fwd" + kind, th),
                                [=](benchmark::State& s) { swiglu(s, false, vec, th); });
      moekit_bench::add_wall_ms(run_name("swiglu_bwd" + kind, th),
                                [=](benchmark::State& s) { swiglu(s, true, vec, th); });
      moekit_bench::add_wall_ms(run_name("ce_rows" + kind, th),
                                [=](benchmark::State& s) { row_losses(s, false, vec, th); });
      moekit_bench::add_wall_ms(run_name("kd_rows" + kind, th),
                                [=](benchmark::State& s) { row_losses(s, true, vec, th); });
      moekit_bench::add_wall_ms(run_name("router_softmax" + kind, th),
                                [=](benchmark::State& s) { router_softmax(s, vec, th); });
    }
    moekit_bench::add_wall_ms(run_name("layer_fwd/C1", th),
                              [=](benchmark::State& s) { layer(s, false, th); });
    moekit_bench::add_wall_ms(run_name("layer_fwd_bwd/C1", th),
                              [=](benchmark::State& s) { layer(s, true, th); });
  }
  benchmark::AddCustomContext("cpu_path", moekit::cpu::isa_name(moekit::cpu::active_isa()));
  benchmark::Initialize(&argc, argv);
  moekit_bench::RecordingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);

  const auto gbs = [](double bytes, double sec) { return sec > 0 ? bytes * 1e-9 / sec : 0.0; };
  const double f_elems = static_cast<double>(kRows * kFf);
  std::printf("\nCPU path: %s\n", moekit::cpu::isa_name(moekit::cpu::active_isa()));
  std::printf("%-16s %3s %9s %9s %7s %9s %7s %8s\n", "pass", "thr", "vec ms", "vec GB/s", "/copy",
              "scalar ms", "speedup", "copy GB/s");
  struct Pass {
    const char* name;
    double bytes;
  };
  const Pass passes[] = {{"swiglu_fwd", 12.0 * f_elems},
                         {"swiglu_bwd", 20.0 * f_elems},
                         {"ce_rows", 8.0 * kTokens * kClasses},
                         {"kd_rows", 12.0 * kTokens * kClasses},
                         {"router_softmax", 8.0 * kTokens * kExperts}};
  for (int th : thread_counts) {
    const double copy = reporter.seconds(run_name("copy/C1_pass", th));
    const double copy_gbs = gbs(2.0 * static_cast<double>(pass_bytes), copy);
    for (const Pass& p : passes) {
      const double v = reporter.seconds(run_name(std::string(p.name) + "/vec", th));
      const double sc = reporter.seconds(run_name(std::string(p.name) + "/scalar", th));
      if (v <= 0) continue;
      std::printf("%-16s %3d %9.3f %9.2f %6.0f%% %9.3f %6.2fx %8.2f\n", p.name, th, v * 1e3,
                  gbs(p.bytes, v), copy > 0 ? 100.0 * gbs(p.bytes, v) / copy_gbs : 0.0, sc * 1e3,
                  sc > 0 ? sc / v : 0.0, copy_gbs);
    }
  }
  std::printf(
      "\nelement-wise share of the C1 layer (SwiGLU passes; before = with the scalar loops)\n");
  std::printf("%-14s %3s %9s %9s %9s %8s %8s\n", "layer", "thr", "layer ms", "vec ms", "scalar ms",
              "after", "before");
  for (int th : thread_counts) {
    const double fwd_v = reporter.seconds(run_name("swiglu_fwd/vec", th));
    const double fwd_s = reporter.seconds(run_name("swiglu_fwd/scalar", th));
    const double bwd_v = reporter.seconds(run_name("swiglu_bwd/vec", th));
    const double bwd_s = reporter.seconds(run_name("swiglu_bwd/scalar", th));
    // forward: one pass; forward + backward: forward, h again for dW2, backward
    const struct {
      const char* name;
      double layer, vec, scalar;
    } rows[] = {{"layer_fwd", reporter.seconds(run_name("layer_fwd/C1", th)), fwd_v, fwd_s},
                {"layer_fwd_bwd", reporter.seconds(run_name("layer_fwd_bwd/C1", th)),
                 2.0 * fwd_v + bwd_v, 2.0 * fwd_s + bwd_s}};
    for (const auto& r : rows) {
      if (r.layer <= 0 || r.vec <= 0 || r.scalar <= 0) continue;
      const double before_layer = r.layer - r.vec + r.scalar;
      std::printf("%-14s %3d %9.1f %9.2f %9.2f %7.1f%% %7.1f%%\n", r.name, th, r.layer * 1e3,
                  r.vec * 1e3, r.scalar * 1e3, 100.0 * r.vec / r.layer,
                  100.0 * r.scalar / before_layer);
    }
  }
  return 0;
}
