#pragma once
// Hugging Face BERT-family checkpoints for moekit::cpu::BertEncoder
// (moekit/nn/bert_encoder.hpp) and its WordPiece tokenizer
// (moekit/text/wordpiece.hpp): a model folder as transformers writes it,
//   config.json         the sizes (read_bert_config)
//   model.safetensors   the weights, F32, F16 or BF16 (load_bert_weights)
//   vocab.txt           the WordPiece vocabulary
// load_bert_model(folder) reads all three.
//
// config.json keys: hidden_size, num_hidden_layers, num_attention_heads,
// intermediate_size, max_position_embeddings, vocab_size (required, positive
// integers); type_vocab_size (default 2), layer_norm_eps (1e-12), hidden_act
// ("gelu" = erf form, the default; "gelu_new", "gelu_pytorch_tanh",
// "gelu_fast" = tanh form; "relu"); position_embedding_type must be
// "absolute" and model_type, where given, "bert" (other families place
// positions or layers differently: kUnsupported naming the value).
//
// Tensor names, prefix p = "" (BertModel) or "bert." (the task models:
// BertForMaskedLM, ...), found by bert_prefix():
//   p embeddings.word_embeddings.weight        [V, d]
//   p embeddings.position_embeddings.weight    [P, d]
//   p embeddings.token_type_embeddings.weight  [T, d]   (T > 0)
//   p embeddings.LayerNorm.weight / .bias      [d]
//   p encoder.layer.{l}.attention.self.query.weight [d, d], .bias [d]   (key, value alike;
//                                              stacked into w_qkv, b_qkv)
//   p encoder.layer.{l}.attention.output.dense.weight [d, d], .bias [d]
//   p encoder.layer.{l}.attention.output.LayerNorm.weight / .bias [d]   (ln1)
//   p encoder.layer.{l}.intermediate.dense.weight [d_ff, d], .bias [d_ff]
//   p encoder.layer.{l}.output.dense.weight [d, d_ff], .bias [d]
//   p encoder.layer.{l}.output.LayerNorm.weight / .bias [d]              (ln2)
//   p encoder.LayerNorm.weight / .bias [d]      pre-LN final LayerNorm (moekit's name;
//                                              only for NormPlacement::kPre with one)
// Other tensors (the pooler, position_ids, task heads) are ignored. Every
// tensor is checked (present, a float dtype, its shape) before any is copied;
// a missing or misshapen one is an error naming it, and a rejected load
// writes nothing (moekit/io/safetensors.hpp).
//
//   const moekit::io::BertModel model = moekit::io::load_bert_model(folder);
//   model.encoder, model.weights.weights(), model.tokenizer

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/core/activation.hpp"
#include "moekit/core/error.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/nn/bert_encoder.hpp"
#include "moekit/text/wordpiece.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace io {

namespace detail {

inline index_t bert_config_int(const nlohmann::json& j, const char* key, const std::string& source,
                               index_t fallback = -1) {
  if (!j.contains(key)) {
    MOEKIT_CHECK(fallback >= 0, Errc::kFormatError, "'", source, "' has no \"", key, "\"");
    return fallback;
  }
  const nlohmann::json& v = j[key];
  MOEKIT_CHECK(v.is_number_integer() && v.get<std::int64_t>() >= 0 &&
                   v.get<std::int64_t>() <= std::int64_t{1} << 40,
               Errc::kFormatError, "'", source, "': \"", key, "\" is ", v.dump(),
               ", expected a non-negative integer");
  return static_cast<index_t>(v.get<std::int64_t>());
}

inline std::string bert_config_string(const nlohmann::json& j, const char* key,
                                      const std::string& source, const char* fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  MOEKIT_CHECK(j[key].is_string(), Errc::kFormatError, "'", source, "': \"", key, "\" is ",
               j[key].dump(), ", expected a string");
  return j[key].get<std::string>();
}

template <class T>
void push_tensor(std::vector<NamedTensor<T>>& out, std::string name, Shape shape,
                 MatrixView<T> view) {
  out.push_back({std::move(name), std::move(shape), view});
}

// The encoder's tensors under HF names; views of type T (const: sources).
template <class T>
std::vector<NamedTensor<T>> bert_tensors(const cpu::BertEncoder& encoder,
                                         const cpu::BertEncoderViews<T>& w,
                                         std::string_view prefix) {
  const cpu::BertEncoderConfig& c = encoder.config();
  const index_t d = c.d_model, f = c.d_ff;
  const std::string p(prefix);
  std::vector<NamedTensor<T>> out;
  const auto vec = [](VectorView<T> v) { return as_row(v); };
  push_tensor(out, p + "embeddings.word_embeddings.weight", {c.vocab_size, d}, w.word_embeddings);
  push_tensor(out, p + "embeddings.position_embeddings.weight", {c.max_positions, d},
              w.position_embeddings);
  if (c.type_vocab_size > 0) {
    push_tensor(out, p + "embeddings.token_type_embeddings.weight", {c.type_vocab_size, d},
                w.token_type_embeddings);
  }
  push_tensor(out, p + "embeddings.LayerNorm.weight", {d}, vec(w.embedding_gamma));
  push_tensor(out, p + "embeddings.LayerNorm.bias", {d}, vec(w.embedding_beta));
  for (index_t l = 0; l < c.num_layers; ++l) {
    const std::string q = p + "encoder.layer." + std::to_string(l) + ".";
    const char* parts[] = {"query", "key", "value"};
    for (index_t i = 0; i < 3; ++i) {
      const std::string name = q + "attention.self." + parts[i];
      push_tensor(out, name + ".weight", {d, d}, w.w_qkv.middle_rows((3 * l + i) * d, d));
      push_tensor(out, name + ".bias", {d}, w.b_qkv.block(l, i * d, 1, d));
    }
    push_tensor(out, q + "attention.output.dense.weight", {d, d}, w.w_out.middle_rows(l * d, d));
    push_tensor(out, q + "attention.output.dense.bias", {d}, w.b_out.middle_rows(l, 1));
    push_tensor(out, q + "attention.output.LayerNorm.weight", {d}, w.ln1_gamma.middle_rows(l, 1));
    push_tensor(out, q + "attention.output.LayerNorm.bias", {d}, w.ln1_beta.middle_rows(l, 1));
    push_tensor(out, q + "intermediate.dense.weight", {f, d}, w.w_ff1.middle_rows(l * f, f));
    push_tensor(out, q + "intermediate.dense.bias", {f}, w.b_ff1.middle_rows(l, 1));
    push_tensor(out, q + "output.dense.weight", {d, f}, w.w_ff2.middle_rows(l * d, d));
    push_tensor(out, q + "output.dense.bias", {d}, w.b_ff2.middle_rows(l, 1));
    push_tensor(out, q + "output.LayerNorm.weight", {d}, w.ln2_gamma.middle_rows(l, 1));
    push_tensor(out, q + "output.LayerNorm.bias", {d}, w.ln2_beta.middle_rows(l, 1));
  }
  if (!w.final_gamma.empty()) {
    push_tensor(out, p + "encoder.LayerNorm.weight", {d}, vec(w.final_gamma));
    push_tensor(out, p + "encoder.LayerNorm.bias", {d}, vec(w.final_beta));
  }
  return out;
}

}  // namespace detail

// The encoder configuration of a config.json text; `source` names it in errors.
inline cpu::BertEncoderConfig parse_bert_config(std::string_view text, const std::string& source) {
  nlohmann::json j;
#if defined(MOEKIT_NO_EXCEPTIONS)
  j = nlohmann::json::parse(text, nullptr, false);
  MOEKIT_CHECK(!j.is_discarded(), Errc::kFormatError, "'", source, "' is not valid JSON");
#else
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    MOEKIT_FAIL(Errc::kFormatError, "'", source, "' is not valid JSON: ", e.what());
  }
#endif
  MOEKIT_CHECK(j.is_object(), Errc::kFormatError, "'", source, "' is a JSON ", j.type_name(),
               ", expected an object");
  const std::string model_type = detail::bert_config_string(j, "model_type", source, "bert");
  MOEKIT_CHECK(model_type == "bert", Errc::kUnsupported, "'", source, "': model_type \"",
               model_type, "\" is not supported (BertEncoder reads \"bert\" checkpoints)");
  const std::string positions =
      detail::bert_config_string(j, "position_embedding_type", source, "absolute");
  MOEKIT_CHECK(positions == "absolute", Errc::kUnsupported, "'", source,
               "': position_embedding_type \"", positions,
               "\" is not supported (only \"absolute\")");
  cpu::BertEncoderConfig c;
  c.d_model = detail::bert_config_int(j, "hidden_size", source);
  c.num_layers = static_cast<int>(detail::bert_config_int(j, "num_hidden_layers", source));
  c.num_heads = detail::bert_config_int(j, "num_attention_heads", source);
  c.d_ff = detail::bert_config_int(j, "intermediate_size", source);
  c.max_positions = detail::bert_config_int(j, "max_position_embeddings", source);
  c.vocab_size = detail::bert_config_int(j, "vocab_size", source);
  c.type_vocab_size = detail::bert_config_int(j, "type_vocab_size", source, 2);
  if (j.contains("layer_norm_eps")) {
    MOEKIT_CHECK(j["layer_norm_eps"].is_number(), Errc::kFormatError, "'", source,
                 "': \"layer_norm_eps\" is ", j["layer_norm_eps"].dump(), ", expected a number");
    c.layer_norm_eps = j["layer_norm_eps"].get<float>();
  }
  const std::string act = detail::bert_config_string(j, "hidden_act", source, "gelu");
  if (act == "gelu") {
    c.activation = Activation::kGeluErf;
  } else if (act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu_fast") {
    c.activation = Activation::kGeluTanh;
  } else if (act == "relu") {
    c.activation = Activation::kRelu;
  } else {
    MOEKIT_FAIL(Errc::kUnsupported, "'", source, "': hidden_act \"", act,
                "\" is not supported (gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu)");
  }
  const cpu::BertEncoder check(c);  // the sizes must make an encoder
  return c;
}

// parse_bert_config on the text of the config.json at `path` (kIoError when
// it cannot be opened).
inline cpu::BertEncoderConfig read_bert_config(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  MOEKIT_CHECK(in.good(), Errc::kIoError, "cannot open '", path.string(), "'");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_bert_config(text.str(), path.string());
}

// "bert." when the file's tensors carry that prefix, else "".
inline std::string bert_prefix(const SafetensorsReader& file) {
  return file.contains("bert.embeddings.word_embeddings.weight") ? "bert." : "";
}

// The encoder's tensors as named views (HF names under `prefix`); the views
// are checked against the encoder's config first.
inline std::vector<TensorSource> weight_sources(const cpu::BertEncoder& encoder,
                                                const cpu::BertEncoderWeights& params,
                                                std::string_view prefix) {
  encoder.check_weights(params, "params");
  return detail::bert_tensors(encoder, params, prefix);
}
// The same names as writable targets into `dst` (for SafetensorsReader::load).
inline std::vector<TensorTarget> weight_targets(const cpu::BertEncoder& encoder,
                                                const cpu::BertEncoderViews<float>& dst,
                                                std::string_view prefix) {
  encoder.check_weights(cpu::BertEncoderWeights(dst), "dst");
  return detail::bert_tensors(encoder, dst, prefix);
}

// Copies the encoder's weights from `file` (names with or without "bert.")
// into dst, after checking every tensor; nothing is written on an error.
inline void load_bert_weights(const SafetensorsReader& file, const cpu::BertEncoder& encoder,
                              const cpu::BertEncoderViews<float>& dst) {
  file.load(weight_targets(encoder, dst, bert_prefix(file)));
}

// A model folder, loaded.
struct BertModel {
  cpu::BertEncoder encoder;            // the layers, sized by config.json
  cpu::BertEncoderStorage weights;     // their weights, from model.safetensors
  text::WordPieceTokenizer tokenizer;  // from vocab.txt
};

// Reads config.json, model.safetensors and vocab.txt of `folder`. The
// vocabulary may not be larger than the word embeddings (its ids would have
// no row; kShapeMismatch); a smaller one is fine (padded tables).
inline BertModel load_bert_model(const std::filesystem::path& folder,
                                 text::WordPieceConfig tokenizer_config = {}) {
  const cpu::BertEncoderConfig config = read_bert_config(folder / "config.json");
  text::WordPieceTokenizer tokenizer =
      text::WordPieceTokenizer::from_vocab_file(folder / "vocab.txt", std::move(tokenizer_config));
  MOEKIT_CHECK(tokenizer.vocab_size() <= config.vocab_size, Errc::kShapeMismatch, "'",
               (folder / "vocab.txt").string(), "' has ", tokenizer.vocab_size(),
               " tokens but the word embeddings have vocab_size = ", config.vocab_size, " rows");
  BertModel model{cpu::BertEncoder(config), cpu::BertEncoderStorage(config), std::move(tokenizer)};
  const SafetensorsReader file(folder / "model.safetensors");
  load_bert_weights(file, model.encoder, model.weights.views());
  return model;
}

}  // namespace io
MOEKIT_NAMESPACE_END
