#pragma once
// A tiny random BERT for the encoder tests, and a float64 reference of its
// forward pass written the way transformers' BertModel computes it: a padded
// B x W batch with an attention mask (masked keys get -inf before the
// softmax), every product and normalisation in double.

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "moekit/nn/bert_encoder.hpp"

namespace moekit_test {

using moekit::index_t;

inline moekit::cpu::BertEncoderConfig tiny_bert_config(
    moekit::cpu::NormPlacement norm = moekit::cpu::NormPlacement::kPost,
    moekit::Activation act = moekit::Activation::kGeluErf) {
  moekit::cpu::BertEncoderConfig c;
  c.vocab_size = 40;
  c.d_model = 48;  // 3 heads of 16
  c.num_heads = 3;
  c.d_ff = 160;
  c.num_layers = 2;
  c.max_positions = 80;
  c.type_vocab_size = 2;
  c.activation = act;
  c.norm = norm;
  c.layer_norm_eps = 1e-6f;
  return c;
}

// Fills every weight with random values (LayerNorm gains near 1).
inline void randomize(const moekit::cpu::BertEncoderViews<float>& w, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto fill = [&](moekit::MatrixView<float> m, float scale, float offset) {
    for (index_t r = 0; r < m.rows(); ++r)
      for (index_t c = 0; c < m.cols(); ++c) m(r, c) = offset + scale * normal(rng);
  };
  const auto fill_v = [&](moekit::VectorView<float> v, float scale, float offset) {
    fill(moekit::MatrixView<float>(v.data(), v.empty() ? 0 : 1, v.size()), scale, offset);
  };
  fill(w.word_embeddings, 1.0f, 0.0f);
  fill(w.position_embeddings, 0.5f, 0.0f);
  fill(w.token_type_embeddings, 0.5f, 0.0f);
  fill_v(w.embedding_gamma, 0.1f, 1.0f);
  fill_v(w.embedding_beta, 0.1f, 0.0f);
  const float s = 0.15f;
  fill(w.w_qkv, s, 0.0f);
  fill(w.b_qkv, 0.1f, 0.0f);
  fill(w.w_out, s, 0.0f);
  fill(w.b_out, 0.1f, 0.0f);
  fill(w.ln1_gamma, 0.1f, 1.0f);
  fill(w.ln1_beta, 0.1f, 0.0f);
  fill(w.w_ff1, s, 0.0f);
  fill(w.b_ff1, 0.1f, 0.0f);
  fill(w.w_ff2, 0.08f, 0.0f);
  fill(w.b_ff2, 0.1f, 0.0f);
  fill(w.ln2_gamma, 0.1f, 1.0f);
  fill(w.ln2_beta, 0.1f, 0.0f);
  fill_v(w.final_gamma, 0.1f, 1.0f);
  fill_v(w.final_beta, 0.1f, 0.0f);
}

// Row-major double matrix.
struct Mat {
  index_t rows = 0, cols = 0;
  std::vector<double> v;
  Mat(index_t r, index_t c) : rows(r), cols(c), v(static_cast<std::size_t>(r * c), 0.0) {}
  double& operator()(index_t r, index_t c) { return v[static_cast<std::size_t>(r * cols + c)]; }
  double operator()(index_t r, index_t c) const {
    return v[static_cast<std::size_t>(r * cols + c)];
  }
};

inline double ref_activation(moekit::Activation act, double x) {
  switch (act) {
    case moekit::Activation::kGeluErf:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case moekit::Activation::kGeluTanh:
      return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    case moekit::Activation::kRelu:
      return x > 0.0 ? x : 0.0;
    default:
      return std::numeric_limits<double>::quiet_NaN();
  }
}

// y (rows x out) = x w^T + b for one layer's block of w (rows [r0, r0 + out)).
inline Mat ref_linear(const Mat& x, moekit::MatrixView<const float> w, index_t r0, index_t out,
                      const float* b) {
  Mat y(x.rows, out);
  for (index_t i = 0; i < x.rows; ++i)
    for (index_t j = 0; j < out; ++j) {
      double acc = b[j];
      for (index_t k = 0; k < x.cols; ++k) acc += x(i, k) * double{w(r0 + j, k)};
      y(i, j) = acc;
    }
  return y;
}

inline void ref_layer_norm(Mat& x, const float* g, const float* b, double eps) {
  for (index_t i = 0; i < x.rows; ++i) {
    double mean = 0.0, var = 0.0;
    for (index_t k = 0; k < x.cols; ++k) mean += x(i, k);
    mean /= static_cast<double>(x.cols);
    for (index_t k = 0; k < x.cols; ++k) var += (x(i, k) - mean) * (x(i, k) - mean);
    var /= static_cast<double>(x.cols);
    for (index_t k = 0; k < x.cols; ++k)
      x(i, k) = g[k] * (x(i, k) - mean) / std::sqrt(var + eps) + b[k];
  }
}

// Self-attention of one padded sequence (W rows, mask[j] = 0 for padding).
inline Mat ref_attention(const moekit::cpu::BertEncoderConfig& c, const Mat& qkv,
                         const std::vector<int>& mask) {
  const index_t d = c.d_model, dh = d / c.num_heads, w = qkv.rows;
  Mat out(w, d);
  for (index_t h = 0; h < c.num_heads; ++h)
    for (index_t i = 0; i < w; ++i) {
      std::vector<double> p(static_cast<std::size_t>(w));
      double mx = -std::numeric_limits<double>::infinity();
      for (index_t j = 0; j < w; ++j) {
        double s = -std::numeric_limits<double>::infinity();
        if (mask[static_cast<std::size_t>(j)]) {
          s = 0.0;
          for (index_t k = 0; k < dh; ++k) s += qkv(i, h * dh + k) * qkv(j, d + h * dh + k);
          s /= std::sqrt(static_cast<double>(dh));
        }
        p[static_cast<std::size_t>(j)] = s;
        mx = std::max(mx, s);
      }
      double sum = 0.0;
      for (double& e : p) sum += (e = std::exp(e - mx));
      for (index_t k = 0; k < dh; ++k) {
        double acc = 0.0;
        for (index_t j = 0; j < w; ++j)
          acc += p[static_cast<std::size_t>(j)] / sum * qkv(j, 2 * d + h * dh + k);
        out(i, h * dh + k) = acc;
      }
    }
  return out;
}

// The encoder's output for one padded sequence of `ids` / `types` padded to
// width w (mask: 1 on the ids, 0 after), layers [0, layers).
inline Mat ref_bert(const moekit::cpu::BertEncoderConfig& c,
                    const moekit::cpu::BertEncoderWeights& wt, const std::vector<int>& ids,
                    const std::vector<int>& types, index_t w, int layers) {
  const index_t d = c.d_model, f = c.d_ff;
  const double eps = c.layer_norm_eps;
  const bool pre = c.norm == moekit::cpu::NormPlacement::kPre;
  std::vector<int> mask(static_cast<std::size_t>(w), 0);
  Mat h(w, d);
  for (index_t i = 0; i < w; ++i) {
    const bool real = i < static_cast<index_t>(ids.size());
    mask[static_cast<std::size_t>(i)] = real;
    const int id = real ? ids[static_cast<std::size_t>(i)] : 0;  // [PAD] = 0
    const int type = real && !types.empty() ? types[static_cast<std::size_t>(i)] : 0;
    for (index_t k = 0; k < d; ++k)
      h(i, k) = double{wt.word_embeddings(id, k)} + wt.position_embeddings(i, k) +
                wt.token_type_embeddings(type, k);
  }
  ref_layer_norm(h, wt.embedding_gamma.data(), wt.embedding_beta.data(), eps);
  for (int l = 0; l < layers; ++l) {
    Mat x = h;
    if (pre) ref_layer_norm(x, wt.ln1_gamma.row(l), wt.ln1_beta.row(l), eps);
    const Mat qkv = ref_linear(x, wt.w_qkv, 3 * d * l, 3 * d, wt.b_qkv.row(l));
    const Mat attn = ref_linear(ref_attention(c, qkv, mask), wt.w_out, d * l, d, wt.b_out.row(l));
    for (std::size_t i = 0; i < h.v.size(); ++i) h.v[i] += attn.v[i];
    if (!pre) ref_layer_norm(h, wt.ln1_gamma.row(l), wt.ln1_beta.row(l), eps);
    x = h;
    if (pre) ref_layer_norm(x, wt.ln2_gamma.row(l), wt.ln2_beta.row(l), eps);
    Mat mid = ref_linear(x, wt.w_ff1, f * l, f, wt.b_ff1.row(l));
    for (double& e : mid.v) e = ref_activation(c.activation, e);
    const Mat out = ref_linear(mid, wt.w_ff2, d * l, d, wt.b_ff2.row(l));
    for (std::size_t i = 0; i < h.v.size(); ++i) h.v[i] += out.v[i];
    if (!pre) ref_layer_norm(h, wt.ln2_gamma.row(l), wt.ln2_beta.row(l), eps);
  }
  if (pre && layers == c.num_layers && !wt.final_gamma.empty()) {
    ref_layer_norm(h, wt.final_gamma.data(), wt.final_beta.data(), eps);
  }
  return h;
}

}  // namespace moekit_test
