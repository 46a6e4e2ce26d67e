#pragma once
// Which instruction set the CPU backend's hand-written kernels run on, chosen
// at run time from what the processor and the operating system support.
//
// Users need no -m flags: every kernel that uses an extension is compiled
// for it through a target attribute (MOEKIT_TARGET_* below) and is called
// only after the check here says the machine has it. The paths, from the
// widest down (each includes the ones below it):
//
//   kAmx      AMX tiles (TILE, BF16, INT8) with the kernel's permission to
//             use tile data (Linux: arch_prctl), on top of kAvx512
//   kAvx512   AVX-512 F, BW, VL, DQ (plus BF16 and VNNI where present:
//             see CpuFeatures)
//   kAvx2     AVX2, FMA and F16C
//   kGeneric  portable C++ and Eigen, whatever the compiler targets
//
// The active path is the widest the machine has, capped by the environment
// variable MOEKIT_CPU_ISA (generic, avx2, avx512 or amx; read once) and by
// set_isa_limit(), so that every path can be run and tested on one machine.
//
// One-definition rule. A header-only library is compiled into translation
// units with different flags; an inline function whose code depends on those
// flags (a vector width, a constant) then has different definitions and the
// linker keeps one of them at random. So code for one extension lives in a
// namespace of its own (cpu::avx2, cpu::avx512, cpu::amx) and carries its
// target attribute itself, and nothing that decides a result or a size
// (workspace sizes, packing layouts, reduction orders) may depend on the
// compiler's target macros (__AVX512F__ and friends).

#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define MOEKIT_DETAIL_X86 1
#include <cpuid.h>
#else
// 1 where cpuid and xgetbv can be asked (x86 with GCC or Clang), else 0:
// only the generic path then.
#define MOEKIT_DETAIL_X86 0
#endif
#if MOEKIT_DETAIL_X86 && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

// Target attributes of the per-extension kernels. AVX-512 kernels may use
// the BF16 and VNNI instructions only behind a CpuFeatures check.
#if MOEKIT_DETAIL_X86
#define MOEKIT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MOEKIT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define MOEKIT_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#define MOEKIT_TARGET_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define MOEKIT_TARGET_AMX                                                     \
  __attribute__((                                                             \
      target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512dq," \
             "avx512bf16,avx512vnni,avx2,fma,f16c")))
#endif

MOEKIT_NAMESPACE_BEGIN
namespace cpu {

// A kernel path, ordered from the narrowest (see the top of this file).
enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

// The path's lower-case name, as MOEKIT_CPU_ISA spells it ("avx2").
constexpr const char* isa_name(Isa isa) noexcept {
  switch (isa) {
    case Isa::kGeneric:
      return "generic";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAmx:
      return "amx";
  }
  return "unknown";
}

// The Isa named by `name` (isa_name's spelling), or false.
constexpr bool parse_isa(std::string_view name, Isa& out) noexcept {
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512, Isa::kAmx}) {
    if (name == isa_name(isa)) {
      out = isa;
      return true;
    }
  }
  return false;
}

// What the processor offers and the operating system has enabled.
struct CpuFeatures {
  bool avx2 = false;         // AVX2 + FMA + F16C, with AVX state enabled
  bool avx512 = false;       // F + BW + VL + DQ, with the ZMM and mask state enabled
  bool avx512_bf16 = false;  // VDPBF16PS and the bf16 conversions
  bool avx512_vnni = false;  // VPDPBUSD
  bool amx = false;          // TILE + BF16 + INT8, tile data permitted for this process

  // The widest path these features allow.
  constexpr Isa best() const noexcept {
    if (amx) return Isa::kAmx;
    if (avx512) return Isa::kAvx512;
    if (avx2) return Isa::kAvx2;
    return Isa::kGeneric;
  }
};

namespace detail {

#if MOEKIT_DETAIL_X86
struct CpuidRegs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};
inline CpuidRegs cpuid(unsigned leaf, unsigned sub) {
  CpuidRegs r;
  if (__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d) == 0) r = {};
  return r;
}
inline constexpr bool bit(unsigned reg, int i) { return ((reg >> i) & 1U) != 0; }

// XCR0: the register state the OS saves on a context switch (xgetbv, only
// valid when OSXSAVE is set).
inline unsigned long long xcr0() {
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Linux gives a process AMX tile data only on request (it enlarges every
// signal frame); granted once, it holds for every thread of the process.
inline bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchGetXcompPerm = 0x1022;
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr unsigned long kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long permitted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &permitted) != 0) return false;
  return ((permitted >> kXfeatureXtiledata) & 1UL) != 0;
#else
  return false;  // other systems: no AMX path
#endif
}

inline CpuFeatures detect_cpu_features() {
  CpuFeatures f;
  const unsigned max_leaf = cpuid(0, 0).a;
  if (max_leaf < 7) return f;
  const CpuidRegs l1 = cpuid(1, 0);
  if (!bit(l1.c, 27)) return f;  // no OSXSAVE: the OS manages no extended state
  const unsigned long long xcr = xcr0();
  const bool ymm_state = (xcr & 0x6) == 0x6;                 // SSE + AVX
  const bool zmm_state = ymm_state && (xcr & 0xE0) == 0xE0;  // opmask + ZMM halves
  const bool tile_state = (xcr & 0x60000) == 0x60000;        // TILECFG + TILEDATA
  const CpuidRegs l7 = cpuid(7, 0);
  const CpuidRegs l7s1 = cpuid(7, 1);

  f.avx2 = ymm_state && bit(l1.c, 28) && bit(l1.c, 12) && bit(l1.c, 29) && bit(l7.b, 5);
  f.avx512 =
      f.avx2 && zmm_state && bit(l7.b, 16) && bit(l7.b, 17) && bit(l7.b, 30) && bit(l7.b, 31);
  f.avx512_bf16 = f.avx512 && bit(l7s1.a, 5);
  f.avx512_vnni = f.avx512 && bit(l7.c, 11);
  const bool amx_cpu = bit(l7.d, 24) && bit(l7.d, 22) && bit(l7.d, 25);
  f.amx = f.avx512_bf16 && f.avx512_vnni && amx_cpu && tile_state && request_amx_permission();
  return f;
}
#else
inline CpuFeatures detect_cpu_features() { return {}; }
#endif

// MOEKIT_CPU_ISA, read once: the cap it names, or kAmx (no cap) when unset.
inline Isa environment_isa_limit() {
  static const Isa limit = [] {
    const char* value = std::getenv("MOEKIT_CPU_ISA");
    if (value == nullptr || *value == '\0') return Isa::kAmx;
    Isa parsed = Isa::kAmx;
    if (!parse_isa(value, parsed)) {
      moekit::detail::fail(Errc::kInvalidArgument, "active_isa",
                           std::string("environment variable MOEKIT_CPU_ISA = '") + value +
                               "' names no CPU path (expected generic, avx2, avx512 or amx)");
    }
    return parsed;
  }();
  return limit;
}

inline std::atomic<int>& isa_limit_slot() {
  static std::atomic<int> slot{static_cast<int>(Isa::kAmx)};
  return slot;
}

}  // namespace detail

// The processor's features, detected once per process (the first call also
// asks Linux for AMX tile data).
inline const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detail::detect_cpu_features();
  return features;
}

// Whether kernels of `isa` can run on this machine (whatever the caps).
inline bool isa_available(Isa isa) { return isa <= cpu_features().best(); }

// Caps the path for the whole process (tests, or a program that wants, say,
// AVX-512 results on an AMX machine). Returns the previous cap.
inline Isa set_isa_limit(Isa limit) {
  return static_cast<Isa>(detail::isa_limit_slot().exchange(static_cast<int>(limit)));
}
// The cap set_isa_limit() set; Isa::kAmx (no cap) by default.
inline Isa isa_limit() { return static_cast<Isa>(detail::isa_limit_slot().load()); }

// The path the CPU kernels take now: the widest available one under both
// caps. A cap above what the machine has selects what the machine has.
inline Isa active_isa() {
  Isa isa = cpu_features().best();
  if (isa_limit() < isa) isa = isa_limit();
  if (detail::environment_isa_limit() < isa) isa = detail::environment_isa_limit();
  return isa;
}

// Caps the path for the lifetime of a scope: IsaLimit scope(Isa::kAvx2);
class IsaLimit {
 public:
  // Caps the path at `limit` until the destructor restores the previous cap.
  explicit IsaLimit(Isa limit) : previous_(set_isa_limit(limit)) {}
  ~IsaLimit() { set_isa_limit(previous_); }
  IsaLimit(const IsaLimit&) = delete;
  IsaLimit& operator=(const IsaLimit&) = delete;

 private:
  Isa previous_;
};

}  // namespace cpu
MOEKIT_NAMESPACE_END
