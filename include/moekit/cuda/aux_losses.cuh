#pragma once
// Load-balancing losses and the aux-loss-free bias update on the CUDA backend:
// the formulas of moekit/cpu/aux_losses.hpp (docs/math.md), computed from
// what gpu::route() wrote. Conventions as in moekit/cuda/router.cuh:
// two-phase workspace (a null d_temp_storage asks for the size), host-side
// validation that throws moekit::Error before any launch, cudaError_t for
// runtime failures, a stream on every call, device pointers only.
//
// Every loss writes L (unscaled, a double) to the device scalar args.loss
// and, when args.dlogits is not empty, ADDS coeff * dL/dx to it (one addition
// per element, as on the CPU). T = 0 gives L = 0.
//
// Deterministic: per-block partial sums (exact integer counts, double sums
// in token order) are written to the workspace and added in block order by
// a second kernel; no float atomics anywhere.
//
// Saved expert ids come from device memory the host cannot check: an id
// outside [0, E) is skipped (it counts for no expert) and counted in the
// optional args.invalid_ids (device, reset by the call); the CPU backend
// throws Errc::kOutOfRange for the same input.
//
// Not on the GPU yet: the smooth (noisy top-k) load estimate of
// importance_load_loss; the GPU uses the hard counts, which is the CPU's
// result whenever the router adds no Gaussian noise.

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "moekit/core/error.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cuda/error.cuh"
#include "moekit/cuda/router.cuh"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace gpu {

// switch_loss (sequence_length = 0: the batch is one sequence, normalised by
// `normalization`) and sequence_aux_loss (sequence_length > 0: consecutive
// blocks of that many rows, kTokensTimesK each, averaged; DeepSeek-V3).
template <MoeSpecType S, LogitElement T = float>
struct SwitchLossArgs {
  GatingRule rule = GatingRule::kSoftmaxTopK;  // the router's rule (q's definition)
  MatrixView<const T> logits;                  // T x E (only read for dlogits)
  MatrixView<const float> scores;              // T x E
  MatrixView<const std::int32_t> expert_ids;   // T x K
  SwitchNormalization normalization = SwitchNormalization::kTokensTimesK;  // f_e's N
  float coeff = 1.0f;                   // dlogits += coeff * dL/dlogits; finite
  double* loss = nullptr;               // device scalar, required
  MatrixView<float> dlogits{};          // T x E or empty
  std::int64_t* invalid_ids = nullptr;  // device counter or null
};

// Arguments of z_loss(): the router z-loss of T tokens' logits.
template <MoeSpecType S, LogitElement T = float>
struct ZLossArgs {
  MatrixView<const T> logits;   // T x E
  float coeff = 1.0f;           // dlogits += coeff * dL/dlogits; finite
  double* loss = nullptr;       // device scalar, required
  MatrixView<float> dlogits{};  // T x E or empty
};

// L = importance_weight CV^2(importance) + load_weight CV^2(load), with the
// hard load (count_e) on the GPU.
template <MoeSpecType S, LogitElement T = float>
struct ImportanceLoadArgs {
  GatingConfig gating{};                       // the router's (for the importance gradient)
  MatrixView<const T> logits;                  // T x E (only read for dlogits)
  MatrixView<const float> scores;              // T x E
  MatrixView<const std::int32_t> expert_ids;   // T x K
  MatrixView<const float> weights;             // T x K
  MatrixView<const std::int32_t> positions{};  // T x K (-1 = dropped) or empty: all kept
  float importance_weight = 1.0f;              // >= 0; 0 leaves the importance term out
  float load_weight = 1.0f;                    // >= 0; 0 leaves the load term out
  float coeff = 1.0f;                          // dlogits += coeff * dL/dlogits; finite
  double* loss = nullptr;                      // device scalar, required
  MatrixView<float> dlogits{};                 // T x E or empty
  std::int64_t* invalid_ids = nullptr;         // device counter or null
};

namespace detail {

inline constexpr int kSlotRows = 128;  // token rows per block where only T x K data is read

// A sequence tiling: sequences of `length` rows, each cut into tiles of
// `rows`; block b covers tile b % tiles of sequence b / tiles, so no block
// straddles two sequences.
struct SequenceTiles {
  index_t length;
  int rows;
  int tiles;
  MOEKIT_HOST_DEVICE index_t first(int block) const {
    return (block / tiles) * length + static_cast<index_t>(block % tiles) * rows;
  }
  MOEKIT_HOST_DEVICE int count(int block) const {
    const index_t left = length - static_cast<index_t>(block % tiles) * rows;
    return static_cast<int>(left < rows ? left : rows);
  }
};

inline SequenceTiles make_tiles(index_t length, int rows) {
  return {length, rows, length > 0 ? static_cast<int>((length + rows - 1) / rows) : 0};
}

// Per-block counts and routing-distribution sums of the Switch form.
template <int E, int K>
__global__ void __launch_bounds__(kThreads)
    switch_partials_kernel(GatingRule rule, MatrixView<const float> scores,
                           MatrixView<const std::int32_t> expert_ids, SequenceTiles tiles,
                           std::int32_t* count, double* distribution,
                           unsigned long long* invalid_ids) {
  constexpr int kRows = kTileRows<E, 1>;
  constexpr int kStride = kRowStride<E>;
  __shared__ float tile[kRows * kStride];
  __shared__ int tile_ids[kRows * K];
  __shared__ double row_scale[kRows];
  const index_t first = tiles.first(static_cast<int>(blockIdx.x));
  const int rows = tiles.count(static_cast<int>(blockIdx.x));
  load_rows<E>(scores, first, rows, tile);
  for (int i = static_cast<int>(threadIdx.x); i < rows * K; i += static_cast<int>(blockDim.x)) {
    const int id = expert_ids(first + i / K, i % K);
    const bool ok = id >= 0 && id < E;
    if (!ok && invalid_ids != nullptr) atomicAdd(invalid_ids, 1ull);
    tile_ids[i] = ok ? id : -1;
  }
  __syncthreads();
  const int r = static_cast<int>(threadIdx.x);
  if (r < rows) row_scale[r] = distribution_scale<E>(rule, tile + r * kStride);
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < E; e += static_cast<int>(blockDim.x)) {
    int c = 0;
    double q = 0.0;
    for (int t = 0; t < rows; ++t) {
      for (int k = 0; k < K; ++k) c += tile_ids[t * K + k] == e;
      q += distribution_term<E>(row_scale[t], tile[t * kStride + e]);
    }
    count[static_cast<index_t>(blockIdx.x) * E + e] = c;
    distribution[static_cast<index_t>(blockIdx.x) * E + e] = q;
  }
}

// One block per sequence: its Switch loss, and the per-expert gradient
// g[e] = float(grad_scale E f_e / L_s) that every token of it shares.
template <int E, int K>
__global__ void __launch_bounds__(kThreads)
    switch_finalize_kernel(const std::int32_t* count, const double* distribution,
                           SequenceTiles tiles, SwitchNormalization norm, double grad_scale,
                           double* sequence_loss, float* grad) {
  __shared__ double term[E];
  const int s = static_cast<int>(blockIdx.x);
  const double n = static_cast<double>(tiles.length);
  const double denom = norm == SwitchNormalization::kTokens ? n : n * K;
  for (int e = static_cast<int>(threadIdx.x); e < E; e += static_cast<int>(blockDim.x)) {
    std::int64_t c = 0;
    double q = 0.0;
    for (int b = s * tiles.tiles; b < (s + 1) * tiles.tiles; ++b) {
      c += count[static_cast<index_t>(b) * E + e];
      q += distribution[static_cast<index_t>(b) * E + e];
    }
    const double f = static_cast<double>(c) / denom;
    term[e] = f * (q / n);
    grad[static_cast<index_t>(s) * E + e] = static_cast<float>(grad_scale * E * f / n);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int e = 0; e < E; ++e) sum += term[e];
    sequence_loss[s] = E * sum;
  }
}

// *loss = (sum of `count` partials, in order) / divisor; 0 when count = 0.
template <int = 0>
__global__ void ordered_mean_kernel(const double* partial, int count, double divisor,
                                    double* loss) {
  double sum = 0.0;
  for (int i = 0; i < count; ++i) sum += partial[i];
  *loss = count > 0 ? sum / divisor : 0.0;
}

// dlogits += dq/dx^T g_s per token (routing::routing_distribution_backward).
template <int E, class T>
__global__ void __launch_bounds__(kThreads)
    switch_gradient_kernel(GatingRule rule, MatrixView<const T> logits,
                           MatrixView<const float> scores, SequenceTiles tiles, const float* grad,
                           MatrixView<float> dlogits) {
  constexpr int kRows = kRowsPerBlock<E, 3>;
  constexpr int kStride = kRowStride<E>;
  __shared__ float x_tile[kRows * kStride];
  __shared__ float s_tile[kRows * kStride];
  __shared__ float d_tile[kRows * kStride];
  const int b = static_cast<int>(blockIdx.x);
  const index_t first = tiles.first(b);
  const int rows = tiles.count(b);
  load_rows<E>(logits, first, rows, x_tile);
  load_rows<E>(scores, first, rows, s_tile);
  load_rows<E>(MatrixView<const float>(dlogits), first, rows, d_tile);
  __syncthreads();
  const float* g = grad + static_cast<index_t>(b / tiles.tiles) * E;
  if constexpr (kWarpPerToken<E>) {
    for (int r = static_cast<int>(threadIdx.x) / 32; r < rows; r += kWarpsPerBlock) {
      warp_distribution_backward_row<E>(rule, x_tile + r * kStride, s_tile + r * kStride, g, 1.0f,
                                        d_tile + r * kStride);
    }
  } else {
    const int r = static_cast<int>(threadIdx.x);
    if (r < rows) {
      float dx[E];
      for (int e = 0; e < E; ++e) dx[e] = 0.0f;
      routing::routing_distribution_backward<E>(rule, x_tile + r * kStride, s_tile + r * kStride, g,
                                                1.0f, dx);
      for (int e = 0; e < E; ++e) d_tile[r * kStride + e] += dx[e];
    }
  }
  __syncthreads();
  store_rows<E>(d_tile, rows, dlogits, first);
}

// z-loss: per-block sums of lse^2 and, with dlogits, the gradient rows.
template <int E, class T>
__global__ void __launch_bounds__(kThreads)
    z_loss_kernel(MatrixView<const T> logits, double coeff, MatrixView<float> dlogits,
                  double* partial) {
  constexpr int kRows = kRowsPerBlock<E, 2>;
  constexpr int kStride = kRowStride<E>;
  __shared__ float x_tile[kRows * kStride];
  __shared__ float d_tile[kRows * kStride];
  __shared__ double row_lse_square[kRows];
  const index_t tokens = logits.rows();
  const index_t first = static_cast<index_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(tokens - first < kRows ? tokens - first : kRows);
  const bool grad = !dlogits.empty();
  load_rows<E>(logits, first, rows, x_tile);
  if (grad) load_rows<E>(MatrixView<const float>(dlogits), first, rows, d_tile);
  __syncthreads();
  if constexpr (kWarpPerToken<E>) {
    for (int r = static_cast<int>(threadIdx.x) / 32; r < rows; r += kWarpsPerBlock) {
      float x[kLaneSlots<E>];
      load_slots<E>(x_tile + r * kStride, -routing::kInf, x);
      const double lse_square = warp_z_loss<E>(x, coeff, static_cast<double>(tokens),
                                               grad ? d_tile + r * kStride : nullptr);
      if (lane_id() == 0) row_lse_square[r] = lse_square;
    }
  } else {
    const int r = static_cast<int>(threadIdx.x);
    if (r < rows) {
      row_lse_square[r] =
          routing::z_loss_token<E>(x_tile + r * kStride, coeff, static_cast<double>(tokens),
                                   grad ? d_tile + r * kStride : nullptr);
    }
  }
  __syncthreads();
  if (grad) store_rows<E>(d_tile, rows, dlogits, first);
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int t = 0; t < rows; ++t) sum += row_lse_square[t];
    partial[blockIdx.x] = sum;
  }
}

// Importance (kept weights) and hard load (counts) per block.
template <int E, int K>
__global__ void __launch_bounds__(kThreads)
    importance_partials_kernel(MatrixView<const std::int32_t> expert_ids,
                               MatrixView<const float> weights,
                               MatrixView<const std::int32_t> positions, double* importance,
                               std::int32_t* load, unsigned long long* invalid_ids) {
  __shared__ int tile_ids[kSlotRows * K];
  __shared__ float tile_w[kSlotRows * K];  // the weight of a kept slot, 0 for a dropped one
  const index_t tokens = expert_ids.rows();
  const index_t first = static_cast<index_t>(blockIdx.x) * kSlotRows;
  const int rows = static_cast<int>(tokens - first < kSlotRows ? tokens - first : kSlotRows);
  const bool all_kept = positions.empty();
  for (int i = static_cast<int>(threadIdx.x); i < rows * K; i += static_cast<int>(blockDim.x)) {
    const index_t t = first + i / K;
    const int k = i % K;
    const int id = expert_ids(t, k);
    const bool ok = id >= 0 && id < E;
    if (!ok && invalid_ids != nullptr) atomicAdd(invalid_ids, 1ull);
    tile_ids[i] = ok ? id : -1;
    tile_w[i] = all_kept || positions(t, k) >= 0 ? weights(t, k) : 0.0f;
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < E; e += static_cast<int>(blockDim.x)) {
    int c = 0;
    double imp = 0.0;
    for (int i = 0; i < rows * K; ++i) {
      if (tile_ids[i] != e) continue;
      ++c;
      imp += static_cast<double>(tile_w[i]);
    }
    load[static_cast<index_t>(blockIdx.x) * E + e] = c;
    importance[static_cast<index_t>(blockIdx.x) * E + e] = imp;
  }
}

// One block: totals in block order, then the CV^2 terms and their gradients
// (routing::cv_squared, the CPU's implementation).
template <int E>
__global__ void __launch_bounds__(kThreads)
    importance_finalize_kernel(const double* importance_partial, const std::int32_t* load_partial,
                               int blocks, double importance_weight, double load_weight,
                               double coeff, double* grad_importance, double* loss) {
  __shared__ double importance[E];
  __shared__ double load[E];
  __shared__ double grad_load[E];
  for (int e = static_cast<int>(threadIdx.x); e < E; e += static_cast<int>(blockDim.x)) {
    double imp = 0.0;
    std::int64_t c = 0;
    for (int b = 0; b < blocks; ++b) {
      imp += importance_partial[static_cast<index_t>(b) * E + e];
      c += load_partial[static_cast<index_t>(b) * E + e];
    }
    importance[e] = imp;
    load[e] = static_cast<double>(c);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    *loss = importance_weight *
                routing::cv_squared<E>(importance, coeff * importance_weight, grad_importance) +
            load_weight * routing::cv_squared<E>(load, coeff * load_weight, grad_load);
  }
}

// dlogits += the importance gradient through gating (gate_token_backward).
template <int E, int K, class T>
__global__ void __launch_bounds__(kThreads)
    importance_gradient_kernel(GatingConfig cfg, MatrixView<const T> logits,
                               MatrixView<const float> scores,
                               MatrixView<const std::int32_t> expert_ids,
                               MatrixView<const std::int32_t> positions,
                               const double* grad_importance, MatrixView<float> dlogits) {
  constexpr int kRows = kRowsPerBlock<E, 3>;
  constexpr int kStride = kRowStride<E>;
  __shared__ float x_tile[kRows * kStride];
  __shared__ float s_tile[kRows * kStride];
  __shared__ float d_tile[kRows * kStride];
  const index_t tokens = logits.rows();
  const index_t first = static_cast<index_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(tokens - first < kRows ? tokens - first : kRows);
  load_rows<E>(logits, first, rows, x_tile);
  load_rows<E>(scores, first, rows, s_tile);
  load_rows<E>(MatrixView<const float>(dlogits), first, rows, d_tile);
  __syncthreads();
  // The row's ids and dL/dw (the importance gradient of each kept slot).
  const auto row_grad = [&](int r, int* ids, float* dw) {
    for (int k = 0; k < K; ++k) ids[k] = expert_ids(first + r, k);
    for (int k = 0; k < K; ++k) {
      const bool ok = ids[k] >= 0 && ids[k] < E;
      const bool kept = positions.empty() || positions(first + r, k) >= 0;
      dw[k] = ok && kept ? static_cast<float>(grad_importance[ids[k]]) : 0.0f;
    }
  };
  if constexpr (kWarpPerToken<E>) {
    for (int r = static_cast<int>(threadIdx.x) / 32; r < rows; r += kWarpsPerBlock) {
      int ids[K];
      float dw[K];
      row_grad(r, ids, dw);
      warp_gate_backward_row<E, K>(x_tile + r * kStride, s_tile + r * kStride, ids, dw, cfg,
                                   d_tile + r * kStride, true);
    }
  } else {
    const int r = static_cast<int>(threadIdx.x);
    if (r < rows) {
      int ids[K];
      float dw[K];
      row_grad(r, ids, dw);
      if (routing::valid_ids<E, K>(ids)) {
        float dx[E];
        routing::gate_token_backward<E, K>(x_tile + r * kStride, s_tile + r * kStride, ids, dw, cfg,
                                           dx);
        for (int e = 0; e < E; ++e) d_tile[r * kStride + e] += dx[e];
      }
    }
  }
  __syncthreads();
  store_rows<E>(d_tile, rows, dlogits, first);
}

template <int E>
__global__ void __launch_bounds__(kThreads)
    bias_update_kernel(float* bias, const std::int64_t* counts, float gamma) {
  std::int64_t total = 0;
  for (int e = 0; e < E; ++e) total += counts[e];
  for (int e = static_cast<int>(threadIdx.x); e < E; e += static_cast<int>(blockDim.x)) {
    const std::int64_t diff = total - static_cast<std::int64_t>(E) * counts[e];
    bias[e] += gamma * (diff > 0 ? 1.0f : (diff < 0 ? -1.0f : 0.0f));
  }
}

inline void check_coeff(float coeff) {
  MOEKIT_CHECK_ARG(std::isfinite(coeff), "args.coeff = ", coeff, " is not finite");
}

template <class U>
void check_dlogits(MatrixView<U> dlogits, index_t tokens, int experts) {
  if (!dlogits.empty()) check_shape(dlogits, tokens, experts, "args.dlogits");
}

template <MoeSpecType S, class T>
cudaError_t switch_impl(void* d_temp_storage, std::size_t& temp_storage_bytes,
                        const SwitchLossArgs<S, T>& args, index_t sequence_length,
                        cudaStream_t stream) {
  constexpr int E = S::num_experts, K = S::top_k;
  const index_t tokens = args.scores.rows();
  check_token_count(tokens, K);
  MOEKIT_CHECK_ARG(sequence_length >= 0, "sequence_length = ", sequence_length,
                   " must be positive");
  const index_t length = sequence_length > 0 ? sequence_length : tokens;
  MOEKIT_CHECK(length == 0 || tokens % length == 0, Errc::kShapeMismatch,
               "scores have T = ", tokens, " rows, not a multiple of sequence_length = ", length);
  const int sequences = length > 0 ? static_cast<int>(tokens / length) : 0;
  const SequenceTiles tiles = make_tiles(length, kTileRows<E, 1>);
  const SequenceTiles grad_tiles = make_tiles(length, kRowsPerBlock<E, 3>);
  const std::size_t blocks = static_cast<std::size_t>(sequences) * tiles.tiles;
  const std::size_t ns = static_cast<std::size_t>(sequences);
  WorkspacePlan plan;
  const std::size_t at_count = plan.reserve(blocks * E * sizeof(std::int32_t));
  const std::size_t at_dist = plan.reserve(blocks * E * sizeof(double));
  const std::size_t at_seq = plan.reserve(ns * sizeof(double));
  const std::size_t at_grad = plan.reserve(ns * E * sizeof(float));
  if (size_query(d_temp_storage, temp_storage_bytes, plan.bytes())) return cudaSuccess;

  check_shape(args.scores, tokens, E, "args.scores");
  check_shape(args.expert_ids, tokens, K, "args.expert_ids");
  check_dlogits(args.dlogits, tokens, E);
  if (!args.dlogits.empty()) check_shape(args.logits, tokens, E, "args.logits");
  MOEKIT_CHECK(args.loss != nullptr, Errc::kNullPointer, "args.loss is null");
  check_coeff(args.coeff);
  MOEKIT_CHECK_ARG(args.rule == GatingRule::kSoftmaxTopK || args.rule == GatingRule::kTopKSoftmax ||
                       args.rule == GatingRule::kSigmoid,
                   "args.rule = ", static_cast<int>(args.rule), " is not a GatingRule");
  MOEKIT_CHECK_ARG(args.normalization == SwitchNormalization::kTokensTimesK ||
                       args.normalization == SwitchNormalization::kTokens,
                   "args.normalization = ", static_cast<int>(args.normalization),
                   " is not a SwitchNormalization");
  OverlapCheck(sequence_length > 0 ? "gpu::sequence_aux_loss" : "gpu::switch_loss")
      .out(Footprints{{args.dlogits, "args.dlogits"},
                      {args.loss, 1, "args.loss"},
                      {args.invalid_ids, args.invalid_ids != nullptr ? 1 : 0, "args.invalid_ids"},
                      temp_storage(d_temp_storage, plan.bytes())})
      .in(Footprints{{args.logits, "args.logits"},
                     {args.scores, "args.scores"},
                     {args.expert_ids, "args.expert_ids"}})
      .check();

  auto* invalid = reinterpret_cast<unsigned long long*>(args.invalid_ids);
  if (invalid != nullptr) MOEKIT_CUDA_TRY(cudaMemsetAsync(invalid, 0, sizeof(*invalid), stream));
  auto* count = carve<std::int32_t>(d_temp_storage, at_count);
  auto* distribution = carve<double>(d_temp_storage, at_dist);
  auto* sequence_loss = carve<double>(d_temp_storage, at_seq);
  auto* grad = carve<float>(d_temp_storage, at_grad);
  if (sequences > 0) {
    const SwitchNormalization norm =
        sequence_length > 0 ? SwitchNormalization::kTokensTimesK : args.normalization;
    const double grad_scale = static_cast<double>(args.coeff) /
                              (sequence_length > 0 ? static_cast<double>(sequences) : 1.0);
    switch_partials_kernel<E, K><<<static_cast<int>(blocks), kThreads, 0, stream>>>(
        args.rule, args.scores, args.expert_ids, tiles, count, distribution, invalid);
    MOEKIT_CUDA_TRY(cudaGetLastError());
    switch_finalize_kernel<E, K><<<sequences, kThreads, 0, stream>>>(
        count, distribution, tiles, norm, grad_scale, sequence_loss, grad);
    MOEKIT_CUDA_TRY(cudaGetLastError());
    if (!args.dlogits.empty()) {
      const int grad_blocks = sequences * grad_tiles.tiles;
      switch_gradient_kernel<E, T><<<grad_blocks, kThreads, 0, stream>>>(
          args.rule, args.logits, args.scores, grad_tiles, grad, args.dlogits);
      MOEKIT_CUDA_TRY(cudaGetLastError());
    }
  }
  ordered_mean_kernel<>
      <<<1, 1, 0, stream>>>(sequence_loss, sequences, static_cast<double>(sequences), args.loss);
  return cudaGetLastError();
}

}  // namespace detail

// Switch / GShard balance loss (cpu::switch_loss): sequence_length in args is
// the whole batch; options as on the CPU.
template <MoeSpecType S, LogitElement T>
cudaError_t switch_loss(void* d_temp_storage, std::size_t& temp_storage_bytes,
                        const SwitchLossArgs<S, T>& args, cudaStream_t stream = nullptr) {
  return detail::switch_impl(d_temp_storage, temp_storage_bytes, args, 0, stream);
}

// DeepSeek-V3's sequence-wise balance loss (cpu::sequence_aux_loss): the
// Switch form (kTokensTimesK; args.normalization is ignored) per block of
// sequence_length rows, averaged. T must be a multiple of sequence_length.
template <MoeSpecType S, LogitElement T>
cudaError_t sequence_aux_loss(void* d_temp_storage, std::size_t& temp_storage_bytes,
                              const SwitchLossArgs<S, T>& args, index_t sequence_length,
                              cudaStream_t stream = nullptr) {
  MOEKIT_CHECK_ARG(sequence_length >= 1, "sequence_length = ", sequence_length,
                   " must be positive");
  return detail::switch_impl(d_temp_storage, temp_storage_bytes, args, sequence_length, stream);
}

// Router z-loss (cpu::z_loss): L = mean_t lse_t^2; a -inf logit is a masked
// expert; a row with a NaN or +inf logit, or only -inf, adds 0 and gets no
// gradient but counts in T.
template <MoeSpecType S, LogitElement T>
cudaError_t z_loss(void* d_temp_storage, std::size_t& temp_storage_bytes,
                   const ZLossArgs<S, T>& args, cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::z_loss");
  constexpr int E = S::num_experts;
  const index_t tokens = args.logits.rows();
  detail::check_token_count(tokens, S::top_k);
  const int blocks = detail::grid_for(tokens, detail::kRowsPerBlock<E, 2>);
  detail::WorkspacePlan plan;
  const std::size_t at_partial = plan.reserve(static_cast<std::size_t>(blocks) * sizeof(double));
  if (detail::size_query(d_temp_storage, temp_storage_bytes, plan.bytes())) return cudaSuccess;
  check_shape(args.logits, tokens, E, "args.logits");
  detail::check_dlogits(args.dlogits, tokens, E);
  MOEKIT_CHECK(args.loss != nullptr, Errc::kNullPointer, "args.loss is null");
  detail::check_coeff(args.coeff);
  OverlapCheck("gpu::z_loss")
      .out(Footprints{{args.dlogits, "args.dlogits"},
                      {args.loss, 1, "args.loss"},
                      detail::temp_storage(d_temp_storage, plan.bytes())})
      .in(Footprints{{args.logits, "args.logits"}})
      .check();

  auto* partial = detail::carve<double>(d_temp_storage, at_partial);
  if (blocks > 0) {
    detail::z_loss_kernel<E, T><<<blocks, detail::kThreads, 0, stream>>>(
        args.logits, static_cast<double>(args.coeff), args.dlogits, partial);
    MOEKIT_CUDA_TRY(cudaGetLastError());
  }
  detail::ordered_mean_kernel<>
      <<<1, 1, 0, stream>>>(partial, blocks, static_cast<double>(tokens), args.loss);
  return cudaGetLastError();
}

// Shazeer et al. (2017) importance and (hard) load loss (cpu::
// importance_load_loss without Gaussian router noise).
template <MoeSpecType S, LogitElement T>
cudaError_t importance_load_loss(void* d_temp_storage, std::size_t& temp_storage_bytes,
                                 const ImportanceLoadArgs<S, T>& args,
                                 cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::importance_load_loss");
  constexpr int E = S::num_experts, K = S::top_k;
  const index_t tokens = args.expert_ids.rows();
  detail::check_token_count(tokens, K);
  const int blocks = detail::grid_for(tokens, detail::kSlotRows);
  const std::size_t nb = static_cast<std::size_t>(blocks);
  detail::WorkspacePlan plan;
  const std::size_t at_imp = plan.reserve(nb * E * sizeof(double));
  const std::size_t at_load = plan.reserve(nb * E * sizeof(std::int32_t));
  const std::size_t at_grad = plan.reserve(E * sizeof(double));
  if (detail::size_query(d_temp_storage, temp_storage_bytes, plan.bytes())) return cudaSuccess;

  check_gating(args.gating, E, K);
  check_shape(args.expert_ids, tokens, K, "args.expert_ids");
  check_shape(args.weights, tokens, K, "args.weights");
  if (!args.positions.empty()) check_shape(args.positions, tokens, K, "args.positions");
  detail::check_dlogits(args.dlogits, tokens, E);
  if (!args.dlogits.empty()) {
    check_shape(args.logits, tokens, E, "args.logits");
    check_shape(args.scores, tokens, E, "args.scores");
  }
  MOEKIT_CHECK(args.loss != nullptr, Errc::kNullPointer, "args.loss is null");
  detail::check_coeff(args.coeff);
  MOEKIT_CHECK_ARG(std::isfinite(args.importance_weight) && args.importance_weight >= 0.0f,
                   "args.importance_weight = ", args.importance_weight,
                   " must be finite and non-negative");
  MOEKIT_CHECK_ARG(std::isfinite(args.load_weight) && args.load_weight >= 0.0f,
                   "args.load_weight = ", args.load_weight, " must be finite and non-negative");
  OverlapCheck("gpu::importance_load_loss")
      .out(Footprints{{args.dlogits, "args.dlogits"},
                      {args.loss, 1, "args.loss"},
                      {args.invalid_ids, args.invalid_ids != nullptr ? 1 : 0, "args.invalid_ids"},
                      detail::temp_storage(d_temp_storage, plan.bytes())})
      .in(Footprints{{args.logits, "args.logits"},
                     {args.scores, "args.scores"},
                     {args.expert_ids, "args.expert_ids"},
                     {args.weights, "args.weights"},
                     {args.positions, "args.positions"}})
      .check();

  auto* invalid = reinterpret_cast<unsigned long long*>(args.invalid_ids);
  if (invalid != nullptr) MOEKIT_CUDA_TRY(cudaMemsetAsync(invalid, 0, sizeof(*invalid), stream));
  auto* importance = detail::carve<double>(d_temp_storage, at_imp);
  auto* load = detail::carve<std::int32_t>(d_temp_storage, at_load);
  auto* grad_importance = detail::carve<double>(d_temp_storage, at_grad);
  if (blocks > 0) {
    detail::importance_partials_kernel<E, K><<<blocks, detail::kThreads, 0, stream>>>(
        args.expert_ids, args.weights, args.positions, importance, load, invalid);
    MOEKIT_CUDA_TRY(cudaGetLastError());
  }
  detail::importance_finalize_kernel<E><<<1, detail::kThreads, 0, stream>>>(
      importance, load, blocks, static_cast<double>(args.importance_weight),
      static_cast<double>(args.load_weight), static_cast<double>(args.coeff), grad_importance,
      args.loss);
  MOEKIT_CUDA_TRY(cudaGetLastError());
  if (!args.dlogits.empty() && tokens > 0) {
    const int grad_blocks = detail::grid_for(tokens, detail::kRowsPerBlock<E, 3>);
    detail::importance_gradient_kernel<E, K, T><<<grad_blocks, detail::kThreads, 0, stream>>>(
        args.gating, args.logits, args.scores, args.expert_ids, args.positions, grad_importance,
        args.dlogits);
    MOEKIT_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

// Aux-loss-free balancing (DeepSeek-V3, cpu::ExpertBias::update):
// bias[e] += gamma * sign(mean(counts) - counts[e]) in exact integer
// arithmetic. counts: E device int64 (e.g. &d_stats->assigned[0], or the
// caller's sum over micro-batches); bias: the E device floats route() reads.
template <MoeSpecType S>
cudaError_t update_expert_bias(float* bias, const std::int64_t* counts, float gamma,
                               cudaStream_t stream = nullptr) {
  MOEKIT_CHECK(bias != nullptr, Errc::kNullPointer, "bias is null");
  MOEKIT_CHECK(counts != nullptr, Errc::kNullPointer, "counts is null");
  MOEKIT_CHECK_ARG(std::isfinite(gamma) && gamma >= 0.0f, "gamma = ", gamma,
                   " must be finite and non-negative");
  detail::bias_update_kernel<S::num_experts>
      <<<1, detail::kThreads, 0, stream>>>(bias, counts, gamma);
  return cudaGetLastError();
}

}  // namespace gpu
MOEKIT_NAMESPACE_END
