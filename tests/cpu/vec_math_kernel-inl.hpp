// The vector math functions of moekit/cpu/vec_math.hpp and the activations
// of moekit/cpu/elementwise.hpp over an array, included into every ISA
// namespace of the tests (no include guard, on purpose: see
// moekit/cpu/vec.hpp). The tail goes through partial loads, as in the passes.

template <class Fn>
MOEKIT_KERNEL_TARGET inline void map_math(const float* x, float* y, index_t n, Fn fn) {
  index_t i = 0;
  for (; i + kF32x16Lanes <= n; i += kF32x16Lanes) store(y + i, fn(load(x + i)));
  if (i < n) {
    const int w = static_cast<int>(n - i);
    store_partial(y + i, fn(load_partial(x + i, w)), w);
  }
}

// What eval_math computes; each case is a function object with a target, so
// that the vector operations inline into it.
#define MOEKIT_TEST_MATH_CASE(Name, expr)                                                         \
  struct Name {                                                                                   \
    MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET F32x16 operator()(F32x16 v) const { return (expr); } \
  };
MOEKIT_TEST_MATH_CASE(ExpCase, exp(v))
MOEKIT_TEST_MATH_CASE(LogCase, log(v))
MOEKIT_TEST_MATH_CASE(SigmoidCase, sigmoid(v))
MOEKIT_TEST_MATH_CASE(SiluCase, (activation_pair<Activation::kSilu>(v, true, false).f))
MOEKIT_TEST_MATH_CASE(SiluGradCase, (activation_pair<Activation::kSilu>(v, false, true).df))
MOEKIT_TEST_MATH_CASE(GeluTanhCase, (activation_pair<Activation::kGeluTanh>(v, true, false).f))
MOEKIT_TEST_MATH_CASE(GeluTanhGradCase, (activation_pair<Activation::kGeluTanh>(v, false, true).df))
MOEKIT_TEST_MATH_CASE(GeluErfCase, (activation_pair<Activation::kGeluErf>(v, true, false).f))
MOEKIT_TEST_MATH_CASE(GeluErfGradCase, (activation_pair<Activation::kGeluErf>(v, false, true).df))
MOEKIT_TEST_MATH_CASE(ReluCase, (activation_pair<Activation::kRelu>(v, true, false).f))
MOEKIT_TEST_MATH_CASE(ReluGradCase, (activation_pair<Activation::kRelu>(v, false, true).df))
#undef MOEKIT_TEST_MATH_CASE

// y = fn(x) for the function numbered `fn` (MathFn in vec_math_reference.hpp).
inline void eval_math(int fn, const float* x, float* y, index_t n) {
  switch (fn) {
    case 0:
      return map_math(x, y, n, ExpCase{});
    case 1:
      return map_math(x, y, n, LogCase{});
    case 2:
      return map_math(x, y, n, SigmoidCase{});
    case 3:
      return map_math(x, y, n, SiluCase{});
    case 4:
      return map_math(x, y, n, SiluGradCase{});
    case 5:
      return map_math(x, y, n, GeluTanhCase{});
    case 6:
      return map_math(x, y, n, GeluTanhGradCase{});
    case 7:
      return map_math(x, y, n, GeluErfCase{});
    case 8:
      return map_math(x, y, n, GeluErfGradCase{});
    case 9:
      return map_math(x, y, n, ReluCase{});
    default:
      return map_math(x, y, n, ReluGradCase{});
  }
}
