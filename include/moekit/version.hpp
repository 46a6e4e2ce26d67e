#pragma once
// The single source of moekit's version. CMakeLists.txt reads these three
// numbers for project(VERSION), so the package version and the headers can
// never disagree. Bump them here, nowhere else.

#define MOEKIT_VERSION_MAJOR 0
#define MOEKIT_VERSION_MINOR 1
#define MOEKIT_VERSION_PATCH 0

// Comparable integer: 10000 * major + 100 * minor + patch.
#define MOEKIT_VERSION \
  (MOEKIT_VERSION_MAJOR * 10000 + MOEKIT_VERSION_MINOR * 100 + MOEKIT_VERSION_PATCH)

#define MOEKIT_DETAIL_STR2(x) #x
#define MOEKIT_DETAIL_STR(x) MOEKIT_DETAIL_STR2(x)
#define MOEKIT_VERSION_STRING             \
  MOEKIT_DETAIL_STR(MOEKIT_VERSION_MAJOR) \
  "." MOEKIT_DETAIL_STR(MOEKIT_VERSION_MINOR) "." MOEKIT_DETAIL_STR(MOEKIT_VERSION_PATCH)
