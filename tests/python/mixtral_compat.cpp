// io.python_compat: loads a Mixtral-style checkpoint written by the reference
// safetensors implementation (make_mixtral_fixture.py, NumPy) into an
// MoeLayer through the Mixtral name map, runs it, and compares the output
// with the script's float64 NumPy reference.
//
// Then it writes the loaded layer back under Mixtral's names to OUT_FILE
// (F32, plus the router again as F16 under "check.gate_f16"), which the script
// reads with the reference implementation and compares with what it wrote.
//
//   mixtral_compat CHECKPOINT IO_FILE OUT_FILE
#include <cmath>
#include <cstdio>
#include <exception>
#include <vector>

#include "moekit/io/safetensors.hpp"
#include "moekit/io/weights.hpp"
#include "moekit/nn/moe_layer.hpp"

namespace {

using moekit::index_t;
namespace io = moekit::io;

int run(const char* checkpoint, const char* io_file, const char* out_file) {
  using Spec = moekit::MoeSpec<8, 2>;
  constexpr int E = Spec::num_experts;
  constexpr index_t d = 64, f = 128;
  constexpr index_t kLayer = 1;
  const moekit::cpu::MoeLayer<Spec> layer(io::mixtral_moe_layer_config(d, f));

  std::vector<float> w_gate(E * d), w1(E * f * d), w3(E * f * d), w2(E * d * f);
  const io::MutableMoeLayerParams params{
      {w_gate.data(), E, d},
      {},
      {},
      {{w1.data(), E * f, d}, {w3.data(), E * f, d}, {w2.data(), E * d, f}}};
  const io::SafetensorsReader file(checkpoint);
  io::load_mixtral_moe_layer(file, layer, params, kLayer);
  std::printf("loaded layer %lld of %s (%lld tensors, format '%s'); w3 of expert 5 was %s\n",
              static_cast<long long>(kLayer), checkpoint, static_cast<long long>(file.size()),
              file.metadata().count("format") ? file.metadata().at("format").c_str() : "",
              file.info("model.layers.1.block_sparse_moe.experts.5.w3.weight").dtype.c_str());

  const io::SafetensorsReader data(io_file);
  const index_t T = data.info("x").shape.at(0);
  std::vector<float> x(static_cast<std::size_t>(T * d)), ref(x.size()), y(x.size());
  data.read("x", moekit::MatrixView<float>(x.data(), T, d));
  data.read("y", moekit::MatrixView<float>(ref.data(), T, d));

  moekit::cpu::MoeLayerStorage<Spec> storage(layer, T);
  layer.forward({x.data(), T, d}, params, storage.state(), {y.data(), T, d}, nullptr,
                storage.workspace());

  double num = 0, den = 0, worst = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    const double diff = double(y[i]) - double(ref[i]);
    num += diff * diff;
    den += double(ref[i]) * ref[i];
    worst = std::fmax(worst, std::fabs(diff));
  }
  const double rel = std::sqrt(num / den);
  constexpr double kTol = 1e-5;
  std::printf(
      "T = %lld tokens: ||y - y_numpy|| / ||y_numpy|| = %.3g (tolerance %.0e), max |diff| = %.3g\n",
      static_cast<long long>(T), rel, kTol, worst);
  if (rel > kTol) return 1;

  io::SafetensorsWriter out;
  io::save_mixtral_moe_layer(out, layer, params, kLayer);
  out.add("check.gate_f16", moekit::MatrixView<const float>(w_gate.data(), E, d), io::Dtype::kF16);
  out.set_metadata("format", "pt");
  out.write(out_file);
  std::printf("wrote %s (%lld tensors)\n", out_file, static_cast<long long>(out.size()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s CHECKPOINT IO_FILE OUT_FILE\n", argv[0]);
    return 2;
  }
  try {
    return run(argv[1], argv[2], argv[3]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
