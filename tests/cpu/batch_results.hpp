#pragma once
// An item's results in a batch-invariance test (docs/determinism.md), and
// how a difference is reported: shared by the CPU harness
// (batch_invariance.hpp) and the CUDA tests (tests/cuda/test_batch_invariance.cu).
// Results are floats, one vector per item; integers (expert ids, classes)
// are passed as floats, which hold them exactly.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <sstream>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace moekit_test {

using BatchResults = std::vector<std::vector<float>>;

namespace detail {

inline bool has_nan(const std::vector<float>& v) {
  return std::any_of(v.begin(), v.end(), [](float x) { return std::isnan(x); });
}

// "element i: 0x... vs 0x..." for the first element whose bits differ.
inline std::string first_difference(const std::vector<float>& got, const std::vector<float>& want) {
  std::ostringstream s;
  if (got.size() != want.size()) {
    s << got.size() << " values, alone " << want.size();
    return s.str();
  }
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!same_bits(&got[i], 1, &want[i], 1)) {
      std::uint32_t got_bits = 0, want_bits = 0;
      std::memcpy(&got_bits, &got[i], sizeof got_bits);
      std::memcpy(&want_bits, &want[i], sizeof want_bits);
      s << "element " << i << ": " << std::setprecision(9) << got[i] << " (0x" << std::hex
        << got_bits << ") in the batch, " << want[i] << " (0x" << want_bits << ") alone";
      break;
    }
  }
  return s.str();
}

}  // namespace detail
}  // namespace moekit_test
