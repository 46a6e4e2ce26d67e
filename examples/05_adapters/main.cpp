// 05_adapters: LoRA adapters on the CPU backend - one adapter on a frozen
// linear layer (training step with dropout, merge for serving), a bank of
// per-task adapters where each row of the batch picks its own, and LoRA on the
// experts of an MoE layer. It checks what it computes against double-precision
// recomputations (exit code 1 when wrong). docs/adapters.md is cut from this file.
#include <moekit/moekit.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using moekit::index_t;
using moekit::to_size;

std::vector<float> random_vector(std::mt19937& rng, index_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
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
  std::vector<std::byte> workspace(to_size(lora.workspace_size(n)));
  const moekit::cpu::LoraStep step{.training = true, .seed = 2024, .step = 0};
  lora.forward({x.data(), n, d_in}, weights, {y.data(), n, d_out}, {h.data(), n, R}, step,
               moekit::view_of(workspace));
  for (std::size_t i = 0; i < dy.size(); ++i)
    dy[i] = y[i] / static_cast<float>(n);  // L = |y|^2 / 2n
  lora.backward({dy.data(), n, d_out}, {x.data(), n, d_in}, weights, {h.data(), n, R}, step,
                {dx.data(), n, d_in}, {.da = {da.data(), R, d_in}, .db = {db.data(), d_out, R}},
                moekit::view_of(workspace));
  // B starts at zero, so only dB is non-zero on the first step.
  for (std::size_t i = 0; i < b.size(); ++i) b[i] -= 0.05f * db[i];
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
               moekit::view_of(workspace));
  const std::vector<float> zero_b(d_out * R, 0.0f);
  lora.forward(
      {x.data(), n, d_in},
      {.w = {merged.data(), d_out, d_in}, .a = {a.data(), R, d_in}, .b = {zero_b.data(), d_out, R}},
      {y_merged.data(), n, d_out}, {}, inference, moekit::view_of(workspace));
  lora.unmerge({merged.data(), d_out, d_in}, {a.data(), R, d_in}, {b.data(), d_out, R});
  // [merge]

  double diff = 0, ref = 0, restore = 0;
  for (std::size_t i = 0; i < y_adapter.size(); ++i) {
    diff += (y_adapter[i] - y_merged[i]) * (y_adapter[i] - y_merged[i]);
    ref += y_adapter[i] * y_adapter[i];
  }
  for (std::size_t i = 0; i < w.size(); ++i)
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
  for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = static_cast<std::int32_t>(t % (N + 1)) - 1;
  std::vector<index_t> order(n), offsets(N + 1);
  bank.group({ids.data(), n}, {order.data(), n}, {offsets.data(), N + 1});
  const moekit::cpu::LoraRows rows{{ids.data(), n}, {order.data(), n}, {offsets.data(), N + 1}};

  std::vector<float> y_bank(n * d_out);
  std::vector<std::byte> bank_workspace(to_size(bank.workspace_size(n)));
  bank.forward({x.data(), n, d_in}, rows,
               {.w = {w.data(), d_out, d_in},
                .a = {bank_a.data(), N * R, d_in},
                .b = {bank_b.data(), N * d_out, R}},
               {y_bank.data(), n, d_out}, {}, inference, moekit::view_of(bank_workspace));
  // [bank]

  std::printf("bank: rows per adapter");
  for (index_t i = 0; i < N; ++i)
    std::printf(" %lld", static_cast<long long>(offsets[to_size(i + 1)] - offsets[to_size(i)]));
  std::printf(", %lld rows on the base layer only\n", static_cast<long long>(n - offsets[N]));

  // [expert_lora]
  // LoRA on the experts of an MoE layer (MixLoRA style): the expert FFNs stay
  // frozen and each expert gets its own rank-R adapters on W1, W3 and W2 (an
  // empty pair of views leaves that matrix unadapted). The rows are in
  // expert-major order, as dispatch writes them: expert e owns rows
  // [offsets[e], offsets[e + 1]).
  using Moe = moekit::MoeSpec<4, 2>;
  constexpr index_t E = Moe::num_experts, d = 32, f = 64;
  const moekit::cpu::ExpertLora<Moe, Lora> experts({.d_model = d,
                                                    .d_ff = f,
                                                    .kind = moekit::FfnKind::kGated,
                                                    .activation = moekit::Activation::kSilu,
                                                    .alpha = 16.0f});
  const std::vector<float> w1 = random_vector(rng, E * f * d, 0.2f),  // frozen, (E d_ff) x d
      w3 = random_vector(rng, E * f * d, 0.2f), w2 = random_vector(rng, E * d * f, 0.1f);
  std::vector<float> a1(E * R * d), b1(E * f * R), a3(E * R * d), b3(E * f * R), a2(E * R * f),
      b2(E * d * R);
  const moekit::cpu::ExpertAdapters<float> adapters{{a1.data(), E * R, d}, {b1.data(), E * f, R},
                                                    {a3.data(), E * R, d}, {b3.data(), E * f, R},
                                                    {a2.data(), E * R, f}, {b2.data(), E * d, R}};
  experts.init(adapters, {.seed = 3});  // A Kaiming-uniform, B = 0: starts as the frozen FFN
  const moekit::cpu::ExpertLoraWeights expert_weights{
      .base = {{w1.data(), E * f, d}, {w3.data(), E * f, d}, {w2.data(), E * d, f}},
      .lora = adapters};

  const std::vector<index_t> expert_offsets{0, 20, 20, 45, 64};  // expert 1 has no rows
  constexpr index_t rows_e = 64;
  const moekit::VectorView<const index_t> off(expert_offsets.data(), E + 1);
  const std::vector<float> buffer = random_vector(rng, rows_e * d, 1.0f);
  std::vector<float> out(rows_e * d), pre(rows_e * f), gate(rows_e * f), h1(rows_e * R),
      h3(rows_e * R), h2(rows_e * R);
  std::vector<std::byte> expert_workspace(to_size(experts.workspace_size(rows_e)));
  const moekit::cpu::ExpertLoraSaved<float> saved{.pre = {pre.data(), rows_e, f},
                                                  .gate = {gate.data(), rows_e, f},
                                                  .h1 = {h1.data(), rows_e, R},
                                                  .h3 = {h3.data(), rows_e, R},
                                                  .h2 = {h2.data(), rows_e, R}};
  experts.forward({buffer.data(), rows_e, d}, off, expert_weights, {out.data(), rows_e, d}, saved,
                  moekit::view_of(expert_workspace));

  // Backward with L = |out|^2 / 2 (dL/d out = out): gradients of the adapters
  // and of the buffer only; W1, W3 and W2 are frozen and cost nothing.
  std::vector<float> d_buffer(rows_e * d), da1(a1.size()), db1(b1.size()), da3(a3.size()),
      db3(b3.size()), da2(a2.size()), db2(b2.size());
  experts.backward({out.data(), rows_e, d}, {buffer.data(), rows_e, d}, off, expert_weights, saved,
                   {d_buffer.data(), rows_e, d},
                   {.da1 = {da1.data(), E * R, d},
                    .db1 = {db1.data(), E * f, R},
                    .da3 = {da3.data(), E * R, d},
                    .db3 = {db3.data(), E * f, R},
                    .da2 = {da2.data(), E * R, f},
                    .db2 = {db2.data(), E * d, R}},
                   moekit::view_of(expert_workspace));
  // [expert_lora]

  double norm_db2 = 0, norm_da1 = 0;
  for (float v : db2) norm_db2 += v * v;
  for (float v : da1) norm_da1 += v * v;
  std::printf(
      "expert LoRA: %lld trainable adapter parameters; first step |dB2| = %.4f, |dA1| = %.1f\n",
      static_cast<long long>(experts.adapter_params().trainable), std::sqrt(norm_db2),
      std::sqrt(norm_da1));

  // [params]
  // What a branch costs: one adapter, R (d_in + d_out) parameters, all trainable.
  constexpr moekit::ParamCount kAdapter = moekit::lora_params<Lora>(d_in, d_out);
  static_assert(kAdapter.total == R * (d_in + d_out));
  std::printf("one adapter: %lld parameters (%.1f%% of the frozen %lld x %lld layer)\n",
              static_cast<long long>(kAdapter.total),
              100.0 * static_cast<double>(kAdapter.total) / static_cast<double>(d_in * d_out),
              static_cast<long long>(d_out), static_cast<long long>(d_in));
  // [params]

  // Checks (CTest runs this example); each failure exits with 1.
  // The first step: with B = 0, dA is exactly zero and dB = s dy^T h (s = 2).
  const float *dy_t = dy.data(), *h_t = h.data(), *db_t = db.data();
  double db_num = 0, db_den = 0;
  for (index_t o = 0; o < d_out; ++o) {
    for (index_t r = 0; r < R; ++r) {
      double want = 0;
      for (index_t t = 0; t < n; ++t) want += 2.0 * double(dy_t[t * d_out + o]) * h_t[t * R + r];
      db_num += (db_t[o * R + r] - want) * (db_t[o * R + r] - want);
      db_den += want * want;
    }
  }
  // Merging: the merged layer answers as the adapter does; unmerge restores W.
  // The bank: each row is x W^T plus its own adapter's s x A_i^T B_i^T.
  const float *x_t = x.data(), *w_t = w.data(), *a_t = bank_a.data(), *b_t = bank_b.data();
  double bank_num = 0, bank_den = 0;
  for (index_t t = 0; t < n; ++t) {
    const int id = ids[to_size(t)];
    double hr[R] = {};
    for (index_t r = 0; r < R && id >= 0; ++r) {
      for (index_t j = 0; j < d_in; ++j)
        hr[r] += double(a_t[(id * R + r) * d_in + j]) * x_t[t * d_in + j];
    }
    for (index_t o = 0; o < d_out; ++o) {
      double want = 0;
      for (index_t j = 0; j < d_in; ++j) want += double(w_t[o * d_in + j]) * x_t[t * d_in + j];
      for (index_t r = 0; r < R && id >= 0; ++r)
        want += 2.0 * hr[r] * b_t[(id * d_out + o) * R + r];
      const double got = y_bank[to_size(t * d_out + o)];
      bank_num += (got - want) * (got - want);
      bank_den += want * want;
    }
  }
  // LoRA on experts starts as the frozen experts, bit for bit.
  const moekit::cpu::ExpertFfn<Moe> frozen({.d_model = d,
                                            .d_ff = f,
                                            .kind = moekit::FfnKind::kGated,
                                            .activation = moekit::Activation::kSilu});
  std::vector<float> frozen_out(out.size());
  std::vector<std::byte> frozen_workspace(to_size(frozen.workspace_size(rows_e)));
  frozen.forward({buffer.data(), rows_e, d}, off, expert_weights.base,
                 {frozen_out.data(), rows_e, d}, {}, {}, moekit::view_of(frozen_workspace));
  // ExpertFfn runs on the GEMM engine and ExpertLora on Eigen: the same
  // products in another summation order, so they agree to rounding.
  double frozen_num = 0.0, frozen_den = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    frozen_num += (double(frozen_out[i]) - out[i]) * (double(frozen_out[i]) - out[i]);
    frozen_den += double(frozen_out[i]) * frozen_out[i];
  }
  const struct {
    bool ok;
    const char* what;
  } checks[] = {
      {norm_da == 0.0 && norm_db > 0.0, "first step: dA must be 0 and dB not (B starts at 0)"},
      {std::sqrt(db_num / db_den) < 1e-5, "dB differs from s dy^T h"},
      {std::sqrt(diff / ref) < 1e-5 && restore < 1e-5, "merged layer or unmerge is off"},
      {std::sqrt(bank_num / bank_den) < 1e-5, "a bank row differs from its own adapter"},
      {std::sqrt(frozen_num / frozen_den) < 1e-5 && norm_da1 == 0.0 && norm_db2 > 0.0,
       "expert LoRA does not start as the frozen experts"},
  };
  for (const auto& c : checks) {
    if (!c.ok) {
      std::printf("wrong: %s\n", c.what);
      return 1;
    }
  }
  std::printf("checked: dB, merging, every bank row, expert LoRA at B = 0\n");
  return 0;
}
