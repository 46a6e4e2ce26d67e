#!/usr/bin/env python3
"""Generates include/moekit/text/unicode_tables.hpp, the character data of
moekit's BERT WordPiece tokenizer (moekit/text/wordpiece.hpp).

The tokenizer must give the ids of the reference implementation, Hugging Face
`tokenizers` (its BertNormalizer and BertPreTokenizer), id for id. That
reference does not follow one Unicode version: its Rust crates carry general
categories and canonical decompositions of about Unicode 8 and the case
mappings of the Rust standard library (Unicode 16 in recent wheels). So the
tables are built in two steps:

  1. from Python's `unicodedata` (the Unicode version printed in the header):
     the properties the tokenizer asks about (removed by text cleanup: Cc, Cf,
     Co, NUL and U+FFFD except tab, newline and carriage return; White_Space;
     nonspacing marks Mn; punctuation P* and ASCII punctuation; the CJK
     ideograph blocks), the canonical decompositions (NFD, applied
     recursively; Hangul syllables are decomposed by the algorithm, not
     tabled), the canonical combining classes and the lowercase mappings;
  2. reconciled with the reference, character by character over all of
     Unicode: wherever the reference's normalizer or pre-tokenizer behaves
     differently on a character, its behaviour wins. The header states how
     many characters that changed, per property.

Finally the whole normalizer modelled on the tables is checked against the
reference on every character and on probes of canonical reordering; the
script fails if anything differs.

Needs the `tokenizers` package (tools/bootstrap.sh installs the version the
checked-in header was made with). Usage:
    python3 tools/gen_unicode_tables.py [--check]
--check compares the output with the checked-in header instead of writing it.
"""
import argparse
import pathlib
import subprocess
import sys
import unicodedata

import tokenizers
from tokenizers import normalizers, pre_tokenizers

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "include" / "moekit" / "text" / "unicode_tables.hpp"

REMOVE, SPACE, MARK, PUNCT, CJK = 1, 2, 4, 8, 16
HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3
# Two combining marks the reference knows (Unicode 3.1, spacing, so they stay
# after accent stripping): anchors of the canonical-reordering probes.
ANCHOR_LOW, ANCHOR_HIGH = 0x1D165, 0x1D16D  # combining classes 216 and 226


def code_points():
    for cp in range(0x110000):
        if not 0xD800 <= cp <= 0xDFFF:
            yield cp


def ucd_flags(cp):
    c = chr(cp)
    cat = unicodedata.category(c)
    flags = 0
    if cp in (0, 0xFFFD) or (cat in ("Cc", "Cf", "Co") and c not in "\t\n\r"):
        flags |= REMOVE
    if c.isspace() and not 0x1C <= cp <= 0x1F:  # White_Space
        flags |= SPACE
    if cat == "Mn":
        flags |= MARK
    if cat.startswith("P") or (cp < 128 and c.isprintable() and not c.isalnum() and c != " "):
        flags |= PUNCT
    cjk = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
           (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
    if any(lo <= cp <= hi for lo, hi in cjk):
        flags |= CJK
    return flags


def ucd_decomposition(cp):
    """Full canonical decomposition, or None (Hangul syllables: None, algorithmic)."""
    if HANGUL_FIRST <= cp <= HANGUL_LAST:
        return None
    d = unicodedata.normalize("NFD", chr(cp))
    return [ord(x) for x in d] if d != chr(cp) else None


def hangul(cp):
    s = cp - HANGUL_FIRST
    out = [0x1100 + s // 588, 0x1161 + (s % 588) // 28]
    if s % 28:
        out.append(0x11A7 + s % 28)
    return out


class Model:
    """The reference's normalizer, run on the tables."""

    def __init__(self):
        self.flags = {}
        self.decomp = {}
        self.ccc = {}
        self.lower = {}

    def f(self, cp):
        return self.flags.get(cp, 0)

    def decompose(self, cps):
        out = []
        for cp in cps:
            if HANGUL_FIRST <= cp <= HANGUL_LAST:
                out += hangul(cp)
            else:
                out += self.decomp.get(cp, [cp])
        # Canonical ordering: stable sort of each run of non-starters.
        i = 0
        while i < len(out):
            if self.ccc.get(out[i], 0) == 0:
                i += 1
                continue
            j = i
            while j < len(out) and self.ccc.get(out[j], 0) != 0:
                j += 1
            out[i:j] = sorted(out[i:j], key=lambda x: self.ccc[x])
            i = j
        return out

    def strip(self, cps):
        return [cp for cp in self.decompose(cps) if not self.f(cp) & MARK]

    def normalize(self, text):
        cps = []
        for c in text:
            cp = ord(c)
            fl = self.f(cp)
            if fl & REMOVE:
                continue
            if fl & SPACE:
                cp = 0x20
            cps += [0x20, cp, 0x20] if fl & CJK else [cp]
        out = []
        for cp in self.strip(cps):
            out += self.lower.get(cp, [cp])
        return "".join(map(chr, out))


def build():
    norm = normalizers.BertNormalizer
    ref_clean = norm(clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False)
    ref_cjk = norm(clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    ref_strip = norm(clean_text=False, handle_chinese_chars=False, strip_accents=True, lowercase=False)
    ref_lower = norm(clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=True)
    ref_all = norm(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)
    ref_pre = pre_tokenizers.BertPreTokenizer()

    model = Model()
    changed = {"cleanup": 0, "whitespace": 0, "marks": 0, "punctuation": 0, "CJK": 0,
               "decompositions": 0, "combining classes": 0, "lowercase": 0}
    # Per-character properties: unicodedata first, then the reference's answer.
    for cp in code_points():
        c = chr(cp)
        base = ucd_flags(cp)
        flags = 0
        cleaned = ref_clean.normalize_str(c)
        if cleaned == "":
            flags |= REMOVE
        if ref_cjk.normalize_str(c) == f" {c} ":
            flags |= CJK
        words = [w for w, _ in ref_pre.pre_tokenize_str(f"a{c}b")]
        if words == ["a", c, "b"]:
            flags |= PUNCT
        elif words == ["a", "b"]:
            flags |= SPACE
        if not flags & REMOVE and (cleaned == " ") != bool(flags & SPACE):
            sys.exit(f"U+{cp:04X}: cleanup and pre-tokenizer disagree on whitespace")
        lowered = ref_lower.normalize_str(c)
        if lowered != c.lower():
            changed["lowercase"] += 1
        if lowered != c:
            model.lower[cp] = [ord(x) for x in lowered]
        model.flags[cp] = flags  # MARK follows below
        for bit, name in ((REMOVE, "cleanup"), (SPACE, "whitespace"), (PUNCT, "punctuation"),
                          (CJK, "CJK")):
            changed[name] += (base & bit) != (flags & bit)

    # Marks: a character without a decomposition is a mark when stripping
    # accents removes it.
    stripped = {cp: ref_strip.normalize_str(chr(cp)) for cp in code_points()}
    for cp in code_points():
        if ucd_decomposition(cp) is None and not HANGUL_FIRST <= cp <= HANGUL_LAST:
            if stripped[cp] == "":
                model.flags[cp] |= MARK
            changed["marks"] += bool(ucd_flags(cp) & MARK) != bool(model.flags[cp] & MARK)
    # Decompositions: unicodedata's where the reference applies them.
    for cp in code_points():
        d = ucd_decomposition(cp)
        if d is None:
            continue
        expected = "".join(chr(x) for x in d if not model.flags[x] & MARK)
        if stripped[cp] == expected:
            model.decomp[cp] = d
        elif stripped[cp] in (chr(cp), ""):
            changed["decompositions"] += 1  # not decomposed by the reference
            if stripped[cp] == "":
                model.flags[cp] |= MARK
        else:
            sys.exit(f"U+{cp:04X}: the reference decomposes it otherwise")
    # Combining classes: unicodedata's where the reference reorders by them
    # (a class it does not know acts as 0, a starter).
    model.ccc = {ANCHOR_LOW: 216, ANCHOR_HIGH: 226}
    for cp in code_points():
        v = unicodedata.combining(chr(cp))
        if v == 0 or cp in model.decomp or cp in (ANCHOR_LOW, ANCHOR_HIGH):
            continue
        probes = [[ANCHOR_HIGH, cp, ANCHOR_LOW], [cp, ANCHOR_LOW], [ANCHOR_HIGH, cp]]
        got = [ref_strip.normalize_str("x" + "".join(map(chr, p))) for p in probes]

        def agrees(ccc):
            model.ccc[cp] = ccc
            ok = all("".join(map(chr, model.strip([0x78] + p))) == g for p, g in zip(probes, got))
            del model.ccc[cp]
            return ok

        if agrees(v):
            model.ccc[cp] = v
        elif agrees(0):
            changed["combining classes"] += 1
        else:
            sys.exit(f"U+{cp:04X}: the reference reorders it unlike class {v} or 0")

    # The check: the modelled normalizer equals the reference on every character.
    for cp in code_points():
        c = chr(cp)
        if model.normalize(c) != ref_all.normalize_str(c):
            sys.exit(f"U+{cp:04X}: the tables do not reproduce the reference")
    return model, changed


def runs(model):
    starts, values = [], []
    prev = None
    for cp in range(0x110000):
        v = model.flags.get(cp, 0)
        if v != prev:
            starts.append(cp)
            values.append(v)
            prev = v
    return starts, values


def mapping_table(name, mapping):
    entries, pool = [], []
    for cp in sorted(mapping):
        entries.append(f"{{0x{cp:X}, {len(pool)}, {len(mapping[cp])}}}")
        pool += mapping[cp]
    return entries, [f"0x{x:X}" for x in pool]


def wrap(items, per_line):
    lines = []
    for i in range(0, len(items), per_line):
        lines.append("    " + ", ".join(items[i:i + per_line]) + ",")
    return "\n".join(lines)


def render(model, changed):
    starts, values = runs(model)
    decomp, decomp_pool = mapping_table("decomp", model.decomp)
    lower, lower_pool = mapping_table("lower", model.lower)
    ccc_runs = []
    for cp in sorted(model.ccc):
        if ccc_runs and ccc_runs[-1][1] == cp - 1 and ccc_runs[-1][2] == model.ccc[cp]:
            ccc_runs[-1][1] = cp
        else:
            ccc_runs.append([cp, cp, model.ccc[cp]])
    changes = ", ".join(f"{k} {v}" for k, v in changed.items())
    return f"""#pragma once
// GENERATED by tools/gen_unicode_tables.py: do not edit; run the script.
//
// Character data of the BERT WordPiece tokenizer (moekit/text/wordpiece.hpp),
// made to give the ids of the reference tokenizer (Hugging Face tokenizers
// {tokenizers.__version__}) id for id. Base: Unicode {unicodedata.unidata_version} (Python's unicodedata);
// where the reference behaves differently on a character (its general
// categories and decompositions are older, its case mappings newer), its
// behaviour is taken. Characters changed that way, per property: {changes}.
//
//   kFlagRunStart / kFlagRunFlags   the flags below, run-length coded over all code
//                                   points: run i covers [start[i], start[i + 1])
//   kDecompositions / kDecompositionPool  full canonical decompositions (NFD),
//                                   Hangul syllables excluded (algorithmic)
//   kCombiningRuns                  canonical combining classes, 0 elsewhere
//   kLowercase / kLowercasePool     lowercase mappings that change the character

#include <cstdint>

#include "moekit/core/config.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace text::unicode_tables {{

inline constexpr std::uint8_t kRemove = {REMOVE};      // dropped by text cleanup (control, format, ...)
inline constexpr std::uint8_t kSpace = {SPACE};       // whitespace: cleanup makes it ' ' (unless removed)
inline constexpr std::uint8_t kMark = {MARK};        // nonspacing mark, dropped with the accents
inline constexpr std::uint8_t kPunctuation = {PUNCT};  // split off as a word of its own
inline constexpr std::uint8_t kCjk = {CJK};         // CJK ideograph, spaced as a word of its own

// A code point's mapping: `length` code points of a pool from `offset` on.
struct Mapping {{
  std::uint32_t code_point;  // the character mapped
  std::uint16_t offset;  // into the pool
  std::uint16_t length;  // code points it maps to (at least 1)
}};

// Code points [first, last] that share one canonical combining class.
struct CombiningRun {{
  std::uint32_t first;           // first code point of the run
  std::uint32_t last;            // last code point of the run (inclusive)
  std::uint8_t combining_class;  // their class, 1 to 254
}};

// clang-format off

// Where each run of equal flags begins, ascending from 0.
inline constexpr std::uint32_t kFlagRunStart[] = {{
{wrap([f"0x{x:X}" for x in starts], 10)}
}};
// The flags (kRemove | kSpace | ...) of each run of kFlagRunStart.
inline constexpr std::uint8_t kFlagRunFlags[] = {{
{wrap([str(x) for x in values], 24)}
}};
// Canonical decompositions (into kDecompositionPool), by code point.
inline constexpr Mapping kDecompositions[] = {{
{wrap(decomp, 4)}
}};
// The code points kDecompositions map to, back to back.
inline constexpr std::uint32_t kDecompositionPool[] = {{
{wrap(decomp_pool, 10)}
}};
// Code points of a non-zero combining class, ascending runs.
inline constexpr CombiningRun kCombiningRuns[] = {{
{wrap([f"{{0x{a:X}, 0x{b:X}, {v}}}" for a, b, v in ccc_runs], 4)}
}};
// Lowercase mappings (into kLowercasePool), by code point.
inline constexpr Mapping kLowercase[] = {{
{wrap(lower, 4)}
}};
// The code points kLowercase map to, back to back.
inline constexpr std::uint32_t kLowercasePool[] = {{
{wrap(lower_pool, 10)}
}};
// clang-format on

}}  // namespace text::unicode_tables
MOEKIT_NAMESPACE_END
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the checked-in header instead of writing it")
    args = parser.parse_args()
    model, changed = build()
    # The header as the format check wants it (the tables themselves are
    # fenced off from clang-format).
    text = subprocess.run(["clang-format", "--style=file", f"--assume-filename={OUT}"],
                          input=render(model, changed), capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout
    if args.check:
        if OUT.read_text() != text:
            sys.exit(f"{OUT} differs from what the script generates")
        print(f"{OUT.relative_to(ROOT)} is up to date")
        return
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}: {changed}")


if __name__ == "__main__":
    main()
