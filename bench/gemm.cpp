// The CPU GEMM engine (moekit/cpu/gemm/) beside the same run's ceilings:
//   fma_peak/<path>     register-only FMA loops: the fp32 peak of each vector
//                       path this machine has (AVX2, AVX-512)
//   amx_peak/<dtype>    a TDPBF16PS / TDPBSSD loop on resident tiles (AMX only)
//   sgemm/<who>         a large SGEMM (2048^3): OpenBLAS, the engine
//   experts_fwd/<who>   the grouped expert GEMMs of a SwiGLU MoE layer at the
//                       C1 (T 2048, d 1024, d_ff 4096, E 8, K 2) and C2 (d_ff
//                       512, E 64, K 8) per-expert shapes, rows spread evenly:
//                       a = X W1^T, g = X W3^T, y = h W2^T
//   experts_bwd/<who>   their backward: dW2 = dy^T h, dh = dy W2, dW1 = da^T X,
//                       dW3 = dg^T X, dx = da W1 + dg W3
// with <who> = engine (one grouped call per step) or openblas (cblas_sgemm per
// expert, OpenBLAS's own threads); experts_fwd also in bf16 and int8 on packed
// weights (the engine's inference form), at 2 and 1 threads. The closing table
// gives the ratios the engine issue sets goals on.
//
// Run: <build>/bench/bench_gemm [--cpu_time] [--benchmark_repetitions=3]
// (--cpu_time: rates per CPU second of the whole process, for shared machines.)
#include <benchmark/benchmark.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "inputs.hpp"
#include "moekit/cpu/gemm/gemm.hpp"
#include "moekit/cpu/gemm/tiles.hpp"
#include "moekit/cpu/parallel.hpp"
#include "summary.hpp"

#if defined(MOEKIT_BENCH_OPENBLAS)
#include <cblas.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using moekit::index_t;
using moekit::MatrixView;
using moekit::VectorView;
using moekit::cpu::GemmDtype;
using moekit::cpu::GemmOperands;
using moekit::cpu::GemmSpec;
using moekit::cpu::Op;
using moekit::cpu::PackedMatrix;

void set_threads(int threads) {
#if defined(_OPENMP)
  omp_set_num_threads(threads);
#endif
#if defined(MOEKIT_BENCH_OPENBLAS)
  openblas_set_num_threads(threads);
#endif
}

void set_rate(benchmark::State& state, double flops) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// ---- ceilings ------------------------------------------------------------------------

// Independent FMAs on registers only, `iters` x lanes x 2 FLOPs each x 24
// accumulators per thread (enough to cover the FMA latency on both paths).
#if MOEKIT_DETAIL_X86
MOEKIT_TARGET_AVX2 MOEKIT_NOINLINE float fma_loop_avx2(long iters) {
  __m256 acc[12];
  for (__m256& a : acc) a = _mm256_setzero_ps();
  __m256 x = _mm256_set1_ps(1.0001f);
  const __m256 y = _mm256_set1_ps(0.9999f);
  for (long i = 0; i < iters; ++i) {
    for (__m256& a : acc) a = _mm256_fmadd_ps(x, y, a);
    __asm__("" : "+x"(x));
  }
  float s = 0.0f;
  for (__m256& a : acc) s += _mm256_cvtss_f32(a);
  return s;
}
MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_BEGIN
MOEKIT_TARGET_AVX512 MOEKIT_NOINLINE float fma_loop_avx512(long iters) {
  __m512 acc[24];
  for (__m512& a : acc) a = _mm512_setzero_ps();
  __m512 x = _mm512_set1_ps(1.0001f);
  const __m512 y = _mm512_set1_ps(0.9999f);
  for (long i = 0; i < iters; ++i) {
    for (__m512& a : acc) a = _mm512_fmadd_ps(x, y, a);
    __asm__("" : "+v"(x));
  }
  float s = 0.0f;
  for (__m512& a : acc) s += _mm512_reduce_add_ps(a);
  return s;
}
MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_END
#endif

constexpr long kFmaIters = 1 << 22;
constexpr double fma_flops(bool avx512, int threads) {
  return 2.0 * (avx512 ? 16 * 24 : 8 * 12) * double(kFmaIters) * threads;
}

void fma_peak(benchmark::State& state, bool avx512, int threads) {
  set_threads(threads);
  constexpr long kIters = kFmaIters;
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    {
#if MOEKIT_DETAIL_X86
      benchmark::DoNotOptimize(avx512 ? fma_loop_avx512(kIters) : fma_loop_avx2(kIters));
#endif
    }
  }
  set_rate(state, fma_flops(avx512, threads));
}

// One AMX instruction: 16 x 16 outputs of 32 (bf16) or 64 (int8) products.
constexpr long kAmxIters = 1 << 18;
constexpr double amx_flops(bool int8, int threads) {
  return 4.0 * 16 * 16 * (int8 ? 64 : 32) * 2 * double(kAmxIters) * threads;
}

#if MOEKIT_HAS_HARDWARE_TILES
// Four dot products per step on tiles loaded once (C0-C3 += A4/A5 x B6/B7).
MOEKIT_TARGET_AMX MOEKIT_NOINLINE void amx_loop(long iters, bool int8) {
  alignas(64) static thread_local std::byte data[1024] = {};
  moekit::cpu::HardwareTiles t;
  moekit::cpu::TileConfig config;
  config.palette_id = 1;
  for (int i = 0; i < 8; ++i) config.rows[i] = 16, config.colsb[i] = 64;
  t.configure(config);
  t.zero<0>();
  t.zero<1>();
  t.zero<2>();
  t.zero<3>();
  t.load<4>(data, 64);
  t.load<5>(data, 64);
  t.load<6>(data, 64);
  t.load<7>(data, 64);
  for (long i = 0; i < iters; ++i) {
    if (int8) {
      t.dpbssd<0, 4, 6>();
      t.dpbssd<1, 4, 7>();
      t.dpbssd<2, 5, 6>();
      t.dpbssd<3, 5, 7>();
    } else {
      t.dpbf16ps<0, 4, 6>();
      t.dpbf16ps<1, 4, 7>();
      t.dpbf16ps<2, 5, 6>();
      t.dpbf16ps<3, 5, 7>();
    }
  }
  t.store<0>(data, 64);
  t.release();
}

void amx_peak(benchmark::State& state, bool int8, int threads) {
  set_threads(threads);
  constexpr long kIters = kAmxIters;
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    amx_loop(kIters, int8);
  }
  set_rate(state, amx_flops(int8, threads));
}
#endif

// ---- large SGEMM ------------------------------------------------------------------------

void sgemm(benchmark::State& state, bool engine, int threads) {
  set_threads(threads);
  const index_t n = 2048;
  const std::vector<float> a = moekit_bench::random_vector(std::size_t(n * n), 1.0f, 1);
  const std::vector<float> b = moekit_bench::random_vector(std::size_t(n * n), 1.0f, 2);
  std::vector<float> c(std::size_t(n * n));
  std::vector<std::byte> ws(std::size_t(moekit::cpu::gemm_workspace_size(threads)));
  for (auto _ : state) {
    if (engine) {
      moekit::cpu::gemm({}, {a.data(), n, n}, {b.data(), n, n}, {c.data(), n, n},
                        {ws.data(), index_t(ws.size())});
    } else {
#if defined(MOEKIT_BENCH_OPENBLAS)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(n), int(n), int(n), 1.0f, a.data(),
                  int(n), b.data(), int(n), 0.0f, c.data(), int(n));
#endif
    }
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  set_rate(state, 2.0 * double(n) * double(n) * double(n));
}

// ---- grouped expert GEMMs -------------------------------------------------------------------

struct Shape {
  const char* name;
  index_t tokens, d, f;
  int experts, top_k;
  index_t rows() const { return tokens * top_k; }
  index_t rows_per_expert() const { return rows() / experts; }
  double forward_flops() const { return 6.0 * double(rows()) * double(d) * double(f); }
};

// One layer's expert matrices (SwiGLU, rows spread evenly over the experts).
struct Experts {
  Shape s;
  std::vector<float> x, w1, w3, w2, a, g, y, dy, dx, dh, dg, dw1, dw3, dw2;
  explicit Experts(const Shape& shape) : s(shape) {
    const auto n = std::size_t(s.rows()), d = std::size_t(s.d), f = std::size_t(s.f),
               e = std::size_t(s.experts);
    x = moekit_bench::random_vector(n * d, 1.0f, 1);
    dy = moekit_bench::random_vector(n * d, 1.0f, 2);
    w1 = moekit_bench::random_vector(e * f * d, 0.02f, 3);
    w3 = moekit_bench::random_vector(e * f * d, 0.02f, 4);
    w2 = moekit_bench::random_vector(e * d * f, 0.02f, 5);
    a.resize(n * f);
    g.resize(n * f);
    dh.resize(n * f);
    dg.resize(n * f);
    y.resize(n * d);
    dx.resize(n * d);
  }
  void allocate_grads() {
    dw1.resize(w1.size());
    dw3.resize(w3.size());
    dw2.resize(w2.size());
  }
  index_t r0(index_t e) const { return e * s.rows_per_expert(); }
  MatrixView<float> rows_of(std::vector<float>& v, index_t e, index_t cols) {
    return {v.data() + r0(e) * cols, s.rows_per_expert(), cols};
  }
  MatrixView<float> block(std::vector<float>& v, index_t e, index_t rows, index_t cols) {
    return {v.data() + e * rows * cols, rows, cols};
  }
};

void engine_forward(Experts& m, const GemmSpec& spec, const PackedMatrix* p1,
                    const PackedMatrix* p3, const PackedMatrix* p2, VectorView<std::byte> ws) {
  const index_t d = m.s.d, f = m.s.f;
  moekit::cpu::gemm_grouped(
      spec, 2 * index_t{m.s.experts},
      [&](index_t group) {
        const index_t e = group / 2;
        const bool third = group % 2 == 1;
        const PackedMatrix* p = third ? p3 : p1;
        return GemmOperands{
            m.rows_of(m.x, e, d),
            p != nullptr ? MatrixView<const float>() : m.block(third ? m.w3 : m.w1, e, f, d), p, e,
            m.rows_of(third ? m.g : m.a, e, f)};
      },
      ws);
  moekit::cpu::gemm_grouped(
      spec, m.s.experts,
      [&](index_t e) {
        return GemmOperands{m.rows_of(m.a, e, f),
                            p2 != nullptr ? MatrixView<const float>() : m.block(m.w2, e, d, f), p2,
                            e, m.rows_of(m.y, e, d)};
      },
      ws);
}

void engine_backward(Experts& m, VectorView<std::byte> ws) {
  const index_t d = m.s.d, f = m.s.f;
  const GemmSpec dw{.op_a = Op::kTrans, .op_b = Op::kNone};
  const GemmSpec nn{.op_a = Op::kNone, .op_b = Op::kNone};
  moekit::cpu::gemm_grouped(
      dw, m.s.experts,
      [&](index_t e) {
        return GemmOperands{m.rows_of(m.dy, e, d), m.rows_of(m.a, e, f), nullptr, 0,
                            m.block(m.dw2, e, d, f)};
      },
      ws);
  moekit::cpu::gemm_grouped(
      nn, m.s.experts,
      [&](index_t e) {
        return GemmOperands{m.rows_of(m.dy, e, d), m.block(m.w2, e, d, f), nullptr, 0,
                            m.rows_of(m.dh, e, f)};
      },
      ws);
  moekit::cpu::gemm_grouped(
      dw, 2 * index_t{m.s.experts},
      [&](index_t group) {
        const index_t e = group / 2;
        const bool third = group % 2 == 1;
        return GemmOperands{m.rows_of(third ? m.dg : m.dh, e, f), m.rows_of(m.x, e, d), nullptr, 0,
                            m.block(third ? m.dw3 : m.dw1, e, f, d)};
      },
      ws);
  for (int part = 0; part < 2; ++part) {
    moekit::cpu::gemm_grouped(
        {.op_a = Op::kNone, .op_b = Op::kNone, .beta = part == 0 ? 0.0f : 1.0f}, m.s.experts,
        [&](index_t e) {
          return GemmOperands{m.rows_of(part == 0 ? m.dh : m.dg, e, f),
                              m.block(part == 0 ? m.w1 : m.w3, e, f, d), nullptr, 0,
                              m.rows_of(m.dx, e, d)};
        },
        ws);
  }
}

#if defined(MOEKIT_BENCH_OPENBLAS)
// C = op(A) op(B) (+ C) with cblas_sgemm, row-major.
void blas(MatrixView<float> c, MatrixView<float> a, bool ta, MatrixView<float> b, bool tb,
          float beta = 0.0f) {
  const int k = int(ta ? a.rows() : a.cols());
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              int(c.rows()), int(c.cols()), k, 1.0f, a.data(), int(a.ld()), b.data(), int(b.ld()),
              beta, c.data(), int(c.ld()));
}

void openblas_forward(Experts& m) {
  const index_t d = m.s.d, f = m.s.f;
  for (index_t e = 0; e < m.s.experts; ++e) {
    blas(m.rows_of(m.a, e, f), m.rows_of(m.x, e, d), false, m.block(m.w1, e, f, d), true);
    blas(m.rows_of(m.g, e, f), m.rows_of(m.x, e, d), false, m.block(m.w3, e, f, d), true);
    blas(m.rows_of(m.y, e, d), m.rows_of(m.a, e, f), false, m.block(m.w2, e, d, f), true);
  }
}

void openblas_backward(Experts& m) {
  const index_t d = m.s.d, f = m.s.f;
  for (index_t e = 0; e < m.s.experts; ++e) {
    blas(m.block(m.dw2, e, d, f), m.rows_of(m.dy, e, d), true, m.rows_of(m.a, e, f), false);
    blas(m.rows_of(m.dh, e, f), m.rows_of(m.dy, e, d), false, m.block(m.w2, e, d, f), false);
    blas(m.block(m.dw1, e, f, d), m.rows_of(m.dh, e, f), true, m.rows_of(m.x, e, d), false);
    blas(m.block(m.dw3, e, f, d), m.rows_of(m.dg, e, f), true, m.rows_of(m.x, e, d), false);
    blas(m.rows_of(m.dx, e, d), m.rows_of(m.dh, e, f), false, m.block(m.w1, e, f, d), false);
    blas(m.rows_of(m.dx, e, d), m.rows_of(m.dg, e, f), false, m.block(m.w3, e, f, d), false, 1.0f);
  }
}
#endif

enum class Who { kEngine, kOpenBlas };

void experts_forward(benchmark::State& state, const Shape& s, Who who, GemmDtype dtype,
                     int threads) {
  set_threads(threads);
  Experts m(s);
  std::vector<std::byte> ws(std::size_t(moekit::cpu::gemm_workspace_size(threads)));
  const VectorView<std::byte> wv(ws.data(), index_t(ws.size()));
  // bf16 and int8 run on weights packed once (inference); fp32 packs per call (training).
  PackedMatrix p1, p3, p2;
  if (dtype != GemmDtype::kFloat32) {
    const index_t e = s.experts;
    p1 = PackedMatrix(dtype, Op::kTrans, {m.w1.data(), e * s.f, s.d}, e);
    p3 = PackedMatrix(dtype, Op::kTrans, {m.w3.data(), e * s.f, s.d}, e);
    p2 = PackedMatrix(dtype, Op::kTrans, {m.w2.data(), e * s.d, s.f}, e);
  }
  const bool packed = dtype != GemmDtype::kFloat32;
  const GemmSpec spec{.dtype = dtype, .op_a = Op::kNone, .op_b = Op::kTrans};
  for (auto _ : state) {
    if (who == Who::kEngine) {
      engine_forward(m, spec, packed ? &p1 : nullptr, packed ? &p3 : nullptr,
                     packed ? &p2 : nullptr, wv);
    } else {
#if defined(MOEKIT_BENCH_OPENBLAS)
      openblas_forward(m);
#endif
    }
    benchmark::DoNotOptimize(m.y.data());
    benchmark::ClobberMemory();
  }
  set_rate(state, s.forward_flops());
  state.SetLabel(who == Who::kEngine ? moekit::cpu::gemm_kernel_name(dtype) : "openblas");
}

void experts_backward(benchmark::State& state, const Shape& s, Who who, int threads) {
  set_threads(threads);
  Experts m(s);
  m.allocate_grads();
  std::vector<std::byte> ws(std::size_t(moekit::cpu::gemm_workspace_size(threads)));
  const VectorView<std::byte> wv(ws.data(), index_t(ws.size()));
  for (auto _ : state) {
    if (who == Who::kEngine) {
      engine_backward(m, wv);
    } else {
#if defined(MOEKIT_BENCH_OPENBLAS)
      openblas_backward(m);
#endif
    }
    benchmark::DoNotOptimize(m.dx.data());
    benchmark::ClobberMemory();
  }
  set_rate(state, 2.0 * s.forward_flops());
}

std::string run_name(const std::string& what, const std::string& who, int threads) {
  return what + "/" + who + "/threads:" + std::to_string(threads);
}

// Rates from wall-clock time, or (--cpu_time) from the process's CPU time:
// work per CPU second, which a machine shared with other jobs distorts less.
bool g_cpu_time = false;

void add(const std::string& name, std::function<void(benchmark::State&)> f) {
  moekit_bench::add_ms(name, std::move(f), g_cpu_time);
}

}  // namespace

int main(int argc, char** argv) {
  g_cpu_time = moekit_bench::take_flag(argc, argv, "--cpu_time");
  const Shape shapes[] = {{"C1", 2048, 1024, 4096, 8, 2}, {"C2", 2048, 1024, 512, 64, 8}};
  const auto& features = moekit::cpu::cpu_features();
#if defined(MOEKIT_BENCH_OPENBLAS)
  const bool openblas = true;
#else
  const bool openblas = false;
#endif
  // 2 threads first (see bench/routing.cpp: libgomp after 1-thread runs).
  const int thread_counts[] = {2, 1};
  for (int t : thread_counts) {
    if (features.avx2)
      add(run_name("fma_peak", "avx2", t), [t](benchmark::State& s) { fma_peak(s, false, t); });
    if (features.avx512)
      add(run_name("fma_peak", "avx512", t), [t](benchmark::State& s) { fma_peak(s, true, t); });
#if MOEKIT_HAS_HARDWARE_TILES
    if (features.amx) {
      add(run_name("amx_peak", "bf16", t), [t](benchmark::State& s) { amx_peak(s, false, t); });
      add(run_name("amx_peak", "int8", t), [t](benchmark::State& s) { amx_peak(s, true, t); });
    }
#endif
    if (openblas)
      add(run_name("sgemm", "openblas", t), [t](benchmark::State& s) { sgemm(s, false, t); });
    add(run_name("sgemm", "engine", t), [t](benchmark::State& s) { sgemm(s, true, t); });
    for (const Shape& sh : shapes) {
      const std::string fwd = std::string("experts_fwd_") + sh.name;
      const std::string bwd = std::string("experts_bwd_") + sh.name;
      if (openblas) {
        add(run_name(fwd, "openblas", t), [sh, t](benchmark::State& s) {
          experts_forward(s, sh, Who::kOpenBlas, GemmDtype::kFloat32, t);
        });
        add(run_name(bwd, "openblas", t),
            [sh, t](benchmark::State& s) { experts_backward(s, sh, Who::kOpenBlas, t); });
      }
      add(run_name(fwd, "engine", t), [sh, t](benchmark::State& s) {
        experts_forward(s, sh, Who::kEngine, GemmDtype::kFloat32, t);
      });
      add(run_name(bwd, "engine", t),
          [sh, t](benchmark::State& s) { experts_backward(s, sh, Who::kEngine, t); });
      add(run_name(fwd, "engine_bf16", t), [sh, t](benchmark::State& s) {
        experts_forward(s, sh, Who::kEngine, GemmDtype::kBfloat16, t);
      });
      add(run_name(fwd, "engine_int8", t), [sh, t](benchmark::State& s) {
        experts_forward(s, sh, Who::kEngine, GemmDtype::kInt8, t);
      });
    }
  }
  benchmark::AddCustomContext("fp32 kernel", moekit::cpu::gemm_kernel_name(GemmDtype::kFloat32));
  benchmark::AddCustomContext("bf16 kernel", moekit::cpu::gemm_kernel_name(GemmDtype::kBfloat16));
  benchmark::AddCustomContext("int8 kernel", moekit::cpu::gemm_kernel_name(GemmDtype::kInt8));
  benchmark::Initialize(&argc, argv);
  moekit_bench::RecordingReporter reporter(g_cpu_time);
  benchmark::RunSpecifiedBenchmarks(&reporter);

  // Rates from seconds; ratios of runs of this invocation.
  const auto rate = [&](const std::string& name, double flops) {
    const double s = reporter.seconds(name);
    return s > 0 ? flops * 1e-9 / s : 0.0;
  };
  const auto ratio = [](double a, double b) { return a > 0 && b > 0 ? a / b : 0.0; };
  const double sgemm_flops = 2.0 * 2048.0 * 2048.0 * 2048.0;
  std::printf("\nGFLOP/s (int8: GOP/s) per %s; ratios within this run; 0 = not run here\n",
              g_cpu_time ? "CPU second of the process" : "second of wall-clock time");
  std::printf("%-4s %3s %9s %9s %9s %9s %6s %9s %9s %6s %9s %9s %6s %8s %8s\n", "cfg", "thr",
              "fma_peak", "amx_bf16", "sgemm_ob", "sgemm_en", "en/ob", "fwd_ob", "fwd_en", "en/ob",
              "bwd_ob", "bwd_en", "en/ob", "fwd_bf16", "fwd_int8");
  for (int t : thread_counts) {
    const double fma = features.avx512 ? rate(run_name("fma_peak", "avx512", t), fma_flops(true, t))
                                       : rate(run_name("fma_peak", "avx2", t), fma_flops(false, t));
    const double amx = rate(run_name("amx_peak", "bf16", t), amx_flops(false, t));
    const double sg_ob = rate(run_name("sgemm", "openblas", t), sgemm_flops);
    const double sg_en = rate(run_name("sgemm", "engine", t), sgemm_flops);
    for (const Shape& sh : shapes) {
      const std::string fwd = std::string("experts_fwd_") + sh.name;
      const std::string bwd = std::string("experts_bwd_") + sh.name;
      const double f_ob = rate(run_name(fwd, "openblas", t), sh.forward_flops());
      const double f_en = rate(run_name(fwd, "engine", t), sh.forward_flops());
      const double b_ob = rate(run_name(bwd, "openblas", t), 2.0 * sh.forward_flops());
      const double b_en = rate(run_name(bwd, "engine", t), 2.0 * sh.forward_flops());
      std::printf(
          "%-4s %3d %9.1f %9.1f %9.1f %9.1f %6.2f %9.1f %9.1f %6.2f %9.1f %9.1f %6.2f %8.1f "
          "%8.1f\n",
          sh.name, t, fma, amx, sg_ob, sg_en, ratio(sg_en, sg_ob), f_ob, f_en, ratio(f_en, f_ob),
          b_ob, b_en, ratio(b_en, b_ob), rate(run_name(fwd, "engine_bf16", t), sh.forward_flops()),
          rate(run_name(fwd, "engine_int8", t), sh.forward_flops()));
    }
    std::printf(
        "     %3d engine sgemm / fma peak %.2f; bf16 experts / AMX peak %.2f\n", t,
        ratio(sg_en, fma),
        ratio(rate(run_name("experts_fwd_C1", "engine_bf16", t), shapes[0].forward_flops()), amx));
  }
  std::printf("kernels: fp32 %s, bf16 %s, int8 %s\n",
              moekit::cpu::gemm_kernel_name(GemmDtype::kFloat32),
              moekit::cpu::gemm_kernel_name(GemmDtype::kBfloat16),
              moekit::cpu::gemm_kernel_name(GemmDtype::kInt8));
  return 0;
}
