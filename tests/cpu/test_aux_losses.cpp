// Load-balancing losses and ExpertBias (moekit/cpu/aux_losses.hpp) against an
// independent float64 reference written here (gating, capacity and every loss
// recomputed from the logits), central finite differences of that reference,
// the "adds into dlogits" contract, edge cases and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "expect_error.hpp"
#include "moekit/cpu/aux_losses.hpp"
#include "moekit/cpu/router.hpp"
#include "test_support.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using moekit::Errc;
using moekit::GatingRule;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::NoiseKind;
using moekit::to_size;
using moekit::VectorView;
using moekit::cpu::ExpertBias;
using moekit::cpu::ImportanceLoadOptions;
using moekit::cpu::Router;
using moekit::cpu::RouterConfig;
using moekit::cpu::Routing;
using moekit::cpu::RoutingStats;
using moekit::cpu::SwitchLossOptions;
using moekit::cpu::SwitchNormalization;
using moekit_test::rel_error;
using moekit_test::same_bits;
using moekit_test::to_double;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kCoeff = 0.7f;          // every gradient is checked scaled
constexpr double kFdStep = 1e-5;        // central differences in float64
constexpr double kStableMargin = 1e-3;  // inputs keep their selection within this

// ---- owning buffers for a Routing ---------------------------------------------

template <class S>
struct AuxBuffers {
  static constexpr int E = S::num_experts;
  static constexpr int K = S::top_k;
  index_t tokens;
  std::vector<float> logits, scores, weights;
  std::vector<std::int32_t> ids, positions;

  explicit AuxBuffers(index_t t)
      : tokens(t),
        logits(to_size(t * E), kNaN),
        scores(to_size(t * E), kNaN),
        weights(to_size(t * K), kNaN),
        ids(to_size(t * K), -777),
        positions(to_size(t * K), -777) {}

  Routing view() {
    return {{logits.data(), tokens, E},
            {scores.data(), tokens, E},
            {ids.data(), tokens, K},
            {weights.data(), tokens, K},
            {positions.data(), tokens, K}};
  }
};

// A recognisable, non-zero pattern for dlogits before a call.
std::vector<float> poison(std::size_t n) {
  std::vector<float> p(n);
  for (std::size_t i = 0; i < n; ++i) p[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
  return p;
}

// A gradient reference that is zero up to rounding (K = E makes the Switch
// loss constant) has no scale: below this norm the error is absolute.
constexpr double kZeroScale = 1e-8;

// Worst errors seen, printed once at the end for the record.
struct ErrorLog {
  double value = 0.0, grad = 0.0, fd = 0.0;
  void note(const char* what, const char* name, double v, double g, double f) {
    value = std::max(value, v);
    grad = std::max(grad, g);
    fd = std::max(fd, f);
    if (g < 0.0) {  // no analytic reference gradient: finite differences only
      std::printf("[ aux-err  ] %-16s %-36s value %.2e  grad    -      fd %.2e\n", what, name, v,
                  f);
    } else {
      std::printf("[ aux-err  ] %-16s %-36s value %.2e  grad %.2e  fd %.2e\n", what, name, v, g, f);
    }
  }
};

// ---- float64 reference ----------------------------------------------------------
// Written from docs/math.md without moekit's core math: sorts instead of
// insertion lists, explicit Jacobians instead of backward helpers.

struct Ref {
  GatingRule rule = GatingRule::kSoftmaxTopK;
  bool renormalize = false;
  double scaling = 1.0;
  int groups = 1, groups_kept = 1, group_top = 2;
  double capacity_factor = 0.0;  // kPosition drops only
  std::vector<double> bias;      // empty: none
  int E = 1, K = 1;
};

Ref make_ref(const RouterConfig& c, const std::vector<float>& bias, int E, int K) {
  Ref r;
  r.rule = c.gating.rule;
  r.renormalize = c.gating.renormalize;
  r.scaling = c.gating.scaling;
  r.groups = c.gating.num_groups;
  r.groups_kept = c.gating.groups_kept;
  r.group_top = c.gating.group_score_top;
  r.capacity_factor = c.capacity.factor;
  r.bias = to_double(bias);
  r.E = E;
  r.K = K;
  return r;
}

std::vector<double> ref_softmax(const double* x, int n) {
  const double m = *std::max_element(x, x + n);
  std::vector<double> p(to_size(n));
  double z = 0.0;
  for (int i = 0; i < n; ++i) z += p[to_size(i)] = std::exp(x[i] - m);
  for (double& v : p) v /= z;
  return p;
}

std::vector<double> ref_scores(const Ref& r, const double* x) {
  if (r.rule != GatingRule::kSigmoid) return ref_softmax(x, r.E);
  std::vector<double> s(to_size(r.E));
  for (int e = 0; e < r.E; ++e) s[to_size(e)] = 1.0 / (1.0 + std::exp(-x[e]));
  return s;
}

// The routing distribution q: p, or s / sum(s) for sigmoid.
std::vector<double> ref_q(const Ref& r, const std::vector<double>& scores) {
  if (r.rule != GatingRule::kSigmoid) return scores;
  const double sum = std::accumulate(scores.begin(), scores.end(), 0.0);
  std::vector<double> q(scores);
  for (double& v : q) v /= sum;
  return q;
}

std::vector<double> ref_keys(const Ref& r, const double* x, const std::vector<double>& scores) {
  std::vector<double> keys(to_size(r.E));
  for (int e = 0; e < r.E; ++e) {
    const bool on_logit = r.rule == GatingRule::kTopKSoftmax ||
                          (r.rule == GatingRule::kSoftmaxTopK && r.bias.empty());
    keys[to_size(e)] =
        (on_logit ? x[e] : scores[to_size(e)]) + (r.bias.empty() ? 0.0 : r.bias[to_size(e)]);
  }
  return keys;
}

// Candidates sorted by key, higher first, ties -> lower index first.
std::vector<int> ref_order(const std::vector<double>& keys, std::vector<int> candidates) {
  std::stable_sort(candidates.begin(), candidates.end(), [&](int a, int b) {
    return keys[to_size(a)] > keys[to_size(b)] || (keys[to_size(a)] == keys[to_size(b)] && a < b);
  });
  return candidates;
}

std::vector<int> ref_select(const Ref& r, const std::vector<double>& keys) {
  std::vector<int> candidates;
  if (r.groups <= 1) {
    candidates.resize(to_size(r.E));
    std::iota(candidates.begin(), candidates.end(), 0);
  } else {
    const int size = r.E / r.groups;
    std::vector<double> group_score(to_size(r.groups));
    for (int g = 0; g < r.groups; ++g) {
      std::vector<double> v(keys.begin() + g * size, keys.begin() + (g + 1) * size);
      std::sort(v.begin(), v.end(), std::greater<>());
      group_score[to_size(g)] = std::accumulate(v.begin(), v.begin() + r.group_top, 0.0);
    }
    std::vector<int> groups(to_size(r.groups));
    std::iota(groups.begin(), groups.end(), 0);
    groups = ref_order(group_score, groups);
    for (int i = 0; i < r.groups_kept; ++i) {
      for (int j = 0; j < size; ++j) candidates.push_back(groups[to_size(i)] * size + j);
    }
  }
  std::vector<int> order = ref_order(keys, candidates);
  order.resize(to_size(r.K));
  return order;
}

struct RefRouting {
  std::vector<double> scores, weights;  // T x E, T x K
  std::vector<int> ids;                 // T x K
  std::vector<bool> kept;               // T x K
};

RefRouting ref_route(const Ref& r, const std::vector<double>& x, index_t T) {
  const int E = r.E, K = r.K;
  RefRouting out;
  out.scores.resize(to_size(T * E));
  out.weights.resize(to_size(T * K));
  out.ids.resize(to_size(T * K));
  out.kept.assign(to_size(T * K), true);
  for (index_t t = 0; t < T; ++t) {
    const double* xt = &x[to_size(t * E)];
    const std::vector<double> s = ref_scores(r, xt);
    const std::vector<int> ids = ref_select(r, ref_keys(r, xt, s));
    std::vector<double> w(to_size(K));
    if (r.rule == GatingRule::kTopKSoftmax) {
      std::vector<double> sel(to_size(K));
      for (int k = 0; k < K; ++k) sel[to_size(k)] = xt[ids[to_size(k)]];
      w = ref_softmax(sel.data(), K);
    } else {
      double sum = 0.0;
      for (int k = 0; k < K; ++k) sum += w[to_size(k)] = s[to_size(ids[to_size(k)])];
      if (r.renormalize) {
        for (double& v : w) v /= sum;
      }
    }
    for (int e = 0; e < E; ++e) out.scores[to_size(t * E + e)] = s[to_size(e)];
    for (int k = 0; k < K; ++k) {
      out.ids[to_size(t * K + k)] = ids[to_size(k)];
      out.weights[to_size(t * K + k)] = w[to_size(k)] * r.scaling;
    }
  }
  if (r.capacity_factor > 0.0) {
    const double c = std::ceil(r.capacity_factor * static_cast<double>(T) * K / E);
    const index_t cap = std::min<index_t>(T, static_cast<index_t>(c));
    std::vector<index_t> fill(to_size(E), 0);
    for (index_t i = 0; i < T * K; ++i) {
      if (fill[to_size(out.ids[to_size(i)])] < cap) {
        ++fill[to_size(out.ids[to_size(i)])];
      } else {
        out.kept[to_size(i)] = false;
        out.weights[to_size(i)] = 0.0;
      }
    }
  }
  return out;
}

// Switch loss over rows [r0, r0 + n), with its analytic gradient (coeff
// included) written to grad (T x E) when not null.
double ref_switch(const Ref& r, const RefRouting& rt, index_t r0, index_t n, bool tokens_times_k,
                  double coeff, std::vector<double>* grad) {
  const int E = r.E, K = r.K;
  if (n == 0) return 0.0;
  std::vector<double> f(to_size(E), 0.0), P(to_size(E), 0.0);
  for (index_t t = r0; t < r0 + n; ++t) {
    for (int k = 0; k < K; ++k) f[to_size(rt.ids[to_size(t * K + k)])] += 1.0;
    const std::vector<double> s(rt.scores.begin() + t * E, rt.scores.begin() + (t + 1) * E);
    const std::vector<double> q = ref_q(r, s);
    for (int e = 0; e < E; ++e) P[to_size(e)] += q[to_size(e)] / static_cast<double>(n);
  }
  const double denom = tokens_times_k ? static_cast<double>(n) * K : static_cast<double>(n);
  double loss = 0.0;
  for (int e = 0; e < E; ++e) {
    f[to_size(e)] /= denom;
    loss += E * f[to_size(e)] * P[to_size(e)];
  }
  if (grad != nullptr) {
    for (index_t t = r0; t < r0 + n; ++t) {
      const double* s = &rt.scores[to_size(t * E)];
      // J(i, j) = dq_i / dx_j, written out.
      std::vector<double> J(to_size(E * E));
      double sum = 0.0;
      for (int e = 0; e < E; ++e) sum += s[e];
      for (int i = 0; i < E; ++i) {
        for (int j = 0; j < E; ++j) {
          if (r.rule != GatingRule::kSigmoid) {
            J[to_size(i * E + j)] = s[i] * ((i == j ? 1.0 : 0.0) - s[j]);
          } else {
            J[to_size(i * E + j)] =
                ((i == j ? 1.0 : 0.0) / sum - s[i] / (sum * sum)) * s[j] * (1.0 - s[j]);
          }
        }
      }
      for (int j = 0; j < E; ++j) {
        double g = 0.0;
        for (int i = 0; i < E; ++i)
          g += E * f[to_size(i)] / static_cast<double>(n) * J[to_size(i * E + j)];
        (*grad)[to_size(t * E + j)] += coeff * g;
      }
    }
  }
  return loss;
}

double ref_sequence(const Ref& r, const RefRouting& rt, index_t T, index_t len, double coeff,
                    std::vector<double>* grad) {
  const index_t n = T / len;
  double sum = 0.0;
  for (index_t s = 0; s < n; ++s) {
    sum += ref_switch(r, rt, s * len, len, true, coeff / static_cast<double>(n), grad);
  }
  return n > 0 ? sum / static_cast<double>(n) : 0.0;
}

double ref_z(const std::vector<double>& x, index_t T, int E, double coeff,
             std::vector<double>* grad) {
  double sum = 0.0;
  for (index_t t = 0; t < T; ++t) {
    const double* xt = &x[to_size(t * E)];
    // -inf is a masked expert (exp = 0); NaN, +inf or nothing above -inf
    // leave lse undefined: the row adds 0.
    bool defined = true;
    for (int e = 0; e < E; ++e) defined = defined && !std::isnan(xt[e]) && xt[e] != kInf;
    const double m = *std::max_element(xt, xt + E);
    if (!defined || m == -kInf) continue;
    double z = 0.0;
    for (int e = 0; e < E; ++e) z += std::exp(xt[e] - m);
    const double lse = m + std::log(z);
    sum += lse * lse;
    if (grad != nullptr) {
      for (int e = 0; e < E; ++e) {
        (*grad)[to_size(t * E + e)] +=
            coeff * 2.0 * lse * std::exp(xt[e] - m) / z / static_cast<double>(T);
      }
    }
  }
  return T > 0 ? sum / static_cast<double>(T) : 0.0;
}

double ref_cv2(const std::vector<double>& v) {
  const double n = static_cast<double>(v.size());
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / n;
  double var = 0.0;
  for (double x : v) var += (x - mean) * (x - mean) / n;  // population variance
  return var / (mean * mean + 1e-10);
}

// Experts of one token by noisy logit, higher first, ties -> lower index.
std::vector<int> ref_token_order(const double* h, int E) {
  std::vector<int> all(to_size(E));
  std::iota(all.begin(), all.end(), 0);
  return ref_order(std::vector<double>(h, h + E), all);
}

// Shazeer's probability that expert e of a token stays selected when its own
// noise is redrawn, from the noisy logits h (ordered by `order`) and the
// clean logit c_e.
double ref_keep_probability(const std::vector<int>& order, const double* h, double c_e, int e,
                            int K, double sigma) {
  const int E = static_cast<int>(order.size());
  const int rank = static_cast<int>(std::find(order.begin(), order.end(), e) - order.begin());
  int j;
  if (rank < K) {
    if (K == E) return 1.0;
    j = order[to_size(K)];
  } else {
    j = order[to_size(K - 1)];
  }
  return 0.5 * std::erfc(-(c_e - h[j]) / sigma / std::sqrt(2.0));
}

// L = a CV^2(importance) + b CV^2(load) from clean logits and fixed noise
// (noisy = clean + noise); smooth load when sigma > 0.
double ref_importance_load(const Ref& r, const std::vector<double>& clean,
                           const std::vector<double>& noise, index_t T, double sigma, double a,
                           double b) {
  const int E = r.E, K = r.K;
  std::vector<double> h(clean.size());
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = clean[i] + noise[i];
  const RefRouting rt = ref_route(r, h, T);
  std::vector<double> importance(to_size(E), 0.0), load(to_size(E), 0.0);
  for (index_t i = 0; i < T * K; ++i) {
    if (rt.kept[to_size(i)]) importance[to_size(rt.ids[to_size(i)])] += rt.weights[to_size(i)];
    if (sigma <= 0.0) load[to_size(rt.ids[to_size(i)])] += 1.0;
  }
  if (sigma > 0.0) {
    for (index_t t = 0; t < T; ++t) {
      const std::vector<int> order = ref_token_order(&h[to_size(t * E)], E);
      for (int e = 0; e < E; ++e) {
        load[to_size(e)] +=
            ref_keep_probability(order, &h[to_size(t * E)], clean[to_size(t * E + e)], e, K, sigma);
      }
    }
  }
  return a * ref_cv2(importance) + b * ref_cv2(load);
}

std::vector<double> finite_differences(const std::function<double(const std::vector<double>&)>& f,
                                       std::vector<double> x) {
  std::vector<double> g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + kFdStep;
    const double plus = f(x);
    x[i] = x0 - kFdStep;
    const double minus = f(x);
    x[i] = x0;
    g[i] = (plus - minus) / (2.0 * kFdStep);
  }
  return g;
}

// ---- test cases -------------------------------------------------------------------

struct CaseDesc {
  const char* name;
  RouterConfig config;
  bool with_bias = false;
  index_t tokens = 32;
  double logit_scale = 1.0;
  unsigned seed = 1;
};

RouterConfig gating(GatingRule rule, bool renormalize = false, float scaling = 1.0f) {
  RouterConfig c;
  c.gating.rule = rule;
  c.gating.renormalize = renormalize;
  c.gating.scaling = scaling;
  return c;
}

RouterConfig noisy(RouterConfig c, float sigma, std::uint64_t seed) {
  c.noise.kind = NoiseKind::kGaussian;
  c.noise.amount = sigma;
  c.noise.seed = seed;
  return c;
}

// A token's discrete decisions: selected ids and the order of its top K+1
// keys (the smooth load's thresholds). Equal signatures: same losses' branch.
std::vector<int> signature(const Ref& r, const double* x) {
  const std::vector<double> s = ref_scores(r, x);
  const std::vector<double> keys = ref_keys(r, x, s);
  std::vector<int> sig = ref_select(r, keys);
  std::vector<int> all(to_size(r.E));
  std::iota(all.begin(), all.end(), 0);
  std::vector<int> order = ref_order(keys, all);
  order.resize(to_size(std::min(r.K + 1, r.E)));
  sig.insert(sig.end(), order.begin(), order.end());
  return sig;
}

// True when moving any one logit by +-kStableMargin keeps the signature.
bool stable_token(const Ref& r, std::vector<double> x) {
  const std::vector<int> base = signature(r, x.data());
  for (int e = 0; e < r.E; ++e) {
    for (double d : {kStableMargin, -kStableMargin}) {
      const double x0 = x[to_size(e)];
      x[to_size(e)] = x0 + d;
      const bool same = signature(r, x.data()) == base;
      x[to_size(e)] = x0;
      if (!same) return false;
    }
  }
  return true;
}

// A routed batch: x (clean logits) through Router::forward with w_gate = I,
// so logits = x + noise exactly; tokens near a selection boundary are redrawn.
template <class S>
struct Prepared {
  static constexpr int E = S::num_experts;
  static constexpr int K = S::top_k;
  RouterConfig config;
  index_t T;
  std::vector<float> x, bias, eye;
  AuxBuffers<S> buf;
  RoutingStats<S> stats;
  Ref ref;
  std::vector<double> clean, noise;  // float64 copies: noisy = clean + noise exactly

  explicit Prepared(const CaseDesc& d)
      : config(d.config), T(d.tokens), x(to_size(d.tokens * E)), buf(d.tokens) {
    std::mt19937 rng(d.seed);
    std::normal_distribution<float> normal(0.0f, static_cast<float>(d.logit_scale));
    std::uniform_real_distribution<float> small(-0.1f, 0.1f);
    if (d.with_bias) {
      bias.resize(E);
      for (float& b : bias) b = small(rng);
    }
    eye.assign(E * E, 0.0f);
    for (int e = 0; e < E; ++e) eye[to_size(e * E + e)] = 1.0f;
    for (float& v : x) v = normal(rng);
    ref = make_ref(config, bias, E, K);
    for (int attempt = 0;; ++attempt) {
      route();
      bool all_stable = true;
      for (index_t t = 0; t < T; ++t) {
        const std::vector<double> h(buf.logits.begin() + t * E, buf.logits.begin() + (t + 1) * E);
        if (!stable_token(ref, h)) {
          all_stable = false;
          for (int e = 0; e < E; ++e) x[to_size(t * E + e)] = normal(rng);
        }
      }
      if (all_stable) break;
      if (attempt > 200) {
        ADD_FAILURE() << d.name << ": could not draw inputs away from selection boundaries";
        break;
      }
    }
    clean = to_double(x);
    noise.resize(clean.size());
    for (std::size_t i = 0; i < clean.size(); ++i) noise[i] = double(buf.logits[i]) - clean[i];
  }

  void route() {
    Router<S> router(config);
    std::vector<std::byte> ws(to_size(router.workspace_size(T, E)));
    router.forward(MatrixView<const float>(x.data(), T, E),
                   MatrixView<const float>(eye.data(), E, E), {},
                   VectorView<const float>(bias.data(), static_cast<index_t>(bias.size())),
                   buf.view(), &stats, moekit::view_of(ws));
  }

  std::vector<double> noisy_logits(const std::vector<double>& c) const {
    std::vector<double> h(c.size());
    for (std::size_t i = 0; i < h.size(); ++i) h[i] = c[i] + noise[i];
    return h;
  }

  // The library's routing agrees with the reference (a check of the test).
  void expect_matches_reference() const {
    const RefRouting rt = ref_route(ref, noisy_logits(clean), T);
    for (index_t i = 0; i < T * K; ++i) {
      ASSERT_EQ(buf.ids[to_size(i)], rt.ids[to_size(i)]) << "slot " << i;
      ASSERT_EQ(buf.positions[to_size(i)] >= 0, rt.kept[to_size(i)]) << "slot " << i;
    }
  }

  // Counts the FD evaluations whose ids moved (must stay 0).
  std::function<double(const std::vector<double>&)> watched(
      std::function<double(const RefRouting&, const std::vector<double>&,
                           const std::vector<double>&)>
          loss,
      int& flips) const {
    const RefRouting base = ref_route(ref, noisy_logits(clean), T);
    return [this, loss, base, &flips](const std::vector<double>& c) {
      const std::vector<double> h = noisy_logits(c);
      const RefRouting rt = ref_route(ref, h, T);
      if (rt.ids != base.ids || rt.kept != base.kept) ++flips;
      return loss(rt, c, h);
    };
  }
};

// The library call on zeros, returning (loss, coeff * dL/dx as double).
template <class F>
std::pair<double, std::vector<double>> run_on_zeros(F&& call, index_t T, int E) {
  std::vector<float> d(to_size(T * E), 0.0f);
  const double loss = call(MatrixView<float>(d.data(), T, E));
  return {loss, to_double(d)};
}

CaseDesc case_e1() { return {"E1K1 softmax-topk", gating(GatingRule::kSoftmaxTopK), false, 16}; }
CaseDesc case_e4k4() {
  return {"E4K4 topk-softmax (K=E)", gating(GatingRule::kTopKSoftmax), false, 24, 1.0, 2};
}
CaseDesc case_e8k2() {
  CaseDesc d{
      "E8K2 softmax renorm, capacity 1", gating(GatingRule::kSoftmaxTopK, true), false, 64, 1.0, 3};
  d.config.capacity.factor = 1.0f;
  return d;
}
CaseDesc case_e60k4() {
  return {"E60K4 softmax-topk", gating(GatingRule::kSoftmaxTopK), false, 24, 1.5, 4};
}
CaseDesc case_e64k8() {
  return {"E64K8 sigmoid renorm x2.5", gating(GatingRule::kSigmoid, true, 2.5f), false, 24, 1.5, 5};
}
CaseDesc case_e16_groups() {
  CaseDesc d{
      "E16K4 sigmoid 4 groups keep 2 +bias", gating(GatingRule::kSigmoid, true), true, 32, 1.5, 6};
  d.config.gating.num_groups = 4;
  d.config.gating.groups_kept = 2;
  d.config.gating.group_score_top = 2;
  return d;
}

// Runs `check<S>(desc)` over the standard grid of specs and rules.
template <template <class> class Check>
void over_standard_cases() {
  Check<MoeSpec<1, 1>>::run(case_e1());
  Check<MoeSpec<4, 4>>::run(case_e4k4());
  Check<MoeSpec<8, 2>>::run(case_e8k2());
  Check<MoeSpec<60, 4>>::run(case_e60k4());
  Check<MoeSpec<64, 8>>::run(case_e64k8());
  Check<MoeSpec<16, 4>>::run(case_e16_groups());
}

// ---- Switch -----------------------------------------------------------------------

ErrorLog switch_log, sequence_log, z_log, importance_log;

template <class S>
struct CheckSwitch {
  static void run(const CaseDesc& d) {
    constexpr int E = S::num_experts;
    Prepared<S> p(d);
    p.expect_matches_reference();
    const RefRouting rt = ref_route(p.ref, p.noisy_logits(p.clean), p.T);
    for (bool tk : {true, false}) {
      const SwitchLossOptions opt{tk ? SwitchNormalization::kTokensTimesK
                                     : SwitchNormalization::kTokens};
      const auto [loss, grad] = run_on_zeros(
          [&](MatrixView<float> dl) {
            return moekit::cpu::switch_loss<S>(p.config.gating.rule, p.buf.view(), opt, kCoeff, dl);
          },
          p.T, E);
      std::vector<double> ref_grad(to_size(p.T * E), 0.0);
      const double ref_loss = ref_switch(p.ref, rt, 0, p.T, tk, kCoeff, &ref_grad);
      int flips = 0;
      auto f = p.watched(
          [&](const RefRouting& r, const std::vector<double>&, const std::vector<double>&) {
            return kCoeff * ref_switch(p.ref, r, 0, p.T, tk, 1.0, nullptr);
          },
          flips);
      const std::vector<double> fd = finite_differences(f, p.clean);
      EXPECT_EQ(flips, 0) << d.name;
      const double ev = rel_error(loss, ref_loss), eg = rel_error(grad, ref_grad, kZeroScale),
                   ef = rel_error(grad, fd, kZeroScale);
      switch_log.note(tk ? "switch T*K" : "switch T", d.name, ev, eg, ef);
      EXPECT_LT(ev, 1e-6) << d.name;
      EXPECT_LT(eg, 1e-5) << d.name;
      EXPECT_LT(ef, 1e-5) << d.name;
    }
  }
};

TEST(AuxLossSwitch, MatchesFloat64ReferenceAndFiniteDifferences) {
  over_standard_cases<CheckSwitch>();
}

TEST(AuxLossSwitch, OneUnderPerfectBalanceMoreWhenCollapsed) {
  using S = MoeSpec<8, 2>;
  constexpr int E = 8;
  const index_t T = 64;
  Router<S> router(gating(GatingRule::kSoftmaxTopK));
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  // Balanced: token t prefers experts t mod E and t+1 mod E, so every expert
  // gets exactly T K / E assignments; L = sum_e P_e = 1 whatever P is.
  AuxBuffers<S> buf(T);
  for (index_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) buf.logits[to_size(t * E + e)] = u(rng);
    buf.logits[to_size(t * E + t % E)] = 4.0f;
    buf.logits[to_size(t * E + (t + 1) % E)] = 3.0f;
  }
  RoutingStats<S> stats;
  router.route(buf.view(), {}, &stats);
  EXPECT_DOUBLE_EQ(stats.max_load_ratio(), 1.0);
  const double balanced =
      moekit::cpu::switch_loss<S>(GatingRule::kSoftmaxTopK, buf.view(), {}, 1.0f);
  EXPECT_NEAR(balanced, 1.0, 1e-6);
  // Collapsed: every token to experts 0 and 1.
  for (index_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) buf.logits[to_size(t * E + e)] = u(rng);
    buf.logits[to_size(t * E + 0)] = 4.0f;
    buf.logits[to_size(t * E + 1)] = 3.0f;
  }
  router.route(buf.view(), {}, &stats);
  const double collapsed =
      moekit::cpu::switch_loss<S>(GatingRule::kSoftmaxTopK, buf.view(), {}, 1.0f);
  // f = (1/2, 1/2, 0, ...): L = E (P_0 + P_1) / 2, P_0 + P_1 about 0.9.
  const double expected = E * 0.5 * (stats.mean_distribution[0] + stats.mean_distribution[1]);
  EXPECT_NEAR(collapsed, expected, 1e-5);
  EXPECT_GT(collapsed, 3.0);
  // K = 1, every token to expert 0: f = (1, 0, ...), L = E P_0.
  using S1 = MoeSpec<8, 1>;
  AuxBuffers<S1> one(T);
  for (index_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) one.logits[to_size(t * E + e)] = u(rng);
    one.logits[to_size(t * E)] = 3.0f;
  }
  RoutingStats<S1> stats1;
  Router<S1>(gating(GatingRule::kSoftmaxTopK)).route(one.view(), {}, &stats1);
  ASSERT_EQ(stats1.assigned[0], T);
  const double single =
      moekit::cpu::switch_loss<S1>(GatingRule::kSoftmaxTopK, one.view(), {}, 1.0f);
  EXPECT_NEAR(single, E * stats1.mean_distribution[0], 1e-5);
  EXPECT_GT(single, 4.0);
  std::printf(
      "[ aux-info ] switch loss: balanced %.9f; all tokens to experts 0,1 (K=2) %.4f; all tokens "
      "to expert 0 (K=1) %.4f (E = 8)\n",
      balanced, collapsed, single);
}

TEST(AuxLossSwitch, TokensNormalisationIsKTimesTokensTimesK) {
  using S = MoeSpec<60, 4>;
  Prepared<S> p(case_e60k4());
  const auto [tk, grad_tk] = run_on_zeros(
      [&](MatrixView<float> dl) {
        return moekit::cpu::switch_loss<S>(GatingRule::kSoftmaxTopK, p.buf.view(),
                                           {SwitchNormalization::kTokensTimesK}, kCoeff, dl);
      },
      p.T, 60);
  const auto [t, grad_t] = run_on_zeros(
      [&](MatrixView<float> dl) {
        return moekit::cpu::switch_loss<S>(GatingRule::kSoftmaxTopK, p.buf.view(),
                                           {SwitchNormalization::kTokens}, kCoeff, dl);
      },
      p.T, 60);
  EXPECT_NEAR(t, 4.0 * tk, 1e-12 * t);
  std::vector<double> scaled(grad_tk);
  for (double& v : scaled) v *= 4.0;
  EXPECT_LT(rel_error(grad_t, scaled, kZeroScale), 1e-6);
}

TEST(AuxLossSwitch, DroppedAssignmentsStillCountAndFCarriesNoGradient) {
  using S = MoeSpec<8, 2>;
  CaseDesc d = case_e8k2();  // capacity factor 1: some slots are dropped
  Prepared<S> capped(d);
  d.config.capacity.factor = 0.0f;  // the same logits, dropless
  Prepared<S> dropless(d);
  ASSERT_GT(capped.stats.dropped, 0);
  ASSERT_EQ(dropless.stats.dropped, 0);
  ASSERT_EQ(capped.buf.logits, dropless.buf.logits);
  for (auto* p : {&capped, &dropless}) {
    p->buf.positions.assign(p->buf.positions.size(), p == &capped ? -1 : 0);  // irrelevant
  }
  const auto a = run_on_zeros(
      [&](MatrixView<float> dl) {
        return moekit::cpu::switch_loss<S>(GatingRule::kSoftmaxTopK, capped.buf.view(), {}, kCoeff,
                                           dl);
      },
      capped.T, 8);
  const auto b = run_on_zeros(
      [&](MatrixView<float> dl) {
        return moekit::cpu::switch_loss<S>(GatingRule::kSoftmaxTopK, dropless.buf.view(), {},
                                           kCoeff, dl);
      },
      dropless.T, 8);
  EXPECT_EQ(a.first, b.first);
  EXPECT_EQ(a.second, b.second);
}

// ---- sequence-wise ------------------------------------------------------------------

template <class S>
struct CheckSequence {
  static void run(const CaseDesc& d) {
    constexpr int E = S::num_experts;
    Prepared<S> p(d);
    const RefRouting rt = ref_route(p.ref, p.noisy_logits(p.clean), p.T);
    for (index_t len : {p.T / 4, p.T / 2, index_t{1}}) {
      const auto [loss, grad] = run_on_zeros(
          [&](MatrixView<float> dl) {
            return moekit::cpu::sequence_aux_loss<S>(p.config.gating.rule, p.buf.view(), len,
                                                     kCoeff, dl);
          },
          p.T, E);
      std::vector<double> ref_grad(to_size(p.T * E), 0.0);
      const double ref_loss = ref_sequence(p.ref, rt, p.T, len, kCoeff, &ref_grad);
      int flips = 0;
      auto f = p.watched(
          [&](const RefRouting& r, const std::vector<double>&, const std::vector<double>&) {
            return kCoeff * ref_sequence(p.ref, r, p.T, len, 1.0, nullptr);
          },
          flips);
      const std::vector<double> fd = finite_differences(f, p.clean);
      EXPECT_EQ(flips, 0) << d.name;
      const double ev = rel_error(loss, ref_loss), eg = rel_error(grad, ref_grad, kZeroScale),
                   ef = rel_error(grad, fd, kZeroScale);
      const std::string what = "seq len " + std::to_string(len);
      sequence_log.note(what.c_str(), d.name, ev, eg, ef);
      EXPECT_LT(ev, 1e-6) << d.name << " " << what;
      EXPECT_LT(eg, 1e-5) << d.name << " " << what;
      EXPECT_LT(ef, 1e-5) << d.name << " " << what;
    }
  }
};

TEST(AuxLossSequence, MatchesFloat64ReferenceAndFiniteDifferences) {
  over_standard_cases<CheckSequence>();
}

TEST(AuxLossSequence, OneSequenceIsTheSwitchLossBitForBit) {
  using S = MoeSpec<64, 8>;
  Prepared<S> p(case_e64k8());
  const auto seq = run_on_zeros(
      [&](MatrixView<float> dl) {
        return moekit::cpu::sequence_aux_loss<S>(GatingRule::kSigmoid, p.buf.view(), p.T, kCoeff,
                                                 dl);
      },
      p.T, 64);
  const auto sw = run_on_zeros(
      [&](MatrixView<float> dl) {
        return moekit::cpu::switch_loss<S>(GatingRule::kSigmoid, p.buf.view(), {}, kCoeff, dl);
      },
      p.T, 64);
  EXPECT_EQ(seq.first, sw.first);
  EXPECT_EQ(seq.second, sw.second);
}

TEST(AuxLossSequence, IsTheMeanOfPerSequenceSwitchLosses) {
  using S = MoeSpec<8, 2>;
  Prepared<S> p(case_e8k2());
  const index_t len = 16, n = p.T / len;
  double mean = 0.0;
  const Routing r = p.buf.view();
  for (index_t s = 0; s < n; ++s) {
    const Routing part{r.logits.middle_rows(s * len, len), r.scores.middle_rows(s * len, len),
                       r.expert_ids.middle_rows(s * len, len), r.weights.middle_rows(s * len, len),
                       r.positions.middle_rows(s * len, len)};
    mean += moekit::cpu::switch_loss<S>(GatingRule::kSoftmaxTopK, part, {}, 1.0f);
  }
  mean /= static_cast<double>(n);
  EXPECT_EQ(moekit::cpu::sequence_aux_loss<S>(GatingRule::kSoftmaxTopK, r, len, 1.0f), mean);
}

// ---- z-loss ---------------------------------------------------------------------------

template <class S>
struct CheckZ {
  static void run(const CaseDesc& d) {
    constexpr int E = S::num_experts;
    Prepared<S> p(d);
    const auto [loss, grad] = run_on_zeros(
        [&](MatrixView<float> dl) { return moekit::cpu::z_loss<S>(p.buf.view(), kCoeff, dl); }, p.T,
        E);
    const std::vector<double> h = p.noisy_logits(p.clean);
    std::vector<double> ref_grad(to_size(p.T * E), 0.0);
    const double ref_loss = ref_z(h, p.T, E, kCoeff, &ref_grad);
    int flips = 0;
    auto f = p.watched(
        [&](const RefRouting&, const std::vector<double>&, const std::vector<double>& x) {
          return kCoeff * ref_z(x, p.T, E, 1.0, nullptr);
        },
        flips);
    const std::vector<double> fd = finite_differences(f, p.clean);
    const double ev = rel_error(loss, ref_loss), eg = rel_error(grad, ref_grad, kZeroScale),
                 ef = rel_error(grad, fd, kZeroScale);
    z_log.note("z", d.name, ev, eg, ef);
    EXPECT_LT(ev, 1e-6) << d.name;
    EXPECT_LT(eg, 1e-5) << d.name;
    EXPECT_LT(ef, 1e-5) << d.name;
  }
};

TEST(AuxLossZ, MatchesFloat64ReferenceAndFiniteDifferences) {
  over_standard_cases<CheckZ>();
  // Larger logits: lse far from 0.
  CaseDesc d = case_e8k2();
  d.logit_scale = 8.0;
  d.name = "E8K2 logits x8";
  CheckZ<MoeSpec<8, 2>>::run(d);
}

// The case: a masked (-inf) expert leaves a finite log-sum-exp.
TEST(AuxLossZ, MaskedExpertKeepsItsRow) {
  using S = MoeSpec<4, 1>;
  AuxBuffers<S> buf(2);
  const float rows[8] = {1.0f, 2.0f, 3.0f, -kInf, 1.0f, 2.0f, 3.0f, 4.0f};
  std::copy(rows, rows + 8, buf.logits.begin());
  Router<S>(gating(GatingRule::kSoftmaxTopK)).route(buf.view(), {});
  std::vector<float> dl(8, 0.0f);
  const double loss = moekit::cpu::z_loss<S>(buf.view(), 1.0f, {dl.data(), 2, 4});
  const double lse0 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  const double lse1 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0) + std::exp(4.0));
  EXPECT_NEAR(loss, (lse0 * lse0 + lse1 * lse1) / 2.0, 1e-5);  // 15.66, not 9.86
  EXPECT_NEAR(loss, 15.66, 0.005);
  EXPECT_EQ(dl[3], 0.0f);  // the masked expert gets no gradient
  EXPECT_NEAR(dl[0], lse0 * std::exp(1.0 - lse0), 1e-5);
  RoutingStats<S> stats;
  Router<S>(gating(GatingRule::kSoftmaxTopK)).route(buf.view(), {}, &stats);
  EXPECT_EQ(stats.z_loss, loss);
}

TEST(AuxLossZ, NonFiniteRowsContributeZeroAndGetNoGradient) {
  using S = MoeSpec<8, 2>;
  constexpr int E = 8;
  const index_t T = 7;
  AuxBuffers<S> buf(T);
  std::mt19937 rng(21);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (float& v : buf.logits) v = normal(rng);
  buf.logits[1 * E + 3] = kNaN;
  buf.logits[2 * E + 5] = kInf;
  buf.logits[3 * E + 0] = -kInf;  // masked: the row counts, without expert 0
  buf.logits[3 * E + 6] = -kInf;
  for (int e = 0; e < E; ++e) buf.logits[to_size(4 * E + e)] = kNaN;
  for (int e = 0; e < E; ++e) buf.logits[to_size(6 * E + e)] = -kInf;  // nothing above -inf
  RouterConfig cfg = gating(GatingRule::kSoftmaxTopK);
  Router<S>(cfg).route(buf.view(), {});

  const std::vector<float> before = poison(T * E);
  std::vector<float> dl = before;
  const double loss = moekit::cpu::z_loss<S>(buf.view(), kCoeff, {dl.data(), T, E});
  std::vector<double> ref_grad(T * E, 0.0);
  const double ref_loss = ref_z(to_double(buf.logits), T, E, kCoeff, &ref_grad);
  EXPECT_LT(rel_error(loss, ref_loss), 1e-6);  // rows 0, 3 and 5 over T = 7
  for (index_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) {
      const std::size_t i = to_size(t * E + e);
      if (t == 1 || t == 2 || t == 4 || t == 6) {
        EXPECT_EQ(dl[i], before[i]) << "row " << t;
      } else {
        EXPECT_NEAR(dl[i] - before[i], ref_grad[i], 1e-6);
      }
    }
  }
  // The other losses stay finite on this routing too.
  std::vector<float> dl2(T * E, 0.0f);
  const MatrixView<float> v(dl2.data(), T, E);
  double sum = moekit::cpu::switch_loss<S>(GatingRule::kSoftmaxTopK, buf.view(), {}, 1.0f, v);
  sum += moekit::cpu::sequence_aux_loss<S>(GatingRule::kSoftmaxTopK, buf.view(), 7, 1.0f, v);
  sum += moekit::cpu::importance_load_loss<S>(cfg, buf.view(), {}, {}, 1.0f, v);
  EXPECT_TRUE(std::isfinite(sum));
  for (float g : dl2) EXPECT_TRUE(std::isfinite(g));
}

// ---- importance / load --------------------------------------------------------------------

template <class S>
struct CheckImportanceLoad {
  static void run(const CaseDesc& d) {
    constexpr int E = S::num_experts;
    Prepared<S> p(d);
    p.expect_matches_reference();
    const bool smooth = p.config.noise.kind == NoiseKind::kGaussian &&
                        p.config.gating.rule != GatingRule::kSigmoid && p.bias.empty() &&
                        p.config.gating.num_groups <= 1;
    const double sigma = smooth ? p.config.noise.amount : 0.0;
    for (const ImportanceLoadOptions opt :
         {ImportanceLoadOptions{}, ImportanceLoadOptions{0.0f, 1.0f},
          ImportanceLoadOptions{0.5f, 0.0f}}) {
      const auto [loss, grad] = run_on_zeros(
          [&](MatrixView<float> dl) {
            return moekit::cpu::importance_load_loss<S>(
                p.config, p.buf.view(),
                VectorView<const float>(p.bias.data(), static_cast<index_t>(p.bias.size())), opt,
                kCoeff, dl);
          },
          p.T, E);
      const double a = opt.importance_weight, b = opt.load_weight;
      const double ref_loss = ref_importance_load(p.ref, p.clean, p.noise, p.T, sigma, a, b);
      int flips = 0;
      auto f = p.watched(
          [&](const RefRouting&, const std::vector<double>& c, const std::vector<double>&) {
            return kCoeff * ref_importance_load(p.ref, c, p.noise, p.T, sigma, a, b);
          },
          flips);
      const std::vector<double> fd = finite_differences(f, p.clean);
      EXPECT_EQ(flips, 0) << d.name;
      const double ev = rel_error(loss, ref_loss), ef = rel_error(grad, fd, kZeroScale);
      char what[64];
      std::snprintf(what, sizeof what, "%s a%.1f b%.1f", smooth ? "smooth" : "counts", a, b);
      importance_log.note(what, d.name, ev, -1.0, ef);
      EXPECT_LT(ev, 1e-5) << d.name << " " << what;
      EXPECT_LT(ef, 1e-4) << d.name << " " << what;
    }
  }
};

TEST(AuxLossImportanceLoad, HardLoadMatchesFloat64ReferenceAndFiniteDifferences) {
  over_standard_cases<CheckImportanceLoad>();
}

TEST(AuxLossImportanceLoad, SmoothLoadMatchesFloat64ReferenceAndFiniteDifferences) {
  CaseDesc d = case_e8k2();
  d.name = "E8K2 topk-softmax noisy, cap 1";
  d.config = noisy(gating(GatingRule::kTopKSoftmax), 0.5f, 77);
  d.config.capacity.factor = 1.0f;
  CheckImportanceLoad<MoeSpec<8, 2>>::run(d);
  d = case_e60k4();
  d.name = "E60K4 softmax-topk noisy";
  d.config = noisy(gating(GatingRule::kSoftmaxTopK, true), 1.0f, 78);
  CheckImportanceLoad<MoeSpec<60, 4>>::run(d);
  d = case_e4k4();
  d.name = "E4K4 noisy (K=E: Phi = 1)";
  d.config = noisy(gating(GatingRule::kTopKSoftmax), 0.5f, 79);
  CheckImportanceLoad<MoeSpec<4, 4>>::run(d);
  d = case_e1();
  d.name = "E1K1 noisy";
  d.config = noisy(gating(GatingRule::kSoftmaxTopK), 0.5f, 80);
  CheckImportanceLoad<MoeSpec<1, 1>>::run(d);
  d = CaseDesc{"E64K8 softmax-topk noisy",
               noisy(gating(GatingRule::kSoftmaxTopK), 0.3f, 81),
               false,
               16,
               1.0,
               9};
  CheckImportanceLoad<MoeSpec<64, 8>>::run(d);
}

TEST(AuxLossImportanceLoad, SmoothLoadOnlyWhenKeysAreTheNoisyLogits) {
  // A selection bias, groups or sigmoid make the keys something else: the
  // load is then the counts (the checker's reference decides the same way).
  CaseDesc d = case_e8k2();
  d.name = "E8K2 noisy + bias -> counts";
  d.config = noisy(gating(GatingRule::kSoftmaxTopK), 0.5f, 82);
  d.with_bias = true;
  CheckImportanceLoad<MoeSpec<8, 2>>::run(d);
  d = case_e16_groups();
  d.name = "E16K4 sigmoid groups noisy";
  d.config = noisy(d.config, 0.5f, 83);
  d.with_bias = false;
  CheckImportanceLoad<MoeSpec<16, 4>>::run(d);
}

TEST(AuxLossImportanceLoad, NonFiniteTokenCountsItsHardSelection) {
  using S = MoeSpec<8, 2>;
  constexpr int E = 8, K = 2;
  CaseDesc d = case_e8k2();
  d.config = noisy(gating(GatingRule::kTopKSoftmax), 0.5f, 84);
  d.config.capacity.factor = 0.0f;
  Prepared<S> p(d);
  // x * I with a NaN in x makes the whole row NaN: keys all -inf, ids 0, 1.
  p.x[5 * E + 2] = kNaN;
  p.route();
  ASSERT_EQ(p.buf.ids[5 * K], 0);
  ASSERT_EQ(p.buf.ids[5 * K + 1], 1);
  std::vector<float> dl(to_size(p.T * E), 0.0f);
  const double loss = moekit::cpu::importance_load_loss<S>(p.config, p.buf.view(), {}, {0.0f, 1.0f},
                                                           kCoeff, {dl.data(), p.T, E});
  std::vector<double> load(E, 0.0);
  const std::vector<double> h = p.noisy_logits(p.clean);
  for (index_t t = 0; t < p.T; ++t) {
    const std::vector<int> order = ref_token_order(&h[to_size(t * E)], E);
    for (int e = 0; e < E; ++e) {
      load[to_size(e)] += t == 5 ? (e < K ? 1.0 : 0.0)
                                 : ref_keep_probability(order, &h[to_size(t * E)],
                                                        p.clean[to_size(t * E + e)], e, K, 0.5);
    }
  }
  EXPECT_LT(rel_error(loss, ref_cv2(load)), 1e-5);
  for (int e = 0; e < E; ++e) EXPECT_EQ(dl[to_size(5 * E + e)], 0.0f);
  for (float g : dl) EXPECT_TRUE(std::isfinite(g));
}

// ---- the "adds" contract, T = 0, determinism ----------------------------------------------

template <class S, class F>
void expect_adds(const char* name, index_t T, F&& call) {
  constexpr int E = S::num_experts;
  std::vector<float> zero(to_size(T * E), 0.0f);
  const double l0 = call(MatrixView<float>(zero.data(), T, E));
  std::vector<float> dl = poison(to_size(T * E));
  const double l1 = call(MatrixView<float>(dl.data(), T, E));
  EXPECT_EQ(l0, l1) << name;
  const std::vector<float> p = poison(to_size(T * E));
  std::size_t changed = 0;
  for (std::size_t i = 0; i < dl.size(); ++i) {
    EXPECT_EQ(dl[i], p[i] + zero[i]) << name << " element " << i;  // one float addition
    changed += zero[i] != 0.0f;
  }
  EXPECT_GE(changed, static_cast<std::size_t>(T)) << name << ": gradient mostly zero";
  // Without dlogits only the value comes back.
  EXPECT_EQ(call(MatrixView<float>{}), l0) << name;
}

TEST(AuxLoss, AddsIntoDlogits) {
  using S = MoeSpec<16, 4>;
  Prepared<S> p(case_e16_groups());
  const VectorView<const float> bias(p.bias.data(), 16);
  expect_adds<S>("switch", p.T, [&](MatrixView<float> dl) {
    return moekit::cpu::switch_loss<S>(GatingRule::kSigmoid, p.buf.view(), {}, kCoeff, dl);
  });
  expect_adds<S>("sequence", p.T, [&](MatrixView<float> dl) {
    return moekit::cpu::sequence_aux_loss<S>(GatingRule::kSigmoid, p.buf.view(), 8, kCoeff, dl);
  });
  expect_adds<S>("z", p.T, [&](MatrixView<float> dl) {
    return moekit::cpu::z_loss<S>(p.buf.view(), kCoeff, dl);
  });
  expect_adds<S>("importance/load", p.T, [&](MatrixView<float> dl) {
    return moekit::cpu::importance_load_loss<S>(p.config, p.buf.view(), bias, {}, kCoeff, dl);
  });
  using N = MoeSpec<8, 2>;
  CaseDesc d = case_e8k2();
  d.config = noisy(gating(GatingRule::kTopKSoftmax), 0.5f, 85);
  Prepared<N> q(d);
  expect_adds<N>("importance/smooth load", q.T, [&](MatrixView<float> dl) {
    return moekit::cpu::importance_load_loss<N>(q.config, q.buf.view(), {}, {}, kCoeff, dl);
  });
}

TEST(AuxLoss, ZeroTokens) {
  using S = MoeSpec<8, 2>;
  AuxBuffers<S> buf(0);
  RouterConfig cfg = noisy(gating(GatingRule::kTopKSoftmax), 0.5f, 1);
  Router<S>(cfg).route(buf.view(), {});
  float sentinel = 42.0f;
  const MatrixView<float> dl(&sentinel, 0, 8);
  EXPECT_EQ(moekit::cpu::switch_loss<S>(GatingRule::kTopKSoftmax, buf.view(), {}, 1.0f, dl), 0.0);
  EXPECT_EQ(moekit::cpu::sequence_aux_loss<S>(GatingRule::kTopKSoftmax, buf.view(), 4, 1.0f, dl),
            0.0);
  EXPECT_EQ(moekit::cpu::z_loss<S>(buf.view(), 1.0f, dl), 0.0);
  EXPECT_EQ(moekit::cpu::importance_load_loss<S>(cfg, buf.view(), {}, {}, 1.0f, dl), 0.0);
  EXPECT_EQ(sentinel, 42.0f);
  ExpertBias<S> balance(0.1f);
  balance.accumulate(MatrixView<const std::int32_t>(buf.ids.data(), 0, 2));
  balance.update();
  for (float b : balance.bias()) EXPECT_EQ(b, 0.0f);
}

TEST(AuxLoss, BitIdenticalAcrossRunsAndThreadCounts) {
  using S = MoeSpec<64, 8>;
  constexpr int E = 64;
  // T E above the parallel grain, so the gradient loops do run in parallel.
  CaseDesc d{"E64K8 large", gating(GatingRule::kSoftmaxTopK), false, 1024, 1.0, 31};
  d.config = noisy(d.config, 0.3f, 86);
  const index_t T = d.tokens;
  AuxBuffers<S> buf(T);
  std::mt19937 rng(32);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(to_size(T * E)), eye(E * E, 0.0f);
  for (float& v : x) v = normal(rng);
  for (int e = 0; e < E; ++e) eye[to_size(e * E + e)] = 1.0f;
  const Router<S> router(d.config);
  std::vector<std::byte> ws(to_size(router.workspace_size(T, E)));
  router.forward({x.data(), T, E}, {eye.data(), E, E}, {}, {}, buf.view(), nullptr,
                 moekit::view_of(ws));
  auto all = [&] {
    std::vector<float> dl(to_size(T * E), 0.0f);
    const MatrixView<float> v(dl.data(), T, E);
    std::vector<double> losses{
        moekit::cpu::switch_loss<S>(GatingRule::kSoftmaxTopK, buf.view(), {}, 1.0f, v),
        moekit::cpu::sequence_aux_loss<S>(GatingRule::kSoftmaxTopK, buf.view(), 256, 1.0f, v),
        moekit::cpu::z_loss<S>(buf.view(), 1.0f, v),
        moekit::cpu::importance_load_loss<S>(d.config, buf.view(), {}, {}, 1.0f, v)};
    return std::make_pair(losses, dl);
  };
  const auto first = all();
  const auto again = all();
  EXPECT_EQ(first.first, again.first);
  EXPECT_TRUE(same_bits(first.second, again.second));
#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto serial = all();
  omp_set_num_threads(threads);
  EXPECT_EQ(first.first, serial.first);
  EXPECT_TRUE(same_bits(first.second, serial.second));
#endif
}

// The forward's statistics carry the Switch and z-loss values: the same bits
// as the losses computed from the routing, for every rule, with non-finite
// rows, both normalisations, at 1 and 2 threads, and at sizes where the
// routing pass runs in parallel.
template <class S>
void expect_stats_carry_loss_values(GatingRule rule, index_t T, unsigned seed) {
  constexpr int E = S::num_experts;
  AuxBuffers<S> buf(T);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (float& v : buf.logits) v = normal(rng);
  if (T > 3) {
    buf.logits[1 * E + 2] = kNaN;
    buf.logits[3 * E + 0] = kInf;
    buf.logits[2 * E + 1] = -kInf;  // a masked expert: the row still adds its lse^2
  }
  RouterConfig config = gating(rule);
  config.capacity.factor = 1.0f;
  for (int threads : {2, 1}) {
#if defined(_OPENMP)
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    RoutingStats<S> stats;
    Router<S>(config).route(buf.view(), {}, &stats);
#if defined(_OPENMP)
    omp_set_num_threads(saved);
#endif
    for (auto norm : {SwitchNormalization::kTokensTimesK, SwitchNormalization::kTokens}) {
      const double from_routing = moekit::cpu::switch_loss<S>(rule, buf.view(), {norm}, 1.0f);
      EXPECT_EQ(moekit::cpu::switch_loss<S>(stats, {norm}), from_routing)
          << "rule " << static_cast<int>(rule) << " T " << T << " threads " << threads;
    }
    EXPECT_EQ(stats.z_loss, moekit::cpu::z_loss<S>(buf.view(), 1.0f))
        << "rule " << static_cast<int>(rule) << " T " << T << " threads " << threads;
    EXPECT_GT(stats.z_loss, 0.0);
  }
}

TEST(AuxLossFromStats, SwitchAndZValuesAreTheLossesBitForBit) {
  for (GatingRule rule :
       {GatingRule::kSoftmaxTopK, GatingRule::kTopKSoftmax, GatingRule::kSigmoid}) {
    expect_stats_carry_loss_values<MoeSpec<8, 2>>(rule, 37, 5);
    expect_stats_carry_loss_values<MoeSpec<64, 8>>(rule, 1500, 6);  // parallel pass
    expect_stats_carry_loss_values<MoeSpec<384, 8>>(rule, 200, 7);
  }
  RoutingStats<MoeSpec<8, 2>> empty;
  EXPECT_EQ(moekit::cpu::switch_loss(empty), 0.0);
}

// ---- bad input ------------------------------------------------------------------------

TEST(AuxLossBadInput, RejectedWithNamedValuesAndNothingWritten) {
  using S = MoeSpec<8, 2>;
  constexpr int E = 8;
  Prepared<S> p(case_e8k2());
  const index_t T = p.T;
  const std::vector<float> before = poison(to_size((T + 1) * E));
  std::vector<float> dl = before;
  const MatrixView<float> good(dl.data(), T, E);
  const GatingRule rule = GatingRule::kSoftmaxTopK;

  struct Case {
    const char* what;
    Errc code;
    std::string message;
    std::function<void()> call;
  };
  Routing bad_scores = p.buf.view();
  bad_scores.scores = {p.buf.scores.data(), T, E - 1};
  std::vector<std::int32_t> ids_high = p.buf.ids, ids_low = p.buf.ids;
  ids_high[3 * 2 + 1] = E;
  ids_low[5 * 2] = -1;
  Routing high = p.buf.view(), low = p.buf.view();
  high.expert_ids = {ids_high.data(), T, 2};
  low.expert_ids = {ids_low.data(), T, 2};
  const std::vector<float> short_bias(3, 0.0f);
  const std::vector<Case> cases = {
      {"dlogits rows", Errc::kShapeMismatch, "dlogits is 65 x 8, expected 64 x 8",
       [&] {
         moekit::cpu::switch_loss<S>(rule, p.buf.view(), {}, 1.0f, {dl.data(), T + 1, E});
       }},
      {"dlogits null", Errc::kNullPointer, "dlogits is null",
       [&] {
         moekit::cpu::z_loss<S>(p.buf.view(), 1.0f, {static_cast<float*>(nullptr), T, E});
       }},
      {"scores cols", Errc::kShapeMismatch, "routing.scores is 64 x 7, expected 64 x 8",
       [&] { moekit::cpu::switch_loss<S>(rule, bad_scores, {}, 1.0f, good); }},
      {"id too large", Errc::kOutOfRange, "routing.expert_ids(3, 1) = 8 is outside [0, 8)",
       [&] { moekit::cpu::switch_loss<S>(rule, high, {}, 1.0f, good); }},
      {"id negative (importance)", Errc::kOutOfRange,
       "routing.expert_ids(5, 0) = -1 is outside [0, 8)",
       [&] { moekit::cpu::importance_load_loss<S>(p.config, low, {}, {}, 1.0f, good); }},
      {"id negative (sequence)", Errc::kOutOfRange, "routing.expert_ids(5, 0) = -1",
       [&] { moekit::cpu::sequence_aux_loss<S>(rule, low, 16, 1.0f, good); }},
      {"sequence length", Errc::kShapeMismatch,
       "routing has T = 64 tokens, not a multiple of sequence_length = 5",
       [&] { moekit::cpu::sequence_aux_loss<S>(rule, p.buf.view(), 5, 1.0f, good); }},
      {"sequence length 0", Errc::kInvalidArgument, "sequence_length = 0 must be positive",
       [&] { moekit::cpu::sequence_aux_loss<S>(rule, p.buf.view(), 0, 1.0f, good); }},
      {"coeff NaN", Errc::kInvalidArgument, "coeff = nan is not finite",
       [&] { moekit::cpu::z_loss<S>(p.buf.view(), kNaN, good); }},
      {"normalization", Errc::kInvalidArgument, "options.normalization = 7",
       [&] {
         moekit::cpu::switch_loss<S>(rule, p.buf.view(), {static_cast<SwitchNormalization>(7)},
                                     1.0f, good);
       }},
      {"importance weight", Errc::kInvalidArgument, "options.importance_weight = -1",
       [&] {
         moekit::cpu::importance_load_loss<S>(p.config, p.buf.view(), {}, {-1.0f, 1.0f}, 1.0f,
                                              good);
       }},
      {"selection bias size", Errc::kShapeMismatch, "selection_bias has 3 elements, expected 8",
       [&] {
         moekit::cpu::importance_load_loss<S>(p.config, p.buf.view(), {short_bias.data(), 3}, {},
                                              1.0f, good);
       }},
  };
  for (const Case& c : cases) {
    const std::string msg = moekit_test::expect_error(c.call, c.code);
    EXPECT_NE(msg.find(c.message), std::string::npos) << c.what << ": " << msg;
    EXPECT_TRUE(same_bits(dl, before)) << c.what << " wrote to dlogits";
  }
}

// ---- ExpertBias -------------------------------------------------------------------------

TEST(ExpertBias, SignRuleOnAHandExample) {
  using S = MoeSpec<4, 1>;
  ExpertBias<S> balance(0.25f);
  for (float b : balance.bias()) EXPECT_EQ(b, 0.0f);
  // Two micro-batches: counts 4, 2, 2, 0 (mean 2).
  const std::vector<std::int32_t> a{0, 0, 1, 2}, b{0, 0, 2, 1};
  balance.accumulate(MatrixView<const std::int32_t>(a.data(), 4, 1));
  balance.accumulate(MatrixView<const std::int32_t>(b.data(), 4, 1));
  EXPECT_EQ(balance.counts()[0], 4);
  EXPECT_EQ(balance.counts()[3], 0);
  balance.update();
  const std::vector<float> expected{-0.25f, 0.0f, 0.0f, 0.25f};
  EXPECT_EQ(std::vector<float>(balance.bias().begin(), balance.bias().end()), expected);
  for (index_t c : balance.counts()) EXPECT_EQ(c, 0);  // reset
  balance.update();  // nothing accumulated: sign(0) = 0 everywhere
  EXPECT_EQ(std::vector<float>(balance.bias().begin(), balance.bias().end()), expected);
  // Counts 1, 1, 1, 2 (mean 1.25): 3 experts below the mean go up.
  const std::vector<std::int32_t> c{3, 0, 1, 2, 3};
  balance.accumulate(MatrixView<const std::int32_t>(c.data(), 5, 1));
  balance.update();
  const std::vector<float> expected2{0.0f, 0.25f, 0.25f, 0.0f};
  EXPECT_EQ(std::vector<float>(balance.bias().begin(), balance.bias().end()), expected2);
}

TEST(ExpertBias, StatsAndIdsAccumulateTheSame) {
  using S = MoeSpec<16, 4>;
  Prepared<S> p(case_e16_groups());
  ExpertBias<S> from_stats(0.01f), from_ids(0.01f);
  from_stats.accumulate(p.stats);
  from_ids.accumulate(MatrixView<const std::int32_t>(p.buf.ids.data(), p.T, 4));
  EXPECT_EQ(from_stats.counts(), from_ids.counts());
}

TEST(ExpertBias, BalancesASkewedRouter) {
  using S = MoeSpec<16, 2>;
  constexpr int E = 16;
  const index_t T = 512;
  RouterConfig cfg = gating(GatingRule::kSigmoid, true);
  Router<S> router(cfg);
  ExpertBias<S> balance(0.01f);
  std::mt19937 rng(41);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  AuxBuffers<S> buf(T);
  RoutingStats<S> stats;
  std::vector<double> ratio;
  double switch_first = 0.0, switch_last = 0.0;
  for (int step = 0; step < 300; ++step) {
    // Expert e's logits are offset by 6 (e / (E - 1) - 1/2): a strong skew.
    for (index_t t = 0; t < T; ++t) {
      for (int e = 0; e < E; ++e) {
        buf.logits[to_size(t * E + e)] =
            normal(rng) + 6.0f * (static_cast<float>(e) / (E - 1) - 0.5f);
      }
    }
    router.route(buf.view(), balance.bias(), &stats);
    ratio.push_back(stats.max_load_ratio());
    const double sw = moekit::cpu::switch_loss<S>(cfg.gating.rule, buf.view(), {}, 1.0f);
    (step == 0 ? switch_first : switch_last) = sw;
    balance.accumulate(stats);
    balance.update();
  }
  double tail = 0.0;
  for (std::size_t i = ratio.size() - 50; i < ratio.size(); ++i) tail += ratio[i] / 50.0;
  const auto bias = balance.bias();
  std::printf(
      "[ aux-info ] ExpertBias gamma 0.01, E=16 K=2, T=512: max_load_ratio step 0 %.3f, "
      "step 100 %.3f, mean of steps 250-299 %.3f; switch loss %.3f -> %.3f; bias %.3f .. %.3f\n",
      ratio.front(), ratio[100], tail, switch_first, switch_last,
      *std::min_element(bias.begin(), bias.end()), *std::max_element(bias.begin(), bias.end()));
  EXPECT_GT(ratio.front(), 4.0);
  EXPECT_LT(tail, 1.5);
  EXPECT_LT(tail, 0.3 * ratio.front());
  // The most favoured expert ends with the lowest bias.
  EXPECT_EQ(std::min_element(bias.begin(), bias.end()) - bias.begin(), E - 1);
}

TEST(ExpertBias, BadInputIsRejectedAndChangesNothing) {
  using S = MoeSpec<4, 2>;
  EXPECT_NE(moekit_test::expect_error([] { ExpertBias<S>{-0.5f}; }, Errc::kInvalidArgument)
                .find("gamma = -0.5 must be finite and non-negative"),
            std::string::npos);
  moekit_test::expect_error([] { ExpertBias<S>{kNaN}; }, Errc::kInvalidArgument);
  moekit_test::expect_error([] { ExpertBias<S>{kInf}; }, Errc::kInvalidArgument);
  EXPECT_NO_THROW(ExpertBias<S>{0.0f});

  ExpertBias<S> balance(0.1f);
  const std::vector<std::int32_t> good{0, 1, 2, 3}, bad{0, 1, 2, 4};
  balance.accumulate(MatrixView<const std::int32_t>(good.data(), 2, 2));
  const auto counts = balance.counts();
  const std::string msg = moekit_test::expect_error(
      [&] { balance.accumulate(MatrixView<const std::int32_t>(bad.data(), 2, 2)); },
      Errc::kOutOfRange);
  EXPECT_NE(msg.find("expert_ids(1, 1) = 4 is outside [0, 4)"), std::string::npos) << msg;
  moekit_test::expect_error(
      [&] { balance.accumulate(MatrixView<const std::int32_t>(good.data(), 1, 4)); },
      Errc::kShapeMismatch);
  RoutingStats<S> stats;
  stats.assigned = {1, 2, -3, 4};
  moekit_test::expect_error([&] { balance.accumulate(stats); }, Errc::kInvalidArgument);
  EXPECT_EQ(balance.counts(), counts);
  const std::vector<float> inf_bias{0.0f, kInf, 0.0f, 0.0f};
  moekit_test::expect_error([&] { balance.set_bias({inf_bias.data(), 4}); }, Errc::kNonFinite);
  for (float b : balance.bias()) EXPECT_EQ(b, 0.0f);
}

}  // namespace
