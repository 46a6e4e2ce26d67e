// The reference multi-task model (moekit/nn/multitask_model.hpp), its
// encoder, trainer (moekit/train/trainer.hpp) and quality checks.
//
// MultitaskModel.* and MlpEncoder.* are unit tests (also run under
// ASan/UBSan); MultitaskTraining.* train for a few hundred steps and run in
// the optimised build only (tools/test.sh).

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <type_traits>
#include <vector>

#include "expect_error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/nn/mlp_encoder.hpp"
#include "moekit/nn/multitask_model.hpp"
#include "moekit/train/data.hpp"
#include "moekit/train/quality.hpp"
#include "moekit/train/trainer.hpp"
#include "test_support.hpp"

namespace {

using moekit::Errc;
using moekit::index_t;
using moekit::to_size;
using moekit_test::expect_error;
using moekit_test::same_bits;
namespace cpu = moekit::cpu;
namespace train = moekit::train;

std::vector<float> normal_vector(std::size_t n, std::uint64_t seed) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = moekit::random_normal(seed, i);
  return v;
}

std::filesystem::path temp_path(const std::string& name) {
  std::string dir = "moekit_multitask_";
  dir += ::testing::UnitTest::GetInstance()->current_test_info()->name();
  const auto path = std::filesystem::temp_directory_path() / dir;
  std::filesystem::create_directories(path);
  return path / name;
}

// ---- MlpEncoder ---------------------------------------------------------------------------------

TEST(MlpEncoder, MatchesFloat64ReferenceAndCountsItsParameters) {
  const cpu::MlpEncoder enc({.d_input = 7, .d_model = 12, .d_ff = 20, .num_layers = 2});
  const index_t n = 9, d = 12, f = 20, L = 2, din = 7;
  std::vector<float> w_in(d * din), b_in(d), gamma(L * d), beta(L * d), w1(L * f * d), b1(L * f),
      w2(L * d * f), b2(L * d);
  const cpu::MlpEncoderViews<float> w{
      {w_in.data(), d, din}, {b_in.data(), d},  {gamma.data(), L, d},  {beta.data(), L, d},
      {w1.data(), L * f, d}, {b1.data(), L, f}, {w2.data(), L * d, f}, {b2.data(), L, d}};
  enc.init(w, 3);
  // Non-trivial LayerNorm and biases, so every parameter matters.
  for (auto* v : {&b_in, &gamma, &beta, &b1, &b2}) {
    const std::vector<float> r = normal_vector(v->size(), v->size() + 11);
    for (std::size_t i = 0; i < v->size(); ++i) (*v)[i] = 0.5f * r[i] + (v == &gamma ? 1.0f : 0.0f);
  }
  const std::vector<float> x = normal_vector(n * din, 5);
  std::vector<float> y(n * d, std::nanf("")), ws(to_size(enc.workspace_size(n) / 4));
  // The views init filled convert to the read-only weights forward takes
  // (and never the other way).
  static_assert(std::is_convertible_v<cpu::MlpEncoderViews<float>, cpu::MlpEncoderWeights>);
  static_assert(!std::is_convertible_v<cpu::MlpEncoderWeights, cpu::MlpEncoderViews<float>>);
  enc.forward({x.data(), n, din}, w, {y.data(), n, d},
              {reinterpret_cast<std::byte*>(ws.data()), enc.workspace_size(n)});

  double num = 0.0, den = 0.0;
  for (index_t t = 0; t < n; ++t) {
    std::vector<double> h(d), u(d), a(f);
    for (index_t i = 0; i < d; ++i) {
      h[to_size(i)] = b_in[to_size(i)];
      for (index_t j = 0; j < din; ++j)
        h[to_size(i)] += double(w_in[to_size(i * din + j)]) * x[to_size(t * din + j)];
    }
    for (index_t l = 0; l < L; ++l) {
      double mean = 0.0, var = 0.0;
      for (double v : h) mean += v / d;
      for (double v : h) var += (v - mean) * (v - mean) / d;
      for (index_t i = 0; i < d; ++i) {
        u[to_size(i)] = gamma[to_size(l * d + i)] * (h[to_size(i)] - mean) / std::sqrt(var + 1e-5) +
                        beta[to_size(l * d + i)];
      }
      for (index_t k = 0; k < f; ++k) {
        double s = b1[to_size(l * f + k)];
        for (index_t i = 0; i < d; ++i)
          s += double(w1[to_size((l * f + k) * d + i)]) * u[to_size(i)];
        a[to_size(k)] =
            0.5 * s * (1.0 + std::tanh(0.7978845608028654 * (s + 0.044715 * s * s * s)));
      }
      for (index_t i = 0; i < d; ++i) {
        double s = b2[to_size(l * d + i)];
        for (index_t k = 0; k < f; ++k)
          s += double(w2[to_size((l * d + i) * f + k)]) * a[to_size(k)];
        h[to_size(i)] += s;
      }
    }
    for (index_t i = 0; i < d; ++i) {
      num += (y[to_size(t * d + i)] - h[to_size(i)]) * (y[to_size(t * d + i)] - h[to_size(i)]);
      den += h[to_size(i)] * h[to_size(i)];
    }
  }
  EXPECT_LT(std::sqrt(num / den), 1e-5);
  EXPECT_EQ(enc.params().total, din * d + d + L * (2 * d * f + f + d + 2 * d));
  EXPECT_EQ(enc.params().trainable, 0);
}

TEST(MlpEncoder, RejectsBadConfigurationsAndInputs) {
  expect_error([] { cpu::MlpEncoder({.d_input = 0, .d_model = 4, .d_ff = 4, .num_layers = 1}); },
               Errc::kInvalidArgument);
  expect_error([] { cpu::MlpEncoder({.d_input = 3, .d_model = 4, .d_ff = 0, .num_layers = 1}); },
               Errc::kInvalidArgument);
  const cpu::MlpEncoder enc({.d_input = 3, .d_model = 4, .d_ff = 5, .num_layers = 0});
  std::vector<float> w_in(12), b_in(4), x(6), y(8, 7.0f);
  const cpu::MlpEncoderWeights w{{w_in.data(), 4, 3}, {b_in.data(), 4}};
  std::vector<float> ws(64);
  const moekit::VectorView<std::byte> wsv(reinterpret_cast<std::byte*>(ws.data()), 256);
  const std::string msg = expect_error(
      [&] {
        enc.forward({x.data(), 2, 3}, w, {y.data(), 2, 5}, wsv);
      },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("y"), std::string::npos) << msg;
  expect_error(
      [&] {
        enc.forward({x.data(), 2, 3}, w, {y.data(), 2, 4}, {});
      },
      Errc::kShapeMismatch);
  EXPECT_TRUE(std::all_of(y.begin(), y.end(), [](float v) { return v == 7.0f; }));
}

// ---- the model
// ------------------------------------------------------------------------------------

template <int E, int K, int H>
using Model = cpu::MultitaskModel<moekit::MoeSpec<E, K>, moekit::LoraSpec<4>, moekit::HeadSpec<H>>;

template <class M>
typename M::Config small_config(index_t max_batch, float switch_coeff) {
  typename M::Config c;
  c.encoder = {.d_input = 10, .d_model = 16, .d_ff = 24, .num_layers = 1};
  c.moe.d_model = 16;
  c.moe.d_ff = 12;
  c.moe.kind = moekit::FfnKind::kGated;
  c.moe.activation = moekit::Activation::kSilu;
  c.moe.switch_coeff = switch_coeff;
  c.moe.z_coeff = 1e-3f;
  c.max_batch = max_batch;
  c.seed = 5;
  for (std::size_t h = 0; h < c.classes.size(); ++h) c.classes[h] = 3 + static_cast<index_t>(h);
  return c;
}

struct BatchData {
  std::vector<float> x;
  std::vector<std::int32_t> tasks, labels;
  cpu::Batch view(index_t d_input) const {
    const index_t n = static_cast<index_t>(tasks.size());
    return {{x.data(), n, d_input}, {tasks.data(), n}, {labels.data(), n}};
  }
};

BatchData random_batch(index_t n, index_t d_input, int heads, std::uint64_t seed) {
  BatchData b{normal_vector(static_cast<std::size_t>(n * d_input), seed), {}, {}};
  for (index_t i = 0; i < n; ++i) {
    const int t = static_cast<int>(moekit::random_bits(seed + 1, to_size(i)) % to_size(heads));
    b.tasks.push_back(t);
    b.labels.push_back(
        static_cast<std::int32_t>(moekit::random_bits(seed + 2, to_size(i)) % (to_size(3 + t))));
  }
  return b;
}

// Every trained tensor's gradient at `step` against fourth-order central
// differences of the loss (the model runs in float, so the differences do
// too; the h^2 error term cancels), at every ninth element or so. A
// perturbation must not flip a token's top-k choice (the loss would jump):
// at each perturbed point every layer's assignment counts are checked
// against the unperturbed point's.
template <class M>
void check_gradients(M& model, const cpu::Batch& batch, const cpu::LoraStep& step) {
  const auto base = model.loss_and_grads(batch, cpu::TrainScope::all(), step);
  for (cpu::ModelTensor& t : model.tensors()) {
    if (t.grad.empty()) continue;
    model.loss_and_grads(batch, cpu::TrainScope::all(), step);  // at the unperturbed point
    const std::vector<float> grad = t.grad;
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < t.value.size(); i += 1 + t.value.size() / 9) {
      const float v = t.value[i], h = 1e-2f;
      const auto loss_at = [&](float delta) {
        t.value[i] = v + delta;
        const auto out = model.loss_and_grads(batch, cpu::TrainScope::all(), step);
        for (std::size_t l = 0; l < out.routing.size(); ++l) {
          EXPECT_EQ(out.routing[l].assigned, base.routing[l].assigned)
              << t.name << "[" << i << "] + " << delta << " flips a top-k choice in layer " << l;
        }
        return out.total;
      };
      const double fd =
          (8.0 * (loss_at(h) - loss_at(-h)) - (loss_at(2 * h) - loss_at(-2 * h))) / (12.0 * h);
      t.value[i] = v;
      num += (fd - grad[i]) * (fd - grad[i]);
      den += fd * fd;
    }
    EXPECT_LT(std::sqrt(num / den), 5e-3) << t.name;
  }
}

// K = E: every expert is always selected, the loss is smooth everywhere.
TEST(MultitaskModel, GradientsMatchFiniteDifferences) {
  using M = Model<4, 4, 2>;
  auto c = small_config<M>(12, 0.1f);
  c.moe.num_shared = 1;
  M model(c);
  for (float& v : model.tensor("adapter.lora_B").value) v = 0.2f;  // B = 0 would hide dA
  const BatchData data = random_batch(12, 10, 2, 7);
  check_gradients(model, data.view(10), {});
}

// K < E (the top-k choice matters: its weights are a softmax over the chosen
// logits) and LoRA dropout on (a fixed step draws the same mask at every
// perturbed point, so the loss stays a smooth function of the weights).
TEST(MultitaskModel, GradientsMatchFiniteDifferencesWithTopKAndDropout) {
  using M = Model<4, 2, 2>;
  auto c = small_config<M>(12, 0.1f);
  c.moe.num_shared = 1;
  c.moe.router.gating.rule = moekit::GatingRule::kTopKSoftmax;
  c.lora_dropout = 0.25f;
  M model(c);
  for (float& v : model.tensor("adapter.lora_B").value) v = 0.2f;
  const BatchData data = random_batch(12, 10, 2, 7);
  check_gradients(model, data.view(10), {.training = true, .seed = 17, .step = 3});
}

TEST(MultitaskModel, BranchScopeGivesTheSameBranchGradientsAndSkipsTheMoe) {
  using M = Model<4, 2, 3>;
  M model(small_config<M>(32, 0.1f));
  for (float& v : model.tensor("adapter.lora_B").value) v = 0.1f;
  const BatchData data = random_batch(32, 10, 3, 9);
  const auto all = model.loss_and_grads(data.view(10), cpu::TrainScope::all(), {});
  std::vector<std::vector<float>> grads;
  for (const cpu::ModelTensor& t : model.tensors()) grads.push_back(t.grad);
  for (cpu::ModelTensor& t : model.tensors()) std::fill(t.grad.begin(), t.grad.end(), 1234.0f);
  const auto one = model.loss_and_grads(data.view(10), cpu::TrainScope::only_branch(1), {});
  EXPECT_EQ(all.total, one.total);
  for (std::size_t i = 0; i < model.tensors().size(); ++i) {
    const cpu::ModelTensor& t = model.tensors()[i];
    if (t.role == cpu::ParamRole::kLora || t.role == cpu::ParamRole::kHead) {
      EXPECT_TRUE(same_bits(t.grad, grads[i])) << t.name;
    } else if (!t.grad.empty()) {  // not computed: the MoE layers are frozen for a branch
      EXPECT_TRUE(std::all_of(t.grad.begin(), t.grad.end(), [](float g) { return g == 1234.0f; }))
          << t.name;
    }
  }
}

TEST(MultitaskModel, PredictIsDeterministicAndEqualsTheTrainingForward) {
  using M = Model<4, 2, 2>;
  M model(small_config<M>(20, 0.0f));
  const BatchData data = random_batch(20, 10, 2, 4);
  const index_t C = model.heads().max_classes();
  std::vector<float> a(to_size(20 * C), std::nanf("")), b(to_size(20 * C), 1.0f);
  model.predict(data.view(10), {a.data(), 20, C});
  model.loss_and_grads(data.view(10), cpu::TrainScope::all(), {});
  model.predict(data.view(10), {b.data(), 20, C});
  EXPECT_TRUE(same_bits(a, b));
  for (index_t i = 0; i < 20; ++i) {  // each row has its head's classes, -inf padding after
    const index_t classes = 3 + data.tasks[to_size(i)];
    for (index_t k = 0; k < C; ++k) {
      EXPECT_EQ(std::isfinite(a[to_size(i * C + k)]), k < classes) << i << " " << k;
    }
  }
}

TEST(MultitaskModel, RejectsBadConfigurationsAndBatchesWithoutWriting) {
  using M = Model<4, 2, 2>;
  auto c = small_config<M>(8, 0.0f);
  c.moe.d_model = 8;
  std::string msg = expect_error([&] { M m(c); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("moe.d_model"), std::string::npos) << msg;
  c = small_config<M>(8, 0.0f);
  c.moe.router.noise.kind = moekit::NoiseKind::kJitter;
  expect_error([&] { M m(c); }, Errc::kInvalidArgument);
  c = small_config<M>(8, 0.0f);
  c.num_moe_layers = 0;
  expect_error([&] { M m(c); }, Errc::kInvalidArgument);

  M model(small_config<M>(8, 0.0f));
  const index_t C = model.heads().max_classes();
  std::vector<float> logits(to_size(9 * C), 5.0f);
  BatchData big = random_batch(9, 10, 2, 1);
  msg = expect_error(
      [&] {
        model.predict(big.view(10), {logits.data(), 9, C});
      },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("max_batch"), std::string::npos) << msg;
  BatchData bad = random_batch(4, 10, 2, 1);
  bad.tasks[2] = 2;
  msg = expect_error(
      [&] {
        model.predict(bad.view(10), {logits.data(), 4, C});
      },
      Errc::kOutOfRange);
  EXPECT_NE(msg.find("batch.tasks[2] = 2"), std::string::npos) << msg;
  bad.tasks[2] = 0;
  bad.labels[1] = 99;
  expect_error([&] { model.loss_and_grads(bad.view(10), cpu::TrainScope::all(), {}); },
               Errc::kOutOfRange);
  expect_error([&] { model.loss_and_grads(bad.view(10), cpu::TrainScope::only_branch(2), {}); },
               Errc::kInvalidArgument);
  expect_error([&] { model.loss_and_grads(bad.view(10), cpu::TrainScope::only_branch(-2), {}); },
               Errc::kInvalidArgument);
  EXPECT_TRUE(std::all_of(logits.begin(), logits.end(), [](float v) { return v == 5.0f; }));
  expect_error([&] { model.tensor("no.such.tensor"); }, Errc::kInvalidArgument);
}

TEST(MultitaskModel, CountsItsParameters) {
  using M = Model<4, 2, 3>;
  const M model(small_config<M>(8, 0.0f));
  const moekit::ModelParams p = model.params();
  moekit::param_t stored = 0, trainable = 0;
  for (const cpu::ModelTensor& t : model.tensors()) {
    stored += t.rows * t.cols;
    if (!cpu::is_frozen(t.role)) trainable += t.rows * t.cols;
  }
  EXPECT_EQ(p.total.total, stored);
  EXPECT_EQ(p.total.trainable, trainable);
  // A branch: a rank-4 adapter on 16 x 16 and a head of C classes.
  EXPECT_EQ(model.branch_params(7).total, 4 * 16 * 2 + 7 * 17);
}

// A weights file of `m` without its "encoder.norm.bias" tensor.
template <class M>
void io_write_without_encoder(const std::filesystem::path& path, const M& m) {
  moekit::io::SafetensorsWriter out;
  for (const cpu::ModelTensor& t : m.tensors()) {
    if (t.name != "encoder.norm.bias") out.add(t.name, t.matrix());
  }
  out.write(path);
}

// ---- trainer, checkpoints, expansion ------------------------------------------------------------

template <class M>
train::TrainerConfig trainer_config(std::int64_t steps) {
  train::TrainerConfig t;
  t.lr = {3e-3f, 3e-3f, 3e-3f, 3e-3f};
  t.warmup_steps = steps / 10;
  t.total_steps = steps;
  t.dropout_seed = 17;
  return t;
}

TEST(MultitaskModel, TrainerGroupsFollowTheRolesAndScope) {
  using M = Model<4, 2, 3>;
  M model(small_config<M>(8, 0.0f));
  const train::Trainer<M> all(model, {});
  EXPECT_EQ(all.optimizer().num_groups(), 4);
  EXPECT_EQ(all.optimizer().group(0).lr, 1e-4f);  // the reference rates
  EXPECT_EQ(all.optimizer().group(1).lr, 5e-4f);
  EXPECT_EQ(all.optimizer().group(2).lr, 5e-4f);
  EXPECT_EQ(all.optimizer().group(3).lr, 1e-3f);
  EXPECT_EQ(all.optimizer().num_params(), model.params().total.trainable);
  train::TrainerConfig one;
  one.scope = cpu::TrainScope::only_branch(2);
  const train::Trainer<M> branch(model, one);
  EXPECT_EQ(branch.optimizer().num_params(), model.branch_params(5).total);
  for (const int bad : {3, -2}) {
    one.scope = cpu::TrainScope::only_branch(bad);
    expect_error([&] { train::Trainer<M>(model, one); }, Errc::kInvalidArgument);
  }
}

// Resuming from a checkpoint repeats the uninterrupted run bit for bit
// (weights, moments, step), with LoRA dropout on so the noise must line up.
TEST(MultitaskModel, CheckpointResumeIsBitIdentical) {
  using M = Model<4, 2, 2>;
  auto c = small_config<M>(16, 0.1f);
  c.lora_dropout = 0.1f;
  const auto batch_of = [](std::int64_t step) {
    return random_batch(16, 10, 2, to_size(100 + step));
  };
  const train::TrainerConfig tc = trainer_config<M>(8);

  M straight(c);
  train::Trainer<M> t1(straight, tc);
  for (int s = 0; s < 8; ++s) t1.step(batch_of(s).view(10));

  M first(c);
  train::Trainer<M> t2(first, tc);
  for (int s = 0; s < 4; ++s) t2.step(batch_of(s).view(10));
  const auto path = temp_path("resume.safetensors");
  t2.save_checkpoint(path);

  auto c2 = c;
  c2.seed = 99;  // other initial weights: everything must come from the file
  M resumed(c2);
  train::Trainer<M> t3(resumed, tc);
  t3.load_checkpoint(path);
  EXPECT_EQ(t3.steps(), 4);
  for (int s = 4; s < 8; ++s) t3.step(batch_of(s).view(10));
  for (std::size_t i = 0; i < straight.tensors().size(); ++i) {
    EXPECT_TRUE(same_bits(straight.tensors()[i].value, resumed.tensors()[i].value))
        << straight.tensors()[i].name;
  }
  EXPECT_EQ(t1.optimizer().steps(), t3.optimizer().steps());
  const auto m1 = t1.optimizer().exp_avg_sq("moe.1.experts.w2");
  const auto m3 = t3.optimizer().exp_avg_sq("moe.1.experts.w2");
  EXPECT_EQ(std::memcmp(m1.data(), m3.data(), to_size(m1.size()) * sizeof(float)), 0);
}

TEST(MultitaskModel, RejectedCheckpointsChangeNothing) {
  using M = Model<4, 2, 2>;
  M model(small_config<M>(16, 0.0f));
  train::Trainer<M> trainer(model, trainer_config<M>(4));
  trainer.step(random_batch(16, 10, 2, 1).view(10));
  const auto path = temp_path("ckpt.safetensors");
  trainer.save_checkpoint(path);

  // Another structure: three branches.
  using M3 = Model<4, 2, 3>;
  M3 other(small_config<M3>(16, 0.0f));
  train::Trainer<M3> other_trainer(other, trainer_config<M3>(4));
  const std::vector<float> before = other.tensor("moe.0.experts.w1").value;
  std::string msg =
      expect_error([&] { other_trainer.load_checkpoint(path); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("H=2"), std::string::npos) << msg;
  EXPECT_TRUE(same_bits(before, other.tensor("moe.0.experts.w1").value));
  EXPECT_EQ(other_trainer.steps(), 0);

  // Another scope.
  M same(small_config<M>(16, 0.0f));
  train::TrainerConfig branch = trainer_config<M>(4);
  branch.scope = cpu::TrainScope::only_branch(0);
  train::Trainer<M> branch_trainer(same, branch);
  expect_error([&] { branch_trainer.load_checkpoint(path); }, Errc::kInvalidArgument);

  // A truncated file.
  const auto cut = temp_path("cut.safetensors");
  std::filesystem::copy_file(path, cut, std::filesystem::copy_options::overwrite_existing);
  std::filesystem::resize_file(cut, std::filesystem::file_size(path) / 2);
  train::Trainer<M> fresh(same, trainer_config<M>(4));
  expect_error([&] { fresh.load_checkpoint(cut); }, Errc::kFormatError);

  // Weights alone round-trip.
  const auto weights = temp_path("weights.safetensors");
  train::save_model(weights, model);
  M loaded(small_config<M>(16, 0.0f));
  train::load_model(weights, loaded);
  for (std::size_t i = 0; i < model.tensors().size(); ++i) {
    EXPECT_TRUE(same_bits(model.tensors()[i].value, loaded.tensors()[i].value));
  }

  // The encoder alone, into a model with other heads (its own encoder is replaced).
  using M3b = Model<4, 2, 3>;
  M3b three(small_config<M3b>(16, 0.0f));
  const std::vector<float> gate = three.tensor("moe.0.gate.weight").value;
  train::load_encoder(weights, three);
  EXPECT_TRUE(same_bits(three.tensor("encoder.ffn.w1.weight").value,
                        model.tensor("encoder.ffn.w1.weight").value));
  EXPECT_TRUE(same_bits(three.tensor("moe.0.gate.weight").value, gate));
  // A file without the encoder is refused and changes nothing.
  M3b fresh3(small_config<M3b>(16, 0.0f));
  const std::vector<float> enc = fresh3.tensor("encoder.input.weight").value;
  io_write_without_encoder(temp_path("no_encoder.safetensors"), model);
  expect_error([&] { train::load_encoder(temp_path("no_encoder.safetensors"), fresh3); },
               Errc::kFormatError);
  EXPECT_TRUE(same_bits(fresh3.tensor("encoder.input.weight").value, enc));
  std::filesystem::remove_all(path.parent_path());
}

TEST(MultitaskModel, AddedBranchLeavesOldBranchesBitIdentical) {
  using M = Model<4, 2, 2>;
  M model(small_config<M>(24, 0.1f));
  train::Trainer<M> trainer(model, trainer_config<M>(3));
  for (int s = 0; s < 3; ++s) trainer.step(random_batch(24, 10, 2, to_size(40 + s)).view(10));

  const BatchData old_rows = random_batch(24, 10, 2, 77);
  const index_t C2 = model.heads().max_classes();
  std::vector<float> before(to_size(24 * C2));
  model.predict(old_rows.view(10), {before.data(), 24, C2});

  auto bigger = model.with_branch(6, 123);
  using M3 = decltype(bigger);
  static_assert(M3::kBranches == 3);
  EXPECT_EQ(bigger.heads().classes(2), 6);
  train::TrainerConfig tc = trainer_config<M3>(3);
  tc.scope = cpu::TrainScope::only_branch(2);
  train::Trainer<M3> branch_trainer(bigger, tc);
  for (int s = 0; s < 3; ++s) {
    BatchData b = random_batch(24, 10, 3, to_size(50 + s));
    for (std::size_t i = 0; i < b.tasks.size(); ++i) {
      b.tasks[i] = 2;
      b.labels[i] %= 6;
    }
    branch_trainer.step(b.view(10));
  }
  const index_t C3 = bigger.heads().max_classes();
  std::vector<float> after(to_size(24 * C3));
  bigger.predict(old_rows.view(10), {after.data(), 24, C3});
  for (index_t i = 0; i < 24; ++i) {
    const index_t classes = 3 + old_rows.tasks[to_size(i)];
    EXPECT_EQ(std::memcmp(&before[to_size(i * C2)], &after[to_size(i * C3)],
                          to_size(classes) * sizeof(float)),
              0)
        << i;
  }
  // Only branch 2's slices moved.
  EXPECT_TRUE(
      same_bits(model.tensor("moe.0.experts.w1").value, bigger.tensor("moe.0.experts.w1").value));
  EXPECT_EQ(branch_trainer.optimizer().num_params(), bigger.branch_params(6).total);
}

// ---- short training runs (optimised build only) -------------------------------------------------

using TrainModel =
    cpu::MultitaskModel<moekit::MoeSpec<8, 2>, moekit::LoraSpec<8>, moekit::HeadSpec<3>>;

struct RunResult {
  train::EvalReport eval;
  double first_loss = 0.0, last_loss = 0.0;
  std::vector<double> switch_losses;
  bool encoder_frozen = false;
};

RunResult train_run(float switch_coeff, int steps) {
  const train::SyntheticTasks tasks({.classes = {4, 3, 6}, .seed = 11});
  const train::Dataset data = tasks.sample(6000, 1), test = tasks.sample(1500, 2);
  TrainModel::Config c;
  c.encoder = {.d_input = 32, .d_model = 32, .d_ff = 64, .num_layers = 1};
  c.moe.d_model = 32;
  c.moe.d_ff = 48;
  c.moe.kind = moekit::FfnKind::kGated;
  c.moe.activation = moekit::Activation::kSilu;
  c.moe.switch_coeff = switch_coeff;
  c.classes = {4, 3, 6};
  c.max_batch = 128;
  c.seed = 2;
  TrainModel model(c);
  const std::uint64_t fingerprint = train::frozen_fingerprint(model);
  train::TrainerConfig tc;
  tc.lr = {2e-3f, 2e-3f, 2e-3f, 4e-3f};
  tc.warmup_steps = steps / 10;
  tc.total_steps = steps;
  train::Trainer<TrainModel> trainer(model, tc);
  train::BatchSampler sampler(data.size(), 128, 3);
  std::vector<float> x(128 * 32);
  std::vector<std::int32_t> t(128), y(128);
  RunResult r;
  double window = 0.0;
  for (int s = 0; s < steps; ++s) {
    train::gather(data, sampler.indices(s), {x.data(), 128, 32}, {t.data(), 128}, {y.data(), 128});
    const auto rep = trainer.step({{x.data(), 128, 32}, {t.data(), 128}, {y.data(), 128}});
    r.switch_losses.push_back(rep.losses.mean_switch_loss());
    window += rep.losses.task.total;
    if (s == 19) r.first_loss = window / 20, window = 0.0;
    if (s >= steps - 20) r.last_loss += rep.losses.task.total / 20;
  }
  r.eval = train::evaluate(model, test);
  r.encoder_frozen = train::frozen_fingerprint(model) == fingerprint;
  return r;
}

TEST(MultitaskTraining, LossFallsAndEveryBranchBeatsChance) {
  const RunResult r = train_run(0.5f, 400);
  EXPECT_LT(r.last_loss, 0.6 * r.first_loss);
  const std::vector<index_t> classes = {4, 3, 6};
  const train::QualityCheck above = train::branches_above_chance(r.eval, classes, 0.2);
  EXPECT_TRUE(above.passed) << above.detail;
  EXPECT_TRUE(r.encoder_frozen);
  const train::QualityCheck aux = train::aux_loss_decreasing(r.switch_losses, 50);
  EXPECT_TRUE(aux.passed) << aux.detail;
}

TEST(MultitaskTraining, AuxLossKeepsTheLoadBalancedWhereWithoutItRoutingCollapses) {
  const RunResult with = train_run(0.5f, 300), without = train_run(0.0f, 300);
  const train::QualityCheck balanced = train::expert_load_balanced(with.eval, 1.5);
  EXPECT_TRUE(balanced.passed) << balanced.detail;
  const train::QualityCheck unbalanced = train::expert_load_balanced(without.eval, 1.5);
  EXPECT_FALSE(unbalanced.passed) << unbalanced.detail;
}

}  // namespace
