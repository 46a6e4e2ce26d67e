// Fuzz target: the JSON reader of moekit/train/metrics.hpp (read_metrics, the
// JSON Lines log of a training run, which a resumed run reads back) on
// arbitrary text. A rejected log throws moekit::Error; nothing else may
// happen.
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "moekit/train/metrics.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  try {
    (void)moekit::train::read_metrics(in, "fuzz.jsonl");
  } catch (const moekit::Error&) {
  }
  return 0;
}
