// The GEMM engine's output rule, written once over F32x16 and included into
// every kernel namespace (no include guard, on purpose: see moekit/cpu/vec.hpp).
//
// A product's sum s of an element becomes
//   C = alpha s                    when beta = 0 (C is not read)
//   C = fma(alpha, s, beta C_old)  otherwise (beta C_old rounded on its own)
// with the same bits on every path.

// Columns [0, n) of one 16-wide row segment of C (n <= 16).
MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void write_c(float* c, int n, F32x16 s, float alpha,
                                                      float beta) {
  F32x16 r = s;
  if (beta == 0.0f) {
    if (alpha != 1.0f) r = mul(set1(alpha), s);
  } else {
    const F32x16 old = n >= kF32x16Lanes ? load(c) : load_partial(c, n);
    r = fmadd(set1(alpha), s, mul(set1(beta), old));
  }
  if (n >= kF32x16Lanes) {
    store(c, r);
  } else {
    store_partial(c, r, n);
  }
}

// A tile's destination in C: its top-left element, and how much of the
// kernel's mr x nr tile lies inside C.
struct TileOut {
  float* c = nullptr;
  index_t ldc = 0;
  int rows = 0, cols = 0;
  float alpha = 1.0f, beta = 0.0f;
};

// The destination of the mr x nr tile at (row, col) of an item (row counted
// from the item's first row, rows_left rows of its A block from there on).
inline TileOut tile_out(const detail::GemmItem& it, index_t row, index_t col, index_t rows_left,
                        int mr, int nr) {
  TileOut out;
  out.c = it.c + (it.m0 + row) * it.ldc + it.n0 + col;
  out.ldc = it.ldc;
  out.rows = static_cast<int>(rows_left < mr ? rows_left : mr);
  out.cols = static_cast<int>(it.cols - col < nr ? it.cols - col : nr);
  out.alpha = it.alpha;
  out.beta = it.beta;
  return out;
}

// Writes a finished tile held as rows of `nr` floats (ld = nr).
MOEKIT_KERNEL_TARGET inline void write_tile(const float* sums, int nr, const TileOut& out) {
  for (int i = 0; i < out.rows; ++i) {
    for (int j = 0; j < out.cols; j += kF32x16Lanes)
      write_c(out.c + i * out.ldc + j, out.cols - j, load(sums + i * nr + j), out.alpha, out.beta);
  }
}

// The int8 sums of a tile (rows of `nr` int32) dequantized, s = float(q)
// (row scale x column scale), then written as above.
MOEKIT_KERNEL_TARGET inline void write_int8_tile(const std::int32_t* sums, int nr,
                                                 const float* row_scales, const float* col_scales,
                                                 const TileOut& out) {
  for (int i = 0; i < out.rows; ++i) {
    const F32x16 row_scale = set1(row_scales[2 * i]);
    for (int j = 0; j < out.cols; j += kF32x16Lanes) {
      const F32x16 s = mul(load_int32(sums + i * nr + j), mul(row_scale, load(col_scales + j)));
      write_c(out.c + i * out.ldc + j, out.cols - j, s, out.alpha, out.beta);
    }
  }
}

// ---- int8 activations ----

// Per-row int8 scales of op(A) rows [m0, m0 + rows) over the whole reduction
// (detail::int8_scale), into scales[2 i] (scale) and scales[2 i + 1]
// (inverse). The maximum is exact, so its order does not matter.
MOEKIT_KERNEL_TARGET inline void int8_row_scales(const detail::GemmItem& it, float* scales) {
  for (index_t i = 0; i < it.rows; ++i) {
    float amax = 0.0f;
    if (it.k == 0) {
      // no values: scale 0
    } else if (it.op_a == Op::kNone) {
      const float* row = detail::a_element(it, it.m0 + i, 0);
      F32x16 m = zero();
      index_t k = 0;
      for (; k + kF32x16Lanes <= it.k; k += kF32x16Lanes) m = max(m, abs(load(row + k)));
      if (k < it.k) m = max(m, abs(load_partial(row + k, static_cast<int>(it.k - k))));
      amax = reduce_max(m);
    } else {
      for (index_t k = 0; k < it.k; ++k) {
        const float v = std::fabs(*detail::a_element(it, it.m0 + i, k));
        amax = v > amax ? v : amax;
      }
    }
    const detail::Int8Scale s = detail::int8_scale(amax);
    scales[2 * i] = s.scale;
    scales[2 * i + 1] = s.inverse;
  }
}

// 16 values of op(A) quantized with their rows' inverses (lane-wise).
MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET void quantize16(std::int8_t* out, F32x16 x,
                                                         F32x16 inverse) {
  store_int8(out, mul(x, inverse));
}
