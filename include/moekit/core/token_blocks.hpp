#pragma once
// Fixed token blocks: the unit in which the CPU layers compute everything
// that spans several tokens, so that a token's result and every reduction
// over tokens are the same whether the batch is processed in one process or
// split over the ranks of an expert-parallel group.
//
// Block b holds tokens [b kTokenBlock, (b + 1) kTokenBlock) of the batch (the
// last block may be short). Two rules follow:
//   - Products over token rows that are not batch invariant by themselves
//     (the router's input gradient, the model's encoder, adapters and heads)
//     run as one GEMM per block. A GEMM library's result for a row can depend
//     on the number of rows and on the row's position (Eigen picks other
//     kernels for the edges), but a block holds the same rows wherever it is
//     computed, so its results do too. (The router's logits and the expert
//     FFNs are batch invariant: cpu::gate_logits, the GEMM engine.)
//   - Sums over tokens into a weight gradient are folded over the blocks in
//     order: block 0's partial product overwrites (or, when accumulating,
//     adds to) the gradient, every later block adds to it, one GEMM per block
//     (acc = (((g + P_0) + P_1) + P_2) ...). Ranks hold whole blocks (the
//     rule of dist/layout.hpp), so an expert-parallel group runs the same
//     fold by passing the partial gradient from rank to rank
//     (dist::pass_along_ranks).
// Cost: one GEMM per 64 rows instead of one over all rows (the weight is
// packed again for every block), and for weight gradients one extra pass
// over the gradient per block; see docs/expert_parallel.md for measurements.

#include <algorithm>

#include "moekit/core/config.hpp"
#include "moekit/core/types.hpp"

MOEKIT_NAMESPACE_BEGIN

// Tokens per block.
inline constexpr index_t kTokenBlock = 64;

// Blocks of a batch of `tokens` tokens (the last may be short).
constexpr index_t token_blocks(index_t tokens) { return (tokens + kTokenBlock - 1) / kTokenBlock; }

// f(first_row, rows, block_index) for every block of a batch, in order. The
// blocks run one after the other (never split over threads by the token
// count, which would change a block's GEMM with the batch); each block's
// work may use threads inside.
template <class F>
void for_each_token_block(index_t tokens, F&& f) {
  for (index_t b = 0; b * kTokenBlock < tokens; ++b) {
    const index_t r0 = b * kTokenBlock;
    f(r0, std::min(kTokenBlock, tokens - r0), b);
  }
}

MOEKIT_NAMESPACE_END
