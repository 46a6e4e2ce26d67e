#pragma once
// Straightforward float64 reference for routing (docs/math.md#routing), written
// independently of moekit/core/routing.hpp: sorting instead of insertion,
// doubles throughout. Tests compare the library against it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "moekit/core/routing.hpp"
#include "test_support.hpp"

namespace moekit_test {

using moekit::GatingConfig;
using moekit::GatingRule;
using moekit::to_size;

inline constexpr double kInf = std::numeric_limits<double>::infinity();

struct RefRoute {
  std::vector<int> ids;         // K, by key descending, ties -> lower index
  std::vector<double> weights;  // K
  std::vector<double> scores;   // E
  std::vector<double> keys;     // E
};

inline double clean(double v) { return std::isnan(v) ? -kInf : v; }

inline std::vector<double> ref_softmax(const std::vector<double>& x) {
  const int n = static_cast<int>(x.size());
  std::vector<double> p(to_size(n), 0.0);
  double m = -kInf;
  for (double v : x) m = std::max(m, clean(v));
  if (m == kInf) {
    const double count = static_cast<double>(std::count(x.begin(), x.end(), kInf));
    for (int i = 0; i < n; ++i) p[to_size(i)] = x[to_size(i)] == kInf ? 1.0 / count : 0.0;
  } else if (m == -kInf) {
    std::fill(p.begin(), p.end(), 1.0 / n);
  } else {
    double z = 0;
    for (int i = 0; i < n; ++i) z += p[to_size(i)] = std::exp(clean(x[to_size(i)]) - m);
    for (double& v : p) v /= z;
  }
  return p;
}

// Indices of `values` restricted to `candidates`, ordered by value desc, index asc.
inline std::vector<int> ordered(const std::vector<double>& values, std::vector<int> candidates) {
  std::sort(candidates.begin(), candidates.end(), [&](int a, int b) {
    return values[to_size(a)] != values[to_size(b)] ? values[to_size(a)] > values[to_size(b)]
                                                    : a < b;
  });
  return candidates;
}

inline RefRoute ref_gate(const std::vector<double>& x, const std::vector<double>* bias,
                         const GatingConfig& cfg, int K) {
  const int E = static_cast<int>(x.size());
  RefRoute r;
  if (cfg.rule == GatingRule::kSigmoid) {
    for (double v : x) r.scores.push_back(1.0 / (1.0 + std::exp(-clean(v))));
  } else {
    r.scores = ref_softmax(x);
  }
  for (int e = 0; e < E; ++e) {
    // p's order is x's order, but group sums must add p, not x.
    const bool logit_key =
        cfg.rule == GatingRule::kTopKSoftmax ||
        (cfg.rule == GatingRule::kSoftmaxTopK && bias == nullptr && cfg.num_groups <= 1);
    const double base = logit_key ? clean(x[to_size(e)]) : r.scores[to_size(e)];
    r.keys.push_back(clean(base + (bias ? (*bias)[to_size(e)] : 0.0)));
  }
  std::vector<int> candidates(to_size(E));
  std::iota(candidates.begin(), candidates.end(), 0);
  if (cfg.num_groups > 1) {
    const int size = E / cfg.num_groups;
    std::vector<double> group_score(to_size(cfg.num_groups));
    for (int g = 0; g < cfg.num_groups; ++g) {
      std::vector<int> members(to_size(size));
      std::iota(members.begin(), members.end(), g * size);
      const std::vector<int> best = ordered(r.keys, members);
      double s = 0;
      for (int j = 0; j < cfg.group_score_top; ++j) s += r.keys[to_size(best[to_size(j)])];
      group_score[to_size(g)] = std::isnan(s) ? kInf : s;
    }
    std::vector<int> groups(to_size(cfg.num_groups));
    std::iota(groups.begin(), groups.end(), 0);
    groups = ordered(group_score, groups);
    candidates.clear();
    for (int i = 0; i < cfg.groups_kept; ++i) {
      for (int j = 0; j < size; ++j) candidates.push_back(groups[to_size(i)] * size + j);
    }
  }
  const std::vector<int> best = ordered(r.keys, candidates);
  r.ids.assign(best.begin(), best.begin() + K);
  if (cfg.rule == GatingRule::kTopKSoftmax) {
    std::vector<double> selected;
    for (int id : r.ids) selected.push_back(x[to_size(id)]);
    r.weights = ref_softmax(selected);
  } else {
    double sum = 0;
    for (int id : r.ids) {
      r.weights.push_back(r.scores[to_size(id)]);
      sum += r.scores[to_size(id)];
    }
    if (cfg.renormalize) {
      for (double& w : r.weights) w = sum > 0 ? w / sum : 0.0;
    }
  }
  for (double& w : r.weights) w *= cfg.scaling;
  return r;
}

// Logits with no two values closer than ~`spacing`: a shuffled ladder plus
// jitter, so float and double agree on the order.
inline std::vector<float> separated_logits(std::mt19937& rng, std::int64_t tokens, int experts,
                                           float spacing) {
  std::vector<float> x(static_cast<std::size_t>(tokens) * to_size(experts));
  std::vector<int> perm(to_size(experts));
  std::iota(perm.begin(), perm.end(), 0);
  std::uniform_real_distribution<float> jitter(0.0f, 0.3f);
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int e = 0; e < experts; ++e) {
      x[to_size(t * experts + e)] = spacing * (static_cast<float>(perm[to_size(e)]) -
                                               static_cast<float>(experts) / 2.0f + jitter(rng));
    }
  }
  return x;
}

}  // namespace moekit_test
