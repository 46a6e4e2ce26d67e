#pragma once
// Scalar models of the GEMM engine's arithmetic (moekit/cpu/gemm/), written
// from its documented rules with plain loops, for the tests to compare every
// path with bit for bit; and the float64 product they are all compared with
// to a tolerance. Also the path list the tests walk, and a thread-count scope.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moekit/cpu/gemm/gemm.hpp"
#include "moekit/cpu/isa.hpp"
#include "strided_matrix.hpp"
#include "test_support.hpp"

namespace moekit_test {

using moekit::index_t;
using moekit::cpu::GemmDtype;
using moekit::cpu::Op;

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The bf16 rounding of moekit/cpu/vec.hpp (VCVTNEPS2BF16), from its rule.
inline float round_bf16(float x) {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFU) > 0x7F800000U) return bits_float((u | 0x00400000U) & 0xFFFF0000U);
  if ((u & 0x7F800000U) == 0) return bits_float(u & 0x80000000U);
  return bits_float((u + 0x7FFFU + ((u >> 16) & 1U)) & 0xFFFF0000U);
}

// A product kept apart from any later addition (no contraction into an FMA).
inline float product(float a, float b) {
  volatile float p = a * b;
  return p;
}

// The output rule: beta = 0: alpha s; else fma(alpha, s, beta c).
inline float output(float s, float alpha, float beta, float c) {
  if (beta == 0.0f) return alpha == 1.0f ? s : product(alpha, s);
  return std::fma(alpha, s, product(beta, c));
}

// op(A) and op(B) of a test problem.
struct Operands {
  const StridedMatrix* a;
  Op op_a;
  const StridedMatrix* b;
  Op op_b;
  index_t m() const { return op_a == Op::kNone ? a->rows : a->cols; }
  index_t k() const { return op_a == Op::kNone ? a->cols : a->rows; }
  index_t n() const { return op_b == Op::kNone ? b->cols : b->rows; }
  float av(index_t i, index_t k) const { return op_a == Op::kNone ? a->at(i, k) : a->at(k, i); }
  float bv(index_t k, index_t j) const { return op_b == Op::kNone ? b->at(k, j) : b->at(j, k); }
};

// fp32 and bf16 on FMA paths: one fused chain over k from +0.
inline float fma_chain(const Operands& p, index_t i, index_t j, bool bf16) {
  float s = 0.0f;
  for (index_t k = 0; k < p.k(); ++k) {
    const float a = p.av(i, k), b = p.bv(k, j);
    s = bf16 ? std::fma(round_bf16(a), round_bf16(b), s) : std::fma(a, b, s);
  }
  return s;
}

// AMX's TDPBF16PS as the emulator documents it (moekit/cpu/gemm/tiles.hpp),
// over 32-element steps: two chains (even, odd members of the pairs) from 0,
// then added to the sum, with denormals read as and flushed to zero.
inline float flush(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x;
}
inline float amx_bf16_chain(const Operands& p, index_t i, index_t j) {
  float s = 0.0f;
  for (index_t k0 = 0; k0 < p.k(); k0 += 32) {
    float even = 0.0f, odd = 0.0f;
    for (index_t k = k0; k < k0 + 32; k += 2) {
      const auto v = [&](index_t kk, bool a_side) {
        if (kk >= p.k()) return 0.0f;
        return flush(round_bf16(a_side ? p.av(i, kk) : p.bv(kk, j)));
      };
      even = flush(std::fma(v(k, true), v(k, false), even));
      odd = flush(std::fma(v(k + 1, true), v(k + 1, false), odd));
    }
    s = flush(flush(s) + flush(even + odd));
  }
  return s;
}

// int8: the scale rule and quantization of moekit/cpu/gemm/common.hpp.
struct Int8Row {
  float scale = 0.0f, inverse = 0.0f;
};
inline Int8Row int8_scale(float amax) {
  if (!(amax > 0.0f)) return {};
  return {amax / 127.0f, 127.0f / amax};
}
inline int quantize(float x, float inverse) {
  float r = std::nearbyint(product(x, inverse));
  r = r > -127.0f ? r : -127.0f;  // max / min as the x86 instructions order them
  r = r < 127.0f ? r : 127.0f;
  return static_cast<int>(r);
}

// The int8 product's value before the output rule: exact int32 sum of the
// quantized values, times (row scale x column scale).
struct Int8Model {
  std::vector<Int8Row> rows, cols;
  std::vector<int> qa, qb;  // M x K, K x N
  index_t m = 0, n = 0, k = 0;

  explicit Int8Model(const Operands& p) : m(p.m()), n(p.n()), k(p.k()) {
    rows.resize(static_cast<std::size_t>(m));
    cols.resize(static_cast<std::size_t>(n));
    qa.resize(static_cast<std::size_t>(m * k));
    qb.resize(static_cast<std::size_t>(k * n));
    // Each row of op(A) and each column of op(B): its scale, then its values.
    const auto quantize_line = [&](Int8Row& scale, auto value, auto out) {
      float amax = 0.0f;
      for (index_t kk = 0; kk < k; ++kk) amax = std::max(amax, std::fabs(value(kk)));
      scale = int8_scale(amax);
      for (index_t kk = 0; kk < k; ++kk) out(kk) = quantize(value(kk), scale.inverse);
    };
    for (index_t i = 0; i < m; ++i)
      quantize_line(
          rows[static_cast<std::size_t>(i)], [&](index_t kk) { return p.av(i, kk); },
          [&](index_t kk) -> int& { return qa[static_cast<std::size_t>(i * k + kk)]; });
    for (index_t j = 0; j < n; ++j)
      quantize_line(
          cols[static_cast<std::size_t>(j)], [&](index_t kk) { return p.bv(kk, j); },
          [&](index_t kk) -> int& { return qb[static_cast<std::size_t>(kk * n + j)]; });
  }
  float value(index_t i, index_t j) const {
    std::int64_t s = 0;
    for (index_t kk = 0; kk < k; ++kk)
      s += std::int64_t{qa[static_cast<std::size_t>(i * k + kk)]} *
           qb[static_cast<std::size_t>(kk * n + j)];
    return product(
        static_cast<float>(static_cast<std::int32_t>(s)),
        product(rows[static_cast<std::size_t>(i)].scale, cols[static_cast<std::size_t>(j)].scale));
  }
};

// alpha op(A) op(B) + beta C in float64 (C's old values given).
inline std::vector<double> float64_product(const Operands& p, double alpha, double beta,
                                           const StridedMatrix& c_old) {
  std::vector<double> out;
  for (index_t i = 0; i < p.m(); ++i) {
    for (index_t j = 0; j < p.n(); ++j) {
      double s = 0;
      for (index_t k = 0; k < p.k(); ++k) s += double(p.av(i, k)) * p.bv(k, j);
      out.push_back(alpha * s + (beta == 0.0 ? 0.0 : beta * c_old.at(i, j)));
    }
  }
  return out;
}

// The exact model of one path kind's result, element by element.
enum class Model { kFmaChain, kBf16Chain, kAmxBf16, kInt8 };

// A path the tests run: a name, the cap that selects it and, for the
// variants, a kernel override (the AVX-512 blockings on the portable
// operations, the AMX kernels on emulated tiles).
struct GemmPathCase {
  std::string name;
  moekit::cpu::Isa limit;
  bool emulate_amx = false;
  moekit::cpu::detail::GemmKernel forced{};  // for its dtype, if run != null
};

// The cases for `dtype` this machine can run; prints those it cannot.
inline std::vector<GemmPathCase> gemm_path_cases(GemmDtype dtype) {
  namespace c = moekit::cpu;
  using moekit::cpu::Isa;
  std::vector<GemmPathCase> cases = {{"generic", Isa::kGeneric}};
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512, Isa::kAmx}) {
    if (isa == Isa::kAmx && dtype == GemmDtype::kFloat32) continue;  // fp32 runs AVX-512 there
    if (c::isa_available(isa)) {
      cases.push_back({c::isa_name(isa), isa});
    } else {
      std::printf("[ skip ] %s %s: not on this machine\n", c::gemm_dtype_name(dtype),
                  c::isa_name(isa));
    }
  }
  // The AVX-512 register blocking (12 x 32) and, for int8, VPDPBUSD's
  // unsigned-A form with its compensation, on the portable operations.
  namespace g = moekit::cpu::generic::gemm_kernels;
  c::detail::GemmKernel wide{};
  if (dtype == GemmDtype::kFloat32) wide = {g::fma_item<12, 2, false>, "generic fma 12x32"};
  if (dtype == GemmDtype::kBfloat16) wide = {g::fma_item<12, 2, true>, "generic bf16 fma 12x32"};
  if (dtype == GemmDtype::kInt8) wide = {g::int8_item<12, 2, true>, "generic int8 12x32 +128"};
  cases.push_back({"generic 12x32", Isa::kGeneric, false, wide});
  if (dtype != GemmDtype::kFloat32) cases.push_back({"amx-emulated", Isa::kGeneric, true});
  return cases;
}

// Runs `fn` with a case's path selected.
template <class Fn>
void with_path(const GemmPathCase& path, GemmDtype dtype, Fn&& fn) {
  moekit::cpu::IsaLimit limit(path.limit);
  std::unique_ptr<moekit::cpu::detail::AmxEmulation> amx;
  if (path.emulate_amx) amx = std::make_unique<moekit::cpu::detail::AmxEmulation>();
  std::unique_ptr<moekit::cpu::detail::GemmKernelOverride> forced;
  if (path.forced.run != nullptr)
    forced = std::make_unique<moekit::cpu::detail::GemmKernelOverride>(dtype, path.forced);
  fn();
}

// Which model a case's results follow exactly.
inline Model model_of(const GemmPathCase& path, GemmDtype dtype) {
  if (dtype == GemmDtype::kFloat32) return Model::kFmaChain;
  if (dtype == GemmDtype::kInt8) return Model::kInt8;
  return path.emulate_amx || path.limit == moekit::cpu::Isa::kAmx ? Model::kAmxBf16
                                                                  : Model::kBf16Chain;
}

}  // namespace moekit_test
