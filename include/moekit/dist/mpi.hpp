#pragma once
// The transport over MPI (dist/transport.hpp), for CPU clusters: needs an
// MPI implementation (link the CMake target moekit::mpi; Debian:
// libopenmpi-dev, openmpi-bin) and MPI initialised (MpiSession below, or the
// caller's own MPI_Init_thread). Payload is in host memory.
//
//   moekit::dist::MpiSession mpi(argc, argv);   // MPI_Init_thread ... MPI_Finalize
//   moekit::dist::MpiTransport transport;       // MPI_COMM_WORLD, duplicated
//   ... an expert-parallel layer on `transport` ...
//   mpirun -np 4 ./my_program
//
// The transport works on its own duplicate of the communicator, so its
// messages never match the caller's, and sets MPI_ERRORS_RETURN on it so a
// failed call comes back here and is reported with its context.
//
// Failure detection. Every operation is a non-blocking MPI call (Ialltoall,
// Ialltoallv, Iallreduce, Isend, Irecv, Ibcast, Ibarrier) whose request is
// polled against a deadline (TransportOptions::timeout). What is detected:
//   - a peer that never arrives (hung, deadlocked elsewhere, finalized early,
//     or waiting in another operation): this rank's deadline passes and it
//     reports the operation, itself and the time waited;
//   - a failed MPI call (the message of MPI_Error_string);
//   - a process that dies (signal, or exit without MPI_Finalize): MPI's own
//     runtime notices it and terminates the job (Open MPI's mpirun prints
//     which rank exited and with what status and kills the others); no
//     error reaches the surviving ranks' code, since they are ended.
// What MPI cannot tell: which peer is missing from a collective (only that
// it did not complete), nor cancel a collective once posted. After a
// timeout the communicator therefore cannot be used again, and the default
// policy is OnFailure::kAbort: print the message on stderr, then
// MPI_Abort(MPI_COMM_WORLD), which ends every rank within mpirun's own
// time. With kThrow the Error reaches the caller, who must not use the
// transport again (and should call MPI_Abort itself).

// Only MPI's C API is used; its deprecated C++ bindings stay out.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
// Keep MPI's C++ bindings out (Open MPI and MPICH spellings).
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/dist/transport.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace dist {

// MPI_Init_thread (MPI_THREAD_FUNNELED: only the thread that made the
// session calls MPI) for the life of the object, then MPI_Finalize. Does
// nothing if MPI is already initialised by the caller.
class MpiSession {
 public:
  // Initialises MPI with the program's arguments unless it already is.
  MpiSession(int& argc, char**& argv) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized) return;
    int provided = 0;
    const int rc = MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MOEKIT_CHECK(rc == MPI_SUCCESS, Errc::kTransportError, "MPI_Init_thread failed (code ", rc,
                 ")");
    owner_ = true;
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  ~MpiSession() {
    if (owner_) MPI_Finalize();
  }

 private:
  bool owner_ = false;
};

// The Transport concept over an MPI communicator (a duplicate of the one given): non-blocking calls
// polled against the deadline (see the top of this file).
class MpiTransport {
 public:
  // Where the payload pointers live.
  static constexpr MemorySpace kMemory = MemorySpace::kHost;

  // Abort on failure by default (see the top of this file).
  static constexpr TransportOptions kDefaultOptions = {std::chrono::seconds(60), OnFailure::kAbort};

  // A transport on a duplicate of comm; MPI must be initialised.
  explicit MpiTransport(MPI_Comm comm = MPI_COMM_WORLD, TransportOptions options = kDefaultOptions)
      : options_(options) {
    MOEKIT_CHECK_ARG(options.timeout.count() > 0, "options.timeout = ", options.timeout.count(),
                     " ms must be positive");
    int initialized = 0;
    MPI_Initialized(&initialized);
    MOEKIT_CHECK(initialized != 0, Errc::kTransportError,
                 "MPI is not initialised (create an MpiSession or call MPI_Init_thread first)");
    MOEKIT_CHECK(MPI_Comm_dup(comm, &comm_) == MPI_SUCCESS, Errc::kTransportError,
                 "MPI_Comm_dup failed");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    segments_.resize(4 * static_cast<std::size_t>(size_));
  }
  MpiTransport(const MpiTransport&) = delete;
  MpiTransport& operator=(const MpiTransport&) = delete;
  ~MpiTransport() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  // This rank, in [0, size()).
  int rank() const { return rank_; }
  // The number of ranks.
  int size() const { return size_; }
  // What this rank has sent so far.
  Traffic traffic() const { return traffic_; }
  // The duplicated communicator it runs on.
  MPI_Comm communicator() const { return comm_; }

  // Collective: recv[p] = what rank p sent to this rank (send and recv: size() equal parts).
  void all_to_all(std::span<const std::int64_t> send, std::span<std::int64_t> recv) {
    const std::size_t n = static_cast<std::size_t>(size_);
    const int m = checked_int(static_cast<index_t>(detail::counts_per_rank(send, recv, size_)),
                              "counts per rank");
    MPI_Request req = MPI_REQUEST_NULL;
    call(MPI_Ialltoall(send.data(), m, MPI_INT64_T, recv.data(), m, MPI_INT64_T, comm_, &req),
         "all_to_all");
    wait(req, "all_to_all");
    count(static_cast<index_t>((n - 1) * static_cast<std::size_t>(m) * sizeof(std::int64_t)));
  }

  // Collective: send_bytes[p] bytes from send to rank p, recv_bytes[p] from rank p into recv
  // (segments in rank order).
  void all_to_all_v(const std::byte* send, std::span<const index_t> send_bytes, std::byte* recv,
                    std::span<const index_t> recv_bytes) {
    detail::check_segments(send_bytes, size_, "send_bytes");
    detail::check_segments(recv_bytes, size_, "recv_bytes");
    // MPI libraries may take equal addresses for an in-place exchange and
    // then wait for data that never comes: refuse them.
    MOEKIT_CHECK(send != recv || (detail::segment_offset(send_bytes, size_) == 0 &&
                                  detail::segment_offset(recv_bytes, size_) == 0),
                 Errc::kInvalidArgument, "send and recv are the same address");
    std::vector<int>& v = segments_;  // counts and displacements as MPI's ints
    const std::size_t n = static_cast<std::size_t>(size_);
    index_t send_off = 0, recv_off = 0, out = 0;
    for (std::size_t p = 0; p < n; ++p) {
      v[p] = checked_int(send_bytes[p], "an all_to_all_v segment");
      v[n + p] = checked_int(send_off, "an all_to_all_v offset");
      v[2 * n + p] = checked_int(recv_bytes[p], "an all_to_all_v segment");
      v[3 * n + p] = checked_int(recv_off, "an all_to_all_v offset");
      send_off += send_bytes[p];
      recv_off += recv_bytes[p];
      if (static_cast<int>(p) != rank_) out += send_bytes[p];
    }
    MPI_Request req = MPI_REQUEST_NULL;
    call(MPI_Ialltoallv(send, v.data(), v.data() + n, MPI_BYTE, recv, v.data() + 2 * n,
                        v.data() + 3 * n, MPI_BYTE, comm_, &req),
         "all_to_all_v");
    wait(req, "all_to_all_v");
    count(out);
  }

  // Collective: every rank's values summed, element by element (integers: exact).
  void all_reduce_sum(std::span<std::int64_t> values) {
    const int m = checked_int(static_cast<index_t>(values.size()), "all_reduce_sum's size");
    MPI_Request req = MPI_REQUEST_NULL;
    call(MPI_Iallreduce(MPI_IN_PLACE, values.data(), m, MPI_INT64_T, MPI_SUM, comm_, &req),
         "all_reduce_sum");
    wait(req, "all_reduce_sum");
    count(static_cast<index_t>(values.size() * sizeof(std::int64_t)));
  }

  // Sends bytes to rank peer (matched by its recv).
  void send(int peer, std::span<const std::byte> bytes) {
    MOEKIT_CHECK_RANGE(peer, 0, size_);
    const int m = checked_int(static_cast<index_t>(bytes.size()), "a send's size");
    MPI_Request req = MPI_REQUEST_NULL;
    call(MPI_Isend(bytes.data(), m, MPI_BYTE, peer, kTag, comm_, &req), "send");
    wait(req, "send", peer);
    count(peer == rank_ ? 0 : static_cast<index_t>(bytes.size()));
  }

  // Receives exactly bytes.size() bytes from rank peer.
  void recv(int peer, std::span<std::byte> bytes) {
    MOEKIT_CHECK_RANGE(peer, 0, size_);
    const int m = checked_int(static_cast<index_t>(bytes.size()), "a recv's size");
    MPI_Request req = MPI_REQUEST_NULL;
    call(MPI_Irecv(bytes.data(), m, MPI_BYTE, peer, kTag, comm_, &req), "recv");
    MPI_Status status;
    wait(req, "recv", peer, &status);
    int got = 0;
    MPI_Get_count(&status, MPI_BYTE, &got);
    if (got != m) {
      fail(::moekit::detail::concat("rank ", rank_, " expected ", m, " bytes from rank ", peer,
                                    ", which sent ", got));
    }
    ++traffic_.operations;
  }

  // Collective: root's bytes to every rank.
  void broadcast(int root, std::span<std::byte> bytes) {
    MOEKIT_CHECK_RANGE(root, 0, size_);
    const int m = checked_int(static_cast<index_t>(bytes.size()), "a broadcast's size");
    MPI_Request req = MPI_REQUEST_NULL;
    call(MPI_Ibcast(bytes.data(), m, MPI_BYTE, root, comm_, &req), "broadcast");
    wait(req, "broadcast");
    count(rank_ == root ? static_cast<index_t>(bytes.size()) * (size_ - 1) : 0);
  }

  // Collective: returns once every rank has called it.
  void barrier() {
    MPI_Request req = MPI_REQUEST_NULL;
    call(MPI_Ibarrier(comm_, &req), "barrier");
    wait(req, "barrier");
    count(0);
  }

 private:
  static constexpr int kTag = 0x6d6b;  // on the transport's own communicator

  int checked_int(index_t value, const char* what) const {
    MOEKIT_CHECK(value <= INT_MAX, Errc::kUnsupported, what, " of ", value,
                 " exceeds MPI's int count (", INT_MAX, ")");
    return static_cast<int>(value);
  }

  [[noreturn]] void fail(const std::string& message) const {
    const std::string what = ::moekit::detail::concat("moekit::dist::MpiTransport (rank ", rank_,
                                                      " of ", size_, "): ", message);
    if (options_.on_failure == OnFailure::kAbort) {
      std::fprintf(stderr, "%s [transport error; aborting every rank]\n", what.c_str());
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 3);
    }
    throw Error(Errc::kTransportError, what);
  }

  void call(int rc, const char* op) const {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, text, &len);
    fail(::moekit::detail::concat(
        op, ": MPI failed: ", std::string(text, static_cast<std::size_t>(len))));
  }

  // Polls `req` until it completes or the deadline passes. MPI moves a large
  // message only while some call on this rank polls it (no progress
  // thread), so the loop polls without pause, yielding the core between
  // polls; only after a second of waiting (a peer that is late, not data
  // in flight) does it nap between polls, so that a rank that waits long
  // does not take a core from the ranks it waits for.
  void wait(MPI_Request& req, const char* op, int peer = -1,
            MPI_Status* status = MPI_STATUS_IGNORE) const {
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + options_.timeout;
    int done = 0;
    while (true) {
      call(MPI_Test(&req, &done, status), op);
      if (done) return;
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) {
        const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - start);
        fail(peer >= 0 ? ::moekit::detail::concat(op, ": waited ", ms.count(), " ms for rank ",
                                                  peer, ", which did not answer")
                       : ::moekit::detail::concat(op, ": waited ", ms.count(),
                                                  " ms for the other ranks, which did not all "
                                                  "arrive (a rank hung, left, or called another "
                                                  "operation)"));
      }
      if (now - start < std::chrono::seconds(1)) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    }
  }

  void count(index_t bytes) {
    traffic_.bytes_sent += bytes;
    ++traffic_.operations;
  }

  TransportOptions options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  std::vector<int> segments_;  // all_to_all_v's counts and displacements (4 per rank)
  Traffic traffic_{};
};

}  // namespace dist
MOEKIT_NAMESPACE_END
