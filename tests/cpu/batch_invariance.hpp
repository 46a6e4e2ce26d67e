#pragma once
// The batch-invariance property (docs/determinism.md): an item's result (a
// token's, a sequence's) must be bit-identical whatever else is in its
// batch, wherever it sits there, and on any OpenMP thread count.
//
// The harness takes a component as `run(items)`: run the items (indices into
// a pool of random inputs the test owns) as one batch, in that order, and
// return each item's result, one float vector per item. It runs every item
// alone on one thread for the reference, then random batches of 1 to
// max_items items drawn with repetition from the pool in random order, on
// 1 and 2 threads and on every CPU path the machine has (cpu/isa.hpp:
// generic, AVX2, AVX-512 and AMX, which all promise the same bits), and
// compares each item's bits with its reference.
// Results hold no NaN (components poison their outputs with NaN before a
// run, so an element left unwritten shows); integers (expert ids) are
// passed as floats, which hold them exactly.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "batch_results.hpp"
#include "moekit/core/types.hpp"
#include "moekit/cpu/isa.hpp"
#include "test_support.hpp"

namespace moekit_test {

// The thread counts the property covers: 1 and 2 (1 alone without OpenMP).
inline std::vector<int> invariance_thread_counts() {
#if defined(_OPENMP)
  return {1, 2};
#else
  return {1};
#endif
}

// The CPU paths this machine can run, the widest last.
inline std::vector<moekit::cpu::Isa> invariance_isas() {
  using moekit::cpu::Isa;
  std::vector<Isa> isas;
  for (const Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512, Isa::kAmx}) {
    if (moekit::cpu::isa_available(isa)) isas.push_back(isa);
  }
  return isas;
}

// Batch sizes for one thread count: 1, 2, one small, one medium and one
// large random size, and max_items (those at most max_items, without repeats).
inline std::vector<moekit::index_t> invariance_batch_sizes(moekit::index_t max_items,
                                                           std::mt19937& rng) {
  using moekit::index_t;
  const auto draw = [&](index_t lo, index_t hi) {
    return std::uniform_int_distribution<index_t>(lo, std::max(lo, hi))(rng);
  };
  std::vector<index_t> drawn{1, 2, draw(3, 17), draw(18, 255), draw(256, max_items - 1), max_items};
  std::sort(drawn.begin(), drawn.end());
  // Copied rather than erased in place: GCC's -Warray-bounds misreads an
  // erase from this short vector once max_items is a known constant.
  std::vector<index_t> sizes;
  for (const index_t s : drawn) {
    if (s <= max_items && (sizes.empty() || sizes.back() != s)) sizes.push_back(s);
  }
  return sizes;
}

// Checks the property for `run` over a pool of `pool` items (see the top of
// this file); `seed` picks the batches. The reference runs on the widest path.
template <class Run>
void expect_batch_invariant(moekit::index_t pool, moekit::index_t max_items, std::uint32_t seed,
                            Run&& run) {
  using moekit::index_t;
  BatchResults alone(static_cast<std::size_t>(pool));
  {
    const ThreadCount one(1);
    for (index_t i = 0; i < pool; ++i) {
      BatchResults r = run(std::vector<index_t>{i});
      ASSERT_EQ(r.size(), 1u);
      alone[static_cast<std::size_t>(i)] = std::move(r[0]);
      ASSERT_FALSE(alone[static_cast<std::size_t>(i)].empty()) << "item " << i;
      ASSERT_FALSE(detail::has_nan(alone[static_cast<std::size_t>(i)]))
          << "item " << i << " alone has a NaN (an unwritten output?)";
    }
  }
  std::mt19937 rng(seed);
  std::uniform_int_distribution<index_t> pick(0, pool - 1);
  for (const moekit::cpu::Isa isa : invariance_isas()) {
    const moekit::cpu::IsaLimit path(isa);
    for (const int threads : invariance_thread_counts()) {
      const ThreadCount scope(threads);
      for (const index_t size : invariance_batch_sizes(max_items, rng)) {
        std::vector<index_t> items(static_cast<std::size_t>(size));
        for (index_t& item : items) item = pick(rng);
        const BatchResults got = run(items);
        ASSERT_EQ(got.size(), items.size());
        for (std::size_t j = 0; j < items.size(); ++j) {
          const std::vector<float>& want = alone[static_cast<std::size_t>(items[j])];
          // One report per batch: the first item that differs.
          ASSERT_TRUE(same_bits(got[j], want))
              << "item " << items[j] << " at position " << j << " of a batch of " << size << " on "
              << threads << " thread(s), " << moekit::cpu::isa_name(isa)
              << " path: " << detail::first_difference(got[j], want);
        }
      }
    }
  }
}

}  // namespace moekit_test
