// The low-rank row kernels behind LoraBank (moekit/cpu/low_rank_rows.hpp):
// panels pack and unpack exactly; shrink_rows, expand_rows and
// accumulate_outer match float64 sums over rows picked from a strided matrix
// in any order, for ranks that fill several register groups or part of one,
// widths with and without a partial column block, and row counts that use
// every row-block size; the summation order does not depend on how the rows
// are split into calls of a given blocking; every CPU path gives the same
// bits and a row's results do not depend on the other rows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <numeric>
#include <random>
#include <vector>

#include "moekit/cpu/isa.hpp"
#include "moekit/cpu/low_rank_rows.hpp"

namespace {

using moekit::index_t;
using moekit::MatrixView;
using moekit::to_size;
namespace kernels = moekit::cpu::detail;

std::vector<float> randoms(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// Relative to the sum of magnitudes: float rounding over d terms.
void expect_close(double got, double want, double magnitude, const char* what) {
  EXPECT_LE(std::abs(got - want), 1e-6 * magnitude + 1e-30)
      << what << ": " << got << " vs " << want;
}

template <int R>
void check(index_t d, index_t count) {
  SCOPED_TRACE(::testing::Message() << "R " << R << " d " << d << " rows " << count);
  const index_t total = count + 5, ld = d + 3;  // strided source, rows picked out of order
  std::vector<float> src = randoms(to_size(total * ld), 1), mat = randoms(to_size(R * (d + 2)), 2),
                     coef = randoms(to_size(count * R), 3);
  std::vector<index_t> order(to_size(total));
  std::iota(order.begin(), order.end(), index_t{0});
  std::shuffle(order.begin(), order.end(), std::mt19937(4));
  const kernels::RowSet rows{order.data(), 2, count};
  const MatrixView<const float> m(mat.data(), R, d, d + 2);
  const auto row_of = [&](index_t k) { return src.data() + rows[k] * ld; };

  // pack / unpack round trip, plain and transposed.
  std::vector<float> panel(to_size(kernels::panel_floats<R>(d)), -1.0f);
  kernels::pack_panel<R>(m, panel.data());
  std::vector<float> back(to_size(R * d));
  kernels::unpack_panel<R>(panel.data(), 1.0f, false, MatrixView<float>(back.data(), R, d));
  for (index_t r = 0; r < R; ++r)
    for (index_t k = 0; k < d; ++k) ASSERT_EQ(back[to_size(r * d + k)], m(r, k));
  std::vector<float> mt(to_size(d * R));
  for (index_t r = 0; r < R; ++r)
    for (index_t k = 0; k < d; ++k) mt[to_size(k * R + r)] = m(r, k);
  std::vector<float> panel_t(panel.size(), -1.0f);
  kernels::pack_panel<R, true>(MatrixView<const float>(mt.data(), d, R), panel_t.data());
  EXPECT_EQ(panel_t, panel);

  // shrink
  std::vector<float> out(to_size(count * R), -7.0f);
  kernels::shrink_rows<R>(kernels::RowsOf<const float>{src.data(), ld, rows}, count, d,
                          panel.data(), 0.5f, out.data());
  for (index_t i = 0; i < count; ++i) {
    for (index_t r = 0; r < R; ++r) {
      double want = 0.0, mag = 0.0;
      for (index_t k = 0; k < d; ++k) {
        want += double{row_of(i)[k]} * m(r, k);
        mag += std::abs(double{row_of(i)[k]} * m(r, k));
      }
      expect_close(out[to_size(i * R + r)], 0.5 * want, mag, "shrink");
    }
  }

  // expand into a copy: only the picked rows change, and only their d columns.
  std::vector<float> dst = src;
  kernels::expand_rows<R>(kernels::RowsOf<float>{dst.data(), ld, rows}, count, d, coef.data(),
                          -2.0f, panel.data());
  std::vector<bool> picked(to_size(total), false);
  for (index_t i = 0; i < count; ++i) picked[to_size(rows[i])] = true;
  for (index_t i = 0; i < count; ++i) {
    for (index_t k = 0; k < d; ++k) {
      double want = row_of(i)[k], mag = std::abs(want);
      for (index_t r = 0; r < R; ++r) {
        want += -2.0 * coef[to_size(i * R + r)] * m(r, k);
        mag += std::abs(2.0 * coef[to_size(i * R + r)] * m(r, k));
      }
      expect_close(dst[to_size(rows[i] * ld + k)], want, mag, "expand");
    }
  }
  for (index_t t = 0; t < total; ++t) {
    for (index_t k = 0; k < ld; ++k) {
      if (picked[to_size(t)] && k < d) continue;
      ASSERT_EQ(dst[to_size(t * ld + k)], src[to_size(t * ld + k)]) << "row " << t << " col " << k;
    }
  }

  // accumulate onto a non-zero panel, in one call and in two: the same bits.
  std::vector<float> g0 = randoms(panel.size(), 5);
  std::vector<float> g = g0, g_split = g0;
  kernels::accumulate_outer<R>(kernels::RowsOf<const float>{src.data(), ld, rows}, count, d,
                               coef.data(), g.data());
  const index_t half = count / 2;
  kernels::accumulate_outer<R>(kernels::RowsOf<const float>{src.data(), ld, rows}, half, d,
                               coef.data(), g_split.data());
  kernels::accumulate_outer<R>(
      kernels::RowsOf<const float>{src.data(), ld, {order.data(), 2 + half, count - half}},
      count - half, d, coef.data() + half * R, g_split.data());
  EXPECT_EQ(g, g_split);
  for (index_t r = 0; r < R; ++r) {
    for (index_t k = 0; k < d; ++k) {
      const index_t at = kernels::panel_at<R>(static_cast<int>(r), k);
      double want = g0[to_size(at)], mag = std::abs(want);
      for (index_t i = 0; i < count; ++i) {
        want += double{coef[to_size(i * R + r)]} * row_of(i)[k];
        mag += std::abs(double{coef[to_size(i * R + r)]} * row_of(i)[k]);
      }
      expect_close(g[to_size(at)], want, mag, "accumulate_outer");
    }
  }
}

template <int R>
void check_all() {
  for (const index_t d : {1, 15, 16, 37, 100}) {
    for (const index_t count : {0, 1, 7, 13, 32}) check<R>(d, count);
  }
}

TEST(LowRankRows, RankOne) { check_all<1>(); }
TEST(LowRankRows, RankThree) { check_all<3>(); }
TEST(LowRankRows, RankEight) { check_all<8>(); }
TEST(LowRankRows, RankTwelveSpansTwoGroups) { check_all<12>(); }
TEST(LowRankRows, RankSixtyFour) { check_all<64>(); }

}  // namespace

// The panel layout is a constant (16-float column blocks), whatever the
// compile flags: LoraBank's workspace sizes agree in every translation unit.
static_assert(kernels::panel_floats<8>(1000) == 63 * 16 * 8);
static_assert(kernels::panel_floats<3>(16) == 16 * 3);

// Every path gives the portable path's bits, and a row's results do not
// depend on the other rows of the call (batch invariance).
template <int R>
void check_paths(index_t d, index_t count) {
  SCOPED_TRACE(::testing::Message() << "R " << R << " d " << d << " rows " << count);
  using moekit::cpu::Isa;
  const index_t ld = d + 1;
  const std::vector<float> src = randoms(to_size(count * ld), 11), mat = randoms(to_size(R * d), 12),
                           coef = randoms(to_size(count * R), 13);
  std::vector<float> panel(to_size(kernels::panel_floats<R>(d)));
  kernels::pack_panel<R>(MatrixView<const float>(mat.data(), R, d), panel.data());
  const kernels::RowSet all{nullptr, 0, count};
  struct Out {
    std::vector<float> shrink, expand, outer;
  };
  const auto run = [&] {
    Out o{std::vector<float>(to_size(count * R)), src, std::vector<float>(panel.size(), 0.5f)};
    kernels::shrink_rows<R>(kernels::RowsOf<const float>{src.data(), ld, all}, count, d,
                            panel.data(), 0.75f, o.shrink.data());
    kernels::expand_rows<R>(kernels::RowsOf<float>{o.expand.data(), ld, all}, count, d, coef.data(),
                            1.5f, panel.data());
    kernels::accumulate_outer<R>(kernels::RowsOf<const float>{src.data(), ld, all}, count, d,
                                 coef.data(), o.outer.data());
    return o;
  };
  const Out portable = [&] {
    moekit::cpu::IsaLimit limit(Isa::kGeneric);
    return run();
  }();
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (!moekit::cpu::isa_available(isa)) continue;
    moekit::cpu::IsaLimit limit(isa);
    const Out o = run();
    EXPECT_EQ(o.shrink, portable.shrink) << moekit::cpu::isa_name(isa);
    EXPECT_EQ(o.expand, portable.expand) << moekit::cpu::isa_name(isa);
    EXPECT_EQ(o.outer, portable.outer) << moekit::cpu::isa_name(isa);
  }
  // Row i alone gives the bits it got among the others.
  for (index_t i = 0; i < count; i += 3) {
    std::vector<float> one(to_size(R));
    kernels::shrink_rows<R>(kernels::RowsOf<const float>{src.data(), ld, {nullptr, i, 1}}, 1, d,
                            panel.data(), 0.75f, one.data());
    for (index_t r = 0; r < R; ++r) EXPECT_EQ(one[to_size(r)], portable.shrink[to_size(i * R + r)]);
    std::vector<float> row(src.begin() + i * ld, src.begin() + (i + 1) * ld);
    kernels::expand_rows<R>(kernels::RowsOf<float>{row.data(), ld, {nullptr, 0, 1}}, 1, d,
                            coef.data() + i * R, 1.5f, panel.data());
    for (index_t k = 0; k < d; ++k) EXPECT_EQ(row[to_size(k)], portable.expand[to_size(i * ld + k)]);
  }
}

TEST(LowRankRows, EveryPathGivesTheSameBitsAndRowsAreIndependent) {
  for (const index_t d : {5, 16, 37, 300}) {
    check_paths<3>(d, 13);
    check_paths<8>(d, 21);
    check_paths<12>(d, 9);
  }
}
