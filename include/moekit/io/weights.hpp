#pragma once
// Saving and loading the parameters of moekit's CPU components as named
// tensors in safetensors files (moekit/io/safetensors.hpp).
//
// Every parameter is one tensor per matrix per expert / adapter / head, named
// by a caller-chosen prefix `p` (e.g. "model.layers.3.moe.", any string;
// empty is fine) and the scheme below, in the layout of torch.nn.Linear
// ([out, in], row-major, the layout moekit's views use, so nothing is
// transposed):
//
//   MoeLayer<S>       p gate.weight                  [E, d]       router w_gate
//                     p gate.bias                    [E]          if params.gate_bias is given
//                     p gate.selection_bias          [E]          if params.selection_bias is given
//                     p experts.{e}.w1.weight        [d_ff, d]    e = 0 .. E-1 (act applied: gate
//                     proj) p experts.{e}.w3.weight        [d_ff, d]    FfnKind::kGated only (up
//                     proj) p experts.{e}.w2.weight        [d, d_ff]    (down proj) p
//                     shared_experts.{i}.w1.weight [d_ff_shared, d]   i = 0 .. num_shared-1 p
//                     shared_experts.{i}.w3.weight [d_ff_shared, d]   kGated only p
//                     shared_experts.{i}.w2.weight [d, d_ff_shared]
//   ExpertFfn<S>      p {e}.w1.weight, p {e}.w3.weight, p {e}.w2.weight (as the experts above)
//   LoraLinear<L>     p weight [d_out, d_in], p bias [d_out]     the frozen base, if given
//                     p lora_A.weight [R, d_in], p lora_B.weight [d_out, R]
//   LoraBank<L>       p weight, p bias                            the base, if given
//                     p adapters.{i}.lora_A.weight [R, d_in]      i = 0 .. N-1
//                     p adapters.{i}.lora_B.weight [d_out, R]
//   ExpertLora<S, L>  p {e}.w1.lora_A.weight [R, d],  p {e}.w1.lora_B.weight [d_ff, R]
//                     p {e}.w3.lora_A.weight [R, d],  p {e}.w3.lora_B.weight [d_ff, R]
//                     p {e}.w2.lora_A.weight [R, d_ff], p {e}.w2.lora_B.weight [d, R]
//                     (each pair only where the adapter exists)
//   TaskHeads<S>      p {h}.weight [C_h, d], p {h}.bias [C_h] (config.bias only)
//
// The scheme follows Hugging Face's conventions, so files line up with them:
// an MoeLayer with p = "model.layers.{L}.block_sparse_moe." is named exactly
// as a Mixtral checkpoint (mixtral_moe_layer_names), an ExpertLora with
// p = "<layer>.block_sparse_moe.experts." as PEFT's LoRA on Mixtral's experts,
// and LoraLinear's adapter as PEFT's lora_A / lora_B (PEFT keeps alpha in its
// adapter_config.json; moekit keeps it in the component's config). Other
// MoE checkpoints load through a custom MoeLayerNames (patterns with {e} and
// {i} placeholders).
//
// For each component, with `names` a prefix (MoeLayer: or a MoeLayerNames):
//   weight_sources(component, params, names)  -> std::vector<TensorSource>
//   weight_targets(component, dst, names)     -> std::vector<TensorTarget>
//   save_weights(writer, component, params, names, dtype = Dtype::kF32)
//   load_weights(reader, component, dst, names)
// params are the component's own parameter struct (const views: MoeLayerParams,
// ExpertWeights, LoraWeights, ExpertAdapters<const float>, HeadWeights); dst is
// the Mutable* twin below (ExpertAdapters<float> for ExpertLora), caller memory
// of the same shapes. Every view is checked against the component's config
// first (kShapeMismatch / kNullPointer / kInvalidArgument naming params.<field>
// or dst.<field>), then load_weights checks every tensor against the file
// before it copies any: nothing is written when any check fails. To load
// several components all-or-nothing, concatenate their weight_targets and call
// load_tensors once.

#include <cstddef>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moekit/core/activation.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/expert_ffn.hpp"
#include "moekit/cpu/expert_lora.hpp"
#include "moekit/cpu/lora.hpp"
#include "moekit/cpu/task_heads.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace io {

// ---- mutable parameter views (load destinations) ------------------------------------------

// Writable cpu::ExpertWeights: where experts' matrices are loaded to.
struct MutableExpertWeights {
  MatrixView<float> w1{};  // (E d_ff) x d
  MatrixView<float> w3{};  // (E d_ff) x d, kGated only
  MatrixView<float> w2{};  // (E d) x d_ff
  // The same memory, read-only (to run the experts on what was loaded).
  operator cpu::ExpertWeights() const { return {w1, w3, w2}; }
};

// Writable cpu::MoeLayerParams: where an MoeLayer's tensors are loaded to.
struct MutableMoeLayerParams {
  MatrixView<float> w_gate{};          // E x d
  VectorView<float> gate_bias{};       // E, or empty
  VectorView<float> selection_bias{};  // E, or empty
  MutableExpertWeights experts{};      // the E routed experts
  MutableExpertWeights shared{};       // the shared experts, or all empty
  // The same memory, read-only.
  operator cpu::MoeLayerParams() const {
    return {w_gate, gate_bias, selection_bias, experts, shared};
  }
};

// Writable cpu::LoraWeights (LoraLinear, LoraBank).
struct MutableLoraWeights {
  MatrixView<float> w{};     // frozen base, d_out x d_in, or empty (not loaded)
  VectorView<float> bias{};  // d_out, or empty
  MatrixView<float> a{};     // down-projection(s): R x d_in per adapter, stacked
  MatrixView<float> b{};     // up-projection(s): d_out x R per adapter, stacked
  // The same memory, read-only.
  operator cpu::LoraWeights() const { return {w, bias, a, b}; }
};

// Writable cpu::HeadWeights: every head's rows, stacked in head order.
struct MutableHeadWeights {
  MatrixView<float> w{};  // (sum C_h) x d
  VectorView<float> b{};  // sum C_h; empty when config.bias is false
  // The same memory, read-only.
  operator cpu::HeadWeights() const { return {w, b}; }
};

// ---- MoE layer name maps ---------------------------------------------------------------------

// The names of an MoeLayer's tensors. The expert patterns contain "{e}" (the
// expert index), the shared ones "{i}" (the shared expert index). An empty
// pattern means the format has no such tensor: a layer that needs it is
// refused (kInvalidArgument, naming the field).
struct MoeLayerNames {
  std::string gate_weight;     // router weight, [E, d]
  std::string gate_bias;       // router bias, [E]
  std::string selection_bias;  // bias used only to select experts, [E]
  std::string expert_w1;       // routed expert {e}: w1 (gate proj), [d_ff, d]
  std::string expert_w3;       // routed expert {e}: w3 (up proj, kGated only), [d_ff, d]
  std::string expert_w2;       // routed expert {e}: w2 (down proj), [d, d_ff]
  std::string shared_w1;       // shared expert {i}: w1, [d_ff_shared, d]
  std::string shared_w3;       // shared expert {i}: w3 (kGated only), [d_ff_shared, d]
  std::string shared_w2;       // shared expert {i}: w2, [d, d_ff_shared]
};

// moekit's scheme (the table at the top of this file) under `prefix`.
inline MoeLayerNames moe_layer_names(std::string_view prefix) {
  const std::string p(prefix);
  return {p + "gate.weight",
          p + "gate.bias",
          p + "gate.selection_bias",
          p + "experts.{e}.w1.weight",
          p + "experts.{e}.w3.weight",
          p + "experts.{e}.w2.weight",
          p + "shared_experts.{i}.w1.weight",
          p + "shared_experts.{i}.w3.weight",
          p + "shared_experts.{i}.w2.weight"};
}

// Hugging Face transformers' Mixtral (MixtralForCausalLM) checkpoint names for
// decoder layer `layer`:
//   model.layers.{L}.block_sparse_moe.gate.weight           [E, d_model]
//   model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight [d_ff, d_model]  gate proj
//   model.layers.{L}.block_sparse_moe.experts.{e}.w3.weight [d_ff, d_model]  up proj
//   model.layers.{L}.block_sparse_moe.experts.{e}.w2.weight [d_model, d_ff]  down proj
// No router bias, selection bias or shared experts. `model_prefix` replaces
// "model.layers." (e.g. for a model nested in another).
inline MoeLayerNames mixtral_moe_layer_names(index_t layer,
                                             std::string_view model_prefix = "model.layers.") {
  MOEKIT_CHECK_ARG(layer >= 0, "layer = ", layer, " must be non-negative");
  MoeLayerNames names =
      moe_layer_names(std::string(model_prefix) + std::to_string(layer) + ".block_sparse_moe.");
  names.gate_bias.clear();
  names.selection_bias.clear();
  names.shared_w1.clear();
  names.shared_w3.clear();
  names.shared_w2.clear();
  return names;
}

// An MoeLayer configuration that computes Mixtral's sparse MoE block:
// softmax over the E logits, top-K, the K weights renormalised to sum 1,
// and SwiGLU experts w2(silu(w1 x) * (w3 x)); dropless, no aux losses.
inline cpu::MoeLayerConfig mixtral_moe_layer_config(index_t d_model, index_t d_ff) {
  cpu::MoeLayerConfig c;
  c.d_model = d_model;
  c.d_ff = d_ff;
  c.kind = FfnKind::kGated;
  c.activation = Activation::kSilu;
  c.router.gating.rule = GatingRule::kSoftmaxTopK;
  c.router.gating.renormalize = true;
  return c;
}

namespace detail {

inline std::string expand(std::string_view pattern, std::string_view placeholder, index_t value) {
  std::string out;
  std::size_t pos = 0;
  while (true) {
    const std::size_t hit = pattern.find(placeholder, pos);
    out.append(pattern.substr(pos, hit == std::string_view::npos ? hit : hit - pos));
    if (hit == std::string_view::npos) return out;
    out += std::to_string(value);
    pos = hit + placeholder.size();
  }
}

template <class T>
struct ExpertViews {
  MatrixView<T> w1, w3, w2;
};

template <class T>
void push(std::vector<NamedTensor<T>>& out, std::string name, Shape shape, MatrixView<T> view) {
  out.push_back({std::move(name), std::move(shape), view});
}

// A view that must be present (required) or empty (not).
template <class T>
void check_part(MatrixView<T> v, bool required, index_t rows, index_t cols, const std::string& name,
                const char* why_absent) {
  if (required) {
    check_shape(v, rows, cols, name.c_str());
  } else {
    MOEKIT_CHECK(v.empty(), Errc::kInvalidArgument, name, " is ", v.rows(), " x ", v.cols(),
                 " but must be empty (", why_absent, ")");
  }
}

inline void check_pattern(const std::string& pattern, const char* field, const char* what) {
  MOEKIT_CHECK(!pattern.empty(), Errc::kInvalidArgument, "names.", field,
               " is empty (the name map has no such tensor) but ", what);
}

// `count` experts of width f in ExpertWeights layout, expert e's matrices
// named by the patterns with `placeholder` = e.
template <class T>
void expert_tensors(std::vector<NamedTensor<T>>& out, const ExpertViews<T>& w, index_t count,
                    index_t d, index_t f, bool gated, const std::string& p1, const std::string& p3,
                    const std::string& p2, std::string_view placeholder, const std::string& role) {
  check_shape(w.w1, count * f, d, (role + ".w1").c_str());
  check_part(w.w3, gated, count * f, d, role + ".w3", "FfnKind::kPlain has no W3");
  check_shape(w.w2, count * d, f, (role + ".w2").c_str());
  for (index_t e = 0; e < count; ++e) {
    push(out, expand(p1, placeholder, e), {f, d}, w.w1.middle_rows(e * f, f));
    if (gated) push(out, expand(p3, placeholder, e), {f, d}, w.w3.middle_rows(e * f, f));
    push(out, expand(p2, placeholder, e), {d, f}, w.w2.middle_rows(e * d, d));
  }
}

template <MoeSpecType S, class T>
std::vector<NamedTensor<T>> moe_layer_tensors(const cpu::MoeLayer<S>& layer, MatrixView<T> w_gate,
                                              VectorView<T> gate_bias, VectorView<T> selection_bias,
                                              const ExpertViews<T>& experts,
                                              const ExpertViews<T>& shared,
                                              const MoeLayerNames& names, const std::string& role) {
  constexpr int E = S::num_experts;
  const cpu::MoeLayerConfig& c = layer.config();
  const index_t d = c.d_model, n_shared = c.num_shared;
  const bool gated = layer.gated();
  std::vector<NamedTensor<T>> out;
  check_shape(w_gate, E, d, (role + ".w_gate").c_str());
  check_pattern(names.gate_weight, "gate_weight", "the router weight is required");
  push(out, names.gate_weight, {E, d}, w_gate);
  if (!gate_bias.empty()) {
    check_shape(gate_bias, E, (role + ".gate_bias").c_str());
    check_pattern(names.gate_bias, "gate_bias", (role + ".gate_bias is given").c_str());
    push(out, names.gate_bias, {E}, as_row(gate_bias));
  }
  if (!selection_bias.empty()) {
    check_shape(selection_bias, E, (role + ".selection_bias").c_str());
    check_pattern(names.selection_bias, "selection_bias",
                  (role + ".selection_bias is given").c_str());
    push(out, names.selection_bias, {E}, as_row(selection_bias));
  }
  check_pattern(names.expert_w1, "expert_w1", "the experts are required");
  if (gated) check_pattern(names.expert_w3, "expert_w3", "the layer is FfnKind::kGated");
  check_pattern(names.expert_w2, "expert_w2", "the experts are required");
  expert_tensors(out, experts, E, d, c.d_ff, gated, names.expert_w1, names.expert_w3,
                 names.expert_w2, "{e}", role + ".experts");
  if (n_shared > 0) {
    check_pattern(names.shared_w1, "shared_w1", "the layer has shared experts");
    if (gated) check_pattern(names.shared_w3, "shared_w3", "the layer has shared experts");
    check_pattern(names.shared_w2, "shared_w2", "the layer has shared experts");
    expert_tensors(out, shared, n_shared, d, layer.d_ff_shared(), gated, names.shared_w1,
                   names.shared_w3, names.shared_w2, "{i}", role + ".shared");
  } else {
    for (const auto& [v, field] :
         {std::pair{shared.w1, ".shared.w1"}, std::pair{shared.w3, ".shared.w3"},
          std::pair{shared.w2, ".shared.w2"}}) {
      check_part(v, false, 0, 0, role + field, "num_shared = 0");
    }
  }
  return out;
}

template <class T>
void lora_base_tensors(std::vector<NamedTensor<T>>& out, MatrixView<T> w, VectorView<T> bias,
                       index_t d_in, index_t d_out, const std::string& p, const std::string& role) {
  if (!w.empty()) {
    check_shape(w, d_out, d_in, (role + ".w").c_str());
    push(out, p + "weight", {d_out, d_in}, w);
  }
  if (!bias.empty()) {
    check_shape(bias, d_out, (role + ".bias").c_str());
    push(out, p + "bias", {d_out}, as_row(bias));
  }
}

// `count` adapters of rank R stacked as LoraBank stacks them, adapter k
// named by the prefix returned by name(k).
template <class T, class Name>
void lora_adapter_tensors(std::vector<NamedTensor<T>>& out, MatrixView<T> a, MatrixView<T> b,
                          index_t count, index_t rank, index_t d_in, index_t d_out, Name&& name,
                          const std::string& a_role, const std::string& b_role) {
  check_shape(a, count * rank, d_in, a_role.c_str());
  check_shape(b, count * d_out, rank, b_role.c_str());
  for (index_t k = 0; k < count; ++k) {
    const std::string p = name(k);
    push(out, p + "lora_A.weight", {rank, d_in}, a.middle_rows(k * rank, rank));
    push(out, p + "lora_B.weight", {d_out, rank}, b.middle_rows(k * d_out, d_out));
  }
}

template <MoeSpecType S, LoraSpecType L, class T>
std::vector<NamedTensor<T>> expert_lora_tensors(const cpu::ExpertLora<S, L>& lora,
                                                const cpu::ExpertAdapters<T>& ad,
                                                std::string_view prefix, const std::string& role) {
  constexpr int E = S::num_experts, R = L::rank;
  const index_t d = lora.config().d_model, f = lora.config().d_ff;
  std::vector<NamedTensor<T>> out;
  const std::string p(prefix);
  struct Pair {
    MatrixView<T> a, b;
    const char* m;
    index_t in, out;
  };
  const Pair pairs[] = {
      {ad.a1, ad.b1, "w1", d, f}, {ad.a3, ad.b3, "w3", d, f}, {ad.a2, ad.b2, "w2", f, d}};
  for (const Pair& q : pairs) {
    const std::string m(q.m);
    const std::string a_role = role + ".a" + m.substr(1), b_role = role + ".b" + m.substr(1);
    MOEKIT_CHECK(q.a.empty() == q.b.empty(), Errc::kInvalidArgument, a_role, " and ", b_role,
                 " must both be given or both be empty");
    if (q.a.empty()) continue;
    MOEKIT_CHECK(m != "w3" || lora.gated(), Errc::kInvalidArgument, a_role,
                 " is given but FfnKind::kPlain has no W3");
    lora_adapter_tensors(
        out, q.a, q.b, index_t{E}, index_t{R}, q.in, q.out,
        [&](index_t e) { return p + std::to_string(e) + "." + m + "."; }, a_role, b_role);
  }
  return out;
}

template <HeadSpecType S, class T>
std::vector<NamedTensor<T>> head_tensors(const cpu::TaskHeads<S>& heads, MatrixView<T> w,
                                         VectorView<T> b, std::string_view prefix,
                                         const std::string& role) {
  const index_t d = heads.d_model(), total = heads.total_classes();
  const bool bias = heads.config().bias;
  check_shape(w, total, d, (role + ".w").c_str());
  if (bias) {
    check_shape(b, total, (role + ".b").c_str());
  } else {
    MOEKIT_CHECK(b.empty(), Errc::kInvalidArgument, role, ".b has ", b.size(),
                 " elements but must be empty (config.bias is false)");
  }
  std::vector<NamedTensor<T>> out;
  const std::string p(prefix);
  for (int h = 0; h < S::num_heads; ++h) {
    const index_t off = heads.class_offset(h), c = heads.classes(h);
    push(out, p + std::to_string(h) + ".weight", {c, d}, w.middle_rows(off, c));
    if (bias) {
      push(out, p + std::to_string(h) + ".bias", {c}, as_row(b.segment(off, c)));
    }
  }
  return out;
}

}  // namespace detail

// ---- MoeLayer ---------------------------------------------------------------------------------

// The layer's tensors under `names`, as views of `params` (checked against
// the layer's config first).
template <MoeSpecType S>
std::vector<TensorSource> weight_sources(const cpu::MoeLayer<S>& layer,
                                         const cpu::MoeLayerParams& params,
                                         const MoeLayerNames& names) {
  return detail::moe_layer_tensors<S, const float>(
      layer, params.w_gate, params.gate_bias, params.selection_bias,
      {params.experts.w1, params.experts.w3, params.experts.w2},
      {params.shared.w1, params.shared.w3, params.shared.w2}, names, "params");
}
// The layer's tensors under `names`, as targets in `dst` (checked first).
template <MoeSpecType S>
std::vector<TensorTarget> weight_targets(const cpu::MoeLayer<S>& layer,
                                         const MutableMoeLayerParams& dst,
                                         const MoeLayerNames& names) {
  return detail::moe_layer_tensors<S, float>(layer, dst.w_gate, dst.gate_bias, dst.selection_bias,
                                             {dst.experts.w1, dst.experts.w3, dst.experts.w2},
                                             {dst.shared.w1, dst.shared.w3, dst.shared.w2}, names,
                                             "dst");
}
// The layer's tensors under moekit's names with `prefix` (moe_layer_names).
template <MoeSpecType S>
std::vector<TensorSource> weight_sources(const cpu::MoeLayer<S>& layer,
                                         const cpu::MoeLayerParams& params,
                                         std::string_view prefix) {
  return weight_sources(layer, params, moe_layer_names(prefix));
}
// Targets in `dst` under moekit's names with `prefix` (moe_layer_names).
template <MoeSpecType S>
std::vector<TensorTarget> weight_targets(const cpu::MoeLayer<S>& layer,
                                         const MutableMoeLayerParams& dst,
                                         std::string_view prefix) {
  return weight_targets(layer, dst, moe_layer_names(prefix));
}

// ---- ExpertFfn --------------------------------------------------------------------------------

// The E experts' matrices as prefix {e}.w1/w3/w2.weight, views of `params`.
template <MoeSpecType S>
std::vector<TensorSource> weight_sources(const cpu::ExpertFfn<S>& ffn,
                                         const cpu::ExpertWeights& params,
                                         std::string_view prefix) {
  std::vector<TensorSource> out;
  const std::string p(prefix);
  detail::expert_tensors<const float>(out, {params.w1, params.w3, params.w2}, S::num_experts,
                                      ffn.config().d_model, ffn.config().d_ff, ffn.gated(),
                                      p + "{e}.w1.weight", p + "{e}.w3.weight", p + "{e}.w2.weight",
                                      "{e}", "params");
  return out;
}
// The E experts' matrices as targets in `dst` (names as weight_sources).
template <MoeSpecType S>
std::vector<TensorTarget> weight_targets(const cpu::ExpertFfn<S>& ffn,
                                         const MutableExpertWeights& dst, std::string_view prefix) {
  std::vector<TensorTarget> out;
  const std::string p(prefix);
  detail::expert_tensors<float>(out, {dst.w1, dst.w3, dst.w2}, S::num_experts, ffn.config().d_model,
                                ffn.config().d_ff, ffn.gated(), p + "{e}.w1.weight",
                                p + "{e}.w3.weight", p + "{e}.w2.weight", "{e}", "dst");
  return out;
}

// ---- LoraLinear, LoraBank ---------------------------------------------------------------------

// The base (where params.w / params.bias are given) and the adapter's
// lora_A / lora_B under `prefix`, views of `params`.
template <LoraSpecType L>
std::vector<TensorSource> weight_sources(const cpu::LoraLinear<L>& lora,
                                         const cpu::LoraWeights& params, std::string_view prefix) {
  const cpu::LoraConfig& c = lora.config();
  const std::string p(prefix);
  std::vector<TensorSource> out;
  detail::lora_base_tensors(out, params.w, params.bias, c.d_in, c.d_out, p, "params");
  detail::lora_adapter_tensors(
      out, params.a, params.b, 1, index_t{L::rank}, c.d_in, c.d_out, [&](index_t) { return p; },
      "params.a", "params.b");
  return out;
}
// The same tensors as targets in `dst` (the base only where dst.w / dst.bias
// are given).
template <LoraSpecType L>
std::vector<TensorTarget> weight_targets(const cpu::LoraLinear<L>& lora,
                                         const MutableLoraWeights& dst, std::string_view prefix) {
  const cpu::LoraConfig& c = lora.config();
  const std::string p(prefix);
  std::vector<TensorTarget> out;
  detail::lora_base_tensors(out, dst.w, dst.bias, c.d_in, c.d_out, p, "dst");
  detail::lora_adapter_tensors(
      out, dst.a, dst.b, 1, index_t{L::rank}, c.d_in, c.d_out, [&](index_t) { return p; }, "dst.a",
      "dst.b");
  return out;
}

// The base (if given) and every adapter i as prefix adapters.{i}.lora_A /
// lora_B, views of `params`.
template <LoraSpecType L>
std::vector<TensorSource> weight_sources(const cpu::LoraBank<L>& bank,
                                         const cpu::LoraWeights& params, std::string_view prefix) {
  const cpu::LoraBankConfig& c = bank.config();
  const std::string p(prefix);
  std::vector<TensorSource> out;
  detail::lora_base_tensors(out, params.w, params.bias, c.d_in, c.d_out, p, "params");
  detail::lora_adapter_tensors(
      out, params.a, params.b, c.num_adapters, index_t{L::rank}, c.d_in, c.d_out,
      [&](index_t i) { return p + "adapters." + std::to_string(i) + "."; }, "params.a", "params.b");
  return out;
}
// The same tensors as targets in `dst`.
template <LoraSpecType L>
std::vector<TensorTarget> weight_targets(const cpu::LoraBank<L>& bank,
                                         const MutableLoraWeights& dst, std::string_view prefix) {
  const cpu::LoraBankConfig& c = bank.config();
  const std::string p(prefix);
  std::vector<TensorTarget> out;
  detail::lora_base_tensors(out, dst.w, dst.bias, c.d_in, c.d_out, p, "dst");
  detail::lora_adapter_tensors(
      out, dst.a, dst.b, c.num_adapters, index_t{L::rank}, c.d_in, c.d_out,
      [&](index_t i) { return p + "adapters." + std::to_string(i) + "."; }, "dst.a", "dst.b");
  return out;
}

// ---- ExpertLora -------------------------------------------------------------------------------

// Every expert's adapter pairs that exist, as prefix {e}.w1.lora_A.weight
// and so on, views of `params`.
template <MoeSpecType S, LoraSpecType L>
std::vector<TensorSource> weight_sources(const cpu::ExpertLora<S, L>& lora,
                                         const cpu::ExpertAdapters<const float>& params,
                                         std::string_view prefix) {
  return detail::expert_lora_tensors(lora, params, prefix, "params");
}
// The same tensors as targets in `dst` (the same pairs must be given).
template <MoeSpecType S, LoraSpecType L>
std::vector<TensorTarget> weight_targets(const cpu::ExpertLora<S, L>& lora,
                                         const cpu::ExpertAdapters<float>& dst,
                                         std::string_view prefix) {
  return detail::expert_lora_tensors(lora, dst, prefix, "dst");
}

// ---- TaskHeads --------------------------------------------------------------------------------

// Every head h as prefix {h}.weight (and {h}.bias with config.bias), views
// of `params`.
template <HeadSpecType S>
std::vector<TensorSource> weight_sources(const cpu::TaskHeads<S>& heads,
                                         const cpu::HeadWeights& params, std::string_view prefix) {
  return detail::head_tensors(heads, params.w, params.b, prefix, "params");
}
// The same tensors as targets in `dst`.
template <HeadSpecType S>
std::vector<TensorTarget> weight_targets(const cpu::TaskHeads<S>& heads,
                                         const MutableHeadWeights& dst, std::string_view prefix) {
  return detail::head_tensors(heads, dst.w, dst.b, prefix, "dst");
}

// ---- save / load any of the above -------------------------------------------------------------

// Adds the component's tensors to `writer` (all or none), written as `dtype`.
template <class Component, class Params, class Names>
void save_weights(SafetensorsWriter& writer, const Component& component, const Params& params,
                  const Names& names, Dtype dtype = Dtype::kF32) {
  writer.add(weight_sources(component, params, names), dtype);
}

// Copies the component's tensors from `file` into dst, after checking all of
// them (nothing is written when any check fails).
template <class Component, class Dst, class Names>
void load_weights(const SafetensorsReader& file, const Component& component, const Dst& dst,
                  const Names& names) {
  file.load(weight_targets(component, dst, names));
}

// ---- Mixtral ----------------------------------------------------------------------------------

// Refuses a layer that would not compute Mixtral's block from Mixtral's
// weights: it must be FfnKind::kGated with SiLU, no shared experts, and route
// by softmax -> top-K with renormalize (or top-K -> softmax, the same
// weights), scaling 1.
template <MoeSpecType S>
void check_mixtral_layer(const cpu::MoeLayer<S>& layer) {
  const cpu::MoeLayerConfig& c = layer.config();
  MOEKIT_CHECK_ARG(c.kind == FfnKind::kGated && c.activation == Activation::kSilu,
                   "a Mixtral layer needs kind = kGated and activation = kSilu, got kind = ",
                   static_cast<int>(c.kind), ", activation = ", static_cast<int>(c.activation));
  MOEKIT_CHECK_ARG(c.num_shared == 0,
                   "a Mixtral layer has no shared experts, got num_shared = ", c.num_shared);
  const GatingConfig& g = c.router.gating;
  MOEKIT_CHECK_ARG(
      (g.rule == GatingRule::kSoftmaxTopK && g.renormalize) || g.rule == GatingRule::kTopKSoftmax,
      "a Mixtral layer routes by softmax -> top-k with renormalize (or top-k -> "
      "softmax), got gating.rule = ",
      static_cast<int>(g.rule), ", renormalize = ", g.renormalize);
  MOEKIT_CHECK_ARG(g.scaling == 1.0f && g.num_groups == 1,
                   "a Mixtral layer has gating.scaling = 1 and num_groups = 1, got scaling = ",
                   g.scaling, ", num_groups = ", g.num_groups);
}

// Loads decoder layer `layer_index` of a Mixtral checkpoint (one file; for a
// sharded checkpoint, open the shard that holds the layer's tensors, as
// model.safetensors.index.json says) into dst, after check_mixtral_layer.
template <MoeSpecType S>
void load_mixtral_moe_layer(const SafetensorsReader& file, const cpu::MoeLayer<S>& layer,
                            const MutableMoeLayerParams& dst, index_t layer_index) {
  check_mixtral_layer(layer);
  load_weights(file, layer, dst, mixtral_moe_layer_names(layer_index));
}

// Adds the layer's tensors under Mixtral's names for decoder layer `layer_index`.
template <MoeSpecType S>
void save_mixtral_moe_layer(SafetensorsWriter& writer, const cpu::MoeLayer<S>& layer,
                            const cpu::MoeLayerParams& params, index_t layer_index,
                            Dtype dtype = Dtype::kF32) {
  check_mixtral_layer(layer);
  save_weights(writer, layer, params, mixtral_moe_layer_names(layer_index), dtype);
}

}  // namespace io
MOEKIT_NAMESPACE_END
