// Token dispatch and combine (moekit/cpu/dispatch.hpp), forward and backward,
// against a float64 reference written here: per-token loops over k, the
// expert-major row of each kept slot derived from the stable permutation
// (expert by expert, token order), not from routing.positions. Routings come
// from the Router, dropless and with capacity drops. Also: adjoint identities,
// determinism across reruns and thread counts, edge cases and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "expect_error.hpp"
#include "moekit/cpu/dispatch.hpp"
#include "router_fixture.hpp"
#include "routing_reference.hpp"
#include "strided_matrix.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using moekit::DropPolicy;
using moekit::Errc;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::to_size;
using moekit::VectorView;
using moekit::cpu::Router;
using moekit::cpu::RouterConfig;
using moekit::cpu::RoutingStats;
using moekit_test::expect_error;
using moekit_test::rel_error;
using moekit_test::RoutingBuffers;

using moekit_test::kNaN;
using moekit_test::kPad;

// An owning row-major matrix with `pad` padding columns (ld = cols + pad).
using Mat = moekit_test::StridedMatrix;

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// A routing from the Router on random logits, with its offsets.
template <class S>
struct Routed {
  static constexpr int E = S::num_experts, K = S::top_k;
  RoutingBuffers<S> buf;
  RoutingStats<S> stats;
  std::vector<index_t> offsets = std::vector<index_t>(E + 1, -5);
  index_t rows = 0;

  explicit Routed(index_t tokens) : buf(tokens) {}
  moekit::cpu::Routing view() { return buf.view(); }
  VectorView<const index_t> off() const { return {offsets.data(), E + 1}; }
};

template <class S>
Routed<S> route_random(index_t tokens, double factor, DropPolicy policy, std::uint32_t seed,
                       float spread = 1.0f) {
  Routed<S> r(tokens);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, spread);
  for (float& v : r.buf.logits) v = normal(rng);
  RouterConfig config;
  config.capacity.factor = factor;
  config.capacity.policy = policy;
  const Router<S> router(config);
  std::vector<std::byte> ws(static_cast<std::size_t>(router.workspace_size(tokens, 0)));
  router.route(r.view(), {}, &r.stats, {ws.data(), static_cast<index_t>(ws.size())});
  r.rows = moekit::cpu::dispatch_offsets<S>(r.view(), {r.offsets.data(), S::num_experts + 1});
  return r;
}

// The reference row of every slot (-1 = dropped), from the stable
// permutation alone: expert by expert, kept slots in (t, k) order.
template <class S>
std::vector<index_t> reference_rows(const RoutingBuffers<S>& b) {
  constexpr int E = S::num_experts, K = S::top_k;
  std::vector<index_t> rows(to_size(b.tokens * K), -1);
  index_t next = 0;
  for (int e = 0; e < E; ++e) {
    for (index_t t = 0; t < b.tokens; ++t) {
      for (int k = 0; k < K; ++k) {
        if (b.ids[to_size(t * K + k)] == e && b.positions[to_size(t * K + k)] >= 0)
          rows[to_size(t * K + k)] = next++;
      }
    }
  }
  return rows;
}

// ---- forward and backward against the float64 reference --------------------

template <class S>
class DispatchCombine : public ::testing::Test {};

using Specs = ::testing::Types<MoeSpec<1, 1>, MoeSpec<8, 2>, MoeSpec<16, 4>, MoeSpec<64, 8>>;
TYPED_TEST_SUITE(DispatchCombine, Specs);

TYPED_TEST(DispatchCombine, MatchFloat64ReferenceAndAdjoints) {
  using S = TypeParam;
  constexpr int E = S::num_experts, K = S::top_k;
  constexpr index_t T = 97;
  struct Case {
    double factor;
    DropPolicy policy;
  };
  double worst = 0.0, worst_adjoint = 0.0, worst_adjoint_plain = 0.0;
  for (const Case c : {Case{0.0, DropPolicy::kPosition}, Case{0.6, DropPolicy::kPosition},
                       Case{0.6, DropPolicy::kProbs}}) {
    for (const index_t d : {index_t{7}, index_t{300}}) {
      SCOPED_TRACE(::testing::Message() << "factor " << c.factor << " policy "
                                        << static_cast<int>(c.policy) << " d " << d);
      Routed<S> r = route_random<S>(T, c.factor, c.policy, 100u + E * 7u + K);
      const auto& b = r.buf;
      const std::vector<index_t> row = reference_rows<S>(b);

      // Offsets: the exclusive scan of the router's kept counts.
      EXPECT_EQ(r.offsets[0], 0);
      for (int e = 0; e < E; ++e)
        EXPECT_EQ(r.offsets[to_size(e + 1)] - r.offsets[to_size(e)], r.stats.kept[to_size(e)]);
      EXPECT_EQ(r.rows, T * K - r.stats.dropped);
      if (c.factor > 0 && E > 1) {
        EXPECT_GT(r.stats.dropped, 0) << "the case should drop";
      }
      const index_t n = r.rows;

      std::mt19937 rng(7 + static_cast<std::uint32_t>(d));
      Mat x(T, d), expert_out(n, d), dy(T, d), d_buffer(n, d);
      x.randomize(rng);
      expert_out.randomize(rng);
      dy.randomize(rng);
      d_buffer.randomize(rng);

      // dispatch: an exact copy into every row.
      Mat buffer(n, d);
      buffer.poison();
      moekit::cpu::dispatch<S>(x.cview(), r.view(), r.off(), buffer.view());
      for (index_t t = 0; t < T; ++t) {
        for (int k = 0; k < K; ++k) {
          if (row[to_size(t * K + k)] < 0) continue;
          for (index_t j = 0; j < d; ++j)
            ASSERT_EQ(buffer.at(row[to_size(t * K + k)], j), x.at(t, j));
        }
      }
      for (double v : buffer.values())
        ASSERT_FALSE(std::isnan(v)) << "a buffer row was not written";
      EXPECT_TRUE(buffer.padding_untouched());

      // The float64 references, per token, k in order.
      std::vector<double> y_ref(to_size(T * d), 0.0), dx_ref(to_size(T * d), 0.0),
          dout_ref(to_size(n * d), 0.0), dw_ref(T * K, 0.0);
      for (index_t t = 0; t < T; ++t) {
        for (int k = 0; k < K; ++k) {
          const index_t q = row[to_size(t * K + k)];
          if (q < 0) continue;
          const double w = b.weights[to_size(t * K + k)];
          double dw = 0.0;
          for (index_t j = 0; j < d; ++j) {
            y_ref[to_size(t * d + j)] += w * expert_out.at(q, j);
            dx_ref[to_size(t * d + j)] += d_buffer.at(q, j);
            dout_ref[to_size(q * d + j)] = w * dy.at(t, j);
            dw += double(dy.at(t, j)) * expert_out.at(q, j);
          }
          dw_ref[to_size(t * K + k)] = dw;
        }
      }

      Mat y(T, d), dx(T, d), d_out(n, d), dweights(T, K, 2);
      y.poison();
      dx.poison();
      d_out.poison();
      dweights.poison();
      moekit::cpu::combine<S>(expert_out.cview(), r.view(), r.off(), y.view());
      moekit::cpu::combine_backward<S>(dy.cview(), expert_out.cview(), r.view(), r.off(),
                                       d_out.view(), dweights.view());
      moekit::cpu::dispatch_backward<S>(d_buffer.cview(), r.view(), r.off(), dx.view());
      for (const Mat* m : {&y, &dx, &d_out, &dweights}) {
        EXPECT_TRUE(m->padding_untouched());
        for (double v : m->values()) ASSERT_FALSE(std::isnan(v)) << "an output was not written";
      }
      const double errors[] = {rel_error(y.values(), y_ref), rel_error(dx.values(), dx_ref),
                               rel_error(d_out.values(), dout_ref),
                               rel_error(dweights.values(), dw_ref)};
      for (double err : errors) {
        EXPECT_LT(err, 1e-6);
        worst = std::max(worst, err);
      }
      for (index_t t = 0; t < T; ++t) {
        for (int k = 0; k < K; ++k) {
          if (row[to_size(t * K + k)] < 0) {
            EXPECT_EQ(dweights.at(t, k), 0.0f);
          }
        }
      }

      // Adjoints in float64: <combine(E), dy> = <E, combine^T(dy)>,
      // <dispatch(x), B> = <x, dispatch^T(B)>, and <y, dy> = sum w dweights.
      const double lhs_c = dot(y.values(), dy.values());
      const double rhs_c = dot(expert_out.values(), d_out.values());
      const double lhs_d = dot(buffer.values(), d_buffer.values());
      const double rhs_d = dot(x.values(), dx.values());
      double rhs_w = 0.0;
      for (index_t t = 0; t < T; ++t) {
        for (int k = 0; k < K; ++k)
          rhs_w += double(b.weights[to_size(t * K + k)]) * dweights.at(t, k);
      }
      // Relative to ||a|| ||b||, the scale of <a, b>: |<a, b>| itself can be
      // small by cancellation between random terms (then, relative to it,
      // plain float rounding of the outputs reaches a few 1e-6).
      const double scale_c = std::sqrt(dot(y.values(), y.values()) * dot(dy.values(), dy.values()));
      const double scale_d = std::sqrt(dot(buffer.values(), buffer.values()) *
                                       dot(d_buffer.values(), d_buffer.values()));
      const double adj[] = {std::abs(lhs_c - rhs_c) / scale_c, std::abs(lhs_d - rhs_d) / scale_d,
                            std::abs(lhs_c - rhs_w) / scale_c};
      for (double a : adj) {
        EXPECT_LT(a, 1e-6);
        worst_adjoint = std::max(worst_adjoint, a);
      }
      worst_adjoint_plain = std::max(
          {worst_adjoint_plain, std::abs(lhs_c - rhs_c) / std::abs(lhs_c),
           std::abs(lhs_d - rhs_d) / std::abs(lhs_d), std::abs(lhs_c - rhs_w) / std::abs(lhs_c)});
    }
  }
  this->RecordProperty("worst_rel_error", (std::ostringstream() << worst).str());
  this->RecordProperty("worst_adjoint_rel_error", (std::ostringstream() << worst_adjoint).str());
  this->RecordProperty("worst_adjoint_error_over_inner_product",
                       (std::ostringstream() << worst_adjoint_plain).str());
}

// Accumulate adds exactly the sum an overwriting call writes; a token whose
// slots are all dropped is left as it was (and its weights, even NaN, are
// never read).
TYPED_TEST(DispatchCombine, AccumulateIsExactAndDroppedTokensAreUntouched) {
  using S = TypeParam;
  constexpr int K = S::top_k;
  constexpr index_t T = 61, d = 19;
  Routed<S> r = route_random<S>(T, 0.3, DropPolicy::kPosition, 55u);
  for (std::size_t i = 0; i < r.buf.weights.size(); ++i) {
    if (r.buf.positions[i] < 0) r.buf.weights[i] = kNaN;
  }
  std::mt19937 rng(3);
  Mat expert_out(r.rows, d), y0(T, d);
  expert_out.randomize(rng);
  y0.randomize(rng);
  Mat over(T, d), acc = y0, dx_over(T, d), dx_acc = y0;
  over.poison();
  dx_over.poison();
  moekit::cpu::combine<S>(expert_out.cview(), r.view(), r.off(), over.view());
  moekit::cpu::combine<S>(expert_out.cview(), r.view(), r.off(), acc.view(), true);
  moekit::cpu::dispatch_backward<S>(expert_out.cview(), r.view(), r.off(), dx_over.view());
  moekit::cpu::dispatch_backward<S>(expert_out.cview(), r.view(), r.off(), dx_acc.view(), true);
  index_t all_dropped = 0;
  for (index_t t = 0; t < T; ++t) {
    bool any = false;
    for (int k = 0; k < K; ++k) any |= r.buf.positions[to_size(t * K + k)] >= 0;
    all_dropped += any ? 0 : 1;
    for (index_t j = 0; j < d; ++j) {
      if (!any) {
        EXPECT_EQ(over.at(t, j), 0.0f);
        EXPECT_EQ(dx_over.at(t, j), 0.0f);
      }
      EXPECT_EQ(acc.at(t, j), y0.at(t, j) + over.at(t, j)) << t << ", " << j;
      EXPECT_EQ(dx_acc.at(t, j), y0.at(t, j) + dx_over.at(t, j)) << t << ", " << j;
    }
  }
  if (S::num_experts > 1) {
    EXPECT_GT(all_dropped, 0) << "no token lost all its slots";
  }
  EXPECT_TRUE(acc.padding_untouched());
  EXPECT_TRUE(dx_acc.padding_untouched());
}

// ---- determinism ---------------------------------------------------------------

TEST(DispatchDeterminism, RerunsAndThreadCountsAreBitIdentical) {
  using S = MoeSpec<64, 8>;
  constexpr index_t T = 1024, d = 160;  // T K d above the parallel threshold
  static_assert(T * 8 * d > moekit::cpu::kLightParallelGrain);
  Routed<S> r = route_random<S>(T, 1.1, DropPolicy::kPosition, 9u);
  std::mt19937 rng(5);
  Mat x(T, d), expert_out(r.rows, d), dy(T, d);
  x.randomize(rng);
  expert_out.randomize(rng);
  dy.randomize(rng);
  struct Out {
    Mat buffer, y, dx, d_out, dweights;
  };
  auto run = [&](int threads) {
#if defined(_OPENMP)
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    Out o{Mat(r.rows, d), Mat(T, d), Mat(T, d), Mat(r.rows, d), Mat(T, 8)};
    moekit::cpu::dispatch<S>(x.cview(), r.view(), r.off(), o.buffer.view());
    moekit::cpu::combine<S>(expert_out.cview(), r.view(), r.off(), o.y.view());
    moekit::cpu::combine_backward<S>(dy.cview(), expert_out.cview(), r.view(), r.off(),
                                     o.d_out.view(), o.dweights.view());
    moekit::cpu::dispatch_backward<S>(expert_out.cview(), r.view(), r.off(), o.dx.view());
    return o;
  };
  const Out a = run(2), b = run(2), c = run(1);
  for (const Out* o : {&b, &c}) {
    EXPECT_TRUE(a.buffer.bits_equal(o->buffer));
    EXPECT_TRUE(a.y.bits_equal(o->y));
    EXPECT_TRUE(a.dx.bits_equal(o->dx));
    EXPECT_TRUE(a.d_out.bits_equal(o->d_out));
    EXPECT_TRUE(a.dweights.bits_equal(o->dweights));
  }
#if defined(_OPENMP)
  omp_set_num_threads(omp_get_num_procs());
#endif
}

// ---- edge cases ------------------------------------------------------------------

// Runs all four operations and checks them against the reference rows;
// returns nothing, fails the test on a mismatch.
template <class S>
void check_all_ops(Routed<S>& r, index_t d) {
  constexpr int K = S::top_k;
  const index_t T = r.buf.tokens;
  const std::vector<index_t> row = reference_rows<S>(r.buf);
  std::mt19937 rng(11);
  Mat x(T, d), eo(r.rows, d), buffer(r.rows, d), y(T, d), dx(T, d), d_out(r.rows, d), dw(T, K);
  x.randomize(rng);
  eo.randomize(rng);
  for (Mat* m : {&buffer, &y, &dx, &d_out, &dw}) m->poison();
  moekit::cpu::dispatch<S>(x.cview(), r.view(), r.off(), buffer.view());
  moekit::cpu::combine<S>(eo.cview(), r.view(), r.off(), y.view());
  moekit::cpu::combine_backward<S>(x.cview(), eo.cview(), r.view(), r.off(), d_out.view(),
                                   dw.view());
  moekit::cpu::dispatch_backward<S>(eo.cview(), r.view(), r.off(), dx.view());
  for (index_t t = 0; t < T; ++t) {
    for (index_t j = 0; j < d; ++j) {
      double ys = 0.0, xs = 0.0;
      for (int k = 0; k < K; ++k) {
        const index_t q = row[to_size(t * K + k)];
        if (q < 0) continue;
        ys += double(r.buf.weights[to_size(t * K + k)]) * eo.at(q, j);
        xs += eo.at(q, j);
        ASSERT_EQ(buffer.at(q, j), x.at(t, j));
        ASSERT_EQ(d_out.at(q, j), r.buf.weights[to_size(t * K + k)] * x.at(t, j));
      }
      ASSERT_NEAR(y.at(t, j), ys, 1e-5 * (1.0 + std::abs(ys)));
      ASSERT_NEAR(dx.at(t, j), xs, 1e-5 * (1.0 + std::abs(xs)));
    }
  }
  for (const Mat* m : {&buffer, &y, &dx, &d_out, &dw}) {
    for (double v : m->values()) ASSERT_FALSE(std::isnan(v));
    EXPECT_TRUE(m->padding_untouched());
  }
}

TEST(DispatchEdgeCases, ZeroTokens) {
  using S = MoeSpec<8, 2>;
  Routed<S> r = route_random<S>(0, 0.0, DropPolicy::kPosition, 1u);
  EXPECT_EQ(r.rows, 0);
  for (index_t o : r.offsets) EXPECT_EQ(o, 0);
  check_all_ops<S>(r, 5);
  // Null data is fine where there are no elements.
  moekit::cpu::dispatch<S>({nullptr, 0, 5}, r.view(), r.off(), {nullptr, 0, 5});
  moekit::cpu::combine<S>({nullptr, 0, 5}, r.view(), r.off(), {nullptr, 0, 5});
}

TEST(DispatchEdgeCases, ZeroWidth) {
  using S = MoeSpec<8, 2>;
  Routed<S> r = route_random<S>(9, 0.0, DropPolicy::kPosition, 2u);
  check_all_ops<S>(r, 0);
}

TEST(DispatchEdgeCases, EmptyExperts) {
  using S = MoeSpec<16, 4>;
  constexpr index_t T = 40;
  Routed<S> r(T);
  std::mt19937 rng(4);
  std::normal_distribution<float> normal;
  // Only experts 3..7 can win; the others get hugely negative logits.
  for (index_t t = 0; t < T; ++t) {
    for (int e = 0; e < 16; ++e)
      r.buf.logits[to_size(t * 16 + e)] = normal(rng) - (e >= 3 && e < 8 ? 0 : 50);
  }
  Router<S>(RouterConfig{}).route(r.view(), {}, &r.stats);
  r.rows = moekit::cpu::dispatch_offsets<S>(r.view(), {r.offsets.data(), 17});
  for (int e = 0; e < 16; ++e) {
    if (e < 3 || e >= 8) {
      EXPECT_EQ(r.offsets[to_size(e + 1)], r.offsets[to_size(e)]) << e;
    }
  }
  EXPECT_EQ(r.rows, T * 4);
  check_all_ops<S>(r, 13);
}

TEST(DispatchEdgeCases, AllTokensToOneExpert) {
  using S1 = MoeSpec<8, 1>;
  constexpr index_t T = 33;
  for (double factor : {0.0, 0.5}) {
    Routed<S1> r(T);
    for (index_t t = 0; t < T; ++t) {
      for (int e = 0; e < 8; ++e)
        r.buf.logits[to_size(t * 8 + e)] = e == 5 ? 10.0f : 0.01f * float(t % 7);
    }
    RouterConfig config;
    config.capacity.factor = factor;
    Router<S1>(config).route(r.view(), {}, &r.stats);
    r.rows = moekit::cpu::dispatch_offsets<S1>(r.view(), {r.offsets.data(), 9});
    const index_t kept = factor > 0 ? static_cast<index_t>(std::ceil(factor * T / 8)) : T;
    EXPECT_EQ(r.rows, kept);
    EXPECT_EQ(r.offsets[5], 0);
    EXPECT_EQ(r.offsets[6], kept);
    check_all_ops<S1>(r, 6);
  }
}

TEST(DispatchEdgeCases, KEqualsE) {
  using S = MoeSpec<4, 4>;
  Routed<S> r = route_random<S>(23, 0.0, DropPolicy::kPosition, 8u);
  EXPECT_EQ(r.rows, 23 * 4);
  for (int e = 0; e < 4; ++e) EXPECT_EQ(r.offsets[to_size(e + 1)] - r.offsets[to_size(e)], 23);
  check_all_ops<S>(r, 9);
}

// ---- bad input -------------------------------------------------------------------

class DispatchBadInput : public ::testing::Test {
 protected:
  using S = MoeSpec<8, 2>;
  static constexpr index_t T = 12, d = 5;

  DispatchBadInput()
      : r(route_random<S>(T, 0.0, DropPolicy::kPosition, 31u)),
        x(T, d),
        eo(r.rows, d),
        dy(T, d),
        buffer(r.rows, d),
        y(T, d),
        d_out(r.rows, d),
        dw(T, 2) {
    std::mt19937 rng(2);
    x.randomize(rng);
    eo.randomize(rng);
    dy.randomize(rng);
    for (Mat* m : {&buffer, &y, &d_out, &dw}) m->poison();
    saved = {buffer, y, d_out, dw};
  }

  // Every operation on the current arguments must fail with `code` and
  // leave all outputs untouched; returns dispatch's message.
  std::string all_fail(Errc code) { return all_fail_with(code, r.off()); }
  std::string all_fail_with(Errc code, VectorView<const index_t> off) {
    return run_all(code, r.view(), off);
  }
  std::string all_fail_with_routing(Errc code, const moekit::cpu::Routing& routing) {
    return run_all(code, routing, r.off());
  }
  std::string run_all(Errc code, const moekit::cpu::Routing& routing,
                      VectorView<const index_t> off) {
    const std::string msg = expect_error(
        [&] { moekit::cpu::dispatch<S>(x.cview(), routing, off, buffer.view()); }, code);
    expect_error([&] { moekit::cpu::combine<S>(eo.cview(), routing, off, y.view()); }, code);
    expect_error([&] { moekit::cpu::combine<S>(eo.cview(), routing, off, y.view(), true); }, code);
    expect_error(
        [&] {
          moekit::cpu::combine_backward<S>(dy.cview(), eo.cview(), routing, off, d_out.view(),
                                           dw.view());
        },
        code);
    expect_error([&] { moekit::cpu::dispatch_backward<S>(eo.cview(), routing, off, y.view()); },
                 code);
    untouched();
    return msg;
  }
  void untouched() {
    EXPECT_TRUE(buffer.bits_equal(saved[0]));
    EXPECT_TRUE(y.bits_equal(saved[1]));
    EXPECT_TRUE(d_out.bits_equal(saved[2]));
    EXPECT_TRUE(dw.bits_equal(saved[3]));
  }
  // A kept slot of an expert that keeps at least two, and that expert.
  std::pair<index_t, int> second_kept_slot() const {
    std::vector<int> seen(8, 0);
    for (index_t i = 0; i < T * 2; ++i) {
      const int e = r.buf.ids[to_size(i)];
      if (r.buf.positions[to_size(i)] >= 0 && ++seen[to_size(e)] == 2) return {i, e};
    }
    ADD_FAILURE() << "no expert keeps two slots";
    return {0, 0};
  }

  Routed<S> r;
  Mat x, eo, dy, buffer, y, d_out, dw;
  std::vector<Mat> saved;
};

TEST_F(DispatchBadInput, ValidArgumentsPass) {
  moekit::cpu::dispatch<S>(x.cview(), r.view(), r.off(), buffer.view());
  moekit::cpu::combine<S>(eo.cview(), r.view(), r.off(), y.view());
  moekit::cpu::combine_backward<S>(dy.cview(), eo.cview(), r.view(), r.off(), d_out.view(),
                                   dw.view());
  // Either output may be left out; expert_out is needed only for dweights.
  moekit::cpu::combine_backward<S>(dy.cview(), {}, r.view(), r.off(), d_out.view(), {});
  moekit::cpu::combine_backward<S>(dy.cview(), eo.cview(), r.view(), r.off(), {}, dw.view());
}

TEST_F(DispatchBadInput, OutOfRangeIds) {
  r.buf.ids[3] = 8;
  std::string msg = all_fail(Errc::kOutOfRange);
  EXPECT_NE(msg.find("routing.expert_ids(1, 1) = 8 is outside [0, 8)"), std::string::npos) << msg;
  std::vector<index_t> off(9, -3);
  expect_error(
      [&] {
        moekit::cpu::dispatch_offsets<S>(r.view(), {off.data(), 9});
      },
      Errc::kOutOfRange);
  for (index_t o : off) EXPECT_EQ(o, -3);
  r.buf.ids[3] = -1;
  all_fail(Errc::kOutOfRange);
}

TEST_F(DispatchBadInput, PositionsOutOfRange) {
  for (std::int32_t p : {std::int32_t{-2}, std::int32_t{T}, std::int32_t{1 << 30}}) {
    const std::int32_t keep = r.buf.positions[5];
    r.buf.positions[5] = p;
    const std::string msg = all_fail(Errc::kOutOfRange);
    EXPECT_NE(
        msg.find("routing.positions(2, 1) = " + std::to_string(p) + " is outside [-1, T = 12)"),
        std::string::npos)
        << msg;
    std::vector<index_t> off(9, -3);
    expect_error(
        [&] {
          moekit::cpu::dispatch_offsets<S>(r.view(), {off.data(), 9});
        },
        Errc::kOutOfRange);
    for (index_t o : off) EXPECT_EQ(o, -3);
    r.buf.positions[5] = keep;
  }
}

TEST_F(DispatchBadInput, PositionBeyondItsExpertsCount) {
  // The last kept slot of expert e claims row count[e]: inside [-1, T) but
  // past the expert's rows in offsets.
  index_t last = -1;
  const int e = r.buf.ids[0];
  for (index_t i = 0; i < T * 2; ++i) {
    if (r.buf.ids[to_size(i)] == e && r.buf.positions[to_size(i)] >= 0) last = i;
  }
  const index_t count = r.offsets[to_size(e + 1)] - r.offsets[to_size(e)];
  ASSERT_LT(count, T);
  r.buf.positions[to_size(last)] = static_cast<std::int32_t>(count);
  const std::string msg = all_fail(Errc::kOutOfRange);
  EXPECT_NE(msg.find("is not below expert " + std::to_string(e) + "'s row count"),
            std::string::npos)
      << msg;
}

TEST_F(DispatchBadInput, DuplicateOrUnorderedPositions) {
  const auto [slot, e] = second_kept_slot();
  r.buf.positions[to_size(slot)] = 0;  // the same row as the expert's first slot
  const std::string msg = all_fail(Errc::kInvalidArgument);
  EXPECT_NE(msg.find("expected 1"), std::string::npos) << msg;
  std::vector<index_t> off(9, -3);
  expect_error(
      [&] {
        moekit::cpu::dispatch_offsets<S>(r.view(), {off.data(), 9});
      },
      Errc::kInvalidArgument);
  for (index_t o : off) EXPECT_EQ(o, -3);
}

TEST_F(DispatchBadInput, OffsetsThatDoNotMatch) {
  std::vector<index_t> off = r.offsets;
  // offsets[E] does not match the rows of the expert-major matrices.
  off[8] += 1;
  all_fail_with(Errc::kInvalidArgument, {off.data(), 9});  // expert 7's count disagrees
  Mat big_buffer(r.rows + 1, d);
  big_buffer.poison();
  const Mat big_saved = big_buffer;
  std::string msg = expect_error(
      [&] { moekit::cpu::dispatch<S>(x.cview(), r.view(), r.off(), big_buffer.view()); },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("buffer is " + std::to_string(r.rows + 1) + " x 5, expected " +
                     std::to_string(r.rows) + " x 5"),
            std::string::npos)
      << msg;
  EXPECT_TRUE(big_buffer.bits_equal(big_saved));
  Mat eo_long(r.rows + 1, d);
  std::mt19937 rng(1);
  eo_long.randomize(rng);
  expect_error([&] { moekit::cpu::combine<S>(eo_long.cview(), r.view(), r.off(), y.view()); },
               Errc::kShapeMismatch);
  expect_error(
      [&] { moekit::cpu::dispatch_backward<S>(eo_long.cview(), r.view(), r.off(), y.view()); },
      Errc::kShapeMismatch);
  untouched();
  // Not starting at 0, decreasing, or a count moved between experts.
  off = r.offsets;
  off[0] = 1;
  all_fail_with(Errc::kInvalidArgument, {off.data(), 9});
  off = r.offsets;
  off[4] = off[5] + 1;
  all_fail_with(Errc::kInvalidArgument, {off.data(), 9});
  off = r.offsets;
  int busy = 0;  // an expert with rows
  while (off[to_size(busy + 1)] == off[to_size(busy)]) ++busy;
  off[to_size(busy + 1)] -= 1;  // one row short: its last position is past its rows
  all_fail_with(Errc::kOutOfRange, {off.data(), 9});
  // Wrong length, or null.
  all_fail_with(Errc::kShapeMismatch, {r.offsets.data(), 8});
  all_fail_with(Errc::kNullPointer, {nullptr, 9});
}

TEST_F(DispatchBadInput, WrongShapes) {
  using moekit::cpu::combine;
  using moekit::cpu::combine_backward;
  using moekit::cpu::dispatch;
  using moekit::cpu::dispatch_backward;
  const auto rt = r.view();
  const auto off = r.off();
  Mat x_short(T - 1, d), x_wide(T, d + 1), y_wide(T, d + 1), y_short(T - 1, d), dw_wide(T, 3),
      d_out_short(r.rows - 1, d), eo_wide(r.rows, d + 1);
  std::mt19937 rng(1);
  for (Mat* m : {&x_short, &x_wide, &eo_wide}) m->randomize(rng);
  for (Mat* m : {&y_wide, &y_short, &dw_wide, &d_out_short}) m->poison();
  const std::vector<Mat> before = {y_wide, y_short, dw_wide, d_out_short};
  constexpr Errc kShape = Errc::kShapeMismatch;
  // dispatch: x of the wrong height, buffer of the wrong width.
  expect_error([&] { dispatch<S>(x_short.cview(), rt, off, buffer.view()); }, kShape);
  std::string msg =
      expect_error([&] { dispatch<S>(x_wide.cview(), rt, off, buffer.view()); }, kShape);
  EXPECT_NE(msg.find("buffer is"), std::string::npos) << msg;
  // combine: y of the wrong width or height, weights of the wrong shape.
  msg = expect_error([&] { combine<S>(eo.cview(), rt, off, y_wide.view()); }, kShape);
  EXPECT_NE(msg.find("y is 12 x 6, expected 12 x 5"), std::string::npos) << msg;
  expect_error([&] { combine<S>(eo.cview(), rt, off, y_short.view()); }, kShape);
  auto bad_weights = rt;
  bad_weights.weights = {r.buf.weights.data(), T, 1};
  expect_error([&] { combine<S>(eo.cview(), bad_weights, off, y.view()); }, kShape);
  // combine_backward: each output and expert_out checked when used.
  expect_error(
      [&] { combine_backward<S>(dy.cview(), eo.cview(), rt, off, d_out.view(), dw_wide.view()); },
      kShape);
  expect_error(
      [&] { combine_backward<S>(dy.cview(), eo.cview(), rt, off, d_out_short.view(), dw.view()); },
      kShape);
  expect_error(
      [&] { combine_backward<S>(dy.cview(), eo_wide.cview(), rt, off, d_out.view(), dw.view()); },
      kShape);
  expect_error([&] { combine_backward<S>(dy.cview(), {}, rt, off, d_out.view(), dw.view()); },
               kShape);
  expect_error(
      [&] { combine_backward<S>(x_short.cview(), eo.cview(), rt, off, d_out.view(), dw.view()); },
      kShape);
  expect_error(
      [&] { combine_backward<S>(dy.cview(), eo.cview(), bad_weights, off, d_out.view(), {}); },
      kShape);
  // dispatch_backward: dx of the wrong width.
  expect_error([&] { dispatch_backward<S>(eo.cview(), rt, off, y_wide.view()); }, kShape);
  // Routing views of the wrong shape.
  auto bad_positions = rt;
  bad_positions.positions = {r.buf.positions.data(), T - 1, 2};
  all_fail_with_routing(kShape, bad_positions);
  untouched();
  for (std::size_t i = 0; i < before.size(); ++i) {
    const Mat* now[] = {&y_wide, &y_short, &dw_wide, &d_out_short};
    EXPECT_TRUE(now[i]->bits_equal(before[i])) << i;
  }
}

TEST_F(DispatchBadInput, NullData) {
  using moekit::cpu::combine;
  using moekit::cpu::dispatch;
  const auto rt = r.view();
  const auto off = r.off();
  constexpr Errc kNull = Errc::kNullPointer;
  std::string msg = expect_error(
      [&] {
        dispatch<S>({nullptr, T, d}, rt, off, buffer.view());
      },
      kNull);
  EXPECT_NE(msg.find("x is null"), std::string::npos) << msg;
  expect_error([&] { dispatch<S>(x.cview(), rt, off, {nullptr, r.rows, d}); }, kNull);
  expect_error([&] { combine<S>(eo.cview(), rt, off, {nullptr, T, d}); }, kNull);
  expect_error([&] { combine<S>({nullptr, r.rows, d}, rt, off, y.view()); }, kNull);
  auto null_weights = rt;
  null_weights.weights = {nullptr, T, 2};
  expect_error([&] { combine<S>(eo.cview(), null_weights, off, y.view()); }, kNull);
  auto null_ids = rt;
  null_ids.expert_ids = {nullptr, T, 2};
  all_fail_with_routing(kNull, null_ids);
  auto null_positions = rt;
  null_positions.positions = {nullptr, T, 2};
  all_fail_with_routing(kNull, null_positions);
  untouched();
}

}  // namespace
