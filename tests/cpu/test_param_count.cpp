#include <gtest/gtest.h>

#include <array>

#include "moekit/nn/param_count.hpp"

namespace {

using moekit::EncoderKind;
using moekit::EncoderShape;
using moekit::FfnKind;
using moekit::HeadSpec;
using moekit::LoraSpec;
using moekit::MoeLayerShape;
using moekit::MoeSpec;
using moekit::param_t;
using moekit::ParamCount;

// Mixtral-8x7B's MoE layer: d = 4096, d_ff = 14336, SwiGLU experts, E = 8, K = 2.
constexpr MoeLayerShape kMixtral{.d_model = 4096, .d_ff = 14336, .kind = FfnKind::kGated};
constexpr ParamCount kMixtralLayer = moekit::moe_layer_params<MoeSpec<8, 2>>(kMixtral);
static_assert(kMixtralLayer.total == 8LL * 3 * 4096 * 14336 + 4096 * 8);
static_assert(kMixtralLayer.active == 2LL * 3 * 4096 * 14336 + 4096 * 8);
// 32 layers hold the well-known ~45.1B expert parameters.
static_assert(32 * kMixtralLayer.total == 45'097'156'608LL + 32 * 4096 * 8);

TEST(ParamCount, FfnShapes) {
  EXPECT_EQ(moekit::ffn_param_count({10, 20, FfnKind::kPlain, false}), 2 * 10 * 20);
  EXPECT_EQ(moekit::ffn_param_count({10, 20, FfnKind::kGated, false}), 3 * 10 * 20);
  EXPECT_EQ(moekit::ffn_param_count({10, 20, FfnKind::kPlain, true}), 2 * 10 * 20 + 20 + 10);
  EXPECT_EQ(moekit::ffn_param_count({10, 20, FfnKind::kGated, true}), 3 * 10 * 20 + 40 + 10);
}

TEST(ParamCount, MoeLayerWithSharedExpertsAndBiases) {
  // DeepSeek-V3-like layer: 256 routed experts of d_ff 2048, K = 8, one shared.
  constexpr MoeLayerShape shape{
      .d_model = 7168, .d_ff = 2048, .kind = FfnKind::kGated, .num_shared_experts = 1};
  constexpr ParamCount p = moekit::moe_layer_params<MoeSpec<256, 8>>(shape);
  constexpr param_t expert = 3LL * 7168 * 2048;
  EXPECT_EQ(p.total, 256 * 7168 + 256 * expert + expert);
  EXPECT_EQ(p.active, 256 * 7168 + 8 * expert + expert);
  EXPECT_EQ(p.trainable, p.total);

  constexpr MoeLayerShape biased{.d_model = 8,
                                 .d_ff = 16,
                                 .kind = FfnKind::kPlain,
                                 .expert_bias = true,
                                 .router_bias = true,
                                 .num_shared_experts = 2,
                                 .d_ff_shared = 4};
  constexpr ParamCount q = moekit::moe_layer_params<MoeSpec<4, 1>>(biased);
  constexpr param_t routed = 2 * 8 * 16 + 16 + 8;
  constexpr param_t shared = 2 * 8 * 4 + 4 + 8;
  EXPECT_EQ(q.total, (8 * 4 + 4) + 4 * routed + 2 * shared);
  EXPECT_EQ(q.active, (8 * 4 + 4) + routed + 2 * shared);
}

TEST(ParamCount, KEqualsEIsFullyActive) {
  constexpr ParamCount p = moekit::moe_layer_params<MoeSpec<4, 4>>({.d_model = 16, .d_ff = 32});
  EXPECT_EQ(p.active, p.total);
  EXPECT_DOUBLE_EQ(p.active_fraction(), 1.0);
}

TEST(ParamCount, LoraAndHeads) {
  constexpr ParamCount lora = moekit::lora_params<LoraSpec<8>>(4096, 1024);
  EXPECT_EQ(lora, (ParamCount{8 * (4096 + 1024), 8 * (4096 + 1024), 8 * (4096 + 1024)}));

  constexpr std::array<moekit::index_t, 3> classes{2, 10, 5};
  constexpr ParamCount heads = moekit::head_bank_params<HeadSpec<3>>(64, classes);
  EXPECT_EQ(heads.total, (2 + 10 + 5) * 65);
  EXPECT_EQ(heads.active, 10 * 65);  // the largest head
  EXPECT_EQ(moekit::head_bank_params<HeadSpec<3>>(64, classes, false).total, 17 * 64);
}

TEST(ParamCount, EncodersAreFrozen) {
  constexpr EncoderShape mlp{
      .kind = EncoderKind::kMlp, .d_input = 32, .d_model = 16, .d_ff = 64, .num_layers = 2};
  constexpr ParamCount e = moekit::encoder_params(mlp);
  EXPECT_EQ(e.total, 32 * 16 + 16 + 2 * ((2 * 16 * 64 + 64 + 16) + 2 * 16));
  EXPECT_EQ(e.active, e.total);
  EXPECT_EQ(e.trainable, 0);

  // BERT-base (12 layers, d = 768, d_ff = 3072, vocab 30522, 512 positions)
  // has 109,482,240 parameters; less its token-type embeddings (2 x 768) and
  // pooler (768 x 768 + 768) that is 108,890,112. Its embedding LayerNorm
  // stands where this pre-LN encoder has its final one.
  constexpr EncoderShape bert{.kind = EncoderKind::kTransformer,
                              .d_input = 30522,
                              .d_model = 768,
                              .d_ff = 3072,
                              .num_layers = 12,
                              .max_positions = 512};
  EXPECT_EQ(moekit::encoder_params(bert).total, 109'482'240 - 2 * 768 - (768 * 768 + 768));
}

constexpr moekit::ReferenceModelShape kModel{.encoder = {.kind = EncoderKind::kMlp,
                                                         .d_input = 128,
                                                         .d_model = 256,
                                                         .d_ff = 1024,
                                                         .num_layers = 2},
                                             .moe = {.d_model = 256, .d_ff = 512},
                                             .num_moe_layers = 2,
                                             .classes_per_branch = 10};

template <int H>
constexpr moekit::ModelParams model() {
  return moekit::reference_model_params<MoeSpec<8, 2>, LoraSpec<8>, HeadSpec<H>>(kModel);
}

// Adding a branch costs exactly one adapter and one head, at compile time.
static_assert(model<11>().total.total - model<10>().total.total == model<10>().branch.total);
static_assert(model<11>().total.trainable - model<10>().total.trainable ==
              model<10>().branch.trainable);
// A sample uses one branch, so active parameters do not grow with branches.
static_assert(model<100>().total.active == model<3>().total.active);

TEST(ParamCount, ReferenceModelParts) {
  constexpr auto p = model<3>();
  constexpr param_t d = 256;
  EXPECT_EQ(p.branch.total, 8 * (d + d) + 10 * (d + 1));
  EXPECT_EQ(p.adapter_base.total, d * d);
  EXPECT_EQ(p.adapter_base.trainable, 0);
  constexpr ParamCount layer = moekit::moe_layer_params<MoeSpec<8, 2>>(kModel.moe);
  EXPECT_EQ(p.moe, layer + layer);
  EXPECT_EQ(p.total.total,
            p.encoder.total + p.moe.total + p.adapter_base.total + 3 * p.branch.total);
  EXPECT_EQ(p.total.active,
            p.encoder.active + p.moe.active + p.adapter_base.active + p.branch.active);
  EXPECT_EQ(p.total.trainable, p.moe.trainable + 3 * p.branch.trainable);
  EXPECT_LT(p.total.active, p.total.total);
}

TEST(ParamCount, OneOfAndFrozen) {
  constexpr ParamCount c{10, 10, 10};
  EXPECT_EQ(c.one_of(4), (ParamCount{40, 10, 40}));
  EXPECT_EQ(c.frozen(), (ParamCount{10, 10, 0}));
  EXPECT_DOUBLE_EQ(ParamCount{}.active_fraction(), 0.0);
}

}  // namespace
