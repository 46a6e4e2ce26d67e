// LoRA adapters (moekit/cpu/lora.hpp): LoraLinear and LoraBank, forward and
// backward, against a float64 reference written here (per-row loops over each
// row's adapter, the dropout mask rebuilt from the contract in
// moekit/core/lora.hpp). The reference backward is itself checked against
// central finite differences of <y, G>. Also: initialisation, dropout
// reproducibility, rsLoRA scaling, merge / unmerge / safe merge, a bank
// against each adapter run on its own, frozen and accumulated gradients,
// strided views, empty batches and every bad-input path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "expect_error.hpp"
#include "gemm_reference.hpp"
#include "moekit/core/lora.hpp"
#include "moekit/cpu/lora.hpp"
#include "routing_reference.hpp"
#include "strided_matrix.hpp"

namespace {

using moekit::Errc;
using moekit::index_t;
using moekit::LoraInit;
using moekit::LoraSpec;
using moekit::MatrixView;
using moekit::to_size;
using moekit::VectorView;
using moekit::cpu::LoraBank;
using moekit::cpu::LoraConfig;
using moekit::cpu::LoraGrads;
using moekit::cpu::LoraInitConfig;
using moekit::cpu::LoraLinear;
using moekit::cpu::LoraRows;
using moekit::cpu::LoraStep;
using moekit::cpu::LoraWeights;
using moekit_test::expect_error;
using moekit_test::rel_error;
using Mat = moekit_test::StridedMatrix;

constexpr double kTol = 2e-6;

// ---- float64 reference ------------------------------------------------------------

// Dropout factor of element (t, j) of adapter `adapter` (0 for a
// LoraLinear) of dropout stream `stream`, by the documented contract.
double mask_factor(const LoraStep& st, float p, index_t d_in, index_t t, index_t j,
                   std::uint64_t stream, int adapter) {
  if (!st.training || p == 0.0f) return 1.0;
  const std::uint64_t key =
      moekit::lora_dropout_key(st.seed, st.step, stream, static_cast<std::uint64_t>(adapter));
  return moekit::lora_dropout_keep(key, p, static_cast<std::uint64_t>(t * d_in + j))
             ? 1.0 / (1.0 - static_cast<double>(p))
             : 0.0;
}

struct Dims {
  index_t n, d_in, d_out;
  int rank;
  index_t adapters;
};

struct RefOut {
  std::vector<double> y, h, dx, da, db;
};

// ids[t] in [-1, N); w empty: no base term (the bank's "add" mode).
RefOut reference(const Dims& p, const std::vector<int>& ids, const std::vector<double>& x,
                 const std::vector<double>& w, const std::vector<double>& bias,
                 const std::vector<double>& a, const std::vector<double>& b,
                 const std::vector<double>& g, double s, const LoraStep& st, float drop,
                 std::uint64_t stream = 0) {
  const index_t n = p.n, di = p.d_in, dout = p.d_out, R = p.rank;
  RefOut r;
  r.y.assign(to_size(n * dout), 0.0);
  r.h.assign(to_size(n * R), 0.0);
  r.dx.assign(to_size(n * di), 0.0);
  r.da.assign(to_size(p.adapters * R * di), 0.0);
  r.db.assign(to_size(p.adapters * dout * R), 0.0);
  std::vector<double> xd(to_size(di)), dh(to_size(R));
  for (index_t t = 0; t < n; ++t) {
    const int id = ids[to_size(t)];
    for (index_t o = 0; o < dout; ++o) {
      double v = 0;
      if (!w.empty()) {
        for (index_t j = 0; j < di; ++j) v += x[to_size(t * di + j)] * w[to_size(o * di + j)];
        if (!bias.empty()) v += bias[to_size(o)];
      }
      r.y[to_size(t * dout + o)] = v;
    }
    for (index_t j = 0; j < di; ++j) {
      double v = 0;
      if (!w.empty())
        for (index_t o = 0; o < dout; ++o) v += g[to_size(t * dout + o)] * w[to_size(o * di + j)];
      r.dx[to_size(t * di + j)] = v;
    }
    if (id < 0) continue;
    for (index_t j = 0; j < di; ++j)
      xd[to_size(j)] = x[to_size(t * di + j)] * mask_factor(st, drop, di, t, j, stream, id);
    const index_t ar = id * R, bo = id * dout;
    for (index_t q = 0; q < R; ++q) {
      double v = 0;
      for (index_t j = 0; j < di; ++j) v += xd[to_size(j)] * a[to_size((ar + q) * di + j)];
      r.h[to_size(t * R + q)] = v;
    }
    for (index_t o = 0; o < dout; ++o) {
      double v = 0;
      for (index_t q = 0; q < R; ++q) v += r.h[to_size(t * R + q)] * b[to_size((bo + o) * R + q)];
      r.y[to_size(t * dout + o)] += s * v;
    }
    for (index_t q = 0; q < R; ++q) {
      double v = 0;
      for (index_t o = 0; o < dout; ++o)
        v += g[to_size(t * dout + o)] * b[to_size((bo + o) * R + q)];
      dh[to_size(q)] = s * v;
      for (index_t o = 0; o < dout; ++o)
        r.db[to_size((bo + o) * R + q)] += s * g[to_size(t * dout + o)] * r.h[to_size(t * R + q)];
      for (index_t j = 0; j < di; ++j)
        r.da[to_size((ar + q) * di + j)] += dh[to_size(q)] * xd[to_size(j)];
    }
    for (index_t j = 0; j < di; ++j) {
      double v = 0;
      for (index_t q = 0; q < R; ++q) v += dh[to_size(q)] * a[to_size((ar + q) * di + j)];
      r.dx[to_size(t * di + j)] += mask_factor(st, drop, di, t, j, stream, id) * v;
    }
  }
  return r;
}

// One problem with strided (padded) views everywhere.
struct Problem {
  Dims dims;
  std::vector<int> ids;
  Mat x, w, a, b, dy;
  std::vector<float> bias;
  Mat y, h, dx, da, db;
  std::vector<index_t> order, offsets;
  std::vector<std::int32_t> ids32;
  std::vector<std::byte> ws;

  Problem(Dims p, std::vector<int> row_ids, std::uint32_t seed, bool with_bias = true)
      : dims(p), ids(std::move(row_ids)) {
    std::mt19937 rng(seed);
    const index_t n = p.n, R = p.rank, N = p.adapters;
    x = Mat(n, p.d_in);
    w = Mat(p.d_out, p.d_in, 2);
    a = Mat(N * R, p.d_in, 1);
    b = Mat(N * p.d_out, R, 2);
    dy = Mat(n, p.d_out);
    x.randomize(rng);
    w.randomize(rng, 1.0f / std::sqrt(static_cast<float>(p.d_in)));
    a.randomize(rng, 1.0f / std::sqrt(static_cast<float>(p.d_in)));
    b.randomize(rng, 0.5f);  // B != 0: a trained adapter
    dy.randomize(rng);
    if (with_bias) {
      std::normal_distribution<float> normal(0.0f, 1.0f);
      for (index_t o = 0; o < p.d_out; ++o) bias.push_back(normal(rng));
    }
    y = Mat(n, p.d_out);
    h = Mat(n, R);
    dx = Mat(n, p.d_in);
    da = Mat(N * R, p.d_in);
    db = Mat(N * p.d_out, R);
    poison();
    ids32.assign(ids.begin(), ids.end());
    order.assign(to_size(n), 0);
    offsets.assign(to_size(N + 1), 0);
  }
  void poison() {
    for (Mat* m : {&y, &h, &dx, &da, &db}) m->poison();
  }
  LoraWeights weights(bool base = true) const {
    LoraWeights lw;
    if (base) lw.w = w.cview();
    if (base && !bias.empty()) lw.bias = {bias.data(), static_cast<index_t>(bias.size())};
    lw.a = a.cview();
    lw.b = b.cview();
    return lw;
  }
  LoraGrads grads(bool accumulate = false) { return {da.view(), db.view(), accumulate}; }
  LoraRows rows() const {
    return {{ids32.data(), dims.n},
            {order.data(), dims.n},
            {offsets.data(), static_cast<index_t>(offsets.size())}};
  }
  VectorView<std::byte> workspace(index_t bytes) {
    ws.assign(to_size(bytes), std::byte{0xff});
    return {ws.data(), bytes};
  }
  RefOut ref(double s, const LoraStep& st, float drop, bool base = true,
             std::uint64_t stream = 0) const {
    std::vector<double> bias64(bias.begin(), bias.end());
    return reference(dims, ids, x.values(), base ? w.values() : std::vector<double>{},
                     base ? bias64 : std::vector<double>{}, a.values(), b.values(), dy.values(), s,
                     st, drop, stream);
  }

  template <class S>
  void run(const LoraLinear<S>& lora, const LoraStep& st) {
    const VectorView<std::byte> wv = workspace(lora.workspace_size(dims.n));
    lora.forward(x.cview(), weights(), y.view(), h.view(), st, wv);
    lora.backward(dy.cview(), x.cview(), weights(), h.cview(), st, dx.view(), grads(), wv);
  }
  template <class S>
  void run(const LoraBank<S>& bank, const LoraStep& st, bool base = true) {
    bank.group({ids32.data(), dims.n}, {order.data(), dims.n},
               {offsets.data(), static_cast<index_t>(offsets.size())});
    const VectorView<std::byte> wv = workspace(bank.workspace_size(dims.n));
    bank.forward(x.cview(), rows(), weights(base), y.view(), h.view(), st, wv);
    bank.backward(dy.cview(), x.cview(), rows(), weights(base), h.cview(), st, dx.view(), grads(),
                  wv);
  }
};

struct Errors {
  double y, h, dx, da, db;
  double worst() const { return std::max({y, h, dx, da, db}); }
};

Errors compare(const Problem& p, const RefOut& r) {
  return {rel_error(p.y.values(), r.y), rel_error(p.h.values(), r.h),
          rel_error(p.dx.values(), r.dx), rel_error(p.da.values(), r.da),
          rel_error(p.db.values(), r.db)};
}

void expect_all_written(const Problem& p) {
  for (const Mat* m : {&p.y, &p.h, &p.dx, &p.da, &p.db}) {
    EXPECT_FALSE(m->any_nan()) << "an output element was not written";
    EXPECT_TRUE(m->padding_untouched());
  }
}

void expect_bits_equal(const Problem& p, const Problem& q) {
  for (auto [m1, m2] :
       {std::pair{&p.y, &q.y}, {&p.h, &q.h}, {&p.dx, &q.dx}, {&p.da, &q.da}, {&p.db, &q.db}}) {
    EXPECT_TRUE(m1->bits_equal(*m2));
  }
}

std::vector<int> all_zero(index_t n) { return std::vector<int>(to_size(n), 0); }

// Random ids in [-1, N) with adapter `empty` never used.
std::vector<int> random_ids(index_t n, index_t adapters, std::uint32_t seed, int empty = -2) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> pick(-1, static_cast<int>(adapters) - 1);
  std::vector<int> ids(to_size(n));
  for (int& id : ids) {
    do id = pick(rng);
    while (id == empty && adapters > 1);
  }
  return ids;
}

Errors error_bound_dump(const char* what, const Errors& e) {
  if (e.worst() >= kTol) {
    std::printf("[lora] %s: y %.2e h %.2e dx %.2e da %.2e db %.2e\n", what, e.y, e.h, e.dx, e.da,
                e.db);
  }
  return e;
}

// ---- the reference against central finite differences ---------------------------

double loss(const Dims& p, const std::vector<int>& ids, const std::vector<double>& x,
            const std::vector<double>& w, const std::vector<double>& a,
            const std::vector<double>& b, const std::vector<double>& g, double s,
            const LoraStep& st, float drop) {
  const RefOut r = reference(p, ids, x, w, {}, a, b, g, s, st, drop);
  double v = 0;
  for (std::size_t i = 0; i < g.size(); ++i) v += r.y[i] * g[i];
  return v;
}

TEST(Lora, ReferenceAndLibraryGradientsMatchCentralDifferences) {
  for (const float drop : {0.0f, 0.4f}) {
    SCOPED_TRACE(drop);
    const Dims d{7, 6, 5, 3, 2};
    Problem p(d, {0, -1, 1, 1, 0, -1, 1}, 5u, /*with_bias=*/false);
    const LoraStep st{.training = true, .seed = 11, .step = 3};
    const LoraBank<LoraSpec<3>> bank(
        {.d_in = 6, .d_out = 5, .num_adapters = 2, .alpha = 2.0f, .dropout = drop});
    p.run(bank, st);
    expect_all_written(p);
    const double s = bank.scale();
    const RefOut r = p.ref(s, st, drop);
    std::vector<double> x = p.x.values(), w = p.w.values(), a = p.a.values(), b = p.b.values();
    const std::vector<double> g = p.dy.values();
    const double eps = 1e-6;
    auto fd = [&](std::vector<double>& v) {
      std::vector<double> out(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) {
        const double keep = v[i];
        v[i] = keep + eps;
        const double up = loss(d, p.ids, x, w, a, b, g, s, st, drop);
        v[i] = keep - eps;
        const double down = loss(d, p.ids, x, w, a, b, g, s, st, drop);
        v[i] = keep;
        out[i] = (up - down) / (2 * eps);
      }
      return out;
    };
    const std::vector<double> fx = fd(x), fa = fd(a), fb = fd(b);
    EXPECT_LT(rel_error(r.dx, fx), 1e-8);
    EXPECT_LT(rel_error(r.da, fa), 1e-8);
    EXPECT_LT(rel_error(r.db, fb), 1e-8);
    EXPECT_LT(rel_error(p.dx.values(), fx), 1e-5);
    EXPECT_LT(rel_error(p.da.values(), fa), 1e-5);
    EXPECT_LT(rel_error(p.db.values(), fb), 1e-5);
  }
}

// ---- LoraLinear against the reference -------------------------------------------------

template <class S>
class LoraTyped : public ::testing::Test {};
using Ranks = ::testing::Types<LoraSpec<1>, LoraSpec<8>, LoraSpec<64>>;
TYPED_TEST_SUITE(LoraTyped, Ranks);

TYPED_TEST(LoraTyped, LinearMatchesFloat64Reference) {
  constexpr int R = TypeParam::rank;
  struct Case {
    index_t n, d_in, d_out;
    float drop;
    bool training, rslora, bias;
  };
  // n = 1100 with d_in = 16 runs dropout over several chunks of rows.
  const Case cases[] = {{37, 24, 20, 0.0f, true, false, true},
                        {37, 24, 20, 0.25f, true, false, false},
                        {37, 24, 20, 0.25f, false, true, true},
                        {1100, 16, 12, 0.5f, true, true, true},
                        {1, 70, 3, 0.0f, false, false, true}};
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "n " << c.n << " drop " << c.drop << " training "
                                      << c.training << " rslora " << c.rslora);
    Problem p({c.n, c.d_in, c.d_out, R, 1}, all_zero(c.n), 100u + static_cast<std::uint32_t>(R),
              c.bias);
    const LoraLinear<TypeParam> lora(
        {.d_in = c.d_in, .d_out = c.d_out, .alpha = 16.0f, .rslora = c.rslora, .dropout = c.drop});
    const float expect_s = c.rslora ? 16.0f / std::sqrt(static_cast<float>(R)) : 16.0f / R;
    EXPECT_EQ(lora.scale(), expect_s);
    const LoraStep st{.training = c.training, .seed = 42, .step = 7};
    p.run(lora, st);
    expect_all_written(p);
    const Errors e = error_bound_dump("linear", compare(p, p.ref(lora.scale(), st, c.drop)));
    EXPECT_LT(e.worst(), kTol);

    Problem again = p;
    again.poison();
    again.run(lora, st);
    expect_bits_equal(p, again);
  }
}

TEST(Lora, FrozenAndAccumulatedGradients) {
  using S = LoraSpec<4>;
  Problem p({50, 16, 12, 4, 1}, all_zero(50), 9u);
  const LoraLinear<S> lora({.d_in = 16, .d_out = 12, .alpha = 8.0f, .dropout = 0.1f});
  const LoraStep st{.training = true, .seed = 3, .step = 1};
  p.run(lora, st);
  const Problem full = p;
  const VectorView<std::byte> wv = p.workspace(lora.workspace_size(50));

  // Only dB (saved_h needed); da and dx frozen: untouched.
  p.poison();
  lora.forward(p.x.cview(), p.weights(), p.y.view(), p.h.view(), st, wv);
  lora.backward(p.dy.cview(), p.x.cview(), p.weights(), p.h.cview(), st, {},
                {.da = {}, .db = p.db.view()}, wv);
  EXPECT_TRUE(p.db.bits_equal(full.db));
  EXPECT_TRUE(p.da.any_nan());  // still poisoned
  EXPECT_TRUE(p.dx.any_nan());

  // Only dx; saved_h may be empty then.
  p.poison();
  lora.backward(p.dy.cview(), p.x.cview(), p.weights(), {}, st, p.dx.view(), {}, wv);
  EXPECT_TRUE(p.dx.bits_equal(full.dx));
  EXPECT_TRUE(p.da.any_nan());
  EXPECT_TRUE(p.db.any_nan());

  // Accumulate: old + new.
  Mat da0(4, 16), db0(12, 4);
  std::mt19937 rng(1);
  da0.randomize(rng);
  db0.randomize(rng);
  Mat da = da0, db = db0;
  lora.backward(p.dy.cview(), p.x.cview(), p.weights(), full.h.cview(), st, {},
                {.da = da.view(), .db = db.view(), .accumulate = true}, wv);
  std::vector<double> want_a = da0.values(), want_b = db0.values();
  const std::vector<double> ga = full.da.values(), gb = full.db.values();
  for (std::size_t i = 0; i < want_a.size(); ++i) want_a[i] += ga[i];
  for (std::size_t i = 0; i < want_b.size(); ++i) want_b[i] += gb[i];
  EXPECT_LT(rel_error(da.values(), want_a), 1e-6);
  EXPECT_LT(rel_error(db.values(), want_b), 1e-6);
}

// Adapters given the same LoraStep draw independent masks (issue 21, item 2):
// the adapters of a bank by their index, LoraLinears by their dropout
// stream. Both banks see the same batch and adapters with the same weights,
// so only the mask can tell them apart.
TEST(Lora, BankAdaptersSharingAStepDrawTheirOwnMasks) {
  using S = LoraSpec<4>;
  const index_t n = 40;
  const LoraBank<S> bank({.d_in = 24, .d_out = 8, .num_adapters = 2, .dropout = 0.5f});
  Problem first({n, 24, 8, 4, 2}, all_zero(n), 31u), second = first;
  second.ids.assign(to_size(n), 1);
  second.ids32.assign(to_size(n), 1);
  for (Problem* p : {&first, &second}) {  // adapter 1 = adapter 0
    for (index_t r = 0; r < 4; ++r) {
      for (index_t j = 0; j < 24; ++j) p->a.view()(4 + r, j) = p->a.cview()(r, j);
    }
    for (index_t o = 0; o < 8; ++o) {
      for (index_t r = 0; r < 4; ++r) p->b.view()(8 + o, r) = p->b.cview()(o, r);
    }
  }
  const LoraStep st{.training = true, .seed = 5, .step = 2};
  first.run(bank, st);
  second.run(bank, st);
  EXPECT_FALSE(first.h.bits_equal(second.h)) << "adapters 0 and 1 dropped the same features";
  EXPECT_LT(compare(second, second.ref(bank.scale(), st, 0.5f)).worst(), kTol);
}

TEST(Lora, DropoutStreamsSeparateLoraLinears) {
  using S = LoraSpec<4>;
  const index_t n = 40;
  const LoraConfig base{.d_in = 24, .d_out = 8, .dropout = 0.5f};
  LoraConfig other = base;
  other.dropout_stream = 1;
  const LoraLinear<S> q(base), v(other), q_again(base);
  Problem pq({n, 24, 8, 4, 1}, all_zero(n), 32u), pv = pq, pq_again = pq;
  const LoraStep st{.training = true, .seed = 5, .step = 2};
  pq.run(q, st);
  pv.run(v, st);
  pq_again.run(q_again, st);
  EXPECT_FALSE(pq.h.bits_equal(pv.h));
  EXPECT_TRUE(pq.h.bits_equal(pq_again.h));  // a stream is a pure function, like the step
  EXPECT_LT(compare(pv, pv.ref(v.scale(), st, 0.5f, true, 1)).worst(), kTol);
  // LoraLinear is adapter 0 of a bank of the same stream.
  const LoraBank<S> bank(
      {.d_in = 24, .d_out = 8, .num_adapters = 1, .dropout = 0.5f, .dropout_stream = 1});
  Problem pb = pv;
  pb.poison();
  pb.run(bank, st);
  EXPECT_LT(rel_error(pb.h.values(), pv.h.values()), 1e-6);
}

TEST(Lora, InferenceNeedsNoSavedStateAndIgnoresDropout) {
  using S = LoraSpec<8>;
  Problem p({64, 32, 24, 8, 1}, all_zero(64), 21u);
  const LoraLinear<S> with_drop({.d_in = 32, .d_out = 24, .alpha = 8.0f, .dropout = 0.5f});
  const LoraLinear<S> no_drop({.d_in = 32, .d_out = 24, .alpha = 8.0f});
  Mat y2 = p.y;
  const LoraStep infer{.training = false, .seed = 1, .step = 2};
  std::vector<std::byte> ws1(static_cast<std::size_t>(with_drop.workspace_size(64)));
  std::vector<std::byte> ws2(static_cast<std::size_t>(no_drop.workspace_size(64)));
  with_drop.forward(p.x.cview(), p.weights(), p.y.view(), {}, infer,
                    {ws1.data(), static_cast<index_t>(ws1.size())});
  no_drop.forward(p.x.cview(), p.weights(), y2.view(), {}, infer,
                  {ws2.data(), static_cast<index_t>(ws2.size())});
  EXPECT_TRUE(p.y.bits_equal(y2));
  EXPECT_LT(rel_error(p.y.values(), p.ref(no_drop.scale(), infer, 0.0f).y), kTol);
}

TEST(Lora, DropoutIsReproducibleAndDropsAboutP) {
  using S = LoraSpec<8>;
  const float drop = 0.3f;
  const LoraLinear<S> lora({.d_in = 64, .d_out = 16, .alpha = 8.0f, .dropout = drop});
  Problem p({200, 64, 16, 8, 1}, all_zero(200), 4u);
  const LoraStep st{.training = true, .seed = 99, .step = 5};
  p.run(lora, st);
  Problem same = p, other_step = p, other_seed = p;
  same.poison();
  same.run(lora, st);
  expect_bits_equal(p, same);
  other_step.run(lora, {.training = true, .seed = 99, .step = 6});
  other_seed.run(lora, {.training = true, .seed = 98, .step = 5});
  EXPECT_FALSE(p.h.bits_equal(other_step.h));
  EXPECT_FALSE(p.h.bits_equal(other_seed.h));
  // The mask itself: the fraction dropped is near p.
  index_t dropped = 0;
  for (index_t t = 0; t < 200; ++t)
    for (index_t j = 0; j < 64; ++j) dropped += mask_factor(st, drop, 64, t, j, 0, 0) == 0.0;
  EXPECT_NEAR(static_cast<double>(dropped) / (200.0 * 64.0), drop, 0.02);
}

// ---- initialisation ---------------------------------------------------------------

TEST(Lora, InitKaimingUniformAndGaussianAreSeededAndBIsZero) {
  using S = LoraSpec<8>;
  const index_t d_in = 256, d_out = 40;
  const LoraLinear<S> lora({.d_in = d_in, .d_out = d_out});
  Mat a(8, d_in), b(d_out, 8), a2(8, d_in), b2(d_out, 8), a3(8, d_in);
  a.poison();
  b.poison();
  lora.init(a.view(), b.view(), {.seed = 5});
  lora.init(a2.view(), b2.view(), {.seed = 5});
  lora.init(a3.view(), b2.view(), {.seed = 6});
  EXPECT_TRUE(a.bits_equal(a2));
  EXPECT_FALSE(a.bits_equal(a3));
  EXPECT_TRUE(a.padding_untouched() && b.padding_untouched());
  const double bound = 1.0 / std::sqrt(static_cast<double>(d_in));
  double sum = 0, sq = 0, lo = 1, hi = -1;
  for (double v : a.values()) {
    sum += v;
    sq += v * v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  for (double v : b.values()) ASSERT_EQ(v, 0.0);
  const double count = 8.0 * d_in;
  EXPECT_GE(lo, -bound);
  EXPECT_LT(hi, bound);
  EXPECT_GT(hi, 0.95 * bound);  // the whole range is used
  EXPECT_NEAR(sum / count, 0.0, 0.05 * bound);
  EXPECT_NEAR(sq / count, bound * bound / 3.0, 0.08 * bound * bound / 3.0);  // U(-c, c): c^2/3

  // Gaussian: default std 1 / R, or the given one.
  for (const float stddev : {0.0f, 0.02f}) {
    lora.init(a.view(), b.view(), {.kind = LoraInit::kGaussian, .stddev = stddev, .seed = 8});
    const double want = stddev > 0 ? stddev : 1.0 / 8.0;
    double s2 = 0, s1 = 0;
    for (double v : a.values()) {
      s1 += v;
      s2 += v * v;
    }
    EXPECT_NEAR(std::sqrt(s2 / count), want, 0.05 * want);
    EXPECT_NEAR(s1 / count, 0.0, 0.05 * want);
  }

  // The bank: adapter 0 equals LoraLinear's init; init_adapter(i) equals init's block.
  const LoraBank<S> bank({.d_in = d_in, .d_out = d_out, .num_adapters = 3});
  Mat ba(24, d_in), bb(3 * d_out, 8), ba2(24, d_in), bb2(3 * d_out, 8);
  bank.init(ba.view(), bb.view(), {.seed = 5});
  lora.init(a.view(), b.view(), {.seed = 5});
  for (index_t r = 0; r < 8; ++r)
    for (index_t j = 0; j < d_in; ++j) ASSERT_EQ(ba.at(r, j), a.at(r, j));
  ba2.fill(1.0f);
  bb2.fill(1.0f);
  bank.init_adapter(2, ba2.view(), bb2.view(), {.seed = 5});
  for (index_t r = 0; r < 24; ++r)
    for (index_t j = 0; j < d_in; ++j) ASSERT_EQ(ba2.at(r, j), r >= 16 ? ba.at(r, j) : 1.0f);
  for (index_t r = 0; r < 3 * d_out; ++r)
    for (index_t q = 0; q < 8; ++q) ASSERT_EQ(bb2.at(r, q), r >= 2 * d_out ? 0.0f : 1.0f);
}

// ---- merging -------------------------------------------------------------------------

TEST(Lora, MergeMatchesAdapterAndUnmergeRestoresW) {
  using S = LoraSpec<8>;
  Problem p({30, 40, 36, 8, 1}, all_zero(30), 31u);
  const LoraLinear<S> lora({.d_in = 40, .d_out = 36, .alpha = 16.0f});
  const LoraStep infer{};
  p.run(lora, infer);
  Mat w = p.w;
  lora.merge(w.view(), p.a.cview(), p.b.cview());
  EXPECT_TRUE(w.padding_untouched());
  // The merged base alone gives the adapted output.
  const Mat zero_b = [&] {
    Mat z = p.b;
    z.fill(0.0f);
    return z;
  }();
  Mat y(30, 36);
  std::vector<std::byte> ws(static_cast<std::size_t>(lora.workspace_size(30)));
  lora.forward(p.x.cview(),
               {.w = w.cview(), .bias = p.weights().bias, .a = p.a.cview(), .b = zero_b.cview()},
               y.view(), {}, infer, {ws.data(), static_cast<index_t>(ws.size())});
  EXPECT_LT(rel_error(y.values(), p.ref(lora.scale(), infer, 0.0f).y), kTol);

  Mat safe = p.w;
  lora.safe_merge(safe.view(), p.a.cview(), p.b.cview());
  EXPECT_TRUE(safe.bits_equal(w));  // the same values merge writes

  lora.unmerge(w.view(), p.a.cview(), p.b.cview());
  double worst = 0;
  for (index_t i = 0; i < 36; ++i)
    for (index_t j = 0; j < 40; ++j) {
      const double delta = std::abs(safe.at(i, j) - p.w.at(i, j));
      const double ulp = std::numeric_limits<float>::epsilon() *
                         std::max(std::abs(safe.at(i, j)), std::abs(p.w.at(i, j)));
      EXPECT_LE(std::abs(w.at(i, j) - p.w.at(i, j)), ulp + 1e-12) << i << " " << j << " " << delta;
      worst = std::max(worst, static_cast<double>(std::abs(w.at(i, j) - p.w.at(i, j))));
    }
  std::printf("[lora] merge + unmerge: max |w' - w| = %.2e\n", worst);
}

TEST(Lora, SafeMergeRefusesNonFiniteAndLeavesWUntouched) {
  using S = LoraSpec<2>;
  const LoraLinear<S> lora({.d_in = 5, .d_out = 4, .alpha = 2.0f});
  const LoraBank<S> bank({.d_in = 5, .d_out = 4, .num_adapters = 2, .alpha = 2.0f});
  std::mt19937 rng(2);
  Mat w(4, 5), a(2, 5), b(4, 2), ba(4, 5), bb(8, 2);
  for (Mat* m : {&w, &a, &b, &ba, &bb}) m->randomize(rng);
  const Mat w0 = w;
  b.at(2, 1) = 3e38f;  // s b a overflows in row 2
  a.at(1, 3) = 10.0f;
  std::string msg =
      expect_error([&] { lora.safe_merge(w.view(), a.cview(), b.cview()); }, Errc::kNonFinite);
  EXPECT_NE(msg.find("merged w(2, "), std::string::npos) << msg;
  EXPECT_NE(msg.find("w is unchanged"), std::string::npos) << msg;
  EXPECT_TRUE(w.bits_equal(w0));
  // NaN in A, through the bank's adapter 1.
  ba.at(3, 0) = std::numeric_limits<float>::quiet_NaN();
  msg =
      expect_error([&] { bank.safe_merge(1, w.view(), ba.cview(), bb.cview()); }, Errc::kNonFinite);
  EXPECT_NE(msg.find("nan"), std::string::npos) << msg;
  EXPECT_TRUE(w.bits_equal(w0));
  bank.safe_merge(0, w.view(), ba.cview(), bb.cview());  // adapter 0 is finite
  EXPECT_FALSE(w.bits_equal(w0));
  // A non-finite w itself is refused too.
  Mat w_inf = w0;
  w_inf.at(0, 0) = std::numeric_limits<float>::infinity();
  const Mat w_inf0 = w_inf;
  b.at(2, 1) = 0.5f;
  expect_error([&] { lora.safe_merge(w_inf.view(), a.cview(), b.cview()); }, Errc::kNonFinite);
  EXPECT_TRUE(w_inf.bits_equal(w_inf0));
}

// ---- the bank --------------------------------------------------------------------------

TEST(Lora, GroupIsAStableCountingSort) {
  const LoraBank<LoraSpec<2>> bank({.d_in = 3, .d_out = 3, .num_adapters = 4});
  const std::vector<std::int32_t> ids = {2, -1, 0, 2, 3, 0, -1, 2};
  std::vector<index_t> order(8, 99), offsets(5, 99);
  const index_t n = bank.group({ids.data(), 8}, {order.data(), 8}, {offsets.data(), 5});
  EXPECT_EQ(n, 6);
  EXPECT_EQ(offsets, (std::vector<index_t>{0, 2, 2, 5, 6}));
  EXPECT_EQ(order, (std::vector<index_t>{2, 5, 0, 3, 7, 4, -1, -1}));
}

template <int N>
void bank_matches_reference_and_single_adapters() {
  using S = LoraSpec<4>;
  constexpr int R = 4;
  const index_t n = N == 1 ? 600 : 300, d_in = 20, d_out = 18;
  struct Layout {
    const char* name;
    std::vector<int> ids;
  };
  std::vector<int> blocked(to_size(n));
  for (index_t t = 0; t < n; ++t) blocked[to_size(t)] = static_cast<int>((t * N) / n);
  if (N > 2) std::fill(blocked.begin(), blocked.begin() + 5, -1);
  const Layout layouts[] = {{"random", random_ids(n, N, 7u, N > 1 ? 1 : -2)}, {"blocked", blocked}};
  for (const Layout& layout : layouts) {
    for (const float drop : {0.0f, 0.2f}) {
      for (const bool base : {true, false}) {
        SCOPED_TRACE(::testing::Message()
                     << "N " << N << " " << layout.name << " drop " << drop << " base " << base);
        Problem p({n, d_in, d_out, R, N}, layout.ids, 17u);
        const LoraBank<S> bank(
            {.d_in = d_in, .d_out = d_out, .num_adapters = N, .alpha = 6.0f, .dropout = drop});
        const LoraStep st{.training = true, .seed = 5, .step = 9};
        if (!base) {  // y and dx hold the caller's values; the bank adds
          std::mt19937 rng(3);
          p.y.randomize(rng);
          p.dx.randomize(rng);
        }
        const Mat y0 = p.y, dx0 = p.dx;
        p.run(bank, st, base);
        expect_all_written(p);
        RefOut r = p.ref(bank.scale(), st, drop, base);
        if (!base) {
          const std::vector<double> yv = y0.values(), dxv = dx0.values();
          for (std::size_t i = 0; i < r.y.size(); ++i) r.y[i] += yv[i];
          for (std::size_t i = 0; i < r.dx.size(); ++i) r.dx[i] += dxv[i];
        }
        const Errors e = error_bound_dump("bank", compare(p, r));
        EXPECT_LT(e.worst(), kTol);
        if (N > 1 && layout.name[0] == 'r') {  // adapter 1 has no rows: zero gradients
          for (index_t q = 0; q < R; ++q)
            for (index_t j = 0; j < d_in; ++j) ASSERT_EQ(p.da.at(R + q, j), 0.0f);
          for (index_t o = 0; o < d_out; ++o)
            for (index_t q = 0; q < R; ++q) ASSERT_EQ(p.db.at(d_out + o, q), 0.0f);
        }
        Problem again = p;
        again.y = y0;
        again.dx = dx0;
        again.run(bank, st, base);
        expect_bits_equal(p, again);
        // A workspace of one slot (one thread) gives the same rows.
        Problem one = p;
        one.y = y0;
        one.dx = dx0;
        one.h.poison();
        const index_t slot = bank.workspace_size(n) / std::max(1, moekit::cpu::max_threads());
        const VectorView<std::byte> wv = one.workspace(slot);
        bank.forward(one.x.cview(), one.rows(), one.weights(base), one.y.view(), one.h.view(), st,
                     wv);
        EXPECT_LT(rel_error(one.y.values(), r.y), kTol);
      }
    }
  }

  // Each adapter run on its own rows through LoraLinear (no dropout, base on).
  Problem p({n, d_in, d_out, R, N}, random_ids(n, N, 8u), 19u);
  const LoraBank<S> bank({.d_in = d_in, .d_out = d_out, .num_adapters = N, .alpha = 6.0f});
  const LoraLinear<S> single({.d_in = d_in, .d_out = d_out, .alpha = 6.0f});
  p.run(bank, {});
  for (index_t i = -1; i < N; ++i) {
    std::vector<index_t> rows;
    for (index_t t = 0; t < n; ++t)
      if (p.ids[to_size(t)] == i) rows.push_back(t);
    const auto m = static_cast<index_t>(rows.size());
    Mat xs(m, d_in), dys(m, d_out), ys(m, d_out), hs(m, R), dxs(m, d_in), das(R, d_in),
        dbs(d_out, R);
    for (index_t k = 0; k < m; ++k) {
      for (index_t j = 0; j < d_in; ++j) xs.at(k, j) = p.x.at(rows[to_size(k)], j);
      for (index_t o = 0; o < d_out; ++o) dys.at(k, o) = p.dy.at(rows[to_size(k)], o);
    }
    Mat zero_b(d_out, R);
    zero_b.fill(0.0f);
    const index_t ai = std::max<index_t>(i, 0);
    const LoraWeights lw{.w = p.w.cview(),
                         .bias = p.weights().bias,
                         .a = p.a.cview().middle_rows(ai * R, R),
                         .b = i < 0 ? zero_b.cview() : p.b.cview().middle_rows(ai * d_out, d_out)};
    std::vector<std::byte> ws(static_cast<std::size_t>(single.workspace_size(m)));
    const VectorView<std::byte> wv(ws.data(), static_cast<index_t>(ws.size()));
    single.forward(xs.cview(), lw, ys.view(), hs.view(), {}, wv);
    single.backward(dys.cview(), xs.cview(), lw, hs.cview(), {}, dxs.view(),
                    {das.view(), dbs.view()}, wv);
    std::vector<double> by, bdx, ry = ys.values(), rdx = dxs.values();
    for (index_t k = 0; k < m; ++k) {
      for (index_t o = 0; o < d_out; ++o) by.push_back(p.y.at(rows[to_size(k)], o));
      for (index_t j = 0; j < d_in; ++j) bdx.push_back(p.dx.at(rows[to_size(k)], j));
    }
    EXPECT_LT(rel_error(by, ry), 1e-6) << "adapter " << i;
    EXPECT_LT(rel_error(bdx, rdx), 1e-6) << "adapter " << i;
    if (i < 0) continue;
    std::vector<double> bda, bdb;
    for (index_t q = 0; q < R; ++q)
      for (index_t j = 0; j < d_in; ++j) bda.push_back(p.da.at(i * R + q, j));
    for (index_t o = 0; o < d_out; ++o)
      for (index_t q = 0; q < R; ++q) bdb.push_back(p.db.at(i * d_out + o, q));
    EXPECT_LT(rel_error(bda, das.values()), 1e-6) << "adapter " << i;
    EXPECT_LT(rel_error(bdb, dbs.values()), 1e-6) << "adapter " << i;
  }
}

TEST(Lora, BankOneAdapter) { bank_matches_reference_and_single_adapters<1>(); }
TEST(Lora, BankEightAdapters) { bank_matches_reference_and_single_adapters<8>(); }
TEST(Lora, BankSixtyFourAdapters) { bank_matches_reference_and_single_adapters<64>(); }

TEST(Lora, BankWideRowsGatherManyChunks) {
  // d = 2048: 128-row chunks, so each adapter's rows span several chunks, and
  // the threads' runs of rows cross segments.
  using S = LoraSpec<2>;
  const index_t n = 700, d = 2048, dout = 8;
  std::vector<int> ids(to_size(n));
  for (index_t t = 0; t < n; ++t) ids[to_size(t)] = t < 300 ? 0 : static_cast<int>(t % 3) - 1;
  Problem p({n, d, dout, 2, 2}, ids, 23u);
  const LoraBank<S> bank({.d_in = d, .d_out = dout, .num_adapters = 2, .alpha = 2.0f});
  EXPECT_EQ(bank.chunk_rows(), 128);
  p.run(bank, {});
  expect_all_written(p);
  EXPECT_LT(compare(p, p.ref(bank.scale(), {}, 0.0f)).worst(), kTol);
}

TEST(Lora, EmptyBatch) {
  using S = LoraSpec<4>;
  Problem p({0, 8, 6, 4, 3}, {}, 1u);
  const LoraLinear<S> lora({.d_in = 8, .d_out = 6, .dropout = 0.5f});
  const LoraBank<S> bank({.d_in = 8, .d_out = 6, .num_adapters = 3});
  EXPECT_EQ(lora.workspace_size(0), 0);
  EXPECT_EQ(bank.workspace_size(0), 0);
  Mat a1(4, 8), b1(6, 4), da1(4, 8), db1(6, 4);  // weights and gradients apart
  a1.fill(0.5f);
  b1.fill(0.25f);
  da1.poison();
  db1.poison();
  const LoraStep st{.training = true};
  lora.forward(p.x.cview(), {.w = p.w.cview(), .a = a1.cview(), .b = b1.cview()}, p.y.view(),
               p.h.view(), st, {});
  lora.backward(p.dy.cview(), p.x.cview(), {.w = p.w.cview(), .a = a1.cview(), .b = b1.cview()},
                p.h.cview(), st, p.dx.view(), {.da = da1.view(), .db = db1.view()}, {});
  EXPECT_FALSE(da1.any_nan());  // overwrite mode: zero gradients
  p.run(bank, st);
  EXPECT_FALSE(p.da.any_nan());
  EXPECT_FALSE(p.db.any_nan());
  // Accumulate leaves them as they were.
  p.da.fill(2.0f);
  bank.backward(p.dy.cview(), p.x.cview(), p.rows(), p.weights(), p.h.cview(), st, p.dx.view(),
                p.grads(true), {});
  EXPECT_EQ(p.da.at(5, 3), 2.0f);
  // All rows without an adapter: the base only, no workspace needed.
  Problem q({5, 8, 6, 4, 3}, {-1, -1, -1, -1, -1}, 2u);
  q.run(bank, st);
  expect_all_written(q);
  EXPECT_LT(compare(q, q.ref(bank.scale(), st, 0.0f)).worst(), kTol);
}

// ---- bad input ---------------------------------------------------------------------------

template <class F>
void expect_rejected(F&& call, Errc code, const char* message) {
  const std::string msg = expect_error(call, code);
  EXPECT_NE(msg.find(message), std::string::npos) << msg;
}

TEST(Lora, BadConfigs) {
  using S = LoraSpec<8>;
  expect_rejected([] { LoraLinear<S>({.d_in = 0, .d_out = 4}); }, Errc::kInvalidArgument,
                  "config.d_in = 0");
  expect_rejected([] { LoraLinear<S>({.d_in = 4, .d_out = -2}); }, Errc::kInvalidArgument,
                  "config.d_out = -2");
  expect_rejected([] { LoraLinear<S>({.d_in = 4, .d_out = 4, .alpha = NAN}); },
                  Errc::kInvalidArgument, "config.alpha = nan");
  expect_rejected([] { LoraLinear<S>({.d_in = 4, .d_out = 4, .dropout = 1.0f}); },
                  Errc::kInvalidArgument, "config.dropout = 1 must be in [0, 1)");
  expect_rejected([] { LoraBank<S>({.d_in = 4, .d_out = 4, .num_adapters = 0}); },
                  Errc::kInvalidArgument, "config.num_adapters = 0");
  const LoraLinear<S> lora({.d_in = 4, .d_out = 4});
  Mat a(8, 4), b(4, 8);
  expect_rejected([&] { lora.init(a.view(), b.view(), {.kind = static_cast<LoraInit>(7)}); },
                  Errc::kInvalidArgument, "init.kind = 7");
  expect_rejected(
      [&] { lora.init(a.view(), b.view(), {.kind = LoraInit::kGaussian, .stddev = -1.0f}); },
      Errc::kInvalidArgument, "init.stddev = -1");
}

// bf16 base compute (training with fp32 master weights): only the frozen
// base product rounds its operands. So on every bf16 path y and dx equal
// float64's with the base terms x w^T and dy w taken over bf16-rounded
// operands, to fp32's summation error, and h, da and db equal the fp32
// reference's; y and dx stay within bf16's rounding of the fp32 layer's.
template <class Layer>
void check_bf16_base(const Layer& layer, Problem& p, const LoraStep& st, float drop) {
  using moekit::cpu::GemmDtype;
  using moekit_test::round_bf16;
  ASSERT_EQ(layer.base_compute(), GemmDtype::kBfloat16);
  RefOut r = p.ref(layer.scale(), st, drop);
  const Dims& d = p.dims;
  // What rounding both operands to bf16 adds to a dot product u . v.
  const auto rounding_shift = [](index_t len, auto&& u, auto&& v) {
    double shift = 0.0;
    for (index_t k = 0; k < len; ++k) {
      const double exact = double(u(k)) * double(v(k));
      shift += double(round_bf16(u(k))) * double(round_bf16(v(k))) - exact;
    }
    return shift;
  };
  for (index_t t = 0; t < d.n; ++t) {
    for (index_t o = 0; o < d.d_out; ++o) {
      r.y[to_size(t * d.d_out + o)] += rounding_shift(
          d.d_in, [&](index_t j) { return p.x.at(t, j); }, [&](index_t j) { return p.w.at(o, j); });
    }
    for (index_t j = 0; j < d.d_in; ++j) {
      r.dx[to_size(t * d.d_in + j)] += rounding_shift(
          d.d_out, [&](index_t o) { return p.dy.at(t, o); },
          [&](index_t o) { return p.w.at(o, j); });
    }
  }
  const RefOut fp32 = p.ref(layer.scale(), st, drop);
  for (const moekit_test::GemmPathCase& path : moekit_test::gemm_path_cases(GemmDtype::kBfloat16)) {
    SCOPED_TRACE(path.name);
    p.poison();
    moekit_test::with_path(path, GemmDtype::kBfloat16, [&] { p.run(layer, st); });
    expect_all_written(p);
    const Errors e = error_bound_dump("bf16 base", compare(p, r));
    EXPECT_LT(e.worst(), 1e-5);
    const double y_vs_fp32 = rel_error(p.y.values(), fp32.y);
    EXPECT_GT(y_vs_fp32, 1e-5);  // the base operands were rounded
    EXPECT_LT(y_vs_fp32, 1e-2);
    EXPECT_LT(rel_error(p.dx.values(), fp32.dx), 1e-2);
  }
}

TEST(Lora, Bf16BaseComputeRoundsOnlyTheBaseProduct) {
  using S = LoraSpec<8>;
  using moekit::cpu::GemmDtype;
  const LoraStep st{.training = true, .seed = 3, .step = 4};
  {
    SCOPED_TRACE("LoraLinear");
    Problem p({53, 40, 36, 8, 1}, all_zero(53), 61u);
    const LoraLinear<S> lora({.d_in = 40, .d_out = 36, .alpha = 16.0f, .dropout = 0.2f},
                             GemmDtype::kBfloat16);
    check_bf16_base(lora, p, st, 0.2f);
  }
  {
    SCOPED_TRACE("LoraBank");
    Problem p({90, 40, 36, 8, 3}, random_ids(90, 3, 62u), 63u);
    const LoraBank<S> bank(
        {.d_in = 40, .d_out = 36, .num_adapters = 3, .alpha = 16.0f, .dropout = 0.2f},
        GemmDtype::kBfloat16);
    check_bf16_base(bank, p, st, 0.2f);
  }
  expect_rejected([] { LoraLinear<S>({.d_in = 4, .d_out = 4}, GemmDtype::kInt8); },
                  Errc::kInvalidArgument, "base_compute = 2 must be kFloat32 or kBfloat16");
  expect_rejected([] { LoraBank<S>({.d_in = 4, .d_out = 4, .num_adapters = 2}, GemmDtype::kInt8); },
                  Errc::kInvalidArgument, "base_compute = 2 must be kFloat32 or kBfloat16");
}

TEST(Lora, LinearBadInputsWriteNothing) {
  using S = LoraSpec<8>;
  const Problem base({10, 12, 9, 8, 1}, all_zero(10), 3u);
  const LoraLinear<S> lora({.d_in = 12, .d_out = 9, .dropout = 0.1f});
  const index_t ws_bytes = lora.workspace_size(10);
  Mat a7(7, 12), b9(9, 9), short_y(9, 9), h4(10, 4), w_t(12, 9);
  std::vector<float> bias5(5);
  const LoraStep st{.training = true};
  Problem p = base;
  std::vector<std::byte> ws(static_cast<std::size_t>(ws_bytes) + 8);
  const VectorView<std::byte> wv(ws.data(), ws_bytes);
  const auto fwd = [&](MatrixView<const float> x, LoraWeights w, MatrixView<float> y,
                       MatrixView<float> h, VectorView<std::byte> work) {
    return [=, &lora] { lora.forward(x, w, y, h, st, work); };
  };
  const LoraWeights w = p.weights();
  LoraWeights bad = w;
  bad.a = a7.cview();
  expect_rejected(fwd(p.x.cview(), bad, p.y.view(), p.h.view(), wv), Errc::kShapeMismatch,
                  "weights.a has 7 rows, expected 8 (rank R = 8)");
  bad = w;
  bad.b = b9.cview();
  expect_rejected(fwd(p.x.cview(), bad, p.y.view(), p.h.view(), wv), Errc::kShapeMismatch,
                  "weights.b has 9 columns, expected the rank R = 8");
  bad = w;
  bad.w = w_t.cview();
  expect_rejected(fwd(p.x.cview(), bad, p.y.view(), p.h.view(), wv), Errc::kShapeMismatch,
                  "weights.w is 12 x 9, expected 9 x 12");
  bad = w;
  bad.bias = {bias5.data(), 5};
  expect_rejected(fwd(p.x.cview(), bad, p.y.view(), p.h.view(), wv), Errc::kShapeMismatch,
                  "weights.bias has 5 elements, expected 9");
  expect_rejected(fwd(p.x.cview(), w, short_y.view(), p.h.view(), wv), Errc::kShapeMismatch,
                  "y is 9 x 9, expected 10 x 9");
  expect_rejected(fwd(p.x.cview(), w, p.y.view(), h4.view(), wv), Errc::kShapeMismatch,
                  "saved_h has 4 columns, expected the rank R = 8");
  expect_rejected(fwd(MatrixView<const float>(nullptr, 10, 12), w, p.y.view(), p.h.view(), wv),
                  Errc::kNullPointer, "x is null");
  expect_rejected(fwd(p.x.cview(), w, p.y.view(), p.h.view(), {ws.data(), ws_bytes - 4}),
                  Errc::kShapeMismatch, "workspace has");
  expect_rejected(fwd(p.x.cview(), w, p.y.view(), p.h.view(), {ws.data() + 1, ws_bytes}),
                  Errc::kInvalidArgument, "not aligned");
  const auto bwd = [&](MatrixView<const float> h, MatrixView<float> dx, LoraGrads g) {
    return [=, &lora, &p] { lora.backward(p.dy.cview(), p.x.cview(), w, h, st, dx, g, wv); };
  };
  expect_rejected(bwd({}, p.dx.view(), p.grads()), Errc::kShapeMismatch,
                  "saved_h has 0 columns, expected the rank R = 8");
  expect_rejected(bwd(p.h.cview(), short_y.view(), p.grads()), Errc::kShapeMismatch,
                  "dx is 9 x 9, expected 10 x 12");
  expect_rejected(bwd(p.h.cview(), p.dx.view(), {.da = a7.view(), .db = p.db.view()}),
                  Errc::kShapeMismatch, "grads.da has 7 rows, expected 8 (rank R = 8)");
  expect_rejected([&] { lora.merge(w_t.view(), p.a.cview(), p.b.cview()); }, Errc::kShapeMismatch,
                  "w is 12 x 9, expected 9 x 12");
  expect_rejected([&] { lora.safe_merge(p.w.view(), a7.cview(), p.b.cview()); },
                  Errc::kShapeMismatch, "a has 7 rows, expected 8 (rank R = 8)");
  for (auto [m1, m2] : {std::pair{&p.y, &base.y},
                        {&p.h, &base.h},
                        {&p.dx, &base.dx},
                        {&p.da, &base.da},
                        {&p.db, &base.db},
                        {&p.w, &base.w}}) {
    EXPECT_TRUE(m1->bits_equal(*m2)) << "a rejected call wrote an output";
  }
}

TEST(Lora, BankBadInputsWriteNothing) {
  using S = LoraSpec<2>;
  const LoraBank<S> bank({.d_in = 6, .d_out = 5, .num_adapters = 4});
  Problem base({6, 6, 5, 2, 4}, {0, 3, -1, 1, 3, 0}, 4u);
  bank.group({base.ids32.data(), 6}, {base.order.data(), 6}, {base.offsets.data(), 5});
  const index_t ws_bytes = bank.workspace_size(6);

  // group: an id out of range names the row and the value; order and offsets untouched.
  {
    Problem p = base;
    p.ids32[4] = 4;
    expect_rejected(
        [&] {
          bank.group({p.ids32.data(), 6}, {p.order.data(), 6}, {p.offsets.data(), 5});
        },
        Errc::kOutOfRange, "ids[4] = 4 is outside [-1, N = 4)");
    p.ids32[4] = -2;
    expect_rejected(
        [&] {
          bank.group({p.ids32.data(), 6}, {p.order.data(), 6}, {p.offsets.data(), 5});
        },
        Errc::kOutOfRange, "ids[4] = -2");
    EXPECT_EQ(p.order, base.order);
    EXPECT_EQ(p.offsets, base.offsets);
  }

  struct Case {
    const char* what;
    Errc code;
    const char* message;
    void (*mutate)(Problem&);
  };
  const Case cases[] = {
      {"id", Errc::kOutOfRange, "ids[1] = 9 is outside [-1, N = 4)",
       [](Problem& p) { p.ids32[1] = 9; }},
      {"id changed", Errc::kInvalidArgument, "rows.offsets[4] = 5 but 4 rows have an adapter id",
       [](Problem& p) { p.ids32[0] = -1; }},
      {"order swapped", Errc::kInvalidArgument, "rows.order is not increasing within adapter 0",
       [](Problem& p) { std::swap(p.order[0], p.order[1]); }},
      {"order wrong segment", Errc::kInvalidArgument, "lies in adapter 0's segment but ids[",
       [](Problem& p) { p.order[0] = 3; }},
      {"order out of range", Errc::kOutOfRange, "rows.order[2] = 60 is outside [0, n = 6)",
       [](Problem& p) { p.order[2] = 60; }},
      {"offsets[0]", Errc::kInvalidArgument, "rows.offsets[0] = 1",
       [](Problem& p) { p.offsets[0] = 1; }},
      {"offsets decrease", Errc::kInvalidArgument, "rows.offsets decreases",
       [](Problem& p) { p.offsets[2] = 1; }},
      {"offsets size", Errc::kShapeMismatch, "rows.offsets has 4 elements, expected 5",
       [](Problem& p) { p.offsets.pop_back(); }},
      {"workspace", Errc::kShapeMismatch, "workspace has", [](Problem& p) { p.ws.resize(64); }},
  };
  const LoraStep st{};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    Problem p = base;
    p.ws.assign(static_cast<std::size_t>(ws_bytes), std::byte{0});
    c.mutate(p);
    const VectorView<std::byte> wv(p.ws.data(), static_cast<index_t>(p.ws.size()));
    expect_rejected(
        [&] { bank.forward(p.x.cview(), p.rows(), p.weights(), p.y.view(), p.h.view(), st, wv); },
        c.code, c.message);
    expect_rejected(
        [&] {
          bank.backward(p.dy.cview(), p.x.cview(), p.rows(), p.weights(), p.h.cview(), st,
                        p.dx.view(), p.grads(), wv);
        },
        c.code, c.message);
    for (auto [m1, m2] : {std::pair{&p.y, &base.y},
                          {&p.h, &base.h},
                          {&p.dx, &base.dx},
                          {&p.da, &base.da},
                          {&p.db, &base.db}}) {
      EXPECT_TRUE(m1->bits_equal(*m2)) << "a rejected call wrote an output";
    }
  }
  Problem p = base;
  std::vector<std::byte> ws(static_cast<std::size_t>(ws_bytes));
  const VectorView<std::byte> wv(ws.data(), ws_bytes);
  LoraWeights lw = p.weights();
  lw.w = {};
  expect_rejected([&] { bank.forward(p.x.cview(), p.rows(), lw, p.y.view(), p.h.view(), st, wv); },
                  Errc::kInvalidArgument, "weights.bias is given but weights.w is empty");
  Mat a_short(6, 6);
  lw = p.weights();
  lw.a = a_short.cview();
  expect_rejected([&] { bank.forward(p.x.cview(), p.rows(), lw, p.y.view(), p.h.view(), st, wv); },
                  Errc::kShapeMismatch, "weights.a has 6 rows, expected 8 (rank R = 2)");
  expect_rejected([&] { bank.merge(4, p.w.view(), p.a.cview(), p.b.cview()); }, Errc::kOutOfRange,
                  "adapter = 4 is outside [0, 4)");
  expect_rejected([&] { bank.init_adapter(-1, p.a.view(), p.b.view(), {}); }, Errc::kOutOfRange,
                  "adapter = -1");
  for (auto [m1, m2] : {std::pair{&p.y, &base.y},
                        {&p.h, &base.h},
                        {&p.w, &base.w},
                        {&p.a, &base.a},
                        {&p.b, &base.b}}) {
    EXPECT_TRUE(m1->bits_equal(*m2)) << "a rejected call wrote an output";
  }
}

}  // namespace
