// 07_load_safetensors: an MoE layer's weights written to a safetensors file,
// read back into fresh buffers and run; the same layer exported and loaded
// under Mixtral's (Hugging Face) names; a bad file rejected with a named
// error. docs/weights.md is cut from this file.
#include <moekit/io/safetensors.hpp>
#include <moekit/io/weights.hpp>
#include <moekit/moekit.hpp>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

namespace {

using moekit::index_t;

std::vector<float> random_vector(std::mt19937& rng, index_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
}

// y = layer(x) for T tokens.
template <class Spec>
std::vector<float> run(const moekit::cpu::MoeLayer<Spec>& layer,
                       const moekit::cpu::MoeLayerParams& params, const std::vector<float>& x,
                       index_t T) {
  const index_t d = layer.config().d_model;
  moekit::cpu::MoeLayerStorage<Spec> storage(layer, T);
  std::vector<float> y(x.size());
  layer.forward({x.data(), T, d}, params, storage.state(), {y.data(), T, d}, nullptr,
                storage.workspace());
  return y;
}

}  // namespace

int main() {
  const std::filesystem::path dir = std::filesystem::temp_directory_path();
  const std::filesystem::path path = dir / "moekit_07_layer.safetensors";
  const std::filesystem::path mixtral_path = dir / "moekit_07_mixtral.safetensors";

  // [setup]
  using Spec = moekit::MoeSpec<8, 2>;
  constexpr int E = Spec::num_experts;
  constexpr index_t d = 64, f = 128, T = 16;
  moekit::cpu::MoeLayerConfig config;
  config.d_model = d;
  config.d_ff = f;
  config.kind = moekit::FfnKind::kGated;  // SwiGLU experts: W1 (gate), W3 (up), W2 (down)
  config.activation = moekit::Activation::kSilu;
  config.num_shared = 1;  // one shared expert, run on every token
  const moekit::cpu::MoeLayer<Spec> layer(config);

  std::mt19937 rng(7);
  const std::vector<float> w_gate = random_vector(rng, E * d, 0.1f);
  const std::vector<float> w1 = random_vector(rng, E * f * d, 0.1f),
                           w3 = random_vector(rng, E * f * d, 0.1f),
                           w2 = random_vector(rng, E * d * f, 0.1f);
  const std::vector<float> s1 = random_vector(rng, f * d, 0.1f),
                           s3 = random_vector(rng, f * d, 0.1f),
                           s2 = random_vector(rng, d * f, 0.1f);
  const moekit::cpu::MoeLayerParams params{
      .w_gate = {w_gate.data(), E, d},
      .experts = {{w1.data(), E * f, d}, {w3.data(), E * f, d}, {w2.data(), E * d, f}},
      .shared = {{s1.data(), f, d}, {s3.data(), f, d}, {s2.data(), d, f}}};
  // [setup]

  // [save]
  // One tensor per matrix per expert, named under a prefix of your choice:
  // layers.0.moe.gate.weight, layers.0.moe.experts.{e}.w1.weight, ...
  moekit::io::SafetensorsWriter writer;
  moekit::io::save_weights(writer, layer, params, "layers.0.moe.");
  writer.set_metadata("format", "pt");
  writer.write(path);  // the views are read here; a temporary, then renamed over path
  // [save]

  // [load]
  const moekit::io::SafetensorsReader file(path);  // validates the header and the checksum
  const moekit::io::TensorInfo& info = file.info("layers.0.moe.experts.7.w2.weight");
  std::printf("%s: %lld tensors; experts.7.w2 is %s [%lld, %lld]\n", path.filename().c_str(),
              static_cast<long long>(file.size()), info.dtype.c_str(),
              static_cast<long long>(info.shape[0]), static_cast<long long>(info.shape[1]));

  // Fresh buffers of the same shapes: mutable views of your memory.
  std::vector<float> g2(w_gate.size()), a1(w1.size()), a3(w3.size()), a2(w2.size());
  std::vector<float> b1(s1.size()), b3(s3.size()), b2(s2.size());
  const moekit::io::MutableMoeLayerParams loaded{
      .w_gate = {g2.data(), E, d},
      .experts = {{a1.data(), E * f, d}, {a3.data(), E * f, d}, {a2.data(), E * d, f}},
      .shared = {{b1.data(), f, d}, {b3.data(), f, d}, {b2.data(), d, f}}};
  moekit::io::load_weights(file, layer, loaded, "layers.0.moe.");  // all checked, then copied
  // [load]

  // [run]
  const std::vector<float> x = random_vector(rng, T * d, 1.0f);
  const std::vector<float> y_saved = run(layer, params, x, T);
  const std::vector<float> y_loaded = run(layer, loaded, x, T);  // Mutable* converts to const
  const bool same =
      std::memcmp(y_saved.data(), y_loaded.data(), y_saved.size() * sizeof(float)) == 0;
  std::printf("forward with the loaded weights: %s\n", same ? "bit-identical" : "DIFFERENT");
  // [run]

  // [mixtral]
  // Mixtral's block: softmax -> top-2 -> renormalise, SwiGLU experts, no shared experts.
  const moekit::cpu::MoeLayer<Spec> mixtral(moekit::io::mixtral_moe_layer_config(d, f));
  const moekit::cpu::MoeLayerParams routed{.w_gate = params.w_gate, .experts = params.experts};
  // Export as decoder layer 3 of a Hugging Face checkpoint, in BF16:
  // model.layers.3.block_sparse_moe.experts.{e}.w1.weight, ...
  moekit::io::SafetensorsWriter hf;
  moekit::io::save_mixtral_moe_layer(hf, mixtral, routed, 3, moekit::io::Dtype::kBF16);
  hf.write(mixtral_path);
  // Load it back (or a real Mixtral shard): BF16 -> float is exact.
  moekit::io::load_mixtral_moe_layer(moekit::io::SafetensorsReader(mixtral_path), mixtral,
                                     {.w_gate = loaded.w_gate, .experts = loaded.experts}, 3);
  // [mixtral]
  std::printf("Mixtral names: gate %s, w1[0] %.6f was %.6f before BF16\n",
              "model.layers.3.block_sparse_moe.gate.weight", static_cast<double>(a1[0]),
              static_cast<double>(w1[0]));

  // [errors]
  try {
    std::vector<std::byte> bytes(8);  // a header length of 100, and then nothing
    bytes[0] = std::byte{100};
    const auto bad = moekit::io::SafetensorsReader::from_bytes(bytes, "truncated.safetensors");
  } catch (const moekit::Error& e) {
    std::printf("rejected (%s): %s\n", moekit::errc_name(e.code()), e.what());
  }
  // [errors]

  std::filesystem::remove(path);
  std::filesystem::remove(mixtral_path);
  return same ? 0 : 1;
}
