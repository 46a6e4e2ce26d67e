// CUDA LoRA (moekit/cuda/lora.cuh) against the CPU backend (cpu::LoraLinear,
// cpu::LoraBank through cpu_reference_lora.cpp) on fresh random inputs:
// forward, backward, grouping, init and merging; frozen, accumulated and
// poisoned outputs; 1, 8 and 64 adapters with uneven and empty loads; and the
// host-side argument checks, which run without a GPU.
#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu_reference.hpp"
#include "device_buffer.cuh"
#include "gpu_test.cuh"
#include "moekit/cuda/lora.cuh"

namespace moekit_test {
namespace {

using moekit::index_t;
using moekit::LoraSpec;
using moekit::MatrixView;
using moekit::VectorView;

// ||got - want|| / ||want|| over all elements.
double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

template <class T>
std::vector<T> to_device_type(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = from_float<T>(v[i]);
  return out;
}
template <class T>
std::vector<float> to_host_float(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = to_float(v[i]);
  return out;
}
// Values rounded through T, so the CPU sees exactly what the GPU reads.
template <class T>
std::vector<float> rounded(std::vector<float> v) {
  for (float& x : v) x = to_float(from_float<T>(x));
  return v;
}

// Adapter ids for n rows over N adapters: uneven (adapter i drawn with
// weight i + 1, so low ids are rare), adapters N / 2 and (for N > 2) 1 left
// empty, and about a tenth of the rows without an adapter (-1).
std::vector<std::int32_t> uneven_ids(std::int64_t n, std::int64_t adapters, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<double> weight(static_cast<std::size_t>(adapters));
  for (std::int64_t i = 0; i < adapters; ++i) weight[static_cast<std::size_t>(i)] = double(i + 1);
  if (adapters > 1) weight[static_cast<std::size_t>(adapters / 2)] = 0.0;
  if (adapters > 2) weight[1] = 0.0;
  std::discrete_distribution<int> pick(weight.begin(), weight.end());
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n));
  for (auto& id : ids) id = u(gen) < 0.1 ? -1 : pick(gen);
  return ids;
}

struct Shape {
  std::int64_t n, d_in, d_out, adapters;
  bool bank = true;      // false: LoraLinear
  bool base = true;      // the bank owns w and bias
  float dropout = 0.0f;  // in training
  bool accumulate = false;
  bool rslora = false;
};

// A case with fresh random values, rounded through T.
template <int R, class T>
LoraCase make_case(const Shape& s, std::uint32_t seed) {
  LoraCase c;
  c.n = s.n;
  c.d_in = s.d_in;
  c.d_out = s.d_out;
  c.adapters = s.adapters;
  c.alpha = 2.0f * R;
  c.rslora = s.rslora;
  c.dropout = s.dropout;
  c.training = s.dropout > 0.0f;
  c.accumulate = s.accumulate;
  c.seed = seed;
  c.step = 3;
  const auto u = [&](std::size_t count, std::uint32_t k) {
    return rounded<T>(random_floats(count, -1.0f, 1.0f, seed * 31 + k));
  };
  const auto n = static_cast<std::size_t>(s.n), din = static_cast<std::size_t>(s.d_in),
             dout = static_cast<std::size_t>(s.d_out), N = static_cast<std::size_t>(s.adapters);
  c.x = u(n * din, 1);
  c.dy = u(n * dout, 2);
  c.a = u(N * R * din, 3);
  c.b = u(N * dout * R, 4);  // not zero, so the adapter path shows
  if (!s.bank || s.base) {
    c.w = u(dout * din, 5);
    c.bias = u(dout, 6);
  } else {
    c.y0 = u(n * dout, 7);
    c.dx0 = u(n * din, 8);
  }
  if (s.accumulate) {
    c.da0 = random_floats(N * R * din, -1.0f, 1.0f, seed * 31 + 9);
    c.db0 = random_floats(N * dout * R, -1.0f, 1.0f, seed * 31 + 10);
  }
  if (s.bank) c.ids = uneven_ids(s.n, s.adapters, seed * 31 + 11);
  return c;
}

// The device side of one case: inputs uploaded, outputs poisoned.
template <int R, class T>
struct DeviceCase {
  explicit DeviceCase(const LoraCase& c)
      : n(c.n),
        x(to_device_type<T>(c.x)),
        dy(to_device_type<T>(c.dy)),
        w(to_device_type<T>(c.w)),
        bias(to_device_type<T>(c.bias)),
        a(to_device_type<T>(c.a)),
        b(to_device_type<T>(c.b)),
        ids(c.ids),
        order(c.ids.size()),
        offsets(c.ids.empty() ? 0 : static_cast<std::size_t>(c.adapters + 1)),
        y(static_cast<std::size_t>(c.n * c.d_out)),
        h(static_cast<std::size_t>(c.n * R)),
        dx(static_cast<std::size_t>(c.n * c.d_in)),
        da(static_cast<std::size_t>(c.adapters * R * c.d_in)),
        db(static_cast<std::size_t>(c.adapters * c.d_out * R)),
        d_in(c.d_in),
        d_out(c.d_out),
        adapters(c.adapters) {
    if (c.w.empty()) {
      y.upload(to_device_type<T>(c.y0));
      dx.upload(to_device_type<T>(c.dx0));
    } else {
      y.poison();
      dx.poison();
    }
    h.poison();
    if (c.accumulate) {
      da.upload(c.da0);
      db.upload(c.db0);
    } else {
      da.poison();
      db.poison();
    }
    order.poison();
    offsets.poison();
  }

  moekit::gpu::LoraWeights<T> weights() const {
    moekit::gpu::LoraWeights<T> wt;
    if (w.size() > 0) {
      wt.w = {w.get(), d_out, d_in};
      wt.bias = {bias.get(), d_out};
    }
    wt.a = {a.get(), adapters * R, d_in};
    wt.b = {b.get(), adapters * d_out, R};
    return wt;
  }
  moekit::gpu::LoraRows rows() const {
    return {{ids.get(), n}, {order.get(), n}, {offsets.get(), adapters + 1}};
  }
  moekit::gpu::LoraGrads grads(bool accumulate) const {
    return {{da.get(), adapters * R, d_in}, {db.get(), adapters * d_out, R}, accumulate};
  }

  std::int64_t n;
  DeviceBuffer<T> x, dy, w, bias, a, b;
  DeviceBuffer<std::int32_t> ids;
  DeviceBuffer<index_t> order, offsets;
  DeviceBuffer<T> y;
  DeviceBuffer<float> h;
  DeviceBuffer<T> dx;
  DeviceBuffer<float> da, db;
  std::int64_t d_in, d_out, adapters;
};

// forward + backward of one case on the GPU (bank: group first).
template <int R, class T>
void run_gpu(const LoraCase& c, DeviceCase<R, T>& g, cublasHandle_t handle) {
  const moekit::LoraStep step{c.training, c.seed, c.step};
  if (c.ids.empty()) {
    const moekit::gpu::LoraLinear<LoraSpec<R>, T> lora(
        {c.d_in, c.d_out, c.alpha, c.rslora, c.dropout});
    DeviceBuffer<unsigned char> ws(lora.workspace_size(c.n) + 1);
    ws.poison();
    lora.forward(handle, {g.x.get(), c.n, c.d_in}, g.weights(), {g.y.get(), c.n, c.d_out},
                 {g.h.get(), c.n, R}, step, ws.get(), ws.size());
    lora.backward(handle, {g.dy.get(), c.n, c.d_out}, {g.x.get(), c.n, c.d_in}, g.weights(),
                  {g.h.get(), c.n, R}, step, {g.dx.get(), c.n, c.d_in}, g.grads(c.accumulate),
                  ws.get(), ws.size());
  } else {
    const moekit::gpu::LoraBank<LoraSpec<R>, T> bank(
        {c.d_in, c.d_out, c.adapters, c.alpha, c.rslora, c.dropout});
    DeviceBuffer<unsigned char> gws(bank.group_workspace_size(c.n) + 1);
    gws.poison();
    bank.group({g.ids.get(), c.n}, {g.order.get(), c.n}, {g.offsets.get(), c.adapters + 1}, nullptr,
               gws.get(), gws.size());
    DeviceBuffer<unsigned char> ws(bank.workspace_size(c.n) + 1);
    ws.poison();
    bank.forward(handle, {g.x.get(), c.n, c.d_in}, g.rows(), g.weights(), {g.y.get(), c.n, c.d_out},
                 {g.h.get(), c.n, R}, step, ws.get(), ws.size());
    bank.backward(handle, {g.dy.get(), c.n, c.d_out}, {g.x.get(), c.n, c.d_in}, g.rows(),
                  g.weights(), {g.h.get(), c.n, R}, step, {g.dx.get(), c.n, c.d_in},
                  g.grads(c.accumulate), ws.get(), ws.size());
  }
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
}

template <int R, class T>
void compare_with_cpu(const Shape& s, std::uint32_t seed) {
  SCOPED_TRACE(std::string(type_name<T>()) + " R=" + std::to_string(R) +
               " n=" + std::to_string(s.n) + " N=" + std::to_string(s.adapters) +
               (s.bank ? (s.base ? " bank+base" : " bank") : " linear") +
               (s.dropout > 0 ? " dropout" : "") + (s.accumulate ? " accumulate" : ""));
  const LoraCase c = make_case<R, T>(s, seed);
  const LoraResult want = cpu_lora<R>(c);
  DeviceCase<R, T> g(c);
  Cublas cublas;
  run_gpu<R, T>(c, g, cublas.get());
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-2;
  EXPECT_LT(relative_error(to_host_float(g.y.download()), want.y), tol) << "y";
  EXPECT_LT(relative_error(g.h.download(), want.h), tol) << "h";
  EXPECT_LT(relative_error(to_host_float(g.dx.download()), want.dx), tol) << "dx";
  EXPECT_LT(relative_error(g.da.download(), want.da), tol) << "da";
  EXPECT_LT(relative_error(g.db.download(), want.db), tol) << "db";
  if (s.bank) {
    const std::vector<index_t> order = g.order.download(), offsets = g.offsets.download();
    EXPECT_EQ(offsets, std::vector<index_t>(want.offsets.begin(), want.offsets.end()));
    EXPECT_EQ(order, std::vector<index_t>(want.order.begin(), want.order.end()));
  }
  if (s.accumulate) {  // an adapter without rows keeps its gradient bit for bit
    const std::vector<float> da = g.da.download(), db = g.db.download();
    for (std::int64_t i = 0; i < s.adapters; ++i) {
      if (want.offsets[static_cast<std::size_t>(i + 1)] !=
          want.offsets[static_cast<std::size_t>(i)])
        continue;
      for (std::int64_t k = i * R * s.d_in; k < (i + 1) * R * s.d_in; ++k)
        ASSERT_EQ(da[static_cast<std::size_t>(k)], c.da0[static_cast<std::size_t>(k)]) << k;
      for (std::int64_t k = i * s.d_out * R; k < (i + 1) * s.d_out * R; ++k)
        ASSERT_EQ(db[static_cast<std::size_t>(k)], c.db0[static_cast<std::size_t>(k)]) << k;
    }
  }
}

// ---- against the CPU backend ----------------------------------------------------

TEST(CudaLora, LinearMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  compare_with_cpu<8, float>({.n = 300, .d_in = 96, .d_out = 80, .adapters = 1, .bank = false}, 1);
  compare_with_cpu<1, float>({.n = 33, .d_in = 17, .d_out = 5, .adapters = 1, .bank = false}, 2);
  compare_with_cpu<16, float>(
      {.n = 257, .d_in = 128, .d_out = 64, .adapters = 1, .bank = false, .dropout = 0.25f}, 3);
  compare_with_cpu<72, float>(
      {.n = 70, .d_in = 200, .d_out = 136, .adapters = 1, .bank = false, .rslora = true}, 4);
}

TEST(CudaLora, BankMatchesCpuFp32) {
  MOEKIT_REQUIRE_GPU();
  for (const std::int64_t adapters : {1, 8, 64}) {
    compare_with_cpu<16, float>({.n = 1000, .d_in = 256, .d_out = 192, .adapters = adapters}, 10);
    compare_with_cpu<8, float>(
        {.n = 517, .d_in = 64, .d_out = 96, .adapters = adapters, .base = false}, 11);
  }
  compare_with_cpu<1, float>({.n = 77, .d_in = 33, .d_out = 7, .adapters = 3}, 12);
  compare_with_cpu<72, float>({.n = 300, .d_in = 120, .d_out = 88, .adapters = 5}, 13);
  // No rows: outputs untouched, every adapter's gradient 0.
  compare_with_cpu<8, float>({.n = 0, .d_in = 32, .d_out = 16, .adapters = 4}, 14);
  compare_with_cpu<8, float>({.n = 0, .d_in = 32, .d_out = 16, .adapters = 1, .bank = false}, 15);
}

TEST(CudaLora, BankMatchesCpuWithDropoutAndAccumulate) {
  MOEKIT_REQUIRE_GPU();
  compare_with_cpu<16, float>({.n = 640, .d_in = 128, .d_out = 128, .adapters = 8, .dropout = 0.3f},
                              20);
  compare_with_cpu<8, float>(
      {.n = 640, .d_in = 128, .d_out = 64, .adapters = 64, .base = false, .accumulate = true}, 21);
  compare_with_cpu<16, float>({.n = 300,
                               .d_in = 64,
                               .d_out = 64,
                               .adapters = 8,
                               .base = false,
                               .dropout = 0.5f,
                               .accumulate = true},
                              22);
}

// Many rows on one adapter: the gradient's rows are split over extra blocks
// and their partial sums added in a second kernel.
TEST(CudaLora, SplitGradientSumsMatchCpu) {
  MOEKIT_REQUIRE_GPU();
  compare_with_cpu<16, float>({.n = 8192, .d_in = 256, .d_out = 128, .adapters = 1}, 30);
  compare_with_cpu<16, float>(
      {.n = 8192, .d_in = 128, .d_out = 256, .adapters = 1, .bank = false, .accumulate = true}, 31);
  compare_with_cpu<16, float>({.n = 4096, .d_in = 256, .d_out = 128, .adapters = 4}, 32);
}

TEST(CudaLora, HalfPrecisionMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  compare_with_cpu<16, __nv_bfloat16>({.n = 1000, .d_in = 256, .d_out = 256, .adapters = 64}, 40);
  compare_with_cpu<16, __half>({.n = 1000, .d_in = 256, .d_out = 128, .adapters = 8}, 41);
  compare_with_cpu<16, __nv_bfloat16>(
      {.n = 400, .d_in = 256, .d_out = 256, .adapters = 1, .bank = false, .dropout = 0.1f}, 42);
  // Rows of 100 bf16 are not 16-byte multiples: the scalar kernels.
  compare_with_cpu<8, __nv_bfloat16>({.n = 200, .d_in = 100, .d_out = 60, .adapters = 8}, 43);
  compare_with_cpu<72, __half>({.n = 200, .d_in = 128, .d_out = 64, .adapters = 4}, 44);
}

// ---- grouping -------------------------------------------------------------------------

TEST(CudaLora, GroupCountsInvalidIdsAndTreatsThemAsNone) {
  MOEKIT_REQUIRE_GPU();
  const std::int64_t n = 50, N = 4;
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n));
  for (std::int64_t t = 0; t < n; ++t)
    ids[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t % (N + 1)) - 1;  // -1 .. N - 1
  ids[3] = 4;                                                                       // == N: invalid
  ids[9] = -7;                                                                      // invalid
  ids[10] = 1000;                                                                   // invalid
  const moekit::gpu::LoraBank<LoraSpec<4>, float> bank({.d_in = 8, .d_out = 8, .num_adapters = N});
  DeviceBuffer<std::int32_t> d_ids(ids);
  DeviceBuffer<index_t> order(static_cast<std::size_t>(n)),
      offsets(static_cast<std::size_t>(N + 1));
  DeviceBuffer<std::int64_t> invalid(1);
  DeviceBuffer<unsigned char> ws(bank.group_workspace_size(n));
  order.poison();
  offsets.poison();
  invalid.poison();
  bank.group({d_ids.get(), n}, {order.get(), n}, {offsets.get(), N + 1}, invalid.get(), ws.get(),
             ws.size());
  const std::vector<index_t> got_order = order.download(), got_offsets = offsets.download();
  EXPECT_EQ(invalid.download()[0], 3);
  // Expected: stable by id, ids outside [0, N) listed nowhere.
  std::vector<index_t> want_order, want_offsets{0};
  for (std::int32_t i = 0; i < N; ++i) {
    for (std::int64_t t = 0; t < n; ++t) {
      if (ids[static_cast<std::size_t>(t)] == i) want_order.push_back(t);
    }
    want_offsets.push_back(static_cast<index_t>(want_order.size()));
  }
  want_order.resize(static_cast<std::size_t>(n), -1);
  EXPECT_EQ(got_order, want_order);
  EXPECT_EQ(got_offsets, want_offsets);

  // No rows: offsets all 0, nothing else touched.
  offsets.poison();
  invalid.poison();
  bank.group({d_ids.get(), 0}, {order.get(), 0}, {offsets.get(), N + 1}, invalid.get(), nullptr, 0);
  EXPECT_EQ(offsets.download(), std::vector<index_t>(static_cast<std::size_t>(N + 1), 0));
  EXPECT_EQ(invalid.download()[0], 0);
}

// ---- frozen outputs, determinism, graphs -------------------------------------------

TEST(CudaLora, FrozenOutputsAreNotWritten) {
  MOEKIT_REQUIRE_GPU();
  constexpr int R = 8;
  const LoraCase c = make_case<R, float>({.n = 200, .d_in = 64, .d_out = 32, .adapters = 8}, 50);
  DeviceCase<R, float> g(c);
  Cublas cublas;
  const moekit::gpu::LoraBank<LoraSpec<R>, float> bank({c.d_in, c.d_out, c.adapters, c.alpha});
  DeviceBuffer<unsigned char> gws(bank.group_workspace_size(c.n)), ws(bank.workspace_size(c.n));
  bank.group({g.ids.get(), c.n}, {g.order.get(), c.n}, {g.offsets.get(), c.adapters + 1}, nullptr,
             gws.get(), gws.size());
  // Inference: no saved h; then a backward wanting only da.
  bank.forward(cublas.get(), {g.x.get(), c.n, c.d_in}, g.rows(), g.weights(),
               {g.y.get(), c.n, c.d_out}, {}, {}, ws.get(), ws.size());
  moekit::gpu::LoraGrads only_da = g.grads(false);
  only_da.db = {};
  bank.backward(cublas.get(), {g.dy.get(), c.n, c.d_out}, {g.x.get(), c.n, c.d_in}, g.rows(),
                g.weights(), {}, {}, {}, only_da, ws.get(), ws.size());
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  for (float v : g.h.download()) ASSERT_TRUE(std::isnan(v));
  for (float v : g.db.download()) ASSERT_TRUE(std::isnan(v));
  for (float v : g.dx.download()) ASSERT_TRUE(std::isnan(v));
  const LoraResult want = cpu_lora<R>(c);
  EXPECT_LT(relative_error(g.y.download(), want.y), 1e-5);
  EXPECT_LT(relative_error(g.da.download(), want.da), 1e-5);
}

TEST(CudaLora, RunsAreBitIdenticalAndForwardCapturesIntoAGraph) {
  MOEKIT_REQUIRE_GPU();
  constexpr int R = 16;
  const LoraCase c =
      make_case<R, __nv_bfloat16>({.n = 2048, .d_in = 512, .d_out = 512, .adapters = 8}, 60);
  Cublas cublas;
  // cuBLAS must not allocate inside a capture: give it its workspace.
  DeviceBuffer<unsigned char> cublas_ws(std::size_t{32} << 20);
  MOEKIT_CUBLAS_CHECK(cublasSetWorkspace(cublas.get(), cublas_ws.get(), cublas_ws.size()));
  const moekit::gpu::LoraBank<LoraSpec<R>, __nv_bfloat16> bank(
      {c.d_in, c.d_out, c.adapters, c.alpha});
  const auto run = [&](bool graph) {
    DeviceCase<R, __nv_bfloat16> g(c);
    DeviceBuffer<unsigned char> gws(bank.group_workspace_size(c.n)), ws(bank.workspace_size(c.n));
    cudaStream_t stream = nullptr;
    MOEKIT_CUDA_CHECK(cudaStreamCreate(&stream));
    const auto body = [&] {
      bank.group({g.ids.get(), c.n}, {g.order.get(), c.n}, {g.offsets.get(), c.adapters + 1},
                 nullptr, gws.get(), gws.size(), stream);
      bank.forward(cublas.get(), {g.x.get(), c.n, c.d_in}, g.rows(), g.weights(),
                   {g.y.get(), c.n, c.d_out}, {g.h.get(), c.n, R}, {}, ws.get(), ws.size(), stream);
    };
    if (graph) {
      cudaGraph_t captured = nullptr;
      cudaGraphExec_t exec = nullptr;
      MOEKIT_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      body();
      MOEKIT_CUDA_CHECK(cudaStreamEndCapture(stream, &captured));
      MOEKIT_CUDA_CHECK(cudaGraphInstantiate(&exec, captured, 0));
      MOEKIT_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
      MOEKIT_CUDA_CHECK(cudaGraphExecDestroy(exec));
      MOEKIT_CUDA_CHECK(cudaGraphDestroy(captured));
    } else {
      body();
      MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    MOEKIT_CUDA_CHECK(cudaStreamDestroy(stream));
    const std::vector<__nv_bfloat16> y = g.y.download();
    std::vector<std::uint16_t> bits(y.size());
    std::memcpy(bits.data(), y.data(), y.size() * sizeof(std::uint16_t));
    return std::make_pair(bits, g.h.download());
  };
  const auto first = run(false), second = run(false), graphed = run(true);
  EXPECT_EQ(first.first, second.first);
  EXPECT_EQ(first.second, second.second);
  EXPECT_EQ(first.first, graphed.first);
  EXPECT_EQ(first.second, graphed.second);
}

// ---- init and merging -------------------------------------------------------------------

TEST(CudaLora, InitGivesTheCpuValues) {
  MOEKIT_REQUIRE_GPU();
  constexpr int R = 16;
  const std::int64_t N = 3, d_in = 70, d_out = 40;
  const auto [want_a, want_b] = cpu_lora_init<R>(N, d_in, d_out, 99);
  const moekit::gpu::LoraBank<LoraSpec<R>, float> bank({d_in, d_out, N});
  DeviceBuffer<float> a(want_a.size()), b(want_b.size());
  a.poison();
  b.poison();
  bank.init({a.get(), N * R, d_in}, {b.get(), N * d_out, R}, {.seed = 99});
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(a.download(), want_a);
  EXPECT_EQ(b.download(), want_b);
  // One adapter re-initialised alone gets the same values.
  a.poison();
  bank.init_adapter(1, {a.get(), N * R, d_in}, {b.get(), N * d_out, R}, {.seed = 99});
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = a.download();
  for (std::int64_t k = R * d_in; k < 2 * R * d_in; ++k) {
    ASSERT_EQ(got[static_cast<std::size_t>(k)], want_a[static_cast<std::size_t>(k)]) << k;
  }
  EXPECT_TRUE(std::isnan(got[0]));  // other adapters untouched
}

TEST(CudaLora, MergeUnmergeAndSafeMerge) {
  MOEKIT_REQUIRE_GPU();
  constexpr int R = 8;
  LoraCase c = make_case<R, float>({.n = 1, .d_in = 96, .d_out = 64, .adapters = 4}, 70);
  const moekit::gpu::LoraBank<LoraSpec<R>, float> bank({c.d_in, c.d_out, c.adapters, c.alpha});
  DeviceBuffer<float> w(c.w), a(c.a), b(c.b);
  const MatrixView<float> wv(w.get(), c.d_out, c.d_in);
  const MatrixView<const float> av(a.get(), c.adapters * R, c.d_in);
  const MatrixView<const float> bv(b.get(), c.adapters * c.d_out, R);
  bank.merge(2, wv, av, bv);
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> merged = cpu_lora_merge<R>(c, 2, 1.0f);
  EXPECT_LT(relative_error(w.download(), merged), 1e-6);
  bank.unmerge(2, wv, av, bv);
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_LT(relative_error(w.download(), c.w), 1e-6);

  DeviceBuffer<unsigned char> ws(bank.merge_workspace_size());
  w.upload(c.w);
  bank.safe_merge(1, wv, av, bv, ws.get(), ws.size());
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_LT(relative_error(w.download(), cpu_lora_merge<R>(c, 1, 1.0f)), 1e-6);

  // A NaN in adapter 3's b: safe_merge refuses and w keeps every bit.
  c.b[static_cast<std::size_t>((3 * c.d_out + 5) * R + 2)] = std::nanf("");
  b.upload(c.b);
  w.upload(c.w);
  expect_error([&] { bank.safe_merge(3, wv, av, bv, ws.get(), ws.size()); },
               moekit::Errc::kNonFinite, "w(5, 0)");
  EXPECT_EQ(w.download(), c.w);
}

// ---- host-side checks (no GPU needed) ---------------------------------------------

TEST(CudaLoraHost, ConfigAndShapesAreChecked) {
  using moekit::Errc;
  using Bank = moekit::gpu::LoraBank<LoraSpec<8>, float>;
  expect_error([] { Bank({.d_in = 0, .d_out = 4, .num_adapters = 2}); }, Errc::kInvalidArgument,
               "config.d_in");
  expect_error([] { Bank({.d_in = 4, .d_out = 4, .num_adapters = 0}); }, Errc::kInvalidArgument,
               "num_adapters");
  expect_error([] { Bank({.d_in = 4, .d_out = 4, .num_adapters = 1, .dropout = 1.0f}); },
               Errc::kInvalidArgument, "dropout");
  using Linear = moekit::gpu::LoraLinear<LoraSpec<8>, __nv_bfloat16>;
  expect_error([] { Linear({.d_in = 4, .d_out = 4, .alpha = INFINITY}); }, Errc::kInvalidArgument,
               "alpha");

  const std::int64_t n = 10, d = 16, N = 4;
  const Bank bank({.d_in = d, .d_out = d, .num_adapters = N});
  const std::size_t bytes = bank.workspace_size(n);
  void* ws = fake<void>(1);
  const moekit::gpu::LoraRows rows{
      {fake<std::int32_t>(2), n}, {fake<index_t>(3), n}, {fake<index_t>(4), N + 1}};
  moekit::gpu::LoraWeights<float> weights{
      {}, {}, {fake<float>(5), N * 8, d}, {fake<float>(6), N * d, 8}};
  const MatrixView<const float> x(fake<float>(7), n, d);
  const MatrixView<float> y(fake<float>(8), n, d), h(fake<float>(9), n, 8);
  const auto forward = [&](const moekit::gpu::LoraWeights<float>& wt, MatrixView<const float> xx,
                           MatrixView<float> hh, std::size_t b) {
    bank.forward(nullptr, xx, rows, wt, y, hh, {}, ws, b);
  };
  // Rank mismatches are named as such.
  moekit::gpu::LoraWeights<float> bad = weights;
  bad.b = {fake<float>(6), N * d, 4};
  expect_error([&] { forward(bad, x, h, bytes); }, Errc::kShapeMismatch, "rank R = 8");
  expect_error(
      [&] {
        forward(weights, x, {fake<float>(9), n, 16}, bytes);
      },
      Errc::kShapeMismatch, "saved_h has 16 columns");
  bad = weights;
  bad.a = {fake<float>(5), N * 8 - 1, d};
  expect_error([&] { forward(bad, x, h, bytes); }, Errc::kShapeMismatch, "weights.a");
  expect_error(
      [&] {
        forward(weights, {fake<float>(7), n, d + 1}, h, bytes);
      },
      Errc::kShapeMismatch, "x has 17 columns");
  expect_error([&] { forward(weights, x, h, bytes - 1); }, Errc::kShapeMismatch, "workspace");
  // A base weight needs a cuBLAS handle; a bias needs the base weight.
  bad = weights;
  bad.w = {fake<float>(10), d, d};
  expect_error([&] { forward(bad, x, h, bytes); }, Errc::kNullPointer, "handle");
  bad = weights;
  bad.bias = {fake<float>(11), d};
  expect_error([&] { forward(bad, x, h, bytes); }, Errc::kInvalidArgument, "bias");
  // Row assignment of the wrong length.
  const moekit::gpu::LoraRows short_rows{{fake<std::int32_t>(2), n - 1}, rows.order, rows.offsets};
  expect_error([&] { bank.forward(nullptr, x, short_rows, weights, y, h, {}, ws, bytes); },
               Errc::kShapeMismatch, "rows.ids");
  // Backward: db needs saved_h; gradient shapes.
  const MatrixView<const float> dy(fake<float>(12), n, d);
  const MatrixView<float> dx(fake<float>(13), n, d);
  moekit::gpu::LoraGrads grads{{fake<float>(14), N * 8, d}, {fake<float>(15), N * d, 8}, false};
  expect_error([&] { bank.backward(nullptr, dy, x, rows, weights, {}, {}, dx, grads, ws, bytes); },
               Errc::kShapeMismatch, "saved_h");
  grads.da = {fake<float>(14), 8, d};
  expect_error([&] { bank.backward(nullptr, dy, x, rows, weights, h, {}, dx, grads, ws, bytes); },
               Errc::kShapeMismatch, "grads.da");
  // Merging: adapter out of range.
  const MatrixView<float> w(fake<float>(16), d, d);
  expect_error([&] { bank.merge(N, w, weights.a, weights.b); }, Errc::kOutOfRange, "adapter");
  // Grouping: offsets of the wrong length.
  expect_error(
      [&] {
        bank.group(rows.ids, {fake<index_t>(3), n}, {fake<index_t>(4), N}, nullptr, ws, 1 << 20);
      },
      Errc::kShapeMismatch, "offsets");
}

TEST(CudaLoraHost, LinearNeedsItsBaseWeight) {
  using moekit::Errc;
  const moekit::gpu::LoraLinear<LoraSpec<4>, float> lora({.d_in = 8, .d_out = 8});
  const moekit::gpu::LoraWeights<float> no_base{
      {}, {}, {fake<float>(1), 4, 8}, {fake<float>(2), 8, 4}};
  expect_error(
      [&] {
        lora.forward(nullptr, {fake<float>(3), 2, 8}, no_base, {fake<float>(4), 2, 8}, {}, {},
                     fake<void>(5), lora.workspace_size(2));
      },
      Errc::kShapeMismatch, "weights.w");
  // The adapter of a LoraLinear is R x d_in, named as a rank mismatch.
  const moekit::gpu::LoraWeights<float> wrong_rank{
      {fake<float>(6), 8, 8}, {}, {fake<float>(1), 8, 8}, {fake<float>(2), 8, 4}};
  expect_error(
      [&] {
        lora.forward(fake<cublasContext>(7), {fake<float>(3), 2, 8}, wrong_rank,
                     {fake<float>(4), 2, 8}, {}, {}, fake<void>(5), lora.workspace_size(2));
      },
      Errc::kShapeMismatch, "rank R = 4");
  EXPECT_EQ(lora.workspace_size(0), 0u);
  EXPECT_GT(lora.workspace_size(100), 100u * 4 * sizeof(float) - 1);
}

}  // namespace
}  // namespace moekit_test
