#pragma once
// The CPU backend's results for the CUDA tests, behind a plain C++ interface:
// cpu_reference.cpp includes the CPU backend (Eigen) and is compiled by the
// host compiler, so the .cu tests never include Eigen. All matrices are
// dense row-major std::vectors.

#include <cstdint>
#include <utility>
#include <vector>

#include "moekit/core/activation.hpp"
#include "moekit/core/classification.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/nn/param_count.hpp"

namespace moekit_test {

struct CpuRouting {
  std::vector<float> scores;              // T x E
  std::vector<std::int32_t> ids;          // T x K
  std::vector<float> weights;             // T x K
  std::vector<std::int64_t> assigned;     // E
  std::vector<double> mean_distribution;  // E
  double z_loss = 0.0;
  std::int64_t non_finite = 0;
};

// A routing as the aux losses read it (the GPU's own outputs, fed to both).
struct SavedRouting {
  std::int64_t tokens = 0;
  std::vector<float> logits, scores, weights;  // T x E, T x E, T x K
  std::vector<std::int32_t> ids, positions;    // T x K
};

// A routing with capacity as cpu::Router::route writes it (default gating,
// no noise), next to the dropless routing of the same logits.
struct CpuCappedRouting {
  std::vector<std::int32_t> ids;         // T x K, dropless
  std::vector<float> weights;            // T x K, dropless: before capacity
  std::vector<std::int32_t> capped_ids;  // T x K, with capacity (the same experts)
  std::vector<std::int32_t> positions;   // T x K, with capacity: -1 where dropped
  std::vector<float> capped_weights;     // T x K, with capacity: 0 where dropped
  std::vector<std::int64_t> offsets;     // E + 1: cpu::dispatch_offsets of the capped routing
  std::int64_t capacity = 0;             // cpu::Router::capacity(T)
  std::vector<std::int64_t> assigned;    // E, the capped routing's RoutingStats
  std::vector<std::int64_t> kept;        // E
  std::int64_t dropped = 0;
};

template <int E, int K>
struct CpuReference {
  // cpu::Router::route with this gating (dropless, no noise); bias empty: none.
  static CpuRouting route(const std::vector<float>& logits, std::int64_t tokens,
                          const std::vector<float>& bias, const moekit::GatingConfig& gating);
  // cpu::Router::route twice on the same logits: dropless, then with `capacity`.
  static CpuCappedRouting route_with_capacity(const std::vector<float>& logits, std::int64_t tokens,
                                              const moekit::CapacityConfig& capacity);
  // cpu::Router::backward_gate on a saved routing (all slots kept).
  static std::vector<float> backward_gate(const SavedRouting& r, const std::vector<float>& dweights,
                                          const moekit::GatingConfig& gating);
  // The losses; each adds coeff * dL/dx to dlogits unless it is empty.
  static double switch_loss(moekit::GatingRule rule, const SavedRouting& r,
                            moekit::SwitchNormalization norm, float coeff,
                            std::vector<float>& dlogits);
  static double sequence_loss(moekit::GatingRule rule, const SavedRouting& r,
                              std::int64_t sequence_length, float coeff,
                              std::vector<float>& dlogits);
  static double z_loss(const SavedRouting& r, float coeff, std::vector<float>& dlogits);
  static double importance_load(const moekit::GatingConfig& gating, const SavedRouting& r,
                                float importance_weight, float load_weight, float coeff,
                                std::vector<float>& dlogits);
  // cpu::ExpertBias: biases from 0 after one update() with these counts.
  static std::vector<float> bias_update(float gamma, const std::vector<std::int64_t>& counts);
};

// Every (E, K) the CUDA router and dispatch tests use; cpu_reference.cpp instantiates them.
// clang-format off
#define MOEKIT_TEST_CUDA_SPECS(X) \
  X(1, 1) X(4, 2) X(4, 4) X(6, 3) X(6, 6) X(8, 1) X(8, 2) X(8, 3) X(16, 4) X(60, 4) X(60, 6) \
  X(64, 8) X(128, 8) X(256, 8) X(384, 22) X(512, 22)
// clang-format on

#define MOEKIT_TEST_DECLARE_REFERENCE(E, K) extern template struct CpuReference<E, K>;
MOEKIT_TEST_CUDA_SPECS(MOEKIT_TEST_DECLARE_REFERENCE)

// ---- LoRA (cpu_reference_lora.cpp) ----------------------------------------------

// One LoRA call's inputs, fp32, dense row-major. ids empty: cpu::LoraLinear
// (w required); else cpu::LoraBank with `adapters` adapters.
struct LoraCase {
  std::int64_t n = 0, d_in = 0, d_out = 0, adapters = 1;
  float alpha = 1.0f, dropout = 0.0f;
  bool rslora = false, training = false, accumulate = false;
  std::uint64_t seed = 0, step = 0;
  std::vector<std::int32_t> ids;  // n, or empty
  std::vector<float> x, dy;       // n x d_in, n x d_out
  std::vector<float> w, bias;     // d_out x d_in and d_out, or empty (bank)
  std::vector<float> a, b;        // N R x d_in, N d_out x R
  std::vector<float> y0, dx0;     // without w: the base values the bank adds to
  std::vector<float> da0, db0;    // with accumulate: the gradients added to
};

struct LoraResult {
  std::vector<float> y, h, dx, da, db;
  std::vector<std::int64_t> order, offsets;  // bank only
};

// forward then backward of the CPU backend on `c`.
template <int R>
LoraResult cpu_lora(const LoraCase& c);
// w after cpu::LoraBank::merge (sign > 0) or unmerge of adapter i.
template <int R>
std::vector<float> cpu_lora_merge(const LoraCase& c, std::int64_t adapter, float sign);
// a and b after cpu::LoraBank::init.
template <int R>
std::pair<std::vector<float>, std::vector<float>> cpu_lora_init(std::int64_t adapters,
                                                                std::int64_t d_in,
                                                                std::int64_t d_out,
                                                                std::uint64_t seed);

#define MOEKIT_TEST_LORA_RANKS(X) X(1) X(8) X(16) X(72)
#undef MOEKIT_TEST_DECLARE_REFERENCE

// ---- task heads, distillation and early exit (test_heads.cu) ---------------

// A task-head problem: dense row-major host data.
struct HeadsProblem {
  std::int64_t n = 0, d = 0;
  std::vector<std::int64_t> classes;  // C_h, H entries
  bool bias = true;
  std::vector<float> x;              // n x d
  std::vector<std::int32_t> tasks;   // n, or empty (H = 1)
  std::vector<std::int32_t> labels;  // n
  std::vector<float> w, b;           // (sum C) x d, sum C
  moekit::TaskWeighting kind = moekit::TaskWeighting::kFixed;
  std::vector<float> task_weights;  // kFixed: H or empty; kUncertainty: the H log_vars
  bool accumulate = false;
  std::vector<float> dw_in, db_in;  // the gradients before backward (accumulate)
};

// What cpu::TaskHeads computes: forward, loss (with dlogits and, for
// kUncertainty, dlog_vars), then backward from its own dlogits.
struct HeadsResult {
  std::vector<float> logits, dlogits, dlog_vars, dx, dw, db;
  double total = 0.0;
  std::vector<double> loss, accuracy;
  std::vector<std::int64_t> count;
};

template <int H>
struct CpuHeadsReference {
  static HeadsResult run(const HeadsProblem& p);
};

// cpu::distillation_loss; dstudent (n x C) is resized and written.
moekit::DistillationLoss cpu_distillation(const moekit::DistillationConfig& config,
                                          const std::vector<float>& student,
                                          const std::vector<float>& teacher, std::int64_t n,
                                          std::int64_t c, const std::vector<std::int32_t>& labels,
                                          std::vector<float>& dstudent);

// cpu::EarlyExit over a whole batch: exit i sees the live rows of
// exit_logits[i] (n x C, one row per sample). Per step: the live count, kept
// and state.original (their first m' entries).
struct ExitRun {
  std::vector<std::int32_t> prediction, exit;
  std::vector<float> confidence;
  std::vector<std::int64_t> live;
  std::vector<std::vector<std::int64_t>> kept, original;
};
ExitRun cpu_early_exit(const moekit::EarlyExitConfig& config,
                       const std::vector<std::vector<float>>& exit_logits, std::int64_t n,
                       std::int64_t c);

// cpu::multi_exit_loss with gradients (dlogits resized, k of n x C) and L_i.
double cpu_multi_exit_loss(const std::vector<std::vector<float>>& logits, std::int64_t n,
                           std::int64_t c, const std::vector<std::int32_t>& labels,
                           const std::vector<float>& exit_weights,
                           std::vector<std::vector<float>>& dlogits,
                           std::vector<double>& exit_losses);

// ---- end of task heads, distillation and early exit ------------------------

// ---- MoE layer (cpu_reference_moe_layer.cpp, test_moe_layer.cu) -----------

// Gradient buffers of a MoE layer, fp32 dense row-major: the start values a
// backward receives (an EMPTY vector is a frozen gradient, or for dx "no
// input gradient"; with accumulate the values are added to) and its results.
struct MoeLayerGradValues {
  std::vector<float> dx, dw_gate, dgate_bias, dw1, dw3, dw2, shared_dw1, shared_dw3, shared_dw2;
};

// One MoE layer problem (inputs and parameters fp32, dense row-major; empty
// gate_bias / selection_bias / w3 / shared weights: absent).
struct MoeLayerCase {
  std::int64_t tokens = 0, d = 0, f = 0, fs = 0;  // fs: d_ff_shared (0 = f)
  int num_shared = 0;
  moekit::FfnKind kind = moekit::FfnKind::kPlain;
  moekit::Activation activation = moekit::Activation::kGeluTanh;
  moekit::GatingConfig gating{};
  moekit::NoiseConfig noise{};
  moekit::CapacityConfig capacity{};
  float switch_coeff = 0.0f, z_coeff = 0.0f;
  moekit::SwitchNormalization normalization = moekit::SwitchNormalization::kTokensTimesK;
  std::vector<float> x, dy;                              // T x d
  std::vector<float> w_gate, gate_bias, selection_bias;  // E x d, E, E
  std::vector<float> w1, w3, w2;                         // routed experts
  std::vector<float> shared_w1, shared_w3, shared_w2;    // shared experts
  MoeLayerGradValues grads;
  bool accumulate = false;
};

// The layer configuration of `c` for either backend (cpu::MoeLayerConfig or
// gpu::MoeLayerConfig: the same field names).
template <class Config>
Config layer_config(const MoeLayerCase& c) {
  Config config;
  config.d_model = c.d;
  config.d_ff = c.f;
  config.kind = c.kind;
  config.activation = c.activation;
  config.router.gating = c.gating;
  config.router.noise = c.noise;
  config.router.capacity = c.capacity;
  config.num_shared = c.num_shared;
  config.d_ff_shared = c.fs;
  config.switch_coeff = c.switch_coeff;
  config.z_coeff = c.z_coeff;
  config.switch_options.normalization = c.normalization;
  return config;
}

struct MoeLayerResult {
  std::vector<float> y;
  MoeLayerGradValues grads;
  double switch_loss = 0.0, z_loss = 0.0, total = 0.0;
  std::vector<std::int32_t> ids, positions;  // T x K
  std::vector<float> weights;                // T x K
  std::vector<std::int64_t> offsets;         // E + 1
  std::int64_t dropped = 0;
};

// cpu::MoeLayer forward then backward on `c`, through moe_layer_step<CpuBackend>.
template <int E, int K>
MoeLayerResult cpu_moe_layer(const MoeLayerCase& c);

#define MOEKIT_TEST_MOE_LAYER_SPECS(X) X(8, 2) X(4, 1)
#define MOEKIT_TEST_DECLARE_MOE_LAYER(E, K) \
  extern template MoeLayerResult cpu_moe_layer<E, K>(const MoeLayerCase&);
MOEKIT_TEST_MOE_LAYER_SPECS(MOEKIT_TEST_DECLARE_MOE_LAYER)
#undef MOEKIT_TEST_DECLARE_MOE_LAYER

// ---- end of MoE layer --------------------------------------------------------

}  // namespace moekit_test
