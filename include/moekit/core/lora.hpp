#pragma once
// LoRA math shared by every backend (docs/math.md, "LoRA"): the scaling factor, the
// initial values of A and the dropout mask on the adapter input. All are pure
// functions of their arguments (the random ones of a caller seed and an
// element counter, see moekit/core/random.hpp), so the CPU and CUDA backends,
// and a backward pass regenerating a forward pass's mask, agree bit for bit.
//
//   scale            s = alpha / R, or alpha / sqrt(R) with rsLoRA
//   init, A(r, j)    counter c = r d_in + j:
//                      kKaimingUniform  U(-bound, bound), bound = 1 / sqrt(d_in), drawn as
//                                       bound (2 random_uniform(seed, c) - 1); PyTorch's
//                                       kaiming_uniform_(a = sqrt(5)) on an R x d_in weight
//                      kGaussian        stddev random_normal(seed, c)
//                    B = 0, so the adapted layer starts equal to the base layer.
//   dropout          element (t, j) of the n x d_in adapter input is kept when
//                      random_uniform(key, (first_row + t) d_in + j) >= p,
//                      key = lora_dropout_key(seed, step, stream, i)
//                    and a kept element is scaled by 1 / (1 - p) (inverted dropout).
//                    first_row + t is the row in the whole batch (first_row from
//                    the LoraStep, 0 unless the call runs a slice), so a row's
//                    mask does not depend on how rows are grouped. (seed, step) come from the
//                    LoraStep; stream is the adapter's config.dropout_stream and
//                    i its index in a bank (0 for a LoraLinear), so adapters that
//                    share a LoraStep draw independent masks: give every adapter
//                    object of a model its own stream (two layers, Q and V, ...).

#include <cmath>
#include <cstdint>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"

MOEKIT_NAMESPACE_BEGIN

// How init() draws A (B always starts at zero).
enum class LoraInit {
  kKaimingUniform,  // U(-1/sqrt(d_in), 1/sqrt(d_in)) (PyTorch / PEFT default)
  kGaussian,        // N(0, stddev^2)
};

// One adapter on a frozen linear layer (cpu::LoraLinear, gpu::LoraLinear).
struct LoraConfig {
  index_t d_in = 0;                  // input width of the frozen layer
  index_t d_out = 0;                 // output width
  float alpha = 1.0f;                // s = alpha / R (alpha / sqrt(R) with rslora)
  bool rslora = false;               // rank-stabilised scaling
  float dropout = 0.0f;              // probability of dropping an adapter input element, in [0, 1)
  std::uint64_t dropout_stream = 0;  // this adapter's own masks (see "dropout" above)
};

// N adapters on one layer, each row picking its own (cpu::LoraBank, gpu::LoraBank).
struct LoraBankConfig {
  index_t d_in = 0;                  // input width of the frozen layer
  index_t d_out = 0;                 // output width
  index_t num_adapters = 0;          // N
  float alpha = 1.0f;                // shared by all adapters
  bool rslora = false;               // rank-stabilised scaling
  float dropout = 0.0f;              // as LoraConfig::dropout
  std::uint64_t dropout_stream = 0;  // adapter i draws from (stream, i)
};

// How init() draws A.
struct LoraInitConfig {
  LoraInit kind = LoraInit::kKaimingUniform;  // the distribution
  float stddev = 0.0f;                        // kGaussian only; 0 means 1 / R
  std::uint64_t seed = 0;                     // A(r, j) is drawn with counter r d_in + j
};

// Training or inference, and the dropout noise of this step.
struct LoraStep {
  bool training = false;   // dropout applies only when training
  std::uint64_t seed = 0;  // the run's seed
  std::uint64_t step = 0;  // a new mask every step; backward must get the same values
  // The batch index of the call's row 0: a call on a slice of the batch (a
  // token block, a rank's rows) draws the mask the whole batch would.
  index_t first_row = 0;
};

// Gradient outputs of the adapter(s), fp32, in the backend's memory (host
// for cpu::, device for gpu::); an empty view is frozen.
struct LoraGrads {
  MatrixView<float> da{};   // dL/dA, the shape of A
  MatrixView<float> db{};   // dL/dB, the shape of B
  bool accumulate = false;  // add to da / db instead of overwriting them
};

// A bank's row assignment, in the backend's memory: ids from the caller,
// order and offsets from the bank's group().
struct LoraRows {
  VectorView<const std::int32_t> ids{};  // n, each in [-1, N)
  VectorView<const index_t> order{};     // n
  VectorView<const index_t> offsets{};   // N + 1
};

// What every backend's constructor checks (Errc::kInvalidArgument).
inline void check_lora_config(const LoraConfig& c) {
  MOEKIT_CHECK_ARG(c.d_in >= 1, "config.d_in = ", c.d_in, " must be at least 1");
  MOEKIT_CHECK_ARG(c.d_out >= 1, "config.d_out = ", c.d_out, " must be at least 1");
  MOEKIT_CHECK_ARG(std::isfinite(c.alpha), "config.alpha = ", c.alpha, " must be finite");
  MOEKIT_CHECK_ARG(c.dropout >= 0.0f && c.dropout < 1.0f, "config.dropout = ", c.dropout,
                   " must be in [0, 1)");
}
// A bank's: the LoraConfig fields, and 1 <= num_adapters < 2^31.
inline void check_lora_config(const LoraBankConfig& c) {
  check_lora_config(LoraConfig{c.d_in, c.d_out, c.alpha, c.rslora, c.dropout, c.dropout_stream});
  MOEKIT_CHECK_ARG(c.num_adapters >= 1 && c.num_adapters <= INT32_MAX,
                   "config.num_adapters = ", c.num_adapters, " must be in [1, 2^31 - 1]");
}

// The factor of the low-rank update B A x: alpha / R, or alpha / sqrt(R)
// with rsLoRA.
MOEKIT_HOST_DEVICE inline float lora_scale(float alpha, int rank, bool rslora) {
  using std::sqrt;
  const float r = static_cast<float>(rank);
  return rslora ? alpha / sqrt(r) : alpha / r;
}

// Initial value of A(r, j) for counter = r d_in + j; `spread` is the bound
// (kKaimingUniform) or the standard deviation (kGaussian).
MOEKIT_HOST_DEVICE inline float lora_init_value(LoraInit kind, float spread, std::uint64_t seed,
                                                std::uint64_t counter) {
  if (kind == LoraInit::kGaussian) return spread * random_normal(seed, counter);
  return spread * (2.0f * random_uniform(seed, counter) - 1.0f);
}

// The `spread` lora_init_value wants for config c, rank R and d_in inputs,
// after checking c: the given stddev (or 1 / R when 0) for kGaussian,
// 1 / sqrt(d_in) for kKaimingUniform. Both backends' init call this.
template <int R>
float lora_init_spread(const LoraInitConfig& c, index_t d_in) {
  MOEKIT_CHECK_ARG(c.kind == LoraInit::kKaimingUniform || c.kind == LoraInit::kGaussian,
                   "init.kind = ", static_cast<int>(c.kind), " is not a LoraInit");
  MOEKIT_CHECK_ARG(std::isfinite(c.stddev) && c.stddev >= 0.0f, "init.stddev = ", c.stddev,
                   " must be finite and >= 0");
  return c.kind == LoraInit::kGaussian ? (c.stddev > 0.0f ? c.stddev : 1.0f / static_cast<float>(R))
                                       : 1.0f / std::sqrt(static_cast<float>(d_in));
}

// The dropout key of adapter `adapter` of stream `stream` at one training
// step (seed, step): the step's key, then the stream's, then the adapter's.
MOEKIT_HOST_DEVICE constexpr std::uint64_t lora_dropout_key(std::uint64_t seed, std::uint64_t step,
                                                            std::uint64_t stream,
                                                            std::uint64_t adapter) {
  return random_bits(random_bits(random_bits(seed, step), stream), adapter);
}

// Whether input element `counter` (= (first_row + t) d_in + j) survives
// dropout with probability p of being dropped.
MOEKIT_HOST_DEVICE constexpr bool lora_dropout_keep(std::uint64_t key, float p,
                                                    std::uint64_t counter) {
  return random_uniform(key, counter) >= p;
}

// The dropout of one call on the adapter input (the rule at the top):
// inactive in inference or with p = 0; element (t, j) of x has counter
// (first_row + t) d_in + j, and a kept element is scaled by 1 / (1 - p).
// make() gives the call's dropout for a stream; for_adapter(i) that of
// adapter i, whose key apply() uses.
struct LoraDropout {
  bool active = false;      // training with p > 0; when false, apply() is the identity
  std::uint64_t key = 0;    // the stream's key before for_adapter, the adapter's after
  float p = 0.0f;           // probability of dropping an element, in [0, 1)
  float keep_scale = 1.0f;  // 1 / (1 - p), applied to kept elements
  index_t width = 0;        // d_in
  index_t row0 = 0;         // LoraStep::first_row

  // The dropout of one call for probability p, at training step `step`, on
  // inputs of width d_in, for dropout stream `stream` (config.dropout_stream).
  static LoraDropout make(float p, const LoraStep& step, index_t d_in, std::uint64_t stream) {
    LoraDropout m;
    m.active = step.training && p > 0.0f;
    if (m.active) {
      m.key = random_bits(random_bits(step.seed, step.step), stream);
      m.p = p;
      m.keep_scale = 1.0f / (1.0f - p);
      m.width = d_in;
      m.row0 = step.first_row;
    }
    return m;
  }
  // The dropout of adapter i (i = 0 for a LoraLinear): key =
  // lora_dropout_key(seed, step, stream, i).
  MOEKIT_HOST_DEVICE constexpr LoraDropout for_adapter(index_t adapter) const {
    LoraDropout m = *this;
    if (m.active) m.key = random_bits(key, static_cast<std::uint64_t>(adapter));
    return m;
  }
  // v masked as element (t, j); v itself when inactive.
  MOEKIT_HOST_DEVICE float apply(float v, index_t t, index_t j) const {
    if (!active) return v;
    const auto counter = static_cast<std::uint64_t>((row0 + t) * width + j);
    return lora_dropout_keep(key, p, counter) ? v * keep_scale : 0.0f;
  }
};

MOEKIT_NAMESPACE_END
