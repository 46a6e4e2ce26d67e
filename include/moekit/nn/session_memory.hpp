#pragma once
// Session memory on the CPU: short-term associative weights per session over
// frozen long-term weights. A correction made during a session (this text is
// "sport", not "business") is written into the session's memory at once and
// changes that session's later outputs; nothing is trained, other sessions
// never see it, and closing the session throws it away.
//
// The math, per row t with input x (d_model features, e.g. a pooled sentence
// embedding) and the frozen path's output z (d_v, e.g. a head's logits):
//   k = W_k x / ||W_k x||,  q = W_q x / ||W_q x||     keys and queries (d_k; 0 stays 0)
//   b = sigma(w_b . x + c_b), or the fixed config.write_strength     write strength
//   g = sigma(w_g . x + c_g), or the fixed config.gate               gate
// A session holds one or both of two memories:
//   fast weights  S, d_v x d_k floats, read S u for a unit vector u;
//   slots         n^2 slots with product keys: slot (i, j) has the key
//                 [A_i ; B_j], from two frozen codebooks A and B of n sub-keys
//                 of d_k / 2 (int8, one scale per row: cpu/memory_kernels.hpp's
//                 quantize_rows). The session holds float value rows V for
//                 the slots it has written, at most config.slot_capacity of
//                 them (when full, the least recently written is evicted).
// Slot selection for u = [u_a ; u_b]: each half is quantised to int8 with its
// own scale s_u and scored against its codebook with exact int32 dot products,
// score_a(i) = (s_u s_Ai) (A_i . u_a) (and score_b likewise); the top-k of
// each half, then the top-k of the k x k sums score_a(i) + score_b(j), give
// the k slots (the k best of all n^2 sums are among those candidates), with
// weights w = softmax(tau s) over the k selected scores. Ties: the higher
// score first, equal scores by the lower index (slot (i, j) = i n + j).
//   read   o(u) = S u + sum_j w_j V[slot_j]      (a slot never written reads 0)
//          y = z + g o(q), and y = z bit for bit wherever o(q) is 0
//   write  a correction: x and the value v (d_v) the memory should return at x
//          e = o(k) - v,  beta = b / (1 + sum_j w_j^2)  (b without slots,
//                                                        b / sum_j w_j^2 without S)
//          S       <- a S - beta e k^T
//          V[slot_j] <- a V[slot_j] - beta w_j e      for the k selected slots only
// Why this update: the read o(k) is linear in (S, V) with the feature vector
// phi = [k ; w], ||phi||^2 = 1 + sum w^2. The write is one step of the delta
// rule (normalised least mean squares) on |o(k) - v|^2 / 2 with step b /
// ||phi||^2, so the read at k moves a fraction b of the way to v: with a = b =
// 1 the memory returns v at k exactly after the write. Without slots (||k|| =
// 1) it is the plain delta rule S <- a S - b (S k - v) k^T. A slot moves by
// its share w_j of the read, and only selected slots are touched, so a write
// costs O(d_v d_k + k d_v) whatever n. The decay a in (0, 1] forgets: S at
// every write, a slot's value whenever it is written again.
//
// Match gate (config.match_keys = m > 0). S reads some of every value at any
// query with a positive cosine to its key, so corrections also move inputs
// unrelated to them. The gate lets a read through only near what the session
// wrote: each session keeps the keys k of its last m writes (a ring, int8
// with one scale per key, as quantize_rows), a read computes the best cosine
// of its query with them, c = max_i s_q s_i (q8 . k8_i) (the query quantised
// as the keys; exact int32 dot products), and scales the output by
//   g_match(c) = clamp((c - theta) / width, 0, 1)   (width 0: c > theta ? 1 : 0)
//   y = z + g g_match(c) o(q),   and y = z bit for bit wherever g_match(c) = 0
// (a session without writes has no keys: g_match = 0). Writes are not gated:
// the gate only decides where the memory is read. Why int8: the keys cost
// d_k + 4 bytes each instead of 4 d_k, and their cosine is within
// sqrt(d_k) (s_q + s_i) / 2 <= sqrt(d_k) / 127 of the float one (0.063 at
// d_k = 64; under 0.01 on real keys, docs/session_memory.md).
// Why this ramp: it is exactly 0 below theta (unrelated inputs keep the
// frozen output bit for bit and skip the read), exactly 1 from theta + width
// (close inputs get the whole correction), and continuous between, so a small
// change of c changes the output by a bounded amount.
//
// Sessions. open() returns the lowest free id in [0, max_sessions) and
// allocates that session's state (zeroed): state_bytes() =
// 4 d_v d_k (fast weights) + slot_capacity (4 d_v + 16) (slots: values, slot
// id, index and recency entries) + match_keys (d_k + 4) (the gate's keys).
// reset() zeroes a session, close() frees it (its id is then free again).
// read() and write() allocate nothing: they take a caller workspace of
// workspace_size() bytes (float-aligned).
//
// Batches. Each row carries a session id (-1: no memory, y = z), as rows of a
// LoraBank carry an adapter id. Rows of one session are written in row order;
// sessions are independent: a session's state after write() depends on its
// own rows only, a row's read on its x, its z and its session's state only.
// Reads see the state from before the call.
//
// Determinism. The kernels give the same bits on every ISA path (generic,
// AVX2, AVX-512), every sum in an order fixed by its length; threads split
// rows (read) or sessions (write), never a sum. So a state and a read are
// bit-identical whatever the path, the thread count and the rest of the batch,
// and the same events replayed give the same state (snapshots in
// moekit/io/session_memory.hpp write and restore it exactly).
//
// Frozen weights. The memory keeps the views it is given (caller memory that
// must outlive it) and never writes them; weights_fingerprint() hashes them
// (snapshots carry it, so a state cannot be restored over other weights).
//
// Validation (every call, before anything is written): the config
// (constructor), the weights against it, every view's shape, every session id
// in [-1, max_sessions) and open (kOutOfRange / kInvalidArgument naming the
// row and the id), the workspace; write() also refuses non-finite x or v in a
// row that has a session (kNonFinite, naming the element), so one bad event
// cannot poison a session. Outputs must not overlap inputs, except y = z
// exactly (in place).
//
//   const moekit::cpu::SessionMemory memory(config, weights);
//   const std::int32_t s = memory.open();
//   memory.write(x_corrections, values, ids, workspace);   // ids: s per row
//   memory.read(x, ids, frozen_logits, logits, workspace);
//   memory.close(s);

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/memory_kernels.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/cpu/vec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// The most slots a row reads and writes.
inline constexpr int kMaxSlotTopK = 8;
// The most sub-keys per codebook: n^2 slot ids stay below 2^24, exact as floats
// (snapshots store them as F32).
inline constexpr index_t kMaxSubKeys = 4096;

// The memory's shape and fixed rates; the constructor validates it.
struct SessionMemoryConfig {
  index_t d_model = 0;           // width of x
  index_t d_key = 0;             // d_k, keys and queries (even when sub_keys > 0)
  index_t d_value = 0;           // d_v, values and outputs (the frozen path's width)
  bool fast_weights = true;      // a d_v x d_k state S per session
  index_t sub_keys = 0;          // n per codebook, n^2 slots; 0: no slots
  int top_k = 4;                 // slots per row, 1 .. 8 and <= sub_keys
  index_t slot_capacity = 0;     // value rows a session holds, top_k .. n^2
  float slot_sharpness = 10.0f;  // tau of the slot weights softmax(tau s), > 0
  float decay = 1.0f;            // a, in (0, 1]
  float write_strength = 1.0f;   // b when weights.w_write is empty, in (0, 1]
  float gate = 1.0f;             // g when weights.w_gate is empty, in [0, 1]
  index_t max_sessions = 1;      // session ids [0, max_sessions)
  // The match gate (the top of this file); off by default.
  index_t match_keys = 0;        // m: keys of a session's last m writes kept; 0: no gate
  float match_threshold = 0.5f;  // theta in [-1, 1]: the gate is 0 while c <= theta
  float match_width = 0.1f;      // >= 0: the gate is 1 from c = theta + width (0: a step)
};

// A codebook of int8 rows with one scale per row (row r ~ scale[r] keys.row(r)).
struct Int8Rows {
  MatrixView<const std::int8_t> keys{};  // n x width
  VectorView<const float> scale{};       // n, finite and >= 0
};

// The long-term weights: frozen, caller memory, never written.
struct SessionMemoryWeights {
  MatrixView<const float> w_key{};    // d_k x d_model
  MatrixView<const float> w_query{};  // d_k x d_model (may be the same memory as w_key)
  VectorView<const float> w_write{};  // d_model, or empty: config.write_strength
  float write_bias = 0.0f;            // c_b
  VectorView<const float> w_gate{};   // d_model, or empty: config.gate
  float gate_bias = 0.0f;             // c_g
  Int8Rows sub_keys_a{};              // n x d_k / 2, scores the first half of a key
  Int8Rows sub_keys_b{};              // n x d_k / 2, the second half
};

// Short-term memory of many sessions over frozen weights (see the top of
// this file).
class SessionMemory {
 public:
  // Validates the config and the weights against it.
  SessionMemory(const SessionMemoryConfig& config, const SessionMemoryWeights& weights)
      : config_(config), weights_(weights) {
    check_config(config);
    check_weights(weights);
    sessions_.resize(static_cast<std::size_t>(config.max_sessions));
  }

  const SessionMemoryConfig& config() const { return config_; }          // as validated
  const SessionMemoryWeights& weights() const { return weights_; }       // the views it was given
  bool has_slots() const { return config_.sub_keys > 0; }                // sub_keys > 0
  bool has_match_gate() const { return config_.match_keys > 0; }         // match_keys > 0
  index_t slots() const { return config_.sub_keys * config_.sub_keys; }  // n^2 slot ids

  // ---- lifecycle ----

  // Opens a session (the lowest free id) with a zero state; kInvalidArgument
  // when max_sessions are open.
  std::int32_t open() {
    MOEKIT_CHECK(open_count_ < config_.max_sessions, Errc::kInvalidArgument, "all ",
                 config_.max_sessions, " sessions (config.max_sessions) are open");
    std::int32_t id = 0;
    if (!freed_.empty()) {
      id = *freed_.begin();
      freed_.erase(freed_.begin());
    } else {
      id = static_cast<std::int32_t>(next_unused_++);
    }
    auto session = std::make_unique<Session>();
    const auto dv = static_cast<std::size_t>(config_.d_value);
    const auto cap = static_cast<std::size_t>(has_slots() ? config_.slot_capacity : 0);
    if (config_.fast_weights)
      session->fast.assign(dv * static_cast<std::size_t>(config_.d_key), 0.0f);
    session->values.assign(cap * dv, 0.0f);
    session->slot_of_row.assign(cap, -1);
    session->index.assign(cap, SlotEntry{});
    session->recency.assign(cap, 0);
    const auto keys = static_cast<std::size_t>(config_.match_keys);
    session->match_keys.assign(keys * static_cast<std::size_t>(config_.d_key), 0);
    session->match_scales.assign(keys, 0.0f);
    sessions_[static_cast<std::size_t>(id)] = std::move(session);
    ++open_count_;
    return id;
  }

  // Zeroes an open session's state (as a fresh open would).
  void reset(std::int32_t session) {
    Session& s = open_session(session, "session");
    std::fill(s.fast.begin(), s.fast.end(), 0.0f);
    std::fill(s.values.begin(), s.values.end(), 0.0f);
    std::fill(s.slot_of_row.begin(), s.slot_of_row.end(), -1);
    s.used = 0;
    s.writes = 0;
    clear_match_keys(s);
  }

  // Frees an open session's state; its id becomes free.
  void close(std::int32_t session) {
    open_session(session, "session");
    sessions_[static_cast<std::size_t>(session)].reset();
    freed_.insert(session);
    --open_count_;
  }

  // Whether `session` is an id in [0, max_sessions) that is open (any value
  // may be asked).
  bool is_open(std::int32_t session) const {
    return session >= 0 && session < config_.max_sessions &&
           sessions_[static_cast<std::size_t>(session)] != nullptr;
  }
  index_t open_sessions() const { return open_count_; }  // how many are open

  // Bytes of state one open session holds (see the top of this file).
  index_t state_bytes() const {
    const index_t fast = config_.fast_weights ? config_.d_value * config_.d_key : 0;
    const index_t cap = has_slots() ? config_.slot_capacity : 0;
    return index_t{4} * fast + cap * (index_t{4} * config_.d_value + 16) +
           config_.match_keys * (config_.d_key + 4);
  }

  // ---- a session's state (snapshots, inspection) ----

  // S, d_v x d_k (empty without fast weights).
  MatrixView<const float> fast_weights(std::int32_t session) const {
    const Session& s = open_session(session, "session");
    if (!config_.fast_weights) return {};
    return {s.fast.data(), config_.d_value, config_.d_key};
  }
  // Slots the session holds.
  index_t slots_used(std::int32_t session) const { return open_session(session, "session").used; }
  // Writes the session has taken (rows of write() with its id) since it was
  // opened or reset, or the count restore() gave it.
  std::uint64_t writes(std::int32_t session) const {
    return open_session(session, "session").writes;
  }
  // The held slots' ids and value rows, least recently written first:
  // slot_ids has slots_used() entries, values slots_used() x d_v.
  void copy_slots(std::int32_t session, VectorView<std::int32_t> slot_ids,
                  MatrixView<float> values) const {
    const Session& s = open_session(session, "session");
    check_shape(slot_ids, s.used, "slot_ids");
    check_shape(values, s.used, config_.d_value, "values");
    for (index_t i = 0; i < s.used; ++i) {
      const std::int32_t row = s.recency[static_cast<std::size_t>(i)];
      slot_ids[i] = s.slot_of_row[static_cast<std::size_t>(row)];
      std::copy_n(value_row(s, row), config_.d_value, values.row(i));
    }
  }
  // The match gate's keys the session keeps (at most match_keys).
  index_t match_keys_kept(std::int32_t session) const {
    return open_session(session, "session").match_kept;
  }
  // Those keys, oldest first: keys match_keys_kept() x d_k int8, scales
  // match_keys_kept() (key i ~ scales[i] keys.row(i)).
  void copy_match_keys(std::int32_t session, MatrixView<std::int8_t> keys,
                       VectorView<float> scales) const {
    const Session& s = open_session(session, "session");
    check_shape(keys, s.match_kept, config_.d_key, "keys");
    check_shape(scales, s.match_kept, "scales");
    for (index_t i = 0; i < s.match_kept; ++i) {
      const index_t ring = match_ring_row(s, i);
      std::copy_n(match_key_row(s, ring), config_.d_key, keys.row(i));
      scales[i] = s.match_scales[static_cast<std::size_t>(ring)];
    }
  }
  // Replaces an open session's state with the given one (copy_slots' and
  // copy_match_keys' order: least recently written first). Checks everything
  // first: S d_v x d_k (empty without fast weights), at most slot_capacity
  // slots, ids in [0, n^2) and distinct, values slots x d_v; at most
  // match_keys gate keys (none without the gate), int8 in [-127, 127] with
  // finite scales >= 0.
  void restore(std::int32_t session, MatrixView<const float> fast,
               VectorView<const std::int32_t> slot_ids, MatrixView<const float> values,
               std::uint64_t writes, MatrixView<const std::int8_t> match_keys = {},
               VectorView<const float> match_scales = {}) {
    Session& s = open_session(session, "session");
    check_restored_match_keys(match_keys, match_scales);
    if (config_.fast_weights) {
      check_shape(fast, config_.d_value, config_.d_key, "fast");
    } else {
      MOEKIT_CHECK(fast.empty(), Errc::kShapeMismatch, "fast is ", fast.rows(), " x ", fast.cols(),
                   " but the memory has no fast weights (config.fast_weights is false)");
    }
    check_view(slot_ids, "slot_ids");
    const index_t used = slot_ids.size();
    const index_t cap = has_slots() ? config_.slot_capacity : 0;
    MOEKIT_CHECK(used <= cap, Errc::kShapeMismatch, "slot_ids has ", used, " slots, more than the ",
                 cap, " a session holds (config.slot_capacity)");
    check_shape(values, used, config_.d_value, "values");
    std::vector<std::int32_t> sorted(slot_ids.begin(), slot_ids.end());
    std::sort(sorted.begin(), sorted.end());
    for (index_t i = 0; i < used; ++i) {
      MOEKIT_CHECK(slot_ids[i] >= 0 && slot_ids[i] < slots(), Errc::kOutOfRange, "slot_ids[", i,
                   "] = ", slot_ids[i], " is outside [0, ", slots(), ")");
      MOEKIT_CHECK(
          i == 0 || sorted[static_cast<std::size_t>(i - 1)] != sorted[static_cast<std::size_t>(i)],
          Errc::kInvalidArgument, "slot_ids holds slot ", sorted[static_cast<std::size_t>(i)],
          " twice");
    }
    for (index_t r = 0; r < fast.rows(); ++r) {
      std::copy_n(fast.row(r), config_.d_key, s.fast.data() + r * config_.d_key);
    }
    std::fill(s.values.begin(), s.values.end(), 0.0f);
    std::fill(s.slot_of_row.begin(), s.slot_of_row.end(), -1);
    for (index_t i = 0; i < used; ++i) {
      const auto row = static_cast<std::int32_t>(i);
      std::copy_n(values.row(i), config_.d_value, value_row(s, row));
      s.slot_of_row[static_cast<std::size_t>(i)] = slot_ids[i];
      s.recency[static_cast<std::size_t>(i)] = row;
      s.index[static_cast<std::size_t>(i)] = {slot_ids[i], row};
    }
    std::sort(s.index.begin(), s.index.begin() + used,
              [](const SlotEntry& a, const SlotEntry& b) { return a.slot < b.slot; });
    s.used = used;
    s.writes = writes;
    clear_match_keys(s);
    for (index_t i = 0; i < match_scales.size(); ++i) {
      std::copy_n(match_keys.row(i), config_.d_key, match_key_row(s, i));
      s.match_scales[static_cast<std::size_t>(i)] = match_scales[i];
    }
    s.match_kept = match_scales.size();
    s.match_next = s.match_kept % std::max<index_t>(1, config_.match_keys);
  }

  // A 64-bit FNV-1a hash of the frozen weights' values (each view row by row,
  // the biases, in a fixed order): equal weights give equal fingerprints.
  std::uint64_t weights_fingerprint() const {
    std::uint64_t h = 14695981039346656037ULL;
    const auto mix = [&h](const void* p, std::size_t n) {
      const auto* b = static_cast<const unsigned char*>(p);
      for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ULL;
    };
    const auto mix_matrix = [&](auto m) {
      for (index_t r = 0; r < m.rows(); ++r) {
        mix(m.row(r), static_cast<std::size_t>(m.cols()) * sizeof(*m.data()));
      }
    };
    const auto mix_vector = [&](auto v) {
      mix(v.data(), static_cast<std::size_t>(v.size()) * sizeof(*v.data()));
    };
    mix_matrix(weights_.w_key);
    mix_matrix(weights_.w_query);
    mix_vector(weights_.w_write);
    mix(&weights_.write_bias, sizeof(float));
    mix_vector(weights_.w_gate);
    mix(&weights_.gate_bias, sizeof(float));
    for (const Int8Rows* keys : {&weights_.sub_keys_a, &weights_.sub_keys_b}) {
      mix_matrix(keys->keys);
      mix_vector(keys->scale);
    }
    return h;
  }

  // ---- the hot path ----

  // Bytes of workspace read, write and select need (per OpenMP thread, for
  // max_threads() threads; fewer bytes run on fewer threads, one slot at least).
  index_t workspace_size() const { return slot_bytes() * std::max<index_t>(1, max_threads()); }

  // y = z + g g_match(c) o(q) per row (the top of this file; g_match = 1
  // without the gate); rows with session -1, or whose gate is 0, get y = z.
  // x: n x d_model, sessions: n, frozen (z) and y: n x d_v; y may be frozen
  // itself.
  void read(MatrixView<const float> x, VectorView<const std::int32_t> sessions,
            MatrixView<const float> frozen, MatrixView<float> y,
            VectorView<std::byte> workspace) const {
    const index_t n = checked_rows(x);
    check_shape(frozen, n, config_.d_value, "frozen");
    check_shape(y, n, config_.d_value, "y");
    check_sessions(sessions, n);
    const index_t threads = usable_threads(workspace, n);
    if (n == 0) return;
    float* base = reinterpret_cast<float*>(workspace.data());
    with_vec_path([&](auto path) {
      const auto run = [&](index_t tid, index_t nth) {
        Scratch scratch = scratch_at(base, tid);
        for (index_t t = n * tid / nth; t < n * (tid + 1) / nth; ++t) {
          const std::int32_t id = sessions[t];
          if (id < 0) {
            if (y.row(t) != frozen.row(t)) std::copy_n(frozen.row(t), config_.d_value, y.row(t));
            continue;
          }
          read_row(path, *sessions_[static_cast<std::size_t>(id)], x.row(t), frozen.row(t),
                   y.row(t), scratch);
        }
      };
      parallel(threads, run);
    });
  }

  // Writes the corrections (x_t, v_t) into their rows' sessions (the update at
  // the top of this file), each session's rows in row order; rows with
  // session -1 are skipped. x: n x d_model, values: n x d_v, sessions: n.
  void write(MatrixView<const float> x, MatrixView<const float> values,
             VectorView<const std::int32_t> sessions, VectorView<std::byte> workspace) {
    const index_t n = checked_rows(x);
    check_shape(values, n, config_.d_value, "values");
    check_sessions(sessions, n);
    for (index_t t = 0; t < n; ++t) {
      if (sessions[t] < 0) continue;
      check_finite(x.row(t), config_.d_model, "x", t);
      check_finite(values.row(t), config_.d_value, "values", t);
    }
    const index_t threads = usable_threads(workspace, n);
    if (n == 0) return;
    float* base = reinterpret_cast<float*>(workspace.data());
    with_vec_path([&](auto path) {
      // Thread tid takes the sessions with id % nth == tid, each in row order.
      const auto run = [&](index_t tid, index_t nth) {
        Scratch scratch = scratch_at(base, tid);
        for (index_t t = 0; t < n; ++t) {
          const std::int32_t id = sessions[t];
          if (id < 0 || id % nth != tid) continue;
          write_row(path, *sessions_[static_cast<std::size_t>(id)], x.row(t), values.row(t),
                    scratch);
        }
      };
      parallel(threads, run);
    });
  }

  // The slots a read of each row selects and their weights (n x top_k each,
  // best first); for inspection and tests. Needs slots (config.sub_keys > 0).
  void select(MatrixView<const float> x, MatrixView<std::int32_t> slot_ids,
              MatrixView<float> slot_weights, VectorView<std::byte> workspace) const {
    MOEKIT_CHECK(has_slots(), Errc::kInvalidArgument,
                 "the memory has no slots (config.sub_keys = 0)");
    const index_t n = checked_rows(x);
    check_shape(slot_ids, n, config_.top_k, "slot_ids");
    check_shape(slot_weights, n, config_.top_k, "slot_weights");
    const Scratch scratch = one_thread_scratch(workspace, n);
    if (n == 0) return;
    with_vec_path([&](auto path) {
      for (index_t t = 0; t < n; ++t) {
        project(path, weights_.w_query, x.row(t), scratch.key);
        const Selection sel = select_slots(path, scratch.key, scratch);
        for (int j = 0; j < config_.top_k; ++j) {
          slot_ids(t, j) = sel.slot[j];
          slot_weights(t, j) = sel.weight[j];
        }
      }
    });
  }

  // The match gate's best cosine c of each row's query with its session's
  // kept keys (n, as read() computes it; -infinity for a session without
  // keys and for rows of session -1); for inspection, calibration and tests.
  // Needs the gate (config.match_keys > 0).
  void match(MatrixView<const float> x, VectorView<const std::int32_t> sessions,
             VectorView<float> cosine, VectorView<std::byte> workspace) const {
    MOEKIT_CHECK(has_match_gate(), Errc::kInvalidArgument,
                 "the memory has no match gate (config.match_keys = 0)");
    const index_t n = checked_rows(x);
    check_sessions(sessions, n);
    check_shape(cosine, n, "cosine");
    const Scratch scratch = one_thread_scratch(workspace, n);
    if (n == 0) return;
    with_vec_path([&](auto path) {
      for (index_t t = 0; t < n; ++t) {
        const std::int32_t id = sessions[t];
        if (id < 0) {
          cosine[t] = -std::numeric_limits<float>::infinity();
          continue;
        }
        project(path, weights_.w_query, x.row(t), scratch.key);
        cosine[t] = best_match(path, *sessions_[static_cast<std::size_t>(id)], scratch);
      }
    });
  }

  // g_match(c) = clamp((c - theta) / width, 0, 1), or c > theta ? 1 : 0 for
  // width 0 (the top of this file). NaN gives 0.
  float match_gate(float c) const {
    const float theta = config_.match_threshold, width = config_.match_width;
    if (!(c > theta)) return 0.0f;
    if (width == 0.0f) return 1.0f;
    return std::min(1.0f, (c - theta) / width);
  }

 private:
  struct SlotEntry {
    std::int32_t slot = 0, row = 0;
  };
  // One session's state. Value rows [0, used) are live; index lists them
  // sorted by slot id (lookup), recency from least to most recently written.
  struct Session {
    std::vector<float> fast;                // d_v x d_k
    std::vector<float> values;              // capacity x d_v
    std::vector<std::int32_t> slot_of_row;  // capacity
    std::vector<SlotEntry> index;           // capacity, [0, used) sorted by slot
    std::vector<std::int32_t> recency;      // capacity, [0, used) live
    index_t used = 0;
    std::uint64_t writes = 0;
    // The match gate's ring of the last match_keys write keys: rows
    // [0, match_kept) live, match_next the row the next write takes.
    std::vector<std::int8_t> match_keys;  // match_keys x d_k
    std::vector<float> match_scales;      // match_keys
    index_t match_kept = 0, match_next = 0;
  };
  // Per-thread scratch, carved from the workspace.
  struct Scratch {
    float* key;                // d_k: k or q
    float* read;               // d_v: o
    float* error;              // d_v: beta e
    float* scores;             // 2 n: the sub-key scores of both halves
    std::int32_t* dots;        // n: integer sub-key scores
    std::int32_t* half;        // d_k / 2: a quantised half key
    std::int32_t* whole;       // d_k (with the gate): a quantised key or query
    std::int32_t* match_dots;  // match_keys: integer cosines with the kept keys
    float* match_scores;       // match_keys: the cosines
  };
  struct Selection {
    std::int32_t slot[kMaxSlotTopK];
    float score[kMaxSlotTopK];
    float weight[kMaxSlotTopK];
    float sum_sq = 0.0f;  // sum_j weight_j^2
  };

  // Below this many rows per thread, another thread costs more than it saves.
  static constexpr index_t kMinRowsPerThread = 8;

  index_t slot_floats() const {
    const index_t n = config_.sub_keys;
    const index_t m = config_.match_keys, gate = m > 0 ? config_.d_key + 2 * m : 0;
    const index_t f = config_.d_key + 2 * config_.d_value + 3 * n + config_.d_key / 2 + gate;
    return (f + 15) / 16 * 16;  // slots never share a cache line
  }
  index_t slot_bytes() const { return slot_floats() * index_t{sizeof(float)}; }
  Scratch scratch_at(float* base, index_t slot) const {
    float* p = base + slot * slot_floats();
    const auto take = [&p](index_t count) { return std::exchange(p, p + count); };
    Scratch s{};
    s.key = take(config_.d_key);
    s.read = take(config_.d_value);
    s.error = take(config_.d_value);
    s.scores = take(2 * config_.sub_keys);
    // int32 and float share size and alignment: the integer arrays live in
    // the same float-aligned workspace.
    s.dots = reinterpret_cast<std::int32_t*>(take(config_.sub_keys));
    s.half = reinterpret_cast<std::int32_t*>(take(config_.d_key / 2));
    if (has_match_gate()) {
      s.whole = reinterpret_cast<std::int32_t*>(take(config_.d_key));
      s.match_dots = reinterpret_cast<std::int32_t*>(take(config_.match_keys));
      s.match_scores = take(config_.match_keys);
    }
    return s;
  }

  // The threads a call of n rows uses, after checking the workspace.
  index_t usable_threads(VectorView<std::byte> workspace, index_t n) const {
    check_view(workspace, "workspace");
    MOEKIT_CHECK(workspace.size() >= slot_bytes(), Errc::kShapeMismatch, "workspace has ",
                 workspace.size(), " bytes, at least ", slot_bytes(),
                 " needed (see workspace_size)");
    MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace.data()) % alignof(float) == 0,
                 Errc::kInvalidArgument, "workspace is not aligned to ", alignof(float), " bytes");
    return std::clamp<index_t>(n / kMinRowsPerThread, 1,
                               std::min<index_t>(workspace.size() / slot_bytes(), max_threads()));
  }

  // The rows of x after checking it is n x d_model.
  index_t checked_rows(MatrixView<const float> x) const {
    check_view(x, "x");
    check_shape(x, x.rows(), config_.d_model, "x");
    return x.rows();
  }

  // The first thread's scratch, for the one-thread inspection calls, after
  // checking the workspace.
  Scratch one_thread_scratch(VectorView<std::byte> workspace, index_t n) const {
    usable_threads(workspace, n);
    return scratch_at(reinterpret_cast<float*>(workspace.data()), 0);
  }

  template <class F>
  static void parallel(index_t threads, const F& run) {
    if (threads > 1) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(static_cast <int>(threads))
      run(thread_id(), num_threads());
#endif
    } else {
      run(0, 1);
    }
  }

  float* value_row(Session& s, std::int32_t row) const {
    return s.values.data() + static_cast<std::ptrdiff_t>(row) * config_.d_value;
  }
  const float* value_row(const Session& s, std::int32_t row) const {
    return s.values.data() + static_cast<std::ptrdiff_t>(row) * config_.d_value;
  }

  // The row holding `slot`, or -1.
  static std::int32_t find_row(const Session& s, std::int32_t slot) {
    const auto end = s.index.begin() + s.used;
    const auto it = std::lower_bound(s.index.begin(), end, slot,
                                     [](const SlotEntry& e, std::int32_t v) { return e.slot < v; });
    return it != end && it->slot == slot ? it->row : -1;
  }

  // Moves `row` to the most recent end of the recency list.
  static void touch(Session& s, std::int32_t row) {
    const auto begin = s.recency.begin(), end = begin + s.used;
    const auto it = std::find(begin, end, row);
    std::rotate(it, it + 1, end);
  }

  // A zeroed row for a slot the session does not hold: a free one, else the
  // least recently written (never one of the current write's slots: those
  // are at the recent end, and the capacity is at least top_k).
  std::int32_t insert_slot(Session& s, std::int32_t slot) const {
    const auto by_slot = [](const SlotEntry& e, std::int32_t v) { return e.slot < v; };
    std::int32_t row = 0;
    if (s.used < config_.slot_capacity) {
      row = static_cast<std::int32_t>(s.used);
      s.recency[static_cast<std::size_t>(s.used)] = row;
      ++s.used;
    } else {
      row = s.recency.front();
      const auto end = s.index.begin() + s.used;
      const auto old = std::lower_bound(s.index.begin(), end,
                                        s.slot_of_row[static_cast<std::size_t>(row)], by_slot);
      std::move(old + 1, end, old);  // the evicted slot leaves the index
      std::rotate(s.recency.begin(), s.recency.begin() + 1, s.recency.begin() + s.used);
    }
    std::fill_n(value_row(s, row), config_.d_value, 0.0f);
    s.slot_of_row[static_cast<std::size_t>(row)] = slot;
    // The index holds used - 1 entries now; the new one goes in its place.
    const auto end = s.index.begin() + (s.used - 1);
    const auto it = std::lower_bound(s.index.begin(), end, slot, by_slot);
    std::move_backward(it, end, end + 1);
    *it = {slot, row};
    return row;
  }

  // The match gate's ring: row i of the kept keys, oldest first, and a row's keys.
  index_t match_ring_row(const Session& s, index_t i) const {
    return (s.match_next + config_.match_keys - s.match_kept + i) % config_.match_keys;
  }
  std::int8_t* match_key_row(Session& s, index_t row) const {
    return s.match_keys.data() + row * config_.d_key;
  }
  const std::int8_t* match_key_row(const Session& s, index_t row) const {
    return s.match_keys.data() + row * config_.d_key;
  }
  static void clear_match_keys(Session& s) {
    std::fill(s.match_keys.begin(), s.match_keys.end(), std::int8_t{0});
    std::fill(s.match_scales.begin(), s.match_scales.end(), 0.0f);
    s.match_kept = 0;
    s.match_next = 0;
  }

  // ---- per-row procedures, for one vector path ----

  // dst = w x / ||w x|| (d_k).
  template <class P>
  void project(P path, MatrixView<const float> w, const float* x, float* dst) const {
    row_dots(path, w, x, dst);
    normalize(path, dst, config_.d_key);
  }

  // sigma(w . x + bias), or the fixed value when w is empty.
  template <class P>
  float rate(P path, VectorView<const float> w, float bias, float fixed, const float* x) const {
    if (w.empty()) return fixed;
    return sigmoid_of(path, dot(path, w.data(), x, config_.d_model) + bias);
  }

  // s_a beats s_b (the library's order: higher first, then the lower index);
  // NaN ranks lowest.
  static bool better(float sa, std::int32_t ia, float sb, std::int32_t ib) {
    const float inf = std::numeric_limits<float>::infinity();
    if (std::isnan(sa)) sa = -inf;
    if (std::isnan(sb)) sb = -inf;
    return sa > sb || (sa == sb && ia < ib);
  }
  // Offers (score, id) to a list of at most k entries kept best first.
  static void offer(float score, std::int32_t id, int k, int& count, float* scores,
                    std::int32_t* ids) {
    if (count == k && !better(score, id, scores[k - 1], ids[k - 1])) return;
    int pos = count < k ? count++ : k - 1;
    for (; pos > 0 && better(score, id, scores[pos - 1], ids[pos - 1]); --pos) {
      scores[pos] = scores[pos - 1];
      ids[pos] = ids[pos - 1];
    }
    scores[pos] = score;
    ids[pos] = id;
  }

  // The top-k slots of unit vector u and their weights.
  template <class P>
  Selection select_slots(P path, const float* u, const Scratch& s) const {
    const int k = config_.top_k;
    const index_t n = config_.sub_keys, h = config_.d_key / 2;
    float half_score[2][kMaxSlotTopK];
    std::int32_t half_id[2][kMaxSlotTopK];
    const Int8Rows* books[2] = {&weights_.sub_keys_a, &weights_.sub_keys_b};
    for (int part = 0; part < 2; ++part) {
      const float q_scale = quantize_row(path, u + part * h, h, s.half);
      dot_i8_rows(path, books[part]->keys, s.half, s.dots);
      float* scores = s.scores + part * n;
      scale_scores(path, s.dots, books[part]->scale.data(), q_scale, n, scores);
      int count = 0;
      for (index_t i = 0; i < n; ++i) {
        offer(scores[i], static_cast<std::int32_t>(i), k, count, half_score[part], half_id[part]);
      }
    }
    Selection sel;
    int count = 0;
    for (int a = 0; a < k; ++a) {
      for (int b = 0; b < k; ++b) {
        const auto slot = static_cast<std::int32_t>(half_id[0][a] * n + half_id[1][b]);
        offer(half_score[0][a] + half_score[1][b], slot, k, count, sel.score, sel.slot);
      }
    }
    sel.sum_sq = softmax_weights(path, sel.score, k, config_.slot_sharpness, sel.weight);
    return sel;
  }

  // o += sum_j w_j V[slot_j] over the selected slots the session holds;
  // rows[j] receives each slot's row or -1.
  template <class P>
  void add_slot_reads(P path, const Session& st, const Selection& sel, float* o,
                      std::int32_t* rows) const {
    for (int j = 0; j < config_.top_k; ++j) {
      rows[j] = find_row(st, sel.slot[j]);
      if (rows[j] >= 0) axpy(path, o, value_row(st, rows[j]), config_.d_value, sel.weight[j]);
    }
  }

  // The best cosine of unit query s.key with the session's kept keys
  // (-infinity without keys): the query quantised as the keys, exact int32
  // dot products, then scaled (scale_scores); max is exact in any order.
  template <class P>
  float best_match(P path, const Session& st, const Scratch& s) const {
    const index_t kept = st.match_kept;
    float best = -std::numeric_limits<float>::infinity();
    if (kept == 0) return best;
    const float q_scale = quantize_row(path, s.key, config_.d_key, s.whole);
    dot_i8_rows(path, MatrixView<const std::int8_t>(st.match_keys.data(), kept, config_.d_key),
                s.whole, s.match_dots);
    scale_scores(path, s.match_dots, st.match_scales.data(), q_scale, kept, s.match_scores);
    for (index_t i = 0; i < kept; ++i) best = std::max(best, s.match_scores[i]);
    return best;
  }

  // Keeps unit key s.key in the ring (over the oldest when it is full).
  template <class P>
  void keep_match_key(P path, Session& st, const Scratch& s) const {
    const index_t row = st.match_next;
    st.match_scales[static_cast<std::size_t>(row)] =
        quantize_row(path, s.key, config_.d_key, s.whole);
    std::int8_t* dst = match_key_row(st, row);
    for (index_t j = 0; j < config_.d_key; ++j) dst[j] = static_cast<std::int8_t>(s.whole[j]);
    st.match_next = (row + 1) % config_.match_keys;
    st.match_kept = std::min(st.match_kept + 1, config_.match_keys);
  }

  template <class P>
  void read_row(P path, const Session& st, const float* x, const float* z, float* y,
                Scratch& s) const {
    const index_t dv = config_.d_value;
    project(path, weights_.w_query, x, s.key);
    // A closed gate leaves z alone and skips the read.
    const float opened = has_match_gate() ? match_gate(best_match(path, st, s)) : 1.0f;
    if (opened == 0.0f) {
      if (y != z) std::copy_n(z, dv, y);
      return;
    }
    if (config_.fast_weights) {
      row_dots(path, MatrixView<const float>(st.fast.data(), dv, config_.d_key), s.key, s.read);
    } else {
      std::fill_n(s.read, dv, 0.0f);
    }
    if (has_slots()) {
      std::int32_t rows[kMaxSlotTopK];
      add_slot_reads(path, st, select_slots(path, s.key, s), s.read, rows);
    }
    const float g = rate(path, weights_.w_gate, weights_.gate_bias, config_.gate, x) * opened;
    mix_row(path, z, s.read, dv, g, y);
  }

  template <class P>
  void write_row(P path, Session& st, const float* x, const float* v, Scratch& s) const {
    const index_t dv = config_.d_value, dk = config_.d_key;
    const float a = config_.decay;
    project(path, weights_.w_key, x, s.key);
    const float b = rate(path, weights_.w_write, weights_.write_bias, config_.write_strength, x);
    // The read at k.
    if (config_.fast_weights) {
      row_dots(path, MatrixView<const float>(st.fast.data(), dv, dk), s.key, s.read);
    } else {
      std::fill_n(s.read, dv, 0.0f);
    }
    Selection sel;
    std::int32_t rows[kMaxSlotTopK] = {};
    if (has_slots()) {
      sel = select_slots(path, s.key, s);
      add_slot_reads(path, st, sel, s.read, rows);
    }
    // beta e, with beta = b / ||phi||^2.
    const float norm2 = (config_.fast_weights ? 1.0f : 0.0f) + (has_slots() ? sel.sum_sq : 0.0f);
    const float beta = b / norm2;
    for (index_t i = 0; i < dv; ++i) s.error[i] = beta * (s.read[i] - v[i]);
    if (config_.fast_weights) {
      delta_rows(path, MatrixView<float>(st.fast.data(), dv, dk), s.error, s.key, a);
    }
    if (has_slots()) {
      // Held slots first become the most recent, so that inserting the
      // others can never evict one of them.
      for (int j = 0; j < config_.top_k; ++j) {
        if (rows[j] >= 0) touch(st, rows[j]);
      }
      for (int j = 0; j < config_.top_k; ++j) {
        if (rows[j] < 0) rows[j] = insert_slot(st, sel.slot[j]);
        decay_subtract(path, value_row(st, rows[j]), s.error, dv, a, sel.weight[j]);
      }
    }
    if (has_match_gate()) keep_match_key(path, st, s);
    ++st.writes;
  }

  // ---- validation ----

  Session& open_session(std::int32_t session, const char* name) {
    return const_cast<Session&>(std::as_const(*this).open_session(session, name));
  }
  const Session& open_session(std::int32_t session, const char* name) const {
    MOEKIT_CHECK(session >= 0 && session < config_.max_sessions, Errc::kOutOfRange, name, " = ",
                 session, " is outside [0, max_sessions = ", config_.max_sessions, ")");
    const auto& s = sessions_[static_cast<std::size_t>(session)];
    MOEKIT_CHECK(s != nullptr, Errc::kInvalidArgument, name, " = ", session,
                 " is not open (closed, or never opened)");
    return *s;
  }

  void check_sessions(VectorView<const std::int32_t> sessions, index_t n) const {
    check_shape(sessions, n, "sessions");
    for (index_t t = 0; t < n; ++t) {
      const std::int32_t id = sessions[t];
      MOEKIT_CHECK(id >= -1 && id < config_.max_sessions, Errc::kOutOfRange, "sessions[", t,
                   "] = ", id, " is outside [-1, max_sessions = ", config_.max_sessions, ")");
      MOEKIT_CHECK(id < 0 || sessions_[static_cast<std::size_t>(id)] != nullptr,
                   Errc::kInvalidArgument, "sessions[", t, "] = ", id,
                   " is not open (closed, or never opened)");
    }
  }

  static void check_finite(const float* row, index_t n, const char* name, index_t t) {
    for (index_t j = 0; j < n; ++j) {
      MOEKIT_CHECK(std::isfinite(row[j]), Errc::kNonFinite, name, "(", t, ", ", j, ") = ", row[j],
                   " is not finite (a write would poison the session)");
    }
  }

  static void check_config(const SessionMemoryConfig& c) {
    MOEKIT_CHECK(c.d_model >= 1 && c.d_key >= 1 && c.d_value >= 1, Errc::kInvalidArgument,
                 "config sizes must be >= 1, got d_model = ", c.d_model, ", d_key = ", c.d_key,
                 ", d_value = ", c.d_value);
    MOEKIT_CHECK(c.fast_weights || c.sub_keys > 0, Errc::kInvalidArgument,
                 "config has no memory: fast_weights is false and sub_keys = 0");
    MOEKIT_CHECK(c.sub_keys >= 0 && c.sub_keys <= kMaxSubKeys, Errc::kInvalidArgument,
                 "config.sub_keys = ", c.sub_keys, " is outside [0, ", kMaxSubKeys, "]");
    if (c.sub_keys > 0) {
      MOEKIT_CHECK(c.d_key % 2 == 0 && c.d_key / 2 <= kMaxInt8DotLength, Errc::kInvalidArgument,
                   "config.d_key = ", c.d_key,
                   " must be even (two halves for the sub-keys) and at most ",
                   2 * kMaxInt8DotLength);
      MOEKIT_CHECK(c.top_k >= 1 && c.top_k <= kMaxSlotTopK && c.top_k <= c.sub_keys,
                   Errc::kInvalidArgument, "config.top_k = ", c.top_k, " is outside [1, min(",
                   kMaxSlotTopK, ", sub_keys = ", c.sub_keys, ")]");
      MOEKIT_CHECK(c.slot_capacity >= c.top_k && c.slot_capacity <= c.sub_keys * c.sub_keys,
                   Errc::kInvalidArgument, "config.slot_capacity = ", c.slot_capacity,
                   " is outside [top_k = ", c.top_k, ", sub_keys^2 = ", c.sub_keys * c.sub_keys,
                   "]");
      MOEKIT_CHECK(std::isfinite(c.slot_sharpness) && c.slot_sharpness > 0.0f,
                   Errc::kInvalidArgument, "config.slot_sharpness = ", c.slot_sharpness,
                   " must be finite and > 0");
    }
    MOEKIT_CHECK(c.decay > 0.0f && c.decay <= 1.0f, Errc::kInvalidArgument,
                 "config.decay = ", c.decay, " is outside (0, 1]");
    MOEKIT_CHECK(c.write_strength > 0.0f && c.write_strength <= 1.0f, Errc::kInvalidArgument,
                 "config.write_strength = ", c.write_strength, " is outside (0, 1]");
    MOEKIT_CHECK(c.gate >= 0.0f && c.gate <= 1.0f, Errc::kInvalidArgument, "config.gate = ", c.gate,
                 " is outside [0, 1]");
    MOEKIT_CHECK(c.max_sessions >= 1 && c.max_sessions <= std::numeric_limits<std::int32_t>::max(),
                 Errc::kInvalidArgument, "config.max_sessions = ", c.max_sessions,
                 " is outside [1, 2^31 - 1]");
    MOEKIT_CHECK(c.match_keys >= 0, Errc::kInvalidArgument, "config.match_keys = ", c.match_keys,
                 " is negative");
    if (c.match_keys > 0) {
      MOEKIT_CHECK(c.d_key <= kMaxInt8DotLength, Errc::kInvalidArgument, "config.d_key = ", c.d_key,
                   " is more than the match gate's int8 keys allow (", kMaxInt8DotLength, ")");
      MOEKIT_CHECK(c.match_threshold >= -1.0f && c.match_threshold <= 1.0f, Errc::kInvalidArgument,
                   "config.match_threshold = ", c.match_threshold, " is outside [-1, 1]");
      MOEKIT_CHECK(std::isfinite(c.match_width) && c.match_width >= 0.0f, Errc::kInvalidArgument,
                   "config.match_width = ", c.match_width, " must be finite and >= 0");
    }
  }

  // restore()'s gate keys: none without the gate, else at most match_keys
  // rows of d_k int8 in [-127, 127] and as many finite scales >= 0.
  void check_restored_match_keys(MatrixView<const std::int8_t> keys,
                                 VectorView<const float> scales) const {
    check_view(keys, "match_keys");
    check_view(scales, "match_scales");
    const index_t kept = scales.size();
    MOEKIT_CHECK(kept <= config_.match_keys, Errc::kShapeMismatch, "match_scales has ", kept,
                 " keys, more than the ", config_.match_keys,
                 " the match gate keeps (config.match_keys)");
    if (kept == 0 && keys.empty()) return;
    check_shape(keys, kept, config_.d_key, "match_keys");
    for (index_t i = 0; i < kept; ++i) {
      MOEKIT_CHECK(std::isfinite(scales[i]) && scales[i] >= 0.0f, Errc::kInvalidArgument,
                   "match_scales[", i, "] = ", scales[i], " must be finite and >= 0");
      for (index_t j = 0; j < config_.d_key; ++j) {
        MOEKIT_CHECK(keys(i, j) != -128, Errc::kInvalidArgument, "match_keys(", i, ", ", j,
                     ") = -128 is outside [-127, 127] (quantize_rows' range)");
      }
    }
  }

  void check_weights(const SessionMemoryWeights& w) const {
    const SessionMemoryConfig& c = config_;
    check_shape(w.w_key, c.d_key, c.d_model, "weights.w_key");
    check_shape(w.w_query, c.d_key, c.d_model, "weights.w_query");
    if (!w.w_write.empty()) check_shape(w.w_write, c.d_model, "weights.w_write");
    if (!w.w_gate.empty()) check_shape(w.w_gate, c.d_model, "weights.w_gate");
    MOEKIT_CHECK(std::isfinite(w.write_bias) && std::isfinite(w.gate_bias), Errc::kNonFinite,
                 "weights.write_bias = ", w.write_bias, " and weights.gate_bias = ", w.gate_bias,
                 " must be finite");
    if (c.sub_keys > 0) {
      check_shape(w.sub_keys_a.keys, c.sub_keys, c.d_key / 2, "weights.sub_keys_a.keys");
      check_shape(w.sub_keys_a.scale, c.sub_keys, "weights.sub_keys_a.scale");
      check_shape(w.sub_keys_b.keys, c.sub_keys, c.d_key / 2, "weights.sub_keys_b.keys");
      check_shape(w.sub_keys_b.scale, c.sub_keys, "weights.sub_keys_b.scale");
      for (const Int8Rows* keys : {&w.sub_keys_a, &w.sub_keys_b}) {
        for (index_t r = 0; r < c.sub_keys; ++r) {
          MOEKIT_CHECK(std::isfinite(keys->scale[r]) && keys->scale[r] >= 0.0f,
                       Errc::kInvalidArgument, "weights.sub_keys_",
                       keys == &w.sub_keys_a ? "a" : "b", ".scale[", r, "] = ", keys->scale[r],
                       " must be finite and >= 0");
          for (index_t j = 0; j < c.d_key / 2; ++j) {
            MOEKIT_CHECK(keys->keys(r, j) != -128, Errc::kInvalidArgument, "weights.sub_keys_",
                         keys == &w.sub_keys_a ? "a" : "b", ".keys(", r, ", ", j,
                         ") = -128 is outside [-127, 127] (quantize_rows' range)");
          }
        }
      }
    }
  }

  SessionMemoryConfig config_;
  SessionMemoryWeights weights_;
  std::vector<std::unique_ptr<Session>> sessions_;
  std::set<std::int32_t> freed_;  // closed ids below next_unused_
  index_t next_unused_ = 0;
  index_t open_count_ = 0;
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
