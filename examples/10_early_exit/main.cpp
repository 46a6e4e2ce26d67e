// 10_early_exit: an early-exit serving loop. A stream of requests runs in
// batches through a stack of three residual MoE layers, each followed by an
// exit classifier; a request leaves at the first exit that is confident
// enough, the batch is compacted so later layers only run on the requests
// still live, and every prediction lands at its request's place in the
// stream. The program checks the results against the same model run at full
// depth without compaction and returns non-zero if they differ.
#include <moekit/moekit.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using moekit::index_t;
using moekit::to_size;
using Spec = moekit::MoeSpec<4, 2>;
constexpr int E = Spec::num_experts;
constexpr int kLayers = 3;                              // one exit after each layer
constexpr index_t d = 32, f = 64, kClasses = 5;         // d_model, d_ff per expert, classes
constexpr index_t kBatch = 64, kRequests = 4 * kBatch;  // four batches of requests

std::vector<float> random_vector(std::mt19937& rng, index_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
}

// One MoE layer's weights (plain GELU experts: W1, W2) and its exit classifier.
struct Block {
  std::vector<float> w_gate, w1, w2, exit_w, exit_b;
  moekit::cpu::MoeLayerParams moe() const {
    return {.w_gate = {w_gate.data(), E, d},
            .experts = {{w1.data(), E * f, d}, {}, {w2.data(), E * d, f}}};
  }
  moekit::cpu::HeadWeights exit() const {
    return {{exit_w.data(), kClasses, d}, {exit_b.data(), kClasses}};
  }
};

}  // namespace

int main() {
  // [model]
  // The model: x <- x + MoE_l(x), then exit classifier l, for l = 0, 1, 2.
  // The exit classifiers are untrained stand-ins, each sharper than the last.
  std::mt19937 rng(10);
  moekit::cpu::MoeLayerConfig config;
  config.d_model = d;
  config.d_ff = f;
  config.activation = moekit::Activation::kGeluTanh;
  config.router.gating.rule = moekit::GatingRule::kTopKSoftmax;  // dropless: no capacity
  const moekit::cpu::MoeLayer<Spec> layer(config);
  std::array<Block, kLayers> blocks;
  for (int l = 0; l < kLayers; ++l) {
    blocks[to_size(l)] = {random_vector(rng, E * d, 0.2f), random_vector(rng, E * f * d, 0.1f),
                          random_vector(rng, E * d * f, 0.1f),
                          random_vector(rng, kClasses * d, 0.45f * static_cast<float>(l + 1)),
                          std::vector<float>(kClasses, 0.0f)};
  }
  const moekit::cpu::TaskHeads<moekit::HeadSpec<1>> exit_head(
      {.d_model = d, .classes = {kClasses}});
  const moekit::cpu::EarlyExit exits({.criteria = {.min_confidence = 0.8f}, .num_exits = kLayers});
  // [model]

  const std::vector<float> requests = random_vector(rng, kRequests * d, 1.0f);

  // [serve]
  // Buffers for one batch, allocated once: activations, the MoE layer's state
  // and workspace, exit logits and the exit head's workspace, and the
  // early-exit state of the live rows.
  moekit::cpu::MoeLayerStorage<Spec> storage(layer, kBatch);
  std::vector<std::byte> head_ws(to_size(exit_head.workspace_size(kBatch)));
  const moekit::VectorView<std::byte> head_workspace(head_ws.data(),
                                                     static_cast<index_t>(head_ws.size()));
  std::vector<float> acts(kBatch * d), moe_out(kBatch * d), logits(kBatch * kClasses);
  std::vector<index_t> original(kBatch), kept(kBatch);
  std::vector<std::int32_t> previous(kBatch), agree(kBatch);
  const moekit::cpu::ExitState state{
      {original.data(), kBatch}, {previous.data(), kBatch}, {agree.data(), kBatch}};

  // Results for the whole stream, in request order.
  std::vector<std::int32_t> prediction(kRequests), exit_taken(kRequests);
  std::vector<float> confidence(kRequests);
  index_t rows_run = 0;  // rows the MoE layers processed

  for (index_t first = 0; first < kRequests; first += kBatch) {
    std::copy_n(requests.begin() + first * d, kBatch * d, acts.begin());
    // This batch's results are written straight into its part of the stream.
    const moekit::cpu::ExitResults results{{prediction.data() + first, kBatch},
                                           {confidence.data() + first, kBatch},
                                           {exit_taken.data() + first, kBatch}};
    index_t live = exits.begin(kBatch, state, results);
    std::printf("batch %lld: live rows", static_cast<long long>(first / kBatch));
    for (int l = 0; l < kLayers && live > 0; ++l) {
      std::printf(" %lld", static_cast<long long>(live));
      const moekit::MatrixView<float> x(acts.data(), live, d);
      layer.forward(x, blocks[to_size(l)].moe(), storage.state(), {moe_out.data(), live, d},
                    nullptr, storage.workspace());
      moekit::as_eigen(x) +=
          moekit::as_eigen(moekit::MatrixView<const float>(moe_out.data(), live, d));
      rows_run += live;

      exit_head.forward(x, {}, blocks[to_size(l)].exit(), {logits.data(), live, kClasses},
                        head_workspace);
      const index_t before = live;
      live = exits.step(l, {logits.data(), live, kClasses}, state, results, {kept.data(), kBatch});
      // Survivors move up, in order: the next layer runs on `live` rows only.
      moekit::cpu::compact_rows(moekit::MatrixView<float>(acts.data(), before, d),
                                {kept.data(), live});
    }
    std::printf(" -> 0\n");
  }
  // [serve]

  std::array<index_t, kLayers> per_exit{};
  for (std::int32_t e : exit_taken) ++per_exit[static_cast<std::size_t>(e)];
  std::printf("exits taken: %lld at exit 0, %lld at exit 1, %lld at exit 2\n",
              static_cast<long long>(per_exit[0]), static_cast<long long>(per_exit[1]),
              static_cast<long long>(per_exit[2]));
  std::printf("MoE layers ran %lld rows of %lld at full depth (%.0f%%)\n",
              static_cast<long long>(rows_run), static_cast<long long>(kRequests * kLayers),
              100.0 * static_cast<double>(rows_run) / static_cast<double>(kRequests * kLayers));
  for (std::size_t i = 0; i < 4; ++i) {
    std::printf("request %zu: class %d, confidence %.2f, exit %d\n", i, prediction[i],
                confidence[i], exit_taken[i]);
  }

  // Reference: every request through every layer and exit, no compaction; a
  // request's answer is its first exit with max probability >= 0.8, or the last.
  std::vector<float> ref_acts = requests, ref_out(kRequests * d), ref_logits(kRequests * kClasses);
  std::vector<std::int32_t> ref_exit(kRequests, -1), ref_class(kRequests);
  std::vector<float> ref_conf(kRequests);
  moekit::cpu::MoeLayerStorage<Spec> ref_storage(layer, kRequests);
  std::vector<std::byte> ref_head_ws(to_size(exit_head.workspace_size(kRequests)));
  for (int l = 0; l < kLayers; ++l) {
    const moekit::MatrixView<float> x(ref_acts.data(), kRequests, d);
    layer.forward(x, blocks[to_size(l)].moe(), ref_storage.state(), {ref_out.data(), kRequests, d},
                  nullptr, ref_storage.workspace());
    moekit::as_eigen(x) +=
        moekit::as_eigen(moekit::MatrixView<const float>(ref_out.data(), kRequests, d));
    exit_head.forward(x, {}, blocks[to_size(l)].exit(), {ref_logits.data(), kRequests, kClasses},
                      {ref_head_ws.data(), static_cast<index_t>(ref_head_ws.size())});
    for (std::size_t r = 0; r < ref_exit.size(); ++r) {
      if (ref_exit[r] >= 0) continue;
      const float* z = ref_logits.data() + r * kClasses;
      const index_t top = std::max_element(z, z + kClasses) - z;
      double sum = 0.0;
      for (index_t c = 0; c < kClasses; ++c) sum += std::exp(double(z[c]) - z[top]);
      ref_conf[r] = static_cast<float>(1.0 / sum);
      ref_class[r] = static_cast<std::int32_t>(top);
      if (ref_conf[r] >= 0.8f || l == kLayers - 1) ref_exit[r] = l;
    }
  }
  for (std::size_t r = 0; r < ref_exit.size(); ++r) {
    if (exit_taken[r] != ref_exit[r] || prediction[r] != ref_class[r] ||
        std::abs(confidence[r] - ref_conf[r]) > 1e-5f) {
      std::printf("FAILED: request %zu: exit %d class %d confidence %.6f, reference %d %d %.6f\n",
                  r, exit_taken[r], prediction[r], confidence[r], ref_exit[r], ref_class[r],
                  ref_conf[r]);
      return 1;
    }
  }
  std::printf("all %lld results match the full-depth reference\n",
              static_cast<long long>(kRequests));
  return 0;
}
