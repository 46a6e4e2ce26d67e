#pragma once
// A Mixture-of-Experts layer on the CPU backend for MoeSpec<E, K>: router,
// dispatch, routed expert FFNs, combine and optional shared experts, forward
// and backward, composed from moekit/cpu/{router,aux_losses,dispatch,expert_ffn}.hpp.
//
//   y = sum_{k kept} w(t, k) FFN_{ids(t, k)}(x_t) + sum_i FFN_shared_i(x_t)
//
// Routed experts run on the tokens the router picked (capacity drops add 0);
// the num_shared shared experts run on every token (DeepSeek-MoE style) and
// share the routed experts' FfnKind and Activation, each of width d_ff_shared.
//
// Memory. Parameters, saved state, gradients and scratch are caller memory
// (views); forward and backward allocate nothing. Allocate once for a maximum
// batch T_max: MoeLayerStorage<S> does it with std::vectors, or size your own
// buffers with state_rows() and workspace_size(). A call with T <= T_max uses
// the leading rows of each state buffer.
//
//   moekit::cpu::MoeLayer<moekit::MoeSpec<8, 2>> layer(config);  // validates config
//   moekit::cpu::MoeLayerStorage<Spec> storage(layer, t_max);
//   auto aux = layer.forward(x, params, storage.state(), y, &stats, storage.workspace());
//   ... loss: L = f(y) + switch_coeff * aux.switch_loss + z_coeff * aux.z_loss ...
//   layer.backward(dy, x, params, storage.state(), dx, grads, storage.workspace());
//
// Inference on packed weights: pack(params, dtype) packs the routed and
// shared experts once in fp32, bf16 or int8 (cpu/gemm/packed_matrix.hpp) and
// copies the router's weights, which stay fp32 (a top-K choice flips on the
// smallest change of a logit, and the router is only E x d); forward with the
// PackedMoeLayerParams then runs the experts in that dtype. It writes the
// state's routing, offsets, buffer and expert_out, never the saved
// activations, and fp32 gives the same bits as the forward on views.
//
//   const moekit::cpu::PackedMoeLayerParams packed = layer.pack(params, GemmDtype::kInt8);
//   layer.forward(x, packed, storage.state(), y, &stats, storage.workspace());
//
// Argument order as every backward in moekit: the output gradient dy, the
// forward's inputs and saved state, then dx before the parameter gradients.
// The workspace is never optional (every call needs one), so it has no
// default and forgetting it does not compile.
//
// Backward (dy = dL/dy; the aux losses' gradients are added with their
// coefficients, so the gradients are those of L as above):
//   combine_backward        -> d_expert_out, dweights
//   ExpertFfn::backward     -> d_buffer, expert weight gradients
//   dispatch_backward       -> dx
//   Router::backward_gate   -> dlogits; += switch / z loss gradients
//   Router::backward_logits -> dx (added), dw_gate, dgate_bias
//   shared FFN backward     -> dx (added), shared weight gradients
// An empty gradient view is frozen: not computed, not written, and no work is
// done for it (frozen router: no dw_gate GEMM; frozen experts: no weight
// GEMMs, dx is still exact). An empty dx means "no input gradient". With
// grads.accumulate every non-empty output (dx included) receives the sum.
//
// Validation: every argument is checked (shapes against the config, T against
// the state's capacity, null data, the saved routing and offsets against each
// other) before anything is written, with the argument named in the message.
// One exception: with NonFinitePolicy::kError, a non-finite logit is reported
// (Errc::kNonFinite) after forward wrote the state's routing, never y.
// An output that overlaps an input or another output (y = x, say) is refused
// (kInvalidArgument, naming both; core/view.hpp). Results are deterministic for
// a fixed thread count, as the parts are.
//
// Token blocks (core/token_blocks.hpp): the router's input gradient and the
// shared experts run per block of kTokenBlock tokens, and the router's and
// shared experts' weight gradients are folded over the blocks in order (the
// router's logits and the expert FFNs are batch invariant by themselves). A
// token's output and every gradient are then the same bits as those of
// cpu::ExpertParallelMoeLayer on any number of ranks.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "moekit/core/activation.hpp"
#include "moekit/core/backend.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/token_blocks.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/aux_losses.hpp"
#include "moekit/cpu/dispatch.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/expert_ffn.hpp"
#include "moekit/cpu/router.hpp"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// The layer's configuration; the constructor validates it.
struct MoeLayerConfig {
  index_t d_model = 0;                            // d, the token width
  index_t d_ff = 0;                               // width of one routed expert
  FfnKind kind = FfnKind::kPlain;                 // plain or gated (SwiGLU-style) experts
  Activation activation = Activation::kGeluTanh;  // the experts' activation
  RouterConfig router{};                          // gating, noise, capacity (cpu/router.hpp)
  int num_shared = 0;                             // shared experts, run on every token
  index_t d_ff_shared = 0;                        // width of one shared expert; 0 = d_ff
  float switch_coeff = 0.0f;                      // Switch balance loss coefficient; 0 = off
  float z_coeff = 0.0f;                           // router z-loss coefficient; 0 = off
  SwitchLossOptions switch_options{};             // how the Switch loss normalises f_e
  FfnThreading threading = FfnThreading::kAuto;   // how the expert FFNs use threads
  GemmDtype compute = GemmDtype::kFloat32;        // the experts' products (ExpertFfnConfig)
};

// Parameters (caller memory). Routed experts in the ExpertWeights layout of
// moekit/cpu/expert_ffn.hpp with E experts of width d_ff; shared experts in
// the same layout with num_shared "experts" of width d_ff_shared (all views
// empty when num_shared = 0). w3 views are empty for FfnKind::kPlain.
struct MoeLayerParams {
  MatrixView<const float> w_gate{};          // E x d
  VectorView<const float> gate_bias{};       // E, or empty
  VectorView<const float> selection_bias{};  // E, or empty (ExpertBias::bias())
  ExpertWeights experts{};                   // routed experts: E experts of width d_ff
  ExpertWeights shared{};                    // shared experts: num_shared of width d_ff_shared
};

// A layer's parameters packed once for inference (MoeLayer::pack; owns its
// memory): the router's weights copied in fp32, the routed experts and each
// shared expert packed in one dtype.
struct PackedMoeLayerParams {
  index_t d_model = 0;                      // d
  std::vector<float> w_gate;                // E x d
  std::vector<float> gate_bias;             // E, or empty
  std::vector<float> selection_bias;        // E, or empty
  PackedExpertWeights experts;              // the routed experts
  std::vector<PackedExpertWeights> shared;  // one per shared expert
  // The dtype the experts are packed in.
  GemmDtype dtype() const { return experts.dtype(); }
};

// Gradient outputs; an empty view is frozen (see the top of this file).
struct MoeLayerGrads {
  MatrixView<float> dw_gate{};     // E x d
  VectorView<float> dgate_bias{};  // E; must be empty when params.gate_bias is
  MatrixView<float> dw1{};         // routed experts (ExpertWeights layout): (E d_ff) x d
  MatrixView<float> dw3{};         // (E d_ff) x d, gated experts only
  MatrixView<float> dw2{};         // (E d) x d_ff
  MatrixView<float> shared_dw1{};  // shared experts, the same layout with num_shared of them
  MatrixView<float> shared_dw3{};  // gated shared experts only
  MatrixView<float> shared_dw2{};  // (num_shared d) x d_ff_shared
  bool accumulate = false;         // add to every output (dx too) instead of overwriting
};

// What forward saves for backward (caller memory). Capacity T_max =
// routing.logits.rows(); all five routing views have T_max rows. Shapes are
// minimums for T = T_max (MoeLayer::state_rows gives them):
struct MoeLayerState {
  Routing routing;                // T_max x E (logits, scores), T_max x K (the rest)
  VectorView<index_t> offsets;    // E + 1
  MatrixView<float> buffer;       // routed_rows x d, the dispatched tokens
  MatrixView<float> expert_out;   // routed_rows x d
  MatrixView<float> saved_pre;    // routed_rows x d_ff
  MatrixView<float> saved_gate;   // routed_rows x d_ff for kGated, empty for kPlain
  MatrixView<float> shared_pre;   // num_shared T_max x d_ff_shared (empty if no shared)
  MatrixView<float> shared_gate;  // same, kGated only
};

// Shared with the CUDA backend (moekit/core/backend.hpp): the minimum rows of
// the state buffers for a capacity of T tokens, and the aux losses of a forward.
using ::moekit::MoeAuxLosses;
using ::moekit::MoeLayerStateRows;

// The num_shared shared experts of a layer: FFNs of width d_ff_shared (0:
// d_ff) that run on every token and add to y, with the routed experts'
// FfnKind and Activation, in the ExpertWeights layout with num_shared
// "experts". One FFN call per token block and shared expert; the weight
// gradients are folded over the blocks in order. MoeLayer and the
// expert-parallel layer (where the shared experts are replicated) both run
// this. Saved activations: pre (and gate for kGated) hold expert i's rows
// of a T-token batch at [i T, (i + 1) T).
class SharedExperts {
 public:
  // The shared experts of a layer with configuration c (validated by MoeLayer's).
  explicit SharedExperts(const MoeLayerConfig& c)
      : count_(c.num_shared),
        d_(c.d_model),
        f_(c.d_ff_shared > 0 ? c.d_ff_shared : c.d_ff),
        gated_(c.kind == FfnKind::kGated),
        ffn_(ExpertFfnConfig{c.d_model, f_, c.kind, c.activation, FfnThreading::kInsideGemm,
                             c.compute}) {}

  // num_shared, the shared experts.
  int count() const { return count_; }
  // The width of one shared expert.
  index_t d_ff() const { return f_; }

  // Bytes of workspace for a T-token batch (one block's outputs and FFN
  // scratch), a multiple of 64.
  index_t workspace_size(index_t tokens) const {
    if (count_ == 0) return 0;
    const index_t rows = std::min(tokens, kTokenBlock);
    return round64(rows * d_ * index_t{sizeof(float)}) + round64(ffn_.workspace_size(rows));
  }

  // y += sum_i FFN_i(x), saving each FFN's activations in pre / gate.
  void forward(MatrixView<const float> x, const ExpertWeights& w, MatrixView<float> pre,
               MatrixView<float> gate, MatrixView<float> y, VectorView<std::byte> workspace) const {
    const index_t tokens = x.rows();
    std::array<index_t, 2> all = {0, 0};  // the block's rows, all of the one expert
    for (int i = 0; i < count_; ++i) {
      const ExpertWeights wi = expert_weights(w, i, f_, d_);
      for_each_token_block(tokens, [&](index_t r0, index_t rows, index_t) {
        const MatrixView<float> tmp = block_out(workspace, rows);
        all[1] = rows;
        ffn_.forward(x.middle_rows(r0, rows), {all.data(), 2}, wi, tmp,
                     rows_of(pre, i, tokens, r0, rows),
                     gated_ ? rows_of(gate, i, tokens, r0, rows) : MatrixView<float>(),
                     ffn_workspace(workspace, rows));
        as_eigen(y.middle_rows(r0, rows)) += as_eigen(MatrixView<const float>(tmp));
      });
    }
  }

  // Each shared expert of w packed in `dtype` (allocates).
  std::vector<PackedExpertWeights> pack(const ExpertWeights& w, GemmDtype dtype) const {
    std::vector<PackedExpertWeights> out;
    for (int i = 0; i < count_; ++i) out.push_back(ffn_.pack(expert_weights(w, i, f_, d_), dtype));
    return out;
  }

  // y += sum_i FFN_i(x) on packed weights (pack), saving nothing.
  void forward(MatrixView<const float> x, const std::vector<PackedExpertWeights>& w,
               MatrixView<float> y, VectorView<std::byte> workspace) const {
    std::array<index_t, 2> all = {0, 0};  // the block's rows, all of the one expert
    for (int i = 0; i < count_; ++i) {
      for_each_token_block(x.rows(), [&](index_t r0, index_t rows, index_t) {
        const MatrixView<float> tmp = block_out(workspace, rows);
        all[1] = rows;
        ffn_.forward(x.middle_rows(r0, rows), {all.data(), 2}, w[static_cast<std::size_t>(i)], tmp,
                     ffn_workspace(workspace, rows));
        as_eigen(y.middle_rows(r0, rows)) += as_eigen(MatrixView<const float>(tmp));
      });
    }
  }

  // dx += the shared experts' input gradient (dx empty: none), and their
  // weight gradients into grads (empty views: frozen), folded over the
  // blocks: the first block overwrites unless grads.accumulate.
  void backward(MatrixView<const float> dy, MatrixView<const float> x, const ExpertWeights& w,
                MatrixView<const float> pre, MatrixView<const float> gate, MatrixView<float> dx,
                const ExpertGrads& grads, VectorView<std::byte> workspace) const {
    const index_t tokens = x.rows();
    const bool want_w = !grads.dw1.empty() || !grads.dw3.empty() || !grads.dw2.empty();
    if (dx.empty() && !want_w) return;
    std::array<index_t, 2> all = {0, 0};  // the block's rows, all of the one expert
    for (int i = 0; i < count_; ++i) {
      const ExpertWeights wi = expert_weights(w, i, f_, d_);
      ExpertGrads gi = expert_grads(grads, i, f_, d_);
      if (tokens == 0 && !grads.accumulate) {  // no block: zero gradients, as one empty call
        ffn_.backward(dy, x, {all.data(), 2}, wi, pre.middle_rows(0, 0),
                      gated_ ? gate.middle_rows(0, 0) : MatrixView<const float>(), {}, gi,
                      ffn_workspace(workspace, 0));
      }
      for_each_token_block(tokens, [&](index_t r0, index_t rows, index_t b) {
        gi.accumulate = grads.accumulate || b > 0;
        const MatrixView<float> tmp = dx.empty() ? MatrixView<float>() : block_out(workspace, rows);
        all[1] = rows;
        ffn_.backward(dy.middle_rows(r0, rows), x.middle_rows(r0, rows), {all.data(), 2}, wi,
                      rows_of(pre, i, tokens, r0, rows),
                      gated_ ? rows_of(gate, i, tokens, r0, rows) : MatrixView<const float>(), tmp,
                      gi, ffn_workspace(workspace, rows));
        if (!dx.empty())
          as_eigen(dx.middle_rows(r0, rows)) += as_eigen(MatrixView<const float>(tmp));
      });
    }
  }

 private:
  static index_t round64(index_t bytes) { return (bytes + 63) / 64 * 64; }

  // Rows [r0, r0 + rows) of shared expert i's part of a saved activation.
  template <class T>
  static MatrixView<T> rows_of(MatrixView<T> m, int i, index_t tokens, index_t r0, index_t rows) {
    return m.middle_rows(i * tokens + r0, rows);
  }
  MatrixView<float> block_out(VectorView<std::byte> ws, index_t rows) const {
    return {reinterpret_cast<float*>(ws.data()), rows, d_};
  }
  VectorView<std::byte> ffn_workspace(VectorView<std::byte> ws, index_t rows) const {
    const index_t at = round64(std::min(rows, kTokenBlock) * d_ * index_t{sizeof(float)});
    return {ws.data() + at, ffn_.workspace_size(rows)};
  }

  int count_;
  index_t d_, f_;
  bool gated_;
  ExpertFfn<MoeSpec<1, 1>> ffn_;
};

// The aux losses that a layer with configuration c reports for a forward
// with these routing statistics: both values (unscaled) whatever the
// coefficients, and their weighted total.
template <MoeSpecType S>
MoeAuxLosses aux_losses(const MoeLayerConfig& c, const RoutingStats<S>& stats) {
  MoeAuxLosses aux;
  aux.switch_loss = switch_loss<S>(stats, c.switch_options);
  aux.z_loss = stats.z_loss;
  aux.total = static_cast<double>(c.switch_coeff) * aux.switch_loss +
              static_cast<double>(c.z_coeff) * aux.z_loss;
  return aux;
}

// The MoE layer for MoeSpec<E, K> (see the top of this file).
template <MoeSpecType S>
class MoeLayer {
 public:
  static constexpr int kExperts = S::num_experts;  // E
  static constexpr int kTopK = S::top_k;           // K
  // The types of this backend's arguments, for code templated on the backend
  // (moekit/core/backend.hpp); gpu::MoeLayer<S, T> has the same names.
  using Element = float;
  using Config = MoeLayerConfig;            // the configuration
  using Params = MoeLayerParams;            // the parameters (caller memory)
  using Grads = MoeLayerGrads;              // the gradient outputs
  using State = MoeLayerState;              // what forward saves for backward
  using Stats = RoutingStats<S>;            // routing statistics of a forward
  using Workspace = VectorView<std::byte>;  // scratch memory, workspace_size(T) bytes

  // Rejects a configuration the layer cannot run (naming the field and value).
  explicit MoeLayer(const MoeLayerConfig& config)
      : config_(validated(config)),
        router_(config.router),
        ffn_(ExpertFfnConfig{config.d_model, config.d_ff, config.kind, config.activation,
                             config.threading, config.compute}),
        shared_(config) {}

  // The configuration it was built with.
  const MoeLayerConfig& config() const { return config_; }
  // Its router (capacity(), apply_capacity(), explain_selection(), ...).
  const Router<S>& router() const { return router_; }
  // Whether the experts are gated (FfnKind::kGated: w3 is used).
  bool gated() const { return config_.kind == FfnKind::kGated; }
  // The width of one shared expert (d_ff_shared, or d_ff when that is 0).
  index_t d_ff_shared() const { return shared_.d_ff(); }
  // The routed experts' FFN (E experts of width d_ff).
  const ExpertFfn<S>& experts() const { return ffn_; }
  // The shared experts (num_shared of width d_ff_shared()).
  const SharedExperts& shared_experts() const { return shared_; }

  // Rows of the expert-major buffer for T tokens, at most: T K, or E times
  // the expert capacity when that is smaller.
  index_t routed_rows(index_t tokens) const {
    MOEKIT_CHECK_GE(tokens, 0);
    return std::min(tokens * kTopK, index_t{kExperts} * router_.capacity(tokens));
  }

  // The minimum rows of the state buffers for a capacity of T tokens.
  MoeLayerStateRows state_rows(index_t tokens) const {
    return {tokens, routed_rows(tokens), index_t{config_.num_shared} * tokens};
  }

  // Bytes of the one workspace forward and backward take for T tokens
  // (backward's need, which covers forward's). Aligned to 4 bytes.
  index_t workspace_size(index_t tokens) const {
    MOEKIT_CHECK_GE(tokens, 0);
    return layout(tokens, routed_rows(tokens)).total;
  }

  // y = the layer's output for x (T x d); fills `state` for backward and
  // `stats` (unless null) with the routing statistics. Returns both aux
  // losses' values (unscaled) whatever the coefficients (a coefficient of 0
  // only leaves the value out of total and the gradients). workspace:
  // workspace_size(T) bytes.
  MoeAuxLosses forward(MatrixView<const float> x, const MoeLayerParams& params,
                       const MoeLayerState& state, MatrixView<float> y, RoutingStats<S>* stats,
                       VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::MoeLayer::forward");
    checks().check_params(params);
    const Layout lay = check_forward(x, state, y, workspace, &params);
    const auto experts = [&](MatrixView<const float> buffer, VectorView<const index_t> offsets,
                             MatrixView<float> out, VectorView<std::byte> ws) {
      const index_t n = buffer.rows();
      ffn_.forward(buffer, offsets, params.experts, out, state.saved_pre.middle_rows(0, n),
                   gated() ? state.saved_gate.middle_rows(0, n) : MatrixView<float>(), ws);
    };
    const auto shared = [&](VectorView<std::byte> ws) {
      shared_.forward(x, params.shared, state.shared_pre, state.shared_gate, y, ws);
    };
    return run_forward(x, params, state, y, stats, workspace, lay, experts, shared);
  }

  // The layer's parameters packed once for inference in `dtype` (allocates;
  // see the top of this file). Checks params as forward does.
  PackedMoeLayerParams pack(const MoeLayerParams& params, GemmDtype dtype) const {
    MOEKIT_API("cpu::MoeLayer::pack");
    checks().check_params(params);
    MOEKIT_CHECK_ARG(is_gemm_dtype(dtype), "dtype = ", static_cast<int>(dtype),
                     " is not a GemmDtype");
    PackedMoeLayerParams p;
    p.d_model = config_.d_model;
    p.w_gate.resize(static_cast<std::size_t>(kExperts * config_.d_model));
    as_eigen(MatrixView<float>(p.w_gate.data(), kExperts, config_.d_model)) =
        as_eigen(params.w_gate);
    p.gate_bias.assign(params.gate_bias.begin(), params.gate_bias.end());
    p.selection_bias.assign(params.selection_bias.begin(), params.selection_bias.end());
    p.experts = ffn_.pack(params.experts, dtype);
    p.shared = shared_.pack(params.shared, dtype);
    return p;
  }

  // The inference forward on packed parameters (pack): y, the state's routing,
  // offsets, buffer and expert_out and `stats` as the forward above writes
  // them, with the experts' products in packed.dtype(); the saved activations
  // are not written. The same state and workspace as forward.
  MoeAuxLosses forward(MatrixView<const float> x, const PackedMoeLayerParams& packed,
                       const MoeLayerState& state, MatrixView<float> y, RoutingStats<S>* stats,
                       VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::MoeLayer::forward");
    check_packed(packed);
    const Layout lay = check_forward(x, state, y, workspace, nullptr);
    const auto experts = [&](MatrixView<const float> buffer, VectorView<const index_t> offsets,
                             MatrixView<float> out, VectorView<std::byte> ws) {
      ffn_.forward(buffer, offsets, packed.experts, out, ws);
    };
    const auto shared = [&](VectorView<std::byte> ws) { shared_.forward(x, packed.shared, y, ws); };
    return run_forward(x, router_params(packed), state, y, stats, workspace, lay, experts, shared);
  }

  // Gradients of L = f(y) + switch_coeff L_switch + z_coeff L_z given
  // dy = df/dy (T x d) and the x, params and state of the forward. dx (T x
  // d) or empty; grads: see MoeLayerGrads; workspace: workspace_size(T) bytes.
  void backward(MatrixView<const float> dy, MatrixView<const float> x, const MoeLayerParams& params,
                const MoeLayerState& state, MatrixView<float> dx, const MoeLayerGrads& grads,
                VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::MoeLayer::backward");
    check_view(dy, "dy");
    const index_t tokens = dy.rows();
    const index_t d = config_.d_model;
    check_shape(dy, tokens, d, "dy");
    check_shape(x, tokens, d, "x");
    if (!dx.empty()) check_shape(dx, tokens, d, "dx");
    checks().check_params(params);
    checks().check_grads(grads, params);
    checks().check_state(state, tokens, state_rows(tokens));
    const Routing routing = routing_rows(state.routing, tokens);
    const VectorView<const index_t> offsets = state.offsets;
    const index_t n = detail::check_dispatch_args<S>(routing, tokens, offsets);
    check_distinct_ids(routing.expert_ids, "state.routing.expert_ids");
    MOEKIT_CHECK(n <= routed_rows(tokens), Errc::kShapeMismatch, "offsets[", kExperts, "] = ", n,
                 " exceeds routed_rows(", tokens, ") = ", routed_rows(tokens));
    const Layout lay = layout(tokens, routed_rows(tokens));
    check_workspace(workspace, lay.total);
    OverlapCheck overlap("cpu::MoeLayer::backward");
    overlap.out({{dx, "dx"}, {workspace.segment(0, lay.total), "workspace"}})
        .in({{dy, "dy"}, {x, "x"}});
    add_moe_params(overlap, params);
    add_moe_grads(overlap, grads);
    add_moe_state(overlap, state, /*written=*/false);
    overlap.check();

    const bool acc = grads.accumulate;
    const bool want_dx = !dx.empty();
    const bool want_router = want_dx || !grads.dw_gate.empty() || !grads.dgate_bias.empty();
    const bool want_expert_w = !grads.dw1.empty() || !grads.dw3.empty() || !grads.dw2.empty();
    const bool want_d_out = want_dx || want_expert_w;

    const MatrixView<float> dweights(floats(workspace, lay.dweights), tokens, kTopK);
    const MatrixView<float> dlogits(floats(workspace, lay.dlogits), tokens, kExperts);
    const MatrixView<float> d_out(floats(workspace, lay.main), n, d);
    const MatrixView<float> d_buffer(floats(workspace, lay.main + lay.routed_bytes), n, d);
    const MatrixView<const float> buffer = state.buffer.middle_rows(0, n);
    const MatrixView<const float> out = state.expert_out.middle_rows(0, n);

    // Routed experts.
    if (want_d_out || want_router) {
      combine_backward<S>(dy, out, routing, offsets, want_d_out ? d_out : MatrixView<float>(),
                          want_router ? dweights : MatrixView<float>());
    }
    if (want_d_out) {
      ffn_.backward(MatrixView<const float>(d_out), buffer, offsets, params.experts,
                    state.saved_pre.middle_rows(0, n),
                    gated() ? MatrixView<const float>(state.saved_gate.middle_rows(0, n))
                            : MatrixView<const float>(),
                    want_dx ? d_buffer : MatrixView<float>(),
                    ExpertGrads{grads.dw1, grads.dw3, grads.dw2, acc},
                    region(workspace, lay.main + 2 * lay.routed_bytes, ffn_.workspace_size(n)));
    }
    if (want_dx) dispatch_backward<S>(MatrixView<const float>(d_buffer), routing, offsets, dx, acc);

    // Router: gate, aux losses, logits.
    if (want_router) {
      router_.backward_gate(routing, MatrixView<const float>(dweights), dlogits);
      if (config_.switch_coeff != 0.0f) {
        switch_loss<S>(config_.router.gating.rule, routing, config_.switch_options,
                       config_.switch_coeff, dlogits);
      }
      if (config_.z_coeff != 0.0f) z_loss<S>(routing, config_.z_coeff, dlogits);
      const VectorView<std::byte> ws = region(workspace, lay.main, lay.router_bytes);
      const MatrixView<const float> g = dlogits;
      if (want_dx) {
        router_.backward_logits(x, params.w_gate, g, RouterGrads{dx, {}, {}, true}, ws);
      }
      if (!grads.dw_gate.empty() || !grads.dgate_bias.empty()) {
        router_.backward_logits(x, params.w_gate, g,
                                RouterGrads{{}, grads.dw_gate, grads.dgate_bias, acc}, ws);
      }
    }

    // Shared experts: dy reaches each unchanged.
    shared_.backward(dy, x, params.shared, state.shared_pre, state.shared_gate, dx,
                     ExpertGrads{grads.shared_dw1, grads.shared_dw3, grads.shared_dw2, acc},
                     region(workspace, lay.main, shared_.workspace_size(tokens)));
  }

 private:
  // Byte offsets of the workspace regions (each a multiple of 64 bytes).
  //   [dweights T K][dlogits T E][main: the largest of
  //     routed backward: d_out, d_buffer (N x d each), FFN workspace (N)
  //     router workspace
  //     shared experts' workspace]
  // Forward uses main only.
  struct Layout {
    index_t dweights = 0, dlogits = 0, main = 0;
    index_t routed_bytes = 0, router_bytes = 0;
    index_t total = 0;
  };

  static index_t round_bytes(index_t bytes) { return (bytes + 63) / 64 * 64; }

  // What both forwards check (params: the views' footprints, when given);
  // returns the workspace layout.
  Layout check_forward(MatrixView<const float> x, const MoeLayerState& state, MatrixView<float> y,
                       VectorView<std::byte> workspace, const MoeLayerParams* params) const {
    check_view(x, "x");
    const index_t tokens = x.rows();
    check_shape(x, tokens, config_.d_model, "x");
    check_shape(y, tokens, config_.d_model, "y");
    checks().check_state(state, tokens, state_rows(tokens));
    const Layout lay = layout(tokens, routed_rows(tokens));
    check_workspace(workspace, lay.total);
    OverlapCheck overlap("cpu::MoeLayer::forward");
    overlap.out({{y, "y"}, {workspace.segment(0, lay.total), "workspace"}}).in({{x, "x"}});
    if (params != nullptr) add_moe_params(overlap, *params);
    add_moe_state(overlap, state, /*written=*/true);
    overlap.check();
    return lay;
  }

  // Route, dispatch, the routed experts (experts(buffer, offsets, out,
  // workspace)), combine, the shared experts (shared(workspace)).
  template <class Experts, class Shared>
  MoeAuxLosses run_forward(MatrixView<const float> x, const MoeLayerParams& params,
                           const MoeLayerState& state, MatrixView<float> y, RoutingStats<S>* stats,
                           VectorView<std::byte> workspace, const Layout& lay,
                           const Experts& experts, const Shared& shared) const {
    const Routing routing = routing_rows(state.routing, x.rows());
    // The aux losses' values come with the statistics of the routing pass.
    RoutingStats<S> local_stats;
    if (stats == nullptr) stats = &local_stats;
    router_.forward(x, params.w_gate, params.gate_bias, params.selection_bias, routing, stats,
                    region(workspace, lay.main, lay.router_bytes));
    const VectorView<const index_t> offsets = state.offsets;
    const index_t n = dispatch_offsets<S>(routing, state.offsets);
    const MatrixView<float> buffer = state.buffer.middle_rows(0, n);
    const MatrixView<float> out = state.expert_out.middle_rows(0, n);
    dispatch<S>(x, routing, offsets, buffer);
    experts(MatrixView<const float>(buffer), offsets, out,
            region(workspace, lay.main, ffn_.workspace_size(n)));
    combine<S>(out, routing, offsets, y);
    shared(region(workspace, lay.main, shared_.workspace_size(x.rows())));
    return aux_losses(config_, *stats);
  }

  // Packed parameters of this configuration (errors name forward).
  void check_packed(const PackedMoeLayerParams& p) const {
    const index_t e = kExperts, d = config_.d_model;
    const auto size = [](const std::vector<float>& v) { return static_cast<index_t>(v.size()); };
    MOEKIT_CHECK(p.d_model == d && size(p.w_gate) == e * d, Errc::kShapeMismatch,
                 "packed.w_gate holds ", size(p.w_gate), " floats for d_model ", p.d_model,
                 "; this layer needs ", e, " x ", d, " (MoeLayer::pack)");
    MOEKIT_CHECK(p.gate_bias.empty() || size(p.gate_bias) == e, Errc::kShapeMismatch,
                 "packed.gate_bias holds ", size(p.gate_bias), " floats, not ", e);
    MOEKIT_CHECK(p.selection_bias.empty() || size(p.selection_bias) == e, Errc::kShapeMismatch,
                 "packed.selection_bias holds ", size(p.selection_bias), " floats, not ", e);
    MOEKIT_CHECK(static_cast<index_t>(p.shared.size()) == config_.num_shared, Errc::kShapeMismatch,
                 "packed.shared holds ", p.shared.size(),
                 " experts; config.num_shared = ", config_.num_shared);
  }

  // The router's part of packed parameters, as views.
  static MoeLayerParams router_params(const PackedMoeLayerParams& p) {
    const auto vec = [](const std::vector<float>& v) {
      return VectorView<const float>(v.data(), static_cast<index_t>(v.size()));
    };
    MoeLayerParams r;
    r.w_gate = {p.w_gate.data(), kExperts, p.d_model};
    if (!p.gate_bias.empty()) r.gate_bias = vec(p.gate_bias);
    if (!p.selection_bias.empty()) r.selection_bias = vec(p.selection_bias);
    return r;
  }
  static index_t float_bytes(index_t count) { return round_bytes(count * index_t{sizeof(float)}); }

  Layout layout(index_t tokens, index_t rows) const {
    const index_t d = config_.d_model;
    Layout l;
    l.dweights = 0;
    l.dlogits = float_bytes(tokens * kTopK);
    l.main = l.dlogits + float_bytes(tokens * kExperts);
    l.routed_bytes = float_bytes(rows * d);
    l.router_bytes = round_bytes(router_.workspace_size(tokens, d));
    const index_t main = std::max({2 * l.routed_bytes + round_bytes(ffn_.workspace_size(rows)),
                                   l.router_bytes, shared_.workspace_size(tokens)});
    l.total = l.main + main;
    return l;
  }

  static float* floats(VectorView<std::byte> workspace, index_t offset) {
    return workspace.data() == nullptr ? nullptr
                                       : reinterpret_cast<float*>(workspace.data() + offset);
  }
  static VectorView<std::byte> region(VectorView<std::byte> workspace, index_t offset,
                                      index_t bytes) {
    if (bytes == 0) return {};
    return VectorView<std::byte>(workspace.data() + offset, bytes);
  }

  static const MoeLayerConfig& validated(const MoeLayerConfig& c) {
    MOEKIT_API("cpu::MoeLayer::MoeLayer");
    check_moe_layer_fields(c);
    return c;  // d_model, d_ff, kind, activation, threading, compute, router: the parts'
               // constructors
  }

  // The first `tokens` rows of a routing.
  static Routing routing_rows(const Routing& r, index_t tokens) {
    return {r.logits.middle_rows(0, tokens), r.scores.middle_rows(0, tokens),
            r.expert_ids.middle_rows(0, tokens), r.weights.middle_rows(0, tokens),
            r.positions.middle_rows(0, tokens)};
  }

  // Shape checks shared with the CUDA layer (moekit/core/backend.hpp).
  MoeLayerChecks checks() const {
    return {kExperts,           kTopK,  config_.d_model, config_.d_ff, d_ff_shared(),
            config_.num_shared, gated()};
  }

  static void check_workspace(VectorView<std::byte> workspace, index_t need) {
    check_view(workspace, "workspace");
    MOEKIT_CHECK(workspace.size() >= need, Errc::kShapeMismatch, "workspace has ", workspace.size(),
                 " bytes, workspace_size() = ", need);
    MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace.data()) % alignof(float) == 0,
                 Errc::kInvalidArgument, "workspace is not aligned to ", alignof(float), " bytes");
  }

  MoeLayerConfig config_;
  Router<S> router_;
  ExpertFfn<S> ffn_;
  SharedExperts shared_;
};

// Owning storage for a layer's state and workspace up to `max_tokens`
// (allocated here, once; the views stay valid while this object lives).
template <MoeSpecType S>
class MoeLayerStorage {
 public:
  // Allocates the state and workspace of `layer` for up to max_tokens tokens.
  MoeLayerStorage(const MoeLayer<S>& layer, index_t max_tokens) {
    constexpr int E = S::num_experts, K = S::top_k;
    const MoeLayerConfig& c = layer.config();
    const MoeLayerStateRows rows = layer.state_rows(max_tokens);
    const index_t d = c.d_model, f = c.d_ff, fs = layer.d_ff_shared();
    const bool gated = layer.gated();
    const auto sz = [](index_t n) { return static_cast<std::size_t>(n); };
    logits_.resize(sz(max_tokens * E));
    scores_.resize(sz(max_tokens * E));
    weights_.resize(sz(max_tokens * K));
    ids_.resize(sz(max_tokens * K));
    positions_.resize(sz(max_tokens * K));
    offsets_.resize(sz(E + 1));
    buffer_.resize(sz(rows.routed_rows * d));
    expert_out_.resize(sz(rows.routed_rows * d));
    saved_pre_.resize(sz(rows.routed_rows * f));
    saved_gate_.resize(gated ? sz(rows.routed_rows * f) : 0);
    shared_pre_.resize(sz(rows.shared_rows * fs));
    shared_gate_.resize(gated ? sz(rows.shared_rows * fs) : 0);
    workspace_.resize(sz(layer.workspace_size(max_tokens) / index_t{sizeof(float)} + 1));
    const index_t shared_r = c.num_shared > 0 ? rows.shared_rows : 0;
    state_.routing = {{logits_.data(), max_tokens, E},
                      {scores_.data(), max_tokens, E},
                      {ids_.data(), max_tokens, K},
                      {weights_.data(), max_tokens, K},
                      {positions_.data(), max_tokens, K}};
    state_.offsets = {offsets_.data(), E + 1};
    state_.buffer = {buffer_.data(), rows.routed_rows, d};
    state_.expert_out = {expert_out_.data(), rows.routed_rows, d};
    state_.saved_pre = {saved_pre_.data(), rows.routed_rows, f};
    state_.saved_gate =
        gated ? MatrixView<float>(saved_gate_.data(), rows.routed_rows, f) : MatrixView<float>();
    state_.shared_pre = c.num_shared > 0 ? MatrixView<float>(shared_pre_.data(), shared_r, fs)
                                         : MatrixView<float>();
    state_.shared_gate = c.num_shared > 0 && gated
                             ? MatrixView<float>(shared_gate_.data(), shared_r, fs)
                             : MatrixView<float>();
  }

  // The state views, for forward and backward.
  const MoeLayerState& state() const { return state_; }
  // The workspace, workspace_size(max_tokens) bytes or more.
  VectorView<std::byte> workspace() {
    return {reinterpret_cast<std::byte*>(workspace_.data()),
            static_cast<index_t>(workspace_.size() * sizeof(float))};
  }

 private:
  std::vector<float> logits_, scores_, weights_;
  std::vector<std::int32_t> ids_, positions_;
  std::vector<index_t> offsets_;
  std::vector<float> buffer_, expert_out_, saved_pre_, saved_gate_, shared_pre_, shared_gate_;
  std::vector<float> workspace_;  // floats, so the bytes are 4-byte aligned
  MoeLayerState state_;
};

}  // namespace cpu

// The CPU backend for moekit::MoeLayer<S, Backend> (moekit/core/backend.hpp).
struct CpuBackend {
  // The layer of this backend for MoeSpec S.
  template <MoeSpecType S>
  using MoeLayer = cpu::MoeLayer<S>;
};

MOEKIT_NAMESPACE_END
