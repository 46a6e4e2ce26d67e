#pragma once
// nlohmann_json, which moekit/io/ and moekit/train/ read and write JSON with
// (safetensors headers, metrics logs). Nothing else in moekit needs it, so
// moekit::moekit does not link it; moekit::io does. Internal: included by
// those headers only.
#if defined(__has_include)
#if !__has_include(<nlohmann/json.hpp>)
#error "moekit/io/ and moekit/train/ need nlohmann_json 3.10 or newer: link moekit::io (find_package(moekit CONFIG REQUIRED COMPONENTS io), or moekit as a subproject with nlohmann_json installed; Debian: apt-get install nlohmann-json3-dev)"
#endif
#endif

#include <nlohmann/json.hpp>
