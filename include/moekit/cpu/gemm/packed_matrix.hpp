#pragma once
// PackedMatrix: frozen weights packed once for the GEMM engine, in fp32,
// bf16 or int8, and kept packed between calls (moekit/cpu/gemm/gemm.hpp).
//
// It holds B of C = alpha op(A) B + beta C for `groups` matrices at once (the
// experts of a layer), packed from W with B_g = op(W_g), where W stacks the
// groups along its rows: for a torch-style weight W (N x K per group, rows =
// output channels) pack with Op::kTrans (B_g = W_g^T, K x N); Op::kNone packs
// B_g = W_g as it is (K x N per group).
//
// Layout (the same for every CPU path, so one packed object serves them all):
// per group, N padded to a multiple of 32 in column blocks of 16, each block
// holding K' rows:
//   kFloat32   K' = K,                 element (k, j) at [16 k + j]
//   kBfloat16  K' = K rounded up to 32, pairs: (k, j) at [32 (k / 2) + 2 j + k % 2]
//              (AMX's VNNI layout for TDPBF16PS's B tile)
//   kInt8      K' = K rounded up to 64, quads: (k, j) at [64 (k / 4) + 4 j + k % 4]
//              (TDPBSSD's and VPDPBUSD's B layout)
// Padding is zero. bf16 values are rounded from fp32 as VCVTNEPS2BF16 does
// (moekit/cpu/vec.hpp). int8 weights get one symmetric scale per output
// column: scale = max |B(:, n)| / 127, q = round(B * (127 / max)) clamped to
// [-127, 127]; or come quantized already (from_int8). int8 also keeps each
// column's sum of q (the AVX512-VNNI kernels' +128 offset compensation).
//
// Packing allocates (once); the GEMM calls that read a PackedMatrix do not.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/gemm/common.hpp"
#include "moekit/cpu/vec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

class PackedMatrix {
 public:
  PackedMatrix() = default;

  // Packs B_g = op(W_g) for g < groups; W has groups x (rows per group) rows.
  PackedMatrix(GemmDtype dtype, Op op, MatrixView<const float> w, index_t groups = 1) {
    MOEKIT_CHECK_ARG(is_gemm_dtype(dtype), "dtype = ", static_cast<int>(dtype),
                     " is not a GemmDtype");
    init(dtype, op, w.rows(), w.cols(), groups, "w");
    check_view(w, "w");
    for (index_t g = 0; g < groups_; ++g) pack_group(source(w, op, g), g);
  }

  // int8 weights quantized by the caller: B_g = op(Q_g), output column n of
  // group g scaled by scales[g N + n].
  static PackedMatrix from_int8(Op op, MatrixView<const std::int8_t> q,
                                VectorView<const float> scales, index_t groups = 1) {
    PackedMatrix p;
    p.init(GemmDtype::kInt8, op, q.rows(), q.cols(), groups, "q");
    check_view(q, "q");
    check_shape(scales, groups * p.n_, "scales");
    for (index_t g = 0; g < groups; ++g) {
      for (index_t n = 0; n < p.n_; ++n) {
        for (index_t k = 0; k < p.k_; ++k) {
          const std::int8_t v = op == Op::kTrans ? q(g * p.n_ + n, k) : q(g * p.k_ + k, n);
          MOEKIT_CHECK(v != -128, Errc::kInvalidArgument, "q holds -128 (group ", g, ", column ", n,
                       ", row ", k, "); int8 weights are symmetric, in [-127, 127]");
          *p.at<std::int8_t>(g, k, n) = v;
          p.sums_of(g)[n] += v;
        }
        p.scales_of(g)[n] = scales[g * p.n_ + n];
      }
    }
    return p;
  }

  GemmDtype dtype() const { return dtype_; }
  index_t k() const { return k_; }            // rows of each B_g
  index_t n() const { return n_; }            // columns of each B_g
  index_t groups() const { return groups_; }  // 0: default-constructed, nothing packed
  // Bytes held (panels, and for int8 the scales and sums).
  index_t bytes() const { return static_cast<index_t>(storage_.size() * sizeof(Chunk)); }

  // Group g's panels for the kernels.
  detail::PackedPanels panels(index_t g) const {
    detail::PackedPanels p;
    p.data = base() + g * group_bytes_;
    p.block_stride = block_bytes_;
    if (dtype_ == GemmDtype::kInt8) {
      p.col_scales = scales_of(g);
      p.col_sums = sums_of(g);
    }
    return p;
  }

  // The value the kernels use for B_g(k, n) (bf16 rounded, int8 quantized:
  // q times its scale), for tests and references.
  float value(index_t g, index_t k, index_t n) const {
    const std::byte* p = base() + offset(g, k, n);
    switch (dtype_) {
      case GemmDtype::kFloat32: {
        float f;
        std::memcpy(&f, p, sizeof f);
        return f;
      }
      case GemmDtype::kBfloat16: {
        std::uint16_t h;
        std::memcpy(&h, p, sizeof h);
        const std::uint32_t u = std::uint32_t{h} << 16;
        float f;
        std::memcpy(&f, &u, sizeof f);
        return f;
      }
      case GemmDtype::kInt8:
        return float(static_cast<std::int8_t>(std::to_integer<std::uint8_t>(*p))) * scales_of(g)[n];
    }
    return 0.0f;
  }

 private:
  struct alignas(detail::kSlotAlign) Chunk {
    std::byte bytes[detail::kSlotAlign];
  };

  void init(GemmDtype dtype, Op op, index_t rows, index_t cols, index_t groups, const char* name) {
    MOEKIT_CHECK_ARG(is_op(op), "op = ", static_cast<int>(op), " is not an Op");
    MOEKIT_CHECK_ARG(groups >= 1, "groups = ", groups, " must be at least 1");
    MOEKIT_CHECK(rows % groups == 0, Errc::kShapeMismatch, name, " has ", rows,
                 " rows, not a multiple of groups = ", groups);
    dtype_ = dtype;
    groups_ = groups;
    k_ = op == Op::kTrans ? cols : rows / groups;
    n_ = op == Op::kTrans ? rows / groups : cols;
    if (dtype == GemmDtype::kInt8) {
      MOEKIT_CHECK(k_ <= kInt8MaxK, Errc::kInvalidArgument, "int8 reduction length K = ", k_,
                   " exceeds kInt8MaxK = ", kInt8MaxK, " (int32 sums would overflow)");
    }
    const index_t elem = dtype == GemmDtype::kFloat32 ? 4 : dtype == GemmDtype::kBfloat16 ? 2 : 1;
    n_padded_ = detail::round_up(n_, detail::kPackedColAlign);
    block_bytes_ = detail::packed_k(dtype, k_) * detail::kBlockCols * elem;
    group_bytes_ =
        detail::round_up(n_padded_ / detail::kBlockCols * block_bytes_, detail::kSlotAlign);
    const index_t extras = dtype == GemmDtype::kInt8 ? groups * n_padded_ * 8 : 0;
    const index_t total = groups * group_bytes_ + extras;
    storage_.assign(static_cast<std::size_t>(detail::ceil_div(total, detail::kSlotAlign)), Chunk{});
  }

  std::byte* base() { return storage_.empty() ? nullptr : storage_.front().bytes; }
  const std::byte* base() const { return storage_.empty() ? nullptr : storage_.front().bytes; }

  // The int8 extras after the panels: each group's column scales, then sums.
  float* scales_of(index_t g) {
    return reinterpret_cast<float*>(base() + groups_ * group_bytes_) + g * n_padded_;
  }
  const float* scales_of(index_t g) const { return const_cast<PackedMatrix*>(this)->scales_of(g); }
  std::int32_t* sums_of(index_t g) {
    return reinterpret_cast<std::int32_t*>(base() + groups_ * group_bytes_ +
                                           groups_ * n_padded_ * index_t{sizeof(float)}) +
           g * n_padded_;
  }
  const std::int32_t* sums_of(index_t g) const {
    return const_cast<PackedMatrix*>(this)->sums_of(g);
  }

  // Byte offset of B_g(k, n) in the layout above.
  index_t offset(index_t g, index_t k, index_t n) const {
    const index_t j = n % detail::kBlockCols;
    const index_t in_block = dtype_ == GemmDtype::kFloat32    ? 4 * (16 * k + j)
                             : dtype_ == GemmDtype::kBfloat16 ? 2 * (32 * (k / 2) + 2 * j + k % 2)
                                                              : 64 * (k / 4) + 4 * j + k % 4;
    return g * group_bytes_ + n / detail::kBlockCols * block_bytes_ + in_block;
  }
  template <class T>
  T* at(index_t g, index_t k, index_t n) {
    return reinterpret_cast<T*>(base() + offset(g, k, n));
  }

  // Group g's B_g(k, n) read from W.
  struct Source {
    MatrixView<const float> w;
    Op op;
    index_t first_row;  // of W_g
    float at(index_t k, index_t n) const {
      return op == Op::kTrans ? w(first_row + n, k) : w(first_row + k, n);
    }
  };
  Source source(MatrixView<const float> w, Op op, index_t g) const {
    return {w, op, op == Op::kTrans ? g * n_ : g * k_};
  }

  // Stores 16 consecutive values of B_g's column n (rows k .. k + 15, zeros
  // past K) in the dtype's layout, through the portable vector operations
  // (so the rounding is the kernels'); int8 with the column's inverse scale.
  void store_column_chunk(index_t g, index_t k, index_t n, generic::F32x16 v, float inverse) {
    const index_t count = k_ - k < 16 ? k_ - k : 16;
    if (dtype_ == GemmDtype::kFloat32) {
      for (index_t t = 0; t < count; ++t) *at<float>(g, k + t, n) = v.lane[t];
    } else if (dtype_ == GemmDtype::kBfloat16) {
      std::uint16_t bits[16];
      generic::store_bf16(bits, v);
      for (index_t t = 0; t < count; ++t) *at<std::uint16_t>(g, k + t, n) = bits[t];
    } else {
      std::int8_t q[16];
      generic::store_int8(q, generic::mul(v, generic::set1(inverse)));
      for (index_t t = 0; t < count; ++t) {
        *at<std::int8_t>(g, k + t, n) = q[t];
        sums_of(g)[n] += q[t];
      }
    }
  }

  // Packs group g: column by column of B_g (a row of W for Op::kTrans, read
  // in order), the int8 scale from the column's largest magnitude first.
  void pack_group(const Source& src, index_t g) {
    generic::F32x16 chunk;
    for (index_t n = 0; n < n_; ++n) {
      float inverse = 0.0f;
      if (dtype_ == GemmDtype::kInt8) {
        float amax = 0.0f;
        for (index_t k = 0; k < k_; ++k) {
          const float v = std::fabs(src.at(k, n));
          amax = v > amax ? v : amax;
        }
        const detail::Int8Scale s = detail::int8_scale(amax);
        scales_of(g)[n] = s.scale;
        inverse = s.inverse;
      }
      for (index_t k = 0; k < k_; k += 16) {
        for (index_t t = 0; t < 16; ++t) chunk.lane[t] = k + t < k_ ? src.at(k + t, n) : 0.0f;
        store_column_chunk(g, k, n, chunk, inverse);
      }
    }
  }

  GemmDtype dtype_ = GemmDtype::kFloat32;
  index_t k_ = 0, n_ = 0, groups_ = 0, n_padded_ = 0;
  index_t block_bytes_ = 0, group_bytes_ = 0;
  std::vector<Chunk> storage_;
};

namespace detail {

// Checks a component's packed weight: `groups` groups of k x n (k, n
// unchecked when groups = 0) in `dtype`. Errors are of the public function
// `where` and name the argument `name`, the dtype's owner `dtype_of` and the
// function that packs (`packer`).
inline void check_packed_matrix(const char* where, const PackedMatrix& p, index_t groups, index_t k,
                                index_t n, GemmDtype dtype, const char* name, const char* dtype_of,
                                const char* packer) {
  if (p.groups() != groups || (groups > 0 && (p.k() != k || p.n() != n))) {
    moekit::detail::fail(Errc::kShapeMismatch, where,
                         moekit::detail::concat(name, " packs ", p.groups(), " groups of ", p.k(),
                                                " x ", p.n(), ", expected ", groups, " of ", k,
                                                " x ", n, " (", packer, ")"));
  }
  if (p.dtype() != dtype) {
    moekit::detail::fail(Errc::kInvalidArgument, where,
                         moekit::detail::concat(name, " holds ", gemm_dtype_name(p.dtype()),
                                                " but ", dtype_of, " holds ",
                                                gemm_dtype_name(dtype)));
  }
}

}  // namespace detail

}  // namespace cpu
MOEKIT_NAMESPACE_END
