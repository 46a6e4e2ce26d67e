// The WordPiece tokenizer and its Unicode helpers (moekit/text/): UTF-8
// decoding with U+FFFD substitution, the normalizer steps, pre-tokenization,
// greedy longest-match pieces, special tokens, truncation and bad input, on a
// small vocabulary made here. Parity with the reference tokenizer on the real
// vocabulary is text.tokenizer_parity (tests/python/).
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "expect_error.hpp"
#include "moekit/text/wordpiece.hpp"

namespace {

using moekit::Errc;
using moekit::index_t;
using moekit::text::WordPieceTokenizer;
using moekit_test::expect_error;
using Ids = std::vector<std::int32_t>;

std::u32string decode(std::string_view s) {
  std::u32string out;
  moekit::text::decode_utf8(s, out);
  return out;
}

const std::vector<std::string> kVocab = {
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the",  "cafe", "un",   "##aff", "##able",
    "a",     "##b",   "!",     ",",     "東",     "京",   "x",    "##x",  "e",     "naive",
    "é",     "ab",    "-",     "ς",     "σ",      "ο",    "δ",    "$",    "3",     "[",
    "]",     "mask",  "cls",   "i",     "ᄒ",     "##ᅡ", "##ᆫ", "hello"};

WordPieceTokenizer make(moekit::text::WordPieceConfig config = {}) {
  return WordPieceTokenizer(kVocab, std::move(config));
}

// The ids of the pieces of `text` (no [CLS] / [SEP]).
Ids pieces(const WordPieceTokenizer& tok, std::string_view text) {
  Ids ids;
  tok.tokenize(text, ids);
  return ids;
}

Ids ids_of(const WordPieceTokenizer& tok, std::initializer_list<const char*> tokens) {
  Ids ids;
  for (const char* t : tokens) ids.push_back(tok.token_id(t));
  return ids;
}

TEST(Utf8, DecodesValidText) {
  EXPECT_EQ(decode("a\xc3\xa9\xe6\x9d\xb1\xf0\x9f\x98\x80"),
            std::u32string(U"a\u00e9\u6771\U0001F600"));
  std::string back;
  for (const char32_t c : decode("a\xc3\xa9\xe6\x9d\xb1\xf0\x9f\x98\x80")) {
    moekit::text::append_utf8(c, back);
  }
  EXPECT_EQ(back, "a\xc3\xa9\xe6\x9d\xb1\xf0\x9f\x98\x80");
}

TEST(Utf8, ReplacesEachMaximalIllFormedSubpart) {
  const char32_t r = moekit::text::kReplacementCharacter;
  // Examples of the Unicode standard's U+FFFD substitution (as Python's "replace").
  EXPECT_EQ(decode("\x80"), std::u32string({r}));
  EXPECT_EQ(decode("\xc0\xaf"), std::u32string({r, r}));                // C0 never starts
  EXPECT_EQ(decode("\xe0\x80\xaf"), std::u32string({r, r, r}));         // overlong
  EXPECT_EQ(decode("\xed\xa0\x80"), std::u32string({r, r, r}));         // surrogate
  EXPECT_EQ(decode("\xf4\x90\x80\x80"), std::u32string({r, r, r, r}));  // > U+10FFFF
  EXPECT_EQ(decode("\xe2\x82"), std::u32string({r}));                   // truncated at the end
  EXPECT_EQ(decode("\xf0\x9f\x98x"), std::u32string({r, U'x'}));        // cut by an ASCII byte
  EXPECT_EQ(decode("\xe2\x28\xa1"), std::u32string({r, U'(', r}));
  EXPECT_EQ(decode("a\xffz"), std::u32string({U'a', r, U'z'}));
}

TEST(Unicode, TablesAnswerTheTokenizersQuestions) {
  namespace u = moekit::text::unicode;
  namespace t = moekit::text::unicode_tables;
  EXPECT_TRUE(u::flags(U'\x07') & t::kRemove);
  EXPECT_TRUE(u::flags(U'\u200b') & t::kRemove);  // zero-width space is Cf
  EXPECT_FALSE(u::flags(U'\t') & t::kRemove);
  EXPECT_TRUE(u::flags(U'\u3000') & t::kSpace);
  EXPECT_TRUE(u::flags(U'\u0301') & t::kMark);
  EXPECT_TRUE(u::flags(U'\u2014') & t::kPunctuation);
  EXPECT_TRUE(u::flags(U'$') & t::kPunctuation);  // ASCII punctuation, though Sc
  EXPECT_TRUE(u::flags(U'\u6771') & t::kCjk);
  EXPECT_FALSE(u::flags(U'\u3042') & t::kCjk);  // hiragana is not
  EXPECT_EQ(u::flags(0x110000), 0);
  EXPECT_EQ(u::combining_class(U'\u0301'), 230);
  EXPECT_EQ(u::combining_class(U'a'), 0);
  std::u32string s;
  u::append_decomposition(U'\u00e9', s);  // é -> e + U+0301
  u::append_decomposition(U'\ud55c', s);  // 한 -> three jamo
  EXPECT_EQ(s, std::u32string(U"e\u0301\u1112\u1161\u11ab"));
  s.clear();
  u::append_lowercase(U'\u0130', s);  // İ -> i + U+0307
  u::append_lowercase(U'\u03a3', s);  // Σ -> σ (no final-sigma context)
  EXPECT_EQ(s, std::u32string(U"i\u0307\u03c3"));
}

TEST(WordPiece, GreedyLongestMatchWithContinuationPieces) {
  const auto tok = make();
  EXPECT_EQ(pieces(tok, "unaffable"), ids_of(tok, {"un", "##aff", "##able"}));
  EXPECT_EQ(pieces(tok, "ab abb"), ids_of(tok, {"ab", "ab", "##b"}));
  EXPECT_EQ(pieces(tok, "xxx"), ids_of(tok, {"x", "##x", "##x"}));
  EXPECT_EQ(pieces(tok, "abz"), ids_of(tok, {"[UNK]"}));  // cannot be covered: one [UNK]
  EXPECT_EQ(pieces(tok, "zzz hello"), ids_of(tok, {"[UNK]", "hello"}));
}

TEST(WordPiece, NormalizesLikeBert) {
  const auto tok = make();
  // Lowercase and accents: "Café" -> "cafe"; "NAÏVE" -> "naive".
  EXPECT_EQ(pieces(tok, "Café NAÏVE"), ids_of(tok, {"cafe", "naive"}));
  // Combining marks out of canonical order are dropped all the same.
  EXPECT_EQ(pieces(tok, "e\u0323\u0301"), ids_of(tok, {"e"}));
  // Control and format characters vanish; whitespace of any kind splits.
  EXPECT_EQ(pieces(tok, "the\x07\u200b\u00a0the\u3000the\tthe"),
            ids_of(tok, {"the", "the", "the", "the"}));
  // Punctuation is a word of its own; CJK ideographs too.
  EXPECT_EQ(pieces(tok, "the,the!$3"), ids_of(tok, {"the", ",", "the", "!", "$", "3"}));
  EXPECT_EQ(pieces(tok, "the東京the"), ids_of(tok, {"the", "東", "京", "the"}));
  // Hangul syllables decompose into jamo; Greek capitals lowercase per character.
  EXPECT_EQ(pieces(tok, "한"), ids_of(tok, {"ᄒ", "##ᅡ", "##ᆫ"}));
  EXPECT_EQ(pieces(tok, "ΟΔΟΣ"), Ids{tok.unk_id()});  // "ο" then no "##δ": one [UNK]
  EXPECT_EQ(pieces(tok, "Σ ς"), ids_of(tok, {"σ", "ς"}));
  EXPECT_EQ(pieces(tok, "İ"), ids_of(tok, {"i"}));  // i + U+0307, the mark stripped
}

TEST(WordPiece, ConfigSwitchesStepsOff) {
  moekit::text::WordPieceConfig cased;
  cased.lowercase = false;
  cased.strip_accents = false;
  const auto tok = make(cased);
  EXPECT_EQ(pieces(tok, "é The"), ids_of(tok, {"é", "[UNK]"}));
  moekit::text::WordPieceConfig no_cjk;
  no_cjk.split_cjk = false;
  EXPECT_EQ(pieces(make(no_cjk), "東京"), ids_of(tok, {"[UNK]"}));
}

TEST(WordPiece, LongWordsAreOneUnknown) {
  const auto tok = make();
  EXPECT_EQ(pieces(tok, std::string(100, 'x')).size(), 100u);  // x ##x ... at the limit
  EXPECT_EQ(pieces(tok, std::string(101, 'x')), Ids{tok.unk_id()});
  moekit::text::WordPieceConfig short_words;
  short_words.max_chars_per_word = 3;
  EXPECT_EQ(pieces(make(short_words), "xxx xxxx"), ids_of(tok, {"x", "##x", "##x", "[UNK]"}));
}

TEST(WordPiece, SpecialTokensAreMatchedInTheRawText) {
  const auto tok = make();
  EXPECT_EQ(pieces(tok, "the[MASK]the [SEP]"), ids_of(tok, {"the", "[MASK]", "the", "[SEP]"}));
  // Case-sensitive and whole: "[mask]" is text.
  EXPECT_EQ(pieces(tok, "[mask]"), ids_of(tok, {"[", "mask", "]"}));
  EXPECT_EQ(pieces(tok, "[[CLS]]"), ids_of(tok, {"[", "[CLS]", "]"}));
  moekit::text::WordPieceConfig plain;
  plain.special_tokens.clear();
  EXPECT_EQ(pieces(make(plain), "[CLS]"), ids_of(tok, {"[", "cls", "]"}));
}

TEST(WordPiece, EncodeAddsTheTemplateAndTruncates) {
  const auto tok = make();
  EXPECT_EQ(tok.encode("", 8), ids_of(tok, {"[CLS]", "[SEP]"}));
  EXPECT_EQ(tok.encode(" \t\x01 ", 8), ids_of(tok, {"[CLS]", "[SEP]"}));
  EXPECT_EQ(tok.encode("the the the", 4), ids_of(tok, {"[CLS]", "the", "the", "[SEP]"}));
  EXPECT_EQ(tok.encode("unaffable", 3), ids_of(tok, {"[CLS]", "un", "[SEP]"}));
  EXPECT_EQ(tok.encode("the", 2), ids_of(tok, {"[CLS]", "[SEP]"}));
  expect_error([&] { (void)tok.encode("the", 1); }, Errc::kInvalidArgument);
}

TEST(WordPiece, InvalidUtf8IsDroppedLikeReplacementCharacters) {
  const auto tok = make();
  EXPECT_EQ(pieces(tok,
                   "th\xff"
                   "e \xe2\x82"),
            ids_of(tok, {"the"}));
  EXPECT_EQ(pieces(tok, "\xc0\xaf\xed\xa0\x80"), Ids{});
  EXPECT_EQ(pieces(tok, "the \xef\xbf\xbd the"), pieces(tok, "the \xff the"));
}

TEST(WordPiece, BatchesPackAndPad) {
  const auto tok = make();
  const std::vector<std::string> texts = {"the cafe", "", "unaffable the"};
  const moekit::text::TokenBatch batch = tok.encode_batch(texts, 16);
  ASSERT_EQ(batch.size(), 3);
  EXPECT_EQ(batch.offsets, (std::vector<index_t>{0, 4, 6, 12}));
  EXPECT_EQ(batch.longest(), 6);
  for (index_t s = 0; s < 3; ++s) {
    const Ids one = tok.encode(texts[static_cast<std::size_t>(s)], 16);
    EXPECT_EQ(Ids(batch.ids.begin() + batch.offsets[static_cast<std::size_t>(s)],
                  batch.ids.begin() + batch.offsets[static_cast<std::size_t>(s) + 1]),
              one);
  }
  const moekit::text::PaddedBatch padded = pad_batch(batch, tok.pad_id());
  ASSERT_EQ(padded.rows, 3);
  ASSERT_EQ(padded.width, 6);
  EXPECT_EQ(Ids(padded.mask.begin() + 6, padded.mask.begin() + 12), (Ids{1, 1, 0, 0, 0, 0}));
  EXPECT_EQ(padded.ids[8], tok.pad_id());
  EXPECT_EQ(padded.ids[12], tok.cls_id());
  const moekit::text::TokenBatch empty = tok.encode_batch(std::vector<std::string>{}, 16);
  EXPECT_EQ(empty.size(), 0);
  EXPECT_EQ(empty.longest(), 0);
}

TEST(WordPiece, RejectsBadVocabularies) {
  auto with = [](std::vector<std::string> v) { return [v] { WordPieceTokenizer t(v); }; };
  std::string msg = expect_error(with({"[PAD]", "[UNK]", "a", "a"}), Errc::kFormatError);
  EXPECT_NE(msg.find("'a' is on vocabulary lines 3 and 4"), std::string::npos) << msg;
  msg = expect_error(with({"[PAD]", "a"}), Errc::kInvalidArgument);
  EXPECT_NE(msg.find("config.unk_token '[UNK]' is not in the vocabulary"), std::string::npos)
      << msg;
  msg = expect_error(with({"[UNK]", "", "b"}), Errc::kFormatError);
  EXPECT_NE(msg.find("line 2 is empty"), std::string::npos) << msg;
  moekit::text::WordPieceConfig bad;
  bad.max_chars_per_word = 0;
  expect_error([&] { make(bad); }, Errc::kInvalidArgument);
  msg = expect_error([] { WordPieceTokenizer::from_vocab_file("/nonexistent/vocab.txt"); },
                     Errc::kIoError);
  EXPECT_NE(msg.find("/nonexistent/vocab.txt"), std::string::npos) << msg;
}

TEST(WordPiece, ReadsVocabFilesWithEitherLineEnding) {
  const auto path = std::filesystem::temp_directory_path() / "moekit_wordpiece_vocab.txt";
  {
    std::ofstream out(path, std::ios::binary);
    for (const std::string& t : kVocab) out << t << "\r\n";
  }
  const auto tok = WordPieceTokenizer::from_vocab_file(path);
  EXPECT_EQ(tok.vocab_size(), static_cast<index_t>(kVocab.size()));
  EXPECT_EQ(tok.token_id("hello"), static_cast<std::int32_t>(kVocab.size()) - 1);
  EXPECT_EQ(tok.token(5), "the");
  expect_error([&] { (void)tok.token(-1); }, Errc::kOutOfRange);
  std::filesystem::remove(path);
}

}  // namespace
