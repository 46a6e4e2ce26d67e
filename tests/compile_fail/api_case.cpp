// Calls that must not compile, built once per MOEKIT_API_CASE by
// tests/compile_fail/CMakeLists.txt. Case 0 is the control (the calls as
// documented) and must compile; every other case must not.
#include <cstddef>

#include "moekit/nn/moe_layer.hpp"

using Layer = moekit::cpu::MoeLayer<moekit::MoeSpec<8, 2>>;

void moekit_api_case(const Layer& layer, moekit::MatrixView<const float> x,
                     const moekit::cpu::MoeLayerParams& params,
                     const moekit::cpu::MoeLayerState& state, moekit::MatrixView<float> y,
                     moekit::MatrixView<float> dx, const moekit::cpu::MoeLayerGrads& grads,
                     moekit::VectorView<std::byte> workspace) {
#if MOEKIT_API_CASE == 0
  layer.forward(x, params, state, y, nullptr, workspace);
  layer.backward(x, x, params, state, dx, grads, workspace);
  layer.backward(x, x, params, state, {}, grads, workspace);
#elif MOEKIT_API_CASE == 1
  // The order before dx moved first: grads, then dx (or {} for no dx).
  layer.backward(x, x, params, state, grads, dx, workspace);
  layer.backward(x, x, params, state, grads, {}, workspace);
#elif MOEKIT_API_CASE == 2
  // The workspace is required: no default (backward likewise).
  layer.forward(x, params, state, y, nullptr);
  layer.backward(x, x, params, state, dx, grads);
#endif
  static_cast<void>(layer), static_cast<void>(x), static_cast<void>(params);
  static_cast<void>(state), static_cast<void>(y), static_cast<void>(dx);
  static_cast<void>(grads), static_cast<void>(workspace);
}
