#pragma once
// A frozen pretrained transformer encoder of the BERT family on the CPU
// backend, inference only: the shared base of the multi-task model, loaded
// from Hugging Face checkpoints by moekit/io/bert.hpp.
//
// The math, for one sequence of m tokens (ids t_i, token types y_i, positions
// i = 0 .. m-1), d = d_model, H heads of width dh = d / H:
//   h_0 = LN_emb(word[t_i] + position[i] + token_type[y_i])
//   per layer, post-LN (BERT):
//     a   = LN_1(h + Attn(h) W_o^T + b_o)
//     h'  = LN_2(a + act(a W_1^T + b_1) W_2^T + b_2)
//   per layer, pre-LN:
//     a   = h + Attn(LN_1(h)) W_o^T + b_o
//     h'  = a + act(LN_2(a) W_1^T + b_1) W_2^T + b_2
//     (after the last layer, LN_final when its weights are given)
//   Attn(x): [q k v] = x W_qkv^T + b_qkv; for head j, with q_j, k_j, v_j its
//     dh columns: softmax(q_j k_j^T / sqrt(dh)) v_j, the heads side by side
//   LN(x) = gamma * (x - mean(x)) / sqrt(var(x) + eps) + beta  (per row, biased variance)
//   act: GELU, erf form 0.5 x (1 + erf(x / sqrt 2)) or tanh form, or ReLU
// A token attends to the tokens of its own sequence only, all of them (the
// padding mask of a padded batch, with no padding to mask).
//
// Batches: variable-length sequences packed without padding. hidden is N x d,
// sequence s its rows [offsets[s], offsets[s + 1]) (offsets: B + 1 entries,
// offsets[0] = 0, non-decreasing, offsets[B] = N); no compute is spent on
// padding. moekit/text/wordpiece.hpp's TokenBatch has this layout.
//
// Layers in steps. embed() writes h_0; run_layers(a, b) applies layers
// [a, b) in place, so the hidden states after any layer are at hand, per
// token or pooled (pool_sequences). Layer l only needs the hidden states of
// its sequences: a caller can run layers [0, 2), drop the sequences that have
// exited (gather_sequences), and run [2, 4) on the others; their results are
// bit-identical to a run of the whole batch.
//
// Weights (BertEncoderViews; row-major, torch.nn.Linear's [out, in]; the L
// layers stacked as in moekit/nn/mlp_encoder.hpp, layer l = rows
// [l r, (l + 1) r) of a matrix of r rows per layer):
//   word_embeddings        V x d               position_embeddings  P x d
//   token_type_embeddings  T x d (T = 0: none) embedding_gamma/beta d
//   w_qkv   (L 3d) x d   query, key, value     b_qkv   L x 3d
//   w_out   (L d) x d    attention output      b_out   L x d
//   w_ff1   (L d_ff) x d                        b_ff1   L x d_ff
//   w_ff2   (L d) x d_ff                        b_ff2   L x d
//   ln1_gamma, ln1_beta, ln2_gamma, ln2_beta    L x d each
//   final_gamma, final_beta   d, pre-LN only, or empty (no final LayerNorm)
// BertEncoderStorage owns weights of these shapes.
//
// Products. Every dense product runs on moekit's CPU GEMM engine
// (moekit/cpu/gemm/gemm.hpp): the four projections as one product over all
// N tokens each, attention's q k^T and p v per (sequence, head) in chunks of
// kRowChunk query rows. By default in fp32 from the weight views. For
// inference the projections' weights can be packed once (pack(weights,
// dtype), PackedBertWeights) in fp32 (the same bits as the views, without
// repacking them per call), bf16 or int8 (activations rounded to bf16, or
// quantized per token, on the fly); attention, LayerNorm, bias, activation
// and softmax stay fp32. bf16 and int8 are approximations of the fp32
// encoder (see docs/encoder.md for their measured error).
//
// Workspace: run_layers needs workspace_size(N, longest) bytes (longest: the
// longest sequence of the batch): N (4d + d_ff) floats for the activations,
// per OpenMP thread kRowChunk x longest floats of attention scores, and the
// GEMM engine's slot per thread (gemm_workspace_size; the thread count is
// max_threads() when the size is asked; a call on more threads is rejected).
// Nothing is allocated inside the calls.
//
// Batch and thread invariance. A sequence's outputs are bit-identical
// whatever else is in the batch, wherever it is in the batch, and whatever
// the thread count, in every dtype. Why:
//   - the engine computes every element of a product from its row of A, its
//     column of B and K alone, in an order fixed by K (fp32 and bf16: one
//     fused multiply-add chain over k; int8: exact integer sums, with the
//     row's scale from that row alone), whatever the other rows, the
//     blocking or the thread split;
//   - attention runs per (sequence, head); LayerNorm, bias, activation,
//     softmax and pooling are row-wise with a fixed order within the row;
//   - threads split sequences, heads, rows and columns: never a sum.
// The engine's fp32 (and FMA bf16, and int8) results are the same on every
// CPU path; AMX bf16 sums in its own order (see moekit/cpu/gemm/gemm.hpp),
// invariant on that path but not equal to the others.
//
// Threading: OpenMP, the caller's max_threads(). The engine splits each
// projection's rows and columns; attention's tasks are (sequence, head); the
// row-wise steps split rows. A single sequence still uses several threads.
//
// Validation (every call, before anything is written): views well formed and
// of the shapes above; offsets a valid partition of N rows; ids in
// [0, vocab_size), token types in [0, T); sequences no longer than P
// (max_positions); 0 <= first <= last <= L; the workspace large enough and
// float-aligned. Errors name the argument and the values: kShapeMismatch,
// kNullPointer, kInvalidArgument, kOutOfRange. Values are not checked for
// NaN/Inf. run_layers rejects (kInvalidArgument) hidden or the workspace
// overlapping each other, offsets or the projection weights; packed weights
// must be of this config, in one dtype (pack makes them so).
//
//   const moekit::cpu::BertEncoder encoder(config);
//   std::vector<std::byte> ws(encoder.workspace_size(batch.tokens(), batch.longest()));
//   encoder.forward(batch.ids_view(), {}, batch.offsets_view(), weights, hidden, ws_view);
//   // or, packed once for inference in int8:
//   const moekit::cpu::PackedBertWeights packed = encoder.pack(weights, GemmDtype::kInt8);
//   encoder.forward(batch.ids_view(), {}, batch.offsets_view(), weights, packed, hidden, ws_view);
//   moekit::cpu::pool_sequences(hidden, batch.offsets_view(), Pooling::kMean, true, pooled);

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <unsupported/Eigen/SpecialFunctions>

#include "moekit/core/activation.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/gemm/gemm.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/nn/param_count.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// Where each layer's LayerNorms sit.
enum class NormPlacement {
  kPost,  // BERT: LN(x + sublayer(x))
  kPre,   // x + sublayer(LN(x)), then an optional final LayerNorm
};

// The encoder's sizes and variant (Hugging Face's config.json names in
// parentheses; moekit/io/bert.hpp reads them).
struct BertEncoderConfig {
  index_t vocab_size = 0;       // V, rows of the word embeddings
  index_t d_model = 0;          // d (hidden_size)
  index_t num_heads = 0;        // H, dividing d
  index_t d_ff = 0;             // intermediate_size
  int num_layers = 0;           // L
  index_t max_positions = 0;    // P (max_position_embeddings): the longest sequence
  index_t type_vocab_size = 0;  // T (type_vocab_size), 0 for no token type embeddings
  Activation activation = Activation::kGeluErf;  // kGeluErf, kGeluTanh or kRelu
  NormPlacement norm = NormPlacement::kPost;     // kPost: BERT; kPre: pre-LN layers
  float layer_norm_eps = 1e-12f;                 // eps added to the variance in every LayerNorm
};

// The encoder's weights as views (shapes at the top of this file; layer l of
// a stacked matrix is its rows [l r, (l + 1) r)). T = const float: read by
// the encoder (BertEncoderWeights); T = float: written by a loader.
template <class T>
struct BertEncoderViews {
  MatrixView<T> word_embeddings{};        // V x d, row t: token id t
  MatrixView<T> position_embeddings{};    // P x d, row i: position i
  MatrixView<T> token_type_embeddings{};  // T x d, or 0 x d (no token types)
  VectorView<T> embedding_gamma{};        // d, embedding LayerNorm scale
  VectorView<T> embedding_beta{};         // d, embedding LayerNorm shift
  MatrixView<T> w_qkv{};                  // (L 3d) x d: query, key, value rows per layer
  MatrixView<T> b_qkv{};                  // L x 3d
  MatrixView<T> w_out{};                  // (L d) x d, attention output projection
  MatrixView<T> b_out{};                  // L x d
  MatrixView<T> ln1_gamma{};              // L x d, LN_1 scale (after attention; pre-LN: before)
  MatrixView<T> ln1_beta{};               // L x d, LN_1 shift
  MatrixView<T> w_ff1{};                  // (L d_ff) x d, FFN first product
  MatrixView<T> b_ff1{};                  // L x d_ff
  MatrixView<T> w_ff2{};                  // (L d) x d_ff, FFN second product
  MatrixView<T> b_ff2{};                  // L x d
  MatrixView<T> ln2_gamma{};              // L x d, LN_2 scale (after the FFN; pre-LN: before)
  MatrixView<T> ln2_beta{};               // L x d, LN_2 shift
  VectorView<T> final_gamma{};            // d, final LayerNorm scale (pre-LN only), or empty
  VectorView<T> final_beta{};             // d, final LayerNorm shift, or empty

  // The same weights, read-only.
  operator BertEncoderViews<const T>() const requires(!std::is_const_v<T>) {
    return {word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embedding_gamma,
            embedding_beta,
            w_qkv,
            b_qkv,
            w_out,
            b_out,
            ln1_gamma,
            ln1_beta,
            w_ff1,
            b_ff1,
            w_ff2,
            b_ff2,
            ln2_gamma,
            ln2_beta,
            final_gamma,
            final_beta};
  }
};
// The weights as BertEncoder reads them.
using BertEncoderWeights = BertEncoderViews<const float>;

// The projections' weights packed once for the GEMM engine in one dtype
// (BertEncoder::pack): per matrix the L layers as the groups of one
// PackedMatrix, group l = layer l's W^T. Empty (no groups) for L = 0.
struct PackedBertWeights {
  PackedMatrix w_qkv{};  // the query, key and value projections, L groups of d x 3d
  PackedMatrix w_out{};  // the attention output projection, L groups of d x d
  PackedMatrix w_ff1{};  // the FFN's first product, L groups of d x d_ff
  PackedMatrix w_ff2{};  // the FFN's second product, L groups of d_ff x d
  // The dtype the projections are packed in (one for all four).
  GemmDtype dtype() const { return w_qkv.dtype(); }
};

// How pool_sequences makes one vector of a sequence's tokens.
enum class Pooling {
  kCls,   // the first token's hidden state
  kMean,  // the mean over the sequence's tokens (the attention mask)
  kMax,   // the largest value of each component
};

namespace detail {

// Attention's query rows per chunk: its scores need kRowChunk x m floats.
inline constexpr index_t kRowChunk = 32;

// Calls f(first_row, rows) for the chunks of an m-row sequence.
template <class F>
void for_row_chunks(index_t m, F&& f) {
  for (index_t r = 0; r < m; r += kRowChunk) f(r, std::min(kRowChunk, m - r));
}

// ---- row-wise steps ----------------------------------------------------------------
// Row-wise steps work on blocks of kLanes floats copied into an aligned
// fixed-size array (the last block padded): every element goes through the
// same vector code whatever its address, and sums run lane-wise in block
// order, then across the lanes in a fixed order. (Eigen's own loops over an
// unaligned row treat its first and last elements apart, with scalar code
// that may round differently, so a row's result would depend on where the
// row sits in memory.)

inline constexpr index_t kLanes = 16;
using Lanes = Eigen::Array<float, kLanes, 1>;

// Calls f(lanes, first, count) for the blocks of x[0, n); lanes beyond count hold `pad`.
template <class F>
void for_blocks(const float* x, index_t n, float pad, F&& f) {
  Lanes v;
  for (index_t j = 0; j < n; j += kLanes) {
    const index_t count = std::min(kLanes, n - j);
    if (count < kLanes) v.setConstant(pad);
    std::memcpy(v.data(), x + j, static_cast<std::size_t>(count) * sizeof(float));
    f(v, j, count);
  }
}

// y[j] = f(x block)[j] for j in [0, n) (y may be x); f maps Lanes to Lanes.
template <class F>
void transform_row(const float* x, index_t n, float* y, F&& f) {
  for_blocks(x, n, 0.0f, [&](const Lanes& v, index_t j, index_t count) {
    const Lanes out = f(v, j);
    std::memcpy(y + j, out.data(), static_cast<std::size_t>(count) * sizeof(float));
  });
}

// The lanes of x[j, j + kLanes) (zero past n).
inline Lanes lanes_at(const float* x, index_t n, index_t j) {
  Lanes v = Lanes::Zero();
  std::memcpy(v.data(), x + j, static_cast<std::size_t>(std::min(kLanes, n - j)) * sizeof(float));
  return v;
}

inline float row_sum(const float* x, index_t n) {
  Lanes acc = Lanes::Zero();
  for_blocks(x, n, 0.0f, [&](const Lanes& v, index_t, index_t) { acc += v; });
  return acc.sum();
}

// out = LN(x) with gamma, beta (out may be x).
inline void layer_norm_row(const float* x, const float* gamma, const float* beta, float eps,
                           index_t d, float* out) {
  const float mean = row_sum(x, d) / static_cast<float>(d);
  Lanes acc = Lanes::Zero();
  for_blocks(x, d, mean, [&](const Lanes& v, index_t, index_t) { acc += (v - mean).square(); });
  const float inv = 1.0f / std::sqrt(acc.sum() / static_cast<float>(d) + eps);
  transform_row(x, d, out, [&](const Lanes& v, index_t j) -> Lanes {
    return (v - mean) * inv * lanes_at(gamma, d, j) + lanes_at(beta, d, j);
  });
}

// x = act(x + bias) on one row (Eigen's vectorised erf / tanh).
inline void bias_activation_row(Activation act, const float* bias, index_t n, float* x) {
  namespace ad = activation_detail;
  transform_row(x, n, x, [&](const Lanes& v, index_t j) -> Lanes {
    const Lanes a = v + lanes_at(bias, n, j);
    switch (act) {
      case Activation::kGeluErf:
        return 0.5f * a * (1.0f + (a * ad::kInvSqrt2).erf());
      case Activation::kGeluTanh:
        return 0.5f * a * (1.0f + (ad::kSqrt2OverPi * (a + ad::kGeluCubic * a.cube())).tanh());
      case Activation::kRelu:
        return a.max(0.0f);
      case Activation::kSilu:
        break;  // not offered by the encoder (its constructor rejects it)
    }
    return a;
  });
}

// x += a (+ b where b is not null), element-wise.
inline void add_rows(const float* a, const float* b, index_t n, float* x) {
  transform_row(x, n, x, [&](const Lanes& v, index_t j) -> Lanes {
    const Lanes sum = lanes_at(a, n, j);
    return b == nullptr ? Lanes(v + sum) : Lanes(v + (sum + lanes_at(b, n, j)));
  });
}

// Softmax of s * scale over one row, in place.
inline void softmax_row(float scale, index_t n, float* s) {
  Lanes top = Lanes::Constant(-std::numeric_limits<float>::infinity());
  for_blocks(s, n, -std::numeric_limits<float>::infinity(),
             [&](const Lanes& v, index_t, index_t) { top = top.max(v * scale); });
  const float mx = top.maxCoeff();
  Lanes acc = Lanes::Zero();
  transform_row(s, n, s, [&](const Lanes& v, index_t j) -> Lanes {
    Lanes e = (v * scale - mx).exp();
    const index_t count = std::min(kLanes, n - j);
    for (index_t i = count; i < kLanes; ++i) e[i] = 0.0f;  // padding adds nothing
    acc += e;
    return e;
  });
  const float inv = 1.0f / acc.sum();
  transform_row(s, n, s, [&](const Lanes& v, index_t) -> Lanes { return v * inv; });
}

}  // namespace detail

// Checks that offsets (B + 1 entries) partition `rows` rows; returns B.
// `name` is the argument's name.
inline index_t check_offsets(VectorView<const index_t> offsets, index_t rows, const char* name) {
  check_view(offsets, name);
  MOEKIT_CHECK(offsets.size() >= 1, Errc::kShapeMismatch, name,
               " is empty; it needs B + 1 entries (one, 0, for no sequences)");
  MOEKIT_CHECK(offsets[0] == 0, Errc::kInvalidArgument, name, "[0] = ", offsets[0], ", expected 0");
  const index_t b = offsets.size() - 1;
  for (index_t s = 0; s < b; ++s) {
    MOEKIT_CHECK(offsets[s + 1] >= offsets[s], Errc::kInvalidArgument, name, " decreases: ", name,
                 "[", s, "] = ", offsets[s], " > ", name, "[", s + 1, "] = ", offsets[s + 1]);
  }
  MOEKIT_CHECK(offsets[b] == rows, Errc::kShapeMismatch, name, "[", b, "] = ", offsets[b],
               " but there are ", rows, " rows");
  return b;
}

// The longest sequence of a valid partition.
inline index_t longest_sequence(VectorView<const index_t> offsets) {
  index_t m = 0;
  for (index_t s = 0; s + 1 < offsets.size(); ++s) m = std::max(m, offsets[s + 1] - offsets[s]);
  return m;
}

// The encoder's computation for one config; holds no weights (they are
// passed to every call as BertEncoderWeights) and no mutable state.
class BertEncoder {
 public:
  // Checks the config (sizes in range, num_heads dividing d_model, a supported
  // activation and norm, eps > 0); kInvalidArgument naming the field.
  explicit BertEncoder(const BertEncoderConfig& config) : config_(config) { validate(config); }

  // The config given at construction.
  const BertEncoderConfig& config() const { return config_; }
  // dh = d_model / num_heads, the width of one attention head.
  index_t head_dim() const { return config_.d_model / config_.num_heads; }
  // Whether the layers are pre-LN (NormPlacement::kPre).
  bool pre_norm() const { return config_.norm == NormPlacement::kPre; }

  // Every parameter is frozen (final LayerNorm counted for pre-LN).
  ParamCount params() const {
    const BertEncoderConfig& c = config_;
    const param_t d = c.d_model, f = c.d_ff, layers = c.num_layers;
    const param_t layer = 3 * d * d + 3 * d + d * d + d + 2 * d * f + f + d + 4 * d;
    const param_t total = (c.vocab_size + c.max_positions + c.type_vocab_size) * d + 2 * d +
                          layers * layer + (pre_norm() ? 2 * d : 0);
    return {total, total, 0};
  }

  // Bytes of workspace run_layers / forward need for `tokens` tokens whose
  // longest sequence has `longest` tokens (see the top of this file).
  index_t workspace_size(index_t tokens, index_t longest) const {
    MOEKIT_CHECK_GE(tokens, 0);
    MOEKIT_CHECK_GE(longest, 0);
    return workspace_bytes(tokens, longest, max_threads());
  }

  // The projections' weights of `w` packed once for the engine in `dtype`
  // (allocates; see the top of this file). Checks the weights as forward does.
  PackedBertWeights pack(const BertEncoderWeights& w, GemmDtype dtype) const {
    MOEKIT_API("cpu::BertEncoder::pack");
    check_weights(w, "weights");
    MOEKIT_CHECK_ARG(is_gemm_dtype(dtype), "dtype = ", static_cast<int>(dtype),
                     " is not a GemmDtype");
    PackedBertWeights p;
    const index_t layers = config_.num_layers;
    if (layers == 0) return p;
    p.w_qkv = PackedMatrix(dtype, Op::kTrans, w.w_qkv, layers);
    p.w_out = PackedMatrix(dtype, Op::kTrans, w.w_out, layers);
    p.w_ff1 = PackedMatrix(dtype, Op::kTrans, w.w_ff1, layers);
    p.w_ff2 = PackedMatrix(dtype, Op::kTrans, w.w_ff2, layers);
    return p;
  }

  // h_0 for every token: hidden (N x d) = LN_emb(word + position + type).
  // ids: N; types: N or empty (all 0); offsets: B + 1.
  void embed(VectorView<const std::int32_t> ids, VectorView<const std::int32_t> types,
             VectorView<const index_t> offsets, const BertEncoderWeights& w,
             MatrixView<float> hidden) const {
    MOEKIT_API("cpu::BertEncoder::embed");
    const BertEncoderConfig& c = config_;
    check_view(ids, "ids");
    [[maybe_unused]] const index_t n = ids.size();
    const index_t d = c.d_model;
    check_inputs(ids, types, offsets, w, hidden);
    const index_t b = offsets.size() - 1;
    MOEKIT_PARALLEL_FOR_IF(n * d >= kParallelGrain)
    for (index_t s = 0; s < b; ++s) {
      for (index_t t = offsets[s]; t < offsets[s + 1]; ++t) {
        float* out = hidden.row(t);
        std::memcpy(out, w.word_embeddings.row(ids[t]),
                    static_cast<std::size_t>(d) * sizeof(float));
        detail::add_rows(w.position_embeddings.row(t - offsets[s]),
                         c.type_vocab_size > 0
                             ? w.token_type_embeddings.row(types.empty() ? 0 : types[t])
                             : nullptr,
                         d, out);
        detail::layer_norm_row(out, w.embedding_gamma.data(), w.embedding_beta.data(),
                               c.layer_norm_eps, d, out);
      }
    }
  }

  // Layers [first, last) on hidden (N x d), in place.
  void run_layers(int first, int last, VectorView<const index_t> offsets,
                  const BertEncoderWeights& w, MatrixView<float> hidden,
                  VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::BertEncoder::run_layers");
    run_layers(first, last, offsets, w, nullptr, hidden, workspace);
  }

  // The same with the projections on `packed` (pack(w, dtype)); w gives the
  // embeddings, biases and LayerNorms (its projection views are checked but
  // not read).
  void run_layers(int first, int last, VectorView<const index_t> offsets,
                  const BertEncoderWeights& w, const PackedBertWeights& packed,
                  MatrixView<float> hidden, VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::BertEncoder::run_layers");
    run_layers(first, last, offsets, w, &packed, hidden, workspace);
  }

  // embed, then all layers: hidden = the encoder's output.
  void forward(VectorView<const std::int32_t> ids, VectorView<const std::int32_t> types,
               VectorView<const index_t> offsets, const BertEncoderWeights& w,
               MatrixView<float> hidden, VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::BertEncoder::forward");
    embed(ids, types, offsets, w, hidden);
    run_layers(0, config_.num_layers, offsets, w, hidden, workspace);
  }

  // The same with the projections on `packed`.
  void forward(VectorView<const std::int32_t> ids, VectorView<const std::int32_t> types,
               VectorView<const index_t> offsets, const BertEncoderWeights& w,
               const PackedBertWeights& packed, MatrixView<float> hidden,
               VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::BertEncoder::forward");
    embed(ids, types, offsets, w, hidden);
    run_layers(0, config_.num_layers, offsets, w, packed, hidden, workspace);
  }

  // Checks weight views against the config (shapes at the top of this file);
  // `name` names them in errors.
  template <class T>
  void check_weights(const BertEncoderViews<T>& w, const char* name) const {
    const BertEncoderConfig& c = config_;
    const index_t d = c.d_model, f = c.d_ff, layers = c.num_layers;
    // "<name>.<field>" in a buffer on the stack: the checks run on every
    // call, which allocates nothing.
    char buffer[96];
    const auto field = [&](const char* s) -> const char* {
      std::snprintf(buffer, sizeof buffer, "%s.%s", name, s);
      return buffer;
    };
    check_shape(w.word_embeddings, c.vocab_size, d, field("word_embeddings"));
    check_shape(w.position_embeddings, c.max_positions, d, field("position_embeddings"));
    if (c.type_vocab_size > 0) {
      check_shape(w.token_type_embeddings, c.type_vocab_size, d, field("token_type_embeddings"));
    } else {
      MOEKIT_CHECK(w.token_type_embeddings.empty(), Errc::kInvalidArgument, name,
                   ".token_type_embeddings must be empty when type_vocab_size = 0");
    }
    check_shape(w.embedding_gamma, d, field("embedding_gamma"));
    check_shape(w.embedding_beta, d, field("embedding_beta"));
    check_shape(w.w_qkv, layers * 3 * d, d, field("w_qkv"));
    check_shape(w.b_qkv, layers, 3 * d, field("b_qkv"));
    check_shape(w.w_out, layers * d, d, field("w_out"));
    check_shape(w.b_out, layers, d, field("b_out"));
    check_shape(w.ln1_gamma, layers, d, field("ln1_gamma"));
    check_shape(w.ln1_beta, layers, d, field("ln1_beta"));
    check_shape(w.w_ff1, layers * f, d, field("w_ff1"));
    check_shape(w.b_ff1, layers, f, field("b_ff1"));
    check_shape(w.w_ff2, layers * d, f, field("w_ff2"));
    check_shape(w.b_ff2, layers, d, field("b_ff2"));
    check_shape(w.ln2_gamma, layers, d, field("ln2_gamma"));
    check_shape(w.ln2_beta, layers, d, field("ln2_beta"));
    if (pre_norm() && !w.final_gamma.empty()) {
      check_shape(w.final_gamma, d, field("final_gamma"));
      check_shape(w.final_beta, d, field("final_beta"));
    } else {
      MOEKIT_CHECK(w.final_gamma.empty() && w.final_beta.empty(), Errc::kInvalidArgument, name,
                   ".final_gamma / final_beta must be empty",
                   pre_norm() ? " together" : " for NormPlacement::kPost");
    }
  }

 private:
  // Layers [first, last) with the projections on `packed` or, if null, on w.
  void run_layers(int first, int last, VectorView<const index_t> offsets,
                  const BertEncoderWeights& w, const PackedBertWeights* packed,
                  MatrixView<float> hidden, VectorView<std::byte> workspace) const {
    const BertEncoderConfig& c = config_;
    check_view(hidden, "hidden");
    check_shape(hidden, hidden.rows(), c.d_model, "hidden");
    check_offsets(offsets, hidden.rows(), "offsets");
    MOEKIT_CHECK_ARG(first >= 0 && first <= last && last <= c.num_layers, "layers [", first, ", ",
                     last, ") are not within [0, ", c.num_layers, ")");
    check_weights(w, "weights");
    if (packed != nullptr) check_packed(*packed);
    const index_t longest = longest_sequence(offsets);
    MOEKIT_CHECK(longest <= c.max_positions, Errc::kOutOfRange, "a sequence of ", longest,
                 " tokens exceeds max_positions = ", c.max_positions);
    const int threads = max_threads();
    const index_t need = first == last ? 0 : workspace_bytes(hidden.rows(), longest, threads);
    if (need > 0) {
      check_view(workspace, "workspace");
      MOEKIT_CHECK(workspace.size() >= need, Errc::kShapeMismatch, "workspace has ",
                   workspace.size(), " bytes, workspace_size(", hidden.rows(), ", ", longest,
                   ") = ", need, " on ", threads, " threads");
      MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace.data()) % alignof(float) == 0,
                   Errc::kInvalidArgument, "workspace is not aligned to ", alignof(float),
                   " bytes");
    }
    OverlapCheck("cpu::BertEncoder::run_layers")
        .out({{hidden, "hidden"}, {workspace.segment(0, need), "workspace"}})
        .in({{offsets, "offsets"},
             {w.w_qkv, "weights.w_qkv"},
             {w.w_out, "weights.w_out"},
             {w.w_ff1, "weights.w_ff1"},
             {w.w_ff2, "weights.w_ff2"}})
        .check();
    if (hidden.rows() == 0 || first == last) return;
    const Buffers buf = buffers(workspace, hidden.rows(), longest, threads);
    for (int l = first; l < last; ++l) layer(l, offsets, w, packed, hidden, buf);
    if (pre_norm() && last == c.num_layers && !w.final_gamma.empty()) {
      rows_parallel(hidden.rows(), [&](index_t t) {
        detail::layer_norm_row(hidden.row(t), w.final_gamma.data(), w.final_beta.data(),
                               c.layer_norm_eps, c.d_model, hidden.row(t));
      });
    }
  }

  // Errors name run_layers, the public function that checks packed weights.
  void check_packed(const PackedBertWeights& p) const {
    const index_t d = config_.d_model, f = config_.d_ff, layers = config_.num_layers;
    const auto check = [&](const PackedMatrix& m, index_t k, index_t n, const char* name) {
      detail::check_packed_matrix("cpu::BertEncoder::run_layers", m, layers, k, n, p.dtype(), name,
                                  "packed.w_qkv", "BertEncoder::pack");
    };
    check(p.w_qkv, d, 3 * d, "packed.w_qkv");
    check(p.w_out, d, d, "packed.w_out");
    check(p.w_ff1, d, f, "packed.w_ff1");
    check(p.w_ff2, f, d, "packed.w_ff2");
  }

  // Workspace regions: floats qkv N x 3d, ctx N x d, ff N x d_ff, the
  // attention scores (kRowChunk x longest per thread), then the GEMM
  // engine's slots, one per thread.
  struct Buffers {
    MatrixView<float> qkv, ctx, ff;
    float* scores = nullptr;
    index_t scores_per_thread = 0;
    VectorView<std::byte> engine;  // gemm_workspace_size(threads) bytes

    // Thread t's own engine workspace, for products inside a parallel region
    // (slots are kSlotBytes apart whatever gemm's alignment).
    VectorView<std::byte> engine_of_thread(int t) const {
      return engine.segment(index_t{t} * detail::kSlotBytes, gemm_workspace_size(1));
    }
  };

  index_t floats_needed(index_t tokens, index_t longest, int threads) const {
    const index_t d = config_.d_model;
    return tokens * (4 * d + config_.d_ff) + index_t{threads} * detail::kRowChunk * longest;
  }

  // 0 for no tokens (nothing runs).
  index_t workspace_bytes(index_t tokens, index_t longest, int threads) const {
    if (tokens == 0) return 0;
    return floats_needed(tokens, longest, threads) * index_t{sizeof(float)} +
           gemm_workspace_size(threads);
  }

  Buffers buffers(VectorView<std::byte> workspace, index_t n, index_t longest, int threads) const {
    const index_t d = config_.d_model;
    float* p = reinterpret_cast<float*>(workspace.data());
    Buffers b;
    b.qkv = MatrixView<float>(p, n, 3 * d);
    b.ctx = MatrixView<float>(p + 3 * n * d, n, d);
    b.ff = MatrixView<float>(p + 4 * n * d, n, config_.d_ff);
    b.scores = p + n * (4 * d + config_.d_ff);
    b.scores_per_thread = detail::kRowChunk * longest;
    const index_t floats = floats_needed(n, longest, threads) * index_t{sizeof(float)};
    b.engine = workspace.segment(floats, gemm_workspace_size(threads));
    return b;
  }

  // One layer on hidden (see the math at the top of this file).
  void layer(int l, VectorView<const index_t> offsets, const BertEncoderWeights& w,
             const PackedBertWeights* packed, MatrixView<float> h, const Buffers& buf) const {
    const BertEncoderConfig& c = config_;
    const index_t d = c.d_model, f = c.d_ff, n = h.rows();
    const float eps = c.layer_norm_eps;
    const MatrixView<const float> wqkv = w.w_qkv.middle_rows(l * 3 * d, 3 * d);
    const MatrixView<const float> wo = w.w_out.middle_rows(l * d, d);
    const MatrixView<const float> w1 = w.w_ff1.middle_rows(l * f, f);
    const MatrixView<const float> w2 = w.w_ff2.middle_rows(l * d, d);
    const float* ln1_g = w.ln1_gamma.row(l);
    const float* ln1_b = w.ln1_beta.row(l);
    const float* ln2_g = w.ln2_gamma.row(l);
    const float* ln2_b = w.ln2_beta.row(l);
    const float* b_out = w.b_out.row(l);
    const float* b_ff2 = w.b_ff2.row(l);
    const MatrixView<float> tmp = buf.qkv.block(0, 0, n, d);  // free once attention is done

    // Attention: the input of the QKV product is h (post-LN) or LN_1(h) in ctx (pre-LN).
    MatrixView<const float> x = h;
    if (pre_norm()) {
      rows_parallel(n, [&](index_t t) {
        detail::layer_norm_row(h.row(t), ln1_g, ln1_b, eps, d, buf.ctx.row(t));
      });
      x = buf.ctx;
    }
    linear(x, Projection{wqkv, packed ? &packed->w_qkv : nullptr, l}, w.b_qkv.row(l), nullptr,
           buf.qkv, buf);
    attention(offsets, buf);
    linear(buf.ctx, Projection{wo, packed ? &packed->w_out : nullptr, l}, nullptr, nullptr, tmp,
           buf);
    rows_parallel(n, [&](index_t t) {
      detail::add_rows(tmp.row(t), b_out, d, h.row(t));
      if (!pre_norm()) detail::layer_norm_row(h.row(t), ln1_g, ln1_b, eps, d, h.row(t));
    });

    // FFN.
    x = h;
    if (pre_norm()) {
      rows_parallel(n, [&](index_t t) {
        detail::layer_norm_row(h.row(t), ln2_g, ln2_b, eps, d, buf.ctx.row(t));
      });
      x = buf.ctx;
    }
    linear(x, Projection{w1, packed ? &packed->w_ff1 : nullptr, l}, w.b_ff1.row(l), &c.activation,
           buf.ff, buf);
    linear(buf.ff, Projection{w2, packed ? &packed->w_ff2 : nullptr, l}, nullptr, nullptr, tmp,
           buf);
    rows_parallel(n, [&](index_t t) {
      detail::add_rows(tmp.row(t), b_ff2, d, h.row(t));
      if (!pre_norm()) detail::layer_norm_row(h.row(t), ln2_g, ln2_b, eps, d, h.row(t));
    });
  }

  // A layer's projection weight W (out x in): its view, or group `layer`
  // of its packed form.
  struct Projection {
    MatrixView<const float> w;
    const PackedMatrix* packed = nullptr;
    index_t layer = 0;
  };

  // y = x W^T, one product on the engine over all rows (the engine makes it
  // batch invariant); then, where given, y += bias and y = act(y) (act only
  // with a bias).
  static void linear(MatrixView<const float> x, const Projection& p, const float* bias,
                     const Activation* act, MatrixView<float> y, const Buffers& buf) {
    if (p.packed != nullptr) {
      gemm({p.packed->dtype()}, x, *p.packed, p.layer, y, buf.engine);
    } else {
      gemm({GemmDtype::kFloat32, Op::kNone, Op::kTrans}, x, p.w, y, buf.engine);
    }
    if (bias == nullptr) return;
    rows_parallel(y.rows(), [&](index_t t) {
      if (act == nullptr) {
        detail::add_rows(bias, nullptr, y.cols(), y.row(t));
      } else {
        detail::bias_activation_row(*act, bias, y.cols(), y.row(t));
      }
    });
  }

  // ctx = the attention of every (sequence, head) over buf.qkv.
  void attention(VectorView<const index_t> offsets, const Buffers& buf) const {
    const index_t d = config_.d_model, heads = config_.num_heads, dh = head_dim();
    const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
    const index_t tasks = (offsets.size() - 1) * heads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (index_t task = 0; task < tasks; ++task) {
      const index_t s = task / heads, hd = task % heads;
      const index_t r0 = offsets[s], m = offsets[s + 1] - r0;
      if (m == 0) continue;
      const MatrixView<const float> q = buf.qkv.block(r0, hd * dh, m, dh);
      const MatrixView<const float> k = buf.qkv.block(r0, d + hd * dh, m, dh);
      const MatrixView<const float> v = buf.qkv.block(r0, 2 * d + hd * dh, m, dh);
      float* scratch = buf.scores + index_t{thread_id()} * buf.scores_per_thread;
      // Inside this parallel region each product runs on this thread, in its own slot.
      const VectorView<std::byte> engine = buf.engine_of_thread(thread_id());
      detail::for_row_chunks(m, [&](index_t r, index_t rows) {
        const MatrixView<float> p(scratch, rows, m);
        gemm({GemmDtype::kFloat32, Op::kNone, Op::kTrans}, q.middle_rows(r, rows), k, p, engine);
        for (index_t i = 0; i < rows; ++i) detail::softmax_row(scale, m, p.row(i));
        gemm({}, p, v, buf.ctx.block(r0 + r, hd * dh, rows, dh), engine);
      });
    }
  }

  template <class F>
  static void rows_parallel(index_t n, F&& f) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (index_t t = 0; t < n; ++t) f(t);
  }

  void check_inputs(VectorView<const std::int32_t> ids, VectorView<const std::int32_t> types,
                    VectorView<const index_t> offsets, const BertEncoderWeights& w,
                    MatrixView<float> hidden) const {
    const BertEncoderConfig& c = config_;
    const index_t n = ids.size();
    check_shape(hidden, n, c.d_model, "hidden");
    const index_t b = check_offsets(offsets, n, "offsets");
    check_view(types, "types");
    MOEKIT_CHECK(types.empty() || types.size() == n, Errc::kShapeMismatch, "types has ",
                 types.size(), " entries, expected ", n, " (one per id) or none");
    check_weights(w, "weights");
    for (index_t t = 0; t < n; ++t) {
      MOEKIT_CHECK(ids[t] >= 0 && ids[t] < c.vocab_size, Errc::kOutOfRange, "ids[", t,
                   "] = ", ids[t], " is outside [0, vocab_size = ", c.vocab_size, ")");
    }
    for (index_t t = 0; t < types.size(); ++t) {
      MOEKIT_CHECK(types[t] >= 0 && types[t] < std::max<index_t>(c.type_vocab_size, 1),
                   Errc::kOutOfRange, "types[", t, "] = ", types[t],
                   " is outside [0, type_vocab_size = ", c.type_vocab_size, ")");
    }
    for (index_t s = 0; s < b; ++s) {
      MOEKIT_CHECK(offsets[s + 1] - offsets[s] <= c.max_positions, Errc::kOutOfRange, "sequence ",
                   s, " has ", offsets[s + 1] - offsets[s],
                   " tokens, more than max_positions = ", c.max_positions);
    }
  }

  static void validate(const BertEncoderConfig& c) {
    MOEKIT_CHECK_ARG(c.vocab_size >= 1, "config.vocab_size = ", c.vocab_size,
                     " must be at least 1");
    MOEKIT_CHECK_ARG(c.d_model >= 1, "config.d_model = ", c.d_model, " must be at least 1");
    MOEKIT_CHECK_ARG(c.num_heads >= 1 && c.d_model % c.num_heads == 0,
                     "config.num_heads = ", c.num_heads,
                     " must be at least 1 and divide d_model = ", c.d_model);
    MOEKIT_CHECK_ARG(c.d_ff >= 1, "config.d_ff = ", c.d_ff, " must be at least 1");
    MOEKIT_CHECK_ARG(c.num_layers >= 0, "config.num_layers = ", c.num_layers,
                     " must be non-negative");
    MOEKIT_CHECK_ARG(c.max_positions >= 1, "config.max_positions = ", c.max_positions,
                     " must be at least 1");
    MOEKIT_CHECK_ARG(c.type_vocab_size >= 0, "config.type_vocab_size = ", c.type_vocab_size,
                     " must be non-negative");
    MOEKIT_CHECK_ARG(c.activation == Activation::kGeluErf ||
                         c.activation == Activation::kGeluTanh || c.activation == Activation::kRelu,
                     "config.activation = ", static_cast<int>(c.activation),
                     " is not kGeluErf, kGeluTanh or kRelu");
    MOEKIT_CHECK_ARG(c.norm == NormPlacement::kPost || c.norm == NormPlacement::kPre,
                     "config.norm = ", static_cast<int>(c.norm), " is not a NormPlacement");
    MOEKIT_CHECK_ARG(std::isfinite(c.layer_norm_eps) && c.layer_norm_eps > 0.0f,
                     "config.layer_norm_eps = ", c.layer_norm_eps, " must be finite and positive");
  }

  BertEncoderConfig config_;
};

// Weights of a config's shapes in owned memory (zero until filled, e.g. by
// moekit/io/bert.hpp's loader).
class BertEncoderStorage {
 public:
  // Allocates zeroed weights of c's shapes (c is validated as BertEncoder does).
  explicit BertEncoderStorage(const BertEncoderConfig& c) {
    const BertEncoder check(c);  // validates c
    const index_t d = c.d_model, f = c.d_ff, layers = c.num_layers;
    const bool final_norm = c.norm == NormPlacement::kPre;
    views_.word_embeddings = matrix(c.vocab_size, d);
    views_.position_embeddings = matrix(c.max_positions, d);
    views_.token_type_embeddings = matrix(c.type_vocab_size, d);
    views_.embedding_gamma = vector(d);
    views_.embedding_beta = vector(d);
    views_.w_qkv = matrix(layers * 3 * d, d);
    views_.b_qkv = matrix(layers, 3 * d);
    views_.w_out = matrix(layers * d, d);
    views_.b_out = matrix(layers, d);
    views_.ln1_gamma = matrix(layers, d);
    views_.ln1_beta = matrix(layers, d);
    views_.w_ff1 = matrix(layers * f, d);
    views_.b_ff1 = matrix(layers, f);
    views_.w_ff2 = matrix(layers * d, f);
    views_.b_ff2 = matrix(layers, d);
    views_.ln2_gamma = matrix(layers, d);
    views_.ln2_beta = matrix(layers, d);
    views_.final_gamma = vector(final_norm ? d : 0);
    views_.final_beta = vector(final_norm ? d : 0);
  }
  BertEncoderStorage(const BertEncoderStorage&) = delete;
  BertEncoderStorage& operator=(const BertEncoderStorage&) = delete;
  // Movable: the views keep pointing at the moved memory.
  BertEncoderStorage(BertEncoderStorage&&) = default;
  // Move assignment: frees this storage's weights and takes the other's.
  BertEncoderStorage& operator=(BertEncoderStorage&&) = default;

  // Writable views of the weights (to fill them, e.g. io::load_bert_weights).
  const BertEncoderViews<float>& views() { return views_; }
  // Read-only views of the weights, for the encoder's calls.
  BertEncoderWeights weights() const { return views_; }

 private:
  MatrixView<float> matrix(index_t rows, index_t cols) {
    auto& v = blocks_.emplace_back(static_cast<std::size_t>(rows * cols), 0.0f);
    return {v.data(), rows, cols};
  }
  VectorView<float> vector(index_t n) {
    auto& v = blocks_.emplace_back(static_cast<std::size_t>(n), 0.0f);
    return {v.data(), n};
  }

  std::vector<std::vector<float>> blocks_;
  BertEncoderViews<float> views_;
};

// out (B x d) = one vector per sequence of hidden (N x d): the first token,
// the mean or the component-wise max over its tokens; with `normalize`,
// divided by max(||v||_2, 1e-12) (torch.nn.functional.normalize). An empty
// sequence pools to zeros. out must not overlap hidden.
inline void pool_sequences(MatrixView<const float> hidden, VectorView<const index_t> offsets,
                           Pooling pooling, bool normalize, MatrixView<float> out) {
  check_view(hidden, "hidden");
  const index_t d = hidden.cols();
  const index_t b = check_offsets(offsets, hidden.rows(), "offsets");
  check_shape(out, b, d, "out");
  MOEKIT_CHECK_ARG(
      pooling == Pooling::kCls || pooling == Pooling::kMean || pooling == Pooling::kMax,
      "pooling = ", static_cast<int>(pooling), " is not a Pooling");
  MOEKIT_PARALLEL_FOR_IF(hidden.rows() * d >= kParallelGrain)
  for (index_t s = 0; s < b; ++s) {
    float* o = out.row(s);
    const index_t r0 = offsets[s], m = offsets[s + 1] - r0;
    if (m == 0) {
      std::fill(o, o + d, 0.0f);
      continue;
    }
    std::memcpy(o, hidden.row(r0), static_cast<std::size_t>(d) * sizeof(float));
    for (index_t t = 1; t < m && pooling != Pooling::kCls; ++t) {
      detail::transform_row(o, d, o, [&](const detail::Lanes& v, index_t j) -> detail::Lanes {
        const detail::Lanes x = detail::lanes_at(hidden.row(r0 + t), d, j);
        return pooling == Pooling::kMean ? detail::Lanes(v + x) : detail::Lanes(v.max(x));
      });
    }
    float scale = pooling == Pooling::kMean ? 1.0f / static_cast<float>(m) : 1.0f;
    if (normalize) {
      detail::Lanes acc = detail::Lanes::Zero();
      detail::for_blocks(o, d, 0.0f, [&](const detail::Lanes& v, index_t, index_t) {
        acc += (v * scale).square();
      });
      scale /= std::max(std::sqrt(acc.sum()), 1e-12f);
    }
    detail::transform_row(
        o, d, o, [&](const detail::Lanes& v, index_t) -> detail::Lanes { return v * scale; });
  }
}

// Copies the sequences keep[0], keep[1], ... (indices into offsets, in any
// order) from hidden into out, back to back, and writes
// their offsets (keep.size() + 1 entries) to out_offsets: the batch of the
// sequences that go on after an early exit. out must not overlap hidden.
inline void gather_sequences(MatrixView<const float> hidden, VectorView<const index_t> offsets,
                             VectorView<const index_t> keep, MatrixView<float> out,
                             VectorView<index_t> out_offsets) {
  check_view(hidden, "hidden");
  const index_t b = check_offsets(offsets, hidden.rows(), "offsets");
  check_view(keep, "keep");
  check_shape(out_offsets, keep.size() + 1, "out_offsets");
  index_t rows = 0;
  for (index_t i = 0; i < keep.size(); ++i) {
    MOEKIT_CHECK_RANGE(keep[i], 0, b);
    rows += offsets[keep[i] + 1] - offsets[keep[i]];
  }
  check_shape(out, rows, hidden.cols(), "out");
  out_offsets[0] = 0;
  for (index_t i = 0; i < keep.size(); ++i) {
    const index_t s = keep[i], m = offsets[s + 1] - offsets[s];
    as_eigen(out.middle_rows(out_offsets[i], m)) = as_eigen(hidden.middle_rows(offsets[s], m));
    out_offsets[i + 1] = out_offsets[i] + m;
  }
}

}  // namespace cpu
MOEKIT_NAMESPACE_END
