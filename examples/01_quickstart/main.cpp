// 01_quickstart: the shape of a moekit model and what it costs.
//
// Today this example declares the reference configuration from compile-time
// specs, validates a batch through a view, and prints the parameter budget.
// Later versions run a real MoE + LoRA forward pass here.
#include <moekit/moekit.hpp>

#include <cstdio>
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
  return 0;
}
