#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "moekit/cpu/isa.hpp"
#include "moekit/cpu/vec.hpp"

// The test kernel, once per path.
MOEKIT_NAMESPACE_BEGIN
namespace cpu {
#define MOEKIT_PER_ISA_FILE "vec_kernel-inl.hpp"
#include "moekit/cpu/detail/per_isa.hpp"
#undef MOEKIT_PER_ISA_FILE
}  // namespace cpu
MOEKIT_NAMESPACE_END

namespace {

using moekit::cpu::Isa;

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

TEST(Isa, NamesRoundTrip) {
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512, Isa::kAmx}) {
    Isa parsed = Isa::kGeneric;
    ASSERT_TRUE(moekit::cpu::parse_isa(moekit::cpu::isa_name(isa), parsed));
    EXPECT_EQ(parsed, isa);
  }
  Isa untouched = Isa::kAvx2;
  EXPECT_FALSE(moekit::cpu::parse_isa("AVX2", untouched));
  EXPECT_FALSE(moekit::cpu::parse_isa("", untouched));
  EXPECT_EQ(untouched, Isa::kAvx2);
}

TEST(Isa, FeaturesNest) {
  const auto& f = moekit::cpu::cpu_features();
  EXPECT_TRUE(!f.amx || (f.avx512 && f.avx512_bf16 && f.avx512_vnni));
  EXPECT_TRUE(!(f.avx512_bf16 || f.avx512_vnni) || f.avx512);
  EXPECT_TRUE(!f.avx512 || f.avx2);
  EXPECT_TRUE(moekit::cpu::isa_available(Isa::kGeneric));
  EXPECT_TRUE(moekit::cpu::isa_available(f.best()));
  std::printf("[ info ] CPU paths: best %s, active %s\n", moekit::cpu::isa_name(f.best()),
              moekit::cpu::isa_name(moekit::cpu::active_isa()));
}

TEST(Isa, LimitCapsTheActivePathAndRestores) {
  const Isa before = moekit::cpu::active_isa();
  {
    moekit::cpu::IsaLimit scope(Isa::kGeneric);
    EXPECT_EQ(moekit::cpu::active_isa(), Isa::kGeneric);
    {
      moekit::cpu::IsaLimit inner(Isa::kAvx2);
      EXPECT_EQ(moekit::cpu::active_isa(),
                moekit::cpu::isa_available(Isa::kAvx2) ? Isa::kAvx2 : Isa::kGeneric);
    }
    EXPECT_EQ(moekit::cpu::active_isa(), Isa::kGeneric);
  }
  EXPECT_EQ(moekit::cpu::active_isa(), before);
  // A cap above the machine selects what the machine has.
  moekit::cpu::IsaLimit scope(Isa::kAmx);
  EXPECT_LE(moekit::cpu::active_isa(), moekit::cpu::cpu_features().best());
}

// Registered a second time with MOEKIT_CPU_ISA=generic (tests/cpu/CMakeLists.txt);
// in the plain run the variable is unset.
TEST(Isa, EnvironmentVariableCaps) {
  const char* value = std::getenv("MOEKIT_CPU_ISA");
  if (value == nullptr) {
    EXPECT_EQ(moekit::cpu::active_isa(), moekit::cpu::cpu_features().best());
  } else {
    Isa cap = Isa::kAmx;
    ASSERT_TRUE(moekit::cpu::parse_isa(value, cap));
    EXPECT_LE(moekit::cpu::active_isa(), cap);
  }
}

struct KernelOut {
  std::vector<float> y, z;
};

template <class Fn>
KernelOut run_kernel(Fn fn, const std::vector<float>& x, const std::vector<float>& w, int rows,
                     int n) {
  KernelOut out{std::vector<float>(static_cast<std::size_t>(rows) + 1, -7.0f),
                std::vector<float>(static_cast<std::size_t>(rows) + 1, -7.0f)};
  fn(x.data(), w.data(), rows, n, 0.37f, out.y.data(), out.z.data());
  EXPECT_EQ(out.y[static_cast<std::size_t>(rows)], -7.0f);  // nothing past the end
  EXPECT_EQ(out.z[static_cast<std::size_t>(rows)], -7.0f);
  return out;
}

TEST(Vec, EveryPathGivesTheSameBitsAsThePortableOne) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int n : {1, 5, 15, 16, 17, 31, 32, 100, 257}) {
    const int rows = 9;
    // Exactly as many elements as needed: a partial load reading past the end
    // would read beyond the vector (caught by the sanitizer pass).
    std::vector<float> x(static_cast<std::size_t>(rows * n)), w(static_cast<std::size_t>(n));
    for (float& v : x) v = dist(rng);
    for (float& v : w) v = dist(rng);
    const KernelOut ref = run_kernel(moekit::cpu::generic::vec_kernel, x, w, rows, n);
    // The portable path against a plain float64-free scalar loop of the same order:
    // lane l holds the fmas of columns l, l+16, ...; the tree then sums the lanes.
    for (int i = 0; i < rows; ++i) {
      float lane[16] = {};
      for (int j = 0; j < n; ++j)
        lane[j % 16] = std::fma(x[static_cast<std::size_t>(i * n + j)],
                                w[static_cast<std::size_t>(j)], lane[j % 16]);
      for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
      EXPECT_EQ(bits(ref.y[static_cast<std::size_t>(i)]), bits(lane[0]))
          << "n " << n << " row " << i;
    }
#if MOEKIT_DETAIL_X86
    if (moekit::cpu::isa_available(Isa::kAvx2)) {
      const KernelOut got = run_kernel(moekit::cpu::avx2::vec_kernel, x, w, rows, n);
      for (int i = 0; i < rows; ++i) {
        EXPECT_EQ(bits(got.y[static_cast<std::size_t>(i)]),
                  bits(ref.y[static_cast<std::size_t>(i)]))
            << "avx2 n " << n;
        EXPECT_EQ(bits(got.z[static_cast<std::size_t>(i)]),
                  bits(ref.z[static_cast<std::size_t>(i)]))
            << "avx2 n " << n;
      }
    }
    if (moekit::cpu::isa_available(Isa::kAvx512)) {
      const KernelOut got = run_kernel(moekit::cpu::avx512::vec_kernel, x, w, rows, n);
      for (int i = 0; i < rows; ++i) {
        EXPECT_EQ(bits(got.y[static_cast<std::size_t>(i)]),
                  bits(ref.y[static_cast<std::size_t>(i)]))
            << "avx512 n " << n;
        EXPECT_EQ(bits(got.z[static_cast<std::size_t>(i)]),
                  bits(ref.z[static_cast<std::size_t>(i)]))
            << "avx512 n " << n;
      }
    }
#endif
  }
}

// mul rounds on its own: add(mul(a, b), c) is not an FMA on any path.
TEST(Vec, ProductsAreNotFused) {
  const float a = 1.0f + 0x1p-12f, b = 1.0f + 0x1p-12f, c = -(1.0f + 0x1p-11f);
  volatile float product = a * b;         // 1 + 2^-11 + 2^-24 rounds (volatile: no contraction)
  const float separate = product + c;     // 0
  const float fused = std::fma(a, b, c);  // 2^-24
  ASSERT_NE(bits(separate), bits(fused));
  namespace g = moekit::cpu::generic;
  float out[16];
  g::store(out, g::add(g::mul(g::set1(a), g::set1(b)), g::set1(c)));
  EXPECT_EQ(bits(out[3]), bits(separate));
  g::store(out, g::fmadd(g::set1(a), g::set1(b), g::set1(c)));
  EXPECT_EQ(bits(out[3]), bits(fused));
}

TEST(Vec, MaxMinFollowTheInstructionRuleOnNaN) {
  namespace g = moekit::cpu::generic;
  const float nan = std::nanf("");
  float out[16];
  g::store(out, g::max(g::set1(nan), g::set1(2.0f)));
  EXPECT_EQ(out[0], 2.0f);  // NaN in the first operand: the second
  g::store(out, g::max(g::set1(2.0f), g::set1(nan)));
  EXPECT_TRUE(std::isnan(out[0]));  // NaN in the second: the second
  g::store(out, g::min(g::set1(nan), g::set1(2.0f)));
  EXPECT_EQ(out[0], 2.0f);
}

}  // namespace
