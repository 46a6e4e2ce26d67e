// Translation units built with different target flags agree on every
// workspace size and give the same bits (odr_probe.hpp). The AVX-512 TU runs
// only where the CPU has AVX-512; elsewhere it is compiled (its
// static_asserts hold) and left alone.

#include <gtest/gtest.h>

#include <cstring>

#include "moekit/cpu/isa.hpp"
#include "odr_probe.hpp"

namespace {

void expect_same(const odr_test::ProbeResult& got, const odr_test::ProbeResult& want) {
  EXPECT_EQ(got.panel_floats, want.panel_floats) << got.flags;
  EXPECT_EQ(got.workspace_sizes, want.workspace_sizes) << got.flags;
  ASSERT_EQ(got.values.size(), want.values.size()) << got.flags;
  EXPECT_EQ(std::memcmp(got.values.data(), want.values.data(), got.values.size() * sizeof(float)),
            0)
      << got.flags << " gives other bits than " << want.flags;
}

TEST(Odr, TranslationUnitsWithOtherFlagsAgreeOnEveryPath) {
  using moekit::cpu::Isa;
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512}) {
    if (!moekit::cpu::isa_available(isa)) continue;
    moekit::cpu::IsaLimit limit(isa);
    const odr_test::ProbeResult base = odr_test::probe_baseline();
    EXPECT_EQ(base.flags, "baseline");
    std::printf("[ info ] %s path: LoraBank<8> workspace_size(64) for d = 7, 1000, 1024, 4099:",
                moekit::cpu::isa_name(isa));
    for (moekit::index_t s : base.workspace_sizes) std::printf(" %lld", static_cast<long long>(s));
    std::printf("\n");
    const odr_test::ProbeResult avx2 = odr_test::probe_avx2();
    EXPECT_EQ(avx2.flags, "avx2 fma");
    expect_same(avx2, base);
    if (moekit::cpu::cpu_features().avx512) {
      const odr_test::ProbeResult avx512 = odr_test::probe_avx512();
      EXPECT_EQ(avx512.flags, "avx512f");
      expect_same(avx512, base);
    } else if (isa == Isa::kGeneric) {
      std::printf("[ info ] no AVX-512 here: the AVX-512-flagged TU is compiled, not run\n");
    }
  }
}

}  // namespace
