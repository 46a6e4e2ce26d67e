#pragma once
// One training step of a MoE layer written once for every backend: the
// compile-time proof that code templated on moekit's backend switch
// (moekit/core/backend.hpp) compiles for the CPU and the CUDA layers. The
// CPU reference (cpu_reference_moe_layer.cpp, CpuBackend) and the CUDA test
// (test_moe_layer.cu, CudaBackend<T>) both run their layer through it.
// Eigen-free and CUDA-free.

#include "moekit/core/activation.hpp"
#include "moekit/core/backend.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/view.hpp"
#include "moekit/nn/param_count.hpp"

namespace moekit_test {

// One layer configuration in designated initialisers, written once for both
// backends: their Config types have the same fields in the same order (the
// CPU's extra `threading` last), router noise included.
template <class Config>
Config noisy_layer_config(moekit::index_t d_model, moekit::index_t d_ff,
                          moekit::NoiseConfig noise) {
  return Config{
      .d_model = d_model,
      .d_ff = d_ff,
      .kind = moekit::FfnKind::kGated,
      .activation = moekit::Activation::kSilu,
      .router = {.gating = {.rule = moekit::GatingRule::kSoftmaxTopK, .renormalize = true},
                 .noise = noise,
                 .capacity = {.factor = 1.25, .policy = moekit::DropPolicy::kProbs},
                 .non_finite = moekit::NonFinitePolicy::kSanitize},
      .num_shared = 1,
      .z_coeff = 1e-3f};
}

template <class Backend, moekit::MoeSpecType S, class Layer = moekit::MoeLayer<S, Backend>>
moekit::MoeAuxLosses moe_layer_step(
    const Layer& layer, moekit::MatrixView<const typename Layer::Element> x,
    const typename Layer::Params& params, const typename Layer::State& state,
    moekit::MatrixView<typename Layer::Element> y, typename Layer::Stats* stats,
    moekit::MatrixView<const typename Layer::Element> dy, const typename Layer::Grads& grads,
    moekit::MatrixView<typename Layer::Element> dx, const typename Layer::Workspace& workspace) {
  static_assert(Layer::kExperts == S::num_experts && Layer::kTopK == S::top_k);
  const typename Layer::Config& config = layer.config();
  const moekit::MoeLayerStateRows rows = layer.state_rows(x.rows());
  (void)config;
  (void)rows;
  const moekit::MoeAuxLosses aux = layer.forward(x, params, state, y, stats, workspace);
  layer.backward(dy, x, params, state, dx, grads, workspace);
  return aux;
}

}  // namespace moekit_test
