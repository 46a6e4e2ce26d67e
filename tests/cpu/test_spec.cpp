#include <gtest/gtest.h>

#include <string>

#include "moekit/spec.hpp"
#include "moekit/version.hpp"

namespace {

using moekit::HeadSpec;
using moekit::LoraSpec;
using moekit::MoeSpec;

static_assert(MoeSpec<8, 2>::num_experts == 8 && MoeSpec<8, 2>::top_k == 2);
static_assert(LoraSpec<16>::rank == 16);
static_assert(HeadSpec<100>::num_heads == 100);

// Real models' shapes, including counts that are not powers of two.
static_assert(moekit::MoeSpecType<MoeSpec<1, 1>>);
static_assert(moekit::MoeSpecType<MoeSpec<60, 4>>);    // Qwen1.5-MoE
static_assert(moekit::MoeSpecType<MoeSpec<256, 8>>);   // DeepSeek-V3
static_assert(moekit::MoeSpecType<MoeSpec<384, 22>>);  // K up to 22
static_assert(moekit::MoeSpecType<MoeSpec<512, 512>>);
static_assert(moekit::LoraSpecType<LoraSpec<1>>);
static_assert(moekit::HeadSpecType<HeadSpec<1>>);

// The concepts are structural: a user's own spec type works, and the same
// bounds are enforced on it.
struct UserMoe {
  static constexpr int num_experts = 6;
  static constexpr int top_k = 3;
};
struct BadUserMoe {
  static constexpr int num_experts = 4;
  static constexpr int top_k = 5;
};
struct NotASpec {};
static_assert(moekit::MoeSpecType<UserMoe>);
static_assert(!moekit::MoeSpecType<BadUserMoe>);
static_assert(!moekit::MoeSpecType<NotASpec>);
static_assert(!moekit::MoeSpecType<LoraSpec<8>>);
static_assert(!moekit::LoraSpecType<MoeSpec<8, 2>>);
static_assert(!moekit::HeadSpecType<NotASpec>);

// Constrained class templates: an impossible spec is not even nameable inside
// a requires-expression (tests/compile_fail checks the hard error).
template <int E, int K>
concept ValidMoe = requires {
  typename MoeSpec<E, K>;
};
static_assert(ValidMoe<4, 4>);
static_assert(!ValidMoe<4, 5>);
static_assert(!ValidMoe<0, 0>);
static_assert(!ValidMoe<4, 0>);
template <int R>
concept ValidLora = requires {
  typename LoraSpec<R>;
};
static_assert(!ValidLora<0>);
template <int H>
concept ValidHeads = requires {
  typename HeadSpec<H>;
};
static_assert(!ValidHeads<0>);

TEST(Spec, RuntimeViewOfCompileTimeNumbers) {
  using Spec = MoeSpec<64, 8>;
  EXPECT_EQ(Spec::num_experts, 64);
  EXPECT_EQ(Spec::top_k, 8);
}

TEST(Version, StringMatchesNumbers) {
  const std::string expected = std::to_string(MOEKIT_VERSION_MAJOR) + "." +
                               std::to_string(MOEKIT_VERSION_MINOR) + "." +
                               std::to_string(MOEKIT_VERSION_PATCH);
  EXPECT_EQ(expected, MOEKIT_VERSION_STRING);
  EXPECT_EQ(MOEKIT_VERSION,
            MOEKIT_VERSION_MAJOR * 10000 + MOEKIT_VERSION_MINOR * 100 + MOEKIT_VERSION_PATCH);
}

}  // namespace
