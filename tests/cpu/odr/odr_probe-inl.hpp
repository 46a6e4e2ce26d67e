// The body of one probe (odr_probe.hpp), included once per TU with
// ODR_PROBE_NAME set. No include guard, on purpose.

#include <cstdint>
#include <vector>

#include "moekit/cpu/elementwise.hpp"
#include "moekit/cpu/lora.hpp"
#include "odr_probe.hpp"

namespace odr_test {

namespace {

// Deterministic inputs without <random>'s distributions: values in (-2, 2).
std::vector<float> inputs(std::size_t n, std::uint32_t seed) {
  std::vector<float> v(n);
  std::uint32_t s = seed * 2654435761u + 12345u;
  for (float& x : v) {
    s = s * 1664525u + 1013904223u;
    x = static_cast<float>(static_cast<int>(s >> 8) - (1 << 23)) * 0x1p-22f;
  }
  return v;
}

const char* target_flags() {
#if defined(__AVX512F__)
  return "avx512f";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2 fma";
#else
  return "baseline";
#endif
}

}  // namespace

ProbeResult ODR_PROBE_NAME() {
  using moekit::index_t;
  using moekit::MatrixView;
  using S = moekit::LoraSpec<8>;
  ProbeResult out;
  out.flags = target_flags();
  out.panel_floats = moekit::cpu::detail::panel_floats<8>(1000);

  // Workspace sizes of LoraBank (panel layout), the d = 1024 among them.
  for (index_t d : {index_t{7}, index_t{1000}, index_t{1024}, index_t{4099}}) {
    const moekit::cpu::LoraBank<S> bank({.d_in = d, .d_out = d / 2 + 1, .num_adapters = 3});
    out.workspace_sizes.push_back(bank.workspace_size(64));
  }

  // A bank forward and backward on rows of three adapters (and none).
  const index_t n = 37, d_in = 203, d_out = 61, adapters = 3;
  const moekit::cpu::LoraBank<S> bank(
      {.d_in = d_in, .d_out = d_out, .num_adapters = adapters, .alpha = 4.0f});
  const std::vector<float> x = inputs(static_cast<std::size_t>(n * d_in), 1);
  const std::vector<float> a = inputs(static_cast<std::size_t>(adapters * 8 * d_in), 2);
  const std::vector<float> b = inputs(static_cast<std::size_t>(adapters * d_out * 8), 3);
  const std::vector<float> dy = inputs(static_cast<std::size_t>(n * d_out), 4);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n));
  for (index_t t = 0; t < n; ++t)
    ids[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t % 4) - 1;
  std::vector<index_t> order(static_cast<std::size_t>(n)),
      offsets(static_cast<std::size_t>(adapters + 1));
  bank.group({ids.data(), n}, {order.data(), n}, {offsets.data(), adapters + 1});
  const moekit::LoraRows rows{{ids.data(), n}, {order.data(), n}, {offsets.data(), adapters + 1}};
  const moekit::cpu::LoraWeights weights{
      .a = MatrixView<const float>(a.data(), adapters * 8, d_in),
      .b = MatrixView<const float>(b.data(), adapters * d_out, 8)};
  std::vector<float> y(static_cast<std::size_t>(n * d_out), 0.0f),
      h(static_cast<std::size_t>(n * 8));
  std::vector<std::byte> ws(static_cast<std::size_t>(bank.workspace_size(n)));
  const moekit::VectorView<std::byte> ws_view(ws.data(), static_cast<index_t>(ws.size()));
  bank.forward(MatrixView<const float>(x.data(), n, d_in), rows, weights,
               MatrixView<float>(y.data(), n, d_out), MatrixView<float>(h.data(), n, 8), {},
               ws_view);
  std::vector<float> dx(static_cast<std::size_t>(n * d_in), 0.0f), da(a.size()), db(b.size());
  bank.backward(MatrixView<const float>(dy.data(), n, d_out),
                MatrixView<const float>(x.data(), n, d_in), rows, weights,
                MatrixView<const float>(h.data(), n, 8), {}, MatrixView<float>(dx.data(), n, d_in),
                {.da = MatrixView<float>(da.data(), adapters * 8, d_in),
                 .db = MatrixView<float>(db.data(), adapters * d_out, 8)},
                ws_view);
  for (const auto* v : {&y, &h, &dx, &da, &db})
    out.values.insert(out.values.end(), v->begin(), v->end());

  // The element-wise passes and the row losses.
  const index_t f = 45;
  const std::vector<float> pre = inputs(static_cast<std::size_t>(3 * f), 5);
  const std::vector<float> gate = inputs(static_cast<std::size_t>(3 * f), 6);
  for (moekit::Activation act : {moekit::Activation::kRelu, moekit::Activation::kGeluTanh,
                                 moekit::Activation::kGeluErf, moekit::Activation::kSilu}) {
    std::vector<float> hh(pre.size()), d = gate, dg(pre.size());
    const MatrixView<const float> pa(pre.data(), 3, f), pg(gate.data(), 3, f);
    moekit::cpu::activation_rows(act, pa, pg, MatrixView<float>(hh.data(), 3, f));
    moekit::cpu::activation_rows_backward(act, pa, pg, MatrixView<float>(d.data(), 3, f),
                                          MatrixView<float>(dg.data(), 3, f));
    for (const auto* v : {&hh, &d, &dg}) out.values.insert(out.values.end(), v->begin(), v->end());
  }
  std::vector<float> dz(static_cast<std::size_t>(f));
  out.values.push_back(
      static_cast<float>(moekit::cpu::cross_entropy_row(pre.data(), f, 3, 0.5f, dz.data())));
  const moekit::classify::DistillationTerms kd =
      moekit::cpu::distillation_row(pre.data(), gate.data(), f, 3, 2.0f, 0.4f, 0.5f, dz.data());
  out.values.push_back(static_cast<float>(kd.kl));
  out.values.push_back(static_cast<float>(kd.ce));
  out.values.insert(out.values.end(), dz.begin(), dz.end());
  return out;
}

}  // namespace odr_test
