// Expert parallelism over MPI: the step time of cpu::ExpertParallelMoeLayer
// (forward + backward, every gradient) and the bytes it exchanges per token,
// at the world size it runs on (tools/bench_expert_parallel.sh runs 1, 2 and
// 4 ranks). Beside it, measured in the same run:
//   one_process   cpu::MoeLayer on the whole batch, on rank 0 alone (the
//                 other ranks wait): the work the ranks share;
//   exchange      the layer's own messages replayed without any compute
//                 (every operation, with the sizes this step used): the
//                 transport's share of the step, a ceiling for the rest;
//   link          a ping-pong between ranks 0 and 1, the median round trip:
//                 latency (8 bytes) and bandwidth (4 MiB), the two numbers of the scaling model in
//                 docs/expert_parallel.md, which predicts `exchange` from the
//                 recorded message sizes.
// Every time is the median over --reps steps of the slowest rank's time
// (ranks start each step together), with the range; beside the wall time,
// the slowest rank's CPU time (its process's), which a loaded machine
// inflates far less (it also counts the polling while a rank waits for its
// peers, so on a quiet machine the two agree). Not Google Benchmark:
// its adaptive iteration counts would differ between ranks and a
// collective cannot.
//
//   mpirun -np 4 bench_expert_parallel [--tokens 2048] [--d 256] [--ff 512] [--reps 20]
#include <moekit/dist/mpi.hpp>
#include <moekit/nn/expert_parallel_moe_layer.hpp>
#include <moekit/nn/moe_layer.hpp>

#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace {

using moekit::index_t;
using moekit::MatrixView;
using moekit::VectorView;
using moekit::dist::MpiTransport;
using S = moekit::MoeSpec<8, 2>;
using Clock = std::chrono::steady_clock;

struct Options {
  index_t tokens = 2048, d = 256, f = 512;
  int reps = 20;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const long long v = std::atoll(argv[i + 1]);
    if (a == "--tokens")
      o.tokens = v;
    else if (a == "--d")
      o.d = v;
    else if (a == "--ff")
      o.f = v;
    else if (a == "--reps")
      o.reps = static_cast<int>(v);
    else {
      std::fprintf(stderr, "usage: %s [--tokens T] [--d D] [--ff F] [--reps R]\n", argv[0]);
      std::exit(2);
    }
  }
  return o;
}

// A transport that forwards to MPI and records every operation's sizes, so
// that the same messages can be sent again without the layer's compute.
class Recorder {
 public:
  static constexpr moekit::dist::MemorySpace kMemory = moekit::dist::MemorySpace::kHost;
  explicit Recorder(MpiTransport& t) : t_(&t) {}

  int rank() const { return t_->rank(); }
  int size() const { return t_->size(); }
  moekit::dist::Traffic traffic() const { return t_->traffic(); }
  void all_to_all(std::span<const std::int64_t> s, std::span<std::int64_t> r) {
    log({Op::kCounts, {}, {}, static_cast<index_t>(s.size()), 0});
    t_->all_to_all(s, r);
  }
  void all_to_all_v(const std::byte* s, std::span<const index_t> sb, std::byte* r,
                    std::span<const index_t> rb) {
    log({Op::kPayload, {sb.begin(), sb.end()}, {rb.begin(), rb.end()}, 0, 0});
    t_->all_to_all_v(s, sb, r, rb);
  }
  void all_reduce_sum(std::span<std::int64_t> v) {
    log({Op::kReduce, {}, {}, static_cast<index_t>(v.size()), 0});
    t_->all_reduce_sum(v);
  }
  void send(int peer, std::span<const std::byte> b) {
    log({Op::kSend, {}, {}, static_cast<index_t>(b.size()), peer});
    t_->send(peer, b);
  }
  void recv(int peer, std::span<std::byte> b) {
    log({Op::kRecv, {}, {}, static_cast<index_t>(b.size()), peer});
    t_->recv(peer, b);
  }
  void broadcast(int root, std::span<std::byte> b) {
    log({Op::kBroadcast, {}, {}, static_cast<index_t>(b.size()), root});
    t_->broadcast(root, b);
  }
  void barrier() {
    log({Op::kBarrier, {}, {}, 0, 0});
    t_->barrier();
  }

  void start() { ops_.clear(), recording_ = true; }
  void stop() { recording_ = false; }

  // The recorded operations again, with scratch buffers of the same sizes.
  void replay() {
    for (const Entry& e : ops_) {
      switch (e.op) {
        case Op::kCounts: {
          std::vector<std::int64_t> s(static_cast<std::size_t>(e.size)), r(s.size());
          t_->all_to_all(s, r);
          break;
        }
        case Op::kPayload: {
          index_t out = 0, in = 0;
          for (index_t b : e.send) out += b;
          for (index_t b : e.recv) in += b;
          grow(out + in);
          t_->all_to_all_v(scratch_.data(), e.send, scratch_.data() + out, e.recv);
          break;
        }
        case Op::kReduce: {
          std::vector<std::int64_t> v(static_cast<std::size_t>(e.size));
          t_->all_reduce_sum(v);
          break;
        }
        case Op::kSend:
          grow(e.size);
          t_->send(e.peer, {scratch_.data(), static_cast<std::size_t>(e.size)});
          break;
        case Op::kRecv:
          grow(e.size);
          t_->recv(e.peer, {scratch_.data(), static_cast<std::size_t>(e.size)});
          break;
        case Op::kBroadcast:
          grow(e.size);
          t_->broadcast(e.peer, {scratch_.data(), static_cast<std::size_t>(e.size)});
          break;
        case Op::kBarrier:
          t_->barrier();
          break;
      }
    }
  }

  // The scaling model's time for this rank's recorded operations: each
  // costs one latency per step it takes (log2 of the ranks for a
  // collective, N - 1 pairwise rounds for an all_to_all_v) and its largest
  // per-rank volume over the bandwidth. Sends (the rank-order chains) are
  // apart: a chain's hops run one after the other, so the step's model is
  // the slowest rank's collectives plus every rank's sends.
  struct Model {
    double collectives = 0, sends = 0;
  };
  Model model_seconds(double latency, double bandwidth) const {
    const int n = t_->size();
    double lg = 0;
    for (int k = 1; k < n; k *= 2) ++lg;
    double t = 0, sends = 0;
    for (const Entry& e : ops_) {
      switch (e.op) {
        case Op::kPayload: {
          index_t out = 0, in = 0;
          for (int p = 0; p < n; ++p) {
            if (p == t_->rank()) continue;
            out += e.send[static_cast<std::size_t>(p)];
            in += e.recv[static_cast<std::size_t>(p)];
          }
          t += (n - 1) * latency + static_cast<double>(std::max(out, in)) / bandwidth;
          break;
        }
        case Op::kSend:
          sends += latency + static_cast<double>(e.size) / bandwidth;
          break;
        case Op::kRecv:
          break;  // its time is the matching send's
        case Op::kBroadcast:
          t += lg * (latency + static_cast<double>(e.size) / bandwidth);
          break;
        default:
          t += lg * latency;
      }
    }
    return {t, sends};
  }

 private:
  enum class Op { kCounts, kPayload, kReduce, kSend, kRecv, kBroadcast, kBarrier };
  struct Entry {
    Op op;
    std::vector<index_t> send, recv;
    index_t size;
    int peer;
  };
  void log(Entry e) {
    if (recording_) ops_.push_back(std::move(e));
  }
  void grow(index_t bytes) {
    if (scratch_.size() < static_cast<std::size_t>(bytes))
      scratch_.resize(static_cast<std::size_t>(bytes));
  }

  MpiTransport* t_;
  bool recording_ = false;
  std::vector<Entry> ops_;
  std::vector<std::byte> scratch_;
};

std::vector<float> random_floats(std::size_t n, float scale, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Median and range of a set of seconds.
struct Timing {
  double median = 0, low = 0, high = 0;
  static Timing of(std::vector<double> s) {
    std::sort(s.begin(), s.end());
    return {s[s.size() / 2], s.front(), s.back()};
  }
};

std::int64_t cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return std::int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

// The slowest rank's wall and CPU seconds of each rep.
template <class F>
std::pair<Timing, Timing> time_steps(MpiTransport& t, int reps, F&& step) {
  std::vector<double> wall, cpu;
  const std::size_t n = static_cast<std::size_t>(t.size());
  std::vector<std::int64_t> all(2 * n), scratch(2 * n);
  for (int r = 0; r < reps + 2; ++r) {  // two warm-up steps
    t.barrier();
    const auto t0 = Clock::now();
    const std::int64_t c0 = cpu_ns();
    step();
    const std::int64_t mine[2] = {
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count(),
        cpu_ns() - c0};
    moekit::dist::all_gather(t, std::span<const std::int64_t>(mine), all, scratch);
    if (r < 2) continue;
    std::int64_t w = 0, c = 0;
    for (std::size_t q = 0; q < n; ++q) {
      w = std::max(w, all[2 * q]);
      c = std::max(c, all[2 * q + 1]);
    }
    wall.push_back(static_cast<double>(w) * 1e-9);
    cpu.push_back(static_cast<double>(c) * 1e-9);
  }
  return {Timing::of(wall), Timing::of(cpu)};
}

}  // namespace

int main(int argc, char** argv) {
  moekit::dist::MpiSession session(argc, argv);
  const Options o = parse(argc, argv);
  MpiTransport mpi;
  Recorder rec(mpi);
  const int rank = mpi.rank(), n = mpi.size();
  constexpr int E = S::num_experts;

  moekit::cpu::MoeLayerConfig c;
  c.d_model = o.d;
  c.d_ff = o.f;
  c.kind = moekit::FfnKind::kGated;
  c.activation = moekit::Activation::kSilu;
  c.router.capacity.factor = 1.25;
  c.switch_coeff = 1e-2f;
  c.z_coeff = 1e-3f;
  // Ranks take whole blocks of 64 tokens; the last takes the rest.
  const index_t blocks = moekit::token_blocks(o.tokens);
  const index_t first = blocks * rank / n * moekit::kTokenBlock;
  const index_t end = std::min(o.tokens, blocks * (rank + 1) / n * moekit::kTokenBlock);
  const index_t T = end - first, d = o.d, f = o.f;

  const auto placement = moekit::dist::ExpertPlacement::even(E, n);
  const int e0 = placement.first(rank), ne = placement.count(rank);
  const auto sz = [](index_t v) { return static_cast<std::size_t>(v); };
  const std::vector<float> x = random_floats(sz(o.tokens * d), 1.0f, 1);
  const std::vector<float> dy = random_floats(sz(o.tokens * d), 1.0f, 2);
  const std::vector<float> wg = random_floats(sz(E * d), 0.1f, 3);
  const std::vector<float> w1 = random_floats(sz(E * f * d), 0.05f, 4);
  const std::vector<float> w3 = random_floats(sz(E * f * d), 0.05f, 5);
  const std::vector<float> w2 = random_floats(sz(E * d * f), 0.05f, 6);
  const auto params = [&](int first_expert, int count) {
    moekit::cpu::MoeLayerParams p;
    p.w_gate = {wg.data(), E, d};
    p.experts = {MatrixView<const float>(w1.data() + first_expert * f * d, count * f, d),
                 MatrixView<const float>(w3.data() + first_expert * f * d, count * f, d),
                 MatrixView<const float>(w2.data() + first_expert * d * f, count * d, f)};
    return p;
  };
  std::vector<float> y(sz(o.tokens * d)), dx(sz(o.tokens * d)), dwg(sz(E * d)), dw1(w1.size()),
      dw3(w3.size()), dw2(w2.size());
  const auto grads = [&](int first_expert, int count) {
    moekit::cpu::MoeLayerGrads g;
    g.dw_gate = {dwg.data(), E, d};
    g.dw1 = {dw1.data() + first_expert * f * d, count * f, d};
    g.dw3 = {dw3.data() + first_expert * f * d, count * f, d};
    g.dw2 = {dw2.data() + first_expert * d * f, count * d, f};
    return g;
  };

  // The baseline: one process on the whole batch, on rank 0 (the others wait).
  Timing one{}, one_cpu{};
  if (rank == 0) {
    const moekit::cpu::MoeLayer<S> layer(c);
    moekit::cpu::MoeLayerStorage<S> st(layer, o.tokens);
    std::vector<double> wall, cpu;
    for (int r = 0; r < o.reps + 2; ++r) {
      const auto t0 = Clock::now();
      const std::int64_t c0 = cpu_ns();
      layer.forward({x.data(), o.tokens, d}, params(0, E), st.state(), {y.data(), o.tokens, d},
                    nullptr, st.workspace());
      layer.backward({dy.data(), o.tokens, d}, {x.data(), o.tokens, d}, params(0, E), st.state(),
                     {dx.data(), o.tokens, d}, grads(0, E), st.workspace());
      if (r < 2) continue;
      wall.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      cpu.push_back(static_cast<double>(cpu_ns() - c0) * 1e-9);
    }
    one = Timing::of(wall);
    one_cpu = Timing::of(cpu);
  }

  // The expert-parallel layer on this rank's share.
  moekit::cpu::ExpertParallelMoeLayer<S, Recorder> layer(c, placement, rec);
  moekit::cpu::ExpertParallelStorage<S> st(layer, T, o.tokens);
  const MatrixView<const float> xr(x.data() + first * d, T, d);
  const auto step = [&] {
    layer.forward(xr, params(e0, ne), st.state(), {y.data() + first * d, T, d}, nullptr,
                  st.workspace());
    layer.backward({dy.data() + first * d, T, d}, xr, params(e0, ne), st.state(),
                   {dx.data() + first * d, T, d}, grads(e0, ne), st.workspace());
  };
  step();
  const moekit::dist::Traffic before = mpi.traffic();
  rec.start();
  step();
  rec.stop();
  std::vector<std::int64_t> sent = {mpi.traffic().bytes_sent - before.bytes_sent};
  const auto [ep, ep_cpu] = time_steps(mpi, o.reps, step);
  const auto [exchange, exchange_cpu] = time_steps(mpi, o.reps, [&] { rec.replay(); });

  // The link: ping-pong between ranks 0 and 1 (none on one rank).
  double latency = 0, bandwidth = 0;
  if (n > 1) {
    for (const std::size_t bytes : {std::size_t{8}, std::size_t{4} << 20}) {
      std::vector<std::byte> buf(bytes);
      std::vector<double> round_trips;
      mpi.barrier();
      for (int r = 0; r < (bytes == 8 ? 200 : 20); ++r) {
        const auto t0 = Clock::now();
        if (rank == 0) {
          mpi.send(1, buf);
          mpi.recv(1, buf);
        } else if (rank == 1) {
          mpi.recv(0, buf);
          mpi.send(0, buf);
        }
        round_trips.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      }
      // The median round trip: a loaded machine's preemptions stay out.
      const double one_way = Timing::of(round_trips).median / 2;
      if (bytes == 8)
        latency = one_way;
      else
        bandwidth = static_cast<double>(bytes) / (one_way - latency);
    }
  }
  mpi.all_reduce_sum(sent);
  double model = 0;
  if (n > 1) {
    const auto m = rec.model_seconds(latency, bandwidth);
    const std::int64_t mine[2] = {static_cast<std::int64_t>(m.collectives * 1e9),
                                  static_cast<std::int64_t>(m.sends * 1e9)};
    std::vector<std::int64_t> all(2 * static_cast<std::size_t>(n)), scratch(all.size());
    moekit::dist::all_gather(mpi, std::span<const std::int64_t>(mine), all, scratch);
    std::int64_t collectives = 0, sends = 0;
    for (std::size_t q = 0; q < static_cast<std::size_t>(n); ++q) {
      collectives = std::max(collectives, all[2 * q]);
      sends += all[2 * q + 1];
    }
    model = static_cast<double>(collectives + sends) * 1e-9;
  }

  if (rank == 0) {
    const double per_token = static_cast<double>(sent[0]) / static_cast<double>(o.tokens);
    std::printf(
        "expert_parallel ranks=%d tokens=%lld d=%lld d_ff=%lld E=%d K=%d\n"
        "                     wall median [range]            CPU median [range]\n"
        "  step (fwd+bwd)     %8.3f ms [%.3f, %.3f]   %8.3f ms [%.3f, %.3f]\n"
        "  one process        %8.3f ms [%.3f, %.3f]   %8.3f ms [%.3f, %.3f]\n"
        "  exchange alone     %8.3f ms [%.3f, %.3f]   %8.3f ms [%.3f, %.3f]\n"
        "  speedup over one process: wall %.2f, CPU %.2f; the exchange is %.0f%% of the step\n"
        "  exchange, model    %8.3f ms   (latency %.2f us, bandwidth %.2f GB/s)\n"
        "  bytes per token    %8.0f   (all ranks, forward + backward, one layer)\n",
        n, static_cast<long long>(o.tokens), static_cast<long long>(d), static_cast<long long>(f),
        E, S::top_k, ep.median * 1e3, ep.low * 1e3, ep.high * 1e3, ep_cpu.median * 1e3,
        ep_cpu.low * 1e3, ep_cpu.high * 1e3, one.median * 1e3, one.low * 1e3, one.high * 1e3,
        one_cpu.median * 1e3, one_cpu.low * 1e3, one_cpu.high * 1e3, exchange.median * 1e3,
        exchange.low * 1e3, exchange.high * 1e3, exchange_cpu.median * 1e3, exchange_cpu.low * 1e3,
        exchange_cpu.high * 1e3, one.median / ep.median, one_cpu.median / ep_cpu.median,
        100.0 * exchange.median / ep.median, model * 1e3, latency * 1e6, bandwidth * 1e-9,
        per_token);
    std::printf(
        "{\"bench\":\"expert_parallel\",\"ranks\":%d,\"tokens\":%lld,\"d\":%lld,\"d_ff\":%lld,"
        "\"step_ms\":%.4f,\"step_ms_low\":%.4f,\"step_ms_high\":%.4f,\"step_cpu_ms\":%.4f,"
        "\"one_process_ms\":%.4f,\"one_process_cpu_ms\":%.4f,\"exchange_ms\":%.4f,"
        "\"exchange_cpu_ms\":%.4f,\"model_exchange_ms\":%.4f,\"latency_us\":%.3f,"
        "\"bandwidth_gbs\":%.3f,\"bytes_per_token\":%.1f}\n",
        n, static_cast<long long>(o.tokens), static_cast<long long>(d), static_cast<long long>(f),
        ep.median * 1e3, ep.low * 1e3, ep.high * 1e3, ep_cpu.median * 1e3, one.median * 1e3,
        one_cpu.median * 1e3, exchange.median * 1e3, exchange_cpu.median * 1e3, model * 1e3,
        latency * 1e6, bandwidth * 1e-9, per_token);
  }
  return 0;
}
