#pragma once
// Owning buffers for a Routing, poisoned so an unwritten element shows.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "moekit/cpu/router.hpp"

namespace moekit_test {

inline constexpr float kPoison = std::numeric_limits<float>::quiet_NaN();
inline constexpr std::int32_t kPoisonId = -777;

template <moekit::MoeSpecType S>
struct RoutingBuffers {
  static constexpr int E = S::num_experts;
  static constexpr int K = S::top_k;
  std::int64_t tokens;
  std::vector<float> logits, scores, weights;
  std::vector<std::int32_t> ids, positions;

  explicit RoutingBuffers(std::int64_t t)
      : tokens(t),
        logits(moekit::to_size(t * E), kPoison),
        scores(moekit::to_size(t * E), kPoison),
        weights(moekit::to_size(t * K), kPoison),
        ids(moekit::to_size(t * K), kPoisonId),
        positions(moekit::to_size(t * K), kPoisonId) {}

  moekit::cpu::Routing view() {
    return {{logits.data(), tokens, E},
            {scores.data(), tokens, E},
            {ids.data(), tokens, K},
            {weights.data(), tokens, K},
            {positions.data(), tokens, K}};
  }
};

}  // namespace moekit_test
