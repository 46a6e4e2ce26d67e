// The CPU backend's side of the CUDA tests (see cpu_reference.hpp).
#include "cpu_reference.hpp"

#include <cstddef>

#include "moekit/cpu/aux_losses.hpp"
#include "moekit/cpu/dispatch.hpp"
#include "moekit/cpu/distillation.hpp"
#include "moekit/cpu/early_exit.hpp"
#include "moekit/cpu/router.hpp"
#include "moekit/cpu/task_heads.hpp"

namespace moekit_test {

using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::to_size;
using moekit::VectorView;

namespace {

// A cpu::Routing over the saved vectors (the CPU reads them only).
moekit::cpu::Routing view_of(const SavedRouting& r, int e, int k) {
  auto* m = const_cast<SavedRouting*>(&r);
  return {{m->logits.data(), r.tokens, e},
          {m->scores.data(), r.tokens, e},
          {m->ids.data(), r.tokens, k},
          {m->weights.data(), r.tokens, k},
          {m->positions.data(), r.tokens, k}};
}

// A routing of `tokens` tokens over these logits, outputs zeroed, for the
// CPU router to fill.
SavedRouting blank_routing(const std::vector<float>& logits, std::int64_t tokens, int e, int k) {
  SavedRouting r;
  r.tokens = tokens;
  r.logits = logits;
  r.scores.assign(to_size(tokens * e), 0.0f);
  r.weights.assign(to_size(tokens * k), 0.0f);
  r.ids.assign(to_size(tokens * k), 0);
  r.positions.assign(to_size(tokens * k), 0);
  return r;
}

MatrixView<float> grad_view(std::vector<float>& dlogits, std::int64_t tokens, int e) {
  if (dlogits.empty()) return {};
  return {dlogits.data(), tokens, e};
}

}  // namespace

template <int E, int K>
CpuRouting CpuReference<E, K>::route(const std::vector<float>& logits, std::int64_t tokens,
                                     const std::vector<float>& bias,
                                     const moekit::GatingConfig& gating) {
  using S = MoeSpec<E, K>;
  moekit::cpu::RouterConfig config;
  config.gating = gating;
  const moekit::cpu::Router<S> router(config);
  SavedRouting r = blank_routing(logits, tokens, E, K);
  moekit::cpu::RoutingStats<S> stats;
  const VectorView<const float> b(bias.empty() ? nullptr : bias.data(),
                                  static_cast<index_t>(bias.size()));
  router.route(view_of(r, E, K), b, &stats);
  CpuRouting out;
  out.scores = r.scores;
  out.ids = r.ids;
  out.weights = r.weights;
  out.assigned.assign(stats.assigned.begin(), stats.assigned.end());
  out.mean_distribution.assign(stats.mean_distribution.begin(), stats.mean_distribution.end());
  out.z_loss = stats.z_loss;
  out.non_finite = stats.non_finite_logits;
  return out;
}

template <int E, int K>
CpuCappedRouting CpuReference<E, K>::route_with_capacity(const std::vector<float>& logits,
                                                         std::int64_t tokens,
                                                         const moekit::CapacityConfig& capacity) {
  using S = MoeSpec<E, K>;
  const auto run = [&](const moekit::CapacityConfig& c, SavedRouting& r,
                       moekit::cpu::RoutingStats<S>& stats) {
    moekit::cpu::RouterConfig config;
    config.capacity = c;
    const moekit::cpu::Router<S> router(config);
    r = blank_routing(logits, tokens, E, K);
    std::vector<std::byte> workspace(to_size(router.workspace_size(tokens, 0)));
    router.route(view_of(r, E, K), {}, &stats,
                 {workspace.data(), static_cast<index_t>(workspace.size())});
    return router.capacity(tokens);
  };
  SavedRouting dropless, capped;
  moekit::cpu::RoutingStats<S> dropless_stats, stats;
  run({}, dropless, dropless_stats);
  CpuCappedRouting out;
  out.capacity = run(capacity, capped, stats);
  out.ids = dropless.ids;
  out.weights = dropless.weights;
  out.capped_ids = capped.ids;
  out.positions = capped.positions;
  out.capped_weights = capped.weights;
  std::vector<index_t> offsets(E + 1);
  moekit::cpu::dispatch_offsets<S>(view_of(capped, E, K), {offsets.data(), E + 1});
  out.offsets.assign(offsets.begin(), offsets.end());
  out.assigned.assign(stats.assigned.begin(), stats.assigned.end());
  out.kept.assign(stats.kept.begin(), stats.kept.end());
  out.dropped = stats.dropped;
  return out;
}

template <int E, int K>
std::vector<float> CpuReference<E, K>::backward_gate(const SavedRouting& r,
                                                     const std::vector<float>& dweights,
                                                     const moekit::GatingConfig& gating) {
  moekit::cpu::RouterConfig config;
  config.gating = gating;
  const moekit::cpu::Router<MoeSpec<E, K>> router(config);
  SavedRouting kept = r;
  kept.positions.assign(to_size(r.tokens * K), 0);
  std::vector<float> dlogits(to_size(r.tokens * E), 0.0f);
  router.backward_gate(view_of(kept, E, K), {dweights.data(), r.tokens, K},
                       {dlogits.data(), r.tokens, E});
  return dlogits;
}

template <int E, int K>
double CpuReference<E, K>::switch_loss(moekit::GatingRule rule, const SavedRouting& r,
                                       moekit::SwitchNormalization norm, float coeff,
                                       std::vector<float>& dlogits) {
  return moekit::cpu::switch_loss<MoeSpec<E, K>>(rule, view_of(r, E, K), {norm}, coeff,
                                                 grad_view(dlogits, r.tokens, E));
}

template <int E, int K>
double CpuReference<E, K>::sequence_loss(moekit::GatingRule rule, const SavedRouting& r,
                                         std::int64_t sequence_length, float coeff,
                                         std::vector<float>& dlogits) {
  return moekit::cpu::sequence_aux_loss<MoeSpec<E, K>>(rule, view_of(r, E, K), sequence_length,
                                                       coeff, grad_view(dlogits, r.tokens, E));
}

template <int E, int K>
double CpuReference<E, K>::z_loss(const SavedRouting& r, float coeff, std::vector<float>& dlogits) {
  return moekit::cpu::z_loss<MoeSpec<E, K>>(view_of(r, E, K), coeff,
                                            grad_view(dlogits, r.tokens, E));
}

template <int E, int K>
double CpuReference<E, K>::importance_load(const moekit::GatingConfig& gating,
                                           const SavedRouting& r, float importance_weight,
                                           float load_weight, float coeff,
                                           std::vector<float>& dlogits) {
  moekit::cpu::RouterConfig config;
  config.gating = gating;
  return moekit::cpu::importance_load_loss<MoeSpec<E, K>>(config, view_of(r, E, K), {},
                                                          {importance_weight, load_weight}, coeff,
                                                          grad_view(dlogits, r.tokens, E));
}

template <int E, int K>
std::vector<float> CpuReference<E, K>::bias_update(float gamma,
                                                   const std::vector<std::int64_t>& counts) {
  using S = MoeSpec<E, K>;
  moekit::cpu::ExpertBias<S> bias(gamma);
  moekit::cpu::RoutingStats<S> stats;
  for (int e = 0; e < E; ++e) stats.assigned[to_size(e)] = counts[to_size(e)];
  bias.accumulate(stats);
  bias.update();
  return {bias.bias().data(), bias.bias().data() + E};
}

#define MOEKIT_TEST_DEFINE_REFERENCE(E, K) template struct CpuReference<E, K>;
MOEKIT_TEST_CUDA_SPECS(MOEKIT_TEST_DEFINE_REFERENCE)
#undef MOEKIT_TEST_DEFINE_REFERENCE

// ---- task heads, distillation and early exit (test_heads.cu) ---------------

template <int H>
HeadsResult CpuHeadsReference<H>::run(const HeadsProblem& p) {
  using S = moekit::HeadSpec<H>;
  moekit::cpu::TaskHeadsConfig<S> config;
  config.d_model = p.d;
  for (int h = 0; h < H; ++h) config.classes[to_size(h)] = p.classes[static_cast<std::size_t>(h)];
  config.bias = p.bias;
  const moekit::cpu::TaskHeads<S> heads(config);
  const index_t n = p.n, d = p.d, width = heads.max_classes(), total = heads.total_classes();
  std::vector<std::byte> workspace(static_cast<std::size_t>(heads.workspace_size(n)) + 64);
  auto* aligned = reinterpret_cast<std::byte*>(
      (reinterpret_cast<std::uintptr_t>(workspace.data()) + 63) / 64 * 64);
  const VectorView<std::byte> ws(aligned, heads.workspace_size(n));
  const VectorView<const std::int32_t> tasks(p.tasks.data(), static_cast<index_t>(p.tasks.size()));
  const moekit::cpu::HeadWeights weights{{p.w.data(), total, d},
                                         {p.b.data(), static_cast<index_t>(p.b.size())}};
  HeadsResult r;
  r.logits.assign(static_cast<std::size_t>(n * width), 0.0f);
  heads.forward({p.x.data(), n, d}, tasks, weights, {r.logits.data(), n, width}, ws);
  moekit::TaskWeights weighting;
  weighting.kind = p.kind;
  const VectorView<const float> tw(p.task_weights.data(),
                                   static_cast<index_t>(p.task_weights.size()));
  if (p.kind == moekit::TaskWeighting::kFixed) {
    weighting.fixed = tw;
  } else {
    weighting.log_vars = tw;
    r.dlog_vars.assign(H, 0.0f);
  }
  r.dlogits.assign(static_cast<std::size_t>(n * width), 0.0f);
  const auto losses = heads.loss({r.logits.data(), n, width}, tasks, {p.labels.data(), n},
                                 weighting, {r.dlogits.data(), n, width},
                                 {r.dlog_vars.empty() ? nullptr : r.dlog_vars.data(),
                                  static_cast<index_t>(r.dlog_vars.size())});
  r.total = losses.total;
  r.loss.assign(losses.loss.begin(), losses.loss.end());
  r.accuracy.assign(losses.accuracy.begin(), losses.accuracy.end());
  r.count.assign(losses.count.begin(), losses.count.end());
  r.dx.assign(static_cast<std::size_t>(n * d), 0.0f);
  r.dw = p.accumulate ? p.dw_in : std::vector<float>(static_cast<std::size_t>(total * d), 0.0f);
  r.db = p.bias ? (p.accumulate ? p.db_in : std::vector<float>(static_cast<std::size_t>(total)))
                : std::vector<float>();
  heads.backward({r.dlogits.data(), n, width}, {p.x.data(), n, d}, tasks, weights,
                 {r.dx.data(), n, d},
                 {{r.dw.data(), total, d},
                  {r.db.empty() ? nullptr : r.db.data(), static_cast<index_t>(r.db.size())},
                  p.accumulate},
                 ws);
  return r;
}

template struct CpuHeadsReference<1>;
template struct CpuHeadsReference<3>;
template struct CpuHeadsReference<4>;

moekit::DistillationLoss cpu_distillation(const moekit::DistillationConfig& config,
                                          const std::vector<float>& student,
                                          const std::vector<float>& teacher, std::int64_t n,
                                          std::int64_t c, const std::vector<std::int32_t>& labels,
                                          std::vector<float>& dstudent) {
  dstudent.assign(static_cast<std::size_t>(n * c), 0.0f);
  return moekit::cpu::distillation_loss(config, {student.data(), n, c}, {teacher.data(), n, c},
                                        {labels.data(), static_cast<index_t>(labels.size())},
                                        {dstudent.data(), n, c});
}

ExitRun cpu_early_exit(const moekit::EarlyExitConfig& config,
                       const std::vector<std::vector<float>>& exit_logits, std::int64_t n,
                       std::int64_t c) {
  const moekit::cpu::EarlyExit exits(config);
  ExitRun run;
  run.prediction.assign(static_cast<std::size_t>(n), 0);
  run.confidence.assign(static_cast<std::size_t>(n), 0.0f);
  run.exit.assign(static_cast<std::size_t>(n), 0);
  std::vector<index_t> original(static_cast<std::size_t>(n)), kept(static_cast<std::size_t>(n));
  std::vector<std::int32_t> previous(static_cast<std::size_t>(n)),
      agree(static_cast<std::size_t>(n));
  const moekit::cpu::ExitState state{{original.data(), n}, {previous.data(), n}, {agree.data(), n}};
  const moekit::cpu::ExitResults results{
      {run.prediction.data(), n}, {run.confidence.data(), n}, {run.exit.data(), n}};
  index_t m = exits.begin(n, state, results);
  for (int i = 0; i < config.num_exits && m > 0; ++i) {
    std::vector<float> live(static_cast<std::size_t>(m * c));
    for (index_t r = 0; r < m; ++r) {
      for (index_t k = 0; k < c; ++k) {
        live[static_cast<std::size_t>(r * c + k)] =
            exit_logits[static_cast<std::size_t>(i)]
                       [static_cast<std::size_t>(original[static_cast<std::size_t>(r)] * c + k)];
      }
    }
    m = exits.step(i, {live.data(), m, c}, state, results, {kept.data(), n});
    run.live.push_back(m);
    run.kept.emplace_back(kept.begin(), kept.begin() + m);
    run.original.emplace_back(original.begin(), original.begin() + m);
  }
  return run;
}

double cpu_multi_exit_loss(const std::vector<std::vector<float>>& logits, std::int64_t n,
                           std::int64_t c, const std::vector<std::int32_t>& labels,
                           const std::vector<float>& exit_weights,
                           std::vector<std::vector<float>>& dlogits,
                           std::vector<double>& exit_losses) {
  std::vector<MatrixView<const float>> in;
  std::vector<MatrixView<float>> out;
  dlogits.assign(logits.size(), std::vector<float>(static_cast<std::size_t>(n * c), 0.0f));
  exit_losses.assign(logits.size(), 0.0);
  for (std::size_t i = 0; i < logits.size(); ++i) {
    in.emplace_back(logits[i].data(), n, c);
    out.emplace_back(dlogits[i].data(), n, c);
  }
  return moekit::cpu::multi_exit_loss(
      in, {labels.data(), n}, {exit_weights.data(), static_cast<index_t>(exit_weights.size())}, out,
      {exit_losses.data(), static_cast<index_t>(exit_losses.size())});
}

// ---- end of task heads, distillation and early exit ------------------------

}  // namespace moekit_test
