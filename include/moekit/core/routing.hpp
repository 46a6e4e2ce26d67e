#pragma once
// Routing math shared by every backend (docs/math.md, "Routing"), one token at a time.
//
// Rules (x = a token's E logits, b = optional per-expert selection bias):
//   kSoftmaxTopK  p = softmax(x); select the K largest p (+ b); w = p at those
//                 experts; with `renormalize`, w /= sum(w).
//   kTopKSoftmax  select the K largest x (+ b); w = softmax over those K logits.
//   kSigmoid      s = sigmoid(x); select the K largest s + b; w = s at those
//                 experts, renormalised over the K with `renormalize`.
// Every rule multiplies w by `scaling` last. The bias moves selection only,
// never a weight, and receives no gradient.
//
// Selection is ordered: higher key first, equal keys -> lower expert index
// first. Without a bias or groups, kSoftmaxTopK selects on x itself: p's
// order, refined where rounding in exp would tie two different logits.
//
// Group-limited selection (num_groups > 1): the E experts form num_groups
// contiguous groups; a group scores the sum of its `group_score_top` largest
// keys; the `groups_kept` best groups (ties -> lower group) are kept and the K
// experts are chosen among theirs (DeepSeek-V3: sigmoid, top-2 sum).
//
// Non-finite logits (the documented rule, identical on every backend):
//   NaN is treated as -inf. softmax of a row with +inf entries puts equal
//   mass on them and 0 elsewhere; a row with no entry above -inf is uniform.
//   sigmoid(+inf) = 1, sigmoid(-inf) = sigmoid(NaN) = 0. Selection always
//   yields K distinct, valid ids. Each non-finite logit is counted.

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"

MOEKIT_NAMESPACE_BEGIN

// How a token's logits become its K experts and their weights (the rules
// above).
enum class GatingRule { kSoftmaxTopK, kTopKSoftmax, kSigmoid };

// Which over-capacity assignments are dropped: the latest tokens (kPosition)
// or the lowest weights (kProbs; ties -> the later token).
enum class DropPolicy { kPosition, kProbs };

// Training noise. kGaussian adds amount * N(0, 1) to every logit (noisy
// top-k); kJitter multiplies every router input element by U(1 - amount,
// 1 + amount) (Switch Transformer). Both are drawn from `seed` with moekit's
// counter-based generator, so a run is reproducible and backward regenerates
// the same noise.
enum class NoiseKind { kNone, kGaussian, kJitter };

// What a non-finite logit does: follow the rule above and count it, or make
// the call fail with Errc::kNonFinite before any output is written.
enum class NonFinitePolicy { kSanitize, kError };

// The router's gating: the rule, its weight post-processing and optional
// group-limited selection (see the top of this file).
struct GatingConfig {
  GatingRule rule = GatingRule::kSoftmaxTopK;  // how logits become experts and weights
  bool renormalize = false;                    // w /= sum(w) over the K (kSoftmaxTopK, kSigmoid)
  float scaling = 1.0f;                        // multiplies every weight last; finite, > 0
  int num_groups = 1;                          // expert groups, dividing E; 1 = no group limit
  int groups_kept = 1;                         // best groups whose experts may be selected
  int group_score_top = 2;  // keys summed into a group's score, <= min(8, group size)
};

// Training noise on the router (kNone at inference).
struct NoiseConfig {
  NoiseKind kind = NoiseKind::kNone;  // which noise, if any
  float amount = 0.0f;                // std-dev (kGaussian) or half-width (kJitter), >= 0
  std::uint64_t seed = 0;             // with each element's index, fixes the noise drawn
};

// capacity_factor <= 0 is dropless. A double, so that C is computed exactly
// as Python implementations compute it (1.2 means 1.2, not 1.2000000477).
struct CapacityConfig {
  double factor = 0.0;                        // C = ceil(factor T K / E); <= 0: dropless
  DropPolicy policy = DropPolicy::kPosition;  // which assignments overflow drops
};

// How the Switch balance loss normalises f_e = count_e / N: N = T K
// (kTokensTimesK, 1 under perfect balance) or N = T (kTokens, as several
// public top-k implementations do: K times larger). Shared by both backends.
enum class SwitchNormalization { kTokensTimesK, kTokens };

// Options of the Switch balance loss.
struct SwitchLossOptions {
  // The denominator of f_e.
  SwitchNormalization normalization = SwitchNormalization::kTokensTimesK;
};

// The routing of a batch of T tokens: what a router writes and what backward
// and the aux losses read back. All views are caller memory (host memory on
// the CPU backend, device memory on the CUDA backend).
struct Routing {
  MatrixView<float> logits;             // T x E, noise included
  MatrixView<float> scores;             // T x E: p (softmax rules) or s (sigmoid)
  MatrixView<std::int32_t> expert_ids;  // T x K, ordered by key, distinct per row
  MatrixView<float> weights;            // T x K, combine weights, 0 where dropped
  MatrixView<std::int32_t> positions;   // T x K, row in the expert's buffer, -1 = dropped
};

// The five views of a routing named `name` (a string literal), as a list
// of OverlapCheck arguments: MOEKIT_ROUTING_ARGS(out, "out").
#define MOEKIT_ROUTING_ARGS(r, name)                                          \
  {(r).logits, name ".logits"}, {(r).scores, name ".scores"},                 \
      {(r).expert_ids, name ".expert_ids"}, {(r).weights, name ".weights"}, { \
    (r).positions, name ".positions"                                          \
  }

// The Switch loss's value, E sum_e f_e P_e, from a batch's statistics: the
// assignments per expert before capacity (f_e = assigned[e] / N) and the mean
// routing distribution P. Both backends' statistics feed this one loop.
template <int E, int K, class Counts, class Distribution>
double switch_loss_value(index_t tokens, const Counts& assigned,
                         const Distribution& mean_distribution, SwitchNormalization norm) {
  if (tokens == 0) return 0.0;
  const double n_tokens = static_cast<double>(tokens);
  const double denom = norm == SwitchNormalization::kTokens ? n_tokens : n_tokens * K;
  double sum = 0.0;
  for (int e = 0; e < E; ++e) {
    sum += static_cast<double>(assigned[to_size(e)]) / denom * mean_distribution[to_size(e)];
  }
  return E * sum;
}

// A group's score sums at most this many keys.
inline constexpr int kMaxGroupScoreTop = 8;

// Slots an expert accepts: C = ceil(factor * T * K / E), at most T (an expert
// gets at most one slot per token); dropless (factor <= 0) gives T.
MOEKIT_HOST_DEVICE inline index_t expert_capacity(index_t tokens, int num_experts, int top_k,
                                                  double factor) {
  if (factor <= 0.0) return tokens;
  const double c = std::ceil(factor * static_cast<double>(tokens) * static_cast<double>(top_k) /
                             static_cast<double>(num_experts));
  return c < static_cast<double>(tokens) ? static_cast<index_t>(c) : tokens;
}

// Rejects a gating configuration the selection code cannot honour for E
// experts and K per token (the per-token functions below rely on it).
inline void check_gating(const GatingConfig& g, int num_experts, int top_k) {
  MOEKIT_CHECK_ARG(g.rule == GatingRule::kSoftmaxTopK || g.rule == GatingRule::kTopKSoftmax ||
                       g.rule == GatingRule::kSigmoid,
                   "gating.rule = ", static_cast<int>(g.rule), " is not a GatingRule");
  MOEKIT_CHECK_ARG(std::isfinite(g.scaling) && g.scaling > 0.0f, "gating.scaling = ", g.scaling,
                   " must be finite and positive");
  MOEKIT_CHECK_ARG(g.num_groups >= 1 && num_experts % g.num_groups == 0,
                   "gating.num_groups = ", g.num_groups,
                   " must divide the expert count E = ", num_experts);
  if (g.num_groups > 1) {
    const int group_size = num_experts / g.num_groups;
    MOEKIT_CHECK_ARG(g.groups_kept >= 1 && g.groups_kept <= g.num_groups,
                     "gating.groups_kept = ", g.groups_kept, " must be in [1, ", g.num_groups, "]");
    MOEKIT_CHECK_ARG(g.groups_kept * group_size >= top_k, "gating.groups_kept = ", g.groups_kept,
                     " groups of ", group_size, " experts hold fewer than K = ", top_k);
    const int top_limit = group_size < kMaxGroupScoreTop ? group_size : kMaxGroupScoreTop;
    MOEKIT_CHECK_ARG(g.group_score_top >= 1 && g.group_score_top <= top_limit,
                     "gating.group_score_top = ", g.group_score_top, " must be in [1, ", top_limit,
                     "]");
  }
}

// Rejects a noise configuration (both backends' routers, and the losses that
// read one): a NoiseKind, an amount finite and >= 0, and below 1 for jitter
// (a factor U(1 - amount, 1 + amount) stays positive). `name` prefixes the
// fields in the message ("noise", "config.router.noise", ...).
inline void check_noise(const NoiseConfig& n, const char* name = "noise") {
  MOEKIT_CHECK_ARG(
      n.kind == NoiseKind::kNone || n.kind == NoiseKind::kGaussian || n.kind == NoiseKind::kJitter,
      name, ".kind = ", static_cast<int>(n.kind), " is not a NoiseKind");
  MOEKIT_CHECK_ARG(std::isfinite(n.amount) && n.amount >= 0.0f, name, ".amount = ", n.amount,
                   " must be finite and non-negative");
  MOEKIT_CHECK_ARG(n.kind != NoiseKind::kJitter || n.amount < 1.0f, name, ".amount = ", n.amount,
                   " must be below 1 for jitter");
}

namespace routing {

// Jitter's factor for router-input element `counter` (= t * d + j):
// U(1 - amount, 1 + amount) from moekit's counter-based generator.
MOEKIT_HOST_DEVICE inline float jitter_factor(std::uint64_t seed, float amount,
                                              std::uint64_t counter) {
  return 1.0f - amount + 2.0f * amount * random_uniform(seed, counter);
}

// +infinity, the masked or empty key.
inline constexpr float kInf = std::numeric_limits<float>::infinity();
// The id of an empty top-K slot.
inline constexpr int kNoId = 0x7fffffff;

// Floats are classified by their bits, so the non-finite rule survives
// -ffast-math (which lets the compiler assume v == v).
MOEKIT_HOST_DEVICE inline std::uint32_t float_bits(float v) {
#if MOEKIT_DEVICE_CODE
  return __float_as_uint(v);
#else
  return std::bit_cast<std::uint32_t>(v);
#endif
}
// Whether v is a NaN, from its bits.
MOEKIT_HOST_DEVICE inline bool is_nan(float v) {
  return (float_bits(v) & 0x7fffffffu) > 0x7f800000u;
}
// Whether v is neither infinite nor NaN, from its bits.
MOEKIT_HOST_DEVICE inline bool is_finite(float v) {
  return (float_bits(v) & 0x7f800000u) != 0x7f800000u;
}
// NaN -> -inf; everything else unchanged.
MOEKIT_HOST_DEVICE inline float sanitize(float v) { return is_nan(v) ? -kInf : v; }

// exp(v) by an unqualified call: std::exp on the host, CUDA's float exp on
// the device.
MOEKIT_HOST_DEVICE inline float exp_(float v) {
  using std::exp;
  return exp(v);
}

// Inserts (v, id) into the descending list vals/ids of length `count` <=
// `capacity` <= MaxCapacity (the arrays' length). Candidates must arrive in
// increasing id order: a later equal value never passes an earlier one,
// which is the tie rule.
template <int MaxCapacity>
MOEKIT_HOST_DEVICE void insert_top(float v, int id, float* vals, int* ids, int& count,
                                   int capacity) {
  int pos;
  if (count < capacity) {
    pos = count++;
  } else if (v > vals[capacity - 1]) {
    pos = capacity - 1;
  } else {
    return;
  }
  pos = pos < MaxCapacity - 1 ? pos : MaxCapacity - 1;  // states the bound for the compiler
  while (pos > 0 && v > vals[pos - 1]) {
    vals[pos] = vals[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  vals[pos] = v;
  ids[pos] = id;
}

// Selection order: (v, id) comes before (w, wid) if v is larger, or equal
// with the lower index (the tie rule). Bitwise, so it stays branch-free.
MOEKIT_HOST_DEVICE inline bool precedes(float v, int id, float w, int wid) {
  return (v > w) | ((v == w) & (id < wid));
}

// L independent top-K lists, list l in lane l: entry j of list l is
// (vals[j * L + l], ids[j * L + l]). L = 1 is one token's list.
// clear_top empties them: every key, -inf included, comes before an empty slot.
template <int K, int L = 1>
MOEKIT_HOST_DEVICE void clear_top(float* vals, int* ids) {
  for (int i = 0; i < K * L; ++i) {
    vals[i] = -kInf;
    ids[i] = kNoId;
  }
}

// Inserts key v[l] of expert `id` into list l of each lane; the last entry
// falls off. No data-dependent branch and every loop runs across lanes, so
// L tokens are selected in lockstep (SIMD lanes on the CPU; on a GPU each
// thread is one lane).
template <int K, int L = 1>
MOEKIT_HOST_DEVICE void insert_sorted(const float* v, int id, float* vals, int* ids) {
  // before[j * L + l]: v[l] precedes entry j of list l (true on a suffix of
  // each list). int, not bool, and every load unconditional: both keep the
  // lane loops vectorisable.
  int before[to_size(K * L)];
  for (int j = 0; j < K; ++j) {
    for (int l = 0; l < L; ++l) {
      before[j * L + l] = precedes(v[l], id, vals[j * L + l], ids[j * L + l]);
    }
  }
  for (int j = K - 1; j > 0; --j) {
    for (int l = 0; l < L; ++l) {
      const int here = j * L + l, above = (j - 1) * L + l;
      const float shifted_val = before[above] ? vals[above] : v[l];
      const int shifted_id = before[above] ? ids[above] : id;
      const float kept_val = vals[here];
      const int kept_id = ids[here];
      vals[here] = before[here] ? shifted_val : kept_val;
      ids[here] = before[here] ? shifted_id : kept_id;
    }
  }
  for (int l = 0; l < L; ++l) {
    const float kept_val = vals[l];
    const int kept_id = ids[l];
    vals[l] = before[l] ? v[l] : kept_val;
    ids[l] = before[l] ? id : kept_id;
  }
}

// max of the sanitized x (NaN counts as -inf).
template <int N>
MOEKIT_HOST_DEVICE float row_max(const float* x) {
  float m = -kInf;
  for (int i = 0; i < N; ++i) m = sanitize(x[i]) > m ? sanitize(x[i]) : m;
  return m;
}

// p = softmax(x) under the non-finite rule. Where the maximum is +inf or
// -inf the rule's p is locally constant, so its gradient is zero.
template <int N>
MOEKIT_HOST_DEVICE void softmax(const float* x, float* p) {
  const float m = row_max<N>(x);
  if (m == kInf) {
    int n = 0;
    for (int i = 0; i < N; ++i) n += x[i] == kInf;
    for (int i = 0; i < N; ++i) p[i] = x[i] == kInf ? 1.0f / static_cast<float>(n) : 0.0f;
    return;
  }
  if (m == -kInf) {
    for (int i = 0; i < N; ++i) p[i] = 1.0f / static_cast<float>(N);
    return;
  }
  float z = 0.0f;
  for (int i = 0; i < N; ++i) {
    p[i] = exp_(sanitize(x[i]) - m);
    z += p[i];
  }
  const float inv = 1.0f / z;
  for (int i = 0; i < N; ++i) p[i] *= inv;
}

// 1 / (1 + exp(-x)) with NaN read as -inf (so sigmoid(NaN) = 0).
MOEKIT_HOST_DEVICE inline float sigmoid(float x) { return 1.0f / (1.0f + exp_(-sanitize(x))); }

// dx += coeff * J_softmax^T g, i.e. coeff * p * (g - <g, p>).
template <int N>
MOEKIT_HOST_DEVICE void softmax_backward(const float* p, const float* g, float coeff, float* dx) {
  float dot = 0.0f;
  for (int i = 0; i < N; ++i) dot += g[i] * p[i];
  for (int i = 0; i < N; ++i) dx[i] += coeff * p[i] * (g[i] - dot);
}

// The token's routing distribution q, used by the balance losses and
// statistics: p for the softmax rules, s / sum(s) for sigmoid (zero row ->
// uniform). `scores` is what gate_token wrote to probs.
template <int E>
MOEKIT_HOST_DEVICE void routing_distribution(GatingRule rule, const float* scores, float* q) {
  if (rule != GatingRule::kSigmoid) {
    for (int e = 0; e < E; ++e) q[e] = scores[e];
    return;
  }
  float sum = 0.0f;
  for (int e = 0; e < E; ++e) sum += scores[e];
  for (int e = 0; e < E; ++e) q[e] = sum > 0.0f ? scores[e] / sum : 1.0f / static_cast<float>(E);
}

// dx += coeff * (dq/dx)^T g for the distribution above; x are the logits
// the scores came from.
template <int E>
MOEKIT_HOST_DEVICE void routing_distribution_backward(GatingRule rule, const float* x,
                                                      const float* scores, const float* g,
                                                      float coeff, float* dx) {
  if (rule != GatingRule::kSigmoid) {
    if (is_finite(row_max<E>(x))) softmax_backward<E>(scores, g, coeff, dx);
    return;
  }
  float sum = 0.0f, dot = 0.0f;
  for (int e = 0; e < E; ++e) {
    sum += scores[e];
    dot += g[e] * scores[e];
  }
  if (!(sum > 0.0f)) return;  // the uniform fallback is constant
  const float inv = 1.0f / sum;
  for (int e = 0; e < E; ++e) {
    const float ds = (g[e] - dot * inv) * inv;  // d/ds of g . (s / sum s)
    dx[e] += coeff * ds * scores[e] * (1.0f - scores[e]);
  }
}

// A group's score: the sum of its `top` largest keys (sanitized), largest
// first; a group holding a +inf key scores +inf.
MOEKIT_HOST_DEVICE inline float group_score(const float* keys, int group_size, int top) {
  float vals[kMaxGroupScoreTop];
  int ids[kMaxGroupScoreTop];
  int n = 0;
  for (int j = 0; j < group_size; ++j) insert_top<kMaxGroupScoreTop>(keys[j], j, vals, ids, n, top);
  float score = 0.0f;
  for (int j = 0; j < n; ++j) score += vals[j];
  return is_nan(score) ? kInf : score;  // +inf + -inf: the group holds a +inf key
}

// Group-limited selection's first step (num_groups > 1): writes each
// group's score to scores (num_groups) and the groups_kept best groups to
// kept (best first; ties -> lower group). Returns the number kept.
template <int E>
MOEKIT_HOST_DEVICE int rank_groups(const float* keys, const GatingConfig& cfg, float* scores,
                                   int* kept) {
  const int group_size = E / cfg.num_groups;
  float kept_scores[to_size(E)];
  int n = 0;
  for (int g = 0; g < cfg.num_groups; ++g) {
    scores[g] = group_score(keys + g * group_size, group_size, cfg.group_score_top);
    insert_top<E>(scores[g], g, kept_scores, kept, n, cfg.groups_kept);
  }
  return n;
}

// Selects K experts from `keys` (sanitized), honouring group limits.
template <int E, int K>
MOEKIT_HOST_DEVICE void select_experts(const float* keys, const GatingConfig& cfg, int* ids) {
  float vals[to_size(K)];
  clear_top<K>(vals, ids);
  if (cfg.num_groups <= 1) {
    for (int e = 0; e < E; ++e) insert_sorted<K>(&keys[e], e, vals, ids);
    return;
  }
  const int group_size = E / cfg.num_groups;
  float group_scores[to_size(E)];
  int kept[to_size(E)];
  const int n = rank_groups<E>(keys, cfg, group_scores, kept);
  for (int i = 0; i < n; ++i) {
    const int first = kept[i] * group_size;
    for (int e = first; e < first + group_size; ++e) insert_sorted<K>(&keys[e], e, vals, ids);
  }
}

// A token's E scores: p = softmax(x) for the softmax rules, s = sigmoid(x)
// for kSigmoid, under the non-finite rule. Returns the number of non-finite
// logits.
template <int E>
MOEKIT_HOST_DEVICE int compute_scores(GatingRule rule, const float* x, float* scores) {
  int non_finite = 0;
  for (int e = 0; e < E; ++e) non_finite += !is_finite(x[e]);
  if (rule == GatingRule::kSigmoid) {
    for (int e = 0; e < E; ++e) scores[e] = sigmoid(x[e]);
  } else {
    softmax<E>(x, scores);
  }
  return non_finite;
}

// Whether selection keys are the logits rather than the scores: always for
// kTopKSoftmax; for kSoftmaxTopK when neither a bias nor group sums (which
// must add probabilities, not logits) need p itself.
MOEKIT_HOST_DEVICE inline bool selects_on_logits(const GatingConfig& cfg, bool has_bias) {
  return cfg.rule == GatingRule::kTopKSoftmax ||
         (cfg.rule == GatingRule::kSoftmaxTopK && !has_bias && cfg.num_groups <= 1);
}

// Expert e's selection key under the rules above; bias may be null.
MOEKIT_HOST_DEVICE inline float selection_key(bool logit_key, float x, float score,
                                              const float* bias, int e) {
  return sanitize((logit_key ? sanitize(x) : score) + (bias != nullptr ? bias[e] : 0.0f));
}

// What selection ranked for one token, for inspection (cpu::Router::
// explain_selection): the E selection keys (the logits or the scores, plus
// the selection bias, as the rules above choose them) and, with group
// limits, every group's score and the kept groups, best first. Without
// groups (num_groups <= 1) num_groups and num_kept are 0.
template <int E>
struct SelectionTrace {
  std::array<float, to_size(E)> keys{};          // the E selection keys
  int num_groups = 0;                            // groups; 0 without group limits
  std::array<float, to_size(E)> group_scores{};  // the first num_groups entries
  int num_kept = 0;                              // kept groups; 0 without group limits
  std::array<int, to_size(E)> kept_groups{};     // the first num_kept entries
};

// The trace of the selection select_and_weigh makes for logits x and their
// scores (bias: E selection biases or null). Host only.
template <int E>
SelectionTrace<E> trace_selection(const float* x, const float* scores, const float* bias,
                                  const GatingConfig& cfg) {
  SelectionTrace<E> trace;
  const bool logit_key = selects_on_logits(cfg, bias != nullptr);
  for (int e = 0; e < E; ++e) {
    trace.keys[to_size(e)] = selection_key(logit_key, x[e], scores[e], bias, e);
  }
  if (cfg.num_groups > 1) {
    trace.num_groups = cfg.num_groups;
    trace.num_kept =
        rank_groups<E>(trace.keys.data(), cfg, trace.group_scores.data(), trace.kept_groups.data());
  }
  return trace;
}

// The K weights from the selected experts' logits and scores, sel_x[k] =
// x[ids[k]] and sel_s[k] = scores[ids[k]] (see the rules above).
template <int K>
MOEKIT_HOST_DEVICE void weigh_selected(const float* sel_x, const float* sel_s,
                                       const GatingConfig& cfg, float* weights) {
  if (cfg.rule == GatingRule::kTopKSoftmax) {
    softmax<K>(sel_x, weights);
  } else {
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) {
      weights[k] = sel_s[k];
      sum += weights[k];
    }
    if (cfg.renormalize) {
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      for (int k = 0; k < K; ++k) weights[k] *= inv;
    }
  }
  for (int k = 0; k < K; ++k) weights[k] *= cfg.scaling;
}

// The K weights of a token routed to `ids`.
template <int E, int K>
MOEKIT_HOST_DEVICE void weigh(const float* x, const float* scores, const int* ids,
                              const GatingConfig& cfg, float* weights) {
  float sel_x[to_size(K)], sel_s[to_size(K)];
  for (int k = 0; k < K; ++k) {
    sel_x[k] = x[ids[k]];
    sel_s[k] = scores[ids[k]];
  }
  weigh_selected<K>(sel_x, sel_s, cfg, weights);
}

// Given a token's logits x and its scores, selects the K experts and writes
// their ids and weights, ordered by key. bias: E selection biases or null.
template <int E, int K>
MOEKIT_HOST_DEVICE void select_and_weigh(const float* x, const float* scores, const float* bias,
                                         const GatingConfig& cfg, int* ids, float* weights) {
  const bool logit_key = selects_on_logits(cfg, bias != nullptr);
  float keys[to_size(E)];
  for (int e = 0; e < E; ++e) keys[e] = selection_key(logit_key, x[e], scores[e], bias, e);
  select_experts<E, K>(keys, cfg, ids);
  weigh<E, K>(x, scores, ids, cfg, weights);
}

// Routes one token: compute_scores, then select_and_weigh. Writes the K ids
// and weights and the E scores; returns the number of non-finite logits.
template <int E, int K>
MOEKIT_HOST_DEVICE int gate_token(const float* x, const float* bias, const GatingConfig& cfg,
                                  int* ids, float* weights, float* scores) {
  const int non_finite = compute_scores<E>(cfg.rule, x, scores);
  select_and_weigh<E, K>(x, scores, bias, cfg, ids, weights);
  return non_finite;
}

// The half of gate_token's backward that needs only the K selected experts
// (sel_x[k] = x[ids[k]], sel_s[k] = scores[ids[k]], dw = dL/dw, zero for
// dropped slots). For kTopKSoftmax and kSigmoid it writes dx at ids[k] to
// out[k] and returns false; for kSoftmaxTopK it writes g[ids[k]] = dL/dp at
// the selected experts, for softmax_backward to spread over all E, and
// returns true.
template <int K>
MOEKIT_HOST_DEVICE bool gate_selected_backward(const float* sel_x, const float* sel_s,
                                               const float* dw, const GatingConfig& cfg,
                                               float* out) {
  const float c = cfg.scaling;
  if (cfg.rule == GatingRule::kTopKSoftmax) {
    for (int k = 0; k < K; ++k) out[k] = 0.0f;
    if (!is_finite(row_max<K>(sel_x))) return false;  // the rule's weights are constant there
    float w[to_size(K)];
    softmax<K>(sel_x, w);
    float dot = 0.0f;
    for (int k = 0; k < K; ++k) dot += dw[k] * w[k];
    for (int k = 0; k < K; ++k) out[k] = c * w[k] * (dw[k] - dot);
    return false;
  }
  // dL/dv for the selected scores v_k = sel_s[k].
  if (cfg.renormalize) {
    float sum = 0.0f, dot = 0.0f;
    for (int k = 0; k < K; ++k) sum += sel_s[k];
    for (int k = 0; k < K; ++k) dot += dw[k] * sel_s[k];
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int k = 0; k < K; ++k) out[k] = c * inv * (dw[k] - dot * inv);
  } else {
    for (int k = 0; k < K; ++k) out[k] = c * dw[k];
  }
  if (cfg.rule == GatingRule::kSigmoid) {
    for (int k = 0; k < K; ++k) out[k] = out[k] * sel_s[k] * (1.0f - sel_s[k]);
    return false;
  }
  return true;
}

// Backward of gate_token for one token: dx = (dw/dx)^T dw, written to dx
// (all E entries). `scores` and `ids` are what gate_token produced for x;
// dw holds dL/dw for the K slots, zero for dropped ones (their weight is the
// constant 0). The bias gets no gradient.
template <int E, int K>
MOEKIT_HOST_DEVICE void gate_token_backward(const float* x, const float* scores, const int* ids,
                                            const float* dw, const GatingConfig& cfg, float* dx) {
  for (int e = 0; e < E; ++e) dx[e] = 0.0f;
  float sel_x[to_size(K)], sel_s[to_size(K)], out[to_size(K)];
  for (int k = 0; k < K; ++k) {
    sel_x[k] = x[ids[k]];
    sel_s[k] = scores[ids[k]];
  }
  if (!gate_selected_backward<K>(sel_x, sel_s, dw, cfg, out)) {
    for (int k = 0; k < K; ++k) dx[ids[k]] = out[k];
    return;
  }
  if (!is_finite(row_max<E>(x))) return;  // the rule's p is constant there
  float g[to_size(E)];
  for (int e = 0; e < E; ++e) g[e] = 0.0f;
  for (int k = 0; k < K; ++k) g[ids[k]] = out[k];
  softmax_backward<E>(scores, g, 1.0f, dx);
}

// ---- per-token pieces of the balance losses (both backends) ---------------

// Added to mean^2 in CV^2 (Shazeer et al.) so an all-zero vector gives 0.
inline constexpr double kCvSquaredEpsilon = 1e-10;

// CV^2(v) = Var(v) / (mean(v)^2 + kCvSquaredEpsilon) over N values, Var the
// population variance; writes scale * dCV^2/dv to grad (N values).
template <int N>
MOEKIT_HOST_DEVICE double cv_squared(const double* v, double scale, double* grad) {
  double mean = 0.0;
  for (int i = 0; i < N; ++i) mean += v[i];
  mean /= N;
  double var = 0.0;
  for (int i = 0; i < N; ++i) var += (v[i] - mean) * (v[i] - mean);
  var /= N;
  const double d = mean * mean + kCvSquaredEpsilon;
  for (int i = 0; i < N; ++i) {
    grad[i] = scale * (2.0 * (v[i] - mean) / (N * d) - 2.0 * mean * var / (N * d * d));
  }
  return var / d;
}

// Below this, exp(x - max) is flushed to 0 (the CPU backend's vectorised exp
// clamps there; flushing keeps tiny values equal on every backend).
inline constexpr float kZLossExpFloor = -87.0f;

// The z-loss's pieces, shared by the per-token loop below and the CUDA
// backend's warp-wide version: exp(x - max) flushed below the floor, lse
// from the maximum and that sum, and the gradient's factor c.
MOEKIT_HOST_DEVICE inline float z_loss_exp(float x_minus_max) {
  return x_minus_max < kZLossExpFloor ? 0.0f : exp_(x_minus_max);
}
// lse = max + log(sum), from the row maximum and sum of exp(x - max).
MOEKIT_HOST_DEVICE inline double log_sum_exp(float max, float sum) {
  using std::log;
  return static_cast<double>(max + log(sum));
}
// c = coeff * 2 lse / (tokens * sum): dx_e = c * exp(x_e - max).
MOEKIT_HOST_DEVICE inline float z_loss_grad_scale(double lse, float sum, double coeff,
                                                  double tokens) {
  return static_cast<float>(coeff * 2.0 * lse / tokens) / sum;
}

// Whether a logit leaves a row's z-loss undefined: NaN or +inf. A -inf
// logit is a masked expert (exp = 0) and keeps the row, unless every logit
// of the row is -inf.
MOEKIT_HOST_DEVICE inline bool z_loss_poisons(float x) {
  return is_nan(x) || float_bits(x) == 0x7f800000u;
}
// Whether a row maximum is -inf (by bits, like the rest of the rule).
MOEKIT_HOST_DEVICE inline bool is_minus_inf(float v) { return float_bits(v) == 0xff800000u; }

// One token's router z-loss term, the one implementation of the formula
// (the CPU's z-loss and statistic call it; the CUDA warp path is its
// warp-parallel copy): returns lse^2, lse = log sum_e exp x[e], computed as
// max + log(sum exp(x - max)) in float, and 0 (no gradient) for a row whose
// lse is undefined: a NaN or +inf logit, or no logit above -inf. With dx
// not null, ADDS coeff * dL/dx for L = (1 / tokens) sum_t lse_t^2, i.e.
// c * exp(x[e] - max) with c = float(2 coeff lse / tokens) / sum: one
// addition per element (+0 at a -inf logit).
template <int E>
MOEKIT_HOST_DEVICE double z_loss_token(const float* x, double coeff, double tokens, float* dx) {
  float m = -kInf;
  for (int e = 0; e < E; ++e) {
    if (z_loss_poisons(x[e])) return 0.0;
    m = x[e] > m ? x[e] : m;
  }
  if (is_minus_inf(m)) return 0.0;
  float sum = 0.0f;
  for (int e = 0; e < E; ++e) sum += z_loss_exp(x[e] - m);
  const double lse = log_sum_exp(m, sum);
  if (dx != nullptr) {
    const float c = z_loss_grad_scale(lse, sum, coeff, tokens);
    for (int e = 0; e < E; ++e) dx[e] += c * z_loss_exp(x[e] - m);
  }
  return lse * lse;
}

// Whether a token's K saved ids can index anything: each in [0, E), and
// distinct (backward writes one gradient per id).
template <int E, int K>
MOEKIT_HOST_DEVICE bool valid_ids(const int* ids) {
  bool ok = true;
  for (int k = 0; k < K; ++k) {
    ok = ok && ids[k] >= 0 && ids[k] < E;
    for (int j = 0; j < k; ++j) ok = ok && ids[j] != ids[k];
  }
  return ok;
}

}  // namespace routing
MOEKIT_NAMESPACE_END
