// 03_routing: every gating rule moekit's router implements, a training step's
// routing (forward, balance losses, backward) and aux-loss-free balancing.
// docs/routing.md is cut from this file.
#include <moekit/moekit.hpp>

#include <cstdio>
#include <random>
#include <vector>

namespace {

using moekit::GatingRule;
using moekit::index_t;
using moekit::to_size;
using moekit::cpu::RouterConfig;

// [rules]
// Switch Transformer style: softmax, then top-k (Switch itself uses K = 1),
// capacity factor 1.25, multiplicative jitter on the router input.
RouterConfig switch_transformer() {
  RouterConfig c;
  c.gating.rule = GatingRule::kSoftmaxTopK;
  c.capacity = {1.25f, moekit::DropPolicy::kPosition};
  c.noise = {moekit::NoiseKind::kJitter, 0.01f, /*seed=*/1};
  return c;
}

// Mixtral: top-2 logits, weights = softmax over those two.
RouterConfig mixtral() {
  RouterConfig c;
  c.gating.rule = GatingRule::kTopKSoftmax;
  return c;
}

// Qwen-MoE and OLMoE: softmax over all experts, top-k, weights not
// renormalised (Qwen's norm_topk_prob = false).
RouterConfig qwen_olmoe() {
  RouterConfig c;
  c.gating.rule = GatingRule::kSoftmaxTopK;
  c.gating.renormalize = false;
  return c;
}

// DeepSeek-V3: sigmoid scores, selection on score + bias, 8 groups of which
// the 4 with the best top-2 sums are kept, weights renormalised and scaled.
RouterConfig deepseek_v3() {
  RouterConfig c;
  c.gating.rule = GatingRule::kSigmoid;
  c.gating.renormalize = true;
  c.gating.scaling = 2.5f;
  c.gating.num_groups = 8;
  c.gating.groups_kept = 4;
  c.gating.group_score_top = 2;
  return c;
}
// [rules]

}  // namespace

int main() {
  constexpr index_t T = 256, d = 64;
  using Spec = moekit::MoeSpec<16, 2>;
  constexpr int E = Spec::num_experts, K = Spec::top_k;

  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> x(T * d), w_gate(E * d);
  for (float& v : x) v = normal(rng);
  for (float& v : w_gate) v = 0.2f * normal(rng);

  // [forward]
  // The router writes into caller memory: logits and scores (T x E), expert
  // ids, weights and buffer positions (T x K).
  std::vector<float> logits(T * E), scores(T * E), weights(T * K);
  std::vector<std::int32_t> ids(T * K), positions(T * K);
  const moekit::cpu::Routing routing{{logits.data(), T, E},
                                     {scores.data(), T, E},
                                     {ids.data(), T, K},
                                     {weights.data(), T, K},
                                     {positions.data(), T, K}};

  const moekit::cpu::Router<Spec> router(switch_transformer());
  std::vector<std::byte> workspace(to_size(router.workspace_size(T, d)));  // jitter: T x d floats
  moekit::cpu::RoutingStats<Spec> stats;
  router.forward({x.data(), T, d}, {w_gate.data(), E, d}, /*gate_bias=*/{},
                 /*selection_bias=*/{}, routing, &stats, moekit::view_of(workspace));
  std::printf(
      "switch: capacity %lld per expert, dropped %lld of %lld, max load %.2fx mean, "
      "entropy %.3f of %.3f\n",
      static_cast<long long>(router.capacity(T)), static_cast<long long>(stats.dropped),
      static_cast<long long>(T * K), stats.max_load_ratio(), stats.entropy(),
      std::log(static_cast<double>(E)));
  // [forward]

  // [backward]
  // A training step: balance losses add their gradients to the gate's.
  std::vector<float> dweights(T * K, 0.1f), dlogits(T * E);
  router.backward_gate(routing, {dweights.data(), T, K}, {dlogits.data(), T, E});
  const double aux = moekit::cpu::switch_loss<Spec>(router.config().gating.rule, routing, {},
                                                    /*coeff=*/1e-2f, {dlogits.data(), T, E});
  const double z = moekit::cpu::z_loss<Spec>(routing, /*coeff=*/1e-3f, {dlogits.data(), T, E});
  std::vector<float> dx(T * d), dw_gate(E * d);
  router.backward_logits({x.data(), T, d}, {w_gate.data(), E, d}, {dlogits.data(), T, E},
                         {.dx = {dx.data(), T, d}, .dw_gate = {dw_gate.data(), E, d}},
                         moekit::view_of(workspace));
  std::printf("switch: aux loss %.4f (1 = balanced), z-loss %.4f\n", aux, z);
  // The forward's statistics already carry both values, bit for bit.
  if (moekit::cpu::switch_loss<Spec>(stats) != aux || stats.z_loss != z) return 1;
  // [backward]

  for (const auto& [name, config] :
       {std::pair{"mixtral", mixtral()}, std::pair{"qwen/olmoe", qwen_olmoe()}}) {
    const moekit::cpu::Router<Spec> r(config);
    std::vector<std::byte> ws(to_size(r.workspace_size(T, d)));  // the logits product's buffers
    r.forward({x.data(), T, d}, {w_gate.data(), E, d}, {}, {}, routing, &stats,
              moekit::view_of(ws));
    std::printf("%s: token 0 -> experts %d, %d with weights %.3f, %.3f\n", name, ids[0], ids[1],
                static_cast<double>(weights[0]), static_cast<double>(weights[1]));
  }

  // [bias]
  // Aux-loss-free balancing: a per-expert selection bias, nudged after each
  // step toward the experts that received fewer tokens than the mean.
  using Big = moekit::MoeSpec<64, 8>;
  std::vector<float> big_logits(T * 64), big_scores(T * 64), big_weights(T * 8);
  std::vector<std::int32_t> big_ids(T * 8), big_positions(T * 8);
  const moekit::cpu::Routing big{{big_logits.data(), T, 64},
                                 {big_scores.data(), T, 64},
                                 {big_ids.data(), T, 8},
                                 {big_weights.data(), T, 8},
                                 {big_positions.data(), T, 8}};
  const moekit::cpu::Router<Big> deepseek(deepseek_v3());
  moekit::cpu::ExpertBias<Big> balancer(/*gamma=*/0.01f);
  moekit::cpu::RoutingStats<Big> big_stats;
  for (int step = 0; step <= 200; ++step) {
    for (index_t t = 0; t < T; ++t) {  // skewed logits: later experts favoured
      for (int e = 0; e < 64; ++e)
        big_logits[to_size(t * 64 + e)] = 0.05f * static_cast<float>(e) + normal(rng);
    }
    deepseek.route(big, balancer.bias(), &big_stats);
    balancer.accumulate(big_stats);
    balancer.update();
    if (step % 100 == 0) {
      std::printf("deepseek-v3 step %3d: max load %.2fx mean, %.0f%% of experts used\n", step,
                  big_stats.max_load_ratio(), 100.0 * big_stats.utilization());
    }
  }
  // [bias]
  return 0;
}
