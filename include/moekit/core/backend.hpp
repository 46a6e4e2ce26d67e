#pragma once
// The backend switch: user code picks the CPU (Eigen) or CUDA backend of a
// composed layer with one template argument, and the types both backends'
// layers share. Eigen-free and CUDA-free, so it is safe in any translation unit.
//
//   moekit::CpuBackend                 moekit/nn/moe_layer.hpp   (cpu::MoeLayer<S>)
//   moekit::CudaBackend<T>             moekit/cuda/moe_layer.cuh (gpu::MoeLayer<S, T>,
//                                      T = float, __nv_bfloat16 or __half)
//
//   template <class Backend>
//   void step(const moekit::MoeLayer<Spec, Backend>& layer, ...) {
//     using Layer = moekit::MoeLayer<Spec, Backend>;
//     typename Layer::Params params = ...;   // Config, Params, Grads, State, Stats,
//     ...                                    // Workspace, Element: per backend
//     moekit::MoeAuxLosses aux = layer.forward(x, params, state, y, &stats, workspace);
//     layer.backward(dy, x, params, state, dx, grads, workspace);
//   }
//
// Both layers have the same member names, argument order and math; what
// differs is the memory model (host or device views, what Workspace holds),
// listed at the top of moekit/cuda/moe_layer.cuh.

#include <cmath>
#include <initializer_list>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN

// The aux losses of a forward, unscaled: both values whatever the
// coefficients (a coefficient of 0 leaves its loss out of total and of the
// gradients only).
struct MoeAuxLosses {
  double switch_loss = 0.0;  // load-balancing (Switch Transformer) loss, >= 0
  double z_loss = 0.0;       // router z-loss: mean squared log-sum-exp of the logits
  double total = 0.0;        // switch_coeff * switch_loss + z_coeff * z_loss
};

// Minimum rows of a MoE layer's state buffers for a capacity of T tokens.
struct MoeLayerStateRows {
  index_t tokens = 0;       // routing rows
  index_t routed_rows = 0;  // buffer, expert_out, saved_pre, saved_gate
  index_t shared_rows = 0;  // shared_pre, shared_gate
};

// The configuration fields both backends' MoE layers check themselves (the
// rest go to their parts' constructors); Config is either layer's config.
template <class Config>
void check_moe_layer_fields(const Config& c) {
  MOEKIT_CHECK_ARG(c.num_shared >= 0, "config.num_shared = ", c.num_shared,
                   " must be non-negative");
  MOEKIT_CHECK_ARG(c.d_ff_shared >= 0, "config.d_ff_shared = ", c.d_ff_shared,
                   " must be non-negative (0 = d_ff)");
  MOEKIT_CHECK_ARG(std::isfinite(c.switch_coeff) && c.switch_coeff >= 0.0f,
                   "config.switch_coeff = ", c.switch_coeff, " must be finite and non-negative");
  MOEKIT_CHECK_ARG(std::isfinite(c.z_coeff) && c.z_coeff >= 0.0f, "config.z_coeff = ", c.z_coeff,
                   " must be finite and non-negative");
  MOEKIT_CHECK_ARG(
      c.switch_options.normalization == SwitchNormalization::kTokensTimesK ||
          c.switch_options.normalization == SwitchNormalization::kTokens,
      "config.switch_options.normalization = ", static_cast<int>(c.switch_options.normalization),
      " is not a SwitchNormalization");
}

// The shape checks both backends' MoE layers make, written once: templates
// over the backend's Params / Grads / State, whose fields have the same names
// (host views on the CPU, device views on the GPU; only shapes are read).
struct MoeLayerChecks {
  int experts = 0;          // E
  int top_k = 0;            // K
  index_t d_model = 0;      // d, token width
  index_t d_ff = 0;         // hidden width of one routed expert
  index_t d_ff_shared = 0;  // hidden width of one shared expert
  index_t num_shared = 0;   // shared experts, 0 for none
  bool gated = false;       // FfnKind::kGated: w3 (and its gradient) present
  // Experts held in the stacks params.experts and grads.dw1/dw3/dw2: -1 for
  // all E; the expert-parallel layer's rank holds its own share only.
  int stacked_experts = -1;

  // The experts the stacks hold.
  index_t stacked() const { return stacked_experts < 0 ? experts : stacked_experts; }

  // A view that this configuration has no use for: it must be empty.
  template <class V>
  static void check_absent(const V& v, const char* name) {
    MOEKIT_CHECK(v.empty(), Errc::kInvalidArgument, name, " is ", v.rows(), " x ", v.cols(),
                 " but must be empty (FfnKind::kPlain, or num_shared = 0)");
  }

  // An expert weight (or gradient) view: required when `required`, else empty.
  template <class V>
  static void check_part(const V& v, bool required, index_t rows, index_t cols, const char* name) {
    if (required) {
      check_shape(v, rows, cols, name);
    } else {
      check_absent(v, name);
    }
  }

  // A state buffer: `cols` columns and at least `rows` rows.
  template <class V>
  static void check_rows(const V& v, index_t rows, index_t cols, const char* name) {
    check_view(v, name);
    MOEKIT_CHECK(v.cols() == cols, Errc::kShapeMismatch, name, " has ", v.cols(),
                 " columns, expected ", cols);
    MOEKIT_CHECK(v.rows() >= rows, Errc::kShapeMismatch, name, " has ", v.rows(),
                 " rows, fewer than the ", rows, " this batch needs");
  }

  // Params' shapes: the gate, the routed expert stacks and the shared
  // experts, absent parts empty.
  template <class Params>
  void check_params(const Params& p) const {
    const index_t e = experts, d = d_model, f = d_ff, fs = d_ff_shared, n = num_shared;
    const index_t se = stacked();
    check_shape(p.w_gate, e, d, "params.w_gate");
    if (!p.gate_bias.empty()) check_shape(p.gate_bias, e, "params.gate_bias");
    if (!p.selection_bias.empty()) check_shape(p.selection_bias, e, "params.selection_bias");
    check_shape(p.experts.w1, se * f, d, "params.experts.w1");
    check_part(p.experts.w3, gated, se * f, d, "params.experts.w3");
    check_shape(p.experts.w2, se * d, f, "params.experts.w2");
    check_part(p.shared.w1, n > 0, n * fs, d, "params.shared.w1");
    check_part(p.shared.w3, n > 0 && gated, n * fs, d, "params.shared.w3");
    check_part(p.shared.w2, n > 0, n * d, fs, "params.shared.w2");
  }

  // Gradient views: empty (frozen) or exactly the parameter's shape.
  template <class Grads, class Params>
  void check_grads(const Grads& g, const Params& p) const {
    const index_t e = experts, d = d_model, f = d_ff, fs = d_ff_shared, n = num_shared;
    const index_t se = stacked();
    if (!g.dw_gate.empty()) check_shape(g.dw_gate, e, d, "grads.dw_gate");
    if (!g.dgate_bias.empty()) {
      MOEKIT_CHECK(!p.gate_bias.empty(), Errc::kInvalidArgument,
                   "grads.dgate_bias is given but params.gate_bias is empty");
      check_shape(g.dgate_bias, e, "grads.dgate_bias");
    }
    if (!g.dw1.empty()) check_shape(g.dw1, se * f, d, "grads.dw1");
    if (!g.dw3.empty()) check_part(g.dw3, gated, se * f, d, "grads.dw3");
    if (!g.dw2.empty()) check_shape(g.dw2, se * d, f, "grads.dw2");
    if (!g.shared_dw1.empty()) check_part(g.shared_dw1, n > 0, n * fs, d, "grads.shared_dw1");
    if (!g.shared_dw3.empty()) {
      check_part(g.shared_dw3, n > 0 && gated, n * fs, d, "grads.shared_dw3");
    }
    if (!g.shared_dw2.empty()) check_part(g.shared_dw2, n > 0, n * d, fs, "grads.shared_dw2");
  }

  // The state's routing, offsets and buffers for T tokens (`need` from the
  // layer's state_rows(T)); a backend checks its extra fields itself.
  template <class State>
  void check_state(const State& s, index_t tokens, const MoeLayerStateRows& need) const {
    const index_t d = d_model, f = d_ff, fs = d_ff_shared;
    const index_t cap = s.routing.logits.rows();
    MOEKIT_CHECK(tokens <= cap, Errc::kShapeMismatch, "T = ", tokens,
                 " exceeds the state's capacity state.routing.logits.rows() = ", cap);
    check_rows(s.routing.logits, tokens, experts, "state.routing.logits");
    check_rows(s.routing.scores, tokens, experts, "state.routing.scores");
    check_rows(s.routing.expert_ids, tokens, top_k, "state.routing.expert_ids");
    check_rows(s.routing.weights, tokens, top_k, "state.routing.weights");
    check_rows(s.routing.positions, tokens, top_k, "state.routing.positions");
    check_shape(s.offsets, index_t{experts} + 1, "state.offsets");
    check_rows(s.buffer, need.routed_rows, d, "state.buffer");
    check_rows(s.expert_out, need.routed_rows, d, "state.expert_out");
    check_rows(s.saved_pre, need.routed_rows, f, "state.saved_pre");
    if (gated) {
      check_rows(s.saved_gate, need.routed_rows, f, "state.saved_gate");
    } else {
      check_absent(s.saved_gate, "state.saved_gate");
    }
    if (num_shared > 0) {
      check_rows(s.shared_pre, need.shared_rows, fs, "state.shared_pre");
      if (gated) {
        check_rows(s.shared_gate, need.shared_rows, fs, "state.shared_gate");
      } else {
        check_absent(s.shared_gate, "state.shared_gate");
      }
    } else {
      check_absent(s.shared_pre, "state.shared_pre");
      check_absent(s.shared_gate, "state.shared_gate");
    }
  }
};

// The arguments of both backends' MoE layer calls for their OverlapCheck:
// the parameters (read), the gradients (written) and the state's shared
// fields (written by forward, read by backward); a backend adds its own.
template <class Params>
void add_moe_params(OverlapCheck& c, const Params& p) {
  c.in(Footprints{{p.w_gate, "params.w_gate"},
                  {p.gate_bias, "params.gate_bias"},
                  {p.selection_bias, "params.selection_bias"},
                  {p.experts.w1, "params.experts.w1"},
                  {p.experts.w3, "params.experts.w3"},
                  {p.experts.w2, "params.experts.w2"},
                  {p.shared.w1, "params.shared.w1"},
                  {p.shared.w3, "params.shared.w3"},
                  {p.shared.w2, "params.shared.w2"}});
}
// Adds the gradient views, written by backward.
template <class Grads>
void add_moe_grads(OverlapCheck& c, const Grads& g) {
  c.out(Footprints{{g.dw_gate, "grads.dw_gate"},
                   {g.dgate_bias, "grads.dgate_bias"},
                   {g.dw1, "grads.dw1"},
                   {g.dw3, "grads.dw3"},
                   {g.dw2, "grads.dw2"},
                   {g.shared_dw1, "grads.shared_dw1"},
                   {g.shared_dw3, "grads.shared_dw3"},
                   {g.shared_dw2, "grads.shared_dw2"}});
}
// Adds the state's shared views: written (forward) or read (backward).
template <class State>
void add_moe_state(OverlapCheck& c, const State& s, bool written) {
  const std::initializer_list<Footprint> views = {MOEKIT_ROUTING_ARGS(s.routing, "state.routing"),
                                                  {s.offsets, "state.offsets"},
                                                  {s.buffer, "state.buffer"},
                                                  {s.expert_out, "state.expert_out"},
                                                  {s.saved_pre, "state.saved_pre"},
                                                  {s.saved_gate, "state.saved_gate"},
                                                  {s.shared_pre, "state.shared_pre"},
                                                  {s.shared_gate, "state.shared_gate"}};
  if (written) {
    c.out(views);
  } else {
    c.in(views);
  }
}

// The MoE layer of a backend: cpu::MoeLayer<S> for CpuBackend,
// gpu::MoeLayer<S, T> for CudaBackend<T>.
template <MoeSpecType S, class Backend>
using MoeLayer = typename Backend::template MoeLayer<S>;

MOEKIT_NAMESPACE_END
