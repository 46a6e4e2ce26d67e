// Knowledge distillation (moekit/cpu/distillation.hpp) against a float64
// reference written here from docs/math.md, its gradient against the
// analytic float64 formula and central finite differences of the reference
// (T = 1, 2, 4 and a = 0, 0.5, 1), numerical stability at huge logits,
// determinism across thread counts, strided views and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "expect_error.hpp"
#include "moekit/cpu/distillation.hpp"
#include "routing_reference.hpp"
#include "strided_matrix.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using moekit::Errc;
using moekit::index_t;
using moekit::MatrixView;
using moekit::VectorView;
using moekit::cpu::distillation_loss;
using moekit::cpu::DistillationConfig;
using moekit::cpu::DistillationLoss;
using moekit_test::rel_error;
using moekit_test::StridedMatrix;

constexpr double kNaN64 = std::numeric_limits<double>::quiet_NaN();

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr double kFdStep = 1e-5;

struct Batch {
  index_t n = 0, c = 0;
  StridedMatrix student, teacher, grad;
  std::vector<std::int32_t> labels;

  Batch(index_t rows, index_t classes, std::uint32_t seed, float scale = 2.0f)
      : n(rows),
        c(classes),
        student(rows, classes, 3),
        teacher(rows, classes, 1),
        grad(rows, classes, 2) {
    std::mt19937 rng(seed);
    student.randomize(rng, scale);
    teacher.randomize(rng, scale);
    grad.poison();
    std::uniform_int_distribution<std::int32_t> label(0, static_cast<std::int32_t>(classes) - 1);
    for (index_t i = 0; i < rows; ++i) labels.push_back(label(rng));
  }
  VectorView<const std::int32_t> label_view() const { return {labels.data(), n}; }
};

// ---- float64 reference --------------------------------------------------------------

// log softmax(z / T) about the maximum, so nothing underflows to log(0).
std::vector<double> log_softmax(const double* z, index_t n, double inv_t) {
  double m = z[0];
  for (index_t i = 1; i < n; ++i) m = std::max(m, z[i]);
  double sum = 0.0;
  for (index_t i = 0; i < n; ++i) sum += std::exp((z[i] - m) * inv_t);
  std::vector<double> out(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i)
    out[static_cast<std::size_t>(i)] = (z[i] - m) * inv_t - std::log(sum);
  return out;
}

struct RefKd {
  double loss = 0, kl = 0, ce = 0;
  std::vector<double> grad;  // analytic dL/ds, n x c
};

RefKd ref_kd(const std::vector<double>& s, const std::vector<double>& t,
             const std::vector<std::int32_t>& labels, index_t n, index_t c, double temp,
             double alpha) {
  RefKd out;
  out.grad.assign(s.size(), 0.0);
  for (index_t i = 0; i < n; ++i) {
    const double* si = &s[static_cast<std::size_t>(i * c)];
    const double* ti = &t[static_cast<std::size_t>(i * c)];
    const std::vector<double> lp = log_softmax(ti, c, 1.0 / temp),
                              lq = log_softmax(si, c, 1.0 / temp), lr = log_softmax(si, c, 1.0);
    std::vector<double> p(lp.size()), q(lq.size()), r(lr.size());
    double kl = 0.0;
    for (std::size_t j = 0; j < lp.size(); ++j) {
      p[j] = std::exp(lp[j]);
      q[j] = std::exp(lq[j]);
      r[j] = std::exp(lr[j]);
      kl += p[j] * (lp[j] - lq[j]);
    }
    const int y = labels[static_cast<std::size_t>(i)];
    const double ce = alpha < 1.0 ? -lr[static_cast<std::size_t>(y)] : 0.0;
    out.kl += kl;
    out.ce += ce;
    for (index_t k = 0; k < c; ++k) {
      const std::size_t j = static_cast<std::size_t>(k);
      out.grad[static_cast<std::size_t>(i * c + k)] =
          (alpha * temp * (q[j] - p[j]) + (1.0 - alpha) * (r[j] - (k == y ? 1.0 : 0.0))) /
          static_cast<double>(n);
    }
  }
  out.kl /= static_cast<double>(n);
  out.ce /= static_cast<double>(n);
  out.loss = alpha * temp * temp * out.kl + (1.0 - alpha) * out.ce;
  return out;
}

std::vector<double> fd_grad(std::vector<double> s, const std::vector<double>& t,
                            const std::vector<std::int32_t>& labels, index_t n, index_t c,
                            double temp, double alpha) {
  std::vector<double> g(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    const double keep = s[i];
    s[i] = keep + kFdStep;
    const double up = ref_kd(s, t, labels, n, c, temp, alpha).loss;
    s[i] = keep - kFdStep;
    const double down = ref_kd(s, t, labels, n, c, temp, alpha).loss;
    s[i] = keep;
    g[i] = (up - down) / (2.0 * kFdStep);
  }
  return g;
}

double rel(double out, double ref) { return std::abs(out - ref) / std::max(1e-12, std::abs(ref)); }

// ---- tests ---------------------------------------------------------------------------

TEST(Distillation, MatchesFloat64ReferenceAndFiniteDifferences) {
  std::uint32_t seed = 1;
  for (float temp : {1.0f, 2.0f, 4.0f}) {
    for (float alpha : {0.0f, 0.5f, 1.0f}) {
      SCOPED_TRACE(::testing::Message() << "T = " << temp << ", a = " << alpha);
      Batch b(24, 9, ++seed);
      const DistillationLoss got =
          distillation_loss({.temperature = temp, .alpha = alpha}, b.student.cview(),
                            b.teacher.cview(), b.label_view(), b.grad.view());
      const std::vector<double> s = b.student.values(), t = b.teacher.values();
      const RefKd ref = ref_kd(s, t, b.labels, b.n, b.c, temp, alpha);
      EXPECT_LT(rel(got.loss, ref.loss), 1e-6) << got.loss << " vs " << ref.loss;
      EXPECT_LT(rel(got.kl, ref.kl), 1e-5) << got.kl << " vs " << ref.kl;
      if (alpha < 1.0f) {
        EXPECT_LT(rel(got.ce, ref.ce), 1e-6);
      } else {
        EXPECT_EQ(got.ce, 0.0);
      }
      EXPECT_LT(rel_error(b.grad.values(), ref.grad), 1e-5);
      EXPECT_LT(rel_error(b.grad.values(), fd_grad(s, t, b.labels, b.n, b.c, temp, alpha)), 1e-5);
      EXPECT_TRUE(b.grad.padding_untouched());
      EXPECT_TRUE(b.student.padding_untouched());
    }
  }
}

// Per-row L_i, KL_i and CE_i against float64, their mean is the batch's, and
// a row's values do not depend on the rest of the batch.
TEST(Distillation, PerRowValues) {
  for (float alpha : {0.0f, 0.3f, 1.0f}) {
    SCOPED_TRACE(::testing::Message() << "a = " << alpha);
    const float temp = 2.0f;
    Batch b(19, 7, 40 + static_cast<std::uint32_t>(alpha * 10));
    const index_t n = b.n;
    std::vector<double> loss(19, kNaN64), kl(19, kNaN64), ce(19, kNaN64);
    const DistillationLoss got = distillation_loss(
        {.temperature = temp, .alpha = alpha}, b.student.cview(), b.teacher.cview(), b.label_view(),
        {}, {{loss.data(), n}, {kl.data(), n}, {ce.data(), n}});
    const std::vector<double> s = b.student.values(), t = b.teacher.values();
    double mean = 0.0;
    for (index_t i = 0; i < n; ++i) {
      const auto u = static_cast<std::size_t>(i);
      const auto row = [&](const std::vector<double>& v) {
        return std::vector<double>(v.begin() + i * b.c, v.begin() + (i + 1) * b.c);
      };
      const RefKd ref = ref_kd(row(s), row(t), {b.labels[u]}, 1, b.c, temp, alpha);
      EXPECT_LT(rel(loss[u], ref.loss), 1e-6) << i;
      EXPECT_LT(rel(kl[u], ref.kl), 1e-5) << i;
      EXPECT_LT(rel(ce[u], ref.ce), 1e-6) << i;
      mean += loss[u];
      double alone = kNaN64;
      distillation_loss({.temperature = temp, .alpha = alpha}, b.student.cview().middle_rows(i, 1),
                        b.teacher.cview().middle_rows(i, 1), {&b.labels[u], 1}, {},
                        {.loss = {&alone, 1}});
      EXPECT_EQ(alone, loss[u]) << "row " << i << " depends on the batch";
    }
    EXPECT_LT(rel(mean / static_cast<double>(n), got.loss), 1e-12);
  }
  Batch b(3, 4, 9);
  std::vector<double> short_rows(2);
  const std::string msg = moekit_test::expect_error(
      [&] {
        distillation_loss({.temperature = 1.0f, .alpha = 0.5f}, b.student.cview(),
                          b.teacher.cview(), b.label_view(), {}, {.kl = {short_rows.data(), 2}});
      },
      Errc::kShapeMismatch);
  EXPECT_EQ(msg.rfind("moekit::cpu::distillation_loss: rows.kl", 0), 0u) << msg;
}

TEST(Distillation, AlphaOneNeedsNoLabels) {
  Batch b(10, 5, 11);
  StridedMatrix g2 = b.grad;
  const DistillationLoss with =
      distillation_loss({.temperature = 3.0f, .alpha = 1.0f}, b.student.cview(), b.teacher.cview(),
                        b.label_view(), b.grad.view());
  const DistillationLoss without = distillation_loss(
      {.temperature = 3.0f, .alpha = 1.0f}, b.student.cview(), b.teacher.cview(), {}, g2.view());
  EXPECT_EQ(with.loss, without.loss);
  EXPECT_TRUE(b.grad.bits_equal(g2));
}

TEST(Distillation, IdenticalStudentAndTeacherGiveZeroSoftLoss) {
  Batch b(16, 12, 12);
  const DistillationLoss kd =
      distillation_loss({.temperature = 2.0f, .alpha = 1.0f}, b.student.cview(), b.student.cview(),
                        {}, b.grad.view());
  EXPECT_LT(kd.loss, 1e-6);
  for (double g : b.grad.values()) EXPECT_LT(std::abs(g), 1e-7);
}

TEST(Distillation, StableAtHugeLogits) {
  // Logits in the thousands: exp without the max shift would overflow.
  Batch b(12, 7, 13, 3000.0f);
  for (float alpha : {0.0f, 0.5f, 1.0f}) {
    const DistillationLoss got =
        distillation_loss({.temperature = 4.0f, .alpha = alpha}, b.student.cview(),
                          b.teacher.cview(), b.label_view(), b.grad.view());
    ASSERT_TRUE(std::isfinite(got.loss));
    EXPECT_FALSE(b.grad.any_nan());
    const RefKd ref =
        ref_kd(b.student.values(), b.teacher.values(), b.labels, b.n, b.c, 4.0, alpha);
    EXPECT_LT(rel(got.loss, ref.loss), 1e-5);
    EXPECT_LT(rel_error(b.grad.values(), ref.grad), 1e-5);
  }
}

// TaskHeads pads a head with fewer classes with -inf logits (on both student
// and teacher): a padded class has p = q = 0 and must add exactly nothing,
// so a 3-class row padded to 5 gives the 3-class KL, not 0 * (-inf + inf).
TEST(Distillation, MinusInfPaddingAddsNothing) {
  Batch b(9, 3, 21, 0.05f);  // close logits: a small KL that a clamp to 0 would hide
  for (const float alpha : {0.5f, 1.0f}) {
    StridedMatrix s5(b.n, 5, 1), t5(b.n, 5, 2), g5(b.n, 5, 1);
    s5.fill(-kInf);
    t5.fill(-kInf);
    for (index_t i = 0; i < b.n; ++i) {
      for (index_t k = 0; k < 3; ++k) {
        s5.view()(i, k) = b.student.cview()(i, k);
        t5.view()(i, k) = b.teacher.cview()(i, k);
      }
    }
    g5.poison();
    const DistillationConfig cfg{.temperature = 2.0f, .alpha = alpha};
    const DistillationLoss three =
        distillation_loss(cfg, b.student.cview(), b.teacher.cview(), b.label_view(), b.grad.view());
    const DistillationLoss five =
        distillation_loss(cfg, s5.cview(), t5.cview(), b.label_view(), g5.view());
    const RefKd ref = ref_kd(b.student.values(), b.teacher.values(), b.labels, b.n, 3, 2.0, alpha);
    ASSERT_GT(ref.kl, 0.0);
    EXPECT_LT(rel(five.kl, ref.kl), 1e-4) << five.kl << " vs " << ref.kl;
    EXPECT_EQ(five.kl, three.kl);
    EXPECT_EQ(five.loss, three.loss);
    for (index_t i = 0; i < b.n; ++i) {
      for (index_t k = 0; k < 5; ++k) {
        const float want = k < 3 ? b.grad.cview()(i, k) : 0.0f;
        EXPECT_EQ(g5.cview()(i, k), want) << "row " << i << ", class " << k;
      }
    }
  }
}

// The documented rule: a non-finite teacher or student gives a non-finite
// loss (never a finite one beside a NaN gradient).
TEST(Distillation, NonFiniteLogitsGiveNonFiniteLoss) {
  for (const float bad : {kNaN, kInf}) {
    for (const bool in_teacher : {true, false}) {
      for (const float alpha : {0.5f, 1.0f}) {
        SCOPED_TRACE(::testing::Message()
                     << "value " << bad << (in_teacher ? " in teacher" : " in student")
                     << ", a = " << alpha);
        Batch b(4, 6, 22);
        (in_teacher ? b.teacher : b.student).view()(2, 4) = bad;
        const DistillationLoss got =
            distillation_loss({.temperature = 2.0f, .alpha = alpha}, b.student.cview(),
                              b.teacher.cview(), b.label_view(), b.grad.view());
        EXPECT_FALSE(std::isfinite(got.loss)) << got.loss;
        EXPECT_FALSE(std::isfinite(got.kl)) << got.kl;
      }
    }
  }
}

TEST(Distillation, ValueOnlyAndZeroRows) {
  Batch b(8, 4, 14);
  const DistillationLoss a =
      distillation_loss({}, b.student.cview(), b.teacher.cview(), b.label_view(), b.grad.view());
  const DistillationLoss v =
      distillation_loss({}, b.student.cview(), b.teacher.cview(), b.label_view());
  EXPECT_EQ(a.loss, v.loss);
  Batch empty(0, 4, 15);
  const DistillationLoss z = distillation_loss({}, empty.student.cview(), empty.teacher.cview(),
                                               empty.label_view(), empty.grad.view());
  EXPECT_EQ(z.loss, 0.0);
}

TEST(Distillation, BitIdenticalAcrossRunsAndThreadCounts) {
  Batch b(700, 120, 16);  // n c above the parallel grain
  StridedMatrix g1 = b.grad, g2 = b.grad;
  const DistillationConfig cfg{.temperature = 2.0f, .alpha = 0.3f};
  const DistillationLoss first =
      distillation_loss(cfg, b.student.cview(), b.teacher.cview(), b.label_view(), g1.view());
  const DistillationLoss again =
      distillation_loss(cfg, b.student.cview(), b.teacher.cview(), b.label_view(), g2.view());
  EXPECT_EQ(first.loss, again.loss);
  EXPECT_TRUE(g1.bits_equal(g2));
#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  StridedMatrix g3 = b.grad;
  const DistillationLoss serial =
      distillation_loss(cfg, b.student.cview(), b.teacher.cview(), b.label_view(), g3.view());
  omp_set_num_threads(threads);
  EXPECT_EQ(first.loss, serial.loss);
  EXPECT_TRUE(g1.bits_equal(g3));
#endif
}

TEST(DistillationBadInput, RejectedWithNamedValuesAndNothingWritten) {
  Batch b(6, 5, 17);
  b.grad.fill(0.5f);
  const StridedMatrix grad0 = b.grad;
  std::vector<std::int32_t> bad = b.labels;
  bad[3] = 5;
  std::vector<std::int32_t> neg = b.labels;
  neg[1] = -2;
  const auto s = b.student.cview(), t = b.teacher.cview();
  const auto lv = b.label_view();
  const auto g = b.grad.view();
  struct Case {
    const char* what;
    Errc code;
    std::string message;
    std::function<void()> call;
  };
  const std::vector<Case> cases = {
      {"T zero", Errc::kInvalidArgument, "config.temperature = 0 must be finite and positive",
       [&] { distillation_loss({.temperature = 0.0f}, s, t, lv, g); }},
      {"T negative", Errc::kInvalidArgument, "config.temperature = -1",
       [&] { distillation_loss({.temperature = -1.0f}, s, t, lv, g); }},
      {"T NaN", Errc::kInvalidArgument, "config.temperature = nan",
       [&] { distillation_loss({.temperature = kNaN}, s, t, lv, g); }},
      {"T inf", Errc::kInvalidArgument, "config.temperature = inf",
       [&] { distillation_loss({.temperature = kInf}, s, t, lv, g); }},
      {"alpha above 1", Errc::kInvalidArgument, "config.alpha = 1.5 must be in [0, 1]",
       [&] { distillation_loss({.alpha = 1.5f}, s, t, lv, g); }},
      {"alpha negative", Errc::kInvalidArgument, "config.alpha = -0.25",
       [&] { distillation_loss({.alpha = -0.25f}, s, t, lv, g); }},
      {"alpha NaN", Errc::kInvalidArgument, "config.alpha = nan",
       [&] { distillation_loss({.alpha = kNaN}, s, t, lv, g); }},
      {"teacher shape", Errc::kShapeMismatch, "teacher is 6 x 4, expected 6 x 5",
       [&] { distillation_loss({}, s, t.block(0, 0, 6, 4), lv, g); }},
      {"label too large", Errc::kOutOfRange, "labels[3] = 5 is outside [0, C = 5)",
       [&] {
         distillation_loss({}, s, t, {bad.data(), 6}, g);
       }},
      {"label negative (alpha 1 still checks given labels)", Errc::kOutOfRange,
       "labels[1] = -2 is outside [0, C = 5)",
       [&] {
         distillation_loss({.alpha = 1.0f}, s, t, {neg.data(), 6}, g);
       }},
      {"labels missing", Errc::kShapeMismatch, "labels has 0 elements, expected 6",
       [&] { distillation_loss({.alpha = 0.5f}, s, t, {}, g); }},
      {"dstudent shape", Errc::kShapeMismatch, "dstudent is 5 x 5, expected 6 x 5",
       [&] { distillation_loss({}, s, t, lv, g.middle_rows(0, 5)); }},
      {"no classes", Errc::kShapeMismatch, "student is 6 x 0: at least one class is needed",
       [&] { distillation_loss({}, s.block(0, 0, 6, 0), t.block(0, 0, 6, 0), lv, {}); }},
      {"student null", Errc::kNullPointer, "student is null",
       [&] {
         distillation_loss({}, {static_cast<const float*>(nullptr), 6, 5}, t, lv, g);
       }},
  };
  for (const Case& c : cases) {
    const std::string msg = moekit_test::expect_error(c.call, c.code);
    EXPECT_NE(msg.find(c.message), std::string::npos) << c.what << ": " << msg;
    EXPECT_TRUE(b.grad.bits_equal(grad0)) << c.what << " wrote to dstudent";
  }
}

}  // namespace
