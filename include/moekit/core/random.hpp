#pragma once
// Counter-based random numbers, identical on host and device.
//
// A value is a pure function of (seed, counter): no generator state, so a
// kernel thread, an OpenMP worker and a backward pass that must regenerate a
// forward pass's noise all get the same number for the same element. The
// caller seeds each training step (e.g. seed = run_seed ^ step) and moekit
// numbers the elements (counter = token * width + column).
//
// The mixer is SplitMix64's finaliser, applied to the counter and again after
// the seed is folded in, so neighbouring seeds and counters give unrelated
// values.

#include <cmath>
#include <cstdint>

#include "moekit/core/config.hpp"

MOEKIT_NAMESPACE_BEGIN

// SplitMix64's finaliser: a bijection of 64-bit words that spreads every
// input bit over the whole output.
MOEKIT_HOST_DEVICE constexpr std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// 64 random bits for element `counter` of stream `seed`.
MOEKIT_HOST_DEVICE constexpr std::uint64_t random_bits(std::uint64_t seed, std::uint64_t counter) {
  return mix64(mix64(counter + 0x9e3779b97f4a7c15ULL) ^ seed);
}

// Uniform in [0, 1), 24 random bits: every value is exact in float.
MOEKIT_HOST_DEVICE constexpr float random_uniform(std::uint64_t seed, std::uint64_t counter) {
  return static_cast<float>(random_bits(seed, counter) >> 40) * (1.0f / 16777216.0f);
}

// Standard normal by Box-Muller from the two 32-bit halves of one draw.
MOEKIT_HOST_DEVICE inline float random_normal(std::uint64_t seed, std::uint64_t counter) {
  const std::uint64_t bits = random_bits(seed, counter);
  // u1 in (0, 1] so log(u1) is finite; u2 in [0, 1).
  const float u1 = (static_cast<float>(bits >> 40) + 1.0f) * (1.0f / 16777216.0f);
  const float u2 = static_cast<float>((bits >> 8) & 0xFFFFFFu) * (1.0f / 16777216.0f);
  constexpr float kTwoPi = 6.28318530717958647692f;
  using std::cos, std::log, std::sqrt;
  return sqrt(-2.0f * log(u1)) * cos(kTwoPi * u2);
}

MOEKIT_NAMESPACE_END
