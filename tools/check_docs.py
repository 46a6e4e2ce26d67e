#!/usr/bin/env python3
"""Checks that moekit's documentation only shows code that compiles.

Every ```cpp (or ```cuda) block in README.md and docs/*.md must be preceded by
a marker naming the compiled file and region it is cut from:

    <!-- snippet: examples/01_quickstart/main.cpp#specs -->
    ```cpp
    ...
    ```

and must equal the lines between the two `// [specs]` markers of that file,
dedented (examples are built and run as tests, so the docs cannot drift from working
code). It also checks that every docs page is reachable from README.md.

Usage: check_docs.py <repo root>
"""
import pathlib
import re
import sys
import textwrap

MARKER = re.compile(r"^\s*<!--\s*snippet:\s*([^#\s]+)#(\S+)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")
CODE_LANGS = {"cpp", "c++", "cuda", "cu"}


def region(path: pathlib.Path, name: str) -> list[str]:
    lines = path.read_text().splitlines()
    tag = f"// [{name}]"
    marks = [i for i, line in enumerate(lines) if line.strip() == tag]
    if len(marks) != 2:
        raise ValueError(f"{path}: expected two '{tag}' lines, found {len(marks)}")
    # Compared without the indentation the region has in its file.
    return textwrap.dedent("\n".join(lines[marks[0] + 1 : marks[1]])).splitlines()


def check_page(root: pathlib.Path, page: pathlib.Path) -> list[str]:
    errors = []
    lines = page.read_text().splitlines()
    pending = None  # (file, name, line number) of the last marker
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            pending = (m.group(1), m.group(2), i + 1)
            i += 1
            continue
        f = FENCE.match(lines[i])
        if not f:
            # Only blank lines and comments may stand between marker and block.
            if lines[i].strip() and not lines[i].lstrip().startswith("<!--"):
                pending = None
            i += 1
            continue
        lang = f.group(1).lower()
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        block = lines[i + 1 : end]
        where = f"{page.relative_to(root)}:{i + 1}"
        if lang in CODE_LANGS:
            if pending is None:
                errors.append(f"{where}: {lang} block has no '<!-- snippet: file#name -->' marker")
            else:
                src, name, _ = pending
                try:
                    expected = region(root / src, name)
                    if block != expected:
                        errors.append(f"{where}: block differs from {src}#{name}")
                except (OSError, ValueError) as e:
                    errors.append(f"{where}: {e}")
        pending = None
        i = end + 1
    return errors


def reachable(root: pathlib.Path) -> set[pathlib.Path]:
    seen, todo = set(), [root / "README.md"]
    while todo:
        page = todo.pop().resolve()
        if page in seen or not page.exists():
            continue
        seen.add(page)
        for target in LINK.findall(page.read_text()):
            todo.append(page.parent / target)
    return seen


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    pages = [root / "README.md"] + sorted((root / "docs").glob("**/*.md"))
    errors = []
    snippets = 0
    for page in pages:
        errors += check_page(root, page)
        snippets += sum(1 for line in page.read_text().splitlines() if MARKER.match(line))
    linked = reachable(root)
    for page in pages:
        if page.resolve() not in linked:
            errors.append(f"{page.relative_to(root)}: not reachable from README.md")
    for e in errors:
        print(e)
    print(f"check_docs: {len(pages)} pages, {snippets} snippets, {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
