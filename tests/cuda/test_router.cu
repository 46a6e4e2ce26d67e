// The CUDA router and aux losses against the CPU backend on the same inputs
// (cpu_reference.hpp): every gating rule and option, fp32/bf16/fp16 logits,
// every (E, K) of the CPU router tests; outputs poisoned before each run,
// reruns bit-identical. Tests that need a device skip without one; the
// argument checks run everywhere (they throw before anything is launched).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu_reference.hpp"
#include "device_buffer.cuh"
#include "gpu_test.cuh"
#include "moekit/cuda/aux_losses.cuh"
#include "moekit/cuda/router.cuh"

namespace {

using moekit::Errc;
using moekit::GatingConfig;
using moekit::GatingRule;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::SwitchNormalization;
using moekit::VectorView;
using moekit_test::CpuReference;
using moekit_test::DeviceBuffer;
using moekit_test::from_float;
using moekit_test::random_floats;
using moekit_test::random_logits;
using moekit_test::SavedRouting;
using moekit_test::to_float;
using moekit_test::two_phase;
using moekit_test::type_name;
namespace gpu = moekit::gpu;

// ---- inputs -----------------------------------------------------------------

struct Variant {
  std::string name;
  GatingConfig gating;
  bool bias = false;
};

// Every rule and option the CPU router supports without the gate GEMM.
std::vector<Variant> variants(int e, int k) {
  std::vector<Variant> v;
  v.push_back({"softmax_topk", {}, false});
  GatingConfig g;
  g.renormalize = true;
  v.push_back({"softmax_topk_renorm_bias", g, true});
  g = {};
  g.rule = GatingRule::kTopKSoftmax;
  g.scaling = 2.0f;
  v.push_back({"topk_softmax_scaled", g, false});
  g = {};
  g.rule = GatingRule::kSigmoid;
  g.renormalize = true;
  g.scaling = 2.5f;
  v.push_back({"sigmoid_renorm_bias", g, true});
  g = {};
  g.rule = GatingRule::kSigmoid;
  v.push_back({"sigmoid_plain", g, false});
  if (e % 4 == 0 && e >= 8 && 2 * (e / 4) >= k) {
    g = {};
    g.rule = GatingRule::kSigmoid;
    g.renormalize = true;
    g.num_groups = 4;
    g.groups_kept = 2;
    g.group_score_top = 2;
    v.push_back({"sigmoid_groups_bias", g, true});
    g.rule = GatingRule::kSoftmaxTopK;
    g.group_score_top = 1;
    v.push_back({"softmax_groups", g, false});
  }
  return v;
}

bool close(double a, double b, double rel, double abs = 0.0) {
  if (std::isnan(b)) return std::isnan(a);
  if (std::isinf(b)) return a == b;
  return std::fabs(a - b) <= rel * std::fabs(b) + abs;
}

// Rounding in exp differs between the CPU's vectorised exp and the device's
// expf by a few ulp: scores and weights agree to this relative tolerance.
constexpr double kRel = 4e-6;

// ---- routing ------------------------------------------------------------------

template <class S, class T>
struct RouteRun {
  static constexpr int E = S::num_experts;
  static constexpr int K = S::top_k;
  std::int64_t tokens;
  std::vector<float> logits_f;  // the logits as the math sees them (after the dtype)
  std::vector<float> bias;
  GatingConfig gating;
  DeviceBuffer<T> logits;
  DeviceBuffer<float> d_bias;
  DeviceBuffer<float> scores;
  DeviceBuffer<std::int32_t> ids;
  DeviceBuffer<float> weights;
  DeviceBuffer<gpu::RoutingStats<S>> stats;

  RouteRun(std::int64_t t, const std::vector<float>& x, const std::vector<float>& b,
           const GatingConfig& g)
      : tokens(t),
        logits_f(x.size()),
        bias(b),
        gating(g),
        logits(x.size()),
        d_bias(b),
        scores(t * E),
        ids(t * K),
        weights(t * K),
        stats(1) {
    std::vector<T> typed(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      typed[i] = from_float<T>(x[i]);
      logits_f[i] = to_float(typed[i]);
    }
    logits.upload(typed);
  }

  gpu::RouteArgs<S, T> args() const {
    gpu::RouteArgs<S, T> a;
    a.logits = {logits.get(), tokens, E};
    a.selection_bias = {bias.empty() ? nullptr : d_bias.get(), static_cast<index_t>(bias.size())};
    a.gating = gating;
    a.scores = {scores.get(), tokens, E};
    a.expert_ids = {ids.get(), tokens, K};
    a.weights = {weights.get(), tokens, K};
    a.stats = stats.get();
    return a;
  }

  void run() {
    scores.poison();
    ids.poison();
    weights.poison();
    stats.poison();
    const auto a = args();
    two_phase([&](void* w, std::size_t& bytes) { return gpu::route(w, bytes, a, nullptr); });
  }

  SavedRouting saved() const {
    SavedRouting r;
    r.tokens = tokens;
    r.logits = logits_f;
    r.scores = scores.download();
    r.weights = weights.download();
    r.ids = ids.download();
    r.positions.assign(tokens * K, 0);
    return r;
  }
};

template <class S>
void expect_routing_matches_cpu(const std::string& what, const std::vector<float>& x,
                                const std::vector<float>& bias, const GatingConfig& g,
                                const SavedRouting& got, const gpu::RoutingStats<S>& stats) {
  constexpr int E = S::num_experts, K = S::top_k;
  const std::int64_t tokens = got.tokens;
  const auto cpu = CpuReference<E, K>::route(x, tokens, bias, g);
  const float* b = bias.empty() ? nullptr : bias.data();
  const bool logit_key = moekit::routing::selects_on_logits(g, b != nullptr);
  std::int64_t differing_rows = 0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    const float* xt = &x[t * E];
    for (int e = 0; e < E; ++e) {
      ASSERT_TRUE(close(got.scores[t * E + e], cpu.scores[t * E + e], kRel, 1e-37))
          << what << " score (" << t << ", " << e << "): " << got.scores[t * E + e] << " vs "
          << cpu.scores[t * E + e];
    }
    // Selection and weights are the CPU's functions: on the GPU's own scores
    // they give the GPU's ids exactly.
    int ids[K];
    float w[K];
    moekit::routing::select_and_weigh<E, K>(xt, &got.scores[t * E], b, g, ids, w);
    for (int k = 0; k < K; ++k) {
      ASSERT_EQ(got.ids[t * K + k], ids[k]) << what << " id (" << t << ", " << k << ")";
      ASSERT_TRUE(close(got.weights[t * K + k], w[k], kRel, 1e-37))
          << what << " weight (" << t << ", " << k << ")";
    }
    // Against the CPU's ids: equal, or (selection on scores whose last bits
    // differ) a near-tie: the keys, taken on the CPU's scores, agree.
    bool same = true;
    for (int k = 0; k < K; ++k) same = same && got.ids[t * K + k] == cpu.ids[t * K + k];
    if (same) {
      for (int k = 0; k < K; ++k) {
        ASSERT_TRUE(close(got.weights[t * K + k], cpu.weights[t * K + k], kRel, 1e-37))
            << what << " weight vs CPU (" << t << ", " << k << ")";
      }
      continue;
    }
    ++differing_rows;
    ASSERT_FALSE(logit_key) << what << ": ids differ in row " << t
                            << " though selection reads only the logits";
    for (int k = 0; k < K; ++k) {
      const auto key = [&](int e) {
        return moekit::routing::selection_key(false, xt[e], cpu.scores[t * E + e], b, e);
      };
      const float a = key(got.ids[t * K + k]), c = key(cpu.ids[t * K + k]);
      ASSERT_TRUE(close(a, c, 1e-5, 1e-6))
          << what << " row " << t << " slot " << k << ": GPU expert " << got.ids[t * K + k]
          << " (key " << a << "), CPU expert " << cpu.ids[t * K + k] << " (key " << c << ")";
    }
  }
  EXPECT_LE(differing_rows, tokens / 100 + 1) << what << ": too many near-ties";

  EXPECT_EQ(stats.tokens, tokens) << what;
  EXPECT_EQ(stats.non_finite_logits, cpu.non_finite) << what;
  std::int64_t max_assigned = 0, count_diff = 0;
  for (int e = 0; e < E; ++e) {
    max_assigned = std::max(max_assigned, stats.assigned[e]);
    count_diff += std::llabs(stats.assigned[e] - cpu.assigned[e]);
    EXPECT_TRUE(close(stats.mean_distribution[e], cpu.mean_distribution[e], 1e-5, 1e-12))
        << what << " mean_distribution[" << e << "]";
  }
  EXPECT_LE(count_diff, 2 * K * differing_rows) << what;
  EXPECT_EQ(stats.max_assigned, max_assigned) << what;
  EXPECT_TRUE(close(stats.z_loss, cpu.z_loss, 1e-5)) << what << " z_loss";
}

template <class S, class T>
void check_route(std::int64_t tokens, std::uint32_t seed) {
  constexpr int E = S::num_experts, K = S::top_k;
  for (const Variant& v : variants(E, K)) {
    const std::string what = std::string(type_name<T>()) + " E=" + std::to_string(E) +
                             " K=" + std::to_string(K) + " T=" + std::to_string(tokens) + " " +
                             v.name;
    SCOPED_TRACE(what);
    const auto x = random_logits(tokens, E, seed++);
    const auto bias = v.bias ? random_floats(E, -0.5f, 0.5f, seed++) : std::vector<float>{};
    RouteRun<S, T> run(tokens, x, bias, v.gating);
    run.run();
    const SavedRouting got = run.saved();
    const auto stats = run.stats.download()[0];
    expect_routing_matches_cpu<S>(what, run.logits_f, bias, v.gating, got, stats);

    // Rerun on poisoned outputs: the same bits.
    run.run();
    const SavedRouting again = run.saved();
    const auto stats2 = run.stats.download()[0];
    EXPECT_EQ(0, std::memcmp(got.scores.data(), again.scores.data(), got.scores.size() * 4));
    EXPECT_EQ(got.ids, again.ids);
    EXPECT_EQ(0, std::memcmp(got.weights.data(), again.weights.data(), got.weights.size() * 4));
    EXPECT_EQ(0, std::memcmp(&stats, &stats2, sizeof stats));

    // Backward of the gate on the GPU's routing, against the CPU's.
    const auto dw = random_floats(tokens * K, -1.0f, 1.0f, seed++);
    DeviceBuffer<float> d_dw(dw);
    DeviceBuffer<float> dlogits(tokens * E);
    DeviceBuffer<std::int64_t> invalid(1);
    gpu::GateBackwardArgs<S, T> b;
    b.logits = {run.logits.get(), tokens, E};
    b.scores = {run.scores.get(), tokens, E};
    b.expert_ids = {run.ids.get(), tokens, K};
    b.dweights = {d_dw.get(), tokens, K};
    b.gating = v.gating;
    b.dlogits = {dlogits.get(), tokens, E};
    b.invalid_rows = invalid.get();
    dlogits.poison();
    invalid.poison();
    MOEKIT_CUDA_CHECK(gpu::backward_gate(b, nullptr));
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    const auto dx = dlogits.download();
    EXPECT_EQ(invalid.download()[0], 0);
    const auto ref = CpuReference<E, K>::backward_gate(got, dw, v.gating);
    // nvcc contracts multiply-adds into FMAs and the CPU reference does not:
    // the products that cancel in p (dw - sum p dw) then round differently,
    // by a few ulp of the largest gradient, not of the element. The CPU
    // router's route and backward_gate compiled with and without contraction
    // differ by up to 2e-6 of the largest |dlogit| (3.5 million elements,
    // E = 8, 16, 64, the rules above), so the floor is 1e-5 of it, as in the
    // aux-loss checks below.
    double scale = 0.0;
    for (const float r : ref) {
      if (std::isfinite(r)) scale = std::max(scale, std::fabs(double(r)));
    }
    for (std::size_t i = 0; i < dx.size(); ++i) {
      ASSERT_TRUE(close(dx[i], ref[i], kRel, 1e-5 * scale + 1e-30)) << "dlogits[" << i << "]";
    }
  }
}

template <class S>
class CudaRouter : public ::testing::Test {};
using RouteSpecs =
    ::testing::Types<MoeSpec<1, 1>, MoeSpec<4, 2>, MoeSpec<6, 3>, MoeSpec<6, 6>, MoeSpec<8, 2>,
                     MoeSpec<8, 3>, MoeSpec<16, 4>, MoeSpec<60, 4>, MoeSpec<64, 8>, MoeSpec<128, 8>,
                     MoeSpec<256, 8>, MoeSpec<384, 22>, MoeSpec<512, 22>>;
TYPED_TEST_SUITE(CudaRouter, RouteSpecs);

TYPED_TEST(CudaRouter, Fp32MatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  check_route<TypeParam, float>(1000, 11);
  check_route<TypeParam, float>(1, 12);
}

TYPED_TEST(CudaRouter, Bf16MatchesCpuOnConvertedValues) {
  MOEKIT_REQUIRE_GPU();
  check_route<TypeParam, __nv_bfloat16>(777, 21);
}

TYPED_TEST(CudaRouter, Fp16MatchesCpuOnConvertedValues) {
  MOEKIT_REQUIRE_GPU();
  check_route<TypeParam, __half>(777, 31);
}

TEST(CudaRouterEdges, ZeroTokensWritesEmptyStats) {
  MOEKIT_REQUIRE_GPU();
  using S = MoeSpec<8, 2>;
  RouteRun<S, float> run(0, {}, {}, {});
  run.run();
  const auto stats = run.stats.download()[0];
  EXPECT_EQ(stats.tokens, 0);
  EXPECT_EQ(stats.non_finite_logits, 0);
  EXPECT_EQ(stats.max_assigned, 0);
  EXPECT_EQ(stats.z_loss, 0.0);
  for (int e = 0; e < 8; ++e) {
    EXPECT_EQ(stats.assigned[e], 0);
    EXPECT_EQ(stats.mean_distribution[e], 0.0);
  }
}

TEST(CudaRouterEdges, TiesPickLowerIndexAndOneExpertTakesAll) {
  MOEKIT_REQUIRE_GPU();
  using S = MoeSpec<8, 3>;
  constexpr std::int64_t tokens = 300;
  std::vector<float> x(tokens * 8, 0.5f);                            // every key equal: ids 0, 1, 2
  for (std::int64_t t = 0; t < tokens; t += 2) x[t * 8 + 5] = 9.0f;  // expert 5 first
  RouteRun<S, float> run(tokens, x, {}, {});
  run.run();
  const auto ids = run.ids.download();
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::vector<int> want =
        t % 2 == 0 ? std::vector<int>{5, 0, 1} : std::vector<int>{0, 1, 2};
    for (int k = 0; k < 3; ++k) ASSERT_EQ(ids[t * 3 + k], want[k]) << t << ", " << k;
  }
  const auto stats = run.stats.download()[0];
  EXPECT_EQ(stats.assigned[0], tokens);
  EXPECT_EQ(stats.assigned[5], tokens / 2);
  EXPECT_EQ(stats.max_assigned, tokens);
}

// ---- aux losses ---------------------------------------------------------------

template <class S, class T>
void check_losses(std::int64_t tokens, std::uint32_t seed) {
  constexpr int E = S::num_experts, K = S::top_k;
  for (const Variant& v : variants(E, K)) {
    const std::string what = std::string(type_name<T>()) + " E=" + std::to_string(E) +
                             " K=" + std::to_string(K) + " " + v.name;
    SCOPED_TRACE(what);
    const auto x = random_logits(tokens, E, seed++);
    const auto bias = v.bias ? random_floats(E, -0.5f, 0.5f, seed++) : std::vector<float>{};
    RouteRun<S, T> run(tokens, x, bias, v.gating);
    run.run();
    SavedRouting r = run.saved();  // both backends read the GPU's routing
    std::mt19937 gen(seed++);
    for (auto& p : r.positions) p = gen() % 10 == 0 ? -1 : 0;  // some dropped slots
    DeviceBuffer<float> scores(r.scores);
    DeviceBuffer<std::int32_t> ids(r.ids), positions(r.positions);
    DeviceBuffer<float> weights(r.weights);
    DeviceBuffer<double> loss(1);
    DeviceBuffer<std::int64_t> invalid(1);
    const auto init = random_floats(tokens * E, -1.0f, 1.0f, seed++);
    DeviceBuffer<float> dlogits(init);
    const MatrixView<const T> logits(run.logits.get(), tokens, E);

    const auto expect_grad = [&](const std::vector<float>& ref, const char* name) {
      const auto got = dlogits.download();
      double scale = 0.0;
      for (std::size_t i = 0; i < ref.size(); ++i) {
        scale = std::max(scale, std::fabs(double(ref[i]) - init[i]));
      }
      for (std::size_t i = 0; i < ref.size(); ++i) {
        ASSERT_TRUE(close(got[i], ref[i], 1e-6, 1e-5 * scale + 1e-30))
            << name << " dlogits[" << i << "]";
      }
    };
    const auto rerun_same = [&](auto&& call, const char* name) {
      const double first = loss.download()[0];
      const auto first_grad = dlogits.download();
      loss.poison();
      dlogits.upload(init);
      two_phase(call);
      EXPECT_EQ(0, std::memcmp(&first, loss.download().data(), sizeof first)) << name;
      EXPECT_EQ(first_grad, dlogits.download()) << name;
    };

    for (auto norm : {SwitchNormalization::kTokensTimesK, SwitchNormalization::kTokens}) {
      gpu::SwitchLossArgs<S, T> a;
      a.rule = v.gating.rule;
      a.logits = logits;
      a.scores = {scores.get(), tokens, E};
      a.expert_ids = {ids.get(), tokens, K};
      a.normalization = norm;
      a.coeff = 0.7f;
      a.loss = loss.get();
      a.dlogits = {dlogits.get(), tokens, E};
      a.invalid_ids = invalid.get();
      loss.poison();
      invalid.poison();
      dlogits.upload(init);
      const auto call = [&](void* w, std::size_t& bytes) { return gpu::switch_loss(w, bytes, a); };
      two_phase(call);
      std::vector<float> ref = init;
      const double l = CpuReference<E, K>::switch_loss(v.gating.rule, r, norm, 0.7f, ref);
      EXPECT_TRUE(close(loss.download()[0], l, 1e-9))
          << "switch " << loss.download()[0] << " vs " << l;
      EXPECT_EQ(invalid.download()[0], 0);
      expect_grad(ref, "switch");
      rerun_same(call, "switch rerun");
    }
    for (std::int64_t length : {tokens / 4, tokens}) {
      gpu::SwitchLossArgs<S, T> a;
      a.rule = v.gating.rule;
      a.logits = logits;
      a.scores = {scores.get(), tokens, E};
      a.expert_ids = {ids.get(), tokens, K};
      a.coeff = 1.3f;
      a.loss = loss.get();
      a.dlogits = {dlogits.get(), tokens, E};
      loss.poison();
      dlogits.upload(init);
      const auto call = [&](void* w, std::size_t& bytes) {
        return gpu::sequence_aux_loss(w, bytes, a, length);
      };
      two_phase(call);
      std::vector<float> ref = init;
      const double l = CpuReference<E, K>::sequence_loss(v.gating.rule, r, length, 1.3f, ref);
      EXPECT_TRUE(close(loss.download()[0], l, 1e-9)) << "sequence L=" << length;
      expect_grad(ref, "sequence");
      rerun_same(call, "sequence rerun");
    }
    {
      gpu::ZLossArgs<S, T> a;
      a.logits = logits;
      a.coeff = 0.01f;
      a.loss = loss.get();
      a.dlogits = {dlogits.get(), tokens, E};
      loss.poison();
      dlogits.upload(init);
      const auto call = [&](void* w, std::size_t& bytes) { return gpu::z_loss(w, bytes, a); };
      two_phase(call);
      std::vector<float> ref = init;
      const double l = CpuReference<E, K>::z_loss(r, 0.01f, ref);
      EXPECT_TRUE(close(loss.download()[0], l, 1e-5)) << "z_loss";
      expect_grad(ref, "z_loss");
      rerun_same(call, "z_loss rerun");
    }
    {
      gpu::ImportanceLoadArgs<S, T> a;
      a.gating = v.gating;
      a.logits = logits;
      a.scores = {scores.get(), tokens, E};
      a.expert_ids = {ids.get(), tokens, K};
      a.weights = {weights.get(), tokens, K};
      a.positions = {positions.get(), tokens, K};
      a.importance_weight = 0.5f;
      a.load_weight = 2.0f;
      a.coeff = 0.3f;
      a.loss = loss.get();
      a.dlogits = {dlogits.get(), tokens, E};
      a.invalid_ids = invalid.get();
      loss.poison();
      invalid.poison();
      dlogits.upload(init);
      const auto call = [&](void* w, std::size_t& bytes) {
        return gpu::importance_load_loss(w, bytes, a);
      };
      two_phase(call);
      std::vector<float> ref = init;
      const double l = CpuReference<E, K>::importance_load(v.gating, r, 0.5f, 2.0f, 0.3f, ref);
      EXPECT_TRUE(close(loss.download()[0], l, 1e-9, 1e-12)) << "importance/load";
      EXPECT_EQ(invalid.download()[0], 0);
      expect_grad(ref, "importance/load");
      rerun_same(call, "importance/load rerun");
    }
    {
      // The aux-loss-free bias update from the route's counts.
      DeviceBuffer<float> d_bias(std::vector<float>(E, 0.0f));
      MOEKIT_CUDA_CHECK(
          gpu::update_expert_bias<S>(d_bias.get(), gpu::assigned_counts(run.stats.get()), 1e-3f));
      MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
      const auto stats = run.stats.download()[0];
      const std::vector<std::int64_t> host_counts(stats.assigned, stats.assigned + E);
      EXPECT_EQ(d_bias.download(), (CpuReference<E, K>::bias_update(1e-3f, host_counts)));
    }
  }
}

template <class S>
class CudaAuxLosses : public ::testing::Test {};
using LossSpecs =
    ::testing::Types<MoeSpec<1, 1>, MoeSpec<4, 4>, MoeSpec<8, 1>, MoeSpec<8, 2>, MoeSpec<16, 4>,
                     MoeSpec<60, 4>, MoeSpec<60, 6>, MoeSpec<64, 8>, MoeSpec<384, 22>>;
TYPED_TEST_SUITE(CudaAuxLosses, LossSpecs);

TYPED_TEST(CudaAuxLosses, Fp32MatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  check_losses<TypeParam, float>(1000, 101);
}

TEST(CudaAuxLossesTypes, Bf16AndFp16MatchCpu) {
  MOEKIT_REQUIRE_GPU();
  check_losses<MoeSpec<8, 2>, __nv_bfloat16>(640, 201);
  check_losses<MoeSpec<64, 8>, __half>(640, 301);
}

TEST(CudaAuxLossesEdges, ZeroTokensGiveZero) {
  MOEKIT_REQUIRE_GPU();
  using S = MoeSpec<8, 2>;
  DeviceBuffer<double> loss(1);
  loss.poison();
  gpu::ZLossArgs<S> z;
  z.logits = {static_cast<const float*>(nullptr), 0, 8};
  z.loss = loss.get();
  two_phase([&](void* w, std::size_t& bytes) { return gpu::z_loss(w, bytes, z); });
  EXPECT_EQ(loss.download()[0], 0.0);
  loss.poison();
  gpu::SwitchLossArgs<S> s;
  s.scores = {static_cast<const float*>(nullptr), 0, 8};
  s.expert_ids = {static_cast<const std::int32_t*>(nullptr), 0, 2};
  s.loss = loss.get();
  two_phase([&](void* w, std::size_t& bytes) { return gpu::switch_loss(w, bytes, s); });
  EXPECT_EQ(loss.download()[0], 0.0);
}

// Out-of-range saved ids are skipped and counted, never used as an index.
TEST(CudaAuxLossesBadIds, OutOfRangeIdsAreCountedAndSkipped) {
  MOEKIT_REQUIRE_GPU();
  using S = MoeSpec<8, 2>;
  constexpr std::int64_t tokens = 64;
  const auto x = random_logits(tokens, 8, 5);
  RouteRun<S, float> run(tokens, x, {}, {});
  run.run();
  SavedRouting r = run.saved();
  r.ids[5 * 2 + 1] = 8;
  r.ids[9 * 2 + 0] = -3;
  r.ids[20 * 2 + 1] = r.ids[20 * 2 + 0];  // repeated
  DeviceBuffer<float> scores(r.scores), weights(r.weights);
  DeviceBuffer<std::int32_t> ids(r.ids);
  DeviceBuffer<double> loss(1);
  DeviceBuffer<std::int64_t> invalid(1);
  DeviceBuffer<float> dlogits(tokens * 8);
  gpu::SwitchLossArgs<S> s;
  s.scores = {scores.get(), tokens, 8};
  s.expert_ids = {ids.get(), tokens, 2};
  s.loss = loss.get();
  s.invalid_ids = invalid.get();
  two_phase([&](void* w, std::size_t& bytes) { return gpu::switch_loss(w, bytes, s); });
  EXPECT_EQ(invalid.download()[0], 2);
  EXPECT_TRUE(std::isfinite(loss.download()[0]));

  gpu::GateBackwardArgs<S> b;
  b.logits = {run.logits.get(), tokens, 8};
  b.scores = {scores.get(), tokens, 8};
  b.expert_ids = {ids.get(), tokens, 2};
  b.dweights = {weights.get(), tokens, 2};
  b.dlogits = {dlogits.get(), tokens, 8};
  b.invalid_rows = invalid.get();
  dlogits.poison();
  MOEKIT_CUDA_CHECK(gpu::backward_gate(b));
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(invalid.download()[0], 3);
  const auto dx = dlogits.download();
  for (std::int64_t t : {5, 9, 20}) {
    for (int e = 0; e < 8; ++e) EXPECT_EQ(dx[t * 8 + e], 0.0f) << t << ", " << e;
  }
  for (float v : dx) ASSERT_TRUE(std::isfinite(v));
}

// ---- argument checks: host-side, before any launch (run everywhere) ------------

// Distinct fake device addresses: validation never dereferences them, and a
// check that wrongly passed would reach a launch and fail the EXPECT_THROW.
using moekit_test::expect_error;
using moekit_test::fake;
using S82 = MoeSpec<8, 2>;

gpu::RouteArgs<S82> good_route_args(std::int64_t tokens) {
  gpu::RouteArgs<S82> a;
  a.logits = {fake<const float>(1), tokens, 8};
  a.scores = {fake<float>(2), tokens, 8};
  a.expert_ids = {fake<std::int32_t>(3), tokens, 2};
  a.weights = {fake<float>(4), tokens, 2};
  return a;
}

TEST(CudaRouterBadInput, SizeQueryReadsOnlyTheTokenCount) {
  gpu::RouteArgs<S82> a;  // no pointers at all
  a.logits = {static_cast<const float*>(nullptr), 5000, 8};
  std::size_t bytes = 0;
  EXPECT_EQ(gpu::route(nullptr, bytes, a), cudaSuccess);
  EXPECT_GE(bytes, 5000u / 128 * 8 * (4 + 8));
  EXPECT_EQ(bytes % 256, 0u);
  a.logits = {static_cast<const float*>(nullptr), 0, 8};
  EXPECT_EQ(gpu::route(nullptr, bytes, a), cudaSuccess);
  EXPECT_GE(bytes, 1u);  // never 0: the second call needs a non-null pointer
}

TEST(CudaRouterBadInput, RouteArgumentsAreRejectedBeforeLaunch) {
  void* ws = fake<void>(100);
  std::size_t bytes = 1 << 20;
  auto a = good_route_args(100);
  a.scores = {fake<float>(2), 100, 7};
  expect_error([&] { (void)gpu::route(ws, bytes, a); }, Errc::kShapeMismatch, "args.scores");
  a = good_route_args(100);
  a.expert_ids = {static_cast<std::int32_t*>(nullptr), 100, 2};
  expect_error([&] { (void)gpu::route(ws, bytes, a); }, Errc::kNullPointer, "args.expert_ids");
  a = good_route_args(100);
  a.weights = {fake<float>(4), 99, 2};
  expect_error([&] { (void)gpu::route(ws, bytes, a); }, Errc::kShapeMismatch, "args.weights");
  a = good_route_args(100);
  a.selection_bias = {fake<const float>(5), 7};
  expect_error([&] { (void)gpu::route(ws, bytes, a); }, Errc::kShapeMismatch,
               "args.selection_bias");
  a = good_route_args(100);
  a.gating.num_groups = 3;
  expect_error([&] { (void)gpu::route(ws, bytes, a); }, Errc::kInvalidArgument,
               "gating.num_groups");
  a = good_route_args(100);
  a.gating.scaling = 0.0f;
  expect_error([&] { (void)gpu::route(ws, bytes, a); }, Errc::kInvalidArgument, "gating.scaling");
  a = good_route_args(100);
  a.gating.rule = static_cast<GatingRule>(7);
  expect_error([&] { (void)gpu::route(ws, bytes, a); }, Errc::kInvalidArgument, "gating.rule");
  a = good_route_args(100);
  std::size_t small = 16;
  expect_error([&] { (void)gpu::route(ws, small, a); }, Errc::kShapeMismatch, "temp_storage_bytes");
  expect_error([&] { (void)gpu::route(fake<char>(100) + 8, bytes, a); }, Errc::kInvalidArgument,
               "aligned");
  a.logits = {fake<const float>(1), -1, 8};
  expect_error([&] { (void)gpu::route(nullptr, bytes, a); }, Errc::kInvalidArgument, "negative");
}

TEST(CudaRouterBadInput, BackwardArgumentsAreRejectedBeforeLaunch) {
  gpu::GateBackwardArgs<S82> b;
  b.logits = {fake<const float>(1), 10, 8};
  b.scores = {fake<const float>(2), 10, 8};
  b.expert_ids = {fake<const std::int32_t>(3), 10, 2};
  b.dweights = {fake<const float>(4), 10, 3};
  b.dlogits = {fake<float>(5), 10, 8};
  expect_error([&] { (void)gpu::backward_gate(b); }, Errc::kShapeMismatch, "args.dweights");
  b.dweights = {fake<const float>(4), 10, 2};
  b.dlogits = {static_cast<float*>(nullptr), 10, 8};
  expect_error([&] { (void)gpu::backward_gate(b); }, Errc::kNullPointer, "args.dlogits");
}

TEST(CudaAuxLossesBadInput, LossArgumentsAreRejectedBeforeLaunch) {
  void* ws = fake<void>(100);
  std::size_t bytes = 1 << 20;
  gpu::SwitchLossArgs<S82> s;
  s.scores = {fake<const float>(2), 12, 8};
  s.expert_ids = {fake<const std::int32_t>(3), 12, 2};
  expect_error([&] { (void)gpu::switch_loss(ws, bytes, s); }, Errc::kNullPointer, "args.loss");
  s.loss = fake<double>(6);
  s.coeff = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { (void)gpu::switch_loss(ws, bytes, s); }, Errc::kInvalidArgument, "args.coeff");
  s.coeff = 1.0f;
  s.dlogits = {fake<float>(7), 12, 9};
  expect_error([&] { (void)gpu::switch_loss(ws, bytes, s); }, Errc::kShapeMismatch, "args.dlogits");
  s.dlogits = {};
  s.normalization = static_cast<SwitchNormalization>(5);
  expect_error([&] { (void)gpu::switch_loss(ws, bytes, s); }, Errc::kInvalidArgument,
               "normalization");
  s.normalization = SwitchNormalization::kTokens;
  expect_error([&] { (void)gpu::sequence_aux_loss(ws, bytes, s, 5); }, Errc::kShapeMismatch,
               "sequence_length");
  expect_error([&] { (void)gpu::sequence_aux_loss(ws, bytes, s, 0); }, Errc::kInvalidArgument,
               "sequence_length");

  gpu::ZLossArgs<S82> z;
  z.logits = {fake<const float>(1), 12, 8};
  z.loss = fake<double>(6);
  z.dlogits = {fake<float>(7), 11, 8};
  expect_error([&] { (void)gpu::z_loss(ws, bytes, z); }, Errc::kShapeMismatch, "args.dlogits");

  gpu::ImportanceLoadArgs<S82> il;
  il.expert_ids = {fake<const std::int32_t>(3), 12, 2};
  il.weights = {fake<const float>(4), 12, 2};
  il.loss = fake<double>(6);
  il.load_weight = -1.0f;
  expect_error([&] { (void)gpu::importance_load_loss(ws, bytes, il); }, Errc::kInvalidArgument,
               "args.load_weight");
  il.load_weight = 1.0f;
  il.positions = {fake<const std::int32_t>(8), 12, 3};
  expect_error([&] { (void)gpu::importance_load_loss(ws, bytes, il); }, Errc::kShapeMismatch,
               "args.positions");

  expect_error(
      [&] { (void)gpu::update_expert_bias<S82>(fake<float>(1), fake<std::int64_t>(2), -1.0f); },
      Errc::kInvalidArgument, "gamma");
  expect_error([&] { (void)gpu::update_expert_bias<S82>(nullptr, fake<std::int64_t>(2), 1.0f); },
               Errc::kNullPointer, "bias");
}

// ---- host-side checks of the kernels' own math (run everywhere) -----------------

// The route kernel's statistics add q_t with distribution_scale/term in
// per-block token order; on the host, in one block, they equal the CPU's
// mean_distribution within rounding.
TEST(CudaRouterHostMath, DistributionTermsMatchTheCpuStatistics) {
  constexpr int E = 60, K = 4;
  constexpr std::int64_t tokens = 500;
  for (GatingRule rule : {GatingRule::kSoftmaxTopK, GatingRule::kSigmoid}) {
    GatingConfig g;
    g.rule = rule;
    const auto x = random_logits(tokens, E, 77);
    const auto cpu = CpuReference<E, K>::route(x, tokens, {}, g);
    std::vector<double> sum(E, 0.0);
    double lse = 0.0;
    for (std::int64_t t = 0; t < tokens; ++t) {
      const double scale = gpu::detail::distribution_scale<E>(rule, &cpu.scores[t * E]);
      for (int e = 0; e < E; ++e) {
        sum[e] += gpu::detail::distribution_term<E>(scale, cpu.scores[t * E + e]);
      }
      lse += moekit::routing::z_loss_token<E>(&x[t * E], 0.0, 1.0, nullptr);
    }
    for (int e = 0; e < E; ++e) {
      EXPECT_TRUE(close(sum[e] / tokens, cpu.mean_distribution[e], 1e-12, 1e-15)) << e;
    }
    EXPECT_TRUE(close(lse / tokens, cpu.z_loss, 1e-6));
  }
}

// The warp backward's dot product over the K selected experts adds in
// increasing expert order, so it equals softmax_backward's sum over all E
// (whose other terms are zero) bit for bit.
TEST(CudaRouterHostMath, SelectedDotAddsInExpertOrder) {
  constexpr int E = 384, K = 22;
  std::mt19937 rng(5);
  for (int trial = 0; trial < 100; ++trial) {
    std::vector<int> experts(E);
    std::iota(experts.begin(), experts.end(), 0);
    std::shuffle(experts.begin(), experts.end(), rng);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    int ids[K];
    float g[K], p[K];
    std::vector<float> dense_g(E, 0.0f), dense_p(E, 0.0f);
    for (int k = 0; k < K; ++k) {
      ids[k] = experts[k];
      g[k] = u(rng);
      p[k] = 0.5f * (u(rng) + 1.0f);
      dense_g[ids[k]] = g[k];
      dense_p[ids[k]] = p[k];
    }
    float reference = 0.0f;
    for (int e = 0; e < E; ++e) reference += dense_g[e] * dense_p[e];
    const float dot = gpu::detail::dot_in_expert_order<K>(ids, g, p);
    EXPECT_EQ(0, std::memcmp(&dot, &reference, sizeof dot)) << dot << " vs " << reference;
  }
}

}  // namespace
