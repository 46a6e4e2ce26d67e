#pragma once
// Training data for moekit's reference multi-task model (docs/synthetic_model.md): an
// in-memory multi-task dataset, a synthetic benchmark with structure that
// rewards experts, stateless batching, and CSV files. Host only.
//
// Dataset. n samples of `features` floats, row-major (x is n x features, row i
// at x[i * features]), each with a task id (the branch that scores it) and a
// class label within that task. inputs(), task_view() and label_view() view
// the three arrays for the model (moekit/core/view.hpp). check_dataset()
// validates the sizes and that ids and labels are >= 0; subset(), append()
// and split() (a seeded random split, each part in the original order) build
// new datasets from rows of others.
//
// ---- SyntheticTasks ---------------------------------------------------------------------------
// A benchmark of T = config.classes.size() classification tasks on shared
// inputs, written so that a mixture of specialised experts beats one dense
// model. With L = config.latent, F = config.features, m = config.rule_factors:
//
//   latent   z ~ N(0, I_L), one per sample
//   input    x = tanh(A z + c) + input_noise * eps,   eps ~ N(0, I_F)
//            A (F x L): entries gain / sqrt(L) * N(0, 1), gain = config.mixing_gain;
//            c (F): entries 0.5 * N(0, 1). A and c depend on (config.seed, F, L) only.
//   task t   a regime factor r_t in [0, L) and, per regime rho in {0, 1}, a rule:
//            m factors S_{t,rho} (distinct, drawn from the L - 1 latents other than
//            r_t), unit-norm class directions W_{t,rho} (C_t x m) and biases b_{t,rho}:
//              rho     = 1 if z[r_t] > 0 else 0
//              score_c = W_{t,rho}[c] . z[S_{t,rho}] + b_{t,rho}[c]
//              y_clean = argmax_c score_c                      (ties -> lower class)
//   label    y = y_clean, or with probability label_noise a class drawn uniformly
//            from [0, C_t) (which may equal y_clean).
//
// Which factors decide a task's label, and how, switches with the sign of
// another factor: the rule is piecewise linear in z with two pieces, so two
// experts routed on the regime solve it exactly while one linear map cannot.
// The tasks draw their factors from the same L latents, so they share some
// (with the defaults, any two tasks share factors with high probability) and
// their regimes switch on different factors. rule(t) exposes r_t, S, W and b,
// e.g. to check that a router learned the regimes.
//
// The biases make the classes about equally frequent: b_{t,rho} is fitted on
// kCalibrationDraws fixed draws u_k ~ N(0, I_m) (keyed by (config.seed, t, rho))
// by kCalibrationSweeps sweeps of coordinate ascent on the semi-discrete
// transport dual: for c = 0..C-1 in turn, b_c is set so that class c wins
// exactly floor(N / C) of the draws given the other biases; finally the mean
// is subtracted. So b is part of the task's definition, not of any sample.
// Fitting all rules costs about 35 ms (-O2) at construction.
//
// Determinism. Every number is drawn with moekit's counter-based generator
// (moekit/core/random.hpp) from a key derived from the seeds:
//   mixing A, c       (config.seed)                 and F, L
//   task t's rule     (config.seed, t)              and L, m, C_t
//   sample(n, s)      (config.seed, s), row i       z_i, eps_i, label noise of row i
//   sample_task(n, t, s)  (config.seed, s, t), row i
// so a SyntheticTasks whose config lists more tasks (same seed, latent,
// features, rule_factors and first classes) defines its first tasks exactly as
// one with fewer: a branch added to a trained model sees the same tasks, and
// sample_task(n, t, s) is the same dataset for both. Results are bit-identical
// run after run. No <random> distribution is used, so they do not depend on
// the standard library's, only (like all of moekit's random numbers) on the
// platform's tanh, log and cos.
//
// sample(n, s) assigns tasks round robin: row i belongs to task i mod T, so
// every task has floor(n / T) or ceil(n / T) rows and, for n >= T, every task
// is present. Rows are otherwise independent of T: two configs that differ
// only in their number of tasks give rows i with the same z, x and, where the
// task agrees, the same label. sample_task(n, t, s) draws n rows of task t.
// Both can also return the latents z (n x L, row-major) for diagnostics.
//
// Calibration. Measured with this header and throwaway programs on the
// defaults (features = 32, latent = 8, rule_factors = 3, classes = {4, 6, 3, 8},
// mixing_gain = 1.5, input_noise = 0.1, label_noise = 0.05, seed = 0); fitted
// on sample(n, 1), accuracy on sample(20000, 2), per task t = 0..3:
//   chance, 1 / C_t                                  .250  .167  .333  .125
//   noiseless rule on the true z (noisy labels)      .962  .959  .968  .956
//   noiseless rule on the MAP estimate of z from x   .905  .879  .924  .876
//   linear softmax regression on x, n = 60000        .643  .487  .656  .426
//   two linear experts on x, oracle regime gate      .847  .820  .887  .810
//   MLP 32-128-128 ReLU + per-task heads, n = 4000   .731  .635  .790  .611
//                                         n = 16000  .784  .721  .821  .705
//                                         n = 60000  .813  .766  .862  .768
// (n counts rows over all tasks, so n = 4000 is 1000 rows per task.) The
// first two rows are ceilings: the labels carry 5% noise, and x the input
// noise, which the MAP row pays for. A linear model on x stays 25-45 points
// below them, while a small MLP clears chance by far within a few thousand
// samples; the regime split alone (two linear experts) closes most of the gap.
// Class frequencies are within 0.92-1.08 of uniform here, and within
// 0.88-1.09 over 18 other seeds and class lists (2 to 10 classes). With
// input_noise = 0.05 and mixing_gain = 1.0 the MAP ceiling rises to .90-.94.
// Sampling costs 2-4 us per row at -O2.
//
// ---- BatchSampler ----------------------------------------------------------------------------
// Batches with no hidden state: the batch of step s is rows [s B, (s + 1) B) of
// the infinite concatenation perm_0, perm_1, ... of per-epoch permutations of
// [0, N), perm_e a Fisher-Yates shuffle keyed by (seed, e). So it is a pure
// function of (seed, s): a resumed run draws the batches it would have drawn,
// every epoch visits every row exactly once, and a batch may straddle two
// epochs. The sampler caches the permutations of the last two epochs it used
// (an optimisation only, it changes no result); indices() is therefore not
// safe to call on one sampler from two threads at once, permutation() is.
// gather() copies the rows of a batch into caller buffers.
//
// ---- CSV -------------------------------------------------------------------------------------
// One sample per line:  task,label,f0,f1,...,f{F-1}
//   - an optional header line: CsvHeader::kDetect (default) takes the first
//     content line as a header when its first field is not a number; kPresent
//     and kAbsent force it. A header must have as many columns as the rows;
//     its names are not otherwise read.
//   - lines whose first non-blank character is '#', and blank lines, are
//     skipped; "\r\n" line ends and a UTF-8 byte order mark are accepted;
//     spaces and tabs around a field are ignored.
//   - task and label are non-negative decimal integers that fit int32;
//     features are decimal floats parsed with std::from_chars (locale-
//     independent; a leading '+' is accepted; values below the float range
//     become 0 or subnormal), and must be finite.
// write_csv() writes a header "task,label,f0,...", then every row with each
// float in its shortest round-trip form (std::to_chars), so read_csv() gives
// back bit-identical data. It writes atomically (moekit/io/atomic_write.hpp).
// parse_csv() reads the same format from text in memory.
//
// Errors (moekit::Error):
//   kIoError         a file cannot be opened, read or written (naming the path)
//   kFormatError     read_csv: a bad number, a wrong column count, fewer than
//                    3 columns, a negative / non-integer / too large task or
//                    label, a feature count other than options.features, no
//                    data rows (empty file, or only a header and comments);
//                    the message names the file, the line (1-based, counting
//                    every line) and the column (1-based)
//   kNonFinite       read_csv: a NaN or infinite feature (file, line, column);
//                    write_csv: a non-finite feature (row, column)
//   kInvalidArgument / kShapeMismatch / kOutOfRange
//                    bad configurations, sizes, ids and views, naming them
// read_csv() builds its result aside and returns it: a failed read leaves the
// caller's data untouched. Every check of gather() runs before it writes.
//
//   const moekit::train::SyntheticTasks bench({.classes = {4, 6, 3, 8}, .seed = 7});
//   const moekit::train::Dataset fit = bench.sample(20000, 1), held_out = bench.sample(4000, 2);
//   moekit::train::BatchSampler batches(fit.size(), 256, /*seed=*/3);
//   std::vector<moekit::index_t> rows(256);
//   batches.indices(step, rows);                       // the same rows for `step`, always
//   moekit::train::gather(fit, rows, x_view, task_view, label_view);

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"
#include "moekit/io/atomic_write.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace train {

// ---- Dataset -----------------------------------------------------------------------------------

// Labelled rows for the multi-task model: per row F features, a task id and
// a label, in parallel arrays.
struct Dataset {
  index_t features = 0;              // F, floats per row
  std::vector<float> x;              // size() x features, row-major
  std::vector<std::int32_t> tasks;   // size(), each >= 0
  std::vector<std::int32_t> labels;  // size(), each >= 0 (a class of its task)

  // Rows (the number of labels).
  index_t size() const noexcept { return static_cast<index_t>(labels.size()); }
  // Whether there are no rows.
  bool empty() const noexcept { return labels.empty(); }

  // x as a size() x features matrix (a model's input), read-only.
  MatrixView<const float> inputs() const { return {x.data(), size(), features}; }
  // x as a size() x features matrix, writable.
  MatrixView<float> inputs() { return {x.data(), size(), features}; }
  // tasks as a view of size() ids.
  VectorView<const std::int32_t> task_view() const { return {tasks.data(), size()}; }
  // labels as a view of size() labels.
  VectorView<const std::int32_t> label_view() const { return {labels.data(), size()}; }

  // 1 + the largest task id (0 when empty).
  int num_tasks() const {
    std::int32_t top = -1;
    for (const std::int32_t t : tasks) top = std::max(top, t);
    return static_cast<int>(top) + 1;
  }

  // Rows per task id, num_tasks() entries.
  std::vector<index_t> task_counts() const {
    std::vector<index_t> counts(static_cast<std::size_t>(num_tasks()), 0);
    for (const std::int32_t t : tasks) ++counts[static_cast<std::size_t>(t)];
    return counts;
  }

  // Rows per label among the rows of `task`: 1 + its largest label entries
  // (empty when the task has no rows).
  std::vector<index_t> class_counts(int task) const {
    std::vector<index_t> counts;
    for (std::size_t i = 0; i < labels.size(); ++i) {
      if (tasks[i] != task) continue;
      const auto y = static_cast<std::size_t>(labels[i]);
      if (y >= counts.size()) counts.resize(y + 1, 0);
      ++counts[y];
    }
    return counts;
  }
};

// Checks that `data` is consistent: features >= 1 unless empty, x of size()
// x features floats, one task and one label per row, all >= 0.
inline void check_dataset(const Dataset& data, const char* name) {
  const std::size_t n = data.labels.size();
  MOEKIT_CHECK(data.tasks.size() == n, Errc::kShapeMismatch, name, " has ", data.tasks.size(),
               " task ids but ", n, " labels");
  MOEKIT_CHECK(data.features >= 1 || (n == 0 && data.features == 0), Errc::kInvalidArgument, name,
               ".features = ", data.features, " must be at least 1");
  MOEKIT_CHECK(data.x.size() == n * static_cast<std::size_t>(data.features), Errc::kShapeMismatch,
               name, ".x has ", data.x.size(), " floats, expected ", n, " rows x ", data.features,
               " features");
  for (std::size_t i = 0; i < n; ++i) {
    MOEKIT_CHECK(data.tasks[i] >= 0, Errc::kOutOfRange, name, ".tasks[", i, "] = ", data.tasks[i],
                 " is negative");
    MOEKIT_CHECK(data.labels[i] >= 0, Errc::kOutOfRange, name, ".labels[", i,
                 "] = ", data.labels[i], " is negative");
  }
}

// The rows `rows` of `data`, in that order (a row may repeat).
inline Dataset subset(const Dataset& data, std::span<const index_t> rows) {
  check_dataset(data, "data");
  for (std::size_t k = 0; k < rows.size(); ++k) {
    MOEKIT_CHECK(rows[k] >= 0 && rows[k] < data.size(), Errc::kOutOfRange, "rows[", k,
                 "] = ", rows[k], " is outside [0, ", data.size(), ")");
  }
  Dataset out;
  out.features = data.features;
  const auto f = static_cast<std::size_t>(data.features);
  out.x.resize(rows.size() * f);
  out.tasks.resize(rows.size());
  out.labels.resize(rows.size());
  for (std::size_t k = 0; k < rows.size(); ++k) {
    const auto r = static_cast<std::size_t>(rows[k]);
    std::copy_n(data.x.begin() + static_cast<std::ptrdiff_t>(r * f), f,
                out.x.begin() + static_cast<std::ptrdiff_t>(k * f));
    out.tasks[k] = data.tasks[r];
    out.labels[k] = data.labels[r];
  }
  return out;
}

// Appends the rows of `more` to `data` (same features, unless `data` is empty).
inline void append(Dataset& data, const Dataset& more) {
  check_dataset(data, "data");
  check_dataset(more, "more");
  if (more.empty()) return;
  if (data.empty()) {
    data = more;
    return;
  }
  MOEKIT_CHECK_SHAPE(more.features, data.features);
  data.x.insert(data.x.end(), more.x.begin(), more.x.end());
  data.tasks.insert(data.tasks.end(), more.tasks.begin(), more.tasks.end());
  data.labels.insert(data.labels.end(), more.labels.begin(), more.labels.end());
}

namespace detail {

// Uniform integer in [0, n), n >= 1, from 64 random bits: multiply-shift on
// the top 32 bits for n <= 2^32, else modulo.
constexpr std::uint64_t uniform_below(std::uint64_t bits, std::uint64_t n) noexcept {
  if (n <= 0x100000000ULL) return ((bits >> 32) * n) >> 32;
  return bits % n;
}

// A Fisher-Yates shuffle of `items` keyed by `key`: swap i with j =
// uniform_below(random_bits(key, i), i + 1) for i = n - 1 down to 1.
template <class T>
void shuffle(std::uint64_t key, std::span<T> items) noexcept {
  for (std::size_t i = items.size(); i-- > 1;) {
    const auto j = static_cast<std::size_t>(
        uniform_below(random_bits(key, i), static_cast<std::uint64_t>(i) + 1));
    std::swap(items[i], items[j]);
  }
}

// Key derivation tags (any distinct values).
inline constexpr std::uint64_t kTagMixing = 1;
inline constexpr std::uint64_t kTagTask = 2;
inline constexpr std::uint64_t kTagSample = 3;
inline constexpr std::uint64_t kTagSampleTask = 4;
inline constexpr std::uint64_t kTagEpoch = 5;
inline constexpr std::uint64_t kTagSplit = 6;

}  // namespace detail

// Two parts of `data`: round(fraction * n) rows chosen by a shuffle keyed by
// seed, and the rest; each part keeps the rows' original order.
inline std::pair<Dataset, Dataset> split(const Dataset& data, double fraction, std::uint64_t seed) {
  check_dataset(data, "data");
  MOEKIT_CHECK_ARG(fraction >= 0.0 && fraction <= 1.0, "fraction = ", fraction,
                   " is outside [0, 1]");
  const index_t n = data.size();
  std::vector<index_t> order(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = i;
  detail::shuffle(random_bits(seed, detail::kTagSplit), std::span<index_t>(order));
  const auto first = static_cast<std::ptrdiff_t>(std::llround(fraction * static_cast<double>(n)));
  std::sort(order.begin(), order.begin() + first);
  std::sort(order.begin() + first, order.end());
  return {subset(data, std::span<const index_t>(order.data(), static_cast<std::size_t>(first))),
          subset(data, std::span<const index_t>(order).subspan(static_cast<std::size_t>(first)))};
}

// ---- SyntheticTasks ----------------------------------------------------------------------------

// The synthetic tasks' sizes, noise and seed (symbols as at the top of this file).
struct SyntheticTasksConfig {
  index_t features = 32;                        // F, width of x
  int latent = 8;                               // L latent factors, >= 2
  std::vector<index_t> classes = {4, 6, 3, 8};  // C_t per task, each >= 2
  int rule_factors = 3;                         // m factors per rule, in [1, L - 1]
  float mixing_gain = 1.5f;                     // scale of A (> 0)
  float input_noise = 0.1f;                     // std of the noise added to x (>= 0)
  float label_noise = 0.05f;                    // probability of a uniform label, [0, 1]
  std::uint64_t seed = 0;                       // keys the mixing, every rule and every sample
};

// Task t's definition (formulas at the top of this file).
struct SyntheticTaskRule {
  index_t classes = 0;                        // C_t
  int regime_factor = 0;                      // r_t
  std::array<std::vector<int>, 2> factors;    // S_{t,rho}: m latent indices
  std::array<std::vector<float>, 2> weights;  // W_{t,rho}: C_t x m, unit rows
  std::array<std::vector<float>, 2> bias;     // b_{t,rho}: C_t
};

// The bias fit of the task rules (see the top of this file).
inline constexpr int kCalibrationDraws = 4096;
// Coordinate-ascent sweeps of that fit.
inline constexpr int kCalibrationSweeps = 8;

// The synthetic multi-task problem of the top of this file: T tasks on shared
// latent factors, and samples of them. Immutable after construction.
class SyntheticTasks {
 public:
  // Checks `config` (kInvalidArgument naming the field) and builds the mixing
  // and every task's rule (about 35 ms with the defaults).
  explicit SyntheticTasks(SyntheticTasksConfig config) : config_(std::move(config)) {
    const SyntheticTasksConfig& c = config_;
    MOEKIT_CHECK_ARG(c.features >= 1, "config.features = ", c.features, " must be at least 1");
    MOEKIT_CHECK_ARG(c.latent >= 2, "config.latent = ", c.latent, " must be at least 2");
    MOEKIT_CHECK_ARG(!c.classes.empty(), "config.classes is empty: give one entry per task");
    MOEKIT_CHECK_ARG(
        c.classes.size() <= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
        "config.classes has ", c.classes.size(), " tasks, too many for int32 ids");
    for (std::size_t t = 0; t < c.classes.size(); ++t) {
      MOEKIT_CHECK_ARG(c.classes[t] >= 2 && c.classes[t] <= (index_t{1} << 20), "config.classes[",
                       t, "] = ", c.classes[t], " is outside [2, 2^20]");
    }
    MOEKIT_CHECK_ARG(c.rule_factors >= 1 && c.rule_factors <= c.latent - 1,
                     "config.rule_factors = ", c.rule_factors,
                     " is outside [1, latent - 1 = ", c.latent - 1, "]");
    MOEKIT_CHECK_ARG(std::isfinite(c.mixing_gain) && c.mixing_gain > 0.0f,
                     "config.mixing_gain = ", c.mixing_gain, " must be finite and > 0");
    MOEKIT_CHECK_ARG(std::isfinite(c.input_noise) && c.input_noise >= 0.0f,
                     "config.input_noise = ", c.input_noise, " must be finite and >= 0");
    MOEKIT_CHECK_ARG(c.label_noise >= 0.0f && c.label_noise <= 1.0f,
                     "config.label_noise = ", c.label_noise, " is outside [0, 1]");

    // Mixing: A (F x L) then c (F), one stream keyed by (seed).
    const auto F = static_cast<std::size_t>(c.features), L = static_cast<std::size_t>(c.latent);
    const std::uint64_t mix_key = random_bits(c.seed, detail::kTagMixing);
    const float scale = c.mixing_gain / std::sqrt(static_cast<float>(c.latent));
    mix_a_.resize(F * L);
    mix_c_.resize(F);
    for (std::size_t k = 0; k < F * L; ++k) mix_a_[k] = scale * random_normal(mix_key, k);
    for (std::size_t j = 0; j < F; ++j) mix_c_[j] = 0.5f * random_normal(mix_key, F * L + j);

    rules_.reserve(c.classes.size());
    for (std::size_t t = 0; t < c.classes.size(); ++t)
      rules_.push_back(make_rule(static_cast<int>(t)));
  }

  // The config given at construction.
  const SyntheticTasksConfig& config() const noexcept { return config_; }
  // T, one per entry of config().classes.
  int num_tasks() const noexcept { return static_cast<int>(rules_.size()); }
  // F, the width of x.
  index_t features() const noexcept { return config_.features; }
  // L, the number of latent factors.
  int latent() const noexcept { return config_.latent; }

  // C_t of `task` in [0, T) (kOutOfRange otherwise).
  index_t num_classes(int task) const {
    MOEKIT_CHECK_RANGE(task, 0, num_tasks());
    return rules_[static_cast<std::size_t>(task)].classes;
  }

  // The rule of `task` in [0, T): r_t, S, W and b (kOutOfRange otherwise).
  const SyntheticTaskRule& rule(int task) const {
    MOEKIT_CHECK_RANGE(task, 0, num_tasks());
    return rules_[static_cast<std::size_t>(task)];
  }

  // rho of latent z (L values) for `task`: 1 if z[r_t] > 0, else 0.
  int regime(int task, std::span<const float> z) const {
    check_latent(task, z);
    return regime_of(rules_[static_cast<std::size_t>(task)], z);
  }

  // y_clean of latent z for `task` (no label noise).
  std::int32_t clean_label(int task, std::span<const float> z) const {
    check_latent(task, z);
    return clean_label_of(rules_[static_cast<std::size_t>(task)], z);
  }

  // x = tanh(A z + c) without input noise; z has L values, x F.
  void mix(std::span<const float> z, std::span<float> x) const {
    MOEKIT_CHECK_SHAPE(z.size(), static_cast<std::size_t>(config_.latent));
    MOEKIT_CHECK_SHAPE(x.size(), static_cast<std::size_t>(config_.features));
    mix_row(z.data(), x.data());
  }

  // n rows, row i of task i mod T; `latents`, when given, receives z (n x L).
  Dataset sample(index_t n, std::uint64_t seed, std::vector<float>* latents = nullptr) const {
    MOEKIT_CHECK_ARG(n >= 0, "n = ", n, " is negative");
    const std::uint64_t key = random_bits(random_bits(config_.seed, detail::kTagSample), seed);
    const auto tasks = static_cast<std::uint64_t>(num_tasks());
    return draw(
        n, key,
        [tasks](index_t i) { return static_cast<int>(static_cast<std::uint64_t>(i) % tasks); },
        latents);
  }

  // n rows of task `task`; `latents`, when given, receives z (n x L).
  Dataset sample_task(index_t n, int task, std::uint64_t seed,
                      std::vector<float>* latents = nullptr) const {
    MOEKIT_CHECK_ARG(n >= 0, "n = ", n, " is negative");
    MOEKIT_CHECK_RANGE(task, 0, num_tasks());
    const std::uint64_t key =
        random_bits(random_bits(random_bits(config_.seed, detail::kTagSampleTask), seed),
                    static_cast<std::uint64_t>(task));
    return draw(
        n, key, [task](index_t) { return task; }, latents);
  }

 private:
  void check_latent(int task, std::span<const float> z) const {
    MOEKIT_CHECK_RANGE(task, 0, num_tasks());
    MOEKIT_CHECK_SHAPE(z.size(), static_cast<std::size_t>(config_.latent));
  }

  static int regime_of(const SyntheticTaskRule& r, std::span<const float> z) {
    return z[static_cast<std::size_t>(r.regime_factor)] > 0.0f ? 1 : 0;
  }

  static std::int32_t clean_label_of(const SyntheticTaskRule& r, std::span<const float> z) {
    const auto rho = static_cast<std::size_t>(regime_of(r, z));
    const std::vector<int>& s = r.factors[rho];
    const std::size_t m = s.size();
    std::int32_t best = 0;
    double best_score = 0.0;
    for (index_t c = 0; c < r.classes; ++c) {
      const float* w = r.weights[rho].data() + static_cast<std::size_t>(c) * m;
      double score = r.bias[rho][static_cast<std::size_t>(c)];
      for (std::size_t j = 0; j < m; ++j)
        score += static_cast<double>(w[j]) * z[static_cast<std::size_t>(s[j])];
      if (c == 0 || score > best_score) {
        best = static_cast<std::int32_t>(c);
        best_score = score;
      }
    }
    return best;
  }

  void mix_row(const float* z, float* x) const {
    const auto L = static_cast<std::size_t>(config_.latent);
    for (std::size_t j = 0; j < static_cast<std::size_t>(config_.features); ++j) {
      double u = mix_c_[j];
      for (std::size_t k = 0; k < L; ++k) u += static_cast<double>(mix_a_[j * L + k]) * z[k];
      x[j] = static_cast<float>(std::tanh(u));
    }
  }

  SyntheticTaskRule make_rule(int t) const {
    const SyntheticTasksConfig& c = config_;
    const std::uint64_t key =
        random_bits(random_bits(c.seed, detail::kTagTask), static_cast<std::uint64_t>(t));
    SyntheticTaskRule r;
    r.classes = c.classes[static_cast<std::size_t>(t)];
    const auto C = static_cast<std::size_t>(r.classes),
               m = static_cast<std::size_t>(c.rule_factors);

    std::vector<int> order(static_cast<std::size_t>(c.latent));
    for (std::size_t k = 0; k < order.size(); ++k) order[k] = static_cast<int>(k);
    detail::shuffle(random_bits(key, 0), std::span<int>(order));
    r.regime_factor = order[0];
    for (std::size_t rho = 0; rho < 2; ++rho) {
      std::vector<int> others(order.begin() + 1, order.end());
      std::sort(others.begin(), others.end());
      detail::shuffle(random_bits(key, 10 + rho), std::span<int>(others));
      r.factors[rho].assign(others.begin(), others.begin() + static_cast<std::ptrdiff_t>(m));

      std::vector<float>& w = r.weights[rho];
      w.resize(C * m);
      const std::uint64_t wkey = random_bits(key, 20 + rho);
      for (std::size_t cls = 0; cls < C; ++cls) {
        double norm2 = 0.0;
        for (std::size_t j = 0; j < m; ++j) {
          w[cls * m + j] = random_normal(wkey, cls * m + j);
          norm2 += static_cast<double>(w[cls * m + j]) * w[cls * m + j];
        }
        const double inv = norm2 > 0.0 ? 1.0 / std::sqrt(norm2) : 1.0;
        for (std::size_t j = 0; j < m; ++j)
          w[cls * m + j] = static_cast<float>(w[cls * m + j] * inv);
      }
      r.bias[rho] = calibrate_bias(w, C, m, random_bits(key, 30 + rho));
    }
    return r;
  }

  // Biases that make argmax_c (W u + b)_c about uniform over u ~ N(0, I_m)
  // (coordinate ascent, see the top of this file).
  static std::vector<float> calibrate_bias(const std::vector<float>& w, std::size_t C,
                                           std::size_t m, std::uint64_t key) {
    constexpr auto N = static_cast<std::size_t>(kCalibrationDraws);
    std::vector<double> u(N * m), scores(N * C);
    for (std::size_t k = 0; k < N * m; ++k) u[k] = random_normal(key, k);
    for (std::size_t k = 0; k < N; ++k) {
      for (std::size_t cls = 0; cls < C; ++cls) {
        double s = 0.0;
        for (std::size_t j = 0; j < m; ++j) s += static_cast<double>(w[cls * m + j]) * u[k * m + j];
        scores[k * C + cls] = s;
      }
    }
    // Per draw, the largest and second largest s + b and the class of the largest.
    std::vector<double> b(C, 0.0), top1(N), top2(N), margin(N);
    std::vector<std::size_t> arg1(N), arg2(N);
    const auto rescan = [&](std::size_t k) {
      top1[k] = top2[k] = -std::numeric_limits<double>::infinity();
      arg1[k] = arg2[k] = 0;
      for (std::size_t o = 0; o < C; ++o) {
        const double v = scores[k * C + o] + b[o];
        if (v > top1[k]) {
          top2[k] = top1[k], arg2[k] = arg1[k];
          top1[k] = v, arg1[k] = o;
        } else if (v > top2[k]) {
          top2[k] = v, arg2[k] = o;
        }
      }
    };
    for (std::size_t k = 0; k < N; ++k) rescan(k);
    const auto q = static_cast<std::ptrdiff_t>(N / C);  // draws each class should win
    for (int sweep = 0; sweep < kCalibrationSweeps; ++sweep) {
      for (std::size_t cls = 0; cls < C; ++cls) {
        // Class cls wins draw k iff b[cls] > margin[k] (the best other class's
        // s + b minus s[cls]): put b[cls] between the q-th and (q+1)-th
        // smallest margins, so that it wins q draws.
        for (std::size_t k = 0; k < N; ++k)
          margin[k] = (arg1[k] == cls ? top2[k] : top1[k]) - scores[k * C + cls];
        std::nth_element(margin.begin(), margin.begin() + q, margin.end());
        const double above = margin[static_cast<std::size_t>(q)];
        const double below = *std::max_element(margin.begin(), margin.begin() + q);
        b[cls] = 0.5 * (below + above);
        for (std::size_t k = 0; k < N; ++k) {
          const double v = scores[k * C + cls] + b[cls];
          if (arg1[k] == cls || arg2[k] == cls) {
            rescan(k);
          } else if (v > top1[k]) {
            top2[k] = top1[k], arg2[k] = arg1[k];
            top1[k] = v, arg1[k] = cls;
          } else if (v > top2[k]) {
            top2[k] = v, arg2[k] = cls;
          }
        }
      }
    }
    double mean = 0.0;
    for (const double v : b) mean += v;
    mean /= static_cast<double>(C);
    for (double& v : b) v -= mean;
    std::vector<float> out(C);
    for (std::size_t cls = 0; cls < C; ++cls) out[cls] = static_cast<float>(b[cls]);
    return out;
  }

  template <class TaskOf>
  Dataset draw(index_t n, std::uint64_t key, TaskOf task_of, std::vector<float>* latents) const {
    const auto F = static_cast<std::size_t>(config_.features),
               L = static_cast<std::size_t>(config_.latent);
    const auto rows = static_cast<std::size_t>(n);
    const std::uint64_t zkey = random_bits(key, 1), nkey = random_bits(key, 2),
                        lkey = random_bits(key, 3);
    Dataset d;
    d.features = config_.features;
    d.x.resize(rows * F);
    d.tasks.resize(rows);
    d.labels.resize(rows);
    std::vector<float> z(L);
    if (latents != nullptr) latents->resize(rows * L);
    for (std::size_t i = 0; i < rows; ++i) {
      for (std::size_t k = 0; k < L; ++k) z[k] = random_normal(zkey, i * L + k);
      float* x = d.x.data() + i * F;
      mix_row(z.data(), x);
      if (config_.input_noise > 0.0f) {
        for (std::size_t j = 0; j < F; ++j)
          x[j] += config_.input_noise * random_normal(nkey, i * F + j);
      }
      const int t = task_of(static_cast<index_t>(i));
      const SyntheticTaskRule& r = rules_[static_cast<std::size_t>(t)];
      std::int32_t y = clean_label_of(r, z);
      if (random_uniform(lkey, 2 * i) < config_.label_noise) {
        y = static_cast<std::int32_t>(detail::uniform_below(random_bits(lkey, 2 * i + 1),
                                                            static_cast<std::uint64_t>(r.classes)));
      }
      d.tasks[i] = t;
      d.labels[i] = y;
      if (latents != nullptr)
        std::copy(z.begin(), z.end(), latents->begin() + static_cast<std::ptrdiff_t>(i * L));
    }
    return d;
  }

  SyntheticTasksConfig config_;
  std::vector<float> mix_a_;  // A, F x L
  std::vector<float> mix_c_;  // c, F
  std::vector<SyntheticTaskRule> rules_;
};

// ---- BatchSampler ------------------------------------------------------------------------------

// Shuffled mini-batches of row indices, a pure function of (seed, step)
// (see BatchSampler at the top of this file).
class BatchSampler {
 public:
  // Batches of batch_size rows of [0, dataset_size), both at least 1
  // (a batch may be larger than the dataset: it then spans epochs).
  BatchSampler(index_t dataset_size, index_t batch_size, std::uint64_t seed)
      : n_(dataset_size),
        batch_(batch_size),
        seed_(seed),
        key_(random_bits(seed, detail::kTagEpoch)) {
    MOEKIT_CHECK_ARG(dataset_size >= 1, "dataset_size = ", dataset_size, " must be at least 1");
    MOEKIT_CHECK_ARG(batch_size >= 1, "batch_size = ", batch_size, " must be at least 1");
  }

  // N, the rows sampled from.
  index_t dataset_size() const noexcept { return n_; }
  // B, the rows per batch.
  index_t batch_size() const noexcept { return batch_; }
  // The seed the permutations are keyed by.
  std::uint64_t seed() const noexcept { return seed_; }

  // The epoch that the first row of step's batch belongs to: floor(step B / N).
  std::int64_t epoch(std::int64_t step) const {
    check_step(step);
    return step * static_cast<std::int64_t>(batch_) / static_cast<std::int64_t>(n_);
  }

  // perm_epoch, the permutation of [0, N) of epoch `epoch` (>= 0); `out` has N entries.
  void permutation(std::int64_t epoch, std::span<index_t> out) const {
    MOEKIT_CHECK_ARG(epoch >= 0, "epoch = ", epoch, " is negative");
    MOEKIT_CHECK_SHAPE(static_cast<index_t>(out.size()), n_);
    for (index_t i = 0; i < n_; ++i) out[static_cast<std::size_t>(i)] = i;
    detail::shuffle(random_bits(key_, static_cast<std::uint64_t>(epoch)), out);
  }

  // The rows of step's batch (step >= 0); `out` has batch_size() entries.
  void indices(std::int64_t step, std::span<index_t> out) {
    check_step(step);
    MOEKIT_CHECK_SHAPE(static_cast<index_t>(out.size()), batch_);
    const std::int64_t n = n_;
    std::int64_t pos = step * static_cast<std::int64_t>(batch_);
    for (std::size_t k = 0; k < out.size(); ++k, ++pos) {
      out[k] = cached(pos / n)[static_cast<std::size_t>(pos % n)];
    }
  }

  // The same, in a new vector of batch_size() entries (allocates).
  std::vector<index_t> indices(std::int64_t step) {
    std::vector<index_t> out(static_cast<std::size_t>(batch_));
    indices(step, out);
    return out;
  }

 private:
  void check_step(std::int64_t step) const {
    MOEKIT_CHECK_ARG(step >= 0, "step = ", step, " is negative");
    // The last row of the batch, (step + 1) B - 1, must fit int64.
    MOEKIT_CHECK_ARG(
        step < std::numeric_limits<std::int64_t>::max() / static_cast<std::int64_t>(batch_),
        "step = ", step, " is too large for batch_size = ", batch_);
  }

  const std::vector<index_t>& cached(std::int64_t epoch) {
    Slot& slot = slots_[static_cast<std::size_t>(epoch & 1)];
    if (slot.epoch != epoch) {
      slot.perm.resize(static_cast<std::size_t>(n_));
      permutation(epoch, slot.perm);
      slot.epoch = epoch;
    }
    return slot.perm;
  }

  struct Slot {
    std::int64_t epoch = -1;
    std::vector<index_t> perm;
  };

  index_t n_;
  index_t batch_;
  std::uint64_t seed_;
  std::uint64_t key_;
  std::array<Slot, 2> slots_{};
};

// Copies rows `rows` of `data` into x (rows.size() x features), tasks and
// labels (rows.size() each). tasks or labels may be empty views: not
// written. Everything is checked before anything is written.
inline void gather(const Dataset& data, std::span<const index_t> rows, MatrixView<float> x,
                   VectorView<std::int32_t> tasks, VectorView<std::int32_t> labels) {
  MOEKIT_API("train::gather");
  check_dataset(data, "data");
  const auto n = static_cast<index_t>(rows.size());
  check_shape(x, n, data.features, "x");
  if (!tasks.empty()) check_shape(tasks, n, "tasks");
  if (!labels.empty()) check_shape(labels, n, "labels");
  for (std::size_t k = 0; k < rows.size(); ++k) {
    MOEKIT_CHECK(rows[k] >= 0 && rows[k] < data.size(), Errc::kOutOfRange, "rows[", k,
                 "] = ", rows[k], " is outside [0, ", data.size(), ")");
  }
  OverlapCheck("train::gather")
      .out({{x, "x"}, {tasks, "tasks"}, {labels, "labels"}})
      .in({{data.inputs(), "data.x"},
           {data.task_view(), "data.tasks"},
           {data.label_view(), "data.labels"},
           {rows.data(), static_cast<index_t>(rows.size()), "rows"}})
      .check();
  const auto f = static_cast<std::size_t>(data.features);
  for (index_t k = 0; k < n; ++k) {
    const auto r = static_cast<std::size_t>(rows[static_cast<std::size_t>(k)]);
    std::copy_n(data.x.data() + r * f, f, x.row(k));
    if (!tasks.empty()) tasks[k] = data.tasks[r];
    if (!labels.empty()) labels[k] = data.labels[r];
  }
}

// ---- CSV ---------------------------------------------------------------------------------------

// Whether a CSV file starts with a header line (read_csv, parse_csv).
enum class CsvHeader {
  kDetect,   // a header when the first field of the first content line is not a number
  kPresent,  // the first content line is a header
  kAbsent,   // every content line is a row
};

// How read_csv and parse_csv read a file.
struct CsvOptions {
  CsvHeader header = CsvHeader::kDetect;  // whether the first content line is a header
  index_t features = -1;                  // the feature count the file must have; -1: any (>= 1)
};

namespace detail {

inline std::string_view trim_blanks(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

enum class ParseStatus { kOk, kBad, kOutOfRange };

inline ParseStatus parse_double(std::string_view s, double& out) noexcept {
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  if (s.empty() || s.front() == '+') return ParseStatus::kBad;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  if (ptr != s.data() + s.size()) return ParseStatus::kBad;
  if (ec == std::errc::result_out_of_range) return ParseStatus::kOutOfRange;
  return ec == std::errc() ? ParseStatus::kOk : ParseStatus::kBad;
}

// A float field: the nearest float (directly, not through double); a value
// below the float range becomes the rounded subnormal or 0.
inline ParseStatus parse_float(std::string_view s, float& out) noexcept {
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  if (s.empty() || s.front() == '+') return ParseStatus::kBad;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  if (ptr != s.data() + s.size()) return ParseStatus::kBad;
  if (ec == std::errc::result_out_of_range) {
    double d = 0.0;
    const ParseStatus st = parse_double(s, d);
    if (st == ParseStatus::kOk && std::fabs(d) < 1.0) {  // underflow, not overflow
      out = static_cast<float>(d);
      return ParseStatus::kOk;
    }
    return ParseStatus::kOutOfRange;
  }
  return ec == std::errc() ? ParseStatus::kOk : ParseStatus::kBad;
}

// Throws kFormatError "<source>:<line>: column <col>: <message>".
template <class... Args>
[[noreturn]] void csv_fail(Errc code, std::string_view source, std::size_t line, std::size_t column,
                           const Args&... args) {
  MOEKIT_FAIL(code, source, ":", line, ": column ", column, ": ", args...);
}

using ::moekit::detail::shown;  // a field as messages show it (at most 64 bytes)

inline void check_csv_options(const CsvOptions& options) {
  MOEKIT_CHECK_ARG(options.features == -1 || options.features >= 1,
                   "options.features = ", options.features, " must be -1 (any) or at least 1");
}

inline std::int32_t parse_id(std::string_view field, const char* what, std::string_view path,
                             std::size_t line, std::size_t column) {
  std::int64_t v = 0;
  const auto [ptr, ec] = std::from_chars(field.data(), field.data() + field.size(), v);
  if (field.empty() || ptr != field.data() + field.size() || ec != std::errc()) {
    double d = 0.0;
    if (!field.empty() && ec != std::errc::result_out_of_range &&
        parse_double(field, d) == ParseStatus::kOk) {
      csv_fail(Errc::kFormatError, path, line, column, what, " '", shown(field),
               "' is not an integer");
    }
    if (ec == std::errc::result_out_of_range && ptr == field.data() + field.size())
      csv_fail(Errc::kFormatError, path, line, column, what, " '", shown(field),
               "' is out of range");
    csv_fail(Errc::kFormatError, path, line, column, "bad ", what, " '", shown(field), "'");
  }
  if (v < 0) csv_fail(Errc::kFormatError, path, line, column, what, " ", v, " is negative");
  if (v > std::numeric_limits<std::int32_t>::max())
    csv_fail(Errc::kFormatError, path, line, column, what, " ", v, " is out of the int32 range");
  return static_cast<std::int32_t>(v);
}

}  // namespace detail

// A dataset from CSV text (format and errors at the top of this file);
// `source` names the text in messages (read_csv passes the path).
inline Dataset parse_csv(std::string_view text, std::string_view source,
                         const CsvOptions& options = {}) {
  detail::check_csv_options(options);
  Dataset d;
  std::size_t columns = 0;  // 0 until the header or the first row fixes it
  bool header_seen = false;
  std::vector<std::string_view> fields;
  std::string_view rest(text);
  if (rest.substr(0, 3) == "\xEF\xBB\xBF") rest.remove_prefix(3);
  for (std::size_t line_no = 1; !rest.empty(); ++line_no) {
    const std::size_t nl = rest.find('\n');
    std::string_view line = rest.substr(0, nl);
    rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    const std::string_view content = detail::trim_blanks(line);
    if (content.empty() || content.front() == '#') continue;

    fields.clear();
    for (std::size_t start = 0;;) {
      const std::size_t comma = line.find(',', start);
      fields.push_back(detail::trim_blanks(line.substr(start, comma - start)));
      if (comma == std::string_view::npos) break;
      start = comma + 1;
    }

    if (columns == 0) {
      // The header, or else the first row, fixes the column count.
      double probe = 0.0;
      const bool header = options.header == CsvHeader::kPresent ||
                          (options.header == CsvHeader::kDetect &&
                           detail::parse_double(fields[0], probe) != detail::ParseStatus::kOk);
      columns = fields.size();
      if (columns < 3) {
        detail::csv_fail(Errc::kFormatError, source, line_no, columns, "found ", columns, " column",
                         columns == 1 ? "" : "s", header ? " in the header" : " in the first row",
                         ", expected at least 3: task,label,f0,...");
      }
      d.features = static_cast<index_t>(columns - 2);
      if (options.features != -1 && d.features != options.features) {
        detail::csv_fail(Errc::kFormatError, source, line_no, 3, "found ", d.features,
                         " features, expected options.features = ", options.features);
      }
      if (header) {
        header_seen = true;
        continue;
      }
    }
    if (fields.size() != columns) {
      detail::csv_fail(Errc::kFormatError, source, line_no, std::min(fields.size(), columns) + 1,
                       "found ", fields.size(), " columns, expected ", columns,
                       header_seen ? " (as in the header)" : " (as in the first row)");
    }
    const std::int32_t task = detail::parse_id(fields[0], "task", source, line_no, 1);
    const std::int32_t label = detail::parse_id(fields[1], "label", source, line_no, 2);
    for (std::size_t j = 2; j < columns; ++j) {
      float v = 0.0f;
      const detail::ParseStatus st = detail::parse_float(fields[j], v);
      if (st == detail::ParseStatus::kOutOfRange) {
        detail::csv_fail(Errc::kFormatError, source, line_no, j + 1, "feature '",
                         detail::shown(fields[j]), "' is outside the float range");
      }
      if (st != detail::ParseStatus::kOk) {
        detail::csv_fail(Errc::kFormatError, source, line_no, j + 1, "bad number '",
                         detail::shown(fields[j]), "'");
      }
      if (!std::isfinite(v)) {
        detail::csv_fail(Errc::kNonFinite, source, line_no, j + 1, "feature '",
                         detail::shown(fields[j]), "' is not finite");
      }
      d.x.push_back(v);
    }
    d.tasks.push_back(task);
    d.labels.push_back(label);
  }
  MOEKIT_CHECK(!d.empty(), Errc::kFormatError, source, ": no data rows",
               header_seen ? " (only a header)" : "", " in the file");
  return d;
}

// Reads a dataset from a file (parse_csv on its contents).
inline Dataset read_csv(const std::filesystem::path& path, const CsvOptions& options = {}) {
  detail::check_csv_options(options);  // before the file is opened
  std::error_code fs_ec;
  MOEKIT_CHECK(!std::filesystem::is_directory(path, fs_ec), Errc::kIoError, "cannot read '",
               path.string(), "': it is a directory");
  std::ifstream in(path, std::ios::binary);
  MOEKIT_CHECK(in.is_open(), Errc::kIoError, "cannot open '", path.string(), "' for reading");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  MOEKIT_CHECK(!in.bad(), Errc::kIoError, "cannot read '", path.string(), "'");
  return parse_csv(text, path.string(), options);
}

// Writes a dataset (format at the top of this file).
inline void write_csv(const std::filesystem::path& path, const Dataset& data) {
  check_dataset(data, "data");
  MOEKIT_CHECK_ARG(data.features >= 1, "data.features = ", data.features, " must be at least 1");
  const auto f = static_cast<std::size_t>(data.features);
  for (std::size_t k = 0; k < data.x.size(); ++k) {
    MOEKIT_CHECK(std::isfinite(data.x[k]), Errc::kNonFinite, "data.x(", k / f, ", ", k % f,
                 ") = ", data.x[k], " is not finite; CSV rows must be finite");
  }
  io::write_file_atomically(path, [&](std::ostream& out) {
    std::string line = "task,label";
    for (std::size_t j = 0; j < f; ++j) line += ",f" + std::to_string(j);
    line += '\n';
    out.write(line.data(), static_cast<std::streamsize>(line.size()));
    char buf[64];
    for (std::size_t i = 0; i < data.labels.size(); ++i) {
      line = std::to_string(data.tasks[i]);
      line += ',';
      line += std::to_string(data.labels[i]);
      for (std::size_t j = 0; j < f; ++j) {
        const auto res = std::to_chars(buf, buf + sizeof(buf), data.x[i * f + j]);
        line += ',';
        line.append(buf, res.ptr);
      }
      line += '\n';
      out.write(line.data(), static_cast<std::streamsize>(line.size()));
    }
  });
}

}  // namespace train
MOEKIT_NAMESPACE_END
