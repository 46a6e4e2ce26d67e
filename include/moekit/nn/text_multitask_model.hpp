#pragma once
// The multi-task system on text, on the CPU backend, built from moekit's
// parts. A frozen pretrained encoder (moekit/nn/bert_encoder.hpp) runs
// outside it, once per text (moekit/text/encoded_cache.hpp): the model starts
// from the encoder's last-layer token states.
//
//   token states x_t (one sequence per sample, packed)
//     ─▶ h_1 = x + MoE_1(x) ─▶ ... ─▶ h_M = h_{M-1} + MoE_M(h_{M-1})   per token (MoeLayer<S>)
//     ─▶ p_i = mean over sample i's tokens of h_M  (+ u_i, an optional
//                                                   per-sample additive term)
//     ─▶ a_i = p_i P^T + s B_t A_t p_i             (LoraBank<L>: frozen shared projection P,
//                                                   one rank-R adapter per branch t)
//     ─▶ z_i = W_t a_i + b_t                        (TaskHeads<H>: one head per branch)
//
// The MoE layers route every token, so experts can specialise on words and
// contexts as well as on tasks; branches share the MoE layers and own only
// their adapter and head (with_branch adds one that trains only those). With
// num_moe_layers = 0 the model is a linear head per branch on the mean-pooled
// encoder states (P frozen at the identity, and with the "lora" learning rate
// 0 the adapter stays 0); a sequence of one row makes p_i that row, so the
// same class also trains classifiers on any pooled vectors (early-exit heads
// on the pooled states of earlier encoder layers). MoeSpec<1, 1> with width
// 2 d_ff is the dense FFN with the active parameters of MoeSpec<E, 2>.
//
// u (TextBatch::pooled_term, n x d or empty) is a hook for per-session state
// (a short-term memory written by corrections): it is added to the pooled
// features before the adapter and gets no gradient.
//
// Parameters (ModelTensor, roles as in moekit/nn/multitask_model.hpp):
//   moe.{l}.gate.weight         E x d           kGate
//   moe.{l}.experts.w1/w3/w2    stacked experts kExperts
//   adapter.weight (P)          d x d           kAdapterBase (frozen, identity)
//   adapter.lora_A / lora_B     (H R) x d, (H d) x R   kLora
//   heads.weight / heads.bias   (sum C) x d, sum C     kHead
// initialised as MultitaskModel initialises its counterparts (from config.seed).
//
// Loss: TaskHeads::loss (per-branch softmax cross-entropy) plus the MoE
// layers' aux losses; with TextBatch::teacher (H = 1 only) the distillation
// loss of moekit/cpu/distillation.hpp with config.distillation instead of the
// cross-entropy. Determinism: a fixed batch gives the same bits on every run
// for a fixed thread count; a sample's logits depend on the other samples of
// its batch only through the MoE layers' expert groups (their GEMMs), never
// for a branch trained alone.
// Memory: buffers for config.max_batch samples and config.max_tokens tokens
// are allocated once; a call takes any batch within both.
//
// Training in bf16: config.moe.compute = bf16 rounds the experts' product
// operands, config.compute = bf16 those of P and the heads; the weights, the
// optimizer's state, the activations and every gradient stay fp32 (the
// routers' logits stay fp32 too: moekit/nn/moe_layer.hpp).
//
// Inference on packed weights: pack(dtype) packs each MoE layer's experts in
// fp32, bf16 or int8 (routers stay fp32, moekit/nn/moe_layer.hpp) and folds
// each branch's adapter into its head, W'_t = W_t (P + s B_t A_t) (the
// adapter is linear and its dropout is off in inference), packed as TaskHeads
// weights in the same dtype; predict(batch, packed, logits) then runs the
// model on them: the function predict computes, with the products' rounding
// of that dtype.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/distillation.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/lora.hpp"
#include "moekit/cpu/task_heads.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "moekit/nn/multitask_model.hpp"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// The text model's configuration; the constructor validates it.
template <HeadSpecType H>
struct TextMultitaskConfig {
  index_t d_model = 384;      // width of the encoder's token states, d
  MoeLayerConfig moe{};       // each MoE layer (num_shared must be 0); moe.d_model = d_model
  int num_moe_layers = 2;     // M; 0: a linear head per branch on the pooled states
  float lora_alpha = 16.0f;   // LoRA scale s = alpha / R (alpha / sqrt(R) with rslora)
  bool rslora = false;        // the rank-stabilised scale alpha / sqrt(R)
  float lora_dropout = 0.0f;  // dropout on the adapter input in training, in [0, 1)
  std::array<index_t, H::num_heads> classes{};  // per branch
  index_t max_batch = 32;                       // samples per call
  index_t max_tokens = 4096;                    // tokens per call
  float gate_init_std = 0.0f;                   // 0: 1 / sqrt(d_model)
  DistillationConfig distillation{};            // used when a batch has teacher logits
  std::uint64_t seed = 0;                       // initialisation
  // The products of the adapter's base projection P and of the heads, fp32 or
  // bf16 (fp32 master weights; the MoE layers' experts follow moe.compute).
  GemmDtype compute = GemmDtype::kFloat32;
};

// A batch: each sample's token states (packed; sample i is rows
// [offsets[i], offsets[i + 1]) of tokens), branch ids and labels.
struct TextBatch {
  MatrixView<const float> tokens{};              // N x d
  VectorView<const index_t> offsets{};           // n + 1
  VectorView<const std::int32_t> tasks{};        // n, each in [0, H)
  VectorView<const std::int32_t> labels{};       // n (training)
  MatrixView<const float> pooled_term{};         // n x d or empty: added to the pooled features
  MatrixView<const float> teacher{};             // n x C or empty: distillation targets (H = 1)
  index_t size() const { return tasks.size(); }  // n, the samples
};

// The text model packed once for inference (TextMultitaskModel::pack; owns
// its memory): the MoE layers' packed parameters and the heads with each
// branch's adapter folded in.
template <HeadSpecType H>
struct PackedTextModel {
  std::vector<PackedMoeLayerParams> layers;  // one per MoE layer
  PackedHeadWeights<H> heads;                // W'_t = W_t (P + s B_t A_t), and the biases
  // The dtype of the products.
  GemmDtype dtype() const { return heads.dtype(); }
};

// The multi-task model on encoded text: MoE layers, pooling, a LoRA adapter
// and a head per branch (see the top of this file).
template <MoeSpecType S, LoraSpecType L, HeadSpecType H>
class TextMultitaskModel {
 public:
  using MoeSpec = S;                               // the MoE layers' E and K
  using LoraSpec = L;                              // the adapters' rank R
  using HeadSpec = H;                              // the number of branches H
  using Config = TextMultitaskConfig<H>;           // the configuration type
  using Batch = TextBatch;                         // what predict() and loss_and_grads() take
  using Packed = PackedTextModel<H>;               // what pack() gives
  static constexpr int kBranches = H::num_heads;   // H
  static constexpr int kExperts = S::num_experts;  // E
  static constexpr int kRank = L::rank;            // R

  // Activations point into the model's own buffers: it moves, it does not copy.
  TextMultitaskModel(TextMultitaskModel&&) noexcept = default;
  // Move assignment (see the move constructor).
  TextMultitaskModel& operator=(TextMultitaskModel&&) noexcept = default;
  TextMultitaskModel(const TextMultitaskModel&) = delete;
  TextMultitaskModel& operator=(const TextMultitaskModel&) = delete;

  // A model with its weights initialised from config.seed and its buffers
  // allocated for config.max_batch samples and config.max_tokens tokens.
  explicit TextMultitaskModel(const Config& config)
      : config_(validated(config)),
        bank_(LoraBankConfig{config.d_model, config.d_model, kBranches, config.lora_alpha,
                             config.rslora, config.lora_dropout},
              config.compute),
        heads_(TaskHeadsConfig<H>{config.d_model, config.classes, true, config.compute}) {
    for (int l = 0; l < config_.num_moe_layers; ++l) layers_.emplace_back(config_.moe);
    make_tensors();
    init();
    allocate();
  }

  const Config& config() const { return config_; }  // as validated
  // Always false: the text system runs in one process (train::Trainer asks,
  // since the synthetic model can shard its experts over ranks).
  bool expert_parallel() const { return false; }
  index_t d_model() const { return config_.d_model; }            // d
  int num_moe_layers() const { return config_.num_moe_layers; }  // M
  // MoE layer l, in [0, M) (std::out_of_range otherwise).
  const MoeLayer<S>& moe_layer(int l) const { return layers_.at(static_cast<std::size_t>(l)); }
  const LoraBank<L>& adapters() const { return bank_; }  // the branches' adapters
  const TaskHeads<H>& heads() const { return heads_; }   // the branches' heads

  // Every parameter tensor, in a fixed order (the table at the top of this file).
  std::vector<ModelTensor>& tensors() { return tensors_; }
  // The same, read-only.
  const std::vector<ModelTensor>& tensors() const { return tensors_; }
  // The tensor named `name`; kInvalidArgument when the model has none.
  ModelTensor& tensor(std::string_view name) { return tensors_[index_of(name)]; }
  // The same, read-only.
  const ModelTensor& tensor(std::string_view name) const { return tensors_[index_of(name)]; }

  // The structure, as checkpoints record it.
  std::string signature() const {
    std::string s;
    const auto field = [&s](const char* name, long long value) {
      if (!s.empty()) s += ' ';
      s += name;
      s += '=';
      s += std::to_string(value);
    };
    field("text_model", 1);
    field("E", kExperts);
    field("K", S::top_k);
    field("R", kRank);
    field("H", kBranches);
    field("d_model", config_.d_model);
    field("moe_layers", config_.num_moe_layers);
    field("d_ff", config_.moe.d_ff);
    field("kind", static_cast<int>(config_.moe.kind));
    s += " classes=";
    for (int h = 0; h < kBranches; ++h) {
      if (h > 0) s += ',';
      s += std::to_string(config_.classes[static_cast<std::size_t>(h)]);
    }
    return s;
  }

  // Parameter accounting; `encoder` is the frozen encoder's count (outside the model).
  ModelParams params(ParamCount encoder = {}) const {
    const index_t d = d_model();
    const MoeLayerConfig& m = config_.moe;
    ModelParams p;
    p.encoder = encoder;
    const MoeLayerShape shape{d, m.d_ff, m.kind, false, false, 0, 0};
    for (int l = 0; l < config_.num_moe_layers; ++l) p.moe += moe_layer_params<S>(shape);
    p.adapter_base = ParamCount{d * d, d * d, 0};
    p.branch = branch_params(config_.classes[kBranches - 1]);
    p.total = p.encoder + p.moe + p.adapter_base + lora_params<L>(d, d).one_of(kBranches) +
              heads_.params();
    return p;
  }
  // The parameters of one more branch with `classes` classes: its adapter and head.
  ParamCount branch_params(index_t classes) const {
    return lora_params<L>(d_model(), d_model()) +
           head_bank_params<::moekit::HeadSpec<1>>(d_model(), {classes});
  }

  // ---- views of the parameters, as the components take them ----------------------------------

  // MoE layer l's router and experts.
  MoeLayerParams moe_params(int l) const {
    const std::size_t k = moe_first(l);
    MoeLayerParams p;
    p.w_gate = tensors_[k].matrix();
    p.experts = {tensors_[k + 1].matrix(),
                 gated() ? tensors_[k + 2].matrix() : MatrixView<const float>(),
                 tensors_[k + (gated() ? 3 : 2)].matrix()};
    return p;
  }
  // The adapters: the frozen projection P and every branch's A and B.
  LoraWeights adapter_weights() const {
    const std::size_t i = adapter_first();
    return {tensors_[i].matrix(), {}, tensors_[i + 1].matrix(), tensors_[i + 2].matrix()};
  }
  // The heads' stacked weights and biases.
  HeadWeights head_weights() const {
    const std::size_t i = adapter_first() + 3;
    return {tensors_[i].matrix(), tensors_[i + 1].flat()};
  }

  // ---- forward, loss, backward ----------------------------------------------------------------

  // logits (n x heads().max_classes(), padded with -inf) with LoRA dropout off.
  void predict(const TextBatch& batch, MatrixView<float> logits,
               std::vector<RoutingStats<S>>* stats = nullptr) {
    const index_t n = check_batch(batch, false);
    check_shape(logits, n, heads_.max_classes(), "logits");
    std::vector<RoutingStats<S>> local;
    std::vector<MoeAuxLosses> aux;
    forward(batch, LoraStep{}, stats != nullptr ? *stats : local, aux);
    as_eigen(logits) = as_eigen(MatrixView<const float>(logits_.middle_rows(0, n)));
  }

  // The model packed for inference in `dtype` (allocates; see the top of this
  // file). The packed copy does not follow later changes of the weights.
  PackedTextModel<H> pack(GemmDtype dtype) const {
    PackedTextModel<H> p;
    for (int l = 0; l < config_.num_moe_layers; ++l)
      p.layers.push_back(layers_[static_cast<std::size_t>(l)].pack(moe_params(l), dtype));
    const index_t d = d_model();
    const LoraWeights aw = adapter_weights();
    const HeadWeights hw = head_weights();
    std::vector<float> merged(static_cast<std::size_t>(hw.w.rows() * d)),
        m(static_cast<std::size_t>(d * d));
    const MatrixView<float> mv(m.data(), d, d);
    index_t row = 0;
    for (int t = 0; t < kBranches; ++t) {
      const index_t c = config_.classes[static_cast<std::size_t>(t)];
      as_eigen(mv) = as_eigen(aw.w);
      bank_.merge(t, mv, aw.a, aw.b);  // P + s B_t A_t
      as_eigen(MatrixView<float>(merged.data() + row * d, c, d)) =
          (as_eigen(hw.w.middle_rows(row, c)).template cast<double>() *
           as_eigen(MatrixView<const float>(mv)).template cast<double>())
              .template cast<float>();
      row += c;
    }
    p.heads = heads_.pack({MatrixView<const float>(merged.data(), hw.w.rows(), d), hw.b}, dtype);
    return p;
  }

  // logits as predict gives them, computed on `packed` (pack()).
  void predict(const TextBatch& batch, const PackedTextModel<H>& packed, MatrixView<float> logits,
               std::vector<RoutingStats<S>>* stats = nullptr) {
    const index_t n = check_batch(batch, false);
    check_shape(logits, n, heads_.max_classes(), "logits");
    MOEKIT_CHECK(packed.layers.size() == layers_.size(), Errc::kInvalidArgument, "packed has ",
                 packed.layers.size(), " MoE layers, the model ", layers_.size(),
                 " (TextMultitaskModel::pack)");
    std::vector<RoutingStats<S>> local;
    std::vector<MoeAuxLosses> aux;
    pool_features(
        batch, stats != nullptr ? *stats : local, aux,
        [&](std::size_t l, MatrixView<const float> in, MatrixView<float> out, RoutingStats<S>& st) {
          return layers_[l].forward(in, packed.layers[l], storage_[l].state(), out, &st,
                                    storage_[l].workspace());
        });
    heads_.forward(MatrixView<const float>(pooled_.middle_rows(0, n)), batch.tasks, packed.heads,
                   logits, workspace());
  }

  // After a forward of N tokens: layer l's routing of each token (N rows).
  Routing routing(int l) const {
    const Routing& r = storage_.at(static_cast<std::size_t>(l)).state().routing;
    const index_t N = last_tokens_;
    return {r.logits.middle_rows(0, N), r.scores.middle_rows(0, N), r.expert_ids.middle_rows(0, N),
            r.weights.middle_rows(0, N), r.positions.middle_rows(0, N)};
  }
  // After a forward of n samples: the pooled features p (n x d, u included).
  MatrixView<const float> pooled() const { return pooled_.middle_rows(0, last_samples_); }

  // One training step's forward, loss and backward (the loss at the top of this
  // file): the gradients of losses.total land in the tensors' grad
  // (overwritten; with a one-branch `scope` the MoE layers' are not computed
  // and keep stale values, which an optimizer over the scope never reads).
  // `step` gives LoRA dropout its noise.
  StepLosses<S, H> loss_and_grads(const TextBatch& batch, TrainScope scope, const LoraStep& step) {
    const index_t n = check_batch(batch, true);
    MOEKIT_CHECK_ARG(scope.branch >= -1 && scope.branch < kBranches,
                     "scope.branch = ", scope.branch, " must be -1 (whole model) or in [0, ",
                     kBranches, ")");
    StepLosses<S, H> out;
    out.aux = forward(batch, step, out.routing, out.layer_aux);
    const MatrixView<const float> z = logits_.middle_rows(0, n);
    const MatrixView<float> dz = dlogits_.middle_rows(0, n);
    out.task = heads_.loss(z, batch.tasks, batch.labels, {}, dz);
    if (!batch.teacher.empty()) {
      const DistillationLoss kd =
          distillation_loss(config_.distillation, z, batch.teacher, batch.labels, dz);
      out.task.total = kd.loss;
    }
    out.total = out.task.total + out.aux;
    backward(batch, scope, step, n);
    return out;
  }

  // ---- branch expansion -----------------------------------------------------------------------

  // A model with one more branch: every tensor copied bit for bit, the new
  // adapter and head initialised from `seed`. Old branches' outputs are
  // unchanged when the new branch is trained alone.
  TextMultitaskModel<S, L, ::moekit::HeadSpec<kBranches + 1>> with_branch(
      index_t classes, std::uint64_t seed) const {
    using Bigger = TextMultitaskModel<S, L, ::moekit::HeadSpec<kBranches + 1>>;
    typename Bigger::Config c;
    c.d_model = config_.d_model;
    c.moe = config_.moe;
    c.num_moe_layers = config_.num_moe_layers;
    c.lora_alpha = config_.lora_alpha;
    c.rslora = config_.rslora;
    c.lora_dropout = config_.lora_dropout;
    std::copy(config_.classes.begin(), config_.classes.end(), c.classes.begin());
    c.classes[kBranches] = classes;
    c.max_batch = config_.max_batch;
    c.max_tokens = config_.max_tokens;
    c.gate_init_std = config_.gate_init_std;
    c.distillation = config_.distillation;
    c.compute = config_.compute;
    c.seed = seed;
    Bigger bigger(c);
    for (const ModelTensor& t : tensors_) {
      ModelTensor& dst = bigger.tensor(t.name);
      std::copy(t.value.begin(), t.value.end(), dst.value.begin());
    }
    return bigger;
  }

 private:
  static const Config& validated(const Config& c) {
    MOEKIT_CHECK_ARG(c.d_model >= 1, "config.d_model = ", c.d_model, " must be at least 1");
    MOEKIT_CHECK_ARG(c.num_moe_layers >= 0, "config.num_moe_layers = ", c.num_moe_layers,
                     " must be at least 0");
    if (c.num_moe_layers > 0) {
      MOEKIT_CHECK_ARG(c.moe.d_model == c.d_model, "config.moe.d_model = ", c.moe.d_model,
                       " must equal config.d_model = ", c.d_model);
      MOEKIT_CHECK_ARG(c.moe.num_shared == 0, "config.moe.num_shared = ", c.moe.num_shared,
                       " must be 0 (shared experts are not supported by this model)");
      MOEKIT_CHECK_ARG(c.moe.router.noise.kind == NoiseKind::kNone,
                       "config.moe.router.noise must be off: its seed would repeat every step");
    }
    MOEKIT_CHECK_ARG(c.max_batch >= 1 && c.max_tokens >= 1, "config.max_batch = ", c.max_batch,
                     " and config.max_tokens = ", c.max_tokens, " must be at least 1");
    MOEKIT_CHECK_ARG(std::isfinite(c.gate_init_std) && c.gate_init_std >= 0.0f,
                     "config.gate_init_std = ", c.gate_init_std, " must be finite and >= 0");
    check_training_dtype(c.compute, "config.compute");
    return c;
  }

  bool gated() const { return config_.moe.kind == FfnKind::kGated; }
  std::size_t tensors_per_layer() const { return gated() ? 4 : 3; }
  std::size_t moe_first(int l) const {
    MOEKIT_CHECK_RANGE(l, 0, config_.num_moe_layers);
    return static_cast<std::size_t>(l) * tensors_per_layer();
  }
  std::size_t adapter_first() const {
    return static_cast<std::size_t>(config_.num_moe_layers) * tensors_per_layer();
  }

  void add_tensor(std::string name, ParamRole role, index_t rows, index_t cols) {
    ModelTensor t;
    t.name = std::move(name);
    t.role = role;
    t.rows = rows;
    t.cols = cols;
    t.value.assign(static_cast<std::size_t>(rows * cols), 0.0f);
    if (!is_frozen(role)) t.grad.assign(t.value.size(), 0.0f);
    tensors_.push_back(std::move(t));
  }

  void make_tensors() {
    const index_t d = d_model(), E = kExperts, f = config_.moe.d_ff;
    for (int l = 0; l < config_.num_moe_layers; ++l) {
      std::string p = "moe.";
      p += std::to_string(l);
      p += '.';
      add_tensor(p + "gate.weight", ParamRole::kGate, E, d);
      add_tensor(p + "experts.w1", ParamRole::kExperts, E * f, d);
      if (gated()) add_tensor(p + "experts.w3", ParamRole::kExperts, E * f, d);
      add_tensor(p + "experts.w2", ParamRole::kExperts, E * d, f);
    }
    add_tensor("adapter.weight", ParamRole::kAdapterBase, d, d);
    add_tensor("adapter.lora_A", ParamRole::kLora, kBranches * kRank, d);
    add_tensor("adapter.lora_B", ParamRole::kLora, kBranches * d, kRank);
    add_tensor("heads.weight", ParamRole::kHead, heads_.total_classes(), d);
    add_tensor("heads.bias", ParamRole::kHead, 1, heads_.total_classes());
  }

  void init() {
    const std::uint64_t seed = config_.seed;
    const double d = static_cast<double>(d_model());
    const double down =
        config_.num_moe_layers == 0
            ? 0.0
            : 1.0 / std::sqrt(2.0 * config_.num_moe_layers * static_cast<double>(config_.moe.d_ff));
    const double gate = config_.gate_init_std > 0.0f ? config_.gate_init_std : 1.0 / std::sqrt(d);
    for (std::size_t i = 0; i < adapter_first(); ++i) {
      ModelTensor& x = tensors_[i];
      const bool is_down = x.name.ends_with(".w2");
      fill_normal(x, x.role == ParamRole::kGate ? gate : (is_down ? down : 1.0 / std::sqrt(d)),
                  seed, i);
    }
    const std::size_t a = adapter_first();
    as_eigen(tensors_[a].matrix()).setIdentity();
    bank_.init(tensors_[a + 1].matrix(), tensors_[a + 2].matrix(),
               LoraInitConfig{.seed = mix64(seed + 1)});
    fill_normal(tensors_[a + 3], 1.0 / std::sqrt(d), seed, a + 3);
  }

  void allocate() {
    const index_t B = config_.max_batch, N = config_.max_tokens, d = d_model();
    const auto rows = [&](index_t r, index_t c) {
      buffers_.emplace_back(static_cast<std::size_t>(r * c));
      return MatrixView<float>(buffers_.back().data(), r, c);
    };
    buffers_.reserve(16 + static_cast<std::size_t>(config_.num_moe_layers));
    for (int l = 0; l < config_.num_moe_layers; ++l) hidden_.push_back(rows(N, d));
    if (config_.num_moe_layers > 0) {
      d_hidden_ = rows(N, d);
      d_tmp_ = rows(N, d);
    }
    pooled_ = rows(B, d);
    adapted_ = rows(B, d);
    saved_h_ = rows(B, kRank);
    logits_ = rows(B, heads_.max_classes());
    dlogits_ = rows(B, heads_.max_classes());
    d_adapted_ = rows(B, d);
    d_pooled_ = rows(B, d);
    order_.resize(static_cast<std::size_t>(B));
    offsets_.resize(static_cast<std::size_t>(kBranches + 1));
    for (const MoeLayer<S>& layer : layers_) storage_.emplace_back(layer, N);
    const index_t ws = std::max(bank_.workspace_size(B), heads_.workspace_size(B));
    workspace_.resize(static_cast<std::size_t>(ws / 8 + 1));
  }

  index_t check_batch(const TextBatch& b, bool need_labels) const {
    check_view(b.tasks, "batch.tasks");
    const index_t n = b.tasks.size();
    MOEKIT_CHECK(n <= config_.max_batch, Errc::kShapeMismatch, "batch has ", n,
                 " samples but config.max_batch = ", config_.max_batch);
    check_view(b.tokens, "batch.tokens");
    const index_t N = b.tokens.rows();
    check_shape(b.tokens, N, d_model(), "batch.tokens");
    MOEKIT_CHECK(N <= config_.max_tokens, Errc::kShapeMismatch, "batch.tokens has ", N,
                 " rows but config.max_tokens = ", config_.max_tokens);
    check_shape(b.offsets, n + 1, "batch.offsets");
    MOEKIT_CHECK(b.offsets[0] == 0 && b.offsets[n] == N, Errc::kInvalidArgument,
                 "batch.offsets must run from 0 to batch.tokens.rows() = ", N, ", got ",
                 b.offsets[0], " .. ", b.offsets[n]);
    for (index_t i = 0; i < n; ++i) {
      MOEKIT_CHECK(b.offsets[i + 1] > b.offsets[i], Errc::kInvalidArgument, "batch.offsets[", i + 1,
                   "] = ", b.offsets[i + 1], " must exceed batch.offsets[", i, "] = ", b.offsets[i],
                   " (every sample needs a token)");
      MOEKIT_CHECK(b.tasks[i] >= 0 && b.tasks[i] < kBranches, Errc::kOutOfRange, "batch.tasks[", i,
                   "] = ", b.tasks[i], " must be in [0, ", kBranches, ")");
    }
    if (!b.pooled_term.empty()) check_shape(b.pooled_term, n, d_model(), "batch.pooled_term");
    if (need_labels) check_shape(b.labels, n, "batch.labels");
    if (!b.teacher.empty()) {
      MOEKIT_CHECK_ARG(kBranches == 1,
                       "batch.teacher: distillation needs a one-branch model, "
                       "this one has ",
                       kBranches);
      check_shape(b.teacher, n, heads_.max_classes(), "batch.teacher");
    }
    return n;
  }

  VectorView<std::byte> workspace() {
    return {reinterpret_cast<std::byte*>(workspace_.data()),
            static_cast<index_t>(workspace_.size() * sizeof(std::uint64_t))};
  }

  LoraRows lora_rows(const TextBatch& b) const {
    return {b.tasks, {order_.data(), b.size()}, {offsets_.data(), kBranches + 1}};
  }

  // The MoE layers (run_layer(l, in, out, stats) runs layer l and returns
  // its aux losses) and the mean pooling into pooled_ (u added). Returns the
  // layers' aux total.
  template <class RunLayer>
  double pool_features(const TextBatch& b, std::vector<RoutingStats<S>>& stats,
                       std::vector<MoeAuxLosses>& layer_aux, const RunLayer& run_layer) {
    const index_t n = b.size(), N = b.tokens.rows(), d = d_model();
    stats.assign(layers_.size(), RoutingStats<S>{});
    layer_aux.assign(layers_.size(), MoeAuxLosses{});
    double aux = 0.0;
    MatrixView<const float> in = b.tokens;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const MatrixView<float> out = hidden_[l].middle_rows(0, N);
      layer_aux[l] = run_layer(l, in, out, stats[l]);
      aux += layer_aux[l].total;
      as_eigen(out) += as_eigen(in);  // residual
      in = out;
    }
    // Mean pooling over each sample's tokens, summed in token order.
    const MatrixView<float> p = pooled_.middle_rows(0, n);
    for (index_t i = 0; i < n; ++i) {
      float* row = p.row(i);
      std::fill(row, row + d, 0.0f);
      for (index_t t = b.offsets[i]; t < b.offsets[i + 1]; ++t) {
        const float* x = in.row(t);
        for (index_t j = 0; j < d; ++j) row[j] += x[j];
      }
      const float inv = 1.0f / static_cast<float>(b.offsets[i + 1] - b.offsets[i]);
      for (index_t j = 0; j < d; ++j) row[j] *= inv;
    }
    if (!b.pooled_term.empty()) as_eigen(p) += as_eigen(b.pooled_term);
    last_tokens_ = N;
    last_samples_ = n;
    return aux;
  }

  double forward(const TextBatch& b, const LoraStep& step, std::vector<RoutingStats<S>>& stats,
                 std::vector<MoeAuxLosses>& layer_aux) {
    const index_t n = b.size();
    const double aux = pool_features(
        b, stats, layer_aux,
        [&](std::size_t l, MatrixView<const float> in, MatrixView<float> out, RoutingStats<S>& st) {
          return layers_[l].forward(in, moe_params(static_cast<int>(l)), storage_[l].state(), out,
                                    &st, storage_[l].workspace());
        });
    const MatrixView<float> p = pooled_.middle_rows(0, n);
    bank_.group(b.tasks, {order_.data(), n}, {offsets_.data(), kBranches + 1});
    bank_.forward(MatrixView<const float>(p), lora_rows(b), adapter_weights(),
                  adapted_.middle_rows(0, n), saved_h_.middle_rows(0, n), step, workspace());
    heads_.forward(MatrixView<const float>(adapted_.middle_rows(0, n)), b.tasks, head_weights(),
                   logits_.middle_rows(0, n), workspace());
    return aux;
  }

  void backward(const TextBatch& b, TrainScope scope, const LoraStep& step, index_t n) {
    const std::size_t a = adapter_first();
    auto& t = tensors_;
    const MatrixView<float> d_adapted = d_adapted_.middle_rows(0, n);
    heads_.backward(MatrixView<const float>(dlogits_.middle_rows(0, n)),
                    MatrixView<const float>(adapted_.middle_rows(0, n)), b.tasks, head_weights(),
                    d_adapted, HeadGrads{t[a + 3].grad_matrix(), t[a + 4].flat_grad()},
                    workspace());
    const bool moe = scope.whole_model() && !layers_.empty();
    const MatrixView<float> d_pooled = d_pooled_.middle_rows(0, n);
    bank_.backward(MatrixView<const float>(d_adapted), pooled_.middle_rows(0, n), lora_rows(b),
                   adapter_weights(), saved_h_.middle_rows(0, n), step,
                   moe ? d_pooled : MatrixView<float>(),
                   LoraGrads{t[a + 1].grad_matrix(), t[a + 2].grad_matrix()}, workspace());
    if (!moe) return;  // frozen MoE layers (a branch alone), or none

    // Mean pooling's backward: each token gets its sample's gradient / length.
    const index_t N = b.tokens.rows(), d = d_model();
    const MatrixView<float> d_top = d_hidden_.middle_rows(0, N);
    for (index_t i = 0; i < n; ++i) {
      const float inv = 1.0f / static_cast<float>(b.offsets[i + 1] - b.offsets[i]);
      for (index_t tok = b.offsets[i]; tok < b.offsets[i + 1]; ++tok) {
        for (index_t j = 0; j < d; ++j) d_top(tok, j) = d_pooled(i, j) * inv;
      }
    }
    for (std::size_t l = layers_.size(); l-- > 0;) {
      const MatrixView<const float> in =
          l == 0 ? b.tokens : MatrixView<const float>(hidden_[l - 1].middle_rows(0, N));
      const MatrixView<float> dx = l == 0 ? MatrixView<float>() : d_tmp_.middle_rows(0, N);
      layers_[l].backward(MatrixView<const float>(d_top), in, moe_params(static_cast<int>(l)),
                          storage_[l].state(), dx, moe_grads(static_cast<int>(l)),
                          storage_[l].workspace());
      if (l > 0) as_eigen(d_top) += as_eigen(MatrixView<const float>(dx));
    }
  }

  MoeLayerGrads moe_grads(int l) {
    const std::size_t k = moe_first(l);
    MoeLayerGrads g;
    g.dw_gate = tensors_[k].grad_matrix();
    g.dw1 = tensors_[k + 1].grad_matrix();
    if (gated()) g.dw3 = tensors_[k + 2].grad_matrix();
    g.dw2 = tensors_[k + (gated() ? 3 : 2)].grad_matrix();
    return g;
  }

  std::size_t index_of(std::string_view name) const {
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      if (tensors_[i].name == name) return i;
    }
    MOEKIT_FAIL(Errc::kInvalidArgument, "the model has no tensor named \"", name, "\"");
  }

  Config config_;
  std::vector<MoeLayer<S>> layers_;
  LoraBank<L> bank_;
  TaskHeads<H> heads_;
  std::vector<ModelTensor> tensors_;

  std::vector<std::vector<float>> buffers_;
  std::vector<MatrixView<float>> hidden_;  // h_1 .. h_M, max_tokens x d
  MatrixView<float> d_hidden_, d_tmp_;
  MatrixView<float> pooled_, adapted_, saved_h_, logits_, dlogits_, d_adapted_, d_pooled_;
  std::vector<index_t> order_, offsets_;
  std::vector<MoeLayerStorage<S>> storage_;
  std::vector<std::uint64_t> workspace_;
  index_t last_tokens_ = 0, last_samples_ = 0;
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
