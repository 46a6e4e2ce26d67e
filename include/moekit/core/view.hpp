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

#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/types.hpp"

MOEKIT_NAMESPACE_BEGIN

// A view of `size` consecutive elements of T at `data` (caller memory).
template <class T>
class VectorView {
 public:
  using element_type = T;                  // T, const included
  using value_type = std::remove_cv_t<T>;  // T without const

  constexpr VectorView() = default;
  // size elements from data.
  MOEKIT_HOST_DEVICE constexpr VectorView(T* data, index_t size) : data_(data), size_(size) {}

  // VectorView<float> -> VectorView<const float>, never the other way.
  template <class U>
  requires(!std::is_same_v<U, T> && std::is_convertible_v<U (*)[], T (*)[]>) MOEKIT_HOST_DEVICE
      constexpr VectorView(VectorView<U> other)
      : data_(other.data()), size_(other.size()) {}

  // The first element.
  MOEKIT_HOST_DEVICE constexpr T* data() const { return data_; }
  // The number of elements.
  MOEKIT_HOST_DEVICE constexpr index_t size() const { return size_; }
  // Whether there are no elements.
  MOEKIT_HOST_DEVICE constexpr bool empty() const { return size_ == 0; }
  // Element i (unchecked).
  MOEKIT_HOST_DEVICE constexpr T& operator[](index_t i) const { return data_[i]; }
  // Iteration: for (float v : view).
  MOEKIT_HOST_DEVICE constexpr T* begin() const { return data_; }
  // One past the last element.
  MOEKIT_HOST_DEVICE constexpr T* end() const { return data_ + size_; }

  // Elements [offset, offset + count).
  MOEKIT_HOST_DEVICE constexpr VectorView segment(index_t offset, index_t count) const {
    return VectorView(data_ + offset, count);
  }

 private:
  T* data_ = nullptr;
  index_t size_ = 0;
};

// A row-major rows x cols matrix of T at `data` with leading dimension ld:
// element (r, c) at data[r * ld + c] (caller memory).
template <class T>
class MatrixView {
 public:
  using element_type = T;                  // T, const included
  using value_type = std::remove_cv_t<T>;  // T without const

  constexpr MatrixView() = default;
  // Dense rows: ld = cols.
  MOEKIT_HOST_DEVICE constexpr MatrixView(T* data, index_t rows, index_t cols)
      : data_(data), rows_(rows), cols_(cols), ld_(cols) {}
  // Strided rows: row r starts at data + r * ld (ld >= cols).
  MOEKIT_HOST_DEVICE constexpr MatrixView(T* data, index_t rows, index_t cols, index_t ld)
      : data_(data), rows_(rows), cols_(cols), ld_(ld) {}

  // MatrixView<float> -> MatrixView<const float>, never the other way.
  template <class U>
  requires(!std::is_same_v<U, T> && std::is_convertible_v<U (*)[], T (*)[]>) MOEKIT_HOST_DEVICE
      constexpr MatrixView(MatrixView<U> other)
      : data_(other.data()), rows_(other.rows()), cols_(other.cols()), ld_(other.ld()) {}

  // Element (0, 0).
  MOEKIT_HOST_DEVICE constexpr T* data() const { return data_; }
  // The number of rows.
  MOEKIT_HOST_DEVICE constexpr index_t rows() const { return rows_; }
  // The number of columns.
  MOEKIT_HOST_DEVICE constexpr index_t cols() const { return cols_; }
  // The leading dimension: elements from one row's start to the next's.
  MOEKIT_HOST_DEVICE constexpr index_t ld() const { return ld_; }
  // rows x cols.
  MOEKIT_HOST_DEVICE constexpr index_t size() const { return rows_ * cols_; }
  // Whether there are no elements.
  MOEKIT_HOST_DEVICE constexpr bool empty() const { return rows_ == 0 || cols_ == 0; }
  // Rows follow each other with no gap, so the view is one flat array.
  MOEKIT_HOST_DEVICE constexpr bool is_contiguous() const { return ld_ == cols_ || rows_ <= 1; }

  // Element (r, c) (unchecked).
  MOEKIT_HOST_DEVICE constexpr T& operator()(index_t r, index_t c) const {
    return data_[r * ld_ + c];
  }
  // The first element of row r.
  MOEKIT_HOST_DEVICE constexpr T* row(index_t r) const { return data_ + r * ld_; }
  // Row r as a vector of cols elements.
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
// The same with a leading dimension.
template <class T>
MatrixView(T*, index_t, index_t, index_t) -> MatrixView<T>;
// VectorView(ptr, size) likewise.
template <class T>
VectorView(T*, index_t) -> VectorView<T>;

// A view of a std::vector the caller owns (a workspace, a bias, a label
// list): view_of(workspace) where a function takes VectorView<std::byte>.
// Valid until the vector reallocates. moekit/cpu/eigen.hpp adds the Eigen
// overloads.
template <class T, class A>
VectorView<T> view_of(std::vector<T, A>& v) {
  return VectorView<T>(v.data(), static_cast<index_t>(v.size()));
}
// The same, read-only, for a const vector.
template <class T, class A>
VectorView<const T> view_of(const std::vector<T, A>& v) {
  return VectorView<const T>(v.data(), static_cast<index_t>(v.size()));
}

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

// The same for a vector: non-negative size, data present unless empty.
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

// The same for a vector of exactly `size` elements.
template <class T>
void check_shape(VectorView<T> v, index_t size, const char* name) {
  check_view(v, name);
  MOEKIT_CHECK(v.size() == size, Errc::kShapeMismatch, name, " has ", v.size(),
               " elements, expected ", size);
}

// ---- overlap between arguments --------------------------------------------
//
// An entry point that writes outputs while it reads inputs is wrong when an
// output shares memory with an input or another output (MoeLayer::forward
// with y = x gave errors of 0.49 with a shared expert), and nothing in its
// results would show it. Every public entry point that cannot work in place
// lists its arguments in an OverlapCheck and calls check(), after its shape
// checks and before it writes anything; the message names the function and
// both arguments. Inputs may overlap each other (they are only read).
//
// Overlap is a question of addresses, asked exactly: a view covers `rows`
// ranges of cols * sizeof(T) bytes, ld * sizeof(T) apart, so two column
// blocks of one matrix (same ld, disjoint columns) do not overlap, while any
// shared byte does. Host and device pointers alike (one address space).

// The bytes a view covers: `rows` ranges of `width` bytes, `pitch` apart.
struct Footprint {
  std::uintptr_t begin = 0;  // address of the first byte
  std::uintptr_t width = 0;  // bytes per row; 0: the view is empty
  std::uintptr_t pitch = 0;  // bytes from one row's start to the next's
  std::uintptr_t rows = 0;   // rows
  const char* name = "";     // the argument's name in messages

  Footprint() = default;
  // The bytes of matrix view v, argument `arg`.
  template <class T>
  Footprint(MatrixView<T> v, const char* arg)
      : begin(reinterpret_cast<std::uintptr_t>(v.data())),
        width(v.empty() || v.data() == nullptr ? 0
                                               : static_cast<std::uintptr_t>(v.cols()) * sizeof(T)),
        pitch(static_cast<std::uintptr_t>(v.ld()) * sizeof(T)),
        rows(static_cast<std::uintptr_t>(v.rows())),
        name(arg) {}
  // The bytes of vector view v.
  template <class T>
  Footprint(VectorView<T> v, const char* arg)
      : Footprint(MatrixView<T>(v.data(), v.empty() ? 0 : 1, v.size()), arg) {}
  // `count` elements at p (a device scalar, a raw array).
  template <class T>
  Footprint(T* p, index_t count, const char* arg) : Footprint(VectorView<T>(p, count), arg) {}

  // Whether it covers no byte.
  bool empty() const { return width == 0 || rows == 0; }
  // One range covers every byte: a single row, or rows with no gap.
  bool solid() const { return rows == 1 || pitch == width; }
  // One past its last byte.
  std::uintptr_t end() const { return begin + (rows - 1) * pitch + width; }
};

namespace detail {

// Whether a row of s meets [lo, hi) (s not empty; lo < hi).
inline bool rows_meet(const Footprint& s, std::uintptr_t lo, std::uintptr_t hi) {
  if (hi <= s.begin || lo >= s.end()) return false;
  if (s.solid()) return true;
  // Row k meets [lo, hi) iff begin + k pitch < hi and lo < begin + k pitch + width.
  const std::uintptr_t first =
      lo + 1 > s.begin + s.width  // the first k with k pitch > lo - begin - width
          ? (lo - s.begin - s.width) / s.pitch + 1
          : 0;
  const std::uintptr_t last = (hi - 1 - s.begin) / s.pitch;  // the last k with k pitch < hi - begin
  return first <= last && first < s.rows;
}

}  // namespace detail

// Whether two footprints share a byte (exact; O(1) unless both are strided
// with different pitches and their spans intersect: then O(rows)).
inline bool overlap(const Footprint& a, const Footprint& b) {
  if (a.empty() || b.empty()) return false;
  if (a.end() <= b.begin || b.end() <= a.begin) return false;
  if (a.solid()) return detail::rows_meet(b, a.begin, a.end());
  if (b.solid()) return detail::rows_meet(a, b.begin, b.end());
  if (a.pitch == b.pitch) {
    // b's row j starts r bytes into a's row q + j; it meets that row when
    // r < a.width and the next one when it runs past the pitch.
    const Footprint& lo = a.begin <= b.begin ? a : b;
    const Footprint& hi = a.begin <= b.begin ? b : a;
    const std::uintptr_t q = (hi.begin - lo.begin) / lo.pitch, r = (hi.begin - lo.begin) % lo.pitch;
    return (r < lo.width && q < lo.rows) || (r + hi.width > lo.pitch && q + 1 < lo.rows);
  }
  const Footprint& few = a.rows <= b.rows ? a : b;
  const Footprint& many = a.rows <= b.rows ? b : a;
  for (std::uintptr_t k = 0; k < few.rows; ++k) {
    const std::uintptr_t row = few.begin + k * few.pitch;
    if (detail::rows_meet(many, row, row + few.width)) return true;
  }
  return false;
}

// An argument list for OverlapCheck::out / in. Code that nvcc compiles
// spells the type, out(Footprints{{y, "y"}}): nvcc's front end wraps a bare
// braced list in a dependent call in parentheses, which the host compiler
// then rejects.
using Footprints = std::initializer_list<Footprint>;

// The arguments of one call of a public entry point: outputs (written, or
// read and written) and inputs (only read). check() fails with
// kInvalidArgument, naming `where` (the public function, e.g.
// "cpu::MoeLayer::forward") and both arguments, when an output overlaps
// another output or an input. No allocation: at most kMax arguments.
class OverlapCheck {
 public:
  static constexpr int kMax = 48;  // arguments per call, at most

  // The check of one call of public function `where`.
  explicit OverlapCheck(const char* where) : where_(where) {}

  // out({{y, "y"}, {grads.dx, "grads.dx"}}), in({{x, "x"}}); empty views count for nothing.
  OverlapCheck& out(Footprints args) { return add(args, true); }
  // Inputs (only read); see out().
  OverlapCheck& in(Footprints args) { return add(args, false); }

  // Fails (kInvalidArgument) if an output overlaps another argument.
  void check() const {
    for (int i = 0; i < n_; ++i) {
      if (!is_out_[i]) continue;
      for (int j = 0; j < n_; ++j) {
        if (j == i || (is_out_[j] && j < i) || !overlap(args_[i], args_[j])) continue;
        fail(where_, args_[i].name, args_[j].name, is_out_[j]);
      }
    }
  }

  // The failure check() reports, for callers that test pairs themselves
  // (a run-time number of arguments): `out` overlaps `other`.
  [[noreturn]] static void fail(const char* where, const std::string& out, const std::string& other,
                                bool other_is_out) {
    detail::fail(Errc::kInvalidArgument, where,
                 detail::concat(out, " overlaps ", other,
                                other_is_out ? " (two outputs must not share memory)"
                                             : " (an output must not share memory with an input)"));
  }

 private:
  OverlapCheck& add(std::initializer_list<Footprint> args, bool is_out) {
    for (const Footprint& f : args) {
      if (f.empty()) continue;
      MOEKIT_CHECK(n_ < kMax, Errc::kInvalidArgument, where_, ": more than ", kMax, " arguments");
      args_[n_] = f;
      is_out_[n_] = is_out;
      ++n_;
    }
    return *this;
  }

  const char* where_;
  Footprint args_[kMax];
  bool is_out_[kMax] = {};
  int n_ = 0;
};

MOEKIT_NAMESPACE_END
