// 19_expert_parallel: the multi-task model on synthetic data
// (cpu::MultitaskModel) trained with its experts sharded over MPI ranks.
//
// Each rank holds the whole router, shared expert, adapters and heads, and
// only its own routed experts (E = 8 split over the ranks); each rank trains
// on its own slice of every global batch. Rank 0 prints the losses and the
// bytes each rank sent per sample. With --check, every rank also trains the
// one-process model on the whole batches and checks that its own run is the
// same bit for bit: every step's losses and gradient norm, every replicated
// weight, and its experts' rows of the expert weights. It returns non-zero
// if anything differs.
//
//   mpirun -np 4 ./19_expert_parallel [--steps N] [--per-rank B] [--check]
//     --steps     training steps (default 200)
//     --per-rank  samples per rank and step, a multiple of 64 (default 64)
//     --check     compare with one process (see above)
// Also runs without mpirun, as one rank.
#include <moekit/dist/mpi.hpp>
#include <moekit/moekit.hpp>
#include <moekit/train/data.hpp>
#include <moekit/train/trainer.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <vector>

namespace {

using moekit::index_t;
namespace cpu = moekit::cpu;
namespace dist = moekit::dist;
namespace train = moekit::train;

using Model = cpu::MultitaskModel<moekit::MoeSpec<8, 2>, moekit::LoraSpec<8>, moekit::HeadSpec<4>>;

Model::Config model_config(index_t max_batch) {
  Model::Config c;
  c.encoder = {.d_input = 32, .d_model = 64, .d_ff = 128, .num_layers = 1};
  c.moe.d_model = 64;
  c.moe.d_ff = 64;
  c.moe.kind = moekit::FfnKind::kGated;
  c.moe.activation = moekit::Activation::kSilu;
  c.moe.num_shared = 1;
  c.moe.router.capacity.factor = 1.25;
  c.moe.switch_coeff = 0.5f;
  c.moe.z_coeff = 1e-3f;
  c.classes = {4, 6, 3, 8};
  c.max_batch = max_batch;
  c.seed = 1;
  return c;
}

struct Options {
  int steps = 200;
  index_t per_rank = 64;
  bool check = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--steps" && i + 1 < argc) {
      o.steps = std::atoi(argv[++i]);
    } else if (a == "--per-rank" && i + 1 < argc) {
      o.per_rank = std::atoll(argv[++i]);
    } else if (a == "--check") {
      o.check = true;
    } else {
      std::fprintf(stderr, "usage: %s [--steps N] [--per-rank B] [--check]\n", argv[0]);
      std::exit(2);
    }
  }
  if (o.steps < 1 || o.per_rank < 1 || o.per_rank % moekit::kTokenBlock != 0) {
    std::fprintf(stderr, "--steps must be >= 1 and --per-rank a positive multiple of %lld\n",
                 static_cast<long long>(moekit::kTokenBlock));
    std::exit(2);
  }
  return o;
}

// What a run reports per step.
struct Log {
  std::vector<double> loss, grad_norm;
};

// `steps` steps on rows [first, first + rows) of each global batch.
Log run(Model& model, const train::Dataset& data, int steps, index_t batch, index_t first,
        index_t rows) {
  train::TrainerConfig tc;
  tc.lr = {2e-3f, 2e-3f, 2e-3f, 4e-3f};
  tc.warmup_steps = steps / 10;
  tc.total_steps = steps;
  train::Trainer<Model> trainer(model, tc);
  train::BatchSampler sampler(data.size(), batch, 7);
  const index_t f = data.features;
  std::vector<float> x(static_cast<std::size_t>(rows * f));
  std::vector<std::int32_t> t(static_cast<std::size_t>(rows)), y(static_cast<std::size_t>(rows));
  Log log;
  for (int s = 0; s < steps; ++s) {
    // [slice]
    // Every rank draws the same global batch and takes its own rows.
    const std::vector<index_t> all = sampler.indices(s);
    const std::span<const index_t> mine(all.data() + first, static_cast<std::size_t>(rows));
    train::gather(data, mine, {x.data(), rows, f}, {t.data(), rows}, {y.data(), rows});
    const auto report = trainer.step({{x.data(), rows, f}, {t.data(), rows}, {y.data(), rows}});
    // [slice]
    log.loss.push_back(report.losses.total);
    log.grad_norm.push_back(report.grad_norm);
  }
  return log;
}

bool same_bits(std::span<const double> a, std::span<const double> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  // [setup]
  // MPI for the life of the program; the transport works on its own copy
  // of MPI_COMM_WORLD and aborts the job if a rank stops answering.
  dist::MpiSession mpi(argc, argv);
  dist::MpiTransport transport;
  const int rank = transport.rank(), ranks = transport.size();

  // The routed experts split over the ranks (uneven splits work too); the
  // model then holds only this rank's experts. Construction is collective:
  // the ranks compare their configurations first.
  const auto placement = dist::ExpertPlacement::even(8, ranks);
  Model model(model_config(o.per_rank), {transport, placement});
  // [setup]

  const train::SyntheticTasks tasks({.features = 32, .classes = {4, 6, 3, 8}, .seed = 3});
  const train::Dataset data = tasks.sample(20000, 1);
  const index_t batch = o.per_rank * ranks;  // the global batch of every step
  const moekit::dist::Traffic before = transport.traffic();
  const Log log = run(model, data, o.steps, batch, o.per_rank * rank, o.per_rank);
  const moekit::dist::Traffic after = transport.traffic();

  if (rank == 0) {
    std::printf("%d ranks, experts %d..%d on rank 0, global batch %lld\n", ranks,
                model.first_expert(), model.first_expert() + model.local_experts() - 1,
                static_cast<long long>(batch));
    for (int s = 0; s < o.steps; s += std::max(1, o.steps / 10)) {
      std::printf("step %4d  loss %.4f  grad norm %.4f\n", s, log.loss[static_cast<std::size_t>(s)],
                  log.grad_norm[static_cast<std::size_t>(s)]);
    }
    std::printf("rank 0 sent %.0f bytes per sample of its own per step (%lld operations)\n",
                static_cast<double>(after.bytes_sent - before.bytes_sent) /
                    static_cast<double>(o.per_rank * o.steps),
                static_cast<long long>(after.operations - before.operations));
  }
  if (!o.check) return 0;

  // The same steps in one process on the whole batches.
  Model one(model_config(batch));
  const Log ref = run(one, data, o.steps, batch, 0, batch);
  bool same = same_bits(log.loss, ref.loss) && same_bits(log.grad_norm, ref.grad_norm);
  for (std::size_t i = 0; i < model.tensors().size(); ++i) {
    const cpu::ModelTensor& mine = model.tensors()[i];
    const cpu::ModelTensor& whole = one.tensors()[i];
    const auto at = static_cast<std::size_t>(mine.expert_rows * mine.cols * model.first_expert());
    same = same && std::memcmp(mine.value.data(), whole.value.data() + at,
                               mine.value.size() * sizeof(float)) == 0;
  }
  std::vector<std::int64_t> differ = {same ? 0 : 1};
  transport.all_reduce_sum(differ);
  if (rank == 0) {
    std::printf("%s: %lld of %d ranks differ from one process\n",
                differ[0] == 0 ? "bit-identical" : "MISMATCH", static_cast<long long>(differ[0]),
                ranks);
  }
  return differ[0] == 0 ? 0 : 1;
}
