// gpu::TaskHeads, gpu::distillation_loss and gpu::EarlyExit /
// gpu::multi_exit_loss against the CPU backend on the same inputs (the CPU's
// side is built by the host compiler in cpu_reference.cpp): fp32 within 1e-5
// relative, bf16 within 1e-2; gradients included; uneven task loads, a task
// with no rows, H = 1 / 3 / 4 with differing class counts; outputs poisoned
// before each run; bad device data (task ids, labels); NaN logits and
// patience in early exit; reruns bit-identical. Device tests skip without a
// GPU; the argument checks run everywhere (they throw before any CUDA call).
#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu_reference.hpp"
#include "device_buffer.cuh"
#include "gpu_test.cuh"
#include "moekit/cuda/distillation.cuh"
#include "moekit/cuda/early_exit.cuh"
#include "moekit/cuda/task_heads.cuh"

namespace {

using moekit::Errc;
using moekit::HeadSpec;
using moekit::index_t;
using moekit::MatrixView;
using moekit::TaskWeighting;
using moekit::VectorView;
using moekit_test::DeviceBuffer;
using moekit_test::expect_error;
using moekit_test::fake;
namespace gpu = moekit::gpu;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-2;
}

// ||got - want|| / ||want|| over the entries where want is finite; entries
// where want is not finite must match exactly (the -inf padding).
template <class T>
double relative_error(const std::vector<T>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < want.size() && i < got.size(); ++i) {
    const double g = moekit_test::to_float(got[i]), w = want[i];
    if (!std::isfinite(w)) {
      EXPECT_EQ(g, w) << "entry " << i;
      continue;
    }
    diff += (g - w) * (g - w);
    norm += w * w;
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

double relative(double got, double want) {
  return std::abs(got - want) / (std::abs(want) > 1e-30 ? std::abs(want) : 1.0);
}

// Values rounded to T on the device side, the same values as floats for the CPU.
template <class T>
std::vector<T> rounded(std::vector<float>& values) {
  std::vector<T> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    out[i] = moekit_test::from_float<T>(values[i]);
    values[i] = moekit_test::to_float(out[i]);
  }
  return out;
}

template <class T>
std::vector<float> as_floats(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = moekit_test::to_float(v[i]);
  return out;
}

// ---- task heads -------------------------------------------------------------

struct HeadsCase {
  std::string name;
  std::vector<std::int64_t> rows_per_task;  // H entries; 0 = a task with no rows
  std::vector<std::int64_t> classes;
  bool bias = true;
  TaskWeighting kind = TaskWeighting::kFixed;
  bool accumulate = false;
  bool sorted = false;  // rows given task by task
};

moekit_test::HeadsProblem make_problem(const HeadsCase& c, std::uint32_t seed) {
  moekit_test::HeadsProblem p;
  const int heads = static_cast<int>(c.classes.size());
  p.d = 72;
  p.classes = c.classes;
  p.bias = c.bias;
  p.kind = c.kind;
  p.accumulate = c.accumulate;
  std::mt19937 gen(seed);
  for (int h = 0; h < heads; ++h) {
    for (std::int64_t r = 0; r < c.rows_per_task[static_cast<std::size_t>(h)]; ++r) {
      p.tasks.push_back(h);
    }
  }
  if (!c.sorted) std::shuffle(p.tasks.begin(), p.tasks.end(), gen);
  p.n = static_cast<std::int64_t>(p.tasks.size());
  for (std::int32_t t : p.tasks) {
    std::uniform_int_distribution<int> label(0, static_cast<int>(c.classes[t]) - 1);
    p.labels.push_back(label(gen));
  }
  if (heads == 1) p.tasks.clear();  // H = 1: every row is task 0
  std::int64_t total = 0;
  for (std::int64_t k : c.classes) total += k;
  p.x = moekit_test::random_floats(static_cast<std::size_t>(p.n * p.d), -1.0f, 1.0f, seed + 1);
  p.w = moekit_test::random_floats(static_cast<std::size_t>(total * p.d), -0.3f, 0.3f, seed + 2);
  if (c.bias)
    p.b = moekit_test::random_floats(static_cast<std::size_t>(total), -0.5f, 0.5f, seed + 3);
  if (c.kind == TaskWeighting::kFixed) {
    p.task_weights =
        moekit_test::random_floats(static_cast<std::size_t>(heads), 0.2f, 2.0f, seed + 4);
  } else {
    p.task_weights =
        moekit_test::random_floats(static_cast<std::size_t>(heads), -1.0f, 1.0f, seed + 4);
  }
  if (c.accumulate) {
    p.dw_in =
        moekit_test::random_floats(static_cast<std::size_t>(total * p.d), -1.0f, 1.0f, seed + 5);
    if (c.bias)
      p.db_in = moekit_test::random_floats(static_cast<std::size_t>(total), -1.0f, 1.0f, seed + 6);
  }
  return p;
}

template <int H, class T>
void run_heads_case(const HeadsCase& c) {
  using S = HeadSpec<H>;
  SCOPED_TRACE(c.name + " " + moekit_test::type_name<T>());
  moekit_test::HeadsProblem p = make_problem(c, 11);
  // Device inputs rounded to T; the CPU sees the rounded values.
  const std::vector<T> x_t = rounded<T>(p.x), w_t = rounded<T>(p.w), b_t = rounded<T>(p.b);
  std::vector<T> dw_in_t = rounded<T>(p.dw_in), db_in_t = rounded<T>(p.db_in);
  const moekit_test::HeadsResult want = moekit_test::CpuHeadsReference<H>::run(p);

  gpu::TaskHeadsConfig<S> config;
  config.d_model = p.d;
  for (int h = 0; h < H; ++h) config.classes[h] = p.classes[static_cast<std::size_t>(h)];
  config.bias = p.bias;
  const gpu::TaskHeads<S, T> heads(config);
  const index_t n = p.n, d = p.d, width = heads.max_classes(), total = heads.total_classes();

  DeviceBuffer<T> x(x_t), w(w_t), b(b_t), logits(static_cast<std::size_t>(n * width)),
      dlogits(static_cast<std::size_t>(n * width)), dx(static_cast<std::size_t>(n * d)),
      dw(static_cast<std::size_t>(total * d)), db(p.bias ? static_cast<std::size_t>(total) : 0);
  DeviceBuffer<std::int32_t> tasks(p.tasks), labels(p.labels);
  DeviceBuffer<gpu::TaskLosses<S>> result(1);
  DeviceBuffer<float> dlog_vars(c.kind == TaskWeighting::kUncertainty ? H : 0);
  DeviceBuffer<std::int64_t> invalid(1);
  for (auto* buf : {&logits, &dlogits, &dx}) buf->poison();
  result.poison();
  dlog_vars.poison();
  invalid.poison();
  if (c.accumulate) {
    dw.upload(dw_in_t);
    db.upload(db_in_t);
  } else {
    dw.poison();
    db.poison();
  }
  const VectorView<const std::int32_t> task_view(p.tasks.empty() ? nullptr : tasks.get(),
                                                 static_cast<index_t>(p.tasks.size()));
  const gpu::HeadWeights<T> weights{{w.get(), total, d},
                                    {p.bias ? b.get() : nullptr, p.bias ? total : 0}};
  moekit::TaskWeights weighting;
  weighting.kind = c.kind;
  const VectorView<const float> tw(p.task_weights.data(), H);
  if (c.kind == TaskWeighting::kFixed) {
    weighting.fixed = tw;
  } else {
    weighting.log_vars = tw;
  }
  const std::size_t loss_bytes = heads.loss_workspace_size(n);
  const std::size_t back_bytes = heads.backward_workspace_size(n);
  DeviceBuffer<unsigned char> loss_ws(loss_bytes), back_ws(back_bytes);
  loss_ws.poison();
  back_ws.poison();

  const auto run = [&] {
    heads.forward({x.get(), n, d}, task_view, weights, {logits.get(), n, width}, invalid.get());
    heads.loss({logits.get(), n, width}, task_view, {labels.get(), n}, weighting, result.get(),
               {dlogits.get(), n, width}, {dlog_vars.get(), static_cast<index_t>(dlog_vars.size())},
               loss_ws.get(), loss_bytes);
    heads.backward(
        {dlogits.get(), n, width}, {x.get(), n, d}, task_view, weights, {dx.get(), n, d},
        {{dw.get(), total, d}, {db.get(), static_cast<index_t>(db.size())}, c.accumulate},
        back_ws.get(), back_bytes);
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  };
  run();

  const double tol = tolerance<T>();
  EXPECT_LT(relative_error(logits.download(), want.logits), tol) << "logits";
  EXPECT_LT(relative_error(dlogits.download(), want.dlogits), tol) << "dlogits";
  EXPECT_LT(relative_error(dx.download(), want.dx), tol) << "dx";
  EXPECT_LT(relative_error(dw.download(), want.dw), tol) << "dw";
  if (p.bias) EXPECT_LT(relative_error(db.download(), want.db), tol) << "db";
  EXPECT_EQ(invalid.download()[0], 0);
  const gpu::TaskLosses<S> got = result.download()[0];
  EXPECT_LT(relative(got.total, want.total), tol) << "total";
  EXPECT_EQ(got.invalid_rows, 0);
  for (int h = 0; h < H; ++h) {
    EXPECT_EQ(got.count[h], want.count[static_cast<std::size_t>(h)]) << "task " << h;
    EXPECT_LT(relative(got.loss[h], want.loss[static_cast<std::size_t>(h)]), tol) << "task " << h;
    if (std::is_same_v<T, float>) {
      EXPECT_EQ(got.accuracy[h], want.accuracy[static_cast<std::size_t>(h)]) << "task " << h;
    }
  }
  if (c.kind == TaskWeighting::kUncertainty) {
    EXPECT_LT(relative_error(dlog_vars.download(), want.dlog_vars), tol) << "dlog_vars";
  }

  // Rerun on the same inputs: bit-identical (accumulating mode restarts from dw_in).
  const auto logits0 = logits.download(), dlogits0 = dlogits.download(), dx0 = dx.download(),
             dw0 = dw.download();
  if (c.accumulate) dw.upload(dw_in_t);
  if (c.accumulate) db.upload(db_in_t);
  run();
  const gpu::TaskLosses<S> again = result.download()[0];
  EXPECT_EQ(std::memcmp(&again, &got, sizeof(got)), 0);
  const auto same = [](const auto& a, const auto& b2) {
    return a.size() == b2.size() && std::memcmp(a.data(), b2.data(), a.size() * sizeof(a[0])) == 0;
  };
  EXPECT_TRUE(same(logits.download(), logits0));
  EXPECT_TRUE(same(dlogits.download(), dlogits0));
  EXPECT_TRUE(same(dx.download(), dx0));
  EXPECT_TRUE(same(dw.download(), dw0));
}

TEST(GpuTaskHeads, FourHeadsUnevenWithAnEmptyTaskMatchCpu) {
  MOEKIT_REQUIRE_GPU();
  const HeadsCase c{"H=4, task 2 empty", {37, 5, 0, 90}, {7, 3, 12, 1}};
  run_heads_case<4, float>(c);
  run_heads_case<4, __nv_bfloat16>(c);
}

TEST(GpuTaskHeads, UncertaintyNoBiasAccumulateMatchCpu) {
  MOEKIT_REQUIRE_GPU();
  HeadsCase c{"H=4 uncertainty, no bias, accumulate", {64, 0, 300, 9}, {10, 4, 33, 2}};
  c.bias = false;
  c.kind = TaskWeighting::kUncertainty;
  c.accumulate = true;
  run_heads_case<4, float>(c);
  run_heads_case<4, __nv_bfloat16>(c);
}

TEST(GpuTaskHeads, SortedRowsAndThreeHeadsMatchCpu) {
  MOEKIT_REQUIRE_GPU();
  HeadsCase c{"H=3 sorted", {300, 1, 260}, {5, 129, 9}};
  c.sorted = true;
  run_heads_case<3, float>(c);
  run_heads_case<3, __half>(c);
}

TEST(GpuTaskHeads, OneHeadWithoutTaskIdsMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  const HeadsCase c{"H=1", {513}, {6}};
  run_heads_case<1, float>(c);
  run_heads_case<1, __nv_bfloat16>(c);
}

TEST(GpuTaskHeads, EmptyBatchGivesZeroLossAndZeroGradients) {
  MOEKIT_REQUIRE_GPU();
  HeadsCase c{"n=0", {0, 0, 0, 0}, {2, 3, 4, 5}};
  run_heads_case<4, float>(c);
}

// Task ids and labels in device memory out of range: NaN logits, left out of
// the loss (zero dlogits), zero dx, nothing added to dW; counted.
TEST(GpuTaskHeads, BadTaskIdsAndLabelsFollowTheDeviceRule) {
  MOEKIT_REQUIRE_GPU();
  using S = HeadSpec<2>;
  const index_t n = 6, d = 8;
  const gpu::TaskHeads<S, float> heads({.d_model = d, .classes = {3, 2}, .bias = true});
  const std::vector<std::int32_t> tasks{0, 5, 1, -1, 1, 0}, labels{2, 0, 7, 0, 1, 0};
  auto xs = moekit_test::random_floats(n * d, -1, 1, 3);
  auto ws = moekit_test::random_floats(5 * d, -1, 1, 4);
  auto bs = moekit_test::random_floats(5, -1, 1, 5);
  DeviceBuffer<float> x(xs), w(ws), b(bs), logits(n * 3), dlogits(n * 3), dx(n * d), dw(5 * d),
      db(5);
  DeviceBuffer<std::int32_t> t(tasks), y(labels);
  DeviceBuffer<std::int64_t> invalid(1);
  DeviceBuffer<gpu::TaskLosses<S>> result(1);
  for (auto* buf : {&logits, &dlogits, &dx, &dw, &db}) buf->poison();
  DeviceBuffer<unsigned char> lws(heads.loss_workspace_size(n)),
      bws(heads.backward_workspace_size(n));
  const gpu::HeadWeights<float> weights{{w.get(), 5, d}, {b.get(), 5}};
  heads.forward({x.get(), n, d}, {t.get(), n}, weights, {logits.get(), n, 3}, invalid.get());
  heads.loss({logits.get(), n, 3}, {t.get(), n}, {y.get(), n}, {}, result.get(),
             {dlogits.get(), n, 3}, {}, lws.get(), lws.size());
  heads.backward({dlogits.get(), n, 3}, {x.get(), n, d}, {t.get(), n}, weights, {dx.get(), n, d},
                 {{dw.get(), 5, d}, {db.get(), 5}, false}, bws.get(), bws.size());
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(invalid.download()[0], 2);  // rows 1 and 3
  const auto z = logits.download(), dz = dlogits.download(), gx = dx.download();
  for (index_t k = 0; k < 3; ++k) {
    EXPECT_TRUE(std::isnan(z[1 * 3 + k]));
    EXPECT_TRUE(std::isnan(z[3 * 3 + k]));
    for (index_t r : {1, 2, 3}) EXPECT_EQ(dz[r * 3 + k], 0.0f) << "row " << r;  // 2: bad label
  }
  for (index_t k = 0; k < d; ++k) {
    EXPECT_EQ(gx[1 * d + k], 0.0f);
    EXPECT_EQ(gx[3 * d + k], 0.0f);
  }
  const gpu::TaskLosses<S> got = result.download()[0];
  EXPECT_EQ(got.invalid_rows, 3);
  EXPECT_EQ(got.count[0], 2);
  EXPECT_EQ(got.count[1], 1);
  EXPECT_TRUE(std::isfinite(got.total));
  for (float v : dw.download()) EXPECT_TRUE(std::isfinite(v));
}

// dW's grid has a class tile per block in y, and CUDA allows 65,535 there:
// a head wider than 524,280 classes is covered by blocks that loop.
TEST(GpuTaskHeads, WeightGradientGridStaysWithinCudasLimits) {
  const dim3 small = gpu::detail::weight_grad_grid(300, 20, 3, true);
  EXPECT_EQ(small.x, 3u);  // 128 columns a block
  EXPECT_EQ(small.y, 3u);  // 8 classes a block
  EXPECT_EQ(small.z, 3u);
  EXPECT_EQ(gpu::detail::weight_grad_grid(300, 20, 3, false).x, 1u);  // db only
  EXPECT_EQ(gpu::detail::weight_grad_grid(8, 524'280, 1, true).y, 65'535u);
  EXPECT_EQ(gpu::detail::weight_grad_grid(8, 524'281, 1, true).y, 65'535u);
  EXPECT_EQ(gpu::detail::weight_grad_grid(8, index_t{1} << 31, 2, true).y, 65'535u);
}

// A head of 600,000 classes (past 524,280, where one block per class tile
// would need more than 65,535 blocks in y) beside a small one: dW, db and dx
// against float64 sums, every class written.
TEST(GpuTaskHeads, WeightGradientsOfAHeadWiderThanTheGridMatchFloat64) {
  MOEKIT_REQUIRE_GPU();
  using S = HeadSpec<2>;
  const index_t d = 5, n = 7, big = 600'000, width = big, total = big + 3;
  gpu::TaskHeadsConfig<S> config;
  config.d_model = d;
  config.classes = {big, 3};
  config.bias = true;
  const gpu::TaskHeads<S, float> heads(config);
  ASSERT_EQ(heads.total_classes(), total);
  const std::vector<std::int32_t> task_ids = {0, 1, 0, 0, 1, 0, 0};
  const auto x_h = moekit_test::random_floats(static_cast<std::size_t>(n * d), -1.0f, 1.0f, 41);
  const auto w_h = moekit_test::random_floats(static_cast<std::size_t>(total * d), -1.0f, 1.0f, 42);
  const auto dz_h =
      moekit_test::random_floats(static_cast<std::size_t>(n * width), -1.0f, 1.0f, 43);
  DeviceBuffer<float> x(x_h), w(w_h), dz(dz_h), b(static_cast<std::size_t>(total));
  DeviceBuffer<float> dx(static_cast<std::size_t>(n * d)), dw(static_cast<std::size_t>(total * d)),
      db(static_cast<std::size_t>(total));
  DeviceBuffer<std::int32_t> tasks(task_ids);
  for (auto* buf : {&dx, &dw, &db}) buf->poison();
  const std::size_t bytes = heads.backward_workspace_size(n);
  DeviceBuffer<unsigned char> workspace(bytes);
  heads.backward({dz.get(), n, width}, {x.get(), n, d}, {tasks.get(), n},
                 {{w.get(), total, d}, {b.get(), total}}, {dx.get(), n, d},
                 {{dw.get(), total, d}, {db.get(), total}, false}, workspace.get(), bytes);
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());

  const auto got_dw = dw.download(), got_db = db.download(), got_dx = dx.download();
  const index_t offset[2] = {0, big}, classes[2] = {big, 3};
  for (int h = 0; h < 2; ++h) {
    for (index_t c = 0; c < classes[h]; ++c) {
      double want_b = 0.0, size_b = 0.0;
      for (index_t i = 0; i < n; ++i) {
        if (task_ids[static_cast<std::size_t>(i)] != h) continue;
        want_b += dz_h[static_cast<std::size_t>(i * width + c)];
        size_b += std::fabs(dz_h[static_cast<std::size_t>(i * width + c)]);
      }
      const auto row = static_cast<std::size_t>(offset[h] + c);
      ASSERT_NEAR(got_db[row], want_b, 1e-6 * size_b + 1e-30)
          << "db of head " << h << " class " << c;
      for (index_t k = 0; k < d; ++k) {
        double want = 0.0, size = 0.0;
        for (index_t i = 0; i < n; ++i) {
          if (task_ids[static_cast<std::size_t>(i)] != h) continue;
          const double term = double(dz_h[static_cast<std::size_t>(i * width + c)]) *
                              x_h[static_cast<std::size_t>(i * d + k)];
          want += term;
          size += std::fabs(term);
        }
        ASSERT_NEAR(got_dw[row * static_cast<std::size_t>(d) + static_cast<std::size_t>(k)], want,
                    1e-6 * size + 1e-30)
            << "dw of head " << h << " class " << c << " column " << k;
      }
    }
  }
  // dx_i = sum over its head's classes of dz(i, c) w_c.
  for (index_t i = 0; i < n; ++i) {
    const int h = task_ids[static_cast<std::size_t>(i)];
    for (index_t k = 0; k < d; ++k) {
      double want = 0.0, size = 0.0;
      for (index_t c = 0; c < classes[h]; ++c) {
        const double term = double(dz_h[static_cast<std::size_t>(i * width + c)]) *
                            w_h[static_cast<std::size_t>((offset[h] + c) * d + k)];
        want += term;
        size += std::fabs(term);
      }
      ASSERT_NEAR(got_dx[static_cast<std::size_t>(i * d + k)], want, 1e-5 * size)
          << "dx(" << i << ", " << k << ")";
    }
  }
}

TEST(GpuTaskHeads, BadArgumentsThrowBeforeAnyLaunch) {
  using S = HeadSpec<3>;
  expect_error(
      [] {
        gpu::TaskHeads<S, float>({.d_model = 4, .classes = {2, 0, 3}});
      },
      Errc::kInvalidArgument, "config.classes[1]");
  expect_error(
      [] {
        gpu::TaskHeads<S, float>({.d_model = 0, .classes = {2, 1, 3}});
      },
      Errc::kInvalidArgument, "config.d_model");
  const gpu::TaskHeads<S, float> heads({.d_model = 4, .classes = {2, 5, 3}});
  const index_t n = 10;
  const MatrixView<const float> x(fake<float>(1), n, 4);
  const VectorView<const std::int32_t> tasks(fake<std::int32_t>(2), n),
      labels(fake<std::int32_t>(3), n);
  const gpu::HeadWeights<float> w{{fake<float>(4), 10, 4}, {fake<float>(5), 10}};
  const MatrixView<float> logits(fake<float>(6), n, 5);
  auto* result = fake<gpu::TaskLosses<S>>(7);
  void* ws = fake<void>(8);
  // forward
  expect_error(
      [&] {
        heads.forward(x, tasks, w, {fake<float>(6), n, 4});
      },
      Errc::kShapeMismatch, "logits");
  expect_error(
      [&] {
        heads.forward(x, {fake<std::int32_t>(2), n - 1}, w, logits);
      },
      Errc::kShapeMismatch, "tasks");
  expect_error([&] { heads.forward(x, {}, w, logits); }, Errc::kShapeMismatch, "tasks");
  expect_error(
      [&] {
        heads.forward(x, tasks, {{fake<float>(4), 9, 4}, w.b}, logits);
      },
      Errc::kShapeMismatch, "weights.w");
  expect_error(
      [&] {
        heads.forward(x, tasks, {w.w, {}}, logits);
      },
      Errc::kShapeMismatch, "weights.b");
  expect_error([&] { heads.forward({nullptr, n, 4}, tasks, w, logits); }, Errc::kNullPointer, "x");
  // loss
  const std::vector<float> bad_weights{1.0f, -1.0f, 1.0f}, log_vars{0.0f, kNaN, 0.0f};
  moekit::TaskWeights fixed;
  fixed.fixed = {bad_weights.data(), 3};
  expect_error([&] { heads.loss(logits, tasks, labels, fixed, result, {}, {}, ws, 1 << 20); },
               Errc::kInvalidArgument, "weighting.fixed[1]");
  moekit::TaskWeights unc;
  unc.kind = TaskWeighting::kUncertainty;
  unc.log_vars = {log_vars.data(), 3};
  expect_error([&] { heads.loss(logits, tasks, labels, unc, result, {}, {}, ws, 1 << 20); },
               Errc::kInvalidArgument, "weighting.log_vars[1]");
  expect_error(
      [&] {
        heads.loss(logits, tasks, {fake<std::int32_t>(3), 3}, {}, result, {}, {}, ws, 1 << 20);
      },
      Errc::kShapeMismatch, "labels");
  expect_error([&] { heads.loss(logits, tasks, labels, {}, nullptr, {}, {}, ws, 1 << 20); },
               Errc::kNullPointer, "result");
  expect_error(
      [&] {
        heads.loss(logits, tasks, labels, {}, result, {fake<float>(9), n, 4}, {}, ws, 1 << 20);
      },
      Errc::kShapeMismatch, "dlogits");
  expect_error([&] { heads.loss(logits, tasks, labels, {}, result, {}, {}, ws, 16); },
               Errc::kShapeMismatch, "workspace");
  expect_error([&] { heads.loss(logits, tasks, labels, {}, result, {}, {}, nullptr, 1 << 20); },
               Errc::kNullPointer, "workspace");
  expect_error(
      [&] { heads.loss(logits, tasks, labels, {}, result, {}, {}, fake<char>(8) + 4, 1 << 20); },
      Errc::kInvalidArgument, "aligned");
  // backward
  const gpu::HeadGrads<float> grads{{fake<float>(10), 10, 4}, {fake<float>(11), 10}, false};
  expect_error(
      [&] {
        heads.backward(logits, x, tasks, w, {fake<float>(12), n, 3}, grads, ws, 1 << 20);
      },
      Errc::kShapeMismatch, "dx");
  expect_error(
      [&] {
        heads.backward(logits, x, tasks, w, {}, {{fake<float>(10), 10, 3}, grads.db, false}, ws,
                       1 << 20);
      },
      Errc::kShapeMismatch, "grads.dw");
  expect_error([&] { heads.backward(logits, x, tasks, w, {}, grads, nullptr, 0); },
               Errc::kNullPointer, "workspace");
  const gpu::TaskHeads<S, float> no_bias({.d_model = 4, .classes = {2, 5, 3}, .bias = false});
  expect_error(
      [&] {
        no_bias.backward(logits, x, tasks, {w.w, {}}, {}, grads, ws, 1 << 20);
      },
      Errc::kInvalidArgument, "grads.db");
}

// A rejected call changes nothing on the device.
TEST(GpuTaskHeads, RejectedCallsLeaveOutputsUntouched) {
  MOEKIT_REQUIRE_GPU();
  using S = HeadSpec<2>;
  const gpu::TaskHeads<S, float> heads({.d_model = 4, .classes = {2, 3}});
  DeviceBuffer<float> x(8 * 4), w(5 * 4), b(5), logits(8 * 3);
  DeviceBuffer<std::int32_t> tasks(8);
  logits.poison();
  const auto before = logits.download();
  expect_error(
      [&] {
        heads.forward({x.get(), 8, 4}, {tasks.get(), 8}, {{w.get(), 5, 4}, {b.get(), 4}},
                      {logits.get(), 8, 3});
      },
      Errc::kShapeMismatch, "weights.b");
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  const auto after = logits.download();
  EXPECT_EQ(std::memcmp(before.data(), after.data(), before.size() * sizeof(float)), 0);
}

// ---- distillation -----------------------------------------------------------

template <class T>
void run_distillation(moekit::DistillationConfig config, std::int64_t n, std::int64_t c,
                      bool with_labels) {
  SCOPED_TRACE(std::string(moekit_test::type_name<T>()) + " n=" + std::to_string(n) +
               " C=" + std::to_string(c) + " alpha=" + std::to_string(config.alpha));
  auto s = moekit_test::random_floats(static_cast<std::size_t>(n * c), -4, 4, 21);
  auto t = moekit_test::random_floats(static_cast<std::size_t>(n * c), -4, 4, 22);
  const auto s_t = rounded<T>(s), t_t = rounded<T>(t);
  std::vector<std::int32_t> labels;
  std::mt19937 gen(23);
  if (with_labels) {
    for (std::int64_t i = 0; i < n; ++i) {
      labels.push_back(std::uniform_int_distribution<int>(0, static_cast<int>(c) - 1)(gen));
    }
  }
  std::vector<float> want_ds;
  const moekit::DistillationLoss want =
      moekit_test::cpu_distillation(config, s, t, n, c, labels, want_ds);

  DeviceBuffer<T> student(s_t), teacher(t_t), ds(static_cast<std::size_t>(n * c));
  DeviceBuffer<std::int32_t> y(labels);
  DeviceBuffer<moekit::DistillationLoss> loss(1);
  DeviceBuffer<std::int64_t> invalid(1);
  ds.poison();
  loss.poison();
  invalid.poison();
  gpu::DistillationArgs<T> args;
  args.config = config;
  args.student = {student.get(), n, c};
  args.teacher = {teacher.get(), n, c};
  args.labels = {labels.empty() ? nullptr : y.get(), static_cast<index_t>(labels.size())};
  args.dstudent = {ds.get(), n, c};
  args.loss = loss.get();
  args.invalid_labels = invalid.get();
  moekit_test::two_phase(
      [&](void* p, std::size_t& bytes) { return gpu::distillation_loss(p, bytes, args); });
  const moekit::DistillationLoss got = loss.download()[0];
  const double tol = tolerance<T>();
  EXPECT_LT(relative(got.loss, want.loss), tol);
  EXPECT_LT(relative(got.kl, want.kl), tol);
  EXPECT_LT(relative(got.ce, want.ce), tol);
  EXPECT_LT(relative_error(ds.download(), want_ds), tol);
  EXPECT_EQ(invalid.download()[0], 0);
  const auto ds0 = ds.download();
  moekit_test::two_phase(
      [&](void* p, std::size_t& bytes) { return gpu::distillation_loss(p, bytes, args); });
  const moekit::DistillationLoss again = loss.download()[0];
  EXPECT_EQ(std::memcmp(&again, &got, sizeof(got)), 0);
  EXPECT_EQ(std::memcmp(ds.download().data(), ds0.data(), ds0.size() * sizeof(T)), 0);
}

TEST(GpuDistillation, MatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  run_distillation<float>({2.0f, 0.5f}, 300, 10, true);
  run_distillation<float>({1.0f, 0.0f}, 129, 1000, true);
  run_distillation<float>({4.0f, 1.0f}, 77, 3, false);  // alpha = 1: no labels
  run_distillation<float>({0.5f, 0.3f}, 0, 5, true);    // n = 0
  run_distillation<__nv_bfloat16>({2.0f, 0.7f}, 260, 33, true);
  run_distillation<__half>({3.0f, 0.2f}, 64, 17, true);
}

TEST(GpuDistillation, BadLabelsAddNothingAndAreCounted) {
  MOEKIT_REQUIRE_GPU();
  const index_t n = 4, c = 3;
  DeviceBuffer<float> s(moekit_test::random_floats(n * c, -1, 1, 1)),
      t(moekit_test::random_floats(n * c, -1, 1, 2)), ds(n * c);
  DeviceBuffer<std::int32_t> y(std::vector<std::int32_t>{0, 3, -1, 2});
  DeviceBuffer<moekit::DistillationLoss> loss(1);
  DeviceBuffer<std::int64_t> invalid(1);
  ds.poison();
  gpu::DistillationArgs<float> args{{2.0f, 0.5f}, {s.get(), n, c},  {t.get(), n, c},
                                    {y.get(), n}, {ds.get(), n, c}, loss.get(),
                                    invalid.get()};
  moekit_test::two_phase(
      [&](void* p, std::size_t& bytes) { return gpu::distillation_loss(p, bytes, args); });
  EXPECT_EQ(invalid.download()[0], 2);
  const auto g = ds.download();
  for (index_t k = 0; k < c; ++k) {
    EXPECT_EQ(g[1 * c + k], 0.0f);
    EXPECT_EQ(g[2 * c + k], 0.0f);
    EXPECT_TRUE(std::isfinite(g[k]));
  }
  EXPECT_TRUE(std::isfinite(loss.download()[0].loss));
}

// TaskHeads' -inf padding of a head with fewer classes adds nothing to KL
// (the shared row function, issue 21 item 1); a NaN teacher gives a NaN loss.
TEST(GpuDistillation, MinusInfPaddingAddsNothingAndNaNTeacherIsNotFinite) {
  MOEKIT_REQUIRE_GPU();
  const index_t n = 5;
  const auto s3 = moekit_test::random_floats(n * 3, -0.1f, 0.1f, 31);
  const auto t3 = moekit_test::random_floats(n * 3, -0.1f, 0.1f, 32);
  std::vector<float> s5(n * 5, -kInf), t5(n * 5, -kInf);
  for (index_t i = 0; i < n; ++i) {
    for (index_t k = 0; k < 3; ++k) {
      s5[i * 5 + k] = s3[i * 3 + k];
      t5[i * 5 + k] = t3[i * 3 + k];
    }
  }
  const auto run = [&](const std::vector<float>& s, const std::vector<float>& t, index_t c) {
    DeviceBuffer<float> student(s), teacher(t), ds(static_cast<std::size_t>(n * c));
    DeviceBuffer<std::int32_t> y(std::vector<std::int32_t>(static_cast<std::size_t>(n), 1));
    DeviceBuffer<moekit::DistillationLoss> loss(1);
    gpu::DistillationArgs<float> args{{2.0f, 0.5f}, {student.get(), n, c}, {teacher.get(), n, c},
                                      {y.get(), n}, {ds.get(), n, c},      loss.get(),
                                      nullptr};
    moekit_test::two_phase(
        [&](void* p, std::size_t& bytes) { return gpu::distillation_loss(p, bytes, args); });
    return loss.download()[0];
  };
  const moekit::DistillationLoss three = run(s3, t3, 3), five = run(s5, t5, 5);
  EXPECT_GT(three.kl, 0.0);
  EXPECT_EQ(five.kl, three.kl);
  EXPECT_EQ(five.loss, three.loss);
  std::vector<float> nan_teacher = t3;
  nan_teacher[4] = kNaN;
  EXPECT_FALSE(std::isfinite(run(s3, nan_teacher, 3).loss));
}

TEST(GpuDistillation, BadArgumentsThrowBeforeAnyLaunch) {
  const index_t n = 8, c = 4;
  gpu::DistillationArgs<float> args{{2.0f, 0.5f},
                                    {fake<float>(1), n, c},
                                    {fake<float>(2), n, c},
                                    {fake<std::int32_t>(3), n},
                                    {},
                                    fake<moekit::DistillationLoss>(4)};
  void* ws = fake<void>(5);
  std::size_t bytes = 1 << 20;
  auto bad = args;
  bad.config.temperature = 0.0f;
  expect_error([&] { (void)gpu::distillation_loss(ws, bytes, bad); }, Errc::kInvalidArgument,
               "config.temperature");
  bad = args;
  bad.config.alpha = 1.5f;
  expect_error([&] { (void)gpu::distillation_loss(ws, bytes, bad); }, Errc::kInvalidArgument,
               "config.alpha");
  bad = args;
  bad.teacher = {fake<float>(2), n, c + 1};
  expect_error([&] { (void)gpu::distillation_loss(ws, bytes, bad); }, Errc::kShapeMismatch,
               "args.teacher");
  bad = args;
  bad.labels = {};
  expect_error([&] { (void)gpu::distillation_loss(ws, bytes, bad); }, Errc::kShapeMismatch,
               "args.labels");
  bad = args;
  bad.dstudent = {fake<float>(6), n - 1, c};
  expect_error([&] { (void)gpu::distillation_loss(ws, bytes, bad); }, Errc::kShapeMismatch,
               "args.dstudent");
  bad = args;
  bad.loss = nullptr;
  expect_error([&] { (void)gpu::distillation_loss(ws, bytes, bad); }, Errc::kNullPointer,
               "args.loss");
  std::size_t small = 8;
  expect_error([&] { (void)gpu::distillation_loss(ws, small, args); }, Errc::kShapeMismatch,
               "temp_storage_bytes");
  // The size query needs no valid argument but the row count.
  std::size_t query = 0;
  EXPECT_EQ(gpu::distillation_loss<float>(nullptr, query, bad), cudaSuccess);
  EXPECT_GE(query, 256u);
}

// ---- early exit ---------------------------------------------------------------

// k exits' logits for every sample (n x C each), sharpening with depth so
// that rules pass at different exits; NaN rows and a +inf row included.
std::vector<std::vector<float>> exit_logits(int exits, std::int64_t n, std::int64_t c) {
  std::vector<std::vector<float>> out;
  std::mt19937 gen(31);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<int> target(static_cast<std::size_t>(n));
  for (auto& t : target) t = std::uniform_int_distribution<int>(0, static_cast<int>(c) - 1)(gen);
  for (int i = 0; i < exits; ++i) {
    std::vector<float> z(static_cast<std::size_t>(n * c));
    for (std::int64_t r = 0; r < n; ++r) {
      for (std::int64_t k = 0; k < c; ++k) z[r * c + k] = normal(gen);
      // Deeper exits agree more on the target class (patience) and sharpen.
      if (r % 3 != 0) z[r * c + target[r]] += 0.8f * static_cast<float>(i + 1);
    }
    if (n > 9) {
      for (std::int64_t k = 0; k < c; ++k) z[5 * c + k] = kNaN;  // all NaN: uniform
      z[9 * c + 1] = kNaN;                                       // one NaN: -inf
      z[7 * c + 0] = kInf;
    }
    out.push_back(std::move(z));
  }
  return out;
}

template <class T>
void run_early_exit(const moekit::EarlyExitConfig& config, std::int64_t n, std::int64_t c) {
  SCOPED_TRACE(std::string(moekit_test::type_name<T>()) + " patience " +
               std::to_string(config.criteria.patience));
  auto logits = exit_logits(config.num_exits, n, c);
  std::vector<std::vector<T>> logits_t;
  for (auto& z : logits) logits_t.push_back(rounded<T>(z));
  const moekit_test::ExitRun want = moekit_test::cpu_early_exit(config, logits, n, c);

  const gpu::EarlyExit exits(config);
  DeviceBuffer<std::int32_t> prediction(n), exit(n), previous(n), agree(n);
  DeviceBuffer<float> confidence(n);
  DeviceBuffer<index_t> original(n), kept(n), live(1);
  for (auto* b : {&prediction, &exit, &previous, &agree}) b->poison();
  confidence.poison();
  original.poison();
  const gpu::ExitState state{{original.get(), n}, {previous.get(), n}, {agree.get(), n}};
  const gpu::ExitResults results{{prediction.get(), n}, {confidence.get(), n}, {exit.get(), n}};
  exits.begin(n, state, results);
  // Activations that ride along: row r holds sample r's index in every column.
  const index_t width = 5;
  std::vector<float> act(static_cast<std::size_t>(n * width));
  for (index_t r = 0; r < n; ++r) {
    for (index_t k = 0; k < width; ++k) act[r * width + k] = static_cast<float>(r * 10 + k);
  }
  DeviceBuffer<float> act_a(act), act_b(act.size());
  DeviceBuffer<float>* cur = &act_a;
  DeviceBuffer<float>* next = &act_b;
  index_t m = n;
  std::vector<index_t> live_original(static_cast<std::size_t>(n));
  for (index_t r = 0; r < n; ++r) live_original[r] = r;
  for (int i = 0; i < config.num_exits && m > 0; ++i) {
    // The exit classifier's output for the live rows (built on the host here).
    std::vector<T> z(static_cast<std::size_t>(m * c));
    for (index_t r = 0; r < m; ++r) {
      for (index_t k = 0; k < c; ++k) z[r * c + k] = logits_t[i][live_original[r] * c + k];
    }
    DeviceBuffer<T> dz(z);
    kept.poison();
    next->poison();
    moekit_test::two_phase([&](void* p, std::size_t& bytes) {
      return exits.step<T>(p, bytes, i, {dz.get(), m, c}, state, results, {kept.get(), n},
                           live.get());
    });
    MOEKIT_CUDA_CHECK(gpu::gather_rows<float>({cur->get(), m, width}, {kept.get(), m}, live.get(),
                                              {next->get(), n, width}));
    MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
    m = live.download()[0];
    ASSERT_EQ(m, want.live[i]) << "exit " << i;
    const auto got_kept = kept.download(), got_original = original.download();
    const auto moved = next->download();
    for (index_t j = 0; j < m; ++j) {
      EXPECT_EQ(got_kept[j], want.kept[i][j]) << "exit " << i << " row " << j;
      EXPECT_EQ(got_original[j], want.original[i][j]) << "exit " << i << " row " << j;
      live_original[j] = got_original[j];
      for (index_t k = 0; k < width; ++k) {
        EXPECT_EQ(moved[j * width + k], static_cast<float>(got_original[j] * 10 + k));
      }
    }
    for (index_t j = m * width; j < n * width; ++j) EXPECT_TRUE(std::isnan(moved[j]));  // untouched
    std::swap(cur, next);
  }
  EXPECT_EQ(prediction.download(), want.prediction);
  EXPECT_EQ(exit.download(), want.exit);
  const auto conf = confidence.download();
  for (index_t r = 0; r < n; ++r) {
    EXPECT_NEAR(conf[r], want.confidence[r], 1e-6) << "sample " << r;
  }
}

TEST(GpuEarlyExit, ConfidenceAndEntropyMatchCpu) {
  MOEKIT_REQUIRE_GPU();
  moekit::EarlyExitConfig config;
  config.num_exits = 4;
  config.criteria.min_confidence = 0.8f;
  config.criteria.max_entropy = 0.4f;
  run_early_exit<float>(config, 700, 6);
  run_early_exit<__nv_bfloat16>(config, 300, 11);
}

TEST(GpuEarlyExit, PatienceAndMarginMatchCpu) {
  MOEKIT_REQUIRE_GPU();
  moekit::EarlyExitConfig config;
  config.num_exits = 5;
  config.criteria.patience = 2;
  config.criteria.min_margin = 0.9f;
  run_early_exit<float>(config, 513, 4);
  config.criteria.min_margin = kInf;
  config.criteria.patience = 1;
  run_early_exit<__half>(config, 200, 3);
}

TEST(GpuEarlyExit, NaNLogitsFollowTheRoutingRule) {
  MOEKIT_REQUIRE_GPU();
  // One exit: every row leaves there with the exit scores of its logits.
  const index_t n = 3, c = 4;
  const std::vector<float> z{kNaN, kNaN, kNaN, kNaN,   // uniform: confidence 1/4, class 0
                             0.5f, kNaN, 2.0f, 1.0f,   // NaN counts as -inf
                             kInf, 1.0f, kInf, kNaN};  // mass split over the +inf entries
  DeviceBuffer<float> logits(z), confidence(n);
  DeviceBuffer<std::int32_t> prediction(n), exit(n), previous(n), agree(n);
  DeviceBuffer<index_t> original(n), kept(n), live(1);
  const gpu::EarlyExit exits({{}, 1});
  const gpu::ExitState state{{original.get(), n}, {previous.get(), n}, {agree.get(), n}};
  const gpu::ExitResults results{{prediction.get(), n}, {confidence.get(), n}, {exit.get(), n}};
  exits.begin(n, state, results);
  moekit_test::two_phase([&](void* p, std::size_t& bytes) {
    return exits.step<float>(p, bytes, 0, {logits.get(), n, c}, state, results, {kept.get(), n},
                             live.get());
  });
  EXPECT_EQ(live.download()[0], 0);
  EXPECT_EQ(prediction.download(), (std::vector<std::int32_t>{0, 2, 0}));
  EXPECT_EQ(exit.download(), (std::vector<std::int32_t>{0, 0, 0}));
  const auto conf = confidence.download();
  EXPECT_EQ(conf[0], 0.25f);
  EXPECT_EQ(conf[2], 0.5f);
  EXPECT_EQ(conf[1], moekit::classify::exit_scores(z.data() + 4, c).confidence);
}

template <class T>
void run_multi_exit_loss(int exits, std::int64_t n, std::int64_t c, std::vector<float> weights) {
  SCOPED_TRACE(std::string(moekit_test::type_name<T>()) + " k=" + std::to_string(exits));
  std::vector<std::vector<float>> z;
  std::vector<std::vector<T>> z_t;
  for (int i = 0; i < exits; ++i) {
    z.push_back(moekit_test::random_floats(static_cast<std::size_t>(n * c), -3, 3, 40 + i));
    z_t.push_back(rounded<T>(z.back()));
  }
  std::vector<std::int32_t> labels;
  std::mt19937 gen(41);
  for (std::int64_t r = 0; r < n; ++r) {
    labels.push_back(std::uniform_int_distribution<int>(0, static_cast<int>(c) - 1)(gen));
  }
  std::vector<std::vector<float>> want_dz;
  std::vector<double> want_losses;
  const double want =
      moekit_test::cpu_multi_exit_loss(z, n, c, labels, weights, want_dz, want_losses);

  std::deque<DeviceBuffer<T>> dz_in, dz_out;  // deque: buffers never move
  std::vector<MatrixView<const T>> in;
  std::vector<MatrixView<T>> out;
  for (int i = 0; i < exits; ++i) {
    dz_in.emplace_back(z_t[i]);
    dz_out.emplace_back(static_cast<std::size_t>(n * c));
    dz_out.back().poison();
    in.emplace_back(dz_in.back().get(), n, c);
    out.emplace_back(dz_out.back().get(), n, c);
  }
  DeviceBuffer<std::int32_t> y(labels);
  DeviceBuffer<double> losses(exits), loss(1);
  losses.poison();
  loss.poison();
  gpu::MultiExitLossArgs<T> args;
  args.logits = in;
  args.labels = {y.get(), n};
  args.exit_weights = {weights.empty() ? nullptr : weights.data(),
                       static_cast<index_t>(weights.size())};
  args.dlogits = out;
  args.exit_losses = {losses.get(), exits};
  args.loss = loss.get();
  moekit_test::two_phase(
      [&](void* p, std::size_t& bytes) { return gpu::multi_exit_loss(p, bytes, args); });
  const double tol = tolerance<T>();
  EXPECT_LT(relative(loss.download()[0], want), tol);
  const auto got_losses = losses.download();
  for (int i = 0; i < exits; ++i) {
    EXPECT_LT(relative(got_losses[i], want_losses[i]), tol) << "exit " << i;
    EXPECT_LT(relative_error(dz_out[i].download(), want_dz[i]), tol) << "exit " << i;
  }
}

TEST(GpuMultiExitLoss, MatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  run_multi_exit_loss<float>(3, 400, 7, {});
  run_multi_exit_loss<float>(2, 129, 50, {0.25f, 2.0f});
  run_multi_exit_loss<__nv_bfloat16>(4, 300, 9, {});
}

TEST(GpuEarlyExit, BadArgumentsThrowBeforeAnyLaunch) {
  moekit::EarlyExitConfig bad_config;
  bad_config.num_exits = 2;
  bad_config.criteria.min_confidence = 1.5f;
  expect_error([&] { gpu::EarlyExit{bad_config}; }, Errc::kInvalidArgument,
               "config.criteria.min_confidence");
  expect_error([] { gpu::EarlyExit({{}, 0}); }, Errc::kInvalidArgument, "config.num_exits");
  moekit::EarlyExitConfig config;
  config.num_exits = 3;
  const gpu::EarlyExit exits(config);
  const index_t n = 16, m = 10;
  const gpu::ExitState state{
      {fake<index_t>(1), n}, {fake<std::int32_t>(2), n}, {fake<std::int32_t>(3), n}};
  const gpu::ExitResults results{
      {fake<std::int32_t>(4), n}, {fake<float>(5), n}, {fake<std::int32_t>(6), n}};
  const MatrixView<const float> logits(fake<float>(7), m, 4);
  const VectorView<index_t> kept(fake<index_t>(8), n);
  auto* live = fake<index_t>(9);
  void* ws = fake<void>(10);
  std::size_t bytes = 1 << 20;
  expect_error([&] { (void)exits.step(ws, bytes, 3, logits, state, results, kept, live); },
               Errc::kOutOfRange, "exit = 3");
  expect_error(
      [&] {
        (void)exits.step(ws, bytes, 0, logits, state, results, {fake<index_t>(8), 5}, live);
      },
      Errc::kShapeMismatch, "kept");
  expect_error([&] { (void)exits.step(ws, bytes, 0, logits, state, results, kept, nullptr); },
               Errc::kNullPointer, "num_live");
  gpu::ExitResults short_results = results;
  short_results.confidence = {fake<float>(5), n - 1};
  expect_error([&] { (void)exits.step(ws, bytes, 0, logits, state, short_results, kept, live); },
               Errc::kShapeMismatch, "results.confidence");
  gpu::ExitState small_state = state;
  small_state.agree = {fake<std::int32_t>(3), 4};
  expect_error([&] { (void)exits.step(ws, bytes, 0, logits, small_state, results, kept, live); },
               Errc::kShapeMismatch, "state");
  expect_error([&] { exits.begin(n, small_state, results); }, Errc::kShapeMismatch, "state");
  expect_error(
      [&] {
        (void)exits.step(ws, bytes, 0, MatrixView<const float>(fake<float>(7), m, 0), state,
                         results, kept, live);
      },
      Errc::kShapeMismatch, "logits");
  // gather_rows
  float* base = fake<float>(20);
  expect_error(
      [&] {
        (void)gpu::gather_rows<float>({base, n, 4}, {fake<index_t>(8), n}, live, {base + 8, n, 4});
      },
      Errc::kInvalidArgument, "overlap");
  expect_error(
      [&] {
        (void)gpu::gather_rows<float>({base, n, 4}, {fake<index_t>(8), n}, live,
                                      {fake<float>(40), n, 3});
      },
      Errc::kShapeMismatch, "dst");
  expect_error(
      [&] {
        (void)gpu::gather_rows<float>({base, n, 4}, {fake<index_t>(8), n}, nullptr,
                                      {fake<float>(40), n, 4});
      },
      Errc::kNullPointer, "num_live");
  // multi_exit_loss
  const MatrixView<const float> views[2] = {{fake<float>(30), n, 4}, {fake<float>(31), n, 4}};
  const std::vector<float> negative{1.0f, -2.0f}, zeros{0.0f, 0.0f};
  gpu::MultiExitLossArgs<float> args;
  args.logits = views;
  args.labels = {fake<std::int32_t>(32), n};
  args.loss = fake<double>(33);
  auto bad = args;
  bad.exit_weights = {negative.data(), 2};
  expect_error([&] { (void)gpu::multi_exit_loss(ws, bytes, bad); }, Errc::kInvalidArgument,
               "args.exit_weights[1]");
  bad.exit_weights = {zeros.data(), 2};
  expect_error([&] { (void)gpu::multi_exit_loss(ws, bytes, bad); }, Errc::kInvalidArgument,
               "sum to 0");
  bad = args;
  bad.labels = {fake<std::int32_t>(32), n - 1};
  expect_error([&] { (void)gpu::multi_exit_loss(ws, bytes, bad); }, Errc::kShapeMismatch,
               "args.labels");
  bad = args;
  bad.loss = nullptr;
  expect_error([&] { (void)gpu::multi_exit_loss(ws, bytes, bad); }, Errc::kNullPointer,
               "args.loss");
  const MatrixView<const float> uneven[2] = {{fake<float>(30), n, 4}, {fake<float>(31), n, 5}};
  bad = args;
  bad.logits = uneven;
  expect_error([&] { (void)gpu::multi_exit_loss(ws, bytes, bad); }, Errc::kShapeMismatch,
               "args.logits[1]");
}

}  // namespace
