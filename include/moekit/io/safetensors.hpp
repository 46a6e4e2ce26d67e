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
// Reading. SafetensorsReader maps the file into memory (POSIX mmap; elsewhere
// it reads it once) and validates all of it up front: header length within
// the file, well-formed JSON (nlohmann-json, moekit's one parser dependency),
// no name twice, each entry's fields and types, offsets inside the buffer,
// sizes matching dtype and shape, and the tiling. A file that fails any check
// is rejected at open with a message naming the file, the tensor and the
// values. Then name -> (dtype, shape, bytes) lookups are free, and
// read()/load_tensors() copy tensors into caller views as float:
//   F32 as is; F16 and BF16 converted exactly (every half value is a float).
// Any other dtype (I64, F64, F8_*, ...) is reported, naming the tensor and the
// dtype, when it is read; a dtype the format does not list passes the open
// (its size is unknown, so its size check is skipped) and fails the same way.
//
// Writing. SafetensorsWriter collects named float views (non-owning: the data
// must stay alive until write()) and writes them as F32, or F16 / BF16 rounded
// to nearest, ties to even (finite floats beyond the half range become +-inf;
// NaN stays NaN). Tensors are laid out by element size, largest first (so
// every F32 tensor starts 4-byte aligned, as the reference writer does), then
// in the order they were added; the header is padded with spaces to a multiple
// of 8 bytes. write(path) writes "<path>.tmp" and renames it over path, so a
// failed write never leaves a half-written file at path.
//
// Errors (moekit::Error):
//   kIoError        the file cannot be opened, mapped, read or written
//   kFormatError    truncated file, header length beyond the file, malformed
//                   JSON, a name or key twice, a bad entry, data_offsets beyond
//                   the buffer, overlapping tensors or holes, a size that does
//                   not match dtype x shape, a tensor that is not in the file
//   kUnsupported    a tensor's dtype is not F32, F16 or BF16
//   kShapeMismatch  a tensor's shape is not the one expected, or a view does
//                   not have the shape's element count
//   kInvalidArgument  writer: a name given twice, "__metadata__" as a tensor
//                   name, a name that is not UTF-8, a negative dimension
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

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define MOEKIT_DETAIL_HAS_MMAP 1
#else
#define MOEKIT_DETAIL_HAS_MMAP 0
#endif

MOEKIT_NAMESPACE_BEGIN
namespace io {

// The dtypes moekit reads into float and writes from float.
enum class Dtype { kF32, kF16, kBF16 };

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

constexpr float bf16_bits_to_float(std::uint16_t b) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

constexpr std::uint16_t float_to_bf16_bits(float f) noexcept {
  std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x0040u);
  x += 0x7fffu + ((x >> 16) & 1u);  // ties to even; overflow carries into inf
  return static_cast<std::uint16_t>(x >> 16);
}

// ---- shapes and named views ------------------------------------------------------------------

using Shape = std::vector<std::int64_t>;

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
  std::string name;
  Shape shape;
  MatrixView<T> view;
};
using TensorTarget = NamedTensor<float>;
using TensorSource = NamedTensor<const float>;

// A vector as the 1 x n matrix NamedTensor takes.
template <class T>
MatrixView<T> as_row(VectorView<T> v) {
  return MatrixView<T>(v.data(), 1, v.size());
}

// The tensor in a file, as the header describes it.
struct TensorInfo {
  std::string name;
  std::string dtype;  // as written in the file ("F32", "I64", ...)
  Shape shape;
  std::uint64_t begin = 0;  // data_offsets, relative to the data buffer
  std::uint64_t end = 0;
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

// The whole file, read-only: mapped where the platform can, else read once.
class FileBytes {
 public:
  FileBytes() = default;
  explicit FileBytes(std::vector<std::byte> bytes) : owned_(std::move(bytes)) {
    data_ = owned_.data();
    size_ = owned_.size();
  }
  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;
  ~FileBytes() {
#if MOEKIT_DETAIL_HAS_MMAP
    if (mapped_) ::munmap(const_cast<std::byte*>(data_), size_);
#endif
  }

  static std::unique_ptr<FileBytes> map_file(const std::filesystem::path& path) {
    auto file = std::make_unique<FileBytes>();
#if MOEKIT_DETAIL_HAS_MMAP
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    MOEKIT_CHECK(fd >= 0, Errc::kIoError, "cannot open '", path.string(),
                 "': ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      MOEKIT_FAIL(Errc::kIoError, "cannot read '", path.string(), "': ", std::strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      MOEKIT_FAIL(Errc::kIoError, "cannot read '", path.string(), "': not a regular file");
    }
    file->size_ = static_cast<std::size_t>(st.st_size);
    if (file->size_ > 0) {
      void* p = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
      const int err = errno;
      ::close(fd);
      MOEKIT_CHECK(p != MAP_FAILED, Errc::kIoError, "cannot map '", path.string(),
                   "' into memory: ", std::strerror(err));
      file->data_ = static_cast<const std::byte*>(p);
      file->mapped_ = true;
    } else {
      ::close(fd);
    }
#else
    std::ifstream in(path, std::ios::binary);
    MOEKIT_CHECK(in.good(), Errc::kIoError, "cannot open '", path.string(), "'");
    in.seekg(0, std::ios::end);
    const std::streamoff n = in.tellg();
    in.seekg(0, std::ios::beg);
    MOEKIT_CHECK(n >= 0, Errc::kIoError, "cannot read '", path.string(), "'");
    file->owned_.resize(static_cast<std::size_t>(n));
    in.read(reinterpret_cast<char*>(file->owned_.data()), n);
    MOEKIT_CHECK(in.good() || n == 0, Errc::kIoError, "cannot read '", path.string(), "'");
    file->data_ = file->owned_.data();
    file->size_ = file->owned_.size();
#endif
    return file;
  }

  const std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  bool mapped_ = false;
  std::vector<std::byte> owned_;
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

// A non-negative JSON integer.
inline bool json_u64(const nlohmann::json& j, std::uint64_t& out) {
  if (j.is_number_unsigned()) {
    out = j.get<std::uint64_t>();
    return true;
  }
  if (j.is_number_integer() && j.get<std::int64_t>() >= 0) {
    out = static_cast<std::uint64_t>(j.get<std::int64_t>());
    return true;
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

// Largest header accepted (the reference implementation's limit).
inline constexpr std::uint64_t kMaxHeaderBytes = 100u * 1024u * 1024u;

class SafetensorsReader {
 public:
  // Opens and validates `path` (see the top of this file); throws on any fault.
  explicit SafetensorsReader(const std::filesystem::path& path)
      : source_(path.string()), file_(detail::FileBytes::map_file(path)) {
    read_header();
  }

  // The same, from bytes in memory (kept by the reader); `source` names them
  // in messages.
  static SafetensorsReader from_bytes(std::vector<std::byte> bytes,
                                      std::string source = "<memory>") {
    return SafetensorsReader(std::move(bytes), std::move(source));
  }

  SafetensorsReader(SafetensorsReader&&) noexcept = default;
  SafetensorsReader& operator=(SafetensorsReader&&) noexcept = default;

  // The path (or source name) given at open.
  const std::string& source() const { return source_; }
  // The "__metadata__" map (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Number of tensors.
  index_t size() const { return static_cast<index_t>(tensors_.size()); }
  // Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& [name, info] : tensors_) out.push_back(name);
    return out;
  }
  bool contains(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }

  // The entry of `name`; kFormatError if the file has no such tensor.
  const TensorInfo& info(std::string_view name) const {
    const auto it = tensors_.find(name);
    MOEKIT_CHECK(it != tensors_.end(), Errc::kFormatError, "tensor '", name, "' is not in '",
                 source_, "' (", tensors_.size(), " tensors)");
    return it->second;
  }

  // The raw bytes of `name` (dtype and shape as info(name) says).
  std::span<const std::byte> bytes(std::string_view name) const {
    const TensorInfo& t = info(name);
    return {buffer_ + t.begin, static_cast<std::size_t>(t.end - t.begin)};
  }

  // Checks that `name` exists, has a float dtype (F32, F16, BF16) and the
  // given shape; returns its dtype.
  Dtype check_tensor(std::string_view name, std::span<const std::int64_t> shape) const {
    const TensorInfo& t = info(name);
    Dtype dtype{};
    MOEKIT_CHECK(detail::parse_float_dtype(t.dtype, dtype), Errc::kUnsupported, "tensor '", name,
                 "' in '", source_, "' has dtype ", t.dtype,
                 "; moekit reads F32, F16 and BF16 tensors");
    MOEKIT_CHECK(std::equal(t.shape.begin(), t.shape.end(), shape.begin(), shape.end()),
                 Errc::kShapeMismatch, "tensor '", name, "' in '", source_, "' has shape ",
                 shape_string(t.shape), ", expected ", shape_string(shape));
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
  // float dtype and the expected shape. A rejected call writes nothing.
  void load(std::span<const TensorTarget> targets) const {
    std::map<std::string_view, std::size_t> seen;
    std::vector<Dtype> dtypes(targets.size());
    for (std::size_t i = 0; i < targets.size(); ++i) {
      const TensorTarget& t = targets[i];
      const auto [it, fresh] = seen.emplace(t.name, i);
      MOEKIT_CHECK(fresh, Errc::kInvalidArgument, "targets[", it->second, "] and targets[", i,
                   "] both name '", t.name, "'");
      detail::check_named_view(t, "target");
      dtypes[i] = check_tensor(t.name, t.shape);
    }
    for (std::size_t i = 0; i < targets.size(); ++i) {
      const TensorTarget& t = targets[i];
      const std::byte* src = buffer_ + tensors_.find(t.name)->second.begin;
      const index_t cols = t.view.cols();
      const auto row_bytes = static_cast<index_t>(detail::dtype_bytes(dtypes[i])) * cols;
      for (index_t r = 0; r < t.view.rows(); ++r) {
        detail::decode(dtypes[i], src + r * row_bytes, t.view.row(r), cols);
      }
    }
  }

 private:
  SafetensorsReader(std::vector<std::byte> bytes, std::string source)
      : source_(std::move(source)), file_(std::make_unique<detail::FileBytes>(std::move(bytes))) {
    read_header();
  }

  void read_header() {
    using nlohmann::json;
    const std::byte* data = file_->data();
    const std::uint64_t size = file_->size();
    MOEKIT_CHECK(size >= 8, Errc::kFormatError, "'", source_, "' is ", size,
                 " bytes long, too short for the 8-byte header length (truncated file?)");
    const std::uint64_t n = detail::load_u64_le(data);
    MOEKIT_CHECK(n <= size - 8, Errc::kFormatError, "header length ", n, " of '", source_,
                 "' exceeds the ", size - 8, " bytes that follow it (truncated file?)");
    MOEKIT_CHECK(n <= kMaxHeaderBytes, Errc::kFormatError, "header length ", n, " of '", source_,
                 "' exceeds the limit of ", kMaxHeaderBytes, " bytes");
    const char* text = reinterpret_cast<const char*>(data + 8);

    // Parse, noting the first key that repeats within one object (the JSON
    // library would silently keep the last one).
    std::vector<std::vector<std::string>> open_keys;
    std::string duplicate;
    std::size_t duplicate_depth = 0;
    const json::parser_callback_t note_keys = [&](int, json::parse_event_t event, json& parsed) {
      if (event == json::parse_event_t::object_start) {
        open_keys.emplace_back();
      } else if (event == json::parse_event_t::object_end) {
        if (!open_keys.empty()) open_keys.pop_back();
      } else if (event == json::parse_event_t::key && !open_keys.empty()) {
        const std::string& key = parsed.get_ref<const std::string&>();
        auto& keys = open_keys.back();
        if (duplicate.empty() && std::find(keys.begin(), keys.end(), key) != keys.end()) {
          duplicate = key;
          duplicate_depth = open_keys.size();
        }
        keys.push_back(key);
      }
      return true;
    };
    json header;
#if defined(MOEKIT_NO_EXCEPTIONS)
    header = json::parse(text, text + n, note_keys, /*allow_exceptions=*/false);
    MOEKIT_CHECK(!header.is_discarded(), Errc::kFormatError, "header of '", source_,
                 "' is not valid JSON");
#else
    try {
      header = json::parse(text, text + n, note_keys);
    } catch (const json::exception& e) {
      MOEKIT_FAIL(Errc::kFormatError, "header of '", source_, "' is not valid JSON: ", e.what());
    }
#endif
    MOEKIT_CHECK(duplicate.empty() || duplicate_depth != 1, Errc::kFormatError, "tensor '",
                 duplicate, "' appears more than once in the header of '", source_, "'");
    MOEKIT_CHECK(duplicate.empty(), Errc::kFormatError, "key '", duplicate,
                 "' appears more than once in one entry of the header of '", source_, "'");
    MOEKIT_CHECK(header.is_object(), Errc::kFormatError, "header of '", source_, "' is a JSON ",
                 header.type_name(), ", expected an object");

    buffer_ = data + 8 + n;
    const std::uint64_t buffer_size = size - 8 - n;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        read_header_metadata(entry);
        continue;
      }
      tensors_.emplace(name, read_header_entry(name, entry, buffer_size));
    }

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
      MOEKIT_CHECK(t->begin >= expected, Errc::kFormatError, "tensors '", prev->name,
                   "' (data_offsets [", prev->begin, ", ", prev->end, "]) and '", t->name,
                   "' (data_offsets [", t->begin, ", ", t->end, "]) overlap in '", source_, "'");
      MOEKIT_CHECK(
          t->begin == expected, Errc::kFormatError, "bytes [", expected, ", ", t->begin,
          ") of the data buffer of '", source_, "' belong to no tensor (a hole ",
          prev == nullptr ? std::string("before the first tensor") : "after '" + prev->name + "'",
          ", before '", t->name, "')");
      expected = t->end;
      prev = t;
    }
    MOEKIT_CHECK(expected == buffer_size, Errc::kFormatError, "bytes [", expected, ", ",
                 buffer_size, ") of the data buffer of '", source_,
                 "' belong to no tensor (trailing bytes after the last tensor)");
  }

  void read_header_metadata(const nlohmann::json& entry) {
    MOEKIT_CHECK(entry.is_object(), Errc::kFormatError, "__metadata__ of '", source_,
                 "' is a JSON ", entry.type_name(), ", expected an object of strings");
    for (const auto& [key, value] : entry.items()) {
      MOEKIT_CHECK(value.is_string(), Errc::kFormatError, "__metadata__ key '", key, "' of '",
                   source_, "' is a JSON ", value.type_name(), ", expected a string");
      metadata_.emplace(key, value.get<std::string>());
    }
  }

  TensorInfo read_header_entry(const std::string& name, const nlohmann::json& entry,
                               std::uint64_t buffer_size) const {
    MOEKIT_CHECK(entry.is_object(), Errc::kFormatError, "entry of tensor '", name, "' in '",
                 source_, "' is a JSON ", entry.type_name(), ", expected an object");
    TensorInfo t;
    t.name = name;
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      MOEKIT_CHECK(entry.contains(key), Errc::kFormatError, "tensor '", name, "' in '", source_,
                   "' has no \"", key, "\"");
    }
    const nlohmann::json& dtype = entry["dtype"];
    MOEKIT_CHECK(dtype.is_string(), Errc::kFormatError, "tensor '", name, "' in '", source_,
                 "': \"dtype\" is a JSON ", dtype.type_name(), ", expected a string");
    t.dtype = dtype.get<std::string>();
    const nlohmann::json& shape = entry["shape"];
    MOEKIT_CHECK(shape.is_array(), Errc::kFormatError, "tensor '", name, "' in '", source_,
                 "': \"shape\" is a JSON ", shape.type_name(), ", expected an array");
    for (const nlohmann::json& dim : shape) {
      std::uint64_t v = 0;
      MOEKIT_CHECK(detail::json_u64(dim, v) && v <= std::uint64_t{INT64_MAX}, Errc::kFormatError,
                   "tensor '", name, "' in '", source_, "': shape ", shape.dump(),
                   " has an entry that is not a non-negative integer");
      t.shape.push_back(static_cast<std::int64_t>(v));
    }
    const nlohmann::json& offsets = entry["data_offsets"];
    MOEKIT_CHECK(offsets.is_array() && offsets.size() == 2 &&
                     detail::json_u64(offsets[0], t.begin) && detail::json_u64(offsets[1], t.end),
                 Errc::kFormatError, "tensor '", name, "' in '", source_, "': data_offsets ",
                 offsets.dump(), " is not two non-negative integers");
    MOEKIT_CHECK(t.begin <= t.end, Errc::kFormatError, "tensor '", name, "' in '", source_,
                 "': data_offsets [", t.begin, ", ", t.end, "] end before they begin");
    MOEKIT_CHECK(t.end <= buffer_size, Errc::kFormatError, "tensor '", name, "' in '", source_,
                 "': data_offsets [", t.begin, ", ", t.end, "] exceed the data buffer of ",
                 buffer_size, " bytes (truncated file?)");
    const std::uint64_t elem = dtype_size(t.dtype);
    if (elem != 0) {  // an unknown dtype is reported when it is read
      std::uint64_t count = 0;
      MOEKIT_CHECK(detail::element_count(t.shape, elem, count), Errc::kFormatError, "tensor '",
                   name, "' in '", source_, "': shape ", shape_string(t.shape),
                   " overflows 64 bits");
      MOEKIT_CHECK(count * elem == t.end - t.begin, Errc::kFormatError, "tensor '", name, "' in '",
                   source_, "': data_offsets [", t.begin, ", ", t.end, "] hold ", t.end - t.begin,
                   " bytes, but dtype ", t.dtype, " and shape ", shape_string(t.shape), " need ",
                   count * elem);
    }
    return t;
  }

  std::string source_;
  std::unique_ptr<detail::FileBytes> file_;
  const std::byte* buffer_ = nullptr;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Copies every target from `file` (SafetensorsReader::load).
inline void load_tensors(const SafetensorsReader& file, std::span<const TensorTarget> targets) {
  file.load(targets);
}

// ---- writer ---------------------------------------------------------------------------------

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
  void set_metadata(std::string key, std::string value) {
    MOEKIT_CHECK_ARG(detail::valid_utf8(key) && detail::valid_utf8(value), "metadata key '", key,
                     "' or its value is not valid UTF-8");
    metadata_[std::move(key)] = std::move(value);
  }

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

  // Writes the file: "<path>.tmp" first, renamed over `path` once complete.
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

  void write_to(std::ostream& os) const {
    const std::vector<const Entry*> order = layout();
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const Entry* e : order) {
      const index_t count = e->tensor.view.rows() * e->tensor.view.cols();
      const std::uint64_t bytes = static_cast<std::uint64_t>(count) * detail::dtype_bytes(e->dtype);
      header[e->tensor.name] = {{"dtype", dtype_name(e->dtype)},
                                {"shape", e->tensor.shape},
                                {"data_offsets", {offset, offset + bytes}}};
      offset += bytes;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    const auto n = static_cast<std::uint64_t>(text.size());
    char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xffu);
    os.write(len, 8);
    os.write(text.data(), static_cast<std::streamsize>(text.size()));
    std::vector<char> row;
    for (const Entry* e : order) {
      const MatrixView<const float> v = e->tensor.view;
      for (index_t r = 0; r < v.rows(); ++r) {
        row.clear();
        detail::encode(e->dtype, v.row(r), v.cols(), row);
        os.write(row.data(), static_cast<std::streamsize>(row.size()));
      }
    }
  }

  std::vector<Entry> entries_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace io
MOEKIT_NAMESPACE_END
