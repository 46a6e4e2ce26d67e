// The probe built with AVX-512 flags (see odr_probe.hpp and
// tests/cpu/CMakeLists.txt). Linked last, so that the linker keeps the other
// TUs' copies of the inline functions all of them share, and run only on a
// CPU with AVX-512.
#if !defined(__AVX512F__)
#error "odr_avx512.cpp must be compiled with -mavx512f"
#endif
#define ODR_PROBE_NAME probe_avx512
#include "odr_probe-inl.hpp"

static_assert(moekit::cpu::detail::panel_floats<8>(1000) == 63 * 16 * 8);
