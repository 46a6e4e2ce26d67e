// AdamW, gradient clipping and the warm-up + cosine schedule
// (moekit/train/optimizer.hpp): the update against a float64 reference of
// torch.optim.AdamW's formula over two groups and varying lr scales; weight
// decay and bias correction; results independent of the thread count;
// grad_norm / clip_grad_norm; a checkpoint round trip (file and bytes) that
// continues bit-identically; every bad input, each with its error code and
// nothing corrupted (a rejected load_state leaves the next step identical to a
// reference optimizer's); and the schedule's values.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <numbers>
#include <string>
#include <vector>

#include "expect_error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/train/optimizer.hpp"
#include "test_support.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

namespace fs = std::filesystem;
namespace io = moekit::io;
using moekit::Errc;
using moekit::index_t;
using moekit::to_size;
using moekit::VectorView;
using moekit::train::AdamW;
using moekit::train::AdamWConfig;
using moekit::train::ParamGroupConfig;
using moekit::train::WarmupCosine;
using moekit_test::expect_error;
using moekit_test::rel_error;
using moekit_test::same_bits;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

VectorView<float> view(std::vector<float>& v) { return {v.data(), static_cast<index_t>(v.size())}; }

// A fresh directory for this test process under the system's temp directory.
fs::path temp_dir() {
  const fs::path dir = fs::temp_directory_path() /
                       ("moekit_optimizer_" + std::to_string(static_cast<long>(::getpid())));
  fs::create_directories(dir);
  return dir;
}

// ---- a small "model": tensors in two groups -------------------------------------------------

struct TensorSpec {
  const char* name;
  int group;
  index_t size;
};

// Group 0 "dense": lr 1e-2 with weight decay 0.1; group 1 "heads": lr 3e-3,
// none. One empty tensor, which every operation must skip.
const std::vector<TensorSpec> kTensors = {{"enc.w", 0, 37},
                                          {"enc.b", 0, 1000},
                                          {"head.w", 1, 513},
                                          {"head.empty", 1, 0},
                                          {"head.b", 1, 5}};
const std::vector<ParamGroupConfig> kGroups = {{"dense", 1e-2f, 0.1f}, {"heads", 3e-3f, 0.0f}};

struct Model {
  std::vector<std::vector<float>> w, g;
  std::unique_ptr<AdamW> opt;

  explicit Model(std::uint64_t seed, const AdamWConfig& config = {},
                 const std::vector<TensorSpec>& tensors = kTensors) {
    opt = std::make_unique<AdamW>(config);
    for (const ParamGroupConfig& gc : kGroups) opt->add_group(gc);
    w.resize(tensors.size());
    g.resize(tensors.size());
    for (std::size_t t = 0; t < tensors.size(); ++t) {
      for (index_t i = 0; i < tensors[t].size; ++i) {
        w[t].push_back(0.5f * moekit::random_normal(seed, 1000000 * t + to_size(i)));
      }
      g[t].assign(to_size(tensors[t].size), 0.0f);
    }
    for (std::size_t t = 0; t < tensors.size(); ++t) {
      opt->add(tensors[t].group, tensors[t].name, view(w[t]), view(g[t]));
    }
  }

  // Gradients of step `s`: a pure function of (seed, s), so an interrupted
  // run sees the same ones.
  void set_grads(std::uint64_t seed, std::int64_t s) {
    for (std::size_t t = 0; t < g.size(); ++t) {
      for (std::size_t i = 0; i < g[t].size(); ++i) {
        g[t][i] = moekit::random_normal(seed ^ (0x5151u + static_cast<std::uint64_t>(s) * 7919u),
                                        1000000 * t + i);
      }
    }
  }
};

// lr multiplier of step s for the tests: varies, including 0 at one step.
float scale_of(std::int64_t s) {
  return s == 4 ? 0.0f : 0.25f + 0.75f * static_cast<float>((s * 37) % 11) / 10.0f;
}

// ---- float64 reference of torch.optim.AdamW ---------------------------------------------------

struct RefAdamW {
  double b1, b2, eps;
  std::vector<std::vector<double>> w, m, v;
  std::int64_t t = 0;

  RefAdamW(const AdamWConfig& c, const Model& model) : b1(c.beta1), b2(c.beta2), eps(c.eps) {
    for (const auto& wt : model.w) {
      w.emplace_back(wt.begin(), wt.end());
      m.emplace_back(wt.size(), 0.0);
      v.emplace_back(wt.size(), 0.0);
    }
  }

  void step(const Model& model, double lr_scale) {
    ++t;
    const double bc1 = 1.0 - std::pow(b1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(b2, static_cast<double>(t));
    for (std::size_t p = 0; p < w.size(); ++p) {
      const ParamGroupConfig& gc = kGroups[to_size(kTensors[p].group)];
      const double lr = static_cast<double>(gc.lr) * lr_scale;
      const double wd = gc.weight_decay;
      for (std::size_t i = 0; i < w[p].size(); ++i) {
        const double g = model.g[p][i];
        w[p][i] -= lr * wd * w[p][i];
        m[p][i] = b1 * m[p][i] + (1.0 - b1) * g;
        v[p][i] = b2 * v[p][i] + (1.0 - b2) * g * g;
        const double m_hat = m[p][i] / bc1, v_hat = v[p][i] / bc2;
        w[p][i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
      }
    }
  }
};

// ---- update -----------------------------------------------------------------------------------

TEST(AdamW, MatchesFloat64Reference) {
  for (const AdamWConfig config : {AdamWConfig{}, AdamWConfig{0.8f, 0.95f, 1e-6f}}) {
    Model model(11, config);
    RefAdamW ref(config, model);
    for (std::int64_t s = 0; s < 20; ++s) {
      model.set_grads(99, s);
      model.opt->step(scale_of(s));
      ref.step(model, scale_of(s));
    }
    EXPECT_EQ(model.opt->steps(), 20);
    for (std::size_t p = 0; p < kTensors.size(); ++p) {
      SCOPED_TRACE(kTensors[p].name);
      EXPECT_LT(rel_error(model.w[p], ref.w[p]), 1e-6);
      EXPECT_LT(rel_error(model.opt->exp_avg(kTensors[p].name), ref.m[p]), 1e-6);
      EXPECT_LT(rel_error(model.opt->exp_avg_sq(kTensors[p].name), ref.v[p]), 1e-6);
      // The parameters moved well beyond the error bound.
      if (!ref.w[p].empty()) {
        const Model fresh(11, config);
        EXPECT_GT(rel_error(fresh.w[p], ref.w[p]), 1e-3);
      }
    }
  }
}

TEST(AdamW, Accessors) {
  Model model(3);
  EXPECT_EQ(model.opt->num_groups(), 2);
  EXPECT_EQ(model.opt->group(1).name, "heads");
  EXPECT_EQ(model.opt->num_tensors(), 5);
  EXPECT_EQ(model.opt->num_params(), 37 + 1000 + 513 + 0 + 5);
  EXPECT_EQ(model.opt->steps(), 0);
  model.opt->set_lr(1, 0.5f);
  EXPECT_EQ(model.opt->group(1).lr, 0.5f);
  EXPECT_EQ(model.opt->group(1).weight_decay, 0.0f);
  EXPECT_EQ(model.opt->exp_avg("head.empty").size(), 0);
  model.set_grads(1, 0);
  model.opt->zero_grad();
  for (const auto& g : model.g) {
    for (const float x : g) EXPECT_EQ(x, 0.0f);
  }
}

TEST(AdamW, WeightDecayWithZeroGradient) {
  // A zero gradient keeps m = v = 0, so the Adam part is exactly 0 / (0 + eps)
  // = 0 and only the decay acts: w <- w (1 - lr wd) per step.
  AdamW opt;
  const int decayed = opt.add_group({"decayed", 0.1f, 0.5f});
  const int plain = opt.add_group({"plain", 0.1f, 0.0f});
  const int frozen = opt.add_group({"frozen", 0.0f, 0.5f});
  std::vector<float> a = {1.0f, -2.0f, 0.25f}, b = a, c = a;
  std::vector<float> ga(3, 0.0f), gb(3, 0.0f), gc = {1.0f, -1.0f, 3.0f};
  opt.add(decayed, "a", view(a), view(ga));
  opt.add(plain, "b", view(b), view(gb));
  opt.add(frozen, "c", view(c), view(gc));
  const std::vector<float> a0 = a, b0 = b, c0 = c;
  opt.step(1.0f);
  opt.step(0.5f);
  const double f = (1.0 - 0.1 * 0.5) * (1.0 - 0.05 * 0.5);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_NEAR(a[i], a0[i] * f, 1e-6 * std::abs(a0[i]));
    EXPECT_NE(a[i], a0[i]);
  }
  EXPECT_TRUE(same_bits(b, b0));  // no decay, no gradient: untouched
  EXPECT_TRUE(same_bits(c, c0));  // lr 0: untouched, even with decay and a gradient
  EXPECT_NEAR(opt.exp_avg("c")[2], 0.9 * 0.1 * 3.0 + 0.1 * 3.0, 1e-6);  // moments still move
}

TEST(AdamW, BiasCorrectedFirstSteps) {
  // A constant gradient gives m_hat = g and v_hat = g^2 at every step, so each
  // update is lr g / (|g| + eps) = lr sign(g) (to eps / |g|), from step 1 on.
  for (const AdamWConfig config : {AdamWConfig{}, AdamWConfig{0.5f, 0.9f, 1e-8f}}) {
    AdamW opt(config);
    const float lr = 1e-3f;
    const int grp = opt.add_group({"g", lr, 0.0f});
    std::vector<float> w(4, 0.0f);
    std::vector<float> g = {0.37f, -2.5f, 1e-3f, 40.0f};
    opt.add(grp, "w", view(w), view(g));
    for (int s = 1; s <= 3; ++s) {
      const std::vector<float> before = w;
      opt.step();
      for (std::size_t i = 0; i < 4; ++i) {
        const double delta = static_cast<double>(w[i]) - before[i];
        const double expected = -static_cast<double>(lr) * g[i] / (std::abs(g[i]) + config.eps);
        EXPECT_NEAR(delta, expected, 2e-6 * lr) << "step " << s << " i " << i;
        EXPECT_NEAR(std::abs(delta), lr, 2e-5 * lr);
      }
    }
  }
}

TEST(AdamW, EmptyOptimizerAndEmptyTensor) {
  AdamW opt;
  opt.step();
  EXPECT_EQ(opt.steps(), 1);
  EXPECT_EQ(opt.grad_norm(), 0.0);
  EXPECT_EQ(opt.clip_grad_norm(1.0), 0.0);
  const int grp = opt.add_group({"g", 1.0f, 0.0f});
  opt.add(grp, "nothing", VectorView<float>(), VectorView<float>());
  opt.step();
  EXPECT_EQ(opt.num_params(), 0);
  EXPECT_EQ(opt.grad_norm(), 0.0);
}

// Runs `steps` steps on a tensor big enough for the parallel loops and
// returns the parameters, moments and grad norms.
struct BigRun {
  std::vector<float> w, m, v;
  std::vector<double> norms;
};
BigRun big_run(int steps) {
  const index_t n = moekit::cpu::kLightParallelGrain + 12345;
  std::vector<float> w(to_size(n)), g(to_size(n)), small(70000), gsmall(70000);
  for (index_t i = 0; i < n; ++i) w[to_size(i)] = moekit::random_normal(5, to_size(i));
  for (std::size_t i = 0; i < small.size(); ++i) small[i] = moekit::random_normal(6, i);
  AdamW opt;
  const int grp = opt.add_group({"g", 1e-2f, 0.01f});
  opt.add(grp, "big", view(w), view(g));
  opt.add(grp, "small", view(small), view(gsmall));
  BigRun out;
  for (int s = 0; s < steps; ++s) {
    for (index_t i = 0; i < n; ++i)
      g[to_size(i)] = moekit::random_normal(to_size(7 + s), to_size(i));
    for (std::size_t i = 0; i < gsmall.size(); ++i)
      gsmall[i] = moekit::random_normal(to_size(8 + s), i);
    out.norms.push_back(opt.clip_grad_norm(900.0));
    opt.step(0.5f);
  }
  out.w = w;
  out.m.assign(opt.exp_avg("big").begin(), opt.exp_avg("big").end());
  out.v.assign(opt.exp_avg_sq("big").begin(), opt.exp_avg_sq("big").end());
  return out;
}

// Without OpenMP this checks run-to-run determinism only.
TEST(AdamW, IndependentOfThreadCount) {
#if defined(_OPENMP)
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
#endif
  const BigRun one = big_run(3);
#if defined(_OPENMP)
  omp_set_num_threads(std::max(2, saved));
#endif
  const BigRun many = big_run(3);
#if defined(_OPENMP)
  omp_set_num_threads(saved);
#endif
  EXPECT_TRUE(same_bits(one.w, many.w));
  EXPECT_TRUE(same_bits(one.m, many.m));
  EXPECT_TRUE(same_bits(one.v, many.v));
  ASSERT_EQ(one.norms.size(), many.norms.size());
  for (std::size_t i = 0; i < one.norms.size(); ++i) EXPECT_EQ(one.norms[i], many.norms[i]);
  // Clipping was active (the norm of ~1.1M standard normals is ~1060 > 900).
  EXPECT_GT(one.norms[0], 900.0);
}

// ---- gradient norm and clipping ---------------------------------------------------------------

double ref_norm(const Model& model) {
  double s = 0.0;
  for (const auto& g : model.g) {
    for (const float x : g) s += static_cast<double>(x) * x;
  }
  return std::sqrt(s);
}

TEST(AdamW, GradNorm) {
  Model model(4);
  model.set_grads(4, 0);
  const double ref = ref_norm(model);
  EXPECT_NEAR(model.opt->grad_norm(), ref, 1e-12 * ref);
  // Large values whose squares overflow float still work (summed in double).
  model.g[0][0] = 3e20f;
  EXPECT_NEAR(model.opt->grad_norm(), ref_norm(model), 1e-12 * ref_norm(model));
  EXPECT_TRUE(std::isfinite(model.opt->grad_norm()));
}

TEST(AdamW, ClipGradNormScalesToMaxNorm) {
  Model model(5);
  model.set_grads(5, 0);
  const std::vector<std::vector<float>> before = model.g;
  const double norm = ref_norm(model);
  const double max_norm = 0.25 * norm;
  EXPECT_NEAR(model.opt->clip_grad_norm(max_norm), norm, 1e-12 * norm);  // the norm before
  EXPECT_NEAR(model.opt->grad_norm(), max_norm, 1e-6 * max_norm);
  const double coef = max_norm / (norm + 1e-6);
  for (std::size_t t = 0; t < before.size(); ++t) {
    for (std::size_t i = 0; i < before[t].size(); ++i) {
      EXPECT_EQ(model.g[t][i], before[t][i] * static_cast<float>(coef));
    }
  }
}

TEST(AdamW, ClipGradNormBelowThresholdChangesNothing) {
  Model model(6);
  model.set_grads(6, 0);
  const std::vector<std::vector<float>> before = model.g;
  const double norm = model.opt->grad_norm();
  for (const double max_norm : {2.0 * norm, norm, static_cast<double>(kInf)}) {
    EXPECT_EQ(model.opt->clip_grad_norm(max_norm), norm);
    for (std::size_t t = 0; t < before.size(); ++t) EXPECT_TRUE(same_bits(model.g[t], before[t]));
  }
}

TEST(AdamW, ClipGradNormNonFiniteChangesNothing) {
  for (const float bad : {kNaN, kInf, -kInf}) {
    Model model(7);
    model.set_grads(7, 0);
    model.g[2][100] = bad;
    const std::vector<std::vector<float>> before = model.g;
    const double norm = model.opt->clip_grad_norm(1e-3);
    if (std::isnan(bad)) {
      EXPECT_TRUE(std::isnan(norm));
    } else {
      EXPECT_EQ(norm, std::numeric_limits<double>::infinity());
    }
    for (std::size_t t = 0; t < before.size(); ++t) EXPECT_TRUE(same_bits(model.g[t], before[t]));
  }
}

// ---- checkpoints ------------------------------------------------------------------------------

// Runs `first` steps, checkpoints (parameters under "model.", optimizer state
// under "optim."), restores into a fresh model through `transport`, and runs
// `second` more; compares with an uninterrupted run of first + second steps.
template <class Transport>
void check_round_trip(std::int64_t first, std::int64_t second, Transport transport) {
  const AdamWConfig config{0.9f, 0.99f, 1e-7f};
  const WarmupCosine schedule{3, 15, 0.1f};

  Model straight(21, config);
  for (std::int64_t s = 0; s < first + second; ++s) {
    straight.set_grads(77, s);
    straight.opt->clip_grad_norm(20.0);
    straight.opt->step(schedule(s));
  }

  Model before(21, config);
  for (std::int64_t s = 0; s < first; ++s) {
    before.set_grads(77, s);
    before.opt->clip_grad_norm(20.0);
    before.opt->step(schedule(s));
  }
  io::SafetensorsWriter out;
  for (std::size_t t = 0; t < kTensors.size(); ++t) {
    out.add(std::string("model.") + kTensors[t].name,
            VectorView<const float>(before.w[t].data(), kTensors[t].size));
  }
  before.opt->save_state(out, "optim.");
  const io::SafetensorsReader in = transport(out);
  before = Model(0, config);  // the old run is gone

  EXPECT_EQ(in.metadata().at("optim.step"), std::to_string(first));
  EXPECT_TRUE(in.contains("optim.enc.w.exp_avg"));
  EXPECT_TRUE(in.contains("optim.head.b.exp_avg_sq"));
  EXPECT_EQ(in.info("optim.head.empty.exp_avg").shape, io::Shape{0});
  EXPECT_EQ(in.info("optim.enc.b.exp_avg_sq").dtype, "F32");

  Model resumed(12345, config);  // different initial values, all overwritten
  for (std::size_t t = 0; t < kTensors.size(); ++t) {
    if (kTensors[t].size > 0) in.read(std::string("model.") + kTensors[t].name, view(resumed.w[t]));
  }
  resumed.opt->load_state(in, "optim.");
  EXPECT_EQ(resumed.opt->steps(), first);
  for (std::int64_t s = first; s < first + second; ++s) {
    resumed.set_grads(77, s);
    resumed.opt->clip_grad_norm(20.0);
    resumed.opt->step(schedule(s));
  }
  EXPECT_EQ(resumed.opt->steps(), straight.opt->steps());
  for (std::size_t t = 0; t < kTensors.size(); ++t) {
    SCOPED_TRACE(kTensors[t].name);
    EXPECT_TRUE(same_bits(resumed.w[t], straight.w[t]));
    EXPECT_TRUE(
        same_bits(resumed.opt->exp_avg(kTensors[t].name), straight.opt->exp_avg(kTensors[t].name)));
    EXPECT_TRUE(same_bits(resumed.opt->exp_avg_sq(kTensors[t].name),
                          straight.opt->exp_avg_sq(kTensors[t].name)));
  }
}

TEST(AdamW, CheckpointThroughFileContinuesBitIdentically) {
  const fs::path path = temp_dir() / "ckpt.safetensors";
  check_round_trip(7, 9, [&](const io::SafetensorsWriter& out) {
    out.write(path);
    return io::SafetensorsReader(path);
  });
  fs::remove(path);
}

TEST(AdamW, CheckpointThroughBytesContinuesBitIdentically) {
  for (const std::int64_t first : {0, 1, 3, 12}) {
    SCOPED_TRACE(first);
    check_round_trip(first, 6, [](const io::SafetensorsWriter& out) {
      return io::SafetensorsReader::from_bytes(out.to_bytes());
    });
  }
}

// ---- bad input --------------------------------------------------------------------------------

TEST(AdamW, BadConfig) {
  for (const float b : {-0.1f, 1.0f, 1.5f, kNaN}) {
    expect_error([&] { AdamW({b, 0.999f, 1e-8f}); }, Errc::kInvalidArgument);
    expect_error([&] { AdamW({0.9f, b, 1e-8f}); }, Errc::kInvalidArgument);
  }
  for (const float eps : {0.0f, -1e-8f, kInf, kNaN}) {
    const std::string msg = expect_error(
        [&] {
          AdamW({0.9f, 0.999f, eps});
        },
        Errc::kInvalidArgument);
    EXPECT_NE(msg.find("config.eps"), std::string::npos) << msg;
  }
  AdamW({0.0f, 0.0f, 1e-30f});  // the edges are allowed
}

TEST(AdamW, BadGroup) {
  AdamW opt;
  opt.add_group({"a", 1e-3f, 0.1f});
  expect_error([&] { opt.add_group({"", 1e-3f, 0.0f}); }, Errc::kInvalidArgument);
  const std::string msg = expect_error(
      [&] {
        opt.add_group({"a", 1e-3f, 0.0f});
      },
      Errc::kInvalidArgument);
  EXPECT_NE(msg.find("'a'"), std::string::npos) << msg;
  for (const float bad : {-1e-3f, kNaN, kInf}) {
    expect_error([&] { opt.add_group({"b", bad, 0.0f}); }, Errc::kInvalidArgument);
    expect_error([&] { opt.add_group({"b", 1e-3f, bad}); }, Errc::kInvalidArgument);
    expect_error([&] { opt.set_lr(0, bad); }, Errc::kInvalidArgument);
  }
  expect_error([&] { opt.set_lr(1, 1.0f); }, Errc::kOutOfRange);
  expect_error([&] { opt.set_lr(-1, 1.0f); }, Errc::kOutOfRange);
  expect_error([&] { (void)opt.group(1); }, Errc::kOutOfRange);
  EXPECT_EQ(opt.num_groups(), 1);
  EXPECT_EQ(opt.group(0).lr, 1e-3f);
  EXPECT_EQ(opt.add_group({"b", 0.0f, 0.0f}), 1);
}

TEST(AdamW, BadParameter) {
  AdamW opt;
  opt.add_group({"a", 1e-3f, 0.1f});
  std::vector<float> w(10, 1.0f), g(10, 0.5f), w2(10, 1.0f), g2(10, 0.5f);
  opt.add(0, "w", view(w), view(g));
  const auto add2 = [&](int group, std::string name, VectorView<float> value,
                        VectorView<float> grad) { opt.add(group, std::move(name), value, grad); };
  const std::string range =
      expect_error([&] { add2(1, "w2", view(w2), view(g2)); }, Errc::kOutOfRange);
  EXPECT_NE(range.find("group = 1"), std::string::npos) << range;
  expect_error([&] { add2(-1, "w2", view(w2), view(g2)); }, Errc::kOutOfRange);
  expect_error([&] { add2(0, "", view(w2), view(g2)); }, Errc::kInvalidArgument);
  expect_error([&] { add2(0, "w", view(w2), view(g2)); }, Errc::kInvalidArgument);
  const std::string shape = expect_error(
      [&] { add2(0, "w2", view(w2), VectorView<float>(g2.data(), 9)); }, Errc::kShapeMismatch);
  EXPECT_NE(shape.find("10"), std::string::npos) << shape;
  EXPECT_NE(shape.find("9"), std::string::npos) << shape;
  expect_error([&] { add2(0, "w2", VectorView<float>(nullptr, 10), view(g2)); },
               Errc::kNullPointer);
  expect_error([&] { add2(0, "w2", view(w2), VectorView<float>(nullptr, 10)); },
               Errc::kNullPointer);
  expect_error([&] { add2(0, "w2", VectorView<float>(w2.data(), -1), view(g2)); },
               Errc::kInvalidArgument);
  // Overlaps: value with its own grad, and with an already registered tensor.
  expect_error(
      [&] { add2(0, "w2", VectorView<float>(w2.data(), 6), VectorView<float>(w2.data() + 4, 6)); },
      Errc::kInvalidArgument);
  expect_error(
      [&] { add2(0, "w2", VectorView<float>(w.data() + 9, 1), VectorView<float>(g2.data(), 1)); },
      Errc::kInvalidArgument);
  expect_error([&] { add2(0, "w2", view(w2), VectorView<float>(g.data(), 10)); },
               Errc::kInvalidArgument);
  EXPECT_EQ(opt.num_tensors(), 1);
  EXPECT_EQ(opt.num_params(), 10);
  expect_error([&] { (void)opt.exp_avg("w2"); }, Errc::kInvalidArgument);
  // Adjacent (not overlapping) views are fine.
  std::vector<float> both(8, 1.0f);
  opt.add(0, "w2", VectorView<float>(both.data(), 4), VectorView<float>(both.data() + 4, 4));
  EXPECT_EQ(opt.num_tensors(), 2);
}

TEST(AdamW, BadStepAndClip) {
  Model model(8), ref(8);
  model.set_grads(8, 0);
  ref.set_grads(8, 0);
  for (const float bad : {-0.5f, kNaN, kInf}) {
    expect_error([&] { model.opt->step(bad); }, Errc::kInvalidArgument);
  }
  for (const double bad : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN()}) {
    expect_error([&] { model.opt->clip_grad_norm(bad); }, Errc::kInvalidArgument);
  }
  EXPECT_EQ(model.opt->steps(), 0);
  for (std::size_t t = 0; t < kTensors.size(); ++t) {
    EXPECT_TRUE(same_bits(model.w[t], ref.w[t]));
    EXPECT_TRUE(same_bits(model.g[t], ref.g[t]));
  }
  model.opt->step(0.7f);
  ref.opt->step(0.7f);
  for (std::size_t t = 0; t < kTensors.size(); ++t) EXPECT_TRUE(same_bits(model.w[t], ref.w[t]));
}

// The state of `model` after 5 steps, as (name, copy of data) pairs.
struct SavedState {
  std::vector<std::string> names;
  std::vector<std::vector<float>> data;
  std::int64_t step = 0;
};
SavedState five_step_state() {
  Model other(31);
  for (std::int64_t s = 0; s < 5; ++s) {
    other.set_grads(32, s);
    other.opt->step();
  }
  io::SafetensorsWriter out;
  other.opt->save_state(out, "");
  const io::SafetensorsReader in = io::SafetensorsReader::from_bytes(out.to_bytes());
  SavedState state;
  state.step = 5;
  for (const std::string& name : in.names()) {
    const index_t n = in.info(name).shape.at(0);
    state.names.push_back(name);
    state.data.emplace_back(to_size(n));
    if (n > 0) in.read(name, view(state.data.back()));
  }
  return state;
}

TEST(AdamW, RejectedLoadChangesNothing) {
  const SavedState good = five_step_state();
  // The optimizer's last state tensor: a load that copied while it checked
  // would already have changed the others.
  const std::string last = "head.b.exp_avg_sq";

  struct Case {
    const char* what;
    Errc code;
    std::function<void(io::SafetensorsWriter&, std::vector<std::vector<float>>&)> build;
  };
  const auto add_all = [&](io::SafetensorsWriter& out, std::vector<std::vector<float>>& data,
                           const std::string& skip, index_t shrink) {
    for (std::size_t i = 0; i < good.names.size(); ++i) {
      if (good.names[i] == skip) continue;
      data.push_back(good.data[i]);
      if (good.names[i] == last && shrink > 0)
        data.back().resize(data.back().size() - to_size(shrink));
      out.add(good.names[i], VectorView<const float>(data.back().data(),
                                                     static_cast<index_t>(data.back().size())));
    }
  };
  const std::vector<Case> cases = {
      {"no step metadata", Errc::kFormatError,
       [&](auto& out, auto& data) { add_all(out, data, "", 0); }},
      {"step not a number", Errc::kFormatError,
       [&](auto& out, auto& data) {
         add_all(out, data, "", 0);
         out.set_metadata("step", "five");
       }},
      {"negative step", Errc::kFormatError,
       [&](auto& out, auto& data) {
         add_all(out, data, "", 0);
         out.set_metadata("step", "-5");
       }},
      {"trailing junk", Errc::kFormatError,
       [&](auto& out, auto& data) {
         add_all(out, data, "", 0);
         out.set_metadata("step", "5x");
       }},
      {"empty step", Errc::kFormatError,
       [&](auto& out, auto& data) {
         add_all(out, data, "", 0);
         out.set_metadata("step", "");
       }},
      {"a tensor missing", Errc::kFormatError,
       [&](auto& out, auto& data) {
         add_all(out, data, last, 0);
         out.set_metadata("step", "5");
       }},
      {"a tensor of the wrong shape", Errc::kShapeMismatch,
       [&](auto& out, auto& data) {
         add_all(out, data, "", 1);
         out.set_metadata("step", "5");
       }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    Model model(8), ref(8);
    for (std::int64_t s = 0; s < 3; ++s) {
      model.set_grads(9, s);
      ref.set_grads(9, s);
      model.opt->step();
      ref.opt->step();
    }
    io::SafetensorsWriter out;
    std::vector<std::vector<float>> data;
    data.reserve(good.names.size());
    c.build(out, data);
    const io::SafetensorsReader in = io::SafetensorsReader::from_bytes(out.to_bytes());
    expect_error([&] { model.opt->load_state(in, ""); }, c.code);
    EXPECT_EQ(model.opt->steps(), 3);
    // The next step (which reads m, v and t) is identical to the reference's.
    model.set_grads(9, 3);
    ref.set_grads(9, 3);
    model.opt->step();
    ref.opt->step();
    for (std::size_t t = 0; t < kTensors.size(); ++t) {
      EXPECT_TRUE(same_bits(model.w[t], ref.w[t]));
      EXPECT_TRUE(
          same_bits(model.opt->exp_avg(kTensors[t].name), ref.opt->exp_avg(kTensors[t].name)));
    }
  }
  // The good state does load (so the failures above are the cases' faults).
  Model model(8);
  io::SafetensorsWriter out;
  std::vector<std::vector<float>> data;
  data.reserve(good.names.size());
  add_all(out, data, "", 0);
  out.set_metadata("step", "5");
  model.opt->load_state(io::SafetensorsReader::from_bytes(out.to_bytes()), "");
  EXPECT_EQ(model.opt->steps(), 5);
  // A prefix that names nothing is a missing-metadata error.
  expect_error(
      [&] { model.opt->load_state(io::SafetensorsReader::from_bytes(out.to_bytes()), "x."); },
      Errc::kFormatError);
  EXPECT_EQ(model.opt->steps(), 5);
}

TEST(AdamW, SaveStateRejectedByWriterAddsNothing) {
  Model model(9);
  io::SafetensorsWriter out;
  std::vector<float> x(3, 1.0f);
  out.add("optim.head.b.exp_avg", VectorView<const float>(x.data(), 3));
  expect_error([&] { model.opt->save_state(out, "optim."); }, Errc::kInvalidArgument);
  EXPECT_EQ(out.size(), 1);
  const io::SafetensorsReader in = io::SafetensorsReader::from_bytes(out.to_bytes());
  EXPECT_EQ(in.metadata().size(), 1u);  // the writer's checksum alone
  EXPECT_EQ(in.metadata().count("moekit.checksum"), 1u);
}

// ---- schedule ---------------------------------------------------------------------------------

TEST(WarmupCosine, Values) {
  const WarmupCosine s{10, 110, 0.1f};
  s.validate();
  EXPECT_FLOAT_EQ(s(0), 0.1f);  // (0 + 1) / 10
  EXPECT_FLOAT_EQ(s(4), 0.5f);
  EXPECT_EQ(s(9), 1.0f);          // end of warm-up
  EXPECT_EQ(s(10), 1.0f);         // start of the cosine
  EXPECT_FLOAT_EQ(s(60), 0.55f);  // midpoint: r + (1 - r) / 2
  EXPECT_FLOAT_EQ(s(35),
                  static_cast<float>(0.1 + 0.9 * 0.5 * (1.0 + std::cos(std::numbers::pi * 0.25))));
  EXPECT_EQ(s(110), 0.1f);
  EXPECT_EQ(s(111), 0.1f);
  EXPECT_EQ(s(1000000), 0.1f);
  EXPECT_GT(s(109), 0.1f);
  EXPECT_NEAR(s(109), 0.1f, 1e-3f);
  for (std::int64_t k = 0; k + 1 < 10; ++k) EXPECT_LT(s(k), s(k + 1));
  for (std::int64_t k = 10; k < 200; ++k) EXPECT_LE(s(k + 1), s(k)) << k;

  const WarmupCosine no_warmup{0, 50, 0.0f};
  EXPECT_EQ(no_warmup(0), 1.0f);
  EXPECT_FLOAT_EQ(no_warmup(25), 0.5f);
  EXPECT_EQ(no_warmup(50), 0.0f);

  const WarmupCosine warmup_only{4, 4, 0.25f};
  EXPECT_FLOAT_EQ(warmup_only(0), 0.25f);
  EXPECT_EQ(warmup_only(3), 1.0f);
  EXPECT_EQ(warmup_only(4), 0.25f);

  const WarmupCosine constant{0, 1, 1.0f};
  for (std::int64_t k = 0; k < 5; ++k) EXPECT_EQ(constant(k), 1.0f);
}

TEST(WarmupCosine, BadConfig) {
  const std::vector<WarmupCosine> bad = {{0, 0, 0.0f},   {-1, 10, 0.0f}, {11, 10, 0.0f},
                                         {0, 10, -0.1f}, {0, 10, 1.5f},  {0, 10, kNaN},
                                         {0, -5, 0.0f}};
  for (const WarmupCosine& s : bad) {
    expect_error([&] { s.validate(); }, Errc::kInvalidArgument);
    expect_error([&] { (void)s(0); }, Errc::kInvalidArgument);
  }
  const std::string msg = expect_error(
      [] {
        (void)WarmupCosine{11, 10, 0.0f}(0);
      },
      Errc::kInvalidArgument);
  EXPECT_NE(msg.find("warmup_steps = 11"), std::string::npos) << msg;
  expect_error([] { (void)WarmupCosine{1, 10, 0.0f}(-1); }, Errc::kInvalidArgument);
}

}  // namespace
