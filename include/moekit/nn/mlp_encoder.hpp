#pragma once
// A frozen dense MLP encoder on the CPU backend: the shared base of the
// reference multi-task model (docs/synthetic_model.md), inference only.
//
//   h_0     = x W_in^T + b_in                                  (n x d_input -> n x d)
//   h_{l+1} = h_l + W2_l act(W1_l LN_l(h_l) + b1_l) + b2_l     l = 0 .. L-1 (pre-LN residual)
//   y       = h_L
//   LN(h)   = gamma * (h - mean(h)) / sqrt(var(h) + eps) + beta   (per row, biased variance)
//
// Layout (row-major, torch.nn.Linear's [out, in]; the L layers stacked like
// the experts of moekit/cpu/expert_ffn.hpp):
//   w_in   d x d_input        b_in   d
//   gamma  L x d              beta   L x d
//   w1     (L d_ff) x d       b1     L x d_ff      layer l = rows [l d_ff, (l + 1) d_ff)
//   w2     (L d) x d_ff       b2     L x d         layer l = rows [l d, (l + 1) d)
// The parameter count equals encoder_params({EncoderKind::kMlp, ...}) of
// moekit/nn/param_count.hpp.
//
// The encoder is frozen: there is no backward, and the model above it never
// asks for its input gradient. init() draws fixed random weights (a stand-in
// for a pretrained encoder; weights can instead be loaded, see
// moekit/io/weights.hpp); LayerNorm starts as the identity (gamma 1, beta 0).
//
// Workspace: workspace_size(n) bytes (n (d + d_ff) floats) for LN(h) and the
// hidden layer; forward allocates nothing. Threading: Eigen parallelises the
// GEMMs; the row-wise LayerNorm and activation run on OpenMP threads, each row
// on one thread, so results are bit-identical run after run.
// Validation: the configuration (constructor), every view's shape and the
// workspace, before anything is written; y overlapping x, the weights or the
// workspace is refused (kInvalidArgument).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "moekit/core/activation.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/elementwise.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/nn/param_count.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// The encoder's configuration; the constructor validates it.
struct MlpEncoderConfig {
  index_t d_input = 0;                            // features per sample
  index_t d_model = 0;                            // d
  index_t d_ff = 0;                               // hidden width of each residual block
  int num_layers = 0;                             // L >= 0 residual blocks
  Activation activation = Activation::kGeluTanh;  // the blocks' activation
  float layer_norm_eps = 1e-5f;                   // LayerNorm's eps
};

// The encoder's parameters in caller memory (the layout at the top of this
// file): MlpEncoderViews<float> to fill them (init), MlpEncoderWeights to read.
template <class T>
struct MlpEncoderViews {
  MatrixView<T> w_in{};   // d x d_input
  VectorView<T> b_in{};   // d
  MatrixView<T> gamma{};  // L x d, LayerNorm scale
  MatrixView<T> beta{};   // L x d, LayerNorm shift
  MatrixView<T> w1{};     // (L d_ff) x d
  MatrixView<T> b1{};     // L x d_ff
  MatrixView<T> w2{};     // (L d) x d_ff
  MatrixView<T> b2{};     // L x d

  // Mutable views (what init fills) convert to the read-only weights
  // forward takes: encoder.forward(x, views, y, ws).
  operator MlpEncoderViews<const T>() const requires(!std::is_const_v<T>) {
    return {w_in, b_in, gamma, beta, w1, b1, w2, b2};
  }
};
// The read-only weights forward takes.
using MlpEncoderWeights = MlpEncoderViews<const float>;

// The frozen MLP encoder (see the top of this file).
class MlpEncoder {
 public:
  // Rejects a configuration it cannot run (naming the field and value).
  explicit MlpEncoder(const MlpEncoderConfig& config) : config_(config) {
    MOEKIT_CHECK_ARG(config.d_input >= 1, "config.d_input = ", config.d_input,
                     " must be at least 1");
    MOEKIT_CHECK_ARG(config.d_model >= 1, "config.d_model = ", config.d_model,
                     " must be at least 1");
    MOEKIT_CHECK_ARG(config.num_layers >= 0, "config.num_layers = ", config.num_layers,
                     " must be non-negative");
    MOEKIT_CHECK_ARG(config.num_layers == 0 || config.d_ff >= 1, "config.d_ff = ", config.d_ff,
                     " must be at least 1");
    MOEKIT_CHECK_ARG(std::isfinite(config.layer_norm_eps) && config.layer_norm_eps > 0.0f,
                     "config.layer_norm_eps = ", config.layer_norm_eps,
                     " must be finite and positive");
  }

  // The configuration it was built with.
  const MlpEncoderConfig& config() const { return config_; }

  // All parameters frozen: total = active, trainable 0.
  ParamCount params() const {
    return encoder_params(
        {EncoderKind::kMlp, config_.d_input, config_.d_model, config_.d_ff, config_.num_layers, 0});
  }

  // Bytes of workspace forward needs for `rows` samples.
  index_t workspace_size(index_t rows) const {
    MOEKIT_CHECK_GE(rows, 0);
    return rows * (config_.d_model + config_.d_ff) * index_t{sizeof(float)};
  }

  // Fixed random weights: W ~ N(0, 1 / fan_in) from (seed, a counter per
  // element), biases 0, LayerNorm the identity. The residual branches are
  // scaled by 1 / sqrt(2 L) so the activations stay O(1) with depth.
  void init(const MlpEncoderViews<float>& w, std::uint64_t seed) const {
    MOEKIT_API("cpu::MlpEncoder::init");
    check(w, "w");
    OverlapCheck overlap("cpu::MlpEncoder::init");
    add_views(overlap, {w.w_in, w.b_in, w.gamma, w.beta, w.w1, w.b1, w.w2, w.b2}, /*written=*/true);
    overlap.check();
    const MlpEncoderConfig& c = config_;
    std::uint64_t counter = 0;
    const auto fill = [&](MatrixView<float> m, double stddev) {
      for (index_t i = 0; i < m.rows(); ++i) {
        for (index_t j = 0; j < m.cols(); ++j) {
          m(i, j) = static_cast<float>(stddev * random_normal(seed, counter++));
        }
      }
    };
    fill(w.w_in, 1.0 / std::sqrt(static_cast<double>(c.d_input)));
    as_eigen(w.b_in).setZero();
    if (c.num_layers == 0) return;
    const double depth = 1.0 / std::sqrt(2.0 * c.num_layers);
    as_eigen(w.gamma).setOnes();
    as_eigen(w.beta).setZero();
    fill(w.w1, 1.0 / std::sqrt(static_cast<double>(c.d_model)));
    as_eigen(w.b1).setZero();
    fill(w.w2, depth / std::sqrt(static_cast<double>(c.d_ff)));
    as_eigen(w.b2).setZero();
  }

  // y = the encoding of x (n x d_input), n x d.
  void forward(MatrixView<const float> x, const MlpEncoderWeights& w, MatrixView<float> y,
               VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::MlpEncoder::forward");
    const MlpEncoderConfig& c = config_;
    check_view(x, "x");
    const index_t n = x.rows(), d = c.d_model, f = c.d_ff;
    check_shape(x, n, c.d_input, "x");
    check_shape(y, n, d, "y");
    check(w, "weights");
    MOEKIT_CHECK(workspace.size() >= workspace_size(n), Errc::kShapeMismatch, "workspace has ",
                 workspace.size(), " bytes, forward needs ", workspace_size(n));
    MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace.data()) % alignof(float) == 0,
                 Errc::kInvalidArgument, "workspace is not aligned to ", alignof(float), " bytes");
    OverlapCheck overlap("cpu::MlpEncoder::forward");
    overlap.out({{y, "y"}, {workspace.segment(0, workspace_size(n)), "workspace"}}).in({{x, "x"}});
    add_views(overlap, w, /*written=*/false);
    overlap.check();
    if (n == 0) return;

    auto h = as_eigen(y);
    h.noalias() = as_eigen(x) * as_eigen(w.w_in).transpose();
    h.rowwise() += as_eigen(w.b_in).transpose();
    float* scratch = reinterpret_cast<float*>(workspace.data());
    const MatrixView<float> normed(scratch, n, d);
    const MatrixView<float> hidden(scratch + n * d, n, f);
    for (int l = 0; l < c.num_layers; ++l) {
      layer_norm(MatrixView<const float>(y), w.gamma.row_view(l), w.beta.row_view(l), normed);
      auto a = as_eigen(hidden);
      a.noalias() = as_eigen(MatrixView<const float>(normed)) *
                    as_eigen(w.w1.middle_rows(l * f, f)).transpose();
      const VectorView<const float> b1 = w.b1.row_view(l);
      const Activation act = c.activation;
      MOEKIT_PARALLEL_FOR_IF(n * f >= kParallelGrain)
      for (index_t t = 0; t < n; ++t) {
        const MatrixView<float> row = hidden.middle_rows(t, 1);
        cpu::activation_rows(act, MatrixView<const float>(row), {}, row, b1.data());
      }
      h.noalias() += as_eigen(MatrixView<const float>(hidden)) *
                     as_eigen(w.w2.middle_rows(l * d, d)).transpose();
      h.rowwise() += as_eigen(w.b2.row_view(l)).transpose();
    }
  }

 private:
  void layer_norm(MatrixView<const float> x, VectorView<const float> gamma,
                  VectorView<const float> beta, MatrixView<float> out) const {
    const index_t d = x.cols();
    const float eps = config_.layer_norm_eps;
    const index_t n = x.rows();
    MOEKIT_PARALLEL_FOR_IF(n * d >= kParallelGrain)
    for (index_t t = 0; t < n; ++t) {
      const float* r = x.row(t);
      double mean = 0.0, var = 0.0;
      for (index_t j = 0; j < d; ++j) mean += r[j];
      mean /= static_cast<double>(d);
      for (index_t j = 0; j < d; ++j) var += (r[j] - mean) * (r[j] - mean);
      const float inv = static_cast<float>(1.0 / std::sqrt(var / static_cast<double>(d) + eps));
      const float m = static_cast<float>(mean);
      float* o = out.row(t);
      for (index_t j = 0; j < d; ++j) o[j] = gamma[j] * ((r[j] - m) * inv) + beta[j];
    }
  }

  // The weights for an OverlapCheck (init writes them, forward reads them).
  static void add_views(OverlapCheck& c, const MlpEncoderViews<const float>& w, bool written) {
    const std::initializer_list<Footprint> views = {
        {w.w_in, "w.w_in"}, {w.b_in, "w.b_in"}, {w.gamma, "w.gamma"}, {w.beta, "w.beta"},
        {w.w1, "w.w1"},     {w.b1, "w.b1"},     {w.w2, "w.w2"},       {w.b2, "w.b2"}};
    if (written) {
      c.out(views);
    } else {
      c.in(views);
    }
  }

  template <class T>
  void check(const MlpEncoderViews<T>& w, const char* name) const {
    const MlpEncoderConfig& c = config_;
    const index_t d = c.d_model, f = c.d_ff, L = c.num_layers;
    const std::string p(name);
    check_shape(w.w_in, d, c.d_input, (p + ".w_in").c_str());
    check_shape(w.b_in, d, (p + ".b_in").c_str());
    if (L == 0) return;
    check_shape(w.gamma, L, d, (p + ".gamma").c_str());
    check_shape(w.beta, L, d, (p + ".beta").c_str());
    check_shape(w.w1, L * f, d, (p + ".w1").c_str());
    check_shape(w.b1, L, f, (p + ".b1").c_str());
    check_shape(w.w2, L * d, f, (p + ".w2").c_str());
    check_shape(w.b2, L, d, (p + ".b2").c_str());
  }

  MlpEncoderConfig config_;
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
