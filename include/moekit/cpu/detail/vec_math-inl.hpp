// Vector math over F32x16, written once and included into every ISA
// namespace by moekit/cpu/vec_math.hpp (no include guard, on purpose; see
// moekit/cpu/vec.hpp). Only F32x16 operations are used, so every path gives
// the same bits. Algorithms, constants and measured accuracy: vec_math.hpp
// and docs/cpu_vector_math.md. Coefficients were fitted for these
// functions by tools/fit_vec_math.py (near-minimax relative error).

#define MOEKIT_DETAIL_MATH MOEKIT_FORCE_INLINE MOEKIT_KERNEL_TARGET

// e^x = q * s with s a power of two: scaling last lets a caller multiply q by
// its own factors first, so a product that ends below the normal range
// (x e^x of SiLU, x Phi(x) of GELU) is rounded once there instead of carrying
// the error of a subnormal e^x. q is normal (or 0, inf, NaN) for every x.
struct ExpParts {
  F32x16 q, s;
};

// 2^k for integer lanes k in [-126, 127], by building the exponent field.
MOEKIT_DETAIL_MATH F32x16 pow2i(I32x16 k) {
  return float_of_bits(shl_i32<23>(add_i32(k, set1_i32(127))));
}

// exp: x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2 (ln2 split in
// two for an accurate r); e^r = 1 + r + r^2 P(r), P of degree 4; 2^n split
// as 2^(n >> 1) 2^(n - (n >> 1)) so that both factors are normal. x is first
// clamped to [-120, 88.8]: beyond, e^x is 0 or inf in float (also after a
// factor up to 2^20 from the caller), and NaN passes the clamp.
MOEKIT_DETAIL_MATH ExpParts exp_parts(F32x16 x) {
  // max / min return their second operand for NaN: x comes second.
  x = min(set1(88.8f), max(set1(-120.0f), x));
  // n + 1.5 * 2^23 rounds n to the nearest integer (ties to even) in the fma.
  const F32x16 shifted = fmadd(x, set1(1.44269502f), set1(12582912.0f));
  const F32x16 n = sub(shifted, set1(12582912.0f));
  F32x16 r = fnmadd(n, set1(0.693145752f), x);  // ln2 high part: n * it is exact
  r = fnmadd(n, set1(1.42860677e-06f), r);      // ln2 - high part
  F32x16 p = fmadd(set1(1.39012805e-03f), r, set1(8.36314075e-03f));
  p = fmadd(p, r, set1(4.16668542e-02f));
  p = fmadd(p, r, set1(1.66665778e-01f));
  p = fmadd(p, r, set1(0.5f));
  p = add(fmadd(mul(r, r), p, r), set1(1.0f));
  const I32x16 ni = to_i32(n);
  const I32x16 n_half = sra_i32<1>(ni);
  return {mul(p, pow2i(n_half)), pow2i(sub_i32(ni, n_half))};
}

MOEKIT_DETAIL_MATH F32x16 exp(F32x16 x) {
  const ExpParts e = exp_parts(x);
  return mul(e.q, e.s);
}

// log: x = 2^k m with m in [sqrt(1/2), sqrt(2)) (subnormals scaled by 2^23
// first), f = m - 1 exactly, s = f / (2 + f), and
//   log(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)),   R(z) = z (c0 + c1 z + c2 z^2 + c3 z^3),
// log x = k ln2 + log(1 + f) with k ln2 split in two. log(+-0) = -inf,
// log(x < 0) = NaN, log(+inf) = +inf, NaN gives NaN.
MOEKIT_DETAIL_MATH F32x16 log(F32x16 x) {
  const Mask16 subnormal = cmp_lt(x, set1(1.17549435e-38f));
  const F32x16 xs = select(subnormal, mul(x, set1(8388608.0f)), x);
  // Adding 1 - sqrt(1/2) in the bits moves [sqrt(1/2), sqrt(2)) onto one binade.
  const I32x16 bits = add_i32(bits_of(xs), set1_i32(0x3f800000 - 0x3f3504f3));
  const F32x16 k = add(to_f32(sub_i32(sra_i32<23>(bits), set1_i32(127))),
                       select(subnormal, set1(-23.0f), zero()));
  const F32x16 m =
      float_of_bits(add_i32(and_i32(bits, set1_i32(0x007fffff)), set1_i32(0x3f3504f3)));
  const F32x16 f = sub(m, set1(1.0f));
  const F32x16 s = div(f, add(set1(2.0f), f));
  const F32x16 z = mul(s, s);
  F32x16 r = fmadd(set1(0.233241349f), z, set1(0.285511494f));
  r = fmadd(r, z, set1(0.400001168f));
  r = fmadd(r, z, set1(0.666666687f));
  r = mul(r, z);
  const F32x16 half_f2 = mul(mul(set1(0.5f), f), f);
  // (f - half_f2) + s (half_f2 + R) + k ln2_lo, then + k ln2_hi (exact product).
  const F32x16 small = fmadd(k, set1(1.42860677e-06f), fmadd(s, add(half_f2, r), neg(half_f2)));
  F32x16 y = fmadd(k, set1(0.693145752f), add(f, small));
  const F32x16 inf = set1(std::numeric_limits<float>::infinity());
  y = select(cmp_eq(x, zero()), neg(inf), y);
  y = select(cmp_lt(x, zero()), set1(std::numeric_limits<float>::quiet_NaN()), y);
  y = select(cmp_eq(x, inf), inf, y);
  return select(is_nan(x), add(x, x), y);
}

// The pieces of sigma(z) and sigma(-z) for any z, without overflow or
// cancellation: e = e^-|z| = q s (ExpParts) and r = 1 / (1 + e) = sigma(|z|),
// so sigma(-|z|) = e r = (q r) s.
struct Sigmoid {
  ExpParts e;
  F32x16 r;
};
MOEKIT_DETAIL_MATH Sigmoid sigmoid_parts(F32x16 z) {
  const ExpParts e = exp_parts(neg(abs(z)));
  return {e, div(set1(1.0f), add(set1(1.0f), mul(e.q, e.s)))};
}
// The same for z = z_hi + z_lo given in two parts (|z_lo| tiny beside
// |z_hi|): e^-|z| = e^-|z_hi| (1 -+ z_lo) to float accuracy.
MOEKIT_DETAIL_MATH Sigmoid sigmoid_parts(F32x16 z_hi, F32x16 z_lo) {
  ExpParts e = exp_parts(neg(abs(z_hi)));
  e.q = fmadd(e.q, select(cmp_lt(z_hi, zero()), z_lo, neg(z_lo)), e.q);
  return {e, div(set1(1.0f), add(set1(1.0f), mul(e.q, e.s)))};
}

// z = 2u = 2 sqrt(2/pi) (x + 0.044715 x^3) of tanh-GELU as z_hi + z_lo, to
// about 2^-40 relative: x^2 and the products split exactly by fmas, the
// constants in two floats each. Rounded to one float, z would carry
// |z| 2^-24 of error into e^-z: 150 ulp at x = -10.
struct TwoFloats {
  F32x16 hi, lo;
};
MOEKIT_DETAIL_MATH TwoFloats gelu_tanh_argument(F32x16 x) {
  const F32x16 one = set1(1.0f);
  const F32x16 k_hi = set1(1.59576917f), k_lo = set1(-4.53406805e-08f);     // 2 sqrt(2/pi)
  const F32x16 c_hi = set1(4.47149985e-02f), c_lo = set1(1.54614443e-09f);  // 0.044715
  const F32x16 x2 = mul(x, x);
  const F32x16 x2_lo = fmadd(x, x, neg(x2));
  // t = c x^2 = t_hi + t_lo
  const F32x16 t_hi = mul(c_hi, x2);
  const F32x16 t_lo = add(fmadd(c_hi, x2, neg(t_hi)), fmadd(c_lo, x2, mul(c_hi, x2_lo)));
  // w = 1 + t = w_hi + w_lo (two-sum: t may exceed 1)
  const F32x16 w_hi = add(one, t_hi);
  const F32x16 b = sub(w_hi, one);
  const F32x16 w_lo = add(add(sub(one, sub(w_hi, b)), sub(t_hi, b)), t_lo);
  // k x = p_hi + p_lo
  const F32x16 p_hi = mul(k_hi, x);
  const F32x16 p_lo = fmadd(k_lo, x, fmadd(k_hi, x, neg(p_hi)));
  // z = (p_hi + p_lo)(w_hi + w_lo)
  const F32x16 z_hi = mul(p_hi, w_hi);
  const F32x16 z_lo = add(fmadd(p_hi, w_hi, neg(z_hi)), fmadd(p_hi, w_lo, mul(p_lo, w_hi)));
  return {z_hi, z_lo};
}

// sigma(z) = 1 / (1 + e^-z).
MOEKIT_DETAIL_MATH F32x16 sigmoid(F32x16 z) {
  const Sigmoid sg = sigmoid_parts(z);
  return select(cmp_lt(z, zero()), mul(mul(sg.e.q, sg.r), sg.e.s), sg.r);
}

// y sigma(z) for a factor y: (y q r) s below 0, so that a tiny result is
// rounded once (the forms of SiLU and tanh-GELU).
MOEKIT_DETAIL_MATH F32x16 times_sigmoid(F32x16 y, F32x16 z, const Sigmoid& sg) {
  return select(cmp_lt(z, zero()), mul(mul(mul(y, sg.e.q), sg.r), sg.e.s), mul(y, sg.r));
}

// sigma(z) (1 + y sigma(-z)): the derivatives of y sigma(z) forms, where
// sigma(z) sigma(-z) = e r^2. Below 0: (q r)(1 + y r) s; else r (1 + y e r).
MOEKIT_DETAIL_MATH F32x16 sigmoid_times_one_plus(F32x16 y, F32x16 z, const Sigmoid& sg) {
  const F32x16 one = set1(1.0f);
  const F32x16 below = mul(mul(mul(sg.e.q, sg.r), fmadd(y, sg.r, one)), sg.e.s);
  const F32x16 e = mul(sg.e.q, sg.e.s);
  const F32x16 above = mul(sg.r, fmadd(y, mul(e, sg.r), one));
  return select(cmp_lt(z, zero()), below, above);
}

// The standard normal distribution's Phi(x) = 0.5 erfc(-x / sqrt 2) and
// density phi(x), in pieces:
//   |x| <= 0.75:  Phi(x) = 1/2 + x P(x^2), P of degree 4 (an odd series);
//   |x| >  0.75:  Phi(-|x|) = e^(-x^2 / 2) Q(|x|), Q a rational function of
//                 degree 4 / 5 fitted on [0.75, 14.5].
// x^2 = h + l exactly (h = fl(x^2), l by an fma) and e^(-x^2/2) =
// e^(-h/2) (1 - l/2) to float accuracy, so the exponent never carries the
// rounding of x^2 (at |x| = 13 that would cost 40 ulp). |x| is clamped to
// 14.5, beyond which callers return their limits.
struct Normal {
  F32x16 inner;  // 1/2 + x P(x^2): Phi(x) where |x| <= 0.75
  F32x16 qc;     // Q(|x|) (1 - l/2): Phi(-|x|) = (qc e.q) e.s
  F32x16 c;      // 1 - l/2: phi(x) = (c e.q) e.s / sqrt(2 pi)
  ExpParts e;    // e^(-h/2)
  Mask16 outer;  // |x| > 0.75
};
MOEKIT_DETAIL_MATH Normal normal_parts(F32x16 x) {
  const F32x16 x2 = mul(x, x);
  F32x16 p = fmadd(set1(1.02941645e-04f), x2, set1(-1.18128641e-03f));
  p = fmadd(p, x2, set1(9.97234974e-03f));
  p = fmadd(p, x2, set1(-6.64902925e-02f));
  p = fmadd(p, x2, set1(3.98942292e-01f));
  const F32x16 inner = fmadd(x, p, set1(0.5f));

  const F32x16 a = min(set1(kNormalTailClamp), abs(x));  // NaN stays NaN
  const F32x16 h = mul(a, a);
  const F32x16 c = fnmadd(set1(0.5f), fmadd(a, a, neg(h)), set1(1.0f));
  F32x16 num = fmadd(set1(5.57503384e-03f), a, set1(4.89538014e-02f));
  num = fmadd(num, a, set1(2.06181809e-01f));
  num = fmadd(num, a, set1(4.66560632e-01f));
  num = fmadd(num, a, set1(5.00006139e-01f));
  F32x16 den = fmadd(set1(1.39744906e-02f), a, set1(1.22711763e-01f));
  den = fmadd(den, a, set1(5.30722618e-01f));
  den = fmadd(den, a, set1(1.29331994e+00f));
  den = fmadd(den, a, set1(1.73108804e+00f));
  den = fmadd(den, a, set1(1.0f));
  return {inner, mul(div(num, den), c), c, exp_parts(mul(set1(-0.5f), h)),
          cmp_lt(set1(0.75f), abs(x))};
}

#undef MOEKIT_DETAIL_MATH
