// The session memory's kernels over F32x16 and I32x16, written once and
// included into every ISA namespace by moekit/cpu/memory_kernels.hpp (no
// include guard, on purpose; see moekit/cpu/vec.hpp). Each takes its
// namespace's Path tag first (with_vec_path).
//
// Every float result is summed in one fixed order that depends on the length
// only: lane l of a row accumulates columns l, l + 16, l + 32, ... in order
// (the tail through load_partial), then reduce_add's tree. Products that
// feed a sum are fused (fmadd) or rounded on their own (mul) as written, so
// every path gives the same bits. Integer dot products are exact.

#define MOEKIT_DETAIL_MEMORY MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET

// acc[x][m] += rows[m]'s next block of columns [j, j + width) times vs[x]'s.
template <std::size_t X, std::size_t M>
MOEKIT_DETAIL_MEMORY void dot_tile_block(const float* const* rows, const float* const* vs,
                                         index_t j, int width, F32x16 (&acc)[X][M]) {
  const bool full = width == kF32x16Lanes;
  F32x16 v[X];
  for (std::size_t x = 0; x < X; ++x)
    v[x] = full ? load(vs[x] + j) : load_partial(vs[x] + j, width);
  for (std::size_t m = 0; m < M; ++m) {
    const F32x16 r = full ? load(rows[m] + j) : load_partial(rows[m] + j, width);
    for (std::size_t x = 0; x < X; ++x) acc[x][m] = fmadd(r, v[x], acc[x][m]);
  }
}

// out[x][m0 + m] = sum_j rows[m][j] vs[x][j] for X vectors and M rows at
// once: X * M accumulators that share the loads of both (a register tile, as
// in a GEMM's micro-kernel), each summed in the order at the top of this
// file, so a result's bits do not depend on X, M or on which vectors and
// rows share a tile.
template <std::size_t X, std::size_t M>
MOEKIT_DETAIL_MEMORY void dot_tile(const float* const* rows, const float* const* vs, index_t n,
                                   float* const* out, index_t m0) {
  F32x16 acc[X][M];
  for (std::size_t x = 0; x < X; ++x)
    for (std::size_t m = 0; m < M; ++m) acc[x][m] = zero();
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes)
    dot_tile_block<X, M>(rows, vs, j, kF32x16Lanes, acc);
  if (j < n) dot_tile_block<X, M>(rows, vs, j, static_cast<int>(n - j), acc);
  for (std::size_t x = 0; x < X; ++x)
    for (std::size_t m = 0; m < M; ++m)
      out[x][m0 + static_cast<index_t>(m)] = reduce_add(acc[x][m]);
}

// The tile's sides on this path: as many accumulators as leave registers for
// the loads (AVX2: 2 x 2 F32x16 in 8 ymm pairs; AVX-512: 4 x 4 in 16 of 32 zmm).
inline constexpr std::size_t kDotTileSide = kF32x16Registers >= 32 ? 4 : 2;

// m's rows against X vectors: out[x][i] = m.row(i) . vs[x].
template <std::size_t X>
MOEKIT_DETAIL_MEMORY void dot_tile_rows(MatrixView<const float> m, const float* const* vs,
                                        float* const* out) {
  constexpr std::size_t M = kDotTileSide;
  index_t i = 0;
  for (; i + static_cast<index_t>(M) <= m.rows(); i += static_cast<index_t>(M)) {
    const float* rows[M];
    for (std::size_t r = 0; r < M; ++r) rows[r] = m.row(i + static_cast<index_t>(r));
    dot_tile<X, M>(rows, vs, m.cols(), out, i);
  }
  for (; i < m.rows(); ++i) {
    const float* row = m.row(i);
    dot_tile<X, 1>(&row, vs, m.cols(), out, i);
  }
}

// out[v][i] = sum_j m(i, j) vs[v][j] for `count` vectors: matrix-vector
// products for several vectors at once, out[v] bit-identical to
// row_dots(m, vs[v]) whatever `count`. For small products with a few rows
// (task heads' and the router's logits), where a GEMM's blocks would pad.
MOEKIT_KERNEL_TARGET inline void multi_row_dots(Path, MatrixView<const float> m,
                                                const float* const* vs, float* const* out,
                                                index_t count) {
  constexpr auto X = static_cast<index_t>(kDotTileSide);
  index_t v = 0;
  for (; v + X <= count; v += X) dot_tile_rows<kDotTileSide>(m, vs + v, out + v);
  for (; v < count; ++v) dot_tile_rows<1>(m, vs + v, out + v);
}

// out[i] = sum_j m(i, j) v[j] (a matrix-vector product).
MOEKIT_KERNEL_TARGET inline void row_dots(Path, MatrixView<const float> m, const float* v,
                                          float* out) {
  dot_tile_rows<1>(m, &v, &out);
}

MOEKIT_KERNEL_TARGET inline float dot(Path, const float* a, const float* b, index_t n) {
  float out = 0.0f;
  float* outs[1] = {&out};
  dot_tile<1, 1>(&a, &b, n, outs, 0);
  return out;
}

// x /= ||x|| (x = 0 stays 0).
MOEKIT_KERNEL_TARGET inline void normalize(Path path, float* x, index_t n) {
  const float norm = std::sqrt(dot(path, x, x, n));
  if (!(norm > 0.0f)) return;
  const F32x16 nv = set1(norm);
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) store(x + j, div(load(x + j), nv));
  if (j < n) {
    const int w = static_cast<int>(n - j);
    store_partial(x + j, div(load_partial(x + j, w), nv), w);
  }
}

// y = a y - c x: the delta rule's step on one row (a = 1 skips the product,
// which would not change a bit).
MOEKIT_KERNEL_TARGET inline void decay_subtract(Path, float* y, const float* x, index_t n, float a,
                                                float c) {
  const F32x16 av = set1(a), cv = set1(c);
  const bool decay = a != 1.0f;
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) {
    const F32x16 yv = decay ? mul(av, load(y + j)) : load(y + j);
    store(y + j, fnmadd(cv, load(x + j), yv));
  }
  if (j < n) {
    const int w = static_cast<int>(n - j);
    const F32x16 yv = decay ? mul(av, load_partial(y + j, w)) : load_partial(y + j, w);
    store_partial(y + j, fnmadd(cv, load_partial(x + j, w), yv), w);
  }
}

// out[x] (+)= sum_i g[x][i] rows(i) for X outputs at once: the X
// accumulators of a 16-column block share each load of a row of `rows`.
template <std::size_t X>
MOEKIT_DETAIL_MEMORY void combine_tile(const float* const* g, MatrixView<const float> rows,
                                       float* const* out, bool accumulate) {
  const index_t n = rows.cols();
  for (index_t j = 0; j < n; j += kF32x16Lanes) {
    const int w = static_cast<int>(std::min<index_t>(kF32x16Lanes, n - j));
    const bool full = w == kF32x16Lanes;
    F32x16 acc[X];
    for (std::size_t x = 0; x < X; ++x)
      acc[x] = !accumulate ? zero() : (full ? load(out[x] + j) : load_partial(out[x] + j, w));
    for (index_t i = 0; i < rows.rows(); ++i) {
      const F32x16 r = full ? load(rows.row(i) + j) : load_partial(rows.row(i) + j, w);
      for (std::size_t x = 0; x < X; ++x) acc[x] = fmadd(set1(g[x][i]), r, acc[x]);
    }
    for (std::size_t x = 0; x < X; ++x) {
      if (full) {
        store(out[x] + j, acc[x]);
      } else {
        store_partial(out[x] + j, acc[x], w);
      }
    }
  }
}

// out[v] (+)= sum_i g[v][i] rows(i) for `count` vectors g[v] (each
// rows.rows() long; n = rows.cols() columns): per element one fused
// multiply-add chain over i in order, from out's value with `accumulate`,
// else from 0, whatever `count` or the tile. Rows of the router's input
// gradient (dlogits times w_gate).
MOEKIT_KERNEL_TARGET inline void combine_rows(Path, const float* const* g,
                                              MatrixView<const float> rows, float* const* out,
                                              index_t count, bool accumulate) {
  constexpr std::size_t kTile = kF32x16Registers >= 32 ? 8 : 4;
  index_t v = 0;
  for (; v + static_cast<index_t>(kTile) <= count; v += static_cast<index_t>(kTile))
    combine_tile<kTile>(g + v, rows, out + v, accumulate);
  for (; v < count; ++v) combine_tile<1>(g + v, rows, out + v, accumulate);
}

// out.row(i0 + i) += sum_t g(t, i0 + i) x.row(t) for i < M, the rows t of
// g and x (a block of a few), columns [j, j + w): M accumulators in
// registers share each load of x.
template <std::size_t M>
MOEKIT_DETAIL_MEMORY void outer_product_tile(MatrixView<const float> g, MatrixView<const float> x,
                                             MatrixView<float> out, index_t i0, index_t j, int w) {
  const bool full = w == kF32x16Lanes;
  F32x16 acc[M];
  for (std::size_t i = 0; i < M; ++i) {
    const float* o = out.row(i0 + static_cast<index_t>(i)) + j;
    acc[i] = full ? load(o) : load_partial(o, w);
  }
  for (index_t t = 0; t < x.rows(); ++t) {
    const F32x16 xv = full ? load(x.row(t) + j) : load_partial(x.row(t) + j, w);
    const float* gt = g.row(t) + i0;
    for (std::size_t i = 0; i < M; ++i) acc[i] = fmadd(set1(gt[i]), xv, acc[i]);
  }
  for (std::size_t i = 0; i < M; ++i) {
    float* o = out.row(i0 + static_cast<index_t>(i)) + j;
    if (full) {
      store(o, acc[i]);
    } else {
      store_partial(o, acc[i], w);
    }
  }
}

// out += g^T x for columns [j0, j1) (g: T x m, x: T x n, out: m x n): per
// element one fused multiply-add chain over the rows t in order, from out's
// value, so the bits do not depend on the column range, the tiles or the
// path, and a sum split into consecutive row ranges (each call continuing
// from the last) is the same chain. The router's weight gradient. Rows run
// in blocks of kOuterRows: a block's rows of x stay in cache while register
// tiles of (kTile rows of out) x 16 columns sweep the columns, so out is
// read and written once per block, and x streams through in row order.
MOEKIT_KERNEL_TARGET inline void add_outer_products(Path, MatrixView<const float> g,
                                                    MatrixView<const float> x,
                                                    MatrixView<float> out, index_t j0, index_t j1) {
  constexpr std::size_t kTile = kF32x16Registers >= 32 ? 8 : 4;
  constexpr index_t kOuterRows = 16;
  const index_t m = out.rows();
  for (index_t t0 = 0; t0 < x.rows(); t0 += kOuterRows) {
    const index_t rows = std::min(kOuterRows, x.rows() - t0);
    const MatrixView<const float> gb = g.middle_rows(t0, rows), xb = x.middle_rows(t0, rows);
    for (index_t j = j0; j < j1; j += kF32x16Lanes) {
      const int w = static_cast<int>(std::min<index_t>(kF32x16Lanes, j1 - j));
      index_t i = 0;
      for (; i + static_cast<index_t>(kTile) <= m; i += static_cast<index_t>(kTile))
        outer_product_tile<kTile>(gb, xb, out, i, j, w);
      for (; i < m; ++i) outer_product_tile<1>(gb, xb, out, i, j, w);
    }
  }
}

// Row i of s: s_i = a s_i - c[i] k (S <- a S - c k^T).
MOEKIT_KERNEL_TARGET inline void delta_rows(Path path, MatrixView<float> s, const float* c,
                                            const float* k, float a) {
  for (index_t i = 0; i < s.rows(); ++i) decay_subtract(path, s.row(i), k, s.cols(), a, c[i]);
}

// y += w x.
MOEKIT_KERNEL_TARGET inline void axpy(Path, float* y, const float* x, index_t n, float w) {
  const F32x16 wv = set1(w);
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes)
    store(y + j, fmadd(wv, load(x + j), load(y + j)));
  if (j < n) {
    const int r = static_cast<int>(n - j);
    store_partial(y + j, fmadd(wv, load_partial(x + j, r), load_partial(y + j, r)), r);
  }
}

// y = z + g o, and exactly z where o is 0 (so that an empty memory leaves
// the frozen output's bits alone, -0 included). y may be z.
MOEKIT_KERNEL_TARGET inline void mix_row(Path, const float* z, const float* o, index_t n, float g,
                                         float* y) {
  const F32x16 gv = set1(g), none = zero();
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) {
    const F32x16 ov = load(o + j), zv = load(z + j);
    store(y + j, select(cmp_eq(ov, none), zv, fmadd(gv, ov, zv)));
  }
  if (j < n) {
    const int w = static_cast<int>(n - j);
    const F32x16 ov = load_partial(o + j, w), zv = load_partial(z + j, w);
    store_partial(y + j, select(cmp_eq(ov, none), zv, fmadd(gv, ov, zv)), w);
  }
}

// sigma(z) (vec_math's sigmoid).
MOEKIT_KERNEL_TARGET inline float sigmoid_of(Path, float z) { return first_lane(sigmoid(set1(z))); }

// ---- int8 keys ----

// Symmetric int8 quantisation of one row: scale = max |x| / 127 and
// q[j] = round(x[j] / scale) (to nearest, ties to even) in [-127, 127],
// written as int32; a zero row gives scale 0 and q = 0. Returns the scale.
MOEKIT_DETAIL_MEMORY F32x16 quantize_block(F32x16 x, F32x16 inv) {
  // Adding 1.5 * 2^23 rounds |v| < 2^22 to an integer, ties to even.
  const F32x16 magic = set1(12582912.0f);
  const F32x16 r = sub(add(mul(x, inv), magic), magic);
  return min(set1(127.0f), max(set1(-127.0f), r));
}
MOEKIT_KERNEL_TARGET inline float quantize_row(Path, const float* x, index_t n, std::int32_t* q) {
  F32x16 amax = zero();
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) amax = max(abs(load(x + j)), amax);
  if (j < n) amax = max(abs(load_partial(x + j, static_cast<int>(n - j))), amax);
  const float m = reduce_max(amax);
  if (!(m > 0.0f)) {
    for (index_t c = 0; c < n; ++c) q[c] = 0;
    return 0.0f;
  }
  const F32x16 inv = set1(127.0f / m);
  for (j = 0; j + kF32x16Lanes <= n; j += kF32x16Lanes) {
    store_i32(q + j, to_i32(quantize_block(load(x + j), inv)));
  }
  if (j < n) {
    const int w = static_cast<int>(n - j);
    std::int32_t tail[kF32x16Lanes];
    store_i32(tail, to_i32(quantize_block(load_partial(x + j, w), inv)));
    for (int c = 0; c < w; ++c) q[j + c] = tail[c];
  }
  return m / 127.0f;
}

// out[r] = sum_j rows(r, j) q[j], exact in int32 (|sum| < 2^31 for rows of
// int8 in [-127, 127] and q of at most 2^17 elements in the same range).
template <std::size_t M>
MOEKIT_DETAIL_MEMORY void dot_i8_block(const std::int8_t* const* rows, const std::int32_t* q,
                                       index_t n, std::int32_t* out) {
  I32x16 acc[M];
  for (std::size_t r = 0; r < M; ++r) acc[r] = set1_i32(0);
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) {
    const I32x16 qv = load_i32(q + j);
    for (std::size_t r = 0; r < M; ++r) acc[r] = add_i32(acc[r], mul_i32(load_i8(rows[r] + j), qv));
  }
  // The tail, fewer than 16 elements (counted in int: GCC's loop analysis
  // then sees its bound and stops warning about iteration 2^62 at -O3).
  const int tail = static_cast<int>(n - j);
  for (std::size_t r = 0; r < M; ++r) {
    std::int32_t s = reduce_add_i32(acc[r]);
    for (int c = 0; c < tail; ++c) s += rows[r][j + c] * q[j + c];
    out[r] = s;
  }
}
MOEKIT_KERNEL_TARGET inline void dot_i8_rows(Path, MatrixView<const std::int8_t> rows,
                                             const std::int32_t* q, std::int32_t* out) {
  const index_t n = rows.cols();
  index_t i = 0;
  for (; i + 4 <= rows.rows(); i += 4) {
    const std::int8_t* r[4] = {rows.row(i), rows.row(i + 1), rows.row(i + 2), rows.row(i + 3)};
    dot_i8_block<4>(r, q, n, out + i);
  }
  for (; i < rows.rows(); ++i) {
    const std::int8_t* r = rows.row(i);
    dot_i8_block<1>(&r, q, n, out + i);
  }
}

// out[r] = (q_scale row_scale[r]) dots[r]: the float scores of n rows from
// their exact integer dot products (int32 -> float rounds to nearest).
MOEKIT_KERNEL_TARGET inline void scale_scores(Path, const std::int32_t* dots,
                                              const float* row_scale, float q_scale, index_t n,
                                              float* out) {
  const F32x16 qs = set1(q_scale);
  std::int32_t tail[kF32x16Lanes] = {};
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) {
    store(out + j, mul(mul(qs, load(row_scale + j)), to_f32(load_i32(dots + j))));
  }
  if (j < n) {
    const int w = static_cast<int>(n - j);
    for (int c = 0; c < w; ++c) tail[c] = dots[j + c];
    store_partial(out + j, mul(mul(qs, load_partial(row_scale + j, w)), to_f32(load_i32(tail))), w);
  }
}

// w = softmax(tau s) over k <= 16 scores (max first subtracted); returns
// sum_j w_j^2.
MOEKIT_KERNEL_TARGET inline float softmax_weights(Path, const float* s, int k, float tau,
                                                  float* w) {
  const Mask16 live = first_lanes(k);
  const F32x16 low = set1(-std::numeric_limits<float>::infinity());
  const F32x16 sv = select(live, load_partial(s, k), low);
  const float m = reduce_max(sv);
  const F32x16 e = select(live, exp(mul(sub(sv, set1(m)), set1(tau))), zero());
  const F32x16 wv = div(e, set1(reduce_add(e)));
  store_partial(w, wv, k);
  return reduce_add(mul(wv, wv));
}

#undef MOEKIT_DETAIL_MEMORY
