// The probe built with -mavx2 -mfma (see odr_probe.hpp and tests/cpu/CMakeLists.txt).
#if !defined(__AVX2__) || !defined(__FMA__)
#error "odr_avx2.cpp must be compiled with -mavx2 -mfma"
#endif
#define ODR_PROBE_NAME probe_avx2
#include "odr_probe-inl.hpp"

static_assert(moekit::cpu::detail::panel_floats<8>(1000) == 63 * 16 * 8);
