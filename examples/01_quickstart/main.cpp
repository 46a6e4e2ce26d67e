// 01_quickstart: the shape of a moekit model, what it costs, and a real MoE
// layer forward pass with its routing statistics. (LoRA adapters and heads
// join this example when they land.)
// [include]
#include <moekit/moekit.hpp>  // the portable and CPU parts (moekit/moekit.cuh: CUDA)
// [include]

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

// [specs]
// The structural numbers are template parameters, checked at compile time:
// moekit::MoeSpec<4, 5> (K > E) does not compile.
using Moe = moekit::MoeSpec<8, 2>;  // 8 experts, 2 per token
using Lora = moekit::LoraSpec<8>;   // rank-8 adapters
using Heads = moekit::HeadSpec<3>;  // 3 task branches

constexpr moekit::ReferenceModelShape kShape{
    .encoder = {.kind = moekit::EncoderKind::kMlp,
                .d_input = 256,
                .d_model = 512,
                .d_ff = 2048,
                .num_layers = 4},
    .moe = {.d_model = 512, .d_ff = 1024, .kind = moekit::FfnKind::kGated},
    .num_moe_layers = 2,
    .classes_per_branch = 10};

constexpr moekit::ModelParams kParams = moekit::reference_model_params<Moe, Lora, Heads>(kShape);
static_assert(kParams.total.active < kParams.total.total);
// [specs]

namespace {

void print_row(const char* name, const moekit::ParamCount& p) {
  std::printf("  %-22s %12lld %12lld %12lld\n", name, static_cast<long long>(p.total),
              static_cast<long long>(p.active), static_cast<long long>(p.trainable));
}

}  // namespace

int main() {
  std::printf("moekit %s quickstart\n\n", MOEKIT_VERSION_STRING);
  std::printf("MoeSpec<E=%d, K=%d>, LoraSpec<R=%d>, HeadSpec<H=%d>\n\n", Moe::num_experts,
              Moe::top_k, Lora::rank, Heads::num_heads);

  std::printf("  %-22s %12s %12s %12s\n", "component", "total", "active", "trainable");
  print_row("frozen encoder", kParams.encoder);
  print_row("MoE layers (x2)", kParams.moe);
  print_row("adapter base (frozen)", kParams.adapter_base);
  print_row("one branch", kParams.branch);
  print_row("whole model", kParams.total);
  std::printf("\nactive / total = %.3f; adding a branch costs %lld parameters\n\n",
              kParams.total.active_fraction(), static_cast<long long>(kParams.branch.total));

  // [views]
  // Views wrap caller memory without copying; API boundaries validate them.
  std::vector<float> tokens(4 * 512, 0.5f);
  const moekit::MatrixView<const float> x(tokens.data(), 4, 512);
  moekit::check_shape(x, 4, kShape.moe.d_model, "x");
  try {
    moekit::check_shape(x, 4, 256, "x");
  } catch (const moekit::Error& e) {
    std::printf("rejected: %s\n", e.what());
  }
  // [views]

  // [layer]
  // One MoE layer of the model above: Mixtral-style routing, SwiGLU experts,
  // a Switch balance loss. Parameters and saved state are caller memory;
  // MoeLayerStorage owns the state for up to 256 tokens.
  moekit::cpu::MoeLayerConfig config;
  config.d_model = kShape.moe.d_model;
  config.d_ff = kShape.moe.d_ff;
  config.kind = moekit::FfnKind::kGated;
  config.activation = moekit::Activation::kSilu;
  config.router.gating.rule = moekit::GatingRule::kTopKSoftmax;
  config.switch_coeff = 1e-2f;
  const moekit::cpu::MoeLayer<Moe> layer(config);

  constexpr moekit::index_t T = 256, d = kShape.moe.d_model, f = kShape.moe.d_ff;
  constexpr int E = Moe::num_experts;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::vector<float> w_gate(E * d), w1(E * f * d), w3(E * f * d), w2(E * d * f), input(T * d);
  for (auto* v : {&w_gate, &w1, &w3, &w2, &input}) {
    for (float& value : *v) value = normal(rng);
  }
  const moekit::cpu::MoeLayerParams params{
      .w_gate = {w_gate.data(), E, d},
      .experts = {{w1.data(), E * f, d}, {w3.data(), E * f, d}, {w2.data(), E * d, f}}};

  moekit::cpu::MoeLayerStorage<Moe> storage(layer, T);
  std::vector<float> output(T * d);
  moekit::cpu::RoutingStats<Moe> stats;
  const moekit::cpu::MoeAuxLosses aux =
      layer.forward({input.data(), T, d}, params, storage.state(), {output.data(), T, d}, &stats,
                    storage.workspace());
  std::printf("\nMoE layer forward, %lld tokens: Switch loss %.4f (1 = balanced)\n",
              static_cast<long long>(T), aux.switch_loss);
  std::printf("tokens per expert:");
  for (moekit::index_t count : stats.assigned) std::printf(" %lld", static_cast<long long>(count));
  std::printf("\nutilisation %.0f%%, busiest expert %.2fx the mean, routing entropy %.3f of %.3f\n",
              100.0 * stats.utilization(), stats.max_load_ratio(), stats.entropy(),
              std::log(static_cast<double>(E)));
  // [layer]
  return 0;
}
