#pragma once
// Early exit on the CUDA backend (docs/math.md): the exit decision, stream
// compaction of the live rows and the weighted multi-exit training loss of
// moekit/cpu/early_exit.hpp, on device data; logits of type T (fp32, bf16,
// fp16).
//
//   exits.begin(n, state, results, stream);                     // all n live
//   for each layer: x = layer(x) (m rows)
//     if an exit follows it: logits = exit_classifier(x)        (m x C)
//       exits.step(ws, bytes, i, logits, state, results, kept, d_live, stream);
//       gpu::gather_rows(x, kept, d_live, x_next, stream);      // survivors, in order
//       m = *d_live (copy it back: the next classifier's row count)
//
// step() computes for each live row r the exit scores of its logits with
// classify::exit_scores (the CPU's function: top1, confidence, top-2 margin,
// entropy; NaN logits count as -inf) and lets it exit when ANY rule of
// config.criteria passes (classify::exit_passes), patience counting the
// consecutive exits whose argmax equals the previous exit's; at the last exit
// every live row exits. A row that exits writes prediction, confidence and
// the exit index at its ORIGINAL index in `results`; the others stay live.
// The state (original index, previous argmax, patience counter) is then
// compacted stably, and kept[0, m') receives the rows (among this step's m)
// that stay, strictly increasing. The row function and values are the
// CPU's, so decisions agree with the CPU backend except where a score lies
// within an ulp of a threshold (device expf vs the host's exp).
//
// How: one thread per row decides (the shared serial row function);
// survivors are flagged and cub::DeviceSelect::Flagged (stable) writes their
// row numbers to `kept` and their count m' to the device; one kernel moves
// the state from a workspace copy into place. m' stays on the device: the
// caller copies it back when it needs the next classifier's row count (one
// small copy and synchronisation per exit; everything else is asynchronous).
//
// Training (multi_exit_loss), every sample through every exit i = 0..k-1:
//   L_i = (1 / n) sum_r CE(z_{i,r}, y_r),   L = sum_i w_i L_i / sum_i w_i,
//   dL/dz_{i,r} = w_i / (n sum_i w_i) (softmax(z_{i,r}) - onehot(y_r)),
// w = exit_weights (HOST memory, validated as on the CPU) or w_i = i + 1.
// One thread per row runs classify::cross_entropy_row; per-block sums in
// row order are added in block order (deterministic).
//
// Conventions (CUB's two-phase API): step and multi_exit_loss take a null
// d_temp_storage as a size query (reading only the row counts); the second
// call validates every argument on the host and throws moekit::Error before
// anything is launched; CUDA failures come back as the returned cudaError_t.
// begin() needs no workspace. Device data the host cannot check (the CPU
// backend throws for it): a state row whose original index is outside
// [0, n) is dropped (no result is written for it); a label outside [0, C)
// adds nothing to L_i and gets a zero gradient row (the mean still divides
// by n) and is counted in the optional invalid_labels. gather_rows skips a
// kept index outside the source's rows, so bad data never writes out of
// bounds. Reruns are bit-identical.

#include <cuda_runtime_api.h>
#include <cub/device/device_select.cuh>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <utility>

#include "moekit/core/classification.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cuda/dispatch.cuh"
#include "moekit/cuda/error.cuh"

MOEKIT_NAMESPACE_BEGIN
namespace gpu {

// Results and live-row state (moekit/core/classification.hpp, shared by the backends).
using ::moekit::ExitResults;
using ::moekit::ExitState;

// Arguments of multi_exit_loss (see the top of this file).
template <ActivationElement T>
struct MultiExitLossArgs {
  std::span<const MatrixView<const T>> logits{};  // k exits, each n x C (device)
  VectorView<const std::int32_t> labels{};        // n (device)
  VectorView<const float> exit_weights{};         // k (HOST) or empty: w_i = i + 1
  std::span<const MatrixView<T>> dlogits{};       // empty, or k views (an empty one: not written)
  VectorView<double> exit_losses{};               // k (device) or empty: receives L_i
  double* loss = nullptr;                         // device, required: receives L
  std::int64_t* invalid_labels = nullptr;         // device counter, or null
};

namespace detail {

inline constexpr int kExitThreads = 128;

template <int = 0>
__global__ void __launch_bounds__(kExitThreads)
    exit_begin_kernel(index_t n, ExitState state, ExitResults results) {
  const index_t r = static_cast<index_t>(blockIdx.x) * kExitThreads + threadIdx.x;
  if (r >= n) return;
  state.original[r] = r;
  state.previous[r] = -1;
  state.agree[r] = 0;
  results.exit[r] = -1;
}

// Scratch of one step: survivors' flags and row numbers, and the state
// rows as they will be kept (read by the compaction, so it can write in place).
struct ExitScratch {
  std::uint8_t* flags;
  index_t* rows;
  index_t* original;
  std::int32_t* previous;
  std::int32_t* agree;
};

// One thread per live row: scores, the rules, the result of a row that
// exits; a row that stays is flagged with its next state in the scratch.
template <class T>
__global__ void __launch_bounds__(kExitThreads)
    exit_decide_kernel(MatrixView<const T> logits, ExitCriteria criteria, int exit, bool last,
                       ExitState state, ExitResults results, ExitScratch scratch) {
  const index_t r = static_cast<index_t>(blockIdx.x) * kExitThreads + threadIdx.x;
  if (r >= logits.rows()) return;
  constexpr std::int32_t kMaxAgree = 0x7FFFFFFF;  // the counter saturates
  scratch.rows[r] = r;
  const index_t k = state.original[r];
  if (k < 0 || k >= results.exit.size()) {  // not a sample of this batch: dropped
    scratch.flags[r] = 0;
    return;
  }
  const classify::ExitScores s = classify::exit_scores(logits.row(r), logits.cols());
  const std::int32_t a = state.agree[r];
  const int agree = state.previous[r] != s.top1 ? 0 : (a < kMaxAgree ? a + 1 : a);
  if (last || classify::exit_passes(criteria, s, agree)) {
    results.prediction[k] = s.top1;
    results.confidence[k] = s.confidence;
    results.exit[k] = exit;
    scratch.flags[r] = 0;
  } else {
    scratch.flags[r] = 1;
    scratch.original[r] = k;
    scratch.previous[r] = s.top1;
    scratch.agree[r] = agree;
  }
}

// Live row j < *live takes the state of row kept[j].
template <int = 0>
__global__ void __launch_bounds__(kExitThreads)
    exit_compact_kernel(const index_t* kept, const index_t* live, index_t m, ExitScratch scratch,
                        ExitState state) {
  const index_t j = static_cast<index_t>(blockIdx.x) * kExitThreads + threadIdx.x;
  if (j >= m || j >= *live) return;
  const index_t r = kept[j];
  state.original[j] = scratch.original[r];
  state.previous[j] = scratch.previous[r];
  state.agree[j] = scratch.agree[r];
}

// One warp per kept row: dst[j] = src[kept[j]] for j < *live.
template <class T>
__global__ void __launch_bounds__(kExitThreads)
    gather_rows_kernel(MatrixView<const T> src, const index_t* kept, index_t capacity,
                       const index_t* live, MatrixView<T> dst) {
  constexpr int kWarpsPerBlock = kExitThreads / 32;
  const index_t j = static_cast<index_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (j >= capacity || j >= *live) return;
  const index_t r = kept[j];
  if (r < 0 || r >= src.rows()) return;
  for (index_t c = threadIdx.x % 32; c < src.cols(); c += 32) dst(j, c) = src(r, c);
}

// One exit of multi_exit_loss: per-block CE sums (rows in order), dz rows.
template <class T>
__global__ void __launch_bounds__(kExitThreads)
    exit_loss_kernel(MatrixView<const T> logits, const std::int32_t* labels, float scale,
                     MatrixView<T> dlogits, double* partial, unsigned long long* invalid) {
  __shared__ double row_ce[kExitThreads];
  __shared__ int bad;
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) bad = 0;
  const index_t i = static_cast<index_t>(blockIdx.x) * kExitThreads + t;
  const index_t c = logits.cols();
  row_ce[t] = 0.0;
  __syncthreads();
  if (i < logits.rows()) {
    T* dz = dlogits.empty() ? nullptr : dlogits.row(i);
    const int y = labels[i];
    if (y >= 0 && y < c) {
      row_ce[t] = classify::cross_entropy_row(logits.row(i), c, y, scale, dz);
    } else {
      atomicAdd(&bad, 1);
      if (dz != nullptr) {
        for (index_t k = 0; k < c; ++k) dz[k] = from_float<T>(0.0f);
      }
    }
  }
  __syncthreads();
  if (t != 0) return;
  double sum = 0.0;
  for (int r = 0; r < kExitThreads; ++r) sum += row_ce[r];
  partial[blockIdx.x] = sum;
  if (invalid != nullptr && bad > 0) atomicAdd(invalid, static_cast<unsigned long long>(bad));
}

// L_i = sum / n into exit_losses[i] (when given) and w_i L_i into weighted[i].
template <int = 0>
__global__ void exit_mean_kernel(const double* partial, int blocks, index_t n, double weight,
                                 double* exit_loss, double* weighted) {
  double sum = 0.0;
  for (int b = 0; b < blocks; ++b) sum += partial[b];
  const double mean = n > 0 ? sum / static_cast<double>(n) : 0.0;
  if (exit_loss != nullptr) *exit_loss = mean;
  *weighted = weight * mean;
}

// L = (sum_i w_i L_i, in exit order) / sum_i w_i.
template <int = 0>
__global__ void exit_total_kernel(const double* weighted, int exits, double weight_sum,
                                  double* loss) {
  double total = 0.0;
  for (int i = 0; i < exits; ++i) total += weighted[i];
  *loss = total / weight_sum;
}

}  // namespace detail

// Early exit on device data (cpu::EarlyExit's rules and results): at each
// exit the live rows that pass leave with their prediction and the rest are
// compacted. Holds only the configuration.
class EarlyExit {
 public:
  // Rejects criteria that cannot be meant (as cpu::EarlyExit).
  explicit EarlyExit(const EarlyExitConfig& config) : config_(config) {
    check_early_exit_config(config);
  }

  // The configuration, as constructed.
  const EarlyExitConfig& config() const { return config_; }

  // Starts a batch of n samples: every sample live, in order; results.exit
  // = -1. Throws moekit::Error for a bad argument or a CUDA failure.
  void begin(index_t n, ExitState state, ExitResults results, cudaStream_t stream = nullptr) const {
    MOEKIT_API("gpu::EarlyExit::begin");
    MOEKIT_CHECK_GE(n, 0);
    check_exit_results(results, n);
    check_exit_state(state, n);
    OverlapCheck overlap("gpu::EarlyExit::begin");
    add_exit_outputs(overlap, state, results);
    overlap.check();
    if (n == 0) return;
    detail::exit_begin_kernel<>
        <<<detail::grid_for(n, detail::kExitThreads), detail::kExitThreads, 0, stream>>>(n, state,
                                                                                         results);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }

  // Decides at exit `exit` for the m = logits.rows() live rows (logits: m x
  // C), records the rows that exit and compacts the state; kept[0, m')
  // receives the rows that stay and *num_live (device) m'.
  template <ActivationElement T>
  cudaError_t step(void* d_temp_storage, std::size_t& temp_storage_bytes, int exit,
                   MatrixView<const T> logits, ExitState state, ExitResults results,
                   VectorView<index_t> kept, index_t* num_live,
                   cudaStream_t stream = nullptr) const {
    const index_t m = logits.rows();
    MOEKIT_CHECK_ARG(m >= 0 && m <= std::numeric_limits<std::int32_t>::max(), "logits has ", m,
                     " rows, more than 2^31 - 1");
    // Arguments first: the workspace size asks CUB, which needs a device.
    if (d_temp_storage != nullptr) check_step(exit, logits, state, results, kept, num_live);
    const StepPlan plan = step_plan(m);
    if (detail::size_query(d_temp_storage, temp_storage_bytes, plan.plan.bytes())) {
      return cudaSuccess;
    }
    if (m == 0) return cudaMemsetAsync(num_live, 0, sizeof(index_t), stream);
    const detail::ExitScratch scratch{detail::carve<std::uint8_t>(d_temp_storage, plan.flags),
                                      detail::carve<index_t>(d_temp_storage, plan.rows),
                                      detail::carve<index_t>(d_temp_storage, plan.original),
                                      detail::carve<std::int32_t>(d_temp_storage, plan.previous),
                                      detail::carve<std::int32_t>(d_temp_storage, plan.agree)};
    const int grid = detail::grid_for(m, detail::kExitThreads);
    detail::exit_decide_kernel<T><<<grid, detail::kExitThreads, 0, stream>>>(
        logits, config_.criteria, exit, exit == config_.num_exits - 1, state, results, scratch);
    MOEKIT_CUDA_TRY(cudaGetLastError());
    std::size_t select_bytes = plan.select_bytes;
    MOEKIT_CUDA_TRY(cub::DeviceSelect::Flagged(
        detail::carve<char>(d_temp_storage, plan.select), select_bytes, scratch.rows, scratch.flags,
        kept.data(), num_live, static_cast<std::int64_t>(m), stream));
    detail::exit_compact_kernel<>
        <<<grid, detail::kExitThreads, 0, stream>>>(kept.data(), num_live, m, scratch, state);
    return cudaGetLastError();
  }

 private:
  template <class T>
  void check_step(int exit, MatrixView<const T> logits, ExitState state, ExitResults results,
                  VectorView<index_t> kept, const index_t* num_live) const {
    MOEKIT_API("gpu::EarlyExit::step");
    check_exit_step("gpu::EarlyExit::step", exit, config_.num_exits, logits, state, results, kept);
    MOEKIT_CHECK(num_live != nullptr, Errc::kNullPointer, "num_live is null");
    OverlapCheck overlap("gpu::EarlyExit::step");
    overlap.out(Footprints{{num_live, 1, "num_live"}, {kept, "kept"}})
        .in(Footprints{{logits, "logits"}});
    add_exit_outputs(overlap, state, results);
    overlap.check();
  }

  struct StepPlan {
    detail::WorkspacePlan plan;
    std::size_t flags = 0, rows = 0, original = 0, previous = 0, agree = 0, select = 0;
    std::size_t select_bytes = 0;
  };

  static StepPlan step_plan(index_t m) {
    StepPlan p;
    const std::size_t rows = static_cast<std::size_t>(m);
    p.flags = p.plan.reserve(rows);
    p.rows = p.plan.reserve(rows * sizeof(index_t));
    p.original = p.plan.reserve(rows * sizeof(index_t));
    p.previous = p.plan.reserve(rows * sizeof(std::int32_t));
    p.agree = p.plan.reserve(rows * sizeof(std::int32_t));
    if (m > 0) {
      MOEKIT_CUDA_CHECK(cub::DeviceSelect::Flagged(
          nullptr, p.select_bytes, static_cast<const index_t*>(nullptr),
          static_cast<const std::uint8_t*>(nullptr), static_cast<index_t*>(nullptr),
          static_cast<index_t*>(nullptr), static_cast<std::int64_t>(m)));
    }
    p.select = p.plan.reserve(p.select_bytes);
    return p;
  }

  EarlyExitConfig config_;
};

// Stream compaction out of place: dst row j = src row kept[j] for j <
// *num_live (device), bit for bit; dst rows from *num_live on are not
// touched. kept: what EarlyExit::step wrote (capacity >= the live rows);
// src and dst must not overlap (rows move in parallel). T: any trivially
// copyable element (activations, or labels and task ids as n x 1).
template <class T>
requires std::is_trivially_copyable_v<T> cudaError_t gather_rows(MatrixView<const T> src,
                                                                 VectorView<const index_t> kept,
                                                                 const index_t* num_live,
                                                                 MatrixView<T> dst,
                                                                 cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::gather_rows");
  check_view(src, "src");
  check_view(kept, "kept");
  check_view(dst, "dst");
  MOEKIT_CHECK(kept.size() <= src.rows(), Errc::kShapeMismatch, "kept has ", kept.size(),
               " entries but src has only ", src.rows(), " rows");
  MOEKIT_CHECK(dst.cols() == src.cols() && dst.rows() >= kept.size(), Errc::kShapeMismatch,
               "dst is ", dst.rows(), " x ", dst.cols(), ", need at least ", kept.size(), " x ",
               src.cols());
  MOEKIT_CHECK(num_live != nullptr, Errc::kNullPointer, "num_live is null");
  OverlapCheck("gpu::gather_rows")  // rows move in parallel: out of place only
      .out(Footprints{{dst, "dst"}})
      .in(Footprints{{src, "src"}, {kept, "kept"}, {num_live, 1, "num_live"}})
      .check();
  if (kept.empty() || src.cols() == 0) return cudaSuccess;
  constexpr int kWarpsPerBlock = detail::kExitThreads / 32;
  detail::gather_rows_kernel<T>
      <<<detail::grid_for(kept.size(), kWarpsPerBlock), detail::kExitThreads, 0, stream>>>(
          src, kept.data(), kept.size(), num_live, dst);
  return cudaGetLastError();
}

// The weighted multi-exit loss (see the top of this file).
template <ActivationElement T>
cudaError_t multi_exit_loss(void* d_temp_storage, std::size_t& temp_storage_bytes,
                            const MultiExitLossArgs<T>& args, cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::multi_exit_loss");
  const index_t k = static_cast<index_t>(args.logits.size());
  MOEKIT_CHECK_ARG(k >= 1, "args.logits holds no exits");
  const index_t n = args.logits[0].rows();
  MOEKIT_CHECK_ARG(n >= 0 && n <= std::numeric_limits<std::int32_t>::max(), "args.logits[0] has ",
                   n, " rows, more than 2^31 - 1");
  const int blocks = detail::grid_for(n, detail::kExitThreads);
  detail::WorkspacePlan plan;
  const std::size_t at_partial =
      plan.reserve(static_cast<std::size_t>(k) * static_cast<std::size_t>(blocks) * sizeof(double));
  const std::size_t at_weighted = plan.reserve(static_cast<std::size_t>(k) * sizeof(double));
  if (detail::size_query(d_temp_storage, temp_storage_bytes, plan.bytes())) return cudaSuccess;

  check_view(args.logits[0], "args.logits[0]");
  const index_t c = args.logits[0].cols();
  MOEKIT_CHECK(n == 0 || c >= 1, Errc::kShapeMismatch, "args.logits[0] is ", n, " x ", c,
               ": at least one class is needed");
  for (index_t i = 1; i < k; ++i) {
    MOEKIT_CHECK(args.logits[i].rows() == n && args.logits[i].cols() == c, Errc::kShapeMismatch,
                 "args.logits[", i, "] is ", args.logits[i].rows(), " x ", args.logits[i].cols(),
                 ", expected ", n, " x ", c, " like args.logits[0]");
    check_view(args.logits[i], "args.logits[i]");
  }
  check_shape(args.labels, n, "args.labels");
  double weight_sum = 0.0;
  if (!args.exit_weights.empty()) {
    check_shape(args.exit_weights, k, "args.exit_weights");
    for (index_t i = 0; i < k; ++i) {
      const float w = args.exit_weights[i];
      MOEKIT_CHECK_ARG(std::isfinite(w) && w >= 0.0f, "args.exit_weights[", i, "] = ", w,
                       " must be finite and non-negative");
      weight_sum += w;
    }
    MOEKIT_CHECK_ARG(weight_sum > 0.0, "args.exit_weights sum to 0");
  } else {
    weight_sum = static_cast<double>(k) * static_cast<double>(k + 1) / 2.0;
  }
  if (!args.dlogits.empty()) {
    MOEKIT_CHECK(static_cast<index_t>(args.dlogits.size()) == k, Errc::kShapeMismatch,
                 "args.dlogits holds ", args.dlogits.size(), " views, expected one per exit: ", k);
    for (index_t i = 0; i < k; ++i) {
      if (args.dlogits[i].empty()) continue;
      MOEKIT_CHECK(args.dlogits[i].rows() == n && args.dlogits[i].cols() == c, Errc::kShapeMismatch,
                   "args.dlogits[", i, "] is ", args.dlogits[i].rows(), " x ",
                   args.dlogits[i].cols(), ", expected ", n, " x ", c);
      check_view(args.dlogits[i], "args.dlogits[i]");
    }
  }
  if (!args.exit_losses.empty()) check_shape(args.exit_losses, k, "args.exit_losses");
  MOEKIT_CHECK(args.loss != nullptr, Errc::kNullPointer, "args.loss is null");
  check_multi_exit_overlap("gpu::multi_exit_loss", args.logits, args.labels, {}, args.dlogits,
                           args.exit_losses);
  OverlapCheck("gpu::multi_exit_loss")
      .out(Footprints{
          {args.loss, 1, "args.loss"},
          {args.invalid_labels, args.invalid_labels != nullptr ? 1 : 0, "args.invalid_labels"},
          {args.exit_losses, "args.exit_losses"},
          detail::temp_storage(d_temp_storage, plan.bytes())})
      .in(Footprints{{args.labels, "args.labels"}})
      .check();

  auto* invalid = reinterpret_cast<unsigned long long*>(args.invalid_labels);
  if (invalid != nullptr) MOEKIT_CUDA_TRY(cudaMemsetAsync(invalid, 0, sizeof(*invalid), stream));
  auto* weighted = detail::carve<double>(d_temp_storage, at_weighted);
  for (index_t i = 0; i < k; ++i) {
    const double w = args.exit_weights.empty() ? static_cast<double>(i + 1)
                                               : static_cast<double>(args.exit_weights[i]);
    auto* partial = detail::carve<double>(d_temp_storage, at_partial) + i * blocks;
    if (blocks > 0) {
      const MatrixView<T> dz = args.dlogits.empty() ? MatrixView<T>() : args.dlogits[i];
      const float scale = static_cast<float>(w / (weight_sum * static_cast<double>(n)));
      // Count bad labels once: they are the same rows at every exit.
      detail::exit_loss_kernel<T><<<blocks, detail::kExitThreads, 0, stream>>>(
          args.logits[i], args.labels.data(), scale, dz, partial, i == 0 ? invalid : nullptr);
      MOEKIT_CUDA_TRY(cudaGetLastError());
    }
    detail::exit_mean_kernel<><<<1, 1, 0, stream>>>(
        partial, blocks, n, w, args.exit_losses.empty() ? nullptr : args.exit_losses.data() + i,
        weighted + i);
    MOEKIT_CUDA_TRY(cudaGetLastError());
  }
  detail::exit_total_kernel<>
      <<<1, 1, 0, stream>>>(weighted, static_cast<int>(k), weight_sum, args.loss);
  return cudaGetLastError();
}

}  // namespace gpu
MOEKIT_NAMESPACE_END
