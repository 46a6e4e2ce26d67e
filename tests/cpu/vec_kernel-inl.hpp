// A small kernel written once in F32x16 operations and included into every
// ISA namespace of test_vec.cpp (no include guard, on purpose: see
// moekit/cpu/vec.hpp). It exercises each operation so that the paths can be
// compared bit for bit.

// y[i] = sum over j of x[i*n + j] * w[j], then z[i] = (y[i] * s + x[i*n]) / 3,
// clamped to [-1, 1]; n any size (full vectors and a partial tail).
MOEKIT_KERNEL_TARGET inline void vec_kernel(const float* x, const float* w, int rows, int n,
                                            float s, float* y, float* z) {
  for (int i = 0; i < rows; ++i) {
    const float* xi = x + i * n;
    F32x16 acc = zero();
    int j = 0;
    for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) acc = fmadd(load(xi + j), load(w + j), acc);
    if (j < n) acc = fmadd(load_partial(xi + j, n - j), load_partial(w + j, n - j), acc);
    y[i] = reduce_add(acc);
    F32x16 t = add(mul(set1(y[i]), set1(s)), load_partial(xi, 1));
    t = div(t, set1(3.0f));
    t = max(min(t, set1(1.0f)), set1(-1.0f));
    t = sub(t, zero());
    store_partial(z + i, t, 1);
  }
}
