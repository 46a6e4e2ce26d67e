// Task heads, distillation and early-exit benchmarks (issue 5): H = 3 and
// H = 100 heads of 10 classes over T = 2048 samples of width d = 1024 (task ids
// shuffled, so rows are grouped by the counting sort), forward and
// forward + loss + backward, each beside a dense GEMM of the same FLOPs
// (T x d times d x 10: what one head over all samples costs) and the
// machine's large-SGEMM rate, all measured in this run; then the KD loss with
// gradient on T x 1000 logits and an early-exit step (decision and compaction
// of the activations) on T samples. The closing table gives the ratios.
//
// The cost of batch invariance (docs/determinism.md): at the system's sizes
// (T = 2048, d = 384, 4 heads of 2, 5, 11 and 20 classes), TaskHeads'
// forward (the row kernel) and forward + backward (the GEMM engine) beside
// the same work through Eigen's GEMMs as TaskHeads ran it before
// (heads_eigen, written out here), on task-sorted rows (no gather: the
// difference is the products); the library on shuffled rows too. Run with
// --benchmark_filter=invariance_ for that table alone, and --cpu_time to
// time in the process's CPU time (steadier on a shared machine).
#include <algorithm>
#include <array>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ceiling.hpp"
#include "inputs.hpp"
#include "moekit/cpu/distillation.hpp"
#include "moekit/cpu/early_exit.hpp"
#include "moekit/cpu/task_heads.hpp"
#include "summary.hpp"

namespace {

using moekit::index_t;
using moekit_bench::random_vector;

constexpr index_t kSamples = 2048;
constexpr index_t kModel = 1024;
constexpr index_t kClasses = 10;
constexpr index_t kVocab = 1000;  // distillation logits

// Forward FLOPs: every sample is scored by one head of kClasses classes.
constexpr double kHeadFlops = 2.0 * kSamples * kModel * kClasses;

template <int H>
struct HeadsInputs {
  using S = moekit::HeadSpec<H>;
  moekit::cpu::TaskHeads<S> heads;
  std::vector<float> x, w, b, logits, dlogits, dx, dw, db;
  std::vector<std::int32_t> tasks, labels;
  std::vector<std::byte> ws;

  static moekit::cpu::TaskHeadsConfig<S> config() {
    moekit::cpu::TaskHeadsConfig<S> c;
    c.d_model = kModel;
    c.classes.fill(kClasses);
    return c;
  }
  HeadsInputs()
      : heads(config()),
        x(random_vector(kSamples * kModel, 1.0f, 1)),
        w(random_vector(H * kClasses * kModel, 0.03f, 2)),
        b(H * kClasses, 0.0f),
        logits(kSamples * kClasses),
        dlogits(kSamples * kClasses),
        dx(kSamples * kModel),
        dw(H * kClasses * kModel),
        db(H * kClasses),
        ws(static_cast<std::size_t>(heads.workspace_size(kSamples))) {
    std::mt19937 rng(3);
    for (index_t i = 0; i < kSamples; ++i) {
      tasks.push_back(static_cast<std::int32_t>(i % H));
      labels.push_back(static_cast<std::int32_t>(rng() % kClasses));
    }
    std::shuffle(tasks.begin(), tasks.end(), rng);
  }
  moekit::cpu::HeadWeights weights() const {
    return {{w.data(), H * kClasses, kModel}, {b.data(), H * kClasses}};
  }
  moekit::VectorView<std::byte> workspace() { return {ws.data(), static_cast<index_t>(ws.size())}; }
};

template <int H>
void heads_forward(benchmark::State& state, int threads) {
  moekit_bench::set_threads(threads);
  HeadsInputs<H> in;
  for (auto _ : state) {
    in.heads.forward({in.x.data(), kSamples, kModel}, {in.tasks.data(), kSamples}, in.weights(),
                     {in.logits.data(), kSamples, kClasses}, in.workspace());
    benchmark::DoNotOptimize(in.logits.data());
  }
  moekit_bench::set_rate(state, kHeadFlops);
}

// forward, loss (per-task CE, accuracy, dlogits) and backward (dW, db, dx).
template <int H>
void heads_forward_backward(benchmark::State& state, int threads) {
  moekit_bench::set_threads(threads);
  HeadsInputs<H> in;
  const moekit::VectorView<const std::int32_t> tasks(in.tasks.data(), kSamples);
  for (auto _ : state) {
    in.heads.forward({in.x.data(), kSamples, kModel}, tasks, in.weights(),
                     {in.logits.data(), kSamples, kClasses}, in.workspace());
    const auto losses =
        in.heads.loss({in.logits.data(), kSamples, kClasses}, tasks, {in.labels.data(), kSamples},
                      {}, {in.dlogits.data(), kSamples, kClasses});
    benchmark::DoNotOptimize(losses.total);
    in.heads.backward({in.dlogits.data(), kSamples, kClasses}, {in.x.data(), kSamples, kModel},
                      tasks, in.weights(), {in.dx.data(), kSamples, kModel},
                      {{in.dw.data(), H * kClasses, kModel}, {in.db.data(), H * kClasses}},
                      in.workspace());
    benchmark::DoNotOptimize(in.dx.data());
  }
  // Forward GEMM plus the two backward GEMMs (dx, dW).
  moekit_bench::set_rate(state, 3 * kHeadFlops);
}

void kd_loss(benchmark::State& state, int threads) {
  moekit_bench::set_threads(threads);
  const std::vector<float> student = random_vector(kSamples * kVocab, 2.0f, 4);
  const std::vector<float> teacher = random_vector(kSamples * kVocab, 2.0f, 5);
  std::vector<float> grad(kSamples * kVocab);
  std::vector<std::int32_t> labels(kSamples);
  for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int32_t>(i % kVocab);
  for (auto _ : state) {
    const auto kd = moekit::cpu::distillation_loss(
        {.temperature = 2.0f, .alpha = 0.5f}, {student.data(), kSamples, kVocab},
        {teacher.data(), kSamples, kVocab}, {labels.data(), kSamples},
        {grad.data(), kSamples, kVocab});
    benchmark::DoNotOptimize(kd.loss);
  }
  // Reads both logit matrices, writes the gradient.
  state.counters["GB/s"] = benchmark::Counter(3.0 * kSamples * kVocab * sizeof(float) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

// One exit step on a full batch: decisions (confidence >= 0.5 exits about
// half the samples), then the d-wide activations of the rest compacted.
void exit_step(benchmark::State& state, int threads) {
  moekit_bench::set_threads(threads);
  const std::vector<float> logits = random_vector(kSamples * kClasses, 2.0f, 6);
  const std::vector<float> x0 = random_vector(kSamples * kModel, 1.0f, 7);
  std::vector<float> x(x0.size());
  std::vector<index_t> original(kSamples), kept(kSamples);
  std::vector<std::int32_t> previous(kSamples), agree(kSamples), prediction(kSamples),
      exit(kSamples);
  std::vector<float> confidence(kSamples);
  const moekit::cpu::EarlyExit exits({.criteria = {.min_confidence = 0.5f}, .num_exits = 4});
  const moekit::cpu::ExitState st{
      {original.data(), kSamples}, {previous.data(), kSamples}, {agree.data(), kSamples}};
  const moekit::cpu::ExitResults res{
      {prediction.data(), kSamples}, {confidence.data(), kSamples}, {exit.data(), kSamples}};
  index_t live = 0;
  for (auto _ : state) {
    state.PauseTiming();
    std::copy(x0.begin(), x0.end(), x.begin());
    exits.begin(kSamples, st, res);
    state.ResumeTiming();
    live = exits.step(0, {logits.data(), kSamples, kClasses}, st, res, {kept.data(), kSamples});
    moekit::cpu::compact_rows(moekit::MatrixView<float>(x.data(), kSamples, kModel),
                              {kept.data(), live});
    benchmark::DoNotOptimize(x.data());
  }
  state.counters["live"] = static_cast<double>(live);
}

// ---- the cost of batch invariance ------------------------------------------------

constexpr index_t kSystemModel = 384;
constexpr std::array<index_t, 4> kSystemClasses = {2, 5, 11, 20};

struct SystemHeads {
  using S = moekit::HeadSpec<4>;
  moekit::cpu::TaskHeads<S> heads;
  index_t n = kSamples, d = kSystemModel, c = 0, width = 0;
  std::vector<float> x, w, b, logits, dlogits, dx, dw, db;
  std::vector<std::int32_t> sorted, shuffled;
  std::vector<std::byte> ws;

  SystemHeads()
      : heads({.d_model = kSystemModel, .classes = kSystemClasses, .bias = true}),
        c(heads.total_classes()),
        width(heads.max_classes()),
        x(random_vector(kSamples * kSystemModel, 1.0f, 11)),
        w(random_vector(static_cast<std::size_t>(c * d), 0.05f, 12)),
        b(random_vector(static_cast<std::size_t>(c), 0.1f, 13)),
        logits(static_cast<std::size_t>(n * width)),
        dlogits(random_vector(static_cast<std::size_t>(n * width), 0.01f, 14)),
        dx(static_cast<std::size_t>(n * d)),
        dw(w.size()),
        db(b.size()),
        ws(static_cast<std::size_t>(heads.workspace_size(kSamples))) {
    for (index_t i = 0; i < n; ++i) sorted.push_back(static_cast<std::int32_t>(i * 4 / n));
    shuffled = sorted;
    std::mt19937 rng(15);
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
  }
  moekit::cpu::HeadWeights weights() const { return {{w.data(), c, d}, {b.data(), c}}; }
  moekit::cpu::HeadGrads grads() { return {{dw.data(), c, d}, {db.data(), c}}; }
  moekit::MatrixView<const float> xv() const { return {x.data(), n, d}; }
  moekit::MatrixView<float> logits_view() { return {logits.data(), n, width}; }
  moekit::MatrixView<float> dx_view() { return {dx.data(), n, d}; }
  moekit::VectorView<std::byte> workspace() { return {ws.data(), static_cast<index_t>(ws.size())}; }
};

// TaskHeads' forward (and backward) on task-sorted rows as it ran before the
// GEMM engine: one Eigen GEMM per head per product, heads in parallel with
// one-thread GEMMs when at least as many heads as threads average at most
// 1024 rows, else heads in turn with Eigen's parallel GEMMs.
void heads_eigen(SystemHeads& p, bool backward) {
  using moekit::as_eigen;
  using moekit::MatrixView;
  const auto& heads = p.heads;
  std::array<index_t, 5> first{};
  for (index_t i = 0; i < p.n; ++i)
    ++first[static_cast<std::size_t>(p.sorted[static_cast<std::size_t>(i)]) + 1];
  for (std::size_t h = 0; h < 4; ++h) first[h + 1] += first[h];
  const int threads = moekit::cpu::max_threads();
  const bool across = threads > 1 && 4 >= threads && p.n <= 4 * 1024;
  const auto run = [&](int h) {
    const index_t r0 = first[static_cast<std::size_t>(h)],
                  rows = first[static_cast<std::size_t>(h) + 1] - r0;
    const index_t ch = heads.classes(h), off = heads.class_offset(h);
    const auto wh = as_eigen(MatrixView<const float>(p.w.data() + off * p.d, ch, p.d));
    const auto xh = as_eigen(p.xv().middle_rows(r0, rows));
    auto z = as_eigen(p.logits_view().block(r0, 0, rows, ch));
    z.noalias() = xh * wh.transpose();
    z.rowwise() += as_eigen(moekit::VectorView<const float>(p.b.data() + off, ch)).transpose();
    if (!backward) return;
    const auto dz =
        as_eigen(MatrixView<const float>(p.dlogits.data(), p.n, p.width).block(r0, 0, rows, ch));
    as_eigen(MatrixView<float>(p.dw.data() + off * p.d, ch, p.d)).noalias() = dz.transpose() * xh;
    as_eigen(moekit::VectorView<float>(p.db.data() + off, ch)) = dz.colwise().sum().transpose();
    as_eigen(p.dx_view().middle_rows(r0, rows)).noalias() = dz * wh;
  };
  if (across) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (int h = 0; h < 4; ++h) run(h);
  } else {
    for (int h = 0; h < 4; ++h) run(h);
  }
  for (index_t i = 0; i < p.n; ++i) {
    float* row = p.logits.data() + i * p.width;
    for (index_t k = heads.classes(p.sorted[static_cast<std::size_t>(i)]); k < p.width; ++k)
      row[k] = -std::numeric_limits<float>::infinity();
  }
}

SystemHeads& system_heads() {
  static SystemHeads p;
  return p;
}

// kind: 0 Eigen (sorted rows), 1 moekit (sorted rows), 2 moekit (shuffled rows).
void invariance_heads(benchmark::State& state, int threads, int kind, bool backward) {
  moekit_bench::set_threads(threads);
  SystemHeads& p = system_heads();
  const std::vector<std::int32_t>& tasks = kind == 2 ? p.shuffled : p.sorted;
  const moekit::VectorView<const std::int32_t> tv(tasks.data(), p.n);
  for (auto _ : state) {
    if (kind == 0) {
      heads_eigen(p, backward);
    } else {
      p.heads.forward(p.xv(), tv, p.weights(), p.logits_view(), p.workspace());
      if (backward) {
        p.heads.backward({p.dlogits.data(), p.n, p.width}, p.xv(), tv, p.weights(), p.dx_view(),
                         p.grads(), p.workspace());
      }
    }
    benchmark::DoNotOptimize(p.logits.data());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * static_cast<double>(p.n) * static_cast<double>(p.d) * 38.0 / 4.0;
  moekit_bench::set_rate(state, backward ? 3 * flops : flops);
}

constexpr const char* kInvarianceKinds[] = {"eigen_sorted", "moekit_sorted", "moekit_shuffled"};

std::string run_name(const char* what, const char* config, int threads) {
  return std::string(what) + "/" + config + "/threads:" + std::to_string(threads);
}

struct Case {
  const char* name;
  void (*forward)(benchmark::State&, int);
  void (*forward_backward)(benchmark::State&, int);
};

}  // namespace

int main(int argc, char** argv) {
  // --cpu_time: every run timed in the process's CPU time (bench/summary.hpp).
  const bool cpu_time = moekit_bench::take_flag(argc, argv, "--cpu_time");
  const std::vector<Case> cases = {{"H3_C10", heads_forward<3>, heads_forward_backward<3>},
                                   {"H100_C10", heads_forward<100>, heads_forward_backward<100>}};
  // 2 threads first (see bench/routing.cpp: libgomp after 1-thread runs).
  const int thread_counts[] = {2, 1};
  auto reg = [cpu_time](const std::string& name, auto fn) {
    moekit_bench::add_ms(name, fn, cpu_time);
  };
  for (int threads : thread_counts) {
    reg(run_name("sgemm_ceiling", "n2048", threads),
        [threads](benchmark::State& s) { moekit_bench::sgemm(s, 2048, 2048, 2048, threads); });
    reg(run_name("dense_gemm", "T2048_d1024_C10", threads), [threads](benchmark::State& s) {
      moekit_bench::sgemm(s, kSamples, kClasses, kModel, threads);
    });
    for (const Case& c : cases) {
      auto* f = c.forward;
      auto* fb = c.forward_backward;
      reg(run_name("heads_forward", c.name, threads),
          [f, threads](benchmark::State& s) { f(s, threads); });
      reg(run_name("heads_forward_backward", c.name, threads),
          [fb, threads](benchmark::State& s) { fb(s, threads); });
    }
    reg(run_name("kd_loss", "T2048_C1000", threads),
        [threads](benchmark::State& s) { kd_loss(s, threads); });
    reg(run_name("exit_step", "T2048_d1024_C10", threads),
        [threads](benchmark::State& s) { exit_step(s, threads); });
    for (int kind = 0; kind < 3; ++kind) {
      for (const bool backward : {false, true}) {
        reg(run_name(backward ? "invariance_fb" : "invariance_fwd", kInvarianceKinds[kind],
                     threads),
            [threads, kind, backward](benchmark::State& s) {
              invariance_heads(s, threads, kind, backward);
            });
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  moekit_bench::RecordingReporter reporter(cpu_time);
  benchmark::RunSpecifiedBenchmarks(&reporter);

  // A run filtered out has no time: its cells print as "-".
  auto cell = [](double value, bool known) {
    if (!known) return std::string("-");
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3f", value);
    return std::string(buf);
  };
  std::printf("\n%-9s %3s %10s %9s %9s %9s %11s %9s %9s\n", "config", "thr", "SGEMM GF/s",
              "dense ms", "fwd ms", "fwd/dense", "fwd+bwd ms", "fb/dense", "fwd/ceil");
  for (int threads : thread_counts) {
    const double ceiling_s = reporter.seconds(run_name("sgemm_ceiling", "n2048", threads));
    const double ceiling = ceiling_s > 0 ? 2.0 * 2048 * 2048 * 2048 / ceiling_s * 1e-9 : 0.0;
    const double dense = reporter.seconds(run_name("dense_gemm", "T2048_d1024_C10", threads));
    for (const Case& c : cases) {
      const double fwd = reporter.seconds(run_name("heads_forward", c.name, threads));
      const double fb = reporter.seconds(run_name("heads_forward_backward", c.name, threads));
      if (fwd <= 0 && fb <= 0) continue;  // filtered out
      std::printf("%-9s %3d %10s %9s %9s %9s %11s %9s %9s\n", c.name, threads,
                  cell(ceiling, ceiling > 0).c_str(), cell(dense * 1e3, dense > 0).c_str(),
                  cell(fwd * 1e3, fwd > 0).c_str(), cell(fwd / dense, fwd > 0 && dense > 0).c_str(),
                  cell(fb * 1e3, fb > 0).c_str(),
                  cell(fb / (3 * dense), fb > 0 && dense > 0).c_str(),
                  cell(kHeadFlops / fwd * 1e-9 / ceiling, fwd > 0 && ceiling > 0).c_str());
    }
  }
  std::printf(
      "fwd/dense = heads forward time / one dense GEMM of the same FLOPs (1 = no grouping cost);\n"
      "fb/dense = forward + loss + backward / three such GEMMs\n");

  std::printf("\nbatch invariance: T = 2048, d = 384, heads of 2, 5, 11, 20 classes (ms)\n");
  std::printf("%-4s %3s %10s %10s %8s %12s\n", "", "thr", "Eigen", "moekit", "ratio",
              "moekit shuf");
  for (int threads : thread_counts) {
    for (const char* what : {"invariance_fwd", "invariance_fb"}) {
      const double eigen = reporter.seconds(run_name(what, kInvarianceKinds[0], threads));
      const double ours = reporter.seconds(run_name(what, kInvarianceKinds[1], threads));
      const double shuffled = reporter.seconds(run_name(what, kInvarianceKinds[2], threads));
      if (eigen <= 0 && ours <= 0) continue;  // filtered out
      std::printf("%-4s %3d %10s %10s %8s %12s\n",
                  std::string(what) == "invariance_fb" ? "fb" : "fwd", threads,
                  cell(eigen * 1e3, eigen > 0).c_str(), cell(ours * 1e3, ours > 0).c_str(),
                  cell(ours / eigen, ours > 0 && eigen > 0).c_str(),
                  cell(shuffled * 1e3, shuffled > 0).c_str());
    }
  }
  std::printf(
      "ratio = moekit / Eigen on task-sorted rows (above 1: what invariance costs); fb = forward "
      "+ backward (dW, db, dx); moekit shuf = on shuffled rows (grouping included)\n");
  return 0;
}
