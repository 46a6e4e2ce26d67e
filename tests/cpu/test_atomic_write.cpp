// Atomic writes (moekit/io/atomic_write.hpp), through the writers that use
// them: a planted symlink is never followed, concurrent writers of one path
// always leave a complete file, a full disk (simulated portably with
// RLIMIT_FSIZE, which also binds root) reports the OS's reason and leaves
// the old file and no temporary, and a writer that throws leaves nothing.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "expect_error.hpp"
#include "moekit/io/atomic_write.hpp"
#include "moekit/io/safetensors.hpp"

namespace {

namespace fs = std::filesystem;
namespace io = moekit::io;
using moekit::Errc;
using moekit::index_t;
using moekit::VectorView;

// A fresh, empty directory for one test.
fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("moekit_atomic_" + std::to_string(static_cast<long>(::getpid()))) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_text(const fs::path& p, const std::string& text) {
  io::write_file_atomically(p, [&](std::ostream& out) { out << text; });
}

// The entries of `dir` other than `keep`.
std::vector<std::string> others(const fs::path& dir, const std::vector<std::string>& keep) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (std::find(keep.begin(), keep.end(), name) == keep.end()) out.push_back(name);
  }
  return out;
}

TEST(AtomicWrite, WritesAndReplacesLeavingNoTemporary) {
  const fs::path dir = fresh_dir("basic");
  const fs::path p = dir / "a.txt";
  write_text(p, "first");
  EXPECT_EQ(read_all(p), "first");
  write_text(p, "second, longer");
  EXPECT_EQ(read_all(p), "second, longer");
  EXPECT_TRUE(others(dir, {"a.txt"}).empty());
  // A relative path in the current directory works too.
  const fs::path cwd = fs::current_path();
  fs::current_path(dir);
  write_text("b.txt", "relative");
  fs::current_path(cwd);
  EXPECT_EQ(read_all(dir / "b.txt"), "relative");
}

// The old writer used a fixed "<path>.tmp": a symlink planted there made it
// overwrite the link's target and turned <path> into a link to it.
TEST(AtomicWrite, NeverFollowsAPlantedSymlink) {
  const fs::path dir = fresh_dir("symlink");
  const fs::path victim = dir / "victim.txt";
  write_text(victim, "precious");
  const fs::path p = dir / "model.safetensors";
  fs::create_symlink(victim, dir / "model.safetensors.tmp");
  fs::create_symlink(victim, dir / ".model.safetensors.tmp");
  const std::vector<float> v = {1.0f, 2.0f};
  io::SafetensorsWriter w;
  w.add("v", VectorView<const float>(v.data(), 2));
  w.write(p);
  EXPECT_EQ(read_all(victim), "precious");
  EXPECT_FALSE(fs::is_symlink(p));
  EXPECT_TRUE(fs::is_regular_file(p));
  const io::SafetensorsReader r(p);
  EXPECT_TRUE(r.checksum_verified());
}

// Writers of one path, each in its own thread, many rounds; a reader opens
// the path all the while. Every open sees a complete file with a valid
// checksum, and the last file is one writer's whole output. (The old fixed
// temporary gave unreadable files.)
TEST(AtomicWrite, ConcurrentWritersNeverLeaveAnUnreadableFile) {
  const fs::path dir = fresh_dir("concurrent");
  const fs::path p = dir / "shared.safetensors";
  constexpr int kWriters = 4, kRounds = 40;
  constexpr index_t kSize = 4096;  // 16 KiB of data: writes take a while
  std::atomic<int> running{kWriters};
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kWriters; ++t) {
    threads.emplace_back([&, t] {
      std::vector<float> data(static_cast<std::size_t>(kSize), static_cast<float>(t));
      for (int round = 0; round < kRounds; ++round) {
        data[0] = static_cast<float>(round);
        io::SafetensorsWriter w;
        w.add("writer", VectorView<const float>(data.data(), kSize));
        w.write(p);
      }
      --running;
    });
  }
  int opened = 0;
  while (running.load() > 0 || opened == 0) {
    if (!fs::exists(p)) continue;
    try {
      const io::SafetensorsReader r(p);
      std::vector<float> got(static_cast<std::size_t>(kSize));
      r.read("writer", VectorView<float>(got.data(), kSize));
      for (index_t i = 1; i < kSize; ++i) {
        if (got[static_cast<std::size_t>(i)] != got[1]) ++bad;  // a mix of two writers
      }
      ++opened;
    } catch (const moekit::Error& e) {
      ++bad;
      ADD_FAILURE() << e.what();
    }
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(opened, 0);
  const io::SafetensorsReader last(p);
  EXPECT_TRUE(last.checksum_verified());
  EXPECT_TRUE(others(dir, {"shared.safetensors"}).empty()) << "a temporary was left behind";
}

// A disk that fills up mid-write: RLIMIT_FSIZE makes write(2) fail with
// EFBIG ("File too large") past the limit, for root too, on any file system.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    ::getrlimit(RLIMIT_FSIZE, &saved_);
    old_handler_ = ::signal(SIGXFSZ, SIG_IGN);  // else the signal ends the process
    rlimit lim = saved_;
    lim.rlim_cur = bytes;
    ok_ = ::setrlimit(RLIMIT_FSIZE, &lim) == 0;
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &saved_);
    ::signal(SIGXFSZ, old_handler_);
  }
  bool ok() const { return ok_; }

 private:
  rlimit saved_{};
  void (*old_handler_)(int) = nullptr;
  bool ok_ = false;
};

TEST(AtomicWrite, AFullDiskReportsTheReasonAndKeepsTheOldFile) {
  const fs::path dir = fresh_dir("full");
  const fs::path p = dir / "checkpoint.safetensors";
  std::vector<float> small(16, 1.0f), large(1 << 18, 2.0f);  // 1 MiB of data
  io::SafetensorsWriter first;
  first.add("w", VectorView<const float>(small.data(), 16));
  first.write(p);
  const std::string good = read_all(p);

  io::SafetensorsWriter second;
  second.add("w", VectorView<const float>(large.data(), static_cast<index_t>(large.size())));
  std::string msg;
  {
    const FileSizeLimit limit(64 * 1024);
    ASSERT_TRUE(limit.ok());
    msg = moekit_test::expect_error([&] { second.write(p); }, Errc::kIoError);
  }
  EXPECT_NE(msg.find("File too large"), std::string::npos) << msg;  // strerror(EFBIG)
  EXPECT_NE(msg.find(p.string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("unchanged"), std::string::npos) << msg;
  EXPECT_EQ(read_all(p), good);
  EXPECT_TRUE(others(dir, {"checkpoint.safetensors"}).empty()) << "a temporary was left behind";
  // Space again: the next write succeeds.
  second.write(p);
  EXPECT_EQ(io::SafetensorsReader(p).size(), 1);
}

TEST(AtomicWrite, AWriterThatThrowsLeavesNothing) {
  const fs::path dir = fresh_dir("throws");
  const fs::path p = dir / "out.txt";
  write_text(p, "old");
  EXPECT_THROW(io::write_file_atomically(p,
                                         [](std::ostream& out) {
                                           out << "partial";
                                           throw std::runtime_error("stop");
                                         }),
               std::runtime_error);
  EXPECT_EQ(read_all(p), "old");
  EXPECT_TRUE(others(dir, {"out.txt"}).empty());
}

TEST(AtomicWrite, AMissingDirectoryIsNamedWithTheReason) {
  const fs::path p = fresh_dir("missing") / "no" / "such" / "dir" / "f.txt";
  const std::string msg = moekit_test::expect_error([&] { write_text(p, "x"); }, Errc::kIoError);
  EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
  EXPECT_NE(msg.find(p.string()), std::string::npos) << msg;
}

}  // namespace
