#pragma once
// safetensors weight files: read and write named tensors (host only).
//
// The format (https://github.com/huggingface/safetensors):
//   8 bytes     N, the header length, unsigned 64-bit little-endian
//   N bytes     a UTF-8 JSON object (may be padded with trailing spaces):
//                 "<name>": {"dtype": "F32", "shape": [d0, d1, ...],
//                                                "data_offsets": [begin, end]}
//                 "__metadata__": {"<key>": "<string value>", ...}   (optional)
//   the rest    the data buffer; a tensor's bytes are [begin, end) of it,
//               row-major, little-endian
// The tensors must tile the buffer exactly: sorted by offset, each begins
// where the previous one ends, the first at 0, the last ends at the end of the
// file, and end - begin = (product of shape) * (size of dtype).
//
// Reading. SafetensorsReader opens a regular file (anything else, a FIFO
// included, is refused without blocking on it) and reads it with pread(), never
// mapping it: a file that another process truncates after the open then
// gives an error (kIoError) instead of killing the process with SIGBUS. It
// validates all of the header up front: header length within the file and
// within options.max_header_bytes (16 MiB by default, at most the format's
// 100 MiB), well-formed JSON (nlohmann-json, moekit's one parser dependency),
// the format's structure (nesting, at most kMaxRank dimensions, two offsets),
// no name or key twice, each entry's fields and types, offsets inside the
// buffer, sizes matching dtype and shape, and the tiling. The header is
// parsed as a stream of JSON events straight into moekit's maps, so a hostile
// header costs time linear in its length and memory proportional to the
// entries it holds, and stops at its first fault; messages never quote the
// header (names are cut to 64 bytes). A file that fails any check is
// rejected at open with a message naming the file, the tensor and the
// values. Then name -> (dtype, shape) lookups are free, and read() /
// load_tensors() copy tensors into caller views as float:
//   F32 as is; F16 and BF16 converted exactly (every half value is a float).
// Any other dtype (I64, F64, F8_*, ...) is reported, naming the tensor and the
// dtype, when it is read; a dtype the format does not list passes the open
// (its size is unknown, so its size check is skipped) and fails the same way.
//
// Checksums. Every file SafetensorsWriter writes records a CRC-32C of its
// contents in the metadata entry "moekit.checksum" ("crc32c:" and 8 hex
// digits; detail::header_checksum says what it covers: every tensor's name,
// dtype, shape and offsets, the other metadata, and all data bytes). The
// reader verifies it at open and rejects a file whose contents do not match
// (kFormatError, "... is corrupted ..."); options.verify_checksum = false
// skips the check. Files without the entry (written by other tools) load as
// before.
//
// Writing. SafetensorsWriter collects named float views (non-owning: the data
// must stay alive until write()) and writes them as F32, or F16 / BF16 rounded
// to nearest, ties to even (finite floats beyond the half range become +-inf;
// NaN stays NaN). Tensors are laid out by element size, largest first (so
// every F32 tensor starts 4-byte aligned, as the reference writer does), then
// in the order they were added; the header is padded with spaces to a multiple
// of 8 bytes. write(path) is atomic (moekit/io/atomic_write.hpp): a failed or
// interrupted write never leaves a half-written file at path.
//
// Errors (moekit::Error):
//   kIoError        the file cannot be opened or read (not a regular file, or
//                   shorter than when it was opened), or written
//   kFormatError    truncated file, header length beyond the file or the
//                   limit, malformed JSON or structure, a name or key twice, a
//                   bad entry, data_offsets beyond the buffer, overlapping
//                   tensors or holes, a size that does not match dtype x
//                   shape, a tensor that is not in the file, a checksum that
//                   does not match
//   kUnsupported    a tensor's dtype is not F32, F16 or BF16
//   kShapeMismatch  a tensor's shape is not the one expected, or a view does
//                   not have the shape's element count
//   kInvalidArgument  writer: a name given twice, "__metadata__" as a tensor
//                   name, "moekit.checksum" as a metadata key, a name that is
//                   not UTF-8, a negative dimension
// load_tensors() checks every target against the file before it copies any,
// so a rejected load leaves every destination untouched.
//
//   moekit::io::SafetensorsWriter out;
//   out.add("proj.weight", w_view);                        // shape [rows, cols]
//   out.add("proj.bias", b_view, moekit::io::Dtype::kBF16);  // shape [n]
//   out.write("model.safetensors");
//   const moekit::io::SafetensorsReader in("model.safetensors");
//   in.read("proj.weight", w_dst);                         // checks shape and dtype

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moekit/detail/json.hpp"  // nlohmann_json (moekit::io)

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"
#include "moekit/io/atomic_write.hpp"
#include "moekit/io/checksum.hpp"

#if MOEKIT_DETAIL_POSIX_FILES  // set by atomic_write.hpp
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#endif

MOEKIT_NAMESPACE_BEGIN
namespace io {

// The dtypes moekit reads into float and writes from float.
enum class Dtype { kF32, kF16, kBF16 };

// The name the format uses for `dtype` ("F32", "F16", "BF16"; "?" for an
// invalid value).
constexpr const char* dtype_name(Dtype dtype) noexcept {
  switch (dtype) {
    case Dtype::kF32:
      return "F32";
    case Dtype::kF16:
      return "F16";
    case Dtype::kBF16:
      return "BF16";
  }
  return "?";
}

// Bytes per element of a dtype the format lists, 0 for any other string.
inline std::uint64_t dtype_size(std::string_view dtype) noexcept {
  struct Entry {
    std::string_view name;
    std::uint64_t size;
  };
  static constexpr Entry kTable[] = {{"BOOL", 1},    {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1},
                                     {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
                                     {"BF16", 2},    {"I32", 4}, {"U32", 4}, {"F32", 4},
                                     {"I64", 8},     {"U64", 8}, {"F64", 8}};
  for (const Entry& e : kTable) {
    if (e.name == dtype) return e.size;
  }
  return 0;
}

// ---- half-precision conversions -----------------------------------------------------------
// IEEE binary16 and bfloat16 <-> float. To float: exact (subnormals, +-0,
// +-inf, NaN payloads kept). From float: round to nearest, ties to even;
// overflow gives +-inf; NaN gives a quiet NaN of the same sign.

constexpr float f16_bits_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return std::bit_cast<float>(sign);  // +-0
  // Subnormal: mant * 2^-24; normalise it for the float encoding.
  std::uint32_t e = 113;  // float exponent of 2^-14
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return std::bit_cast<float>(sign | (e << 23) | ((mant & 0x3ffu) << 13));
}

// f as an IEEE binary16 bit pattern.
constexpr std::uint16_t float_to_f16_bits(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) {  // NaN: quiet, keep the top payload bits
    return static_cast<std::uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  }
  if (ax >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (ax >= 0x38800000u) {                                                   // normal half
    ax += 0xfffu + ((ax >> 13) & 1u);                                        // ties to even
    return static_cast<std::uint16_t>(sign | ((ax - (112u << 23)) >> 13));
  }
  if (ax <= 0x33000000u) return sign;  // <= 2^-25 (the tie rounds to the even 0)
  // Subnormal half: round(|f| / 2^-24), ties to even (may carry into the
  // smallest normal, whose bits follow on).
  const std::uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - (ax >> 23);  // 14 ... 24
  std::uint32_t q = m >> shift;
  const std::uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u) != 0)) ++q;
  return static_cast<std::uint16_t>(sign | q);
}

// The float a bfloat16 bit pattern stands for (exact: its top 16 bits).
constexpr float bf16_bits_to_float(std::uint16_t b) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

// f as a bfloat16 bit pattern.
constexpr std::uint16_t float_to_bf16_bits(float f) noexcept {
  std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x0040u);
  x += 0x7fffu + ((x >> 16) & 1u);  // ties to even; overflow carries into inf
  return static_cast<std::uint16_t>(x >> 16);
}

// ---- shapes and named views ------------------------------------------------------------------

// A tensor's dimensions, outermost first (int64, as in the file's header).
using Shape = std::vector<std::int64_t>;

// "[d0, d1, ...]" ("[]" for a scalar), for messages.
inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// A named tensor of `shape` whose elements, in row-major order, are those of
// `view` row by row (view.rows() * view.cols() = product of shape; view may be
// strided). TensorTarget: where load_tensors copies a tensor to;
// TensorSource: what SafetensorsWriter writes.
template <class T>
struct NamedTensor {
  std::string name;    // the tensor's name in the file
  Shape shape;         // its shape in the file
  MatrixView<T> view;  // its elements in memory (not owned)
};
// A destination of SafetensorsReader::load: a writable view.
using TensorTarget = NamedTensor<float>;
// A tensor for SafetensorsWriter: a read-only view.
using TensorSource = NamedTensor<const float>;

// A vector as the 1 x n matrix NamedTensor takes.
template <class T>
MatrixView<T> as_row(VectorView<T> v) {
  return MatrixView<T>(v.data(), 1, v.size());
}

// The tensor in a file, as the header describes it.
struct TensorInfo {
  std::string name;         // the key in the header
  std::string dtype;        // as written in the file ("F32", "I64", ...)
  Shape shape;              // as written in the file
  std::uint64_t begin = 0;  // data_offsets, relative to the data buffer
  std::uint64_t end = 0;    // one past the last byte (end - begin = byte size)
};

namespace detail {

// Product of the dimensions, or false on a negative dimension or overflow of
// the byte count `elem_size` * product.
inline bool element_count(std::span<const std::int64_t> shape, std::uint64_t elem_size,
                          std::uint64_t& count) {
  std::uint64_t n = 1;
  for (const std::int64_t dim : shape) {
    if (dim < 0) return false;
    const auto u = static_cast<std::uint64_t>(dim);
    if (u != 0 && n > std::numeric_limits<std::uint64_t>::max() / u) return false;
    n *= u;
  }
  if (elem_size != 0 && n > std::numeric_limits<std::uint64_t>::max() / elem_size) return false;
  count = n;
  return true;
}

inline bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t len = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      len = 2;
      cp = c & 0x1fu;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3;
      cp = c & 0x0fu;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4;
      cp = c & 0x07u;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3fu);
    }
    const std::uint32_t min_cp[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += len;
  }
  return true;
}

// Where a reader's bytes come from: a regular file, read with pread() at the
// offsets asked for, or bytes in memory. The file is never mapped: another
// process that truncates a mapped file kills the reader with SIGBUS at its
// next access (nothing can check for that in advance), while a short read is
// an error we can report. Every byte is read once when it is needed, and the
// checksum reads them all at open anyway, so a mapping would save nothing.
class ByteSource {
 public:
  explicit ByteSource(std::vector<std::byte> bytes)
      : bytes_(std::move(bytes)), size_(bytes_.size()), memory_(true) {}
  ByteSource(const ByteSource&) = delete;
  ByteSource& operator=(const ByteSource&) = delete;
  ~ByteSource() {
#if MOEKIT_DETAIL_POSIX_FILES
    if (fd_ >= 0) ::close(fd_);
#endif
  }

  // Opens a regular file (a FIFO, socket, device or directory is refused
  // without blocking on it); its size is taken once, here.
  static std::unique_ptr<ByteSource> open_file(const std::filesystem::path& path) {
    auto src = std::unique_ptr<ByteSource>(new ByteSource());
    src->name_ = path.string();
#if MOEKIT_DETAIL_POSIX_FILES
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    src->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    MOEKIT_CHECK(src->fd_ >= 0, Errc::kIoError, "cannot open '", src->name_,
                 "': ", std::strerror(errno));
    struct stat st {};
    MOEKIT_CHECK(::fstat(src->fd_, &st) == 0, Errc::kIoError, "cannot read '", src->name_,
                 "': ", std::strerror(errno));
    MOEKIT_CHECK(S_ISREG(st.st_mode), Errc::kIoError, "cannot read '", src->name_,
                 "': not a regular file (",
                 S_ISDIR(st.st_mode)    ? "a directory"
                 : S_ISFIFO(st.st_mode) ? "a FIFO"
                 : S_ISSOCK(st.st_mode) ? "a socket"
                                        : "a device",
                 ")");
    src->size_ = static_cast<std::uint64_t>(st.st_size);
#else
    std::error_code ec;
    MOEKIT_CHECK(std::filesystem::is_regular_file(path, ec), Errc::kIoError, "cannot read '",
                 src->name_, "': not a regular file");
    src->in_.open(path, std::ios::binary);
    MOEKIT_CHECK(src->in_.is_open(), Errc::kIoError, "cannot open '", src->name_, "'");
    src->size_ = std::filesystem::file_size(path, ec);
    MOEKIT_CHECK(!ec, Errc::kIoError, "cannot read '", src->name_, "': ", ec.message());
#endif
    return src;
  }

  // The size at open.
  std::uint64_t size() const { return size_; }

  // f(const std::byte* data, std::size_t n) over bytes [offset, offset + size)
  // in order, in pieces of at most kPiece bytes (a multiple of every dtype's
  // size); [offset, offset + size) lies within size(). A file that has
  // shrunk since it was opened is an error (kIoError), never a crash.
  template <class F>
  void for_each_piece(std::uint64_t offset, std::uint64_t size, F&& f) const {
    if (memory_) {
      if (size > 0) f(bytes_.data() + offset, static_cast<std::size_t>(size));
      return;
    }
    std::vector<std::byte> piece(static_cast<std::size_t>(std::min<std::uint64_t>(size, kPiece)));
    while (size > 0) {
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(size, kPiece));
      read_exactly(offset, piece.data(), n);
      f(static_cast<const std::byte*>(piece.data()), n);
      offset += n;
      size -= n;
    }
  }

  // Bytes [offset, offset + n) into dst.
  void read(std::uint64_t offset, std::byte* dst, std::size_t n) const {
    if (memory_) {
      if (n > 0) std::memcpy(dst, bytes_.data() + offset, n);
      return;
    }
    read_exactly(offset, dst, n);
  }

  static constexpr std::size_t kPiece = std::size_t{1} << 20;

 private:
  ByteSource() = default;

  void read_exactly(std::uint64_t offset, std::byte* dst, std::size_t n) const {
    std::size_t done = 0;
#if MOEKIT_DETAIL_POSIX_FILES
    while (done < n) {
      const ::ssize_t got = ::pread(fd_, dst + done, n - done, static_cast<::off_t>(offset + done));
      if (got < 0 && errno == EINTR) continue;
      MOEKIT_CHECK(got >= 0, Errc::kIoError, "cannot read '", name_, "': ", std::strerror(errno));
      if (got == 0) break;
      done += static_cast<std::size_t>(got);
    }
#else
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(n));
    done = static_cast<std::size_t>(in_.gcount());
#endif
    MOEKIT_CHECK(done == n, Errc::kIoError, "'", name_, "' ends before byte ", offset + n,
                 " although it had ", size_,
                 " bytes when it was opened: the file was truncated or replaced in place");
  }

  std::string name_;
  std::vector<std::byte> bytes_;
  std::uint64_t size_ = 0;
  bool memory_ = false;
#if MOEKIT_DETAIL_POSIX_FILES
  int fd_ = -1;
#else
  mutable std::ifstream in_;
#endif
};

inline std::uint64_t load_u64_le(const std::byte* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<std::uint64_t>(p[i]);
  return v;
}

inline std::uint16_t load_u16_le(const std::byte* p) {
  return static_cast<std::uint16_t>(static_cast<unsigned>(p[0]) |
                                    (static_cast<unsigned>(p[1]) << 8));
}

inline float load_f32_le(const std::byte* p) {
  std::uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<std::uint32_t>(p[i]);
  return std::bit_cast<float>(v);
}

// Copies `count` elements of dtype `dtype` at `src` into floats.
inline void decode(Dtype dtype, const std::byte* src, float* dst, index_t count) {
  if (count == 0) return;  // dst may be null (an empty vector's data())
  switch (dtype) {
    case Dtype::kF32:
      if constexpr (std::endian::native == std::endian::little) {
        std::memcpy(dst, src, static_cast<std::size_t>(count) * sizeof(float));
      } else {
        for (index_t i = 0; i < count; ++i) dst[i] = load_f32_le(src + 4 * i);
      }
      return;
    case Dtype::kF16:
      for (index_t i = 0; i < count; ++i) dst[i] = f16_bits_to_float(load_u16_le(src + 2 * i));
      return;
    case Dtype::kBF16:
      for (index_t i = 0; i < count; ++i) dst[i] = bf16_bits_to_float(load_u16_le(src + 2 * i));
      return;
  }
}

// Appends `count` floats as `dtype`, little-endian.
inline void encode(Dtype dtype, const float* src, index_t count, std::vector<char>& out) {
  for (index_t i = 0; i < count; ++i) {
    if (dtype == Dtype::kF32) {
      const auto v = std::bit_cast<std::uint32_t>(src[i]);
      for (int k = 0; k < 4; ++k) out.push_back(static_cast<char>((v >> (8 * k)) & 0xffu));
    } else {
      const std::uint16_t v =
          dtype == Dtype::kF16 ? float_to_f16_bits(src[i]) : float_to_bf16_bits(src[i]);
      out.push_back(static_cast<char>(v & 0xffu));
      out.push_back(static_cast<char>(v >> 8));
    }
  }
}

inline std::uint64_t dtype_bytes(Dtype d) { return d == Dtype::kF32 ? 4 : 2; }

inline bool parse_float_dtype(std::string_view s, Dtype& d) {
  for (const Dtype c : {Dtype::kF32, Dtype::kF16, Dtype::kBF16}) {
    if (s == dtype_name(c)) {
      d = c;
      return true;
    }
  }
  return false;
}

// The view's elements, row-major, must be count; check_view too.
template <class T>
void check_named_view(const NamedTensor<T>& t, const char* role) {
  check_view(t.view, role);
  std::uint64_t count = 0;
  MOEKIT_CHECK(element_count(t.shape, 1, count), Errc::kInvalidArgument, role, " '", t.name,
               "' has an invalid shape ", shape_string(t.shape));
  MOEKIT_CHECK(count == static_cast<std::uint64_t>(t.view.rows() * t.view.cols()),
               Errc::kShapeMismatch, role, " '", t.name, "' has shape ", shape_string(t.shape),
               " (", count, " elements) but its view is ", t.view.rows(), " x ", t.view.cols());
}

}  // namespace detail

// ---- reader ---------------------------------------------------------------------------------

// The format's own limit on the header length (the reference implementation's).
inline constexpr std::uint64_t kMaxHeaderBytes = 100u * 1024u * 1024u;
// Dimensions a tensor may have (NumPy's limit).
inline constexpr std::size_t kMaxRank = 64;
// The metadata entry holding the checksum of the files moekit writes.
inline constexpr std::string_view kChecksumKey = "moekit.checksum";

// What SafetensorsReader checks at open.
struct SafetensorsReadOptions {
  // Verify the checksum of a file that carries one (every file moekit
  // writes; files without the entry load as before). false reads a file
  // whose checksum does not match (kFormatError otherwise).
  bool verify_checksum = true;
  // Longest header read, at most kMaxHeaderBytes. The header is parsed
  // into moekit's own structures, using memory a small multiple of its
  // length; the default is far above any real file's (a few KiB per
  // hundred tensors).
  std::uint64_t max_header_bytes = std::uint64_t{16} << 20;
};

namespace detail {

using ::moekit::detail::shown;  // names and values in messages: at most 64 bytes

using TensorMap = std::map<std::string, TensorInfo, std::less<>>;
using MetadataMap = std::map<std::string, std::string>;

// Parses a header as JSON events (nlohmann-json's SAX interface), straight
// into the tensor and metadata maps, and stops at the first event the format
// does not allow. So a hostile header costs time linear in its length and
// memory bounded by the entries it holds: nesting beyond the format's three
// levels, a shape of more than kMaxRank entries, a third data offset, a name
// given twice (found in O(log n) by the maps) all end the parse at once, and
// no JSON document is ever built, printed or kept. Each entry is checked
// against the data buffer as soon as it closes.
class HeaderParser final : public nlohmann::json_sax<nlohmann::json> {
 public:
  HeaderParser(const std::string& source, std::uint64_t buffer_size, TensorMap& tensors,
               MetadataMap& metadata)
      : source_(source), buffer_size_(buffer_size), tensors_(tensors), metadata_(metadata) {}

  // Why the parse stopped (empty when it did not).
  const std::string& error() const { return error_; }

  bool null() override { return scalar("null"); }
  bool boolean(bool) override { return scalar("boolean"); }
  bool number_integer(number_integer_t) override { return scalar("negative number"); }
  bool number_unsigned(number_unsigned_t v) override { return scalar("number", &v); }
  bool number_float(number_float_t, const string_t&) override { return scalar("number"); }
  bool binary(binary_t&) override { return scalar("binary value"); }
  bool string(string_t& v) override { return scalar("string", nullptr, &v); }

  bool start_object(std::size_t) override {
    switch (at_) {
      case At::kStart:
        at_ = At::kTop;
        return true;
      case At::kTop:
        if (key_ == "__metadata__") {
          at_ = At::kMetadata;
          return true;
        }
        entry_ = TensorInfo{};
        entry_.name = key_;
        seen_ = {};
        offsets_ = 0;
        at_ = At::kEntry;
        return true;
      default:
        return misplaced("object");
    }
  }
  bool end_object() override {
    switch (at_) {
      case At::kTop:
        at_ = At::kEnd;
        return true;
      case At::kMetadata:
        at_ = At::kTop;
        return true;
      case At::kEntry:
        at_ = At::kTop;
        return close_entry();
      default:
        return misplaced("object");
    }
  }
  bool start_array(std::size_t) override {
    if (at_ == At::kEntry && (field_ == Field::kShape || field_ == Field::kOffsets)) {
      at_ = field_ == Field::kShape ? At::kShape : At::kOffsets;
      return true;
    }
    return misplaced("array");
  }
  bool end_array() override {
    if (at_ == At::kOffsets && offsets_ != 2) return bad_offsets();
    at_ = At::kEntry;  // the only arrays opened are kShape and kOffsets
    return true;
  }
  bool key(string_t& k) override {
    if (at_ == At::kTop) {
      if (k == "__metadata__" ? std::exchange(saw_metadata_, true) : tensors_.count(k) != 0) {
        return fail(
            concat_(k == "__metadata__" ? "__metadata__" : concat_("tensor '", shown(k), "'"),
                    " appears more than once in the header of '", source_, "'"));
      }
      key_ = k;
      return true;
    }
    if (at_ == At::kMetadata) {
      if (metadata_.count(k) != 0) {
        return fail(
            concat_("__metadata__ key '", shown(k), "' appears more than once in '", source_, "'"));
      }
      key_ = k;
      return true;
    }
    // At::kEntry (the parser gives keys inside objects only).
    field_ = Field::kOther;
    for (int f = 0; f < 3; ++f) {
      if (k != kFields[f]) continue;
      if (seen_[static_cast<std::size_t>(f)]) {
        return fail(concat_("key '", k, "' appears more than once in the entry of tensor '",
                            shown(entry_.name), "' in '", source_, "'"));
      }
      seen_[static_cast<std::size_t>(f)] = true;
      field_ = static_cast<Field>(f);
    }
    key_ = k;
    return true;
  }
  bool parse_error(std::size_t position, const std::string&,
                   const nlohmann::detail::exception&) override {
    // Never the library's message: it quotes the last token, which may be
    // the whole header.
    return fail(concat_("header of '", source_, "' is not valid JSON (at byte ", position,
                        " of the header)"));
  }

 private:
  enum class At { kStart, kTop, kEntry, kMetadata, kShape, kOffsets, kEnd };
  enum class Field { kDtype = 0, kShape = 1, kOffsets = 2, kOther = 3 };
  static constexpr const char* kFields[] = {"dtype", "shape", "data_offsets"};

  template <class... Args>
  static std::string concat_(const Args&... args) {
    return ::moekit::detail::concat(args...);
  }
  bool fail(std::string message) {
    if (error_.empty()) error_ = std::move(message);
    return false;
  }
  std::string where() const {
    return concat_("tensor '", shown(entry_.name), "' in '", source_, "'");
  }
  bool bad_offsets() {
    return fail(concat_(where(), ": data_offsets is not two non-negative integers"));
  }

  // A JSON value of `type` where a container was expected, or a container
  // where the format has none.
  bool misplaced(const char* type) {
    switch (at_) {
      case At::kStart:
        return fail(concat_("header of '", source_, "' is a JSON ", type, ", expected an object"));
      case At::kTop:
        if (key_ == "__metadata__") {
          return fail(concat_("__metadata__ of '", source_, "' is a JSON ", type,
                              ", expected an object of strings"));
        }
        return fail(concat_("entry of tensor '", shown(key_), "' in '", source_, "' is a JSON ",
                            type, ", expected an object"));
      case At::kMetadata:
        return fail(concat_("__metadata__ key '", shown(key_), "' of '", source_, "' is a JSON ",
                            type, ", expected a string"));
      case At::kEntry:
        if (field_ == Field::kOther) {
          return fail(concat_(where(), ": key '", shown(key_), "' holds a JSON ", type,
                              "; an entry holds only dtype, shape and data_offsets"));
        }
        return fail(concat_(where(), ": \"", key_, "\" is a JSON ", type, ", expected ",
                            field_ == Field::kDtype ? "a string" : "an array"));
      case At::kShape:
        return fail(concat_(where(), ": shape has an entry that is not a non-negative integer"));
      case At::kOffsets:
        return bad_offsets();
      case At::kEnd:
        break;
    }
    return fail(concat_("header of '", source_, "' continues after its object"));
  }

  // A scalar of `type`; u: its value if a non-negative integer, v: if a string.
  bool scalar(const char* type, const std::uint64_t* u = nullptr, std::string* v = nullptr) {
    switch (at_) {
      case At::kShape:
        if (u == nullptr || *u > std::uint64_t{INT64_MAX}) return misplaced(type);
        if (entry_.shape.size() == kMaxRank) {
          return fail(concat_(where(), ": shape has more than ", kMaxRank, " dimensions"));
        }
        entry_.shape.push_back(static_cast<std::int64_t>(*u));
        return true;
      case At::kOffsets:
        if (u == nullptr || offsets_ == 2) return bad_offsets();
        (offsets_++ == 0 ? entry_.begin : entry_.end) = *u;
        return true;
      case At::kMetadata:
        if (v == nullptr) return misplaced(type);
        metadata_.emplace(std::move(key_), std::move(*v));
        return true;
      case At::kEntry:
        if (field_ == Field::kOther) return true;  // an unknown key with a plain value: ignored
        if (field_ != Field::kDtype || v == nullptr) return misplaced(type);
        entry_.dtype = std::move(*v);
        return true;
      default:
        return misplaced(type);
    }
  }

  // The entry just closed: complete, within the buffer, of the size its
  // dtype and shape give. Then it joins the map.
  bool close_entry() {
    for (std::size_t f = 0; f < 3; ++f) {
      if (!seen_[f]) return fail(concat_(where(), " has no \"", kFields[f], "\""));
    }
    const TensorInfo& t = entry_;
    if (t.begin > t.end) {
      return fail(
          concat_(where(), ": data_offsets [", t.begin, ", ", t.end, "] end before they begin"));
    }
    if (t.end > buffer_size_) {
      return fail(concat_(where(), ": data_offsets [", t.begin, ", ", t.end,
                          "] exceed the data buffer of ", buffer_size_,
                          " bytes (truncated file?)"));
    }
    const std::uint64_t elem = dtype_size(t.dtype);
    if (elem != 0) {  // an unknown dtype is reported when it is read
      std::uint64_t count = 0;
      if (!element_count(t.shape, elem, count)) {
        return fail(concat_(where(), ": shape ", shape_string(t.shape), " overflows 64 bits"));
      }
      if (count * elem != t.end - t.begin) {
        return fail(concat_(where(), ": data_offsets [", t.begin, ", ", t.end, "] hold ",
                            t.end - t.begin, " bytes, but dtype ", shown(t.dtype), " and shape ",
                            shape_string(t.shape), " need ", count * elem));
      }
    }
    std::string name = entry_.name;
    tensors_.emplace(std::move(name), std::move(entry_));
    return true;
  }

  const std::string& source_;
  std::uint64_t buffer_size_;
  TensorMap& tensors_;
  MetadataMap& metadata_;
  At at_ = At::kStart;
  Field field_ = Field::kOther;
  std::string key_;
  TensorInfo entry_;
  std::array<bool, 3> seen_{};
  int offsets_ = 0;
  bool saw_metadata_ = false;
  std::string error_;
};

// No two load targets share memory (one copy would overwrite the other):
// a sweep over the targets sorted by first byte tests only the pairs whose
// spans meet.
inline void check_targets_disjoint(std::span<const TensorTarget> targets) {
  std::vector<Footprint> prints;
  std::vector<std::size_t> order;
  for (std::size_t i = 0; i < targets.size(); ++i) {
    prints.emplace_back(targets[i].view, "");
    if (!prints.back().empty()) order.push_back(i);
  }
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return prints[a].begin < prints[b].begin; });
  for (std::size_t k = 0; k < order.size(); ++k) {
    const Footprint& a = prints[order[k]];
    for (std::size_t l = k + 1; l < order.size() && prints[order[l]].begin < a.end(); ++l) {
      if (!overlap(a, prints[order[l]])) continue;
      const auto name = [&](std::size_t i) {
        return ::moekit::detail::concat("targets[", i, "] ('", shown(targets[i].name), "')");
      };
      OverlapCheck::fail("io::SafetensorsReader::load", name(std::min(order[k], order[l])),
                         name(std::max(order[k], order[l])), true);
    }
  }
}

// The checksum moekit records in kChecksumKey, "crc32c:" and 8 hex digits:
// CRC-32C over the header's canonical form, then the data buffer. The
// canonical form lists the tensors by name (name, dtype, rank, dimensions,
// data_offsets) and the metadata by key without the checksum entry (key,
// value); every string is preceded by its length and every number is 8
// bytes little-endian. So the checksum covers everything the file says,
// whatever the JSON's spacing and order, and can sit inside the header.
inline Crc32c header_checksum(const TensorMap& tensors, const MetadataMap& metadata) {
  Crc32c crc;
  const auto text = [&crc](std::string_view s) {
    crc.update_u64(s.size());
    crc.update(s);
  };
  crc.update_u64(tensors.size());
  for (const auto& [name, t] : tensors) {
    text(name);
    text(t.dtype);
    crc.update_u64(t.shape.size());
    for (const std::int64_t d : t.shape) crc.update_u64(static_cast<std::uint64_t>(d));
    crc.update_u64(t.begin);
    crc.update_u64(t.end);
  }
  crc.update_u64(metadata.size() - metadata.count(std::string(kChecksumKey)));
  for (const auto& [key, value] : metadata) {
    if (key == kChecksumKey) continue;
    text(key);
    text(value);
  }
  return crc;
}

inline std::string checksum_text(std::uint32_t crc) {
  char hex[9];
  std::snprintf(hex, sizeof hex, "%08x", crc);
  return std::string("crc32c:") + hex;
}

// The value of checksum_text, or false.
inline bool parse_checksum(std::string_view text, std::uint32_t& crc) {
  constexpr std::string_view kPrefix = "crc32c:";
  if (text.size() != kPrefix.size() + 8 || text.substr(0, kPrefix.size()) != kPrefix) return false;
  crc = 0;
  for (const char c : text.substr(kPrefix.size())) {
    const int digit = c >= '0' && c <= '9'   ? c - '0'
                      : c >= 'a' && c <= 'f' ? c - 'a' + 10
                      : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                             : -1;
    if (digit < 0) return false;
    crc = (crc << 4) | static_cast<std::uint32_t>(digit);
  }
  return true;
}

}  // namespace detail

// A safetensors file opened for reading: the header parsed and checked
// (names, dtypes, shapes, offsets), tensors read by name into caller memory.
class SafetensorsReader {
 public:
  // Opens and validates `path` (see the top of this file); throws on any fault.
  explicit SafetensorsReader(const std::filesystem::path& path,
                             const SafetensorsReadOptions& options = {})
      : source_(path.string()), file_(detail::ByteSource::open_file(path)) {
    read_header(options);
  }

  // The same, from bytes in memory (kept by the reader); `source` names them
  // in messages.
  static SafetensorsReader from_bytes(std::vector<std::byte> bytes, std::string source = "<memory>",
                                      const SafetensorsReadOptions& options = {}) {
    return SafetensorsReader(std::move(bytes), std::move(source), options);
  }

  // Movable (the file stays open in the new owner), not copyable.
  SafetensorsReader(SafetensorsReader&&) noexcept = default;
  // Move assignment: closes this reader's file and takes the other's.
  SafetensorsReader& operator=(SafetensorsReader&&) noexcept = default;

  // The path (or source name) given at open.
  const std::string& source() const { return source_; }
  // The "__metadata__" map (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Whether the file carried a checksum that was verified at open.
  bool checksum_verified() const { return checksum_verified_; }
  // Number of tensors.
  index_t size() const { return static_cast<index_t>(tensors_.size()); }
  // Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& [name, info] : tensors_) out.push_back(name);
    return out;
  }
  // Whether the file has a tensor `name` (any dtype).
  bool contains(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }

  // The entry of `name`; kFormatError if the file has no such tensor.
  const TensorInfo& info(std::string_view name) const {
    const auto it = tensors_.find(name);
    MOEKIT_CHECK(it != tensors_.end(), Errc::kFormatError, "tensor '", detail::shown(name),
                 "' is not in '", source_, "' (", tensors_.size(), " tensors)");
    return it->second;
  }

  // A copy of the raw bytes of `name` (dtype and shape as info(name) says).
  std::vector<std::byte> bytes(std::string_view name) const {
    const TensorInfo& t = info(name);
    std::vector<std::byte> out(static_cast<std::size_t>(t.end - t.begin));
    file_->read(buffer_offset_ + t.begin, out.data(), out.size());
    return out;
  }

  // Checks that `name` exists, has a float dtype (F32, F16, BF16) and the
  // given shape; returns its dtype.
  Dtype check_tensor(std::string_view name, std::span<const std::int64_t> shape) const {
    const TensorInfo& t = info(name);
    Dtype dtype{};
    MOEKIT_CHECK(detail::parse_float_dtype(t.dtype, dtype), Errc::kUnsupported, "tensor '",
                 detail::shown(name), "' in '", source_, "' has dtype ", detail::shown(t.dtype),
                 "; moekit reads F32, F16 and BF16 tensors");
    MOEKIT_CHECK(std::equal(t.shape.begin(), t.shape.end(), shape.begin(), shape.end()),
                 Errc::kShapeMismatch, "tensor '", detail::shown(name), "' in '", source_,
                 "' has shape ", shape_string(t.shape), ", expected ", shape_string(shape));
    return dtype;
  }

  // Copies tensor `target.name` (checked as above against target.shape) into
  // target.view as float.
  void read(const TensorTarget& target) const { load(std::span<const TensorTarget>(&target, 1)); }
  // Tensor `name` of shape [dst.rows(), dst.cols()] into dst.
  void read(std::string_view name, MatrixView<float> dst) const {
    read(TensorTarget{std::string(name), {dst.rows(), dst.cols()}, dst});
  }
  // Tensor `name` of shape [dst.size()] into dst.
  void read(std::string_view name, VectorView<float> dst) const {
    read(TensorTarget{std::string(name), {dst.size()}, as_row(dst)});
  }

  // Copies every target, after checking all of them: names distinct, views
  // well formed and of the shape's element count, each tensor present with a
  // float dtype and the expected shape. A rejected call writes nothing
  // (except when the file shrinks while it is being read: kIoError, with the
  // targets read so far written).
  void load(std::span<const TensorTarget> targets) const {
    std::map<std::string_view, std::size_t> seen;
    std::vector<Dtype> dtypes(targets.size());
    for (std::size_t i = 0; i < targets.size(); ++i) {
      const TensorTarget& t = targets[i];
      const auto [it, fresh] = seen.emplace(t.name, i);
      MOEKIT_CHECK(fresh, Errc::kInvalidArgument, "targets[", it->second, "] and targets[", i,
                   "] both name '", detail::shown(t.name), "'");
      detail::check_named_view(t, "target");
      dtypes[i] = check_tensor(t.name, t.shape);
    }
    detail::check_targets_disjoint(targets);
    for (std::size_t i = 0; i < targets.size(); ++i) {
      const TensorTarget& t = targets[i];
      const TensorInfo& info = tensors_.find(t.name)->second;
      const index_t cols = t.view.cols();
      const auto elem = static_cast<index_t>(detail::dtype_bytes(dtypes[i]));
      // The tensor's elements in order, piece by piece, into the rows of the view.
      index_t r = 0, c = 0;
      file_->for_each_piece(buffer_offset_ + info.begin, info.end - info.begin,
                            [&](const std::byte* src, std::size_t n) {
                              index_t left = static_cast<index_t>(n) / elem;
                              while (left > 0) {
                                const index_t m = std::min(left, cols - c);
                                detail::decode(dtypes[i], src, t.view.row(r) + c, m);
                                src += m * elem;
                                left -= m;
                                c += m;
                                if (c == cols) {
                                  c = 0;
                                  ++r;
                                }
                              }
                            });
    }
  }

 private:
  SafetensorsReader(std::vector<std::byte> bytes, std::string source,
                    const SafetensorsReadOptions& options)
      : source_(std::move(source)), file_(std::make_unique<detail::ByteSource>(std::move(bytes))) {
    read_header(options);
  }

  void read_header(const SafetensorsReadOptions& options) {
    MOEKIT_CHECK_ARG(options.max_header_bytes <= kMaxHeaderBytes,
                     "options.max_header_bytes = ", options.max_header_bytes,
                     " exceeds the format's limit of ", kMaxHeaderBytes, " bytes");
    const std::uint64_t size = file_->size();
    MOEKIT_CHECK(size >= 8, Errc::kFormatError, "'", source_, "' is ", size,
                 " bytes long, too short for the 8-byte header length (truncated file?)");
    std::byte length[8];
    file_->read(0, length, 8);
    const std::uint64_t n = detail::load_u64_le(length);
    MOEKIT_CHECK(n <= size - 8, Errc::kFormatError, "header length ", n, " of '", source_,
                 "' exceeds the ", size - 8, " bytes that follow it (truncated file?)");
    MOEKIT_CHECK(n <= options.max_header_bytes, Errc::kFormatError, "header length ", n, " of '",
                 source_, "' exceeds the limit of ", options.max_header_bytes,
                 " bytes (SafetensorsReadOptions::max_header_bytes)");
    std::string text(static_cast<std::size_t>(n), '\0');
    file_->read(8, reinterpret_cast<std::byte*>(text.data()), text.size());

    buffer_offset_ = 8 + n;
    const std::uint64_t buffer_size = size - 8 - n;
    detail::HeaderParser parser(source_, buffer_size, tensors_, metadata_);
    const bool parsed = nlohmann::json::sax_parse(text.data(), text.data() + text.size(), &parser);
    MOEKIT_CHECK(
        parsed && parser.error().empty(), Errc::kFormatError,
        parser.error().empty() ? "header of '" + source_ + "' is not valid JSON" : parser.error());

    // The tensors must tile [0, buffer_size): no overlap, no hole.
    std::vector<const TensorInfo*> order;
    order.reserve(tensors_.size());
    for (const auto& [name, t] : tensors_) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    std::uint64_t expected = 0;
    const TensorInfo* prev = nullptr;
    for (const TensorInfo* t : order) {
      MOEKIT_CHECK(t->begin >= expected, Errc::kFormatError, "tensors '", detail::shown(prev->name),
                   "' (data_offsets [", prev->begin, ", ", prev->end, "]) and '",
                   detail::shown(t->name), "' (data_offsets [", t->begin, ", ", t->end,
                   "]) overlap in '", source_, "'");
      MOEKIT_CHECK(t->begin == expected, Errc::kFormatError, "bytes [", expected, ", ", t->begin,
                   ") of the data buffer of '", source_, "' belong to no tensor (a hole ",
                   prev == nullptr
                       ? std::string("before the first tensor")
                       : ::moekit::detail::concat("after '", detail::shown(prev->name), "'"),
                   ", before '", detail::shown(t->name), "')");
      expected = t->end;
      prev = t;
    }
    MOEKIT_CHECK(expected == buffer_size, Errc::kFormatError, "bytes [", expected, ", ",
                 buffer_size, ") of the data buffer of '", source_,
                 "' belong to no tensor (trailing bytes after the last tensor)");
    if (options.verify_checksum) verify_checksum(buffer_size);
  }

  void verify_checksum(std::uint64_t buffer_size) {
    const auto it = metadata_.find(std::string(kChecksumKey));
    if (it == metadata_.end()) return;  // a foreign file
    std::uint32_t recorded = 0;
    MOEKIT_CHECK(detail::parse_checksum(it->second, recorded), Errc::kFormatError, "metadata '",
                 kChecksumKey, "' of '", source_, "' is '", detail::shown(it->second),
                 "', not \"crc32c:\" and 8 hex digits (SafetensorsReadOptions::verify_checksum "
                 "= false reads the file anyway)");
    Crc32c crc = detail::header_checksum(tensors_, metadata_);
    file_->for_each_piece(buffer_offset_, buffer_size,
                          [&crc](const std::byte* p, std::size_t n) { crc.update(p, n); });
    MOEKIT_CHECK(crc.value() == recorded, Errc::kFormatError, "'", source_,
                 "' is corrupted: its contents give checksum ", detail::checksum_text(crc.value()),
                 ", the file records ", detail::checksum_text(recorded),
                 " (SafetensorsReadOptions::verify_checksum = false reads it anyway)");
    checksum_verified_ = true;
  }

  std::string source_;
  std::unique_ptr<detail::ByteSource> file_;
  std::uint64_t buffer_offset_ = 0;  // where the data buffer starts in the file
  detail::TensorMap tensors_;
  detail::MetadataMap metadata_;
  bool checksum_verified_ = false;
};

// Copies every target from `file` (SafetensorsReader::load).
inline void load_tensors(const SafetensorsReader& file, std::span<const TensorTarget> targets) {
  file.load(targets);
}

// ---- writer ---------------------------------------------------------------------------------

// Collects named float views, then writes them as one safetensors file (see
// the top of this file).
class SafetensorsWriter {
 public:
  // Adds a tensor of `shape` whose elements are data's, row by row. The view
  // is kept (not copied) until write().
  void add(std::string name, Shape shape, MatrixView<const float> data, Dtype dtype = Dtype::kF32) {
    const TensorSource t{std::move(name), std::move(shape), data};
    add(std::span<const TensorSource>(&t, 1), dtype);
  }
  // A matrix, shape [rows, cols].
  void add(std::string name, MatrixView<const float> data, Dtype dtype = Dtype::kF32) {
    add(std::move(name), Shape{data.rows(), data.cols()}, data, dtype);
  }
  // A vector, shape [n].
  void add(std::string name, VectorView<const float> data, Dtype dtype = Dtype::kF32) {
    add(std::move(name), Shape{data.size()}, as_row(data), dtype);
  }
  // All of `tensors`, or (on a bad one) none.
  void add(std::span<const TensorSource> tensors, Dtype dtype = Dtype::kF32) {
    MOEKIT_CHECK_ARG(dtype == Dtype::kF32 || dtype == Dtype::kF16 || dtype == Dtype::kBF16,
                     "dtype = ", static_cast<int>(dtype), " is not a Dtype");
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const TensorSource& t = tensors[i];
      MOEKIT_CHECK_ARG(t.name != "__metadata__",
                       "'__metadata__' is reserved and cannot name a tensor");
      MOEKIT_CHECK_ARG(detail::valid_utf8(t.name), "tensor name '", t.name, "' is not valid UTF-8");
      MOEKIT_CHECK_ARG(index_.find(t.name) == index_.end(), "tensor '", t.name,
                       "' was already added");
      for (std::size_t j = 0; j < i; ++j) {
        MOEKIT_CHECK_ARG(tensors[j].name != t.name, "tensors[", j, "] and tensors[", i,
                         "] both name '", t.name, "'");
      }
      detail::check_named_view(t, "tensor");
    }
    for (const TensorSource& t : tensors) {
      index_.emplace(t.name, entries_.size());
      entries_.push_back({t, dtype});
    }
  }

  // A "__metadata__" entry (replaces an earlier value of the same key).
  // kChecksumKey is reserved: the writer fills it in.
  void set_metadata(std::string key, std::string value) {
    MOEKIT_CHECK_ARG(detail::valid_utf8(key) && detail::valid_utf8(value), "metadata key '",
                     detail::shown(key), "' or its value is not valid UTF-8");
    MOEKIT_CHECK_ARG(key != kChecksumKey, "metadata key '", kChecksumKey,
                     "' is reserved: the writer records the file's checksum there");
    metadata_[std::move(key)] = std::move(value);
  }

  // Number of tensors added so far.
  index_t size() const { return static_cast<index_t>(entries_.size()); }

  // The whole file, in memory.
  std::vector<std::byte> to_bytes() const {
    std::ostringstream os(std::ios::binary);
    write_to(os);
    const std::string s = std::move(os).str();
    std::vector<std::byte> out(s.size());
    std::memcpy(out.data(), s.data(), s.size());
    return out;
  }

  // Writes the file atomically (moekit/io/atomic_write.hpp): a temporary
  // next to `path`, synced and renamed over it once complete.
  void write(const std::filesystem::path& path) const {
    write_file_atomically(path, [this](std::ostream& out) { write_to(out); });
  }

 private:
  struct Entry {
    TensorSource tensor;
    Dtype dtype;
  };

  // Data order: element size descending, then insertion order.
  std::vector<const Entry*> layout() const {
    std::vector<const Entry*> order;
    order.reserve(entries_.size());
    for (const Entry& e : entries_) order.push_back(&e);
    std::stable_sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
      return detail::dtype_bytes(a->dtype) > detail::dtype_bytes(b->dtype);
    });
    return order;
  }

  // Every tensor's bytes in file order, row by row: f(const char*, size).
  template <class F>
  void for_each_data_row(const std::vector<const Entry*>& order, F&& f) const {
    std::vector<char> row;
    for (const Entry* e : order) {
      const MatrixView<const float> v = e->tensor.view;
      for (index_t r = 0; r < v.rows(); ++r) {
        row.clear();
        detail::encode(e->dtype, v.row(r), v.cols(), row);
        f(row.data(), row.size());
      }
    }
  }

  // The header (with the checksum entry) and the data: the data is encoded
  // twice, once for the checksum the header must hold and once to write it.
  void write_to(std::ostream& os) const {
    const std::vector<const Entry*> order = layout();
    detail::TensorMap tensors;
    std::uint64_t offset = 0;
    for (const Entry* e : order) {
      const index_t count = e->tensor.view.rows() * e->tensor.view.cols();
      const std::uint64_t bytes = static_cast<std::uint64_t>(count) * detail::dtype_bytes(e->dtype);
      tensors.emplace(e->tensor.name, TensorInfo{e->tensor.name, dtype_name(e->dtype),
                                                 e->tensor.shape, offset, offset + bytes});
      offset += bytes;
    }
    Crc32c crc = detail::header_checksum(tensors, metadata_);
    for_each_data_row(order, [&crc](const char* p, std::size_t n) { crc.update(p, n); });
    detail::MetadataMap metadata = metadata_;
    metadata.emplace(kChecksumKey, detail::checksum_text(crc.value()));

    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    header["__metadata__"] = metadata;
    for (const Entry* e : order) {
      const TensorInfo& t = tensors.find(e->tensor.name)->second;
      header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    const auto n = static_cast<std::uint64_t>(text.size());
    char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xffu);
    os.write(len, 8);
    os.write(text.data(), static_cast<std::streamsize>(text.size()));
    for_each_data_row(order, [&os](const char* p, std::size_t n_bytes) {
      os.write(p, static_cast<std::streamsize>(n_bytes));
    });
  }

  std::vector<Entry> entries_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace io
MOEKIT_NAMESPACE_END
