#pragma once
// Training monitoring for moekit's reference multi-task model (docs/reference_model.md:
// total loss, aux loss, per-branch accuracy, expert utilisation, speed,
// memory). Host only.
//
// StepRecord. What a trainer reports at a step, for one split ("train",
// "eval", ...): the learning rate, the losses (loss = task_loss + the weighted
// aux_loss, as the trainer defines it), the gradient norm before clipping, the
// accuracy of each branch (task head) in [0, 1], the expert load of each MoE
// layer (E fractions: the share of the layer's routed assignments, token-slots,
// that went to each expert; they sum to 1, and 1/E each is perfect balance;
// expert_load_fractions() turns per-expert counts into them), the throughput,
// the peak resident memory and the wall time since the run started.
//
// MetricsLog writes records to
//   - a JSON Lines file: one object per record and line, with the fields of
//     StepRecord under the same names (accuracy an array, expert_load an array of
//     arrays); a NaN or infinite number is written as null (JSON has no NaN),
//     and read back as NaN. nlohmann-json writes it and read_metrics() reads it.
//   - optionally a CSV file with a header row:
//       split,step,lr,loss,task_loss,aux_loss,grad_norm,acc_0,...,acc_{B-1},
//       load_l0_e0,...,load_l{M-1}_e{E_{M-1}-1},tokens_per_s,peak_rss_mib,elapsed_s
//     B branches and M layers of E_l experts, fixed by the first record written.
//     A later record must have the same shape, except that its accuracy or its
//     expert_load (or one layer of it) may be empty, which leaves those cells
//     empty (an eval record without routing statistics, say). Numbers are in
//     their shortest round-trip form (std::to_chars); NaN and infinities as
//     nan, inf, -inf; the split is quoted (RFC 4180) when it needs to be.
// Each record is flushed as soon as it is written, so the log of a run that
// crashes or is killed ends at its last record. MetricsMode::kAppend continues
// existing files (a resumed run); the CSV header is then written only to an
// empty file, and must otherwise equal the header the first record would
// write. A record that does not fit is rejected before either file is written.
//
// progress_line() formats a record as one short line for a terminal, meant to
// be printed after '\r'. peak_rss_mib() is the process's peak resident set
// size in MiB (2^20 bytes) from getrusage(RUSAGE_SELF): ru_maxrss is in KiB on
// Linux and the BSDs and in bytes on macOS; it is 0 where getrusage is absent
// (Windows).
//
// Errors (moekit::Error):
//   kIoError        a log cannot be opened or written, read_metrics() cannot
//                   open its file (naming the path)
//   kShapeMismatch  a record whose accuracy / expert_load shape differs from the
//                   CSV's layout, or a kAppend CSV whose header differs
//   kFormatError    read_metrics(): a line that is not a JSON object of the
//                   fields above (naming the file and line)
//
//   moekit::train::MetricsLog log("run/metrics.jsonl", "run/metrics.csv");
//   moekit::train::StepRecord r;
//   r.step = step; r.loss = loss; r.accuracy = {0.71, 0.64, 0.80};
//   r.expert_load = {moekit::train::expert_load_fractions(counts_l0), ...};
//   r.peak_rss_mib = moekit::train::peak_rss_mib();
//   log.write(r);
//   std::printf("\r%s", moekit::train::progress_line(r, total_steps).c_str());

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <istream>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moekit/detail/json.hpp"  // nlohmann_json (moekit::io)

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/types.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/resource.h>
#define MOEKIT_DETAIL_HAS_GETRUSAGE 1
#else
#define MOEKIT_DETAIL_HAS_GETRUSAGE 0
#endif

MOEKIT_NAMESPACE_BEGIN
namespace train {

// One step's metrics for one split (fields as at the top of this file).
struct StepRecord {
  std::string split = "train";                   // which data: "train", "eval", ...
  std::int64_t step = 0;                         // optimizer steps taken
  double lr = 0;                                 // learning rate at the step
  double loss = 0;                               // task_loss + weighted aux_loss
  double task_loss = 0;                          // the branches' cross-entropy loss
  double aux_loss = 0;                           // the MoE layers' weighted aux losses
  double grad_norm = 0;                          // global gradient L2 norm, before clipping
  std::vector<double> accuracy;                  // per branch, in [0, 1]
  std::vector<std::vector<double>> expert_load;  // per MoE layer, E fractions
  double tokens_per_s = 0;                       // throughput: tokens (or samples) per second
  double peak_rss_mib = 0;                       // peak resident memory, MiB (peak_rss_mib())
  double elapsed_s = 0;                          // wall time since the run started, seconds
};

// The mean of the branches' accuracies (NaN with no branches).
inline double mean_accuracy(const StepRecord& r) {
  if (r.accuracy.empty()) return std::numeric_limits<double>::quiet_NaN();
  double sum = 0.0;
  for (const double a : r.accuracy) sum += a;
  return sum / static_cast<double>(r.accuracy.size());
}

// Per-expert counts -> fractions of their sum (all 0 when the sum is 0).
template <class T>
std::vector<double> expert_load_fractions(std::span<const T> counts) {
  double total = 0.0;
  for (const T c : counts) total += static_cast<double>(c);
  std::vector<double> out(counts.size(), 0.0);
  if (total > 0.0) {
    for (std::size_t e = 0; e < counts.size(); ++e) out[e] = static_cast<double>(counts[e]) / total;
  }
  return out;
}
// The same for a vector of counts.
template <class T>
std::vector<double> expert_load_fractions(const std::vector<T>& counts) {
  return expert_load_fractions(std::span<const T>(counts));
}

// ---- JSON --------------------------------------------------------------------------------------

namespace detail {

inline nlohmann::json json_number(double v) {
  return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr);
}

inline double number_from_json(const nlohmann::json& j, const char* key) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    return it == j.end() ? 0.0 : std::numeric_limits<double>::quiet_NaN();
  }
  if (!it->is_number()) {
    MOEKIT_FAIL(Errc::kFormatError, "field \"", key, "\" is ", it->type_name(), ", not a number");
  }
  return it->get<double>();
}

inline double element_from_json(const nlohmann::json& v, const char* key) {
  if (v.is_null()) return std::numeric_limits<double>::quiet_NaN();
  if (!v.is_number()) {
    MOEKIT_FAIL(Errc::kFormatError, "an element of \"", key, "\" is ", v.type_name(),
                ", not a number");
  }
  return v.get<double>();
}

}  // namespace detail

// nlohmann-json conversions (found by argument-dependent lookup, so
// `nlohmann::json j = record;` and `j.get<StepRecord>()` work). from_json
// leaves missing fields at their defaults and reads null as NaN; a field of
// the wrong type is kFormatError.
inline void to_json(nlohmann::json& j, const StepRecord& r) {
  nlohmann::json acc = nlohmann::json::array();
  for (const double a : r.accuracy) acc.push_back(detail::json_number(a));
  nlohmann::json load = nlohmann::json::array();
  for (const std::vector<double>& layer : r.expert_load) {
    nlohmann::json l = nlohmann::json::array();
    for (const double f : layer) l.push_back(detail::json_number(f));
    load.push_back(std::move(l));
  }
  j = nlohmann::json{{"split", r.split},
                     {"step", r.step},
                     {"lr", detail::json_number(r.lr)},
                     {"loss", detail::json_number(r.loss)},
                     {"task_loss", detail::json_number(r.task_loss)},
                     {"aux_loss", detail::json_number(r.aux_loss)},
                     {"grad_norm", detail::json_number(r.grad_norm)},
                     {"accuracy", std::move(acc)},
                     {"expert_load", std::move(load)},
                     {"tokens_per_s", detail::json_number(r.tokens_per_s)},
                     {"peak_rss_mib", detail::json_number(r.peak_rss_mib)},
                     {"elapsed_s", detail::json_number(r.elapsed_s)}};
}

// The inverse of to_json (kFormatError on a non-object or a mistyped field).
inline void from_json(const nlohmann::json& j, StepRecord& r) {
  MOEKIT_CHECK(j.is_object(), Errc::kFormatError, "a record is ", j.type_name(),
               ", not a JSON object");
  StepRecord out;
  if (const auto it = j.find("split"); it != j.end()) {
    MOEKIT_CHECK(it->is_string(), Errc::kFormatError, "field \"split\" is ", it->type_name(),
                 ", not a string");
    out.split = it->get<std::string>();
  }
  if (const auto it = j.find("step"); it != j.end()) {
    MOEKIT_CHECK(it->is_number_integer(), Errc::kFormatError, "field \"step\" is ", it->type_name(),
                 ", not an integer");
    out.step = it->get<std::int64_t>();
  }
  out.lr = detail::number_from_json(j, "lr");
  out.loss = detail::number_from_json(j, "loss");
  out.task_loss = detail::number_from_json(j, "task_loss");
  out.aux_loss = detail::number_from_json(j, "aux_loss");
  out.grad_norm = detail::number_from_json(j, "grad_norm");
  out.tokens_per_s = detail::number_from_json(j, "tokens_per_s");
  out.peak_rss_mib = detail::number_from_json(j, "peak_rss_mib");
  out.elapsed_s = detail::number_from_json(j, "elapsed_s");
  if (const auto it = j.find("accuracy"); it != j.end()) {
    MOEKIT_CHECK(it->is_array(), Errc::kFormatError, "field \"accuracy\" is ", it->type_name(),
                 ", not an array");
    for (const nlohmann::json& v : *it)
      out.accuracy.push_back(detail::element_from_json(v, "accuracy"));
  }
  if (const auto it = j.find("expert_load"); it != j.end()) {
    MOEKIT_CHECK(it->is_array(), Errc::kFormatError, "field \"expert_load\" is ", it->type_name(),
                 ", not an array");
    for (const nlohmann::json& layer : *it) {
      MOEKIT_CHECK(layer.is_array(), Errc::kFormatError, "a layer of \"expert_load\" is ",
                   layer.type_name(), ", not an array");
      std::vector<double>& l = out.expert_load.emplace_back();
      for (const nlohmann::json& v : layer)
        l.push_back(detail::element_from_json(v, "expert_load"));
    }
  }
  r = std::move(out);
}

// Every record of a JSON Lines log read from `in`; `source` names it in
// messages. Blank lines are skipped, and so are objects without a "step"
// (metadata lines, e.g. {"chance": [...]}, which tools/plot_run.py reads).
// A bad line is kFormatError "<source>:<line>: <reason>", the reason cut
// short (a line is never quoted whole).
inline std::vector<StepRecord> read_metrics(std::istream& in, const std::string& source) {
  std::vector<StepRecord> records;
  std::string line;
  for (std::size_t line_no = 1; std::getline(in, line); ++line_no) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    try {
      const nlohmann::json j = nlohmann::json::parse(line);
      if (j.is_object() && !j.contains("step")) continue;  // metadata, not a record
      records.push_back(j.get<StepRecord>());
    } catch (const nlohmann::json::exception& e) {
      // The parser's message ends with the last token it read, which may be
      // the whole line: left out.
      std::string why = e.what();
      why.resize(std::min(why.find("; last read:"), why.size()));
      MOEKIT_FAIL(Errc::kFormatError, source, ":", line_no, ": ", why);
    } catch (const Error& e) {
      MOEKIT_FAIL(Errc::kFormatError, source, ":", line_no, ": ", e.what());
    }
  }
  MOEKIT_CHECK(!in.bad(), Errc::kIoError, "cannot read '", source, "'");
  return records;
}

// The same, from a file.
inline std::vector<StepRecord> read_metrics(const std::filesystem::path& jsonl) {
  std::ifstream in(jsonl, std::ios::binary);
  MOEKIT_CHECK(in.is_open(), Errc::kIoError, "cannot open '", jsonl.string(), "' for reading");
  return read_metrics(in, jsonl.string());
}

// ---- the log -----------------------------------------------------------------------------------

// How MetricsLog opens existing files.
enum class MetricsMode {
  kTruncate,  // start new files
  kAppend,    // continue existing ones (a resumed run)
};

namespace detail {

inline void append_number(std::string& out, double v) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  out.append(buf, res.ptr);
}

inline void append_csv_text(std::string& out, std::string_view s) {
  if (s.find_first_of(",\"\r\n") == std::string_view::npos) {
    out += s;
    return;
  }
  out += '"';
  for (const char ch : s) {
    if (ch == '"') out += '"';
    out += ch;
  }
  out += '"';
}

}  // namespace detail

// The CSV header a record's shape gives (layout at the top of this file).
inline std::string metrics_csv_header(const StepRecord& r) {
  std::string h = "split,step,lr,loss,task_loss,aux_loss,grad_norm";
  for (std::size_t b = 0; b < r.accuracy.size(); ++b) h += ",acc_" + std::to_string(b);
  for (std::size_t l = 0; l < r.expert_load.size(); ++l) {
    for (std::size_t e = 0; e < r.expert_load[l].size(); ++e)
      h += ",load_l" + std::to_string(l) + "_e" + std::to_string(e);
  }
  return h + ",tokens_per_s,peak_rss_mib,elapsed_s";
}

// Writes StepRecords to a JSON Lines file and optionally a CSV file, each
// record flushed at once (formats at the top of this file).
class MetricsLog {
 public:
  // Opens `jsonl` and, unless empty, `csv` for writing (kIoError otherwise),
  // truncating or appending as `mode` says.
  explicit MetricsLog(std::filesystem::path jsonl, std::filesystem::path csv = {},
                      MetricsMode mode = MetricsMode::kTruncate)
      : jsonl_path_(std::move(jsonl)), csv_path_(std::move(csv)) {
    const auto flags = std::ios::binary | std::ios::out |
                       (mode == MetricsMode::kAppend ? std::ios::app : std::ios::trunc);
    jsonl_.open(jsonl_path_, flags);
    MOEKIT_CHECK(jsonl_.is_open(), Errc::kIoError, "cannot open '", jsonl_path_.string(),
                 "' for writing");
    if (csv_path_.empty()) return;
    if (mode == MetricsMode::kAppend) {
      // An existing header fixes the layout; an empty or new file gets one.
      std::ifstream old(csv_path_, std::ios::binary);
      if (old.is_open() && std::getline(old, existing_header_)) {
        if (!existing_header_.empty() && existing_header_.back() == '\r')
          existing_header_.pop_back();
      }
    }
    csv_.open(csv_path_, flags);
    MOEKIT_CHECK(csv_.is_open(), Errc::kIoError, "cannot open '", csv_path_.string(),
                 "' for writing");
  }

  // The JSON Lines file's path.
  const std::filesystem::path& jsonl_path() const noexcept { return jsonl_path_; }
  // The CSV file's path (empty: no CSV).
  const std::filesystem::path& csv_path() const noexcept { return csv_path_; }
  // Records written through this log (not those already in an appended file).
  std::int64_t records() const noexcept { return records_; }

  // Appends r to the log(s) and flushes them.
  void write(const StepRecord& r) {
    std::string csv_line;
    if (csv_.is_open()) csv_line = csv_row(r);  // checks the shape before anything is written
    nlohmann::json j = r;
    const std::string line = j.dump() + '\n';
    jsonl_.write(line.data(), static_cast<std::streamsize>(line.size()));
    jsonl_.flush();
    MOEKIT_CHECK(jsonl_.good(), Errc::kIoError, "cannot write '", jsonl_path_.string(), "'");
    if (csv_.is_open()) {
      csv_.write(csv_line.data(), static_cast<std::streamsize>(csv_line.size()));
      csv_.flush();
      MOEKIT_CHECK(csv_.good(), Errc::kIoError, "cannot write '", csv_path_.string(), "'");
    }
    ++records_;
  }

 private:
  // The record's CSV line, preceded by the header on the first write.
  std::string csv_row(const StepRecord& r) {
    std::string out;
    if (!layout_fixed_) {
      const std::string header = metrics_csv_header(r);
      if (existing_header_.empty()) {
        out = header + '\n';
      } else {
        MOEKIT_CHECK(existing_header_ == header, Errc::kShapeMismatch, "'", csv_path_.string(),
                     "' has the header \"", existing_header_, "\", the record gives \"", header,
                     "\"");
      }
      branches_ = r.accuracy.size();
      experts_.clear();
      for (const std::vector<double>& layer : r.expert_load) experts_.push_back(layer.size());
    } else {
      MOEKIT_CHECK(r.accuracy.empty() || r.accuracy.size() == branches_, Errc::kShapeMismatch,
                   "record.accuracy has ", r.accuracy.size(), " branches, the CSV log ", branches_,
                   " (or give none)");
      MOEKIT_CHECK(r.expert_load.empty() || r.expert_load.size() == experts_.size(),
                   Errc::kShapeMismatch, "record.expert_load has ", r.expert_load.size(),
                   " layers, the CSV log ", experts_.size(), " (or give none)");
      for (std::size_t l = 0; l < r.expert_load.size(); ++l) {
        MOEKIT_CHECK(r.expert_load[l].empty() || r.expert_load[l].size() == experts_[l],
                     Errc::kShapeMismatch, "record.expert_load[", l, "] has ",
                     r.expert_load[l].size(), " experts, the CSV log ", experts_[l],
                     " (or give none)");
      }
    }
    layout_fixed_ = true;
    detail::append_csv_text(out, r.split);
    out += ',';
    out += std::to_string(r.step);
    for (const double v : {r.lr, r.loss, r.task_loss, r.aux_loss, r.grad_norm}) {
      out += ',';
      detail::append_number(out, v);
    }
    for (std::size_t b = 0; b < branches_; ++b) {
      out += ',';
      if (!r.accuracy.empty()) detail::append_number(out, r.accuracy[b]);
    }
    for (std::size_t l = 0; l < experts_.size(); ++l) {
      const bool has = l < r.expert_load.size() && !r.expert_load[l].empty();
      for (std::size_t e = 0; e < experts_[l]; ++e) {
        out += ',';
        if (has) detail::append_number(out, r.expert_load[l][e]);
      }
    }
    for (const double v : {r.tokens_per_s, r.peak_rss_mib, r.elapsed_s}) {
      out += ',';
      detail::append_number(out, v);
    }
    out += '\n';
    return out;
  }

  std::filesystem::path jsonl_path_;
  std::filesystem::path csv_path_;
  std::ofstream jsonl_;
  std::ofstream csv_;
  std::string existing_header_;  // kAppend: the CSV's header, if it had one
  bool layout_fixed_ = false;
  std::size_t branches_ = 0;
  std::vector<std::size_t> experts_;  // per layer
  std::int64_t records_ = 0;
};

// ---- terminal and memory -----------------------------------------------------------------------

// One short line, e.g.
//   step 1200/5000 24% | loss 1.2345 task 1.2210 aux 1.0135 | acc 67.3% | 12.3k tok/s | 512 MiB |
//   1m23s
// (a split other than "train" is prefixed, "[eval] "; total_steps <= 0 leaves
// out the total and the percentage; a record without branches shows "acc -").
inline std::string progress_line(const StepRecord& r, std::int64_t total_steps) {
  std::string s;
  char buf[160];
  if (r.split != "train") s += "[" + r.split + "] ";
  if (total_steps > 0) {
    std::snprintf(buf, sizeof(buf), "step %lld/%lld %3.0f%%", static_cast<long long>(r.step),
                  static_cast<long long>(total_steps),
                  100.0 * static_cast<double>(r.step) / static_cast<double>(total_steps));
  } else {
    std::snprintf(buf, sizeof(buf), "step %lld", static_cast<long long>(r.step));
  }
  s += buf;
  std::snprintf(buf, sizeof(buf), " | loss %.4f task %.4f aux %.4f", r.loss, r.task_loss,
                r.aux_loss);
  s += buf;
  const double acc = mean_accuracy(r);
  if (std::isnan(acc)) {
    s += " | acc -";
  } else {
    std::snprintf(buf, sizeof(buf), " | acc %.1f%%", 100.0 * acc);
    s += buf;
  }
  const double tps = r.tokens_per_s;
  if (tps >= 1e6) {
    std::snprintf(buf, sizeof(buf), " | %.2fM tok/s", tps / 1e6);
  } else if (tps >= 1e4) {
    std::snprintf(buf, sizeof(buf), " | %.1fk tok/s", tps / 1e3);
  } else {
    std::snprintf(buf, sizeof(buf), " | %.0f tok/s", tps);
  }
  s += buf;
  std::snprintf(buf, sizeof(buf), " | %.0f MiB", r.peak_rss_mib);
  s += buf;
  if (std::isfinite(r.elapsed_s) && r.elapsed_s >= 0) {
    const auto secs = static_cast<long long>(r.elapsed_s);
    if (secs >= 3600) {
      std::snprintf(buf, sizeof(buf), " | %lldh%02lldm%02llds", secs / 3600, secs / 60 % 60,
                    secs % 60);
    } else if (secs >= 60) {
      std::snprintf(buf, sizeof(buf), " | %lldm%02llds", secs / 60, secs % 60);
    } else {
      std::snprintf(buf, sizeof(buf), " | %.1fs", r.elapsed_s);
    }
    s += buf;
  }
  return s;
}

// The peak resident set size of this process in MiB (see the top of this
// file); 0 where it cannot be measured.
inline double peak_rss_mib() {
#if MOEKIT_DETAIL_HAS_GETRUSAGE
  rusage usage{};
  if (getrusage(RUSAGE_SELF, &usage) != 0) return 0.0;
#if defined(__APPLE__)
  return static_cast<double>(usage.ru_maxrss) / (1024.0 * 1024.0);  // bytes
#else
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // KiB
#endif
#else
  return 0.0;
#endif
}

}  // namespace train
MOEKIT_NAMESPACE_END
