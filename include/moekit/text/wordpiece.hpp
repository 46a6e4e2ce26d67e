#pragma once
// BERT's WordPiece tokenizer (host only): text -> token ids, id for id those
// of the reference (Hugging Face tokenizers' BertNormalizer,
// BertPreTokenizer and WordPiece model with BERT's template), for uncased and
// cased BERT vocabularies.
//
// The steps, in the reference's order:
//   0. decode   UTF-8 -> code points; invalid bytes become U+FFFD
//               (moekit/text/unicode.hpp)
//   1. special  the special tokens ([PAD] [UNK] [CLS] [SEP] [MASK] by default)
//               are found in the raw text, case-sensitive, leftmost-longest,
//               and become their ids as they are; the text between them
//               goes through the steps below
//   2. clean    drop NUL, U+FFFD and control / format characters (Cc, Cf, Co;
//               tab, newline and carriage return are whitespace); every
//               whitespace character becomes ' '                [clean_text]
//   3. CJK      put spaces around CJK ideographs               [split_cjk]
//   4. accents  canonical decomposition (NFD), then drop nonspacing marks
//                                                               [strip_accents]
//   5. lower    lowercase each code point (full mapping, no context) [lowercase]
//   6. words    split on whitespace (dropped) and punctuation (P* and ASCII
//               punctuation, each a word of its own)
//   7. pieces   greedy longest-match-first against the vocabulary; pieces after
//               the first carry the "##" prefix; a word of more than
//               max_chars_per_word code points, or one that cannot be covered,
//               is one [UNK]
//   8. template [CLS] pieces [SEP], the pieces truncated to max_length - 2
// The character properties come from moekit/text/unicode_tables.hpp, made to
// agree with the reference on every code point (its header says how).
//
// Ids are std::int32_t, the index of the token's line in vocab.txt.
//
//   const auto tok = moekit::text::WordPieceTokenizer::from_vocab_file("vocab.txt");
//   const moekit::text::TokenBatch batch = tok.encode_batch(texts, 256);
//   // batch.ids: every sequence back to back; batch.offsets: B + 1 entries
//
// Errors (moekit::Error): kIoError (vocab file unreadable), kFormatError (a
// token twice in the vocabulary, an empty line), kInvalidArgument (a special
// token or the unknown / continuation tokens missing from the vocabulary, a
// config value out of range, max_length < 2).

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"
#include "moekit/text/unicode.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace text {

// The tokenizer's options (the defaults are BERT uncased's). The steps named
// are those at the top of this file.
struct WordPieceConfig {
  bool clean_text = true;            // step 2 (drop control characters, unify whitespace)
  bool split_cjk = true;             // step 3 (each CJK ideograph a word of its own)
  bool strip_accents = true;         // BERT uncased: true (the reference ties it to lowercase)
  bool lowercase = true;             // step 5; false for cased vocabularies
  index_t max_chars_per_word = 100;  // longer words become one unk_token; at least 1
  std::string unk_token = "[UNK]";   // for a word the vocabulary cannot cover
  std::string cls_token = "[CLS]";   // opens every encoded sequence
  std::string sep_token = "[SEP]";   // closes every encoded sequence
  std::string pad_token = "[PAD]";   // fills padded batches (pad_batch)
  std::string continuation_prefix = "##";  // marks the pieces after a word's first; not empty
  // Found whole in the raw text (step 1); each must be in the vocabulary.
  std::vector<std::string> special_tokens = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
};

// Sequences of token ids back to back: sequence s is ids[offsets[s], offsets[s + 1]).
struct TokenBatch {
  std::vector<std::int32_t> ids;    // every sequence's ids, back to back
  std::vector<index_t> offsets{0};  // B + 1 entries: 0, then each sequence's end

  index_t size() const { return static_cast<index_t>(offsets.size()) - 1; }  // sequences
  // Token ids in all sequences together (N).
  index_t tokens() const { return static_cast<index_t>(ids.size()); }
  // Tokens in sequence s, s in [0, size()) (not checked).
  index_t length(index_t s) const {
    return offsets[static_cast<std::size_t>(s) + 1] - offsets[static_cast<std::size_t>(s)];
  }
  // The longest sequence's length (0 for no sequences).
  index_t longest() const {
    index_t m = 0;
    for (index_t s = 0; s < size(); ++s) m = std::max(m, length(s));
    return m;
  }
  // ids as a view (the encoder's `ids` argument); valid while ids is unchanged.
  VectorView<const std::int32_t> ids_view() const { return {ids.data(), tokens()}; }
  // offsets as a view (the encoder's `offsets` argument).
  VectorView<const index_t> offsets_view() const { return {offsets.data(), size() + 1}; }
};

// The same batch as a B x width rectangle (width = longest sequence): ids
// padded with pad_id, mask 1 on tokens and 0 on padding (the layout of the
// reference's padded output).
struct PaddedBatch {
  index_t rows = 0;                // B, the sequences
  index_t width = 0;               // the longest sequence's length
  std::vector<std::int32_t> ids;   // rows x width, row-major, padded with pad_id
  std::vector<std::int32_t> mask;  // rows x width: 1 on tokens, 0 on padding
};

// `batch` as a rectangle padded with `pad_id` (usually the tokenizer's pad_id()).
inline PaddedBatch pad_batch(const TokenBatch& batch, std::int32_t pad_id) {
  PaddedBatch out;
  out.rows = batch.size();
  out.width = batch.longest();
  const auto cells = static_cast<std::size_t>(out.rows * out.width);
  out.ids.assign(cells, pad_id);
  out.mask.assign(cells, 0);
  for (index_t s = 0; s < out.rows; ++s) {
    for (index_t j = 0; j < batch.length(s); ++j) {
      const auto cell = static_cast<std::size_t>(s * out.width + j);
      out.ids[cell] =
          batch.ids[static_cast<std::size_t>(batch.offsets[static_cast<std::size_t>(s)] + j)];
      out.mask[cell] = 1;
    }
  }
  return out;
}

// A vocabulary and a config: turns text into token ids (steps at the top of
// this file). Immutable after construction; calls on one tokenizer may run
// concurrently.
class WordPieceTokenizer {
 public:
  // vocab[i] is the token of id i.
  WordPieceTokenizer(std::vector<std::string> vocab, WordPieceConfig config = {})
      : config_(std::move(config)), vocab_(std::move(vocab)) {
    MOEKIT_CHECK_ARG(config_.max_chars_per_word >= 1,
                     "config.max_chars_per_word = ", config_.max_chars_per_word,
                     " must be at least 1");
    MOEKIT_CHECK_ARG(!config_.continuation_prefix.empty(), "config.continuation_prefix is empty");
    MOEKIT_CHECK_ARG(vocab_.size() < std::size_t{INT32_MAX}, "the vocabulary has ", vocab_.size(),
                     " tokens, more than 32-bit ids can number");
    ids_.reserve(vocab_.size());
    for (std::size_t i = 0; i < vocab_.size(); ++i) {
      MOEKIT_CHECK(!vocab_[i].empty(), Errc::kFormatError, "vocabulary line ", i + 1, " is empty");
      const auto [it, fresh] = ids_.emplace(vocab_[i], static_cast<std::int32_t>(i));
      MOEKIT_CHECK(fresh, Errc::kFormatError, "token '", vocab_[i], "' is on vocabulary lines ",
                   it->second + 1, " and ", i + 1);
    }
    unk_id_ = require(config_.unk_token, "config.unk_token");
    cls_id_ = require(config_.cls_token, "config.cls_token");
    sep_id_ = require(config_.sep_token, "config.sep_token");
    pad_id_ = require(config_.pad_token, "config.pad_token");
    for (const std::string& t : config_.special_tokens) {
      const std::int32_t id = require(t, "config.special_tokens");
      std::u32string cps;
      decode_utf8(t, cps);
      specials_.push_back({std::move(cps), id});
    }
  }

  // Reads vocab.txt: one token per line ('\n' or "\r\n"), id = line index.
  static WordPieceTokenizer from_vocab_file(const std::filesystem::path& path,
                                            WordPieceConfig config = {}) {
    std::ifstream in(path, std::ios::binary);
    MOEKIT_CHECK(in.good(), Errc::kIoError, "cannot open the vocabulary '", path.string(), "'");
    std::vector<std::string> vocab;
    std::string line;
    while (std::getline(in, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      vocab.push_back(std::move(line));
    }
    MOEKIT_CHECK(in.eof(), Errc::kIoError, "cannot read the vocabulary '", path.string(), "'");
    return WordPieceTokenizer(std::move(vocab), std::move(config));
  }

  // The config given at construction.
  const WordPieceConfig& config() const { return config_; }
  // Tokens in the vocabulary; ids are [0, vocab_size()).
  index_t vocab_size() const { return static_cast<index_t>(vocab_.size()); }
  // The id of config().unk_token.
  std::int32_t unk_id() const { return unk_id_; }
  // The id of config().cls_token.
  std::int32_t cls_id() const { return cls_id_; }
  // The id of config().sep_token.
  std::int32_t sep_id() const { return sep_id_; }
  // The id of config().pad_token.
  std::int32_t pad_id() const { return pad_id_; }

  // The id of a token, or -1 if it is not in the vocabulary.
  std::int32_t token_id(std::string_view token) const {
    const auto it = ids_.find(token);
    return it == ids_.end() ? -1 : it->second;
  }
  // The token of `id` as in the vocabulary (continuation pieces with their
  // prefix); kOutOfRange unless id is in [0, vocab_size()).
  const std::string& token(std::int32_t id) const {
    MOEKIT_CHECK_RANGE(id, 0, vocab_size());
    return vocab_[static_cast<std::size_t>(id)];
  }

  // Appends the pieces of `text` (steps 0-7: no [CLS] / [SEP], no truncation).
  void tokenize(std::string_view text, std::vector<std::int32_t>& out) const {
    Scratch s;
    decode_utf8(text, s.raw);
    std::size_t begin = 0;  // of the text not yet tokenized
    std::size_t i = 0;
    while (i < s.raw.size()) {
      const Special* hit = special_at(s.raw, i);
      if (hit == nullptr) {
        ++i;
        continue;
      }
      tokenize_plain(s, begin, i, out);
      out.push_back(hit->id);
      i += hit->text.size();
      begin = i;
    }
    tokenize_plain(s, begin, s.raw.size(), out);
  }

  // [CLS] pieces [SEP], the pieces cut to the first max_length - 2.
  std::vector<std::int32_t> encode(std::string_view text, index_t max_length) const {
    MOEKIT_CHECK_GE(max_length, 2);
    std::vector<std::int32_t> ids{cls_id_};
    tokenize(text, ids);
    if (static_cast<index_t>(ids.size()) > max_length - 1) {
      ids.resize(static_cast<std::size_t>(max_length - 1));
    }
    ids.push_back(sep_id_);
    return ids;
  }

  // encode() of every text, back to back. Texts: any range of things that
  // convert to std::string_view.
  template <class Texts>
  TokenBatch encode_batch(const Texts& texts, index_t max_length) const {
    MOEKIT_CHECK_GE(max_length, 2);
    TokenBatch batch;
    for (const auto& text : texts) {
      const std::vector<std::int32_t> ids = encode(std::string_view(text), max_length);
      batch.ids.insert(batch.ids.end(), ids.begin(), ids.end());
      batch.offsets.push_back(static_cast<index_t>(batch.ids.size()));
    }
    return batch;
  }

 private:
  struct Special {
    std::u32string text;
    std::int32_t id;
  };

  // Reused buffers of one tokenize() call.
  struct Scratch {
    std::u32string raw, cleaned, normalized;
    std::string word, piece;
    std::vector<std::size_t> bounds;  // byte offset of each code point of word, then its size
  };

  // Transparent hashing: look tokens up by string_view without a copy.
  struct Hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };

  std::int32_t require(const std::string& token, const char* field) const {
    const std::int32_t id = token_id(token);
    MOEKIT_CHECK_ARG(id >= 0, field, " '", token, "' is not in the vocabulary");
    return id;
  }

  // The longest special token that starts at raw[i], if any.
  const Special* special_at(const std::u32string& raw, std::size_t i) const {
    const Special* best = nullptr;
    for (const Special& sp : specials_) {
      if (sp.text.empty() || raw.compare(i, sp.text.size(), sp.text) != 0) continue;
      if (best == nullptr || sp.text.size() > best->text.size()) best = &sp;
    }
    return best;
  }

  // Steps 2-7 on raw[begin, end).
  void tokenize_plain(Scratch& s, std::size_t begin, std::size_t end,
                      std::vector<std::int32_t>& out) const {
    namespace t = unicode_tables;
    if (begin >= end) return;
    s.cleaned.clear();
    for (std::size_t i = begin; i < end; ++i) {
      char32_t c = s.raw[i];
      const std::uint8_t f = unicode::flags(c);
      if (config_.clean_text) {
        if (f & t::kRemove) continue;
        if (f & t::kSpace) c = U' ';
      }
      const bool spaced = config_.split_cjk && (f & t::kCjk);
      if (spaced) s.cleaned.push_back(U' ');
      if (config_.strip_accents) {
        unicode::append_decomposition(c, s.cleaned);
      } else {
        s.cleaned.push_back(c);
      }
      if (spaced) s.cleaned.push_back(U' ');
    }
    if (config_.strip_accents) unicode::canonical_order(s.cleaned, 0);
    s.normalized.clear();
    for (const char32_t c : s.cleaned) {
      if (config_.strip_accents && (unicode::flags(c) & t::kMark)) continue;
      if (config_.lowercase) {
        unicode::append_lowercase(c, s.normalized);
      } else {
        s.normalized.push_back(c);
      }
    }
    // Words: split on whitespace, punctuation alone.
    std::size_t start = 0;
    const std::size_t n = s.normalized.size();
    for (std::size_t i = 0; i <= n; ++i) {
      const std::uint8_t f = i < n ? unicode::flags(s.normalized[i]) : t::kSpace;
      if (!(f & (t::kSpace | t::kPunctuation))) continue;
      word_pieces(s, start, i, out);
      if (f & t::kPunctuation) word_pieces(s, i, i + 1, out);
      start = i + 1;
    }
  }

  // Step 7 on the word normalized[begin, end).
  void word_pieces(Scratch& s, std::size_t begin, std::size_t end,
                   std::vector<std::int32_t>& out) const {
    if (begin >= end) return;
    if (static_cast<index_t>(end - begin) > config_.max_chars_per_word) {
      out.push_back(unk_id_);
      return;
    }
    s.word.clear();
    std::vector<std::size_t>& bounds = s.bounds;
    bounds.clear();
    for (std::size_t i = begin; i < end; ++i) {
      bounds.push_back(s.word.size());
      append_utf8(s.normalized[i], s.word);
    }
    bounds.push_back(s.word.size());
    const std::size_t first_piece = out.size();
    const std::size_t chars = end - begin;
    std::size_t from = 0;  // in code points
    while (from < chars) {
      std::size_t to = chars;
      std::int32_t id = -1;
      for (; to > from; --to) {
        const std::string_view sub(s.word.data() + bounds[from], bounds[to] - bounds[from]);
        if (from == 0) {
          id = token_id(sub);
        } else {
          s.piece.assign(config_.continuation_prefix);
          s.piece.append(sub);
          id = token_id(s.piece);
        }
        if (id >= 0) break;
      }
      if (id < 0) {  // the word cannot be covered: one [UNK] for all of it
        out.resize(first_piece);
        out.push_back(unk_id_);
        return;
      }
      out.push_back(id);
      from = to;
    }
  }

  WordPieceConfig config_;
  std::vector<std::string> vocab_;
  std::unordered_map<std::string, std::int32_t, Hash, std::equal_to<>> ids_;
  std::vector<Special> specials_;
  std::int32_t unk_id_ = -1, cls_id_ = -1, sep_id_ = -1, pad_id_ = -1;
};

}  // namespace text
MOEKIT_NAMESPACE_END
