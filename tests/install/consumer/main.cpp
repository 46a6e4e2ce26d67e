// A user's program: a spec, the parameter accounting, a view mapped by Eigen.
#include <moekit/moekit.hpp>

#include <cstdio>
#include <vector>

int main() {
  using Moe = moekit::MoeSpec<8, 2>;
  constexpr moekit::ParamCount layer = moekit::moe_layer_params<Moe>({.d_model = 64, .d_ff = 256});
  static_assert(layer.total == 8 * 64 + 8 * 2 * 64 * 256);

  std::vector<float> data{1, 2, 3, 4, 5, 6};
  const moekit::MatrixView<float> x(data.data(), 2, 3);
  const float sum = moekit::as_eigen(x).sum();
  if (sum != 21.0f) {
    std::printf("wrong sum %g\n", static_cast<double>(sum));
    return 1;
  }
  std::printf("moekit %s consumer: MoE layer %lld parameters, %lld active\n", MOEKIT_VERSION_STRING,
              static_cast<long long>(layer.total), static_cast<long long>(layer.active));
  return 0;
}
