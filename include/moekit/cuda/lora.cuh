#pragma once
// LoRA adapters on the CUDA backend, for LoraSpec<R> and activations of type
// T (fp32, bf16, fp16): one adapter on a frozen linear layer (LoraLinear) and
// a bank of N adapters where each row picks its own (LoraBank, SGMV style),
// forward and backward, initialisation and merging on the device. The math,
// layout, dropout mask and configuration are the CPU backend's
// (moekit/cpu/lora.hpp, docs/math.md), s = alpha / R (alpha / sqrt(R) rsLoRA):
//
//   x  n x d_in,  w  d_out x d_in (frozen, optional bias d_out),
//   a  N R x d_in (adapter i: rows [i R, (i + 1) R)),  b  N d_out x R (rows [i d_out, ...))
//   forward   h = drop(x) a_i^T,   y = x w^T + bias + s h b_i^T
//   backward  dh = s g b_i,  db_i = s g^T h,  da_i = dh^T drop(x),  dx = g w + drop'(dh a_i)
//
// Kernels (all templated on R, so the rank-R accumulators live in registers):
//   shrink   out(row, r) = scale sum_j in(row, j) F_i(r, j)        h, dh
//   expand   out(row, j) += scale sum_r coef(row, r) F_i(r, j)     y, dx
//   outer    grad_i(r, j) = scale sum_rows coef(row, r) in(row, j)  da, db
// where F_i is adapter i's a (R x d_in, rank-major) or b read as R x d_out
// (b is d_out x R, so its rank vectors are columns). shrink and expand take
// tiles of rows of ONE adapter (a few rows for shrink, 8 for expand), so each
// tile reads its adapter's factor once, and the block's threads split the
// d columns with 16-byte vector loads where rows are aligned. outer gives
// each thread columns of the gradient and walks the adapter's rows in order;
// with few adapters the rows are split over extra blocks whose partial sums
// a second kernel adds in split order. h and dh are fp32, n x R, indexed by
// row (as on the CPU).
//
// No host synchronisation. The rows of adapter i are order[offsets[i] ..
// offsets[i + 1]) (device arrays from group()); a launch cannot know the
// segment sizes, so tiles are numbered per segment from floor(offsets[i] /
// tile) + i: those ranges never overlap and all lie below n / tile + N, the
// grid size. A block finds its segment by binary search and leaves if its
// tile is past the segment's end (the numbering's gaps, and the tiles rows
// without an adapter would have had, are idle blocks). So every call
// is stream-ordered and can be captured into a CUDA graph; the base GEMMs
// are cuBLAS calls on the caller's handle (put on `stream` where it is on
// another one: gpu::ExpertFfn says why).
//
// Determinism. Every output element is written by one thread, every sum runs
// in a fixed order (warp butterflies and warps in order; outer's splits in
// split order): results are bit-identical run after run. They differ from
// the CPU's in the last bits (another summation order).
//
// Precision. Inputs, weights and outputs are T; every product accumulates in
// fp32; h and dh are fp32; the adapters' gradients da and db are fp32 whatever
// T is (they are small, and an optimizer keeps fp32 masters of them).
//
// Grouping. LoraBank::group sorts the row indices by adapter id on the device
// (a stable CUB radix sort): order lists the rows of adapter 0, then 1, ...,
// each in increasing row order, then -1 for the rows without an adapter;
// offsets (N + 1) is the exclusive scan of the counts, exactly the CPU's
// group(). An id outside [-1, N) cannot raise an error from the device: the
// row is treated as id -1 (base output only) and counted in `invalid`.
//
// Safety. Everything checkable on the host is checked before any launch
// (shapes, rank, workspace, null pointers), raising moekit::Error; a CUDA or
// cuBLAS failure raises it too. Device contents cannot be checked without a
// synchronisation, so kernels clamp what they read: an order entry outside
// [0, n) is skipped and offsets are clamped to [0, n]. Whatever order and
// offsets hold, nothing outside the caller's arrays is read or written (the
// results of inconsistent ones are unspecified).
//
//   gpu::LoraBank<LoraSpec<16>, __nv_bfloat16> bank({.d_in = d, .d_out = d, .num_adapters = 64});
//   bank.group(ids, order, offsets, invalid, ws, ws_bytes, stream);   // once per batch
//   bank.forward(handle, x, {ids, order, offsets}, {.a = a, .b = b}, y, h, {}, ws, bytes, stream);

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <limits>

#include "moekit/core/error.hpp"
#include "moekit/core/lora.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cuda/dispatch.cuh"
#include "moekit/cuda/error.cuh"
#include "moekit/cuda/expert_ffn.cuh"
#include "moekit/cuda/warp.cuh"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace gpu {

// Device weights of a LoraLinear (w required) or LoraBank (w optional).
template <ActivationElement T>
struct LoraWeights {
  MatrixView<const T> w{};     // d_out x d_in frozen base weight, or empty
  VectorView<const T> bias{};  // d_out frozen base bias, or empty
  MatrixView<const T> a{};     // R x d_in (bank: N R x d_in)
  MatrixView<const T> b{};     // d_out x R (bank: N d_out x R)
};

// Adapter gradients (fp32) and a bank's row assignment, in device memory
// (moekit/core/lora.hpp, shared with the CPU backend).
using ::moekit::LoraGrads;
using ::moekit::LoraRows;

namespace detail {

inline constexpr int kLoraThreads = 128;
inline constexpr int kLoraWarps = kLoraThreads / 32;

// Ranks held in registers at a time: the largest divisor of R up to 64.
template <int R>
inline constexpr int kRankChunk = [] {
  for (int c = R < 64 ? R : 64; c > 1; --c) {
    if (R % c == 0) return c;
  }
  return 1;
}();

// Ranks of b loaded at a time (b's rank vectors are rows of b: contiguous):
// the largest divisor of the chunk up to 16, so the loaded values and the
// accumulators stay in registers.
template <int R>
inline constexpr int kRankSub = [] {
  for (int c = kRankChunk<R> < 16 ? kRankChunk<R> : 16; c > 1; --c) {
    if (kRankChunk<R> % c == 0) return c;
  }
  return 1;
}();

// Rows per tile: shrink keeps rows x rank-chunk accumulators (at most 64);
// expand keeps 8 rows x 16 bytes of outputs; outer stages 32 rows' coefs.
template <int R>
inline constexpr int kShrinkRows = 64 / kRankChunk<R> < 1
                                       ? 1
                                       : (64 / kRankChunk<R> > 8 ? 8 : 64 / kRankChunk<R>);
inline constexpr int kExpandRows = 8;
inline constexpr int kOuterStage = 32;
// Gradient columns per outer thread: rank-chunk x columns <= 64 accumulators.
template <int R>
inline constexpr int kOuterColumns = 32 / kRankChunk<R> < 1 ? 1 : 32 / kRankChunk<R>;

// Rows grouped by adapter: segment i is positions [bound(i), bound(i + 1)) of
// order. Without order, one segment: the rows 0 .. n - 1 themselves.
struct LoraSegments {
  const index_t* order = nullptr;
  const index_t* offsets = nullptr;  // count + 1 entries
  index_t rows = 0;                  // n
  index_t count = 1;                 // N

  // offsets[i] clamped to [0, n] (device contents are not trusted).
  MOEKIT_DEVICE index_t bound(index_t i) const {
    if (offsets == nullptr) return i == 0 ? 0 : rows;
    const index_t v = offsets[i];
    return v < 0 ? 0 : (v > rows ? rows : v);
  }
  // The row at position p, or -1 where order holds no row of [0, n).
  MOEKIT_DEVICE index_t row(index_t p) const {
    const index_t r = order != nullptr ? order[p] : p;
    return r >= 0 && r < rows ? r : -1;
  }
};

// Blocks for tiles of `tile` rows over every segment (header: the numbering).
inline index_t tile_blocks(index_t rows, index_t segments, int tile) {
  return rows / tile + segments;
}

struct LoraTile {
  index_t segment = 0;
  index_t first = 0;  // positions [first, last)
  index_t last = 0;
};

// The tile of block b, or false when b is an idle block.
MOEKIT_DEVICE inline bool find_tile(const LoraSegments& s, int tile, index_t b, LoraTile& out) {
  const auto start = [&](index_t i) { return s.bound(i) / tile + i; };
  index_t lo = 0, hi = s.count - 1;  // the last segment whose tiles start at or before b
  while (lo < hi) {
    const index_t mid = (lo + hi + 1) / 2;
    if (start(mid) <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const index_t begin = s.bound(lo), end = s.bound(lo + 1);
  out.segment = lo;
  out.first = begin + (b - start(lo)) * tile;
  out.last = out.first + tile < end ? out.first + tile : end;
  return b >= start(lo) && out.first < end;
}

// Adapter i's factor as an R x d matrix F_i(r, j): kRankRows reads a (rows
// [i R, (i + 1) R)), kRankCols reads b transposed (rows [i d, (i + 1) d),
// its R columns the ranks).
enum class FactorLayout { kRankRows, kRankCols };

template <FactorLayout L, class T>
struct Factor {
  const T* data = nullptr;
  index_t ld = 0;
  index_t block = 0;  // rows per adapter: R (kRankRows) or d (kRankCols)

  // &F_i(r, j): consecutive j for kRankRows, consecutive r for kRankCols.
  MOEKIT_DEVICE const T* at(index_t i, int r, index_t j) const {
    if constexpr (L == FactorLayout::kRankRows) return data + (i * block + r) * ld + j;
    return data + (i * block + j) * ld + r;
  }
};

// Loads n consecutive elements as fp32, V at a time (V = 1, or 16 bytes
// where the caller chose vectors).
template <int n, int V, class T>
MOEKIT_DEVICE void load_span(const T* p, float* v) {
  static_assert(n % V == 0);
#pragma unroll
  for (int i = 0; i < n; i += V) {
    float chunk[V];
    load_chunk<V>(p + i, chunk);
#pragma unroll
    for (int k = 0; k < V; ++k) v[i + k] = chunk[k];
  }
}

// ---- shrink: out(row, r) = scale sum_j drop(in(row, j)) F_i(r, j) --------------

template <int R, int V, FactorLayout L, class T>
__global__ void __launch_bounds__(kLoraThreads)
    lora_shrink_kernel(MatrixView<const T> in, LoraSegments seg, Factor<L, T> f, float scale,
                       LoraDropout call_drop, MatrixView<float> out) {
  constexpr int kRows = kShrinkRows<R>, kChunk = kRankChunk<R>;
  LoraTile tile;
  if (!find_tile(seg, kRows, blockIdx.x, tile)) return;
  const LoraDropout drop = call_drop.for_adapter(tile.segment);
  index_t rows[kRows];
#pragma unroll
  for (int m = 0; m < kRows; ++m)
    rows[m] = tile.first + m < tile.last ? seg.row(tile.first + m) : -1;
  const index_t i = tile.segment, d = in.cols();
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  __shared__ float partial[kLoraWarps][kRows * kChunk];

  for (int r0 = 0; r0 < R; r0 += kChunk) {
    float acc[kRows][kChunk] = {};
    for (index_t j = static_cast<index_t>(threadIdx.x) * V; j < d; j += kLoraThreads * V) {
      float x[kRows][V];
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        if (rows[m] >= 0) {
          load_chunk<V>(in.row(rows[m]) + j, x[m]);
#pragma unroll
          for (int k = 0; k < V; ++k) x[m][k] = drop.apply(x[m][k], rows[m], j + k);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) x[m][k] = 0.0f;
        }
      }
      if constexpr (L == FactorLayout::kRankRows) {
#pragma unroll
        for (int r = 0; r < kChunk; ++r) {
          float w[V];
          load_chunk<V>(f.at(i, r0 + r, j), w);
#pragma unroll
          for (int m = 0; m < kRows; ++m) {
#pragma unroll
            for (int k = 0; k < V; ++k) acc[m][r] += x[m][k] * w[k];
          }
        }
      } else {
        constexpr int kSub = kRankSub<R>;
#pragma unroll
        for (int k = 0; k < V; ++k) {
#pragma unroll
          for (int s0 = 0; s0 < kChunk; s0 += kSub) {
            float w[kSub];
            load_span<kSub, (kSub % V == 0 ? V : 1)>(f.at(i, r0 + s0, j + k), w);
#pragma unroll
            for (int m = 0; m < kRows; ++m) {
#pragma unroll
              for (int r = 0; r < kSub; ++r) acc[m][s0 + r] += x[m][k] * w[r];
            }
          }
        }
      }
    }
    // Threads -> warps by butterflies, then warps in order: a fixed sum.
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
#pragma unroll
      for (int r = 0; r < kChunk; ++r) {
        const float v = warp_sum(acc[m][r]);
        if (lane == 0) partial[warp][m * kChunk + r] = v;
      }
    }
    __syncthreads();
    for (int k = static_cast<int>(threadIdx.x); k < kRows * kChunk; k += kLoraThreads) {
      const int m = k / kChunk, r = k - m * kChunk;
      index_t row = -1;
#pragma unroll
      for (int q = 0; q < kRows; ++q) row = q == m ? rows[q] : row;
      if (row < 0) continue;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kLoraWarps; ++w) sum += partial[w][k];
      out(row, r0 + r) = scale * sum;
    }
    __syncthreads();
  }
}

// ---- expand: out(row, j) += scale drop'(sum_r coef(row, r) F_i(r, j)) -----------

template <int R, int V, FactorLayout L, class T>
__global__ void __launch_bounds__(kLoraThreads)
    lora_expand_kernel(MatrixView<const float> coef, LoraSegments seg, Factor<L, T> f, float scale,
                       LoraDropout call_drop, MatrixView<T> out) {
  constexpr int kRows = kExpandRows;
  LoraTile tile;
  if (!find_tile(seg, kRows, blockIdx.x, tile)) return;
  const LoraDropout drop = call_drop.for_adapter(tile.segment);
  __shared__ float c[kRows][R];
  __shared__ index_t rows[kRows];
  if (threadIdx.x < kRows) {
    const index_t p = tile.first + static_cast<index_t>(threadIdx.x);
    rows[threadIdx.x] = p < tile.last ? seg.row(p) : -1;
  }
  __syncthreads();
  for (int k = static_cast<int>(threadIdx.x); k < kRows * R; k += kLoraThreads) {
    const int m = k / R, r = k - m * R;
    c[m][r] = rows[m] >= 0 ? coef(rows[m], r) : 0.0f;
  }
  __syncthreads();
  const index_t i = tile.segment, d = out.cols();
  for (index_t j = static_cast<index_t>(threadIdx.x) * V; j < d; j += kLoraThreads * V) {
    float acc[kRows][V] = {};
    if constexpr (L == FactorLayout::kRankRows) {
#pragma unroll 4
      for (int r = 0; r < R; ++r) {
        float w[V];
        load_chunk<V>(f.at(i, r, j), w);
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
#pragma unroll
          for (int k = 0; k < V; ++k) acc[m][k] += c[m][r] * w[k];
        }
      }
    } else {
      constexpr int kSub = kRankSub<R>;
#pragma unroll
      for (int k = 0; k < V; ++k) {
#pragma unroll 1
        for (int r0 = 0; r0 < R; r0 += kSub) {
          float w[kSub];
          load_span<kSub, (kSub % V == 0 ? V : 1)>(f.at(i, r0, j + k), w);
#pragma unroll
          for (int m = 0; m < kRows; ++m) {
#pragma unroll
            for (int r = 0; r < kSub; ++r) acc[m][k] += c[m][r0 + r] * w[r];
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      const index_t row = rows[m];
      if (row < 0) continue;
      float y[V];
      load_chunk<V>(out.row(row) + j, y);
#pragma unroll
      for (int k = 0; k < V; ++k) y[k] += scale * drop.apply(acc[m][k], row, j + k);
      store_chunk<V>(out.row(row) + j, y);
    }
  }
}

// ---- outer: grad_i(r, j) (+)= scale sum_rows coef(row, r) drop(in(row, j)) -------
//
// Block (x, i, s): gradient columns [x kLoraThreads C, (x + 1) kLoraThreads C)
// of adapter i over split s of its rows (C = kOuterColumns; thread t owns
// columns t, t + kLoraThreads, ...: coalesced). With one split the block
// writes grad_i; with more it writes its partial sums, unscaled, to
// partials[((s N + i) R + r) d + j] for outer_reduce_kernel.

// Where adapter i's gradient element (r, j) lives: da(i R + r, j) for a,
// db(i d + j, r) for b.
template <FactorLayout L>
struct GradOut {
  MatrixView<float> m{};
  index_t block = 0;  // R or d
  MOEKIT_DEVICE float& at(index_t i, int r, index_t j) const {
    if constexpr (L == FactorLayout::kRankRows) return m(i * block + r, j);
    return m(i * block + j, r);
  }
};

template <int R, FactorLayout L, class T>
__global__ void __launch_bounds__(kLoraThreads)
    lora_outer_kernel(MatrixView<const float> coef, MatrixView<const T> in, LoraSegments seg,
                      float scale, LoraDropout call_drop, int splits, GradOut<L> grad,
                      bool accumulate, float* partials) {
  constexpr int kChunk = kRankChunk<R>, kCols = kOuterColumns<R>;
  const index_t i = blockIdx.y, d = in.cols();
  const LoraDropout drop = call_drop.for_adapter(i);
  const int s = static_cast<int>(blockIdx.z);
  const index_t begin = seg.bound(i), len = seg.bound(i + 1) > begin ? seg.bound(i + 1) - begin : 0;
  const index_t p0 = begin + len * s / splits, p1 = begin + len * (s + 1) / splits;
  const index_t j0 = static_cast<index_t>(blockIdx.x) * kLoraThreads * kCols + threadIdx.x;
  __shared__ float c[kOuterStage][kChunk];
  __shared__ index_t rows[kOuterStage];

  for (int r0 = 0; r0 < R; r0 += kChunk) {
    float acc[kChunk][kCols] = {};
    for (index_t q = p0; q < p1; q += kOuterStage) {
      const int staged = static_cast<int>(p1 - q < kOuterStage ? p1 - q : kOuterStage);
      __syncthreads();  // the previous stage is consumed
      const int t = static_cast<int>(threadIdx.x);
      if (t < staged) rows[t] = seg.row(q + t);
      __syncthreads();
      for (int k = static_cast<int>(threadIdx.x); k < staged * kChunk; k += kLoraThreads) {
        const int m = k / kChunk, r = k - m * kChunk;
        c[m][r] = rows[m] >= 0 ? coef(rows[m], r0 + r) : 0.0f;
      }
      __syncthreads();
      for (int m = 0; m < staged; ++m) {
        const index_t row = rows[m];
        if (row < 0) continue;
        const T* x = in.row(row);
#pragma unroll
        for (int k = 0; k < kCols; ++k) {
          const index_t j = j0 + k * kLoraThreads;
          const float v = j < d ? drop.apply(to_float(x[j]), row, j) : 0.0f;
#pragma unroll
          for (int r = 0; r < kChunk; ++r) acc[r][k] += c[m][r] * v;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const index_t j = j0 + k * kLoraThreads;
      if (j >= d) continue;
#pragma unroll
      for (int r = 0; r < kChunk; ++r) {
        if (splits > 1) {
          partials[((s * seg.count + i) * R + r0 + r) * d + j] = acc[r][k];
        } else if (!accumulate) {
          grad.at(i, r0 + r, j) = scale * acc[r][k];
        } else if (len > 0) {  // an adapter without rows keeps its gradient
          grad.at(i, r0 + r, j) += scale * acc[r][k];
        }
      }
    }
  }
}

// grad_i(r, j) (+)= scale sum_s partials[s] in split order; one thread per element.
template <int R, FactorLayout L>
__global__ void __launch_bounds__(256)
    lora_outer_reduce_kernel(const float* partials, int splits, LoraSegments seg, index_t d,
                             float scale, GradOut<L> grad, bool accumulate) {
  const index_t per_split = seg.count * R * d;
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < per_split;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t j = e % d, ir = e / d;
    const index_t i = ir / R;
    const int r = static_cast<int>(ir - i * R);
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += partials[s * per_split + e];
    if (!accumulate) {
      grad.at(i, r, j) = scale * sum;
    } else if (seg.bound(i + 1) > seg.bound(i)) {
      grad.at(i, r, j) += scale * sum;
    }
  }
}

// ---- grouping, zeroing, base, init and merge ------------------------------------

// key: the adapter id, N for -1, N + 1 for an invalid id; value: the row.
template <int = 0>  // a template, so that every translation unit may define it
__global__ void __launch_bounds__(256)
    lora_keys_kernel(VectorView<const std::int32_t> ids, std::int64_t adapters, std::uint32_t* keys,
                     index_t* values) {
  for (index_t t = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < ids.size();
       t += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const std::int64_t id = ids[t];
    keys[t] = static_cast<std::uint32_t>(id >= 0 && id < adapters ? id
                                         : id == -1               ? adapters
                                                                  : adapters + 1);
    values[t] = t;
  }
}

// The first position in sorted keys[0, n) whose key is >= k.
MOEKIT_DEVICE inline index_t lower_bound(const std::uint32_t* keys, index_t n, std::int64_t k) {
  index_t lo = 0, hi = n;
  while (lo < hi) {
    const index_t mid = (lo + hi) / 2;
    if (std::int64_t{keys[mid]} < k) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// From the sorted keys: offsets[i] = lower_bound(i) for i <= N, the invalid
// count n - lower_bound(N + 1), and -1 in order's tail (rows without an
// adapter). One thread per entry: O(log n) each, whatever N and n.
template <int = 0>  // a template, so that every translation unit may define it
__global__ void __launch_bounds__(256)
    lora_offsets_kernel(const std::uint32_t* keys, index_t n, std::int64_t adapters, index_t* order,
                        index_t* offsets, std::int64_t* invalid) {
  const index_t count = n > adapters + 2 ? n : adapters + 2;
  for (index_t p = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < count;
       p += static_cast<index_t>(gridDim.x) * blockDim.x) {
    if (p <= adapters) offsets[p] = lower_bound(keys, n, p);
    if (p == adapters + 1 && invalid != nullptr) *invalid = n - lower_bound(keys, n, p);
    if (p < n && std::int64_t{keys[p]} >= adapters) order[p] = -1;
  }
}

// h(t, :) = 0 for the rows without an adapter (as the CPU's saved_h).
template <int = 0>  // a template, so that every translation unit may define it
__global__ void __launch_bounds__(256)
    lora_zero_free_rows_kernel(VectorView<const std::int32_t> ids, std::int64_t adapters,
                               MatrixView<float> h) {
  const index_t n = h.rows() * h.cols();
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t t = e / h.cols();
    const std::int64_t id = ids[t];
    if (id < 0 || id >= adapters) h(t, e - t * h.cols()) = 0.0f;
  }
}

// y(t, :) = bias, before the base GEMM adds x w^T (beta = 1).
template <class T>
__global__ void __launch_bounds__(256)
    broadcast_bias_kernel(VectorView<const T> bias, MatrixView<T> y) {
  const index_t n = y.rows() * y.cols();
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t t = e / y.cols(), j = e - t * y.cols();
    y(t, j) = bias[j];
  }
}

// a(r, j) = lora_init_value(counter (first + r) d_in + j), b = 0: the CPU's
// values (bit for bit for kKaimingUniform; kGaussian's log and cos may differ
// from the host's in the last bit).
template <class T>
__global__ void __launch_bounds__(256)
    lora_init_kernel(MatrixView<T> a, MatrixView<T> b, LoraInit kind, float spread,
                     std::uint64_t seed, index_t first_row) {
  const index_t na = a.rows() * a.cols(), nb = b.rows() * b.cols();
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < na + nb;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    if (e < na) {
      const index_t r = e / a.cols(), j = e - r * a.cols();
      const auto counter = static_cast<std::uint64_t>((first_row + r) * a.cols() + j);
      a(r, j) = from_float<T>(lora_init_value(kind, spread, seed, counter));
    } else {
      const index_t k = e - na, r = k / b.cols();
      b(r, k - r * b.cols()) = from_float<T>(0.0f);
    }
  }
}

// w(c, j) + scale sum_r b(c, r) a(r, j), in fp32, rounded once to T: written
// to w (kApply), or only checked for being finite (the count of non-finite
// values and the first one's flat index c d_in + j go to bad[0], bad[1]).
template <int R, bool kApply, class T>
__global__ void __launch_bounds__(256)
    lora_merge_kernel(MatrixView<T> w, MatrixView<const T> a, MatrixView<const T> b, float scale,
                      unsigned long long* bad) {
  const index_t n = w.rows() * w.cols();
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t c = e / w.cols(), j = e - c * w.cols();
    float delta = 0.0f;
#pragma unroll 8
    for (int r = 0; r < R; ++r) delta += to_float(b(c, r)) * to_float(a(r, j));
    const float v = to_float(w(c, j)) + scale * delta;
    if constexpr (kApply) {
      w(c, j) = from_float<T>(v);
    } else if (!isfinite(v) || !isfinite(to_float(from_float<T>(v)))) {
      atomicAdd(bad, 1ull);
      atomicMin(bad + 1, static_cast<unsigned long long>(e));
    }
  }
}

template <class T>
inline constexpr int kLoraVector = 16 / static_cast<int>(sizeof(T));

// One adapter layer's work, shared by LoraLinear (one segment, no order) and
// LoraBank: validation of shapes lives in the classes, launches here.
template <int R, class T>
class LoraOps {
 public:
  LoraOps(index_t d_in, index_t d_out, float scale, float dropout, std::uint64_t dropout_stream)
      : d_in_(d_in),
        d_out_(d_out),
        scale_(scale),
        dropout_(dropout),
        dropout_stream_(dropout_stream) {}

  // Gradient partial sums' bytes for n rows over N adapters (0 when one split).
  std::size_t partial_bytes(index_t n, index_t adapters) const {
    const auto bytes = [&](index_t d) -> std::size_t {
      const int s = splits(n, adapters, d);
      return s > 1 ? round_up(static_cast<std::size_t>(s * adapters * R * d) * sizeof(float)) : 0;
    };
    const std::size_t for_da = bytes(d_in_), for_db = bytes(d_out_);
    return for_da > for_db ? for_da : for_db;
  }

  // h = drop(x) a_i^T for the rows of every segment.
  void shrink_x(MatrixView<const T> x, const LoraSegments& seg, MatrixView<const T> a,
                const LoraStep& step, MatrixView<float> h, cudaStream_t stream) const {
    const Factor<FactorLayout::kRankRows, T> f{a.data(), a.ld(), R};
    launch_shrink(x, seg, f, 1.0f, dropout(step), h, rows_vectorizable<T>(d_in_, x, a), stream);
  }
  // dh = s g b_i.
  void shrink_dy(MatrixView<const T> dy, const LoraSegments& seg, MatrixView<const T> b,
                 MatrixView<float> dh, cudaStream_t stream) const {
    const Factor<FactorLayout::kRankCols, T> f{b.data(), b.ld(), d_out_};
    const bool vec = rows_vectorizable<T>(d_out_, dy) && rows_vectorizable<T>(R, b);
    launch_shrink(dy, seg, f, scale_, LoraDropout{}, dh, vec, stream);
  }
  // y += s h b_i^T.
  void expand_y(MatrixView<const float> h, const LoraSegments& seg, MatrixView<const T> b,
                MatrixView<T> y, cudaStream_t stream) const {
    const Factor<FactorLayout::kRankCols, T> f{b.data(), b.ld(), d_out_};
    const bool vec = rows_vectorizable<T>(d_out_, y) && rows_vectorizable<T>(R, b);
    launch_expand(h, seg, f, scale_, LoraDropout{}, y, vec, stream);
  }
  // dx += drop'(dh a_i).
  void expand_dx(MatrixView<const float> dh, const LoraSegments& seg, MatrixView<const T> a,
                 const LoraStep& step, MatrixView<T> dx, cudaStream_t stream) const {
    const Factor<FactorLayout::kRankRows, T> f{a.data(), a.ld(), R};
    launch_expand(dh, seg, f, 1.0f, dropout(step), dx, rows_vectorizable<T>(d_in_, dx, a), stream);
  }
  // da_i (+)= dh^T drop(x).
  void outer_da(MatrixView<const float> dh, MatrixView<const T> x, const LoraSegments& seg,
                const LoraStep& step, MatrixView<float> da, bool accumulate, void* partials,
                cudaStream_t stream) const {
    launch_outer(dh, x, seg, 1.0f, dropout(step), GradOut<FactorLayout::kRankRows>{da, R},
                 accumulate, partials, stream);
  }
  // db_i (+)= s g^T h.
  void outer_db(MatrixView<const float> h, MatrixView<const T> dy, const LoraSegments& seg,
                MatrixView<float> db, bool accumulate, void* partials, cudaStream_t stream) const {
    launch_outer(h, dy, seg, scale_, LoraDropout{}, GradOut<FactorLayout::kRankCols>{db, d_out_},
                 accumulate, partials, stream);
  }

 private:
  // The call's dropout; each kernel takes its adapter's by for_adapter(i).
  LoraDropout dropout(const LoraStep& step) const {
    return LoraDropout::make(dropout_, step, d_in_, dropout_stream_);
  }

  // Splits of each adapter's rows for outer: enough blocks to fill a large
  // GPU (~512), at least 64 rows per split on average, at most 64 splits.
  static int splits(index_t n, index_t adapters, index_t d) {
    const index_t columns = static_cast<index_t>(kLoraThreads) * kOuterColumns<R>;
    const index_t blocks = (d + columns - 1) / columns * adapters;
    if (blocks >= 512) return 1;
    index_t s = (512 + blocks - 1) / blocks;
    const index_t by_rows = n / (adapters * 64);
    s = s < by_rows ? s : by_rows;
    return static_cast<int>(s < 1 ? 1 : (s > 64 ? 64 : s));
  }

  static int grid(index_t blocks) {
    MOEKIT_CHECK_ARG(blocks <= std::numeric_limits<std::int32_t>::max(), "a launch of ", blocks,
                     " blocks exceeds the grid limit");
    return static_cast<int>(blocks);
  }

  template <FactorLayout L>
  void launch_shrink(MatrixView<const T> in, const LoraSegments& seg, Factor<L, T> f, float scale,
                     LoraDropout drop, MatrixView<float> out, bool vec, cudaStream_t stream) const {
    const int blocks = grid(tile_blocks(seg.rows, seg.count, kShrinkRows<R>));
    if (vec) {
      lora_shrink_kernel<R, kLoraVector<T>, L, T>
          <<<blocks, kLoraThreads, 0, stream>>>(in, seg, f, scale, drop, out);
    } else {
      lora_shrink_kernel<R, 1, L, T>
          <<<blocks, kLoraThreads, 0, stream>>>(in, seg, f, scale, drop, out);
    }
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }

  template <FactorLayout L>
  void launch_expand(MatrixView<const float> coef, const LoraSegments& seg, Factor<L, T> f,
                     float scale, LoraDropout drop, MatrixView<T> out, bool vec,
                     cudaStream_t stream) const {
    const int blocks = grid(tile_blocks(seg.rows, seg.count, kExpandRows));
    if (vec) {
      lora_expand_kernel<R, kLoraVector<T>, L, T>
          <<<blocks, kLoraThreads, 0, stream>>>(coef, seg, f, scale, drop, out);
    } else {
      lora_expand_kernel<R, 1, L, T>
          <<<blocks, kLoraThreads, 0, stream>>>(coef, seg, f, scale, drop, out);
    }
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }

  template <FactorLayout L>
  void launch_outer(MatrixView<const float> coef, MatrixView<const T> in, const LoraSegments& seg,
                    float scale, LoraDropout drop, GradOut<L> grad, bool accumulate, void* partials,
                    cudaStream_t stream) const {
    const index_t d = in.cols();
    const int s = splits(seg.rows, seg.count, d);
    const index_t columns = static_cast<index_t>(kLoraThreads) * kOuterColumns<R>;
    const dim3 blocks(static_cast<unsigned>(grid((d + columns - 1) / columns)),
                      static_cast<unsigned>(seg.count), static_cast<unsigned>(s));
    float* part = static_cast<float*>(partials);
    lora_outer_kernel<R, L, T><<<blocks, kLoraThreads, 0, stream>>>(coef, in, seg, scale, drop, s,
                                                                    grad, accumulate, part);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
    if (s > 1) {
      lora_outer_reduce_kernel<R, L><<<elementwise_grid(seg.count * R * d), 256, 0, stream>>>(
          part, s, seg, d, scale, grad, accumulate);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
  }

  index_t d_in_, d_out_;
  float scale_, dropout_;
  std::uint64_t dropout_stream_;
};

inline void check_rank(index_t got, int rank, const char* name, const char* what) {
  MOEKIT_CHECK(got == rank, Errc::kShapeMismatch, name, " has ", got, " ", what,
               ", the adapter rank R = ", rank);
}

// The workspace check every call makes (256-byte aligned, large enough).
inline void check_workspace(const void* workspace, std::size_t bytes, std::size_t need) {
  if (need == 0) return;
  MOEKIT_CHECK(bytes >= need, Errc::kShapeMismatch, "workspace of ", bytes,
               " bytes, this call needs ", need, " (workspace_size)");
  MOEKIT_CHECK(workspace != nullptr, Errc::kNullPointer, "workspace is null");
  MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace) % kWorkspaceAlignment == 0,
               Errc::kInvalidArgument, "workspace is not 256-byte aligned");
}

// A leading dimension cuBLAS accepts: a view of one row may have ld < cols.
template <class V>
index_t gemm_ld(const V& v) {
  return v.ld() > v.cols() ? v.ld() : v.cols();
}

// C = op(A) op(B) + beta C (cuBLAS's column-major terms), A and B of type T,
// C of type U (T, or float for an fp32 result of T inputs), fp32 accumulation.
template <class T, class U = T>
void cublas_gemm(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, index_t m,
                 index_t n, index_t k, const T* a, index_t lda, const T* b, index_t ldb, float beta,
                 U* c, index_t ldc) {
  const auto narrow = [](index_t v) {
    MOEKIT_CHECK_ARG(v >= 0 && v <= 0x7FFFFFFF, "a GEMM dimension ", v, " exceeds 32 bits");
    return static_cast<int>(v);
  };
  const float alpha = 1.0f;
  constexpr cudaDataType_t type = cuda_type<T>();
  MOEKIT_CUBLAS_CHECK(cublasGemmEx(handle, ta, tb, narrow(m), narrow(n), narrow(k), &alpha, a, type,
                                   narrow(lda), b, type, narrow(ldb), &beta, c, cuda_type<U>(),
                                   narrow(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace detail

namespace detail {

// What LoraLinear and LoraBank share: N adapters (1 for LoraLinear) on one
// layer, validation on the host, then the launches of LoraOps.
template <int R, class T>
class LoraLayer {
 public:
  LoraLayer(index_t d_in, index_t d_out, index_t adapters, float alpha, bool rslora, float dropout,
            std::uint64_t dropout_stream)
      : d_in_(d_in),
        d_out_(d_out),
        adapters_(adapters),
        scale_(lora_scale(alpha, R, rslora)),
        ops_(d_in, d_out, lora_scale(alpha, R, rslora), dropout, dropout_stream) {}

  float scale() const { return scale_; }

  // h or dh (n x R fp32) and the gradient partial sums.
  std::size_t workspace_size(index_t rows) const {
    MOEKIT_CHECK_ARG(rows >= 0, "rows = ", rows, " is negative");
    return round_up(static_cast<std::size_t>(rows * R) * sizeof(float)) +
           ops_.partial_bytes(rows, adapters_);
  }

  void init(const char* where, MatrixView<T> a, MatrixView<T> b, const LoraInitConfig& c,
            index_t first_row, cudaStream_t stream) const {
    OverlapCheck(where).out(Footprints{{a, "a"}, {b, "b"}}).check();
    const float spread = lora_init_spread<R>(c, d_in_);
    lora_init_kernel<T><<<elementwise_grid(a.size() + b.size()), 256, 0, stream>>>(
        a, b, c.kind, spread, c.seed, first_row);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }

  void forward(const char* where, cublasHandle_t handle, MatrixView<const T> x,
               const LoraSegments& seg, VectorView<const std::int32_t> ids, const LoraWeights<T>& w,
               MatrixView<T> y, MatrixView<float> saved_h, const LoraStep& step, void* workspace,
               std::size_t bytes, cudaStream_t stream) const {
    const index_t n = x.rows();
    check_shape(y, n, d_out_, "y");
    if (!saved_h.empty()) check_h(saved_h, n, "saved_h");
    check_workspace(workspace, bytes, workspace_size(n));
    check_launch_limits(n, false);
    OverlapCheck overlap(where);
    overlap
        .out(Footprints{{y, "y"}, {saved_h, "saved_h"}, temp_storage(workspace, workspace_size(n))})
        .in(Footprints{{x, "x"}, {ids, "rows.ids"}});
    add_inputs(overlap, w, seg);
    overlap.check();
    if (n == 0) return;
    if (!w.w.empty()) base_forward(handle, x, w, y, stream);
    const MatrixView<float> h = saved_h.empty() ? scratch(workspace, n) : saved_h;
    if (!saved_h.empty() && !ids.empty()) {
      lora_zero_free_rows_kernel<><<<elementwise_grid(n * R), 256, 0, stream>>>(ids, adapters_, h);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
    ops_.shrink_x(x, seg, w.a, step, h, stream);
    ops_.expand_y(h, seg, w.b, y, stream);
  }

  void backward(const char* where, cublasHandle_t handle, MatrixView<const T> dy,
                MatrixView<const T> x, const LoraSegments& seg, const LoraWeights<T>& w,
                MatrixView<const float> saved_h, const LoraStep& step, MatrixView<T> dx,
                const LoraGrads& grads, void* workspace, std::size_t bytes,
                cudaStream_t stream) const {
    const index_t n = x.rows();
    check_shape(dy, n, d_out_, "dy");
    const bool want_dx = !dx.empty(), want_da = !grads.da.empty(), want_db = !grads.db.empty();
    if (want_dx) check_shape(dx, n, d_in_, "dx");
    if (want_da) {
      check_shape(grads.da, adapters_ * R, d_in_, "grads.da");
    }
    if (want_db) {
      check_rank(grads.db.cols(), R, "grads.db", "columns");
      check_shape(grads.db, adapters_ * d_out_, R, "grads.db");
      check_h(saved_h, n, "saved_h");
    }
    check_workspace(workspace, bytes, workspace_size(n));
    check_launch_limits(n, want_da || want_db);
    OverlapCheck overlap(where);
    overlap
        .out(Footprints{{dx, "dx"},
                        {grads.da, "grads.da"},
                        {grads.db, "grads.db"},
                        temp_storage(workspace, workspace_size(n))})
        .in(Footprints{{dy, "dy"}, {x, "x"}, {saved_h, "saved_h"}});
    add_inputs(overlap, w, seg);
    overlap.check();
    if (!want_dx && !want_da && !want_db) return;
    void* partials =
        static_cast<char*>(workspace) + round_up(static_cast<std::size_t>(n * R) * sizeof(float));
    if (want_dx && !w.w.empty() && n > 0) {
      detail::use_stream(handle, stream);
      // dx = dy w: column-major dx^T (d_in x n) = w^T (d_in x d_out) dy^T.
      cublas_gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, d_in_, n, d_out_, w.w.data(), gemm_ld(w.w),
                  dy.data(), gemm_ld(dy), 0.0f, dx.data(), gemm_ld(dx));
    }
    if (want_db) ops_.outer_db(saved_h, dy, seg, grads.db, grads.accumulate, partials, stream);
    const MatrixView<float> dh = scratch(workspace, n);
    if ((want_da || want_dx) && n > 0) ops_.shrink_dy(dy, seg, w.b, dh, stream);
    if (want_da) {
      ops_.outer_da(dh, x, seg, step, grads.da, grads.accumulate, partials, stream);
    }
    if (want_dx && n > 0) ops_.expand_dx(dh, seg, w.a, step, dx, stream);
  }

  // w (+ or -)= s b_i a_i; with `safe`, first checks every merged value and
  // throws kNonFinite (w untouched) if one is NaN or infinite.
  void merge(const char* where, index_t adapter, MatrixView<T> w, MatrixView<const T> a,
             MatrixView<const T> b, float sign, bool safe, void* workspace, std::size_t bytes,
             cudaStream_t stream) const {
    check_shape(w, d_out_, d_in_, "w");
    check_adapters(a, b, "a", "b");
    MOEKIT_CHECK_RANGE(adapter, 0, adapters_);
    if (safe) check_workspace(workspace, bytes, merge_workspace_size());
    OverlapCheck(where)
        .out(
            {{w, "w"}, temp_storage(safe ? workspace : nullptr, safe ? merge_workspace_size() : 0)})
        .in(Footprints{{a, "a"}, {b, "b"}})
        .check();
    const MatrixView<const T> ai = a.middle_rows(adapter * R, R);
    const MatrixView<const T> bi = b.middle_rows(adapter * d_out_, d_out_);
    const int blocks = elementwise_grid(w.size());
    if (safe) {
      auto* bad = static_cast<unsigned long long*>(workspace);
      const unsigned long long init[2] = {0ull, ~0ull};
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(bad, init, sizeof(init), cudaMemcpyHostToDevice, stream));
      lora_merge_kernel<R, false, T><<<blocks, 256, 0, stream>>>(w, ai, bi, sign * scale_, bad);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
      unsigned long long found[2] = {};
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(found, bad, sizeof(found), cudaMemcpyDeviceToHost, stream));
      MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
      if (found[0] > 0) {
        const auto first = static_cast<index_t>(found[1]);
        MOEKIT_FAIL(Errc::kNonFinite, "merging adapter ", adapter, " gives ", found[0],
                    " non-finite weights, the first at w(", first / d_in_, ", ", first % d_in_,
                    "); w is unchanged");
      }
    }
    lora_merge_kernel<R, true, T><<<blocks, 256, 0, stream>>>(w, ai, bi, sign * scale_, nullptr);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }
  static std::size_t merge_workspace_size() { return kWorkspaceAlignment; }

  void check_input(MatrixView<const T> x) const {
    check_view(x, "x");
    MOEKIT_CHECK(x.cols() == d_in_, Errc::kShapeMismatch, "x has ", x.cols(),
                 " columns, d_in = ", d_in_);
  }

  // a: N R x d_in, b: N d_out x R, with a rank mismatch named as such.
  void check_adapters(MatrixView<const T> a, MatrixView<const T> b, const char* a_name,
                      const char* b_name) const {
    check_view(a, a_name);
    check_view(b, b_name);
    if (adapters_ == 1) check_rank(a.rows(), R, a_name, "rows");
    check_shape(a, adapters_ * R, d_in_, a_name);
    check_rank(b.cols(), R, b_name, "columns");
    check_shape(b, adapters_ * d_out_, R, b_name);
  }

  void check_weights(const LoraWeights<T>& w, bool base_required) const {
    if (base_required || !w.w.empty()) check_shape(w.w, d_out_, d_in_, "weights.w");
    if (!w.bias.empty()) {
      MOEKIT_CHECK_ARG(!w.w.empty(), "weights.bias is given without weights.w");
      check_shape(w.bias, d_out_, "weights.bias");
    }
    check_adapters(w.a, w.b, "weights.a", "weights.b");
  }

  // The weights and row grouping a call reads, for its OverlapCheck.
  void add_inputs(OverlapCheck& c, const LoraWeights<T>& w, const LoraSegments& seg) const {
    c.in(Footprints{{w.w, "weights.w"},
                    {w.bias, "weights.bias"},
                    {w.a, "weights.a"},
                    {w.b, "weights.b"},
                    {seg.order, seg.order != nullptr ? seg.rows : 0, "rows.order"},
                    {seg.offsets, seg.offsets != nullptr ? seg.count + 1 : 0, "rows.offsets"}});
  }

  static void check_handle(cublasHandle_t handle, const LoraWeights<T>& w) {
    MOEKIT_CHECK(w.w.empty() || handle != nullptr, Errc::kNullPointer,
                 "handle is null (the base GEMM needs cuBLAS)");
  }

 private:
  // What the launches need, checked before the first one: 32-bit GEMM sizes,
  // grid sizes, and at most 65535 adapters in the gradient grids' y.
  void check_launch_limits(index_t n, bool gradients) const {
    constexpr index_t kMax = std::numeric_limits<std::int32_t>::max();
    MOEKIT_CHECK_ARG(n <= kMax && d_in_ <= kMax && d_out_ <= kMax, "n = ", n, ", d_in = ", d_in_,
                     ", d_out = ", d_out_, ": each must fit in 32 bits");
    MOEKIT_CHECK_ARG(tile_blocks(n, adapters_, 1) <= kMax, "n = ", n, " rows and ", adapters_,
                     " adapters exceed the grid limit");
    MOEKIT_CHECK_ARG(!gradients || adapters_ <= 65535, "num_adapters = ", adapters_,
                     " exceeds the 65535 adapters a gradient launch can take");
  }

  void check_h(MatrixView<const float> h, index_t n, const char* name) const {
    check_view(h, name);
    check_rank(h.cols(), R, name, "columns");
    check_shape(h, n, R, name);
  }

  static MatrixView<float> scratch(void* workspace, index_t n) {
    return {static_cast<float*>(workspace), n, R};
  }

  // y = x w^T + bias (cuBLAS, fp32 accumulation).
  void base_forward(cublasHandle_t handle, MatrixView<const T> x, const LoraWeights<T>& w,
                    MatrixView<T> y, cudaStream_t stream) const {
    const index_t n = x.rows();
    if (!w.bias.empty()) {
      broadcast_bias_kernel<T><<<elementwise_grid(n * d_out_), 256, 0, stream>>>(w.bias, y);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
    }
    detail::use_stream(handle, stream);
    // Column-major y^T (d_out x n) = w (op T of d_in x d_out) x^T.
    cublas_gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, d_out_, n, d_in_, w.w.data(), gemm_ld(w.w),
                x.data(), gemm_ld(x), w.bias.empty() ? 0.0f : 1.0f, y.data(), gemm_ld(y));
  }

  index_t d_in_, d_out_, adapters_;
  float scale_;
  LoraOps<R, T> ops_;
};

}  // namespace detail

// ---- one adapter on a frozen linear layer -------------------------------------------

// y = x w^T + bias + s drop(x) a^T b^T on the device (header: math, layout,
// precision); the base weight w is required.
template <LoraSpecType S, ActivationElement T>
class LoraLinear {
 public:
  static constexpr int kRank = S::rank;  // R

  // Rejects a configuration it cannot run (naming the field and value).
  explicit LoraLinear(const LoraConfig& config)
      : config_((check_lora_config(config), config)),
        layer_(config.d_in, config.d_out, 1, config.alpha, config.rslora, config.dropout,
               config.dropout_stream) {}

  // The configuration, as constructed.
  const LoraConfig& config() const { return config_; }
  // s: alpha / R, or alpha / sqrt(R) with rsLoRA.
  float scale() const { return layer_.scale(); }

  // Device bytes forward and backward need for `rows` rows (256-byte aligned).
  std::size_t workspace_size(index_t rows) const { return layer_.workspace_size(rows); }

  // a = the CPU's init values (rounded to T), b = 0.
  void init(MatrixView<T> a, MatrixView<T> b, const LoraInitConfig& init_config,
            cudaStream_t stream = nullptr) const {
    layer_.check_adapters(a, b, "a", "b");
    layer_.init("gpu::LoraLinear::init", a, b, init_config, 0, stream);
  }

  // y = x w^T + bias + s h b^T with h = drop(x) a^T written to saved_h (n x R
  // fp32) unless it is empty (inference).
  void forward(cublasHandle_t handle, MatrixView<const T> x, const LoraWeights<T>& weights,
               MatrixView<T> y, MatrixView<float> saved_h, const LoraStep& step, void* workspace,
               std::size_t workspace_bytes, cudaStream_t stream = nullptr) const {
    layer_.check_input(x);
    layer_.check_weights(weights, true);
    layer_.check_handle(handle, weights);
    layer_.forward("gpu::LoraLinear::forward", handle, x, segments(x.rows()), {}, weights, y,
                   saved_h, step, workspace, workspace_bytes, stream);
  }

  // Given dy: dx = dy w + drop'(dh a) (overwritten), da, db (fp32, overwritten
  // or accumulated); any empty output is frozen and not computed. saved_h is
  // forward's (needed for db only); step must be forward's.
  void backward(cublasHandle_t handle, MatrixView<const T> dy, MatrixView<const T> x,
                const LoraWeights<T>& weights, MatrixView<const float> saved_h,
                const LoraStep& step, MatrixView<T> dx, const LoraGrads& grads, void* workspace,
                std::size_t workspace_bytes, cudaStream_t stream = nullptr) const {
    layer_.check_input(x);
    layer_.check_weights(weights, true);
    layer_.check_handle(handle, weights);
    layer_.backward("gpu::LoraLinear::backward", handle, dy, x, segments(x.rows()), weights,
                    saved_h, step, dx, grads, workspace, workspace_bytes, stream);
  }

  // w += s b a / w -= s b a (fp32 sums, one rounding to T per element).
  void merge(MatrixView<T> w, MatrixView<const T> a, MatrixView<const T> b,
             cudaStream_t stream = nullptr) const {
    layer_.merge("gpu::LoraLinear::merge", 0, w, a, b, 1.0f, false, nullptr, 0, stream);
  }
  // w -= s b a: undoes merge up to one rounding per element.
  void unmerge(MatrixView<T> w, MatrixView<const T> a, MatrixView<const T> b,
               cudaStream_t stream = nullptr) const {
    layer_.merge("gpu::LoraLinear::unmerge", 0, w, a, b, -1.0f, false, nullptr, 0, stream);
  }
  // Device bytes of workspace safe_merge needs.
  static std::size_t merge_workspace_size() { return Layer::merge_workspace_size(); }
  // merge, refusing (Errc::kNonFinite, w unchanged) if a merged value would
  // not be finite in T; synchronises `stream` once to learn that.
  void safe_merge(MatrixView<T> w, MatrixView<const T> a, MatrixView<const T> b, void* workspace,
                  std::size_t workspace_bytes, cudaStream_t stream = nullptr) const {
    layer_.merge("gpu::LoraLinear::safe_merge", 0, w, a, b, 1.0f, true, workspace, workspace_bytes,
                 stream);
  }

 private:
  using Layer = detail::LoraLayer<kRank, T>;
  static detail::LoraSegments segments(index_t n) { return {nullptr, nullptr, n, 1}; }

  LoraConfig config_;
  Layer layer_;
};

// ---- N adapters, one per row ----------------------------------------------------------

// N adapters of rank R on one layer; row t uses adapter ids[t] (-1: none).
// With weights.w the bank computes the base too (y = x w^T + bias + adapter,
// dx = dy w + adapter part); with weights.w empty, y and dx hold the caller's
// base values and the bank adds its part (rows without an adapter are not
// touched), as on the CPU.
template <LoraSpecType S, ActivationElement T>
class LoraBank {
 public:
  static constexpr int kRank = S::rank;  // R, the same for every adapter

  // Rejects a configuration it cannot run (naming the field and value).
  explicit LoraBank(const LoraBankConfig& config)
      : config_((check_lora_config(config), config)),
        layer_(config.d_in, config.d_out, config.num_adapters, config.alpha, config.rslora,
               config.dropout, config.dropout_stream) {}

  // The configuration, as constructed.
  const LoraBankConfig& config() const { return config_; }
  // s, shared by every adapter: alpha / R, or alpha / sqrt(R) with rsLoRA.
  float scale() const { return layer_.scale(); }
  // N, the adapters in the bank; row ids lie in [-1, N).
  index_t num_adapters() const { return config_.num_adapters; }

  // Device bytes group() needs for n rows (keys, values and CUB's sort).
  std::size_t group_workspace_size(index_t rows) const {
    MOEKIT_CHECK_ARG(rows >= 0, "rows = ", rows, " is negative");
    if (rows == 0) return 0;
    std::size_t sort_bytes = 0;
    MOEKIT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, sort_bytes, static_cast<const std::uint32_t*>(nullptr),
        static_cast<std::uint32_t*>(nullptr), static_cast<const index_t*>(nullptr),
        static_cast<index_t*>(nullptr), static_cast<std::int64_t>(rows), 0, key_bits()));
    const auto n = static_cast<std::size_t>(rows);
    return 2 * detail::round_up(n * sizeof(std::uint32_t)) + detail::round_up(n * sizeof(index_t)) +
           detail::round_up(sort_bytes);
  }

  // order (n) and offsets (N + 1) of the rows grouped by adapter (header:
  // Grouping); `invalid` (device, may be null) gets the count of ids outside
  // [-1, N), which are treated as -1.
  void group(VectorView<const std::int32_t> ids, VectorView<index_t> order,
             VectorView<index_t> offsets, std::int64_t* invalid, void* workspace,
             std::size_t workspace_bytes, cudaStream_t stream = nullptr) const {
    MOEKIT_API("gpu::LoraBank::group");
    check_view(ids, "ids");
    const index_t n = ids.size();
    check_shape(order, n, "order");
    check_shape(offsets, num_adapters() + 1, "offsets");
    const std::size_t need = group_workspace_size(n);
    detail::check_workspace(workspace, workspace_bytes, need);
    OverlapCheck("gpu::LoraBank::group")
        .out(Footprints{{order, "order"},
                        {offsets, "offsets"},
                        {invalid, invalid != nullptr ? 1 : 0, "invalid"},
                        detail::temp_storage(workspace, need)})
        .in(Footprints{{ids, "ids"}})
        .check();
    const auto count = static_cast<std::size_t>(n);
    char* base = static_cast<char*>(workspace);
    auto* keys_in = reinterpret_cast<std::uint32_t*>(base);
    base += detail::round_up(count * sizeof(std::uint32_t));
    auto* keys_out = reinterpret_cast<std::uint32_t*>(base);
    base += detail::round_up(count * sizeof(std::uint32_t));
    auto* values_in = reinterpret_cast<index_t*>(base);
    base += detail::round_up(count * sizeof(index_t));
    std::size_t sort_bytes = need - static_cast<std::size_t>(base - static_cast<char*>(workspace));

    if (n > 0) {
      detail::lora_keys_kernel<><<<detail::elementwise_grid(n), 256, 0, stream>>>(
          ids, num_adapters(), keys_in, values_in);
      MOEKIT_CUDA_CHECK(cudaGetLastError());
      MOEKIT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
          base, sort_bytes, keys_in, keys_out, values_in, order.data(),
          static_cast<std::int64_t>(n), 0, key_bits(), stream));
    }
    detail::lora_offsets_kernel<>
        <<<detail::elementwise_grid(n + num_adapters() + 2), 256, 0, stream>>>(
            keys_out, n, num_adapters(), order.data(), offsets.data(), invalid);
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }

  // Device bytes forward and backward need for `rows` rows (256-byte aligned).
  std::size_t workspace_size(index_t rows) const { return layer_.workspace_size(rows); }

  // Every adapter's a = the CPU's init values (rounded to T), b = 0.
  void init(MatrixView<T> a, MatrixView<T> b, const LoraInitConfig& init_config,
            cudaStream_t stream = nullptr) const {
    layer_.check_adapters(a, b, "a", "b");
    layer_.init("gpu::LoraBank::init", a, b, init_config, 0, stream);
  }
  // Adapter `adapter`'s a and b only (a, b: the whole bank), with the values
  // the whole-bank init gives it.
  void init_adapter(index_t adapter, MatrixView<T> a, MatrixView<T> b,
                    const LoraInitConfig& init_config, cudaStream_t stream = nullptr) const {
    layer_.check_adapters(a, b, "a", "b");
    MOEKIT_CHECK_RANGE(adapter, 0, num_adapters());
    layer_.init("gpu::LoraBank::init_adapter", a.middle_rows(adapter * kRank, kRank),
                b.middle_rows(adapter * config_.d_out, config_.d_out), init_config, adapter * kRank,
                stream);
  }

  // y (=|+=) base + s h b_i^T per row; h = drop(x) a_i^T into saved_h (n x R
  // fp32; rows without an adapter get 0) unless it is empty.
  void forward(cublasHandle_t handle, MatrixView<const T> x, const LoraRows& rows,
               const LoraWeights<T>& weights, MatrixView<T> y, MatrixView<float> saved_h,
               const LoraStep& step, void* workspace, std::size_t workspace_bytes,
               cudaStream_t stream = nullptr) const {
    layer_.check_input(x);
    check_rows(rows, x.rows());
    layer_.check_weights(weights, false);
    layer_.check_handle(handle, weights);
    layer_.forward("gpu::LoraBank::forward", handle, x, segments(rows, x.rows()), rows.ids, weights,
                   y, saved_h, step, workspace, workspace_bytes, stream);
  }

  // Given dy: dx (overwritten with the base, or added to without it), da, db
  // (fp32; adapters without rows get 0, or keep theirs with accumulate).
  void backward(cublasHandle_t handle, MatrixView<const T> dy, MatrixView<const T> x,
                const LoraRows& rows, const LoraWeights<T>& weights,
                MatrixView<const float> saved_h, const LoraStep& step, MatrixView<T> dx,
                const LoraGrads& grads, void* workspace, std::size_t workspace_bytes,
                cudaStream_t stream = nullptr) const {
    layer_.check_input(x);
    check_rows(rows, x.rows());
    layer_.check_weights(weights, false);
    layer_.check_handle(handle, weights);
    layer_.backward("gpu::LoraBank::backward", handle, dy, x, segments(rows, x.rows()), weights,
                    saved_h, step, dx, grads, workspace, workspace_bytes, stream);
  }

  // Adapter `adapter` merged into / taken out of a base weight w (d_out x d_in).
  void merge(index_t adapter, MatrixView<T> w, MatrixView<const T> a, MatrixView<const T> b,
             cudaStream_t stream = nullptr) const {
    layer_.merge("gpu::LoraBank::merge", adapter, w, a, b, 1.0f, false, nullptr, 0, stream);
  }
  // Adapter `adapter` taken out of w again: undoes merge up to one rounding.
  void unmerge(index_t adapter, MatrixView<T> w, MatrixView<const T> a, MatrixView<const T> b,
               cudaStream_t stream = nullptr) const {
    layer_.merge("gpu::LoraBank::unmerge", adapter, w, a, b, -1.0f, false, nullptr, 0, stream);
  }
  // Device bytes of workspace safe_merge needs.
  static std::size_t merge_workspace_size() { return Layer::merge_workspace_size(); }
  // merge, refusing (Errc::kNonFinite, w unchanged) if a merged value would
  // not be finite in T; synchronises `stream` once to learn that.
  void safe_merge(index_t adapter, MatrixView<T> w, MatrixView<const T> a, MatrixView<const T> b,
                  void* workspace, std::size_t workspace_bytes,
                  cudaStream_t stream = nullptr) const {
    layer_.merge("gpu::LoraBank::safe_merge", adapter, w, a, b, 1.0f, true, workspace,
                 workspace_bytes, stream);
  }

 private:
  using Layer = detail::LoraLayer<kRank, T>;

  // Radix-sort bits for keys 0 .. N + 1.
  int key_bits() const {
    return static_cast<int>(std::bit_width(static_cast<std::uint64_t>(num_adapters() + 1)));
  }

  void check_rows(const LoraRows& rows, index_t n) const {
    check_shape(rows.ids, n, "rows.ids");
    check_shape(rows.order, n, "rows.order");
    check_shape(rows.offsets, num_adapters() + 1, "rows.offsets");
  }

  detail::LoraSegments segments(const LoraRows& rows, index_t n) const {
    return {rows.order.data(), rows.offsets.data(), n, num_adapters()};
  }

  LoraBankConfig config_;
  Layer layer_;
};

}  // namespace gpu
MOEKIT_NAMESPACE_END
