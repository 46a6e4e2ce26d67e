#pragma once
// Classification math shared by every backend (DESIGN.md §4: heads, knowledge
// distillation, early exit), one row of C logits at a time. Host-device, no
// Eigen: the CPU backend calls these per row and CUDA kernels will too.
//
// Softmax cross-entropy of a row z with label y:
//   lse = log sum_c exp(z_c),   CE = lse - z_y,   dCE/dz = softmax(z) - onehot(y)
// Knowledge distillation of student logits s against teacher logits t at
// temperature T with mixing a (DESIGN.md §4):
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
// p and log q are formed as (z - max)/T - log Z, never as log(exp(.)), so a p
// that underflows to 0 contributes 0 log 0 = 0 to KL, not NaN.
//
// Non-finite logits. The loss functions (cross_entropy_row, distillation_row)
// do not sanitise: a NaN or Inf logit gives a non-finite loss and gradient,
// which the caller sees. The exit scores follow the routing rule
// (core/routing.hpp) so that a decision is always defined: NaN counts as
// -inf; a row with +inf entries puts equal mass on them; a row with no entry
// above -inf is uniform. So confidence is always in [1/C, 1], top1 a valid
// class, and a NaN never makes a sample exit by itself.

#include <cmath>

#include "moekit/core/config.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/types.hpp"

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
  float min_confidence = routing::kInf;
  float max_entropy = -routing::kInf;
  float min_margin = routing::kInf;
  int patience = 0;
};

namespace classify {

// What a row's exit decision reads (formulas at the top).
struct ExitScores {
  int top1 = 0;
  float confidence = 0.0f;
  float margin = 0.0f;
  float entropy = 0.0f;
};

// KL(p || q) and CE(y, softmax(s)) of one row, unscaled.
struct DistillationTerms {
  double kl = 0.0;
  double ce = 0.0;
};

MOEKIT_HOST_DEVICE inline float log_(float v) {
  using std::log;
  return log(v);
}

// max_c z_c (no sanitising; for the loss functions).
MOEKIT_HOST_DEVICE inline float row_max(const float* z, index_t n) {
  float m = z[0];
  for (index_t c = 1; c < n; ++c) m = z[c] > m ? z[c] : m;
  return m;
}

// sum_c exp((z_c - m) * inv_t) in double; m = row_max(z), inv_t > 0.
MOEKIT_HOST_DEVICE inline double sum_exp(const float* z, index_t n, float m, float inv_t) {
  double s = 0.0;
  for (index_t c = 0; c < n; ++c) s += static_cast<double>(routing::exp_((z[c] - m) * inv_t));
  return s;
}

// argmax_c z_c with NaN as -inf, ties -> lower class; n >= 1.
MOEKIT_HOST_DEVICE inline int argmax(const float* z, index_t n) {
  int best = 0;
  float v = routing::sanitize(z[0]);
  for (index_t c = 1; c < n; ++c) {
    const float x = routing::sanitize(z[c]);
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
MOEKIT_HOST_DEVICE inline double cross_entropy_row(const float* z, index_t n, int y, float scale,
                                                   float* dz) {
  const float m = row_max(z, n);
  const double total = sum_exp(z, n, m, 1.0f);
  if (dz != nullptr) {
    const float inv = static_cast<float>(1.0 / total);
    for (index_t c = 0; c < n; ++c) {
      const float p = routing::exp_(z[c] - m) * inv;
      dz[c] = scale * (c == y ? p - 1.0f : p);
    }
  }
  using std::log;
  return log(total) - static_cast<double>(z[y] - m);
}

// Distillation terms of one row: student s and teacher t (n >= 1 classes),
// temperature > 0, alpha in [0, 1], label y in [0, n) (ignored, and may be
// anything, when alpha = 1). When ds is not null writes
// ds_c = scale (alpha T (q_c - p_c) + (1 - alpha) (r_c - [c == y])).
MOEKIT_HOST_DEVICE inline DistillationTerms distillation_row(const float* s, const float* t,
                                                             index_t n, int y, float temperature,
                                                             float alpha, float scale, float* ds) {
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
    const float log_q = (s[c] - ms) * inv_t - log_zq;
    const float log_p = (t[c] - mt) * inv_t - log_zp;
    const float p = routing::exp_(log_p), q = routing::exp_(log_q);
    kl += static_cast<double>(p) * (static_cast<double>(log_p) - static_cast<double>(log_q));
    if (ds != nullptr) {
      float g = g_kl * (q - p);
      if (want_ce) {
        const float r = routing::exp_(s[c] - ms) * inv_zr;
        g += g_ce * (c == y ? r - 1.0f : r);
      }
      ds[c] = g;
    }
  }
  out.kl = kl > 0.0 ? kl : 0.0;  // KL >= 0; rounding may dip below by an ulp
  out.ce = want_ce ? log(zr) - static_cast<double>(s[y] - ms) : 0.0;
  return out;
}

// The exit scores of row z (n >= 1), under the non-finite rule at the top.
MOEKIT_HOST_DEVICE inline ExitScores exit_scores(const float* z, index_t n) {
  ExitScores out;
  out.top1 = argmax(z, n);
  const float m = routing::sanitize(z[out.top1]);
  // p_c = w_c / total with w_c = exp(z_c - m), or the rule's masses.
  const bool special = !routing::is_finite(m);  // +inf present, or all -inf / NaN
  double total = 0.0;
  for (index_t c = 0; c < n; ++c) {
    const float x = routing::sanitize(z[c]);
    total += special ? ((x == m) ? 1.0 : 0.0) : static_cast<double>(routing::exp_(x - m));
  }
  const float inv = static_cast<float>(1.0 / total);
  float p1 = 0.0f, p2 = 0.0f;
  double plogp = 0.0;  // sum p log p
  using std::log;
  const double log_total = log(total);
  for (index_t c = 0; c < n; ++c) {
    const float x = routing::sanitize(z[c]);
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
