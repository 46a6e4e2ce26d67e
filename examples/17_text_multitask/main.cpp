// The multi-task system on real text, end to end (tools/demo.sh runs it on
// a subset; docs/reference_model.md shows a run on all the data):
//
//   texts -> WordPiece -> frozen all-MiniLM-L6-v2 (cached) -> 2 residual MoE
//   layers over the tokens (E = 8, K = 2, SwiGLU) -> mean pooling -> per-branch
//   LoRA (R = 8) on a frozen projection -> per-branch heads
//
// on four corpora (20 Newsgroups, Reuters R8, the 2016 election tweets by
// author, Rotten Tomatoes fresh / rotten / plot), beside baselines trained in
// the same run on the same frozen features (the majority class, a linear head
// per branch on the pooled embedding, a dense FFN model with the same active
// parameters per token), then a fine-grained variant (E = 64, K = 8), then
// BBC News added as a fifth branch that trains only its adapter and head,
// early exit with and without distillation, and the system in int8 (the
// encoder, experts and heads packed in int8) beside fp32.
//
//   17_text_multitask --model DIR --data DIR [--train N] [--test N] [--epochs X]
//                     [--out DIR] [--cache DIR] [--max-length L] [--compute fp32|bf16]
//
// --train / --test: texts per task (0 = all). --compute bf16 trains the four
// systems with their products (experts, adapter base, heads) on bf16
// operands from fp32 master weights (routers and exit heads stay fp32). The data folder is what
// tools/bootstrap.sh unpacks; the encoder's outputs are cached in
// --cache (default DATA/cache). Writes OUT/summary.json (every number printed) and OUT/*.jsonl
// (metrics logs; tools/plot_run.py draws them). Exits 77 when the model or
// the data is missing.

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/cpu/early_exit.hpp"
#include "moekit/io/bert.hpp"
#include "moekit/nn/text_multitask_model.hpp"
#include "moekit/text/encoded_cache.hpp"
#include "moekit/train/metrics.hpp"
#include "moekit/train/text_tasks.hpp"
#include "moekit/train/trainer.hpp"

namespace {

using moekit::index_t;
namespace cpu = moekit::cpu;
namespace train = moekit::train;
namespace text = moekit::text;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

constexpr int kTasks = 4;
constexpr int kExitLayers[] = {2, 4};
constexpr double kExitLayersRun[] = {2, 4, 6};  // encoder layers run before exit 0, 1, 2 (the end)

struct Options {
  std::filesystem::path model, data, cache, out = "text_multitask_run";
  index_t train = 384, test = 128;  // per task; 0 = all
  double epochs = 4.0;
  index_t max_length = 128;
  index_t batch = 32;
  cpu::GemmDtype compute = cpu::GemmDtype::kFloat32;  // the systems' training products
};

[[noreturn]] void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s --model DIR --data DIR [--train N] [--test N] [--epochs X] "
               "[--out DIR] [--cache DIR] [--max-length L] [--compute fp32|bf16]\n",
               argv0);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  if (const char* m = std::getenv("MOEKIT_MINILM_DIR")) o.model = m;
  if (const char* d = std::getenv("MOEKIT_DATA_DIR")) {
    o.data = d;
  } else if (const char* h = std::getenv("HOME")) {
    o.data = std::filesystem::path(h) / ".cache/moekit/data";
  }
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) usage(argv[0]);
    const char* v = argv[++i];
    if (a == "--model")
      o.model = v;
    else if (a == "--data")
      o.data = v;
    else if (a == "--out")
      o.out = v;
    else if (a == "--cache")
      o.cache = v;
    else if (a == "--train")
      o.train = std::atol(v);
    else if (a == "--test")
      o.test = std::atol(v);
    else if (a == "--epochs")
      o.epochs = std::atof(v);
    else if (a == "--max-length")
      o.max_length = std::atol(v);
    else if (a == "--compute" && (std::strcmp(v, "fp32") == 0 || std::strcmp(v, "bf16") == 0))
      o.compute =
          std::strcmp(v, "fp32") == 0 ? cpu::GemmDtype::kFloat32 : cpu::GemmDtype::kBfloat16;
    else
      usage(argv[0]);
  }
  if (o.cache.empty()) o.cache = o.data / "cache";
  if (o.epochs <= 0 || o.train < 0 || o.test < 0 || o.max_length < 2) usage(argv[0]);
  return o;
}

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// One line that rewrites itself on a terminal.
void progress(const char* stage, index_t done, index_t total, double elapsed) {
  std::fprintf(stderr, "\r  %-28s %7ld / %-7ld %6.1f s", stage, static_cast<long>(done),
               static_cast<long>(total), elapsed);
  if (done >= total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

// ---- models --------------------------------------------------------------------------------

using Lora = moekit::LoraSpec<8>;
using Heads = moekit::HeadSpec<kTasks>;
using Coarse = moekit::MoeSpec<8, 2>;
using Fine = moekit::MoeSpec<64, 8>;
using Dense = moekit::MoeSpec<1, 1>;
constexpr index_t kExpertWidth = 128;  // coarse expert width; dense: 2x, fine: 2/8 x

// [config]
template <class S, class H>
cpu::TextMultitaskConfig<H> model_config(const std::array<index_t, H::num_heads>& classes,
                                         index_t d_ff, int moe_layers, index_t max_tokens,
                                         cpu::GemmDtype compute = cpu::GemmDtype::kFloat32) {
  cpu::TextMultitaskConfig<H> c;
  c.d_model = 384;
  c.moe.d_model = 384;
  c.moe.d_ff = d_ff;
  c.moe.kind = moekit::FfnKind::kGated;  // SwiGLU
  c.moe.activation = moekit::Activation::kSilu;
  c.moe.switch_coeff = S::num_experts > 1 ? 0.01f : 0.0f;
  c.moe.z_coeff = S::num_experts > 1 ? 1e-3f : 0.0f;
  c.moe.compute = compute;  // the experts' products: fp32, or bf16 from fp32 master weights
  c.num_moe_layers = moe_layers;
  c.lora_alpha = 16.0f;
  c.classes = classes;
  c.max_batch = 32;
  c.max_tokens = max_tokens;
  c.seed = 7;
  c.compute = compute;  // the adapter's base and the heads' products
  return c;
}

// Optimizer steps for `epochs` passes over n samples in batches (at least one:
// a tiny subset still trains, and the schedule needs a positive length).
std::int64_t steps_for(double epochs, index_t n, index_t batch) {
  return std::max<std::int64_t>(
      1, static_cast<std::int64_t>(epochs * static_cast<double>(n) / static_cast<double>(batch) +
                                   0.5));
}

train::TrainerConfig trainer_config(std::int64_t steps, bool linear) {
  train::TrainerConfig t;
  t.lr = {2e-3f, 2e-3f, linear ? 0.0f : 2e-3f, 3e-3f};  // moe, gate, lora, head
  t.warmup_steps = std::max<std::int64_t>(1, steps / 10);
  t.total_steps = steps;
  t.min_lr_ratio = 0.1f;
  t.max_grad_norm = 1.0;
  return t;
}
// [config]

struct RunResult {
  train::TextEval eval;
  double train_seconds = 0.0;
  std::int64_t steps = 0;
  moekit::ModelParams params;
};

// Trains `model` for `steps` on train, logging to OUT/<name>.jsonl, then evaluates on test.
template <class Model>
RunResult train_and_evaluate(const char* name, Model& model, train::TextSamples& train_set,
                             train::TextSamples& test_set, std::int64_t steps, index_t batch,
                             const Options& o, bool linear = false) {
  RunResult out;
  train::Trainer<Model> trainer(model, trainer_config(steps, linear));
  train::MetricsLog log(o.out / (std::string(name) + ".jsonl"));
  const auto t0 = Clock::now();
  index_t tokens = 0;
  std::string stage = "train ";
  stage += name;
  train::train_text_model<Model>(
      trainer, train_set, steps, batch, 11, {},
      [&](std::int64_t s, const train::StepReport<Model>& r) {
        for (const auto& st : r.losses.routing) tokens += st.tokens;
        if ((s + 1) % 10 == 0 || s + 1 == steps) {
          train::StepRecord rec;
          rec.step = s + 1;
          rec.lr = trainer.config().lr.head * r.lr_scale;
          rec.loss = r.losses.total;
          rec.task_loss = r.losses.task.total;
          rec.aux_loss = r.losses.aux;
          rec.grad_norm = r.grad_norm;
          rec.accuracy.assign(r.losses.task.accuracy.begin(), r.losses.task.accuracy.end());
          for (const auto& st : r.losses.routing) {
            std::vector<index_t> kept(st.kept.begin(), st.kept.end());
            rec.expert_load.push_back(train::expert_load_fractions(kept));
          }
          rec.elapsed_s = since(t0);
          rec.tokens_per_s = static_cast<double>(tokens) / std::max(1e-9, rec.elapsed_s);
          rec.peak_rss_mib = train::peak_rss_mib();
          log.write(rec);
          progress(stage.c_str(), s + 1, steps, rec.elapsed_s);
        }
      });
  out.train_seconds = since(t0);
  out.steps = steps;
  out.eval = train::evaluate_text_model(model, test_set);
  out.params = model.params();
  train::StepRecord rec;
  rec.split = "eval";
  rec.step = steps;
  rec.accuracy = out.eval.accuracy;
  rec.elapsed_s = since(t0);
  log.write(rec);
  return out;
}

// ---- early exit ----------------------------------------------------------------------------

// An exit classifier: a linear head on one encoder layer's pooled state
// (the text model with no MoE layers and one branch; its adapter stays 0).
using ExitHead = cpu::TextMultitaskModel<Dense, Lora, moekit::HeadSpec<1>>;

std::unique_ptr<ExitHead> exit_head(index_t classes, index_t batch) {
  auto c = model_config<Dense, moekit::HeadSpec<1>>({classes}, 1, 0, batch);
  c.distillation = {2.0f, 0.5f};  // temperature, weight of the teacher's term
  return std::make_unique<ExitHead>(c);
}

// Trains exit head `exit` of one task on its pooled states; with a teacher
// (the full system's logits on the training texts) by distillation.
std::unique_ptr<ExitHead> train_exit_head(const train::TextTask& task, int exit,
                                          const std::vector<float>* teacher, double epochs,
                                          index_t batch) {
  auto head = exit_head(task.num_classes(), batch);
  train::TextSamples samples({&task.train_encoded}, {&task.train.labels});
  if (teacher != nullptr) samples.set_teacher(*teacher, task.num_classes());
  const std::int64_t steps = steps_for(epochs, samples.size(), batch);
  train::Trainer<ExitHead> trainer(*head, trainer_config(steps, true));
  train::train_text_model<ExitHead>(trainer, samples, steps, batch,
                                    31 + static_cast<std::uint64_t>(exit), {exit});
  return head;
}

// Logits (n x classes) of every test text of a task at one exit head.
std::vector<float> exit_logits(ExitHead& head, const train::TextTask& task, int exit) {
  train::TextSamples samples({&task.test_encoded}, {&task.test.labels});
  return train::evaluate_text_model(head, samples, {exit}, false).logits;
}

struct ExitPoint {
  double threshold = 0, accuracy = 0, mean_layers = 0;
};

// Per-sample early exit (cpu::EarlyExit, confidence rule) over the three
// exits' logits (n x C each; the last is the full system): accuracy and the
// mean number of encoder layers run.
ExitPoint exit_point(const std::array<const std::vector<float>*, 3>& logits, index_t C,
                     const std::vector<std::int32_t>& labels, float threshold) {
  const auto n = static_cast<index_t>(labels.size());
  const cpu::EarlyExit rule({.criteria = {.min_confidence = threshold}, .num_exits = 3});
  std::vector<index_t> original(static_cast<std::size_t>(n)), kept(original);
  std::vector<std::int32_t> previous(original.size()), agree(original.size()),
      pred(original.size()), exit(original.size());
  std::vector<float> conf(original.size()), live;
  const cpu::ExitState state{{original.data(), n}, {previous.data(), n}, {agree.data(), n}};
  const cpu::ExitResults results{{pred.data(), n}, {conf.data(), n}, {exit.data(), n}};
  index_t m = rule.begin(n, state, results);
  for (int e = 0; e < 3; ++e) {
    live.resize(static_cast<std::size_t>(m * C));
    for (index_t r = 0; r < m; ++r) {
      std::copy_n(
          logits[static_cast<std::size_t>(e)]->data() + original[static_cast<std::size_t>(r)] * C,
          C, live.data() + r * C);
    }
    m = rule.step(e, {live.data(), m, C}, state, results, {kept.data(), n});
  }
  ExitPoint p;
  p.threshold = threshold;
  for (index_t i = 0; i < n; ++i) {
    p.accuracy += pred[static_cast<std::size_t>(i)] == labels[static_cast<std::size_t>(i)] ? 1 : 0;
    p.mean_layers += kExitLayersRun[exit[static_cast<std::size_t>(i)]];
  }
  p.accuracy /= static_cast<double>(std::max<index_t>(1, n));
  p.mean_layers /= static_cast<double>(std::max<index_t>(1, n));
  return p;
}

struct Latency {
  index_t texts = 0;
  double full_ms = 0, exit_ms = 0;    // per text, wall clock
  double full_acc = 0, exit_acc = 0;  // on these texts
  double exit_layers = 0;             // mean encoder layers run with exits
};

// The live path, text in, class out, for n test texts of task t in batches:
// without exits (all six encoder layers, then the MoE system) and with them
// (layers [0, 2), exit head; the samples that stay are compacted with
// gather_sequences and only they run layers [2, 4), and so on), so the
// encoder layers of samples that left are never computed.
template <class Moe>
Latency live_latency(const moekit::io::BertModel& bert, const train::TextTask& task, int t,
                     Moe& moe, ExitHead& h2, ExitHead& h4, float threshold, index_t n,
                     index_t batch, index_t max_length) {
  const cpu::BertEncoder& enc = bert.encoder;
  const cpu::BertEncoderWeights w = bert.weights.weights();
  const index_t d = enc.config().d_model, C = task.num_classes(), Cm = moe.heads().max_classes();
  const cpu::EarlyExit rule({.criteria = {.min_confidence = threshold}, .num_exits = 3});
  n = std::min(n, task.test.size());
  Latency out;
  out.texts = n;
  std::vector<float> h(static_cast<std::size_t>(batch * max_length * d)), g(h.size()),
      pooled(static_cast<std::size_t>(batch * d)), z(static_cast<std::size_t>(batch * Cm));
  std::vector<std::byte> ws(
      static_cast<std::size_t>(enc.workspace_size(batch * max_length, max_length)));
  const moekit::VectorView<std::byte> wsv(ws.data(), static_cast<index_t>(ws.size()));
  std::vector<index_t> original(static_cast<std::size_t>(batch)), kept(original),
      offsets2(static_cast<std::size_t>(batch + 1)), one(static_cast<std::size_t>(batch + 1));
  std::vector<std::int32_t> previous(original.size()), agree(original.size()),
      pred(original.size()), exit(original.size()),
      tasks(original.size(), static_cast<std::int32_t>(t)), zeros(original.size(), 0);
  std::vector<float> conf(original.size());
  for (index_t i = 0; i <= batch; ++i) one[static_cast<std::size_t>(i)] = i;
  // Logits of the m sequences in `hidden` (packed, offsets) from the MoE system.
  const auto full = [&](const float* hidden, const index_t* offsets, index_t m) {
    const cpu::TextBatch b{{hidden, offsets[m], d}, {offsets, m + 1}, {tasks.data(), m}, {}};
    moe.predict(b, {z.data(), m, Cm});
    return moekit::MatrixView<const float>(z.data(), m, C, Cm);
  };
  const auto head = [&](ExitHead& e, index_t m) {
    const cpu::TextBatch b{{pooled.data(), m, d}, {one.data(), m + 1}, {zeros.data(), m}, {}};
    e.predict(b, {z.data(), m, C});
    return moekit::MatrixView<const float>(z.data(), m, C);
  };
  for (const bool exits : {false, true}) {
    double correct = 0, layers = 0;
    const auto t0 = Clock::now();
    for (index_t b0 = 0; b0 < n; b0 += batch) {
      const index_t m0 = std::min(batch, n - b0);
      std::vector<std::string_view> texts;
      for (index_t i = b0; i < b0 + m0; ++i)
        texts.push_back(task.test.texts[static_cast<std::size_t>(i)]);
      const text::TokenBatch tb = bert.tokenizer.encode_batch(texts, max_length);
      const moekit::MatrixView<float> hv(h.data(), tb.tokens(), d);
      enc.embed(tb.ids_view(), {}, tb.offsets_view(), w, hv);
      const cpu::ExitState state{{original.data(), m0}, {previous.data(), m0}, {agree.data(), m0}};
      const cpu::ExitResults res{{pred.data(), m0}, {conf.data(), m0}, {exit.data(), m0}};
      if (!exits) {
        enc.run_layers(0, 6, tb.offsets_view(), w, hv, wsv);
        const auto logits = full(h.data(), tb.offsets.data(), m0);
        for (index_t i = 0; i < m0; ++i) {
          const float* r = logits.row(i);
          pred[static_cast<std::size_t>(i)] =
              static_cast<std::int32_t>(std::max_element(r, r + C) - r);
          exit[static_cast<std::size_t>(i)] = 2;
        }
      } else {
        index_t m = rule.begin(m0, state, res);
        float* cur = h.data();
        float* other = g.data();
        std::vector<index_t> offs(tb.offsets.begin(), tb.offsets.end());
        int done = 0;
        for (int e = 0; e < 3 && m > 0; ++e) {
          const int upto = e < 2 ? kExitLayers[e] : 6;
          const moekit::VectorView<const index_t> ov(offs.data(), m + 1);
          const moekit::MatrixView<float> cv(cur, offs[static_cast<std::size_t>(m)], d);
          enc.run_layers(done, upto, ov, w, cv, wsv);
          done = upto;
          moekit::MatrixView<const float> logits;
          if (e < 2) {
            cpu::pool_sequences(cv, ov, cpu::Pooling::kMean, false, {pooled.data(), m, d});
            logits = head(e == 0 ? h2 : h4, m);
          } else {
            logits = full(cur, offs.data(), m);
          }
          const index_t live = rule.step(e, logits, state, res, {kept.data(), m});
          if (e < 2 && live > 0) {  // compact: only the samples that stay run on
            index_t kept_tokens = 0;
            for (index_t k = 0; k < live; ++k) {
              const auto seq = static_cast<std::size_t>(kept[static_cast<std::size_t>(k)]);
              kept_tokens += offs[seq + 1] - offs[seq];
            }
            cpu::gather_sequences(cv, ov, {kept.data(), live}, {other, kept_tokens, d},
                                  {offsets2.data(), live + 1});
            std::copy_n(offsets2.begin(), live + 1, offs.begin());
            std::swap(cur, other);
          }
          m = live;
        }
      }
      for (index_t i = 0; i < m0; ++i) {
        const auto k = static_cast<std::size_t>(i);
        correct += pred[k] == task.test.labels[static_cast<std::size_t>(b0 + i)] ? 1 : 0;
        layers += kExitLayersRun[exit[k]];
      }
    }
    const double ms = 1e3 * since(t0) / static_cast<double>(std::max<index_t>(1, n));
    (exits ? out.exit_ms : out.full_ms) = ms;
    (exits ? out.exit_acc : out.full_acc) = correct / static_cast<double>(std::max<index_t>(1, n));
    if (exits) out.exit_layers = layers / static_cast<double>(std::max<index_t>(1, n));
  }
  return out;
}

// ---- routing analysis ----------------------------------------------------------------------

json routing_json(const std::vector<train::LayerRouting>& layers,
                  const text::WordPieceTokenizer& tok) {
  json out = json::array();
  for (const train::LayerRouting& l : layers) {
    json j;
    j["experts"] = l.experts;
    j["top_k"] = l.top_k;
    j["task_expert"] = l.task_expert;
    j["max_over_mean"] = l.max_over_mean();
    j["mean_token_entropy"] = l.mean_entropy();
    j["max_entropy"] = std::log(static_cast<double>(l.experts));
    j["coactivation"] = l.coactivation;
    // The tokens each expert likes most: among token ids seen at least 20
    // times, the highest share of their assignments that went to the expert.
    json likes = json::array();
    for (int e = 0; e < l.experts; ++e) {
      std::vector<std::pair<double, std::int32_t>> share;
      for (const auto& [id, per] : l.token_expert) {
        index_t total = 0;
        for (const index_t c : per) total += c;
        const index_t seen = total / l.top_k;
        if (seen < 20) continue;
        share.emplace_back(
            static_cast<double>(per[static_cast<std::size_t>(e)]) / static_cast<double>(seen), id);
      }
      std::sort(share.begin(), share.end(), [](const auto& a, const auto& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
      });
      json top = json::array();
      for (std::size_t i = 0; i < std::min<std::size_t>(8, share.size()); ++i) {
        top.push_back({{"token", tok.token(share[i].second)}, {"share", share[i].first}});
      }
      likes.push_back(top);
    }
    j["top_tokens"] = likes;
    out.push_back(j);
  }
  return out;
}

json scores_json(const train::TextEval& e) {
  return {{"accuracy", e.accuracy},
          {"macro_f1", e.macro_f1},
          {"count", e.count},
          {"mean_accuracy", e.mean_accuracy()},
          {"mean_macro_f1", e.mean_macro_f1()}};
}

json params_json(const moekit::ModelParams& p) {
  const auto c = [](const moekit::ParamCount& x) {
    return json{{"total", x.total}, {"active", x.active}, {"trainable", x.trainable}};
  };
  return {{"encoder", c(p.encoder)},
          {"moe", c(p.moe)},
          {"adapter_base", c(p.adapter_base)},
          {"branch", c(p.branch)},
          {"total", c(p.total)}};
}

void print_table(const std::vector<train::TextTask>& tasks,
                 const std::vector<std::pair<std::string, const train::TextEval*>>& rows) {
  std::printf("\n%-24s", "test accuracy / macro-F1");
  for (int t = 0; t < kTasks; ++t)
    std::printf(" %17s", tasks[static_cast<std::size_t>(t)].name.c_str());
  std::printf(" %13s\n", "mean");
  for (const auto& [name, e] : rows) {
    std::printf("%-24s", name.c_str());
    for (int t = 0; t < kTasks; ++t) {
      std::printf("      %5.1f / %5.1f", 100 * e->accuracy[static_cast<std::size_t>(t)],
                  100 * e->macro_f1[static_cast<std::size_t>(t)]);
    }
    std::printf("  %5.1f / %5.1f\n", 100 * e->mean_accuracy(), 100 * e->mean_macro_f1());
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each result line as it comes, into a file too
  const Options o = parse(argc, argv);
  if (o.model.empty() || !std::filesystem::exists(o.model / "model.safetensors")) {
    std::fprintf(stderr,
                 "no model folder: pass --model DIR or set MOEKIT_MINILM_DIR "
                 "(tools/bootstrap.sh installs all-MiniLM-L6-v2)\n");
    return 77;
  }
  const std::vector<train::CorpusFiles> files = train::reference_task_files();
  for (const train::CorpusFiles& f : files) {
    if (!std::filesystem::exists(o.data / f.train)) {
      std::fprintf(stderr, "no data: %s is missing (tools/bootstrap.sh unpacks it into %s)\n",
                   (o.data / f.train).string().c_str(), o.data.string().c_str());
      return 77;
    }
  }
  std::filesystem::create_directories(o.out);
  json summary;
  json& stages = summary["stage_seconds"];
  const auto t_all = Clock::now();

  // ---- 1. data --------------------------------------------------------------------------------
  auto t0 = Clock::now();
  std::vector<train::TextTask> tasks;
  for (std::size_t t = 0; t < files.size(); ++t) {
    tasks.push_back(train::read_reference_task(o.data, files[t], o.train, o.test, 100 + t));
  }
  stages["read"] = since(t0);
  std::printf("data: %zu tasks read in %.1f s\n", tasks.size(), since(t0));
  for (const train::TextTask& t : tasks) {
    std::printf("  %-16s %2ld classes  %6ld train  %6ld test\n", t.name.c_str(),
                static_cast<long>(t.num_classes()), static_cast<long>(t.train.size()),
                static_cast<long>(t.test.size()));
    summary["tasks"].push_back({{"name", t.name},
                                {"classes", t.train.classes},
                                {"train", t.train.size()},
                                {"test", t.test.size()}});
  }

  // ---- 2. encoder, cached
  // ------------------------------------------------------------------------
  t0 = Clock::now();
  const moekit::io::BertModel bert = moekit::io::load_bert_model(o.model);
  const std::uint64_t model_hash = text::model_fingerprint(o.model);
  const std::vector<int> exits(std::begin(kExitLayers), std::end(kExitLayers));
  index_t encoded = 0, reused = 0, tokens_encoded = 0;
  for (train::TextTask& t : tasks) {
    for (const bool is_train : {true, false}) {
      const std::string split = is_train ? "train" : "test";
      const auto te = Clock::now();
      text::CacheStats st;
      const std::string label = t.name + " " + split;
      text::EncodedTexts e = text::encode_texts(
          bert, model_hash, (is_train ? t.train : t.test).texts, o.max_length, exits,
          o.cache / (t.name + "-" + split + ".mkenc"),
          [&](index_t done, index_t total) { progress(label.c_str(), done, total, since(te)); },
          &st);
      (is_train ? t.train_encoded : t.test_encoded) = std::move(e);
      encoded += st.encoded;
      reused += st.reused;
      tokens_encoded += st.tokens_encoded;
    }
  }
  stages["encode"] = since(t0);
  summary["encoding"] = {{"encoded", encoded},
                         {"from_cache", reused},
                         {"tokens_encoded", tokens_encoded},
                         {"max_length", o.max_length},
                         {"seconds", since(t0)}};
  std::printf("encoder: %ld texts encoded (%ld tokens), %ld from the cache, %.1f s\n",
              static_cast<long>(encoded), static_cast<long>(tokens_encoded),
              static_cast<long>(reused), since(t0));

  std::vector<const text::EncodedTexts*> tr_enc, te_enc;
  std::vector<const std::vector<std::int32_t>*> tr_lab, te_lab;
  std::array<index_t, kTasks> classes{};
  std::vector<index_t> class_list;
  for (int t = 0; t < kTasks; ++t) {
    const train::TextTask& x = tasks[static_cast<std::size_t>(t)];
    tr_enc.push_back(&x.train_encoded);
    te_enc.push_back(&x.test_encoded);
    tr_lab.push_back(&x.train.labels);
    te_lab.push_back(&x.test.labels);
    classes[static_cast<std::size_t>(t)] = x.num_classes();
    class_list.push_back(x.num_classes());
  }
  train::TextSamples train_set(tr_enc, tr_lab), test_set(te_enc, te_lab);
  const std::int64_t steps = steps_for(o.epochs, train_set.size(), o.batch);
  const index_t max_tokens = o.batch * o.max_length;
  summary["steps"] = steps;
  summary["batch"] = o.batch;
  summary["compute"] = cpu::gemm_dtype_name(o.compute);

  // ---- 3. the MoE system, and 4. the baselines
  // -----------------------------------------------------
  t0 = Clock::now();
  cpu::TextMultitaskModel<Coarse, Lora, Heads> moe(
      model_config<Coarse, Heads>(classes, kExpertWidth, 2, max_tokens, o.compute));
  const RunResult moe_run = train_and_evaluate("moe", moe, train_set, test_set, steps, o.batch, o);
  stages["train_moe"] = moe_run.train_seconds;

  const train::TextEval majority = train::evaluate_majority(train_set, test_set, class_list);
  cpu::TextMultitaskModel<Coarse, Lora, Heads> linear(
      model_config<Coarse, Heads>(classes, kExpertWidth, 0, max_tokens, o.compute));
  const RunResult linear_run =
      train_and_evaluate("linear", linear, train_set, test_set, steps, o.batch, o, true);
  stages["train_linear"] = linear_run.train_seconds;
  cpu::TextMultitaskModel<Dense, Lora, Heads> dense(
      model_config<Dense, Heads>(classes, 2 * kExpertWidth, 2, max_tokens, o.compute));
  const RunResult dense_run =
      train_and_evaluate("dense", dense, train_set, test_set, steps, o.batch, o);
  stages["train_dense"] = dense_run.train_seconds;

  // ---- 5. fine-grained MoE: E = 64, K = 8, the same active parameters ---------------------------
  cpu::TextMultitaskModel<Fine, Lora, Heads> fine(
      model_config<Fine, Heads>(classes, 2 * kExpertWidth / 8, 2, max_tokens, o.compute));
  const RunResult fine_run =
      train_and_evaluate("fine", fine, train_set, test_set, steps, o.batch, o);
  stages["train_fine"] = fine_run.train_seconds;

  print_table(tasks, {{"majority class", &majority},
                      {"linear head", &linear_run.eval},
                      {"dense FFN", &dense_run.eval},
                      {"MoE E=8 K=2", &moe_run.eval},
                      {"MoE E=64 K=8 (fine)", &fine_run.eval}});
  for (const auto& [name, r] : {std::pair<const char*, const RunResult*>{"moe", &moe_run},
                                {"linear", &linear_run},
                                {"dense", &dense_run},
                                {"fine", &fine_run}}) {
    json& m = summary["models"][name];
    m["test"] = scores_json(r->eval);
    m["train_seconds"] = r->train_seconds;
    m["eval_seconds"] = r->eval.seconds;
    m["params"] = params_json(r->params);
  }
  summary["models"]["majority"]["test"] = scores_json(majority);
  summary["models"]["moe"]["routing"] = routing_json(moe_run.eval.routing, bert.tokenizer);
  summary["models"]["fine"]["routing"] = routing_json(fine_run.eval.routing, bert.tokenizer);
  for (std::size_t l = 0; l < moe_run.eval.routing.size(); ++l) {
    std::printf(
        "MoE layer %zu: max/mean load %.2f (E=8), %.2f (E=64 fine); routing entropy "
        "%.2f of %.2f nats\n",
        l, moe_run.eval.routing[l].max_over_mean(), fine_run.eval.routing[l].max_over_mean(),
        moe_run.eval.routing[l].mean_entropy(), std::log(8.0));
  }

  // ---- 6. branch expansion: BBC News, only its adapter and head ---------------------------------
  t0 = Clock::now();
  {
    const train::TextTask& bbc = tasks[kTasks];
    auto bigger = moe.with_branch(bbc.num_classes(), 99);
    std::vector<const text::EncodedTexts*> test5 = te_enc;
    std::vector<const std::vector<std::int32_t>*> tlab5 = te_lab;
    test5.push_back(&bbc.test_encoded);
    tlab5.push_back(&bbc.test.labels);
    // Only BBC samples train; the five-branch test set scores every branch.
    train::TextSamples bbc_train({&bbc.train_encoded}, {&bbc.train.labels}, kTasks);
    train::TextSamples test5_set(test5, tlab5);
    using Bigger = decltype(bigger);
    const std::int64_t bbc_steps = steps_for(o.epochs, bbc_train.size(), o.batch);
    train::TrainerConfig tc = trainer_config(bbc_steps, false);
    tc.scope = cpu::TrainScope::only_branch(kTasks);
    train::Trainer<Bigger> trainer(bigger, tc);
    const auto tt = Clock::now();
    train::train_text_model<Bigger>(trainer, bbc_train, bbc_steps, o.batch, 13, {},
                                    [&](std::int64_t s, const train::StepReport<Bigger>&) {
                                      if ((s + 1) % 10 == 0 || s + 1 == bbc_steps)
                                        progress("train bbc branch", s + 1, bbc_steps, since(tt));
                                    });
    const double bbc_train_s = since(tt);
    const train::TextEval e5 = train::evaluate_text_model(bigger, test5_set, {}, false);
    // The old branches' logits, before (4-branch model) and after: bit for bit.
    index_t differing = 0, compared = 0;
    const train::TextEval& before = moe_run.eval;
    for (index_t s = 0; s < test_set.size(); ++s) {
      const index_t c =
          classes[static_cast<std::size_t>(test_set.tasks()[static_cast<std::size_t>(s)])];
      for (index_t j = 0; j < c; ++j) {
        ++compared;
        if (std::memcmp(&before.logits[static_cast<std::size_t>(s * before.logit_cols + j)],
                        &e5.logits[static_cast<std::size_t>(s * e5.logit_cols + j)],
                        sizeof(float)) != 0) {
          ++differing;
        }
      }
    }
    const moekit::ParamCount branch = moe.branch_params(bbc.num_classes());
    std::printf(
        "\nbranch expansion (bbc-news, %ld classes): test accuracy %.1f / macro-F1 %.1f; "
        "%ld trained parameters; %.1f s for %ld steps; old branches: %ld of %ld logits "
        "differ\n",
        static_cast<long>(bbc.num_classes()), 100 * e5.accuracy[kTasks], 100 * e5.macro_f1[kTasks],
        static_cast<long>(branch.trainable), bbc_train_s, static_cast<long>(bbc_steps),
        static_cast<long>(differing), static_cast<long>(compared));
    summary["expansion"] = {{"task", bbc.name},
                            {"accuracy", e5.accuracy[kTasks]},
                            {"macro_f1", e5.macro_f1[kTasks]},
                            {"trained_params", branch.trainable},
                            {"train_seconds", bbc_train_s},
                            {"steps", bbc_steps},
                            {"old_logits_compared", compared},
                            {"old_logits_differing", differing}};
  }
  stages["expansion"] = since(t0);
  // ---- 7. early exit, with and without distillation
  // ----------------------------------------------
  t0 = Clock::now();
  {
    const train::TextEval teacher_eval = train::evaluate_text_model(moe, train_set, {}, false);
    const std::vector<float> thresholds = {
        0.0f, 0.5f, 0.6f, 0.7f, 0.8f, 0.9f, 0.95f, 0.99f, std::numeric_limits<float>::infinity()};
    std::printf(
        "\nearly exit (confidence rule; exits after encoder layers 2 and 4, then the full "
        "system after 6):\n");
    std::printf("%-16s %-9s %s\n", "branch", "heads", "threshold: accuracy @ mean layers");
    for (int t = 0; t < kTasks; ++t) {
      const train::TextTask& task = tasks[static_cast<std::size_t>(t)];
      const index_t C = task.num_classes(), Cm = moe.heads().max_classes();
      // The full system's logits (first C columns), on train (teacher) and test.
      std::vector<float> teacher, full;
      for (index_t s = 0; s < train_set.size(); ++s) {
        if (train_set.tasks()[static_cast<std::size_t>(s)] != t) continue;
        const auto* r = teacher_eval.logits.data() + s * Cm;
        teacher.insert(teacher.end(), r, r + C);
      }
      for (index_t s = 0; s < test_set.size(); ++s) {
        if (test_set.tasks()[static_cast<std::size_t>(s)] != t) continue;
        const auto* r = moe_run.eval.logits.data() + s * Cm;
        full.insert(full.end(), r, r + C);
      }
      json& jt = summary["early_exit"][task.name];
      std::array<std::unique_ptr<ExitHead>, 2> distilled;
      for (const bool distill : {false, true}) {
        std::array<std::unique_ptr<ExitHead>, 2> heads;
        std::array<std::vector<float>, 2> logits;
        for (int e = 0; e < 2; ++e) {
          heads[static_cast<std::size_t>(e)] =
              train_exit_head(task, e, distill ? &teacher : nullptr, o.epochs, o.batch);
          logits[static_cast<std::size_t>(e)] =
              exit_logits(*heads[static_cast<std::size_t>(e)], task, e);
        }
        const char* kind = distill ? "distilled" : "labels";
        std::printf("%-16s %-9s", task.name.c_str(), kind);
        json curve = json::array();
        for (const float th : thresholds) {
          const ExitPoint p = exit_point({&logits[0], &logits[1], &full}, C, task.test.labels, th);
          curve.push_back({{"threshold", std::isinf(th) ? -1.0 : double(th)},
                           {"accuracy", p.accuracy},
                           {"mean_layers", p.mean_layers}});
          if (th == 0.0f || th == 0.8f || th == 0.95f || std::isinf(th)) {
            std::printf("  %s: %.1f%% @ %.2f",
                        std::isinf(th) ? "off" : (th == 0.0f ? "0" : (th == 0.8f ? ".8" : ".95")),
                        100 * p.accuracy, p.mean_layers);
          }
        }
        std::printf("\n");
        jt[kind] = curve;
        if (distill) distilled = std::move(heads);
      }
      const Latency lat = live_latency(bert, task, t, moe, *distilled[0], *distilled[1], 0.9f,
                                       std::min<index_t>(64, task.test.size()), 16, o.max_length);
      std::printf(
          "%-16s live, %ld texts: %.1f ms/text without exits (acc %.1f%%), %.1f ms/text "
          "with exits at 0.9 (acc %.1f%%, %.2f layers)\n",
          task.name.c_str(), static_cast<long>(lat.texts), lat.full_ms, 100 * lat.full_acc,
          lat.exit_ms, 100 * lat.exit_acc, lat.exit_layers);
      jt["live"] = {{"texts", lat.texts},
                    {"threshold", 0.9},
                    {"full_ms_per_text", lat.full_ms},
                    {"exit_ms_per_text", lat.exit_ms},
                    {"full_accuracy", lat.full_acc},
                    {"exit_accuracy", lat.exit_acc},
                    {"exit_mean_layers", lat.exit_layers}};
    }
  }
  stages["early_exit"] = since(t0);

  // ---- 8. int8 inference: the encoder, the experts and the heads in int8 ---------------------
  t0 = Clock::now();
  {
    // The routers stay fp32 (a top-K choice flips on the smallest change of a
    // logit); each branch's adapter is folded into its head (TextMultitaskModel::pack).
    const auto moe8 = moe.pack(cpu::GemmDtype::kInt8);
    const cpu::PackedBertWeights enc8 =
        bert.encoder.pack(bert.weights.weights(), cpu::GemmDtype::kInt8);
    // The model alone in int8, on the fp32 encoder's states; then the whole
    // system: the test texts through the int8 encoder (cached apart from fp32's).
    const train::TextEval model8 = train::evaluate_text_model(moe, test_set, {}, false, &moe8);
    std::vector<text::EncodedTexts> states8(kTasks);
    std::vector<const text::EncodedTexts*> te_enc8;
    for (int t = 0; t < kTasks; ++t) {
      const train::TextTask& task = tasks[static_cast<std::size_t>(t)];
      const auto te = Clock::now();
      const std::string label = task.name + " test int8";
      states8[static_cast<std::size_t>(t)] = text::encode_texts(
          bert, model_hash, task.test.texts, o.max_length, {},
          o.cache / (task.name + "-test-int8.mkenc"),
          [&](index_t done, index_t total) { progress(label.c_str(), done, total, since(te)); },
          nullptr, &enc8);
      te_enc8.push_back(&states8[static_cast<std::size_t>(t)]);
    }
    train::TextSamples test8(te_enc8, te_lab);
    const train::TextEval system8 = train::evaluate_text_model(moe, test8, {}, false, &moe8);
    index_t agree = 0;
    for (std::size_t s = 0; s < system8.predictions.size(); ++s)
      agree += system8.predictions[s] == moe_run.eval.predictions[s] ? 1 : 0;
    std::printf(
        "\nint8 inference (encoder, experts and heads in int8, routers fp32), test accuracy:\n"
        "%-16s %8s %12s %12s %8s\n",
        "branch", "fp32", "int8 model", "int8 system", "change");
    json& j8 = summary["int8"];
    for (int t = 0; t < kTasks; ++t) {
      const auto u = static_cast<std::size_t>(t);
      const double change = 100 * (system8.accuracy[u] - moe_run.eval.accuracy[u]);
      std::printf("%-16s %8.1f %12.1f %12.1f %+8.1f\n", tasks[u].name.c_str(),
                  100 * moe_run.eval.accuracy[u], 100 * model8.accuracy[u],
                  100 * system8.accuracy[u], change);
      j8["branches"][tasks[u].name] = {{"fp32", moe_run.eval.accuracy[u]},
                                       {"int8_model", model8.accuracy[u]},
                                       {"int8_system", system8.accuracy[u]},
                                       {"int8_system_macro_f1", system8.macro_f1[u]}};
    }
    const auto n = static_cast<index_t>(system8.predictions.size());
    std::printf("int8 system: %ld of %ld test predictions as fp32's\n", static_cast<long>(agree),
                static_cast<long>(n));
    j8["same_predictions"] = agree;
    j8["test_texts"] = n;
  }
  stages["int8"] = since(t0);
  stages["total"] = since(t_all);

  std::ofstream(o.out / "summary.json") << summary.dump(1) << "\n";
  std::printf("\nwrote %s (stage times: total %.0f s)\n", (o.out / "summary.json").string().c_str(),
              since(t_all));
  return 0;
}
