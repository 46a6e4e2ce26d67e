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
code). It also checks that every docs page is reachable from README.md, and
that every link to a page's section (`<page>.md#<section>` in the docs,
`docs/<page>.md#<section>` or `docs/<page>.md, "<Heading>"` in sources, scripts
and build files) names a page and a heading that exist.

Usage: check_docs.py <repo root>
"""
import pathlib
import re
import sys
import textwrap

MARKER = re.compile(r"^\s*<!--\s*snippet:\s*([^#\s]+)#(\S+)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")
ANCHOR_LINK = re.compile(r"\]\(([^)#\s]*?)(?:([^)#\s/]+\.md))?#([^)\s]+)\)")
SOURCE_REF = re.compile(r'\bdocs/([a-z_]+\.md)(?:#([a-z0-9_-]+)|, "([^"]+)")?')
SOURCE_GLOBS = ("include/**/*.hpp", "include/**/*.cuh", "tests/**/*.cpp", "tests/**/*.hpp",
                "tests/**/*.cu", "tests/**/*.cuh", "tests/**/*.cmake", "tests/**/*.py",
                "tests/**/CMakeLists.txt", "examples/**/*.cpp", "examples/**/*.cu",
                "bench/**/*.cpp", "bench/**/*.hpp", "bench/**/*.cu", "bench/**/*.cuh",
                "bench/*.py", "bench/CMakeLists.txt", "tools/*", "cmake/*", "CMakeLists.txt",
                "packaging/**/*")
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


def anchors(page: pathlib.Path) -> set[str]:
    """GitHub's ids of the page's headings: lower case, punctuation dropped, spaces to '-'."""
    ids, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m and not fenced:
            ids.add(slug(m.group(1)))
    return ids


def slug(heading: str) -> str:
    """GitHub's id of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def section_links(root: pathlib.Path, pages: list[pathlib.Path]) -> list[str]:
    """Links to a section of a docs page, from the pages and from the sources."""
    errors, cache = [], {}

    def check(where: str, target: pathlib.Path, anchor: str | None) -> None:
        if not target.is_file():
            errors.append(f"{where}: links to {target.relative_to(root)}, which does not exist")
        elif anchor is not None:
            if target not in cache:
                cache[target] = anchors(target)
            if anchor not in cache[target]:
                errors.append(f"{where}: {target.relative_to(root)} has no section #{anchor}")

    for page in pages:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            for folder, name, anchor in ANCHOR_LINK.findall(line):
                if folder.startswith(("http:", "https:")):
                    continue
                target = (page.parent / folder / name).resolve() if name else page.resolve()
                check(f"{page.relative_to(root)}:{n}", target, anchor)
    sources = {p for g in SOURCE_GLOBS for p in root.glob(g) if p.is_file()}
    for source in sorted(sources):
        try:
            text = source.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for name, anchor, heading in SOURCE_REF.findall(line):
                if heading:  # docs/<page>.md, "<Heading>" (header comments, read by Doxygen)
                    anchor = slug(heading)
                check(f"{source.relative_to(root)}:{n}", root / "docs" / name, anchor or None)
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
    errors += section_links(root, pages)
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
