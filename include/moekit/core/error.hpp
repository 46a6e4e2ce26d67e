#pragma once
// Errors at moekit's host API boundaries.
//
// Every public entry point validates its arguments before it touches memory
// and reports a violation as moekit::Error, whose message names the public
// function the user called (MOEKIT_API; a shared checker such as check_shape
// called directly names itself), the argument and the offending values:
//
//   moekit::route: expected x.cols() == router.cols(), got x.cols() = 5, router.cols() = 7
//
// Nothing is written before the checks pass, so a rejected call corrupts
// nothing. Device code never throws; CUDA status codes are turned into Error
// at the host boundary (see moekit/cuda/error.cuh).

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "moekit/core/config.hpp"

MOEKIT_NAMESPACE_BEGIN

// What went wrong, for callers that branch on it; the message says the rest.
enum class Errc : int {
  kInvalidArgument = 1,  // a value outside what the API accepts
  kShapeMismatch,        // sizes of two arguments disagree
  kOutOfRange,           // an id or index outside its range
  kNullPointer,          // a null pointer where data is required
  kNonFinite,            // NaN or Inf where the API requires finite values
  kCudaError,            // a CUDA runtime call failed
  kCublasError,          // a cuBLAS call failed
  kIoError,              // a file could not be read or written
  kFormatError,          // a file's contents are malformed
  kUnsupported,          // a valid request this build or device cannot serve
  kTransportError,       // ranks of a group disagreed, failed, left or did not answer in time
};

// A short lower-case description of the code ("shape mismatch"), for messages.
constexpr const char* errc_name(Errc code) noexcept {
  switch (code) {
    case Errc::kInvalidArgument:
      return "invalid argument";
    case Errc::kShapeMismatch:
      return "shape mismatch";
    case Errc::kOutOfRange:
      return "out of range";
    case Errc::kNullPointer:
      return "null pointer";
    case Errc::kNonFinite:
      return "non-finite value";
    case Errc::kCudaError:
      return "CUDA error";
    case Errc::kCublasError:
      return "cuBLAS error";
    case Errc::kIoError:
      return "I/O error";
    case Errc::kFormatError:
      return "format error";
    case Errc::kUnsupported:
      return "unsupported";
    case Errc::kTransportError:
      return "transport error";
  }
  return "unknown error";
}

// The exception every host API throws on bad input or a failed CUDA/cuBLAS,
// I/O or transport call; what() is the full message.
class Error : public std::runtime_error {
 public:
  // An error of kind `code`; message is what what() returns.
  Error(Errc code, const std::string& message) : std::runtime_error(message), code_(code) {}
  // The kind of error, for callers that branch on it.
  Errc code() const noexcept { return code_; }

 private:
  Errc code_;
};

namespace detail {

// Small integer types would print as characters; show them as numbers.
template <class T>
decltype(auto) printable(const T& value) {
  if constexpr (std::is_same_v<T, char> || std::is_same_v<T, signed char> ||
                std::is_same_v<T, unsigned char>) {
    return static_cast<int>(value);
  } else {
    return (value);
  }
}

template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << printable(args));
  return os.str();
}

// Text from a file or a caller (a name, a field, a key) as error messages
// show it: at most 64 bytes, cut at a UTF-8 boundary with the full length
// after it, control characters as '?'. A hostile input never makes a long
// message.
inline std::string shown(std::string_view s) {
  constexpr std::size_t kShown = 64;
  std::size_t cut = s.size();
  if (cut > kShown) {
    cut = kShown;
    while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xc0u) == 0x80u) --cut;
  }
  std::string out(s.substr(0, cut));
  for (char& c : out) {
    if (static_cast<unsigned char>(c) < 0x20u || c == 0x7f) c = '?';
  }
  if (cut < s.size()) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

// The public function the user called, while one runs on this thread
// (ApiScope), or null. Shared checkers (check_shape, a class's
// check_workspace, ...) fail under that name rather than their own.
inline const char*& api_name() noexcept {
  static thread_local const char* name = nullptr;
  return name;
}

// Cold path of every check: formats "moekit::<where>: <message>" and throws
// (or, without exceptions, prints it and aborts). `where` is the public
// function the user called when one is in scope.
[[noreturn]] MOEKIT_NOINLINE inline void fail(Errc code, const char* where,
                                              const std::string& message) {
  const char* api = api_name();
  std::string what = std::string("moekit::") + (api != nullptr ? api : where) + ": " + message;
#if defined(MOEKIT_NO_EXCEPTIONS)
  std::fprintf(stderr, "%s [%s]\n", what.c_str(), errc_name(code));
  std::abort();
#else
  throw Error(code, what);
#endif
}

// Comparisons that are exact across signed and unsigned integers, so that a
// negative run-time size can never pass a check against an unsigned bound.
template <class A, class B>
constexpr bool is_integer_pair = std::is_integral_v<A>&& std::is_integral_v<B> &&
                                 !std::is_same_v<A, bool> && !std::is_same_v<B, bool>;

template <class A, class B>
constexpr bool eq(const A& a, const B& b) {
  if constexpr (is_integer_pair<A, B>)
    return std::cmp_equal(a, b);
  else
    return a == b;
}
template <class A, class B>
constexpr bool lt(const A& a, const B& b) {
  if constexpr (is_integer_pair<A, B>)
    return std::cmp_less(a, b);
  else
    return a < b;
}
template <class A, class B>
constexpr bool ne(const A& a, const B& b) {
  return !eq(a, b);
}
template <class A, class B>
constexpr bool le(const A& a, const B& b) {
  return !lt(b, a);
}
template <class A, class B>
constexpr bool gt(const A& a, const B& b) {
  return lt(b, a);
}
template <class A, class B>
constexpr bool ge(const A& a, const B& b) {
  return !lt(a, b);
}

// Names the public function running on this thread for the errors its
// checks raise (MOEKIT_API below). The outermost scope wins: a public
// function that calls another (MoeLayer::forward calls Router::forward)
// reports under the name the user called. Restored on exit and on unwinding.
class ApiScope {
 public:
  explicit ApiScope(const char* name) noexcept : outer_(api_name()) {
    if (outer_ == nullptr) api_name() = name;
  }
  ~ApiScope() { api_name() = outer_; }
  ApiScope(const ApiScope&) = delete;
  ApiScope& operator=(const ApiScope&) = delete;

 private:
  const char* outer_;
};

}  // namespace detail

MOEKIT_NAMESPACE_END

// First statement of a public entry point: its errors name `name` (without
// the "moekit::" prefix, e.g. "cpu::MoeLayer::forward").
#define MOEKIT_API(name) const ::moekit::detail::ApiScope moekit_api_scope_(name)

// Fails with `code` and a message built by streaming the remaining arguments.
#define MOEKIT_FAIL(code, ...) \
  ::moekit::detail::fail((code), __func__, ::moekit::detail::concat(__VA_ARGS__))

// Fails with `code` and the streamed message unless `cond` holds.
#define MOEKIT_CHECK(cond, code, ...)   \
  do {                                  \
    if (!(cond)) [[unlikely]] {         \
      MOEKIT_FAIL((code), __VA_ARGS__); \
    }                                   \
  } while (false)

// MOEKIT_CHECK with Errc::kInvalidArgument.
#define MOEKIT_CHECK_ARG(cond, ...) \
  MOEKIT_CHECK(cond, ::moekit::Errc::kInvalidArgument, __VA_ARGS__)

// Relational checks whose message shows both expressions and their values.
#define MOEKIT_DETAIL_CHECK_OP(a, b, fn, op_text, code)                                     \
  do {                                                                                      \
    const auto& moekit_lhs_ = (a);                                                          \
    const auto& moekit_rhs_ = (b);                                                          \
    if (!::moekit::detail::fn(moekit_lhs_, moekit_rhs_)) [[unlikely]] {                     \
      MOEKIT_FAIL((code), "expected " #a " " op_text " " #b ", got " #a " = ", moekit_lhs_, \
                  ", " #b " = ", moekit_rhs_);                                              \
    }                                                                                       \
  } while (false)

// Fails with Errc::kInvalidArgument unless a == b, showing both values.
#define MOEKIT_CHECK_EQ(a, b) \
  MOEKIT_DETAIL_CHECK_OP(a, b, eq, "==", ::moekit::Errc::kInvalidArgument)
// Fails with Errc::kInvalidArgument unless a != b, showing both values.
#define MOEKIT_CHECK_NE(a, b) \
  MOEKIT_DETAIL_CHECK_OP(a, b, ne, "!=", ::moekit::Errc::kInvalidArgument)
// Fails with Errc::kInvalidArgument unless a < b, showing both values.
#define MOEKIT_CHECK_LT(a, b) \
  MOEKIT_DETAIL_CHECK_OP(a, b, lt, "<", ::moekit::Errc::kInvalidArgument)
// Fails with Errc::kInvalidArgument unless a <= b, showing both values.
#define MOEKIT_CHECK_LE(a, b) \
  MOEKIT_DETAIL_CHECK_OP(a, b, le, "<=", ::moekit::Errc::kInvalidArgument)
// Fails with Errc::kInvalidArgument unless a > b, showing both values.
#define MOEKIT_CHECK_GT(a, b) \
  MOEKIT_DETAIL_CHECK_OP(a, b, gt, ">", ::moekit::Errc::kInvalidArgument)
// Fails with Errc::kInvalidArgument unless a >= b, showing both values.
#define MOEKIT_CHECK_GE(a, b) \
  MOEKIT_DETAIL_CHECK_OP(a, b, ge, ">=", ::moekit::Errc::kInvalidArgument)

// Two sizes that must agree (rows of x and of y, d_model of x and of W, ...).
#define MOEKIT_CHECK_SHAPE(a, b) \
  MOEKIT_DETAIL_CHECK_OP(a, b, eq, "==", ::moekit::Errc::kShapeMismatch)

// An id or index that must lie in [lo, hi).
#define MOEKIT_CHECK_RANGE(v, lo, hi)                                                            \
  do {                                                                                           \
    const auto& moekit_v_ = (v);                                                                 \
    const auto& moekit_lo_ = (lo);                                                               \
    const auto& moekit_hi_ = (hi);                                                               \
    if (::moekit::detail::lt(moekit_v_, moekit_lo_) ||                                           \
        !::moekit::detail::lt(moekit_v_, moekit_hi_)) [[unlikely]] {                             \
      MOEKIT_FAIL(::moekit::Errc::kOutOfRange, #v " = ", moekit_v_, " is outside [", moekit_lo_, \
                  ", ", moekit_hi_, ")");                                                        \
    }                                                                                            \
  } while (false)

// Fails with Errc::kNullPointer if the pointer p is null.
#define MOEKIT_CHECK_NOT_NULL(p) \
  MOEKIT_CHECK((p) != nullptr, ::moekit::Errc::kNullPointer, #p " is null")
