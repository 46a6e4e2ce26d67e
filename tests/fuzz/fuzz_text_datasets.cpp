// Fuzz target: the labelled-text readers of moekit/text/datasets.hpp (the
// record parser behind read_orange_tab and read_csv) on arbitrary bytes, with
// and without a fixed class list. A rejected file throws moekit::Error; one
// that is accepted is a consistent corpus: a label per text, each naming one
// of the classes.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "moekit/text/datasets.hpp"

namespace text = moekit::text;

namespace {

void check(const text::LabelledTexts& d) {
  if (d.texts.size() != d.labels.size() || d.texts.empty() || d.classes.empty()) __builtin_trap();
  for (const std::int32_t l : d.labels) {
    if (l < 0 || l >= d.num_classes()) __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  const std::vector<std::string> none, fixed = {"a", "b", "pos"};
  for (const auto* classes : {&none, &fixed}) {
    try {
      check(
          text::detail::parse_delimited(bytes, "fuzz.tab", '\t', 3, "Text", "Category", *classes));
    } catch (const moekit::Error&) {
    }
    try {
      check(text::detail::parse_delimited(bytes, "fuzz.csv", ',', 1, "text", "category", *classes));
    } catch (const moekit::Error&) {
    }
  }
  return 0;
}
