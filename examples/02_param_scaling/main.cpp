// 02_param_scaling: how the reference model grows with its branches.
//
// For 3, 10, 30 and 100 branches it prints total, active and trainable
// parameters, and sets each beside a dense model of the same total size, in
// which every parameter is active for every sample. All numbers are computed
// at compile time from the specs, and checked against the counts written out
// by hand; the program exits with 1 if the table's claim does not hold.
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

// The counts written out from the shapes: the encoder (token and position
// embeddings; per layer Q, K, V, O with biases, an FFN with biases and two
// LayerNorms; a final LayerNorm), two MoE layers of E gated experts and a
// router, the frozen d x d projection, and per branch a rank-R adapter and a
// linear head with bias. Active: the router, K experts and one branch.
constexpr moekit::param_t kD = 768, kFf = 3072, kLayers = 6, kVocab = 32000, kPositions = 512;
constexpr moekit::param_t kEncoder =
    (kVocab + kPositions) * kD +
    kLayers * ((4 * kD * kD + 4 * kD) + (2 * kD * kFf + kFf + kD) + 2 * (2 * kD)) + 2 * kD;
constexpr moekit::param_t kMoeLayer = 8 * kD + 8 * (3 * kD * kFf);
constexpr moekit::param_t kMoeActive = 8 * kD + 2 * (3 * kD * kFf);
constexpr moekit::param_t kBranch = 8 * (kD + kD) + 16 * (kD + 1);
template <int Branches>
constexpr bool counts_as_written =
    params<Branches>.total.total ==
    kEncoder + 2 * kMoeLayer + kD* kD + Branches* kBranch&& params<Branches>.total.active ==
    kEncoder + 2 * kMoeActive + kD* kD + kBranch&& params<Branches>.total.trainable ==
    2 * kMoeLayer + Branches* kBranch;
static_assert(counts_as_written<3> && counts_as_written<10> && counts_as_written<30> &&
              counts_as_written<100>);

double millions(moekit::param_t n) { return static_cast<double>(n) / 1e6; }

// The table's claim, checked: with more branches the model stores more but a
// sample still uses the same parameters, so the active share falls and the
// dense model's cost ratio rises.
template <int Fewer, int More>
bool scales() {
  return params<More>.total.total > params<Fewer>.total.total &&
         params<More>.total.active == params<Fewer>.total.active &&
         params<More>.total.active_fraction() < params<Fewer>.total.active_fraction();
}

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
  if (!scales<3, 10>() || !scales<10, 30>() || !scales<30, 100>()) {
    std::printf("wrong: the active share does not fall as branches are added\n");
    return 1;
  }
  return 0;
}
