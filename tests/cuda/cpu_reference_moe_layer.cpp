// The CPU backend's MoE layer results for the CUDA tests (cpu_reference.hpp):
// cpu::MoeLayer run through the backend-generic moe_layer_step, which also
// proves that step compiles for CpuBackend.
#include <cstddef>

#include "cpu_reference.hpp"
#include "moe_layer_step.hpp"
#include "moekit/nn/moe_layer.hpp"

namespace moekit_test {
namespace {

using moekit::index_t;
using moekit::MatrixView;
using moekit::VectorView;

// An empty vector of a non-empty shape is an absent (frozen) view; a 0-row
// shape keeps its columns (T = 0).
MatrixView<const float> cview(const std::vector<float>& v, index_t rows, index_t cols) {
  if (v.empty() && rows * cols > 0) return {};
  return {v.data(), rows, cols};
}
MatrixView<float> mview(std::vector<float>& v, index_t rows, index_t cols) {
  if (v.empty() && rows * cols > 0) return {};
  return {v.data(), rows, cols};
}
VectorView<const float> cvec(const std::vector<float>& v) {
  return {v.data(), static_cast<index_t>(v.size())};
}

}  // namespace

// The designated initialiser of moe_layer_step.hpp compiles for the CPU config
// (test_moe_layer.cu instantiates it for the GPU's).
[[maybe_unused]] constexpr auto kNoisyConfig = &noisy_layer_config<moekit::cpu::MoeLayerConfig>;

template <int E, int K>
MoeLayerResult cpu_moe_layer(const MoeLayerCase& c) {
  using S = moekit::MoeSpec<E, K>;
  namespace cpu = moekit::cpu;
  const auto config = layer_config<cpu::MoeLayerConfig>(c);
  const moekit::MoeLayer<S, moekit::CpuBackend> layer(config);
  cpu::MoeLayerStorage<S> storage(layer, c.tokens);

  const index_t t = c.tokens, d = c.d, f = c.f, fs = layer.d_ff_shared(), n = c.num_shared;
  const cpu::MoeLayerParams params{
      cview(c.w_gate, E, d),
      cvec(c.gate_bias),
      cvec(c.selection_bias),
      {cview(c.w1, E * f, d), cview(c.w3, E * f, d), cview(c.w2, E * d, f)},
      {cview(c.shared_w1, n * fs, d), cview(c.shared_w3, n * fs, d),
       cview(c.shared_w2, n * d, fs)}};
  MoeLayerResult r;
  r.y.assign(static_cast<std::size_t>(t * d), 0.0f);
  r.grads = c.grads;
  MoeLayerGradValues& g = r.grads;
  const cpu::MoeLayerGrads grads{mview(g.dw_gate, E, d),
                                 {g.dgate_bias.data(), static_cast<index_t>(g.dgate_bias.size())},
                                 mview(g.dw1, E * f, d),
                                 mview(g.dw3, E * f, d),
                                 mview(g.dw2, E * d, f),
                                 mview(g.shared_dw1, n * fs, d),
                                 mview(g.shared_dw3, n * fs, d),
                                 mview(g.shared_dw2, n * d, fs),
                                 c.accumulate};
  cpu::RoutingStats<S> stats;
  const moekit::MoeAuxLosses aux = moe_layer_step<moekit::CpuBackend, S>(
      layer, cview(c.x, t, d), params, storage.state(), mview(r.y, t, d), &stats, cview(c.dy, t, d),
      grads, mview(g.dx, t, d), storage.workspace());
  r.switch_loss = aux.switch_loss;
  r.z_loss = aux.z_loss;
  r.total = aux.total;
  const cpu::Routing& routing = storage.state().routing;
  for (index_t i = 0; i < t; ++i) {
    for (int k = 0; k < K; ++k) {
      r.ids.push_back(routing.expert_ids(i, k));
      r.positions.push_back(routing.positions(i, k));
      r.weights.push_back(routing.weights(i, k));
    }
  }
  for (int e = 0; e <= E; ++e) r.offsets.push_back(storage.state().offsets[e]);
  r.dropped = stats.dropped;
  return r;
}

#define MOEKIT_TEST_DEFINE_MOE_LAYER(E, K) \
  template MoeLayerResult cpu_moe_layer<E, K>(const MoeLayerCase&);
MOEKIT_TEST_MOE_LAYER_SPECS(MOEKIT_TEST_DEFINE_MOE_LAYER)

}  // namespace moekit_test
