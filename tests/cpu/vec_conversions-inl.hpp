// The conversions of moekit/cpu/vec.hpp on 16 values, written once and
// included into every ISA namespace of test_gemm.cpp (no include guard, on
// purpose: see moekit/cpu/vec.hpp).
struct VecConversions {
  float rounded[16];          // round_bf16(x)
  std::uint16_t bits[16];     // store_bf16(x)
  float even[16], odd[16];    // load_bf16_pairs(bits, then 16 zeros)
  std::int8_t quantized[16];  // store_int8(x)
  float from_ints[16];        // load_int32(ints)
  float amax;                 // reduce_max(abs(x))
};

MOEKIT_KERNEL_TARGET inline VecConversions vec_conversions(const float* x,
                                                           const std::int32_t* ints) {
  VecConversions out;
  const F32x16 v = load(x);
  store(out.rounded, round_bf16(v));
  store_bf16(out.bits, v);
  std::uint16_t pairs[32] = {};
  for (int i = 0; i < 16; ++i) pairs[i] = out.bits[i];
  F32x16 even, odd;
  load_bf16_pairs(pairs, even, odd);
  store(out.even, even);
  store(out.odd, odd);
  store_int8(out.quantized, v);
  store(out.from_ints, load_int32(ints));
  out.amax = reduce_max(abs(v));
  return out;
}
