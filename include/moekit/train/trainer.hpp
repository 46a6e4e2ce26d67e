#pragma once
// Training the multi-task models (moekit/nn/multitask_model.hpp and
// moekit/nn/text_multitask_model.hpp):
// AdamW with one parameter group per component and its own learning rate,
// linear warm-up then cosine decay, global-norm gradient clipping, exact
// checkpoints, and evaluation.
//
// Parameter groups (defaults: the reference system's rates):
//   "moe"   the experts (routed and shared)   lr.moe   1e-4
//   "gate"  the routers                        lr.gate  5e-4
//   "lora"  the branch adapters (A and B)      lr.lora  5e-4
//   "head"  the branch heads (weight, bias)    lr.head  1e-3
// With TrainScope::only_branch(t) the optimizer holds only branch t's slices
// of "lora" and "head" (adapter t's rows of A and B, head t's rows and bias
// entries): nothing else can change, so every other branch's outputs stay
// bit-identical (see with_branch in the model).
//
// One step (step()): the model's forward, loss and backward on the batch;
// clip_grad_norm(max_grad_norm) over the trained gradients; if the norm is
// not finite the update is skipped (counted in StepReport::skipped, the step
// counter still advances so the schedule and the dropout noise move on);
// else AdamW with lr = group lr * WarmupCosine(step). LoRA dropout noise is
// LoraStep{dropout_seed, step}. Everything is a function of the weights, the
// optimizer state, the step number and the batch, so a run resumed from a
// checkpoint repeats the uninterrupted run bit for bit when its batches are
// drawn as a function of the step (train::BatchSampler).
//
// Expert parallelism (a model built with a transport): every rank runs a
// Trainer on its own model in lock step (step() is collective). The
// gradient norm is that of the whole model: the routed experts' chunk sums
// (each expert's own, see AdamW's segments) are gathered from their ranks
// and added in one process's order, so clipping, and every update, are
// those of one process. A checkpoint then holds the rank's shard: its
// structure metadata names the rank's experts, and only a model with the
// same shard loads it. evaluate() takes one-process models only.
//
// Checkpoints (save_checkpoint / load_checkpoint): one safetensors file with
//   every model tensor under its model name (F32, shape [rows, cols]),
//   the optimizer's moments under "optimizer.<param>.exp_avg" / ".exp_avg_sq",
//   metadata "optimizer.step", "moekit.trainer.step", "moekit.trainer.skipped",
//   "moekit.model" (the structure: E, K, R, H, widths, layers, classes) and
//   "moekit.scope".
// Loading checks the structure and scope metadata and every tensor's
// presence, dtype and shape before writing anything; a rejected file leaves
// the model and the trainer untouched. save_model / load_model do the same
// for the model's weights alone (inference, or a new run from trained
// weights); load_encoder loads only the frozen encoder (a pretrained one).
//
// Evaluation (evaluate()): inference over a dataset in batches of the model's
// max_batch: per-branch loss and accuracy, and each MoE layer's expert load
// (the fraction of kept assignments per expert, whose balance the quality
// checks in moekit/train/quality.hpp judge).

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/cpu/lora.hpp"
#include "moekit/dist/transport.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/nn/multitask_model.hpp"
#include "moekit/train/data.hpp"
#include "moekit/train/metrics.hpp"
#include "moekit/train/optimizer.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace train {

// The base learning rate of each parameter group (the table at the top of
// this file); each is scaled by the warm-up + cosine schedule.
struct LearningRates {
  float moe = 1e-4f;   // the experts, routed and shared
  float gate = 5e-4f;  // the routers
  float lora = 5e-4f;  // the branch adapters
  float head = 1e-3f;  // the branch heads
};

// How a Trainer trains: rates, AdamW, schedule, clipping and scope.
struct TrainerConfig {
  LearningRates lr{};                // per group
  float weight_decay = 0.0f;         // AdamW's decoupled decay, the same for every group
  AdamWConfig adam{};                // betas and eps
  std::int64_t warmup_steps = 500;   // steps of linear warm-up to the full rates, <= total_steps
  std::int64_t total_steps = 10000;  // the cosine reaches min_lr_ratio here
  float min_lr_ratio = 0.1f;         // final fraction of the base rates, in [0, 1]
  double max_grad_norm = 1.0;        // global-norm clipping; <= 0 turns it off
  cpu::TrainScope scope{};           // what is trained: the whole model or one branch
  std::uint64_t dropout_seed = 0;    // LoRA dropout noise (when the model has dropout)
};

// What Trainer::step reports.
template <class Model>
struct StepReport {
  // The model's losses, routing statistics and aux losses of the step.
  cpu::StepLosses<typename Model::MoeSpec, typename Model::HeadSpec> losses;
  double grad_norm = 0.0;  // before clipping
  float lr_scale = 0.0f;   // the schedule's multiplier of every group's lr this step
  bool skipped = false;    // the gradient was not finite: no update
};

// Per-branch quality of a model on a dataset, and the MoE layers' loads.
struct EvalReport {
  std::vector<double> loss;      // per branch: mean cross-entropy (0 without samples)
  std::vector<double> accuracy;  // per branch (0 without samples)
  std::vector<index_t> count;    // samples per branch
  std::vector<std::vector<double>> expert_load;  // per layer, per expert: kept share (sums to 1)
  // The busiest expert's share times E, per layer: 1 is perfect balance.
  std::vector<double> max_load_ratio;
  // The mean accuracy over branches with samples (0 when none has any).
  double mean_accuracy() const {
    double s = 0.0;
    int n = 0;
    for (std::size_t h = 0; h < accuracy.size(); ++h) {
      if (count[h] > 0) s += accuracy[h], ++n;
    }
    return n > 0 ? s / n : 0.0;
  }
};

namespace detail {

// The batch type a model trains on: Model::Batch, or cpu::Batch.
template <class Model>
struct BatchOf {
  using type = cpu::Batch;
};
template <class Model>
requires requires { typename Model::Batch; }
struct BatchOf<Model> {
  using type = typename Model::Batch;
};

template <class Model>
std::string reference_signature(const Model& m);

// The model's structure as a string, stored in checkpoints and compared on
// load: Model::signature() where the model has one.
template <class Model>
std::string model_signature(const Model& m) {
  if constexpr (requires { m.signature(); }) {
    return m.signature();
  } else {
    return reference_signature(m);
  }
}

// MultitaskModel's structure.
template <class Model>
std::string reference_signature(const Model& m) {
  const auto& c = m.config();
  // Appended piece by piece: GCC 12 reports a false -Wrestrict on chains of
  // const char* + std::string temporaries.
  std::string s;
  const auto field = [&s](const char* name, long long value) {
    if (!s.empty()) s += ' ';
    s += name;
    s += '=';
    s += std::to_string(value);
  };
  field("E", Model::kExperts);
  field("K", Model::MoeSpec::top_k);
  field("R", Model::kRank);
  field("H", Model::kBranches);
  field("d_input", c.encoder.d_input);
  field("d_model", c.encoder.d_model);
  field("encoder_layers", c.encoder.num_layers);
  field("moe_layers", c.num_moe_layers);
  field("d_ff", c.moe.d_ff);
  field("kind", static_cast<int>(c.moe.kind));
  field("shared", c.moe.num_shared);
  if (m.expert_parallel()) {  // a shard: this rank's experts of the whole stacks
    field("ranks", m.placement().ranks());
    field("first_expert", m.first_expert());
    field("local_experts", m.local_experts());
  }
  s += " classes=";
  for (int h = 0; h < Model::kBranches; ++h) {
    if (h > 0) s += ',';
    s += std::to_string(c.classes[static_cast<std::size_t>(h)]);
  }
  return s;
}

inline std::string scope_string(cpu::TrainScope scope) {
  if (scope.whole_model()) return "all";
  std::string s = "branch ";
  s += std::to_string(scope.branch);
  return s;
}

inline const std::string& metadata_of(const io::SafetensorsReader& in, const std::string& key) {
  const auto it = in.metadata().find(key);
  MOEKIT_CHECK(it != in.metadata().end(), Errc::kFormatError, in.source(),
               ": the checkpoint has no metadata \"", key, "\"");
  return it->second;
}

inline std::int64_t metadata_int(const io::SafetensorsReader& in, const std::string& key) {
  const std::string& v = metadata_of(in, key);
  std::int64_t out = 0;
  const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  MOEKIT_CHECK(ec == std::errc() && end == v.data() + v.size() && out >= 0, Errc::kFormatError,
               in.source(), ": metadata \"", key, "\" = \"", v, "\" is not a non-negative integer");
  return out;
}

template <class Model>
std::vector<io::TensorSource> model_sources(const Model& m) {
  std::vector<io::TensorSource> out;
  for (const cpu::ModelTensor& t : m.tensors())
    out.push_back({t.name, {t.rows, t.cols}, t.matrix()});
  return out;
}

// The model's tensors as load targets, those for which keep(tensor) holds.
template <class Model, class Keep = bool (*)(const cpu::ModelTensor&)>
std::vector<io::TensorTarget> model_targets(
    Model& m, Keep keep = [](const cpu::ModelTensor&) { return true; }) {
  std::vector<io::TensorTarget> out;
  for (cpu::ModelTensor& t : m.tensors()) {
    if (keep(t)) out.push_back({t.name, {t.rows, t.cols}, t.matrix()});
  }
  return out;
}

template <class Model>
void check_signature(const io::SafetensorsReader& in, const Model& m) {
  const std::string want = model_signature(m);
  const std::string& got = metadata_of(in, "moekit.model");
  MOEKIT_CHECK(got == want, Errc::kShapeMismatch, in.source(), ": the file holds a model with ",
               got, ", this model has ", want);
}

}  // namespace detail

// The model's weights alone (all tensors, F32) with its structure in the metadata.
template <class Model>
void save_model(const std::filesystem::path& path, const Model& model) {
  io::SafetensorsWriter out;
  out.add(detail::model_sources(model));
  out.set_metadata("moekit.model", detail::model_signature(model));
  out.write(path);
}

// Loads weights saved by save_model or save_checkpoint; nothing is written
// unless the structure and every tensor match.
template <class Model>
void load_model(const std::filesystem::path& path, Model& model) {
  const io::SafetensorsReader in(path);
  detail::check_signature(in, model);
  in.load(detail::model_targets(model));
}

// Loads the frozen encoder's weights alone (a pretrained encoder) from any
// safetensors file that holds the eight "encoder.*" tensors under their model
// names with the model's shapes (F32, F16 or BF16), e.g. one written by
// save_model for another model with the same encoder. All or nothing.
template <class Model>
void load_encoder(const std::filesystem::path& path, Model& model) {
  const io::SafetensorsReader in(path);
  in.load(detail::model_targets(
      model, [](const cpu::ModelTensor& t) { return t.role == cpu::ParamRole::kEncoder; }));
}

// Trains a MultitaskModel with AdamW over the model's parameter groups (see
// the top of this file); keeps the optimizer state and the step counter.
template <class Model>
class Trainer {
 public:
  // Registers the scope's tensors of `model` with the optimizer (checks the
  // config first). The model is referenced, not copied: it must outlive the
  // trainer and keep its tensors in place.
  Trainer(Model& model, const TrainerConfig& config)
      : model_(model), config_(validated(config)), optimizer_(config.adam) {
    schedule_ = {config.warmup_steps, config.total_steps, config.min_lr_ratio};
    schedule_.validate();
    const LearningRates& lr = config.lr;
    const float wd = config.weight_decay;
    const int moe = optimizer_.add_group({"moe", lr.moe, wd});
    const int gate = optimizer_.add_group({"gate", lr.gate, wd});
    const int lora = optimizer_.add_group({"lora", lr.lora, wd});
    const int head = optimizer_.add_group({"head", lr.head, wd});
    const cpu::TrainScope scope = config.scope;
    for (cpu::ModelTensor& t : model.tensors()) {
      if (cpu::is_frozen(t.role)) continue;
      const int group = t.role == cpu::ParamRole::kExperts ? moe
                        : t.role == cpu::ParamRole::kGate  ? gate
                        : t.role == cpu::ParamRole::kLora  ? lora
                                                           : head;
      if (scope.whole_model()) {
        const index_t segment = t.expert_rows * t.cols;
        optimizer_.add(group, t.name, t.flat(), t.flat_grad(), segment);
        const auto chunks = static_cast<std::size_t>(AdamW::norm_chunks(t.flat().size(), segment));
        registered_.push_back(
            {chunks, segment > 0 ? static_cast<std::size_t>(AdamW::norm_chunks(segment, 0)) : 0});
      } else if (group == lora || group == head) {
        // Branch t's part: adapters and heads are stacked by branch.
        const auto [first, count] = branch_elements(t, scope.branch);
        optimizer_.add(group, t.name + "." + std::to_string(scope.branch),
                       t.flat().segment(first, count), t.flat_grad().segment(first, count));
        registered_.push_back({static_cast<std::size_t>(AdamW::norm_chunks(count, 0)), 0});
      }
    }
  }

  // The config given at construction.
  const TrainerConfig& config() const { return config_; }
  // The optimizer (its groups, moments and step count), read-only.
  const AdamW& optimizer() const { return optimizer_; }
  // Steps taken, skipped ones included (restored by load_checkpoint).
  std::int64_t steps() const { return step_; }
  // Steps whose update was skipped for a non-finite gradient norm.
  std::int64_t skipped_steps() const { return skipped_; }

  // One training step on `batch` (the model's batch type; collective for an
  // expert-parallel model), as the top of this file describes; the step
  // counter advances even when the update is skipped.
  StepReport<Model> step(const typename detail::BatchOf<Model>::type& batch) {
    StepReport<Model> r;
    const cpu::LoraStep lora_step{true, config_.dropout_seed, static_cast<std::uint64_t>(step_)};
    r.losses = model_.loss_and_grads(batch, config_.scope, lora_step);
    r.grad_norm = grad_norm();
    if (config_.max_grad_norm > 0.0) optimizer_.clip_to(r.grad_norm, config_.max_grad_norm);
    r.lr_scale = schedule_(step_);
    r.skipped = !std::isfinite(r.grad_norm);
    if (r.skipped) {
      ++skipped_;
    } else {
      optimizer_.step(r.lr_scale);
    }
    ++step_;
    return r;
  }

  // Writes the model's tensors, the optimizer state and the counters to
  // `path` atomically (format at the top of this file).
  void save_checkpoint(const std::filesystem::path& path) const {
    io::SafetensorsWriter out;
    out.add(detail::model_sources(model_));
    optimizer_.save_state(out, "optimizer.");
    out.set_metadata("moekit.model", detail::model_signature(model_));
    out.set_metadata("moekit.scope", detail::scope_string(config_.scope));
    out.set_metadata("moekit.trainer.step", std::to_string(step_));
    out.set_metadata("moekit.trainer.skipped", std::to_string(skipped_));
    out.write(path);
  }

  // Restores the model's weights, the optimizer and the step counter.
  void load_checkpoint(const std::filesystem::path& path) {
    const io::SafetensorsReader in(path);
    detail::check_signature(in, model_);
    const std::string& scope = detail::metadata_of(in, "moekit.scope");
    MOEKIT_CHECK(scope == detail::scope_string(config_.scope), Errc::kInvalidArgument,
                 path.string(), ": the checkpoint trained scope \"", scope,
                 "\", this trainer trains \"", detail::scope_string(config_.scope), "\"");
    const std::int64_t step = detail::metadata_int(in, "moekit.trainer.step");
    const std::int64_t skipped = detail::metadata_int(in, "moekit.trainer.skipped");
    const std::vector<io::TensorTarget> targets = detail::model_targets(model_);
    for (const io::TensorTarget& t : targets) in.check_tensor(t.name, t.shape);
    // load_state checks all of its tensors before it changes anything; the
    // model's weights are copied only after it succeeded.
    optimizer_.load_state(in, "optimizer.");
    in.load(targets);
    step_ = step;
    skipped_ = skipped;
  }

 private:
  static const TrainerConfig& validated(const TrainerConfig& c) {
    const LearningRates& lr = c.lr;
    for (const float v : {lr.moe, lr.gate, lr.lora, lr.head}) {
      MOEKIT_CHECK_ARG(std::isfinite(v) && v >= 0.0f,
                       "config.lr: every learning rate must be "
                       "finite and >= 0, got ",
                       v);
    }
    MOEKIT_CHECK_ARG(c.scope.branch >= -1 && c.scope.branch < Model::kBranches,
                     "config.scope.branch = ", c.scope.branch,
                     " must be -1 (whole model) or in [0, ", Model::kBranches, ")");
    MOEKIT_CHECK_ARG(std::isfinite(c.max_grad_norm), "config.max_grad_norm = ", c.max_grad_norm,
                     " must be finite");
    return c;
  }

  // The norm of the whole model's gradient; a model without a transport
  // (the text system) is never expert parallel, and never instantiates
  // sharded_grad_norm.
  double grad_norm() {
    if constexpr (requires(Model & m) { m.transport(); }) {
      if (model_.expert_parallel()) return sharded_grad_norm();
    }
    return optimizer_.grad_norm();
  }

  // The norm of the whole model's gradient on an expert-parallel rank: the
  // chunk sums of the replicated tensors (the same on every rank) and of
  // every rank's experts (gathered: an all_to_all_v of doubles), added in
  // the order of one process's registration (tensors in model order, a
  // stack's experts in order, so its ranks in rank order).
  double sharded_grad_norm() {
    dist::TransportRef t = model_.transport();
    const dist::ExpertPlacement& placement = model_.placement();
    const int ranks = t.size();
    partials_.resize(static_cast<std::size_t>(optimizer_.num_norm_chunks()));
    optimizer_.grad_norm_partials(partials_);
    // This rank's expert chunk sums, tensor after tensor; every rank's counts.
    mine_.clear();
    std::vector<index_t>& bytes = bytes_;  // what each rank sends
    bytes.assign(static_cast<std::size_t>(ranks), 0);
    std::size_t at = 0;
    for (const Registered& r : registered_) {
      const std::span<const double> own(partials_.data() + at, r.chunks);
      at += r.chunks;
      if (r.per_expert == 0) continue;
      mine_.insert(mine_.end(), own.begin(), own.end());
      for (int q = 0; q < ranks; ++q) {
        bytes[static_cast<std::size_t>(q)] += static_cast<index_t>(
            static_cast<std::size_t>(placement.count(q)) * r.per_expert * sizeof(double));
      }
    }
    std::vector<index_t>& out = out_;  // this rank's sums to each rank
    out.assign(static_cast<std::size_t>(ranks),
               static_cast<index_t>(mine_.size() * sizeof(double)));
    index_t total = 0;
    for (index_t b : bytes) total += b;
    all_.resize(static_cast<std::size_t>(total) / sizeof(double));
    // Rank q's sums reach every rank: the same segment to each.
    send_.clear();
    for (int q = 0; q < ranks; ++q) send_.insert(send_.end(), mine_.begin(), mine_.end());
    t.all_to_all_v(reinterpret_cast<const std::byte*>(send_.data()), out,
                   reinterpret_cast<std::byte*>(all_.data()), bytes);
    // One process's order.
    double sum = 0.0;
    std::vector<std::size_t>& from = from_;  // where rank q's next sums are
    from.assign(static_cast<std::size_t>(ranks), 0);
    for (int q = 1; q < ranks; ++q) {
      from[static_cast<std::size_t>(q)] =
          from[static_cast<std::size_t>(q - 1)] +
          static_cast<std::size_t>(bytes[static_cast<std::size_t>(q - 1)]) / sizeof(double);
    }
    at = 0;
    for (const Registered& r : registered_) {
      if (r.per_expert == 0) {
        for (std::size_t c = 0; c < r.chunks; ++c) sum += partials_[at + c];
      } else {
        for (int q = 0; q < ranks; ++q) {
          std::size_t& f = from[static_cast<std::size_t>(q)];
          const std::size_t n = static_cast<std::size_t>(placement.count(q)) * r.per_expert;
          for (std::size_t c = 0; c < n; ++c) sum += all_[f + c];
          f += n;
        }
      }
      at += r.chunks;
    }
    return std::sqrt(sum);
  }

  // (first element, count) of branch b's part of an adapter or head tensor.
  std::pair<index_t, index_t> branch_elements(const cpu::ModelTensor& t, int b) const {
    const index_t d = model_.d_model(), R = Model::kRank;
    const index_t off = model_.heads().class_offset(b), c = model_.heads().classes(b);
    if (t.name == "adapter.lora_A" || t.name == "adapter.lora_B") return {b * R * d, R * d};
    if (t.name == "heads.weight") return {off * d, c * d};
    MOEKIT_CHECK(t.name == "heads.bias", Errc::kInvalidArgument, "tensor \"", t.name,
                 "\" has no per-branch part");
    return {off, c};
  }

  // Each registered tensor's norm chunks, and for a stack of routed experts
  // the chunks of one expert (0 otherwise).
  struct Registered {
    std::size_t chunks = 0;
    std::size_t per_expert = 0;
  };

  Model& model_;
  TrainerConfig config_;
  AdamW optimizer_;
  std::vector<Registered> registered_;
  // sharded_grad_norm's buffers, reused every step.
  std::vector<double> partials_, mine_, all_, send_;
  std::vector<index_t> bytes_, out_;
  std::vector<std::size_t> from_;
  WarmupCosine schedule_;
  std::int64_t step_ = 0;
  std::int64_t skipped_ = 0;
};

// Inference over a dataset (every row), in batches of the model's max_batch.
template <class Model>
EvalReport evaluate(Model& model, const Dataset& data) {
  MOEKIT_CHECK(!model.expert_parallel(), Errc::kUnsupported,
               "evaluate takes a one-process model; an expert-parallel model's ranks would have "
               "to pass the same number of batches in lock step");
  constexpr int H = Model::kBranches, E = Model::kExperts;
  const index_t n = data.size(), B = model.config().max_batch;
  const index_t C = model.heads().max_classes();
  EvalReport r;
  r.loss.assign(H, 0.0);
  r.accuracy.assign(H, 0.0);
  r.count.assign(H, 0);
  const int layers = model.num_moe_layers();
  std::vector<std::vector<index_t>> kept(static_cast<std::size_t>(layers),
                                         std::vector<index_t>(E, 0));
  std::vector<float> logits(static_cast<std::size_t>(B * C));
  std::vector<cpu::RoutingStats<typename Model::MoeSpec>> stats;
  for (index_t r0 = 0; r0 < n; r0 += B) {
    const index_t m = std::min(B, n - r0);
    const cpu::Batch batch{data.inputs().middle_rows(r0, m), data.task_view().segment(r0, m),
                           data.label_view().segment(r0, m)};
    const MatrixView<float> z(logits.data(), m, C);
    model.predict(batch, z, &stats);
    const auto l = model.heads().loss(MatrixView<const float>(z), batch.tasks, batch.labels);
    for (std::size_t h = 0; h < H; ++h) {
      r.loss[h] += l.loss[h] * static_cast<double>(l.count[h]);
      r.accuracy[h] += l.accuracy[h] * static_cast<double>(l.count[h]);
      r.count[h] += l.count[h];
    }
    for (std::size_t layer = 0; layer < kept.size(); ++layer) {
      for (std::size_t e = 0; e < E; ++e) kept[layer][e] += stats[layer].kept[e];
    }
  }
  for (std::size_t h = 0; h < H; ++h) {
    if (r.count[h] > 0) {
      r.loss[h] /= static_cast<double>(r.count[h]);
      r.accuracy[h] /= static_cast<double>(r.count[h]);
    }
  }
  for (const std::vector<index_t>& counts : kept) {
    r.expert_load.push_back(expert_load_fractions(counts));
    const std::vector<double>& load = r.expert_load.back();
    r.max_load_ratio.push_back(*std::max_element(load.begin(), load.end()) * E);
  }
  return r;
}

}  // namespace train
MOEKIT_NAMESPACE_END
