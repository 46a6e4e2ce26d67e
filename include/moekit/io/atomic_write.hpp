#pragma once
// Writing a file whole or not at all (host only). Used by the safetensors
// writer and the CSV writer.
//
// write_file_atomically(path, write) calls write(std::ostream&) on a new
// temporary file in path's directory, then renames it over `path`:
//   - the temporary has a fresh random name ".<name>.tmp-<16 hex digits>" and
//     is created with O_CREAT | O_EXCL | O_NOFOLLOW, so nothing planted in
//     the directory (a file, or a symlink pointing elsewhere) is ever opened
//     or followed, and two writers of one path never share a temporary;
//   - the file is flushed to the device (fsync) before the rename, and the
//     directory after it, so a crash leaves the old file or the new one,
//     complete, and never a renamed file whose data is still in flight;
//   - rename(2) replaces `path` atomically: a reader opens either version,
//     and of two concurrent writers the last rename wins, whole.
// On any failure (including an exception thrown by `write`) the temporary is
// removed, `path` is left as it was, and moekit::Error (kIoError) names the
// file and gives the operating system's reason ("No space left on device").
// A failure to sync the directory after the rename is reported too (the new
// file is in place but may not survive a crash), except where the file
// system cannot sync directories at all (EINVAL).
//
// Elsewhere than POSIX the same steps run without the fsyncs and with a
// temporary opened by std::ofstream (no O_EXCL / O_NOFOLLOW there).

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <ostream>
#include <streambuf>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
// 1 where open(2), fsync(2) and rename(2) are available (internal switch).
#define MOEKIT_DETAIL_POSIX_FILES 1
#else
// 0: no POSIX file calls here (internal switch).
#define MOEKIT_DETAIL_POSIX_FILES 0
#endif

MOEKIT_NAMESPACE_BEGIN
namespace io {
namespace detail {

// 64 bits that differ between processes, threads and calls (not secret:
// O_EXCL, not the name, is what makes the temporary safe).
inline std::uint64_t temp_name_bits() {
  static std::atomic<std::uint64_t> counter{0};
  std::uint64_t v = static_cast<std::uint64_t>(
      std::chrono::high_resolution_clock::now().time_since_epoch().count());
  v = mix64(v ^ std::hash<std::thread::id>{}(std::this_thread::get_id()));
  v = mix64(v ^ counter.fetch_add(1, std::memory_order_relaxed));
#if MOEKIT_DETAIL_POSIX_FILES
  v = mix64(v ^ static_cast<std::uint64_t>(::getpid()));
#endif
  return v;
}

inline std::filesystem::path temp_path_for(const std::filesystem::path& path) {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(temp_name_bits()));
  // Appended piece by piece: GCC 12 reports a false -Wrestrict on chains of
  // const char* + std::string temporaries.
  std::string name = ".";
  name += path.filename().string();
  name += ".tmp-";
  name += hex;
  std::filesystem::path tmp = path;
  tmp.replace_filename(name);
  return tmp;
}

#if MOEKIT_DETAIL_POSIX_FILES

// An output stream buffer on a file descriptor that remembers the first
// errno a write met (the stream itself only knows "bad").
class FdStreamBuf : public std::streambuf {
 public:
  explicit FdStreamBuf(int fd) : fd_(fd), buffer_(1 << 16) { reset(); }
  int error() const { return error_; }

 protected:
  int_type overflow(int_type ch) override {
    if (!drain()) return traits_type::eof();
    if (!traits_type::eq_int_type(ch, traits_type::eof())) {
      *pptr() = traits_type::to_char_type(ch);
      pbump(1);
    }
    return traits_type::not_eof(ch);
  }
  int sync() override { return drain() ? 0 : -1; }

 private:
  // Writes the buffered bytes, retrying partial writes and EINTR.
  bool drain() {
    const char* p = pbase();
    std::size_t left = static_cast<std::size_t>(pptr() - pbase());
    while (left > 0 && error_ == 0) {
      const ::ssize_t n = ::write(fd_, p, left);
      if (n < 0) {
        if (errno != EINTR) error_ = errno;
        continue;
      }
      p += n;
      left -= static_cast<std::size_t>(n);
    }
    reset();
    return error_ == 0;
  }
  void reset() { setp(buffer_.data(), buffer_.data() + buffer_.size()); }

  int fd_;
  int error_ = 0;
  std::vector<char> buffer_;
};

// The temporary while it is being written: removed unless committed.
class TempFile {
 public:
  TempFile() = default;
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (opened_ && !committed_) ::unlink(path_.c_str());
  }
  // Creates a fresh temporary next to `target`; returns 0 or the errno.
  int open(const std::filesystem::path& target) {
    for (int attempt = 0; attempt < 64; ++attempt) {
      path_ = temp_path_for(target);
      fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
      if (fd_ >= 0) {
        opened_ = true;
        return 0;
      }
      if (errno != EEXIST) break;  // EEXIST: a name taken by chance, or planted; draw another
    }
    return errno;
  }
  int fd() const { return fd_; }
  const std::filesystem::path& path() const { return path_; }
  // Closes the descriptor; returns 0 or the errno of a failed close.
  int close() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc == 0 ? 0 : errno;
  }
  void commit() { committed_ = true; }

 private:
  std::filesystem::path path_;
  int fd_ = -1;
  bool opened_ = false;
  bool committed_ = false;
};

// fsync of `path`'s directory: 0 or the errno (EINVAL, "cannot sync a
// directory here", counts as success).
inline int sync_directory_of(const std::filesystem::path& path) {
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : ".";
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return errno;
  const int rc = ::fsync(dfd);
  const int err = rc == 0 ? 0 : errno;
  ::close(dfd);
  return err == EINVAL ? 0 : err;
}

#endif  // MOEKIT_DETAIL_POSIX_FILES

}  // namespace detail

// Calls write(std::ostream&) on a fresh temporary file next to `path`, then
// renames it over `path` (the steps and guarantees at the top of this file).
template <class Writer>
void write_file_atomically(const std::filesystem::path& path, Writer&& write) {
#if MOEKIT_DETAIL_POSIX_FILES
  detail::TempFile tmp;
  int err = tmp.open(path);
  MOEKIT_CHECK(err == 0, Errc::kIoError, "cannot write '", path.string(),
               "': cannot create a temporary file in its directory: ", std::strerror(err));
  {
    detail::FdStreamBuf buf(tmp.fd());
    std::ostream out(&buf);
    write(out);
    out.flush();
    err = buf.error();
    if (err == 0 && !out) err = EIO;  // the writer itself put the stream in a failed state
  }
  const char* step = "writing";
  if (err == 0 && ::fsync(tmp.fd()) != 0) {
    err = errno;
    step = "flushing it to the device (fsync)";
  }
  if (const int close_err = tmp.close(); err == 0 && close_err != 0) {
    err = close_err;
    step = "closing it";
  }
  MOEKIT_CHECK(err == 0, Errc::kIoError, "cannot write '", path.string(), "' (", step,
               " the temporary '", tmp.path().filename().string(), "'): ", std::strerror(err),
               "; '", path.filename().string(), "' is unchanged");
  if (::rename(tmp.path().c_str(), path.c_str()) != 0) {
    err = errno;
    MOEKIT_FAIL(Errc::kIoError, "cannot replace '", path.string(),
                "' by its new version: ", std::strerror(err), "; '", path.filename().string(),
                "' is unchanged");
  }
  tmp.commit();
  err = detail::sync_directory_of(path);
  MOEKIT_CHECK(err == 0, Errc::kIoError, "wrote '", path.string(),
               "' but could not flush its directory to the device (fsync): ", std::strerror(err),
               "; the new file may not survive a crash");
#else
  const std::filesystem::path tmp = detail::temp_path_for(path);
  struct Remove {
    const std::filesystem::path& p;
    bool keep = false;
    ~Remove() {
      std::error_code ignored;
      if (!keep) std::filesystem::remove(p, ignored);
    }
  } guard{tmp};
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    MOEKIT_CHECK(out.is_open(), Errc::kIoError, "cannot write '", path.string(),
                 "': cannot create '", tmp.string(), "': ", std::strerror(errno));
    write(static_cast<std::ostream&>(out));
    out.close();
    MOEKIT_CHECK(static_cast<bool>(out), Errc::kIoError, "cannot write '", path.string(),
                 "': writing '", tmp.string(), "' failed: ", std::strerror(errno));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  MOEKIT_CHECK(!ec, Errc::kIoError, "cannot replace '", path.string(), "': ", ec.message());
  guard.keep = true;
#endif
}

}  // namespace io
MOEKIT_NAMESPACE_END
