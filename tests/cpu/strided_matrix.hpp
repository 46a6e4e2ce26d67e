#pragma once
// A float matrix with padded rows (ld = cols + pad) for tests: the padding
// holds kPad and must survive every call, and poison() fills the elements
// with NaN so an element a call should write but does not shows up.

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "moekit/core/view.hpp"

namespace moekit_test {

inline constexpr float kPad = 4321.0f;
inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct StridedMatrix {
  moekit::index_t rows = 0, cols = 0, ld = 0;
  std::vector<float> data;

  StridedMatrix() = default;
  StridedMatrix(moekit::index_t r, moekit::index_t c, moekit::index_t pad = 3)
      : rows(r), cols(c), ld(c + pad), data(static_cast<std::size_t>(r * ld), kPad) {}

  float& at(moekit::index_t r, moekit::index_t c) {
    return data[static_cast<std::size_t>(r * ld + c)];
  }
  float at(moekit::index_t r, moekit::index_t c) const {
    return data[static_cast<std::size_t>(r * ld + c)];
  }
  moekit::MatrixView<float> view() { return {data.data(), rows, cols, ld}; }
  moekit::MatrixView<const float> cview() const { return {data.data(), rows, cols, ld}; }

  void fill(float v) {
    for (moekit::index_t r = 0; r < rows; ++r)
      for (moekit::index_t c = 0; c < cols; ++c) at(r, c) = v;
  }
  void poison() { fill(kNaN); }
  void randomize(std::mt19937& rng, float scale = 1.0f) {
    std::normal_distribution<float> normal(0.0f, scale);
    for (moekit::index_t r = 0; r < rows; ++r)
      for (moekit::index_t c = 0; c < cols; ++c) at(r, c) = normal(rng);
  }
  std::vector<double> values() const {
    std::vector<double> v;
    for (moekit::index_t r = 0; r < rows; ++r)
      for (moekit::index_t c = 0; c < cols; ++c) v.push_back(at(r, c));
    return v;
  }
  bool any_nan() const {
    for (moekit::index_t r = 0; r < rows; ++r)
      for (moekit::index_t c = 0; c < cols; ++c)
        if (std::isnan(at(r, c))) return true;
    return false;
  }
  bool padding_untouched() const {
    for (moekit::index_t r = 0; r < rows; ++r)
      for (moekit::index_t c = cols; c < ld; ++c)
        if (at(r, c) != kPad) return false;
    return true;
  }
  bool bits_equal(const StridedMatrix& o) const {
    return data.size() == o.data.size() &&
           (data.empty() ||  // memcmp must not see the null pointer of an empty vector
            std::memcmp(data.data(), o.data.data(), data.size() * sizeof(float)) == 0);
  }
};

}  // namespace moekit_test
