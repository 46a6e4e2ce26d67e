#pragma once
// The router on the CPU backend: logits, gating, capacity, statistics and
// backward for MoeSpec<E, K> (math in moekit/core/routing.hpp).
//
//   moekit::cpu::Router<moekit::MoeSpec<8, 2>> router(config);  // validates config
//   router.forward(x, w_gate, gate_bias, selection_bias, routing, &stats, workspace);
//   ... combine gives dL/dweights ...
//   router.backward_gate(routing, dweights, dlogits);          // dlogits  = gate part
//   moekit::cpu::z_loss<Spec>(routing, 1e-3f, dlogits);         // dlogits += aux losses
//   router.backward_logits(x, w_gate, dlogits, grads, workspace);
//
// The router's weight is w_gate (E x d, the layout of torch.nn.Linear and of
// checkpoints: Mixtral's `gate.weight`), so logits = x w_gate^T + gate_bias.
//
// A token's logits are batch invariant (gate_logits: each logit summed in one
// fixed order: on the row kernel below 16 experts, on the GEMM engine from
// 16 on), and so is its dx (gate_input_gradient); dw_gate and dbias sum
// over the tokens in order (gate_weight_gradient: one multiply-add chain per
// element below 16 experts, the engine per block of kTokenBlock rows folded
// in order from 16 on; dbias folded over the blocks). So a token's logits
// and every gradient are the same bits however the batch is split over the
// ranks of an expert-parallel group (at block boundaries). Nothing runs on
// Eigen's GEMM, so nothing allocates. The pieces an expert-parallel layer
// composes are public: logits() (with the global index of the first token,
// for the noise counters), gate() (scores, top-K and weights of each row, no
// capacity), number_in_order() and the statistics' StatSums /
// finish_stats(), and backward_gate() / backward_logits().

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/token_blocks.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/elementwise.hpp"
#include "moekit/cpu/gemm/gemm.hpp"
#include "moekit/cpu/memory_kernels.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

static_assert(sizeof(int) == sizeof(std::int32_t), "expert ids are 32-bit ints");

// The router's configuration (the rules in core/routing.hpp); the
// constructor validates it.
struct RouterConfig {
  GatingConfig gating{};                                    // rule, renormalisation, groups
  NoiseConfig noise{};                                      // training noise (off by default)
  CapacityConfig capacity{};                                // capacity factor and drop policy
  NonFinitePolicy non_finite = NonFinitePolicy::kSanitize;  // what a NaN/Inf logit does
};

// The routing of a batch (defined in core/routing.hpp, shared with the CUDA backend).
using ::moekit::Routing;

// Gradients of the router's inputs; an empty view is not computed. With
// `accumulate`, results are added to what the views hold.
struct RouterGrads {
  MatrixView<float> dx{};       // T x d
  MatrixView<float> dw_gate{};  // E x d
  VectorView<float> dbias{};    // E
  bool accumulate = false;      // add to the views instead of overwriting
};

// Cheap enough to leave on: gating computes them in the same pass over the
// tokens (O(T E) additions and, for z_loss, one scalar exp per logit).
template <MoeSpecType S>
struct RoutingStats {
  static constexpr int kExperts = S::num_experts;     // E
  index_t tokens = 0;                                 // T, the tokens routed
  std::array<index_t, to_size(kExperts)> assigned{};  // assignments per expert, before capacity
  std::array<index_t, to_size(kExperts)> kept{};      // after capacity
  std::array<double, to_size(kExperts)>
      mean_distribution{};        // mean over tokens of q (routing distribution)
  index_t dropped = 0;            // assignments dropped by capacity
  index_t non_finite_logits = 0;  // NaN or Inf logits seen (NonFinitePolicy::kSanitize)
  // The router z-loss of the batch, mean_t logsumexp(logits_t)^2 (rows with
  // a NaN or +inf logit, or only -inf, add 0; a -inf logit alone is a masked
  // expert): the same bits as cpu::z_loss(routing, 1).
  double z_loss = 0.0;

  // Entropy (nats) of mean_distribution: log(E) when the router spreads its
  // probability evenly, 0 when it always picks the same expert.
  double entropy() const {
    double h = 0.0;
    for (double q : mean_distribution) h -= q > 0.0 ? q * std::log(q) : 0.0;
    return h;
  }
  // Fraction of experts that kept at least one assignment.
  double utilization() const {
    const auto used = std::count_if(kept.begin(), kept.end(), [](index_t c) { return c > 0; });
    return static_cast<double>(used) / kExperts;
  }
  // Busiest expert's assignments over the mean: 1 is perfect balance.
  double max_load_ratio() const {
    if (tokens == 0) return 0.0;
    const double mean = static_cast<double>(tokens) * S::top_k / kExperts;
    return static_cast<double>(*std::max_element(assigned.begin(), assigned.end())) / mean;
  }
};

// Every view of a Routing for `tokens` tokens has its documented shape.
template <MoeSpecType S>
void check_routing(const Routing& r, index_t tokens) {
  // Slot numbers t * K + k and buffer positions are 32-bit.
  MOEKIT_CHECK_ARG(tokens <= std::numeric_limits<std::int32_t>::max() / S::top_k,
                   "tokens = ", tokens, " times K = ", S::top_k, " exceeds the 32-bit slot range");
  check_shape(r.logits, tokens, S::num_experts, "routing.logits");
  check_shape(r.scores, tokens, S::num_experts, "routing.scores");
  check_shape(r.expert_ids, tokens, S::top_k, "routing.expert_ids");
  check_shape(r.weights, tokens, S::top_k, "routing.weights");
  check_shape(r.positions, tokens, S::top_k, "routing.positions");
}

// Expert ids that come back from the caller (saved routing on backward, the
// losses) are checked before they index anything.
template <MoeSpecType S>
void check_expert_ids(MatrixView<const std::int32_t> ids, const char* name) {
  for (index_t t = 0; t < ids.rows(); ++t) {
    for (index_t k = 0; k < ids.cols(); ++k) {
      MOEKIT_CHECK(ids(t, k) >= 0 && ids(t, k) < S::num_experts, Errc::kOutOfRange, name, "(", t,
                   ", ", k, ") = ", ids(t, k), " is outside [0, ", S::num_experts, ")");
    }
  }
}

// A token's ids must be distinct (backward writes one gradient per id, and
// capacity counts one slot per id).
inline void check_distinct_ids(MatrixView<const std::int32_t> ids, const char* name) {
  for (index_t t = 0; t < ids.rows(); ++t) {
    for (index_t k = 1; k < ids.cols(); ++k) {
      for (index_t j = 0; j < k; ++j) {
        MOEKIT_CHECK(ids(t, k) != ids(t, j), Errc::kInvalidArgument, name, " row ", t,
                     " repeats expert ", ids(t, k));
      }
    }
  }
}

// Assignments per expert (before capacity). ids must be in range.
template <MoeSpecType S>
std::array<index_t, S::num_experts> assignment_counts(MatrixView<const std::int32_t> ids) {
  std::array<index_t, S::num_experts> count{};
  for (index_t t = 0; t < ids.rows(); ++t) {
    for (int k = 0; k < S::top_k; ++k) ++count[to_size(ids(t, k))];
  }
  return count;
}

// Fixed token chunks for deterministic parallel work: the chunk count depends
// on E only, never on the thread count, and per-chunk partial results are
// combined in chunk order, so every thread count gives the same bits. Small E
// gets more chunks (finer load balance); large E fewer (the per-chunk
// partials, kCount x E values, live on the stack).
template <int E>
struct TokenChunks {
  static constexpr int kCount = std::clamp(4096 / E, 16, 64);  // chunks
  index_t tokens;                                              // T
  index_t size;  // tokens per chunk (the last may be short or empty)
  // Chunks of t tokens.
  explicit TokenChunks(index_t t) : tokens(t), size((t + kCount - 1) / kCount) {}
  // The first token of chunk c.
  index_t begin(std::size_t c) const { return std::min(tokens, static_cast<index_t>(c) * size); }
  // One past the last token of chunk c.
  index_t end(std::size_t c) const { return begin(c + 1); }
};

// acc += q_t, the routing distribution of one token (routing::routing_distribution:
// p for the softmax rules, s / sum(s) for sigmoid, uniform for a zero row), in double.
template <int E>
void add_routing_distribution(GatingRule rule, const float* scores, double* acc) {
  if (rule != GatingRule::kSigmoid) {
    for (int e = 0; e < E; ++e) acc[e] += static_cast<double>(scores[e]);
    return;
  }
  double total = 0.0;
  for (int e = 0; e < E; ++e) total += static_cast<double>(scores[e]);
  if (!(total > 0.0)) {
    for (int e = 0; e < E; ++e) acc[e] += 1.0 / E;
    return;
  }
  const double scale = 1.0 / total;
  for (int e = 0; e < E; ++e) acc[e] += static_cast<double>(scores[e]) * scale;
}

// Sum over tokens of the routing distribution q_t, in double, by TokenChunks:
// the same bits as the router's statistics (which fuse this into gating).
template <MoeSpecType S>
std::array<double, S::num_experts> routing_distribution_sum(GatingRule rule,
                                                            MatrixView<const float> scores) {
  constexpr int E = S::num_experts;
  const TokenChunks<E> chunks(scores.rows());
  std::array<std::array<double, to_size(E)>, to_size(TokenChunks<E>::kCount)> partial{};
  MOEKIT_PARALLEL_FOR_IF(scores.rows() * E > kLightParallelGrain)
  for (std::size_t c = 0; c < TokenChunks<E>::kCount; ++c) {
    for (index_t t = chunks.begin(c); t < chunks.end(c); ++t) {
      add_routing_distribution<E>(rule, scores.row(t), partial[c].data());
    }
  }
  std::array<double, to_size(E)> sum{};
  for (const auto& p : partial) {
    for (std::size_t e = 0; e < E; ++e) sum[e] += p[e];
  }
  return sum;
}

// True when every element is finite (by bits, so also under -ffast-math;
// the branch-free loop vectorises).
inline bool all_finite(VectorView<const float> v) {
  std::uint32_t exponent_all_ones = 0;
  for (index_t i = 0; i < v.size(); ++i) {
    exponent_all_ones |=
        static_cast<std::uint32_t>((routing::float_bits(v[i]) & 0x7f800000u) == 0x7f800000u);
  }
  return exponent_all_ones == 0;
}

// Below this, exp(x - max) is under float's normal range.
inline constexpr float kExpFloor = -87.0f;

// out = exp(x - max x) for one finite row of E logits, vectorised
// (cpu::shifted_exp_row: the same bits on every CPU path and in every
// translation unit); returns the max and the sum, so logsumexp = max +
// log(sum). Entries below kExpFloor are flushed to 0 so tiny values match
// the scalar rule's (core/routing.hpp). The one implementation behind
// softmax gating.
struct ShiftedExp {
  float max;  // max x
  float sum;  // sum of exp(x - max)
};

// The function described above, for E logits.
template <int E>
ShiftedExp shifted_exp(const float* x, float* out) {
  const RowExpSum r = shifted_exp_row(x, E, kExpFloor, out);
  return {r.max, r.sum};
}

// Sum over [0, n) of f(i) in double by TokenChunks<E>: deterministic for any
// thread count. Parallel when n E passes kLightParallelGrain.
template <int E, class F>
double chunked_sum(index_t n, F&& f) {
  const TokenChunks<E> chunks(n);
  double partial[TokenChunks<E>::kCount] = {};
  MOEKIT_PARALLEL_FOR_IF(n * E > kLightParallelGrain)
  for (std::size_t c = 0; c < TokenChunks<E>::kCount; ++c) {
    for (index_t i = chunks.begin(c); i < chunks.end(c); ++i) partial[c] += f(i);
  }
  double sum = 0.0;
  for (double p : partial) sum += p;
  return sum;
}

// Rows per run of gate_logits' row kernel (a thread's unit of work).
inline constexpr index_t kGateRows = 64;

// kernel(rows of in, rows of out, count) for fixed runs of kGateRows rows of
// in and out (the same rows of both), the runs split over threads when
// `parallel`: a row's result never depends on which run or thread took it.
template <class Kernel>
void for_each_row_run(MatrixView<const float> in, MatrixView<float> out,
                      [[maybe_unused]] bool parallel, const Kernel& kernel) {
  const index_t rows = in.rows();
  const index_t runs = (rows + kGateRows - 1) / kGateRows;
  MOEKIT_PARALLEL_FOR_IF(parallel)
  for (index_t i = 0; i < runs; ++i) {
    const index_t first = i * kGateRows, end = std::min(first + kGateRows, rows);
    const float* rows_in[kGateRows];
    float* rows_out[kGateRows];
    for (index_t t = first; t < end; ++t) {
      rows_in[t - first] = in.row(t);
      rows_out[t - first] = out.row(t);
    }
    kernel(rows_in, rows_out, end - first);
  }
}

// From this many experts on, the logits run on the GEMM engine; below it on
// the row kernel. The engine's register blocks are 16 columns wide, so with
// fewer experts it mostly computes padding, while the row kernel (register
// tiles of 2 x 2 tokens x experts on AVX2) reads w_gate once per pair of
// tokens, which costs more than the engine's packed panels once w_gate
// outgrows the L1 cache. Measured in bench_routing (docs/determinism.md).
inline constexpr int kEngineLogitsMinExperts = 16;

// Bytes of workspace gate_logits needs for E experts and width d: the
// engine's packing buffers (cpu/gemm/gemm.hpp) from kEngineLogitsMinExperts
// on, else none.
template <int E>
inline index_t gate_logits_workspace_size(index_t d_model) {
  return E >= kEngineLogitsMinExperts && d_model > 0 ? gemm_workspace_size(max_threads()) : 0;
}

// logits = x w_gate^T (T x d times d x E), batch invariant: each logit is
// one dot product of a token's row with an expert's row, summed over d in
// an order fixed by d alone, whatever the other rows and the thread count;
// the same bits on every CPU path. Below kEngineLogitsMinExperts experts:
// memory_kernels.hpp's multi_row_dots (16 lanes over d, then a fixed tree),
// threads taking fixed runs of kGateRows rows; E is a run-time length there
// (a kernel unrolled over E cost minutes of compile time per expert count).
// From it on: the GEMM engine in fp32 (one multiply-add chain over d per
// logit), in workspace (gate_logits_workspace_size bytes).
template <int E>
void gate_logits(MatrixView<const float> x, MatrixView<const float> w_gate,
                 MatrixView<float> logits, VectorView<std::byte> workspace) {
  if constexpr (E >= kEngineLogitsMinExperts) {
    gemm({.dtype = GemmDtype::kFloat32, .op_a = Op::kNone, .op_b = Op::kTrans}, x, w_gate, logits,
         workspace);
  } else {
    for_each_row_run(
        x, logits, x.rows() * x.cols() * E > kParallelGrain,
        [&](const float* const* rows_x, float* const* rows_z, index_t count) {
          with_vec_path([&](auto path) { multi_row_dots(path, w_gate, rows_x, rows_z, count); });
        });
  }
}

// Columns of dw_gate per thread's unit of work in gate_weight_gradient.
inline constexpr index_t kGateColumns = 64;

// dx (+)= dlogits w_gate (T x E times E x d), batch invariant: a row of dx
// depends on its own row of dlogits only. Below kEngineLogitsMinExperts
// experts: memory_kernels.hpp's combine_rows (per element one multiply-add
// chain over the experts in order, from dx's value with `accumulate`),
// threads taking fixed runs of kGateRows rows; from it on: the GEMM engine
// (beta = 1 with accumulate), in workspace (gate_logits_workspace_size bytes).
template <int E>
void gate_input_gradient(MatrixView<const float> dlogits, MatrixView<const float> w_gate,
                         MatrixView<float> dx, bool accumulate, VectorView<std::byte> workspace) {
  if constexpr (E >= kEngineLogitsMinExperts) {
    gemm({.dtype = GemmDtype::kFloat32, .beta = accumulate ? 1.0f : 0.0f}, dlogits, w_gate, dx,
         workspace);
  } else {
    for_each_row_run(dlogits, dx, dlogits.rows() * w_gate.cols() * E > kParallelGrain,
                     [&](const float* const* rows_g, float* const* rows_dx, index_t count) {
                       with_vec_path([&](auto path) {
                         combine_rows(path, rows_g, w_gate, rows_dx, count, accumulate);
                       });
                     });
  }
}

// dw_gate (+)= dlogits^T x (E x T times T x d), the sum over tokens in token
// order. Below kEngineLogitsMinExperts experts: memory_kernels.hpp's
// add_outer_products (per element one multiply-add chain over the tokens,
// from 0, or from dw_gate's value with `accumulate`), threads taking fixed
// runs of kGateColumns columns: the bits depend on the tokens' order only,
// and a batch split into consecutive parts, each continuing from the last
// (the expert-parallel layer's ranks), gives the same chain. From it on: the
// GEMM engine once per token block (core/token_blocks.hpp), folded in order.
template <int E>
void gate_weight_gradient(MatrixView<const float> dlogits, MatrixView<const float> x,
                          MatrixView<float> dw_gate, bool accumulate,
                          VectorView<std::byte> workspace) {
  if constexpr (E >= kEngineLogitsMinExperts) {
    for_each_token_block(dlogits.rows(), [&](index_t r0, index_t rows, index_t b) {
      const bool add = accumulate || b > 0;
      gemm({.dtype = GemmDtype::kFloat32, .op_a = Op::kTrans, .beta = add ? 1.0f : 0.0f},
           dlogits.middle_rows(r0, rows), x.middle_rows(r0, rows), dw_gate, workspace);
    });
  } else {
    if (!accumulate) as_eigen(dw_gate).setZero();
    const index_t d = dw_gate.cols();
    const index_t runs = (d + kGateColumns - 1) / kGateColumns;
    [[maybe_unused]] const bool parallel = dlogits.rows() * d * E > kParallelGrain;
    MOEKIT_PARALLEL_FOR_IF(parallel)
    for (index_t i = 0; i < runs; ++i) {
      const index_t j1 = std::min((i + 1) * kGateColumns, d);
      with_vec_path(
          [&](auto path) { add_outer_products(path, dlogits, x, dw_gate, i * kGateColumns, j1); });
    }
  }
}

namespace detail {

// Top-K of 16 tokens at once, token l in lane l: keys is E x 16 (expert-major),
// ids_out K x 16. Same order and tie rule as routing::insert_sorted (which it
// matches bit for bit); with GCC/Clang vector extensions the K lists live in
// SIMD registers (one zmm per entry with AVX-512), where the portable loop
// keeps them in memory and stalls on store-to-load forwarding at every key.
inline constexpr int kSelectLanes = 16;

#if defined(__GNUC__)
using LaneFloats = float __attribute__((vector_size(4 * kSelectLanes)));
using LaneInts = std::int32_t __attribute__((vector_size(4 * kSelectLanes)));

template <int E, int K>
MOEKIT_FORCE_INLINE void top_k_lanes(const float* keys, int* ids_out) {
  LaneFloats vals[to_size(K)];
  LaneInts ids[to_size(K)];
  for (int j = 0; j < K; ++j) {
    vals[j] = LaneFloats{} - routing::kInf;  // scalar operands broadcast
    ids[j] = LaneInts{} + routing::kNoId;
  }
  for (int e = 0; e < E; ++e) {
    LaneFloats v;
    std::memcpy(&v, keys + e * kSelectLanes, sizeof v);
    const LaneInts id = LaneInts{} + e;
    LaneInts before[to_size(K)];  // v precedes entry j (a suffix of each list)
    for (int j = 0; j < K; ++j) before[j] = (v > vals[j]) | ((v == vals[j]) & (id < ids[j]));
    for (int j = K - 1; j > 0; --j) {
      const LaneFloats shifted_val = before[j - 1] ? vals[j - 1] : v;
      const LaneInts shifted_id = before[j - 1] ? ids[j - 1] : id;
      vals[j] = before[j] ? shifted_val : vals[j];
      ids[j] = before[j] ? shifted_id : ids[j];
    }
    vals[0] = before[0] ? v : vals[0];
    ids[0] = before[0] ? id : ids[0];
  }
  std::memcpy(ids_out, ids, sizeof ids);
}
#else
template <int E, int K>
void top_k_lanes(const float* keys, int* ids_out) {
  float vals[K * kSelectLanes];
  routing::clear_top<K, kSelectLanes>(vals, ids_out);
  for (int e = 0; e < E; ++e) {
    routing::insert_sorted<K, kSelectLanes>(keys + e * kSelectLanes, e, vals, ids_out);
  }
}
#endif

}  // namespace detail

// The router for MoeSpec<E, K> (see the top of this file).
template <MoeSpecType S>
class Router {
 public:
  static constexpr int kExperts = S::num_experts;  // E
  static constexpr int kTopK = S::top_k;           // K

  // Rejects a configuration that cannot route (naming the field and value).
  explicit Router(const RouterConfig& config) : config_(config) { validate(config); }

  // The configuration it was built with.
  const RouterConfig& config() const { return config_; }

  // Slots per expert for a batch of `tokens` (tokens when dropless).
  index_t capacity(index_t tokens) const {
    return expert_capacity(tokens, kExperts, kTopK, config_.capacity.factor);
  }

  // Bytes of scratch forward, route, logits and backward_logits need: the
  // jittered input (T x d floats) with jitter, followed by the logits
  // product's buffers (gate_logits_workspace_size: from 16 experts on, the
  // GEMM engine's, about 2.2 MiB per thread); the slot order (T x K ints)
  // with the kProbs drop policy, needed after the logits, so it shares the
  // start. route() (d_model = 0) needs the slot order only. 0 for most
  // configurations below 16 experts. Aligned to 4 bytes.
  index_t workspace_size(index_t tokens, index_t d_model) const {
    const index_t logits_bytes = tokens > 0 ? gate_logits_workspace_size<kExperts>(d_model) : 0;
    const index_t slot_bytes =
        drops_by_weight() ? tokens * kTopK * index_t{sizeof(std::int32_t)} : 0;
    return std::max(jitter_bytes(tokens, d_model) + logits_bytes, slot_bytes);
  }

  // logits = x w_gate^T + gate_bias (+ noise), then route(). gate_bias and
  // selection_bias may be empty.
  void forward(MatrixView<const float> x, MatrixView<const float> w_gate,
               VectorView<const float> gate_bias, VectorView<const float> selection_bias,
               const Routing& out, RoutingStats<S>* stats = nullptr,
               VectorView<std::byte> workspace = {}) const {
    MOEKIT_API("cpu::Router::forward");
    const index_t tokens = x.rows();
    check_logits_args(x, w_gate, gate_bias, out.logits, workspace);
    check_routing<S>(out, tokens);
    check_selection_bias(selection_bias);
    OverlapCheck("cpu::Router::forward")
        .out({MOEKIT_ROUTING_ARGS(out, "out"),
              {workspace.segment(0, workspace_size(tokens, x.cols())), "workspace"}})
        .in({{x, "x"},
             {w_gate, "w_gate"},
             {gate_bias, "gate_bias"},
             {selection_bias, "selection_bias"}})
        .check();
    compute_logits(x, w_gate, gate_bias, out.logits, workspace, 0);
    route_validated(out, selection_bias, stats, workspace);
  }

  // logits = x w_gate^T + gate_bias (+ noise) alone (T x E), batch
  // invariant (gate_logits). Row t is the batch's token first_token + t: the noise
  // counters (jitter: (first_token + t) d + j, Gaussian: (first_token + t) E
  // + e) are those of the whole batch, so ranks that each hold a slice draw
  // what one process would.
  void logits(MatrixView<const float> x, MatrixView<const float> w_gate,
              VectorView<const float> gate_bias, MatrixView<float> logits,
              VectorView<std::byte> workspace = {}, index_t first_token = 0) const {
    MOEKIT_API("cpu::Router::logits");
    check_logits_args(x, w_gate, gate_bias, logits, workspace);
    MOEKIT_CHECK_ARG(first_token >= 0, "first_token = ", first_token, " is negative");
    OverlapCheck("cpu::Router::logits")
        .out({{logits, "logits"},
              {workspace.segment(0, workspace_size(x.rows(), x.cols())), "workspace"}})
        .in({{x, "x"}, {w_gate, "w_gate"}, {gate_bias, "gate_bias"}})
        .check();
    compute_logits(x, w_gate, gate_bias, logits, workspace, first_token);
  }

  // Scores, top-K ids and weights of every row of out (logits given), with
  // no capacity: positions are not written. Returns the rows with a
  // non-finite logit (NonFinitePolicy::kError rejects them first).
  index_t gate(const Routing& out, VectorView<const float> selection_bias) const {
    MOEKIT_API("cpu::Router::gate");
    const index_t tokens = out.logits.rows();
    check_routing<S>(out, tokens);
    check_selection_bias(selection_bias);
    if (config_.non_finite == NonFinitePolicy::kError) reject_non_finite(out.logits);
    const float* bias = selection_bias.empty() ? nullptr : selection_bias.data();
    index_t non_finite = 0;
    for (index_t b = 0; b < tokens; b += kRowBlock) {
      const index_t rows = std::min(kRowBlock, tokens - b);
      non_finite += score_rows(out, b, rows, nullptr);
      select_rows(out, bias, b, rows);
    }
    return non_finite;
  }

  // Capacity by position (kPosition, and dropless) for the slots of tokens
  // [first, end), in (t, k) order: slot (t, k) of expert e takes position
  // next[e]++ and is kept when that is below cap; otherwise it gets position
  // -1 and weight 0. Returns the slots dropped. next[e] starts at the slots
  // of e before `first` (in the whole batch), so a slice numbers its slots as
  // the whole batch would.
  static index_t number_in_order(MatrixView<const std::int32_t> ids, MatrixView<float> weights,
                                 MatrixView<std::int32_t> positions, index_t first, index_t end,
                                 index_t cap, std::array<std::int32_t, to_size(kExperts)>& next) {
    index_t dropped = 0;
    for (index_t t = first; t < end; ++t) {
      for (int k = 0; k < kTopK; ++k) {
        const std::int32_t p = next[to_size(ids(t, k))]++;
        if (p < cap) {
          positions(t, k) = p;
        } else {
          positions(t, k) = -1;
          weights(t, k) = 0.0f;
          ++dropped;
        }
      }
    }
    return dropped;
  }

  // The chunk sums behind RoutingStats' mean distribution and z-loss
  // (TokenChunks<E> of the whole batch): add_token_stats() adds one token's q_t
  // and logsumexp^2 to its chunk, in token order, exactly as the routing
  // pass does; finish_stats() writes the statistics. A batch split over ranks
  // passes these sums from rank to rank (dist::pass_along_ranks).
  struct StatSums {
    // Per chunk, the sum of q_t (per expert).
    std::array<std::array<double, to_size(kExperts)>, to_size(TokenChunks<kExperts>::kCount)>
        distribution{};
    // Per chunk, the sum of logsumexp(logits_t)^2.
    std::array<double, to_size(TokenChunks<kExperts>::kCount)> lse_square{};
  };
  // Adds one token's q_t and logsumexp^2 to chunk `chunk` of sums.
  void add_token_stats(StatSums& sums, std::size_t chunk, const float* logits,
                       const float* scores) const {
    add_routing_distribution<kExperts>(config_.gating.rule, scores,
                                       sums.distribution[chunk].data());
    sums.lse_square[chunk] += routing::z_loss_token<kExperts>(logits, 0.0, 1.0, nullptr);
  }
  // Writes the statistics of a batch of `tokens` tokens from the chunk sums and the counts.
  static void finish_stats(const StatSums& sums, index_t tokens,
                           const std::array<index_t, to_size(kExperts)>& assigned, index_t cap,
                           index_t dropped, index_t non_finite, RoutingStats<S>& stats) {
    stats.tokens = tokens;
    stats.assigned = assigned;
    for (std::size_t e = 0; e < kExperts; ++e) stats.kept[e] = std::min(assigned[e], cap);
    stats.dropped = dropped;
    stats.non_finite_logits = non_finite;
    std::array<double, to_size(kExperts)> sum{};
    double lse_sum = 0.0;
    for (std::size_t c = 0; c < sums.lse_square.size(); ++c) {
      for (std::size_t e = 0; e < kExperts; ++e) sum[e] += sums.distribution[c][e];
      lse_sum += sums.lse_square[c];
    }
    const double n_tokens = static_cast<double>(tokens);
    for (std::size_t e = 0; e < kExperts; ++e) {
      stats.mean_distribution[e] = tokens > 0 ? sum[e] / n_tokens : 0.0;
    }
    stats.z_loss = tokens > 0 ? lse_sum / n_tokens : 0.0;
  }

  // Gating, capacity and statistics from logits the caller already wrote to
  // out.logits (for routers whose logits come from elsewhere). No noise is
  // added here: noise belongs to forward, which draws it with the logits.
  void route(const Routing& out, VectorView<const float> selection_bias,
             RoutingStats<S>* stats = nullptr, VectorView<std::byte> workspace = {}) const {
    MOEKIT_API("cpu::Router::route");
    check_routing<S>(out, out.logits.rows());
    check_selection_bias(selection_bias);
    check_workspace(workspace, out.logits.rows(), 0);
    OverlapCheck("cpu::Router::route")  // out.logits is read (and kept)
        .out({{out.scores, "out.scores"},
              {out.expert_ids, "out.expert_ids"},
              {out.weights, "out.weights"},
              {out.positions, "out.positions"},
              {workspace.segment(0, workspace_size(out.logits.rows(), 0)), "workspace"}})
        .in({{out.logits, "out.logits"}, {selection_bias, "selection_bias"}})
        .check();
    route_validated(out, selection_bias, stats, workspace);
  }

  // Capacity alone, for expert ids and weights chosen elsewhere (an external
  // router, a saved routing): with this router's capacity factor and drop
  // policy, writes positions (T x K: the slot in the expert's buffer, or -1
  // when dropped) and zeroes the weights of dropped assignments, exactly as
  // forward and route do after their own selection. ids (T x K) must be in
  // [0, E) and distinct within a token. Returns the number dropped.
  // workspace: workspace_size(T, 0) bytes (the kProbs policy's slot order).
  index_t apply_capacity(MatrixView<const std::int32_t> expert_ids, MatrixView<float> weights,
                         MatrixView<std::int32_t> positions,
                         VectorView<std::byte> workspace = {}) const {
    MOEKIT_API("cpu::Router::apply_capacity");
    check_view(expert_ids, "expert_ids");
    const index_t tokens = expert_ids.rows();
    MOEKIT_CHECK_ARG(tokens <= std::numeric_limits<std::int32_t>::max() / kTopK,
                     "tokens = ", tokens, " times K = ", kTopK, " exceeds the 32-bit slot range");
    check_shape(expert_ids, tokens, kTopK, "expert_ids");
    check_shape(weights, tokens, kTopK, "weights");
    check_shape(positions, tokens, kTopK, "positions");
    check_expert_ids<S>(expert_ids, "expert_ids");
    check_distinct_ids(expert_ids, "expert_ids");
    check_workspace(workspace, tokens, 0);
    OverlapCheck("cpu::Router::apply_capacity")
        .out({{weights, "weights"},
              {positions, "positions"},
              {workspace.segment(0, workspace_size(tokens, 0)), "workspace"}})
        .in({{expert_ids, "expert_ids"}})
        .check();
    const index_t cap = capacity(tokens);
    if (drops_by_weight()) {
      return drop_lowest_weights(expert_ids, weights, positions, assignment_counts<S>(expert_ids),
                                 cap, workspace);
    }
    std::array<std::int32_t, to_size(kExperts)> next{};
    return number_in_order(expert_ids, weights, positions, 0, tokens, cap, next);
  }

  // What selection ranked for token t of a routing this router wrote
  // (routed.logits and routed.scores, T x E; selection_bias as given to
  // forward or route): the selection keys, and with group limits the group
  // scores and kept groups (routing::SelectionTrace).
  routing::SelectionTrace<kExperts> explain_selection(const Routing& routed,
                                                      VectorView<const float> selection_bias,
                                                      index_t t) const {
    MOEKIT_API("cpu::Router::explain_selection");
    const index_t tokens = routed.logits.rows();
    check_shape(routed.logits, tokens, kExperts, "routed.logits");
    check_shape(routed.scores, tokens, kExperts, "routed.scores");
    check_selection_bias(selection_bias);
    MOEKIT_CHECK_RANGE(t, 0, tokens);
    return routing::trace_selection<kExperts>(
        routed.logits.row(t), routed.scores.row(t),
        selection_bias.empty() ? nullptr : selection_bias.data(), config_.gating);
  }

  // dlogits = (d weights / d logits)^T dweights, overwriting dlogits. Slots
  // dropped by capacity carry no gradient.
  void backward_gate(const Routing& saved, MatrixView<const float> dweights,
                     MatrixView<float> dlogits) const {
    MOEKIT_API("cpu::Router::backward_gate");
    const index_t tokens = saved.logits.rows();
    check_routing<S>(saved, tokens);
    check_shape(dweights, tokens, kTopK, "dweights");
    check_shape(dlogits, tokens, kExperts, "dlogits");
    check_expert_ids<S>(saved.expert_ids, "routing.expert_ids");
    check_distinct_ids(saved.expert_ids, "routing.expert_ids");
    OverlapCheck("cpu::Router::backward_gate")
        .out({{dlogits, "dlogits"}})
        .in({MOEKIT_ROUTING_ARGS(saved, "saved"), {dweights, "dweights"}})
        .check();
    const GatingConfig gating = config_.gating;
    MOEKIT_PARALLEL_FOR_IF(tokens * kExperts > kParallelGrain)
    for (index_t t = 0; t < tokens; ++t) {
      float dw[to_size(kTopK)];
      for (int k = 0; k < kTopK; ++k) dw[k] = saved.positions(t, k) >= 0 ? dweights(t, k) : 0.0f;
      routing::gate_token_backward<kExperts, kTopK>(saved.logits.row(t), saved.scores.row(t),
                                                    saved.expert_ids.row(t), dw, gating,
                                                    dlogits.row(t));
    }
  }

  // From dL/dlogits (gate part plus aux losses): dx, dw_gate and dbias, as
  // requested by non-empty views in `grads`. One GEMM per token block;
  // dw_gate and dbias are folded over the blocks in order (the first block
  // overwrites unless grads.accumulate). Row t is the batch's token
  // first_token + t (the jitter counters, as in logits()).
  void backward_logits(MatrixView<const float> x, MatrixView<const float> w_gate,
                       MatrixView<const float> dlogits, const RouterGrads& grads,
                       VectorView<std::byte> workspace = {}, index_t first_token = 0) const {
    MOEKIT_API("cpu::Router::backward_logits");
    const index_t tokens = x.rows();
    const index_t d = x.cols();
    check_view(x, "x");
    check_shape(w_gate, kExperts, d, "w_gate");
    check_shape(dlogits, tokens, kExperts, "dlogits");
    if (!grads.dx.empty()) check_shape(grads.dx, tokens, d, "grads.dx");
    if (!grads.dw_gate.empty()) check_shape(grads.dw_gate, kExperts, d, "grads.dw_gate");
    if (!grads.dbias.empty()) check_shape(grads.dbias, kExperts, "grads.dbias");
    check_workspace(workspace, tokens, d);
    MOEKIT_CHECK_ARG(first_token >= 0, "first_token = ", first_token, " is negative");
    OverlapCheck("cpu::Router::backward_logits")
        .out({{grads.dx, "grads.dx"},
              {grads.dw_gate, "grads.dw_gate"},
              {grads.dbias, "grads.dbias"},
              {workspace.segment(0, workspace_size(tokens, d)), "workspace"}})
        .in({{x, "x"}, {w_gate, "w_gate"}, {dlogits, "dlogits"}})
        .check();
    const bool jittered = config_.noise.kind == NoiseKind::kJitter;
    const bool want_db = !grads.dbias.empty(), want_dw = !grads.dw_gate.empty();
    const VectorView<std::byte> product = product_workspace(workspace, tokens, d);

    const MatrixView<float> jittered_x(jittered ? scratch<float>(workspace) : nullptr, tokens, d);
    if (!grads.accumulate && tokens == 0) {  // no block: the sums are empty
      if (want_db) as_eigen(grads.dbias).setZero();
      if (want_dw) as_eigen(grads.dw_gate).setZero();
    }
    if (want_db) {
      for_each_token_block(tokens, [&](index_t r0, index_t rows, index_t b) {
        add_column_sums(dlogits.middle_rows(r0, rows), grads.dbias, grads.accumulate || b > 0);
      });
    }
    if (want_dw && tokens > 0) {
      if (jittered) jitter(x, jittered_x, first_token);  // what the logits saw
      const MatrixView<const float> input = jittered ? MatrixView<const float>(jittered_x) : x;
      gate_weight_gradient<kExperts>(dlogits, input, grads.dw_gate, grads.accumulate, product);
    }
    if (grads.dx.empty()) return;
    if (!jittered) {
      gate_input_gradient<kExperts>(dlogits, w_gate, grads.dx, grads.accumulate, product);
      return;
    }
    gate_input_gradient<kExperts>(dlogits, w_gate, jittered_x, false, product);
    jitter(jittered_x, jittered_x, first_token);  // d x~/d x is the jitter factor
    if (grads.accumulate) {
      as_eigen(grads.dx) += as_eigen(MatrixView<const float>(jittered_x));
    } else {
      as_eigen(grads.dx) = as_eigen(MatrixView<const float>(jittered_x));
    }
  }

 private:
  static void validate(const RouterConfig& c) {
    MOEKIT_API("cpu::Router::Router");
    check_gating(c.gating, kExperts, kTopK);
    check_noise(c.noise);
    MOEKIT_CHECK_ARG(!std::isnan(c.capacity.factor), "capacity.factor is NaN");
    MOEKIT_CHECK_ARG(
        c.capacity.policy == DropPolicy::kPosition || c.capacity.policy == DropPolicy::kProbs,
        "capacity.policy = ", static_cast<int>(c.capacity.policy), " is not a DropPolicy");
    MOEKIT_CHECK_ARG(
        c.non_finite == NonFinitePolicy::kSanitize || c.non_finite == NonFinitePolicy::kError,
        "non_finite = ", static_cast<int>(c.non_finite), " is not a NonFinitePolicy");
  }

  bool drops_by_weight() const {
    return config_.capacity.factor > 0.0f && config_.capacity.policy == DropPolicy::kProbs;
  }

  void check_workspace(VectorView<std::byte> workspace, index_t tokens, index_t d) const {
    const index_t need = workspace_size(tokens, d);
    if (need == 0) return;
    check_view(workspace, "workspace");
    MOEKIT_CHECK(workspace.size() >= need, Errc::kShapeMismatch, "workspace has ", workspace.size(),
                 " bytes, workspace_size() = ", need);
    MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace.data()) % alignof(float) == 0,
                 Errc::kInvalidArgument, "workspace is not aligned to ", alignof(float), " bytes");
  }

  // The workspace as an array of T (float or int32, both 4-byte aligned).
  template <class T>
  static T* scratch(VectorView<std::byte> workspace) {
    static_assert(sizeof(T) == 4 && alignof(T) == 4);
    return reinterpret_cast<T*>(workspace.data());
  }

  static void check_selection_bias(VectorView<const float> bias) {
    if (bias.empty()) return;
    check_shape(bias, kExperts, "selection_bias");
    for (index_t e = 0; e < kExperts; ++e) {
      MOEKIT_CHECK(std::isfinite(bias[e]), Errc::kNonFinite, "selection_bias[", e, "] = ", bias[e],
                   " is not finite");
    }
  }

  // Gating, capacity and statistics in one parallel pass over TokenChunks:
  // each chunk scores, selects and weighs its tokens and counts their
  // assignments (plus, for stats, its partial distribution and z-loss sums);
  // a scan over the chunks' counts gives each chunk its first buffer row per
  // expert; then (kPosition, dropless) each chunk numbers its assignments.
  // Exact integers and chunk-ordered sums: every thread count agrees.
  void route_validated(const Routing& out, VectorView<const float> selection_bias,
                       RoutingStats<S>* stats, VectorView<std::byte> workspace) const {
    const index_t tokens = out.logits.rows();
    if (config_.non_finite == NonFinitePolicy::kError) reject_non_finite(out.logits);

    constexpr int kChunks = TokenChunks<kExperts>::kCount;
    const TokenChunks<kExperts> chunks(tokens);
    const float* bias = selection_bias.empty() ? nullptr : selection_bias.data();
    const bool by_position = !drops_by_weight();
    const index_t cap = capacity(tokens);
    const bool want_stats = stats != nullptr;
    // Per chunk: assignments per expert, then (after the scan) its first row.
    std::array<std::array<std::int32_t, to_size(kExperts)>, to_size(kChunks)> start{};
    StatSums sums;
    std::array<index_t, to_size(kExperts)> assigned{};
    index_t non_finite = 0, dropped = 0;
#if defined(_OPENMP)
#pragma omp parallel if (tokens * kExperts > kParallelGrain) reduction(+ : non_finite, dropped)
#endif
    {
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
      for (std::size_t c = 0; c < kChunks; ++c) {
        const index_t first = chunks.begin(c), end = chunks.end(c);
        for (index_t b = first; b < end; b += kRowBlock) {
          const index_t rows = std::min(kRowBlock, end - b);
          non_finite += score_rows(out, b, rows, want_stats ? &sums.lse_square[c] : nullptr);
          select_rows(out, bias, b, rows);
        }
        for (index_t t = first; t < end; ++t) {
          for (int k = 0; k < kTopK; ++k) ++start[c][to_size(out.expert_ids(t, k))];
          if (want_stats) {
            add_routing_distribution<kExperts>(config_.gating.rule, out.scores.row(t),
                                               sums.distribution[c].data());
          }
        }
      }
#if defined(_OPENMP)
#pragma omp single
#endif
      {
        std::array<std::int32_t, to_size(kExperts)> sum{};
        for (std::size_t c = 0; c < kChunks; ++c) {
          for (std::size_t e = 0; e < kExperts; ++e) {
            const std::int32_t n = start[c][e];
            start[c][e] = sum[e];
            sum[e] += n;
          }
        }
        for (std::size_t e = 0; e < kExperts; ++e) assigned[e] = sum[e];
      }
      if (by_position) {
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (std::size_t c = 0; c < kChunks; ++c) {
          dropped += number_in_order(out.expert_ids, out.weights, out.positions, chunks.begin(c),
                                     chunks.end(c), cap, start[c]);
        }
      }
    }
    if (!by_position) {
      dropped =
          drop_lowest_weights(out.expert_ids, out.weights, out.positions, assigned, cap, workspace);
    }
    if (want_stats) finish_stats(sums, tokens, assigned, cap, dropped, non_finite, *stats);
  }

  // Scores of `rows` tokens from `first`; returns their non-finite logits.
  // Finite rows use the vectorised exp (shifted_exp, sigmoid_row); a row with a
  // non-finite logit takes the exact scalar rule. With lse_square, adds the
  // rows' z-loss terms (routing::z_loss_token, as cpu::z_loss: the same bits).
  int score_rows(const Routing& out, index_t first, index_t rows, double* lse_square) const {
    int non_finite = 0;
    for (index_t t = first; t < first + rows; ++t) {
      const float* x = out.logits.row(t);
      float* s = out.scores.row(t);
      if (lse_square != nullptr)
        *lse_square += routing::z_loss_token<kExperts>(x, 0.0, 1.0, nullptr);
      if (!all_finite(out.logits.row_view(t))) {
        non_finite += routing::compute_scores<kExperts>(config_.gating.rule, x, s);
        continue;
      }
      Eigen::Map<Eigen::Array<float, 1, kExperts>> scores(s);
      if (config_.gating.rule == GatingRule::kSigmoid) {
        sigmoid_row(x, kExperts, s);
      } else {
        scores /= shifted_exp<kExperts>(x, s).sum;
      }
    }
    return non_finite;
  }

  // Top-K and weights for `rows` scored tokens from `first`.
  void select_rows(const Routing& out, const float* bias, index_t first, index_t rows) const {
    if (config_.gating.num_groups > 1) {
      for (index_t t = first; t < first + rows; ++t) {
        routing::select_and_weigh<kExperts, kTopK>(out.logits.row(t), out.scores.row(t), bias,
                                                   config_.gating, out.expert_ids.row(t),
                                                   out.weights.row(t));
      }
      return;
    }
    for (index_t t = first; t < first + rows; t += kLanes) {
      select_lanes(out, bias, t, std::min<index_t>(kLanes, first + rows - t));
    }
  }

  // Top-K for `n` <= kLanes consecutive tokens at once, token l in lane l:
  // the branch-free insertion runs across lanes, so the compiler vectorises
  // it over tokens and no key ever costs a mispredicted branch.
  void select_lanes(const Routing& out, const float* bias, index_t first, index_t n) const {
    const GatingConfig& gating = config_.gating;
    const bool logit_key = routing::selects_on_logits(gating, bias != nullptr);
    alignas(64) float keys[to_size(kExperts * kLanes)];
    alignas(64) int ids[to_size(kTopK * kLanes)];
    for (int l = 0; l < kLanes; ++l) {
      const index_t t = first + (l < n ? l : 0);  // idle lanes repeat a real token
      const float* x = out.logits.row(t);
      const float* s = out.scores.row(t);
      for (int e = 0; e < kExperts; ++e) {
        keys[e * kLanes + l] = routing::selection_key(logit_key, x[e], s[e], bias, e);
      }
    }
    detail::top_k_lanes<kExperts, kTopK>(keys, ids);
    for (index_t l = 0; l < n; ++l) {
      const index_t t = first + l;
      for (int k = 0; k < kTopK; ++k) out.expert_ids(t, k) = ids[k * kLanes + l];
      routing::weigh<kExperts, kTopK>(out.logits.row(t), out.scores.row(t), out.expert_ids.row(t),
                                      gating, out.weights.row(t));
    }
  }

  static void reject_non_finite(MatrixView<const float> logits) {
    for (index_t t = 0; t < logits.rows(); ++t) {
      for (index_t e = 0; e < kExperts; ++e) {
        MOEKIT_CHECK(std::isfinite(logits(t, e)), Errc::kNonFinite, "logits(", t, ", ", e,
                     ") = ", logits(t, e), " is not finite (NonFinitePolicy::kError)");
      }
    }
  }

  // kProbs: per expert, keeps the `cap` assignments of highest weight (ties ->
  // earlier token) and numbers the kept in token order; the others get
  // position -1 and weight 0. Returns the number dropped. `order` (T x K
  // ints of workspace) receives the slots t * K + k grouped by expert, token
  // order within each (a counting sort), then each over-full expert's slots
  // are sorted by (weight desc, slot asc), a total order: no allocation, and
  // the same result on every run.
  index_t drop_lowest_weights(MatrixView<const std::int32_t> ids, MatrixView<float> weights,
                              MatrixView<std::int32_t> positions,
                              const std::array<index_t, to_size(kExperts)>& count, index_t cap,
                              VectorView<std::byte> workspace) const {
    const index_t tokens = ids.rows();
    std::int32_t* order = scratch<std::int32_t>(workspace);
    std::array<index_t, to_size(kExperts + 1)> offset{};
    for (std::size_t e = 0; e < kExperts; ++e) offset[e + 1] = offset[e] + count[e];
    std::array<index_t, to_size(kExperts)> fill = {};
    for (index_t t = 0; t < tokens; ++t) {
      for (int k = 0; k < kTopK; ++k) {
        const std::size_t e = to_size(ids(t, k));
        order[offset[e] + fill[e]++] = static_cast<std::int32_t>(t * kTopK + k);
      }
    }
    const auto weight = [&](std::int32_t slot) { return weights(slot / kTopK, slot % kTopK); };
    for (std::size_t e = 0; e < kExperts; ++e) {
      std::int32_t* first = order + offset[e];
      std::int32_t* last = order + offset[e + 1];
      if (count[e] > cap) {
        std::sort(first, last, [&](std::int32_t a, std::int32_t b) {
          return weight(a) != weight(b) ? weight(a) > weight(b) : a < b;
        });
      }
      for (std::int32_t* slot = first; slot != last; ++slot) {
        positions(*slot / kTopK, *slot % kTopK) = slot - first < cap ? 0 : -1;
      }
    }
    // Number the kept in token order.
    fill = {};
    index_t dropped = 0;
    for (index_t t = 0; t < tokens; ++t) {
      for (int k = 0; k < kTopK; ++k) {
        if (positions(t, k) == 0) {
          positions(t, k) = static_cast<std::int32_t>(fill[to_size(ids(t, k))]++);
        } else {
          weights(t, k) = 0.0f;
          ++dropped;
        }
      }
    }
    return dropped;
  }

  // out = in * jitter factor, element (t, j) drawn with counter (t0 + t) d +
  // j (t0: the batch index of row 0). in and out may be the same view
  // (backward scales dx~ in place).
  void jitter(MatrixView<const float> in, MatrixView<float> out, index_t t0) const {
    const index_t d = in.cols();
    const float a = config_.noise.amount;
    const std::uint64_t seed = config_.noise.seed;
    MOEKIT_PARALLEL_FOR_IF(in.size() > kParallelGrain)
    for (index_t t = 0; t < in.rows(); ++t) {
      for (index_t j = 0; j < d; ++j) {
        out(t, j) = in(t, j) *
                    routing::jitter_factor(seed, a, static_cast<std::uint64_t>((t0 + t) * d + j));
      }
    }
  }

  // logits += amount * N(0, 1), element (t, e) drawn with counter (t0 + t) E + e.
  void add_gaussian_noise(MatrixView<float> logits, index_t t0) const {
    const float a = config_.noise.amount;
    const std::uint64_t seed = config_.noise.seed;
    for (index_t t = 0; t < logits.rows(); ++t) {
      for (int e = 0; e < kExperts; ++e) {
        logits(t, e) +=
            a * random_normal(seed, static_cast<std::uint64_t>((t0 + t) * kExperts + e));
      }
    }
  }

  void check_logits_args(MatrixView<const float> x, MatrixView<const float> w_gate,
                         VectorView<const float> gate_bias, MatrixView<float> logits,
                         VectorView<std::byte> workspace) const {
    check_view(x, "x");
    check_shape(w_gate, kExperts, x.cols(), "w_gate");
    if (!gate_bias.empty()) check_shape(gate_bias, kExperts, "gate_bias");
    check_shape(logits, x.rows(), kExperts, "logits");
    check_workspace(workspace, x.rows(), x.cols());
  }

  // Bytes of the jittered input at the workspace's start (0 without jitter);
  // the logits product's buffers follow it.
  index_t jitter_bytes(index_t tokens, index_t d_model) const {
    return config_.noise.kind == NoiseKind::kJitter ? tokens * d_model * index_t{sizeof(float)} : 0;
  }

  // The workspace after the jittered input: the products' (engine) buffers.
  VectorView<std::byte> product_workspace(VectorView<std::byte> workspace, index_t tokens,
                                          index_t d_model) const {
    const index_t skip = jitter_bytes(tokens, d_model);
    return workspace.segment(skip, workspace.size() - skip);
  }

  // The logits of x (arguments checked); row t is the batch's token t0 + t.
  void compute_logits(MatrixView<const float> x, MatrixView<const float> w_gate,
                      VectorView<const float> gate_bias, MatrixView<float> logits,
                      VectorView<std::byte> workspace, index_t t0) const {
    const VectorView<std::byte> product = product_workspace(workspace, x.rows(), x.cols());
    if (config_.noise.kind == NoiseKind::kJitter) {
      const MatrixView<float> jittered(scratch<float>(workspace), x.rows(), x.cols());
      jitter(x, jittered, t0);
      gate_logits<kExperts>(jittered, w_gate, logits, product);
    } else {
      gate_logits<kExperts>(x, w_gate, logits, product);
    }
    if (!gate_bias.empty()) as_eigen(logits).rowwise() += as_eigen(gate_bias).transpose();
    if (config_.noise.kind == NoiseKind::kGaussian) add_gaussian_noise(logits, t0);
  }

  // Rows scored, then selected, together (they stay in L1 between the two).
  static constexpr index_t kRowBlock = 64;
  // Tokens selected together, one per SIMD lane.
  static constexpr int kLanes = detail::kSelectLanes;

  RouterConfig config_;
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
