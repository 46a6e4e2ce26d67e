#pragma once
// Who holds what in an expert-parallel group: the experts of each rank
// (ExpertPlacement), the tokens of each rank (check_token_split), and the check
// that every rank was configured alike (Fingerprint, agree).
//
// Experts. E experts are split into contiguous ranges in rank order: rank r
// owns experts [first(r), first(r + 1)). Any split is allowed (even() gives
// the first E mod N ranks one more expert; from_counts() any counts, zero
// included). Contiguous ranges make each rank's share of the expert-major
// buffer one segment, so a dispatch needs no reordering on the sender.
//
// Tokens. The global batch is the ranks' local batches concatenated in rank
// order: rank r holds global tokens [offset(r), offset(r) + tokens(r)). Every
// rank but the last one holding tokens must hold a multiple of
// kTokenBlock tokens (any count, zero included, is fine for the others),
// so that the fixed token blocks of core/token_blocks.hpp never straddle two
// ranks: that is what makes every result independent of the number of ranks.

#include <algorithm>
#include <bit>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/core/token_blocks.hpp"
#include "moekit/core/types.hpp"
#include "moekit/dist/transport.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace dist {

// Which rank owns which routed experts: rank r owns the contiguous experts [first(r), first(r) +
// count(r)), in rank order.
class ExpertPlacement {
 public:
  // An empty placement (no ranks).
  ExpertPlacement() = default;

  // E experts over `ranks` ranks as evenly as possible, lower ranks first.
  static ExpertPlacement even(int experts, int ranks) {
    MOEKIT_CHECK_ARG(experts >= 1, "experts = ", experts, " must be at least 1");
    MOEKIT_CHECK_ARG(ranks >= 1, "ranks = ", ranks, " must be at least 1");
    std::vector<int> counts(static_cast<std::size_t>(ranks), experts / ranks);
    for (int r = 0; r < experts % ranks; ++r) ++counts[static_cast<std::size_t>(r)];
    return from_counts(counts);
  }

  // counts[r] experts to rank r (each >= 0; their sum is E).
  static ExpertPlacement from_counts(std::span<const int> counts) {
    MOEKIT_CHECK_ARG(!counts.empty(), "counts is empty: a placement needs at least one rank");
    ExpertPlacement p;
    p.first_.assign(1, 0);
    for (std::size_t r = 0; r < counts.size(); ++r) {
      MOEKIT_CHECK_ARG(counts[r] >= 0, "counts[", r, "] = ", counts[r], " is negative");
      p.first_.push_back(p.first_.back() + counts[r]);
    }
    MOEKIT_CHECK_ARG(p.first_.back() >= 1, "counts place no expert at all");
    return p;
  }

  // Whether it places nothing (default-constructed).
  bool empty() const { return first_.empty(); }
  // The number of ranks.
  int ranks() const { return static_cast<int>(first_.size()) - 1; }
  // E, the experts placed.
  int experts() const { return first_.empty() ? 0 : first_.back(); }
  // The first expert of rank `rank`.
  int first(int rank) const { return first_[checked(rank)]; }
  // The number of experts of rank `rank` (0 allowed).
  int count(int rank) const { return first_[checked(rank) + 1] - first_[checked(rank)]; }
  // The rank that owns expert e.
  int owner(int expert) const {
    MOEKIT_CHECK_RANGE(expert, 0, experts());
    return static_cast<int>(std::upper_bound(first_.begin(), first_.end(), expert) -
                            first_.begin()) -
           1;
  }

 private:
  std::size_t checked(int rank) const {
    MOEKIT_CHECK_RANGE(rank, 0, ranks());
    return static_cast<std::size_t>(rank);
  }

  std::vector<int> first_;  // ranks + 1 entries
};

// Checks the token rule above for the ranks' local counts (tokens[r] for
// rank r) and returns the batch's total.
inline index_t check_token_split(std::span<const std::int64_t> tokens) {
  int last = -1;  // the last rank holding tokens
  index_t total = 0;
  for (std::size_t r = 0; r < tokens.size(); ++r) {
    MOEKIT_CHECK(tokens[r] >= 0, Errc::kInvalidArgument, "rank ", r, " holds ", tokens[r],
                 " tokens");
    total += static_cast<index_t>(tokens[r]);
    if (tokens[r] > 0) last = static_cast<int>(r);
  }
  for (int r = 0; r < last; ++r) {
    const std::int64_t t = tokens[static_cast<std::size_t>(r)];
    MOEKIT_CHECK(t % kTokenBlock == 0, Errc::kInvalidArgument, "rank ", r, " holds ", t,
                 " tokens, not a multiple of kTokenBlock = ", kTokenBlock, ", and rank ", last,
                 " after it holds tokens: every rank but the last one holding tokens must hold a "
                 "multiple of ",
                 kTokenBlock,
                 " (the fixed blocks that make results independent of the number "
                 "of ranks)");
  }
  return total;
}

// A 64-bit FNV-1a hash of configuration values, fed field by field (never
// a struct's bytes, whose padding is undefined).
class Fingerprint {
 public:
  // Feeds one value (integers as 64-bit, floats by their bits, strings with their length).
  Fingerprint& add(std::int64_t v) { return bytes(&v, sizeof v); }
  // As add(std::int64_t).
  Fingerprint& add(int v) { return add(static_cast<std::int64_t>(v)); }
  // As add(std::int64_t).
  Fingerprint& add(bool v) { return add(static_cast<std::int64_t>(v)); }
  // Its 8 bytes.
  Fingerprint& add(std::uint64_t v) { return bytes(&v, sizeof v); }
  // Its bits.
  Fingerprint& add(double v) { return add(std::bit_cast<std::uint64_t>(v)); }
  // Its bits.
  Fingerprint& add(float v) {
    return add(static_cast<std::int64_t>(std::bit_cast<std::uint32_t>(v)));
  }
  // Its length, then its bytes.
  Fingerprint& add(std::string_view s) {
    add(static_cast<std::int64_t>(s.size()));
    return bytes(s.data(), s.size());
  }
  // The hash so far.
  std::uint64_t value() const { return h_; }

 private:
  Fingerprint& bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) {
      h_ ^= b[i];
      h_ *= 0x100000001b3ull;
    }
    return *this;
  }
  std::uint64_t h_ = 0xcbf29ce484222325ull;
};

// Collective: every rank's fingerprint (and whether its own checks passed)
// gathered and compared, so that ranks configured differently stop at setup
// with the same error on every rank instead of exchanging mismatched data.
// `ok` = false means this rank already rejected its configuration: the
// others then report which rank did. `what` names the configured object.
template <Transport T>
void agree(T& t, bool ok, std::uint64_t fingerprint, const char* what) {
  const std::size_t n = static_cast<std::size_t>(t.size());
  const std::int64_t mine[2] = {ok ? 1 : 0, std::bit_cast<std::int64_t>(fingerprint)};
  std::vector<std::int64_t> all(2 * n), scratch(2 * n);
  all_gather(t, std::span<const std::int64_t>(mine), std::span<std::int64_t>(all),
             std::span<std::int64_t>(scratch));
  for (std::size_t r = 0; r < n; ++r) {
    MOEKIT_CHECK(all[2 * r] == 1, Errc::kInvalidArgument, what, ": rank ", r,
                 " rejected its configuration (its own error says why)");
  }
  for (std::size_t r = 1; r < n; ++r) {
    MOEKIT_CHECK(all[2 * r + 1] == all[1], Errc::kInvalidArgument, what,
                 ": the ranks disagree on the configuration: rank ", r, " has fingerprint ",
                 std::bit_cast<std::uint64_t>(all[2 * r + 1]), ", rank 0 has ",
                 std::bit_cast<std::uint64_t>(all[1]),
                 " (every rank must build it with the same configuration, placement and "
                 "number of ranks)");
  }
}

}  // namespace dist
MOEKIT_NAMESPACE_END
