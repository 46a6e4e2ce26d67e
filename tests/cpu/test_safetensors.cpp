// safetensors files (moekit/io/safetensors.hpp) and component weights
// (moekit/io/weights.hpp): F16 / BF16 conversions (exhaustive round trips and
// every rounding boundary), the writer's exact bytes, write -> read round
// trips of every component (bit-identical, strided views, the MoeLayer's
// forward unchanged), the Mixtral name map, and every bad file: each gives its
// named error and leaves the destination untouched.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "expect_error.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/io/weights.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "strided_matrix.hpp"

namespace {

namespace fs = std::filesystem;
namespace io = moekit::io;
using moekit::Errc;
using moekit::index_t;
using moekit::MatrixView;
using moekit::to_size;
using moekit::VectorView;
using moekit_test::expect_error;
using Mat = moekit_test::StridedMatrix;

constexpr float kSentinel = 12345.0f;

// A fresh path in the test's temporary directory.
fs::path temp_path(const std::string& name) {
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("moekit_safetensors_" + std::to_string(static_cast<long>(::getpid())));
  fs::create_directories(dir);
  const fs::path p = dir / name;
  fs::remove(p);
  return p;
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A file with `header` as its JSON (its length taken as is unless `n` is
// given) followed by `data`.
std::string file_bytes(const std::string& header, const std::string& data,
                       std::uint64_t n = std::numeric_limits<std::uint64_t>::max()) {
  if (n == std::numeric_limits<std::uint64_t>::max()) n = header.size();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[to_size(i)] = static_cast<char>((n >> (8 * i)) & 0xffu);
  return out + header + data;
}

std::string f32_bytes(std::initializer_list<float> values) {
  std::string out;
  for (float v : values) {
    const auto bits = std::bit_cast<std::uint32_t>(v);
    for (int k = 0; k < 4; ++k) out.push_back(static_cast<char>((bits >> (8 * k)) & 0xffu));
  }
  return out;
}

// Opens `bytes` (written to a file) and expects `code` with `needle` in the message.
void expect_bad_file(const std::string& name, const std::string& bytes, Errc code,
                     const std::string& needle) {
  const fs::path p = temp_path(name + ".safetensors");
  write_bytes(p, bytes);
  const std::string msg = expect_error([&] { io::SafetensorsReader r(p); }, code);
  EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  EXPECT_NE(msg.find(p.string()), std::string::npos) << "message does not name the file: " << msg;
}

std::vector<float> random_vector(std::mt19937& rng, index_t n) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(to_size(n));
  for (float& x : v) x = normal(rng);
  return v;
}

bool all_equal(const std::vector<float>& v, float value) {
  for (float x : v)
    if (std::bit_cast<std::uint32_t>(x) != std::bit_cast<std::uint32_t>(value)) return false;
  return true;
}

bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// ---- half-precision conversions ---------------------------------------------------------

double f16_value(std::uint16_t h) { return io::f16_bits_to_float(h); }

TEST(Safetensors, F16DecodesExactly) {
  EXPECT_EQ(std::bit_cast<std::uint32_t>(io::f16_bits_to_float(0x0000)), 0u);
  EXPECT_EQ(std::bit_cast<std::uint32_t>(io::f16_bits_to_float(0x8000)), 0x80000000u);
  EXPECT_EQ(io::f16_bits_to_float(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(io::f16_bits_to_float(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(io::f16_bits_to_float(0x8200), -std::ldexp(512.0f, -24));
  EXPECT_EQ(io::f16_bits_to_float(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(io::f16_bits_to_float(0x3c00), 1.0f);
  EXPECT_EQ(io::f16_bits_to_float(0x3555), 0.333251953125f);
  EXPECT_EQ(io::f16_bits_to_float(0xc000), -2.0f);
  EXPECT_EQ(io::f16_bits_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(io::f16_bits_to_float(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(io::f16_bits_to_float(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(io::f16_bits_to_float(0x7e00)));
  EXPECT_TRUE(std::isnan(io::f16_bits_to_float(0x7c01)));  // signalling payload stays NaN
  static_assert(io::f16_bits_to_float(0x3c00) == 1.0f, "usable at compile time");
}

TEST(Safetensors, F16RoundTripsEveryValue) {
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float f = io::f16_bits_to_float(bits);
    if (std::isnan(f)) {
      const std::uint16_t back = io::float_to_f16_bits(f);
      EXPECT_EQ(back & 0x7c00u, 0x7c00u);
      EXPECT_NE(back & 0x3ffu, 0u) << h;  // still NaN, not inf
      EXPECT_EQ(back & 0x8000u, bits & 0x8000u);
    } else {
      ASSERT_EQ(io::float_to_f16_bits(f), bits) << "h = " << h;
    }
  }
}

// Between two neighbouring halves: the midpoint rounds to the even one, a
// float ulp either side to the nearer one.
TEST(Safetensors, F16RoundsToNearestEven) {
  for (std::uint16_t sign : {std::uint16_t{0}, std::uint16_t{0x8000}}) {
    for (std::uint32_t h = 0; h < 0x7bff; ++h) {
      const auto lo = static_cast<std::uint16_t>(h | sign);
      const auto hi = static_cast<std::uint16_t>((h + 1) | sign);
      const double mid_d = (f16_value(lo) + f16_value(hi)) / 2;
      const auto mid = static_cast<float>(mid_d);
      ASSERT_EQ(static_cast<double>(mid), mid_d);  // representable
      const std::uint16_t even = (h & 1u) == 0 ? lo : hi;
      ASSERT_EQ(io::float_to_f16_bits(mid), even) << "h = " << h;
      const float toward_zero = std::nextafter(mid, 0.0f);
      const float away = std::nextafter(mid, sign ? -1e9f : 1e9f);
      ASSERT_EQ(io::float_to_f16_bits(toward_zero), lo) << "h = " << h;
      ASSERT_EQ(io::float_to_f16_bits(away), hi) << "h = " << h;
    }
  }
  // Named cases.
  EXPECT_EQ(io::float_to_f16_bits(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie -> even
  EXPECT_EQ(io::float_to_f16_bits(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie -> even
  EXPECT_EQ(io::float_to_f16_bits(std::ldexp(1.0f, -25)), 0x0000);             // tie -> 0
  EXPECT_EQ(io::float_to_f16_bits(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(io::float_to_f16_bits(std::ldexp(3.0f, -25)), 0x0002);     // 1.5 units -> 2
  EXPECT_EQ(io::float_to_f16_bits(std::ldexp(1023.5f, -24)), 0x0400);  // into the normals
  EXPECT_EQ(io::float_to_f16_bits(std::ldexp(1.0f, -30)), 0x0000);     // underflow
  EXPECT_EQ(io::float_to_f16_bits(-std::ldexp(1.0f, -30)), 0x8000);    // keeps the sign
  EXPECT_EQ(io::float_to_f16_bits(65504.0f), 0x7bff);
  EXPECT_EQ(io::float_to_f16_bits(65519.996f), 0x7bff);
  EXPECT_EQ(io::float_to_f16_bits(65520.0f), 0x7c00);  // tie above max -> inf
  EXPECT_EQ(io::float_to_f16_bits(1e10f), 0x7c00);
  EXPECT_EQ(io::float_to_f16_bits(-1e10f), 0xfc00);
  EXPECT_EQ(io::float_to_f16_bits(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(io::float_to_f16_bits(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(io::float_to_f16_bits(std::bit_cast<float>(0x7f800001u)) & 0x7e00u, 0x7e00u);  // NaN
}

TEST(Safetensors, Bf16ConvertsExactlyAndRoundsToNearestEven) {
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float f = io::bf16_bits_to_float(bits);
    ASSERT_EQ(std::bit_cast<std::uint32_t>(f), h << 16);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(io::bf16_bits_to_float(io::float_to_bf16_bits(f))));
      continue;
    }
    ASSERT_EQ(io::float_to_bf16_bits(f), bits);
    if ((h & 0x7fffu) >= 0x7f80u - 1) continue;  // no finite upper neighbour
    // The midpoint to the next value up (in magnitude) and a float ulp either side.
    const std::uint32_t mid = (h << 16) | 0x8000u;
    const auto up = static_cast<std::uint16_t>(h + 1);
    ASSERT_EQ(io::float_to_bf16_bits(std::bit_cast<float>(mid)), (h & 1u) ? up : bits) << h;
    ASSERT_EQ(io::float_to_bf16_bits(std::bit_cast<float>(mid - 1)), bits) << h;
    ASSERT_EQ(io::float_to_bf16_bits(std::bit_cast<float>(mid + 1)), up) << h;
  }
  EXPECT_EQ(io::float_to_bf16_bits(std::numeric_limits<float>::max()), 0x7f80);  // -> inf
  EXPECT_EQ(io::float_to_bf16_bits(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(io::float_to_bf16_bits(std::bit_cast<float>(0x00018000u)), 0x0002);  // subnormal tie
  EXPECT_EQ(io::float_to_bf16_bits(std::bit_cast<float>(0x7f800001u)), 0x7fc0);  // NaN, not inf
  EXPECT_EQ(io::float_to_bf16_bits(std::bit_cast<float>(0xff800001u)), 0xffc0);
}

// ---- the file format ----------------------------------------------------------------------

TEST(Safetensors, WriterProducesTheExactFormat) {
  const std::vector<float> a = {1.0f, -2.0f};
  const std::vector<float> b = {0.5f};
  io::SafetensorsWriter w;
  w.add("b", VectorView<const float>(b.data(), 1), io::Dtype::kF16);
  w.add("a", VectorView<const float>(a.data(), 2));
  w.set_metadata("format", "pt");
  const std::vector<std::byte> got = w.to_bytes();

  // F32 first (larger elements first), then F16; metadata first in the
  // header, with the checksum: CRC-32C of the canonical header (tensors by
  // name, then metadata without the checksum; strings length-prefixed, every
  // number 8 bytes little-endian) followed by the data.
  const std::string data = f32_bytes({1.0f, -2.0f}) + std::string("\0\x38", 2);
  std::string canonical;
  const auto u64 = [&canonical](std::uint64_t v) {
    for (int i = 0; i < 8; ++i) canonical.push_back(static_cast<char>((v >> (8 * i)) & 0xffu));
  };
  const auto text = [&](const std::string& t) {
    u64(t.size());
    canonical += t;
  };
  u64(2);  // tensors
  text("a"), text("F32"), u64(1), u64(2), u64(0), u64(8);
  text("b"), text("F16"), u64(1), u64(1), u64(8), u64(10);
  u64(1);  // metadata entries besides the checksum
  text("format"), text("pt");
  canonical += data;
  char sum[9];
  std::snprintf(sum, sizeof sum, "%08x", io::crc32c(canonical.data(), canonical.size()));
  std::string header = R"({"__metadata__":{"format":"pt","moekit.checksum":"crc32c:)" +
                       std::string(sum) +
                       R"("},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                       R"("b":{"dtype":"F16","shape":[1],"data_offsets":[8,10]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  const std::string expected = file_bytes(header, data);
  ASSERT_EQ(got.size(), expected.size());
  EXPECT_EQ(std::memcmp(got.data(), expected.data(), expected.size()), 0);
  EXPECT_EQ(header.size() % 8, 0u);
}

TEST(Safetensors, RoundTripOfViewsAndDtypes) {
  std::mt19937 rng(1);
  Mat m(5, 7);  // strided
  m.randomize(rng);
  const std::vector<float> v = random_vector(rng, 9);
  std::vector<float> big = {70000.0f, -1e-8f, 0.1f, std::numeric_limits<float>::infinity()};
  big.push_back(std::numeric_limits<float>::quiet_NaN());

  io::SafetensorsWriter w;
  w.add("m", m.cview());
  w.add("v.bf16", VectorView<const float>(v.data(), 9), io::Dtype::kBF16);
  w.add("v.f16", VectorView<const float>(v.data(), 9), io::Dtype::kF16);
  w.add("big.f16", VectorView<const float>(big.data(), 5), io::Dtype::kF16);
  w.add("cube", {3, 1, 3}, MatrixView<const float>(v.data(), 3, 3));
  w.add("empty", {0, 4}, MatrixView<const float>());
  w.set_metadata("who", "moekit");
  EXPECT_EQ(w.size(), 6);
  const fs::path p = temp_path("roundtrip.safetensors");
  w.write(p);
  EXPECT_FALSE(fs::exists(fs::path(p.string() + ".tmp")));

  const io::SafetensorsReader r(p);
  EXPECT_EQ(r.source(), p.string());
  EXPECT_EQ(r.size(), 6);
  EXPECT_EQ(r.metadata().at("who"), "moekit");
  EXPECT_TRUE(r.contains("m"));
  EXPECT_FALSE(r.contains("n"));
  EXPECT_EQ(r.info("v.bf16").dtype, "BF16");
  EXPECT_EQ(r.info("cube").shape, (io::Shape{3, 1, 3}));
  EXPECT_EQ(r.bytes("v.f16").size(), 18u);
  EXPECT_EQ(r.names(),
            (std::vector<std::string>{"big.f16", "cube", "empty", "m", "v.bf16", "v.f16"}));
  // Every F32 tensor is 4-byte aligned in the buffer.
  EXPECT_EQ(r.info("m").begin % 4, 0u);
  EXPECT_EQ(r.info("cube").begin % 4, 0u);

  Mat m2(5, 7, 2);
  m2.poison();
  r.read("m", m2.view());
  EXPECT_EQ(m2.values(), m.values());
  EXPECT_TRUE(m2.padding_untouched());

  std::vector<float> got(9, kSentinel);
  r.read("v.bf16", VectorView<float>(got.data(), 9));
  for (std::size_t i = 0; i < 9; ++i) {
    EXPECT_EQ(got[i], io::bf16_bits_to_float(io::float_to_bf16_bits(v[i])));
  }
  r.read("v.f16", VectorView<float>(got.data(), 9));
  for (std::size_t i = 0; i < 9; ++i) {
    EXPECT_EQ(got[i], io::f16_bits_to_float(io::float_to_f16_bits(v[i])));
  }
  std::vector<float> big2(5);
  r.read("big.f16", VectorView<float>(big2.data(), 5));
  EXPECT_EQ(big2[0], std::numeric_limits<float>::infinity());  // beyond the F16 range
  EXPECT_EQ(big2[1], -0.0f);
  EXPECT_TRUE(std::signbit(big2[1]));
  EXPECT_EQ(big2[2], io::f16_bits_to_float(0x2e66));
  EXPECT_EQ(big2[3], std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(big2[4]));
  std::vector<float> cube(9);
  r.read({"cube", {3, 1, 3}, MatrixView<float>(cube.data(), 1, 9)});
  EXPECT_TRUE(bits_equal(cube, v));
  r.read({"empty", {0, 4}, MatrixView<float>()});

  // The same bytes open from memory.
  const io::SafetensorsReader mem = io::SafetensorsReader::from_bytes(w.to_bytes(), "mem");
  EXPECT_EQ(mem.names(), r.names());
  EXPECT_EQ(mem.source(), "mem");
}

TEST(Safetensors, ReadsPaddedHeadersAndTolerantJson) {
  // Spaces after the JSON, integers written as 0 and 8, no metadata; an
  // unknown dtype passes the open (its size cannot be checked).
  const std::string header = R"({ "x" : {"shape":[2], "dtype":"F32", "data_offsets":[0, 8]},)"
                             R"( "y": {"dtype":"F99","shape":[3],"data_offsets":[8,11]} }       )";
  const fs::path p = temp_path("padded.safetensors");
  write_bytes(p, file_bytes(header, f32_bytes({3.0f, 4.0f}) + "abc"));
  const io::SafetensorsReader r(p);
  std::vector<float> x(2);
  r.read("x", VectorView<float>(x.data(), 2));
  EXPECT_EQ(x, (std::vector<float>{3.0f, 4.0f}));
  EXPECT_TRUE(r.metadata().empty());
  std::vector<float> y(3, kSentinel);
  const std::string msg =
      expect_error([&] { r.read("y", VectorView<float>(y.data(), 3)); }, Errc::kUnsupported);
  EXPECT_NE(msg.find("'y'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("F99"), std::string::npos) << msg;
  EXPECT_TRUE(all_equal(y, kSentinel));
}

// ---- bad files ------------------------------------------------------------------------------

const std::string kOkEntry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

TEST(Safetensors, RejectsMissingAndUnreadableFiles) {
  const fs::path p = temp_path("does_not_exist.safetensors");
  std::string msg = expect_error([&] { io::SafetensorsReader r(p); }, Errc::kIoError);
  EXPECT_NE(msg.find(p.string()), std::string::npos) << msg;
  const fs::path dir = temp_path("a_directory");
  fs::create_directories(dir);
  msg = expect_error([&] { io::SafetensorsReader r(dir); }, Errc::kIoError);
  EXPECT_NE(msg.find("not a regular file"), std::string::npos) << msg;
}

TEST(Safetensors, RejectsTruncatedFiles) {
  expect_bad_file("empty", "", Errc::kFormatError, "too short");
  expect_bad_file("five_bytes", std::string(5, '\0'), Errc::kFormatError, "too short");
  const std::string good = file_bytes("{" + kOkEntry + "}", f32_bytes({1, 2}));
  // Header length beyond the file.
  expect_bad_file("header_beyond", file_bytes("{" + kOkEntry + "}", "", 1000), Errc::kFormatError,
                  "header length 1000");
  expect_bad_file("huge_header", file_bytes("{}", "", std::uint64_t{1} << 62), Errc::kFormatError,
                  "exceeds");
  // The file cut inside the header, and inside the data.
  expect_bad_file("cut_header", good.substr(0, 20), Errc::kFormatError, "exceeds");
  expect_bad_file("cut_data", good.substr(0, good.size() - 1), Errc::kFormatError,
                  "exceed the data buffer of 7 bytes");
}

TEST(Safetensors, RejectsMalformedHeaders) {
  const std::string data = f32_bytes({1, 2});
  expect_bad_file("not_json", file_bytes("{\"t\": {", data), Errc::kFormatError, "not valid JSON");
  expect_bad_file("garbage", file_bytes("hello", data), Errc::kFormatError, "not valid JSON");
  expect_bad_file("bad_utf8", file_bytes("{\"\xff\":1}", data), Errc::kFormatError,
                  "not valid JSON");
  expect_bad_file("array", file_bytes("[1, 2]", data), Errc::kFormatError, "expected an object");
  expect_bad_file("entry_not_object", file_bytes(R"({"t": 5})", data), Errc::kFormatError,
                  "entry of tensor 't'");
  expect_bad_file("no_dtype", file_bytes(R"({"t":{"shape":[2],"data_offsets":[0,8]}})", data),
                  Errc::kFormatError, "has no \"dtype\"");
  expect_bad_file("no_offsets", file_bytes(R"({"t":{"dtype":"F32","shape":[2]}})", data),
                  Errc::kFormatError, "has no \"data_offsets\"");
  expect_bad_file("dtype_number",
                  file_bytes(R"({"t":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", data),
                  Errc::kFormatError, "\"dtype\" is a JSON number");
  expect_bad_file("negative_dim",
                  file_bytes(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data),
                  Errc::kFormatError, "not a non-negative integer");
  expect_bad_file("float_dim",
                  file_bytes(R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", data),
                  Errc::kFormatError, "not a non-negative integer");
  expect_bad_file("three_offsets",
                  file_bytes(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}})", data),
                  Errc::kFormatError, "is not two non-negative integers");
  expect_bad_file("reversed_offsets",
                  file_bytes(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", data),
                  Errc::kFormatError, "end before they begin");
  expect_bad_file("metadata_not_strings",
                  file_bytes(R"({"__metadata__":{"k":1},)" + kOkEntry + "}", data),
                  Errc::kFormatError, "__metadata__ key 'k'");
  expect_bad_file("duplicate_tensor", file_bytes("{" + kOkEntry + "," + kOkEntry + "}", data),
                  Errc::kFormatError, "tensor 't' appears more than once");
  expect_bad_file(
      "duplicate_field",
      file_bytes(R"({"t":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", data),
      Errc::kFormatError, "key 'dtype' appears more than once");
}

TEST(Safetensors, RejectsOffsetsThatDoNotTileTheBuffer) {
  const std::string data = f32_bytes({1, 2, 3, 4});
  expect_bad_file("overlap",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                             data.substr(0, 12)),
                  Errc::kFormatError,
                  "'a' (data_offsets [0, 8]) and 'b' (data_offsets [4, 12]) overlap");
  expect_bad_file("hole",
                  file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                             data),
                  Errc::kFormatError, "bytes [4, 8) of the data buffer");
  expect_bad_file(
      "hole_first",
      file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data.substr(0, 8)),
      Errc::kFormatError, "before the first tensor");
  expect_bad_file("trailing", file_bytes("{" + kOkEntry + "}", data), Errc::kFormatError,
                  "trailing bytes");
  expect_bad_file(
      "size_mismatch",
      file_bytes(R"({"t":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}})", data.substr(0, 8)),
      Errc::kFormatError, "hold 8 bytes, but dtype F16 and shape [2] need 4");
  expect_bad_file(
      "overflow",
      file_bytes(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                 data.substr(0, 8)),
      Errc::kFormatError, "overflows");
}

TEST(Safetensors, LoadChecksEverythingBeforeWriting) {
  const std::vector<float> a = {1, 2, 3, 4, 5, 6};
  const std::vector<std::int64_t> ids = {7, 8};
  // Written by hand: the writer writes floats only.
  const fs::path p = temp_path("load.safetensors");
  std::string header = R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                       R"("b":{"dtype":"F32","shape":[6],"data_offsets":[24,48]},)"
                       R"("ids":{"dtype":"I64","shape":[2],"data_offsets":[48,64]}})";
  std::string data = f32_bytes({1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6});
  for (std::int64_t id : ids) {
    for (int k = 0; k < 8; ++k) data.push_back(static_cast<char>((id >> (8 * k)) & 0xff));
  }
  write_bytes(p, file_bytes(header, data));
  const io::SafetensorsReader r(p);
  EXPECT_EQ(r.info("ids").dtype, "I64");

  std::vector<float> da(6, kSentinel), db(6, kSentinel), dc(2, kSentinel);
  const auto load = [&](std::vector<io::TensorTarget> targets) { r.load(targets); };
  const io::TensorTarget ta{"a", {2, 3}, {da.data(), 2, 3}};
  const io::TensorTarget tb{"b", {6}, {db.data(), 1, 6}};

  std::string msg = expect_error(
      [&] {
        load({ta, tb, {"missing", {2}, {dc.data(), 1, 2}}});
      },
      Errc::kFormatError);
  EXPECT_NE(msg.find("tensor 'missing' is not in"), std::string::npos) << msg;
  msg = expect_error([&] { load({ta, tb, {"ids", {2}, {dc.data(), 1, 2}}}); }, Errc::kUnsupported);
  EXPECT_NE(msg.find("'ids'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("I64"), std::string::npos) << msg;
  msg = expect_error([&] { load({ta, {"b", {2, 3}, {db.data(), 2, 3}}}); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("'b'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("has shape [6], expected [2, 3]"), std::string::npos) << msg;
  msg = expect_error([&] { load({ta, tb, ta}); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("both name 'a'"), std::string::npos) << msg;
  msg = expect_error([&] { load({ta, {"b", {6}, {db.data(), 2, 2}}}); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("2 x 2"), std::string::npos) << msg;
  msg = expect_error([&] { load({ta, {"b", {6}, {nullptr, 1, 6}}}); }, Errc::kNullPointer);
  EXPECT_TRUE(all_equal(da, kSentinel));
  EXPECT_TRUE(all_equal(db, kSentinel));
  EXPECT_TRUE(all_equal(dc, kSentinel));

  load({ta, tb});
  EXPECT_TRUE(bits_equal(da, a));
  EXPECT_TRUE(bits_equal(db, a));
}

// ---- hostile files (issue 21, item 5) -----------------------------------------------------
//
// Each is rejected quickly, with a short message that never quotes the
// header, and without work or memory beyond a small multiple of its size.

constexpr std::size_t kShortMessage = 400;

std::string expect_short_error(const std::vector<std::byte>& bytes, Errc code,
                               const std::string& needle, io::SafetensorsReadOptions opt = {}) {
  const std::string msg = expect_error(
      [&] { (void)io::SafetensorsReader::from_bytes(bytes, "hostile.safetensors", opt); }, code);
  EXPECT_NE(msg.find(needle), std::string::npos) << msg.substr(0, 1000);
  EXPECT_LT(msg.size(), kShortMessage) << msg.substr(0, 1000);
  return msg;
}

std::vector<std::byte> to_vector(const std::string& s) {
  std::vector<std::byte> v(s.size());
  std::memcpy(v.data(), s.data(), s.size());
  return v;
}

// A shape or data_offsets nested 100,000 deep (a 200 KB file) crashed the
// reader: the message dumped the JSON recursively.
TEST(SafetensorsHostile, DeepNestingStopsAtOnce) {
  const std::size_t depth = 100000;
  for (const std::string field : {"shape", "data_offsets"}) {
    const std::string header = R"({"t":{"dtype":"F32",")" + field +
                               "\":" + std::string(depth, '[') + std::string(depth, ']') + "}}";
    expect_short_error(to_vector(file_bytes(header, "")), Errc::kFormatError,
                       "non-negative integer");
  }
  // Nesting anywhere else: in the metadata, in an unknown key, at the top.
  expect_short_error(to_vector(file_bytes(R"({"__metadata__":{"k":)" + std::string(depth, '[') +
                                              std::string(depth, ']') + "}}",
                                          "")),
                     Errc::kFormatError, "expected a string");
  expect_short_error(to_vector(file_bytes(R"({"t":{"x":)" + std::string(depth, '{'), "")),
                     Errc::kFormatError, "holds a JSON object");
  expect_short_error(to_vector(file_bytes(std::string(depth, '['), "")), Errc::kFormatError,
                     "expected an object");
}

// 99 MiB of empty arrays took 2.9 GiB and went whole into the message. Now a
// header is at most options.max_header_bytes long (16 MiB by default), and
// within that the first array where none belongs ends the parse.
TEST(SafetensorsHostile, LongHeadersAreBoundedAndNeverQuoted) {
  std::string arrays = R"({"t":{"dtype":"F32","shape":[)";
  while (arrays.size() < (2u << 20)) arrays += "[],";
  arrays += "[]]}}";
  expect_short_error(to_vector(file_bytes(arrays, "")), Errc::kFormatError,
                     "not a non-negative integer");
  // Beyond the limit: refused before the header is read.
  EXPECT_EQ(io::SafetensorsReadOptions{}.max_header_bytes, 16u << 20);
  const std::string huge = R"({"__metadata__":{"k":")" + std::string(17u << 20, 'x') + "\"}}";
  expect_short_error(to_vector(file_bytes(huge, "")), Errc::kFormatError,
                     "exceeds the limit of 16777216 bytes");
  io::SafetensorsReadOptions opt;
  opt.max_header_bytes = 1u << 20;
  const std::string big = R"({"__metadata__":{"k":")" + std::string(2u << 20, 'x') + "\"}}";
  expect_short_error(to_vector(file_bytes(big, "")), Errc::kFormatError,
                     "exceeds the limit of 1048576 bytes", opt);
  // A raised limit reads it (a long metadata string is legal).
  opt.max_header_bytes = 4u << 20;
  const io::SafetensorsReader r =
      io::SafetensorsReader::from_bytes(to_vector(file_bytes(big, "")), "big", opt);
  EXPECT_EQ(r.metadata().at("k").size(), 2u << 20);
  opt.max_header_bytes = io::kMaxHeaderBytes + 1;
  expect_short_error(to_vector(file_bytes("{}", "")), Errc::kInvalidArgument, "max_header_bytes",
                     opt);
  // A long name is cut in messages.
  const std::string name(5000, 'n');
  expect_short_error(to_vector(file_bytes(
                         R"({")" + name + R"(":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}})",
                         f32_bytes({1, 2}))),
                     Errc::kFormatError, "(5000 bytes)");
  // A long token in broken JSON is not quoted either.
  expect_short_error(to_vector(file_bytes(R"({"t":)" + std::string(100000, 'z') + "}", "")),
                     Errc::kFormatError, "not valid JSON");
}

// Shapes beyond kMaxRank dimensions, element counts that overflow, extra
// offsets: all rejected as they are read.
TEST(SafetensorsHostile, ElementCountsAreBounded) {
  std::string dims = "1";
  for (int i = 0; i < 64; ++i) dims += ",1";
  expect_short_error(to_vector(file_bytes(
                         R"({"t":{"dtype":"F32","shape":[)" + dims + R"(],"data_offsets":[0,4]}})",
                         f32_bytes({1}))),
                     Errc::kFormatError, "more than 64 dimensions");
  expect_short_error(
      to_vector(file_bytes(
          R"({"t":{"dtype":"F32","shape":[9223372036854775807,9223372036854775807],"data_offsets":[0,4]}})",
          f32_bytes({1}))),
      Errc::kFormatError, "overflows 64 bits");
  expect_short_error(
      to_vector(
          file_bytes(R"({"t":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,4]}})",
                     f32_bytes({1}))),
      Errc::kFormatError, "not a non-negative integer");
  std::string offsets = "0,4";
  for (int i = 0; i < 100000; ++i) offsets += ",4";
  expect_short_error(
      to_vector(file_bytes(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[)" + offsets + "]}}",
                           f32_bytes({1}))),
      Errc::kFormatError, "data_offsets is not two non-negative integers");
}

// The duplicate-key check was quadratic (1 MiB of metadata: 8 s; 20 MiB: not
// done after 10 minutes). 100,000 metadata keys and 50,000 tensors (about
// 4 MiB) with the duplicate last: the maps find it in O(n log n) (a
// quadratic check would spend minutes here).
TEST(SafetensorsHostile, DuplicateKeysAreFoundInLogTime) {
  std::string meta = R"({"__metadata__":{)";
  for (int i = 0; i < 100000; ++i) meta += "\"k" + std::to_string(i) + "\":\"\",";
  meta += R"("k0":""}})";
  expect_short_error(to_vector(file_bytes(meta, "")), Errc::kFormatError,
                     "__metadata__ key 'k0' appears more than once");
  const int n = 50000;
  std::string tensors = "{";
  for (int i = 0; i < n; ++i) {
    tensors += "\"t" + std::to_string(i) + R"(":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)";
  }
  tensors += R"("t0":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})";
  expect_short_error(to_vector(file_bytes(tensors, "")), Errc::kFormatError,
                     "tensor 't0' appears more than once");
  // And without the duplicate, all of them load.
  tensors.resize(tensors.rfind(",\"t0\""));
  tensors += "}";
  EXPECT_EQ(io::SafetensorsReader::from_bytes(to_vector(file_bytes(tensors, ""))).size(), n);
}

// Opening a FIFO waited for a writer forever; devices and directories are
// refused the same way.
TEST(SafetensorsHostile, NonRegularFilesAreRefusedWithoutBlocking) {
  const fs::path fifo = temp_path("fifo.safetensors");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  std::string msg = expect_error([&] { io::SafetensorsReader r(fifo); }, Errc::kIoError);
  EXPECT_NE(msg.find("not a regular file (a FIFO)"), std::string::npos) << msg;
  msg = expect_error([&] { io::SafetensorsReader r("/dev/null"); }, Errc::kIoError);
  EXPECT_NE(msg.find("not a regular file (a device)"), std::string::npos) << msg;
  fs::remove(fifo);
}

// A file truncated after the reader opened it killed the process with
// SIGBUS (it was mapped). Now the read that finds it short says so.
TEST(SafetensorsHostile, AFileTruncatedAfterOpeningIsAnErrorNotACrash) {
  std::vector<float> v(100000);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  io::SafetensorsWriter w;
  w.add("v", VectorView<const float>(v.data(), static_cast<index_t>(v.size())));
  const fs::path p = temp_path("shrinks.safetensors");
  w.write(p);
  const io::SafetensorsReader r(p);
  fs::resize_file(p, fs::file_size(p) / 2);
  std::vector<float> got(v.size(), kSentinel);
  const std::string msg = expect_error(
      [&] { r.read("v", VectorView<float>(got.data(), static_cast<index_t>(got.size()))); },
      Errc::kIoError);
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  EXPECT_NE(msg.find(p.string()), std::string::npos) << msg;
  EXPECT_THROW((void)r.bytes("v"), moekit::Error);
  // Truncated before the open: the header check catches it.
  EXPECT_THROW(io::SafetensorsReader again(p), moekit::Error);
}

// ---- checksums (issue 21, item 7) -----------------------------------------------------------

TEST(SafetensorsChecksum, Crc32cHasTheStandardCheckValue) {
  EXPECT_EQ(io::crc32c("123456789", 9), 0xe3069283u);
  EXPECT_EQ(io::crc32c("", 0), 0u);
  // Piece by piece equals all at once, at every split.
  const std::string text = "moekit checks what it writes, byte by byte.";
  for (std::size_t cut = 0; cut <= text.size(); ++cut) {
    io::Crc32c c;
    c.update(text.data(), cut);
    c.update(text.data() + cut, text.size() - cut);
    ASSERT_EQ(c.value(), io::crc32c(text.data(), text.size())) << cut;
  }
}

// A flipped data byte loaded silently. Now every file moekit writes records
// a checksum, and any changed byte is caught at open (data, shape, name or
// metadata), unless verification is turned off.
TEST(SafetensorsChecksum, AFlippedByteIsCaught) {
  std::vector<float> v = {1.0f, 2.0f, 3.0f, 4.0f};
  io::SafetensorsWriter w;
  w.add("weight", VectorView<const float>(v.data(), 4));
  w.set_metadata("step", "1000");
  const std::vector<std::byte> good = w.to_bytes();
  const io::SafetensorsReader ok = io::SafetensorsReader::from_bytes(good);
  EXPECT_TRUE(ok.checksum_verified());
  EXPECT_EQ(ok.metadata().at("moekit.checksum").substr(0, 7), "crc32c:");
  const std::string text(reinterpret_cast<const char*>(good.data()), good.size());
  const std::size_t data = good.size() - 16;
  // A bit in the data, a digit of the step, a letter of the name.
  for (const std::size_t at : {data + 5, text.find("1000") + 3, text.find("weight") + 1}) {
    std::vector<std::byte> bad = good;
    bad[at] ^= std::byte{0x01};
    const std::string msg = expect_short_error(bad, Errc::kFormatError, "is corrupted");
    EXPECT_NE(msg.find("verify_checksum = false"), std::string::npos) << msg;
    io::SafetensorsReadOptions skip;
    skip.verify_checksum = false;
    const io::SafetensorsReader r = io::SafetensorsReader::from_bytes(bad, "bad", skip);
    EXPECT_FALSE(r.checksum_verified());
  }
  // A malformed checksum entry is named.
  std::string forged = text;
  forged.replace(forged.find("crc32c:"), 7, "crc99c:");
  expect_short_error(to_vector(forged), Errc::kFormatError, "not \"crc32c:\" and 8 hex digits");
  // The key is the writer's own.
  const std::string msg = expect_error(
      [&] { w.set_metadata("moekit.checksum", "crc32c:00000000"); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("reserved"), std::string::npos) << msg;
}

// Files from other writers have no checksum and load as before; so does a
// moekit file after a tool rewrote its header in another JSON layout (the
// checksum covers what the header says, not its spacing or order).
TEST(SafetensorsChecksum, ForeignFilesAndReformattedHeadersLoad) {
  const std::string header = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const io::SafetensorsReader foreign =
      io::SafetensorsReader::from_bytes(to_vector(file_bytes(header, f32_bytes({3, 4}))));
  EXPECT_FALSE(foreign.checksum_verified());
  EXPECT_TRUE(foreign.metadata().empty());

  std::vector<float> v = {1.0f, 2.0f};
  io::SafetensorsWriter w;
  w.add("x", VectorView<const float>(v.data(), 2));
  const io::SafetensorsReader mine = io::SafetensorsReader::from_bytes(w.to_bytes());
  const std::string sum = mine.metadata().at("moekit.checksum");
  const std::string reordered = R"({ "x" : {"shape":[2], "data_offsets":[0,8], "dtype":"F32"},)"
                                R"( "__metadata__": {"moekit.checksum": ")" +
                                sum + "\"}}";
  const io::SafetensorsReader again =
      io::SafetensorsReader::from_bytes(to_vector(file_bytes(reordered, f32_bytes({1, 2}))));
  EXPECT_TRUE(again.checksum_verified());
}

TEST(Safetensors, WriterRejectsBadInputWithoutAddingAnything) {
  const std::vector<float> v = {1, 2, 3, 4};
  io::SafetensorsWriter w;
  w.add("x", VectorView<const float>(v.data(), 4));
  const auto bad = [&](std::vector<io::TensorSource> s, Errc code, const std::string& needle) {
    const std::string msg = expect_error([&] { w.add(s); }, code);
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    EXPECT_EQ(w.size(), 1);
  };
  const io::TensorSource ok{"y", {4}, {v.data(), 1, 4}};
  bad({ok, {"x", {4}, {v.data(), 1, 4}}}, Errc::kInvalidArgument, "'x' was already added");
  bad({ok, ok}, Errc::kInvalidArgument, "both name 'y'");
  bad({ok, {"__metadata__", {4}, {v.data(), 1, 4}}}, Errc::kInvalidArgument, "reserved");
  bad({ok, {"bad\xc3", {4}, {v.data(), 1, 4}}}, Errc::kInvalidArgument, "UTF-8");
  bad({ok, {"z", {2, 3}, {v.data(), 1, 4}}}, Errc::kShapeMismatch, "shape [2, 3]");
  bad({ok, {"z", {-4}, {v.data(), 1, 4}}}, Errc::kInvalidArgument, "invalid shape [-4]");

  const fs::path p = temp_path("no_such_dir") / "f.safetensors";
  const std::string msg = expect_error([&] { w.write(p); }, Errc::kIoError);
  EXPECT_NE(msg.find("no_such_dir"), std::string::npos) << msg;
}

// ---- components ---------------------------------------------------------------------------

using S = moekit::MoeSpec<4, 2>;

// Owning buffers for an MoeLayer's parameters.
struct MoeBuffers {
  std::vector<float> w_gate, gate_bias, selection_bias, w1, w3, w2, s1, s3, s2;
  index_t d, f, fs;
  int E, n_shared;
  MoeBuffers(const moekit::cpu::MoeLayer<S>& layer, bool biases, std::mt19937* rng) {
    const auto& c = layer.config();
    d = c.d_model, f = c.d_ff, fs = layer.d_ff_shared(), E = S::num_experts;
    n_shared = c.num_shared;
    const bool g = layer.gated();
    const auto make = [&](index_t n) {
      return rng != nullptr ? random_vector(*rng, n) : std::vector<float>(to_size(n), kSentinel);
    };
    w_gate = make(E * d);
    if (biases) gate_bias = make(E), selection_bias = make(E);
    w1 = make(E * f * d), w2 = make(E * d * f);
    if (g) w3 = make(E * f * d);
    s1 = make(n_shared * fs * d), s2 = make(n_shared * d * fs);
    if (g) s3 = make(n_shared * fs * d);
  }
  static MatrixView<float> m(std::vector<float>& v, index_t r, index_t c) {
    return v.empty() ? MatrixView<float>() : MatrixView<float>(v.data(), r, c);
  }
  io::MutableMoeLayerParams params() {
    const index_t ns = n_shared;
    return {m(w_gate, E, d),
            {gate_bias.data(), static_cast<index_t>(gate_bias.size())},
            {selection_bias.data(), static_cast<index_t>(selection_bias.size())},
            {m(w1, E * f, d), m(w3, E * f, d), m(w2, E * d, f)},
            {m(s1, ns * fs, d), m(s3, ns * fs, d), m(s2, ns * d, fs)}};
  }
  std::vector<std::vector<float>*> all() {
    return {&w_gate, &gate_bias, &selection_bias, &w1, &w3, &w2, &s1, &s3, &s2};
  }
};

moekit::cpu::MoeLayerConfig gated_config(int shared) {
  moekit::cpu::MoeLayerConfig c;
  c.d_model = 6;
  c.d_ff = 5;
  c.kind = moekit::FfnKind::kGated;
  c.activation = moekit::Activation::kSilu;
  c.num_shared = shared;
  c.d_ff_shared = 3;
  return c;
}

std::vector<float> run_layer(const moekit::cpu::MoeLayer<S>& layer,
                             const moekit::cpu::MoeLayerParams& p, const std::vector<float>& x,
                             index_t T) {
  moekit::cpu::MoeLayerStorage<S> st(layer, T);
  const index_t d = layer.config().d_model;
  std::vector<float> y(to_size(T * d));
  layer.forward({x.data(), T, d}, p, st.state(), {y.data(), T, d}, nullptr, st.workspace());
  return y;
}

TEST(SafetensorsWeights, MoeLayerRoundTrip) {
  std::mt19937 rng(7);
  const moekit::cpu::MoeLayer<S> layer(gated_config(2));
  MoeBuffers src(layer, true, &rng), dst(layer, true, nullptr);
  io::SafetensorsWriter w;
  io::save_weights(w, layer, moekit::cpu::MoeLayerParams(src.params()), "blocks.0.moe.");
  EXPECT_EQ(w.size(), 3 + 4 * 3 + 2 * 3);
  const fs::path p = temp_path("moe.safetensors");
  w.write(p);
  const io::SafetensorsReader r(p);
  EXPECT_EQ(r.info("blocks.0.moe.gate.weight").shape, (io::Shape{4, 6}));
  EXPECT_EQ(r.info("blocks.0.moe.gate.bias").shape, (io::Shape{4}));
  EXPECT_EQ(r.info("blocks.0.moe.gate.selection_bias").shape, (io::Shape{4}));
  EXPECT_EQ(r.info("blocks.0.moe.experts.3.w1.weight").shape, (io::Shape{5, 6}));
  EXPECT_EQ(r.info("blocks.0.moe.experts.3.w3.weight").shape, (io::Shape{5, 6}));
  EXPECT_EQ(r.info("blocks.0.moe.experts.3.w2.weight").shape, (io::Shape{6, 5}));
  EXPECT_EQ(r.info("blocks.0.moe.shared_experts.1.w1.weight").shape, (io::Shape{3, 6}));
  EXPECT_EQ(r.info("blocks.0.moe.shared_experts.1.w2.weight").shape, (io::Shape{6, 3}));
  // Expert 2's W2 is rows [2 d, 3 d) of w2.
  std::vector<float> w2_e2(30);
  r.read("blocks.0.moe.experts.2.w2.weight", MatrixView<float>(w2_e2.data(), 6, 5));
  EXPECT_TRUE(bits_equal(w2_e2, std::vector<float>(src.w2.begin() + 60, src.w2.begin() + 90)));

  io::load_weights(r, layer, dst.params(), "blocks.0.moe.");
  for (std::size_t i = 0; i < src.all().size(); ++i) {
    EXPECT_TRUE(bits_equal(*src.all()[i], *dst.all()[i])) << "buffer " << i;
  }
  const std::vector<float> x = random_vector(rng, 9 * 6);
  EXPECT_TRUE(
      bits_equal(run_layer(layer, src.params(), x, 9), run_layer(layer, dst.params(), x, 9)));
}

TEST(SafetensorsWeights, MoeLayerBf16AndStridedDestinations) {
  std::mt19937 rng(8);
  const moekit::cpu::MoeLayer<S> layer(gated_config(0));
  MoeBuffers src(layer, false, &rng);
  io::SafetensorsWriter w;
  io::save_weights(w, layer, moekit::cpu::MoeLayerParams(src.params()), "", io::Dtype::kBF16);
  const io::SafetensorsReader r = io::SafetensorsReader::from_bytes(w.to_bytes());
  EXPECT_EQ(r.info("experts.0.w1.weight").dtype, "BF16");
  // Strided destinations: padding untouched, values the BF16-rounded ones.
  Mat gate(4, 6), w1(20, 6), w3(20, 6), w2(24, 5);
  io::load_weights(
      r, layer, io::MutableMoeLayerParams{gate.view(), {}, {}, {w1.view(), w3.view(), w2.view()}},
      "");
  EXPECT_TRUE(gate.padding_untouched() && w1.padding_untouched() && w2.padding_untouched());
  for (index_t i = 0; i < 20 * 6; ++i) {
    const float want = io::bf16_bits_to_float(io::float_to_bf16_bits(src.w3[to_size(i)]));
    ASSERT_EQ(w3.at(i / 6, i % 6), want);
  }
}

TEST(SafetensorsWeights, MoeLayerLoadIsAllOrNothing) {
  std::mt19937 rng(9);
  const moekit::cpu::MoeLayer<S> layer(gated_config(1));
  MoeBuffers src(layer, true, &rng), dst(layer, true, nullptr);
  // A file whose last expert's w2 has the wrong shape: nothing is loaded.
  io::SafetensorsWriter w;
  std::vector<io::TensorSource> tensors =
      io::weight_sources(layer, moekit::cpu::MoeLayerParams(src.params()), "m.");
  for (auto& t : tensors) {
    if (t.name == "m.experts.3.w2.weight") t.shape = {5, 6}, t.view = {src.w2.data(), 5, 6};
  }
  w.add(tensors);
  const io::SafetensorsReader r = io::SafetensorsReader::from_bytes(w.to_bytes(), "bad.st");
  std::string msg =
      expect_error([&] { io::load_weights(r, layer, dst.params(), "m."); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("'m.experts.3.w2.weight' in 'bad.st' has shape [5, 6], expected [6, 5]"),
            std::string::npos)
      << msg;
  for (auto* v : dst.all()) EXPECT_TRUE(all_equal(*v, kSentinel));

  // A missing tensor, and a wrong prefix.
  msg = expect_error([&] { io::load_weights(r, layer, dst.params(), "n."); }, Errc::kFormatError);
  EXPECT_NE(msg.find("'n.gate.weight' is not in"), std::string::npos) << msg;
  for (auto* v : dst.all()) EXPECT_TRUE(all_equal(*v, kSentinel));

  // Destinations checked against the layer, naming the field.
  io::MutableMoeLayerParams small = dst.params();
  small.experts.w1 = small.experts.w1.middle_rows(0, 3);
  msg = expect_error([&] { io::load_weights(r, layer, small, "m."); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("dst.experts.w1"), std::string::npos) << msg;
  io::MutableMoeLayerParams no_shared = dst.params();
  no_shared.shared = {};
  msg = expect_error([&] { io::load_weights(r, layer, no_shared, "m."); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("dst.shared.w1"), std::string::npos) << msg;
  for (auto* v : dst.all()) EXPECT_TRUE(all_equal(*v, kSentinel));
}

TEST(SafetensorsWeights, MixtralNames) {
  std::mt19937 rng(10);
  const moekit::cpu::MoeLayer<S> layer(io::mixtral_moe_layer_config(6, 5));
  MoeBuffers src(layer, false, &rng), dst(layer, false, nullptr);
  io::SafetensorsWriter w;
  io::save_mixtral_moe_layer(w, layer, src.params(), 3);
  const io::SafetensorsReader r = io::SafetensorsReader::from_bytes(w.to_bytes());
  EXPECT_EQ(r.size(), 1 + 4 * 3);
  EXPECT_TRUE(r.contains("model.layers.3.block_sparse_moe.gate.weight"));
  EXPECT_EQ(r.info("model.layers.3.block_sparse_moe.experts.1.w1.weight").shape, (io::Shape{5, 6}));
  EXPECT_EQ(r.info("model.layers.3.block_sparse_moe.experts.1.w2.weight").shape, (io::Shape{6, 5}));
  io::load_mixtral_moe_layer(r, layer, dst.params(), 3);
  for (std::size_t i = 0; i < src.all().size(); ++i) {
    EXPECT_TRUE(bits_equal(*src.all()[i], *dst.all()[i])) << "buffer " << i;
  }
  // Layer 4 is not in the file.
  MoeBuffers other(layer, false, nullptr);
  std::string msg = expect_error([&] { io::load_mixtral_moe_layer(r, layer, other.params(), 4); },
                                 Errc::kFormatError);
  EXPECT_NE(msg.find("model.layers.4.block_sparse_moe.gate.weight"), std::string::npos) << msg;
  // The map has no router bias.
  MoeBuffers biased(layer, true, nullptr);
  msg = expect_error([&] { io::load_mixtral_moe_layer(r, layer, biased.params(), 3); },
                     Errc::kInvalidArgument);
  EXPECT_NE(msg.find("names.gate_bias"), std::string::npos) << msg;
  for (auto* v : biased.all()) EXPECT_TRUE(all_equal(*v, kSentinel));
  // Layers that would not compute Mixtral's block are refused.
  moekit::cpu::MoeLayerConfig c = io::mixtral_moe_layer_config(6, 5);
  c.router.gating.renormalize = false;
  msg = expect_error([&] { io::check_mixtral_layer(moekit::cpu::MoeLayer<S>(c)); },
                     Errc::kInvalidArgument);
  EXPECT_NE(msg.find("renormalize = 0"), std::string::npos) << msg;
  c = io::mixtral_moe_layer_config(6, 5);
  c.activation = moekit::Activation::kGeluTanh;
  expect_error([&] { io::check_mixtral_layer(moekit::cpu::MoeLayer<S>(c)); },
               Errc::kInvalidArgument);
  c = io::mixtral_moe_layer_config(6, 5);
  c.router.gating.rule = moekit::GatingRule::kTopKSoftmax;  // the same weights
  io::check_mixtral_layer(moekit::cpu::MoeLayer<S>(c));
}

TEST(SafetensorsWeights, CustomNameMap) {
  // A Qwen-MoE-like map: gate_proj / up_proj / down_proj.
  std::mt19937 rng(11);
  const moekit::cpu::MoeLayer<S> layer(io::mixtral_moe_layer_config(6, 5));
  MoeBuffers src(layer, false, &rng), dst(layer, false, nullptr);
  io::MoeLayerNames names;
  names.gate_weight = "mlp.gate.weight";
  names.expert_w1 = "mlp.experts.{e}.gate_proj.weight";
  names.expert_w3 = "mlp.experts.{e}.up_proj.weight";
  names.expert_w2 = "mlp.experts.{e}.down_proj.weight";
  io::SafetensorsWriter w;
  io::save_weights(w, layer, moekit::cpu::MoeLayerParams(src.params()), names);
  const io::SafetensorsReader r = io::SafetensorsReader::from_bytes(w.to_bytes());
  EXPECT_TRUE(r.contains("mlp.experts.2.down_proj.weight"));
  io::load_weights(r, layer, dst.params(), names);
  EXPECT_TRUE(bits_equal(src.w3, dst.w3));
}

TEST(SafetensorsWeights, ExpertFfnPlainRoundTrip) {
  std::mt19937 rng(12);
  const moekit::cpu::ExpertFfn<S> ffn({.d_model = 4, .d_ff = 3});
  const std::vector<float> w1 = random_vector(rng, 12 * 4), w2 = random_vector(rng, 16 * 3);
  io::SafetensorsWriter w;
  io::save_weights(w, ffn, moekit::cpu::ExpertWeights{{w1.data(), 12, 4}, {}, {w2.data(), 16, 3}},
                   "ffn.");
  const io::SafetensorsReader r = io::SafetensorsReader::from_bytes(w.to_bytes());
  EXPECT_EQ(r.names().size(), 8u);
  EXPECT_EQ(r.info("ffn.3.w2.weight").shape, (io::Shape{4, 3}));
  std::vector<float> d1(w1.size(), kSentinel), d2(w2.size(), kSentinel), d3(12, kSentinel);
  // kPlain: a W3 destination is refused.
  const std::string msg = expect_error(
      [&] {
        io::load_weights(
            r, ffn,
            io::MutableExpertWeights{{d1.data(), 12, 4}, {d3.data(), 3, 4}, {d2.data(), 16, 3}},
            "ffn.");
      },
      Errc::kInvalidArgument);
  EXPECT_NE(msg.find("dst.w3"), std::string::npos) << msg;
  EXPECT_TRUE(all_equal(d1, kSentinel));
  io::load_weights(r, ffn, io::MutableExpertWeights{{d1.data(), 12, 4}, {}, {d2.data(), 16, 3}},
                   "ffn.");
  EXPECT_TRUE(bits_equal(d1, w1));
  EXPECT_TRUE(bits_equal(d2, w2));
}

TEST(SafetensorsWeights, LoraLinearAndBankRoundTrip) {
  using L = moekit::LoraSpec<2>;
  std::mt19937 rng(13);
  const moekit::cpu::LoraLinear<L> lora({.d_in = 5, .d_out = 3, .alpha = 4});
  const std::vector<float> w = random_vector(rng, 15), bias = random_vector(rng, 3),
                           a = random_vector(rng, 10), b = random_vector(rng, 6);
  io::SafetensorsWriter out;
  io::save_weights(out, lora,
                   moekit::cpu::LoraWeights{
                       {w.data(), 3, 5}, {bias.data(), 3}, {a.data(), 2, 5}, {b.data(), 3, 2}},
                   "q_proj.");
  // Adapter-only save (no base): only lora_A / lora_B.
  io::save_weights(out, lora, moekit::cpu::LoraWeights{{}, {}, {a.data(), 2, 5}, {b.data(), 3, 2}},
                   "k_proj.");

  const moekit::cpu::LoraBank<L> bank({.d_in = 5, .d_out = 3, .num_adapters = 3});
  const std::vector<float> ba = random_vector(rng, 3 * 2 * 5), bb = random_vector(rng, 3 * 3 * 2);
  io::save_weights(out, bank,
                   moekit::cpu::LoraWeights{{}, {}, {ba.data(), 6, 5}, {bb.data(), 9, 2}}, "bank.");
  const io::SafetensorsReader r = io::SafetensorsReader::from_bytes(out.to_bytes());
  EXPECT_EQ(r.info("q_proj.weight").shape, (io::Shape{3, 5}));
  EXPECT_EQ(r.info("q_proj.bias").shape, (io::Shape{3}));
  EXPECT_EQ(r.info("q_proj.lora_A.weight").shape, (io::Shape{2, 5}));
  EXPECT_EQ(r.info("q_proj.lora_B.weight").shape, (io::Shape{3, 2}));
  EXPECT_FALSE(r.contains("k_proj.weight"));
  EXPECT_EQ(r.info("bank.adapters.2.lora_A.weight").shape, (io::Shape{2, 5}));
  EXPECT_EQ(r.info("bank.adapters.2.lora_B.weight").shape, (io::Shape{3, 2}));

  std::vector<float> w2(15, kSentinel), bias2(3, kSentinel), a2(10, kSentinel), b2(6, kSentinel);
  const io::MutableLoraWeights dst{
      {w2.data(), 3, 5}, {bias2.data(), 3}, {a2.data(), 2, 5}, {b2.data(), 3, 2}};
  // k_proj has no base weight in the file: nothing is loaded.
  const std::string msg =
      expect_error([&] { io::load_weights(r, lora, dst, "k_proj."); }, Errc::kFormatError);
  EXPECT_NE(msg.find("'k_proj.weight'"), std::string::npos) << msg;
  EXPECT_TRUE(all_equal(a2, kSentinel));
  // A rank mismatch is named by the destination check.
  expect_error(
      [&] {
        io::load_weights(r, lora,
                         io::MutableLoraWeights{{}, {}, {a2.data(), 1, 5}, {b2.data(), 3, 2}},
                         "q_proj.");
      },
      Errc::kShapeMismatch);
  io::load_weights(r, lora, dst, "q_proj.");
  EXPECT_TRUE(bits_equal(w2, w) && bits_equal(bias2, bias) && bits_equal(a2, a) &&
              bits_equal(b2, b));

  std::vector<float> ba2(ba.size(), kSentinel), bb2(bb.size(), kSentinel);
  io::load_weights(r, bank, io::MutableLoraWeights{{}, {}, {ba2.data(), 6, 5}, {bb2.data(), 9, 2}},
                   "bank.");
  EXPECT_TRUE(bits_equal(ba2, ba) && bits_equal(bb2, bb));
}

TEST(SafetensorsWeights, ExpertLoraRoundTrip) {
  using L = moekit::LoraSpec<2>;
  std::mt19937 rng(14);
  const moekit::cpu::ExpertLora<S, L> lora(
      {.d_model = 6, .d_ff = 5, .kind = moekit::FfnKind::kGated, .alpha = 2});
  constexpr index_t E = 4, R = 2, d = 6, f = 5;
  const std::vector<float> a1 = random_vector(rng, E * R * d), b1 = random_vector(rng, E * f * R),
                           a2 = random_vector(rng, E * R * f), b2 = random_vector(rng, E * d * R);
  io::SafetensorsWriter out;
  io::save_weights(out, lora,
                   moekit::cpu::ExpertAdapters<const float>{.a1 = {a1.data(), E * R, d},
                                                            .b1 = {b1.data(), E * f, R},
                                                            .a2 = {a2.data(), E * R, f},
                                                            .b2 = {b2.data(), E * d, R}},
                   "model.layers.0.block_sparse_moe.experts.");
  const io::SafetensorsReader r = io::SafetensorsReader::from_bytes(out.to_bytes());
  EXPECT_EQ(r.size(), 4 * 4);  // no W3 adapter
  EXPECT_EQ(r.info("model.layers.0.block_sparse_moe.experts.3.w1.lora_A.weight").shape,
            (io::Shape{2, 6}));
  EXPECT_EQ(r.info("model.layers.0.block_sparse_moe.experts.3.w2.lora_A.weight").shape,
            (io::Shape{2, 5}));
  EXPECT_EQ(r.info("model.layers.0.block_sparse_moe.experts.3.w2.lora_B.weight").shape,
            (io::Shape{6, 2}));
  std::vector<float> c1(a1.size(), kSentinel), d1(b1.size(), kSentinel), c2(a2.size(), kSentinel),
      d2(b2.size(), kSentinel), c3(a1.size(), kSentinel), d3(b1.size(), kSentinel);
  const moekit::cpu::ExpertAdapters<float> dst{.a1 = {c1.data(), E * R, d},
                                               .b1 = {d1.data(), E * f, R},
                                               .a2 = {c2.data(), E * R, f},
                                               .b2 = {d2.data(), E * d, R}};
  // Asking for the W3 adapters the file lacks loads nothing.
  moekit::cpu::ExpertAdapters<float> with_w3 = dst;
  with_w3.a3 = {c3.data(), E * R, d};
  with_w3.b3 = {d3.data(), E * f, R};
  expect_error(
      [&] { io::load_weights(r, lora, with_w3, "model.layers.0.block_sparse_moe.experts."); },
      Errc::kFormatError);
  EXPECT_TRUE(all_equal(c1, kSentinel) && all_equal(c3, kSentinel));
  // Half an adapter is refused.
  moekit::cpu::ExpertAdapters<float> half = dst;
  half.b2 = {};
  const std::string msg =
      expect_error([&] { io::load_weights(r, lora, half, ""); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("dst.a2 and dst.b2"), std::string::npos) << msg;
  io::load_weights(r, lora, dst, "model.layers.0.block_sparse_moe.experts.");
  EXPECT_TRUE(bits_equal(c1, a1) && bits_equal(d1, b1) && bits_equal(c2, a2) && bits_equal(d2, b2));
}

TEST(SafetensorsWeights, TaskHeadsRoundTrip) {
  using H = moekit::HeadSpec<3>;
  std::mt19937 rng(15);
  const moekit::cpu::TaskHeads<H> heads({.d_model = 4, .classes = {2, 5, 3}});
  const std::vector<float> w = random_vector(rng, 10 * 4), b = random_vector(rng, 10);
  io::SafetensorsWriter out;
  io::save_weights(out, heads, moekit::cpu::HeadWeights{{w.data(), 10, 4}, {b.data(), 10}},
                   "heads.", io::Dtype::kF32);
  const moekit::cpu::TaskHeads<H> no_bias({.d_model = 4, .classes = {2, 5, 3}, .bias = false});
  io::save_weights(out, no_bias, moekit::cpu::HeadWeights{{w.data(), 10, 4}, {}}, "plain.");
  const io::SafetensorsReader r = io::SafetensorsReader::from_bytes(out.to_bytes());
  EXPECT_EQ(r.info("heads.1.weight").shape, (io::Shape{5, 4}));
  EXPECT_EQ(r.info("heads.2.bias").shape, (io::Shape{3}));
  EXPECT_FALSE(r.contains("plain.0.bias"));
  std::vector<float> w2(w.size(), kSentinel), b2(b.size(), kSentinel);
  // Heads with a bias need b.
  const std::string msg = expect_error(
      [&] {
        io::load_weights(r, heads, io::MutableHeadWeights{{w2.data(), 10, 4}, {}}, "heads.");
      },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("dst.b"), std::string::npos) << msg;
  io::load_weights(r, heads, io::MutableHeadWeights{{w2.data(), 10, 4}, {b2.data(), 10}}, "heads.");
  EXPECT_TRUE(bits_equal(w2, w) && bits_equal(b2, b));
  // Head 1's bias is entries [2, 7).
  std::vector<float> b1(5);
  r.read("heads.1.bias", VectorView<float>(b1.data(), 5));
  EXPECT_TRUE(bits_equal(b1, std::vector<float>(b.begin() + 2, b.begin() + 7)));
}

TEST(SafetensorsWeights, SeveralComponentsLoadAllOrNothing) {
  using H = moekit::HeadSpec<1>;
  std::mt19937 rng(16);
  const moekit::cpu::MoeLayer<S> layer(gated_config(0));
  const moekit::cpu::TaskHeads<H> heads({.d_model = 6, .classes = {3}});
  MoeBuffers src(layer, false, &rng), dst(layer, false, nullptr);
  const std::vector<float> hw = random_vector(rng, 18), hb = random_vector(rng, 3);
  io::SafetensorsWriter out;
  io::save_weights(out, layer, moekit::cpu::MoeLayerParams(src.params()), "moe.");
  const io::SafetensorsReader r = io::SafetensorsReader::from_bytes(out.to_bytes());
  std::vector<float> hw2(18, kSentinel), hb2(3, kSentinel);
  std::vector<io::TensorTarget> all = io::weight_targets(layer, dst.params(), "moe.");
  const std::vector<io::TensorTarget> head_targets =
      io::weight_targets(heads, io::MutableHeadWeights{{hw2.data(), 3, 6}, {hb2.data(), 3}}, "h.");
  all.insert(all.end(), head_targets.begin(), head_targets.end());
  expect_error([&] { io::load_tensors(r, all); }, Errc::kFormatError);  // no heads in the file
  for (auto* v : dst.all()) EXPECT_TRUE(all_equal(*v, kSentinel));
}

}  // namespace
