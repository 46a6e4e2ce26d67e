// Task heads, their loss and backward, and an early-exit step on the GPU
// from moekit's parts: gpu::TaskHeads (three heads with different class
// counts, bf16), gpu::EarlyExit with gpu::gather_rows.
// Without a CUDA device it says so and exits with code 0.
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "moekit/moekit.cuh"

int main() {
  cudaError_t query = cudaSuccess;
  if (moekit::gpu::device_count(&query) == 0) {
    std::printf("no CUDA device (%s): nothing to run\n", cudaGetErrorName(query));
    return 0;
  }
  try {
    // [cuda_heads]
    using Heads = moekit::HeadSpec<3>;
    using T = __nv_bfloat16;
    const moekit::index_t n = 1024, d = 256;
    const moekit::gpu::TaskHeads<Heads, T> heads({.d_model = d, .classes = {10, 4, 7}});
    const moekit::index_t width = heads.max_classes(), rows_w = heads.total_classes();

    // Features, task ids and labels, as the encoder and the data loader give them.
    std::mt19937 gen(1);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<T> host_x(n * d), host_w(rows_w * d), host_b(rows_w);
    for (auto& v : host_x) v = __float2bfloat16(normal(gen));
    for (auto& v : host_w) v = __float2bfloat16(0.05f * normal(gen));
    for (auto& v : host_b) v = __float2bfloat16(0.0f);
    std::vector<std::int32_t> host_tasks(n), host_labels(n);
    for (moekit::index_t i = 0; i < n; ++i) {
      host_tasks[i] = static_cast<std::int32_t>(gen() % 3);
      host_labels[i] = static_cast<std::int32_t>(gen() % heads.classes(host_tasks[i]));
    }

    T *x, *w, *b, *logits, *dlogits, *dx, *dw, *db;
    std::int32_t *tasks, *labels;
    moekit::gpu::TaskLosses<Heads>* losses;
    MOEKIT_CUDA_CHECK(cudaMalloc(&x, n * d * sizeof(T)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&w, rows_w * d * sizeof(T)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&b, rows_w * sizeof(T)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&logits, n * width * sizeof(T)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&dlogits, n * width * sizeof(T)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&dx, n * d * sizeof(T)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&dw, rows_w * d * sizeof(T)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&db, rows_w * sizeof(T)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&tasks, n * sizeof(std::int32_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&labels, n * sizeof(std::int32_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&losses, sizeof(*losses)));
    MOEKIT_CUDA_CHECK(cudaMemcpy(x, host_x.data(), n * d * sizeof(T), cudaMemcpyHostToDevice));
    MOEKIT_CUDA_CHECK(cudaMemcpy(w, host_w.data(), rows_w * d * sizeof(T), cudaMemcpyHostToDevice));
    MOEKIT_CUDA_CHECK(cudaMemcpy(b, host_b.data(), rows_w * sizeof(T), cudaMemcpyHostToDevice));
    MOEKIT_CUDA_CHECK(
        cudaMemcpy(tasks, host_tasks.data(), n * sizeof(std::int32_t), cudaMemcpyHostToDevice));
    MOEKIT_CUDA_CHECK(
        cudaMemcpy(labels, host_labels.data(), n * sizeof(std::int32_t), cudaMemcpyHostToDevice));

    cudaStream_t stream;
    MOEKIT_CUDA_CHECK(cudaStreamCreate(&stream));
    const std::size_t loss_bytes = heads.loss_workspace_size(n);
    const std::size_t backward_bytes = heads.backward_workspace_size(n);
    void *loss_ws, *backward_ws;
    MOEKIT_CUDA_CHECK(cudaMalloc(&loss_ws, loss_bytes));
    MOEKIT_CUDA_CHECK(cudaMalloc(&backward_ws, backward_bytes));

    // Forward, loss (per-task CE, fixed weights 1), backward: no host synchronisation.
    const moekit::gpu::HeadWeights<T> weights{{w, rows_w, d}, {b, rows_w}};
    heads.forward({x, n, d}, {tasks, n}, weights, {logits, n, width}, nullptr, stream);
    heads.loss({logits, n, width}, {tasks, n}, {labels, n}, {}, losses, {dlogits, n, width}, {},
               loss_ws, loss_bytes, stream);
    heads.backward({dlogits, n, width}, {x, n, d}, {tasks, n}, weights, {dx, n, d},
                   {{dw, rows_w, d}, {db, rows_w}}, backward_ws, backward_bytes, stream);

    moekit::gpu::TaskLosses<Heads> host_losses;
    MOEKIT_CUDA_CHECK(
        cudaMemcpyAsync(&host_losses, losses, sizeof(host_losses), cudaMemcpyDeviceToHost, stream));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (int h = 0; h < Heads::num_heads; ++h) {
      std::printf("task %d: %lld rows, loss %.4f, accuracy %.3f\n", h,
                  static_cast<long long>(host_losses.count[h]), host_losses.loss[h],
                  host_losses.accuracy[h]);
    }
    std::printf("total loss %.4f\n", host_losses.total);
    // [cuda_heads]

    // [cuda_exit]
    // Early exit after a layer: decide on the exit classifier's logits (here
    // head 0's, 10 classes), then move the surviving rows' activations.
    const moekit::gpu::EarlyExit exits({.criteria = {.min_confidence = 0.9f}, .num_exits = 2});
    std::int32_t *prediction, *exit_taken, *previous, *agree;
    float* confidence;
    moekit::index_t *original, *kept, *live;
    T* x_next;
    for (std::int32_t** p : {&prediction, &exit_taken, &previous, &agree}) {
      MOEKIT_CUDA_CHECK(cudaMalloc(p, n * sizeof(std::int32_t)));
    }
    MOEKIT_CUDA_CHECK(cudaMalloc(&confidence, n * sizeof(float)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&original, n * sizeof(moekit::index_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&kept, n * sizeof(moekit::index_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&live, sizeof(moekit::index_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&x_next, n * d * sizeof(T)));
    const moekit::gpu::ExitState state{{original, n}, {previous, n}, {agree, n}};
    const moekit::gpu::ExitResults results{{prediction, n}, {confidence, n}, {exit_taken, n}};
    exits.begin(n, state, results, stream);

    const moekit::MatrixView<const T> exit_logits(logits, n, width);  // n live rows, C = 10
    const auto step = [&](void* ws, std::size_t& bytes) {
      return exits.step(ws, bytes, 0, exit_logits.block(0, 0, n, 10), state, results, {kept, n},
                        live, stream);
    };
    std::size_t step_bytes = 0;
    MOEKIT_CUDA_CHECK(step(nullptr, step_bytes));
    void* step_ws;
    MOEKIT_CUDA_CHECK(cudaMalloc(&step_ws, step_bytes));
    MOEKIT_CUDA_CHECK(step(step_ws, step_bytes));
    MOEKIT_CUDA_CHECK(
        moekit::gpu::gather_rows<T>({x, n, d}, {kept, n}, live, {x_next, n, d}, stream));
    moekit::index_t still_live = 0;
    MOEKIT_CUDA_CHECK(
        cudaMemcpyAsync(&still_live, live, sizeof(still_live), cudaMemcpyDeviceToHost, stream));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::printf("%lld of %lld samples continue to the next layer\n",
                static_cast<long long>(still_live), static_cast<long long>(n));
    // [cuda_exit]

    for (void* p : {static_cast<void*>(x),
                    static_cast<void*>(w),
                    static_cast<void*>(b),
                    static_cast<void*>(logits),
                    static_cast<void*>(dlogits),
                    static_cast<void*>(dx),
                    static_cast<void*>(dw),
                    static_cast<void*>(db),
                    static_cast<void*>(tasks),
                    static_cast<void*>(labels),
                    static_cast<void*>(losses),
                    loss_ws,
                    backward_ws,
                    static_cast<void*>(prediction),
                    static_cast<void*>(exit_taken),
                    static_cast<void*>(previous),
                    static_cast<void*>(agree),
                    static_cast<void*>(confidence),
                    static_cast<void*>(original),
                    static_cast<void*>(kept),
                    static_cast<void*>(live),
                    static_cast<void*>(x_next),
                    step_ws}) {
      MOEKIT_CUDA_CHECK(cudaFree(p));
    }
    MOEKIT_CUDA_CHECK(cudaStreamDestroy(stream));
  } catch (const moekit::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
