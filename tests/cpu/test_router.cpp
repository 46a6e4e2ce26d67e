// The CPU router against the float64 reference (routing_reference.hpp): every
// gating rule, expert counts real models use, ties, non-finite logits,
// capacity, noise, statistics, backward and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "expect_error.hpp"
#include "moekit/cpu/router.hpp"
#include "router_fixture.hpp"
#include "routing_reference.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using moekit::DropPolicy;
using moekit::Errc;
using moekit::GatingConfig;
using moekit::GatingRule;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::NoiseKind;
using moekit::to_size;
using moekit::VectorView;
using moekit::cpu::Router;
using moekit::cpu::RouterConfig;
using moekit::cpu::RoutingStats;
using moekit_test::RoutingBuffers;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// Gating configurations every spec is checked with (groups where E allows).
template <int E, int K>
std::vector<GatingConfig> gating_grid() {
  std::vector<GatingConfig> grid;
  for (GatingRule rule :
       {GatingRule::kSoftmaxTopK, GatingRule::kTopKSoftmax, GatingRule::kSigmoid}) {
    for (bool renorm : {false, true}) {
      GatingConfig g;
      g.rule = rule;
      g.renormalize = renorm;
      g.scaling = renorm ? 2.5f : 1.0f;
      grid.push_back(g);
    }
  }
  if (E % 4 == 0 && E >= 8 && 2 * (E / 4) >= K) {
    GatingConfig g;  // DeepSeek-V3 style: sigmoid, 4 groups, keep 2, top-2 sum
    g.rule = GatingRule::kSigmoid;
    g.renormalize = true;
    g.num_groups = 4;
    g.groups_kept = 2;
    g.group_score_top = 2;
    grid.push_back(g);
    g.rule = GatingRule::kSoftmaxTopK;  // DeepSeek-V2 style: max per group
    g.group_score_top = 1;
    grid.push_back(g);
  }
  return grid;
}

// Compares one token's routing with the reference, tolerating only order
// differences between keys within `tie` of each other (float vs double).
// Returns false (and records nothing) for a token whose K-th and (K+1)-th
// reference keys are that close: its selection is legitimately ambiguous.
template <int K>
bool compare_token(const std::int32_t* ids, const float* weights, const moekit_test::RefRoute& ref,
                   double tie, std::vector<double>& out_w, std::vector<double>& ref_w) {
  std::map<int, double> ref_weight;
  for (int k = 0; k < K; ++k) ref_weight[ref.ids[to_size(k)]] = ref.weights[to_size(k)];
  std::set<int> seen;
  for (int k = 0; k < K; ++k) {
    EXPECT_TRUE(ids[k] >= 0 && ids[k] < static_cast<int>(ref.keys.size())) << ids[k];
    EXPECT_TRUE(seen.insert(ids[k]).second) << "duplicate id " << ids[k];
  }
  bool same_set = true;
  for (int k = 0; k < K; ++k) same_set &= ref_weight.count(ids[k]) == 1;
  if (!same_set) {
    // Only acceptable at a near-tie on the selection boundary.
    const double kth = ref.keys[to_size(ref.ids[K - 1])];
    for (int k = 0; k < K; ++k) {
      if (!ref_weight.count(ids[k])) {
        EXPECT_NEAR(ref.keys[to_size(ids[k])], kth, tie)
            << "selected an expert far below the K-th key";
      }
    }
    return false;
  }
  for (int k = 0; k < K; ++k) {
    if (k > 0) {
      EXPECT_GE(ref.keys[to_size(ids[k - 1])] + tie, ref.keys[to_size(ids[k])])
          << "ids out of key order";
    }
    out_w.push_back(weights[k]);
    ref_w.push_back(ref_weight[ids[k]]);
  }
  return true;
}

// ---- forward against the reference, over real models' expert counts ---------

template <class S>
class RouterForward : public ::testing::Test {};

using Specs =
    ::testing::Types<MoeSpec<1, 1>, MoeSpec<8, 2>, MoeSpec<16, 4>, MoeSpec<60, 4>, MoeSpec<64, 8>,
                     MoeSpec<128, 8>, MoeSpec<256, 8>, MoeSpec<384, 22>, MoeSpec<512, 22>>;
TYPED_TEST_SUITE(RouterForward, Specs);

TYPED_TEST(RouterForward, MatchesFloat64Reference) {
  using S = TypeParam;
  constexpr int E = S::num_experts, K = S::top_k;
  constexpr index_t T = 67, d = 24;
  std::mt19937 rng(1234 + E * 31 + K);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(T * d), w(E * d), gate_bias(E), sel_bias(E);
  for (float& v : x) v = normal(rng);
  for (float& v : w) v = 0.3f * normal(rng);
  for (float& v : gate_bias) v = 0.1f * normal(rng);
  for (float& v : sel_bias) v = 0.05f * normal(rng);

  // Reference logits in double.
  std::vector<double> ref_logits(T * E);
  for (index_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) {
      double acc = gate_bias[to_size(e)];
      for (index_t j = 0; j < d; ++j) acc += double(x[to_size(t * d + j)]) * w[to_size(e * d + j)];
      ref_logits[to_size(t * E + e)] = acc;
    }
  }

  int ambiguous = 0, compared = 0;
  for (const GatingConfig& gating : gating_grid<E, K>()) {
    for (bool with_bias : {false, true}) {
      RouterConfig config;
      config.gating = gating;
      const Router<S> router(config);
      RoutingBuffers<S> buf(T);
      RoutingStats<S> stats;
      const VectorView<const float> bias =
          with_bias ? VectorView<const float>(sel_bias.data(), E) : VectorView<const float>();
      std::vector<std::byte> ws(to_size(router.workspace_size(T, d)));
      router.forward({x.data(), T, d}, {w.data(), E, d}, {gate_bias.data(), E}, bias, buf.view(),
                     &stats, moekit::view_of(ws));

      EXPECT_LT(moekit_test::rel_error(to_double(buf.logits), ref_logits), 1e-5);
      std::vector<double> out_scores, ref_scores, out_w, ref_w;
      const std::vector<double> bias_d = to_double(sel_bias);
      for (index_t t = 0; t < T; ++t) {
        // The reference routes the library's float logits (the GEMM is
        // checked above), so selection is compared on identical inputs.
        const std::vector<double> xt(buf.logits.begin() + t * E, buf.logits.begin() + (t + 1) * E);
        const auto ref = moekit_test::ref_gate(xt, with_bias ? &bias_d : nullptr, gating, K);
        out_scores.insert(out_scores.end(), buf.scores.begin() + t * E,
                          buf.scores.begin() + (t + 1) * E);
        ref_scores.insert(ref_scores.end(), ref.scores.begin(), ref.scores.end());
        if (compare_token<K>(&buf.ids[to_size(t * K)], &buf.weights[to_size(t * K)], ref, 1e-5,
                             out_w, ref_w)) {
          ++compared;
        } else {
          ++ambiguous;
        }
      }
      EXPECT_LT(moekit_test::rel_error(out_scores, ref_scores), 1e-5);
      EXPECT_LT(moekit_test::rel_error(out_w, ref_w), 1e-5);
      EXPECT_EQ(stats.tokens, T);
      EXPECT_EQ(stats.dropped, 0);
      EXPECT_EQ(stats.non_finite_logits, 0);
      for (index_t i = 0; i < T * K; ++i) EXPECT_GE(buf.positions[to_size(i)], 0);
    }
  }
  EXPECT_LE(ambiguous, compared / 100) << "too many near-ties to call this a comparison";
}

// ---- ties, degenerate sizes ------------------------------------------------------

TEST(RouterTies, EqualScoresPickLowerIndexFirst) {
  using S = MoeSpec<8, 3>;
  for (GatingRule rule :
       {GatingRule::kSoftmaxTopK, GatingRule::kTopKSoftmax, GatingRule::kSigmoid}) {
    RouterConfig config;
    config.gating.rule = rule;
    const Router<S> router(config);
    RoutingBuffers<S> buf(2);
    // Token 0: all equal. Token 1: experts 6, 2, 5 tie for the top.
    const float rows[2][8] = {{0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f},
                              {0.0f, 0.0f, 2.0f, 0.0f, 1.0f, 2.0f, 2.0f, 1.0f}};
    std::copy(&rows[0][0], &rows[0][0] + 16, buf.logits.begin());
    router.route(buf.view(), {});
    EXPECT_EQ(buf.ids, (std::vector<std::int32_t>{0, 1, 2, 2, 5, 6})) << static_cast<int>(rule);
    EXPECT_EQ(buf.weights[0], buf.weights[1]);
    EXPECT_EQ(buf.weights[3], buf.weights[5]);
  }
}

TEST(RouterTies, GroupTiesPickLowerGroup) {
  using S = MoeSpec<8, 2>;
  RouterConfig config;
  config.gating.rule = GatingRule::kSigmoid;
  config.gating.num_groups = 4;
  config.gating.groups_kept = 1;
  config.gating.group_score_top = 2;
  const Router<S> router(config);
  RoutingBuffers<S> buf(1);
  // Groups {0,1} {2,3} {4,5} {6,7}: groups 1 and 3 tie with the best score.
  const std::vector<float> x{0.0f, 0.0f, 1.0f, 1.0f, 0.0f, 0.0f, 1.0f, 1.0f};
  std::copy(x.begin(), x.end(), buf.logits.begin());
  router.route(buf.view(), {});
  EXPECT_EQ(buf.ids, (std::vector<std::int32_t>{2, 3}));
}

TEST(RouterEdges, OneExpert) {
  using S = MoeSpec<1, 1>;
  RoutingBuffers<S> buf(5);
  for (int t = 0; t < 5; ++t) buf.logits[to_size(t)] = static_cast<float>(t) - 2.0f;
  RouterConfig config;
  Router<S>(config).route(buf.view(), {});
  for (int t = 0; t < 5; ++t) {
    EXPECT_EQ(buf.ids[to_size(t)], 0);
    EXPECT_EQ(buf.weights[to_size(t)], 1.0f);
    EXPECT_EQ(buf.positions[to_size(t)], t);
  }
  config.gating.rule = GatingRule::kSigmoid;  // weight = s unless renormalised
  Router<S>(config).route(buf.view(), {});
  EXPECT_FLOAT_EQ(buf.weights[4], 1.0f / (1.0f + std::exp(-2.0f)));
}

TEST(RouterEdges, KEqualsEUsesEveryExpertInKeyOrder) {
  using S = MoeSpec<6, 6>;
  RoutingBuffers<S> buf(1);
  const std::vector<float> x{0.1f, -1.0f, 3.0f, 0.2f, -0.5f, 2.0f};
  std::copy(x.begin(), x.end(), buf.logits.begin());
  Router<S>(RouterConfig{}).route(buf.view(), {});
  EXPECT_EQ(buf.ids, (std::vector<std::int32_t>{2, 5, 3, 0, 4, 1}));
  double sum = 0;
  for (float v : buf.weights) sum += v;
  EXPECT_NEAR(sum, 1.0, 1e-6);
}

TEST(RouterEdges, ZeroTokens) {
  using S = MoeSpec<8, 2>;
  const Router<S> router(RouterConfig{});
  RoutingBuffers<S> buf(0);
  RoutingStats<S> stats;
  stats.tokens = 99;
  std::vector<float> w(8 * 4, 1.0f);
  router.forward(MatrixView<const float>(nullptr, 0, 4), {w.data(), 8, 4}, {}, {}, buf.view(),
                 &stats);
  EXPECT_EQ(stats.tokens, 0);
  EXPECT_EQ(stats.dropped, 0);
  EXPECT_EQ(stats.max_load_ratio(), 0.0);
  std::vector<float> dlogits;
  router.backward_gate(buf.view(), MatrixView<const float>(nullptr, 0, 2),
                       MatrixView<float>(nullptr, 0, 8));
}

TEST(RouterEdges, AllTokensToOneExpert) {
  using S = MoeSpec<8, 2>;
  constexpr index_t T = 40;
  RoutingBuffers<S> buf(T);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (index_t t = 0; t < T; ++t) {
    for (int e = 0; e < 8; ++e)
      buf.logits[to_size(t * 8 + e)] = normal(rng) + (e == 3 ? 50.0f : 0.0f);
  }
  RoutingStats<S> stats;
  Router<S>(RouterConfig{}).route(buf.view(), {}, &stats);
  for (index_t t = 0; t < T; ++t) {
    EXPECT_EQ(buf.ids[to_size(t * 2)], 3);
    EXPECT_EQ(buf.positions[to_size(t * 2)], t);  // dropless: every token kept, in order
  }
  EXPECT_EQ(stats.assigned[3], T);
  EXPECT_EQ(stats.kept[3], T);
  EXPECT_DOUBLE_EQ(stats.max_load_ratio(), 4.0);  // T of a mean T * K / E = T / 4
  EXPECT_NEAR(stats.entropy(), 0.0, 1e-4);
}

// ---- non-finite logits ---------------------------------------------------------

TEST(RouterNonFinite, DocumentedRuleAndCount) {
  using S = MoeSpec<6, 3>;
  for (GatingRule rule :
       {GatingRule::kSoftmaxTopK, GatingRule::kTopKSoftmax, GatingRule::kSigmoid}) {
    RouterConfig config;
    config.gating.rule = rule;
    config.gating.renormalize = true;
    RoutingBuffers<S> buf(5);
    const std::vector<float> x{kNaN,  1.0f,  kNaN,  0.5f,  -kInf, 2.0f,   // NaN ranks last
                               1.0f,  kInf,  0.0f,  kInf,  kNaN,  -1.0f,  // two +inf share the mass
                               kNaN,  kNaN,  kNaN,  kNaN,  kNaN,  kNaN,   // nothing finite
                               -kInf, -kInf, -kInf, -kInf, -kInf, 0.0f,
                               -kInf, kInf,  kNaN,  3.0f,  -3.0f, 0.0f};
    std::copy(x.begin(), x.end(), buf.logits.begin());
    RoutingStats<S> stats;
    Router<S>(config).route(buf.view(), {}, &stats);
    EXPECT_EQ(stats.non_finite_logits, 3 + 3 + 6 + 5 + 3);
    for (int t = 0; t < 5; ++t) {
      std::set<int> ids(buf.ids.begin() + t * 3, buf.ids.begin() + t * 3 + 3);
      EXPECT_EQ(ids.size(), 3u) << "duplicate ids in token " << t;
      for (int id : ids) EXPECT_TRUE(id >= 0 && id < 6);
      for (int k = 0; k < 3; ++k) EXPECT_TRUE(std::isfinite(buf.weights[to_size(t * 3 + k)]));
      for (int e = 0; e < 6; ++e) EXPECT_TRUE(std::isfinite(buf.scores[to_size(t * 6 + e)]));
    }
    // Token 0: 5 then 1 then 3 (NaN and -inf last). Token 1: the two +inf first.
    EXPECT_EQ(std::vector<std::int32_t>(buf.ids.begin(), buf.ids.begin() + 3),
              (std::vector<std::int32_t>{5, 1, 3}));
    EXPECT_EQ(std::vector<std::int32_t>(buf.ids.begin() + 3, buf.ids.begin() + 5),
              (std::vector<std::int32_t>{1, 3}));
    // Token 2: all NaN -> treated as -inf everywhere -> experts 0, 1, 2.
    EXPECT_EQ(std::vector<std::int32_t>(buf.ids.begin() + 6, buf.ids.begin() + 9),
              (std::vector<std::int32_t>{0, 1, 2}));
    if (rule != GatingRule::kSigmoid) {
      EXPECT_FLOAT_EQ(buf.scores[6 + 1], 0.5f);   // the two +inf share the mass
      EXPECT_FLOAT_EQ(buf.scores[12], 1.0f / 6);  // nothing above -inf: uniform
      EXPECT_FLOAT_EQ(buf.scores[18 + 5], 1.0f);  // one finite entry
    }
  }
}

TEST(RouterNonFinite, ErrorPolicyRejectsBeforeWriting) {
  using S = MoeSpec<4, 2>;
  RouterConfig config;
  config.non_finite = moekit::NonFinitePolicy::kError;
  RoutingBuffers<S> buf(3);
  std::fill(buf.logits.begin(), buf.logits.end(), 0.25f);
  buf.logits[2 * 4 + 1] = kInf;
  try {
    Router<S>(config).route(buf.view(), {});
    FAIL() << "no error";
  } catch (const moekit::Error& e) {
    EXPECT_EQ(e.code(), Errc::kNonFinite);
    EXPECT_NE(std::string(e.what()).find("logits(2, 1) = inf"), std::string::npos) << e.what();
  }
  for (std::int32_t id : buf.ids) EXPECT_EQ(id, moekit_test::kPoisonId);
  for (float w : buf.weights) EXPECT_TRUE(std::isnan(w));
}

// ---- capacity ------------------------------------------------------------------

// T tokens whose top choice is expert 0 (and second choice spread), with
// first-slot weights that rise with the token index.
template <class S>
void skewed_logits(RoutingBuffers<S>& buf) {
  constexpr int E = S::num_experts;
  for (index_t t = 0; t < buf.tokens; ++t) {
    for (int e = 0; e < E; ++e) buf.logits[to_size(t * E + e)] = 0.0f;
    buf.logits[to_size(t * E + 0)] = 2.0f + 0.01f * static_cast<float>(t);
    buf.logits[to_size(t * E + 1 + t % (E - 1))] = 1.0f;
  }
}

TEST(RouterCapacity, PositionPolicyKeepsEarliestTokens) {
  using S = MoeSpec<4, 2>;
  constexpr index_t T = 20;
  RouterConfig config;
  config.capacity.factor = 1.0f;  // C = ceil(20 * 2 / 4) = 10
  const Router<S> router(config);
  EXPECT_EQ(router.capacity(T), 10);
  RoutingBuffers<S> buf(T);
  skewed_logits(buf);
  RoutingStats<S> stats;
  router.route(buf.view(), {}, &stats);
  for (index_t t = 0; t < T; ++t) {
    EXPECT_EQ(buf.ids[to_size(t * 2)], 0);
    if (t < 10) {
      EXPECT_EQ(buf.positions[to_size(t * 2)], t);
      EXPECT_GT(buf.weights[to_size(t * 2)], 0.0f);
    } else {
      EXPECT_EQ(buf.positions[to_size(t * 2)], -1);
      EXPECT_EQ(buf.weights[to_size(t * 2)], 0.0f);
    }
    EXPECT_GE(buf.positions[to_size(t * 2 + 1)], 0);  // second choices spread over 3 experts
  }
  EXPECT_EQ(stats.dropped, 10);
  EXPECT_EQ(stats.assigned[0], 20);
  EXPECT_EQ(stats.kept[0], 10);
}

TEST(RouterCapacity, ProbsPolicyKeepsHighestWeights) {
  using S = MoeSpec<4, 2>;
  constexpr index_t T = 20;
  RouterConfig config;
  config.capacity.factor = 1.0f;
  config.capacity.policy = DropPolicy::kProbs;
  RoutingBuffers<S> buf(T);
  skewed_logits(buf);
  RoutingStats<S> stats;
  const Router<S> router(config);
  // kProbs sorts slots in caller workspace (T x K ints), never allocates.
  std::vector<std::byte> workspace(to_size(router.workspace_size(T, 0)));
  ASSERT_EQ(workspace.size(), T * 2 * sizeof(std::int32_t));
  EXPECT_THROW(router.route(buf.view(), {}, &stats), moekit::Error);
  router.route(buf.view(), {}, &stats, {workspace.data(), static_cast<index_t>(workspace.size())});
  // Expert 0's weight rises with t: the last 10 tokens are kept, and their
  // positions count in token order.
  for (index_t t = 0; t < T; ++t) {
    if (t < 10) {
      EXPECT_EQ(buf.positions[to_size(t * 2)], -1) << t;
      EXPECT_EQ(buf.weights[to_size(t * 2)], 0.0f);
    } else {
      EXPECT_EQ(buf.positions[to_size(t * 2)], t - 10) << t;
    }
  }
  EXPECT_EQ(stats.dropped, 10);
}

TEST(RouterCapacity, ProbsPolicyTiesDropLaterTokens) {
  using S = MoeSpec<2, 1>;
  RouterConfig config;
  config.capacity.factor = 0.5f;  // C = ceil(0.5 * 6 * 1 / 2) = 2
  config.capacity.policy = DropPolicy::kProbs;
  RoutingBuffers<S> buf(6);
  for (int t = 0; t < 6; ++t) {
    buf.logits[to_size(t * 2)] = 1.0f;  // identical tokens
    buf.logits[to_size(t * 2 + 1)] = 0.0f;
  }
  const Router<S> router(config);
  std::vector<std::byte> workspace(to_size(router.workspace_size(6, 0)));
  router.route(buf.view(), {}, nullptr, {workspace.data(), static_cast<index_t>(workspace.size())});
  EXPECT_EQ(buf.positions, (std::vector<std::int32_t>{0, 1, -1, -1, -1, -1}));
}

TEST(RouterCapacity, CapacityFormula) {
  EXPECT_EQ(moekit::expert_capacity(2048, 8, 2, 1.25f), 640);  // ceil(1.25 * 512)
  EXPECT_EQ(moekit::expert_capacity(10, 3, 1, 1.0f), 4);       // ceil(10 / 3)
  EXPECT_EQ(moekit::expert_capacity(10, 2, 2, 4.0f), 10);      // never above T
  EXPECT_EQ(moekit::expert_capacity(10, 8, 2, 0.0f), 10);      // dropless
  // In double, as Python computes it: 1.2 is not widened from 1.2f.
  EXPECT_EQ(moekit::expert_capacity(10, 8, 4, 1.2), 6);
  EXPECT_EQ(moekit::expert_capacity(0, 8, 2, 1.0f), 0);
}

// ---- noise ---------------------------------------------------------------------

TEST(RouterNoise, GaussianIsReproducibleAndHasTheRequestedSpread) {
  using S = MoeSpec<16, 2>;
  constexpr index_t T = 512, d = 8;
  std::vector<float> x(T * d, 0.0f), w(16 * d, 0.0f);  // clean logits are all zero
  RouterConfig config;
  config.noise = {NoiseKind::kGaussian, 0.5f, 42};
  RoutingBuffers<S> a(T), b(T), c(T);
  const auto forward = [&](RoutingBuffers<S>& out) {
    const Router<S> r(config);
    std::vector<std::byte> ws(to_size(r.workspace_size(T, d)));
    r.forward({x.data(), T, d}, {w.data(), 16, d}, {}, {}, out.view(), nullptr,
              moekit::view_of(ws));
  };
  forward(a);
  forward(b);
  config.noise.seed = 43;
  forward(c);
  EXPECT_EQ(a.logits, b.logits);
  EXPECT_NE(a.logits, c.logits);
  double sum = 0, sq = 0;
  for (float v : a.logits) {
    sum += v;
    sq += double(v) * v;
  }
  const double n = static_cast<double>(a.logits.size());
  EXPECT_NEAR(sum / n, 0.0, 0.02);
  EXPECT_NEAR(std::sqrt(sq / n - (sum / n) * (sum / n)), 0.5, 0.02);
}

TEST(RouterNoise, JitterScalesInputs) {
  using S = MoeSpec<4, 1>;
  constexpr index_t T = 64, d = 16;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> x(T * d), w(4 * d);
  for (float& v : x) v = normal(rng);
  for (float& v : w) v = normal(rng);
  RouterConfig config;
  config.noise = {NoiseKind::kJitter, 0.1f, 9};
  const Router<S> router(config);
  std::vector<std::byte> workspace(to_size(router.workspace_size(T, d)));
  ASSERT_EQ(workspace.size(), static_cast<std::size_t>(T * d) * sizeof(float));
  RoutingBuffers<S> buf(T);
  router.forward({x.data(), T, d}, {w.data(), 4, d}, {}, {}, buf.view(), nullptr,
                 {workspace.data(), static_cast<index_t>(workspace.size())});
  std::vector<double> ref(T * 4), out(buf.logits.begin(), buf.logits.end());
  double max_factor_dev = 0;
  for (index_t t = 0; t < T; ++t) {
    for (int e = 0; e < 4; ++e) {
      double acc = 0;
      for (index_t j = 0; j < d; ++j) {
        const double u = moekit::random_uniform(9, static_cast<std::uint64_t>(t * d + j));
        const double factor = 0.9 + 0.2 * u;
        max_factor_dev = std::max(max_factor_dev, std::abs(factor - 1.0));
        acc += x[to_size(t * d + j)] * factor * w[to_size(e * d + j)];
      }
      ref[to_size(t * 4 + e)] = acc;
    }
  }
  EXPECT_LT(moekit_test::rel_error(out, ref), 1e-5);
  EXPECT_LE(max_factor_dev, 0.1);
  EXPECT_GT(max_factor_dev, 0.09);  // the draws really span the range
  // Jitter without the workspace it needs is refused.
  EXPECT_THROW(router.forward({x.data(), T, d}, {w.data(), 4, d}, {}, {}, buf.view()),
               moekit::Error);
}

// ---- statistics ----------------------------------------------------------------

TEST(RouterStats, MeanDistributionEntropyUtilization) {
  using S = MoeSpec<4, 1>;
  RoutingBuffers<S> buf(4);
  std::fill(buf.logits.begin(), buf.logits.end(), 0.0f);  // uniform p
  for (int t = 0; t < 4; ++t) buf.logits[to_size(t * 4 + t)] = 0.0f;
  RoutingStats<S> stats;
  Router<S>(RouterConfig{}).route(buf.view(), {}, &stats);
  EXPECT_NEAR(stats.entropy(), std::log(4.0), 1e-6);
  for (double q : stats.mean_distribution) EXPECT_DOUBLE_EQ(q, 0.25);
  EXPECT_EQ(stats.assigned[0], 4);  // ties -> expert 0 every time
  EXPECT_DOUBLE_EQ(stats.utilization(), 0.25);

  RouterConfig sigmoid;
  sigmoid.gating.rule = GatingRule::kSigmoid;  // q = s / sum(s)
  buf.logits = {0, 0, 0, 0, 10, -10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  Router<S>(sigmoid).route(buf.view(), {}, &stats);
  double total = 0;
  for (double q : stats.mean_distribution) total += q;
  EXPECT_NEAR(total, 1.0, 1e-6);
}

// ---- backward ------------------------------------------------------------------

// L = sum_tk dw[t][k] * w[t][k](x) through the reference; central differences.
std::vector<double> fd_gate_gradient(const std::vector<float>& logits, int E, int K,
                                     const GatingConfig& gating, const std::vector<double>* bias,
                                     const std::vector<std::int32_t>& ids,
                                     const std::vector<std::int32_t>& positions,
                                     const std::vector<float>& dweights) {
  const index_t T = static_cast<index_t>(logits.size()) / E;
  std::vector<double> grad(logits.size());
  const double h = 1e-6;
  for (index_t t = 0; t < T; ++t) {
    const std::vector<double> x(logits.begin() + t * E, logits.begin() + (t + 1) * E);
    auto loss = [&](const std::vector<double>& xt) {
      const auto r = moekit_test::ref_gate(xt, bias, gating, K);
      double l = 0;
      for (int k = 0; k < K; ++k) {
        EXPECT_EQ(r.ids[to_size(k)], ids[to_size(t * K + k)])
            << "selection flipped under the FD step";
        if (positions[to_size(t * K + k)] >= 0)
          l += dweights[to_size(t * K + k)] * r.weights[to_size(k)];
      }
      return l;
    };
    for (int e = 0; e < E; ++e) {
      std::vector<double> up = x, down = x;
      up[to_size(e)] += h;
      down[to_size(e)] -= h;
      grad[to_size(t * E + e)] = (loss(up) - loss(down)) / (2 * h);
    }
  }
  return grad;
}

template <class S>
class RouterBackward : public ::testing::Test {};
using BackwardSpecs =
    ::testing::Types<MoeSpec<1, 1>, MoeSpec<8, 2>, MoeSpec<16, 4>, MoeSpec<60, 6>>;
TYPED_TEST_SUITE(RouterBackward, BackwardSpecs);

TYPED_TEST(RouterBackward, GateGradientMatchesFiniteDifferences) {
  using S = TypeParam;
  constexpr int E = S::num_experts, K = S::top_k;
  constexpr index_t T = 24;
  std::mt19937 rng(99 + E);
  std::normal_distribution<float> normal;
  std::vector<float> sel_bias(E);
  for (float& v : sel_bias) v = 0.05f * normal(rng);
  const std::vector<double> bias_d = to_double(sel_bias);
  for (const GatingConfig& gating : gating_grid<E, K>()) {
    for (float factor : {0.0f, 0.75f}) {  // dropless, and with drops
      for (bool with_bias : {false, true}) {
        RouterConfig config;
        config.gating = gating;
        config.capacity.factor = factor;
        const Router<S> router(config);
        RoutingBuffers<S> buf(T);
        buf.logits = moekit_test::separated_logits(rng, T, E, 0.2f);
        const VectorView<const float> bias =
            with_bias ? VectorView<const float>(sel_bias.data(), E) : VectorView<const float>();
        router.route(buf.view(), bias);
        std::vector<float> dweights(T * K), dlogits(T * E, moekit_test::kPoison);
        for (float& v : dweights) v = normal(rng);
        router.backward_gate(buf.view(), {dweights.data(), T, K}, {dlogits.data(), T, E});
        const auto fd = fd_gate_gradient(buf.logits, E, K, gating, with_bias ? &bias_d : nullptr,
                                         buf.ids, buf.positions, dweights);
        EXPECT_LT(moekit_test::rel_error(to_double(dlogits), fd), 1e-4)
            << "rule " << static_cast<int>(gating.rule) << " renorm " << gating.renormalize
            << " groups " << gating.num_groups << " factor " << factor << " bias " << with_bias;
      }
    }
  }
}

// dx, dw_gate and dbias against float64 sums, with E = 8 (the row kernels)
// and E = 16 (the GEMM engine); accumulate adds; an empty view is left alone.
template <int E>
void check_linear_layer_gradients() {
  using S = MoeSpec<E, 2>;
  constexpr index_t T = 133, d = 37;  // three token blocks, a column tail
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> x(T * d), w(E * d), g(T * E);
  for (float& v : x) v = normal(rng);
  for (float& v : w) v = normal(rng);
  for (float& v : g) v = normal(rng);
  std::vector<double> ref_dx(T * d, 0), ref_dw(E * d, 0), ref_db(E, 0);
  for (index_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) {
      ref_db[to_size(e)] += g[to_size(t * E + e)];
      for (index_t j = 0; j < d; ++j) {
        ref_dx[to_size(t * d + j)] += double(g[to_size(t * E + e)]) * w[to_size(e * d + j)];
        ref_dw[to_size(e * d + j)] += double(g[to_size(t * E + e)]) * x[to_size(t * d + j)];
      }
    }
  }
  const Router<S> router(RouterConfig{});
  std::vector<std::byte> ws(to_size(router.workspace_size(T, d)));
  std::vector<float> dx(T * d, 1.0f), dw(E * d, 1.0f), db(E, 1.0f);
  moekit::cpu::RouterGrads grads{{dx.data(), T, d}, {dw.data(), E, d}, {db.data(), E}, false};
  router.backward_logits({x.data(), T, d}, {w.data(), E, d}, {g.data(), T, E}, grads,
                         moekit::view_of(ws));
  EXPECT_LT(moekit_test::rel_error(to_double(dx), ref_dx), 1e-5) << "E = " << E;
  EXPECT_LT(moekit_test::rel_error(to_double(dw), ref_dw), 1e-5) << "E = " << E;
  EXPECT_LT(moekit_test::rel_error(to_double(db), ref_db), 1e-5) << "E = " << E;

  grads.accumulate = true;
  grads.dw_gate = {};
  const std::vector<float> dw_before = dw;
  router.backward_logits({x.data(), T, d}, {w.data(), E, d}, {g.data(), T, E}, grads,
                         moekit::view_of(ws));
  for (double& v : ref_dx) v *= 2;
  for (double& v : ref_db) v *= 2;
  EXPECT_LT(moekit_test::rel_error(to_double(dx), ref_dx), 1e-5) << "E = " << E;
  EXPECT_LT(moekit_test::rel_error(to_double(db), ref_db), 1e-5) << "E = " << E;
  EXPECT_EQ(dw, dw_before);

  // dw_gate over the batch split in two at a block boundary, the second part
  // accumulating onto the first (an expert-parallel group's ranks): the same bits.
  std::vector<float> whole(E * d), split(E * d);
  router.backward_logits({x.data(), T, d}, {w.data(), E, d}, {g.data(), T, E},
                         {{}, {whole.data(), E, d}, {}, false}, moekit::view_of(ws));
  for (const auto& [t0, t1] : {std::pair{index_t{0}, index_t{64}}, std::pair{index_t{64}, T}}) {
    router.backward_logits({x.data() + t0 * d, t1 - t0, d}, {w.data(), E, d},
                           {g.data() + t0 * E, t1 - t0, E}, {{}, {split.data(), E, d}, {}, t0 > 0},
                           moekit::view_of(ws), t0);
  }
  EXPECT_EQ(whole, split) << "E = " << E;
}

TEST(RouterBackwardLogits, GradientsOfTheLinearLayer) {
  check_linear_layer_gradients<8>();
  check_linear_layer_gradients<16>();
}

// Whole router, x -> logits -> weights, with jitter: central differences on x.
TEST(RouterBackwardLogits, EndToEndWithJitterMatchesFiniteDifferences) {
  using S = MoeSpec<8, 2>;
  constexpr index_t T = 6, d = 5;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  std::vector<float> x(T * d), w(8 * d), dweights(T * 2);
  for (float& v : x) v = normal(rng);
  for (float& v : w) v = normal(rng);
  for (float& v : dweights) v = normal(rng);
  RouterConfig config;
  config.gating.renormalize = true;
  config.noise = {NoiseKind::kJitter, 0.2f, 77};
  const Router<S> router(config);
  std::vector<std::byte> workspace(to_size(router.workspace_size(T, d)));
  RoutingBuffers<S> buf(T);
  router.forward({x.data(), T, d}, {w.data(), 8, d}, {}, {}, buf.view(), nullptr,
                 {workspace.data(), static_cast<index_t>(workspace.size())});
  std::vector<float> dlogits(T * 8), dx(T * d), dw(8 * d);
  router.backward_gate(buf.view(), {dweights.data(), T, 2}, {dlogits.data(), T, 8});
  router.backward_logits({x.data(), T, d}, {w.data(), 8, d}, {dlogits.data(), T, 8},
                         {{dx.data(), T, d}, {dw.data(), 8, d}, {}, false},
                         {workspace.data(), static_cast<index_t>(workspace.size())});

  // Reference loss in double: the same jitter factors, then the reference gate.
  auto loss = [&](const std::vector<double>& xs, const std::vector<double>& ws) {
    double l = 0;
    for (index_t t = 0; t < T; ++t) {
      std::vector<double> logits(8, 0.0);
      for (int e = 0; e < 8; ++e) {
        for (index_t j = 0; j < d; ++j) {
          const double u = moekit::random_uniform(77, static_cast<std::uint64_t>(t * d + j));
          logits[to_size(e)] += xs[to_size(t * d + j)] * (0.8 + 0.4 * u) * ws[to_size(e * d + j)];
        }
      }
      const auto r = moekit_test::ref_gate(logits, nullptr, config.gating, 2);
      for (int k = 0; k < 2; ++k) l += dweights[to_size(t * 2 + k)] * r.weights[to_size(k)];
    }
    return l;
  };
  const std::vector<double> xd = to_double(x), wd = to_double(w);
  auto fd = [&](std::vector<double> v, bool is_x) {
    std::vector<double> grad(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) {
      const double keep = v[i];
      v[i] = keep + 1e-6;
      const double up = is_x ? loss(v, wd) : loss(xd, v);
      v[i] = keep - 1e-6;
      const double down = is_x ? loss(v, wd) : loss(xd, v);
      v[i] = keep;
      grad[i] = (up - down) / 2e-6;
    }
    return grad;
  };
  EXPECT_LT(moekit_test::rel_error(to_double(dx), fd(xd, true)), 1e-4);
  EXPECT_LT(moekit_test::rel_error(to_double(dw), fd(wd, false)), 1e-4);
}

// ---- determinism ---------------------------------------------------------------

TEST(RouterDeterminism, RerunsAndThreadCountsAreBitIdentical) {
  using S = MoeSpec<64, 8>;
  constexpr index_t T = 700, d = 32;
  std::mt19937 rng(21);
  std::normal_distribution<float> normal;
  std::vector<float> x(T * d), w(64 * d);
  for (float& v : x) v = normal(rng);
  for (float& v : w) v = normal(rng);
  RouterConfig config;
  config.gating.renormalize = true;
  config.capacity.factor = 1.0f;
  const Router<S> router(config);
  auto run = [&](int threads) {
#if defined(_OPENMP)
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    RoutingBuffers<S> buf(T);
    RoutingStats<S> stats;
    std::vector<std::byte> ws(to_size(router.workspace_size(T, d)));  // slots for `threads`
    router.forward({x.data(), T, d}, {w.data(), 64, d}, {}, {}, buf.view(), &stats,
                   moekit::view_of(ws));
    return std::make_pair(buf, stats.mean_distribution);
  };
#if defined(_OPENMP)
  const int default_threads = omp_get_max_threads();
#endif
  const auto a = run(2), b = run(2), c = run(1);
#if defined(_OPENMP)
  omp_set_num_threads(default_threads);  // the tests that follow use the default
#endif
  EXPECT_EQ(a.first.weights, b.first.weights);
  EXPECT_EQ(a.first.ids, b.first.ids);
  EXPECT_EQ(a.first.positions, b.first.positions);
  EXPECT_EQ(a.second, b.second);
  EXPECT_EQ(a.first.ids, c.first.ids);
  EXPECT_EQ(a.first.scores, c.first.scores);
  EXPECT_EQ(a.second, c.second);
}

// ---- review regressions ----------------------------------------------------------

// Group sums add probabilities: with kSoftmaxTopK they must not add logits.
TEST(RouterGroups, SoftmaxGroupsScoreProbabilities) {
  using S = MoeSpec<4, 2>;
  RouterConfig config;
  config.gating.num_groups = 2;
  config.gating.groups_kept = 1;
  config.gating.group_score_top = 2;
  RoutingBuffers<S> buf(1);
  buf.logits = {10.0f, -10.0f, 1.0f, 1.0f};  // group 0: p ~ {1, 2e-9}; group 1: 2 x 1.2e-4
  Router<S>(config).route(buf.view(), {});
  EXPECT_EQ(buf.ids, (std::vector<std::int32_t>{0, 1}));
}

// Where the non-finite rule makes the weights constant, the gradient is 0.
TEST(RouterNonFinite, ConstantRuleRowsHaveZeroGradient) {
  using S = MoeSpec<4, 1>;
  for (GatingRule rule : {GatingRule::kSoftmaxTopK, GatingRule::kTopKSoftmax}) {
    RouterConfig config;
    config.gating.rule = rule;
    const Router<S> router(config);
    RoutingBuffers<S> buf(2);
    buf.logits = {kInf, kInf, 0.0f, 0.0f, kNaN, kNaN, kNaN, kNaN};
    router.route(buf.view(), {});
    std::vector<float> dweights{1.0f, 1.0f}, dlogits(8, 5.0f);
    router.backward_gate(buf.view(), {dweights.data(), 2, 1}, {dlogits.data(), 2, 4});
    for (float v : dlogits) EXPECT_EQ(v, 0.0f) << static_cast<int>(rule);
  }
}

TEST(RouterBadInput, RepeatedSavedIdsAreRejected) {
  using S = MoeSpec<8, 2>;
  const Router<S> router(RouterConfig{});
  RoutingBuffers<S> buf(2);
  std::fill(buf.logits.begin(), buf.logits.end(), 0.0f);
  router.route(buf.view(), {});
  buf.ids[3] = buf.ids[2];
  std::vector<float> dweights(4, 1.0f), dlogits(16, 7.0f);
  moekit_test::expect_error(
      [&] {
        router.backward_gate(buf.view(), {dweights.data(), 2, 2}, {dlogits.data(), 2, 8});
      },
      Errc::kInvalidArgument);
  for (float v : dlogits) EXPECT_EQ(v, 7.0f);
}

TEST(RouterBadInput, EnumsOutsideTheirValuesAreRejected) {
  using S = MoeSpec<8, 2>;
  RouterConfig c;
  c.gating.rule = static_cast<GatingRule>(7);
  moekit_test::expect_error([&] { Router<S> r(c); }, Errc::kInvalidArgument);
  c = RouterConfig{};
  c.capacity.policy = static_cast<DropPolicy>(9);
  moekit_test::expect_error([&] { Router<S> r(c); }, Errc::kInvalidArgument);
  c = RouterConfig{};
  c.noise.kind = static_cast<NoiseKind>(5);
  moekit_test::expect_error([&] { Router<S> r(c); }, Errc::kInvalidArgument);
}

// Eigen's GEMM blocks by thread count: across thread counts the logits may
// differ in the last bits, never by more than float rounding.
TEST(RouterDeterminism, ThreadCountsAgreeWithinRounding) {
  using S = MoeSpec<64, 8>;
  constexpr index_t T = 512, d = 1024;
  std::mt19937 rng(8);
  std::normal_distribution<float> normal;
  std::vector<float> x(T * d), w(64 * d);
  for (float& v : x) v = normal(rng);
  for (float& v : w) v = 0.03f * normal(rng);
  const Router<S> router(RouterConfig{});
  auto logits_with = [&](int threads) {
#if defined(_OPENMP)
    omp_set_num_threads(threads);
    Eigen::setNbThreads(threads);
#else
    (void)threads;
#endif
    RoutingBuffers<S> buf(T);
    std::vector<std::byte> ws(to_size(router.workspace_size(T, d)));
    router.forward({x.data(), T, d}, {w.data(), 64, d}, {}, {}, buf.view(), nullptr,
                   moekit::view_of(ws));
    return to_double(buf.logits);
  };
#if defined(_OPENMP)
  const int default_threads = omp_get_max_threads();
#endif
  const auto one = logits_with(1), two = logits_with(2);
#if defined(_OPENMP)
  omp_set_num_threads(default_threads);
  Eigen::setNbThreads(default_threads);
#endif
  EXPECT_LT(moekit_test::rel_error(two, one), 1e-6);
}

// ---- bad input -----------------------------------------------------------------

TEST(RouterBadInput, ConfigIsValidatedWithNamedFields) {
  using S = MoeSpec<8, 4>;
  RouterConfig c;
  c.gating.num_groups = 3;
  EXPECT_NE(moekit_test::expect_error([&] { Router<S> r(c); }, Errc::kInvalidArgument)
                .find("gating.num_groups = 3 must divide the expert count E = 8"),
            std::string::npos);
  c.gating.num_groups = 4;  // groups of 2
  c.gating.groups_kept = 1;
  EXPECT_NE(moekit_test::expect_error([&] { Router<S> r(c); }, Errc::kInvalidArgument)
                .find("fewer than K = 4"),
            std::string::npos);
  c.gating.groups_kept = 2;
  c.gating.group_score_top = 3;
  moekit_test::expect_error([&] { Router<S> r(c); }, Errc::kInvalidArgument);
  c = RouterConfig{};
  c.gating.scaling = 0.0f;
  moekit_test::expect_error([&] { Router<S> r(c); }, Errc::kInvalidArgument);
  c = RouterConfig{};
  // The noise check is moekit::check_noise, shared with the GPU layer.
  c.noise = {NoiseKind::kJitter, 1.0f, 0};
  EXPECT_NE(moekit_test::expect_error([&] { Router<S> r(c); }, Errc::kInvalidArgument)
                .find("noise.amount = 1 must be below 1 for jitter"),
            std::string::npos);
  c.noise = {NoiseKind::kGaussian, -1.0f, 0};
  EXPECT_NE(moekit_test::expect_error([&] { Router<S> r(c); }, Errc::kInvalidArgument)
                .find("noise.amount = -1 must be finite and non-negative"),
            std::string::npos);
  c.noise = {NoiseKind::kGaussian, std::numeric_limits<float>::infinity(), 0};
  moekit_test::expect_error([&] { Router<S> r(c); }, Errc::kInvalidArgument);
  c.noise = {NoiseKind::kJitter, 0.999f, 0};
  EXPECT_NO_THROW(Router<S>{c});
}

TEST(RouterBadInput, ShapesNullsAndIdsAreRejectedWithoutWriting) {
  using S = MoeSpec<8, 2>;
  constexpr index_t T = 4, d = 6;
  const Router<S> router(RouterConfig{});
  std::vector<float> x(T * d, 1.0f), w(8 * d, 1.0f), bias(8, 0.0f);
  RoutingBuffers<S> buf(T);
  auto untouched = [&] {
    for (float v : buf.logits) EXPECT_TRUE(std::isnan(v));
    for (std::int32_t id : buf.ids) EXPECT_EQ(id, moekit_test::kPoisonId);
  };
  // w_gate with the wrong width.
  std::string msg = moekit_test::expect_error(
      [&] {
        router.forward({x.data(), T, d}, {w.data(), 8, d - 1}, {}, {}, buf.view());
      },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("w_gate is 8 x 5, expected 8 x 6"), std::string::npos) << msg;
  untouched();
  // x null.
  moekit_test::expect_error(
      [&] {
        router.forward({nullptr, T, d}, {w.data(), 8, d}, {}, {}, buf.view());
      },
      Errc::kNullPointer);
  untouched();
  // Outputs of the wrong height.
  RoutingBuffers<S> short_buf(T - 1);
  moekit_test::expect_error(
      [&] {
        router.forward({x.data(), T, d}, {w.data(), 8, d}, {}, {}, short_buf.view());
      },
      Errc::kShapeMismatch);
  // A non-finite selection bias.
  bias[3] = kNaN;
  moekit_test::expect_error(
      [&] {
        router.forward({x.data(), T, d}, {w.data(), 8, d}, {}, {bias.data(), 8}, buf.view());
      },
      Errc::kNonFinite);
  untouched();
  // Backward with a corrupted saved id.
  router.forward({x.data(), T, d}, {w.data(), 8, d}, {}, {}, buf.view());
  buf.ids[5] = 8;
  std::vector<float> dweights(T * 2, 1.0f), dlogits(T * 8, 7.0f);
  msg = moekit_test::expect_error(
      [&] {
        router.backward_gate(buf.view(), {dweights.data(), T, 2}, {dlogits.data(), T, 8});
      },
      Errc::kOutOfRange);
  EXPECT_NE(msg.find("routing.expert_ids(2, 1) = 8 is outside [0, 8)"), std::string::npos) << msg;
  for (float v : dlogits) EXPECT_EQ(v, 7.0f);
}

// ---- capacity for an external router's ids and weights ----------------------

// apply_capacity on the ids and weights of a dropless routing gives what a
// router with capacity writes itself, for both drop policies and every rule.
TEST(RouterApplyCapacity, MatchesTheRoutersOwnCapacity) {
  using S = MoeSpec<8, 2>;
  constexpr index_t T = 37;
  std::mt19937 rng(21);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (const GatingConfig& gating : gating_grid<8, 2>()) {
    for (DropPolicy policy : {DropPolicy::kPosition, DropPolicy::kProbs}) {
      RoutingBuffers<S> free_buf(T), capped_buf(T);
      for (std::size_t i = 0; i < free_buf.logits.size(); ++i) {
        free_buf.logits[i] = normal(rng) + 0.3f * static_cast<float>(i % 8);  // skewed: drops
      }
      capped_buf.logits = free_buf.logits;
      RouterConfig config;
      config.gating = gating;
      const Router<S> dropless(config);
      config.capacity = {0.75f, policy};
      const Router<S> capped(config);
      std::vector<std::byte> ws(to_size(capped.workspace_size(T, 0)));
      const VectorView<std::byte> workspace(ws.data(), static_cast<index_t>(ws.size()));
      dropless.route(free_buf.view(), {});
      RoutingStats<S> stats;
      capped.route(capped_buf.view(), {}, &stats, workspace);
      ASSERT_GT(stats.dropped, 0);

      std::vector<float> weights = free_buf.weights;  // the external router's weights
      std::vector<std::int32_t> positions(T * 2, moekit_test::kPoisonId);
      const index_t dropped = capped.apply_capacity(
          {free_buf.ids.data(), T, 2}, {weights.data(), T, 2}, {positions.data(), T, 2}, workspace);
      EXPECT_EQ(dropped, stats.dropped);
      EXPECT_EQ(free_buf.ids, capped_buf.ids);
      EXPECT_EQ(positions, capped_buf.positions);
      for (std::size_t i = 0; i < weights.size(); ++i) {
        EXPECT_EQ(weights[i], capped_buf.weights[i]) << i;  // the same bits
      }
    }
  }
}

TEST(RouterApplyCapacity, DroplessNumbersEverySlotAndRejectsBadIds) {
  using S = MoeSpec<4, 2>;
  const Router<S> router(RouterConfig{});
  std::vector<std::int32_t> ids = {0, 1, 1, 0, 3, 0};
  std::vector<float> weights = {0.5f, 0.5f, 0.25f, 0.75f, 1.0f, 2.0f};
  std::vector<std::int32_t> positions(6, moekit_test::kPoisonId);
  EXPECT_EQ(
      router.apply_capacity({ids.data(), 3, 2}, {weights.data(), 3, 2}, {positions.data(), 3, 2}),
      0);
  EXPECT_EQ(positions, (std::vector<std::int32_t>{0, 0, 1, 1, 0, 2}));
  EXPECT_EQ(weights[5], 2.0f);
  ids[3] = 1;  // token 1 repeats expert 1
  std::string msg = moekit_test::expect_error(
      [&] {
        router.apply_capacity({ids.data(), 3, 2}, {weights.data(), 3, 2}, {positions.data(), 3, 2});
      },
      Errc::kInvalidArgument);
  EXPECT_EQ(msg.rfind("moekit::cpu::Router::apply_capacity: expert_ids row 1 repeats expert 1", 0),
            0u)
      << msg;
  ids[3] = 4;
  msg = moekit_test::expect_error(
      [&] {
        router.apply_capacity({ids.data(), 3, 2}, {weights.data(), 3, 2}, {positions.data(), 3, 2});
      },
      Errc::kOutOfRange);
  EXPECT_NE(msg.find("expert_ids(1, 1) = 4 is outside [0, 4)"), std::string::npos) << msg;
}

// ---- what selection ranked ---------------------------------------------------

// explain_selection against float64: the keys are score + bias, each group
// scores the sum of its top keys, the best groups are kept, and the router's
// ids are the K best keys among the kept groups.
TEST(RouterExplainSelection, KeysGroupScoresAndKeptGroups) {
  using S = MoeSpec<16, 3>;
  constexpr index_t T = 29;
  GatingConfig gating;  // DeepSeek-V3 style
  gating.rule = GatingRule::kSigmoid;
  gating.renormalize = true;
  gating.num_groups = 4;
  gating.groups_kept = 2;
  gating.group_score_top = 2;
  RouterConfig config;
  config.gating = gating;
  const Router<S> router(config);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  RoutingBuffers<S> buf(T);
  for (float& v : buf.logits) v = normal(rng);
  std::vector<float> bias(16);
  for (float& b : bias) b = 0.3f * normal(rng);
  const VectorView<const float> bias_view(bias.data(), 16);
  router.route(buf.view(), bias_view);
  for (index_t t = 0; t < T; ++t) {
    const auto trace = router.explain_selection(buf.view(), bias_view, t);
    std::vector<double> key(16);
    for (int e = 0; e < 16; ++e) {
      key[to_size(e)] =
          1.0 / (1.0 + std::exp(-static_cast<double>(buf.logits[to_size(t * 16 + e)]))) +
          bias[to_size(e)];
      EXPECT_NEAR(trace.keys[to_size(e)], key[to_size(e)], 1e-6) << t << " " << e;
    }
    ASSERT_EQ(trace.num_groups, 4);
    ASSERT_EQ(trace.num_kept, 2);
    std::vector<std::pair<double, int>> groups;
    for (int g = 0; g < 4; ++g) {
      std::vector<double> k(key.begin() + 4 * g, key.begin() + 4 * g + 4);
      std::sort(k.rbegin(), k.rend());
      EXPECT_NEAR(trace.group_scores[to_size(g)], k[0] + k[1], 1e-5) << t << " " << g;
      groups.push_back({-(k[0] + k[1]), g});
    }
    std::sort(groups.begin(), groups.end());
    if (std::abs(groups[1].first - groups[2].first) < 1e-5) continue;  // ambiguous in float
    const std::set<int> kept = {trace.kept_groups[0], trace.kept_groups[1]};
    EXPECT_EQ(kept, (std::set<int>{groups[0].second, groups[1].second})) << t;
    EXPECT_GE(trace.group_scores[to_size(trace.kept_groups[0])],
              trace.group_scores[to_size(trace.kept_groups[1])]);
    for (int k = 0; k < 3; ++k) {
      EXPECT_EQ(kept.count(buf.ids[to_size(t * 3 + k)] / 4), 1u) << "id outside the kept groups";
    }
  }
  // Without groups there is nothing to report but the keys.
  const Router<S> plain(RouterConfig{});
  RoutingBuffers<S> buf2(T);
  buf2.logits = buf.logits;
  plain.route(buf2.view(), {});
  const auto trace = plain.explain_selection(buf2.view(), {}, 0);
  EXPECT_EQ(trace.num_groups, 0);
  EXPECT_EQ(trace.num_kept, 0);
  EXPECT_EQ(trace.keys[3], buf2.logits[3]);  // kSoftmaxTopK without a bias ranks the logits
  const std::string msg = moekit_test::expect_error(
      [&] { static_cast<void>(plain.explain_selection(buf2.view(), {}, T)); }, Errc::kOutOfRange);
  EXPECT_EQ(msg.rfind("moekit::cpu::Router::explain_selection: t = 29 is outside [0, 29)", 0), 0u)
      << msg;
}

// Errors name the function the user called, not the shared checker.
TEST(RouterErrors, NameThePublicFunction) {
  using S = MoeSpec<8, 2>;
  RouterConfig config;
  config.capacity = {1.0f, DropPolicy::kProbs};  // needs a workspace
  const Router<S> router(config);
  RoutingBuffers<S> buf(4);
  for (float& v : buf.logits) v = 0.5f;
  std::string msg =
      moekit_test::expect_error([&] { router.route(buf.view(), {}); }, Errc::kShapeMismatch);
  EXPECT_EQ(msg.rfind("moekit::cpu::Router::route: workspace", 0), 0u) << msg;
  std::vector<float> x(4 * 3), w(8 * 2);
  msg = moekit_test::expect_error(
      [&] {
        router.forward({x.data(), 4, 3}, {w.data(), 8, 2}, {}, {}, buf.view());
      },
      Errc::kShapeMismatch);
  EXPECT_EQ(msg.rfind("moekit::cpu::Router::forward: w_gate is 8 x 2, expected 8 x 3", 0), 0u)
      << msg;
  config.gating.num_groups = 3;  // does not divide E
  msg = moekit_test::expect_error([&] { const Router<S> bad(config); }, Errc::kInvalidArgument);
  EXPECT_EQ(msg.rfind("moekit::cpu::Router::Router: ", 0), 0u) << msg;
}

}  // namespace
