// Expert parallelism on the loopback transport (N ranks as threads):
// the transport's operations and failures (timeouts, ranks that leave,
// mismatched operations), expert placement and the token split rule, and
// cpu::ExpertParallelMoeLayer on 1 to 4 ranks bit-identical to cpu::MoeLayer
// on the whole batch (even and uneven expert splits, uneven token splits,
// drops, shared experts, router noise, accumulation), plus the bad
// configurations, which must stop every rank with the same error.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "expect_error.hpp"
#include "expert_parallel_case.hpp"
#include "moekit/dist/layout.hpp"
#include "moekit/dist/loopback.hpp"
#include "moekit/dist/transport.hpp"

namespace {

using moekit::Activation;
using moekit::Errc;
using moekit::FfnKind;
using moekit::index_t;
using moekit::MoeSpec;
using moekit::dist::ExpertPlacement;
using moekit::dist::LoopbackGroup;
using moekit::dist::LoopbackTransport;
using moekit::dist::TransportOptions;
using moekit_test::EpCase;
using moekit_test::expect_error;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::span<const std::byte> bytes_of(const std::vector<std::byte>& v) { return v; }

// ---- the transport ------------------------------------------------------------------

TEST(LoopbackTransport, AllToAllMovesEachRanksBlocksToTheirRanks) {
  for (int n : {1, 2, 3, 4}) {
    LoopbackGroup group(n);
    group.run([&](LoopbackTransport& t) {
      const int r = t.rank();
      // counts: rank r sends {100 r + p, -p} to rank p.
      std::vector<std::int64_t> send, recv(static_cast<std::size_t>(2 * n), -1);
      for (int p = 0; p < n; ++p) send.insert(send.end(), {100 * r + p, -p});
      t.all_to_all(send, recv);
      for (int q = 0; q < n; ++q) {
        EXPECT_EQ(recv[static_cast<std::size_t>(2 * q)], 100 * q + r);
        EXPECT_EQ(recv[static_cast<std::size_t>(2 * q + 1)], -r);
      }
      // payload: rank r sends r + p + 1 bytes of value 16 r + p to rank p.
      std::vector<index_t> out(static_cast<std::size_t>(n)), in(static_cast<std::size_t>(n));
      std::vector<std::byte> data;
      for (int p = 0; p < n; ++p) {
        out[static_cast<std::size_t>(p)] = r + p + 1;
        in[static_cast<std::size_t>(p)] = p + r + 1;
        data.insert(data.end(), static_cast<std::size_t>(r + p + 1),
                    static_cast<std::byte>(16 * r + p));
      }
      std::vector<std::byte> got(static_cast<std::size_t>(n * (n + 1) / 2 + n * r),
                                 std::byte{0xff});
      const moekit::dist::Traffic before = t.traffic();
      t.all_to_all_v(data.data(), out, got.data(), in);
      std::size_t at = 0;
      for (int q = 0; q < n; ++q) {
        for (int i = 0; i < q + r + 1; ++i, ++at) {
          EXPECT_EQ(got[at], static_cast<std::byte>(16 * q + r)) << "from rank " << q;
        }
      }
      EXPECT_EQ(at, got.size());
      index_t sent = 0;
      for (int p = 0; p < n; ++p) sent += p == r ? 0 : r + p + 1;
      EXPECT_EQ(t.traffic().bytes_sent - before.bytes_sent, sent);
    });
  }
}

TEST(LoopbackTransport, AllReduceSendRecvBroadcastAndBarrier) {
  LoopbackGroup group(3);
  group.run([](LoopbackTransport& t) {
    const int r = t.rank();
    std::vector<std::int64_t> v = {r, 10 * r, -1};
    t.all_reduce_sum(v);
    EXPECT_EQ(v, (std::vector<std::int64_t>{3, 30, -3}));
    // A ring: each rank sends its rank to the next.
    const std::vector<std::byte> mine(4, static_cast<std::byte>(r));
    t.send((r + 1) % 3, bytes_of(mine));
    std::vector<std::byte> got(4);
    t.recv((r + 2) % 3, got);
    EXPECT_EQ(got[3], static_cast<std::byte>((r + 2) % 3));
    std::vector<std::byte> b(5, static_cast<std::byte>(r == 1 ? 7 : 0));
    t.broadcast(1, b);
    EXPECT_EQ(b, std::vector<std::byte>(5, std::byte{7}));
    t.barrier();
  });
}

TEST(LoopbackTransport, PassAlongRanksFoldsInRankOrder) {
  // A sum of floats that depends on its order: the fold over the ranks must
  // equal one left fold over all values.
  const std::vector<float> values = {1e8f, 1.0f, -1e8f, 3.5f, 1e-3f, 7e7f, -7e7f, 0.25f};
  float serial = 0.0f;
  for (float v : values) serial += v;
  for (int n : {1, 2, 3, 4}) {
    LoopbackGroup group(n);
    group.run([&](LoopbackTransport& t) {
      const std::size_t per = values.size() / static_cast<std::size_t>(n) + 1;
      const std::size_t b = static_cast<std::size_t>(t.rank()) * per;
      float acc = 0.0f;
      moekit::dist::pass_along_ranks(t, std::as_writable_bytes(std::span<float>(&acc, 1)), [&] {
        for (std::size_t i = b; i < std::min(values.size(), b + per); ++i) acc += values[i];
      });
      EXPECT_EQ(std::bit_cast<std::uint32_t>(acc), std::bit_cast<std::uint32_t>(serial));
    });
  }
}

TEST(LoopbackTransport, APeerThatNeverArrivesFailsEveryRankWithinTheTimeout) {
  LoopbackGroup group(2, TransportOptions{std::chrono::milliseconds(200)});
  const auto t0 = Clock::now();
  const std::string msg = expect_error(
      [&] {
        group.run([](LoopbackTransport& t) {
          if (t.rank() == 1) std::this_thread::sleep_for(std::chrono::milliseconds(800));
          t.barrier();
        });
      },
      Errc::kTransportError);
  EXPECT_NE(msg.find("rank 0 waited 200 ms in barrier for rank(s) 1"), std::string::npos) << msg;
  EXPECT_LT(seconds_since(t0), 30.0);  // bounded: no hang
}

TEST(LoopbackTransport, ARankThatLeavesFailsItsPeersAtOnce) {
  LoopbackGroup group(3, TransportOptions{std::chrono::seconds(60)});
  const auto t0 = Clock::now();
  std::atomic<int> failures{0};
  const std::string msg = expect_error(
      [&] {
        group.run([&](LoopbackTransport& t) {
          if (t.rank() == 2) return;  // leaves without taking part
          try {
            std::vector<std::int64_t> v(3, 1);
            t.all_reduce_sum(v);
          } catch (const moekit::Error&) {
            ++failures;
            throw;
          }
        });
      },
      Errc::kTransportError);
  EXPECT_NE(msg.find("rank 2 left the group"), std::string::npos) << msg;
  EXPECT_EQ(failures.load(), 2);
  EXPECT_LT(seconds_since(t0), 30.0);  // long before the 60 s timeout
}

TEST(LoopbackTransport, MismatchedOperationsAndSizesFail) {
  LoopbackGroup group(2);
  std::string msg = expect_error(
      [&] {
        group.run([](LoopbackTransport& t) {
          if (t.rank() == 0) {
            t.barrier();
          } else {
            std::vector<std::byte> b(4);
            t.broadcast(0, b);
          }
        });
      },
      Errc::kTransportError);
  EXPECT_NE(msg.find("disagree on the operation"), std::string::npos) << msg;

  LoopbackGroup sizes(2);
  msg = expect_error(
      [&] {
        sizes.run([](LoopbackTransport& t) {
          std::vector<std::byte> b(t.rank() == 0 ? 4 : 8);
          if (t.rank() == 0) t.send(1, b);
          if (t.rank() == 1) t.recv(0, b);
        });
      },
      Errc::kTransportError);
  EXPECT_NE(msg.find("expected 8 bytes from rank 0, which sent 4"), std::string::npos) << msg;

  expect_error([] { LoopbackGroup bad(0); }, Errc::kInvalidArgument);
  expect_error([] { LoopbackGroup bad(2, TransportOptions{std::chrono::milliseconds(0)}); },
               Errc::kInvalidArgument);
}

// ---- placement and the token rule --------------------------------------------------------

TEST(ExpertPlacement, SplitsExpertsInContiguousRanges) {
  const ExpertPlacement even = ExpertPlacement::even(8, 3);
  EXPECT_EQ(even.ranks(), 3);
  EXPECT_EQ(even.experts(), 8);
  EXPECT_EQ(even.count(0), 3);
  EXPECT_EQ(even.count(2), 2);
  EXPECT_EQ(even.first(2), 6);
  EXPECT_EQ(even.owner(5), 1);
  const std::vector<int> counts = {0, 5, 0, 3};
  const ExpertPlacement uneven = ExpertPlacement::from_counts(counts);
  EXPECT_EQ(uneven.owner(0), 1);
  EXPECT_EQ(uneven.owner(7), 3);
  expect_error(
      [] {
        ExpertPlacement::from_counts(std::vector<int>{2, -1});
      },
      Errc::kInvalidArgument);
  expect_error(
      [] {
        ExpertPlacement::from_counts(std::vector<int>{0, 0});
      },
      Errc::kInvalidArgument);
  expect_error([&] { uneven.owner(8); }, Errc::kOutOfRange);
}

TEST(TokenSplit, EveryRankButTheLastHoldingTokensHoldsWholeBlocks) {
  using moekit::dist::check_token_split;
  EXPECT_EQ(check_token_split(std::vector<std::int64_t>{64, 128, 5}), 197);
  EXPECT_EQ(check_token_split(std::vector<std::int64_t>{0, 64, 7, 0}), 71);
  EXPECT_EQ(check_token_split(std::vector<std::int64_t>{0, 0}), 0);
  const std::string msg = expect_error(
      [] {
        check_token_split(std::vector<std::int64_t>{64, 30, 0, 1});
      },
      Errc::kInvalidArgument);
  EXPECT_NE(msg.find("rank 1 holds 30 tokens, not a multiple of kTokenBlock = 64, and rank 3"),
            std::string::npos)
      << msg;
}

// ---- the layer on N ranks against one process ----------------------------------------------

moekit::cpu::MoeLayerConfig layer_config(FfnKind kind, int shared, double capacity) {
  return moekit_test::ep_layer_config(kind, shared, capacity, 16, 12, 10);
}

template <class S>
void expect_bit_identical(const EpCase& c) {
  const moekit_test::EpProblem<S> p(c);
  const moekit_test::EpResult<S> ref = moekit_test::one_process(c, p);
  LoopbackGroup group(static_cast<int>(c.tokens.size()));
  std::mutex m;
  std::vector<std::string> diffs;
  group.run([&](LoopbackTransport& t) {
    const std::vector<std::string> d = moekit_test::run_rank(c, p, ref, t);
    const std::lock_guard<std::mutex> lock(m);
    diffs.insert(diffs.end(), d.begin(), d.end());
  });
  for (const std::string& d : diffs) ADD_FAILURE() << d;
  if (diffs.empty()) {
    std::printf("[ bit-identical ] %s: %zu ranks, %lld tokens, %lld dropped\n", c.name.c_str(),
                c.tokens.size(), static_cast<long long>(p.T),
                static_cast<long long>(ref.stats.dropped));
  }
}

TEST(ExpertParallelMoeLayer, OneToFourRanksAreBitIdenticalToOneProcess) {
  using S = MoeSpec<8, 2>;
  const auto gated = layer_config(FfnKind::kGated, 2, 1.0);  // shared experts, drops
  const auto plain = layer_config(FfnKind::kPlain, 0, 0.0);  // dropless
  expect_bit_identical<S>({"1 rank", gated, {150}, {8}});
  expect_bit_identical<S>({"2 ranks, even", gated, {128, 72}, {4, 4}});
  expect_bit_identical<S>({"2 ranks, uneven experts", plain, {64, 136}, {7, 1}});
  expect_bit_identical<S>({"3 ranks, a rank without experts", gated, {64, 64, 45}, {5, 0, 3}});
  expect_bit_identical<S>({"4 ranks, uneven tokens", gated, {0, 192, 64, 9}, {1, 2, 0, 5}});
  expect_bit_identical<S>({"4 ranks, plain", plain, {64, 64, 64, 64}, {2, 2, 2, 2}});
  expect_bit_identical<S>({"4 ranks, tokens on one rank", plain, {0, 0, 100, 0}, {3, 2, 2, 1}});
  expect_bit_identical<S>({"2 ranks, no tokens at all", gated, {0, 0}, {4, 4}});
}

TEST(ExpertParallelMoeLayer, AccumulationNoiseAndFrozenInputsStayBitIdentical) {
  using S = MoeSpec<8, 2>;
  auto gated = layer_config(FfnKind::kGated, 1, 1.25);
  EpCase acc{"accumulate", gated, {64, 100}, {3, 5}};
  acc.accumulate = true;
  expect_bit_identical<S>(acc);
  EpCase no_dx{"no dx, no bias", gated, {128, 20}, {6, 2}};
  no_dx.want_dx = false;
  no_dx.with_bias = false;
  expect_bit_identical<S>(no_dx);
  auto noisy = layer_config(FfnKind::kPlain, 0, 1.0);
  noisy.router.noise = {moekit::NoiseKind::kGaussian, 0.5f, 7};
  expect_bit_identical<S>({"Gaussian router noise", noisy, {64, 64, 30}, {3, 3, 2}});
  noisy.router.noise = {moekit::NoiseKind::kJitter, 0.1f, 9};
  expect_bit_identical<S>({"jittered router input", noisy, {128, 70}, {4, 4}});
  auto across = layer_config(FfnKind::kGated, 0, 0.0);
  across.threading = moekit::cpu::FfnThreading::kAcrossExperts;
  expect_bit_identical<S>({"experts in parallel", across, {64, 64, 64}, {3, 3, 2}});
  auto sigmoid = layer_config(FfnKind::kPlain, 1, 0.0);
  sigmoid.router.gating.rule = moekit::GatingRule::kSigmoid;
  sigmoid.router.gating.renormalize = true;
  expect_bit_identical<MoeSpec<6, 3>>({"sigmoid, E = 6, K = 3", sigmoid, {64, 77}, {4, 2}});
}

// ---- training the reference model ------------------------------------------------------------

// 50 steps of the Trainer on the reference model over N loopback ranks: the
// losses, norms and loads of every step and every final weight equal one
// process's on the same global batches. (tests/mpi runs the same over MPI.)
TEST(ExpertParallelTraining, FiftyStepsOnTwoToFourRanksAreBitIdenticalToOneProcess) {
  using moekit_test::TrainModel;
  constexpr int kSteps = 50;
  constexpr index_t kBatch = 192;
  TrainModel one(moekit_test::training_model_config(kBatch));
  const moekit_test::TrainingLog ref = moekit_test::train_slice(one, kSteps, kBatch, 0, kBatch);
  EXPECT_LT(ref.task.back(), ref.task.front());  // it learns
  struct Split {
    std::vector<index_t> rows;
    std::vector<int> experts;
  };
  for (const Split& split : {Split{{128, 64}, {4, 4}}, Split{{64, 64, 64}, {2, 5, 1}},
                             Split{{64, 0, 64, 64}, {3, 1, 0, 4}}}) {
    const int n = static_cast<int>(split.rows.size());
    LoopbackGroup group(n);
    std::mutex m;
    std::vector<std::string> diffs;
    group.run([&](LoopbackTransport& t) {
      const auto r = static_cast<std::size_t>(t.rank());
      index_t first = 0;
      for (std::size_t q = 0; q < r; ++q) first += split.rows[q];
      // max_batch: the most rows one rank passes, the same on every rank.
      const index_t most = *std::max_element(split.rows.begin(), split.rows.end());
      TrainModel model(moekit_test::training_model_config(most),
                       {t, ExpertPlacement::from_counts(split.experts)});
      const moekit_test::TrainingLog log =
          moekit_test::train_slice(model, kSteps, kBatch, first, split.rows[r]);
      const std::vector<std::string> d = moekit_test::compare_training(log, ref, model, t.rank());
      const std::lock_guard<std::mutex> lock(m);
      diffs.insert(diffs.end(), d.begin(), d.end());
    });
    for (const std::string& d : diffs) ADD_FAILURE() << n << " ranks: " << d;
    if (diffs.empty()) {
      std::printf("[ bit-identical ] %d steps on %d ranks (task loss %.4f -> %.4f)\n", kSteps, n,
                  ref.task.front(), ref.task.back());
    }
  }
}

// A rank's checkpoint holds its shard: resuming from it repeats the
// uninterrupted run bit for bit, and a model with another shard (here one
// process's) refuses it.
TEST(ExpertParallelTraining, ShardCheckpointsResumeExactlyAndFitOnlyTheirShard) {
  using moekit_test::TrainModel;
  using Trainer = moekit::train::Trainer<TrainModel>;
  constexpr int kSteps = 6;
  const std::vector<int> experts = {5, 3};
  const std::string dir = ::testing::TempDir();
  LoopbackGroup group(2);
  std::mutex m;
  std::vector<std::string> diffs;
  group.run([&](LoopbackTransport& t) {
    const std::string path = dir + "moekit_ep_shard_" + std::to_string(t.rank()) + ".safetensors";
    const auto make = [&] {
      return TrainModel(moekit_test::training_model_config(64),
                        {t, ExpertPlacement::from_counts(experts)});
    };
    const moekit::train::TrainerConfig tc = moekit_test::training_trainer_config(kSteps);
    TrainModel straight = make();
    Trainer straight_trainer(straight, tc);
    const auto whole =
        moekit_test::train_steps(straight, straight_trainer, 0, kSteps, 128, 64 * t.rank(), 64);
    TrainModel first = make();
    Trainer first_trainer(first, tc);
    moekit_test::train_steps(first, first_trainer, 0, 3, 128, 64 * t.rank(), 64);
    first_trainer.save_checkpoint(path);
    TrainModel resumed = make();
    Trainer resumed_trainer(resumed, tc);
    resumed_trainer.load_checkpoint(path);
    const auto rest =
        moekit_test::train_steps(resumed, resumed_trainer, 3, kSteps, 128, 64 * t.rank(), 64);
    std::vector<std::string> d;
    for (int s = 0; s < 3; ++s) {
      if (!moekit_test::same_value_bits(rest.loss[static_cast<std::size_t>(s)],
                                        whole.loss[static_cast<std::size_t>(3 + s)])) {
        d.push_back("the resumed run differs at step " + std::to_string(3 + s));
      }
    }
    for (std::size_t i = 0; i < whole.tensors.size(); ++i) {
      if (rest.tensors[i] != whole.tensors[i]) d.push_back("resumed " + straight.tensors()[i].name);
    }
    if (t.rank() == 0) {  // one process's model cannot take a shard
      TrainModel one(moekit_test::training_model_config(128));
      Trainer one_trainer(one, tc);
      const std::string msg =
          expect_error([&] { one_trainer.load_checkpoint(path); }, Errc::kShapeMismatch);
      if (msg.find("first_expert=0 local_experts=5") == std::string::npos) {
        d.push_back("the shard was not named: " + msg);
      }
    }
    const std::lock_guard<std::mutex> lock(m);
    diffs.insert(diffs.end(), d.begin(), d.end());
  });
  for (const std::string& d : diffs) ADD_FAILURE() << d;
}

// ---- bad configurations stop every rank ----------------------------------------------------

// Runs body on n ranks; returns each rank's error (code, message), empty if none.
template <class Body>
std::vector<std::pair<Errc, std::string>> errors_on(int n, Body&& body) {
  std::vector<std::pair<Errc, std::string>> out(static_cast<std::size_t>(n));
  LoopbackGroup group(n, TransportOptions{std::chrono::seconds(20)});
  const auto t0 = Clock::now();
  group.run([&](LoopbackTransport& t) {
    try {
      body(t);
    } catch (const moekit::Error& e) {
      out[static_cast<std::size_t>(t.rank())] = {e.code(), e.what()};
    }
  });
  EXPECT_LT(seconds_since(t0), 10.0) << "a rank waited for its deadline instead of failing at once";
  return out;
}

using S = MoeSpec<8, 2>;
using Layer = moekit::cpu::ExpertParallelMoeLayer<S, LoopbackTransport>;

TEST(ExpertParallelMoeLayer, RanksThatDisagreeOnTheConfigurationStopAtSetup) {
  auto errors = errors_on(2, [](LoopbackTransport& t) {
    auto c = layer_config(FfnKind::kGated, 0, 0.0);
    if (t.rank() == 1) c.d_ff = 13;
    Layer layer(c, ExpertPlacement::even(8, 2), t);
  });
  for (const auto& [code, msg] : errors) {
    EXPECT_EQ(code, Errc::kInvalidArgument);
    EXPECT_NE(msg.find("the ranks disagree on the configuration: rank 1 has fingerprint"),
              std::string::npos)
        << msg;
  }
  errors = errors_on(3, [](LoopbackTransport& t) {
    auto c = layer_config(FfnKind::kGated, 0, 0.0);
    if (t.rank() == 2) c.d_ff = 0;  // rejected by rank 2 itself
    Layer layer(c, ExpertPlacement::even(8, 3), t);
  });
  EXPECT_NE(errors[2].second.find("config.d_ff = 0"), std::string::npos) << errors[2].second;
  EXPECT_NE(errors[0].second.find("rank 2 rejected its configuration"), std::string::npos)
      << errors[0].second;
  errors = errors_on(2, [](LoopbackTransport& t) {
    Layer layer(layer_config(FfnKind::kPlain, 0, 0.0), ExpertPlacement::even(8, 3), t);
  });
  for (const auto& [code, msg] : errors) {
    EXPECT_EQ(code, Errc::kInvalidArgument);
    EXPECT_NE(msg.find("placement covers 3 ranks, the transport has 2"), std::string::npos) << msg;
  }
  errors = errors_on(2, [](LoopbackTransport& t) {
    const auto placement = ExpertPlacement::from_counts(t.rank() == 0 ? std::vector<int>{4, 4}
                                                                      : std::vector<int>{5, 3});
    Layer layer(layer_config(FfnKind::kPlain, 0, 0.0), placement, t);
  });
  for (const auto& [code, msg] : errors) EXPECT_NE(msg.find("disagree"), std::string::npos) << msg;
}

// Forward on n ranks with `tokens` each, after `edit` changed a rank's inputs.
template <class Edit>
std::vector<std::pair<Errc, std::string>> forward_errors(moekit::cpu::MoeLayerConfig c,
                                                         std::vector<index_t> tokens,
                                                         std::vector<int> experts, Edit&& edit) {
  const int n = static_cast<int>(tokens.size());
  const EpCase ec{"bad", c, tokens, experts};
  const moekit_test::EpProblem<S> p(ec);
  return errors_on(n, [&](LoopbackTransport& t) {
    const int r = t.rank();
    const index_t rows = tokens[static_cast<std::size_t>(r)];
    Layer layer(c, ExpertPlacement::from_counts(ec.experts), t);
    index_t local_max = rows, global_max = p.T, x_rows = rows;
    edit(r, local_max, global_max, x_rows);
    moekit::cpu::ExpertParallelStorage<S> st(layer, local_max, global_max);
    std::vector<float> y(static_cast<std::size_t>(x_rows * p.d));
    layer.forward({p.x.data() + ec.first_token(r) * p.d, x_rows, p.d},
                  p.params(ec.first_expert(r), ec.experts[static_cast<std::size_t>(r)]), st.state(),
                  {y.data(), x_rows, p.d}, nullptr, st.workspace());
  });
}

TEST(ExpertParallelMoeLayer, BadCallsStopEveryRankWithTheSameCause) {
  const auto c = layer_config(FfnKind::kPlain, 0, 0.0);
  const auto none = [](int, index_t&, index_t&, index_t&) {};
  // A token split that breaks the block rule: every rank names rank 0.
  auto errors = forward_errors(c, {30, 40}, {4, 4}, none);
  for (const auto& [code, msg] : errors) {
    EXPECT_EQ(code, Errc::kInvalidArgument);
    EXPECT_NE(msg.find("rank 0 holds 30 tokens"), std::string::npos) << msg;
  }
  // One rank's rows exceed its state: that rank's own error, the others name it.
  errors =
      forward_errors(c, {64, 64, 10}, {3, 3, 2}, [](int r, index_t& local, index_t&, index_t&) {
        if (r == 1) local = 32;
      });
  EXPECT_EQ(errors[1].first, Errc::kShapeMismatch) << errors[1].second;
  EXPECT_NE(errors[1].second.find("exceeds the state's capacity"), std::string::npos);
  for (int r : {0, 2}) {
    EXPECT_EQ(errors[static_cast<std::size_t>(r)].first, Errc::kTransportError);
    EXPECT_NE(errors[static_cast<std::size_t>(r)].second.find("rank 1 rejected its arguments"),
              std::string::npos)
        << errors[static_cast<std::size_t>(r)].second;
  }
  // A state sized for a smaller batch than the real one (rank 0's seven
  // experts get at least one slot of each of the 128 tokens, and room for
  // 64 tokens' slots): every rank names rank 0.
  errors = forward_errors(c, {64, 64}, {7, 1}, [](int r, index_t&, index_t& global, index_t&) {
    if (r == 0) global = 64;
  });
  for (const auto& [code, msg] : errors) {
    EXPECT_EQ(code, Errc::kShapeMismatch);
    EXPECT_NE(msg.find("rank 0's experts receive"), std::string::npos) << msg;
  }
  // DropPolicy::kProbs needs the whole batch: unsupported, on every rank.
  auto probs = layer_config(FfnKind::kPlain, 0, 1.0);
  probs.router.capacity.policy = moekit::DropPolicy::kProbs;
  errors = forward_errors(probs, {64, 8}, {4, 4}, none);
  EXPECT_EQ(errors[0].first, Errc::kUnsupported) << errors[0].second;
  EXPECT_EQ(errors[1].first, Errc::kUnsupported) << errors[1].second;
}

}  // namespace
