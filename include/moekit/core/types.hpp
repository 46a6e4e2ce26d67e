#pragma once
// Scalar types shared by every part of the library.

#include <cstddef>
#include <cstdint>

#include "moekit/core/config.hpp"

MOEKIT_NAMESPACE_BEGIN

// Signed index type for sizes and offsets; the same type as Eigen::Index, so
// views and Eigen maps exchange sizes without casts.
using index_t = std::ptrdiff_t;

// A valid (non-negative) index or id as the subscript of a standard container
// (std::array, std::vector, std::span), whose subscripts are unsigned.
MOEKIT_HOST_DEVICE constexpr std::size_t to_size(index_t i) { return static_cast<std::size_t>(i); }

MOEKIT_NAMESPACE_END
