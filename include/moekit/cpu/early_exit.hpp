#pragma once
// Early exit on the CPU backend (docs/math.md, "Early exit"): exit classifiers after chosen
// layers decide per sample whether it leaves the batch; leavers' predictions
// are kept in the batch's original order and the rest are compacted for the
// next layer. Also the weighted multi-exit training loss.
//
// Inference, for a batch of n samples and exits 0, 1, ..., num_exits - 1
// (each a classifier over the live rows, e.g. a TaskHeads<HeadSpec<1>>):
//
//   m = exits.begin(n, state, results);            // all n live, in order
//   for each layer: x = layer(x) (m rows)
//     if an exit follows it: logits = exit_classifier(x)       (m x C)
//       m = exits.step(i, logits, state, results, kept);       // decide, record
//       compact_rows(x, kept.segment(0, m));                   // survivors, in order
//
// step() computes for each live row the exit scores of its logits
// (classify::exit_scores: top1, confidence = max probability, top-2
// probability margin, entropy in nats) and lets the row exit when ANY rule of
// config.criteria passes (ExitCriteria, core/classification.hpp):
//   confidence >= min_confidence,  entropy <= max_entropy,
//   margin >= min_margin,          agree >= patience (patience > 0),
// where agree counts the consecutive exits, ending at this one, whose argmax
// equals the previous exit's (reset to 0 on a change; 0 at exit 0): patience
// p exits a row whose argmax was the same at exits i - p, ..., i. At the last
// exit (num_exits - 1) every live row exits. Rules use >= and <=, so
// min_confidence = 0 exits every row at the first exit, and min_confidence =
// 1 only a row whose float probability rounds to exactly 1. A row with NaN
// logits follows the non-finite rule of classify::exit_scores (NaN = -inf).
//
// Results (caller memory, n entries each, ORIGINAL order): a row that exits at
// exit i writes prediction = top1, confidence, exit = i at its original index;
// rows still live keep exit = -1 (begin() sets it). State (caller memory,
// capacity n, first m entries live): original index, previous argmax and
// agree counter of each live row; step() compacts it in place, stably.
// kept[j] (j < m') is the row, among this step's m, that becomes live row j:
// strictly increasing, so compact_rows can move activations in place.
//
// Training (multi_exit_loss): every sample runs through every exit, i = 0..k-1,
//   L_i = (1 / n) sum_r CE(z_{i,r}, y_r),    L = sum_i w_i L_i / sum_i w_i,
//   dL/dz_{i,r} = w_i / (n sum_i w_i) (softmax(z_{i,r}) - onehot(y_r)),
// with exit_weights w (k entries >= 0, positive sum) or, if empty, w_i = i + 1
// (deeper exits weigh more; w_i is the 1-based exit number). Sums in double,
// in order.
//
// Validation (every call, before anything is written): config (constructor:
// num_exits >= 1; min_confidence, min_margin in [0, 1] or +inf; max_entropy
// >= 0 or -inf; patience >= 0; NaN rejected); exit in [0, num_exits); shapes
// (results: three views of one size n; state views and kept with at least m
// entries; C >= 1 when m > 0); state.original strictly increasing in [0, n)
// and naming live samples only (results.exit = -1); kept rows strictly
// increasing in range; labels in [0, C) (Errc::kOutOfRange, naming row and
// value). Strided views work; padding columns are never touched.

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include "moekit/core/classification.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/elementwise.hpp"
#include "moekit/cpu/parallel.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

using ::moekit::EarlyExitConfig;  // core/classification.hpp

// Results and live-row state (moekit/core/classification.hpp, shared by the backends).
using ::moekit::ExitResults;
using ::moekit::ExitState;

// Early exit on the CPU: at each exit, the live samples whose logits pass
// the configured rules leave with their prediction, and `kept` lists the
// rows that go on to the next layers. Holds only the configuration.
class EarlyExit {
 public:
  // Rejects criteria that cannot be meant (naming the field and value).
  explicit EarlyExit(const EarlyExitConfig& config) : config_(config) {
    check_early_exit_config(config);
  }

  // The configuration, as constructed.
  const EarlyExitConfig& config() const { return config_; }

  // Starts a batch of n samples: every sample live, in order; results.exit
  // = -1 (prediction and confidence are written when a sample exits). Returns n.
  index_t begin(index_t n, ExitState state, ExitResults results) const {
    MOEKIT_API("cpu::EarlyExit::begin");
    MOEKIT_CHECK_GE(n, 0);
    check_exit_results(results, n);
    check_exit_state(state, n);
    OverlapCheck overlap("cpu::EarlyExit::begin");
    add_exit_outputs(overlap, state, results);
    overlap.check();
    for (index_t r = 0; r < n; ++r) {
      state.original[r] = r;
      state.previous[r] = -1;
      state.agree[r] = 0;
      results.exit[r] = -1;
    }
    return n;
  }

  // Decides at exit `exit` for the m = logits.rows() live rows (logits: m x C),
  // records the rows that exit and compacts the state; kept[0, m') receives the
  // rows that stay. Returns m', the rows still live.
  index_t step(int exit, MatrixView<const float> logits, ExitState state, ExitResults results,
               VectorView<index_t> kept) const {
    const index_t n = check_exit_step("cpu::EarlyExit::step", exit, config_.num_exits, logits,
                                      state, results, kept);
    const index_t m = logits.rows(), c = logits.cols();
    for (index_t r = 0; r < m; ++r) {
      const index_t k = state.original[r];
      MOEKIT_CHECK(k >= 0 && k < n, Errc::kOutOfRange, "state.original[", r, "] = ", k,
                   " is outside [0, n = ", n, ")");
      MOEKIT_CHECK(r == 0 || k > state.original[r - 1], Errc::kInvalidArgument,
                   "state.original is not increasing: state.original[", r - 1,
                   "] = ", state.original[r - 1], ", state.original[", r, "] = ", k);
      MOEKIT_CHECK(results.exit[k] == -1, Errc::kInvalidArgument, "live row ", r, " is sample ", k,
                   ", which already exited at exit ", results.exit[k]);
    }

    constexpr std::int32_t kMaxAgree = std::numeric_limits<std::int32_t>::max();  // saturates
    const bool last = exit == config_.num_exits - 1;
    const ExitCriteria criteria = config_.criteria;
    // Decide every row (parallel, disjoint writes: original indices are
    // distinct); kept[r] temporarily marks a row that stays with r, else -1.
    MOEKIT_PARALLEL_FOR_IF(m * c > kParallelGrain)
    for (index_t r = 0; r < m; ++r) {
      const classify::ExitScores s = classify::exit_scores(logits.row(r), c);
      const std::int32_t a = state.agree[r];
      const int agree = state.previous[r] != s.top1 ? 0 : (a < kMaxAgree ? a + 1 : a);
      if (last || classify::exit_passes(criteria, s, agree)) {
        const index_t k = state.original[r];
        results.prediction[k] = s.top1;
        results.confidence[k] = s.confidence;
        results.exit[k] = exit;
        kept[r] = -1;
      } else {
        state.previous[r] = s.top1;
        state.agree[r] = agree;
        kept[r] = r;
      }
    }
    // Stable compaction; writes go to index live <= r, already read.
    index_t live = 0;
    for (index_t r = 0; r < m; ++r) {
      if (kept[r] < 0) continue;
      state.original[live] = state.original[r];
      state.previous[live] = state.previous[r];
      state.agree[live] = state.agree[r];
      kept[live] = r;
      ++live;
    }
    return live;
  }

 private:
  EarlyExitConfig config_;
};

namespace detail {

// kept strictly increasing in [0, rows).
inline void check_kept(VectorView<const index_t> kept, index_t rows) {
  check_view(kept, "kept");
  MOEKIT_CHECK(kept.size() <= rows, Errc::kShapeMismatch, "kept has ", kept.size(),
               " entries but there are only ", rows, " rows");
  for (index_t j = 0; j < kept.size(); ++j) {
    MOEKIT_CHECK(kept[j] >= 0 && kept[j] < rows, Errc::kOutOfRange, "kept[", j, "] = ", kept[j],
                 " is outside [0, ", rows, ")");
    MOEKIT_CHECK(j == 0 || kept[j] > kept[j - 1], Errc::kInvalidArgument,
                 "kept is not increasing: kept[", j - 1, "] = ", kept[j - 1], ", kept[", j,
                 "] = ", kept[j]);
  }
}

}  // namespace detail

// Stream compaction in place: row kept[j] of x moves to row j, for j <
// kept.size() (kept strictly increasing, so rows only move up and none is
// overwritten before it is read). Rows from kept.size() on are left as they are.
template <class T>
void compact_rows(MatrixView<T> x, VectorView<const index_t> kept) {
  MOEKIT_API("cpu::compact_rows");
  check_view(x, "x");
  detail::check_kept(kept, x.rows());
  for (index_t j = 0; j < kept.size(); ++j) {
    if (kept[j] == j) continue;
    const T* src = x.row(kept[j]);
    T* dst = x.row(j);
    for (index_t col = 0; col < x.cols(); ++col) dst[col] = src[col];
  }
}

// The same for per-row values (labels, task ids, ...).
template <class T>
void compact_rows(VectorView<T> v, VectorView<const index_t> kept) {
  MOEKIT_API("cpu::compact_rows");
  check_view(v, "v");
  detail::check_kept(kept, v.size());
  for (index_t j = 0; j < kept.size(); ++j) v[j] = v[kept[j]];
}

// Out of place: dst row j = src row kept[j] (dst: kept.size() x cols).
template <class T>
void gather_rows(MatrixView<const T> src, VectorView<const index_t> kept, MatrixView<T> dst) {
  MOEKIT_API("cpu::gather_rows");
  check_view(src, "src");
  detail::check_kept(kept, src.rows());
  check_shape(dst, kept.size(), src.cols(), "dst");
  OverlapCheck("cpu::gather_rows").out({{dst, "dst"}}).in({{src, "src"}, {kept, "kept"}}).check();
  MOEKIT_PARALLEL_FOR_IF(kept.size() * src.cols() > kLightParallelGrain)
  for (index_t j = 0; j < kept.size(); ++j) {
    as_eigen(dst.row_view(j)) = as_eigen(src.row_view(kept[j]));
  }
}

// The weighted multi-exit loss (see the top of this file): logits[i] is exit
// i's n x C logits; labels n; exit_weights k entries or empty (w_i = i + 1).
// dlogits: empty (value only) or k views, each n x C (an empty one: that
// exit's gradient is not written). exit_losses: empty or k entries, receives
// L_i. Returns L.
inline double multi_exit_loss(std::span<const MatrixView<const float>> logits,
                              VectorView<const std::int32_t> labels,
                              VectorView<const float> exit_weights = {},
                              std::span<const MatrixView<float>> dlogits = {},
                              VectorView<double> exit_losses = {}) {
  MOEKIT_API("cpu::multi_exit_loss");
  const index_t k = static_cast<index_t>(logits.size());
  // The exits' views by signed exit index, like every other index here.
  const MatrixView<const float>* exit_logits = logits.data();
  const MatrixView<float>* exit_dlogits = dlogits.data();
  MOEKIT_CHECK_ARG(k >= 1, "logits holds no exits");
  check_view(logits[0], "logits[0]");
  const index_t n = logits[0].rows(), c = logits[0].cols();
  MOEKIT_CHECK(n == 0 || c >= 1, Errc::kShapeMismatch, "logits[0] is ", n, " x ", c,
               ": at least one class is needed");
  for (index_t i = 1; i < k; ++i) {
    MOEKIT_CHECK(exit_logits[i].rows() == n && exit_logits[i].cols() == c, Errc::kShapeMismatch,
                 "logits[", i, "] is ", exit_logits[i].rows(), " x ", exit_logits[i].cols(),
                 ", expected ", n, " x ", c, " like logits[0]");
    check_view(exit_logits[i], "logits[i]");
  }
  check_shape(labels, n, "labels");
  for (index_t r = 0; r < n; ++r) {
    MOEKIT_CHECK(labels[r] >= 0 && labels[r] < c, Errc::kOutOfRange, "labels[", r,
                 "] = ", labels[r], " is outside [0, C = ", c, ")");
  }
  double weight_sum = 0.0;
  if (!exit_weights.empty()) {
    check_shape(exit_weights, k, "exit_weights");
    for (index_t i = 0; i < k; ++i) {
      MOEKIT_CHECK_ARG(std::isfinite(exit_weights[i]) && exit_weights[i] >= 0.0f, "exit_weights[",
                       i, "] = ", exit_weights[i], " must be finite and non-negative");
      weight_sum += exit_weights[i];
    }
    MOEKIT_CHECK_ARG(weight_sum > 0.0, "exit_weights sum to 0");
  } else {
    weight_sum = static_cast<double>(k) * static_cast<double>(k + 1) / 2.0;
  }
  if (!dlogits.empty()) {
    MOEKIT_CHECK(static_cast<index_t>(dlogits.size()) == k, Errc::kShapeMismatch, "dlogits holds ",
                 dlogits.size(), " views, expected one per exit: ", k);
    for (index_t i = 0; i < k; ++i) {
      if (!exit_dlogits[i].empty()) {
        MOEKIT_CHECK(exit_dlogits[i].rows() == n && exit_dlogits[i].cols() == c,
                     Errc::kShapeMismatch, "dlogits[", i, "] is ", exit_dlogits[i].rows(), " x ",
                     exit_dlogits[i].cols(), ", expected ", n, " x ", c);
        check_view(exit_dlogits[i], "dlogits[i]");
      }
    }
  }
  if (!exit_losses.empty()) check_shape(exit_losses, k, "exit_losses");
  check_multi_exit_overlap("cpu::multi_exit_loss", logits, labels, exit_weights, dlogits,
                           exit_losses);

  double total = 0.0;
  for (index_t i = 0; i < k; ++i) {
    const double w =
        exit_weights.empty() ? static_cast<double>(i + 1) : static_cast<double>(exit_weights[i]);
    const bool grad = !dlogits.empty() && !exit_dlogits[i].empty();
    const float scale =
        n > 0 ? static_cast<float>(w / (weight_sum * static_cast<double>(n))) : 0.0f;
    double sum = 0.0;
    for (index_t r = 0; r < n; ++r) {
      sum += cross_entropy_row(exit_logits[i].row(r), c, labels[r], scale,
                               grad ? exit_dlogits[i].row(r) : nullptr);
    }
    const double mean = n > 0 ? sum / static_cast<double>(n) : 0.0;
    if (!exit_losses.empty()) exit_losses[i] = mean;
    total += w * mean;
  }
  return total / weight_sum;
}

}  // namespace cpu
MOEKIT_NAMESPACE_END
