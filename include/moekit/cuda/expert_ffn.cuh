#pragma once
// Expert FFNs over the expert-major buffer on the CUDA backend, forward and
// backward, for MoeSpec<E, K> and activations of type T (fp32, bf16, fp16):
// the math and weight layout of moekit/cpu/expert_ffn.hpp (docs/math.md).
//
//   w1  (E d_ff) x d,  w3 (E d_ff) x d (gated only),  w2 (E d) x d_ff   (row-major)
//   a = X W1^T,  h = act(a) [* X W3^T],  y = h W2^T        for expert e's rows X
//
// How. Each GEMM of the FFN is ONE cuBLAS grouped GEMM
// (cublasGemmGroupedBatchedEx) over the non-empty experts, fp32 accumulation
// (CUBLAS_COMPUTE_32F), outputs rounded once to T; the activation and the
// gate product are one element-wise kernel between the GEMMs (the same
// routing::activate / activate_grad as the CPU). Empty experts cost nothing.
//
// Host offsets. cuBLAS takes the group shapes as host arrays, so forward and
// backward take the expert offsets (E + 1) in HOST memory: copy
// gpu::plan_dispatch's offsets back (8 (E + 1) bytes and one stream
// synchronisation per layer), or pass offsets the host already knows. The
// rows [offsets[e], offsets[e + 1]) may include gpu::dispatch's zero padding
// rows; their outputs are FFN(0) = 0 for every activation here.
//
// Conventions. The calls validate everything on the host first and throw
// moekit::Error (a bad argument, or a CUDA / cuBLAS failure afterwards): the
// class owns no handle and mixes cuBLAS and CUDA statuses, so one error type
// is simpler than CUB's returned cudaError_t. The caller's cuBLAS handle is
// set to `stream` only where it is on another stream (cublasSetStream drops
// a workspace given by cublasSetWorkspace, so set the stream before the
// workspace and pass the same stream here). The caller's workspace
// (workspace_size()) holds h, dh and the GEMMs' pointer arrays; cuBLAS
// keeps its own workspace (give it one with cublasSetWorkspace to stop it
// allocating). Where cuBLAS does not support a grouped GEMM's types (bf16 /
// fp16 inputs with fp32 gradients may not be), that GEMM runs as one
// cublasGemmEx per expert instead. Saved activations a and g
// are caller memory of type T, as on the CPU; an empty output or weight
// gradient is not computed; with grads.accumulate the GEMMs add (beta = 1).
// The pointer arrays travel by a pageable cudaMemcpyAsync, so the calls
// cannot be captured into a CUDA graph (a device-side pointer-array kernel
// would lift that).

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "moekit/core/activation.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cuda/dispatch.cuh"
#include "moekit/cuda/error.cuh"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace gpu {

// The experts' shape and nonlinearity (as cpu::ExpertFfnConfig).
struct ExpertFfnConfig {
  index_t d_model = 0;                            // d, token width, >= 1
  index_t d_ff = 0;                               // width of one expert, >= 1
  FfnKind kind = FfnKind::kPlain;                 // kGated adds W3: h = act(a) * X W3^T
  Activation activation = Activation::kGeluTanh;  // act
};

// The weights of all E experts, device memory (layout at the top).
template <ActivationElement T>
struct ExpertWeights {
  MatrixView<const T> w1{};  // (E d_ff) x d
  MatrixView<const T> w3{};  // (E d_ff) x d, kGated only
  MatrixView<const T> w2{};  // (E d) x d_ff
};

// Weight gradients, device memory, of element G: T, or float with T = bf16 /
// fp16 for fp32 gradients (mixed-precision training keeps its gradients and
// master weights in fp32; the GEMMs then write fp32 directly, no rounding to
// T in between). An empty view is frozen.
template <class G>
struct ExpertGrads {
  MatrixView<G> dw1{};      // (E d_ff) x d
  MatrixView<G> dw3{};      // (E d_ff) x d, kGated only
  MatrixView<G> dw2{};      // (E d) x d_ff
  bool accumulate = false;  // add to the gradients instead of overwriting them
};

namespace detail {

template <class T>
constexpr cudaDataType_t cuda_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return CUDA_R_16BF;
  return CUDA_R_16F;
}

// Puts `handle` on `stream` unless it is there already: cublasSetStream
// resets the handle's workspace to cuBLAS's own pool, which would undo the
// caller's cublasSetWorkspace on every call.
inline void use_stream(cublasHandle_t handle, cudaStream_t stream) {
  cudaStream_t current = nullptr;
  MOEKIT_CUBLAS_CHECK(cublasGetStream(handle, &current));
  if (current != stream) MOEKIT_CUBLAS_CHECK(cublasSetStream(handle, stream));
}

// h = act(a) * g (gated: g not empty) or act(a), rows [0, rows), in fp32,
// V elements at a time (16-byte vectors where every row allows them).
template <Activation A, int V, class T>
__global__ void __launch_bounds__(256)
    activate_kernel(MatrixView<const T> a, MatrixView<const T> g, MatrixView<T> h, index_t rows) {
  const index_t f = a.cols();
  const index_t chunks = rows * f / V;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i * V / f, c = i * V - r * f;
    float x[V], gate[V];
    load_chunk<V>(&a(r, c), x);
    if (!g.empty()) load_chunk<V>(&g(r, c), gate);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = activate(A, x[k]) * (g.empty() ? 1.0f : gate[k]);
    store_chunk<V>(&h(r, c), x);
  }
}

// Its backward, dh in `d` overwritten with da: gated, dg = dh * act(a) and
// da = dh * g * act'(a); else da = dh * act'(a).
template <Activation A, int V, class T>
__global__ void __launch_bounds__(256)
    activate_backward_kernel(MatrixView<const T> a, MatrixView<const T> g, MatrixView<T> d,
                             MatrixView<T> dg, index_t rows) {
  const index_t f = a.cols();
  const index_t chunks = rows * f / V;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i * V / f, c = i * V - r * f;
    float x[V], dh[V], gate[V], out[V];
    load_chunk<V>(&a(r, c), x);
    load_chunk<V>(&d(r, c), dh);
    if (!g.empty()) {
      load_chunk<V>(&g(r, c), gate);
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = dh[k] * activate(A, x[k]);
      store_chunk<V>(&dg(r, c), out);
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = dh[k] * gate[k] * activate_grad(A, x[k]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = dh[k] * activate_grad(A, x[k]);
    }
    store_chunk<V>(&d(r, c), out);
  }
}

inline int elementwise_grid(index_t n) {
  const index_t blocks = (n + 255) / 256;
  return static_cast<int>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

// Whether a grouped GEMM's status says cuBLAS lacks it for these types
// (CUBLAS_STATUS_NOT_SUPPORTED, returned before any work is queued): the
// GEMMs then run one cublasGemmEx per group.
inline bool grouped_gemm_unsupported(cublasStatus_t status) {
  return status == CUBLAS_STATUS_NOT_SUPPORTED;
}

// How GroupedGemm::run runs its groups: kAuto tries the grouped call and
// falls back per group; kPerGroup goes straight to the fallback (tests).
enum class GroupedGemmPath { kAuto, kPerGroup };

// One grouped GEMM, C_i = alpha op(A_i) op(B_i) + beta C_i in cuBLAS's
// column-major terms, gathered on the host group by group (one group per
// expert) and run by run(): the pointer arrays go to device memory
// (`slots` pointers of it per array), then one cuBLAS call.
class GroupedGemm {
 public:
  void add(cublasOperation_t ta, cublasOperation_t tb, index_t m, index_t n, index_t k,
           const void* a, index_t lda, const void* b, index_t ldb, void* c, index_t ldc,
           float beta) {
    ta_.push_back(ta);
    tb_.push_back(tb);
    m_.push_back(narrow(m));
    n_.push_back(narrow(n));
    k_.push_back(narrow(k));
    lda_.push_back(narrow(lda));
    ldb_.push_back(narrow(ldb));
    ldc_.push_back(narrow(ldc));
    alpha_.push_back(1.0f);
    beta_.push_back(beta);
    pointers_a_.push_back(a);
    pointers_b_.push_back(b);
    pointers_c_.push_back(c);
  }

  // A and B of `type`, C of `c_type` (the same, or fp32 for fp32 gradients).
  // One cublasGemmGroupedBatchedEx, or, where cuBLAS does not support the
  // types (bf16 / fp16 inputs with an fp32 C may not be), one cublasGemmEx
  // per group. Returns whether the grouped call ran.
  bool run(cublasHandle_t handle, cudaDataType_t type, void** device_pointers, cudaStream_t stream,
           cudaDataType_t c_type, GroupedGemmPath path = GroupedGemmPath::kAuto) {
    const int groups = static_cast<int>(m_.size());
    if (groups == 0) return true;
    if (path == GroupedGemmPath::kAuto) {
      std::vector<const void*> all(pointers_a_);
      all.insert(all.end(), pointers_b_.begin(), pointers_b_.end());
      all.insert(all.end(), pointers_c_.begin(), pointers_c_.end());
      // Pageable memory: the copy is staged before the call returns, and
      // runs in stream order before the GEMM that reads it.
      MOEKIT_CUDA_CHECK(cudaMemcpyAsync(device_pointers, all.data(), all.size() * sizeof(void*),
                                        cudaMemcpyHostToDevice, stream));
      const std::vector<int> sizes(static_cast<std::size_t>(groups), 1);
      const cublasStatus_t status = cublasGemmGroupedBatchedEx(
          handle, ta_.data(), tb_.data(), m_.data(), n_.data(), k_.data(), alpha_.data(),
          const_cast<const void* const*>(device_pointers), type, lda_.data(),
          const_cast<const void* const*>(device_pointers + groups), type, ldb_.data(), beta_.data(),
          device_pointers + 2 * groups, c_type, ldc_.data(), groups, sizes.data(),
          CUBLAS_COMPUTE_32F);
      if (!grouped_gemm_unsupported(status)) {
        MOEKIT_CUBLAS_CHECK(status);
        return true;
      }
    }
    for (std::size_t i = 0; i < m_.size(); ++i) {
      MOEKIT_CUBLAS_CHECK(cublasGemmEx(handle, ta_[i], tb_[i], m_[i], n_[i], k_[i], &alpha_[i],
                                       pointers_a_[i], type, lda_[i], pointers_b_[i], type, ldb_[i],
                                       &beta_[i], pointers_c_[i], c_type, ldc_[i],
                                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    return false;
  }

 private:
  static int narrow(index_t v) {
    MOEKIT_CHECK_ARG(v >= 0 && v <= 0x7FFFFFFF, "a GEMM dimension ", v, " exceeds 32 bits");
    return static_cast<int>(v);
  }
  std::vector<cublasOperation_t> ta_, tb_;
  std::vector<int> m_, n_, k_, lda_, ldb_, ldc_;
  std::vector<float> alpha_, beta_;
  std::vector<const void*> pointers_a_, pointers_b_;
  std::vector<void*> pointers_c_;
};

}  // namespace detail

// The E expert FFNs of a MoE layer over the expert-major buffer (math and
// layout at the top), on cuBLAS grouped GEMMs. Holds only the configuration;
// weights, buffers and workspace are caller memory.
template <MoeSpecType S, ActivationElement T>
class ExpertFfn {
 public:
  static constexpr int kExperts = S::num_experts;  // E

  // Rejects a configuration it cannot run (naming the field and value).
  explicit ExpertFfn(const ExpertFfnConfig& config) : config_(config) {
    MOEKIT_CHECK_ARG(config.d_model >= 1, "d_model = ", config.d_model, " is not positive");
    MOEKIT_CHECK_ARG(config.d_ff >= 1, "d_ff = ", config.d_ff, " is not positive");
    MOEKIT_CHECK_ARG(config.kind == FfnKind::kPlain || config.kind == FfnKind::kGated,
                     "kind = ", static_cast<int>(config.kind), " is not an FfnKind");
    MOEKIT_CHECK_ARG(
        config.activation == Activation::kRelu || config.activation == Activation::kGeluTanh ||
            config.activation == Activation::kGeluErf || config.activation == Activation::kSilu,
        "activation = ", static_cast<int>(config.activation), " is not an Activation");
  }

  // The configuration, as constructed.
  const ExpertFfnConfig& config() const { return config_; }
  // Whether the experts are gated (W3 present).
  bool gated() const { return config_.kind == FfnKind::kGated; }

  // Bytes of device workspace for an N-row buffer: two N x d_ff matrices of
  // T and the pointer arrays (3 E pointers), each 256-byte aligned.
  std::size_t workspace_size(index_t rows) const {
    MOEKIT_CHECK_ARG(rows >= 0, "rows = ", rows, " is negative");
    return 2 * matrix_bytes(rows) + detail::round_up(3 * kExperts * sizeof(void*));
  }

  // y = FFN_e(buffer rows of e) for every expert. buffer, y: N x d;
  // saved_pre, saved_gate: N x d_ff or empty (saved_gate empty for kPlain).
  // host_offsets[E] <= N: rows from host_offsets[E] on are not touched (a
  // buffer sized by max_dispatch_rows() is larger than the rows in use).
  void forward(cublasHandle_t handle, MatrixView<const T> buffer,
               VectorView<const index_t> host_offsets, const ExpertWeights<T>& w, MatrixView<T> y,
               MatrixView<T> saved_pre, MatrixView<T> saved_gate, void* workspace,
               std::size_t workspace_bytes, cudaStream_t stream = nullptr) const {
    MOEKIT_API("gpu::ExpertFfn::forward");
    const index_t n = check_common(buffer, host_offsets, w, workspace, workspace_bytes);
    const index_t d = config_.d_model, f = config_.d_ff;
    check_shape(y, n, d, "y");
    if (!saved_pre.empty()) check_shape(saved_pre, n, f, "saved_pre");
    if (gated() && !saved_gate.empty()) check_shape(saved_gate, n, f, "saved_gate");
    if (!gated()) check_absent(saved_gate, "saved_gate");
    OverlapCheck("gpu::ExpertFfn::forward")
        .out(Footprints{{y, "y"},
                        {saved_pre, "saved_pre"},
                        {saved_gate, "saved_gate"},
                        detail::temp_storage(workspace, workspace_size(n))})
        .in(Footprints{{buffer, "buffer"}, {w.w1, "w.w1"}, {w.w3, "w.w3"}, {w.w2, "w.w2"}})
        .check();
    if (n == 0) return;
    detail::use_stream(handle, stream);

    const MatrixView<T> ws0 = scratch(workspace, n, 0), ws1 = scratch(workspace, n, 1);
    const MatrixView<T> a = saved_pre.empty() ? ws0 : saved_pre;
    const MatrixView<T> g = gated() ? (saved_gate.empty() ? ws1 : saved_gate) : MatrixView<T>();
    void** pointers = pointer_arrays(workspace, n);
    constexpr cudaDataType_t type = detail::cuda_type<T>();

    detail::GroupedGemm up, gate, down;
    for_each_expert(host_offsets, [&](int e, index_t r0, index_t rows) {
      // a = X W1^T: column-major a^T (f x rows) = W1_e (op T of d x f) X^T.
      up.add(CUBLAS_OP_T, CUBLAS_OP_N, f, rows, d, w1_of(w, e), w.w1.ld(), buffer.row(r0),
             buffer.ld(), a.row(r0), a.ld(), 0.0f);
      if (gated()) {
        gate.add(CUBLAS_OP_T, CUBLAS_OP_N, f, rows, d, w3_of(w, e), w.w3.ld(), buffer.row(r0),
                 buffer.ld(), g.row(r0), g.ld(), 0.0f);
      }
    });
    up.run(handle, type, pointers, stream, type);
    gate.run(handle, type, pointers, stream, type);
    // h into ws0 when a lives elsewhere, else in place over a.
    const MatrixView<T> h = ws0;
    activate(MatrixView<const T>(a), MatrixView<const T>(g), h, host_offsets[kExperts], stream);
    for_each_expert(host_offsets, [&](int e, index_t r0, index_t rows) {
      // y = h W2^T: column-major y^T (d x rows) = W2_e (op T of f x d) h^T.
      down.add(CUBLAS_OP_T, CUBLAS_OP_N, d, rows, f, w2_of(w, e), w.w2.ld(), h.row(r0), h.ld(),
               y.row(r0), y.ld(), 0.0f);
    });
    down.run(handle, type, pointers, stream, type);
  }

  // Backward of forward given dy (N x d); saved_pre / saved_gate are what
  // forward wrote. dx: N x d or empty (overwritten); grads: see ExpertGrads
  // (G = T, or float for fp32 weight gradients).
  template <class G>
  void backward(cublasHandle_t handle, MatrixView<const T> dy, MatrixView<const T> buffer,
                VectorView<const index_t> host_offsets, const ExpertWeights<T>& w,
                MatrixView<const T> saved_pre, MatrixView<const T> saved_gate, MatrixView<T> dx,
                const ExpertGrads<G>& grads, void* workspace, std::size_t workspace_bytes,
                cudaStream_t stream = nullptr) const {
    MOEKIT_API("gpu::ExpertFfn::backward");
    static_assert(std::is_same_v<G, T> || std::is_same_v<G, float>,
                  "weight gradients are of the activation type T or float");
    const index_t n = check_common(buffer, host_offsets, w, workspace, workspace_bytes);
    const index_t d = config_.d_model, f = config_.d_ff;
    const index_t e_ff = index_t{kExperts} * f, e_d = index_t{kExperts} * d;
    check_shape(dy, n, d, "dy");
    check_shape(saved_pre, n, f, "saved_pre");
    if (gated()) {
      check_shape(saved_gate, n, f, "saved_gate");
    } else {
      check_absent(saved_gate, "saved_gate");
    }
    const bool want_dx = !dx.empty(), want_dw1 = !grads.dw1.empty(), want_dw3 = !grads.dw3.empty(),
               want_dw2 = !grads.dw2.empty();
    if (want_dx) check_shape(dx, n, d, "dx");
    if (want_dw1) check_shape(grads.dw1, e_ff, d, "grads.dw1");
    if (gated() && want_dw3) check_shape(grads.dw3, e_ff, d, "grads.dw3");
    if (!gated()) check_absent(grads.dw3, "grads.dw3");
    if (want_dw2) check_shape(grads.dw2, e_d, f, "grads.dw2");
    OverlapCheck("gpu::ExpertFfn::backward")
        .out(Footprints{{dx, "dx"},
                        {grads.dw1, "grads.dw1"},
                        {grads.dw3, "grads.dw3"},
                        {grads.dw2, "grads.dw2"},
                        detail::temp_storage(workspace, workspace_size(n))})
        .in(Footprints{{dy, "dy"},
                       {buffer, "buffer"},
                       {w.w1, "w.w1"},
                       {w.w3, "w.w3"},
                       {w.w2, "w.w2"},
                       {saved_pre, "saved_pre"},
                       {saved_gate, "saved_gate"}})
        .check();
    const float beta = grads.accumulate ? 1.0f : 0.0f;

    // Empty experts: their gradient blocks are 0 (overwrite mode).
    if (!grads.accumulate) {
      for (int e = 0; e < kExperts; ++e) {
        if (host_offsets[e + 1] != host_offsets[e]) continue;
        if (want_dw1) zero(grads.dw1.middle_rows(e * f, f), stream);
        if (want_dw3) zero(grads.dw3.middle_rows(e * f, f), stream);
        if (want_dw2) zero(grads.dw2.middle_rows(e * d, d), stream);
      }
    }
    const bool want_dh = want_dx || want_dw1 || want_dw3;
    if (n == 0 || (!want_dh && !want_dw2)) return;
    detail::use_stream(handle, stream);
    constexpr cudaDataType_t type = detail::cuda_type<T>();
    constexpr cudaDataType_t grad_type = detail::cuda_type<G>();
    void** pointers = pointer_arrays(workspace, n);
    const MatrixView<T> ws0 = scratch(workspace, n, 0);  // dh, then da
    const MatrixView<T> ws1 = scratch(workspace, n, 1);  // h, then dg

    if (want_dw2) {  // dW2 = dy^T h, with h recomputed into ws1
      activate(saved_pre, saved_gate, ws1, host_offsets[kExperts], stream);
      detail::GroupedGemm gemm;
      for_each_expert(host_offsets, [&](int e, index_t r0, index_t rows) {
        // column-major dW2_e^T (f x d) = h_e^T (f x rows) dy_e (op T of d x rows).
        gemm.add(CUBLAS_OP_N, CUBLAS_OP_T, f, d, rows, ws1.row(r0), ws1.ld(), dy.row(r0), dy.ld(),
                 grads.dw2.row(e * d), grads.dw2.ld(), beta);
      });
      gemm.run(handle, type, pointers, stream, grad_type);
    }
    if (!want_dh) return;
    {
      detail::GroupedGemm gemm;  // dh = dy W2: column-major dh^T = W2_e^T (f x d) dy^T
      for_each_expert(host_offsets, [&](int e, index_t r0, index_t rows) {
        gemm.add(CUBLAS_OP_N, CUBLAS_OP_N, f, rows, d, w2_of(w, e), w.w2.ld(), dy.row(r0), dy.ld(),
                 ws0.row(r0), ws0.ld(), 0.0f);
      });
      gemm.run(handle, type, pointers, stream, type);
    }
    activate_backward(saved_pre, saved_gate, ws0, ws1, host_offsets[kExperts], stream);  // da, dg
    const auto weight_grad = [&](MatrixView<G> dw, MatrixView<T> source) {
      detail::GroupedGemm gemm;  // dW = source^T X: column-major dW^T (d x f) = X^T source
      for_each_expert(host_offsets, [&](int e, index_t r0, index_t rows) {
        gemm.add(CUBLAS_OP_N, CUBLAS_OP_T, d, f, rows, buffer.row(r0), buffer.ld(), source.row(r0),
                 source.ld(), dw.row(e * f), dw.ld(), beta);
      });
      gemm.run(handle, type, pointers, stream, grad_type);
    };
    if (want_dw1) weight_grad(grads.dw1, ws0);
    if (gated() && want_dw3) weight_grad(grads.dw3, ws1);
    if (!want_dx) return;
    // dx (+)= source W (W = W1 or W3): column-major dx^T = W_e^T (d x f) source^T.
    const auto input_grad = [&](MatrixView<const T> weight, MatrixView<T> source, float add) {
      detail::GroupedGemm gemm;
      for_each_expert(host_offsets, [&](int e, index_t r0, index_t rows) {
        gemm.add(CUBLAS_OP_N, CUBLAS_OP_N, d, rows, f, weight.row(e * f), weight.ld(),
                 source.row(r0), source.ld(), dx.row(r0), dx.ld(), add);
      });
      gemm.run(handle, type, pointers, stream, type);
    };
    input_grad(w.w1, ws0, 0.0f);
    if (gated()) input_grad(w.w3, ws1, 1.0f);
  }

 private:
  static constexpr int kVector = detail::kVectorElements<T>;  // elements per 16 bytes

  std::size_t matrix_bytes(index_t rows) const {
    return detail::round_up(static_cast<std::size_t>(rows * config_.d_ff) * sizeof(T));
  }
  MatrixView<T> scratch(void* workspace, index_t rows, int which) const {
    char* base =
        static_cast<char*>(workspace) + static_cast<std::size_t>(which) * matrix_bytes(rows);
    return {reinterpret_cast<T*>(base), rows, config_.d_ff};
  }
  void** pointer_arrays(void* workspace, index_t rows) const {
    return reinterpret_cast<void**>(static_cast<char*>(workspace) + 2 * matrix_bytes(rows));
  }

  const T* w1_of(const ExpertWeights<T>& w, int e) const { return w.w1.row(e * config_.d_ff); }
  const T* w3_of(const ExpertWeights<T>& w, int e) const { return w.w3.row(e * config_.d_ff); }
  const T* w2_of(const ExpertWeights<T>& w, int e) const { return w.w2.row(e * config_.d_model); }

  // Calls body(e, first row, rows) for every non-empty expert.
  template <class Body>
  static void for_each_expert(VectorView<const index_t> offsets, Body&& body) {
    for (int e = 0; e < kExperts; ++e) {
      const index_t rows = offsets[e + 1] - offsets[e];
      if (rows > 0) body(e, offsets[e], rows);
    }
  }

  void activate(MatrixView<const T> a, MatrixView<const T> g, MatrixView<T> h, index_t rows,
                cudaStream_t stream) const {
    const bool vec = detail::rows_vectorizable<T>(config_.d_ff, a, g, h);
    const index_t chunks = rows * config_.d_ff / (vec ? kVector : 1);
    with_activation(config_.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      if (vec) {
        detail::activate_kernel<A, kVector, T>
            <<<detail::elementwise_grid(chunks), 256, 0, stream>>>(a, g, h, rows);
      } else {
        detail::activate_kernel<A, 1, T>
            <<<detail::elementwise_grid(chunks), 256, 0, stream>>>(a, g, h, rows);
      }
    });
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }

  void activate_backward(MatrixView<const T> a, MatrixView<const T> g, MatrixView<T> d,
                         MatrixView<T> dg, index_t rows, cudaStream_t stream) const {
    const bool vec = detail::rows_vectorizable<T>(config_.d_ff, a, g, d, dg);
    const index_t chunks = rows * config_.d_ff / (vec ? kVector : 1);
    with_activation(config_.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      if (vec) {
        detail::activate_backward_kernel<A, kVector, T>
            <<<detail::elementwise_grid(chunks), 256, 0, stream>>>(a, g, d, dg, rows);
      } else {
        detail::activate_backward_kernel<A, 1, T>
            <<<detail::elementwise_grid(chunks), 256, 0, stream>>>(a, g, d, dg, rows);
      }
    });
    MOEKIT_CUDA_CHECK(cudaGetLastError());
  }

  template <class G>
  static void zero(MatrixView<G> m, cudaStream_t stream) {
    MOEKIT_CUDA_CHECK(cudaMemset2DAsync(m.data(), static_cast<std::size_t>(m.ld()) * sizeof(G), 0,
                                        static_cast<std::size_t>(m.cols()) * sizeof(G),
                                        static_cast<std::size_t>(m.rows()), stream));
  }

  template <class V>
  static void check_absent(const V& v, const char* name) {
    MOEKIT_CHECK_ARG(v.empty(), name, " must be empty for FfnKind::kPlain");
  }

  // Checks shared by forward and backward; returns N.
  index_t check_common(MatrixView<const T> buffer, VectorView<const index_t> offsets,
                       const ExpertWeights<T>& w, void* workspace, std::size_t bytes) const {
    const index_t d = config_.d_model, f = config_.d_ff;
    check_view(buffer, "buffer");
    const index_t n = buffer.rows();
    MOEKIT_CHECK(buffer.cols() == d, Errc::kShapeMismatch, "buffer has ", buffer.cols(),
                 " columns, d_model = ", d);
    check_shape(offsets, index_t{kExperts} + 1, "host_offsets");
    MOEKIT_CHECK(offsets[0] == 0, Errc::kInvalidArgument, "host_offsets[0] = ", offsets[0]);
    for (int e = 0; e < kExperts; ++e) {
      MOEKIT_CHECK(offsets[e + 1] >= offsets[e], Errc::kInvalidArgument,
                   "host_offsets decreases at ", e + 1);
    }
    MOEKIT_CHECK(offsets[kExperts] <= n, Errc::kShapeMismatch,
                 "host_offsets[E] = ", offsets[kExperts], " exceeds the buffer's ", n, " rows");
    check_shape(w.w1, index_t{kExperts} * f, d, "weights.w1");
    check_shape(w.w2, index_t{kExperts} * d, f, "weights.w2");
    if (gated()) {
      check_shape(w.w3, index_t{kExperts} * f, d, "weights.w3");
    } else {
      check_absent(w.w3, "weights.w3");
    }
    MOEKIT_CHECK(bytes >= workspace_size(n), Errc::kShapeMismatch, "workspace of ", bytes,
                 " bytes, need workspace_size(", n, ") = ", workspace_size(n));
    MOEKIT_CHECK(workspace != nullptr, Errc::kNullPointer, "workspace is null");
    MOEKIT_CHECK(reinterpret_cast<std::uintptr_t>(workspace) % detail::kWorkspaceAlignment == 0,
                 Errc::kInvalidArgument, "workspace is not 256-byte aligned");
    return n;
  }

  ExpertFfnConfig config_;
};

}  // namespace gpu
MOEKIT_NAMESPACE_END
