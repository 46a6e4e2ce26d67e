#pragma once
// One expert-parallel test case, written once for the loopback unit tests
// (test_expert_parallel.cpp) and the MPI tests (tests/mpi/): a whole batch
// and the layer's parameters drawn from a seed (the same on every rank), the
// one-process result of cpu::MoeLayer on the whole batch, and a run of
// cpu::ExpertParallelMoeLayer on one rank's slice compared with it bit for
// bit: outputs, aux losses, statistics, input gradients, the rank's experts'
// gradients and the replicated gradients. And a training run of the
// reference model, compared step by step and weight by weight.

#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "moekit/dist/layout.hpp"
#include "moekit/nn/expert_parallel_moe_layer.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "moekit/train/data.hpp"
#include "moekit/train/trainer.hpp"

namespace moekit_test {

using moekit::index_t;
using moekit::MatrixView;
using moekit::VectorView;

struct EpCase {
  std::string name;
  moekit::cpu::MoeLayerConfig config;
  std::vector<index_t> tokens;  // per rank
  std::vector<int> experts;     // per rank
  bool with_bias = true;        // a gate bias and its gradient
  bool accumulate = false;      // gradients added to initial values
  bool want_dx = true;
  std::uint64_t seed = 1;

  index_t total_tokens() const {
    index_t t = 0;
    for (index_t n : tokens) t += n;
    return t;
  }
  index_t first_token(int rank) const {
    index_t t = 0;
    for (int q = 0; q < rank; ++q) t += tokens[static_cast<std::size_t>(q)];
    return t;
  }
  int first_expert(int rank) const {
    int e = 0;
    for (int q = 0; q < rank; ++q) e += experts[static_cast<std::size_t>(q)];
    return e;
  }
};

// A layer for the cases: SwiGLU or GELU experts of width f on d, `shared`
// shared experts of width fs, the given capacity factor, both aux losses.
inline moekit::cpu::MoeLayerConfig ep_layer_config(moekit::FfnKind kind, int shared,
                                                   double capacity, index_t d, index_t f,
                                                   index_t fs) {
  moekit::cpu::MoeLayerConfig c;
  c.d_model = d;
  c.d_ff = f;
  c.kind = kind;
  c.activation =
      kind == moekit::FfnKind::kGated ? moekit::Activation::kSilu : moekit::Activation::kGeluTanh;
  c.num_shared = shared;
  c.d_ff_shared = shared > 0 ? fs : 0;
  c.router.capacity.factor = capacity;
  c.switch_coeff = 0.1f;
  c.z_coeff = 0.01f;
  return c;
}

inline std::vector<float> random_floats(std::size_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Every gradient of a layer, owned (full size: all E experts).
struct EpGrads {
  std::vector<float> dx, dwg, dbg, dw1, dw3, dw2, ds1, ds3, ds2;
};

// The whole problem, identical on every rank.
template <moekit::MoeSpecType S>
struct EpProblem {
  static constexpr int E = S::num_experts;
  index_t T = 0, d = 0, f = 0, fs = 0;
  int ns = 0;
  bool gated = false;
  std::vector<float> x, dy, wg, bg, w1, w3, w2, s1, s3, s2;
  EpGrads initial;  // the gradients' starting values when accumulating

  explicit EpProblem(const EpCase& c) {
    const auto& m = c.config;
    T = c.total_tokens();
    d = m.d_model;
    f = m.d_ff;
    ns = m.num_shared;
    fs = m.d_ff_shared > 0 ? m.d_ff_shared : m.d_ff;
    gated = m.kind == moekit::FfnKind::kGated;
    std::mt19937 rng(static_cast<unsigned>(c.seed));
    const auto n = [](index_t v) { return static_cast<std::size_t>(v); };
    x = random_floats(n(T * d), 1.0f, rng);
    dy = random_floats(n(T * d), 1.0f, rng);
    wg = random_floats(n(E * d), 0.5f, rng);
    bg = c.with_bias ? random_floats(n(E), 0.3f, rng) : std::vector<float>();
    w1 = random_floats(n(E * f * d), 0.3f, rng);
    w3 = gated ? random_floats(n(E * f * d), 0.3f, rng) : std::vector<float>();
    w2 = random_floats(n(E * d * f), 0.3f, rng);
    s1 = random_floats(n(ns * fs * d), 0.3f, rng);
    s3 = gated ? random_floats(n(ns * fs * d), 0.3f, rng) : std::vector<float>();
    s2 = random_floats(n(ns * d * fs), 0.3f, rng);
    if (c.accumulate) {
      initial = {random_floats(x.size(), 0.1f, rng),  random_floats(wg.size(), 0.1f, rng),
                 random_floats(bg.size(), 0.1f, rng), random_floats(w1.size(), 0.1f, rng),
                 random_floats(w3.size(), 0.1f, rng), random_floats(w2.size(), 0.1f, rng),
                 random_floats(s1.size(), 0.1f, rng), random_floats(s3.size(), 0.1f, rng),
                 random_floats(s2.size(), 0.1f, rng)};
    } else {
      const float nan = std::numeric_limits<float>::quiet_NaN();  // poison: must be overwritten
      initial = {std::vector<float>(x.size(), nan),  std::vector<float>(wg.size(), nan),
                 std::vector<float>(bg.size(), nan), std::vector<float>(w1.size(), nan),
                 std::vector<float>(w3.size(), nan), std::vector<float>(w2.size(), nan),
                 std::vector<float>(s1.size(), nan), std::vector<float>(s3.size(), nan),
                 std::vector<float>(s2.size(), nan)};
    }
  }

  static MatrixView<const float> view(const std::vector<float>& v, index_t rows, index_t cols) {
    return v.empty() ? MatrixView<const float>() : MatrixView<const float>(v.data(), rows, cols);
  }
  static MatrixView<float> view(std::vector<float>& v, index_t rows, index_t cols) {
    return v.empty() ? MatrixView<float>() : MatrixView<float>(v.data(), rows, cols);
  }

  // Parameters with experts [e0, e0 + count) only in the stacks.
  moekit::cpu::MoeLayerParams params(int e0, int count) const {
    moekit::cpu::MoeLayerParams p;
    p.w_gate = view(wg, E, d);
    p.gate_bias = bg.empty() ? VectorView<const float>() : VectorView<const float>(bg.data(), E);
    p.experts = {
        view(w1, E * f, d).middle_rows(e0 * f, count * f),
        gated ? view(w3, E * f, d).middle_rows(e0 * f, count * f) : MatrixView<const float>(),
        view(w2, E * d, f).middle_rows(e0 * d, count * d)};
    p.shared = {view(s1, ns * fs, d), view(s3, ns * fs, d), view(s2, ns * d, fs)};
    return p;
  }
};

// Gradient views over g for experts [e0, e0 + count).
template <moekit::MoeSpecType S>
moekit::cpu::MoeLayerGrads grad_views(const EpProblem<S>& p, EpGrads& g, int e0, int count,
                                      bool accumulate) {
  constexpr int E = S::num_experts;
  using P = EpProblem<S>;
  moekit::cpu::MoeLayerGrads v;
  v.dw_gate = P::view(g.dwg, E, p.d);
  v.dgate_bias = g.dbg.empty() ? VectorView<float>() : VectorView<float>(g.dbg.data(), E);
  v.dw1 = P::view(g.dw1, E * p.f, p.d).middle_rows(e0 * p.f, count * p.f);
  v.dw3 = p.gated ? P::view(g.dw3, E * p.f, p.d).middle_rows(e0 * p.f, count * p.f)
                  : MatrixView<float>();
  v.dw2 = P::view(g.dw2, E * p.d, p.f).middle_rows(e0 * p.d, count * p.d);
  v.shared_dw1 = P::view(g.ds1, p.ns * p.fs, p.d);
  v.shared_dw3 = P::view(g.ds3, p.ns * p.fs, p.d);
  v.shared_dw2 = P::view(g.ds2, p.ns * p.d, p.fs);
  v.accumulate = accumulate;
  return v;
}

// What a layer run yields.
template <moekit::MoeSpecType S>
struct EpResult {
  std::vector<float> y;
  moekit::cpu::MoeAuxLosses aux;
  moekit::cpu::RoutingStats<S> stats;
  EpGrads grads;
};

// One process: cpu::MoeLayer on the whole batch.
template <moekit::MoeSpecType S>
EpResult<S> one_process(const EpCase& c, const EpProblem<S>& p) {
  const moekit::cpu::MoeLayer<S> layer(c.config);
  moekit::cpu::MoeLayerStorage<S> st(layer, p.T);
  EpResult<S> r;
  r.y.assign(static_cast<std::size_t>(p.T * p.d), std::numeric_limits<float>::quiet_NaN());
  const MatrixView<const float> x(p.x.data(), p.T, p.d);
  const auto prm = p.params(0, S::num_experts);
  r.aux = layer.forward(x, prm, st.state(), {r.y.data(), p.T, p.d}, &r.stats, st.workspace());
  r.grads = p.initial;
  layer.backward({p.dy.data(), p.T, p.d}, x, prm, st.state(),
                 c.want_dx ? MatrixView<float>(r.grads.dx.data(), p.T, p.d) : MatrixView<float>(),
                 grad_views(p, r.grads, 0, S::num_experts, c.accumulate), st.workspace());
  return r;
}

inline bool same_bits(const float* a, const float* b, std::size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(float)) == 0;
}
template <class V>
bool same_value_bits(const V& a, const V& b) {
  return std::memcmp(&a, &b, sizeof(V)) == 0;
}

// Rank `rank`'s part of the case on transport t (collective), compared with
// the one-process result; returns what differs (empty: bit-identical).
template <moekit::MoeSpecType S, class T>
std::vector<std::string> run_rank(const EpCase& c, const EpProblem<S>& p, const EpResult<S>& ref,
                                  T& t) {
  const int rank = t.rank();
  const index_t n = c.tokens[static_cast<std::size_t>(rank)], t0 = c.first_token(rank);
  const int e0 = c.first_expert(rank), ne = c.experts[static_cast<std::size_t>(rank)];
  const index_t d = p.d, f = p.f;
  const auto placement = moekit::dist::ExpertPlacement::from_counts(c.experts);
  moekit::cpu::ExpertParallelMoeLayer<S, T> layer(c.config, placement, t);
  moekit::cpu::ExpertParallelStorage<S> st(layer, n, p.T);

  const MatrixView<const float> x(p.x.data() + t0 * d, n, d);
  std::vector<float> y(static_cast<std::size_t>(n * d), std::numeric_limits<float>::quiet_NaN());
  moekit::cpu::RoutingStats<S> stats;
  const auto prm = p.params(e0, ne);
  const auto aux = layer.forward(x, prm, st.state(), {y.data(), n, d}, &stats, st.workspace());
  EpGrads g = p.initial;  // full size; this rank writes its rows and experts
  layer.backward({p.dy.data() + t0 * d, n, d}, x, prm, st.state(),
                 c.want_dx ? MatrixView<float>(g.dx.data() + t0 * d, n, d) : MatrixView<float>(),
                 grad_views(p, g, e0, ne, c.accumulate), st.workspace());

  std::vector<std::string> diff;
  const auto check = [&](bool same, const char* what) {
    if (!same) diff.push_back(c.name + ": rank " + std::to_string(rank) + ": " + what);
  };
  const auto rows = [](const std::vector<float>& v, index_t r0, index_t count, index_t cols) {
    return std::vector<float>(v.begin() + r0 * cols, v.begin() + (r0 + count) * cols);
  };
  const auto same_part = [&](const std::vector<float>& a, const std::vector<float>& b, index_t r0,
                             index_t count, index_t cols) {
    return a.empty() || same_bits(rows(a, r0, count, cols).data(), rows(b, r0, count, cols).data(),
                                  static_cast<std::size_t>(count * cols));
  };
  check(same_bits(y.data(), ref.y.data() + t0 * d, y.size()), "y");
  check(same_value_bits(aux.switch_loss, ref.aux.switch_loss) &&
            same_value_bits(aux.z_loss, ref.aux.z_loss) &&
            same_value_bits(aux.total, ref.aux.total),
        "aux losses");
  check(stats.tokens == ref.stats.tokens && stats.assigned == ref.stats.assigned &&
            stats.kept == ref.stats.kept && stats.dropped == ref.stats.dropped &&
            stats.non_finite_logits == ref.stats.non_finite_logits &&
            same_value_bits(stats.mean_distribution, ref.stats.mean_distribution) &&
            same_value_bits(stats.z_loss, ref.stats.z_loss),
        "routing statistics");
  if (c.want_dx) check(same_part(g.dx, ref.grads.dx, t0, n, d), "dx");
  check(same_bits(g.dwg.data(), ref.grads.dwg.data(), g.dwg.size()), "dw_gate");
  check(same_bits(g.dbg.data(), ref.grads.dbg.data(), g.dbg.size()), "dgate_bias");
  check(same_part(g.dw1, ref.grads.dw1, e0 * f, ne * f, d), "dw1 (this rank's experts)");
  check(same_part(g.dw3, ref.grads.dw3, e0 * f, ne * f, d), "dw3 (this rank's experts)");
  check(same_part(g.dw2, ref.grads.dw2, e0 * d, ne * d, f), "dw2 (this rank's experts)");
  check(same_bits(g.ds1.data(), ref.grads.ds1.data(), g.ds1.size()), "shared_dw1");
  check(same_bits(g.ds3.data(), ref.grads.ds3.data(), g.ds3.size()), "shared_dw3");
  check(same_bits(g.ds2.data(), ref.grads.ds2.data(), g.ds2.size()), "shared_dw2");
  return diff;
}

// ---- a training run of the reference model ------------------------------------------------

using TrainModel =
    moekit::cpu::MultitaskModel<moekit::MoeSpec<8, 2>, moekit::LoraSpec<4>, moekit::HeadSpec<3>>;

// A small reference model: two MoE layers with SwiGLU experts, a shared
// expert and capacity drops in the second layer's worth of tokens, the
// balance and z losses, LoRA dropout.
inline TrainModel::Config training_model_config(index_t max_batch) {
  TrainModel::Config c;
  c.encoder = {.d_input = 24, .d_model = 32, .d_ff = 48, .num_layers = 1};
  c.moe.d_model = 32;
  c.moe.d_ff = 24;
  c.moe.kind = moekit::FfnKind::kGated;
  c.moe.activation = moekit::Activation::kSilu;
  c.moe.num_shared = 1;
  c.moe.router.capacity.factor = 1.25;
  c.moe.switch_coeff = 0.1f;
  c.moe.z_coeff = 1e-3f;
  c.lora_dropout = 0.1f;
  c.classes = {4, 3, 6};
  c.max_batch = max_batch;
  c.seed = 5;
  return c;
}

inline moekit::train::TrainerConfig training_trainer_config(int steps) {
  moekit::train::TrainerConfig t;
  t.lr = {3e-3f, 3e-3f, 3e-3f, 5e-3f};
  t.warmup_steps = steps / 10;
  t.total_steps = steps;
  t.max_grad_norm = 0.5;  // clips: the norm over every rank's experts matters
  t.dropout_seed = 17;
  return t;
}

// What a run reports per step, and the weights it ends with.
struct TrainingLog {
  std::vector<double> loss, task, aux, grad_norm, switch_loss;
  std::vector<std::vector<moekit::index_t>> kept;  // layer 0's kept assignments per step
  std::vector<std::vector<float>> tensors;         // final values, in model order
};

// Steps [s0, s1) of `trainer` on rows [first, first + rows) of each global
// batch of `batch` rows (the whole batch in one process).
inline TrainingLog train_steps(TrainModel& model, moekit::train::Trainer<TrainModel>& trainer,
                               int s0, int s1, index_t batch, index_t first, index_t rows) {
  const moekit::train::SyntheticTasks tasks({.features = 24, .classes = {4, 3, 6}, .seed = 11});
  const moekit::train::Dataset data = tasks.sample(3000, 1);
  moekit::train::BatchSampler sampler(data.size(), batch, 3);
  std::vector<float> x(static_cast<std::size_t>(rows * 24));
  std::vector<std::int32_t> t(static_cast<std::size_t>(rows)), y(static_cast<std::size_t>(rows));
  TrainingLog log;
  for (int s = s0; s < s1; ++s) {
    const std::vector<index_t> all = sampler.indices(s);
    const std::span<const index_t> mine(all.data() + first, static_cast<std::size_t>(rows));
    moekit::train::gather(data, mine, {x.data(), rows, 24}, {t.data(), rows}, {y.data(), rows});
    const auto r = trainer.step({{x.data(), rows, 24}, {t.data(), rows}, {y.data(), rows}});
    log.loss.push_back(r.losses.total);
    log.task.push_back(r.losses.task.total);
    log.aux.push_back(r.losses.aux);
    log.grad_norm.push_back(r.grad_norm);
    log.switch_loss.push_back(r.losses.mean_switch_loss());
    log.kept.emplace_back(r.losses.routing[0].kept.begin(), r.losses.routing[0].kept.end());
  }
  for (const auto& tensor : model.tensors()) log.tensors.push_back(tensor.value);
  return log;
}

// `steps` steps from the start, with the trainer configuration above.
inline TrainingLog train_slice(TrainModel& model, int steps, index_t batch, index_t first,
                               index_t rows) {
  moekit::train::Trainer<TrainModel> trainer(model, training_trainer_config(steps));
  return train_steps(model, trainer, 0, steps, batch, first, rows);
}

// One rank's run compared with one process's: every step's losses, norm
// and loads, the replicated tensors whole and the rank's experts' rows.
inline std::vector<std::string> compare_training(const TrainingLog& got, const TrainingLog& ref,
                                                 const TrainModel& model, int rank) {
  std::vector<std::string> diff;
  const std::string who = "rank " + std::to_string(rank) + ": ";
  for (std::size_t s = 0; s < ref.loss.size(); ++s) {
    const bool same =
        same_value_bits(got.loss[s], ref.loss[s]) && same_value_bits(got.task[s], ref.task[s]) &&
        same_value_bits(got.aux[s], ref.aux[s]) &&
        same_value_bits(got.grad_norm[s], ref.grad_norm[s]) && got.kept[s] == ref.kept[s];
    if (!same) {
      diff.push_back(who + "step " + std::to_string(s) + " differs: loss " +
                     std::to_string(got.loss[s]) + " vs " + std::to_string(ref.loss[s]) +
                     ", grad norm " + std::to_string(got.grad_norm[s]) + " vs " +
                     std::to_string(ref.grad_norm[s]));
      break;
    }
  }
  for (std::size_t i = 0; i < ref.tensors.size(); ++i) {
    const auto& t = model.tensors()[i];
    const std::size_t first =
        static_cast<std::size_t>(t.expert_rows * t.cols * model.first_expert());
    const std::vector<float>& mine = got.tensors[i];
    if (first + mine.size() > ref.tensors[i].size() ||
        !same_bits(mine.data(), ref.tensors[i].data() + first, mine.size())) {
      diff.push_back(who + "final " + t.name + " differs");
    }
  }
  return diff;
}

}  // namespace moekit_test
