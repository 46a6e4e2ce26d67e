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
// Register blocking (AVX-512; half the rows or ranks with 16 vector
// registers): shrink keeps 2 rows x 8 ranks of accumulators, expand 8 rows of
// output against the rank vectors of one column block, accumulate_outer 8
// rows of input against one panel vector per rank. Each output element is
// summed in one fixed order whatever the blocking, so results are
// deterministic.

#include <algorithm>

#include "moekit/core/config.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/simd.hpp"

#if defined(__clang__)
#define MOEKIT_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define MOEKIT_UNROLL _Pragma("GCC unroll 64")
#else
#define MOEKIT_UNROLL
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

inline constexpr bool kWideRegisters = simd::kRegisters >= 32;

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
  return (d + simd::kLanes - 1) / simd::kLanes * simd::kLanes * R;
}

// Element (r, k) of a panel.
template <int R>
MOEKIT_FORCE_INLINE index_t panel_at(int r, index_t k) {
  constexpr int kL = simd::kLanes;
  return (k / kL * R + r) * kL + k % kL;
}

// panel = mat (R x d), or mat^T when mat is d x R (an adapter's b); padding 0.
// One column block at a time: R runs of kLanes floats from R x d, or kLanes
// consecutive rows of R floats from d x R.
template <int R, bool kTransposed = false>
void pack_panel(MatrixView<const float> mat, float* panel) {
  constexpr int kL = simd::kLanes;
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

// mat (R x d, or d x R when transposed) = or += alpha panel.
template <int R, bool kTransposed = false>
void unpack_panel(const float* panel, float alpha, bool add, MatrixView<float> mat) {
  const auto put = [&](float& dst, float v) { dst = add ? dst + alpha * v : alpha * v; };
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

// f.template operator()<M>(m0) over [begin, end): blocks of kMax rows, then
// of kMax / 2, kMax / 4, ..., 1 rows for what is left.
template <int kMax, class F>
MOEKIT_FORCE_INLINE void for_row_blocks(index_t begin, index_t end, F& f) {
  for (; end - begin >= kMax; begin += kMax) f.template operator()<kMax>(begin);
  if constexpr (kMax > 1) for_row_blocks<kMax / 2>(begin, end, f);
}

// f.template operator()<R0, G>() over rank groups [R0, R0 + G) of at most kGroup ranks.
template <int R, int kGroup, int R0 = 0, class F>
MOEKIT_FORCE_INLINE void for_rank_groups(F& f) {
  if constexpr (R0 < R) {
    constexpr int G = std::min(kGroup, R - R0);
    f.template operator()<R0, G>();
    for_rank_groups<R, kGroup, R0 + G>(f);
  }
}

// A block's rows m0 .. m0 + M - 1 and, for prefetch_l2, the rows of the
// next block (the block's own where none follow).
template <std::size_t M, class RowAt, class T>
MOEKIT_FORCE_INLINE void block_rows(RowAt row, index_t m0, index_t count, T* (&rows)[M],
                                    const float* (&next)[M]) {
  constexpr int kM = static_cast<int>(M);
  MOEKIT_UNROLL for (int m = 0; m < kM; ++m) {
    rows[m] = row(m0 + m);
    next[m] = m0 + kM + m < count ? row(m0 + kM + m) : rows[m];
  }
}

// c[m][r] = alpha coef(m0 + m, r): a block's coefficients, in registers or L1.
template <std::size_t M, std::size_t R>
MOEKIT_FORCE_INLINE void block_coefs(const float* coef, index_t m0, float alpha, float (&c)[M][R]) {
  constexpr int kM = static_cast<int>(M), kR = static_cast<int>(R);
  MOEKIT_UNROLL for (int m = 0; m < kM; ++m) {
    for (int r = 0; r < kR; ++r) c[m][r] = alpha * coef[(m0 + m) * kR + r];
  }
}

// out(m, r) = alpha sum_k row(m)[k] P(r, k): m < count, r < R, k < d.
template <int R, class RowAt>
void shrink_rows(RowAt row, index_t count, index_t d, const float* panel, float alpha, float* out) {
  constexpr int kL = simd::kLanes;
  const index_t blocks = d / kL;
  auto rows_block = [&]<int M>(index_t m0) {
    const float* x[to_size(M)];
    const float* next[to_size(M)];
    block_rows(row, m0, count, x, next);
    auto group = [&]<int R0, int G>() {
      simd::Floats acc[to_size(M)][to_size(G)];
      MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
        MOEKIT_UNROLL for (int g = 0; g < G; ++g) acc[m][g] = simd::zeros();
      }
      const float* p = panel + R0 * kL;
      for (index_t b = 0; b < blocks; ++b, p += R * kL) {
        simd::Floats xv[to_size(M)];
        MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
          xv[m] = simd::load(x[m] + b * kL);
          if constexpr (R0 == 0) prefetch_l2(next[m] + b * kL);
        }
        MOEKIT_UNROLL for (int g = 0; g < G; ++g) {
          const simd::Floats pv = simd::load(p + g * kL);
          MOEKIT_UNROLL for (int m = 0; m < M; ++m) acc[m][g] = simd::fma(xv[m], pv, acc[m][g]);
        }
      }
      for (int m = 0; m < M; ++m) {
        for (int g = 0; g < G; ++g) {
          float s = simd::sum(acc[m][g]);
          for (index_t k = blocks * kL; k < d; ++k) s += x[m][k] * panel[panel_at<R>(R0 + g, k)];
          out[(m0 + m) * R + R0 + g] = alpha * s;
        }
      }
    };
    for_rank_groups<R, kWideRegisters ? 8 : 4>(group);
  };
  for_row_blocks<2>(0, count, rows_block);
}

// row(m)[k] += sum_r (alpha coef(m, r)) P(r, k): m < count, k < d.
template <int R, class RowAt>
void expand_rows(RowAt row, index_t count, index_t d, const float* coef, float alpha,
                 const float* panel) {
  constexpr int kL = simd::kLanes;
  const index_t blocks = d / kL;
  auto rows_block = [&]<int M>(index_t m0) {
    float* y[to_size(M)];
    const float* next[to_size(M)];
    float c[to_size(M)][to_size(R)];
    block_rows(row, m0, count, y, next);
    block_coefs(coef, m0, alpha, c);
    const float* p = panel;
    for (index_t b = 0; b < blocks; ++b, p += R * kL) {
      simd::Floats acc[to_size(M)];
      MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
        acc[m] = simd::load(y[m] + b * kL);
        prefetch_l2(next[m] + b * kL);
      }
      MOEKIT_UNROLL for (int r = 0; r < R; ++r) {
        const simd::Floats pv = simd::load(p + r * kL);
        MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
          acc[m] = simd::fma(simd::broadcast(c[m][r]), pv, acc[m]);
        }
      }
      MOEKIT_UNROLL for (int m = 0; m < M; ++m) simd::store(y[m] + b * kL, acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      for (index_t k = blocks * kL; k < d; ++k) {
        float s = y[m][k];
        for (int r = 0; r < R; ++r) s += c[m][r] * panel[panel_at<R>(r, k)];
        y[m][k] = s;
      }
    }
  };
  for_row_blocks<kWideRegisters ? 8 : 4>(0, count, rows_block);
}

// P(r, k) += sum_m coef(m, r) row(m)[k]: r < R, k < d, rows in order.
template <int R, class RowAt>
void accumulate_outer(RowAt row, index_t count, index_t d, const float* coef, float* panel) {
  constexpr int kL = simd::kLanes;
  const index_t blocks = d / kL;
  auto rows_block = [&]<int M>(index_t m0) {
    const float* x[to_size(M)];
    const float* next[to_size(M)];
    float c[to_size(M)][to_size(R)];
    block_rows(row, m0, count, x, next);
    block_coefs(coef, m0, 1.0f, c);
    float* p = panel;
    for (index_t b = 0; b < blocks; ++b, p += R * kL) {
      simd::Floats xv[to_size(M)];
      MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
        xv[m] = simd::load(x[m] + b * kL);
        prefetch_l2(next[m] + b * kL);
      }
      MOEKIT_UNROLL for (int r = 0; r < R; ++r) {
        simd::Floats acc = simd::load(p + r * kL);
        MOEKIT_UNROLL for (int m = 0; m < M; ++m) {
          acc = simd::fma(simd::broadcast(c[m][r]), xv[m], acc);
        }
        simd::store(p + r * kL, acc);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (index_t k = blocks * kL; k < d; ++k) {
        float& s = panel[panel_at<R>(r, k)];
        for (int m = 0; m < M; ++m) s += c[m][r] * x[m][k];
      }
    }
  };
  for_row_blocks<kWideRegisters ? 8 : 4>(0, count, rows_block);
}

}  // namespace cpu::detail
MOEKIT_NAMESPACE_END
