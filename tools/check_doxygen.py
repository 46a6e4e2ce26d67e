#!/usr/bin/env python3
"""Fails on any Doxygen warning about the public API that is not in the baseline.

Runs Doxygen with the project's configuration (the Doxyfile the `docs` setup
writes, cmake/moekit_docs.cmake) with EXTRACT_ALL off and WARN_IF_UNDOCUMENTED
on (the way to list what is undocumented), HTML off, and
compares its warnings with a committed baseline of the warnings that were
already there when the check came in. A warning is identified by its file
and its text, not its line, so edits elsewhere in a header do not disturb
the baseline; the same warning twice in one file counts twice.

- A warning not in the baseline fails the check. It is printed as
  `include/moekit/...hpp:LINE: warning: ...`, so an editor or CI log jumps
  to it: document the entity (a `//` comment directly above it; the filter
  tools/doxygen_filter.py turns it into Doxygen's), or, for an internal
  one, move it into a `detail` namespace.
- A baseline entry that no longer occurs is reported (it was documented:
  good) and does not fail; `--update` rewrites the baseline to what Doxygen
  reports now. Only shrink it: never add a warning to it by hand.

Usage: check_doxygen.py <doxygen> <Doxyfile> <source root> <baseline> [--update]
"""
import collections
import pathlib
import re
import subprocess
import sys
import tempfile

HEADER = """\
# Doxygen warnings about moekit's public API (undocumented entities) that
# predate the doxygen.undocumented test: tools/check_doxygen.py fails on any
# warning not listed here. Document an entity and remove its lines (or run
# the script with --update); never add lines by hand.
"""
WARNING = re.compile(r"^(?P<file>[^:\s][^:]*):(?P<line>\d+): warning: (?P<text>.*)$")


def run_doxygen(doxygen: str, doxyfile: pathlib.Path, root: pathlib.Path) -> list[tuple[str, int, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        log = pathlib.Path(tmp) / "warnings.log"
        overrides = "\n".join([
            "EXTRACT_ALL = NO",  # with YES, Doxygen reports nothing undocumented
            "WARN_IF_UNDOCUMENTED = YES",
            "WARN_IF_DOC_ERROR = YES",
            "WARN_NO_PARAMDOC = NO",
            "WARN_AS_ERROR = NO",
            "QUIET = YES",
            "GENERATE_HTML = NO",
            "GENERATE_TREEVIEW = NO",
            f"OUTPUT_DIRECTORY = {tmp}",
            f"WARN_LOGFILE = {log}",
            'WARN_FORMAT = "$file:$line: $text"',  # $text starts with "warning: "
        ])
        config = doxyfile.read_text() + "\n" + overrides + "\n"
        result = subprocess.run([doxygen, "-"], input=config, text=True, cwd=root,
                                capture_output=True)
        if result.returncode != 0:
            sys.stderr.write(result.stdout + result.stderr)
            raise SystemExit(f"check_doxygen: doxygen failed with exit code {result.returncode}")
        text = log.read_text() if log.exists() else ""
    warnings = []
    pending = None
    for line in text.splitlines():
        m = WARNING.match(line)
        if m:
            if pending:
                warnings.append(pending)
            path = pathlib.Path(m.group("file"))
            try:
                rel = path.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                rel = path.as_posix()
            pending = (rel, int(m.group("line")), m.group("text").strip())
        elif pending and line.strip():
            # A warning's text may continue on the next lines.
            pending = (pending[0], pending[1], pending[2] + " " + line.strip())
    if pending:
        warnings.append(pending)
    return warnings


def key(rel: str, text: str) -> str:
    return f"{rel}: {text}"


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--update"]
    if len(args) != 4:
        print(__doc__)
        return 2
    doxygen, doxyfile, root, baseline = args[0], pathlib.Path(args[1]), pathlib.Path(args[2]), pathlib.Path(args[3])
    warnings = run_doxygen(doxygen, doxyfile, root)
    if "--update" in sys.argv:
        lines = sorted(key(rel, text) for rel, _, text in warnings)
        baseline.write_text(HEADER + "".join(line + "\n" for line in lines))
        print(f"check_doxygen: wrote {len(lines)} entries to {baseline}")
        return 0
    known = collections.Counter(
        line for line in baseline.read_text().splitlines() if line and not line.startswith("#"))
    seen = collections.Counter()
    new = []
    for rel, line, text in sorted(warnings):
        k = key(rel, text)
        seen[k] += 1
        if seen[k] > known[k]:
            new.append(f"{rel}:{line}: warning: {text}")
    fixed = sum((known - seen).values())
    if fixed:
        print(f"check_doxygen: {fixed} baseline entries no longer occur (documented); "
              f"shrink the baseline: {pathlib.Path(sys.argv[0]).name} ... --update")
    for line in new:
        print(line)
    print(f"check_doxygen: {len(warnings)} warnings, {len(new)} new "
          f"(baseline {sum(known.values())}, {baseline.name})")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
