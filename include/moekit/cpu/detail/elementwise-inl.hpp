// The CPU backend's element-wise passes over F32x16, written once and
// included into every ISA namespace by moekit/cpu/elementwise.hpp (no
// include guard, on purpose; see moekit/cpu/vec.hpp). Each takes its
// namespace's Path tag first (with_vec_path). A row's tail goes through
// load_partial / store_partial and the same vector formulas, so every
// element's result depends on its own inputs only, never on its position
// in the row, the row's length or its neighbours.

#define MOEKIT_DETAIL_MATH MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET

// ---- activations (formulas: core/activation.hpp) ----

// f(x) and f'(x) of each Activation, with the limits core/activation.hpp
// documents beyond the cut-offs (where the float results are the limits).
struct ActivationPair {
  F32x16 f, df;
};

template <Activation A>
MOEKIT_DETAIL_MATH ActivationPair activation_pair(F32x16 x, bool want_f, bool want_df) {
  const F32x16 zero_v = zero(), one = set1(1.0f);
  ActivationPair out{zero_v, zero_v};
  if constexpr (A == Activation::kRelu) {
    out.f = select(cmp_lt(x, zero_v), zero_v, x);  // NaN passes through
    out.df = select(cmp_lt(zero_v, x), one, select(cmp_le(x, zero_v), zero_v, x));
  } else if constexpr (A == Activation::kSilu) {
    const Sigmoid sg = sigmoid_parts(x);
    const Mask16 low = cmp_lt(x, set1(-activation_detail::kSiluCutoff));
    const Mask16 high = cmp_lt(set1(activation_detail::kSiluCutoff), x);
    if (want_f) out.f = select(low, zero_v, times_sigmoid(x, x, sg));
    if (want_df) {
      out.df = select(low, zero_v, select(high, one, sigmoid_times_one_plus(x, x, sg)));
    }
  } else if constexpr (A == Activation::kGeluTanh) {
    // f = x sigma(z), z = 2u (gelu_tanh_argument); f' = sigma(z) (1 + x z' sigma(-z)).
    const TwoFloats z = gelu_tanh_argument(x);
    const Sigmoid sg = sigmoid_parts(z.hi, z.lo);
    const Mask16 low = cmp_lt(x, set1(-activation_detail::kGeluCutoff));
    const Mask16 high = cmp_lt(set1(activation_detail::kGeluCutoff), x);
    if (want_f) out.f = select(low, zero_v, select(high, x, times_sigmoid(x, z.hi, sg)));
    if (want_df) {
      // z' = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2)
      const F32x16 dz = fmadd(set1(2.14064449e-01f), mul(x, x), set1(1.59576917f));
      out.df = select(low, zero_v, select(high, one, sigmoid_times_one_plus(mul(x, dz), z.hi, sg)));
    }
  } else {
    static_assert(A == Activation::kGeluErf);
    // f = x Phi(x), f' = Phi(x) + x phi(x) (vec_math's normal_parts).
    const Normal nd = normal_parts(x);
    const Mask16 negative = cmp_lt(x, zero_v);
    const Mask16 low = cmp_lt(x, set1(-kNormalTailClamp));
    const Mask16 high = cmp_lt(set1(activation_detail::kGeluCutoff), x);
    const F32x16 tail = mul(mul(nd.qc, nd.e.q), nd.e.s);  // Phi(-|x|)
    if (want_f) {
      const F32x16 outer =
          select(negative, mul(mul(mul(x, nd.qc), nd.e.q), nd.e.s), mul(x, sub(one, tail)));
      const F32x16 f = select(nd.outer, outer, mul(x, nd.inner));
      out.f = select(low, zero_v, select(high, x, f));
    }
    if (want_df) {
      const F32x16 cdf = select(nd.outer, select(negative, tail, sub(one, tail)), nd.inner);
      const F32x16 pdf = mul(mul(mul(nd.c, set1(activation_detail::kInvSqrt2Pi)), nd.e.q), nd.e.s);
      out.df = select(low, zero_v, select(high, one, fmadd(x, pdf, cdf)));
    }
  }
  return out;
}

// One vector of the forward pass: f(a + bias) (* g).
template <Activation A, bool kGated, bool kBias>
MOEKIT_DETAIL_MATH F32x16 activation_step(F32x16 a, F32x16 b, F32x16 g) {
  if constexpr (kBias) a = add(a, b);
  const F32x16 f = activation_pair<A>(a, true, false).f;
  if constexpr (kGated) return mul(f, g);
  return f;
}

template <Activation A, bool kGated, bool kBias>
MOEKIT_KERNEL_TARGET inline void activation_rows_impl(MatrixView<const float> a,
                                                      MatrixView<const float> g, const float* bias,
                                                      MatrixView<float> h) {
  const index_t n = a.cols();
  const F32x16 none = zero();
  for (index_t i = 0; i < a.rows(); ++i) {
    const float* pa = a.row(i);
    const float* pg = kGated ? g.row(i) : nullptr;
    float* ph = h.row(i);
    index_t j = 0;
    for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) {
      store(ph + j, activation_step<A, kGated, kBias>(load(pa + j), kBias ? load(bias + j) : none,
                                                      kGated ? load(pg + j) : none));
    }
    if (j < n) {
      const int w = static_cast<int>(n - j);
      store_partial(ph + j,
                    activation_step<A, kGated, kBias>(load_partial(pa + j, w),
                                                      kBias ? load_partial(bias + j, w) : none,
                                                      kGated ? load_partial(pg + j, w) : none),
                    w);
    }
  }
}

// h = f(a + bias) * g (g not empty) or f(a + bias); bias may be null. h may be a.
template <Activation A>
MOEKIT_KERNEL_TARGET inline void activation_rows(Path, MatrixView<const float> a,
                                                 MatrixView<const float> g, const float* bias,
                                                 MatrixView<float> h) {
  if (g.empty()) {
    if (bias != nullptr) return activation_rows_impl<A, false, true>(a, g, bias, h);
    return activation_rows_impl<A, false, false>(a, g, bias, h);
  }
  if (bias != nullptr) return activation_rows_impl<A, true, true>(a, g, bias, h);
  return activation_rows_impl<A, true, false>(a, g, bias, h);
}

// One vector of the backward pass: gated, dg = dh f(a), da = (dh g) f'(a);
// plain, da = dh f'(a).
template <Activation A, bool kGated>
MOEKIT_DETAIL_MATH void activation_backward_step(F32x16 a, F32x16 g, F32x16& d, F32x16& dg) {
  const ActivationPair p = activation_pair<A>(a, kGated, true);
  if constexpr (kGated) {
    dg = mul(d, p.f);
    d = mul(mul(d, g), p.df);
  } else {
    d = mul(d, p.df);
  }
}

template <Activation A, bool kGated>
MOEKIT_KERNEL_TARGET inline void activation_rows_backward_impl(MatrixView<const float> a,
                                                               MatrixView<const float> g,
                                                               MatrixView<float> d,
                                                               MatrixView<float> dg) {
  const index_t n = a.cols();
  F32x16 gv = zero(), dgv = zero();
  for (index_t i = 0; i < a.rows(); ++i) {
    const float* pa = a.row(i);
    const float* pg = kGated ? g.row(i) : nullptr;
    float* pd = d.row(i);
    float* pdg = kGated ? dg.row(i) : nullptr;
    index_t j = 0;
    for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) {
      if constexpr (kGated) gv = load(pg + j);
      F32x16 dv = load(pd + j);
      activation_backward_step<A, kGated>(load(pa + j), gv, dv, dgv);
      store(pd + j, dv);
      if constexpr (kGated) store(pdg + j, dgv);
    }
    if (j < n) {
      const int w = static_cast<int>(n - j);
      if constexpr (kGated) gv = load_partial(pg + j, w);
      F32x16 dv = load_partial(pd + j, w);
      activation_backward_step<A, kGated>(load_partial(pa + j, w), gv, dv, dgv);
      store_partial(pd + j, dv, w);
      if constexpr (kGated) store_partial(pdg + j, dgv, w);
    }
  }
}

// d (dh in, da out) and, gated (g not empty), dg.
template <Activation A>
MOEKIT_KERNEL_TARGET inline void activation_rows_backward(Path, MatrixView<const float> a,
                                                          MatrixView<const float> g,
                                                          MatrixView<float> d,
                                                          MatrixView<float> dg) {
  if (g.empty()) return activation_rows_backward_impl<A, false>(a, g, d, dg);
  return activation_rows_backward_impl<A, true>(a, g, d, dg);
}

// ---- softmax rows ----

// max over a row (tail lanes padded with -inf); NaN entries are skipped
// (max's rule), which leaves the row's loss NaN through exp(NaN - m).
MOEKIT_DETAIL_MATH float row_max(const float* z, index_t n) {
  const F32x16 low = set1(-std::numeric_limits<float>::infinity());
  F32x16 m = low;
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) m = max(load(z + j), m);
  if (j < n) {
    const int w = static_cast<int>(n - j);
    m = max(select(first_lanes(w), load_partial(z + j, w), low), m);
  }
  return reduce_max(m);
}

// sum_j e^((z_j - m) * inv_t) in double, 16 lane sums then reduce_add's tree;
// with `out`, also writes each e^(...) there.
MOEKIT_DETAIL_MATH double sum_exp(const float* z, index_t n, float m, float inv_t, float* out) {
  const F32x16 mv = set1(m), tv = set1(inv_t);
  F64x16 acc = zero_f64();
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) {
    const F32x16 e = exp(mul(sub(load(z + j), mv), tv));
    if (out != nullptr) store(out + j, e);
    acc = add(acc, to_f64(e));
  }
  if (j < n) {
    const int w = static_cast<int>(n - j);
    const F32x16 e = select(first_lanes(w), exp(mul(sub(load_partial(z + j, w), mv), tv)), zero());
    if (out != nullptr) store_partial(out + j, e, w);
    acc = add(acc, to_f64(e));
  }
  return reduce_add(acc);
}

// out = e^(x - max x) over a row of n logits, entries with x - max below
// `floor` flushed to 0; returns the max and the sum in float (16 lane sums,
// then reduce_add's tree). The router's softmax and z-loss.
MOEKIT_KERNEL_TARGET inline RowExpSum shifted_exp_row(Path, const float* x, index_t n, float floor,
                                                      float* out) {
  const float m = row_max(x, n);
  const F32x16 mv = set1(m), fv = set1(floor), none = zero();
  F32x16 acc = none;
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) {
    const F32x16 d = sub(load(x + j), mv);
    const F32x16 e = select(cmp_lt(d, fv), none, exp(d));
    store(out + j, e);
    acc = add(acc, e);
  }
  if (j < n) {
    const int w = static_cast<int>(n - j);
    const F32x16 d = sub(load_partial(x + j, w), mv);
    const F32x16 e = select(first_lanes(w), select(cmp_lt(d, fv), none, exp(d)), none);
    store_partial(out + j, e, w);
    acc = add(acc, e);
  }
  return {m, reduce_add(acc)};
}

// out = sigma(x) over a row (the router's sigmoid gating).
MOEKIT_KERNEL_TARGET inline void sigmoid_row(Path, const float* x, index_t n, float* out) {
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) store(out + j, sigmoid(load(x + j)));
  if (j < n) {
    const int w = static_cast<int>(n - j);
    store_partial(out + j, sigmoid(load_partial(x + j, w)), w);
  }
}

// Softmax cross-entropy of one row (classify::cross_entropy_row's contract:
// returns CE = log sum e^z - z_y; with dz, writes scale (softmax(z) - onehot(y))).
MOEKIT_KERNEL_TARGET inline double cross_entropy_row(Path, const float* z, index_t n, int y,
                                                     float scale, float* dz) {
  const float m = row_max(z, n);
  const double total = sum_exp(z, n, m, 1.0f, dz);  // dz holds e^(z - m) for now
  if (dz != nullptr) {
    const F32x16 k = set1(static_cast<float>(1.0 / total)), s = set1(scale);
    index_t j = 0;
    for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) store(dz + j, mul(s, mul(load(dz + j), k)));
    if (j < n) {
      const int w = static_cast<int>(n - j);
      store_partial(dz + j, mul(s, mul(load_partial(dz + j, w), k)), w);
    }
    // The label's entry: scale (p_y - 1), p_y as the loop computed it.
    const F32x16 p_y = mul(exp(sub(set1(z[y]), set1(m))), k);
    dz[y] = first_lane(mul(s, sub(p_y, set1(1.0f))));
  }
  return std::log(total) - static_cast<double>(z[y] - m);
}

// One vector of distillation: KL terms p (log p - log q) and the gradient
// g_kl (q - p) + g_ce (r - onehot), r = softmax(s) (onehot: 1 in the label's
// lane, else 0, so r - 0 = r exactly).
struct DistillationStep {
  F64x16 kl;
  F32x16 grad;
};
struct DistillationRowConstants {
  F32x16 ms, mt, inv_t, log_zq, log_zp, inv_zr, g_kl, g_ce;
  bool want_ce;
};
MOEKIT_DETAIL_MATH DistillationStep distillation_step(F32x16 s, F32x16 t, F32x16 onehot,
                                                      const DistillationRowConstants& k) {
  const F32x16 log_q = sub(mul(sub(s, k.ms), k.inv_t), k.log_zq);
  const F32x16 log_p = sub(mul(sub(t, k.mt), k.inv_t), k.log_zp);
  const F32x16 p = exp(log_p), q = exp(log_q);
  // p log(p / q) -> 0 as p -> 0: a class with p = 0 (a -inf padding logit,
  // an underflow) adds 0, not 0 (-inf - -inf) = NaN. Only an exact 0 is
  // masked: a NaN p still reaches the sum (classify::distillation_row's rule).
  const Mask16 p_zero = cmp_eq(p, zero());
  const F32x16 lp = select(p_zero, zero(), log_p), lq = select(p_zero, zero(), log_q);
  const F64x16 kl = mul(to_f64(p), sub(to_f64(lp), to_f64(lq)));
  F32x16 g = mul(k.g_kl, sub(q, p));
  if (k.want_ce) g = add(g, mul(k.g_ce, sub(mul(exp(sub(s, k.ms)), k.inv_zr), onehot)));
  return {kl, g};
}

// classify::distillation_row's contract for one row of student s and teacher t.
MOEKIT_KERNEL_TARGET inline classify::DistillationTerms distillation_row(Path, const float* s,
                                                                         const float* t, index_t n,
                                                                         int y, float temperature,
                                                                         float alpha, float scale,
                                                                         float* ds) {
  const float inv_t = 1.0f / temperature;
  const float ms = row_max(s, n), mt = row_max(t, n);
  const double zq = sum_exp(s, n, ms, inv_t, nullptr);
  const double zp = sum_exp(t, n, mt, inv_t, nullptr);
  const bool want_ce = alpha < 1.0f;
  const double zr = want_ce ? sum_exp(s, n, ms, 1.0f, nullptr) : 1.0;
  const DistillationRowConstants k{set1(ms),
                                   set1(mt),
                                   set1(inv_t),
                                   set1(static_cast<float>(std::log(zq))),
                                   set1(static_cast<float>(std::log(zp))),
                                   set1(static_cast<float>(1.0 / zr)),
                                   set1(scale * alpha * temperature),
                                   set1(scale * (1.0f - alpha)),
                                   want_ce};
  const F32x16 no_label = zero();
  F64x16 kl = zero_f64();
  index_t j = 0;
  for (; j + kF32x16Lanes <= n; j += kF32x16Lanes) {
    const DistillationStep st = distillation_step(load(s + j), load(t + j), no_label, k);
    kl = add(kl, st.kl);
    if (ds != nullptr) store(ds + j, st.grad);
  }
  if (j < n) {
    // Tail lanes read the row maxima (finite terms), then count 0 in the sum.
    const int w = static_cast<int>(n - j);
    const Mask16 live = first_lanes(w);
    const DistillationStep st =
        distillation_step(select(live, load_partial(s + j, w), k.ms),
                          select(live, load_partial(t + j, w), k.mt), no_label, k);
    kl = add(kl, mul(st.kl, to_f64(select(live, set1(1.0f), zero()))));
    if (ds != nullptr) store_partial(ds + j, st.grad, w);
  }
  if (ds != nullptr && want_ce) {
    // The label's entry, the same steps with onehot = 1.
    ds[y] = first_lane(distillation_step(set1(s[y]), set1(t[y]), set1(1.0f), k).grad);
  }
  classify::DistillationTerms out;
  const double kl_sum = reduce_add(kl);
  out.kl = kl_sum < 0.0 ? 0.0 : kl_sum;  // KL >= 0 (rounding may dip below); NaN stays NaN
  out.ce = want_ce ? std::log(zr) - static_cast<double>(s[y] - ms) : 0.0;
  return out;
}

#undef MOEKIT_DETAIL_MATH
