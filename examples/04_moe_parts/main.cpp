// 04_moe_parts: an MoE layer assembled from moekit's parts on the CPU
// backend - router, dispatch, grouped expert FFNs, combine - forward and
// backward, checked against the composed moekit::cpu::MoeLayer (the program
// exits with 1 when they disagree). docs/moe_layer.md is cut from this file.
#include <moekit/moekit.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using moekit::index_t;
using moekit::to_size;

std::vector<float> random_vector(std::mt19937& rng, index_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
}

}  // namespace

int main() {
  // [setup]
  using Spec = moekit::MoeSpec<8, 2>;
  constexpr int E = Spec::num_experts, K = Spec::top_k;
  constexpr index_t T = 128, d = 64, f = 128;  // tokens, d_model, d_ff per expert

  moekit::cpu::RouterConfig routing_config;
  routing_config.gating.rule = moekit::GatingRule::kTopKSoftmax;  // Mixtral
  routing_config.capacity.factor = 1.25;
  const moekit::cpu::Router<Spec> router(routing_config);
  const moekit::cpu::ExpertFfn<Spec> experts({.d_model = d,
                                              .d_ff = f,
                                              .kind = moekit::FfnKind::kGated,
                                              .activation = moekit::Activation::kSilu});

  std::mt19937 rng(3);
  const std::vector<float> x = random_vector(rng, T * d, 1.0f);
  const std::vector<float> w_gate = random_vector(rng, E * d, 0.1f);
  const std::vector<float> w1 = random_vector(rng, E * f * d, 0.1f);  // SwiGLU: W1, W3, W2
  const std::vector<float> w3 = random_vector(rng, E * f * d, 0.1f);
  const std::vector<float> w2 = random_vector(rng, E * d * f, 0.1f);
  const moekit::cpu::ExpertWeights weights{
      {w1.data(), E * f, d}, {w3.data(), E * f, d}, {w2.data(), E * d, f}};
  // [setup]

  // [forward]
  // Routing: ids, weights and each kept assignment's row in its expert's buffer.
  std::vector<float> logits(T * E), scores(T * E), gate(T * K);
  std::vector<std::int32_t> ids(T * K), positions(T * K);
  const moekit::cpu::Routing routing{{logits.data(), T, E},
                                     {scores.data(), T, E},
                                     {ids.data(), T, K},
                                     {gate.data(), T, K},
                                     {positions.data(), T, K}};
  moekit::cpu::RoutingStats<Spec> stats;
  router.forward({x.data(), T, d}, {w_gate.data(), E, d}, {}, {}, routing, &stats);

  // Dispatch: the kept token rows, grouped by expert (rows of expert e are
  // [offsets[e], offsets[e + 1]), in token order).
  std::vector<index_t> offsets(E + 1);
  const index_t n = moekit::cpu::dispatch_offsets<Spec>(routing, {offsets.data(), E + 1});
  const moekit::VectorView<const index_t> offsets_view(offsets.data(), E + 1);
  const std::size_t rows = to_size(n);
  std::vector<float> buffer(rows * d), expert_out(rows * d), pre(rows * f), gate_pre(rows * f);
  moekit::cpu::dispatch<Spec>({x.data(), T, d}, routing, offsets_view, {buffer.data(), n, d});

  // Experts: one grouped GEMM pass; pre-activations are kept for backward.
  std::vector<std::byte> workspace(to_size(experts.workspace_size(n)));
  experts.forward({buffer.data(), n, d}, offsets_view, weights, {expert_out.data(), n, d},
                  {pre.data(), n, f}, {gate_pre.data(), n, f}, moekit::view_of(workspace));

  // Combine: y[t] = sum_k weight(t, k) * expert_out[row(t, k)], fixed order.
  std::vector<float> y(T * d);
  moekit::cpu::combine<Spec>({expert_out.data(), n, d}, routing, offsets_view, {y.data(), T, d});
  // [forward]

  // [backward]
  // Given dL/dy: weights and experts first, then the tokens, then the router.
  const std::vector<float> dy = random_vector(rng, T * d, 1.0f);
  std::vector<float> d_expert_out(rows * d), dweights(T * K), d_buffer(rows * d);
  moekit::cpu::combine_backward<Spec>({dy.data(), T, d}, {expert_out.data(), n, d}, routing,
                                      offsets_view, {d_expert_out.data(), n, d},
                                      {dweights.data(), T, K});
  std::vector<float> dw1(w1.size()), dw3(w3.size()), dw2(w2.size());
  experts.backward({d_expert_out.data(), n, d}, {buffer.data(), n, d}, offsets_view, weights,
                   {pre.data(), n, f}, {gate_pre.data(), n, f}, {d_buffer.data(), n, d},
                   {{dw1.data(), E * f, d}, {dw3.data(), E * f, d}, {dw2.data(), E * d, f}},
                   moekit::view_of(workspace));
  std::vector<float> dx(T * d), dlogits(T * E), dw_gate(E * d);
  moekit::cpu::dispatch_backward<Spec>({d_buffer.data(), n, d}, routing, offsets_view,
                                       {dx.data(), T, d});
  router.backward_gate(routing, {dweights.data(), T, K}, {dlogits.data(), T, E});
  moekit::cpu::switch_loss<Spec>(routing_config.gating.rule, routing, {}, 1e-2f,
                                 {dlogits.data(), T, E});
  router.backward_logits({x.data(), T, d}, {w_gate.data(), E, d}, {dlogits.data(), T, E},
                         {.dx = {dx.data(), T, d},
                          .dw_gate = {dw_gate.data(), E, d},
                          .dbias = {},
                          .accumulate = true});  // x feeds router and experts
  // [backward]

  double y_norm = 0, dx_norm = 0;
  for (float v : y) y_norm += double(v) * v;
  for (float v : dx) dx_norm += double(v) * v;
  std::printf(
      "MoE E=%d K=%d, T=%lld: %lld of %lld assignments kept (capacity %lld), "
      "max load %.2fx mean\n",
      E, K, static_cast<long long>(T), static_cast<long long>(n), static_cast<long long>(T * K),
      static_cast<long long>(router.capacity(T)), stats.max_load_ratio());
  std::printf("|y| = %.4f, |dx| = %.4f\n", std::sqrt(y_norm), std::sqrt(dx_norm));

  // Check (CTest runs this example): the parts compose to what
  // moekit::cpu::MoeLayer computes with the same configuration and weights,
  // forward and backward (its gradients include the same Switch loss term).
  moekit::cpu::MoeLayerConfig layer_config;
  layer_config.d_model = d;
  layer_config.d_ff = f;
  layer_config.kind = moekit::FfnKind::kGated;
  layer_config.activation = moekit::Activation::kSilu;
  layer_config.router = routing_config;
  layer_config.switch_coeff = 1e-2f;
  const moekit::cpu::MoeLayer<Spec> layer(layer_config);
  moekit::cpu::MoeLayerStorage<Spec> storage(layer, T);
  const moekit::cpu::MoeLayerParams layer_params{.w_gate = {w_gate.data(), E, d},
                                                 .experts = weights};
  std::vector<float> layer_y(y.size()), layer_dx(dx.size()), layer_dw_gate(dw_gate.size()),
      layer_dw1(dw1.size()), layer_dw3(dw3.size()), layer_dw2(dw2.size());
  layer.forward({x.data(), T, d}, layer_params, storage.state(), {layer_y.data(), T, d}, nullptr,
                storage.workspace());
  moekit::cpu::MoeLayerGrads layer_grads;
  layer_grads.dw_gate = {layer_dw_gate.data(), E, d};
  layer_grads.dw1 = {layer_dw1.data(), E * f, d};
  layer_grads.dw3 = {layer_dw3.data(), E * f, d};
  layer_grads.dw2 = {layer_dw2.data(), E * d, f};
  layer.backward({dy.data(), T, d}, {x.data(), T, d}, layer_params, storage.state(),
                 {layer_dx.data(), T, d}, layer_grads, storage.workspace());
  const auto rel_diff = [](const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
      den += double(b[i]) * b[i];
    }
    return std::sqrt(num / den);
  };
  const double worst =
      std::max({rel_diff(y, layer_y), rel_diff(dx, layer_dx), rel_diff(dw_gate, layer_dw_gate),
                rel_diff(dw1, layer_dw1), rel_diff(dw3, layer_dw3), rel_diff(dw2, layer_dw2)});
  std::printf("parts vs MoeLayer: largest relative difference %.2e\n", worst);
  return worst < 1e-5 ? 0 : 1;
}
