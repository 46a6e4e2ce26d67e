#pragma once
// Scalar types shared by every part of the library.

#include <cstddef>
#include <cstdint>

#include "moekit/core/config.hpp"

MOEKIT_NAMESPACE_BEGIN

// Signed index type for sizes and offsets; the same type as Eigen::Index, so
// views and Eigen maps exchange sizes without casts.
using index_t = std::ptrdiff_t;

MOEKIT_NAMESPACE_END
