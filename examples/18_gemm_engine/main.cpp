// moekit's CPU GEMM engine (moekit/cpu/gemm/gemm.hpp): a product, a grouped
// product over experts, weights packed once in bf16 and int8, the experts of
// an MoE layer on packed weights, forcing a path, and a row's result staying
// the same bits inside a batch. The code blocks of docs/cpu_engine.md are cut
// from this file.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "moekit/cpu/expert_ffn.hpp"
#include "moekit/cpu/gemm/gemm.hpp"

namespace {

std::vector<float> random_values(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

}  // namespace

int main() {
  using moekit::index_t;
  namespace cpu = moekit::cpu;
  const index_t rows = 300, d = 128, f = 96;
  const std::vector<float> x = random_values(std::size_t(rows * d), 1);
  const std::vector<float> w = random_values(std::size_t(f * d), 2);  // torch layout: f x d
  std::vector<float> y(std::size_t(rows * f)), y_bf16(y.size()), y_int8(y.size());

  // [gemm]
  // y = x W^T: C = alpha op(A) op(B) + beta C on views, with the packing
  // buffers in a caller workspace (one slot per thread; nothing allocates).
  std::vector<std::byte> workspace(std::size_t(cpu::gemm_workspace_size(cpu::max_threads())));
  const moekit::VectorView<std::byte> ws(workspace.data(), index_t(workspace.size()));
  cpu::gemm({.op_a = cpu::Op::kNone, .op_b = cpu::Op::kTrans}, {x.data(), rows, d},
            {w.data(), f, d}, {y.data(), rows, f}, ws);
  // [gemm]

  // [packed]
  // Frozen weights packed once (this allocates), then bf16 or int8 products:
  // bf16 rounds x on the fly; int8 quantizes x per row and W per output channel.
  const cpu::PackedMatrix w_bf16(cpu::GemmDtype::kBfloat16, cpu::Op::kTrans, {w.data(), f, d});
  const cpu::PackedMatrix w_int8(cpu::GemmDtype::kInt8, cpu::Op::kTrans, {w.data(), f, d});
  cpu::gemm({.dtype = cpu::GemmDtype::kBfloat16}, {x.data(), rows, d}, w_bf16, 0,
            {y_bf16.data(), rows, f}, ws);
  cpu::gemm({.dtype = cpu::GemmDtype::kInt8}, {x.data(), rows, d}, w_int8, 0,
            {y_int8.data(), rows, f}, ws);
  // [packed]

  // [grouped]
  // Four experts in one call: expert e multiplies its rows of the
  // expert-major buffer [offsets[e], offsets[e + 1]) by its own W_e^T.
  constexpr int kExperts = 4;
  const std::vector<index_t> offsets = {0, 120, 120, 299, 300};  // expert 1 has no rows
  const std::vector<float> w_experts = random_values(std::size_t(kExperts * f * d), 3);
  std::vector<float> y_experts(std::size_t(rows * f));
  cpu::gemm_grouped(
      {.op_a = cpu::Op::kNone, .op_b = cpu::Op::kTrans}, kExperts,
      [&](index_t e) {
        const index_t r0 = offsets[std::size_t(e)], n = offsets[std::size_t(e) + 1] - r0;
        return cpu::GemmOperands{.a = {x.data() + r0 * d, n, d},
                                 .b = {w_experts.data() + e * f * d, f, d},
                                 .c = {y_experts.data() + r0 * f, n, f}};
      },
      ws);
  // [grouped]

  // [batch_invariance]
  // Row 7 alone gives the same bits as row 7 inside the 300-row product above
  // (a row's reduction order depends on K only: not on the batch or threads).
  std::vector<float> row(static_cast<std::size_t>(f));
  cpu::gemm({.op_a = cpu::Op::kNone, .op_b = cpu::Op::kTrans}, {x.data() + 7 * d, 1, d},
            {w.data(), f, d}, {row.data(), 1, f}, ws);
  const bool same_bits =
      std::memcmp(row.data(), y.data() + 7 * f, sizeof(float) * std::size_t(f)) == 0;
  // [batch_invariance]

  // [force_path]
  // Every path gives the same fp32 bits; cap the path for a scope (or for the
  // process with MOEKIT_CPU_ISA=generic|avx2|avx512|amx) to check or compare.
  std::vector<float> y_portable(y.size());
  {
    const cpu::IsaLimit portable(cpu::Isa::kGeneric);
    cpu::gemm({.op_a = cpu::Op::kNone, .op_b = cpu::Op::kTrans}, {x.data(), rows, d},
              {w.data(), f, d}, {y_portable.data(), rows, f}, ws);
  }
  const bool paths_agree = std::memcmp(y.data(), y_portable.data(), sizeof(float) * y.size()) == 0;
  // [force_path]

  // [experts_packed]
  // An MoE layer's SwiGLU experts for inference: weights packed once in int8,
  // forward over the expert-major buffer on the engine.
  using Spec = moekit::MoeSpec<kExperts, 1>;
  const cpu::ExpertFfn<Spec> ffn({.d_model = d,
                                  .d_ff = f,
                                  .kind = moekit::FfnKind::kGated,
                                  .activation = moekit::Activation::kSilu});
  const std::vector<float> w1 = random_values(std::size_t(kExperts * f * d), 4);
  const std::vector<float> w3 = random_values(std::size_t(kExperts * f * d), 5);
  const std::vector<float> w2 = random_values(std::size_t(kExperts * d * f), 6);
  const cpu::ExpertWeights weights{
      {w1.data(), kExperts * f, d}, {w3.data(), kExperts * f, d}, {w2.data(), kExperts * d, f}};
  const cpu::PackedExpertWeights packed = ffn.pack(weights, cpu::GemmDtype::kInt8);
  std::vector<std::byte> ffn_workspace(std::size_t(ffn.workspace_size(rows)));
  std::vector<float> out(std::size_t(rows * d));
  ffn.forward({x.data(), rows, d}, {offsets.data(), kExperts + 1}, packed, {out.data(), rows, d},
              {ffn_workspace.data(), index_t(ffn_workspace.size())});
  // [experts_packed]

  const auto rel = [&](const std::vector<float>& got) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      num += double(got[i] - y[i]) * (got[i] - y[i]);
      den += double(y[i]) * y[i];
    }
    return std::sqrt(num / den);
  };
  std::printf("kernels: fp32 %s, bf16 %s, int8 %s\n",
              cpu::gemm_kernel_name(cpu::GemmDtype::kFloat32),
              cpu::gemm_kernel_name(cpu::GemmDtype::kBfloat16),
              cpu::gemm_kernel_name(cpu::GemmDtype::kInt8));
  std::printf("bf16 vs fp32: relative difference %.2e; int8 vs fp32: %.2e\n", rel(y_bf16),
              rel(y_int8));
  std::printf("row 7 alone == row 7 in the batch: %s; portable path == %s path: %s\n",
              same_bits ? "yes" : "NO", cpu::isa_name(cpu::active_isa()),
              paths_agree ? "yes" : "NO");
  std::printf("expert outputs: %.4f ... %.4f; grouped y[0] = %.4f\n", double(out.front()),
              double(out.back()), double(y_experts.front()));
  const bool ok = same_bits && paths_agree && rel(y_bf16) < 2e-2 && rel(y_int8) < 5e-2;
  return ok ? 0 : 1;
}
