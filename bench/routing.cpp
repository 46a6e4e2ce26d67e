// Router benchmarks (issue 3): C1 (T=2048 d=1024 E=8 K=2), C2 (E=64 K=8) and
// E=256 K=8, at 1 and 2 threads, each beside the GEMM of its logits alone and
// the machine's large-SGEMM rate, all measured in this run. The closing table
// gives the share of router time spent after the logits GEMM.
// Batch invariance (issue 25): the router's logits product, batch invariant
// (cpu::gate_logits, what Router::forward runs), beside the Eigen product it
// replaced (x w_gate^T through Eigen's GEMM, whose summation order depends
// on the batch's row count); the second table gives their ratio. The third
// does the same for the backward's two products, dx = dlogits w_gate and
// dw_gate = dlogits^T x (gate_input_gradient / gate_weight_gradient, what
// Router::backward_logits runs, beside the per-block Eigen GEMMs they replaced).
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "ceiling.hpp"
#include "moekit/cpu/aux_losses.hpp"
#include "moekit/cpu/router.hpp"
#include "summary.hpp"

namespace {

using moekit::index_t;
using moekit::MoeSpec;
using moekit::to_size;

constexpr index_t kTokens = 2048;
constexpr index_t kModel = 1024;

struct Inputs {
  std::vector<float> x, w, logits, scores, weights, dweights, dlogits, dx, dw;
  std::vector<std::int32_t> ids, positions;
  Inputs(int experts, int top_k)
      : x(kTokens * kModel),
        w(to_size(experts * kModel)),
        logits(to_size(kTokens * experts)),
        scores(to_size(kTokens * experts)),
        weights(to_size(kTokens * top_k)),
        dweights(to_size(kTokens * top_k), 1.0f),
        dlogits(to_size(kTokens * experts)),
        dx(kTokens * kModel),
        dw(to_size(experts * kModel)),
        ids(to_size(kTokens * top_k)),
        positions(to_size(kTokens * top_k)) {
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& v : x) v = normal(rng);
    for (float& v : w) v = 0.03f * normal(rng);
    for (float& v : dweights) v = normal(rng);
  }
  moekit::cpu::Routing routing(int experts, int top_k) {
    return {{logits.data(), kTokens, experts},
            {scores.data(), kTokens, experts},
            {ids.data(), kTokens, top_k},
            {weights.data(), kTokens, top_k},
            {positions.data(), kTokens, top_k}};
  }
};

double logits_flops(int experts) { return 2.0 * kTokens * kModel * experts; }

// The logits GEMM alone: the part of the router a dense layer would also pay.
void logits_gemm(benchmark::State& state, int experts, int threads) {
  moekit_bench::sgemm(state, kTokens, experts, kModel, threads);
}

// The logits product alone: the batch-invariant one Router::forward runs
// (gate_logits: the row kernel below 16 experts, the GEMM engine from 16 on),
// or the Eigen GEMM it replaced.
template <int E>
void logits_product(benchmark::State& state, bool invariant, int threads) {
  moekit_bench::set_threads(threads);
  Inputs in(E, 1);
  const moekit::MatrixView<const float> x(in.x.data(), kTokens, kModel), w(in.w.data(), E, kModel);
  const moekit::MatrixView<float> logits(in.logits.data(), kTokens, E);
  std::vector<std::byte> ws(to_size(moekit::cpu::gate_logits_workspace_size<E>(kModel)));
  for (auto _ : state) {
    if (invariant) {
      moekit::cpu::gate_logits<E>(x, w, logits, moekit::view_of(ws));
    } else {
      moekit::as_eigen(logits).noalias() = moekit::as_eigen(x) * moekit::as_eigen(w).transpose();
    }
    benchmark::DoNotOptimize(in.logits.data());
    benchmark::ClobberMemory();
  }
  moekit_bench::set_rate(state, logits_flops(E));
}

// The backward's products alone: dx = dlogits w_gate and dw_gate = dlogits^T x,
// as Router::backward_logits runs them, or as the Eigen GEMMs they replaced
// (per token block, dw_gate folded over the blocks).
template <int E>
void gradient_products(benchmark::State& state, bool invariant, int threads) {
  moekit_bench::set_threads(threads);
  Inputs in(E, 1);
  for (float& v : in.dlogits) v = 0.1f;
  const moekit::MatrixView<const float> x(in.x.data(), kTokens, kModel), w(in.w.data(), E, kModel),
      g(in.dlogits.data(), kTokens, E);
  const moekit::MatrixView<float> dx(in.dx.data(), kTokens, kModel), dw(in.dw.data(), E, kModel);
  std::vector<std::byte> ws(to_size(moekit::cpu::gate_logits_workspace_size<E>(kModel)));
  for (auto _ : state) {
    if (invariant) {
      moekit::cpu::gate_input_gradient<E>(g, w, dx, false, moekit::view_of(ws));
      moekit::cpu::gate_weight_gradient<E>(g, x, dw, false, moekit::view_of(ws));
    } else {
      moekit::for_each_token_block(kTokens, [&](index_t r0, index_t rows, index_t b) {
        const auto gb = moekit::as_eigen(g.middle_rows(r0, rows));
        moekit::as_eigen(dx.middle_rows(r0, rows)).noalias() = gb * moekit::as_eigen(w);
        auto dwe = moekit::as_eigen(dw);
        const auto xb = moekit::as_eigen(x.middle_rows(r0, rows));
        if (b > 0) {
          dwe.noalias() += gb.transpose() * xb;
        } else {
          dwe.noalias() = gb.transpose() * xb;
        }
      });
    }
    benchmark::DoNotOptimize(in.dx.data());
    benchmark::DoNotOptimize(in.dw.data());
    benchmark::ClobberMemory();
  }
  moekit_bench::set_rate(state, 2 * logits_flops(E));
}

template <class S>
moekit::cpu::RouterConfig config() {
  moekit::cpu::RouterConfig c;
  c.gating.renormalize = true;
  c.capacity.factor = 1.25f;
  return c;
}

// The balance losses every training step computes: Switch (aux) and z-loss.
// Their values come with the forward's statistics (as MoeLayer takes them);
// their gradients need a pass over the routing, added to dlogits.
template <class S>
double aux_loss_values(const moekit::cpu::RoutingStats<S>& stats) {
  return 1e-2 * moekit::cpu::switch_loss<S>(stats) + 1e-3 * stats.z_loss;
}

template <class S>
void add_aux_gradients(const moekit::cpu::Routing& r, moekit::MatrixView<float> dlogits) {
  moekit::cpu::switch_loss<S>(moekit::GatingRule::kSoftmaxTopK, r, {}, 1e-2f, dlogits);
  moekit::cpu::z_loss<S>(r, 1e-3f, dlogits);
}

template <class S>
void router_forward(benchmark::State& state, int threads) {
  constexpr int E = S::num_experts, K = S::top_k;
  moekit_bench::set_threads(threads);
  Inputs in(E, K);
  const moekit::cpu::Router<S> router(config<S>());
  moekit::cpu::RoutingStats<S> stats;
  std::vector<std::byte> ws(to_size(router.workspace_size(kTokens, kModel)));
  for (auto _ : state) {
    router.forward({in.x.data(), kTokens, kModel}, {in.w.data(), E, kModel}, {}, {},
                   in.routing(E, K), &stats, moekit::view_of(ws));
    benchmark::DoNotOptimize(aux_loss_values<S>(stats));
  }
  moekit_bench::set_rate(state, logits_flops(E));
}

// Gating, capacity, statistics and losses from ready logits: everything
// after the GEMM.
template <class S>
void router_gating(benchmark::State& state, int threads) {
  constexpr int E = S::num_experts, K = S::top_k;
  moekit_bench::set_threads(threads);
  Inputs in(E, K);
  const moekit::cpu::Router<S> router(config<S>());
  moekit::cpu::RoutingStats<S> stats;
  std::vector<std::byte> ws(to_size(router.workspace_size(kTokens, kModel)));
  router.forward({in.x.data(), kTokens, kModel}, {in.w.data(), E, kModel}, {}, {}, in.routing(E, K),
                 &stats, moekit::view_of(ws));
  for (auto _ : state) {
    router.route(in.routing(E, K), {}, &stats);
    benchmark::DoNotOptimize(aux_loss_values<S>(stats));
  }
}

template <class S>
void router_forward_backward(benchmark::State& state, int threads) {
  constexpr int E = S::num_experts, K = S::top_k;
  moekit_bench::set_threads(threads);
  Inputs in(E, K);
  const moekit::cpu::Router<S> router(config<S>());
  moekit::cpu::RoutingStats<S> stats;
  const moekit::cpu::RouterGrads grads{
      {in.dx.data(), kTokens, kModel}, {in.dw.data(), E, kModel}, {}, false};
  std::vector<std::byte> ws(to_size(router.workspace_size(kTokens, kModel)));
  for (auto _ : state) {
    const moekit::cpu::Routing r = in.routing(E, K);
    router.forward({in.x.data(), kTokens, kModel}, {in.w.data(), E, kModel}, {}, {}, r, &stats,
                   moekit::view_of(ws));
    router.backward_gate(r, {in.dweights.data(), kTokens, K}, {in.dlogits.data(), kTokens, E});
    benchmark::DoNotOptimize(aux_loss_values<S>(stats));
    add_aux_gradients<S>(r, {in.dlogits.data(), kTokens, E});
    router.backward_logits({in.x.data(), kTokens, kModel}, {in.w.data(), E, kModel},
                           {in.dlogits.data(), kTokens, E}, grads, moekit::view_of(ws));
    benchmark::DoNotOptimize(in.dx.data());
  }
  // Forward GEMM plus the two backward GEMMs (dx, dw_gate).
  moekit_bench::set_rate(state, 3 * logits_flops(E));
}

struct Case {
  const char* name;
  int experts;
  void (*forward)(benchmark::State&, int);
  void (*gating)(benchmark::State&, int);
  void (*forward_backward)(benchmark::State&, int);
  void (*logits)(benchmark::State&, bool, int);
  void (*gradients)(benchmark::State&, bool, int);
};

template <class S>
Case make_case(const char* name) {
  return {name,
          S::num_experts,
          router_forward<S>,
          router_gating<S>,
          router_forward_backward<S>,
          logits_product<S::num_experts>,
          gradient_products<S::num_experts>};
}

std::string run_name(const char* what, const char* config, int threads) {
  return std::string(what) + "/" + config + "/threads:" + std::to_string(threads);
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<Case> cases = {make_case<MoeSpec<8, 2>>("C1_E8_K2"),
                                   make_case<MoeSpec<64, 8>>("C2_E64_K8"),
                                   make_case<MoeSpec<256, 8>>("E256_K8")};
  // 2 threads first: after 1-thread runs, libgomp's 2-thread Eigen GEMMs ran
  // ~40% slower for the rest of the process on the reference machine.
  const int thread_counts[] = {2, 1};
  for (int threads : thread_counts) {
    benchmark::RegisterBenchmark(
        run_name("sgemm_ceiling", "n2048", threads).c_str(),
        [threads](benchmark::State& s) { moekit_bench::sgemm(s, 2048, 2048, 2048, threads); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    for (const Case& c : cases) {
      const int e = c.experts;
      benchmark::RegisterBenchmark(
          run_name("logits_gemm", c.name, threads).c_str(),
          [e, threads](benchmark::State& s) { logits_gemm(s, e, threads); })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
      auto* f = c.forward;
      auto* g = c.gating;
      auto* fb = c.forward_backward;
      benchmark::RegisterBenchmark(run_name("router_forward", c.name, threads).c_str(),
                                   [f, threads](benchmark::State& s) { f(s, threads); })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
      benchmark::RegisterBenchmark(run_name("router_gating", c.name, threads).c_str(),
                                   [g, threads](benchmark::State& s) { g(s, threads); })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
      benchmark::RegisterBenchmark(run_name("router_forward_backward", c.name, threads).c_str(),
                                   [fb, threads](benchmark::State& s) { fb(s, threads); })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
      auto* l = c.logits;
      for (const bool invariant : {false, true}) {
        benchmark::RegisterBenchmark(
            run_name(invariant ? "logits_invariant" : "logits_eigen", c.name, threads).c_str(),
            [l, invariant, threads](benchmark::State& s) { l(s, invariant, threads); })
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
        auto* gp = c.gradients;
        benchmark::RegisterBenchmark(
            run_name(invariant ? "gradients_invariant" : "gradients_eigen", c.name, threads)
                .c_str(),
            [gp, invariant, threads](benchmark::State& s) { gp(s, invariant, threads); })
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  moekit_bench::RecordingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);

  std::printf("\n%-10s %3s %10s %9s %9s %9s %8s %10s %9s\n", "config", "thr", "SGEMM GF/s",
              "gemm ms", "fwd ms", "gating ms", "gating%", "fwd+bwd ms", "gemm/ceil");
  for (int threads : thread_counts) {
    const double ceiling_s = reporter.seconds(run_name("sgemm_ceiling", "n2048", threads));
    const double ceiling = ceiling_s > 0 ? 2.0 * 2048 * 2048 * 2048 / ceiling_s * 1e-9 : 0.0;
    for (const Case& c : cases) {
      const double gemm = reporter.seconds(run_name("logits_gemm", c.name, threads));
      const double fwd = reporter.seconds(run_name("router_forward", c.name, threads));
      const double gating = reporter.seconds(run_name("router_gating", c.name, threads));
      const double fb = reporter.seconds(run_name("router_forward_backward", c.name, threads));
      if (gemm <= 0 || fwd <= 0) continue;  // filtered out
      std::printf("%-10s %3d %10.1f %9.3f %9.3f %9.3f %7.1f%% %10.3f %9.2f\n", c.name, threads,
                  ceiling, gemm * 1e3, fwd * 1e3, gating * 1e3, 100.0 * gating / fwd, fb * 1e3,
                  ceiling > 0 ? logits_flops(c.experts) / gemm * 1e-9 / ceiling : 0.0);
    }
  }
  std::printf(
      "gating%% = (gating, capacity, stats, Switch and z losses after the logits GEMM) / "
      "(whole forward)\n");

  std::printf("\n%-10s %3s %12s %14s %8s %16s\n", "config", "thr", "eigen ms", "invariant ms",
              "ratio", "fwd cost vs eigen");
  for (int threads : thread_counts) {
    for (const Case& c : cases) {
      const double eigen = reporter.seconds(run_name("logits_eigen", c.name, threads));
      const double inv = reporter.seconds(run_name("logits_invariant", c.name, threads));
      const double fwd = reporter.seconds(run_name("router_forward", c.name, threads));
      if (eigen <= 0 || inv <= 0) continue;  // filtered out
      const double cost = fwd > 0 ? 100.0 * (inv - eigen) / (fwd - inv + eigen) : 0.0;
      std::printf("%-10s %3d %12.3f %14.3f %8.2f %15.1f%%\n", c.name, threads, eigen * 1e3,
                  inv * 1e3, inv / eigen, cost);
    }
  }
  std::printf(
      "ratio = invariant / Eigen logits product; fwd cost = the router forward's time with the "
      "invariant product over its time with the Eigen one, minus 1\n");

  std::printf("\n%-10s %3s %12s %14s %8s\n", "config", "thr", "eigen ms", "invariant ms", "ratio");
  for (int threads : thread_counts) {
    for (const Case& c : cases) {
      const double eigen = reporter.seconds(run_name("gradients_eigen", c.name, threads));
      const double inv = reporter.seconds(run_name("gradients_invariant", c.name, threads));
      if (eigen <= 0 || inv <= 0) continue;  // filtered out
      std::printf("%-10s %3d %12.3f %14.3f %8.2f\n", c.name, threads, eigen * 1e3, inv * 1e3,
                  inv / eigen);
    }
  }
  std::printf(
      "backward products dx = dlogits w_gate and dw_gate = dlogits^T x: ratio = Router's "
      "(row kernels below 16 experts, engine from 16) / the per-block Eigen GEMMs\n");
  return 0;
}
