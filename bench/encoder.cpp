// The BERT encoder at the size of all-MiniLM-L6-v2 (6 layers, d = 384, 12
// heads, d_ff = 1536; random weights: the speed does not depend on their
// values): throughput of a batch of 32 sentences of 128 tokens and the
// latency of one 32-token sentence, forward through all layers, at 1 and 2
// threads, with its products on the GEMM engine from the weight views (fp32)
// and on weights packed once in fp32, bf16 and int8, beside the machine's
// large-SGEMM rate (Eigen) measured in this run. The closing table gives
// tokens/s, milliseconds and the encoder's rate as a fraction of the SGEMM
// ceiling. bench/torch_encoder.py runs the same shapes in PyTorch (fp32,
// bf16, dynamic int8) for the side-by-side comparison; tools/cpu_bench.sh
// --encoder runs both with the FMA peak and OpenBLAS SGEMM.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "ceiling.hpp"
#include "inputs.hpp"
#include "moekit/nn/bert_encoder.hpp"
#include "summary.hpp"

namespace {

using moekit::index_t;

moekit::cpu::BertEncoderConfig minilm_config() {
  moekit::cpu::BertEncoderConfig c;
  c.vocab_size = 30522;
  c.d_model = 384;
  c.num_heads = 12;
  c.d_ff = 1536;
  c.num_layers = 6;
  c.max_positions = 512;
  c.type_vocab_size = 2;
  return c;
}

struct Shape {
  const char* name;
  index_t sequences, length;
  index_t tokens() const { return sequences * length; }
  // Multiply-adds x 2 of the products (projections, FFN and attention).
  double flops() const {
    const moekit::cpu::BertEncoderConfig c = minilm_config();
    const double d = static_cast<double>(c.d_model), f = static_cast<double>(c.d_ff);
    const double m = static_cast<double>(length);
    const double per_layer = 2.0 * m * (4.0 * d * d + 2.0 * d * f) + 4.0 * m * m * d;
    return static_cast<double>(sequences) * c.num_layers * per_layer;
  }
};

constexpr Shape kThroughput{"B32_L128", 32, 128};
constexpr Shape kLatency{"B1_L32", 1, 32};

// How the projections run: from the views (fp32) or packed in a dtype.
struct Variant {
  const char* name;
  bool packed;
  moekit::cpu::GemmDtype dtype;
};
constexpr Variant kVariants[] = {{"fp32", false, moekit::cpu::GemmDtype::kFloat32},
                                 {"fp32_packed", true, moekit::cpu::GemmDtype::kFloat32},
                                 {"bf16", true, moekit::cpu::GemmDtype::kBfloat16},
                                 {"int8", true, moekit::cpu::GemmDtype::kInt8}};

void encoder_forward(benchmark::State& state, Shape shape, Variant variant, int threads) {
  moekit_bench::set_threads(threads);
  const moekit::cpu::BertEncoderConfig config = minilm_config();
  const moekit::cpu::BertEncoder encoder(config);
  moekit::cpu::BertEncoderStorage storage(config);
  const auto& w = storage.views();
  unsigned seed = 1;
  for (const moekit::MatrixView<float> m :
       {w.word_embeddings, w.position_embeddings, w.token_type_embeddings, w.w_qkv, w.b_qkv,
        w.w_out, w.b_out, w.w_ff1, w.b_ff1, w.w_ff2, w.b_ff2, w.ln1_beta, w.ln2_beta}) {
    const std::vector<float> v =
        moekit_bench::random_vector(static_cast<std::size_t>(m.size()), 0.05f, seed++);
    std::copy(v.begin(), v.end(), m.data());
  }
  for (const moekit::MatrixView<float> m : {w.ln1_gamma, w.ln2_gamma}) {
    std::fill(m.data(), m.data() + m.size(), 1.0f);
  }
  std::fill(w.embedding_gamma.begin(), w.embedding_gamma.end(), 1.0f);

  std::vector<std::int32_t> ids(static_cast<std::size_t>(shape.tokens()));
  for (std::size_t i = 0; i < ids.size(); ++i)
    ids[i] = static_cast<std::int32_t>((i * 7919) % 30522);
  std::vector<index_t> offsets;
  for (index_t s = 0; s <= shape.sequences; ++s) offsets.push_back(s * shape.length);
  std::vector<float> hidden(static_cast<std::size_t>(shape.tokens() * config.d_model));
  std::vector<std::byte> ws(
      static_cast<std::size_t>(encoder.workspace_size(shape.tokens(), shape.length)));
  const moekit::cpu::PackedBertWeights packed =
      variant.packed ? encoder.pack(storage.weights(), variant.dtype)
                     : moekit::cpu::PackedBertWeights{};
  for (auto _ : state) {
    const moekit::VectorView<const index_t> offs(offsets.data(), shape.sequences + 1);
    const moekit::MatrixView<float> h(hidden.data(), shape.tokens(), config.d_model);
    const moekit::VectorView<std::byte> wsv(ws.data(), static_cast<index_t>(ws.size()));
    if (variant.packed) {
      encoder.forward({ids.data(), shape.tokens()}, {}, offs, storage.weights(), packed, h, wsv);
    } else {
      encoder.forward({ids.data(), shape.tokens()}, {}, offs, storage.weights(), h, wsv);
    }
    benchmark::DoNotOptimize(hidden.data());
    benchmark::ClobberMemory();
  }
  moekit_bench::set_rate(state, shape.flops());
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(shape.tokens()),
                                                  benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(moekit::cpu::gemm_kernel_name(variant.dtype));
}

std::string run_name(const std::string& what, const char* config, int threads) {
  return what + "/" + config + "/threads:" + std::to_string(threads);
}

}  // namespace

// --cpu_time: times in the process's CPU time (see bench/summary.hpp).
int main(int argc, char** argv) {
  const bool cpu_time = moekit_bench::take_flag(argc, argv, "--cpu_time");
  const auto add = [cpu_time](const std::string& name, auto f) {
    moekit_bench::add_ms(name, f, cpu_time);
  };
  // 2 threads first (see bench/routing.cpp: libgomp after 1-thread runs).
  const int thread_counts[] = {2, 1};
  for (int threads : thread_counts) {
    add(run_name("sgemm_ceiling", "n1024", threads),
        [threads](benchmark::State& s) { moekit_bench::sgemm(s, 1024, 1024, 1024, threads); });
    for (const Shape& shape : {kThroughput, kLatency}) {
      for (const Variant& v : kVariants) {
        add(run_name(std::string("encoder_") + v.name, shape.name, threads),
            [shape, v, threads](benchmark::State& s) { encoder_forward(s, shape, v, threads); });
      }
    }
  }
  benchmark::AddCustomContext("gemm", std::string("moekit's GEMM engine, isa ") +
                                          moekit::cpu::isa_name(moekit::cpu::active_isa()));
  benchmark::Initialize(&argc, argv);
  moekit_bench::RecordingReporter reporter(cpu_time);
  benchmark::RunSpecifiedBenchmarks(&reporter);

  std::printf("\n%-9s %-11s %3s %10s %10s %10s %9s %8s\n", "shape", "dtype", "thr", "SGEMM",
              "encoder", "tokens/s", "ms/batch", "of SGEMM");
  std::printf("%-9s %-11s %3s %10s %10s %10s %9s %8s\n", "", "", "", "GF/s", "GF/s", "", "", "");
  for (int threads : thread_counts) {
    const double sgemm = reporter.seconds(run_name("sgemm_ceiling", "n1024", threads));
    for (const Shape& shape : {kThroughput, kLatency}) {
      for (const Variant& v : kVariants) {
        const double t =
            reporter.seconds(run_name(std::string("encoder_") + v.name, shape.name, threads));
        if (t <= 0) continue;  // filtered out
        const double gf = shape.flops() * 1e-9 / t;
        const double ceiling = sgemm > 0 ? 2.0 * 1024 * 1024 * 1024 * 1e-9 / sgemm : 0.0;
        std::printf("%-9s %-11s %3d %10.1f %10.1f %10.0f %9.2f %7.0f%%\n", shape.name, v.name,
                    threads, ceiling, gf, static_cast<double>(shape.tokens()) / t, t * 1e3,
                    ceiling > 0 ? 100.0 * gf / ceiling : 0.0);
      }
    }
  }
  std::printf(
      "B32_L128: 32 sentences of 128 tokens (throughput); B1_L32: one sentence of 32 tokens "
      "(latency); dtype: the projections' (fp32 from the views, or packed). Times: %s. GF/s "
      "counts the products' FLOPs; of SGEMM = encoder rate / the same run's 1024^3 SGEMM rate "
      "(Eigen). Compare with: bench/torch_encoder.py --threads N --dtype fp32 bf16 int8\n",
      cpu_time ? "CPU time of the process" : "wall clock");
  return 0;
}
