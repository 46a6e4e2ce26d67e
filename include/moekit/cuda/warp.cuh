#pragma once
// Warp-wide reductions shared by the CUDA kernels. Each is a fixed XOR
// butterfly, so every lane ends with the same value and each partial result
// forms in the same order on every run (deterministic, no atomics).

#include <cuda_runtime_api.h>

#include "moekit/core/config.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace gpu {
namespace detail {

inline constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// The sum over a warp's lanes (float, double or int).
template <class U>
MOEKIT_DEVICE inline U warp_sum(U v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullWarp, v, offset);
  return v;
}

// The maximum over a warp's lanes (fmaxf: a NaN loses to any number).
MOEKIT_DEVICE inline float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(kFullWarp, v, offset));
  return v;
}

}  // namespace detail
}  // namespace gpu
MOEKIT_NAMESPACE_END
