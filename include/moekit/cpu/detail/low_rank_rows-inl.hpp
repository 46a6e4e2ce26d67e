// The low-rank row kernels of moekit/cpu/low_rank_rows.hpp over F32x16,
// written once and included into every ISA namespace there (no include
// guard, on purpose; see moekit/cpu/vec.hpp). Each takes its namespace's
// Path tag first (with_vec_path).
//
// Register blocking follows the path's register file (kF32x16Registers):
// shrink keeps 2 rows x G ranks of accumulators, expand and
// accumulate_outer M rows of input or output per column block. Every output
// element is summed in one fixed order whatever the blocking (lane l of a
// column block over the blocks in order, then reduce_add's tree; rows in
// order), and a row's tail joins through partial loads, so every path gives
// the same bits.

using detail::BlockArray;
using detail::ShrinkOperand;

// Ranks per group in shrink, rows per block in expand and accumulate_outer.
inline constexpr int kShrinkRankGroup = kF32x16Registers >= 32 ? 8 : kF32x16Registers >= 16 ? 4 : 2;
inline constexpr int kRowBlock = kF32x16Registers >= 32 ? 8 : 4;

// f.template operator()<M>(m0) over [begin, end): blocks of kMax rows, then
// of kMax / 2, kMax / 4, ..., 1 rows for what is left.
template <int kMax, class F>
MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void for_row_blocks(index_t begin, index_t end,
                                                             const F& f) {
  for (; end - begin >= kMax; begin += kMax) f.template operator()<kMax>(begin);
  if constexpr (kMax > 1) for_row_blocks<kMax / 2>(begin, end, f);
}

// out(m, r) = alpha sum_k row(m)[k] P(r, k), for the rows of one block and
// the ranks [r0, r0 + G) of one group. P is a panel or a matrix's rows
// (ShrinkOperand); a row's tail is read through partial loads of both, so
// the two give the same bits.
template <int R, class RowAt>
struct ShrinkBlocks {
  RowAt row;
  index_t count, d;
  ShrinkOperand p;
  float alpha;
  float* out;
  index_t out_ld;

  // acc[m][g] += x[m][k0, k0 + width) * P's ranks r0 + g over the same columns,
  // which start at pk (rank r0, column k0).
  template <int M, int G>
  MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void accumulate(
      const BlockArray<const float*, M>& x, index_t k0, int width, const float* pk,
      BlockArray<BlockArray<F32x16, G>, M>& acc) const {
    BlockArray<F32x16, M> xv;
    MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
      xv[m] = width == kF32x16Lanes ? load(x[m] + k0) : load_partial(x[m] + k0, width);
    }
    MOEKIT_UNROLL for (int g = 0; g < G; ++g) {
      const float* pg = pk + g * p.rank_stride;
      const F32x16 pv = width == kF32x16Lanes ? load(pg) : load_partial(pg, width);
      MOEKIT_UNROLL for (int m = 0; m < M; ++m) acc[m][g] = fmadd(xv[m], pv, acc[m][g]);
    }
  }

  // Ranks [r0, r0 + G): one pass over the block's rows.
  template <int M, int G>
  MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void group(
      index_t m0, int r0, const BlockArray<const float*, M>& x,
      const BlockArray<const float*, M>& next) const {
    constexpr int kL = kF32x16Lanes;
    const index_t blocks = d / kL;
    const int tail = static_cast<int>(d - blocks * kL);
    BlockArray<BlockArray<F32x16, G>, M> acc;
    MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
      MOEKIT_UNROLL for (int g = 0; g < G; ++g) acc[m][g] = zero();
    }
    const float* pk = p.data + r0 * p.rank_stride;
    for (index_t b = 0; b < blocks; ++b, pk += p.block_stride) {
      if (r0 == 0) {
        MOEKIT_UNROLL for (int m = 0; m < M; ++m) detail::prefetch_l2(next[m] + b * kL);
      }
      accumulate<M, G>(x, b * kL, kL, pk, acc);
    }
    if (tail > 0) accumulate<M, G>(x, blocks * kL, tail, pk, acc);
    for (int m = 0; m < M; ++m) {
      for (int g = 0; g < G; ++g) out[(m0 + m) * out_ld + r0 + g] = alpha * reduce_add(acc[m][g]);
    }
  }

  // Whole groups of kShrinkRankGroup ranks in a run-time loop, then the
  // rest: two instantiations of group per block size whatever R (a group
  // per rank group, unrolled at compile time, cost minutes of compile time
  // at R = 64).
  template <int M>
  MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void groups(
      index_t m0, const BlockArray<const float*, M>& x,
      const BlockArray<const float*, M>& next) const {
    constexpr int kG = std::min(kShrinkRankGroup, R), kWhole = R / kG * kG;
    for (int r0 = 0; r0 < kWhole; r0 += kG) group<M, kG>(m0, r0, x, next);
    if constexpr (kWhole < R) group<M, R - kWhole>(m0, kWhole, x, next);
  }

  template <int M>
  MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void operator()(index_t m0) const {
    BlockArray<const float*, M> x;
    BlockArray<const float*, M> next;
    detail::block_rows<M>(row, m0, count, x, next);
    groups<M>(m0, x, next);
  }
};

template <int R, class RowAt>
MOEKIT_KERNEL_TARGET inline void shrink_rows(Path, RowAt row, index_t count, index_t d,
                                             ShrinkOperand p, float alpha, float* out,
                                             index_t out_ld) {
  for_row_blocks<2>(0, count, ShrinkBlocks<R, RowAt>{row, count, d, p, alpha, out, out_ld});
}

// row(m)[k] += sum_r c(m, r) P(r, k) for the rows of one block.
template <int R, class RowAt>
struct ExpandBlocks {
  RowAt row;
  index_t count, d;
  const float* coef;
  float alpha;
  const float* panel;

  template <int M>
  MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void step(const BlockArray<float*, M>& y,
                                                     const BlockArray<const float*, M>& next,
                                                     const BlockArray<BlockArray<float, R>, M>& c,
                                                     index_t k0, const float* p, int width) const {
    BlockArray<F32x16, M> acc;
    MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
      acc[m] = width == kF32x16Lanes ? load(y[m] + k0) : load_partial(y[m] + k0, width);
      detail::prefetch_l2(next[m] + k0);
    }
    MOEKIT_UNROLL_RANKS for (int r = 0; r < R; ++r) {
      const F32x16 pv = load(p + r * kF32x16Lanes);
      MOEKIT_UNROLL for (int m = 0; m < M; ++m) acc[m] = fmadd(set1(c[m][r]), pv, acc[m]);
    }
    MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
      if (width == kF32x16Lanes) {
        store(y[m] + k0, acc[m]);
      } else {
        store_partial(y[m] + k0, acc[m], width);
      }
    }
  }

  template <int M>
  MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void operator()(index_t m0) const {
    constexpr int kL = kF32x16Lanes;
    BlockArray<float*, M> y;
    BlockArray<const float*, M> next;
    BlockArray<BlockArray<float, R>, M> c;
    detail::block_rows<M>(row, m0, count, y, next);
    detail::block_coefs<M, R>(coef, m0, alpha, c);
    const index_t blocks = d / kL;
    const float* p = panel;
    for (index_t b = 0; b < blocks; ++b, p += R * kL) step<M>(y, next, c, b * kL, p, kL);
    if (d > blocks * kL) step<M>(y, next, c, blocks * kL, p, static_cast<int>(d - blocks * kL));
  }
};

template <int R, class RowAt>
MOEKIT_KERNEL_TARGET inline void expand_rows(Path, RowAt row, index_t count, index_t d,
                                             const float* coef, float alpha, const float* panel) {
  for_row_blocks<kRowBlock>(0, count, ExpandBlocks<R, RowAt>{row, count, d, coef, alpha, panel});
}

// P(r, k) += sum_m c(m, r) row(m)[k] for the rows of one block.
template <int R, class RowAt>
struct OuterBlocks {
  RowAt row;
  index_t count, d;
  const float* coef;
  float* panel;

  template <int M>
  MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void step(const BlockArray<const float*, M>& x,
                                                     const BlockArray<const float*, M>& next,
                                                     const BlockArray<BlockArray<float, R>, M>& c,
                                                     index_t k0, float* p, int width) const {
    BlockArray<F32x16, M> xv;
    MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
      xv[m] = width == kF32x16Lanes ? load(x[m] + k0) : load_partial(x[m] + k0, width);
      detail::prefetch_l2(next[m] + k0);
    }
    MOEKIT_UNROLL_RANKS for (int r = 0; r < R; ++r) {
      F32x16 acc = load(p + r * kF32x16Lanes);
      MOEKIT_UNROLL for (int m = 0; m < M; ++m) acc = fmadd(set1(c[m][r]), xv[m], acc);
      if (width == kF32x16Lanes) {
        store(p + r * kF32x16Lanes, acc);
      } else {
        store_partial(p + r * kF32x16Lanes, acc, width);  // the padding stays 0
      }
    }
  }

  template <int M>
  MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void operator()(index_t m0) const {
    constexpr int kL = kF32x16Lanes;
    BlockArray<const float*, M> x;
    BlockArray<const float*, M> next;
    BlockArray<BlockArray<float, R>, M> c;
    detail::block_rows<M>(row, m0, count, x, next);
    detail::block_coefs<M, R>(coef, m0, 1.0f, c);
    const index_t blocks = d / kL;
    float* p = panel;
    for (index_t b = 0; b < blocks; ++b, p += R * kL) step<M>(x, next, c, b * kL, p, kL);
    if (d > blocks * kL) step<M>(x, next, c, blocks * kL, p, static_cast<int>(d - blocks * kL));
  }
};

template <int R, class RowAt>
MOEKIT_KERNEL_TARGET inline void accumulate_outer(Path, RowAt row, index_t count, index_t d,
                                                  const float* coef, float* panel) {
  for_row_blocks<kRowBlock>(0, count, OuterBlocks<R, RowAt>{row, count, d, coef, panel});
}
