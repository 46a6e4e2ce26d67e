// gpu::MoeLayer against cpu::MoeLayer (cpu_reference_moe_layer.cpp) on fresh
// random inputs, both run through the backend-generic moe_layer_step:
// forward output, routing, aux losses and every gradient (dx, dw_gate,
// dgate_bias, routed and shared expert weights); plain and gated FFNs, with
// and without shared experts, capacity with drops (both policies) and
// dropless, frozen router / experts / shared experts, accumulation, an
// uneven load, router noise (Gaussian and jitter, fp32 and bf16), fp32 (1e-5
// relative) and bf16 (1e-2), reruns bit-identical (with noise too).
// Outputs are poisoned before each run. Device tests skip without a GPU; the
// argument checks and the backend switch's compile-time checks run everywhere.
#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_reference.hpp"
#include "device_buffer.cuh"
#include "gpu_test.cuh"
#include "moe_layer_step.hpp"
#include "moekit/moekit.cuh"

namespace {

using moekit::Activation;
using moekit::CudaBackend;
using moekit::DropPolicy;
using moekit::Errc;
using moekit::FfnKind;
using moekit::GatingRule;
using moekit::index_t;
using moekit::MatrixView;
using moekit::MoeSpec;
using moekit::NoiseConfig;
using moekit::NoiseKind;
using moekit::VectorView;
using moekit_test::Cublas;
using moekit_test::DeviceBuffer;
using moekit_test::expect_error;
using moekit_test::fake;
using moekit_test::from_float;
using moekit_test::layer_config;
using moekit_test::MoeLayerCase;
using moekit_test::MoeLayerGradValues;
using moekit_test::MoeLayerResult;
using moekit_test::random_floats;
using moekit_test::to_float;
namespace gpu = moekit::gpu;

// ---- the backend switch, at compile time ------------------------------------

using S82 = MoeSpec<8, 2>;
static_assert(std::is_same_v<moekit::MoeLayer<S82, CudaBackend<float>>, gpu::MoeLayer<S82, float>>);
static_assert(
    std::is_same_v<moekit::MoeLayer<S82, CudaBackend<__nv_bfloat16>>::Element, __nv_bfloat16>);
// The same generic step instantiated for the CUDA backend (the CPU one is in
// cpu_reference_moe_layer.cpp).
[[maybe_unused]] constexpr auto kStepFloat = &moekit_test::moe_layer_step<CudaBackend<float>, S82>;
[[maybe_unused]] constexpr auto kStepHalf = &moekit_test::moe_layer_step<CudaBackend<__half>, S82>;
// A designated initialiser written once for both layers' configs, router noise
// included (cpu_reference_moe_layer.cpp instantiates the CPU's).
[[maybe_unused]] constexpr auto kNoisyConfig =
    &moekit_test::noisy_layer_config<gpu::MoeLayerConfig>;

// ---- problems ------------------------------------------------------------------

struct Options {
  index_t tokens = 96, d = 32, f = 48, fs = 0;
  int num_shared = 0;
  FfnKind kind = FfnKind::kPlain;
  Activation activation = Activation::kGeluTanh;
  moekit::GatingConfig gating{};
  NoiseConfig noise{};
  moekit::CapacityConfig capacity{};
  float switch_coeff = 0.01f, z_coeff = 0.001f;
  bool gate_bias = true;
  float hot_bias = 0.0f;  // added to expert 0's gate bias: an uneven load
  bool frozen_router = false, frozen_experts = false, frozen_shared = false, want_dx = true;
  bool accumulate = false;
  std::uint32_t seed = 1;
};

// Values exactly representable in T, so both backends read the same inputs.
template <class T>
std::vector<float> in_type(std::vector<float> v) {
  for (float& x : v) x = to_float(from_float<T>(x));
  return v;
}

template <int E, class T>
MoeLayerCase make_case(const Options& o) {
  MoeLayerCase c;
  c.tokens = o.tokens;
  c.d = o.d;
  c.f = o.f;
  c.fs = o.fs;
  c.num_shared = o.num_shared;
  c.kind = o.kind;
  c.activation = o.activation;
  c.gating = o.gating;
  c.noise = o.noise;
  c.capacity = o.capacity;
  c.switch_coeff = o.switch_coeff;
  c.z_coeff = o.z_coeff;
  c.accumulate = o.accumulate;
  const bool gated = o.kind == FfnKind::kGated;
  const index_t d = o.d, f = o.f, fs = o.fs > 0 ? o.fs : o.f, n = o.num_shared, t = o.tokens;
  const auto sz = [](index_t v) { return static_cast<std::size_t>(v); };
  std::uint32_t seed = o.seed * 1000;
  const auto rnd = [&](index_t count, float scale) {
    return in_type<T>(random_floats(sz(count), -scale, scale, ++seed));
  };
  const float wd = 1.0f / std::sqrt(static_cast<float>(d));
  c.x = rnd(t * d, 1.0f);
  c.dy = rnd(t * d, 1.0f);
  c.w_gate = rnd(E * d, 2.0f * wd);
  if (o.gate_bias) {
    c.gate_bias = random_floats(E, -0.5f, 0.5f, ++seed);
    c.gate_bias[0] += o.hot_bias;
  }
  c.w1 = rnd(E * f * d, wd);
  if (gated) c.w3 = rnd(E * f * d, wd);
  c.w2 = rnd(E * d * f, 1.0f / std::sqrt(static_cast<float>(f)));
  if (n > 0) {
    c.shared_w1 = rnd(n * fs * d, wd);
    if (gated) c.shared_w3 = rnd(n * fs * d, wd);
    c.shared_w2 = rnd(n * d * fs, 1.0f / std::sqrt(static_cast<float>(fs)));
  }
  // Gradient start values: random (added to with accumulate, else overwritten).
  MoeLayerGradValues& g = c.grads;
  if (o.want_dx) g.dx = rnd(t * d, 1.0f);
  if (!o.frozen_router) {
    g.dw_gate = rnd(E * d, 1.0f);
    if (o.gate_bias) g.dgate_bias = random_floats(E, -1.0f, 1.0f, ++seed);
  }
  if (!o.frozen_experts) {
    g.dw1 = rnd(E * f * d, 1.0f);
    if (gated) g.dw3 = rnd(E * f * d, 1.0f);
    g.dw2 = rnd(E * d * f, 1.0f);
  }
  if (n > 0 && !o.frozen_shared) {
    g.shared_dw1 = rnd(n * fs * d, 1.0f);
    if (gated) g.shared_dw3 = rnd(n * fs * d, 1.0f);
    g.shared_dw2 = rnd(n * d * fs, 1.0f);
  }
  return c;
}

// ---- the GPU run ------------------------------------------------------------------

// An empty vector of a non-empty shape is an absent (frozen) view; a 0-row
// shape keeps its columns (T = 0).
template <class T>
struct DeviceMatrix {
  index_t rows = 0, cols = 0;
  DeviceBuffer<T> buffer;
  DeviceMatrix(const std::vector<float>& v, index_t r, index_t c)
      : rows(v.empty() && r * c > 0 ? 0 : r),
        cols(v.empty() && r * c > 0 ? 0 : c),
        buffer(v.size()) {
    std::vector<T> host(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) host[i] = from_float<T>(v[i]);
    buffer.upload(host);
  }
  MatrixView<T> view() const { return MatrixView<T>(buffer.get(), rows, cols); }
  MatrixView<const T> cview() const { return view(); }
  std::vector<float> download() const {
    std::vector<float> out;
    for (const T& v : buffer.download()) out.push_back(to_float(v));
    return out;
  }
};

template <int E, int K, class T>
MoeLayerResult gpu_moe_layer(const MoeLayerCase& c, moekit::MoeAuxLosses* aux_out = nullptr,
                             gpu::MoeLayerStats<MoeSpec<E, K>>* stats_out = nullptr) {
  using S = MoeSpec<E, K>;
  const auto config = layer_config<gpu::MoeLayerConfig>(c);
  const moekit::MoeLayer<S, CudaBackend<T>> layer(config);
  gpu::MoeLayerStorage<S, T> storage(layer, c.tokens);
  const gpu::MoeLayerState<T>& state = storage.state();
  // Stale state and workspace must not matter.
  MOEKIT_CUDA_CHECK(cudaMemset(state.routing.logits.data(), 0xFF,
                               static_cast<std::size_t>(c.tokens * E) * sizeof(float)));
  Cublas cublas;
  const gpu::MoeLayerWorkspace ws = storage.workspace(cublas.get());
  MOEKIT_CUDA_CHECK(cudaMemset(ws.data, 0xFF, ws.bytes));

  const index_t t = c.tokens, d = c.d, f = c.f, fs = layer.d_ff_shared(), n = c.num_shared;
  const DeviceMatrix<T> x(c.x, t, d), dy(c.dy, t, d), w_gate(c.w_gate, E, d);
  const DeviceMatrix<T> w1(c.w1, E * f, d), w3(c.w3, E * f, d), w2(c.w2, E * d, f);
  const DeviceMatrix<T> sw1(c.shared_w1, n * fs, d), sw3(c.shared_w3, n * fs, d),
      sw2(c.shared_w2, n * d, fs);
  const DeviceBuffer<float> gate_bias(c.gate_bias), selection_bias(c.selection_bias);
  const gpu::MoeLayerParams<T> params{
      w_gate.cview(),
      {gate_bias.get(), static_cast<index_t>(gate_bias.size())},
      {selection_bias.get(), static_cast<index_t>(selection_bias.size())},
      {w1.cview(), w3.cview(), w2.cview()},
      {sw1.cview(), sw3.cview(), sw2.cview()}};

  // Gradients: the start values with accumulate, else poisoned.
  const MoeLayerGradValues& g0 = c.grads;
  DeviceMatrix<T> dx(g0.dx, t, d), dw_gate(g0.dw_gate, E, d);
  DeviceMatrix<T> dw1(g0.dw1, E * f, d), dw3(g0.dw3, E * f, d), dw2(g0.dw2, E * d, f);
  DeviceMatrix<T> sdw1(g0.shared_dw1, n * fs, d), sdw3(g0.shared_dw3, n * fs, d),
      sdw2(g0.shared_dw2, n * d, fs);
  DeviceBuffer<float> dgate_bias(g0.dgate_bias);
  DeviceMatrix<T> y(std::vector<float>(static_cast<std::size_t>(t * d)), t, d);
  y.buffer.poison();
  if (!c.accumulate) {
    for (auto* m : {&dx, &dw_gate, &dw1, &dw3, &dw2, &sdw1, &sdw3, &sdw2}) m->buffer.poison();
    dgate_bias.poison();
  }
  const gpu::MoeLayerGrads<T> grads{
      dw_gate.view(), {dgate_bias.get(), static_cast<index_t>(dgate_bias.size())},
      dw1.view(),     dw3.view(),
      dw2.view(),     sdw1.view(),
      sdw3.view(),    sdw2.view(),
      c.accumulate};
  gpu::MoeLayerStats<S> stats{};
  const moekit::MoeAuxLosses aux = moekit_test::moe_layer_step<CudaBackend<T>, S>(
      layer, x.cview(), params, state, y.view(), &stats, dy.cview(), grads, dx.view(), ws);
  MOEKIT_CUDA_CHECK(cudaDeviceSynchronize());

  MoeLayerResult r;
  r.y = y.download();
  r.grads = {dx.download(),   dw_gate.download(), dgate_bias.download(),
             dw1.download(),  dw3.download(),     dw2.download(),
             sdw1.download(), sdw3.download(),    sdw2.download()};
  r.switch_loss = aux.switch_loss;
  r.z_loss = aux.z_loss;
  r.total = aux.total;
  const auto download = [](auto m) {
    using U = std::remove_const_t<std::remove_pointer_t<decltype(m.data())>>;
    std::vector<U> host(static_cast<std::size_t>(m.rows() * m.cols()));
    if (!host.empty()) {
      MOEKIT_CUDA_CHECK(cudaMemcpy2D(host.data(), static_cast<std::size_t>(m.cols()) * sizeof(U),
                                     m.data(), static_cast<std::size_t>(m.ld()) * sizeof(U),
                                     static_cast<std::size_t>(m.cols()) * sizeof(U),
                                     static_cast<std::size_t>(m.rows()), cudaMemcpyDeviceToHost));
    }
    return host;
  };
  r.ids = download(state.routing.expert_ids.middle_rows(0, t));
  r.positions = download(state.routing.positions.middle_rows(0, t));
  r.weights = download(state.routing.weights.middle_rows(0, t));
  for (int e = 0; e <= E; ++e) r.offsets.push_back(state.host_offsets[e]);
  r.dropped = stats.dispatch.dropped;
  if (aux_out != nullptr) *aux_out = aux;
  if (stats_out != nullptr) *stats_out = stats;
  return r;
}

// ---- comparison -------------------------------------------------------------------

double rel_error(const std::vector<float>& got, const std::vector<float>& want) {
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;  // an unwritten (poisoned) element
    const double e = static_cast<double>(got[i]) - want[i];
    diff += e * e;
    norm += static_cast<double>(want[i]) * want[i];
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

void expect_close(const char* what, const std::vector<float>& got, const std::vector<float>& want,
                  double tol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  EXPECT_LE(rel_error(got, want), tol) << what;
}

void expect_matches(const MoeLayerResult& got, const MoeLayerResult& want, double tol) {
  // The same routing first: otherwise every later difference is this one.
  ASSERT_EQ(got.ids, want.ids) << "expert ids";
  ASSERT_EQ(got.positions, want.positions) << "positions";
  ASSERT_EQ(got.offsets, want.offsets) << "offsets";
  EXPECT_EQ(got.dropped, want.dropped);
  expect_close("weights", got.weights, want.weights, 1e-6);
  expect_close("y", got.y, want.y, tol);
  // The losses read logits whose GEMMs differ from the CPU's in the last bits.
  EXPECT_NEAR(got.switch_loss, want.switch_loss, tol * (1.0 + std::abs(want.switch_loss)));
  EXPECT_NEAR(got.z_loss, want.z_loss, tol * (1.0 + std::abs(want.z_loss)));
  EXPECT_NEAR(got.total, want.total, tol * (1.0 + std::abs(want.total)));
  const MoeLayerGradValues& g = got.grads;
  const MoeLayerGradValues& w = want.grads;
  expect_close("dx", g.dx, w.dx, tol);
  expect_close("dw_gate", g.dw_gate, w.dw_gate, tol);
  expect_close("dgate_bias", g.dgate_bias, w.dgate_bias, tol);
  expect_close("dw1", g.dw1, w.dw1, tol);
  expect_close("dw3", g.dw3, w.dw3, tol);
  expect_close("dw2", g.dw2, w.dw2, tol);
  expect_close("shared_dw1", g.shared_dw1, w.shared_dw1, tol);
  expect_close("shared_dw3", g.shared_dw3, w.shared_dw3, tol);
  expect_close("shared_dw2", g.shared_dw2, w.shared_dw2, tol);
}

template <int E, int K, class T>
void check_against_cpu(const Options& o, double tol) {
  const MoeLayerCase c = make_case<E, T>(o);
  const MoeLayerResult want = moekit_test::cpu_moe_layer<E, K>(c);
  const MoeLayerResult got = gpu_moe_layer<E, K, T>(c);
  expect_matches(got, want, tol);
}

constexpr double kFp32 = 1e-5, kBf16 = 1e-2;

// ---- device tests ---------------------------------------------------------------

TEST(CudaMoeLayer, PlainDroplessMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  check_against_cpu<8, 2, float>({}, kFp32);
}

TEST(CudaMoeLayer, GatedWithSharedExpertsMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  Options o;
  o.kind = FfnKind::kGated;
  o.activation = Activation::kSilu;
  o.num_shared = 2;
  o.fs = 40;
  check_against_cpu<8, 2, float>(o, kFp32);
}

TEST(CudaMoeLayer, CapacityDropsMatchCpu) {
  MOEKIT_REQUIRE_GPU();
  for (DropPolicy policy : {DropPolicy::kPosition, DropPolicy::kProbs}) {
    SCOPED_TRACE(static_cast<int>(policy));
    Options o;
    o.capacity = {1.0, policy};
    o.hot_bias = 1.5f;  // overflow expert 0
    o.num_shared = 1;
    const MoeLayerCase c = make_case<8, float>(o);
    const MoeLayerResult want = moekit_test::cpu_moe_layer<8, 2>(c);
    ASSERT_GT(want.dropped, 0) << "the case must drop assignments";
    expect_matches(gpu_moe_layer<8, 2, float>(c), want, kFp32);
  }
}

TEST(CudaMoeLayer, UnevenLoadMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  Options o;
  o.hot_bias = 6.0f;  // nearly every token picks expert 0
  o.kind = FfnKind::kGated;
  const MoeLayerCase c = make_case<8, float>(o);
  const MoeLayerResult want = moekit_test::cpu_moe_layer<8, 2>(c);
  EXPECT_GT(want.offsets[1] - want.offsets[0], o.tokens * 3 / 4);
  expect_matches(gpu_moe_layer<8, 2, float>(c), want, kFp32);
}

TEST(CudaMoeLayer, FrozenPartsMatchCpu) {
  MOEKIT_REQUIRE_GPU();
  for (int which = 0; which < 4; ++which) {
    SCOPED_TRACE(which);
    Options o;
    o.num_shared = 1;
    o.kind = FfnKind::kGated;
    o.frozen_router = which == 0;
    o.frozen_experts = which == 1;
    o.frozen_shared = which == 2;
    o.want_dx = which != 3;
    check_against_cpu<8, 2, float>(o, kFp32);
  }
}

TEST(CudaMoeLayer, AccumulateMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  Options o;
  o.accumulate = true;
  o.num_shared = 1;
  o.capacity = {1.25, DropPolicy::kPosition};
  check_against_cpu<8, 2, float>(o, kFp32);
}

TEST(CudaMoeLayer, TopOneSigmoidWithoutGateBiasMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  Options o;
  o.gating.rule = GatingRule::kSigmoid;
  o.gating.renormalize = true;
  o.gate_bias = false;
  o.activation = Activation::kRelu;
  o.switch_coeff = 0.02f;
  check_against_cpu<4, 1, float>(o, kFp32);
}

TEST(CudaMoeLayer, Bf16MatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  Options o;
  o.num_shared = 1;
  check_against_cpu<8, 2, __nv_bfloat16>(o, kBf16);
  o.kind = FfnKind::kGated;
  o.capacity = {1.0, DropPolicy::kPosition};
  check_against_cpu<8, 2, __nv_bfloat16>(o, kBf16);
}

TEST(CudaMoeLayer, ZeroTokens) {
  MOEKIT_REQUIRE_GPU();
  Options o;
  o.tokens = 0;
  o.num_shared = 1;
  check_against_cpu<8, 2, float>(o, kFp32);
}

// ---- router noise (the CPU router's draws, element for element) -------------------

constexpr NoiseConfig kGaussianNoise{NoiseKind::kGaussian, 0.5f, 42};
constexpr NoiseConfig kJitterNoise{NoiseKind::kJitter, 0.2f, 9};

TEST(CudaMoeLayer, GaussianNoiseMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  Options o;
  o.noise = kGaussianNoise;
  check_against_cpu<8, 2, float>(o, kFp32);
  o.kind = FfnKind::kGated;
  o.num_shared = 1;
  o.capacity = {1.0, DropPolicy::kProbs};
  o.accumulate = true;
  check_against_cpu<8, 2, float>(o, kFp32);
  Options sigmoid;  // top-1 sigmoid, no gate bias: the noise lands on bare GEMM logits
  sigmoid.noise = kGaussianNoise;
  sigmoid.gating.rule = GatingRule::kSigmoid;
  sigmoid.gate_bias = false;
  check_against_cpu<4, 1, float>(sigmoid, kFp32);
}

TEST(CudaMoeLayer, JitterMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  Options o;
  o.noise = kJitterNoise;
  check_against_cpu<8, 2, float>(o, kFp32);
  o.kind = FfnKind::kGated;
  o.num_shared = 1;
  o.capacity = {1.0, DropPolicy::kPosition};
  o.accumulate = true;
  check_against_cpu<8, 2, float>(o, kFp32);
}

// The gate's two jittered backward paths one at a time: dx alone (frozen
// router), dw_gate alone (no dx), and the router alone (frozen experts).
TEST(CudaMoeLayer, JitterWithFrozenPartsMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  for (int which = 0; which < 3; ++which) {
    SCOPED_TRACE(which);
    Options o;
    o.noise = kJitterNoise;
    o.num_shared = 1;
    o.frozen_router = which == 0;
    o.want_dx = which != 1;
    o.frozen_experts = which == 2;
    check_against_cpu<8, 2, float>(o, kFp32);
  }
}

// Low precision: the jittered gate GEMM runs in fp32 (w_gate widened), so
// routing and weights still agree with the CPU's; backward reads T.
TEST(CudaMoeLayer, NoisyLowPrecisionMatchesCpu) {
  MOEKIT_REQUIRE_GPU();
  for (const NoiseConfig& noise : {kGaussianNoise, kJitterNoise}) {
    SCOPED_TRACE(static_cast<int>(noise.kind));
    Options o;
    o.noise = noise;
    o.num_shared = 1;
    o.kind = FfnKind::kGated;
    check_against_cpu<8, 2, __nv_bfloat16>(o, kBf16);
    check_against_cpu<8, 2, __half>(o, kBf16);
  }
}

TEST(CudaMoeLayer, NoisyZeroTokens) {
  MOEKIT_REQUIRE_GPU();
  for (const NoiseConfig& noise : {kGaussianNoise, kJitterNoise}) {
    SCOPED_TRACE(static_cast<int>(noise.kind));
    Options o;
    o.tokens = 0;
    o.noise = noise;
    check_against_cpu<8, 2, float>(o, kFp32);
  }
}

TEST(CudaMoeLayer, RerunsAreBitIdentical) {
  MOEKIT_REQUIRE_GPU();
  for (const NoiseConfig& noise : {NoiseConfig{}, kGaussianNoise, kJitterNoise}) {
    SCOPED_TRACE(static_cast<int>(noise.kind));
    Options o;
    o.num_shared = 1;
    o.kind = FfnKind::kGated;
    o.capacity = {1.0, DropPolicy::kProbs};
    o.noise = noise;
    const MoeLayerCase c = make_case<8, float>(o);
    const MoeLayerResult a = gpu_moe_layer<8, 2, float>(c);
    const MoeLayerResult b = gpu_moe_layer<8, 2, float>(c);
    const auto same = [](const std::vector<float>& u, const std::vector<float>& v) {
      return u.size() == v.size() && std::memcmp(u.data(), v.data(), u.size() * sizeof(float)) == 0;
    };
    EXPECT_EQ(a.ids, b.ids);
    EXPECT_TRUE(same(a.y, b.y));
    EXPECT_TRUE(same(a.grads.dx, b.grads.dx));
    EXPECT_TRUE(same(a.grads.dw_gate, b.grads.dw_gate));
    EXPECT_TRUE(same(a.grads.dgate_bias, b.grads.dgate_bias));
    EXPECT_TRUE(same(a.grads.dw1, b.grads.dw1));
    EXPECT_TRUE(same(a.grads.shared_dw2, b.grads.shared_dw2));
  }
}

TEST(CudaMoeLayer, NonFiniteErrorPolicyThrowsBeforeWritingY) {
  MOEKIT_REQUIRE_GPU();
  Options o;
  MoeLayerCase c = make_case<8, float>(o);
  c.x[5] = std::numeric_limits<float>::quiet_NaN();  // row 0's logits become NaN
  gpu::MoeLayerConfig config;
  config.d_model = c.d;
  config.d_ff = c.f;
  config.router.non_finite = moekit::NonFinitePolicy::kError;
  const gpu::MoeLayer<S82, float> layer(config);
  gpu::MoeLayerStorage<S82, float> storage(layer, c.tokens);
  Cublas cublas;
  const DeviceMatrix<float> x(c.x, c.tokens, c.d), w_gate(c.w_gate, 8, c.d);
  const DeviceMatrix<float> w1(c.w1, 8 * c.f, c.d), w2(c.w2, 8 * c.d, c.f);
  DeviceMatrix<float> y(std::vector<float>(c.x.size()), c.tokens, c.d);
  y.buffer.poison();
  gpu::MoeLayerStats<S82> stats{};
  expect_error(
      [&] {
        (void)layer.forward(x.cview(), {w_gate.cview(), {}, {}, {w1.cview(), {}, w2.cview()}, {}},
                            storage.state(), y.view(), &stats, storage.workspace(cublas.get()));
      },
      Errc::kNonFinite, "NonFinitePolicy::kError");
  for (float v : y.download()) ASSERT_TRUE(std::isnan(v)) << "y was written";
}

// ---- argument checks (no GPU needed: they throw before any CUDA call) ---------

gpu::MoeLayerConfig host_config(FfnKind kind = FfnKind::kPlain, int shared = 0) {
  gpu::MoeLayerConfig c;
  c.d_model = 16;
  c.d_ff = 24;
  c.kind = kind;
  c.num_shared = shared;
  return c;
}

TEST(CudaMoeLayerHost, ConfigIsValidated) {
  const auto bad = [](auto edit, Errc code, const char* needle) {
    gpu::MoeLayerConfig c = host_config();
    edit(c);
    expect_error([&] { gpu::MoeLayer<S82, float>{c}; }, code, needle);
  };
  bad([](auto& c) { c.d_model = 0; }, Errc::kInvalidArgument, "d_model");
  bad([](auto& c) { c.d_ff = -1; }, Errc::kInvalidArgument, "d_ff");
  bad([](auto& c) { c.num_shared = -1; }, Errc::kInvalidArgument, "config.num_shared");
  bad([](auto& c) { c.d_ff_shared = -2; }, Errc::kInvalidArgument, "config.d_ff_shared");
  bad([](auto& c) { c.switch_coeff = NAN; }, Errc::kInvalidArgument, "config.switch_coeff");
  bad([](auto& c) { c.z_coeff = -1.0f; }, Errc::kInvalidArgument, "config.z_coeff");
  bad([](auto& c) { c.switch_options.normalization = static_cast<moekit::SwitchNormalization>(9); },
      Errc::kInvalidArgument, "config.switch_options.normalization");
  bad([](auto& c) { c.router.capacity.factor = NAN; }, Errc::kInvalidArgument,
      "config.router.capacity.factor");
  bad([](auto& c) { c.router.capacity.policy = static_cast<DropPolicy>(5); },
      Errc::kInvalidArgument, "config.router.capacity.policy");
  bad([](auto& c) { c.router.non_finite = static_cast<moekit::NonFinitePolicy>(5); },
      Errc::kInvalidArgument, "config.router.non_finite");
  bad([](auto& c) { c.router.gating.num_groups = 3; }, Errc::kInvalidArgument, "num_groups");
  bad([](auto& c) { c.kind = static_cast<FfnKind>(7); }, Errc::kInvalidArgument, "kind");
}

// The noise check is the CPU router's (moekit::check_noise): constructing the
// layer throws, so no call ever launches with a bad noise configuration.
TEST(CudaMoeLayerHost, NoiseConfigIsValidated) {
  const auto bad = [](NoiseConfig noise, const char* needle) {
    gpu::MoeLayerConfig c = host_config();
    c.router.noise = noise;
    expect_error([&] { gpu::MoeLayer<S82, float>{c}; }, Errc::kInvalidArgument, needle);
    expect_error([&] { gpu::MoeLayer<S82, __nv_bfloat16>{c}; }, Errc::kInvalidArgument, needle);
  };
  bad({static_cast<NoiseKind>(7), 0.1f, 0}, "config.router.noise.kind = 7 is not a NoiseKind");
  bad({NoiseKind::kGaussian, NAN, 0}, "config.router.noise.amount = nan");
  bad({NoiseKind::kGaussian, INFINITY, 0}, "must be finite and non-negative");
  bad({NoiseKind::kGaussian, -0.5f, 0}, "config.router.noise.amount = -0.5");
  bad({NoiseKind::kNone, -1.0f, 0}, "must be finite and non-negative");
  bad({NoiseKind::kJitter, 1.0f, 0}, "must be below 1 for jitter");
  bad({NoiseKind::kJitter, 1.5f, 0}, "must be below 1 for jitter");

  // The edges that are allowed: any finite Gaussian amount, jitter below 1, 0.
  for (const NoiseConfig& ok :
       {NoiseConfig{NoiseKind::kGaussian, 1e6f, 1}, NoiseConfig{NoiseKind::kJitter, 0.999f, 2},
        NoiseConfig{NoiseKind::kJitter, 0.0f, 3}}) {
    gpu::MoeLayerConfig c = host_config();
    c.router.noise = ok;
    EXPECT_NO_THROW((gpu::MoeLayer<S82, float>{c}));
  }
}

// The designated initialiser of moe_layer_step.hpp (the CPU config's, too)
// carries the noise into the GPU layer.
TEST(CudaMoeLayerHost, DesignatedConfigCarriesNoise) {
  const auto c = moekit_test::noisy_layer_config<gpu::MoeLayerConfig>(16, 24, kJitterNoise);
  const gpu::MoeLayer<S82, float> layer(c);
  EXPECT_EQ(layer.config().router.noise.kind, NoiseKind::kJitter);
  EXPECT_EQ(layer.config().router.noise.amount, 0.2f);
  EXPECT_EQ(layer.config().router.noise.seed, 9u);
  EXPECT_EQ(layer.config().router.capacity.policy, DropPolicy::kProbs);
  EXPECT_TRUE(layer.gated());
}

// The noisy device cases above test something: on the CPU reference (run here,
// no GPU needed) the noise moves the routing (Gaussian) or the router's
// gradients (jitter; its routing may or may not move).
TEST(CudaMoeLayerHost, NoiseCasesAreNotNoOps) {
  Options o;
  const MoeLayerResult clean = moekit_test::cpu_moe_layer<8, 2>(make_case<8, float>(o));
  o.noise = kGaussianNoise;
  const MoeLayerResult gaussian = moekit_test::cpu_moe_layer<8, 2>(make_case<8, float>(o));
  EXPECT_NE(gaussian.ids, clean.ids);
  o.noise = kJitterNoise;
  const MoeLayerResult jitter = moekit_test::cpu_moe_layer<8, 2>(make_case<8, float>(o));
  EXPECT_NE(jitter.grads.dw_gate, clean.grads.dw_gate);
  EXPECT_NE(jitter.grads.dx, clean.grads.dx);
  // The same seed draws the same noise; another seed other noise.
  const auto run = [](const Options& options) {
    return moekit_test::cpu_moe_layer<8, 2>(make_case<8, float>(options));
  };
  EXPECT_EQ(run(o).grads.dw_gate, jitter.grads.dw_gate);
  o.noise.seed = 10;
  EXPECT_NE(run(o).grads.dw_gate, jitter.grads.dw_gate);
}

TEST(CudaMoeLayerHost, StateRowsAreTheDispatchBound) {
  gpu::MoeLayerConfig c = host_config(FfnKind::kPlain, 2);
  c.router.capacity.factor = 1.0;
  const gpu::MoeLayer<S82, float> layer(c);
  const moekit::MoeLayerStateRows rows = layer.state_rows(100);
  EXPECT_EQ(rows.tokens, 100);
  EXPECT_EQ(rows.routed_rows, gpu::max_dispatch_rows<S82>(100, c.router.capacity));
  EXPECT_EQ(rows.routed_rows, 8 * 25);  // C = ceil(100 * 2 / 8)
  EXPECT_EQ(rows.shared_rows, 200);
  EXPECT_EQ(layer.capacity(100), 25);
  EXPECT_EQ(layer.d_ff_shared(), 24);
}

// Fake device views of the right shapes for T tokens (never dereferenced).
struct HostArgs {
  static constexpr index_t t = 20, d = 16, f = 24;
  gpu::MoeLayer<S82, float> layer;
  std::vector<index_t> host_offsets;
  gpu::MoeLayerState<float> state;
  gpu::MoeLayerParams<float> params;
  gpu::MoeLayerGrads<float> grads;
  MatrixView<const float> x{fake<const float>(1), t, d};
  MatrixView<float> y{fake<float>(2), t, d};
  MatrixView<float> dx{fake<float>(3), t, d};
  gpu::MoeLayerWorkspace ws{fake<void>(4), std::size_t{1} << 40,
                            reinterpret_cast<cublasHandle_t>(fake<char>(5)), nullptr};

  explicit HostArgs(FfnKind kind = FfnKind::kPlain, int shared = 0)
      : layer(host_config(kind, shared)), host_offsets(9, 0) {
    const index_t rows = layer.routed_rows(t), e = 8;
    const bool gated = kind == FfnKind::kGated;
    state.routing = {{fake<float>(10), t, e},
                     {fake<float>(11), t, e},
                     {fake<std::int32_t>(12), t, 2},
                     {fake<float>(13), t, 2},
                     {fake<std::int32_t>(14), t, 2}};
    state.offsets = {fake<index_t>(15), 9};
    state.host_offsets = {host_offsets.data(), 9};
    state.row_slots = {fake<std::int32_t>(16), rows};
    state.buffer = {fake<float>(17), rows, d};
    state.expert_out = {fake<float>(18), rows, d};
    state.saved_pre = {fake<float>(19), rows, f};
    if (gated) state.saved_gate = {fake<float>(20), rows, f};
    if (shared > 0) state.shared_pre = {fake<float>(21), shared * t, f};
    if (shared > 0 && gated) state.shared_gate = {fake<float>(22), shared * t, f};
    params.w_gate = {fake<const float>(30), e, d};
    params.gate_bias = {fake<const float>(31), e};
    params.experts = {{fake<const float>(32), e * f, d},
                      gated ? MatrixView<const float>(fake<const float>(33), e * f, d)
                            : MatrixView<const float>(),
                      {fake<const float>(34), e * d, f}};
    if (shared > 0) {
      params.shared = {{fake<const float>(35), shared * f, d},
                       gated ? MatrixView<const float>(fake<const float>(36), shared * f, d)
                             : MatrixView<const float>(),
                       {fake<const float>(37), shared * d, f}};
    }
    grads.dw_gate = {fake<float>(40), e, d};
    grads.dgate_bias = {fake<float>(41), e};
    grads.dw1 = {fake<float>(42), e * f, d};
    grads.dw2 = {fake<float>(43), e * d, f};
  }
  void forward() const { (void)layer.forward(x, params, state, y, nullptr, ws); }
  void backward() const { layer.backward(x, x, params, state, dx, grads, ws); }
};

TEST(CudaMoeLayerHost, ForwardArgumentsAreRejectedBeforeLaunch) {
  const auto fails = [](auto edit, Errc code, const char* needle) {
    HostArgs a(FfnKind::kPlain, 1);
    edit(a);
    expect_error([&] { a.forward(); }, code, needle);
  };
  fails([](HostArgs& a) { a.x = {fake<const float>(1), 20, 15}; }, Errc::kShapeMismatch, "x");
  fails([](HostArgs& a) { a.y = {fake<float>(2), 19, 16}; }, Errc::kShapeMismatch, "y");
  fails([](HostArgs& a) { a.y = {static_cast<float*>(nullptr), 20, 16}; }, Errc::kNullPointer, "y");
  fails(
      [](HostArgs& a) {
        a.params.w_gate = {fake<const float>(30), 7, 16};
      },
      Errc::kShapeMismatch, "params.w_gate");
  fails(
      [](HostArgs& a) {
        a.params.gate_bias = {fake<const float>(31), 9};
      },
      Errc::kShapeMismatch, "params.gate_bias");
  fails(
      [](HostArgs& a) {
        a.params.experts.w3 = {fake<const float>(33), 8 * 24, 16};
      },
      Errc::kInvalidArgument, "params.experts.w3");
  fails(
      [](HostArgs& a) {
        a.params.experts.w2 = {fake<const float>(34), 8 * 16, 23};
      },
      Errc::kShapeMismatch, "params.experts.w2");
  fails([](HostArgs& a) { a.params.shared = {}; }, Errc::kShapeMismatch, "params.shared.w1");
  fails(
      [](HostArgs& a) {
        a.state.routing.logits = {fake<float>(10), 19, 8};
      },
      Errc::kShapeMismatch, "capacity");
  fails(
      [](HostArgs& a) {
        a.state.routing.positions = {fake<std::int32_t>(14), 20, 3};
      },
      Errc::kShapeMismatch, "state.routing.positions");
  fails([](HostArgs& a) { a.state.host_offsets = {}; }, Errc::kShapeMismatch, "state.host_offsets");
  fails(
      [](HostArgs& a) {
        a.state.row_slots = {fake<std::int32_t>(16), 39};
      },
      Errc::kShapeMismatch, "state.row_slots");
  fails(
      [](HostArgs& a) {
        a.state.saved_pre = {fake<float>(19), 40, 23};
      },
      Errc::kShapeMismatch, "state.saved_pre");
  fails(
      [](HostArgs& a) {
        a.state.saved_gate = {fake<float>(20), 40, 24};
      },
      Errc::kInvalidArgument, "state.saved_gate");
  fails(
      [](HostArgs& a) {
        a.state.shared_pre = {fake<float>(21), 19, 24};
      },
      Errc::kShapeMismatch, "state.shared_pre");
  fails([](HostArgs& a) { a.ws.handle = nullptr; }, Errc::kNullPointer, "workspace.handle");
  fails([](HostArgs& a) { a.ws.data = nullptr; }, Errc::kNullPointer, "workspace.data");
  fails([](HostArgs& a) { a.ws.data = fake<char>(4) + 8; }, Errc::kInvalidArgument,
        "workspace.data");
}

TEST(CudaMoeLayerHost, BackwardArgumentsAreRejectedBeforeLaunch) {
  const auto fails = [](auto edit, Errc code, const char* needle) {
    HostArgs a(FfnKind::kGated, 1);
    edit(a);
    expect_error([&] { a.backward(); }, code, needle);
  };
  fails([](HostArgs& a) { a.dx = {fake<float>(3), 20, 17}; }, Errc::kShapeMismatch, "dx");
  fails(
      [](HostArgs& a) {
        a.grads.dw_gate = {fake<float>(40), 8, 15};
      },
      Errc::kShapeMismatch, "grads.dw_gate");
  fails([](HostArgs& a) { a.params.gate_bias = {}; }, Errc::kInvalidArgument, "grads.dgate_bias");
  fails(
      [](HostArgs& a) {
        a.grads.dw3 = {fake<float>(44), 8 * 24, 15};
      },
      Errc::kShapeMismatch, "grads.dw3");
  fails(
      [](HostArgs& a) {
        a.grads.shared_dw2 = {fake<float>(45), 16, 23};
      },
      Errc::kShapeMismatch, "grads.shared_dw2");
  fails([](HostArgs& a) { a.host_offsets[0] = 1; }, Errc::kInvalidArgument, "host_offsets[0]");
  fails([](HostArgs& a) { a.host_offsets[3] = 5; }, Errc::kInvalidArgument, "decreases");
  fails(
      [](HostArgs& a) {
        for (int e = 1; e <= 8; ++e) a.host_offsets[e] = 41;  // routed_rows(20) = 40
      },
      Errc::kShapeMismatch, "routed_rows");
  fails([](HostArgs& a) { a.ws.handle = nullptr; }, Errc::kNullPointer, "workspace.handle");

  // A plain layer rejects gated-only views.
  HostArgs plain(FfnKind::kPlain, 0);
  plain.grads.dw3 = {fake<float>(44), 8 * 24, 16};
  expect_error([&] { plain.backward(); }, Errc::kInvalidArgument, "grads.dw3");
  plain.grads.dw3 = {};
  plain.grads.shared_dw1 = {fake<float>(46), 24, 16};
  expect_error([&] { plain.backward(); }, Errc::kInvalidArgument, "grads.shared_dw1");
}

}  // namespace
