// The CPU backend's side of the CUDA tests (see cpu_reference.hpp).
#include "cpu_reference.hpp"

#include <cstddef>

#include "moekit/cpu/aux_losses.hpp"
#include "moekit/cpu/dispatch.hpp"
#include "moekit/cpu/router.hpp"

namespace moekit_test {

using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
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
  r.scores.assign(tokens * e, 0.0f);
  r.weights.assign(tokens * k, 0.0f);
  r.ids.assign(tokens * k, 0);
  r.positions.assign(tokens * k, 0);
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
    std::vector<std::byte> workspace(router.workspace_size(tokens, 0));
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
  kept.positions.assign(r.tokens * K, 0);
  std::vector<float> dlogits(r.tokens * E, 0.0f);
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
  for (int e = 0; e < E; ++e) stats.assigned[e] = counts[e];
  bias.accumulate(stats);
  bias.update();
  return {bias.bias().data(), bias.bias().data() + E};
}

#define MOEKIT_TEST_DEFINE_REFERENCE(E, K) template struct CpuReference<E, K>;
MOEKIT_TEST_CUDA_SPECS(MOEKIT_TEST_DEFINE_REFERENCE)
#undef MOEKIT_TEST_DEFINE_REFERENCE

}  // namespace moekit_test
