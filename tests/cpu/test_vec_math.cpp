// The vector math and element-wise passes of moekit/cpu/vec_math.hpp and
// moekit/cpu/elementwise.hpp: accuracy against float64 on a dense sample of
// all floats (MOEKIT_VEC_MATH_STRIDE sets the sampling; 1 is every float),
// the same bits on every path the machine has and at every position of a
// row, the passes against their definitions, and the row losses against
// float64 references.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "moekit/core/classification.hpp"
#include "moekit/cpu/elementwise.hpp"
#include "moekit/cpu/isa.hpp"
#include "vec_math_reference.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {
#define MOEKIT_PER_ISA_FILE "vec_math_kernel-inl.hpp"
#include "moekit/cpu/detail/per_isa.hpp"
#undef MOEKIT_PER_ISA_FILE
#define MOEKIT_PER_ISA_FILE "vec_ops_kernel-inl.hpp"
#include "moekit/cpu/detail/per_isa.hpp"
#undef MOEKIT_PER_ISA_FILE
}  // namespace cpu
MOEKIT_NAMESPACE_END

namespace {

using moekit::Activation;
using moekit::index_t;
using moekit::MatrixView;
using moekit::cpu::Isa;
namespace vt = vec_math_test;

std::size_t sz(index_t n) { return static_cast<std::size_t>(n); }

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
// The same bits, or both NaN (NaN payloads are not promised).
bool same(float a, float b) { return bits(a) == bits(b) || (std::isnan(a) && std::isnan(b)); }

// The paths this machine can run, the portable one first.
std::vector<Isa> paths() {
  std::vector<Isa> out{Isa::kGeneric};
  if (moekit::cpu::isa_available(Isa::kAvx2)) out.push_back(Isa::kAvx2);
  if (moekit::cpu::isa_available(Isa::kAvx512)) out.push_back(Isa::kAvx512);
  return out;
}

void eval_on(Isa isa, int fn, const std::vector<float>& x, std::vector<float>& y) {
  y.assign(x.size(), -7.0f);
  const auto n = static_cast<index_t>(x.size());
  switch (isa) {
#if MOEKIT_DETAIL_X86
    case Isa::kAvx512:
    case Isa::kAmx:
      return moekit::cpu::avx512::eval_math(fn, x.data(), y.data(), n);
    case Isa::kAvx2:
      return moekit::cpu::avx2::eval_math(fn, x.data(), y.data(), n);
#endif
    default:
      return moekit::cpu::generic::eval_math(fn, x.data(), y.data(), n);
  }
}

std::uint64_t sample_stride() {
  const char* v = std::getenv("MOEKIT_VEC_MATH_STRIDE");
  if (v != nullptr) return std::max<std::uint64_t>(1, std::strtoull(v, nullptr, 10));
#if defined(NDEBUG)
  return 4099;  // about a million floats of every binade
#else
  return 65537;  // the sanitizer build: 65536
#endif
}

// The documented accuracy (docs/cpu_vector_math.md): the most ulps of the
// reference (of the larger term for a derivative) over all floats.
double bound(int fn) {
  switch (fn) {
    case vt::kExp:
    case vt::kLog:
      return 1.0;
    case vt::kSigmoid:
      return 2.5;
    case vt::kSilu:
    case vt::kGeluTanh:
      return 3.0;
    case vt::kSiluGrad:
      return 4.0;
    case vt::kGeluTanhGrad:
      return 5.0;
    case vt::kGeluErf:
      return 6.0;
    case vt::kGeluErfGrad:
      return 8.0;
    default:
      return 0.0;
  }
}

// With MOEKIT_VEC_MATH_STRIDE set (the documentation runs), the scalar
// core/activation.hpp is measured too, for comparison.
bool measure_scalar() { return std::getenv("MOEKIT_VEC_MATH_STRIDE") != nullptr; }

Activation scalar_activation(int fn) {
  if (fn <= vt::kSiluGrad) return Activation::kSilu;
  if (fn <= vt::kGeluTanhGrad) return Activation::kGeluTanh;
  return Activation::kGeluErf;
}

TEST(VecMath, AccuracyAgainstFloat64AndTheSameBitsOnEveryPath) {
  const std::vector<float> x = vt::sample_floats(sample_stride());
  std::vector<float> ref_y, y;
  for (int fn = 0; fn < vt::kMathFnCount; ++fn) {
    eval_on(Isa::kGeneric, fn, x, ref_y);
    double worst = 0.0, worst_core = 0.0;
    float worst_x = 0.0f;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double e = vt::ulp_error(ref_y[i], vt::reference(fn, x[i]));
      if (e > worst) {
        worst = e;
        worst_x = x[i];
      }
      if (std::fabs(x[i]) <= 4.0f && e > worst_core) worst_core = e;
    }
    std::printf("[ info ] %-10s max %.3f ulp (at %.9g), |x| <= 4: %.3f ulp, %zu floats\n",
                vt::math_fn_name(fn), worst, static_cast<double>(worst_x), worst_core, x.size());
    // The scalar core/activation.hpp, for comparison (documentation runs).
    if (measure_scalar() && fn >= vt::kSilu && fn <= vt::kGeluErfGrad) {
      double scalar = 0.0, scalar_core = 0.0;
      for (float v : x) {
        const Activation act = scalar_activation(fn);
        const float got =
            (fn - vt::kSilu) % 2 == 0 ? moekit::activate(act, v) : moekit::activate_grad(act, v);
        const double e = vt::ulp_error(got, vt::reference(fn, v));
        scalar = std::max(scalar, e);
        if (std::fabs(v) <= 4.0f) scalar_core = std::max(scalar_core, e);
      }
      std::printf("[ info ]   (scalar activate: max %.3f ulp, |x| <= 4: %.3f ulp)\n", scalar,
                  scalar_core);
    }
    EXPECT_LE(worst, bound(fn)) << vt::math_fn_name(fn) << " at x = " << worst_x;
    for (Isa isa : paths()) {
      if (isa == Isa::kGeneric) continue;
      eval_on(isa, fn, x, y);
      std::size_t differ = 0;
      for (std::size_t i = 0; i < x.size(); ++i) {
        if (!same(y[i], ref_y[i]) && differ++ < 3) {
          ADD_FAILURE() << vt::math_fn_name(fn) << " on " << moekit::cpu::isa_name(isa)
                        << " at x = " << x[i] << ": " << y[i] << " vs portable " << ref_y[i];
        }
      }
      EXPECT_EQ(differ, 0u) << vt::math_fn_name(fn) << " on " << moekit::cpu::isa_name(isa);
    }
  }
}

// The operations vec.hpp offers for the math, on every path, against the
// portable path, on random and special values and every tail length.
TEST(VecMath, OperationsGiveThePortableBitsOnEveryPath) {
  std::mt19937 rng(17);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  std::normal_distribution<float> normal(0.0f, 100.0f);
  const float specials[] = {0.0f,
                            -0.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            3e9f,
                            -3e9f,
                            2147483520.0f,
                            -2147483648.0f,
                            0x1p-149f,
                            1.5f,
                            -2.5f};
  using Ops = void (*)(const float*, const float*, int, float*);
  std::vector<std::pair<Isa, Ops>> ops{{Isa::kGeneric, moekit::cpu::generic::vec_ops}};
#if MOEKIT_DETAIL_X86
  if (moekit::cpu::isa_available(Isa::kAvx2))
    ops.push_back({Isa::kAvx2, moekit::cpu::avx2::vec_ops});
  if (moekit::cpu::isa_available(Isa::kAvx512)) {
    ops.push_back({Isa::kAvx512, moekit::cpu::avx512::vec_ops});
  }
#endif
  constexpr int kOut = moekit::cpu::generic::kVecOpsOutputs * 16;
  for (int trial = 0; trial < 400; ++trial) {
    float a[16], b[16];
    for (int i = 0; i < 16; ++i) {
      const int pick = static_cast<int>(rng() % 4);
      a[i] = pick == 0   ? vt::from_bits(any_bits(rng))
             : pick == 1 ? specials[rng() % 12]
                         : normal(rng);
      b[i] = rng() % 3 == 0 ? a[i] : normal(rng);
      if (rng() % 5 == 0) b[i] = specials[rng() % 12];
    }
    const int n = trial % 17;
    float want[kOut], got[kOut];
    ops[0].second(a, b, n, want);
    for (std::size_t p = 1; p < ops.size(); ++p) {
      ops[p].second(a, b, n, got);
      for (int i = 0; i < kOut; ++i) {
        ASSERT_TRUE(same(got[i], want[i])) << moekit::cpu::isa_name(ops[p].first) << " output "
                                           << i / 16 << " lane " << i % 16 << " trial " << trial;
      }
    }
    // A few against their definitions.
    for (int i = 0; i < 16; ++i) {
      ASSERT_EQ(bits(want[16 + i]), bits(a[i]) & 0x7fffffffu);
      ASSERT_EQ(bits(want[32 + i]), bits(a[i]) ^ 0x80000000u);
      ASSERT_EQ(want[48 + i], a[i] < b[i] ? 1.0f : 0.0f);
      ASSERT_EQ(bits(want[112 + i]), bits(i < n ? a[i] : b[i]));
      const bool in_range = a[i] >= -2147483648.0f && a[i] < 2147483648.0f;
      ASSERT_EQ(
          static_cast<std::int32_t>(bits(want[176 + i])),
          in_range ? static_cast<std::int32_t>(a[i]) : std::numeric_limits<std::int32_t>::min());
      // Sign-extended int8 bytes multiplied exactly.
      std::int8_t a_byte = 0, b_byte = 0;
      std::memcpy(&a_byte, reinterpret_cast<const char*>(a) + 3 + i, 1);
      std::memcpy(&b_byte, reinterpret_cast<const char*>(b) + 40 + i, 1);
      ASSERT_EQ(static_cast<std::int32_t>(bits(want[18 * 16 + i])), a_byte * b_byte);
    }
  }
}

TEST(VecMath, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> x = {0.0f, -0.0f, inf, -inf, nan, 89.0f, -104.0f, -0x1p-149f};
  std::vector<float> y;
  eval_on(Isa::kGeneric, vt::kExp, x, y);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], 1.0f);
  EXPECT_EQ(y[2], inf);
  EXPECT_EQ(bits(y[3]), 0u);
  EXPECT_TRUE(std::isnan(y[4]));
  EXPECT_EQ(y[5], inf);       // overflow
  EXPECT_EQ(bits(y[6]), 0u);  // underflow
  EXPECT_EQ(y[7], 1.0f);
  eval_on(Isa::kGeneric, vt::kLog, x, y);
  EXPECT_EQ(y[0], -inf);
  EXPECT_EQ(y[1], -inf);
  EXPECT_EQ(y[2], inf);
  EXPECT_TRUE(std::isnan(y[3]));
  EXPECT_TRUE(std::isnan(y[4]));
  EXPECT_TRUE(std::isnan(y[7]));
  // The activations' limits (core/activation.hpp): f(-inf) = 0, f(+inf) = +inf,
  // f'(-inf) = 0, f'(+inf) = 1, NaN passes.
  for (int fn : {vt::kSilu, vt::kGeluTanh, vt::kGeluErf, vt::kRelu}) {
    eval_on(Isa::kGeneric, fn, x, y);
    EXPECT_EQ(y[2], inf) << vt::math_fn_name(fn);
    EXPECT_EQ(y[3], 0.0f) << vt::math_fn_name(fn);
    EXPECT_TRUE(std::isnan(y[4])) << vt::math_fn_name(fn);
    eval_on(Isa::kGeneric, fn + 1, x, y);
    EXPECT_EQ(y[2], 1.0f) << vt::math_fn_name(fn + 1);
    EXPECT_EQ(y[3], 0.0f) << vt::math_fn_name(fn + 1);
    EXPECT_TRUE(std::isnan(y[4])) << vt::math_fn_name(fn + 1);
  }
}

// ---- the passes ----

struct Rows {
  index_t rows, cols, ld;
  std::vector<float> data;
  Rows(index_t r, index_t c, index_t pad, float fill)
      : rows(r), cols(c), ld(c + pad), data(sz(r * (c + pad)), fill) {}
  MatrixView<float> view() { return MatrixView<float>(data.data(), rows, cols, ld); }
  MatrixView<const float> cview() const {
    return MatrixView<const float>(data.data(), rows, cols, ld);
  }
  float& at(index_t i, index_t j) { return data[sz(i * ld + j)]; }
  float at(index_t i, index_t j) const { return data[sz(i * ld + j)]; }
};

Rows random_rows(index_t r, index_t c, index_t pad, float scale, std::mt19937& rng) {
  Rows m(r, c, pad, 123.0f);  // padding keeps 123
  std::normal_distribution<float> dist(0.0f, scale);
  for (index_t i = 0; i < r; ++i)
    for (index_t j = 0; j < c; ++j) m.at(i, j) = dist(rng);
  return m;
}

// f(x) or f'(x) of one element alone, on the portable path.
float element(int fn, float x) {
  std::vector<float> in{x}, out;
  eval_on(Isa::kGeneric, fn, in, out);
  return out[0];
}

int value_fn(Activation a) {
  switch (a) {
    case Activation::kRelu:
      return vt::kRelu;
    case Activation::kGeluTanh:
      return vt::kGeluTanh;
    case Activation::kGeluErf:
      return vt::kGeluErf;
    case Activation::kSilu:
      break;
  }
  return vt::kSilu;
}

const Activation kActivations[] = {Activation::kRelu, Activation::kGeluTanh, Activation::kGeluErf,
                                   Activation::kSilu};

// Every element of every row is the element function of its own inputs:
// the same bits whatever the row length, the position (tail or not) and the
// path, and padding is never written.
TEST(ElementwisePasses, ActivationRowsArePerElementOnEveryPath) {
  std::mt19937 rng(11);
  for (Activation act : kActivations) {
    const int fv = value_fn(act);
    for (index_t n : {1, 7, 16, 17, 40, 129}) {
      const Rows a = random_rows(3, n, 5, 3.0f, rng);
      const Rows g = random_rows(3, n, 2, 1.0f, rng);
      const Rows dh = random_rows(3, n, 1, 1.0f, rng);
      std::vector<float> bias(sz(n));
      for (float& b : bias) b = std::normal_distribution<float>(0.0f, 0.5f)(rng);
      for (Isa isa : paths()) {
        moekit::cpu::IsaLimit limit(isa);
        Rows h(3, n, 3, -9.0f), hp(3, n, 0, -9.0f), hb(3, n, 0, -9.0f);
        moekit::cpu::activation_rows(act, a.cview(), g.cview(), h.view());
        moekit::cpu::activation_rows(act, a.cview(), {}, hp.view());
        moekit::cpu::activation_rows(act, a.cview(), {}, hb.view(), bias.data());
        Rows d = dh, dg(3, n, 4, -9.0f), dp = dh;
        moekit::cpu::activation_rows_backward(act, a.cview(), g.cview(), d.view(), dg.view());
        moekit::cpu::activation_rows_backward(act, a.cview(), {}, dp.view(), {});
        for (index_t i = 0; i < 3; ++i) {
          for (index_t j = 0; j < n; ++j) {
            const float x = a.at(i, j), f = element(fv, x), df = element(fv + 1, x);
            const float gate = g.at(i, j), up = dh.at(i, j);
            ASSERT_TRUE(same(h.at(i, j), f * gate)) << moekit::cpu::isa_name(isa) << " n " << n;
            ASSERT_TRUE(same(hp.at(i, j), f));
            ASSERT_TRUE(same(hb.at(i, j), element(fv, x + bias[sz(j)])));
            ASSERT_TRUE(same(dg.at(i, j), up * f));
            ASSERT_TRUE(same(d.at(i, j), up * gate * df));
            ASSERT_TRUE(same(dp.at(i, j), up * df));
          }
          for (index_t j = n; j < h.ld; ++j) ASSERT_EQ(h.at(i, j), -9.0f);
          for (index_t j = n; j < dg.ld; ++j) ASSERT_EQ(dg.at(i, j), -9.0f);
          for (index_t j = n; j < d.ld; ++j) ASSERT_EQ(d.at(i, j), 123.0f);
        }
      }
    }
  }
}

// The docs' example (docs/cpu_vector_math.md): a path forced for a scope
// gives the bits of the path chosen by itself.
TEST(ElementwisePasses, ForcingAPathForAScope) {
  std::mt19937 rng(9);
  const Rows a = random_rows(2, 50, 0, 2.0f, rng), g = random_rows(2, 50, 0, 1.0f, rng);
  Rows h(2, 50, 0, 0.0f), h_generic(2, 50, 0, 0.0f);
  moekit::cpu::activation_rows(Activation::kSilu, a.cview(), g.cview(), h.view());
  const MatrixView<const float> pre = a.cview(), gate = g.cview();
  const MatrixView<float> out = h_generic.view();
  // [force_path]
  {
    // The portable path for this scope (set MOEKIT_CPU_ISA=generic for a whole run).
    moekit::cpu::IsaLimit portable(moekit::cpu::Isa::kGeneric);
    moekit::cpu::activation_rows(moekit::Activation::kSilu, pre, gate, out);  // h = SiLU(a) * g
  }
  // [force_path]
  for (std::size_t i = 0; i < h.data.size(); ++i) ASSERT_TRUE(same(h.data[i], h_generic.data[i]));
}

TEST(ElementwisePasses, ActivationInPlaceAndAgainstFloat64) {
  std::mt19937 rng(5);
  for (Activation act : kActivations) {
    const int fv = value_fn(act);
    Rows a = random_rows(4, 37, 0, 4.0f, rng);
    const Rows a0 = a;
    moekit::cpu::activation_rows(act, a.cview(), {}, a.view());  // h is a itself
    for (index_t i = 0; i < 4; ++i) {
      for (index_t j = 0; j < 37; ++j) {
        const vt::Reference r = vt::reference(fv, a0.at(i, j));
        EXPECT_LE(vt::ulp_error(a.at(i, j), r), bound(fv)) << a0.at(i, j);
      }
    }
  }
}

// ---- row losses ----

struct LossRef {
  double ce;
  std::vector<double> grad;
};
LossRef cross_entropy64(const float* z, index_t n, int y, double scale) {
  double m = z[0];
  for (index_t c = 1; c < n; ++c) m = std::max(m, static_cast<double>(z[c]));
  double total = 0.0;
  for (index_t c = 0; c < n; ++c) total += std::exp(z[c] - m);
  LossRef out{std::log(total) + m - z[y], std::vector<double>(sz(n))};
  for (index_t c = 0; c < n; ++c)
    out.grad[sz(c)] = scale * (std::exp(z[c] - m) / total - (c == y ? 1.0 : 0.0));
  return out;
}

TEST(RowLosses, CrossEntropyAgainstFloat64OnEveryPath) {
  std::mt19937 rng(3);
  for (index_t n : {1, 2, 15, 16, 17, 100, 1000}) {
    const Rows z = random_rows(1, n, 0, 4.0f, rng);
    const int y = static_cast<int>(rng() % static_cast<unsigned>(n));
    const LossRef ref = cross_entropy64(z.data.data(), n, y, 0.25);
    std::vector<float> first;
    for (Isa isa : paths()) {
      moekit::cpu::IsaLimit limit(isa);
      std::vector<float> dz(sz(n) + 1, -9.0f);
      const double ce = moekit::cpu::cross_entropy_row(z.data.data(), n, y, 0.25f, dz.data());
      EXPECT_NEAR(ce, ref.ce, 1e-5 * (1.0 + std::fabs(ref.ce))) << n;
      for (index_t c = 0; c < n; ++c) EXPECT_NEAR(dz[sz(c)], ref.grad[sz(c)], 2e-7) << c;
      EXPECT_EQ(dz[sz(n)], -9.0f);
      // A row's result is its own: the same row in any batch gives these bits.
      std::vector<float> again(sz(n));
      EXPECT_EQ(moekit::cpu::cross_entropy_row(z.data.data(), n, y, 0.25f, again.data()), ce);
      dz.pop_back();
      if (first.empty()) first = dz;
      for (index_t c = 0; c < n; ++c) {
        ASSERT_TRUE(same(dz[sz(c)], first[sz(c)])) << moekit::cpu::isa_name(isa);
        ASSERT_TRUE(same(again[sz(c)], dz[sz(c)]));
      }
    }
  }
}

TEST(RowLosses, DistillationAgainstFloat64OnEveryPath) {
  std::mt19937 rng(4);
  for (index_t n : {1, 3, 16, 33, 257}) {
    for (float alpha : {0.0f, 0.3f, 1.0f}) {
      const Rows s = random_rows(1, n, 0, 3.0f, rng), t = random_rows(1, n, 0, 3.0f, rng);
      const int y = static_cast<int>(rng() % static_cast<unsigned>(n));
      const float temp = 2.0f, scale = 0.5f;
      // float64 reference of classify::distillation_row's formulas
      std::vector<double> p(sz(n)), q(sz(n)), r(sz(n));
      const auto softmax = [&](const float* v, double inv_t, std::vector<double>& out) {
        double m = v[0];
        for (index_t c = 1; c < n; ++c) m = std::max(m, static_cast<double>(v[c]));
        double total = 0.0;
        for (index_t c = 0; c < n; ++c) total += std::exp((v[c] - m) * inv_t);
        for (index_t c = 0; c < n; ++c) out[sz(c)] = std::exp((v[c] - m) * inv_t) / total;
      };
      softmax(t.data.data(), 1.0 / temp, p);
      softmax(s.data.data(), 1.0 / temp, q);
      softmax(s.data.data(), 1.0, r);
      double kl = 0.0;
      for (index_t c = 0; c < n; ++c) kl += p[sz(c)] * std::log(p[sz(c)] / q[sz(c)]);
      std::vector<float> first;
      for (Isa isa : paths()) {
        moekit::cpu::IsaLimit limit(isa);
        std::vector<float> ds(sz(n) + 1, -9.0f);
        const moekit::classify::DistillationTerms got = moekit::cpu::distillation_row(
            s.data.data(), t.data.data(), n, y, temp, alpha, scale, ds.data());
        EXPECT_NEAR(got.kl, kl, 1e-6 * (1.0 + kl));
        if (alpha < 1.0f) {
          EXPECT_NEAR(got.ce, -std::log(r[sz(y)]), 1e-5);
        }
        for (index_t c = 0; c < n; ++c) {
          const double want = scale * (alpha * temp * (q[sz(c)] - p[sz(c)]) +
                                       (1.0 - alpha) * (r[sz(c)] - (c == y ? 1.0 : 0.0)));
          EXPECT_NEAR(ds[sz(c)], want, 2e-7) << c;
        }
        EXPECT_EQ(ds[sz(n)], -9.0f);
        ds.pop_back();
        if (first.empty()) first = ds;
        for (index_t c = 0; c < n; ++c) ASSERT_TRUE(same(ds[sz(c)], first[sz(c)]));
      }
    }
  }
}

}  // namespace
