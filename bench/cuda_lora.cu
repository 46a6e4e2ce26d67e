// GPU multi-LoRA benchmarks: gpu::LoraBank (bf16, fp32 accumulation) adding
// N adapters' low-rank updates to a layer whose base output the caller owns
// (weights.w empty: only the adapters' work is timed), forward (shrink +
// expand) and backward (dh, db, da, dx), each row on one of N adapters drawn
// uniformly, beside the same run's device-to-device copy bandwidth.
//
// The work is memory-bound (R << d), so the measure is bandwidth: the bytes
// the adapters must move at least, over the time.
//   forward   x read, y read and written, every adapter's a and b read, h written
//   backward  dy and x read, dx read and written, a, b read, h read, dh
//             written and read, da and db (fp32) written
// Reported: GB/s, copy_GB/s (the ceiling) and of_copy (goal: >= 0.5 for R = 16
// with 64 adapters), and group_us, the per-batch grouping (a CUB radix sort
// of the ids), which forward's time does not include.
//
// Shapes: T = 16384 rows, d_in = d_out = 4096 (the LoRA d of docs/index.md#benchmark-sizes, T
// scaled to fill the chip), N in {1, 8, 64} at R = 16, and R = 64 at N = 64.
// Without a CUDA device the binary exits with 77 (CTest: skipped).
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "moekit/cuda/lora.cuh"

namespace {

using moekit::index_t;
using moekit::LoraSpec;
using T = __nv_bfloat16;
namespace gpu = moekit::gpu;

using moekit_bench::copy_gbps;
using moekit_bench::DeviceMemory;

template <int R>
void bench_lora(benchmark::State& state, index_t adapters, bool backward) {
  const index_t n = state.range(0), d = 4096;
  const gpu::LoraBank<LoraSpec<R>, T> bank({.d_in = d, .d_out = d, .num_adapters = adapters});
  const auto bf16 = [](index_t r, index_t c) { return static_cast<std::size_t>(r * c) * 2; };
  DeviceMemory x(bf16(n, d)), y(bf16(n, d)), dy(bf16(n, d)), dx(bf16(n, d)),
      a(bf16(adapters * R, d)), b(bf16(adapters * d, R)), h(static_cast<std::size_t>(n * R) * 4),
      da(static_cast<std::size_t>(adapters * R * d) * 4),
      db(static_cast<std::size_t>(adapters * d * R) * 4), ids(static_cast<std::size_t>(n) * 4),
      order(static_cast<std::size_t>(n) * 8), offsets(static_cast<std::size_t>(adapters + 1) * 8),
      group_ws(bank.group_workspace_size(n)), ws(bank.workspace_size(n));
  {
    std::vector<std::int32_t> host(static_cast<std::size_t>(n));
    std::mt19937 gen(5);
    std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(adapters - 1));
    for (auto& id : host) id = pick(gen);
    MOEKIT_CUDA_CHECK(cudaMemcpy(ids.p, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
  }
  const gpu::LoraRows rows{
      {ids.as<std::int32_t>(), n}, {order.as<index_t>(), n}, {offsets.as<index_t>(), adapters + 1}};
  const auto group = [&] {
    bank.group(rows.ids, {order.as<index_t>(), n}, {offsets.as<index_t>(), adapters + 1}, nullptr,
               group_ws.p, group_ws.bytes);
  };
  const double group_s = moekit_bench::seconds_per_call(group, 10);
  const gpu::LoraWeights<T> w{{}, {}, {a.as<T>(), adapters * R, d}, {b.as<T>(), adapters * d, R}};
  const auto run = [&] {
    if (backward) {
      bank.backward(nullptr, {dy.as<T>(), n, d}, {x.as<T>(), n, d}, rows, w, {h.as<float>(), n, R},
                    {}, {dx.as<T>(), n, d},
                    {{da.as<float>(), adapters * R, d}, {db.as<float>(), adapters * d, R}}, ws.p,
                    ws.bytes);
    } else {
      bank.forward(nullptr, {x.as<T>(), n, d}, rows, w, {y.as<T>(), n, d}, {h.as<float>(), n, R},
                   {}, ws.p, ws.bytes);
    }
  };
  run();  // warm-up
  double seconds = 0.0;
  for (auto _ : state) {
    const double t = moekit_bench::time_ms(run) * 1e-3;
    state.SetIterationTime(t);
    seconds += t;
  }
  const double act = static_cast<double>(bf16(n, d));
  const double factors = static_cast<double>(a.bytes + b.bytes);
  const double hb = static_cast<double>(h.bytes);
  const double bytes = backward
                           ? 4 * act + factors + 3 * hb + static_cast<double>(da.bytes + db.bytes)
                           : 3 * act + factors + hb;
  const double achieved = bytes * static_cast<double>(state.iterations()) / seconds * 1e-9;
  const double ceiling = copy_gbps(static_cast<std::size_t>(bytes / 2));
  state.counters["GB/s"] = achieved;
  state.counters["copy_GB/s"] = ceiling;
  state.counters["of_copy"] = ceiling > 0.0 ? achieved / ceiling : 0.0;
  state.counters["group_us"] = group_s * 1e6;
  state.SetLabel(backward ? "bwd" : "fwd");
}

template <int R>
void register_shape(index_t adapters) {
  for (bool backward : {false, true}) {
    const std::string name = std::string(backward ? "lora_bwd/" : "lora_fwd/") + "N" +
                             std::to_string(adapters) + "_R" + std::to_string(R) + "_bf16";
    benchmark::RegisterBenchmark(name.c_str(),
                                 [=](benchmark::State& s) { bench_lora<R>(s, adapters, backward); })
        ->Arg(16384)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (moekit_bench::no_device()) return 77;
  register_shape<16>(1);
  register_shape<16>(8);
  register_shape<16>(64);
  register_shape<64>(64);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
