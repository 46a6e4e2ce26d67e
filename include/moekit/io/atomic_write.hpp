#pragma once
// Writing a file whole or not at all (host only): the content goes to
// "<path>.tmp", which is renamed over `path` once it is complete, so a failed
// or interrupted write never leaves a half-written file at `path`. On failure
// the temporary is removed and moekit::Error (kIoError) names the file.
// Used by the safetensors writer and the CSV writer.

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "moekit/core/error.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace io {

// Calls write(std::ostream&) on a binary stream to "<path>.tmp", then renames it over path.
template <class Writer>
void write_file_atomically(const std::filesystem::path& path, Writer&& write) {
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    MOEKIT_CHECK(out.is_open(), Errc::kIoError, "cannot open '", tmp.string(),
                 "' for writing: ", std::strerror(errno));
    write(static_cast<std::ostream&>(out));
    out.close();
    if (!out) {
      std::error_code ignored;
      std::filesystem::remove(tmp, ignored);
      MOEKIT_FAIL(Errc::kIoError, "writing '", tmp.string(), "' failed");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    MOEKIT_FAIL(Errc::kIoError, "cannot rename '", tmp.string(), "' to '", path.string(),
                "': ", ec.message());
  }
}

}  // namespace io
MOEKIT_NAMESPACE_END
