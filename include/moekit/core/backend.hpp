#pragma once
// The backend switch: user code picks the CPU (Eigen) or CUDA backend of a
// composed layer with one template argument, and the types both backends'
// layers share. Eigen-free and CUDA-free, so it is safe in any translation unit.
//
//   moekit::CpuBackend                 moekit/nn/moe_layer.hpp   (cpu::MoeLayer<S>)
//   moekit::CudaBackend<T>             moekit/cuda/moe_layer.cuh (gpu::MoeLayer<S, T>,
//                                      T = float, __nv_bfloat16 or __half)
//
//   template <class Backend>
//   void step(const moekit::MoeLayer<Spec, Backend>& layer, ...) {
//     using Layer = moekit::MoeLayer<Spec, Backend>;
//     typename Layer::Params params = ...;   // Config, Params, Grads, State, Stats,
//     ...                                    // Workspace, Element: per backend
//     moekit::MoeAuxLosses aux = layer.forward(x, params, state, y, &stats, workspace);
//     layer.backward(dy, x, params, state, grads, dx, workspace);
//   }
//
// Both layers have the same member names, argument order and math; what
// differs is the memory model (host or device views, what Workspace holds),
// listed at the top of moekit/cuda/moe_layer.cuh.

#include "moekit/core/config.hpp"
#include "moekit/core/types.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN

// The aux losses of a forward, unscaled (each 0 when its coefficient is 0).
struct MoeAuxLosses {
  double switch_loss = 0.0;
  double z_loss = 0.0;
  double total = 0.0;  // switch_coeff * switch_loss + z_coeff * z_loss
};

// Minimum rows of a MoE layer's state buffers for a capacity of T tokens.
struct MoeLayerStateRows {
  index_t tokens = 0;       // routing rows
  index_t routed_rows = 0;  // buffer, expert_out, saved_pre, saved_gate
  index_t shared_rows = 0;  // shared_pre, shared_gate
};

// The MoE layer of a backend: cpu::MoeLayer<S> for CpuBackend,
// gpu::MoeLayer<S, T> for CudaBackend<T>.
template <MoeSpecType S, class Backend>
using MoeLayer = typename Backend::template MoeLayer<S>;

MOEKIT_NAMESPACE_END
