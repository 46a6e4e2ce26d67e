// Overlapping arguments (core/view.hpp, issue 21 item 3): the exact overlap
// test against a byte-by-byte count on random strided views, then every
// public CPU entry point that cannot work in place, each called with one
// output aliasing an input or another output: each must refuse with
// kInvalidArgument naming itself and both arguments, before writing anything.
// Disjoint column blocks of one matrix are not an overlap.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "expect_error.hpp"
#include "moekit/cpu/aux_losses.hpp"
#include "moekit/cpu/dispatch.hpp"
#include "moekit/cpu/distillation.hpp"
#include "moekit/cpu/early_exit.hpp"
#include "moekit/cpu/expert_ffn.hpp"
#include "moekit/cpu/expert_lora.hpp"
#include "moekit/cpu/lora.hpp"
#include "moekit/cpu/task_heads.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/nn/mlp_encoder.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "moekit/train/data.hpp"
#include "router_fixture.hpp"

namespace {

namespace cpu = moekit::cpu;
using moekit::Errc;
using moekit::Footprint;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::VectorView;

std::size_t sz(index_t v) { return static_cast<std::size_t>(v); }

// ---- the predicate ------------------------------------------------------------------------

// The bytes a footprint covers, one by one.
std::set<std::uintptr_t> bytes_of(const Footprint& f) {
  std::set<std::uintptr_t> out;
  if (f.empty()) return out;
  for (std::uintptr_t r = 0; r < f.rows; ++r) {
    for (std::uintptr_t b = 0; b < f.width; ++b) out.insert(f.begin + r * f.pitch + b);
  }
  return out;
}

TEST(Overlap, ExactOnRandomStridedViews) {
  alignas(64) static float arena[4096];
  std::mt19937 rng(1);
  const auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int overlapping = 0, disjoint = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    MatrixView<float> v[2];
    for (MatrixView<float>& m : v) {
      const index_t cols = pick(0, 9), ld = cols + pick(0, 6) * (pick(0, 3) == 0 ? 0 : 1);
      const index_t rows = pick(0, 7);
      // Shared lds half of the time: the exact same-pitch formula.
      const index_t pitch = trial % 2 == 0 ? 10 : ld;
      m = MatrixView<float>(arena + pick(0, 200), rows, cols, std::max(pitch, cols));
    }
    const Footprint a(v[0], "a"), b(v[1], "b");
    const std::set<std::uintptr_t> ba = bytes_of(a), bb = bytes_of(b);
    const bool want =
        std::any_of(ba.begin(), ba.end(), [&](std::uintptr_t x) { return bb.count(x); });
    ASSERT_EQ(moekit::overlap(a, b), want)
        << "a: " << v[0].rows() << " x " << v[0].cols() << " ld " << v[0].ld() << " at "
        << (v[0].data() - arena) << "; b: " << v[1].rows() << " x " << v[1].cols() << " ld "
        << v[1].ld() << " at " << (v[1].data() - arena);
    ASSERT_EQ(moekit::overlap(b, a), want);
    (want ? overlapping : disjoint) += 1;
  }
  EXPECT_GT(overlapping, 2000);
  EXPECT_GT(disjoint, 2000);
}

TEST(Overlap, ColumnBlocksOfOneMatrixAreDisjointAndTypesMix) {
  std::vector<float> m(8 * 10);
  const MatrixView<float> all(m.data(), 8, 10);
  EXPECT_FALSE(moekit::overlap({all.block(0, 0, 8, 4), ""}, {all.block(0, 4, 8, 6), ""}));
  EXPECT_TRUE(moekit::overlap({all.block(0, 0, 8, 5), ""}, {all.block(0, 4, 8, 6), ""}));
  EXPECT_FALSE(moekit::overlap({all.block(0, 0, 4, 10), ""}, {all.block(4, 0, 4, 10), ""}));
  // The same bytes seen as ints overlap the floats.
  const VectorView<std::int32_t> ints(reinterpret_cast<std::int32_t*>(m.data() + 79), 1);
  EXPECT_TRUE(moekit::overlap({all, ""}, {ints, ""}));
  EXPECT_FALSE(moekit::overlap({all.block(0, 0, 0, 10), ""}, {all, ""}));  // empty
}

// ---- the entry points ---------------------------------------------------------------------

// Expects `call` to be refused as an overlap by `where`, naming `out` and `in`.
template <class F>
void expect_overlap(F&& call, const std::string& where, const std::string& out,
                    const std::string& in) {
  const std::string msg = moekit_test::expect_error(std::forward<F>(call), Errc::kInvalidArgument);
  EXPECT_NE(msg.find("moekit::" + where + ":"), std::string::npos) << msg;
  EXPECT_NE(msg.find(out + " overlaps " + in), std::string::npos) << msg;
}

std::vector<float> randoms(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

using S = MoeSpec<4, 2>;
constexpr int E = 4, K = 2;

// A routed batch of T tokens of width d = E (so x and the logits have one shape).
struct Routed {
  static constexpr index_t T = 6, d = E;
  cpu::Router<S> router{cpu::RouterConfig{}};
  std::vector<float> x = randoms(T * d, 1), w_gate = randoms(E * d, 2);
  moekit_test::RoutingBuffers<S> buf{T};
  std::vector<index_t> offsets = std::vector<index_t>(E + 1);
  Routed() {
    router.forward({x.data(), T, d}, {w_gate.data(), E, d}, {}, {}, buf.view());
    cpu::dispatch_offsets<S>(buf.view(), {offsets.data(), E + 1});
  }
  cpu::Routing routing() { return buf.view(); }
  index_t rows() const { return offsets[E]; }
};

TEST(OverlapEntryPoints, RouterAndAuxLosses) {
  Routed r;
  const index_t T = Routed::T, d = Routed::d;
  const cpu::Routing out = r.routing();
  const std::vector<float> before = r.buf.logits;
  // The logits written over the input they are computed from.
  expect_overlap(
      [&] {
        r.router.forward(MatrixView<const float>(out.logits), {r.w_gate.data(), E, d}, {}, {}, out);
      },
      "cpu::Router::forward", "out.logits", "x");
  cpu::Routing scores_on_logits = out;
  scores_on_logits.scores = out.logits;
  expect_overlap([&] { r.router.route(scores_on_logits, {}); }, "cpu::Router::route", "out.scores",
                 "out.logits");
  std::vector<float> dweights(T * K, 0.5f);
  expect_overlap(
      [&] {
        r.router.backward_gate(out, {dweights.data(), T, K}, out.logits);
      },
      "cpu::Router::backward_gate", "dlogits", "saved.logits");
  std::vector<float> dl(T * E, 0.25f);
  expect_overlap(
      [&] {
        r.router.backward_logits({r.x.data(), T, d}, {r.w_gate.data(), E, d}, {dl.data(), T, E},
                                 {.dx = {r.x.data(), T, d}});
      },
      "cpu::Router::backward_logits", "grads.dx", "x");
  EXPECT_EQ(r.buf.logits, before);  // nothing was written

  const auto rule = moekit::GatingRule::kSoftmaxTopK;
  expect_overlap([&] { cpu::switch_loss<S>(rule, out, {}, 1.0f, out.scores); }, "cpu::switch_loss",
                 "dlogits", "routing.scores");
  expect_overlap([&] { cpu::sequence_aux_loss<S>(rule, out, 3, 1.0f, out.logits); },
                 "cpu::sequence_aux_loss", "dlogits", "routing.logits");
  expect_overlap([&] { cpu::z_loss<S>(out, 1.0f, out.logits); }, "cpu::z_loss", "dlogits",
                 "routing.logits");
  expect_overlap(
      [&] { cpu::importance_load_loss<S>(cpu::RouterConfig{}, out, {}, {}, 1.0f, out.scores); },
      "cpu::importance_load_loss", "dlogits", "routing.scores");
  EXPECT_EQ(r.buf.logits, before);
}

TEST(OverlapEntryPoints, DispatchAndCombine) {
  Routed r;
  const index_t T = Routed::T, d = Routed::d, n = r.rows();
  const cpu::Routing routing = r.routing();
  const VectorView<const index_t> offsets(r.offsets.data(), E + 1);
  std::vector<float> wide(sz(std::max(n, T) * 2 * d), 3.0f);
  // The buffer in the x's own rows; then in the columns beside them (fine).
  const MatrixView<float> both(wide.data(), std::max(n, T), 2 * d);
  expect_overlap(
      [&] {
        cpu::dispatch<S>(MatrixView<const float>(both.block(0, 0, T, d)), routing, offsets,
                         both.block(0, 0, n, d));
      },
      "cpu::dispatch", "buffer", "x");
  cpu::dispatch<S>(MatrixView<const float>(both.block(0, 0, T, d)), routing, offsets,
                   both.block(0, d, n, d));
  expect_overlap(
      [&] {
        cpu::combine<S>(MatrixView<const float>(both.block(0, 0, n, d)), routing, offsets,
                        both.block(0, 0, T, d));
      },
      "cpu::combine", "y", "expert_out");
  std::vector<float> dweights(T * K);
  expect_overlap(
      [&] {
        cpu::combine_backward<S>(MatrixView<const float>(both.block(0, 0, T, d)), {}, routing,
                                 offsets, both.block(0, 0, n, d), {});
      },
      "cpu::combine_backward", "d_expert_out", "dy");
  expect_overlap(
      [&] {
        cpu::dispatch_backward<S>(MatrixView<const float>(both.block(0, 0, n, d)), routing, offsets,
                                  both.block(0, 0, T, d));
      },
      "cpu::dispatch_backward", "dx", "d_buffer");
  std::vector<index_t> storage(T * K);  // the offsets written over the ids they count
  cpu::Routing bad = routing;
  bad.expert_ids = MatrixView<std::int32_t>(reinterpret_cast<std::int32_t*>(storage.data()), T, K);
  std::copy(r.buf.ids.begin(), r.buf.ids.end(), bad.expert_ids.data());
  expect_overlap(
      [&] {
        cpu::dispatch_offsets<S>(bad, {storage.data(), E + 1});
      },
      "cpu::dispatch_offsets", "offsets", "routing.expert_ids");
}

TEST(OverlapEntryPoints, ExpertFfnAndMoeLayer) {
  Routed r;
  const index_t d = Routed::d, f = 3, n = r.rows();
  const cpu::ExpertFfn<S> ffn({.d_model = d, .d_ff = f});
  std::vector<float> w1 = randoms(E * f * d, 3), w2 = randoms(E * d * f, 4);
  const cpu::ExpertWeights weights{{w1.data(), E * f, d}, {}, {w2.data(), E * d, f}};
  std::vector<float> buffer = randoms(sz(n * d), 5), pre(sz(n * f));
  std::vector<std::byte> ws(sz(ffn.workspace_size(n)));
  const VectorView<const index_t> offsets(r.offsets.data(), E + 1);
  const MatrixView<float> buf(buffer.data(), n, d);
  expect_overlap(
      [&] {
        ffn.forward(buf, offsets, weights, buf, {pre.data(), n, f}, {},
                    {ws.data(), static_cast<index_t>(ws.size())});
      },
      "cpu::ExpertFfn::forward", "y", "buffer");
  expect_overlap(
      [&] {
        ffn.backward(buf, buf, offsets, weights, {pre.data(), n, f}, {}, buf, {},
                     {ws.data(), static_cast<index_t>(ws.size())});
      },
      "cpu::ExpertFfn::backward", "dx", "dy");
  // A weight gradient written over the weight (MatrixView<float> of w1).
  expect_overlap(
      [&] {
        ffn.backward(buf, buf, offsets, weights, {pre.data(), n, f}, {}, {},
                     {.dw1 = {w1.data(), E * f, d}}, {ws.data(), static_cast<index_t>(ws.size())});
      },
      "cpu::ExpertFfn::backward", "grads.dw1", "weights.w1");

  // The case: y = x with a shared expert gave errors of 0.49.
  cpu::MoeLayerConfig c;
  c.d_model = 8;
  c.d_ff = 6;
  c.num_shared = 1;
  const cpu::MoeLayer<S> layer(c);
  const index_t T = 5, dm = 8;
  std::vector<float> x = randoms(T * dm, 6), gate = randoms(E * dm, 7);
  std::vector<float> e1 = randoms(E * 6 * dm, 8), e2 = randoms(E * dm * 6, 9);
  std::vector<float> s1 = randoms(6 * dm, 10), s2 = randoms(dm * 6, 11);
  const cpu::MoeLayerParams params{{gate.data(), E, dm},
                                   {},
                                   {},
                                   {{e1.data(), E * 6, dm}, {}, {e2.data(), E * dm, 6}},
                                   {{s1.data(), 6, dm}, {}, {s2.data(), dm, 6}}};
  cpu::MoeLayerStorage<S> st(layer, T);
  const std::vector<float> x0 = x;
  expect_overlap(
      [&] {
        layer.forward({x.data(), T, dm}, params, st.state(), {x.data(), T, dm}, nullptr,
                      st.workspace());
      },
      "cpu::MoeLayer::forward", "y", "x");
  EXPECT_EQ(x, x0);
  std::vector<float> y(sz(T * dm));
  layer.forward({x.data(), T, dm}, params, st.state(), {y.data(), T, dm}, nullptr, st.workspace());
  expect_overlap(
      [&] {
        layer.backward({y.data(), T, dm}, {x.data(), T, dm}, params, st.state(), {y.data(), T, dm},
                       {}, st.workspace());
      },
      "cpu::MoeLayer::backward", "dx", "dy");
  expect_overlap(
      [&] {
        layer.backward({y.data(), T, dm}, {x.data(), T, dm}, params, st.state(),
                       st.state().buffer.block(0, 0, T, dm), {}, st.workspace());
      },
      "cpu::MoeLayer::backward", "dx", "state.buffer");
  cpu::MoeLayerGrads g;
  g.dw_gate = {gate.data(), E, dm};
  expect_overlap(
      [&] {
        layer.backward({y.data(), T, dm}, {x.data(), T, dm}, params, st.state(), {}, g,
                       st.workspace());
      },
      "cpu::MoeLayer::backward", "grads.dw_gate", "params.w_gate");
}

TEST(OverlapEntryPoints, LoraAdapters) {
  using L = moekit::LoraSpec<2>;
  const index_t n = 4, d = 6;
  const cpu::LoraLinear<L> lora({.d_in = d, .d_out = d});
  std::vector<float> x = randoms(n * d, 1), w = randoms(d * d, 2), a = randoms(2 * d, 3),
                     b = randoms(d * 2, 4), h(n * 2), y(n * d);
  std::vector<std::byte> ws(sz(lora.workspace_size(n)) + 64);
  const VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
  const cpu::LoraWeights lw{{w.data(), d, d}, {}, {a.data(), 2, d}, {b.data(), d, 2}};
  expect_overlap(
      [&] {
        lora.forward({x.data(), n, d}, lw, {x.data(), n, d}, {}, {}, wv);
      },
      "cpu::LoraLinear::forward", "y", "x");
  expect_overlap(
      [&] {
        lora.forward({x.data(), n, d}, lw, {y.data(), n, d}, {a.data(), n, 2}, {}, wv);
      },
      "cpu::LoraLinear::forward", "saved_h", "weights.a");
  expect_overlap(
      [&] {
        lora.backward({y.data(), n, d}, {x.data(), n, d}, lw, {h.data(), n, 2}, {},
                      {x.data(), n, d}, {}, wv);
      },
      "cpu::LoraLinear::backward", "dx", "x");
  expect_overlap(
      [&] {
        lora.backward({y.data(), n, d}, {x.data(), n, d}, lw, {h.data(), n, 2}, {}, {},
                      {.da = {a.data(), 2, d}}, wv);
      },
      "cpu::LoraLinear::backward", "grads.da", "weights.a");
  expect_overlap(
      [&] {
        lora.init({a.data(), 2, d}, {a.data() + 2, d, 2}, {});
      },
      "cpu::LoraLinear::init", "a", "b");
  std::vector<float> pool = randoms(256, 7);  // views that share memory
  expect_overlap(
      [&] {
        lora.merge({pool.data(), d, d}, {pool.data() + 30, 2, d}, {b.data(), d, 2});
      },
      "cpu::LoraLinear::merge", "w", "a");

  const cpu::LoraBank<L> bank({.d_in = d, .d_out = d, .num_adapters = 2});
  std::vector<std::int32_t> ids = {0, 1, -1, 1};
  std::vector<index_t> order(n), offsets(3);
  expect_overlap(
      [&] {
        bank.group({ids.data(), n}, {order.data(), n}, {order.data() + 1, 3});
      },
      "cpu::LoraBank::group", "order", "offsets");
  bank.group({ids.data(), n}, {order.data(), n}, {offsets.data(), 3});
  std::vector<float> ab = randoms(4 * d, 5), bb = randoms(2 * d * 2, 6);
  const cpu::LoraWeights bw{{w.data(), d, d}, {}, {ab.data(), 4, d}, {bb.data(), 2 * d, 2}};
  const cpu::LoraRows rows{{ids.data(), n}, {order.data(), n}, {offsets.data(), 3}};
  std::vector<std::byte> bws(sz(bank.workspace_size(n)));
  const VectorView<std::byte> bwv(bws.data(), static_cast<index_t>(bws.size()));
  expect_overlap(
      [&] {
        bank.forward({x.data(), n, d}, rows, bw, {x.data(), n, d}, {}, {}, bwv);
      },
      "cpu::LoraBank::forward", "y", "x");
  expect_overlap(
      [&] {
        bank.backward({y.data(), n, d}, {x.data(), n, d}, rows, bw, {}, {}, {y.data(), n, d}, {},
                      bwv);
      },
      "cpu::LoraBank::backward", "dx", "dy");
  expect_overlap(
      [&] {
        bank.merge(1, {pool.data(), d, d}, {pool.data() + 35, 4, d}, {bb.data(), 2 * d, 2});
      },
      "cpu::LoraBank::merge", "w", "a");
  expect_overlap(
      [&] {
        bank.init_adapter(1, {ab.data(), 4, d}, {ab.data(), 2 * d, 2}, {});
      },
      "cpu::LoraBank::init_adapter", "a", "b");
}

TEST(OverlapEntryPoints, ExpertLora) {
  using L = moekit::LoraSpec<2>;
  Routed r;
  const index_t d = Routed::d, f = 3, n = r.rows();
  const cpu::ExpertLora<S, L> el({.d_model = d, .d_ff = f});
  std::vector<float> w1 = randoms(E * f * d, 3), w2 = randoms(E * d * f, 4);
  std::vector<float> a1 = randoms(E * 2 * d, 5), b1 = randoms(E * f * 2, 6);
  const cpu::ExpertLoraWeights weights{{{w1.data(), E * f, d}, {}, {w2.data(), E * d, f}},
                                       {{a1.data(), E * 2, d}, {b1.data(), E * f, 2}}};
  std::vector<float> buffer = randoms(sz(n * d), 7), pre(sz(n * f));
  std::vector<std::byte> ws(sz(el.workspace_size(n)));
  const VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
  const VectorView<const index_t> offsets(r.offsets.data(), E + 1);
  const MatrixView<float> buf(buffer.data(), n, d);
  expect_overlap(
      [&] {
        el.forward(buf, offsets, weights, buf, {.pre = {pre.data(), n, f}}, wv);
      },
      "cpu::ExpertLora::forward", "y", "buffer");
  expect_overlap(
      [&] {
        el.backward(buf, buf, offsets, weights, {.pre = {pre.data(), n, f}}, buf, {}, wv);
      },
      "cpu::ExpertLora::backward", "dx", "dy");
  expect_overlap(
      [&] {
        el.init({.a1 = {a1.data(), E * 2, d}, .b1 = {a1.data(), E * f, 2}}, {});
      },
      "cpu::ExpertLora::init", "adapters.a1", "adapters.b1");
  std::vector<float> pool = randoms(sz(E * f * d + E * 2 * d), 8);
  expect_overlap(
      [&] {
        el.merge(1, {pool.data(), E * f, d}, {}, {w2.data(), E * d, f},
                 {.a1 = {pool.data() + E * f * d - 1, E * 2, d}, .b1 = {b1.data(), E * f, 2}});
      },
      "cpu::ExpertLora::merge", "w1", "adapters.a1");
}

TEST(OverlapEntryPoints, HeadsDistillationAndEarlyExit) {
  using H = moekit::HeadSpec<2>;
  const index_t n = 4, d = 3;
  const cpu::TaskHeads<H> heads({.d_model = d, .classes = {3, 2}});
  std::vector<float> x = randoms(n * d, 1), w = randoms(5 * d, 2), b = randoms(5, 3);
  std::vector<std::int32_t> tasks = {0, 1, 1, 0}, labels = {2, 1, 0, 0};
  std::vector<std::byte> ws(sz(heads.workspace_size(n)));
  const VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
  const cpu::HeadWeights hw{{w.data(), 5, d}, {b.data(), 5}};
  std::vector<float> logits(n * 3);
  expect_overlap(
      [&] {
        heads.forward({x.data(), n, d}, {tasks.data(), n}, hw, {w.data(), n, 3}, wv);
      },
      "cpu::TaskHeads::forward", "logits", "weights.w");
  heads.forward({x.data(), n, d}, {tasks.data(), n}, hw, {logits.data(), n, 3}, wv);
  expect_overlap(
      [&] {
        heads.loss({logits.data(), n, 3}, {tasks.data(), n}, {labels.data(), n}, {},
                   {logits.data(), n, 3});
      },
      "cpu::TaskHeads::loss", "dlogits", "logits");
  expect_overlap(
      [&] {
        heads.backward({logits.data(), n, 3}, {x.data(), n, d}, {tasks.data(), n}, hw,
                       {x.data(), n, d}, {}, wv);
      },
      "cpu::TaskHeads::backward", "dx", "x");
  expect_overlap(
      [&] {
        cpu::distillation_loss({}, {logits.data(), n, 3}, {x.data(), n, 3}, {labels.data(), n},
                               {x.data(), n, 3});
      },
      "cpu::distillation_loss", "dstudent", "teacher");

  const cpu::EarlyExit exits({.num_exits = 2});
  std::vector<index_t> original(n), kept(n);
  std::vector<std::int32_t> previous(n), agree(n), prediction(n), exit(n);
  std::vector<float> confidence(n);
  const moekit::ExitState state{{original.data(), n}, {previous.data(), n}, {agree.data(), n}};
  const moekit::ExitResults results{
      {prediction.data(), n}, {confidence.data(), n}, {exit.data(), n}};
  moekit::ExitResults aliased = results;
  aliased.exit = {previous.data(), n};
  expect_overlap([&] { exits.begin(n, state, aliased); }, "cpu::EarlyExit::begin", "state.previous",
                 "results.exit");
  exits.begin(n, state, results);
  expect_overlap(
      [&] {
        exits.step(0, {logits.data(), n, 3}, state, results, {original.data(), n});
      },
      "cpu::EarlyExit::step", "state.original", "kept");
  std::vector<float> src = randoms(n * 3, 4);
  const std::vector<index_t> rows = {1, 3};
  expect_overlap(
      [&] {
        cpu::gather_rows<float>({src.data(), n, 3}, {rows.data(), 2}, {src.data() + 3, 2, 3});
      },
      "cpu::gather_rows", "dst", "src");
  const std::array<MatrixView<const float>, 2> z = {MatrixView<const float>(logits.data(), n, 3),
                                                    MatrixView<const float>(src.data(), n, 3)};
  std::vector<float> dz(n * 3);
  const std::array<MatrixView<float>, 2> dzs = {MatrixView<float>(dz.data(), n, 3),
                                                MatrixView<float>(src.data(), n, 3)};
  expect_overlap(
      [&] {
        cpu::multi_exit_loss(z, {labels.data(), n}, {}, dzs);
      },
      "cpu::multi_exit_loss", "dlogits[1]", "logits[1]");
}

TEST(OverlapEntryPoints, EncoderDataAndLoads) {
  const cpu::MlpEncoder enc({.d_input = 4, .d_model = 4, .d_ff = 4, .num_layers = 1});
  std::vector<float> p(200);
  const cpu::MlpEncoderViews<float> w{
      {p.data(), 4, 4},      {p.data() + 16, 4},    {p.data() + 20, 1, 4}, {p.data() + 24, 1, 4},
      {p.data() + 28, 4, 4}, {p.data() + 44, 1, 4}, {p.data() + 48, 4, 4}, {p.data() + 60, 1, 4}};
  expect_overlap([&] { enc.init(w, 1); }, "cpu::MlpEncoder::init", "w.w2", "w.b2");
  cpu::MlpEncoderViews<float> ok = w;
  ok.b2 = {p.data() + 64, 1, 4};
  enc.init(ok, 1);
  const cpu::MlpEncoderWeights cw{ok.w_in, ok.b_in, ok.gamma, ok.beta, ok.w1, ok.b1, ok.w2, ok.b2};
  std::vector<float> x = randoms(8, 1);
  std::vector<std::byte> ws(sz(enc.workspace_size(2)));
  expect_overlap(
      [&] {
        enc.forward({x.data(), 2, 4}, cw, {x.data(), 2, 4},
                    {ws.data(), static_cast<index_t>(ws.size())});
      },
      "cpu::MlpEncoder::forward", "y", "x");

  moekit::train::Dataset data;
  data.features = 2;
  data.x = {1, 2, 3, 4};
  data.tasks = {0, 1};
  data.labels = {1, 0};
  const std::vector<index_t> rows = {1, 0};
  std::vector<std::int32_t> t(2), l(2);
  expect_overlap(
      [&] {
        moekit::train::gather(data, rows, {data.x.data(), 2, 2}, {t.data(), 2}, {l.data(), 2});
      },
      "train::gather", "x", "data.x");

  std::vector<float> v = {1, 2, 3, 4};
  moekit::io::SafetensorsWriter out;
  out.add("a", VectorView<const float>(v.data(), 2));
  out.add("b", VectorView<const float>(v.data() + 2, 2));
  const auto file = moekit::io::SafetensorsReader::from_bytes(out.to_bytes());
  std::vector<float> dst(3, 7.0f);
  const std::vector<moekit::io::TensorTarget> targets = {{"a", {2}, {dst.data(), 1, 2}},
                                                         {"b", {2}, {dst.data() + 1, 1, 2}}};
  expect_overlap([&] { file.load(targets); }, "io::SafetensorsReader::load", "targets[0] ('a')",
                 "targets[1] ('b')");
  EXPECT_EQ(dst, std::vector<float>(3, 7.0f));
}

}  // namespace
