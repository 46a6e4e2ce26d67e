#pragma once
// Quality checks of a training run of the reference multi-task model, as the
// architecture asks for them (docs/reference_model.md), as code a user can call:
//
//   encoder_frozen          the frozen tensors' bits are unchanged (fingerprints
//                           taken before and after training are equal)
//   aux_loss_decreasing     the mean aux loss over the last `window` steps is
//                           below the mean over the first `window` steps
//   expert_load_balanced    on an evaluation set, every MoE layer's busiest
//                           expert takes at most max_load_ratio times the mean
//                           share 1/E of the kept assignments
//   branches_above_chance   every branch with samples beats chance (1 / C_t)
//                           by at least `margin` in accuracy
//
// Each returns a QualityCheck: its name, whether it passed and a one-line
// detail with the numbers, for printing. None throws on a failed check; bad
// arguments (an empty history, a window of 0, mismatched sizes) do throw.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/nn/multitask_model.hpp"
#include "moekit/train/trainer.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace train {

// The outcome of one check, for printing.
struct QualityCheck {
  std::string name;     // what was checked, e.g. "encoder frozen"
  bool passed = false;  // whether the run met it
  std::string detail;   // one line with the numbers behind the verdict
};

// FNV-1a (64-bit) over the names and the value bits of the model's frozen
// tensors: equal before and after training iff none of them changed (up to
// the 2^-64 chance of a collision).
template <class Model>
std::uint64_t frozen_fingerprint(const Model& model) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  const auto mix = [&](const void* data, std::size_t bytes) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  };
  for (const cpu::ModelTensor& t : model.tensors()) {
    if (!cpu::is_frozen(t.role)) continue;
    mix(t.name.data(), t.name.size());
    mix(t.value.data(), t.value.size() * sizeof(float));
  }
  return h;
}

// Passes when the frozen_fingerprint values taken before and after training
// are equal.
inline QualityCheck encoder_frozen(std::uint64_t before, std::uint64_t after) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "fingerprint %016llx -> %016llx",
                static_cast<unsigned long long>(before), static_cast<unsigned long long>(after));
  return {"encoder frozen", before == after, buf};
}

// Passes when the mean of the last `window` entries of `aux` (one per step)
// is below the mean of the first `window`; needs window >= 1 and at least
// 2 window entries.
inline QualityCheck aux_loss_decreasing(std::span<const double> aux, std::size_t window) {
  MOEKIT_CHECK_ARG(window >= 1, "window = ", window, " must be at least 1");
  MOEKIT_CHECK_ARG(aux.size() >= 2 * window, "aux has ", aux.size(),
                   " entries, need at least 2 * window = ", 2 * window);
  const auto mean = [window](std::span<const double> part) {
    return std::accumulate(part.begin(), part.end(), 0.0) / static_cast<double>(window);
  };
  const double first = mean(aux.first(window)), last = mean(aux.last(window));
  char buf[128];
  std::snprintf(buf, sizeof buf, "mean of the first %zu steps %.5f, of the last %zu %.5f", window,
                first, window, last);
  return {"aux loss decreasing", last < first, buf};
}

// Passes when every MoE layer's eval.max_load_ratio (busiest expert over the
// mean share) is at most max_load_ratio (>= 1); eval must have MoE loads.
inline QualityCheck expert_load_balanced(const EvalReport& eval, double max_load_ratio) {
  MOEKIT_CHECK_ARG(max_load_ratio >= 1.0, "max_load_ratio = ", max_load_ratio,
                   " must be at least 1 (1 is perfect balance)");
  MOEKIT_CHECK_ARG(!eval.max_load_ratio.empty(), "eval has no MoE layer loads");
  const double worst = *std::max_element(eval.max_load_ratio.begin(), eval.max_load_ratio.end());
  std::string detail = "busiest expert / mean per layer:";
  char buf[32];
  for (const double r : eval.max_load_ratio) {
    std::snprintf(buf, sizeof buf, " %.2f", r);
    detail += buf;
  }
  std::snprintf(buf, sizeof buf, " (limit %.2f)", max_load_ratio);
  detail += buf;
  return {"expert load balanced", worst <= max_load_ratio, detail};
}

// Passes when every branch h with samples has accuracy >= 1 / classes[h] +
// margin; classes has one entry (>= 1) per branch of `eval`.
inline QualityCheck branches_above_chance(const EvalReport& eval, std::span<const index_t> classes,
                                          double margin) {
  MOEKIT_CHECK_ARG(classes.size() == eval.accuracy.size(), "classes has ", classes.size(),
                   " entries, eval has ", eval.accuracy.size(), " branches");
  bool ok = true;
  std::string detail = "accuracy / chance per branch:";
  char buf[48];
  for (std::size_t h = 0; h < classes.size(); ++h) {
    MOEKIT_CHECK_ARG(classes[h] >= 1, "classes[", h, "] = ", classes[h], " must be at least 1");
    const double chance = 1.0 / static_cast<double>(classes[h]);
    if (eval.count[h] > 0) ok = ok && eval.accuracy[h] >= chance + margin;
    std::snprintf(buf, sizeof buf, " %.3f/%.3f", eval.accuracy[h], chance);
    detail += buf;
  }
  return {"branches above chance", ok, detail};
}

}  // namespace train
MOEKIT_NAMESPACE_END
