// Fuzz target: the CSV reader of moekit/train/data.hpp (parse_csv, the text
// behind read_csv) on arbitrary text, with each header mode. A rejected file
// throws moekit::Error; one that is accepted is a consistent dataset.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "moekit/train/data.hpp"

namespace train = moekit::train;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  for (const train::CsvHeader header :
       {train::CsvHeader::kDetect, train::CsvHeader::kPresent, train::CsvHeader::kAbsent}) {
    try {
      const train::Dataset d = train::parse_csv(text, "fuzz.csv", {.header = header});
      train::check_dataset(d, "d");
      if (d.features < 1 || d.x.size() != static_cast<std::size_t>(d.size() * d.features)) {
        __builtin_trap();
      }
    } catch (const moekit::Error&) {
    }
  }
  return 0;
}
