// Batch invariance on the CUDA backend (docs/determinism.md): an item's
// result (a token's, a row's, a sample's) is bit-identical alone and among
// up to 4,095 others, wherever it sits, for the components whose kernels
// compute each item from its own inputs in an order fixed by the reduction
// length alone (the table of the GPU components in docs/determinism.md says
// which and why). The components on cuBLAS (the gate GEMM, the expert FFNs,
// LoRA's base product, hence the MoE layer) promise no such thing and are
// not tested.
//
// Each test draws a pool of random items, runs every item alone for the
// reference, then batches of 1, 2, 37, 500 and 4,096 items drawn from the
// pool with repetition in random order (fixed seeds), and compares every
// item's bits with its reference, naming the first item and element that
// differ. Distillation's gradient is the gradient of a batch MEAN, so it
// scales with 1 / n by definition: its reference is the item in another
// batch of the same size. Outputs are poisoned (NaN, id -1) before each run.
// Without a device every test skips.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "batch_results.hpp"
#include "device_buffer.cuh"
#include "gpu_test.cuh"
#include "moekit/cuda/dispatch.cuh"
#include "moekit/cuda/distillation.cuh"
#include "moekit/cuda/early_exit.cuh"
#include "moekit/cuda/lora.cuh"
#include "moekit/cuda/router.cuh"
#include "moekit/cuda/task_heads.cuh"

namespace {

using moekit::GatingConfig;
using moekit::GatingRule;
using moekit::index_t;
using moekit::MoeSpec;
using moekit::VectorView;
using moekit_test::BatchResults;
using moekit_test::DeviceBuffer;
using moekit_test::two_phase;
namespace gpu = moekit::gpu;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- the harness -------------------------------------------------------------------

constexpr std::array<index_t, 5> kBatchSizes{1, 2, 37, 500, 4096};

// Distinct random items per test. Under compute-sanitizer (tools/gpu_check.sh)
// fewer: the reference runs each item alone, one set of launches per item,
// and the sanitizer makes every launch slow; the batches stay as they are.
index_t pool_size() { return moekit_test::under_compute_sanitizer() ? 8 : 48; }

// What an item's result is compared with.
enum class Reference {
  kAlone,     // the item run alone
  kSameSize,  // the item in another batch of the same size (results that scale with 1 / n)
};

// Stores each item's result of one batch in want (empty: not seen yet); an
// item seen before, in this batch or an earlier one, must have the same bits.
void record(const std::vector<index_t>& items, const BatchResults& got, BatchResults& want) {
  ASSERT_EQ(got.size(), items.size());
  for (std::size_t j = 0; j < items.size(); ++j) {
    std::vector<float>& slot = want[static_cast<std::size_t>(items[j])];
    ASSERT_FALSE(got[j].empty()) << "item " << items[j];
    ASSERT_FALSE(moekit_test::detail::has_nan(got[j]))
        << "item " << items[j] << " at position " << j << " of a reference batch of "
        << items.size() << " has a NaN (an unwritten output?)";
    if (slot.empty()) {
      slot = got[j];
    } else {
      ASSERT_TRUE(moekit_test::same_bits(got[j], slot))
          << "item " << items[j] << " at position " << j << " of a reference batch of "
          << items.size() << ": " << moekit_test::detail::first_difference(got[j], slot);
    }
  }
}

// The references of a pool's items in batches of `size`: the pool in order,
// repeated or cut into consecutive batches, until every item has been in one.
template <class Run>
void same_size_references(index_t pool, index_t size, Run& run, BatchResults& want) {
  want.assign(static_cast<std::size_t>(pool), {});
  for (index_t first = 0; first < pool; first += size) {
    std::vector<index_t> items(static_cast<std::size_t>(size));
    for (index_t j = 0; j < size; ++j) items[static_cast<std::size_t>(j)] = (first + j) % pool;
    ASSERT_NO_FATAL_FAILURE(record(items, run(items), want));
  }
}

// The property for `run(items)`: run the items (indices into a pool of
// pool_size() random inputs the test owns) as one batch, in that order, and
// return each item's result. `seed` picks the batches.
template <class Run>
void expect_batch_invariant(std::uint32_t seed, Run&& run,
                            Reference reference = Reference::kAlone) {
  const index_t pool = pool_size();
  BatchResults alone(static_cast<std::size_t>(pool));
  if (reference == Reference::kAlone) {
    for (index_t i = 0; i < pool; ++i) ASSERT_NO_FATAL_FAILURE(record({i}, run({i}), alone));
  }
  std::mt19937 rng(seed);
  std::uniform_int_distribution<index_t> pick(0, pool - 1);
  for (const index_t size : kBatchSizes) {
    BatchResults same_size;
    if (reference == Reference::kSameSize) {
      ASSERT_NO_FATAL_FAILURE(same_size_references(pool, size, run, same_size));
    }
    const BatchResults& want = reference == Reference::kAlone ? alone : same_size;
    std::vector<index_t> items(static_cast<std::size_t>(size));
    for (index_t& item : items) item = pick(rng);
    const BatchResults got = run(items);
    ASSERT_EQ(got.size(), items.size());
    for (std::size_t j = 0; j < items.size(); ++j) {
      const std::vector<float>& expected = want[static_cast<std::size_t>(items[j])];
      // One report per batch: the first item that differs.
      ASSERT_TRUE(moekit_test::same_bits(got[j], expected))
          << "item " << items[j] << " at position " << j << " of a batch of " << size << " ("
          << (reference == Reference::kAlone ? "reference: alone" : "reference: same size")
          << "): " << moekit_test::detail::first_difference(got[j], expected);
    }
  }
}

// ---- inputs and results ----------------------------------------------------------

// A pool of random rows of one width; gather(items) copies the picked rows
// into one batch, in order.
template <class U>
struct RowPool {
  index_t width;
  std::vector<U> rows;

  std::vector<U> gather(const std::vector<index_t>& items) const {
    std::vector<U> out;
    out.reserve(items.size() * static_cast<std::size_t>(width));
    for (const index_t i : items) {
      const auto begin = rows.begin() + i * width;
      out.insert(out.end(), begin, begin + width);
    }
    return out;
  }
};

// n values drawn from N(0, sigma^2).
std::vector<float> normal_floats(index_t n, float sigma, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
}

RowPool<float> normal_rows(index_t width, float sigma, std::uint32_t seed) {
  return {width, normal_floats(pool_size() * width, sigma, seed)};
}

// Integers uniform in [lo, hi], `width` per item.
RowPool<std::int32_t> integer_rows(index_t width, int lo, int hi, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> uniform(lo, hi);
  RowPool<std::int32_t> p{width,
                          std::vector<std::int32_t>(static_cast<std::size_t>(pool_size() * width))};
  for (std::int32_t& v : p.rows) v = uniform(rng);
  return p;
}

// Appends row t of a row-major matrix of `width` columns.
template <class U>
void append_row(const std::vector<U>& m, index_t width, std::size_t t, std::vector<float>& out) {
  const auto w = static_cast<std::size_t>(width);
  for (std::size_t c = 0; c < w; ++c) out.push_back(static_cast<float>(m[t * w + c]));
}

// Appends row t of an integer matrix, each value checked against [lo, hi):
// one outside (an unwritten -1, a wrong id) becomes NaN, which no reference
// holds, so the comparison fails on it.
void append_ids(const std::vector<std::int32_t>& m, index_t width, std::size_t t, int lo, int hi,
                std::vector<float>& out) {
  const auto w = static_cast<std::size_t>(width);
  for (std::size_t c = 0; c < w; ++c) {
    const std::int32_t v = m[t * w + c];
    out.push_back(v >= lo && v < hi ? static_cast<float>(v) : kNaN);
  }
}

// A device copy of the items' rows of a pool.
template <class U>
DeviceBuffer<U> upload_rows(const RowPool<U>& pool, const std::vector<index_t>& items) {
  return DeviceBuffer<U>(pool.gather(items));
}

// A device buffer of n elements, poisoned (NaN, -1) so that an unwritten one shows.
template <class U>
struct Poisoned : DeviceBuffer<U> {
  explicit Poisoned(index_t n) : DeviceBuffer<U>(static_cast<std::size_t>(n)) { this->poison(); }
};

// ---- router: gating and its backward ---------------------------------------------
//
// One thread routes a token up to 32 experts, one warp beyond (E = 64 here):
// every sum over E is the token's own, in a fixed order (warp butterflies).

template <class S>
class CudaBatchInvarianceRouter : public ::testing::Test {};
using RouterSpecs = ::testing::Types<MoeSpec<8, 2>, MoeSpec<64, 6>>;
TYPED_TEST_SUITE(CudaBatchInvarianceRouter, RouterSpecs);

struct GatingVariant {
  const char* name;
  GatingConfig gating;
  bool bias;  // an aux-free selection bias
};

std::vector<GatingVariant> gating_variants() {
  std::vector<GatingVariant> v;
  v.push_back({"softmax_topk", {}, false});
  GatingConfig g;
  g.rule = GatingRule::kTopKSoftmax;
  v.push_back({"topk_softmax", g, false});
  g = {};
  g.rule = GatingRule::kSigmoid;
  g.renormalize = true;
  v.push_back({"sigmoid_renorm_bias", g, true});
  g = {};
  g.renormalize = true;
  g.num_groups = 4;
  g.groups_kept = 2;
  g.group_score_top = 2;
  v.push_back({"softmax_groups_bias", g, true});
  return v;
}

// A token: its logits (E), the selection bias (shared) and dweights (K);
// its result: scores (E), ids (K), weights (K) and backward_gate's dlogits (E).
template <class S>
void check_router(const GatingVariant& variant, std::uint32_t seed) {
  constexpr int E = S::num_experts, K = S::top_k;
  SCOPED_TRACE(variant.name);
  // Logits on a grid of 1/4: exact ties are frequent, so the tie rule is
  // exercised in every batch.
  RowPool<float> logits = normal_rows(E, 2.0f, seed);
  for (float& x : logits.rows) x = static_cast<float>(static_cast<int>(x * 4.0f)) / 4.0f;
  const RowPool<float> dweights = normal_rows(K, 1.0f, seed + 1);
  const DeviceBuffer<float> bias(normal_floats(E, 0.5f, seed + 2));
  DeviceBuffer<gpu::RoutingStats<S>> stats(1);
  expect_batch_invariant(seed, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    const DeviceBuffer<float> x = upload_rows(logits, items), dw = upload_rows(dweights, items);
    Poisoned<float> scores(n * E), weights(n * K), dlogits(n * E);
    Poisoned<std::int32_t> ids(n * K);
    const gpu::RouteArgs<S, float> args{
        {x.get(), n, E},
        variant.bias ? VectorView<const float>(bias.get(), E) : VectorView<const float>(),
        variant.gating,
        {scores.get(), n, E},
        {ids.get(), n, K},
        {weights.get(), n, K},
        stats.get()};
    two_phase([&](void* p, std::size_t& bytes) { return gpu::route(p, bytes, args); });
    const gpu::GateBackwardArgs<S, float> back{{x.get(), n, E},   {scores.get(), n, E},
                                               {ids.get(), n, K}, {dw.get(), n, K},
                                               variant.gating,    {dlogits.get(), n, E}};
    MOEKIT_CUDA_CHECK(gpu::backward_gate(back));
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    const auto s = scores.download(), w = weights.download(), d = dlogits.download();
    const auto id = ids.download();
    BatchResults r(items.size());
    for (std::size_t t = 0; t < items.size(); ++t) {
      append_row(s, E, t, r[t]);
      append_ids(id, K, t, 0, E, r[t]);
      append_row(w, K, t, r[t]);
      append_row(d, E, t, r[t]);
    }
    return r;
  });
}

TYPED_TEST(CudaBatchInvarianceRouter, GatingAndGateBackwardEveryRule) {
  MOEKIT_REQUIRE_GPU();
  std::uint32_t seed = 100;
  for (const GatingVariant& v : gating_variants()) {
    ASSERT_NO_FATAL_FAILURE(check_router<TypeParam>(v, seed));
    seed += 10;
  }
}

// ---- dispatch plan, dispatch and combine (dropless) ------------------------------
//
// A token's buffer rows are copies of its row, and combine sums its K
// expert outputs in k order, in fp32, one warp per token. Its positions
// number the batch's assignments per expert, so they are left out.

TEST(CudaBatchInvariance, DroplessDispatchAndCombine) {
  MOEKIT_REQUIRE_GPU();
  using S = MoeSpec<8, 2>;
  constexpr int E = S::num_experts, K = S::top_k;
  constexpr index_t d = 36;         // 144-byte rows: the 16-byte vector path
  constexpr int kRowAlignment = 4;  // padding rows between the experts
  const RowPool<float> x = normal_rows(d, 1.0f, 200);
  RowPool<std::int32_t> ids = integer_rows(K, 0, E - 1, 201);
  for (std::size_t i = 0; i < ids.rows.size(); i += K) {  // distinct experts per token
    if (ids.rows[i + 1] == ids.rows[i]) ids.rows[i + 1] = (ids.rows[i] + 1) % E;
  }
  RowPool<float> gate = normal_rows(K, 1.0f, 202);
  for (float& w : gate.rows) w = 0.1f + std::fabs(w);
  // Each expert's stand-in, on the host: out = in * gain_e, element-wise (one
  // rounding, so no compiler contraction can make two rows differ).
  const std::vector<float> gain = normal_floats(E * d, 1.0f, 203);
  const moekit::CapacityConfig dropless{};
  expect_batch_invariant(20, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    const index_t rows = gpu::max_dispatch_rows<S>(n, dropless, kRowAlignment);
    const DeviceBuffer<float> xb = upload_rows(x, items);
    const DeviceBuffer<std::int32_t> idb = upload_rows(ids, items);
    DeviceBuffer<float> weights = upload_rows(gate, items);
    Poisoned<std::int32_t> positions(n * K), row_slots(rows);
    Poisoned<index_t> offsets(E + 1);
    Poisoned<float> buffer(rows * d), y(n * d);
    const gpu::DispatchPlanArgs<S> plan{
        {idb.get(), n, K},      {weights.get(), n, K},   dropless,
        kRowAlignment,          {positions.get(), n, K}, {offsets.get(), E + 1},
        {row_slots.get(), rows}};
    two_phase([&](void* p, std::size_t& bytes) { return gpu::plan_dispatch(p, bytes, plan); });
    MOEKIT_CUDA_CHECK(
        gpu::dispatch<S, float>({xb.get(), n, d}, plan.dispatch_map(), {buffer.get(), rows, d}));
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    // The experts: rows past offsets[E] stay NaN, so combine must not read them.
    std::vector<float> out = buffer.download();
    const std::vector<index_t> off = offsets.download();
    for (std::size_t e = 0; e < E; ++e) {
      for (auto r = static_cast<std::size_t>(off[e]); r < static_cast<std::size_t>(off[e + 1]);
           ++r) {
        for (std::size_t j = 0; j < d; ++j) out[r * d + j] *= gain[e * d + j];
      }
    }
    const DeviceBuffer<float> expert_out(out);
    MOEKIT_CUDA_CHECK(gpu::combine<S, float>({expert_out.get(), rows, d}, {idb.get(), n, K},
                                             {weights.get(), n, K}, {positions.get(), n, K},
                                             {offsets.get(), E + 1}, {y.get(), n, d}));
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    const auto yh = y.download(), w = weights.download();
    const auto p = positions.download();
    BatchResults r(items.size());
    for (std::size_t t = 0; t < items.size(); ++t) {
      append_row(yh, d, t, r[t]);
      append_row(w, K, t, r[t]);  // dropless: the weights as given
      // Kept or not (dropless: every slot); the position itself is the batch's.
      for (std::size_t k = 0; k < K; ++k) r[t].push_back(p[t * K + k] >= 0 ? 1.0f : 0.0f);
    }
    return r;
  });
}

// ---- task heads: forward, and dx from a given dlogits -----------------------------
//
// One warp per row for both: lanes over d in a fixed stride, a warp
// butterfly, classes of the row's own head only.

TEST(CudaBatchInvariance, TaskHeadsForwardAndInputGradient) {
  MOEKIT_REQUIRE_GPU();
  using Spec = moekit::HeadSpec<3>;
  constexpr index_t d = 200;  // several passes of 32 lanes, and a ragged last one
  const gpu::TaskHeads<Spec, float> heads({.d_model = d, .classes = {2, 5, 11}});
  const index_t width = heads.max_classes();
  const RowPool<float> x = normal_rows(d, 1.0f, 300), dz = normal_rows(width, 0.3f, 301);
  const RowPool<std::int32_t> tasks = integer_rows(1, 0, Spec::num_heads - 1, 302);
  const DeviceBuffer<float> dw(normal_floats(heads.total_classes() * d, 0.1f, 303));
  const DeviceBuffer<float> db(normal_floats(heads.total_classes(), 0.1f, 304));
  const gpu::HeadWeights<float> weights{{dw.get(), heads.total_classes(), d},
                                        {db.get(), heads.total_classes()}};
  expect_batch_invariant(30, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    const DeviceBuffer<float> xb = upload_rows(x, items), dzb = upload_rows(dz, items);
    const DeviceBuffer<std::int32_t> tb = upload_rows(tasks, items);
    Poisoned<float> logits(n * width), dx(n * d);
    heads.forward({xb.get(), n, d}, {tb.get(), n}, weights, {logits.get(), n, width});
    heads.backward({dzb.get(), n, width}, {xb.get(), n, d}, {tb.get(), n}, weights,
                   {dx.get(), n, d}, {}, nullptr, 0);
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    const auto z = logits.download(), g = dx.download();
    BatchResults r(items.size());
    for (std::size_t t = 0; t < items.size(); ++t) {
      append_row(z, width, t, r[t]);  // -inf padding past the head's classes
      append_row(g, d, t, r[t]);
    }
    return r;
  });
}

// ---- early exit -------------------------------------------------------------------
//
// One thread per live row decides with the CPU's row function; the state
// follows the row through the compaction.

TEST(CudaBatchInvariance, EarlyExitDecisions) {
  MOEKIT_REQUIRE_GPU();
  constexpr int kExits = 3;
  constexpr index_t c = 6;
  moekit::EarlyExitConfig config;
  config.num_exits = kExits;
  config.criteria.min_confidence = 0.75f;
  config.criteria.patience = 1;
  const gpu::EarlyExit exits(config);
  // Every exit's logits of a sample, sharpening with depth so that samples
  // leave at every exit.
  RowPool<float> logits = normal_rows(kExits * c, 1.0f, 400);
  for (index_t i = 0; i < pool_size(); ++i) {
    for (index_t e = 0; e < kExits; ++e) {
      logits.rows[static_cast<std::size_t>((i * kExits + e) * c + i % c)] +=
          0.7f * static_cast<float>(e + 1);
    }
  }
  expect_batch_invariant(40, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    const std::vector<float> all = logits.gather(items);
    Poisoned<std::int32_t> prediction(n), exit(n), previous(n), agree(n);
    Poisoned<float> confidence(n);
    Poisoned<index_t> original(n), kept(n);
    DeviceBuffer<index_t> live(1);
    const gpu::ExitState state{{original.get(), n}, {previous.get(), n}, {agree.get(), n}};
    const gpu::ExitResults results{{prediction.get(), n}, {confidence.get(), n}, {exit.get(), n}};
    exits.begin(n, state, results);
    std::vector<index_t> live_original(items.size());
    for (index_t r = 0; r < n; ++r) live_original[static_cast<std::size_t>(r)] = r;
    index_t m = n;
    for (int i = 0; i < kExits && m > 0; ++i) {
      // The exit classifier's logits of the live rows (built on the host).
      std::vector<float> z;
      for (index_t r = 0; r < m; ++r) {
        const auto first = all.begin() + live_original[static_cast<std::size_t>(r)] * kExits * c;
        z.insert(z.end(), first + i * c, first + (i + 1) * c);
      }
      const DeviceBuffer<float> zb(z);
      two_phase([&](void* p, std::size_t& bytes) {
        return exits.step<float>(p, bytes, i, {zb.get(), m, c}, state, results, {kept.get(), n},
                                 live.get());
      });
      m = live.download()[0];
      const std::vector<index_t> o = original.download();
      for (index_t r = 0; r < m; ++r) {
        live_original[static_cast<std::size_t>(r)] = o[static_cast<std::size_t>(r)];
      }
    }
    const auto pred = prediction.download(), taken = exit.download();
    const auto conf = confidence.download();
    BatchResults r(items.size());
    for (std::size_t t = 0; t < items.size(); ++t) {
      append_ids(taken, 1, t, 0, kExits, r[t]);  // every sample has left by the last exit
      append_ids(pred, 1, t, 0, static_cast<int>(c), r[t]);
      r[t].push_back(conf[t]);
    }
    return r;
  });
}

// ---- distillation's gradient -----------------------------------------------------
//
// One thread per row (classify::distillation_row). dL/ds is the gradient of
// the batch mean, (1 / n) times the row's own term by definition: bit-
// identical among batches of the same size, whatever else is in them.

TEST(CudaBatchInvariance, DistillationGradientPerRow) {
  MOEKIT_REQUIRE_GPU();
  constexpr index_t c = 10;
  const RowPool<float> student = normal_rows(c, 1.5f, 500), teacher = normal_rows(c, 1.5f, 501);
  const RowPool<std::int32_t> labels = integer_rows(1, 0, static_cast<int>(c) - 1, 502);
  DeviceBuffer<moekit::DistillationLoss> loss(1);
  expect_batch_invariant(
      50,
      [&](const std::vector<index_t>& items) {
        const auto n = static_cast<index_t>(items.size());
        const DeviceBuffer<float> s = upload_rows(student, items), t = upload_rows(teacher, items);
        const DeviceBuffer<std::int32_t> y = upload_rows(labels, items);
        Poisoned<float> ds(n * c);
        const gpu::DistillationArgs<float> args{{.temperature = 2.0f, .alpha = 0.5f},
                                                {s.get(), n, c},
                                                {t.get(), n, c},
                                                {y.get(), n},
                                                {ds.get(), n, c},
                                                loss.get()};
        two_phase(
            [&](void* p, std::size_t& bytes) { return gpu::distillation_loss(p, bytes, args); });
        const auto g = ds.download();
        BatchResults r(items.size());
        for (std::size_t row = 0; row < items.size(); ++row) append_row(g, c, row, r[row]);
        return r;
      },
      Reference::kSameSize);
}

// ---- LoRA bank: the adapters on a caller's base output ---------------------------
//
// shrink and expand are moekit kernels: a tile holds rows of one adapter,
// each row with its own accumulators over d in a fixed order (threads over
// d, warp butterflies, warps in order). The base product (weights.w) is
// cuBLAS and left out here; dropout (training) is keyed on the row's index
// in the batch by design.

TEST(CudaBatchInvariance, LoraBankAdaptersOnAGivenBase) {
  MOEKIT_REQUIRE_GPU();
  constexpr int R = 8;
  constexpr index_t d_in = 600, d_out = 72, adapters = 4;  // d_in: several passes of the block
  const gpu::LoraBank<moekit::LoraSpec<R>, float> bank(
      {.d_in = d_in, .d_out = d_out, .num_adapters = adapters, .alpha = 16.0f});
  const RowPool<float> x = normal_rows(d_in, 1.0f, 600), base = normal_rows(d_out, 1.0f, 601);
  const RowPool<std::int32_t> ids = integer_rows(1, -1, static_cast<int>(adapters) - 1, 602);
  const DeviceBuffer<float> da(normal_floats(adapters * R * d_in, 0.05f, 603));
  const DeviceBuffer<float> db(normal_floats(adapters * d_out * R, 0.05f, 604));
  gpu::LoraWeights<float> weights;
  weights.a = {da.get(), adapters * R, d_in};
  weights.b = {db.get(), adapters * d_out, R};
  expect_batch_invariant(60, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    const DeviceBuffer<float> xb = upload_rows(x, items);
    DeviceBuffer<float> y = upload_rows(base, items);
    const DeviceBuffer<std::int32_t> idb = upload_rows(ids, items);
    Poisoned<index_t> order(n), offsets(adapters + 1);
    Poisoned<float> h(n * R);
    DeviceBuffer<unsigned char> group_ws(bank.group_workspace_size(n));
    bank.group({idb.get(), n}, {order.get(), n}, {offsets.get(), adapters + 1}, nullptr,
               group_ws.get(), group_ws.size());
    DeviceBuffer<unsigned char> ws(bank.workspace_size(n));
    ws.poison();
    const moekit::LoraRows rows{{idb.get(), n}, {order.get(), n}, {offsets.get(), adapters + 1}};
    bank.forward(nullptr, {xb.get(), n, d_in}, rows, weights, {y.get(), n, d_out}, {h.get(), n, R},
                 {}, ws.get(), ws.size());
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    const auto yh = y.download(), hh = h.download();
    BatchResults r(items.size());
    for (std::size_t t = 0; t < items.size(); ++t) {
      append_row(yh, d_out, t, r[t]);  // rows without an adapter keep the base
      append_row(hh, R, t, r[t]);      // and get h = 0
    }
    return r;
  });
}

}  // namespace
