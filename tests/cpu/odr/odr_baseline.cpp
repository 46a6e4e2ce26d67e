// The probe with the project's flags (see odr_probe.hpp).
#define ODR_PROBE_NAME probe_baseline
#include "odr_probe-inl.hpp"

// The panel layout is a constant, whatever the flags.
static_assert(moekit::cpu::detail::panel_floats<8>(1000) == 63 * 16 * 8);
