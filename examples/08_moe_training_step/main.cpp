// 08_moe_training_step: training an MoeLayer with plain SGD. A student layer
// learns to imitate a teacher layer of the same shape on a fixed batch: each
// step runs forward, a mean-squared-error loss plus the balance losses,
// backward, and an SGD update of the router and expert weights, with the
// router on its own learning rate. The program checks that the loss goes
// down and returns non-zero if it does not.
#include <moekit/moekit.hpp>

#include <cstdio>
#include <random>
#include <vector>

namespace {

using moekit::index_t;

std::vector<float> random_vector(std::mt19937& rng, index_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
}

void sgd(std::vector<float>& w, const std::vector<float>& grad, float lr) {
  for (std::size_t i = 0; i < w.size(); ++i) w[i] -= lr * grad[i];
}

}  // namespace

int main() {
  // [setup]
  // A small layer: 4 experts, 2 per token, SwiGLU experts, Mixtral routing,
  // with the Switch balance loss and the router z-loss switched on.
  using Spec = moekit::MoeSpec<4, 2>;
  constexpr int E = Spec::num_experts;
  constexpr index_t T = 128, d = 16, f = 32;  // tokens, d_model, d_ff per expert

  moekit::cpu::MoeLayerConfig config;
  config.d_model = d;
  config.d_ff = f;
  config.kind = moekit::FfnKind::kGated;
  config.activation = moekit::Activation::kSilu;
  config.router.gating.rule = moekit::GatingRule::kTopKSoftmax;
  config.switch_coeff = 1e-2f;
  config.z_coeff = 1e-3f;
  const moekit::cpu::MoeLayer<Spec> layer(config);

  // Parameters: router W_gate (E x d) and the experts' W1, W3 ((E d_ff) x d)
  // and W2 ((E d) x d_ff), as torch.nn.Linear lays them out.
  std::mt19937 rng(8);
  std::vector<float> w_gate = random_vector(rng, E * d, 0.1f);
  std::vector<float> w1 = random_vector(rng, E * f * d, 0.25f);
  std::vector<float> w3 = random_vector(rng, E * f * d, 0.25f);
  std::vector<float> w2 = random_vector(rng, E * d * f, 0.25f);
  // Views of the weights: SGD below updates the vectors in place.
  const moekit::cpu::MoeLayerParams params{
      .w_gate = {w_gate.data(), E, d},
      .experts = {{w1.data(), E * f, d}, {w3.data(), E * f, d}, {w2.data(), E * d, f}}};

  // The task: match a teacher layer (same shape, other weights) on a batch.
  const std::vector<float> x = random_vector(rng, T * d, 1.0f);
  const std::vector<float> t_gate = random_vector(rng, E * d, 1.0f),
                           t1 = random_vector(rng, E * f * d, 0.25f),
                           t3 = random_vector(rng, E * f * d, 0.25f),
                           t2 = random_vector(rng, E * d * f, 0.25f);
  moekit::cpu::MoeLayerStorage<Spec> storage(layer, T);  // saved state + workspace, allocated once
  std::vector<float> target(T * d);
  layer.forward({x.data(), T, d},
                {.w_gate = {t_gate.data(), E, d},
                 .experts = {{t1.data(), E * f, d}, {t3.data(), E * f, d}, {t2.data(), E * d, f}}},
                storage.state(), {target.data(), T, d}, nullptr, storage.workspace());
  // [setup]

  // [step]
  // Per-component learning rates, as in the reference training recipe: the
  // router moves faster than the experts.
  constexpr float lr_experts = 0.5f, lr_gate = 1.0f;
  std::vector<float> y(T * d), dy(T * d);
  std::vector<float> dw_gate(w_gate.size()), dw1(w1.size()), dw3(w3.size()), dw2(w2.size());
  const moekit::cpu::MoeLayerGrads grads{.dw_gate = {dw_gate.data(), E, d},
                                         .dw1 = {dw1.data(), E * f, d},
                                         .dw3 = {dw3.data(), E * f, d},
                                         .dw2 = {dw2.data(), E * d, f}};
  double first = 0.0, last = 0.0;
  for (int step = 0; step <= 300; ++step) {
    // Forward: the layer's output, its saved state and the routing statistics.
    moekit::cpu::RoutingStats<Spec> stats;
    const moekit::cpu::MoeAuxLosses aux = layer.forward(
        {x.data(), T, d}, params, storage.state(), {y.data(), T, d}, &stats, storage.workspace());

    // Loss: L = mse + switch_coeff * L_switch + z_coeff * L_z. Only dL/dy of
    // the task loss is ours to give; backward adds the balance losses' part.
    double mse = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      const float diff = y[i] - target[i];
      mse += 0.5 * diff * diff / T;
      dy[i] = diff / static_cast<float>(T);
    }
    const double loss = mse + aux.total;

    // Backward (no dx: the input is data), then SGD on router and experts.
    layer.backward({dy.data(), T, d}, {x.data(), T, d}, params, storage.state(), {}, grads,
                   storage.workspace());
    sgd(w_gate, dw_gate, lr_gate);
    sgd(w1, dw1, lr_experts);
    sgd(w3, dw3, lr_experts);
    sgd(w2, dw2, lr_experts);

    if (step == 0) first = loss;
    last = loss;
    if (step % 50 == 0) {
      std::printf(
          "step %3d: loss %.5f = mse %.5f + aux %.5f (Switch %.3f, z %.3f), max load %.2fx\n", step,
          loss, mse, aux.total, aux.switch_loss, aux.z_loss, stats.max_load_ratio());
    }
  }
  // [step]

  std::printf("loss %.5f -> %.5f\n", first, last);
  if (!(last < 0.5 * first)) {
    std::printf("FAILED: the loss did not fall below half its first value\n");
    return 1;
  }
  return 0;
}
