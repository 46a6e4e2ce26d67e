// Conan's test_package: a program against the packaged moekit. It routes 8
// tokens to 2 of 4 experts with the Mixtral rule (top-2 logits, softmax over
// the two) and checks that each token's weights sum to 1.
#include <moekit/moekit.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

int main() {
  using Spec = moekit::MoeSpec<4, 2>;
  constexpr moekit::index_t T = 8, d = 16;
  constexpr int E = Spec::num_experts, K = Spec::top_k;

  std::vector<float> x(T * d), w_gate(E * d);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
  for (std::size_t i = 0; i < w_gate.size(); ++i)
    w_gate[i] = std::cos(0.11f * static_cast<float>(i));

  std::vector<float> logits(T * E), scores(T * E), weights(T * K);
  std::vector<std::int32_t> ids(T * K), positions(T * K);
  const moekit::cpu::Routing routing{{logits.data(), T, E},
                                     {scores.data(), T, E},
                                     {ids.data(), T, K},
                                     {weights.data(), T, K},
                                     {positions.data(), T, K}};
  moekit::cpu::RouterConfig config;
  config.gating.rule = moekit::GatingRule::kTopKSoftmax;
  const moekit::cpu::Router<Spec> router(config);
  router.forward({x.data(), T, d}, {w_gate.data(), E, d}, {}, {}, routing);

  for (std::size_t t = 0; t < weights.size() / K; ++t) {
    const float sum = weights[t * K] + weights[t * K + 1];
    if (std::fabs(sum - 1.0f) > 1e-5f) {
      std::printf("token %zu: weights sum to %g\n", t, static_cast<double>(sum));
      return 1;
    }
  }
  std::printf("moekit %s test_package: token 0 -> experts %d, %d with weights %.3f, %.3f\n",
              MOEKIT_VERSION_STRING, ids[0], ids[1], static_cast<double>(weights[0]),
              static_cast<double>(weights[1]));
  return 0;
}
