#!/usr/bin/env python3
"""Cases for tools/doxygen_filter.py: which `//` comments become Doxygen docs.

Usage: test_doxygen_filter.py <path to doxygen_filter.py>
"""
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("doxygen_filter", sys.argv[1])
doxygen_filter = importlib.util.module_from_spec(spec)
spec.loader.exec_module(doxygen_filter)

HEADER = """\
#pragma once
// What the file holds.

#define MOEKIT_TARGET(name) \\
  __attribute__((target(name)))

namespace moekit {
namespace detail {
inline int helper() { return 1; }
}  // namespace detail

// What S is for.
struct S {
  int rows = 0;  // token rows
                 // (continued)
  int cols = 0;
};  // struct S

// A section rule, followed by a blank line.

inline int f() {
  // inside a body
  return 0;  // also inside
}
class C {};

template <int R>
requires(R >= 1) struct Spec {
  static constexpr int rank = R;  // RANK
};
}  // namespace moekit
"""

EXPECTED = """\
#pragma once
/// \\file
/// What the file holds.

#define MOEKIT_TARGET(name) \\
  __attribute__((target(name)))

namespace moekit {
namespace detail {
inline int helper() { return 1; }
}  // namespace detail

/// What S is for.
struct S {
  int rows = 0;  ///< token rows
                 ///< (continued)
  int cols = 0;
};  // struct S

// A section rule, followed by a blank line.

inline int f() {
  // inside a body
  return 0;  // also inside
}
class C {};

template <int R>
requires(R >= 1) struct Spec {
  static constexpr int rank = R;  ///< RANK
};
}  // namespace moekit
"""


def main() -> int:
    got = "\n".join(doxygen_filter.filter_header(HEADER.split("\n")))
    if got == EXPECTED:
        return 0
    for n, (g, e) in enumerate(zip(got.split("\n"), EXPECTED.split("\n")), 1):
        if g != e:
            print(f"line {n}: got      {g!r}\n         expected {e!r}")
    print("test_doxygen_filter: the filter's output differs from the expected one")
    return 1


if __name__ == "__main__":
    sys.exit(main())
