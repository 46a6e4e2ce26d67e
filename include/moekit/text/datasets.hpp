#pragma once
// Readers for labelled text corpora as they ship in Python packages (host
// only): Orange's .tab files, quoted CSV, and one folder of text files per
// class. Each returns LabelledTexts: the texts, a label per text and the class
// names (label l is classes[l]).
//
// Classes. Without a class list the classes are the distinct values of the
// class field, sorted bytewise, so ids do not depend on the row order. With
// one (e.g. the training file's classes when reading its test file) labels are
// positions in it and a value outside it is an error: the two files then
// agree on every id.
//
// Records (Orange .tab and CSV alike): fields separated by the delimiter
// (tab or comma); a field that starts with '"' is quoted: it ends at the next
// '"' that is not doubled ("" stands for one '"'), may hold delimiters and
// line breaks, and must be followed by the delimiter or the end of the line.
// Lines end in "\n" or "\r\n" (a file may mix them); a UTF-8 byte order mark
// at the start is skipped; blank lines (nothing but spaces or '\r') are
// skipped wherever they are; the last line may lack its line end. Field
// contents are kept byte for byte (the tokenizer decodes UTF-8 and replaces
// invalid bytes).
//
// Orange .tab: three header lines (names; types such as d, string,
// continuous, discrete; roles such as class, meta, or empty), tab-separated,
// each with as many fields as the first, then one record per line with that
// many fields.
//   read_orange_tab(path, "Text", "Category")
// CSV: a header line of column names, then one record per row with as many
// fields (RFC 4180; quoted fields may span lines).
//   read_csv(path, "text", "category")
// Folders: read_class_folders(dir) takes each subfolder of dir as a class
// (its name), each regular file in it as one text; folders and files in
// bytewise order of their names. Files directly in dir are an error.
//
// Errors (moekit::Error), each naming the file and, for records, the line
// where the record starts and the field:
//   kIoError      a file or folder cannot be opened or read
//   kFormatError  a missing header line or column; a record with a different
//                 number of fields; an unterminated quoted field or text
//                 after a closing quote; an empty class field; a class value
//                 outside the given class list; no records at all
// Nothing is returned from a file with any malformed record.
//
// seeded_split(n, test_fraction, seed) splits [0, n) into a training and a
// test part, each in increasing order, the same on every machine (moekit's
// counter-based generator, moekit/core/random.hpp).

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/types.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace text {

struct LabelledTexts {
  std::vector<std::string> texts;
  std::vector<std::int32_t> labels;  // one per text, in [0, classes.size())
  std::vector<std::string> classes;  // label id -> class name

  index_t size() const { return static_cast<index_t>(texts.size()); }
  index_t num_classes() const { return static_cast<index_t>(classes.size()); }
  // The rows `rows` (indices into this), in that order, with the same classes.
  LabelledTexts subset(const std::vector<index_t>& rows) const {
    LabelledTexts out;
    out.classes = classes;
    for (const index_t r : rows) {
      MOEKIT_CHECK_RANGE(r, 0, size());
      out.texts.push_back(texts[static_cast<std::size_t>(r)]);
      out.labels.push_back(labels[static_cast<std::size_t>(r)]);
    }
    return out;
  }
};

namespace detail {

inline std::string read_whole_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  MOEKIT_CHECK(in.is_open(), Errc::kIoError, "cannot open '", path.string(), "'");
  std::ostringstream s;
  s << in.rdbuf();
  MOEKIT_CHECK(!in.bad(), Errc::kIoError, "reading '", path.string(), "' failed");
  return std::move(s).str();
}

// A record: its fields and the line it starts on (1-based).
struct Record {
  std::vector<std::string> fields;
  index_t line = 0;
};

// Splits a delimited file into records (the rules at the top of this file),
// blank lines dropped.
class RecordReader {
 public:
  RecordReader(std::string_view data, char delimiter, const std::filesystem::path& path)
      : data_(data), delim_(delimiter), path_(path) {
    if (data_.starts_with("\xEF\xBB\xBF")) pos_ = 3;
  }

  // The next non-blank record; false at the end of the data.
  bool next(Record& r) {
    while (pos_ < data_.size()) {
      const std::size_t end = line_end(pos_);
      const std::string_view line = data_.substr(pos_, end - pos_);
      if (line.find_first_not_of(" \r") != std::string_view::npos) break;
      skip_line_end(end);
    }
    if (pos_ >= data_.size()) return false;
    r.fields.clear();
    r.line = line_;
    while (true) {
      std::string field;
      if (pos_ < data_.size() && data_[pos_] == '"') {
        quoted(field, r.line, r.fields.size());
      } else {
        while (pos_ < data_.size() && data_[pos_] != delim_ && data_[pos_] != '\n') {
          field += data_[pos_++];
        }
        if (pos_ >= data_.size() || data_[pos_] == '\n') {
          if (!field.empty() && field.back() == '\r') field.pop_back();
        }
      }
      r.fields.push_back(std::move(field));
      if (pos_ < data_.size() && data_[pos_] == delim_) {
        ++pos_;
        continue;
      }
      skip_line_end(pos_);
      return true;
    }
  }

 private:
  std::size_t line_end(std::size_t from) const {
    const std::size_t e = data_.find('\n', from);
    return e == std::string_view::npos ? data_.size() : e;
  }
  void skip_line_end(std::size_t at) {
    pos_ = at;
    if (pos_ < data_.size() && data_[pos_] == '\n') {
      ++pos_;
      ++line_;
    }
  }
  // A quoted field from pos_ (at its opening quote) to just past its closing one.
  void quoted(std::string& field, index_t start_line, std::size_t index) {
    ++pos_;
    while (true) {
      MOEKIT_CHECK(pos_ < data_.size(), Errc::kFormatError, path_.string(), ":", start_line,
                   ": field ", index + 1,
                   ": the quoted field is not closed before the end of the file");
      const char c = data_[pos_++];
      if (c == '\n') ++line_;
      if (c != '"') {
        field += c;
        continue;
      }
      if (pos_ < data_.size() && data_[pos_] == '"') {
        field += '"';
        ++pos_;
        continue;
      }
      std::size_t after = pos_;
      if (after < data_.size() && data_[after] == '\r') ++after;
      MOEKIT_CHECK(after >= data_.size() || data_[after] == delim_ || data_[after] == '\n',
                   Errc::kFormatError, path_.string(), ":", line_, ": field ", index + 1,
                   ": text after the closing quote of a quoted field");
      pos_ = after < data_.size() && data_[after] == '\n' ? after : pos_;
      return;
    }
  }

  std::string_view data_;
  char delim_;
  const std::filesystem::path& path_;
  std::size_t pos_ = 0;
  index_t line_ = 1;
};

inline std::size_t column_of(const std::vector<std::string>& names, std::string_view name,
                             const std::filesystem::path& path, index_t line) {
  const auto it = std::find(names.begin(), names.end(), name);
  MOEKIT_CHECK(it != names.end(), Errc::kFormatError, path.string(), ":", line,
               ": the header has no column \"", name, "\"");
  return static_cast<std::size_t>(it - names.begin());
}

// Collects (text, class value) records, then assigns labels.
class Collector {
 public:
  Collector(const std::filesystem::path& path, const std::vector<std::string>& classes)
      : path_(path), fixed_(classes) {}

  void add(std::string text, std::string cls, index_t line, std::string_view class_name) {
    MOEKIT_CHECK(!cls.empty(), Errc::kFormatError, path_.string(), ":", line, ": field \"",
                 class_name, "\" (the class) is empty");
    if (!fixed_.empty()) {
      MOEKIT_CHECK(std::find(fixed_.begin(), fixed_.end(), cls) != fixed_.end(), Errc::kFormatError,
                   path_.string(), ":", line, ": field \"", class_name, "\": class \"", cls,
                   "\" is not one of the ", fixed_.size(), " given classes");
    }
    texts_.push_back(std::move(text));
    values_.push_back(std::move(cls));
  }

  LabelledTexts finish() && {
    MOEKIT_CHECK(!texts_.empty(), Errc::kFormatError, path_.string(), ": no records");
    LabelledTexts out;
    out.classes = fixed_;
    if (out.classes.empty()) {
      out.classes = values_;
      std::sort(out.classes.begin(), out.classes.end());
      out.classes.erase(std::unique(out.classes.begin(), out.classes.end()), out.classes.end());
    }
    std::map<std::string_view, std::int32_t> id;
    for (std::size_t c = 0; c < out.classes.size(); ++c) {
      id.emplace(out.classes[c], static_cast<std::int32_t>(c));
    }
    for (const std::string& v : values_) out.labels.push_back(id.at(v));
    out.texts = std::move(texts_);
    return out;
  }

 private:
  const std::filesystem::path& path_;
  const std::vector<std::string>& fixed_;
  std::vector<std::string> texts_, values_;
};

// Parses the records of `data` (the contents of `path`, which messages name)
// after `header_lines` header records of the same width as the first.
inline LabelledTexts parse_delimited(std::string_view data, const std::filesystem::path& path,
                                     char delimiter, int header_lines, std::string_view text_column,
                                     std::string_view class_column,
                                     const std::vector<std::string>& classes) {
  RecordReader reader(data, delimiter, path);
  Record header;
  MOEKIT_CHECK(reader.next(header), Errc::kFormatError, path.string(),
               ": the file is empty (expected a header line)");
  const std::size_t width = header.fields.size();
  const std::size_t text_col = column_of(header.fields, text_column, path, header.line);
  const std::size_t class_col = column_of(header.fields, class_column, path, header.line);
  Record r;
  for (int h = 1; h < header_lines; ++h) {
    MOEKIT_CHECK(reader.next(r), Errc::kFormatError, path.string(), ": header line ", h + 1, " of ",
                 header_lines, " is missing");
    MOEKIT_CHECK(r.fields.size() == width, Errc::kFormatError, path.string(), ":", r.line,
                 ": header line ", h + 1, " has ", r.fields.size(), " fields, the first has ",
                 width);
  }
  Collector out(path, classes);
  while (reader.next(r)) {
    MOEKIT_CHECK(r.fields.size() == width, Errc::kFormatError, path.string(), ":", r.line,
                 ": the record has ", r.fields.size(), " fields, the header has ", width,
                 " (field \"", r.fields.size() < width ? header.fields[r.fields.size()] : "?",
                 "\" ", r.fields.size() < width ? "is missing" : "and more are extra", ")");
    out.add(std::move(r.fields[text_col]), std::move(r.fields[class_col]), r.line, class_column);
  }
  return std::move(out).finish();
}

inline LabelledTexts read_delimited(const std::filesystem::path& path, char delimiter,
                                    int header_lines, std::string_view text_column,
                                    std::string_view class_column,
                                    const std::vector<std::string>& classes) {
  return parse_delimited(read_whole_file(path), path, delimiter, header_lines, text_column,
                         class_column, classes);
}

}  // namespace detail

inline LabelledTexts read_orange_tab(const std::filesystem::path& path,
                                     std::string_view text_column, std::string_view class_column,
                                     const std::vector<std::string>& classes = {}) {
  return detail::read_delimited(path, '\t', 3, text_column, class_column, classes);
}

inline LabelledTexts read_csv(const std::filesystem::path& path, std::string_view text_column,
                              std::string_view class_column,
                              const std::vector<std::string>& classes = {}) {
  return detail::read_delimited(path, ',', 1, text_column, class_column, classes);
}

inline LabelledTexts read_class_folders(const std::filesystem::path& dir,
                                        const std::vector<std::string>& classes = {}) {
  std::error_code ec;
  MOEKIT_CHECK(std::filesystem::is_directory(dir, ec), Errc::kIoError, "'", dir.string(),
               "' is not a folder");
  std::vector<std::filesystem::path> folders;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    MOEKIT_CHECK(e.is_directory(), Errc::kFormatError, dir.string(), ": '",
                 e.path().filename().string(), "' is not a class folder");
    folders.push_back(e.path());
  }
  std::sort(folders.begin(), folders.end());
  detail::Collector out(dir, classes);
  for (const std::filesystem::path& f : folders) {
    std::vector<std::filesystem::path> files;
    for (const auto& e : std::filesystem::directory_iterator(f)) {
      if (e.is_regular_file()) files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    for (const std::filesystem::path& p : files) {
      out.add(detail::read_whole_file(p), f.filename().string(), 1, "folder name");
    }
  }
  return std::move(out).finish();
}

// A seeded split of [0, n): about test_fraction of the rows (round to
// nearest) go to the test part; both parts in increasing order.
struct Split {
  std::vector<index_t> train, test;
};

inline Split seeded_split(index_t n, double test_fraction, std::uint64_t seed) {
  MOEKIT_CHECK_GE(n, 0);
  MOEKIT_CHECK_ARG(test_fraction >= 0.0 && test_fraction <= 1.0, "test_fraction = ", test_fraction,
                   " must be in [0, 1]");
  std::vector<index_t> perm(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) perm[static_cast<std::size_t>(i)] = i;
  const std::uint64_t key = mix64(seed ^ 0x53706c6974ull);
  for (index_t i = n - 1; i > 0; --i) {  // Fisher-Yates, counter-based draws
    const auto j = static_cast<index_t>(random_bits(key, static_cast<std::uint64_t>(i)) %
                                        static_cast<std::uint64_t>(i + 1));
    std::swap(perm[static_cast<std::size_t>(i)], perm[static_cast<std::size_t>(j)]);
  }
  const auto n_test = static_cast<index_t>(test_fraction * static_cast<double>(n) + 0.5);
  Split s;
  s.test.assign(perm.begin(), perm.begin() + n_test);
  s.train.assign(perm.begin() + n_test, perm.end());
  std::sort(s.test.begin(), s.test.end());
  std::sort(s.train.begin(), s.train.end());
  return s;
}

}  // namespace text
MOEKIT_NAMESPACE_END
