#pragma once
// H task heads on a shared encoder on the CPU backend, for HeadSpec<H>
// (docs/math.md, "Task heads"): forward, softmax cross-entropy per task with fixed or
// uncertainty weighting, per-task accuracy, and backward.
//
// Layout. Head h is a linear classifier with C_h = config.classes[h] classes
// over features of width d = config.d_model. All heads' weights are one
// row-major block, the heads stacked like torch.nn.Linear weights:
//   w  (sum_h C_h) x d   head h's W_h = rows [off_h, off_h + C_h)
//   b  sum_h C_h         head h's b_h = entries [off_h, off_h + C_h)   (config.bias)
// with off_h = C_0 + ... + C_{h-1} (class_offset(h)); head_bank_params<S>
// (nn/param_count.hpp) counts the same parameters.
//
// Samples. Row i of x (n x d) carries a task id tasks[i] in [0, H) and is
// scored by that head only: z_i = W_h x_i + b_h, C_h logits. (With H = 1,
// tasks may be empty: every row is task 0.) Rows are grouped by task with a
// stable counting sort, so each head runs one GEMM over exactly its rows; no
// work is spent on the H - 1 heads a row does not use. If tasks is already
// non-decreasing (batches built task by task) the GEMMs read x and write the
// logits in place with no gather.
//
// Logits. `logits` is n x max_classes(), in the rows' original order: row i
// holds z_i in columns [0, C_{tasks[i]}) and -inf in the rest, so a softmax or
// argmax over the whole padded row equals the one over the head's classes.
//
// Loss (loss()). For task h with n_h > 0 rows in the batch,
//   L_h   = (1 / n_h) sum_{i: tasks[i] = h} CE(z_i, labels[i])      (softmax cross-entropy)
//   acc_h = (1 / n_h) #{i : tasks[i] = h, argmax z_i = labels[i]}   (ties -> lower class)
// A task with no rows is normal: L_h = acc_h = 0, count 0, and it is left out
// of the combination (and gets no gradient). The combination over the
// present tasks P = {h : n_h > 0}:
//   kFixed        L = sum_{h in P} w_h L_h           (w = task_weights, all 1 if empty)
//   kUncertainty  L = sum_{h in P} exp(-s_h) L_h + s_h
//                 (Kendall et al. 2018, the form with s_h = log sigma_h^2 learned and
//                 no 1/2 factors; s = log_vars). dL/ds_h = 1 - exp(-s_h) L_h on P, 0 off P.
// Gradient of L: dL/dz_i = c_h / n_h (softmax(z_i) - onehot(labels[i])), c_h = w_h or
// exp(-s_h); dlogits gets it in columns [0, C_h) and 0 in the padding.
// Each row's CE and softmax run vectorised (cpu::cross_entropy_row,
// cpu/elementwise.hpp: the same bits on every CPU path, a row's values
// independent of the batch but for the scale c_h / n_h); sums run in
// double, over rows in order (deterministic).
//
// Backward (backward()), given dz = dL/dlogits (n x max_classes(); only each
// row's first C_h columns are read), per head over its rows X_h, dZ_h:
//   dW_h = dZ_h^T X_h,   db_h = sum of the rows of dZ_h,   dX_h = dZ_h W_h.
// Any of dx, grads.dw, grads.db may be empty: that output is frozen, not
// computed and not written. dw and db are overwritten, or with
// grads.accumulate added to (a head with no rows then keeps its blocks;
// without accumulate they are set to 0). dx is always overwritten.
//
// Workspace. forward and backward take a caller workspace of at least
// workspace_size(n) bytes (aligned for index_t): the sort permutation and the
// grouped rows of x and of the logits (not for H = 1), and the GEMM engine's
// packing buffers. No call allocates. For n = 0 it is 0.
//
// Products and threading (docs/index.md, "Threads": one pool at a time).
// The logits (fp32) are dot products of a row of x with its head's rows of
// W, by the row kernel (cpu/memory_kernels.hpp's multi_row_dots: register
// tiles of a few rows of x times a few classes, reading x and W in place).
// A head has a few classes, so a GEMM's register blocks (16 columns wide)
// would mostly compute padding. Each logit is summed over d in an order fixed
// by d alone, so a row's logits depend on that row alone, bit for bit,
// whatever the batch, the thread count and the CPU path
// (docs/determinism.md); threads take fixed runs of one head's rows. The
// backward's products (dW_h and dX_h) run on the GEMM engine in fp32
// (cpu/gemm/gemm.hpp), all heads in one grouped call per product: every
// element of dx is one multiply-add chain over C_h in order (row-local as
// well), dW_h and db_h sum over the head's rows in order. Each output
// element is written by one thread, so results are bit-identical run after
// run.
// config.compute = bf16 trains with fp32 master weights, like the experts'
// (cpu/expert_ffn.hpp): the logits then come from the engine too,
// Z_h = X_h W_h^T for all heads in one grouped call, and every product
// (logits, dW_h, dX_h) rounds its two operands to bf16 and sums in fp32 (on
// AMX tiles where the CPU has them). The weights, logits, loss, db and every
// gradient stay fp32, and a row's logits still depend on that row alone
// (one chain over d in an order fixed by d and the path).
//
// Packed heads for inference (pack, then forward with PackedHeadWeights):
// fp32 keeps W as given and runs the forward above (the same bits); bf16
// and int8 pack each head's W_h once (cpu/gemm/packed_matrix.hpp) and
// compute its logits on the engine in that dtype.
// int8: weights quantized per class (per output row of W_h), x per row,
// both symmetric (max |v| / 127), exact int32 sums scaled back to fp32; a
// row's logits still depend on that row alone. The accuracy change against
// fp32 is measured in tests/cpu/test_task_heads.cpp (docs/heads_and_exits.md).
//
// Validation (every call, before anything is written): the configuration
// (constructor: d_model >= 1, every C_h >= 1, naming h; compute fp32 or bf16);
// every view well formed and of the shapes above; task ids in [0, H)
// (Errc::kOutOfRange, naming the row and value); labels in [0, C_{tasks[i]})
// (kOutOfRange, naming row, value and task); b / db empty when config.bias is
// false; task weights finite and >= 0, log-variances finite (kInvalidArgument);
// the workspace large enough (kShapeMismatch) and aligned. Values of x, W and
// the logits are not checked: a NaN gives NaN losses. Strided views work;
// padding columns are untouched.
//
//   const TaskHeads<HeadSpec<3>> heads({.d_model = d, .classes = {10, 4, 7}});
//   std::vector<std::byte> ws(heads.workspace_size(n));
//   heads.forward(x, tasks, {w, b}, logits, ws_view);
//   const TaskLosses<HeadSpec<3>> l = heads.loss(logits, tasks, labels, {}, dlogits);
//   heads.backward(dlogits, x, tasks, {w, b}, dx, {dw, db}, ws_view);

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "moekit/core/classification.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/elementwise.hpp"
#include "moekit/cpu/gemm/gemm.hpp"
#include "moekit/cpu/memory_kernels.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// The heads' configuration; the constructor validates it.
template <HeadSpecType S>
struct TaskHeadsConfig {
  index_t d_model = 0;                          // feature width d
  std::array<index_t, S::num_heads> classes{};  // C_h, each >= 1
  bool bias = true;                             // whether the heads have biases
  GemmDtype compute = GemmDtype::kFloat32;      // the products: fp32 or bf16 ("Products" above)
};

// All heads' parameters (layout at the top of this file).
struct HeadWeights {
  MatrixView<const float> w{};  // (sum C_h) x d
  VectorView<const float> b{};  // sum C_h; empty when config.bias is false
};

// Gradient outputs of the parameters; an empty view is frozen.
struct HeadGrads {
  MatrixView<float> dw{};   // (sum of C_h) x d, the layout of HeadWeights::w
  VectorView<float> db{};   // sum of C_h; empty without bias
  bool accumulate = false;  // add to dw / db instead of overwriting them
};

// Frozen heads prepared once for inference (TaskHeads::pack, then forward
// with them). fp32: all heads' W as given, copied (the row kernel reads it in
// place: nothing to pack). bf16 and int8: head h's W_h^T (d x C_h) as a
// PackedMatrix (cpu/gemm/packed_matrix.hpp). And the biases (sum C_h
// entries, or none).
template <HeadSpecType S>
struct PackedHeadWeights {
  std::vector<float> rows;  // fp32 only: (sum C_h) x d, laid out like HeadWeights::w
  std::array<PackedMatrix, to_size(S::num_heads)> w{};  // bf16 / int8 only: W_h^T, packed
  std::vector<float> b;                                 // the biases, stacked like HeadWeights::b
  // The dtype the heads are prepared in (one for all).
  GemmDtype dtype() const { return rows.empty() ? w[0].dtype() : GemmDtype::kFloat32; }
};

// How loss() combines the per-task losses (core/classification.hpp).
using ::moekit::TaskWeighting;
using ::moekit::TaskWeights;

// What loss() returns: the combined loss and per-task statistics.
template <HeadSpecType S>
struct TaskLosses {
  double total = 0.0;                           // L, the combination
  std::array<double, S::num_heads> loss{};      // L_h (0 without rows)
  std::array<double, S::num_heads> accuracy{};  // acc_h (0 without rows)
  std::array<index_t, S::num_heads> count{};    // n_h
};

// Per-row results of loss(), for per-example metrics (confusion matrices,
// error analysis) without a second pass: n entries each; an empty view is
// not written. predicted[i] = argmax of row i over its head's classes (ties
// -> lower class; the prediction acc_h counts), loss[i] = CE(z_i, labels[i]).
struct TaskLossRows {
  VectorView<std::int32_t> predicted{};  // argmax over the row's head's classes
  VectorView<double> loss{};             // the row's cross-entropy
};

// H linear classification heads over a shared feature (see the top of this file).
template <HeadSpecType S>
class TaskHeads {
 public:
  static constexpr int kHeads = S::num_heads;  // H

  // Rejects a configuration it cannot run (naming the field, head and value).
  explicit TaskHeads(const TaskHeadsConfig<S>& config) : config_(config) {
    MOEKIT_CHECK_ARG(config.d_model >= 1, "config.d_model = ", config.d_model,
                     " must be at least 1");
    check_training_dtype(config.compute, "config.compute");
    offsets_[0] = 0;
    for (std::size_t h = 0; h < kHeads; ++h) {
      MOEKIT_CHECK_ARG(config.classes[h] >= 1, "config.classes[", h, "] = ", config.classes[h],
                       " must be at least 1");
      offsets_[h + 1] = offsets_[h] + config.classes[h];
      max_classes_ = config.classes[h] > max_classes_ ? config.classes[h] : max_classes_;
    }
  }

  // The configuration it was built with.
  const TaskHeadsConfig<S>& config() const { return config_; }
  // d, the feature width.
  index_t d_model() const { return config_.d_model; }
  // C_h, the classes of head h.
  index_t classes(int h) const { return config_.classes[to_size(h)]; }
  // First row of head h in w (and entry in b).
  index_t class_offset(int h) const { return offsets_[to_size(h)]; }
  // Rows of w: sum_h C_h.
  index_t total_classes() const { return offsets_[kHeads]; }
  // Columns of the logits: max_h C_h.
  index_t max_classes() const { return max_classes_; }
  // The parameters these heads hold (total, per-sample active, trainable).
  ParamCount params() const {
    return head_bank_params<S>(config_.d_model, config_.classes, config_.bias);
  }

  // Bytes of workspace forward and backward need for n rows: the sort
  // permutation (n index_t) and the grouped rows (n (d + max C) floats),
  // neither for H = 1, where rows never need grouping; and the GEMM engine's
  // buffers, one slot per OpenMP thread at the time of the query. 0 for n = 0.
  index_t workspace_size(index_t rows) const {
    MOEKIT_CHECK_GE(rows, 0);
    if (rows == 0) return 0;
    return grouped_bytes(rows) + gemm_workspace_size(max_threads());
  }

  // logits = per-row head scores (padded with -inf, see the top of this file).
  // x: n x d, tasks: n (or empty for H = 1), logits: n x max_classes().
  void forward(MatrixView<const float> x, VectorView<const std::int32_t> tasks,
               const HeadWeights& weights, MatrixView<float> logits,
               VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::TaskHeads::forward");
    check_weights(weights);
    const index_t n = check_forward_views(x, tasks, logits, workspace);
    OverlapCheck("cpu::TaskHeads::forward")
        .out({{logits, "logits"}, {workspace.segment(0, workspace_size(n)), "workspace"}})
        .in({{x, "x"}, {tasks, "tasks"}, {weights.w, "weights.w"}, {weights.b, "weights.b"}})
        .check();

    if (config_.compute == GemmDtype::kFloat32) {
      row_forward(x, tasks, weights.w, weights.b, logits, workspace);
    } else {
      engine_forward(
          {.dtype = config_.compute, .op_a = Op::kNone, .op_b = Op::kTrans}, x, tasks,
          [&](int h) { return GemmOperands{.b = w_of(weights, h)}; }, weights.b, logits, workspace);
    }
  }

  // Packs frozen heads once for the inference forward below, in `dtype`
  // (allocates): head h's W_h^T as a PackedMatrix, the biases copied. int8:
  // each class's weights get their own scale (per output row of W). Checks
  // the weights as forward does.
  PackedHeadWeights<S> pack(const HeadWeights& weights, GemmDtype dtype) const {
    MOEKIT_API("cpu::TaskHeads::pack");
    check_weights(weights);
    MOEKIT_CHECK_ARG(is_gemm_dtype(dtype), "dtype = ", static_cast<int>(dtype),
                     " is not a GemmDtype");
    PackedHeadWeights<S> p;
    if (dtype == GemmDtype::kFloat32) {
      p.rows.resize(to_size(total_classes() * config_.d_model));
      as_eigen(MatrixView<float>(p.rows.data(), total_classes(), config_.d_model)) =
          as_eigen(weights.w);
    } else {
      for (int h = 0; h < kHeads; ++h)
        p.w[to_size(h)] = PackedMatrix(dtype, Op::kTrans, w_of(weights, h));
    }
    p.b.assign(weights.b.begin(), weights.b.end());
    return p;
  }

  // Inference forward on packed heads: the logits as forward writes them,
  // with the products in the weights' dtype (int8: x quantized per row,
  // symmetric, by the engine). The same arguments and workspace as forward.
  void forward(MatrixView<const float> x, VectorView<const std::int32_t> tasks,
               const PackedHeadWeights<S>& weights, MatrixView<float> logits,
               VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::TaskHeads::forward");
    check_packed(weights);
    const index_t n = check_forward_views(x, tasks, logits, workspace);
    OverlapCheck("cpu::TaskHeads::forward")
        .out({{logits, "logits"}, {workspace.segment(0, workspace_size(n)), "workspace"}})
        .in({{x, "x"}, {tasks, "tasks"}})
        .check();
    const VectorView<const float> b(weights.b.data(), static_cast<index_t>(weights.b.size()));
    if (weights.dtype() == GemmDtype::kFloat32) {
      const MatrixView<const float> w(weights.rows.data(), total_classes(), config_.d_model);
      row_forward(x, tasks, w, b, logits, workspace);
    } else {
      engine_forward(
          {.dtype = weights.dtype(), .op_a = Op::kNone, .op_b = Op::kNone}, x, tasks,
          [&](int h) { return GemmOperands{.packed = &weights.w[to_size(h)]}; }, b, logits,
          workspace);
    }
  }

 private:
  // Rows of one head per run of the fp32 forward (a thread's unit of work).
  static constexpr index_t kHeadRows = 64;

  // The fp32 forward after validation: per head, fixed runs of its rows (in
  // the plan's order; nothing is gathered), each run's logits by the row
  // kernel, then the bias and the -inf padding.
  void row_forward(MatrixView<const float> x, VectorView<const std::int32_t> tasks,
                   MatrixView<const float> w, VectorView<const float> b, MatrixView<float> logits,
                   VectorView<std::byte> workspace) const {
    const index_t n = x.rows();
    const Plan plan = make_plan(tasks, n, workspace);
    std::array<index_t, to_size(kHeads + 1)> run_offsets{};  // head h's runs start here
    for (int h = 0; h < kHeads; ++h) {
      run_offsets[to_size(h + 1)] =
          run_offsets[to_size(h)] + (plan.rows(h) + kHeadRows - 1) / kHeadRows;
    }
    const index_t runs = run_offsets[to_size(kHeads)];
    [[maybe_unused]] const bool parallel = n * config_.d_model * max_classes_ > kParallelGrain;
    MOEKIT_PARALLEL_FOR_IF(parallel)
    for (index_t r = 0; r < runs; ++r) {
      int h = 0;
      while (run_offsets[to_size(h + 1)] <= r) ++h;
      const index_t first = plan.first(h) + (r - run_offsets[to_size(h)]) * kHeadRows;
      const index_t count = std::min(kHeadRows, plan.first(h + 1) - first);
      const float* rows_x[kHeadRows];
      float* rows_z[kHeadRows];
      for (index_t k = 0; k < count; ++k) {
        const index_t i = plan.sorted ? first + k : plan.perm[first + k];
        rows_x[k] = x.row(i);
        rows_z[k] = logits.row(i);
      }
      with_vec_path([&](auto path) {
        multi_row_dots(path, w.middle_rows(class_offset(h), classes(h)), rows_x, rows_z, count);
      });
      const index_t c = classes(h);
      for (index_t k = 0; k < count; ++k) {
        float* out = rows_z[k];
        if (!b.empty()) {
          for (index_t j = 0; j < c; ++j) out[j] += b[class_offset(h) + j];
        }
        for (index_t j = c; j < max_classes_; ++j) out[j] = -routing::kInf;
      }
    }
  }

  // The bf16 / int8 forward after validation: Z_h = X_h W_h^T for every head
  // in one grouped product on the engine (weight_of(h): GemmOperands with
  // only head h's W_h, from a view or packed, set), the biases (b: all
  // heads', or empty), then the logits scattered to the rows' order and
  // padded with -inf.
  template <class WeightOf>
  void engine_forward(const GemmSpec& spec, MatrixView<const float> x,
                      VectorView<const std::int32_t> tasks, WeightOf&& weight_of,
                      VectorView<const float> b, MatrixView<float> logits,
                      VectorView<std::byte> workspace) const {
    const index_t n = x.rows();
    const Plan plan = make_plan(tasks, n, workspace);
    const MatrixView<float> gx = grouped_x(workspace, n);
    const MatrixView<float> gz = grouped_z(workspace, n);
    if (!plan.sorted) gather(x, plan, gx);
    const auto z_of = [&](int h) {
      const index_t r0 = plan.first(h), rows = plan.rows(h);
      return plan.sorted ? logits.block(r0, 0, rows, classes(h))
                         : gz.block(r0, 0, rows, classes(h));
    };
    gemm_grouped(
        spec, kHeads,
        [&](index_t g) {
          const int h = static_cast<int>(g);
          GemmOperands o = weight_of(h);
          o.a = grouped_rows(x, gx, plan, h);
          o.c = z_of(h);
          return o;
        },
        engine_workspace(workspace, n));
    if (!b.empty()) {
      for (int h = 0; h < kHeads; ++h) {
        if (plan.rows(h) > 0)
          as_eigen(z_of(h)).rowwise() +=
              as_eigen(b.segment(class_offset(h), classes(h))).transpose();
      }
    }
    // Scatter back to the original order (when grouped) and pad with -inf.
    MOEKIT_PARALLEL_FOR_IF(n * max_classes_ > kLightParallelGrain)
    for (index_t j = 0; j < n; ++j) {
      const index_t i = plan.sorted ? j : plan.perm[j];
      const index_t c = classes(task_of(tasks, i));
      float* out = logits.row(i);
      if (!plan.sorted) {
        const float* src = gz.row(j);
        for (index_t k = 0; k < c; ++k) out[k] = src[k];
      }
      for (index_t k = c; k < max_classes_; ++k) out[k] = -routing::kInf;
    }
  }

 public:
  // Per-task cross-entropy, accuracy and counts, and the combined loss (see
  // the top of this file). logits: n x max_classes() as forward wrote them
  // (only each row's first C_h columns are read); labels: n. dlogits (n x
  // max_classes()) receives dL/dlogits unless empty; dlog_vars (H) receives
  // dL/ds for kUncertainty unless empty (must be empty for kFixed); `rows`
  // receives each row's prediction and loss (TaskLossRows).
  TaskLosses<S> loss(MatrixView<const float> logits, VectorView<const std::int32_t> tasks,
                     VectorView<const std::int32_t> labels, const TaskWeights& weighting = {},
                     MatrixView<float> dlogits = {}, VectorView<float> dlog_vars = {},
                     const TaskLossRows& rows = {}) const {
    MOEKIT_API("cpu::TaskHeads::loss");
    check_view(logits, "logits");
    const index_t n = logits.rows();
    check_shape(logits, n, max_classes_, "logits");
    check_tasks(tasks, n);
    check_labels(labels, tasks, n);
    check_weighting(weighting, dlog_vars);
    if (!dlogits.empty()) check_shape(dlogits, n, max_classes_, "dlogits");
    if (!rows.predicted.empty()) check_shape(rows.predicted, n, "rows.predicted");
    if (!rows.loss.empty()) check_shape(rows.loss, n, "rows.loss");
    OverlapCheck("cpu::TaskHeads::loss")
        .out({{dlogits, "dlogits"},
              {dlog_vars, "dlog_vars"},
              {rows.predicted, "rows.predicted"},
              {rows.loss, "rows.loss"}})
        .in({{logits, "logits"},
             {tasks, "tasks"},
             {labels, "labels"},
             {weighting.fixed, "weighting.fixed"},
             {weighting.log_vars, "weighting.log_vars"}})
        .check();

    const std::array<index_t, to_size(kHeads)> count = task_counts(tasks, n);
    LossSums sums;
    add_loss_rows(logits, tasks, labels, count, weighting, sums, dlogits, rows);
    return finish_loss(count, sums, weighting, dlog_vars);
  }

  // loss() in its three parts, for a batch whose rows are split over the
  // ranks of an expert-parallel group: the rows per task (summed over the
  // ranks: integers), the rows' losses and hits added to running sums in row
  // order (passed from rank to rank, so the sums are those of one process),
  // and the per-task means and their combination. The arguments are those
  // of loss(), checked by it; these parts check only their own.
  struct LossSums {
    // Per head, the sum of the rows' cross-entropies.
    std::array<double, to_size(kHeads)> loss{};
    // Per head, the rows predicted right.
    std::array<double, to_size(kHeads)> correct{};
  };

  // n_h, the rows of each task among the n rows of tasks.
  std::array<index_t, to_size(kHeads)> task_counts(VectorView<const std::int32_t> tasks,
                                                   index_t n) const {
    check_tasks(tasks, n);
    std::array<index_t, to_size(kHeads)> count{};
    for (index_t i = 0; i < n; ++i) ++count[to_size(task_of(tasks, i))];
    return count;
  }

  // Adds the rows' cross-entropies and hits to `sums` and writes their
  // gradient rows, scaled by c_h / n_h with n_h from `count` (the batch's),
  // and, unless empty, each row's prediction and loss (TaskLossRows).
  void add_loss_rows(MatrixView<const float> logits, VectorView<const std::int32_t> tasks,
                     VectorView<const std::int32_t> labels,
                     const std::array<index_t, to_size(kHeads)>& count,
                     const TaskWeights& weighting, LossSums& sums, MatrixView<float> dlogits = {},
                     const TaskLossRows& rows = {}) const {
    MOEKIT_API("cpu::TaskHeads::add_loss_rows");
    const index_t n = logits.rows();
    check_shape(logits, n, max_classes_, "logits");
    check_tasks(tasks, n);
    check_labels(labels, tasks, n);
    check_weighting(weighting, {});
    if (!dlogits.empty()) check_shape(dlogits, n, max_classes_, "dlogits");
    if (!rows.predicted.empty()) check_shape(rows.predicted, n, "rows.predicted");
    if (!rows.loss.empty()) check_shape(rows.loss, n, "rows.loss");
    // c_h / n_h, the gradient scale of each task's rows.
    std::array<float, to_size(kHeads)> scale{};
    for (std::size_t h = 0; h < kHeads; ++h) {
      if (count[h] == 0) continue;
      scale[h] = static_cast<float>(coefficient(weighting, h) / static_cast<double>(count[h]));
    }
    for (index_t i = 0; i < n; ++i) {
      const int task = task_of(tasks, i);
      const std::size_t h = to_size(task);
      const index_t c = classes(task);
      const float* z = logits.row(i);
      float* dz = dlogits.empty() ? nullptr : dlogits.row(i);
      const double ce = cross_entropy_row(z, c, labels[i], scale[h], dz);
      const auto predicted = static_cast<std::int32_t>(classify::argmax(z, c));
      sums.loss[h] += ce;
      sums.correct[h] += predicted == labels[i] ? 1.0 : 0.0;
      if (!rows.predicted.empty()) rows.predicted[i] = predicted;
      if (!rows.loss.empty()) rows.loss[i] = ce;
      if (dz != nullptr) {
        for (index_t k = c; k < max_classes_; ++k) dz[k] = 0.0f;
      }
    }
  }

  // The per-task means, accuracies and the combined loss from the batch's counts and sums
  // (dlog_vars as in loss()).
  TaskLosses<S> finish_loss(const std::array<index_t, to_size(kHeads)>& count, const LossSums& sums,
                            const TaskWeights& weighting = {},
                            VectorView<float> dlog_vars = {}) const {
    check_weighting(weighting, dlog_vars);
    TaskLosses<S> out;
    out.count = count;
    for (std::size_t h = 0; h < kHeads; ++h) {
      const auto v = static_cast<index_t>(h);  // log_vars and dlog_vars are views
      if (out.count[h] > 0) {
        const double n = static_cast<double>(out.count[h]);
        out.loss[h] = sums.loss[h] / n;
        out.accuracy[h] = sums.correct[h] / n;
        out.total += coefficient(weighting, h) * out.loss[h];
        if (weighting.kind == TaskWeighting::kUncertainty) out.total += weighting.log_vars[v];
      }
      if (!dlog_vars.empty()) {
        dlog_vars[v] = out.count[h] > 0
                           ? static_cast<float>(1.0 - coefficient(weighting, h) * out.loss[h])
                           : 0.0f;
      }
    }
    return out;
  }

  // Backward of forward given dlogits = dL/dlogits (n x max_classes()); see
  // the top of this file. dx: n x d or empty; grads: HeadGrads.
  void backward(MatrixView<const float> dlogits, MatrixView<const float> x,
                VectorView<const std::int32_t> tasks, const HeadWeights& weights,
                MatrixView<float> dx, const HeadGrads& grads,
                VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::TaskHeads::backward");
    check_view(x, "x");
    const index_t n = x.rows();
    const index_t d = config_.d_model;
    check_shape(x, n, d, "x");
    check_tasks(tasks, n);
    check_weights(weights);
    check_shape(dlogits, n, max_classes_, "dlogits");
    const bool want_dx = !dx.empty(), want_dw = !grads.dw.empty(), want_db = !grads.db.empty();
    check_head_backward_outputs(dx, grads.dw, grads.db, n, d, total_classes(), config_.bias);
    check_workspace(workspace, n);
    OverlapCheck overlap("cpu::TaskHeads::backward");
    add_head_backward_args(overlap, dlogits, x, tasks, weights, dx, grads);
    overlap.out({{workspace.segment(0, workspace_size(n)), "workspace"}}).check();

    const Plan plan = make_plan(tasks, n, workspace);
    if (!grads.accumulate) {  // heads without rows: zero gradient blocks
      for (int h = 0; h < kHeads; ++h) {
        if (plan.rows(h) != 0) continue;
        if (want_dw) as_eigen(grads.dw.middle_rows(class_offset(h), classes(h))).setZero();
        if (want_db) as_eigen(grads.db.segment(class_offset(h), classes(h))).setZero();
      }
    }
    if (!want_dx && !want_dw && !want_db) return;

    const MatrixView<float> gx = grouped_x(workspace, n);
    const MatrixView<float> gz = grouped_z(workspace, n);
    if (!plan.sorted) {
      if (want_dw) gather(x, plan, gx);
      MOEKIT_PARALLEL_FOR_IF(n * max_classes_ > kLightParallelGrain)
      for (index_t j = 0; j < n; ++j) {
        const index_t i = plan.perm[j];
        const index_t c = classes(task_of(tasks, i));
        const float* src = dlogits.row(i);
        float* dst = gz.row(j);
        for (index_t k = 0; k < c; ++k) dst[k] = src[k];
      }
    }
    const bool acc = grads.accumulate;
    const VectorView<std::byte> engine = engine_workspace(workspace, n);
    // dZ_h: this head's rows of dlogits, in place or grouped.
    const auto dz_of = [&](int h) {
      const index_t r0 = plan.first(h), rows = plan.rows(h);
      return plan.sorted ? dlogits.block(r0, 0, rows, classes(h))
                         : MatrixView<const float>(gz.block(r0, 0, rows, classes(h)));
    };
    // dW_h (= or +=) dZ_h^T X_h; heads without rows take no part (their
    // blocks were zeroed above or are kept).
    if (want_dw) {
      gemm_grouped(
          {.dtype = config_.compute,
           .op_a = Op::kTrans,
           .op_b = Op::kNone,
           .alpha = 1.0f,
           .beta = acc ? 1.0f : 0.0f},
          kHeads,
          [&](index_t g) {
            const int h = static_cast<int>(g);
            if (plan.rows(h) == 0) return GemmOperands{};
            return GemmOperands{dz_of(h), grouped_rows(x, gx, plan, h), nullptr, 0,
                                grads.dw.middle_rows(class_offset(h), classes(h))};
          },
          engine);
    }
    // db_h (= or +=) the sum of dZ_h's rows, in row order.
    if (want_db) {
      for (int h = 0; h < kHeads; ++h) {
        if (plan.rows(h) == 0) continue;
        add_column_sums(dz_of(h), grads.db.segment(class_offset(h), classes(h)), acc);
      }
    }
    // dX_h = dZ_h W_h, into dx directly or over the grouped x (read above).
    if (want_dx) {
      gemm_grouped(
          {.dtype = config_.compute, .op_a = Op::kNone, .op_b = Op::kNone}, kHeads,
          [&](index_t g) {
            const int h = static_cast<int>(g);
            const index_t r0 = plan.first(h), rows = plan.rows(h);
            return GemmOperands{dz_of(h), w_of(weights, h), nullptr, 0,
                                plan.sorted ? dx.middle_rows(r0, rows) : gx.middle_rows(r0, rows)};
          },
          engine);
    }
    if (want_dx && !plan.sorted) {
      MOEKIT_PARALLEL_FOR_IF(n * d > kLightParallelGrain)
      for (index_t j = 0; j < n; ++j)
        as_eigen(dx.row_view(plan.perm[j])) = as_eigen(gx.row_view(j));
    }
  }

 private:
  // Rows grouped by task: head h owns grouped rows [offsets[h], offsets[h + 1]),
  // grouped row j is original row perm[j] (unused when sorted: the identity).
  struct Plan {
    std::array<index_t, to_size(kHeads + 1)> offsets{};
    const index_t* perm = nullptr;
    bool sorted = true;
    index_t first(int h) const { return offsets[to_size(h)]; }
    index_t rows(int h) const { return first(h + 1) - first(h); }
  };

  static int task_of(VectorView<const std::int32_t> tasks, index_t i) {
    return tasks.empty() ? 0 : tasks[i];
  }

  void check_tasks(VectorView<const std::int32_t> tasks, index_t n) const {
    if (kHeads == 1 && tasks.empty()) return;
    check_shape(tasks, n, "tasks");
    for (index_t i = 0; i < n; ++i) {
      MOEKIT_CHECK(tasks[i] >= 0 && tasks[i] < kHeads, Errc::kOutOfRange, "tasks[", i,
                   "] = ", tasks[i], " is outside [0, H = ", kHeads, ")");
    }
  }

  // Labels in range of their row's head (tasks already checked).
  void check_labels(VectorView<const std::int32_t> labels, VectorView<const std::int32_t> tasks,
                    index_t n) const {
    check_shape(labels, n, "labels");
    for (index_t i = 0; i < n; ++i) {
      const int h = task_of(tasks, i);
      MOEKIT_CHECK(labels[i] >= 0 && labels[i] < classes(h), Errc::kOutOfRange, "labels[", i,
                   "] = ", labels[i], " is outside [0, ", classes(h), ") (classes of task ", h,
                   ")");
    }
  }

  void check_packed(const PackedHeadWeights<S>& p) const {
    if (p.dtype() == GemmDtype::kFloat32) {
      const index_t want = total_classes() * config_.d_model;
      MOEKIT_CHECK(static_cast<index_t>(p.rows.size()) == want, Errc::kShapeMismatch,
                   "weights.rows has ", p.rows.size(), " entries, expected ", want,
                   " (TaskHeads::pack)");
    } else {
      for (int h = 0; h < kHeads; ++h) {
        const std::string name = "weights.w[" + std::to_string(h) + "]";
        detail::check_packed_matrix("cpu::TaskHeads::forward", p.w[to_size(h)], 1, config_.d_model,
                                    classes(h), p.dtype(), name.c_str(), "weights.w[0]",
                                    "TaskHeads::pack");
      }
    }
    const index_t want = config_.bias ? total_classes() : 0;
    MOEKIT_CHECK(static_cast<index_t>(p.b.size()) == want, Errc::kShapeMismatch, "weights.b has ",
                 p.b.size(), " entries, expected ", want, " (TaskHeads::pack)");
  }

  void check_weights(const HeadWeights& w) const {
    check_shape(w.w, total_classes(), config_.d_model, "weights.w");
    if (config_.bias) {
      check_shape(w.b, total_classes(), "weights.b");
    } else {
      MOEKIT_CHECK(w.b.empty(), Errc::kInvalidArgument, "weights.b has ", w.b.size(),
                   " elements but must be empty: config.bias is false");
    }
  }

  static void check_weighting(const TaskWeights& w, VectorView<float> dlog_vars) {
    check_task_weights(w, kHeads, dlog_vars);
  }

  // What both forwards check of x, tasks, logits and the workspace; n.
  index_t check_forward_views(MatrixView<const float> x, VectorView<const std::int32_t> tasks,
                              MatrixView<float> logits, VectorView<std::byte> workspace) const {
    check_view(x, "x");
    const index_t n = x.rows();
    check_shape(x, n, config_.d_model, "x");
    check_tasks(tasks, n);
    check_shape(logits, n, max_classes_, "logits");
    check_workspace(workspace, n);
    return n;
  }

  void check_workspace(VectorView<std::byte> workspace, index_t n) const {
    const index_t need = workspace_size(n);
    if (need == 0) return;
    check_view(workspace, "workspace");
    MOEKIT_CHECK(workspace.size() >= need, Errc::kShapeMismatch, "workspace has ", workspace.size(),
                 " bytes, workspace_size(", n, ") = ", need);
    MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace.data()) % alignof(index_t) == 0,
                 Errc::kInvalidArgument, "workspace is not aligned to ", alignof(index_t),
                 " bytes");
  }

  // c_h: the weight of task h's loss in L.
  static double coefficient(const TaskWeights& w, std::size_t h) {
    return task_coefficient(w, static_cast<int>(h));
  }

  // Stable counting sort of the rows by task (tasks validated).
  Plan make_plan(VectorView<const std::int32_t> tasks, index_t n,
                 VectorView<std::byte> workspace) const {
    Plan plan;
    std::array<index_t, to_size(kHeads)> count{};
    for (index_t i = 0; i < n; ++i) {
      ++count[to_size(task_of(tasks, i))];
      plan.sorted = plan.sorted && (i == 0 || task_of(tasks, i) >= task_of(tasks, i - 1));
    }
    for (std::size_t h = 0; h < kHeads; ++h) plan.offsets[h + 1] = plan.offsets[h] + count[h];
    if (plan.sorted) return plan;
    index_t* perm = reinterpret_cast<index_t*>(workspace.data());
    std::array<index_t, to_size(kHeads)> fill{};
    for (std::size_t h = 0; h < kHeads; ++h) fill[h] = plan.offsets[h];
    for (index_t i = 0; i < n; ++i) perm[fill[to_size(tasks[i])]++] = i;
    plan.perm = perm;
    return plan;
  }

  // Bytes of the sort permutation and the grouped rows (0 for H = 1), rounded
  // up for the engine's workspace that follows.
  index_t grouped_bytes(index_t n) const {
    if (kHeads == 1) return 0;
    return detail::round_up(n * index_t{sizeof(index_t)} +
                                n * (config_.d_model + max_classes_) * index_t{sizeof(float)},
                            detail::kSlotAlign);
  }
  // The GEMM engine's part of the workspace: the rest.
  VectorView<std::byte> engine_workspace(VectorView<std::byte> workspace, index_t n) const {
    if (n == 0) return {};
    const index_t skip = grouped_bytes(n);
    return workspace.segment(skip, workspace.size() - skip);
  }

  // The grouped rows of x (n x d) and of the logits (n x max C) in the workspace.
  MatrixView<float> grouped_x(VectorView<std::byte> workspace, index_t n) const {
    if (kHeads == 1 || n == 0) return {};
    float* base = reinterpret_cast<float*>(workspace.data() + n * index_t{sizeof(index_t)});
    return MatrixView<float>(base, n, config_.d_model);
  }
  MatrixView<float> grouped_z(VectorView<std::byte> workspace, index_t n) const {
    if (kHeads == 1 || n == 0) return {};
    float* base = reinterpret_cast<float*>(workspace.data() + n * index_t{sizeof(index_t)}) +
                  n * config_.d_model;
    return MatrixView<float>(base, n, max_classes_);
  }

  // Head h's rows of x: in place when sorted, else grouped in gx.
  static MatrixView<const float> grouped_rows(MatrixView<const float> x, MatrixView<float> gx,
                                              const Plan& plan, int h) {
    const index_t r0 = plan.first(h), rows = plan.rows(h);
    return plan.sorted ? x.middle_rows(r0, rows)
                       : MatrixView<const float>(gx.middle_rows(r0, rows));
  }

  static void gather(MatrixView<const float> x, const Plan& plan, MatrixView<float> gx) {
    const index_t n = x.rows();
    MOEKIT_PARALLEL_FOR_IF(n * x.cols() > kLightParallelGrain)
    for (index_t j = 0; j < n; ++j) as_eigen(gx.row_view(j)) = as_eigen(x.row_view(plan.perm[j]));
  }

  MatrixView<const float> w_of(const HeadWeights& w, int h) const {
    return w.w.middle_rows(class_offset(h), classes(h));
  }
  VectorView<const float> b_of(const HeadWeights& w, int h) const {
    return w.b.segment(class_offset(h), classes(h));
  }

  TaskHeadsConfig<S> config_;
  std::array<index_t, to_size(kHeads + 1)> offsets_{};
  index_t max_classes_ = 0;
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
