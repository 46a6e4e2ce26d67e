// Fuzz target: the safetensors reader (moekit/io/safetensors.hpp) on
// arbitrary bytes. Opening may fail with moekit::Error, nothing else: no
// crash, no sanitizer report, no leak, no hang, no huge allocation. A file
// that opens is read whole: every tensor with a float dtype into floats,
// every tensor's raw bytes, both with and without checksum verification.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "moekit/io/safetensors.hpp"

namespace io = moekit::io;

namespace {

void read_everything(const io::SafetensorsReader& r) {
  for (const std::string& name : r.names()) {
    const io::TensorInfo& t = r.info(name);
    const std::vector<std::byte> raw = r.bytes(name);
    if (raw.size() != t.end - t.begin) __builtin_trap();
    io::Dtype dtype{};
    if (!io::detail::parse_float_dtype(t.dtype, dtype)) continue;
    std::uint64_t count = 0;
    if (!io::detail::element_count(t.shape, 1, count)) __builtin_trap();  // the open checked it
    std::vector<float> dst(static_cast<std::size_t>(count));
    r.read({name, t.shape, moekit::MatrixView<float>(dst.data(), 1, static_cast<moekit::index_t>(count))});
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> bytes(size);
  if (size > 0) std::memcpy(bytes.data(), data, size);
  for (const bool verify : {true, false}) {
    io::SafetensorsReadOptions options;
    options.verify_checksum = verify;
    try {
      read_everything(io::SafetensorsReader::from_bytes(bytes, "fuzz", options));
    } catch (const moekit::Error&) {
      // A rejected file: the expected outcome for most inputs.
    }
  }
  return 0;
}
