// An MoE layer's forward on the GPU from moekit's parts: gpu::route with the
// two-phase workspace, the routing statistics and the aux-loss-free bias
// update; capacity and the dispatch plan, dispatch into the expert-major
// buffer, the experts (gpu::ExpertFfn, SwiGLU on cuBLAS grouped GEMMs), and
// the weighted combine back to token order; then per-task LoRA adapters
// (gpu::LoraBank) on a frozen projection of the layer's output.
// Without a CUDA device it says so and exits with code 0.
#include <cuda_bf16.h>

#include <cmath>
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

    // [cuda_dispatch]
    // Capacity 1.25 (drop the lowest weights), each expert's rows padded to
    // a multiple of 16, the tile height of the expert GEMMs that follow.
    const moekit::index_t d = 256;
    const moekit::CapacityConfig capacity{1.25, moekit::DropPolicy::kProbs};
    const int alignment = 16;
    const moekit::index_t max_rows =
        moekit::gpu::max_dispatch_rows<Spec>(tokens, capacity, alignment);

    __nv_bfloat16 *x, *buffer, *y;
    std::int32_t *positions, *row_slots;
    moekit::index_t* offsets;
    moekit::gpu::DispatchStats<Spec>* dispatch_stats;
    MOEKIT_CUDA_CHECK(cudaMalloc(&x, tokens * d * sizeof(__nv_bfloat16)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&y, tokens * d * sizeof(__nv_bfloat16)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&buffer, max_rows * d * sizeof(__nv_bfloat16)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&positions, tokens * K * sizeof(std::int32_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&row_slots, max_rows * sizeof(std::int32_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&offsets, (E + 1) * sizeof(moekit::index_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&dispatch_stats, sizeof(*dispatch_stats)));
    std::vector<__nv_bfloat16> host_x(tokens * d);
    for (auto& v : host_x) v = __float2bfloat16(normal(gen));
    MOEKIT_CUDA_CHECK(
        cudaMemcpy(x, host_x.data(), host_x.size() * sizeof(host_x[0]), cudaMemcpyHostToDevice));

    moekit::gpu::DispatchPlanArgs<Spec> plan;
    plan.expert_ids = args.expert_ids;
    plan.weights = args.weights;  // dropped slots get weight 0
    plan.capacity = capacity;
    plan.row_alignment = alignment;
    plan.positions = {positions, tokens, K};
    plan.offsets = {offsets, E + 1};
    plan.row_slots = {row_slots, max_rows};
    plan.stats = dispatch_stats;

    std::size_t plan_bytes = 0;
    MOEKIT_CUDA_CHECK(moekit::gpu::plan_dispatch(nullptr, plan_bytes, plan, stream));
    void* plan_workspace;
    MOEKIT_CUDA_CHECK(cudaMalloc(&plan_workspace, plan_bytes));
    MOEKIT_CUDA_CHECK(moekit::gpu::plan_dispatch(plan_workspace, plan_bytes, plan, stream));

    // Expert e's tokens are rows [offsets[e], offsets[e + 1]) of the buffer.
    const moekit::MatrixView<__nv_bfloat16> rows(buffer, max_rows, d);
    MOEKIT_CUDA_CHECK(moekit::gpu::dispatch<Spec, __nv_bfloat16>(
        {x, tokens, d}, plan.dispatch_map(), rows, stream));
    // [cuda_dispatch]

    // [cuda_experts]
    // The experts (SwiGLU, d_ff = 512) on the buffer. cuBLAS takes the group
    // shapes on the host, so the E + 1 offsets come back first.
    std::vector<moekit::index_t> host_offsets(E + 1);
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(host_offsets.data(), offsets,
                                      (E + 1) * sizeof(moekit::index_t), cudaMemcpyDeviceToHost,
                                      stream));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));

    const moekit::index_t d_ff = 512;
    const moekit::gpu::ExpertFfn<Spec, __nv_bfloat16> experts(
        {.d_model = d,
         .d_ff = d_ff,
         .kind = moekit::FfnKind::kGated,
         .activation = moekit::Activation::kSilu});
    std::vector<__nv_bfloat16> host_w(3 * E * d_ff * d);  // w1, w3, w2 of every expert
    std::normal_distribution<float> init(0.0f, 0.05f);
    for (auto& v : host_w) v = __float2bfloat16(init(gen));
    __nv_bfloat16 *w, *expert_out;
    MOEKIT_CUDA_CHECK(cudaMalloc(&w, host_w.size() * sizeof(host_w[0])));
    MOEKIT_CUDA_CHECK(cudaMalloc(&expert_out, max_rows * d * sizeof(__nv_bfloat16)));
    MOEKIT_CUDA_CHECK(
        cudaMemcpy(w, host_w.data(), host_w.size() * sizeof(host_w[0]), cudaMemcpyHostToDevice));
    const moekit::gpu::ExpertWeights<__nv_bfloat16> expert_weights{
        {w, E * d_ff, d}, {w + E * d_ff * d, E * d_ff, d}, {w + 2 * E * d_ff * d, E * d, d_ff}};

    const std::size_t ffn_bytes = experts.workspace_size(max_rows);
    void* ffn_workspace;
    MOEKIT_CUDA_CHECK(cudaMalloc(&ffn_workspace, ffn_bytes));
    cublasHandle_t cublas;
    MOEKIT_CUBLAS_CHECK(cublasCreate(&cublas));
    experts.forward(cublas, rows, {host_offsets.data(), E + 1}, expert_weights,
                    {expert_out, max_rows, d}, {}, {}, ffn_workspace, ffn_bytes, stream);

    // Back to token order: y[t] = sum_k w(t, k) expert_out[row(t, k)].
    MOEKIT_CUDA_CHECK(moekit::gpu::combine<Spec, __nv_bfloat16>(
        {expert_out, max_rows, d}, plan.expert_ids, plan.weights, plan.positions, {offsets, E + 1},
        {y, tokens, d}, /*accumulate=*/false, stream));
    // [cuda_experts]

    // [cuda_lora]
    // Per-task adapters on a frozen shared d x d projection: token t belongs
    // to task t % 8 and each task has its own rank-8 LoRA; one bank serves
    // them all (SGMV: each adapter works on its own rows only).
    constexpr int kTasks = 8;
    const moekit::gpu::LoraBank<moekit::LoraSpec<8>, __nv_bfloat16> adapters(
        {.d_in = d, .d_out = d, .num_adapters = kTasks, .alpha = 16.0f});
    std::vector<std::int32_t> host_tasks(tokens);
    for (moekit::index_t t = 0; t < tokens; ++t)
      host_tasks[t] = static_cast<std::int32_t>(t % kTasks);
    std::vector<__nv_bfloat16> host_proj(d * d);
    for (auto& v : host_proj) v = __float2bfloat16(init(gen));
    std::int32_t* tasks;
    moekit::index_t *order, *task_offsets;
    __nv_bfloat16 *proj, *lora_a, *lora_b, *z;
    MOEKIT_CUDA_CHECK(cudaMalloc(&tasks, tokens * sizeof(std::int32_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&order, tokens * sizeof(moekit::index_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&task_offsets, (kTasks + 1) * sizeof(moekit::index_t)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&proj, d * d * sizeof(__nv_bfloat16)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&lora_a, kTasks * 8 * d * sizeof(__nv_bfloat16)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&lora_b, kTasks * d * 8 * sizeof(__nv_bfloat16)));
    MOEKIT_CUDA_CHECK(cudaMalloc(&z, tokens * d * sizeof(__nv_bfloat16)));
    MOEKIT_CUDA_CHECK(cudaMemcpy(tasks, host_tasks.data(), tokens * sizeof(std::int32_t),
                                 cudaMemcpyHostToDevice));
    MOEKIT_CUDA_CHECK(
        cudaMemcpy(proj, host_proj.data(), d * d * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
    // Fresh adapters (a random, b = 0: each task starts as the base layer);
    // trained ones would be loaded here instead.
    const moekit::MatrixView<__nv_bfloat16> a_all(lora_a, kTasks * 8, d),
        b_all(lora_b, kTasks * d, 8);
    adapters.init(a_all, b_all, {.seed = 3}, stream);

    // Group the rows by task once per batch, then z = y proj^T + adapter.
    const std::size_t group_bytes = adapters.group_workspace_size(tokens);
    const std::size_t lora_bytes = adapters.workspace_size(tokens);
    void* lora_workspace;
    MOEKIT_CUDA_CHECK(
        cudaMalloc(&lora_workspace, group_bytes > lora_bytes ? group_bytes : lora_bytes));
    adapters.group({tasks, tokens}, {order, tokens}, {task_offsets, kTasks + 1}, nullptr,
                   lora_workspace, group_bytes, stream);
    const moekit::gpu::LoraRows task_rows{
        {tasks, tokens}, {order, tokens}, {task_offsets, kTasks + 1}};
    adapters.forward(cublas, {y, tokens, d}, task_rows, {{proj, d, d}, {}, a_all, b_all},
                     {z, tokens, d}, /*saved_h=*/{}, /*step=*/{}, lora_workspace, lora_bytes,
                     stream);
    // [cuda_lora]

    moekit::gpu::DispatchStats<Spec> host_dispatch;
    MOEKIT_CUDA_CHECK(cudaMemcpyAsync(&host_dispatch, dispatch_stats, sizeof(host_dispatch),
                                      cudaMemcpyDeviceToHost, stream));
    MOEKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::printf("capacity %lld per expert: %lld of %lld assignments dropped, %lld buffer rows\n",
                static_cast<long long>(host_dispatch.capacity),
                static_cast<long long>(host_dispatch.dropped), static_cast<long long>(tokens * K),
                static_cast<long long>(host_dispatch.rows));

    std::vector<__nv_bfloat16> host_z(tokens * d);
    MOEKIT_CUDA_CHECK(
        cudaMemcpy(host_z.data(), z, host_z.size() * sizeof(host_z[0]), cudaMemcpyDeviceToHost));
    double sum_sq = 0.0;
    for (const auto& v : host_z)
      sum_sq += static_cast<double>(__bfloat162float(v)) * __bfloat162float(v);
    std::printf("per-task LoRA on the layer output: %d adapters, rms %.4f\n", kTasks,
                std::sqrt(sum_sq / static_cast<double>(host_z.size())));

    for (void* p :
         {static_cast<void*>(tasks), static_cast<void*>(order), static_cast<void*>(task_offsets),
          static_cast<void*>(proj), static_cast<void*>(lora_a), static_cast<void*>(lora_b),
          static_cast<void*>(z), lora_workspace}) {
      MOEKIT_CUDA_CHECK(cudaFree(p));
    }
    MOEKIT_CUBLAS_CHECK(cublasDestroy(cublas));
    MOEKIT_CUDA_CHECK(cudaFree(ffn_workspace));
    MOEKIT_CUDA_CHECK(cudaFree(expert_out));
    MOEKIT_CUDA_CHECK(cudaFree(w));
    MOEKIT_CUDA_CHECK(cudaFree(plan_workspace));
    for (void* p : {static_cast<void*>(x), static_cast<void*>(y), static_cast<void*>(buffer),
                    static_cast<void*>(positions), static_cast<void*>(row_slots),
                    static_cast<void*>(offsets), static_cast<void*>(dispatch_stats)}) {
      MOEKIT_CUDA_CHECK(cudaFree(p));
    }
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
