#include <gtest/gtest.h>

#include <numeric>
#include <type_traits>
#include <vector>

#include "moekit/core/view.hpp"

namespace {

using moekit::Errc;
using moekit::Error;
using moekit::index_t;
using moekit::MatrixView;
using moekit::VectorView;

static_assert(std::is_trivially_copyable_v<MatrixView<float>>);
static_assert(std::is_convertible_v<MatrixView<float>, MatrixView<const float>>);
static_assert(!std::is_convertible_v<MatrixView<const float>, MatrixView<float>>);
static_assert(std::is_convertible_v<VectorView<int>, VectorView<const int>>);
static_assert(!std::is_convertible_v<VectorView<const int>, VectorView<int>>);
static_assert(!std::is_convertible_v<MatrixView<int>, MatrixView<float>>);

// A 4 x 6 buffer, values 0..23, viewed as 3 x 5 with ld = 6.
struct Strided : ::testing::Test {
  std::vector<float> buffer = std::vector<float>(24);
  MatrixView<float> view{buffer.data(), 3, 5, 6};
  void SetUp() override { std::iota(buffer.begin(), buffer.end(), 0.0f); }
};

TEST_F(Strided, IndexesRowMajorWithLeadingDimension) {
  EXPECT_EQ(view.rows(), 3);
  EXPECT_EQ(view.cols(), 5);
  EXPECT_EQ(view.ld(), 6);
  EXPECT_EQ(view.size(), 15);
  EXPECT_FALSE(view.is_contiguous());
  for (index_t r = 0; r < 3; ++r) {
    for (index_t c = 0; c < 5; ++c) EXPECT_EQ(view(r, c), static_cast<float>(r * 6 + c));
  }
  EXPECT_EQ(view.row(2), buffer.data() + 12);
  view(1, 2) = -1.0f;
  EXPECT_EQ(buffer[8], -1.0f);
}

TEST_F(Strided, BlocksAndRowsShareTheBuffer) {
  const MatrixView<float> b = view.block(1, 2, 2, 3);
  EXPECT_EQ(b.rows(), 2);
  EXPECT_EQ(b.cols(), 3);
  EXPECT_EQ(b.ld(), 6);
  EXPECT_EQ(b(0, 0), 8.0f);
  EXPECT_EQ(b(1, 2), 16.0f);
  const MatrixView<float> rows = view.middle_rows(1, 2);
  EXPECT_EQ(rows(0, 4), 10.0f);
  const VectorView<float> row = view.row_view(2);
  EXPECT_EQ(row.size(), 5);
  EXPECT_EQ(row[4], 16.0f);
  EXPECT_EQ(row.segment(1, 2)[1], 14.0f);
  float sum = 0;
  for (float v : row) sum += v;
  EXPECT_EQ(sum, 12.0f + 13 + 14 + 15 + 16);
}

TEST(View, DenseConstructorAndConstConversion) {
  std::vector<int> data(6, 7);
  MatrixView<int> m(data.data(), 2, 3);
  EXPECT_EQ(m.ld(), 3);
  EXPECT_TRUE(m.is_contiguous());
  const MatrixView<const int> c = m;
  EXPECT_EQ(c.data(), data.data());
  EXPECT_EQ(c(1, 2), 7);
  MatrixView deduced(static_cast<const int*>(data.data()), 3, 2);
  static_assert(std::is_same_v<decltype(deduced), MatrixView<const int>>);
}

TEST(View, DefaultViewIsEmpty) {
  const MatrixView<float> m;
  EXPECT_TRUE(m.empty());
  EXPECT_NO_THROW(moekit::check_view(m, "m"));
  EXPECT_NO_THROW(moekit::check_shape(m, 0, 0, "m"));
}

// view_of(std::vector) views the whole vector; a const vector gives a
// read-only view.
TEST(View, ViewOfVector) {
  std::vector<std::byte> workspace(40);
  const VectorView<std::byte> ws = moekit::view_of(workspace);
  EXPECT_EQ(ws.data(), workspace.data());
  EXPECT_EQ(ws.size(), 40);
  const std::vector<float> bias = {1.0f, 2.0f, 3.0f};
  const auto b = moekit::view_of(bias);
  static_assert(std::is_same_v<decltype(b), const VectorView<const float>>);
  EXPECT_EQ(b.size(), 3);
  EXPECT_EQ(b[2], 3.0f);
  std::vector<int> empty;
  EXPECT_TRUE(moekit::view_of(empty).empty());
}

TEST(ViewCheck, RejectsNullDataWithElements) {
  const MatrixView<float> m(nullptr, 2, 3);
  try {
    moekit::check_view(m, "x");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kNullPointer);
    EXPECT_STREQ(e.what(), "moekit::check_view: x is null but has 2 x 3 elements");
  }
  // Null with zero rows is a valid empty batch (T = 0).
  EXPECT_NO_THROW(moekit::check_view(MatrixView<float>(nullptr, 0, 3), "x"));
}

TEST(ViewCheck, RejectsNegativeSizesAndShortLeadingDimension) {
  float f = 0;
  EXPECT_THROW(moekit::check_view(MatrixView<float>(&f, -1, 3), "x"), Error);
  EXPECT_THROW(moekit::check_view(MatrixView<float>(&f, 2, 3, 2), "x"), Error);
  // One row never steps by ld, so any ld is fine.
  EXPECT_NO_THROW(moekit::check_view(MatrixView<float>(&f, 1, 3, 0), "x"));
  EXPECT_THROW(moekit::check_view(VectorView<float>(nullptr, 4), "bias"), Error);
  EXPECT_THROW(moekit::check_view(VectorView<float>(&f, -4), "bias"), Error);
}

TEST(ViewCheck, ShapeMismatchNamesBothShapes) {
  std::vector<float> data(12);
  const MatrixView<float> m(data.data(), 3, 4);
  EXPECT_NO_THROW(moekit::check_shape(m, 3, 4, "w"));
  try {
    moekit::check_shape(m, 4, 3, "w");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kShapeMismatch);
    EXPECT_STREQ(e.what(), "moekit::check_shape: w is 3 x 4, expected 4 x 3");
  }
  EXPECT_THROW(moekit::check_shape(VectorView<float>(data.data(), 12), 11, "b"), Error);
}

}  // namespace
