// 12_multitask_training: the reference multi-task model trained end to end.
//
// A frozen MLP encoder, two MoE layers (E = 8, K = 2, SwiGLU experts), one
// rank-8 LoRA adapter and one head per branch, on a synthetic benchmark of
// four classification tasks over shared inputs (moekit/train/data.hpp), or on
// your own CSV file (task,label,f0,f1,...). It trains with AdamW and the
// per-component learning rates, writes the metrics of every step as JSON
// lines and CSV (tools/plot_run.py turns them into charts), saves a
// checkpoint periodically, runs the quality checks, then adds a fifth branch
// and trains only its adapter and head, checking that the four old
// branches' outputs stay bit-identical. It prints a final table and returns
// non-zero if a check fails.
//
//   12_multitask_training [--steps N] [--out DIR] [--csv FILE] [--quick]
//                         [--checkpoint-every N] [--resume] [--stop-after N]
//     --steps     training steps (default 3000; --quick: 300)
//     --out       where metrics.jsonl, metrics.csv and checkpoint.safetensors
//                 go (default: multitask_run)
//     --csv       train on this file instead of the synthetic tasks (4 tasks;
//                 90% for training, 10% held out)
//     --quick     a short run for smoke tests
//     --checkpoint-every   steps between checkpoints (default 500; --quick: 100);
//                 one is also written at the end of training
//     --resume    continue from DIR/checkpoint.safetensors (the metrics logged
//                 after it are dropped): the result is the uninterrupted run's,
//                 bit for bit; without a checkpoint the run starts afresh
//     --stop-after  stop once N steps are done, checkpointed (as a job with a
//                 time limit would); --resume continues
//
// Exit codes: 0 all checks passed; 1 a check failed or an error; 2 bad
// arguments; 3 the run finished but its last checkpoint could not be written
// (the message says why; the last good checkpoint is kept). A write error
// (a full disk) never stops the training: it is reported, and the next
// checkpoint tries again.
#include <moekit/moekit.hpp>
#include <moekit/train/data.hpp>
#include <moekit/train/metrics.hpp>
#include <moekit/train/quality.hpp>
#include <moekit/train/trainer.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include <unistd.h>  // isatty: a progress line in place on a terminal

namespace {

using moekit::index_t;
namespace cpu = moekit::cpu;
namespace train = moekit::train;

// [model]
// The reference architecture's numbers: E = 8 experts, K = 2 per token,
// LoRA rank 8, four branches. Widths are run-time configuration.
using Model = cpu::MultitaskModel<moekit::MoeSpec<8, 2>, moekit::LoraSpec<8>, moekit::HeadSpec<4>>;

Model::Config model_config(index_t features, const std::array<index_t, 4>& classes) {
  Model::Config c;
  c.encoder = {.d_input = features, .d_model = 64, .d_ff = 128, .num_layers = 2};
  c.moe.d_model = 64;
  c.moe.d_ff = 128;  // per expert
  c.moe.kind = moekit::FfnKind::kGated;
  c.moe.activation = moekit::Activation::kSilu;
  c.moe.switch_coeff = 0.5f;  // the balance loss's weight
  c.moe.z_coeff = 1e-3f;
  c.num_moe_layers = 2;
  c.lora_alpha = 16.0f;
  c.classes = classes;
  c.max_batch = 256;
  c.seed = 1;
  return c;
}
// [model]

struct Options {
  std::int64_t steps = 3000;
  std::int64_t checkpoint_every = 500;
  std::int64_t stop_after = -1;  // -1: train all steps
  std::filesystem::path out = "multitask_run";
  std::filesystem::path csv;
  bool quick = false;
  bool resume = false;
};

Options parse(int argc, char** argv) {
  Options o;
  bool steps_given = false, every_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--steps" && has_value) {
      o.steps = std::atoll(argv[++i]);
      steps_given = true;
    } else if (a == "--checkpoint-every" && has_value) {
      o.checkpoint_every = std::atoll(argv[++i]);
      every_given = true;
    } else if (a == "--stop-after" && has_value) {
      o.stop_after = std::atoll(argv[++i]);
    } else if (a == "--out" && has_value) {
      o.out = argv[++i];
    } else if (a == "--csv" && has_value) {
      o.csv = argv[++i];
    } else if (a == "--quick") {
      o.quick = true;
    } else if (a == "--resume") {
      o.resume = true;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--steps N] [--out DIR] [--csv FILE] [--quick] "
                   "[--checkpoint-every N] [--resume] [--stop-after N]\n",
                   argv[0]);
      std::exit(2);
    }
  }
  if (o.quick && !steps_given) o.steps = 300;
  if (o.quick && !every_given) o.checkpoint_every = 100;
  if (o.steps < 10 || o.checkpoint_every < 1 || (o.stop_after != -1 && o.stop_after < 1)) {
    std::fprintf(stderr, "--steps must be at least 10, --checkpoint-every and --stop-after 1\n");
    std::exit(2);
  }
  return o;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The record of a step for the metrics log.
template <class Report>
train::StepRecord record(std::int64_t step, const Report& r, const train::TrainerConfig& tc,
                         double samples_per_s, double elapsed) {
  train::StepRecord rec;
  rec.step = step;
  rec.lr = tc.lr.moe * r.lr_scale;
  rec.loss = r.losses.total;
  rec.task_loss = r.losses.task.total;
  rec.aux_loss = r.losses.aux;
  rec.grad_norm = r.grad_norm;
  rec.accuracy.assign(r.losses.task.accuracy.begin(), r.losses.task.accuracy.end());
  for (const auto& s : r.losses.routing) {
    rec.expert_load.push_back(train::expert_load_fractions(std::span<const index_t>(s.kept)));
  }
  rec.tokens_per_s = samples_per_s;
  rec.peak_rss_mib = train::peak_rss_mib();
  rec.elapsed_s = elapsed;
  return rec;
}

// The metrics log (JSON lines and CSV). A resumed run keeps the records of
// the steps before its checkpoint and drops any logged after it. A write
// error is reported once and ends the logging, never the training.
class RunLog {
 public:
  RunLog(const std::filesystem::path& dir, std::int64_t resumed_at)
      : history_(resumed_at > 0 ? past_records(dir / "metrics.jsonl", resumed_at)
                                : std::vector<train::StepRecord>{}),
        log_(dir / "metrics.jsonl", dir / "metrics.csv") {
    for (const train::StepRecord& r : history_) write_only(r);
  }
  void write(const train::StepRecord& r) {
    history_.push_back(r);
    write_only(r);
  }
  // The aux loss of every training step, those of the interrupted run included.
  std::vector<double> aux_losses() const {
    std::vector<double> out;
    for (const train::StepRecord& r : history_) {
      if (r.split == "train") out.push_back(r.aux_loss);
    }
    return out;
  }

 private:
  static std::vector<train::StepRecord> past_records(const std::filesystem::path& jsonl,
                                                     std::int64_t before) {
    std::vector<train::StepRecord> kept;
    if (!std::filesystem::exists(jsonl)) return kept;
    for (train::StepRecord& r : train::read_metrics(jsonl)) {
      if (r.step < before) kept.push_back(std::move(r));
    }
    return kept;
  }
  void write_only(const train::StepRecord& r) {
    if (failed_) return;
    try {
      log_.write(r);
    } catch (const moekit::Error& e) {
      failed_ = true;
      std::fprintf(stderr, "\nmetrics log: %s\n  logging stops here; training goes on\n", e.what());
    }
  }

  std::vector<train::StepRecord> history_;
  train::MetricsLog log_;
  bool failed_ = false;
};

// Writes the trainer's checkpoint after `step` steps. A failure (a full
// disk, a missing directory) is reported with its reason; the write is
// atomic, so the previous checkpoint is still there, whole.
template <class Trainer>
bool save_checkpoint(const Trainer& trainer, const std::filesystem::path& path, std::int64_t step,
                     std::int64_t last_good) {
  try {
    trainer.save_checkpoint(path);
    return true;
  } catch (const moekit::Error& e) {
    std::fprintf(stderr, "\ncheckpoint after step %lld not written: %s\n",
                 static_cast<long long>(step), e.what());
    if (last_good > 0) {
      std::fprintf(stderr, "  %s still holds step %lld; training goes on\n", path.string().c_str(),
                   static_cast<long long>(last_good));
    } else {
      std::fprintf(stderr, "  no checkpoint yet; training goes on\n");
    }
    return false;
  }
}

train::StepRecord eval_record(std::int64_t step, const train::EvalReport& e) {
  train::StepRecord rec;
  rec.split = "eval";
  rec.step = step;
  double loss = 0.0;
  for (double l : e.loss) loss += l;
  rec.loss = rec.task_loss = loss;
  rec.accuracy = e.accuracy;
  rec.expert_load = e.expert_load;
  rec.peak_rss_mib = train::peak_rss_mib();
  return rec;
}

int run(const Options& opt) {
  std::filesystem::create_directories(opt.out);

  // [data]
  // Four tasks over shared inputs. The fifth task (used for branch expansion
  // below) is defined by the same seed, so the first four are unchanged.
  const train::SyntheticTasks tasks({.classes = {4, 6, 3, 8, 5}, .seed = 7});
  train::Dataset all = tasks.sample(opt.quick ? 20000 : 100000, /*seed=*/1);
  if (!opt.csv.empty()) all = train::read_csv(opt.csv);
  // Branches 0-3 train now; task 4 waits for the expansion.
  std::vector<index_t> first_four;
  for (std::size_t i = 0; i < all.tasks.size(); ++i) {
    if (all.tasks[i] < 4) first_four.push_back(static_cast<index_t>(i));
  }
  const auto [train_set, test_set] = train::split(train::subset(all, first_four), 0.9, /*seed=*/2);
  // [data]
  const index_t features = train_set.features;
  std::array<index_t, 4> classes{};  // per branch: the largest label + 1
  for (std::size_t i = 0; i < all.tasks.size(); ++i) {
    if (all.tasks[i] < 4) {
      index_t& c = classes[static_cast<std::size_t>(all.tasks[i])];
      c = std::max<index_t>(c, all.labels[i] + 1);
    }
  }
  for (index_t& c : classes) c = std::max<index_t>(c, 2);

  Model model(model_config(features, classes));
  const moekit::ModelParams params = model.params();
  std::printf(
      "model: %lld parameters (%lld trainable, %lld active per sample); encoder %lld "
      "frozen; a branch costs %lld\n",
      static_cast<long long>(params.total.total), static_cast<long long>(params.total.trainable),
      static_cast<long long>(params.total.active), static_cast<long long>(params.encoder.total),
      static_cast<long long>(params.branch.total));
  std::printf("data: %lld training and %lld held-out samples, %lld features\n",
              static_cast<long long>(train_set.size()), static_cast<long long>(test_set.size()),
              static_cast<long long>(features));

  // [train]
  // AdamW with one learning rate per component, warm-up then cosine decay,
  // clipping at global norm 1. This small model trains from scratch in under a
  // minute, so it uses 10x the reference rates (1e-4 / 5e-4 / 5e-4 / 1e-3,
  // the TrainerConfig defaults, are for adapting a large pretrained stack).
  train::TrainerConfig tc;
  tc.lr = {1e-3f, 5e-3f, 5e-3f, 1e-2f};
  tc.warmup_steps = opt.steps / 10;
  tc.total_steps = opt.steps;
  train::Trainer<Model> trainer(model, tc);

  // Checkpoints: every checkpoint_every steps and at the end, each written
  // atomically. --resume restores the model, the optimizer and the step;
  // batches, dropout noise and the schedule are functions of the step, so
  // the resumed run repeats the uninterrupted one bit for bit.
  const std::filesystem::path checkpoint = opt.out / "checkpoint.safetensors";
  if (opt.resume && std::filesystem::exists(checkpoint)) trainer.load_checkpoint(checkpoint);
  const std::int64_t start = trainer.steps();
  const std::int64_t end = opt.stop_after > 0 ? std::min(opt.stop_after, opt.steps) : opt.steps;
  std::int64_t checkpointed = start;  // the step of the last good checkpoint
  if (start > 0)
    std::printf("resumed from %s at step %lld\n", checkpoint.string().c_str(),
                static_cast<long long>(start));

  constexpr index_t B = 256;
  train::BatchSampler sampler(train_set.size(), B, /*seed=*/3);
  std::vector<float> x(static_cast<std::size_t>(B * features));
  std::vector<std::int32_t> task_ids(B), labels(B);
  const moekit::MatrixView<float> x_view(x.data(), B, features);
  const cpu::Batch batch{x_view, {task_ids.data(), B}, {labels.data(), B}};

  const std::uint64_t frozen_before = train::frozen_fingerprint(model);
  RunLog log(opt.out, start);
  const bool interactive = isatty(fileno(stdout)) != 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (std::int64_t step = start; step < end; ++step) {
    train::gather(train_set, sampler.indices(step), x_view, {task_ids.data(), B},
                  {labels.data(), B});
    const auto report = trainer.step(batch);
    const double elapsed = seconds_since(t0);
    const train::StepRecord rec =
        record(step, report, tc, static_cast<double>((step + 1 - start) * B) / elapsed, elapsed);
    log.write(rec);
    // One line rewritten in place on a terminal; every 100th step in a log.
    if (interactive && (step % 10 == 0 || step + 1 == end)) {
      std::printf("\r%s", train::progress_line(rec, opt.steps).c_str());
      std::fflush(stdout);
    } else if (!interactive && (step % 100 == 0 || step + 1 == end)) {
      std::printf("%s\n", train::progress_line(rec, opt.steps).c_str());
    }
    if ((step + 1) % 500 == 0 || step + 1 == opt.steps) {
      log.write(eval_record(step, train::evaluate(model, test_set)));
    }
    if ((step + 1) % opt.checkpoint_every == 0 || step + 1 == end) {
      if (save_checkpoint(trainer, checkpoint, step + 1, checkpointed)) checkpointed = step + 1;
    }
  }
  const double train_seconds = seconds_since(t0);
  if (interactive) std::printf("\n");
  // [train]
  // A run whose last checkpoint failed still reports everything (exit code 3).
  const bool checkpoint_ok = checkpointed == end;
  if (end < opt.steps) {
    std::printf("stopped after step %lld (--stop-after); continue with --resume\n",
                static_cast<long long>(end));
    return checkpoint_ok ? 0 : 3;
  }

  // [quality]
  const train::EvalReport eval = train::evaluate(model, test_set);
  const std::vector<double> aux = log.aux_losses();  // every step's, a resumed run's too
  const std::vector<train::QualityCheck> checks = {
      train::encoder_frozen(frozen_before, train::frozen_fingerprint(model)),
      train::aux_loss_decreasing(aux, std::max<std::size_t>(1, aux.size() / 10)),
      train::expert_load_balanced(eval, 1.5),
      train::branches_above_chance(eval, classes, 0.2),
  };
  // [quality]

  if (!opt.csv.empty()) {  // the expansion below uses the synthetic fifth task
    std::printf("(branch expansion skipped: it trains the synthetic fifth task)\n");
  }
  bool unchanged = true, new_ok = true;
  double new_accuracy = 0.0, branch_seconds = 0.0;
  index_t new_params = 0;
  double new_share = 0.0;
  if (opt.csv.empty()) {
    // [expand]
    // A fifth branch: copy the model, train only the new adapter and head on
    // task 4's samples, and check that branches 0-3 answer exactly as before:
    // compare the logits of every held-out sample (max_classes() per row).
    // test_set by init-capture: clang 14 and 15 cannot capture a structured binding.
    const auto logits_of = [&, &test_set = test_set](auto& m) {
      const index_t C = m.heads().max_classes();
      std::vector<float> z(static_cast<std::size_t>(test_set.size() * C));
      for (index_t r0 = 0; r0 < test_set.size(); r0 += B) {
        const index_t n = std::min(B, test_set.size() - r0);
        m.predict({test_set.inputs().middle_rows(r0, n), test_set.task_view().segment(r0, n), {}},
                  {z.data() + r0 * C, n, C});
      }
      return z;
    };
    const std::vector<float> old_logits = logits_of(model);

    auto bigger = model.with_branch(tasks.num_classes(4), /*seed=*/5);
    using Bigger = decltype(bigger);
    const auto [new_train, new_test] =
        train::split(tasks.sample_task(opt.quick ? 4000 : 20000, 4, /*seed=*/4), 0.9, 5);
    train::TrainerConfig branch_tc = tc;
    branch_tc.scope = cpu::TrainScope::only_branch(4);
    branch_tc.total_steps = opt.steps / 3;
    branch_tc.warmup_steps = branch_tc.total_steps / 10;
    train::Trainer<Bigger> branch_trainer(bigger, branch_tc);
    train::BatchSampler new_sampler(new_train.size(), B, /*seed=*/6);
    const auto t1 = std::chrono::steady_clock::now();
    for (std::int64_t step = 0; step < branch_tc.total_steps; ++step) {
      train::gather(new_train, new_sampler.indices(step), x_view, {task_ids.data(), B},
                    {labels.data(), B});
      branch_trainer.step(batch);
    }
    branch_seconds = seconds_since(t1);

    const std::vector<float> new_logits = logits_of(bigger);
    const index_t C = model.heads().max_classes(), C5 = bigger.heads().max_classes();
    for (std::size_t i = 0; i < test_set.tasks.size(); ++i) {
      const auto task = static_cast<std::size_t>(test_set.tasks[i]);
      const std::size_t bytes = static_cast<std::size_t>(classes[task]) * sizeof(float);
      unchanged = unchanged &&
                  std::memcmp(old_logits.data() + i * static_cast<std::size_t>(C),
                              new_logits.data() + i * static_cast<std::size_t>(C5), bytes) == 0;
    }
    const train::EvalReport new_eval = train::evaluate(bigger, new_test);
    // [expand]
    new_accuracy = new_eval.accuracy[4];
    new_ok = new_accuracy >= 1.0 / static_cast<double>(tasks.num_classes(4)) + 0.2;
    new_params = static_cast<index_t>(bigger.branch_params(tasks.num_classes(4)).total);
    new_share = static_cast<double>(new_params) / static_cast<double>(bigger.params().total.total);
  }

  // The final table.
  std::printf("\n%-8s %7s %9s %8s %7s\n", "branch", "classes", "accuracy", "chance", "loss");
  for (std::size_t h = 0; h < 4; ++h) {
    std::printf("%-8zu %7lld %9.3f %8.3f %7.3f\n", h, static_cast<long long>(classes[h]),
                eval.accuracy[h], 1.0 / static_cast<double>(classes[h]), eval.loss[h]);
  }
  if (opt.csv.empty()) {
    std::printf("%-8s %7lld %9.3f %8.3f %7s   (added after training, %lld steps)\n", "4 (new)",
                static_cast<long long>(tasks.num_classes(4)), new_accuracy,
                1.0 / static_cast<double>(tasks.num_classes(4)), "",
                static_cast<long long>(opt.steps / 3));
  }
  std::printf("\nexpert load (busiest / mean): layer 1 %.2f, layer 2 %.2f\n",
              eval.max_load_ratio[0], eval.max_load_ratio[1]);
  std::printf("speed: %.0f samples/s over %lld steps (%.1f s); peak memory %.0f MiB\n",
              static_cast<double>((end - start) * B) / train_seconds,
              static_cast<long long>(end - start), train_seconds, train::peak_rss_mib());
  if (opt.csv.empty()) {
    std::printf("new branch: %lld parameters (%.2f%% of the model), trained in %.1f s\n",
                static_cast<long long>(new_params), 100.0 * new_share, branch_seconds);
  }
  std::printf("\nquality checks:\n");
  bool ok = true;
  for (const train::QualityCheck& c : checks) {
    std::printf("  %-24s %s  %s\n", c.name.c_str(), c.passed ? "ok  " : "FAIL", c.detail.c_str());
    ok = ok && c.passed;
  }
  std::printf("  %-24s %s  branches 0-3 bit-identical after adding branch 4\n",
              "old branches unchanged", unchanged ? "ok  " : "FAIL");
  std::printf("  %-24s %s  accuracy %.3f\n", "new branch learns", new_ok ? "ok  " : "FAIL",
              new_accuracy);
  ok = ok && unchanged && new_ok;
  std::printf("\nmetrics: %s (plot: python3 tools/plot_run.py %s)\n",
              (opt.out / "metrics.jsonl").string().c_str(),
              (opt.out / "metrics.jsonl").string().c_str());
  if (!checkpoint_ok) {
    std::printf(
        "checkpoint: NOT written after the last step (see the error above); the last "
        "good one holds step %lld (0: none)\n",
        static_cast<long long>(checkpointed));
  }
  return !ok ? 1 : (checkpoint_ok ? 0 : 3);
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  try {
    return run(opt);
  } catch (const moekit::Error& e) {  // an error the run cannot go on from
    std::fprintf(stderr, "\nerror: %s\n", e.what());
    return 1;
  }
}
