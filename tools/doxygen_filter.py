#!/usr/bin/env python3
"""Doxygen input filter for moekit's headers (used by the optional `docs` target).

moekit documents its API in plain `//` comments. Doxygen reads only `///`,
`//!` and `/** */`, so this filter rewrites, in what Doxygen sees (the files
themselves are untouched):

- the comment block at the top of a header (after `#pragma once`) into the
  file's documentation (`/// \\file`);
- a comment block directly above a declaration, outside function bodies, into
  a `///` block for that declaration (a block followed by a blank line, such
  as a section rule, stays a plain comment);
- a comment after a member, enumerator or parameter on the same line (and
  lines continuing it in the same column) into `///<`; a comment after a
  line that only closes a scope (`}  // namespace detail`) stays plain.

Comments inside function bodies and multi-line macro bodies stay plain
comments. Other files (Markdown) pass through unchanged.

Usage (Doxygen calls it): doxygen_filter.py <file>
"""
import re
import sys

SCOPE = re.compile(r"\b(namespace|class|struct|union|enum)\b")
REQUIRES = re.compile(r"\brequires\s*\(.*\)(?=\s*(struct|class|union)\b)")
CLOSING_BRACE = re.compile(r"\s*\}[\s;]*$")  # a line that only closes a scope
STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')


def split_comment(line: str) -> tuple[str, str | None, int]:
    """Code part, trailing `//` comment text (or None) and its column."""
    masked = STRINGS.sub(lambda m: " " * len(m.group(0)), line)
    at = masked.find("//")
    if at < 0:
        return line, None, -1
    return line[:at], line[at + 2 :], at


def filter_header(lines: list[str]) -> list[str]:
    out = []
    stack = []  # "scope" or "body" per open brace
    statement = ""  # code since the last ; { or }
    in_file_comment = None  # None: not seen yet; True: inside; False: done
    trailing_col = -1  # column of the last converted trailing comment
    in_directive = False  # on a continuation line of a preprocessor directive
    for i, line in enumerate(lines):
        if in_directive:
            # A multi-line macro's body is no declaration: its braces and
            # parentheses must not leak into `statement`.
            in_directive = line.rstrip().endswith("\\")
            out.append(line)
            continue
        stripped = line.lstrip()
        in_body = "body" in stack

        if stripped.startswith("//") and not stripped.startswith(("///", "//!")):
            text = stripped[2:]
            indent = line[: len(line) - len(stripped)]
            if in_file_comment is None and not stack and not statement.strip():
                in_file_comment = True
                out.append("/// \\file")
            if in_file_comment:
                out.append("///" + text)
                continue
            if not in_body and len(indent) == trailing_col:
                out.append(indent + "///<" + text)  # continues a trailing comment
                continue
            trailing_col = -1
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if not in_body and nxt and not nxt.startswith("#include"):
                out.append(indent + "///" + text)
            else:
                out.append(line)
            continue

        if in_file_comment:
            in_file_comment = False
        code, comment, col = split_comment(line)
        trailing_col = -1
        # A comment after a closing brace (`}  // namespace detail`) labels the
        # scope it ends: it stays a plain comment, or Doxygen would give it to
        # the next declaration.
        closes_scope = CLOSING_BRACE.match(code) is not None
        if (comment is not None and code.strip() and not in_body and not closes_scope
                and not comment.startswith("/")):
            line = code + "///<" + comment
            trailing_col = col
        if code.strip().startswith("#"):
            in_directive = line.rstrip().endswith("\\")
            out.append(line)
            continue
        for ch in STRINGS.sub("", code):
            if ch == "{":
                # A class's requires-clause (`requires(K <= E) struct S {`)
                # does not make it a function.
                head = REQUIRES.sub("", statement)
                stack.append("scope" if SCOPE.search(head) and "(" not in head
                             or re.match(r"\s*(namespace|enum)\b", head) else "body")
                statement = ""
            elif ch == "}":
                if stack:
                    stack.pop()
                statement = ""
            elif ch == ";":
                statement = ""
            else:
                statement += ch
        statement += " "
        out.append(line)
    return out


def main() -> int:
    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith((".hpp", ".cuh", ".h")):
        sys.stdout.write(text)
        return 0
    sys.stdout.write("\n".join(filter_header(text.split("\n"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
