// Compiled once per MOEKIT_CASE by tests/compile_fail/CMakeLists.txt.
// Case 0 is the control and must compile; every other case must not.
#include "moekit/spec.hpp"

#if MOEKIT_CASE == 0
using Ok = moekit::MoeSpec<4, 4>;
static_assert(moekit::MoeSpecType<Ok>);
#elif MOEKIT_CASE == 1
using Bad = moekit::MoeSpec<4, 5>;
#elif MOEKIT_CASE == 2
using Bad = moekit::MoeSpec<0, 1>;
#elif MOEKIT_CASE == 3
using Bad = moekit::MoeSpec<8, 0>;
#elif MOEKIT_CASE == 4
using Bad = moekit::LoraSpec<0>;
#elif MOEKIT_CASE == 5
using Bad = moekit::HeadSpec<0>;
#elif MOEKIT_CASE == 6
// A component constrained on MoeSpecType refuses a hand-written spec too.
struct UserSpec {
  static constexpr int num_experts = 4;
  static constexpr int top_k = 5;
};
template <moekit::MoeSpecType S>
struct Component {};
Component<UserSpec> bad;
#endif

int moekit_compile_fail_anchor = 0;
