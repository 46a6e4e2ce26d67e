// moekit's GEMM engine (moekit/cpu/gemm/): every path and dtype on odd
// sizes, strides, both transposes, several alpha / beta, K past the
// reduction passes and items past one block, against
//   - the exact scalar model of the path's arithmetic (gemm_reference.hpp),
//     bit for bit: fp32 and bf16 on FMA paths are one fused chain over k,
//     AMX bf16 the tile semantics, int8 exact int32 sums;
//   - a float64 product, to a tolerance per dtype.
// Then batch invariance (a row alone and in random batches, 1 and 2
// threads), grouped products, the workspace and thread rules, no
// allocation, bad input, PackedMatrix, the AMX tile emulator and the vector
// conversions of moekit/cpu/vec.hpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "allocation_counter.hpp"
#include "expect_error.hpp"
#include "gemm_reference.hpp"
#include "moekit/cpu/gemm/gemm.hpp"
#include "moekit/cpu/gemm/tiles.hpp"
#include "routing_reference.hpp"
#include "strided_matrix.hpp"

// The conversion test's kernel, once per path.
MOEKIT_NAMESPACE_BEGIN
namespace cpu::generic {
#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_GENERIC
#include "vec_conversions-inl.hpp"
#undef MOEKIT_KERNEL_TARGET
}  // namespace cpu::generic
#if MOEKIT_DETAIL_X86
namespace cpu::avx2 {
#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_AVX2
#include "vec_conversions-inl.hpp"
#undef MOEKIT_KERNEL_TARGET
}  // namespace cpu::avx2
MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_BEGIN
namespace cpu::avx512 {
#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_AVX512
#include "vec_conversions-inl.hpp"
#undef MOEKIT_KERNEL_TARGET
}  // namespace cpu::avx512
MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_END
#endif
MOEKIT_NAMESPACE_END

namespace {

using moekit::Errc;
using moekit::index_t;
using moekit::MatrixView;
using moekit::VectorView;
using moekit::cpu::GemmDtype;
using moekit::cpu::GemmOperands;
using moekit::cpu::GemmSpec;
using moekit::cpu::Isa;
using moekit::cpu::Op;
using moekit::cpu::PackedMatrix;
using moekit_test::expect_error;
using moekit_test::float_bits;
using moekit_test::GemmPathCase;
using moekit_test::Model;
using moekit_test::Operands;
using moekit_test::rel_error;
using moekit_test::ThreadCount;
using Mat = moekit_test::StridedMatrix;

std::vector<std::byte> workspace_for(int threads) {
  return std::vector<std::byte>(
      static_cast<std::size_t>(moekit::cpu::gemm_workspace_size(threads)));
}
VectorView<std::byte> view(std::vector<std::byte>& w) {
  return {w.data(), static_cast<index_t>(w.size())};
}

// A problem: op(A) M x K, op(B) K x N (stored with padding), C M x N.
struct Problem {
  Op op_a, op_b;
  Mat a, b, c_old;
  Problem(index_t m, index_t n, index_t k, Op oa, Op ob, std::uint32_t seed)
      : op_a(oa),
        op_b(ob),
        a(oa == Op::kNone ? m : k, oa == Op::kNone ? k : m, 3),
        b(ob == Op::kNone ? k : n, ob == Op::kNone ? n : k, 2),
        c_old(m, n, 1) {
    std::mt19937 rng(seed);
    a.randomize(rng);
    b.randomize(rng, 0.5f);
    c_old.randomize(rng);
  }
  Operands operands() const { return {&a, op_a, &b, op_b}; }
};

// Runs C = alpha op(A) op(B) + beta C on the current path: B from the view
// (fp32, bf16) or packed (every dtype), C poisoned first when beta = 0.
Mat run(const Problem& p, GemmDtype dtype, bool packed, float alpha, float beta, int threads = 2) {
  Mat c = p.c_old;
  if (beta == 0.0f) c.poison();
  auto ws = workspace_for(threads);
  const GemmSpec spec{dtype, p.op_a, p.op_b, alpha, beta};
  if (packed) {
    const PackedMatrix pb(dtype, p.op_b, p.b.cview());
    moekit::cpu::gemm(spec, p.a.cview(), pb, 0, c.view(), view(ws));
  } else {
    moekit::cpu::gemm(spec, p.a.cview(), p.b.cview(), c.view(), view(ws));
  }
  return c;
}

struct Shape {
  index_t m, n, k;
};

// Odd sizes; K past the fp32 pass (256), the AMX bf16 pass (512) and the
// int8 pass (1024); M past a packed A block (192) and N past an item (512).
// (Unoptimised sanitizer builds leave out the largest.)
const std::vector<Shape> kShapes = {{1, 1, 1},     {5, 3, 7},     {13, 33, 63}, {70, 17, 300},
                                    {7, 530, 33},  {3, 19, 1030}, {6, 16, 0},
#if defined(NDEBUG)
                                    {200, 40, 513}
#endif
};

double tolerance(GemmDtype dtype) {
  return dtype == GemmDtype::kFloat32 ? 2e-6 : dtype == GemmDtype::kBfloat16 ? 2e-2 : 4e-2;
}

// Sums (before the output rule) of one problem: the exact model of each path
// kind, and float64.
struct Sums {
  std::vector<float> fma, bf16, amx, int8;  // M x N, those the dtype needs
  std::vector<double> exact;
};

Sums sums_of(const Operands& p, GemmDtype dtype) {
  Sums s;
  std::unique_ptr<moekit_test::Int8Model> q;
  if (dtype == GemmDtype::kInt8) q = std::make_unique<moekit_test::Int8Model>(p);
  for (index_t i = 0; i < p.m(); ++i) {
    for (index_t j = 0; j < p.n(); ++j) {
      if (dtype == GemmDtype::kFloat32) s.fma.push_back(moekit_test::fma_chain(p, i, j, false));
      if (dtype == GemmDtype::kBfloat16) {
        s.bf16.push_back(moekit_test::fma_chain(p, i, j, true));
        s.amx.push_back(moekit_test::amx_bf16_chain(p, i, j));
      }
      if (dtype == GemmDtype::kInt8) s.int8.push_back(q->value(i, j));
      double e = 0;
      for (index_t k = 0; k < p.k(); ++k) e += double(p.av(i, k)) * p.bv(k, j);
      s.exact.push_back(e);
    }
  }
  return s;
}

const std::vector<float>& model_sums(const Sums& s, Model model) {
  return model == Model::kFmaChain    ? s.fma
         : model == Model::kBf16Chain ? s.bf16
         : model == Model::kAmxBf16   ? s.amx
                                      : s.int8;
}

// Every path on every shape and transpose pair, alpha / beta and B from a
// view or packed taking turns: bit for bit against the path's model (real
// AMX bf16: reported, see gemm/tiles.hpp), and against float64.
void check_every_path(GemmDtype dtype) {
  const std::pair<float, float> scalars[] = {
      {1.0f, 0.0f}, {-0.75f, 0.0f}, {1.0f, 1.0f}, {0.5f, -1.25f}};
  const std::vector<GemmPathCase> paths = moekit_test::gemm_path_cases(dtype);
  std::vector<double> worst(paths.size(), 0.0);
  int turn = 0;
  for (const Shape& s : kShapes) {
    for (Op oa : {Op::kNone, Op::kTrans}) {
      for (Op ob : {Op::kNone, Op::kTrans}) {
        const Problem p(s.m, s.n, s.k, oa, ob, static_cast<std::uint32_t>(s.m * 131 + s.k));
        const Sums sums = sums_of(p.operands(), dtype);
        const float alpha = scalars[turn % 4].first, beta = scalars[turn % 4].second;
        const bool packed = dtype == GemmDtype::kInt8 || turn % 2 == 1;
        ++turn;
        std::vector<double> exact;
        for (index_t i = 0; i < s.m; ++i)
          for (index_t j = 0; j < s.n; ++j)
            exact.push_back(alpha * sums.exact[static_cast<std::size_t>(i * s.n + j)] +
                            (beta == 0.0f ? 0.0 : double(beta) * p.c_old.at(i, j)));
        for (std::size_t c = 0; c < paths.size(); ++c) {
          const GemmPathCase& path = paths[c];
          SCOPED_TRACE(::testing::Message()
                       << path.name << " M " << s.m << " N " << s.n << " K " << s.k << " op_a "
                       << int(oa) << " op_b " << int(ob) << " alpha " << alpha << " beta " << beta
                       << " packed " << packed);
          Mat out;
          moekit_test::with_path(path, dtype, [&] { out = run(p, dtype, packed, alpha, beta); });
          ASSERT_TRUE(out.padding_untouched());
          const Model model = moekit_test::model_of(path, dtype);
          const std::vector<float>& want = model_sums(sums, model);
          index_t differing = 0;
          for (index_t i = 0; i < s.m; ++i)
            for (index_t j = 0; j < s.n; ++j)
              differing +=
                  float_bits(out.at(i, j)) !=
                  float_bits(moekit_test::output(want[static_cast<std::size_t>(i * s.n + j)], alpha,
                                                 beta, p.c_old.at(i, j)));
          if (model == Model::kAmxBf16 && !path.emulate_amx) {
            if (differing > 0)
              std::printf("[ info ] %s: %ld of %ld elements differ from the emulator's model\n",
                          path.name.c_str(), static_cast<long>(differing),
                          static_cast<long>(s.m * s.n));
          } else {
            EXPECT_EQ(differing, 0) << "elements differing from the exact model";
          }
          const double err = rel_error(out.values(), exact);
          EXPECT_LT(err, tolerance(dtype));
          worst[c] = std::max(worst[c], err);
        }
      }
    }
  }
  for (std::size_t c = 0; c < paths.size(); ++c)
    std::printf("[gemm] %s %s (%s): worst relative error vs float64 %.2e\n",
                moekit::cpu::gemm_dtype_name(dtype), paths[c].name.c_str(),
                paths[c].forced.run != nullptr ? paths[c].forced.name : "path kernel", worst[c]);
}

TEST(Gemm, Float32EveryPathIsTheFmaChain) { check_every_path(GemmDtype::kFloat32); }
TEST(Gemm, Bfloat16EveryPathFollowsItsModel) { check_every_path(GemmDtype::kBfloat16); }
TEST(Gemm, Int8EveryPathIsExact) { check_every_path(GemmDtype::kInt8); }

// The same products on every path give the same bits (fp32, int8; bf16 on
// the FMA paths), which the models above imply; checked here directly too.
TEST(Gemm, PathsAgreeBitForBit) {
  for (GemmDtype dtype : {GemmDtype::kFloat32, GemmDtype::kBfloat16, GemmDtype::kInt8}) {
    const Problem p(97, 75, 301, Op::kNone, Op::kTrans, 5u);
    Mat first;
    std::string first_name;
    for (const GemmPathCase& path : moekit_test::gemm_path_cases(dtype)) {
      if (moekit_test::model_of(path, dtype) == Model::kAmxBf16) continue;
      Mat c;
      moekit_test::with_path(path, dtype, [&] { c = run(p, dtype, true, 1.0f, 0.0f); });
      if (first_name.empty()) {
        first = c;
        first_name = path.name;
      } else {
        EXPECT_TRUE(c.bits_equal(first)) << moekit::cpu::gemm_dtype_name(dtype) << ": " << path.name
                                         << " differs from " << first_name;
      }
    }
  }
}

// ---- batch invariance ----------------------------------------------------------------

// Each row's result alone (M = 1) against the same row inside random batches
// of 1 to 4096 rows drawn with repetition and shuffled, at 1 and 2 threads:
// the bits are compared per row.
void check_batch_invariance(GemmDtype dtype) {
#if defined(NDEBUG)
  const index_t k = dtype == GemmDtype::kInt8 ? 1100 : 300;  // past a reduction pass
  const std::vector<index_t> sizes = {1, 2, 7, 190, 777, 4096};
#else  // unoptimised (sanitizer) builds: smaller, still several items and passes
  const index_t k = 300;
  const std::vector<index_t> sizes = {1, 7, 300};
#endif
  const index_t pool = 32, n = 45;
  std::mt19937 rng(17);
  Mat x(pool, k), w(n, k);
  x.randomize(rng);
  w.randomize(rng, 0.1f);
  for (const GemmPathCase& path : moekit_test::gemm_path_cases(dtype)) {
    SCOPED_TRACE(path.name);
    moekit_test::with_path(path, dtype, [&] {
      const PackedMatrix pw(dtype, Op::kTrans, w.cview());
      const GemmSpec spec{dtype, Op::kNone, Op::kTrans};
      auto ws = workspace_for(2);
      Mat alone(pool, n);
      for (index_t r = 0; r < pool; ++r) {
        ThreadCount threads(1);
        moekit::cpu::gemm(spec, x.cview().middle_rows(r, 1), pw, 0, alone.view().middle_rows(r, 1),
                          view(ws));
      }
      for (int t : {1, 2}) {
        ThreadCount threads(t);
        for (index_t size : sizes) {
          std::uniform_int_distribution<index_t> pick(0, pool - 1);
          std::vector<index_t> rows(static_cast<std::size_t>(size));
          for (index_t& r : rows) r = pick(rng);
          Mat batch(size, k, 5), out(size, n);
          for (index_t i = 0; i < size; ++i)
            std::memcpy(&batch.at(i, 0), &x.at(rows[static_cast<std::size_t>(i)], 0),
                        sizeof(float) * static_cast<std::size_t>(k));
          out.poison();
          if (dtype == GemmDtype::kInt8) {
            moekit::cpu::gemm(spec, batch.cview(), pw, 0, out.view(), view(ws));
          } else {  // B from the view (packed per call) for the float dtypes
            moekit::cpu::gemm(spec, batch.cview(), w.cview(), out.view(), view(ws));
          }
          index_t differing = 0;
          for (index_t i = 0; i < size; ++i)
            differing += std::memcmp(&out.at(i, 0), &alone.at(rows[static_cast<std::size_t>(i)], 0),
                                     sizeof(float) * static_cast<std::size_t>(n)) != 0;
          EXPECT_EQ(differing, 0) << "rows whose bits changed in a batch of " << size << " at " << t
                                  << " threads";
        }
      }
    });
  }
}

TEST(GemmBatchInvariance, Float32) { check_batch_invariance(GemmDtype::kFloat32); }
TEST(GemmBatchInvariance, Bfloat16) { check_batch_invariance(GemmDtype::kBfloat16); }
TEST(GemmBatchInvariance, Int8) { check_batch_invariance(GemmDtype::kInt8); }

// ---- grouped products ---------------------------------------------------------------

// Expert-major groups with empty and one-row groups, each against its own
// single product, bit for bit; every dtype; weight-gradient form too
// (op(A) = A^T reduced over the group's rows).
TEST(Gemm, GroupedEqualsOneProductPerGroup) {
  const std::vector<index_t> counts = {0, 37, 1, 0, 90, 5, 0, 300};
  std::vector<index_t> offsets(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
  const index_t groups = static_cast<index_t>(counts.size()), rows = offsets.back();
  const index_t d = 40, f = 72;
  std::mt19937 rng(3);
  Mat x(rows, d), w(groups * f, d), dy(rows, f);
  x.randomize(rng);
  w.randomize(rng);
  dy.randomize(rng);
  auto ws = workspace_for(2);
  for (GemmDtype dtype : {GemmDtype::kFloat32, GemmDtype::kBfloat16, GemmDtype::kInt8}) {
    SCOPED_TRACE(moekit::cpu::gemm_dtype_name(dtype));
    const PackedMatrix pw(dtype, Op::kTrans, w.cview(), groups);
    const GemmSpec spec{dtype, Op::kNone, Op::kTrans};
    Mat y(rows, f), one(rows, f);
    y.poison();
    one.poison();
    moekit::cpu::gemm_grouped(
        spec, groups,
        [&](index_t g) {
          const index_t r0 = offsets[static_cast<std::size_t>(g)],
                        n = counts[static_cast<std::size_t>(g)];
          return GemmOperands{
              x.cview().middle_rows(r0, n), {}, &pw, g, y.view().middle_rows(r0, n)};
        },
        view(ws));
    for (index_t g = 0; g < groups; ++g) {
      const index_t r0 = offsets[static_cast<std::size_t>(g)],
                    n = counts[static_cast<std::size_t>(g)];
      moekit::cpu::gemm(spec, x.cview().middle_rows(r0, n), pw, g, one.view().middle_rows(r0, n),
                        view(ws));
    }
    EXPECT_TRUE(y.bits_equal(one));
    EXPECT_FALSE(y.any_nan());
  }
  // dW_g = dy_g^T x_g (f x d per group), accumulated onto old values.
  Mat dw(groups * f, d), dw_one(groups * f, d);
  dw.randomize(rng);
  dw_one = dw;
  const GemmSpec spec{GemmDtype::kFloat32, Op::kTrans, Op::kNone, 1.0f, 1.0f};
  moekit::cpu::gemm_grouped(
      spec, groups,
      [&](index_t g) {
        const index_t r0 = offsets[static_cast<std::size_t>(g)],
                      n = counts[static_cast<std::size_t>(g)];
        return GemmOperands{dy.cview().middle_rows(r0, n), x.cview().middle_rows(r0, n), nullptr, 0,
                            dw.view().middle_rows(g * f, f)};
      },
      view(ws));
  for (index_t g = 0; g < groups; ++g) {
    const index_t r0 = offsets[static_cast<std::size_t>(g)],
                  n = counts[static_cast<std::size_t>(g)];
    moekit::cpu::gemm(spec, dy.cview().middle_rows(r0, n), x.cview().middle_rows(r0, n),
                      dw_one.view().middle_rows(g * f, f), view(ws));
  }
  EXPECT_TRUE(dw.bits_equal(dw_one));
  // An empty group with K = 0 and beta = 1 adds an exact zero.
  for (index_t j = 0; j < f; ++j)
    for (index_t c = 0; c < d; ++c) ASSERT_TRUE(std::isfinite(dw.at(j, c)));
}

// ---- threads and workspace ----------------------------------------------------------

TEST(Gemm, ResultsDoNotDependOnThreadsOrWorkspaceSlots) {
#if defined(NDEBUG)
  const Problem p(700, 600, 520, Op::kNone, Op::kTrans, 9u);
#else  // unoptimised (sanitizer) builds
  const Problem p(200, 100, 300, Op::kNone, Op::kTrans, 9u);
#endif
  Mat one, two, small;
  {
    ThreadCount threads(1);
    one = run(p, GemmDtype::kFloat32, false, 1.0f, 0.0f, 1);
  }
  {
    ThreadCount threads(2);
    two = run(p, GemmDtype::kFloat32, false, 1.0f, 0.0f, 2);
    small = run(p, GemmDtype::kFloat32, false, 1.0f, 0.0f, 1);  // one slot: one thread
  }
  EXPECT_TRUE(one.bits_equal(two));
  EXPECT_TRUE(one.bits_equal(small));
  Mat again = run(p, GemmDtype::kFloat32, false, 1.0f, 0.0f, 2);
  EXPECT_TRUE(again.bits_equal(two));
}

// Inside an enclosing parallel region the engine stays on the calling thread
// (each thread passes its own workspace) and gives the same bits.
TEST(Gemm, InsideAParallelRegion) {
  const Problem p(64, 48, 300, Op::kNone, Op::kNone, 11u);
  const Mat ref = run(p, GemmDtype::kFloat32, false, 1.0f, 0.0f);
  std::vector<Mat> out(4, p.c_old);
  std::vector<std::vector<std::byte>> ws(4, workspace_for(1));
#if defined(_OPENMP)
#pragma omp parallel for num_threads(2)
#endif
  for (int t = 0; t < 4; ++t) {
    moekit::cpu::gemm({}, p.a.cview(), p.b.cview(), out[static_cast<std::size_t>(t)].view(),
                      view(ws[static_cast<std::size_t>(t)]));
  }
  for (const Mat& m : out) EXPECT_TRUE(m.bits_equal(ref));
}

// ---- allocation -----------------------------------------------------------------------

TEST(Gemm, NoAllocationAtRealisticSizes) {
  if (!moekit_test::AllocationCounter::available) GTEST_SKIP() << "the sanitizer owns operator new";
  const index_t rows = 1024, d = 256, f = 512;
  std::mt19937 rng(1);
  Mat x(rows, d), w(4 * f, d), y(rows, f), dw(4 * f, d), dy(rows, f);
  x.randomize(rng);
  w.randomize(rng);
  dy.randomize(rng);
  auto ws = workspace_for(2);
  const PackedMatrix p8(GemmDtype::kInt8, Op::kTrans, w.cview(), 4);
  const index_t per = rows / 4;
  const auto experts = [&](index_t g) {
    return GemmOperands{x.cview().middle_rows(g * per, per), w.cview().middle_rows(g * f, f),
                        nullptr, 0, y.view().middle_rows(g * per, per)};
  };
  const auto grads = [&](index_t g) {
    return GemmOperands{dy.cview().middle_rows(g * per, per), x.cview().middle_rows(g * per, per),
                        nullptr, 0, dw.view().middle_rows(g * f, f)};
  };
  const auto int8 = [&](index_t g) {
    return GemmOperands{
        x.cview().middle_rows(g * per, per), {}, &p8, g, y.view().middle_rows(g * per, per)};
  };
  for (int pass = 0; pass < 2; ++pass) {  // the first pass starts the thread pool
    moekit_test::CountAllocations count;
    moekit::cpu::gemm_grouped({.op_a = Op::kNone, .op_b = Op::kTrans}, 4, experts, view(ws));
    moekit::cpu::gemm_grouped({.op_a = Op::kTrans, .op_b = Op::kNone, .beta = 1.0f}, 4, grads,
                              view(ws));
    moekit::cpu::gemm_grouped({.dtype = GemmDtype::kInt8}, 4, int8, view(ws));
    if (pass == 1) {
      EXPECT_EQ(count.allocations(), 0);
    }
  }
}

// ---- bad input --------------------------------------------------------------------------

TEST(Gemm, RejectsBadInputAndWritesNothing) {
  Mat a(4, 6), b(6, 5), c(4, 5), other(7, 5);
  std::mt19937 rng(2);
  a.randomize(rng);
  b.randomize(rng);
  c.poison();
  const Mat before = c;
  auto ws = workspace_for(1);
  const VectorView<std::byte> wv = view(ws);
  const PackedMatrix pb(GemmDtype::kBfloat16, Op::kNone, b.cview());
  std::string m;
  m = expect_error([&] { moekit::cpu::gemm({}, a.cview(), other.cview(), c.view(), wv); },
                   Errc::kShapeMismatch);
  EXPECT_NE(m.find("moekit::gemm: op(a) is 4 x 6 but op(B) is 7 x 5"), std::string::npos) << m;
  m = expect_error(
      [&] { moekit::cpu::gemm({}, a.cview(), b.cview(), other.view().middle_rows(0, 3), wv); },
      Errc::kShapeMismatch);
  EXPECT_NE(m.find("c is 3 x 5, expected 4 x 5"), std::string::npos) << m;
  m = expect_error(
      [&] {
        moekit::cpu::gemm({}, MatrixView<const float>(nullptr, 4, 6), b.cview(), c.view(), wv);
      },
      Errc::kNullPointer);
  EXPECT_NE(m.find("a is null"), std::string::npos) << m;
  m = expect_error([&] { moekit::cpu::gemm({}, a.cview(), pb, 0, c.view(), wv); },
                   Errc::kInvalidArgument);
  EXPECT_NE(m.find("packed holds bfloat16 but spec.dtype is float32"), std::string::npos) << m;
  m = expect_error(
      [&] { moekit::cpu::gemm({.dtype = GemmDtype::kBfloat16}, a.cview(), pb, 1, c.view(), wv); },
      Errc::kOutOfRange);
  EXPECT_NE(m.find("packed_group = 1 is outside [0, 1)"), std::string::npos) << m;
  m = expect_error(
      [&] { moekit::cpu::gemm({.dtype = GemmDtype::kInt8}, a.cview(), b.cview(), c.view(), wv); },
      Errc::kInvalidArgument);
  EXPECT_NE(m.find("an int8 product needs B packed"), std::string::npos) << m;
  m = expect_error(
      [&] { moekit::cpu::gemm({.op_a = static_cast<Op>(3)}, a.cview(), b.cview(), c.view(), wv); },
      Errc::kInvalidArgument);
  EXPECT_NE(m.find("spec.op_a = 3"), std::string::npos) << m;
  m = expect_error(
      [&] { moekit::cpu::gemm({}, a.cview(), b.cview(), c.view(), wv.segment(0, wv.size() / 2)); },
      Errc::kShapeMismatch);
  EXPECT_NE(m.find("workspace has"), std::string::npos) << m;
  m = expect_error(
      [&] {
        moekit::cpu::gemm_grouped(
            {}, 2,
            [&](index_t g) {
              return GemmOperands{a.cview(), g == 1 ? other.cview() : b.cview(), nullptr, 0,
                                  c.view()};
            },
            wv);
      },
      Errc::kShapeMismatch);
  EXPECT_NE(m.find("moekit::gemm_grouped: op(operands(1).a)"), std::string::npos) << m;
  m = expect_error(
      [&] {
        moekit::cpu::gemm_grouped(
            {.dtype = GemmDtype::kBfloat16}, 1,
            [&](index_t) {
              return GemmOperands{a.cview(), b.cview(), &pb, 0, c.view()};
            },
            wv);
      },
      Errc::kInvalidArgument);
  EXPECT_NE(m.find("operands(0).b is 6 x 5 but B is packed"), std::string::npos) << m;
  EXPECT_TRUE(c.bits_equal(before)) << "a rejected call wrote C";
  // Empty products need no workspace.
  moekit::cpu::gemm({}, a.cview().middle_rows(0, 0), b.cview(), c.view().middle_rows(0, 0), {});
}

// ---- PackedMatrix -----------------------------------------------------------------

TEST(PackedMatrix, HoldsTheRoundedOrQuantizedValues) {
  std::mt19937 rng(4);
  Mat w(3 * 21, 37);  // 3 groups of 21 x 37, packed as B_g = W_g^T (37 x 21)
  w.randomize(rng);
  w.at(4, 5) = 0.0f;
  for (GemmDtype dtype : {GemmDtype::kFloat32, GemmDtype::kBfloat16, GemmDtype::kInt8}) {
    const PackedMatrix p(dtype, Op::kTrans, w.cview(), 3);
    EXPECT_EQ(p.groups(), 3);
    EXPECT_EQ(p.k(), 37);
    EXPECT_EQ(p.n(), 21);
    for (index_t g = 0; g < 3; ++g) {
      for (index_t n = 0; n < 21; ++n) {
        float amax = 0.0f;
        for (index_t k = 0; k < 37; ++k) amax = std::max(amax, std::fabs(w.at(g * 21 + n, k)));
        const moekit_test::Int8Row s = moekit_test::int8_scale(amax);
        for (index_t k = 0; k < 37; ++k) {
          const float x = w.at(g * 21 + n, k);
          const float want = dtype == GemmDtype::kFloat32 ? x
                             : dtype == GemmDtype::kBfloat16
                                 ? moekit_test::round_bf16(x)
                                 : float(moekit_test::quantize(x, s.inverse)) * s.scale;
          ASSERT_EQ(float_bits(p.value(g, k, n)), float_bits(want))
              << moekit::cpu::gemm_dtype_name(dtype) << " g " << g << " k " << k << " n " << n;
        }
      }
    }
  }
  // Op::kNone packs W itself.
  const PackedMatrix plain(GemmDtype::kFloat32, Op::kNone, w.cview(), 3);
  EXPECT_EQ(plain.k(), 21);
  EXPECT_EQ(plain.n(), 37);
  EXPECT_EQ(plain.value(2, 4, 6), w.at(2 * 21 + 4, 6));
}

TEST(PackedMatrix, FromInt8AndBadInput) {
  std::vector<std::int8_t> q = {1, -2, 3, 127, -127, 0};  // 2 x 3: N = 2, K = 3 (op kTrans)
  const std::vector<float> scales = {0.5f, 0.25f};
  const PackedMatrix p = PackedMatrix::from_int8(Op::kTrans, {q.data(), 2, 3}, {scales.data(), 2});
  EXPECT_EQ(p.value(0, 1, 0), -1.0f);
  EXPECT_EQ(p.value(0, 0, 1), 127.0f * 0.25f);
  q[2] = -128;
  std::string m = expect_error(
      [&] {
        PackedMatrix::from_int8(Op::kTrans, {q.data(), 2, 3}, {scales.data(), 2});
      },
      Errc::kInvalidArgument);
  EXPECT_NE(m.find("q holds -128"), std::string::npos) << m;
  Mat w(5, 4);
  m = expect_error([&] { PackedMatrix(GemmDtype::kFloat32, Op::kTrans, w.cview(), 2); },
                   Errc::kShapeMismatch);
  EXPECT_NE(m.find("w has 5 rows, not a multiple of groups = 2"), std::string::npos) << m;
  std::vector<float> wide(static_cast<std::size_t>(moekit::cpu::kInt8MaxK + 1));
  m = expect_error(
      [&] {
        PackedMatrix(GemmDtype::kInt8, Op::kTrans,
                     {wide.data(), 1, static_cast<index_t>(wide.size())});
      },
      Errc::kInvalidArgument);
  EXPECT_NE(m.find("exceeds kInt8MaxK"), std::string::npos) << m;
}

// ---- AMX tiles ----------------------------------------------------------------------

// The emulator's instructions against the scalar rules; where AMX exists,
// the same tiles on the hardware (reporting how many elements differ from
// the emulator bit for bit, without asserting it: see gemm/tiles.hpp).
template <class Tiles>
std::vector<float> tile_bf16_product(const std::vector<std::uint16_t>& a,
                                     const std::vector<std::uint16_t>& b, std::vector<float> c) {
  Tiles t;
  moekit::cpu::TileConfig config;
  config.palette_id = 1;
  config.rows[0] = 16, config.colsb[0] = 64;  // C 16 x 16 fp32
  config.rows[1] = 16, config.colsb[1] = 64;  // A 16 x 32 bf16
  config.rows[2] = 16, config.colsb[2] = 64;  // B 16 pairs x 16
  t.configure(config);
  t.template load<0>(c.data(), 64);
  t.template load<1>(a.data(), 64);
  t.template load<2>(b.data(), 64);
  t.template dpbf16ps<0, 1, 2>();
  t.template store<0>(c.data(), 64);
  t.release();
  return c;
}

TEST(AmxTiles, EmulatorFollowsTheDocumentedSemantics) {
  std::mt19937 rng(8);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::uint16_t> a(16 * 32), b(16 * 32);
  std::vector<float> c(16 * 16);
  const auto bf16 = [](float x) {
    return static_cast<std::uint16_t>(float_bits(moekit_test::round_bf16(x)) >> 16);
  };
  const auto widen = [](std::uint16_t h) {
    return moekit_test::bits_float(std::uint32_t{h} << 16);
  };
  for (auto& v : a) v = bf16(normal(rng));
  for (auto& v : b) v = bf16(normal(rng));
  for (auto& v : c) v = normal(rng);
  a[5] = 0x0001;  // a bf16 denormal: read as zero
  const std::vector<float> got = tile_bf16_product<moekit::cpu::EmulatedTiles>(a, b, c);
  for (std::size_t m = 0; m < 16; ++m) {
    for (std::size_t n = 0; n < 16; ++n) {
      float even = 0.0f, odd = 0.0f;
      for (std::size_t k = 0; k < 16; ++k) {
        even = moekit_test::flush(
            std::fma(moekit_test::flush(widen(a[m * 32 + 2 * k])), widen(b[k * 32 + 2 * n]), even));
        odd = moekit_test::flush(std::fma(moekit_test::flush(widen(a[m * 32 + 2 * k + 1])),
                                          widen(b[k * 32 + 2 * n + 1]), odd));
      }
      const float want = moekit_test::flush(c[m * 16 + n] + moekit_test::flush(even + odd));
      ASSERT_EQ(float_bits(got[m * 16 + n]), float_bits(want)) << m << " " << n;
    }
  }
#if MOEKIT_HAS_HARDWARE_TILES
  if (moekit::cpu::cpu_features().amx) {
    const std::vector<float> hw = tile_bf16_product<moekit::cpu::HardwareTiles>(a, b, c);
    int differ = 0;
    double worst = 0.0;
    for (std::size_t i = 0; i < hw.size(); ++i) {
      differ += float_bits(hw[i]) != float_bits(got[i]);
      worst = std::max(worst, double(std::fabs(hw[i] - got[i])));
    }
    std::printf(
        "[ info ] TDPBF16PS on this machine vs the emulator: %d of 256 elements differ "
        "(largest difference %.3g)\n",
        differ, worst);
    EXPECT_LT(worst, 1e-3);
  }
#endif
  // Shapes that do not fit fault.
  moekit::cpu::EmulatedTiles t;
  moekit::cpu::TileConfig config;
  config.palette_id = 1;
  config.rows[0] = 16, config.colsb[0] = 64;
  config.rows[1] = 8, config.colsb[1] = 64;
  config.rows[2] = 16, config.colsb[2] = 64;
  t.configure(config);
  expect_error([&] { t.dpbf16ps<0, 1, 2>(); }, Errc::kInvalidArgument);
  expect_error([&] { t.zero<3>(); }, Errc::kInvalidArgument);  // not configured
  config.palette_id = 2;
  expect_error([&] { t.configure(config); }, Errc::kInvalidArgument);
}

TEST(AmxTiles, EmulatedInt8DotProductsAreExact) {
  std::vector<std::int8_t> a(16 * 64), b(16 * 64);
  std::vector<std::int32_t> c(16 * 16, 5);
  std::mt19937 rng(9);
  std::uniform_int_distribution<int> byte(-128, 127);
  for (auto& v : a) v = static_cast<std::int8_t>(byte(rng));
  for (auto& v : b) v = static_cast<std::int8_t>(byte(rng));
  moekit::cpu::TileConfig config;
  config.palette_id = 1;
  for (int i = 0; i < 4; ++i) config.rows[i] = 16, config.colsb[i] = 64;
  for (bool signed_a : {true, false}) {
    moekit::cpu::EmulatedTiles t;
    t.configure(config);
    t.load<0>(c.data(), 64);
    t.load<1>(a.data(), 64);
    t.load<2>(b.data(), 64);
    if (signed_a) {
      t.dpbssd<0, 1, 2>();
    } else {
      t.dpbusd<0, 1, 2>();
    }
    std::vector<std::int32_t> got(16 * 16);
    t.store<0>(got.data(), 64);
    for (std::size_t m = 0; m < 16; ++m)
      for (std::size_t n = 0; n < 16; ++n) {
        std::int64_t s = 5;
        for (std::size_t k = 0; k < 64; ++k) {
          const int av =
              signed_a ? int{a[m * 64 + k]} : int{static_cast<std::uint8_t>(a[m * 64 + k])};
          s += av * int{b[(k / 4) * 64 + 4 * n + k % 4]};
        }
        ASSERT_EQ(got[m * 16 + n], s) << m << " " << n;
      }
  }
}

// ---- vector conversions ---------------------------------------------------------------

// round_bf16 / store_bf16 / load_bf16_pairs / store_int8 / load_int32 /
// reduce_max / abs on every vector path against the scalar rules (ties,
// denormals, NaN, infinities, overflow to infinity, clamping).
TEST(Vec, ConversionsFollowTheRuleOnEveryPath) {
  std::vector<float> xs = {0.0f,
                           -0.0f,
                           1.0f,
                           -1.0f,
                           1.00390625f,
                           1.01171875f,
                           3.4e38f,
                           -3.4e38f,
                           1e-40f,
                           -1e-40f,
                           1.2e-38f,
                           std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(),
                           std::nanf(""),
                           -126.5f,
                           127.5f,
                           128.0f,
                           -300.0f,
                           2.5f,
                           3.5f,
                           -2.5f,
                           0.4999f};
  std::mt19937 rng(10);
  std::normal_distribution<float> normal(0.0f, 100.0f);
  while (xs.size() % 16 != 0 || xs.size() < 64) xs.push_back(normal(rng));
  for (std::size_t c = 0; c < xs.size(); c += 16) {
    const float* x = xs.data() + c;
    std::int32_t ints[16];
    float amax[16];
    for (int i = 0; i < 16; ++i) {
      ints[i] = static_cast<std::int32_t>(float_bits(x[i]) >> 3) - (1 << 28);
      amax[i] = std::fabs(x[i]);
    }
    for (int w = 8; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) amax[i] = amax[i] > amax[i + w] ? amax[i] : amax[i + w];
    const auto check = [&](const char* path, const auto& got) {
      for (int i = 0; i < 16; ++i) {
        const float bf = moekit_test::round_bf16(x[i]);
        float r = std::nearbyint(x[i]);
        r = r > -127.0f ? r : -127.0f;
        r = r < 127.0f ? r : 127.0f;
        EXPECT_EQ(float_bits(got.rounded[i]), float_bits(bf)) << path << " round_bf16 " << x[i];
        EXPECT_EQ(got.bits[i], float_bits(bf) >> 16) << path << " store_bf16 " << x[i];
        EXPECT_EQ(got.quantized[i], static_cast<std::int8_t>(r)) << path << " store_int8 " << x[i];
        EXPECT_EQ(got.from_ints[i], static_cast<float>(ints[i])) << path << " load_int32";
        if (i < 8) {
          EXPECT_EQ(float_bits(got.even[i]), float_bits(moekit_test::round_bf16(x[2 * i]))) << path;
          EXPECT_EQ(float_bits(got.odd[i]), float_bits(moekit_test::round_bf16(x[2 * i + 1])))
              << path;
        } else {
          EXPECT_EQ(float_bits(got.even[i]), 0U) << path;
        }
      }
      EXPECT_EQ(float_bits(got.amax), float_bits(amax[0])) << path << " reduce_max";
    };
    check("generic", moekit::cpu::generic::vec_conversions(x, ints));
#if MOEKIT_DETAIL_X86
    if (moekit::cpu::isa_available(Isa::kAvx2))
      check("avx2", moekit::cpu::avx2::vec_conversions(x, ints));
    if (moekit::cpu::isa_available(Isa::kAvx512))
      check("avx512", moekit::cpu::avx512::vec_conversions(x, ints));
#endif
  }
}

}  // namespace

// Counting replacements of the global allocation functions (allocation_counter.hpp;
// the other forms route through these). Under AddressSanitizer the
// sanitizer's own are kept.
#if !MOEKIT_TEST_SANITIZED
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"  // malloc'd by the new above
#endif
namespace {
void count_allocation() {
  if (moekit_test::AllocationCounter::on().load(std::memory_order_relaxed))
    ++moekit_test::AllocationCounter::count();
}
}  // namespace
void* operator new(std::size_t size) {
  count_allocation();
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, std::align_val_t align) {
  count_allocation();
  const auto a = static_cast<std::size_t>(align);
  if (void* p = std::aligned_alloc(a, (size + a - 1) / a * a)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
#endif
