#pragma once
// Token dispatch and combine on the CPU backend, forward and backward, for
// MoeSpec<E, K>, driven by a Routing that the Router wrote (moekit/cpu/router.hpp).
//
// The math. Let T be the tokens, d the feature width, ids = routing.expert_ids
// (T x K), w = routing.weights (T x K), pos = routing.positions (T x K, -1 for
// a slot dropped by capacity). Slot (t, k) is kept when pos(t, k) >= 0.
//
//   count[e]   = number of kept slots with ids(t, k) = e
//   offsets[e] = sum_{e' < e} count[e']            (exclusive scan, E + 1 entries)
//   N          = offsets[E]                        (rows of the expert-major buffer)
//   row(t, k)  = offsets[ids(t, k)] + pos(t, k)    (kept slots only)
//
// Expert e owns buffer rows [offsets[e], offsets[e + 1]); pos numbers each
// expert's kept slots 0, 1, 2, ... in token order, so within an expert the
// rows follow increasing token index (the stable permutation of docs/math.md),
// and every buffer row belongs to exactly one kept slot.
//
//   dispatch           buffer[row(t, k)]      = x[t]                          kept (t, k)
//   combine            y[t]                   = sum_{k kept} w(t, k) buffer[row(t, k)]
//   combine_backward   d_expert_out[row(t,k)] = w(t, k) dy[t]                 kept (t, k)
//                      dweights(t, k)         = <dy[t], expert_out[row(t, k)]>, 0 if dropped
//   dispatch_backward  dx[t]                  = sum_{k kept} d_buffer[row(t, k)]
//
// Sums over k run k = 0, 1, ..., K - 1 in that order, element by element,
// with no atomics; every loop is parallel over tokens and each token's result
// is computed by one thread in the same order, so results are bit-identical
// run after run and for any thread count. With `accumulate`, the sum a call
// would write is computed first and then added: y_acc = y_old + y_overwrite,
// exactly. A token whose slots are all dropped gets 0 (overwrite) or is left
// unchanged (accumulate). dispatch_backward is combine with unit weights: one
// implementation serves both.
//
// Validation (every public function, before anything is written): all views
// well formed (check_view) and of the documented shapes; routing.expert_ids in
// [0, E) (check_expert_ids); routing.positions in [-1, T); and positions are
// exactly the numbering above: scanning slots in (t, k) order, each expert's
// kept slots carry 0, 1, 2, ... with no gap, repeat or reordering. That is
// O(T K + E) with no allocation, and it rules out two slots sharing a row.
// The functions that take offsets also require offsets[0] = 0, offsets
// non-decreasing, offsets[e + 1] - offsets[e] = count[e] (so every pos is
// below its expert's count), and offsets[E] = rows of the expert-major
// matrix. Errors: kShapeMismatch (shapes, offsets[E] vs buffer rows),
// kNullPointer (null data), kOutOfRange (an id or position out of range, a
// position at or beyond its expert's count), kInvalidArgument (offsets not a
// scan of the routing's counts, positions not numbered in token order).
// Values (NaN/Inf in x or weights) are not checked. An output that overlaps
// an input is refused (kInvalidArgument, naming both). Strided views (ld >
// cols) work; padding columns are never touched.
//
//   std::array<index_t, E + 1> offsets;
//   const index_t n = dispatch_offsets<S>(routing, {offsets.data(), E + 1});
//   dispatch<S>(x, routing, offsets_view, buffer);             // buffer: n x d
//   ... expert FFNs: buffer rows [offsets[e], offsets[e + 1]) -> expert_out ...
//   combine<S>(expert_out, routing, offsets_view, y);
//   combine_backward<S>(dy, expert_out, routing, offsets_view, d_expert_out, dweights);
//   ... expert FFN backward: d_expert_out -> d_buffer ...
//   dispatch_backward<S>(d_buffer, routing, offsets_view, dx, /*accumulate=*/true);

#include <algorithm>
#include <array>
#include <cstdint>

#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/cpu/router.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

namespace detail {

// Row of slot (t, k) in the expert-major buffer, or -1 when it was dropped.
// The one place that maps a slot to its row; callers have validated routing
// and offsets.
inline index_t dispatch_row(const Routing& routing, VectorView<const index_t> offsets, index_t t,
                            index_t k) {
  const std::int32_t p = routing.positions(t, k);
  return p < 0 ? -1 : offsets[routing.expert_ids(t, k)] + p;
}

// Validates ids and positions of a routing of `tokens` tokens and returns
// the kept count per expert. With `offsets` (E + 1 entries, shape already
// checked), also that offsets is the exclusive scan of those counts.
template <MoeSpecType S>
std::array<index_t, S::num_experts> check_dispatch_routing(
    const Routing& routing, index_t tokens, const VectorView<const index_t>* offsets) {
  constexpr int kE = S::num_experts;
  constexpr int kK = S::top_k;
  check_shape(routing.expert_ids, tokens, kK, "routing.expert_ids");
  check_shape(routing.positions, tokens, kK, "routing.positions");
  check_expert_ids<S>(routing.expert_ids, "routing.expert_ids");
  std::array<index_t, to_size(kE)> count{};
  if (offsets != nullptr) {
    const VectorView<const index_t> off = *offsets;
    MOEKIT_CHECK(off[0] == 0, Errc::kInvalidArgument, "offsets[0] = ", off[0], ", expected 0");
    for (int e = 0; e < kE; ++e) {
      MOEKIT_CHECK(off[e + 1] >= off[e], Errc::kInvalidArgument, "offsets decreases: offsets[", e,
                   "] = ", off[e], " > offsets[", e + 1, "] = ", off[e + 1]);
      count[to_size(e)] = off[e + 1] - off[e];
    }
  }
  std::array<index_t, to_size(kE)> fill{};
  for (index_t t = 0; t < tokens; ++t) {
    for (int k = 0; k < kK; ++k) {
      const std::int32_t p = routing.positions(t, k);
      const std::size_t e = to_size(routing.expert_ids(t, k));
      MOEKIT_CHECK(p >= -1 && p < tokens, Errc::kOutOfRange, "routing.positions(", t, ", ", k,
                   ") = ", p, " is outside [-1, T = ", tokens, ")");
      if (p < 0) continue;
      MOEKIT_CHECK(offsets == nullptr || p < count[e], Errc::kOutOfRange, "routing.positions(", t,
                   ", ", k, ") = ", p, " is not below expert ", e, "'s row count ", count[e],
                   " in offsets");
      MOEKIT_CHECK(p == fill[e], Errc::kInvalidArgument, "routing.positions(", t, ", ", k,
                   ") = ", p, " for expert ", e, ", expected ", fill[e],
                   " (each expert's kept slots are numbered 0, 1, ... in token order)");
      ++fill[e];
    }
  }
  if (offsets != nullptr) {
    for (std::size_t e = 0; e < kE; ++e) {
      MOEKIT_CHECK(fill[e] == count[e], Errc::kInvalidArgument, "offsets give expert ", e, " ",
                   count[e], " rows, but the routing keeps ", fill[e], " of its assignments");
    }
  }
  return fill;
}

// Validates the routing of `tokens` tokens and offsets against each other;
// returns N = offsets[E], the rows every expert-major matrix must have.
template <MoeSpecType S>
index_t check_dispatch_args(const Routing& routing, index_t tokens,
                            VectorView<const index_t> offsets) {
  check_shape(offsets, index_t{S::num_experts} + 1, "offsets");
  check_dispatch_routing<S>(routing, tokens, &offsets);
  return offsets[S::num_experts];
}

// dst[t] (= or +=) sum over kept k, in order, of scale(t, k) src[row(t, k)],
// scale = routing.weights when `weighted`, else 1. Arguments validated.
template <MoeSpecType S>
void combine_rows(MatrixView<const float> src, const Routing& routing,
                  VectorView<const index_t> offsets, MatrixView<float> dst, bool accumulate,
                  bool weighted) {
  constexpr int kK = S::top_k;
  constexpr index_t kChunk = 256;  // columns summed in a stack buffer at a time
  const index_t tokens = dst.rows();
  const index_t d = dst.cols();
  MOEKIT_PARALLEL_FOR_IF(tokens * kK * d > kLightParallelGrain)
  for (index_t t = 0; t < tokens; ++t) {
    index_t rows[to_size(kK)];
    float scale[to_size(kK)];
    int kept = 0;
    for (int k = 0; k < kK; ++k) {
      const index_t r = dispatch_row(routing, offsets, t, k);
      if (r < 0) continue;
      rows[kept] = r;
      scale[kept] = weighted ? routing.weights(t, k) : 1.0f;
      ++kept;
    }
    auto out = as_eigen(dst.row_view(t));
    if (kept == 0) {
      if (!accumulate) out.setZero();
      continue;
    }
    alignas(64) float buf[kChunk];
    for (index_t j = 0; j < d; j += kChunk) {
      const index_t n = std::min(kChunk, d - j);
      Eigen::Map<Eigen::ArrayXf> acc(buf, n);
      acc = scale[0] * as_eigen(src.row_view(rows[0])).segment(j, n).array();
      for (int i = 1; i < kept; ++i) {
        acc += scale[i] * as_eigen(src.row_view(rows[i])).segment(j, n).array();
      }
      if (accumulate) {
        out.segment(j, n).array() += acc;
      } else {
        out.segment(j, n).array() = acc;
      }
    }
  }
}

}  // namespace detail

// Writes the exclusive scan of the kept counts per expert into offsets
// (E + 1 entries) and returns offsets[E] = N, the rows of the expert-major
// buffer. Validates ids and positions as described at the top.
template <MoeSpecType S>
index_t dispatch_offsets(const Routing& routing, VectorView<index_t> offsets) {
  MOEKIT_API("cpu::dispatch_offsets");
  constexpr int kE = S::num_experts;
  check_view(routing.expert_ids, "routing.expert_ids");
  check_shape(offsets, index_t{kE} + 1, "offsets");
  const std::array<index_t, to_size(kE)> count =
      detail::check_dispatch_routing<S>(routing, routing.expert_ids.rows(), nullptr);
  OverlapCheck("cpu::dispatch_offsets")
      .out({{offsets, "offsets"}})
      .in({{routing.expert_ids, "routing.expert_ids"}, {routing.positions, "routing.positions"}})
      .check();
  offsets[0] = 0;
  for (int e = 0; e < kE; ++e) offsets[e + 1] = offsets[e] + count[to_size(e)];
  return offsets[kE];
}

// buffer[row(t, k)] = x[t] for every kept slot. x: T x d, buffer: N x d.
template <MoeSpecType S>
void dispatch(MatrixView<const float> x, const Routing& routing, VectorView<const index_t> offsets,
              MatrixView<float> buffer) {
  MOEKIT_API("cpu::dispatch");
  constexpr int kK = S::top_k;
  check_view(x, "x");
  const index_t tokens = x.rows();
  const index_t rows = detail::check_dispatch_args<S>(routing, tokens, offsets);
  check_shape(buffer, rows, x.cols(), "buffer");
  OverlapCheck("cpu::dispatch")
      .out({{buffer, "buffer"}})
      .in({{x, "x"},
           {routing.expert_ids, "routing.expert_ids"},
           {routing.positions, "routing.positions"},
           {offsets, "offsets"}})
      .check();
  MOEKIT_PARALLEL_FOR_IF(tokens * kK * x.cols() > kLightParallelGrain)
  for (index_t t = 0; t < tokens; ++t) {
    for (int k = 0; k < kK; ++k) {
      const index_t r = detail::dispatch_row(routing, offsets, t, k);
      if (r >= 0) as_eigen(buffer.row_view(r)) = as_eigen(x.row_view(t));
    }
  }
}

// y[t] = sum over kept k of weights(t, k) expert_out[row(t, k)]; with
// `accumulate`, y[t] += that sum. expert_out: N x d, y: T x d.
template <MoeSpecType S>
void combine(MatrixView<const float> expert_out, const Routing& routing,
             VectorView<const index_t> offsets, MatrixView<float> y, bool accumulate = false) {
  MOEKIT_API("cpu::combine");
  check_view(routing.expert_ids, "routing.expert_ids");
  const index_t tokens = routing.expert_ids.rows();
  const index_t rows = detail::check_dispatch_args<S>(routing, tokens, offsets);
  check_shape(routing.weights, tokens, S::top_k, "routing.weights");
  check_shape(expert_out, rows, expert_out.cols(), "expert_out");
  check_shape(y, tokens, expert_out.cols(), "y");
  OverlapCheck("cpu::combine")
      .out({{y, "y"}})
      .in({{expert_out, "expert_out"},
           {routing.expert_ids, "routing.expert_ids"},
           {routing.positions, "routing.positions"},
           {routing.weights, "routing.weights"},
           {offsets, "offsets"}})
      .check();
  detail::combine_rows<S>(expert_out, routing, offsets, y, accumulate, /*weighted=*/true);
}

// Backward of combine given dy = dL/dy (T x d):
//   d_expert_out[row(t, k)] = weights(t, k) dy[t]                           (N x d)
//   dweights(t, k)          = <dy[t], expert_out[row(t, k)]>, 0 if dropped  (T x K)
// An empty output is not computed. expert_out (N x d) is read only for
// dweights and may be empty when dweights is.
template <MoeSpecType S>
void combine_backward(MatrixView<const float> dy, MatrixView<const float> expert_out,
                      const Routing& routing, VectorView<const index_t> offsets,
                      MatrixView<float> d_expert_out, MatrixView<float> dweights) {
  MOEKIT_API("cpu::combine_backward");
  constexpr int kK = S::top_k;
  check_view(dy, "dy");
  const index_t tokens = dy.rows();
  const index_t d = dy.cols();
  const index_t rows = detail::check_dispatch_args<S>(routing, tokens, offsets);
  const bool want_dout = !d_expert_out.empty();
  const bool want_dw = !dweights.empty();
  if (want_dout) check_shape(d_expert_out, rows, d, "d_expert_out");
  if (want_dw) check_shape(dweights, tokens, kK, "dweights");
  if (want_dw || !expert_out.empty()) check_shape(expert_out, rows, d, "expert_out");
  if (want_dout) check_shape(routing.weights, tokens, kK, "routing.weights");
  OverlapCheck("cpu::combine_backward")
      .out({{d_expert_out, "d_expert_out"}, {dweights, "dweights"}})
      .in({{dy, "dy"},
           {expert_out, "expert_out"},
           {routing.expert_ids, "routing.expert_ids"},
           {routing.positions, "routing.positions"},
           {routing.weights, "routing.weights"},
           {offsets, "offsets"}})
      .check();
  MOEKIT_PARALLEL_FOR_IF(tokens * kK * d > kLightParallelGrain)
  for (index_t t = 0; t < tokens; ++t) {
    const auto g = as_eigen(dy.row_view(t));
    for (int k = 0; k < kK; ++k) {
      const index_t r = detail::dispatch_row(routing, offsets, t, k);
      if (want_dout && r >= 0) as_eigen(d_expert_out.row_view(r)) = routing.weights(t, k) * g;
      if (want_dw) dweights(t, k) = r >= 0 ? g.dot(as_eigen(expert_out.row_view(r))) : 0.0f;
    }
  }
}

// Backward of dispatch (the transpose of the gather): dx[t] = sum over kept
// k of d_buffer[row(t, k)]; with `accumulate`, dx[t] += that sum.
// d_buffer: N x d, dx: T x d.
template <MoeSpecType S>
void dispatch_backward(MatrixView<const float> d_buffer, const Routing& routing,
                       VectorView<const index_t> offsets, MatrixView<float> dx,
                       bool accumulate = false) {
  MOEKIT_API("cpu::dispatch_backward");
  check_view(routing.expert_ids, "routing.expert_ids");
  const index_t tokens = routing.expert_ids.rows();
  const index_t rows = detail::check_dispatch_args<S>(routing, tokens, offsets);
  check_shape(d_buffer, rows, d_buffer.cols(), "d_buffer");
  check_shape(dx, tokens, d_buffer.cols(), "dx");
  OverlapCheck("cpu::dispatch_backward")
      .out({{dx, "dx"}})
      .in({{d_buffer, "d_buffer"},
           {routing.expert_ids, "routing.expert_ids"},
           {routing.positions, "routing.positions"},
           {offsets, "offsets"}})
      .check();
  detail::combine_rows<S>(d_buffer, routing, offsets, dx, accumulate, /*weighted=*/false);
}

}  // namespace cpu
MOEKIT_NAMESPACE_END
