#pragma once
// Rank-R products over rows that may lie anywhere in a matrix: the kernels of
// a LoRA adapter applied to one segment of a multi-adapter batch (the SGMV
// idea of Punica), reading the segment's rows where they are instead of
// gathering them into scratch and scattering results back.
//
//   shrink_rows       out(m, r)  = alpha sum_k row_m[k] P(r, k)     h = x a^T,  dh = s dy b
//   expand_rows       row_m[k]  += alpha sum_r coef(m, r) P(r, k)   y += s h b^T, dx += dh a
//   accumulate_outer  P(r, k)   += sum_m coef(m, r) row_m[k]        da += dh^T x, (db)^T += h^T dy
//
// P is an R x d matrix packed as a panel (pack_panel): for each block of
// kLanes columns, the R rank vectors of that block side by side. Rows of an
// adapter's a lie d floats apart, which is a multiple of 4 KiB for the usual
// d; read straight from there the R rows of one column block fall into one
// L1 set and evict each other. A panel streams instead. Packing costs
// R x d moves per segment, small beside the segment's rows.
//
// coef and out are count x R, contiguous; row(m) gives row m's first element
// (RowsOf: rows picked through an index list at no cost).
//
// Layout and results do not depend on compile flags: a panel's column
// blocks are always kPanelLanes = 16 floats wide (panel_floats, and with it
// LoraBank's workspace size, is the same in every translation unit), and
// the kernels are written once over F32x16 (detail/low_rank_rows-inl.hpp)
// and chosen at run time (cpu/isa.hpp), every path giving the same bits.
// Each output element is summed in one fixed order whatever the register
// blocking, so results are deterministic and per row (batch invariant).

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "moekit/core/config.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/vec.hpp"

#if defined(__clang__)
#define MOEKIT_UNROLL _Pragma("unroll")
#define MOEKIT_UNROLL_RANKS _Pragma("unroll 16")
#elif defined(__GNUC__)
#define MOEKIT_UNROLL _Pragma("GCC unroll 64")
#define MOEKIT_UNROLL_RANKS _Pragma("GCC unroll 16")
#else
// Asks the compiler to unroll the loop after it (a short loop over a
// compile-time count); nothing where it has no such pragma.
#define MOEKIT_UNROLL
// The same for a loop over the R ranks, at most 16 at a time: whole for the
// usual ranks, while R = 64 does not multiply the code (and compile time) by
// 64 per row-block size and ISA path. Unrolling never changes the order of
// the sums.
#define MOEKIT_UNROLL_RANKS
#endif

MOEKIT_NAMESPACE_BEGIN
namespace cpu::detail {

// The rows of one unit of work: row k is order[first + k], or first + k when
// order is null.
struct RowSet {
  const index_t* order = nullptr;
  index_t first = 0;
  index_t count = 0;

  index_t operator[](index_t k) const { return order != nullptr ? order[first + k] : first + k; }
};

// Row m of a row set in a matrix (data, leading dimension ld): how the
// kernels below take their rows.
template <class T>
struct RowsOf {
  T* data = nullptr;
  index_t ld = 0;
  RowSet rows;

  MOEKIT_FORCE_INLINE T* operator()(index_t m) const { return data + rows[m] * ld; }
};
template <class T>
RowsOf<T> rows_of(MatrixView<T> m, const RowSet& rows) {
  return {m.data(), m.ld(), rows};
}

// Columns per block of a panel: F32x16's lanes on every path.
inline constexpr int kPanelLanes = kF32x16Lanes;

// Rows of a segment are scattered, so the hardware prefetcher meets every
// row as a new stream; the kernels walk the next block's rows into L2 while
// they compute on the current block's.
template <class T>
MOEKIT_FORCE_INLINE void prefetch_l2(const T* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 1);
#else
  (void)p;
#endif
}

// Floats of a panel of R x d: d rounded up to whole column blocks.
template <int R>
constexpr index_t panel_floats(index_t d) {
  return (d + kPanelLanes - 1) / kPanelLanes * kPanelLanes * R;
}

// Element (r, k) of a panel.
template <int R>
MOEKIT_FORCE_INLINE index_t panel_at(int r, index_t k) {
  constexpr int kL = kPanelLanes;
  return (k / kL * R + r) * kL + k % kL;
}

// panel = mat (R x d), or mat^T when mat is d x R (an adapter's b); padding 0.
// One column block at a time: R runs of kLanes floats from R x d, or kLanes
// consecutive rows of R floats from d x R.
template <int R, bool kTransposed = false>
void pack_panel(MatrixView<const float> mat, float* panel) {
  constexpr int kL = kPanelLanes;
  const index_t d = kTransposed ? mat.rows() : mat.cols();
  for (index_t k0 = 0; k0 < d; k0 += kL, panel += R * kL) {
    const int width = static_cast<int>(std::min<index_t>(kL, d - k0));
    for (int r = 0; r < R; ++r) {
      float* dst = panel + r * kL;
      for (int j = 0; j < width; ++j) dst[j] = kTransposed ? mat(k0 + j, r) : mat(r, k0 + j);
      for (int j = width; j < kL; ++j) dst[j] = 0.0f;
    }
  }
}

// mat (R x d, or d x R when transposed) = or += alpha panel (the sum fused,
// so that no compile flag decides whether it is).
template <int R, bool kTransposed = false>
void unpack_panel(const float* panel, float alpha, bool add, MatrixView<float> mat) {
  const auto put = [&](float& dst, float v) { dst = add ? std::fma(alpha, v, dst) : alpha * v; };
  if constexpr (kTransposed) {
    for (index_t k = 0; k < mat.rows(); ++k) {
      for (int r = 0; r < R; ++r) put(mat(k, r), panel[panel_at<R>(r, k)]);
    }
  } else {
    for (int r = 0; r < R; ++r) {
      for (index_t k = 0; k < mat.cols(); ++k) put(mat(r, k), panel[panel_at<R>(r, k)]);
    }
  }
}

// The R x d matrix P of shrink_rows, read in place: P(r, k) for k in one
// column block b (kPanelLanes wide) starts at data + r rank_stride +
// b block_stride. A packed panel (panel_operand), or the rows of a
// row-major matrix where they are (rows_operand: for few rows, such as a
// router's w_gate, whose rows do not meet in one L1 set; nothing packed).
struct ShrinkOperand {
  const float* data = nullptr;
  index_t rank_stride = 0;
  index_t block_stride = 0;
};
template <int R>
ShrinkOperand panel_operand(const float* panel) {
  return {panel, kPanelLanes, index_t{R} * kPanelLanes};
}
inline ShrinkOperand rows_operand(MatrixView<const float> m) {
  return {m.data(), m.ld(), kPanelLanes};
}

// A block's arrays of rows, ranks or coefficients (the int bound converted
// once, where -Wsign-conversion wants it).
template <class T, int N>
using BlockArray = T[static_cast<std::size_t>(N)];

// A block's rows m0 .. m0 + M - 1 and, for prefetch_l2, the rows of the
// next block (the block's own where none follow).
template <int M, class RowAt, class T>
MOEKIT_FORCE_INLINE void block_rows(RowAt row, index_t m0, index_t count, BlockArray<T*, M>& rows,
                                    BlockArray<const float*, M>& next) {
  MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
    rows[m] = row(m0 + m);
    next[m] = m0 + M + m < count ? row(m0 + M + m) : rows[m];
  }
}

// c[m][r] = alpha coef(m0 + m, r): a block's coefficients, in registers or L1.
template <int M, int R>
MOEKIT_FORCE_INLINE void block_coefs(const float* coef, index_t m0, float alpha,
                                     BlockArray<BlockArray<float, R>, M>& c) {
  MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
    for (int r = 0; r < R; ++r) c[m][r] = alpha * coef[(m0 + m) * R + r];
  }
}

}  // namespace cpu::detail

namespace cpu {
// The kernels' file, which per_isa.hpp includes once per ISA namespace.
#define MOEKIT_PER_ISA_FILE "moekit/cpu/detail/low_rank_rows-inl.hpp"
#include "moekit/cpu/detail/per_isa.hpp"
#undef MOEKIT_PER_ISA_FILE

}  // namespace cpu

namespace cpu::detail {

// out(m, r) = alpha sum_k row(m)[k] P(r, k): m < count, r < R, k < d; out
// has rows out_ld floats apart.
template <int R, class RowAt>
void shrink_rows(RowAt row, index_t count, index_t d, ShrinkOperand p, float alpha, float* out,
                 index_t out_ld) {
  with_vec_path([&](auto path) { shrink_rows<R>(path, row, count, d, p, alpha, out, out_ld); });
}
// The same with P a packed panel and out count x R, contiguous.
template <int R, class RowAt>
void shrink_rows(RowAt row, index_t count, index_t d, const float* panel, float alpha, float* out) {
  shrink_rows<R>(row, count, d, panel_operand<R>(panel), alpha, out, R);
}

// row(m)[k] += sum_r (alpha coef(m, r)) P(r, k): m < count, k < d.
template <int R, class RowAt>
void expand_rows(RowAt row, index_t count, index_t d, const float* coef, float alpha,
                 const float* panel) {
  with_vec_path([&](auto path) { expand_rows<R>(path, row, count, d, coef, alpha, panel); });
}

// P(r, k) += sum_m coef(m, r) row(m)[k]: r < R, k < d, rows in order.
template <int R, class RowAt>
void accumulate_outer(RowAt row, index_t count, index_t d, const float* coef, float* panel) {
  with_vec_path([&](auto path) { accumulate_outer<R>(path, row, count, d, coef, panel); });
}

}  // namespace cpu::detail
MOEKIT_NAMESPACE_END
