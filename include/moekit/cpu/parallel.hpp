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
#define MOEKIT_PARALLEL_FOR_IF(cond)
#endif

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// Work (in elements touched) below which a loop stays on one thread.
inline constexpr long kParallelGrain = 1L << 15;

}  // namespace cpu
MOEKIT_NAMESPACE_END
