// The text multi-task system: dataset readers (moekit/text/datasets.hpp),
// the encoder cache (moekit/text/encoded_cache.hpp), the model
// (moekit/nn/text_multitask_model.hpp) and its training helpers
// (moekit/train/text_tasks.hpp).
//
// TextDatasets.*, EncodedCache.* and TextMultitaskModel.* are unit tests on
// made-up files, a tiny random BERT and random token states (also run under
// ASan/UBSan). TextSystem.* trains on real text (a small subset of the
// corpora tools/fetch_data.sh unpacks, with all-MiniLM-L6-v2) and runs in the
// optimised build only (tools/test.sh); it skips without the model or the
// data, and fails instead where the environment variable CI is set.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "batch_invariance.hpp"
#include "bert_reference.hpp"
#include "expect_error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/io/bert.hpp"
#include "moekit/nn/session_memory.hpp"
#include "moekit/nn/text_multitask_model.hpp"
#include "moekit/text/datasets.hpp"
#include "moekit/text/encoded_cache.hpp"
#include "moekit/train/text_tasks.hpp"
#include "moekit/train/trainer.hpp"

namespace {

using moekit::Errc;
using moekit::index_t;
using moekit_test::expect_error;
using moekit_test::same_bits;
namespace cpu = moekit::cpu;
namespace text = moekit::text;
namespace train = moekit::train;

std::filesystem::path temp_dir(const std::string& name) {
  std::string dir = "moekit_text_";
  dir += ::testing::UnitTest::GetInstance()->current_test_info()->name();
  const auto path = std::filesystem::temp_directory_path() / dir / name;
  std::filesystem::remove_all(path);
  std::filesystem::create_directories(path);
  return path;
}

std::filesystem::path write(const std::filesystem::path& path, const std::string& content) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

// ---- readers ------------------------------------------------------------------------------------

TEST(TextDatasets, ReadsOrangeTabWithQuotesCrlfAndBlankLines) {
  const auto dir = temp_dir("tab");
  const std::string tab =
      "Id\tText\tCategory\r\n"
      "d\tstring\td\r\n"
      "\tmeta\tclass\r\n"
      "\r\n"
      "1\t\"said \"\"hi\"\", then\tleft\"\tsport\r\n"
      "2\tplain text\tnews\r\n"
      "\n"
      "3\t\"two\nlines\"\tsport";  // no line end at the end
  const text::LabelledTexts t =
      text::read_orange_tab(write(dir / "a.tab", tab), "Text", "Category");
  ASSERT_EQ(t.size(), 3);
  EXPECT_EQ(t.texts[0], "said \"hi\", then\tleft");
  EXPECT_EQ(t.texts[1], "plain text");
  EXPECT_EQ(t.texts[2], "two\nlines");
  EXPECT_EQ(t.classes, (std::vector<std::string>{"news", "sport"}));  // sorted
  EXPECT_EQ(t.labels, (std::vector<std::int32_t>{1, 0, 1}));
  // A fixed class list: ids are positions in it.
  const text::LabelledTexts u =
      text::read_orange_tab(dir / "a.tab", "Text", "Category", {"sport", "news", "other"});
  EXPECT_EQ(u.labels, (std::vector<std::int32_t>{0, 1, 0}));
  EXPECT_EQ(u.num_classes(), 3);
}

TEST(TextDatasets, ReadsQuotedCsvWithEmbeddedNewlines) {
  const auto dir = temp_dir("csv");
  const std::string csv =
      "\xEF\xBB\xBF"
      "category,text,movie\n"
      "fresh,\"Good, really\n\ngood.\",a\n"
      "rotten,bad,\"b\"\n";
  const text::LabelledTexts t = text::read_csv(write(dir / "a.csv", csv), "text", "category");
  ASSERT_EQ(t.size(), 2);
  EXPECT_EQ(t.texts[0], "Good, really\n\ngood.");
  EXPECT_EQ(t.labels, (std::vector<std::int32_t>{0, 1}));
}

TEST(TextDatasets, ReadsOneFolderPerClass) {
  const auto dir = temp_dir("folders");
  write(dir / "tech" / "002.txt", "chips");
  write(dir / "tech" / "001.txt", "bytes \xa3 latin-1");
  write(dir / "arts" / "001.txt", "paint");
  const text::LabelledTexts t = text::read_class_folders(dir);
  EXPECT_EQ(t.classes, (std::vector<std::string>{"arts", "tech"}));
  EXPECT_EQ(t.texts, (std::vector<std::string>{"paint", "bytes \xa3 latin-1", "chips"}));
  EXPECT_EQ(t.labels, (std::vector<std::int32_t>{0, 1, 1}));
  write(dir / "stray.txt", "x");
  const std::string m = expect_error([&] { text::read_class_folders(dir); }, Errc::kFormatError);
  EXPECT_NE(m.find("stray.txt"), std::string::npos) << m;
  expect_error([&] { text::read_class_folders(dir / "none"); }, Errc::kIoError);
}

// Each hostile file is rejected with its name, the line and the field.
TEST(TextDatasets, RejectsMalformedFilesNamingFileLineAndField) {
  const auto dir = temp_dir("bad");
  const std::string head = "Text\tCategory\nstring\td\n\tclass\n";
  struct Case {
    const char* name;
    std::string content;
    const char* expect;  // in the message
  };
  const std::vector<Case> cases = {
      {"fields.tab", head + "ok\ta\ntoo\tmany\tfields\n", ":5: the record has 3 fields"},
      {"short.tab", head + "ok\ta\nalone\n", "\"Category\" is missing"},
      {"open.tab", head + "\"never closed\ta\n", ":4: field 1: the quoted field is not closed"},
      {"after.tab", head + "\"quoted\"x\ta\n", ":4: field 1: text after the closing quote"},
      {"empty_class.tab", head + "text\t\n", ":4: field \"Category\" (the class) is empty"},
      {"no_records.tab", head, "no records"},
      {"empty.tab", "", "the file is empty"},
      {"header.tab", "Text\tCategory\nstring\td\n", "header line 3 of 3 is missing"},
      {"header_width.tab", "Text\tCategory\nstring\n\tclass\n", ":2: header line 2 has 1 fields"},
      {"column.tab", "Body\tCategory\nstring\td\n\tclass\nx\ta\n", "no column \"Text\""},
  };
  for (const Case& c : cases) {
    const auto path = write(dir / c.name, c.content);
    const std::string m =
        expect_error([&] { text::read_orange_tab(path, "Text", "Category"); }, Errc::kFormatError);
    EXPECT_NE(m.find(path.string()), std::string::npos) << c.name << ": " << m;
    EXPECT_NE(m.find(c.expect), std::string::npos) << c.name << ": " << m;
  }
  const auto path = write(dir / "unknown.tab", head + "x\tb\n");
  const std::string m = expect_error(
      [&] { text::read_orange_tab(path, "Text", "Category", {"a"}); }, Errc::kFormatError);
  EXPECT_NE(m.find(":4: field \"Category\": class \"b\" is not one of the 1"), std::string::npos)
      << m;
  expect_error([&] { text::read_csv(dir / "missing.csv", "t", "c"); }, Errc::kIoError);
}

TEST(TextDatasets, SeededSplitIsAFixedPartition) {
  const text::Split a = text::seeded_split(101, 0.2, 5), b = text::seeded_split(101, 0.2, 5);
  EXPECT_EQ(a.test, b.test);
  EXPECT_EQ(a.test.size(), 20u);
  EXPECT_EQ(a.train.size(), 81u);
  std::vector<index_t> all = a.train;
  all.insert(all.end(), a.test.begin(), a.test.end());
  std::sort(all.begin(), all.end());
  for (index_t i = 0; i < 101; ++i) EXPECT_EQ(all[static_cast<std::size_t>(i)], i);
  EXPECT_NE(text::seeded_split(101, 0.2, 6).test, a.test);
  expect_error([] { text::seeded_split(5, 1.5, 0); }, Errc::kInvalidArgument);
}

// ---- the encoder cache --------------------------------------------------------------------------

moekit::io::BertModel tiny_model(std::uint32_t seed) {
  const cpu::BertEncoderConfig c = moekit_test::tiny_bert_config();
  std::vector<std::string> vocab = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
  for (char ch = 'a'; ch <= 'z'; ++ch) vocab.emplace_back(1, ch);
  for (const char* w : {"the", "cat", "sat", "on", "mat", ".", "##s"}) vocab.emplace_back(w);
  moekit::io::BertModel m{cpu::BertEncoder(c), cpu::BertEncoderStorage(c),
                          text::WordPieceTokenizer(vocab)};
  moekit_test::randomize(m.weights.views(), seed);
  return m;
}

TEST(EncodedCache, CachedTextsHaveTheBitsOfAFreshRunAndStaleFilesAreRebuilt) {
  const auto dir = temp_dir("cache");
  const auto file = dir / "c.mkenc";
  const moekit::io::BertModel model = tiny_model(3);
  const std::vector<std::string> texts = {"the cat sat", "on the mat .", "cats", "the cat sat",
                                          "x y z q w e r t y u i o p"};
  text::CacheStats st;
  const text::EncodedTexts fresh = text::encode_texts(model, 1, texts, 8, {1}, {}, {}, &st);
  EXPECT_EQ(st.encoded, 4);  // the duplicate once
  ASSERT_EQ(fresh.size(), 5);
  EXPECT_EQ(fresh.length(4), 8);  // truncated to max_length
  EXPECT_EQ(fresh.length(0), fresh.length(3));

  const text::EncodedTexts first = text::encode_texts(model, 1, texts, 8, {1}, file, {}, &st);
  EXPECT_TRUE(st.rebuilt);
  EXPECT_EQ(st.encoded, 4);
  const text::EncodedTexts again = text::encode_texts(model, 1, texts, 8, {1}, file, {}, &st);
  EXPECT_FALSE(st.rebuilt);
  EXPECT_EQ(st.encoded, 0);
  EXPECT_EQ(st.reused, 4);
  for (const text::EncodedTexts* e : {&first, &again}) {
    EXPECT_EQ(e->ids, fresh.ids);
    EXPECT_EQ(e->states, fresh.states);
    EXPECT_EQ(e->pooled, fresh.pooled);
    EXPECT_EQ(e->offsets, fresh.offsets);
  }
  // The f16 states are the encoder's within f16 rounding.
  std::vector<index_t> one = {1}, off;
  std::vector<float> states;
  fresh.gather_states({one.data(), 1}, states, off);
  ASSERT_EQ(off, (std::vector<index_t>{0, fresh.length(1)}));
  for (const float v : states) EXPECT_TRUE(std::isfinite(v));

  // A new text is added to the file; the old ones stay.
  std::vector<std::string> more = {"sat on mat"};
  text::encode_texts(model, 1, more, 8, {1}, file, {}, &st);
  EXPECT_EQ(st.encoded, 1);
  text::encode_texts(model, 1, texts, 8, {1}, file, {}, &st);
  EXPECT_EQ(st.encoded, 0);
  // Another model hash, max length or exit layers: rebuilt.
  text::encode_texts(model, 2, texts, 8, {1}, file, {}, &st);
  EXPECT_TRUE(st.rebuilt);
  EXPECT_EQ(st.encoded, 4);
  text::encode_texts(model, 2, texts, 9, {1}, file, {}, &st);
  EXPECT_TRUE(st.rebuilt);
  text::encode_texts(model, 2, texts, 9, {}, file, {}, &st);
  EXPECT_TRUE(st.rebuilt);
  // A truncated or corrupt file: rebuilt, same bits.
  const auto size = std::filesystem::file_size(file);
  std::filesystem::resize_file(file, size - 7);
  const text::EncodedTexts repaired = text::encode_texts(model, 2, texts, 9, {}, file, {}, &st);
  EXPECT_TRUE(st.rebuilt);
  EXPECT_EQ(repaired.states, text::encode_texts(model, 2, texts, 9, {}, {}).states);
  write(file, "garbage");
  text::encode_texts(model, 2, texts, 9, {}, file, {}, &st);
  EXPECT_TRUE(st.rebuilt);
  // Bad arguments.
  expect_error([&] { text::encode_texts(model, 1, texts, 1, {1}, {}); }, Errc::kInvalidArgument);
  expect_error([&] { text::encode_texts(model, 1, texts, 8, {2}, {}); }, Errc::kInvalidArgument);
}

// ---- the model ----------------------------------------------------------------------------------

template <int E, int K, int H>
using Model =
    cpu::TextMultitaskModel<moekit::MoeSpec<E, K>, moekit::LoraSpec<2>, moekit::HeadSpec<H>>;

template <class M>
typename M::Config small_config(int moe_layers = 2) {
  typename M::Config c;
  c.d_model = 12;
  c.moe.d_model = 12;
  c.moe.d_ff = 10;
  c.moe.kind = moekit::FfnKind::kGated;
  c.moe.activation = moekit::Activation::kSilu;
  c.moe.switch_coeff = 0.1f;
  c.moe.z_coeff = 1e-3f;
  c.num_moe_layers = moe_layers;
  c.max_batch = 8;
  c.max_tokens = 40;
  c.seed = 3;
  for (std::size_t h = 0; h < c.classes.size(); ++h) c.classes[h] = 3 + static_cast<index_t>(h);
  return c;
}

struct Tokens {
  std::vector<float> x;
  std::vector<index_t> offsets{0};
  std::vector<std::int32_t> tasks, labels;
  cpu::TextBatch view(index_t d) const {
    const index_t n = static_cast<index_t>(tasks.size());
    return {{x.data(), offsets.back(), d},
            {offsets.data(), n + 1},
            {tasks.data(), n},
            {labels.data(), n}};
  }
};

Tokens random_tokens(index_t n, index_t d, int heads, std::uint64_t seed) {
  Tokens b;
  for (index_t i = 0; i < n; ++i) {
    const int t = static_cast<int>(moekit::random_bits(seed + 1, static_cast<std::uint64_t>(i)) %
                                   static_cast<std::uint64_t>(heads));
    b.tasks.push_back(t);
    b.labels.push_back(
        static_cast<std::int32_t>(moekit::random_bits(seed + 2, static_cast<std::uint64_t>(i)) %
                                  static_cast<std::uint64_t>(3 + t)));
    b.offsets.push_back(b.offsets.back() + 1 + static_cast<index_t>(i % 4));
  }
  b.x.resize(static_cast<std::size_t>(b.offsets.back() * d));
  for (std::size_t i = 0; i < b.x.size(); ++i) b.x[i] = moekit::random_normal(seed, i);
  return b;
}

// Every trained tensor's gradient against fourth-order central differences
// (K = E: the top-k choice cannot flip, so the loss is smooth).
TEST(TextMultitaskModel, GradientsMatchFiniteDifferences) {
  using M = Model<3, 3, 2>;
  M model(small_config<M>());
  for (float& v : model.tensor("adapter.lora_B").value) v = 0.2f;  // B = 0 would hide dA
  const Tokens data = random_tokens(7, 12, 2, 9);
  const cpu::TextBatch batch = data.view(12);
  for (cpu::ModelTensor& t : model.tensors()) {
    if (t.grad.empty()) continue;
    model.loss_and_grads(batch, cpu::TrainScope::all(), {});
    const std::vector<float> grad = t.grad;
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < t.value.size(); i += 1 + t.value.size() / 9) {
      const float v = t.value[i], h = 1e-2f;
      const auto loss_at = [&](float delta) {
        t.value[i] = v + delta;
        return model.loss_and_grads(batch, cpu::TrainScope::all(), {}).total;
      };
      const double fd =
          (8.0 * (loss_at(h) - loss_at(-h)) - (loss_at(2 * h) - loss_at(-2 * h))) / (12.0 * h);
      t.value[i] = v;
      num += (fd - grad[i]) * (fd - grad[i]);
      den += fd * fd;
    }
    EXPECT_LT(std::sqrt(num / den), 5e-3) << t.name;
  }
}

// Training in bf16 (the experts', P's and the heads' products on bf16
// operands, fp32 master weights): every gradient stays within bf16's rounding
// of the fp32 model's, and plain gradient descent lowers the loss as much.
TEST(TextMultitaskModel, Bf16TrainingTracksFp32) {
  using M = Model<4, 2, 2>;
  M fp32(small_config<M>());
  auto c = small_config<M>();
  c.moe.compute = cpu::GemmDtype::kBfloat16;
  c.compute = cpu::GemmDtype::kBfloat16;
  M bf16(c);
  for (M* m : {&fp32, &bf16})  // B = 0 would hide dA
    for (float& v : m->tensor("adapter.lora_B").value) v = 0.2f;
  const Tokens data = random_tokens(8, 12, 2, 4);
  const cpu::TextBatch batch = data.view(12);
  const double loss0 = fp32.loss_and_grads(batch, cpu::TrainScope::all(), {}).total;
  EXPECT_NEAR(bf16.loss_and_grads(batch, cpu::TrainScope::all(), {}).total, loss0, 1e-2 * loss0);
  bool any_differs = false;
  for (std::size_t k = 0; k < fp32.tensors().size(); ++k) {
    const cpu::ModelTensor& a = fp32.tensors()[k];
    const cpu::ModelTensor& b = bf16.tensors()[k];
    if (a.grad.empty()) continue;
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < a.grad.size(); ++i) {
      num += double(b.grad[i] - a.grad[i]) * double(b.grad[i] - a.grad[i]);
      den += double(a.grad[i]) * double(a.grad[i]);
      any_differs = any_differs || b.grad[i] != a.grad[i];
    }
    EXPECT_LT(std::sqrt(num / den), 2e-2) << a.name;
  }
  EXPECT_TRUE(any_differs);  // the products' operands were rounded
  double last[2] = {0.0, 0.0};
  for (int step = 0; step < 40; ++step) {
    int k = 0;
    for (M* m : {&fp32, &bf16}) {
      last[k++] = m->loss_and_grads(batch, cpu::TrainScope::all(), {}).total;
      for (cpu::ModelTensor& t : m->tensors())
        for (std::size_t i = 0; i < t.grad.size(); ++i) t.value[i] -= 0.05f * t.grad[i];
    }
  }
  EXPECT_LT(last[0], 0.7 * loss0);
  EXPECT_NEAR(last[1], last[0], 0.05 * last[0]);
  std::printf("[ info ] loss %.4f -> fp32 %.4f, bf16 %.4f after 40 steps\n", loss0, last[0],
              last[1]);
  c.compute = cpu::GemmDtype::kInt8;
  const std::string m = expect_error([&] { M bad(c); }, Errc::kInvalidArgument);
  EXPECT_NE(m.find("config.compute = 2"), std::string::npos) << m;
}

// The forward against a float64 reference of the same math: mean pooling,
// the per-sample term, the adapter and the head (no MoE layers, so the
// reference stays short; the MoE layer has its own tests).
TEST(TextMultitaskModel, PoolingTermAdapterAndHeadMatchFloat64) {
  using M = Model<2, 1, 2>;
  M model(small_config<M>(0));
  for (cpu::ModelTensor& t : model.tensors()) {
    for (std::size_t i = 0; i < t.value.size(); ++i)
      t.value[i] += 0.1f * moekit::random_normal(77, i);
  }
  const Tokens data = random_tokens(6, 12, 2, 4);
  std::vector<float> term(6 * 12);
  for (std::size_t i = 0; i < term.size(); ++i) term[i] = moekit::random_normal(5, i);
  cpu::TextBatch batch = data.view(12);
  batch.pooled_term = {term.data(), 6, 12};
  const index_t C = model.heads().max_classes();
  std::vector<float> z(6 * static_cast<std::size_t>(C), std::nanf(""));
  model.predict(batch, {z.data(), 6, C});
  const auto& P = model.tensor("adapter.weight");
  const auto& A = model.tensor("adapter.lora_A");
  const auto& B = model.tensor("adapter.lora_B");
  const auto& W = model.tensor("heads.weight");
  const auto& b = model.tensor("heads.bias");
  const double s = model.adapters().scale();
  const auto Cs = static_cast<std::size_t>(C);
  for (std::size_t i = 0; i < 6; ++i) {
    const auto t = static_cast<std::size_t>(data.tasks[i]);
    std::vector<double> p(12, 0.0), a(12, 0.0), h(2, 0.0);
    const auto begin = static_cast<std::size_t>(data.offsets[i]),
               end = static_cast<std::size_t>(data.offsets[i + 1]);
    for (std::size_t tok = begin; tok < end; ++tok)
      for (std::size_t j = 0; j < 12; ++j) p[j] += data.x[tok * 12 + j] / double(end - begin);
    for (std::size_t j = 0; j < 12; ++j) p[j] += term[i * 12 + j];
    for (std::size_t r = 0; r < 2; ++r)
      for (std::size_t j = 0; j < 12; ++j) h[r] += double(A.value[(t * 2 + r) * 12 + j]) * p[j];
    for (std::size_t o = 0; o < 12; ++o) {
      for (std::size_t j = 0; j < 12; ++j) a[o] += double(P.value[o * 12 + j]) * p[j];
      for (std::size_t r = 0; r < 2; ++r) a[o] += s * B.value[(t * 12 + o) * 2 + r] * h[r];
    }
    const auto first = static_cast<std::size_t>(model.heads().class_offset(static_cast<int>(t)));
    const auto classes = static_cast<std::size_t>(model.heads().classes(static_cast<int>(t)));
    for (std::size_t c = 0; c < Cs; ++c) {
      if (c >= classes) {
        EXPECT_TRUE(std::isinf(z[i * Cs + c]));
        continue;
      }
      double ref = b.value[first + c];
      for (std::size_t j = 0; j < 12; ++j) ref += double(W.value[(first + c) * 12 + j]) * a[j];
      EXPECT_NEAR(z[i * Cs + c], ref, 1e-4 * (1 + std::fabs(ref))) << i << " " << c;
    }
  }
}

// A small model for up to `batch` texts, every weight moved by 0.1 N(0, 1)
// noise from `seed` (B = 0 would hide the adapter).
template <class M>
M perturbed_model(index_t batch, std::uint64_t seed) {
  typename M::Config c = small_config<M>();
  c.max_batch = batch;
  c.max_tokens = batch * 4;
  M model(c);
  for (cpu::ModelTensor& t : model.tensors()) {
    for (std::size_t i = 0; i < t.value.size(); ++i)
      t.value[i] += 0.1f * moekit::random_normal(seed, i);
  }
  return model;
}

// The whole model is batch invariant (docs/determinism.md): a text's logits
// are bit-identical alone and among up to 64 other texts of any tasks and
// lengths, in any order, on 1 and 2 threads and on every CPU path, on its
// weights and packed in int8. K < E, so the routing is a real top-k choice.
TEST(BatchInvariance, TextMultitaskModelPredict) {
  using M = Model<4, 2, 2>;
  M model = perturbed_model<M>(64, 21);
  constexpr index_t kPool = 24, d = 12;
  const Tokens pool = random_tokens(kPool, d, 2, 22);
  const index_t C = model.heads().max_classes();
  const auto check = [&](const auto&... packed) {
    moekit_test::expect_batch_invariant(kPool, 64, 23, [&](const std::vector<index_t>& items) {
      Tokens batch;
      for (const index_t i : items) {
        const auto u = static_cast<std::size_t>(i);
        const index_t first = pool.offsets[u], length = pool.offsets[u + 1] - first;
        batch.x.insert(batch.x.end(), pool.x.begin() + first * d,
                       pool.x.begin() + (first + length) * d);
        batch.offsets.push_back(batch.offsets.back() + length);
        batch.tasks.push_back(pool.tasks[u]);
        batch.labels.push_back(pool.labels[u]);
      }
      const auto n = static_cast<index_t>(items.size());
      std::vector<float> z(static_cast<std::size_t>(n * C), std::nanf(""));
      model.predict(batch.view(d), packed..., {z.data(), n, C});
      moekit_test::BatchResults out;
      for (index_t j = 0; j < n; ++j) out.emplace_back(z.begin() + j * C, z.begin() + (j + 1) * C);
      return out;
    });
  };
  check();
  check(model.pack(cpu::GemmDtype::kInt8));  // int8 scales are per row: invariant too
}

// Inference on the packed model (pack: experts packed, each branch's adapter
// folded into its head): the logits of predict within each dtype's rounding
// (fp32: the fold's rounding only), the same predicted classes, a pooled term
// applied as predict applies it; the packed copy keeps the weights it was
// made from; a packed model of another structure is refused.
TEST(TextMultitaskModel, PackedPredictMatchesPredict) {
  using M = Model<4, 2, 2>;
  constexpr index_t n = 16, d = 12;
  M model = perturbed_model<M>(n, 31);
  const Tokens data = random_tokens(n, d, 2, 32);
  std::vector<float> u(static_cast<std::size_t>(n * d));
  for (std::size_t i = 0; i < u.size(); ++i) u[i] = 0.3f * moekit::random_normal(33, i);
  cpu::TextBatch batch = data.view(d);
  batch.pooled_term = {u.data(), n, d};
  const index_t C = model.heads().max_classes();
  const auto logits = [&](const auto&... packed) {
    std::vector<float> z(static_cast<std::size_t>(n * C), std::nanf(""));
    model.predict(batch, packed..., {z.data(), n, C});
    return z;
  };
  const std::vector<float> want = logits();
  const auto argmax = [&](const std::vector<float>& z, index_t i) {
    const float* r = z.data() + i * C;
    return std::max_element(r, r + C) - r;
  };
  for (const auto& [dtype, tolerance] :
       {std::pair{cpu::GemmDtype::kFloat32, 1e-5}, std::pair{cpu::GemmDtype::kBfloat16, 2e-2},
        std::pair{cpu::GemmDtype::kInt8, 4e-2}}) {
    const cpu::PackedTextModel<moekit::HeadSpec<2>> packed = model.pack(dtype);
    EXPECT_EQ(packed.dtype(), dtype);
    const std::vector<float> got = logits(packed);
    double err = 0, norm = 0;
    index_t same_class = 0;
    for (index_t i = 0; i < n; ++i) {
      const index_t classes =
          model.config().classes[static_cast<std::size_t>(data.tasks[static_cast<std::size_t>(i)])];
      for (index_t j = 0; j < classes; ++j) {
        const auto k = static_cast<std::size_t>(i * C + j);
        err += (double{got[k]} - want[k]) * (double{got[k]} - want[k]);
        norm += double{want[k]} * want[k];
      }
      for (index_t j = classes; j < C; ++j)
        EXPECT_EQ(got[static_cast<std::size_t>(i * C + j)],
                  want[static_cast<std::size_t>(i * C + j)]);
      same_class += argmax(got, i) == argmax(want, i) ? 1 : 0;
    }
    EXPECT_LT(std::sqrt(err / norm), tolerance) << "dtype " << static_cast<int>(dtype);
    EXPECT_GE(same_class, n - 1) << "dtype " << static_cast<int>(dtype);
    std::printf("[ packed ] dtype %d: logits rel err %.3g, %ld of %ld classes agree\n",
                static_cast<int>(dtype), std::sqrt(err / norm), static_cast<long>(same_class),
                static_cast<long>(n));
  }
  const cpu::PackedTextModel<moekit::HeadSpec<2>> packed = model.pack(cpu::GemmDtype::kInt8);
  const std::vector<float> before = logits(packed);
  for (float& v : model.tensor("heads.weight").value) v = 0.0f;
  for (float& v : model.tensor("moe.0.experts.w2").value) v = 0.0f;
  EXPECT_TRUE(same_bits(logits(packed), before));

  M one_layer(small_config<M>(1));
  const auto other = one_layer.pack(cpu::GemmDtype::kInt8);
  std::vector<float> z(static_cast<std::size_t>(n * C), 7.0f);
  expect_error([&] { model.predict(batch, other, {z.data(), n, C}); }, Errc::kInvalidArgument);
  for (const float v : z) ASSERT_EQ(v, 7.0f);
}

// Session memory on the text system (docs/session_memory.md, "Where it
// sits"): a correction (a text and its right label) written into a session's
// memory as a value on the pooled features moves that session's prediction
// of the text by the margin asked for; another session, a row without a
// session, and a new session after close give the model's logits bit for bit.
TEST(TextMultitaskModel, SessionMemoryOnPooledFeaturesCorrectsOnlyItsSession) {
  using M = Model<4, 2, 2>;
  M model = perturbed_model<M>(16, 31);
  constexpr index_t d = 12, kKey = 8;
  const index_t C = model.heads().max_classes();
  const auto u = [](index_t i) { return static_cast<std::size_t>(i); };
  const Tokens text = random_tokens(1, d, 2, 32);  // the text the user corrects
  const int task = text.tasks[0];
  const index_t classes = model.heads().classes(task);
  // `copies` copies of the text, with these pooled terms (or none).
  const auto predict = [&](index_t copies, const std::vector<float>& term) {
    Tokens batch;
    for (index_t i = 0; i < copies; ++i) {
      batch.x.insert(batch.x.end(), text.x.begin(), text.x.end());
      batch.offsets.push_back(batch.offsets.back() + text.offsets[1]);
      batch.tasks.push_back(task);
      batch.labels.push_back(0);
    }
    cpu::TextBatch view = batch.view(d);
    if (!term.empty()) view.pooled_term = {term.data(), copies, d};
    std::vector<float> z(u(copies * C), std::nanf(""));
    model.predict(view, {z.data(), copies, C});
    return z;
  };
  const std::vector<float> frozen = predict(1, {});
  // The branch is affine from the pooled features to the logits (adapter and
  // head): row c of its linear part, w_c, from unit terms.
  std::vector<float> probe(u((d + 1) * d), 0.0f);
  for (index_t j = 0; j < d; ++j) probe[u((j + 1) * d + j)] = 1.0f;
  const std::vector<float> probed = predict(d + 1, probe);
  const auto w_row = [&](index_t c) {
    std::vector<double> w(u(d));
    for (index_t j = 0; j < d; ++j) w[u(j)] = double(probed[u((j + 1) * C + c)]) - probed[u(c)];
    return w;
  };
  const auto predicted =
      index_t(std::max_element(frozen.begin(), frozen.begin() + classes) - frozen.begin());
  const index_t right = (predicted + 1) % classes;  // the label the user gives
  // The correction's value: the smallest change of the pooled features that
  // puts the right label's logit 1 above the predicted one's.
  const std::vector<double> wc = w_row(right), wp = w_row(predicted);
  const double margin = frozen[u(predicted)] - frozen[u(right)] + 1.0;
  double norm2 = 0.0;
  for (index_t j = 0; j < d; ++j) norm2 += (wc[u(j)] - wp[u(j)]) * (wc[u(j)] - wp[u(j)]);
  std::vector<float> value(u(d));
  for (index_t j = 0; j < d; ++j)
    value[u(j)] = static_cast<float>(margin * (wc[u(j)] - wp[u(j)]) / norm2);
  // The memory's input: the text's mean-pooled token states.
  std::vector<float> pooled(u(d), 0.0f);
  for (index_t t = 0; t < text.offsets[1]; ++t) {
    for (index_t j = 0; j < d; ++j)
      pooled[u(j)] += text.x[u(t * d + j)] / static_cast<float>(text.offsets[1]);
  }
  std::vector<float> w_key(u(kKey * d));
  for (std::size_t i = 0; i < w_key.size(); ++i) w_key[i] = moekit::random_normal(33, i);
  cpu::SessionMemoryConfig mc;
  mc.d_model = d;
  mc.d_key = kKey;
  mc.d_value = d;  // values on the pooled features
  mc.max_sessions = 2;
  cpu::SessionMemoryWeights mw;
  mw.w_key = mw.w_query = {w_key.data(), kKey, d};
  cpu::SessionMemory memory(mc, mw);
  std::vector<std::byte> ws(u(memory.workspace_size()));
  const moekit::VectorView<std::byte> wsv(ws.data(), static_cast<index_t>(ws.size()));
  const std::int32_t alice = memory.open(), bob = memory.open();
  memory.write({pooled.data(), 1, d}, {value.data(), 1, d}, {&alice, 1}, wsv);
  // One read per row: Alice's, Bob's and no session's, each giving that
  // row's pooled term (z = 0: the term alone).
  const auto terms = [&](const std::vector<std::int32_t>& sessions) {
    const auto n = static_cast<index_t>(sessions.size());
    std::vector<float> x, zero(u(n * d), 0.0f), term(u(n * d), std::nanf(""));
    for (index_t i = 0; i < n; ++i) x.insert(x.end(), pooled.begin(), pooled.end());
    memory.read({x.data(), n, d}, {sessions.data(), n}, {zero.data(), n, d}, {term.data(), n, d},
                wsv);
    return term;
  };
  const std::vector<float> z = predict(3, terms({alice, bob, -1}));
  EXPECT_NEAR(z[u(right)] - z[u(predicted)], 1.0, 1e-3);  // Alice's: corrected
  for (index_t row = 1; row < 3; ++row) {  // Bob's and no session's: the model's bits
    EXPECT_TRUE(
        same_bits(std::vector<float>(z.begin() + row * C, z.begin() + (row + 1) * C), frozen))
        << row;
  }
  memory.close(alice);
  const std::int32_t again = memory.open();
  EXPECT_TRUE(same_bits(predict(1, terms({again})), frozen));
}

TEST(TextMultitaskModel, RejectsBadConfigurationsAndBatches) {
  using M = Model<2, 1, 2>;
  auto c = small_config<M>();
  c.moe.num_shared = 1;
  expect_error([&] { M m(c); }, Errc::kInvalidArgument);
  c = small_config<M>();
  c.moe.d_model = 5;
  expect_error([&] { M m(c); }, Errc::kInvalidArgument);
  M model(small_config<M>());
  Tokens data = random_tokens(4, 12, 2, 1);
  const index_t C = model.heads().max_classes();
  std::vector<float> z(4 * static_cast<std::size_t>(C));
  data.offsets[2] = data.offsets[1];  // an empty sample
  std::string m = expect_error(
      [&] {
        model.predict(data.view(12), {z.data(), 4, C});
      },
      Errc::kInvalidArgument);
  EXPECT_NE(m.find("batch.offsets[2]"), std::string::npos) << m;
  data = random_tokens(4, 12, 2, 1);
  data.tasks[3] = 2;
  expect_error([&] { model.predict(data.view(12), {z.data(), 4, C}); }, Errc::kOutOfRange);
  data = random_tokens(9, 12, 2, 1);  // > max_batch
  std::vector<float> z9(9 * static_cast<std::size_t>(C));
  expect_error([&] { model.predict(data.view(12), {z9.data(), 9, C}); }, Errc::kShapeMismatch);
  data = random_tokens(4, 12, 2, 1);
  std::vector<float> teacher(4 * static_cast<std::size_t>(C));
  cpu::TextBatch b = data.view(12);
  b.teacher = {teacher.data(), 4, C};
  expect_error([&] { model.loss_and_grads(b, cpu::TrainScope::all(), {}); },
               Errc::kInvalidArgument);  // distillation needs one branch
}

// A branch added and trained alone leaves the old branches' logits bit-identical,
// and a resumed run equals a straight one.
TEST(TextMultitaskModel, ExpansionKeepsOldBranchesAndResumeIsBitIdentical) {
  using M = Model<4, 2, 2>;
  const Tokens data = random_tokens(8, 12, 2, 3);
  const auto run = [&](M& m, std::int64_t from, std::int64_t to, const std::filesystem::path& load,
                       const std::filesystem::path& save) {
    train::TrainerConfig tc;
    tc.warmup_steps = 2;
    tc.total_steps = 10;
    train::Trainer<M> trainer(m, tc);
    if (!load.empty()) trainer.load_checkpoint(load);
    EXPECT_EQ(trainer.steps(), from);
    for (std::int64_t s = from; s < to; ++s) trainer.step(data.view(12));
    if (!save.empty()) trainer.save_checkpoint(save);
  };
  const auto dir = temp_dir("ckpt");
  M straight(small_config<M>()), resumed(small_config<M>());
  run(straight, 0, 6, {}, {});
  run(resumed, 0, 3, {}, dir / "a.safetensors");
  M fresh(small_config<M>());
  run(fresh, 3, 6, dir / "a.safetensors", {});
  for (std::size_t i = 0; i < straight.tensors().size(); ++i) {
    EXPECT_TRUE(same_bits(straight.tensors()[i].value, fresh.tensors()[i].value))
        << straight.tensors()[i].name;
  }

  // The expanded model computes as the old one did (fp32, or bf16 products:
  // the new model must keep the dtypes, or every old logit would move).
  const auto expand_and_check = [&](M& model) {
    const index_t C = model.heads().max_classes();
    std::vector<float> before(8 * static_cast<std::size_t>(C));
    model.predict(data.view(12), {before.data(), 8, C});
    auto bigger = model.with_branch(4, 21);
    using Big = decltype(bigger);
    EXPECT_EQ(bigger.config().compute, model.config().compute);
    EXPECT_EQ(bigger.config().moe.compute, model.config().moe.compute);
    Tokens only = random_tokens(8, 12, 1, 5);
    for (std::int32_t& t : only.tasks) t = 2;
    train::TrainerConfig tc;
    tc.scope = cpu::TrainScope::only_branch(2);
    train::Trainer<Big> trainer(bigger, tc);
    for (int s = 0; s < 4; ++s) trainer.step(only.view(12));
    const index_t C5 = bigger.heads().max_classes();
    std::vector<float> after(8 * static_cast<std::size_t>(C5));
    bigger.predict(data.view(12), {after.data(), 8, C5});
    for (std::size_t i = 0; i < 8; ++i) {
      const auto classes = static_cast<std::size_t>(bigger.heads().classes(data.tasks[i]));
      for (std::size_t c = 0; c < classes; ++c) {
        EXPECT_EQ(std::memcmp(&before[i * static_cast<std::size_t>(C) + c],
                              &after[i * static_cast<std::size_t>(C5) + c], sizeof(float)),
                  0)
            << i << c;
      }
    }
    EXPECT_NE(bigger.tensor("heads.bias").value.back(), 0.0f);  // the new branch did train
  };
  expand_and_check(straight);
  auto bf16_config = small_config<M>();
  bf16_config.moe.compute = cpu::GemmDtype::kBfloat16;
  bf16_config.compute = cpu::GemmDtype::kBfloat16;
  M bf16(bf16_config);
  run(bf16, 0, 3, {}, {});
  expand_and_check(bf16);
}

// ---- on real text (optimised build only) --------------------------------------------------------

std::filesystem::path env_dir(const char* var, const char* fallback_under_home) {
  if (const char* v = std::getenv(var); v != nullptr && *v != '\0') return v;
  const char* home = std::getenv("HOME");
  return home != nullptr && fallback_under_home != nullptr
             ? std::filesystem::path(home) / fallback_under_home
             : std::filesystem::path();
}

// 192 training and 64 test texts per task (256 each), the real encoder with
// its cache in a temporary folder, the MoE system trained for two epochs:
// every branch beats its majority class by 10 points; then BBC News added as
// a branch leaves the old branches' test logits bit-identical; and a run
// stopped at a checkpoint and resumed equals a straight one.
TEST(TextSystem, RealTextBeatsMajorityExpansionIsIsolatedAndResumeIsExact) {
  const std::filesystem::path model_dir = env_dir("MOEKIT_MINILM_DIR", nullptr);
  const std::filesystem::path data = env_dir("MOEKIT_DATA_DIR", ".cache/moekit/data");
  const std::vector<train::CorpusFiles> files = train::reference_task_files();
  bool have = !model_dir.empty() && std::filesystem::exists(model_dir / "model.safetensors");
  for (const train::CorpusFiles& f : files) have = have && std::filesystem::exists(data / f.train);
  if (!have) {
    if (std::getenv("CI") != nullptr)
      FAIL() << "the model or the data is missing (tools/bootstrap.sh)";
    GTEST_SKIP() << "the model (MOEKIT_MINILM_DIR) or the data (MOEKIT_DATA_DIR) is missing";
  }
  const moekit::io::BertModel bert = moekit::io::load_bert_model(model_dir);
  const std::uint64_t hash = text::model_fingerprint(model_dir);
  const auto cache = temp_dir("cache");
  std::vector<train::TextTask> tasks;
  for (std::size_t t = 0; t < files.size(); ++t) {
    train::TextTask task = train::read_reference_task(data, files[t], 192, 64, 100 + t);
    if (t == 4) task = train::read_reference_task(data, files[t], 64, 64, 100 + t);
    task.train_encoded = text::encode_texts(bert, hash, task.train.texts, 128, {2, 4},
                                            cache / (task.name + "-train"));
    task.test_encoded =
        text::encode_texts(bert, hash, task.test.texts, 128, {2, 4}, cache / (task.name + "-test"));
    tasks.push_back(std::move(task));
  }
  std::vector<const text::EncodedTexts*> tr, te;
  std::vector<const std::vector<std::int32_t>*> trl, tel;
  std::array<index_t, 4> classes{};
  std::vector<index_t> class_list;
  for (std::size_t t = 0; t < 4; ++t) {
    tr.push_back(&tasks[t].train_encoded);
    te.push_back(&tasks[t].test_encoded);
    trl.push_back(&tasks[t].train.labels);
    tel.push_back(&tasks[t].test.labels);
    classes[t] = tasks[t].num_classes();
    class_list.push_back(classes[t]);
  }
  train::TextSamples train_set(tr, trl), test_set(te, tel);

  using M =
      cpu::TextMultitaskModel<moekit::MoeSpec<8, 2>, moekit::LoraSpec<8>, moekit::HeadSpec<4>>;
  typename M::Config c;
  c.moe = {.d_model = 384,
           .d_ff = 128,
           .kind = moekit::FfnKind::kGated,
           .activation = moekit::Activation::kSilu};
  c.moe.switch_coeff = 0.01f;
  c.classes = classes;
  c.max_tokens = 32 * 128;
  c.seed = 7;
  train::TrainerConfig tc;
  tc.lr = {2e-3f, 2e-3f, 2e-3f, 3e-3f};
  const std::int64_t steps = 2 * train_set.size() / 32;
  tc.warmup_steps = steps / 10;
  tc.total_steps = steps;
  M model(c);
  train::Trainer<M> trainer(model, tc);
  train::train_text_model<M>(trainer, train_set, steps, 32, 11);
  const train::TextEval moe = train::evaluate_text_model(model, test_set);
  const train::TextEval majority = train::evaluate_majority(train_set, test_set, class_list);
  for (std::size_t t = 0; t < 4; ++t) {
    EXPECT_GT(moe.accuracy[t], majority.accuracy[t] + 0.10)
        << tasks[t].name << ": " << moe.accuracy[t] << " vs majority " << majority.accuracy[t];
  }

  // Expansion: BBC News trains only its adapter and head.
  auto bigger = model.with_branch(tasks[4].num_classes(), 99);
  using Big = decltype(bigger);
  train::TextSamples bbc({&tasks[4].train_encoded}, {&tasks[4].train.labels}, 4);
  train::TrainerConfig bc = tc;
  bc.scope = cpu::TrainScope::only_branch(4);
  bc.total_steps = 8;
  bc.warmup_steps = 1;
  train::Trainer<Big> bt(bigger, bc);
  train::train_text_model<Big>(bt, bbc, 8, 32, 13);
  const train::TextEval after = train::evaluate_text_model(bigger, test_set, {}, false);
  for (index_t s = 0; s < test_set.size(); ++s) {
    const index_t k =
        classes[static_cast<std::size_t>(test_set.tasks()[static_cast<std::size_t>(s)])];
    for (index_t j = 0; j < k; ++j) {
      ASSERT_EQ(std::memcmp(&moe.logits[static_cast<std::size_t>(s * moe.logit_cols + j)],
                            &after.logits[static_cast<std::size_t>(s * after.logit_cols + j)],
                            sizeof(float)),
                0)
          << "sample " << s << " class " << j;
    }
  }
  EXPECT_EQ(after.predictions, moe.predictions);

  // Resume: 6 steps straight against 3, a checkpoint, a fresh model and 3 more.
  const auto ckpt = temp_dir("ckpt") / "run.safetensors";
  M straight(c), first(c), second(c);
  tc.total_steps = 6;
  tc.warmup_steps = 1;
  train::Trainer<M> ts(straight, tc), t1(first, tc), t2(second, tc);
  train::train_text_model<M>(ts, train_set, 6, 32, 17);
  train::train_text_model<M>(t1, train_set, 3, 32, 17);
  t1.save_checkpoint(ckpt);
  t2.load_checkpoint(ckpt);
  train::train_text_model<M>(t2, train_set, 6, 32, 17);
  for (std::size_t i = 0; i < straight.tensors().size(); ++i) {
    EXPECT_TRUE(same_bits(straight.tensors()[i].value, second.tensors()[i].value))
        << straight.tensors()[i].name;
  }
}

}  // namespace
