#pragma once
// Seeded random inputs for the benchmark binaries.

#include <cstddef>
#include <random>
#include <vector>

namespace moekit_bench {

// n floats drawn from N(0, scale^2), the same for the same seed.
inline std::vector<float> random_vector(std::size_t n, float scale, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

}  // namespace moekit_bench
