// Session memory (moekit/nn/session_memory.hpp, its kernels in
// moekit/cpu/memory_kernels.hpp, snapshots in moekit/io/session_memory.hpp):
// reads and writes against a float64 reference written here (fast weights,
// slots, both; fixed and learned rates; decay; eviction), the exact-write
// property, int8 scoring against its definition, int8 keys against float
// keys, top-k ties and the product-key search against a brute force, the
// match gate (its int8 cosines against float64 ones, its ring of keys, its
// ramp against an ungated twin), isolation of sessions, batch / thread /
// ISA-path invariance, reset, close, replay, snapshots, the frozen weights'
// fingerprint and every bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "batch_invariance.hpp"
#include "expect_error.hpp"
#include "moekit/cpu/isa.hpp"
#include "moekit/cpu/memory_kernels.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/io/session_memory.hpp"
#include "moekit/nn/session_memory.hpp"
#include "strided_matrix.hpp"

namespace {

using moekit::Errc;
using moekit::index_t;
using moekit::MatrixView;
using moekit::VectorView;
using moekit::cpu::Isa;
using moekit::cpu::SessionMemory;
using moekit::cpu::SessionMemoryConfig;
using moekit::cpu::SessionMemoryWeights;
using moekit_test::expect_error;
using moekit_test::same_bits;
using moekit_test::ThreadCount;
using Mat = moekit_test::StridedMatrix;

std::size_t sz(index_t v) { return static_cast<std::size_t>(v); }

// ---- set-up ---------------------------------------------------------------------------------

// Random frozen weights for a config: projections, optional learned rates,
// codebooks quantised by quantize_rows.
struct Frozen {
  SessionMemoryConfig config;
  std::vector<float> w_key, w_query, w_write, w_gate;
  std::vector<std::int8_t> keys_a, keys_b;
  std::vector<float> scale_a, scale_b;
  float write_bias = 0.3f, gate_bias = -0.2f;
  bool shared_query = true;

  Frozen(SessionMemoryConfig c, std::uint32_t seed, bool learned_rates, bool shared = true)
      : config(c), shared_query(shared) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    const auto fill = [&](std::vector<float>& v, index_t n) {
      v.resize(sz(n));
      for (float& e : v) e = normal(rng);
    };
    fill(w_key, c.d_key * c.d_model);
    if (!shared) fill(w_query, c.d_key * c.d_model);
    if (learned_rates) {
      fill(w_write, c.d_model);
      fill(w_gate, c.d_model);
    }
    if (c.sub_keys > 0) {
      const index_t h = c.d_key / 2;
      for (auto [q, s] : {std::pair{&keys_a, &scale_a}, std::pair{&keys_b, &scale_b}}) {
        std::vector<float> w;
        fill(w, c.sub_keys * h);
        q->resize(w.size());
        s->resize(sz(c.sub_keys));
        moekit::cpu::quantize_rows({w.data(), c.sub_keys, h}, {q->data(), c.sub_keys, h},
                                   {s->data(), c.sub_keys});
      }
    }
  }

  // The weights; with `keys_as_queries`, w_query is w_key (a write's slots
  // are then what select() reports).
  SessionMemoryWeights weights(bool keys_as_queries = false) const {
    const index_t h = config.d_key / 2, n = config.sub_keys;
    SessionMemoryWeights w;
    w.w_key = {w_key.data(), config.d_key, config.d_model};
    w.w_query = shared_query || keys_as_queries
                    ? w.w_key
                    : MatrixView<const float>(w_query.data(), config.d_key, config.d_model);
    if (!w_write.empty()) {
      w.w_write = {w_write.data(), config.d_model};
      w.write_bias = write_bias;
      w.w_gate = {w_gate.data(), config.d_model};
      w.gate_bias = gate_bias;
    }
    if (n > 0) {
      w.sub_keys_a = {{keys_a.data(), n, h}, {scale_a.data(), n}};
      w.sub_keys_b = {{keys_b.data(), n, h}, {scale_b.data(), n}};
    }
    return w;
  }
};

SessionMemoryConfig small_config(bool fast, index_t sub_keys) {
  SessionMemoryConfig c;
  c.d_model = 37;
  c.d_key = 20;
  c.d_value = 19;
  c.fast_weights = fast;
  c.sub_keys = sub_keys;
  c.top_k = 3;
  c.slot_capacity = sub_keys > 0 ? 7 : 0;
  c.slot_sharpness = 4.0f;
  c.decay = 0.9f;
  c.write_strength = 0.7f;
  c.gate = 0.8f;
  c.max_sessions = 4;
  return c;
}

// small_config with a match gate of 3 keys whose ramp runs from cosine 0.3
// to 0.7 (random rows then land below, on and above it).
SessionMemoryConfig gated(SessionMemoryConfig c) {
  c.match_keys = 3;
  c.match_threshold = 0.3f;
  c.match_width = 0.4f;
  return c;
}

std::vector<std::byte> workspace_for(const SessionMemory& m) {
  return std::vector<std::byte>(sz(m.workspace_size()));
}
VectorView<std::byte> view(std::vector<std::byte>& ws) {
  return {ws.data(), static_cast<index_t>(ws.size())};
}

std::vector<float> normal_rows(index_t rows, index_t cols, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(sz(rows * cols));
  for (float& e : v) e = normal(rng);
  return v;
}

// The session's state as the snapshot's bytes: equal bytes, equal state.
std::vector<std::byte> state(const SessionMemory& m, std::int32_t s) {
  return moekit::io::session_bytes(m, s);
}

// ---- float64 reference ------------------------------------------------------------------

struct RefSession {
  std::vector<double> S;                                            // d_v x d_k
  std::vector<std::pair<std::int32_t, std::vector<double>>> slots;  // least recent first
  std::deque<std::vector<double>> keys;  // the match gate's: the last match_keys write keys
};

struct Selection {
  std::vector<std::int32_t> slot;
  std::vector<double> weight;
};

class Reference {
 public:
  explicit Reference(const Frozen& setup) : s_(setup), c_(setup.config) {}

  RefSession fresh() const { return {std::vector<double>(sz(c_.d_value * c_.d_key), 0.0), {}, {}}; }

  std::vector<double> unit(const std::vector<float>& w, const float* x) const {
    std::vector<double> k(sz(c_.d_key), 0.0);
    double norm = 0;
    for (index_t i = 0; i < c_.d_key; ++i) {
      for (index_t j = 0; j < c_.d_model; ++j) k[sz(i)] += double{w[sz(i * c_.d_model + j)]} * x[j];
      norm += k[sz(i)] * k[sz(i)];
    }
    if (norm > 0) {
      for (double& e : k) e /= std::sqrt(norm);
    }
    return k;
  }
  double rate(const std::vector<float>& w, float bias, float fixed, const float* x) const {
    if (w.empty()) return fixed;
    double z = bias;
    for (index_t j = 0; j < c_.d_model; ++j) z += double{w[sz(j)]} * x[j];
    return 1.0 / (1.0 + std::exp(-z));
  }
  const std::vector<float>& query_weights() const {
    return s_.shared_query ? s_.w_key : s_.w_query;
  }

  // o(u) = S u + sum_j w_j V[slot_j].
  std::vector<double> recall(const RefSession& r, const std::vector<double>& u,
                             const Selection& sel) const {
    std::vector<double> o(sz(c_.d_value), 0.0);
    if (c_.fast_weights) {
      for (index_t i = 0; i < c_.d_value; ++i)
        for (index_t j = 0; j < c_.d_key; ++j) o[sz(i)] += r.S[sz(i * c_.d_key + j)] * u[sz(j)];
    }
    for (std::size_t j = 0; j < sel.slot.size(); ++j) {
      for (const auto& [slot, value] : r.slots) {
        if (slot != sel.slot[j]) continue;
        for (index_t i = 0; i < c_.d_value; ++i) o[sz(i)] += sel.weight[j] * value[sz(i)];
      }
    }
    return o;
  }

  // The match gate's best cosine of x's query with the kept keys, in float64
  // and unquantised (-infinity without keys), and the bound on its distance
  // to the int8 cosine: |q - q8 s_q| <= sqrt(d_k) s_q / 2 with s_q = max|q| / 127,
  // the same for the key, both unit vectors.
  std::pair<double, double> best_cosine(const RefSession& r, const float* x) const {
    const std::vector<double> q = unit(query_weights(), x);
    const auto amax = [](const std::vector<double>& v) {
      double m = 0;
      for (const double e : v) m = std::max(m, std::abs(e));
      return m;
    };
    double best = -std::numeric_limits<double>::infinity(), bound = 0;
    for (const std::vector<double>& k : r.keys) {
      double c = 0;
      for (index_t j = 0; j < c_.d_key; ++j) c += q[sz(j)] * k[sz(j)];
      best = std::max(best, c);
      bound = std::max(bound, std::sqrt(double(c_.d_key)) * (amax(q) + amax(k)) / 254.0);
    }
    return {best, bound + 1e-6};
  }
  // g_match(c), in float64.
  double match_gate(double c) const {
    if (c_.match_keys == 0) return 1.0;
    if (!(c > c_.match_threshold)) return 0.0;
    if (c_.match_width == 0.0f) return 1.0;
    return std::min(1.0, (c - c_.match_threshold) / c_.match_width);
  }

  // The read, with the gate's cosine as the memory computed it (int8, like
  // the slots' selection; best_cosine checks it).
  std::vector<double> read(const RefSession& r, const float* x, const float* z,
                           const Selection& sel, double cosine) const {
    const std::vector<double> o = recall(r, unit(query_weights(), x), sel);
    const double g = rate(s_.w_gate, s_.gate_bias, c_.gate, x) * match_gate(cosine);
    std::vector<double> y(sz(c_.d_value));
    for (index_t i = 0; i < c_.d_value; ++i) y[sz(i)] = z[i] + g * o[sz(i)];
    return y;
  }

  void write(RefSession& r, const float* x, const float* v, const Selection& sel) const {
    const std::vector<double> k = unit(s_.w_key, x);
    const double b = rate(s_.w_write, s_.write_bias, c_.write_strength, x);
    const std::vector<double> o = recall(r, k, sel);
    double sum_sq = 0;
    for (const double w : sel.weight) sum_sq += w * w;
    const double beta = b / ((c_.fast_weights ? 1.0 : 0.0) + sum_sq);
    std::vector<double> e(sz(c_.d_value));
    for (index_t i = 0; i < c_.d_value; ++i) e[sz(i)] = beta * (o[sz(i)] - v[i]);
    const double a = c_.decay;
    if (c_.match_keys > 0) {
      r.keys.push_back(k);
      if (static_cast<index_t>(r.keys.size()) > c_.match_keys) r.keys.pop_front();
    }
    if (c_.fast_weights) {
      for (index_t i = 0; i < c_.d_value; ++i)
        for (index_t j = 0; j < c_.d_key; ++j) {
          double& sij = r.S[sz(i * c_.d_key + j)];
          sij = a * sij - e[sz(i)] * k[sz(j)];
        }
    }
    if (sel.slot.empty()) return;
    // Held slots become the most recent (in selection order), then the others
    // come in, the least recently written leaving when full.
    const auto find = [&r](std::int32_t slot) {
      return std::find_if(r.slots.begin(), r.slots.end(),
                          [slot](const auto& p) { return p.first == slot; });
    };
    for (const std::int32_t slot : sel.slot) {
      const auto it = find(slot);
      if (it != r.slots.end()) std::rotate(it, it + 1, r.slots.end());
    }
    for (const std::int32_t slot : sel.slot) {
      if (find(slot) != r.slots.end()) continue;
      if (static_cast<index_t>(r.slots.size()) == c_.slot_capacity) r.slots.erase(r.slots.begin());
      r.slots.push_back({slot, std::vector<double>(sz(c_.d_value), 0.0)});
    }
    for (std::size_t j = 0; j < sel.slot.size(); ++j) {
      auto& value = find(sel.slot[j])->second;
      for (index_t i = 0; i < c_.d_value; ++i)
        value[sz(i)] = a * value[sz(i)] - sel.weight[j] * e[sz(i)];
    }
  }

 private:
  const Frozen& s_;
  SessionMemoryConfig c_;
};

// The selection of row x by `m` (its w_query), as the reference takes it.
Selection selection_of(const SessionMemory& m, const float* x, std::vector<std::byte>& ws) {
  Selection sel;
  if (!m.has_slots()) return sel;
  const int k = m.config().top_k;
  std::vector<std::int32_t> ids(sz(k));
  std::vector<float> w(sz(k));
  m.select({x, 1, m.config().d_model}, {ids.data(), 1, k}, {w.data(), 1, k}, view(ws));
  sel.slot = ids;
  sel.weight.assign(w.begin(), w.end());
  return sel;
}

// The match gate's cosine of row x in session s, as `m` computes it.
double cosine_of(const SessionMemory& m, const float* x, std::int32_t s,
                 std::vector<std::byte>& ws) {
  if (!m.has_match_gate()) return 1.0;
  float c = 0;
  m.match({x, 1, m.config().d_model}, {&s, 1}, {&c, 1}, view(ws));
  return c;
}

double max_abs_diff(const std::vector<double>& a, const float* b) {
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - double{b[i]}));
  return d;
}

// ---- against the reference ----------------------------------------------------------------

struct Variant {
  const char* name;
  bool fast;
  index_t sub_keys;
  bool learned_rates;
  bool shared_query;
  bool match_gate = false;
};

void check_against_reference(const Variant& v) {
  SCOPED_TRACE(v.name);
  const SessionMemoryConfig base = small_config(v.fast, v.sub_keys);
  const Frozen setup(v.match_gate ? gated(base) : base, 11, v.learned_rates, v.shared_query);
  const SessionMemoryConfig& c = setup.config;
  SessionMemory memory(c, setup.weights());
  // Write selections come from a twin whose queries are the keys.
  const SessionMemory keys_twin(c, setup.weights(/*keys_as_queries=*/true));
  const Reference ref(setup);
  std::vector<std::byte> ws = workspace_for(memory);
  const std::int32_t s0 = memory.open(), s1 = memory.open();
  std::vector<RefSession> refs{ref.fresh(), ref.fresh()};

  std::mt19937 rng(5);
  // With the gate, reads mix a session's earlier corrections (kept or
  // evicted from its ring) with noise, so that they land on every part of
  // the ramp; gate_seen counts the rows closed, partly and fully open.
  std::vector<std::vector<float>> written(2);
  int gate_seen[3] = {};
  for (int round = 0; round < 8; ++round) {
    // A batch of corrections over both sessions (and rows without one).
    const index_t n = 5;
    const std::vector<float> x = normal_rows(n, c.d_model, rng);
    const std::vector<float> values = normal_rows(n, c.d_value, rng, 2.0f);
    std::vector<std::int32_t> ids(sz(n));
    for (index_t t = 0; t < n; ++t) ids[sz(t)] = t % 3 == 2 ? -1 : (t + round) % 2 == 0 ? s0 : s1;
    memory.write({x.data(), n, c.d_model}, {values.data(), n, c.d_value}, {ids.data(), n},
                 view(ws));
    for (index_t t = 0; t < n; ++t) {
      if (ids[sz(t)] < 0) continue;
      const float* xt = x.data() + t * c.d_model;
      ref.write(refs[sz(ids[sz(t)])], xt, values.data() + t * c.d_value,
                selection_of(keys_twin, xt, ws));
      written[sz(ids[sz(t)])].insert(written[sz(ids[sz(t)])].end(), xt, xt + c.d_model);
    }
    // Reads of fresh rows in both sessions, outputs poisoned and strided.
    const index_t m = 6;
    std::vector<float> xq = normal_rows(m, c.d_model, rng);
    Mat z(m, c.d_value), y(m, c.d_value);
    z.randomize(rng);
    y.poison();
    std::vector<std::int32_t> read_ids(sz(m));
    for (index_t t = 0; t < m; ++t) read_ids[sz(t)] = t == 4 ? -1 : t % 2 == 0 ? s0 : s1;
    if (c.match_keys > 0) {
      for (index_t t = 0; t < m; ++t) {
        if (read_ids[sz(t)] < 0) continue;
        const std::vector<float>& past = written[sz(read_ids[sz(t)])];
        const index_t count = static_cast<index_t>(past.size()) / c.d_model;
        const index_t back = std::min(count, (t + round) % 5 + 1);  // 1: the latest
        const float noise = 0.25f * static_cast<float>((t + 2 * round) % 6);
        for (index_t j = 0; j < c.d_model; ++j) {
          float& e = xq[sz(t * c.d_model + j)];
          e = past[sz((count - back) * c.d_model + j)] + noise * e;
        }
      }
    }
    memory.read({xq.data(), m, c.d_model}, {read_ids.data(), m}, z.cview(), y.view(), view(ws));
    ASSERT_TRUE(y.padding_untouched());
    for (index_t t = 0; t < m; ++t) {
      const float* xt = xq.data() + t * c.d_model;
      if (read_ids[sz(t)] < 0) {
        for (index_t i = 0; i < c.d_value; ++i) ASSERT_EQ(y.at(t, i), z.at(t, i));
        continue;
      }
      const RefSession& r = refs[sz(read_ids[sz(t)])];
      const double cosine = cosine_of(memory, xt, read_ids[sz(t)], ws);
      if (c.match_keys > 0) {
        const auto [best, bound] = ref.best_cosine(r, xt);
        EXPECT_NEAR(cosine, best, bound) << "round " << round << " row " << t;
        const double g = ref.match_gate(cosine);
        ++gate_seen[g == 0.0 ? 0 : g == 1.0 ? 2 : 1];
        if (g == 0.0) {
          for (index_t i = 0; i < c.d_value; ++i) ASSERT_EQ(y.at(t, i), z.at(t, i));
          continue;
        }
      }
      const std::vector<double> want =
          ref.read(r, xt, &z.at(t, 0), selection_of(memory, xt, ws), cosine);
      double scale = 1;
      for (const double w : want) scale = std::max(scale, std::abs(w));
      EXPECT_LT(max_abs_diff(want, &y.at(t, 0)), 2e-5 * scale) << "round " << round << " row " << t;
    }
  }
  if (c.match_keys > 0) {
    EXPECT_GT(gate_seen[0], 0) << "no read with the gate closed";
    EXPECT_GT(gate_seen[1], 0) << "no read on the ramp";
    // (Own queries never meet the keys' directions closely: no full match.)
    if (v.shared_query) {
      EXPECT_GT(gate_seen[2], 0) << "no read with the gate open";
    }
  }
  // The state itself.
  for (const std::int32_t s : {s0, s1}) {
    const RefSession& r = refs[sz(s)];
    if (c.fast_weights) {
      const MatrixView<const float> S = memory.fast_weights(s);
      for (index_t i = 0; i < c.d_value; ++i)
        for (index_t j = 0; j < c.d_key; ++j) EXPECT_NEAR(S(i, j), r.S[sz(i * c.d_key + j)], 2e-5);
    }
    ASSERT_EQ(memory.slots_used(s), static_cast<index_t>(r.slots.size()));
    const index_t used = memory.slots_used(s);
    std::vector<std::int32_t> ids(sz(used));
    std::vector<float> values(sz(used * c.d_value));
    memory.copy_slots(s, {ids.data(), used}, {values.data(), used, c.d_value});
    for (index_t i = 0; i < used; ++i) {
      EXPECT_EQ(ids[sz(i)], r.slots[sz(i)].first) << "recency position " << i;
      EXPECT_LT(max_abs_diff(r.slots[sz(i)].second, values.data() + i * c.d_value), 2e-5);
    }
    if (c.sub_keys > 0) {
      EXPECT_EQ(used, c.slot_capacity) << "the run was meant to evict";
    }
    EXPECT_EQ(memory.writes(s), 16u);
    EXPECT_EQ(memory.match_keys_kept(s), c.match_keys);
  }
}

TEST(SessionMemory, MatchesAFloat64ReferenceFastWeightsOnly) {
  check_against_reference({"fast weights, fixed rates", true, 0, false, true});
  check_against_reference({"fast weights, learned rates, own queries", true, 0, true, false});
}

TEST(SessionMemory, MatchesAFloat64ReferenceSlotsOnly) {
  check_against_reference({"slots, fixed rates", false, 5, false, true});
  check_against_reference({"slots, learned rates", false, 6, true, true});
}

TEST(SessionMemory, MatchesAFloat64ReferenceFastWeightsAndSlots) {
  check_against_reference({"both, fixed rates", true, 5, false, true});
  check_against_reference({"both, learned rates, own queries", true, 8, true, false});
}

TEST(SessionMemory, MatchesAFloat64ReferenceWithTheMatchGate) {
  check_against_reference({"fast weights, gate", true, 0, false, true, true});
  check_against_reference({"slots, learned rates, gate", false, 6, true, true, true});
  check_against_reference({"both, learned rates, own queries, gate", true, 5, true, false, true});
}

// With a = b = 1 the read at a key returns the value written there.
TEST(SessionMemory, AFullStrengthWriteIsRecalledExactly) {
  for (const bool fast : {true, false}) {
    for (const index_t sub_keys : {index_t{0}, index_t{6}}) {
      if (!fast && sub_keys == 0) continue;
      SessionMemoryConfig c = small_config(fast, sub_keys);
      c.decay = 1.0f;
      c.write_strength = 1.0f;
      c.gate = 1.0f;
      const Frozen setup(c, 3, false);
      SessionMemory memory(c, setup.weights());
      std::vector<std::byte> ws = workspace_for(memory);
      const std::int32_t s = memory.open();
      std::mt19937 rng(9);
      for (int i = 0; i < 6; ++i) {
        const std::vector<float> x = normal_rows(1, c.d_model, rng);
        const std::vector<float> v = normal_rows(1, c.d_value, rng);
        memory.write({x.data(), 1, c.d_model}, {v.data(), 1, c.d_value}, {&s, 1}, view(ws));
        std::vector<float> zero(sz(c.d_value), 0.0f), y(sz(c.d_value));
        memory.read({x.data(), 1, c.d_model}, {&s, 1}, {zero.data(), 1, c.d_value},
                    {y.data(), 1, c.d_value}, view(ws));
        for (index_t j = 0; j < c.d_value; ++j) EXPECT_NEAR(y[sz(j)], v[sz(j)], 1e-5f);
      }
    }
  }
}

// ---- kernels: dot products --------------------------------------------------------------

// row_dots and multi_row_dots on every path against their definition,
// replayed here with the same float operations: lane l sums columns l,
// l + 16, ... with fused multiply-adds, then reduce_add's tree. So a row's
// result depends on its length alone: not on the path, on how many vectors
// share a tile, or on which.
TEST(SessionMemoryKernels, DotProductsFollowTheirDefinitionOnEveryPath) {
  std::mt19937 rng(22);
  const auto definition = [](const float* a, const float* b, index_t len) {
    float lane[16] = {};
    for (index_t j = 0; j < len; ++j) lane[j % 16] = std::fma(a[j], b[j], lane[j % 16]);
    for (int width = 8; width >= 1; width /= 2) {  // the tree: lanes l and l + width
      for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
    }
    return lane[0];
  };
  for (const index_t len : {index_t{1}, index_t{16}, index_t{37}, index_t{384}}) {
    for (const index_t rows : {index_t{1}, index_t{2}, index_t{5}, index_t{9}}) {
      const std::vector<float> m = normal_rows(rows, len, rng);
      for (const index_t count : {index_t{1}, index_t{3}, index_t{4}, index_t{7}}) {
        const std::vector<float> v = normal_rows(count, len, rng);
        std::vector<float> want(sz(count * rows));
        for (index_t x = 0; x < count; ++x) {
          for (index_t r = 0; r < rows; ++r)
            want[sz(x * rows + r)] = definition(m.data() + r * len, v.data() + x * len, len);
        }
        const auto run = [&](auto path) {
          std::vector<float> got(sz(count * rows), moekit_test::kNaN),
              single(sz(rows), moekit_test::kNaN);
          std::vector<const float*> vs;
          std::vector<float*> outs;
          for (index_t x = 0; x < count; ++x) {
            vs.push_back(v.data() + x * len);
            outs.push_back(got.data() + x * rows);
          }
          const MatrixView<const float> mv(m.data(), rows, len);
          multi_row_dots(path, mv, vs.data(), outs.data(), count);
          EXPECT_TRUE(same_bits(got, want)) << len << " " << rows << " " << count;
          row_dots(path, mv, v.data(), single.data());
          EXPECT_TRUE(same_bits(single, std::vector<float>(want.begin(), want.begin() + rows)));
          EXPECT_EQ(dot(path, m.data(), v.data(), len), want[0]);
        };
        run(moekit::cpu::generic::Path{});
#if MOEKIT_DETAIL_X86
        if (moekit::cpu::isa_available(Isa::kAvx2)) run(moekit::cpu::avx2::Path{});
        if (moekit::cpu::isa_available(Isa::kAvx512)) run(moekit::cpu::avx512::Path{});
#endif
      }
    }
  }
}

// combine_rows and add_outer_products (the router's dx and dw_gate) on
// every path against their definition: per element one fma chain in order,
// from 0 or from the output's value; add_outer_products over a column range
// leaves the other columns alone, and a sum over tokens split in two (the
// second part continuing from the first) gives the same bits.
TEST(SessionMemoryKernels, RouterGradientKernelsFollowTheirDefinitionOnEveryPath) {
  std::mt19937 rng(23);
  for (const index_t n : {index_t{1}, index_t{16}, index_t{37}, index_t{384}}) {
    for (const index_t m : {index_t{1}, index_t{3}, index_t{4}, index_t{9}}) {
      const index_t tokens = 11;
      const std::vector<float> w = normal_rows(m, n, rng), g = normal_rows(tokens, m, rng),
                               x = normal_rows(tokens, n, rng), start = normal_rows(m, n, rng);
      std::vector<float> combined(sz(n)), combined_acc(sz(n)), outer(start);
      for (index_t j = 0; j < n; ++j) {
        float a = 0.0f, b = start[sz(j)];
        for (index_t i = 0; i < m; ++i) {
          a = std::fma(g[sz(i)], w[sz(i * n + j)], a);
          b = std::fma(g[sz(i)], w[sz(i * n + j)], b);
        }
        combined[sz(j)] = a;
        combined_acc[sz(j)] = b;
        for (index_t i = 0; i < m; ++i) {
          float& o = outer[sz(i * n + j)];
          for (index_t t = 0; t < tokens; ++t) o = std::fma(g[sz(t * m + i)], x[sz(t * n + j)], o);
        }
      }
      const MatrixView<const float> wv(w.data(), m, n), gv(g.data(), tokens, m),
          xv(x.data(), tokens, n);
      const auto run = [&](auto path) {
        // The same vector g 1, 5 and 9 times (tiles and tails): every copy the same.
        for (const index_t count : {index_t{1}, index_t{5}, index_t{9}}) {
          std::vector<float> got(sz(count * n), moekit_test::kNaN), acc;
          std::vector<const float*> gs(sz(count), g.data());
          std::vector<float*> outs, acc_outs;
          for (index_t v = 0; v < count; ++v)
            acc.insert(acc.end(), start.begin(), start.begin() + n);
          for (index_t v = 0; v < count; ++v) {
            outs.push_back(got.data() + v * n);
            acc_outs.push_back(acc.data() + v * n);
          }
          combine_rows(path, gs.data(), wv, outs.data(), count, false);
          combine_rows(path, gs.data(), wv, acc_outs.data(), count, true);
          for (index_t v = 0; v < count; ++v) {
            EXPECT_TRUE(same_bits(
                std::vector<float>(got.begin() + v * n, got.begin() + (v + 1) * n), combined))
                << n << " " << m << " " << count;
            EXPECT_TRUE(same_bits(
                std::vector<float>(acc.begin() + v * n, acc.begin() + (v + 1) * n), combined_acc))
                << n << " " << m << " " << count;
          }
        }
        std::vector<float> out(start);
        add_outer_products(path, gv, xv, {out.data(), m, n}, 0, n);
        EXPECT_TRUE(same_bits(out, outer)) << n << " " << m;
        // Split over tokens [0, 5) and [5, 11), and over two column ranges.
        std::vector<float> split(start);
        const index_t half = n / 2;
        for (const auto& [t0, t1] :
             {std::pair{index_t{0}, index_t{5}}, std::pair{index_t{5}, tokens}}) {
          const MatrixView<const float> gp = gv.middle_rows(t0, t1 - t0),
                                        xp = xv.middle_rows(t0, t1 - t0);
          add_outer_products(path, gp, xp, {split.data(), m, n}, 0, half);
          add_outer_products(path, gp, xp, {split.data(), m, n}, half, n);
        }
        EXPECT_TRUE(same_bits(split, outer)) << n << " " << m;
        std::vector<float> part(start);
        add_outer_products(path, gv, xv, {part.data(), m, n}, half, n);
        for (index_t i = 0; i < m; ++i) {
          for (index_t j = 0; j < half; ++j) ASSERT_EQ(part[sz(i * n + j)], start[sz(i * n + j)]);
        }
      };
      run(moekit::cpu::generic::Path{});
#if MOEKIT_DETAIL_X86
      if (moekit::cpu::isa_available(Isa::kAvx2)) run(moekit::cpu::avx2::Path{});
      if (moekit::cpu::isa_available(Isa::kAvx512)) run(moekit::cpu::avx512::Path{});
#endif
    }
  }
}

// ---- kernels: int8 scoring ----------------------------------------------------------------

// quantize_row, dot_i8_rows and scale_scores on every path against their
// definitions, replayed here with the same float operations.
TEST(SessionMemoryKernels, Int8ScoringFollowsItsDefinitionOnEveryPath) {
  std::mt19937 rng(21);
  for (const index_t h : {index_t{1}, index_t{15}, index_t{16}, index_t{33}, index_t{100}}) {
    const index_t n = 13;
    std::vector<float> rows = normal_rows(n, h, rng), query = normal_rows(1, h, rng);
    rows[3] = 0.0f;  // an exact zero and a half-way value below
    query[0] = 0.5f;
    std::vector<std::int8_t> q8(sz(n * h));
    std::vector<float> scale(sz(n));
    moekit::cpu::quantize_rows({rows.data(), n, h}, {q8.data(), n, h}, {scale.data(), n});
    // The definition.
    const auto quantize = [](const float* x, index_t len, std::vector<std::int32_t>& out) {
      float m = 0;
      for (index_t j = 0; j < len; ++j) m = std::max(m, std::abs(x[j]));
      out.assign(sz(len), 0);
      if (m == 0) return 0.0f;
      const float inv = 127.0f / m;
      for (index_t j = 0; j < len; ++j) {
        const float t = x[j] * inv;
        out[sz(j)] = static_cast<std::int32_t>(std::clamp(std::nearbyint(t), -127.0f, 127.0f));
      }
      return m / 127.0f;
    };
    std::vector<std::int32_t> want_q;
    for (index_t r = 0; r < n; ++r) {
      const float s = quantize(rows.data() + r * h, h, want_q);
      ASSERT_EQ(s, scale[sz(r)]);
      for (index_t j = 0; j < h; ++j) ASSERT_EQ(q8[sz(r * h + j)], want_q[sz(j)]);
    }
    const float q_scale = quantize(query.data(), h, want_q);
    std::vector<float> want_scores(sz(n));
    for (index_t r = 0; r < n; ++r) {
      std::int64_t dot = 0;
      for (index_t j = 0; j < h; ++j) dot += q8[sz(r * h + j)] * want_q[sz(j)];
      want_scores[sz(r)] = (q_scale * scale[sz(r)]) * static_cast<float>(dot);
    }
    const auto run = [&](auto path) {
      std::vector<std::int32_t> q(sz(h)), dots(sz(n));
      std::vector<float> scores(sz(n));
      const float qs = quantize_row(path, query.data(), h, q.data());
      EXPECT_EQ(qs, q_scale);
      EXPECT_EQ(q, want_q);
      dot_i8_rows(path, MatrixView<const std::int8_t>(q8.data(), n, h), q.data(), dots.data());
      scale_scores(path, dots.data(), scale.data(), qs, n, scores.data());
      for (index_t r = 0; r < n; ++r) EXPECT_EQ(scores[sz(r)], want_scores[sz(r)]) << r;
    };
    run(moekit::cpu::generic::Path{});
#if MOEKIT_DETAIL_X86
    if (moekit::cpu::isa_available(Isa::kAvx2)) run(moekit::cpu::avx2::Path{});
    if (moekit::cpu::isa_available(Isa::kAvx512)) run(moekit::cpu::avx512::Path{});
#endif
  }
}

// Extreme integer values: 127 * 127 * 2^17 must not overflow.
TEST(SessionMemoryKernels, Int8DotProductsAreExactAtTheLengthLimit) {
  const index_t h = moekit::cpu::kMaxInt8DotLength;
  std::vector<std::int8_t> row(sz(h), -127);
  std::vector<std::int32_t> q(sz(h), -127);
  const auto run = [&](auto path) {
    std::int32_t out = 0;
    dot_i8_rows(path, MatrixView<const std::int8_t>(row.data(), 1, h), q.data(), &out);
    EXPECT_EQ(out, std::int32_t{127 * 127} * static_cast<std::int32_t>(h));
  };
  run(moekit::cpu::generic::Path{});
#if MOEKIT_DETAIL_X86
  if (moekit::cpu::isa_available(Isa::kAvx2)) run(moekit::cpu::avx2::Path{});
  if (moekit::cpu::isa_available(Isa::kAvx512)) run(moekit::cpu::avx512::Path{});
#endif
}

// ---- selection --------------------------------------------------------------------------

// A memory whose keys are x itself (w_key = identity), with given codebooks.
struct IdentityKeys {
  SessionMemoryConfig config;
  std::vector<float> eye;
  std::vector<std::int8_t> a, b;
  std::vector<float> sa, sb;
  IdentityKeys(index_t d_key, index_t n, int k, std::vector<std::int8_t> ka, std::vector<float> sca,
               std::vector<std::int8_t> kb, std::vector<float> scb)
      : a(std::move(ka)), b(std::move(kb)), sa(std::move(sca)), sb(std::move(scb)) {
    config = {.d_model = d_key,
              .d_key = d_key,
              .d_value = 2,
              .fast_weights = false,
              .sub_keys = n,
              .top_k = k,
              .slot_capacity = k,
              .slot_sharpness = 1.0f};
    eye.assign(sz(d_key * d_key), 0.0f);
    for (index_t i = 0; i < d_key; ++i) eye[sz(i * d_key + i)] = 1.0f;
  }
  SessionMemoryWeights weights() const {
    const index_t h = config.d_key / 2, n = config.sub_keys;
    SessionMemoryWeights w;
    w.w_key = w.w_query = {eye.data(), config.d_key, config.d_key};
    w.sub_keys_a = {{a.data(), n, h}, {sa.data(), n}};
    w.sub_keys_b = {{b.data(), n, h}, {sb.data(), n}};
    return w;
  }
};

TEST(SessionMemory, TopKTiesTakeTheLowerIndex) {
  // Half a: rows 1 and 2 tie best; 0 and 3 tie at 0. Half b: rows 0, 1, 3 tie best.
  const IdentityKeys keys(4, 4, 3, {127, 0, 0, 127, 0, 127, -127, 0}, {1, 1, 1, 1},
                          {127, 0, 127, 0, 0, 127, 127, 0}, {1, 1, 1, 1});
  const SessionMemory memory(keys.config, keys.weights());
  std::vector<std::byte> ws = workspace_for(memory);
  const float x[4] = {0.0f, 1.0f, 1.0f, 0.0f};
  std::int32_t slots[3];
  float weights[3];
  memory.select({x, 1, 4}, {slots, 1, 3}, {weights, 1, 3}, view(ws));
  // Half a's top 3: 1, 2, 0; half b's: 0, 1, 3. The six sums of rows 1 and 2
  // tie: slots 4 (1, 0), 5 (1, 1), 7 (1, 3) come first.
  EXPECT_EQ(slots[0], 4);
  EXPECT_EQ(slots[1], 5);
  EXPECT_EQ(slots[2], 7);
  for (const float w : weights) EXPECT_EQ(w, weights[0]);
  EXPECT_NEAR(weights[0] * 3.0f, 1.0f, 1e-6f);
}

// With exact scores the product-key search equals a brute force over all
// n^2 slots, ties included. Exact: codebooks of small integers with scales
// 1/4 and 1/2, and queries x of integers with ||x|| = 256 whose halves both
// reach 127, so that k = x / 256, each half's scale is 1/256 and its int8
// values are x itself.
TEST(SessionMemory, ProductKeySearchEqualsBruteForce) {
  std::mt19937 rng(8);
  std::uniform_int_distribution<int> small(-1, 1);
  const index_t d_key = 8, h = 4, n = 9;
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<std::int8_t> ka(sz(n * h)), kb(sz(n * h));
    for (auto& e : ka) e = static_cast<std::int8_t>(small(rng));
    for (auto& e : kb) e = static_cast<std::int8_t>(small(rng));
    const int k = 1 + trial % 8;
    const IdentityKeys keys(d_key, n, k, ka, std::vector<float>(sz(n), 0.25f), kb,
                            std::vector<float>(sz(n), 0.5f));
    const SessionMemory memory(keys.config, keys.weights());
    std::vector<std::byte> ws = workspace_for(memory);
    // 127^2 * 4 + 31^2 + 7^2 + 3^2 + 1^2 = 256^2.
    int xa[4] = {127, 127, 31, 3}, xb[4] = {127, 127, 7, 1};
    std::shuffle(xa, xa + 4, rng);
    std::shuffle(xb, xb + 4, rng);
    float x[8];
    for (int c = 0; c < 4; ++c) {
      x[c] = static_cast<float>(rng() % 2 == 0 ? xa[c] : -xa[c]);
      x[4 + c] = static_cast<float>(rng() % 2 == 0 ? xb[c] : -xb[c]);
    }
    std::vector<std::int32_t> slots(sz(k));
    std::vector<float> weights(sz(k));
    memory.select({x, 1, d_key}, {slots.data(), 1, k}, {weights.data(), 1, k}, view(ws));
    std::vector<std::pair<double, std::int32_t>> all;
    for (index_t i = 0; i < n; ++i) {
      for (index_t j = 0; j < n; ++j) {
        double da = 0, db = 0;
        for (index_t c = 0; c < h; ++c) {
          da += ka[sz(i * h + c)] * double{x[c]};
          db += kb[sz(j * h + c)] * double{x[h + c]};
        }
        all.push_back({da * 0.25 / 256 + db * 0.5 / 256, static_cast<std::int32_t>(i * n + j)});
      }
    }
    std::sort(all.begin(), all.end(), [](const auto& p, const auto& q) {
      return p.first > q.first || (p.first == q.first && p.second < q.second);
    });
    for (int j = 0; j < k; ++j) ASSERT_EQ(slots[sz(j)], all[sz(j)].second) << "trial " << trial;
  }
}

// int8 keys select (nearly) the slots float keys would.
TEST(SessionMemory, Int8KeysSelectWhatFloatKeysSelect) {
  std::mt19937 rng(30);
  const index_t d_key = 64, h = 32, n = 64;
  const int k = 8;
  const std::vector<float> fa = normal_rows(n, h, rng), fb = normal_rows(n, h, rng);
  std::vector<std::int8_t> qa(fa.size()), qb(fb.size());
  std::vector<float> sa(sz(n)), sb(sz(n));
  moekit::cpu::quantize_rows({fa.data(), n, h}, {qa.data(), n, h}, {sa.data(), n});
  moekit::cpu::quantize_rows({fb.data(), n, h}, {qb.data(), n, h}, {sb.data(), n});
  const IdentityKeys keys(d_key, n, k, qa, sa, qb, sb);
  const SessionMemory memory(keys.config, keys.weights());
  std::vector<std::byte> ws = workspace_for(memory);
  const int queries = 300;
  int agree = 0, top1 = 0;
  for (int t = 0; t < queries; ++t) {
    const std::vector<float> x = normal_rows(1, d_key, rng);
    std::vector<std::int32_t> slots(sz(k));
    std::vector<float> w(sz(k));
    memory.select({x.data(), 1, d_key}, {slots.data(), 1, k}, {w.data(), 1, k}, view(ws));
    // Float keys in double: exact product-key top-k over all slots.
    std::vector<double> score_a(sz(n)), score_b(sz(n));
    for (index_t i = 0; i < n; ++i) {
      for (index_t c = 0; c < h; ++c) {
        score_a[sz(i)] += double{fa[sz(i * h + c)]} * x[sz(c)];
        score_b[sz(i)] += double{fb[sz(i * h + c)]} * x[sz(h + c)];
      }
    }
    std::vector<std::pair<double, std::int32_t>> all;
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < n; ++j)
        all.push_back({score_a[sz(i)] + score_b[sz(j)], static_cast<std::int32_t>(i * n + j)});
    std::partial_sort(all.begin(), all.begin() + k, all.end(),
                      [](const auto& p, const auto& q) { return p.first > q.first; });
    for (int j = 0; j < k; ++j) {
      agree += static_cast<int>(std::count(slots.begin(), slots.end(), all[sz(j)].second));
    }
    top1 += slots[0] == all[0].second;
  }
  const double overlap = static_cast<double>(agree) / (queries * k);
  const double first = static_cast<double>(top1) / queries;
  std::printf(
      "[ info ] int8 vs float keys: %.3f of the top-%d slots and %.3f of the best slot agree\n",
      overlap, k, first);
  EXPECT_GT(overlap, 0.9);
  EXPECT_GT(first, 0.9);
}

// ---- isolation, invariance, lifecycle ---------------------------------------------------

struct Event {
  std::int32_t session;
  std::vector<float> x, v;
};

std::vector<Event> events_for(const SessionMemoryConfig& c, const std::vector<std::int32_t>& ids,
                              std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<Event> out;
  for (const std::int32_t id : ids) {
    out.push_back({id, normal_rows(1, c.d_model, rng), normal_rows(1, c.d_value, rng)});
  }
  return out;
}

// Writes events [begin, end) in one call.
void write_events(SessionMemory& m, const std::vector<Event>& ev, std::size_t begin,
                  std::size_t end, std::vector<std::byte>& ws) {
  const SessionMemoryConfig& c = m.config();
  const auto n = static_cast<index_t>(end - begin);
  std::vector<float> x, v;
  std::vector<std::int32_t> ids;
  for (std::size_t i = begin; i < end; ++i) {
    x.insert(x.end(), ev[i].x.begin(), ev[i].x.end());
    v.insert(v.end(), ev[i].v.begin(), ev[i].v.end());
    ids.push_back(ev[i].session);
  }
  m.write({x.data(), n, c.d_model}, {v.data(), n, c.d_value}, {ids.data(), n}, view(ws));
}

std::vector<float> read_rows(const SessionMemory& m, const std::vector<float>& x,
                             const std::vector<std::int32_t>& ids, const std::vector<float>& z,
                             std::vector<std::byte>& ws) {
  const SessionMemoryConfig& c = m.config();
  const auto n = static_cast<index_t>(ids.size());
  std::vector<float> y(sz(n * c.d_value), moekit_test::kNaN);
  m.read({x.data(), n, c.d_model}, {ids.data(), n}, {z.data(), n, c.d_value},
         {y.data(), n, c.d_value}, view(ws));
  return y;
}

// ---- the match gate ------------------------------------------------------------------------

// The gate against an ungated twin given the same corrections: a row whose
// gate is closed reads z bit for bit, one whose gate is fully open reads the
// twin's bits, one on the ramp the twin's change times g_match(c); with
// width 0 the ramp is a step. A session without writes has no keys and reads z.
TEST(SessionMemory, TheMatchGateScalesTheUngatedRead) {
  for (const float width : {0.4f, 0.0f}) {
    SCOPED_TRACE(width);
    SessionMemoryConfig c = gated(small_config(true, 5));
    c.match_width = width;
    SessionMemoryConfig plain = c;
    plain.match_keys = 0;
    const Frozen setup(c, 25, true);
    SessionMemory memory(c, setup.weights()), twin(plain, setup.weights());
    std::vector<std::byte> ws = workspace_for(memory);
    for (SessionMemory* m : {&memory, &twin}) {
      m->open();
      m->open();
    }
    const std::vector<Event> ev = events_for(c, std::vector<std::int32_t>(6, 0), 26);
    write_events(memory, ev, 0, ev.size(), ws);
    write_events(twin, ev, 0, ev.size(), ws);
    // Rows near each correction, at growing distances, in both sessions.
    std::mt19937 rng(27);
    std::vector<float> x;
    std::vector<std::int32_t> ids;
    for (const Event& e : ev) {
      for (int step = 0; step < 8; ++step) {
        const std::vector<float> noise = normal_rows(1, c.d_model, rng, 0.2f * float(step));
        for (index_t j = 0; j < c.d_model; ++j) x.push_back(e.x[sz(j)] + noise[sz(j)]);
        ids.push_back(step % 4 == 3 ? 1 : 0);
      }
    }
    const auto n = static_cast<index_t>(ids.size());
    const std::vector<float> z = normal_rows(n, c.d_value, rng);
    const std::vector<float> y = read_rows(memory, x, ids, z, ws),
                             y_twin = read_rows(twin, x, ids, z, ws);
    std::vector<float> cosine(sz(n));
    memory.match({x.data(), n, c.d_model}, {ids.data(), n}, {cosine.data(), n}, view(ws));
    int seen[3] = {};
    for (index_t t = 0; t < n; ++t) {
      const auto row = [&](const std::vector<float>& v) {
        return std::vector<float>(v.begin() + t * c.d_value, v.begin() + (t + 1) * c.d_value);
      };
      const float g = memory.match_gate(cosine[sz(t)]);
      if (ids[sz(t)] == 1) {
        EXPECT_EQ(cosine[sz(t)], -std::numeric_limits<float>::infinity());
      }
      ++seen[g == 0.0f ? 0 : g == 1.0f ? 2 : 1];
      if (g == 0.0f) {
        EXPECT_TRUE(same_bits(row(y), row(z))) << "row " << t;
      } else if (g == 1.0f) {
        EXPECT_TRUE(same_bits(row(y), row(y_twin))) << "row " << t;
      } else {
        for (index_t i = 0; i < c.d_value; ++i) {
          const std::size_t k = sz(t * c.d_value + i);
          const double change = double{y_twin[k]} - z[k];
          EXPECT_NEAR(double{y[k]} - z[k], g * change, 1e-5 * std::max(1.0, std::abs(change)))
              << "row " << t;
        }
      }
    }
    EXPECT_GT(seen[0], 0);
    EXPECT_EQ(seen[1] > 0, width > 0.0f);
    EXPECT_GT(seen[2], 0);
  }
  // The ramp itself.
  const SessionMemory memory(gated(small_config(true, 0)),
                             Frozen(gated(small_config(true, 0)), 1, false).weights());
  EXPECT_EQ(memory.match_gate(0.3f), 0.0f);
  EXPECT_EQ(memory.match_gate(-1.0f), 0.0f);
  EXPECT_NEAR(memory.match_gate(0.5f), 0.5f, 1e-6f);
  EXPECT_EQ(memory.match_gate(0.75f), 1.0f);
  EXPECT_EQ(memory.match_gate(1.0f), 1.0f);
  EXPECT_EQ(memory.match_gate(std::numeric_limits<float>::quiet_NaN()), 0.0f);
}

// The gate keeps the keys of the last match_keys writes, oldest first, as a
// memory keeping more of them has them; they cost d_k + 4 bytes each; reset
// forgets them.
TEST(SessionMemory, TheMatchGateKeepsTheLastKeys) {
  const SessionMemoryConfig c = gated(small_config(true, 0));
  SessionMemoryConfig wide = c;
  wide.match_keys = 8;
  const Frozen setup(c, 28, false);
  SessionMemory memory(c, setup.weights()), all(wide, setup.weights());
  std::vector<std::byte> ws = workspace_for(all);
  const std::int32_t s = memory.open();
  all.open();
  const std::vector<Event> ev = events_for(c, std::vector<std::int32_t>(7, s), 29);
  for (std::size_t i = 0; i < ev.size(); ++i) {
    write_events(memory, ev, i, i + 1, ws);
    write_events(all, ev, i, i + 1, ws);
  }
  const index_t dk = c.d_key;
  ASSERT_EQ(memory.match_keys_kept(s), 3);
  ASSERT_EQ(all.match_keys_kept(s), 7);
  std::vector<std::int8_t> kept(sz(3 * dk)), every(sz(7 * dk));
  std::vector<float> kept_scale(3), every_scale(7);
  memory.copy_match_keys(s, {kept.data(), 3, dk}, {kept_scale.data(), 3});
  all.copy_match_keys(s, {every.data(), 7, dk}, {every_scale.data(), 7});
  EXPECT_EQ(kept, std::vector<std::int8_t>(every.begin() + 4 * dk, every.end()));
  EXPECT_EQ(kept_scale, std::vector<float>(every_scale.begin() + 4, every_scale.end()));
  // The latest correction's own input matches itself (int8 within 0.02); the
  // first one's does not (evicted), though a memory keeping 8 keys has it.
  std::vector<float> own(2);
  std::vector<float> xs = ev.back().x;
  xs.insert(xs.end(), ev.front().x.begin(), ev.front().x.end());
  const std::int32_t ids[2] = {s, s};
  memory.match({xs.data(), 2, c.d_model}, {ids, 2}, {own.data(), 2}, view(ws));
  EXPECT_NEAR(own[0], 1.0f, 0.02f);
  EXPECT_LT(own[1], 0.9f);
  all.match({xs.data(), 2, c.d_model}, {ids, 2}, {own.data(), 2}, view(ws));
  EXPECT_NEAR(own[1], 1.0f, 0.02f);
  SessionMemoryConfig plain = c;
  plain.match_keys = 0;
  EXPECT_EQ(memory.state_bytes() - SessionMemory(plain, setup.weights()).state_bytes(),
            3 * (dk + 4));
  memory.reset(s);
  EXPECT_EQ(memory.match_keys_kept(s), 0);
}

TEST(SessionMemory, SessionsAreIsolated) {
  const SessionMemoryConfig c = gated(small_config(true, 5));
  const Frozen setup(c, 4, true);
  // Sessions 0 and 1 interleaved in shared calls, beside session 1's events alone.
  SessionMemory both(c, setup.weights()), alone(c, setup.weights());
  std::vector<std::byte> ws = workspace_for(both);
  ASSERT_EQ(both.open(), 0);
  ASSERT_EQ(both.open(), 1);
  ASSERT_EQ(alone.open(), 0);
  ASSERT_EQ(alone.open(), 1);
  std::vector<std::int32_t> ids;
  for (int i = 0; i < 40; ++i) ids.push_back(i % 3 == 0 ? 1 : 0);
  const std::vector<Event> ev = events_for(c, ids, 77);
  std::vector<Event> only_1;
  for (const Event& e : ev) {
    if (e.session == 1) only_1.push_back(e);
  }
  for (std::size_t i = 0; i < ev.size(); i += 7)
    write_events(both, ev, i, std::min(i + 7, ev.size()), ws);
  write_events(alone, only_1, 0, only_1.size(), ws);
  EXPECT_EQ(state(both, 1), state(alone, 1));
  // Reads in session 1 never see session 0's writes; session 0 changed things.
  std::mt19937 rng(2);
  const std::vector<float> x = normal_rows(4, c.d_model, rng), z = normal_rows(4, c.d_value, rng);
  EXPECT_TRUE(
      same_bits(read_rows(both, x, {1, 1, 1, 1}, z, ws), read_rows(alone, x, {1, 1, 1, 1}, z, ws)));
  EXPECT_FALSE(
      same_bits(read_rows(both, x, {0, 0, 0, 0}, z, ws), read_rows(alone, x, {0, 0, 0, 0}, z, ws)));
  EXPECT_TRUE(same_bits(read_rows(alone, x, {0, 0, 0, 0}, z, ws), z));  // never written: z exactly
}

TEST(SessionMemory, BatchesThreadsAndPathsGiveTheSameBits) {
  SessionMemoryConfig c = gated(small_config(true, 6));
  c.match_threshold = 0.0f;  // random rows: many on the ramp
  const Frozen setup(c, 6, true);
  std::vector<std::int32_t> ids;
  for (int i = 0; i < 60; ++i) ids.push_back(static_cast<std::int32_t>((i * 7) % 5) - 1);
  const std::vector<Event> ev = events_for(c, ids, 123);
  std::mt19937 rng(3);
  const index_t m = 40;
  const std::vector<float> x = normal_rows(m, c.d_model, rng), z = normal_rows(m, c.d_value, rng);
  std::vector<std::int32_t> read_ids;
  for (index_t t = 0; t < m; ++t) read_ids.push_back(static_cast<std::int32_t>(t % 5) - 1);

  struct Run {
    std::vector<std::vector<std::byte>> states;
    std::vector<float> y;
  };
  const auto run = [&](std::size_t batch, int threads) {
    const ThreadCount scope(threads);
    SessionMemory memory(c, setup.weights());
    std::vector<std::byte> ws = workspace_for(memory);
    for (int s = 0; s < 4; ++s) memory.open();
    for (std::size_t i = 0; i < ev.size(); i += batch)
      write_events(memory, ev, i, std::min(i + batch, ev.size()), ws);
    Run out;
    for (std::int32_t s = 0; s < 4; ++s) out.states.push_back(state(memory, s));
    out.y = read_rows(memory, x, read_ids, z, ws);
    return out;
  };
  const Run base = run(1, 1);
  for (const auto& [batch, threads] :
       {std::pair{std::size_t{60}, 1}, std::pair{std::size_t{60}, 2}, std::pair{std::size_t{13}, 2},
        std::pair{std::size_t{60}, 3}}) {
    const Run other = run(batch, threads);
    EXPECT_EQ(other.states, base.states) << "batch " << batch << " threads " << threads;
    EXPECT_TRUE(same_bits(other.y, base.y)) << "batch " << batch << " threads " << threads;
  }
  // A row read alone equals the row read in the batch.
  {
    SessionMemory memory(c, setup.weights());
    std::vector<std::byte> ws = workspace_for(memory);
    for (int s = 0; s < 4; ++s) memory.open();
    write_events(memory, ev, 0, ev.size(), ws);
    for (index_t t = 0; t < m; t += 7) {
      const std::vector<float> xt(x.begin() + t * c.d_model, x.begin() + (t + 1) * c.d_model);
      const std::vector<float> zt(z.begin() + t * c.d_value, z.begin() + (t + 1) * c.d_value);
      const std::vector<float> yt = read_rows(memory, xt, {read_ids[sz(t)]}, zt, ws);
      EXPECT_TRUE(same_bits(yt, std::vector<float>(base.y.begin() + t * c.d_value,
                                                   base.y.begin() + (t + 1) * c.d_value)));
    }
  }
  // Every ISA path.
  for (const Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512}) {
    if (!moekit::cpu::isa_available(isa)) continue;
    const moekit::cpu::IsaLimit limit(isa);
    const Run other = run(7, 2);
    EXPECT_EQ(other.states, base.states) << moekit::cpu::isa_name(isa);
    EXPECT_TRUE(same_bits(other.y, base.y)) << moekit::cpu::isa_name(isa);
  }
}

// The shared batch-invariance property (batch_invariance.hpp, as every
// component's in test_batch_invariance.cpp): a row's read, over sessions
// holding written state, is bit-identical alone, among up to 256 rows in any
// order, on 1 and 2 threads and on every CPU path. Rows of no session (-1)
// and of a session never written are in the pool too; the match gate is on.
TEST(BatchInvariance, SessionMemoryRead) {
  SessionMemoryConfig c = gated(small_config(true, 6));
  c.match_threshold = 0.0f;
  const Frozen setup(c, 6, true);
  SessionMemory memory(c, setup.weights());
  std::vector<std::byte> ws = workspace_for(memory);
  for (int s = 0; s < 4; ++s) memory.open();
  std::vector<std::int32_t> writers;
  for (int i = 0; i < 40; ++i) writers.push_back(static_cast<std::int32_t>(i % 3));  // not 3
  const std::vector<Event> ev = events_for(c, writers, 31);
  write_events(memory, ev, 0, ev.size(), ws);

  constexpr index_t kPool = 48;
  std::mt19937 rng(32);
  const std::vector<float> x = normal_rows(kPool, c.d_model, rng),
                           z = normal_rows(kPool, c.d_value, rng);
  const auto session_of = [](index_t item) { return static_cast<std::int32_t>(item % 5) - 1; };
  moekit_test::expect_batch_invariant(kPool, 256, 33, [&](const std::vector<index_t>& items) {
    std::vector<float> xs, zs;
    std::vector<std::int32_t> ids;
    for (const index_t i : items) {
      xs.insert(xs.end(), x.begin() + i * c.d_model, x.begin() + (i + 1) * c.d_model);
      zs.insert(zs.end(), z.begin() + i * c.d_value, z.begin() + (i + 1) * c.d_value);
      ids.push_back(session_of(i));
    }
    const std::vector<float> y = read_rows(memory, xs, ids, zs, ws);
    moekit_test::BatchResults out;
    for (std::size_t j = 0; j < items.size(); ++j)
      out.emplace_back(y.begin() + static_cast<std::ptrdiff_t>(j * sz(c.d_value)),
                       y.begin() + static_cast<std::ptrdiff_t>((j + 1) * sz(c.d_value)));
    return out;
  });
}

TEST(SessionMemory, ReplayGivesTheSameState) {
  const SessionMemoryConfig c = gated(small_config(true, 5));
  const Frozen setup(c, 12, false);
  const std::vector<Event> ev = events_for(c, std::vector<std::int32_t>(25, 0), 5);
  std::vector<std::vector<std::byte>> states;
  for (int run = 0; run < 2; ++run) {
    SessionMemory memory(c, setup.weights());
    std::vector<std::byte> ws = workspace_for(memory);
    memory.open();
    write_events(memory, ev, 0, ev.size(), ws);
    states.push_back(state(memory, 0));
  }
  EXPECT_EQ(states[0], states[1]);
}

TEST(SessionMemory, ResetAndCloseForgetEverything) {
  SessionMemoryConfig c = gated(small_config(true, 5));
  c.match_threshold = -1.0f;  // every read of a written session goes through
  const Frozen setup(c, 13, true);
  SessionMemory memory(c, setup.weights());
  std::vector<std::byte> ws = workspace_for(memory);
  const std::int32_t s = memory.open();
  const std::vector<std::byte> empty = state(memory, s);
  std::mt19937 rng(4);
  const std::vector<float> x = normal_rows(3, c.d_model, rng);
  std::vector<float> z = normal_rows(3, c.d_value, rng);
  z[1] = -0.0f;  // kept bit for bit too
  EXPECT_TRUE(same_bits(read_rows(memory, x, {s, s, s}, z, ws), z));
  write_events(memory, events_for(c, std::vector<std::int32_t>(9, s), 8), 0, 9, ws);
  EXPECT_FALSE(same_bits(read_rows(memory, x, {s, s, s}, z, ws), z));
  EXPECT_EQ(memory.writes(s), 9u);
  memory.reset(s);
  EXPECT_EQ(state(memory, s), empty);
  EXPECT_TRUE(same_bits(read_rows(memory, x, {s, s, s}, z, ws), z));
  // close frees the id; the next open takes it, empty.
  write_events(memory, events_for(c, std::vector<std::int32_t>(4, s), 9), 0, 4, ws);
  const std::int32_t other = memory.open();
  EXPECT_EQ(other, 1);
  memory.close(s);
  EXPECT_FALSE(memory.is_open(s));
  EXPECT_EQ(memory.open_sessions(), 1);
  EXPECT_EQ(memory.open(), s);
  EXPECT_EQ(state(memory, s), empty);
  EXPECT_TRUE(same_bits(read_rows(memory, x, {s, -1, other}, z, ws), z));
}

TEST(SessionMemory, SnapshotsRestoreTheStateExactly) {
  SessionMemoryConfig c = gated(small_config(true, 5));
  c.match_threshold = -1.0f;  // reads compared below go through
  const Frozen setup(c, 14, true);
  SessionMemory memory(c, setup.weights());
  std::vector<std::byte> ws = workspace_for(memory);
  const std::int32_t s = memory.open();
  const std::vector<Event> ev = events_for(c, std::vector<std::int32_t>(30, s), 10);
  write_events(memory, ev, 0, 20, ws);
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() / "moekit_test_session_snapshot.safetensors";
  moekit::io::save_session(memory, s, path);
  // Into another memory with the same config and weights, and another id.
  SessionMemory other(c, setup.weights());
  other.open();
  const std::int32_t r = other.open();
  moekit::io::load_session(other, r, path);
  EXPECT_EQ(state(other, r), state(memory, s));
  EXPECT_EQ(other.writes(r), 20u);
  std::mt19937 rng(3);
  const std::vector<float> xr = normal_rows(3, c.d_model, rng), zr = normal_rows(3, c.d_value, rng);
  EXPECT_TRUE(
      same_bits(read_rows(other, xr, {r, r, r}, zr, ws), read_rows(memory, xr, {s, s, s}, zr, ws)));
  EXPECT_FALSE(same_bits(read_rows(other, xr, {r, r, r}, zr, ws), zr));
  // Both go on identically.
  std::vector<Event> ev_r = ev;
  for (Event& e : ev_r) e.session = r;
  write_events(memory, ev, 20, 30, ws);
  write_events(other, ev_r, 20, 30, ws);
  EXPECT_EQ(state(other, r), state(memory, s));
  // Another configuration or other weights are refused, the session untouched.
  const std::vector<std::byte> before = state(other, r);
  SessionMemoryConfig c2 = c;
  c2.decay = 0.5f;
  SessionMemory wrong_config(c2, setup.weights());
  wrong_config.open();
  std::string msg = expect_error([&] { moekit::io::load_session(wrong_config, 0, path); },
                                 Errc::kInvalidArgument);
  EXPECT_NE(msg.find("decay = 0.9"), std::string::npos) << msg;
  const Frozen setup2(c, 15, true);
  SessionMemory wrong_weights(c, setup2.weights());
  wrong_weights.open();
  msg = expect_error([&] { moekit::io::load_session(wrong_weights, 0, path); },
                     Errc::kInvalidArgument);
  EXPECT_NE(msg.find("other frozen weights"), std::string::npos) << msg;
  // A gated snapshot into a memory without the gate, and the other way.
  SessionMemoryConfig plain = c;
  plain.match_keys = 0;
  SessionMemory ungated(plain, setup.weights());
  ungated.open();
  msg = expect_error([&] { moekit::io::load_session(ungated, 0, path); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("with a match gate"), std::string::npos) << msg;
  const std::filesystem::path plain_path =
      std::filesystem::temp_directory_path() / "moekit_test_session_snapshot_plain.safetensors";
  moekit::io::save_session(ungated, 0, plain_path);
  EXPECT_EQ(moekit::io::SafetensorsReader(plain_path).metadata().count("match_keys"), 0u);
  msg =
      expect_error([&] { moekit::io::load_session(other, r, plain_path); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("without a match gate"), std::string::npos) << msg;
  std::filesystem::remove(plain_path);
  // A file that is no snapshot, and slot ids that are not slots.
  {
    moekit::io::SafetensorsWriter w;
    const float one = 1.0f;
    w.add("x", VectorView<const float>(&one, 1));
    w.write(path);
    msg = expect_error([&] { moekit::io::load_session(other, r, path); }, Errc::kFormatError);
    EXPECT_NE(msg.find("\"format\""), std::string::npos) << msg;
  }
  {
    moekit::io::detail::SessionSnapshot snap = moekit::io::detail::session_snapshot(memory, s);
    snap.slot_ids[2] = 1.5f;
    snap.writer.write(path);
    msg = expect_error([&] { moekit::io::load_session(other, r, path); }, Errc::kFormatError);
    EXPECT_NE(msg.find("slot_ids[2] = 1.5"), std::string::npos) << msg;
    snap.slot_ids[2] = snap.slot_ids[0];
    snap.writer.write(path);
    msg = expect_error([&] { moekit::io::load_session(other, r, path); }, Errc::kInvalidArgument);
    EXPECT_NE(msg.find("twice"), std::string::npos) << msg;
  }
  {
    moekit::io::detail::SessionSnapshot snap = moekit::io::detail::session_snapshot(memory, s);
    snap.match_keys[5] = 0.5f;
    snap.writer.write(path);
    msg = expect_error([&] { moekit::io::load_session(other, r, path); }, Errc::kFormatError);
    EXPECT_NE(msg.find("match_keys element 5 = 0.5"), std::string::npos) << msg;
  }
  EXPECT_EQ(state(other, r), before);
  std::filesystem::remove(path);
}

// ---- frozen weights and bad input ----------------------------------------------------------

TEST(SessionMemory, FrozenWeightsAreNeverWritten) {
  const SessionMemoryConfig c = gated(small_config(true, 6));
  const Frozen setup(c, 16, true, /*shared=*/false);
  const Frozen copy = setup;
  SessionMemory memory(c, setup.weights());
  const std::uint64_t fingerprint = memory.weights_fingerprint();
  std::vector<std::byte> ws = workspace_for(memory);
  const std::int32_t s = memory.open(), t = memory.open();
  std::vector<std::int32_t> ids;
  for (int i = 0; i < 50; ++i) ids.push_back(i % 2 == 0 ? s : t);
  write_events(memory, events_for(c, ids, 17), 0, ids.size(), ws);
  std::mt19937 rng(1);
  read_rows(memory, normal_rows(3, c.d_model, rng), {s, t, -1}, normal_rows(3, c.d_value, rng), ws);
  memory.reset(s);
  memory.close(t);
  EXPECT_EQ(memory.weights_fingerprint(), fingerprint);
  EXPECT_EQ(setup.w_key, copy.w_key);
  EXPECT_EQ(setup.w_query, copy.w_query);
  EXPECT_EQ(setup.w_write, copy.w_write);
  EXPECT_EQ(setup.w_gate, copy.w_gate);
  EXPECT_EQ(setup.keys_a, copy.keys_a);
  EXPECT_EQ(setup.keys_b, copy.keys_b);
  EXPECT_EQ(setup.scale_a, copy.scale_a);
  EXPECT_EQ(setup.scale_b, copy.scale_b);
  // The fingerprint sees a change of any weight.
  Frozen changed = setup;
  changed.keys_b[5] = static_cast<std::int8_t>(changed.keys_b[5] == 1 ? 2 : 1);
  EXPECT_NE(SessionMemory(c, changed.weights()).weights_fingerprint(), fingerprint);
}

TEST(SessionMemory, EmptyBatchesAndStridedViews) {
  const SessionMemoryConfig c = small_config(true, 5);
  const Frozen setup(c, 18, false);
  SessionMemory memory(c, setup.weights());
  std::vector<std::byte> ws = workspace_for(memory);
  const std::int32_t s = memory.open();
  const std::vector<std::byte> empty = state(memory, s);
  memory.write({nullptr, 0, c.d_model}, {nullptr, 0, c.d_value}, {nullptr, 0}, view(ws));
  memory.read({nullptr, 0, c.d_model}, {nullptr, 0}, {nullptr, 0, c.d_value},
              {nullptr, 0, c.d_value}, view(ws));
  EXPECT_EQ(state(memory, s), empty);
  // Strided x and values give what dense ones give.
  std::mt19937 rng(7);
  Mat x(4, c.d_model), v(4, c.d_value), z(4, c.d_value), y(4, c.d_value);
  x.randomize(rng);
  v.randomize(rng);
  z.randomize(rng);
  const std::int32_t ids[4] = {s, s, -1, s};
  SessionMemory dense(c, setup.weights());
  dense.open();
  memory.write(x.cview(), v.cview(), {ids, 4}, view(ws));
  const std::vector<double> xd = x.values(), vd = v.values();
  const std::vector<float> xf(xd.begin(), xd.end()), vf(vd.begin(), vd.end());
  dense.write({xf.data(), 4, c.d_model}, {vf.data(), 4, c.d_value}, {ids, 4}, view(ws));
  EXPECT_EQ(state(memory, s), state(dense, s));
  // In place: y = z.
  y = z;
  memory.read(x.cview(), {ids, 4}, y.cview(), y.view(), view(ws));
  Mat y2(4, c.d_value);
  y2.poison();
  memory.read(x.cview(), {ids, 4}, z.cview(), y2.view(), view(ws));
  EXPECT_TRUE(y.bits_equal(y2));
}

TEST(SessionMemory, RejectsBadInput) {
  const SessionMemoryConfig c = small_config(true, 5);
  const Frozen setup(c, 19, false);
  SessionMemory memory(c, setup.weights());
  std::vector<std::byte> ws = workspace_for(memory);
  const std::int32_t s = memory.open();
  write_events(memory, events_for(c, std::vector<std::int32_t>(5, s), 20), 0, 5, ws);
  const std::vector<std::byte> before = state(memory, s);
  std::mt19937 rng(6);
  std::vector<float> x = normal_rows(2, c.d_model, rng), v = normal_rows(2, c.d_value, rng);
  std::vector<float> z = normal_rows(2, c.d_value, rng), y(z.size());
  const auto write = [&](std::vector<std::int32_t> ids) {
    memory.write({x.data(), 2, c.d_model}, {v.data(), 2, c.d_value},
                 {ids.data(), static_cast<index_t>(ids.size())}, view(ws));
  };
  const auto read = [&](std::vector<std::int32_t> ids) {
    memory.read({x.data(), 2, c.d_model}, {ids.data(), static_cast<index_t>(ids.size())},
                {z.data(), 2, c.d_value}, {y.data(), 2, c.d_value}, view(ws));
  };
  // Unknown, closed, out-of-range sessions.
  std::string msg = expect_error([&] { write({s, 2}); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("sessions[1] = 2 is not open"), std::string::npos) << msg;
  msg = expect_error([&] { read({s, 4}); }, Errc::kOutOfRange);
  EXPECT_NE(msg.find("sessions[1] = 4 is outside [-1, max_sessions = 4)"), std::string::npos)
      << msg;
  expect_error([&] { read({-2, s}); }, Errc::kOutOfRange);
  const std::int32_t t = memory.open();
  memory.close(t);
  msg = expect_error([&] { read({s, t}); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("is not open"), std::string::npos) << msg;
  expect_error([&] { memory.reset(t); }, Errc::kInvalidArgument);
  expect_error([&] { memory.close(t); }, Errc::kInvalidArgument);
  expect_error([&] { memory.writes(7); }, Errc::kOutOfRange);
  // Sizes.
  msg = expect_error([&] { write({s}); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("sessions has 1 elements, expected 2"), std::string::npos) << msg;
  msg = expect_error(
      [&] {
        memory.write({x.data(), 2, c.d_model - 1}, {v.data(), 2, c.d_value},
                     {std::vector<std::int32_t>{s, s}.data(), 2}, view(ws));
      },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("x is 2 x 36, expected 2 x 37"), std::string::npos) << msg;
  expect_error(
      [&] {
        const std::int32_t ids[2] = {s, s};
        memory.write({x.data(), 2, c.d_model}, {v.data(), 1, c.d_value}, {ids, 2}, view(ws));
      },
      Errc::kShapeMismatch);
  expect_error(
      [&] {
        const std::int32_t ids[2] = {s, s};
        memory.read({x.data(), 2, c.d_model}, {ids, 2}, {z.data(), 2, c.d_value},
                    {y.data(), 2, c.d_value - 1}, view(ws));
      },
      Errc::kShapeMismatch);
  msg = expect_error(
      [&] {
        const std::int32_t ids[2] = {s, s};
        memory.read({x.data(), 2, c.d_model}, {ids, 2}, {z.data(), 2, c.d_value},
                    {y.data(), 2, c.d_value}, {ws.data(), 8});
      },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("workspace has 8 bytes"), std::string::npos) << msg;
  // Non-finite corrections.
  v[3] = std::numeric_limits<float>::infinity();
  msg = expect_error([&] { write({s, s}); }, Errc::kNonFinite);
  EXPECT_NE(msg.find("values(0, 3) = inf"), std::string::npos) << msg;
  write({-1, -1});  // rows without a session are not looked at
  EXPECT_EQ(state(memory, s), before);
  // Opening more than max_sessions.
  for (int i = 0; i < 3; ++i) memory.open();
  msg = expect_error([&] { memory.open(); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("all 4 sessions"), std::string::npos) << msg;
  // restore checks everything before it writes.
  const float bad_ids_values[1] = {0.0f};
  const std::int32_t dup[2] = {3, 3};
  std::vector<float> two_rows(sz(2 * c.d_value), 0.0f);
  expect_error(
      [&] {
        memory.restore(s, memory.fast_weights(s), {dup, 2}, {two_rows.data(), 2, c.d_value}, 0);
      },
      Errc::kInvalidArgument);
  const std::int32_t outside[1] = {25};
  expect_error(
      [&] {
        memory.restore(s, memory.fast_weights(s), {outside, 1}, {two_rows.data(), 1, c.d_value}, 0);
      },
      Errc::kOutOfRange);
  (void)bad_ids_values;
  EXPECT_EQ(state(memory, s), before);
  // A memory without slots has no select.
  SessionMemoryConfig fast_only = c;
  fast_only.sub_keys = 0;
  const SessionMemory no_slots(fast_only, setup.weights());
  std::int32_t slot = 0;
  float w = 0;
  expect_error(
      [&] {
        no_slots.select({x.data(), 1, c.d_model}, {&slot, 1, 1}, {&w, 1, 1}, view(ws));
      },
      Errc::kInvalidArgument);
  // The match gate: match() needs it, restore() checks its keys.
  const std::int32_t one_id = s;
  msg = expect_error(
      [&] {
        memory.match({x.data(), 1, c.d_model}, {&one_id, 1}, {&w, 1}, view(ws));
      },
      Errc::kInvalidArgument);
  EXPECT_NE(msg.find("no match gate"), std::string::npos) << msg;
  std::vector<std::int8_t> keys(sz(4 * c.d_key), 1);
  const float scales[4] = {0.1f, 0.1f, 0.1f, 0.1f};
  const auto restore_keys = [&](SessionMemory& m, std::int32_t id, index_t kept) {
    m.restore(id, m.fast_weights(id), {}, {}, 0, {keys.data(), kept, c.d_key}, {scales, kept});
  };
  msg = expect_error([&] { restore_keys(memory, s, 1); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("more than the 0 the match gate keeps"), std::string::npos) << msg;
  SessionMemory with_gate(gated(c), setup.weights());
  const std::int32_t g = with_gate.open();
  write_events(with_gate, events_for(c, std::vector<std::int32_t>(2, g), 21), 0, 2, ws);
  const std::vector<std::byte> gated_before = state(with_gate, g);
  expect_error([&] { restore_keys(with_gate, g, 4); }, Errc::kShapeMismatch);
  keys[7] = -128;
  msg = expect_error([&] { restore_keys(with_gate, g, 2); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("match_keys(0, 7) = -128"), std::string::npos) << msg;
  keys[7] = 1;
  const float bad_scale[1] = {-1.0f};
  msg = expect_error(
      [&] {
        with_gate.restore(g, with_gate.fast_weights(g), {}, {}, 0, {keys.data(), 1, c.d_key},
                          {bad_scale, 1});
      },
      Errc::kInvalidArgument);
  EXPECT_NE(msg.find("match_scales[0] = -1"), std::string::npos) << msg;
  EXPECT_EQ(state(with_gate, g), gated_before);
  EXPECT_EQ(state(memory, s), before);
}

TEST(SessionMemory, RejectsBadConfigsAndWeights) {
  const SessionMemoryConfig good = small_config(true, 5);
  const Frozen setup(good, 22, true);
  const auto bad = [&](auto change, const char* needle) {
    SessionMemoryConfig c = good;
    change(c);
    const std::string msg =
        expect_error([&] { SessionMemory m(c, setup.weights()); }, Errc::kInvalidArgument);
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  };
  bad([](auto& c) { c.d_value = 0; }, "d_value = 0");
  bad(
      [](auto& c) {
        c.fast_weights = false;
        c.sub_keys = 0;
      },
      "no memory");
  bad([](auto& c) { c.top_k = 9; }, "top_k = 9");
  bad([](auto& c) { c.top_k = 6; }, "top_k = 6");
  bad([](auto& c) { c.slot_capacity = 2; }, "slot_capacity = 2");
  bad([](auto& c) { c.slot_capacity = 26; }, "slot_capacity = 26");
  bad([](auto& c) { c.sub_keys = 4097; }, "sub_keys = 4097");
  bad([](auto& c) { c.decay = 0.0f; }, "decay = 0");
  bad([](auto& c) { c.write_strength = 1.5f; }, "write_strength = 1.5");
  bad([](auto& c) { c.gate = -0.1f; }, "gate = -0.1");
  bad([](auto& c) { c.slot_sharpness = 0.0f; }, "slot_sharpness = 0");
  bad([](auto& c) { c.max_sessions = 0; }, "max_sessions = 0");
  bad([](auto& c) { c.d_key = 21; }, "d_key = 21");
  bad([](auto& c) { c.match_keys = -1; }, "match_keys = -1");
  const auto bad_gate = [&](float threshold, float width, const char* needle) {
    bad(
        [&](auto& c) {
          c.match_keys = 2;
          c.match_threshold = threshold;
          c.match_width = width;
        },
        needle);
  };
  const float inf = std::numeric_limits<float>::infinity();
  bad_gate(1.5f, 0.1f, "match_threshold = 1.5");
  bad_gate(std::numeric_limits<float>::quiet_NaN(), 0.1f, "match_threshold = nan");
  bad_gate(0.5f, -0.1f, "match_width = -0.1");
  bad_gate(0.5f, inf, "match_width = inf");
  // Weights of the wrong shape, or int8 outside [-127, 127].
  SessionMemoryWeights w = setup.weights();
  w.w_key = {setup.w_key.data(), good.d_key - 1, good.d_model};
  std::string msg = expect_error([&] { SessionMemory m(good, w); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("weights.w_key"), std::string::npos) << msg;
  w = setup.weights();
  w.sub_keys_b.scale = {setup.scale_b.data(), 4};
  msg = expect_error([&] { SessionMemory m(good, w); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("weights.sub_keys_b.scale"), std::string::npos) << msg;
  Frozen minus = setup;
  minus.keys_a[7] = -128;
  msg = expect_error([&] { SessionMemory m(good, minus.weights()); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("-128"), std::string::npos) << msg;
  // quantize_rows refuses non-finite rows.
  const float nan_row[2] = {1.0f, std::numeric_limits<float>::quiet_NaN()};
  std::int8_t q[2];
  float scale = 0;
  msg = expect_error(
      [&] {
        moekit::cpu::quantize_rows({nan_row, 1, 2}, {q, 1, 2}, {&scale, 1});
      },
      Errc::kNonFinite);
  EXPECT_NE(msg.find("quantize_rows"), std::string::npos) << msg;
}

}  // namespace
