#pragma once
// OpenMP hooks for the CPU backend. moekit never requires OpenMP: compiled
// without -fopenmp the loops run serially and give the same results, since
// every parallel loop writes disjoint outputs and every reduction is done in
// a fixed order afterwards.

#include "moekit/core/config.hpp"

#if defined(_OPENMP)
#include <omp.h>
#define MOEKIT_DETAIL_PRAGMA(x) _Pragma(#x)
// A parallel loop over independent iterations, used only when `cond` (the
// work is large enough to pay for waking the threads).
#define MOEKIT_PARALLEL_FOR_IF(cond) MOEKIT_DETAIL_PRAGMA(omp parallel for schedule(static) if(cond))
#else
// Without OpenMP the loop after it runs serially, with the same results.
#define MOEKIT_PARALLEL_FOR_IF(cond)
#endif

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// Elements below which a loop stays on one thread. Waking OpenMP workers
// (sleeping under OMP_WAIT_POLICY=PASSIVE) costs tens of microseconds, so
// light loops (a few instructions per element: sums, one exp) need far more
// elements than heavy ones (gating: softmax, top-k, weights) to gain.
inline constexpr long kParallelGrain = 1L << 15;
// The grain of light loops (sums, one exp per element).
inline constexpr long kLightParallelGrain = 1L << 20;

// OpenMP's thread queries, 1 / 0 / 1 / false without OpenMP.
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// The calling thread's number in the current parallel region, 0 outside one.
inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Threads in the current parallel region, 1 outside one.
inline int num_threads() {
#if defined(_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Whether the caller runs inside an active OpenMP parallel region (work
// started there stays on the calling thread: one thread pool at a time).
inline bool in_parallel() {
#if defined(_OPENMP)
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

}  // namespace cpu
MOEKIT_NAMESPACE_END
