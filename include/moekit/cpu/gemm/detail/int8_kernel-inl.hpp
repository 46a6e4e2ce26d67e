// int8 GEMM on vector units (not AMX), the driver written once and included
// into each ISA namespace (no include guard, on purpose: see
// moekit/cpu/vec.hpp). Needs epilogue-inl.hpp first, and from the namespace
// its tile kernel:
//
//   template <int MR, int NB, bool kOffsetA>
//   void int8_tile(index_t kq, const std::int8_t* a, const std::int8_t* b,
//                  index_t b_stride, std::int32_t* sums, bool resume);
//
// which adds the kq quads of the MR-row A panel (quad (q, i) at [4 (MR q + i)])
// times the B blocks (gemm/packed_matrix.hpp's int8 layout, `b_stride` bytes
// apart) to the MR x 16 NB int32 tile `sums` (row-major, from 0 unless
// `resume`). With kOffsetA the panel holds a + 128 as unsigned bytes (the
// VPDPBUSD form); the driver subtracts 128 x the column sums at the end.
// int32 sums are exact (K <= kInt8MaxK), so every int8 path gives the same
// bits.

// Quantized op(A) rows [i0, i0 + rows) x k [k0, k0 + kb) into MR-row quad
// panels (panel p at dst + p MR kb_pad bytes), zero past `rows` and kb.
// `scales` are the item's row scales (int8_row_scales) from row i0 - it.m0.
template <int MR, bool kOffsetA>
MOEKIT_KERNEL_TARGET void pack_a_quads(const detail::GemmItem& it, index_t i0, index_t rows,
                                       index_t k0, index_t kb, index_t kb_pad, const float* scales,
                                       std::int8_t* dst) {
  static_assert(MR <= kF32x16Lanes);
  const index_t first = i0 - it.m0;
  for (index_t p = 0; p * MR < rows; ++p) {
    std::int8_t* panel = dst + p * MR * kb_pad;
    const int valid = static_cast<int>(rows - p * MR < MR ? rows - p * MR : MR);
    std::int8_t q[kF32x16Lanes];
    if (it.op_a == Op::kTrans) {  // each k: MR consecutive rows' values
      float inv[kF32x16Lanes] = {};
      for (int i = 0; i < valid; ++i) inv[i] = scales[2 * (first + p * MR + i) + 1];
      const F32x16 inverse = load(inv);
      for (index_t k = 0; k < kb; ++k) {
        quantize16(q, load_partial(detail::a_element(it, i0 + p * MR, k0 + k), valid), inverse);
        for (int i = 0; i < MR; ++i) panel[4 * ((k / 4) * MR + i) + k % 4] = q[i];
      }
    } else {
      for (int i = 0; i < MR; ++i) {
        if (i >= valid) {
          for (index_t k = 0; k < kb; ++k) panel[4 * ((k / 4) * MR + i) + k % 4] = 0;
          continue;
        }
        const F32x16 inverse = set1(scales[2 * (first + p * MR + i) + 1]);
        const float* src = detail::a_element(it, i0 + p * MR + i, k0);
        for (index_t k = 0; k < kb; k += kF32x16Lanes) {
          const int n = static_cast<int>(kb - k < kF32x16Lanes ? kb - k : kF32x16Lanes);
          quantize16(q, n == kF32x16Lanes ? load(src + k) : load_partial(src + k, n), inverse);
          for (int t = 0; t < n; ++t) panel[4 * (((k + t) / 4) * MR + i) + (k + t) % 4] = q[t];
        }
      }
    }
    for (index_t k = kb; k < kb_pad; ++k)
      for (int i = 0; i < MR; ++i) panel[4 * ((k / 4) * MR + i) + k % 4] = 0;
    if constexpr (kOffsetA) {  // a + 128 as an unsigned byte: flip the sign bit
      for (index_t t = 0; t < MR * kb_pad; ++t)
        panel[t] = static_cast<std::int8_t>(static_cast<std::uint8_t>(panel[t]) ^ 0x80U);
    }
  }
}

// One int8 item (B packed) on this path's tile kernel, MR x 16 NB tiles.
template <int MR, int NB, bool kOffsetA>
MOEKIT_KERNEL_TARGET void int8_item(const detail::GemmItem& it, const detail::GemmSlot& slot) {
  constexpr int NR = NB * kF32x16Lanes;
  const index_t kc = detail::kInt8Kc;
  const index_t passes = detail::reduction_passes(it.k, kc);
  const index_t tile_cols = detail::ceil_div(it.cols, NR);
  std::int8_t* const a_pack = reinterpret_cast<std::int8_t*>(slot.a);
  std::int32_t* const partial = reinterpret_cast<std::int32_t*>(slot.partial);
  int8_row_scales(it, slot.row_scales);
  const float* col_scales = it.packed.col_scales + it.n0;
  const std::int32_t* col_sums = it.packed.col_sums + it.n0;
  for (index_t pass = 0; pass < passes; ++pass) {
    const index_t pc = pass * kc;
    const index_t kb = it.k - pc < kc ? it.k - pc : kc;
    const index_t kb_pad = detail::round_up(kb, 4);
    const bool final = pass + 1 == passes;
    const std::int8_t* b =
        kb == 0 ? nullptr
                : reinterpret_cast<const std::int8_t*>(
                      it.packed.data + it.n0 / detail::kBlockCols * it.packed.block_stride) +
                      pc * detail::kBlockCols;
    for (index_t ic = 0; ic < it.rows; ic += detail::kGemmMc) {
      const index_t mb = it.rows - ic < detail::kGemmMc ? it.rows - ic : detail::kGemmMc;
      if (kb > 0)
        pack_a_quads<MR, kOffsetA>(it, it.m0 + ic, mb, pc, kb, kb_pad, slot.row_scales, a_pack);
      for (index_t jt = 0; jt < tile_cols; ++jt) {
        for (index_t ir = 0; ir < mb; ir += MR) {
          std::int32_t* sums = partial + ((ic + ir) / MR * tile_cols + jt) * MR * NR;
          int8_tile<MR, NB, kOffsetA>(kb_pad / 4, a_pack + ir * kb_pad,
                                      kb == 0 ? b : b + jt * NB * it.packed.block_stride,
                                      it.packed.block_stride, sums, pass > 0);
          if (!final) continue;
          const TileOut out = tile_out(it, ic + ir, jt * NR, mb - ir, MR, NR);
          if constexpr (kOffsetA) {  // sum (a + 128) b = sum a b + 128 sum b, mod 2^32
            for (int i = 0; i < out.rows; ++i)
              for (int j = 0; j < out.cols; ++j)
                sums[i * NR + j] = static_cast<std::int32_t>(
                    static_cast<std::uint32_t>(sums[i * NR + j]) -
                    128U * static_cast<std::uint32_t>(col_sums[jt * NR + j]));
          }
          write_int8_tile(sums, NR, slot.row_scales + 2 * (ic + ir), col_scales + jt * NR, out);
        }
      }
    }
  }
}
