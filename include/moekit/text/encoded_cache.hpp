#pragma once
// Frozen-encoder outputs, computed once per text and cached on disk (host
// only). A frozen encoder gives the same states for the same text every time,
// so training on top of it needs them only once: encode_texts() runs the
// encoder on the texts the cache lacks and reads the others back.
//
// What is kept per text (EncodedTexts), after WordPiece with max_length:
//   ids      the token ids                                   (int32)
//   states   the last layer's hidden state of every token    (tokens x d, f16)
//   pooled   the mean over the tokens of the hidden states after each of
//            `exit_layers` (e.g. {2, 4}: early-exit classifiers read them)
//                                                            (exits x d, f16)
// f16 keeps 11 significant bits (relative error <= 2^-11); MiniLM's states
// are far inside its range (a state beyond +-65504 is stored as +-inf, and
// encode_texts rejects it).
//
// The cache file. Its header holds the key of everything the states depend
// on besides the text: a hash of the model (model_fingerprint: FNV-1a over the
// bytes of config.json, vocab.txt and model.safetensors), max_length, d and
// the exit layers. An entry holds a hash of its text (FNV-1a, 64 bits, and the
// text's length in bytes) and the data above. encode_texts() reads the entries
// it needs, encodes the missing texts and, if it encoded any, rewrites the
// file (atomically: moekit/io/atomic_write.hpp) with the old entries and the
// new ones, so one cache serves every subset of a corpus. A file whose header
// key differs from the model's, or that is truncated or malformed, is
// rebuilt from scratch (CacheStats::rebuilt says so): it is a cache, never the
// only copy. Layout (little-endian):
//   "MKENC001", u64 model hash, u64 max_length, u64 d, u64 E, E x u64 exit
//   layers, then entries until the end: u64 text hash, u64 text bytes, u32 L,
//   L x i32 ids, L d x u16 states, E d x u16 pooled.
// The texts themselves are not stored.
//
// With packed weights (BertEncoder::pack: int8 or bf16 projections, for
// inference) the key's model hash also holds the dtype, so a file of one
// dtype never serves another.
//
// Encoding runs the encoder in batches of kEncodeBatch texts (packed,
// variable length), layer range by layer range so the pooled states fall out
// on the way; results do not depend on the batching (the encoder is batch
// invariant), so a cached text has the bits a fresh run would give. The
// encoder's OpenMP threads split the work.

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/view.hpp"
#include "moekit/io/atomic_write.hpp"
#include "moekit/io/bert.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/nn/bert_encoder.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace text {

// The encoder's outputs for n texts, in the order they were given (see the
// top of this file).
struct EncodedTexts {
  index_t d_model = 0;                // d
  index_t max_length = 0;             // the tokenizer's limit, in tokens
  std::vector<int> exit_layers;       // the layers after which `pooled` was taken
  std::vector<index_t> offsets{0};    // n + 1 token offsets
  std::vector<std::int32_t> ids;      // tokens
  std::vector<std::uint16_t> states;  // tokens x d, f16 bits
  std::vector<std::uint16_t> pooled;  // n x exits x d, f16 bits

  index_t size() const { return static_cast<index_t>(offsets.size()) - 1; }  // n
  index_t tokens() const { return offsets.back(); }                          // over all texts
  // Tokens of text s, in [0, n) (kOutOfRange otherwise).
  index_t length(index_t s) const { return offsets[at(s) + 1] - offsets[at(s)]; }
  index_t num_exits() const { return static_cast<index_t>(exit_layers.size()); }  // exits

  // The token states of sequences `rows` (in that order) as floats, packed:
  // tokens (sum of lengths x d) and their offsets (rows.size() + 1).
  void gather_states(VectorView<const index_t> rows, std::vector<float>& tokens_out,
                     std::vector<index_t>& offsets_out) const {
    offsets_out.assign(1, 0);
    index_t total = 0;
    for (index_t i = 0; i < rows.size(); ++i) offsets_out.push_back(total += length(rows[i]));
    tokens_out.resize(static_cast<std::size_t>(total * d_model));
    for (index_t i = 0; i < rows.size(); ++i) {
      const index_t first = offsets[at(rows[i])];
      to_float(states.data() + first * d_model, length(rows[i]) * d_model,
               tokens_out.data() + offsets_out[static_cast<std::size_t>(i)] * d_model);
    }
  }
  // The pooled states after exit_layers[exit] of sequences `rows` (rows.size() x d).
  void gather_pooled(index_t exit, VectorView<const index_t> rows, std::vector<float>& out) const {
    MOEKIT_CHECK_RANGE(exit, 0, num_exits());
    out.resize(static_cast<std::size_t>(rows.size() * d_model));
    const auto exits = static_cast<std::size_t>(num_exits()), d = static_cast<std::size_t>(d_model);
    for (index_t i = 0; i < rows.size(); ++i) {
      to_float(pooled.data() + (at(rows[i]) * exits + static_cast<std::size_t>(exit)) * d, d_model,
               out.data() + i * d_model);
    }
  }

 private:
  std::size_t at(index_t s) const {
    MOEKIT_CHECK_RANGE(s, 0, size());
    return static_cast<std::size_t>(s);
  }
  static void to_float(const std::uint16_t* src, index_t n, float* dst) {
    for (index_t i = 0; i < n; ++i) dst[i] = io::f16_bits_to_float(src[i]);
  }
};

// What encode_texts did (distinct texts: duplicates count once).
struct CacheStats {
  index_t reused = 0;           // texts read from the cache
  index_t encoded = 0;          // texts run through the encoder
  index_t tokens_encoded = 0;   // their tokens
  double encode_seconds = 0.0;  // wall time spent encoding them
  bool rebuilt = false;         // the file was absent, stale or malformed
};

// FNV-1a, 64 bits, of `bytes`, continuing from `h` (the offset basis by
// default), so a hash can be fed in pieces.
inline std::uint64_t fnv1a64(std::string_view bytes, std::uint64_t h = 0xcbf29ce484222325ull) {
  for (const char c : bytes) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  return h;
}

// FNV-1a over the bytes of the model folder's config.json, vocab.txt and
// model.safetensors, in that order.
inline std::uint64_t model_fingerprint(const std::filesystem::path& folder) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  std::vector<char> buf(1 << 20);
  for (const char* name : {"config.json", "vocab.txt", "model.safetensors"}) {
    std::ifstream in(folder / name, std::ios::binary);
    MOEKIT_CHECK(in.is_open(), Errc::kIoError, "cannot open '", (folder / name).string(), "'");
    while (in) {
      in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      h = fnv1a64({buf.data(), static_cast<std::size_t>(in.gcount())}, h);
    }
    MOEKIT_CHECK(!in.bad(), Errc::kIoError, "reading '", (folder / name).string(), "' failed");
  }
  return h;
}

namespace detail {

inline constexpr char kCacheMagic[8] = {'M', 'K', 'E', 'N', 'C', '0', '0', '1'};

struct CacheKey {
  std::uint64_t model = 0, max_length = 0, d = 0;
  std::vector<std::uint64_t> exits;
  bool operator==(const CacheKey&) const = default;
};

struct EntryKey {
  std::uint64_t hash = 0, bytes = 0;
  bool operator==(const EntryKey&) const = default;
};
struct EntryKeyHash {
  std::size_t operator()(const EntryKey& k) const { return static_cast<std::size_t>(k.hash); }
};

// One text's cached data.
struct Entry {
  std::vector<std::int32_t> ids;
  std::vector<std::uint16_t> states, pooled;
};

template <class T>
void put(std::ostream& out, const T* p, std::size_t n) {
  out.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(n * sizeof(T)));
}
template <class T>
bool get(std::istream& in, T* p, std::size_t n) {
  in.read(reinterpret_cast<char*>(p), static_cast<std::streamsize>(n * sizeof(T)));
  return static_cast<std::size_t>(in.gcount()) == n * sizeof(T);
}

inline void write_header(std::ostream& out, const CacheKey& k) {
  out.write(kCacheMagic, 8);
  const std::uint64_t head[4] = {k.model, k.max_length, k.d, k.exits.size()};
  put(out, head, 4);
  put(out, k.exits.data(), k.exits.size());
}

inline void write_entry(std::ostream& out, const EntryKey& key, const Entry& e) {
  const std::uint64_t head[2] = {key.hash, key.bytes};
  put(out, head, 2);
  const auto length = static_cast<std::uint32_t>(e.ids.size());
  put(out, &length, 1);
  put(out, e.ids.data(), e.ids.size());
  put(out, e.states.data(), e.states.size());
  put(out, e.pooled.data(), e.pooled.size());
}

// Reads a cache file whose key is `key`, calling take(entry key, entry) for
// every entry; false when the file is absent, has another key or is malformed.
template <class Take>
bool read_cache(const std::filesystem::path& path, const CacheKey& key, Take&& take) {
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) return false;
  char magic[8];
  std::uint64_t head[4];
  if (!get(in, magic, 8) || std::memcmp(magic, kCacheMagic, 8) != 0 || !get(in, head, 4)) {
    return false;
  }
  if (head[3] > 64) return false;
  CacheKey file{head[0], head[1], head[2], std::vector<std::uint64_t>(head[3])};
  if (!get(in, file.exits.data(), file.exits.size()) || !(file == key)) return false;
  const std::size_t d = key.d, exits = key.exits.size();
  while (in.peek() != std::char_traits<char>::eof()) {
    std::uint64_t ek[2];
    std::uint32_t length = 0;
    if (!get(in, ek, 2) || !get(in, &length, 1) || length > key.max_length) return false;
    Entry e;
    e.ids.resize(length);
    e.states.resize(length * d);
    e.pooled.resize(exits * d);
    if (!get(in, e.ids.data(), e.ids.size()) || !get(in, e.states.data(), e.states.size()) ||
        !get(in, e.pooled.data(), e.pooled.size())) {
      return false;
    }
    take(EntryKey{ek[0], ek[1]}, std::move(e));
  }
  return !in.bad();
}

}  // namespace detail

// Texts per encoder call when encoding.
inline constexpr index_t kEncodeBatch = 32;

// The encoder's outputs for `texts` (EncodedTexts, in the order of texts),
// from the cache file where it has them, else computed with `model` (and
// added to the file). cache_file empty: no cache. progress(done, total) is
// called after each encoded batch. exit_layers: ascending, in [1, L).
// packed: the projections packed in another dtype (model.encoder.pack), or null.
inline EncodedTexts encode_texts(const io::BertModel& model, std::uint64_t model_hash,
                                 const std::vector<std::string>& texts, index_t max_length,
                                 const std::vector<int>& exit_layers,
                                 const std::filesystem::path& cache_file,
                                 const std::function<void(index_t, index_t)>& progress = {},
                                 CacheStats* stats = nullptr,
                                 const cpu::PackedBertWeights* packed = nullptr) {
  const cpu::BertEncoderConfig& c = model.encoder.config();
  const index_t d = c.d_model;
  MOEKIT_CHECK_ARG(max_length >= 2 && max_length <= c.max_positions, "max_length = ", max_length,
                   " must be in [2, ", c.max_positions, "]");
  for (std::size_t i = 0; i < exit_layers.size(); ++i) {
    MOEKIT_CHECK_ARG(exit_layers[i] >= 1 && exit_layers[i] < c.num_layers &&
                         (i == 0 || exit_layers[i] > exit_layers[i - 1]),
                     "exit_layers[", i, "] = ", exit_layers[i], " must be ascending in [1, ",
                     c.num_layers, ")");
  }
  if (packed != nullptr && packed->dtype() != cpu::GemmDtype::kFloat32)
    model_hash = mix64(model_hash ^ (static_cast<std::uint64_t>(packed->dtype()) + 1));
  detail::CacheKey key{
      model_hash, static_cast<std::uint64_t>(max_length), static_cast<std::uint64_t>(d), {}};
  for (const int l : exit_layers) key.exits.push_back(static_cast<std::uint64_t>(l));

  // Which texts are wanted, by key; duplicates share one entry.
  const std::size_t n = texts.size();
  std::vector<detail::EntryKey> keys(n);
  std::unordered_map<detail::EntryKey, std::size_t, detail::EntryKeyHash> slot;
  for (std::size_t i = 0; i < n; ++i) {
    keys[i] = {fnv1a64(texts[i]), texts[i].size()};
    slot.emplace(keys[i], slot.size());
  }
  std::vector<detail::Entry> entries(slot.size());
  std::vector<bool> have(slot.size(), false);
  CacheStats st;
  bool file_ok = false;
  if (!cache_file.empty()) {
    file_ok = detail::read_cache(cache_file, key, [&](const detail::EntryKey& k, detail::Entry e) {
      const auto it = slot.find(k);
      if (it != slot.end() && !have[it->second]) {
        entries[it->second] = std::move(e);
        have[it->second] = true;
      }
    });
    if (!file_ok) std::fill(have.begin(), have.end(), false);
  }
  st.rebuilt = !cache_file.empty() && !file_ok;

  // Encode the missing ones (one per key), kEncodeBatch at a time.
  std::vector<std::size_t> todo;  // indices into texts
  {
    std::vector<bool> queued(slot.size(), false);
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t s = slot.at(keys[i]);
      if (!have[s] && !queued[s]) todo.push_back(i), queued[s] = true;
    }
  }
  const auto start = std::chrono::steady_clock::now();
  const cpu::BertEncoderWeights w = model.weights.weights();
  const index_t exits = static_cast<index_t>(exit_layers.size());
  std::vector<float> hidden, pooled;
  std::vector<std::byte> workspace;
  for (std::size_t b0 = 0; b0 < todo.size(); b0 += kEncodeBatch) {
    const std::size_t b1 = std::min(todo.size(), b0 + kEncodeBatch);
    std::vector<std::string_view> batch_texts;
    for (std::size_t i = b0; i < b1; ++i) batch_texts.push_back(texts[todo[i]]);
    const TokenBatch batch = model.tokenizer.encode_batch(batch_texts, max_length);
    const index_t tokens = batch.tokens(), seqs = batch.size();
    hidden.resize(static_cast<std::size_t>(tokens * d));
    pooled.resize(static_cast<std::size_t>(seqs * d));
    workspace.resize(
        static_cast<std::size_t>(model.encoder.workspace_size(tokens, batch.longest())));
    const MatrixView<float> h(hidden.data(), tokens, d);
    const VectorView<std::byte> ws(workspace.data(), static_cast<index_t>(workspace.size()));
    model.encoder.embed(batch.ids_view(), {}, batch.offsets_view(), w, h);
    std::vector<std::vector<std::uint16_t>> exit_pooled(static_cast<std::size_t>(exits));
    int done_layers = 0;
    for (index_t e = 0; e <= exits; ++e) {
      const int upto = e < exits ? exit_layers[static_cast<std::size_t>(e)] : c.num_layers;
      if (packed != nullptr) {
        model.encoder.run_layers(done_layers, upto, batch.offsets_view(), w, *packed, h, ws);
      } else {
        model.encoder.run_layers(done_layers, upto, batch.offsets_view(), w, h, ws);
      }
      done_layers = upto;
      if (e == exits) break;
      cpu::pool_sequences(h, batch.offsets_view(), cpu::Pooling::kMean, false,
                          MatrixView<float>(pooled.data(), seqs, d));
      for (const float v : pooled)
        exit_pooled[static_cast<std::size_t>(e)].push_back(io::float_to_f16_bits(v));
    }
    for (index_t s = 0; s < seqs; ++s) {
      detail::Entry& e = entries[slot.at(keys[todo[b0 + static_cast<std::size_t>(s)]])];
      const index_t first = batch.offsets[static_cast<std::size_t>(s)];
      const index_t len = batch.length(s);
      e.ids.assign(batch.ids.begin() + first, batch.ids.begin() + first + len);
      e.states.resize(static_cast<std::size_t>(len * d));
      for (index_t i = 0; i < len * d; ++i) {
        const float v = hidden[static_cast<std::size_t>(first * d + i)];
        MOEKIT_CHECK(std::isfinite(v) && std::fabs(v) <= 65504.0f, Errc::kNonFinite,
                     "encode_texts: text ", todo[b0 + static_cast<std::size_t>(s)],
                     " has a hidden state ", v, " outside the f16 range");
        e.states[static_cast<std::size_t>(i)] = io::float_to_f16_bits(v);
      }
      e.pooled.clear();
      for (index_t x = 0; x < exits; ++x) {
        const auto* p = exit_pooled[static_cast<std::size_t>(x)].data() + s * d;
        e.pooled.insert(e.pooled.end(), p, p + d);
      }
      have[slot.at(keys[todo[b0 + static_cast<std::size_t>(s)]])] = true;
    }
    st.tokens_encoded += tokens;
    if (progress) progress(static_cast<index_t>(b1), static_cast<index_t>(todo.size()));
  }
  st.encoded = static_cast<index_t>(todo.size());
  st.reused = static_cast<index_t>(slot.size()) - st.encoded;
  st.encode_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  // Rewrite the file: its old entries (those with the same key) and the new ones.
  if (!cache_file.empty() && (!todo.empty() || st.rebuilt)) {
    std::filesystem::create_directories(
        cache_file.parent_path().empty() ? std::filesystem::path(".") : cache_file.parent_path());
    std::filesystem::path merged = cache_file;
    merged += ".new";
    io::write_file_atomically(merged, [&](std::ostream& out) {
      detail::write_header(out, key);
      if (file_ok) {
        detail::read_cache(cache_file, key, [&](const detail::EntryKey& k, const detail::Entry& e) {
          if (slot.find(k) == slot.end()) detail::write_entry(out, k, e);
        });
      }
      for (const auto& [k, s] : slot) detail::write_entry(out, k, entries[s]);
    });
    std::filesystem::rename(merged, cache_file);
  }

  EncodedTexts out;
  out.d_model = d;
  out.max_length = max_length;
  out.exit_layers = exit_layers;
  for (std::size_t i = 0; i < n; ++i) {
    const detail::Entry& e = entries[slot.at(keys[i])];
    out.ids.insert(out.ids.end(), e.ids.begin(), e.ids.end());
    out.states.insert(out.states.end(), e.states.begin(), e.states.end());
    out.pooled.insert(out.pooled.end(), e.pooled.begin(), e.pooled.end());
    out.offsets.push_back(out.offsets.back() + static_cast<index_t>(e.ids.size()));
  }
  if (stats != nullptr) *stats = st;
  return out;
}

}  // namespace text
MOEKIT_NAMESPACE_END
