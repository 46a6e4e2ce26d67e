// 09_multi_adapter_serving: one frozen layer serving many LoRA adapters at
// once. Each request in a batch names its task's adapter (or -1 for the base
// layer); a LoraBank groups the rows by adapter and runs the whole batch in
// one call. The program checks that every row's output equals running its
// own adapter alone, and shows the merge path for a single-task deployment.
// It returns non-zero if a check fails.
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

// max over rows of |a_row - b_row| / |b_row|, for the rows where pick(row).
template <class Pick>
double max_row_error(const std::vector<float>& a, const std::vector<float>& b, index_t rows,
                     index_t cols, Pick pick) {
  double worst = 0.0;
  for (index_t r = 0; r < rows; ++r) {
    if (!pick(r)) continue;
    double diff = 0.0, ref = 0.0;
    for (index_t c = 0; c < cols; ++c) {
      const double u = a[to_size(r * cols + c)], v = b[to_size(r * cols + c)];
      diff += (u - v) * (u - v);
      ref += v * v;
    }
    worst = std::max(worst, std::sqrt(diff / ref));
  }
  return worst;
}

}  // namespace

int main() {
  // [setup]
  // A frozen 64 -> 48 layer with N = 4 task adapters of rank 8 (s = 16 / 8).
  // The bank stacks the adapters: A is (N R) x d_in, B is (N d_out) x R.
  using Lora = moekit::LoraSpec<8>;
  constexpr int R = Lora::rank;
  constexpr index_t N = 4, d_in = 64, d_out = 48;
  const moekit::cpu::LoraBank<Lora> bank(
      {.d_in = d_in, .d_out = d_out, .num_adapters = N, .alpha = 16.0f});

  std::mt19937 rng(9);
  const std::vector<float> w = random_vector(rng, d_out * d_in, 0.1f);  // frozen base weight
  const std::vector<float> a = random_vector(rng, N * R * d_in, 0.1f);  // trained adapters
  const std::vector<float> b = random_vector(rng, N * d_out * R, 0.1f);
  const moekit::cpu::LoraWeights weights{
      .w = {w.data(), d_out, d_in}, .a = {a.data(), N * R, d_in}, .b = {b.data(), N * d_out, R}};
  // [setup]

  // [serve]
  // A batch of 40 requests from different tasks, in arrival order; -1 asks
  // for the base layer without an adapter.
  constexpr index_t n = 40;
  const std::vector<float> x = random_vector(rng, n * d_in, 1.0f);
  std::vector<std::int32_t> ids(n);
  std::uniform_int_distribution<std::int32_t> pick_task(-1, N - 1);
  for (std::int32_t& id : ids) id = pick_task(rng);

  // group() sorts the rows by adapter (checking every id); forward then runs
  // each adapter on its own rows only. The workspace is sized once for the
  // largest batch; nothing allocates per call.
  std::vector<index_t> order(n), offsets(N + 1);
  bank.group({ids.data(), n}, {order.data(), n}, {offsets.data(), N + 1});
  const moekit::cpu::LoraRows rows{{ids.data(), n}, {order.data(), n}, {offsets.data(), N + 1}};
  std::vector<std::byte> workspace(to_size(bank.workspace_size(n)));
  std::vector<float> y(n * d_out);
  bank.forward({x.data(), n, d_in}, rows, weights, {y.data(), n, d_out}, /*saved_h=*/{},
               moekit::cpu::LoraStep{}, moekit::view_of(workspace));  // inference: no dropout
  // [serve]

  std::printf("batch of %lld requests: rows per adapter", static_cast<long long>(n));
  for (index_t i = 0; i < N; ++i)
    std::printf(" %lld", static_cast<long long>(offsets[to_size(i + 1)] - offsets[to_size(i)]));
  std::printf(", %lld on the base layer only\n", static_cast<long long>(n - offsets[N]));

  // [check]
  // Each row equals its own adapter run alone: adapter i is rows [i R, (i+1) R)
  // of A and rows [i d_out, (i+1) d_out) of B. The base layer is an adapter
  // whose B is zero.
  const moekit::cpu::LoraLinear<Lora> single({.d_in = d_in, .d_out = d_out, .alpha = 16.0f});
  std::vector<std::byte> single_workspace(to_size(single.workspace_size(n)));
  const std::vector<float> zero_b(d_out * R, 0.0f);
  std::vector<float> y_alone(n * d_out);
  double worst = 0.0;
  for (std::int32_t task = -1; task < N; ++task) {
    const float* a_task = task < 0 ? a.data() : a.data() + task * R * d_in;
    const float* b_task = task < 0 ? zero_b.data() : b.data() + task * d_out * R;
    single.forward({x.data(), n, d_in},
                   {.w = {w.data(), d_out, d_in}, .a = {a_task, R, d_in}, .b = {b_task, d_out, R}},
                   {y_alone.data(), n, d_out}, {}, moekit::cpu::LoraStep{},
                   moekit::view_of(single_workspace));
    const double err =
        max_row_error(y, y_alone, n, d_out, [&](index_t r) { return ids[to_size(r)] == task; });
    std::printf("adapter %2d: bank rows vs the adapter alone, max relative difference %.1e\n", task,
                err);
    worst = std::max(worst, err);
  }
  // [check]

  // [merge]
  // A deployment that serves task 2 only folds adapter 2 into its own copy of
  // the base weight: y = x (W + s B_2 A_2)^T costs what the base layer costs.
  // safe_merge refuses (and changes nothing) if a merged value is not finite.
  constexpr std::int32_t kTask = 2;
  std::vector<float> w_task = w;
  bank.safe_merge(kTask, {w_task.data(), d_out, d_in}, {a.data(), N * R, d_in},
                  {b.data(), N * d_out, R});
  std::vector<float> y_merged(n * d_out);
  const moekit::MatrixView<const float> x_view(x.data(), n, d_in),
      w_view(w_task.data(), d_out, d_in);
  moekit::as_eigen(moekit::MatrixView<float>(y_merged.data(), n, d_out)).noalias() =
      moekit::as_eigen(x_view) * moekit::as_eigen(w_view).transpose();  // one plain GEMM
  // [merge]

  const double merge_err =
      max_row_error(y, y_merged, n, d_out, [&](index_t r) { return ids[to_size(r)] == kTask; });
  std::printf("task %d merged into W: max relative difference to the bank %.1e\n", kTask,
              merge_err);
  if (!(worst < 1e-5) || !(merge_err < 1e-5)) {
    std::printf("FAILED: outputs differ by more than 1e-5\n");
    return 1;
  }
  return 0;
}
