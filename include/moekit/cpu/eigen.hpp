#pragma once
// Bridges between moekit views and Eigen, for the CPU backend.
//
// as_eigen(view) wraps a MatrixView in an Eigen::Map with the view's leading
// dimension as outer stride: no copy, and writes through a mutable view land
// in the caller's memory. view_of(matrix) goes the other way for row-major
// Eigen matrices owned by the caller.

#include <type_traits>

#include <Eigen/Core>

#include "moekit/core/view.hpp"

static_assert(EIGEN_VERSION_AT_LEAST(3, 4, 0), "moekit requires Eigen 3.4 or newer");

MOEKIT_NAMESPACE_BEGIN

// A dynamic-size row-major Eigen matrix, the layout of moekit's views.
template <class T>
using EigenRowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
// A dynamic-size Eigen column vector.
template <class T>
using EigenVector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

namespace detail {
// Eigen spells a read-only map as Map<const Matrix>.
template <class T, class Plain>
using MaybeConst = std::conditional_t<std::is_const_v<T>, const Plain, Plain>;
}  // namespace detail

// An Eigen map over a MatrixView<T>'s memory (read-only for const T), with
// the view's ld as outer stride.
template <class T>
using EigenMatrixMap = Eigen::Map<detail::MaybeConst<T, EigenRowMatrix<std::remove_const_t<T>>>,
                                  Eigen::Unaligned, Eigen::OuterStride<>>;
// An Eigen map over a VectorView<T>'s contiguous memory (read-only for const T).
template <class T>
using EigenVectorMap = Eigen::Map<detail::MaybeConst<T, EigenVector<std::remove_const_t<T>>>>;

// The view as an Eigen matrix map: no copy; valid while the view's memory is.
template <class T>
EigenMatrixMap<T> as_eigen(MatrixView<T> v) {
  // Eigen rejects a zero stride even for an empty map; any ld >= 1 is inert.
  const index_t stride = v.ld() > 0 ? v.ld() : 1;
  return EigenMatrixMap<T>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(stride));
}

// The view as an Eigen vector map: no copy; valid while the view's memory is.
template <class T>
EigenVectorMap<T> as_eigen(VectorView<T> v) {
  return EigenVectorMap<T>(v.data(), v.size());
}

// A mutable view of m's elements; valid until m is resized or destroyed.
template <class T>
MatrixView<T> view_of(EigenRowMatrix<T>& m) {
  return MatrixView<T>(m.data(), m.rows(), m.cols());
}
// A read-only view of m's elements; valid until m is resized or destroyed.
template <class T>
MatrixView<const T> view_of(const EigenRowMatrix<T>& m) {
  return MatrixView<const T>(m.data(), m.rows(), m.cols());
}
// A mutable view of v's elements; valid until v is resized or destroyed.
template <class T>
VectorView<T> view_of(EigenVector<T>& v) {
  return VectorView<T>(v.data(), v.size());
}
// A read-only view of v's elements; valid until v is resized or destroyed.
template <class T>
VectorView<const T> view_of(const EigenVector<T>& v) {
  return VectorView<const T>(v.data(), v.size());
}

MOEKIT_NAMESPACE_END
