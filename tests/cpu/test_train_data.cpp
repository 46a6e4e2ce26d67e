// Training data (moekit/train/data.hpp): the synthetic multi-task benchmark
// (determinism, tasks shared by configs with more tasks, labels, class balance,
// learnable structure), the stateless BatchSampler and gather, split / subset /
// append, and CSV files (exact round trips, headers, comments, CRLF, and every
// malformed file with its line and column).
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "expect_error.hpp"
#include "moekit/train/data.hpp"
#include "test_support.hpp"

namespace {

namespace fs = std::filesystem;
namespace train = moekit::train;
using moekit::Errc;
using moekit::index_t;
using moekit::MatrixView;
using moekit::to_size;
using moekit::VectorView;
using moekit_test::expect_error;
using train::Dataset;

bool same_bits(const Dataset& a, const Dataset& b) {
  return a.features == b.features && a.tasks == b.tasks && a.labels == b.labels &&
         moekit_test::same_bits(a.x, b.x);
}

// The defaults' benchmark, built once (its constructor fits the task rules).
const train::SyntheticTasks& bench() {
  static const train::SyntheticTasks tasks(train::SyntheticTasksConfig{.seed = 11});
  return tasks;
}

// ---- SyntheticTasks ----------------------------------------------------------------------------

TEST(SyntheticTasks, SameSeedsGiveBitIdenticalData) {
  const train::SyntheticTasks again(train::SyntheticTasksConfig{.seed = 11});
  EXPECT_TRUE(same_bits(bench().sample(500, 3), again.sample(500, 3)));
  EXPECT_TRUE(same_bits(bench().sample_task(200, 2, 3), again.sample_task(200, 2, 3)));
  std::vector<float> z1, z2;
  (void)bench().sample(50, 3, &z1);
  (void)again.sample(50, 3, &z2);
  EXPECT_EQ(z1, z2);
}

TEST(SyntheticTasks, DifferentSeedsGiveDifferentData) {
  const Dataset a = bench().sample(500, 3);
  const Dataset b = bench().sample(500, 4);
  EXPECT_NE(a.x, b.x);
  EXPECT_NE(a.labels, b.labels);
  // Another config seed: other mixing and other rules for the same sample seed.
  const train::SyntheticTasks other(train::SyntheticTasksConfig{.seed = 12});
  const Dataset c = other.sample(500, 3);
  EXPECT_NE(a.x, c.x);
  EXPECT_NE(a.labels, c.labels);
  EXPECT_NE(bench().rule(0).weights[0], other.rule(0).weights[0]);
  // sample_task of two tasks draws different rows.
  EXPECT_NE(bench().sample_task(100, 0, 3).x, bench().sample_task(100, 1, 3).x);
}

TEST(SyntheticTasks, MoreTasksShareTheFirstTasksExactly) {
  const train::SyntheticTasks three(train::SyntheticTasksConfig{.classes = {4, 6, 3}, .seed = 5});
  const train::SyntheticTasks four(train::SyntheticTasksConfig{.classes = {4, 6, 3, 8}, .seed = 5});
  for (int t = 0; t < 3; ++t) {
    const train::SyntheticTaskRule &a = three.rule(t), &b = four.rule(t);
    EXPECT_EQ(a.classes, b.classes);
    EXPECT_EQ(a.regime_factor, b.regime_factor);
    for (int rho = 0; rho < 2; ++rho) {
      EXPECT_EQ(a.factors[to_size(rho)], b.factors[to_size(rho)]);
      EXPECT_EQ(a.weights[to_size(rho)], b.weights[to_size(rho)]);
      EXPECT_EQ(a.bias[to_size(rho)], b.bias[to_size(rho)]);
    }
    EXPECT_TRUE(same_bits(three.sample_task(300, t, 9), four.sample_task(300, t, 9))) << t;
  }
  // sample(): rows are the same but for the round-robin task; where the task
  // agrees (i mod 12 < 3) so does the label.
  std::vector<float> z3, z4;
  const Dataset a = three.sample(600, 9, &z3), b = four.sample(600, 9, &z4);
  EXPECT_EQ(a.x, b.x);
  EXPECT_EQ(z3, z4);
  int agree = 0;
  for (std::size_t i = 0; i < 600; ++i) {
    EXPECT_EQ(a.tasks[i], static_cast<int>(i % 3));
    EXPECT_EQ(b.tasks[i], static_cast<int>(i % 4));
    if (a.tasks[i] == b.tasks[i]) {
      EXPECT_EQ(a.labels[i], b.labels[i]) << i;
      ++agree;
    }
  }
  EXPECT_EQ(agree, 150);
}

TEST(SyntheticTasks, LabelsInRangeEveryTaskPresentClassesBalanced) {
  const train::SyntheticTasks tasks(
      train::SyntheticTasksConfig{.classes = {2, 10, 5, 3}, .label_noise = 0.1f, .seed = 3});
  const Dataset d = tasks.sample(8000, 1);
  train::check_dataset(d, "d");
  EXPECT_EQ(d.features, 32);
  ASSERT_EQ(d.size(), 8000);
  EXPECT_EQ(d.num_tasks(), 4);
  EXPECT_EQ(d.task_counts(), (std::vector<index_t>{2000, 2000, 2000, 2000}));
  for (index_t i = 0; i < d.size(); ++i) {
    ASSERT_GE(d.labels[to_size(i)], 0);
    ASSERT_LT(d.labels[to_size(i)], tasks.num_classes(d.tasks[to_size(i)]));
  }
  for (int t = 0; t < 4; ++t) {
    const std::vector<index_t> counts = d.class_counts(t);
    const index_t c = tasks.num_classes(t);
    ASSERT_EQ(static_cast<index_t>(counts.size()), c) << "task " << t;
    const double uniform = 2000.0 / static_cast<double>(c);
    for (index_t y = 0; y < c; ++y) {
      // A third of uniform is the requirement; the bias fit gives ~0.85-1.15.
      EXPECT_GT(static_cast<double>(counts[to_size(y)]), uniform / 3)
          << "task " << t << " class " << y;
      EXPECT_GT(static_cast<double>(counts[to_size(y)]), 0.7 * uniform)
          << "task " << t << " class " << y;
      EXPECT_LT(static_cast<double>(counts[to_size(y)]), 1.3 * uniform)
          << "task " << t << " class " << y;
    }
  }
  // sample_task: only that task.
  const Dataset one = tasks.sample_task(100, 2, 1);
  EXPECT_EQ(one.task_counts(), (std::vector<index_t>{0, 0, 100}));
}

TEST(SyntheticTasks, LabelsFollowTheRuleUpToLabelNoise) {
  std::vector<float> z;
  const train::SyntheticTasks clean(
      train::SyntheticTasksConfig{.input_noise = 0.0f, .label_noise = 0.0f, .seed = 11});
  const Dataset d = clean.sample(400, 2, &z);
  const auto L = static_cast<std::size_t>(clean.latent());
  std::vector<float> x(to_size(clean.features()));
  for (std::size_t i = 0; i < 400; ++i) {
    const std::span<const float> zi(z.data() + i * L, L);
    ASSERT_EQ(d.labels[i], clean.clean_label(d.tasks[i], zi)) << i;
    // Without input noise x is exactly the mixing of z.
    clean.mix(zi, x);
    ASSERT_TRUE(
        std::equal(x.begin(), x.end(), d.x.begin() + static_cast<std::ptrdiff_t>(i * x.size())));
    // The rule reads z[S_rho] only: the regime factor decides rho.
    const train::SyntheticTaskRule& r = clean.rule(d.tasks[i]);
    EXPECT_EQ(clean.regime(d.tasks[i], zi), zi[to_size(r.regime_factor)] > 0 ? 1 : 0);
  }
  // Same rows with label noise 0.3: about 1 - 0.3 (1 - 1/C) keep the rule's label.
  const train::SyntheticTasks noisy(train::SyntheticTasksConfig{
      .classes = {4, 4, 4, 4}, .input_noise = 0.0f, .label_noise = 0.3f, .seed = 11});
  const Dataset n = noisy.sample(4000, 2, &z);
  int kept = 0;
  for (std::size_t i = 0; i < 4000; ++i)
    kept +=
        n.labels[i] == noisy.clean_label(n.tasks[i], std::span<const float>(z.data() + i * L, L));
  EXPECT_NEAR(kept / 4000.0, 1.0 - 0.3 * 0.75, 0.03);
}

TEST(SyntheticTasks, RulesAreWellFormedAndShareFactors) {
  const train::SyntheticTasks& b = bench();
  std::set<int> used;
  for (int t = 0; t < b.num_tasks(); ++t) {
    const train::SyntheticTaskRule& r = b.rule(t);
    for (int rho = 0; rho < 2; ++rho) {
      const std::vector<int>& s = r.factors[to_size(rho)];
      ASSERT_EQ(s.size(), 3u);
      EXPECT_EQ(std::set<int>(s.begin(), s.end()).size(), 3u);
      for (const int k : s) {
        EXPECT_NE(k, r.regime_factor);
        EXPECT_TRUE(k >= 0 && k < 8);
        used.insert(k);
        used.insert(r.regime_factor);
      }
      for (index_t c = 0; c < r.classes; ++c) {
        double n2 = 0;
        for (std::size_t j = 0; j < 3; ++j)
          n2 += std::pow(r.weights[to_size(rho)][to_size(c) * 3 + j], 2);
        EXPECT_NEAR(n2, 1.0, 1e-5);
      }
    }
  }
  // 4 tasks x 2 rules x 3 factors out of 8 latents: every two tasks share
  // decision factors (with this seed), and every latent is used.
  EXPECT_EQ(used.size(), 8u);
  for (int t = 0; t < b.num_tasks(); ++t) {
    for (int u = t + 1; u < b.num_tasks(); ++u) {
      int shared = 0;
      for (const auto& st : b.rule(t).factors)
        for (const auto& su : b.rule(u).factors)
          for (const int k : st) shared += static_cast<int>(std::count(su.begin(), su.end(), k));
      EXPECT_GT(shared, 0) << "tasks " << t << " and " << u;
    }
  }
}

// A 5-nearest-neighbour classifier on x, trained on 1500 rows of task 2 (3
// classes), beats chance by far, and knowing the regime is worth something:
// within a regime the labels are a linear-argmax rule, across regimes not.
TEST(SyntheticTasks, StructureIsLearnable) {
  const train::SyntheticTasks& b = bench();
  const Dataset tr = b.sample_task(1500, 2, 1), te = b.sample_task(300, 2, 2);
  const auto f = to_size(tr.features);
  int correct = 0;
  std::vector<std::pair<float, int>> dist(to_size(tr.size()));
  for (std::size_t i = 0; i < to_size(te.size()); ++i) {
    for (std::size_t j = 0; j < to_size(tr.size()); ++j) {
      float d2 = 0;
      for (std::size_t k = 0; k < f; ++k) d2 += std::pow(te.x[i * f + k] - tr.x[j * f + k], 2.0f);
      dist[j] = {d2, tr.labels[j]};
    }
    std::partial_sort(dist.begin(), dist.begin() + 5, dist.end());
    int votes[3] = {0, 0, 0};
    for (std::size_t k = 0; k < 5; ++k) ++votes[dist[k].second];
    const int pred = static_cast<int>(std::max_element(votes, votes + 3) - votes);
    correct += pred == te.labels[i];
  }
  EXPECT_GT(correct / 300.0, 0.6) << correct;  // chance 1/3
}

TEST(SyntheticTasks, RejectsBadConfigurations) {
  using Config = train::SyntheticTasksConfig;
  const auto bad = [](Config c, const char* needle) {
    const std::string msg =
        expect_error([&] { train::SyntheticTasks t(c); }, Errc::kInvalidArgument);
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  };
  bad(Config{.features = 0}, "config.features = 0");
  bad(Config{.latent = 1}, "config.latent = 1");
  bad(Config{.classes = {}}, "config.classes is empty");
  bad(Config{.classes = {4, 1}}, "config.classes[1] = 1");
  bad(Config{.rule_factors = 8}, "config.rule_factors = 8");
  bad(Config{.rule_factors = 0}, "config.rule_factors = 0");
  bad(Config{.mixing_gain = 0.0f}, "config.mixing_gain");
  bad(Config{.input_noise = -1.0f}, "config.input_noise");
  bad(Config{.label_noise = 1.5f}, "config.label_noise = 1.5");
  bad(Config{.label_noise = std::numeric_limits<float>::quiet_NaN()}, "config.label_noise");
  const std::string msg =
      expect_error([] { (void)bench().sample_task(10, 4, 0); }, Errc::kOutOfRange);
  EXPECT_NE(msg.find("task = 4"), std::string::npos) << msg;
  expect_error([] { (void)bench().sample(-1, 0); }, Errc::kInvalidArgument);
  expect_error([] { (void)bench().rule(-1); }, Errc::kOutOfRange);
  std::vector<float> z(7);
  expect_error([&] { (void)bench().clean_label(0, z); }, Errc::kShapeMismatch);
  EXPECT_TRUE(bench().sample(0, 1).empty());
}

// ---- BatchSampler and gather -------------------------------------------------------------------

TEST(BatchSampler, BatchesArePureFunctionsOfSeedAndStep) {
  train::BatchSampler forward(103, 10, 42);
  std::vector<std::vector<index_t>> in_order;
  for (std::int64_t s = 0; s < 40; ++s) in_order.push_back(forward.indices(s));
  // Out of order, with a warm cache of other epochs, and from fresh samplers.
  train::BatchSampler scrambled(103, 10, 42);
  for (const std::int64_t s : {39, 0, 21, 20, 5, 33, 10, 11, 38, 1}) {
    EXPECT_EQ(scrambled.indices(s), in_order[to_size(s)]) << s;
    EXPECT_EQ(train::BatchSampler(103, 10, 42).indices(s), in_order[to_size(s)]) << s;
  }
  EXPECT_EQ(forward.indices(7), in_order[7]);
  // Far steps work without visiting the ones before.
  EXPECT_EQ(scrambled.epoch(1000000), 1000000 * 10 / 103);
  EXPECT_EQ(scrambled.indices(1000000), train::BatchSampler(103, 10, 42).indices(1000000));
}

TEST(BatchSampler, EachEpochCoversEveryRowOnce) {
  const index_t n = 103, b = 10;
  train::BatchSampler sampler(n, b, 7);
  std::vector<index_t> flat;
  for (std::int64_t s = 0; s < 31; ++s) {  // 310 rows: 3 full epochs and a bit
    const std::vector<index_t> rows = sampler.indices(s);
    flat.insert(flat.end(), rows.begin(), rows.end());
  }
  std::vector<index_t> perm(to_size(n));
  for (std::int64_t e = 0; e < 3; ++e) {
    std::vector<index_t> epoch(flat.begin() + e * n, flat.begin() + (e + 1) * n);
    sampler.permutation(e, perm);
    EXPECT_EQ(epoch, perm) << "epoch " << e;  // straddling batches included
    std::sort(epoch.begin(), epoch.end());
    for (index_t i = 0; i < n; ++i) ASSERT_EQ(epoch[to_size(i)], i) << "epoch " << e;
  }
  // Epochs are shuffled differently.
  std::vector<index_t> p0(to_size(n)), p1(to_size(n));
  sampler.permutation(0, p0);
  sampler.permutation(1, p1);
  EXPECT_NE(p0, p1);
  // A batch larger than the dataset spans several epochs.
  train::BatchSampler big(5, 12, 7);
  std::vector<index_t> rows = big.indices(0);
  std::vector<index_t> first(rows.begin(), rows.begin() + 5);
  std::sort(first.begin(), first.end());
  EXPECT_EQ(first, (std::vector<index_t>{0, 1, 2, 3, 4}));
}

TEST(BatchSampler, SeedsDifferAndBadArgumentsAreRejected) {
  train::BatchSampler a(1000, 32, 1), b(1000, 32, 2);
  EXPECT_NE(a.indices(0), b.indices(0));
  EXPECT_EQ(a.dataset_size(), 1000);
  EXPECT_EQ(a.batch_size(), 32);
  EXPECT_EQ(a.seed(), 1u);
  expect_error([] { train::BatchSampler s(0, 4, 1); }, Errc::kInvalidArgument);
  expect_error([] { train::BatchSampler s(10, 0, 1); }, Errc::kInvalidArgument);
  const std::string msg = expect_error([&] { (void)a.indices(-1); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("step = -1"), std::string::npos) << msg;
  expect_error([&] { (void)a.indices(std::numeric_limits<std::int64_t>::max() / 16); },
               Errc::kInvalidArgument);
  std::vector<index_t> wrong(31);
  expect_error([&] { a.indices(0, wrong); }, Errc::kShapeMismatch);
  expect_error([&] { a.permutation(-1, wrong); }, Errc::kInvalidArgument);
}

TEST(Gather, CopiesRowsAndChecksFirst) {
  const Dataset d = bench().sample(50, 1);
  const std::vector<index_t> rows = {7, 0, 49, 7};
  std::vector<float> x(4 * 32, -1.0f);
  std::vector<std::int32_t> tasks(4, -1), labels(4, -1);
  train::gather(d, rows, MatrixView<float>(x.data(), 4, 32),
                VectorView<std::int32_t>(tasks.data(), 4),
                VectorView<std::int32_t>(labels.data(), 4));
  for (std::size_t k = 0; k < 4; ++k) {
    const auto r = to_size(rows[k]);
    EXPECT_TRUE(std::equal(x.begin() + static_cast<std::ptrdiff_t>(k * 32),
                           x.begin() + static_cast<std::ptrdiff_t>(k * 32 + 32),
                           d.x.begin() + static_cast<std::ptrdiff_t>(r * 32)));
    EXPECT_EQ(tasks[k], d.tasks[r]);
    EXPECT_EQ(labels[k], d.labels[r]);
  }
  // Strided x; labels only.
  std::vector<float> wide(4 * 40, -1.0f);
  train::gather(d, rows, MatrixView<float>(wide.data(), 4, 32, 40), {},
                VectorView<std::int32_t>(labels.data(), 4));
  EXPECT_EQ(wide[32], -1.0f);
  EXPECT_EQ(wide[40], d.x[0]);
  // A bad row anywhere: nothing written.
  std::vector<float> fresh(4 * 32, -1.0f);
  const std::vector<index_t> bad = {1, 2, 50, 3};
  const std::string msg =
      expect_error([&] { train::gather(d, bad, MatrixView<float>(fresh.data(), 4, 32), {}, {}); },
                   Errc::kOutOfRange);
  EXPECT_NE(msg.find("rows[2] = 50"), std::string::npos) << msg;
  EXPECT_TRUE(std::all_of(fresh.begin(), fresh.end(), [](float v) { return v == -1.0f; }));
  expect_error([&] { train::gather(d, rows, MatrixView<float>(fresh.data(), 4, 31), {}, {}); },
               Errc::kShapeMismatch);
  expect_error(
      [&] {
        train::gather(d, rows, MatrixView<float>(fresh.data(), 4, 32),
                      VectorView<std::int32_t>(tasks.data(), 3), {});
      },
      Errc::kShapeMismatch);
}

// ---- Dataset helpers ---------------------------------------------------------------------------

TEST(Dataset, SplitSubsetAppend) {
  const Dataset d = bench().sample(101, 4);
  const auto [a, b] = train::split(d, 0.7, 3);
  EXPECT_EQ(a.size(), 71);
  EXPECT_EQ(b.size(), 30);
  EXPECT_TRUE(same_bits(a, train::split(d, 0.7, 3).first));
  EXPECT_FALSE(same_bits(a, train::split(d, 0.7, 4).first));
  // Each part keeps the original order; together they are every row once:
  // find each row of a and b in d by its features.
  std::vector<int> seen(101, 0);
  for (const Dataset* part : {&a, &b}) {
    std::size_t last = 0;
    for (index_t i = 0; i < part->size(); ++i) {
      std::size_t found = 101;
      for (std::size_t r = 0; r < 101; ++r)
        if (std::equal(d.x.begin() + static_cast<std::ptrdiff_t>(r * 32),
                       d.x.begin() + static_cast<std::ptrdiff_t>(r * 32 + 32),
                       part->x.begin() + i * 32))
          found = r;
      ASSERT_LT(found, 101u);
      EXPECT_EQ(part->labels[to_size(i)], d.labels[found]);
      if (i > 0) {
        EXPECT_GT(found, last);
      }
      last = found;
      ++seen[found];
    }
  }
  EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
  EXPECT_EQ(train::split(d, 0.0, 1).first.size(), 0);
  EXPECT_EQ(train::split(d, 1.0, 1).second.size(), 0);
  expect_error([&] { (void)train::split(d, 1.5, 1); }, Errc::kInvalidArgument);

  Dataset joined = a;
  train::append(joined, b);
  EXPECT_EQ(joined.size(), 101);
  Dataset empty;
  train::append(empty, a);
  EXPECT_TRUE(same_bits(empty, a));
  Dataset narrow;
  narrow.features = 3;
  narrow.x = {1, 2, 3};
  narrow.tasks = {0};
  narrow.labels = {0};
  expect_error([&] { train::append(joined, narrow); }, Errc::kShapeMismatch);

  const std::vector<index_t> rows = {3, 3, 0};
  const Dataset s = train::subset(d, rows);
  EXPECT_EQ(s.size(), 3);
  EXPECT_EQ(s.labels[0], d.labels[3]);
  EXPECT_EQ(s.labels[2], d.labels[0]);
  const std::vector<index_t> out_of_range = {101};
  expect_error([&] { (void)train::subset(d, out_of_range); }, Errc::kOutOfRange);

  Dataset broken = d;
  broken.tasks.pop_back();
  expect_error([&] { train::check_dataset(broken, "broken"); }, Errc::kShapeMismatch);
  broken = d;
  broken.labels[5] = -2;
  const std::string msg =
      expect_error([&] { train::check_dataset(broken, "broken"); }, Errc::kOutOfRange);
  EXPECT_NE(msg.find("broken.labels[5] = -2"), std::string::npos) << msg;
  EXPECT_EQ(d.inputs().rows(), 101);
  EXPECT_EQ(d.inputs().cols(), 32);
  EXPECT_EQ(d.task_view().size(), 101);
  EXPECT_EQ(d.label_view()[7], d.labels[7]);
}

// ---- CSV ---------------------------------------------------------------------------------------

fs::path temp_path(const std::string& name) {
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("moekit_train_data_" + std::to_string(static_cast<long>(::getpid())));
  fs::create_directories(dir);
  const fs::path p = dir / name;
  fs::remove(p);
  return p;
}

fs::path write_text(const std::string& name, const std::string& text) {
  const fs::path p = temp_path(name);
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  return p;
}

TEST(Csv, RoundTripIsBitExact) {
  Dataset d = bench().sample(300, 5);
  // Values whose shortest forms are awkward.
  const float specials[] = {0.1f,
                            -0.0f,
                            std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::denorm_min(),
                            -std::numeric_limits<float>::denorm_min(),
                            1.0f / 3.0f,
                            16777217.0f,
                            1e-40f};
  for (std::size_t k = 0; k < std::size(specials); ++k) d.x[k] = specials[k];
  d.tasks[0] = 2147483647;
  const fs::path p = temp_path("round_trip.csv");
  train::write_csv(p, d);
  EXPECT_FALSE(fs::exists(fs::path(p.string() + ".tmp")));
  const Dataset back = train::read_csv(p);
  EXPECT_TRUE(same_bits(d, back));
  EXPECT_TRUE(std::signbit(back.x[1]));
  // The header names the columns.
  std::ifstream in(p);
  std::string header;
  std::getline(in, header);
  EXPECT_EQ(header.substr(0, 20), "task,label,f0,f1,f2,");
  EXPECT_EQ(header.substr(header.size() - 4), ",f31");
}

TEST(Csv, HeadersCommentsBlankLinesAndCrlf) {
  const std::string body =
      "\xEF\xBB\xBF# a comment\r\n"
      "\r\n"
      "task,label,a,b\r\n"
      "  # indented comment\r\n"
      "0,1,0.5,-2\r\n"
      " 1 , 0 , 1e-3 ,\t+4\r\n"
      "\n"
      "2,3,.25,7";  // no final newline
  const Dataset d = train::read_csv(write_text("header.csv", body));
  EXPECT_EQ(d.features, 2);
  EXPECT_EQ(d.tasks, (std::vector<std::int32_t>{0, 1, 2}));
  EXPECT_EQ(d.labels, (std::vector<std::int32_t>{1, 0, 3}));
  EXPECT_EQ(d.x, (std::vector<float>{0.5f, -2.0f, 1e-3f, 4.0f, 0.25f, 7.0f}));

  // Without a header.
  const Dataset plain = train::read_csv(write_text("plain.csv", "0,1,2\n1,0,3\n"));
  EXPECT_EQ(plain.size(), 2);
  EXPECT_EQ(plain.features, 1);
  // A numeric header only when told; a text header with kAbsent is an error.
  const fs::path numeric = write_text("numeric_header.csv", "9,9,9\n0,1,2\n");
  EXPECT_EQ(train::read_csv(numeric).size(), 2);
  EXPECT_EQ(train::read_csv(numeric, {.header = train::CsvHeader::kPresent}).size(), 1);
  const std::string msg = expect_error(
      [&] {
        (void)train::read_csv(write_text("text_header.csv", "task,label,x\n0,1,2\n"),
                              {.header = train::CsvHeader::kAbsent});
      },
      Errc::kFormatError);
  EXPECT_NE(msg.find(":1: column 1:"), std::string::npos) << msg;
  // Expected feature count.
  EXPECT_EQ(train::read_csv(numeric, {.features = 1}).size(), 2);
  const std::string wrong =
      expect_error([&] { (void)train::read_csv(numeric, {.features = 2}); }, Errc::kFormatError);
  EXPECT_NE(wrong.find("expected options.features = 2"), std::string::npos) << wrong;
  // Tiny values below the float range become 0.
  EXPECT_EQ(train::read_csv(write_text("tiny.csv", "0,0,1e-60\n")).x[0], 0.0f);
}

struct BadFile {
  const char* name;
  const char* text;
  Errc code;
  const char* needle;  // in the message (the line and column, and what)
};

TEST(Csv, MalformedFilesNameTheLineAndColumn) {
  const BadFile cases[] = {
      {"bad_number", "task,label,f0,f1\n0,1,2,3\n0,1,abc,3\n", Errc::kFormatError,
       ":3: column 3: bad number 'abc'"},
      {"trailing_junk", "0,1,2.5x\n", Errc::kFormatError, ":1: column 3: bad number '2.5x'"},
      {"empty_field", "0,1,2\n0,1,\n", Errc::kFormatError, ":2: column 3: bad number ''"},
      {"too_many", "0,1,2,3\n\n# c\n0,1,2,3,4\n", Errc::kFormatError,
       ":4: column 5: found 5 columns, expected 4"},
      {"too_few", "task,label,f0,f1\n0,1,2\n", Errc::kFormatError,
       ":2: column 4: found 3 columns, expected 4 (as in the header)"},
      {"two_columns", "0,1\n", Errc::kFormatError, ":1: column 2: found 2 columns"},
      {"negative_task", "0,1,2\n-1,1,2\n", Errc::kFormatError, ":2: column 1: task -1 is negative"},
      {"negative_label", "0,-3,2\n", Errc::kFormatError, ":1: column 2: label -3 is negative"},
      {"fractional_label", "0,1.5,2\n", Errc::kFormatError,
       ":1: column 2: label '1.5' is not an integer"},
      {"text_label", "0,1,2\n0,b,2\n", Errc::kFormatError, ":2: column 2: bad label 'b'"},
      {"huge_label", "0,2147483648,2\n", Errc::kFormatError,
       ":1: column 2: label 2147483648 is out of the int32 range"},
      {"huge_task", "99999999999999999999,0,2\n", Errc::kFormatError,
       ":1: column 1: task '99999999999999999999' is out of range"},
      {"huge_feature", "0,0,1e39\n", Errc::kFormatError,
       ":1: column 3: feature '1e39' is outside the float range"},
      {"nan", "0,0,1\n0,0,1\n1,0,nan\n", Errc::kNonFinite,
       ":3: column 3: feature 'nan' is not finite"},
      {"inf", "0,0,-inf\n", Errc::kNonFinite, ":1: column 3: feature '-inf' is not finite"},
      {"empty", "", Errc::kFormatError, "no data rows"},
      {"comments_only", "# nothing\n\n  \n", Errc::kFormatError, "no data rows"},
      {"header_only", "task,label,f0\r\n", Errc::kFormatError, "no data rows (only a header)"},
  };
  for (const BadFile& c : cases) {
    const fs::path p = write_text(std::string(c.name) + ".csv", c.text);
    // Reading never partially fills: the target keeps its value.
    Dataset target = bench().sample(3, 1);
    const Dataset before = target;
    const std::string msg = expect_error([&] { target = train::read_csv(p); }, c.code);
    EXPECT_NE(msg.find(c.needle), std::string::npos) << c.name << ": " << msg;
    EXPECT_NE(msg.find(p.filename().string()), std::string::npos) << c.name << ": " << msg;
    EXPECT_TRUE(same_bits(target, before)) << c.name;
  }
}

TEST(Csv, IoErrorsAndUnwritableData) {
  const fs::path missing = temp_path("missing.csv");
  const std::string msg = expect_error([&] { (void)train::read_csv(missing); }, Errc::kIoError);
  EXPECT_NE(msg.find("missing.csv"), std::string::npos) << msg;
  expect_error([&] { (void)train::read_csv(missing.parent_path()); }, Errc::kIoError);
  Dataset d = bench().sample(4, 1);
  expect_error([&] { train::write_csv(missing.parent_path() / "no_dir" / "x.csv", d); },
               Errc::kIoError);
  d.x[33] = std::numeric_limits<float>::infinity();
  const std::string inf = expect_error([&] { train::write_csv(missing, d); }, Errc::kNonFinite);
  EXPECT_NE(inf.find("data.x(1, 1)"), std::string::npos) << inf;
  EXPECT_FALSE(fs::exists(missing));
  d.x.pop_back();
  expect_error([&] { train::write_csv(missing, d); }, Errc::kShapeMismatch);
  expect_error([&] { (void)train::read_csv(missing, {.features = 0}); }, Errc::kInvalidArgument);
}

}  // namespace
