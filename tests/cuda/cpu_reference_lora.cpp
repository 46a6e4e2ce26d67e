// The CPU backend's LoRA results for the CUDA tests (cpu_reference.hpp).
#include <cstddef>

#include "cpu_reference.hpp"
#include "moekit/cpu/lora.hpp"

namespace moekit_test {
namespace {

using moekit::index_t;
using moekit::MatrixView;
using moekit::VectorView;

MatrixView<const float> cview(const std::vector<float>& v, std::int64_t rows, std::int64_t cols) {
  if (v.empty()) return {};
  return {v.data(), rows, cols};
}
MatrixView<float> mview(std::vector<float>& v, std::int64_t rows, std::int64_t cols) {
  if (v.empty()) return {};
  return {v.data(), rows, cols};
}

}  // namespace

template <int R>
LoraResult cpu_lora(const LoraCase& c) {
  using moekit::LoraSpec;
  const index_t n = c.n, N = c.adapters;
  LoraResult r;
  r.y = c.w.empty() ? c.y0 : std::vector<float>(static_cast<std::size_t>(n * c.d_out));
  r.h.resize(static_cast<std::size_t>(n * R));
  r.dx = c.w.empty() ? c.dx0 : std::vector<float>(static_cast<std::size_t>(n * c.d_in));
  r.da = c.accumulate ? c.da0 : std::vector<float>(static_cast<std::size_t>(N * R * c.d_in));
  r.db = c.accumulate ? c.db0 : std::vector<float>(static_cast<std::size_t>(N * c.d_out * R));
  const moekit::LoraStep step{c.training, c.seed, c.step};
  const moekit::cpu::LoraWeights weights{
      cview(c.w, c.d_out, c.d_in),
      c.bias.empty() ? VectorView<const float>() : VectorView<const float>(c.bias.data(), c.d_out),
      cview(c.a, N * R, c.d_in), cview(c.b, N * c.d_out, R)};
  const MatrixView<const float> x = cview(c.x, n, c.d_in), dy = cview(c.dy, n, c.d_out);
  const MatrixView<float> y = mview(r.y, n, c.d_out), h = mview(r.h, n, R);
  const MatrixView<float> dx = mview(r.dx, n, c.d_in);
  const moekit::cpu::LoraGrads grads{mview(r.da, N * R, c.d_in), mview(r.db, N * c.d_out, R),
                                     c.accumulate};
  if (c.ids.empty()) {
    const moekit::cpu::LoraLinear<LoraSpec<R>> lora(
        {c.d_in, c.d_out, c.alpha, c.rslora, c.dropout});
    std::vector<std::byte> ws(static_cast<std::size_t>(lora.workspace_size(n)));
    const VectorView<std::byte> wsv(ws.data(), static_cast<index_t>(ws.size()));
    lora.forward(x, weights, y, h, step, wsv);
    lora.backward(dy, x, weights, h, step, dx, grads, wsv);
    return r;
  }
  const moekit::cpu::LoraBank<LoraSpec<R>> bank({c.d_in, c.d_out, N, c.alpha, c.rslora, c.dropout});
  r.order.resize(static_cast<std::size_t>(n));
  r.offsets.resize(static_cast<std::size_t>(N + 1));
  bank.group({c.ids.data(), n}, {r.order.data(), n}, {r.offsets.data(), N + 1});
  const moekit::cpu::LoraRows rows{
      {c.ids.data(), n}, {r.order.data(), n}, {r.offsets.data(), N + 1}};
  std::vector<std::byte> ws(static_cast<std::size_t>(bank.workspace_size(n)));
  const VectorView<std::byte> wsv(ws.data(), static_cast<index_t>(ws.size()));
  bank.forward(x, rows, weights, y, h, step, wsv);
  bank.backward(dy, x, rows, weights, h, step, dx, grads, wsv);
  return r;
}

template <int R>
std::vector<float> cpu_lora_merge(const LoraCase& c, std::int64_t adapter, float sign) {
  const moekit::cpu::LoraBank<moekit::LoraSpec<R>> bank(
      {c.d_in, c.d_out, c.adapters, c.alpha, c.rslora, c.dropout});
  std::vector<float> w = c.w;
  const MatrixView<float> wv(w.data(), c.d_out, c.d_in);
  const MatrixView<const float> a = cview(c.a, c.adapters * R, c.d_in);
  const MatrixView<const float> b = cview(c.b, c.adapters * c.d_out, R);
  if (sign > 0) {
    bank.merge(adapter, wv, a, b);
  } else {
    bank.unmerge(adapter, wv, a, b);
  }
  return w;
}

template <int R>
std::pair<std::vector<float>, std::vector<float>> cpu_lora_init(std::int64_t adapters,
                                                                std::int64_t d_in,
                                                                std::int64_t d_out,
                                                                std::uint64_t seed) {
  const moekit::cpu::LoraBank<moekit::LoraSpec<R>> bank({d_in, d_out, adapters});
  std::vector<float> a(static_cast<std::size_t>(adapters * R * d_in));
  std::vector<float> b(static_cast<std::size_t>(adapters * d_out * R), 1.0f);
  bank.init(mview(a, adapters * R, d_in), mview(b, adapters * d_out, R), {.seed = seed});
  return {a, b};
}

#define MOEKIT_TEST_DEFINE_LORA(R)                                                     \
  template LoraResult cpu_lora<R>(const LoraCase&);                                    \
  template std::vector<float> cpu_lora_merge<R>(const LoraCase&, std::int64_t, float); \
  template std::pair<std::vector<float>, std::vector<float>> cpu_lora_init<R>(         \
      std::int64_t, std::int64_t, std::int64_t, std::uint64_t);
MOEKIT_TEST_LORA_RANKS(MOEKIT_TEST_DEFINE_LORA)
#undef MOEKIT_TEST_DEFINE_LORA

}  // namespace moekit_test
