#pragma once
// The reference multi-task model (docs/synthetic_model.md), built only from moekit's
// parts, on the CPU backend:
//
//   x ─▶ frozen MLP encoder ─▶ e                         (moekit/nn/mlp_encoder.hpp)
//     ─▶ h_1 = e + MoE_1(e)  ─▶ ... ─▶ h_M = h_{M-1} + MoE_M(h_{M-1})   (MoeLayer<S>, residual)
//     ─▶ a = h_M P^T + s B_t A_t h_M                     (LoraBank<L>: frozen shared projection P,
//                                                          one rank-R adapter per branch t)
//     ─▶ z = W_t a + b_t                                 (TaskHeads<H>: one head per branch)
//
// Each sample carries its branch (task) id t in [0, H); the loss is the heads'
// per-task softmax cross-entropy (TaskHeads::loss, fixed weights) plus the MoE
// layers' aux losses (their coefficients are in config.moe). Branches share
// the encoder and the MoE layers; each owns only its adapter and head, so
// adding a branch (with_branch) trains only those.
//
// Parameters. The model owns them: one ModelTensor per parameter matrix, each
// with a role that says who trains it and at which learning rate:
//   role           tensors                                       trained
//   kEncoder       encoder.{input,norm,ffn...}                   never (frozen)
//   kGate          moe.{l}.gate.weight              E x d        TrainScope::all()
//   kExperts       moe.{l}.experts.w1/w3/w2, shared.w1/w3/w2    TrainScope::all()
//   kAdapterBase   adapter.weight (P)               d x d        never (frozen)
//   kLora          adapter.lora_A (H R) x d, adapter.lora_B (H d) x R
//   kHead          heads.weight (sum C) x d, heads.bias sum C
// in the layouts of the components (stacked experts, adapters and heads).
// Gradients live beside the values (empty for frozen tensors).
//
// Initialisation (all from config.seed, counter-based, so a model is the same
// on every machine): the encoder as MlpEncoder::init; routers N(0, gate_init_std^2)
// (1/d by default: routing starts unbalanced, as on a pretrained encoder, and
// the balance loss has work to do);
// experts' W1, W3 ~ N(0, 1/d) and W2 ~ N(0, 1/(2 M d_ff)) (small residual
// branches); P = identity; LoRA A Kaiming-uniform and B = 0 (LoraBank::init,
// so a new branch starts as the base); heads N(0, 1/d), bias 0.
//
// Training (loss_and_grads): forward, loss, backward. The scope says what gets
// gradients: TrainScope::all() trains the MoE layers, every adapter and every
// head; TrainScope::branch(t) only adapter t and head t (no MoE backward at
// all). Inference (predict): the same forward with LoRA dropout off.
//
// Memory: activations and workspaces for config.max_batch samples are
// allocated once at construction; a call takes any n <= max_batch.
// Determinism: every part is deterministic for a fixed thread count, so the
// whole step is; a sample's logits depend only on its own row and the
// weights its branch uses. Everything runs per block of kTokenBlock samples
// (core/token_blocks.hpp): each component is called once per block, and the
// gradients of the adapters and heads are folded over the blocks in order.
//
// Expert parallelism (ModelParallelism, docs/expert_parallel.md): given a
// transport (and the same configuration on every rank, compared at
// construction; max_batch is then the most samples one rank passes), the
// model holds only its rank's routed experts (the tensors
// moe.{l}.experts.* have that rank's rows, the experts of
// placement.first(rank) on; everything else is whole on every rank), its MoE
// layers are ExpertParallelMoeLayers, and each call is collective: every
// rank passes its own samples (the batch is the ranks' samples in rank order;
// every rank but the last holding samples holds a multiple of kTokenBlock).
// Losses, statistics and the gradients of every replicated tensor are those
// of the whole batch, equal on every rank and bit-identical to one process
// training on the whole batch; each rank's expert gradients are that
// process's rows.
// Validation: the configuration at construction (each component's own checks
// plus the composition: widths agree, no router noise — its seed would repeat
// every step), and every call's batch (shapes, task ids, labels) before
// anything is written.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/token_blocks.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/lora.hpp"
#include "moekit/cpu/task_heads.hpp"
#include "moekit/dist/layout.hpp"
#include "moekit/dist/transport.hpp"
#include "moekit/nn/expert_parallel_moe_layer.hpp"
#include "moekit/nn/mlp_encoder.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// The model's sizes and hyperparameters; H fixes the number of branches.
template <HeadSpecType H>
struct MultitaskModelConfig {
  MlpEncoderConfig encoder{};  // the frozen encoder; its d_model is the model's width d
  MoeLayerConfig moe{};        // each MoE layer; moe.d_model must equal encoder.d_model
  int num_moe_layers = 2;      // M, at least 1
  float lora_alpha = 16.0f;    // LoRA scale s = alpha / R (alpha / sqrt(R) with rslora)
  bool rslora = false;         // rank-stabilised scale alpha / sqrt(R)
  float lora_dropout = 0.0f;   // dropout on the adapters' input in training, in [0, 1)
  std::array<index_t, H::num_heads> classes{};  // per branch
  index_t max_batch = 256;                      // largest batch a call takes
  float gate_init_std = 0.0f;  // routers' initial weights ~ N(0, std^2); 0: 1 / sqrt(d_model)
  std::uint64_t seed = 0;      // initialisation
};

// Which part of the model a ModelTensor belongs to (the table at the top of
// this file): decides whether it is trained and its learning rate group.
enum class ParamRole { kEncoder, kGate, kExperts, kAdapterBase, kLora, kHead };

// Whether tensors of this role are never trained (no gradient is kept).
constexpr bool is_frozen(ParamRole role) {
  return role == ParamRole::kEncoder || role == ParamRole::kAdapterBase;
}

// One parameter matrix of the model, its gradient (same shape; empty when
// frozen) and its role.
struct ModelTensor {
  std::string name;                      // unique in the model, e.g. "moe.0.gate.weight"
  ParamRole role = ParamRole::kEncoder;  // who trains it
  index_t rows = 0;                      // the matrix's rows (1 for a vector)
  index_t cols = 0;                      // the matrix's columns
  // Routed experts' stacks: the rows of one expert (their gradient norm is
  // summed expert by expert, and an expert-parallel rank holds some experts
  // only); 0 for every other tensor.
  index_t expert_rows = 0;
  std::vector<float> value;  // rows x cols, row-major
  std::vector<float> grad;   // the same shape, or empty when frozen

  // value as a rows x cols matrix.
  MatrixView<float> matrix() { return {value.data(), rows, cols}; }
  // value as a rows x cols matrix, read-only.
  MatrixView<const float> matrix() const { return {value.data(), rows, cols}; }
  // grad as a rows x cols matrix; an empty view when frozen.
  MatrixView<float> grad_matrix() { return grad.empty() ? MatrixView<float>() : matrix_of(grad); }
  // value as one vector of rows * cols elements (for optimizers).
  VectorView<float> flat() { return {value.data(), rows * cols}; }
  // value as one vector, read-only.
  VectorView<const float> flat() const { return {value.data(), rows * cols}; }
  // grad as one vector (empty when frozen).
  VectorView<float> flat_grad() { return {grad.data(), static_cast<index_t>(grad.size())}; }

 private:
  MatrixView<float> matrix_of(std::vector<float>& v) { return {v.data(), rows, cols}; }
};

// Fills t with N(0, stddev^2) draws from counter stream `stream` of `seed`,
// counters first, first + 1, ...: one stream per tensor (its index), so
// adding tensors elsewhere never shifts another tensor's values; `first`
// places a slice of a larger tensor (an expert-parallel rank's experts).
inline void fill_normal(ModelTensor& t, double stddev, std::uint64_t seed, std::uint64_t stream,
                        std::uint64_t first = 0) {
  const std::uint64_t s = mix64(seed ^ (0x9e3779b97f4a7c15ull * (stream + 1)));
  for (std::size_t i = 0; i < t.value.size(); ++i) {
    t.value[i] = static_cast<float>(stddev * random_normal(s, first + i));
  }
}

// What a training step trains: everything but the frozen parts, or only one
// branch's adapter and head.
struct TrainScope {
  int branch = -1;  // -1: all trainable parameters
  // Every trainable tensor: the MoE layers, all adapters and all heads.
  static constexpr TrainScope all() { return {}; }
  // Only branch t's adapter and head, t in [0, H) (checked by the model).
  static constexpr TrainScope only_branch(int t) { return {t}; }
  // Whether this is all() (no single branch).
  bool whole_model() const { return branch < 0; }
};

// A batch of samples: inputs, branch ids and (for training) labels.
struct Batch {
  MatrixView<const float> x{};              // n x d_input
  VectorView<const std::int32_t> tasks{};   // n, each in [0, H)
  VectorView<const std::int32_t> labels{};  // n, each in [0, classes[task]); training only
};

// Where the model runs: one process (no transport), or expert-parallel over
// the ranks of a host transport with this placement of the routed experts
// (empty: ExpertPlacement::even(E, ranks)). The transport must outlive the model.
struct ModelParallelism {
  // The ranks' transport; empty: one process.
  dist::TransportRef transport{};
  // The routed experts' placement; empty: even over the ranks.
  dist::ExpertPlacement placement{};
};

// What MultitaskModel::loss_and_grads reports for one step.
template <MoeSpecType S, HeadSpecType H>
struct StepLosses {
  TaskLosses<H> task;                    // per-branch loss, accuracy, count; task.total
  double aux = 0.0;                      // sum over MoE layers of their weighted aux losses
  double total = 0.0;                    // task.total + aux: the loss the gradients are of
  std::vector<MoeAuxLosses> layer_aux;   // one per MoE layer, unweighted parts and total
  std::vector<RoutingStats<S>> routing;  // one per MoE layer
  // The mean over layers of the unweighted Switch balance loss (1 = balanced).
  double mean_switch_loss() const {
    double s = 0.0;
    for (const MoeAuxLosses& a : layer_aux) s += a.switch_loss;
    return layer_aux.empty() ? 0.0 : s / static_cast<double>(layer_aux.size());
  }
};

// The model of the top of this file: owns its parameters, activations and
// workspaces; S fixes the MoE layers' E and K, L the adapters' rank, H the
// number of branches.
template <MoeSpecType S, LoraSpecType L, HeadSpecType H>
class MultitaskModel {
 public:
  using MoeSpec = S;                               // the MoE layers' spec (E, K)
  using LoraSpec = L;                              // the adapters' spec (rank R)
  using HeadSpec = H;                              // the heads' spec (number of branches)
  using Config = MultitaskModelConfig<H>;          // what the constructor takes
  static constexpr int kBranches = H::num_heads;   // branches, each with an adapter and a head
  static constexpr int kExperts = S::num_experts;  // routed experts per MoE layer
  static constexpr int kRank = L::rank;            // R, every adapter's rank

  // Activations point into the model's own buffers: it moves, it does not copy.
  MultitaskModel(MultitaskModel&&) noexcept = default;
  // Move assignment (the same: buffers move with the model).
  MultitaskModel& operator=(MultitaskModel&&) noexcept = default;
  MultitaskModel(const MultitaskModel&) = delete;
  MultitaskModel& operator=(const MultitaskModel&) = delete;

  // With parallelism.transport, collective (the layers compare every rank's
  // configuration).
  explicit MultitaskModel(const Config& config, ModelParallelism parallelism = {})
      : config_(validated(config)),
        encoder_(config.encoder),
        bank_(LoraBankConfig{config.encoder.d_model, config.encoder.d_model, kBranches,
                             config.lora_alpha, config.rslora, config.lora_dropout}),
        heads_(TaskHeadsConfig<H>{config.encoder.d_model, config.classes, true}) {
    if (parallelism.transport) {
      transport_ = std::make_unique<dist::TransportRef>(parallelism.transport);
      dist::agree(*transport_, true, fingerprint(config_), "MultitaskModel");
      placement_ = parallelism.placement.empty()
                       ? dist::ExpertPlacement::even(kExperts, transport_->size())
                       : parallelism.placement;
      for (int l = 0; l < config_.num_moe_layers; ++l) {
        ep_layers_.emplace_back(config_.moe, placement_, *transport_);
      }
    } else {
      placement_ = dist::ExpertPlacement::even(kExperts, 1);
    }
    for (int l = 0; l < config_.num_moe_layers; ++l) layers_.emplace_back(config_.moe);
    make_tensors();
    init();
    allocate();
  }

  // The config given at construction.
  const Config& config() const { return config_; }
  // Expert parallelism: whether the model runs over a transport, its
  // placement (one rank with every expert otherwise), and this rank's
  // experts [first_expert(), first_expert() + local_experts()).
  bool expert_parallel() const { return transport_ != nullptr; }
  // Its transport (empty in one process).
  dist::TransportRef transport() const { return transport_ ? *transport_ : dist::TransportRef(); }
  // Which rank owns which routed experts.
  const dist::ExpertPlacement& placement() const { return placement_; }
  // This rank (0 in one process).
  int rank() const { return transport_ ? transport_->rank() : 0; }
  // The first routed expert this rank holds.
  int first_expert() const { return placement_.first(rank()); }
  // The routed experts this rank holds.
  int local_experts() const { return placement_.count(rank()); }
  // The transport and placement it was built with.
  ModelParallelism parallelism() const { return {transport(), placement_}; }
  // d, the width of the encoder's output, the MoE layers and the adapters.
  index_t d_model() const { return config_.encoder.d_model; }
  // M, the number of MoE layers.
  int num_moe_layers() const { return config_.num_moe_layers; }
  // The frozen encoder (its weights: encoder_weights()).
  const MlpEncoder& encoder() const { return encoder_; }
  // MoE layer l in [0, M) (its weights: moe_params(l)); std::out_of_range otherwise.
  const MoeLayer<S>& moe_layer(int l) const { return layers_.at(static_cast<std::size_t>(l)); }
  // The branches' LoRA adapters on the shared projection (adapter_weights()).
  const LoraBank<L>& adapters() const { return bank_; }
  // The branches' heads (head_weights()).
  const TaskHeads<H>& heads() const { return heads_; }

  // Every parameter tensor, in a fixed order.
  std::vector<ModelTensor>& tensors() { return tensors_; }
  // Every parameter tensor, read-only.
  const std::vector<ModelTensor>& tensors() const { return tensors_; }
  // The tensor named `name`; kInvalidArgument when there is none.
  ModelTensor& tensor(std::string_view name) { return tensors_[index_of(name)]; }
  // The tensor named `name`, read-only; kInvalidArgument when there is none.
  const ModelTensor& tensor(std::string_view name) const { return tensors_[index_of(name)]; }

  // Parameter accounting (nn/param_count.hpp): total, active per sample and
  // trainable, per part; `branch` is the cost of one more branch with as many
  // classes as the last one (branch_params(c) for another count).
  ModelParams params() const {
    const MoeLayerConfig& m = config_.moe;
    const index_t d = d_model();
    ModelParams p;
    p.encoder = encoder_.params();
    const MoeLayerShape shape{d, m.d_ff, m.kind, false, false, m.num_shared, m.d_ff_shared};
    for (int l = 0; l < config_.num_moe_layers; ++l) p.moe += moe_layer_params<S>(shape);
    p.adapter_base = ParamCount{d * d, d * d, 0};
    p.branch = branch_params(config_.classes[kBranches - 1]);
    p.total = p.encoder + p.moe + p.adapter_base + lora_params<L>(d, d).one_of(kBranches) +
              heads_.params();
    return p;
  }
  // The parameters one more branch adds: an adapter and a head of `classes`
  // classes (all trainable).
  ParamCount branch_params(index_t classes) const {
    return lora_params<L>(d_model(), d_model()) +
           head_bank_params<::moekit::HeadSpec<1>>(d_model(), {classes});
  }

  // ---- views of the parameters, as the components take them ----------------------------------

  // The frozen encoder's weights.
  MlpEncoderWeights encoder_weights() const {
    const auto& t = tensors_;
    return {t[0].matrix(), t[1].flat(),   t[2].matrix(), t[3].matrix(),
            t[4].matrix(), t[5].matrix(), t[6].matrix(), t[7].matrix()};
  }
  // MoE layer l's weights, l in [0, M) (kOutOfRange otherwise); expert
  // parallel: this rank's experts only.
  MoeLayerParams moe_params(int l) const {
    const MoeSlots s = moe_slots(l);
    const auto v = [this](std::size_t k) {
      return k == kNoTensor ? MatrixView<const float>() : tensors_[k].matrix();
    };
    MoeLayerParams p;
    p.w_gate = v(s.gate);
    p.experts = {v(s.w1), v(s.w3), v(s.w2)};
    p.shared = {v(s.shared_w1), v(s.shared_w3), v(s.shared_w2)};
    return p;
  }
  // The shared projection P and the stacked adapters of every branch (no bias).
  LoraWeights adapter_weights() const {
    const std::size_t i = adapter_first();
    return {tensors_[i].matrix(), {}, tensors_[i + 1].matrix(), tensors_[i + 2].matrix()};
  }
  // Every branch's head, stacked in branch order.
  HeadWeights head_weights() const {
    const std::size_t i = adapter_first() + 3;
    return {tensors_[i].matrix(), tensors_[i + 1].flat()};
  }

  // ---- forward, loss, backward ----------------------------------------------------------------

  // logits (n x heads().max_classes(), padded with -inf as TaskHeads writes
  // them) for a batch, with LoRA dropout off. Labels are not read.
  void predict(const Batch& batch, MatrixView<float> logits,
               std::vector<RoutingStats<S>>* stats = nullptr) {
    const index_t n = checked_batch(
        batch, false, [&] { check_shape(logits, batch.x.rows(), heads_.max_classes(), "logits"); });
    std::vector<RoutingStats<S>> local;
    std::vector<MoeAuxLosses> aux;
    forward(batch, LoraStep{}, stats != nullptr ? *stats : local, aux);
    as_eigen(logits) = as_eigen(MatrixView<const float>(logits_.middle_rows(0, n)));
  }

  // One training step's forward, loss and backward: the gradients of
  // losses.total land in each trained tensor's grad (overwritten; tensors
  // outside the scope keep stale gradients, which an optimizer over the
  // scope never reads). `step` gives LoRA dropout its noise.
  StepLosses<S, H> loss_and_grads(const Batch& batch, TrainScope scope, const LoraStep& step) {
    const index_t n = checked_batch(batch, true, [&] {
      MOEKIT_CHECK_ARG(scope.branch >= -1 && scope.branch < kBranches,
                       "scope.branch = ", scope.branch, " must be -1 (whole model) or in [0, ",
                       kBranches, ")");
    });
    LoraStep rows_step = step;  // dropout counters of the whole batch
    rows_step.first_row = step.first_row + first_sample_;
    StepLosses<S, H> out;
    out.aux = forward(batch, rows_step, out.routing, out.layer_aux);
    const MatrixView<float> dz = dlogits_.middle_rows(0, n);
    out.task = loss(batch, dz);
    out.total = out.task.total + out.aux;
    backward(batch, scope, rows_step, n);
    return out;
  }

  // ---- branch expansion -----------------------------------------------------------------------

  // A model with one more branch (classes of its head given): every existing
  // tensor copied bit for bit, the new adapter and head initialised as a
  // fresh model's would be (from `seed`). Existing branches' outputs are
  // unchanged: a sample's logits depend only on the weights its branch uses.
  MultitaskModel<S, L, ::moekit::HeadSpec<kBranches + 1>> with_branch(index_t classes,
                                                                      std::uint64_t seed) const {
    using Bigger = MultitaskModel<S, L, ::moekit::HeadSpec<kBranches + 1>>;
    typename Bigger::Config c;
    c.encoder = config_.encoder;
    c.moe = config_.moe;
    c.num_moe_layers = config_.num_moe_layers;
    c.lora_alpha = config_.lora_alpha;
    c.rslora = config_.rslora;
    c.lora_dropout = config_.lora_dropout;
    std::copy(config_.classes.begin(), config_.classes.end(), c.classes.begin());
    c.classes[kBranches] = classes;
    c.max_batch = config_.max_batch;
    c.gate_init_std = config_.gate_init_std;
    c.seed = seed;
    Bigger bigger(c, parallelism());
    // Same names, same order; a branch tensor's old part is its leading rows
    // (adapters and heads are stacked by branch).
    for (const ModelTensor& t : tensors_) {
      ModelTensor& dst = bigger.tensor(t.name);
      std::copy(t.value.begin(), t.value.end(), dst.value.begin());
    }
    return bigger;
  }

 private:
  // ---- construction ---------------------------------------------------------------------------

  static const Config& validated(const Config& c) {
    MOEKIT_CHECK_ARG(c.num_moe_layers >= 1, "config.num_moe_layers = ", c.num_moe_layers,
                     " must be at least 1");
    MOEKIT_CHECK_ARG(c.moe.d_model == c.encoder.d_model, "config.moe.d_model = ", c.moe.d_model,
                     " must equal config.encoder.d_model = ", c.encoder.d_model);
    MOEKIT_CHECK_ARG(c.moe.router.noise.kind == NoiseKind::kNone,
                     "config.moe.router.noise must be off: the model's router noise would repeat "
                     "the same draw every step");
    MOEKIT_CHECK_ARG(c.max_batch >= 1, "config.max_batch = ", c.max_batch, " must be at least 1");
    MOEKIT_CHECK_ARG(std::isfinite(c.gate_init_std) && c.gate_init_std >= 0.0f,
                     "config.gate_init_std = ", c.gate_init_std, " must be finite and >= 0");
    return c;
  }

  // The model's configuration beside the MoE layers' (which they compare
  // themselves): what every expert-parallel rank must share.
  static std::uint64_t fingerprint(const Config& c) {
    dist::Fingerprint f;
    f.add(kBranches).add(kRank).add(static_cast<std::int64_t>(c.encoder.d_input));
    f.add(static_cast<std::int64_t>(c.encoder.d_model))
        .add(static_cast<std::int64_t>(c.encoder.d_ff));
    f.add(c.encoder.num_layers).add(static_cast<int>(c.encoder.activation));
    f.add(c.encoder.layer_norm_eps).add(c.num_moe_layers).add(c.lora_alpha).add(c.rslora);
    f.add(c.lora_dropout).add(static_cast<std::int64_t>(c.max_batch)).add(c.gate_init_std);
    f.add(c.seed);
    for (const index_t classes : c.classes) f.add(static_cast<std::int64_t>(classes));
    return f.value();
  }

  bool gated() const { return config_.moe.kind == FfnKind::kGated; }
  std::size_t tensors_per_layer() const {
    const std::size_t ffn = gated() ? 3 : 2;
    return 1 + ffn + (config_.moe.num_shared > 0 ? ffn : 0);
  }
  std::size_t moe_first(int l) const {
    MOEKIT_CHECK_RANGE(l, 0, config_.num_moe_layers);
    return kEncoderTensors + static_cast<std::size_t>(l) * tensors_per_layer();
  }
  std::size_t adapter_first() const {
    return kEncoderTensors + static_cast<std::size_t>(config_.num_moe_layers) * tensors_per_layer();
  }

  void add_tensor(std::string name, ParamRole role, index_t rows, index_t cols,
                  index_t expert_rows = 0) {
    ModelTensor t;
    t.name = std::move(name);
    t.role = role;
    t.rows = rows;
    t.cols = cols;
    t.expert_rows = expert_rows;
    t.value.assign(static_cast<std::size_t>(rows * cols), 0.0f);
    if (!is_frozen(role)) t.grad.assign(t.value.size(), 0.0f);
    tensors_.push_back(std::move(t));
  }

  void make_tensors() {
    const MlpEncoderConfig& e = config_.encoder;
    const MoeLayerConfig& m = config_.moe;
    const index_t d = e.d_model, layers = e.num_layers, E = kExperts;
    add_tensor("encoder.input.weight", ParamRole::kEncoder, d, e.d_input);
    add_tensor("encoder.input.bias", ParamRole::kEncoder, 1, d);
    add_tensor("encoder.norm.weight", ParamRole::kEncoder, layers, d);
    add_tensor("encoder.norm.bias", ParamRole::kEncoder, layers, d);
    add_tensor("encoder.ffn.w1.weight", ParamRole::kEncoder, layers * e.d_ff, d);
    add_tensor("encoder.ffn.w1.bias", ParamRole::kEncoder, layers, e.d_ff);
    add_tensor("encoder.ffn.w2.weight", ParamRole::kEncoder, layers * d, e.d_ff);
    add_tensor("encoder.ffn.w2.bias", ParamRole::kEncoder, layers, d);
    const index_t f = m.d_ff, fs = layers_[0].d_ff_shared(), ns = m.num_shared;
    const index_t local = local_experts();  // E in one process
    for (int l = 0; l < config_.num_moe_layers; ++l) {
      std::string p = "moe.";  // appended: GCC 12 warns falsely on "..." + std::string
      p += std::to_string(l);
      p += '.';
      add_tensor(p + "gate.weight", ParamRole::kGate, E, d);
      add_tensor(p + "experts.w1", ParamRole::kExperts, local * f, d, f);
      if (gated()) add_tensor(p + "experts.w3", ParamRole::kExperts, local * f, d, f);
      add_tensor(p + "experts.w2", ParamRole::kExperts, local * d, f, d);
      if (ns > 0) {
        add_tensor(p + "shared.w1", ParamRole::kExperts, ns * fs, d);
        if (gated()) add_tensor(p + "shared.w3", ParamRole::kExperts, ns * fs, d);
        add_tensor(p + "shared.w2", ParamRole::kExperts, ns * d, fs);
      }
    }
    add_tensor("adapter.weight", ParamRole::kAdapterBase, d, d);
    add_tensor("adapter.lora_A", ParamRole::kLora, kBranches * kRank, d);
    add_tensor("adapter.lora_B", ParamRole::kLora, kBranches * d, kRank);
    add_tensor("heads.weight", ParamRole::kHead, heads_.total_classes(), d);
    add_tensor("heads.bias", ParamRole::kHead, 1, heads_.total_classes());
  }

  // An expert-parallel rank's routed experts draw from the counter of their
  // first element in the whole stack, so every rank holds exactly its rows
  // of one process's tensor.
  std::uint64_t first_counter(const ModelTensor& t) const {
    return static_cast<std::uint64_t>(t.expert_rows * t.cols * first_expert());
  }

  void init() {
    const std::uint64_t seed = config_.seed;
    auto& t = tensors_;
    encoder_.init(
        MlpEncoderViews<float>{t[0].matrix(), t[1].flat(), t[2].matrix(), t[3].matrix(),
                               t[4].matrix(), t[5].matrix(), t[6].matrix(), t[7].matrix()},
        seed);
    const double d = static_cast<double>(d_model());
    const double down =
        1.0 / std::sqrt(2.0 * config_.num_moe_layers * static_cast<double>(config_.moe.d_ff));
    for (std::size_t i = kEncoderTensors; i < adapter_first(); ++i) {
      ModelTensor& x = t[i];
      const bool is_gate = x.role == ParamRole::kGate;
      const bool is_down = x.name.ends_with(".w2");
      const double gate = config_.gate_init_std > 0.0f ? config_.gate_init_std : 1.0 / std::sqrt(d);
      fill_normal(x, is_gate ? gate : (is_down ? down : 1.0 / std::sqrt(d)), seed, i,
                  first_counter(x));
    }
    const std::size_t a = adapter_first();
    as_eigen(t[a].matrix()).setIdentity();
    bank_.init(t[a + 1].matrix(), t[a + 2].matrix(), LoraInitConfig{.seed = mix64(seed + 1)});
    fill_normal(t[a + 3], 1.0 / std::sqrt(d), seed, a + 3);
  }

  void allocate() {
    const index_t B = config_.max_batch, d = d_model();
    const auto rows = [&](index_t r, index_t c) {
      buffers_.emplace_back(static_cast<std::size_t>(r * c));
      return MatrixView<float>(buffers_.back().data(), r, c);
    };
    buffers_.reserve(16 + static_cast<std::size_t>(config_.num_moe_layers));
    encoded_ = rows(B, d);
    for (int l = 0; l < config_.num_moe_layers; ++l) hidden_.push_back(rows(B, d));
    adapted_ = rows(B, d);
    saved_h_ = rows(B, kRank);
    logits_ = rows(B, heads_.max_classes());
    dlogits_ = rows(B, heads_.max_classes());
    d_adapted_ = rows(B, d);
    d_hidden_ = rows(B, d);
    d_tmp_ = rows(B, d);
    order_.resize(static_cast<std::size_t>(B));
    offsets_.resize(static_cast<std::size_t>(token_blocks(B) * (kBranches + 1)));
    if (expert_parallel()) {
      // A rank passes at most max_batch samples (the same on every rank), so
      // the batch has at most that many per rank.
      for (const auto& layer : ep_layers_)
        ep_storage_.emplace_back(layer, B, B * transport_->size());
    } else {
      for (const MoeLayer<S>& layer : layers_) storage_.emplace_back(layer, B);
    }
    const index_t block = std::min(B, kTokenBlock);
    index_t ws = std::max({encoder_.workspace_size(block), bank_.workspace_size(block),
                           heads_.workspace_size(block)});
    workspace_.resize(static_cast<std::size_t>(ws / 8 + 1));
    const std::array<MatrixView<float>, 4> parts = replicated_grads();
    carry_.resize(dist::fold_carry_bytes(parts) / 8 + 1);
  }

  // ---- the passes -----------------------------------------------------------------------------

  index_t check_batch(const Batch& b, bool need_labels) const {
    check_view(b.x, "batch.x");
    const index_t n = b.x.rows();
    check_shape(b.x, n, config_.encoder.d_input, "batch.x");
    MOEKIT_CHECK(n <= config_.max_batch, Errc::kShapeMismatch, "batch.x has ", n,
                 " rows but config.max_batch = ", config_.max_batch);
    check_shape(b.tasks, n, "batch.tasks");
    for (index_t i = 0; i < n; ++i) {
      MOEKIT_CHECK(b.tasks[i] >= 0 && b.tasks[i] < kBranches, Errc::kOutOfRange, "batch.tasks[", i,
                   "] = ", b.tasks[i], " must be in [0, ", kBranches, ")");
    }
    if (need_labels) check_shape(b.labels, n, "batch.labels");  // values: TaskHeads::loss
    return n;
  }

  // The batch checked (and `more` checks of the caller's); with expert
  // parallelism also collective: every rank's status and sample counts are
  // gathered, so one rank's bad batch stops every rank with the same cause,
  // and this rank learns its first sample's index in the whole batch.
  template <class More>
  index_t checked_batch(const Batch& b, bool need_labels, More&& more) {
    if (!expert_parallel()) {
      const index_t n = check_batch(b, need_labels);
      more();
      return n;
    }
    std::exception_ptr error;
    index_t n = 0;
    try {
      n = check_batch(b, need_labels);
      more();
    } catch (const Error&) {
      error = std::current_exception();
    }
    const std::size_t ranks = static_cast<std::size_t>(transport_->size());
    const std::array<std::int64_t, 2> mine = {error ? 1 : 0, n};
    std::vector<std::int64_t> all(2 * ranks), scratch(2 * ranks);  // a few words per call
    dist::all_gather(*transport_, std::span<const std::int64_t>(mine), std::span(all),
                     std::span(scratch));
    if (error) std::rethrow_exception(error);
    first_sample_ = 0;
    for (std::size_t q = 0; q < ranks; ++q) {
      MOEKIT_CHECK(all[2 * q] == 0, Errc::kTransportError, "rank ", q,
                   " rejected its batch (its own error says why)");
      if (q < static_cast<std::size_t>(transport_->rank())) first_sample_ += all[2 * q + 1];
    }
    return n;
  }

  VectorView<std::byte> workspace() {
    return {reinterpret_cast<std::byte*>(workspace_.data()),
            static_cast<index_t>(workspace_.size() * sizeof(std::uint64_t))};
  }

  // The adapter rows of token block `block` (rows [r0, r0 + rows)), grouped
  // by forward.
  LoraRows lora_rows(const Batch& b, index_t r0, index_t rows, index_t block) const {
    return {b.tasks.segment(r0, rows),
            {order_.data() + r0, rows},
            {offsets_.data() + block * (kBranches + 1), kBranches + 1}};
  }
  LoraStep block_step(const LoraStep& step, index_t r0) const {
    LoraStep s = step;
    s.first_row += r0;
    return s;
  }

  // The gradients of the adapters and heads: replicated, folded over blocks.
  std::array<MatrixView<float>, 4> replicated_grads() {
    const std::size_t a = adapter_first();
    ModelTensor& bias = tensors_[a + 4];
    return {tensors_[a + 1].grad_matrix(), tensors_[a + 2].grad_matrix(),
            tensors_[a + 3].grad_matrix(), MatrixView<float>(bias.grad.data(), 1, bias.cols)};
  }

  // The heads' loss of the whole batch: in one process heads().loss(); with
  // expert parallelism the same parts with the batch's counts (an integer
  // sum) and the rows' sums passed from rank to rank in rank order.
  TaskLosses<H> loss(const Batch& b, MatrixView<float> dz) {
    const index_t n = b.x.rows();
    const MatrixView<const float> z = logits_.middle_rows(0, n);
    if (!expert_parallel()) return heads_.loss(z, b.tasks, b.labels, {}, dz);
    const std::array<index_t, to_size(kBranches)> mine = heads_.task_counts(b.tasks, n);
    std::array<std::int64_t, to_size(kBranches)> sum{};
    std::copy(mine.begin(), mine.end(), sum.begin());
    transport_->all_reduce_sum(sum);
    std::array<index_t, to_size(kBranches)> count{};
    std::copy(sum.begin(), sum.end(), count.begin());
    typename TaskHeads<H>::LossSums sums;
    dist::pass_along_ranks(*transport_, std::as_writable_bytes(std::span(&sums, 1)), [&] {
      heads_.add_loss_rows(z, b.tasks, b.labels, count, {}, sums, dz);
    });
    return heads_.finish_loss(count, sums);
  }

  // Forward to the logits; returns the sum of the MoE layers' aux losses.
  // The encoder, adapters and heads run per token block.
  double forward(const Batch& b, const LoraStep& step, std::vector<RoutingStats<S>>& stats,
                 std::vector<MoeAuxLosses>& layer_aux) {
    const index_t n = b.x.rows();
    for_each_token_block(n, [&](index_t r0, index_t rows, index_t) {
      encoder_.forward(b.x.middle_rows(r0, rows), encoder_weights(), encoded_.middle_rows(r0, rows),
                       workspace());
    });
    stats.assign(layers_.size(), RoutingStats<S>{});
    layer_aux.assign(layers_.size(), MoeAuxLosses{});
    double aux = 0.0;
    MatrixView<const float> in = encoded_.middle_rows(0, n);
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const MatrixView<float> out = hidden_[l].middle_rows(0, n);
      const MoeLayerParams params = moe_params(static_cast<int>(l));
      if (expert_parallel()) {
        layer_aux[l] = ep_layers_[l].forward(in, params, ep_storage_[l].state(), out, &stats[l],
                                             ep_storage_[l].workspace());
      } else {
        layer_aux[l] = layers_[l].forward(in, params, storage_[l].state(), out, &stats[l],
                                          storage_[l].workspace());
      }
      aux += layer_aux[l].total;
      as_eigen(out) += as_eigen(in);  // residual
      in = out;
    }
    for_each_token_block(n, [&](index_t r0, index_t rows, index_t block) {
      const LoraRows lr = lora_rows(b, r0, rows, block);
      bank_.group(lr.ids, {order_.data() + r0, rows},
                  {offsets_.data() + block * (kBranches + 1), kBranches + 1});
      bank_.forward(in.middle_rows(r0, rows), lr, adapter_weights(), adapted_.middle_rows(r0, rows),
                    saved_h_.middle_rows(r0, rows), block_step(step, r0), workspace());
      heads_.forward(MatrixView<const float>(adapted_.middle_rows(r0, rows)),
                     b.tasks.segment(r0, rows), head_weights(), logits_.middle_rows(r0, rows),
                     workspace());
    });
    return aux;
  }

  void backward(const Batch& b, TrainScope scope, const LoraStep& step, index_t n) {
    const std::size_t a = adapter_first();
    auto& t = tensors_;
    const bool whole = scope.whole_model();
    const std::size_t last = layers_.size() - 1;
    const MatrixView<float> d_top = d_hidden_.middle_rows(0, n);
    const MatrixView<const float> top = hidden_[last].middle_rows(0, n);
    const MatrixView<const float> dz = dlogits_.middle_rows(0, n);
    const MatrixView<const float> adapted = adapted_.middle_rows(0, n);
    // The input gradients per block, then the heads' and adapters' weight
    // gradients folded over the blocks (passed along the ranks).
    for_each_token_block(n, [&](index_t r0, index_t rows, index_t block) {
      const VectorView<const std::int32_t> tasks = b.tasks.segment(r0, rows);
      const MatrixView<float> d_adapted = d_adapted_.middle_rows(r0, rows);
      heads_.backward(dz.middle_rows(r0, rows), adapted.middle_rows(r0, rows), tasks,
                      head_weights(), d_adapted, HeadGrads{}, workspace());
      if (whole) {
        bank_.backward(MatrixView<const float>(d_adapted), top.middle_rows(r0, rows),
                       lora_rows(b, r0, rows, block), adapter_weights(),
                       saved_h_.middle_rows(r0, rows), block_step(step, r0),
                       d_top.middle_rows(r0, rows), LoraGrads{}, workspace());
      }
    });
    const auto fold = [&](bool add) {
      if (!add && n == 0) {  // an empty batch: zero gradients, as one empty call each
        heads_.backward(dz, adapted, b.tasks, head_weights(), {},
                        HeadGrads{t[a + 3].grad_matrix(), t[a + 4].flat_grad()}, workspace());
        bank_.backward(d_adapted_.middle_rows(0, 0), top, lora_rows(b, 0, 0, 0), adapter_weights(),
                       saved_h_.middle_rows(0, 0), step, {},
                       LoraGrads{t[a + 1].grad_matrix(), t[a + 2].grad_matrix()}, workspace());
      }
      for_each_token_block(n, [&](index_t r0, index_t rows, index_t block) {
        const bool acc = add || block > 0;
        heads_.backward(dz.middle_rows(r0, rows), adapted.middle_rows(r0, rows),
                        b.tasks.segment(r0, rows), head_weights(), {},
                        HeadGrads{t[a + 3].grad_matrix(), t[a + 4].flat_grad(), acc}, workspace());
        bank_.backward(MatrixView<const float>(d_adapted_.middle_rows(r0, rows)),
                       top.middle_rows(r0, rows), lora_rows(b, r0, rows, block), adapter_weights(),
                       saved_h_.middle_rows(r0, rows), block_step(step, r0), {},
                       LoraGrads{t[a + 1].grad_matrix(), t[a + 2].grad_matrix(), acc}, workspace());
      });
    };
    if (expert_parallel()) {
      const std::array<MatrixView<float>, 4> parts = replicated_grads();
      dist::fold_in_rank_order(*transport_, std::span<const MatrixView<float>>(parts), false, n > 0,
                               std::as_writable_bytes(std::span(carry_)), fold);
    } else {
      fold(false);
    }
    if (!whole) return;  // the MoE layers are frozen for a branch

    // Down the residual stack: dh_{l-1} = dh_l + MoE_l'(dh_l); the bottom layer
    // needs no input gradient (the encoder is frozen).
    for (std::size_t l = layers_.size(); l-- > 0;) {
      const MatrixView<const float> in = l == 0
                                             ? MatrixView<const float>(encoded_.middle_rows(0, n))
                                             : hidden_[l - 1].middle_rows(0, n);
      const MatrixView<float> dx = l == 0 ? MatrixView<float>() : d_tmp_.middle_rows(0, n);
      if (expert_parallel()) {
        ep_layers_[l].backward(MatrixView<const float>(d_top), in, moe_params(static_cast<int>(l)),
                               ep_storage_[l].state(), dx, moe_grads(static_cast<int>(l)),
                               ep_storage_[l].workspace());
      } else {
        layers_[l].backward(MatrixView<const float>(d_top), in, moe_params(static_cast<int>(l)),
                            storage_[l].state(), dx, moe_grads(static_cast<int>(l)),
                            storage_[l].workspace());
      }
      if (l > 0) as_eigen(d_top) += as_eigen(MatrixView<const float>(dx));
    }
  }

  MoeLayerGrads moe_grads(int l) {
    const MoeSlots s = moe_slots(l);
    const auto g = [this](std::size_t k) {
      return k == kNoTensor ? MatrixView<float>() : tensors_[k].grad_matrix();
    };
    MoeLayerGrads p;
    p.dw_gate = g(s.gate);
    p.dw1 = g(s.w1);
    p.dw3 = g(s.w3);
    p.dw2 = g(s.w2);
    p.shared_dw1 = g(s.shared_w1);
    p.shared_dw3 = g(s.shared_w3);
    p.shared_dw2 = g(s.shared_w2);
    return p;
  }

  // Where layer l's tensors are in tensors_ (the order of make_tensors);
  // kNoTensor for the ones this configuration does not have.
  static constexpr std::size_t kNoTensor = static_cast<std::size_t>(-1);
  struct MoeSlots {
    std::size_t gate, w1, w3, w2, shared_w1, shared_w3, shared_w2;
  };
  MoeSlots moe_slots(int l) const {
    const bool g = gated(), sh = config_.moe.num_shared > 0;
    std::size_t k = moe_first(l);
    MoeSlots s{};
    s.gate = k++;
    s.w1 = k++;
    s.w3 = g ? k++ : kNoTensor;
    s.w2 = k++;
    s.shared_w1 = sh ? k++ : kNoTensor;
    s.shared_w3 = sh && g ? k++ : kNoTensor;
    s.shared_w2 = sh ? k++ : kNoTensor;
    return s;
  }

  std::size_t index_of(std::string_view name) const {
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      if (tensors_[i].name == name) return i;
    }
    MOEKIT_FAIL(Errc::kInvalidArgument, "the model has no tensor named \"", name, "\"");
  }

  static constexpr std::size_t kEncoderTensors = 8;

  Config config_;
  MlpEncoder encoder_;
  std::vector<MoeLayer<S>> layers_;  // the one-process layers (their configuration, always)
  std::unique_ptr<dist::TransportRef>
      transport_;  // a stable address for the layers: the model moves
  dist::ExpertPlacement placement_;
  std::vector<ExpertParallelMoeLayer<S, dist::TransportRef>> ep_layers_;
  std::vector<ExpertParallelStorage<S>> ep_storage_;
  index_t first_sample_ = 0;  // this rank's first sample in the batch of the current call
  LoraBank<L> bank_;
  TaskHeads<H> heads_;
  std::vector<ModelTensor> tensors_;

  std::vector<std::vector<float>> buffers_;  // activations, allocated once
  MatrixView<float> encoded_, adapted_, saved_h_, logits_, dlogits_;
  MatrixView<float> d_adapted_, d_hidden_, d_tmp_;
  std::vector<MatrixView<float>> hidden_;  // h_1 .. h_M
  std::vector<index_t> order_, offsets_;   // adapter groups, per token block
  std::vector<MoeLayerStorage<S>> storage_;
  std::vector<std::uint64_t> workspace_;  // bytes, 8-aligned, shared by the passes in turn
  std::vector<std::uint64_t> carry_;      // the replicated gradients passed along the ranks
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
