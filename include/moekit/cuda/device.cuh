#pragma once
// Device discovery for the CUDA backend and its tests.

#include <cuda_runtime_api.h>

#include "moekit/cuda/error.cuh"

MOEKIT_NAMESPACE_BEGIN
namespace gpu {

// Number of usable CUDA devices. A machine without a GPU or driver reports an
// error from cudaGetDeviceCount (cudaErrorNoDevice, cudaErrorInsufficientDriver,
// ...) rather than zero; that error is returned in `status` and the count is 0.
inline int device_count(cudaError_t* status = nullptr) {
  int count = 0;
  const cudaError_t result = cudaGetDeviceCount(&count);
  if (result != cudaSuccess) count = 0;
  if (status != nullptr) *status = result;
  return count;
}

}  // namespace gpu
MOEKIT_NAMESPACE_END
