#pragma once
// A Mixture-of-Experts layer on the CUDA backend for MoeSpec<E, K> and
// activations / weights of type T (fp32, bf16, fp16): router, dispatch, routed
// expert FFNs, combine and shared experts, forward and backward, composed from
// moekit/cuda/{router,aux_losses,dispatch,expert_ffn}.cuh. The math, argument
// names and argument order are cpu::MoeLayer<S>'s (moekit/nn/moe_layer.hpp):
//
//   y = sum_{k kept} w(t, k) FFN_{ids(t, k)}(x_t) + sum_i FFN_shared_i(x_t)
//
//   moekit::gpu::MoeLayer<moekit::MoeSpec<8, 2>, __nv_bfloat16> layer(config);
//   moekit::gpu::MoeLayerStorage<Spec, __nv_bfloat16> storage(layer, t_max);  // cudaMalloc once
//   const auto ws = storage.workspace(cublas_handle, stream);
//   auto aux = layer.forward(x, params, storage.state(), y, &stats, ws);
//   layer.backward(dy, x, params, storage.state(), dx, grads, ws);
//
// Code templated on the backend (moekit::MoeLayer<S, Backend>, moekit/core/
// backend.hpp) compiles against both layers. The differences, all from the
// memory model:
//   - Every view is DEVICE memory except state.host_offsets (host, E + 1),
//     and `stats` (host: forward copies the device statistics into it).
//   - The Workspace argument is MoeLayerWorkspace: the device workspace
//     (256-byte aligned, workspace_size() bytes, a std::size_t) plus the
//     caller's cuBLAS handle and the stream every launch goes to. It is
//     required (the CPU's may be omitted when its size is 0), so `stats`
//     has no default either.
//   - Stats is MoeLayerStats<S>: gpu::RoutingStats and gpu::DispatchStats
//     (the CPU's RoutingStats holds the same counts in one struct).
//   - No FfnThreading: Config has none (the CPU's expert threading).
//   - Saved expert ids and positions are device data the host cannot check
//     without a copy: backward does not re-validate them (the CPU does); a
//     bad id counts for nothing, per the parts' documented rules.
//
// Types. x, y, dy, dx, every weight and weight gradient, and the saved
// activations are T. The router runs in fp32 as gpu::route wants: the gate
// GEMM reads T (fp32 with jitter, below) and accumulates and writes fp32
// logits (no rounding before top-k); scores, weights, dlogits and the gate
// biases (gate_bias, selection_bias, dgate_bias) are fp32. The backward GEMMs
// of the gate read dlogits rounded to T (no rounding for T = float). Every
// GEMM is cuBLAS with fp32 accumulation.
//
// Router noise (config.router.noise) is the CPU router's, element for element:
// the same counter-based draws (moekit/core/random.hpp), regenerated in
// backward, never saved.
//   kGaussian: logits(t, e) += amount * random_normal(seed, t E + e), after the
//     gate GEMM and gate_bias, before gating. Backward needs nothing more: the
//     noise is a constant added to the logits.
//   kJitter: the router's input (only the router's: the experts read x) is
//     x~(t, j) = x(t, j) * routing::jitter_factor(seed, amount, t d + j).
//     Forward holds x~ in fp32 and widens w_gate to fp32 beside it (exact),
//     so the gate GEMM runs in fp32 on the CPU's values and the logits carry
//     no rounding the CPU's lack (x~ rounded to T would move a bf16 router's
//     logits by ~2^-9 relative: enough to flip near-tied top-k choices).
//     Backward regenerates x~ rounded to T for dw_gate = dlogits^T x~ (the
//     gate's backward GEMMs read T, as without noise; exact for T = float),
//     and adds dx += (dlogits w_gate) * factor, the product in fp32, rounded
//     once. Workspace: T x d floats (+ E x d floats for T != float) in
//     forward, T x d floats in backward (workspace_size includes them).
//
// One host synchronisation per forward: gpu::ExpertFfn takes the expert
// offsets in HOST memory (cuBLAS's grouped GEMM takes its group sizes from the
// host), so forward copies plan_dispatch's offsets (8 (E + 1) bytes) and the
// statistics (a few hundred bytes) back and synchronises the stream once,
// after the router and the plan and before the expert GEMMs. The aux losses'
// values come from those statistics, so forward returns them on the host as
// the CPU does. Forward stores the host copy in state.host_offsets; backward
// reads it there and does not synchronise.
//
// Backward (dy = dL/dy), the CPU's order:
//   combine_backward    -> d_expert_out, dweights
//   ExpertFfn::backward -> d_buffer, expert weight gradients
//   dispatch_backward   -> dx
//   backward_gate       -> dlogits; += switch / z loss gradients (with coefficients)
//   gate GEMMs          -> dx (added), dw_gate; dgate_bias = column sums of dlogits
//   shared FFN backward -> dx (added), shared weight gradients
// An empty gradient view is frozen: not computed, not written, no work done
// for it. An empty dx means "no input gradient". With grads.accumulate every
// non-empty output (dx too) receives the sum.
//
// Validation: every argument the host can see (shapes against the config, T
// against the state's capacity, null pointers, the cuBLAS handle, the
// workspace, the host offsets against the state) is checked before the first
// launch, and a bad one throws moekit::Error naming it. With
// NonFinitePolicy::kError a non-finite logit throws Errc::kNonFinite at the
// synchronisation, after the state's routing was written, never y (as on the
// CPU). CUDA and cuBLAS failures throw moekit::Error (kCudaError /
// kCublasError). An output that overlaps an input or another output is
// refused before any launch (kInvalidArgument, naming both).
//
// Determinism: no float atomics; every part sums in a fixed order, so reruns
// on one GPU are bit-identical. Results differ from the CPU's in the last bits.

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <type_traits>
#include <vector>

#include "moekit/core/activation.hpp"
#include "moekit/core/backend.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cuda/aux_losses.cuh"
#include "moekit/cuda/dispatch.cuh"
#include "moekit/cuda/error.cuh"
#include "moekit/cuda/expert_ffn.cuh"
#include "moekit/cuda/lora.cuh"
#include "moekit/cuda/router.cuh"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace gpu {

// cpu::RouterConfig: same fields, names and order.
struct MoeRouterConfig {
  GatingConfig gating{};      // rule, renormalisation, groups
  NoiseConfig noise{};        // training noise, as on the CPU (header)
  CapacityConfig capacity{};  // expert capacity; dropless by default
  NonFinitePolicy non_finite = NonFinitePolicy::kSanitize;  // what a NaN / inf logit does
};

// cpu::MoeLayerConfig without threading; same names and order, so designated
// initialisers written for one compile for the other.
struct MoeLayerConfig {
  index_t d_model = 0;                            // d, token width, >= 1
  index_t d_ff = 0;                               // width of one routed expert
  FfnKind kind = FfnKind::kPlain;                 // kGated: every expert has W3
  Activation activation = Activation::kGeluTanh;  // the experts' nonlinearity
  MoeRouterConfig router{};                       // gating, noise, capacity
  int num_shared = 0;                             // shared experts, run on every token
  index_t d_ff_shared = 0;                        // width of one shared expert; 0 = d_ff
  float switch_coeff = 0.0f;                      // Switch balance loss coefficient; 0 = off
  float z_coeff = 0.0f;                           // router z-loss coefficient; 0 = off
  SwitchLossOptions switch_options{};             // the Switch loss's normalisation
};

// Parameters, device memory. Routed experts in gpu::ExpertWeights' layout
// (E experts of width d_ff); shared experts in the same layout with
// num_shared experts of width d_ff_shared (all empty when num_shared = 0).
template <ActivationElement T>
struct MoeLayerParams {
  MatrixView<const T> w_gate{};              // E x d
  VectorView<const float> gate_bias{};       // E, or empty
  VectorView<const float> selection_bias{};  // E, or empty (update_expert_bias's bias)
  ExpertWeights<T> experts{};                // the E routed experts, width d_ff
  ExpertWeights<T> shared{};                 // the num_shared shared experts, width d_ff_shared
};

// Gradient outputs, device memory; an empty view is frozen.
template <ActivationElement T>
struct MoeLayerGrads {
  MatrixView<T> dw_gate{};         // E x d
  VectorView<float> dgate_bias{};  // E; must be empty when params.gate_bias is
  MatrixView<T> dw1{};             // routed experts: as params.experts.w1
  MatrixView<T> dw3{};             // as params.experts.w3 (kGated only)
  MatrixView<T> dw2{};             // as params.experts.w2
  MatrixView<T> shared_dw1{};      // shared experts: as params.shared.w1
  MatrixView<T> shared_dw3{};      // as params.shared.w3 (kGated only)
  MatrixView<T> shared_dw2{};      // as params.shared.w2
  bool accumulate = false;         // add to every output (dx too) instead of overwriting
};

// What forward saves for backward. Capacity T_max = routing.logits.rows();
// shapes are minimums for T = T_max (MoeLayer::state_rows gives them).
template <ActivationElement T>
struct MoeLayerState {
  Routing routing;                     // device: T_max x E (logits, scores), T_max x K
  VectorView<index_t> offsets;         // device, E + 1
  VectorView<index_t> host_offsets;    // HOST, E + 1: forward's copy of offsets
  VectorView<std::int32_t> row_slots;  // device, routed_rows (the dispatch plan)
  MatrixView<T> buffer;                // routed_rows x d, the dispatched tokens
  MatrixView<T> expert_out;            // routed_rows x d
  MatrixView<T> saved_pre;             // routed_rows x d_ff
  MatrixView<T> saved_gate;            // routed_rows x d_ff for kGated, empty for kPlain
  MatrixView<T> shared_pre;            // num_shared T_max x d_ff_shared (empty if no shared)
  MatrixView<T> shared_gate;           // same, kGated only
};

// Forward's statistics, copied to the host.
template <MoeSpecType S>
struct MoeLayerStats {
  RoutingStats<S> routing;    // before capacity (route)
  DispatchStats<S> dispatch;  // capacity, kept and dropped (plan_dispatch)
};

// Where and how a call runs: the device workspace and the caller's cuBLAS
// handle (put on `stream` by the call where it is on another one, which
// drops a cublasSetWorkspace workspace: set the stream first) and stream.
struct MoeLayerWorkspace {
  void* data = nullptr;             // device, 256-byte aligned
  std::size_t bytes = 0;            // size of data, at least MoeLayer::workspace_size
  cublasHandle_t handle = nullptr;  // the caller's cuBLAS handle, required
  cudaStream_t stream = nullptr;    // the stream every kernel and copy goes to
};

namespace detail {

// dst += src element-wise in fp32, rounded once (shared experts' outputs).
template <class T>
__global__ void __launch_bounds__(256) add_rows_kernel(MatrixView<const T> src, MatrixView<T> dst) {
  const index_t cols = dst.cols(), n = dst.rows() * cols;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / cols, c = i - r * cols;
    dst(r, c) = from_float<T>(to_float(dst(r, c)) + to_float(src(r, c)));
  }
}

// dst = src converted through fp32: dlogits rounded to T for the gate's
// backward GEMMs, w_gate widened (exactly) to fp32 for a jittered forward.
template <class Src, class Dst>
__global__ void __launch_bounds__(256)
    convert_rows_kernel(MatrixView<const Src> src, MatrixView<Dst> dst) {
  const index_t cols = dst.cols(), n = dst.rows() * cols;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / cols, c = i - r * cols;
    dst(r, c) = from_float<Dst>(to_float(src(r, c)));
  }
}

// out(t, j) = x(t, j) * routing::jitter_factor(seed, amount, t d + j) in fp32,
// rounded once to U: cpu::Router's jittered input (U = float, forward's gate
// GEMM) or its T copy (backward's dw_gate GEMM).
template <class T, class U>
__global__ void __launch_bounds__(256)
    jitter_kernel(MatrixView<const T> x, float amount, std::uint64_t seed, MatrixView<U> out) {
  const index_t cols = x.cols(), n = x.rows() * cols;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / cols, c = i - r * cols;
    const float factor = routing::jitter_factor(seed, amount, static_cast<std::uint64_t>(i));
    out(r, c) = from_float<U>(to_float(x(r, c)) * factor);
  }
}

// dx(t, j) += g(t, j) * routing::jitter_factor(seed, amount, t d + j) in fp32,
// rounded once: the gate's dx through the jittered input (dx~/dx is the
// factor), g = dlogits w_gate.
template <class T>
__global__ void __launch_bounds__(256) add_jittered_kernel(MatrixView<const float> g, float amount,
                                                           std::uint64_t seed, MatrixView<T> dx) {
  const index_t cols = dx.cols(), n = dx.rows() * cols;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / cols, c = i - r * cols;
    const float factor = routing::jitter_factor(seed, amount, static_cast<std::uint64_t>(i));
    dx(r, c) = from_float<T>(to_float(dx(r, c)) + g(r, c) * factor);
  }
}

// logits(t, e) += amount * random_normal(seed, t E + e): cpu::Router's
// Gaussian noise, element for element.
template <int = 0>  // a template, so that every translation unit may define it
__global__ void __launch_bounds__(256)
    gaussian_noise_kernel(MatrixView<float> logits, float amount, std::uint64_t seed) {
  const index_t cols = logits.cols(), n = logits.rows() * cols;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / cols, c = i - r * cols;
    logits(r, c) += amount * random_normal(seed, static_cast<std::uint64_t>(i));
  }
}

// out[e] (+)= sum_t m(t, e): one block per column, each thread sums a fixed
// stride of rows in double, then a block reduction in a fixed tree order.
template <int = 0>  // a template, so that every translation unit may define it
__global__ void __launch_bounds__(kThreads)
    column_sums_kernel(MatrixView<const float> m, float* out, bool accumulate) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const index_t e = blockIdx.x;
  double sum = 0.0;
  for (index_t t = threadIdx.x; t < m.rows(); t += kThreads) sum += static_cast<double>(m(t, e));
  const double total = Reduce(storage).Sum(sum);
  if (threadIdx.x == 0) {
    out[e] = accumulate ? static_cast<float>(static_cast<double>(out[e]) + total)
                        : static_cast<float>(total);
  }
}

}  // namespace detail

// A sparse MoE layer on the CUDA backend: router, dispatch, routed and
// shared expert FFNs and combine, forward and backward, with the aux losses.
// Holds only the configuration; every buffer is caller device memory
// (MoeLayerStorage allocates them for a capacity).
template <MoeSpecType S, ActivationElement T>
class MoeLayer {
 public:
  static constexpr int kExperts = S::num_experts;  // E
  static constexpr int kTopK = S::top_k;           // K
  // The types of this backend's arguments (moekit/core/backend.hpp).
  using Element = T;
  using Config = MoeLayerConfig;        // the configuration
  using Params = MoeLayerParams<T>;     // weights, device memory
  using Grads = MoeLayerGrads<T>;       // gradient outputs, device memory
  using State = MoeLayerState<T>;       // what forward saves for backward
  using Stats = MoeLayerStats<S>;       // forward's statistics, on the host
  using Workspace = MoeLayerWorkspace;  // device workspace, cuBLAS handle, stream

  // Rejects a configuration the layer cannot run (naming the field and value).
  explicit MoeLayer(const MoeLayerConfig& config)
      : config_(validated(config)),
        ffn_(ExpertFfnConfig{config.d_model, config.d_ff, config.kind, config.activation}),
        shared_ffn_(ExpertFfnConfig{config.d_model, shared_width(config), config.kind,
                                    config.activation}) {}

  // The configuration, as constructed.
  const MoeLayerConfig& config() const { return config_; }
  // Whether the experts are gated (W3 present).
  bool gated() const { return config_.kind == FfnKind::kGated; }
  // The shared experts' width: config.d_ff_shared, or d_ff when that is 0.
  index_t d_ff_shared() const { return shared_width(config_); }
  // Slots per expert for a batch of `tokens` (tokens when dropless).
  index_t capacity(index_t tokens) const {
    return expert_capacity(tokens, kExperts, kTopK, config_.router.capacity.factor);
  }

  // Rows of the expert-major buffer for T tokens, at most: T K, or E times
  // the expert capacity when that is smaller (max_dispatch_rows, no padding).
  index_t routed_rows(index_t tokens) const {
    return max_dispatch_rows<S>(tokens, config_.router.capacity, 1);
  }

  // The minimum rows of State's buffers for a capacity of `tokens` tokens.
  MoeLayerStateRows state_rows(index_t tokens) const {
    return {tokens, routed_rows(tokens), index_t{config_.num_shared} * tokens};
  }

  // Bytes of the one device workspace forward and backward take for T tokens.
  // Asks CUB (plan_dispatch's sort and scan), so it needs the CUDA runtime.
  std::size_t workspace_size(index_t tokens) const {
    detail::check_token_count(tokens, kTopK);
    return std::max(forward_layout(tokens).total, backward_layout(tokens).total);
  }

  // y = the layer's output for x (T x d); fills `state` for backward and
  // `stats` (host, when not null). Returns both aux losses' values
  // (unscaled) whatever the coefficients (a coefficient of 0 leaves its loss
  // out of total and the gradients). Synchronises `workspace.stream` once (header).
  MoeAuxLosses forward(MatrixView<const T> x, const Params& params, const State& state,
                       MatrixView<T> y, Stats* stats, const Workspace& workspace) const {
    MOEKIT_API("gpu::MoeLayer::forward");
    check_view(x, "x");
    const index_t tokens = x.rows();
    const index_t d = config_.d_model;
    detail::check_token_count(tokens, kTopK);
    check_shape(x, tokens, d, "x");
    check_shape(y, tokens, d, "y");
    checks().check_params(params);
    check_state(state, tokens);
    const auto [lay, stream, handle, ws, main, routing, rows] =
        begin_call<ForwardLayout>(workspace, state, tokens);
    OverlapCheck overlap("gpu::MoeLayer::forward");
    overlap
        .out(Footprints{{y, "y"},
                        {state.row_slots, "state.row_slots"},
                        detail::temp_storage(workspace.data, lay.total)})
        .in(Footprints{{x, "x"}});
    add_moe_params(overlap, params);
    add_moe_state(overlap, state, /*written=*/true);
    overlap.check();
    auto* d_routing_stats = detail::carve<RoutingStats<S>>(ws, lay.routing_stats);
    auto* d_dispatch_stats = detail::carve<DispatchStats<S>>(ws, lay.dispatch_stats);

    // Router: logits = x w_gate^T + gate_bias (+ noise) in fp32, then gating
    // and the plan.
    gate_forward(handle, x, params, routing.logits, main, stream);
    const RouteArgs<S, float> route_args{
        routing.logits,     params.selection_bias, config_.router.gating, routing.scores,
        routing.expert_ids, routing.weights,       d_routing_stats};
    std::size_t bytes = lay.main_bytes;
    MOEKIT_CUDA_CHECK(route(main, bytes, route_args, stream));
    const DispatchPlanArgs<S> plan{routing.expert_ids,
                                   routing.weights,
                                   config_.router.capacity,
                                   1,
                                   routing.positions,
                                   state.offsets,
                                   state.row_slots.segment(0, rows),
                                   d_dispatch_stats,
                                   nullptr};
    bytes = lay.main_bytes;
    MOEKIT_CUDA_CHECK(plan_dispatch(main, bytes, plan, stream));

    // The one synchronisation: ExpertFfn needs the offsets on the host.
    Stats host_stats{};
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(state.host_offsets.data(), state.offsets.data(),
                                      sizeof(index_t) * (kExperts + 1), cudaMemcpyDeviceToHost,
                                      stream));
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(&host_stats.routing, d_routing_stats, sizeof(RoutingStats<S>),
                                      cudaMemcpyDeviceToHost, stream));
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(&host_stats.dispatch, d_dispatch_stats,
                                      sizeof(DispatchStats<S>), cudaMemcpyDeviceToHost, stream));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
    MOEKIT_CHECK(config_.router.non_finite != NonFinitePolicy::kError ||
                     host_stats.routing.non_finite_logits == 0,
                 Errc::kNonFinite, host_stats.routing.non_finite_logits,
                 " logits are not finite (NonFinitePolicy::kError); y is not written");
    const VectorView<const index_t> host_offsets = state.host_offsets;
    const index_t n = host_offsets[kExperts];
    MOEKIT_CHECK(n <= rows, Errc::kOutOfRange, "plan_dispatch used ", n,
                 " buffer rows, more than routed_rows = ", rows);  // never, by max_dispatch_rows

    // Routed experts.
    const MatrixView<T> buffer = state.buffer.middle_rows(0, n);
    const MatrixView<T> out = state.expert_out.middle_rows(0, n);
    MOEKIT_CUDA_CHECK(
        dispatch<S>(x, plan.dispatch_map(), state.buffer.middle_rows(0, rows), stream));
    ffn_.forward(handle, buffer, host_offsets, params.experts, out,
                 state.saved_pre.middle_rows(0, n),
                 gated() ? state.saved_gate.middle_rows(0, n) : MatrixView<T>(), main,
                 lay.main_bytes, stream);
    MOEKIT_CUDA_CHECK(combine<S>(MatrixView<const T>(out), routing.expert_ids, routing.weights,
                                 routing.positions, state.offsets, y, false, stream));

    // Shared experts, added in order after the routed output (as on the CPU).
    if (config_.num_shared > 0) {
      const std::array<index_t, 2> all = {0, tokens};
      const MatrixView<T> tmp(static_cast<T*>(main), tokens, d);
      void* shared_ws = static_cast<char*>(main) + lay.token_bytes;
      for (int i = 0; i < config_.num_shared; ++i) {
        shared_ffn_.forward(handle, x, {all.data(), 2}, shared_weights(params.shared, i), tmp,
                            shared_block(state.shared_pre, i, tokens),
                            gated() ? shared_block(state.shared_gate, i, tokens) : MatrixView<T>(),
                            shared_ws, lay.main_bytes - lay.token_bytes, stream);
        add_rows(tmp, y, stream);
      }
    }

    if (stats != nullptr) *stats = host_stats;
    MoeAuxLosses aux;
    aux.switch_loss = switch_loss_value<kExperts, kTopK>(
        host_stats.routing.tokens, host_stats.routing.assigned,
        host_stats.routing.mean_distribution, config_.switch_options.normalization);
    aux.z_loss = host_stats.routing.z_loss;
    aux.total = static_cast<double>(config_.switch_coeff) * aux.switch_loss +
                static_cast<double>(config_.z_coeff) * aux.z_loss;
    return aux;
  }

  // Gradients of L = f(y) + switch_coeff L_switch + z_coeff L_z given
  // dy = df/dy (T x d) and the x, params and state of the forward. dx (T x d)
  // or empty; grads: see MoeLayerGrads. No host synchronisation.
  void backward(MatrixView<const T> dy, MatrixView<const T> x, const Params& params,
                const State& state, MatrixView<T> dx, const Grads& grads,
                const Workspace& workspace) const {
    MOEKIT_API("gpu::MoeLayer::backward");
    check_view(dy, "dy");
    const index_t tokens = dy.rows();
    const index_t d = config_.d_model;
    detail::check_token_count(tokens, kTopK);
    check_shape(dy, tokens, d, "dy");
    check_shape(x, tokens, d, "x");
    if (!dx.empty()) check_shape(dx, tokens, d, "dx");
    checks().check_params(params);
    checks().check_grads(grads, params);
    check_state(state, tokens);
    const index_t n = check_host_offsets(state.host_offsets, tokens);
    const auto [lay, stream, handle, ws, main, routing, rows] =
        begin_call<BackwardLayout>(workspace, state, tokens);
    OverlapCheck overlap("gpu::MoeLayer::backward");
    overlap.out(Footprints{{dx, "dx"}, detail::temp_storage(workspace.data, lay.total)})
        .in(Footprints{{dy, "dy"}, {x, "x"}, {state.row_slots, "state.row_slots"}});
    add_moe_params(overlap, params);
    add_moe_grads(overlap, grads);
    add_moe_state(overlap, state, /*written=*/false);
    overlap.check();
    const VectorView<const index_t> offsets = state.offsets;
    const VectorView<const index_t> host_offsets = state.host_offsets;

    const bool acc = grads.accumulate;
    const bool want_dx = !dx.empty();
    const bool want_router = want_dx || !grads.dw_gate.empty() || !grads.dgate_bias.empty();
    const bool want_expert_w = !grads.dw1.empty() || !grads.dw3.empty() || !grads.dw2.empty();
    const bool want_d_out = want_dx || want_expert_w;

    const MatrixView<float> dweights(detail::carve<float>(ws, lay.dweights), tokens, kTopK);
    const MatrixView<float> dlogits(detail::carve<float>(ws, lay.dlogits), tokens, kExperts);
    const MatrixView<T> d_out(static_cast<T*>(main), n, d);
    const MatrixView<T> d_buffer(detail::carve<T>(main, lay.routed_bytes), n, d);
    const MatrixView<const T> buffer = state.buffer.middle_rows(0, n);
    const MatrixView<const T> out = state.expert_out.middle_rows(0, n);
    const DispatchMap map{{state.row_slots.data(), rows}, offsets.data() + kExperts};

    // Routed experts.
    if (want_d_out || want_router) {
      MOEKIT_CUDA_CHECK(combine_backward<S>(dy, out, routing.expert_ids, routing.weights,
                                            routing.positions, offsets, map,
                                            want_d_out ? d_out : MatrixView<T>(),
                                            want_router ? dweights : MatrixView<float>(), stream));
    }
    if (want_d_out) {
      ffn_.backward(
          handle, MatrixView<const T>(d_out), buffer, host_offsets, params.experts,
          state.saved_pre.middle_rows(0, n),
          gated() ? MatrixView<const T>(state.saved_gate.middle_rows(0, n)) : MatrixView<const T>(),
          want_dx ? d_buffer : MatrixView<T>(),
          ExpertGrads<T>{grads.dw1, grads.dw3, grads.dw2, acc},
          static_cast<char*>(main) + 2 * lay.routed_bytes, lay.main_bytes - 2 * lay.routed_bytes,
          stream);
    }
    if (want_dx) {
      MOEKIT_CUDA_CHECK(dispatch_backward<S>(MatrixView<const T>(d_buffer), routing.expert_ids,
                                             routing.positions, offsets, dx, acc, stream));
    }

    // Router: gate, aux losses (coefficients included), then the gate GEMMs.
    if (want_router) {
      const GatingConfig gating = config_.router.gating;
      MOEKIT_CUDA_CHECK(backward_gate<S>(
          GateBackwardArgs<S, float>{routing.logits, routing.scores, routing.expert_ids, dweights,
                                     gating, dlogits, nullptr},
          stream));
      double* losses = detail::carve<double>(ws, lay.losses);
      if (config_.switch_coeff != 0.0f) {
        const SwitchLossArgs<S, float> args{gating.rule,
                                            routing.logits,
                                            routing.scores,
                                            routing.expert_ids,
                                            config_.switch_options.normalization,
                                            config_.switch_coeff,
                                            losses,
                                            dlogits,
                                            nullptr};
        std::size_t bytes = lay.main_bytes;
        MOEKIT_CUDA_CHECK(switch_loss(main, bytes, args, stream));
      }
      if (config_.z_coeff != 0.0f) {
        const ZLossArgs<S, float> args{routing.logits, config_.z_coeff, losses + 1, dlogits};
        std::size_t bytes = lay.main_bytes;
        MOEKIT_CUDA_CHECK(z_loss(main, bytes, args, stream));
      }
      gate_backward(handle, x, params, MatrixView<const float>(dlogits),
                    detail::carve<T>(ws, lay.dlogits_rounded), main, grads, dx, stream);
    }

    // Shared experts: dy reaches each unchanged.
    const bool want_shared_w =
        !grads.shared_dw1.empty() || !grads.shared_dw3.empty() || !grads.shared_dw2.empty();
    if (config_.num_shared > 0 && (want_dx || want_shared_w)) {
      const std::array<index_t, 2> all = {0, tokens};
      const MatrixView<T> tmp(static_cast<T*>(main), tokens, d);
      void* shared_ws = static_cast<char*>(main) + lay.token_bytes;
      const index_t fs = d_ff_shared();
      for (int i = 0; i < config_.num_shared; ++i) {
        const ExpertGrads<T> g{shared_grad(grads.shared_dw1, i, fs),
                               shared_grad(grads.shared_dw3, i, fs),
                               shared_grad(grads.shared_dw2, i, d), acc};
        shared_ffn_.backward(handle, dy, x, {all.data(), 2}, shared_weights(params.shared, i),
                             shared_block(state.shared_pre, i, tokens),
                             gated()
                                 ? MatrixView<const T>(shared_block(state.shared_gate, i, tokens))
                                 : MatrixView<const T>(),
                             want_dx ? tmp : MatrixView<T>(), g, shared_ws,
                             lay.main_bytes - lay.token_bytes, stream);
        if (want_dx) add_rows(tmp, dx, stream);
      }
    }
  }

 private:
  // Workspace regions (byte offsets, each 256-byte aligned). Forward:
  //   [routing stats][dispatch stats][main: the largest of the gate's jitter
  //    scratch, route's, the plan's, the routed FFN's workspace, and shared:
  //    T x d + its FFN's]
  // Backward:
  //   [dweights T K][dlogits T E][dlogits in T (T != float)][2 losses][main:
  //    the largest of d_out, d_buffer (N x d each) + the FFN's workspace,
  //    the switch and z losses', the gate's jitter scratch, and shared:
  //    T x d + its FFN's]
  // Each part of main is dead before the next one starts (stream order), and
  // forward's regions are dead when backward runs, so the two overlap.
  struct ForwardLayout {
    std::size_t routing_stats = 0, dispatch_stats = 0, main = 0, main_bytes = 0;
    std::size_t token_bytes = 0, total = 0;
  };
  struct BackwardLayout {
    std::size_t dweights = 0, dlogits = 0, dlogits_rounded = 0, losses = 0, main = 0;
    std::size_t main_bytes = 0, routed_bytes = 0, token_bytes = 0, total = 0;
  };

  // What forward and backward start from once their arguments are checked:
  // the workspace (checked here, last, as its size asks CUB) and this call's
  // layout of it, the stream and cuBLAS handle, and the state's first T rows.
  template <class Layout>
  struct Call {
    Layout lay;
    cudaStream_t stream;
    cublasHandle_t handle;
    char* ws;         // the workspace
    void* main;       // its main region, lay.main_bytes
    Routing routing;  // state.routing's first T rows
    index_t rows;     // routed_rows(T)
  };

  template <class Layout>
  Call<Layout> begin_call(const Workspace& w, const State& state, index_t tokens) const {
    check_workspace(w, tokens);
    Layout lay;
    if constexpr (std::is_same_v<Layout, ForwardLayout>) {
      lay = forward_layout(tokens);
    } else {
      lay = backward_layout(tokens);
    }
    char* ws = static_cast<char*>(w.data);
    return {lay,
            w.stream,
            w.handle,
            ws,
            ws + lay.main,
            routing_rows(state.routing, tokens),
            routed_rows(tokens)};
  }

  bool jittered() const { return config_.router.noise.kind == NoiseKind::kJitter; }

  // The gate's jitter scratch in main: forward's x~ (T x d fp32) and, for
  // T != float, w_gate widened to fp32 (E x d); backward's x~ in T, then
  // dlogits w_gate in fp32 (T x d floats, one after the other). 0 without jitter.
  std::size_t jitter_bytes(index_t tokens, bool forward) const {
    if (!jittered()) return 0;
    const std::size_t input = detail::round_up(array_bytes<float>(tokens * config_.d_model));
    const bool widen = forward && !std::is_same_v<T, float>;
    return input + (widen ? detail::round_up(array_bytes<float>(kExperts * config_.d_model)) : 0);
  }

  template <class U>
  static std::size_t array_bytes(index_t count) {
    return static_cast<std::size_t>(count) * sizeof(U);
  }

  // The part of main the shared experts use (0 without shared experts).
  std::size_t shared_main_bytes(index_t tokens) const {
    if (config_.num_shared == 0) return 0;
    return detail::round_up(array_bytes<T>(tokens * config_.d_model)) +
           shared_ffn_.workspace_size(tokens);
  }

  ForwardLayout forward_layout(index_t tokens) const {
    RouteArgs<S, float> route_args;
    route_args.logits = {static_cast<const float*>(nullptr), tokens, kExperts};
    std::size_t route_bytes = 0;
    MOEKIT_CUDA_CHECK(route(nullptr, route_bytes, route_args));
    DispatchPlanArgs<S> plan;
    plan.expert_ids = {static_cast<const std::int32_t*>(nullptr), tokens, kTopK};
    plan.capacity = config_.router.capacity;
    std::size_t plan_bytes = 0;
    MOEKIT_CUDA_CHECK(plan_dispatch(nullptr, plan_bytes, plan));

    ForwardLayout l;
    detail::WorkspacePlan p;
    l.routing_stats = p.reserve(sizeof(RoutingStats<S>));
    l.dispatch_stats = p.reserve(sizeof(DispatchStats<S>));
    l.token_bytes = detail::round_up(array_bytes<T>(tokens * config_.d_model));
    l.main_bytes = std::max({jitter_bytes(tokens, true), route_bytes, plan_bytes,
                             ffn_.workspace_size(routed_rows(tokens)), shared_main_bytes(tokens)});
    l.main = p.reserve(l.main_bytes);
    l.total = p.bytes();
    return l;
  }

  BackwardLayout backward_layout(index_t tokens) const {
    SwitchLossArgs<S, float> switch_args;
    switch_args.scores = {static_cast<const float*>(nullptr), tokens, kExperts};
    std::size_t switch_bytes = 0;
    MOEKIT_CUDA_CHECK(switch_loss(nullptr, switch_bytes, switch_args));
    ZLossArgs<S, float> z_args;
    z_args.logits = {static_cast<const float*>(nullptr), tokens, kExperts};
    std::size_t z_bytes = 0;
    MOEKIT_CUDA_CHECK(z_loss(nullptr, z_bytes, z_args));

    const index_t rows = routed_rows(tokens);
    BackwardLayout l;
    detail::WorkspacePlan p;
    l.dweights = p.reserve(array_bytes<float>(tokens * kTopK));
    l.dlogits = p.reserve(array_bytes<float>(tokens * kExperts));
    l.dlogits_rounded = p.reserve(std::is_same_v<T, float> ? 0 : array_bytes<T>(tokens * kExperts));
    l.losses = p.reserve(2 * sizeof(double));
    l.routed_bytes = detail::round_up(array_bytes<T>(rows * config_.d_model));
    l.token_bytes = detail::round_up(array_bytes<T>(tokens * config_.d_model));
    l.main_bytes = std::max({2 * l.routed_bytes + ffn_.workspace_size(rows), switch_bytes, z_bytes,
                             jitter_bytes(tokens, false), shared_main_bytes(tokens)});
    l.main = p.reserve(l.main_bytes);
    l.total = p.bytes();
    return l;
  }

  static index_t shared_width(const MoeLayerConfig& c) {
    return c.d_ff_shared > 0 ? c.d_ff_shared : c.d_ff;
  }

  static const MoeLayerConfig& validated(const MoeLayerConfig& c) {
    check_gating(c.router.gating, kExperts, kTopK);
    check_noise(c.router.noise, "config.router.noise");
    MOEKIT_CHECK_ARG(!std::isnan(c.router.capacity.factor), "config.router.capacity.factor is NaN");
    MOEKIT_CHECK_ARG(c.router.capacity.policy == DropPolicy::kPosition ||
                         c.router.capacity.policy == DropPolicy::kProbs,
                     "config.router.capacity.policy = ", static_cast<int>(c.router.capacity.policy),
                     " is not a DropPolicy");
    MOEKIT_CHECK_ARG(c.router.non_finite == NonFinitePolicy::kSanitize ||
                         c.router.non_finite == NonFinitePolicy::kError,
                     "config.router.non_finite = ", static_cast<int>(c.router.non_finite),
                     " is not a NonFinitePolicy");
    check_moe_layer_fields(c);
    return c;  // d_model, d_ff, kind, activation: ExpertFfn's constructor
  }

  // logits = x~ w_gate^T (+ gate_bias) (+ Gaussian noise), fp32 out (cuBLAS,
  // fp32 accumulation). x~ = x; with jitter, x jittered in fp32 into `scratch`
  // (jitter_bytes) and the GEMM in fp32 on w_gate widened beside it.
  void gate_forward(cublasHandle_t handle, MatrixView<const T> x, const Params& params,
                    MatrixView<float> logits, void* scratch, cudaStream_t stream) const {
    const index_t tokens = x.rows();
    const index_t d = config_.d_model;
    if (tokens == 0) return;
    const NoiseConfig& noise = config_.router.noise;
    const bool bias = !params.gate_bias.empty();
    if (bias) {
      detail::broadcast_bias_kernel<float>
          <<<detail::elementwise_grid(tokens * kExperts), 256, 0, stream>>>(params.gate_bias,
                                                                            logits);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
    detail::use_stream(handle, stream);
    if (jittered()) {
      const MatrixView<float> jittered_x(static_cast<float*>(scratch), tokens, d);
      detail::jitter_kernel<T, float><<<detail::elementwise_grid(tokens * d), 256, 0, stream>>>(
          x, noise.amount, noise.seed, jittered_x);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
      MatrixView<const float> w;
      if constexpr (std::is_same_v<T, float>) {
        w = params.w_gate;
      } else {
        const std::size_t at = detail::round_up(array_bytes<float>(tokens * d));
        const MatrixView<float> wide(detail::carve<float>(scratch, at), kExperts, d);
        detail::convert_rows_kernel<T, float>
            <<<detail::elementwise_grid(kExperts * d), 256, 0, stream>>>(params.w_gate, wide);
        MOEKIT_CUDA_CHECK(cudaGetLastError());
        w = wide;
      }
      logits_gemm<float>(handle, w, jittered_x, bias, logits);
    } else {
      logits_gemm<T>(handle, params.w_gate, x, bias, logits);
    }
    if (noise.kind == NoiseKind::kGaussian) {
      detail::gaussian_noise_kernel<>
          <<<detail::elementwise_grid(tokens * kExperts), 256, 0, stream>>>(logits, noise.amount,
                                                                            noise.seed);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
  }

  // logits = x w^T, added to the broadcast gate_bias when `bias`; U = T, or
  // float for a jittered x.
  template <class U>
  void logits_gemm(cublasHandle_t handle, MatrixView<const U> w, MatrixView<const U> x, bool bias,
                   MatrixView<float> logits) const {
    // Column-major logits^T (E x T) = w (op T of d x E) x^T.
    detail::cublas_gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, kExperts, x.rows(), config_.d_model,
                        w.data(), detail::gemm_ld(w), x.data(), detail::gemm_ld(x),
                        bias ? 1.0f : 0.0f, logits.data(), detail::gemm_ld(logits));
  }

  // From dlogits (T x E, fp32): dgate_bias (column sums), dw_gate = dlogits^T
  // x~ and dx += (dlogits w_gate) dx~/dx, the GEMMs on dlogits rounded to T.
  // x~ = x; with jitter, forward's x~ regenerated in T into `scratch` for
  // dw_gate, then dlogits w_gate in fp32 there (after that GEMM, in stream
  // order), scaled by the factor and added to dx.
  void gate_backward(cublasHandle_t handle, MatrixView<const T> x, const Params& params,
                     MatrixView<const float> dlogits, T* rounded, void* scratch, const Grads& grads,
                     MatrixView<T> dx, cudaStream_t stream) const {
    const index_t tokens = x.rows();
    const index_t d = config_.d_model;
    const bool acc = grads.accumulate;
    const NoiseConfig& noise = config_.router.noise;
    if (!grads.dgate_bias.empty()) {
      detail::column_sums_kernel<>
          <<<kExperts, detail::kThreads, 0, stream>>>(dlogits, grads.dgate_bias.data(), acc);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
    const bool want_dw = !grads.dw_gate.empty(), want_dx = !dx.empty();
    if (tokens == 0) {  // no rows to multiply: an overwritten dw_gate is 0
      if (want_dw && !acc) zero(grads.dw_gate, stream);
      return;
    }
    if (!want_dw && !want_dx) return;
    MatrixView<const T> g;
    if constexpr (std::is_same_v<T, float>) {
      g = dlogits;
    } else {
      const MatrixView<T> r(rounded, tokens, kExperts);
      detail::convert_rows_kernel<float, T>
          <<<detail::elementwise_grid(tokens * kExperts), 256, 0, stream>>>(dlogits, r);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
      g = r;
    }
    detail::use_stream(handle, stream);
    if (want_dw) {
      MatrixView<const T> input = x;
      if (jittered()) {
        const MatrixView<T> jittered_x(static_cast<T*>(scratch), tokens, d);
        detail::jitter_kernel<T, T><<<detail::elementwise_grid(tokens * d), 256, 0, stream>>>(
            x, noise.amount, noise.seed, jittered_x);
        MOEKIT_CUDA_CHECK(cudaGetLastError());
        input = jittered_x;
      }
      // Column-major dw_gate^T (d x E) = x~^T (d x T) g (op T of E x T).
      detail::cublas_gemm(handle, CUBLAS_OP_N, CUBLAS_OP_T, d, kExperts, tokens, input.data(),
                          detail::gemm_ld(input), g.data(), detail::gemm_ld(g), acc ? 1.0f : 0.0f,
                          grads.dw_gate.data(), detail::gemm_ld(grads.dw_gate));
    }
    if (want_dx && !jittered()) {
      // dx += g w_gate: column-major dx^T (d x T) = w_gate^T (d x E) g^T (E x T).
      detail::cublas_gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, d, tokens, kExperts,
                          params.w_gate.data(), detail::gemm_ld(params.w_gate), g.data(),
                          detail::gemm_ld(g), 1.0f, dx.data(), detail::gemm_ld(dx));
    } else if (want_dx) {
      // product = g w_gate in fp32, then dx += product * factor, rounded once.
      const MatrixView<float> product(static_cast<float*>(scratch), tokens, d);
      detail::cublas_gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, d, tokens, kExperts,
                          params.w_gate.data(), detail::gemm_ld(params.w_gate), g.data(),
                          detail::gemm_ld(g), 0.0f, product.data(), detail::gemm_ld(product));
      detail::add_jittered_kernel<T><<<detail::elementwise_grid(tokens * d), 256, 0, stream>>>(
          product, noise.amount, noise.seed, dx);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
  }

  static void add_rows(MatrixView<const T> src, MatrixView<T> dst, cudaStream_t stream) {
    if (dst.empty()) return;
    detail::add_rows_kernel<T><<<detail::elementwise_grid(dst.size()), 256, 0, stream>>>(src, dst);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }

  static void zero(MatrixView<T> m, cudaStream_t stream) {
    MOEKIT_CUDA_CHECK(cudaMemset2DAsync(m.data(), static_cast<std::size_t>(m.ld()) * sizeof(T), 0,
                                        static_cast<std::size_t>(m.cols()) * sizeof(T),
                                        static_cast<std::size_t>(m.rows()), stream));
  }

  // The first `tokens` rows of a routing.
  static Routing routing_rows(const Routing& r, index_t tokens) {
    return {r.logits.middle_rows(0, tokens), r.scores.middle_rows(0, tokens),
            r.expert_ids.middle_rows(0, tokens), r.weights.middle_rows(0, tokens),
            r.positions.middle_rows(0, tokens)};
  }

  static MatrixView<T> shared_block(MatrixView<T> m, int i, index_t tokens) {
    return m.middle_rows(i * tokens, tokens);
  }
  static MatrixView<T> shared_grad(MatrixView<T> m, int i, index_t rows) {
    return m.empty() ? MatrixView<T>() : m.middle_rows(i * rows, rows);
  }
  ExpertWeights<T> shared_weights(const ExpertWeights<T>& w, int i) const {
    const index_t fs = d_ff_shared(), d = config_.d_model;
    return {w.w1.middle_rows(i * fs, fs),
            gated() ? w.w3.middle_rows(i * fs, fs) : MatrixView<const T>(),
            w.w2.middle_rows(i * d, d)};
  }

  // Shape checks shared with the CPU layer (moekit/core/backend.hpp).
  MoeLayerChecks checks() const {
    return {kExperts,           kTopK,  config_.d_model, config_.d_ff, d_ff_shared(),
            config_.num_shared, gated()};
  }

  // The shared checks plus the GPU state's own fields.
  void check_state(const State& s, index_t tokens) const {
    const MoeLayerStateRows need = state_rows(tokens);
    checks().check_state(s, tokens, need);
    check_shape(s.host_offsets, index_t{kExperts} + 1, "state.host_offsets");
    check_view(s.row_slots, "state.row_slots");
    MOEKIT_CHECK(s.row_slots.size() >= need.routed_rows, Errc::kShapeMismatch,
                 "state.row_slots has ", s.row_slots.size(), " entries, fewer than the ",
                 need.routed_rows, " this batch needs");
  }

  // The host copy of forward's offsets: 0, non-decreasing, within the
  // buffer. Returns the rows in use.
  index_t check_host_offsets(VectorView<const index_t> o, index_t tokens) const {
    MOEKIT_CHECK(o[0] == 0, Errc::kInvalidArgument, "state.host_offsets[0] = ", o[0],
                 ", expected 0 (run forward first)");
    for (int e = 0; e < kExperts; ++e) {
      MOEKIT_CHECK(o[e + 1] >= o[e], Errc::kInvalidArgument, "state.host_offsets decreases at ",
                   e + 1, " (run forward first)");
    }
    MOEKIT_CHECK(o[kExperts] <= routed_rows(tokens), Errc::kShapeMismatch, "state.host_offsets[",
                 kExperts, "] = ", o[kExperts], " exceeds routed_rows(", tokens,
                 ") = ", routed_rows(tokens));
    return o[kExperts];
  }

  // The handle and the workspace; the size last, as it asks CUB.
  void check_workspace(const Workspace& w, index_t tokens) const {
    MOEKIT_CHECK(w.handle != nullptr, Errc::kNullPointer, "workspace.handle is null");
    MOEKIT_CHECK(w.data != nullptr, Errc::kNullPointer, "workspace.data is null");
    MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(w.data) % detail::kWorkspaceAlignment == 0,
                 Errc::kInvalidArgument, "workspace.data is not ", detail::kWorkspaceAlignment,
                 "-byte aligned");
    const std::size_t need = workspace_size(tokens);
    MOEKIT_CHECK(w.bytes >= need, Errc::kShapeMismatch, "workspace.bytes = ", w.bytes,
                 ", workspace_size(", tokens, ") = ", need);
  }

  MoeLayerConfig config_;
  ExpertFfn<S, T> ffn_;
  ExpertFfn<MoeSpec<1, 1>, T> shared_ffn_;  // one shared expert at a time, on all tokens
};

// Owning device storage for a layer's state and workspace up to `max_tokens`:
// one cudaMalloc here, one cudaFree in the destructor; the views stay valid
// while this object lives. state().host_offsets is a host vector.
template <MoeSpecType S, ActivationElement T>
class MoeLayerStorage {
 public:
  // Allocates the state and workspace `layer` needs for batches of up to
  // max_tokens tokens; throws moekit::Error (kCudaError) if cudaMalloc fails.
  MoeLayerStorage(const MoeLayer<S, T>& layer, index_t max_tokens) {
    constexpr int E = S::num_experts, K = S::top_k;
    const MoeLayerConfig& c = layer.config();
    const MoeLayerStateRows rows = layer.state_rows(max_tokens);
    const index_t d = c.d_model, f = c.d_ff, fs = layer.d_ff_shared();
    const bool gated = layer.gated();
    const bool shared = c.num_shared > 0;
    const auto bytes = [](index_t n, std::size_t size) {
      return static_cast<std::size_t>(n) * size;
    };
    detail::WorkspacePlan plan;
    const std::size_t at_logits = plan.reserve(bytes(max_tokens * E, sizeof(float)));
    const std::size_t at_scores = plan.reserve(bytes(max_tokens * E, sizeof(float)));
    const std::size_t at_ids = plan.reserve(bytes(max_tokens * K, sizeof(std::int32_t)));
    const std::size_t at_weights = plan.reserve(bytes(max_tokens * K, sizeof(float)));
    const std::size_t at_positions = plan.reserve(bytes(max_tokens * K, sizeof(std::int32_t)));
    const std::size_t at_offsets = plan.reserve(bytes(E + 1, sizeof(index_t)));
    const std::size_t at_slots = plan.reserve(bytes(rows.routed_rows, sizeof(std::int32_t)));
    const std::size_t at_buffer = plan.reserve(bytes(rows.routed_rows * d, sizeof(T)));
    const std::size_t at_out = plan.reserve(bytes(rows.routed_rows * d, sizeof(T)));
    const std::size_t at_pre = plan.reserve(bytes(rows.routed_rows * f, sizeof(T)));
    const std::size_t at_gate = plan.reserve(gated ? bytes(rows.routed_rows * f, sizeof(T)) : 0);
    const std::size_t at_shared_pre =
        plan.reserve(shared ? bytes(rows.shared_rows * fs, sizeof(T)) : 0);
    const std::size_t at_shared_gate =
        plan.reserve(shared && gated ? bytes(rows.shared_rows * fs, sizeof(T)) : 0);
    workspace_bytes_ = layer.workspace_size(max_tokens);
    const std::size_t at_workspace = plan.reserve(workspace_bytes_);
    MOEKIT_CUDA_CHECK(cudaMalloc(&base_, plan.bytes()));
    host_offsets_.assign(static_cast<std::size_t>(E + 1), 0);
    workspace_ = detail::carve<char>(base_, at_workspace);

    const auto matrix = [&](std::size_t at, index_t r, index_t cols) {
      return MatrixView<T>(detail::carve<T>(base_, at), r, cols);
    };
    state_.routing = {{detail::carve<float>(base_, at_logits), max_tokens, E},
                      {detail::carve<float>(base_, at_scores), max_tokens, E},
                      {detail::carve<std::int32_t>(base_, at_ids), max_tokens, K},
                      {detail::carve<float>(base_, at_weights), max_tokens, K},
                      {detail::carve<std::int32_t>(base_, at_positions), max_tokens, K}};
    state_.offsets = {detail::carve<index_t>(base_, at_offsets), E + 1};
    state_.host_offsets = {host_offsets_.data(), E + 1};
    state_.row_slots = {detail::carve<std::int32_t>(base_, at_slots), rows.routed_rows};
    state_.buffer = matrix(at_buffer, rows.routed_rows, d);
    state_.expert_out = matrix(at_out, rows.routed_rows, d);
    state_.saved_pre = matrix(at_pre, rows.routed_rows, f);
    state_.saved_gate = gated ? matrix(at_gate, rows.routed_rows, f) : MatrixView<T>();
    state_.shared_pre = shared ? matrix(at_shared_pre, rows.shared_rows, fs) : MatrixView<T>();
    state_.shared_gate =
        shared && gated ? matrix(at_shared_gate, rows.shared_rows, fs) : MatrixView<T>();
  }
  MoeLayerStorage(const MoeLayerStorage&) = delete;
  MoeLayerStorage& operator=(const MoeLayerStorage&) = delete;
  ~MoeLayerStorage() {
    if (base_ != nullptr) (void)cudaFree(base_);
  }

  // The state views, for forward and backward.
  const MoeLayerState<T>& state() const { return state_; }
  // The workspace, run with the caller's cuBLAS handle on `stream`.
  MoeLayerWorkspace workspace(cublasHandle_t handle, cudaStream_t stream = nullptr) const {
    return {workspace_, workspace_bytes_, handle, stream};
  }

 private:
  void* base_ = nullptr;
  void* workspace_ = nullptr;
  std::size_t workspace_bytes_ = 0;
  std::vector<index_t> host_offsets_;
  MoeLayerState<T> state_;
};

}  // namespace gpu

// The CUDA backend for moekit::MoeLayer<S, Backend> (moekit/core/backend.hpp),
// with activations and weights of type T.
template <gpu::ActivationElement T>
struct CudaBackend {
  // This backend's MoE layer for spec S.
  template <MoeSpecType S>
  using MoeLayer = gpu::MoeLayer<S, T>;
};

MOEKIT_NAMESPACE_END
