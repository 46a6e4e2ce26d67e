// The CPU ceiling on its own: large SGEMM (Eigen) at 1 and 2 threads, and
// copy bandwidth. Names carry the size, so --benchmark_filter=":256(/|$)" selects
// the smoke sizes.
#include "ceiling.hpp"

namespace {

void BM_sgemm(benchmark::State& state) {
  const auto n = static_cast<Eigen::Index>(state.range(0));
  moekit_bench::sgemm(state, n, n, n, static_cast<int>(state.range(1)));
}
BENCHMARK(BM_sgemm)
    ->ArgNames({"n", "threads"})
    ->ArgsProduct({{256, 1024, 2048, 4096}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_copy(benchmark::State& state) {
  moekit_bench::copy_bandwidth(state, static_cast<std::size_t>(state.range(0)) << 20);
}
BENCHMARK(BM_copy)->ArgName("MiB")->Arg(256)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
