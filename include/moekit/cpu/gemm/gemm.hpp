#pragma once
// moekit's CPU GEMM engine: C = alpha op(A) op(B) + beta C on strided views,
// one product or a group of them (the experts of a layer) in one call, in
// fp32, bf16 or int8, on the widest path the machine has (cpu/isa.hpp).
//
//   gemm(spec, a, b, c, workspace)                   B from a view
//   gemm(spec, a, packed, group, c, workspace)       B packed once (PackedMatrix)
//   gemm_grouped(spec, groups, operands, workspace)  operands(g) -> GemmOperands
//
// Kernels (gemm/kernels.hpp): BLIS-style packed panels and register-blocked
// micro-kernels; fp32 and bf16 on FMA units (AVX-512 12 x 32, AVX2 and the
// portable path 6 x 16), bf16 and int8 on AMX tiles, int8 on AVX512-VNNI,
// on AVX2 (VPMADDWD) and in portable code. The path per dtype:
//
//   active_isa()   fp32               bf16                 int8
//   kAmx           AVX-512 FMA        AMX TDPBF16PS        AMX TDPBSSD
//   kAvx512        AVX-512 FMA        AVX-512 FMA          VNNI (else AVX2)
//   kAvx2          AVX2 FMA           AVX2 FMA             AVX2 VPMADDWD
//   kGeneric       portable FMA       portable FMA         portable int32
//
// Results. fp32: every element is one fused multiply-add chain over k in
// order, from +0 (gemm/detail/fma_kernel-inl.hpp), then the output rule
// (gemm/detail/epilogue-inl.hpp); the same bits on every path. bf16: the
// same chain over the bf16-rounded operands on the FMA paths (the same bits
// on all of them); AMX sums 32-element steps in its own order (gemm/tiles.hpp),
// so it agrees with them to rounding only. int8: exact int32 sums, the same
// bits on every path.
//
// Batch invariance. An element's value depends on its row of op(A), its
// column of op(B), K, alpha, beta and its old value only: never on M, N,
// the other rows, the blocking, the group it is in or the thread count.
// Threads split rows and columns, never the reduction.
//
// Workspace. Packing buffers live in the caller's workspace, one slot per
// thread: gemm_workspace_size(threads) bytes (cpu/gemm/common.hpp). A call
// uses min(max_threads(), slots) threads, one thread inside an enclosing
// OpenMP parallel region (one thread pool at a time), and allocates nothing.
// On one thread it runs on the caller, without an OpenMP region, in the
// workspace's first slot: tasks of a caller's parallel region may each run
// products on a workspace of their own (gemm_workspace_size(1) bytes each).
//
// Validation (before anything is written): the spec's enumerators; every
// view well formed; op(A) M x K, op(B) K x N and C M x N; a packed B of the
// spec's dtype and a group it has; int8 needs a packed B and K <= kInt8MaxK;
// the workspace large enough for one slot when there is work. Errors:
// kShapeMismatch (shapes, workspace), kNullPointer, kInvalidArgument, each
// naming the function called, the argument (operands(g).a for group g) and
// the values. Values (NaN, Inf) are not checked; int8 needs finite inputs.
// C must not overlap A or B (not checked).

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/gemm/common.hpp"
#include "moekit/cpu/gemm/kernels.hpp"
#include "moekit/cpu/gemm/packed_matrix.hpp"
#include "moekit/cpu/isa.hpp"
#include "moekit/cpu/parallel.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// What a product computes, for every group of a call.
struct GemmSpec {
  GemmDtype dtype = GemmDtype::kFloat32;  // the compute type (a packed B must have it)
  Op op_a = Op::kNone;                    // op(A)
  Op op_b = Op::kNone;                    // for a B from a view (a packed B is op(W) already)
  float alpha = 1.0f;                     // scales op(A) op(B)
  float beta = 0.0f;                      // scales C's old value; 0: C is not read
};

// One group's matrices: A, B from a view or packed, and C.
struct GemmOperands {
  MatrixView<const float> a{};           // A: op(A) is M x K
  MatrixView<const float> b{};           // empty when B is packed
  const PackedMatrix* packed = nullptr;  // B = packed's group `packed_group`
  index_t packed_group = 0;              // in [0, packed->groups())
  MatrixView<float> c{};                 // C, M x N: written (and read when beta != 0)
};

// Refuses a compute type that training cannot use (Errc::kInvalidArgument,
// naming `name`): fp32 and bf16 train (bf16 from fp32 master weights); int8
// is for weights packed once for inference.
inline void check_training_dtype(GemmDtype dtype, const char* name) {
  MOEKIT_CHECK_ARG(dtype == GemmDtype::kFloat32 || dtype == GemmDtype::kBfloat16, name, " = ",
                   static_cast<int>(dtype),
                   " must be kFloat32 or kBfloat16 (int8 is for packed inference: pack)");
}

namespace detail {

// The kernel families (see the table at the top of this file).
enum class GemmPath : int { kGeneric, kAvx2, kAvx512, kAmx };

inline GemmPath gemm_path(GemmDtype dtype) {
  switch (active_isa()) {
    case Isa::kAmx:
      return dtype == GemmDtype::kFloat32 ? GemmPath::kAvx512 : GemmPath::kAmx;
    case Isa::kAvx512:
      return GemmPath::kAvx512;
    case Isa::kAvx2:
      return GemmPath::kAvx2;
    case Isa::kGeneric:
      break;
  }
  return GemmPath::kGeneric;
}

using ItemKernel = void (*)(const GemmItem&, const GemmSlot&);

// The item kernel of a path and dtype, and its name for reports.
struct GemmKernel {
  ItemKernel run = nullptr;
  const char* name = "";
};

inline GemmKernel path_kernel(GemmPath path, GemmDtype dtype) {
  const int d = static_cast<int>(dtype);
  switch (path) {
    case GemmPath::kGeneric:
      return d == 0 ? GemmKernel{generic::gemm_kernels::fma_item<6, 1, false>, "generic fma 6x16"}
             : d == 1
                 ? GemmKernel{generic::gemm_kernels::fma_item<6, 1, true>, "generic bf16 fma 6x16"}
                 : GemmKernel{generic::gemm_kernels::int8_item<4, 1, false>, "generic int8 4x16"};
#if MOEKIT_DETAIL_X86
    case GemmPath::kAvx2:
      return d == 0   ? GemmKernel{avx2::gemm_kernels::fma_item<6, 1, false>, "avx2 fma 6x16"}
             : d == 1 ? GemmKernel{avx2::gemm_kernels::fma_item<6, 1, true>, "avx2 bf16 fma 6x16"}
                      : GemmKernel{avx2::gemm_kernels::int8_item<2, 1, false>,
                                   "avx2 int8 vpmaddwd 2x16"};
    case GemmPath::kAmx:
#if MOEKIT_HAS_HARDWARE_TILES
      if (d != 0) {
        return d == 1 ? GemmKernel{avx512::amx_kernels::amx_item<false>, "amx bf16 32x32"}
                      : GemmKernel{avx512::amx_kernels::amx_item<true>, "amx int8 32x32"};
      }
#endif
      [[fallthrough]];
    case GemmPath::kAvx512:
      if (d == 2 && !cpu_features().avx512_vnni)
        return {avx2::gemm_kernels::int8_item<2, 1, false>, "avx2 int8 vpmaddwd 2x16"};
      return d == 0 ? GemmKernel{avx512::gemm_kernels::fma_item<12, 2, false>, "avx512 fma 12x32"}
             : d == 1
                 ? GemmKernel{avx512::gemm_kernels::fma_item<12, 2, true>, "avx512 bf16 fma 12x32"}
                 : GemmKernel{avx512::gemm_kernels::int8_item<12, 2, true>,
                              "avx512 int8 vnni 12x32"};
#else
    default:
      break;
#endif
  }
  return path_kernel(GemmPath::kGeneric, dtype);
}

// Test hook: while a GemmKernelOverride lives, products of the dtypes it
// names run its kernels instead of the path's (the AVX-512 blockings on the
// portable operations, the AMX kernels on emulated tiles; see test_gemm.cpp).
struct GemmKernelOverride {
  GemmKernel kernels[3] = {};  // per GemmDtype; a null `run` keeps the path's

  explicit GemmKernelOverride(GemmDtype dtype, GemmKernel kernel) {
    kernels[static_cast<int>(dtype)] = kernel;
    previous_ = slot().exchange(this);
  }
  ~GemmKernelOverride() { slot().store(previous_); }
  GemmKernelOverride(const GemmKernelOverride&) = delete;
  GemmKernelOverride& operator=(const GemmKernelOverride&) = delete;

  static std::atomic<GemmKernelOverride*>& slot() {
    static std::atomic<GemmKernelOverride*> current{nullptr};
    return current;
  }
  const GemmKernelOverride* previous() const { return previous_; }

 private:
  GemmKernelOverride* previous_ = nullptr;
};

// The AMX kernels on EmulatedTiles for bf16 and int8 (a GemmKernelOverride pair).
class AmxEmulation {
 public:
  AmxEmulation()
      : bf16_(GemmDtype::kBfloat16,
              {generic::amx_emulated::amx_item<false>, "amx-emulated bf16 32x32"}),
        int8_(GemmDtype::kInt8,
              {generic::amx_emulated::amx_item<true>, "amx-emulated int8 32x32"}) {}

 private:
  GemmKernelOverride bf16_, int8_;
};

// The kernel a product of `dtype` runs now.
inline GemmKernel gemm_kernel(GemmDtype dtype) {
  for (const GemmKernelOverride* o = GemmKernelOverride::slot().load(); o != nullptr;
       o = o->previous()) {
    if (o->kernels[static_cast<int>(dtype)].run != nullptr)
      return o->kernels[static_cast<int>(dtype)];
  }
  return path_kernel(gemm_path(dtype), dtype);
}

// Products smaller than this many multiply-adds stay on one thread (waking
// workers costs more than they save).
inline constexpr double kGemmParallelMacs = double(1 << 20);

// Fails in the public function `where` (moekit::detail::fail adds "moekit::").
template <class... Args>
[[noreturn]] void gemm_fail(const char* where, Errc code, const Args&... args) {
  moekit::detail::fail(code, where, moekit::detail::concat(args...));
}

// A view argument of group g ("c" or "operands(g).c" in messages).
struct GemmArgName {
  const char* arg;
  index_t group;  // -1: a single product
};
inline std::ostream& operator<<(std::ostream& os, const GemmArgName& n) {
  if (n.group >= 0) os << "operands(" << n.group << ").";
  return os << n.arg;
}

template <class T>
void check_gemm_view(const char* where, MatrixView<T> v, GemmArgName name) {
  if (v.rows() < 0 || v.cols() < 0)
    gemm_fail(where, Errc::kInvalidArgument, name, " has negative size ", v.rows(), " x ",
              v.cols());
  if (v.ld() < v.cols() && v.rows() > 1)
    gemm_fail(where, Errc::kInvalidArgument, name, ".ld() = ", v.ld(), " is smaller than ", name,
              ".cols() = ", v.cols());
  if (!v.empty() && v.data() == nullptr)
    gemm_fail(where, Errc::kNullPointer, name, " is null but has ", v.rows(), " x ", v.cols(),
              " elements");
}

struct GemmShape {
  index_t m = 0, n = 0, k = 0;
};

// Group g's M, N and K (operands already checked).
inline GemmShape gemm_shape(const GemmSpec& spec, const GemmOperands& ops) {
  GemmShape s;
  s.m = spec.op_a == Op::kNone ? ops.a.rows() : ops.a.cols();
  s.k = spec.op_a == Op::kNone ? ops.a.cols() : ops.a.rows();
  if (ops.packed != nullptr) {
    s.n = ops.packed->n();
  } else {
    s.n = spec.op_b == Op::kNone ? ops.b.cols() : ops.b.rows();
  }
  return s;
}

// Checks one group's operands against the spec (g < 0: a single product);
// returns its M, N, K.
inline GemmShape check_gemm_operands(const char* where, const GemmSpec& spec,
                                     const GemmOperands& ops, index_t g) {
  check_gemm_view(where, ops.a, {"a", g});
  check_gemm_view(where, ops.c, {"c", g});
  const GemmShape s = gemm_shape(spec, ops);
  index_t kb = 0;
  if (ops.packed != nullptr) {
    const PackedMatrix& p = *ops.packed;
    if (!ops.b.empty())
      gemm_fail(where, Errc::kInvalidArgument, GemmArgName{"b", g}, " is ", ops.b.rows(), " x ",
                ops.b.cols(), " but B is packed (give one or the other)");
    if (p.dtype() != spec.dtype)
      gemm_fail(where, Errc::kInvalidArgument, GemmArgName{"packed", g}, " holds ",
                gemm_dtype_name(p.dtype()), " but spec.dtype is ", gemm_dtype_name(spec.dtype));
    if (ops.packed_group < 0 || ops.packed_group >= p.groups())
      gemm_fail(where, Errc::kOutOfRange, GemmArgName{"packed_group", g}, " = ", ops.packed_group,
                " is outside [0, ", p.groups(), ")");
    kb = p.k();
  } else {
    if (spec.dtype == GemmDtype::kInt8)
      gemm_fail(where, Errc::kInvalidArgument, GemmArgName{"b", g},
                ": an int8 product needs B packed (PackedMatrix with GemmDtype::kInt8)");
    check_gemm_view(where, ops.b, {"b", g});
    kb = spec.op_b == Op::kNone ? ops.b.rows() : ops.b.cols();
  }
  if (kb != s.k)
    gemm_fail(where, Errc::kShapeMismatch, "op(", GemmArgName{"a", g}, ") is ", s.m, " x ", s.k,
              " but op(B) is ", kb, " x ", s.n, ": the reduction lengths differ");
  if (ops.c.rows() != s.m || ops.c.cols() != s.n)
    gemm_fail(where, Errc::kShapeMismatch, GemmArgName{"c", g}, " is ", ops.c.rows(), " x ",
              ops.c.cols(), ", expected ", s.m, " x ", s.n);
  if (spec.dtype == GemmDtype::kInt8 && s.k > kInt8MaxK)
    gemm_fail(where, Errc::kInvalidArgument, "int8 reduction length K = ", s.k,
              " exceeds kInt8MaxK = ", kInt8MaxK);
  return s;
}

inline index_t items_of(GemmShape s, index_t item_rows, index_t item_cols) {
  if (s.m == 0 || s.n == 0) return 0;
  return ceil_div(s.m, item_rows) * ceil_div(s.n, item_cols);
}

// The engine's one driver: validates every group, then runs all items of all
// groups on the threads the workspace allows. `where` is the public function;
// `grouped` names arguments operands(g).x rather than x.
template <class Operands>
void run_gemm(const char* where, bool grouped, const GemmSpec& spec, index_t groups,
              Operands& operands, VectorView<std::byte> workspace) {
  if (!is_gemm_dtype(spec.dtype))
    gemm_fail(where, Errc::kInvalidArgument, "spec.dtype = ", static_cast<int>(spec.dtype),
              " is not a GemmDtype");
  if (!is_op(spec.op_a) || !is_op(spec.op_b))
    gemm_fail(where, Errc::kInvalidArgument, "spec.op_a = ", static_cast<int>(spec.op_a),
              ", spec.op_b = ", static_cast<int>(spec.op_b), ": not an Op");
  if (groups < 0) gemm_fail(where, Errc::kInvalidArgument, "groups = ", groups, " is negative");
  index_t items = 0;
  double macs = 0.0;
  for (index_t g = 0; g < groups; ++g) {
    const GemmShape s = check_gemm_operands(where, spec, operands(g), grouped ? g : -1);
    items += items_of(s, kGemmItemRows, kGemmNc);
    macs += double(s.m) * double(s.n) * double(s.k);
  }
  if (items == 0) return;

  if (workspace.size() < 0 || (workspace.size() > 0 && workspace.data() == nullptr))
    gemm_fail(where, Errc::kNullPointer, "workspace is null but has ", workspace.size(), " bytes");
  const auto address = reinterpret_cast<std::uintptr_t>(workspace.data());
  const auto skip = static_cast<index_t>((kSlotAlign - address % kSlotAlign) % kSlotAlign);
  const index_t slots = workspace.size() < skip ? 0 : (workspace.size() - skip) / kSlotBytes;
  if (slots < 1)
    gemm_fail(where, Errc::kShapeMismatch, "workspace has ", workspace.size(),
              " bytes, gemm_workspace_size(1) = ", gemm_workspace_size(1));
  int threads = 1;
  if (!in_parallel() && macs >= kGemmParallelMacs) {
    threads = max_threads();
    if (threads > slots) threads = static_cast<int>(slots);
  }

  // Smaller items where there are too few to keep the threads busy (results
  // do not depend on the item size).
  index_t item_rows = kGemmItemRows, item_cols = kGemmNc;
  while (items < 4 * threads && (item_cols > 64 || item_rows > 96)) {
    if (item_cols > 64) {
      item_cols /= 2;
    } else {
      item_rows = round_up(item_rows / 2, 96);
    }
    items = 0;
    for (index_t g = 0; g < groups; ++g)
      items += items_of(gemm_shape(spec, operands(g)), item_rows, item_cols);
  }
  if (items < threads) threads = static_cast<int>(items);

  const ItemKernel kernel = gemm_kernel(spec.dtype).run;
  std::byte* const base = workspace.data() + skip;
  // Runs items in increasing order on slot `slot_index`. Item t's group is
  // found by walking the groups forward from the last one (restarting when t
  // goes back), so a thread walks them once.
  const auto run_items = [&](index_t slot_index, auto&& for_items) {
    std::byte* mine = base + slot_index * kSlotBytes;
    GemmSlot slot;
    slot.a = mine;
    slot.b = slot.a + kSlotABytes;
    slot.partial = slot.b + kSlotBBytes;
    slot.row_scales = reinterpret_cast<float*>(slot.partial + kSlotPartialBytes);
    index_t g = -1, first = 0, count = 0;  // the items of group g are [first, first + count)
    GemmOperands ops{};
    GemmShape shape{};
    for_items([&](index_t t) {
      if (t < first) g = -1, first = 0, count = 0;
      while (t >= first + count) {
        first += count;
        ops = operands(++g);
        shape = gemm_shape(spec, ops);
        count = items_of(shape, item_rows, item_cols);
      }
      const index_t col_items = ceil_div(shape.n, item_cols);
      const index_t local = t - first;
      GemmItem it;
      it.a = ops.a.data();
      it.lda = ops.a.ld();
      it.op_a = spec.op_a;
      if (ops.packed != nullptr) {
        it.b_packed = true;
        it.packed = ops.packed->panels(ops.packed_group);
      } else {
        it.b = ops.b.data();
        it.ldb = ops.b.ld();
        it.op_b = spec.op_b;
      }
      it.c = ops.c.data();
      it.ldc = ops.c.ld();
      it.m0 = local / col_items * item_rows;
      it.n0 = local % col_items * item_cols;
      it.rows = shape.m - it.m0 < item_rows ? shape.m - it.m0 : item_rows;
      it.cols = shape.n - it.n0 < item_cols ? shape.n - it.n0 : item_cols;
      it.k = shape.k;
      it.alpha = spec.alpha;
      it.beta = spec.beta;
      kernel(it, slot);
    });
  };

  // One thread runs on the caller, with no OpenMP region: a caller's own
  // parallel tasks may each run a product on their own workspace slot.
  if (threads == 1) {
    run_items(0, [&](auto&& item) {
      for (index_t t = 0; t < items; ++t) item(t);
    });
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
  run_items(thread_id(), [&](auto&& item) {
#pragma omp for schedule(dynamic, 1)
    for (index_t t = 0; t < items; ++t) item(t);
  });
#endif
}

}  // namespace detail

// The kernel family a dtype runs on now (e.g. "avx2 fma 6x16"), for reports.
inline const char* gemm_kernel_name(GemmDtype dtype) { return detail::gemm_kernel(dtype).name; }

// C_g = alpha op(A_g) op(B_g) + beta C_g for every g < groups, where
// operands(g) returns group g's GemmOperands (called several times per group:
// it must be cheap and return the same views each time).
template <class Operands>
void gemm_grouped(const GemmSpec& spec, index_t groups, Operands&& operands,
                  VectorView<std::byte> workspace) {
  detail::run_gemm("gemm_grouped", true, spec, groups, operands, workspace);
}

// C = alpha op(A) op(B) + beta C.
inline void gemm(const GemmSpec& spec, MatrixView<const float> a, MatrixView<const float> b,
                 MatrixView<float> c, VectorView<std::byte> workspace) {
  auto operands = [&](index_t) { return GemmOperands{a, b, nullptr, 0, c}; };
  detail::run_gemm("gemm", false, spec, 1, operands, workspace);
}

// C = alpha op(A) B + beta C with B = group `group` of a PackedMatrix.
inline void gemm(const GemmSpec& spec, MatrixView<const float> a, const PackedMatrix& b,
                 index_t group, MatrixView<float> c, VectorView<std::byte> workspace) {
  auto operands = [&](index_t) { return GemmOperands{a, {}, &b, group, c}; };
  detail::run_gemm("gemm", false, spec, 1, operands, workspace);
}

}  // namespace cpu
MOEKIT_NAMESPACE_END
