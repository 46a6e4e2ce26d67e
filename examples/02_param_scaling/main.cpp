// 02_param_scaling: how the reference model grows with its branches.
//
// For 3, 10, 30 and 100 branches it prints total, active and trainable
// parameters, and sets each beside a dense model of the same total size, in
// which every parameter is active for every sample. All numbers are computed
// at compile time from the specs.
#include <moekit/moekit.hpp>

#include <cstdio>
#include <utility>

namespace {

using Moe = moekit::MoeSpec<8, 2>;
using Lora = moekit::LoraSpec<8>;

// [shape]
constexpr moekit::ReferenceModelShape kShape{
    .encoder = {.kind = moekit::EncoderKind::kTransformer,
                .d_input = 32000,
                .d_model = 768,
                .d_ff = 3072,
                .num_layers = 6,
                .max_positions = 512},
    .moe = {.d_model = 768, .d_ff = 3072, .kind = moekit::FfnKind::kGated},
    .num_moe_layers = 2,
    .classes_per_branch = 16};

template <int Branches>
constexpr moekit::ModelParams params =
    moekit::reference_model_params<Moe, Lora, moekit::HeadSpec<Branches>>(kShape);

// Adding a branch costs one adapter and one head, whatever the branch count.
static_assert(params<101>.total.total - params<100>.total.total == params<100>.branch.total);
// [shape]

double millions(moekit::param_t n) { return static_cast<double>(n) / 1e6; }

template <int Branches>
void print_row() {
  constexpr moekit::ParamCount p = params<Branches>.total;
  // A dense model holding the same parameters uses all of them per sample:
  // its FLOPs per sample are total / active times the MoE model's.
  std::printf("%8d %11.2fM %11.2fM %8.3f %11.2fM %9.3f %11.2fM %8.3f %9.2fx\n", Branches,
              millions(p.total), millions(p.active), p.active_fraction(), millions(p.trainable),
              static_cast<double>(p.trainable) / static_cast<double>(p.total), millions(p.total),
              1.0, static_cast<double>(p.total) / static_cast<double>(p.active));
}

template <int... Branches>
void print_table(std::integer_sequence<int, Branches...>) {
  (print_row<Branches>(), ...);
}

}  // namespace

int main() {
  std::printf(
      "reference model: encoder %.2fM (frozen), %d MoE layers E=%d K=%d %.2fM, "
      "LoRA R=%d, %lld classes per branch\n",
      millions(params<1>.encoder.total), kShape.num_moe_layers, Moe::num_experts, Moe::top_k,
      millions(params<1>.moe.total), Lora::rank, static_cast<long long>(kShape.classes_per_branch));
  std::printf(
      "cost of one more branch: %lld parameters (adapter %lld + head %lld)\n\n",
      static_cast<long long>(params<1>.branch.total),
      static_cast<long long>(moekit::lora_params<Lora>(768, 768).total),
      static_cast<long long>(params<1>.branch.total - moekit::lora_params<Lora>(768, 768).total));
  std::printf("%8s %12s %12s %8s %12s %9s | %12s %8s %10s\n", "branches", "MoE total", "active",
              "act/tot", "trainable", "train/tot", "dense total", "act/tot", "dense FLOPs");
  print_table(std::integer_sequence<int, 3, 10, 30, 100>{});
  std::printf(
      "\n'dense FLOPs' is the dense model's compute per sample relative to the MoE "
      "model's (2 FLOPs per active parameter).\n");
  return 0;
}
