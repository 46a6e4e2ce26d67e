// Activations (moekit/core/activation.hpp) and expert FFNs over the
// expert-major buffer (moekit/cpu/expert_ffn.hpp), forward and backward,
// against float64 references written here: the textbook activation
// formulas (tanh / erf forms) and per-row loops over each row's expert.
// The float64 backward reference is itself checked against central finite
// differences of <y, G>. Also: saved activations, frozen and partial
// gradients, accumulate mode, determinism, empty experts and batches, every
// CPU path giving the same bits, batch invariance, packed frozen weights in
// fp32 / bf16 / int8, no allocation, and every bad-input path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "allocation_counter.hpp"
#include "expect_error.hpp"
#include "gemm_reference.hpp"
#include "moekit/core/activation.hpp"
#include "moekit/cpu/expert_ffn.hpp"
#include "routing_reference.hpp"
#include "strided_matrix.hpp"

namespace {

using moekit::Activation;
using moekit::Errc;
using moekit::FfnKind;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::VectorView;
using moekit::cpu::ExpertFfn;
using moekit::cpu::ExpertFfnConfig;
using moekit::cpu::ExpertGrads;
using moekit::cpu::ExpertWeights;
using moekit::cpu::FfnThreading;
using moekit::cpu::Isa;
using moekit_test::act64;
using moekit_test::act64_grad;
using moekit_test::expect_error;

using moekit_test::kNaN;
constexpr float kInfF = std::numeric_limits<float>::infinity();
using moekit_test::kPad;

constexpr Activation kActivations[] = {Activation::kRelu, Activation::kGeluTanh,
                                       Activation::kGeluErf, Activation::kSilu};
constexpr FfnKind kKinds[] = {FfnKind::kPlain, FfnKind::kGated};

const char* name(Activation a) {
  switch (a) {
    case Activation::kRelu:
      return "relu";
    case Activation::kGeluTanh:
      return "gelu_tanh";
    case Activation::kGeluErf:
      return "gelu_erf";
    case Activation::kSilu:
      return "silu";
  }
  return "?";
}

// ---- float64 activation formulas (textbook forms) ---------------------------

// Test points: a fine grid over [-14, 14], 0, tiny and huge magnitudes.
std::vector<float> activation_points() {
  std::vector<float> xs;
  for (int i = -2800; i <= 2800; ++i) xs.push_back(static_cast<float>(i) * 0.005f);
  for (float v : {1e-30f, 1e-7f,  1e-3f,  0.3f,   2.5f,   7.0f, 11.9f, 12.1f, 20.0f, 50.0f,
                  88.0f,  100.0f, 109.0f, 111.0f, 200.0f, 1e4f, 1e10f, 1e20f, 1e30f, 3e38f}) {
    xs.push_back(v);
    xs.push_back(-v);
  }
  xs.push_back(0.0f);
  xs.push_back(-0.0f);
  return xs;
}

// |got - ref| relative to max(|ref|, floor): relative for values of order
// one and above, absolute below `floor`. f' of GELU and SiLU crosses zero as
// the difference of two terms of order 0.2-0.5, so its float error is
// absolute there: derivatives use kGradFloor.
constexpr double kGradFloor = 0.1;
double scaled_error(double got, double ref, double floor = 1e-3) {
  return std::abs(got - ref) / std::max(std::abs(ref), floor);
}

TEST(Activation, MatchesFloat64Formulas) {
  for (Activation a : kActivations) {
    double worst = 0.0, worst_grad = 0.0;
    for (float x : activation_points()) {
      const double f = moekit::activate(a, x);
      const double g = moekit::activate_grad(a, x);
      ASSERT_TRUE(std::isfinite(f)) << name(a) << " x = " << x;
      ASSERT_TRUE(std::isfinite(g)) << name(a) << " x = " << x;
      const double ef = scaled_error(f, act64(a, x));
      const double eg = scaled_error(g, act64_grad(a, x), kGradFloor);
      EXPECT_LT(ef, 2e-6) << name(a) << " x = " << x << " f = " << f << " ref " << act64(a, x);
      EXPECT_LT(eg, 2e-6) << name(a) << " x = " << x << " f' = " << g << " ref "
                          << act64_grad(a, x);
      worst = std::max(worst, ef);
      worst_grad = std::max(worst_grad, eg);
    }
    std::printf("[activation] %-9s max error f %.2e  f' %.2e\n", name(a), worst, worst_grad);
  }
}

TEST(Activation, GradientMatchesCentralDifferences) {
  for (Activation a : kActivations) {
    double worst = 0.0;
    for (int i = -1200; i <= 1200; ++i) {
      const float x = static_cast<float>(i) * 0.01f + 0.00137f;  // never on ReLU's kink
      const double h = 1e-6;
      const double fd = (act64(a, x + h) - act64(a, x - h)) / (2 * h);
      const double err = scaled_error(moekit::activate_grad(a, x), fd, kGradFloor);
      EXPECT_LT(err, 1e-5) << name(a) << " x = " << x;
      worst = std::max(worst, err);
    }
    std::printf("[activation] %-9s f' vs central differences %.2e\n", name(a), worst);
  }
}

TEST(Activation, EdgeValues) {
  EXPECT_EQ(moekit::activate_grad(Activation::kRelu, 0.0f), 0.0f);  // documented choice
  EXPECT_EQ(moekit::activate_grad(Activation::kRelu, -0.0f), 0.0f);
  EXPECT_EQ(moekit::activate(Activation::kRelu, 0.0f), 0.0f);
  for (Activation a : kActivations) {
    SCOPED_TRACE(name(a));
    EXPECT_EQ(moekit::activate(a, 0.0f), 0.0f);
    EXPECT_EQ(moekit::activate(a, -kInfF), 0.0f);
    EXPECT_EQ(moekit::activate(a, kInfF), kInfF);
    EXPECT_EQ(moekit::activate_grad(a, -kInfF), 0.0f);
    EXPECT_EQ(moekit::activate_grad(a, kInfF), 1.0f);
    EXPECT_TRUE(std::isnan(moekit::activate(a, kNaN)));
    EXPECT_TRUE(std::isnan(moekit::activate_grad(a, kNaN)));
    // Monotone limits hold exactly at large |x|.
    EXPECT_EQ(moekit::activate(a, 1e30f), 1e30f);
    EXPECT_EQ(moekit::activate(a, -1e30f), 0.0f);
  }
  EXPECT_EQ(moekit::activate_grad(Activation::kGeluTanh, 0.0f), 0.5f);
  EXPECT_EQ(moekit::activate_grad(Activation::kGeluErf, 0.0f), 0.5f);
  EXPECT_EQ(moekit::activate_grad(Activation::kSilu, 0.0f), 0.5f);
}

// ---- matrices -----------------------------------------------------------------

// An owning row-major matrix with `pad` padding columns (ld = cols + pad).
using Mat = moekit_test::StridedMatrix;

using moekit_test::rel_error;

// ---- float64 reference --------------------------------------------------------

struct Dims {
  int experts;
  index_t d, f;
  FfnKind kind;
  Activation act;
  std::vector<index_t> offsets;
  index_t n() const { return offsets.back(); }
  bool gated() const { return kind == FfnKind::kGated; }
};

struct Ref {
  std::vector<double> y, pre, gate;       // N x d, N x f, N x f
  std::vector<double> dx, dw1, dw3, dw2;  // N x d, E f x d, E f x d, E d x f
};

// Dense float64 inputs (no padding): x N x d, w1/w3 E f x d, w2 E d x f, dy N x d.
Ref reference(const Dims& p, const std::vector<double>& x, const std::vector<double>& w1,
              const std::vector<double>& w3, const std::vector<double>& w2,
              const std::vector<double>& dy) {
  const index_t n = p.n(), d = p.d, f = p.f;
  const auto E = static_cast<std::size_t>(p.experts);
  Ref r;
  r.y.assign(static_cast<std::size_t>(n * d), 0.0);
  r.pre.assign(static_cast<std::size_t>(n * f), 0.0);
  r.gate.assign(p.gated() ? static_cast<std::size_t>(n * f) : 0u, 0.0);
  r.dx.assign(static_cast<std::size_t>(n * d), 0.0);
  r.dw1.assign(E * static_cast<std::size_t>(f * d), 0.0);
  r.dw3.assign(p.gated() ? E * static_cast<std::size_t>(f * d) : 0u, 0.0);
  r.dw2.assign(E * static_cast<std::size_t>(d * f), 0.0);
  auto at = [](std::vector<double>& v, index_t i) -> double& {
    return v[static_cast<std::size_t>(i)];
  };
  auto get = [](const std::vector<double>& v, index_t i) { return v[static_cast<std::size_t>(i)]; };
  std::vector<double> a(static_cast<std::size_t>(f)), g(a), h(a), dh(a), da(a), dg(a);
  for (int e = 0; e < p.experts; ++e) {
    for (index_t row = p.offsets[static_cast<std::size_t>(e)];
         row < p.offsets[static_cast<std::size_t>(e) + 1]; ++row) {
      for (index_t j = 0; j < f; ++j) {
        double sa = 0, sg = 0;
        for (index_t k = 0; k < d; ++k) {
          sa += get(x, row * d + k) * get(w1, (e * f + j) * d + k);
          if (p.gated()) sg += get(x, row * d + k) * get(w3, (e * f + j) * d + k);
        }
        a[static_cast<std::size_t>(j)] = sa;
        g[static_cast<std::size_t>(j)] = p.gated() ? sg : 1.0;
        h[static_cast<std::size_t>(j)] = act64(p.act, sa) * (p.gated() ? sg : 1.0);
        at(r.pre, row * f + j) = sa;
        if (p.gated()) at(r.gate, row * f + j) = sg;
      }
      for (index_t i = 0; i < d; ++i) {
        double s = 0;
        for (index_t j = 0; j < f; ++j)
          s += h[static_cast<std::size_t>(j)] * get(w2, (e * d + i) * f + j);
        at(r.y, row * d + i) = s;
      }
      // backward
      for (index_t j = 0; j < f; ++j) {
        const auto jj = static_cast<std::size_t>(j);
        double s = 0;
        for (index_t i = 0; i < d; ++i) s += get(dy, row * d + i) * get(w2, (e * d + i) * f + j);
        dh[jj] = s;
        da[jj] = s * g[jj] * act64_grad(p.act, a[jj]);
        dg[jj] = s * act64(p.act, a[jj]);
      }
      for (index_t i = 0; i < d; ++i)
        for (index_t j = 0; j < f; ++j)
          at(r.dw2, (e * d + i) * f + j) += get(dy, row * d + i) * h[static_cast<std::size_t>(j)];
      for (index_t j = 0; j < f; ++j) {
        for (index_t k = 0; k < d; ++k) {
          at(r.dw1, (e * f + j) * d + k) += da[static_cast<std::size_t>(j)] * get(x, row * d + k);
          if (p.gated())
            at(r.dw3, (e * f + j) * d + k) += dg[static_cast<std::size_t>(j)] * get(x, row * d + k);
        }
      }
      for (index_t k = 0; k < d; ++k) {
        double s = 0;
        for (index_t j = 0; j < f; ++j) {
          s += da[static_cast<std::size_t>(j)] * get(w1, (e * f + j) * d + k);
          if (p.gated()) s += dg[static_cast<std::size_t>(j)] * get(w3, (e * f + j) * d + k);
        }
        at(r.dx, row * d + k) = s;
      }
    }
  }
  return r;
}

std::vector<index_t> offsets_of(const std::vector<index_t>& counts) {
  std::vector<index_t> off(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), off.begin() + 1);
  return off;
}

// One problem's inputs and outputs, with strided (padded) views everywhere.
struct Problem {
  Dims dims;
  Mat x, w1, w3, w2, dy;                // inputs
  Mat y, pre, gate, dx, dw1, dw3, dw2;  // outputs
  std::vector<std::byte> ws;

  Problem(Dims p, std::uint32_t seed) : dims(std::move(p)) {
    const index_t n = dims.n(), d = dims.d, f = dims.f, e = dims.experts;
    const index_t gf = dims.gated() ? e * f : 0;
    std::mt19937 rng(seed);
    x = Mat(n, d);
    w1 = Mat(e * f, d, 2);
    w3 = Mat(gf, d, 1);
    w2 = Mat(e * d, f, 2);
    dy = Mat(n, d);
    x.randomize(rng);
    w1.randomize(rng, 1.0f / std::sqrt(static_cast<float>(d)));
    w3.randomize(rng, 1.0f / std::sqrt(static_cast<float>(d)));
    w2.randomize(rng, 1.0f / std::sqrt(static_cast<float>(f)));
    dy.randomize(rng);
    y = Mat(n, d);
    pre = Mat(n, f);
    gate = Mat(dims.gated() ? n : 0, f);
    dx = Mat(n, d);
    dw1 = Mat(e * f, d);
    dw3 = Mat(gf, d);
    dw2 = Mat(e * d, f);
    poison_outputs();
  }
  void poison_outputs() {
    for (Mat* m : {&y, &pre, &gate, &dx, &dw1, &dw3, &dw2}) m->poison();
  }
  ExpertFfnConfig config(FfnThreading t = FfnThreading::kAuto) const {
    return {.d_model = dims.d,
            .d_ff = dims.f,
            .kind = dims.kind,
            .activation = dims.act,
            .threading = t};
  }
  VectorView<const index_t> off() const {
    return {dims.offsets.data(), static_cast<index_t>(dims.offsets.size())};
  }
  ExpertWeights weights() const { return {w1.cview(), w3.cview(), w2.cview()}; }
  ExpertGrads grads(bool accumulate = false) {
    return {dw1.view(), dw3.view(), dw2.view(), accumulate};
  }
  VectorView<std::byte> workspace(index_t bytes) {
    ws.assign(static_cast<std::size_t>(bytes), std::byte{0xff});
    return {ws.data(), bytes};
  }
  Ref ref() const {
    return reference(dims, x.values(), w1.values(), w3.values(), w2.values(), dy.values());
  }

  template <class S>
  void run(const ExpertFfn<S>& ffn) {
    const VectorView<std::byte> w = workspace(ffn.workspace_size(dims.n()));
    ffn.forward(x.cview(), off(), weights(), y.view(), pre.view(), gate.view(), w);
    ffn.backward(dy.cview(), x.cview(), off(), weights(), pre.cview(), gate.cview(), dx.view(),
                 grads(), w);
  }
};

struct Errors {
  double y, pre, gate, dx, dw1, dw3, dw2;
  double worst() const { return std::max({y, pre, gate, dx, dw1, dw3, dw2}); }
};

Errors compare(const Problem& p, const Ref& r) {
  Errors e{};
  e.y = rel_error(p.y.values(), r.y);
  e.pre = rel_error(p.pre.values(), r.pre);
  e.gate = rel_error(p.gate.values(), r.gate);
  e.dx = rel_error(p.dx.values(), r.dx);
  e.dw1 = rel_error(p.dw1.values(), r.dw1);
  e.dw3 = rel_error(p.dw3.values(), r.dw3);
  e.dw2 = rel_error(p.dw2.values(), r.dw2);
  return e;
}

void expect_all_written(const Problem& p) {
  for (const Mat* m : {&p.y, &p.pre, &p.gate, &p.dx, &p.dw1, &p.dw3, &p.dw2}) {
    EXPECT_FALSE(m->any_nan()) << "an output element was not written";
    EXPECT_TRUE(m->padding_untouched());
  }
}

constexpr double kTol = 1e-5;

// Uneven expert loads with empty experts, per spec.
template <int E>
std::vector<index_t> uneven_counts() {
  if constexpr (E == 1) {
    return {53};
  } else if constexpr (E == 8) {
    return {0, 37, 1, 0, 90, 5, 0, 12};
  } else {
    std::vector<index_t> c(E);
    std::mt19937 rng(E);
    std::uniform_int_distribution<int> count(0, 14);
    for (index_t& v : c) v = count(rng) < 3 ? 0 : count(rng);
    c[0] = 0;
    c[E - 1] = 0;
    c[E / 2] = 1;
    return c;
  }
}

// ---- forward and backward against the float64 reference ---------------------

template <class S>
class ExpertFfnTyped : public ::testing::Test {};

using Specs = ::testing::Types<MoeSpec<1, 1>, MoeSpec<8, 2>, MoeSpec<64, 8>>;
TYPED_TEST_SUITE(ExpertFfnTyped, Specs);

TYPED_TEST(ExpertFfnTyped, MatchFloat64ReferenceDeterministically) {
  using S = TypeParam;
  constexpr int E = S::num_experts;
  const index_t d = E == 64 ? 24 : 40, f = E == 64 ? 40 : 72;
  double worst = 0.0;
  for (FfnKind kind : kKinds) {
    for (Activation act : kActivations) {
      SCOPED_TRACE(::testing::Message() << "kind " << static_cast<int>(kind) << " " << name(act));
      Problem p({E, d, f, kind, act, offsets_of(uneven_counts<E>())},
                1234u + static_cast<std::uint32_t>(E) * 10u + static_cast<std::uint32_t>(act));
      const Ref r = p.ref();
      for (FfnThreading t :
           {FfnThreading::kAuto, FfnThreading::kAcrossExperts, FfnThreading::kInsideGemm}) {
        const ExpertFfn<S> ffn(p.config(t));
        p.poison_outputs();
        p.run(ffn);
        expect_all_written(p);
        const Errors err = compare(p, r);
        EXPECT_LT(err.worst(), kTol)
            << "y " << err.y << " pre " << err.pre << " gate " << err.gate << " dx " << err.dx
            << " dw1 " << err.dw1 << " dw3 " << err.dw3 << " dw2 " << err.dw2;
        worst = std::max(worst, err.worst());

        // Empty experts' gradient blocks are exactly zero in overwrite mode.
        for (int e = 0; e < E; ++e) {
          if (p.dims.offsets[static_cast<std::size_t>(e)] !=
              p.dims.offsets[static_cast<std::size_t>(e) + 1])
            continue;
          for (index_t j = 0; j < f; ++j)
            for (index_t k = 0; k < d; ++k) {
              ASSERT_EQ(p.dw1.at(e * f + j, k), 0.0f);
              if (p.dims.gated()) {
                ASSERT_EQ(p.dw3.at(e * f + j, k), 0.0f);
              }
              ASSERT_EQ(p.dw2.at(e * d + k, j), 0.0f);
            }
        }

        // Determinism: a second run is bit-identical.
        Problem again = p;
        again.poison_outputs();
        again.run(ffn);
        for (auto [a, b] : {std::pair{&p.y, &again.y},
                            {&p.pre, &again.pre},
                            {&p.gate, &again.gate},
                            {&p.dx, &again.dx},
                            {&p.dw1, &again.dw1},
                            {&p.dw3, &again.dw3},
                            {&p.dw2, &again.dw2}}) {
          EXPECT_TRUE(a->bits_equal(*b)) << "a rerun changed the bits";
        }
      }
    }
  }
  std::printf("[expert_ffn] E = %d: worst relative error vs float64 %.2e\n", E, worst);
}

// All tokens to one expert: kAuto takes the inside-GEMM path.
TEST(ExpertFfn, AllRowsToOneExpert) {
  using S = MoeSpec<8, 2>;
  for (FfnKind kind : kKinds) {
    Problem p({8, 32, 48, kind, Activation::kSilu, offsets_of({0, 0, 0, 300, 0, 0, 0, 0})}, 77u);
    const ExpertFfn<S> ffn(p.config());
    p.run(ffn);
    expect_all_written(p);
    const Errors err = compare(p, p.ref());
    EXPECT_LT(err.worst(), kTol);
  }
}

// ---- finite differences ---------------------------------------------------------

// L(x, W) = <y(x, W), G> through the float64 reference forward.
double loss(const Dims& p, const std::vector<double>& x, const std::vector<double>& w1,
            const std::vector<double>& w3, const std::vector<double>& w2,
            const std::vector<double>& g) {
  const Ref r = reference(p, x, w1, w3, w2, g);
  double s = 0;
  for (std::size_t i = 0; i < g.size(); ++i) s += r.y[i] * g[i];
  return s;
}

TEST(ExpertFfn, GradientsMatchCentralDifferences) {
  using S = MoeSpec<3, 1>;
  double worst_lib = 0.0, worst_ref = 0.0;
  for (FfnKind kind : kKinds) {
    for (Activation act : kActivations) {
      SCOPED_TRACE(::testing::Message() << "kind " << static_cast<int>(kind) << " " << name(act));
      Problem p({3, 4, 5, kind, act, offsets_of({2, 0, 3})}, 99u + static_cast<std::uint32_t>(act));
      p.run(ExpertFfn<S>(p.config()));
      expect_all_written(p);
      const Ref r = p.ref();
      std::vector<double> x = p.x.values(), w1 = p.w1.values(), w3 = p.w3.values(),
                          w2 = p.w2.values();
      const std::vector<double> g = p.dy.values();
      const double h = 1e-6;
      auto fd = [&](std::vector<double>& v) {
        std::vector<double> out(v.size());
        for (std::size_t i = 0; i < v.size(); ++i) {
          const double keep = v[i];
          v[i] = keep + h;
          const double up = loss(p.dims, x, w1, w3, w2, g);
          v[i] = keep - h;
          const double down = loss(p.dims, x, w1, w3, w2, g);
          v[i] = keep;
          out[i] = (up - down) / (2 * h);
        }
        return out;
      };
      const std::vector<double> fx = fd(x), f1 = fd(w1), f3 = fd(w3), f2 = fd(w2);
      const double lib[] = {rel_error(p.dx.values(), fx), rel_error(p.dw1.values(), f1),
                            rel_error(p.dw3.values(), f3), rel_error(p.dw2.values(), f2)};
      const double ref[] = {rel_error(r.dx, fx), rel_error(r.dw1, f1), rel_error(r.dw3, f3),
                            rel_error(r.dw2, f2)};
      for (double e : lib) {
        EXPECT_LT(e, kTol);
        worst_lib = std::max(worst_lib, e);
      }
      for (double e : ref) {
        EXPECT_LT(e, 1e-7);
        worst_ref = std::max(worst_ref, e);
      }
    }
  }
  std::printf("[expert_ffn] vs central differences: library %.2e, float64 reference %.2e\n",
              worst_lib, worst_ref);
}

// ---- saved activations, frozen parts, accumulate --------------------------------

TEST(ExpertFfn, InferenceForwardWithoutSavesMatchesBitwise) {
  using S = MoeSpec<8, 2>;
  for (FfnKind kind : kKinds) {
    Problem p({8, 32, 48, kind, Activation::kGeluTanh, offsets_of(uneven_counts<8>())}, 5u);
    const ExpertFfn<S> ffn(p.config());
    p.run(ffn);
    Mat y2(p.dims.n(), p.dims.d);
    y2.poison();
    const VectorView<std::byte> w = p.workspace(ffn.workspace_size(p.dims.n()));
    ffn.forward(p.x.cview(), p.off(), p.weights(), y2.view(), {}, {}, w);
    EXPECT_TRUE(y2.bits_equal(p.y));
  }
}

TEST(ExpertFfn, FrozenOutputsAreUntouchedAndPartsMatchTheFullRun) {
  using S = MoeSpec<8, 2>;
  for (FfnKind kind : kKinds) {
    Problem full({8, 24, 40, kind, Activation::kGeluErf, offsets_of(uneven_counts<8>())}, 11u);
    const ExpertFfn<S> ffn(full.config());
    full.run(ffn);
    // Each output alone, and all-but-one; the frozen ones are empty views
    // onto poisoned memory, which must stay poisoned.
    for (int mask = 0; mask < 16; ++mask) {
      if (!full.dims.gated() && (mask & 4)) continue;
      SCOPED_TRACE(::testing::Message() << "kind " << static_cast<int>(kind) << " mask " << mask);
      Problem p = full;
      p.poison_outputs();
      const bool want[4] = {(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0, (mask & 8) != 0};
      auto pick = [](bool on, Mat& m) {
        return on ? m.view() : MatrixView<float>(m.data.data(), 0, m.cols, m.ld);
      };
      const VectorView<std::byte> w = p.workspace(ffn.workspace_size(p.dims.n()));
      ffn.backward(p.dy.cview(), p.x.cview(), p.off(), p.weights(), full.pre.cview(),
                   full.gate.cview(), pick(want[0], p.dx),
                   {pick(want[1], p.dw1), pick(want[2] && p.dims.gated(), p.dw3),
                    pick(want[3], p.dw2), false},
                   w);
      const Mat* got[4] = {&p.dx, &p.dw1, &p.dw3, &p.dw2};
      const Mat* exp[4] = {&full.dx, &full.dw1, &full.dw3, &full.dw2};
      for (int i = 0; i < 4; ++i) {
        if (want[i]) {
          EXPECT_TRUE(got[i]->bits_equal(*exp[i])) << "output " << i;
        } else {
          Mat poisoned = *got[i];
          poisoned.poison();
          EXPECT_TRUE(got[i]->bits_equal(poisoned)) << "frozen output " << i << " was written";
        }
      }
    }
  }
}

TEST(ExpertFfn, AccumulateAddsToTheOldGradients) {
  using S = MoeSpec<8, 2>;
  for (FfnKind kind : kKinds) {
    SCOPED_TRACE(static_cast<int>(kind));
    Problem p({8, 24, 40, kind, Activation::kSilu, offsets_of(uneven_counts<8>())}, 21u);
    const ExpertFfn<S> ffn(p.config());
    p.run(ffn);  // overwrite: the new gradients
    Problem q = p;
    std::mt19937 rng(3);
    for (Mat* m : {&q.dw1, &q.dw3, &q.dw2}) m->randomize(rng);
    const Problem old = q;
    const VectorView<std::byte> w = q.workspace(ffn.workspace_size(q.dims.n()));
    ffn.backward(q.dy.cview(), q.x.cview(), q.off(), q.weights(), p.pre.cview(), p.gate.cview(), {},
                 q.grads(/*accumulate=*/true), w);
    for (auto [got, was, add] : {std::tuple{&q.dw1, &old.dw1, &p.dw1},
                                 {&q.dw3, &old.dw3, &p.dw3},
                                 {&q.dw2, &old.dw2, &p.dw2}}) {
      EXPECT_TRUE(got->padding_untouched());
      double worst = 0.0;
      for (index_t r = 0; r < got->rows; ++r) {
        for (index_t c = 0; c < got->cols; ++c) {
          const double expect = double(was->at(r, c)) + add->at(r, c);
          const double scale = std::abs(double(was->at(r, c))) + std::abs(double(add->at(r, c)));
          worst = std::max(worst, std::abs(got->at(r, c) - expect) / std::max(scale, 1e-30));
        }
      }
      EXPECT_LT(worst, 1e-6);
    }
    // Empty experts' blocks are unchanged, bit for bit.
    for (int e = 0; e < 8; ++e) {
      if (q.dims.offsets[static_cast<std::size_t>(e)] !=
          q.dims.offsets[static_cast<std::size_t>(e) + 1])
        continue;
      const index_t f = q.dims.f, d = q.dims.d;
      for (index_t j = 0; j < f; ++j)
        for (index_t k = 0; k < d; ++k) {
          ASSERT_EQ(q.dw1.at(e * f + j, k), old.dw1.at(e * f + j, k));
          if (q.dims.gated()) {
            ASSERT_EQ(q.dw3.at(e * f + j, k), old.dw3.at(e * f + j, k));
          }
          ASSERT_EQ(q.dw2.at(e * d + k, j), old.dw2.at(e * d + k, j));
        }
    }
  }
}

TEST(ExpertFfn, EmptyBatch) {
  using S = MoeSpec<8, 2>;
  for (FfnKind kind : kKinds) {
    Problem p({8, 16, 24, kind, Activation::kRelu, offsets_of(std::vector<index_t>(8, 0))}, 1u);
    const ExpertFfn<S> ffn(p.config());
    EXPECT_EQ(ffn.workspace_size(0), 0);
    ffn.forward(p.x.cview(), p.off(), p.weights(), p.y.view(), p.pre.view(), p.gate.view(), {});
    ffn.backward(p.dy.cview(), p.x.cview(), p.off(), p.weights(), p.pre.cview(), p.gate.cview(),
                 p.dx.view(), p.grads(), {});
    for (const Mat* m : {&p.dw1, &p.dw3, &p.dw2}) {
      for (double v : m->values()) ASSERT_EQ(v, 0.0);
      EXPECT_TRUE(m->padding_untouched());
    }
    p.poison_outputs();
    ffn.backward(p.dy.cview(), p.x.cview(), p.off(), p.weights(), p.pre.cview(), p.gate.cview(),
                 p.dx.view(), p.grads(/*accumulate=*/true), {});
    for (const Mat* m : {&p.dw1, &p.dw3, &p.dw2}) {
      for (double v : m->values()) ASSERT_TRUE(std::isnan(v));
    }
  }
}

// ---- the GEMM engine: paths, batch invariance, packed weights, allocation -------

// Every CPU path (and the AVX-512 blocking on the portable operations) gives
// the same bits for the whole forward and backward: the engine's fp32
// products are one fixed chain per element on every path.
TEST(ExpertFfn, EveryPathGivesTheSameBits) {
  using S = MoeSpec<8, 2>;
  namespace c = moekit::cpu;
  for (FfnKind kind : kKinds) {
    SCOPED_TRACE(static_cast<int>(kind));
    Problem base({8, 40, 300, kind, Activation::kSilu, offsets_of(uneven_counts<8>())}, 61u);
    const ExpertFfn<S> ffn(base.config());
    std::vector<Problem> runs;
    for (const moekit_test::GemmPathCase& path :
         moekit_test::gemm_path_cases(moekit::cpu::GemmDtype::kFloat32)) {
      Problem p = base;
      moekit_test::with_path(path, moekit::cpu::GemmDtype::kFloat32, [&] { p.run(ffn); });
      expect_all_written(p);
      EXPECT_LT(compare(p, p.ref()).worst(), kTol) << path.name;
      if (!runs.empty()) {
        for (auto [a, b] : {std::pair{&p.y, &runs[0].y},
                            {&p.pre, &runs[0].pre},
                            {&p.gate, &runs[0].gate},
                            {&p.dx, &runs[0].dx},
                            {&p.dw1, &runs[0].dw1},
                            {&p.dw3, &runs[0].dw3},
                            {&p.dw2, &runs[0].dw2}}) {
          EXPECT_TRUE(a->bits_equal(*b))
              << path.name << " differs from " << c::isa_name(Isa::kGeneric);
        }
      }
      runs.push_back(std::move(p));
    }
  }
}

// A token's y and dx are the same bits whether its row runs alone or among
// many others of every expert, at 1 and 2 threads.
TEST(ExpertFfn, BatchInvariance) {
  using S = MoeSpec<8, 2>;
  constexpr int E = 8;
  const index_t d = 48, f = 80;
#if defined(NDEBUG)
  const std::vector<index_t> counts = {600, 1, 0, 333, 90, 1200, 7, 2};
#else
  const std::vector<index_t> counts = {60, 1, 0, 33, 90, 12, 7, 2};
#endif
  for (FfnKind kind : kKinds) {
    SCOPED_TRACE(static_cast<int>(kind));
    Problem big({E, d, f, kind, Activation::kGeluTanh, offsets_of(counts)}, 71u);
    const ExpertFfn<S> ffn(big.config());
    for (int threads : {1, 2}) {
      moekit_test::ThreadCount scope(threads);
      Problem batch = big;
      batch.run(ffn);
      // Rows of every expert, each alone in its expert.
      for (int e = 0; e < E; ++e) {
        const index_t r0 = big.dims.offsets[static_cast<std::size_t>(e)];
        const index_t r1 = big.dims.offsets[static_cast<std::size_t>(e) + 1];
        for (index_t r : {r0, (r0 + r1) / 2, r1 - 1}) {
          if (r < r0 || r >= r1) continue;
          std::vector<index_t> one(E, 0);
          one[static_cast<std::size_t>(e)] = 1;
          Problem alone({E, d, f, kind, Activation::kGeluTanh, offsets_of(one)}, 1u);
          alone.w1 = big.w1;
          alone.w3 = big.w3;
          alone.w2 = big.w2;
          std::memcpy(&alone.x.at(0, 0), &big.x.at(r, 0), sizeof(float) * std::size_t(d));
          std::memcpy(&alone.dy.at(0, 0), &big.dy.at(r, 0), sizeof(float) * std::size_t(d));
          alone.run(ffn);
          EXPECT_EQ(
              std::memcmp(&alone.y.at(0, 0), &batch.y.at(r, 0), sizeof(float) * std::size_t(d)), 0)
              << "y of row " << r << " (expert " << e << ") at " << threads << " threads";
          EXPECT_EQ(
              std::memcmp(&alone.dx.at(0, 0), &batch.dx.at(r, 0), sizeof(float) * std::size_t(d)),
              0)
              << "dx of row " << r << " (expert " << e << ") at " << threads << " threads";
        }
      }
    }
  }
}

// Packed frozen weights: fp32 gives the unpacked forward's bits; bf16 and
// int8 stay close to float64 (every path, AMX emulated too), and are batch
// invariant.
TEST(ExpertFfn, PackedForwardInEveryDtype) {
  using S = MoeSpec<8, 2>;
  using moekit::cpu::GemmDtype;
  for (FfnKind kind : kKinds) {
    Problem p({8, 64, 96, kind, Activation::kSilu, offsets_of(uneven_counts<8>())}, 81u);
    const ExpertFfn<S> ffn(p.config());
    p.run(ffn);
    const Ref r = p.ref();
    for (GemmDtype dtype : {GemmDtype::kFloat32, GemmDtype::kBfloat16, GemmDtype::kInt8}) {
      const moekit::cpu::PackedExpertWeights packed = ffn.pack(p.weights(), dtype);
      EXPECT_EQ(packed.dtype(), dtype);
      for (const moekit_test::GemmPathCase& path : moekit_test::gemm_path_cases(dtype)) {
        SCOPED_TRACE(::testing::Message()
                     << "kind " << static_cast<int>(kind) << " "
                     << moekit::cpu::gemm_dtype_name(dtype) << " " << path.name);
        Mat y(p.dims.n(), p.dims.d), y_alone(1, p.dims.d);
        y.poison();
        moekit_test::with_path(path, dtype, [&] {
          const VectorView<std::byte> w = p.workspace(ffn.workspace_size(p.dims.n()));
          ffn.forward(p.x.cview(), p.off(), packed, y.view(), w);
          // The first row of expert 4 alone.
          std::vector<index_t> one(8, 0);
          one[4] = 1;
          const std::vector<index_t> off = offsets_of(one);
          std::vector<std::byte> ws(static_cast<std::size_t>(ffn.workspace_size(1)));
          ffn.forward(p.x.cview().middle_rows(p.dims.offsets[4], 1),
                      {off.data(), static_cast<index_t>(off.size())}, packed, y_alone.view(),
                      {ws.data(), static_cast<index_t>(ws.size())});
        });
        EXPECT_FALSE(y.any_nan());
        EXPECT_TRUE(y.padding_untouched());
        EXPECT_EQ(std::memcmp(&y_alone.at(0, 0), &y.at(p.dims.offsets[4], 0),
                              sizeof(float) * std::size_t(p.dims.d)),
                  0);
        const double err = rel_error(y.values(), r.y);
        if (dtype == GemmDtype::kFloat32) {
          EXPECT_TRUE(y.bits_equal(p.y)) << "packed fp32 differs from the unpacked forward";
        } else {
          EXPECT_LT(err, dtype == GemmDtype::kBfloat16 ? 2e-2 : 5e-2);
        }
        std::printf("[expert_ffn] packed %s %s: relative error vs float64 %.2e\n",
                    moekit::cpu::gemm_dtype_name(dtype), path.name.c_str(), err);
      }
    }
  }
}

// bf16 compute (ExpertFfnConfig::compute) trains on fp32 master weights:
// every product's operands are rounded to bf16, sums, outputs and gradients
// stay fp32. So on the FMA paths the pre-activations equal, bit for bit, the
// fp32 experts' on bf16-rounded inputs and weights (AMX sums in its own
// order), and every output and gradient is within bf16's rounding of
// float64's, on every bf16 path.
TEST(ExpertFfn, Bf16ComputeRoundsOnlyTheProductsOperands) {
  using S = MoeSpec<8, 2>;
  using moekit::cpu::GemmDtype;
  for (FfnKind kind : kKinds) {
    Problem p({8, 64, 96, kind, Activation::kSilu, offsets_of(uneven_counts<8>())}, 82u);
    const Ref r = p.ref();
    ExpertFfnConfig config = p.config();
    config.compute = GemmDtype::kBfloat16;
    const ExpertFfn<S> ffn(config);
    Problem rounded = p;  // the fp32 experts on rounded x, W1 and W3
    for (Mat* m : {&rounded.x, &rounded.w1, &rounded.w3}) {
      for (index_t i = 0; i < m->rows; ++i)
        for (index_t j = 0; j < m->cols; ++j) m->at(i, j) = moekit_test::round_bf16(m->at(i, j));
    }
    rounded.run(ExpertFfn<S>(p.config()));
    for (const moekit_test::GemmPathCase& path :
         moekit_test::gemm_path_cases(GemmDtype::kBfloat16)) {
      SCOPED_TRACE(::testing::Message() << "kind " << static_cast<int>(kind) << " " << path.name);
      p.poison_outputs();
      moekit_test::with_path(path, GemmDtype::kBfloat16, [&] { p.run(ffn); });
      expect_all_written(p);
      const Errors err = compare(p, r);
      EXPECT_LT(err.worst(), 1e-2) << "y " << err.y << " dx " << err.dx << " dw1 " << err.dw1
                                   << " dw3 " << err.dw3 << " dw2 " << err.dw2;
      if (path.limit != Isa::kAmx && !path.emulate_amx) {
        EXPECT_TRUE(p.pre.bits_equal(rounded.pre));
        EXPECT_TRUE(p.gate.bits_equal(rounded.gate));
      }
      std::printf("[expert_ffn] bf16 compute %s kind %d: worst relative error vs float64 %.2e\n",
                  path.name.c_str(), static_cast<int>(kind), err.worst());
    }
  }
  ExpertFfnConfig int8 = {.d_model = 4, .d_ff = 4, .compute = GemmDtype::kInt8};
  const std::string msg =
      expect_error([&] { ExpertFfn<S> bad(int8); }, moekit::Errc::kInvalidArgument);
  EXPECT_NE(msg.find("config.compute"), std::string::npos) << msg;
}

TEST(ExpertFfn, PackedRejectsBadInput) {
  using S = MoeSpec<4, 2>;
  using moekit::cpu::GemmDtype;
  Problem p({4, 8, 12, FfnKind::kGated, Activation::kSilu, offsets_of({3, 0, 5, 2})}, 8u);
  const ExpertFfn<S> ffn(p.config());
  moekit::cpu::PackedExpertWeights packed = ffn.pack(p.weights(), GemmDtype::kInt8);
  const VectorView<std::byte> w = p.workspace(ffn.workspace_size(p.dims.n()));
  packed.w2 =
      moekit::cpu::PackedMatrix(GemmDtype::kBfloat16, moekit::cpu::Op::kTrans, p.w2.cview(), 4);
  std::string m = expect_error([&] { ffn.forward(p.x.cview(), p.off(), packed, p.y.view(), w); },
                               Errc::kInvalidArgument);
  EXPECT_NE(m.find("weights.w2 holds bfloat16 but weights.w1 holds int8"), std::string::npos) << m;
  packed.w2 = moekit::cpu::PackedMatrix(GemmDtype::kInt8, moekit::cpu::Op::kTrans, p.w1.cview(), 4);
  m = expect_error([&] { ffn.forward(p.x.cview(), p.off(), packed, p.y.view(), w); },
                   Errc::kShapeMismatch);
  EXPECT_NE(m.find("weights.w2 packs 4 groups of 8 x 12, expected 4 of 12 x 8"), std::string::npos)
      << m;
  m = expect_error([&] { ffn.pack(p.weights(), static_cast<GemmDtype>(7)); },
                   Errc::kInvalidArgument);
  EXPECT_NE(m.find("dtype = 7"), std::string::npos) << m;
}

// Forward and backward at realistic sizes allocate nothing (the thread pool
// is started by a first run).
TEST(ExpertFfn, NoAllocationInForwardOrBackward) {
  if (!moekit_test::AllocationCounter::available) GTEST_SKIP() << "the sanitizer owns operator new";
  using S = MoeSpec<8, 2>;
  Problem p({8, 256, 512, FfnKind::kGated, Activation::kSilu,
             offsets_of({200, 90, 0, 300, 1, 180, 150, 103})},
            91u);
  const ExpertFfn<S> ffn(p.config());
  const VectorView<std::byte> w = p.workspace(ffn.workspace_size(p.dims.n()));
  const moekit::cpu::PackedExpertWeights packed =
      ffn.pack(p.weights(), moekit::cpu::GemmDtype::kInt8);
  for (int pass = 0; pass < 2; ++pass) {
    moekit_test::CountAllocations count;
    ffn.forward(p.x.cview(), p.off(), p.weights(), p.y.view(), p.pre.view(), p.gate.view(), w);
    ffn.backward(p.dy.cview(), p.x.cview(), p.off(), p.weights(), p.pre.cview(), p.gate.cview(),
                 p.dx.view(), p.grads(), w);
    ffn.forward(p.x.cview(), p.off(), packed, p.y.view(), w);
    if (pass == 1) {
      EXPECT_EQ(count.allocations(), 0);
    }
  }
}

// ---- bad input ---------------------------------------------------------------------

TEST(ExpertFfn, RejectsBadConfig) {
  using S = MoeSpec<4, 2>;
  auto make = [](ExpertFfnConfig c) { return [c] { ExpertFfn<S> ffn(c); }; };
  const ExpertFfnConfig good{.d_model = 8, .d_ff = 16};
  EXPECT_NO_THROW(make(good)());
  ExpertFfnConfig c = good;
  c.d_model = 0;
  EXPECT_NE(expect_error(make(c), Errc::kInvalidArgument).find("d_model = 0"), std::string::npos);
  c = good;
  c.d_ff = -3;
  EXPECT_NE(expect_error(make(c), Errc::kInvalidArgument).find("d_ff = -3"), std::string::npos);
  c = good;
  c.kind = static_cast<FfnKind>(7);
  EXPECT_NE(expect_error(make(c), Errc::kInvalidArgument).find("kind = 7"), std::string::npos);
  c = good;
  c.activation = static_cast<Activation>(9);
  EXPECT_NE(expect_error(make(c), Errc::kInvalidArgument).find("activation = 9"),
            std::string::npos);
  c = good;
  c.threading = static_cast<FfnThreading>(5);
  expect_error(make(c), Errc::kInvalidArgument);
}

TEST(ExpertFfn, RejectsBadInputAndWritesNothing) {
  using S = MoeSpec<4, 2>;
  for (FfnKind kind : kKinds) {
    SCOPED_TRACE(static_cast<int>(kind));
    const Problem base({4, 8, 12, kind, Activation::kSilu, offsets_of({3, 0, 5, 2})}, 8u);
    const ExpertFfn<S> ffn(base.config());
    const index_t ws_bytes = ffn.workspace_size(base.dims.n());
    Mat other_w1(4 * 12, 9), short_y(base.dims.n() - 1, 8), stray_gate(base.dims.n(), 12);

    // Each case mutates a fresh copy and calls forward and backward.
    struct Case {
      const char* what;
      Errc code;
      const char* message;
      void (*mutate)(Problem&, std::vector<index_t>&, std::vector<std::byte>&);
    };
    const Case cases[] = {
        {"offsets[0]", Errc::kInvalidArgument, "offsets[0] = 1",
         [](Problem&, std::vector<index_t>& o, std::vector<std::byte>&) { o[0] = 1; }},
        {"decreasing", Errc::kInvalidArgument, "offsets decreases",
         [](Problem&, std::vector<index_t>& o, std::vector<std::byte>&) { o[2] = 1; }},
        {"offsets[E] != N", Errc::kShapeMismatch, "offsets[4] = 11 but buffer has 10 rows",
         [](Problem&, std::vector<index_t>& o, std::vector<std::byte>&) { o[4] = 11; }},
        {"offsets size", Errc::kShapeMismatch, "offsets has 4 elements, expected 5",
         [](Problem&, std::vector<index_t>& o, std::vector<std::byte>&) { o.pop_back(); }},
        {"workspace small", Errc::kShapeMismatch, "workspace has",
         [](Problem&, std::vector<index_t>&, std::vector<std::byte>& w) { w.pop_back(); }},
    };
    for (const Case& c : cases) {
      SCOPED_TRACE(c.what);
      Problem p = base;
      std::vector<index_t> off = p.dims.offsets;
      std::vector<std::byte> ws(static_cast<std::size_t>(ws_bytes));
      c.mutate(p, off, ws);
      const VectorView<const index_t> ov(off.data(), static_cast<index_t>(off.size()));
      const VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
      const std::string m1 = expect_error(
          [&] {
            ffn.forward(p.x.cview(), ov, p.weights(), p.y.view(), p.pre.view(), p.gate.view(), wv);
          },
          c.code);
      EXPECT_NE(m1.find(c.message), std::string::npos) << m1;
      const std::string m2 = expect_error(
          [&] {
            ffn.backward(p.dy.cview(), p.x.cview(), ov, p.weights(), p.pre.cview(), p.gate.cview(),
                         p.dx.view(), p.grads(), wv);
          },
          c.code);
      EXPECT_NE(m2.find(c.message), std::string::npos) << m2;
      for (auto [a, b] : {std::pair{&p.y, &base.y},
                          {&p.pre, &base.pre},
                          {&p.gate, &base.gate},
                          {&p.dx, &base.dx},
                          {&p.dw1, &base.dw1},
                          {&p.dw3, &base.dw3},
                          {&p.dw2, &base.dw2}}) {
        EXPECT_TRUE(a->bits_equal(*b)) << "a rejected call wrote an output";
      }
    }

    // Shape and pointer errors on single arguments.
    Problem p = base;
    std::vector<std::byte> ws(static_cast<std::size_t>(ws_bytes));
    const VectorView<std::byte> wv(ws.data(), ws_bytes);
    auto fwd = [&](MatrixView<const float> x, ExpertWeights w, MatrixView<float> y,
                   MatrixView<float> pre, MatrixView<float> gate, VectorView<std::byte> work) {
      return [=, &ffn, &p] { ffn.forward(x, p.off(), w, y, pre, gate, work); };
    };
    const ExpertWeights w = p.weights();
    std::string msg;
    msg = expect_error(fwd(p.x.cview(), {other_w1.cview(), w.w3, w.w2}, p.y.view(), p.pre.view(),
                           p.gate.view(), wv),
                       Errc::kShapeMismatch);
    EXPECT_NE(msg.find("weights.w1 is 48 x 9, expected 48 x 8"), std::string::npos) << msg;
    msg = expect_error(fwd(p.x.cview(), w, short_y.view(), p.pre.view(), p.gate.view(), wv),
                       Errc::kShapeMismatch);
    EXPECT_NE(msg.find("y is 9 x 8, expected 10 x 8"), std::string::npos) << msg;
    msg = expect_error(fwd(MatrixView<const float>(nullptr, 10, 8), w, p.y.view(), p.pre.view(),
                           p.gate.view(), wv),
                       Errc::kNullPointer);
    EXPECT_NE(msg.find("buffer is null"), std::string::npos) << msg;
    std::vector<std::byte> big(static_cast<std::size_t>(ws_bytes) + 8);
    msg = expect_error(fwd(p.x.cview(), w, p.y.view(), p.pre.view(), p.gate.view(),
                           VectorView<std::byte>(big.data() + 1, ws_bytes)),
                       Errc::kInvalidArgument);
    EXPECT_NE(msg.find("not aligned"), std::string::npos) << msg;
    if (kind == FfnKind::kPlain) {
      msg = expect_error(fwd(p.x.cview(), w, p.y.view(), p.pre.view(), stray_gate.view(), wv),
                         Errc::kInvalidArgument);
      EXPECT_NE(msg.find("saved_gate is 10 x 12 but must be empty"), std::string::npos) << msg;
      msg = expect_error(
          fwd(p.x.cview(), {w.w1, other_w1.cview(), w.w2}, p.y.view(), p.pre.view(), {}, wv),
          Errc::kInvalidArgument);
      EXPECT_NE(msg.find("weights.w3"), std::string::npos) << msg;
    } else {
      msg = expect_error(
          fwd(p.x.cview(), {w.w1, {}, w.w2}, p.y.view(), p.pre.view(), p.gate.view(), wv),
          Errc::kShapeMismatch);
      EXPECT_NE(msg.find("weights.w3 is 0 x 0, expected 48 x 8"), std::string::npos) << msg;
    }
    // Backward: saved_pre is required, gradient shapes are checked.
    msg = expect_error(
        [&] {
          ffn.backward(p.dy.cview(), p.x.cview(), p.off(), w, {}, p.gate.cview(), p.dx.view(),
                       p.grads(), wv);
        },
        Errc::kShapeMismatch);
    EXPECT_NE(msg.find("saved_pre is 0 x 0, expected 10 x 12"), std::string::npos) << msg;
    msg = expect_error(
        [&] {
          ffn.backward(p.dy.cview(), p.x.cview(), p.off(), w, p.pre.cview(), p.gate.cview(),
                       p.dx.view(), {p.dw1.view(), p.dw3.view(), other_w1.view(), false}, wv);
        },
        Errc::kShapeMismatch);
    EXPECT_NE(msg.find("grads.dw2 is 48 x 9, expected 32 x 12"), std::string::npos) << msg;
    msg = expect_error(
        [&] {
          ffn.backward(short_y.cview(), p.x.cview(), p.off(), w, p.pre.cview(), p.gate.cview(),
                       p.dx.view(), p.grads(), wv);
        },
        Errc::kShapeMismatch);
    EXPECT_NE(msg.find("dy is 9 x 8, expected 10 x 8"), std::string::npos) << msg;
    for (auto [a, b] : {std::pair{&p.y, &base.y},
                        {&p.pre, &base.pre},
                        {&p.gate, &base.gate},
                        {&p.dx, &base.dx},
                        {&p.dw1, &base.dw1},
                        {&p.dw3, &base.dw3},
                        {&p.dw2, &base.dw2}}) {
      EXPECT_TRUE(a->bits_equal(*b)) << "a rejected call wrote an output";
    }
  }
}

}  // namespace
