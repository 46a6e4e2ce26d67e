#pragma once
// The CPU ceilings every moekit benchmark is set beside, measured in the same
// run: Eigen's large-SGEMM rate and streaming copy bandwidth. Other
// benchmarks call these to report their rate as a fraction of the machine's.

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cstddef>
#include <cstring>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace moekit_bench {

// Reports `flops` per iteration as a GFLOP/s counter.
inline void set_rate(benchmark::State& state, double flops) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Threads for Eigen's GEMM; with OpenMP off Eigen runs on one thread.
inline void set_threads(int threads) {
#if defined(_OPENMP)
  omp_set_num_threads(threads);
#endif
  Eigen::setNbThreads(threads);
}

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// C = A B with m x k by k x n float matrices; sets GFLOP/s counters.
inline void sgemm(benchmark::State& state, Eigen::Index m, Eigen::Index n, Eigen::Index k,
                  int threads) {
  set_threads(threads);
  RowMatrix a = RowMatrix::Random(m, k);
  RowMatrix b = RowMatrix::Random(k, n);
  RowMatrix c(m, n);
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  const double flops =
      2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  set_rate(state, flops);
  state.counters["threads"] = threads;
}

// Streaming copy of `bytes` bytes (read + write counted).
inline void copy_bandwidth(benchmark::State& state, std::size_t bytes) {
  std::vector<char> src(bytes, 1);
  std::vector<char> dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] = benchmark::Counter(2.0 * static_cast<double>(bytes) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace moekit_bench
