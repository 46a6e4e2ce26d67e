// gpu::ExpertFfn against a float64 reference written here (straight loops
// over each expert's rows, docs/index.md#adding-a-component): forward and backward, plain and
// gated, every activation, fp32 / bf16 / fp16, uneven and empty expert loads,
// frozen gradients, accumulation, rows past offsets[E] left alone. Outputs
// are poisoned before each run. Device tests skip without a GPU; the
// argument checks run everywhere (they throw before any CUDA call).
#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "device_buffer.cuh"
#include "gpu_test.cuh"
#include "moekit/cuda/expert_ffn.cuh"
#include "test_support.hpp"

namespace {

using moekit::Activation;
using moekit::Errc;
using moekit::FfnKind;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::VectorView;
using moekit_test::act64;
using moekit_test::act64_grad;
using moekit_test::DeviceBuffer;
using moekit_test::from_float;
using moekit_test::to_float;
namespace gpu = moekit::gpu;

// ---- the float64 reference --------------------------------------------------

// Row-major dense matrices in double.
struct Problem {
  int experts;
  index_t d, f, rows;  // rows = N, the buffer's rows (>= offsets[E])
  bool gated;
  Activation activation;
  std::vector<index_t> offsets;
  std::vector<double> x, w1, w3, w2, dy;  // N x d, (E f) x d, (E f) x d, (E d) x f, N x d
};

struct Reference {
  std::vector<double> y, a, g, dx, dw1, dw3, dw2;
};

Reference reference(const Problem& p) {
  const index_t d = p.d, f = p.f;
  Reference r;
  r.y.assign(p.rows * d, 0.0);
  r.a.assign(p.rows * f, 0.0);
  r.g.assign(p.rows * f, 0.0);
  r.dx.assign(p.rows * d, 0.0);
  r.dw1.assign(p.experts * f * d, 0.0);
  r.dw3.assign(p.experts * f * d, 0.0);
  r.dw2.assign(p.experts * d * f, 0.0);
  std::vector<double> h(f), dh(f), da(f), dg(f);
  for (int e = 0; e < p.experts; ++e) {
    for (index_t row = p.offsets[e]; row < p.offsets[e + 1]; ++row) {
      const double* x = &p.x[row * d];
      for (index_t j = 0; j < f; ++j) {
        double a = 0, g = 0;
        for (index_t i = 0; i < d; ++i) {
          a += x[i] * p.w1[(e * f + j) * d + i];
          if (p.gated) g += x[i] * p.w3[(e * f + j) * d + i];
        }
        r.a[row * f + j] = a;
        r.g[row * f + j] = g;
        h[j] = p.gated ? act64(p.activation, a) * g : act64(p.activation, a);
      }
      for (index_t k = 0; k < d; ++k) {
        double y = 0;
        for (index_t j = 0; j < f; ++j) y += h[j] * p.w2[(e * d + k) * f + j];
        r.y[row * d + k] = y;
      }
      const double* gy = &p.dy[row * d];
      for (index_t j = 0; j < f; ++j) {
        double s = 0;
        for (index_t k = 0; k < d; ++k) s += gy[k] * p.w2[(e * d + k) * f + j];
        dh[j] = s;
        const double a = r.a[row * f + j], g = r.g[row * f + j];
        da[j] = p.gated ? s * g * act64_grad(p.activation, a) : s * act64_grad(p.activation, a);
        dg[j] = p.gated ? s * act64(p.activation, a) : 0.0;
      }
      for (index_t k = 0; k < d; ++k) {
        for (index_t j = 0; j < f; ++j) r.dw2[(e * d + k) * f + j] += gy[k] * h[j];
      }
      for (index_t j = 0; j < f; ++j) {
        for (index_t i = 0; i < d; ++i) {
          r.dw1[(e * f + j) * d + i] += da[j] * x[i];
          if (p.gated) r.dw3[(e * f + j) * d + i] += dg[j] * x[i];
          r.dx[row * d + i] += da[j] * p.w1[(e * f + j) * d + i] +
                               (p.gated ? dg[j] * p.w3[(e * f + j) * d + i] : 0.0);
        }
      }
    }
  }
  return r;
}

// ||got - want|| / ||want|| over the first n entries.
template <class T>
double relative_error(const std::vector<T>& got, const std::vector<double>& want, std::size_t n) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double g = to_float(got[i]);
    diff += (g - want[i]) * (g - want[i]);
    norm += want[i] * want[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

template <class T>
double tolerance() {
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  if constexpr (std::is_same_v<T, __half>) return 5e-3;
  return 3e-2;  // bf16: a, g and h are stored in bf16 between the GEMMs
}

// Values rounded to T, and the same values as doubles for the reference.
template <class T>
std::vector<T> random_matrix(std::mt19937& gen, std::size_t n, float scale,
                             std::vector<double>& exact) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<T> out(n);
  exact.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    out[i] = from_float<T>(normal(gen));
    exact[i] = to_float(out[i]);
  }
  return out;
}

struct Case {
  std::string name;
  FfnKind kind;
  Activation activation;
  std::vector<index_t> rows_per_expert;  // E = 8 entries
  index_t extra_rows = 0;                // buffer rows past offsets[E]
};

// What backward does with the weight gradients: overwrite them, add to them,
// or nothing at all (frozen weights: empty views, dx alone).
enum class Grads { kOverwrite, kAccumulate, kFrozen };

// G: the weight gradients' element (T, or float for fp32 gradients).
template <class T, class G = T>
void run_case(const Case& c, Grads mode) {
  const bool accumulate = mode == Grads::kAccumulate, frozen = mode == Grads::kFrozen;
  constexpr int E = 8;
  using S = MoeSpec<E, 2>;
  SCOPED_TRACE(c.name + " " + moekit_test::type_name<T>() + " grads " +
               moekit_test::type_name<G>() +
               (accumulate ? " accumulate" : (frozen ? " frozen" : "")));
  Problem p{E, 48, 80, 0, c.kind == FfnKind::kGated, c.activation, {0}, {}, {}, {}, {}, {}};
  for (index_t n : c.rows_per_expert) p.offsets.push_back(p.offsets.back() + n);
  p.rows = p.offsets.back() + c.extra_rows;
  const index_t d = p.d, f = p.f, n = p.rows;
  std::mt19937 gen(17);
  const auto x = random_matrix<T>(gen, n * d, 1.0f, p.x);
  const auto w1 = random_matrix<T>(gen, E * f * d, 0.15f, p.w1);
  const auto w3 = random_matrix<T>(gen, E * f * d, 0.15f, p.w3);
  const auto w2 = random_matrix<T>(gen, E * d * f, 0.12f, p.w2);
  const auto dy = random_matrix<T>(gen, n * d, 1.0f, p.dy);
  const Reference ref = reference(p);

  DeviceBuffer<T> bx(x), b1(w1), b3(w3), b2(w2), bdy(dy);
  DeviceBuffer<T> y(n * d), pre(n * f), gate(n * f), gx(n * d);
  DeviceBuffer<G> gw1(E * f * d), gw3(E * f * d), gw2(E * d * f);
  for (auto* b : {&y, &pre, &gate, &gx}) b->poison();
  // Accumulate adds to a known start (1); overwrite must replace poison;
  // frozen must leave the poison.
  std::vector<G> ones(E * f * d, from_float<G>(1.0f));
  for (auto* b : {&gw1, &gw3, &gw2}) {
    if (accumulate) {
      b->upload(ones);
    } else {
      b->poison();
    }
  }

  const gpu::ExpertFfn<S, T> ffn(
      {.d_model = d, .d_ff = f, .kind = c.kind, .activation = c.activation});
  DeviceBuffer<unsigned char> workspace(ffn.workspace_size(n));
  cublasHandle_t handle;
  MOEKIT_CUBLAS_CHECK(cublasCreate(&handle));
  const VectorView<const index_t> offsets(p.offsets.data(), E + 1);
  gpu::ExpertWeights<T> w{{b1.get(), E * f, d}, {}, {b2.get(), E * d, f}};
  if (p.gated) w.w3 = {b3.get(), E * f, d};
  const MatrixView<T> gate_view = p.gated ? MatrixView<T>(gate.get(), n, f) : MatrixView<T>();
  ffn.forward(handle, {bx.get(), n, d}, offsets, w, {y.get(), n, d}, {pre.get(), n, f}, gate_view,
              workspace.get(), workspace.size());
  gpu::ExpertGrads<G> grads{{gw1.get(), E * f, d}, {}, {gw2.get(), E * d, f}, accumulate};
  if (p.gated) grads.dw3 = {gw3.get(), E * f, d};
  if (frozen) grads = {};
  ffn.backward(handle, {bdy.get(), n, d}, {bx.get(), n, d}, offsets, w, {pre.get(), n, f},
               MatrixView<const T>(gate_view), {gx.get(), n, d}, grads, workspace.get(),
               workspace.size());
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  MOEKIT_CUBLAS_CHECK(cublasDestroy(handle));

  const std::size_t used_d = static_cast<std::size_t>(p.offsets.back() * d);
  const std::size_t used_f = static_cast<std::size_t>(p.offsets.back() * f);
  const double tol = tolerance<T>();
  EXPECT_LT(relative_error(y.download(), ref.y, used_d), tol) << "y";
  EXPECT_LT(relative_error(pre.download(), ref.a, used_f), tol) << "saved_pre";
  if (p.gated) EXPECT_LT(relative_error(gate.download(), ref.g, used_f), tol) << "saved_gate";
  EXPECT_LT(relative_error(gx.download(), ref.dx, used_d), tol) << "dx";
  const auto check_grad = [&](const DeviceBuffer<G>& got, std::vector<double> want,
                              const char* name) {
    if (frozen) {
      for (const G& v : got.download()) ASSERT_TRUE(std::isnan(to_float(v))) << name << " written";
      return;
    }
    if (accumulate) {
      for (double& v : want) v += 1.0;
    }
    EXPECT_LT(relative_error(got.download(), want, want.size()), tol) << name;
  };
  check_grad(gw1, ref.dw1, "dw1");
  check_grad(gw2, ref.dw2, "dw2");
  if (p.gated) check_grad(gw3, ref.dw3, "dw3");
  // Rows past offsets[E] keep their poison.
  const auto y_host = y.download();
  for (std::size_t i = used_d; i < y_host.size(); ++i) {
    ASSERT_TRUE(std::isnan(to_float(y_host[i]))) << "y row past offsets[E] written at " << i;
  }
}

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {"gated silu uneven", FfnKind::kGated, Activation::kSilu, {5, 0, 33, 1, 0, 12, 64, 7}, 9},
      {"plain gelu_tanh", FfnKind::kPlain, Activation::kGeluTanh, {16, 16, 16, 16, 16, 16, 16, 16}},
      {"gated gelu_erf one expert",
       FfnKind::kGated,
       Activation::kGeluErf,
       {0, 0, 0, 90, 0, 0, 0, 0}},
      {"plain relu", FfnKind::kPlain, Activation::kRelu, {3, 9, 0, 0, 21, 2, 0, 40}, 3},
      {"all empty", FfnKind::kGated, Activation::kSilu, {0, 0, 0, 0, 0, 0, 0, 0}, 4},
  };
  return all;
}

template <class T>
class ExpertFfnGpu : public ::testing::Test {};
using Types = ::testing::Types<float, __nv_bfloat16, __half>;
TYPED_TEST_SUITE(ExpertFfnGpu, Types);

TYPED_TEST(ExpertFfnGpu, ForwardAndBackwardMatchFloat64Reference) {
  MOEKIT_REQUIRE_GPU();
  for (const Case& c : cases()) run_case<TypeParam>(c, Grads::kOverwrite);
}

// Mixed precision: bf16 / fp16 activations and weights, fp32 weight gradients.
TEST(ExpertFfnGpu, Fp32WeightGradientsWithHalfActivations) {
  MOEKIT_REQUIRE_GPU();
  run_case<__nv_bfloat16, float>(cases()[0], Grads::kOverwrite);
  run_case<__half, float>(cases()[3], Grads::kOverwrite);
  run_case<__nv_bfloat16, float>(cases()[1], Grads::kAccumulate);
}

TYPED_TEST(ExpertFfnGpu, AccumulatedGradientsAddToWhatWasThere) {
  MOEKIT_REQUIRE_GPU();
  run_case<TypeParam>(cases()[0], Grads::kAccumulate);
  run_case<TypeParam>(cases()[3], Grads::kAccumulate);
}

// Frozen weights: empty gradient views are neither computed nor written;
// dx alone still comes out right.
TEST(ExpertFfnGpu, FrozenWeightsOnlyInputGradient) {
  MOEKIT_REQUIRE_GPU();
  run_case<float>(cases()[0], Grads::kFrozen);
  run_case<float>(cases()[1], Grads::kFrozen);
}

// ---- the grouped GEMM and its per-expert fallback ----------------------------

// Three groups of different shapes and transposes (beta 0 over poison, and
// beta 1 over values), A and B of T, C of C: the grouped call where cuBLAS
// has it and the per-group cublasGemmEx fallback, each against float64.
template <class T, class C>
void check_grouped_gemm(gpu::detail::GroupedGemmPath path) {
  struct Group {
    cublasOperation_t ta, tb;
    int m, n, k;
    float beta;
  };
  const Group groups[] = {{CUBLAS_OP_N, CUBLAS_OP_N, 17, 9, 33, 0.0f},
                          {CUBLAS_OP_T, CUBLAS_OP_N, 8, 40, 16, 1.0f},
                          {CUBLAS_OP_N, CUBLAS_OP_T, 31, 5, 7, 0.0f}};
  const bool forced = path == gpu::detail::GroupedGemmPath::kPerGroup;
  SCOPED_TRACE(std::string(moekit_test::type_name<T>()) + " x " + moekit_test::type_name<C>() +
               (forced ? " per group" : " auto"));
  std::mt19937 gen(5);
  std::vector<std::vector<double>> a64(3), b64(3), c64(3);
  std::vector<std::unique_ptr<DeviceBuffer<T>>> a, b;
  std::vector<std::unique_ptr<DeviceBuffer<C>>> c;
  gpu::detail::GroupedGemm gemm;
  for (int g = 0; g < 3; ++g) {
    const Group& q = groups[g];
    const auto mk = static_cast<std::size_t>(q.m * q.k), kn = static_cast<std::size_t>(q.k * q.n);
    const auto mn = static_cast<std::size_t>(q.m * q.n);
    a.push_back(std::make_unique<DeviceBuffer<T>>(random_matrix<T>(gen, mk, 1.0f, a64[g])));
    b.push_back(std::make_unique<DeviceBuffer<T>>(random_matrix<T>(gen, kn, 1.0f, b64[g])));
    c.push_back(std::make_unique<DeviceBuffer<C>>(random_matrix<C>(gen, mn, 1.0f, c64[g])));
    if (q.beta == 0.0f) c.back()->poison();
    const int lda = q.ta == CUBLAS_OP_N ? q.m : q.k, ldb = q.tb == CUBLAS_OP_N ? q.k : q.n;
    gemm.add(q.ta, q.tb, q.m, q.n, q.k, a.back()->get(), lda, b.back()->get(), ldb, c.back()->get(),
             q.m, q.beta);
  }
  DeviceBuffer<void*> pointers(9);
  moekit_test::Cublas cublas;
  const bool grouped = gemm.run(cublas.get(), gpu::detail::cuda_type<T>(), pointers.get(), nullptr,
                                gpu::detail::cuda_type<C>(), path);
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  if (forced) EXPECT_FALSE(grouped);
  // Which path cuBLAS took for these types, for the device check's log.
  std::printf("[ grouped GEMM ] %s inputs, %s output: %s\n", moekit_test::type_name<T>(),
              moekit_test::type_name<C>(), grouped ? "one grouped call" : "one GEMM per group");
  const double rel = std::is_same_v<C, float> ? 0.0 : (std::is_same_v<C, __half> ? 1e-3 : 8e-3);
  for (int g = 0; g < 3; ++g) {
    const Group& q = groups[g];
    const auto got = c[g]->download();
    const int lda = q.ta == CUBLAS_OP_N ? q.m : q.k, ldb = q.tb == CUBLAS_OP_N ? q.k : q.n;
    for (int j = 0; j < q.n; ++j) {
      for (int i = 0; i < q.m; ++i) {
        double want = q.beta * c64[g][j * q.m + i], size = std::fabs(want);
        for (int l = 0; l < q.k; ++l) {
          const double x = q.ta == CUBLAS_OP_N ? a64[g][l * lda + i] : a64[g][i * lda + l];
          const double y = q.tb == CUBLAS_OP_N ? b64[g][j * ldb + l] : b64[g][l * ldb + j];
          want += x * y;
          size += std::fabs(x * y);
        }
        // fp32 accumulation (a few ulp of the terms' size), then one rounding to C.
        ASSERT_NEAR(to_float(got[j * q.m + i]), want, 4e-6 * size + rel * std::fabs(want))
            << "group " << g << " C(" << i << ", " << j << ")";
      }
    }
  }
}

// fp32 gradients of bf16 / fp16 GEMMs are the combination cuBLAS's grouped
// GEMM may lack; every combination the FFN uses runs both ways.
TEST(ExpertFfnGpu, GroupedGemmAndItsPerGroupFallbackMatchFloat64) {
  MOEKIT_REQUIRE_GPU();
  for (const auto path :
       {gpu::detail::GroupedGemmPath::kAuto, gpu::detail::GroupedGemmPath::kPerGroup}) {
    check_grouped_gemm<float, float>(path);
    check_grouped_gemm<__nv_bfloat16, __nv_bfloat16>(path);
    check_grouped_gemm<__half, __half>(path);
    check_grouped_gemm<__nv_bfloat16, float>(path);
    check_grouped_gemm<__half, float>(path);
  }
}

TEST(ExpertFfnGpuArgs, OnlyNotSupportedFallsBackPerGroup) {
  EXPECT_TRUE(gpu::detail::grouped_gemm_unsupported(CUBLAS_STATUS_NOT_SUPPORTED));
  for (const cublasStatus_t other : {CUBLAS_STATUS_SUCCESS, CUBLAS_STATUS_INVALID_VALUE,
                                     CUBLAS_STATUS_EXECUTION_FAILED, CUBLAS_STATUS_ALLOC_FAILED}) {
    EXPECT_FALSE(gpu::detail::grouped_gemm_unsupported(other)) << cublasGetStatusName(other);
  }
}

// ---- the caller's cuBLAS workspace survives the calls -------------------------

// cuBLAS's API log, counted: cublasSetStream drops a cublasSetWorkspace
// workspace, so a call on the stream the handle is already on must not make it.
std::atomic<int> set_stream_calls{0};

void count_set_stream(const char* message) {
  if (std::strstr(message, "cublasSetStream") != nullptr) ++set_stream_calls;
}

// Logs cuBLAS's API calls to count_set_stream while it lives.
class CublasCallLog {
 public:
  CublasCallLog() {
    set_stream_calls = 0;
    MOEKIT_CUBLAS_CHECK(cublasSetLoggerCallback(count_set_stream));
    MOEKIT_CUBLAS_CHECK(cublasLoggerConfigure(1, 0, 0, nullptr));
  }
  ~CublasCallLog() {
    (void)cublasLoggerConfigure(0, 0, 0, nullptr);
    (void)cublasSetLoggerCallback(nullptr);
  }
  CublasCallLog(const CublasCallLog&) = delete;
  CublasCallLog& operator=(const CublasCallLog&) = delete;
};

TEST(ExpertFfnGpu, CallsOnTheHandlesStreamKeepTheCallersWorkspace) {
  MOEKIT_REQUIRE_GPU();
  constexpr int E = 4;
  using S = MoeSpec<E, 2>;
  const index_t d = 32, f = 64, n = 40;
  const std::vector<index_t> offsets = {0, 7, 7, 30, 40};
  std::mt19937 gen(3);
  std::vector<double> unused;
  DeviceBuffer<float> x(random_matrix<float>(gen, n * d, 1.0f, unused));
  DeviceBuffer<float> w1(random_matrix<float>(gen, E * f * d, 0.2f, unused));
  DeviceBuffer<float> w2(random_matrix<float>(gen, E * d * f, 0.2f, unused));
  DeviceBuffer<float> y(n * d), pre(n * f), dx(n * d), dw1(E * f * d), dw2(E * d * f);
  const gpu::ExpertFfn<S, float> ffn({.d_model = d, .d_ff = f});
  DeviceBuffer<unsigned char> workspace(ffn.workspace_size(n));
  DeviceBuffer<unsigned char> cublas_workspace(std::size_t{4} << 20);
  const gpu::ExpertWeights<float> w{{w1.get(), E * f, d}, {}, {w2.get(), E * d, f}};
  const gpu::ExpertGrads<float> grads{{dw1.get(), E * f, d}, {}, {dw2.get(), E * d, f}, false};
  cudaStream_t stream = nullptr;
  MOEKIT_CUDA_CHECK(cudaStreamCreate(&stream));
  moekit_test::Cublas cublas;
  const auto run = [&](cudaStream_t s) {
    ffn.forward(cublas.get(), {x.get(), n, d}, {offsets.data(), E + 1}, w, {y.get(), n, d},
                {pre.get(), n, f}, {}, workspace.get(), workspace.size(), s);
    ffn.backward(cublas.get(), {y.get(), n, d}, {x.get(), n, d}, {offsets.data(), E + 1}, w,
                 {pre.get(), n, f}, {}, {dx.get(), n, d}, grads, workspace.get(), workspace.size(),
                 s);
  };
  // The documented order: the stream first, then the workspace.
  MOEKIT_CUBLAS_CHECK(cublasSetStream(cublas.get(), stream));
  MOEKIT_CUBLAS_CHECK(
      cublasSetWorkspace(cublas.get(), cublas_workspace.get(), cublas_workspace.size()));
  {
    const CublasCallLog log;
    // The log names the call, or this test cannot see anything.
    MOEKIT_CUBLAS_CHECK(cublasSetStream(cublas.get(), stream));
    ASSERT_EQ(set_stream_calls.load(), 1) << "cuBLAS's API log does not name cublasSetStream";
    MOEKIT_CUBLAS_CHECK(
        cublasSetWorkspace(cublas.get(), cublas_workspace.get(), cublas_workspace.size()));
    set_stream_calls = 0;
    run(stream);
    EXPECT_EQ(set_stream_calls.load(), 0) << "a call on the handle's own stream reset it";
    run(nullptr);  // another stream: the handle must move to it
    EXPECT_GE(set_stream_calls.load(), 1);
  }
  cudaStream_t now = stream;
  MOEKIT_CUBLAS_CHECK(cublasGetStream(cublas.get(), &now));
  EXPECT_EQ(now, nullptr);
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());
  MOEKIT_CUDA_CHECK(cudaStreamDestroy(stream));
}

// ---- argument checks (no device needed) -------------------------------------

using moekit_test::expect_error;
using moekit_test::fake;

TEST(ExpertFfnGpuArgs, ConfigurationIsValidated) {
  using S = MoeSpec<4, 2>;
  using Ffn = gpu::ExpertFfn<S, float>;
  expect_error([] { Ffn({.d_model = 0, .d_ff = 4}); }, Errc::kInvalidArgument, "d_model");
  expect_error([] { Ffn({.d_model = 4, .d_ff = 0}); }, Errc::kInvalidArgument, "d_ff");
  expect_error([] { Ffn({.d_model = 4, .d_ff = 4, .activation = static_cast<Activation>(9)}); },
               Errc::kInvalidArgument, "activation");
  expect_error([] { Ffn({.d_model = 4, .d_ff = 4, .kind = static_cast<FfnKind>(7)}); },
               Errc::kInvalidArgument, "kind");
}

// Shapes, offsets and the workspace are checked on the host before any
// CUDA or cuBLAS call: the fake device pointers are never touched.
TEST(ExpertFfnGpuArgs, BadArgumentsThrowBeforeAnyCudaCall) {
  constexpr int E = 4;
  using S = MoeSpec<E, 2>;
  const index_t d = 8, f = 16, n = 10;
  const gpu::ExpertFfn<S, float> ffn(
      {.d_model = d, .d_ff = f, .kind = FfnKind::kGated, .activation = Activation::kSilu});
  float* data = fake<float>(1);
  void* ws = fake<void>(16);
  const std::size_t bytes = ffn.workspace_size(n);
  const std::vector<index_t> offsets = {0, 2, 5, 5, 10};
  const gpu::ExpertWeights<float> w{{data, E * f, d}, {data, E * f, d}, {data, E * d, f}};
  const MatrixView<const float> x(data, n, d);
  const MatrixView<float> y(data, n, d), pre(data, n, f), gate(data, n, f);
  const auto forward = [&](const std::vector<index_t>& off,
                           const gpu::ExpertWeights<float>& weights, MatrixView<float> out,
                           std::size_t ws_bytes, void* ws_ptr) {
    ffn.forward(nullptr, x, {off.data(), static_cast<index_t>(off.size())}, weights, out, pre, gate,
                ws_ptr, ws_bytes);
  };
  expect_error(
      [&] {
        forward(offsets, w, {data, n - 1, d}, bytes, ws);
      },
      Errc::kShapeMismatch, "y is");
  expect_error([&] { forward(offsets, w, y, bytes - 1, ws); }, Errc::kShapeMismatch,
               "workspace of");
  expect_error([&] { forward(offsets, w, y, bytes, static_cast<char*>(ws) + 4); },
               Errc::kInvalidArgument, "256-byte aligned");
  expect_error([&] { forward(offsets, w, y, bytes, nullptr); }, Errc::kNullPointer,
               "workspace is null");
  expect_error(
      [&] {
        forward({1, 2, 5, 5, 10}, w, y, bytes, ws);
      },
      Errc::kInvalidArgument, "host_offsets[0]");
  expect_error(
      [&] {
        forward({0, 3, 2, 5, 10}, w, y, bytes, ws);
      },
      Errc::kInvalidArgument, "decreases");
  expect_error(
      [&] {
        forward({0, 2, 5, 5, 11}, w, y, bytes, ws);
      },
      Errc::kShapeMismatch, "exceeds the buffer");
  expect_error(
      [&] {
        forward({0, 2, 5, 10}, w, y, bytes, ws);
      },
      Errc::kShapeMismatch, "host_offsets");
  expect_error(
      [&] {
        forward(offsets, {{data, E * f, d}, {}, {data, E * d, f}}, y, bytes, ws);
      },
      Errc::kShapeMismatch, "weights.w3");  // gated needs w3
  expect_error(
      [&] {
        forward(offsets, {{data, E * f, d + 1}, {data, E * f, d}, {data, E * d, f}}, y, bytes, ws);
      },
      Errc::kShapeMismatch, "weights.w1");
  const gpu::ExpertFfn<S, float> plain({.d_model = d, .d_ff = f});
  expect_error(
      [&] {
        plain.forward(nullptr, x, {offsets.data(), E + 1}, w, y, pre, {}, ws, bytes);
      },
      Errc::kInvalidArgument, "weights.w3 must be empty");
  expect_error(
      [&] {
        ffn.backward(
            nullptr, x, x, {offsets.data(), E + 1}, w, pre, gate, y,
            gpu::ExpertGrads<float>{{data, E * f, d}, {data, E * f, d}, {data, E * d, f + 1}}, ws,
            bytes);
      },
      Errc::kShapeMismatch, "grads.dw2");
}

}  // namespace
