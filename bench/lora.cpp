// LoRA benchmarks (issue 5): T=2048, d_in = d_out = 4096, R = 8 and 64, at 2
// and 1 threads, measured in this run beside
//   - the machine's large-SGEMM rate (the ceiling),
//   - the frozen base layer alone (y = x W^T; in training also dx = dy W),
//   - a single adapter on all rows (LoraBank with N = 1: consecutive rows).
// LoraLinear forward and forward+backward are reported as overhead over the
// base layer (goal: R = 8 adds at most 5%); LoraBank with 8 and 64 adapters
// (random ids, every row adapted, so each segment's rows are scattered) as a
// ratio to the single adapter over the same rows (goal: at most 1.15x), for
// the adapter part alone and with the base layer included, beside the ratio
// of the bytes the forward must move (x once, y twice, each adapter's a and b
// once): a floor for the time ratio where the single adapter is bound by
// memory, as at R = 8. Also LoRA on experts
// (ExpertLora, R = 8, adapters on W1, W3 and W2) at C1 sizes (T = 2048,
// d = 1024, d_ff = 4096, E = 8, K = 2, gated SiLU, balanced experts) forward,
// beside the frozen expert FFNs alone (ExpertFfn) on the same buffer.
//
// The cost of batch invariance (docs/determinism.md): at the system's sizes
// (T = 2048, d_in = d_out = 384 and 1024, R = 8), LoraLinear and LoraBank
// with its base (N = 8, random ids), whose dense products run on the GEMM
// engine, beside the same work through Eigen's GEMMs as they ran before
// (written out here: lora_eigen). Run with --benchmark_filter=invariance_
// for that table alone, and --cpu_time to time in the process's CPU time
// (steadier on a shared machine).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <random>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "ceiling.hpp"
#include "inputs.hpp"
#include "moekit/cpu/expert_ffn.hpp"
#include "moekit/cpu/expert_lora.hpp"
#include "moekit/cpu/lora.hpp"
#include "summary.hpp"

namespace {

using moekit::index_t;
using moekit::LoraSpec;
using moekit::MatrixView;
using moekit_bench::random_vector;
using moekit_bench::set_rate;

constexpr index_t kTokens = 2048;
constexpr index_t kDim = 4096;

std::size_t sz(index_t n) { return static_cast<std::size_t>(n); }

// Activations in 2 MiB pages where the kernel grants them (Linux: transparent
// huge pages on request), as a serving process would keep its batch buffers.
// With 4 KiB pages, rows scattered over 32 MiB miss the TLB on every row, and
// how much that costs depends on where the pages happen to lie: the bank
// ratios then moved by up to 0.3x from one process to the next.
template <class T>
struct HugePages {
  using value_type = T;
  static constexpr std::size_t kPage = std::size_t{2} << 20;
  HugePages() = default;
  template <class U>
  explicit HugePages(const HugePages<U>&) {}
  T* allocate(std::size_t n) {
    const std::size_t bytes = (n * sizeof(T) + kPage - 1) / kPage * kPage;
    void* p = std::aligned_alloc(kPage, bytes);
    if (p == nullptr) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // a request; 4 KiB pages if refused
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <class U>
  bool operator==(const HugePages<U>&) const {
    return true;
  }
};
using Activations = std::vector<float, HugePages<float>>;

Activations random_activations(std::size_t n, unsigned seed) {
  const std::vector<float> v = random_vector(n, 1.0f, seed);
  return Activations(v.begin(), v.end());
}

// Inputs shared by every run of one process (built once: 4096^2 weights).
struct Data {
  Activations x;
  std::vector<float> w;
  Activations dy, y, dx;
  Data()
      : x(random_activations(sz(kTokens * kDim), 1)),
        w(random_vector(sz(kDim * kDim), 0.015f, 2)),
        dy(random_activations(sz(kTokens * kDim), 3)),
        y(sz(kTokens * kDim)),
        dx(sz(kTokens * kDim)) {}
  MatrixView<const float> xv() const { return {x.data(), kTokens, kDim}; }
  MatrixView<const float> wv() const { return {w.data(), kDim, kDim}; }
  MatrixView<const float> dyv() const { return {dy.data(), kTokens, kDim}; }
  MatrixView<float> yv() { return {y.data(), kTokens, kDim}; }
  MatrixView<float> dxv() { return {dx.data(), kTokens, kDim}; }
};

Data& data() {
  static Data d;
  return d;
}

double gemm_flops() { return 2.0 * kTokens * kDim * kDim; }
double adapter_flops(int rank) { return 2.0 * kTokens * rank * (kDim + kDim); }

// The frozen base layer alone: y = x W^T (and dx = dy W with `backward`),
// on the GEMM engine in fp32 as LoraLinear runs it.
void base_layer(benchmark::State& state, int threads, bool backward) {
  moekit_bench::set_threads(threads);
  Data& d = data();
  using moekit::cpu::Op;
  std::vector<std::byte> ws(sz(moekit::cpu::gemm_workspace_size(threads)));
  const moekit::VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
  for (auto _ : state) {
    moekit::cpu::gemm({.op_a = Op::kNone, .op_b = Op::kTrans}, d.xv(), d.wv(), d.yv(), wv);
    if (backward) moekit::cpu::gemm({}, d.dyv(), d.wv(), d.dxv(), wv);
    benchmark::DoNotOptimize(d.y.data());
    benchmark::ClobberMemory();
  }
  set_rate(state, (backward ? 2 : 1) * gemm_flops());
}

template <int R>
void lora_linear(benchmark::State& state, int threads, bool backward) {
  moekit_bench::set_threads(threads);
  Data& d = data();
  const moekit::cpu::LoraLinear<LoraSpec<R>> lora({.d_in = kDim, .d_out = kDim, .alpha = 16.0f});
  std::vector<float> a(sz(R * kDim)), b = random_vector(sz(kDim * R), 0.01f, 4), h(sz(kTokens * R)),
                                      da(a.size()), db(b.size());
  lora.init({a.data(), R, kDim}, {db.data(), kDim, R}, {.seed = 5});  // b stays random
  const moekit::cpu::LoraWeights weights{
      .w = d.wv(), .a = {a.data(), R, kDim}, .b = {b.data(), kDim, R}};
  std::vector<std::byte> ws(sz(lora.workspace_size(kTokens)));
  const moekit::VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
  const moekit::cpu::LoraStep step{.training = backward};
  const MatrixView<float> hv =
      backward ? MatrixView<float>(h.data(), kTokens, R) : MatrixView<float>();
  for (auto _ : state) {
    lora.forward(d.xv(), weights, d.yv(), hv, step, wv);
    if (backward) {
      lora.backward(d.dyv(), d.xv(), weights, hv, step, d.dxv(),
                    {.da = {da.data(), R, kDim}, .db = {db.data(), kDim, R}}, wv);
    }
    benchmark::DoNotOptimize(d.y.data());
    benchmark::ClobberMemory();
  }
  // Base GEMMs plus the adapter's (forward: 2; backward: db, dh, da, dx part: 4).
  set_rate(state, (backward ? 2 : 1) * gemm_flops() + (backward ? 3 : 1) * adapter_flops(R));
}

// The adapter part of a bank of N adapters (w empty: y and dx get it added).
// N = 1 puts every row on adapter 0 (consecutive rows); N > 1 draws each
// row's adapter at random (scattered rows in every segment).
template <int R>
void lora_bank(benchmark::State& state, int threads, index_t adapters, bool backward) {
  moekit_bench::set_threads(threads);
  Data& d = data();
  const moekit::cpu::LoraBank<LoraSpec<R>> bank(
      {.d_in = kDim, .d_out = kDim, .num_adapters = adapters, .alpha = 16.0f});
  std::vector<float> a = random_vector(sz(adapters * R * kDim), 0.015f, 6),
                     b = random_vector(sz(adapters * kDim * R), 0.01f, 7), h(sz(kTokens * R)),
                     da(a.size()), db(b.size());
  std::vector<std::int32_t> ids(sz(kTokens), 0);
  std::mt19937 rng(8);
  std::uniform_int_distribution<int> pick(0, static_cast<int>(adapters) - 1);
  for (auto& id : ids) id = pick(rng);
  std::vector<index_t> order(sz(kTokens)), offsets(sz(adapters + 1));
  bank.group({ids.data(), kTokens}, {order.data(), kTokens}, {offsets.data(), adapters + 1});
  const moekit::cpu::LoraRows rows{
      {ids.data(), kTokens}, {order.data(), kTokens}, {offsets.data(), adapters + 1}};
  const moekit::cpu::LoraWeights weights{.a = {a.data(), adapters * R, kDim},
                                         .b = {b.data(), adapters * kDim, R}};
  std::vector<std::byte> ws(sz(bank.workspace_size(kTokens)));
  const moekit::VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
  const moekit::cpu::LoraStep step{.training = backward};
  const MatrixView<float> hv =
      backward ? MatrixView<float>(h.data(), kTokens, R) : MatrixView<float>();
  for (auto _ : state) {
    bank.forward(d.xv(), rows, weights, d.yv(), hv, step, wv);
    if (backward) {
      bank.backward(d.dyv(), d.xv(), rows, weights, hv, step, d.dxv(),
                    {.da = {da.data(), adapters * R, kDim}, .db = {db.data(), adapters * kDim, R}},
                    wv);
    }
    benchmark::DoNotOptimize(d.y.data());
    benchmark::ClobberMemory();
  }
  set_rate(state, (backward ? 4 : 1) * adapter_flops(R));
}

// Expert FFNs at C1 forward over a balanced expert-major buffer (N = T K
// rows): the frozen FFNs alone, or with rank-R adapters on W1, W3 and W2.
template <int R>
void expert_forward(benchmark::State& state, int threads, bool adapters) {
  using Moe = moekit::MoeSpec<8, 2>;
  constexpr index_t E = 8, n = 2048 * 2, d = 1024, f = 4096;
  moekit_bench::set_threads(threads);
  const moekit::cpu::ExpertLora<Moe, LoraSpec<R>> lora({.d_model = d,
                                                        .d_ff = f,
                                                        .kind = moekit::FfnKind::kGated,
                                                        .activation = moekit::Activation::kSilu,
                                                        .alpha = 16.0f});
  const moekit::cpu::ExpertFfn<Moe> ffn(lora.ffn_config());
  const std::vector<float> x = random_vector(sz(n * d), 1.0f, 9),
                           w1 = random_vector(sz(E * f * d), 0.03f, 10),
                           w3 = random_vector(sz(E * f * d), 0.03f, 11),
                           w2 = random_vector(sz(E * d * f), 0.015f, 12),
                           a1 = random_vector(sz(E * R * d), 0.03f, 13),
                           b1 = random_vector(sz(E * f * R), 0.01f, 14),
                           a3 = random_vector(sz(E * R * d), 0.03f, 15),
                           b3 = random_vector(sz(E * f * R), 0.01f, 16),
                           a2 = random_vector(sz(E * R * f), 0.015f, 17),
                           b2 = random_vector(sz(E * d * R), 0.01f, 18);
  std::vector<index_t> offsets(sz(E + 1));
  for (index_t e = 0; e <= E; ++e) offsets[sz(e)] = e * n / E;
  std::vector<float> y(sz(n * d));
  std::vector<std::byte> ws(sz(std::max(lora.workspace_size(n), ffn.workspace_size(n))));
  const moekit::VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
  const moekit::VectorView<const index_t> off(offsets.data(), E + 1);
  const moekit::cpu::ExpertWeights base{
      {w1.data(), E * f, d}, {w3.data(), E * f, d}, {w2.data(), E * d, f}};
  const moekit::cpu::ExpertLoraWeights weights{.base = base,
                                               .lora = {{a1.data(), E * R, d},
                                                        {b1.data(), E * f, R},
                                                        {a3.data(), E * R, d},
                                                        {b3.data(), E * f, R},
                                                        {a2.data(), E * R, f},
                                                        {b2.data(), E * d, R}}};
  for (auto _ : state) {
    if (adapters) {
      lora.forward({x.data(), n, d}, off, weights, {y.data(), n, d}, {}, wv);
    } else {
      ffn.forward({x.data(), n, d}, off, base, {y.data(), n, d}, {}, {}, wv);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  // Three n x d x d_ff GEMMs; the adapters add 2 n R (d + d_ff) per matrix.
  set_rate(state, 3 * 2.0 * n * d * f + (adapters ? 3 * 2.0 * n * R * (d + f) : 0.0));
}

// ---- the cost of batch invariance ------------------------------------------------

constexpr index_t kSystemAdapters = 8;

// One layer of the system: d x d base weight with bias, R = 8 adapters.
struct SystemLayer {
  static constexpr int R = 8;
  index_t d;
  Activations x, dy, y, dx;
  std::vector<float> w, bias, a, b, h, dh, da, db;
  std::vector<std::int32_t> ids;
  std::vector<index_t> order, offsets;

  explicit SystemLayer(index_t width)
      : d(width),
        x(random_activations(sz(kTokens * d), 21)),
        dy(random_activations(sz(kTokens * d), 22)),
        y(sz(kTokens * d)),
        dx(sz(kTokens * d)),
        w(random_vector(sz(d * d), 0.05f, 23)),
        bias(random_vector(sz(d), 0.1f, 24)),
        a(random_vector(sz(kSystemAdapters * R * d), 0.05f, 25)),
        b(random_vector(sz(kSystemAdapters * d * R), 0.05f, 26)),
        h(sz(kTokens * R)),
        dh(sz(kTokens * R)),
        da(a.size()),
        db(b.size()),
        ids(sz(kTokens)),
        order(sz(kTokens)),
        offsets(sz(kSystemAdapters + 1)) {
    std::mt19937 rng(27);
    std::uniform_int_distribution<int> pick(0, static_cast<int>(kSystemAdapters) - 1);
    for (auto& id : ids) id = pick(rng);
  }
  MatrixView<const float> xv() const { return {x.data(), kTokens, d}; }
  MatrixView<const float> dyv() const { return {dy.data(), kTokens, d}; }
  MatrixView<float> yv() { return {y.data(), kTokens, d}; }
  MatrixView<float> dxv() { return {dx.data(), kTokens, d}; }
  MatrixView<float> hv() { return {h.data(), kTokens, R}; }
  // Adapter 0 alone (LoraLinear) or the bank; the base or not.
  moekit::cpu::LoraWeights weights(index_t adapters, bool base) const {
    moekit::cpu::LoraWeights lw{.a = {a.data(), adapters * R, d}, .b = {b.data(), adapters * d, R}};
    if (base) {
      lw.w = {w.data(), d, d};
      lw.bias = {bias.data(), d};
    }
    return lw;
  }
  moekit::cpu::LoraGrads grads(index_t adapters) {
    return {.da = {da.data(), adapters * R, d}, .db = {db.data(), adapters * d, R}};
  }
};

// y = x w^T + bias (and dx = dy w) through Eigen, as the base ran before.
void eigen_base(SystemLayer& L, bool backward) {
  using moekit::as_eigen;
  const auto w = as_eigen(MatrixView<const float>(L.w.data(), L.d, L.d));
  auto y = as_eigen(L.yv());
  y.noalias() = as_eigen(L.xv()) * w.transpose();
  y.rowwise() += as_eigen(moekit::VectorView<const float>(L.bias.data(), L.d)).transpose();
  if (backward) as_eigen(L.dxv()).noalias() = as_eigen(L.dyv()) * w;
}

// LoraLinear's forward (and backward) as it ran before the GEMM engine: every
// product an Eigen GEMM (inference and training without dropout).
void lora_eigen(SystemLayer& L, float s, bool backward) {
  using moekit::as_eigen;
  constexpr int R = SystemLayer::R;
  const moekit::cpu::LoraWeights lw = L.weights(1, true);
  const auto x = as_eigen(L.xv());
  auto h = as_eigen(L.hv());
  eigen_base(L, backward);
  h.noalias() = x * as_eigen(lw.a).transpose();
  as_eigen(L.yv()).noalias() += s * (h * as_eigen(lw.b).transpose());
  if (!backward) return;
  const auto g = as_eigen(L.dyv());
  auto dh = as_eigen(MatrixView<float>(L.dh.data(), kTokens, R));
  const moekit::cpu::LoraGrads grads = L.grads(1);
  as_eigen(grads.db).noalias() = s * (g.transpose() * h);
  dh.noalias() = s * (g * as_eigen(lw.b));
  as_eigen(grads.da).noalias() = dh.transpose() * x;
  as_eigen(L.dxv()).noalias() += dh * as_eigen(lw.a);
}

SystemLayer& system_layer(index_t d) {
  static SystemLayer small(384), large(1024);
  return d == 384 ? small : large;
}

// LoraLinear (engine) or its Eigen form at width d; forward or forward + backward.
void invariance_linear(benchmark::State& state, int threads, index_t d, bool engine,
                       bool backward) {
  moekit_bench::set_threads(threads);
  SystemLayer& L = system_layer(d);
  const moekit::cpu::LoraLinear<LoraSpec<8>> lora({.d_in = d, .d_out = d, .alpha = 16.0f});
  std::vector<std::byte> ws(sz(lora.workspace_size(kTokens)));
  const moekit::VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
  const moekit::cpu::LoraWeights lw = L.weights(1, true);
  const moekit::cpu::LoraStep step{.training = backward};
  for (auto _ : state) {
    if (engine) {
      lora.forward(L.xv(), lw, L.yv(), L.hv(), step, wv);
      if (backward) lora.backward(L.dyv(), L.xv(), lw, L.hv(), step, L.dxv(), L.grads(1), wv);
    } else {
      lora_eigen(L, lora.scale(), backward);
    }
    benchmark::DoNotOptimize(L.y.data());
    benchmark::ClobberMemory();
  }
  const double dd = static_cast<double>(d);
  const double base = 2.0 * kTokens * dd * dd, adapter = 2.0 * kTokens * 8 * 2 * dd;
  set_rate(state, backward ? 2 * base + 4 * adapter : base + adapter);
}

// LoraBank with its base (engine) or Eigen's base product plus the bank's
// adapter part (the bank without w), N = 8 adapters on random rows.
void invariance_bank(benchmark::State& state, int threads, index_t d, bool engine, bool backward) {
  moekit_bench::set_threads(threads);
  SystemLayer& L = system_layer(d);
  const moekit::cpu::LoraBank<LoraSpec<8>> bank(
      {.d_in = d, .d_out = d, .num_adapters = kSystemAdapters, .alpha = 16.0f});
  constexpr index_t N = kSystemAdapters;
  bank.group({L.ids.data(), kTokens}, {L.order.data(), kTokens}, {L.offsets.data(), N + 1});
  const moekit::cpu::LoraRows rows{
      {L.ids.data(), kTokens}, {L.order.data(), kTokens}, {L.offsets.data(), N + 1}};
  std::vector<std::byte> ws(sz(bank.workspace_size(kTokens)));
  const moekit::VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
  const moekit::cpu::LoraWeights lw = L.weights(N, engine);
  const moekit::cpu::LoraStep step{.training = backward};
  const MatrixView<float> hv = backward ? L.hv() : MatrixView<float>();
  for (auto _ : state) {
    if (!engine) eigen_base(L, false);
    bank.forward(L.xv(), rows, lw, L.yv(), hv, step, wv);
    if (backward) {
      if (!engine) {
        moekit::as_eigen(L.dxv()).noalias() =
            moekit::as_eigen(L.dyv()) *
            moekit::as_eigen(MatrixView<const float>(L.w.data(), L.d, L.d));
      }
      bank.backward(L.dyv(), L.xv(), rows, lw, hv, step, L.dxv(), L.grads(N), wv);
    }
    benchmark::DoNotOptimize(L.y.data());
    benchmark::ClobberMemory();
  }
  const double dd = static_cast<double>(d);
  const double base = 2.0 * kTokens * dd * dd, adapter = 2.0 * kTokens * 8 * 2 * dd;
  set_rate(state, backward ? 2 * base + 4 * adapter : base + adapter);
}

// Built with append: GCC 12 warns falsely (-Wrestrict) on chains of string operator+.
std::string run_name(const std::string& what, const std::string& config, int threads) {
  std::string name = what;
  name.append("/").append(config).append("/threads:").append(std::to_string(threads));
  return name;
}

// --cpu_time: every run timed in the process's CPU time (bench/summary.hpp).
bool g_cpu_time = false;

template <class F>
void add(const std::string& name, F f) {
  moekit_bench::add_ms(name, f, g_cpu_time);
}

template <int R>
void register_rank(int threads) {
  std::string r = "R";
  r.append(std::to_string(R));
  add(run_name("lora_forward", r, threads),
      [threads](benchmark::State& s) { lora_linear<R>(s, threads, false); });
  add(run_name("lora_forward_backward", r, threads),
      [threads](benchmark::State& s) { lora_linear<R>(s, threads, true); });
  for (const index_t n : {index_t{1}, index_t{8}, index_t{64}}) {
    std::string c = r;
    c.append("_N").append(std::to_string(n));
    add(run_name("bank_forward", c, threads),
        [threads, n](benchmark::State& s) { lora_bank<R>(s, threads, n, false); });
    add(run_name("bank_forward_backward", c, threads),
        [threads, n](benchmark::State& s) { lora_bank<R>(s, threads, n, true); });
  }
}

// The invariance table's runs: <what>_<engine|eigen>/d<d>/threads:<t>.
std::string invariance_name(const char* what, bool engine, index_t d, int threads) {
  std::string w = "invariance_";
  w.append(what).append(engine ? "_engine" : "_eigen");
  std::string config = "d";
  config.append(std::to_string(d));
  return run_name(w, config, threads);
}

void register_invariance(int threads) {
  for (const index_t d : {index_t{384}, index_t{1024}}) {
    for (const bool engine : {false, true}) {
      for (const bool backward : {false, true}) {
        add(invariance_name(backward ? "linear_fb" : "linear_fwd", engine, d, threads),
            [=](benchmark::State& s) { invariance_linear(s, threads, d, engine, backward); });
        add(invariance_name(backward ? "bank_fb" : "bank_fwd", engine, d, threads),
            [=](benchmark::State& s) { invariance_bank(s, threads, d, engine, backward); });
      }
    }
  }
}

void print_invariance(const moekit_bench::RecordingReporter& reporter,
                      const int (&thread_counts)[2]) {
  std::printf("\nbatch invariance: GEMM engine (fp32) time / Eigen time, T = %lld, R = 8\n",
              static_cast<long long>(kTokens));
  std::printf("%-6s %3s %12s %12s %12s %12s\n", "d", "thr", "linear fwd", "linear fb", "bank fwd",
              "bank fb");
  for (const int threads : thread_counts) {
    for (const index_t d : {index_t{384}, index_t{1024}}) {
      char cells[4][40];
      int known = 0;
      const char* whats[] = {"linear_fwd", "linear_fb", "bank_fwd", "bank_fb"};
      for (int i = 0; i < 4; ++i) {
        const double eigen = reporter.seconds(invariance_name(whats[i], false, d, threads));
        const double engine = reporter.seconds(invariance_name(whats[i], true, d, threads));
        if (eigen > 0 && engine > 0) {
          std::snprintf(cells[i], sizeof cells[i], "%.2f/%.2f=%.2f", engine * 1e3, eigen * 1e3,
                        engine / eigen);
          ++known;
        } else {
          std::snprintf(cells[i], sizeof cells[i], "-");
        }
      }
      if (known == 0) continue;
      std::printf("%-6lld %3d %12s %12s %12s %12s\n", static_cast<long long>(d), threads, cells[0],
                  cells[1], cells[2], cells[3]);
    }
  }
  std::printf("cells: engine ms / Eigen ms = ratio (above 1: what invariance costs)\n");
}

}  // namespace

int main(int argc, char** argv) {
  g_cpu_time = moekit_bench::take_flag(argc, argv, "--cpu_time");
  // 2 threads first (see bench/routing.cpp).
  const int thread_counts[] = {2, 1};
  for (int threads : thread_counts) {
    add(run_name("sgemm_ceiling", "n2048", threads),
        [threads](benchmark::State& s) { moekit_bench::sgemm(s, 2048, 2048, 2048, threads); });
    add(run_name("base_forward", "d4096", threads),
        [threads](benchmark::State& s) { base_layer(s, threads, false); });
    add(run_name("base_forward_backward", "d4096", threads),
        [threads](benchmark::State& s) { base_layer(s, threads, true); });
    register_rank<8>(threads);
    register_rank<64>(threads);
    add(run_name("expert_ffn_forward", "C1", threads),
        [threads](benchmark::State& s) { expert_forward<8>(s, threads, false); });
    add(run_name("expert_lora_forward", "C1_R8", threads),
        [threads](benchmark::State& s) { expert_forward<8>(s, threads, true); });
    register_invariance(threads);
  }
  benchmark::Initialize(&argc, argv);
  moekit_bench::RecordingReporter reporter(g_cpu_time);
  benchmark::RunSpecifiedBenchmarks(&reporter);

  std::printf("\n%-4s %3s %10s %9s %9s %9s %9s %9s | %8s %8s %8s %8s\n", "rank", "thr",
              "SGEMM GF/s", "base ms", "fwd ms", "fwd +%", "fb ms", "fb +%", "N8 fwd", "N64 fwd",
              "N8 fb", "N64 fb");
  for (int threads : thread_counts) {
    const double ceiling_s = reporter.seconds(run_name("sgemm_ceiling", "n2048", threads));
    const double ceiling = ceiling_s > 0 ? 2.0 * 2048 * 2048 * 2048 / ceiling_s * 1e-9 : 0.0;
    const double base = reporter.seconds(run_name("base_forward", "d4096", threads));
    const double base_fb = reporter.seconds(run_name("base_forward_backward", "d4096", threads));
    for (const char* r : {"R8", "R64"}) {
      const double fwd = reporter.seconds(run_name("lora_forward", r, threads));
      const double fb = reporter.seconds(run_name("lora_forward_backward", r, threads));
      const auto bank = [&](const char* what, const char* n) {
        std::string config = r;
        config.append("_").append(n);
        return reporter.seconds(run_name(what, config, threads));
      };
      const auto ratio = [](double num, double den) {
        return num > 0 && den > 0 ? num / den : 0.0;
      };
      const auto overhead = [&](double with, double without) {
        return with > 0 && without > 0 ? 100.0 * (with / without - 1.0) : 0.0;
      };
      if (fwd <= 0 && bank("bank_forward", "N1") <= 0) continue;  // filtered out
      std::printf(
          "%-4s %3d %10.1f %9.2f %9.2f %8.1f%% %9.2f %8.1f%% | %7.2fx %7.2fx %7.2fx %7.2fx\n", r,
          threads, ceiling, base * 1e3, fwd * 1e3, overhead(fwd, base), fb * 1e3,
          overhead(fb, base_fb), ratio(bank("bank_forward", "N8"), bank("bank_forward", "N1")),
          ratio(bank("bank_forward", "N64"), bank("bank_forward", "N1")),
          ratio(bank("bank_forward_backward", "N8"), bank("bank_forward_backward", "N1")),
          ratio(bank("bank_forward_backward", "N64"), bank("bank_forward_backward", "N1")));
      // Forward bytes: x read, y read and written, each adapter's a and b read.
      const double rank = r[1] == '8' ? 8.0 : 64.0;
      const double rows_bytes = 3.0 * kTokens * kDim * 4.0, adapter_bytes = 2.0 * rank * kDim * 4.0;
      const auto floor = [&](double n) {
        return (rows_bytes + n * adapter_bytes) / (rows_bytes + adapter_bytes);
      };
      std::printf("%-4s %3d   bytes the fwd moves, N over one adapter: N8 %.3fx, N64 %.3fx\n", r,
                  threads, floor(8), floor(64));
      if (base > 0 && bank("bank_forward", "N1") > 0) {
        std::printf(
            "%-4s %3d   with the base layer: N8 fwd %.3fx, N64 fwd %.3fx, N8 fb %.3fx, N64 fb "
            "%.3fx\n",
            r, threads, ratio(base + bank("bank_forward", "N8"), base + bank("bank_forward", "N1")),
            ratio(base + bank("bank_forward", "N64"), base + bank("bank_forward", "N1")),
            ratio(base_fb + bank("bank_forward_backward", "N8"),
                  base_fb + bank("bank_forward_backward", "N1")),
            ratio(base_fb + bank("bank_forward_backward", "N64"),
                  base_fb + bank("bank_forward_backward", "N1")));
      }
    }
  }
  for (int threads : thread_counts) {
    const double ffn = reporter.seconds(run_name("expert_ffn_forward", "C1", threads));
    const double elora = reporter.seconds(run_name("expert_lora_forward", "C1_R8", threads));
    if (ffn > 0 && elora > 0) {
      std::printf(
          "expert LoRA R8 at C1, %d thread(s): forward %.2f ms vs ExpertFfn %.2f ms (%+.1f%%)\n",
          threads, elora * 1e3, ffn * 1e3, 100.0 * (elora / ffn - 1.0));
    }
  }
  print_invariance(reporter, thread_counts);
#if defined(__linux__)
  // Whether the activations got their 2 MiB pages (see HugePages).
  if (FILE* f = std::fopen("/proc/self/smaps_rollup", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f) != nullptr) {
      if (std::string(line).starts_with("AnonHugePages:")) std::printf("process %s", line);
    }
    std::fclose(f);
  }
#endif
  std::printf(
      "fwd +%% / fb +%%: LoraLinear time over the frozen base layer's (goal R8 <= 5%%); "
      "N8 / N64: bank of 8 / 64 adapters (random ids) over one adapter on the same rows, "
      "adapter part only (goal <= 1.15x)\n");
  return 0;
}
