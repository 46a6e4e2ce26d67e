#pragma once
// Hand-written row kernels of the session memory (moekit/nn/session_memory.hpp),
// the router and the task heads, over F32x16 and I32x16 (cpu/vec.hpp), in
// every ISA namespace (cpu::generic, cpu::avx2, cpu::avx512) under the same
// names, chosen at run time with with_vec_path:
//
//   row_dots        out = m v                         (projections, the read S q)
//   multi_row_dots  out_v = m v for several v at once (the router's and the
//                                                      task heads' logits)
//   dot, normalize  a . b, x / ||x||
//   decay_subtract  y = a y - c x                     (one row of the delta rule)
//   delta_rows      S = a S - c k^T                   (the delta rule on the state)
//   axpy            y += w x                          (slot values into a read)
//   combine_rows    y (+)= sum_i g_i m_i              (the router's dx)
//   add_outer_products  o += g^T x                    (the router's dw_gate)
//   mix_row         y = z + g o, exactly z where o = 0 (the gate)
//   sigmoid_of      sigma(z)
//   quantize_row    symmetric int8 quantisation of a row, as int32 values
//   dot_i8_rows     exact int32 dot products of int8 rows with a quantised query
//   scale_scores    float scores from the integer dot products and the scales
//   softmax_weights softmax(tau s) over k <= 16 scores, and sum w^2
//
// Determinism: every path gives the same bits, each result depends on its
// own row and vector only, and sums run in an order fixed by their length
// (see detail/memory_kernels-inl.hpp). int8 products accumulate in int32
// (sign-extended loads and 32-bit multiplies; never a saturating 16-bit
// pairwise instruction), so the integer scores are exact everywhere.
// No kernel allocates or threads; callers split rows.
//
// quantize_rows (below) prepares int8 keys: one scale per row.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/vec.hpp"
#include "moekit/cpu/vec_math.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// The longest int8 row whose exact dot product with a quantised vector fits
// int32: 2^17 * 127 * 127 < 2^31.
inline constexpr index_t kMaxInt8DotLength = index_t{1} << 17;

// The kernels' file, which per_isa.hpp includes once per ISA namespace.
#define MOEKIT_PER_ISA_FILE "moekit/cpu/detail/memory_kernels-inl.hpp"
#include "moekit/cpu/detail/per_isa.hpp"
#undef MOEKIT_PER_ISA_FILE

// Symmetric int8 quantisation, one scale per row: scale[r] = max_j |w(r, j)| / 127,
// q(r, j) = round(w(r, j) / scale[r]) in [-127, 127] (to nearest, ties to even;
// a zero row gives scale 0 and zeros), so w(r, j) ~ scale[r] q(r, j) within
// scale[r] / 2. The same rule quantises queries at run time. Rows of at most
// kMaxInt8DotLength columns; w must be finite (kNonFinite names the element).
inline void quantize_rows(MatrixView<const float> w, MatrixView<std::int8_t> q,
                          VectorView<float> scale) {
  check_view(w, "w");
  check_shape(q, w.rows(), w.cols(), "q");
  check_shape(scale, w.rows(), "scale");
  MOEKIT_CHECK(w.cols() <= kMaxInt8DotLength, Errc::kInvalidArgument, "w has ", w.cols(),
               " columns, more than the ", kMaxInt8DotLength, " an exact int32 dot product allows");
  for (index_t r = 0; r < w.rows(); ++r) {
    for (index_t c = 0; c < w.cols(); ++c) {
      MOEKIT_CHECK(std::isfinite(w(r, c)), Errc::kNonFinite, "w(", r, ", ", c, ") = ", w(r, c),
                   " is not finite");
    }
  }
  // Preparation, not a hot path: one row of int32 values is allocated here.
  std::vector<std::int32_t> values(static_cast<std::size_t>(w.cols()));
  with_vec_path([&](auto path) {
    for (index_t r = 0; r < w.rows(); ++r) {
      scale[r] = quantize_row(path, w.row(r), w.cols(), values.data());
      for (index_t c = 0; c < w.cols(); ++c) {
        q(r, c) = static_cast<std::int8_t>(values[static_cast<std::size_t>(c)]);
      }
    }
  });
}

}  // namespace cpu
MOEKIT_NAMESPACE_END
