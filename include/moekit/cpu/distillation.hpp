#pragma once
// Knowledge distillation loss on the CPU backend (docs/math.md): a student's
// logits trained against a teacher's softened distribution and the labels.
//
// For row i of the student logits s_i and teacher logits t_i (n x C each),
// temperature T > 0 and mixing a in [0, 1]:
//   p_i = softmax(t_i / T),  q_i = softmax(s_i / T),  r_i = softmax(s_i)
//   L_i = a T^2 KL(p_i || q_i) + (1 - a) CE(y_i, r_i)
//   L   = (1 / n) sum_i L_i                          (mean over the batch)
//   dL/ds_i = (1 / n) (a T (q_i - p_i) + (1 - a) (r_i - onehot(y_i)))
// The T^2 keeps the soft term's gradient scale independent of T (Hinton et
// al. 2015). The teacher gets no gradient. Per-row math is
// classify::distillation_row's (core/classification.hpp, which CUDA runs):
// log-sum-exp about the row maximum, sums over classes in double; on the CPU
// vectorised (cpu::distillation_row, cpu/elementwise.hpp), the same bits on
// every CPU path, each row's terms and gradient independent of the batch
// (but for the 1 / n scale).
//
// Returns the mean loss L and, for monitoring, the mean KL(p || q) and mean CE
// (unscaled; ce = 0 when a = 1, where labels are not used and may be empty).
// dstudent (n x C) is overwritten with dL/ds unless empty; `rows` receives the
// per-row L_i, KL_i and CE_i (DistillationRows). n = 0 gives L = 0.
//
// Determinism: rows run in parallel in 64 fixed chunks whose double partial
// sums are added in order, so L is bit-identical for any thread count.
//
// Validation (before anything is written): temperature finite and > 0, alpha
// finite in [0, 1] (Errc::kInvalidArgument); student and teacher of the same
// shape with C >= 1 when n > 0 (kShapeMismatch); labels of n entries in
// [0, C) (kOutOfRange, naming the row and value), or empty when a = 1.
// Logit values are not checked: NaN or Inf gives a non-finite L. Strided
// views work; padding columns are never touched.
//
//   const DistillationLoss kd = distillation_loss({.temperature = 2.0f, .alpha = 0.5f},
//                                                  student, teacher, labels, dstudent);

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "moekit/core/classification.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/elementwise.hpp"
#include "moekit/cpu/parallel.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

using ::moekit::DistillationConfig;  // core/classification.hpp

using ::moekit::DistillationLoss;  // the means over the batch (formulas above)

// Per-row values, for per-example monitoring or weighting: L_i, KL(p_i || q_i)
// and CE(y_i, r_i) of the formulas above, n entries each; an empty view is
// not written. A row's values depend on that row only (not on the batch).
struct DistillationRows {
  VectorView<double> loss{};  // L_i
  VectorView<double> kl{};    // KL(p_i || q_i)
  VectorView<double> ce{};    // CE(y_i, r_i); 0 when a = 1
};

// The loss L (and its means and per-row parts) of the formulas at the top of
// this file; dstudent receives dL/ds unless empty.
inline DistillationLoss distillation_loss(const DistillationConfig& config,
                                          MatrixView<const float> student,
                                          MatrixView<const float> teacher,
                                          VectorView<const std::int32_t> labels,
                                          MatrixView<float> dstudent = {},
                                          const DistillationRows& rows = {}) {
  MOEKIT_API("cpu::distillation_loss");
  check_distillation_config(config);
  const float temp = config.temperature, alpha = config.alpha;
  check_view(student, "student");
  const index_t n = student.rows(), c = student.cols();
  MOEKIT_CHECK(n == 0 || c >= 1, Errc::kShapeMismatch, "student is ", n, " x ", c,
               ": at least one class is needed");
  check_shape(teacher, n, c, "teacher");
  const bool use_labels = alpha < 1.0f;
  if (use_labels || !labels.empty()) {
    check_shape(labels, n, "labels");
    for (index_t i = 0; i < n; ++i) {
      MOEKIT_CHECK(labels[i] >= 0 && labels[i] < c, Errc::kOutOfRange, "labels[", i,
                   "] = ", labels[i], " is outside [0, C = ", c, ")");
    }
  }
  if (!dstudent.empty()) check_shape(dstudent, n, c, "dstudent");
  if (!rows.loss.empty()) check_shape(rows.loss, n, "rows.loss");
  if (!rows.kl.empty()) check_shape(rows.kl, n, "rows.kl");
  if (!rows.ce.empty()) check_shape(rows.ce, n, "rows.ce");
  OverlapCheck("cpu::distillation_loss")
      .out({{dstudent, "dstudent"},
            {rows.loss, "rows.loss"},
            {rows.kl, "rows.kl"},
            {rows.ce, "rows.ce"}})
      .in({{student, "student"}, {teacher, "teacher"}, {labels, "labels"}})
      .check();
  DistillationLoss out;
  if (n == 0) return out;

  const float scale = static_cast<float>(1.0 / static_cast<double>(n));
  const double soft_weight = static_cast<double>(alpha) * temp * temp;
  const double hard_weight = 1.0 - static_cast<double>(alpha);
  constexpr int kChunks = 64;
  double kl_part[kChunks] = {}, ce_part[kChunks] = {};
  const index_t chunk = (n + kChunks - 1) / kChunks;
  MOEKIT_PARALLEL_FOR_IF(n * c > kParallelGrain)
  for (int k = 0; k < kChunks; ++k) {
    const index_t end = std::min(n, (k + 1) * chunk);
    for (index_t i = k * chunk; i < end; ++i) {
      const classify::DistillationTerms terms =
          distillation_row(student.row(i), teacher.row(i), c, use_labels ? labels[i] : 0, temp,
                           alpha, scale, dstudent.empty() ? nullptr : dstudent.row(i));
      kl_part[k] += terms.kl;
      ce_part[k] += terms.ce;
      if (!rows.loss.empty()) rows.loss[i] = soft_weight * terms.kl + hard_weight * terms.ce;
      if (!rows.kl.empty()) rows.kl[i] = terms.kl;
      if (!rows.ce.empty()) rows.ce[i] = terms.ce;
    }
  }
  for (int k = 0; k < kChunks; ++k) {
    out.kl += kl_part[k];
    out.ce += ce_part[k];
  }
  out.kl /= static_cast<double>(n);
  out.ce /= static_cast<double>(n);
  out.loss = soft_weight * out.kl + hard_weight * out.ce;
  return out;
}

}  // namespace cpu
MOEKIT_NAMESPACE_END
