#pragma once
// Knowledge distillation loss on the CUDA backend (docs/math.md): the math of
// moekit/cpu/distillation.hpp on device data of type T (fp32, bf16, fp16).
//
// For row i of student logits s_i and teacher logits t_i (n x C each),
// temperature T > 0 and mixing a in [0, 1]:
//   p_i = softmax(t_i / T),  q_i = softmax(s_i / T),  r_i = softmax(s_i)
//   L   = (1 / n) sum_i [a T^2 KL(p_i || q_i) + (1 - a) CE(y_i, r_i)]
//   dL/ds_i = (1 / n) (a T (q_i - p_i) + (1 - a) (r_i - onehot(y_i)))
// Writes DistillationLoss {L, mean KL, mean CE} (core/classification.hpp) to
// device memory at args.loss and, unless args.dstudent is empty, overwrites
// it with dL/ds (rounded once to T). n = 0 gives zeros.
//
// How: one thread per row runs classify::distillation_row (the CPU's
// function: log-sum-exp about the row maximum, class sums in double) on the
// rows in place and writes its gradient row. Per-block sums of KL and CE
// (rows in order, double) go to the workspace and one thread adds them in
// block order: deterministic, no float atomics. One thread per row suits
// many rows of up to a few thousand classes; a vocabulary-sized C with few
// rows would want a warp per row (not done).
//
// Conventions (CUB's two-phase API, as moekit/cuda/aux_losses.cuh): a null
// d_temp_storage writes the bytes needed (reading only the row count);
// the second call validates every argument on the host and throws
// moekit::Error before anything is launched (config as the CPU:
// kInvalidArgument; shapes: kShapeMismatch; a null args.loss:
// kNullPointer); CUDA failures come back as the returned cudaError_t.
// Labels live in device memory: a label outside [0, C) (the CPU throws
// kOutOfRange) makes its row add nothing to the sums and get a zero
// gradient row, and is counted in the optional args.invalid_labels (reset by
// the call); the mean still divides by n. Labels are not read when a = 1 and
// may then be empty.
//
//   gpu::DistillationArgs<__nv_bfloat16> args{{.temperature = 2.0f, .alpha = 0.5f},
//                                             student, teacher, labels, dstudent, d_loss};
//   gpu::distillation_loss(nullptr, bytes, args, stream);  // size query
//   gpu::distillation_loss(d_ws, bytes, args, stream);

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <limits>

#include "moekit/core/classification.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cuda/dispatch.cuh"
#include "moekit/cuda/error.cuh"

MOEKIT_NAMESPACE_BEGIN
namespace gpu {

// The arguments of distillation_loss, device memory unless noted.
template <ActivationElement T>
struct DistillationArgs {
  DistillationConfig config{};              // temperature and alpha (host value)
  MatrixView<const T> student{};            // n x C
  MatrixView<const T> teacher{};            // n x C
  VectorView<const std::int32_t> labels{};  // n, or empty when config.alpha = 1
  MatrixView<T> dstudent{};                 // n x C, or empty: no gradient
  DistillationLoss* loss = nullptr;         // device, required
  std::int64_t* invalid_labels = nullptr;   // device counter, or null
};

namespace detail {

inline constexpr int kDistillRows = 128;  // rows (threads) per block

// One thread per row; per-block KL and CE sums, rows in order.
template <class T>
__global__ void __launch_bounds__(kDistillRows)
    distillation_kernel(MatrixView<const T> student, MatrixView<const T> teacher,
                        const std::int32_t* labels, float temperature, float alpha, float scale,
                        MatrixView<T> dstudent, double* partial, unsigned long long* invalid) {
  __shared__ double row_kl[kDistillRows];
  __shared__ double row_ce[kDistillRows];
  __shared__ int bad;
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) bad = 0;
  const index_t first = static_cast<index_t>(blockIdx.x) * kDistillRows;
  const index_t i = first + t;
  const index_t n = student.rows(), c = student.cols();
  row_kl[t] = 0.0;
  row_ce[t] = 0.0;
  __syncthreads();
  if (i < n) {
    const int y = labels != nullptr ? labels[i] : 0;
    T* ds = dstudent.empty() ? nullptr : dstudent.row(i);
    if (y >= 0 && y < c) {
      const classify::DistillationTerms terms = classify::distillation_row(
          student.row(i), teacher.row(i), c, y, temperature, alpha, scale, ds);
      row_kl[t] = terms.kl;
      row_ce[t] = terms.ce;
    } else {
      atomicAdd(&bad, 1);
      if (ds != nullptr) {
        for (index_t k = 0; k < c; ++k) ds[k] = from_float<T>(0.0f);
      }
    }
  }
  __syncthreads();
  if (t != 0) return;
  double kl = 0.0, ce = 0.0;
  for (int r = 0; r < kDistillRows; ++r) {
    kl += row_kl[r];
    ce += row_ce[r];
  }
  partial[2 * static_cast<index_t>(blockIdx.x)] = kl;
  partial[2 * static_cast<index_t>(blockIdx.x) + 1] = ce;
  if (invalid != nullptr && bad > 0) atomicAdd(invalid, static_cast<unsigned long long>(bad));
}

// The means and L from the block sums, in block order (one thread).
template <int = 0>
__global__ void distillation_finalize_kernel(const double* partial, int blocks, index_t n,
                                             double alpha, double temperature,
                                             DistillationLoss* out) {
  double kl = 0.0, ce = 0.0;
  for (int b = 0; b < blocks; ++b) {
    kl += partial[2 * b];
    ce += partial[2 * b + 1];
  }
  DistillationLoss result{};
  if (n > 0) {
    result.kl = kl / static_cast<double>(n);
    result.ce = ce / static_cast<double>(n);
    result.loss = alpha * temperature * temperature * result.kl + (1.0 - alpha) * result.ce;
  }
  *out = result;
}

}  // namespace detail

// Writes the batch's DistillationLoss to args.loss and, unless
// args.dstudent is empty, dL/ds to it; a null d_temp_storage only writes
// the workspace bytes to temp_storage_bytes (conventions at the top).
template <ActivationElement T>
cudaError_t distillation_loss(void* d_temp_storage, std::size_t& temp_storage_bytes,
                              const DistillationArgs<T>& args, cudaStream_t stream = nullptr) {
  MOEKIT_API("gpu::distillation_loss");
  const index_t n = args.student.rows();
  MOEKIT_CHECK_ARG(n >= 0 && n <= std::numeric_limits<std::int32_t>::max(), "student has ", n,
                   " rows, more than 2^31 - 1");
  const int blocks = detail::grid_for(n, detail::kDistillRows);
  detail::WorkspacePlan plan;
  const std::size_t at_partial =
      plan.reserve(2 * static_cast<std::size_t>(blocks) * sizeof(double));
  if (detail::size_query(d_temp_storage, temp_storage_bytes, plan.bytes())) return cudaSuccess;

  check_distillation_config(args.config);
  check_view(args.student, "args.student");
  const index_t c = args.student.cols();
  MOEKIT_CHECK(n == 0 || c >= 1, Errc::kShapeMismatch, "args.student is ", n, " x ", c,
               ": at least one class is needed");
  check_shape(args.teacher, n, c, "args.teacher");
  const bool use_labels = args.config.alpha < 1.0f;
  if (use_labels || !args.labels.empty()) check_shape(args.labels, n, "args.labels");
  if (!args.dstudent.empty()) check_shape(args.dstudent, n, c, "args.dstudent");
  MOEKIT_CHECK(args.loss != nullptr, Errc::kNullPointer, "args.loss is null");
  OverlapCheck("gpu::distillation_loss")
      .out(Footprints{
          {args.dstudent, "args.dstudent"},
          {args.loss, 1, "args.loss"},
          {args.invalid_labels, args.invalid_labels != nullptr ? 1 : 0, "args.invalid_labels"},
          detail::temp_storage(d_temp_storage, plan.bytes())})
      .in(Footprints{{args.student, "args.student"},
                     {args.teacher, "args.teacher"},
                     {args.labels, "args.labels"}})
      .check();

  auto* invalid = reinterpret_cast<unsigned long long*>(args.invalid_labels);
  if (invalid != nullptr) MOEKIT_CUDA_TRY(cudaMemsetAsync(invalid, 0, sizeof(*invalid), stream));
  auto* partial = detail::carve<double>(d_temp_storage, at_partial);
  if (blocks > 0) {
    const float scale = static_cast<float>(1.0 / static_cast<double>(n));
    detail::distillation_kernel<T><<<blocks, detail::kDistillRows, 0, stream>>>(
        args.student, args.teacher, use_labels ? args.labels.data() : nullptr,
        args.config.temperature, args.config.alpha, scale, args.dstudent, partial, invalid);
    MOEKIT_CUDA_TRY(cudaGetLastError());
  }
  detail::distillation_finalize_kernel<>
      <<<1, 1, 0, stream>>>(partial, blocks, n, static_cast<double>(args.config.alpha),
                            static_cast<double>(args.config.temperature), args.loss);
  return cudaGetLastError();
}

}  // namespace gpu
MOEKIT_NAMESPACE_END
