// Includes the kernel file named by MOEKIT_PER_ISA_FILE into every ISA
// namespace (cpu::generic, and on x86 cpu::avx2 and cpu::avx512), each time
// with MOEKIT_KERNEL_TARGET set to that namespace's target attribute (see
// moekit/cpu/vec.hpp). Include it inside namespace moekit::cpu:
//
//   namespace cpu {
//   #define MOEKIT_PER_ISA_FILE "moekit/cpu/detail/my_kernel-inl.hpp"
//   #include "moekit/cpu/detail/per_isa.hpp"
//   #undef MOEKIT_PER_ISA_FILE
//   }
//
// No include guard, on purpose: it is included once per kernel file.

namespace generic {
#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_GENERIC
#include MOEKIT_PER_ISA_FILE
#undef MOEKIT_KERNEL_TARGET
}  // namespace generic

#if MOEKIT_DETAIL_X86
namespace avx2 {
#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_AVX2
#include MOEKIT_PER_ISA_FILE
#undef MOEKIT_KERNEL_TARGET
}  // namespace avx2

MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_BEGIN
namespace avx512 {
#define MOEKIT_KERNEL_TARGET MOEKIT_TARGET_AVX512
#include MOEKIT_PER_ISA_FILE
#undef MOEKIT_KERNEL_TARGET
}  // namespace avx512
MOEKIT_DETAIL_SILENCE_INTRINSIC_WARNINGS_END
#endif
