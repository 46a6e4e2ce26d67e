#pragma once
// AMX tiles behind one small interface, so that the AMX kernels are written
// once (gemm/detail/amx_kernel-inl.hpp) and run on two implementations:
//
//   HardwareTiles   the instructions (x86-64 with AMX; inline assembly, so no
//                   compiler flag or intrinsic header version is needed)
//   EmulatedTiles   the documented semantics in portable C++: the tile
//                   configuration (palette 1: 8 tiles of at most 16 rows x 64
//                   bytes), loads and stores with a row stride, zeroing, and
//                   the dot products TDPBF16PS, TDPBSSD and TDPBUSD
//
// The emulator lets the kernels' configurations, packing, loops and edges run
// and be tested on any machine; where AMX exists the same tests run the
// instructions. A kernel names tiles by compile-time numbers (the
// instructions encode them), hence the template parameters.
//
// Emulated arithmetic, per the Intel SDM's description of the instructions:
//   TDPBSSD / TDPBUSD: exact int32 sums of the four-byte dot products
//     (wrapping, as the instructions do).
//   TDPBF16PS: per element, two FP32 fused chains (the even and the odd
//     member of each bf16 pair) over the instruction's pairs, each step
//     rounded to nearest even with denormal inputs read as zero and denormal
//     results flushed to zero; their sum is then added to the accumulator.
//     Whether silicon rounds every step exactly so is not something this
//     machine can check: the AMX tests compare the hardware with float64,
//     and report (without asserting) how many elements differ from the
//     emulator bit for bit.
// Shape violations (a dot product on tiles whose configured shapes do not
// fit, a tile used before configuration) raise an error, where the
// instructions would fault.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/types.hpp"
#include "moekit/cpu/isa.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// The 64-byte operand of LDTILECFG (palette 1).
struct TileConfig {
  std::uint8_t palette_id = 0;
  std::uint8_t start_row = 0;
  std::uint8_t reserved0[14] = {};
  std::uint16_t colsb[16] = {};  // bytes per row of tile i (tiles 8-15 unused)
  std::uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64);

inline constexpr int kTileCount = 8;
inline constexpr int kTileMaxRows = 16;
inline constexpr int kTileMaxColsb = 64;

class EmulatedTiles {
 public:
  void configure(const TileConfig& config) {
    MOEKIT_CHECK(config.palette_id == 1, Errc::kInvalidArgument, "ldtilecfg: palette ",
                 int{config.palette_id}, " (only palette 1 is emulated)");
    for (int t = 0; t < kTileCount; ++t) {
      MOEKIT_CHECK(config.rows[t] <= kTileMaxRows && config.colsb[t] <= kTileMaxColsb &&
                       (config.rows[t] == 0) == (config.colsb[t] == 0),
                   Errc::kInvalidArgument, "ldtilecfg: tile ", t, " is ", int{config.rows[t]},
                   " rows x ", config.colsb[t], " bytes");
    }
    config_ = config;
    std::memset(data_, 0, sizeof data_);
    configured_ = true;
  }
  void release() {
    config_ = TileConfig{};
    std::memset(data_, 0, sizeof data_);
    configured_ = false;
  }

  template <int T>
  void zero() {
    shape<T>("tilezero");
    std::memset(data_[T], 0, sizeof data_[T]);
  }

  // Rows [0, rows) of `colsb` bytes from base + r * stride; the rest of the
  // tile becomes zero.
  template <int T>
  void load(const void* base, index_t stride) {
    const Shape s = shape<T>("tileloadd");
    std::memset(data_[T], 0, sizeof data_[T]);
    for (int r = 0; r < s.rows; ++r)
      std::memcpy(data_[T] + r * kTileMaxColsb, static_cast<const std::byte*>(base) + r * stride,
                  static_cast<std::size_t>(s.colsb));
  }
  template <int T>
  void store(void* base, index_t stride) const {
    const Shape s = shape<T>("tilestored");
    for (int r = 0; r < s.rows; ++r)
      std::memcpy(static_cast<std::byte*>(base) + r * stride, data_[T] + r * kTileMaxColsb,
                  static_cast<std::size_t>(s.colsb));
  }

  // C (rows x n fp32) += A (rows x K bf16 pairs) B (K rows x n bf16 pairs).
  template <int C, int A, int B>
  void dpbf16ps() {
    const Dot d = dot_shape<C, A, B>("tdpbf16ps");
    for (int m = 0; m < d.rows; ++m) {
      for (int n = 0; n < d.n; ++n) {
        float even = 0.0f, odd = 0.0f;
        for (int k = 0; k < d.k; ++k) {
          even = fma_ftz(bf16_at<A>(m, 2 * k), bf16_at<B>(k, 2 * n), even);
          odd = fma_ftz(bf16_at<A>(m, 2 * k + 1), bf16_at<B>(k, 2 * n + 1), odd);
        }
        const float acc = daz(f32_at<C>(m, n));
        set_f32<C>(m, n, ftz(acc + ftz(even + odd)));
      }
    }
  }
  // Int32 sums of byte quadruples: signed x signed, unsigned x signed.
  template <int C, int A, int B>
  void dpbssd() {
    int8_dot<C, A, B, true>("tdpbssd");
  }
  template <int C, int A, int B>
  void dpbusd() {
    int8_dot<C, A, B, false>("tdpbusd");
  }

 private:
  struct Shape {
    int rows, colsb;
  };
  struct Dot {
    int rows, n, k;  // C rows, C columns (4-byte elements), A's 4-byte groups
  };

  template <int T>
  Shape shape(const char* instruction) const {
    static_assert(T >= 0 && T < kTileCount);
    MOEKIT_CHECK(configured_ && config_.rows[T] > 0, Errc::kInvalidArgument, instruction, ": tile ",
                 T, " is not configured");
    return {config_.rows[T], config_.colsb[T]};
  }
  template <int C, int A, int B>
  Dot dot_shape(const char* instruction) const {
    const Shape c = shape<C>(instruction), a = shape<A>(instruction), b = shape<B>(instruction);
    MOEKIT_CHECK(c.rows == a.rows && c.colsb == b.colsb && a.colsb / 4 == b.rows &&
                     c.colsb % 4 == 0 && a.colsb % 4 == 0,
                 Errc::kInvalidArgument, instruction, ": shapes C ", c.rows, " x ", c.colsb,
                 " B, A ", a.rows, " x ", a.colsb, " B, B ", b.rows, " x ", b.colsb,
                 " B do not fit");
    return {c.rows, c.colsb / 4, a.colsb / 4};
  }

  template <int T>
  float bf16_at(int r, int i) const {
    std::uint16_t h;
    std::memcpy(&h, data_[T] + r * kTileMaxColsb + 2 * i, sizeof h);
    const std::uint32_t u = std::uint32_t{h} << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return daz(f);
  }
  template <int T>
  float f32_at(int r, int i) const {
    float f;
    std::memcpy(&f, data_[T] + r * kTileMaxColsb + 4 * i, sizeof f);
    return f;
  }
  template <int T>
  void set_f32(int r, int i, float f) {
    std::memcpy(data_[T] + r * kTileMaxColsb + 4 * i, &f, sizeof f);
  }

  template <int C, int A, int B, bool kSignedA>
  void int8_dot(const char* instruction) {
    const Dot d = dot_shape<C, A, B>(instruction);
    for (int m = 0; m < d.rows; ++m) {
      for (int n = 0; n < d.n; ++n) {
        std::int32_t acc;
        std::memcpy(&acc, data_[C] + m * kTileMaxColsb + 4 * n, sizeof acc);
        // Wrapping int32 arithmetic, done in unsigned to stay defined.
        auto sum = static_cast<std::uint32_t>(acc);
        for (int k = 0; k < d.k; ++k) {
          for (int t = 0; t < 4; ++t) {
            const auto a_byte =
                std::to_integer<std::uint8_t>(data_[A][m * kTileMaxColsb + 4 * k + t]);
            const int a = kSignedA ? static_cast<std::int8_t>(a_byte) : int{a_byte};
            const int b = static_cast<std::int8_t>(
                std::to_integer<std::uint8_t>(data_[B][k * kTileMaxColsb + 4 * n + t]));
            sum += static_cast<std::uint32_t>(a * b);
          }
        }
        acc = static_cast<std::int32_t>(sum);
        std::memcpy(data_[C] + m * kTileMaxColsb + 4 * n, &acc, sizeof acc);
      }
    }
  }

  static float daz(float x) {
    return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x;
  }
  static float ftz(float x) { return daz(x); }
  static float fma_ftz(float a, float b, float c) { return ftz(std::fma(a, b, c)); }

  TileConfig config_{};
  alignas(64) std::byte data_[kTileCount][kTileMaxRows * kTileMaxColsb] = {};
  bool configured_ = false;
};

#if MOEKIT_DETAIL_X86 && defined(__x86_64__)
#define MOEKIT_HAS_HARDWARE_TILES 1

// The instructions, in both assembler dialects (as the compilers' own AMX
// headers write them). Call only where cpu_features().amx holds.
class HardwareTiles {
 public:
  void configure(const TileConfig& config) {
    __asm__ volatile("{ldtilecfg\t%0|ldtilecfg\t%0}" ::"m"(config) : "memory");
  }
  void release() { __asm__ volatile("tilerelease" ::: "memory"); }

  template <int T>
  void zero() {
    __asm__ volatile("{tilezero\t%%tmm%c0|tilezero\ttmm%c0}" ::"i"(T));
  }
  template <int T>
  void load(const void* base, index_t stride) {
    __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm%c2|tileloadd\ttmm%c2, [%0+%1*1]}" ::"r"(base),
                     "r"(stride), "i"(T)
                     : "memory");
  }
  template <int T>
  void store(void* base, index_t stride) const {
    __asm__ volatile("{tilestored\t%%tmm%c2, (%0,%1,1)|tilestored\t[%0+%1*1], tmm%c2}" ::"r"(base),
                     "r"(stride), "i"(T)
                     : "memory");
  }
  template <int C, int A, int B>
  void dpbf16ps() {
    __asm__ volatile(
        "{tdpbf16ps\t%%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbf16ps\ttmm%c0, tmm%c1, tmm%c2}" ::"i"(C),
        "i"(A), "i"(B));
  }
  template <int C, int A, int B>
  void dpbssd() {
    __asm__ volatile(
        "{tdpbssd\t%%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbssd\ttmm%c0, tmm%c1, tmm%c2}" ::"i"(C), "i"(A),
        "i"(B));
  }
  template <int C, int A, int B>
  void dpbusd() {
    __asm__ volatile(
        "{tdpbusd\t%%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbusd\ttmm%c0, tmm%c1, tmm%c2}" ::"i"(C), "i"(A),
        "i"(B));
  }
};
#else
#define MOEKIT_HAS_HARDWARE_TILES 0
#endif

}  // namespace cpu
MOEKIT_NAMESPACE_END
