// A user's program with moekit::io: a matrix written to a safetensors file
// and read back, bit for bit. Usage: consumer_io <folder for the file>
#include <moekit/io/safetensors.hpp>

#include <cstdio>
#include <filesystem>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: consumer_io <folder>\n");
    return 2;
  }
  const std::filesystem::path file = std::filesystem::path(argv[1]) / "consumer_io.safetensors";
  std::vector<float> w{0.5f, -1.25f, 3.0f, 1e-3f, -0.0f, 42.0f};
  moekit::io::SafetensorsWriter out;
  out.add("proj.weight", moekit::MatrixView<const float>(w.data(), 2, 3));
  out.write(file);

  std::vector<float> back(w.size(), -7.0f);
  const moekit::io::SafetensorsReader in(file);
  in.read("proj.weight", moekit::MatrixView<float>(back.data(), 2, 3));
  for (std::size_t i = 0; i < w.size(); ++i) {
    if (back[i] != w[i]) {
      std::printf("element %zu read back as %g, written %g\n", i, static_cast<double>(back[i]),
                  static_cast<double>(w[i]));
      return 1;
    }
  }
  std::printf("moekit %s io consumer: %zu floats through %s\n", MOEKIT_VERSION_STRING, w.size(),
              file.filename().c_str());
  return 0;
}
