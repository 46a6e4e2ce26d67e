// Compose a model from moekit's parts (docs/compose.md): a frozen encoder, a
// sparse MoE layer, a LoRA adapter and two task heads, trained with AdamW at
// a learning rate per component. Unlike the reference model
// (moekit/nn/multitask_model.hpp), every buffer and every call is here in
// plain sight. Smoke test: the training loss must fall, or main returns 1.
//
// Link moekit::io: moekit/moekit.hpp then includes train/ (AdamW) as well.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "moekit/moekit.hpp"

namespace {

using moekit::index_t;
using moekit::to_size;

std::vector<float> random_vector(std::mt19937& rng, index_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(to_size(n));
  for (float& x : v) x = normal(rng);
  return v;
}

}  // namespace

int main() {
  // [sizes]
  using Moe = moekit::MoeSpec<8, 2>;  // E = 8 experts, K = 2 per token
  using Lora = moekit::LoraSpec<8>;   // adapter rank R = 8
  using Heads = moekit::HeadSpec<2>;  // two tasks
  constexpr int E = Moe::num_experts, R = Lora::rank;
  constexpr index_t n = 48, d_input = 20, d = 32, f = 64;
  std::mt19937 rng(15);
  // [sizes]

  // [encoder]
  // A frozen encoder: weights drawn once, no gradient, inference only.
  const moekit::cpu::MlpEncoder encoder(
      {.d_input = d_input, .d_model = d, .d_ff = f, .num_layers = 2});
  const moekit::cpu::MlpEncoderConfig& ec = encoder.config();
  std::vector<float> w_in(to_size(d * d_input)), b_in(to_size(d)), gamma(to_size(2 * d)),
      beta(to_size(2 * d)), w1(to_size(2 * f * d)), b1(to_size(2 * f)), w2(to_size(2 * d * f)),
      b2(to_size(2 * d));
  const moekit::cpu::MlpEncoderViews<float> enc_weights{
      {w_in.data(), d, ec.d_input}, moekit::view_of(b_in), {gamma.data(), 2, d},
      {beta.data(), 2, d},          {w1.data(), 2 * f, d}, {b1.data(), 2, f},
      {w2.data(), 2 * d, f},        {b2.data(), 2, d}};
  encoder.init(enc_weights, /*seed=*/7);

  const std::vector<float> x = random_vector(rng, n * d_input, 1.0f);  // one batch of inputs
  std::vector<float> h(to_size(n * d));
  std::vector<std::byte> enc_ws(to_size(encoder.workspace_size(n)));
  // MlpEncoderViews<float> converts to the read-only MlpEncoderWeights.
  encoder.forward({x.data(), n, d_input}, enc_weights, {h.data(), n, d}, moekit::view_of(enc_ws));
  // [encoder]

  // [moe]
  // A sparse MoE layer: router and experts trained, the Switch balance loss on.
  moekit::cpu::MoeLayerConfig moe_config;
  moe_config.d_model = d;
  moe_config.d_ff = f;
  moe_config.switch_coeff = 0.01f;
  const moekit::cpu::MoeLayer<Moe> moe(moe_config);
  moekit::cpu::MoeLayerStorage<Moe> moe_storage(moe, n);  // state and workspace for n tokens
  std::vector<float> w_gate = random_vector(rng, E * d, 0.1f);
  std::vector<float> e_w1 = random_vector(rng, E * f * d, 1.0f / std::sqrt(static_cast<float>(d)));
  std::vector<float> e_w2 = random_vector(rng, E * d * f, 1.0f / std::sqrt(static_cast<float>(f)));
  const moekit::cpu::MoeLayerParams moe_params{
      .w_gate = {w_gate.data(), E, d},
      .experts = {.w1 = {e_w1.data(), E * f, d}, .w2 = {e_w2.data(), E * d, f}}};
  std::vector<float> dw_gate(w_gate.size()), de_w1(e_w1.size()), de_w2(e_w2.size());
  const moekit::cpu::MoeLayerGrads moe_grads{.dw_gate = {dw_gate.data(), E, d},
                                             .dw1 = {de_w1.data(), E * f, d},
                                             .dw2 = {de_w2.data(), E * d, f}};
  std::vector<float> y(to_size(n * d)), dy(to_size(n * d));
  // [moe]

  // [lora]
  // A LoRA adapter on a frozen d x d projection: z = y W^T + (alpha / R) y A^T B^T.
  const moekit::cpu::LoraLinear<Lora> lora(
      {.d_in = d, .d_out = d, .alpha = 16.0f, .dropout = 0.1f});
  const std::vector<float> w_base =
      random_vector(rng, d * d, 1.0f / std::sqrt(static_cast<float>(d)));
  std::vector<float> lora_a(to_size(R * d)), lora_b(to_size(d * R));
  lora.init({lora_a.data(), R, d}, {lora_b.data(), d, R}, {.seed = 42});  // B = 0: starts as W
  const moekit::cpu::LoraWeights lora_weights{
      .w = {w_base.data(), d, d}, .a = {lora_a.data(), R, d}, .b = {lora_b.data(), d, R}};
  std::vector<float> dlora_a(lora_a.size()), dlora_b(lora_b.size());
  std::vector<float> z(to_size(n * d)), dz(to_size(n * d)), saved_h(to_size(n * R));
  std::vector<std::byte> lora_ws(to_size(lora.workspace_size(n)));
  // [lora]

  // [heads]
  // Two classification heads (3 and 5 classes); each row belongs to one task.
  const moekit::cpu::TaskHeads<Heads> heads({.d_model = d, .classes = {3, 5}});
  const index_t classes_total = 3 + 5, c_max = heads.max_classes();
  std::vector<float> head_w = random_vector(rng, classes_total * d, 0.1f);
  std::vector<float> head_b(to_size(classes_total), 0.0f);
  std::vector<float> dhead_w(head_w.size()), dhead_b(head_b.size());
  const moekit::cpu::HeadWeights head_weights{{head_w.data(), classes_total, d},
                                              moekit::view_of(head_b)};
  std::vector<std::int32_t> tasks(to_size(n)), labels(to_size(n));
  for (index_t i = 0; i < n; ++i) {
    tasks[to_size(i)] = static_cast<std::int32_t>(i % 2);
    labels[to_size(i)] = static_cast<std::int32_t>(i % (i % 2 == 0 ? 3 : 5));
  }
  std::vector<float> logits(to_size(n * c_max)), dlogits(to_size(n * c_max));
  std::vector<std::byte> heads_ws(to_size(heads.workspace_size(n)));
  // [heads]

  // [optimizer]
  // AdamW with one parameter group per component, each its own learning rate.
  moekit::train::AdamW opt;
  const int g_router = opt.add_group({.name = "router", .lr = 1e-3f});
  const int g_experts = opt.add_group({.name = "experts", .lr = 3e-3f, .weight_decay = 0.01f});
  const int g_adapter = opt.add_group({.name = "adapter", .lr = 1e-2f});
  const int g_heads = opt.add_group({.name = "heads", .lr = 1e-2f, .weight_decay = 0.01f});
  opt.add(g_router, "moe.w_gate", moekit::view_of(w_gate), moekit::view_of(dw_gate));
  opt.add(g_experts, "moe.w1", moekit::view_of(e_w1), moekit::view_of(de_w1));
  opt.add(g_experts, "moe.w2", moekit::view_of(e_w2), moekit::view_of(de_w2));
  opt.add(g_adapter, "lora.a", moekit::view_of(lora_a), moekit::view_of(dlora_a));
  opt.add(g_adapter, "lora.b", moekit::view_of(lora_b), moekit::view_of(dlora_b));
  opt.add(g_heads, "heads.w", moekit::view_of(head_w), moekit::view_of(dhead_w));
  opt.add(g_heads, "heads.b", moekit::view_of(head_b), moekit::view_of(dhead_b));
  // [optimizer]

  // [step]
  const moekit::MatrixView<const float> hv(h.data(), n, d);
  double first = 0.0, last = 0.0;
  for (std::uint64_t s = 0; s < 40; ++s) {
    // Forward: encoder output h (fixed) -> MoE -> LoRA -> heads -> losses.
    const moekit::MoeAuxLosses aux = moe.forward(
        hv, moe_params, moe_storage.state(), {y.data(), n, d}, nullptr, moe_storage.workspace());
    const moekit::cpu::LoraStep lora_step{.training = true, .seed = 2024, .step = s};
    lora.forward({y.data(), n, d}, lora_weights, {z.data(), n, d}, {saved_h.data(), n, R},
                 lora_step, moekit::view_of(lora_ws));
    heads.forward({z.data(), n, d}, moekit::view_of(tasks), head_weights, {logits.data(), n, c_max},
                  moekit::view_of(heads_ws));
    const moekit::cpu::TaskLosses<Heads> task_loss =
        heads.loss({logits.data(), n, c_max}, moekit::view_of(tasks), moekit::view_of(labels), {},
                   {dlogits.data(), n, c_max});
    const double loss = task_loss.total + aux.total;

    // Backward, top to bottom: every backward takes dy, the forward's inputs
    // and saved state, then dx, then the parameter gradients.
    heads.backward({dlogits.data(), n, c_max}, {z.data(), n, d}, moekit::view_of(tasks),
                   head_weights, {dz.data(), n, d},
                   {{dhead_w.data(), classes_total, d}, moekit::view_of(dhead_b)},
                   moekit::view_of(heads_ws));
    lora.backward({dz.data(), n, d}, {y.data(), n, d}, lora_weights, {saved_h.data(), n, R},
                  lora_step, {dy.data(), n, d},
                  {.da = {dlora_a.data(), R, d}, .db = {dlora_b.data(), d, R}},
                  moekit::view_of(lora_ws));
    moe.backward({dy.data(), n, d}, hv, moe_params, moe_storage.state(), /*dx=*/{}, moe_grads,
                 moe_storage.workspace());  // the encoder is frozen: no dx

    if (std::isfinite(opt.clip_grad_norm(1.0))) opt.step();
    if (s == 0) first = loss;
    last = loss;
  }
  // [step]

  std::printf("loss: %.4f at the first step, %.4f after 40 AdamW steps\n", first, last);
  if (!(last < 0.7 * first)) {
    std::fprintf(stderr, "the loss did not fall enough\n");
    return 1;
  }
  return 0;
}
