// 01_quickstart: the shape of a moekit model, what it costs, and a real MoE
// layer forward pass with its routing statistics. It checks what it
// computes and exits with 1 when a result is wrong.
// [include]
#include <moekit/moekit.hpp>  // the portable and CPU parts (moekit/moekit.cuh: CUDA)
// [include]

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <random>
#include <utility>
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

// The parameter counts of this configuration, written out: each MoE layer
// holds a router (E x d) and E SwiGLU experts (three d x d_ff matrices) of
// which a token uses K; a branch is a rank-R adapter on a d x d projection
// and a linear head with bias.
constexpr moekit::param_t kD = kShape.moe.d_model, kF = kShape.moe.d_ff;
constexpr moekit::param_t kExpert = 3 * kD * kF;
static_assert(kParams.moe.total == 2 * (Moe::num_experts * kD + Moe::num_experts * kExpert));
static_assert(kParams.moe.active == 2 * (Moe::num_experts * kD + Moe::top_k * kExpert));
static_assert(kParams.branch.total == Lora::rank * 2 * kD + kShape.classes_per_branch * (kD + 1));
static_assert(kParams.total.total == kParams.encoder.total + kParams.moe.total + kD * kD +
                                         Heads::num_heads * kParams.branch.total);
static_assert(kParams.total.trainable ==
              kParams.moe.total + Heads::num_heads * kParams.branch.total);

namespace {

// Token t's output recomputed in double from the weights, as the layer is
// configured: Mixtral routing (the two largest logits, a softmax over the
// two) and SwiGLU experts, silu(x W1^T) * (x W3^T) W2^T.
std::vector<double> reference_output(const std::vector<float>& x, const std::vector<float>& w_gate,
                                     const std::vector<float>& w1, const std::vector<float>& w3,
                                     const std::vector<float>& w2, moekit::index_t t,
                                     moekit::index_t d, moekit::index_t f, int experts) {
  const auto at = [](const std::vector<float>& v, moekit::index_t i) {
    return static_cast<double>(v[static_cast<std::size_t>(i)]);
  };
  std::vector<double> logits(static_cast<std::size_t>(experts));
  for (int e = 0; e < experts; ++e) {
    for (moekit::index_t i = 0; i < d; ++i) {
      logits[static_cast<std::size_t>(e)] += at(w_gate, e * d + i) * at(x, t * d + i);
    }
  }
  int first = 0, second = -1;  // the two largest, ties to the lower expert
  for (int e = 1; e < experts; ++e) {
    if (logits[static_cast<std::size_t>(e)] > logits[static_cast<std::size_t>(first)]) first = e;
  }
  for (int e = 0; e < experts; ++e) {
    if (e != first && (second < 0 || logits[static_cast<std::size_t>(e)] >
                                         logits[static_cast<std::size_t>(second)])) {
      second = e;
    }
  }
  const double gap =
      logits[static_cast<std::size_t>(second)] - logits[static_cast<std::size_t>(first)];
  const double w_first = 1.0 / (1.0 + std::exp(gap));
  std::vector<double> y(static_cast<std::size_t>(d), 0.0);
  for (const auto& [e, w] : {std::pair{first, w_first}, std::pair{second, 1.0 - w_first}}) {
    for (moekit::index_t h = 0; h < f; ++h) {
      double a = 0.0, g = 0.0;
      for (moekit::index_t i = 0; i < d; ++i) {
        a += at(w1, (e * f + h) * d + i) * at(x, t * d + i);
        g += at(w3, (e * f + h) * d + i) * at(x, t * d + i);
      }
      const double act = a / (1.0 + std::exp(-a)) * g;
      for (moekit::index_t j = 0; j < d; ++j) {
        y[static_cast<std::size_t>(j)] += w * at(w2, (e * d + j) * f + h) * act;
      }
    }
  }
  return y;
}

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

  // Checks (CTest runs this example): every token went to K experts (the
  // layer is dropless), and a few tokens' outputs match the double-precision
  // recomputation.
  moekit::index_t assigned = 0;
  for (moekit::index_t count : stats.assigned) assigned += count;
  if (assigned != T * Moe::top_k || stats.dropped != 0) {
    std::printf("wrong routing: %lld assignments, %lld dropped\n", static_cast<long long>(assigned),
                static_cast<long long>(stats.dropped));
    return 1;
  }
  for (moekit::index_t t : {moekit::index_t{0}, T / 2, T - 1}) {
    const std::vector<double> ref = reference_output(input, w_gate, w1, w3, w2, t, d, f, E);
    double num = 0.0, den = 0.0;
    for (moekit::index_t j = 0; j < d; ++j) {
      const double diff =
          output[static_cast<std::size_t>(t * d + j)] - ref[static_cast<std::size_t>(j)];
      num += diff * diff;
      den += ref[static_cast<std::size_t>(j)] * ref[static_cast<std::size_t>(j)];
    }
    if (!(std::sqrt(num / den) < 1e-4)) {
      std::printf("token %lld: output differs from the reference by %.3g (relative)\n",
                  static_cast<long long>(t), std::sqrt(num / den));
      return 1;
    }
  }
  std::printf("checked: routing counts and tokens 0, %lld, %lld against double precision\n",
              static_cast<long long>(T / 2), static_cast<long long>(T - 1));
  return 0;
}
