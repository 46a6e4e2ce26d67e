// MoeLayer (moekit/nn/moe_layer.hpp): forward against a float64 per-token
// reference written here (routing by routing_reference.hpp's ref_gate, FFNs
// by the textbook formulas), backward against central finite differences of
// L = <y, G> + switch_coeff L_switch + z_coeff L_z through that reference;
// determinism, empty experts, T = 0, frozen parts and bad input; the
// inference forward on packed weights (fp32: the same bits; bf16 / int8:
// within their rounding of the float64 reference).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "expect_error.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "routing_reference.hpp"

namespace {

using moekit::Activation;
using moekit::DropPolicy;
using moekit::Errc;
using moekit::FfnKind;
using moekit::GatingRule;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::to_size;
using moekit::VectorView;
using moekit::cpu::GemmDtype;
using moekit::cpu::MoeLayer;
using moekit::cpu::MoeLayerConfig;
using moekit::cpu::MoeLayerGrads;
using moekit::cpu::MoeLayerParams;
using moekit::cpu::MoeLayerState;
using moekit::cpu::MoeLayerStorage;
using moekit::cpu::PackedMoeLayerParams;
using moekit_test::act64;
using moekit_test::expect_error;
using moekit_test::ref_gate;
using moekit_test::rel_error;
using moekit_test::same_bits;
using moekit_test::to_double;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// All parameters and inputs of one problem, float (for the layer) and the
// problem's sizes.
struct Problem {
  int E = 0, K = 0, n_shared = 0;
  index_t T = 0, d = 0, f = 0, fs = 0;
  bool gated = false;
  std::vector<float> x, wg, bg, w1, w3, w2, s1, s3, s2, G;
};

// Float64 copy of a Problem's parameters: what finite differences perturb.
struct Params64 {
  std::vector<double> x, wg, bg, w1, w3, w2, s1, s3, s2;
  explicit Params64(const Problem& p)
      : x(to_double(p.x)),
        wg(to_double(p.wg)),
        bg(to_double(p.bg)),
        w1(to_double(p.w1)),
        w3(to_double(p.w3)),
        w2(to_double(p.w2)),
        s1(to_double(p.s1)),
        s3(to_double(p.s3)),
        s2(to_double(p.s2)) {}
};

// out += scale * FFN(x) for one expert: W1, W3 f x d (W3 null when plain), W2 d x f.
void ffn64(const double* x, const double* W1, const double* W3, const double* W2, index_t d,
           index_t f, Activation act, double scale, double* out) {
  std::vector<double> h(static_cast<std::size_t>(f));
  for (index_t j = 0; j < f; ++j) {
    double a = 0, g = 0;
    for (index_t i = 0; i < d; ++i) {
      a += W1[j * d + i] * x[i];
      if (W3 != nullptr) g += W3[j * d + i] * x[i];
    }
    h[to_size(j)] = act64(act, a) * (W3 != nullptr ? g : 1.0);
  }
  for (index_t i = 0; i < d; ++i) {
    double s = 0;
    for (index_t j = 0; j < f; ++j) s += W2[i * f + j] * h[to_size(j)];
    out[i] += scale * s;
  }
}

struct Ref {
  std::vector<double> y;
  std::vector<int> ids;
  double switch_loss = 0, z_loss = 0;
};

// The float64 router: every token's logits and its routing by ref_gate.
struct RefRouting {
  std::vector<std::vector<double>> logits;  // T x E
  std::vector<moekit_test::RefRoute> routes;
};

RefRouting ref_routing(const Problem& p, const MoeLayerConfig& c, const Params64& q) {
  const index_t d = p.d;
  const int E = p.E;
  RefRouting r;
  for (index_t t = 0; t < p.T; ++t) {
    std::vector<double> logits(to_size(E));
    for (int e = 0; e < E; ++e) {
      double s = q.bg.empty() ? 0.0 : q.bg[to_size(e)];
      for (index_t i = 0; i < d; ++i) s += q.wg[to_size(e * d + i)] * q.x[to_size(t * d + i)];
      logits[to_size(e)] = s;
    }
    r.routes.push_back(ref_gate(logits, nullptr, c.router.gating, p.K));
    r.logits.push_back(std::move(logits));
  }
  return r;
}

// Which slots survive capacity, decided from the float64 routing alone (not
// from the layer): C = min(T, ceil(factor T K / E)), factor <= 0 dropless;
// DropPolicy::kPosition keeps each expert's first C slots in token order,
// kProbs its C largest weights (equal weights: the earlier token). Returns
// positions as the router writes them: a kept slot's row among its expert's
// kept slots in token order, -1 for a dropped one.
std::vector<std::int32_t> ref_positions(const RefRouting& routing, int E, int K,
                                        const moekit::CapacityConfig& capacity) {
  const auto T = static_cast<index_t>(routing.routes.size());
  const double c = std::ceil(capacity.factor * static_cast<double>(T) * K / E);
  const index_t cap = capacity.factor <= 0.0 ? T : std::min(T, static_cast<index_t>(c));
  std::vector<bool> kept(to_size(T * K), false);
  for (int e = 0; e < E; ++e) {
    std::vector<index_t> slots;  // expert e's slots t K + k, in token order
    for (index_t t = 0; t < T; ++t) {
      for (int k = 0; k < K; ++k) {
        if (routing.routes[to_size(t)].ids[to_size(k)] == e) slots.push_back(t * K + k);
      }
    }
    if (capacity.policy == moekit::DropPolicy::kProbs) {
      const auto weight = [&](index_t slot) {
        return routing.routes[to_size(slot / K)].weights[to_size(slot % K)];
      };
      std::stable_sort(slots.begin(), slots.end(),
                       [&](index_t a, index_t b) { return weight(a) > weight(b); });
    }
    for (std::size_t i = 0; i < slots.size() && static_cast<index_t>(i) < cap; ++i) {
      kept[to_size(slots[i])] = true;
    }
  }
  std::vector<std::int32_t> positions(to_size(T * K), -1);
  std::vector<std::int32_t> next(to_size(E), 0);
  for (index_t slot = 0; slot < T * K; ++slot) {
    const int e = routing.routes[to_size(slot / K)].ids[to_size(slot % K)];
    if (kept[to_size(slot)]) positions[to_size(slot)] = next[to_size(e)]++;
  }
  return positions;
}

// Reference forward. Routing from logits by ref_gate; `positions` (T x K)
// says which slots survived capacity (-1: dropped).
Ref ref_forward(const Problem& p, const MoeLayerConfig& c, const Params64& q,
                const std::vector<std::int32_t>& positions) {
  const index_t T = p.T, d = p.d;
  const int E = p.E, K = p.K;
  const RefRouting routing = ref_routing(p, c, q);
  Ref r;
  r.y.assign(static_cast<std::size_t>(T * d), 0.0);
  std::vector<double> count(to_size(E), 0.0), P(to_size(E), 0.0);
  for (index_t t = 0; t < T; ++t) {
    const std::vector<double>& logits = routing.logits[to_size(t)];
    const moekit_test::RefRoute& route = routing.routes[to_size(t)];
    double m = -moekit_test::kInf;
    for (double v : logits) m = std::max(m, v);
    double z = 0;
    for (double v : logits) z += std::exp(v - m);
    const double lse = m + std::log(z);
    r.z_loss += lse * lse / static_cast<double>(T);
    for (int e = 0; e < E; ++e) P[to_size(e)] += route.scores[to_size(e)] / static_cast<double>(T);
    const double* xt = &q.x[to_size(t * d)];
    double* yt = &r.y[to_size(t * d)];
    for (int k = 0; k < K; ++k) {
      const int e = route.ids[to_size(k)];
      r.ids.push_back(e);
      count[to_size(e)] += 1.0;
      if (positions[to_size(t * K + k)] < 0) continue;
      ffn64(xt, &q.w1[to_size(e * p.f * d)], p.gated ? &q.w3[to_size(e * p.f * d)] : nullptr,
            &q.w2[to_size(e * d * p.f)], d, p.f, c.activation, route.weights[to_size(k)], yt);
    }
    for (int s = 0; s < p.n_shared; ++s) {
      ffn64(xt, &q.s1[to_size(s * p.fs * d)], p.gated ? &q.s3[to_size(s * p.fs * d)] : nullptr,
            &q.s2[to_size(s * d * p.fs)], d, p.fs, c.activation, 1.0, yt);
    }
  }
  for (int e = 0; e < E; ++e) {
    r.switch_loss += E * (count[to_size(e)] / static_cast<double>(T * K)) * P[to_size(e)];
  }
  return r;
}

double ref_loss(const Problem& p, const MoeLayerConfig& c, const Params64& q,
                const std::vector<std::int32_t>& positions) {
  const Ref r = ref_forward(p, c, q, positions);
  double l = c.switch_coeff * r.switch_loss + c.z_coeff * r.z_loss;
  for (std::size_t i = 0; i < r.y.size(); ++i) l += r.y[i] * p.G[i];
  return l;
}

std::vector<float> randn(std::mt19937& rng, index_t n, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// A random problem whose tokens sit at least `gap` away from a top-K flip
// (selection keys are the logits, or sigmoid of them: no selection bias).
// The gate bias ~ N(0, bias_scale^2) makes the experts' loads uneven.
Problem make_problem(const MoeLayerConfig& c, int E, int K, index_t T, unsigned seed,
                     bool bias = true, float bias_scale = 0.5f) {
  std::mt19937 rng(seed);
  Problem p;
  p.E = E;
  p.K = K;
  p.T = T;
  p.d = c.d_model;
  p.f = c.d_ff;
  p.fs = c.d_ff_shared > 0 ? c.d_ff_shared : c.d_ff;
  p.n_shared = c.num_shared;
  p.gated = c.kind == FfnKind::kGated;
  const index_t d = p.d;
  p.wg = randn(rng, E * d, 1.0f);
  if (bias) p.bg = randn(rng, E, bias_scale);
  const float sw = 1.0f / std::sqrt(static_cast<float>(d));
  p.w1 = randn(rng, E * p.f * d, sw);
  if (p.gated) p.w3 = randn(rng, E * p.f * d, sw);
  p.w2 = randn(rng, E * d * p.f, 1.0f / std::sqrt(static_cast<float>(p.f)));
  if (p.n_shared > 0) {
    p.s1 = randn(rng, p.n_shared * p.fs * d, sw);
    if (p.gated) p.s3 = randn(rng, p.n_shared * p.fs * d, sw);
    p.s2 = randn(rng, p.n_shared * d * p.fs, 1.0f / std::sqrt(static_cast<float>(p.fs)));
  }
  p.G = randn(rng, T * d, 1.0f);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  p.x.resize(static_cast<std::size_t>(T * d));
  for (index_t t = 0; t < T; ++t) {
    for (int attempt = 0;; ++attempt) {
      for (index_t i = 0; i < d; ++i) p.x[to_size(t * d + i)] = dist(rng);
      if (K == E) break;
      std::vector<double> l(to_size(E));
      for (int e = 0; e < E; ++e) {
        double s = p.bg.empty() ? 0.0 : p.bg[to_size(e)];
        for (index_t i = 0; i < d; ++i)
          s += double{p.wg[to_size(e * d + i)]} * p.x[to_size(t * d + i)];
        l[to_size(e)] = s;
      }
      std::sort(l.begin(), l.end(), std::greater<>());
      if (l[to_size(K - 1)] - l[to_size(K)] > 0.2 || attempt > 1000) break;
    }
  }
  return p;
}

MoeLayerParams params_of(const Problem& p, const MoeLayerConfig& c) {
  const index_t d = p.d, E = p.E, n = p.n_shared;
  MoeLayerParams prm;
  prm.w_gate = {p.wg.data(), E, d};
  if (!p.bg.empty()) prm.gate_bias = {p.bg.data(), E};
  prm.experts.w1 = {p.w1.data(), E * p.f, d};
  if (p.gated) prm.experts.w3 = {p.w3.data(), E * p.f, d};
  prm.experts.w2 = {p.w2.data(), E * d, p.f};
  if (n > 0) {
    prm.shared.w1 = {p.s1.data(), n * p.fs, d};
    if (p.gated) prm.shared.w3 = {p.s3.data(), n * p.fs, d};
    prm.shared.w2 = {p.s2.data(), n * d, p.fs};
  }
  (void)c;
  return prm;
}

// Gradient buffers of a Problem, poisoned.
struct Grads {
  std::vector<float> dx, dwg, dbg, dw1, dw3, dw2, ds1, ds3, ds2;
  explicit Grads(const Problem& p)
      : dx(p.x.size(), kNaN),
        dwg(p.wg.size(), kNaN),
        dbg(p.bg.size(), kNaN),
        dw1(p.w1.size(), kNaN),
        dw3(p.w3.size(), kNaN),
        dw2(p.w2.size(), kNaN),
        ds1(p.s1.size(), kNaN),
        ds3(p.s3.size(), kNaN),
        ds2(p.s2.size(), kNaN) {}
  MoeLayerGrads view(const Problem& p) {
    const index_t d = p.d, E = p.E, n = p.n_shared;
    MoeLayerGrads g;
    g.dw_gate = {dwg.data(), E, d};
    if (!dbg.empty()) g.dgate_bias = {dbg.data(), E};
    g.dw1 = {dw1.data(), E * p.f, d};
    if (p.gated) g.dw3 = {dw3.data(), E * p.f, d};
    g.dw2 = {dw2.data(), E * d, p.f};
    if (n > 0) {
      g.shared_dw1 = {ds1.data(), n * p.fs, d};
      if (p.gated) g.shared_dw3 = {ds3.data(), n * p.fs, d};
      g.shared_dw2 = {ds2.data(), n * d, p.fs};
    }
    return g;
  }
  MatrixView<float> dx_view(const Problem& p) { return {dx.data(), p.T, p.d}; }
};

MoeLayerConfig make_config(FfnKind kind, Activation act, int n_shared, double capacity,
                           index_t d = 16, index_t f = 24, index_t fs = 0) {
  MoeLayerConfig c;
  c.d_model = d;
  c.d_ff = f;
  c.kind = kind;
  c.activation = act;
  c.num_shared = n_shared;
  c.d_ff_shared = fs;
  c.router.capacity.factor = capacity;
  return c;
}

template <class S>
std::vector<std::int32_t> positions_of(const MoeLayerStorage<S>& st, index_t T) {
  const auto& pos = st.state().routing.positions;
  return {pos.data(), pos.data() + T * S::top_k};
}

// ---- forward ----------------------------------------------------------------

template <class S>
void check_forward(const MoeLayerConfig& c, index_t T, unsigned seed, bool expect_drops) {
  constexpr int E = S::num_experts, K = S::top_k;
  const MoeLayer<S> layer(c);
  const Problem p = make_problem(c, E, K, T, seed);
  MoeLayerStorage<S> st(layer, T + 3);  // capacity above T: leading rows used
  std::vector<float> y(p.x.size(), kNaN);
  moekit::cpu::RoutingStats<S> stats;
  layer.forward({p.x.data(), T, p.d}, params_of(p, c), st.state(), {y.data(), T, p.d}, &stats,
                st.workspace());
  // Drops decided by the reference itself, not read from the layer.
  const Params64 q(p);
  const std::vector<std::int32_t> pos =
      ref_positions(ref_routing(p, c, q), E, K, c.router.capacity);
  EXPECT_EQ(positions_of(st, T), pos);
  const Ref r = ref_forward(p, c, q, pos);
  const auto& ids = st.state().routing.expert_ids;
  for (index_t i = 0; i < T * K; ++i) ASSERT_EQ(ids.data()[i], r.ids[to_size(i)]) << "slot " << i;
  const double err = rel_error(to_double(y), r.y);
  EXPECT_LT(err, 1e-6) << "E=" << E << " K=" << K << " shared=" << c.num_shared;
  EXPECT_EQ(stats.dropped > 0, expect_drops) << stats.dropped;
  std::printf("[ forward ] E=%d K=%d %s shared=%d drops=%lld rel err %.3g\n", E, K,
              c.kind == FfnKind::kGated ? "gated" : "plain", c.num_shared,
              static_cast<long long>(stats.dropped), err);
}

TEST(MoeLayer, ForwardMatchesFloat64Reference) {
  for (FfnKind kind : {FfnKind::kPlain, FfnKind::kGated}) {
    const Activation act = kind == FfnKind::kGated ? Activation::kSilu : Activation::kGeluTanh;
    for (int shared : {0, 2}) {
      check_forward<MoeSpec<8, 2>>(make_config(kind, act, shared, 0.0, 16, 24, 20), 50, 1, false);
      check_forward<MoeSpec<8, 2>>(make_config(kind, act, shared, 0.75, 32, 48), 50, 2, true);
      check_forward<MoeSpec<16, 4>>(make_config(kind, act, shared, 0.0, 16, 24), 50, 3, false);
      check_forward<MoeSpec<16, 4>>(make_config(kind, act, shared, 0.5, 16, 24), 50, 4, true);
      check_forward<MoeSpec<1, 1>>(make_config(kind, act, shared, 0.0, 16, 24), 50, 5, false);
      check_forward<MoeSpec<1, 1>>(make_config(kind, act, shared, 0.5, 16, 24), 50, 6, true);
      // Three token blocks: the router and the shared experts run per block.
      check_forward<MoeSpec<8, 2>>(make_config(kind, act, shared, 0.75, 16, 24), 150, 7, true);
    }
  }
}

// Capacity on random problems against ref_positions, which decides the drops
// from the float64 routing alone: every gating rule and drop policy, factors
// from very tight to dropless, uneven loads, T from 1 to 64. The layer's
// positions, the zero weight of each dropped slot, the kept and dropped
// counts and the output must all be what that independent count says.
template <class S>
void check_capacity(std::mt19937& rng, int round, int& rounds_with_drops) {
  constexpr int E = S::num_experts, K = S::top_k;
  std::uniform_int_distribution<int> coin(0, 1), rule(0, 2), tokens(1, 64);
  std::uniform_real_distribution<double> factor(0.05, 2.0);
  MoeLayerConfig c =
      make_config(coin(rng) != 0 ? FfnKind::kGated : FfnKind::kPlain, Activation::kSilu, coin(rng),
                  round % 4 == 0 ? 0.0 : factor(rng), 8, 6);
  c.router.capacity.policy = coin(rng) != 0 ? DropPolicy::kProbs : DropPolicy::kPosition;
  c.router.gating.rule = std::array{GatingRule::kSoftmaxTopK, GatingRule::kTopKSoftmax,
                                    GatingRule::kSigmoid}[to_size(rule(rng))];
  const index_t T = tokens(rng);
  const MoeLayer<S> layer(c);
  // kProbs: redraw a problem in which float rounding could reorder two
  // different weights at an expert's capacity boundary (the float64 order
  // would then not be the layer's). Equal weights (K = 1 with kTopKSoftmax:
  // all 1) are no risk: the tie rule decides.
  Problem p;
  std::vector<std::int32_t> ref_pos;
  for (unsigned seed = static_cast<unsigned>(rng());; ++seed) {
    p = make_problem(c, E, K, T, seed, true, 2.0f);
    const RefRouting routing = ref_routing(p, c, Params64(p));
    ref_pos = ref_positions(routing, E, K, c.router.capacity);
    bool clear = true;
    for (index_t slot = 0; slot < T * K && c.router.capacity.policy == DropPolicy::kProbs; ++slot) {
      for (index_t other = 0; other < T * K; ++other) {
        const auto& a = routing.routes[to_size(slot / K)];
        const auto& b = routing.routes[to_size(other / K)];
        const double wa = a.weights[to_size(slot % K)], wb = b.weights[to_size(other % K)];
        const bool boundary = (ref_pos[to_size(slot)] < 0) != (ref_pos[to_size(other)] < 0);
        if (boundary && a.ids[to_size(slot % K)] == b.ids[to_size(other % K)] && wa != wb &&
            std::abs(wa - wb) <= 1e-5 * std::max(wa, wb)) {
          clear = false;
        }
      }
    }
    if (clear) break;
  }

  MoeLayerStorage<S> st(layer, T);
  std::vector<float> y(p.x.size(), kNaN);
  moekit::cpu::RoutingStats<S> stats;
  layer.forward({p.x.data(), T, p.d}, params_of(p, c), st.state(), {y.data(), T, p.d}, &stats,
                st.workspace());
  const std::string where =
      "round " + std::to_string(round) + ": E=" + std::to_string(E) + " K=" + std::to_string(K) +
      " T=" + std::to_string(T) + " factor " + std::to_string(c.router.capacity.factor) +
      (c.router.capacity.policy == DropPolicy::kProbs ? " kProbs" : " kPosition");
  ASSERT_EQ(positions_of(st, T), ref_pos) << where;
  std::vector<index_t> kept(to_size(E), 0);
  index_t dropped = 0;
  const auto& routing = st.state().routing;
  for (index_t t = 0; t < T; ++t) {
    for (int k = 0; k < K; ++k) {
      if (routing.positions(t, k) < 0) {
        ++dropped;
        EXPECT_EQ(routing.weights(t, k), 0.0f) << where << " slot " << t << "," << k;
      } else {
        ++kept[to_size(routing.expert_ids(t, k))];
      }
    }
  }
  EXPECT_EQ(stats.dropped, dropped) << where;
  if (dropped > 0) ++rounds_with_drops;
  for (int e = 0; e < E; ++e) EXPECT_EQ(stats.kept[to_size(e)], kept[to_size(e)]) << where;
  EXPECT_LT(rel_error(to_double(y), ref_forward(p, c, Params64(p), ref_pos).y), 1e-6) << where;
}

TEST(MoeLayer, CapacityDropsMatchAnIndependentCount) {
  std::mt19937 rng(2024);
  int rounds_with_drops = 0;
  for (int round = 0; round < 12; ++round) {
    check_capacity<MoeSpec<8, 2>>(rng, round, rounds_with_drops);
    check_capacity<MoeSpec<5, 3>>(rng, round, rounds_with_drops);
    check_capacity<MoeSpec<4, 1>>(rng, round, rounds_with_drops);
    check_capacity<MoeSpec<6, 6>>(rng, round, rounds_with_drops);
  }
  EXPECT_GE(rounds_with_drops, 24) << "of 48 rounds";  // the test must see many drops
}

// forward's aux losses against float64 for the given coefficients. The values
// are reported whatever the coefficients: a coefficient of 0 only leaves its
// loss out of total (and of the gradients).
void check_aux_losses(float switch_coeff, float z_coeff) {
  using S = MoeSpec<8, 2>;
  MoeLayerConfig c = make_config(FfnKind::kPlain, Activation::kGeluTanh, 0, 0.0);
  c.switch_coeff = switch_coeff;
  c.z_coeff = z_coeff;
  const MoeLayer<S> layer(c);
  const Problem p = make_problem(c, 8, 2, 40, 11);
  MoeLayerStorage<S> st(layer, 40);
  std::vector<float> y(p.x.size(), kNaN);
  const auto aux = layer.forward({p.x.data(), 40, p.d}, params_of(p, c), st.state(),
                                 {y.data(), 40, p.d}, nullptr, st.workspace());
  const Ref r = ref_forward(p, c, Params64(p), positions_of(st, 40));
  ASSERT_GT(r.switch_loss, 0.0);
  ASSERT_GT(r.z_loss, 0.0);
  EXPECT_NEAR(aux.switch_loss, r.switch_loss, 1e-5 * r.switch_loss);
  EXPECT_NEAR(aux.z_loss, r.z_loss, 1e-5 * r.z_loss);
  EXPECT_DOUBLE_EQ(aux.total, static_cast<double>(switch_coeff) * aux.switch_loss +
                                  static_cast<double>(z_coeff) * aux.z_loss);
}

TEST(MoeLayer, ForwardReturnsAuxLosses) { check_aux_losses(0.01f, 0.001f); }

TEST(MoeLayer, ForwardReportsAuxValuesWithZeroCoefficients) {
  check_aux_losses(0.0f, 0.0f);
  check_aux_losses(0.01f, 0.0f);
}

// Errors from shared checkers carry the name of the function the user called.
TEST(MoeLayer, ErrorsNameThePublicFunction) {
  using S = MoeSpec<8, 2>;
  const MoeLayerConfig c = make_config(FfnKind::kPlain, Activation::kGeluTanh, 0, 0.0);
  const MoeLayer<S> layer(c);
  const Problem p = make_problem(c, 8, 2, 6, 5);
  MoeLayerStorage<S> st(layer, 6);
  std::vector<float> y(p.x.size());
  const MatrixView<const float> x(p.x.data(), 6, p.d);
  const VectorView<std::byte> ws = st.workspace();
  std::string msg = expect_error(
      [&] {
        layer.forward(x, params_of(p, c), st.state(), {y.data(), 6, p.d}, nullptr, {ws.data(), 16});
      },
      Errc::kShapeMismatch);
  EXPECT_EQ(msg.rfind("moekit::cpu::MoeLayer::forward: workspace has 16 bytes", 0), 0u) << msg;
  msg = expect_error(
      [&] {
        layer.forward(x, params_of(p, c), st.state(), {y.data(), 6, p.d - 1}, nullptr, ws);
      },
      Errc::kShapeMismatch);
  EXPECT_EQ(msg.rfind("moekit::cpu::MoeLayer::forward: y is 6 x ", 0), 0u) << msg;
  layer.forward(x, params_of(p, c), st.state(), {y.data(), 6, p.d}, nullptr, ws);
  msg = expect_error(
      [&] {
        layer.backward({y.data(), 6, p.d}, x, params_of(p, c), st.state(), {}, MoeLayerGrads{},
                       {ws.data(), 16});
      },
      Errc::kShapeMismatch);
  EXPECT_EQ(msg.rfind("moekit::cpu::MoeLayer::backward: workspace has 16 bytes", 0), 0u) << msg;
  // A public function the layer calls inside does not take the name over,
  // and the name is cleared after the call: a checker called directly names itself.
  msg = expect_error([&] { moekit::check_shape(x, 6, p.d + 1, "x"); }, Errc::kShapeMismatch);
  EXPECT_EQ(msg.rfind("moekit::check_shape: ", 0), 0u) << msg;
}

// ---- backward vs finite differences ------------------------------------------

double fd_error(const Problem& p, const MoeLayerConfig& c, const std::vector<std::int32_t>& pos,
                Params64& q, std::vector<double> Params64::*member, const std::vector<float>& got,
                const char* what) {
  std::vector<double>& v = q.*member;
  std::vector<double> fd(v.size());
  const double h = 1e-4;
  for (std::size_t i = 0; i < v.size(); ++i) {
    const double keep = v[i];
    v[i] = keep + h;
    const double lp = ref_loss(p, c, q, pos);
    v[i] = keep - h;
    const double lm = ref_loss(p, c, q, pos);
    v[i] = keep;
    fd[i] = (lp - lm) / (2 * h);
  }
  const double err = rel_error(to_double(got), fd);
  EXPECT_LT(err, 1e-5) << what;
  return err;
}

template <class S>
void check_backward(const MoeLayerConfig& c, index_t T, unsigned seed) {
  constexpr int E = S::num_experts, K = S::top_k;
  const MoeLayer<S> layer(c);
  const Problem p = make_problem(c, E, K, T, seed);
  MoeLayerStorage<S> st(layer, T);
  const MoeLayerParams prm = params_of(p, c);
  std::vector<float> y(p.x.size(), kNaN);
  const MatrixView<const float> x(p.x.data(), T, p.d);
  layer.forward(x, prm, st.state(), {y.data(), T, p.d}, nullptr, st.workspace());
  Grads g(p);
  layer.backward({p.G.data(), T, p.d}, x, prm, st.state(), g.dx_view(p), g.view(p), st.workspace());
  const std::vector<std::int32_t> pos = positions_of(st, T);
  Params64 q(p);
  const Ref r = ref_forward(p, c, q, pos);
  for (index_t i = 0; i < T * K; ++i)
    ASSERT_EQ(st.state().routing.expert_ids.data()[i], r.ids[to_size(i)]);
  double worst = 0;
  worst = std::max(worst, fd_error(p, c, pos, q, &Params64::x, g.dx, "dx"));
  worst = std::max(worst, fd_error(p, c, pos, q, &Params64::wg, g.dwg, "dw_gate"));
  worst = std::max(worst, fd_error(p, c, pos, q, &Params64::bg, g.dbg, "dgate_bias"));
  worst = std::max(worst, fd_error(p, c, pos, q, &Params64::w1, g.dw1, "dw1"));
  worst = std::max(worst, fd_error(p, c, pos, q, &Params64::w2, g.dw2, "dw2"));
  if (p.gated) worst = std::max(worst, fd_error(p, c, pos, q, &Params64::w3, g.dw3, "dw3"));
  if (p.n_shared > 0) {
    worst = std::max(worst, fd_error(p, c, pos, q, &Params64::s1, g.ds1, "shared_dw1"));
    worst = std::max(worst, fd_error(p, c, pos, q, &Params64::s2, g.ds2, "shared_dw2"));
    if (p.gated)
      worst = std::max(worst, fd_error(p, c, pos, q, &Params64::s3, g.ds3, "shared_dw3"));
  }
  std::printf("[ backward ] E=%d K=%d %s shared=%d cap=%.2f switch=%g z=%g worst rel err %.3g\n", E,
              K, p.gated ? "gated" : "plain", c.num_shared, c.router.capacity.factor,
              static_cast<double>(c.switch_coeff), static_cast<double>(c.z_coeff), worst);
}

TEST(MoeLayer, BackwardMatchesFiniteDifferences) {
  for (FfnKind kind : {FfnKind::kPlain, FfnKind::kGated}) {
    const Activation act = kind == FfnKind::kGated ? Activation::kSilu : Activation::kGeluTanh;
    for (bool aux : {false, true}) {
      MoeLayerConfig c = make_config(kind, act, 0, 0.0, 8, 12);
      if (aux) {
        c.switch_coeff = 0.5f;
        c.z_coeff = 0.1f;
      }
      check_backward<MoeSpec<8, 2>>(c, 20, 21);
      MoeLayerConfig cs = c;
      cs.num_shared = 2;
      cs.d_ff_shared = 10;
      cs.router.capacity.factor = 0.75;  // drops
      check_backward<MoeSpec<8, 2>>(cs, 20, 22);
      check_backward<MoeSpec<4, 4>>(cs, 12, 23);
      check_backward<MoeSpec<1, 1>>(cs, 12, 24);
    }
  }
  // Three token blocks: the router's and shared experts' weight gradients are
  // folded over the blocks (core/token_blocks.hpp).
  MoeLayerConfig blocks = make_config(FfnKind::kGated, Activation::kSilu, 0, 0.75, 8, 12);
  blocks.num_shared = 1;
  blocks.d_ff_shared = 6;
  blocks.switch_coeff = 0.5f;
  blocks.z_coeff = 0.1f;
  check_backward<MoeSpec<4, 2>>(blocks, 150, 25);
}

// ---- determinism, edge cases, frozen parts ---------------------------------------

template <class S>
std::vector<float> run_all(const MoeLayerConfig& c, const Problem& p, Grads& g) {
  const MoeLayer<S> layer(c);
  MoeLayerStorage<S> st(layer, p.T);
  std::vector<float> y(p.x.size(), kNaN);
  const MatrixView<const float> x(p.x.data(), p.T, p.d);
  layer.forward(x, params_of(p, c), st.state(), {y.data(), p.T, p.d}, nullptr, st.workspace());
  layer.backward({p.G.data(), p.T, p.d}, x, params_of(p, c), st.state(), g.dx_view(p), g.view(p),
                 st.workspace());
  return y;
}

TEST(MoeLayer, Deterministic) {
  using S = MoeSpec<16, 4>;
  MoeLayerConfig c = make_config(FfnKind::kGated, Activation::kSilu, 1, 1.0, 32, 48);
  c.switch_coeff = 0.01f;
  c.z_coeff = 0.001f;
  const Problem p = make_problem(c, 16, 4, 200, 31);
  Grads a(p), b(p);
  const std::vector<float> ya = run_all<S>(c, p, a);
  const std::vector<float> yb = run_all<S>(c, p, b);
  EXPECT_TRUE(same_bits(ya, yb));
  EXPECT_TRUE(same_bits(a.dx, b.dx));
  EXPECT_TRUE(same_bits(a.dwg, b.dwg));
  EXPECT_TRUE(same_bits(a.dbg, b.dbg));
  EXPECT_TRUE(same_bits(a.dw1, b.dw1));
  EXPECT_TRUE(same_bits(a.dw2, b.dw2));
  EXPECT_TRUE(same_bits(a.dw3, b.dw3));
  EXPECT_TRUE(same_bits(a.ds1, b.ds1));
}

TEST(MoeLayer, EmptyExpertsGetZeroGradients) {
  using S = MoeSpec<8, 2>;
  const MoeLayerConfig c = make_config(FfnKind::kGated, Activation::kSilu, 0, 0.0);
  Problem p = make_problem(c, 8, 2, 30, 41);
  p.bg[6] = p.bg[7] = -100.0f;  // experts 6 and 7 are never picked
  Grads g(p);
  const std::vector<float> y = run_all<S>(c, p, g);
  std::vector<std::int32_t> all_kept(static_cast<std::size_t>(p.T * 2), 0);
  EXPECT_LT(rel_error(to_double(y), ref_forward(p, c, Params64(p), all_kept).y), 1e-6);
  const std::size_t block = static_cast<std::size_t>(p.f * p.d);
  for (std::size_t i = 6 * block; i < 8 * block; ++i) {
    ASSERT_EQ(g.dw1[i], 0.0f);
    ASSERT_EQ(g.dw3[i], 0.0f);
    ASSERT_EQ(g.dw2[i], 0.0f);
  }
  for (float v : g.dx) ASSERT_TRUE(std::isfinite(v));
}

TEST(MoeLayer, ZeroTokens) {
  using S = MoeSpec<8, 2>;
  const MoeLayerConfig c = make_config(FfnKind::kGated, Activation::kSilu, 1, 1.0);
  const Problem p = make_problem(c, 8, 2, 0, 51);
  Grads g(p);
  const std::vector<float> y = run_all<S>(c, p, g);
  EXPECT_TRUE(y.empty());
  for (const auto* v : {&g.dwg, &g.dbg, &g.dw1, &g.dw2, &g.dw3, &g.ds1, &g.ds2, &g.ds3}) {
    for (float e : *v) ASSERT_EQ(e, 0.0f);  // overwrite mode: a zero gradient
  }
}

TEST(MoeLayer, FrozenPartsAreNotTouchedAndDxIsUnchanged) {
  using S = MoeSpec<8, 2>;
  MoeLayerConfig c = make_config(FfnKind::kGated, Activation::kSilu, 1, 0.75);
  c.z_coeff = 0.01f;
  const Problem p = make_problem(c, 8, 2, 40, 61);
  Grads full(p);
  run_all<S>(c, p, full);
  const MoeLayer<S> layer(c);
  MoeLayerStorage<S> st(layer, p.T);
  std::vector<float> y(p.x.size());
  const MatrixView<const float> x(p.x.data(), p.T, p.d);
  const MoeLayerParams prm = params_of(p, c);
  layer.forward(x, prm, st.state(), {y.data(), p.T, p.d}, nullptr, st.workspace());
  for (int part = 0; part < 4; ++part) {
    Grads g(p);
    MoeLayerGrads v = g.view(p);
    if (part == 0) v.dw_gate = {}, v.dgate_bias = {};   // frozen router
    if (part == 1) v.dw1 = {}, v.dw2 = {}, v.dw3 = {};  // frozen experts
    if (part == 2) v.shared_dw1 = {}, v.shared_dw2 = {}, v.shared_dw3 = {};
    if (part == 3) v = MoeLayerGrads{};  // input gradient only
    layer.backward({p.G.data(), p.T, p.d}, x, prm, st.state(), g.dx_view(p), v, st.workspace());
    EXPECT_TRUE(same_bits(g.dx, full.dx)) << part;
    const auto check = [&](const std::vector<float>& got, const std::vector<float>& ref,
                           bool frozen, const char* what) {
      if (frozen) {
        for (float e : got) ASSERT_TRUE(std::isnan(e)) << what << " written while frozen";
      } else {
        EXPECT_TRUE(same_bits(got, ref)) << what << " part " << part;
      }
    };
    check(g.dwg, full.dwg, part == 0 || part == 3, "dw_gate");
    check(g.dbg, full.dbg, part == 0 || part == 3, "dgate_bias");
    check(g.dw1, full.dw1, part == 1 || part == 3, "dw1");
    check(g.dw3, full.dw3, part == 1 || part == 3, "dw3");
    check(g.dw2, full.dw2, part == 1 || part == 3, "dw2");
    check(g.ds1, full.ds1, part == 2 || part == 3, "shared_dw1");
    check(g.ds2, full.ds2, part == 2 || part == 3, "shared_dw2");
  }
  // Nothing but the router's weight: dx frozen too.
  Grads g(p);
  MoeLayerGrads v;
  v.dw_gate = g.view(p).dw_gate;
  layer.backward({p.G.data(), p.T, p.d}, x, prm, st.state(), {}, v, st.workspace());
  EXPECT_TRUE(same_bits(g.dwg, full.dwg));
  for (float e : g.dx) ASSERT_TRUE(std::isnan(e));
}

TEST(MoeLayer, AccumulateAddsToEveryOutput) {
  using S = MoeSpec<8, 2>;
  const MoeLayerConfig c = make_config(FfnKind::kPlain, Activation::kGeluTanh, 1, 0.0);
  const Problem p = make_problem(c, 8, 2, 30, 71);
  Grads once(p);
  run_all<S>(c, p, once);
  const MoeLayer<S> layer(c);
  MoeLayerStorage<S> st(layer, p.T);
  std::vector<float> y(p.x.size());
  const MatrixView<const float> x(p.x.data(), p.T, p.d);
  layer.forward(x, params_of(p, c), st.state(), {y.data(), p.T, p.d}, nullptr, st.workspace());
  Grads g = once;  // start from one gradient, add a second
  MoeLayerGrads v = g.view(p);
  v.accumulate = true;
  layer.backward({p.G.data(), p.T, p.d}, x, params_of(p, c), st.state(), g.dx_view(p), v,
                 st.workspace());
  const auto twice = [](const std::vector<float>& a) {
    std::vector<double> r;
    for (float e : a) r.push_back(2.0 * e);
    return r;
  };
  EXPECT_LT(rel_error(to_double(g.dx), twice(once.dx)), 1e-6);
  EXPECT_LT(rel_error(to_double(g.dwg), twice(once.dwg)), 1e-6);
  EXPECT_LT(rel_error(to_double(g.dw1), twice(once.dw1)), 1e-6);
  EXPECT_LT(rel_error(to_double(g.ds2), twice(once.ds2)), 1e-6);
}

// ---- bad input ---------------------------------------------------------------

TEST(MoeLayer, RejectsBadConfig) {
  using S = MoeSpec<8, 2>;
  auto c = make_config(FfnKind::kPlain, Activation::kGeluTanh, -1, 0.0);
  expect_error([&] { MoeLayer<S>{c}; }, Errc::kInvalidArgument);
  c = make_config(FfnKind::kPlain, Activation::kGeluTanh, 0, 0.0, 16, 0);
  expect_error([&] { MoeLayer<S>{c}; }, Errc::kInvalidArgument);
  c = make_config(FfnKind::kPlain, Activation::kGeluTanh, 0, 0.0);
  c.z_coeff = -1.0f;
  expect_error([&] { MoeLayer<S>{c}; }, Errc::kInvalidArgument);
  c = make_config(FfnKind::kPlain, Activation::kGeluTanh, 0, 0.0);
  c.router.gating.scaling = 0.0f;
  expect_error([&] { MoeLayer<S>{c}; }, Errc::kInvalidArgument);
}

// ---- inference on packed weights ----------------------------------------------

// Packed fp32 gives the forward's bits; bf16 and int8 route every token as
// fp32 does (the router stays fp32) and stay within their rounding of the
// float64 reference; the saved activations are not written. T = 150 spans
// three token blocks of the shared expert, and capacity 1.0 drops tokens.
TEST(MoeLayer, PackedForwardMatchesTheForwardOnViews) {
  using S = MoeSpec<8, 2>;
  const MoeLayerConfig c = make_config(FfnKind::kGated, Activation::kSilu, 1, 1.0, 48, 40);
  const MoeLayer<S> layer(c);
  const index_t T = 150;
  const Problem p = make_problem(c, 8, 2, T, 91);
  const MatrixView<const float> x(p.x.data(), T, p.d);
  MoeLayerStorage<S> st(layer, T);
  std::vector<float> y(p.x.size(), kNaN);
  layer.forward(x, params_of(p, c), st.state(), {y.data(), T, p.d}, nullptr, st.workspace());
  const std::vector<std::int32_t> ids(st.state().routing.expert_ids.data(),
                                      st.state().routing.expert_ids.data() + T * 2);
  const std::vector<std::int32_t> pos = positions_of(st, T);
  const std::vector<double> ref = ref_forward(p, c, Params64(p), pos).y;
  const float* pre = st.state().saved_pre.data();
  const std::vector<float> saved(pre, pre + st.state().saved_pre.rows() * p.f);
  for (const auto& [dtype, tolerance] :
       {std::pair{GemmDtype::kFloat32, 1e-6}, std::pair{GemmDtype::kBfloat16, 2e-2},
        std::pair{GemmDtype::kInt8, 3e-2}}) {
    // [packed]
    // Packed once (allocates); then every forward runs the experts in `dtype`.
    const PackedMoeLayerParams packed = layer.pack(params_of(p, c), dtype);
    std::vector<float> yp(p.x.size(), kNaN);
    moekit::cpu::RoutingStats<S> stats;
    layer.forward(x, packed, st.state(), {yp.data(), T, p.d}, &stats, st.workspace());
    // [packed]
    EXPECT_EQ(packed.dtype(), dtype);
    EXPECT_GT(stats.dropped, 0);
    EXPECT_EQ(positions_of(st, T), pos);
    const auto& out_ids = st.state().routing.expert_ids;
    EXPECT_TRUE(std::equal(ids.begin(), ids.end(), out_ids.data()));
    const double err = rel_error(to_double(yp), ref);
    EXPECT_LT(err, tolerance) << "dtype " << static_cast<int>(dtype);
    if (dtype == GemmDtype::kFloat32) {
      EXPECT_TRUE(same_bits(yp, y));
    }
    EXPECT_TRUE(std::equal(saved.begin(), saved.end(), pre));
    std::printf("[ packed ] dtype %d rel err %.3g\n", static_cast<int>(dtype), err);
  }
}

TEST(MoeLayer, PackedForwardRejectsAnotherLayersWeights) {
  using S = MoeSpec<8, 2>;
  const MoeLayerConfig c = make_config(FfnKind::kGated, Activation::kSilu, 1, 0.0);
  const MoeLayer<S> layer(c);
  const Problem p = make_problem(c, 8, 2, 10, 93);
  MoeLayerStorage<S> st(layer, 10);
  const MatrixView<const float> x(p.x.data(), p.T, p.d);
  std::vector<float> y(p.x.size(), 7.0f);
  const MatrixView<float> yv(y.data(), p.T, p.d);

  const MoeLayerConfig wide = make_config(FfnKind::kGated, Activation::kSilu, 1, 0.0, 16, 32);
  const Problem q = make_problem(wide, 8, 2, 10, 94);
  const PackedMoeLayerParams other = MoeLayer<S>(wide).pack(params_of(q, wide), GemmDtype::kInt8);
  expect_error([&] { layer.forward(x, other, st.state(), yv, nullptr, st.workspace()); },
               Errc::kShapeMismatch);
  PackedMoeLayerParams no_shared = layer.pack(params_of(p, c), GemmDtype::kInt8);
  no_shared.shared.clear();
  const std::string msg =
      expect_error([&] { layer.forward(x, no_shared, st.state(), yv, nullptr, st.workspace()); },
                   Errc::kShapeMismatch);
  EXPECT_NE(msg.find("num_shared"), std::string::npos) << msg;
  for (float e : y) ASSERT_EQ(e, 7.0f);
  expect_error([&] { (void)layer.pack(params_of(p, c), static_cast<GemmDtype>(9)); },
               Errc::kInvalidArgument);
}

TEST(MoeLayer, RejectsBadInputWithoutWriting) {
  using S = MoeSpec<8, 2>;
  const MoeLayerConfig c = make_config(FfnKind::kGated, Activation::kSilu, 1, 0.0);
  const MoeLayer<S> layer(c);
  const Problem p = make_problem(c, 8, 2, 20, 81);
  MoeLayerStorage<S> st(layer, 20);
  const MoeLayerParams prm = params_of(p, c);
  const index_t T = p.T, d = p.d;
  const MatrixView<const float> x(p.x.data(), T, d);
  std::vector<float> y(p.x.size(), 7.0f);
  const MatrixView<float> yv(y.data(), T, d);
  const auto untouched = [&] {
    for (float e : y) ASSERT_EQ(e, 7.0f);
  };

  std::string msg = expect_error(
      [&] {
        layer.forward({p.x.data(), T, d - 1}, prm, st.state(), yv, nullptr, st.workspace());
      },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("x"), std::string::npos) << msg;
  untouched();
  MoeLayerStorage<S> small(layer, 10);
  msg = expect_error([&] { layer.forward(x, prm, small.state(), yv, nullptr, small.workspace()); },
                     Errc::kShapeMismatch);
  EXPECT_NE(msg.find("capacity"), std::string::npos) << msg;
  untouched();
  MoeLayerParams bad = prm;
  bad.w_gate = {static_cast<const float*>(nullptr), 8, d};
  expect_error([&] { layer.forward(x, bad, st.state(), yv, nullptr, st.workspace()); },
               Errc::kNullPointer);
  bad = prm;
  bad.experts.w3 = {};
  msg = expect_error([&] { layer.forward(x, bad, st.state(), yv, nullptr, st.workspace()); },
                     Errc::kShapeMismatch);
  EXPECT_NE(msg.find("params.experts.w3"), std::string::npos) << msg;
  bad = prm;
  bad.shared.w2 = {p.s2.data(), d, p.f - 1};
  msg = expect_error([&] { layer.forward(x, bad, st.state(), yv, nullptr, st.workspace()); },
                     Errc::kShapeMismatch);
  EXPECT_NE(msg.find("params.shared.w2"), std::string::npos) << msg;
  const VectorView<std::byte> ws = st.workspace();
  expect_error(
      [&] {
        layer.forward(x, prm, st.state(), yv, nullptr, {ws.data(), 16});
      },
      Errc::kShapeMismatch);
  untouched();

  // Backward: a good forward first, then bad arguments leave dx alone.
  layer.forward(x, prm, st.state(), yv, nullptr, st.workspace());
  Grads g(p);
  std::fill(g.dx.begin(), g.dx.end(), 5.0f);
  const auto dx_untouched = [&] {
    for (float e : g.dx) ASSERT_EQ(e, 5.0f);
    for (float e : g.dw1) ASSERT_TRUE(std::isnan(e));
  };
  const MatrixView<const float> dy(p.G.data(), T, d);
  MoeLayerGrads gv = g.view(p);
  gv.dw2 = {g.dw2.data(), 8 * d, p.f + 1};
  msg = expect_error(
      [&] { layer.backward(dy, x, prm, st.state(), g.dx_view(p), gv, st.workspace()); },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("grads.dw2"), std::string::npos) << msg;
  dx_untouched();
  MoeLayerParams no_bias = prm;
  no_bias.gate_bias = {};
  expect_error(
      [&] { layer.backward(dy, x, no_bias, st.state(), g.dx_view(p), g.view(p), st.workspace()); },
      Errc::kInvalidArgument);
  dx_untouched();
  expect_error(
      [&] {
        layer.backward({p.G.data(), T - 1, d}, {p.x.data(), T - 1, d}, prm, st.state(),
                       {g.dx.data(), T - 1, d}, g.view(p), st.workspace());
      },
      Errc::kInvalidArgument);  // offsets no longer match the routing's rows
  dx_untouched();
  const MoeLayerState& s = st.state();
  const std::int32_t keep_id = s.routing.expert_ids(3, 1), keep_pos = s.routing.positions(3, 1);
  s.routing.expert_ids(3, 1) = s.routing.expert_ids(3, 0);
  expect_error([&] { layer.backward(dy, x, prm, s, g.dx_view(p), g.view(p), st.workspace()); },
               Errc::kInvalidArgument);
  s.routing.expert_ids(3, 1) = 99;
  expect_error([&] { layer.backward(dy, x, prm, s, g.dx_view(p), g.view(p), st.workspace()); },
               Errc::kOutOfRange);
  s.routing.expert_ids(3, 1) = keep_id;
  s.routing.positions(3, 1) = keep_pos;
  dx_untouched();
  layer.backward(dy, x, prm, s, g.dx_view(p), g.view(p), st.workspace());  // restored: fine
}

}  // namespace
