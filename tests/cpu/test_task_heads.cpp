// Task heads (moekit/cpu/task_heads.hpp) against a float64 reference written
// here from the header's formulas: logits, per-task losses, accuracy and
// counts, fixed and uncertainty weighting, and every gradient (W, b, x, s)
// against central finite differences of that reference. Also tasks with no
// samples, H = 1 and H = 100 with different class counts, sorted and unsorted
// batches, frozen parts, accumulation, strided views and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "expect_error.hpp"
#include "gemm_reference.hpp"
#include "moekit/cpu/task_heads.hpp"
#include "routing_reference.hpp"
#include "strided_matrix.hpp"

namespace {

using moekit::Errc;
using moekit::HeadSpec;
using moekit::index_t;
using moekit::MatrixView;
using moekit::to_size;
using moekit::VectorView;
using moekit::cpu::HeadGrads;
using moekit::cpu::HeadWeights;
using moekit::cpu::TaskHeads;
using moekit::cpu::TaskLosses;
using moekit::cpu::TaskWeighting;
using moekit::cpu::TaskWeights;
using moekit_test::rel_error;
using moekit_test::StridedMatrix;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kFdStep = 1e-5;

// ---- a problem: parameters, a batch, outputs (strided, poisoned) ------------------

template <class S>
struct Problem {
  static constexpr int H = S::num_heads;
  moekit::cpu::TaskHeadsConfig<S> config;
  index_t n = 0, d = 0, total = 0, maxc = 0;
  StridedMatrix x, w, logits, dlogits, dx, dw;
  std::vector<float> b, db, log_vars, dlog_vars, fixed;
  std::vector<std::int32_t> tasks, labels;
  std::vector<std::byte> ws;

  Problem(const std::array<index_t, to_size(H)>& classes, index_t rows, index_t width,
          const std::vector<std::int32_t>& task_ids, std::uint32_t seed, bool bias = true)
      : n(rows), d(width), tasks(task_ids) {
    config.d_model = d;
    config.classes = classes;
    config.bias = bias;
    for (index_t c : classes) {
      total += c;
      maxc = std::max(maxc, c);
    }
    std::mt19937 rng(seed);
    x = StridedMatrix(n, d, 2);
    w = StridedMatrix(total, d, 5);
    x.randomize(rng);
    w.randomize(rng, 0.7f);
    logits = StridedMatrix(n, maxc, 3);
    dlogits = StridedMatrix(n, maxc, 1);
    dx = StridedMatrix(n, d, 4);
    dw = StridedMatrix(total, d, 2);
    logits.poison();
    dlogits.poison();
    dx.poison();
    dw.poison();
    std::normal_distribution<float> normal(0.0f, 1.0f);
    if (bias) {
      for (index_t i = 0; i < total; ++i) b.push_back(0.5f * normal(rng));
      db.assign(static_cast<std::size_t>(total), kNaN);
    }
    for (int h = 0; h < H; ++h) {
      log_vars.push_back(0.6f * normal(rng));
      fixed.push_back(0.25f + static_cast<float>(h % 4) * 0.5f);
    }
    dlog_vars.assign(H, kNaN);
    for (index_t i = 0; i < n; ++i) {
      const index_t c = classes[static_cast<std::size_t>(task(i))];
      labels.push_back(
          static_cast<std::int32_t>(std::uniform_int_distribution<index_t>(0, c - 1)(rng)));
    }
    const TaskHeads<S> heads(config);
    ws.assign(static_cast<std::size_t>(heads.workspace_size(n)), std::byte{0x5a});
  }

  int task(index_t i) const { return tasks.empty() ? 0 : tasks[static_cast<std::size_t>(i)]; }
  VectorView<const std::int32_t> task_view() const {
    return {tasks.data(), static_cast<index_t>(tasks.size())};
  }
  VectorView<const std::int32_t> label_view() const { return {labels.data(), n}; }
  HeadWeights weights() const {
    return {w.cview(),
            b.empty() ? VectorView<const float>() : VectorView<const float>(b.data(), total)};
  }
  HeadGrads grads(bool accumulate = false) {
    return {dw.view(), b.empty() ? VectorView<float>() : VectorView<float>(db.data(), total),
            accumulate};
  }
  VectorView<std::byte> workspace() { return {ws.data(), static_cast<index_t>(ws.size())}; }
  TaskWeights weighting(TaskWeighting kind) const {
    if (kind == TaskWeighting::kFixed) return {kind, {fixed.data(), H}, {}};
    return {kind, {}, {log_vars.data(), H}};
  }
};

// Task ids: every task gets rows, except those listed as empty; shuffled.
template <int H>
std::vector<std::int32_t> make_tasks(index_t n, std::uint32_t seed, bool sorted,
                                     const std::vector<int>& empty = {}) {
  std::vector<int> present;
  for (int h = 0; h < H; ++h) {
    if (std::find(empty.begin(), empty.end(), h) == empty.end()) present.push_back(h);
  }
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i)
    t[static_cast<std::size_t>(i)] = present[static_cast<std::size_t>(i) % present.size()];
  std::mt19937 rng(seed);
  std::shuffle(t.begin(), t.end(), rng);
  if (sorted) std::stable_sort(t.begin(), t.end());
  return t;
}

// ---- float64 reference -------------------------------------------------------------

struct RefParams {
  std::vector<double> w, b, x, s;  // w: total x d, b: total, x: n x d, s: H
};

template <class S>
RefParams ref_params(const Problem<S>& p) {
  RefParams r;
  r.w = p.w.values();
  r.b.assign(p.b.begin(), p.b.end());
  r.x = p.x.values();
  r.s.assign(p.log_vars.begin(), p.log_vars.end());
  return r;
}

struct RefOut {
  std::vector<std::vector<double>> logits;  // per row, C_h values
  std::vector<double> loss, accuracy;
  std::vector<index_t> count;
  double total = 0.0;
};

template <class S>
RefOut ref_eval(const Problem<S>& p, const RefParams& r, TaskWeighting kind) {
  constexpr int H = S::num_heads;
  RefOut out;
  out.loss.assign(H, 0.0);
  out.accuracy.assign(H, 0.0);
  out.count.assign(H, 0);
  std::vector<index_t> off(H + 1, 0);
  for (int h = 0; h < H; ++h) off[to_size(h + 1)] = off[to_size(h)] + p.config.classes[to_size(h)];
  for (index_t i = 0; i < p.n; ++i) {
    const int h = p.task(i);
    const index_t c = p.config.classes[to_size(h)];
    std::vector<double> z(static_cast<std::size_t>(c));
    for (index_t k = 0; k < c; ++k) {
      double v = r.b.empty() ? 0.0 : r.b[static_cast<std::size_t>(off[to_size(h)] + k)];
      for (index_t j = 0; j < p.d; ++j) {
        v += r.w[static_cast<std::size_t>((off[to_size(h)] + k) * p.d + j)] *
             r.x[static_cast<std::size_t>(i * p.d + j)];
      }
      z[static_cast<std::size_t>(k)] = v;
    }
    const double m = *std::max_element(z.begin(), z.end());
    double sum = 0.0;
    for (double v : z) sum += std::exp(v - m);
    const int y = p.labels[static_cast<std::size_t>(i)];
    out.loss[to_size(h)] += std::log(sum) + m - z[static_cast<std::size_t>(y)];
    out.accuracy[to_size(h)] += (std::max_element(z.begin(), z.end()) - z.begin()) == y ? 1.0 : 0.0;
    ++out.count[to_size(h)];
    out.logits.push_back(z);
  }
  for (int h = 0; h < H; ++h) {
    if (out.count[to_size(h)] == 0) continue;
    out.loss[to_size(h)] /= static_cast<double>(out.count[to_size(h)]);
    out.accuracy[to_size(h)] /= static_cast<double>(out.count[to_size(h)]);
    if (kind == TaskWeighting::kFixed) {
      out.total += p.fixed[to_size(h)] * out.loss[to_size(h)];
    } else {
      out.total += std::exp(-r.s[to_size(h)]) * out.loss[to_size(h)] + r.s[to_size(h)];
    }
  }
  return out;
}

// Central differences of the reference total with respect to every entry of v.
template <class S>
std::vector<double> fd_grad(const Problem<S>& p, RefParams r, std::vector<double> RefParams::*field,
                            TaskWeighting kind) {
  std::vector<double>& v = r.*field;
  std::vector<double> g(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    const double keep = v[i];
    v[i] = keep + kFdStep;
    const double up = ref_eval(p, r, kind).total;
    v[i] = keep - kFdStep;
    const double down = ref_eval(p, r, kind).total;
    v[i] = keep;
    g[i] = (up - down) / (2.0 * kFdStep);
  }
  return g;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// Runs forward, loss (with gradients) and backward; checks all of it against
// the reference; returns the library's losses.
template <class S>
TaskLosses<S> check_against_reference(Problem<S>& p, TaskWeighting kind, bool fd = true) {
  constexpr int H = S::num_heads;
  const TaskHeads<S> heads(p.config);
  heads.forward(p.x.cview(), p.task_view(), p.weights(), p.logits.view(), p.workspace());
  const VectorView<float> dlv = kind == TaskWeighting::kUncertainty
                                    ? VectorView<float>(p.dlog_vars.data(), H)
                                    : VectorView<float>();
  const TaskLosses<S> got = heads.loss(p.logits.cview(), p.task_view(), p.label_view(),
                                       p.weighting(kind), p.dlogits.view(), dlv);
  heads.backward(p.dlogits.cview(), p.x.cview(), p.task_view(), p.weights(), p.dx.view(), p.grads(),
                 p.workspace());

  const RefParams r = ref_params(p);
  const RefOut ref = ref_eval(p, r, kind);
  // Logits: values in the head's columns, -inf padding, strides untouched.
  std::vector<double> got_z, ref_z;
  for (index_t i = 0; i < p.n; ++i) {
    const index_t c = p.config.classes[to_size(p.task(i))];
    for (index_t k = 0; k < p.maxc; ++k) {
      if (k < c) {
        got_z.push_back(p.logits.at(i, k));
        ref_z.push_back(ref.logits[static_cast<std::size_t>(i)][static_cast<std::size_t>(k)]);
      } else {
        EXPECT_EQ(p.logits.at(i, k), -kInf) << "row " << i << " col " << k;
        EXPECT_EQ(p.dlogits.at(i, k), 0.0f) << "row " << i << " col " << k;
      }
    }
  }
  EXPECT_LT(rel_error(got_z, ref_z), 1e-5);
  EXPECT_TRUE(p.logits.padding_untouched());
  EXPECT_TRUE(p.dlogits.padding_untouched());
  EXPECT_TRUE(p.dx.padding_untouched());
  EXPECT_TRUE(p.dw.padding_untouched());

  // Per-task statistics.
  for (int h = 0; h < H; ++h) {
    EXPECT_EQ(got.count[to_size(h)], ref.count[to_size(h)]) << "task " << h;
    EXPECT_NEAR(got.loss[to_size(h)], ref.loss[to_size(h)], 1e-5 * (1.0 + ref.loss[to_size(h)]))
        << "task " << h;
    EXPECT_EQ(got.accuracy[to_size(h)], ref.accuracy[to_size(h)]) << "task " << h;
  }
  EXPECT_NEAR(got.total, ref.total, 1e-5 * (1.0 + std::abs(ref.total)));

  if (fd) {
    EXPECT_FALSE(p.dx.any_nan());
    EXPECT_FALSE(p.dw.any_nan());
    EXPECT_LT(rel_error(p.dw.values(), fd_grad(p, r, &RefParams::w, kind)), 1e-4);
    EXPECT_LT(rel_error(p.dx.values(), fd_grad(p, r, &RefParams::x, kind)), 1e-4);
    if (p.config.bias) {
      EXPECT_LT(rel_error(to_double(p.db), fd_grad(p, r, &RefParams::b, kind)), 1e-4);
    }
    if (kind == TaskWeighting::kUncertainty) {
      EXPECT_LT(rel_error(to_double(p.dlog_vars), fd_grad(p, r, &RefParams::s, kind)), 1e-4);
    }
  }
  return got;
}

// ---- reference and finite differences -------------------------------------------------

TEST(TaskHeads, FixedWeightsMatchFloat64ReferenceAndFiniteDifferences) {
  using S = HeadSpec<3>;
  Problem<S> p({6, 3, 11}, 40, 7, make_tasks<3>(40, 1, false), 11);
  check_against_reference(p, TaskWeighting::kFixed);
}

TEST(TaskHeads, UncertaintyWeightingMatchesFloat64ReferenceAndFiniteDifferences) {
  using S = HeadSpec<3>;
  Problem<S> p({6, 3, 11}, 40, 7, make_tasks<3>(40, 2, false), 12);
  check_against_reference(p, TaskWeighting::kUncertainty);
}

TEST(TaskHeads, SortedBatchTakesTheNoGatherPathAndMatches) {
  using S = HeadSpec<4>;
  for (TaskWeighting kind : {TaskWeighting::kFixed, TaskWeighting::kUncertainty}) {
    Problem<S> p({5, 2, 9, 4}, 37, 6, make_tasks<4>(37, 3, true), 13);
    check_against_reference(p, kind);
  }
}

TEST(TaskHeads, NoBias) {
  using S = HeadSpec<3>;
  Problem<S> p({4, 7, 2}, 30, 5, make_tasks<3>(30, 4, false), 14, /*bias=*/false);
  check_against_reference(p, TaskWeighting::kFixed);
}

TEST(TaskHeads, TaskWithNoSamplesIsLeftOutAndGetsZeroGradient) {
  using S = HeadSpec<4>;
  for (TaskWeighting kind : {TaskWeighting::kFixed, TaskWeighting::kUncertainty}) {
    Problem<S> p({5, 3, 8, 6}, 33, 6, make_tasks<4>(33, 5, false, {1, 3}), 15);
    const TaskLosses<S> got = check_against_reference(p, kind);
    for (int h : {1, 3}) {
      EXPECT_EQ(got.count[to_size(h)], 0);
      EXPECT_EQ(got.loss[to_size(h)], 0.0);
      EXPECT_EQ(got.accuracy[to_size(h)], 0.0);
      const moekit::cpu::TaskHeads<S> heads(p.config);
      for (index_t r = 0; r < p.config.classes[to_size(h)]; ++r) {
        EXPECT_EQ(p.db[static_cast<std::size_t>(heads.class_offset(h) + r)], 0.0f);
        for (index_t j = 0; j < p.d; ++j) EXPECT_EQ(p.dw.at(heads.class_offset(h) + r, j), 0.0f);
      }
      if (kind == TaskWeighting::kUncertainty) {
        EXPECT_EQ(p.dlog_vars[to_size(h)], 0.0f);
      }
    }
  }
}

TEST(TaskHeads, SingleHeadWithAndWithoutTaskIds) {
  using S = HeadSpec<1>;
  // One head: no grouping, only the GEMM engine's buffers.
  EXPECT_EQ(TaskHeads<S>({.d_model = 8, .classes = {5}}).workspace_size(100),
            moekit::cpu::gemm_workspace_size(moekit::cpu::max_threads()));
  EXPECT_EQ(TaskHeads<S>({.d_model = 8, .classes = {5}}).workspace_size(0), 0);
  Problem<S> with_ids({5}, 25, 8, std::vector<std::int32_t>(25, 0), 16);
  check_against_reference(with_ids, TaskWeighting::kFixed);
  Problem<S> without({5}, 25, 8, {}, 16);  // empty tasks: all task 0
  check_against_reference(without, TaskWeighting::kUncertainty);
  EXPECT_TRUE(with_ids.logits.bits_equal(without.logits));
}

TEST(TaskHeads, HundredHeadsWithDifferentClassCounts) {
  using S = HeadSpec<100>;
  std::array<index_t, 100> classes{};
  for (int h = 0; h < 100; ++h) classes[to_size(h)] = 1 + (h * 7) % 13;  // 1 .. 13 classes
  // 300 rows, tasks 10..19 absent; one-class heads have CE 0.
  std::vector<int> empty;
  for (int h = 10; h < 20; ++h) empty.push_back(h);
  for (TaskWeighting kind : {TaskWeighting::kFixed, TaskWeighting::kUncertainty}) {
    Problem<S> p(classes, 300, 4, make_tasks<100>(300, 6, false, empty), 17);
    const TaskLosses<S> got = check_against_reference(p, kind);
    for (int h : empty) EXPECT_EQ(got.count[to_size(h)], 0);
    EXPECT_EQ(got.loss[0], 0.0);  // classes[0] = 1
  }
}

TEST(TaskHeads, ParamsAreTheHeadBank) {
  using S = HeadSpec<3>;
  const TaskHeads<S> heads({.d_model = 16, .classes = {10, 4, 7}});
  EXPECT_EQ(heads.total_classes(), 21);
  EXPECT_EQ(heads.max_classes(), 10);
  EXPECT_EQ(heads.class_offset(2), 14);
  EXPECT_EQ(heads.params(), moekit::head_bank_params<S>(16, {10, 4, 7}));
  EXPECT_EQ(heads.params().total, 21 * 17);
}

// ---- frozen parts, accumulation, determinism ------------------------------------------

TEST(TaskHeads, FrozenGradientsAreNotWrittenAndOthersUnchanged) {
  using S = HeadSpec<3>;
  Problem<S> p({6, 3, 11}, 40, 7, make_tasks<3>(40, 7, false), 18);
  check_against_reference(p, TaskWeighting::kFixed, /*fd=*/false);
  const TaskHeads<S> heads(p.config);
  struct Variant {
    bool dx, dw, db;
  };
  for (const Variant v : {Variant{false, true, true}, Variant{true, false, true},
                          Variant{true, true, false}, Variant{false, false, false}}) {
    StridedMatrix dx(p.n, p.d, 4), dw(p.total, p.d, 2);
    dx.poison();
    dw.poison();
    std::vector<float> db(static_cast<std::size_t>(p.total), kNaN);
    const StridedMatrix dx0 = dx, dw0 = dw;
    heads.backward(p.dlogits.cview(), p.x.cview(), p.task_view(), p.weights(),
                   v.dx ? dx.view() : MatrixView<float>(),
                   {v.dw ? dw.view() : MatrixView<float>(),
                    v.db ? VectorView<float>(db.data(), p.total) : VectorView<float>()},
                   p.workspace());
    EXPECT_TRUE(v.dx ? dx.bits_equal(p.dx) : dx.bits_equal(dx0));
    EXPECT_TRUE(v.dw ? dw.bits_equal(p.dw) : dw.bits_equal(dw0));
    for (std::size_t i = 0; i < db.size(); ++i) {
      if (v.db) {
        EXPECT_EQ(db[i], p.db[i]);
      } else {
        EXPECT_TRUE(std::isnan(db[i]));
      }
    }
  }
}

TEST(TaskHeads, AccumulateAddsToWeightGradients) {
  using S = HeadSpec<4>;
  Problem<S> p({6, 3, 11, 2}, 40, 7, make_tasks<4>(40, 8, false, {2}), 19);
  check_against_reference(p, TaskWeighting::kFixed, /*fd=*/false);
  const TaskHeads<S> heads(p.config);
  StridedMatrix dw(p.total, p.d, 2);
  std::vector<float> db(static_cast<std::size_t>(p.total));
  std::mt19937 rng(9);
  dw.randomize(rng);
  for (float& v : db) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
  const StridedMatrix dw0 = dw;
  const std::vector<float> db0 = db;
  heads.backward(p.dlogits.cview(), p.x.cview(), p.task_view(), p.weights(), {},
                 {dw.view(), {db.data(), p.total}, true}, p.workspace());
  for (index_t r = 0; r < p.total; ++r) {
    const std::size_t k = static_cast<std::size_t>(r);
    EXPECT_NEAR(db[k], db0[k] + p.db[k], 1e-5f * (1.0f + std::abs(db[k])));
    for (index_t j = 0; j < p.d; ++j) {
      EXPECT_NEAR(dw.at(r, j), dw0.at(r, j) + p.dw.at(r, j),
                  1e-5f * (1.0f + std::abs(dw.at(r, j))));
    }
  }
  // Task 2 has no rows: its blocks keep their old values exactly.
  for (index_t r = heads.class_offset(2); r < heads.class_offset(3); ++r) {
    EXPECT_EQ(db[static_cast<std::size_t>(r)], db0[static_cast<std::size_t>(r)]);
    for (index_t j = 0; j < p.d; ++j) EXPECT_EQ(dw.at(r, j), dw0.at(r, j));
  }
}

TEST(TaskHeads, BitIdenticalRunAfterRun) {
  using S = HeadSpec<100>;
  std::array<index_t, 100> classes{};
  for (int h = 0; h < 100; ++h) classes[to_size(h)] = 2 + h % 9;
  Problem<S> a(classes, 2000, 32, make_tasks<100>(2000, 10, false), 20);
  Problem<S> b = a;
  check_against_reference(a, TaskWeighting::kFixed, /*fd=*/false);
  check_against_reference(b, TaskWeighting::kFixed, /*fd=*/false);
  EXPECT_TRUE(a.logits.bits_equal(b.logits));
  EXPECT_TRUE(a.dx.bits_equal(b.dx));
  EXPECT_TRUE(a.dw.bits_equal(b.dw));
}

// Packed heads for inference (TaskHeads::pack): fp32 gives the bits of the
// forward on the weights; bf16 and int8 stay near the float64 logits. For
// each dtype (int8: weights per class, x per row) the test prints what it
// changes on this data: the largest logit error relative to |x_i| |w_k|
// (the scale of a dot product's rounding), and the rows whose prediction differs from float64's
// (the labels here, so the accuracy change; docs/heads_and_exits.md quotes it).
TEST(TaskHeads, PackedInferenceInFp32Bf16AndInt8) {
  using S = HeadSpec<4>;
  using moekit::cpu::GemmDtype;
  constexpr index_t n = 1200, d = 384;
  Problem<S> p({2, 5, 11, 20}, n, d, make_tasks<4>(n, 41, false), 42);
  // Labels: the float64 prediction, so that fp32 scores 100% and the int8
  // accuracy change is the share of rows int8 flips.
  const RefOut ref = ref_eval(p, ref_params(p), TaskWeighting::kFixed);
  for (index_t i = 0; i < n; ++i) {
    const std::vector<double>& z = ref.logits[to_size(i)];
    p.labels[to_size(i)] =
        static_cast<std::int32_t>(std::max_element(z.begin(), z.end()) - z.begin());
  }
  const TaskHeads<S> heads(p.config);
  heads.forward(p.x.cview(), p.task_view(), p.weights(), p.logits.view(), p.workspace());
  struct Case {
    GemmDtype dtype;
    double tol;  // largest |z_ik - z64_ik| / (|x_i| |w_k|), the dot product's scale
  };
  const auto norm = [](const StridedMatrix& m, index_t r) {
    double sum = 0.0;
    for (index_t j = 0; j < m.cols; ++j) sum += double(m.at(r, j)) * double(m.at(r, j));
    return std::sqrt(sum);
  };
  for (const Case c : {Case{GemmDtype::kFloat32, 1e-6}, Case{GemmDtype::kBfloat16, 4e-3},
                       Case{GemmDtype::kInt8, 1e-2}}) {
    SCOPED_TRACE(moekit::cpu::gemm_dtype_name(c.dtype));
    const moekit::cpu::PackedHeadWeights<S> packed = heads.pack(p.weights(), c.dtype);
    StridedMatrix z = p.logits;
    z.poison();
    heads.forward(p.x.cview(), p.task_view(), packed, z.view(), p.workspace());
    if (c.dtype == GemmDtype::kFloat32) {
      EXPECT_TRUE(z.bits_equal(p.logits));
    }
    double worst = 0.0;
    index_t flipped = 0;
    for (index_t i = 0; i < n; ++i) {
      const std::vector<double>& want = ref.logits[to_size(i)];
      const auto ci = static_cast<index_t>(want.size());
      const index_t first = heads.class_offset(p.task(i));
      for (index_t k = 0; k < ci; ++k) {
        const double scale = norm(p.x, i) * norm(p.w, first + k);
        worst = std::max(worst, std::abs(z.at(i, k) - want[to_size(k)]) / scale);
      }
      for (index_t k = ci; k < p.maxc; ++k) ASSERT_EQ(z.at(i, k), -kInf);
      const float* row = &z.at(i, 0);
      flipped += (std::max_element(row, row + ci) - row) != p.labels[to_size(i)];
    }
    EXPECT_LT(worst, c.tol);
    const TaskLosses<S> l = heads.loss(z.cview(), p.task_view(), p.label_view());
    double acc = 0.0;
    for (int h = 0; h < 4; ++h)
      acc += l.accuracy[to_size(h)] * static_cast<double>(l.count[to_size(h)]);
    acc /= static_cast<double>(n);
    std::printf(
        "[ info ] %s heads (T = %lld, d = %lld, classes 2/5/11/20): worst logit error %.2e "
        "of |x| |w|; %lld of %lld predictions differ from float64's (accuracy "
        "against them %.2f%%)\n",
        moekit::cpu::gemm_dtype_name(c.dtype), static_cast<long long>(n), static_cast<long long>(d),
        worst, static_cast<long long>(flipped), static_cast<long long>(n), 100.0 * acc);
    // A flip needs a near tie of the float64 logits; int8 keeps 99% here.
    EXPECT_LE(flipped, n / 100);
  }
  // Packed for other heads: refused, naming the head and the shapes.
  const TaskHeads<S> wider({.d_model = d + 1, .classes = {2, 5, 11, 20}});
  const std::string msg = moekit_test::expect_error(
      [&] {
        StridedMatrix x2(n, d + 1);
        wider.forward(x2.cview(), p.task_view(), heads.pack(p.weights(), GemmDtype::kInt8),
                      p.logits.view(), p.workspace());
      },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("weights.w[0] packs 1 groups of 384 x 2, expected 1 of 385 x 2"),
            std::string::npos)
      << msg;
}

// bf16 compute (training with fp32 master weights): every product rounds
// its two operands to bf16 and sums in fp32. So on every bf16 path the
// logits, dx and dW equal, to fp32's summation error, float64 products of
// the bf16-rounded operands (the library's own dlogits for dZ), db is the
// fp32 column sum of the unrounded dZ, and all of it is within bf16's
// rounding of the fp32 heads.
TEST(TaskHeads, Bf16ComputeRoundsOnlyTheProductsOperands) {
  using S = HeadSpec<3>;
  using moekit::cpu::GemmDtype;
  using moekit_test::round_bf16;
  constexpr index_t n = 150, d = 70;
  Problem<S> p({6, 3, 11}, n, d, make_tasks<3>(n, 5, false, {1}), 51);
  Problem<S> fp32 = p;  // the fp32 heads' results on the same problem
  check_against_reference(fp32, TaskWeighting::kFixed, false);
  p.config.compute = GemmDtype::kBfloat16;
  const TaskHeads<S> heads(p.config);
  const auto r = [](float v) { return static_cast<double>(round_bf16(v)); };
  for (const moekit_test::GemmPathCase& path : moekit_test::gemm_path_cases(GemmDtype::kBfloat16)) {
    SCOPED_TRACE(path.name);
    for (StridedMatrix* m : {&p.logits, &p.dlogits, &p.dx, &p.dw}) m->poison();
    std::fill(p.db.begin(), p.db.end(), kNaN);
    moekit_test::with_path(path, GemmDtype::kBfloat16, [&] {
      heads.forward(p.x.cview(), p.task_view(), p.weights(), p.logits.view(), p.workspace());
      heads.loss(p.logits.cview(), p.task_view(), p.label_view(),
                 p.weighting(TaskWeighting::kFixed), p.dlogits.view());
      heads.backward(p.dlogits.cview(), p.x.cview(), p.task_view(), p.weights(), p.dx.view(),
                     p.grads(), p.workspace());
    });
    std::vector<double> z, z_want, z_fp32, dx_want, dw_want(to_size(p.total * d), 0.0),
        db_want(to_size(p.total), 0.0);
    for (index_t i = 0; i < n; ++i) {
      const int h = p.task(i);
      const index_t c = p.config.classes[to_size(h)], first = heads.class_offset(h);
      for (index_t k = 0; k < c; ++k) {
        double v = p.b[to_size(first + k)];
        for (index_t j = 0; j < d; ++j) v += r(p.w.at(first + k, j)) * r(p.x.at(i, j));
        z.push_back(p.logits.at(i, k));
        z_want.push_back(v);
        z_fp32.push_back(fp32.logits.at(i, k));
        db_want[to_size(first + k)] += p.dlogits.at(i, k);
        for (index_t j = 0; j < d; ++j)
          dw_want[to_size((first + k) * d + j)] += r(p.dlogits.at(i, k)) * r(p.x.at(i, j));
      }
      for (index_t k = c; k < p.maxc; ++k) EXPECT_EQ(p.logits.at(i, k), -kInf);
      for (index_t j = 0; j < d; ++j) {
        double v = 0.0;
        for (index_t k = 0; k < c; ++k) v += r(p.dlogits.at(i, k)) * r(p.w.at(first + k, j));
        dx_want.push_back(v);
      }
    }
    EXPECT_LT(moekit_test::rel_error(z, z_want), 1e-5);
    EXPECT_LT(moekit_test::rel_error(p.dx.values(), dx_want), 1e-5);
    EXPECT_LT(moekit_test::rel_error(p.dw.values(), dw_want), 1e-5);
    EXPECT_LT(moekit_test::rel_error(to_double(p.db), db_want), 1e-5);
    const double vs_fp32 = moekit_test::rel_error(z, z_fp32);
    EXPECT_LT(vs_fp32, 1e-2);
    EXPECT_GT(vs_fp32, 0.0);  // the operands were rounded
    EXPECT_LT(moekit_test::rel_error(p.dw.values(), fp32.dw.values()), 1e-2);
    EXPECT_LT(moekit_test::rel_error(p.dx.values(), fp32.dx.values()), 1e-2);
    EXPECT_TRUE(p.logits.padding_untouched());
    EXPECT_TRUE(p.dx.padding_untouched());
    EXPECT_TRUE(p.dw.padding_untouched());
    // Task 1 has no rows: its gradient blocks are zero.
    for (index_t k = 0; k < 3; ++k) EXPECT_EQ(p.db[to_size(heads.class_offset(1) + k)], 0.0f);
    std::printf("[ info ] bf16 heads on %s: logits within %.1e of fp32's\n", path.name.c_str(),
                vs_fp32);
  }
  p.config.compute = GemmDtype::kInt8;
  const std::string msg =
      moekit_test::expect_error([&] { TaskHeads<S> bad(p.config); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("config.compute = 2 must be kFloat32 or kBfloat16"), std::string::npos) << msg;
}

// Per-row predictions and losses against float64: the argmax over the row's
// own classes (not the padding) and its cross-entropy; their count of
// correct rows and mean give acc_h and L_h.
TEST(TaskHeads, PerRowPredictionsAndLosses) {
  using S = HeadSpec<3>;
  Problem<S> p({6, 3, 11}, 41, 9, make_tasks<3>(41, 4, false), 22);
  const TaskHeads<S> heads(p.config);
  heads.forward(p.x.cview(), p.task_view(), p.weights(), p.logits.view(), p.workspace());
  std::vector<std::int32_t> predicted(41, -5);
  std::vector<double> loss(41, std::numeric_limits<double>::quiet_NaN());
  const TaskLosses<S> l = heads.loss(p.logits.cview(), p.task_view(), p.label_view(), {}, {}, {},
                                     {{predicted.data(), 41}, {loss.data(), 41}});
  std::array<double, 3> sum{}, correct{};
  const MatrixView<const float> z = p.logits.cview();
  for (index_t i = 0; i < 41; ++i) {
    const auto u = to_size(i);
    const std::size_t h = to_size(p.task(i));
    const index_t c = p.config.classes[h];
    index_t best = 0;
    double lse = 0.0, max = z(i, 0);
    for (index_t k = 1; k < c; ++k) {
      if (z(i, k) > z(i, best)) best = k;
      max = std::max(max, static_cast<double>(z(i, k)));
    }
    for (index_t k = 0; k < c; ++k) lse += std::exp(static_cast<double>(z(i, k)) - max);
    const double ce = max + std::log(lse) - z(i, p.labels[u]);
    EXPECT_EQ(predicted[u], best) << i;
    EXPECT_NEAR(loss[u], ce, 1e-6 * std::max(1.0, ce)) << i;
    sum[h] += loss[u];
    correct[h] += predicted[u] == p.labels[u] ? 1.0 : 0.0;
  }
  for (std::size_t h = 0; h < 3; ++h) {
    const auto count = static_cast<double>(l.count[h]);
    EXPECT_NEAR(sum[h] / count, l.loss[h], 1e-12 * std::max(1.0, l.loss[h]));
    EXPECT_EQ(correct[h] / count, l.accuracy[h]);
  }
  const std::string msg = moekit_test::expect_error(
      [&] {
        heads.loss(p.logits.cview(), p.task_view(), p.label_view(), {}, {}, {},
                   {.predicted = {predicted.data(), 40}});
      },
      Errc::kShapeMismatch);
  EXPECT_EQ(msg.rfind("moekit::cpu::TaskHeads::loss: rows.predicted", 0), 0u) << msg;
}

TEST(TaskHeads, ZeroRows) {
  using S = HeadSpec<3>;
  Problem<S> p({6, 3, 11}, 0, 7, {}, 21);
  const TaskHeads<S> heads(p.config);
  heads.forward(p.x.cview(), p.task_view(), p.weights(), p.logits.view(), p.workspace());
  const TaskLosses<S> l = heads.loss(p.logits.cview(), p.task_view(), p.label_view(),
                                     p.weighting(TaskWeighting::kUncertainty), p.dlogits.view(),
                                     {p.dlog_vars.data(), 3});
  EXPECT_EQ(l.total, 0.0);
  for (float v : p.dlog_vars) EXPECT_EQ(v, 0.0f);
  heads.backward(p.dlogits.cview(), p.x.cview(), p.task_view(), p.weights(), p.dx.view(), p.grads(),
                 p.workspace());
  EXPECT_FALSE(p.dw.any_nan());  // every head empty: zero blocks
  for (float v : p.db) EXPECT_EQ(v, 0.0f);
}

// ---- bad input ------------------------------------------------------------------------

TEST(TaskHeadsBadInput, ConfigurationIsRejectedNamingTheField) {
  using S = HeadSpec<3>;
  using Config = moekit::cpu::TaskHeadsConfig<S>;
  EXPECT_NE(moekit_test::expect_error(
                [] {
                  TaskHeads<S>(Config{.d_model = 0, .classes = {1, 2, 3}});
                },
                Errc::kInvalidArgument)
                .find("config.d_model = 0 must be at least 1"),
            std::string::npos);
  EXPECT_NE(moekit_test::expect_error(
                [] {
                  TaskHeads<S>(Config{.d_model = 4, .classes = {1, 0, 3}});
                },
                Errc::kInvalidArgument)
                .find("config.classes[1] = 0 must be at least 1"),
            std::string::npos);
}

TEST(TaskHeadsBadInput, RejectedWithNamedValuesAndNothingWritten) {
  using S = HeadSpec<3>;
  Problem<S> p({6, 3, 11}, 20, 5, make_tasks<3>(20, 22, false), 23);
  const TaskHeads<S> heads(p.config);
  // Good logits and dlogits to start from; every failing call must leave all outputs as they are.
  heads.forward(p.x.cview(), p.task_view(), p.weights(), p.logits.view(), p.workspace());
  heads.loss(p.logits.cview(), p.task_view(), p.label_view(), {}, p.dlogits.view());
  p.dx.fill(1.5f);
  p.dw.fill(2.5f);
  std::fill(p.db.begin(), p.db.end(), 3.5f);
  std::fill(p.dlog_vars.begin(), p.dlog_vars.end(), 4.5f);
  StridedMatrix out_logits(p.n, p.maxc, 3), out_dlogits(p.n, p.maxc, 1);
  out_logits.fill(-7.0f);
  out_dlogits.fill(-8.0f);
  const StridedMatrix logits0 = out_logits, dlogits0 = out_dlogits, dx0 = p.dx, dw0 = p.dw;
  const std::vector<float> db0 = p.db, dlv0 = p.dlog_vars;

  std::vector<std::int32_t> bad_task = p.tasks, neg_task = p.tasks, bad_label = p.labels;
  bad_task[7] = 3;
  neg_task[2] = -1;
  // Row 4's label: one past its task's class count.
  bad_label[4] = static_cast<std::int32_t>(p.config.classes[to_size(p.task(4))]);
  const std::string label_msg = "labels[4] = " + std::to_string(bad_label[4]) + " is outside [0, " +
                                std::to_string(p.config.classes[to_size(p.task(4))]) +
                                ") (classes of task " + std::to_string(p.task(4)) + ")";
  std::vector<float> nan_fixed = p.fixed, neg_fixed = p.fixed, inf_lv = p.log_vars;
  nan_fixed[1] = kNaN;
  neg_fixed[2] = -1.0f;
  inf_lv[0] = kInf;
  const VectorView<const std::int32_t> tv = p.task_view(), lv = p.label_view();
  const HeadWeights wts = p.weights();
  auto fwd = [&](VectorView<const std::int32_t> t, HeadWeights w, VectorView<std::byte> ws) {
    heads.forward(p.x.cview(), t, w, out_logits.view(), ws);
  };
  auto loss = [&](VectorView<const std::int32_t> t, VectorView<const std::int32_t> l,
                  TaskWeights tw, VectorView<float> dlv) {
    heads.loss(p.logits.cview(), t, l, tw, out_dlogits.view(), dlv);
  };
  auto bwd = [&](MatrixView<const float> dl, HeadGrads g) {
    heads.backward(dl, p.x.cview(), tv, wts, p.dx.view(), g, p.workspace());
  };
  const VectorView<float> dlv_ok(p.dlog_vars.data(), 3);
  std::vector<std::byte> big_ws(p.ws.size() + 16);  // new[]: aligned; + 1 is not
  struct Case {
    const char* what;
    Errc code;
    std::string message;
    std::function<void()> call;
  };
  const std::vector<Case> cases = {
      {"task too large (forward)", Errc::kOutOfRange, "tasks[7] = 3 is outside [0, H = 3)",
       [&] {
         fwd({bad_task.data(), p.n}, wts, p.workspace());
       }},
      {"task negative (loss)", Errc::kOutOfRange, "tasks[2] = -1 is outside [0, H = 3)",
       [&] {
         loss({neg_task.data(), p.n}, lv, {}, {});
       }},
      {"task too large (backward)", Errc::kOutOfRange, "tasks[7] = 3",
       [&] {
         heads.backward(p.dlogits.cview(), p.x.cview(), {bad_task.data(), p.n}, wts, p.dx.view(),
                        p.grads(), p.workspace());
       }},
      {"tasks empty with H = 3", Errc::kShapeMismatch, "tasks has 0 elements, expected 20",
       [&] { fwd({}, wts, p.workspace()); }},
      {"label out of range", Errc::kOutOfRange, label_msg,
       [&] {
         loss(tv, {bad_label.data(), p.n}, {}, {});
       }},
      {"labels short", Errc::kShapeMismatch, "labels has 19 elements, expected 20",
       [&] {
         loss(tv, {p.labels.data(), p.n - 1}, {}, {});
       }},
      {"x width", Errc::kShapeMismatch, "x is 20 x 4, expected 20 x 5",
       [&] {
         heads.forward({p.x.data.data(), p.n, 4, p.x.ld}, tv, wts, out_logits.view(),
                       p.workspace());
       }},
      {"w rows", Errc::kShapeMismatch, "weights.w is 19 x 5, expected 20 x 5",
       [&] {
         fwd(tv, {p.w.cview().middle_rows(0, 19), wts.b}, p.workspace());
       }},
      {"bias missing", Errc::kShapeMismatch, "weights.b has 0 elements, expected 20",
       [&] {
         fwd(tv, {wts.w, {}}, p.workspace());
       }},
      {"logits width", Errc::kShapeMismatch, "logits is 20 x 10, expected 20 x 11",
       [&] {
         heads.forward(p.x.cview(), tv, wts, out_logits.view().block(0, 0, p.n, 10), p.workspace());
       }},
      {"workspace small", Errc::kShapeMismatch, "workspace has 10 bytes",
       [&] {
         fwd(tv, wts, {p.ws.data(), 10});
       }},
      {"workspace misaligned", Errc::kInvalidArgument, "workspace is not aligned",
       [&] {
         fwd(tv, wts, {big_ws.data() + 1, static_cast<index_t>(p.ws.size())});
       }},
      {"workspace null", Errc::kNullPointer, "workspace is null",
       [&] {
         fwd(tv, wts, {nullptr, static_cast<index_t>(p.ws.size())});
       }},
      {"fixed weight NaN", Errc::kInvalidArgument, "weighting.fixed[1] = nan",
       [&] {
         loss(tv, lv, {TaskWeighting::kFixed, {nan_fixed.data(), 3}, {}}, {});
       }},
      {"fixed weight negative", Errc::kInvalidArgument, "weighting.fixed[2] = -1",
       [&] {
         loss(tv, lv, {TaskWeighting::kFixed, {neg_fixed.data(), 3}, {}}, {});
       }},
      {"fixed weight count", Errc::kShapeMismatch, "weighting.fixed has 2 elements, expected 3",
       [&] {
         loss(tv, lv, {TaskWeighting::kFixed, {p.fixed.data(), 2}, {}}, {});
       }},
      {"dlog_vars with kFixed", Errc::kInvalidArgument, "must be empty for TaskWeighting::kFixed",
       [&] { loss(tv, lv, {}, dlv_ok); }},
      {"log_vars missing", Errc::kShapeMismatch, "weighting.log_vars has 0 elements, expected 3",
       [&] {
         loss(tv, lv, {TaskWeighting::kUncertainty, {}, {}}, dlv_ok);
       }},
      {"log_var infinite", Errc::kInvalidArgument, "weighting.log_vars[0] = inf is not finite",
       [&] {
         loss(tv, lv, {TaskWeighting::kUncertainty, {}, {inf_lv.data(), 3}}, dlv_ok);
       }},
      {"weighting kind", Errc::kInvalidArgument, "weighting.kind = 9 is not a TaskWeighting",
       [&] {
         loss(tv, lv, {static_cast<TaskWeighting>(9), {}, {}}, {});
       }},
      {"dlogits shape (loss)", Errc::kShapeMismatch, "dlogits is 19 x 11, expected 20 x 11",
       [&] { heads.loss(p.logits.cview(), tv, lv, {}, out_dlogits.view().middle_rows(0, 19)); }},
      {"dlogits shape (backward)", Errc::kShapeMismatch, "dlogits is 20 x 10, expected 20 x 11",
       [&] { bwd(p.dlogits.cview().block(0, 0, p.n, 10), p.grads()); }},
      {"dw shape", Errc::kShapeMismatch, "grads.dw is 20 x 4, expected 20 x 5",
       [&] {
         bwd(p.dlogits.cview(), {p.dw.view().block(0, 0, p.total, 4), {}, false});
       }},
      {"db shape", Errc::kShapeMismatch, "grads.db has 3 elements, expected 20",
       [&] {
         bwd(p.dlogits.cview(), {{}, {p.db.data(), 3}, false});
       }},
      {"dx shape", Errc::kShapeMismatch, "dx is 20 x 4, expected 20 x 5",
       [&] {
         heads.backward(p.dlogits.cview(), p.x.cview(), tv, wts, p.dx.view().block(0, 0, p.n, 4),
                        p.grads(), p.workspace());
       }},
  };
  for (const Case& c : cases) {
    const std::string msg = moekit_test::expect_error(c.call, c.code);
    EXPECT_NE(msg.find(c.message), std::string::npos) << c.what << ": " << msg;
    EXPECT_TRUE(out_logits.bits_equal(logits0)) << c.what << " wrote to logits";
    EXPECT_TRUE(out_dlogits.bits_equal(dlogits0)) << c.what << " wrote to dlogits";
    EXPECT_TRUE(p.dx.bits_equal(dx0)) << c.what << " wrote to dx";
    EXPECT_TRUE(p.dw.bits_equal(dw0)) << c.what << " wrote to dw";
    EXPECT_EQ(p.db, db0) << c.what << " wrote to db";
    EXPECT_EQ(p.dlog_vars, dlv0) << c.what << " wrote to dlog_vars";
  }
}

TEST(TaskHeadsBadInput, BiasViewsMustBeEmptyWithoutBias) {
  using S = HeadSpec<2>;
  Problem<S> p({3, 4}, 10, 5, make_tasks<2>(10, 24, false), 25, /*bias=*/false);
  const TaskHeads<S> heads(p.config);
  std::vector<float> b(7, 0.0f), db(7, 9.0f);
  EXPECT_NE(moekit_test::expect_error(
                [&] {
                  heads.forward(p.x.cview(), p.task_view(), {p.w.cview(), {b.data(), 7}},
                                p.logits.view(), p.workspace());
                },
                Errc::kInvalidArgument)
                .find("weights.b has 7 elements but must be empty: config.bias is false"),
            std::string::npos);
  EXPECT_NE(moekit_test::expect_error(
                [&] {
                  heads.backward(p.dlogits.cview(), p.x.cview(), p.task_view(), p.weights(), {},
                                 {{}, {db.data(), 7}, false}, p.workspace());
                },
                Errc::kInvalidArgument)
                .find("grads.db has 7 elements but must be empty"),
            std::string::npos);
  EXPECT_TRUE(std::all_of(db.begin(), db.end(), [](float v) { return v == 9.0f; }));
}

}  // namespace
