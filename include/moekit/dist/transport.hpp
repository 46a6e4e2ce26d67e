#pragma once
// The transport concept of expert parallelism: what moves bytes between the
// ranks of a group, and nothing about MoE. Three implementations:
//   dist::LoopbackTransport  N ranks as threads of one process (dist/loopback.hpp)
//   dist::MpiTransport       ranks of an MPI communicator (dist/mpi.hpp, target moekit::mpi)
//   dist::NcclTransport      GPUs of an NCCL communicator (dist/nccl.cuh, device memory)
//
// Operations. Every operation is collective over the group unless it says
// otherwise: each rank calls the same operations in the same order with
// matching sizes, and a call returns when this rank's results are in place.
//   all_to_all(send, recv)        counts: send holds size() blocks of m int64, block p for
//                                 rank p; recv receives block q from rank q (host memory)
//   all_to_all_v(send, send_bytes, recv, recv_bytes)
//                                 payload: send_bytes[p] bytes for rank p, the segments
//                                 packed in rank order; recv_bytes[q] bytes arrive from
//                                 rank q, packed in rank order (sizes known from a counts
//                                 exchange); the segment to oneself is copied. send and
//                                 recv must not overlap, nor share an address even when
//                                 one is empty (MPI may read that as an in-place call)
//   all_reduce_sum(values)        int64 sums in place (host memory); integers only, since
//                                 a floating-point sum would depend on the reduction order
//   send(peer, bytes), recv(peer, bytes)
//                                 point to point (not collective); recv's size must equal
//                                 the matching send's
//   broadcast(root, bytes)        root's bytes to every rank
//   barrier()
// Payload pointers are in the transport's memory space (T::kMemory: host for
// loopback and MPI, device for NCCL); counts are always host arrays.
//
// Failure. A transport never hangs silently: a peer that does not answer
// within TransportOptions::timeout, a peer that left, or a failed call is an
// Error with Errc::kTransportError whose message names the operation, this
// rank and the peers it waited for. OnFailure::kAbort prints that message
// and ends the whole job instead (MPI_Abort, ncclCommAbort): after a
// collective failed half way, the group's state is undefined and no rank can
// safely go on, so abort is what MPI and NCCL users normally want; kThrow
// suits the loopback transport and tests.
//
// Traffic. traffic() counts the payload bytes this rank sent to other ranks
// (the segment to itself is not counted) and the operations it took part
// in, so benchmarks can report bytes per token.

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace dist {

// Where a transport's payload pointers live.
enum class MemorySpace { kHost, kDevice };

// What a transport does when an operation fails or its deadline passes.
enum class OnFailure {
  kThrow,  // throw moekit::Error (Errc::kTransportError)
  kAbort,  // print the message and end every rank of the job
};

// A transport's deadline and failure behaviour.
struct TransportOptions {
  // The longest a rank waits for its peers in one operation.
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};
  // Throw, or end the job (MPI_Abort).
  OnFailure on_failure = OnFailure::kThrow;
};

// What one rank has sent so far (see the top of this file).
struct Traffic {
  std::int64_t bytes_sent = 0;  // payload bytes to other ranks
  std::int64_t operations = 0;  // operations this rank took part in
};

template <class T>
concept Transport = requires(T& t, const T& ct, int peer, std::span<const std::int64_t> counts_in,
                             std::span<std::int64_t> counts_out, std::span<const index_t> sizes,
                             const std::byte* src, std::byte* dst, std::span<const std::byte> in,
                             std::span<std::byte> out) {
  { T::kMemory } -> std::convertible_to<MemorySpace>;
  { ct.rank() } -> std::same_as<int>;
  { ct.size() } -> std::same_as<int>;
  { ct.traffic() } -> std::same_as<Traffic>;
  t.all_to_all(counts_in, counts_out);
  t.all_to_all_v(src, sizes, dst, sizes);
  t.all_reduce_sum(counts_out);
  t.send(peer, in);
  t.recv(peer, out);
  t.broadcast(peer, out);
  t.barrier();
};

// A transport whose payload lives in host memory (what the CPU layers take).
template <class T>
concept HostTransport = Transport<T> && T::kMemory == MemorySpace::kHost;

// Every rank's `mine` (m values) gathered in rank order into `all` (size() m).
// `scratch` holds size() m values (the replicated send blocks).
template <Transport T>
void all_gather(T& t, std::span<const std::int64_t> mine, std::span<std::int64_t> all,
                std::span<std::int64_t> scratch) {
  const std::size_t m = mine.size(), n = static_cast<std::size_t>(t.size());
  MOEKIT_CHECK(all.size() == n * m && scratch.size() == n * m, Errc::kShapeMismatch, "all has ",
               all.size(), " and scratch ", scratch.size(), " values, expected ", n * m, " (", n,
               " ranks of ", m, ")");
  for (std::size_t p = 0; p < n; ++p) {
    for (std::size_t i = 0; i < m; ++i) scratch[p * m + i] = mine[i];
  }
  t.all_to_all(std::span<const std::int64_t>(scratch), all);
}

// A state that travels along the ranks in rank order: rank r > 0 first
// receives `carry` from rank r - 1; every rank then calls step(), which
// reads and updates `carry`; each rank but the last sends it on to rank
// r + 1, and the last broadcasts the final state to every rank. A fold whose
// state lives in `carry` thus runs once over all ranks' parts, in rank
// order, exactly as one process would run it over the whole: how replicated
// parameters get gradients that do not depend on the number of ranks. The
// cost is size() - 1 hops in sequence and one broadcast.
template <Transport T, class Step>
void pass_along_ranks(T& t, std::span<std::byte> carry, Step&& step) {
  const int r = t.rank(), n = t.size();
  if (r > 0) t.recv(r - 1, carry);
  step();
  if (r + 1 < n) t.send(r + 1, std::span<const std::byte>(carry));
  if (n > 1) t.broadcast(n - 1, carry);
}

// Bytes of the carry that fold_in_rank_order needs for these gradients.
inline std::size_t fold_carry_bytes(std::span<const MatrixView<float>> parts) {
  std::size_t floats = 0;
  for (const MatrixView<float>& m : parts) {
    floats += static_cast<std::size_t>(m.rows()) * static_cast<std::size_t>(m.cols());
  }
  return sizeof(std::int64_t) + floats * sizeof(float);
}

// The fold of replicated parameters' gradients over the token blocks of a
// batch split over ranks (core/token_blocks.hpp): fold(add) runs this rank's
// blocks into `parts` (add: into what they hold; otherwise its first block
// overwrites). The partial gradients travel from rank to rank with a flag
// that says whether they hold a value yet (the caller's values when
// `accumulate`, or some earlier rank's blocks), and every rank ends with the
// result of one process folding the whole batch. has_tokens: whether this
// rank has blocks. `carry` holds fold_carry_bytes(parts) bytes (8-aligned).
template <Transport T, class Fold>
void fold_in_rank_order(T& t, std::span<const MatrixView<float>> parts, bool accumulate,
                        bool has_tokens, std::span<std::byte> carry, Fold&& fold) {
  const std::size_t need = fold_carry_bytes(parts);
  MOEKIT_CHECK(carry.size() >= need, Errc::kShapeMismatch, "carry has ", carry.size(),
               " bytes, the gradients need ", need);
  const std::span<std::byte> used = carry.first(need);
  std::int64_t has_value = accumulate ? 1 : 0;
  std::byte* packed = used.data() + sizeof(std::int64_t);
  const auto pack = [&] {
    std::memcpy(used.data(), &has_value, sizeof has_value);
    std::byte* out = packed;
    for (const MatrixView<float>& m : parts) {
      const std::size_t row = static_cast<std::size_t>(m.cols()) * sizeof(float);
      for (index_t r = 0; r < m.rows(); ++r, out += row) std::memcpy(out, m.row(r), row);
    }
  };
  const auto unpack = [&] {
    std::memcpy(&has_value, used.data(), sizeof has_value);
    const std::byte* in = packed;
    for (const MatrixView<float>& m : parts) {
      const std::size_t row = static_cast<std::size_t>(m.cols()) * sizeof(float);
      for (index_t r = 0; r < m.rows(); ++r, in += row) std::memcpy(m.row(r), in, row);
    }
  };
  if (t.size() == 1) {
    fold(accumulate);
    return;
  }
  pass_along_ranks(t, used, [&] {
    if (t.rank() > 0) {
      std::memcpy(&has_value, used.data(), sizeof has_value);
      if (has_value != 0) unpack();
    }
    fold(has_value != 0);
    has_value = has_value != 0 || has_tokens ? 1 : 0;
    pack();
  });
  unpack();
}

// A non-owning, type-erased reference to any host transport, for code that
// picks its transport at run time (the expert-parallel reference model). It
// satisfies HostTransport itself; the referenced transport must outlive it.
class TransportRef {
 public:
  // Where the payload pointers live.
  static constexpr MemorySpace kMemory = MemorySpace::kHost;

  // A reference to no transport (operator bool is false).
  TransportRef() = default;
  template <HostTransport T>
  requires(!std::same_as<T, TransportRef>) TransportRef(T& t)
      : self_(&t), ops_(&ops_for<T>) {}  // NOLINT: implicit by design

  // Whether it refers to a transport.
  explicit operator bool() const { return self_ != nullptr; }
  // This rank, in [0, size()).
  int rank() const { return ops().rank(self_); }
  // The number of ranks.
  int size() const { return ops().size(self_); }
  // What this rank has sent so far.
  Traffic traffic() const { return ops().traffic(self_); }
  // Collective: recv[p] = what rank p sent to this rank (send and recv: size() equal parts).
  void all_to_all(std::span<const std::int64_t> send, std::span<std::int64_t> recv) {
    ops().all_to_all(self_, send, recv);
  }
  // Collective: send_bytes[p] bytes from send to rank p, recv_bytes[p] from rank p into recv
  // (segments in rank order).
  void all_to_all_v(const std::byte* send, std::span<const index_t> send_bytes, std::byte* recv,
                    std::span<const index_t> recv_bytes) {
    ops().all_to_all_v(self_, send, send_bytes, recv, recv_bytes);
  }
  // Collective: every rank's values summed, element by element (integers: exact).
  void all_reduce_sum(std::span<std::int64_t> values) { ops().all_reduce_sum(self_, values); }
  // Sends bytes to rank peer (matched by its recv).
  void send(int peer, std::span<const std::byte> bytes) { ops().send(self_, peer, bytes); }
  // Receives exactly bytes.size() bytes from rank peer.
  void recv(int peer, std::span<std::byte> bytes) { ops().recv(self_, peer, bytes); }
  // Collective: root's bytes to every rank.
  void broadcast(int root, std::span<std::byte> bytes) { ops().broadcast(self_, root, bytes); }
  // Collective: returns once every rank has called it.
  void barrier() { ops().barrier(self_); }

 private:
  struct Ops {
    int (*rank)(const void*);
    int (*size)(const void*);
    Traffic (*traffic)(const void*);
    void (*all_to_all)(void*, std::span<const std::int64_t>, std::span<std::int64_t>);
    void (*all_to_all_v)(void*, const std::byte*, std::span<const index_t>, std::byte*,
                         std::span<const index_t>);
    void (*all_reduce_sum)(void*, std::span<std::int64_t>);
    void (*send)(void*, int, std::span<const std::byte>);
    void (*recv)(void*, int, std::span<std::byte>);
    void (*broadcast)(void*, int, std::span<std::byte>);
    void (*barrier)(void*);
  };

  template <class T>
  static T& self(void* p) {
    return *static_cast<T*>(p);
  }
  template <class T>
  static const T& self(const void* p) {
    return *static_cast<const T*>(p);
  }

  template <class T>
  static constexpr Ops ops_for = {
      [](const void* p) { return self<T>(p).rank(); },
      [](const void* p) { return self<T>(p).size(); },
      [](const void* p) { return self<T>(p).traffic(); },
      [](void* p, std::span<const std::int64_t> s, std::span<std::int64_t> r) {
        self<T>(p).all_to_all(s, r);
      },
      [](void* p, const std::byte* s, std::span<const index_t> sb, std::byte* r,
         std::span<const index_t> rb) { self<T>(p).all_to_all_v(s, sb, r, rb); },
      [](void* p, std::span<std::int64_t> v) { self<T>(p).all_reduce_sum(v); },
      [](void* p, int peer, std::span<const std::byte> b) { self<T>(p).send(peer, b); },
      [](void* p, int peer, std::span<std::byte> b) { self<T>(p).recv(peer, b); },
      [](void* p, int root, std::span<std::byte> b) { self<T>(p).broadcast(root, b); },
      [](void* p) { self<T>(p).barrier(); },
  };

  const Ops& ops() const {
    MOEKIT_CHECK(self_ != nullptr, Errc::kNullPointer, "the TransportRef refers to no transport");
    return *ops_;
  }

  void* self_ = nullptr;
  const Ops* ops_ = nullptr;
};

namespace detail {

// An all_to_all's counts: send and recv the same multiple of the ranks.
inline std::size_t counts_per_rank(std::span<const std::int64_t> send,
                                   std::span<const std::int64_t> recv, int ranks) {
  const auto n = static_cast<std::size_t>(ranks);
  MOEKIT_CHECK(send.size() % n == 0 && recv.size() == send.size(), Errc::kShapeMismatch,
               "send has ", send.size(), " and recv ", recv.size(),
               " counts; both must be the same multiple of ", n, " ranks");
  return send.size() / n;
}

// The segment sizes of an all_to_all_v: one per rank, none negative.
inline void check_segments(std::span<const index_t> bytes, int ranks, const char* name) {
  MOEKIT_CHECK(bytes.size() == static_cast<std::size_t>(ranks), Errc::kShapeMismatch, name, " has ",
               bytes.size(), " entries for ", ranks, " ranks");
  for (std::size_t p = 0; p < bytes.size(); ++p) {
    MOEKIT_CHECK(bytes[p] >= 0, Errc::kInvalidArgument, name, "[", p, "] = ", bytes[p],
                 " is negative");
  }
}

// Byte offset of segment p: the sum of the segments before it.
inline index_t segment_offset(std::span<const index_t> bytes, int p) {
  index_t off = 0;
  for (int q = 0; q < p; ++q) off += bytes[static_cast<std::size_t>(q)];
  return off;
}

}  // namespace detail
}  // namespace dist
MOEKIT_NAMESPACE_END
