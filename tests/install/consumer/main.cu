// A user's CUDA program against moekit::cuda: a kernel reading a MatrixView.
#include <moekit/moekit.cuh>

#include <cstdio>

__global__ void row_sums(moekit::MatrixView<const float> x, float* out) {
  const moekit::index_t r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r < x.rows()) {
    float s = 0;
    for (moekit::index_t c = 0; c < x.cols(); ++c) s += x(r, c);
    out[r] = s;
  }
}

int main() {
  cudaError_t status = cudaSuccess;
  if (moekit::gpu::device_count(&status) == 0) {
    // Building and linking against moekit::cuda is what this consumer proves
    // on a machine without a GPU; the kernel runs only where one exists.
    std::printf("moekit::cuda consumer built and linked; kernel not run: no CUDA device (%s)\n",
                cudaGetErrorName(status));
    return 0;
  }
  const float host[6] = {1, 2, 3, 4, 5, 6};
  float* x = nullptr;
  float* out = nullptr;
  MOEKIT_CUDA_CHECK(cudaMalloc(&x, sizeof(host)));
  MOEKIT_CUDA_CHECK(cudaMalloc(&out, 2 * sizeof(float)));
  MOEKIT_CUDA_CHECK(cudaMemcpy(x, host, sizeof(host), cudaMemcpyHostToDevice));
  row_sums<<<1, 32>>>(moekit::MatrixView<const float>(x, 2, 3), out);
  MOEKIT_CUDA_CHECK(cudaGetLastError());
  float sums[2] = {};
  MOEKIT_CUDA_CHECK(cudaMemcpy(sums, out, sizeof(sums), cudaMemcpyDeviceToHost));
  MOEKIT_CUDA_CHECK(cudaFree(x));
  MOEKIT_CUDA_CHECK(cudaFree(out));
  if (sums[0] != 6.0f || sums[1] != 15.0f) {
    std::printf("wrong row sums %g %g\n", static_cast<double>(sums[0]),
                static_cast<double>(sums[1]));
    return 1;
  }
  std::printf("moekit::cuda consumer: kernel ran, row sums 6 15\n");
  return 0;
}
