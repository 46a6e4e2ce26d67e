// The BERT-family encoder (moekit/nn/bert_encoder.hpp) and its checkpoints
// (moekit/io/bert.hpp) on tiny random BERTs made here: against a float64
// reference of a padded, masked batch (bert_reference.hpp) for post- and
// pre-LN and every activation; strides; batch, order and thread invariance
// bit for bit; layer ranges and early-exit compaction; pooling; safetensors
// round trips in F32 / F16 / BF16 with and without the "bert." prefix; bad
// input of every kind.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "allocation_counter.hpp"
#include "bert_reference.hpp"
#include "expect_error.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/io/bert.hpp"
#include "strided_matrix.hpp"
#include "test_support.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using moekit::Activation;
using moekit::Errc;
using moekit::index_t;
using moekit::MatrixView;
using moekit::VectorView;
using moekit::cpu::BertEncoder;
using moekit::cpu::BertEncoderConfig;
using moekit::cpu::BertEncoderStorage;
using moekit::cpu::GemmDtype;
using moekit::cpu::NormPlacement;
using moekit::cpu::PackedBertWeights;
using moekit::cpu::Pooling;
using moekit_test::expect_error;
using moekit_test::same_bits;
using moekit_test::StridedMatrix;

// A batch of random sequences, packed.
struct Batch {
  std::vector<std::int32_t> ids, types;
  std::vector<index_t> offsets{0};

  Batch(const std::vector<index_t>& lengths, index_t vocab, std::uint32_t seed) {
    std::mt19937 rng(seed);
    for (const index_t m : lengths) {
      for (index_t i = 0; i < m; ++i) {
        ids.push_back(static_cast<std::int32_t>(rng() % static_cast<std::uint32_t>(vocab)));
        types.push_back(static_cast<std::int32_t>(rng() % 2));
      }
      offsets.push_back(static_cast<index_t>(ids.size()));
    }
  }
  index_t tokens() const { return static_cast<index_t>(ids.size()); }
  index_t size() const { return static_cast<index_t>(offsets.size()) - 1; }
  VectorView<const std::int32_t> id_view() const { return {ids.data(), tokens()}; }
  VectorView<const std::int32_t> type_view() const { return {types.data(), tokens()}; }
  VectorView<const index_t> offset_view() const { return {offsets.data(), size() + 1}; }
  std::vector<int> seq_ids(index_t s) const {
    return {ids.begin() + offsets[static_cast<std::size_t>(s)],
            ids.begin() + offsets[static_cast<std::size_t>(s) + 1]};
  }
  std::vector<int> seq_types(index_t s) const {
    return {types.begin() + offsets[static_cast<std::size_t>(s)],
            types.begin() + offsets[static_cast<std::size_t>(s) + 1]};
  }
};

struct Tiny {
  BertEncoderConfig config;
  BertEncoder encoder;
  BertEncoderStorage storage;
  explicit Tiny(BertEncoderConfig c, std::uint32_t seed = 1) : config(c), encoder(c), storage(c) {
    moekit_test::randomize(storage.views(), seed);
  }
  moekit::cpu::BertEncoderWeights weights() const { return storage.weights(); }

  // The encoder's output for `batch`, layers [0, layers) (a fresh workspace),
  // with the projections on `packed` where given.
  StridedMatrix run(const Batch& batch, int layers = -1, index_t pad = 0,
                    const PackedBertWeights* packed = nullptr) const {
    if (layers < 0) layers = config.num_layers;
    StridedMatrix h(batch.tokens(), config.d_model, pad);
    h.poison();
    std::vector<std::byte> ws(static_cast<std::size_t>(encoder.workspace_size(
        batch.tokens(), moekit::cpu::longest_sequence(batch.offset_view()))));
    encoder.embed(batch.id_view(), batch.type_view(), batch.offset_view(), weights(), h.view());
    const VectorView<std::byte> wsv(ws.data(), static_cast<index_t>(ws.size()));
    if (packed != nullptr) {
      encoder.run_layers(0, layers, batch.offset_view(), weights(), *packed, h.view(), wsv);
    } else {
      encoder.run_layers(0, layers, batch.offset_view(), weights(), h.view(), wsv);
    }
    return h;
  }
};

// ||out - ref|| / ||ref|| over the real tokens of every sequence.
double relative_error(const Tiny& t, const Batch& batch, const StridedMatrix& out, int layers) {
  index_t width = 0;
  for (index_t s = 0; s < batch.size(); ++s) {
    width = std::max(width, batch.offsets[static_cast<std::size_t>(s) + 1] -
                                batch.offsets[static_cast<std::size_t>(s)]);
  }
  double num = 0.0, den = 0.0;
  for (index_t s = 0; s < batch.size(); ++s) {
    const moekit_test::Mat ref = moekit_test::ref_bert(t.config, t.weights(), batch.seq_ids(s),
                                                       batch.seq_types(s), width + 3, layers);
    for (index_t i = 0; i < static_cast<index_t>(batch.seq_ids(s).size()); ++i)
      for (index_t k = 0; k < t.config.d_model; ++k) {
        const double e = out.at(batch.offsets[static_cast<std::size_t>(s)] + i, k) - ref(i, k);
        num += e * e;
        den += ref(i, k) * ref(i, k);
      }
  }
  return std::sqrt(num / den);
}

struct Variant {
  NormPlacement norm;
  Activation act;
  bool final_norm;
};

// The encoder against the float64 reference of a padded, masked batch.
void check_against_reference(const Variant& v) {
  BertEncoderConfig c = moekit_test::tiny_bert_config(v.norm, v.act);
  Tiny t(c, 7);
  if (v.norm == NormPlacement::kPre && !v.final_norm) {
    // The same weights without the final LayerNorm: empty views.
    auto w = t.storage.views();
    moekit::cpu::BertEncoderWeights plain = w;
    plain.final_gamma = {};
    plain.final_beta = {};
    const Batch batch({5, 1, 33}, c.vocab_size, 3);
    StridedMatrix h(batch.tokens(), c.d_model);
    std::vector<std::byte> ws(
        static_cast<std::size_t>(t.encoder.workspace_size(batch.tokens(), 33)));
    t.encoder.forward(batch.id_view(), batch.type_view(), batch.offset_view(), plain, h.view(),
                      {ws.data(), static_cast<index_t>(ws.size())});
    // Reference: the pre-LN stack without its last normalisation.
    double num = 0.0, den = 0.0;
    for (index_t s = 0; s < batch.size(); ++s) {
      const auto ref =
          moekit_test::ref_bert(c, plain, batch.seq_ids(s), batch.seq_types(s), 36, c.num_layers);
      for (index_t i = 0; i < static_cast<index_t>(batch.seq_ids(s).size()); ++i)
        for (index_t k = 0; k < c.d_model; ++k) {
          const double e = h.at(batch.offsets[static_cast<std::size_t>(s)] + i, k) - ref(i, k);
          num += e * e;
          den += ref(i, k) * ref(i, k);
        }
    }
    EXPECT_LT(std::sqrt(num / den), 1e-5);
    return;
  }
  // Lengths: one token, several row chunks (32 rows each), a long one, and an empty sequence.
  const Batch batch({5, 1, 0, 33, 70, 12}, c.vocab_size, 11);
  for (const int layers : {0, 1, 2}) {
    const StridedMatrix h = t.run(batch, layers, 2);
    EXPECT_FALSE(h.any_nan());
    EXPECT_TRUE(h.padding_untouched());
    EXPECT_LT(relative_error(t, batch, h, layers), 1e-5) << "layers " << layers;
  }
}

TEST(BertEncoderMath, PostLnGeluErf) {
  check_against_reference({NormPlacement::kPost, Activation::kGeluErf, false});
}
TEST(BertEncoderMath, PostLnGeluTanh) {
  check_against_reference({NormPlacement::kPost, Activation::kGeluTanh, false});
}
TEST(BertEncoderMath, PostLnRelu) {
  check_against_reference({NormPlacement::kPost, Activation::kRelu, false});
}
TEST(BertEncoderMath, PreLnGeluErfWithFinalLayerNorm) {
  check_against_reference({NormPlacement::kPre, Activation::kGeluErf, true});
}
TEST(BertEncoderMath, PreLnGeluTanhWithoutFinalLayerNorm) {
  check_against_reference({NormPlacement::kPre, Activation::kGeluTanh, false});
}

TEST(BertEncoder, StridesGiveTheSameBits) {
  const Tiny t(moekit_test::tiny_bert_config());
  const Batch batch({9, 40}, t.config.vocab_size, 5);
  const StridedMatrix dense = t.run(batch, -1, 0);
  const StridedMatrix strided = t.run(batch, -1, 7);
  EXPECT_TRUE(strided.padding_untouched());
  for (index_t r = 0; r < dense.rows; ++r)
    for (index_t k = 0; k < dense.cols; ++k) ASSERT_EQ(dense.at(r, k), strided.at(r, k));
}

// A sequence's rows of `h` (from `batch`) as raw bits.
std::vector<float> rows_of(const StridedMatrix& h, const Batch& batch, index_t s) {
  std::vector<float> out;
  for (index_t r = batch.offsets[static_cast<std::size_t>(s)];
       r < batch.offsets[static_cast<std::size_t>(s) + 1]; ++r)
    for (index_t k = 0; k < h.cols; ++k) out.push_back(h.at(r, k));
  return out;
}

// Odd sizes: rows of every buffer start at every alignment.
BertEncoderConfig odd_bert_config() {
  BertEncoderConfig c = moekit_test::tiny_bert_config();
  c.d_model = 30;  // 3 heads of 10
  c.d_ff = 50;
  return c;
}

// Relative error against float64 of each product dtype (packed weights);
// fp32 from the views is the first entry.
struct DtypeCase {
  const char* name;
  bool packed;
  GemmDtype dtype;
  double tolerance;
};
constexpr DtypeCase kDtypes[] = {{"float32 views", false, GemmDtype::kFloat32, 1e-5},
                                 {"float32 packed", true, GemmDtype::kFloat32, 1e-5},
                                 {"bfloat16 packed", true, GemmDtype::kBfloat16, 1e-2},
                                 {"int8 packed", true, GemmDtype::kInt8, 2e-2}};

void check_invariance(const BertEncoderConfig& config, const DtypeCase& dt = kDtypes[0]) {
  SCOPED_TRACE(dt.name);
  const Tiny t(config);
  const PackedBertWeights packed = t.encoder.pack(t.weights(), dt.dtype);
  const PackedBertWeights* p = dt.packed ? &packed : nullptr;
  const Batch batch({7, 45, 1, 33, 20}, t.config.vocab_size, 21);
  const StridedMatrix together = t.run(batch, -1, 0, p);
  EXPECT_LT(relative_error(t, batch, together, t.config.num_layers), dt.tolerance);
  for (index_t s = 0; s < batch.size(); ++s) {
    Batch alone({}, t.config.vocab_size, 0);
    alone.ids = batch.seq_ids(s);
    alone.types = batch.seq_types(s);
    alone.offsets = {0, alone.tokens()};
    EXPECT_TRUE(same_bits(rows_of(t.run(alone, -1, 0, p), alone, 0), rows_of(together, batch, s)))
        << "sequence " << s;
  }
  // Reversed order, with the sequences at other rows.
  Batch reversed({}, t.config.vocab_size, 0);
  for (index_t s = batch.size() - 1; s >= 0; --s) {
    const auto ids = batch.seq_ids(s), types = batch.seq_types(s);
    reversed.ids.insert(reversed.ids.end(), ids.begin(), ids.end());
    reversed.types.insert(reversed.types.end(), types.begin(), types.end());
    reversed.offsets.push_back(reversed.tokens());
  }
  const StridedMatrix backwards = t.run(reversed, -1, 0, p);
  for (index_t s = 0; s < batch.size(); ++s) {
    EXPECT_TRUE(
        same_bits(rows_of(backwards, reversed, batch.size() - 1 - s), rows_of(together, batch, s)));
  }
#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
  for (const int n : {1, 2, 3}) {
    omp_set_num_threads(n);
    const StridedMatrix other = t.run(batch, -1, 0, p);
    EXPECT_TRUE(other.bits_equal(together)) << n << " threads";
  }
  omp_set_num_threads(threads);
#endif
}

TEST(BertEncoder, ASequenceGivesTheSameBitsInAnyBatchAndOnAnyThreadCount) {
  check_invariance(moekit_test::tiny_bert_config());
}
TEST(BertEncoder, ASequenceGivesTheSameBitsInAnyBatchAtOddSizes) {
  check_invariance(odd_bert_config());
}

// Packed projections: fp32 gives the views' bits; bf16 and int8 are within
// their tolerance of float64 and batch and thread invariant, at both sizes
// (odd: no dimension a multiple of a vector or a tile).
TEST(BertEncoderPacked, EveryDtypeIsBatchAndThreadInvariant) {
  for (const DtypeCase& dt : kDtypes) {
    if (!dt.packed) continue;
    check_invariance(moekit_test::tiny_bert_config(), dt);
    check_invariance(odd_bert_config(), dt);
  }
}

TEST(BertEncoderPacked, Float32PackedGivesTheViewsBits) {
  const Tiny t(moekit_test::tiny_bert_config(NormPlacement::kPre, Activation::kGeluTanh));
  const Batch batch({5, 1, 0, 33, 70, 12}, t.config.vocab_size, 11);
  const PackedBertWeights packed = t.encoder.pack(t.weights(), GemmDtype::kFloat32);
  EXPECT_TRUE(t.run(batch, -1, 3, &packed).bits_equal(t.run(batch, -1, 3)));
}

// bf16 and int8 on the AMX kernels (on the tile emulator here unless the CPU
// has AMX): within tolerance, and a sequence alone gives its bits in a batch.
TEST(BertEncoderPacked, AmxKernelsAreAccurateAndBatchInvariant) {
  const moekit::cpu::detail::AmxEmulation amx;
  const Tiny t(odd_bert_config());
  const Batch batch({9, 40, 3}, t.config.vocab_size, 8);
  for (const DtypeCase& dt : {kDtypes[2], kDtypes[3]}) {
    SCOPED_TRACE(dt.name);
    const PackedBertWeights packed = t.encoder.pack(t.weights(), dt.dtype);
    const StridedMatrix together = t.run(batch, -1, 0, &packed);
    EXPECT_LT(relative_error(t, batch, together, t.config.num_layers), dt.tolerance);
    Batch alone({}, t.config.vocab_size, 0);
    alone.ids = batch.seq_ids(1);
    alone.types = batch.seq_types(1);
    alone.offsets = {0, alone.tokens()};
    EXPECT_TRUE(
        same_bits(rows_of(t.run(alone, -1, 0, &packed), alone, 0), rows_of(together, batch, 1)));
  }
}

// Forward allocates nothing, from the views or packed (the thread pool is
// started by a first run).
TEST(BertEncoderPacked, NoAllocationInForward) {
  if (!moekit_test::AllocationCounter::available) GTEST_SKIP() << "the sanitizer owns operator new";
  BertEncoderConfig c = moekit_test::tiny_bert_config();
  c.d_model = 96;
  c.d_ff = 384;
  const Tiny t(c);
  const Batch batch({64, 17, 64, 40}, c.vocab_size, 5);
  StridedMatrix h(batch.tokens(), c.d_model);
  std::vector<std::byte> ws(static_cast<std::size_t>(t.encoder.workspace_size(batch.tokens(), 64)));
  const VectorView<std::byte> wsv(ws.data(), static_cast<index_t>(ws.size()));
  const BertEncoder& encoder = t.encoder;
  const moekit::cpu::BertEncoderWeights weights = t.weights();
  // [packed]
  // Once: the projections packed in int8 (or GemmDtype::kFloat32, kBfloat16).
  const moekit::cpu::PackedBertWeights packed = encoder.pack(weights, GemmDtype::kInt8);
  // Every call: embeddings, biases and LayerNorms from `weights`, projections from `packed`.
  encoder.forward(batch.id_view(), batch.type_view(), batch.offset_view(), weights, packed,
                  h.view(), wsv);
  // [packed]
  for (int pass = 0; pass < 2; ++pass) {
    moekit_test::CountAllocations count;
    encoder.forward(batch.id_view(), batch.type_view(), batch.offset_view(), weights, h.view(),
                    wsv);
    encoder.forward(batch.id_view(), batch.type_view(), batch.offset_view(), weights, packed,
                    h.view(), wsv);
    if (pass == 1) {
      EXPECT_EQ(count.allocations(), 0);
    }
  }
}

TEST(BertEncoderPacked, RejectsPackedWeightsOfAnotherShapeOrDtype) {
  const Tiny t(moekit_test::tiny_bert_config());
  BertEncoderConfig other = moekit_test::tiny_bert_config();
  other.d_ff = 64;
  const Tiny u(other);
  const Batch batch({4, 6}, t.config.vocab_size, 2);
  StridedMatrix h(10, 48);
  h.fill(1.0f);
  const StridedMatrix before = h;
  std::vector<std::byte> ws(static_cast<std::size_t>(t.encoder.workspace_size(10, 6)));
  const VectorView<std::byte> wsv(ws.data(), static_cast<index_t>(ws.size()));
  const PackedBertWeights wrong_shape = u.encoder.pack(u.weights(), GemmDtype::kBfloat16);
  std::string msg = expect_error(
      [&] {
        t.encoder.run_layers(0, 2, batch.offset_view(), t.weights(), wrong_shape, h.view(), wsv);
      },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("run_layers"), std::string::npos) << msg;
  EXPECT_NE(msg.find("packed.w_ff1 packs 2 groups of 48 x 64, expected 2 of 48 x 160"),
            std::string::npos)
      << msg;
  PackedBertWeights mixed = t.encoder.pack(t.weights(), GemmDtype::kInt8);
  mixed.w_out = t.encoder.pack(t.weights(), GemmDtype::kFloat32).w_out;
  msg = expect_error(
      [&] { t.encoder.run_layers(0, 2, batch.offset_view(), t.weights(), mixed, h.view(), wsv); },
      Errc::kInvalidArgument);
  EXPECT_NE(msg.find("packed.w_out holds float32 but packed.w_qkv holds int8"), std::string::npos)
      << msg;
  EXPECT_TRUE(h.bits_equal(before));
  msg = expect_error([&] { (void)t.encoder.pack(t.weights(), static_cast<GemmDtype>(7)); },
                     Errc::kInvalidArgument);
  EXPECT_NE(msg.find("pack"), std::string::npos) << msg;
}

TEST(BertEncoder, LayerRangesAndEarlyExitCompactionGiveTheSameBits) {
  const Tiny t(moekit_test::tiny_bert_config());
  const Batch batch({6, 35, 2, 18}, t.config.vocab_size, 4);
  const StridedMatrix full = t.run(batch);
  // Layer 0 on all, then drop sequences 0 and 2, then layer 1 on the others.
  const StridedMatrix after0 = t.run(batch, 1);
  const std::vector<index_t> keep = {3, 1};
  std::vector<index_t> kept_offsets(3);
  StridedMatrix kept(18 + 35, t.config.d_model, 1);
  moekit::cpu::gather_sequences(after0.cview(), batch.offset_view(), {keep.data(), 2}, kept.view(),
                                {kept_offsets.data(), 3});
  EXPECT_EQ(kept_offsets, (std::vector<index_t>{0, 18, 53}));
  std::vector<std::byte> ws(static_cast<std::size_t>(t.encoder.workspace_size(kept.rows, 35)));
  t.encoder.run_layers(1, 2, {kept_offsets.data(), 3}, t.weights(), kept.view(),
                       {ws.data(), static_cast<index_t>(ws.size())});
  Batch kept_batch({}, t.config.vocab_size, 0);
  kept_batch.offsets = kept_offsets;
  kept_batch.ids.assign(53, 0);
  EXPECT_TRUE(same_bits(rows_of(kept, kept_batch, 0), rows_of(full, batch, 3)));
  EXPECT_TRUE(same_bits(rows_of(kept, kept_batch, 1), rows_of(full, batch, 1)));
  // An empty range changes nothing.
  StridedMatrix same = after0;
  t.encoder.run_layers(1, 1, batch.offset_view(), t.weights(), same.view(), {});
  EXPECT_TRUE(same.bits_equal(after0));
}

TEST(BertEncoder, PoolingMatchesFloat64) {
  std::mt19937 rng(9);
  StridedMatrix h(12, 10, 2);
  h.randomize(rng);
  const std::vector<index_t> offsets = {0, 3, 3, 4, 12};
  for (const Pooling p : {Pooling::kCls, Pooling::kMean, Pooling::kMax}) {
    for (const bool normalize : {false, true}) {
      StridedMatrix out(4, 10, 3);
      out.poison();
      moekit::cpu::pool_sequences(h.cview(), {offsets.data(), 5}, p, normalize, out.view());
      EXPECT_TRUE(out.padding_untouched());
      for (index_t s = 0; s < 4; ++s) {
        std::vector<double> ref(10, 0.0);
        const index_t r0 = offsets[static_cast<std::size_t>(s)];
        const index_t m = offsets[static_cast<std::size_t>(s) + 1] - r0;
        for (index_t k = 0; k < 10 && m > 0; ++k) {
          double acc = p == Pooling::kMax ? -1e300 : 0.0;
          for (index_t i = 0; i < (p == Pooling::kCls ? 1 : m); ++i) {
            acc =
                p == Pooling::kMax ? std::max(acc, double{h.at(r0 + i, k)}) : acc + h.at(r0 + i, k);
          }
          ref[static_cast<std::size_t>(k)] =
              p == Pooling::kMean ? acc / static_cast<double>(m) : acc;
        }
        double norm = 0.0;
        for (const double e : ref) norm += e * e;
        norm = std::max(std::sqrt(norm), 1e-12);
        for (index_t k = 0; k < 10; ++k) {
          const double expected = ref[static_cast<std::size_t>(k)] / (normalize ? norm : 1.0);
          EXPECT_NEAR(out.at(s, k), expected, 1e-6)
              << "seq " << s << " pooling " << static_cast<int>(p);
        }
      }
    }
  }
}

// ---- checkpoints ----------------------------------------------------------------

std::filesystem::path temp_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("moekit_bert_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::string config_json(const BertEncoderConfig& c) {
  // Appended piece by piece: GCC 12 warns (-Wrestrict, wrongly) about
  // "literal" + std::to_string(...) at -O3.
  std::string text = "{\"model_type\": \"bert\"";
  const auto key = [&](const char* name, index_t value) {
    text.append(", \"").append(name).append("\": ").append(std::to_string(value));
  };
  key("hidden_size", c.d_model);
  key("num_hidden_layers", c.num_layers);
  key("num_attention_heads", c.num_heads);
  key("intermediate_size", c.d_ff);
  key("max_position_embeddings", c.max_positions);
  key("vocab_size", c.vocab_size);
  key("type_vocab_size", c.type_vocab_size);
  return text.append(", \"layer_norm_eps\": 1e-06, \"hidden_act\": \"gelu\"}");
}

std::string vocab_text(index_t n) {
  std::string text = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n";
  for (index_t i = 5; i < n; ++i) text.append("w").append(std::to_string(i)).append("\n");
  return text;
}

TEST(BertCheckpoint, RoundTripsThroughSafetensorsInEveryDtypeAndNaming) {
  const Tiny t(moekit_test::tiny_bert_config());
  for (const char* prefix : {"", "bert."}) {
    for (const moekit::io::Dtype dtype :
         {moekit::io::Dtype::kF32, moekit::io::Dtype::kF16, moekit::io::Dtype::kBF16}) {
      moekit::io::SafetensorsWriter writer;
      writer.add(moekit::io::weight_sources(t.encoder, t.weights(), prefix), dtype);
      std::vector<float> pooler(48 * 48, 0.5f);
      writer.add(std::string(prefix) + "pooler.dense.weight",
                 MatrixView<const float>(pooler.data(), 48, 48));
      const auto reader = moekit::io::SafetensorsReader::from_bytes(writer.to_bytes(), "memory");
      EXPECT_EQ(moekit::io::bert_prefix(reader), prefix);
      BertEncoderStorage loaded(t.config);
      moekit::io::load_bert_weights(reader, t.encoder, loaded.views());
      const auto round = [&](float x) {
        switch (dtype) {
          case moekit::io::Dtype::kF16:
            return moekit::io::f16_bits_to_float(moekit::io::float_to_f16_bits(x));
          case moekit::io::Dtype::kBF16:
            return moekit::io::bf16_bits_to_float(moekit::io::float_to_bf16_bits(x));
          default:
            return x;
        }
      };
      const auto a = t.weights(), b = loaded.weights();
      const std::pair<MatrixView<const float>, MatrixView<const float>> pairs[] = {
          {a.word_embeddings, b.word_embeddings},
          {a.position_embeddings, b.position_embeddings},
          {a.token_type_embeddings, b.token_type_embeddings},
          {a.w_qkv, b.w_qkv},
          {a.b_qkv, b.b_qkv},
          {a.w_out, b.w_out},
          {a.b_out, b.b_out},
          {a.ln1_gamma, b.ln1_gamma},
          {a.ln2_beta, b.ln2_beta},
          {a.w_ff1, b.w_ff1},
          {a.b_ff1, b.b_ff1},
          {a.w_ff2, b.w_ff2},
          {a.b_ff2, b.b_ff2}};
      for (const auto& [x, y] : pairs)
        for (index_t r = 0; r < x.rows(); ++r)
          for (index_t k = 0; k < x.cols(); ++k) ASSERT_EQ(round(x(r, k)), y(r, k));
      EXPECT_EQ(round(a.embedding_gamma[3]), b.embedding_gamma[3]);
    }
  }
}

TEST(BertCheckpoint, LoadsAModelFolder) {
  const Tiny t(moekit_test::tiny_bert_config());
  const auto dir = temp_dir("folder");
  write_text(dir / "config.json", config_json(t.config));
  write_text(dir / "vocab.txt", vocab_text(t.config.vocab_size));
  moekit::io::SafetensorsWriter writer;
  writer.add(moekit::io::weight_sources(t.encoder, t.weights(), "bert."), moekit::io::Dtype::kF32);
  writer.write(dir / "model.safetensors");
  const moekit::io::BertModel model = moekit::io::load_bert_model(dir);
  EXPECT_EQ(model.tokenizer.vocab_size(), t.config.vocab_size);
  EXPECT_EQ(model.encoder.config().activation, Activation::kGeluErf);
  EXPECT_EQ(model.encoder.config().layer_norm_eps, 1e-6f);
  const moekit::text::TokenBatch batch =
      model.tokenizer.encode_batch(std::vector<std::string>{"w7 w8 w9", "w12"}, 16);
  EXPECT_EQ(batch.ids, (std::vector<std::int32_t>{2, 7, 8, 9, 3, 2, 12, 3}));
  Batch b({}, t.config.vocab_size, 0);
  b.ids = batch.ids;
  b.types.assign(batch.ids.size(), 0);
  b.offsets = batch.offsets;
  const StridedMatrix expected = t.run(b);
  StridedMatrix h(b.tokens(), t.config.d_model, 0);
  std::vector<std::byte> ws(static_cast<std::size_t>(model.encoder.workspace_size(b.tokens(), 5)));
  model.encoder.forward(batch.ids_view(), {}, batch.offsets_view(), model.weights.weights(),
                        h.view(), {ws.data(), static_cast<index_t>(ws.size())});
  EXPECT_TRUE(h.bits_equal(expected));
  std::filesystem::remove_all(dir);
}

TEST(BertCheckpoint, RejectsBadCheckpointsNamingTheTensor) {
  const Tiny t(moekit_test::tiny_bert_config());
  auto sources = moekit::io::weight_sources(t.encoder, t.weights(), "");
  BertEncoderStorage dst(t.config);
  const auto load_without = [&](const std::string& name) {
    moekit::io::SafetensorsWriter writer;
    for (const auto& s : sources)
      if (s.name != name) writer.add(s.name, s.shape, s.view);
    const auto reader = moekit::io::SafetensorsReader::from_bytes(writer.to_bytes(), "ckpt");
    moekit::io::load_bert_weights(reader, t.encoder, dst.views());
  };
  std::string msg = expect_error([&] { load_without("encoder.layer.1.attention.self.key.bias"); },
                                 Errc::kFormatError);
  EXPECT_NE(msg.find("encoder.layer.1.attention.self.key.bias"), std::string::npos) << msg;
  // A misshapen tensor: the intermediate weight transposed.
  moekit::io::SafetensorsWriter writer;
  for (const auto& s : sources) {
    if (s.name == "encoder.layer.0.intermediate.dense.weight") {
      writer.add(s.name, {48, 160}, s.view);
    } else {
      writer.add(s.name, s.shape, s.view);
    }
  }
  const auto reader = moekit::io::SafetensorsReader::from_bytes(writer.to_bytes(), "ckpt");
  msg = expect_error([&] { moekit::io::load_bert_weights(reader, t.encoder, dst.views()); },
                     Errc::kShapeMismatch);
  EXPECT_NE(msg.find("encoder.layer.0.intermediate.dense.weight"), std::string::npos) << msg;
  // Nothing was written by the rejected loads.
  EXPECT_EQ(dst.weights().w_qkv(0, 0), 0.0f);
  // A vocabulary larger than the word embeddings.
  const auto dir = temp_dir("vocab");
  write_text(dir / "config.json", config_json(t.config));
  write_text(dir / "vocab.txt", vocab_text(t.config.vocab_size + 1));
  msg = expect_error([&] { moekit::io::load_bert_model(dir); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("41 tokens but the word embeddings have vocab_size = 40"), std::string::npos)
      << msg;
  std::filesystem::remove_all(dir);
}

TEST(BertCheckpoint, RejectsBadConfigs) {
  const BertEncoderConfig c = moekit_test::tiny_bert_config();
  EXPECT_EQ(moekit::io::parse_bert_config(config_json(c), "c").d_ff, 160);
  std::string msg =
      expect_error([] { moekit::io::parse_bert_config("{\"hidden_size\": 8}", "cfg.json"); },
                   Errc::kFormatError);
  EXPECT_NE(msg.find("'cfg.json' has no \"num_hidden_layers\""), std::string::npos) << msg;
  std::string text = config_json(c);
  text.replace(text.find("\"gelu\""), 6, "\"swish\"");
  msg = expect_error([&] { moekit::io::parse_bert_config(text, "c"); }, Errc::kUnsupported);
  EXPECT_NE(msg.find("hidden_act \"swish\""), std::string::npos) << msg;
  text = config_json(c);
  text.replace(text.find("\"bert\""), 6, "\"roberta\"");
  expect_error([&] { moekit::io::parse_bert_config(text, "c"); }, Errc::kUnsupported);
  text = config_json(c);
  text.replace(text.find("\"num_attention_heads\": 3"), 24, "\"num_attention_heads\": 5");
  msg = expect_error([&] { moekit::io::parse_bert_config(text, "c"); }, Errc::kInvalidArgument);
  EXPECT_NE(msg.find("num_heads = 5"), std::string::npos) << msg;
  expect_error([] { moekit::io::parse_bert_config("[1, 2]", "c"); }, Errc::kFormatError);
  expect_error([] { moekit::io::parse_bert_config("{", "c"); }, Errc::kFormatError);
  expect_error([] { moekit::io::read_bert_config("/nonexistent/config.json"); }, Errc::kIoError);
}

TEST(BertEncoder, RejectsBadInputBeforeWritingAnything) {
  const Tiny t(moekit_test::tiny_bert_config());
  const Batch batch({4, 6}, t.config.vocab_size, 2);
  StridedMatrix h(10, 48);
  h.fill(1.0f);
  const StridedMatrix before = h;
  std::vector<std::byte> ws(static_cast<std::size_t>(t.encoder.workspace_size(10, 6)));
  const VectorView<std::byte> wsv(ws.data(), static_cast<index_t>(ws.size()));
  std::vector<std::int32_t> ids = batch.ids;
  ids[7] = 40;
  std::string msg = expect_error(
      [&] {
        t.encoder.embed({ids.data(), 10}, {}, batch.offset_view(), t.weights(), h.view());
      },
      Errc::kOutOfRange);
  EXPECT_NE(msg.find("ids[7] = 40 is outside [0, vocab_size = 40)"), std::string::npos) << msg;
  std::vector<std::int32_t> types(10, 0);
  types[2] = 2;
  expect_error(
      [&] {
        t.encoder.embed(batch.id_view(), {types.data(), 10}, batch.offset_view(), t.weights(),
                        h.view());
      },
      Errc::kOutOfRange);
  expect_error(
      [&] {
        t.encoder.embed(batch.id_view(), {types.data(), 9}, batch.offset_view(), t.weights(),
                        h.view());
      },
      Errc::kShapeMismatch);
  const std::vector<index_t> bad_offsets = {0, 7, 5, 10};
  expect_error(
      [&] {
        t.encoder.embed(batch.id_view(), {}, {bad_offsets.data(), 4}, t.weights(), h.view());
      },
      Errc::kInvalidArgument);
  const std::vector<index_t> short_offsets = {0, 4, 9};
  expect_error(
      [&] {
        t.encoder.run_layers(0, 2, {short_offsets.data(), 3}, t.weights(), h.view(), wsv);
      },
      Errc::kShapeMismatch);
  msg = expect_error(
      [&] {
        t.encoder.run_layers(0, 2, batch.offset_view(), t.weights(), h.view(),
                             wsv.segment(0, wsv.size() - 4));
      },
      Errc::kShapeMismatch);
  EXPECT_NE(msg.find("workspace has"), std::string::npos) << msg;
  msg = expect_error(
      [&] { t.encoder.run_layers(1, 3, batch.offset_view(), t.weights(), h.view(), wsv); },
      Errc::kInvalidArgument);
  EXPECT_NE(msg.find("layers [1, 3)"), std::string::npos) << msg;
  auto w = t.weights();
  w.w_ff2 = w.w_ff2.middle_rows(0, 48);
  msg = expect_error([&] { t.encoder.run_layers(0, 2, batch.offset_view(), w, h.view(), wsv); },
                     Errc::kShapeMismatch);
  EXPECT_NE(msg.find("weights.w_ff2"), std::string::npos) << msg;
  EXPECT_TRUE(h.bits_equal(before));
  // A sequence longer than the position table.
  const Batch too_long({81}, t.config.vocab_size, 1);
  StridedMatrix h81(81, 48);
  msg = expect_error(
      [&] {
        t.encoder.embed(too_long.id_view(), {}, too_long.offset_view(), t.weights(), h81.view());
      },
      Errc::kOutOfRange);
  EXPECT_NE(msg.find("sequence 0 has 81 tokens, more than max_positions = 80"), std::string::npos)
      << msg;
  // Configs.
  BertEncoderConfig c = moekit_test::tiny_bert_config();
  c.num_heads = 5;
  expect_error([&] { BertEncoder e(c); }, Errc::kInvalidArgument);
  c = moekit_test::tiny_bert_config();
  c.activation = Activation::kSilu;
  expect_error([&] { BertEncoder e(c); }, Errc::kInvalidArgument);
}

TEST(BertEncoder, EmptyBatchesAndEmptySequences) {
  const Tiny t(moekit_test::tiny_bert_config());
  const std::vector<index_t> none = {0};
  const MatrixView<float> no_rows(nullptr, 0, 48);
  t.encoder.embed({}, {}, {none.data(), 1}, t.weights(), no_rows);
  t.encoder.run_layers(0, 2, {none.data(), 1}, t.weights(), no_rows, {});
  const std::vector<index_t> empties = {0, 0, 0};
  t.encoder.run_layers(0, 2, {empties.data(), 3}, t.weights(), no_rows, {});
  StridedMatrix pooled(2, 48);
  pooled.poison();
  moekit::cpu::pool_sequences(no_rows, {empties.data(), 3}, Pooling::kMean, true, pooled.view());
  EXPECT_EQ(pooled.at(1, 5), 0.0f);
  EXPECT_EQ(t.encoder.workspace_size(0, 0), 0);
}

}  // namespace
