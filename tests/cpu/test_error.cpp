#include <gtest/gtest.h>

#include <cstddef>
#include <string>

#include "expect_error.hpp"
#include "moekit/core/error.hpp"

namespace {

using moekit::Errc;
using moekit::Error;

// Runs `f`, expects a moekit::Error with `code`, returns its message.

void require_same_width(int x_cols, int w_cols) { MOEKIT_CHECK_SHAPE(x_cols, w_cols); }

TEST(Error, ShapeCheckNamesFunctionArgumentsAndValues) {
  const std::string msg =
      moekit_test::expect_error([] { require_same_width(5, 7); }, Errc::kShapeMismatch);
  EXPECT_EQ(msg,
            "moekit::require_same_width: expected x_cols == w_cols, got x_cols = 5, w_cols = 7");
}

TEST(Error, PassingChecksDoNothing) {
  EXPECT_NO_THROW(require_same_width(3, 3));
  EXPECT_NO_THROW(MOEKIT_CHECK_LE(2, 2));
  EXPECT_NO_THROW(MOEKIT_CHECK_RANGE(0, 0, 1));
}

TEST(Error, RelationalChecks) {
  const int k = 5;
  const int num_experts = 4;
  const std::string msg =
      moekit_test::expect_error([&] { MOEKIT_CHECK_LE(k, num_experts); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("expected k <= num_experts, got k = 5, num_experts = 4"), std::string::npos)
      << msg;
  moekit_test::expect_error([] { MOEKIT_CHECK_LT(3, 3); }, Errc::kInvalidArgument);
  moekit_test::expect_error([] { MOEKIT_CHECK_GT(3, 3); }, Errc::kInvalidArgument);
  moekit_test::expect_error([] { MOEKIT_CHECK_GE(2, 3); }, Errc::kInvalidArgument);
  moekit_test::expect_error([] { MOEKIT_CHECK_NE(2, 2); }, Errc::kInvalidArgument);
  moekit_test::expect_error([] { MOEKIT_CHECK_EQ(1.5, 2.5); }, Errc::kInvalidArgument);
}

TEST(Error, SignedUnsignedComparisonsAreExact) {
  // A plain `-1 < size_t{3}` is false; the checks compare values, not bits.
  const int negative = -1;
  const std::size_t size = 3;
  EXPECT_NO_THROW(MOEKIT_CHECK_LT(negative, size));
  moekit_test::expect_error([&] { MOEKIT_CHECK_GE(negative, size); }, Errc::kInvalidArgument);
  moekit_test::expect_error([&] { MOEKIT_CHECK_RANGE(negative, 0, size); }, Errc::kOutOfRange);
}

TEST(Error, RangeCheckShowsValueAndBounds) {
  const int expert_id = 9;
  const std::string msg =
      moekit_test::expect_error([&] { MOEKIT_CHECK_RANGE(expert_id, 0, 8); }, Errc::kOutOfRange);
  EXPECT_NE(msg.find("expert_id = 9 is outside [0, 8)"), std::string::npos) << msg;
}

TEST(Error, SmallIntegersPrintAsNumbers) {
  const signed char id = 65;  // would print as 'A'
  const std::string msg =
      moekit_test::expect_error([&] { MOEKIT_CHECK_LT(id, 10); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("id = 65"), std::string::npos) << msg;
}

TEST(Error, NullCheck) {
  const float* weights = nullptr;
  const std::string msg =
      moekit_test::expect_error([&] { MOEKIT_CHECK_NOT_NULL(weights); }, Errc::kNullPointer);
  EXPECT_NE(msg.find("weights is null"), std::string::npos) << msg;
}

TEST(Error, FreeFormCheckAndCodeNames) {
  const std::string msg = moekit_test::expect_error(
      [] { MOEKIT_CHECK(false, Errc::kNonFinite, "logit ", 3, " is NaN"); }, Errc::kNonFinite);
  EXPECT_NE(msg.find("logit 3 is NaN"), std::string::npos) << msg;
  EXPECT_STREQ(moekit::errc_name(Errc::kShapeMismatch), "shape mismatch");
  EXPECT_STREQ(moekit::errc_name(Errc::kCudaError), "CUDA error");
}

TEST(Error, ConditionIsEvaluatedOnce) {
  int calls = 0;
  auto next = [&] { return ++calls; };
  EXPECT_NO_THROW(MOEKIT_CHECK_EQ(next(), 1));
  EXPECT_EQ(calls, 1);
}

}  // namespace
