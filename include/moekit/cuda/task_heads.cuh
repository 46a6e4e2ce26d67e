#pragma once
// H task heads on a shared encoder on the CUDA backend, for HeadSpec<H> and
// elements T (fp32, bf16, fp16): forward, per-task softmax cross-entropy with
// fixed or uncertainty weighting, per-task accuracy, and backward. The math,
// weight layout and gradient rules of moekit/cpu/task_heads.hpp (docs/math.md):
//
//   w  (sum_h C_h) x d   head h's W_h = rows [off_h, off_h + C_h)     (row-major)
//   b  sum_h C_h         head h's b_h (config.bias)
//   z_i = W_h x_i + b_h  for row i of task h = tasks[i]; logits n x max_h C_h,
//                        in the rows' original order, padded with -inf
//   L_h = mean CE over task h's rows, acc_h, n_h; tasks with no rows are left out
//   kFixed L = sum_{n_h > 0} w_h L_h;  kUncertainty L = sum_{n_h > 0} exp(-s_h) L_h + s_h
//   dL/dz_i = c_h / n_h (softmax(z_i) - onehot(y_i)), 0 in the padding
//   dW_h = dZ_h^T X_h,  db_h = column sums of dZ_h,  dX_h = dZ_h W_h
//
// How (why this design). Heads are thin: C_h is a handful to a few thousand
// classes, so a head's GEMM is memory-bound on x. The forward therefore
// needs no grouping: one warp per row reads x_i once per 4 classes of ITS
// head (coalesced, lanes over d), reduces with warp shuffles in a fixed
// order and writes the row's logits and padding in place. No sort, no host
// shapes, no synchronisation, no work for the H - 1 heads a row does not use;
// dX is the same pattern (one warp per row, lanes over d). Only dW and db
// must sum over a head's rows: a stable cub::DeviceRadixSort of the task ids
// groups the rows on the device (its offsets found on the device too), and
// one block per (head, 8 classes, 128 columns) sums its head's rows in
// increasing row order. cuBLAS grouped GEMM would need the per-head row
// counts on the host (a synchronisation per call, as gpu::ExpertFfn takes);
// for vocabulary-sized heads (C_h in the tens of thousands) it would be the
// faster choice and is not done here.
//
// Loss. One thread per row runs classify::cross_entropy_row and
// classify::argmax (core/classification.hpp, the CPU's code) on the row in
// place. Counts n_h come first (a pass over tasks and labels), so that the
// gradient scale c_h / n_h is known when the row writes dlogits. Per-task
// sums are per-block partials (double, rows in order) added in block order
// by one finalising block: deterministic, no float atomics. Results land in
// DEVICE memory (TaskLosses<S> below, one small struct: copy it back when
// you want to print it), so nothing synchronises. The task weights (H fixed
// weights or log-variances) are read on the HOST, validated as on the CPU,
// and travel as kernel arguments; keep learned log-variances on the host or
// copy them back (H floats) before the call.
//
// Element types. x, w, b, logits, dlogits, dx, dw, db are T; dot products
// and sums run in fp32 (loss sums in double) and round once to T.
//
// Device data the host cannot check: a task id outside [0, H) or a label
// outside [0, C_h) (the CPU backend throws kOutOfRange for both). Such a row
// gets NaN logits in forward, is left out of every loss sum and count with a
// zero dlogits row, gets a zero dx row and adds nothing to dW and db; it is
// counted in `invalid_rows` (forward) and TaskLosses::invalid_rows (loss).
//
// Conventions (as gpu::ExpertFfn): the calls validate every argument on the
// host first and throw moekit::Error (naming the argument and values) before
// anything is launched, and throw for a CUDA failure afterwards; all data
// pointers are device memory (except the task weights); every call takes a
// stream and nothing synchronises or allocates. forward needs no workspace;
// loss and backward take one of loss_workspace_size(n) /
// backward_workspace_size(n) bytes, 256-byte aligned. backward_workspace_size
// asks CUB for its sort storage, so it needs the current device. Reruns are
// bit-identical. H is limited to kMaxGpuHeads (the per-head tables travel as
// kernel arguments).
//
//   const gpu::TaskHeads<HeadSpec<3>, __nv_bfloat16> heads({.d_model = d, .classes = {10, 4, 7}});
//   heads.forward(x, tasks, {w, b}, logits, nullptr, stream);
//   heads.loss(logits, tasks, labels, {}, d_losses, dlogits, {}, ws, ws_bytes, stream);
//   heads.backward(dlogits, x, tasks, {w, b}, dx, {dw, db}, ws2, ws2_bytes, stream);

#include <cuda_runtime_api.h>
#include <cub/device/device_radix_sort.cuh>

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "moekit/core/classification.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cuda/dispatch.cuh"
#include "moekit/cuda/error.cuh"
#include "moekit/cuda/warp.cuh"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace gpu {

// The most heads the GPU heads take (their tables are kernel arguments).
inline constexpr int kMaxGpuHeads = 512;

// The heads' shapes (as cpu::TaskHeadsConfig).
template <HeadSpecType S>
struct TaskHeadsConfig {
  index_t d_model = 0;                          // feature width d
  std::array<index_t, S::num_heads> classes{};  // C_h, each >= 1
  bool bias = true;                             // whether the heads have a bias b
};

// All heads' parameters, device memory (layout at the top).
template <ActivationElement T>
struct HeadWeights {
  MatrixView<const T> w{};  // (sum C_h) x d
  VectorView<const T> b{};  // sum C_h; empty when config.bias is false
};

// Gradient outputs of the parameters, device memory; an empty view is frozen.
template <ActivationElement T>
struct HeadGrads {
  MatrixView<T> dw{};       // (sum C_h) x d, as weights.w
  VectorView<T> db{};       // sum C_h; empty when config.bias is false
  bool accumulate = false;  // add to dw / db instead of overwriting them
};

// What loss() writes to DEVICE memory: cpu::TaskLosses plus the count of
// rows left out for a bad task id or label.
template <HeadSpecType S>
struct TaskLosses {
  static constexpr int kHeads = S::num_heads;  // H, the length of the per-head arrays
  double total;                                // L, the combination
  double loss[kHeads];                         // L_h (0 without rows)
  double accuracy[kHeads];                     // acc_h (0 without rows)
  std::int64_t count[kHeads];                  // n_h
  std::int64_t invalid_rows;                   // rows with a task id or label out of range
};

namespace detail {

inline constexpr int kHeadThreads = 256;  // block size of the head kernels
inline constexpr int kHeadWarps = kHeadThreads / 32;
inline constexpr int kClassGroup = 4;     // classes per pass over x_i (forward)
inline constexpr int kGradClasses = 8;    // classes per dW block
inline constexpr int kGradColumns = 128;  // columns per dW block (its threads)

// Per-head constants, passed by value.
template <int H>
struct HeadTable {
  std::int32_t classes[H];
  index_t offset[H + 1];  // first row of head h in w
};

// Per-head loss coefficients c_h and log-variances (kUncertainty), by value.
template <int H>
struct LossTable {
  double coefficient[H];
  float log_var[H];
  bool uncertainty;
};

// Row i's head, or -1 for an id outside [0, H) (tasks null: H = 1, all 0).
template <int H>
MOEKIT_DEVICE int head_of(const std::int32_t* tasks, index_t i) {
  if (tasks == nullptr) return 0;
  const int h = tasks[i];
  return h >= 0 && h < H ? h : -1;
}

inline int warp_rows_grid(index_t rows) {
  const index_t blocks = (rows + kHeadWarps - 1) / kHeadWarps;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

inline int thread_rows_grid(index_t rows) {
  return static_cast<int>((rows + kHeadThreads - 1) / kHeadThreads);
}

// One warp per row: z_i = W_h x_i + b_h, kClassGroup classes per pass over
// x_i; padding -inf; a row with a bad task id gets NaN everywhere.
template <int H, class T>
__global__ void __launch_bounds__(kHeadThreads)
    heads_forward_kernel(MatrixView<const T> x, const std::int32_t* tasks, MatrixView<const T> w,
                         const T* b, HeadTable<H> table, MatrixView<T> logits,
                         unsigned long long* invalid) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const index_t d = x.cols(), width = logits.cols();
  const index_t stride = static_cast<index_t>(gridDim.x) * kHeadWarps;
  for (index_t i = static_cast<index_t>(blockIdx.x) * kHeadWarps + threadIdx.x / 32; i < x.rows();
       i += stride) {
    const int h = head_of<H>(tasks, i);
    T* out = logits.row(i);
    if (h < 0) {
      for (index_t k = lane; k < width; k += 32) {
        out[k] = from_float<T>(__int_as_float(0x7FC00000)) /* quiet NaN */;
      }
      if (lane == 0 && invalid != nullptr) atomicAdd(invalid, 1ull);
      continue;
    }
    const index_t classes = table.classes[h], first = table.offset[h];
    const T* xi = x.row(i);
    for (index_t c0 = 0; c0 < classes; c0 += kClassGroup) {
      const int group = static_cast<int>(classes - c0 < kClassGroup ? classes - c0 : kClassGroup);
      float acc[kClassGroup] = {};
      for (index_t k = lane; k < d; k += 32) {
        const float v = to_float(xi[k]);
        for (int j = 0; j < kClassGroup; ++j) {
          if (j < group) acc[j] += v * to_float(w(first + c0 + j, k));
        }
      }
      for (int j = 0; j < kClassGroup; ++j) {
        const float z = warp_sum(acc[j]);
        if (lane == j && j < group) {
          out[c0 + j] = from_float<T>(b != nullptr ? z + to_float(b[first + c0 + j]) : z);
        }
      }
    }
    for (index_t k = classes + lane; k < width; k += 32) {
      out[k] = from_float<T>(-routing::kInf);
    }
  }
}

// One warp per row: dx_i = dz_i[0, C_h) W_h (lanes over d); 0 for a bad row.
template <int H, class T>
__global__ void __launch_bounds__(kHeadThreads)
    heads_input_grad_kernel(MatrixView<const T> dz, const std::int32_t* tasks,
                            MatrixView<const T> w, HeadTable<H> table, MatrixView<T> dx) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const index_t d = dx.cols();
  const index_t stride = static_cast<index_t>(gridDim.x) * kHeadWarps;
  for (index_t i = static_cast<index_t>(blockIdx.x) * kHeadWarps + threadIdx.x / 32; i < dx.rows();
       i += stride) {
    const int h = head_of<H>(tasks, i);
    const index_t classes = h >= 0 ? table.classes[h] : 0, first = h >= 0 ? table.offset[h] : 0;
    const T* g = dz.row(i);
    for (index_t k = lane; k < d; k += 32) {
      float acc = 0.0f;
      for (index_t c = 0; c < classes; ++c) acc += to_float(g[c]) * to_float(w(first + c, k));
      dx(i, k) = from_float<T>(acc);
    }
  }
}

// Sort keys: the head of each row, H for a bad id (sorted after all heads);
// values: the row index.
template <int H>
__global__ void __launch_bounds__(kHeadThreads)
    heads_sort_keys_kernel(const std::int32_t* tasks, index_t n, std::uint32_t* keys,
                           std::int32_t* rows) {
  const index_t i = static_cast<index_t>(blockIdx.x) * kHeadThreads + threadIdx.x;
  if (i >= n) return;
  const int h = head_of<H>(tasks, i);
  keys[i] = static_cast<std::uint32_t>(h >= 0 ? h : H);
  rows[i] = static_cast<std::int32_t>(i);
}

// offsets[h] = the first sorted position whose key is >= h, h = 0..H: each
// boundary j between keys prev < cur writes the heads in (prev, cur].
template <int H>
__global__ void __launch_bounds__(kHeadThreads)
    heads_segment_offsets_kernel(const std::uint32_t* keys, index_t n, index_t* offsets) {
  const index_t j = static_cast<index_t>(blockIdx.x) * kHeadThreads + threadIdx.x;
  if (j > n) return;
  const int prev = j > 0 ? static_cast<int>(keys[j - 1]) : -1;
  const int cur = j < n ? static_cast<int>(keys[j]) : H;
  for (int h = prev + 1; h <= cur && h <= H; ++h) offsets[h] = j;
}

// dW and db: block (column tile, class tile, head) sums over its head's rows
// in sorted (= increasing row) order; thread t owns column k of 8 classes,
// and in the first column tile, threads t < 8 also own db of class c0 + t.
// Class tiles beyond the grid's y (at most 65,535: 524,280 classes) are
// taken by the same block, gridDim.y tiles further on each time.
// A head with no rows writes 0 (or, accumulating, leaves its values).
template <int H, class T>
__global__ void __launch_bounds__(kGradColumns)
    heads_weight_grad_kernel(MatrixView<const T> dz, MatrixView<const T> x,
                             const std::int32_t* sorted_rows, const index_t* row_offsets,
                             HeadTable<H> table, MatrixView<T> dw, T* db, bool accumulate) {
  const int h = static_cast<int>(blockIdx.z);
  const index_t classes = table.classes[h];
  const int t = static_cast<int>(threadIdx.x);
  const index_t k = static_cast<index_t>(blockIdx.x) * kGradColumns + t;
  for (index_t c0 = static_cast<index_t>(blockIdx.y) * kGradClasses; c0 < classes;
       c0 += static_cast<index_t>(gridDim.y) * kGradClasses) {
    const int group = static_cast<int>(classes - c0 < kGradClasses ? classes - c0 : kGradClasses);
    const bool do_w = !dw.empty() && k < x.cols();
    const bool do_b = db != nullptr && blockIdx.x == 0 && t < group;
    if (!do_w && !do_b) return;  // later tiles are no wider: nothing there either
    float acc[kGradClasses] = {};
    float bias_sum = 0.0f;
    for (index_t j = row_offsets[h]; j < row_offsets[h + 1]; ++j) {
      const index_t i = sorted_rows[j];
      const T* g = dz.row(i) + c0;
      if (do_w) {
        const float v = to_float(x(i, k));
        for (int q = 0; q < kGradClasses; ++q) {
          if (q < group) acc[q] += to_float(g[q]) * v;
        }
      }
      if (do_b) bias_sum += to_float(g[t]);
    }
    const index_t first = table.offset[h] + c0;
    if (do_w) {
      for (int q = 0; q < group; ++q) {
        T& out = dw(first + q, k);
        out = from_float<T>(accumulate ? to_float(out) + acc[q] : acc[q]);
      }
    }
    if (do_b) {
      T& out = db[first + t];
      out = from_float<T>(accumulate ? to_float(out) + bias_sum : bias_sum);
    }
  }
}

// heads_weight_grad_kernel's grid: column tiles (one without dW), class
// tiles up to CUDA's 65,535 in y (the kernel loops over the rest), heads.
inline dim3 weight_grad_grid(index_t d, index_t max_classes, int heads, bool want_dw) {
  const index_t columns = want_dw ? (d + kGradColumns - 1) / kGradColumns : 1;
  const index_t tiles = (max_classes + kGradClasses - 1) / kGradClasses;
  return {static_cast<unsigned>(columns > 0 ? columns : 1),
          static_cast<unsigned>(tiles < 65535 ? (tiles > 0 ? tiles : 1) : 65535),
          static_cast<unsigned>(heads)};
}

// Whether row i is valid for the loss; its head in h.
template <int H>
MOEKIT_DEVICE bool loss_row(const std::int32_t* tasks, const std::int32_t* labels,
                            const HeadTable<H>& table, index_t i, int& h) {
  h = head_of<H>(tasks, i);
  return h >= 0 && labels[i] >= 0 && labels[i] < table.classes[h];
}

// Loss pass one: valid rows per head and bad rows, per block (integers).
template <int H>
__global__ void __launch_bounds__(kHeadThreads)
    heads_count_kernel(const std::int32_t* tasks, const std::int32_t* labels, index_t n,
                       HeadTable<H> table, std::int32_t* counts, std::int32_t* invalid) {
  __shared__ int hist[H];
  __shared__ int bad;
  for (int h = static_cast<int>(threadIdx.x); h < H; h += kHeadThreads) hist[h] = 0;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  const index_t i = static_cast<index_t>(blockIdx.x) * kHeadThreads + threadIdx.x;
  if (i < n) {
    int h;
    if (loss_row<H>(tasks, labels, table, i, h)) {
      atomicAdd(&hist[h], 1);  // integer counts: order does not matter
    } else {
      atomicAdd(&bad, 1);
    }
  }
  __syncthreads();
  for (int h = static_cast<int>(threadIdx.x); h < H; h += kHeadThreads) {
    counts[static_cast<index_t>(blockIdx.x) * H + h] = hist[h];
  }
  if (threadIdx.x == 0) invalid[blockIdx.x] = bad;
}

// n_h in block order and each task's gradient scale c_h / n_h (as the CPU).
template <int H>
__global__ void __launch_bounds__(kHeadThreads)
    heads_scale_kernel(const std::int32_t* counts, int blocks, LossTable<H> loss_table,
                       std::int64_t* count, float* scale) {
  for (int h = static_cast<int>(threadIdx.x); h < H; h += kHeadThreads) {
    std::int64_t c = 0;
    for (int blk = 0; blk < blocks; ++blk) c += counts[static_cast<index_t>(blk) * H + h];
    count[h] = c;
    scale[h] =
        c > 0 ? static_cast<float>(loss_table.coefficient[h] / static_cast<double>(c)) : 0.0f;
  }
}

// Loss pass two: one thread per row runs classify::cross_entropy_row (and
// writes its dlogits row); per-block, per-head sums of CE (rows in order)
// and of correct predictions.
template <int H, class T>
__global__ void __launch_bounds__(kHeadThreads)
    heads_cross_entropy_kernel(MatrixView<const T> logits, const std::int32_t* tasks,
                               const std::int32_t* labels, HeadTable<H> table, const float* scale,
                               MatrixView<T> dlogits, double* ce_partial,
                               std::int32_t* correct_partial) {
  __shared__ double row_ce[kHeadThreads];
  __shared__ int row_head[kHeadThreads];
  __shared__ int row_correct[kHeadThreads];
  const int t = static_cast<int>(threadIdx.x);
  const index_t first = static_cast<index_t>(blockIdx.x) * kHeadThreads;
  const index_t i = first + t;
  row_head[t] = -1;
  if (i < logits.rows()) {
    int h;
    T* dz = dlogits.empty() ? nullptr : dlogits.row(i);
    index_t written = 0;  // dlogits columns written by the row function
    if (loss_row<H>(tasks, labels, table, i, h)) {
      const index_t classes = table.classes[h];
      const T* z = logits.row(i);
      row_ce[t] = classify::cross_entropy_row(z, classes, labels[i], scale[h], dz);
      row_correct[t] = classify::argmax(z, classes) == labels[i];
      row_head[t] = h;
      written = classes;
    }
    if (dz != nullptr) {
      for (index_t k = written; k < dlogits.cols(); ++k) dz[k] = from_float<T>(0.0f);
    }
  }
  __syncthreads();
  const int rows =
      static_cast<int>(logits.rows() - first < kHeadThreads ? logits.rows() - first : kHeadThreads);
  for (int h = t; h < H; h += kHeadThreads) {
    double sum = 0.0;
    int correct = 0;
    for (int r = 0; r < rows; ++r) {
      if (row_head[r] != h) continue;
      sum += row_ce[r];
      correct += row_correct[r];
    }
    ce_partial[static_cast<index_t>(blockIdx.x) * H + h] = sum;
    correct_partial[static_cast<index_t>(blockIdx.x) * H + h] = correct;
  }
}

// One block: per-task means in block order, the combination in head order
// (the CPU's expression, term by term), dL/ds, the bad-row count.
template <HeadSpecType S>
__global__ void __launch_bounds__(kHeadThreads)
    heads_finalize_kernel(const double* ce_partial, const std::int32_t* correct_partial,
                          const std::int32_t* invalid_partial, const std::int64_t* count,
                          int blocks, LossTable<S::num_heads> loss_table, TaskLosses<S>* out,
                          float* dlog_vars) {
  constexpr int H = S::num_heads;
  __shared__ double task_loss[H];
  for (int h = static_cast<int>(threadIdx.x); h < H; h += kHeadThreads) {
    double sum = 0.0;
    std::int64_t correct = 0;
    for (int blk = 0; blk < blocks; ++blk) {
      sum += ce_partial[static_cast<index_t>(blk) * H + h];
      correct += correct_partial[static_cast<index_t>(blk) * H + h];
    }
    const std::int64_t c = count[h];
    const double n = static_cast<double>(c);
    task_loss[h] = c > 0 ? sum / n : 0.0;
    out->loss[h] = task_loss[h];
    out->accuracy[h] = c > 0 ? static_cast<double>(correct) / n : 0.0;
    out->count[h] = c;
    if (dlog_vars != nullptr) {
      dlog_vars[h] =
          c > 0 ? static_cast<float>(1.0 - loss_table.coefficient[h] * task_loss[h]) : 0.0f;
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  double total = 0.0;
  for (int h = 0; h < H; ++h) {
    if (count[h] == 0) continue;
    total += loss_table.coefficient[h] * task_loss[h];
    if (loss_table.uncertainty) total += loss_table.log_var[h];
  }
  std::int64_t invalid = 0;
  for (int blk = 0; blk < blocks; ++blk) invalid += invalid_partial[blk];
  out->total = total;
  out->invalid_rows = invalid;
}

}  // namespace detail

// H linear classification heads over a shared feature on device data (the
// math at the top). Holds the configuration and the class table only.
template <HeadSpecType S, ActivationElement T>
class TaskHeads {
 public:
  static constexpr int kHeads = S::num_heads;  // H
  static_assert(kHeads <= kMaxGpuHeads, "gpu::TaskHeads takes at most kMaxGpuHeads heads");

  // Rejects a configuration it cannot run (naming the field, head and value).
  explicit TaskHeads(const TaskHeadsConfig<S>& config) : config_(config) {
    MOEKIT_CHECK_ARG(config.d_model >= 1, "config.d_model = ", config.d_model,
                     " must be at least 1");
    table_.offset[0] = 0;
    for (int h = 0; h < kHeads; ++h) {
      MOEKIT_CHECK_ARG(config.classes[h] >= 1 && config.classes[h] <= 0x7FFFFFFF, "config.classes[",
                       h, "] = ", config.classes[h], " must be in [1, 2^31)");
      table_.classes[h] = static_cast<std::int32_t>(config.classes[h]);
      table_.offset[h + 1] = table_.offset[h] + config.classes[h];
      max_classes_ = config.classes[h] > max_classes_ ? config.classes[h] : max_classes_;
    }
  }

  // The configuration it was built with.
  const TaskHeadsConfig<S>& config() const { return config_; }
  // d, the feature width.
  index_t d_model() const { return config_.d_model; }
  // C_h, the classes of head h.
  index_t classes(int h) const { return config_.classes[h]; }
  // First row of head h in w (and entry in b).
  index_t class_offset(int h) const { return table_.offset[h]; }
  // Rows of w: sum_h C_h.
  index_t total_classes() const { return table_.offset[kHeads]; }
  // Columns of the logits: max_h C_h.
  index_t max_classes() const { return max_classes_; }
  // The parameters these heads hold (total, per-sample active, trainable).
  ParamCount params() const {
    return head_bank_params<S>(config_.d_model, config_.classes, config_.bias);
  }

  // Bytes of workspace loss() needs for n rows: per-block partial sums.
  std::size_t loss_workspace_size(index_t rows) const {
    check_rows(rows);
    return loss_plan(rows).plan.bytes();
  }

  // Bytes of workspace backward() needs for n rows when it computes dW or
  // db: the sort of the task ids (keys, rows, CUB's storage) and the head
  // offsets. Asks CUB, so it needs the current device.
  std::size_t backward_workspace_size(index_t rows) const {
    check_rows(rows);
    return backward_plan(rows).plan.bytes();
  }

  // logits = per-row head scores, padded with -inf. x: n x d; tasks: n (or
  // empty for H = 1); logits: n x max_classes(). invalid_rows (device, or
  // null) receives the count of rows with a task id outside [0, H).
  void forward(MatrixView<const T> x, VectorView<const std::int32_t> tasks,
               const HeadWeights<T>& weights, MatrixView<T> logits,
               std::int64_t* invalid_rows = nullptr, cudaStream_t stream = nullptr) const {
    MOEKIT_API("gpu::TaskHeads::forward");
    check_view(x, "x");
    const index_t n = x.rows();
    check_shape(x, n, config_.d_model, "x");
    check_tasks(tasks, n);
    check_weights(weights);
    check_shape(logits, n, max_classes_, "logits");
    OverlapCheck("gpu::TaskHeads::forward")
        .out(Footprints{{logits, "logits"},
                        {invalid_rows, invalid_rows != nullptr ? 1 : 0, "invalid_rows"}})
        .in(Footprints{
            {x, "x"}, {tasks, "tasks"}, {weights.w, "weights.w"}, {weights.b, "weights.b"}})
        .check();
    auto* invalid = reinterpret_cast<unsigned long long*>(invalid_rows);
    if (invalid != nullptr)
      MOEKIT_CUDA_CHECK(cudaMemsetAsync(invalid, 0, sizeof(*invalid), stream));
    if (n == 0) return;
    detail::heads_forward_kernel<kHeads, T>
        <<<detail::warp_rows_grid(n), detail::kHeadThreads, 0, stream>>>(
            x, task_pointer(tasks), weights.w, bias_pointer(weights.b), table_, logits, invalid);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }

  // Per-task CE, accuracy and counts and the combined loss, into `result`
  // (device, required). logits: n x max_classes() as forward wrote them;
  // labels: n (device). dlogits (n x max_classes()) receives dL/dlogits
  // unless empty; dlog_vars (device, H) receives dL/ds for kUncertainty
  // unless empty. weighting: HOST arrays (see the top).
  void loss(MatrixView<const T> logits, VectorView<const std::int32_t> tasks,
            VectorView<const std::int32_t> labels, const TaskWeights& weighting,
            TaskLosses<S>* result, MatrixView<T> dlogits, VectorView<float> dlog_vars,
            void* workspace, std::size_t workspace_bytes, cudaStream_t stream = nullptr) const {
    MOEKIT_API("gpu::TaskHeads::loss");
    check_view(logits, "logits");
    const index_t n = logits.rows();
    check_shape(logits, n, max_classes_, "logits");
    check_tasks(tasks, n);
    check_shape(labels, n, "labels");
    check_task_weights(weighting, kHeads, dlog_vars);
    if (!dlogits.empty()) check_shape(dlogits, n, max_classes_, "dlogits");
    MOEKIT_CHECK(result != nullptr, Errc::kNullPointer, "result is null");
    const LossPlan lp = loss_plan(n);
    check_workspace(workspace, workspace_bytes, lp.plan.bytes(), n);
    OverlapCheck("gpu::TaskHeads::loss")
        .out(Footprints{{dlogits, "dlogits"},
                        {dlog_vars, "dlog_vars"},
                        {result, 1, "result"},
                        detail::temp_storage(workspace, lp.plan.bytes())})
        .in(Footprints{{logits, "logits"}, {tasks, "tasks"}, {labels, "labels"}})
        .check();

    detail::LossTable<kHeads> loss_table{};
    loss_table.uncertainty = weighting.kind == TaskWeighting::kUncertainty;
    for (int h = 0; h < kHeads; ++h) {
      loss_table.coefficient[h] = task_coefficient(weighting, h);
      loss_table.log_var[h] = loss_table.uncertainty ? weighting.log_vars[h] : 0.0f;
    }
    auto* counts = detail::carve<std::int32_t>(workspace, lp.counts);
    auto* invalid = detail::carve<std::int32_t>(workspace, lp.invalid);
    auto* count = detail::carve<std::int64_t>(workspace, lp.count);
    auto* scale = detail::carve<float>(workspace, lp.scale);
    auto* ce = detail::carve<double>(workspace, lp.ce);
    auto* correct = detail::carve<std::int32_t>(workspace, lp.correct);
    const std::int32_t* task_ids = task_pointer(tasks);
    if (lp.blocks > 0) {
      detail::heads_count_kernel<kHeads><<<lp.blocks, detail::kHeadThreads, 0, stream>>>(
          task_ids, labels.data(), n, table_, counts, invalid);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
    detail::heads_scale_kernel<kHeads>
        <<<1, detail::kHeadThreads, 0, stream>>>(counts, lp.blocks, loss_table, count, scale);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    if (lp.blocks > 0) {
      detail::heads_cross_entropy_kernel<kHeads, T><<<lp.blocks, detail::kHeadThreads, 0, stream>>>(
          logits, task_ids, labels.data(), table_, scale, dlogits, ce, correct);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
    detail::heads_finalize_kernel<S><<<1, detail::kHeadThreads, 0, stream>>>(
        ce, correct, invalid, count, lp.blocks, loss_table, result,
        dlog_vars.empty() ? nullptr : dlog_vars.data());
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }

  // Backward of forward given dlogits (n x max_classes(); only each row's
  // first C_h columns are read). dx: n x d or empty (overwritten); grads:
  // HeadGrads. The workspace (backward_workspace_size(n)) is needed only
  // when dw or db is wanted; otherwise it may be null.
  void backward(MatrixView<const T> dlogits, MatrixView<const T> x,
                VectorView<const std::int32_t> tasks, const HeadWeights<T>& weights,
                MatrixView<T> dx, const HeadGrads<T>& grads, void* workspace,
                std::size_t workspace_bytes, cudaStream_t stream = nullptr) const {
    MOEKIT_API("gpu::TaskHeads::backward");
    check_view(x, "x");
    const index_t n = x.rows();
    const index_t d = config_.d_model;
    check_shape(x, n, d, "x");
    check_tasks(tasks, n);
    check_weights(weights);
    check_shape(dlogits, n, max_classes_, "dlogits");
    const bool want_dx = !dx.empty(), want_dw = !grads.dw.empty(), want_db = !grads.db.empty();
    check_head_backward_outputs(dx, grads.dw, grads.db, n, d, total_classes(), config_.bias);
    OverlapCheck overlap("gpu::TaskHeads::backward");
    add_head_backward_args(overlap, dlogits, x, tasks, weights, dx, grads);
    const std::int32_t* task_ids = task_pointer(tasks);
    if (!want_dw && !want_db) overlap.check();  // no workspace
    if (want_dw || want_db) {
      check_workspace(workspace, workspace_bytes, 0, n);  // before CUB, which needs a device
      const BackwardPlan bp = backward_plan(n);
      check_workspace(workspace, workspace_bytes, bp.plan.bytes(), n);
      overlap.out(Footprints{detail::temp_storage(workspace, bp.plan.bytes())}).check();
      auto* keys_in = detail::carve<std::uint32_t>(workspace, bp.keys_in);
      auto* keys_out = detail::carve<std::uint32_t>(workspace, bp.keys_out);
      auto* rows_in = detail::carve<std::int32_t>(workspace, bp.rows_in);
      auto* rows_out = detail::carve<std::int32_t>(workspace, bp.rows_out);
      auto* offsets = detail::carve<index_t>(workspace, bp.offsets);
      if (n > 0) {
        detail::heads_sort_keys_kernel<kHeads>
            <<<detail::thread_rows_grid(n), detail::kHeadThreads, 0, stream>>>(task_ids, n, keys_in,
                                                                               rows_in);
        MOEKIT_CUDA_CHECK(cudaGetLastError());
        std::size_t sort_bytes = bp.sort_bytes;
        MOEKIT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
            detail::carve<char>(workspace, bp.sort), sort_bytes, keys_in, keys_out, rows_in,
            rows_out, static_cast<std::int64_t>(n), 0, kKeyBits, stream));
      }
      detail::heads_segment_offsets_kernel<kHeads>
          <<<detail::thread_rows_grid(n + 1), detail::kHeadThreads, 0, stream>>>(keys_out, n,
                                                                                 offsets);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
      const dim3 grid = detail::weight_grad_grid(d, max_classes_, kHeads, want_dw);
      detail::heads_weight_grad_kernel<kHeads, T><<<grid, detail::kGradColumns, 0, stream>>>(
          dlogits, x, rows_out, offsets, table_, grads.dw, want_db ? grads.db.data() : nullptr,
          grads.accumulate);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
    if (want_dx && n > 0) {
      detail::heads_input_grad_kernel<kHeads, T>
          <<<detail::warp_rows_grid(n), detail::kHeadThreads, 0, stream>>>(dlogits, task_ids,
                                                                           weights.w, table_, dx);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
  }

 private:
  // Bits of the sort keys 0..H (H marks a bad id).
  static constexpr int kKeyBits = [] {
    int bits = 1;
    while ((1 << bits) <= kHeads) ++bits;
    return bits;
  }();

  struct LossPlan {
    detail::WorkspacePlan plan;
    int blocks = 0;
    std::size_t counts = 0, invalid = 0, count = 0, scale = 0, ce = 0, correct = 0;
  };
  LossPlan loss_plan(index_t rows) const {
    LossPlan p;
    p.blocks = detail::thread_rows_grid(rows);
    const std::size_t cells = static_cast<std::size_t>(p.blocks) * kHeads;
    p.counts = p.plan.reserve(cells * sizeof(std::int32_t));
    p.invalid = p.plan.reserve(static_cast<std::size_t>(p.blocks) * sizeof(std::int32_t));
    p.count = p.plan.reserve(kHeads * sizeof(std::int64_t));
    p.scale = p.plan.reserve(kHeads * sizeof(float));
    p.ce = p.plan.reserve(cells * sizeof(double));
    p.correct = p.plan.reserve(cells * sizeof(std::int32_t));
    return p;
  }

  struct BackwardPlan {
    detail::WorkspacePlan plan;
    std::size_t keys_in = 0, keys_out = 0, rows_in = 0, rows_out = 0, offsets = 0, sort = 0;
    std::size_t sort_bytes = 0;
  };
  BackwardPlan backward_plan(index_t rows) const {
    BackwardPlan p;
    const std::size_t ints = static_cast<std::size_t>(rows) * sizeof(std::int32_t);
    p.keys_in = p.plan.reserve(ints);
    p.keys_out = p.plan.reserve(ints);
    p.rows_in = p.plan.reserve(ints);
    p.rows_out = p.plan.reserve(ints);
    p.offsets = p.plan.reserve((kHeads + 1) * sizeof(index_t));
    if (rows > 0) {
      MOEKIT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
          nullptr, p.sort_bytes, static_cast<const std::uint32_t*>(nullptr),
          static_cast<std::uint32_t*>(nullptr), static_cast<const std::int32_t*>(nullptr),
          static_cast<std::int32_t*>(nullptr), static_cast<std::int64_t>(rows), 0, kKeyBits));
    }
    p.sort = p.plan.reserve(p.sort_bytes);
    return p;
  }

  static void check_rows(index_t rows) {
    MOEKIT_CHECK_ARG(rows >= 0 && rows <= std::numeric_limits<std::int32_t>::max(), "rows = ", rows,
                     " must be in [0, 2^31)");
  }

  static const std::int32_t* task_pointer(VectorView<const std::int32_t> tasks) {
    return tasks.empty() ? nullptr : tasks.data();
  }
  static const T* bias_pointer(VectorView<const T> b) { return b.empty() ? nullptr : b.data(); }

  void check_tasks(VectorView<const std::int32_t> tasks, index_t n) const {
    check_rows(n);
    if (kHeads == 1 && tasks.empty()) return;
    check_shape(tasks, n, "tasks");
  }

  void check_weights(const HeadWeights<T>& w) const {
    check_shape(w.w, total_classes(), config_.d_model, "weights.w");
    if (config_.bias) {
      check_shape(w.b, total_classes(), "weights.b");
    } else {
      MOEKIT_CHECK(w.b.empty(), Errc::kInvalidArgument, "weights.b has ", w.b.size(),
                   " elements but must be empty: config.bias is false");
    }
  }

  static void check_workspace(void* workspace, std::size_t bytes, std::size_t need, index_t n) {
    MOEKIT_CHECK(workspace != nullptr, Errc::kNullPointer, "workspace is null");
    MOEKIT_CHECK(bytes >= need, Errc::kShapeMismatch, "workspace has ", bytes, " bytes, ", need,
                 " are needed for ", n, " rows");
    MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace) % detail::kWorkspaceAlignment == 0,
                 Errc::kInvalidArgument, "workspace is not ", detail::kWorkspaceAlignment,
                 "-byte aligned");
  }

  TaskHeadsConfig<S> config_;
  detail::HeadTable<kHeads> table_{};
  index_t max_classes_ = 0;
};

}  // namespace gpu
MOEKIT_NAMESPACE_END
