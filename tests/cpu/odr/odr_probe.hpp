#pragma once
// One-definition-rule check: the same moekit code compiled into translation
// units with different target flags (odr_baseline.cpp: the project's flags;
// odr_avx2.cpp: -mavx2 -mfma; odr_avx512.cpp: -mavx512f and friends) must
// agree on every size and layout and give the same bits. Each TU defines one
// probe from odr_probe-inl.hpp.

#include <cstdint>
#include <string>
#include <vector>

#include "moekit/core/types.hpp"

namespace odr_test {

struct ProbeResult {
  std::string flags;  // what the compiler targeted in that TU
  moekit::index_t panel_floats = 0;
  std::vector<moekit::index_t> workspace_sizes;  // LoraBank<8>, several shapes
  std::vector<float> values;                     // LoRA bank, element-wise passes and row losses
};

ProbeResult probe_baseline();
ProbeResult probe_avx2();
// Compiled with AVX-512 flags: call it only where the CPU has AVX-512.
ProbeResult probe_avx512();

}  // namespace odr_test
