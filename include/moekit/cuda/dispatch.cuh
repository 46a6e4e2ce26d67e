#pragma once
// Capacity, dispatch and combine on the CUDA backend, forward and backward,
// for MoeSpec<E, K>: the math of moekit/cpu/dispatch.hpp (docs/math.md) on a
// routing that gpu::route() wrote.
//
//   gpu::DispatchPlanArgs<Spec> plan{ids, weights, capacity, /*row_alignment=*/1,
//                                    positions, offsets, row_slots, d_stats};
//   gpu::plan_dispatch(nullptr, bytes, plan, stream);     // size query
//   gpu::plan_dispatch(d_workspace, bytes, plan, stream); // positions, offsets, row_slots
//   gpu::dispatch<Spec>(x, plan.dispatch_map(), buffer, stream);
//   ... expert FFNs on buffer rows [offsets[e], offsets[e + 1]) -> expert_out ...
//   gpu::combine<Spec>(expert_out, ids, weights, positions, offsets, y, false, stream);
//
// The plan. Slot s = t K + k is token t's k-th assignment. With C the
// capacity (docs/math.md, "Capacity"; T when dropless) and a the row alignment:
//
//   p(t, k)    = kept slots of expert e = ids(t, k) before s, in slot order
//   positions  = p, or -1 for a slot dropped by capacity (its weight set to 0)
//   kept[e]    = min(assigned[e], C)
//   offsets[e] = sum_{e' < e} round_up(kept[e'], a)          (E + 1 entries)
//   row(t, k)  = offsets[e] + p(t, k);  row_slots[row] = s,  -1 for padding
//
// so expert e owns rows [offsets[e], offsets[e + 1]): its kept slots in token
// order (the stable permutation), then zero rows up to a multiple of a (a
// GEMM tile height). With a = 1 positions and offsets are exactly what
// cpu::Router::route and cpu::dispatch_offsets give. kPosition keeps each
// expert's first C slots; kProbs keeps its C highest weights (ties: the
// earlier slot), as the CPU does; both then number the kept in token order.
//
// How (why this design): a counting sort. Each block takes a contiguous run
// of slots and counts them per expert (warp match-any, one leader per expert
// adds the group's size: no atomics); the expert-major matrix of block counts
// is one exclusive scan (cub::DeviceScan), which gives every block its
// first rank per expert; a second pass numbers the slots in order. kProbs
// first sorts (expert, weight descending) keys with cub::DeviceRadixSort,
// which is stable, to choose the kept, then numbers those the same way.
// The result is a pure function of the inputs: reruns are bit-identical.
//
// Conventions as in moekit/cuda/router.cuh: a null d_temp_storage asks for
// the workspace size (reading the token count and args.capacity: kProbs
// needs room to sort, so ask with the capacity you will run); arguments are
// validated on the host and a bad one throws moekit::Error before anything
// runs; CUDA failures come back as the returned cudaError_t; all pointers
// are device memory; nothing allocates or synchronises. Rows are
// data-dependent, so buffers are sized for the worst case
// (max_dispatch_rows()) and kernels read offsets[E] on the device.
//
// Device data the host cannot check: an expert id outside [0, E) in the plan
// is dropped (position -1, weight 0) and counted in args.invalid_ids. The
// other calls trust the plan's positions and offsets; a slot whose row falls
// outside the buffer is skipped, so bad data never writes out of bounds.
//
// Element types: activations in fp32, bf16 or fp16; dispatch copies rows
// bit for bit, combine sums in fp32 in k order and rounds once. Rows whose
// bytes are 16-byte aligned move as 16-byte vectors.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "moekit/core/error.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cuda/error.cuh"
#include "moekit/cuda/router.cuh"
#include "moekit/cuda/warp.cuh"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace gpu {

// Element types of activations (the same set as logits).
template <class T>
concept ActivationElement = LogitElement<T>;

// What plan_dispatch() counted, written to DEVICE memory.
template <MoeSpecType S>
struct DispatchStats {
  static constexpr int kExperts = S::num_experts;  // E, the length of the per-expert arrays
  std::int64_t capacity;                           // C (T when dropless)
  std::int64_t rows;                // offsets[E]: buffer rows in use, padding included
  std::int64_t dropped;             // assignments dropped by capacity
  std::int64_t assigned[kExperts];  // per expert, before capacity (valid ids only)
  std::int64_t kept[kExperts];      // per expert, after capacity
};

// What dispatch() and combine_backward() read of a plan.
struct DispatchMap {
  VectorView<const std::int32_t> row_slots;  // max rows: slot of each row, -1 padding
  const index_t* rows_in_use = nullptr;      // device: &offsets[E]
};

// Arguments of plan_dispatch().
template <MoeSpecType S>
struct DispatchPlanArgs {
  MatrixView<const std::int32_t> expert_ids;  // T x K, as route() wrote them
  MatrixView<float> weights;                  // T x K; dropped slots set to 0
  CapacityConfig capacity{};                  // factor <= 0: dropless
  int row_alignment = 1;                      // pad each expert's rows to a multiple
  MatrixView<std::int32_t> positions;         // T x K out: p, or -1 when dropped
  VectorView<index_t> offsets;                // E + 1 out
  VectorView<std::int32_t> row_slots;         // >= max_dispatch_rows() out
  DispatchStats<S>* stats = nullptr;          // device; null: none
  std::int64_t* invalid_ids = nullptr;        // device; ids outside [0, E) (reset by the call)

  // The plan's outputs that dispatch() and combine_backward() read.
  DispatchMap dispatch_map() const {
    return {{row_slots.data(), row_slots.size()}, offsets.data() + S::num_experts};
  }
};

// The most buffer rows a plan of `tokens` tokens can use: every kept slot
// plus the padding, min(T K, E C) + E (a - 1). Size buffers with this.
template <MoeSpecType S>
index_t max_dispatch_rows(index_t tokens, const CapacityConfig& capacity, int row_alignment = 1) {
  constexpr int E = S::num_experts, K = S::top_k;
  MOEKIT_CHECK_ARG(tokens >= 0, "the token count ", tokens, " is negative");
  MOEKIT_CHECK_ARG(row_alignment >= 1, "row_alignment = ", row_alignment, " is not positive");
  const index_t slots = tokens * K;
  const index_t cap_rows = index_t{E} * expert_capacity(tokens, E, K, capacity.factor);
  return (slots < cap_rows ? slots : cap_rows) + index_t{E} * (row_alignment - 1);
}

namespace detail {

inline constexpr int kWarps = kThreads / 32;

// Slots one block counts and numbers: about 16 per expert, so the matrix of
// block counts (E x blocks) stays near T K / 16 entries, within [512, 8192].
template <int E>
inline constexpr int kBlockSlots = [] {
  const int slots = (16 * E + kThreads - 1) / kThreads * kThreads;
  return slots < 512 ? 512 : (slots > 8192 ? 8192 : slots);
}();
template <int E>
inline constexpr int kWarpSlots = kBlockSlots<E> / kWarps;

// A weight as a radix key that sorts descending: larger weights get smaller
// keys; -0 and +0 are one key (the CPU compares them equal); NaN sorts last.
MOEKIT_HOST_DEVICE inline std::uint32_t descending_weight_key(float w) {
  std::uint32_t u;
  memcpy(&u, &w, sizeof(u));
  // Bit tests, not float compares, so that -ffast-math cannot fold them away.
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFFFFFu;  // NaN
  if ((u & 0x7FFFFFFFu) == 0) u = 0;                        // -0 -> +0
  const std::uint32_t ascending = (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
  return ~ascending;
}

// Bits that hold an expert id 0..E (E itself marks an invalid id).
template <int E>
inline constexpr int kExpertBits = [] {
  int bits = 1;
  while ((1 << bits) <= E) ++bits;
  return bits;
}();

MOEKIT_HOST_DEVICE inline index_t round_up_rows(index_t n, int a) { return (n + a - 1) / a * a; }

// The expert a slot is counted for, or -1: an id outside [0, E), or (when
// `marks` is not empty) a slot marked dropped (-1) by an earlier pass.
template <int E, int K>
MOEKIT_DEVICE int slot_expert(MatrixView<const std::int32_t> ids,
                              MatrixView<const std::int32_t> marks, index_t s) {
  const index_t t = s / K;
  const int k = static_cast<int>(s - t * K);
  const int e = ids(t, k);
  if (e < 0 || e >= E) return -1;
  if (!marks.empty() && marks(t, k) < 0) return -1;
  return e;
}

// This warp's run of slots within block b: [first, end).
template <int E>
MOEKIT_DEVICE void warp_range(index_t slots, index_t& first, index_t& end) {
  const index_t block_first = static_cast<index_t>(blockIdx.x) * kBlockSlots<E>;
  first = block_first + static_cast<index_t>(threadIdx.x / 32) * kWarpSlots<E>;
  end = first + kWarpSlots<E> < slots ? first + kWarpSlots<E> : slots;
}

// hist[e] += this warp's slots of expert e. Lanes with the same expert
// find each other (match-any); the lowest adds the group's size.
template <int E, int K>
MOEKIT_DEVICE void warp_count(MatrixView<const std::int32_t> ids,
                              MatrixView<const std::int32_t> marks, index_t first, index_t end,
                              int* hist, unsigned long long* invalid) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  int bad = 0;
  for (index_t base = first; base < end; base += 32) {
    const index_t s = base + lane;
    const int e = s < end ? slot_expert<E, K>(ids, marks, s) : -1;
    if (invalid != nullptr && s < end) {
      const int raw = ids(s / K, static_cast<int>(s % K));
      bad += raw < 0 || raw >= E;
    }
    const unsigned peers = __match_any_sync(0xFFFFFFFFu, e);
    if (e >= 0 && lane == __ffs(static_cast<int>(peers)) - 1) hist[e] += __popc(peers);
  }
  if (invalid != nullptr) {
    bad = warp_sum(bad);
    if (lane == 0 && bad > 0) atomicAdd(invalid, static_cast<unsigned long long>(bad));
  }
}

// Pass one: counts[e * blocks + b] = slots of expert e in block b (the
// expert-major layout, so one exclusive scan numbers every block's slots).
template <int E, int K>
__global__ void __launch_bounds__(kThreads)
    count_slots_kernel(MatrixView<const std::int32_t> ids, MatrixView<const std::int32_t> marks,
                       int blocks, std::int32_t* counts, unsigned long long* invalid) {
  __shared__ int hist[kWarps][E];
  for (int i = static_cast<int>(threadIdx.x); i < kWarps * E; i += kThreads) (&hist[0][0])[i] = 0;
  __syncthreads();
  index_t first, end;
  warp_range<E>(ids.rows() * K, first, end);
  warp_count<E, K>(ids, marks, first, end, hist[threadIdx.x / 32], invalid);
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < E; e += kThreads) {
    int total = 0;
    for (int w = 0; w < kWarps; ++w) total += hist[w][e];
    counts[static_cast<index_t>(e) * blocks + blockIdx.x] = total;
  }
}

// assigned, kept and the padded offsets from the scanned counts of pass one
// (starts[e * blocks] is the first rank of expert e; starts[E * blocks] the
// total). One block; cub::BlockScan over the experts.
template <MoeSpecType S>
__global__ void __launch_bounds__(kThreads)
    offsets_kernel(const std::int32_t* starts, int blocks, index_t capacity, int alignment,
                   index_t* offsets, DispatchStats<S>* stats) {
  constexpr int E = S::num_experts;
  constexpr int kItems = (E + kThreads - 1) / kThreads;
  using Scan = cub::BlockScan<index_t, kThreads>;
  using Reduce = cub::BlockReduce<index_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename Reduce::TempStorage reduce_storage;
  index_t assigned[kItems], kept[kItems], padded[kItems], first[kItems];
  index_t dropped = 0;
  for (int i = 0; i < kItems; ++i) {
    const int e = static_cast<int>(threadIdx.x) * kItems + i;  // blocked arrangement
    assigned[i] = e < E ? starts[static_cast<index_t>(e + 1) * blocks] -
                              starts[static_cast<index_t>(e) * blocks]
                        : 0;
    kept[i] = assigned[i] < capacity ? assigned[i] : capacity;
    padded[i] = round_up_rows(kept[i], alignment);
    dropped += assigned[i] - kept[i];
  }
  index_t rows = 0;
  Scan(scan_storage).ExclusiveSum(padded, first, rows);
  for (int i = 0; i < kItems; ++i) {
    const int e = static_cast<int>(threadIdx.x) * kItems + i;
    if (e >= E) continue;
    offsets[e] = first[i];
    if (stats != nullptr) {
      stats->assigned[e] = assigned[i];
      stats->kept[e] = kept[i];
    }
  }
  const index_t total_dropped = Reduce(reduce_storage).Sum(dropped);
  if (threadIdx.x == 0) {
    offsets[E] = rows;
    if (stats != nullptr) {
      stats->capacity = capacity;
      stats->rows = rows;
      stats->dropped = total_dropped;
    }
  }
}

// Pass two: numbers every counted slot by its rank p among its expert's
// counted slots (starts: the scan of pass one's counts). p < capacity: the
// slot is kept at row offsets[e] + p; otherwise (and for an invalid id) it
// is dropped. With marks, slots already dropped keep their -1 and 0.
template <int E, int K>
__global__ void __launch_bounds__(kThreads)
    number_slots_kernel(MatrixView<const std::int32_t> ids, bool marked,
                        MatrixView<std::int32_t> positions, MatrixView<float> weights,
                        const std::int32_t* starts, int blocks, index_t capacity,
                        const index_t* offsets, std::int32_t* row_slots, index_t max_rows) {
  __shared__ int rank[kWarps][E];  // first rank of each expert for each warp
  const MatrixView<const std::int32_t> marks =
      marked ? MatrixView<const std::int32_t>(positions) : MatrixView<const std::int32_t>();
  for (int i = static_cast<int>(threadIdx.x); i < kWarps * E; i += kThreads) (&rank[0][0])[i] = 0;
  __syncthreads();
  const index_t slots = ids.rows() * K;
  index_t first, end;
  warp_range<E>(slots, first, end);
  const int warp = static_cast<int>(threadIdx.x / 32);
  warp_count<E, K>(ids, marks, first, end, rank[warp], nullptr);
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < E; e += kThreads) {
    const index_t column = static_cast<index_t>(e) * blocks;
    int next = starts[column + blockIdx.x] - starts[column];
    for (int w = 0; w < kWarps; ++w) {
      const int n = rank[w][e];
      rank[w][e] = next;
      next += n;
    }
  }
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x % 32);
  const unsigned lower = (1u << lane) - 1u;
  for (index_t base = first; base < end; base += 32) {
    const index_t s = base + lane;
    const int e = s < end ? slot_expert<E, K>(ids, marks, s) : -1;
    const unsigned peers = __match_any_sync(0xFFFFFFFFu, e);
    const int p = e >= 0 ? rank[warp][e] + __popc(peers & lower) : -1;
    __syncwarp();
    if (e >= 0 && lane == __ffs(static_cast<int>(peers)) - 1) rank[warp][e] += __popc(peers);
    __syncwarp();
    if (s >= end) continue;
    const index_t t = s / K;
    const int k = static_cast<int>(s - t * K);
    if (e < 0) {
      if (!marked) {  // an invalid id (marked passes dropped these already)
        positions(t, k) = -1;
        weights(t, k) = 0.0f;
      }
      continue;
    }
    const index_t row = offsets[e] + p;
    if (p < capacity && row < max_rows) {
      positions(t, k) = p;
      row_slots[row] = static_cast<std::int32_t>(s);
    } else {
      positions(t, k) = -1;
      weights(t, k) = 0.0f;
    }
  }
}

// kProbs: keys[s] = (expert << 32) | descending weight, values[s] = s (an
// invalid id sorts after every expert as expert E).
template <int E, int K>
__global__ void __launch_bounds__(kThreads)
    weight_keys_kernel(MatrixView<const std::int32_t> ids, MatrixView<const float> weights,
                       std::uint64_t* keys, std::int32_t* values) {
  const index_t s = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (s >= ids.rows() * K) return;
  const index_t t = s / K;
  const int k = static_cast<int>(s - t * K);
  const int raw = ids(t, k);
  const std::uint64_t e = raw >= 0 && raw < E ? static_cast<std::uint64_t>(raw) : E;
  keys[s] = e << 32 | descending_weight_key(weights(t, k));
  values[s] = static_cast<std::int32_t>(s);
}

// kProbs: in sorted order, expert e's first `capacity` slots are kept
// (marked 0), the rest dropped (-1, weight 0). starts[e * blocks] is the
// first sorted index of expert e (pass one's scan).
template <int E, int K>
__global__ void __launch_bounds__(kThreads)
    mark_kept_kernel(const std::uint64_t* keys, const std::int32_t* values, index_t slots,
                     const std::int32_t* starts, int blocks, index_t capacity,
                     MatrixView<std::int32_t> positions, MatrixView<float> weights) {
  const index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= slots) return;
  const int e = static_cast<int>(keys[i] >> 32);
  const index_t s = values[i];
  const index_t t = s / K;
  const int k = static_cast<int>(s - t * K);
  const bool kept = e < E && i - starts[static_cast<index_t>(e) * blocks] < capacity;
  positions(t, k) = kept ? 0 : -1;
  if (!kept) weights(t, k) = 0.0f;
}

// ---- row movement ------------------------------------------------------------
//
// A row is moved in chunks of N elements: N = 16 bytes' worth when every row
// involved is 16-byte aligned (one vector load or store per chunk), else 1.

template <class T>
inline constexpr int kVectorElements = 16 / static_cast<int>(sizeof(T));

template <class T>
MOEKIT_DEVICE inline T from_float(float v);
template <>
MOEKIT_DEVICE inline float from_float<float>(float v) {
  return v;
}
template <>
MOEKIT_DEVICE inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
MOEKIT_DEVICE inline __half from_float<__half>(float v) {
  return __float2half(v);
}

template <int N, class T>
MOEKIT_DEVICE void load_chunk(const T* p, float (&v)[N]) {
  if constexpr (N == 1) {
    v[0] = to_float(*p);
  } else {
    static_assert(N * sizeof(T) == 16);
    union {
      uint4 raw;
      T elements[N];
    } u;
    u.raw = *reinterpret_cast<const uint4*>(p);
    for (int i = 0; i < N; ++i) v[i] = to_float(u.elements[i]);
  }
}

template <int N, class T>
MOEKIT_DEVICE void store_chunk(T* p, const float (&v)[N]) {
  if constexpr (N == 1) {
    *p = from_float<T>(v[0]);
  } else {
    union {
      uint4 raw;
      T elements[N];
    } u;
    for (int i = 0; i < N; ++i) u.elements[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = u.raw;
  }
}

template <int N, class T>
MOEKIT_DEVICE void copy_chunk(const T* from, T* to) {
  if constexpr (N == 1) {
    *to = *from;
  } else {
    *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
  }
}

// Whether every row of these matrices starts on a 16-byte boundary and has
// a whole number of 16-byte chunks.
template <class T, class... M>
bool rows_vectorizable(index_t cols, const M&... m) {
  const auto aligned = [](const auto& v) {
    return reinterpret_cast<std::uintptr_t>(v.data()) % 16 == 0 &&
           (v.ld() * static_cast<index_t>(sizeof(T))) % 16 == 0;
  };
  return (cols * static_cast<index_t>(sizeof(T))) % 16 == 0 && (aligned(m) && ...);
}

// One warp per buffer row n < rows in use: dst[n] = scale * src[t] for the
// slot s = t K + k of row n (scale = weights(t, k) when kWeighted, else the
// row is copied bit for bit), zeros for a padding row.
template <int K, int N, bool kWeighted, class T>
__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(MatrixView<const T> src, DispatchMap map, MatrixView<const float> weights,
                        MatrixView<T> dst) {
  const index_t n = static_cast<index_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= dst.rows() || n >= *map.rows_in_use) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const index_t d = dst.cols();
  const std::int32_t s = map.row_slots[n];
  T* out = dst.row(n);
  const index_t t = s / K;
  if (s < 0 || t >= src.rows()) {
    float zero[N] = {};
    for (index_t j = lane * N; j < d; j += 32 * N) store_chunk<N>(out + j, zero);
    return;
  }
  const T* in = src.row(t);
  if constexpr (kWeighted) {
    const float w = weights(t, static_cast<int>(s - t * K));
    for (index_t j = lane * N; j < d; j += 32 * N) {
      float v[N];
      load_chunk<N>(in + j, v);
      for (int i = 0; i < N; ++i) v[i] *= w;
      store_chunk<N>(out + j, v);
    }
  } else {
    for (index_t j = lane * N; j < d; j += 32 * N) copy_chunk<N>(in + j, out + j);
  }
}

// rows[k] = the row of token t's slot k, or -1 when it is dropped (or its
// id or row is out of range). Indexed by the unrolled k, so the arrays stay
// in registers.
template <int E, int K>
MOEKIT_DEVICE void token_rows(MatrixView<const std::int32_t> ids,
                              MatrixView<const std::int32_t> positions, const index_t* offsets,
                              index_t buffer_rows, index_t t, index_t (&rows)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int e = ids(t, k);
    const std::int32_t p = positions(t, k);
    const index_t r = e >= 0 && e < E && p >= 0 ? offsets[e] + p : -1;
    rows[k] = r < buffer_rows ? r : -1;
  }
}

// One warp per token: dst[t] (= or +=) sum over kept k, in k order, of
// scale(t, k) src[row(t, k)] in fp32 (scale = weights when kWeighted, else
// 1); the sum is formed first and then added, as on the CPU.
template <int E, int K, int N, bool kWeighted, class T>
__global__ void __launch_bounds__(kThreads)
    gather_sum_kernel(MatrixView<const T> src, MatrixView<const std::int32_t> ids,
                      MatrixView<const float> weights, MatrixView<const std::int32_t> positions,
                      const index_t* offsets, MatrixView<T> dst, bool accumulate) {
  const index_t t = static_cast<index_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (t >= dst.rows()) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  index_t rows[K];
  token_rows<E, K>(ids, positions, offsets, src.rows(), t, rows);
  float scale[K];
  bool any = false;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    scale[k] = kWeighted && rows[k] >= 0 ? weights(t, k) : 1.0f;
    any = any || rows[k] >= 0;
  }
  if (!any && accumulate) return;
  T* out = dst.row(t);
  for (index_t j = lane * N; j < dst.cols(); j += 32 * N) {
    float acc[N] = {};
    bool first = true;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (rows[k] < 0) continue;
      float v[N];
      load_chunk<N>(src.row(rows[k]) + j, v);
      for (int c = 0; c < N; ++c) acc[c] = first ? scale[k] * v[c] : acc[c] + scale[k] * v[c];
      first = false;
    }
    if (accumulate) {
      float old[N];
      load_chunk<N>(out + j, old);
      for (int c = 0; c < N; ++c) acc[c] = old[c] + acc[c];
    }
    store_chunk<N>(out + j, acc);
  }
}

// One warp per token: dweights(t, k) = <dy[t], expert_out[row(t, k)]> for a
// kept slot, 0 for a dropped one. Each lane sums its chunks in order, then
// a butterfly adds the lanes: a fixed order, so reruns are bit-identical.
template <int E, int K, int N, class T>
__global__ void __launch_bounds__(kThreads)
    weight_grad_kernel(MatrixView<const T> dy, MatrixView<const T> expert_out,
                       MatrixView<const std::int32_t> ids, MatrixView<const std::int32_t> positions,
                       const index_t* offsets, MatrixView<float> dweights) {
  const index_t t = static_cast<index_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (t >= dy.rows()) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  index_t rows[K];
  token_rows<E, K>(ids, positions, offsets, expert_out.rows(), t, rows);
  const T* g = dy.row(t);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float sum = 0.0f;
    if (rows[k] >= 0) {
      const T* o = expert_out.row(rows[k]);
      for (index_t j = lane * N; j < dy.cols(); j += 32 * N) {
        float a[N], b[N];
        load_chunk<N>(g + j, a);
        load_chunk<N>(o + j, b);
        for (int c = 0; c < N; ++c) sum += a[c] * b[c];
      }
      sum = warp_sum(sum);
    }
    if (lane == 0) dweights(t, k) = sum;
  }
}

inline int warp_grid(index_t rows) { return static_cast<int>((rows + kWarps - 1) / kWarps); }

inline void check_row_alignment(int a) {
  MOEKIT_CHECK_ARG(a >= 1, "row_alignment = ", a, " is not positive");
}

// The routing part every call after the plan reads.
template <MoeSpecType S>
void check_saved_plan(MatrixView<const std::int32_t> ids, MatrixView<const std::int32_t> positions,
                      VectorView<const index_t> offsets, index_t tokens) {
  check_token_count(tokens, S::top_k);
  check_shape(ids, tokens, S::top_k, "expert_ids");
  check_shape(positions, tokens, S::top_k, "positions");
  check_shape(offsets, index_t{S::num_experts} + 1, "offsets");
}

template <MoeSpecType S>
void check_plan_args(const DispatchPlanArgs<S>& a) {
  constexpr int E = S::num_experts, K = S::top_k;
  const index_t tokens = a.expert_ids.rows();
  check_token_count(tokens, K);
  MOEKIT_CHECK_ARG(!std::isnan(a.capacity.factor), "args.capacity.factor is NaN");
  MOEKIT_CHECK_ARG(
      a.capacity.policy == DropPolicy::kPosition || a.capacity.policy == DropPolicy::kProbs,
      "args.capacity.policy = ", static_cast<int>(a.capacity.policy), " is not a DropPolicy");
  check_row_alignment(a.row_alignment);
  check_shape(a.expert_ids, tokens, K, "args.expert_ids");
  check_shape(a.weights, tokens, K, "args.weights");
  check_shape(a.positions, tokens, K, "args.positions");
  check_shape(a.offsets, index_t{E} + 1, "args.offsets");
  const index_t max_rows = max_dispatch_rows<S>(tokens, a.capacity, a.row_alignment);
  MOEKIT_CHECK(a.row_slots.size() >= max_rows, Errc::kShapeMismatch, "args.row_slots has ",
               a.row_slots.size(), " entries, fewer than max_dispatch_rows() = ", max_rows);
  if (a.row_slots.size() > 0) {
    MOEKIT_CHECK(a.row_slots.data() != nullptr, Errc::kNullPointer, "args.row_slots is null");
  }
}

}  // namespace detail

// Capacity and the dispatch plan of T tokens (header: the math, two-phase,
// validation): writes positions, offsets, row_slots (every entry: -1 where no
// slot lands) and zeroes the weights of dropped slots; with args.stats the
// counts. Reruns give the same bits.
template <MoeSpecType S>
cudaError_t plan_dispatch(void* d_temp_storage, std::size_t& temp_storage_bytes,
                          const DispatchPlanArgs<S>& args, cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::plan_dispatch");
  constexpr int E = S::num_experts, K = S::top_k;
  const index_t tokens = args.expert_ids.rows();
  detail::check_token_count(tokens, K);
  const index_t slots = tokens * K;
  const int blocks = detail::grid_for(slots, detail::kBlockSlots<E>);
  const bool by_weight = args.capacity.factor > 0.0 && args.capacity.policy == DropPolicy::kProbs;

  if (d_temp_storage != nullptr) detail::check_plan_args(args);  // before CUB's size queries

  // Workspace: counts and their scan (E x blocks + 1 each), CUB's scan
  // storage, and for kProbs the sort's keys, values and storage.
  const std::size_t count_items = static_cast<std::size_t>(E) * blocks + 1;
  std::size_t scan_bytes = 0, sort_bytes = 0;
  MOEKIT_CUDA_TRY(cub::DeviceScan::ExclusiveSum(
      nullptr, scan_bytes, static_cast<const std::int32_t*>(nullptr),
      static_cast<std::int32_t*>(nullptr), static_cast<std::int64_t>(count_items)));
  if (by_weight) {
    MOEKIT_CUDA_TRY(cub::DeviceRadixSort::SortPairs(
        nullptr, sort_bytes, static_cast<const std::uint64_t*>(nullptr),
        static_cast<std::uint64_t*>(nullptr), static_cast<const std::int32_t*>(nullptr),
        static_cast<std::int32_t*>(nullptr), static_cast<std::int64_t>(slots), 0,
        32 + detail::kExpertBits<E>));
  }
  detail::WorkspacePlan plan;
  const std::size_t at_counts = plan.reserve(count_items * sizeof(std::int32_t));
  const std::size_t at_starts = plan.reserve(count_items * sizeof(std::int32_t));
  const std::size_t at_scan = plan.reserve(scan_bytes);
  const std::size_t n_sort = by_weight ? static_cast<std::size_t>(slots) : 0;
  const std::size_t at_keys_in = plan.reserve(n_sort * sizeof(std::uint64_t));
  const std::size_t at_keys_out = plan.reserve(n_sort * sizeof(std::uint64_t));
  const std::size_t at_values_in = plan.reserve(n_sort * sizeof(std::int32_t));
  const std::size_t at_values_out = plan.reserve(n_sort * sizeof(std::int32_t));
  const std::size_t at_sort = plan.reserve(sort_bytes);
  if (detail::size_query(d_temp_storage, temp_storage_bytes, plan.bytes())) return cudaSuccess;
  OverlapCheck("gpu::plan_dispatch")  // args.weights is read and written
      .out(Footprints{{args.weights, "args.weights"},
                      {args.positions, "args.positions"},
                      {args.offsets, "args.offsets"},
                      {args.row_slots, "args.row_slots"},
                      {args.stats, args.stats != nullptr ? 1 : 0, "args.stats"},
                      {args.invalid_ids, args.invalid_ids != nullptr ? 1 : 0, "args.invalid_ids"},
                      detail::temp_storage(d_temp_storage, plan.bytes())})
      .in(Footprints{{args.expert_ids, "args.expert_ids"}})
      .check();

  const index_t capacity = expert_capacity(tokens, E, K, args.capacity.factor);
  auto* counts = detail::carve<std::int32_t>(d_temp_storage, at_counts);
  auto* starts = detail::carve<std::int32_t>(d_temp_storage, at_starts);
  void* scan_storage = static_cast<char*>(d_temp_storage) + at_scan;
  auto* invalid = reinterpret_cast<unsigned long long*>(args.invalid_ids);
  const MatrixView<const std::int32_t> ids = args.expert_ids;
  const MatrixView<const std::int32_t> no_marks{};
  const MatrixView<const std::int32_t> marks = args.positions;

  if (invalid != nullptr) MOEKIT_CUDA_TRY(cudaMemsetAsync(invalid, 0, sizeof(*invalid), stream));
  if (args.row_slots.size() > 0) {
    MOEKIT_CUDA_TRY(cudaMemsetAsync(args.row_slots.data(), 0xFF,
                                    static_cast<std::size_t>(args.row_slots.size()) * 4, stream));
  }
  // counts[E * blocks] = 0: its exclusive sum is the total.
  MOEKIT_CUDA_TRY(cudaMemsetAsync(counts + count_items - 1, 0, sizeof(std::int32_t), stream));
  const auto count_and_scan = [&](MatrixView<const std::int32_t> m,
                                  unsigned long long* bad) -> cudaError_t {
    if (blocks > 0) {
      detail::count_slots_kernel<E, K>
          <<<blocks, detail::kThreads, 0, stream>>>(ids, m, blocks, counts, bad);
      MOEKIT_CUDA_TRY(cudaGetLastError());
    }
    std::size_t bytes = scan_bytes;
    return cub::DeviceScan::ExclusiveSum(scan_storage, bytes, counts, starts,
                                         static_cast<std::int64_t>(count_items), stream);
  };

  MOEKIT_CUDA_TRY(count_and_scan(no_marks, invalid));
  detail::offsets_kernel<S><<<1, detail::kThreads, 0, stream>>>(
      starts, blocks, capacity, args.row_alignment, args.offsets.data(), args.stats);
  MOEKIT_CUDA_TRY(cudaGetLastError());
  if (slots == 0) return cudaSuccess;

  bool marked = false;
  index_t rank_limit = capacity;
  if (by_weight) {
    auto* keys_in = detail::carve<std::uint64_t>(d_temp_storage, at_keys_in);
    auto* keys_out = detail::carve<std::uint64_t>(d_temp_storage, at_keys_out);
    auto* values_in = detail::carve<std::int32_t>(d_temp_storage, at_values_in);
    auto* values_out = detail::carve<std::int32_t>(d_temp_storage, at_values_out);
    const int slot_blocks = detail::grid_for(slots, detail::kThreads);
    detail::weight_keys_kernel<E, K>
        <<<slot_blocks, detail::kThreads, 0, stream>>>(ids, args.weights, keys_in, values_in);
    MOEKIT_CUDA_TRY(cudaGetLastError());
    std::size_t bytes = sort_bytes;
    MOEKIT_CUDA_TRY(cub::DeviceRadixSort::SortPairs(
        static_cast<char*>(d_temp_storage) + at_sort, bytes, keys_in, keys_out, values_in,
        values_out, static_cast<std::int64_t>(slots), 0, 32 + detail::kExpertBits<E>, stream));
    detail::mark_kept_kernel<E, K><<<slot_blocks, detail::kThreads, 0, stream>>>(
        keys_out, values_out, slots, starts, blocks, capacity, args.positions, args.weights);
    MOEKIT_CUDA_TRY(cudaGetLastError());
    MOEKIT_CUDA_TRY(count_and_scan(marks, nullptr));  // number the kept only
    marked = true;
    rank_limit = std::numeric_limits<index_t>::max();
  }
  detail::number_slots_kernel<E, K><<<blocks, detail::kThreads, 0, stream>>>(
      ids, marked, args.positions, args.weights, starts, blocks, rank_limit, args.offsets.data(),
      args.row_slots.data(), args.row_slots.size());
  return cudaGetLastError();
}

// buffer[row] = x[t] for the slot t K + k of every row in use (bit for bit);
// padding rows get 0; rows from offsets[E] on are not touched.
// x: T x d, buffer: max rows x d (at least max_dispatch_rows()).
template <MoeSpecType S, ActivationElement T>
cudaError_t dispatch(MatrixView<const T> x, const DispatchMap& map, MatrixView<T> buffer,
                     cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::dispatch");
  constexpr int K = S::top_k;
  detail::check_token_count(x.rows(), K);
  check_view(x, "x");
  check_view(buffer, "buffer");
  MOEKIT_CHECK(buffer.cols() == x.cols(), Errc::kShapeMismatch, "buffer has ", buffer.cols(),
               " columns, x has ", x.cols());
  MOEKIT_CHECK(map.row_slots.size() >= buffer.rows(), Errc::kShapeMismatch, "row_slots has ",
               map.row_slots.size(), " entries, fewer than the buffer's ", buffer.rows(), " rows");
  check_view(map.row_slots, "map.row_slots");
  MOEKIT_CHECK(map.rows_in_use != nullptr, Errc::kNullPointer, "map.rows_in_use is null");
  OverlapCheck("gpu::dispatch")
      .out(Footprints{{buffer, "buffer"}})
      .in(Footprints{
          {x, "x"}, {map.row_slots, "map.row_slots"}, {map.rows_in_use, 1, "map.rows_in_use"}})
      .check();
  if (buffer.rows() == 0 || x.cols() == 0) return cudaSuccess;
  const int grid = detail::warp_grid(buffer.rows());
  if (detail::rows_vectorizable<T>(x.cols(), x, buffer)) {
    detail::scatter_rows_kernel<K, detail::kVectorElements<T>, false, T>
        <<<grid, detail::kThreads, 0, stream>>>(x, map, {}, buffer);
  } else {
    detail::scatter_rows_kernel<K, 1, false, T>
        <<<grid, detail::kThreads, 0, stream>>>(x, map, {}, buffer);
  }
  return cudaGetLastError();
}

// y[t] = sum over kept k, in k order, of weights(t, k) expert_out[row(t, k)],
// in fp32, rounded once to T; with `accumulate`, y[t] += that sum. A token
// with no kept slot gets 0 (or is left unchanged with accumulate).
// expert_out: buffer rows x d, y: T x d.
template <MoeSpecType S, ActivationElement T>
cudaError_t combine(MatrixView<const T> expert_out, MatrixView<const std::int32_t> expert_ids,
                    MatrixView<const float> weights, MatrixView<const std::int32_t> positions,
                    VectorView<const index_t> offsets, MatrixView<T> y, bool accumulate = false,
                    cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::combine");
  constexpr int E = S::num_experts, K = S::top_k;
  const index_t tokens = y.rows();
  detail::check_saved_plan<S>(expert_ids, positions, offsets, tokens);
  check_shape(weights, tokens, K, "weights");
  check_view(expert_out, "expert_out");
  check_shape(y, tokens, expert_out.cols(), "y");
  OverlapCheck("gpu::combine")
      .out(Footprints{{y, "y"}})
      .in(Footprints{{expert_out, "expert_out"},
                     {expert_ids, "expert_ids"},
                     {weights, "weights"},
                     {positions, "positions"},
                     {offsets, "offsets"}})
      .check();
  if (tokens == 0 || y.cols() == 0) return cudaSuccess;
  const int grid = detail::warp_grid(tokens);
  if (detail::rows_vectorizable<T>(y.cols(), expert_out, y)) {
    detail::gather_sum_kernel<E, K, detail::kVectorElements<T>, true, T>
        <<<grid, detail::kThreads, 0, stream>>>(expert_out, expert_ids, weights, positions,
                                                offsets.data(), y, accumulate);
  } else {
    detail::gather_sum_kernel<E, K, 1, true, T><<<grid, detail::kThreads, 0, stream>>>(
        expert_out, expert_ids, weights, positions, offsets.data(), y, accumulate);
  }
  return cudaGetLastError();
}

// Backward of combine given dy (T x d); an empty output is not computed:
//   d_expert_out[row(t, k)] = weights(t, k) dy[t], padding rows 0   (max rows x d)
//   dweights(t, k)          = <dy[t], expert_out[row(t, k)]>, 0 if dropped (T x K)
// expert_out is read only for dweights and may be empty when dweights is.
template <MoeSpecType S, ActivationElement T>
cudaError_t combine_backward(MatrixView<const T> dy, MatrixView<const T> expert_out,
                             MatrixView<const std::int32_t> expert_ids,
                             MatrixView<const float> weights,
                             MatrixView<const std::int32_t> positions,
                             VectorView<const index_t> offsets, const DispatchMap& map,
                             MatrixView<T> d_expert_out, MatrixView<float> dweights,
                             cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::combine_backward");
  constexpr int E = S::num_experts, K = S::top_k;
  check_view(dy, "dy");
  const index_t tokens = dy.rows();
  const index_t d = dy.cols();
  detail::check_saved_plan<S>(expert_ids, positions, offsets, tokens);
  const bool want_dout = !d_expert_out.empty();
  const bool want_dw = !dweights.empty();
  if (want_dout) {
    check_view(d_expert_out, "d_expert_out");
    check_shape(weights, tokens, K, "weights");
    MOEKIT_CHECK(d_expert_out.cols() == d, Errc::kShapeMismatch, "d_expert_out has ",
                 d_expert_out.cols(), " columns, dy has ", d);
    MOEKIT_CHECK(map.row_slots.size() >= d_expert_out.rows(), Errc::kShapeMismatch,
                 "row_slots has ", map.row_slots.size(), " entries, fewer than d_expert_out's ",
                 d_expert_out.rows(), " rows");
    check_view(map.row_slots, "map.row_slots");
    MOEKIT_CHECK(map.rows_in_use != nullptr, Errc::kNullPointer, "map.rows_in_use is null");
  }
  if (want_dw) {
    check_shape(dweights, tokens, K, "dweights");
    check_view(expert_out, "expert_out");
    MOEKIT_CHECK(expert_out.cols() == d, Errc::kShapeMismatch, "expert_out has ", expert_out.cols(),
                 " columns, dy has ", d);
  }
  OverlapCheck("gpu::combine_backward")
      .out(Footprints{{d_expert_out, "d_expert_out"}, {dweights, "dweights"}})
      .in(Footprints{{dy, "dy"},
                     {expert_out, "expert_out"},
                     {expert_ids, "expert_ids"},
                     {weights, "weights"},
                     {positions, "positions"},
                     {offsets, "offsets"},
                     {map.row_slots, "map.row_slots"}})
      .check();
  if (want_dout && d_expert_out.rows() > 0 && d > 0) {
    const int grid = detail::warp_grid(d_expert_out.rows());
    if (detail::rows_vectorizable<T>(d, dy, d_expert_out)) {
      detail::scatter_rows_kernel<K, detail::kVectorElements<T>, true, T>
          <<<grid, detail::kThreads, 0, stream>>>(dy, map, weights, d_expert_out);
    } else {
      detail::scatter_rows_kernel<K, 1, true, T>
          <<<grid, detail::kThreads, 0, stream>>>(dy, map, weights, d_expert_out);
    }
    MOEKIT_CUDA_TRY(cudaGetLastError());
  }
  if (want_dw && tokens > 0) {
    const int grid = detail::warp_grid(tokens);
    if (detail::rows_vectorizable<T>(d, dy, expert_out)) {
      detail::weight_grad_kernel<E, K, detail::kVectorElements<T>, T>
          <<<grid, detail::kThreads, 0, stream>>>(dy, expert_out, expert_ids, positions,
                                                  offsets.data(), dweights);
    } else {
      detail::weight_grad_kernel<E, K, 1, T><<<grid, detail::kThreads, 0, stream>>>(
          dy, expert_out, expert_ids, positions, offsets.data(), dweights);
    }
    MOEKIT_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

// Backward of dispatch: dx[t] = sum over kept k, in k order, of
// d_buffer[row(t, k)] (combine with unit weights); with `accumulate`,
// dx[t] += that sum. d_buffer: buffer rows x d, dx: T x d.
template <MoeSpecType S, ActivationElement T>
cudaError_t dispatch_backward(MatrixView<const T> d_buffer,
                              MatrixView<const std::int32_t> expert_ids,
                              MatrixView<const std::int32_t> positions,
                              VectorView<const index_t> offsets, MatrixView<T> dx,
                              bool accumulate = false, cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::dispatch_backward");
  constexpr int E = S::num_experts, K = S::top_k;
  const index_t tokens = dx.rows();
  detail::check_saved_plan<S>(expert_ids, positions, offsets, tokens);
  check_view(d_buffer, "d_buffer");
  check_shape(dx, tokens, d_buffer.cols(), "dx");
  OverlapCheck("gpu::dispatch_backward")
      .out(Footprints{{dx, "dx"}})
      .in(Footprints{{d_buffer, "d_buffer"},
                     {expert_ids, "expert_ids"},
                     {positions, "positions"},
                     {offsets, "offsets"}})
      .check();
  if (tokens == 0 || dx.cols() == 0) return cudaSuccess;
  const int grid = detail::warp_grid(tokens);
  if (detail::rows_vectorizable<T>(dx.cols(), d_buffer, dx)) {
    detail::gather_sum_kernel<E, K, detail::kVectorElements<T>, false, T>
        <<<grid, detail::kThreads, 0, stream>>>(d_buffer, expert_ids, {}, positions, offsets.data(),
                                                dx, accumulate);
  } else {
    detail::gather_sum_kernel<E, K, 1, false, T><<<grid, detail::kThreads, 0, stream>>>(
        d_buffer, expert_ids, {}, positions, offsets.data(), dx, accumulate);
  }
  return cudaGetLastError();
}

}  // namespace gpu
MOEKIT_NAMESPACE_END
