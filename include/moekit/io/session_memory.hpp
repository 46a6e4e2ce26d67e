#pragma once
// Snapshots of one session of a session memory (moekit/nn/session_memory.hpp)
// in a safetensors file (moekit/io/safetensors.hpp), so that a session can be
// put aside and resumed later, in another process, bit for bit.
//
// Tensors, F32:
//   fast_weights  [d_v, d_k]  S                (only with config.fast_weights)
//   slot_ids      [m]         the slots held, least recently written first
//                             (integers below 2^24: exact as floats)
//   slot_values   [m, d_v]    their value rows, in the same order
//   match_keys    [u, d_k]    the match gate's kept keys, oldest first, as
//                             their int8 values (only with config.match_keys)
//   match_scales  [u]         their scales, in the same order
// Metadata (strings): format = "moekit.session_memory", version = "1"; the
// configuration the state belongs to (d_model, d_key, d_value, fast_weights,
// sub_keys, top_k, slot_capacity, slot_sharpness, decay, write_strength,
// gate, and with a match gate match_keys, match_threshold, match_width;
// floats in their shortest exact decimal form; a memory without the gate
// writes exactly the entries it wrote before the gate existed); writes, the
// session's write count; weights_fingerprint,
// SessionMemory::weights_fingerprint() in hexadecimal. A session resumes
// exactly only under the same configuration and the same frozen weights, so
// loading requires both (max_sessions may differ). A snapshot with a match
// gate loads only into a memory with one, and one without only into a
// memory without.
//
// load_session checks the whole file against the memory (format, version,
// every configuration entry, the fingerprint, the tensors' shapes, the slot
// ids, the gate's keys) before it changes the session: a rejected load
// leaves it as it was.
// Errors: kFormatError (not a snapshot of this format, a missing or malformed
// entry), kInvalidArgument (another configuration or other frozen weights),
// and those of SafetensorsReader and SessionMemory::restore.
//
//   moekit::io::save_session(memory, session, "session.safetensors");
//   const std::int32_t resumed = memory.open();
//   moekit::io::load_session(memory, resumed, "session.safetensors");

#include <charconv>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <system_error>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/nn/session_memory.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace io {

namespace detail {

inline constexpr const char* kSessionFormat = "moekit.session_memory";
inline constexpr const char* kSessionVersion = "1";

inline std::string float_text(float v) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

// The configuration entries a snapshot records, as text.
inline std::map<std::string, std::string> session_config_entries(
    const cpu::SessionMemoryConfig& c) {
  return {{"d_model", std::to_string(c.d_model)},
          {"d_key", std::to_string(c.d_key)},
          {"d_value", std::to_string(c.d_value)},
          {"fast_weights", c.fast_weights ? "1" : "0"},
          {"sub_keys", std::to_string(c.sub_keys)},
          {"top_k", std::to_string(c.top_k)},
          {"slot_capacity", std::to_string(c.slot_capacity)},
          {"slot_sharpness", float_text(c.slot_sharpness)},
          {"decay", float_text(c.decay)},
          {"write_strength", float_text(c.write_strength)},
          {"gate", float_text(c.gate)}};
}

// The match gate's entries, recorded only with a gate (config.match_keys > 0).
inline std::map<std::string, std::string> session_gate_entries(const cpu::SessionMemoryConfig& c) {
  if (c.match_keys == 0) return {};
  return {{"match_keys", std::to_string(c.match_keys)},
          {"match_threshold", float_text(c.match_threshold)},
          {"match_width", float_text(c.match_width)}};
}

inline std::string hex64(std::uint64_t v) {
  char buf[17];
  const auto r = std::to_chars(buf, buf + sizeof buf, v, 16);
  return std::string(buf, r.ptr);
}

// The length of the file's one-dimensional tensor `name` (`symbol`: its
// length's name in the message); kFormatError for another rank.
inline index_t session_vector_length(const SafetensorsReader& file, const char* name,
                                     const char* symbol) {
  const Shape& shape = file.info(name).shape;
  MOEKIT_CHECK(shape.size() == 1, Errc::kFormatError, "tensor '", name, "' in '", file.source(),
               "' has shape ", shape_string(shape), ", expected [", symbol, "]");
  const auto length = static_cast<index_t>(shape[0]);
  file.check_tensor(name, Shape{length});
  return length;
}

// The file's metadata entry `key`; kFormatError when it is missing.
inline const std::string& session_entry(const SafetensorsReader& file, const std::string& key) {
  const auto it = file.metadata().find(key);
  MOEKIT_CHECK(it != file.metadata().end(), Errc::kFormatError, "'", file.source(),
               "' has no metadata entry \"", key, "\" (not a session memory snapshot?)");
  return it->second;
}

}  // namespace detail

namespace detail {

// A snapshot ready to write: the writer refers to the session's S (which
// must not change meanwhile) and to the slot copies held here (vectors keep
// their buffers when the snapshot moves).
struct SessionSnapshot {
  std::vector<float> slot_ids, slot_values, match_keys, match_scales;
  SafetensorsWriter writer;
};

inline SessionSnapshot session_snapshot(const cpu::SessionMemory& memory, std::int32_t session) {
  const cpu::SessionMemoryConfig& c = memory.config();
  const index_t used = memory.slots_used(session);
  SessionSnapshot out;
  std::vector<std::int32_t> ids(static_cast<std::size_t>(used));
  out.slot_values.assign(static_cast<std::size_t>(used * c.d_value), 0.0f);
  memory.copy_slots(session, {ids.data(), used}, {out.slot_values.data(), used, c.d_value});
  out.slot_ids.assign(ids.begin(), ids.end());
  const index_t kept = memory.match_keys_kept(session);
  std::vector<std::int8_t> keys(static_cast<std::size_t>(kept * c.d_key));
  out.match_scales.assign(static_cast<std::size_t>(kept), 0.0f);
  memory.copy_match_keys(session, {keys.data(), kept, c.d_key}, {out.match_scales.data(), kept});
  out.match_keys.assign(keys.begin(), keys.end());
  SafetensorsWriter& w = out.writer;
  w.set_metadata("format", kSessionFormat);
  w.set_metadata("version", kSessionVersion);
  for (const auto& [key, value] : session_config_entries(c)) w.set_metadata(key, value);
  for (const auto& [key, value] : session_gate_entries(c)) w.set_metadata(key, value);
  w.set_metadata("writes", std::to_string(memory.writes(session)));
  w.set_metadata("weights_fingerprint", hex64(memory.weights_fingerprint()));
  if (c.fast_weights) w.add("fast_weights", memory.fast_weights(session));
  if (memory.has_slots()) {
    w.add("slot_ids", VectorView<const float>(out.slot_ids.data(), used));
    w.add("slot_values", MatrixView<const float>(out.slot_values.data(), used, c.d_value));
  }
  if (memory.has_match_gate()) {
    w.add("match_keys", MatrixView<const float>(out.match_keys.data(), kept, c.d_key));
    w.add("match_scales", VectorView<const float>(out.match_scales.data(), kept));
  }
  return out;
}

}  // namespace detail

// Writes `session`'s snapshot to `path` (whole or not at all).
inline void save_session(const cpu::SessionMemory& memory, std::int32_t session,
                         const std::filesystem::path& path) {
  detail::session_snapshot(memory, session).writer.write(path);
}

// The snapshot's bytes (the file save_session writes).
inline std::vector<std::byte> session_bytes(const cpu::SessionMemory& memory,
                                            std::int32_t session) {
  return detail::session_snapshot(memory, session).writer.to_bytes();
}

// Replaces open `session`'s state with the snapshot in `file`.
inline void load_session(cpu::SessionMemory& memory, std::int32_t session,
                         const SafetensorsReader& file) {
  const cpu::SessionMemoryConfig& c = memory.config();
  const std::string& format = detail::session_entry(file, "format");
  MOEKIT_CHECK(format == detail::kSessionFormat, Errc::kFormatError, "'", file.source(),
               "' has format \"", format, "\", expected \"", detail::kSessionFormat, "\"");
  const std::string& version = detail::session_entry(file, "version");
  MOEKIT_CHECK(version == detail::kSessionVersion, Errc::kFormatError, "'", file.source(),
               "' has version \"", version, "\"; this moekit reads version ",
               detail::kSessionVersion);
  const bool file_gate = file.metadata().count("match_keys") != 0;
  MOEKIT_CHECK(file_gate == memory.has_match_gate(), Errc::kInvalidArgument, "'", file.source(),
               "' is a snapshot ", file_gate ? "with" : "without",
               " a match gate, but this memory has config.match_keys = ", c.match_keys);
  std::map<std::string, std::string> entries = detail::session_config_entries(c);
  entries.merge(detail::session_gate_entries(c));
  for (const auto& [key, want] : entries) {
    const std::string& got = detail::session_entry(file, key);
    MOEKIT_CHECK(got == want, Errc::kInvalidArgument, "'", file.source(), "' is a snapshot with ",
                 key, " = ", got, " but this memory has ", key, " = ", want);
  }
  const std::string& fingerprint = detail::session_entry(file, "weights_fingerprint");
  const std::string own = detail::hex64(memory.weights_fingerprint());
  MOEKIT_CHECK(fingerprint == own, Errc::kInvalidArgument, "'", file.source(),
               "' was taken over other frozen weights (fingerprint ", fingerprint,
               ", this memory's ", own, ")");
  const std::string& writes_text = detail::session_entry(file, "writes");
  std::uint64_t writes = 0;
  const auto parsed =
      std::from_chars(writes_text.data(), writes_text.data() + writes_text.size(), writes);
  MOEKIT_CHECK(parsed.ec == std::errc() && parsed.ptr == writes_text.data() + writes_text.size(),
               Errc::kFormatError, "'", file.source(), "': \"writes\" is \"", writes_text,
               "\", expected a non-negative integer");

  std::vector<float> fast;
  if (c.fast_weights) {
    fast.resize(static_cast<std::size_t>(c.d_value * c.d_key));
    file.check_tensor("fast_weights", Shape{c.d_value, c.d_key});
  }
  index_t used = 0;
  if (memory.has_slots()) {
    used = detail::session_vector_length(file, "slot_ids", "m");
    file.check_tensor("slot_values", Shape{used, c.d_value});
  }
  index_t kept = 0;
  if (memory.has_match_gate()) {
    kept = detail::session_vector_length(file, "match_scales", "u");
    file.check_tensor("match_keys", Shape{kept, c.d_key});
  }
  std::vector<float> ids(static_cast<std::size_t>(used));
  std::vector<float> values(static_cast<std::size_t>(used * c.d_value));
  std::vector<TensorTarget> targets;
  if (c.fast_weights) {
    targets.push_back({"fast_weights", {c.d_value, c.d_key}, {fast.data(), c.d_value, c.d_key}});
  }
  if (memory.has_slots()) {
    targets.push_back({"slot_ids", {used}, {ids.data(), 1, used}});
    targets.push_back({"slot_values", {used, c.d_value}, {values.data(), used, c.d_value}});
  }
  std::vector<float> key_values(static_cast<std::size_t>(kept * c.d_key));
  std::vector<float> scales(static_cast<std::size_t>(kept));
  if (memory.has_match_gate()) {
    targets.push_back({"match_keys", {kept, c.d_key}, {key_values.data(), kept, c.d_key}});
    targets.push_back({"match_scales", {kept}, {scales.data(), 1, kept}});
  }
  file.load(targets);
  std::vector<std::int8_t> keys(key_values.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const float v = key_values[i];
    MOEKIT_CHECK(v >= -127.0f && v <= 127.0f && v == std::nearbyint(v), Errc::kFormatError, "'",
                 file.source(), "': match_keys element ", i, " = ", v,
                 " is not an int8 key value (an integer in [-127, 127])");
    keys[i] = static_cast<std::int8_t>(v);
  }
  std::vector<std::int32_t> slot_ids(static_cast<std::size_t>(used));
  for (index_t i = 0; i < used; ++i) {
    const float id = ids[static_cast<std::size_t>(i)];
    MOEKIT_CHECK(
        id >= 0.0f && id < 16777216.0f && id == static_cast<float>(static_cast<std::int32_t>(id)),
        Errc::kFormatError, "'", file.source(), "': slot_ids[", i, "] = ", id,
        " is not a slot id (an integer in [0, 2^24))");
    slot_ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(id);
  }
  memory.restore(session,
                 c.fast_weights ? MatrixView<const float>(fast.data(), c.d_value, c.d_key)
                                : MatrixView<const float>(),
                 {slot_ids.data(), used}, {values.data(), used, c.d_value}, writes,
                 {keys.data(), kept, c.d_key}, {scales.data(), kept});
}

// The same, from the file at `path`.
inline void load_session(cpu::SessionMemory& memory, std::int32_t session,
                         const std::filesystem::path& path) {
  load_session(memory, session, SafetensorsReader(path));
}

}  // namespace io
MOEKIT_NAMESPACE_END
