// Batch invariance (docs/determinism.md), component by component: an item's
// result is bit-identical alone, among up to 4,096 others in any order, and
// on 1 or 2 OpenMP threads (the property of batch_invariance.hpp).
//
// Tests named BatchInvariance.* draw batches of up to 256 items, and
// BatchInvarianceLarge.* batches of up to 4,096 (left out of the sanitizer
// pass, tools/test.sh). Session memory's test is in test_session_memory.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <vector>

#include "batch_invariance.hpp"
#include "bert_reference.hpp"
#include "moekit/cpu/aux_losses.hpp"
#include "moekit/cpu/expert_ffn.hpp"
#include "moekit/cpu/lora.hpp"
#include "moekit/cpu/router.hpp"
#include "moekit/cpu/task_heads.hpp"
#include "moekit/nn/bert_encoder.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "router_fixture.hpp"

namespace {

using moekit::index_t;
using moekit::MatrixView;
using moekit::to_size;
using moekit::VectorView;
using moekit_test::BatchResults;
using moekit_test::expect_batch_invariant;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr index_t kSmall = 256;   // BatchInvariance.*
constexpr index_t kLarge = 4096;  // BatchInvarianceLarge.*
constexpr index_t kPool = 48;     // distinct random items per test

std::vector<float> random_floats(index_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(to_size(n));
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<std::byte> workspace_of(index_t bytes) {
  return std::vector<std::byte>(to_size(bytes));
}
VectorView<std::byte> view_of(std::vector<std::byte>& w) {
  return {w.data(), static_cast<index_t>(w.size())};
}

// A pool of random d-wide rows; gather(items) copies the picked rows into
// one batch, in order.
struct RowPool {
  index_t d;
  std::vector<float> rows;
  RowPool(index_t pool, index_t width, std::uint32_t seed)
      : d(width), rows(random_floats(pool * width, seed)) {}

  std::vector<float> gather(const std::vector<index_t>& items) const {
    std::vector<float> x;
    x.reserve(items.size() * to_size(d));
    for (const index_t i : items) {
      x.insert(x.end(), rows.begin() + i * d, rows.begin() + (i + 1) * d);
    }
    return x;
  }
};

// Row t of a row-major n x width buffer, as floats, appended to out.
template <class T>
void append_row(const std::vector<T>& m, index_t width, std::size_t t, std::vector<float>& out) {
  for (index_t c = 0; c < width; ++c)
    out.push_back(static_cast<float>(m[t * to_size(width) + to_size(c)]));
}

// Per-row results of a row-major n x width output.
BatchResults split_rows(const std::vector<float>& m, std::size_t n, index_t width) {
  BatchResults r(n);
  for (std::size_t t = 0; t < n; ++t) append_row(m, width, t, r[t]);
  return r;
}

// ---- router ------------------------------------------------------------------------

using Spec = moekit::MoeSpec<8, 2>;
constexpr int E = Spec::num_experts, K = Spec::top_k;

moekit::cpu::RouterConfig dropless(moekit::GatingRule rule) {
  moekit::cpu::RouterConfig c;
  c.gating.rule = rule;
  c.gating.renormalize = rule != moekit::GatingRule::kTopKSoftmax;
  return c;
}

// A token's routing: scores (E), expert ids (K) and weights (K), plus its
// logits (E) when they are computed here. Its buffer positions number the
// batch's assignments per expert, so they depend on the batch by definition
// and are left out.
void append_routing(const moekit::Routing& r, index_t t, bool logits, std::vector<float>& out) {
  if (logits) out.insert(out.end(), r.logits.row(t), r.logits.row(t) + E);
  out.insert(out.end(), r.scores.row(t), r.scores.row(t) + E);
  for (int k = 0; k < K; ++k) out.push_back(static_cast<float>(r.expert_ids(t, k)));
  out.insert(out.end(), r.weights.row(t), r.weights.row(t) + K);
}

// Gating of given logits (Router::route), dropless: every rule, with and
// without the aux-free selection bias (ExpertBias after a few updates).
void check_gating(moekit::GatingRule rule, bool aux_free, index_t max_items) {
  const moekit::cpu::Router<Spec> router(dropless(rule));
  const RowPool logits(kPool, E, 11 + static_cast<std::uint32_t>(rule));
  moekit::cpu::ExpertBias<Spec> balance(0.05f);
  if (aux_free) {
    std::vector<std::int32_t> ids{0, 1, 0, 2, 0, 3, 1, 2};  // expert 0 overloaded
    for (int step = 0; step < 3; ++step) {
      balance.accumulate(MatrixView<const std::int32_t>(ids.data(), 4, K));
      balance.update();
    }
  }
  const VectorView<const float> bias = aux_free ? balance.bias() : VectorView<const float>();
  expect_batch_invariant(kPool, max_items, 5, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    moekit_test::RoutingBuffers<Spec> buf(n);
    buf.logits = logits.gather(items);
    router.route(buf.view(), bias);
    BatchResults r(items.size());
    for (index_t t = 0; t < n; ++t) append_routing(buf.view(), t, false, r[to_size(t)]);
    return r;
  });
}

TEST(BatchInvariance, GatingEveryRuleDropless) {
  for (const auto rule : {moekit::GatingRule::kSoftmaxTopK, moekit::GatingRule::kTopKSoftmax,
                          moekit::GatingRule::kSigmoid}) {
    SCOPED_TRACE(static_cast<int>(rule));
    check_gating(rule, false, kSmall);
  }
}
TEST(BatchInvariance, GatingWithAuxFreeBias) {
  for (const auto rule : {moekit::GatingRule::kSoftmaxTopK, moekit::GatingRule::kSigmoid}) {
    SCOPED_TRACE(static_cast<int>(rule));
    check_gating(rule, true, kSmall);
  }
}
TEST(BatchInvarianceLarge, GatingEveryRuleWithAuxFreeBias) {
  for (const auto rule : {moekit::GatingRule::kSoftmaxTopK, moekit::GatingRule::kTopKSoftmax,
                          moekit::GatingRule::kSigmoid}) {
    SCOPED_TRACE(static_cast<int>(rule));
    check_gating(rule, true, kLarge);
  }
}

// Router::forward: the logits product x w_gate^T, then gating.
void check_router_forward(index_t max_items) {
  constexpr index_t d = 40;
  const moekit::cpu::Router<Spec> router(dropless(moekit::GatingRule::kSoftmaxTopK));
  const RowPool x(kPool, d, 21);
  const std::vector<float> w_gate = random_floats(E * d, 22, 0.3f);
  const std::vector<float> gate_bias = random_floats(E, 23, 0.1f);
  expect_batch_invariant(kPool, max_items, 6, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    const std::vector<float> xb = x.gather(items);
    moekit_test::RoutingBuffers<Spec> buf(n);
    std::vector<std::byte> ws = workspace_of(router.workspace_size(n, d));
    router.forward({xb.data(), n, d}, {w_gate.data(), E, d}, {gate_bias.data(), E}, {}, buf.view(),
                   nullptr, view_of(ws));
    BatchResults r(items.size());
    for (index_t t = 0; t < n; ++t) append_routing(buf.view(), t, true, r[to_size(t)]);
    return r;
  });
}

TEST(BatchInvariance, RouterForward) { check_router_forward(kSmall); }
TEST(BatchInvarianceLarge, RouterForward) { check_router_forward(kLarge); }

// Router::backward_logits's dx: a token's row of dlogits times w_gate, on
// the row kernel (E = 8) and on the GEMM engine (E = 16).
template <int E16>
void check_router_input_gradient(index_t max_items) {
  constexpr index_t d = 40;
  const moekit::cpu::Router<moekit::MoeSpec<E16, 2>> router(moekit::cpu::RouterConfig{});
  const RowPool dlogits(kPool, E16, 24);
  const std::vector<float> w_gate = random_floats(E16 * d, 25, 0.3f);
  expect_batch_invariant(kPool, max_items, 8, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    const std::vector<float> g = dlogits.gather(items);
    const std::vector<float> x(to_size(n * d), 0.0f);
    std::vector<float> dx(to_size(n * d), kNaN);
    std::vector<std::byte> ws = workspace_of(router.workspace_size(n, d));
    router.backward_logits({x.data(), n, d}, {w_gate.data(), E16, d}, {g.data(), n, E16},
                           {{dx.data(), n, d}, {}, {}, false}, view_of(ws));
    return split_rows(dx, items.size(), d);
  });
}

TEST(BatchInvariance, RouterInputGradient) {
  check_router_input_gradient<8>(kSmall);
  check_router_input_gradient<16>(kSmall);
}

// ---- expert FFN and the dropless MoE layer -------------------------------------------

// A token of the expert FFN test is a row and the expert it goes to.
void check_expert_ffn(moekit::FfnKind kind, index_t max_items) {
  constexpr index_t d = 24, f = 40;
  const moekit::cpu::ExpertFfn<Spec> ffn(
      {.d_model = d, .d_ff = f, .kind = kind, .activation = moekit::Activation::kSilu});
  const bool gated = kind == moekit::FfnKind::kGated;
  const RowPool x(kPool, d, 31);
  const std::vector<float> w1 = random_floats(E * f * d, 32, 0.2f);
  const std::vector<float> w3 = gated ? random_floats(E * f * d, 33, 0.2f) : std::vector<float>();
  const std::vector<float> w2 = random_floats(E * d * f, 34, 0.2f);
  const moekit::cpu::ExpertWeights weights{
      {w1.data(), E * f, d},
      gated ? MatrixView<const float>(w3.data(), E * f, d) : MatrixView<const float>(),
      {w2.data(), E * d, f}};
  const auto expert_of = [](index_t item) { return static_cast<int>((item * 5 + 3) % E); };
  expect_batch_invariant(kPool, max_items, 7, [&](const std::vector<index_t>& items) {
    // The expert-major buffer: items stably sorted by expert.
    std::vector<std::size_t> order(items.size());
    for (std::size_t j = 0; j < order.size(); ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return expert_of(items[a]) < expert_of(items[b]);
    });
    std::vector<index_t> offsets(E + 1, 0), sorted;
    for (const index_t item : items) ++offsets[to_size(expert_of(item) + 1)];
    for (int e = 0; e < E; ++e) offsets[to_size(e + 1)] += offsets[to_size(e)];
    for (const std::size_t j : order) sorted.push_back(items[j]);
    const auto n = static_cast<index_t>(items.size());
    const std::vector<float> buffer = x.gather(sorted);
    std::vector<float> y(to_size(n * d), kNaN);
    std::vector<std::byte> ws = workspace_of(ffn.workspace_size(n));
    ffn.forward({buffer.data(), n, d}, {offsets.data(), E + 1}, weights, {y.data(), n, d}, {}, {},
                view_of(ws));
    BatchResults r(items.size());
    for (std::size_t s = 0; s < order.size(); ++s) append_row(y, d, s, r[order[s]]);
    return r;
  });
}

TEST(BatchInvariance, ExpertFfn) {
  check_expert_ffn(moekit::FfnKind::kPlain, kSmall);
  check_expert_ffn(moekit::FfnKind::kGated, kSmall);
}
TEST(BatchInvarianceLarge, ExpertFfn) { check_expert_ffn(moekit::FfnKind::kGated, kLarge); }

// The dropless layer's forward: router, dispatch, routed SwiGLU experts,
// combine, one shared expert.
void check_moe_layer(index_t max_items) {
  constexpr index_t d = 24, f = 32;
  moekit::cpu::MoeLayerConfig config;
  config.d_model = d;
  config.d_ff = f;
  config.kind = moekit::FfnKind::kGated;
  config.activation = moekit::Activation::kSilu;
  config.router = dropless(moekit::GatingRule::kSoftmaxTopK);
  config.num_shared = 1;
  const moekit::cpu::MoeLayer<Spec> layer(config);
  const RowPool x(kPool, d, 41);
  const std::vector<float> wg = random_floats(E * d, 42, 0.3f);
  const std::vector<float> w1 = random_floats(E * f * d, 43, 0.2f);
  const std::vector<float> w3 = random_floats(E * f * d, 44, 0.2f);
  const std::vector<float> w2 = random_floats(E * d * f, 45, 0.2f);
  const std::vector<float> s1 = random_floats(f * d, 46, 0.2f);
  const std::vector<float> s3 = random_floats(f * d, 47, 0.2f);
  const std::vector<float> s2 = random_floats(d * f, 48, 0.2f);
  moekit::cpu::MoeLayerParams params;
  params.w_gate = {wg.data(), E, d};
  params.experts = {{w1.data(), E * f, d}, {w3.data(), E * f, d}, {w2.data(), E * d, f}};
  params.shared = {{s1.data(), f, d}, {s3.data(), f, d}, {s2.data(), d, f}};
  expect_batch_invariant(kPool, max_items, 8, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    const std::vector<float> xb = x.gather(items);
    std::vector<float> y(to_size(n * d), kNaN);
    moekit::cpu::MoeLayerStorage<Spec> storage(layer, n);
    layer.forward({xb.data(), n, d}, params, storage.state(), {y.data(), n, d}, nullptr,
                  storage.workspace());
    return split_rows(y, items.size(), d);
  });
}

TEST(BatchInvariance, MoeLayerDroplessForward) { check_moe_layer(kSmall); }
TEST(BatchInvarianceLarge, MoeLayerDroplessForward) { check_moe_layer(kLarge); }

// ---- LoRA --------------------------------------------------------------------------

using Lora = moekit::LoraSpec<8>;
constexpr int R = Lora::rank;

// One adapter on a frozen linear layer (no dropout): y and h, and the
// backward's dx (dy w + s dy b a) for a dy row per item; the base product in
// `base`.
void check_lora_linear(index_t max_items,
                       moekit::cpu::GemmDtype base = moekit::cpu::GemmDtype::kFloat32) {
  constexpr index_t d_in = 40, d_out = 24;
  const moekit::cpu::LoraLinear<Lora> lora({.d_in = d_in, .d_out = d_out, .alpha = 16.0f}, base);
  const RowPool x(kPool, d_in, 51);
  const RowPool dy(kPool, d_out, 56);
  const std::vector<float> w = random_floats(d_out * d_in, 52, 0.2f);
  const std::vector<float> bias = random_floats(d_out, 53, 0.1f);
  const std::vector<float> a = random_floats(R * d_in, 54, 0.2f);
  const std::vector<float> b = random_floats(d_out * R, 55, 0.2f);
  const moekit::cpu::LoraWeights weights{
      {w.data(), d_out, d_in}, {bias.data(), d_out}, {a.data(), R, d_in}, {b.data(), d_out, R}};
  expect_batch_invariant(kPool, max_items, 9, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    const std::vector<float> xb = x.gather(items);
    std::vector<float> y(to_size(n * d_out), kNaN), h(to_size(n * R), kNaN);
    std::vector<std::byte> ws = workspace_of(lora.workspace_size(n));
    lora.forward({xb.data(), n, d_in}, weights, {y.data(), n, d_out}, {h.data(), n, R}, {},
                 view_of(ws));
    const std::vector<float> dyb = dy.gather(items);
    std::vector<float> dx(to_size(n * d_in), kNaN);
    lora.backward({dyb.data(), n, d_out}, {xb.data(), n, d_in}, weights, {h.data(), n, R}, {},
                  {dx.data(), n, d_in}, {}, view_of(ws));
    BatchResults r = split_rows(y, items.size(), d_out);
    for (std::size_t t = 0; t < items.size(); ++t) {
      append_row(h, R, t, r[t]);
      append_row(dx, d_in, t, r[t]);
    }
    return r;
  });
}

TEST(BatchInvariance, LoraLinear) { check_lora_linear(kSmall); }
TEST(BatchInvarianceLarge, LoraLinear) { check_lora_linear(kLarge); }
TEST(BatchInvariance, LoraLinearBf16Base) {
  check_lora_linear(kSmall, moekit::cpu::GemmDtype::kBfloat16);
}

// A bank of adapters, each row picking its own (or none, id -1); with the
// frozen base product (with_base, in `base`) or adding to y as given
// (without).
void check_lora_bank(bool with_base, index_t max_items,
                     moekit::cpu::GemmDtype base = moekit::cpu::GemmDtype::kFloat32) {
  constexpr index_t d_in = 40, d_out = 24, N = 5;
  const moekit::cpu::LoraBank<Lora> bank(
      {.d_in = d_in, .d_out = d_out, .num_adapters = N, .alpha = 16.0f}, base);
  const RowPool x(kPool, d_in, 61);
  const RowPool y0(kPool, d_out, 62);  // y before the adapters, without the base
  const std::vector<float> w = random_floats(d_out * d_in, 63, 0.2f);
  const std::vector<float> a = random_floats(N * R * d_in, 64, 0.2f);
  const std::vector<float> b = random_floats(N * d_out * R, 65, 0.2f);
  moekit::cpu::LoraWeights weights{{}, {}, {a.data(), N * R, d_in}, {b.data(), N * d_out, R}};
  if (with_base) weights.w = {w.data(), d_out, d_in};
  const auto adapter_of = [](index_t item) {
    return static_cast<std::int32_t>(item % (N + 1)) - 1;
  };
  expect_batch_invariant(kPool, max_items, 10, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    const std::vector<float> xb = x.gather(items);
    std::vector<float> y =
        with_base ? std::vector<float>(to_size(n * d_out), kNaN) : y0.gather(items);
    std::vector<float> h(to_size(n * R), kNaN);
    std::vector<std::int32_t> ids;
    for (const index_t item : items) ids.push_back(adapter_of(item));
    std::vector<index_t> order(items.size()), offsets(N + 1);
    bank.group({ids.data(), n}, {order.data(), n}, {offsets.data(), N + 1});
    std::vector<std::byte> ws = workspace_of(bank.workspace_size(n));
    bank.forward({xb.data(), n, d_in},
                 {{ids.data(), n}, {order.data(), n}, {offsets.data(), N + 1}}, weights,
                 {y.data(), n, d_out}, {h.data(), n, R}, {}, view_of(ws));
    BatchResults r = split_rows(y, items.size(), d_out);
    for (std::size_t t = 0; t < items.size(); ++t) append_row(h, R, t, r[t]);
    return r;
  });
}

TEST(BatchInvariance, LoraBankAdaptersOnly) { check_lora_bank(false, kSmall); }
TEST(BatchInvarianceLarge, LoraBankAdaptersOnly) { check_lora_bank(false, kLarge); }
TEST(BatchInvariance, LoraBankWithBase) { check_lora_bank(true, kSmall); }
TEST(BatchInvarianceLarge, LoraBankWithBase) { check_lora_bank(true, kLarge); }
TEST(BatchInvariance, LoraBankWithBf16Base) {
  check_lora_bank(true, kSmall, moekit::cpu::GemmDtype::kBfloat16);
}

// ---- task heads --------------------------------------------------------------------

// packed: the inference forward on heads packed in that dtype (int8: x
// quantized per row); otherwise the training forward with the backward's
// dx, with products in `compute`.
void check_task_heads(index_t max_items,
                      std::optional<moekit::cpu::GemmDtype> packed = std::nullopt,
                      moekit::cpu::GemmDtype compute = moekit::cpu::GemmDtype::kFloat32) {
  using Heads = moekit::HeadSpec<3>;
  constexpr index_t d = 40;
  const moekit::cpu::TaskHeads<Heads> heads(
      {.d_model = d, .classes = {2, 7, 3}, .bias = true, .compute = compute});
  const index_t c = heads.total_classes(), width = heads.max_classes();
  const RowPool x(kPool, d, 71);
  const RowPool dz(kPool, width, 74);  // dL/dlogits (only a row's C_h columns are read)
  const std::vector<float> w = random_floats(c * d, 72, 0.2f);
  const std::vector<float> bias = random_floats(c, 73, 0.1f);
  const moekit::cpu::HeadWeights weights{{w.data(), c, d}, {bias.data(), c}};
  const moekit::cpu::PackedHeadWeights<Heads> packed_weights =
      heads.pack(weights, packed.value_or(moekit::cpu::GemmDtype::kFloat32));
  const auto task_of = [](index_t item) { return static_cast<std::int32_t>(item % 3); };
  expect_batch_invariant(kPool, max_items, 12, [&](const std::vector<index_t>& items) {
    const auto n = static_cast<index_t>(items.size());
    const std::vector<float> xb = x.gather(items);
    std::vector<std::int32_t> tasks;
    for (const index_t item : items) tasks.push_back(task_of(item));
    std::vector<float> logits(to_size(n * width), kNaN);
    std::vector<std::byte> ws = workspace_of(heads.workspace_size(n));
    if (packed) {
      heads.forward({xb.data(), n, d}, {tasks.data(), n}, packed_weights, {logits.data(), n, width},
                    view_of(ws));
      return split_rows(logits, items.size(), width);
    }
    heads.forward({xb.data(), n, d}, {tasks.data(), n}, weights, {logits.data(), n, width},
                  view_of(ws));
    // The backward's dx = dz W_h for a dz row per item.
    const std::vector<float> dzb = dz.gather(items);
    std::vector<float> dx(to_size(n * d), kNaN);
    heads.backward({dzb.data(), n, width}, {xb.data(), n, d}, {tasks.data(), n}, weights,
                   {dx.data(), n, d}, {}, view_of(ws));
    BatchResults r = split_rows(logits, items.size(), width);
    for (std::size_t t = 0; t < items.size(); ++t) append_row(dx, d, t, r[t]);
    return r;
  });
}

TEST(BatchInvariance, TaskHeads) { check_task_heads(kSmall); }
TEST(BatchInvarianceLarge, TaskHeads) { check_task_heads(kLarge); }
TEST(BatchInvariance, TaskHeadsPackedInt8) {
  check_task_heads(kSmall, moekit::cpu::GemmDtype::kInt8);
}
TEST(BatchInvariance, TaskHeadsBf16Compute) {
  check_task_heads(kSmall, std::nullopt, moekit::cpu::GemmDtype::kBfloat16);
}

// ---- the frozen BERT encoder: an item is a sequence ---------------------------------

TEST(BatchInvariance, BertEncoderPackedSequences) {
  const moekit::cpu::BertEncoderConfig config = moekit_test::tiny_bert_config();
  const moekit::cpu::BertEncoder encoder(config);
  moekit::cpu::BertEncoderStorage storage(config);
  moekit_test::randomize(storage.views(), 81);
  const moekit::cpu::BertEncoderWeights weights = storage.weights();
  constexpr index_t kSequences = 12;
  std::mt19937 rng(82);
  std::vector<std::vector<std::int32_t>> ids(kSequences), types(kSequences);
  for (index_t s = 0; s < kSequences; ++s) {
    const index_t length = std::uniform_int_distribution<index_t>(1, 40)(rng);
    for (index_t i = 0; i < length; ++i) {
      ids[to_size(s)].push_back(static_cast<std::int32_t>(rng() % 40));
      types[to_size(s)].push_back(static_cast<std::int32_t>(rng() % 2));
    }
  }
  const index_t d = config.d_model;
  expect_batch_invariant(kSequences, 16, 13, [&](const std::vector<index_t>& items) {
    std::vector<std::int32_t> batch_ids, batch_types;
    std::vector<index_t> offsets{0};
    for (const index_t s : items) {
      batch_ids.insert(batch_ids.end(), ids[to_size(s)].begin(), ids[to_size(s)].end());
      batch_types.insert(batch_types.end(), types[to_size(s)].begin(), types[to_size(s)].end());
      offsets.push_back(static_cast<index_t>(batch_ids.size()));
    }
    const auto tokens = static_cast<index_t>(batch_ids.size());
    const VectorView<const index_t> off(offsets.data(), static_cast<index_t>(offsets.size()));
    std::vector<float> h(to_size(tokens * d), kNaN);
    std::vector<std::byte> ws =
        workspace_of(encoder.workspace_size(tokens, moekit::cpu::longest_sequence(off)));
    encoder.embed({batch_ids.data(), tokens}, {batch_types.data(), tokens}, off, weights,
                  {h.data(), tokens, d});
    encoder.run_layers(0, config.num_layers, off, weights, {h.data(), tokens, d}, view_of(ws));
    BatchResults r(items.size());
    for (std::size_t j = 0; j < items.size(); ++j) {
      for (index_t t = offsets[j]; t < offsets[j + 1]; ++t) append_row(h, d, to_size(t), r[j]);
    }
    return r;
  });
}

}  // namespace
