#pragma once
// Configuration shared by every moekit header: language check, the versioned
// inline namespace, host-device annotations and the internal assert hook.
// Users may predefine MOEKIT_ASSERT before including any moekit header.

#include "moekit/version.hpp"

#if defined(_MSVC_LANG)
#define MOEKIT_DETAIL_CPLUSPLUS _MSVC_LANG
#else
// The C++ standard in effect (MSVC reports it in _MSVC_LANG instead).
#define MOEKIT_DETAIL_CPLUSPLUS __cplusplus
#endif
#if MOEKIT_DETAIL_CPLUSPLUS < 202002L
#error \
    "moekit requires C++20 (-std=c++20; for nvcc with CMake < 3.26 add -std=c++20 to the CUDA flags)"
#endif

// ABI namespace: moekit::v0_1 for 0.1.x. Two moekit versions linked into one
// program then never share a mangled name. Within 0.x a minor bump may break.
#define MOEKIT_DETAIL_CAT4(a, b, c, d) a##b##c##d
// The ABI namespace's name for a version: v<major>_<minor>.
#define MOEKIT_DETAIL_ABI(major, minor) MOEKIT_DETAIL_CAT4(v, major, _, minor)
// This version's ABI namespace name (v0_1).
#define MOEKIT_ABI_NAMESPACE MOEKIT_DETAIL_ABI(MOEKIT_VERSION_MAJOR, MOEKIT_VERSION_MINOR)

// Opens moekit's versioned namespace, moekit::v<major>_<minor>; every
// header's declarations sit between this and MOEKIT_NAMESPACE_END.
#define MOEKIT_NAMESPACE_BEGIN \
  namespace moekit {           \
  inline namespace MOEKIT_ABI_NAMESPACE {
// Closes what MOEKIT_NAMESPACE_BEGIN opened.
#define MOEKIT_NAMESPACE_END \
  }                          \
  }

// Host-device annotations. Portable (.hpp) code that kernels also call is
// marked MOEKIT_HOST_DEVICE; under a host compiler the macros are empty.
#if defined(__CUDACC__)
#define MOEKIT_HOST_DEVICE __host__ __device__
#define MOEKIT_DEVICE __device__
#define MOEKIT_HOST __host__
#else
// Marks a function callable from host and device code (__host__ __device__).
#define MOEKIT_HOST_DEVICE
// Marks a device-only function (__device__ under nvcc).
#define MOEKIT_DEVICE
// Marks a host-only function in CUDA code (__host__ under nvcc).
#define MOEKIT_HOST
#endif

// True while compiling device code (the __CUDA_ARCH__ pass of nvcc).
#if defined(__CUDA_ARCH__)
#define MOEKIT_DEVICE_CODE 1
#else
#define MOEKIT_DEVICE_CODE 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MOEKIT_FORCE_INLINE inline __attribute__((always_inline))
#define MOEKIT_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define MOEKIT_FORCE_INLINE __forceinline
#define MOEKIT_NOINLINE __declspec(noinline)
#else
// Inlines a hot helper even where the compiler's heuristics would not
// (always_inline / __forceinline where supported, else plain inline).
#define MOEKIT_FORCE_INLINE inline
// Keeps a cold function (the error paths) out of line, so that the checks
// around its calls stay small, where the compiler supports it.
#define MOEKIT_NOINLINE
#endif

// Internal invariants (never user input: that is checked by MOEKIT_CHECK_*
// and always on). Compiled out with NDEBUG unless the user overrides it.
#ifndef MOEKIT_ASSERT
#include <cassert>
#define MOEKIT_ASSERT(cond) assert(cond)
#endif

// Exceptions can be switched off (-fno-exceptions or MOEKIT_NO_EXCEPTIONS):
// a failed check then prints its message and aborts.
#if !defined(MOEKIT_NO_EXCEPTIONS) && !defined(__cpp_exceptions)
#define MOEKIT_NO_EXCEPTIONS
#endif
