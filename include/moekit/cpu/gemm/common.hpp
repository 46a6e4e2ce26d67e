#pragma once
// The GEMM engine's vocabulary (moekit/cpu/gemm/gemm.hpp is the entry point):
// the operand transposes, the compute types, the blocking of every kernel
// family and the size of the per-thread workspace slot they share.
//
// Nothing here depends on the compiler's target flags: the blocking of every
// path is a constant of this file, so a workspace sized in one translation
// unit fits a call made from any other, on any path.

#include <cstddef>
#include <cstdint>

#include "moekit/core/config.hpp"
#include "moekit/core/types.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// op(X) in C = alpha op(A) op(B) + beta C: X itself or its transpose.
enum class Op : int { kNone = 0, kTrans = 1 };

// The compute type of a product (inputs and outputs stay fp32 in memory):
//   kFloat32   fp32 products and sums
//   kBfloat16  A and B rounded to bf16, products summed in fp32
//   kInt8      A quantized per row (per token) and B per column (per output
//              channel) to int8 with symmetric scales, int32 sums, fp32 output
enum class GemmDtype : int { kFloat32 = 0, kBfloat16 = 1, kInt8 = 2 };

constexpr const char* gemm_dtype_name(GemmDtype dtype) noexcept {
  switch (dtype) {
    case GemmDtype::kFloat32:
      return "float32";
    case GemmDtype::kBfloat16:
      return "bfloat16";
    case GemmDtype::kInt8:
      return "int8";
  }
  return "unknown";
}

constexpr bool is_gemm_dtype(GemmDtype dtype) noexcept {
  return dtype == GemmDtype::kFloat32 || dtype == GemmDtype::kBfloat16 || dtype == GemmDtype::kInt8;
}
constexpr bool is_op(Op op) noexcept { return op == Op::kNone || op == Op::kTrans; }

// The largest reduction length of an int8 product: int32 sums of K products
// of magnitude at most 127 * 127 stay exact up to K = 2^17.
inline constexpr index_t kInt8MaxK = index_t{1} << 17;

namespace detail {

constexpr index_t round_up(index_t x, index_t m) { return (x + m - 1) / m * m; }
constexpr index_t ceil_div(index_t x, index_t m) { return (x + m - 1) / m; }
// Reduction passes of kc over K (one empty pass for K = 0: C still gets
// alpha 0 + beta C).
constexpr index_t reduction_passes(index_t k, index_t kc) { return k == 0 ? 1 : ceil_div(k, kc); }

// Cache blocking shared by every path (the register blocking mr x nr is the
// kernel's own). A thread's unit of work, an item, is at most
// kGemmItemRows x kGemmNc elements of one group's C; within it rows go in
// blocks of kGemmMc (one packed A block) and the reduction in passes of the
// family's kc, whose sums wait in the slot's partial buffer between passes.
// kGemmItemRows is a multiple of every kernel's mr and kGemmNc of every nr.
inline constexpr index_t kGemmMc = 192;
inline constexpr index_t kGemmNc = 512;
inline constexpr index_t kGemmItemRows = 768;

// Reduction passes: fp32 and bf16 FMA kernels, AMX bf16 (a multiple of the
// tile's 32), int8 (a multiple of AMX-INT8's 64).
inline constexpr index_t kFmaKc = 256;
inline constexpr index_t kAmxBf16Kc = 512;
inline constexpr index_t kInt8Kc = 1024;

// Packed B: column blocks of 16, N padded to a multiple of 32 (two blocks:
// the widest kernels read block pairs); K padded per dtype to the AMX tile's
// reduction step (bf16 pairs: 32, int8 quads: 64).
inline constexpr index_t kBlockCols = 16;
inline constexpr index_t kPackedColAlign = 32;
constexpr index_t packed_k(GemmDtype dtype, index_t k) {
  return dtype == GemmDtype::kBfloat16 ? round_up(k, 32)
         : dtype == GemmDtype::kInt8   ? round_up(k, 64)
                                       : k;
}

// One thread's workspace slot: the packed A block (with room for the packing
// routines' last full-vector store), the B chunk packed per call, the partial
// sums of an item (contiguous tiles: measured faster than keeping them in C,
// whose rows may alias in the L1 cache), and an item's row scales (int8).
inline constexpr index_t kSlotAlign = 64;
inline constexpr index_t kSlotABytes = kGemmMc * kFmaKc * 4 + kSlotAlign;  // mc x kc, every family
inline constexpr index_t kSlotBBytes = kFmaKc * kGemmNc * 4;  // fp32 per-call chunk (bf16 AMX:
                                                              // kAmxBf16Kc x nc x 2, equal)
inline constexpr index_t kSlotPartialBytes = kGemmItemRows * kGemmNc * 4;
inline constexpr index_t kSlotScaleBytes = round_up(kGemmItemRows * 2 * 4, kSlotAlign);
inline constexpr index_t kSlotBytes =
    kSlotABytes + kSlotBBytes + kSlotPartialBytes + kSlotScaleBytes;
static_assert(kGemmMc * kAmxBf16Kc * 2 <= kSlotABytes && kGemmMc * kInt8Kc <= kSlotABytes);
static_assert(kAmxBf16Kc * kGemmNc * 2 <= kSlotBBytes);
static_assert(kGemmItemRows % 96 == 0 && kGemmMc % 96 == 0 && kGemmNc % 32 == 0);

// Where one thread's kernels keep their buffers (kSlotAlign-aligned).
struct GemmSlot {
  std::byte* a = nullptr;
  std::byte* b = nullptr;
  std::byte* partial = nullptr;
  float* row_scales = nullptr;  // per item row: scale, then 1 / scale
};

// B as a packed panel set (PackedMatrix::group): column blocks of 16,
// `block_stride` bytes apart, each holding K padded rows in the dtype's
// layout (see packed_matrix.hpp); int8 adds per-column scales and sums.
struct PackedPanels {
  const std::byte* data = nullptr;
  index_t block_stride = 0;
  const float* col_scales = nullptr;       // int8: N padded
  const std::int32_t* col_sums = nullptr;  // int8: sum over k of each column's int8 values
};

// One item: rows [m0, m0 + rows) x columns [n0, n0 + cols) of one group's
// C = alpha op(A) op(B) + beta C, op(A) M x K, op(B) K x N. The pointers are
// the group's whole matrices.
struct GemmItem {
  const float* a = nullptr;
  index_t lda = 0;
  Op op_a = Op::kNone;
  const float* b = nullptr;
  index_t ldb = 0;
  Op op_b = Op::kNone;
  bool b_packed = false;  // B is `packed`, not b
  PackedPanels packed{};
  float* c = nullptr;
  index_t ldc = 0;
  index_t m0 = 0, rows = 0, n0 = 0, cols = 0, k = 0;
  float alpha = 1.0f, beta = 0.0f;
};

// Element (m, k) of op(A) and (k, n) of op(B).
inline const float* a_element(const GemmItem& it, index_t m, index_t k) {
  return it.op_a == Op::kNone ? it.a + m * it.lda + k : it.a + k * it.lda + m;
}
inline const float* b_element(const GemmItem& it, index_t k, index_t n) {
  return it.op_b == Op::kNone ? it.b + k * it.ldb + n : it.b + n * it.ldb + k;
}

// The int8 scale rule, for weights and activations alike: amax / 127 and
// its inverse 127 / amax (0 and 0 for an all-zero row or column).
struct Int8Scale {
  float scale = 0.0f, inverse = 0.0f;
};
inline Int8Scale int8_scale(float amax) {
  if (!(amax > 0.0f)) return {};
  return {amax / 127.0f, 127.0f / amax};
}

}  // namespace detail

// Bytes of workspace a GEMM call needs to run on `threads` threads: one slot
// per thread (about 2.2 MiB) and alignment slack. A call given fewer slots
// than threads runs on as many threads as it has slots.
constexpr index_t gemm_workspace_size(int threads) {
  return threads < 1 ? 0 : detail::kSlotAlign + threads * detail::kSlotBytes;
}

}  // namespace cpu
MOEKIT_NAMESPACE_END
