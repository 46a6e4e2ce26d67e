// fp32 and bf16 GEMM on vector FMA units, written once over F32x16 and
// included into each ISA namespace (no include guard, on purpose: see
// moekit/cpu/vec.hpp). Needs epilogue-inl.hpp first, and from the namespace
//
//   void transpose8(const float* src, index_t ld, int rows, int cols, float* dst,
//                   index_t stride);
//
// which writes, for t < cols, dst[stride t + r] = src[ld r + t] for r < rows
// and 0 for rows <= r < 8 (all 8 lanes: a stride below 8 overlaps the next
// row, which a later store rewrites). Data movement only.
//
// Every element is one fused chain over k in order, from +0:
//   s = fma(a[k], b[k], s) for k = 0, 1, ..., K - 1
// (bf16: a and b rounded to bf16 first; their products are exact in fp32).
// Reduction passes of kc resume the chain from the sums they stored, so the
// chain, and with it every bit of the result, depends on K alone: not on the
// register blocking MR x NR (which differs per path), the cache blocking, the
// rows around the element, or the thread that computed it.

// The B panel the kernels read: 16-column blocks `b_stride` elements apart;
// fp32 (k, j) at [16 k + j], bf16 pairs (k, j) at [32 (k / 2) + 2 j + k % 2].
template <bool kBf16>
using FmaPanel = std::conditional_t<kBf16, std::uint16_t, float>;
template <bool kBf16>
constexpr index_t fma_panel_index(index_t k, index_t j) {
  return kBf16 ? 32 * (k / 2) + 2 * j + k % 2 : 16 * k + j;
}

// One MR x (16 NB) tile over kb reductions (kb even for bf16). a: the packed
// A panel, (k, i) at [MR k + i]. The sums start from 0 or, if `resume`, from
// `sums`; they end in `sums` or, when `out` is given (the final pass), in C
// through the output rule.
template <int MR, int NB, bool kBf16>
MOEKIT_KERNEL_TARGET void fma_tile(index_t kb, const float* a, const FmaPanel<kBf16>* b,
                                   index_t b_stride, float* sums, bool resume, const TileOut* out) {
  F32x16 acc[std::size_t{MR}][std::size_t{NB}];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j)
      acc[i][j] = resume ? load(sums + (i * NB + j) * kF32x16Lanes) : zero();
  }
  if constexpr (kBf16) {
    for (index_t k = 0; k < kb; k += 2) {
      F32x16 even[std::size_t{NB}], odd[std::size_t{NB}];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) load_bf16_pairs(b + j * b_stride + k * 16, even[j], odd[j]);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const F32x16 a0 = set1(a[k * MR + i]), a1 = set1(a[(k + 1) * MR + i]);
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[i][j] = fmadd(a1, odd[j], fmadd(a0, even[j], acc[i][j]));
      }
    }
  } else {
    for (index_t k = 0; k < kb; ++k) {
      F32x16 bv[std::size_t{NB}];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) bv[j] = load(b + j * b_stride + k * 16);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const F32x16 av = set1(a[k * MR + i]);
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[i][j] = fmadd(av, bv[j], acc[i][j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      if (out == nullptr) {
        store(sums + (i * NB + j) * kF32x16Lanes, acc[i][j]);
      } else if (i < out->rows && j * kF32x16Lanes < out->cols) {
        write_c(out->c + i * out->ldc + j * kF32x16Lanes, out->cols - j * kF32x16Lanes, acc[i][j],
                out->alpha, out->beta);
      }
    }
  }
}

// op(A) rows [i0, i0 + rows) x k [k0, k0 + kb) into MR-row panels, panel p
// at dst + p MR kb_pad with (k, i) at [MR k + i]; rows past `rows` and k in
// [kb, kb_pad) are zero; bf16 rounds every value.
template <int MR, bool kBf16>
MOEKIT_KERNEL_TARGET void pack_a_panels(const detail::GemmItem& it, index_t i0, index_t rows,
                                        index_t k0, index_t kb, index_t kb_pad, float* dst) {
  static_assert(MR <= kF32x16Lanes);
  const index_t panels = detail::ceil_div(rows, MR);
  if (it.op_a == Op::kTrans) {
    // Rows of the stored matrix hold MR consecutive values of each panel:
    // copy each row once, left to right.
    for (index_t k = 0; k < kb; ++k) {
      const float* src = detail::a_element(it, i0, k0 + k);
      for (index_t p = 0; p < panels; ++p) {
        float* out = dst + p * MR * kb_pad + k * MR;
        if (rows - p * MR >= MR) {
          std::memcpy(out, src + p * MR, sizeof(float) * std::size_t{MR});
        } else {
          for (index_t i = 0; i < MR; ++i) out[i] = p * MR + i < rows ? src[p * MR + i] : 0.0f;
        }
      }
    }
    if constexpr (kBf16) {
      for (index_t x = 0; x < panels * MR * kb_pad; x += kF32x16Lanes) {
        const int n = static_cast<int>(
            panels * MR * kb_pad - x < kF32x16Lanes ? panels * MR * kb_pad - x : kF32x16Lanes);
        store_partial(dst + x, round_bf16(load_partial(dst + x, n)), n);
      }
    }
  } else {
    for (index_t p = 0; p < panels; ++p) {
      float* panel = dst + p * MR * kb_pad;
      const int valid = static_cast<int>(rows - p * MR < MR ? rows - p * MR : MR);
      // Rows of A, 8 at a time, transposed straight into the panel. A group's
      // stores reach 8 lanes past its start, into the next group or the next
      // row of the panel, so the groups go from the last to the first (the
      // slot's A buffer has room for the last overhang).
      for (int g = (MR - 1) / 8 * 8; g >= 0; g -= 8) {
        const int group_rows = valid - g < 0 ? 0 : valid - g < 8 ? valid - g : 8;
        const float* src = group_rows > 0 ? detail::a_element(it, i0 + p * MR + g, k0) : nullptr;
        for (index_t k = 0; k < kb; k += 8) {
          const int cols = static_cast<int>(kb - k < 8 ? kb - k : 8);
          transpose8(group_rows > 0 ? src + k : nullptr, it.lda, group_rows, cols,
                     panel + k * MR + g, MR);
        }
      }
      if constexpr (kBf16) {
        for (index_t x = 0; x < MR * kb; x += kF32x16Lanes) {
          const int n = static_cast<int>(MR * kb - x < kF32x16Lanes ? MR * kb - x : kF32x16Lanes);
          store_partial(panel + x, round_bf16(load_partial(panel + x, n)), n);
        }
      }
    }
  }
  for (index_t p = 0; p < panels; ++p)
    for (index_t k = kb; k < kb_pad; ++k)
      for (int i = 0; i < MR; ++i) dst[p * MR * kb_pad + k * MR + i] = 0.0f;
}

// Columns of block blk (16 wide) inside `cols` columns.
constexpr int block_cols(index_t cols, index_t blk) {
  const index_t c0 = blk * detail::kBlockCols;
  return static_cast<int>(cols - c0 <= 0                   ? 0
                          : cols - c0 < detail::kBlockCols ? cols - c0
                                                           : detail::kBlockCols);
}

// One row k of a block: 16 values into the FmaPanel layout.
template <bool kBf16>
MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void store_panel_row(FmaPanel<kBf16>* block, index_t k,
                                                              F32x16 v) {
  if constexpr (kBf16) {
    std::uint16_t bits[kF32x16Lanes];
    store_bf16(bits, v);
    for (index_t j = 0; j < detail::kBlockCols; ++j) block[fma_panel_index<true>(k, j)] = bits[j];
  } else {
    store(block + k * detail::kBlockCols, v);
  }
}

// op(B) k [k0, k0 + kb) x columns [n0, n0 + cols) into the FmaPanel layout,
// `blocks` blocks of kb_pad rows (columns past `cols` and rows past kb zero).
template <bool kBf16>
MOEKIT_KERNEL_TARGET void pack_b_panels(const detail::GemmItem& it, index_t n0, index_t cols,
                                        index_t blocks, index_t k0, index_t kb, index_t kb_pad,
                                        FmaPanel<kBf16>* dst) {
  constexpr index_t kCols = detail::kBlockCols;
  const index_t block_size = kb_pad * kCols;
  if (it.op_b == Op::kNone) {
    // Rows of B: each read once, left to right, 16 values to each block.
    for (index_t k = 0; k < kb; ++k) {
      const float* src = detail::b_element(it, k0 + k, n0);
      for (index_t blk = 0; blk < blocks; ++blk) {
        const int valid = block_cols(cols, blk);
        store_panel_row<kBf16>(dst + blk * block_size, k,
                               valid > 0 ? load_partial(src + blk * kCols, valid) : zero());
      }
    }
  } else {
    // Rows of W (columns of B), 8 at a time, 16 k at a time, transposed.
    alignas(64) float rows[8 * kCols];
    for (index_t blk = 0; blk < blocks; ++blk) {
      FmaPanel<kBf16>* block = dst + blk * block_size;
      const int valid = block_cols(cols, blk);
      for (index_t k = 0; k < kb; k += 8) {
        const int n = static_cast<int>(kb - k < 8 ? kb - k : 8);
        for (int h = 0; h < 2; ++h) {
          const int h_rows = valid - 8 * h < 0 ? 0 : valid - 8 * h < 8 ? valid - 8 * h : 8;
          const float* src =
              h_rows > 0 ? detail::b_element(it, k0 + k, n0 + blk * kCols + 8 * h) : nullptr;
          if constexpr (kBf16) {
            transpose8(src, it.ldb, h_rows, n, rows + 8 * h, kCols);
          } else {  // fp32: straight into the block
            transpose8(src, it.ldb, h_rows, n, block + k * kCols + 8 * h, kCols);
          }
        }
        if constexpr (kBf16) {
          for (int t = 0; t < n; ++t) store_panel_row<true>(block, k + t, load(rows + kCols * t));
        }
      }
    }
  }
  for (index_t blk = 0; blk < blocks; ++blk)
    for (index_t k = kb; k < kb_pad; ++k) store_panel_row<kBf16>(dst + blk * block_size, k, zero());
}

// One item (detail::GemmItem) on this path's FMA kernel, MR x 16 NB tiles.
template <int MR, int NB, bool kBf16>
MOEKIT_KERNEL_TARGET void fma_item(const detail::GemmItem& it, const detail::GemmSlot& slot) {
  constexpr int NR = NB * kF32x16Lanes;
  using Panel = FmaPanel<kBf16>;
  const index_t kc = detail::kFmaKc;
  const index_t passes = detail::reduction_passes(it.k, kc);
  const index_t tile_cols = detail::ceil_div(it.cols, NR);
  const index_t row_tiles = detail::ceil_div(it.rows, MR);  // partial sums: tiles in loop order
  const index_t blocks = tile_cols * NB;
  float* const a_pack = reinterpret_cast<float*>(slot.a);
  float* const partial = reinterpret_cast<float*>(slot.partial);
  for (index_t pass = 0; pass < passes; ++pass) {
    const index_t pc = pass * kc;
    const index_t kb = it.k - pc < kc ? it.k - pc : kc;
    const index_t kb_pad = kBf16 ? detail::round_up(kb, 2) : kb;
    const bool final = pass + 1 == passes;
    const Panel* b = nullptr;
    index_t b_stride = 0;  // elements
    if (kb == 0) {
      // K = 0: no reduction; the tiles write alpha 0 + beta C.
    } else if (it.b_packed) {
      b = reinterpret_cast<const Panel*>(it.packed.data +
                                         it.n0 / detail::kBlockCols * it.packed.block_stride) +
          pc * detail::kBlockCols;
      b_stride = it.packed.block_stride / index_t{sizeof(Panel)};
    } else {
      Panel* packed = reinterpret_cast<Panel*>(slot.b);
      pack_b_panels<kBf16>(it, it.n0, it.cols, blocks, pc, kb, kb_pad, packed);
      b = packed;
      b_stride = kb_pad * detail::kBlockCols;
    }
    for (index_t ic = 0; ic < it.rows; ic += detail::kGemmMc) {
      const index_t mb = it.rows - ic < detail::kGemmMc ? it.rows - ic : detail::kGemmMc;
      if (kb > 0) pack_a_panels<MR, kBf16>(it, it.m0 + ic, mb, pc, kb, kb_pad, a_pack);
      for (index_t jt = 0; jt < tile_cols; ++jt) {
        for (index_t ir = 0; ir < mb; ir += MR) {
          const TileOut out = tile_out(it, ic + ir, jt * NR, mb - ir, MR, NR);
          fma_tile<MR, NB, kBf16>(kb_pad, a_pack + ir * kb_pad,
                                  kb == 0 ? b : b + jt * NB * b_stride, b_stride,
                                  partial + (jt * row_tiles + (ic + ir) / MR) * MR * NR, pass > 0,
                                  final ? &out : nullptr);
        }
      }
    }
  }
}
