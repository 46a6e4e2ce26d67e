// The checker of text.tokenizer_parity (tokenizer_parity.py): encodes every
// case of the JSON file with moekit's WordPiece tokenizer and compares the
// ids with the reference's. Usage: tokenizer_parity VOCAB_TXT CASES_JSON
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moekit/text/wordpiece.hpp"

namespace {

std::string from_hex(const std::string& hex) {
  std::string out;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

std::string show(const std::vector<std::int32_t>& ids) {
  std::string s;
  for (const std::int32_t id : ids) s += std::to_string(id) + " ";
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s VOCAB_TXT CASES_JSON\n", argv[0]);
    return 2;
  }
  const auto tok = moekit::text::WordPieceTokenizer::from_vocab_file(argv[1]);
  std::ifstream in(argv[2]);
  const nlohmann::json cases = nlohmann::json::parse(in)["cases"];
  int failed = 0;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const std::string text = from_hex(cases[i]["hex"].get<std::string>());
    const auto max_length = cases[i]["max_length"].get<moekit::index_t>();
    const auto expected = cases[i]["ids"].get<std::vector<std::int32_t>>();
    const std::vector<std::int32_t> got = tok.encode(text, max_length);
    if (got != expected) {
      if (++failed <= 10) {
        std::printf("case %zu (hex %s, max_length %td):\n  reference %s\n  moekit    %s\n", i,
                    cases[i]["hex"].get<std::string>().c_str(), max_length, show(expected).c_str(),
                    show(got).c_str());
      }
    }
  }
  std::printf("%zu passed, %d failed\n", cases.size() - static_cast<std::size_t>(failed), failed);
  return failed == 0 ? 0 : 1;
}
