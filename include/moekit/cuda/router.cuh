#pragma once
// The router on the CUDA backend: gating of precomputed logits, routing
// statistics and the backward of the gate for MoeSpec<E, K> (math in
// moekit/core/routing.hpp, the same functions the CPU backend runs).
//
//   moekit::gpu::RouteArgs<Spec, __nv_bfloat16> args{logits, bias, gating,
//                                                    scores, ids, weights, d_stats};
//   std::size_t bytes = 0;
//   moekit::gpu::route(nullptr, bytes, args, stream);        // size query
//   moekit::gpu::route(d_workspace, bytes, args, stream);    // runs on `stream`
//
// Conventions (CUB's two-phase API, docs/cuda.md):
//   - A null d_temp_storage only writes the bytes needed to temp_storage_bytes
//     (never 0) and reads no other argument but the token count.
//   - The second call validates every argument on the host before anything
//     is launched: a bad argument throws moekit::Error naming it, as the CPU
//     backend does. Failures of the CUDA runtime (launches, memsets) come back
//     as the returned cudaError_t. d_temp_storage must be 256-byte aligned
//     (cudaMalloc's alignment).
//   - All pointers in the arguments are device memory; nothing is allocated
//     and nothing synchronises: results are ready when `stream` gets there.
//   - Deterministic: no float atomics. Per-block partial sums go to the
//     workspace and a second kernel adds them in block order, so reruns are
//     bit-identical.
//
// The gate GEMM (logits = x w_gate^T + b) is the caller's: route() starts
// from logits (fp32, bf16 or fp16; the math runs in fp32), like the CPU's
// Router::route. Noise, capacity and positions are not part of this file.
//
// Values the host cannot check without a copy are handled on the device by
// a documented rule: a NaN selection bias acts as -inf; a saved expert id
// out of [0, E) or repeated within a row makes that row contribute nothing
// and is counted in the optional `invalid_rows` output.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "moekit/core/error.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cuda/error.cuh"
#include "moekit/cuda/warp.cuh"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace gpu {

// Element types of logits: fp32, bf16 or fp16 (converted to fp32 on load).
template <class T>
concept LogitElement =
    std::same_as<T, float> || std::same_as<T, __nv_bfloat16> || std::same_as<T, __half>;

// Routing statistics, written by route() to DEVICE memory (copy it back with
// cudaMemcpyAsync to read it). The same quantities as cpu::RoutingStats,
// before capacity (capacity and drops belong to dispatch).
template <MoeSpecType S>
struct RoutingStats {
  static constexpr int kExperts = S::num_experts;  // E, the length of assigned
  std::int64_t tokens;                             // T, the batch's rows
  std::int64_t non_finite_logits;      // NaN and +-inf logits counted (core/routing.hpp)
  std::int64_t max_assigned;           // the busiest expert's assignments
  double z_loss;                       // mean_t logsumexp(logits_t)^2 (cpu::z_loss's rule)
  std::int64_t assigned[kExperts];     // assignments per expert
  double mean_distribution[kExperts];  // mean over tokens of the routing distribution q

  // Host helpers, on a copy brought back to the host.
  // Busiest expert's assignments over the mean: 1 is perfect balance.
  double max_load_ratio() const {
    if (tokens == 0) return 0.0;
    return static_cast<double>(max_assigned) / (static_cast<double>(tokens) * S::top_k / kExperts);
  }
  // Entropy (nats) of mean_distribution.
  double entropy() const {
    double h = 0.0;
    for (double q : mean_distribution) h -= q > 0.0 ? q * std::log(q) : 0.0;
    return h;
  }
  // Fraction of experts with at least one assignment.
  double utilization() const {
    int used = 0;
    for (std::int64_t c : assigned) used += c > 0;
    return static_cast<double>(used) / kExperts;
  }
};

// The device address of d_stats->assigned (E int64 counts), e.g. for
// update_expert_bias(), computed without touching device memory.
template <MoeSpecType S>
const std::int64_t* assigned_counts(const RoutingStats<S>* d_stats) {
  return reinterpret_cast<const std::int64_t*>(reinterpret_cast<const char*>(d_stats) +
                                               offsetof(RoutingStats<S>, assigned));
}

// Arguments of route(): logits in, scores / ids / weights (and stats) out.
template <MoeSpecType S, LogitElement T = float>
struct RouteArgs {
  MatrixView<const T> logits;              // T x E
  VectorView<const float> selection_bias;  // E, or empty: none
  GatingConfig gating{};                   // the rule, checked on the host
  MatrixView<float> scores;                // T x E: p (softmax rules) or s (sigmoid)
  MatrixView<std::int32_t> expert_ids;     // T x K, ordered by key, distinct per row
  MatrixView<float> weights;               // T x K
  RoutingStats<S>* stats = nullptr;        // device; null: no statistics
};

// Arguments of backward_gate(): dlogits = (d weights / d logits)^T dweights.
template <MoeSpecType S, LogitElement T = float>
struct GateBackwardArgs {
  MatrixView<const T> logits;                 // T x E, what route() read
  MatrixView<const float> scores;             // T x E, what route() wrote
  MatrixView<const std::int32_t> expert_ids;  // T x K
  MatrixView<const float> dweights;           // T x K, 0 for dropped slots
  GatingConfig gating{};                      // the rule route() used
  MatrixView<float> dlogits;                  // T x E, overwritten
  std::int64_t* invalid_rows = nullptr;       // device; rows with bad ids (they get 0)
};

namespace detail {

inline constexpr int kThreads = 128;          // every routing kernel's block size
inline constexpr int kTileBytes = 36 * 1024;  // shared memory for E-wide row tiles
inline constexpr std::size_t kWorkspaceAlignment = 256;

// Tiles keep rows of E floats at an odd stride, so that thread r reading
// element e of row r hits bank (r * stride + e) % 32: no conflicts.
template <int E>
inline constexpr int kRowStride = E % 2 == 0 ? E + 1 : E;

// Rows per tile when `mats` E-wide tiles share the shared-memory budget:
// 128 for small E, down to 1 (E = 384: 23 with one tile).
template <int E, int mats>
inline constexpr int kTileRows = [] {
  const int rows = kTileBytes / (mats * 4 * kRowStride<E>);
  return rows < 1 ? 1 : (rows > kThreads ? kThreads : rows);
}();

MOEKIT_DEVICE inline float to_float(float v) { return v; }
MOEKIT_DEVICE inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
MOEKIT_DEVICE inline float to_float(__half v) { return __half2float(v); }

// tile[r * stride + e] = m(first + r, e) for r < rows: consecutive threads
// read consecutive elements of a row (coalesced).
template <int E, class T>
MOEKIT_DEVICE void load_rows(MatrixView<const T> m, index_t first, int rows, float* tile) {
  for (int i = static_cast<int>(threadIdx.x); i < rows * E; i += static_cast<int>(blockDim.x)) {
    const int r = i / E, e = i - r * E;
    tile[r * kRowStride<E> + e] = to_float(m(first + r, e));
  }
}

template <int E>
MOEKIT_DEVICE void store_rows(const float* tile, int rows, MatrixView<float> m, index_t first) {
  for (int i = static_cast<int>(threadIdx.x); i < rows * E; i += static_cast<int>(blockDim.x)) {
    const int r = i / E, e = i - r * E;
    m(first + r, e) = tile[r * kRowStride<E> + e];
  }
}

// The factor of a token's score in its routing distribution q (routing::
// routing_distribution, in double as the CPU statistics): 1 for the softmax
// rules, 1 / sum(s) for sigmoid, and -1 for sigmoid's uniform fallback.
MOEKIT_HOST_DEVICE inline double sigmoid_distribution_scale(double total_score) {
  return total_score > 0.0 ? 1.0 / total_score : -1.0;
}

template <int E>
MOEKIT_HOST_DEVICE double distribution_scale(GatingRule rule, const float* scores) {
  if (rule != GatingRule::kSigmoid) return 1.0;
  double total = 0.0;
  for (int e = 0; e < E; ++e) total += static_cast<double>(scores[e]);
  return sigmoid_distribution_scale(total);
}

// q[e] of one token, in double, from distribution_scale().
template <int E>
MOEKIT_HOST_DEVICE double distribution_term(double scale, float score) {
  return scale < 0.0 ? 1.0 / E : static_cast<double>(score) * scale;
}

// ---- one token per warp ---------------------------------------------------
//
// Up to 32 experts a thread routes a token alone with the CPU's per-token
// functions. Beyond that its E-sized arrays (logits, scores, keys) spill to
// local memory and an E-wide tile holds so few rows that most of a block's
// threads idle (E = 384: 23 of 128). So there one warp routes one token,
// lane l holding experts l, l + 32, ... ("slots") in registers:
//   - selection: K rounds of a warp argmax under routing::precedes, a total
//     order, so it picks exactly what routing::select_experts picks from the
//     same keys (group scores are routing::group_score, one lane per group);
//   - weights and the K-sized half of backward: routing::weigh_selected and
//     routing::gate_selected_backward, the CPU's code on the same values;
//   - sums (softmax's normaliser, the z-loss's, dot products over E) are
//     warp butterflies, so they round differently from the CPU's sequential
//     loops by a few ulp, as the CPU's vectorised exp already does. The one
//     sum over the K selected experts, softmax_backward's dot product, runs
//     in the CPU's expert order.

template <int E>
inline constexpr bool kWarpPerToken = E > 32;
template <int E>
inline constexpr int kLaneSlots = (E + 31) / 32;
inline constexpr int kWarpsPerBlock = kThreads / 32;

// Rows of a block's tile when `mats` E-wide tiles share shared memory: up to
// 128 (one per thread) below 33 experts, 4 per warp beyond (more blocks,
// each light on shared memory).
template <int E, int mats>
inline constexpr int kRowsPerBlock =
    kWarpPerToken<E>&& kTileRows<E, mats> > 4 * kWarpsPerBlock ? 4 * kWarpsPerBlock
                                                               : kTileRows<E, mats>;

MOEKIT_DEVICE inline int lane_id() { return static_cast<int>(threadIdx.x) & 31; }

// v[j] = row[lane + 32 j], or `pad` past the row's E entries.
template <int E>
MOEKIT_DEVICE void load_slots(const float* row, float pad, float* v) {
  for (int j = 0; j < kLaneSlots<E>; ++j) {
    const int e = lane_id() + 32 * j;
    v[j] = e < E ? row[e] : pad;
  }
}

template <int E>
MOEKIT_DEVICE void store_slots(const float* v, float* row) {
  for (int j = 0; j < kLaneSlots<E>; ++j) {
    const int e = lane_id() + 32 * j;
    if (e < E) row[e] = v[j];
  }
}

// Bit j set where slot j holds an expert (lane + 32 j < E).
template <int E>
MOEKIT_DEVICE unsigned row_slots_mask() {
  unsigned mask = 0;
  for (int j = 0; j < kLaneSlots<E>; ++j) mask |= (lane_id() + 32 * j < E ? 1u : 0u) << j;
  return mask;
}

// The row maximum of the sanitized logits (routing::row_max); padding is -inf.
template <int E>
MOEKIT_DEVICE float warp_row_max(const float* x) {
  float m = -routing::kInf;
  for (int j = 0; j < kLaneSlots<E>; ++j) m = fmaxf(m, routing::sanitize(x[j]));
  return warp_max(m);
}

// routing::compute_scores's scores of the slots (padding: x = -inf).
template <int E>
MOEKIT_DEVICE void warp_scores(GatingRule rule, const float* x, float* s) {
  constexpr int V = kLaneSlots<E>;
  if (rule == GatingRule::kSigmoid) {
    for (int j = 0; j < V; ++j) s[j] = routing::sigmoid(x[j]);
    return;
  }
  const float m = warp_row_max<E>(x);
  if (m == routing::kInf) {
    int n = 0;
    for (int j = 0; j < V; ++j) n += x[j] == routing::kInf;
    const float share = 1.0f / static_cast<float>(warp_sum(n));
    for (int j = 0; j < V; ++j) s[j] = x[j] == routing::kInf ? share : 0.0f;
    return;
  }
  if (m == -routing::kInf) {
    for (int j = 0; j < V; ++j) s[j] = 1.0f / static_cast<float>(E);
    return;
  }
  float z = 0.0f;
  for (int j = 0; j < V; ++j) {
    s[j] = routing::exp_(routing::sanitize(x[j]) - m);  // padding: exp(-inf) = 0
    z += s[j];
  }
  const float inv = 1.0f / warp_sum(z);
  for (int j = 0; j < V; ++j) s[j] *= inv;
}

// routing::z_loss_token on the slots (padding slots hold -inf): lse^2, 0
// for a row with a NaN or +inf logit or nothing above -inf; with d_row,
// adds the gradient there (c * exp(x - max)).
template <int E>
MOEKIT_DEVICE double warp_z_loss(const float* x, double coeff, double tokens, float* d_row) {
  int poisoned = 0;
  float m = -routing::kInf;
  for (int j = 0; j < kLaneSlots<E>; ++j) {
    poisoned += routing::z_loss_poisons(x[j]);
    m = x[j] > m ? x[j] : m;
  }
  m = warp_max(m);
  if (warp_sum(poisoned) != 0 || routing::is_minus_inf(m)) return 0.0;
  float sum = 0.0f;
  for (int j = 0; j < kLaneSlots<E>; ++j) sum += routing::z_loss_exp(x[j] - m);
  sum = warp_sum(sum);
  const double lse = routing::log_sum_exp(m, sum);
  if (d_row != nullptr) {
    const float c = routing::z_loss_grad_scale(lse, sum, coeff, tokens);
    for (int j = 0; j < kLaneSlots<E>; ++j) {
      const int e = lane_id() + 32 * j;
      if (e < E) d_row[e] += c * routing::z_loss_exp(x[j] - m);
    }
  }
  return lse * lse;
}

// The best (key, id) among the slots set in `candidates`, then across the
// warp: every lane returns the winner's id; `value` and `extra` come back
// as the owning lane's v[j] and extra[j] of the winner (0 if none).
template <int E>
MOEKIT_DEVICE int warp_argmax(const float* key, unsigned candidates, const float* v,
                              const float* extra, float& value, float& extra_out) {
  float best = -routing::kInf;
  int best_id = routing::kNoId;
  float best_v = 0.0f, best_extra = 0.0f;
  for (int j = 0; j < kLaneSlots<E>; ++j) {
    const int id = lane_id() + 32 * j;
    if (((candidates >> j) & 1u) != 0 && routing::precedes(key[j], id, best, best_id)) {
      best = key[j];
      best_id = id;
      best_v = v != nullptr ? v[j] : 0.0f;
      best_extra = extra != nullptr ? extra[j] : 0.0f;
    }
  }
  float win = best;
  int win_id = best_id;
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(kFullWarp, win, offset);
    const int other_id = __shfl_xor_sync(kFullWarp, win_id, offset);
    if (routing::precedes(other, other_id, win, win_id)) {
      win = other;
      win_id = other_id;
    }
  }
  const int owner = win_id & 31;  // the winner's lane (ids are lane + 32 j)
  value = __shfl_sync(kFullWarp, best_v, owner);
  extra_out = __shfl_sync(kFullWarp, best_extra, owner);
  return win_id;
}

// Group-limited selection's eligible slots: those of the cfg.groups_kept best
// groups (routing::group_score over the sanitized keys; ties -> the lower
// group), as routing::select_experts. `row` is E floats of this warp's
// shared memory, used as scratch.
template <int E>
MOEKIT_DEVICE unsigned warp_kept_groups(const float* key, const GatingConfig& cfg, float* row) {
  constexpr int V = kLaneSlots<E>;
  const int groups = cfg.num_groups;
  const int group_size = E / groups;
  store_slots<E>(key, row);
  __syncwarp();
  float score[V];  // groups lane + 32 j (groups <= E)
  unsigned open = 0;
  for (int j = 0; j < V; ++j) {
    const int g = lane_id() + 32 * j;
    score[j] = g < groups
                   ? routing::group_score(row + g * group_size, group_size, cfg.group_score_top)
                   : 0.0f;
    open |= (g < groups ? 1u : 0u) << j;
  }
  unsigned kept = 0;
  for (int round = 0; round < cfg.groups_kept; ++round) {
    float unused_v, unused_extra;
    const int g = warp_argmax<E>(score, open & ~kept, nullptr, nullptr, unused_v, unused_extra);
    if (g < groups && lane_id() == (g & 31)) kept |= 1u << (g >> 5);
  }
  __syncwarp();  // every lane has read the keys: row[g] now flags kept groups
  for (int j = 0; j < V; ++j) {
    const int g = lane_id() + 32 * j;
    if (g < groups) row[g] = ((kept >> j) & 1u) != 0 ? 1.0f : 0.0f;
  }
  __syncwarp();
  unsigned eligible = 0;
  for (int j = 0; j < V; ++j) {
    const int e = lane_id() + 32 * j;
    eligible |= (e < E && row[e / group_size] != 0.0f ? 1u : 0u) << j;
  }
  __syncwarp();  // the caller reuses row
  return eligible;
}

// What one token adds to a block's routing statistics.
struct RowStats {
  int non_finite = 0;
  double lse_square = 0.0;  // routing::z_loss_token's lse^2
  double scale = 1.0;       // distribution_scale
};

// One token routed by one warp (routing::gate_token): row holds its E
// logits (shared memory) and receives its scores; every lane gets the K ids
// and weights. Statistics only with `stats`.
template <int E, int K>
MOEKIT_DEVICE RowStats warp_gate_row(float* row, const float* bias, const GatingConfig& cfg,
                                     bool stats, int* ids, float* weights) {
  static_assert(E <= 1024, "one warp holds a token's experts in 32 slots per lane: E <= 1024");
  constexpr int V = kLaneSlots<E>;
  float x[V], s[V], key[V];
  load_slots<E>(row, -routing::kInf, x);
  const unsigned in_row = row_slots_mask<E>();
  int non_finite = 0;
  for (int j = 0; j < V; ++j) non_finite += ((in_row >> j) & 1u) != 0 && !routing::is_finite(x[j]);
  non_finite = warp_sum(non_finite);
  warp_scores<E>(cfg.rule, x, s);
  const bool logit_key = routing::selects_on_logits(cfg, bias != nullptr);
  for (int j = 0; j < V; ++j) {
    const int e = lane_id() + 32 * j;
    key[j] = e < E ? routing::selection_key(logit_key, x[j], s[j], bias, e) : -routing::kInf;
  }
  __syncwarp();  // every lane holds its logits: the row is scratch until the scores
  const unsigned eligible =
      cfg.num_groups > 1 ? warp_kept_groups<E>(key, cfg, row) & in_row : in_row;
  float sel_x[K], sel_s[K];
  unsigned taken = 0;
  for (int k = 0; k < K; ++k) {
    ids[k] = warp_argmax<E>(key, eligible & ~taken, x, s, sel_x[k], sel_s[k]);
    if (ids[k] < E && lane_id() == (ids[k] & 31)) taken |= 1u << (ids[k] >> 5);
  }
  routing::weigh_selected<K>(sel_x, sel_s, cfg, weights);
  RowStats out;
  out.non_finite = non_finite;
  if (stats) {
    out.lse_square = warp_z_loss<E>(x, 0.0, 1.0, nullptr);
    if (cfg.rule == GatingRule::kSigmoid) {
      double total = 0.0;
      for (int j = 0; j < V; ++j)
        total += ((in_row >> j) & 1u) != 0 ? static_cast<double>(s[j]) : 0.0;
      out.scale = sigmoid_distribution_scale(warp_sum(total));
    }
  }
  store_slots<E>(s, row);
  return out;
}

// sum_k g[k] p[k] in increasing ids[k] (distinct): softmax_backward's dot
// product, whose other terms are zero, in the CPU's order.
template <int K>
MOEKIT_HOST_DEVICE float dot_in_expert_order(const int* ids, const float* g, const float* p) {
  int rank[K];
  for (int k = 0; k < K; ++k) {
    rank[k] = 0;
    for (int i = 0; i < K; ++i) rank[k] += ids[i] < ids[k];
  }
  float dot = 0.0f;
  for (int r = 0; r < K; ++r) {
    for (int k = 0; k < K; ++k) {
      if (rank[k] == r) dot += g[k] * p[k];
    }
  }
  return dot;
}

// routing::gate_token_backward of one token by one warp (ids and dw the same
// in every lane): writes dx to d_row, or adds it with `add`. d_row may be
// x_row. Returns false, leaving the row's gradient 0, where the ids are out
// of range or repeated.
template <int E, int K>
MOEKIT_DEVICE bool warp_gate_backward_row(const float* x_row, const float* s_row, const int* ids,
                                          const float* dw, const GatingConfig& cfg, float* d_row,
                                          bool add) {
  constexpr int V = kLaneSlots<E>;
  const bool valid = routing::valid_ids<E, K>(ids);
  float x[V], s[V], d[V];
  load_slots<E>(x_row, -routing::kInf, x);
  load_slots<E>(s_row, 0.0f, s);
  for (int j = 0; j < V; ++j) d[j] = 0.0f;
  if (valid) {
    float sel_x[K], sel_s[K], out[K];
    for (int k = 0; k < K; ++k) {
      sel_x[k] = x_row[ids[k]];
      sel_s[k] = s_row[ids[k]];
    }
    const bool over_all = routing::gate_selected_backward<K>(sel_x, sel_s, dw, cfg, out);
    // Only kSoftmaxTopK spreads over all E, and not where p is constant.
    const bool spread = over_all && routing::is_finite(warp_row_max<E>(x));
    const float dot = spread ? dot_in_expert_order<K>(ids, out, sel_s) : 0.0f;
    for (int j = 0; j < V; ++j) {
      const int e = lane_id() + 32 * j;
      float g = 0.0f;
      for (int k = 0; k < K; ++k) g = ids[k] == e ? out[k] : g;
      // 0 + ..., as the CPU adds into a zeroed dx: a -0 product becomes +0.
      d[j] = !over_all ? g : (spread ? 0.0f + s[j] * (g - dot) : 0.0f);
    }
  }
  __syncwarp();  // d_row may be x_row: every lane has read it
  for (int j = 0; j < V; ++j) {
    const int e = lane_id() + 32 * j;
    if (e < E) d_row[e] = add ? d_row[e] + d[j] : d[j];
  }
  return valid;
}

// routing::routing_distribution_backward of one token by one warp: adds
// coeff (dq/dx)^T g to d_row (g: E values, the same for every lane).
template <int E>
MOEKIT_DEVICE void warp_distribution_backward_row(GatingRule rule, const float* x_row,
                                                  const float* s_row, const float* g, float coeff,
                                                  float* d_row) {
  constexpr int V = kLaneSlots<E>;
  float x[V], s[V], gv[V];
  load_slots<E>(x_row, -routing::kInf, x);
  load_slots<E>(s_row, 0.0f, s);
  load_slots<E>(g, 0.0f, gv);
  float dot = 0.0f, sum = 0.0f;
  for (int j = 0; j < V; ++j) {
    dot += gv[j] * s[j];
    sum += s[j];
  }
  dot = warp_sum(dot);
  if (rule != GatingRule::kSigmoid) {
    if (!routing::is_finite(warp_row_max<E>(x))) return;
    for (int j = 0; j < V; ++j) {
      const int e = lane_id() + 32 * j;
      if (e < E) d_row[e] += coeff * s[j] * (gv[j] - dot);
    }
    return;
  }
  sum = warp_sum(sum);
  if (!(sum > 0.0f)) return;  // the uniform fallback is constant
  const float inv = 1.0f / sum;
  for (int j = 0; j < V; ++j) {
    const int e = lane_id() + 32 * j;
    const float ds = (gv[j] - dot * inv) * inv;
    if (e < E) d_row[e] += coeff * ds * s[j] * (1.0f - s[j]);
  }
}

// Per-block partial statistics of route(), block b at [b * E, (b + 1) * E).
struct StatsPartials {
  std::int32_t* count = nullptr;
  double* distribution = nullptr;
  double* lse_square = nullptr;        // one per block
  std::int64_t* non_finite = nullptr;  // one per block
};

inline constexpr std::size_t round_up(std::size_t bytes) {
  return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}

// Consecutive aligned arrays carved from one workspace (CUB's
// AliasTemporaries): reserve() returns each one's offset.
class WorkspacePlan {
 public:
  std::size_t reserve(std::size_t bytes) {
    const std::size_t at = size_;
    size_ += round_up(bytes);
    return at;
  }
  // Never 0, so that a second call with a real (non-null) pointer is possible.
  std::size_t bytes() const { return size_ > 0 ? size_ : kWorkspaceAlignment; }

 private:
  std::size_t size_ = 0;
};

template <class U>
U* carve(void* base, std::size_t offset) {
  return reinterpret_cast<U*>(static_cast<char*>(base) + offset);
}

// Phase one (d_temp_storage null: writes the size, returns true) or the
// workspace check of phase two (returns false).
inline bool size_query(void* d_temp_storage, std::size_t& temp_storage_bytes, std::size_t need) {
  if (d_temp_storage == nullptr) {
    temp_storage_bytes = need;
    return true;
  }
  MOEKIT_CHECK(temp_storage_bytes >= need, Errc::kShapeMismatch,
               "temp_storage_bytes = ", temp_storage_bytes, " is less than the ", need,
               " bytes this call needs (ask with d_temp_storage = nullptr)");
  MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(d_temp_storage) % kWorkspaceAlignment == 0,
               Errc::kInvalidArgument, "d_temp_storage is not aligned to ", kWorkspaceAlignment,
               " bytes");
  return false;
}

// The part of a caller's temp storage a call uses, for its OverlapCheck.
inline Footprint temp_storage(void* d_temp_storage, std::size_t bytes) {
  return {static_cast<std::byte*>(d_temp_storage), static_cast<index_t>(bytes), "d_temp_storage"};
}

inline void check_token_count(index_t tokens, int top_k) {
  MOEKIT_CHECK_ARG(tokens >= 0, "the token count ", tokens, " is negative");
  MOEKIT_CHECK_ARG(tokens <= std::numeric_limits<std::int32_t>::max() / top_k, "tokens = ", tokens,
                   " times K = ", top_k, " exceeds the 32-bit slot range");
}

inline int grid_for(index_t tokens, int rows_per_block) {
  return static_cast<int>((tokens + rows_per_block - 1) / rows_per_block);
}

// ---- kernels --------------------------------------------------------------
//
// Why this design: a block loads a tile of token rows with coalesced loads
// into shared memory (converting bf16/fp16 to float), then each thread routes
// one token with routing::gate_token<E, K>, the host-device function the CPU
// router runs. Selection and weighting are therefore the CPU's code on the
// same keys (correct by construction, with no second implementation to keep
// in step); scores go back through the same tile with coalesced stores.
// That is the design up to 32 experts; beyond, one warp routes one token
// (kWarpPerToken, above): the CPU's functions for everything per token or
// per selected expert, warp butterflies for sums over E.

// route_kernel's grid: one block per tile up to this many, then each block
// takes every gridDim.x-th tile. It bounds the statistics partials (blocks x
// E, added up by one block) whatever T is, and depends on T only, so the
// summation order, hence every bit, is the same on every GPU.
inline constexpr int kMaxRouteBlocks = 1024;

template <int E>
int route_blocks(index_t tokens) {
  const int tiles = grid_for(tokens, kRowsPerBlock<E, 1>);
  return tiles < kMaxRouteBlocks ? tiles : kMaxRouteBlocks;
}

template <int E, int K, class T>
__global__ void __launch_bounds__(kThreads)
    route_kernel(MatrixView<const T> logits, const float* bias, GatingConfig cfg,
                 MatrixView<float> scores, MatrixView<std::int32_t> ids_out,
                 MatrixView<float> weights_out, StatsPartials partials) {
  constexpr int kRows = kRowsPerBlock<E, 1>;
  constexpr int kStride = kRowStride<E>;
  constexpr int kExpertsPerThread = (E + kThreads - 1) / kThreads;
  __shared__ float tile[kRows * kStride];
  __shared__ int tile_ids[kRows * K];
  __shared__ double row_scale[kRows];
  __shared__ double row_lse_square[kRows];
  __shared__ int row_non_finite[kRows];

  const index_t tokens = logits.rows();
  const bool stats = partials.count != nullptr;
  // This block's statistics over its tiles, in tile then token order.
  int count[kExpertsPerThread] = {};
  double q[kExpertsPerThread] = {};
  double lse = 0.0;  // thread 0's
  std::int64_t non_finite = 0;

  for (index_t first = static_cast<index_t>(blockIdx.x) * kRows; first < tokens;
       first += static_cast<index_t>(gridDim.x) * kRows) {
    const int rows = static_cast<int>(tokens - first < kRows ? tokens - first : kRows);
    load_rows<E>(logits, first, rows, tile);
    __syncthreads();

    if constexpr (kWarpPerToken<E>) {
      const int lane = lane_id();
      for (int r = static_cast<int>(threadIdx.x) / 32; r < rows; r += kWarpsPerBlock) {
        int ids[K];
        float w[K];
        const RowStats row = warp_gate_row<E, K>(tile + r * kStride, bias, cfg, stats, ids, w);
        for (int k = 0; k < K; ++k) {
          if ((k & 31) != lane) continue;
          ids_out(first + r, k) = ids[k];
          weights_out(first + r, k) = w[k];
          tile_ids[r * K + k] = ids[k];
        }
        if (stats && lane == 0) {
          row_non_finite[r] = row.non_finite;
          row_lse_square[r] = row.lse_square;
          row_scale[r] = row.scale;
        }
      }
    } else {
      const int r = static_cast<int>(threadIdx.x);
      float s[E];
      if (r < rows) {
        const float* x = tile + r * kStride;
        int ids[K];
        float w[K];
        const int nf = routing::gate_token<E, K>(x, bias, cfg, ids, w, s);
        for (int k = 0; k < K; ++k) {
          ids_out(first + r, k) = ids[k];
          weights_out(first + r, k) = w[k];
          tile_ids[r * K + k] = ids[k];
        }
        if (stats) {
          row_non_finite[r] = nf;
          row_lse_square[r] = routing::z_loss_token<E>(x, 0.0, 1.0, nullptr);
          row_scale[r] = distribution_scale<E>(cfg.rule, s);
        }
      }
      __syncthreads();  // every thread is done with its logits: reuse the tile for scores
      if (r < rows) {
        for (int e = 0; e < E; ++e) tile[r * kStride + e] = s[e];
      }
    }
    __syncthreads();
    store_rows<E>(tile, rows, scores, first);
    if (stats) {
      for (int i = 0; i < kExpertsPerThread; ++i) {
        const int e = static_cast<int>(threadIdx.x) + i * kThreads;
        if (e >= E) break;
        for (int t = 0; t < rows; ++t) {
          for (int k = 0; k < K; ++k) count[i] += tile_ids[t * K + k] == e;
          q[i] += distribution_term<E>(row_scale[t], tile[t * kStride + e]);
        }
      }
      if (threadIdx.x == 0) {
        for (int t = 0; t < rows; ++t) {
          lse += row_lse_square[t];
          non_finite += row_non_finite[t];
        }
      }
    }
    __syncthreads();  // the next tile overwrites the shared arrays
  }
  if (!stats) return;
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int e = static_cast<int>(threadIdx.x) + i * kThreads;
    if (e >= E) break;
    partials.count[static_cast<index_t>(blockIdx.x) * E + e] = count[i];
    partials.distribution[static_cast<index_t>(blockIdx.x) * E + e] = q[i];
  }
  if (threadIdx.x == 0) {
    partials.lse_square[blockIdx.x] = lse;
    partials.non_finite[blockIdx.x] = non_finite;
  }
}

// Adds the per-block partials in block order (one block).
template <MoeSpecType S>
__global__ void __launch_bounds__(kThreads)
    finalize_stats_kernel(StatsPartials partials, int blocks, index_t tokens,
                          RoutingStats<S>* out) {
  constexpr int E = S::num_experts;
  __shared__ std::int64_t count[E];
  const double n = static_cast<double>(tokens);
  for (int e = static_cast<int>(threadIdx.x); e < E; e += static_cast<int>(blockDim.x)) {
    std::int64_t c = 0;
    double q = 0.0;
    for (int b = 0; b < blocks; ++b) {
      c += partials.count[static_cast<index_t>(b) * E + e];
      q += partials.distribution[static_cast<index_t>(b) * E + e];
    }
    count[e] = c;
    out->assigned[e] = c;
    out->mean_distribution[e] = tokens > 0 ? q / n : 0.0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double lse = 0.0;
    std::int64_t non_finite = 0;
    for (int b = 0; b < blocks; ++b) {
      lse += partials.lse_square[b];
      non_finite += partials.non_finite[b];
    }
    std::int64_t max_count = 0;
    for (int e = 0; e < E; ++e) max_count = count[e] > max_count ? count[e] : max_count;
    out->tokens = tokens;
    out->non_finite_logits = non_finite;
    out->max_assigned = max_count;
    out->z_loss = tokens > 0 ? lse / n : 0.0;
  }
}

template <int E, int K, class T>
__global__ void __launch_bounds__(kThreads)
    backward_gate_kernel(MatrixView<const T> logits, MatrixView<const float> scores,
                         MatrixView<const std::int32_t> expert_ids,
                         MatrixView<const float> dweights, GatingConfig cfg,
                         MatrixView<float> dlogits, unsigned long long* invalid_rows) {
  constexpr int kRows = kRowsPerBlock<E, 2>;
  constexpr int kStride = kRowStride<E>;
  __shared__ float x_tile[kRows * kStride];
  __shared__ float s_tile[kRows * kStride];
  const index_t first = static_cast<index_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(logits.rows() - first < kRows ? logits.rows() - first : kRows);
  load_rows<E>(logits, first, rows, x_tile);
  load_rows<E>(scores, first, rows, s_tile);
  __syncthreads();
  if constexpr (kWarpPerToken<E>) {
    for (int r = static_cast<int>(threadIdx.x) / 32; r < rows; r += kWarpsPerBlock) {
      int ids[K];
      float dw[K];
      for (int k = 0; k < K; ++k) {
        ids[k] = expert_ids(first + r, k);
        dw[k] = dweights(first + r, k);
      }
      float* row = x_tile + r * kStride;
      const bool valid =
          warp_gate_backward_row<E, K>(row, s_tile + r * kStride, ids, dw, cfg, row, false);
      if (!valid && invalid_rows != nullptr && lane_id() == 0) atomicAdd(invalid_rows, 1ull);
    }
  } else {
    const int r = static_cast<int>(threadIdx.x);
    if (r < rows) {
      int ids[K];
      float dw[K];
      for (int k = 0; k < K; ++k) {
        ids[k] = expert_ids(first + r, k);
        dw[k] = dweights(first + r, k);
      }
      float dx[E];
      if (routing::valid_ids<E, K>(ids)) {
        routing::gate_token_backward<E, K>(x_tile + r * kStride, s_tile + r * kStride, ids, dw, cfg,
                                           dx);
      } else {
        for (int e = 0; e < E; ++e) dx[e] = 0.0f;
        if (invalid_rows != nullptr) atomicAdd(invalid_rows, 1ull);  // an exact integer count
      }
      for (int e = 0; e < E; ++e) x_tile[r * kStride + e] = dx[e];  // only thread r reads row r
    }
  }
  __syncthreads();
  store_rows<E>(x_tile, rows, dlogits, first);
}

template <MoeSpecType S, class T>
void check_route_args(const RouteArgs<S, T>& a) {
  constexpr int E = S::num_experts, K = S::top_k;
  const index_t tokens = a.logits.rows();
  check_token_count(tokens, K);
  check_gating(a.gating, E, K);
  check_shape(a.logits, tokens, E, "args.logits");
  if (!a.selection_bias.empty()) check_shape(a.selection_bias, E, "args.selection_bias");
  check_shape(a.scores, tokens, E, "args.scores");
  check_shape(a.expert_ids, tokens, K, "args.expert_ids");
  check_shape(a.weights, tokens, K, "args.weights");
}

}  // namespace detail

// Routes T tokens from their logits (header: two-phase, validation, errors).
// Writes scores, expert_ids and weights as cpu::Router::route would (the
// same per-token functions; beyond 32 experts sums over E form in warp
// order, so scores differ by a few ulp and score-keyed ids can differ at
// near-ties, docs/cuda.md), and with args.stats the statistics.
template <MoeSpecType S, LogitElement T>
cudaError_t route(void* d_temp_storage, std::size_t& temp_storage_bytes,
                  const RouteArgs<S, T>& args, cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::route");
  constexpr int E = S::num_experts, K = S::top_k;
  const index_t tokens = args.logits.rows();
  detail::check_token_count(tokens, K);
  const int blocks = detail::route_blocks<E>(tokens);
  detail::WorkspacePlan plan;
  const std::size_t nb = static_cast<std::size_t>(blocks);
  const std::size_t at_count = plan.reserve(nb * E * sizeof(std::int32_t));
  const std::size_t at_dist = plan.reserve(nb * E * sizeof(double));
  const std::size_t at_lse = plan.reserve(nb * sizeof(double));
  const std::size_t at_nf = plan.reserve(nb * sizeof(std::int64_t));
  if (detail::size_query(d_temp_storage, temp_storage_bytes, plan.bytes())) return cudaSuccess;
  detail::check_route_args(args);
  OverlapCheck("gpu::route")
      .out(Footprints{{args.scores, "args.scores"},
                      {args.expert_ids, "args.expert_ids"},
                      {args.weights, "args.weights"},
                      {args.stats, args.stats != nullptr ? 1 : 0, "args.stats"},
                      detail::temp_storage(d_temp_storage, plan.bytes())})
      .in(Footprints{{args.logits, "args.logits"}, {args.selection_bias, "args.selection_bias"}})
      .check();

  detail::StatsPartials partials;
  if (args.stats != nullptr) {
    partials.count = detail::carve<std::int32_t>(d_temp_storage, at_count);
    partials.distribution = detail::carve<double>(d_temp_storage, at_dist);
    partials.lse_square = detail::carve<double>(d_temp_storage, at_lse);
    partials.non_finite = detail::carve<std::int64_t>(d_temp_storage, at_nf);
  }
  const float* bias = args.selection_bias.empty() ? nullptr : args.selection_bias.data();
  if (blocks > 0) {
    detail::route_kernel<E, K, T><<<blocks, detail::kThreads, 0, stream>>>(
        args.logits, bias, args.gating, args.scores, args.expert_ids, args.weights, partials);
    MOEKIT_CUDA_TRY(cudaGetLastError());
  }
  if (args.stats != nullptr) {
    detail::finalize_stats_kernel<S>
        <<<1, detail::kThreads, 0, stream>>>(partials, blocks, tokens, args.stats);
    MOEKIT_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

// dlogits = (d weights / d logits)^T dweights per token (routing::
// gate_token_backward, as cpu::Router::backward_gate), overwriting dlogits.
// A row whose ids are out of range or repeated gets 0 and is counted in
// args.invalid_rows (reset by this call) where that is not null. Needs no
// workspace.
template <MoeSpecType S, LogitElement T>
cudaError_t backward_gate(const GateBackwardArgs<S, T>& args, cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::backward_gate");
  constexpr int E = S::num_experts, K = S::top_k;
  const index_t tokens = args.logits.rows();
  detail::check_token_count(tokens, K);
  check_gating(args.gating, E, K);
  check_shape(args.logits, tokens, E, "args.logits");
  check_shape(args.scores, tokens, E, "args.scores");
  check_shape(args.expert_ids, tokens, K, "args.expert_ids");
  check_shape(args.dweights, tokens, K, "args.dweights");
  check_shape(args.dlogits, tokens, E, "args.dlogits");
  OverlapCheck("gpu::backward_gate")
      .out(Footprints{
          {args.dlogits, "args.dlogits"},
          {args.invalid_rows, args.invalid_rows != nullptr ? 1 : 0, "args.invalid_rows"}})
      .in(Footprints{{args.logits, "args.logits"},
                     {args.scores, "args.scores"},
                     {args.expert_ids, "args.expert_ids"},
                     {args.dweights, "args.dweights"}})
      .check();
  auto* invalid = reinterpret_cast<unsigned long long*>(args.invalid_rows);
  static_assert(sizeof(unsigned long long) == sizeof(std::int64_t));
  if (invalid != nullptr) {
    MOEKIT_CUDA_TRY(cudaMemsetAsync(invalid, 0, sizeof(*invalid), stream));
  }
  const int blocks = detail::grid_for(tokens, detail::kRowsPerBlock<E, 2>);
  if (blocks == 0) return cudaSuccess;
  detail::backward_gate_kernel<E, K, T><<<blocks, detail::kThreads, 0, stream>>>(
      args.logits, args.scores, args.expert_ids, args.dweights, args.gating, args.dlogits, invalid);
  return cudaGetLastError();
}

}  // namespace gpu
MOEKIT_NAMESPACE_END
