// Early exit (moekit/cpu/early_exit.hpp and the exit scores of
// moekit/core/classification.hpp) against a float64 reference written here:
// exit scores, whole multi-exit runs under each rule and their combination
// (results in original order, stable compaction of state and activations),
// tau = 1 and tau = 0, patience by hand, the non-finite rule, the weighted
// multi-exit loss with finite differences, and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "expect_error.hpp"
#include "moekit/core/classification.hpp"
#include "moekit/cpu/early_exit.hpp"
#include "routing_reference.hpp"
#include "strided_matrix.hpp"

namespace {

using moekit::Errc;
using moekit::ExitCriteria;
using moekit::index_t;
using moekit::MatrixView;
using moekit::to_size;
using moekit::VectorView;
using moekit::cpu::EarlyExit;
using moekit::cpu::ExitResults;
using moekit::cpu::ExitState;
using moekit_test::rel_error;
using moekit_test::StridedMatrix;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- float64 reference of the exit scores ------------------------------------------------

struct RefScores {
  int top1 = 0;
  double confidence = 0, margin = 0, entropy = 0;
};

RefScores ref_scores(const float* z, index_t n) {
  std::vector<double> p(static_cast<std::size_t>(n));
  double m = z[0];
  for (index_t i = 0; i < n; ++i) m = std::max(m, static_cast<double>(z[i]));
  double sum = 0;
  for (index_t i = 0; i < n; ++i) sum += p[static_cast<std::size_t>(i)] = std::exp(z[i] - m);
  RefScores r;
  std::vector<double> sorted;
  for (index_t i = 0; i < n; ++i) {
    const double v = p[static_cast<std::size_t>(i)] / sum;
    sorted.push_back(v);
    if (v > 0) r.entropy -= v * std::log(v);
    if (z[i] > z[r.top1]) r.top1 = static_cast<int>(i);
  }
  std::sort(sorted.rbegin(), sorted.rend());
  r.confidence = sorted[0];
  r.margin = sorted[0] - (n > 1 ? sorted[1] : 0.0);
  return r;
}

bool ref_passes(const ExitCriteria& c, const RefScores& s, int agree) {
  return s.confidence >= c.min_confidence || s.entropy <= c.max_entropy ||
         s.margin >= c.min_margin || (c.patience > 0 && agree >= c.patience);
}

TEST(ExitScores, MatchFloat64Reference) {
  std::mt19937 rng(1);
  for (index_t c : {1, 2, 7, 50, 1000}) {
    StridedMatrix z(20, c, 0);
    z.randomize(rng, 3.0f);
    for (index_t r = 0; r < z.rows; ++r) {
      const moekit::classify::ExitScores got = moekit::classify::exit_scores(z.cview().row(r), c);
      const RefScores ref = ref_scores(z.cview().row(r), c);
      EXPECT_EQ(got.top1, ref.top1);
      EXPECT_NEAR(got.confidence, ref.confidence, 1e-6);
      EXPECT_NEAR(got.margin, ref.margin, 1e-6);
      EXPECT_NEAR(got.entropy, ref.entropy, 1e-5 * (1.0 + ref.entropy));
    }
  }
}

TEST(ExitScores, TiesAndNonFiniteFollowTheRoutingRule) {
  namespace cl = moekit::classify;
  const float tie[] = {1.0f, 3.0f, 3.0f, 0.0f};
  cl::ExitScores s = cl::exit_scores(tie, 4);
  EXPECT_EQ(s.top1, 1);  // equal maxima: lower class
  EXPECT_EQ(s.margin, 0.0f);
  const float with_nan[] = {0.5f, kNaN, 2.0f};  // NaN counts as -inf
  s = cl::exit_scores(with_nan, 3);
  EXPECT_EQ(s.top1, 2);
  const float ref_row[] = {0.5f, -kInf, 2.0f};
  EXPECT_EQ(s.confidence, cl::exit_scores(ref_row, 3).confidence);
  const float all_nan[] = {kNaN, kNaN, kNaN, kNaN};  // uniform
  s = cl::exit_scores(all_nan, 4);
  EXPECT_EQ(s.top1, 0);
  EXPECT_EQ(s.confidence, 0.25f);
  EXPECT_EQ(s.margin, 0.0f);
  EXPECT_NEAR(s.entropy, std::log(4.0), 1e-6);
  const float infs[] = {kInf, 1.0f, kInf, kNaN};  // equal mass on the +inf entries
  s = cl::exit_scores(infs, 4);
  EXPECT_EQ(s.top1, 0);
  EXPECT_EQ(s.confidence, 0.5f);
  EXPECT_NEAR(s.entropy, std::log(2.0), 1e-6);
  const float one[] = {-3.0f};  // one class: certain
  s = cl::exit_scores(one, 1);
  EXPECT_EQ(s.confidence, 1.0f);
  EXPECT_EQ(s.margin, 1.0f);
  EXPECT_EQ(s.entropy, 0.0f);
}

// ---- whole runs against a reference simulation -------------------------------------------

// Caller memory for a batch of n samples.
struct ExitRun {
  index_t n;
  std::vector<index_t> original, kept;
  std::vector<std::int32_t> previous, agree, prediction, exit;
  std::vector<float> confidence;
  explicit ExitRun(index_t rows)
      : n(rows),
        original(static_cast<std::size_t>(rows), -5),
        kept(static_cast<std::size_t>(rows), -5),
        previous(static_cast<std::size_t>(rows), -5),
        agree(static_cast<std::size_t>(rows), -5),
        prediction(static_cast<std::size_t>(rows), -5),
        exit(static_cast<std::size_t>(rows), -5),
        confidence(static_cast<std::size_t>(rows), kNaN) {}
  ExitState state() { return {{original.data(), n}, {previous.data(), n}, {agree.data(), n}}; }
  ExitResults results() {
    return {{prediction.data(), n}, {confidence.data(), n}, {exit.data(), n}};
  }
  VectorView<index_t> kept_view() { return {kept.data(), n}; }
};

struct Outcome {
  std::vector<int> exit, prediction;
  std::vector<double> confidence;
};

// Reference: each sample walks the exits on its own.
Outcome ref_run(const ExitCriteria& c, const std::vector<StridedMatrix>& logits, index_t n) {
  const int k = static_cast<int>(logits.size());
  Outcome out;
  for (index_t s = 0; s < n; ++s) {
    int previous = -1, agree = 0;
    for (int i = 0; i < k; ++i) {
      const RefScores sc = ref_scores(logits[to_size(i)].cview().row(s), logits[to_size(i)].cols);
      agree = sc.top1 == previous ? agree + 1 : 0;
      previous = sc.top1;
      if (i == k - 1 || ref_passes(c, sc, agree)) {
        out.exit.push_back(i);
        out.prediction.push_back(sc.top1);
        out.confidence.push_back(sc.confidence);
        break;
      }
    }
  }
  return out;
}

// The library: live rows only, activations compacted between exits. Each
// "layer" is the identity; an activation row carries its sample index in
// column 0, and the exit classifier reads that sample's logits.
ExitRun lib_run(const ExitCriteria& c, const std::vector<StridedMatrix>& logits, index_t n,
                std::vector<index_t>* live_per_exit = nullptr) {
  const int k = static_cast<int>(logits.size());
  const index_t classes = logits[0].cols;
  const EarlyExit exits({.criteria = c, .num_exits = k});
  ExitRun run(n);
  StridedMatrix act(n, 3, 2);
  for (index_t s = 0; s < n; ++s) {
    act.at(s, 0) = static_cast<float>(s);
    act.at(s, 1) = static_cast<float>(-s);
    act.at(s, 2) = 0.5f;
  }
  index_t m = exits.begin(n, run.state(), run.results());
  for (int i = 0; i < k; ++i) {
    StridedMatrix z(m, classes, 1);
    for (index_t r = 0; r < m; ++r) {
      const index_t s = static_cast<index_t>(act.at(r, 0));
      EXPECT_EQ(s, run.original[static_cast<std::size_t>(r)]) << "exit " << i << " row " << r;
      EXPECT_EQ(act.at(r, 1), -static_cast<float>(s));
      for (index_t j = 0; j < classes; ++j) z.at(r, j) = logits[to_size(i)].at(s, j);
    }
    m = exits.step(i, z.cview(), run.state(), run.results(), run.kept_view());
    if (live_per_exit != nullptr) live_per_exit->push_back(m);
    const VectorView<const index_t> kept(run.kept.data(), m);
    for (index_t j = 1; j < m; ++j) EXPECT_LT(kept[j - 1], kept[j]);
    moekit::cpu::compact_rows(act.view().middle_rows(0, act.rows), kept);
    EXPECT_TRUE(act.padding_untouched());
  }
  EXPECT_EQ(m, 0);
  return run;
}

std::vector<StridedMatrix> random_exits(int k, index_t n, index_t classes, std::uint32_t seed,
                                        float scale) {
  std::mt19937 rng(seed);
  std::vector<StridedMatrix> out;
  for (int i = 0; i < k; ++i) {
    out.emplace_back(n, classes, 2);
    // Later exits sharper, as trained exits are.
    out.back().randomize(rng, scale * static_cast<float>(i + 1));
  }
  return out;
}

void expect_same(const ExitRun& run, const Outcome& ref) {
  for (index_t s = 0; s < run.n; ++s) {
    const std::size_t i = static_cast<std::size_t>(s);
    EXPECT_EQ(run.exit[i], ref.exit[i]) << "sample " << s;
    EXPECT_EQ(run.prediction[i], ref.prediction[i]) << "sample " << s;
    EXPECT_NEAR(run.confidence[i], ref.confidence[i], 1e-6) << "sample " << s;
  }
}

TEST(EarlyExit, EachRuleAndTheirCombinationMatchTheReference) {
  struct Case {
    const char* name;
    ExitCriteria criteria;
  };
  const std::vector<Case> cases = {
      {"confidence", {.min_confidence = 0.7f}},
      {"entropy", {.max_entropy = 0.9f}},
      {"margin", {.min_margin = 0.5f}},
      {"patience 2", {.patience = 2}},
      {"any of all",
       {.min_confidence = 0.9f, .max_entropy = 0.4f, .min_margin = 0.8f, .patience = 3}},
      {"none (all at the last exit)", {}},
  };
  std::uint32_t seed = 10;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const auto logits = random_exits(5, 200, 6, ++seed, 0.8f);
    std::vector<index_t> live;
    const ExitRun run = lib_run(c.criteria, logits, 200, &live);
    expect_same(run, ref_run(c.criteria, logits, 200));
    // Every rule exits some samples early and keeps some to the last exit;
    // with no rule, all leave at the last.
    const bool spread = live[3] < 200 && live[3] > 0;
    EXPECT_EQ(spread, std::string(c.name).rfind("none", 0) != 0)
        << "live after each exit: " << live[0] << " " << live[1] << " " << live[2] << " "
        << live[3];
  }
}

TEST(EarlyExit, TauOneExitsNobodyEarlyAndTauZeroEverybodyAtOnce) {
  const auto logits = random_exits(4, 64, 10, 20, 1.0f);  // no probability rounds to 1
  std::vector<index_t> live;
  ExitRun run = lib_run({.min_confidence = 1.0f}, logits, 64, &live);
  EXPECT_EQ(live, (std::vector<index_t>{64, 64, 64, 0}));
  for (int e : run.exit) EXPECT_EQ(e, 3);
  live.clear();
  run = lib_run({.min_confidence = 0.0f}, logits, 64, &live);
  EXPECT_EQ(live, (std::vector<index_t>{0, 0, 0, 0}));
  for (int e : run.exit) EXPECT_EQ(e, 0);
  // A probability of exactly 1 does pass tau = 1 (documented).
  std::vector<StridedMatrix> certain = random_exits(2, 3, 4, 21, 1.0f);
  certain[0].at(1, 2) = 200.0f;
  const ExitRun r = lib_run({.min_confidence = 1.0f}, certain, 3);
  EXPECT_EQ(r.exit, (std::vector<std::int32_t>{1, 0, 1}));
  EXPECT_EQ(r.prediction[1], 2);
}

TEST(EarlyExit, PatienceCountsAgreeingConsecutiveExits) {
  // Argmax per exit (columns) for 4 samples; patience 2 exits a sample whose
  // argmax agreed at 3 consecutive exits.
  const int argmax[4][6] = {
      {0, 0, 0, 1, 1, 1},  // agree 0,1,2        -> exits at 2
      {0, 1, 1, 1, 2, 2},  // agree 0,0,1,2      -> exits at 3
      {2, 0, 2, 0, 2, 0},  // never              -> last exit, 5
      {1, 1, 2, 2, 2, 0},  // agree 0,1,0,1,2    -> exits at 4
  };
  std::vector<StridedMatrix> logits;
  for (int i = 0; i < 6; ++i) {
    logits.emplace_back(4, 3, 1);
    for (index_t s = 0; s < 4; ++s) {
      for (index_t c = 0; c < 3; ++c) logits[to_size(i)].at(s, c) = c == argmax[s][i] ? 1.0f : 0.0f;
    }
  }
  const ExitRun run = lib_run({.patience = 2}, logits, 4);
  EXPECT_EQ(run.exit, (std::vector<std::int32_t>{2, 3, 5, 4}));
  EXPECT_EQ(run.prediction, (std::vector<std::int32_t>{0, 1, 0, 2}));
  expect_same(run, ref_run({.patience = 2}, logits, 4));
}

TEST(EarlyExit, NaNRowNeverExitsByProbability) {
  std::vector<StridedMatrix> logits = random_exits(3, 5, 4, 22, 1.0f);
  for (index_t c = 0; c < 4; ++c) logits[0].at(2, c) = kNaN;  // uniform under the rule
  logits[0].at(3, 1) = 100.0f;                                // certain
  const ExitRun run = lib_run({.min_confidence = 0.9f}, logits, 5);
  EXPECT_EQ(run.exit[3], 0);
  EXPECT_NE(run.exit[2], 0);
}

TEST(EarlyExit, ResultsOfLiveSamplesStayUntouchedUntilTheyExit) {
  const auto logits = random_exits(3, 50, 5, 23, 1.0f);
  const EarlyExit exits({.criteria = {.min_margin = 0.3f}, .num_exits = 3});
  ExitRun run(50);
  index_t m = exits.begin(50, run.state(), run.results());
  m = exits.step(0, logits[0].cview(), run.state(), run.results(), run.kept_view());
  ASSERT_GT(m, 0);
  ASSERT_LT(m, 50);
  for (index_t r = 0; r < m; ++r) {
    const std::size_t s = static_cast<std::size_t>(run.original[static_cast<std::size_t>(r)]);
    EXPECT_EQ(run.exit[s], -1);
    EXPECT_EQ(run.prediction[s], -5);  // never written while live
  }
}

// ---- compaction ------------------------------------------------------------------

TEST(Compaction, InPlaceAndGatherKeepOrderAndPadding) {
  StridedMatrix x(7, 3, 2);
  for (index_t r = 0; r < 7; ++r)
    for (index_t c = 0; c < 3; ++c) x.at(r, c) = static_cast<float>(10 * r + c);
  const std::vector<index_t> kept = {1, 2, 5, 6};
  StridedMatrix dst(4, 3, 1);
  dst.poison();
  moekit::cpu::gather_rows(x.cview(), VectorView<const index_t>(kept.data(), 4), dst.view());
  moekit::cpu::compact_rows(x.view(), VectorView<const index_t>(kept.data(), 4));
  for (index_t j = 0; j < 4; ++j) {
    for (index_t c = 0; c < 3; ++c) {
      EXPECT_EQ(x.at(j, c), static_cast<float>(10 * kept[static_cast<std::size_t>(j)] + c));
      EXPECT_EQ(dst.at(j, c), x.at(j, c));
    }
  }
  for (index_t c = 0; c < 3; ++c) EXPECT_EQ(x.at(6, c), static_cast<float>(60 + c));  // tail kept
  EXPECT_TRUE(x.padding_untouched());
  EXPECT_TRUE(dst.padding_untouched());
  std::vector<std::int32_t> labels = {7, 8, 9, 10, 11, 12, 13};
  moekit::cpu::compact_rows(VectorView<std::int32_t>(labels.data(), 7),
                            VectorView<const index_t>(kept.data(), 4));
  EXPECT_EQ(labels, (std::vector<std::int32_t>{8, 9, 12, 13, 11, 12, 13}));
}

// ---- multi-exit loss --------------------------------------------------------------

double ref_multi_exit(const std::vector<std::vector<double>>& z, const std::vector<std::int32_t>& y,
                      index_t n, index_t c, const std::vector<double>& w,
                      std::vector<double>* per_exit = nullptr) {
  double total = 0, wsum = 0;
  for (std::size_t i = 0; i < z.size(); ++i) {
    double sum = 0;
    for (index_t r = 0; r < n; ++r) {
      const double* row = &z[i][static_cast<std::size_t>(r * c)];
      double m = row[0];
      for (index_t k = 1; k < c; ++k) m = std::max(m, row[k]);
      double s = 0;
      for (index_t k = 0; k < c; ++k) s += std::exp(row[k] - m);
      sum += std::log(s) + m - row[y[static_cast<std::size_t>(r)]];
    }
    if (per_exit != nullptr) per_exit->push_back(sum / static_cast<double>(n));
    total += w[i] * sum / static_cast<double>(n);
    wsum += w[i];
  }
  return total / wsum;
}

TEST(MultiExitLoss, MatchesReferenceAndFiniteDifferences) {
  constexpr index_t n = 12, c = 5;
  const auto logits = random_exits(3, n, c, 30, 1.0f);
  std::mt19937 rng(31);
  std::vector<std::int32_t> y;
  for (index_t r = 0; r < n; ++r)
    y.push_back(std::uniform_int_distribution<std::int32_t>(0, 4)(rng));
  const std::vector<float> custom = {0.5f, 0.0f, 2.0f};
  for (bool default_weights : {true, false}) {
    SCOPED_TRACE(default_weights ? "w_i = i" : "custom weights");
    std::vector<StridedMatrix> grads(3, StridedMatrix(n, c, 1));
    for (auto& g : grads) g.poison();
    const std::vector<MatrixView<const float>> z = {logits[0].cview(), logits[1].cview(),
                                                    logits[2].cview()};
    const std::vector<MatrixView<float>> dz = {grads[0].view(), grads[1].view(), grads[2].view()};
    std::vector<double> per_exit(3, -1.0);
    const double got = moekit::cpu::multi_exit_loss(
        z, {y.data(), n},
        default_weights ? VectorView<const float>() : VectorView<const float>(custom.data(), 3), dz,
        {per_exit.data(), 3});
    const std::vector<double> w =
        default_weights ? std::vector<double>{1, 2, 3} : std::vector<double>{0.5, 0.0, 2.0};
    std::vector<std::vector<double>> zd = {logits[0].values(), logits[1].values(),
                                           logits[2].values()};
    std::vector<double> ref_per_exit;
    const double ref = ref_multi_exit(zd, y, n, c, w, &ref_per_exit);
    EXPECT_NEAR(got, ref, 1e-6 * ref);
    EXPECT_LT(rel_error(per_exit, ref_per_exit), 1e-6);
    for (std::size_t i = 0; i < 3; ++i) {
      std::vector<double> fd(zd[i].size());
      for (std::size_t j = 0; j < zd[i].size(); ++j) {
        const double keep = zd[i][j];
        zd[i][j] = keep + 1e-5;
        const double up = ref_multi_exit(zd, y, n, c, w);
        zd[i][j] = keep - 1e-5;
        const double down = ref_multi_exit(zd, y, n, c, w);
        zd[i][j] = keep;
        fd[j] = (up - down) / 2e-5;
      }
      if (w[i] == 0.0) {
        for (double v : grads[i].values()) EXPECT_EQ(v, 0.0);
      } else {
        EXPECT_LT(rel_error(grads[i].values(), fd), 1e-5) << "exit " << i;
      }
      EXPECT_TRUE(grads[i].padding_untouched());
    }
  }
}

TEST(MultiExitLoss, EmptyGradientViewSkipsThatExit) {
  const auto logits = random_exits(2, 4, 3, 32, 1.0f);
  const std::vector<std::int32_t> y = {0, 1, 2, 1};
  StridedMatrix g(4, 3, 0);
  g.fill(7.0f);
  const std::vector<MatrixView<const float>> z = {logits[0].cview(), logits[1].cview()};
  const std::vector<MatrixView<float>> dz = {MatrixView<float>(), g.view()};
  const double with = moekit::cpu::multi_exit_loss(z, {y.data(), 4}, {}, dz);
  const double without = moekit::cpu::multi_exit_loss(z, {y.data(), 4});
  EXPECT_EQ(with, without);
  EXPECT_FALSE(g.any_nan());
  EXPECT_NE(g.at(0, 0), 7.0f);
}

// ---- bad input -------------------------------------------------------------------

TEST(EarlyExitBadInput, ConfigurationIsRejectedNamingTheField) {
  struct Case {
    moekit::cpu::EarlyExitConfig config;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{.num_exits = 0}, "config.num_exits = 0 must be at least 1"},
      {{.criteria = {.min_confidence = 1.5f}, .num_exits = 2},
       "config.criteria.min_confidence = 1.5 must be in [0, 1] or +inf (off)"},
      {{.criteria = {.min_confidence = kNaN}, .num_exits = 2}, "min_confidence = nan"},
      {{.criteria = {.max_entropy = -0.5f}, .num_exits = 2}, "max_entropy = -0.5"},
      {{.criteria = {.max_entropy = kInf}, .num_exits = 2}, "max_entropy = inf"},
      {{.criteria = {.min_margin = -0.1f}, .num_exits = 2}, "min_margin = -0.1"},
      {{.criteria = {.patience = -1}, .num_exits = 2}, "patience = -1 must be >= 0"},
  };
  for (const Case& c : cases) {
    const std::string msg =
        moekit_test::expect_error([&] { EarlyExit{c.config}; }, Errc::kInvalidArgument);
    EXPECT_NE(msg.find(c.message), std::string::npos) << msg;
  }
}

TEST(EarlyExitBadInput, RejectedWithNamedValuesAndNothingWritten) {
  const auto logits = random_exits(1, 6, 4, 40, 1.0f);
  const EarlyExit exits({.criteria = {.min_confidence = 0.0f}, .num_exits = 3});
  ExitRun run(6);
  exits.begin(6, run.state(), run.results());
  run.kept.assign(6, 77);
  std::vector<index_t> swapped = run.original;
  std::swap(swapped[2], swapped[3]);
  std::vector<index_t> far = run.original;
  far[4] = 6;
  std::vector<std::int32_t> exited = run.exit;
  exited[5] = 1;  // sample 5 already left
  const std::vector<std::int32_t> y = {0, 1, 2, 3, 0, 4}, y_ok = {0, 1, 2, 3, 0, 1};
  StridedMatrix g(6, 4, 0);
  g.fill(3.0f);
  const std::vector<MatrixView<const float>> z1 = {logits[0].cview()};
  const std::vector<MatrixView<float>> g1 = {g.view()};
  const std::vector<float> zero_w = {0.0f}, neg_w = {-1.0f};
  const std::vector<index_t> bad_kept = {0, 3, 3};
  StridedMatrix act(6, 2, 1);
  act.fill(1.0f);
  const ExitRun before = run;
  const StridedMatrix act0 = act, g0 = g;
  struct Case {
    const char* what;
    Errc code;
    std::string message;
    std::function<void()> call;
  };
  const std::vector<Case> cases = {
      {"exit index", Errc::kOutOfRange, "exit = 3 is outside [0, 3)",
       [&] { exits.step(3, logits[0].cview(), run.state(), run.results(), run.kept_view()); }},
      {"original not increasing", Errc::kInvalidArgument,
       "state.original is not increasing: state.original[2] = 3, state.original[3] = 2",
       [&] {
         exits.step(0, logits[0].cview(),
                    {{swapped.data(), 6}, run.state().previous, run.state().agree}, run.results(),
                    run.kept_view());
       }},
      {"original out of range", Errc::kOutOfRange, "state.original[4] = 6 is outside [0, n = 6)",
       [&] {
         exits.step(0, logits[0].cview(),
                    {{far.data(), 6}, run.state().previous, run.state().agree}, run.results(),
                    run.kept_view());
       }},
      {"sample already exited", Errc::kInvalidArgument,
       "live row 5 is sample 5, which already exited at exit 1",
       [&] {
         exits.step(0, logits[0].cview(), run.state(),
                    {run.results().prediction, run.results().confidence, {exited.data(), 6}},
                    run.kept_view());
       }},
      {"kept short", Errc::kShapeMismatch, "kept has 5 entries, fewer than the 6 live rows",
       [&] {
         exits.step(0, logits[0].cview(), run.state(), run.results(), {run.kept.data(), 5});
       }},
      {"state short", Errc::kShapeMismatch, "fewer than the 6 rows",
       [&] {
         exits.step(0, logits[0].cview(),
                    {run.state().original, {run.previous.data(), 5}, run.state().agree},
                    run.results(), run.kept_view());
       }},
      {"results sizes", Errc::kShapeMismatch, "results.confidence has 5 elements, expected 6",
       [&] {
         exits.step(0, logits[0].cview(), run.state(),
                    {run.results().prediction, {run.confidence.data(), 5}, run.results().exit},
                    run.kept_view());
       }},
      {"no classes", Errc::kShapeMismatch, "logits is 6 x 0",
       [&] {
         exits.step(0, logits[0].cview().block(0, 0, 6, 0), run.state(), run.results(),
                    run.kept_view());
       }},
      {"compact: kept not increasing", Errc::kInvalidArgument,
       "kept is not increasing: kept[1] = 3, kept[2] = 3",
       [&] {
         moekit::cpu::compact_rows(act.view(), {bad_kept.data(), 3});
       }},
      {"compact: kept out of range", Errc::kOutOfRange, "kept[0] = 3 is outside [0, 2)",
       [&] {
         moekit::cpu::compact_rows(act.view().middle_rows(0, 2), {bad_kept.data() + 1, 1});
       }},
      {"gather: dst shape", Errc::kShapeMismatch, "dst is 6 x 2, expected 3 x 2",
       [&] {
         const std::vector<index_t> ok = {0, 2, 4};
         moekit::cpu::gather_rows(act0.cview(), {ok.data(), 3}, act.view());
       }},
      {"loss: label", Errc::kOutOfRange, "labels[5] = 4 is outside [0, C = 4)",
       [&] {
         moekit::cpu::multi_exit_loss(z1, {y.data(), 6}, {}, g1);
       }},
      {"loss: weights sum to 0", Errc::kInvalidArgument, "exit_weights sum to 0",
       [&] {
         moekit::cpu::multi_exit_loss(z1, {y_ok.data(), 6}, {zero_w.data(), 1}, g1);
       }},
      {"loss: negative weight", Errc::kInvalidArgument, "exit_weights[0] = -1",
       [&] {
         moekit::cpu::multi_exit_loss(z1, {y_ok.data(), 6}, {neg_w.data(), 1}, g1);
       }},
      {"loss: no exits", Errc::kInvalidArgument, "logits holds no exits",
       [&] {
         moekit::cpu::multi_exit_loss({}, {y_ok.data(), 6});
       }},
      {"loss: dlogits count", Errc::kShapeMismatch,
       "dlogits holds 2 views, expected one per exit: 1",
       [&] {
         const std::vector<MatrixView<float>> two = {g.view(), g.view()};
         moekit::cpu::multi_exit_loss(z1, {y_ok.data(), 6}, {}, two);
       }},
  };
  for (const Case& c : cases) {
    const std::string msg = moekit_test::expect_error(c.call, c.code);
    EXPECT_NE(msg.find(c.message), std::string::npos) << c.what << ": " << msg;
    EXPECT_EQ(run.original, before.original) << c.what;
    EXPECT_EQ(run.previous, before.previous) << c.what;
    EXPECT_EQ(run.agree, before.agree) << c.what;
    EXPECT_EQ(run.kept, before.kept) << c.what;
    EXPECT_EQ(run.exit, before.exit) << c.what;
    EXPECT_EQ(run.prediction, before.prediction) << c.what;
    EXPECT_TRUE(act.bits_equal(act0)) << c.what;
    EXPECT_TRUE(g.bits_equal(g0)) << c.what;
  }
}

}  // namespace
