#pragma once
// The Unicode text handling of moekit's tokenizers (host only, no library to
// link): UTF-8 decoding and encoding, the character properties of BERT's
// normalizer and pre-tokenizer, canonical decomposition (NFD) and lowercase
// mapping, all on the generated tables of moekit/text/unicode_tables.hpp.
//
// Invalid UTF-8. decode_utf8 never fails and never reads past the input: each
// maximal ill-formed subsequence becomes one U+FFFD, the "substitution of
// maximal subparts" of the Unicode standard (chapter 3, U+FFFD substitution),
// which is what Python's bytes.decode("utf-8", "replace") and Rust's
// String::from_utf8_lossy do. Overlong forms, surrogates (ED A0..BF ..) and
// code points above U+10FFFF are ill-formed. The BERT normalizer then drops
// U+FFFD like a control character (moekit/text/wordpiece.hpp), so invalid
// bytes vanish from the tokens, as they do when the text is decoded with
// replacement before the reference tokenizer sees it.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <string_view>

#include "moekit/core/config.hpp"
#include "moekit/text/unicode_tables.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace text {

// U+FFFD, what decode_utf8 puts in place of each invalid byte sequence.
inline constexpr char32_t kReplacementCharacter = 0xFFFD;

// Appends the code points of the UTF-8 text `in` to `out` (invalid sequences
// as U+FFFD, see the top of this file).
inline void decode_utf8(std::string_view in, std::u32string& out) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(in[i]); };
  std::size_t i = 0;
  const std::size_t n = in.size();
  while (i < n) {
    const unsigned b0 = byte(i);
    if (b0 < 0x80) {
      out.push_back(static_cast<char32_t>(b0));
      ++i;
      continue;
    }
    // Length and the range of the second byte (Unicode Table 3-7).
    std::size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      len = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      len = 3;
      if (b0 == 0xE0) lo = 0xA0;
      if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      len = 4;
      if (b0 == 0xF0) lo = 0x90;
      if (b0 == 0xF4) hi = 0x8F;
    }
    if (len == 0) {  // 80..C1, F5..FF never start a sequence
      out.push_back(kReplacementCharacter);
      ++i;
      continue;
    }
    char32_t cp = b0 & (0xFFu >> (len + 1));
    std::size_t k = 1;
    for (; k < len && i + k < n; ++k) {
      const unsigned b = byte(i + k);
      const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
      if (!ok) break;
      cp = (cp << 6) | (b & 0x3Fu);
    }
    out.push_back(k == len ? cp : kReplacementCharacter);
    i += k;  // a maximal subpart is the bytes before the first bad one
  }
}

// Appends the UTF-8 encoding of the code point c (<= U+10FFFF, not a surrogate).
inline void append_utf8(char32_t c, std::string& out) {
  const auto put = [&](std::uint32_t v) { out.push_back(static_cast<char>(v)); };
  const auto u = static_cast<std::uint32_t>(c);
  if (u < 0x80) {
    put(u);
  } else if (u < 0x800) {
    put(0xC0 | (u >> 6));
    put(0x80 | (u & 0x3F));
  } else if (u < 0x10000) {
    put(0xE0 | (u >> 12));
    put(0x80 | ((u >> 6) & 0x3F));
    put(0x80 | (u & 0x3F));
  } else {
    put(0xF0 | (u >> 18));
    put(0x80 | ((u >> 12) & 0x3F));
    put(0x80 | ((u >> 6) & 0x3F));
    put(0x80 | (u & 0x3F));
  }
}

namespace unicode {

namespace detail {
template <class Entry, std::size_t N>
const Entry* find_mapping(const Entry (&table)[N], char32_t c) {
  const auto* it = std::lower_bound(std::begin(table), std::end(table), c,
                                    [](const Entry& e, char32_t v) { return e.code_point < v; });
  return it != std::end(table) && it->code_point == c ? it : nullptr;
}

inline constexpr char32_t kHangulFirst = 0xAC00, kHangulLast = 0xD7A3;
}  // namespace detail

// The unicode_tables::k* flags of the code point c (0 beyond U+10FFFF).
inline std::uint8_t flags(char32_t c) {
  namespace t = unicode_tables;
  const auto* it = std::upper_bound(std::begin(t::kFlagRunStart), std::end(t::kFlagRunStart),
                                    static_cast<std::uint32_t>(c));
  const auto run = static_cast<std::size_t>(it - std::begin(t::kFlagRunStart)) - 1;
  return c > 0x10FFFF ? std::uint8_t{0} : t::kFlagRunFlags[run];
}

// The canonical combining class (0 for starters).
inline std::uint8_t combining_class(char32_t c) {
  namespace t = unicode_tables;
  const auto* it =
      std::upper_bound(std::begin(t::kCombiningRuns), std::end(t::kCombiningRuns), c,
                       [](char32_t v, const t::CombiningRun& r) { return v < r.first; });
  if (it == std::begin(t::kCombiningRuns)) return 0;
  --it;
  return c <= it->last ? it->combining_class : std::uint8_t{0};
}

// Appends the full canonical decomposition of c (c itself if it has none).
inline void append_decomposition(char32_t c, std::u32string& out) {
  namespace t = unicode_tables;
  if (c >= detail::kHangulFirst && c <= detail::kHangulLast) {
    // Hangul syllable -> leading consonant, vowel and (if any) trailing consonant.
    const char32_t s = c - detail::kHangulFirst;
    out.push_back(0x1100 + s / 588);
    out.push_back(0x1161 + (s % 588) / 28);
    if (s % 28 != 0) out.push_back(0x11A7 + s % 28);
    return;
  }
  if (const auto* m = detail::find_mapping(t::kDecompositions, c)) {
    out.append(t::kDecompositionPool + m->offset, t::kDecompositionPool + m->offset + m->length);
  } else {
    out.push_back(c);
  }
}

// Puts s[from, end) in canonical order: each run of non-starters stably
// sorted by combining class (the last step of NFD).
inline void canonical_order(std::u32string& s, std::size_t from) {
  std::size_t i = from;
  while (i < s.size()) {
    if (combining_class(s[i]) == 0) {
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j < s.size() && combining_class(s[j]) != 0) ++j;
    if (j - i > 1) {
      std::stable_sort(
          s.begin() + static_cast<std::ptrdiff_t>(i), s.begin() + static_cast<std::ptrdiff_t>(j),
          [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    }
    i = j;
  }
}

// Appends the lowercase of c (one to three code points).
inline void append_lowercase(char32_t c, std::u32string& out) {
  namespace t = unicode_tables;
  if (c < 0x80) {
    out.push_back(c >= 'A' && c <= 'Z' ? c + 32 : c);
  } else if (const auto* m = detail::find_mapping(t::kLowercase, c)) {
    out.append(t::kLowercasePool + m->offset, t::kLowercasePool + m->offset + m->length);
  } else {
    out.push_back(c);
  }
}

}  // namespace unicode
}  // namespace text
MOEKIT_NAMESPACE_END
