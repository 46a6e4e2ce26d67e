// Conan's test_package with with_cuda=True: a host program linked against
// moekit::cuda. It asks the CUDA runtime for its version, which needs no GPU.
#include <cuda_runtime_api.h>
#include <moekit/moekit.hpp>

#include <cstdio>

int main() {
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess || runtime <= 0) {
    std::printf("cudaRuntimeGetVersion failed\n");
    return 1;
  }
  std::printf("moekit %s test_package: moekit::cuda links CUDA runtime %d.%d\n",
              MOEKIT_VERSION_STRING, runtime / 1000, (runtime % 1000) / 10);
  return 0;
}
