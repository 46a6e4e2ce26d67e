#pragma once
// LoRA adapters on the CPU backend, for LoraSpec<R>: one adapter on a frozen
// linear layer (LoraLinear), and a bank of N adapters where each row of the
// batch picks its own (LoraBank), forward and backward, with initialisation,
// dropout on the adapter input, and merging into the base weight.
//
// Layout (row-major, like torch.nn.Linear; R = S::rank):
//   x   n x d_in       input rows
//   w   d_out x d_in   frozen base weight, bias d_out (optional, frozen)
//   a   R x d_in       adapter down-projection
//                      (bank: N R x d_in, adapter i = rows [i R, (i + 1) R))
//   b   d_out x R      adapter up-projection
//                      (bank: N d_out x R, adapter i = rows [i d_out, (i + 1) d_out))
//   h   n x R          saved adapter activations (caller memory)
//   y   n x d_out
//
// The math (docs/math.md, "LoRA"), s = alpha / R, or alpha / sqrt(R) with rsLoRA
// (moekit/core/lora.hpp), drop = dropout on the adapter input (identity in
// inference or with p = 0):
//   forward   h = drop(x) a^T,   y = x w^T + bias + s h b^T
//   backward  given g = dL/dy:
//             db = s g^T h,   dh = s g b,   da = dh^T drop(x),   dx = g w + drop'(dh a)
// where drop' applies the same mask and 1 / (1 - p) scale. w and the bias are
// frozen: they never get a gradient and no work is done for one. LoraBank does
// the same per row with the row's adapter (its id in [-1, N); -1 = none, the
// row gets the base output only).
//
// Dropout. In training (LoraStep::training) with config.dropout = p > 0, the
// mask of element (t, j) of x is a pure function of (step.seed, step.step,
// config.dropout_stream, the adapter's index in a bank (0 for LoraLinear), t,
// j) (moekit/core/lora.hpp): it is never stored, backward regenerates it, and
// passing the same LoraStep gives the same mask. Two adapters draw independent
// masks from one LoraStep when their streams (or bank indices) differ, so give
// each adapter object of a model its own dropout_stream. Otherwise (inference,
// p = 0) no mask work at all.
//
// Saved activations. forward writes h into `saved_h` (n x R, caller memory);
// backward reads it (needed for db only). For inference pass an empty view:
// h then lives in the workspace.
//
// Workspace. Both calls take a caller workspace of at least
// workspace_size(n) bytes (float-aligned) for h, dh, masked copies of a chunk
// of x rows under dropout, the GEMM engine's packing buffers
// (cpu/gemm/gemm.hpp) and, for the bank, each thread's packed adapter and
// gradient panels; no call allocates.
//
// Gradients. Any of dx, grads.da and grads.db may be an empty view: it is
// frozen or not wanted, no work is done for it and nothing is written there.
// da and db are overwritten or, with grads.accumulate, added to. LoraLinear
// overwrites dx; LoraBank overwrites dx when it owns the base weight and adds
// to it otherwise (see LoraBank below). An adapter of the bank with no rows
// gets zero gradient blocks (overwrite) or unchanged ones (accumulate).
//
// Merging. merge: w += s b a; unmerge: w -= s b a; safe_merge computes every
// merged value first and refuses (Errc::kNonFinite, naming the element) if any
// is NaN or infinite, leaving w bit-identical; otherwise it writes exactly the
// values merge writes. merge followed by unmerge restores w up to one rounding
// per element. The rank-R products run on fixed-size Eigen rows (s b_i, 1 x R).
//
// Multi-adapter bank. group() sorts the rows by adapter with a stable counting
// sort: order (n entries; the first offsets[N] list the rows of adapter 0, then
// 1, ..., each in increasing row order; rows with id -1 are not listed) and
// offsets (N + 1 entries, the exclusive scan of the counts). forward and
// backward take ids, order and offsets (LoraRows) and run each adapter's
// shrink (x_seg a_i^T) and expand (h_seg b_i^T) on its own rows only, with
// the low-rank row kernels of moekit/cpu/low_rank_rows.hpp (SGMV style): the
// rows are read and written where they lie in x, y, dy and dx, with the
// rank-R accumulators in registers and the adapter's a and b^T packed once
// per thread into panels. Rows never pay for other adapters: the cost is
// O(rows x R x (d_in + d_out)) plus one read of each used adapter's weights.
//
// Products. LoraLinear's products (the base x w^T and dy w, the rank-R
// shrink and expand, the gradients' dy^T h and dh^T x) and a LoraBank's base
// product run on the GEMM engine, in fp32 by default: every element is one
// multiply-add chain over its reduction in order, so a row's y, h and dx
// depend on that row alone, bit for bit, whatever the batch, the thread
// count and the CPU path (docs/determinism.md); da and db sum over the rows
// in row order. The constructors' base_compute = bf16 trains with fp32
// master weights (like the experts', cpu/expert_ffn.hpp): the frozen base
// product (x w^T and dy w), the layer's one large product, rounds x (dy) and
// w to bf16 and sums in fp32, on AMX tiles where the CPU has them; a row
// still depends on that row alone, whatever the batch and the thread count.
// The rank-R products stay fp32: they cost O(R) per element and are bound
// by memory, so bf16 would save nothing there and would round away the
// adapter's small updates.
//
// Threading. LoraLinear: the engine splits each product's rows and columns
// over the OpenMP threads, and the dropout and gather loops run on OpenMP
// threads. LoraBank forward: each OpenMP thread
// takes an equal run of the grouped rows (crossing segments as needed) with
// its own workspace slot. LoraBank backward: adapters in parallel (dynamic
// schedule) when at least as many adapters have rows as there are threads,
// else adapters in turn, each adapter's rows split over the threads and the
// partial gradients summed in thread order. Each output element is written by
// one thread, and each gradient block sums its parts in a fixed order, so
// results are bit-identical run after run for a given thread count. Across
// thread counts y, h and dx keep their bits, as do LoraLinear's da and db;
// the bank's da and db, summed per thread and then in thread order, may
// change in the last bits. Without OpenMP everything runs serially and gives
// correct results.
//
// Validation (every public call, before anything is written): the config
// (constructor: sizes >= 1, alpha finite, dropout in [0, 1), base_compute fp32
// or bf16); every view well formed and of the shapes above, with a rank
// mismatch named as such; the workspace; for the bank, every id in [-1, N) (the
// message names the row and value) and order/offsets consistent with ids.
// Errors: kShapeMismatch, kNullPointer, kInvalidArgument, kOutOfRange (ids,
// order entries), kNonFinite (safe_merge). Values (NaN/Inf) are not checked
// elsewhere. An output that overlaps an input or another output is refused
// (kInvalidArgument, naming both). Strided views (ld > cols) work; padding
// columns are never touched.
//
//   const LoraLinear<LoraSpec<8>> lora({.d_in = d, .d_out = d, .alpha = 16});
//   lora.init(a, b, {.seed = 7});
//   std::vector<std::byte> ws(lora.workspace_size(n));
//   const LoraStep step{.training = true, .seed = 1, .step = i};
//   lora.forward(x, {.w = w, .a = a, .b = b}, y, h, step, ws_view);
//   lora.backward(dy, x, {.w = w, .a = a, .b = b}, h, step, dx, {.da = da, .db = db}, ws_view);

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "moekit/core/error.hpp"
#include "moekit/core/lora.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/gemm/gemm.hpp"
#include "moekit/cpu/low_rank_rows.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// The configurations live in moekit/core/lora.hpp, shared with the CUDA backend.
using ::moekit::LoraBankConfig;
using ::moekit::LoraConfig;
using ::moekit::LoraGrads;
using ::moekit::LoraInitConfig;
using ::moekit::LoraRows;
using ::moekit::LoraStep;

// What forward and backward read (shapes in the layout at the top).
struct LoraWeights {
  MatrixView<const float> w{};     // frozen base weight (LoraBank: may be empty)
  VectorView<const float> bias{};  // frozen base bias, d_out, or empty
  MatrixView<const float> a{};     // adapter down-projection(s)
  MatrixView<const float> b{};     // adapter up-projection(s)
};

namespace detail {

// The dropout of one call (moekit/core/lora.hpp, shared with CUDA), applied
// a row at a time.
struct LoraMask : LoraDropout {
  static LoraMask make(float p, const LoraStep& step, index_t d_in, std::uint64_t stream) {
    return {LoraDropout::make(p, step, d_in, stream)};
  }
  LoraMask for_adapter(index_t adapter) const { return {LoraDropout::for_adapter(adapter)}; }
  // dst[j] (= or +=) src[j] * mask(t, j) for j < cols.
  template <bool kAdd>
  void apply(const float* src, float* dst, index_t t, index_t cols) const {
    const auto base = static_cast<std::uint64_t>((row0 + t) * width);
    for (index_t j = 0; j < cols; ++j) {
      const float v = lora_dropout_keep(key, p, base + static_cast<std::uint64_t>(j))
                          ? src[j] * keep_scale
                          : 0.0f;
      if constexpr (kAdd) {
        dst[j] += v;
      } else {
        dst[j] = v;
      }
    }
  }
};

// dst row k = src row rows[k], masked when `mask` is active.
inline void gather_rows(MatrixView<const float> src, const RowSet& rows, const LoraMask& mask,
                        MatrixView<float> dst, [[maybe_unused]] bool parallel) {
  const index_t cols = src.cols();
  MOEKIT_PARALLEL_FOR_IF(parallel && rows.count * cols > kParallelGrain)
  for (index_t k = 0; k < rows.count; ++k) {
    const index_t t = rows[k];
    if (mask.active) {
      mask.apply<false>(src.row(t), dst.row(k), t, cols);
    } else {
      std::copy(src.row(t), src.row(t) + cols, dst.row(k));
    }
  }
}

// dst row rows[k] (= or +=) src row k, masked when `mask` is active.
template <bool kAdd>
void scatter_rows(MatrixView<const float> src, const RowSet& rows, const LoraMask& mask,
                  MatrixView<float> dst, [[maybe_unused]] bool parallel) {
  const index_t cols = src.cols();
  MOEKIT_PARALLEL_FOR_IF(parallel && rows.count * cols > kParallelGrain)
  for (index_t k = 0; k < rows.count; ++k) {
    const index_t t = rows[k];
    if (mask.active) {
      mask.apply<kAdd>(src.row(k), dst.row(t), t, cols);
    } else if constexpr (kAdd) {
      as_eigen(dst.row_view(t)) += as_eigen(src.row_view(k));
    } else {
      std::copy(src.row(k), src.row(k) + cols, dst.row(t));
    }
  }
}

template <class Dst, class Expr>
void assign_or_add(Dst&& dst, const Expr& expr, bool add) {
  if (add) {
    dst.noalias() += expr;
  } else {
    dst.noalias() = expr;
  }
}

// Scratch of LoraLinear: masked copies of a chunk of x rows (dropout only;
// also dh a before its mask), h and dh of the chunk, and the GEMM engine's
// workspace (the rest of the caller's).
struct LoraSlot {
  MatrixView<float> xbuf, hbuf, dhbuf;
  VectorView<std::byte> engine;
};

struct LoraSlotShape {
  index_t rows = 0;
  bool xbuf = false;

  index_t floats(index_t d_in, int rank) const {
    return rows * (2 * index_t{rank} + (xbuf ? d_in : 0));
  }
  LoraSlot carve(float* p, index_t d_in, int rank) const {
    LoraSlot s;
    if (xbuf) s.xbuf = MatrixView<float>(p, rows, d_in);
    p += xbuf ? rows * d_in : 0;
    s.hbuf = MatrixView<float>(p, rows, rank);
    s.dhbuf = MatrixView<float>(p + rows * rank, rows, rank);
    return s;
  }
};

inline void check_lora_workspace(VectorView<std::byte> workspace, index_t need, index_t rows) {
  if (need == 0) return;
  check_view(workspace, "workspace");
  MOEKIT_CHECK(workspace.size() >= need, Errc::kShapeMismatch, "workspace has ", workspace.size(),
               " bytes, ", need, " needed for ", rows, " rows (see workspace_size)");
  MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace.data()) % alignof(float) == 0,
               Errc::kInvalidArgument, "workspace is not aligned to ", alignof(float), " bytes");
}

// A's rows must be the rank; say so instead of a bare shape mismatch.
template <class T>
void check_rank_rows(MatrixView<T> v, index_t rows, int rank, const char* name) {
  check_view(v, name);
  MOEKIT_CHECK(v.rows() == rows, Errc::kShapeMismatch, name, " has ", v.rows(), " rows, expected ",
               rows, " (rank R = ", rank, ")");
}
template <class T>
void check_rank_cols(MatrixView<T> v, int rank, const char* name) {
  check_view(v, name);
  MOEKIT_CHECK(v.cols() == rank, Errc::kShapeMismatch, name, " has ", v.cols(),
               " columns, expected the rank R = ", rank);
}

// The weights of a LoRA call for its OverlapCheck (all read).
inline void add_lora_weights(OverlapCheck& c, const LoraWeights& w) {
  c.in({{w.w, "weights.w"}, {w.bias, "weights.bias"}, {w.a, "weights.a"}, {w.b, "weights.b"}});
}

// The frozen base product (x w^T forward, dy w backward) on the GEMM engine
// in the adapter's base compute dtype: C = A op(w).
inline void base_gemm(GemmDtype dtype, Op op_w, MatrixView<const float> a,
                      MatrixView<const float> w, MatrixView<float> c,
                      VectorView<std::byte> engine) {
  gemm({.dtype = dtype, .op_a = Op::kNone, .op_b = op_w}, a, w, c, engine);
}

// LoraLinear's rank-R products on the GEMM engine in fp32: C (= or, with
// add, +=) alpha op(A) op(B).
inline void lora_gemm(Op op_a, Op op_b, float alpha, bool add, MatrixView<const float> a,
                      MatrixView<const float> b, MatrixView<float> c,
                      VectorView<std::byte> engine) {
  gemm({.dtype = GemmDtype::kFloat32,
        .op_a = op_a,
        .op_b = op_b,
        .alpha = alpha,
        .beta = add ? 1.0f : 0.0f},
       a, b, c, engine);
}

// One adapter's forward and backward on consecutive rows [first, first +
// count) as GEMM-engine products (LoraLinear).
template <int R>
struct LoraKernel {
  float scale = 0.0f;
  LoraMask mask;

  // drop(x[rows]): in place, or masked copies in the slot.
  MatrixView<const float> input(MatrixView<const float> x, const RowSet& rows,
                                const LoraSlot& slot) const {
    if (!mask.active) return x.middle_rows(rows.first, rows.count);
    const MatrixView<float> buf = slot.xbuf.middle_rows(0, rows.count);
    gather_rows(x, rows, mask, buf, /*parallel=*/true);
    return buf;
  }

  // h[rows] = drop(x[rows]) a^T (h may be empty: kept in the slot), y[rows] += s h b^T.
  void forward(MatrixView<const float> x, const RowSet& rows, MatrixView<const float> a,
               MatrixView<const float> b, MatrixView<float> h, MatrixView<float> y,
               const LoraSlot& slot) const {
    const index_t n = rows.count, t0 = rows.first;
    const MatrixView<float> hv = h.empty() ? slot.hbuf.middle_rows(0, n) : h.middle_rows(t0, n);
    lora_gemm(Op::kNone, Op::kTrans, 1.0f, false, input(x, rows, slot), a, hv, slot.engine);
    lora_gemm(Op::kNone, Op::kTrans, scale, true, hv, b, y.middle_rows(t0, n), slot.engine);
  }

  // db (= or +=) s dy^T h, dh = s dy b, da (= or +=) dh^T drop(x),
  // dx[rows] += drop'(dh a). Empty outputs are skipped.
  void backward(MatrixView<const float> dy, MatrixView<const float> x, MatrixView<const float> h,
                const RowSet& rows, MatrixView<const float> a, MatrixView<const float> b,
                MatrixView<float> dx, MatrixView<float> da, MatrixView<float> db, bool add,
                const LoraSlot& slot) const {
    const index_t n = rows.count, t0 = rows.first;
    const MatrixView<const float> g = dy.middle_rows(t0, n);
    const VectorView<std::byte> engine = slot.engine;
    if (!db.empty())
      lora_gemm(Op::kTrans, Op::kNone, scale, add, g, h.middle_rows(t0, n), db, engine);
    if (da.empty() && dx.empty()) return;
    const MatrixView<float> dh = slot.dhbuf.middle_rows(0, n);
    lora_gemm(Op::kNone, Op::kNone, scale, false, g, b, dh, engine);
    if (!da.empty())
      lora_gemm(Op::kTrans, Op::kNone, 1.0f, add, dh, input(x, rows, slot), da, engine);
    if (dx.empty()) return;
    if (!mask.active) {
      lora_gemm(Op::kNone, Op::kNone, 1.0f, true, dh, a, dx.middle_rows(t0, n), engine);
    } else {
      const MatrixView<float> t = slot.xbuf.middle_rows(0, n);
      lora_gemm(Op::kNone, Op::kNone, 1.0f, false, dh, a, t, engine);
      scatter_rows<true>(t, rows, mask, dx, /*parallel=*/true);
    }
  }
};

// Scratch of one thread of a LoraBank: one adapter's a and b^T as panels
// (low_rank_rows.hpp), its gradients accumulated as panels, h and dh of a
// chunk, and (dropout only) masked copies of a chunk of x rows.
struct LoraBankSlot {
  float* pa = nullptr;     // a_i, R x d_in
  float* pb = nullptr;     // b_i^T, R x d_out
  float* ga = nullptr;     // da_i
  float* gb = nullptr;     // (db_i)^T / s
  float* h = nullptr;      // chunk x R
  float* dh = nullptr;     // chunk x R
  MatrixView<float> xbuf;  // chunk x d_in, dropout only
  index_t packed = -1;     // the adapter pa and pb hold
};

template <int R>
struct LoraBankSlotShape {
  index_t d_in = 0, d_out = 0, chunk = 0;
  bool xbuf = false;

  // Rounded up to 64 bytes so that slots never share a cache line.
  index_t floats() const {
    const index_t n = 2 * (panel_floats<R>(d_in) + panel_floats<R>(d_out)) + 2 * chunk * R +
                      (xbuf ? chunk * d_in : 0);
    return (n + 15) / 16 * 16;
  }
  LoraBankSlot carve(float* p) const {
    LoraBankSlot s;
    const auto take = [&p](index_t n) { return std::exchange(p, p + n); };
    s.pa = take(panel_floats<R>(d_in));
    s.pb = take(panel_floats<R>(d_out));
    s.ga = take(panel_floats<R>(d_in));
    s.gb = take(panel_floats<R>(d_out));
    s.h = take(chunk * R);
    s.dh = take(chunk * R);
    if (xbuf) s.xbuf = MatrixView<float>(p, chunk, d_in);
    return s;
  }
};

// One adapter of a bank on a chunk of its segment: rows anywhere in x, read
// and written in place by the low-rank row kernels (only masked copies of x
// rows are made, under dropout).
template <int R>
struct LoraSegmentKernel {
  float scale = 0.0f;
  LoraMask mask;  // the call's (stream's) mask before for_adapter, adapter i's after

  // The kernel of adapter i: its own dropout mask.
  LoraSegmentKernel for_adapter(index_t adapter) const {
    return {scale, mask.for_adapter(adapter)};
  }

  void pack(index_t adapter, MatrixView<const float> a, MatrixView<const float> b,
            LoraBankSlot& slot) const {
    if (slot.packed == adapter) return;
    pack_panel<R>(a, slot.pa);
    pack_panel<R, /*kTransposed=*/true>(b, slot.pb);
    slot.packed = adapter;
  }

  // Rows of drop(x): in place, or masked copies in the slot.
  RowsOf<const float> input(MatrixView<const float> x, const RowSet& rows,
                            const LoraBankSlot& slot) const {
    if (!mask.active) return rows_of(x, rows);
    const MatrixView<float> buf = slot.xbuf.middle_rows(0, rows.count);
    gather_rows(x, rows, mask, buf, /*parallel=*/false);
    return rows_of(MatrixView<const float>(buf), RowSet{nullptr, 0, rows.count});
  }

  // h = drop(x[rows]) a^T (copied to saved_h unless empty), y[rows] += s h b^T.
  void forward(MatrixView<const float> x, const RowSet& rows, MatrixView<float> saved_h,
               MatrixView<float> y, const LoraBankSlot& slot) const {
    const index_t n = rows.count;
    shrink_rows<R>(input(x, rows, slot), n, x.cols(), slot.pa, 1.0f, slot.h);
    if (!saved_h.empty()) {
      for (index_t m = 0; m < n; ++m) std::copy_n(slot.h + m * R, R, saved_h.row(rows[m]));
    }
    expand_rows<R>(rows_of(y, rows), n, y.cols(), slot.h, scale, slot.pb);
  }

  // Adds this chunk's share to the gradient panels (ga: dh^T drop(x), gb:
  // h^T dy) and drop'(dh a) to dx[rows], dh = s dy b.
  void backward(MatrixView<const float> dy, MatrixView<const float> x,
                MatrixView<const float> saved_h, const RowSet& rows, MatrixView<float> dx,
                bool want_da, bool want_db, const LoraBankSlot& slot) const {
    const index_t n = rows.count, d_in = x.cols(), d_out = dy.cols();
    const RowsOf<const float> g = rows_of(dy, rows);
    if (want_db) {
      for (index_t m = 0; m < n; ++m) std::copy_n(saved_h.row(rows[m]), R, slot.h + m * R);
      accumulate_outer<R>(g, n, d_out, slot.h, slot.gb);
    }
    if (!want_da && dx.empty()) return;
    shrink_rows<R>(g, n, d_out, slot.pb, scale, slot.dh);
    if (want_da) accumulate_outer<R>(input(x, rows, slot), n, d_in, slot.dh, slot.ga);
    if (dx.empty()) return;
    if (!mask.active) {
      expand_rows<R>(rows_of(dx, rows), n, d_in, slot.dh, 1.0f, slot.pa);
    } else {
      const MatrixView<float> t = slot.xbuf.middle_rows(0, n);
      as_eigen(t).setZero();
      expand_rows<R>(rows_of(t, RowSet{nullptr, 0, n}), n, d_in, slot.dh, 1.0f, slot.pa);
      scatter_rows<true>(t, rows, mask, dx, /*parallel=*/false);
    }
  }
};

// w (+ or -)= s b a, or with check_only, whether every such value is finite
// (returns the first offending row, or w.rows()). Row by row in chunks of
// columns; s b_i is a fixed-size 1 x R row, so merge and safe_merge compute
// identical values.
template <int R>
index_t lora_apply_delta(MatrixView<float> w, MatrixView<const float> a, MatrixView<const float> b,
                         float signed_scale, bool check_only) {
  constexpr index_t kCols = 512;
  const index_t rows = w.rows(), cols = w.cols();
  const auto am = as_eigen(a);
  const auto bm = as_eigen(b);
  index_t bad = rows;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) reduction(min : bad) if (rows * cols * R > kParallelGrain)
#endif
  for (index_t i = 0; i < rows; ++i) {
    const Eigen::Matrix<float, 1, R> coef = signed_scale * bm.row(i);
    alignas(64) float buf[kCols];
    for (index_t j = 0; j < cols; j += kCols) {
      const index_t nj = std::min(kCols, cols - j);
      Eigen::Map<Eigen::Matrix<float, 1, Eigen::Dynamic>> delta(buf, nj);
      delta.noalias() = coef.lazyProduct(am.middleCols(j, nj));
      auto wrow = as_eigen(w.row_view(i)).segment(j, nj).transpose();
      if (check_only) {
        if (!(wrow + delta).allFinite()) bad = std::min(bad, i);
      } else {
        wrow += delta;
      }
    }
  }
  return bad;
}

template <int R>
void lora_safe_merge(MatrixView<float> w, MatrixView<const float> a, MatrixView<const float> b,
                     float scale) {
  const index_t bad = lora_apply_delta<R>(w, a, b, scale, /*check_only=*/true);
  if (bad < w.rows()) {
    const auto am = as_eigen(a);
    const Eigen::Matrix<float, 1, R> coef = scale * as_eigen(b).row(bad);
    for (index_t j = 0; j < w.cols(); ++j) {
      const float delta = coef.dot(am.col(j).transpose());
      const float merged = w(bad, j) + delta;
      MOEKIT_CHECK(std::isfinite(merged), Errc::kNonFinite, "merged w(", bad, ", ", j,
                   ") would be ", merged, " (w = ", w(bad, j), ", s (b a) = ", delta,
                   "); w is unchanged");
    }
    // Found by the vectorised pass but not by the scalar one: still refuse.
    MOEKIT_FAIL(Errc::kNonFinite, "merged row ", bad, " of w would hold a non-finite value",
                "; w is unchanged");
  }
  lora_apply_delta<R>(w, a, b, scale, /*check_only=*/false);
}

template <int R>
void lora_init_block(MatrixView<float> a, MatrixView<float> b, const LoraInitConfig& c,
                     index_t d_in, index_t first_row) {
  const float spread = lora_init_spread<R>(c, d_in);
  for (index_t r = 0; r < a.rows(); ++r) {
    for (index_t j = 0; j < d_in; ++j) {
      a(r, j) = lora_init_value(c.kind, spread, c.seed,
                                static_cast<std::uint64_t>((first_row + r) * d_in + j));
    }
  }
  as_eigen(b).setZero();
}

}  // namespace detail

// ---- one adapter on a frozen linear layer ------------------------------------

// One rank-R adapter on a frozen linear layer: y = x w^T + bias + s h b^T.
// Holds only the configuration and s; weights, activations and workspace
// are caller memory.
template <LoraSpecType S>
class LoraLinear {
 public:
  static constexpr int kRank = S::rank;  // R

  // Rejects a configuration it cannot run (naming the field and value).
  // base_compute: the dtype of the frozen base product, fp32 or bf16 (see
  // "Products" at the top of this file).
  explicit LoraLinear(const LoraConfig& config, GemmDtype base_compute = GemmDtype::kFloat32)
      : config_(config), base_compute_(base_compute) {
    check_lora_config(config);
    check_training_dtype(base_compute, "base_compute");
    scale_ = lora_scale(config.alpha, kRank, config.rslora);
  }

  // The configuration, as constructed.
  const LoraConfig& config() const { return config_; }
  // The dtype of the base product, as constructed.
  GemmDtype base_compute() const { return base_compute_; }
  // s: alpha / R, or alpha / sqrt(R) with rsLoRA.
  float scale() const { return scale_; }

  // Bytes of workspace forward and backward need for n rows: h, dh (and
  // masked x rows under dropout) and the GEMM engine's buffers, one slot per
  // OpenMP thread at the time of the query (0 for n = 0).
  index_t workspace_size(index_t rows) const {
    MOEKIT_CHECK_GE(rows, 0);
    if (rows == 0) return 0;
    return scratch_bytes(rows) + gemm_workspace_size(max_threads());
  }

  // a = initial A (R x d_in), b = 0 (d_out x R); see moekit/core/lora.hpp.
  void init(MatrixView<float> a, MatrixView<float> b, const LoraInitConfig& init_config) const {
    MOEKIT_API("cpu::LoraLinear::init");
    check_adapter(a, b, "a", "b");
    OverlapCheck("cpu::LoraLinear::init").out({{a, "a"}, {b, "b"}}).check();
    detail::lora_init_block<kRank>(a, b, init_config, config_.d_in, 0);
  }

  // y = x w^T + bias + s drop(x) a^T b^T; saved_h = drop(x) a^T (or empty).
  // x: n x d_in, y: n x d_out, saved_h: n x R or empty.
  void forward(MatrixView<const float> x, const LoraWeights& weights, MatrixView<float> y,
               MatrixView<float> saved_h, const LoraStep& step,
               VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::LoraLinear::forward");
    check_view(x, "x");
    const index_t n = x.rows();
    check_shape(x, n, config_.d_in, "x");
    check_weights(weights);
    check_shape(y, n, config_.d_out, "y");
    if (!saved_h.empty()) detail::check_rank_cols(saved_h, kRank, "saved_h");
    if (!saved_h.empty()) check_shape(saved_h, n, kRank, "saved_h");
    const detail::LoraSlot slot = checked_slot(workspace, n);
    OverlapCheck overlap("cpu::LoraLinear::forward");
    overlap
        .out({{y, "y"},
              {saved_h, "saved_h"},
              {workspace.segment(0, workspace_size(n)), "workspace"}})
        .in({{x, "x"}});
    detail::add_lora_weights(overlap, weights);
    overlap.check();
    if (n == 0) return;

    detail::base_gemm(base_compute_, Op::kTrans, x, weights.w, y, slot.engine);
    if (!weights.bias.empty()) as_eigen(y).rowwise() += as_eigen(weights.bias).transpose();
    const detail::LoraKernel<kRank> k = kernel(step);
    for_each_chunk(n, k.mask.active, [&](const detail::RowSet& rows) {
      k.forward(x, rows, weights.a, weights.b, saved_h, y, slot);
    });
  }

  // Backward of forward given dy = dL/dy (n x d_out), with the saved_h and
  // LoraStep of that forward (saved_h may be empty when grads.db is). dx:
  // n x d_in (overwritten) or empty; grads: da R x d_in, db d_out x R, or empty.
  void backward(MatrixView<const float> dy, MatrixView<const float> x, const LoraWeights& weights,
                MatrixView<const float> saved_h, const LoraStep& step, MatrixView<float> dx,
                const LoraGrads& grads, VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::LoraLinear::backward");
    check_view(x, "x");
    const index_t n = x.rows();
    check_shape(x, n, config_.d_in, "x");
    check_shape(dy, n, config_.d_out, "dy");
    check_weights(weights);
    const bool want_dx = !dx.empty(), want_da = !grads.da.empty(), want_db = !grads.db.empty();
    if (want_dx) check_shape(dx, n, config_.d_in, "dx");
    if (want_da) {
      detail::check_rank_rows(grads.da, kRank, kRank, "grads.da");
      check_shape(grads.da, kRank, config_.d_in, "grads.da");
    }
    if (want_db) {
      detail::check_rank_cols(grads.db, kRank, "grads.db");
      check_shape(grads.db, config_.d_out, kRank, "grads.db");
      detail::check_rank_cols(saved_h, kRank, "saved_h");
      check_shape(saved_h, n, kRank, "saved_h");
    }
    const detail::LoraSlot slot = checked_slot(workspace, n);
    OverlapCheck overlap("cpu::LoraLinear::backward");
    overlap
        .out({{dx, "dx"},
              {grads.da, "grads.da"},
              {grads.db, "grads.db"},
              {workspace.segment(0, workspace_size(n)), "workspace"}})
        .in({{dy, "dy"}, {x, "x"}, {saved_h, "saved_h"}});
    detail::add_lora_weights(overlap, weights);
    overlap.check();

    if (n == 0 && !grads.accumulate) {
      if (want_da) as_eigen(grads.da).setZero();
      if (want_db) as_eigen(grads.db).setZero();
    }
    if (n == 0 || (!want_dx && !want_da && !want_db)) return;

    if (want_dx) detail::base_gemm(base_compute_, Op::kNone, dy, weights.w, dx, slot.engine);
    const detail::LoraKernel<kRank> k = kernel(step);
    bool add = grads.accumulate;
    for_each_chunk(n, k.mask.active, [&](const detail::RowSet& rows) {
      k.backward(dy, x, saved_h, rows, weights.a, weights.b, dx, grads.da, grads.db, add, slot);
      add = true;
    });
  }

  // w += s b a (w: d_out x d_in, the base weight).
  void merge(MatrixView<float> w, MatrixView<const float> a, MatrixView<const float> b) const {
    check_merge(w, a, b, "cpu::LoraLinear::merge");
    detail::lora_apply_delta<kRank>(w, a, b, scale_, false);
  }
  // w -= s b a: undoes merge up to one rounding per element.
  void unmerge(MatrixView<float> w, MatrixView<const float> a, MatrixView<const float> b) const {
    check_merge(w, a, b, "cpu::LoraLinear::unmerge");
    detail::lora_apply_delta<kRank>(w, a, b, -scale_, false);
  }
  // merge, but refuses (Errc::kNonFinite, w untouched) if any merged value
  // would be NaN or infinite.
  void safe_merge(MatrixView<float> w, MatrixView<const float> a, MatrixView<const float> b) const {
    check_merge(w, a, b, "cpu::LoraLinear::safe_merge");
    detail::lora_safe_merge<kRank>(w, a, b, scale_);
  }

 private:
  // Rows per chunk when dropout gathers masked copies of x.
  index_t chunk_rows() const {
    return std::clamp<index_t>((index_t{1} << 18) / config_.d_in, 16, 512);
  }

  detail::LoraSlotShape slot_shape(index_t n) const {
    if (config_.dropout > 0.0f) return {std::min(n, chunk_rows()), true};
    return {n, false};
  }

  index_t scratch_bytes(index_t n) const {
    return detail::round_up(slot_shape(n).floats(config_.d_in, kRank) * index_t{sizeof(float)},
                            detail::kSlotAlign);
  }

  // The scratch, then the engine's workspace (the rest: the engine uses as
  // many thread slots as it finds).
  detail::LoraSlot checked_slot(VectorView<std::byte> workspace, index_t n) const {
    detail::check_lora_workspace(workspace, workspace_size(n), n);
    if (n == 0) return {};
    detail::LoraSlot slot =
        slot_shape(n).carve(reinterpret_cast<float*>(workspace.data()), config_.d_in, kRank);
    const index_t skip = scratch_bytes(n);
    slot.engine = workspace.segment(skip, workspace.size() - skip);
    return slot;
  }

  detail::LoraKernel<kRank> kernel(const LoraStep& step) const {
    return {scale_,
            detail::LoraMask::make(config_.dropout, step, config_.d_in, config_.dropout_stream)
                .for_adapter(0)};
  }

  // All rows at once, or chunks of rows when dropout needs masked copies.
  template <class F>
  void for_each_chunk(index_t n, bool masked, F&& f) const {
    const index_t step = masked ? chunk_rows() : n;
    for (index_t r0 = 0; r0 < n; r0 += step) f(detail::RowSet{nullptr, r0, std::min(step, n - r0)});
  }

  void check_adapter(MatrixView<const float> a, MatrixView<const float> b, const char* a_name,
                     const char* b_name) const {
    detail::check_rank_rows(a, kRank, kRank, a_name);
    check_shape(a, kRank, config_.d_in, a_name);
    detail::check_rank_cols(b, kRank, b_name);
    check_shape(b, config_.d_out, kRank, b_name);
  }

  void check_weights(const LoraWeights& w) const {
    check_shape(w.w, config_.d_out, config_.d_in, "weights.w");
    if (!w.bias.empty()) check_shape(w.bias, config_.d_out, "weights.bias");
    check_adapter(w.a, w.b, "weights.a", "weights.b");
  }

  // `where`: the public function, for the overlap check (w is written).
  void check_merge(MatrixView<const float> w, MatrixView<const float> a, MatrixView<const float> b,
                   const char* where) const {
    check_shape(w, config_.d_out, config_.d_in, "w");
    check_adapter(a, b, "a", "b");
    OverlapCheck(where).out({{w, "w"}}).in({{a, "a"}, {b, "b"}}).check();
  }

  LoraConfig config_;
  GemmDtype base_compute_ = GemmDtype::kFloat32;
  float scale_ = 0.0f;
};

// ---- N adapters, one per row ----------------------------------------------------

// N adapters of rank R on one layer; each row of the batch carries the id of
// its adapter (-1: none). The base: when weights.w is given the bank computes
// y = x w^T + bias + adapter and dx = dy w + adapter part (rows with id -1 get
// the base only); when weights.w is empty (and bias too), y and dx already
// hold the caller's base values and the bank adds its part to them (rows with
// id -1 untouched).
template <LoraSpecType S>
class LoraBank {
 public:
  static constexpr int kRank = S::rank;  // R, the same for every adapter

  // Rejects a configuration it cannot run (naming the field and value).
  // base_compute: the dtype of the frozen base product, fp32 or bf16 (see
  // "Products" at the top of this file).
  explicit LoraBank(const LoraBankConfig& config, GemmDtype base_compute = GemmDtype::kFloat32)
      : config_(config), base_compute_(base_compute) {
    check_lora_config(config);
    check_training_dtype(base_compute, "base_compute");
    scale_ = lora_scale(config.alpha, kRank, config.rslora);
  }

  // The configuration, as constructed.
  const LoraBankConfig& config() const { return config_; }
  // The dtype of the base product, as constructed.
  GemmDtype base_compute() const { return base_compute_; }
  // s, shared by every adapter: alpha / R, or alpha / sqrt(R) with rsLoRA.
  float scale() const { return scale_; }
  // N, the adapters in the bank; row ids lie in [-1, N).
  index_t num_adapters() const { return config_.num_adapters; }

  // Rows per chunk (h and dh of a chunk, and its masked copies under
  // dropout: about 1 MiB).
  index_t chunk_rows() const {
    return std::clamp<index_t>((index_t{1} << 18) / config_.d_in, 16, 256);
  }

  // Bytes of workspace for n rows: one slot per OpenMP thread (at the time of
  // the query), each large enough for a thread's adapter panels and for one
  // of the GEMM engine's slots (the base product runs on the engine before
  // the adapters, in the same memory). A workspace with fewer slots (at
  // least one) runs on fewer threads.
  index_t workspace_size(index_t rows) const {
    MOEKIT_CHECK_GE(rows, 0);
    if (rows == 0) return 0;
    return index_t{max_threads()} * std::max(slot_bytes(), gemm_workspace_size(1));
  }

  // Stable counting sort of the rows by adapter id: order (n entries, see the
  // top of this file) and offsets (N + 1). Returns offsets[N], the rows that
  // have an adapter. Every id is checked before anything is written.
  index_t group(VectorView<const std::int32_t> ids, VectorView<index_t> order,
                VectorView<index_t> offsets) const {
    MOEKIT_API("cpu::LoraBank::group");
    check_view(ids, "ids");
    const index_t n = ids.size();
    check_shape(order, n, "order");
    check_shape(offsets, config_.num_adapters + 1, "offsets");
    check_ids(ids);
    OverlapCheck("cpu::LoraBank::group")
        .out({{order, "order"}, {offsets, "offsets"}})
        .in({{ids, "ids"}})
        .check();
    const index_t N = config_.num_adapters;
    std::fill(offsets.begin(), offsets.end(), index_t{0});
    for (index_t t = 0; t < n; ++t) {
      if (ids[t] >= 0) ++offsets[ids[t] + 1];
    }
    for (index_t i = 0; i < N; ++i) offsets[i + 1] += offsets[i];
    // offsets[i] serves as adapter i's cursor, then is shifted back.
    for (index_t t = 0; t < n; ++t) {
      if (ids[t] >= 0) order[offsets[ids[t]]++] = t;
    }
    for (index_t i = N; i > 0; --i) offsets[i] = offsets[i - 1];
    offsets[0] = 0;
    for (index_t k = offsets[N]; k < n; ++k) order[k] = -1;  // unused tail
    return offsets[N];
  }

  // Initialises every adapter: a = initial A (N R x d_in), b = 0. Adapter i's
  // A uses counters (i R + r) d_in + j, so adapter 0 matches LoraLinear::init.
  void init(MatrixView<float> a, MatrixView<float> b, const LoraInitConfig& init_config) const {
    MOEKIT_API("cpu::LoraBank::init");
    check_adapters(a, b, "a", "b");
    OverlapCheck("cpu::LoraBank::init").out({{a, "a"}, {b, "b"}}).check();
    detail::lora_init_block<kRank>(a, b, init_config, config_.d_in, 0);
  }
  // Initialises adapter i only (a new branch), as init would.
  void init_adapter(index_t adapter, MatrixView<float> a, MatrixView<float> b,
                    const LoraInitConfig& init_config) const {
    MOEKIT_API("cpu::LoraBank::init_adapter");
    check_adapters(a, b, "a", "b");
    MOEKIT_CHECK_RANGE(adapter, 0, config_.num_adapters);
    OverlapCheck("cpu::LoraBank::init_adapter").out({{a, "a"}, {b, "b"}}).check();
    detail::lora_init_block<kRank>(a_of(a, adapter), b_of(b, adapter), init_config, config_.d_in,
                                   adapter * kRank);
  }

  // y (= x w^T + bias, see above) += s drop(x_seg) a_i^T b_i^T per adapter i;
  // saved_h (n x R or empty): h of each row, 0 for rows with id -1.
  void forward(MatrixView<const float> x, const LoraRows& rows, const LoraWeights& weights,
               MatrixView<float> y, MatrixView<float> saved_h, const LoraStep& step,
               VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::LoraBank::forward");
    check_view(x, "x");
    const index_t n = x.rows();
    check_shape(x, n, config_.d_in, "x");
    check_rows(rows, n);
    check_weights(weights);
    check_shape(y, n, config_.d_out, "y");
    if (!saved_h.empty()) {
      detail::check_rank_cols(saved_h, kRank, "saved_h");
      check_shape(saved_h, n, kRank, "saved_h");
    }
    const index_t slots = checked_slots(workspace, rows, weights);
    OverlapCheck overlap("cpu::LoraBank::forward");  // every slot of the workspace may be used
    overlap.out({{y, "y"}, {saved_h, "saved_h"}, {workspace, "workspace"}})
        .in({{x, "x"},
             {rows.ids, "rows.ids"},
             {rows.order, "rows.order"},
             {rows.offsets, "rows.offsets"}});
    detail::add_lora_weights(overlap, weights);
    overlap.check();
    if (n == 0) return;

    if (!weights.w.empty()) {
      detail::base_gemm(base_compute_, Op::kTrans, x, weights.w, y, workspace);
      if (!weights.bias.empty()) as_eigen(y).rowwise() += as_eigen(weights.bias).transpose();
    }
    if (!saved_h.empty()) {
      for (index_t t = 0; t < n; ++t) {
        if (rows.ids[t] < 0) as_eigen(saved_h.row_view(t)).setZero();
      }
    }
    if (slots == 0) return;  // no row has an adapter
    // Threads take equal runs of the grouped rows (a run may span segments;
    // a thread packs each adapter it meets once).
    const detail::LoraSegmentKernel<kRank> k = segment_kernel(step);
    float* base = reinterpret_cast<float*>(workspace.data());
    const index_t total = rows.offsets[config_.num_adapters];
    const int threads = static_cast<int>(
        std::min<index_t>({slots, max_threads(), std::max<index_t>(1, total / kMinRowsPerThread)}));
    const auto run = [&](int tid, int nth) {
      detail::LoraBankSlot slot = slot_at(base, tid);
      for_each_chunk(rows, total * tid / nth, total * (tid + 1) / nth,
                     [&](index_t i, const detail::RowSet& set) {
                       const detail::LoraSegmentKernel<kRank> ki = k.for_adapter(i);
                       ki.pack(i, a_of(weights.a, i), b_of(weights.b, i), slot);
                       ki.forward(x, set, saved_h, y, slot);
                     });
    };
    if (threads > 1) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
      run(thread_id(), num_threads());
#endif
    } else {
      run(0, 1);
    }
  }

  // Backward of forward given dy = dL/dy (n x d_out), with the rows, saved_h
  // and LoraStep of that forward (saved_h may be empty when grads.db is).
  // dx: n x d_in or empty (overwritten when weights.w is given, else added
  // to); grads: da N R x d_in, db N d_out x R, or empty.
  void backward(MatrixView<const float> dy, MatrixView<const float> x, const LoraRows& rows,
                const LoraWeights& weights, MatrixView<const float> saved_h, const LoraStep& step,
                MatrixView<float> dx, const LoraGrads& grads,
                VectorView<std::byte> workspace) const {
    MOEKIT_API("cpu::LoraBank::backward");
    check_view(x, "x");
    const index_t n = x.rows();
    const index_t N = config_.num_adapters;
    check_shape(x, n, config_.d_in, "x");
    check_shape(dy, n, config_.d_out, "dy");
    check_rows(rows, n);
    check_weights(weights);
    const bool want_dx = !dx.empty(), want_da = !grads.da.empty(), want_db = !grads.db.empty();
    if (want_dx) check_shape(dx, n, config_.d_in, "dx");
    if (want_da) {
      detail::check_rank_rows(grads.da, N * kRank, kRank, "grads.da");
      check_shape(grads.da, N * kRank, config_.d_in, "grads.da");
    }
    if (want_db) {
      detail::check_rank_cols(grads.db, kRank, "grads.db");
      check_shape(grads.db, N * config_.d_out, kRank, "grads.db");
      detail::check_rank_cols(saved_h, kRank, "saved_h");
      check_shape(saved_h, n, kRank, "saved_h");
    }
    const index_t slots = checked_slots(workspace, rows, weights);
    OverlapCheck overlap("cpu::LoraBank::backward");
    overlap
        .out({{dx, "dx"}, {grads.da, "grads.da"}, {grads.db, "grads.db"}, {workspace, "workspace"}})
        .in({{dy, "dy"},
             {x, "x"},
             {saved_h, "saved_h"},
             {rows.ids, "rows.ids"},
             {rows.order, "rows.order"},
             {rows.offsets, "rows.offsets"}});
    detail::add_lora_weights(overlap, weights);
    overlap.check();

    if (!grads.accumulate) {  // adapters without rows
      for (index_t i = 0; i < N; ++i) {
        if (rows.offsets[i + 1] != rows.offsets[i]) continue;
        if (want_da) as_eigen(a_of(grads.da, i)).setZero();
        if (want_db) as_eigen(b_of(grads.db, i)).setZero();
      }
    }
    if (n == 0) return;
    if (want_dx && !weights.w.empty()) {
      detail::base_gemm(base_compute_, Op::kNone, dy, weights.w, dx, workspace);
    }
    if (slots == 0 || (!want_dx && !want_da && !want_db)) return;

    const detail::LoraSegmentKernel<kRank> k = segment_kernel(step);
    float* base = reinterpret_cast<float*>(workspace.data());
    const VectorView<const index_t> off = rows.offsets;
    // Rows [begin, end) of adapter i's segment into the slot's gradient panels.
    const auto run_rows = [&](index_t i, index_t begin, index_t end, detail::LoraBankSlot& slot) {
      const detail::LoraSegmentKernel<kRank> ki = k.for_adapter(i);
      ki.pack(i, a_of(weights.a, i), b_of(weights.b, i), slot);
      if (want_da) std::fill_n(slot.ga, detail::panel_floats<kRank>(config_.d_in), 0.0f);
      if (want_db) std::fill_n(slot.gb, detail::panel_floats<kRank>(config_.d_out), 0.0f);
      const index_t c = chunk_rows();
      for (index_t k0 = begin; k0 < end; k0 += c) {
        ki.backward(dy, x, saved_h, detail::RowSet{rows.order.data(), k0, std::min(c, end - k0)},
                    dx, want_da, want_db, slot);
      }
    };
    const auto store_grads = [&](index_t i, const detail::LoraBankSlot& slot, bool add) {
      if (want_da) detail::unpack_panel<kRank>(slot.ga, 1.0f, add, a_of(grads.da, i));
      if (want_db)
        detail::unpack_panel<kRank, /*kTransposed=*/true>(slot.gb, scale_, add, b_of(grads.db, i));
    };
    index_t busy = 0;
    for (index_t i = 0; i < N; ++i) busy += off[i + 1] > off[i];
    const int threads = static_cast<int>(std::min<index_t>(slots, max_threads()));
    if (threads > 1 && busy >= threads) {
      // Adapters in parallel, each whole on one thread.
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
      {
        detail::LoraBankSlot slot = slot_at(base, thread_id());
#pragma omp for schedule(dynamic, 1)
        for (index_t i = 0; i < N; ++i) {
          if (off[i + 1] == off[i]) continue;
          run_rows(i, off[i], off[i + 1], slot);
          store_grads(i, slot, grads.accumulate);
        }
      }
#endif
      return;
    }
    // Adapters in turn, each split over the threads; the partial gradients
    // are summed in thread order.
    for (index_t i = 0; i < N; ++i) {
      const index_t len = off[i + 1] - off[i];
      if (len == 0) continue;
      const int nth = static_cast<int>(std::clamp<index_t>(len / kMinRowsPerThread, 1, threads));
      const auto run = [&](int tid) {
        detail::LoraBankSlot slot = slot_at(base, tid);
        run_rows(i, off[i] + len * tid / nth, off[i] + len * (tid + 1) / nth, slot);
      };
      if (nth > 1) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(nth)
        run(thread_id());
#endif
      } else {
        run(0);
      }
      for (int tid = 0; tid < nth; ++tid) {
        store_grads(i, slot_at(base, tid), tid > 0 || grads.accumulate);
      }
    }
  }

  // Adapter i merged into (or out of) a base weight w (d_out x d_in): for
  // serving one task at the speed of the base layer. a, b: the whole bank.
  void merge(index_t adapter, MatrixView<float> w, MatrixView<const float> a,
             MatrixView<const float> b) const {
    check_merge(adapter, w, a, b, "cpu::LoraBank::merge");
    detail::lora_apply_delta<kRank>(w, a_of(a, adapter), b_of(b, adapter), scale_, false);
  }
  // Adapter i taken out of w again: undoes merge up to one rounding per element.
  void unmerge(index_t adapter, MatrixView<float> w, MatrixView<const float> a,
               MatrixView<const float> b) const {
    check_merge(adapter, w, a, b, "cpu::LoraBank::unmerge");
    detail::lora_apply_delta<kRank>(w, a_of(a, adapter), b_of(b, adapter), -scale_, false);
  }
  // merge, but refuses (Errc::kNonFinite, w untouched) if any merged value
  // would be NaN or infinite.
  void safe_merge(index_t adapter, MatrixView<float> w, MatrixView<const float> a,
                  MatrixView<const float> b) const {
    check_merge(adapter, w, a, b, "cpu::LoraBank::safe_merge");
    detail::lora_safe_merge<kRank>(w, a_of(a, adapter), b_of(b, adapter), scale_);
  }

 private:
  template <class T>
  static MatrixView<T> a_of(MatrixView<T> a, index_t i) {
    return a.middle_rows(i * kRank, kRank);
  }
  template <class T>
  MatrixView<T> b_of(MatrixView<T> b, index_t i) const {
    return b.middle_rows(i * config_.d_out, config_.d_out);
  }

  // Below this many rows per thread, another thread costs more than it saves.
  static constexpr index_t kMinRowsPerThread = 16;

  detail::LoraBankSlotShape<kRank> slot_shape() const {
    return {config_.d_in, config_.d_out, chunk_rows(), config_.dropout > 0.0f};
  }
  index_t slot_bytes() const { return slot_shape().floats() * index_t{sizeof(float)}; }
  detail::LoraBankSlot slot_at(float* base, int slot) const {
    return slot_shape().carve(base + slot * slot_shape().floats());
  }

  // Validates the workspace (one engine slot for the base product, one
  // adapter slot); returns the adapter slots it holds (0 when no row has an
  // adapter).
  index_t checked_slots(VectorView<std::byte> workspace, const LoraRows& rows,
                        const LoraWeights& weights) const {
    const index_t n = rows.ids.size();
    if (!weights.w.empty() && n > 0)
      detail::check_lora_workspace(workspace, gemm_workspace_size(1), n);
    const index_t adapted = rows.offsets[config_.num_adapters];
    if (adapted == 0) return 0;
    detail::check_lora_workspace(workspace, slot_bytes(), adapted);
    return workspace.size() / slot_bytes();
  }

  // The call's kernel; for_adapter(i) gives adapter i's.
  detail::LoraSegmentKernel<kRank> segment_kernel(const LoraStep& step) const {
    return {scale_,
            detail::LoraMask::make(config_.dropout, step, config_.d_in, config_.dropout_stream)};
  }

  // f(i, rows) for the chunks of positions [begin, end) of the grouped rows
  // (rows.order), chunks never crossing a segment; i is the segment's adapter.
  template <class F>
  void for_each_chunk(const LoraRows& rows, index_t begin, index_t end, F&& f) const {
    const VectorView<const index_t> off = rows.offsets;
    const index_t c = chunk_rows();
    // The first segment that ends after begin (empty segments are skipped).
    index_t i = std::upper_bound(off.begin(), off.end(), begin) - off.begin() - 1;
    for (; begin < end; ++i) {
      const index_t seg_end = std::min(end, off[i + 1]);
      while (begin < seg_end) {
        const index_t count = std::min(c, seg_end - begin);
        f(i, detail::RowSet{rows.order.data(), begin, count});
        begin += count;
      }
    }
  }

  void check_ids(VectorView<const std::int32_t> ids) const {
    for (index_t t = 0; t < ids.size(); ++t) {
      MOEKIT_CHECK(ids[t] >= -1 && ids[t] < config_.num_adapters, Errc::kOutOfRange, "ids[", t,
                   "] = ", ids[t], " is outside [-1, N = ", config_.num_adapters, ")");
    }
  }

  // ids in range, offsets a scan, and order listing each adapter's rows in
  // increasing order: O(n + N), no allocation.
  void check_rows(const LoraRows& rows, index_t n) const {
    const index_t N = config_.num_adapters;
    check_shape(rows.ids, n, "rows.ids");
    check_shape(rows.order, n, "rows.order");
    check_shape(rows.offsets, N + 1, "rows.offsets");
    check_ids(rows.ids);
    const VectorView<const index_t> off = rows.offsets;
    MOEKIT_CHECK(off[0] == 0, Errc::kInvalidArgument, "rows.offsets[0] = ", off[0], ", expected 0");
    for (index_t i = 0; i < N; ++i) {
      MOEKIT_CHECK(off[i + 1] >= off[i], Errc::kInvalidArgument, "rows.offsets decreases: offsets[",
                   i, "] = ", off[i], " > offsets[", i + 1, "] = ", off[i + 1]);
    }
    index_t adapted = 0;
    for (index_t t = 0; t < n; ++t) adapted += rows.ids[t] >= 0;
    MOEKIT_CHECK(off[N] == adapted, Errc::kInvalidArgument, "rows.offsets[", N, "] = ", off[N],
                 " but ", adapted, " rows have an adapter id");
    // Each segment's entries carry its id and increase strictly, so they are
    // distinct; with the total equal to the rows that have an id, every such
    // row is listed exactly once.
    for (index_t i = 0; i < N; ++i) {
      for (index_t k = off[i]; k < off[i + 1]; ++k) {
        const index_t t = rows.order[k];
        MOEKIT_CHECK(t >= 0 && t < n, Errc::kOutOfRange, "rows.order[", k, "] = ", t,
                     " is outside [0, n = ", n, ")");
        MOEKIT_CHECK(rows.ids[t] == i, Errc::kInvalidArgument, "rows.order[", k, "] = ", t,
                     " lies in adapter ", i, "'s segment but ids[", t, "] = ", rows.ids[t]);
        MOEKIT_CHECK(k == off[i] || rows.order[k - 1] < t, Errc::kInvalidArgument,
                     "rows.order is not increasing within adapter ", i, ": order[", k - 1,
                     "] = ", rows.order[k - 1], ", order[", k, "] = ", t);
      }
    }
  }

  void check_adapters(MatrixView<const float> a, MatrixView<const float> b, const char* a_name,
                      const char* b_name) const {
    const index_t N = config_.num_adapters;
    detail::check_rank_rows(a, N * kRank, kRank, a_name);
    check_shape(a, N * kRank, config_.d_in, a_name);
    detail::check_rank_cols(b, kRank, b_name);
    check_shape(b, N * config_.d_out, kRank, b_name);
  }

  void check_weights(const LoraWeights& w) const {
    // A default (null, 0 x 0) w means "no base"; anything else must fit.
    if (w.w.data() != nullptr || w.w.rows() != 0 || w.w.cols() != 0) {
      check_shape(w.w, config_.d_out, config_.d_in, "weights.w");
    }
    if (!w.bias.empty()) {
      MOEKIT_CHECK(!w.w.empty(), Errc::kInvalidArgument,
                   "weights.bias is given but weights.w is empty (the bank adds the bias only "
                   "when it computes the base)");
      check_shape(w.bias, config_.d_out, "weights.bias");
    }
    check_adapters(w.a, w.b, "weights.a", "weights.b");
  }

  void check_merge(index_t adapter, MatrixView<const float> w, MatrixView<const float> a,
                   MatrixView<const float> b, const char* where) const {
    MOEKIT_CHECK_RANGE(adapter, 0, config_.num_adapters);
    check_shape(w, config_.d_out, config_.d_in, "w");
    check_adapters(a, b, "a", "b");
    OverlapCheck(where).out({{w, "w"}}).in({{a, "a"}, {b, "b"}}).check();
  }

  LoraBankConfig config_;
  GemmDtype base_compute_ = GemmDtype::kFloat32;
  float scale_ = 0.0f;
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
