// Every operation vec.hpp added for the vector math, applied to two input
// vectors; included into every ISA namespace of test_vec_math.cpp (no
// include guard, on purpose: see moekit/cpu/vec.hpp), so that the paths can
// be compared bit for bit, the portable one being the oracle.

// out receives kVecOpsOutputs x 16 floats (ints and masks as float bits,
// doubles split in two floats each) for inputs a[16], b[16] and a count n.
inline constexpr int kVecOpsOutputs = 25;

MOEKIT_KERNEL_TARGET inline void vec_ops(const float* a_in, const float* b_in, int n, float* out) {
  const F32x16 a = load(a_in), b = load(b_in);
  const F32x16 one = set1(1.0f), none = zero();
  int k = 0;
  store(out + 16 * k++, fnmadd(a, b, one));
  store(out + 16 * k++, abs(a));
  store(out + 16 * k++, neg(a));
  store(out + 16 * k++, select(cmp_lt(a, b), one, none));
  store(out + 16 * k++, select(cmp_le(a, b), one, none));
  store(out + 16 * k++, select(cmp_eq(a, b), one, none));
  store(out + 16 * k++, select(is_nan(a), one, none));
  store(out + 16 * k++, select(first_lanes(n), a, b));
  store(out + 16 * k++, select(mask_or(cmp_lt(a, b), is_nan(b)), a, b));
  store(out + 16 * k++, set1(reduce_max(a)));
  store(out + 16 * k++, set1(first_lane(b)));
  store(out + 16 * k++, float_of_bits(to_i32(a)));
  store(out + 16 * k++, to_f32(to_i32(b)));
  store(out + 16 * k++, float_of_bits(add_i32(bits_of(a), set1_i32(12345))));
  store(out + 16 * k++, float_of_bits(sub_i32(bits_of(a), bits_of(b))));
  store(out + 16 * k++, float_of_bits(and_i32(bits_of(a), set1_i32(0x7f800000))));
  store(out + 16 * k++, float_of_bits(shl_i32<7>(bits_of(b))));
  store(out + 16 * k++, float_of_bits(sra_i32<9>(bits_of(a))));
  // int8 loads (the inputs' bytes), wrapping int32 products and the exact sum.
  const auto* a_bytes = reinterpret_cast<const std::int8_t*>(a_in);
  const auto* b_bytes = reinterpret_cast<const std::int8_t*>(b_in);
  store(out + 16 * k++, float_of_bits(mul_i32(load_i8(a_bytes + 3), load_i8(b_bytes + 40))));
  std::int32_t stored[16];
  store_i32(stored, mul_i32(bits_of(a), bits_of(b)));
  store(out + 16 * k++, float_of_bits(load_i32(stored)));
  store(out + 16 * k++,
        float_of_bits(set1_i32(reduce_add_i32(add_i32(load_i32(stored), load_i8(a_bytes + 17))))));
  // F64x16: a * b - a + b in double, summed; split into float pairs.
  const F64x16 da = to_f64(a), db = to_f64(b);
  const F64x16 r = add(sub(mul(da, db), da), db);
  const double total = reduce_add(r);
  const double lane0 = reduce_add(mul(r, to_f64(select(first_lanes(1), one, none))));
  const float parts[4] = {
      static_cast<float>(total),
      static_cast<float>(total - static_cast<double>(static_cast<float>(total))),
      static_cast<float>(lane0),
      static_cast<float>(lane0 - static_cast<double>(static_cast<float>(lane0)))};
  for (int i = 0; i < 4; ++i) store(out + 16 * k++, set1(parts[i]));
}
