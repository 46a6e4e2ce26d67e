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
// Workspace. Both calls take a caller workspace of at least
// workspace_size(N) = 2 N d_ff floats (bytes returned; float-aligned),
// which holds h in forward and dh/da, h/dg in backward. No call allocates.
//
// Gradients. Any of dx and grads.dw1/dw3/dw2 may be an empty view: that
// output is frozen, no work is done for it and nothing is written there
// (dh is computed only when dx, dw1 or dw3 is wanted). Weight gradients are
// written (overwrite) or, with grads.accumulate, added by the GEMM itself
// (beta = 1): acc = old + new up to the rounding of that one addition per
// GEMM block. An expert with no rows costs nothing; its gradient blocks are
// set to 0 (overwrite) or left unchanged (accumulate). dx is always
// overwritten (dispatch_backward accumulates into the token gradient).
//
// Threading (docs/index.md, "Threads": one pool at a time). Each expert is one
// set of Eigen GEMMs on its rows. Either the experts run in parallel
// (OpenMP, dynamic schedule) with each GEMM single-threaded - Eigen does not
// parallelise a GEMM called from inside an active OpenMP parallel region -
// or the experts run one after the other and Eigen parallelises each GEMM.
// FfnThreading::kAuto picks the first when there are at least as many
// non-empty experts as OpenMP threads and they average at most
// kExpertParallelMaxRows rows (fine-grained MoE, small batches), else the
// second. Every output element is written by one GEMM (or element-wise loop)
// of one thread, with no racing accumulation, so results are bit-identical
// run after run for a given thread count and threading choice. Across
// thread counts (and between the two strategies) Eigen's cache blocking
// depends on the threads and may change the last bits.
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
#include "moekit/cpu/parallel.hpp"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// How ExpertFfn spreads work over threads (see the top of this file).
enum class FfnThreading {
  kAuto,           // the rule above
  kAcrossExperts,  // experts in parallel, each GEMM single-threaded
  kInsideGemm,     // experts in turn, Eigen parallelises each GEMM
};

// Mean rows per non-empty expert up to which kAuto runs experts in parallel.
inline constexpr index_t kExpertParallelMaxRows = 1024;

struct ExpertFfnConfig {
  index_t d_model = 0;
  index_t d_ff = 0;  // width of one expert
  FfnKind kind = FfnKind::kPlain;
  Activation activation = Activation::kGeluTanh;
  FfnThreading threading = FfnThreading::kAuto;
};

// The weights of all E experts (layout at the top of this file).
struct ExpertWeights {
  MatrixView<const float> w1{};  // (E d_ff) x d
  MatrixView<const float> w3{};  // (E d_ff) x d, kGated only
  MatrixView<const float> w2{};  // (E d) x d_ff
};

// Gradient outputs of the weights; an empty view is frozen (not computed,
// not written).
struct ExpertGrads {
  MatrixView<float> dw1{};
  MatrixView<float> dw3{};
  MatrixView<float> dw2{};
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
template <class Act>
void activate_rows(Act, MatrixView<const float> a, MatrixView<const float> g, MatrixView<float> h) {
  activation_rows(Act::value, a, g, h);
}

// Its backward, given dh in `d` (overwritten with da): gated, dg = dh * f(a)
// and da = dh * g * f'(a); else da = dh * f'(a) (dg unused).
template <class Act>
void activate_rows_backward(Act, MatrixView<const float> a, MatrixView<const float> g,
                            MatrixView<float> d, MatrixView<float> dg) {
  activation_rows_backward(Act::value, a, g, d, dg);
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

template <MoeSpecType S>
class ExpertFfn {
 public:
  static constexpr int kExperts = S::num_experts;

  // Rejects a configuration it cannot run (naming the field and value).
  explicit ExpertFfn(const ExpertFfnConfig& config) : config_(config) { validate(config); }

  const ExpertFfnConfig& config() const { return config_; }
  bool gated() const { return config_.kind == FfnKind::kGated; }

  // Bytes of workspace forward and backward need for an N-row buffer:
  // 2 N d_ff floats.
  index_t workspace_size(index_t rows) const {
    MOEKIT_CHECK_GE(rows, 0);
    return 2 * rows * config_.d_ff * index_t{sizeof(float)};
  }

  // y = FFN_e(buffer rows of e) for every expert e. buffer, y: N x d;
  // saved_pre, saved_gate: N x d_ff or empty (saved_gate empty for kPlain).
  void forward(MatrixView<const float> buffer, VectorView<const index_t> offsets,
               const ExpertWeights& weights, MatrixView<float> y, MatrixView<float> saved_pre,
               MatrixView<float> saved_gate, VectorView<std::byte> workspace) const {
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

    const MatrixView<float> ws0 = scratch(workspace, n, 0);
    const MatrixView<float> ws1 = scratch(workspace, n, 1);
    const MatrixView<float> pre = saved_pre.empty() ? ws0 : saved_pre;
    const MatrixView<float> gate = saved_gate.empty() ? ws1 : saved_gate;
    with_activation(config_.activation, [&](auto act) {
      for_each_expert(offsets, [&](int e, index_t r0, index_t rows) {
        const auto x = as_eigen(buffer.middle_rows(r0, rows));
        auto a = pre.middle_rows(r0, rows);
        auto h = ws0.middle_rows(r0, rows);  // may be a itself: h overwrites a in place
        as_eigen(a).noalias() = x * as_eigen(w1_of(weights, e)).transpose();
        if (gated()) {
          auto g = gate.middle_rows(r0, rows);
          as_eigen(g).noalias() = x * as_eigen(w3_of(weights, e)).transpose();
          detail::activate_rows(act, a, g, h);
        } else {
          detail::activate_rows(act, a, MatrixView<const float>(), h);
        }
        as_eigen(y.middle_rows(r0, rows)).noalias() =
            as_eigen(MatrixView<const float>(h)) * as_eigen(w2_of(weights, e)).transpose();
      });
    });
  }

  // Backward of forward given dy = dL/dy (N x d). saved_pre (and saved_gate
  // for kGated) are what forward wrote for the same buffer and weights. dx:
  // N x d or empty; grads: see ExpertGrads.
  void backward(MatrixView<const float> dy, MatrixView<const float> buffer,
                VectorView<const index_t> offsets, const ExpertWeights& weights,
                MatrixView<const float> saved_pre, MatrixView<const float> saved_gate,
                MatrixView<float> dx, const ExpertGrads& grads,
                VectorView<std::byte> workspace) const {
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
    if (!want_dh && !want_dw2) return;

    const MatrixView<float> ws0 = scratch(workspace, n, 0);  // dh, then da
    const MatrixView<float> ws1 = scratch(workspace, n, 1);  // h, then dg
    with_activation(config_.activation, [&](auto act) {
      for_each_expert(offsets, [&](int e, index_t r0, index_t rows) {
        const auto g_y = as_eigen(dy.middle_rows(r0, rows));
        const auto x = as_eigen(buffer.middle_rows(r0, rows));
        const MatrixView<const float> a = saved_pre.middle_rows(r0, rows);
        const MatrixView<const float> g =
            gated() ? saved_gate.middle_rows(r0, rows) : MatrixView<const float>();
        const MatrixView<float> s0 = ws0.middle_rows(r0, rows);
        const MatrixView<float> s1 = ws1.middle_rows(r0, rows);

        if (want_dw2) {  // dW2 = dy^T h, h recomputed into s1
          detail::activate_rows(act, a, g, s1);
          auto dw2 = as_eigen(grads.dw2.middle_rows(e * d, d));
          const auto h = as_eigen(MatrixView<const float>(s1));
          if (acc) {
            dw2.noalias() += g_y.transpose() * h;
          } else {
            dw2.noalias() = g_y.transpose() * h;
          }
        }
        if (!want_dh) return;

        as_eigen(s0).noalias() = g_y * as_eigen(w2_of(weights, e));  // dh
        detail::activate_rows_backward(act, a, g, s0, s1);
        const auto da = as_eigen(MatrixView<const float>(s0));
        const auto dg = as_eigen(MatrixView<const float>(s1));
        if (want_dw1) {
          auto dw1 = as_eigen(grads.dw1.middle_rows(e * f, f));
          if (acc) {
            dw1.noalias() += da.transpose() * x;
          } else {
            dw1.noalias() = da.transpose() * x;
          }
        }
        if (want_dw3) {
          auto dw3 = as_eigen(grads.dw3.middle_rows(e * f, f));
          if (acc) {
            dw3.noalias() += dg.transpose() * x;
          } else {
            dw3.noalias() = dg.transpose() * x;
          }
        }
        if (want_dx) {
          auto out = as_eigen(dx.middle_rows(r0, rows));
          out.noalias() = da * as_eigen(w1_of(weights, e));
          if (gated()) out.noalias() += dg * as_eigen(w3_of(weights, e));
        }
      });
    });
  }

 private:
  static void validate(const ExpertFfnConfig& c) {
    MOEKIT_CHECK_ARG(c.d_model >= 1, "config.d_model = ", c.d_model, " must be at least 1");
    MOEKIT_CHECK_ARG(c.d_ff >= 1, "config.d_ff = ", c.d_ff, " must be at least 1");
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

  // Checks what forward and backward share; returns N.
  index_t check_common(MatrixView<const float> buffer, VectorView<const index_t> offsets,
                       const ExpertWeights& w, VectorView<std::byte> workspace) const {
    const index_t d = config_.d_model, f = config_.d_ff;
    check_view(buffer, "buffer");
    const index_t n = buffer.rows();
    check_shape(buffer, n, d, "buffer");
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
    check_shape(w.w1, index_t{kExperts} * f, d, "weights.w1");
    if (gated()) {
      check_shape(w.w3, index_t{kExperts} * f, d, "weights.w3");
    } else {
      check_absent(w.w3, "weights.w3");
    }
    check_shape(w.w2, index_t{kExperts} * d, f, "weights.w2");
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

  // Scratch matrix `slot` (0 or 1) of the workspace, N x d_ff floats.
  MatrixView<float> scratch(VectorView<std::byte> workspace, index_t n, int slot) const {
    if (n == 0) return {};
    float* base = reinterpret_cast<float*>(workspace.data());
    return MatrixView<float>(base + slot * n * config_.d_ff, n, config_.d_ff);
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

  template <class Body>
  void for_each_expert(VectorView<const index_t> offsets, Body&& body) const {
    detail::for_each_expert<kExperts>(config_.threading, offsets, body);
  }

  ExpertFfnConfig config_;
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
