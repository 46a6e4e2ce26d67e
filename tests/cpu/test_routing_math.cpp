// Host-device routing math added for the CUDA backend (core/routing.hpp),
// tested on the CPU against the CPU backend and float64 formulas:
// z_loss_token, cv_squared, valid_ids.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "moekit/core/routing.hpp"
#include "moekit/cpu/aux_losses.hpp"
#include "router_fixture.hpp"

namespace {

using moekit::index_t;
using moekit::MoeSpec;
using moekit::to_size;
namespace routing = moekit::routing;

static_assert(std::is_same_v<moekit::cpu::SwitchNormalization, moekit::SwitchNormalization>,
              "one SwitchNormalization for both backends");

template <int E>
std::vector<float> random_rows(index_t tokens, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> x(to_size(tokens * E));
  for (float& v : x) v = normal(gen);
  return x;
}

// Sum of z_loss_token over rows equals cpu::z_loss (which calls it), and so
// does the gradient it adds; NaN, +inf and all -inf rows add nothing.
template <int E>
void check_z_loss_token() {
  using S = MoeSpec<E, 1>;
  constexpr index_t tokens = 257;
  moekit_test::RoutingBuffers<S> b(tokens);
  b.logits = random_rows<E>(tokens, 3);
  b.logits[5 * E] = std::numeric_limits<float>::quiet_NaN();  // a row that adds 0
  b.logits[9 * E + E - 1] = std::numeric_limits<float>::infinity();
  for (int e = 0; e < E; ++e) b.logits[to_size(11 * E + e)] = -std::numeric_limits<float>::infinity();
  b.logits[13 * E] = -std::numeric_limits<float>::infinity();  // masked: the row counts
  std::vector<float> ref(tokens * E, 0.5f), got(tokens * E, 0.5f);
  const double cpu = moekit::cpu::z_loss<S>(b.view(), 0.25f, {ref.data(), tokens, E});
  double sum = 0.0;
  for (index_t t = 0; t < tokens; ++t) {
    sum += routing::z_loss_token<E>(&b.logits[to_size(t * E)], 0.25, static_cast<double>(tokens),
                                    &got[to_size(t * E)]);
  }
  EXPECT_NEAR(sum / tokens, cpu, 1e-6 * cpu);
  for (index_t i = 0; i < tokens * E; ++i) {
    ASSERT_EQ(got[to_size(i)], ref[to_size(i)]) << i;
  }
  for (int e = 0; e < E; ++e) {
    EXPECT_EQ(got[to_size(5 * E + e)], 0.5f);  // undefined rows: no gradient
    EXPECT_EQ(got[to_size(9 * E + e)], 0.5f);
    EXPECT_EQ(got[to_size(11 * E + e)], 0.5f);
  }
  EXPECT_EQ(got[to_size(13 * E)], 0.5f);  // the masked expert: + 0
  if (E > 1) {
    EXPECT_NE(got[to_size(13 * E + 1)], 0.5f);
  }
}

TEST(RoutingMath, ZLossTokenMatchesCpuZLoss) {
  check_z_loss_token<1>();
  check_z_loss_token<8>();
  check_z_loss_token<60>();
  check_z_loss_token<384>();
}

TEST(RoutingMath, ZLossTokenMatchesFloat64AndFiniteDifferences) {
  constexpr int E = 6;
  const float x[E] = {0.3f, -1.2f, 2.5f, 0.0f, -4.0f, 1.1f};
  double z = 0.0;
  for (float v : x) z += std::exp(static_cast<double>(v));
  const double lse = std::log(z);
  float dx[E] = {};
  const double l = routing::z_loss_token<E>(x, 1.0, 1.0, dx);
  EXPECT_NEAR(l, lse * lse, 1e-5);
  for (int e = 0; e < E; ++e) {
    EXPECT_NEAR(dx[e], 2.0 * lse * std::exp(static_cast<double>(x[e])) / z, 1e-5) << e;
  }
  EXPECT_EQ(routing::z_loss_token<E>(x, 1.0, 1.0, nullptr), l);
}

TEST(RoutingMath, CvSquaredMatchesFloat64AndFiniteDifferences) {
  constexpr int N = 5;
  const double v[N] = {3.0, 0.5, 7.25, 2.0, 0.0};
  double grad[N];
  const double cv = routing::cv_squared<N>(v, 2.0, grad);
  const auto f = [](const double* w) {
    double m = 0.0, var = 0.0;
    for (int i = 0; i < N; ++i) m += w[i];
    m /= N;
    for (int i = 0; i < N; ++i) var += (w[i] - m) * (w[i] - m);
    return var / N / (m * m + 1e-10);
  };
  EXPECT_NEAR(cv, f(v), 1e-14);
  for (int i = 0; i < N; ++i) {
    double p[N], m[N];
    for (int j = 0; j < N; ++j) p[j] = m[j] = v[j];
    p[i] += 1e-6;
    m[i] -= 1e-6;
    EXPECT_NEAR(grad[i], 2.0 * (f(p) - f(m)) / 2e-6, 1e-6) << i;
  }
  const double zeros[N] = {};
  EXPECT_EQ(routing::cv_squared<N>(zeros, 1.0, grad), 0.0);
}

TEST(RoutingMath, ValidIdsRejectsOutOfRangeAndRepeats) {
  const int ok[3] = {4, 0, 7};
  const int high[3] = {4, 8, 1};
  const int negative[3] = {-1, 2, 3};
  const int repeated[3] = {2, 5, 2};
  EXPECT_TRUE((routing::valid_ids<8, 3>(ok)));
  EXPECT_FALSE((routing::valid_ids<8, 3>(high)));
  EXPECT_FALSE((routing::valid_ids<8, 3>(negative)));
  EXPECT_FALSE((routing::valid_ids<8, 3>(repeated)));
  const int one[1] = {0};
  EXPECT_TRUE((routing::valid_ids<1, 1>(one)));
}

}  // namespace
