// LoRA on experts (moekit/cpu/expert_lora.hpp): ExpertLora forward and
// backward against a float64 reference written here (per-expert loops over
// the rows of each expert, textbook activation formulas); the reference
// backward is itself checked against central finite differences of <y, G>.
// Also: every subset of adapted matrices, zero B against ExpertFfn, saved
// rank-R intermediates optional, frozen outputs, accumulate mode, determinism
// and thread counts, empty experts and batches, init, merge / unmerge / safe
// merge, strided views and every bad-input path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "expect_error.hpp"
#include "moekit/core/activation.hpp"
#include "moekit/core/random.hpp"
#include "moekit/cpu/expert_ffn.hpp"
#include "moekit/cpu/expert_lora.hpp"
#include "moekit/cpu/lora.hpp"
#include "routing_reference.hpp"
#include "strided_matrix.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using moekit::Activation;
using moekit::Errc;
using moekit::FfnKind;
using moekit::index_t;
using moekit::LoraInit;
using moekit::LoraSpec;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::to_size;
using moekit::VectorView;
using moekit::cpu::ExpertAdapters;
using moekit::cpu::ExpertFfn;
using moekit::cpu::ExpertLora;
using moekit::cpu::ExpertLoraConfig;
using moekit::cpu::ExpertLoraGrads;
using moekit::cpu::ExpertLoraSaved;
using moekit::cpu::ExpertLoraWeights;
using moekit::cpu::FfnThreading;
using moekit_test::act64;
using moekit_test::act64_grad;
using moekit_test::expect_error;
using moekit_test::rel_error;
using Mat = moekit_test::StridedMatrix;

constexpr Activation kActivations[] = {Activation::kRelu, Activation::kGeluTanh,
                                       Activation::kGeluErf, Activation::kSilu};
constexpr FfnKind kKinds[] = {FfnKind::kPlain, FfnKind::kGated};
constexpr double kTol = 1e-5;

// ---- float64 reference ----------------------------------------------------------

// A dense row-major float64 matrix for the reference.
struct D {
  index_t rows = 0, cols = 0;
  std::vector<double> v;
  D() = default;
  D(index_t r, index_t c) : rows(r), cols(c), v(to_size(r * c), 0.0) {}
  D(index_t r, index_t c, std::vector<double> values) : rows(r), cols(c), v(std::move(values)) {}
  double& operator()(index_t r, index_t c) { return v[to_size(r * cols + c)]; }
  double operator()(index_t r, index_t c) const { return v[to_size(r * cols + c)]; }
  // Rows [r0, r0 + n) as a copy.
  D rows_of(index_t r0, index_t n) const {
    D out(n, cols);
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < cols; ++j) out(i, j) = (*this)(r0 + i, j);
    return out;
  }
  // Adds m into rows [r0, r0 + m.rows).
  void add_rows(index_t r0, const D& m) {
    for (index_t i = 0; i < m.rows; ++i)
      for (index_t j = 0; j < cols; ++j) (*this)(r0 + i, j) += m(i, j);
  }
};

// p q^T
D mul_nt(const D& p, const D& q) {
  D out(p.rows, q.rows);
  for (index_t i = 0; i < p.rows; ++i)
    for (index_t j = 0; j < q.rows; ++j) {
      double s = 0;
      for (index_t k = 0; k < p.cols; ++k) s += p(i, k) * q(j, k);
      out(i, j) = s;
    }
  return out;
}
// p q
D mul_nn(const D& p, const D& q) {
  D out(p.rows, q.cols);
  for (index_t i = 0; i < p.rows; ++i)
    for (index_t k = 0; k < p.cols; ++k)
      for (index_t j = 0; j < q.cols; ++j) out(i, j) += p(i, k) * q(k, j);
  return out;
}
// p^T q
D mul_tn(const D& p, const D& q) {
  D out(p.cols, q.cols);
  for (index_t k = 0; k < p.rows; ++k)
    for (index_t i = 0; i < p.cols; ++i)
      for (index_t j = 0; j < q.cols; ++j) out(i, j) += p(k, i) * q(k, j);
  return out;
}
D axpy(const D& p, double s, const D& q) {  // p + s q
  D out = p;
  for (std::size_t i = 0; i < out.v.size(); ++i) out.v[i] += s * q.v[i];
  return out;
}

struct Dims {
  int experts = 1;
  int rank = 1;
  index_t d = 0, f = 0;
  FfnKind kind = FfnKind::kPlain;
  Activation act = Activation::kRelu;
  std::vector<index_t> offsets{};
  bool on1 = true, on3 = true, on2 = true;  // which matrices have adapters (on3: gated only)
  float alpha = 1.0f;
  bool rslora = false;
  index_t n() const { return offsets.back(); }
  bool gated() const { return kind == FfnKind::kGated; }
  bool has3() const { return gated() && on3; }
  double scale() const {
    return rslora ? alpha / std::sqrt(static_cast<double>(rank)) : double(alpha) / rank;
  }
};

// Inputs of the reference: stacked as in the library, dense.
struct RefIn {
  D x, w1, w3, w2, a1, b1, a3, b3, a2, b2, dy;
};

struct RefOut {
  D y, pre, gate, h1, h3, h2, dx, da1, db1, da3, db3, da2, db2;
};

RefOut reference(const Dims& p, const RefIn& in) {
  const index_t n = p.n(), d = p.d, f = p.f, R = p.rank, E = p.experts;
  const double s = p.scale();
  RefOut r;
  r.y = D(n, d);
  r.pre = D(n, f);
  r.gate = D(p.gated() ? n : 0, f);
  r.h1 = D(p.on1 ? n : 0, R);
  r.h3 = D(p.has3() ? n : 0, R);
  r.h2 = D(p.on2 ? n : 0, R);
  r.dx = D(n, d);
  r.da1 = D(p.on1 ? E * R : 0, d);
  r.db1 = D(p.on1 ? E * f : 0, R);
  r.da3 = D(p.has3() ? E * R : 0, d);
  r.db3 = D(p.has3() ? E * f : 0, R);
  r.da2 = D(p.on2 ? E * R : 0, f);
  r.db2 = D(p.on2 ? E * d : 0, R);
  for (int e = 0; e < p.experts; ++e) {
    const index_t r0 = p.offsets[to_size(e)], ne = p.offsets[to_size(e) + 1] - r0;
    if (ne == 0) continue;
    const D x = in.x.rows_of(r0, ne), dy = in.dy.rows_of(r0, ne);
    const D w1 = in.w1.rows_of(e * f, f), w2 = in.w2.rows_of(e * d, d);
    D a = mul_nt(x, w1), g(ne, f), h1, h3, h2;
    if (p.on1) {
      h1 = mul_nt(x, in.a1.rows_of(e * R, R));
      a = axpy(a, s, mul_nt(h1, in.b1.rows_of(e * f, f)));
      r.h1.add_rows(r0, h1);
    }
    if (p.gated()) {
      g = mul_nt(x, in.w3.rows_of(e * f, f));
      if (p.has3()) {
        h3 = mul_nt(x, in.a3.rows_of(e * R, R));
        g = axpy(g, s, mul_nt(h3, in.b3.rows_of(e * f, f)));
        r.h3.add_rows(r0, h3);
      }
      r.gate.add_rows(r0, g);
    } else {
      for (double& v : g.v) v = 1.0;
    }
    r.pre.add_rows(r0, a);
    D h(ne, f);
    for (std::size_t i = 0; i < h.v.size(); ++i) h.v[i] = act64(p.act, a.v[i]) * g.v[i];
    D y = mul_nt(h, w2);
    if (p.on2) {
      h2 = mul_nt(h, in.a2.rows_of(e * R, R));
      y = axpy(y, s, mul_nt(h2, in.b2.rows_of(e * d, d)));
      r.h2.add_rows(r0, h2);
    }
    r.y.add_rows(r0, y);

    // backward
    D dh = mul_nn(dy, w2);
    if (p.on2) {
      const D b2 = in.b2.rows_of(e * d, d), a2 = in.a2.rows_of(e * R, R);
      D sdb2 = mul_tn(dy, h2);
      for (double& v : sdb2.v) v *= s;
      r.db2.add_rows(e * d, sdb2);
      D dh2 = mul_nn(dy, b2);
      for (double& v : dh2.v) v *= s;
      r.da2.add_rows(e * R, mul_tn(dh2, h));
      dh = axpy(dh, 1.0, mul_nn(dh2, a2));
    }
    D da(ne, f), dg(ne, f);
    for (std::size_t i = 0; i < da.v.size(); ++i) {
      da.v[i] = dh.v[i] * g.v[i] * act64_grad(p.act, a.v[i]);
      dg.v[i] = dh.v[i] * act64(p.act, a.v[i]);
    }
    D dx = mul_nn(da, w1);
    if (p.gated()) dx = axpy(dx, 1.0, mul_nn(dg, in.w3.rows_of(e * f, f)));
    const auto side = [&](const D& t, const D& am, const D& bm, const D& hs, D& dam, D& dbm) {
      D sdb = mul_tn(t, hs);
      for (double& v : sdb.v) v *= s;
      dbm.add_rows(e * f, sdb);
      D dhr = mul_nn(t, bm);
      for (double& v : dhr.v) v *= s;
      dam.add_rows(e * R, mul_tn(dhr, x));
      dx = axpy(dx, 1.0, mul_nn(dhr, am));
    };
    if (p.on1) side(da, in.a1.rows_of(e * R, R), in.b1.rows_of(e * f, f), h1, r.da1, r.db1);
    if (p.has3()) side(dg, in.a3.rows_of(e * R, R), in.b3.rows_of(e * f, f), h3, r.da3, r.db3);
    r.dx.add_rows(r0, dx);
  }
  return r;
}

std::vector<index_t> offsets_of(const std::vector<index_t>& counts) {
  std::vector<index_t> off(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), off.begin() + 1);
  return off;
}

// Uneven loads with empty experts.
std::vector<index_t> uneven_counts(int experts) {
  if (experts == 1) return {53};
  if (experts == 8) return {0, 37, 1, 0, 90, 5, 0, 12};
  std::vector<index_t> c(to_size(experts));
  std::mt19937 rng(static_cast<std::uint32_t>(experts));
  std::uniform_int_distribution<int> count(0, 14);
  for (index_t& v : c) v = count(rng) < 3 ? 0 : count(rng);
  c.front() = 0;
  c.back() = 0;
  c[c.size() / 2] = 1;
  return c;
}

// ---- one problem: inputs and outputs, strided views everywhere ---------------------

struct Problem {
  Dims dims;
  Mat x, w1, w3, w2, a1, b1, a3, b3, a2, b2, dy;                   // inputs
  Mat y, pre, gate, h1, h3, h2, dx, da1, db1, da3, db3, da2, db2;  // outputs
  std::vector<std::byte> ws;

  Problem(Dims p, std::uint32_t seed) : dims(std::move(p)) {
    const index_t n = dims.n(), d = dims.d, f = dims.f, E = dims.experts, R = dims.rank;
    const bool g = dims.gated(), o1 = dims.on1, o3 = dims.has3(), o2 = dims.on2;
    std::mt19937 rng(seed);
    x = Mat(n, d);
    w1 = Mat(E * f, d, 2);
    w3 = Mat(g ? E * f : 0, d, 1);
    w2 = Mat(E * d, f, 2);
    a1 = Mat(o1 ? E * R : 0, d, 1);
    b1 = Mat(o1 ? E * f : 0, R, 2);
    a3 = Mat(o3 ? E * R : 0, d, 2);
    b3 = Mat(o3 ? E * f : 0, R, 1);
    a2 = Mat(o2 ? E * R : 0, f, 1);
    b2 = Mat(o2 ? E * d : 0, R, 3);
    dy = Mat(n, d);
    const float sd = 1.0f / std::sqrt(static_cast<float>(d));
    const float sf = 1.0f / std::sqrt(static_cast<float>(f));
    // B != 0 (a trained adapter), sized so that s B A is comparable to W.
    const float sb = 0.5f / static_cast<float>(dims.scale() * std::sqrt(double(R)));
    x.randomize(rng);
    w1.randomize(rng, sd);
    w3.randomize(rng, sd);
    w2.randomize(rng, sf);
    a1.randomize(rng, sd);
    b1.randomize(rng, sb);
    a3.randomize(rng, sd);
    b3.randomize(rng, sb);
    a2.randomize(rng, sf);
    b2.randomize(rng, sb);
    dy.randomize(rng);
    y = Mat(n, d);
    pre = Mat(n, f);
    gate = Mat(g ? n : 0, f);
    h1 = Mat(o1 ? n : 0, R);
    h3 = Mat(o3 ? n : 0, R);
    h2 = Mat(o2 ? n : 0, R);
    dx = Mat(n, d);
    da1 = Mat(o1 ? E * R : 0, d);
    db1 = Mat(o1 ? E * f : 0, R);
    da3 = Mat(o3 ? E * R : 0, d);
    db3 = Mat(o3 ? E * f : 0, R);
    da2 = Mat(o2 ? E * R : 0, f);
    db2 = Mat(o2 ? E * d : 0, R);
    poison_outputs();
  }

  std::vector<Mat*> mutable_outputs() {
    return {&y, &pre, &gate, &h1, &h3, &h2, &dx, &da1, &db1, &da3, &db3, &da2, &db2};
  }
  std::vector<const Mat*> outputs() const {
    return {&y, &pre, &gate, &h1, &h3, &h2, &dx, &da1, &db1, &da3, &db3, &da2, &db2};
  }
  std::vector<const Mat*> grad_outputs() const { return {&da1, &db1, &da3, &db3, &da2, &db2}; }
  void poison_outputs() {
    for (Mat* m : mutable_outputs()) m->poison();
  }

  ExpertLoraConfig config(FfnThreading t = FfnThreading::kAuto) const {
    return {.d_model = dims.d,
            .d_ff = dims.f,
            .kind = dims.kind,
            .activation = dims.act,
            .alpha = dims.alpha,
            .rslora = dims.rslora,
            .threading = t};
  }
  VectorView<const index_t> off() const {
    return {dims.offsets.data(), static_cast<index_t>(dims.offsets.size())};
  }
  ExpertLoraWeights weights() const {
    return {.base = {w1.cview(), w3.cview(), w2.cview()},
            .lora = {a1.cview(), b1.cview(), a3.cview(), b3.cview(), a2.cview(), b2.cview()}};
  }
  ExpertLoraSaved<float> saved() {
    return {pre.view(), gate.view(), h1.view(), h3.view(), h2.view()};
  }
  ExpertLoraSaved<const float> csaved() const {
    return {pre.cview(), gate.cview(), h1.cview(), h3.cview(), h2.cview()};
  }
  ExpertLoraGrads grads(bool accumulate = false) {
    return {da1.view(), db1.view(), da3.view(), db3.view(), da2.view(), db2.view(), accumulate};
  }
  VectorView<std::byte> workspace(index_t bytes) {
    ws.assign(to_size(bytes), std::byte{0xff});
    return {ws.data(), bytes};
  }
  RefIn ref_in() const {
    const auto dm = [](const Mat& m) { return D(m.rows, m.cols, m.values()); };
    return {dm(x), dm(w1), dm(w3), dm(w2), dm(a1), dm(b1), dm(a3), dm(b3), dm(a2), dm(b2), dm(dy)};
  }
  RefOut ref() const { return reference(dims, ref_in()); }

  template <class S, class L>
  void run(const ExpertLora<S, L>& lora) {
    const VectorView<std::byte> w = workspace(lora.workspace_size(dims.n()));
    lora.forward(x.cview(), off(), weights(), y.view(), saved(), w);
    lora.backward(dy.cview(), x.cview(), off(), weights(), csaved(), dx.view(), grads(), w);
  }
};

struct Errors {
  std::vector<double> e;  // in the order of Problem::outputs
  double worst() const { return *std::max_element(e.begin(), e.end()); }
};

Errors compare(const Problem& p, const RefOut& r) {
  const D* ref[] = {&r.y,   &r.pre, &r.gate, &r.h1,  &r.h3,  &r.h2, &r.dx,
                    &r.da1, &r.db1, &r.da3,  &r.db3, &r.da2, &r.db2};
  const std::vector<const Mat*> got = p.outputs();
  Errors out;
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i]->rows * got[i]->cols, static_cast<index_t>(ref[i]->v.size())) << i;
    out.e.push_back(rel_error(got[i]->values(), ref[i]->v));
  }
  return out;
}

std::string describe(const Errors& err) {
  const char* names[] = {"y",   "pre", "gate", "h1",  "h3",  "h2", "dx",
                         "da1", "db1", "da3",  "db3", "da2", "db2"};
  std::string s;
  for (std::size_t i = 0; i < err.e.size(); ++i) {
    s += std::string(names[i]) + " " + std::to_string(err.e[i]) + " ";
  }
  return s;
}

void expect_all_written(const Problem& p) {
  for (const Mat* m : p.outputs()) {
    EXPECT_FALSE(m->any_nan()) << "an output element was not written";
    EXPECT_TRUE(m->padding_untouched());
  }
}

void expect_bits_equal(const Problem& p, const Problem& q) {
  const std::vector<const Mat*> a = p.outputs(), b = q.outputs();
  for (std::size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(a[i]->bits_equal(*b[i])) << "output " << i;
}

// Expert e's gradient blocks are exactly zero (empty experts, overwrite mode).
void expect_zero_blocks(const Problem& p, int e) {
  const index_t R = p.dims.rank, f = p.dims.f, d = p.dims.d;
  const auto zero = [&](const Mat& m, index_t r0, index_t rows) {
    if (m.rows == 0) return;
    for (index_t r = r0; r < r0 + rows; ++r)
      for (index_t c = 0; c < m.cols; ++c) ASSERT_EQ(m.at(r, c), 0.0f) << "expert " << e;
  };
  zero(p.da1, e * R, R);
  zero(p.db1, e * f, f);
  zero(p.da3, e * R, R);
  zero(p.db3, e * f, f);
  zero(p.da2, e * R, R);
  zero(p.db2, e * d, d);
}

void set_threads([[maybe_unused]] int threads) {
#if defined(_OPENMP)
  omp_set_num_threads(threads);
#endif
}
// ---- forward and backward against the float64 reference ---------------------------

template <int E, int K, int R>
struct Combo {
  using Moe = MoeSpec<E, K>;
  using Lora = LoraSpec<R>;
};

template <class C>
class ExpertLoraTyped : public ::testing::Test {};
using Combos = ::testing::Types<Combo<1, 1, 4>, Combo<8, 2, 8>, Combo<16, 4, 1>>;
TYPED_TEST_SUITE(ExpertLoraTyped, Combos);

TYPED_TEST(ExpertLoraTyped, MatchesFloat64ReferenceDeterministically) {
  using S = typename TypeParam::Moe;
  using L = typename TypeParam::Lora;
  constexpr int E = S::num_experts, R = L::rank;
  const index_t d = 40, f = 72;
  double worst = 0.0;
  for (FfnKind kind : kKinds) {
    for (Activation act : kActivations) {
      SCOPED_TRACE(::testing::Message()
                   << "kind " << static_cast<int>(kind) << " act " << static_cast<int>(act));
      Dims dims{.experts = E,
                .rank = R,
                .d = d,
                .f = f,
                .kind = kind,
                .act = act,
                .offsets = offsets_of(uneven_counts(E)),
                .alpha = 2.0f * R};
      Problem p(dims, 1000u + static_cast<std::uint32_t>(E * 10 + static_cast<int>(act)));
      const RefOut r = p.ref();
      for (FfnThreading t :
           {FfnThreading::kAuto, FfnThreading::kAcrossExperts, FfnThreading::kInsideGemm}) {
        const ExpertLora<S, L> lora(p.config(t));
        p.poison_outputs();
        p.run(lora);
        expect_all_written(p);
        const Errors err = compare(p, r);
        EXPECT_LT(err.worst(), kTol) << describe(err);
        worst = std::max(worst, err.worst());
        for (int e = 0; e < E; ++e) {
          if (p.dims.offsets[to_size(e)] == p.dims.offsets[to_size(e) + 1])
            expect_zero_blocks(p, e);
        }
        Problem again = p;
        again.poison_outputs();
        again.run(lora);
        expect_bits_equal(p, again);
      }
    }
  }
  std::printf("[expert_lora] E = %d R = %d: worst relative error vs float64 %.2e\n", E, R, worst);
}

// Every subset of {W1, W3, W2} adapted, and rsLoRA scaling.
TEST(ExpertLora, AnySubsetOfMatricesMatchesReference) {
  using S = MoeSpec<4, 2>;
  using L = LoraSpec<3>;
  for (FfnKind kind : kKinds) {
    for (int mask = 0; mask < 8; ++mask) {
      if (kind == FfnKind::kPlain && (mask & 2)) continue;
      SCOPED_TRACE(::testing::Message() << "kind " << static_cast<int>(kind) << " mask " << mask);
      Dims dims{.experts = 4,
                .rank = 3,
                .d = 24,
                .f = 36,
                .kind = kind,
                .act = Activation::kGeluErf,
                .offsets = offsets_of({7, 0, 19, 4}),
                .on1 = (mask & 1) != 0,
                .on3 = (mask & 2) != 0,
                .on2 = (mask & 4) != 0,
                .alpha = 5.0f,
                .rslora = (mask & 1) != 0};
      Problem p(dims, 40u + static_cast<std::uint32_t>(mask));
      const ExpertLora<S, L> lora(p.config());
      EXPECT_FLOAT_EQ(lora.scale(), static_cast<float>(dims.scale()));
      p.run(lora);
      expect_all_written(p);
      const Errors err = compare(p, p.ref());
      EXPECT_LT(err.worst(), kTol) << describe(err);
    }
  }
}

TEST(ExpertLora, AllBlocksOnOneExpertAndManyRows) {
  using S = MoeSpec<8, 2>;
  using L = LoraSpec<8>;
  for (FfnKind kind : kKinds) {
    Dims dims{.experts = 8,
              .rank = 8,
              .d = 32,
              .f = 48,
              .kind = kind,
              .act = Activation::kSilu,
              .offsets = offsets_of({0, 0, 0, 300, 0, 0, 0, 0}),
              .alpha = 16.0f};
    Problem p(dims, 77u);
    p.run(ExpertLora<S, L>(p.config()));
    expect_all_written(p);
    const Errors err = compare(p, p.ref());
    EXPECT_LT(err.worst(), kTol) << describe(err);
  }
}

// ---- against ExpertFfn -------------------------------------------------------------

// With B = 0 (as init leaves it) or with no adapters at all, the output, the
// saved activations and dx are ExpertFfn's: every adapter term adds an exact
// zero, or is not computed. ExpertFfn now runs its products on the GEMM
// engine and ExpertLora still on Eigen, so the two agree to rounding (1e-6
// relative); bit for bit again once LoRA's base products move to the engine.
TEST(ExpertLora, ZeroBOrNoAdapterEqualsExpertFfn) {
  using S = MoeSpec<8, 2>;
  using L = LoraSpec<4>;
  for (FfnKind kind : kKinds) {
    for (bool no_adapters : {false, true}) {
      SCOPED_TRACE(::testing::Message()
                   << "kind " << static_cast<int>(kind) << " no adapters " << no_adapters);
      Dims dims{.experts = 8,
                .rank = 4,
                .d = 24,
                .f = 40,
                .kind = kind,
                .act = Activation::kGeluTanh,
                .offsets = offsets_of(uneven_counts(8)),
                .on1 = !no_adapters,
                .on3 = !no_adapters,
                .on2 = !no_adapters,
                .alpha = 8.0f};
      Problem p(dims, 3u);
      const ExpertLora<S, L> lora(p.config());
      if (!no_adapters) {
        lora.init({p.a1.view(), p.b1.view(), p.a3.view(), p.b3.view(), p.a2.view(), p.b2.view()},
                  {.seed = 9});
      }
      p.run(lora);

      const ExpertFfn<S> ffn(lora.ffn_config());
      Mat y(p.dims.n(), p.dims.d), pre(p.dims.n(), p.dims.f), gate(p.gate.rows, p.dims.f),
          dx(p.dims.n(), p.dims.d);
      std::vector<std::byte> ws(to_size(ffn.workspace_size(p.dims.n())));
      const VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
      const moekit::cpu::ExpertWeights w{p.w1.cview(), p.w3.cview(), p.w2.cview()};
      ffn.forward(p.x.cview(), p.off(), w, y.view(), pre.view(), gate.view(), wv);
      ffn.backward(p.dy.cview(), p.x.cview(), p.off(), w, pre.cview(), gate.cview(), dx.view(), {},
                   wv);
      EXPECT_LT(rel_error(y.values(), p.y.values()), 1e-6);
      EXPECT_LT(rel_error(pre.values(), p.pre.values()), 1e-6);
      EXPECT_LT(rel_error(gate.values(), p.gate.values()), 1e-6);
      EXPECT_LT(rel_error(dx.values(), p.dx.values()), 1e-6);
      // B = 0: dA = 0 exactly, dB carries the whole first-step signal.
      if (!no_adapters) {
        for (const Mat* m : {&p.da1, &p.da3, &p.da2})
          for (double v : m->values()) ASSERT_EQ(v, 0.0);
        for (const Mat* m : {&p.db1, &p.db2}) {
          double norm = 0;
          for (double v : m->values()) norm += v * v;
          EXPECT_GT(norm, 0.0);
        }
      }
    }
  }
}

// ---- finite differences ----------------------------------------------------------------

double loss(const Dims& p, const RefIn& in) {
  const RefOut r = reference(p, in);
  double s = 0;
  for (std::size_t i = 0; i < r.y.v.size(); ++i) s += r.y.v[i] * in.dy.v[i];
  return s;
}

TEST(ExpertLora, GradientsMatchCentralDifferences) {
  using S = MoeSpec<3, 1>;
  using L = LoraSpec<2>;
  double worst_lib = 0.0, worst_ref = 0.0;
  for (FfnKind kind : kKinds) {
    for (Activation act : kActivations) {
      SCOPED_TRACE(::testing::Message()
                   << "kind " << static_cast<int>(kind) << " act " << static_cast<int>(act));
      Dims dims{.experts = 3,
                .rank = 2,
                .d = 4,
                .f = 5,
                .kind = kind,
                .act = act,
                .offsets = offsets_of({2, 0, 3}),
                .alpha = 3.0f};
      Problem p(dims, 99u + static_cast<std::uint32_t>(act));
      p.run(ExpertLora<S, L>(p.config()));
      expect_all_written(p);
      const RefOut r = p.ref();
      RefIn in = p.ref_in();
      const double h = 1e-6;
      const auto fd = [&](D& m) {
        std::vector<double> out(m.v.size());
        for (std::size_t i = 0; i < m.v.size(); ++i) {
          const double keep = m.v[i];
          m.v[i] = keep + h;
          const double up = loss(dims, in);
          m.v[i] = keep - h;
          const double down = loss(dims, in);
          m.v[i] = keep;
          out[i] = (up - down) / (2 * h);
        }
        return out;
      };
      const std::pair<D*, std::pair<const Mat*, const D*>> checks[] = {
          {&in.x, {&p.dx, &r.dx}},    {&in.a1, {&p.da1, &r.da1}}, {&in.b1, {&p.db1, &r.db1}},
          {&in.a3, {&p.da3, &r.da3}}, {&in.b3, {&p.db3, &r.db3}}, {&in.a2, {&p.da2, &r.da2}},
          {&in.b2, {&p.db2, &r.db2}}};
      int k = 0;
      for (const auto& [param, out] : checks) {
        SCOPED_TRACE(k++);
        const std::vector<double> num = fd(*param);
        const double lib = rel_error(out.first->values(), num);
        const double ref = rel_error(out.second->v, num);
        EXPECT_LT(lib, kTol);
        EXPECT_LT(ref, 1e-7);
        worst_lib = std::max(worst_lib, lib);
        worst_ref = std::max(worst_ref, ref);
      }
    }
  }
  std::printf("[expert_lora] vs central differences: library %.2e, float64 reference %.2e\n",
              worst_lib, worst_ref);
}

// ---- saved state, frozen outputs, accumulate ------------------------------------------

TEST(ExpertLora, RankIntermediatesAreOptionalAndInferenceNeedsNoSaves) {
  using S = MoeSpec<8, 2>;
  using L = LoraSpec<4>;
  for (FfnKind kind : kKinds) {
    SCOPED_TRACE(static_cast<int>(kind));
    Dims dims{.experts = 8,
              .rank = 4,
              .d = 24,
              .f = 40,
              .kind = kind,
              .act = Activation::kSilu,
              .offsets = offsets_of(uneven_counts(8)),
              .alpha = 8.0f};
    Problem full(dims, 5u);
    const ExpertLora<S, L> lora(full.config());
    full.run(lora);

    // Inference: nothing saved, same output bits.
    Problem p = full;
    p.poison_outputs();
    const VectorView<std::byte> w = p.workspace(lora.workspace_size(p.dims.n()));
    lora.forward(p.x.cview(), p.off(), p.weights(), p.y.view(), {}, w);
    EXPECT_TRUE(p.y.bits_equal(full.y));
    for (const Mat* m : {&p.pre, &p.gate, &p.h1, &p.h3, &p.h2}) {
      if (m->rows > 0) {
        EXPECT_TRUE(m->any_nan()) << "an unsaved view was written";
      }
    }

    // Backward without h1 / h3 / h2: recomputed, same gradient bits.
    p = full;
    for (Mat* m : {&p.dx, &p.da1, &p.db1, &p.da3, &p.db3, &p.da2, &p.db2}) m->poison();
    lora.backward(p.dy.cview(), p.x.cview(), p.off(), p.weights(),
                  {.pre = full.pre.cview(), .gate = full.gate.cview()}, p.dx.view(), p.grads(), w);
    expect_bits_equal(p, full);
  }
}

TEST(ExpertLora, FrozenOutputsAreUntouchedAndPartsMatchTheFullRun) {
  using S = MoeSpec<4, 2>;
  using L = LoraSpec<2>;
  for (FfnKind kind : kKinds) {
    Dims dims{.experts = 4,
              .rank = 2,
              .d = 12,
              .f = 20,
              .kind = kind,
              .act = Activation::kGeluErf,
              .offsets = offsets_of({5, 0, 9, 3}),
              .alpha = 4.0f};
    Problem full(dims, 11u);
    const ExpertLora<S, L> lora(full.config());
    full.run(lora);
    const std::vector<double> w1 = full.w1.values(), w3 = full.w3.values(), w2 = full.w2.values();
    // Every subset of the 7 gradient outputs, with and without the saved
    // rank-R intermediates; the unwanted outputs are empty views onto
    // poisoned memory, which must stay poisoned.
    for (int run = 0; run < 256; ++run) {
      const int mask = run & 127;
      const bool with_h = run < 128;
      if (!full.dims.gated() && (mask & (8 | 16))) continue;
      SCOPED_TRACE(::testing::Message() << "kind " << static_cast<int>(kind) << " mask " << mask
                                        << " saved h " << with_h);
      Problem p = full;
      for (Mat* m : {&p.dx, &p.da1, &p.db1, &p.da3, &p.db3, &p.da2, &p.db2}) m->poison();
      Mat* outs[7] = {&p.dx, &p.da1, &p.db1, &p.da3, &p.db3, &p.da2, &p.db2};
      const Mat* exp[7] = {&full.dx,  &full.da1, &full.db1, &full.da3,
                           &full.db3, &full.da2, &full.db2};
      MatrixView<float> v[7];
      for (int i = 0; i < 7; ++i)
        v[i] = (mask >> i) & 1 ? outs[i]->view() : MatrixView<float>(outs[i]->data.data(), 0, 0);
      const VectorView<std::byte> w = p.workspace(lora.workspace_size(p.dims.n()));
      ExpertLoraSaved<const float> sv = full.csaved();
      if (!with_h) sv.h1 = sv.h3 = sv.h2 = {};
      lora.backward(p.dy.cview(), p.x.cview(), p.off(), p.weights(), sv, v[0],
                    {v[1], v[2], v[3], v[4], v[5], v[6], false}, w);
      for (int i = 0; i < 7; ++i) {
        if ((mask >> i) & 1) {
          EXPECT_TRUE(outs[i]->bits_equal(*exp[i])) << "output " << i;
        } else {
          Mat poisoned = *outs[i];
          poisoned.poison();
          EXPECT_TRUE(outs[i]->bits_equal(poisoned)) << "frozen output " << i << " was written";
        }
      }
      // The frozen base weights are inputs only.
      EXPECT_EQ(p.w1.values(), w1);
      EXPECT_EQ(p.w3.values(), w3);
      EXPECT_EQ(p.w2.values(), w2);
    }
  }
}

TEST(ExpertLora, AccumulateAddsToTheOldGradients) {
  using S = MoeSpec<8, 2>;
  using L = LoraSpec<4>;
  for (FfnKind kind : kKinds) {
    SCOPED_TRACE(static_cast<int>(kind));
    Dims dims{.experts = 8,
              .rank = 4,
              .d = 24,
              .f = 40,
              .kind = kind,
              .act = Activation::kRelu,
              .offsets = offsets_of(uneven_counts(8)),
              .alpha = 8.0f};
    Problem p(dims, 21u);
    const ExpertLora<S, L> lora(p.config());
    p.run(lora);  // overwrite: the new gradients
    Problem q = p;
    std::mt19937 rng(3);
    for (Mat* m : {&q.da1, &q.db1, &q.da3, &q.db3, &q.da2, &q.db2}) m->randomize(rng);
    const Problem old = q;
    const VectorView<std::byte> w = q.workspace(lora.workspace_size(q.dims.n()));
    lora.backward(q.dy.cview(), q.x.cview(), q.off(), q.weights(), p.csaved(), {},
                  q.grads(/*accumulate=*/true), w);
    const std::vector<const Mat*> got = q.grad_outputs(), was = old.grad_outputs(),
                                  add = p.grad_outputs();
    for (std::size_t i = 0; i < got.size(); ++i) {
      EXPECT_TRUE(got[i]->padding_untouched());
      double worst = 0.0;
      for (index_t r = 0; r < got[i]->rows; ++r) {
        for (index_t c = 0; c < got[i]->cols; ++c) {
          const double expect = double(was[i]->at(r, c)) + add[i]->at(r, c);
          const double scale =
              std::abs(double(was[i]->at(r, c))) + std::abs(double(add[i]->at(r, c)));
          worst = std::max(worst, std::abs(got[i]->at(r, c) - expect) / std::max(scale, 1e-30));
        }
      }
      EXPECT_LT(worst, 1e-6) << "gradient " << i;
    }
    // Empty experts' blocks are unchanged, bit for bit (all other blocks
    // differ from the old values).
    const index_t R = 4, f = 40, d = 24;
    for (int e = 0; e < 8; ++e) {
      const bool empty = q.dims.offsets[to_size(e)] == q.dims.offsets[to_size(e) + 1];
      const auto same = [&](const Mat& a, const Mat& b, index_t r0, index_t rows) {
        bool eq = true;
        for (index_t r = r0; r < r0 + rows; ++r)
          for (index_t c = 0; c < a.cols; ++c) eq = eq && a.at(r, c) == b.at(r, c);
        return eq;
      };
      EXPECT_EQ(same(q.db1, old.db1, e * f, f), empty) << e;
      EXPECT_EQ(same(q.da2, old.da2, e * R, R), empty) << e;
      EXPECT_EQ(same(q.db2, old.db2, e * d, d), empty) << e;
      if (empty) {
        EXPECT_TRUE(same(q.da1, old.da1, e * R, R));
      }
    }
  }
}

TEST(ExpertLora, OneAndTwoThreadsAgree) {
  using S = MoeSpec<8, 2>;
  using L = LoraSpec<8>;
  const int saved = moekit::cpu::max_threads();
  for (FfnKind kind : kKinds) {
    for (FfnThreading t :
         {FfnThreading::kAuto, FfnThreading::kAcrossExperts, FfnThreading::kInsideGemm}) {
      SCOPED_TRACE(::testing::Message()
                   << "kind " << static_cast<int>(kind) << " threading " << static_cast<int>(t));
      Dims dims{.experts = 8,
                .rank = 8,
                .d = 64,
                .f = 128,
                .kind = kind,
                .act = Activation::kSilu,
                .offsets = offsets_of({0, 137, 9, 0, 260, 31, 0, 64}),
                .alpha = 16.0f};
      Problem one(dims, 8u);
      Problem two = one;
      const ExpertLora<S, L> lora(one.config(t));
      set_threads(1);
      one.run(lora);
      set_threads(2);
      two.run(lora);
      Problem again = one;
      again.poison_outputs();
      again.run(lora);
      set_threads(saved);
      expect_bits_equal(two, again);  // reruns at 2 threads: bit-identical
      const std::vector<const Mat*> a = one.outputs(), b = two.outputs();
      for (std::size_t i = 0; i < a.size(); ++i) {
        EXPECT_LT(rel_error(a[i]->values(), b[i]->values()), 1e-6) << "output " << i;
      }
    }
  }
}

TEST(ExpertLora, EmptyBatch) {
  using S = MoeSpec<8, 2>;
  using L = LoraSpec<2>;
  for (FfnKind kind : kKinds) {
    Dims dims{.experts = 8,
              .rank = 2,
              .d = 16,
              .f = 24,
              .kind = kind,
              .act = Activation::kRelu,
              .offsets = offsets_of(std::vector<index_t>(8, 0))};
    Problem p(dims, 1u);
    const ExpertLora<S, L> lora(p.config());
    EXPECT_EQ(lora.workspace_size(0), 0);
    lora.forward(p.x.cview(), p.off(), p.weights(), p.y.view(), p.saved(), {});
    lora.backward(p.dy.cview(), p.x.cview(), p.off(), p.weights(), p.csaved(), p.dx.view(),
                  p.grads(), {});
    for (const Mat* m : p.grad_outputs()) {
      for (double v : m->values()) ASSERT_EQ(v, 0.0);
      EXPECT_TRUE(m->padding_untouched());
    }
    p.poison_outputs();
    lora.backward(p.dy.cview(), p.x.cview(), p.off(), p.weights(), p.csaved(), p.dx.view(),
                  p.grads(/*accumulate=*/true), {});
    for (const Mat* m : p.grad_outputs()) {
      for (double v : m->values()) ASSERT_TRUE(std::isnan(v));
    }
  }
}

// ---- init and merge -------------------------------------------------------------------

TEST(ExpertLora, InitMatchesLoraBankPerMatrixAndZeroesB) {
  using S = MoeSpec<4, 2>;
  using L = LoraSpec<3>;
  constexpr index_t E = 4, R = 3, d = 10, f = 14;
  for (LoraInit kind : {LoraInit::kKaimingUniform, LoraInit::kGaussian}) {
    SCOPED_TRACE(static_cast<int>(kind));
    Dims dims{.experts = 4,
              .rank = 3,
              .d = d,
              .f = f,
              .kind = FfnKind::kGated,
              .offsets = offsets_of({1, 1, 1, 1})};
    Problem p(dims, 2u);
    const ExpertLora<S, L> lora(p.config());
    const moekit::cpu::LoraInitConfig ic{.kind = kind, .seed = 1234};
    lora.init({p.a1.view(), p.b1.view(), p.a3.view(), p.b3.view(), p.a2.view(), p.b2.view()}, ic);
    for (const Mat* m : {&p.b1, &p.b3, &p.b2}) {
      for (double v : m->values()) ASSERT_EQ(v, 0.0);
      EXPECT_TRUE(m->padding_untouched());
    }
    // Matrix m draws as a LoraBank with N = E and seed random_bits(seed, m).
    const auto bank_a = [&](index_t d_in, index_t d_out, std::uint64_t m) {
      const moekit::cpu::LoraBank<L> bank({.d_in = d_in, .d_out = d_out, .num_adapters = E});
      Mat a(E * R, d_in), b(E * d_out, R);
      moekit::cpu::LoraInitConfig c = ic;
      c.seed = moekit::random_bits(ic.seed, m);
      bank.init(a.view(), b.view(), c);
      return a.values();
    };
    EXPECT_EQ(p.a1.values(), bank_a(d, f, 1));
    EXPECT_EQ(p.a3.values(), bank_a(d, f, 3));
    EXPECT_EQ(p.a2.values(), bank_a(f, d, 2));
    EXPECT_NE(p.a1.values(), p.a3.values());
    EXPECT_TRUE(p.a1.padding_untouched());

    // A bad init config writes nothing.
    Problem q(dims, 2u);
    const std::vector<double> before = q.a1.values();
    const std::string msg = expect_error(
        [&] {
          lora.init({q.a1.view(), q.b1.view(), q.a3.view(), q.b3.view(), q.a2.view(), q.b2.view()},
                    {.kind = kind, .stddev = -1.0f});
        },
        Errc::kInvalidArgument);
    EXPECT_NE(msg.find("init.stddev = -1"), std::string::npos) << msg;
    EXPECT_EQ(q.a1.values(), before);
  }
}

TEST(ExpertLora, MergeMatchesAdaptersAndUnmergeRestoresW) {
  using S = MoeSpec<4, 2>;
  using L = LoraSpec<4>;
  for (FfnKind kind : kKinds) {
    SCOPED_TRACE(static_cast<int>(kind));
    Dims dims{.experts = 4,
              .rank = 4,
              .d = 24,
              .f = 32,
              .kind = kind,
              .act = Activation::kSilu,
              .offsets = offsets_of({6, 11, 0, 8}),
              .on2 = false,  // merge skips a matrix without adapter
              .alpha = 8.0f};
    Problem p(dims, 31u);
    const ExpertLora<S, L> lora(p.config());
    p.run(lora);
    const ExpertAdapters<const float> ad = p.weights().lora;

    // Merge every expert, then the frozen FFN alone gives the adapted output.
    Mat w1 = p.w1, w3 = p.w3, w2 = p.w2;
    for (index_t e = 0; e < 4; ++e) lora.merge(e, w1.view(), w3.view(), w2.view(), ad);
    EXPECT_TRUE(w2.bits_equal(p.w2));
    const ExpertFfn<S> ffn(lora.ffn_config());
    Mat y(p.dims.n(), p.dims.d);
    std::vector<std::byte> ws(to_size(ffn.workspace_size(p.dims.n())));
    ffn.forward(p.x.cview(), p.off(), {w1.cview(), w3.cview(), w2.cview()}, y.view(), {}, {},
                {ws.data(), static_cast<index_t>(ws.size())});
    EXPECT_LT(rel_error(y.values(), p.y.values()), 1e-5);

    for (index_t e = 0; e < 4; ++e) lora.unmerge(e, w1.view(), w3.view(), w2.view(), ad);
    for (auto [m, orig] : {std::pair{&w1, &p.w1}, {&w3, &p.w3}}) {
      double worst = 0.0;
      const std::vector<double> a = m->values(), b = orig->values();
      for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
      EXPECT_LT(worst, 1e-6);
      EXPECT_TRUE(m->padding_untouched());
    }

    // One expert only: the other experts' blocks keep their bits.
    Mat one = p.w1;
    Mat one3 = p.w3;
    lora.safe_merge(2, one.view(), one3.view(), w2.view(), ad);
    for (index_t r = 0; r < one.rows; ++r) {
      const bool in2 = r >= 2 * 32 && r < 3 * 32;
      bool same = true;
      for (index_t c = 0; c < one.cols; ++c) same = same && one.at(r, c) == p.w1.at(r, c);
      EXPECT_EQ(same, !in2) << "row " << r;
    }
  }
}

TEST(ExpertLora, SafeMergeRefusesNonFiniteAndLeavesEveryWeightUntouched) {
  using S = MoeSpec<2, 1>;
  using L = LoraSpec<2>;
  Dims dims{.experts = 2,
            .rank = 2,
            .d = 8,
            .f = 12,
            .kind = FfnKind::kGated,
            .offsets = offsets_of({1, 1}),
            .alpha = 2.0f};
  Problem p(dims, 4u);
  const ExpertLora<S, L> lora(p.config());
  p.b2.at(1 * 8 + 3, 1) = std::numeric_limits<float>::infinity();  // expert 1, W2 row 3
  Mat w1 = p.w1, w3 = p.w3, w2 = p.w2;
  const std::string msg =
      expect_error([&] { lora.safe_merge(1, w1.view(), w3.view(), w2.view(), p.weights().lora); },
                   Errc::kNonFinite);
  EXPECT_NE(msg.find("merged w(3, "), std::string::npos) << msg;
  EXPECT_TRUE(w1.bits_equal(p.w1));  // W1 and W3 would have merged fine: still untouched
  EXPECT_TRUE(w3.bits_equal(p.w3));
  EXPECT_TRUE(w2.bits_equal(p.w2));
  // Expert 0 is finite and merges.
  lora.safe_merge(0, w1.view(), w3.view(), w2.view(), p.weights().lora);
  EXPECT_FALSE(w1.bits_equal(p.w1));
  const std::string range = expect_error(
      [&] { lora.merge(2, w1.view(), w3.view(), w2.view(), p.weights().lora); }, Errc::kOutOfRange);
  EXPECT_NE(range.find("expert = 2 is outside [0, 2)"), std::string::npos) << range;
}

// ---- bad input ---------------------------------------------------------------------------

TEST(ExpertLora, RejectsBadConfig) {
  using S = MoeSpec<4, 2>;
  using L = LoraSpec<2>;
  const auto make = [](ExpertLoraConfig c) { return [c] { ExpertLora<S, L> lora(c); }; };
  const ExpertLoraConfig good{.d_model = 8, .d_ff = 16};
  EXPECT_NO_THROW(make(good)());
  ExpertLoraConfig c = good;
  c.d_ff = 0;
  EXPECT_NE(expect_error(make(c), Errc::kInvalidArgument).find("d_ff = 0"), std::string::npos);
  c = good;
  c.activation = static_cast<Activation>(9);
  EXPECT_NE(expect_error(make(c), Errc::kInvalidArgument).find("activation = 9"),
            std::string::npos);
  c = good;
  c.alpha = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NE(expect_error(make(c), Errc::kInvalidArgument).find("alpha = nan"), std::string::npos);
}

TEST(ExpertLora, RejectsBadInputAndWritesNothing) {
  using S = MoeSpec<4, 2>;
  using L = LoraSpec<2>;
  for (FfnKind kind : kKinds) {
    SCOPED_TRACE(static_cast<int>(kind));
    Dims dims{.experts = 4,
              .rank = 2,
              .d = 8,
              .f = 12,
              .kind = kind,
              .act = Activation::kSilu,
              .offsets = offsets_of({3, 0, 5, 2})};
    const Problem base(dims, 8u);
    const ExpertLora<S, L> lora(base.config());
    const index_t ws_bytes = lora.workspace_size(base.dims.n());

    // Each case mutates a fresh copy (offsets, workspace, weights, saved,
    // grads) and calls forward and backward, which must both fail.
    struct Args {
      Problem p;
      std::vector<index_t> off;
      std::vector<std::byte> ws;
      ExpertLoraWeights w;
      ExpertLoraSaved<float> saved;
      ExpertLoraGrads grads;
      MatrixView<float> dx;
    };
    Mat rank3_a(4 * 3, 8), rank3_b(4 * 12, 3), wide_a(4 * 2, 9), stray(10, 2), short_dx(9, 8);
    struct Case {
      const char* what;
      Errc code;
      const char* message;
      bool forward_too;  // false: only backward takes the bad argument
      std::function<void(Args&)> mutate;
    };
    const std::vector<Case> cases = {
        {"offsets[0]", Errc::kInvalidArgument, "offsets[0] = 1", true,
         [](Args& a) { a.off[0] = 1; }},
        {"not a scan", Errc::kInvalidArgument, "offsets decreases: offsets[1] = 3 > offsets[2] = 1",
         true, [](Args& a) { a.off[2] = 1; }},
        {"offsets[E] != N", Errc::kShapeMismatch, "offsets[4] = 11 but buffer has 10 rows", true,
         [](Args& a) { a.off[4] = 11; }},
        {"offsets size", Errc::kShapeMismatch, "offsets has 4 elements, expected 5", true,
         [](Args& a) { a.off.pop_back(); }},
        {"workspace small", Errc::kShapeMismatch, "workspace has", true,
         [](Args& a) { a.ws.pop_back(); }},
        {"rank of A", Errc::kShapeMismatch, "weights.lora.a1 has 12 rows, expected 8 (rank R = 2)",
         true, [&](Args& a) { a.w.lora.a1 = rank3_a.cview(); }},
        {"rank of B", Errc::kShapeMismatch,
         "weights.lora.b1 has 3 columns, expected the rank R = 2", true,
         [&](Args& a) { a.w.lora.b1 = rank3_b.cview(); }},
        {"d of A", Errc::kShapeMismatch, "weights.lora.a1 is 8 x 9, expected 8 x 8", true,
         [&](Args& a) { a.w.lora.a1 = wide_a.cview(); }},
        {"A without B", Errc::kInvalidArgument,
         "weights.lora.a2 is given but weights.lora.b2 is empty", true,
         [](Args& a) { a.w.lora.b2 = {}; }},
        {"base w2", Errc::kShapeMismatch, "weights.base.w2 is 0 x 0, expected 32 x 12", true,
         [](Args& a) { a.w.base.w2 = {}; }},
        {"saved h1 rows", Errc::kShapeMismatch, "saved.h1 is 9 x 2, expected 10 x 2", true,
         [&](Args& a) { a.saved.h1 = a.saved.h1.middle_rows(0, 9); }},
        {"saved h of absent adapter", Errc::kInvalidArgument,
         "saved.h2 is 10 x 2 but must be empty (W2 has no adapter)", true,
         [&](Args& a) {
           a.w.lora.a2 = {};
           a.w.lora.b2 = {};
           a.grads.da2 = {};
           a.grads.db2 = {};
           a.saved.h2 = stray.view();
         }},
        {"grads of absent adapter", Errc::kInvalidArgument,
         "grads.db1 is 48 x 2 but must be empty (W1 has no adapter)", false,
         [&](Args& a) {
           a.w.lora.a1 = {};
           a.w.lora.b1 = {};
           a.saved.h1 = {};
           a.grads.da1 = {};
         }},
        {"grads rank", Errc::kShapeMismatch, "grads.da2 has 12 rows, expected 8 (rank R = 2)",
         false, [&](Args& a) { a.grads.da2 = rank3_a.view(); }},
        {"dx shape", Errc::kShapeMismatch, "dx is 9 x 8, expected 10 x 8", false,
         [&](Args& a) { a.dx = short_dx.view(); }},
    };
    for (const Case& c : cases) {
      SCOPED_TRACE(c.what);
      Args a{base, base.dims.offsets, std::vector<std::byte>(to_size(ws_bytes)), {}, {}, {}, {}};
      a.w = a.p.weights();
      a.saved = a.p.saved();
      a.grads = a.p.grads();
      a.dx = a.p.dx.view();
      c.mutate(a);
      const VectorView<const index_t> ov(a.off.data(), static_cast<index_t>(a.off.size()));
      const VectorView<std::byte> wv(a.ws.data(), static_cast<index_t>(a.ws.size()));
      if (c.forward_too) {
        const std::string m1 = expect_error(
            [&] { lora.forward(a.p.x.cview(), ov, a.w, a.p.y.view(), a.saved, wv); }, c.code);
        EXPECT_NE(m1.find(c.message), std::string::npos) << m1;
      }
      const std::string m2 = expect_error(
          [&] {
            lora.backward(a.p.dy.cview(), a.p.x.cview(), ov, a.w, a.saved, a.dx, a.grads, wv);
          },
          c.code);
      EXPECT_NE(m2.find(c.message), std::string::npos) << m2;
      for (std::size_t i = 0; i < base.outputs().size(); ++i) {
        EXPECT_TRUE(a.p.outputs()[i]->bits_equal(*base.outputs()[i]))
            << "a rejected call wrote output " << i;
      }
    }

    // kPlain has no W3 (adapters, saved gate); kGated needs the saved gate.
    Problem p = base;
    std::vector<std::byte> ws(to_size(ws_bytes));
    const VectorView<std::byte> wv(ws.data(), ws_bytes);
    std::string msg;
    if (kind == FfnKind::kPlain) {
      ExpertLoraWeights w = p.weights();
      w.lora.a3 = rank3_a.cview();
      msg = expect_error([&] { lora.forward(p.x.cview(), p.off(), w, p.y.view(), p.saved(), wv); },
                         Errc::kInvalidArgument);
      EXPECT_NE(msg.find("weights.lora.a3 is 12 x 8 but must be empty (FfnKind::kPlain has no W3)"),
                std::string::npos)
          << msg;
    } else {
      ExpertLoraSaved<const float> sv = p.csaved();
      sv.gate = {};
      msg = expect_error(
          [&] {
            lora.backward(p.dy.cview(), p.x.cview(), p.off(), p.weights(), sv, p.dx.view(),
                          p.grads(), wv);
          },
          Errc::kShapeMismatch);
      EXPECT_NE(msg.find("saved.gate is 0 x 0, expected 10 x 12"), std::string::npos) << msg;
    }
    msg = expect_error(
        [&] {
          lora.backward(p.dy.cview(), p.x.cview(), p.off(), p.weights(), {}, p.dx.view(), p.grads(),
                        wv);
        },
        Errc::kShapeMismatch);
    EXPECT_NE(msg.find("saved.pre is 0 x 0, expected 10 x 12"), std::string::npos) << msg;
    std::vector<std::byte> big(to_size(ws_bytes) + 8);
    msg = expect_error(
        [&] {
          lora.forward(p.x.cview(), p.off(), p.weights(), p.y.view(), p.saved(),
                       VectorView<std::byte>(big.data() + 1, ws_bytes));
        },
        Errc::kInvalidArgument);
    EXPECT_NE(msg.find("not aligned"), std::string::npos) << msg;
    for (std::size_t i = 0; i < base.outputs().size(); ++i) {
      EXPECT_TRUE(p.outputs()[i]->bits_equal(*base.outputs()[i]))
          << "a rejected call wrote output " << i;
    }
  }
}

}  // namespace
