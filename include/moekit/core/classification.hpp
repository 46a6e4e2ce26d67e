#pragma once
// Classification math shared by every backend (docs/math.md: heads, knowledge
// distillation, early exit), one row of C logits at a time. Host-device, no
// Eigen: the CPU backend calls these per row and CUDA kernels will too.
//
// Softmax cross-entropy of a row z with label y:
//   lse = log sum_c exp(z_c),   CE = lse - z_y,   dCE/dz = softmax(z) - onehot(y)
// Knowledge distillation of student logits s against teacher logits t at
// temperature T with mixing a (docs/math.md, "Knowledge distillation"):
//   p = softmax(t / T),  q = softmax(s / T),  r = softmax(s)
//   L = a T^2 KL(p || q) + (1 - a) CE(y, r),   KL(p || q) = sum_c p_c (log p_c - log q_c)
//   dL/ds = a T (q - p) + (1 - a) (r - onehot(y))
// Exit scores of a row (early exit), with P = softmax(z):
//   confidence = max_c P_c,   margin = P_(1) - P_(2) (the two largest; 0 for
//   P_(2) when C = 1),   entropy = -sum_c P_c log P_c in nats (0 log 0 = 0),
//   top1 = argmax_c z_c (ties -> lower class).
//
// Evaluation. log-sum-exp is taken about the row maximum, so no exp
// overflows; exp and log run in float per element, every sum over classes
// in double (a 32k-class row then sums without losing the small terms). log
// p and log q are formed as (z - max)/T - log Z, never as log(exp(.)), and a
// class with p = 0 (underflow, or a -inf logit such as TaskHeads' padding of
// a head with fewer classes) adds 0 log 0 = 0 to KL, whatever q is: padding
// a row with -inf classes leaves its KL and gradient unchanged.
//
// Element types. The row functions take rows of any type Z that converts to
// float (float on the CPU; __nv_bfloat16 and __half in CUDA kernels) and
// write gradients of any type D constructible from float; every value is
// read once as float and the math runs in float / double as above, so a
// bf16 row gives the fp32 result of its rounded values.
//
// Non-finite logits. The loss functions (cross_entropy_row, distillation_row)
// do not sanitise: a NaN or +Inf logit, or a row with no class above -inf,
// gives a non-finite loss, which the caller sees. A -inf logit is a masked
// class (probability 0): finite results, unless the mass it lacks is needed
// (the label's class, or a student -inf where the teacher's p > 0: +inf). The exit scores follow
// the routing rule (core/routing.hpp) so that a decision is always defined: NaN counts as -inf; a
// row with +inf entries puts equal mass on them; a row with no entry above -inf is uniform. So
// confidence is always in [1/C, 1], top1 a valid class, and a NaN never makes a sample exit by
// itself.

#include <cmath>
#include <cstdint>
#include <span>
#include <string>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"

MOEKIT_NAMESPACE_BEGIN

// The per-sample exit rules of early exit (moekit/cpu/early_exit.hpp). A rule
// is off at its default; a sample passes when ANY enabled rule passes.
//   confidence  max probability >= min_confidence (off: +inf)
//   entropy     entropy <= max_entropy, in nats (off: -inf)
//   margin      top-2 probability margin >= min_margin (off: +inf)
//   patience    the argmax equals the previous exit's argmax at `patience`
//               consecutive exits, i.e. exits i - patience, ..., i all agree
//               (PABEE's counter reaching `patience`; off: 0). The first exit
//               can pass it only with patience 0, which is off.
struct ExitCriteria {
  float min_confidence = routing::kInf;  // in [0, 1], or +inf (off)
  float max_entropy = -routing::kInf;    // nats, >= 0, or -inf (off)
  float min_margin = routing::kInf;      // in [0, 1], or +inf (off)
  int patience = 0;                      // consecutive agreeing exits, >= 0; 0 is off
};

// ---- configurations shared by the backends (validated on the host) --------

// Early exit (cpu::EarlyExit, gpu::EarlyExit).
struct EarlyExitConfig {
  ExitCriteria criteria{};  // which rules are on (all off by default)
  int num_exits = 0;        // exits in the model; the last takes every live row
};

// Rejects criteria that cannot be meant (naming the field and value).
inline void check_early_exit_config(const EarlyExitConfig& config) {
  const ExitCriteria& c = config.criteria;
  MOEKIT_CHECK_ARG(config.num_exits >= 1, "config.num_exits = ", config.num_exits,
                   " must be at least 1");
  MOEKIT_CHECK_ARG(
      c.min_confidence == routing::kInf || (c.min_confidence >= 0.0f && c.min_confidence <= 1.0f),
      "config.criteria.min_confidence = ", c.min_confidence, " must be in [0, 1] or +inf (off)");
  MOEKIT_CHECK_ARG(c.min_margin == routing::kInf || (c.min_margin >= 0.0f && c.min_margin <= 1.0f),
                   "config.criteria.min_margin = ", c.min_margin,
                   " must be in [0, 1] or +inf (off)");
  MOEKIT_CHECK_ARG(
      c.max_entropy == -routing::kInf || (c.max_entropy >= 0.0f && c.max_entropy < routing::kInf),
      "config.criteria.max_entropy = ", c.max_entropy, " must be finite and >= 0, or -inf (off)");
  MOEKIT_CHECK_ARG(c.patience >= 0, "config.criteria.patience = ", c.patience,
                   " must be >= 0 (0 is off)");
}

// Per-sample results of early exit in the batch's original order (n entries
// each), in the backend's memory (cpu::EarlyExit, gpu::EarlyExit).
struct ExitResults {
  VectorView<std::int32_t> prediction{};  // argmax class at the exit taken
  VectorView<float> confidence{};         // max probability there
  VectorView<std::int32_t> exit{};        // exit taken, 0-based; -1 while live
};

// The live rows (capacity n each; the first m entries are live).
struct ExitState {
  VectorView<index_t> original{};       // original index of live row r, increasing
  VectorView<std::int32_t> previous{};  // argmax at the previous exit, -1 before exit 0
  VectorView<std::int32_t> agree{};     // patience counter
};

// Rejects results views that are not n entries each (n samples).
inline void check_exit_results(const ExitResults& results, index_t n) {
  check_shape(results.exit, n, "results.exit");
  check_shape(results.prediction, n, "results.prediction");
  check_shape(results.confidence, n, "results.confidence");
}

// Rejects state views that are null or hold fewer than m entries (m live rows).
inline void check_exit_state(const ExitState& state, index_t m) {
  check_view(state.original, "state.original");
  check_view(state.previous, "state.previous");
  check_view(state.agree, "state.agree");
  MOEKIT_CHECK(state.original.size() >= m && state.previous.size() >= m && state.agree.size() >= m,
               Errc::kShapeMismatch, "state views have ", state.original.size(), ", ",
               state.previous.size(), " and ", state.agree.size(),
               " entries (original, previous, agree), fewer than the ", m, " rows");
}

// The state and results of an early-exit call as OverlapCheck outputs.
inline void add_exit_outputs(OverlapCheck& c, const ExitState& state, const ExitResults& results) {
  c.out(Footprints{{state.original, "state.original"},
                   {state.previous, "state.previous"},
                   {state.agree, "state.agree"},
                   {results.prediction, "results.prediction"},
                   {results.confidence, "results.confidence"},
                   {results.exit, "results.exit"}});
}

// What EarlyExit::step checks on either backend before it decides: the exit
// index, the m x C logits of the live rows (C >= 1 when m > 0), the results
// (n = results.exit.size()), the state's capacity, kept, and that no output
// shares memory with another or with the logits (`where`: the caller's
// name). Returns n.
template <class Logits>
index_t check_exit_step(const char* where, int exit, int num_exits, const Logits& logits,
                        const ExitState& state, const ExitResults& results,
                        VectorView<index_t> kept) {
  MOEKIT_CHECK_RANGE(exit, 0, num_exits);
  check_view(logits, "logits");
  const index_t m = logits.rows(), c = logits.cols();
  MOEKIT_CHECK(m == 0 || c >= 1, Errc::kShapeMismatch, "logits is ", m, " x ", c,
               ": at least one class is needed");
  const index_t n = results.exit.size();
  check_exit_results(results, n);
  check_exit_state(state, m);
  check_view(kept, "kept");
  MOEKIT_CHECK(kept.size() >= m, Errc::kShapeMismatch, "kept has ", kept.size(),
               " entries, fewer than the ", m, " live rows");
  OverlapCheck overlap(where);
  add_exit_outputs(overlap, state, results);
  overlap.out(Footprints{{kept, "kept"}}).in(Footprints{{logits, "logits"}}).check();
  return n;
}

// The overlap check of multi_exit_loss on either backend: no dlogits[i] or
// exit_losses shares memory with another output or with an input (logits[j],
// labels, exit_weights). The number of views is the caller's, so pairs are
// tested here rather than in one OverlapCheck.
template <class In, class Out>
void check_multi_exit_overlap(const char* where, std::span<const In> logits,
                              VectorView<const std::int32_t> labels,
                              VectorView<const float> exit_weights, std::span<const Out> dlogits,
                              VectorView<double> exit_losses) {
  const auto name = [](const char* what, std::size_t i) {
    return std::string(what) + "[" + std::to_string(i) + "]";
  };
  const Footprint losses(exit_losses, "exit_losses");
  OverlapCheck(where)
      .out(Footprints{losses})
      .in(Footprints{{labels, "labels"}, {exit_weights, "exit_weights"}})
      .check();
  for (std::size_t j = 0; j < logits.size(); ++j) {
    if (overlap(losses, Footprint(logits[j], ""))) {
      OverlapCheck::fail(where, "exit_losses", name("logits", j), false);
    }
  }
  for (std::size_t i = 0; i < dlogits.size(); ++i) {
    const Footprint out(dlogits[i], "");
    const auto fail_if = [&](const Footprint& other, const std::string& other_name, bool is_out) {
      if (overlap(out, other)) OverlapCheck::fail(where, name("dlogits", i), other_name, is_out);
    };
    for (std::size_t j = 0; j < logits.size(); ++j) {
      fail_if(Footprint(logits[j], ""), name("logits", j), false);
    }
    for (std::size_t j = i + 1; j < dlogits.size(); ++j) {
      fail_if(Footprint(dlogits[j], ""), name("dlogits", j), true);
    }
    fail_if(losses, "exit_losses", true);
    fail_if(Footprint(labels, ""), "labels", false);
    fail_if(Footprint(exit_weights, ""), "exit_weights", false);
  }
}

// Knowledge distillation (cpu::distillation_loss, gpu::distillation_loss).
struct DistillationConfig {
  float temperature = 1.0f;  // T > 0
  float alpha = 0.5f;        // weight a of the soft (teacher) term, in [0, 1]
};

// Means over the batch of the distillation loss (formulas at the top).
struct DistillationLoss {
  double loss = 0.0;  // L
  double kl = 0.0;    // mean KL(p || q), without a T^2
  double ce = 0.0;    // mean CE(y, softmax(s)), without 1 - a; 0 when a = 1
};

// Rejects a temperature that is not finite and positive, or alpha outside [0, 1].
inline void check_distillation_config(const DistillationConfig& config) {
  const float temp = config.temperature, alpha = config.alpha;
  MOEKIT_CHECK_ARG(std::isfinite(temp) && temp > 0.0f, "config.temperature = ", temp,
                   " must be finite and positive");
  MOEKIT_CHECK_ARG(std::isfinite(alpha) && alpha >= 0.0f && alpha <= 1.0f, "config.alpha = ", alpha,
                   " must be in [0, 1]");
}

// How task heads combine the per-task losses (cpu::TaskHeads, gpu::TaskHeads).
enum class TaskWeighting {
  kFixed,        // L = sum w_h L_h
  kUncertainty,  // L = sum exp(-s_h) L_h + s_h
};

// The task weights, in HOST memory on both backends (H floats each).
struct TaskWeights {
  TaskWeighting kind = TaskWeighting::kFixed;  // which of the two views is used
  VectorView<const float> fixed{};             // kFixed: H weights >= 0, or empty for all 1
  VectorView<const float> log_vars{};          // kUncertainty: the H learned s_h
};

// TaskHeads::backward's outputs on both backends, each checked where it is
// not empty: dx (n x d), dw (total_classes x d) and db (total_classes; must
// be empty without a bias).
template <class X, class G>
void check_head_backward_outputs(MatrixView<X> dx, MatrixView<G> dw, VectorView<G> db, index_t n,
                                 index_t d, index_t total_classes, bool bias) {
  if (!dx.empty()) check_shape(dx, n, d, "dx");
  if (!dw.empty()) check_shape(dw, total_classes, d, "grads.dw");
  if (bias) {
    if (!db.empty()) check_shape(db, total_classes, "grads.db");
  } else {
    MOEKIT_CHECK(db.empty(), Errc::kInvalidArgument, "grads.db has ", db.size(),
                 " elements but must be empty: config.bias is false");
  }
}

// TaskHeads::backward's arguments on both backends, for its OverlapCheck
// (the caller adds its workspace): dx and the gradients written, the rest read.
template <class HeadWeightsT, class HeadGradsT>
void add_head_backward_args(OverlapCheck& c, const auto& dlogits, const auto& x,
                            VectorView<const std::int32_t> tasks, const HeadWeightsT& weights,
                            const auto& dx, const HeadGradsT& grads) {
  c.out(Footprints{{dx, "dx"}, {grads.dw, "grads.dw"}, {grads.db, "grads.db"}})
      .in(Footprints{{dlogits, "dlogits"},
                     {x, "x"},
                     {tasks, "tasks"},
                     {weights.w, "weights.w"},
                     {weights.b, "weights.b"}});
}

// Weights of H heads, and dlog_vars (H entries or empty; empty for kFixed).
// Reads only w's host arrays and the size of dlog_vars.
inline void check_task_weights(const TaskWeights& w, int heads, VectorView<float> dlog_vars) {
  if (w.kind == TaskWeighting::kFixed) {
    MOEKIT_CHECK(w.log_vars.empty() && dlog_vars.empty(), Errc::kInvalidArgument,
                 "log_vars / dlog_vars must be empty for TaskWeighting::kFixed, got ",
                 w.log_vars.size(), " / ", dlog_vars.size(), " elements");
    if (w.fixed.empty()) return;
    check_shape(w.fixed, heads, "weighting.fixed");
    for (int h = 0; h < heads; ++h) {
      MOEKIT_CHECK_ARG(std::isfinite(w.fixed[h]) && w.fixed[h] >= 0.0f, "weighting.fixed[", h,
                       "] = ", w.fixed[h], " must be finite and non-negative");
    }
    return;
  }
  MOEKIT_CHECK_ARG(w.kind == TaskWeighting::kUncertainty,
                   "weighting.kind = ", static_cast<int>(w.kind), " is not a TaskWeighting");
  MOEKIT_CHECK(w.fixed.empty(), Errc::kInvalidArgument, "weighting.fixed has ", w.fixed.size(),
               " elements but must be empty for TaskWeighting::kUncertainty");
  check_shape(w.log_vars, heads, "weighting.log_vars");
  if (!dlog_vars.empty()) check_shape(dlog_vars, heads, "dlog_vars");
  for (int h = 0; h < heads; ++h) {
    MOEKIT_CHECK_ARG(std::isfinite(w.log_vars[h]), "weighting.log_vars[", h, "] = ", w.log_vars[h],
                     " is not finite");
  }
}

// c_h: the weight of task h's loss in L (w checked).
inline double task_coefficient(const TaskWeights& w, int h) {
  if (w.kind == TaskWeighting::kUncertainty) return std::exp(-static_cast<double>(w.log_vars[h]));
  return w.fixed.empty() ? 1.0 : static_cast<double>(w.fixed[h]);
}

namespace classify {

// What a row's exit decision reads (formulas at the top).
struct ExitScores {
  int top1 = 0;             // argmax class (lowest index among ties)
  float confidence = 0.0f;  // max_c P_c
  float margin = 0.0f;      // P_(1) - P_(2)
  float entropy = 0.0f;     // -sum_c P_c log P_c, nats
};

// KL(p || q) and CE(y, softmax(s)) of one row, unscaled.
struct DistillationTerms {
  double kl = 0.0;  // KL(p || q) at temperature T
  double ce = 0.0;  // CE(y, softmax(s)), the hard-label term
};

// log(v) by an unqualified call: std::log on the host, CUDA's float log on
// the device.
MOEKIT_HOST_DEVICE inline float log_(float v) {
  using std::log;
  return log(v);
}

// An element as float (see "Element types" at the top).
template <class Z>
MOEKIT_HOST_DEVICE inline float value(const Z& v) {
  return static_cast<float>(v);
}

// max_c z_c (no sanitising; for the loss functions).
template <class Z>
MOEKIT_HOST_DEVICE inline float row_max(const Z* z, index_t n) {
  float m = value(z[0]);
  for (index_t c = 1; c < n; ++c) {
    const float x = value(z[c]);
    m = x > m ? x : m;
  }
  return m;
}

// sum_c exp((z_c - m) * inv_t) in double; m = row_max(z), inv_t > 0.
template <class Z>
MOEKIT_HOST_DEVICE inline double sum_exp(const Z* z, index_t n, float m, float inv_t) {
  double s = 0.0;
  for (index_t c = 0; c < n; ++c) {
    s += static_cast<double>(routing::exp_((value(z[c]) - m) * inv_t));
  }
  return s;
}

// argmax_c z_c with NaN as -inf, ties -> lower class; n >= 1.
template <class Z>
MOEKIT_HOST_DEVICE inline int argmax(const Z* z, index_t n) {
  int best = 0;
  float v = routing::sanitize(value(z[0]));
  for (index_t c = 1; c < n; ++c) {
    const float x = routing::sanitize(value(z[c]));
    if (x > v) {
      v = x;
      best = static_cast<int>(c);
    }
  }
  return best;
}

// Softmax cross-entropy of row z (n >= 1 classes) with label y in [0, n).
// Returns CE (in double). When dz is not null, writes
// dz_c = scale (softmax(z)_c - [c == y]) for every c.
template <class Z, class D>
MOEKIT_HOST_DEVICE inline double cross_entropy_row(const Z* z, index_t n, int y, float scale,
                                                   D* dz) {
  const float m = row_max(z, n);
  const double total = sum_exp(z, n, m, 1.0f);
  if (dz != nullptr) {
    const float inv = static_cast<float>(1.0 / total);
    for (index_t c = 0; c < n; ++c) {
      const float p = routing::exp_(value(z[c]) - m) * inv;
      dz[c] = static_cast<D>(scale * (c == y ? p - 1.0f : p));
    }
  }
  using std::log;
  return log(total) - static_cast<double>(value(z[y]) - m);
}

// Distillation terms of one row: student s and teacher t (n >= 1 classes),
// temperature > 0, alpha in [0, 1], label y in [0, n) (ignored, and may be
// anything, when alpha = 1). When ds is not null writes
// ds_c = scale (alpha T (q_c - p_c) + (1 - alpha) (r_c - [c == y])).
template <class Z, class D>
MOEKIT_HOST_DEVICE inline DistillationTerms distillation_row(const Z* s, const Z* t, index_t n,
                                                             int y, float temperature, float alpha,
                                                             float scale, D* ds) {
  using std::log;
  const float inv_t = 1.0f / temperature;
  const float ms = row_max(s, n), mt = row_max(t, n);
  const double zq = sum_exp(s, n, ms, inv_t);  // normaliser of q
  const double zp = sum_exp(t, n, mt, inv_t);  // of p
  const bool want_ce = alpha < 1.0f;
  const double zr = want_ce ? sum_exp(s, n, ms, 1.0f) : 1.0;  // of r
  const float log_zq = static_cast<float>(log(zq)), log_zp = static_cast<float>(log(zp));
  const float inv_zr = static_cast<float>(1.0 / zr);
  const float g_kl = scale * alpha * temperature, g_ce = scale * (1.0f - alpha);
  DistillationTerms out;
  double kl = 0.0;
  for (index_t c = 0; c < n; ++c) {
    const float sc = value(s[c]);
    const float log_q = (sc - ms) * inv_t - log_zq;
    const float log_p = (value(t[c]) - mt) * inv_t - log_zp;
    const float p = routing::exp_(log_p), q = routing::exp_(log_q);
    // p log(p / q) -> 0 as p -> 0, for any q: a class with p = 0 (a -inf
    // padding logit, or an underflow) adds nothing, even where log_q is
    // -inf too. Only an exact 0 is skipped: a NaN p still reaches the sum.
    if (p != 0.0f) {
      kl += static_cast<double>(p) * (static_cast<double>(log_p) - static_cast<double>(log_q));
    }
    if (ds != nullptr) {
      float g = g_kl * (q - p);
      if (want_ce) {
        const float r = routing::exp_(sc - ms) * inv_zr;
        g += g_ce * (c == y ? r - 1.0f : r);
      }
      ds[c] = static_cast<D>(g);
    }
  }
  // KL >= 0; rounding may dip below by an ulp. NaN and +inf stay as they are.
  out.kl = kl < 0.0 ? 0.0 : kl;
  out.ce = want_ce ? log(zr) - static_cast<double>(value(s[y]) - ms) : 0.0;
  return out;
}

// The exit scores of row z (n >= 1), under the non-finite rule at the top.
template <class Z>
MOEKIT_HOST_DEVICE inline ExitScores exit_scores(const Z* z, index_t n) {
  ExitScores out;
  out.top1 = argmax(z, n);
  const float m = routing::sanitize(value(z[out.top1]));
  // p_c = w_c / total with w_c = exp(z_c - m), or the rule's masses.
  const bool special = !routing::is_finite(m);  // +inf present, or all -inf / NaN
  double total = 0.0;
  for (index_t c = 0; c < n; ++c) {
    const float x = routing::sanitize(value(z[c]));
    total += special ? ((x == m) ? 1.0 : 0.0) : static_cast<double>(routing::exp_(x - m));
  }
  const float inv = static_cast<float>(1.0 / total);
  float p1 = 0.0f, p2 = 0.0f;
  double plogp = 0.0;  // sum p log p
  using std::log;
  const double log_total = log(total);
  for (index_t c = 0; c < n; ++c) {
    const float x = routing::sanitize(value(z[c]));
    float p;
    double log_p;
    if (special) {
      p = x == m ? inv : 0.0f;
      log_p = -log_total;
    } else {
      p = routing::exp_(x - m) * inv;
      log_p = static_cast<double>(x - m) - log_total;
    }
    if (p > 0.0f) plogp += static_cast<double>(p) * log_p;
    if (p > p1) {
      p2 = p1;
      p1 = p;
    } else if (p > p2) {  // an equal second maximum lands here: margin 0
      p2 = p;
    }
  }
  out.confidence = p1;
  out.margin = p1 - p2;
  out.entropy = plogp < 0.0 ? static_cast<float>(-plogp) : 0.0f;
  return out;
}

// Whether a row with these scores passes any enabled rule of c; `agree` is
// the count of consecutive exits, ending at this one, whose argmax equals the
// previous exit's (0 at the first exit or after a change).
MOEKIT_HOST_DEVICE inline bool exit_passes(const ExitCriteria& c, const ExitScores& s, int agree) {
  return s.confidence >= c.min_confidence || s.entropy <= c.max_entropy ||
         s.margin >= c.min_margin || (c.patience > 0 && agree >= c.patience);
}

}  // namespace classify
MOEKIT_NAMESPACE_END
