#pragma once
// Non-owning views of caller memory, usable on host and device.
//
// MatrixView<T> is (pointer, rows, cols, leading dimension), row-major:
// element (r, c) lives at data[r * ld + c]. A view never allocates or frees;
// const-ness is carried by T (MatrixView<const float> is read-only) and a
// mutable view converts to a const one implicitly. The CPU backend wraps views
// in Eigen::Map (moekit/cpu/eigen.hpp); kernels take them by value.
//
// Host entry points validate views with check_view / check_shape below before
// any element is touched.

#include <type_traits>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/types.hpp"

MOEKIT_NAMESPACE_BEGIN

template <class T>
class VectorView {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;

  constexpr VectorView() = default;
  MOEKIT_HOST_DEVICE constexpr VectorView(T* data, index_t size) : data_(data), size_(size) {}

  // VectorView<float> -> VectorView<const float>, never the other way.
  template <class U>
  requires(!std::is_same_v<U, T> && std::is_convertible_v<U (*)[], T (*)[]>) MOEKIT_HOST_DEVICE
      constexpr VectorView(VectorView<U> other)
      : data_(other.data()), size_(other.size()) {}

  MOEKIT_HOST_DEVICE constexpr T* data() const { return data_; }
  MOEKIT_HOST_DEVICE constexpr index_t size() const { return size_; }
  MOEKIT_HOST_DEVICE constexpr bool empty() const { return size_ == 0; }
  MOEKIT_HOST_DEVICE constexpr T& operator[](index_t i) const { return data_[i]; }
  MOEKIT_HOST_DEVICE constexpr T* begin() const { return data_; }
  MOEKIT_HOST_DEVICE constexpr T* end() const { return data_ + size_; }

  // Elements [offset, offset + count).
  MOEKIT_HOST_DEVICE constexpr VectorView segment(index_t offset, index_t count) const {
    return VectorView(data_ + offset, count);
  }

 private:
  T* data_ = nullptr;
  index_t size_ = 0;
};

template <class T>
class MatrixView {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;

  constexpr MatrixView() = default;
  // Dense rows: ld = cols.
  MOEKIT_HOST_DEVICE constexpr MatrixView(T* data, index_t rows, index_t cols)
      : data_(data), rows_(rows), cols_(cols), ld_(cols) {}
  MOEKIT_HOST_DEVICE constexpr MatrixView(T* data, index_t rows, index_t cols, index_t ld)
      : data_(data), rows_(rows), cols_(cols), ld_(ld) {}

  template <class U>
  requires(!std::is_same_v<U, T> && std::is_convertible_v<U (*)[], T (*)[]>) MOEKIT_HOST_DEVICE
      constexpr MatrixView(MatrixView<U> other)
      : data_(other.data()), rows_(other.rows()), cols_(other.cols()), ld_(other.ld()) {}

  MOEKIT_HOST_DEVICE constexpr T* data() const { return data_; }
  MOEKIT_HOST_DEVICE constexpr index_t rows() const { return rows_; }
  MOEKIT_HOST_DEVICE constexpr index_t cols() const { return cols_; }
  MOEKIT_HOST_DEVICE constexpr index_t ld() const { return ld_; }
  MOEKIT_HOST_DEVICE constexpr index_t size() const { return rows_ * cols_; }
  MOEKIT_HOST_DEVICE constexpr bool empty() const { return rows_ == 0 || cols_ == 0; }
  // Rows follow each other with no gap, so the view is one flat array.
  MOEKIT_HOST_DEVICE constexpr bool is_contiguous() const { return ld_ == cols_ || rows_ <= 1; }

  MOEKIT_HOST_DEVICE constexpr T& operator()(index_t r, index_t c) const {
    return data_[r * ld_ + c];
  }
  MOEKIT_HOST_DEVICE constexpr T* row(index_t r) const { return data_ + r * ld_; }
  MOEKIT_HOST_DEVICE constexpr VectorView<T> row_view(index_t r) const {
    return VectorView<T>(row(r), cols_);
  }

  // The sub-matrix of nr x nc elements whose top-left corner is (r0, c0).
  MOEKIT_HOST_DEVICE constexpr MatrixView block(index_t r0, index_t c0, index_t nr,
                                                index_t nc) const {
    return MatrixView(data_ + r0 * ld_ + c0, nr, nc, ld_);
  }
  // Rows [r0, r0 + nr), all columns.
  MOEKIT_HOST_DEVICE constexpr MatrixView middle_rows(index_t r0, index_t nr) const {
    return block(r0, 0, nr, cols_);
  }

 private:
  T* data_ = nullptr;
  index_t rows_ = 0;
  index_t cols_ = 0;
  index_t ld_ = 0;
};

// Deduction: MatrixView(ptr, rows, cols) keeps the pointer's const-ness.
template <class T>
MatrixView(T*, index_t, index_t) -> MatrixView<T>;
template <class T>
MatrixView(T*, index_t, index_t, index_t) -> MatrixView<T>;
template <class T>
VectorView(T*, index_t) -> VectorView<T>;

// ---- host-side validation -------------------------------------------------

// A well-formed view: non-negative sizes, ld >= cols, and data present unless
// the view is empty. `name` is the argument's name in the caller's API.
template <class T>
void check_view(MatrixView<T> v, const char* name) {
  MOEKIT_CHECK(v.rows() >= 0 && v.cols() >= 0, Errc::kInvalidArgument, name, " has negative size ",
               v.rows(), " x ", v.cols());
  MOEKIT_CHECK(v.ld() >= v.cols() || v.rows() <= 1, Errc::kInvalidArgument, name,
               ".ld() = ", v.ld(), " is smaller than ", name, ".cols() = ", v.cols());
  MOEKIT_CHECK(v.empty() || v.data() != nullptr, Errc::kNullPointer, name, " is null but has ",
               v.rows(), " x ", v.cols(), " elements");
}

template <class T>
void check_view(VectorView<T> v, const char* name) {
  MOEKIT_CHECK(v.size() >= 0, Errc::kInvalidArgument, name, " has negative size ", v.size());
  MOEKIT_CHECK(v.empty() || v.data() != nullptr, Errc::kNullPointer, name, " is null but has ",
               v.size(), " elements");
}

// check_view, plus the exact shape the caller's API requires.
template <class T>
void check_shape(MatrixView<T> v, index_t rows, index_t cols, const char* name) {
  check_view(v, name);
  MOEKIT_CHECK(v.rows() == rows && v.cols() == cols, Errc::kShapeMismatch, name, " is ", v.rows(),
               " x ", v.cols(), ", expected ", rows, " x ", cols);
}

template <class T>
void check_shape(VectorView<T> v, index_t size, const char* name) {
  check_view(v, name);
  MOEKIT_CHECK(v.size() == size, Errc::kShapeMismatch, name, " has ", v.size(),
               " elements, expected ", size);
}

MOEKIT_NAMESPACE_END
