// The CUDA dispatch plan and row movement (moekit/cuda/dispatch.cuh). The
// plan against the CPU router's capacity and cpu::dispatch_offsets on the
// same routing (cpu_reference.hpp), bit for bit; row alignment, invalid ids
// and signed-zero/NaN weights against a host loop of the documented rule;
// dispatch, combine and their backward in fp32/bf16/fp16 against float64
// loops over the plan, on 16-byte vector rows and scalar rows, dense and
// strided. Outputs are poisoned before each run; reruns are bit-identical.
// Tests that need a device skip without one; the argument checks and the
// host-device helpers run everywhere.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_reference.hpp"
#include "device_buffer.cuh"
#include "gpu_test.cuh"
#include "moekit/cuda/dispatch.cuh"

namespace {

using moekit::CapacityConfig;
using moekit::DropPolicy;
using moekit::Errc;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::VectorView;
using moekit_test::CpuCappedRouting;
using moekit_test::CpuReference;
using moekit_test::DeviceBuffer;
using moekit_test::from_float;
using moekit_test::to_float;
using moekit_test::two_phase;
using moekit_test::type_name;
namespace gpu = moekit::gpu;

using moekit_test::random_floats;
using moekit_test::random_logits;
using ::testing::Test;

// ---- inputs -----------------------------------------------------------------

// Column e - 1 far above the rest: every token's first choice is expert e - 1.
std::vector<float> one_expert_logits(std::int64_t tokens, int e, std::uint32_t seed) {
  std::vector<float> x = random_logits(tokens, e, seed);
  for (std::int64_t t = 0; t < tokens; ++t) x[t * e + (e - 1)] = 50.0f;
  return x;
}

// Every row the same: every token has the same experts and the same weights.
std::vector<float> identical_rows_logits(std::int64_t tokens, int e, std::uint32_t seed) {
  const std::vector<float> first = random_logits(1, e, seed);
  std::vector<float> x;
  for (std::int64_t t = 0; t < tokens; ++t) x.insert(x.end(), first.begin(), first.end());
  return x;
}

// K distinct experts per token, uniformly at random (no router needed).
std::vector<std::int32_t> random_ids(std::int64_t tokens, int e, int k, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<std::int32_t> all(e), ids;
  std::iota(all.begin(), all.end(), 0);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (int j = 0; j < k; ++j) {
      std::uniform_int_distribution<int> pick(j, e - 1);
      std::swap(all[j], all[pick(gen)]);
      ids.push_back(all[j]);
    }
  }
  return ids;
}

std::string describe(const CapacityConfig& c) {
  std::ostringstream s;
  s << (c.policy == DropPolicy::kPosition ? "kPosition" : "kProbs") << " factor " << c.factor;
  return s.str();
}

// Dropless three ways (factor 0 for both policies, a negative factor), then
// each policy under, at and over the balanced load.
std::vector<CapacityConfig> capacity_cases() {
  return {{0.0, DropPolicy::kPosition}, {0.0, DropPolicy::kProbs},    {-1.0, DropPolicy::kProbs},
          {0.5, DropPolicy::kPosition}, {1.0, DropPolicy::kPosition}, {1.25, DropPolicy::kPosition},
          {0.5, DropPolicy::kProbs},    {1.0, DropPolicy::kProbs},    {1.25, DropPolicy::kProbs}};
}

// A value gtest can print: 16-bit floats as float.
template <class T>
auto printable(const T& v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) {
    return to_float(v);
  } else {
    return v;
  }
}

// Bit-for-bit equality of two arrays; on failure, the first difference.
template <class T>
::testing::AssertionResult same_bits(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << got.size() << " elements, expected " << want.size();
  }
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      return ::testing::AssertionFailure()
             << "first difference at " << i << ": " << printable(got[i]) << ", expected "
             << printable(want[i]);
    }
  }
  return ::testing::AssertionSuccess();
}

template <class T>
bool bits_equal(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <class T>
bool is_poison(const T& v) {
  unsigned char bytes[sizeof(T)];
  std::memcpy(bytes, &v, sizeof(T));
  return std::all_of(std::begin(bytes), std::end(bytes), [](unsigned char b) { return b == 0xFF; });
}

index_t round_up(index_t n, int a) { return (n + a - 1) / a * a; }

// ---- expected plans ---------------------------------------------------------

struct ExpectedPlan {
  std::vector<std::int32_t> positions;  // T x K
  std::vector<float> weights;           // T x K, 0 where dropped
  std::vector<index_t> offsets;         // E + 1
  std::vector<std::int32_t> row_slots;  // max rows, -1 where no slot lands
  std::int64_t capacity = 0, dropped = 0, invalid = 0;
  std::vector<std::int64_t> assigned, kept;  // E
};

// Offsets (kept counts padded to the alignment, scanned) and row_slots from
// the positions and kept counts already in `plan`.
void lay_out_rows(const std::vector<std::int32_t>& ids, int experts, int alignment,
                  index_t max_rows, ExpectedPlan& plan) {
  plan.offsets.assign(experts + 1, 0);
  for (int e = 0; e < experts; ++e) {
    plan.offsets[e + 1] = plan.offsets[e] + round_up(plan.kept[e], alignment);
  }
  plan.row_slots.assign(max_rows, -1);
  for (std::size_t s = 0; s < ids.size(); ++s) {
    if (plan.positions[s] < 0) continue;
    plan.row_slots.at(plan.offsets[ids[s]] + plan.positions[s]) = static_cast<std::int32_t>(s);
  }
}

// The plan that the CPU router's capacity gives, laid out with `alignment`.
ExpectedPlan plan_from_cpu(const CpuCappedRouting& cpu, int experts, int alignment,
                           index_t max_rows) {
  ExpectedPlan plan;
  plan.positions = cpu.positions;
  plan.weights = cpu.capped_weights;
  plan.capacity = cpu.capacity;
  plan.dropped = cpu.dropped;
  plan.assigned = cpu.assigned;
  plan.kept = cpu.kept;
  lay_out_rows(cpu.ids, experts, alignment, max_rows, plan);
  return plan;
}

// Weight order of kProbs: larger first, -0 equal to +0, NaN after everything.
bool heavier(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return !std::isnan(a) && std::isnan(b);
  return a > b;
}

// The documented rule, one slot at a time: an id outside [0, E) is dropped
// and counted; kPosition keeps each expert's first C slots, kProbs its C
// heaviest (ties: the earlier slot); the kept are numbered in slot order.
template <int E, int K>
ExpectedPlan host_plan(const std::vector<std::int32_t>& ids, const std::vector<float>& weights,
                       std::int64_t tokens, const CapacityConfig& c, int alignment,
                       index_t max_rows) {
  const std::int64_t capacity = moekit::expert_capacity(tokens, E, K, c.factor);
  std::vector<std::vector<std::int32_t>> slots_of(E);
  ExpectedPlan plan;
  for (std::int64_t s = 0; s < tokens * K; ++s) {
    const std::int32_t e = ids[s];
    if (e < 0 || e >= E) {
      ++plan.invalid;
    } else {
      slots_of[e].push_back(static_cast<std::int32_t>(s));
    }
  }
  std::vector<char> keep(tokens * K, 0);
  for (auto& order : slots_of) {
    if (c.factor > 0.0 && c.policy == DropPolicy::kProbs) {
      std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
        return heavier(weights[a], weights[b]);
      });
    }
    for (std::size_t i = 0; i < order.size() && static_cast<std::int64_t>(i) < capacity; ++i) {
      keep[order[i]] = 1;
    }
  }
  plan.capacity = capacity;
  plan.positions.assign(tokens * K, -1);
  plan.weights = weights;
  plan.assigned.assign(E, 0);
  plan.kept.assign(E, 0);
  for (std::int64_t s = 0; s < tokens * K; ++s) {
    if (!keep[s]) {
      plan.weights[s] = 0.0f;
      continue;
    }
    plan.positions[s] = static_cast<std::int32_t>(plan.kept[ids[s]]++);
  }
  for (int e = 0; e < E; ++e) {
    plan.assigned[e] = static_cast<std::int64_t>(slots_of[e].size());
    plan.dropped += plan.assigned[e] - plan.kept[e];
  }
  lay_out_rows(ids, E, alignment, max_rows, plan);
  return plan;
}

// ---- the plan on the device -----------------------------------------------------

template <class S>
struct PlanResult {
  std::vector<std::int32_t> positions;
  std::vector<float> weights;
  std::vector<index_t> offsets;
  std::vector<std::int32_t> row_slots;
  gpu::DispatchStats<S> stats;
  std::int64_t invalid;
};

template <class S>
struct PlanRun {
  static constexpr int E = S::num_experts;
  static constexpr int K = S::top_k;
  std::int64_t tokens;
  CapacityConfig capacity;
  int alignment;
  index_t max_rows;
  std::vector<float> weights_in;
  DeviceBuffer<std::int32_t> ids;
  DeviceBuffer<float> weights;
  DeviceBuffer<std::int32_t> positions;
  DeviceBuffer<index_t> offsets;
  DeviceBuffer<std::int32_t> row_slots;
  DeviceBuffer<gpu::DispatchStats<S>> stats;
  DeviceBuffer<std::int64_t> invalid;

  PlanRun(std::int64_t t, const std::vector<std::int32_t>& host_ids,
          const std::vector<float>& host_weights, const CapacityConfig& c, int a)
      : tokens(t),
        capacity(c),
        alignment(a),
        max_rows(gpu::max_dispatch_rows<S>(t, c, a)),
        weights_in(host_weights),
        ids(host_ids),
        weights(host_weights.size()),
        positions(static_cast<std::size_t>(t * K)),
        offsets(E + 1),
        row_slots(static_cast<std::size_t>(max_rows)),
        stats(1),
        invalid(1) {}

  gpu::DispatchPlanArgs<S> args() const {
    gpu::DispatchPlanArgs<S> a;
    a.expert_ids = {ids.get(), tokens, K};
    a.weights = {weights.get(), tokens, K};
    a.capacity = capacity;
    a.row_alignment = alignment;
    a.positions = {positions.get(), tokens, K};
    a.offsets = {offsets.get(), E + 1};
    a.row_slots = {row_slots.get(), max_rows};
    a.stats = stats.get();
    a.invalid_ids = invalid.get();
    return a;
  }

  // Fresh input weights (the plan zeroes the dropped ones), poisoned outputs.
  PlanResult<S> run() {
    weights.upload(weights_in);
    positions.poison();
    offsets.poison();
    row_slots.poison();
    stats.poison();
    invalid.poison();
    const auto a = args();
    two_phase([&](void* w, std::size_t& bytes) { return gpu::plan_dispatch(w, bytes, a); });
    PlanResult<S> r;
    r.positions = positions.download();
    r.weights = weights.download();
    r.offsets = offsets.download();
    r.row_slots = row_slots.download();
    r.stats = stats.download()[0];
    r.invalid = invalid.download()[0];
    return r;
  }
};

template <class S>
void expect_plan(const PlanResult<S>& got, const ExpectedPlan& want) {
  constexpr int E = S::num_experts;
  EXPECT_TRUE(same_bits(got.positions, want.positions)) << "positions";
  EXPECT_TRUE(same_bits(got.weights, want.weights)) << "weights";
  EXPECT_TRUE(same_bits(got.offsets, want.offsets)) << "offsets";
  EXPECT_TRUE(same_bits(got.row_slots, want.row_slots)) << "row_slots";
  EXPECT_EQ(got.stats.capacity, want.capacity) << "stats.capacity";
  EXPECT_EQ(got.stats.rows, want.offsets[E]) << "stats.rows";
  EXPECT_EQ(got.stats.dropped, want.dropped) << "stats.dropped";
  const std::vector<std::int64_t> assigned(got.stats.assigned, got.stats.assigned + E);
  const std::vector<std::int64_t> kept(got.stats.kept, got.stats.kept + E);
  EXPECT_TRUE(same_bits(assigned, want.assigned)) << "stats.assigned";
  EXPECT_TRUE(same_bits(kept, want.kept)) << "stats.kept";
  EXPECT_EQ(got.invalid, want.invalid) << "invalid_ids";
}

template <class S>
void expect_same_plan(const PlanResult<S>& a, const PlanResult<S>& b) {
  EXPECT_TRUE(same_bits(a.positions, b.positions)) << "rerun positions";
  EXPECT_TRUE(same_bits(a.weights, b.weights)) << "rerun weights";
  EXPECT_TRUE(same_bits(a.offsets, b.offsets)) << "rerun offsets";
  EXPECT_TRUE(same_bits(a.row_slots, b.row_slots)) << "rerun row_slots";
  EXPECT_EQ(0, std::memcmp(&a.stats, &b.stats, sizeof a.stats)) << "rerun stats";
  EXPECT_EQ(a.invalid, b.invalid) << "rerun invalid_ids";
}

// Every capacity case and alignments 1, 8, 64 on the CPU router's dropless
// routing of `logits`, against its capped routing; each run twice.
template <class S>
void check_plan_against_cpu(const std::string& input, const std::vector<float>& logits,
                            std::int64_t tokens) {
  constexpr int E = S::num_experts, K = S::top_k;
  for (const CapacityConfig& c : capacity_cases()) {
    const CpuCappedRouting cpu = CpuReference<E, K>::route_with_capacity(logits, tokens, c);
    ASSERT_TRUE(same_bits(cpu.capped_ids, cpu.ids)) << "capacity changed the CPU's experts";
    for (int a : {1, 8, 64}) {
      SCOPED_TRACE("E=" + std::to_string(E) + " K=" + std::to_string(K) +
                   " T=" + std::to_string(tokens) + " " + input + " " + describe(c) +
                   " alignment=" + std::to_string(a));
      PlanRun<S> run(tokens, cpu.ids, cpu.weights, c, a);
      const PlanResult<S> got = run.run();
      // Positions and weights are the CPU's at every alignment; only the
      // offsets and row_slots take the padding.
      expect_plan(got, plan_from_cpu(cpu, E, a, run.max_rows));
      if (a == 1) EXPECT_TRUE(same_bits(got.offsets, cpu.offsets)) << "cpu::dispatch_offsets";
      for (int e = 0; e < E; ++e) {
        EXPECT_EQ(got.offsets[e + 1] - got.offsets[e], round_up(cpu.kept[e], a)) << "expert " << e;
      }
      EXPECT_LE(got.stats.rows, run.max_rows);
      expect_same_plan(got, run.run());
      if (Test::HasFailure()) return;
    }
  }
}

template <class S>
class CudaDispatchPlan : public ::testing::Test {};
using PlanSpecs =
    ::testing::Types<MoeSpec<1, 1>, MoeSpec<4, 2>, MoeSpec<6, 3>, MoeSpec<8, 2>, MoeSpec<60, 4>,
                     MoeSpec<64, 8>, MoeSpec<256, 8>, MoeSpec<512, 22>>;
TYPED_TEST_SUITE(CudaDispatchPlan, PlanSpecs);

// T = 5000 spans several blocks of the plan's kernels for every spec above.
template <int E, int K>
constexpr bool kSpansBlocks = 5000 * K > 8 * gpu::detail::kBlockSlots<E>;
static_assert(kSpansBlocks<1, 1> && kSpansBlocks<4, 2> && kSpansBlocks<6, 3> &&
              kSpansBlocks<8, 2> && kSpansBlocks<60, 4> && kSpansBlocks<64, 8> &&
              kSpansBlocks<256, 8> && kSpansBlocks<512, 22>);

TYPED_TEST(CudaDispatchPlan, MatchesCpuCapacityAndOffsets) {
  MOEKIT_REQUIRE_GPU();
  constexpr int E = TypeParam::num_experts;
  std::uint32_t seed = 100;
  for (std::int64_t tokens : {0, 1, 37, 1000, 5000}) {
    check_plan_against_cpu<TypeParam>("random", random_logits(tokens, E, seed++), tokens);
    if (Test::HasFailure()) return;
  }
}

TYPED_TEST(CudaDispatchPlan, OneExpertTakesEveryToken) {
  MOEKIT_REQUIRE_GPU();
  constexpr int E = TypeParam::num_experts;
  for (std::int64_t tokens : {37, 5000}) {
    check_plan_against_cpu<TypeParam>("one expert", one_expert_logits(tokens, E, 200), tokens);
    if (Test::HasFailure()) return;
  }
}

// Identical rows: every expert's weights tie, so kProbs must keep the
// earliest slots, as the CPU does.
TYPED_TEST(CudaDispatchPlan, TiedWeightsKeepTheEarlierSlot) {
  MOEKIT_REQUIRE_GPU();
  constexpr int E = TypeParam::num_experts;
  for (std::int64_t tokens : {37, 5000}) {
    check_plan_against_cpu<TypeParam>("identical rows", identical_rows_logits(tokens, E, 300),
                                      tokens);
    if (Test::HasFailure()) return;
  }
}

// Ids outside [0, E) are dropped (position -1, weight 0) and counted; every
// other slot follows the rule as if they were absent.
template <class S>
void check_invalid_ids(std::int64_t tokens, std::uint32_t seed) {
  constexpr int E = S::num_experts, K = S::top_k;
  std::vector<std::int32_t> ids = random_ids(tokens, E, K, seed);
  const std::vector<float> weights = random_floats(ids.size(), 0.0f, 1.0f, seed + 1);
  const std::int64_t slots = tokens * K;
  const std::vector<std::pair<std::int64_t, std::int32_t>> bad = {
      {0, -3},
      {5 * K + K - 1, E},
      {7 * K, -1},
      {slots / 2, E + 100},
      {slots - 2, std::numeric_limits<std::int32_t>::max()},
      {slots - 1, std::numeric_limits<std::int32_t>::min()}};
  for (const auto& [s, id] : bad) ids[s] = id;
  const CapacityConfig cases[] = {{0.0, DropPolicy::kPosition},
                                  {0.5, DropPolicy::kPosition},
                                  {0.5, DropPolicy::kProbs},
                                  {1.25, DropPolicy::kProbs}};
  for (const CapacityConfig& c : cases) {
    for (int a : {1, 8}) {
      SCOPED_TRACE("E=" + std::to_string(E) + " " + describe(c) +
                   " alignment=" + std::to_string(a));
      PlanRun<S> run(tokens, ids, weights, c, a);
      const ExpectedPlan want = host_plan<E, K>(ids, weights, tokens, c, a, run.max_rows);
      ASSERT_EQ(want.invalid, static_cast<std::int64_t>(bad.size()));
      const PlanResult<S> got = run.run();
      expect_plan(got, want);
      for (const auto& [s, id] : bad) {
        EXPECT_EQ(got.positions[s], -1) << "slot " << s << " (id " << id << ")";
        EXPECT_EQ(got.weights[s], 0.0f) << "slot " << s << " (id " << id << ")";
      }
      if (Test::HasFailure()) return;
    }
  }
}

TEST(CudaDispatchPlanInvalidIds, AreDroppedAndCounted) {
  MOEKIT_REQUIRE_GPU();
  check_invalid_ids<MoeSpec<8, 2>>(1000, 7);
  check_invalid_ids<MoeSpec<64, 8>>(777, 8);
}

// kProbs on weights the router never writes: -0 and +0 are one weight
// (ties keep the earlier slot, and a kept weight keeps its sign bit), and
// NaN is the lightest.
TEST(CudaDispatchPlanWeights, SignedZerosTieAndNanIsLightest) {
  MOEKIT_REQUIRE_GPU();
  using S = MoeSpec<8, 2>;
  constexpr std::int64_t tokens = 200;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  for (std::int64_t t = 0; t < tokens; ++t) {
    ids.push_back(0);
    ids.push_back(static_cast<std::int32_t>(1 + t % 7));
    float w = t % 2 == 0 ? 0.0f : -0.0f;
    if (t % 10 == 9) w = 1.0f;
    if (t == 2) w = std::numeric_limits<float>::quiet_NaN();
    weights.push_back(w);
    weights.push_back(0.5f);
  }
  const CapacityConfig c{0.5, DropPolicy::kProbs};  // C = 25: the 20 ones, then 5 zeros
  PlanRun<S> run(tokens, ids, weights, c, 1);
  const PlanResult<S> got = run.run();
  expect_plan(got, host_plan<8, 2>(ids, weights, tokens, c, 1, run.max_rows));
  std::vector<std::int64_t> kept_tokens;
  for (std::int64_t t = 0; t < tokens; ++t) {
    if (got.positions[t * 2] >= 0 && kept_tokens.size() < 5) kept_tokens.push_back(t);
  }
  EXPECT_EQ(kept_tokens, (std::vector<std::int64_t>{0, 1, 3, 4, 5}));  // NaN (t = 2) dropped
  EXPECT_TRUE(std::signbit(got.weights[1 * 2]));                       // -0 kept as -0
}

// Reruns reuse poisoned outputs and a stale workspace: the same bits.
TEST(CudaDispatchPlanRerun, IsBitIdenticalWithOrWithoutStats) {
  MOEKIT_REQUIRE_GPU();
  using S = MoeSpec<64, 8>;
  constexpr std::int64_t tokens = 3000;
  const auto ids = random_ids(tokens, 64, 8, 41);
  const auto weights = random_floats(ids.size(), 0.0f, 1.0f, 42);
  for (const CapacityConfig& c : capacity_cases()) {
    SCOPED_TRACE(describe(c));
    PlanRun<S> run(tokens, ids, weights, c, 16);
    const PlanResult<S> first = run.run();
    for (int i = 0; i < 3; ++i) expect_same_plan(first, run.run());

    // Without the optional outputs (stats, invalid_ids) the plan is the same.
    run.weights.upload(weights);
    run.positions.poison();
    run.offsets.poison();
    run.row_slots.poison();
    auto a = run.args();
    a.stats = nullptr;
    a.invalid_ids = nullptr;
    two_phase([&](void* w, std::size_t& bytes) { return gpu::plan_dispatch(w, bytes, a); });
    EXPECT_TRUE(same_bits(run.positions.download(), first.positions)) << "no stats: positions";
    EXPECT_TRUE(same_bits(run.weights.download(), first.weights)) << "no stats: weights";
    EXPECT_TRUE(same_bits(run.offsets.download(), first.offsets)) << "no stats: offsets";
    EXPECT_TRUE(same_bits(run.row_slots.download(), first.row_slots)) << "no stats: row_slots";
  }
}

// The workspace checks follow CUB's size queries, which fail without a
// device (cudaErrorInvalidDevice), so they are checked where one exists.
TEST(CudaDispatchPlanWorkspace, TooSmallOrMisalignedIsRejected) {
  MOEKIT_REQUIRE_GPU();
  using S = MoeSpec<8, 2>;
  const auto ids = random_ids(100, 8, 2, 3);
  PlanRun<S> run(100, ids, random_floats(ids.size(), 0.0f, 1.0f, 4), {1.0, DropPolicy::kProbs}, 4);
  const auto a = run.args();
  std::size_t bytes = 0;
  MOEKIT_CUDA_CHECK(gpu::plan_dispatch(nullptr, bytes, a));
  DeviceBuffer<unsigned char> workspace(bytes + 256);
  std::size_t small = bytes - 1;
  try {
    (void)gpu::plan_dispatch(workspace.get(), small, a);
    ADD_FAILURE() << "a workspace one byte short was accepted";
  } catch (const moekit::Error& e) {
    EXPECT_EQ(e.code(), Errc::kShapeMismatch) << e.what();
  }
  try {
    (void)gpu::plan_dispatch(workspace.get() + 8, bytes, a);
    ADD_FAILURE() << "a misaligned workspace was accepted";
  } catch (const moekit::Error& e) {
    EXPECT_EQ(e.code(), Errc::kInvalidArgument) << e.what();
  }
}

// ---- row movement ---------------------------------------------------------------

template <class T>
constexpr double kTolerance = std::is_same_v<T, float>           ? 1e-5
                              : std::is_same_v<T, __nv_bfloat16> ? 1e-2
                                                                 : 2e-3;

// rows x cols of T in rows x ld storage, on the host and the device.
template <class T>
struct TypedMatrix {
  index_t rows, cols, ld;
  std::vector<T> host;
  DeviceBuffer<T> device;

  TypedMatrix(index_t r, index_t c, index_t l)
      : rows(r), cols(c), ld(l), host(static_cast<std::size_t>(r * l)), device(host.size()) {}
  // Random values everywhere, padding columns included, then uploaded.
  void randomize(std::uint32_t seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (T& v : host) v = from_float<T>(u(gen));
    device.upload(host);
  }
  double at(index_t r, index_t c) const { return to_float(host[r * ld + c]); }
  MatrixView<T> view() const { return {device.get(), rows, cols, ld}; }
  MatrixView<const T> cview() const { return view(); }
};

enum class RowRule { kNear, kZero, kUnchanged };

// got (rows x ld storage) against the float64 ref (rows x d): rows under
// kNear by ||got - ref|| / ||ref|| <= tol, kZero exactly 0, kUnchanged (and
// every padding column) the bits of `before`.
template <class T>
void expect_rows(const std::string& name, const std::vector<T>& got, const std::vector<T>& before,
                 index_t rows, index_t d, index_t ld, const std::vector<double>& ref,
                 const std::vector<RowRule>& rule, double tol) {
  double err2 = 0.0, ref2 = 0.0;
  for (index_t r = 0; r < rows; ++r) {
    for (index_t j = 0; j < ld; ++j) {
      const T v = got[r * ld + j];
      if (j >= d || rule[r] == RowRule::kUnchanged) {
        ASSERT_TRUE(bits_equal(v, before[r * ld + j]))
            << name << " (" << r << ", " << j << ") changed"
            << (j >= d ? " (a padding column)" : " (a row that must be left alone)");
        continue;
      }
      const double x = to_float(v);
      ASSERT_FALSE(std::isnan(x)) << name << " (" << r << ", " << j << ") not written";
      if (rule[r] == RowRule::kZero) {
        ASSERT_EQ(x, 0.0) << name << " (" << r << ", " << j << ") must be 0";
        continue;
      }
      const double want = ref[r * d + j];
      err2 += (x - want) * (x - want);
      ref2 += want * want;
    }
  }
  const double rel = ref2 > 0.0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  EXPECT_LE(rel, tol) << name << ": ||out - ref|| / ||ref|| = " << rel;
}

struct RowCase {
  index_t d;
  CapacityConfig capacity;
  int alignment;
  index_t token_pad = 0;  // ld - cols of x, y, dy, dx
  index_t row_pad = 0;    // ld - cols of the buffers
};

std::string describe(const RowCase& c) {
  return "d=" + std::to_string(c.d) + " " + describe(c.capacity) +
         " alignment=" + std::to_string(c.alignment) + " pads=" + std::to_string(c.token_pad) +
         "/" + std::to_string(c.row_pad);
}

// Widths: 1 and 7 and 1003 take the scalar path for every type, 64, 1000 and
// 1024 the 16-byte vectors; kPosition at 0.25 leaves late tokens with no
// kept slot; alignment 16 adds padding rows.
std::vector<RowCase> dense_row_cases() {
  std::vector<RowCase> cases;
  for (index_t d : {1, 7, 64, 1000, 1003, 1024}) {
    for (const CapacityConfig& c :
         {CapacityConfig{0.0, DropPolicy::kPosition}, CapacityConfig{0.25, DropPolicy::kPosition},
          CapacityConfig{1.0, DropPolicy::kProbs}}) {
      for (int a : {1, 16}) cases.push_back({d, c, a});
    }
  }
  return cases;
}

// ld > cols: pads of 8 and 16 elements keep every row 16-byte aligned (the
// vector path on strided rows), 3 and 5 do not.
std::vector<RowCase> strided_row_cases() {
  std::vector<RowCase> cases;
  for (index_t d : {64, 1000}) {
    cases.push_back({d, {0.25, DropPolicy::kPosition}, 16, 8, 16});
    cases.push_back({d, {0.25, DropPolicy::kPosition}, 16, 3, 5});
  }
  return cases;
}

// A plan on random ids, then dispatch, combine, combine_backward and
// dispatch_backward against float64 loops over its positions and offsets.
template <class S, class T>
void check_rows(std::int64_t tokens, const RowCase& rc, std::uint32_t seed) {
  constexpr int E = S::num_experts, K = S::top_k;
  SCOPED_TRACE(std::string(type_name<T>()) + " E=" + std::to_string(E) + " K=" + std::to_string(K) +
               " T=" + std::to_string(tokens) + " " + describe(rc));
  const index_t d = rc.d, ld_t = d + rc.token_pad, ld_r = d + rc.row_pad;
  const double tol = kTolerance<T>;

  // The last token repeats the first one's experts: with a small capacity
  // they are full by then, so some token has every slot dropped.
  std::vector<std::int32_t> ids = random_ids(tokens, E, K, seed);
  if (tokens >= 2) std::copy(ids.begin(), ids.begin() + K, ids.end() - K);
  const std::vector<float> weights_in = random_floats(ids.size(), 0.05f, 1.0f, seed + 1);
  PlanRun<S> plan(tokens, ids, weights_in, rc.capacity, rc.alignment);
  const PlanResult<S> p = plan.run();
  expect_plan(p,
              host_plan<E, K>(ids, weights_in, tokens, rc.capacity, rc.alignment, plan.max_rows));
  ASSERT_FALSE(Test::HasFailure()) << "the plan is wrong; the rows would be too";
  const index_t max_rows = plan.max_rows, rows_in_use = p.offsets[E];

  // From positions and offsets alone: each slot's row, each row's slot.
  std::vector<index_t> slot_row(ids.size(), -1);
  std::vector<std::int64_t> row_slot(max_rows, -1);
  std::vector<char> any_kept(tokens, 0);
  for (std::int64_t s = 0; s < tokens * K; ++s) {
    if (p.positions[s] < 0) continue;
    slot_row[s] = p.offsets[ids[s]] + p.positions[s];
    row_slot.at(slot_row[s]) = s;
    any_kept[s / K] = 1;
  }
  if (rc.capacity.factor == 0.25 && tokens >= 2) {
    EXPECT_GT(std::count(any_kept.begin(), any_kept.end(), 0), 0) << "no token lost all its slots";
  }
  const auto token_rule = [&](RowRule none_kept) {
    std::vector<RowRule> rule(tokens, RowRule::kNear);
    for (std::int64_t t = 0; t < tokens; ++t) rule[t] = any_kept[t] ? RowRule::kNear : none_kept;
    return rule;
  };
  // Rows in use: kNear for a slot's row, kZero for padding; the rest untouched.
  std::vector<RowRule> buffer_rule(max_rows, RowRule::kUnchanged);
  for (index_t n = 0; n < rows_in_use; ++n) {
    buffer_rule[n] = row_slot[n] >= 0 ? RowRule::kNear : RowRule::kZero;
  }

  const MatrixView<const std::int32_t> d_ids(plan.ids.get(), tokens, K);
  const MatrixView<const float> d_weights(plan.weights.get(), tokens, K);  // dropped: 0
  const MatrixView<const std::int32_t> d_positions(plan.positions.get(), tokens, K);
  const VectorView<const index_t> d_offsets(plan.offsets.get(), E + 1);
  const gpu::DispatchMap map = plan.args().dispatch_map();
  const auto sync = [] { MOEKIT_CUDA_CHECK(cudaDeviceSynchronize()); };

  // dispatch: bit-exact copies of x, zero padding rows, the rest untouched.
  TypedMatrix<T> x(tokens, d, ld_t);
  x.randomize(seed + 2);
  TypedMatrix<T> buffer(max_rows, d, ld_r);
  buffer.device.poison();
  MOEKIT_CUDA_CHECK(gpu::dispatch<S>(x.cview(), map, buffer.view()));
  sync();
  {
    const std::vector<T> got = buffer.device.download();
    for (index_t n = 0; n < max_rows; ++n) {
      for (index_t j = 0; j < ld_r; ++j) {
        const T v = got[n * ld_r + j];
        if (j >= d || n >= rows_in_use) {
          ASSERT_TRUE(is_poison(v)) << "dispatch wrote (" << n << ", " << j << ")";
        } else if (row_slot[n] < 0) {
          ASSERT_EQ(to_float(v), 0.0f) << "dispatch padding row " << n << " column " << j;
        } else {
          ASSERT_TRUE(bits_equal(v, x.host[row_slot[n] / K * ld_t + j]))
              << "dispatch row " << n << " column " << j;
        }
      }
    }
  }

  // combine, overwriting and accumulating; reruns give the same bits.
  TypedMatrix<T> expert_out(max_rows, d, ld_r);
  expert_out.randomize(seed + 3);  // padding rows and rows past offsets[E] too: never read
  std::vector<double> sum(tokens * d, 0.0);
  for (std::int64_t s = 0; s < tokens * K; ++s) {
    if (slot_row[s] < 0) continue;
    for (index_t j = 0; j < d; ++j) {
      sum[s / K * d + j] += static_cast<double>(p.weights[s]) * expert_out.at(slot_row[s], j);
    }
  }
  TypedMatrix<T> y(tokens, d, ld_t);
  y.device.poison();
  const std::vector<T> poisoned_y = y.device.download();
  MOEKIT_CUDA_CHECK(gpu::combine<S>(expert_out.cview(), d_ids, d_weights, d_positions, d_offsets,
                                    y.view(), false));
  sync();
  const std::vector<T> combined = y.device.download();
  expect_rows("combine", combined, poisoned_y, tokens, d, ld_t, sum, token_rule(RowRule::kZero),
              tol);
  y.device.poison();
  MOEKIT_CUDA_CHECK(gpu::combine<S>(expert_out.cview(), d_ids, d_weights, d_positions, d_offsets,
                                    y.view(), false));
  sync();
  EXPECT_TRUE(same_bits(y.device.download(), combined)) << "combine rerun";

  y.randomize(seed + 4);
  std::vector<double> acc_ref = sum;
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (index_t j = 0; j < d; ++j) acc_ref[t * d + j] += y.at(t, j);
  }
  MOEKIT_CUDA_CHECK(gpu::combine<S>(expert_out.cview(), d_ids, d_weights, d_positions, d_offsets,
                                    y.view(), true));
  sync();
  expect_rows("combine accumulate", y.device.download(), y.host, tokens, d, ld_t, acc_ref,
              token_rule(RowRule::kUnchanged), tol);

  // combine_backward: both outputs, then each alone (an empty view).
  TypedMatrix<T> dy(tokens, d, ld_t);
  dy.randomize(seed + 5);
  std::vector<double> d_out_ref(max_rows * d, 0.0);
  std::vector<double> dw_ref(ids.size(), 0.0);
  for (std::int64_t s = 0; s < tokens * K; ++s) {
    if (slot_row[s] < 0) continue;
    for (index_t j = 0; j < d; ++j) {
      const double g = dy.at(s / K, j);
      d_out_ref[slot_row[s] * d + j] = static_cast<double>(p.weights[s]) * g;
      dw_ref[s] += g * expert_out.at(slot_row[s], j);
    }
  }
  TypedMatrix<T> d_out(max_rows, d, ld_r);
  DeviceBuffer<float> dweights(ids.size());
  const MatrixView<float> dw_view(dweights.get(), tokens, K);
  d_out.device.poison();
  dweights.poison();
  const std::vector<T> poisoned_d_out = d_out.device.download();
  MOEKIT_CUDA_CHECK(gpu::combine_backward<S>(dy.cview(), expert_out.cview(), d_ids, d_weights,
                                             d_positions, d_offsets, map, d_out.view(), dw_view));
  sync();
  const std::vector<T> d_out_got = d_out.device.download();
  const std::vector<float> dw_got = dweights.download();
  expect_rows("combine_backward d_expert_out", d_out_got, poisoned_d_out, max_rows, d, ld_r,
              d_out_ref, buffer_rule, tol);
  {
    double err2 = 0.0, ref2 = 0.0;
    for (std::int64_t s = 0; s < tokens * K; ++s) {
      if (slot_row[s] < 0) {
        ASSERT_EQ(dw_got[s], 0.0f) << "dweights of dropped slot " << s;
        continue;
      }
      err2 += (dw_got[s] - dw_ref[s]) * (dw_got[s] - dw_ref[s]);
      ref2 += dw_ref[s] * dw_ref[s];
    }
    const double rel = ref2 > 0.0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
    EXPECT_LE(rel, tol) << "combine_backward dweights: ||out - ref|| / ||ref|| = " << rel;
  }
  d_out.device.poison();
  MOEKIT_CUDA_CHECK(gpu::combine_backward<S>(dy.cview(), MatrixView<const T>{}, d_ids, d_weights,
                                             d_positions, d_offsets, map, d_out.view(),
                                             MatrixView<float>{}));
  sync();
  EXPECT_TRUE(same_bits(d_out.device.download(), d_out_got)) << "d_expert_out alone";
  dweights.poison();
  MOEKIT_CUDA_CHECK(gpu::combine_backward<S>(dy.cview(), expert_out.cview(), d_ids, d_weights,
                                             d_positions, d_offsets, map, MatrixView<T>{},
                                             dw_view));
  sync();
  EXPECT_TRUE(same_bits(dweights.download(), dw_got)) << "dweights alone (and rerun)";

  // dispatch_backward, overwriting and accumulating.
  TypedMatrix<T> d_buffer(max_rows, d, ld_r);
  d_buffer.randomize(seed + 6);
  std::vector<double> dx_ref(tokens * d, 0.0);
  for (std::int64_t s = 0; s < tokens * K; ++s) {
    if (slot_row[s] < 0) continue;
    for (index_t j = 0; j < d; ++j) dx_ref[s / K * d + j] += d_buffer.at(slot_row[s], j);
  }
  TypedMatrix<T> dx(tokens, d, ld_t);
  dx.device.poison();
  const std::vector<T> poisoned_dx = dx.device.download();
  MOEKIT_CUDA_CHECK(
      gpu::dispatch_backward<S>(d_buffer.cview(), d_ids, d_positions, d_offsets, dx.view(), false));
  sync();
  expect_rows("dispatch_backward", dx.device.download(), poisoned_dx, tokens, d, ld_t, dx_ref,
              token_rule(RowRule::kZero), tol);
  dx.randomize(seed + 7);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (index_t j = 0; j < d; ++j) dx_ref[t * d + j] += dx.at(t, j);
  }
  MOEKIT_CUDA_CHECK(
      gpu::dispatch_backward<S>(d_buffer.cview(), d_ids, d_positions, d_offsets, dx.view(), true));
  sync();
  expect_rows("dispatch_backward accumulate", dx.device.download(), dx.host, tokens, d, ld_t,
              dx_ref, token_rule(RowRule::kUnchanged), tol);
}

template <class P>
class CudaDispatchRows : public ::testing::Test {};
using RowTypes =
    ::testing::Types<std::pair<MoeSpec<8, 2>, float>, std::pair<MoeSpec<8, 2>, __nv_bfloat16>,
                     std::pair<MoeSpec<8, 2>, __half>, std::pair<MoeSpec<64, 8>, float>,
                     std::pair<MoeSpec<64, 8>, __nv_bfloat16>, std::pair<MoeSpec<64, 8>, __half>,
                     std::pair<MoeSpec<512, 22>, float>, std::pair<MoeSpec<512, 22>, __nv_bfloat16>,
                     std::pair<MoeSpec<512, 22>, __half>>;
TYPED_TEST_SUITE(CudaDispatchRows, RowTypes);

// Tokens for about 2000 slots: with K = 22, kPosition at 0.25 gives C = 1.
template <class S>
constexpr std::int64_t kRowTokens = 2000 / S::top_k + 1;

TYPED_TEST(CudaDispatchRows, DenseRowsMatchFloat64) {
  MOEKIT_REQUIRE_GPU();
  using S = typename TypeParam::first_type;
  using T = typename TypeParam::second_type;
  std::uint32_t seed = 1000;
  for (const RowCase& rc : dense_row_cases()) {
    check_rows<S, T>(kRowTokens<S>, rc, seed += 10);
    if (Test::HasFailure()) return;
  }
}

TYPED_TEST(CudaDispatchRows, StridedRowsMatchFloat64) {
  MOEKIT_REQUIRE_GPU();
  using S = typename TypeParam::first_type;
  using T = typename TypeParam::second_type;
  std::uint32_t seed = 2000;
  for (const RowCase& rc : strided_row_cases()) {
    check_rows<S, T>(kRowTokens<S>, rc, seed += 10);
    if (Test::HasFailure()) return;
  }
}

// No tokens: padding rows only (rows in use 0), so nothing is written.
TEST(CudaDispatchRowsEdges, ZeroTokensWriteNothing) {
  MOEKIT_REQUIRE_GPU();
  check_rows<MoeSpec<8, 2>, float>(0, {64, {0.0, DropPolicy::kPosition}, 16}, 3000);
  check_rows<MoeSpec<8, 2>, __half>(0, {7, {1.0, DropPolicy::kProbs}, 1}, 3010);
}

// ---- argument checks: host-side, before any launch (run everywhere) ------------

// Distinct fake device addresses: validation never dereferences them, and a
// check that wrongly passed would reach a launch and fail the expectation.
using moekit_test::expect_error;
using moekit_test::fake;
using S82 = MoeSpec<8, 2>;

gpu::DispatchPlanArgs<S82> good_plan_args(std::int64_t tokens) {
  gpu::DispatchPlanArgs<S82> a;
  a.expert_ids = {fake<const std::int32_t>(1), tokens, 2};
  a.weights = {fake<float>(2), tokens, 2};
  a.capacity = {1.0, DropPolicy::kProbs};
  a.row_alignment = 8;
  a.positions = {fake<std::int32_t>(3), tokens, 2};
  a.offsets = {fake<index_t>(4), 9};
  a.row_slots = {fake<std::int32_t>(5), gpu::max_dispatch_rows<S82>(tokens, a.capacity, 8)};
  return a;
}

TEST(CudaDispatchBadInput, PlanArgumentsAreRejectedBeforeLaunch) {
  void* ws = reinterpret_cast<void*>(std::uintptr_t{1} << 20);  // 256-byte aligned
  std::size_t bytes = std::size_t{1} << 40;
  const auto plan = [&](const gpu::DispatchPlanArgs<S82>& a) {
    return [&ws, &bytes, a] { (void)gpu::plan_dispatch(ws, bytes, a); };
  };
  auto a = good_plan_args(100);
  a.weights = {fake<float>(2), 100, 3};
  expect_error(plan(a), Errc::kShapeMismatch, "args.weights");
  a = good_plan_args(100);
  a.weights = {static_cast<float*>(nullptr), 100, 2};
  expect_error(plan(a), Errc::kNullPointer, "args.weights");
  a = good_plan_args(100);
  a.positions = {fake<std::int32_t>(3), 99, 2};
  expect_error(plan(a), Errc::kShapeMismatch, "args.positions");
  a = good_plan_args(100);
  a.offsets = {fake<index_t>(4), 8};
  expect_error(plan(a), Errc::kShapeMismatch, "args.offsets");
  a = good_plan_args(100);
  a.expert_ids = {fake<const std::int32_t>(1), 100, 3};
  expect_error(plan(a), Errc::kShapeMismatch, "args.expert_ids");
  a = good_plan_args(100);
  a.expert_ids = {static_cast<const std::int32_t*>(nullptr), 100, 2};
  expect_error(plan(a), Errc::kNullPointer, "args.expert_ids");

  a = good_plan_args(100);
  a.row_slots = {fake<std::int32_t>(5), a.row_slots.size() - 1};
  expect_error(plan(a), Errc::kShapeMismatch, "args.row_slots");
  a = good_plan_args(100);  // enough rows for alignment 1, not for 8
  a.row_slots = {fake<std::int32_t>(5), gpu::max_dispatch_rows<S82>(100, a.capacity, 1)};
  expect_error(plan(a), Errc::kShapeMismatch, "max_dispatch_rows");
  a = good_plan_args(100);
  a.row_slots = {static_cast<std::int32_t*>(nullptr), a.row_slots.size()};
  expect_error(plan(a), Errc::kNullPointer, "args.row_slots");

  for (int alignment : {0, -3}) {
    a = good_plan_args(100);
    a.row_alignment = alignment;
    expect_error(plan(a), Errc::kInvalidArgument, "row_alignment");
  }
  a = good_plan_args(100);
  a.capacity.factor = std::numeric_limits<double>::quiet_NaN();
  expect_error(plan(a), Errc::kInvalidArgument, "capacity.factor");
  for (double factor : {1.0, 0.0}) {  // a bad policy is rejected even when dropless
    a = good_plan_args(100);
    a.capacity = {factor, static_cast<DropPolicy>(7)};
    expect_error(plan(a), Errc::kInvalidArgument, "capacity.policy");
  }

  // The token count is checked in both phases.
  a = good_plan_args(100);
  a.expert_ids = {fake<const std::int32_t>(1), -1, 2};
  expect_error(plan(a), Errc::kInvalidArgument, "negative");
  expect_error([&] { (void)gpu::plan_dispatch(nullptr, bytes, a); }, Errc::kInvalidArgument,
               "negative");
  a.expert_ids = {fake<const std::int32_t>(1), std::numeric_limits<std::int32_t>::max() / 2 + 1, 2};
  expect_error([&] { (void)gpu::plan_dispatch(nullptr, bytes, a); }, Errc::kInvalidArgument,
               "32-bit");
}

struct RowArgs {
  static constexpr index_t tokens = 100, d = 64, rows = 300;
  MatrixView<const float> x{fake<const float>(1), tokens, d};
  MatrixView<float> buffer{fake<float>(2), rows, d};
  gpu::DispatchMap map{{fake<const std::int32_t>(3), rows}, fake<const index_t>(4)};
  MatrixView<const std::int32_t> ids{fake<const std::int32_t>(5), tokens, 2};
  MatrixView<const float> weights{fake<const float>(6), tokens, 2};
  MatrixView<const std::int32_t> positions{fake<const std::int32_t>(7), tokens, 2};
  VectorView<const index_t> offsets{fake<const index_t>(8), 9};
  MatrixView<float> y{fake<float>(9), tokens, d};
  MatrixView<float> dweights{fake<float>(10), tokens, 2};
};

TEST(CudaDispatchBadInput, DispatchArgumentsAreRejectedBeforeLaunch) {
  RowArgs r;
  const auto call = [](RowArgs a) {
    return [a] { (void)gpu::dispatch<S82>(a.x, a.map, a.buffer); };
  };
  RowArgs a = r;
  a.buffer = {fake<float>(2), RowArgs::rows, 63};
  expect_error(call(a), Errc::kShapeMismatch, "buffer");
  a = r;
  a.map.row_slots = {fake<const std::int32_t>(3), RowArgs::rows - 1};
  expect_error(call(a), Errc::kShapeMismatch, "row_slots");
  a = r;
  a.map.rows_in_use = nullptr;
  expect_error(call(a), Errc::kNullPointer, "rows_in_use");
  a = r;
  a.x = {static_cast<const float*>(nullptr), RowArgs::tokens, RowArgs::d};
  expect_error(call(a), Errc::kNullPointer, "x");
  a = r;
  a.buffer = {fake<float>(2), RowArgs::rows, RowArgs::d, 32};
  expect_error(call(a), Errc::kInvalidArgument, "buffer.ld()");
  a = r;
  a.x = {fake<const float>(1), -1, RowArgs::d};
  expect_error(call(a), Errc::kInvalidArgument, "negative");
}

TEST(CudaDispatchBadInput, CombineArgumentsAreRejectedBeforeLaunch) {
  RowArgs r;
  const auto call = [](RowArgs a) {
    return [a] {
      (void)gpu::combine<S82>(MatrixView<const float>(a.buffer), a.ids, a.weights, a.positions,
                              a.offsets, a.y);
    };
  };
  RowArgs a = r;
  a.weights = {fake<const float>(6), RowArgs::tokens, 3};
  expect_error(call(a), Errc::kShapeMismatch, "weights");
  a = r;
  a.y = {fake<float>(9), RowArgs::tokens, 63};
  expect_error(call(a), Errc::kShapeMismatch, "y");
  a = r;
  a.offsets = {fake<const index_t>(8), 8};
  expect_error(call(a), Errc::kShapeMismatch, "offsets");
  a = r;
  a.positions = {fake<const std::int32_t>(7), RowArgs::tokens, 1};
  expect_error(call(a), Errc::kShapeMismatch, "positions");
  a = r;
  a.ids = {fake<const std::int32_t>(5), RowArgs::tokens - 1, 2};
  expect_error(call(a), Errc::kShapeMismatch, "expert_ids");
  a = r;
  a.buffer = {static_cast<float*>(nullptr), RowArgs::rows, RowArgs::d};
  expect_error(call(a), Errc::kNullPointer, "expert_out");
}

TEST(CudaDispatchBadInput, CombineBackwardArgumentsAreRejectedBeforeLaunch) {
  RowArgs r;
  // x plays dy and the buffer d_expert_out.
  const auto call = [](RowArgs a, MatrixView<const float> expert_out, MatrixView<float> d_out,
                       MatrixView<float> dw) {
    return [a, expert_out, d_out, dw] {
      (void)gpu::combine_backward<S82>(a.x, expert_out, a.ids, a.weights, a.positions, a.offsets,
                                       a.map, d_out, dw);
    };
  };
  const MatrixView<const float> eo{fake<const float>(11), RowArgs::rows, RowArgs::d};
  RowArgs a = r;
  expect_error(call(a, eo, {fake<float>(2), RowArgs::rows, 63}, a.dweights), Errc::kShapeMismatch,
               "d_expert_out");
  a.map.row_slots = {fake<const std::int32_t>(3), RowArgs::rows - 1};
  expect_error(call(a, eo, a.buffer, {}), Errc::kShapeMismatch, "row_slots");
  a = r;
  a.map.rows_in_use = nullptr;
  expect_error(call(a, eo, a.buffer, {}), Errc::kNullPointer, "rows_in_use");
  a = r;
  a.weights = {fake<const float>(6), RowArgs::tokens, 3};
  expect_error(call(a, eo, a.buffer, {}), Errc::kShapeMismatch, "weights");
  a = r;
  expect_error(call(a, eo, {}, {fake<float>(10), RowArgs::tokens, 3}), Errc::kShapeMismatch,
               "dweights");
  expect_error(call(a, {fake<const float>(11), RowArgs::rows, 63}, {}, a.dweights),
               Errc::kShapeMismatch, "expert_out");
  expect_error(call(a, {}, {}, a.dweights), Errc::kShapeMismatch, "expert_out");
  expect_error(
      call(a, {static_cast<const float*>(nullptr), RowArgs::rows, RowArgs::d}, {}, a.dweights),
      Errc::kNullPointer, "expert_out");
  a.x = {static_cast<const float*>(nullptr), RowArgs::tokens, RowArgs::d};
  expect_error(call(a, eo, a.buffer, a.dweights), Errc::kNullPointer, "dy");
  a = r;
  a.positions = {fake<const std::int32_t>(7), RowArgs::tokens + 1, 2};
  expect_error(call(a, eo, a.buffer, a.dweights), Errc::kShapeMismatch, "positions");
}

TEST(CudaDispatchBadInput, DispatchBackwardArgumentsAreRejectedBeforeLaunch) {
  RowArgs r;
  const auto call = [](RowArgs a, bool accumulate) {
    return [a, accumulate] {
      (void)gpu::dispatch_backward<S82>(MatrixView<const float>(a.buffer), a.ids, a.positions,
                                        a.offsets, a.y, accumulate);
    };
  };
  RowArgs a = r;
  a.y = {fake<float>(9), RowArgs::tokens, 65};
  expect_error(call(a, false), Errc::kShapeMismatch, "dx");
  a = r;
  a.buffer = {static_cast<float*>(nullptr), RowArgs::rows, RowArgs::d};
  expect_error(call(a, true), Errc::kNullPointer, "d_buffer");
  a = r;
  a.positions = {fake<const std::int32_t>(7), RowArgs::tokens, 3};
  expect_error(call(a, false), Errc::kShapeMismatch, "positions");
  a = r;
  a.offsets = {fake<const index_t>(8), 10};
  expect_error(call(a, true), Errc::kShapeMismatch, "offsets");
}

// ---- host-side checks of the plan's own math (run everywhere) -------------------

TEST(CudaDispatchHost, MaxDispatchRowsIsEveryKeptSlotPlusPadding) {
  using Kp = CapacityConfig;
  constexpr auto kPos = DropPolicy::kPosition;
  constexpr auto kProbs = DropPolicy::kProbs;
  EXPECT_EQ(gpu::max_dispatch_rows<S82>(100, Kp{}), 200);               // T K
  EXPECT_EQ(gpu::max_dispatch_rows<S82>(100, Kp{}, 16), 200 + 8 * 15);  // + E (a - 1)
  EXPECT_EQ(gpu::max_dispatch_rows<S82>(100, Kp{-1.0, kProbs}), 200);   // dropless
  EXPECT_EQ(gpu::max_dispatch_rows<S82>(100, Kp{1.0, kPos}), 200);      // C = 25
  EXPECT_EQ(gpu::max_dispatch_rows<S82>(100, Kp{0.5, kPos}), 8 * 13);   // C = ceil(12.5)
  EXPECT_EQ(gpu::max_dispatch_rows<S82>(100, Kp{0.5, kProbs}, 4), 104 + 24);
  EXPECT_EQ(gpu::max_dispatch_rows<S82>(100, Kp{1.25, kPos}), 200);  // E C = 256 > T K
  EXPECT_EQ(gpu::max_dispatch_rows<S82>(100, Kp{1e9, kPos}), 200);   // C at most T
  EXPECT_EQ(gpu::max_dispatch_rows<S82>(3, Kp{0.1, kPos}), 6);       // C = 1: E C = 8
  EXPECT_EQ(gpu::max_dispatch_rows<S82>(0, Kp{}), 0);
  EXPECT_EQ(gpu::max_dispatch_rows<S82>(0, Kp{0.5, kPos}, 64), 8 * 63);
  EXPECT_EQ((gpu::max_dispatch_rows<MoeSpec<1, 1>>(37, Kp{})), 37);
  EXPECT_EQ((gpu::max_dispatch_rows<MoeSpec<1, 1>>(37, Kp{0.5, kPos})), 19);
  EXPECT_EQ((gpu::max_dispatch_rows<MoeSpec<64, 8>>(1000, Kp{0.5, kProbs})), 64 * 63);
  EXPECT_EQ((gpu::max_dispatch_rows<MoeSpec<512, 22>>(5000, Kp{1.25, kPos}, 8)),
            110000 + 512 * 7);  // C = 269: E C = 137728 > T K
  expect_error([] { (void)gpu::max_dispatch_rows<S82>(-1, Kp{}); }, Errc::kInvalidArgument,
               "negative");
  expect_error([] { (void)gpu::max_dispatch_rows<S82>(10, Kp{}, 0); }, Errc::kInvalidArgument,
               "row_alignment");
}

TEST(CudaDispatchHost, DispatchMapPointsAtTheLastOffset) {
  const auto a = good_plan_args(100);
  const gpu::DispatchMap map = a.dispatch_map();
  EXPECT_EQ(map.rows_in_use, a.offsets.data() + 8);
  EXPECT_EQ(map.row_slots.data(), a.row_slots.data());
  EXPECT_EQ(map.row_slots.size(), a.row_slots.size());
}

std::uint32_t weight_key(float w) { return gpu::detail::descending_weight_key(w); }

TEST(CudaDispatchHost, DescendingWeightKeysReverseTheFloatOrder) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  constexpr float max = std::numeric_limits<float>::max();
  constexpr float tiny = std::numeric_limits<float>::min();
  constexpr float denorm = std::numeric_limits<float>::denorm_min();
  const std::vector<float> ascending = {-inf,   -max,    -1e30f, -2.5f,  -1.0f,
                                        -tiny,  -denorm, 0.0f,   denorm, tiny,
                                        1e-30f, 0.25f,   0.5f,   1.0f,   std::nextafter(1.0f, 2.0f),
                                        3e38f,  max,     inf};
  for (std::size_t i = 1; i < ascending.size(); ++i) {
    EXPECT_GT(weight_key(ascending[i - 1]), weight_key(ascending[i]))
        << ascending[i - 1] << " vs " << ascending[i];
  }
  EXPECT_EQ(weight_key(-0.0f), weight_key(0.0f));  // the CPU compares them equal

  std::vector<float> nans = {std::numeric_limits<float>::quiet_NaN(),
                             -std::numeric_limits<float>::quiet_NaN(),
                             std::numeric_limits<float>::signaling_NaN()};
  for (std::uint32_t bits : {0x7F800001u, 0xFFFFFFFFu, 0xFFC00000u}) {
    float v;
    std::memcpy(&v, &bits, sizeof v);
    nans.push_back(v);
  }
  for (float v : nans) {
    EXPECT_EQ(weight_key(v), 0xFFFFFFFFu);
    EXPECT_GT(weight_key(v), weight_key(-inf));  // after every number
  }

  // Random bit patterns: the keys order every pair as the floats do, reversed.
  std::mt19937 gen(5);
  const auto random_float = [&] {
    float v;
    do {
      const std::uint32_t bits = gen();
      std::memcpy(&v, &bits, sizeof v);
    } while (std::isnan(v));
    return v;
  };
  for (int i = 0; i < 100000; ++i) {
    const float a = random_float(), b = i % 4 == 0 ? a : random_float();
    ASSERT_EQ(a<b, weight_key(a)> weight_key(b)) << a << " vs " << b;
    ASSERT_EQ(a == b, weight_key(a) == weight_key(b)) << a << " vs " << b;
  }
}

// kExpertBits<E> holds every id 0..E (E marks an invalid id) and no more.
template <int E>
constexpr bool kExpertBitsFit = (1 << gpu::detail::kExpertBits<E>) > E &&
                                (gpu::detail::kExpertBits<E> == 1 ||
                                 (1 << (gpu::detail::kExpertBits<E> - 1)) <= E);
static_assert(kExpertBitsFit<1> && kExpertBitsFit<2> && kExpertBitsFit<3> && kExpertBitsFit<4> &&
              kExpertBitsFit<6> && kExpertBitsFit<8> && kExpertBitsFit<60> && kExpertBitsFit<63> &&
              kExpertBitsFit<64> && kExpertBitsFit<256> && kExpertBitsFit<512>);

TEST(CudaDispatchHost, ExpertBitsHoldEveryIdAndTheInvalidMark) {
  EXPECT_EQ(gpu::detail::kExpertBits<1>, 1);
  EXPECT_EQ(gpu::detail::kExpertBits<2>, 2);
  EXPECT_EQ(gpu::detail::kExpertBits<3>, 2);
  EXPECT_EQ(gpu::detail::kExpertBits<4>, 3);
  EXPECT_EQ(gpu::detail::kExpertBits<8>, 4);
  EXPECT_EQ(gpu::detail::kExpertBits<60>, 6);
  EXPECT_EQ(gpu::detail::kExpertBits<63>, 6);
  EXPECT_EQ(gpu::detail::kExpertBits<64>, 7);
  EXPECT_EQ(gpu::detail::kExpertBits<512>, 10);
  // The sort key: expert above 32 bits of weight, within 64 bits.
  EXPECT_LE(32 + gpu::detail::kExpertBits<512>, 64);
}

template <int E>
constexpr bool kBlockSlotsValid =
    gpu::detail::kBlockSlots<E> % gpu::detail::kThreads == 0 &&
    gpu::detail::kBlockSlots<E> >= 512 && gpu::detail::kBlockSlots<E> <= 8192;
static_assert(kBlockSlotsValid<1> && kBlockSlotsValid<8> && kBlockSlotsValid<60> &&
              kBlockSlotsValid<256> && kBlockSlotsValid<512> && kBlockSlotsValid<1024>);

TEST(CudaDispatchHost, BlockSlotsScaleWithTheExperts) {
  EXPECT_EQ(gpu::detail::kBlockSlots<8>, 512);  // at least 512
  EXPECT_EQ(gpu::detail::kBlockSlots<64>, 1024);
  EXPECT_EQ(gpu::detail::kBlockSlots<60>, 1024);  // 16 E rounded up to the block
  EXPECT_EQ(gpu::detail::kBlockSlots<512>, 8192);
  EXPECT_EQ(gpu::detail::kBlockSlots<1024>, 8192);  // at most 8192
  EXPECT_EQ(gpu::detail::kWarpSlots<512> * gpu::detail::kWarps, 8192);
}

// The host rule the invalid-id and row tests compare with is the CPU
// router's capacity on valid ids.
TEST(CudaDispatchHost, HostPlanRuleMatchesTheCpuRouter) {
  const auto check = [](auto spec, std::int64_t tokens, const std::vector<float>& logits) {
    using S = decltype(spec);
    constexpr int E = S::num_experts, K = S::top_k;
    for (const CapacityConfig& c : capacity_cases()) {
      for (int a : {1, 8}) {
        SCOPED_TRACE("E=" + std::to_string(E) + " " + describe(c) +
                     " alignment=" + std::to_string(a));
        const CpuCappedRouting cpu = CpuReference<E, K>::route_with_capacity(logits, tokens, c);
        const index_t max_rows = gpu::max_dispatch_rows<S>(tokens, c, a);
        const ExpectedPlan want = plan_from_cpu(cpu, E, a, max_rows);
        const ExpectedPlan got = host_plan<E, K>(cpu.ids, cpu.weights, tokens, c, a, max_rows);
        EXPECT_TRUE(same_bits(got.positions, want.positions)) << "positions";
        EXPECT_TRUE(same_bits(got.weights, want.weights)) << "weights";
        EXPECT_TRUE(same_bits(got.offsets, want.offsets)) << "offsets";
        EXPECT_TRUE(same_bits(got.row_slots, want.row_slots)) << "row_slots";
        EXPECT_EQ(got.capacity, want.capacity);
        EXPECT_EQ(got.dropped, want.dropped);
        EXPECT_TRUE(same_bits(got.assigned, want.assigned)) << "assigned";
        EXPECT_TRUE(same_bits(got.kept, want.kept)) << "kept";
        EXPECT_EQ(got.invalid, 0);
        if (a == 1) EXPECT_TRUE(same_bits(got.offsets, cpu.offsets)) << "cpu::dispatch_offsets";
      }
    }
  };
  check(MoeSpec<8, 2>{}, 0, {});
  check(MoeSpec<1, 1>{}, 37, random_logits(37, 1, 10));
  check(MoeSpec<8, 2>{}, 1000, random_logits(1000, 8, 11));
  check(MoeSpec<512, 22>{}, 300, random_logits(300, 512, 14));
  check(MoeSpec<6, 3>{}, 1000, identical_rows_logits(1000, 6, 12));
  check(MoeSpec<64, 8>{}, 777, one_expert_logits(777, 64, 13));
}

}  // namespace
