#pragma once
// Load-balancing losses and the aux-loss-free expert bias on the CPU backend
// (docs/math.md, "Balance losses"), computed from the Routing that Router<S>::forward/route wrote.
//
// Notation: T tokens, E experts, K per token; x = routing.logits (T x E, noise
// included), ids = routing.expert_ids, w = routing.weights (0 where dropped),
// kept(t, k) = routing.positions(t, k) >= 0, q_t = the routing distribution of
// token t (core/routing.hpp: p for the softmax rules, s / sum(s) for sigmoid),
// count_e = #{(t, k) : ids(t, k) = e}: assignments BEFORE capacity, so dropped
// ones count; counts are constants (no gradient).
//
//   switch_loss      f_e = count_e / N, N = T K (kTokensTimesK) or T (kTokens)
//                    P_e = (1/T) sum_t q_t[e]
//                    L   = E sum_e f_e P_e   (kTokensTimesK: 1 under perfect balance)
//                    dL/dq_t[e] = E f_e / T, taken to x by routing_distribution_backward
//   sequence_aux_loss  T = n L_s rows form n sequences of L_s tokens (DeepSeek-V3):
//                    L = (1/n) sum_s switch_loss(rows of sequence s, kTokensTimesK)
//   z_loss           lse_t = log sum_e exp x(t, e);   L = (1/T) sum_t lse_t^2
//                    dL/dx(t, e) = 2 lse_t softmax(x_t)_e / T
//   importance_load_loss (Shazeer et al. 2017)
//                    importance_e = sum_{t,k kept, ids(t,k) = e} w(t, k)
//                    load_e       = count_e, or the smooth estimate below
//                    CV^2(v) = Var(v) / (mean(v)^2 + 1e-10), Var the POPULATION
//                              variance (1/E) sum_e (v_e - mean(v))^2
//                    L = a CV^2(importance) + b CV^2(load)
//                    dCV^2/dv_e = 2 (v_e - m) / (E D) - 2 m Var / (E D^2),
//                              m = mean(v), D = m^2 + 1e-10
//     Smooth load, used when selection keys are the noisy logits themselves:
//     Gaussian noise of amount sigma > 0, rule kTopKSoftmax or kSoftmaxTopK, no
//     selection bias, num_groups <= 1 (otherwise load_e = count_e, no
//     gradient). With h = x (noisy) and c = h - sigma n
//     (clean: n regenerated with Router's counters, seed and t E + e),
//       load_e = sum_t Phi((c(t, e) - h(t, j)) / sigma)
//     where j = j(t, e) is the expert holding the K-th largest noisy logit of
//     token t when e is not among its top K, and the (K+1)-th when it is (order
//     and ties as in selection: higher first, equal -> lower index first): the
//     probability that e stays selected if its own noise is redrawn. With
//     z = (c(t, e) - h(t, j)) / sigma and the noise a constant (d/dc = d/dh):
//     d load_e / dx(t, e) = +phi(z) / sigma, d load_e / dx(t, j) = -phi(z) / sigma.
//     If K = E there is no (K+1)-th: every expert is always selected, Phi = 1,
//     no gradient. A token with a non-finite logit contributes its hard
//     selection (1 for its top K, 0 otherwise) with no gradient. The
//     importance gradient goes through the weights exactly like
//     Router::backward_gate (dropped slots: none).
//
// Every loss returns L unscaled as a double and, when dlogits is not empty,
// ADDS coeff * dL/dx to dlogits (T x E): one addition per element, so
// dlogits = g + aux equals g + (the same call on zeros) bit for bit. An empty
// dlogits asks for the value only. All arguments are validated before
// anything is written (expert ids: Errc::kOutOfRange); T = 0 gives L = 0.
//
// Non-finite logits in z_loss: a -inf logit is a masked expert (exp = 0, no
// gradient) and its row counts as usual. A row whose lse is undefined (a NaN
// or +inf logit, or every logit -inf) contributes 0 to the sum and gets no
// gradient, but still counts in T (the mean is over all T rows). The other
// losses read scores/weights, which gating keeps finite.
//
// Sums are deterministic: per-expert and loss sums run in double over tokens
// in order; only the per-row gradient loops run in parallel (disjoint rows).
//
// ExpertBias is the aux-loss-free balancing of DeepSeek-V3: it accumulates
// assignment counts over one or more micro-batches, then update() applies
// b_e += gamma * sign(mean_count - count_e) (sign(0) = 0) and resets them;
// bias() is the Router's selection_bias.

#include <array>
#include <cmath>
#include <cstdint>

#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/cpu/router.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// How switch_loss normalises f. kTokensTimesK (Switch/GShard generalised to
// top-k; 1 under perfect balance) or kTokens (count_e / T, as in several public
// top-k implementations: K times larger, K under perfect balance). Defined in
// core/routing.hpp, shared with the CUDA backend.
using ::moekit::SwitchNormalization;

using ::moekit::SwitchLossOptions;

// L = importance_weight * CV^2(importance) + load_weight * CV^2(load).
struct ImportanceLoadOptions {
  float importance_weight = 1.0f;  // >= 0; 0 leaves the importance term out
  float load_weight = 1.0f;        // >= 0; 0 leaves the load term out
};

// Added to mean^2 in CV^2 (Shazeer et al.) so an all-zero vector gives 0.
inline constexpr double kCvSquaredEpsilon = routing::kCvSquaredEpsilon;

namespace detail {

// An empty dlogits means "no gradient"; otherwise it must be T x E and
// share no memory with the routing it reads (`where`: the loss's name).
template <MoeSpecType S>
void check_aux_dlogits(MatrixView<float> dlogits, const Routing& routing, const char* where) {
  if (dlogits.empty()) return;
  check_shape(dlogits, routing.logits.rows(), S::num_experts, "dlogits");
  OverlapCheck(where)
      .out({{dlogits, "dlogits"}})
      .in({MOEKIT_ROUTING_ARGS(routing, "routing")})
      .check();
}

inline void check_aux_coeff(float coeff) {
  MOEKIT_CHECK_ARG(std::isfinite(coeff), "coeff = ", coeff, " is not finite");
}

// f_e = count_e / N for a batch of `tokens` tokens (header formulas).
template <int E, int K>
std::array<double, to_size(E)> switch_fractions(const std::array<index_t, to_size(E)>& count,
                                                index_t tokens, SwitchNormalization norm) {
  const double n_tokens = static_cast<double>(tokens);
  const double denom = norm == SwitchNormalization::kTokens ? n_tokens : n_tokens * K;
  std::array<double, to_size(E)> f{};
  for (std::size_t e = 0; e < to_size(E); ++e) f[e] = static_cast<double>(count[e]) / denom;
  return f;
}

// Adds grad_scale * dL/dx of the Switch form to the rows of dlogits, for
// rows of a batch of `tokens` tokens with fractions f: each row's gradient
// depends on its own scores and on f and T only.
template <int E>
void switch_gradient_rows(GatingRule rule, MatrixView<const float> logits,
                          MatrixView<const float> scores, const std::array<double, to_size(E)>& f,
                          index_t tokens, double grad_scale, MatrixView<float> dlogits) {
  const double n_tokens = static_cast<double>(tokens);
  float g[to_size(E)];  // grad_scale * dL/dq_t, the same for every token
  for (std::size_t e = 0; e < to_size(E); ++e)
    g[e] = static_cast<float>(grad_scale * E * f[e] / n_tokens);
  const index_t rows = scores.rows();
  MOEKIT_PARALLEL_FOR_IF(rows * E > kParallelGrain)
  for (index_t t = 0; t < rows; ++t) {
    float dx[to_size(E)] = {};
    routing::routing_distribution_backward<E>(rule, logits.row(t), scores.row(t), g, 1.0f, dx);
    float* row = dlogits.row(t);
    for (int e = 0; e < E; ++e) row[e] += dx[e];
  }
}

// The Switch form on the rows of `scores`/`ids` (already validated); adds
// grad_scale * dL/dx to dlogits when it is not empty. switch_loss and
// sequence_aux_loss (per sequence) both run this one implementation.
template <MoeSpecType S>
double switch_rows(GatingRule rule, MatrixView<const float> logits, MatrixView<const float> scores,
                   MatrixView<const std::int32_t> ids, SwitchNormalization norm, double grad_scale,
                   MatrixView<float> dlogits) {
  constexpr int kE = S::num_experts;
  constexpr int kK = S::top_k;
  const index_t tokens = scores.rows();
  if (tokens == 0) return 0.0;

  const std::array<double, to_size(kE)> f =
      switch_fractions<kE, kK>(assignment_counts<S>(ids), tokens, norm);
  const std::array<double, to_size(kE)> q_sum = routing_distribution_sum<S>(rule, scores);
  const double n_tokens = static_cast<double>(tokens);
  double sum = 0.0;
  for (std::size_t e = 0; e < kE; ++e) sum += f[e] * (q_sum[e] / n_tokens);
  if (!dlogits.empty())
    switch_gradient_rows<kE>(rule, logits, scores, f, tokens, grad_scale, dlogits);
  return kE * sum;
}

// CV^2(v) with the population variance; writes scale * dCV^2/dv to grad
// (routing::cv_squared, the one implementation both backends run).
template <int N>
double cv_squared(const std::array<double, to_size(N)>& v, double scale,
                  std::array<double, to_size(N)>& grad) {
  return routing::cv_squared<N>(v.data(), scale, grad.data());
}

inline double normal_cdf(double z) { return 0.5 * std::erfc(-z * 0.70710678118654752440); }
inline double normal_pdf(double z) { return 0.39894228040143267794 * std::exp(-0.5 * z * z); }

// Shazeer's smooth load for one token (see the header). Writes Phi to prob[e]
// and, for the gradient, phi(z) / sigma to density[e] and the threshold
// expert to thr[e] (-1: none, no gradient).
template <int E, int K>
void smooth_load_token(const float* h, float sigma, std::uint64_t seed, index_t token, double* prob,
                       double* density, int* thr) {
  constexpr int kTop = K < E ? K + 1 : E;
  float vals[to_size(kTop)];
  int order[to_size(kTop)];
  int n = 0;
  bool finite = true;
  for (int e = 0; e < E; ++e) {
    finite = finite && routing::is_finite(h[e]);
    routing::insert_top<kTop>(routing::sanitize(h[e]), e, vals, order, n, kTop);
  }
  bool selected[to_size(E)] = {};
  for (int k = 0; k < K; ++k) selected[order[k]] = true;
  for (int e = 0; e < E; ++e) {
    density[e] = 0.0;
    thr[e] = -1;
    if (!finite) {
      prob[e] = selected[e] ? 1.0 : 0.0;  // the hard selection, no gradient
      continue;
    }
    const int j = selected[e] ? (K < E ? order[K] : -1) : order[K - 1];
    if (j < 0) {
      prob[e] = 1.0;  // K = E: selected whatever the noise
      continue;
    }
    // The clean logit: undo the noise exactly as Router added it (in float).
    const float noise = sigma * random_normal(seed, static_cast<std::uint64_t>(token * E + e));
    const double z =
        (static_cast<double>(h[e]) - static_cast<double>(noise) - static_cast<double>(h[j])) /
        sigma;
    prob[e] = normal_cdf(z);
    density[e] = normal_pdf(z) / sigma;
    thr[e] = j;
  }
}

}  // namespace detail

// Switch / GShard balance loss (header formulas); returns L, adds coeff * dL/dx
// to dlogits (T x E) unless it is empty. `rule` is the router's gating rule.
template <MoeSpecType S>
double switch_loss(GatingRule rule, const Routing& routing, SwitchLossOptions options, float coeff,
                   MatrixView<float> dlogits = {}) {
  MOEKIT_API("cpu::switch_loss");
  check_routing<S>(routing, routing.logits.rows());
  check_expert_ids<S>(routing.expert_ids, "routing.expert_ids");
  detail::check_aux_dlogits<S>(dlogits, routing, "cpu::switch_loss");
  detail::check_aux_coeff(coeff);
  MOEKIT_CHECK_ARG(options.normalization == SwitchNormalization::kTokensTimesK ||
                       options.normalization == SwitchNormalization::kTokens,
                   "options.normalization = ", static_cast<int>(options.normalization),
                   " is not a SwitchNormalization");
  return detail::switch_rows<S>(rule, routing.logits, routing.scores, routing.expert_ids,
                                options.normalization, coeff, dlogits);
}

// The Switch loss's value from the statistics of the forward that routed
// the batch, at no extra cost: the same bits as switch_loss(rule, routing,
// options, coeff) (both sum the chunked distribution and the counts before
// capacity). No gradient: that needs the routing.
template <MoeSpecType S>
double switch_loss(const RoutingStats<S>& stats, SwitchLossOptions options = {}) {
  MOEKIT_API("cpu::switch_loss");
  MOEKIT_CHECK_ARG(options.normalization == SwitchNormalization::kTokensTimesK ||
                       options.normalization == SwitchNormalization::kTokens,
                   "options.normalization = ", static_cast<int>(options.normalization),
                   " is not a SwitchNormalization");
  return switch_loss_value<S::num_experts, S::top_k>(
      stats.tokens, stats.assigned, stats.mean_distribution, options.normalization);
}

// DeepSeek-V3's sequence-wise balance loss: consecutive blocks of
// sequence_length rows are sequences; the Switch form (kTokensTimesK) of each,
// averaged. T must be a multiple of sequence_length (Errc::kShapeMismatch).
template <MoeSpecType S>
double sequence_aux_loss(GatingRule rule, const Routing& routing, index_t sequence_length,
                         float coeff, MatrixView<float> dlogits = {}) {
  MOEKIT_API("cpu::sequence_aux_loss");
  const index_t tokens = routing.logits.rows();
  check_routing<S>(routing, routing.logits.rows());
  check_expert_ids<S>(routing.expert_ids, "routing.expert_ids");
  detail::check_aux_dlogits<S>(dlogits, routing, "cpu::sequence_aux_loss");
  detail::check_aux_coeff(coeff);
  MOEKIT_CHECK_ARG(sequence_length >= 1, "sequence_length = ", sequence_length,
                   " must be positive");
  MOEKIT_CHECK(tokens % sequence_length == 0, Errc::kShapeMismatch, "routing has T = ", tokens,
               " tokens, not a multiple of sequence_length = ", sequence_length);
  const index_t sequences = tokens / sequence_length;
  if (sequences == 0) return 0.0;
  const double scale = static_cast<double>(coeff) / static_cast<double>(sequences);
  double sum = 0.0;
  for (index_t s = 0; s < sequences; ++s) {
    const index_t r0 = s * sequence_length;
    sum += detail::switch_rows<S>(
        rule, routing.logits.middle_rows(r0, sequence_length),
        routing.scores.middle_rows(r0, sequence_length),
        routing.expert_ids.middle_rows(r0, sequence_length), SwitchNormalization::kTokensTimesK,
        scale, dlogits.empty() ? MatrixView<float>{} : dlogits.middle_rows(r0, sequence_length));
  }
  return sum / static_cast<double>(sequences);
}

// Router z-loss over routing.logits (header formulas and non-finite rule);
// returns L, adds coeff * dL/dx to dlogits unless it is empty.
template <MoeSpecType S>
double z_loss(const Routing& routing, float coeff, MatrixView<float> dlogits = {}) {
  MOEKIT_API("cpu::z_loss");
  const index_t tokens = routing.logits.rows();
  check_routing<S>(routing, routing.logits.rows());
  detail::check_aux_dlogits<S>(dlogits, routing, "cpu::z_loss");
  detail::check_aux_coeff(coeff);
  if (tokens == 0) return 0.0;

  const double n_tokens = static_cast<double>(tokens);
  const MatrixView<const float> logits = routing.logits;
  constexpr int E = S::num_experts;
  // Chunked like the router's statistic, with the same per-token function
  // (routing::z_loss_token, shared with CUDA): the same bits.
  const double sum = chunked_sum<E>(tokens, [&](index_t t) {
    return routing::z_loss_token<E>(logits.row(t), static_cast<double>(coeff), n_tokens,
                                    dlogits.empty() ? nullptr : dlogits.row(t));
  });
  return sum / n_tokens;
}

// The gradients alone of the Switch loss and the z-loss for some rows of a
// batch whose totals are given: `tokens` tokens in the whole batch and
// `assigned` assignments per expert before capacity (the batch's, not the
// rows'). Each adds coeff * dL/dx to the rows of dlogits exactly as
// switch_loss / z_loss do for those rows of the whole batch, so a batch
// split over ranks gets the gradients of one process (the expert-parallel
// layer's backward). logits, scores and dlogits: the same rows, x E.
template <MoeSpecType S>
void switch_loss_gradient(GatingRule rule, MatrixView<const float> logits,
                          MatrixView<const float> scores,
                          const std::array<index_t, to_size(S::num_experts)>& assigned,
                          index_t tokens, SwitchLossOptions options, float coeff,
                          MatrixView<float> dlogits) {
  MOEKIT_API("cpu::switch_loss_gradient");
  constexpr int kE = S::num_experts;
  check_shape(scores, logits.rows(), kE, "scores");
  check_shape(dlogits, logits.rows(), kE, "dlogits");
  detail::check_aux_coeff(coeff);
  MOEKIT_CHECK_ARG(options.normalization == SwitchNormalization::kTokensTimesK ||
                       options.normalization == SwitchNormalization::kTokens,
                   "options.normalization = ", static_cast<int>(options.normalization),
                   " is not a SwitchNormalization");
  MOEKIT_CHECK_ARG(tokens >= logits.rows(), "tokens = ", tokens, " is fewer than the ",
                   logits.rows(), " rows given");
  if (tokens == 0) return;
  const std::array<double, to_size(kE)> f =
      detail::switch_fractions<kE, S::top_k>(assigned, tokens, options.normalization);
  detail::switch_gradient_rows<kE>(rule, logits, scores, f, tokens, coeff, dlogits);
}

// The z-loss's, likewise (it needs the batch's size alone).
template <MoeSpecType S>
void z_loss_gradient(MatrixView<const float> logits, index_t tokens, float coeff,
                     MatrixView<float> dlogits) {
  MOEKIT_API("cpu::z_loss_gradient");
  constexpr int kE = S::num_experts;
  check_shape(dlogits, logits.rows(), kE, "dlogits");
  detail::check_aux_coeff(coeff);
  MOEKIT_CHECK_ARG(tokens >= logits.rows(), "tokens = ", tokens, " is fewer than the ",
                   logits.rows(), " rows given");
  const double n_tokens = static_cast<double>(tokens);
  MOEKIT_PARALLEL_FOR_IF(logits.rows() * kE > kParallelGrain)
  for (index_t t = 0; t < logits.rows(); ++t) {
    routing::z_loss_token<kE>(logits.row(t), static_cast<double>(coeff), n_tokens, dlogits.row(t));
  }
}

// Shazeer et al. (2017) importance and load losses (header formulas).
// `config` is the router's; `selection_bias` the bias routing was selected
// with (empty if none): a non-empty one rules out the smooth load estimate,
// since keys are then not the noisy logits. The smooth estimate assumes
// routing.logits came from Router::forward with this config (noise included).
// Returns L, adds coeff * dL/dx to dlogits unless it is empty.
template <MoeSpecType S>
double importance_load_loss(const RouterConfig& config, const Routing& routing,
                            VectorView<const float> selection_bias, ImportanceLoadOptions options,
                            float coeff, MatrixView<float> dlogits = {}) {
  MOEKIT_API("cpu::importance_load_loss");
  constexpr int kE = S::num_experts;
  constexpr int kK = S::top_k;
  const index_t tokens = routing.logits.rows();
  check_routing<S>(routing, routing.logits.rows());
  check_expert_ids<S>(routing.expert_ids, "routing.expert_ids");
  detail::check_aux_dlogits<S>(dlogits, routing, "cpu::importance_load_loss");
  detail::check_aux_coeff(coeff);
  if (!selection_bias.empty()) check_shape(selection_bias, kE, "selection_bias");
  MOEKIT_CHECK_ARG(std::isfinite(options.importance_weight) && options.importance_weight >= 0.0f,
                   "options.importance_weight = ", options.importance_weight,
                   " must be finite and non-negative");
  MOEKIT_CHECK_ARG(std::isfinite(options.load_weight) && options.load_weight >= 0.0f,
                   "options.load_weight = ", options.load_weight,
                   " must be finite and non-negative");
  check_noise(config.noise, "config.noise");
  MOEKIT_CHECK_ARG(std::isfinite(config.gating.scaling),
                   "config.gating.scaling = ", config.gating.scaling, " is not finite");

  const GatingConfig& gating = config.gating;
  const float sigma = config.noise.amount;
  const std::uint64_t seed = config.noise.seed;
  const bool smooth = config.noise.kind == NoiseKind::kGaussian && sigma > 0.0f &&
                      selection_bias.empty() && routing::selects_on_logits(gating, false) &&
                      gating.num_groups <= 1;

  std::array<double, to_size(kE)> importance{};
  std::array<double, to_size(kE)> load{};
  for (index_t t = 0; t < tokens; ++t) {
    for (int k = 0; k < kK; ++k) {
      const int e = routing.expert_ids(t, k);
      if (routing.positions(t, k) >= 0) importance[to_size(e)] += routing.weights(t, k);
      if (!smooth) load[to_size(e)] += 1.0;
    }
  }
  if (smooth) {
    for (index_t t = 0; t < tokens; ++t) {
      double prob[to_size(kE)], density[to_size(kE)];
      int thr[to_size(kE)];
      detail::smooth_load_token<kE, kK>(routing.logits.row(t), sigma, seed, t, prob, density, thr);
      for (int e = 0; e < kE; ++e) load[to_size(e)] += prob[e];
    }
  }
  // grad_* = coeff * dL/d(importance), coeff * dL/d(load).
  std::array<double, to_size(kE)> grad_importance{}, grad_load{};
  const double loss =
      options.importance_weight *
          detail::cv_squared<kE>(importance, static_cast<double>(coeff) * options.importance_weight,
                                 grad_importance) +
      options.load_weight *
          detail::cv_squared<kE>(load, static_cast<double>(coeff) * options.load_weight, grad_load);
  if (dlogits.empty()) return loss;

  MOEKIT_PARALLEL_FOR_IF(tokens * kE > kParallelGrain)
  for (index_t t = 0; t < tokens; ++t) {
    // Importance: dL/dw(t, k) for kept slots, then through gating.
    float dw[to_size(kK)];
    for (int k = 0; k < kK; ++k) {
      dw[k] = routing.positions(t, k) >= 0
                  ? static_cast<float>(grad_importance[to_size(routing.expert_ids(t, k))])
                  : 0.0f;
    }
    float dx[to_size(kE)];
    routing::gate_token_backward<kE, kK>(routing.logits.row(t), routing.scores.row(t),
                                         routing.expert_ids.row(t), dw, gating, dx);
    double total[to_size(kE)];
    for (int e = 0; e < kE; ++e) total[e] = dx[e];
    if (smooth) {
      double prob[to_size(kE)], density[to_size(kE)];
      int thr[to_size(kE)];
      detail::smooth_load_token<kE, kK>(routing.logits.row(t), sigma, seed, t, prob, density, thr);
      for (int e = 0; e < kE; ++e) {
        if (thr[e] < 0) continue;
        const double d = grad_load[to_size(e)] * density[e];
        total[e] += d;
        total[thr[e]] -= d;
      }
    }
    float* row = dlogits.row(t);
    for (int e = 0; e < kE; ++e) row[e] += static_cast<float>(total[e]);
  }
  return loss;
}

// Aux-loss-free balancing (DeepSeek-V3): a per-expert selection bias moved by
// gamma against the load after each step.
//
//   ExpertBias<Spec> balance(1e-3f);
//   router.forward(x, w_gate, {}, balance.bias(), routing, &stats);
//   balance.accumulate(stats);    // once per micro-batch
//   balance.update();             // once per optimizer step
template <MoeSpecType S>
class ExpertBias {
 public:
  static constexpr int kExperts = S::num_experts;  // E, one bias each
  static constexpr int kTopK = S::top_k;           // K, assignments per token

  // Biases start at 0. gamma must be finite and >= 0 (0 freezes them).
  explicit ExpertBias(float gamma) : gamma_(gamma) {
    MOEKIT_CHECK_ARG(std::isfinite(gamma) && gamma >= 0.0f, "gamma = ", gamma,
                     " must be finite and non-negative");
  }

  // The step size of update(), as constructed.
  float gamma() const { return gamma_; }
  // The Router's selection_bias; valid while this object lives.
  VectorView<const float> bias() const { return {bias_.data(), kExperts}; }
  // Assignments accumulated since the last update().
  const std::array<index_t, to_size(kExperts)>& counts() const { return counts_; }

  // Adds stats.assigned (assignments before capacity).
  void accumulate(const RoutingStats<S>& stats) {
    for (std::size_t e = 0; e < kExperts; ++e) {
      MOEKIT_CHECK_ARG(stats.assigned[e] >= 0, "stats.assigned[", e, "] = ", stats.assigned[e],
                       " is negative");
    }
    for (std::size_t e = 0; e < kExperts; ++e) counts_[e] += stats.assigned[e];
  }

  // Adds the assignments in expert_ids (any rows x K).
  void accumulate(MatrixView<const std::int32_t> expert_ids) {
    check_shape(expert_ids, expert_ids.rows(), kTopK, "expert_ids");
    check_expert_ids<S>(expert_ids, "expert_ids");
    for (index_t t = 0; t < expert_ids.rows(); ++t) {
      for (int k = 0; k < kTopK; ++k) ++counts_[to_size(expert_ids(t, k))];
    }
  }

  // b_e += gamma * sign(mean_count - count_e), then the counts restart at 0.
  void update() {
    index_t total = 0;
    for (index_t c : counts_) total += c;
    for (int e = 0; e < kExperts; ++e) {
      // sign(total / E - count_e) in exact integer arithmetic.
      const index_t diff = total - static_cast<index_t>(kExperts) * counts_[to_size(e)];
      const float sign = diff > 0 ? 1.0f : (diff < 0 ? -1.0f : 0.0f);
      bias_[to_size(e)] += gamma_ * sign;
    }
    counts_.fill(0);
  }

  // Restores biases (e.g. from a checkpoint); they must be finite.
  void set_bias(VectorView<const float> bias) {
    check_shape(bias, kExperts, "bias");
    for (index_t e = 0; e < kExperts; ++e) {
      MOEKIT_CHECK(std::isfinite(bias[e]), Errc::kNonFinite, "bias[", e, "] = ", bias[e],
                   " is not finite");
    }
    for (int e = 0; e < kExperts; ++e) bias_[to_size(e)] = bias[e];
  }

 private:
  float gamma_;
  std::array<float, to_size(kExperts)> bias_{};
  std::array<index_t, to_size(kExperts)> counts_{};
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
