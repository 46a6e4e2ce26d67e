// Routing on the GPU: gpu::route with the two-phase workspace, the routing
// statistics, the Switch loss, and the aux-loss-free bias update.
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
    // [cuda_route]
    using Spec = moekit::MoeSpec<64, 8>;  // E = 64 experts, K = 8 per token
    constexpr int E = Spec::num_experts, K = Spec::top_k;
    const moekit::index_t tokens = 4096;

    // Logits from your gate GEMM, here random bf16 uploaded to the device.
    std::vector<__nv_bfloat16> host(tokens * E);
    std::mt19937 gen(1);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (auto& v : host) v = __float2bfloat16(normal(gen));

    __nv_bfloat16* logits;
    float *bias, *scores, *weights;
    std::int32_t* ids;
    moekit::gpu::RoutingStats<Spec>* stats;
    MOEKIT_CUDA_CHECK(cudaMalloc(&logits, host.size() * sizeof(host[0])));
    MOEKIT_CUDA_CHECK(cudaMalloc(&bias, E * sizeof(float)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&scores, tokens * E * sizeof(float)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&weights, tokens * K * sizeof(float)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&ids, tokens * K * sizeof(std::int32_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&stats, sizeof(*stats)));
    MOEKIT_CUDA_CHECK(
        cudaMemcpy(logits, host.data(), host.size() * sizeof(host[0]), cudaMemcpyHostToDevice));
    MOEKIT_CUDA_CHECK(cudaMemset(bias, 0, E * sizeof(float)));

    cudaStream_t stream;
    MOEKIT_CUDA_CHECK(cudaStreamCreate(&stream));

    moekit::gpu::RouteArgs<Spec, __nv_bfloat16> args;
    args.logits = {logits, tokens, E};
    args.selection_bias = {bias, E};  // DeepSeek-V3 style: sigmoid, bias moves selection only
    args.gating.rule = moekit::GatingRule::kSigmoid;
    args.gating.renormalize = true;
    args.scores = {scores, tokens, E};
    args.expert_ids = {ids, tokens, K};
    args.weights = {weights, tokens, K};
    args.stats = stats;

    // Phase one: how much workspace; phase two: route on the stream.
    std::size_t bytes = 0;
    MOEKIT_CUDA_CHECK(moekit::gpu::route(nullptr, bytes, args, stream));
    void* workspace;
    MOEKIT_CUDA_CHECK(cudaMalloc(&workspace, bytes));
    MOEKIT_CUDA_CHECK(moekit::gpu::route(workspace, bytes, args, stream));

    // After the step: move the bias against the load (aux-loss-free balancing).
    MOEKIT_CUDA_CHECK(moekit::gpu::update_expert_bias<Spec>(
        bias, moekit::gpu::assigned_counts(stats), 1e-3f, stream));

    moekit::gpu::RoutingStats<Spec> host_stats;
    MOEKIT_CUDA_CHECK(
        cudaMemcpyAsync(&host_stats, stats, sizeof(host_stats), cudaMemcpyDeviceToHost, stream));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::printf("max load %.2f x mean, entropy %.3f nats, z-loss %.3f\n",
                host_stats.max_load_ratio(), host_stats.entropy(), host_stats.z_loss);
    // [cuda_route]

    MOEKIT_CUDA_CHECK(cudaFree(workspace));
    MOEKIT_CUDA_CHECK(cudaStreamDestroy(stream));
    for (void* p :
         {static_cast<void*>(logits), static_cast<void*>(bias), static_cast<void*>(scores),
          static_cast<void*>(weights), static_cast<void*>(ids), static_cast<void*>(stats)}) {
      MOEKIT_CUDA_CHECK(cudaFree(p));
    }
  } catch (const moekit::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
