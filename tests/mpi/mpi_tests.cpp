// Expert parallelism over MPI, run by CTest under mpirun -np 2 and -np 4
// (tests/mpi/CMakeLists.txt). Every rank computes the one-process result
// itself and compares its own part bit for bit. One test per run:
//
//   layer            cpu::ExpertParallelMoeLayer on several expert and token
//                    splits of this world size vs cpu::MoeLayer
//   training         50 Trainer steps of the reference model vs one process
//   config_mismatch  rank 1 builds another layer: every rank must stop at
//                    setup with the disagreement error (the run passes if so)
//   silent_peer      rank 1 never takes part: rank 0's deadline must fire and
//                    abort the job with a message naming the operation (CTest
//                    matches the message; mpirun's exit status is non-zero)
//   rank_exits       rank 1 exits without MPI_Finalize: mpirun must end the
//                    job (CTest expects a failure within the test's timeout)
//
// Exit status: 0 when every rank passed (agreed over MPI), 1 otherwise.
#include <moekit/dist/mpi.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "expert_parallel_case.hpp"

namespace {

using moekit::index_t;
using moekit::dist::ExpertPlacement;
using moekit::dist::MpiTransport;
using moekit_test::EpCase;

moekit::cpu::MoeLayerConfig layer_config(moekit::FfnKind kind, int shared, double capacity) {
  return moekit_test::ep_layer_config(kind, shared, capacity, 24, 16, 12);
}

// Expert and token splits of this world size (each rank's rows a multiple
// of 64 but the last one's, some ranks empty, some without experts).
std::vector<EpCase> layer_cases(int n) {
  using moekit::FfnKind;
  const auto gated = layer_config(FfnKind::kGated, 2, 1.0);
  const auto plain = layer_config(FfnKind::kPlain, 0, 0.0);
  if (n == 2) {
    return {{"even", gated, {128, 72}, {4, 4}},
            {"uneven experts", plain, {64, 136}, {7, 1}},
            {"tokens on one rank", gated, {0, 100}, {2, 6}}};
  }
  if (n == 4) {
    return {{"even", gated, {64, 64, 64, 64}, {2, 2, 2, 2}},
            {"uneven tokens and experts", gated, {0, 192, 64, 9}, {1, 2, 0, 5}},
            {"plain, dropless", plain, {128, 64, 0, 33}, {3, 0, 4, 1}}};
  }
  std::vector<index_t> tokens(static_cast<std::size_t>(n), 64);
  tokens.back() = 40;
  return {{"even", gated, tokens, {}}};
}

// Every rank's failures counted; each rank prints its own.
bool all_passed(MpiTransport& t, const std::vector<std::string>& diffs) {
  for (const std::string& d : diffs) std::printf("FAIL %s\n", d.c_str());
  std::vector<std::int64_t> failed = {static_cast<std::int64_t>(diffs.size())};
  t.all_reduce_sum(failed);
  return failed[0] == 0;
}

bool test_layer(MpiTransport& t) {
  std::vector<std::string> diffs;
  for (EpCase c : layer_cases(t.size())) {
    if (c.experts.empty()) {
      const auto p = ExpertPlacement::even(8, t.size());
      for (int r = 0; r < t.size(); ++r) c.experts.push_back(p.count(r));
    }
    const moekit_test::EpProblem<moekit::MoeSpec<8, 2>> p(c);
    const auto ref = moekit_test::one_process(c, p);
    const std::vector<std::string> d = moekit_test::run_rank(c, p, ref, t);
    diffs.insert(diffs.end(), d.begin(), d.end());
    if (t.rank() == 0 && d.empty()) {
      std::printf("layer \"%s\" on %d ranks: rank 0 bit-identical (%lld tokens, %lld dropped)\n",
                  c.name.c_str(), t.size(), static_cast<long long>(p.T),
                  static_cast<long long>(ref.stats.dropped));
    }
  }
  return all_passed(t, diffs);
}

bool test_training(MpiTransport& t) {
  using moekit_test::TrainModel;
  constexpr int kSteps = 50;
  const int n = t.size();
  // Global batches of 64 (n - 1) + 48 rows: every rank 64 but the last 48.
  const index_t batch = 64 * (n - 1) + 48;
  const index_t rows = t.rank() + 1 < n ? 64 : 48, first = 64 * index_t{t.rank()};
  TrainModel one(moekit_test::training_model_config(batch));
  const moekit_test::TrainingLog ref = moekit_test::train_slice(one, kSteps, batch, 0, batch);
  // Uneven experts: rank 0 holds one more than the others where 8 allows.
  std::vector<int> counts(static_cast<std::size_t>(n), 8 / n);
  counts[0] += 8 % n;
  if (n >= 2 && counts[1] > 0) ++counts[0], --counts[1];
  TrainModel model(moekit_test::training_model_config(64),
                   {t, ExpertPlacement::from_counts(counts)});
  const moekit_test::TrainingLog log = moekit_test::train_slice(model, kSteps, batch, first, rows);
  const std::vector<std::string> diffs = moekit_test::compare_training(log, ref, model, t.rank());
  if (t.rank() == 0 && diffs.empty()) {
    std::printf(
        "training: %d steps on %d ranks bit-identical to one process "
        "(task loss %.4f -> %.4f, grad norm %.4f -> %.4f)\n",
        kSteps, n, ref.task.front(), ref.task.back(), ref.grad_norm.front(), ref.grad_norm.back());
  }
  return all_passed(t, diffs);
}

using Layer = moekit::cpu::ExpertParallelMoeLayer<moekit::MoeSpec<8, 2>, MpiTransport>;

bool test_config_mismatch(MpiTransport& t) {
  auto c = layer_config(moekit::FfnKind::kGated, 0, 0.0);
  if (t.rank() == 1) c.d_ff = 20;
  std::string error;
  try {
    Layer layer(c, ExpertPlacement::even(8, t.size()), t);
  } catch (const moekit::Error& e) {
    error = e.what();
  }
  std::printf("rank %d: %s\n", t.rank(), error.empty() ? "no error" : error.c_str());
  const bool ok = error.find("the ranks disagree on the configuration") != std::string::npos;
  return all_passed(t, ok ? std::vector<std::string>{}
                          : std::vector<std::string>{"the mismatch was not reported"});
}

bool test_silent_peer(MpiTransport& t) {
  if (t.rank() == 1) {
    std::this_thread::sleep_for(std::chrono::seconds(60));  // never answers in time
    return false;
  }
  std::vector<std::int64_t> v = {1};
  t.all_reduce_sum(v);  // rank 0: its deadline fires, it prints and aborts the job
  return false;
}

bool test_rank_exits(MpiTransport& t) {
  if (t.rank() == 1) std::_Exit(3);  // no MPI_Finalize: MPI's runtime must notice
  t.barrier();
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  moekit::dist::MpiSession session(argc, argv);
  const std::string test = argc > 1 ? argv[1] : "";
  moekit::dist::TransportOptions options = MpiTransport::kDefaultOptions;
  if (test == "silent_peer") options.timeout = std::chrono::seconds(2);
  MpiTransport t(MPI_COMM_WORLD, options);
  bool ok = false;
  try {
    if (test == "layer") {
      ok = test_layer(t);
    } else if (test == "training") {
      ok = test_training(t);
    } else if (test == "config_mismatch") {
      ok = test_config_mismatch(t);
    } else if (test == "silent_peer") {
      ok = test_silent_peer(t);
    } else if (test == "rank_exits") {
      ok = test_rank_exits(t);
    } else {
      std::fprintf(stderr,
                   "usage: %s layer|training|config_mismatch|silent_peer|rank_exits "
                   "(under mpirun)\n",
                   argv[0]);
      return 2;
    }
  } catch (const std::exception& e) {
    std::printf("FAIL rank %d: %s\n", t.rank(), e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  if (t.rank() == 0) std::printf("%s %s\n", test.c_str(), ok ? "passed" : "FAILED");
  return ok ? 0 : 1;
}
