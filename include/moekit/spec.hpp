#pragma once
// Compile-time specs: the structural numbers of a model, fixed as template
// parameters so that kernels are generated for them.
//
//   MoeSpec<E, K>   E experts, each token routed to K of them (1 <= K <= E)
//   LoraSpec<R>     LoRA rank R >= 1
//   HeadSpec<H>     H task heads, H >= 1
//
// An impossible spec is a compile error at the point it is named:
// `MoeSpec<4, 5>` does not compile (tests/compile_fail proves it). Components
// take specs through the concepts below, so any type with the same constants
// works, and a spec's own constraints are checked again there.

#include <concepts>

#include "moekit/core/config.hpp"

MOEKIT_NAMESPACE_BEGIN

// A MoE layer's shape: E experts, K of them per token.
template <int E, int K>
requires(E >= 1 && K >= 1 && K <= E) struct MoeSpec {
  static constexpr int num_experts = E;  // E >= 1
  static constexpr int top_k = K;        // K in [1, E]
};

// A LoRA adapter's rank R.
template <int R>
requires(R >= 1) struct LoraSpec {
  static constexpr int rank = R;  // R >= 1
};

// The number of task heads H.
template <int H>
requires(H >= 1) struct HeadSpec {
  static constexpr int num_heads = H;  // H >= 1
};

template <class S>
concept MoeSpecType = requires {
  { S::num_experts } -> std::convertible_to<int>;
  { S::top_k } -> std::convertible_to<int>;
}
&&(S::num_experts >= 1) && (S::top_k >= 1) && (S::top_k <= S::num_experts);

template <class S>
concept LoraSpecType = requires {
  { S::rank } -> std::convertible_to<int>;
}
&&(S::rank >= 1);

template <class S>
concept HeadSpecType = requires {
  { S::num_heads } -> std::convertible_to<int>;
}
&&(S::num_heads >= 1);

MOEKIT_NAMESPACE_END
