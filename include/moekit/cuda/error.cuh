#pragma once
// CUDA and cuBLAS status handling for the CUDA backend.
//
// Two layers, as in CUB: internal steps return cudaError_t and pass the first
// failure up with MOEKIT_CUDA_TRY; public host entry points turn a failure
// into moekit::Error with MOEKIT_CUDA_CHECK / MOEKIT_CUBLAS_CHECK, whose
// message names the call, the error and its description.
//
// The backend's namespace is moekit::gpu, not moekit::cuda, so that it never
// shadows libcu++'s ::cuda for code that says `using namespace moekit`.

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "moekit/core/error.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace gpu::detail {

[[noreturn]] MOEKIT_NOINLINE inline void fail_cuda(cudaError_t status, const char* call,
                                                   const char* where) {
  ::moekit::detail::fail(Errc::kCudaError, where,
                         ::moekit::detail::concat(call, " failed: ", cudaGetErrorName(status), " (",
                                                  cudaGetErrorString(status), ")"));
}

[[noreturn]] MOEKIT_NOINLINE inline void fail_cublas(cublasStatus_t status, const char* call,
                                                     const char* where) {
  ::moekit::detail::fail(Errc::kCublasError, where,
                         ::moekit::detail::concat(call, " failed: ", cublasGetStatusName(status),
                                                  " (", cublasGetStatusString(status), ")"));
}

}  // namespace gpu::detail
MOEKIT_NAMESPACE_END

// The macros are variadic so that an expression with template commas,
// MOEKIT_CUDA_CHECK(f<A, B>(x)), needs no extra parentheses.

// Returns the cudaError_t of the expression from the enclosing function if it failed.
#define MOEKIT_CUDA_TRY(...)                          \
  do {                                                \
    const cudaError_t moekit_status_ = (__VA_ARGS__); \
    if (moekit_status_ != cudaSuccess) [[unlikely]] { \
      return moekit_status_;                          \
    }                                                 \
  } while (false)

// Throws moekit::Error (kCudaError) if the expression did not return cudaSuccess.
#define MOEKIT_CUDA_CHECK(...)                                                  \
  do {                                                                          \
    const cudaError_t moekit_status_ = (__VA_ARGS__);                           \
    if (moekit_status_ != cudaSuccess) [[unlikely]] {                           \
      ::moekit::gpu::detail::fail_cuda(moekit_status_, #__VA_ARGS__, __func__); \
    }                                                                           \
  } while (false)

// Throws moekit::Error (kCublasError) if the expression did not return CUBLAS_STATUS_SUCCESS.
#define MOEKIT_CUBLAS_CHECK(...)                                                  \
  do {                                                                            \
    const cublasStatus_t moekit_status_ = (__VA_ARGS__);                          \
    if (moekit_status_ != CUBLAS_STATUS_SUCCESS) [[unlikely]] {                   \
      ::moekit::gpu::detail::fail_cublas(moekit_status_, #__VA_ARGS__, __func__); \
    }                                                                             \
  } while (false)
