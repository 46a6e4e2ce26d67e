#pragma once
// The single source of moekit's version. CMakeLists.txt reads these three
// numbers for project(VERSION), so the package version and the headers can
// never disagree. Bump them here, nowhere else.

// Major version: 0 while the API may still change between minor versions.
#define MOEKIT_VERSION_MAJOR 0
// Minor version; with the major, it names the ABI namespace (v0_1).
#define MOEKIT_VERSION_MINOR 1
// Patch version: fixes that keep the API and ABI.
#define MOEKIT_VERSION_PATCH 0

// Comparable integer: 10000 * major + 100 * minor + patch.
#define MOEKIT_VERSION \
  (MOEKIT_VERSION_MAJOR * 10000 + MOEKIT_VERSION_MINOR * 100 + MOEKIT_VERSION_PATCH)

// x as a string literal, unexpanded.
#define MOEKIT_DETAIL_STR2(x) #x
// x as a string literal, after macro expansion.
#define MOEKIT_DETAIL_STR(x) MOEKIT_DETAIL_STR2(x)
// "major.minor.patch", a string literal ("0.1.0").
#define MOEKIT_VERSION_STRING             \
  MOEKIT_DETAIL_STR(MOEKIT_VERSION_MAJOR) \
  "." MOEKIT_DETAIL_STR(MOEKIT_VERSION_MINOR) "." MOEKIT_DETAIL_STR(MOEKIT_VERSION_PATCH)
