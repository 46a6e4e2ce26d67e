#pragma once
// Expert FFNs over the expert-major buffer on the CPU backend (a grouped GEMM),
// forward and backward, for MoeSpec<E, K>.
//
// Layout. The buffer (N x d, from cpu::dispatch) holds expert e's rows in
// [offsets[e], offsets[e + 1]) (offsets: E + 1 entries, as dispatch_offsets
// writes them). Weights are row-major like torch.nn.Linear, one contiguous
// block per matrix with the experts stacked:
//   w1  (E d_ff) x d     expert e's W1 = rows [e d_ff, (e + 1) d_ff)
//   w3  (E d_ff) x d     gated only (same layout), empty for kPlain
//   w2  (E d) x d_ff     expert e's W2 = rows [e d, (e + 1) d)
//
// The math, for the rows X of expert e (act = config.activation, see
// moekit/core/activation.hpp):
//   a = X W1^T                          (the pre-activation, n_e x d_ff)
//   kPlain  h = act(a)
//   kGated  g = X W3^T,  h = act(a) * g  (element-wise; SwiGLU / GeGLU)
//   y = h W2^T                          (n_e x d)
// Backward, given dy = dL/dy:
//   dh = dy W2,   dW2 = dy^T h
//   kPlain  da = dh * act'(a)
//   kGated  da = dh * g * act'(a),  dg = dh * act(a),  dW3 = dg^T X
//   dW1 = da^T X,   dx = da W1 (+ dg W3 for kGated)
//
// Saved activations. forward writes a into `saved_pre` and (kGated) g into
// `saved_gate` (N x d_ff each, caller memory); backward reads them and
// recomputes h, so nothing else is kept between the calls. For inference,
// pass empty views: a and g then live in the workspace.
//
// Workspace. Both calls take a caller workspace of workspace_size(N) bytes
// (float-aligned): 2 N d_ff floats, which hold h in forward and dh/da, h/dg
// in backward, and the GEMM engine's packing buffers for max_threads()
// threads at the time of the query (cpu/gemm/gemm.hpp; a call with more
// threads runs on as many as the workspace holds, with the same results).
// No call allocates.
//
// Gradients. Any of dx and grads.dw1/dw3/dw2 may be an empty view: that
// output is frozen, no work is done for it and nothing is written there
// (dh is computed only when dx, dw1 or dw3 is wanted). Weight gradients are
// written (overwrite) or, with grads.accumulate, added by the GEMM itself
// (beta = 1): acc = old + new up to the rounding of that one addition. An
// expert with no rows costs nothing; its gradient blocks are set to 0
// (overwrite) or left unchanged (accumulate). dx is always overwritten
// (dispatch_backward accumulates into the token gradient).
//
// Products. Every product is one grouped call of moekit's GEMM engine
// (cpu/gemm/gemm.hpp) over all experts, on the widest CPU path, in
// config.compute: fp32, or bf16 (both operands rounded to bf16 as the
// engine packs them, fp32 sums and outputs; on AMX tiles where the CPU has
// them). bf16 compute trains with fp32 master weights: the weights, the
// saved activations, the element-wise passes and every gradient stay fp32;
// only the products' inputs are rounded:
//   forward   a (and g) = X W1^T (W3^T), y = h W2^T
//   backward  dW2 = dy^T h, dh = dy W2, dW1 (dW3) = da^T X (dg^T X),
//             dx = da W1 (+ dg W3, added by a second product with beta = 1)
// with the element-wise passes between them over all rows at once.
//
// Threading and determinism (docs/index.md, "Threads": one thread pool at a
// time). The engine's threads split each grouped product into blocks of rows
// and columns across all experts, never a reduction; the element-wise passes
// split rows. Every
// output element is computed by one fixed chain of operations, so results
// are bit-identical run after run, for any thread count, and batch
// invariant: a row's y (and dx) depends on that row, its expert's weights
// and the sizes d, d_ff only, not on the other rows in the buffer or how
// many there are (the weight gradients are sums over an expert's rows, in
// row order). config.threading no longer changes the schedule (kept so that
// existing configurations compile; every value runs the engine's).
// Called inside an OpenMP parallel region, everything runs on the calling
// thread.
//
// Frozen experts for inference (pack, then forward with PackedExpertWeights):
// W1, W3, W2 packed once in fp32, bf16 or int8 (cpu/gemm/packed_matrix.hpp),
// a, g and y computed by the engine in that dtype with fp32 activations
// between (bf16: activations rounded to bf16 on the fly; int8: activations
// quantized per row, weights per output channel).
//
// Validation (both calls, before anything is written): the configuration
// (constructor: d_model, d_ff >= 1, kind and activation enumerators);
// every view well formed and of the shapes above; offsets[0] = 0, offsets
// non-decreasing, offsets[E] = N; w3 / saved_gate / dw3 empty for kPlain;
// the workspace large enough and aligned. Errors: kShapeMismatch (shapes,
// offsets[E] vs N, workspace too small), kNullPointer (null data),
// kInvalidArgument (configuration, offsets not a scan, a view given where
// kPlain has none, misaligned workspace). Values (NaN/Inf) are not checked.
// An output that overlaps an input or another output is refused
// (kInvalidArgument, naming both). Strided views (ld > cols) work; padding
// columns are never touched.
//
//   const ExpertFfn<S> ffn({.d_model = d, .d_ff = f, .kind = FfnKind::kGated,
//                           .activation = Activation::kSilu});
//   std::vector<std::byte> ws(ffn.workspace_size(n));
//   ffn.forward(buffer, offsets, {w1, w3, w2}, expert_out, pre, gate, ws_view);
//   ...
//   ffn.backward(d_expert_out, buffer, offsets, {w1, w3, w2}, pre, gate, d_buffer,
//                {dw1, dw3, dw2}, ws_view);

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "moekit/core/activation.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/elementwise.hpp"
#include "moekit/cpu/gemm/gemm.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// How work on experts spreads over threads where a component loops over its
// experts (ExpertLora): experts in parallel with each product on one
// thread, or experts in turn. ExpertFfn runs every product on the GEMM
// engine, which splits all experts' work at once, whatever this says.
enum class FfnThreading {
  kAuto,           // across experts when they are many and small (below)
  kAcrossExperts,  // experts in parallel, each GEMM single-threaded
  kInsideGemm,     // experts in turn, Eigen parallelises each GEMM
};

// Mean rows per non-empty expert up to which kAuto runs experts in parallel.
inline constexpr index_t kExpertParallelMaxRows = 1024;

// The experts' configuration; the constructor validates it.
struct ExpertFfnConfig {
  index_t d_model = 0;                            // d
  index_t d_ff = 0;                               // width of one expert
  FfnKind kind = FfnKind::kPlain;                 // plain or gated experts
  Activation activation = Activation::kGeluTanh;  // the hidden layer's activation
  FfnThreading threading = FfnThreading::kAuto;   // how the experts use threads
  GemmDtype compute = GemmDtype::kFloat32;        // the products: fp32 or bf16 (see above)
};

// The weights of all E experts (layout at the top of this file).
struct ExpertWeights {
  MatrixView<const float> w1{};  // (E d_ff) x d
  MatrixView<const float> w3{};  // (E d_ff) x d, kGated only
  MatrixView<const float> w2{};  // (E d) x d_ff
};

// Frozen expert weights packed once for inference (ExpertFfn::pack): E
// groups each of W1^T, W3^T (kGated; empty otherwise) and W2^T, in one dtype.
struct PackedExpertWeights {
  PackedMatrix w1{};  // E groups of W1^T, d x d_ff each
  PackedMatrix w3{};  // E groups of W3^T, d x d_ff each (kGated; empty otherwise)
  PackedMatrix w2{};  // E groups of W2^T, d_ff x d each
  // The dtype the weights are packed in (one for all three).
  GemmDtype dtype() const { return w1.dtype(); }
};

// Gradient outputs of the weights; an empty view is frozen (not computed,
// not written).
struct ExpertGrads {
  MatrixView<float> dw1{};  // (E d_ff) x d, the layout of ExpertWeights::w1
  MatrixView<float> dw3{};  // (E d_ff) x d, gated experts only
  MatrixView<float> dw2{};  // (E d) x d_ff
  bool accumulate = false;  // add to the blocks instead of overwriting them
};

// Expert i's own weights (or gradients) out of a stack in the layout above,
// with d_ff = f and d_model = d: the views ExpertFfn<MoeSpec<1, 1>> takes
// to run one expert alone. Empty views stay empty.
inline ExpertWeights expert_weights(const ExpertWeights& w, index_t i, index_t f, index_t d) {
  const auto pick = [](MatrixView<const float> m, index_t r0, index_t n) {
    return m.empty() ? MatrixView<const float>() : m.middle_rows(r0, n);
  };
  return {pick(w.w1, i * f, f), pick(w.w3, i * f, f), pick(w.w2, i * d, d)};
}
// Expert i's gradient views out of a stack, as expert_weights.
inline ExpertGrads expert_grads(const ExpertGrads& g, index_t i, index_t f, index_t d) {
  const auto pick = [](MatrixView<float> m, index_t r0, index_t n) {
    return m.empty() ? MatrixView<float>() : m.middle_rows(r0, n);
  };
  return {pick(g.dw1, i * f, f), pick(g.dw3, i * f, f), pick(g.dw2, i * d, d), g.accumulate};
}

namespace detail {

// The FFN's element-wise middle, row by row: h = f(a) * g for a gated FFN
// (g not empty), else h = f(a). h may be a itself. Vectorised and chosen at
// run time (cpu/elementwise.hpp); every element depends on its inputs only.
inline void activate_rows(Activation act, MatrixView<const float> a, MatrixView<const float> g,
                          MatrixView<float> h) {
  activation_rows(act, a, g, h);
}

// Its backward, given dh in `d` (overwritten with da): gated, dg = dh * f(a)
// and da = dh * g * f'(a); else da = dh * f'(a) (dg unused).
inline void activate_rows_backward(Activation act, MatrixView<const float> a,
                                   MatrixView<const float> g, MatrixView<float> d,
                                   MatrixView<float> dg) {
  activation_rows_backward(act, a, g, d, dg);
}

// body(r0, rows) for blocks of `rows` rows covering [0, n), spread over the
// threads when the n x cols elements are worth it (not inside a parallel region).
template <class Body>
void for_row_blocks(index_t n, index_t cols, Body&& body) {
  constexpr index_t kBlock = 64;
  [[maybe_unused]] const bool parallel = n * cols >= kParallelGrain && !in_parallel();
  MOEKIT_PARALLEL_FOR_IF(parallel)
  for (index_t r0 = 0; r0 < n; r0 += kBlock) body(r0, n - r0 < kBlock ? n - r0 : kBlock);
}

// Rows [r0, r0 + rows) of a view, or the empty view it is.
template <class T>
MatrixView<T> rows_of(MatrixView<T> v, index_t r0, index_t rows) {
  return v.empty() ? v : v.middle_rows(r0, rows);
}

// activate_rows over all rows, in row blocks spread over the threads (h may
// be a).
inline void activate_all_rows(Activation act, MatrixView<const float> a, MatrixView<const float> g,
                              MatrixView<float> h) {
  for_row_blocks(a.rows(), a.cols(), [&](index_t r0, index_t rows) {
    activate_rows(act, a.middle_rows(r0, rows), rows_of(g, r0, rows), h.middle_rows(r0, rows));
  });
}

// activate_rows_backward likewise.
inline void activate_all_rows_backward(Activation act, MatrixView<const float> a,
                                       MatrixView<const float> g, MatrixView<float> d,
                                       MatrixView<float> dg) {
  for_row_blocks(a.rows(), a.cols(), [&](index_t r0, index_t rows) {
    activate_rows_backward(act, a.middle_rows(r0, rows), rows_of(g, r0, rows),
                           d.middle_rows(r0, rows), rows_of(dg, r0, rows));
  });
}

// Whether the experts run in parallel under `threading` (see the top of this file).
template <int E>
bool runs_across_experts(FfnThreading threading, VectorView<const index_t> offsets) {
  if (threading != FfnThreading::kAuto) return threading == FfnThreading::kAcrossExperts;
  const int threads = max_threads();
  if (threads <= 1) return false;
  index_t busy = 0;
  for (int e = 0; e < E; ++e) busy += offsets[e + 1] > offsets[e];
  return busy >= threads && offsets[E] <= busy * kExpertParallelMaxRows;
}

// Calls body(e, first_row, rows) for every non-empty expert, in parallel
// across experts or in turn (then Eigen may parallelise inside).
template <int E, class Body>
void for_each_expert(FfnThreading threading, VectorView<const index_t> offsets, Body&& body) {
  if (runs_across_experts<E>(threading, offsets)) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (int e = 0; e < E; ++e) {
      if (offsets[e + 1] > offsets[e]) body(e, offsets[e], offsets[e + 1] - offsets[e]);
    }
  } else {
    for (int e = 0; e < E; ++e) {
      if (offsets[e + 1] > offsets[e]) body(e, offsets[e], offsets[e + 1] - offsets[e]);
    }
  }
}

}  // namespace detail

// The E experts' FFNs of a MoeSpec<E, K> layer over the expert-major buffer:
// forward and backward as described at the top of this file.
template <MoeSpecType S>
class ExpertFfn {
 public:
  static constexpr int kExperts = S::num_experts;  // E

  // Rejects a configuration it cannot run (naming the field and value).
  explicit ExpertFfn(const ExpertFfnConfig& config) : config_(config) { validate(config); }

  // The configuration it was built with.
  const ExpertFfnConfig& config() const { return config_; }
  // Whether the experts are gated (w3 used).
  bool gated() const { return config_.kind == FfnKind::kGated; }

  // Bytes of workspace forward and backward need for an N-row buffer:
  // 2 N d_ff floats and the GEMM engine's buffers (0 for N = 0).
  index_t workspace_size(index_t rows) const {
    MOEKIT_CHECK_GE(rows, 0);
    if (rows == 0) return 0;
    return scratch_bytes(rows) + gemm_workspace_size(max_threads());
  }

  // y = FFN_e(buffer rows of e) for every expert e. buffer, y: N x d;
  // saved_pre, saved_gate: N x d_ff or empty (saved_gate empty for kPlain).
  void forward(MatrixView<const float> buffer, VectorView<const index_t> offsets,
               const ExpertWeights& weights, MatrixView<float> y, MatrixView<float> saved_pre,
               MatrixView<float> saved_gate, VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::ExpertFfn::forward");
    const index_t n = check_common(buffer, offsets, weights, workspace);
    const index_t d = config_.d_model, f = config_.d_ff;
    check_shape(y, n, d, "y");
    if (!saved_pre.empty()) check_shape(saved_pre, n, f, "saved_pre");
    if (gated()) {
      if (!saved_gate.empty()) check_shape(saved_gate, n, f, "saved_gate");
    } else {
      check_absent(saved_gate, "saved_gate");
    }
    OverlapCheck("cpu::ExpertFfn::forward")
        .out({{y, "y"},
              {saved_pre, "saved_pre"},
              {saved_gate, "saved_gate"},
              {workspace.segment(0, workspace_size(n)), "workspace"}})
        .in({{buffer, "buffer"},
             {offsets, "offsets"},
             {weights.w1, "weights.w1"},
             {weights.w3, "weights.w3"},
             {weights.w2, "weights.w2"}})
        .check();
    if (n == 0) return;

    const MatrixView<float> ws0 = scratch(workspace, n, 0);
    const MatrixView<float> ws1 = scratch(workspace, n, 1);
    const MatrixView<float> pre = saved_pre.empty() ? ws0 : saved_pre;
    const MatrixView<float> gate = gated() ? (saved_gate.empty() ? ws1 : saved_gate) : ws1;
    const VectorView<std::byte> engine = engine_workspace(workspace, n);
    // a = X W1^T (and g = X W3^T): one grouped product, W3 in the odd groups.
    const int per_expert = gated() ? 2 : 1;
    gemm_grouped(
        {.dtype = config_.compute, .op_a = Op::kNone, .op_b = Op::kTrans},
        index_t{kExperts} * per_expert,
        [&](index_t group) {
          const auto e = static_cast<int>(group / per_expert);
          const bool second = group % per_expert == 1;
          const index_t r0 = offsets[e], rows = offsets[e + 1] - r0;
          return GemmOperands{buffer.middle_rows(r0, rows),
                              second ? w3_of(weights, e) : w1_of(weights, e), nullptr, 0,
                              (second ? gate : pre).middle_rows(r0, rows)};
        },
        engine);
    detail::activate_all_rows(config_.activation, pre,
                              gated() ? MatrixView<const float>(gate) : MatrixView<const float>(),
                              ws0);  // h, in place of a when a is not saved
    gemm_grouped(
        {.dtype = config_.compute, .op_a = Op::kNone, .op_b = Op::kTrans}, kExperts,
        [&](index_t e) {
          const index_t r0 = offsets[e], rows = offsets[e + 1] - r0;
          return GemmOperands{ws0.middle_rows(r0, rows), w2_of(weights, static_cast<int>(e)),
                              nullptr, 0, y.middle_rows(r0, rows)};
        },
        engine);
  }

  // Packs frozen weights once for the engine in `dtype` (allocates; see the
  // top of this file). Checks the weights' shapes as forward does.
  PackedExpertWeights pack(const ExpertWeights& weights, GemmDtype dtype) const {
    MOEKIT_API("cpu::ExpertFfn::pack");
    check_weights(weights);
    MOEKIT_CHECK_ARG(is_gemm_dtype(dtype), "dtype = ", static_cast<int>(dtype),
                     " is not a GemmDtype");
    PackedExpertWeights p;
    p.w1 = PackedMatrix(dtype, Op::kTrans, weights.w1, kExperts);
    if (gated()) p.w3 = PackedMatrix(dtype, Op::kTrans, weights.w3, kExperts);
    p.w2 = PackedMatrix(dtype, Op::kTrans, weights.w2, kExperts);
    return p;
  }

  // Inference forward on packed weights: y = FFN_e(buffer rows of e), with
  // the products in the weights' dtype. buffer, y: N x d; the workspace as
  // for the other forward (workspace_size(N)).
  void forward(MatrixView<const float> buffer, VectorView<const index_t> offsets,
               const PackedExpertWeights& weights, MatrixView<float> y,
               VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::ExpertFfn::forward");
    const index_t n = check_buffer(buffer, offsets, workspace);
    check_packed(weights);
    check_shape(y, n, config_.d_model, "y");
    OverlapCheck("cpu::ExpertFfn::forward")
        .out({{y, "y"}, {workspace.segment(0, workspace_size(n)), "workspace"}})
        .in({{buffer, "buffer"}, {offsets, "offsets"}})
        .check();
    if (n == 0) return;
    const MatrixView<float> a = scratch(workspace, n, 0);
    const MatrixView<float> g = scratch(workspace, n, 1);
    const VectorView<std::byte> engine = engine_workspace(workspace, n);
    const GemmSpec spec{.dtype = weights.dtype(), .op_a = Op::kNone, .op_b = Op::kNone};
    const int per_expert = gated() ? 2 : 1;
    gemm_grouped(
        spec, index_t{kExperts} * per_expert,
        [&](index_t group) {
          const index_t e = group / per_expert;
          const bool second = group % per_expert == 1;
          const index_t r0 = offsets[e], rows = offsets[e + 1] - r0;
          return GemmOperands{buffer.middle_rows(r0, rows),
                              {},
                              second ? &weights.w3 : &weights.w1,
                              e,
                              (second ? g : a).middle_rows(r0, rows)};
        },
        engine);
    detail::activate_all_rows(config_.activation, a,
                              gated() ? MatrixView<const float>(g) : MatrixView<const float>(), a);
    gemm_grouped(
        spec, kExperts,
        [&](index_t e) {
          const index_t r0 = offsets[e], rows = offsets[e + 1] - r0;
          return GemmOperands{a.middle_rows(r0, rows), {}, &weights.w2, e, y.middle_rows(r0, rows)};
        },
        engine);
  }

  // Backward of forward given dy = dL/dy (N x d). saved_pre (and saved_gate
  // for kGated) are what forward wrote for the same buffer and weights. dx:
  // N x d or empty; grads: see ExpertGrads.
  void backward(MatrixView<const float> dy, MatrixView<const float> buffer,
                VectorView<const index_t> offsets, const ExpertWeights& weights,
                MatrixView<const float> saved_pre, MatrixView<const float> saved_gate,
                MatrixView<float> dx, const ExpertGrads& grads,
                VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::ExpertFfn::backward");
    const index_t n = check_common(buffer, offsets, weights, workspace);
    const index_t d = config_.d_model, f = config_.d_ff;
    const index_t e_rows_ff = index_t{kExperts} * f, e_rows_d = index_t{kExperts} * d;
    check_shape(dy, n, d, "dy");
    check_shape(saved_pre, n, f, "saved_pre");
    if (gated()) {
      check_shape(saved_gate, n, f, "saved_gate");
    } else {
      check_absent(saved_gate, "saved_gate");
    }
    const bool want_dx = !dx.empty();
    const bool want_dw1 = !grads.dw1.empty();
    const bool want_dw3 = !grads.dw3.empty();
    const bool want_dw2 = !grads.dw2.empty();
    if (want_dx) check_shape(dx, n, d, "dx");
    if (want_dw1) check_shape(grads.dw1, e_rows_ff, d, "grads.dw1");
    if (gated()) {
      if (want_dw3) check_shape(grads.dw3, e_rows_ff, d, "grads.dw3");
    } else {
      check_absent(grads.dw3, "grads.dw3");
    }
    if (want_dw2) check_shape(grads.dw2, e_rows_d, f, "grads.dw2");
    OverlapCheck("cpu::ExpertFfn::backward")
        .out({{dx, "dx"},
              {grads.dw1, "grads.dw1"},
              {grads.dw3, "grads.dw3"},
              {grads.dw2, "grads.dw2"},
              {workspace.segment(0, workspace_size(n)), "workspace"}})
        .in({{dy, "dy"},
             {buffer, "buffer"},
             {offsets, "offsets"},
             {weights.w1, "weights.w1"},
             {weights.w3, "weights.w3"},
             {weights.w2, "weights.w2"},
             {saved_pre, "saved_pre"},
             {saved_gate, "saved_gate"}})
        .check();
    const bool want_dh = want_dx || want_dw1 || want_dw3;
    const bool acc = grads.accumulate;

    // Empty experts: their weight-gradient blocks are 0 (overwrite mode).
    if (!acc) {
      for (int e = 0; e < kExperts; ++e) {
        if (offsets[e + 1] != offsets[e]) continue;
        if (want_dw1) as_eigen(grads.dw1.middle_rows(e * f, f)).setZero();
        if (want_dw3) as_eigen(grads.dw3.middle_rows(e * f, f)).setZero();
        if (want_dw2) as_eigen(grads.dw2.middle_rows(e * d, d)).setZero();
      }
    }
    if (n == 0 || (!want_dh && !want_dw2)) return;

    const MatrixView<float> ws0 = scratch(workspace, n, 0);  // dh, then da
    const MatrixView<float> ws1 = scratch(workspace, n, 1);  // h, then dg
    const VectorView<std::byte> engine = engine_workspace(workspace, n);
    const MatrixView<const float> gate = gated() ? saved_gate : MatrixView<const float>();
    // Weight gradients: op(A) = (expert rows)^T, reduced over the expert's
    // rows; empty experts have no group (their blocks were handled above).
    const GemmSpec dw_spec{
        .dtype = config_.compute, .op_a = Op::kTrans, .op_b = Op::kNone, .beta = acc ? 1.0f : 0.0f};
    const auto weight_grad = [&](MatrixView<const float> rows_a, MatrixView<const float> rows_b,
                                 MatrixView<float> dw, index_t e, index_t block) {
      const index_t r0 = offsets[e], rows = offsets[e + 1] - r0;
      if (rows == 0)
        return GemmOperands{
            {}, rows_b.middle_rows(r0, 0), nullptr, 0, dw.block(e * block, 0, 0, dw.cols())};
      return GemmOperands{rows_a.middle_rows(r0, rows), rows_b.middle_rows(r0, rows), nullptr, 0,
                          dw.middle_rows(e * block, block)};
    };

    const Activation act = config_.activation;
    if (want_dw2) {  // dW2 = dy^T h, h recomputed into ws1
      detail::activate_all_rows(act, saved_pre, gate, ws1);
      gemm_grouped(
          dw_spec, kExperts, [&](index_t e) { return weight_grad(dy, ws1, grads.dw2, e, d); },
          engine);
    }
    if (!want_dh) return;

    gemm_grouped(
        {.dtype = config_.compute, .op_a = Op::kNone, .op_b = Op::kNone}, kExperts,  // dh = dy W2
        [&](index_t e) {
          const index_t r0 = offsets[e], rows = offsets[e + 1] - r0;
          return GemmOperands{dy.middle_rows(r0, rows), w2_of(weights, static_cast<int>(e)),
                              nullptr, 0, ws0.middle_rows(r0, rows)};
        },
        engine);
    detail::activate_all_rows_backward(act, saved_pre, gate, ws0,
                                       gated() ? ws1 : MatrixView<float>());
    const MatrixView<const float> da = ws0, dg = ws1;
    const int dw_per_expert = (want_dw1 ? 1 : 0) + (want_dw3 ? 1 : 0);
    if (dw_per_expert > 0) {  // dW1 = da^T X, dW3 = dg^T X
      gemm_grouped(
          dw_spec, index_t{kExperts} * dw_per_expert,
          [&](index_t group) {
            const index_t e = group / dw_per_expert;
            const bool third = !want_dw1 || group % dw_per_expert == 1;
            return weight_grad(third ? dg : da, buffer, third ? grads.dw3 : grads.dw1, e, f);
          },
          engine);
    }
    if (!want_dx) return;
    for (int part = 0; part < (gated() ? 2 : 1); ++part) {  // dx = da W1 (+ dg W3)
      gemm_grouped(
          {.dtype = config_.compute,
           .op_a = Op::kNone,
           .op_b = Op::kNone,
           .beta = part == 0 ? 0.0f : 1.0f},
          kExperts,
          [&](index_t e) {
            const index_t r0 = offsets[e], rows = offsets[e + 1] - r0;
            const auto ei = static_cast<int>(e);
            return GemmOperands{(part == 0 ? da : dg).middle_rows(r0, rows),
                                part == 0 ? w1_of(weights, ei) : w3_of(weights, ei), nullptr, 0,
                                dx.middle_rows(r0, rows)};
          },
          engine);
    }
  }

 private:
  static void validate(const ExpertFfnConfig& c) {
    MOEKIT_CHECK_ARG(c.d_model >= 1, "config.d_model = ", c.d_model, " must be at least 1");
    MOEKIT_CHECK_ARG(c.d_ff >= 1, "config.d_ff = ", c.d_ff, " must be at least 1");
    check_training_dtype(c.compute, "config.compute");
    MOEKIT_CHECK_ARG(c.kind == FfnKind::kPlain || c.kind == FfnKind::kGated,
                     "config.kind = ", static_cast<int>(c.kind), " is not an FfnKind");
    MOEKIT_CHECK_ARG(c.activation == Activation::kRelu || c.activation == Activation::kGeluTanh ||
                         c.activation == Activation::kGeluErf || c.activation == Activation::kSilu,
                     "config.activation = ", static_cast<int>(c.activation),
                     " is not an Activation");
    MOEKIT_CHECK_ARG(
        c.threading == FfnThreading::kAuto || c.threading == FfnThreading::kAcrossExperts ||
            c.threading == FfnThreading::kInsideGemm,
        "config.threading = ", static_cast<int>(c.threading), " is not an FfnThreading");
  }

  // A view kPlain has no use for must be empty (catches a gated caller
  // running a plain FFN by mistake).
  template <class T>
  static void check_absent(MatrixView<T> v, const char* name) {
    MOEKIT_CHECK(v.empty(), Errc::kInvalidArgument, name, " is ", v.rows(), " x ", v.cols(),
                 " but must be empty for FfnKind::kPlain");
  }

  // Checks the buffer, offsets and workspace; returns N.
  index_t check_buffer(MatrixView<const float> buffer, VectorView<const index_t> offsets,
                       VectorView<std::byte> workspace) const {
    check_view(buffer, "buffer");
    const index_t n = buffer.rows();
    check_shape(buffer, n, config_.d_model, "buffer");
    check_shape(offsets, index_t{kExperts} + 1, "offsets");
    MOEKIT_CHECK(offsets[0] == 0, Errc::kInvalidArgument, "offsets[0] = ", offsets[0],
                 ", expected 0");
    for (int e = 0; e < kExperts; ++e) {
      MOEKIT_CHECK(offsets[e + 1] >= offsets[e], Errc::kInvalidArgument,
                   "offsets decreases: offsets[", e, "] = ", offsets[e], " > offsets[", e + 1,
                   "] = ", offsets[e + 1]);
    }
    MOEKIT_CHECK(offsets[kExperts] == n, Errc::kShapeMismatch, "offsets[", kExperts,
                 "] = ", offsets[kExperts], " but buffer has ", n, " rows");
    const index_t need = workspace_size(n);
    if (need > 0) {
      check_view(workspace, "workspace");
      MOEKIT_CHECK(workspace.size() >= need, Errc::kShapeMismatch, "workspace has ",
                   workspace.size(), " bytes, workspace_size(", n, ") = ", need);
      MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace.data()) % alignof(float) == 0,
                   Errc::kInvalidArgument, "workspace is not aligned to ", alignof(float),
                   " bytes");
    }
    return n;
  }

  void check_weights(const ExpertWeights& w) const {
    const index_t d = config_.d_model, f = config_.d_ff;
    check_shape(w.w1, index_t{kExperts} * f, d, "weights.w1");
    if (gated()) {
      check_shape(w.w3, index_t{kExperts} * f, d, "weights.w3");
    } else {
      check_absent(w.w3, "weights.w3");
    }
    check_shape(w.w2, index_t{kExperts} * d, f, "weights.w2");
  }

  // Checks what forward and backward share; returns N.
  index_t check_common(MatrixView<const float> buffer, VectorView<const index_t> offsets,
                       const ExpertWeights& w, VectorView<std::byte> workspace) const {
    const index_t n = check_buffer(buffer, offsets, workspace);
    check_weights(w);
    return n;
  }

  // Errors name forward, the public function that takes packed weights.
  void check_packed(const PackedExpertWeights& w) const {
    const index_t d = config_.d_model, f = config_.d_ff;
    const auto check = [&](const PackedMatrix& m, index_t k, index_t n, const char* name) {
      detail::check_packed_matrix("cpu::ExpertFfn::forward", m, kExperts, k, n, w.dtype(), name,
                                  "weights.w1", "ExpertFfn::pack");
    };
    check(w.w1, d, f, "weights.w1");
    if (gated()) {
      check(w.w3, d, f, "weights.w3");
    } else if (w.w3.groups() != 0) {
      moekit::detail::fail(Errc::kInvalidArgument, "cpu::ExpertFfn::forward",
                           "weights.w3 is packed but must be empty for FfnKind::kPlain");
    }
    check(w.w2, f, d, "weights.w2");
  }

  index_t scratch_bytes(index_t rows) const {
    return detail::round_up(2 * rows * config_.d_ff * index_t{sizeof(float)}, detail::kSlotAlign);
  }

  // Scratch matrix `slot` (0 or 1) of the workspace, N x d_ff floats.
  MatrixView<float> scratch(VectorView<std::byte> workspace, index_t n, int slot) const {
    if (n == 0) return {};
    float* base = reinterpret_cast<float*>(workspace.data());
    return MatrixView<float>(base + slot * n * config_.d_ff, n, config_.d_ff);
  }

  // The GEMM engine's part of the workspace.
  VectorView<std::byte> engine_workspace(VectorView<std::byte> workspace, index_t n) const {
    const index_t skip = scratch_bytes(n);
    return workspace.segment(skip, workspace.size() - skip);
  }

  MatrixView<const float> w1_of(const ExpertWeights& w, int e) const {
    return w.w1.middle_rows(e * config_.d_ff, config_.d_ff);
  }
  MatrixView<const float> w3_of(const ExpertWeights& w, int e) const {
    return w.w3.middle_rows(e * config_.d_ff, config_.d_ff);
  }
  MatrixView<const float> w2_of(const ExpertWeights& w, int e) const {
    return w.w2.middle_rows(e * config_.d_model, config_.d_model);
  }

  ExpertFfnConfig config_;
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
