#pragma once
// Parameter accounting, evaluated at compile time.
//
// For each component and for the whole reference model (docs/reference_model.md) this
// header counts
//   total     - parameters stored,
//   active    - parameters one token (one sample, for heads) uses in a
//               forward pass: the router, K of E experts, the shared experts,
//               one branch's adapter and head,
//   trainable - parameters that receive gradients (the encoder and the shared
//               base projection are frozen).
// Every function is constexpr, so a configuration's size can be checked with
// static_assert where the model is declared.

#include <array>
#include <cstdint>

#include "moekit/core/types.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN

// A number of parameters (scalars), 64-bit so large models do not overflow.
using param_t = std::int64_t;

// A component's parameters, counted three ways (see the top of this file).
struct ParamCount {
  param_t total = 0;      // stored
  param_t active = 0;     // used by one token's (one sample's) forward pass
  param_t trainable = 0;  // receiving gradients

  // Adds another part's counts, field by field.
  constexpr ParamCount& operator+=(const ParamCount& other) {
    total += other.total;
    active += other.active;
    trainable += other.trainable;
    return *this;
  }
  // The counts of two parts together, field by field.
  friend constexpr ParamCount operator+(ParamCount a, const ParamCount& b) { return a += b; }
  // Equal when all three counts are.
  friend constexpr bool operator==(const ParamCount&, const ParamCount&) = default;

  // The same parameters with gradients switched off.
  constexpr ParamCount frozen() const { return {total, active, 0}; }
  // n alternatives of which one token uses one (e.g. one adapter per branch).
  constexpr ParamCount one_of(param_t n) const { return {n * total, active, n * trainable}; }
  // Fraction of the stored parameters one token uses.
  constexpr double active_fraction() const {
    return total == 0 ? 0.0 : static_cast<double>(active) / static_cast<double>(total);
  }
};

// ---- feed-forward blocks ----------------------------------------------------

// The form of a feed-forward block (an expert, or the encoder's FFN).
enum class FfnKind {
  kPlain,  // act(x W1^T) W2^T: two d_model x d_ff matrices
  kGated,  // (act(x W1^T) * (x W3^T)) W2^T, SwiGLU/GeGLU: three
};

// The sizes of one feed-forward block.
struct FfnShape {
  index_t d_model = 0;             // input and output width
  index_t d_ff = 0;                // hidden width
  FfnKind kind = FfnKind::kPlain;  // two or three matrices
  bool bias = false;               // whether each matrix has a bias
};

// Parameters of one feed-forward block (matrices, and biases if s.bias).
constexpr param_t ffn_param_count(const FfnShape& s) {
  const param_t matrices = s.kind == FfnKind::kGated ? 3 : 2;
  param_t n = matrices * s.d_model * s.d_ff;
  if (s.bias) n += (matrices - 1) * s.d_ff + s.d_model;  // one bias per up matrix, one down
  return n;
}

// ---- MoE layer --------------------------------------------------------------

// The sizes of one MoE layer (E and K come from the MoeSpec).
struct MoeLayerShape {
  index_t d_model = 0;             // the layer's input and output width
  index_t d_ff = 0;                // width of one routed expert
  FfnKind kind = FfnKind::kPlain;  // every expert's form
  bool expert_bias = false;        // whether the experts' matrices have biases
  bool router_bias = false;        // whether the router has a bias (E values)
  int num_shared_experts = 0;      // experts every token uses, beside the routed ones
  index_t d_ff_shared = 0;         // width of one shared expert; 0 means d_ff
};

// Router (d_model x E), E routed experts of which K are active per token, and
// the shared experts, which every token uses.
template <MoeSpecType S>
constexpr ParamCount moe_layer_params(const MoeLayerShape& s) {
  const param_t router = s.d_model * S::num_experts + (s.router_bias ? S::num_experts : 0);
  const param_t expert = ffn_param_count({s.d_model, s.d_ff, s.kind, s.expert_bias});
  const index_t d_ff_shared = s.d_ff_shared == 0 ? s.d_ff : s.d_ff_shared;
  const param_t shared =
      s.num_shared_experts * ffn_param_count({s.d_model, d_ff_shared, s.kind, s.expert_bias});
  const param_t total = router + S::num_experts * expert + shared;
  const param_t active = router + S::top_k * expert + shared;
  return {total, active, total};
}

// ---- adapters and heads -----------------------------------------------------

// One LoRA adapter on a d_in -> d_out linear: A is R x d_in, B is d_out x R.
template <LoraSpecType S>
constexpr ParamCount lora_params(index_t d_in, index_t d_out) {
  const param_t n = S::rank * (d_in + d_out);
  return {n, n, n};
}

// H linear heads on a d_in-wide input, head h with classes[h] outputs. A
// sample is scored by its own task's head only, so `active` is the largest
// head: an upper bound for any one sample.
template <HeadSpecType S>
constexpr ParamCount head_bank_params(index_t d_in,
                                      const std::array<index_t, S::num_heads>& classes,
                                      bool bias = true) {
  ParamCount count;
  for (index_t c : classes) {
    const param_t head = c * (d_in + (bias ? 1 : 0));
    count.total += head;
    count.active = head > count.active ? head : count.active;
  }
  count.trainable = count.total;
  return count;
}

// ---- frozen encoder ---------------------------------------------------------

// The architecture of the frozen encoder.
enum class EncoderKind {
  kMlp,          // input projection, then residual FFN blocks with LayerNorm
  kTransformer,  // token + position embeddings, then pre-LN transformer blocks
};

// The sizes of the frozen encoder.
struct EncoderShape {
  EncoderKind kind = EncoderKind::kMlp;  // MLP or transformer
  index_t d_input = 0;        // features per sample (MLP) or vocabulary size (transformer)
  index_t d_model = 0;        // output width
  index_t d_ff = 0;           // hidden width of each block's FFN
  int num_layers = 0;         // blocks
  index_t max_positions = 0;  // transformer only: learned position embeddings
};

// The encoder is frozen: all of it is active, none of it trainable.
constexpr ParamCount encoder_params(const EncoderShape& s) {
  const param_t d = s.d_model;
  const param_t layer_norm = 2 * d;
  const param_t ffn = ffn_param_count({s.d_model, s.d_ff, FfnKind::kPlain, true});
  param_t n = 0;
  if (s.kind == EncoderKind::kMlp) {
    n = s.d_input * d + d + s.num_layers * (ffn + layer_norm);
  } else {
    const param_t attention = 4 * d * d + 4 * d;  // Q, K, V, O with biases
    n = (s.d_input + s.max_positions) * d + s.num_layers * (attention + ffn + 2 * layer_norm) +
        layer_norm;
  }
  return ParamCount{n, n, n}.frozen();
}

// ---- the reference model ------------------------------------------------------

// docs/reference_model.md: frozen encoder -> MoE layers -> per-branch LoRA on a shared,
// frozen d_model x d_model projection -> per-branch linear head. H branches.
struct ReferenceModelShape {
  EncoderShape encoder;            // the frozen encoder
  MoeLayerShape moe;               // each MoE layer; moe.d_model is the model's width
  int num_moe_layers = 2;          // MoE layers, one after the other
  index_t classes_per_branch = 0;  // outputs of every branch's head
};

// A model's parameter counts, by part.
struct ModelParams {
  ParamCount encoder;       // frozen, shared by all branches
  ParamCount moe;           // all MoE layers, shared, trained
  ParamCount adapter_base;  // frozen projection that every branch's LoRA adapts
  ParamCount branch;        // one branch: its adapter and its head = cost of adding one
  ParamCount total;         // everything, with all H branches
};

// The counts of the reference model of shape `s`, with E and K from Moe, the
// adapters' rank from Lora and Heads::num_heads branches.
template <MoeSpecType Moe, LoraSpecType Lora, HeadSpecType Heads>
constexpr ModelParams reference_model_params(const ReferenceModelShape& s) {
  const index_t d = s.moe.d_model;
  ModelParams p;
  p.encoder = encoder_params(s.encoder);
  for (int layer = 0; layer < s.num_moe_layers; ++layer) p.moe += moe_layer_params<Moe>(s.moe);
  p.adapter_base = ParamCount{d * d, d * d, 0};
  p.branch = lora_params<Lora>(d, d) + head_bank_params<HeadSpec<1>>(d, {s.classes_per_branch});

  std::array<index_t, Heads::num_heads> classes{};
  classes.fill(s.classes_per_branch);
  const ParamCount adapters = lora_params<Lora>(d, d).one_of(Heads::num_heads);
  p.total = p.encoder + p.moe + p.adapter_base + adapters + head_bank_params<Heads>(d, classes);
  return p;
}

MOEKIT_NAMESPACE_END
