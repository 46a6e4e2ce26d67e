// Session memory (issue 23): the cost of one read and one write of
// SessionMemory (moekit/nn/session_memory.hpp) for one row, and of a read of
// 256 rows spread over 16 sessions, at two sizes:
//   logits  d_model 384, d_key 64, d_value 5, 32^2 = 1024 slots: the
//           protocol of examples/16_session_memory (corrections of a head's
//           logits over all-MiniLM-L6-v2 embeddings);
//   pooled  d_model 384, d_key 64, d_value 384, 256^2 = 65536 slots: the
//           memory as an additive term on the text system's pooled features.
// Both with fast weights and slots (top_k 4), and each again with the match
// gate (32 keys per session, threshold -1 so that it always opens: the gate's
// whole cost on top of the read; a closed gate skips the read instead). Each
// is set beside a ceiling measured in the same run: one pass that only reads
// the bytes one row's read must load (the query projection, S, both codebooks,
// the k value rows and the gate's keys),
// what a read would cost if loading its operands were all it did. The closing
// table gives microseconds and the ratios; the encoder's cost per sentence to
// compare with comes from bench_encoder (B1_L32) and the example's measured
// run.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "ceiling.hpp"
#include "inputs.hpp"
#include "moekit/nn/session_memory.hpp"
#include "summary.hpp"

namespace {

using moekit::index_t;
using moekit_bench::random_vector;

struct Shape {
  const char* name;
  index_t d_value, sub_keys, slot_capacity, match_keys;
};
constexpr index_t kModel = 384, kKey = 64, kBatch = 256, kSessions = 16;
constexpr Shape kShapes[] = {{"logits", 5, 32, 256, 0},
                             {"logits+gate", 5, 32, 256, 32},
                             {"pooled", 384, 256, 1024, 0},
                             {"pooled+gate", 384, 256, 1024, 32}};

std::size_t sz(index_t v) { return static_cast<std::size_t>(v); }

// The bytes one row's read must load: W_q, S, the int8 codebooks and their
// scales, the k value rows, and the gate's int8 keys and their scales.
std::size_t read_bytes(const Shape& s) {
  return sz(4 * kKey * kModel + 4 * s.d_value * kKey + 2 * s.sub_keys * (kKey / 2 + 4) +
            4 * 4 * s.d_value + s.match_keys * (kKey + 4));
}

// A memory with kSessions open sessions, each written with 64 corrections
// (its slots partly filled), and inputs for the timed calls.
struct MemoryInputs {
  std::vector<float> w_key, w_query, sub_a, sub_b, scale_a, scale_b;
  std::vector<std::int8_t> keys_a, keys_b;
  moekit::cpu::SessionMemory memory;
  std::vector<float> x, values, frozen, y;
  std::vector<std::int32_t> ids;
  std::vector<std::byte> ws;

  static moekit::cpu::SessionMemoryConfig config(const Shape& s) {
    moekit::cpu::SessionMemoryConfig c;
    c.d_model = kModel;
    c.d_key = kKey;
    c.d_value = s.d_value;
    c.sub_keys = s.sub_keys;
    c.top_k = 4;
    c.slot_capacity = s.slot_capacity;
    c.decay = 0.99f;
    c.max_sessions = kSessions;
    c.match_keys = s.match_keys;
    c.match_threshold = -1.0f;  // always open: the gate's cost on top of the whole read
    c.match_width = 0.0f;
    return c;
  }
  moekit::cpu::SessionMemoryWeights weights(const Shape& s) {
    const index_t n = s.sub_keys, h = kKey / 2;
    keys_a.resize(sz(n * h));
    keys_b.resize(sz(n * h));
    scale_a.resize(sz(n));
    scale_b.resize(sz(n));
    moekit::cpu::quantize_rows({sub_a.data(), n, h}, {keys_a.data(), n, h}, {scale_a.data(), n});
    moekit::cpu::quantize_rows({sub_b.data(), n, h}, {keys_b.data(), n, h}, {scale_b.data(), n});
    moekit::cpu::SessionMemoryWeights w;
    w.w_key = {w_key.data(), kKey, kModel};
    w.w_query = {w_query.data(), kKey, kModel};
    w.sub_keys_a = {{keys_a.data(), n, h}, {scale_a.data(), n}};
    w.sub_keys_b = {{keys_b.data(), n, h}, {scale_b.data(), n}};
    return w;
  }
  explicit MemoryInputs(const Shape& s)
      : w_key(random_vector(sz(kKey * kModel), 1.0f, 1)),
        w_query(random_vector(sz(kKey * kModel), 1.0f, 2)),
        sub_a(random_vector(sz(s.sub_keys * kKey / 2), 1.0f, 3)),
        sub_b(random_vector(sz(s.sub_keys * kKey / 2), 1.0f, 4)),
        memory(config(s), weights(s)),
        x(random_vector(sz(kBatch * kModel), 1.0f, 5)),
        values(random_vector(sz(kBatch * s.d_value), 1.0f, 6)),
        frozen(random_vector(sz(kBatch * s.d_value), 1.0f, 7)),
        y(frozen.size()),
        ws(sz(memory.workspace_size())) {
    for (index_t i = 0; i < kSessions; ++i) memory.open();
    for (index_t i = 0; i < kBatch; ++i) ids.push_back(static_cast<std::int32_t>(i % kSessions));
    for (int round = 0; round < 4; ++round) write(kBatch);
  }
  moekit::VectorView<std::byte> workspace() { return {ws.data(), static_cast<index_t>(ws.size())}; }
  index_t d_value() const { return memory.config().d_value; }
  void read(index_t rows) {
    memory.read({x.data(), rows, kModel}, {ids.data(), rows}, {frozen.data(), rows, d_value()},
                {y.data(), rows, d_value()}, workspace());
  }
  void write(index_t rows) {
    memory.write({x.data(), rows, kModel}, {values.data(), rows, d_value()}, {ids.data(), rows},
                 workspace());
  }
};

// One pass reading `bytes` bytes (summed as 64-bit integers, which the
// compiler vectorises): the floor of any computation that must load them.
void load_ceiling(benchmark::State& state, std::size_t bytes) {
  const std::vector<std::uint64_t> data(bytes / 8, 1);
  for (auto _ : state) {
    std::uint64_t sum = 0;
    for (const std::uint64_t w : data) sum += w;
    benchmark::DoNotOptimize(sum);
  }
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(bytes) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

void read_rows(benchmark::State& state, const Shape& shape, index_t rows, int threads) {
  moekit_bench::set_threads(threads);
  MemoryInputs in(shape);
  for (auto _ : state) {
    in.read(rows);
    benchmark::DoNotOptimize(in.y.data());
    benchmark::ClobberMemory();
  }
  state.counters["bytes/session"] = static_cast<double>(in.memory.state_bytes());
}

// One correction per iteration, into session 0 (its slots fill up, then
// evict: the steady state of a long session).
void write_row(benchmark::State& state, const Shape& shape) {
  moekit_bench::set_threads(1);
  MemoryInputs in(shape);
  for (auto _ : state) {
    in.write(1);
    benchmark::ClobberMemory();
  }
}

std::string run_name(const std::string& what, const char* config, int threads) {
  return what + "/" + config + "/threads:" + std::to_string(threads);
}

void add_us(const std::string& name, std::function<void(benchmark::State&)> f) {
  benchmark::RegisterBenchmark(name.c_str(), std::move(f))
      ->Unit(benchmark::kMicrosecond)
      ->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  // 2 threads first (see bench/routing.cpp: libgomp after 1-thread runs).
  for (const Shape& shape : kShapes) {
    add_us(run_name("read_batch256", shape.name, 2),
           [&shape](benchmark::State& s) { read_rows(s, shape, kBatch, 2); });
  }
  for (const Shape& shape : kShapes) {
    add_us(run_name("load_ceiling", shape.name, 1),
           [&shape](benchmark::State& s) { load_ceiling(s, read_bytes(shape)); });
    add_us(run_name("read_row", shape.name, 1),
           [&shape](benchmark::State& s) { read_rows(s, shape, 1, 1); });
    add_us(run_name("write_row", shape.name, 1),
           [&shape](benchmark::State& s) { write_row(s, shape); });
    add_us(run_name("read_batch256", shape.name, 1),
           [&shape](benchmark::State& s) { read_rows(s, shape, kBatch, 1); });
  }
  benchmark::Initialize(&argc, argv);
  moekit_bench::RecordingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);

  // A run filtered out has no time: its cells print as "nan".
  const auto us = [&reporter](const char* what, const Shape& shape, int threads) {
    const double seconds = reporter.seconds(run_name(what, shape.name, threads));
    return seconds > 0 ? seconds * 1e6 : std::nan("");
  };
  std::printf("\n%-11s %9s %8s %8s %8s %9s %10s %11s %11s\n", "shape", "state B", "ceil us",
              "read us", "write us", "read/ceil", "write/ceil", "batch us t1", "batch us t2");
  for (const Shape& shape : kShapes) {
    const double ceil = us("load_ceiling", shape, 1), read = us("read_row", shape, 1),
                 write = us("write_row", shape, 1);
    std::printf("%-11s %9td %8.2f %8.2f %8.2f %9.2f %10.2f %11.1f %11.1f\n", shape.name,
                MemoryInputs(shape).memory.state_bytes(), ceil, read, write, read / ceil,
                write / ceil, us("read_batch256", shape, 1), us("read_batch256", shape, 2));
  }
  std::printf(
      "state B = bytes of state per open session; ceil = one pass loading the bytes one row's read "
      "must load (in cache: the floor of a read); batch = 256 rows "
      "over 16 sessions at 1 and 2 threads. Compare with the encoder per sentence: "
      "bench_encoder (B1_L32) or examples/16_session_memory's measured run.\n");
  return 0;
}
