// 05_adapters: LoRA adapters on the CPU backend - one adapter on a frozen
// linear layer (training step with dropout, merge for serving), and a bank of
// per-task adapters where each row of the batch picks its own. docs/adapters.md
// is cut from this file.
#include <moekit/moekit.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using moekit::index_t;

std::vector<float> random_vector(std::mt19937& rng, std::size_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

moekit::VectorView<std::byte> view_of(std::vector<std::byte>& v) {
  return {v.data(), static_cast<index_t>(v.size())};
}

}  // namespace

int main() {
  // [setup]
  using Lora = moekit::LoraSpec<8>;  // rank R = 8, fixed at compile time
  constexpr int R = Lora::rank;
  constexpr index_t n = 64, d_in = 128, d_out = 96;

  // s = alpha / R = 2; dropout on the adapter input during training.
  const moekit::cpu::LoraLinear<Lora> lora(
      {.d_in = d_in, .d_out = d_out, .alpha = 16.0f, .dropout = 0.1f});

  std::mt19937 rng(5);
  const std::vector<float> w = random_vector(rng, d_out * d_in, 0.05f);  // frozen base
  const std::vector<float> x = random_vector(rng, n * d_in, 1.0f);
  std::vector<float> a(R * d_in), b(d_out * R);
  lora.init({a.data(), R, d_in}, {b.data(), d_out, R}, {.seed = 42});  // A Kaiming, B = 0
  const moekit::cpu::LoraWeights weights{
      .w = {w.data(), d_out, d_in}, .a = {a.data(), R, d_in}, .b = {b.data(), d_out, R}};
  // [setup]

  // [train]
  // One training step: forward saves h = drop(x) A^T; backward regenerates the
  // dropout mask from the same LoraStep and gives dA, dB (W is frozen) and dx.
  std::vector<float> y(n * d_out), h(n * R), dy(n * d_out), dx(n * d_in);
  std::vector<float> da(R * d_in), db(d_out * R);
  std::vector<std::byte> workspace(lora.workspace_size(n));
  const moekit::cpu::LoraStep step{.training = true, .seed = 2024, .step = 0};
  lora.forward({x.data(), n, d_in}, weights, {y.data(), n, d_out}, {h.data(), n, R}, step,
               view_of(workspace));
  for (index_t i = 0; i < n * d_out; ++i) dy[i] = y[i] / static_cast<float>(n);  // L = |y|^2 / 2n
  lora.backward({dy.data(), n, d_out}, {x.data(), n, d_in}, weights, {h.data(), n, R}, step,
                {dx.data(), n, d_in}, {.da = {da.data(), R, d_in}, .db = {db.data(), d_out, R}},
                view_of(workspace));
  // B starts at zero, so only dB is non-zero on the first step.
  for (index_t i = 0; i < d_out * R; ++i) b[i] -= 0.05f * db[i];
  // [train]

  double norm_db = 0, norm_da = 0;
  for (float v : db) norm_db += v * v;
  for (float v : da) norm_da += v * v;
  std::printf("first step: |dB| = %.4f, |dA| = %.4f (B was zero)\n", std::sqrt(norm_db),
              std::sqrt(norm_da));

  // [merge]
  // Serving one task: fold the adapter into the base weight, so inference
  // costs what the base layer costs. safe_merge refuses (and changes nothing)
  // if any merged value would be NaN or infinite.
  std::vector<float> merged = w;
  lora.safe_merge({merged.data(), d_out, d_in}, {a.data(), R, d_in}, {b.data(), d_out, R});
  std::vector<float> y_adapter(n * d_out), y_merged(n * d_out);
  const moekit::cpu::LoraStep inference{};  // no dropout, nothing saved
  lora.forward({x.data(), n, d_in}, weights, {y_adapter.data(), n, d_out}, {}, inference,
               view_of(workspace));
  const std::vector<float> zero_b(d_out * R, 0.0f);
  lora.forward(
      {x.data(), n, d_in},
      {.w = {merged.data(), d_out, d_in}, .a = {a.data(), R, d_in}, .b = {zero_b.data(), d_out, R}},
      {y_merged.data(), n, d_out}, {}, inference, view_of(workspace));
  lora.unmerge({merged.data(), d_out, d_in}, {a.data(), R, d_in}, {b.data(), d_out, R});
  // [merge]

  double diff = 0, ref = 0, restore = 0;
  for (index_t i = 0; i < n * d_out; ++i) {
    diff += (y_adapter[i] - y_merged[i]) * (y_adapter[i] - y_merged[i]);
    ref += y_adapter[i] * y_adapter[i];
  }
  for (index_t i = 0; i < d_out * d_in; ++i)
    restore = std::max<double>(restore, std::abs(merged[i] - w[i]));
  std::printf("merged vs adapter: relative difference %.2e; unmerge restores W to %.1e\n",
              std::sqrt(diff / ref), restore);

  // [bank]
  // Per-task adapters: N = 3 tasks share the frozen layer; each row carries
  // its task's adapter id (-1 = base layer only). group() sorts the rows by
  // adapter once; forward and backward then run each adapter on its rows only.
  constexpr index_t N = 3;
  const moekit::cpu::LoraBank<Lora> bank(
      {.d_in = d_in, .d_out = d_out, .num_adapters = N, .alpha = 16.0f});
  std::vector<float> bank_a(N * R * d_in), bank_b = random_vector(rng, N * d_out * R, 0.1f);
  bank.init({bank_a.data(), N * R, d_in}, {bank_b.data(), N * d_out, R}, {.seed = 7});
  bank_b = random_vector(rng, N * d_out * R, 0.1f);  // as if trained

  std::vector<std::int32_t> ids(n);
  for (index_t t = 0; t < n; ++t) ids[t] = static_cast<std::int32_t>(t % (N + 1)) - 1;
  std::vector<index_t> order(n), offsets(N + 1);
  bank.group({ids.data(), n}, {order.data(), n}, {offsets.data(), N + 1});
  const moekit::cpu::LoraRows rows{{ids.data(), n}, {order.data(), n}, {offsets.data(), N + 1}};

  std::vector<float> y_bank(n * d_out);
  std::vector<std::byte> bank_workspace(bank.workspace_size(n));
  bank.forward({x.data(), n, d_in}, rows,
               {.w = {w.data(), d_out, d_in},
                .a = {bank_a.data(), N * R, d_in},
                .b = {bank_b.data(), N * d_out, R}},
               {y_bank.data(), n, d_out}, {}, inference, view_of(bank_workspace));
  // [bank]

  std::printf("bank: rows per adapter");
  for (index_t i = 0; i < N; ++i)
    std::printf(" %lld", static_cast<long long>(offsets[i + 1] - offsets[i]));
  std::printf(", %lld rows on the base layer only\n", static_cast<long long>(n - offsets[N]));

  // [params]
  // What a branch costs: one adapter, R (d_in + d_out) parameters, all trainable.
  constexpr moekit::ParamCount kAdapter = moekit::lora_params<Lora>(d_in, d_out);
  static_assert(kAdapter.total == R * (d_in + d_out));
  std::printf("one adapter: %lld parameters (%.1f%% of the frozen %lld x %lld layer)\n",
              static_cast<long long>(kAdapter.total),
              100.0 * static_cast<double>(kAdapter.total) / static_cast<double>(d_in * d_out),
              static_cast<long long>(d_out), static_cast<long long>(d_in));
  // [params]
  return 0;
}
