#pragma once
// LoRA adapters on the experts of an MoE layer (MixLoRA style) on the CPU
// backend, for MoeSpec<E, K> and LoraSpec<R>: every expert keeps its frozen
// FFN weights (ExpertFfn's layout, moekit/cpu/expert_ffn.hpp) and gets its own
// rank-R adapters on W1, W3 (kGated only) and W2. Forward and backward over
// the expert-major buffer, initialisation, and per-expert merge / unmerge.
//
// Layout. The buffer (N x d) holds expert e's rows in [offsets[e],
// offsets[e + 1]) (offsets: E + 1 entries, as cpu::dispatch_offsets writes
// them). The frozen weights are ExpertWeights (w1, w3: (E d_ff) x d, w2:
// (E d) x d_ff). The adapters are stacked per expert like a LoraBank with
// N = E adapters (R = L::rank):
//   a1  (E R) x d       expert e's A1 = rows [e R, (e + 1) R)        (on W1)
//   b1  (E d_ff) x R    expert e's B1 = rows [e d_ff, (e + 1) d_ff)
//   a3, b3              the same shapes, on W3 (kGated only)
//   a2  (E R) x d_ff    expert e's A2 = rows [e R, (e + 1) R)        (on W2)
//   b2  (E d) x R       expert e's B2 = rows [e d, (e + 1) d)
// Any of the three pairs may be empty (both a and b): that matrix has no
// adapter and costs nothing (all three empty gives exactly ExpertFfn).
//
// The math, for the rows X of expert e, s = alpha / R (alpha / sqrt(R) with
// rsLoRA, moekit/core/lora.hpp), act = config.activation:
//   h1 = X A1^T,        a = X W1^T + s h1 B1^T          (n_e x R, n_e x d_ff)
//   kGated  h3 = X A3^T, g = X W3^T + s h3 B3^T,  h = act(a) * g
//   kPlain  h = act(a)
//   h2 = h A2^T,        y = h W2^T + s h2 B2^T          (n_e x R, n_e x d)
// Backward, given dy = dL/dy (W1, W3, W2 frozen: no gradient work for them):
//   dB2 = s dy^T h2,  dh2 = s dy B2,  dA2 = dh2^T h,   dh = dy W2 + dh2 A2
//   da = dh * g * act'(a) (kPlain: dh * act'(a)),  dg = dh * act(a)
//   dB1 = s da^T h1,  dh1 = s da B1,  dA1 = dh1^T X    (dB3, dA3 alike from dg, h3)
//   dx = da W1 + dh1 A1 (+ dg W3 + dh3 A3)
//
// Saved activations (ExpertLoraSaved, caller memory). forward writes a into
// `pre`, g into `gate` (kGated) and the rank-R intermediates h1, h3, h2 where
// given; each may be an empty view (inference). backward needs pre (and gate
// for kGated); h1, h3, h2 are optional there: an empty one is recomputed from
// X (h1, h3: O(n R d)) or from h (h2: O(n R d_ff)). A saved view of a matrix
// without adapter must be empty.
//
// Workspace. Both calls take a caller workspace of at least workspace_size(N)
// = (2 d_ff + 2 R) N floats (bytes returned; float-aligned): h / dh / da / dg
// as in ExpertFfn, plus two N x R scratch matrices. No call allocates.
//
// Gradients (ExpertLoraGrads). Any of dx and the six adapter gradients may be
// an empty view: not wanted, no work is done for it and nothing is written
// there; a gradient of a matrix without adapter must be empty. Adapter
// gradients are overwritten or, with accumulate, added to (by the GEMM itself,
// beta = 1); an expert with no rows gets zero blocks (overwrite) or unchanged
// ones (accumulate) and no other work. dx is always overwritten.
//
// Dropout on the adapter input is not provided: each adapted matrix would need
// its own mask over X (d wide) or h (d_ff wide), regenerated in backward, and
// the masked copies would double the workspace. Train with dropout = 0 here
// (MixLoRA's default) or use LoraLinear / LoraBank where dropout is needed.
//
// Initialisation. init draws every A (Kaiming-uniform or Gaussian, see
// moekit/core/lora.hpp) and sets every B to 0, so the adapted FFN starts equal
// to the frozen one. Matrix m (1 = W1, 3 = W3, 2 = W2) draws with seed
// random_bits(init.seed, m), so A1 and A3 are independent although they have
// the same shape; within a matrix expert e's A(r, j) uses counter
// (e R + r) d_in + j, exactly as LoraBank::init with N = E.
//
// Merging. merge(e, ...) folds expert e's adapters into its frozen blocks
// (W1_e += s B1_e A1_e, W3_e += s B3_e A3_e, W2_e += s B2_e A2_e, each only
// where the adapter exists) with LoraBank's merge kernel; unmerge subtracts
// them (restoring W up to one rounding per element); safe_merge checks all
// three merged blocks first and refuses (Errc::kNonFinite, naming the element)
// with every weight unchanged if any value would be NaN or infinite. Loop over
// e to merge a whole layer for serving.
//
// Threading and determinism: as ExpertFfn (config.threading; experts in
// parallel with single-threaded GEMMs, or experts in turn with Eigen's
// parallel GEMMs; FfnThreading::kAuto decides by the same rule). Every output
// element and gradient block is written by one GEMM of one thread, so results
// are bit-identical run after run for a given thread count and threading
// choice; across thread counts Eigen's blocking may change the last bits.
//
// Validation (every call, before anything is written): the configuration
// (constructor: d_model, d_ff >= 1, kind, activation, threading enumerators,
// alpha finite); every view well formed and of the shapes above, a rank
// mismatch named as such; an adapter given as only one of its two matrices;
// offsets[0] = 0, non-decreasing, offsets[E] = N; kPlain views of W3 empty;
// the workspace. Errors: kShapeMismatch, kNullPointer, kInvalidArgument,
// kOutOfRange (expert index of merge), kNonFinite (safe_merge). Values
// (NaN/Inf) are not checked elsewhere. Outputs must not overlap inputs (not
// checked). Strided views (ld > cols) work; padding is never touched.
//
//   const ExpertLora<MoeSpec<8, 2>, LoraSpec<8>> lora(
//       {.d_model = d, .d_ff = f, .kind = FfnKind::kGated, .activation = Activation::kSilu,
//        .alpha = 16});
//   lora.init({.a1 = a1, .b1 = b1, .a3 = a3, .b3 = b3, .a2 = a2, .b2 = b2}, {.seed = 7});
//   std::vector<std::byte> ws(lora.workspace_size(n));
//   lora.forward(buffer, offsets, {.base = {w1, w3, w2}, .lora = adapters}, y, saved, ws_view);
//   lora.backward(dy, buffer, offsets, weights, saved, dx, {.da1 = da1, ...}, ws_view);

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "moekit/core/activation.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/lora.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/expert_ffn.hpp"
#include "moekit/cpu/lora.hpp"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// The frozen experts' shape (as ExpertFfnConfig) and the adapters' scaling.
struct ExpertLoraConfig {
  index_t d_model = 0;                            // d, token width, >= 1
  index_t d_ff = 0;                               // width of one expert
  FfnKind kind = FfnKind::kPlain;                 // kGated adds W3 (and A3, B3)
  Activation activation = Activation::kGeluTanh;  // act in the math above
  float alpha = 1.0f;                             // s = alpha / R (alpha / sqrt(R) with rslora)
  bool rslora = false;                            // rank-stabilised scaling
  FfnThreading threading = FfnThreading::kAuto;   // how the experts use threads
};

// The adapters of all E experts (layout at the top of this file); an empty
// pair means no adapter on that matrix. T = const float for the weights of a
// call, float for init and merge targets.
template <class T>
struct ExpertAdapters {
  MatrixView<T> a1{};  // (E R) x d
  MatrixView<T> b1{};  // (E d_ff) x R
  MatrixView<T> a3{};  // (E R) x d, kGated only
  MatrixView<T> b3{};  // (E d_ff) x R, kGated only
  MatrixView<T> a2{};  // (E R) x d_ff
  MatrixView<T> b2{};  // (E d) x R

  // Mutable adapters pass where read-only ones are expected.
  operator ExpertAdapters<const T>() const requires(!std::is_const_v<T>) {
    return {a1, b1, a3, b3, a2, b2};
  }
};

// What forward and backward read: the frozen experts and their adapters.
struct ExpertLoraWeights {
  ExpertWeights base{};                // frozen W1, W3, W2 (expert_ffn.hpp)
  ExpertAdapters<const float> lora{};  // trained adapters
};

// What forward saves for backward (see the top of this file). forward takes
// ExpertLoraSaved<float>, backward ExpertLoraSaved<const float>.
template <class T>
struct ExpertLoraSaved {
  MatrixView<T> pre{};   // N x d_ff: a, the adapted pre-activation
  MatrixView<T> gate{};  // N x d_ff: g (kGated only)
  MatrixView<T> h1{};    // N x R: X A1^T (optional)
  MatrixView<T> h3{};    // N x R: X A3^T (optional, kGated only)
  MatrixView<T> h2{};    // N x R: h A2^T (optional)

  // What forward wrote passes as backward's read-only input.
  operator ExpertLoraSaved<const T>() const requires(!std::is_const_v<T>) {
    return {pre, gate, h1, h3, h2};
  }
};

// Gradient outputs of the adapters; an empty view is not wanted (not
// computed, not written). Shapes as the matching adapter matrices.
struct ExpertLoraGrads {
  MatrixView<float> da1{};  // (E R) x d
  MatrixView<float> db1{};  // (E d_ff) x R
  MatrixView<float> da3{};  // (E R) x d, kGated only
  MatrixView<float> db3{};  // (E d_ff) x R, kGated only
  MatrixView<float> da2{};  // (E R) x d_ff
  MatrixView<float> db2{};  // (E d) x R
  bool accumulate = false;  // add to the blocks instead of overwriting them
};

// Rank-R adapters on the E frozen experts of a MoE layer (the math and
// layout at the top of this file). Holds only the configuration; weights,
// saved activations and gradients are caller memory.
template <MoeSpecType S, LoraSpecType L>
class ExpertLora {
 public:
  static constexpr int kExperts = S::num_experts;  // E
  static constexpr int kRank = L::rank;            // R, per expert and matrix

  // Rejects a configuration it cannot run (naming the field and value).
  explicit ExpertLora(const ExpertLoraConfig& config) : config_(config) {
    const ExpertFfn<S> validate_ffn(ffn_config());  // same field names, same messages
    MOEKIT_CHECK_ARG(std::isfinite(config.alpha), "config.alpha = ", config.alpha,
                     " must be finite");
    scale_ = lora_scale(config.alpha, kRank, config.rslora);
  }

  // The configuration, as constructed.
  const ExpertLoraConfig& config() const { return config_; }
  // The frozen FFN this layer adapts (for running it without adapters).
  ExpertFfnConfig ffn_config() const {
    return {.d_model = config_.d_model,
            .d_ff = config_.d_ff,
            .kind = config_.kind,
            .activation = config_.activation,
            .threading = config_.threading};
  }
  // Whether the experts are gated (W3 and its adapter present).
  bool gated() const { return config_.kind == FfnKind::kGated; }
  // s, the factor of every adapter's update: alpha / R or alpha / sqrt(R).
  float scale() const { return scale_; }

  // Trainable parameters of the adapters on all E experts (all three
  // matrices adapted; W3 for kGated only).
  ParamCount adapter_params() const {
    const param_t d = config_.d_model, f = config_.d_ff;
    const param_t one = param_t{kRank} * ((d + f) * (gated() ? 2 : 1) + (f + d));
    return {one * kExperts, one * S::top_k, one * kExperts};
  }

  // Bytes of workspace forward and backward need for an N-row buffer:
  // (2 d_ff + 2 R) N floats.
  index_t workspace_size(index_t rows) const {
    MOEKIT_CHECK_GE(rows, 0);
    return rows * (2 * config_.d_ff + 2 * index_t{kRank}) * index_t{sizeof(float)};
  }

  // A of every adapter given (Kaiming-uniform or Gaussian), B = 0; empty
  // pairs are skipped. See the top of this file for the seeds.
  void init(const ExpertAdapters<float>& adapters, const LoraInitConfig& init_config) const {
    MOEKIT_API("cpu::ExpertLora::init");
    const Present present = check_adapters(adapters, kAdapterNames);
    const auto one = [&](bool on, MatrixView<float> a, MatrixView<float> b, index_t d_in,
                         std::uint64_t matrix) {
      if (!on) return;
      LoraInitConfig c = init_config;
      c.seed = random_bits(init_config.seed, matrix);
      detail::lora_init_block<kRank>(a, b, c, d_in, 0);
    };
    // lora_init_block validates init_config; call it on an empty block first
    // so that a bad config is rejected before any adapter is written.
    detail::lora_init_block<kRank>(MatrixView<float>(), MatrixView<float>(), init_config, 1, 0);
    OverlapCheck overlap("cpu::ExpertLora::init");
    add_adapters(overlap, ExpertAdapters<const float>(adapters), /*written=*/true);
    overlap.check();
    one(present.w1, adapters.a1, adapters.b1, config_.d_model, 1);
    one(present.w3, adapters.a3, adapters.b3, config_.d_model, 3);
    one(present.w2, adapters.a2, adapters.b2, config_.d_ff, 2);
  }

  // y = adapted FFN_e(buffer rows of e) for every expert e. buffer, y: N x d;
  // saved: see ExpertLoraSaved (every view may be empty).
  void forward(MatrixView<const float> buffer, VectorView<const index_t> offsets,
               const ExpertLoraWeights& weights, MatrixView<float> y,
               const ExpertLoraSaved<float>& saved, VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::ExpertLora::forward");
    const index_t n = check_common(buffer, offsets, weights, workspace);
    const Present on = check_adapters(weights.lora, kWeightNames);
    const index_t d = config_.d_model, f = config_.d_ff;
    check_shape(y, n, d, "y");
    check_saved(saved, on, n, /*backward=*/false);
    OverlapCheck overlap("cpu::ExpertLora::forward");
    overlap
        .out({{y, "y"},
              {saved.pre, "saved.pre"},
              {saved.gate, "saved.gate"},
              {saved.h1, "saved.h1"},
              {saved.h3, "saved.h3"},
              {saved.h2, "saved.h2"},
              {workspace.segment(0, workspace_size(n)), "workspace"}})
        .in({{buffer, "buffer"}, {offsets, "offsets"}});
    add_weights(overlap, weights);
    overlap.check();

    const Scratch ws = scratch(workspace, n);
    const MatrixView<float> pre = saved.pre.empty() ? ws.s0 : saved.pre;
    const MatrixView<float> gate = saved.gate.empty() ? ws.s1 : saved.gate;
    const float s = scale_;
    const ExpertAdapters<const float>& ad = weights.lora;
    const Activation act = config_.activation;
    for_each_expert(offsets, [&](int e, index_t r0, index_t rows) {
      const auto x = as_eigen(buffer.middle_rows(r0, rows));
      const MatrixView<float> a = pre.middle_rows(r0, rows);
      const MatrixView<float> h = ws.s0.middle_rows(r0, rows);  // may be a: h overwrites a
      const MatrixView<float> rank = ws.r0.middle_rows(r0, rows);
      // t = X W^T + s (X A^T) B^T, the rank-R product kept in `hs`.
      const auto adapted = [&](MatrixView<float> t, MatrixView<const float> w, bool has,
                               MatrixView<const float> am, MatrixView<const float> bm,
                               MatrixView<float> hs) {
        as_eigen(t).noalias() = x * as_eigen(w).transpose();
        if (!has) return;
        const MatrixView<float> hv = hs.empty() ? rank : hs.middle_rows(r0, rows);
        as_eigen(hv).noalias() = x * as_eigen(a_of(am, e)).transpose();
        as_eigen(t).noalias() +=
            s * (as_eigen(MatrixView<const float>(hv)) * as_eigen(b_of(bm, e, f)).transpose());
      };
      adapted(a, w_of(weights.base.w1, e, f), on.w1, ad.a1, ad.b1, saved.h1);
      if (gated()) {
        const MatrixView<float> g = gate.middle_rows(r0, rows);
        adapted(g, w_of(weights.base.w3, e, f), on.w3, ad.a3, ad.b3, saved.h3);
        detail::activate_rows(act, a, g, h);
      } else {
        detail::activate_rows(act, a, MatrixView<const float>(), h);
      }
      const auto hm = as_eigen(MatrixView<const float>(h));
      auto ym = as_eigen(y.middle_rows(r0, rows));
      ym.noalias() = hm * as_eigen(w_of(weights.base.w2, e, d)).transpose();
      if (on.w2) {
        const MatrixView<float> hv = saved.h2.empty() ? rank : saved.h2.middle_rows(r0, rows);
        as_eigen(hv).noalias() = hm * as_eigen(a_of(ad.a2, e)).transpose();
        ym.noalias() +=
            s * (as_eigen(MatrixView<const float>(hv)) * as_eigen(b_of(ad.b2, e, d)).transpose());
      }
    });
  }

  // Backward of forward given dy = dL/dy (N x d), with what that forward
  // saved (pre, and gate for kGated, required). dx: N x d (overwritten) or
  // empty; grads: see ExpertLoraGrads.
  void backward(MatrixView<const float> dy, MatrixView<const float> buffer,
                VectorView<const index_t> offsets, const ExpertLoraWeights& weights,
                const ExpertLoraSaved<const float>& saved, MatrixView<float> dx,
                const ExpertLoraGrads& grads, VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::ExpertLora::backward");
    const index_t n = check_common(buffer, offsets, weights, workspace);
    const Present on = check_adapters(weights.lora, kWeightNames);
    const index_t d = config_.d_model, f = config_.d_ff;
    check_shape(dy, n, d, "dy");
    check_saved(saved, on, n, /*backward=*/true);
    const bool want_dx = !dx.empty();
    if (want_dx) check_shape(dx, n, d, "dx");
    check_grads(grads, on);
    OverlapCheck overlap("cpu::ExpertLora::backward");
    overlap
        .out({{dx, "dx"},
              {grads.da1, "grads.da1"},
              {grads.db1, "grads.db1"},
              {grads.da3, "grads.da3"},
              {grads.db3, "grads.db3"},
              {grads.da2, "grads.da2"},
              {grads.db2, "grads.db2"},
              {workspace.segment(0, workspace_size(n)), "workspace"}})
        .in({{dy, "dy"},
             {buffer, "buffer"},
             {offsets, "offsets"},
             {saved.pre, "saved.pre"},
             {saved.gate, "saved.gate"},
             {saved.h1, "saved.h1"},
             {saved.h3, "saved.h3"},
             {saved.h2, "saved.h2"}});
    add_weights(overlap, weights);
    overlap.check();

    const bool want_a1 = !grads.da1.empty(), want_b1 = !grads.db1.empty();
    const bool want_a3 = !grads.da3.empty(), want_b3 = !grads.db3.empty();
    const bool want_a2 = !grads.da2.empty(), want_b2 = !grads.db2.empty();
    const bool want_dh = want_dx || want_a1 || want_b1 || want_a3 || want_b3;
    const bool want_dh2 = on.w2 && (want_a2 || want_dh);
    const bool need_h = want_a2 || (want_b2 && saved.h2.empty());
    const bool acc = grads.accumulate;

    // Empty experts: their gradient blocks are 0 (overwrite mode).
    if (!acc) {
      for (int e = 0; e < kExperts; ++e) {
        if (offsets[e + 1] != offsets[e]) continue;
        if (want_a1) as_eigen(a_of(grads.da1, e)).setZero();
        if (want_b1) as_eigen(b_of(grads.db1, e, f)).setZero();
        if (want_a3) as_eigen(a_of(grads.da3, e)).setZero();
        if (want_b3) as_eigen(b_of(grads.db3, e, f)).setZero();
        if (want_a2) as_eigen(a_of(grads.da2, e)).setZero();
        if (want_b2) as_eigen(b_of(grads.db2, e, d)).setZero();
      }
    }
    if (!want_dh && !want_a2 && !want_b2) return;

    const Scratch ws = scratch(workspace, n);
    const float s = scale_;
    const ExpertAdapters<const float>& ad = weights.lora;
    const Activation act = config_.activation;
    for_each_expert(offsets, [&](int e, index_t r0, index_t rows) {
      const auto g_y = as_eigen(dy.middle_rows(r0, rows));
      const MatrixView<const float> xv = buffer.middle_rows(r0, rows);
      const auto x = as_eigen(xv);
      const MatrixView<const float> a = saved.pre.middle_rows(r0, rows);
      const MatrixView<const float> g =
          gated() ? saved.gate.middle_rows(r0, rows) : MatrixView<const float>();
      const MatrixView<float> s0 = ws.s0.middle_rows(r0, rows);  // dh, then da
      const MatrixView<float> s1 = ws.s1.middle_rows(r0, rows);  // h, then dg
      const MatrixView<float> rank = ws.r0.middle_rows(r0, rows);
      const MatrixView<float> dr = ws.r1.middle_rows(r0, rows);  // dh1, dh2, dh3 in turn
      const auto drm = as_eigen(MatrixView<const float>(dr));

      if (need_h) detail::activate_rows(act, a, g, s1);
      const auto h = as_eigen(MatrixView<const float>(s1));
      if (want_b2) {  // dB2 = s dy^T h2, h2 saved or recomputed from h
        MatrixView<const float> h2 = saved.h2;
        if (h2.empty()) {
          as_eigen(rank).noalias() = h * as_eigen(a_of(ad.a2, e)).transpose();
          h2 = rank;
        } else {
          h2 = h2.middle_rows(r0, rows);
        }
        detail::assign_or_add(as_eigen(b_of(grads.db2, e, d)), s * (g_y.transpose() * as_eigen(h2)),
                              acc);
      }
      if (want_dh2) {  // dh2 = s dy B2, dA2 = dh2^T h
        as_eigen(dr).noalias() = s * (g_y * as_eigen(b_of(ad.b2, e, d)));
        if (want_a2) detail::assign_or_add(as_eigen(a_of(grads.da2, e)), drm.transpose() * h, acc);
      }
      if (!want_dh) return;

      as_eigen(s0).noalias() = g_y * as_eigen(w_of(weights.base.w2, e, d));  // dh
      if (want_dh2) as_eigen(s0).noalias() += drm * as_eigen(a_of(ad.a2, e));
      detail::activate_rows_backward(act, a, g, s0, s1);
      const auto da = as_eigen(MatrixView<const float>(s0));
      const auto dg = as_eigen(MatrixView<const float>(s1));
      auto dxm = as_eigen(want_dx ? dx.middle_rows(r0, rows) : MatrixView<float>());
      if (want_dx) {
        dxm.noalias() = da * as_eigen(w_of(weights.base.w1, e, f));
        if (gated()) dxm.noalias() += dg * as_eigen(w_of(weights.base.w3, e, f));
      }
      // One adapter on W1 (t = da) or W3 (t = dg), input X.
      const auto input_side = [&](const auto& t, bool has, MatrixView<const float> am,
                                  MatrixView<const float> bm, MatrixView<const float> hs,
                                  MatrixView<float> dam, MatrixView<float> dbm) {
        if (!has) return;
        if (!dbm.empty()) {  // dB = s t^T (X A^T), saved or recomputed
          MatrixView<const float> hv = hs;
          if (hv.empty()) {
            as_eigen(rank).noalias() = x * as_eigen(a_of(am, e)).transpose();
            hv = rank;
          } else {
            hv = hv.middle_rows(r0, rows);
          }
          detail::assign_or_add(as_eigen(b_of(dbm, e, f)), s * (t.transpose() * as_eigen(hv)), acc);
        }
        if (dam.empty() && !want_dx) return;
        as_eigen(dr).noalias() = s * (t * as_eigen(b_of(bm, e, f)));
        if (!dam.empty()) detail::assign_or_add(as_eigen(a_of(dam, e)), drm.transpose() * x, acc);
        if (want_dx) dxm.noalias() += drm * as_eigen(a_of(am, e));
      };
      input_side(da, on.w1, ad.a1, ad.b1, saved.h1, grads.da1, grads.db1);
      if (gated()) input_side(dg, on.w3, ad.a3, ad.b3, saved.h3, grads.da3, grads.db3);
    });
  }

  // Folds expert e's adapters into its blocks of the frozen weights (w1, w3,
  // w2 as in ExpertWeights, mutable; w3 empty for kPlain): W += s B A for
  // every matrix that has an adapter.
  void merge(index_t expert, MatrixView<float> w1, MatrixView<float> w3, MatrixView<float> w2,
             const ExpertAdapters<const float>& adapters) const {
    const Present on = check_merge(expert, w1, w3, w2, adapters, "cpu::ExpertLora::merge");
    apply_delta(on, expert, w1, w3, w2, adapters, scale_);
  }
  // W -= s B A: undoes merge up to one rounding per element.
  void unmerge(index_t expert, MatrixView<float> w1, MatrixView<float> w3, MatrixView<float> w2,
               const ExpertAdapters<const float>& adapters) const {
    const Present on = check_merge(expert, w1, w3, w2, adapters, "cpu::ExpertLora::unmerge");
    apply_delta(on, expert, w1, w3, w2, adapters, -scale_);
  }
  // merge, but refuses (Errc::kNonFinite, every weight untouched) if any
  // merged value of any of the three blocks would be NaN or infinite.
  void safe_merge(index_t expert, MatrixView<float> w1, MatrixView<float> w3, MatrixView<float> w2,
                  const ExpertAdapters<const float>& adapters) const {
    const Present on = check_merge(expert, w1, w3, w2, adapters, "cpu::ExpertLora::safe_merge");
    const index_t d = config_.d_model, f = config_.d_ff;
    const auto e = static_cast<int>(expert);
    // Check all blocks before writing any; lora_safe_merge on an offending
    // block throws with the element named and writes nothing.
    const auto check = [&](bool has, MatrixView<float> w, MatrixView<const float> am,
                           MatrixView<const float> bm, index_t rows) {
      if (!has) return;
      const MatrixView<float> blk = w.middle_rows(expert * rows, rows);
      const MatrixView<const float> ae = a_of(am, e), be = b_of(bm, e, rows);
      if (detail::lora_apply_delta<kRank>(blk, ae, be, scale_, /*check_only=*/true) < rows) {
        detail::lora_safe_merge<kRank>(blk, ae, be, scale_);
      }
    };
    check(on.w1, w1, adapters.a1, adapters.b1, f);
    check(on.w3, w3, adapters.a3, adapters.b3, f);
    check(on.w2, w2, adapters.a2, adapters.b2, d);
    apply_delta(on, expert, w1, w3, w2, adapters, scale_);
  }

 private:
  // Which of the three matrices carry an adapter.
  struct Present {
    bool w1 = false, w3 = false, w2 = false;
  };

  struct Scratch {
    MatrixView<float> s0, s1;  // N x d_ff
    MatrixView<float> r0, r1;  // N x R
  };

  Scratch scratch(VectorView<std::byte> workspace, index_t n) const {
    if (n == 0) return {};
    const index_t f = config_.d_ff;
    float* base = reinterpret_cast<float*>(workspace.data());
    return {MatrixView<float>(base, n, f), MatrixView<float>(base + n * f, n, f),
            MatrixView<float>(base + 2 * n * f, n, kRank),
            MatrixView<float>(base + 2 * n * f + n * kRank, n, kRank)};
  }

  template <class T>
  static MatrixView<T> a_of(MatrixView<T> a, int e) {
    return a.middle_rows(index_t{e} * kRank, kRank);
  }
  template <class T>
  static MatrixView<T> b_of(MatrixView<T> b, int e, index_t rows) {
    return b.middle_rows(index_t{e} * rows, rows);
  }
  static MatrixView<const float> w_of(MatrixView<const float> w, int e, index_t rows) {
    return w.middle_rows(index_t{e} * rows, rows);
  }

  template <class T>
  static void check_absent(MatrixView<T> v, const char* name, const char* why) {
    MOEKIT_CHECK(v.empty(), Errc::kInvalidArgument, name, " is ", v.rows(), " x ", v.cols(),
                 " but must be empty (", why, ")");
  }

  // One adapter pair: both empty (absent) or both of the stacked shapes.
  template <class T>
  static bool check_pair(MatrixView<T> a, MatrixView<T> b, index_t d_in, index_t d_out,
                         const char* a_name, const char* b_name) {
    if (a.empty() && b.empty()) return false;
    MOEKIT_CHECK(!a.empty() && !b.empty(), Errc::kInvalidArgument, a.empty() ? b_name : a_name,
                 " is given but ", a.empty() ? a_name : b_name,
                 " is empty (an adapter needs both matrices; both empty = no adapter)");
    detail::check_rank_rows(a, index_t{kExperts} * kRank, kRank, a_name);
    check_shape(a, index_t{kExperts} * kRank, d_in, a_name);
    detail::check_rank_cols(b, kRank, b_name);
    check_shape(b, index_t{kExperts} * d_out, kRank, b_name);
    return true;
  }

  // Argument names for messages: the adapters of a call, or of init / merge.
  struct AdapterNames {
    const char *a1, *b1, *a3, *b3, *a2, *b2;
  };
  static constexpr AdapterNames kWeightNames{"weights.lora.a1", "weights.lora.b1",
                                             "weights.lora.a3", "weights.lora.b3",
                                             "weights.lora.a2", "weights.lora.b2"};
  static constexpr AdapterNames kAdapterNames{"adapters.a1", "adapters.b1", "adapters.a3",
                                              "adapters.b3", "adapters.a2", "adapters.b2"};

  template <class T>
  Present check_adapters(const ExpertAdapters<T>& ad, const AdapterNames& nm) const {
    const index_t d = config_.d_model, f = config_.d_ff;
    Present p;
    p.w1 = check_pair(ad.a1, ad.b1, d, f, nm.a1, nm.b1);
    if (gated()) {
      p.w3 = check_pair(ad.a3, ad.b3, d, f, nm.a3, nm.b3);
    } else {
      check_absent(ad.a3, nm.a3, "FfnKind::kPlain has no W3");
      check_absent(ad.b3, nm.b3, "FfnKind::kPlain has no W3");
    }
    p.w2 = check_pair(ad.a2, ad.b2, f, d, nm.a2, nm.b2);
    return p;
  }

  template <class T>
  void check_saved(const ExpertLoraSaved<T>& sv, const Present& on, index_t n,
                   bool backward) const {
    const index_t f = config_.d_ff;
    if (backward || !sv.pre.empty()) check_shape(sv.pre, n, f, "saved.pre");
    if (gated()) {
      if (backward || !sv.gate.empty()) check_shape(sv.gate, n, f, "saved.gate");
    } else {
      check_absent(sv.gate, "saved.gate", "FfnKind::kPlain has no gate");
    }
    const auto rank_view = [&](MatrixView<T> v, bool has, const char* name, const char* why) {
      if (v.empty()) return;
      if (!has) check_absent(v, name, why);
      detail::check_rank_cols(v, kRank, name);
      check_shape(v, n, kRank, name);
    };
    rank_view(sv.h1, on.w1, "saved.h1", "W1 has no adapter");
    rank_view(sv.h3, on.w3, "saved.h3",
              gated() ? "W3 has no adapter" : "FfnKind::kPlain has no W3");
    rank_view(sv.h2, on.w2, "saved.h2", "W2 has no adapter");
  }

  void check_grads(const ExpertLoraGrads& g, const Present& on) const {
    const index_t d = config_.d_model, f = config_.d_ff;
    const auto one = [&](MatrixView<float> v, bool has, index_t rows, index_t cols, bool is_a,
                         const char* name, const char* why) {
      if (v.empty()) return;
      if (!has) check_absent(v, name, why);
      if (is_a) {
        detail::check_rank_rows(v, rows, kRank, name);
      } else {
        detail::check_rank_cols(v, kRank, name);
      }
      check_shape(v, rows, cols, name);
    };
    const index_t er = index_t{kExperts} * kRank;
    const char* no3 = gated() ? "W3 has no adapter" : "FfnKind::kPlain has no W3";
    one(g.da1, on.w1, er, d, true, "grads.da1", "W1 has no adapter");
    one(g.db1, on.w1, index_t{kExperts} * f, kRank, false, "grads.db1", "W1 has no adapter");
    one(g.da3, on.w3, er, d, true, "grads.da3", no3);
    one(g.db3, on.w3, index_t{kExperts} * f, kRank, false, "grads.db3", no3);
    one(g.da2, on.w2, er, f, true, "grads.da2", "W2 has no adapter");
    one(g.db2, on.w2, index_t{kExperts} * d, kRank, false, "grads.db2", "W2 has no adapter");
  }

  // Checks what forward and backward share; returns N.
  index_t check_common(MatrixView<const float> buffer, VectorView<const index_t> offsets,
                       const ExpertLoraWeights& w, VectorView<std::byte> workspace) const {
    const index_t d = config_.d_model;
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
    check_base(w.base.w1, w.base.w3, w.base.w2, "weights.base.w1", "weights.base.w3",
               "weights.base.w2");
    detail::check_lora_workspace(workspace, workspace_size(n), n);
    return n;
  }

  template <class T>
  void check_base(MatrixView<T> w1, MatrixView<T> w3, MatrixView<T> w2, const char* n1,
                  const char* n3, const char* n2) const {
    const index_t d = config_.d_model, f = config_.d_ff;
    check_shape(w1, index_t{kExperts} * f, d, n1);
    if (gated()) {
      check_shape(w3, index_t{kExperts} * f, d, n3);
    } else {
      check_absent(w3, n3, "FfnKind::kPlain has no W3");
    }
    check_shape(w2, index_t{kExperts} * d, f, n2);
  }

  // `where`: the public function, for the overlap check (w1, w3, w2 are written).
  Present check_merge(index_t expert, MatrixView<float> w1, MatrixView<float> w3,
                      MatrixView<float> w2, const ExpertAdapters<const float>& adapters,
                      const char* where) const {
    MOEKIT_CHECK_RANGE(expert, 0, kExperts);
    check_base(w1, w3, w2, "w1", "w3", "w2");
    const Present on = check_adapters(adapters, kAdapterNames);
    OverlapCheck overlap(where);
    overlap.out({{w1, "w1"}, {w3, "w3"}, {w2, "w2"}});
    add_adapters(overlap, adapters, /*written=*/false);
    overlap.check();
    return on;
  }

  // The adapters (the `adapters` argument) and weights of a call, for its OverlapCheck.
  static void add_adapters(OverlapCheck& c, const ExpertAdapters<const float>& ad, bool written) {
    const std::initializer_list<Footprint> views = {{ad.a1, "adapters.a1"}, {ad.b1, "adapters.b1"},
                                                    {ad.a3, "adapters.a3"}, {ad.b3, "adapters.b3"},
                                                    {ad.a2, "adapters.a2"}, {ad.b2, "adapters.b2"}};
    if (written) {
      c.out(views);
    } else {
      c.in(views);
    }
  }
  static void add_weights(OverlapCheck& c, const ExpertLoraWeights& w) {
    c.in({{w.base.w1, "weights.base.w1"},
          {w.base.w3, "weights.base.w3"},
          {w.base.w2, "weights.base.w2"},
          {w.lora.a1, "weights.lora.a1"},
          {w.lora.b1, "weights.lora.b1"},
          {w.lora.a3, "weights.lora.a3"},
          {w.lora.b3, "weights.lora.b3"},
          {w.lora.a2, "weights.lora.a2"},
          {w.lora.b2, "weights.lora.b2"}});
  }

  void apply_delta(const Present& on, index_t expert, MatrixView<float> w1, MatrixView<float> w3,
                   MatrixView<float> w2, const ExpertAdapters<const float>& ad,
                   float signed_scale) const {
    const index_t d = config_.d_model, f = config_.d_ff;
    const auto e = static_cast<int>(expert);
    const auto one = [&](bool has, MatrixView<float> w, MatrixView<const float> am,
                         MatrixView<const float> bm, index_t rows) {
      if (!has) return;
      detail::lora_apply_delta<kRank>(w.middle_rows(expert * rows, rows), a_of(am, e),
                                      b_of(bm, e, rows), signed_scale, /*check_only=*/false);
    };
    one(on.w1, w1, ad.a1, ad.b1, f);
    one(on.w3, w3, ad.a3, ad.b3, f);
    one(on.w2, w2, ad.a2, ad.b2, d);
  }

  // ExpertFfn's threading rule and loop (expert_ffn.hpp).
  template <class Body>
  void for_each_expert(VectorView<const index_t> offsets, Body&& body) const {
    detail::for_each_expert<kExperts>(config_.threading, offsets, body);
  }

  ExpertLoraConfig config_;
  float scale_ = 0.0f;
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
