#include <gtest/gtest.h>

#include <numeric>
#include <type_traits>
#include <vector>

#include "moekit/cpu/eigen.hpp"

namespace {

using moekit::EigenRowMatrix;
using moekit::MatrixView;

TEST(Eigen, MapHonoursLeadingDimensionAndWritesThrough) {
  std::vector<float> buffer(4 * 6);
  std::iota(buffer.begin(), buffer.end(), 0.0f);
  MatrixView<float> view(buffer.data(), 3, 5, 6);
  auto map = moekit::as_eigen(view);
  EXPECT_EQ(map.rows(), 3);
  EXPECT_EQ(map.cols(), 5);
  EXPECT_EQ(map(2, 4), 16.0f);
  map.row(1).setConstant(-2.0f);
  EXPECT_EQ(buffer[6], -2.0f);
  EXPECT_EQ(buffer[10], -2.0f);
  EXPECT_EQ(buffer[11], 11.0f);  // padding column untouched
  EXPECT_EQ(buffer[12], 12.0f);
}

TEST(Eigen, ConstViewMapsReadOnly) {
  const std::vector<double> data{1, 2, 3, 4};
  MatrixView<const double> view(data.data(), 2, 2);
  auto map = moekit::as_eigen(view);
  static_assert(std::is_const_v<std::remove_pointer_t<decltype(map.data())>>);
  EXPECT_EQ((map * map).sum(), 7 + 10 + 15 + 22);
}

TEST(Eigen, ViewOfMatrixRoundTrips) {
  EigenRowMatrix<float> m(2, 3);
  m << 1, 2, 3, 4, 5, 6;
  const MatrixView<float> v = moekit::view_of(m);
  EXPECT_EQ(v(1, 0), 4.0f);
  EXPECT_EQ(moekit::as_eigen(v), m);
  moekit::EigenVector<int> vec(3);
  vec << 7, 8, 9;
  EXPECT_EQ(moekit::view_of(vec)[2], 9);
  EXPECT_EQ(moekit::as_eigen(moekit::view_of(vec)).sum(), 24);
}

TEST(Eigen, EmptyViewMapsToEmptyMatrix) {
  const MatrixView<float> empty(nullptr, 0, 4);
  auto map = moekit::as_eigen(empty);
  EXPECT_EQ(map.rows(), 0);
  EXPECT_EQ(map.cols(), 4);
}

}  // namespace
