#pragma once
// A Mixture-of-Experts layer whose experts are sharded over the ranks of a
// transport (dist/transport.hpp: MPI, loopback threads), bit-identical to
// cpu::MoeLayer (nn/moe_layer.hpp) run in one process on the whole batch.
//
//   dist::MpiTransport transport;                              // or a LoopbackTransport
//   const auto placement = dist::ExpertPlacement::even(E, transport.size());
//   cpu::ExpertParallelMoeLayer<Spec, dist::MpiTransport> layer(config, placement, transport);
//   cpu::ExpertParallelStorage<Spec> storage(layer, local_max, global_max);
//   auto aux = layer.forward(x, params, storage.state(), y, &stats, storage.workspace());
//   layer.backward(dy, x, params, storage.state(), dx, grads, storage.workspace());
//
// What is sharded, what is replicated. Rank r owns experts [first, first +
// count) of placement (any split, zero experts included): params.experts and
// grads.dw1/dw3/dw2 hold those experts only, stacked in the ExpertWeights
// layout. The router (w_gate, gate_bias, selection_bias) and the shared
// experts are replicated: every rank holds them whole, and their gradients
// come out equal on every rank. Tokens are data-parallel: each rank passes
// its own rows x (T_r x d); the batch is the ranks' rows concatenated in rank
// order, and every rank but the last one holding tokens must hold a multiple
// of kTokenBlock = 64 tokens (dist::check_token_split says why).
//
// Forward (every step collective, in this order on every rank):
//   1. logits of the rank's tokens (cpu::gate_logits, batch invariant; noise
//      counters of the whole batch), gating per token: scores, top-K ids and
//      weights;
//   2. one exchange of counts: every rank's token count and assignments per
//      expert (plus a status word: a rank whose own checks failed makes every
//      rank throw, instead of leaving them waiting);
//   3. capacity from the batch total, C = cap(sum_r T_r), and positions:
//      slot (t, k) of expert e gets the global position prefix_r[e] + (its
//      rank in the rank's own slots of e), prefix_r[e] = the assignments of e
//      on ranks before r, and is kept when that is below C: exactly the
//      numbering of one process (token order, then k);
//   4. dispatch into the rank's expert-major buffer, whose rows for the
//      experts of rank o are one contiguous segment (placement is contiguous),
//      and an all_to_all_v of those segments;
//   5. the owner regroups what it received from (rank, expert) order to
//      (expert, rank) order: each expert's rows are then those of one process,
//      in the same order, and its FFN runs on the same GEMM engine, whose
//      results for a row (and weight gradients over an expert's rows) do not
//      depend on the other experts' rows;
//   6. the outputs go back the same way; combine and the shared experts run on
//      the rank's own tokens;
//   7. the routing statistics (and the aux losses from them): counts from the
//      exchange, the double sums over TokenChunks of the whole batch by passing
//      the chunk sums from rank to rank (dist::pass_along_ranks).
// Backward mirrors it: combine_backward locally, the output gradients to the
// owners, FFN backward (the experts' weight gradients are local), the input
// gradients back, dispatch_backward; the router's gate gradient and the
// Switch / z-loss gradients from the batch's counts and size; then the
// replicated parameters' gradients (router, shared experts) are folded over
// the token blocks by passing the partial gradients from rank to rank, and
// the last rank broadcasts them.
//
// Determinism. Every rank count, every expert split and every token split
// that follows the block rule gives the same bits as cpu::MoeLayer in one
// process with the same OpenMP thread count per process. DropPolicy::kProbs is not supported
// (Errc::kUnsupported: it ranks each expert's assignments over the whole
// batch). With NonFinitePolicy::kError a rank that meets a non-finite logit
// throws kNonFinite and the others kTransportError naming it.
//
// Failure. Construction is collective: every rank's configuration
// fingerprint (config, placement, number of ranks) is compared, and ranks
// that disagree or rejected their own configuration stop there with the same
// error. Argument errors on one rank are shared through the first exchange
// of each call. What the transport detects (peers that never answer, leave,
// or fail) it reports as Errc::kTransportError.
//
// Memory: parameters, gradients, state and workspace are caller memory, sized
// for at most local_max tokens on this rank and global_max in the batch
// (rows(), workspace_size(); ExpertParallelStorage allocates them once). No
// call allocates.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <span>
#include <vector>

#include "moekit/core/backend.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/token_blocks.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/aux_losses.hpp"
#include "moekit/cpu/dispatch.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/expert_ffn.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/cpu/router.hpp"
#include "moekit/dist/layout.hpp"
#include "moekit/dist/transport.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "moekit/spec.hpp"
#include "moekit/version.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// What forward saves for backward on one rank (caller memory; shapes are
// minimums, ExpertParallelMoeLayer::rows() gives them).
struct ExpertParallelState {
  Routing routing;                // tokens x E / x K, positions numbered within the rank
  VectorView<index_t> offsets;    // E + 1: the rank's kept slots per expert, scanned
  MatrixView<float> returned;     // slot_rows x d: the expert outputs of the rank's slots
  MatrixView<float> buffer;       // expert_rows x d: the rows its experts received
  MatrixView<float> saved_pre;    // expert_rows x d_ff
  MatrixView<float> saved_gate;   // expert_rows x d_ff for kGated, empty for kPlain
  MatrixView<float> shared_pre;   // shared_rows x d_ff_shared (empty without shared experts)
  MatrixView<float> shared_gate;  // same, kGated only
  VectorView<std::int64_t> plan;  // plan_size(): the exchange of the last forward
};

// Minimum rows of the state for at most local_max tokens on this rank and
// global_max in the batch.
struct ExpertParallelRows {
  index_t tokens = 0;       // routing rows
  index_t slot_rows = 0;    // returned: tokens K
  index_t expert_rows = 0;  // buffer, saved_pre, saved_gate
  index_t shared_rows = 0;  // shared_pre, shared_gate: num_shared tokens
};

template <MoeSpecType S, dist::HostTransport T>
// The MoE layer for MoeSpec<E, K> with its routed experts sharded over the ranks of transport T
// (see the top of this file).
class ExpertParallelMoeLayer {
 public:
  // E
  static constexpr int kExperts = S::num_experts;
  // K
  static constexpr int kTopK = S::top_k;
  // The configuration (that of cpu::MoeLayer).
  using Config = MoeLayerConfig;
  // The parameters: the experts' stacks hold this rank's experts.
  using Params = MoeLayerParams;
  // The gradient outputs: dw1 / dw3 / dw2 this rank's experts'.
  using Grads = MoeLayerGrads;
  // What forward saves for backward on this rank.
  using State = ExpertParallelState;
  // Routing statistics of the whole batch.
  using Stats = RoutingStats<S>;

  // Collective: validates config and placement (placement.ranks() must be
  // the transport's size, placement.experts() = E), then compares every
  // rank's fingerprint (see the top of this file).
  ExpertParallelMoeLayer(const MoeLayerConfig& config, const dist::ExpertPlacement& placement,
                         T& transport)
      : ExpertParallelMoeLayer(checked(config, placement, transport), placement, transport, 0) {}

  // The configuration it was built with.
  const MoeLayerConfig& config() const { return config_; }
  // Which rank owns which experts.
  const dist::ExpertPlacement& placement() const { return placement_; }
  // The transport it runs on.
  T& transport() const { return *transport_; }
  // The first of this rank's experts.
  int first_expert() const { return first_; }
  // How many experts this rank holds (0 allowed).
  int local_experts() const { return local_; }
  // Whether the experts are gated (FfnKind::kGated: w3 is used).
  bool gated() const { return config_.kind == FfnKind::kGated; }
  // The width of one shared expert (d_ff_shared, or d_ff when that is 0).
  index_t d_ff_shared() const { return shared_.d_ff(); }
  // Its router (replicated on every rank).
  const Router<S>& router() const { return router_; }

  // The minimum rows of the state for at most local_max tokens on this rank and global_max in the
  // batch.
  ExpertParallelRows rows(index_t local_max, index_t global_max) const {
    MOEKIT_CHECK_GE(local_max, 0);
    MOEKIT_CHECK_GE(global_max, local_max);
    const index_t per_token = std::min<index_t>(kTopK, local_);
    const index_t expert_rows =
        std::min(global_max * per_token, index_t{local_} * router_.capacity(global_max));
    return {local_max, local_max * kTopK, expert_rows, index_t{config_.num_shared} * local_max};
  }

  // Entries of state.plan.
  index_t plan_size() const { return index_t{ranks_} * (kPlanFields + 2 * kExperts); }

  // Bytes of the workspace forward and backward take, for a state of these rows.
  index_t workspace_size(const ExpertParallelRows& r) const {
    return layout(r.tokens, r.slot_rows, r.expert_rows).total;
  }

  // Collective. y (T_r x d) = the layer's output for this rank's tokens x;
  // fills state and, when not null, stats with the statistics of the whole
  // batch (equal on every rank). Returns the aux losses of the whole batch.
  MoeAuxLosses forward(MatrixView<const float> x, const MoeLayerParams& params,
                       const ExpertParallelState& state, MatrixView<float> y,
                       RoutingStats<S>* stats, VectorView<std::byte> workspace) {
    MOEKIT_API("cpu::ExpertParallelMoeLayer::forward");
    const index_t tokens = x.rows(), d = config_.d_model;
    const Routing routing = routing_rows(state.routing, tokens);
    Layout lay;
    Errc failed = Errc{};
    std::exception_ptr error;
    std::array<std::int64_t, to_size(kExperts)> count{};
    index_t non_finite = 0;
    index_t first_token = 0;
    try {
      check_view(x, "x");
      check_shape(x, tokens, d, "x");
      check_shape(y, tokens, d, "y");
      checks().check_params(params);
      check_state(state, tokens);
      lay = layout(state.routing.logits.rows(), state.returned.rows(), state.buffer.rows());
      check_workspace(workspace, lay.total);
      MOEKIT_CHECK(config_.router.capacity.policy == DropPolicy::kPosition ||
                       config_.router.capacity.factor <= 0.0,
                   Errc::kUnsupported,
                   "DropPolicy::kProbs is not supported by the expert-parallel layer (it ranks "
                   "an expert's assignments over the whole batch)");
    } catch (const Error& e) {
      failed = e.code();
      error = std::current_exception();
    }
    // With noise, the counters need this rank's first token before gating.
    if (config_.router.noise.kind != NoiseKind::kNone) {
      const std::array<std::int64_t, 2> row = {static_cast<std::int64_t>(failed), tokens};
      const std::span<std::int64_t> all = int64s(workspace, lay.gathered, ranks_ * 2);
      gather_checked(row, all, int64s(workspace, lay.gathered + lay.gathered_half, ranks_ * 2),
                     error, "forward");
      for (int q = 0; q < rank_; ++q) first_token += all[static_cast<std::size_t>(2 * q + 1)];
    }
    if (failed == Errc{}) {
      try {
        router_.logits(x, params.w_gate, params.gate_bias, routing.logits,
                       region(workspace, lay.aux, router_.workspace_size(tokens, d)), first_token);
        non_finite = router_.gate(routing, params.selection_bias);
        for (index_t t = 0; t < tokens; ++t) {
          for (int k = 0; k < kTopK; ++k) ++count[to_size(routing.expert_ids(t, k))];
        }
      } catch (const Error& e) {
        failed = e.code();
        error = std::current_exception();
      }
    }

    // 2. The exchange: [status, tokens, expert rows the state holds, non-finite, counts[E]].
    std::array<std::int64_t, to_size(kPlanFields + kExperts)> mine{};
    mine[0] = static_cast<std::int64_t>(failed);
    mine[1] = tokens;
    mine[2] = failed == Errc{} ? state.buffer.rows() : 0;
    mine[3] = non_finite;
    std::copy(count.begin(), count.end(), mine.begin() + kPlanFields);
    const std::span<std::int64_t> gathered = int64s(workspace, lay.gathered, ranks_ * kRow);
    gather_checked(mine, gathered,
                   int64s(workspace, lay.gathered + lay.gathered_half, ranks_ * kRow), error,
                   "forward");
    const Plan plan = make_plan(gathered, state.plan);

    // 3. Capacity and positions (global positions, then numbered within the rank).
    std::array<std::int32_t, to_size(kExperts)> next{};
    for (int e = 0; e < kExperts; ++e)
      next[to_size(e)] = static_cast<std::int32_t>(plan.prefix(rank_, e));
    Router<S>::number_in_order(routing.expert_ids, routing.weights, routing.positions, 0, tokens,
                               plan.cap, next);
    for (index_t t = 0; t < tokens; ++t) {
      for (int k = 0; k < kTopK; ++k) {
        std::int32_t& p = routing.positions(t, k);
        if (p >= 0) p -= static_cast<std::int32_t>(plan.prefix(rank_, routing.expert_ids(t, k)));
      }
    }
    const index_t n = dispatch_offsets<S>(routing, state.offsets);
    const VectorView<const index_t> offsets = state.offsets;

    // 4-6. Dispatch, experts, return, combine.
    const MatrixView<float> slots = rows_at(workspace, lay.slots, n);
    dispatch<S>(x, routing, offsets, slots);
    const index_t received = plan.expert_rows(rank_);
    const MatrixView<float> inbox = rows_at(workspace, lay.inbox, received);
    const MatrixView<float> outbox = rows_at(workspace, lay.outbox, received);
    exchange(plan, slots, inbox, workspace, lay, true);
    regroup(plan, inbox, state.buffer.middle_rows(0, received), true);
    const MatrixView<float> out = inbox;  // the received rows are in state.buffer now
    run_experts(
        plan,
        [&](int j, index_t r0, index_t rows, VectorView<const index_t> all,
            VectorView<std::byte> ws) {
          ffn_.forward(state.buffer.middle_rows(r0, rows), all,
                       expert_weights(params.experts, j, config_.d_ff, d),
                       out.middle_rows(r0, rows), state.saved_pre.middle_rows(r0, rows),
                       gated() ? state.saved_gate.middle_rows(r0, rows) : MatrixView<float>(), ws);
        },
        workspace, lay);
    regroup(plan, out, outbox, false);
    const MatrixView<float> returned = state.returned.middle_rows(0, n);
    exchange(plan, outbox, returned, workspace, lay, false);
    combine<S>(returned, routing, offsets, y);
    shared_.forward(x, params.shared, state.shared_pre, state.shared_gate, y,
                    region(workspace, lay.aux, shared_.workspace_size(tokens)));

    // 7. Statistics of the whole batch, and the aux losses from them.
    RoutingStats<S> local_stats;
    if (stats == nullptr) stats = &local_stats;
    batch_stats(plan, routing, workspace, lay, *stats);
    return aux_losses(config_, *stats);
  }

  // Collective. Gradients of the loss of the whole batch (as cpu::MoeLayer::
  // backward, aux losses included) given this rank's dy (T_r x d) and the x,
  // params and state of its forward. dx (T_r x d) or empty; grads: the
  // router's and shared experts' gradients come out equal on every rank,
  // dw1/dw3/dw2 are this rank's experts'. Every rank must ask for the same
  // replicated gradients and agree on whether dx is wanted somewhere.
  void backward(MatrixView<const float> dy, MatrixView<const float> x, const MoeLayerParams& params,
                const ExpertParallelState& state, MatrixView<float> dx, const MoeLayerGrads& grads,
                VectorView<std::byte> workspace) {
    MOEKIT_API("cpu::ExpertParallelMoeLayer::backward");
    const index_t tokens = dy.rows(), d = config_.d_model;
    const Routing routing = routing_rows(state.routing, tokens);
    Layout lay;
    Errc failed = Errc{};
    std::exception_ptr error;
    index_t n = 0;
    try {
      check_view(dy, "dy");
      check_shape(dy, tokens, d, "dy");
      check_shape(x, tokens, d, "x");
      if (!dx.empty()) check_shape(dx, tokens, d, "dx");
      checks().check_params(params);
      checks().check_grads(grads, params);
      check_state(state, tokens);
      n = detail::check_dispatch_args<S>(routing, tokens, state.offsets);
      lay = layout(state.routing.logits.rows(), state.returned.rows(), state.buffer.rows());
      check_workspace(workspace, lay.total);
      MOEKIT_CHECK(state.plan[index_t{ranks_} + rank_] == tokens, Errc::kShapeMismatch, "dy has ",
                   tokens, " rows, the forward of this state had ",
                   state.plan[index_t{ranks_} + rank_]);
    } catch (const Error& e) {
      failed = e.code();
      error = std::current_exception();
    }
    // What this rank asks for; the replicated parts must agree.
    const bool want_dx = !dx.empty();
    const bool want_router_w = !grads.dw_gate.empty() || !grads.dgate_bias.empty();
    const bool want_expert_w = !grads.dw1.empty() || !grads.dw3.empty() || !grads.dw2.empty();
    const bool want_shared_w =
        !grads.shared_dw1.empty() || !grads.shared_dw3.empty() || !grads.shared_dw2.empty();
    const std::array<std::int64_t, kWants> mine = {static_cast<std::int64_t>(failed), want_dx,
                                                   want_expert_w, replicated_key(grads)};
    const std::span<std::int64_t> gathered = int64s(workspace, lay.gathered, ranks_ * kWants);
    gather_checked(mine, gathered,
                   int64s(workspace, lay.gathered + lay.gathered_half, ranks_ * kWants), error,
                   "backward");
    bool any_dx = false, any_expert_w = false;
    for (int q = 0; q < ranks_; ++q) {
      const std::int64_t* w = gathered.data() + q * kWants;
      any_dx = any_dx || w[1] != 0;
      any_expert_w = any_expert_w || w[2] != 0;
      MOEKIT_CHECK(w[3] == gathered[3], Errc::kInvalidArgument,
                   "the ranks disagree on the replicated gradients (router, shared experts) "
                   "they ask for: rank ",
                   q, " differs from rank 0");
    }
    const Plan plan = plan_of(state.plan);
    const bool want_router = want_dx || want_router_w;
    const bool acc = grads.accumulate;
    const VectorView<const index_t> offsets = state.offsets;
    const index_t received = plan.expert_rows(rank_);

    // Routed experts: output gradients to the owners, input gradients back.
    const MatrixView<float> dweights(floats(workspace, lay.dweights), tokens, kTopK);
    const MatrixView<float> dlogits(floats(workspace, lay.dlogits), tokens, kExperts);
    const MatrixView<float> slots = rows_at(workspace, lay.slots, n);
    const MatrixView<float> inbox = rows_at(workspace, lay.inbox, received);
    const MatrixView<float> outbox = rows_at(workspace, lay.outbox, received);
    const bool want_d_out = any_dx || any_expert_w;
    if (want_d_out || want_router) {
      combine_backward<S>(dy, state.returned.middle_rows(0, n), routing, offsets,
                          want_d_out ? slots : MatrixView<float>(),
                          want_router ? dweights : MatrixView<float>());
    }
    if (want_d_out) {
      exchange(plan, slots, inbox, workspace, lay, true);
      regroup(plan, inbox, outbox, true);  // d_out, expert-major
      const ExpertGrads g{grads.dw1, grads.dw3, grads.dw2, acc};
      run_experts(
          plan,
          [&](int j, index_t r0, index_t rows, VectorView<const index_t> all,
              VectorView<std::byte> ws) {
            ffn_.backward(MatrixView<const float>(outbox.middle_rows(r0, rows)),
                          state.buffer.middle_rows(r0, rows), all,
                          expert_weights(params.experts, j, config_.d_ff, d),
                          state.saved_pre.middle_rows(r0, rows),
                          gated() ? MatrixView<const float>(state.saved_gate.middle_rows(r0, rows))
                                  : MatrixView<const float>(),
                          any_dx ? inbox.middle_rows(r0, rows) : MatrixView<float>(),
                          expert_grads(g, j, config_.d_ff, d), ws);
          },
          workspace, lay);
    }
    if (any_dx) {
      regroup(plan, inbox, outbox, false);  // d_buffer, by rank
      exchange(plan, outbox, slots, workspace, lay, false);
      if (want_dx) dispatch_backward<S>(MatrixView<const float>(slots), routing, offsets, dx, acc);
    }

    // Router: the gate's gradient, then the aux losses' from the batch's totals.
    const index_t batch = plan.total_tokens();
    if (want_router) {
      router_.backward_gate(routing, MatrixView<const float>(dweights), dlogits);
      if (config_.switch_coeff != 0.0f) {
        switch_loss_gradient<S>(config_.router.gating.rule, routing.logits, routing.scores,
                                plan.assigned(), batch, config_.switch_options,
                                config_.switch_coeff, dlogits);
      }
      if (config_.z_coeff != 0.0f)
        z_loss_gradient<S>(routing.logits, batch, config_.z_coeff, dlogits);
    }
    const VectorView<std::byte> aux_ws = region(workspace, lay.aux, lay.aux_bytes);
    const index_t first_token = plan.first_token(rank_);
    if (want_dx) {
      router_.backward_logits(x, params.w_gate, dlogits, RouterGrads{dx, {}, {}, true}, aux_ws,
                              first_token);
      shared_.backward(dy, x, params.shared, state.shared_pre, state.shared_gate, dx, {}, aux_ws);
    }

    // Replicated parameters: one fold over the batch's token blocks, rank after rank.
    if (want_router_w || want_shared_w) {
      const ExpertGrads shared_g{grads.shared_dw1, grads.shared_dw3, grads.shared_dw2, acc};
      const std::span<const MatrixView<float>> parts = replicated_parts(grads, lay, workspace);
      dist::fold_in_rank_order(
          *transport_, parts, acc, tokens > 0,
          carry_bytes(workspace, lay, static_cast<std::size_t>(lay.carry_size)), [&](bool add) {
            if (want_router_w) {
              router_.backward_logits(x, params.w_gate, dlogits,
                                      RouterGrads{{}, grads.dw_gate, grads.dgate_bias, add}, aux_ws,
                                      first_token);
            }
            if (want_shared_w) {
              ExpertGrads g = shared_g;
              g.accumulate = add;
              shared_.backward(dy, x, params.shared, state.shared_pre, state.shared_gate, {}, g,
                               aux_ws);
            }
          });
    }
  }

 private:
  // ---- workspace ------------------------------------------------------------------------------

  // Byte offsets of the workspace regions (multiples of 64):
  //   slots     slot_rows x d    the rank's slots: dispatched rows, their output / input gradients
  //   inbox     expert_rows x d  what the owner received, then its experts' outputs / d_buffer
  //   outbox    expert_rows x d  what the owner sends back / d_out in expert order
  //   ffn       2 expert_rows d_ff floats, the experts' scratch
  //   dweights  T x K, dlogits T x E
  //   aux       the router's or the shared experts' workspace (used in turn)
  //   carry     the state passed along the ranks (replicated gradients, or statistics)
  //   parts     the list of replicated gradient views
  //   gathered  the exchange (2 x ranks x kRow int64), segments (ranks x 2 byte counts)
  struct Layout {
    index_t slots = 0, inbox = 0, outbox = 0, ffn = 0, dweights = 0, dlogits = 0, aux = 0;
    index_t aux_bytes = 0, carry = 0, carry_size = 0, parts = 0, gathered = 0, gathered_half = 0;
    index_t segments = 0;
    index_t total = 0;
  };

  static index_t round64(index_t bytes) { return (bytes + 63) / 64 * 64; }

  Layout layout(index_t tokens, index_t slot_rows, index_t expert_rows) const {
    const index_t d = config_.d_model, fl = index_t{sizeof(float)};
    Layout l;
    index_t at = 0;
    // Every region takes at least 64 bytes: an empty send buffer must not
    // share its address with the receive buffer (MPI implementations may
    // read equal addresses as an in-place exchange).
    const auto take = [&](index_t bytes) {
      const index_t here = at;
      at += std::max<index_t>(64, round64(bytes));
      return here;
    };
    l.slots = take(slot_rows * d * fl);
    l.inbox = take(expert_rows * d * fl);
    l.outbox = take(expert_rows * d * fl);
    l.ffn = take(ffn_.workspace_size(expert_rows));
    l.dweights = take(tokens * kTopK * fl);
    l.dlogits = take(tokens * kExperts * fl);
    l.aux_bytes = std::max(router_.workspace_size(tokens, d), shared_.workspace_size(tokens));
    l.aux = take(l.aux_bytes);
    const index_t fs = d_ff_shared(), ns = config_.num_shared;
    const index_t replicated = index_t{kExperts} * d + kExperts + ns * fs * d * (gated() ? 3 : 2);
    l.carry_size =
        std::max<index_t>(8 + replicated * fl, index_t{sizeof(typename Router<S>::StatSums)});
    l.carry = take(l.carry_size);
    l.parts = take(5 * index_t{sizeof(MatrixView<float>)});
    l.gathered_half = round64(index_t{ranks_} * kRow * 8);
    l.gathered = take(2 * l.gathered_half);
    l.segments = take(2 * index_t{ranks_} * index_t{sizeof(index_t)});
    l.total = at;
    return l;
  }

  std::span<std::byte> carry_bytes(VectorView<std::byte> ws, const Layout& lay,
                                   std::size_t bytes) const {
    return {ws.data() + lay.carry, bytes};
  }
  static float* floats(VectorView<std::byte> ws, index_t at) {
    return reinterpret_cast<float*>(ws.data() + at);
  }
  static index_t* indices(VectorView<std::byte> ws, index_t at) {
    return reinterpret_cast<index_t*>(ws.data() + at);
  }
  static std::span<std::int64_t> int64s(VectorView<std::byte> ws, index_t at, index_t count) {
    return {reinterpret_cast<std::int64_t*>(ws.data() + at), static_cast<std::size_t>(count)};
  }
  MatrixView<float> rows_at(VectorView<std::byte> ws, index_t at, index_t rows) const {
    return {floats(ws, at), rows, config_.d_model};
  }
  static VectorView<std::byte> region(VectorView<std::byte> ws, index_t at, index_t bytes) {
    if (bytes == 0) return {};
    return {ws.data() + at, bytes};
  }

  // The exchange row of one rank: [status, tokens, expert rows of its state,
  // non-finite logits, assignments per expert].
  static constexpr index_t kPlanFields = 4;
  static constexpr index_t kRow = kPlanFields + kExperts;
  static constexpr index_t kWants = 4;  // backward: [status, dx, expert grads, replicated key]

  // The exchange of a forward as the state keeps it: fields by rank, then
  // assignments (rank-major), then their prefixes over the ranks before.
  //   [status N][tokens N][capacity N][non-finite N][count N x E][prefix N x E]
  struct Plan {
    const std::int64_t* data = nullptr;
    int ranks = 0;
    const dist::ExpertPlacement* placement = nullptr;
    index_t cap = 0;

    index_t field(int f, int q) const { return data[f * ranks + q]; }
    index_t tokens(int q) const { return field(1, q); }
    index_t capacity(int q) const { return field(2, q); }
    index_t count(int q, int e) const {
      return data[kPlanFields * ranks + static_cast<index_t>(q) * kExperts + e];
    }
    index_t prefix(int q, int e) const {
      return data[(kPlanFields + kExperts) * ranks + static_cast<index_t>(q) * kExperts + e];
    }
    // Slots of rank q that expert e keeps: the part of [prefix, prefix + count) below C.
    index_t kept(int q, int e) const {
      return std::clamp<index_t>(cap - prefix(q, e), 0, count(q, e));
    }
    index_t total_tokens() const {
      index_t s = 0;
      for (int q = 0; q < ranks; ++q) s += tokens(q);
      return s;
    }
    index_t first_token(int r) const {
      index_t s = 0;
      for (int q = 0; q < r; ++q) s += tokens(q);
      return s;
    }
    std::array<index_t, to_size(kExperts)> assigned() const {
      std::array<index_t, to_size(kExperts)> a{};
      for (int q = 0; q < ranks; ++q) {
        for (int e = 0; e < kExperts; ++e) a[to_size(e)] += count(q, e);
      }
      return a;
    }
    // Rows the experts of rank o receive.
    index_t expert_rows(int o) const {
      index_t s = 0;
      for (int e = placement->first(o); e < placement->first(o) + placement->count(o); ++e) {
        for (int q = 0; q < ranks; ++q) s += kept(q, e);
      }
      return s;
    }
  };

  ExpertParallelMoeLayer(const MoeLayerConfig& config, const dist::ExpertPlacement& placement,
                         T& transport, int)
      : config_(config),
        placement_(placement),
        transport_(&transport),
        rank_(transport.rank()),
        ranks_(transport.size()),
        first_(placement.first(transport.rank())),
        local_(placement.count(transport.rank())),
        router_(config.router),
        ffn_(ExpertFfnConfig{config.d_model, config.d_ff, config.kind, config.activation,
                             FfnThreading::kInsideGemm, config.compute}),
        shared_(config) {}

  // Validates on this rank, then agrees with the others (collective).
  static const MoeLayerConfig& checked(const MoeLayerConfig& c,
                                       const dist::ExpertPlacement& placement, T& transport) {
    MOEKIT_API("cpu::ExpertParallelMoeLayer::ExpertParallelMoeLayer");
    std::exception_ptr error;
    std::uint64_t fp = 0;
    try {
      const MoeLayer<S> validate(c);  // the one-process layer's checks of the same config
      MOEKIT_CHECK(!placement.empty() && placement.ranks() == transport.size(),
                   Errc::kInvalidArgument, "placement covers ", placement.ranks(),
                   " ranks, the transport has ", transport.size());
      MOEKIT_CHECK(placement.experts() == kExperts, Errc::kInvalidArgument, "placement places ",
                   placement.experts(), " experts, the layer has E = ", kExperts);
      fp = fingerprint(c, placement);
    } catch (const Error&) {
      error = std::current_exception();
    }
    try {
      dist::agree(transport, error == nullptr, fp, "ExpertParallelMoeLayer");
    } catch (const Error&) {
      if (error) std::rethrow_exception(error);  // this rank's own reason first
      throw;
    }
    if (error) std::rethrow_exception(error);
    return c;
  }

  // Everything that must be equal on every rank for the layer to work.
  static std::uint64_t fingerprint(const MoeLayerConfig& c, const dist::ExpertPlacement& p) {
    dist::Fingerprint f;
    f.add(std::string_view(MOEKIT_VERSION_STRING)).add(kExperts).add(kTopK);
    f.add(static_cast<std::int64_t>(kTokenBlock)).add(static_cast<std::int64_t>(c.d_model));
    f.add(static_cast<std::int64_t>(c.d_ff)).add(static_cast<int>(c.kind));
    f.add(static_cast<int>(c.activation)).add(c.num_shared);
    f.add(static_cast<std::int64_t>(c.d_ff_shared)).add(c.switch_coeff).add(c.z_coeff);
    f.add(static_cast<int>(c.switch_options.normalization)).add(static_cast<int>(c.threading));
    f.add(static_cast<int>(c.compute));
    const RouterConfig& r = c.router;
    f.add(static_cast<int>(r.gating.rule)).add(r.gating.renormalize).add(r.gating.scaling);
    f.add(r.gating.num_groups).add(r.gating.groups_kept).add(r.gating.group_score_top);
    f.add(static_cast<int>(r.noise.kind)).add(r.noise.amount).add(r.noise.seed);
    f.add(r.capacity.factor).add(static_cast<int>(r.capacity.policy));
    f.add(static_cast<int>(r.non_finite)).add(p.ranks());
    for (int q = 0; q < p.ranks(); ++q) f.add(p.count(q));
    return f.value();
  }

  MoeLayerChecks checks() const {
    MoeLayerChecks c{kExperts,           kTopK,  config_.d_model, config_.d_ff, d_ff_shared(),
                     config_.num_shared, gated()};
    c.stacked_experts = local_;
    return c;
  }

  void check_state(const ExpertParallelState& s, index_t tokens) const {
    const index_t d = config_.d_model, f = config_.d_ff, fs = d_ff_shared();
    const index_t cap = s.routing.logits.rows();
    MOEKIT_CHECK(tokens <= cap, Errc::kShapeMismatch, "T = ", tokens,
                 " exceeds the state's capacity state.routing.logits.rows() = ", cap);
    check_routing<S>(routing_rows(s.routing, tokens), tokens);
    check_shape(s.offsets, index_t{kExperts} + 1, "state.offsets");
    MoeLayerChecks::check_rows(s.returned, tokens * kTopK, d, "state.returned");
    MoeLayerChecks::check_rows(s.saved_pre, s.buffer.rows(), f, "state.saved_pre");
    MoeLayerChecks::check_rows(s.buffer, 0, d, "state.buffer");
    if (gated()) {
      MoeLayerChecks::check_rows(s.saved_gate, s.buffer.rows(), f, "state.saved_gate");
    } else {
      MoeLayerChecks::check_absent(s.saved_gate, "state.saved_gate");
    }
    if (config_.num_shared > 0) {
      const index_t rows = index_t{config_.num_shared} * tokens;
      MoeLayerChecks::check_rows(s.shared_pre, rows, fs, "state.shared_pre");
      if (gated()) {
        MoeLayerChecks::check_rows(s.shared_gate, rows, fs, "state.shared_gate");
      } else {
        MoeLayerChecks::check_absent(s.shared_gate, "state.shared_gate");
      }
    } else {
      MoeLayerChecks::check_absent(s.shared_pre, "state.shared_pre");
      MoeLayerChecks::check_absent(s.shared_gate, "state.shared_gate");
    }
    check_shape(s.plan, plan_size(), "state.plan");
  }

  static void check_workspace(VectorView<std::byte> workspace, index_t need) {
    check_view(workspace, "workspace");
    MOEKIT_CHECK(workspace.size() >= need, Errc::kShapeMismatch, "workspace has ", workspace.size(),
                 " bytes, workspace_size() = ", need);
    MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace.data()) % 8 == 0,
                 Errc::kInvalidArgument, "workspace is not aligned to 8 bytes");
  }

  // ---- the collective steps ------------------------------------------------------------------

  // Every rank's row (status word first) gathered into `all`; if any rank
  // failed, every rank throws, a failed rank its own error. A failed rank
  // may have no usable workspace: it gathers into memory of its own (an
  // error path), so that its peers learn of it at once instead of waiting
  // for their deadline.
  template <std::size_t M>
  void gather_checked(const std::array<std::int64_t, M>& mine, std::span<std::int64_t> all,
                      std::span<std::int64_t> scratch, const std::exception_ptr& error,
                      const char* call) {
    if (error) {
      std::vector<std::int64_t> own_all(static_cast<std::size_t>(ranks_) * M),
          own_scratch(own_all.size());
      dist::all_gather(*transport_, std::span<const std::int64_t>(mine), std::span(own_all),
                       std::span(own_scratch));
      std::rethrow_exception(error);
    }
    dist::all_gather(*transport_, std::span<const std::int64_t>(mine), all, scratch);
    for (int q = 0; q < ranks_; ++q) {
      const std::int64_t code = all[static_cast<std::size_t>(q) * M];
      MOEKIT_CHECK(code == 0, Errc::kTransportError, call, ": rank ", q,
                   " rejected its arguments (", errc_name(static_cast<Errc>(code)),
                   "; its own error says why)");
    }
  }

  // The state's plan from the gathered exchange (rank-major rows of kRow):
  // checks the token split and every rank's room for its experts' rows,
  // from the same data on every rank, so that all ranks fail alike.
  Plan make_plan(std::span<const std::int64_t> gathered, VectorView<std::int64_t> out) const {
    const index_t n = ranks_;
    for (int q = 0; q < ranks_; ++q) {
      const std::int64_t* row = gathered.data() + q * kRow;
      for (index_t f = 0; f < kPlanFields; ++f) out[f * n + q] = row[f];
      std::int64_t* counts = out.data() + kPlanFields * n + q * kExperts;
      std::copy(row + kPlanFields, row + kRow, counts);
      std::int64_t* prefix = out.data() + (kPlanFields + kExperts) * n + q * kExperts;
      for (int e = 0; e < kExperts; ++e) {
        prefix[e] = q == 0 ? 0 : prefix[e - kExperts] + counts[e - kExperts];
      }
    }
    const index_t total = dist::check_token_split(
        std::span<const std::int64_t>(out.data() + n, static_cast<std::size_t>(n)));
    MOEKIT_CHECK(total <= std::numeric_limits<std::int32_t>::max() / kTopK, Errc::kInvalidArgument,
                 "the batch's ", total, " tokens times K = ", kTopK,
                 " exceed the 32-bit slot range");
    const Plan plan = plan_of(out);
    for (int o = 0; o < ranks_; ++o) {
      MOEKIT_CHECK(plan.expert_rows(o) <= plan.capacity(o), Errc::kShapeMismatch, "rank ", o,
                   "'s experts receive ", plan.expert_rows(o), " rows, its state holds ",
                   plan.capacity(o), " (size the state for the batch's global_max tokens)");
    }
    return plan;
  }

  Plan plan_of(VectorView<const std::int64_t> p) const {
    Plan plan{p.data(), ranks_, &placement_, 0};
    plan.cap = router_.capacity(plan.total_tokens());
    return plan;
  }

  // Bytes of the all_to_all_v segments of rows of d floats: `to_owners`
  // sends this rank's kept slots to each expert's owner; otherwise the
  // owners' rows go back to the ranks of their tokens.
  void exchange(const Plan& plan, MatrixView<const float> send, MatrixView<float> recv,
                VectorView<std::byte> workspace, const Layout& lay, bool to_owners) {
    const index_t row_bytes = config_.d_model * index_t{sizeof(float)};
    index_t* out_bytes = indices(workspace, lay.segments);
    index_t* in_bytes = out_bytes + ranks_;
    for (int p = 0; p < ranks_; ++p) {
      index_t mine_to_p = 0, p_to_mine = 0;  // rows this rank sends to p's experts, and receives
      for (int e = placement_.first(p); e < placement_.first(p) + placement_.count(p); ++e) {
        mine_to_p += plan.kept(rank_, e);
      }
      for (int e = first_; e < first_ + local_; ++e) p_to_mine += plan.kept(p, e);
      out_bytes[p] = (to_owners ? mine_to_p : p_to_mine) * row_bytes;
      in_bytes[p] = (to_owners ? p_to_mine : mine_to_p) * row_bytes;
    }
    transport_->all_to_all_v(reinterpret_cast<const std::byte*>(send.data()),
                             {out_bytes, static_cast<std::size_t>(ranks_)},
                             reinterpret_cast<std::byte*>(recv.data()),
                             {in_bytes, static_cast<std::size_t>(ranks_)});
  }

  // The owner's rows between (rank, expert) order, as they arrive, and
  // (expert, rank) order, the order of one process's buffer.
  void regroup(const Plan& plan, MatrixView<const float> from, MatrixView<float> to,
               bool to_expert_major) const {
    index_t by_rank = 0;  // row in (rank, expert) order
    for (int q = 0; q < ranks_; ++q) {
      index_t by_expert = 0;  // row in (expert, rank) order of rank q's first row of expert j
      for (int j = 0; j < local_; ++j) {
        const int e = first_ + j;
        index_t before = 0;
        for (int p = 0; p < q; ++p) before += plan.kept(p, e);
        const index_t rows = plan.kept(q, e);
        const index_t at = by_expert + before;
        if (rows > 0) {
          const MatrixView<const float> src =
              from.middle_rows(to_expert_major ? by_rank : at, rows);
          as_eigen(to.middle_rows(to_expert_major ? at : by_rank, rows)) = as_eigen(src);
        }
        by_rank += rows;
        for (int p = 0; p < ranks_; ++p) by_expert += plan.kept(p, e);
      }
    }
  }

  // body(j, first_row, rows, {0, rows}, workspace) for each local expert j on
  // its rows of the owner's buffer, in turn: the GEMM engine threads each
  // expert's products inside and gives a row the bits it gives in one
  // process's grouped call over all experts.
  template <class Body>
  void run_experts(const Plan& plan, Body&& body, VectorView<std::byte> workspace,
                   const Layout& lay) const {
    index_t r0 = 0;
    for (int j = 0; j < local_; ++j) {
      index_t rows = 0;
      for (int q = 0; q < ranks_; ++q) rows += plan.kept(q, first_ + j);
      const std::array<index_t, 2> offsets = {0, rows};
      body(j, r0, rows, VectorView<const index_t>(offsets.data(), 2),
           region(workspace, lay.ffn, ffn_.workspace_size(rows)));
      r0 += rows;
    }
  }

  // RoutingStats of the whole batch: counts from the plan, the chunk sums
  // passed along the ranks.
  void batch_stats(const Plan& plan, const Routing& routing, VectorView<std::byte> workspace,
                   const Layout& lay, RoutingStats<S>& stats) {
    using Sums = typename Router<S>::StatSums;
    const index_t total = plan.total_tokens(), first = plan.first_token(rank_);
    const TokenChunks<kExperts> chunks(total);
    Sums* sums = new (workspace.data() + lay.carry) Sums{};
    dist::pass_along_ranks(*transport_, carry_bytes(workspace, lay, sizeof(Sums)), [&] {
      for (index_t t = 0; t < routing.logits.rows(); ++t) {
        const std::size_t c = to_size((first + t) / chunks.size);
        router_.add_token_stats(*sums, c, routing.logits.row(t), routing.scores.row(t));
      }
    });
    index_t dropped = 0, non_finite = 0;
    const std::array<index_t, to_size(kExperts)> assigned = plan.assigned();
    for (const index_t a : assigned) dropped += std::max<index_t>(0, a - plan.cap);
    for (int q = 0; q < ranks_; ++q) non_finite += plan.field(3, q);
    Router<S>::finish_stats(*sums, total, assigned, plan.cap, dropped, non_finite, stats);
  }

  // The replicated gradients as one list (the carry's contents, in order).
  std::span<const MatrixView<float>> replicated_parts(const MoeLayerGrads& g, const Layout& lay,
                                                      VectorView<std::byte> workspace) const {
    auto* parts = reinterpret_cast<MatrixView<float>*>(workspace.data() + lay.parts);
    std::size_t n = 0;
    const auto add = [&](MatrixView<float> m) {
      if (!m.empty()) parts[n++] = m;
    };
    add(g.dw_gate);
    if (!g.dgate_bias.empty()) add(MatrixView<float>(g.dgate_bias.data(), 1, g.dgate_bias.size()));
    add(g.shared_dw1);
    add(g.shared_dw3);
    add(g.shared_dw2);
    return {parts, n};
  }

  // Which replicated gradients a rank asks for, as one number to compare.
  static std::int64_t replicated_key(const MoeLayerGrads& g) {
    return (g.dw_gate.empty() ? 0 : 1) | (g.dgate_bias.empty() ? 0 : 2) |
           (g.shared_dw1.empty() ? 0 : 4) | (g.shared_dw3.empty() ? 0 : 8) |
           (g.shared_dw2.empty() ? 0 : 16) | (g.accumulate ? 32 : 0);
  }

  static Routing routing_rows(const Routing& r, index_t tokens) {
    return {r.logits.middle_rows(0, tokens), r.scores.middle_rows(0, tokens),
            r.expert_ids.middle_rows(0, tokens), r.weights.middle_rows(0, tokens),
            r.positions.middle_rows(0, tokens)};
  }

  MoeLayerConfig config_;
  dist::ExpertPlacement placement_;
  T* transport_;
  int rank_, ranks_, first_, local_;
  Router<S> router_;
  ExpertFfn<MoeSpec<1, 1>> ffn_;  // one local expert at a time
  SharedExperts shared_;
};

// Owning storage for one rank's state and workspace (allocated here, once).
template <MoeSpecType S>
class ExpertParallelStorage {
 public:
  template <class Layer>
  // Allocates the state and workspace of `layer` on this rank for at most local_max tokens here and
  // global_max in the batch.
  ExpertParallelStorage(const Layer& layer, index_t local_max, index_t global_max) {
    constexpr int E = S::num_experts, K = S::top_k;
    const MoeLayerConfig& c = layer.config();
    const ExpertParallelRows r = layer.rows(local_max, global_max);
    const index_t d = c.d_model, f = c.d_ff, fs = layer.d_ff_shared();
    const bool gated = layer.gated(), shared = c.num_shared > 0;
    const auto sz = [](index_t n) { return static_cast<std::size_t>(n); };
    logits_.resize(sz(local_max * E));
    scores_.resize(sz(local_max * E));
    weights_.resize(sz(local_max * K));
    ids_.resize(sz(local_max * K));
    positions_.resize(sz(local_max * K));
    offsets_.resize(sz(E + 1));
    returned_.resize(sz(r.slot_rows * d));
    buffer_.resize(sz(r.expert_rows * d));
    saved_pre_.resize(sz(r.expert_rows * f));
    saved_gate_.resize(gated ? sz(r.expert_rows * f) : 0);
    shared_pre_.resize(shared ? sz(r.shared_rows * fs) : 0);
    shared_gate_.resize(shared && gated ? sz(r.shared_rows * fs) : 0);
    plan_.resize(sz(layer.plan_size()));
    workspace_.resize(sz(layer.workspace_size(r) / 8 + 1));
    state_.routing = {{logits_.data(), local_max, E},
                      {scores_.data(), local_max, E},
                      {ids_.data(), local_max, K},
                      {weights_.data(), local_max, K},
                      {positions_.data(), local_max, K}};
    state_.offsets = {offsets_.data(), E + 1};
    state_.returned = {returned_.data(), r.slot_rows, d};
    state_.buffer = {buffer_.data(), r.expert_rows, d};
    state_.saved_pre = {saved_pre_.data(), r.expert_rows, f};
    state_.saved_gate =
        gated ? MatrixView<float>(saved_gate_.data(), r.expert_rows, f) : MatrixView<float>();
    state_.shared_pre =
        shared ? MatrixView<float>(shared_pre_.data(), r.shared_rows, fs) : MatrixView<float>();
    state_.shared_gate = shared && gated ? MatrixView<float>(shared_gate_.data(), r.shared_rows, fs)
                                         : MatrixView<float>();
    state_.plan = {plan_.data(), layer.plan_size()};
  }

  // The state views, for forward and backward.
  const ExpertParallelState& state() const { return state_; }
  // The workspace, workspace_size(rows) bytes or more.
  VectorView<std::byte> workspace() {
    return {reinterpret_cast<std::byte*>(workspace_.data()),
            static_cast<index_t>(workspace_.size() * sizeof(std::uint64_t))};
  }

 private:
  std::vector<float> logits_, scores_, weights_;
  std::vector<std::int32_t> ids_, positions_;
  std::vector<index_t> offsets_;
  std::vector<float> returned_, buffer_, saved_pre_, saved_gate_, shared_pre_, shared_gate_;
  std::vector<std::int64_t> plan_;
  std::vector<std::uint64_t> workspace_;  // 8-byte aligned bytes
  ExpertParallelState state_;
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
