// bf16 and int8 GEMM on AMX tiles, written once over a tile type `Tiles`
// (moekit/cpu/gemm/tiles.hpp: the instructions or their emulator) and
// included into a namespace that names it (no include guard, on purpose:
// see moekit/cpu/vec.hpp). Needs epilogue-inl.hpp and fma_kernel-inl.hpp
// first (their output rule and bf16 B packing).
//
// Tiles: C0-C3 a 2 x 2 grid of 16 x 16 fp32 (bf16) or int32 (int8) sums,
// A4-A5 two 16-row A tiles, B6-B7 two B tiles of the packed layout
// (gemm/packed_matrix.hpp), so a step covers 32 x 32 outputs and 32 (bf16)
// or 64 (int8) reductions. Between reduction passes the sums wait in the
// slot's partial buffer (tilestored / tileloadd); final sums go through the
// same output rule as every other path.

// Every tile 16 rows x 64 bytes.
inline TileConfig amx_gemm_tile_config() {
  TileConfig config;
  config.palette_id = 1;
  for (int t = 0; t < kTileCount; ++t) {
    config.rows[t] = kTileMaxRows;
    config.colsb[t] = kTileMaxColsb;
  }
  return config;
}

inline constexpr index_t kAmxTileBytes = kTileMaxRows * kTileMaxColsb;

// op(A) rows [i0, i0 + rows) x k [k0, k0 + kb) as 16-row tiles: row group
// rg, reduction tile kt at dst + (rg nkt + kt) kAmxTileBytes, each row 64
// bytes of bf16 (rounded) or int8 (quantized with the item's row scales,
// from row i0 - it.m0); zero past `rows` (padded to 32) and past kb.
template <bool kInt8>
MOEKIT_KERNEL_TARGET void pack_a_tiles(const detail::GemmItem& it, index_t i0, index_t rows,
                                       index_t k0, index_t kb, index_t nkt, const float* scales,
                                       std::byte* dst) {
  using Elem = std::conditional_t<kInt8, std::int8_t, std::uint16_t>;
  constexpr index_t kStep = kTileMaxColsb / index_t{sizeof(Elem)};  // k per tile row
  const index_t row_groups = detail::round_up(rows, 32) / kTileMaxRows;
  float chunk[kF32x16Lanes];
  for (index_t rg = 0; rg < row_groups; ++rg) {
    for (index_t r = 0; r < kTileMaxRows; ++r) {
      const index_t m = rg * kTileMaxRows + r;
      F32x16 inverse = zero();
      if constexpr (kInt8) inverse = set1(m < rows ? scales[2 * (i0 - it.m0 + m) + 1] : 0.0f);
      for (index_t kt = 0; kt < nkt; ++kt) {
        Elem* out = reinterpret_cast<Elem*>(dst + (rg * nkt + kt) * kAmxTileBytes) + r * kStep;
        for (index_t c = 0; c < kStep; c += kF32x16Lanes) {
          const index_t k = kt * kStep + c;
          const int n = static_cast<int>(m >= rows || k >= kb    ? 0
                                         : kb - k < kF32x16Lanes ? kb - k
                                                                 : kF32x16Lanes);
          F32x16 v = zero();
          if (n > 0 && it.op_a == Op::kNone) {
            v = load_partial(detail::a_element(it, i0 + m, k0 + k), n);
          } else if (n > 0) {
            for (int t = 0; t < n; ++t) chunk[t] = *detail::a_element(it, i0 + m, k0 + k + t);
            v = load_partial(chunk, n);
          }
          if constexpr (kInt8) {
            quantize16(out + c, v, inverse);
          } else {
            store_bf16(out + c, v);
          }
        }
      }
    }
  }
}

// Writes a finished 32 x 32 step held as four 16 x 16 tiles (tile (r, c) at
// sums + (2 r + c) 256, rows of 16).
template <bool kInt8>
MOEKIT_KERNEL_TARGET void write_amx_tile(const void* sums, const float* row_scales,
                                         const float* col_scales, const TileOut& out) {
  for (int i = 0; i < out.rows; ++i) {
    for (int c = 0; c < 2 && c * kF32x16Lanes < out.cols; ++c) {
      const index_t at = ((i / 16) * 2 + c) * 256 + (i % 16) * 16;
      F32x16 s;
      if constexpr (kInt8) {
        s = mul(load_int32(static_cast<const std::int32_t*>(sums) + at),
                mul(set1(row_scales[2 * i]), load(col_scales + c * kF32x16Lanes)));
      } else {
        s = load(static_cast<const float*>(sums) + at);
      }
      write_c(out.c + i * out.ldc + c * kF32x16Lanes, out.cols - c * kF32x16Lanes, s, out.alpha,
              out.beta);
    }
  }
}

// One item on AMX tiles: bf16 (B packed or from a view) or int8 (B packed).
template <bool kInt8>
MOEKIT_KERNEL_TARGET void amx_item(const detail::GemmItem& it, const detail::GemmSlot& slot) {
  using Elem = std::conditional_t<kInt8, std::int8_t, std::uint16_t>;
  constexpr index_t kStep = kTileMaxColsb / index_t{sizeof(Elem)};
  constexpr index_t kStride = kTileMaxColsb;  // every tile row is 64 bytes
  const index_t kc = kInt8 ? detail::kInt8Kc : detail::kAmxBf16Kc;
  const index_t passes = detail::reduction_passes(it.k, kc);
  const index_t tile_cols = detail::ceil_div(it.cols, 32);
  std::byte* const partial = slot.partial;
  if constexpr (kInt8) int8_row_scales(it, slot.row_scales);
  Tiles tiles;
  tiles.configure(amx_gemm_tile_config());
  for (index_t pass = 0; pass < passes; ++pass) {
    const index_t pc = pass * kc;
    const index_t kb = it.k - pc < kc ? it.k - pc : kc;
    const index_t nkt = detail::ceil_div(kb, kStep);
    const bool final = pass + 1 == passes;
    const std::byte* b = nullptr;
    index_t b_stride = 0;  // bytes between column blocks
    if (kb == 0) {
      // K = 0: the tiles stay zero
    } else if (it.b_packed) {
      b = it.packed.data + it.n0 / detail::kBlockCols * it.packed.block_stride +
          pc * detail::kBlockCols * index_t{sizeof(Elem)};
      b_stride = it.packed.block_stride;
    } else {  // bf16 only: B from a view, packed per pass
      const index_t kb_pad = nkt * kStep;
      pack_b_panels<true>(it, it.n0, it.cols, tile_cols * 2, pc, kb, kb_pad,
                          reinterpret_cast<std::uint16_t*>(slot.b));
      b = slot.b;
      b_stride = kb_pad * detail::kBlockCols * 2;
    }
    for (index_t ic = 0; ic < it.rows; ic += detail::kGemmMc) {
      const index_t mb = it.rows - ic < detail::kGemmMc ? it.rows - ic : detail::kGemmMc;
      if (kb > 0) pack_a_tiles<kInt8>(it, it.m0 + ic, mb, pc, kb, nkt, slot.row_scales, slot.a);
      for (index_t jt = 0; jt < tile_cols; ++jt) {
        const std::byte* b0 = kb == 0 ? b : b + 2 * jt * b_stride;
        for (index_t ir = 0; ir < mb; ir += 32) {
          std::byte* sums = partial + ((ic + ir) / 32 * tile_cols + jt) * 4 * kAmxTileBytes;
          if (pass > 0) {
            tiles.template load<0>(sums, kStride);
            tiles.template load<1>(sums + kAmxTileBytes, kStride);
            tiles.template load<2>(sums + 2 * kAmxTileBytes, kStride);
            tiles.template load<3>(sums + 3 * kAmxTileBytes, kStride);
          } else {
            tiles.template zero<0>();
            tiles.template zero<1>();
            tiles.template zero<2>();
            tiles.template zero<3>();
          }
          const std::byte* a0 = slot.a + (ir / kTileMaxRows) * nkt * kAmxTileBytes;
          const std::byte* a1 = a0 + nkt * kAmxTileBytes;
          for (index_t kt = 0; kt < nkt; ++kt) {
            tiles.template load<4>(a0 + kt * kAmxTileBytes, kStride);
            tiles.template load<5>(a1 + kt * kAmxTileBytes, kStride);
            tiles.template load<6>(b0 + kt * kAmxTileBytes, kStride);
            tiles.template load<7>(b0 + b_stride + kt * kAmxTileBytes, kStride);
            if constexpr (kInt8) {
              tiles.template dpbssd<0, 4, 6>();
              tiles.template dpbssd<1, 4, 7>();
              tiles.template dpbssd<2, 5, 6>();
              tiles.template dpbssd<3, 5, 7>();
            } else {
              tiles.template dpbf16ps<0, 4, 6>();
              tiles.template dpbf16ps<1, 4, 7>();
              tiles.template dpbf16ps<2, 5, 6>();
              tiles.template dpbf16ps<3, 5, 7>();
            }
          }
          tiles.template store<0>(sums, kStride);
          tiles.template store<1>(sums + kAmxTileBytes, kStride);
          tiles.template store<2>(sums + 2 * kAmxTileBytes, kStride);
          tiles.template store<3>(sums + 3 * kAmxTileBytes, kStride);
          if (!final) continue;
          const TileOut out = tile_out(it, ic + ir, jt * 32, mb - ir, 32, 32);
          write_amx_tile<kInt8>(sums, slot.row_scales + 2 * (ic + ir),
                                kInt8 ? it.packed.col_scales + it.n0 + jt * 32 : nullptr, out);
        }
      }
    }
  }
  tiles.release();
}
