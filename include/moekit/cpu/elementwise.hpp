#pragma once
// The CPU backend's element-wise passes, vectorised over F32x16
// (cpu/vec.hpp, cpu/vec_math.hpp) and chosen at run time (cpu/isa.hpp):
//
//   activation_rows           h = act(a + bias) * g, or act(a + bias)   (FFN middle, encoder)
//   activation_rows_backward  gated: dg = dh act(a), da = dh g act'(a); plain: da = dh act'(a)
//   shifted_exp_row           e^(x - max x) of a row, its max and sum     (router softmax, z-loss)
//   sigmoid_row               sigma(x) of a row                           (router sigmoid gating)
//   cross_entropy_row         softmax cross-entropy of one row and its gradient
//   distillation_row          KL + CE of one row of distillation and its gradient
//   add_column_sums           out (+)= the sum of a matrix's rows          (bias gradients)
//
// The activations are core/activation.hpp's (formulas, cut-offs and limits);
// the row losses keep the contracts of classify::cross_entropy_row and
// classify::distillation_row (core/classification.hpp), sums over classes in
// double. Results differ from those scalar functions in the last bits (own
// exp, 16 lane sums then a fixed tree).
//
// Determinism and batch invariance: every path (generic, AVX2, AVX-512)
// gives the same bits; an element's result depends only on that element's
// inputs (a row's tail takes the same vector formulas through partial
// loads), and a row's loss only on that row, its sums in an order fixed by
// the row's length. No call allocates, none threads: callers split rows.
//
// Accuracy against float64 (tests/cpu/test_vec_math.cpp, the table in
// docs/cpu_vector_math.md).

#include <algorithm>
#include <cmath>
#include <limits>

#include "moekit/core/activation.hpp"
#include "moekit/core/classification.hpp"
#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/vec.hpp"
#include "moekit/cpu/vec_math.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// What shifted_exp_row returns: the row's maximum and sum_j e^(x_j - max).
struct RowExpSum {
  float max;  // max_j x_j
  float sum;  // sum_j e^(x_j - max), >= 1 for a row with a finite maximum
};

// out[k] = sum_r m(r, k), or out[k] + that sum with `add`: each column summed
// over the rows in row order from 0 (scalar, so the bits do not depend on
// where m sits, as Eigen's colwise sum, which peels to an aligned address
// first, would), reading m row by row, 16 columns at a time.
inline void add_column_sums(MatrixView<const float> m, VectorView<float> out, bool add) {
  constexpr index_t kWidth = 16;
  for (index_t k0 = 0; k0 < m.cols(); k0 += kWidth) {
    const index_t width = std::min(kWidth, m.cols() - k0);
    float sum[kWidth] = {};
    for (index_t r = 0; r < m.rows(); ++r) {
      for (index_t k = 0; k < width; ++k) sum[k] += m(r, k0 + k);
    }
    for (index_t k = 0; k < width; ++k) out[k0 + k] = add ? out[k0 + k] + sum[k] : sum[k];
  }
}

// The kernels' file, which per_isa.hpp includes once per ISA namespace.
#define MOEKIT_PER_ISA_FILE "moekit/cpu/detail/elementwise-inl.hpp"
#include "moekit/cpu/detail/per_isa.hpp"
#undef MOEKIT_PER_ISA_FILE

// h = act(a + bias) * g for a gated FFN (g not empty), else act(a + bias);
// bias (a.cols() floats) may be null. a, g, h: the same shape; h may be a
// itself. Shapes are the caller's to check.
inline void activation_rows(Activation act, MatrixView<const float> a, MatrixView<const float> g,
                            MatrixView<float> h, const float* bias = nullptr) {
  with_activation(act, [&](auto a_const) {
    with_vec_path([&](auto path) { activation_rows<a_const()>(path, a, g, bias, h); });
  });
}

// Backward of activation_rows (no bias) given dh in d, overwritten with da;
// gated (g not empty) also writes dg = dh act(a).
inline void activation_rows_backward(Activation act, MatrixView<const float> a,
                                     MatrixView<const float> g, MatrixView<float> d,
                                     MatrixView<float> dg) {
  with_activation(act, [&](auto a_const) {
    with_vec_path([&](auto path) { activation_rows_backward<a_const()>(path, a, g, d, dg); });
  });
}

// out = e^(x - max x) over a row of n >= 1 logits, x - max below `floor`
// flushed to 0; returns the max and the sum (in float, a fixed tree).
inline RowExpSum shifted_exp_row(const float* x, index_t n, float floor, float* out) {
  return with_vec_path([&](auto path) { return shifted_exp_row(path, x, n, floor, out); });
}

// out = sigma(x) = 1 / (1 + e^-x) over a row (vec_math's sigmoid).
inline void sigmoid_row(const float* x, index_t n, float* out) {
  with_vec_path([&](auto path) { sigmoid_row(path, x, n, out); });
}

// Softmax cross-entropy of row z (n >= 1 classes), label y in [0, n): returns
// CE; with dz, writes scale (softmax(z) - onehot(y)) (dz may not alias z).
inline double cross_entropy_row(const float* z, index_t n, int y, float scale, float* dz) {
  return with_vec_path([&](auto path) { return cross_entropy_row(path, z, n, y, scale, dz); });
}

// Distillation terms of one row (classify::distillation_row's contract).
inline classify::DistillationTerms distillation_row(const float* s, const float* t, index_t n,
                                                    int y, float temperature, float alpha,
                                                    float scale, float* ds) {
  return with_vec_path(
      [&](auto path) { return distillation_row(path, s, t, n, y, temperature, alpha, scale, ds); });
}

}  // namespace cpu
MOEKIT_NAMESPACE_END
