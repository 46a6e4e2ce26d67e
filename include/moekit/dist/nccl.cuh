#pragma once
// The transport over NCCL (dist/transport.hpp) for GPUs: payload in device
// memory, moved by grouped ncclSend / ncclRecv (all_to_all_v), ncclAllReduce,
// ncclBroadcast. Counts stay host arrays: they go through a small device
// buffer of the transport's own. Needs NCCL (nccl.h, libnccl) beside the
// CUDA toolkit; the CUDA backend's build compiles it where both exist.
//
// STATUS: written and compiled; it has never run. It runs only where GPUs
// exist, and no moekit test machine has had one (tests/cuda/test_nccl.cu
// checks it on every GPU of a machine and skips without one). No moekit
// layer takes device-memory transports yet: the expert-parallel layer is
// the CPU's (nn/expert_parallel_moe_layer.hpp). This is the transport a GPU
// layer would use, and docs/expert_parallel.md says how a DeepEP-style
// transport (fused dispatch kernels over NVLink / RDMA) plugs into the same
// concept.
//
//   ncclUniqueId id;  // rank 0: ncclGetUniqueId(&id), then shared (e.g. MPI_Bcast)
//   ncclComm_t comm;
//   ncclCommInitRank(&comm, ranks, id, rank);
//   moekit::dist::NcclTransport transport(comm, stream);
//
// Each operation is enqueued on the transport's stream and waited for (a
// call returns when its results are in place, as the concept says), by
// polling cudaStreamQuery and ncclCommGetAsyncError against the deadline of
// TransportOptions. A peer that never arrives, a failed NCCL call or an
// asynchronous NCCL error is reported with the operation and this rank;
// the communicator is then aborted (ncclCommAbort), since a half-finished
// collective leaves it unusable, and with OnFailure::kAbort (the default)
// the process ends (std::abort) after printing the message, so that the
// job launcher ends the other ranks.

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>
#include <thread>

#include "moekit/core/error.hpp"
#include "moekit/dist/transport.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace dist {

// The Transport concept over an NCCL communicator, payloads in device memory (compiled, never run:
// see the top of this file).
class NcclTransport {
 public:
  // Where the payload pointers live.
  static constexpr MemorySpace kMemory = MemorySpace::kDevice;
  // Abort on failure by default, as MpiTransport.
  static constexpr TransportOptions kDefaultOptions = {std::chrono::seconds(60), OnFailure::kAbort};

  // comm: an initialised communicator (not owned); stream: where the
  // operations run. count_capacity: the most int64 counts one all_to_all or
  // all_reduce_sum moves (the device buffer that stages them).
  NcclTransport(ncclComm_t comm, cudaStream_t stream, TransportOptions options = kDefaultOptions,
                std::size_t count_capacity = 1 << 16)
      : comm_(comm), stream_(stream), options_(options), capacity_(count_capacity) {
    MOEKIT_CHECK(comm != nullptr, Errc::kNullPointer, "comm is null");
    MOEKIT_CHECK_ARG(options.timeout.count() > 0, "options.timeout = ", options.timeout.count(),
                     " ms must be positive");
    nccl(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    nccl(ncclCommCount(comm_, &size_), "ncclCommCount");
    cuda(cudaMalloc(&counts_, 2 * capacity_ * sizeof(std::int64_t)), "cudaMalloc");
  }
  NcclTransport(const NcclTransport&) = delete;
  NcclTransport& operator=(const NcclTransport&) = delete;
  ~NcclTransport() { cudaFree(counts_); }

  // This rank, in [0, size()).
  int rank() const { return rank_; }
  // The number of ranks.
  int size() const { return size_; }
  // What this rank has sent so far.
  Traffic traffic() const { return traffic_; }
  // The NCCL communicator it runs on.
  ncclComm_t communicator() const { return comm_; }
  // The stream its operations are enqueued on.
  cudaStream_t stream() const { return stream_; }

  // Collective: recv[p] = what rank p sent to this rank (send and recv: size() equal parts).
  void all_to_all(std::span<const std::int64_t> send, std::span<std::int64_t> recv) {
    const std::size_t n = static_cast<std::size_t>(size_);
    const std::size_t m = detail::counts_per_rank(send, recv, size_);
    check_capacity(send.size());
    const std::size_t bytes = send.size() * sizeof(std::int64_t);
    std::int64_t* in = counts_;
    std::int64_t* out = counts_ + capacity_;
    cuda(cudaMemcpyAsync(in, send.data(), bytes, cudaMemcpyHostToDevice, stream_),
         "cudaMemcpyAsync");
    nccl(ncclGroupStart(), "ncclGroupStart");
    for (int p = 0; p < size_; ++p) {
      const std::size_t at = static_cast<std::size_t>(p) * m;
      nccl(ncclSend(in + at, m, ncclInt64, p, comm_, stream_), "ncclSend");
      nccl(ncclRecv(out + at, m, ncclInt64, p, comm_, stream_), "ncclRecv");
    }
    nccl(ncclGroupEnd(), "ncclGroupEnd");
    cuda(cudaMemcpyAsync(recv.data(), out, bytes, cudaMemcpyDeviceToHost, stream_),
         "cudaMemcpyAsync");
    wait("all_to_all");
    count(static_cast<index_t>((n - 1) * m * sizeof(std::int64_t)));
  }

  // send / recv: device pointers; one grouped ncclSend / ncclRecv per peer.
  void all_to_all_v(const std::byte* send, std::span<const index_t> send_bytes, std::byte* recv,
                    std::span<const index_t> recv_bytes) {
    detail::check_segments(send_bytes, size_, "send_bytes");
    detail::check_segments(recv_bytes, size_, "recv_bytes");
    index_t send_off = 0, recv_off = 0, out = 0;
    nccl(ncclGroupStart(), "ncclGroupStart");
    for (int p = 0; p < size_; ++p) {
      const auto s = static_cast<std::size_t>(send_bytes[static_cast<std::size_t>(p)]);
      const auto r = static_cast<std::size_t>(recv_bytes[static_cast<std::size_t>(p)]);
      if (s > 0) nccl(ncclSend(send + send_off, s, ncclChar, p, comm_, stream_), "ncclSend");
      if (r > 0) nccl(ncclRecv(recv + recv_off, r, ncclChar, p, comm_, stream_), "ncclRecv");
      send_off += static_cast<index_t>(s);
      recv_off += static_cast<index_t>(r);
      if (p != rank_) out += static_cast<index_t>(s);
    }
    nccl(ncclGroupEnd(), "ncclGroupEnd");
    wait("all_to_all_v");
    count(out);
  }

  // Collective: every rank's values summed, element by element (integers: exact).
  void all_reduce_sum(std::span<std::int64_t> values) {
    check_capacity(values.size());
    const std::size_t bytes = values.size() * sizeof(std::int64_t);
    cuda(cudaMemcpyAsync(counts_, values.data(), bytes, cudaMemcpyHostToDevice, stream_),
         "cudaMemcpyAsync");
    nccl(ncclAllReduce(counts_, counts_, values.size(), ncclInt64, ncclSum, comm_, stream_),
         "ncclAllReduce");
    cuda(cudaMemcpyAsync(values.data(), counts_, bytes, cudaMemcpyDeviceToHost, stream_),
         "cudaMemcpyAsync");
    wait("all_reduce_sum");
    count(static_cast<index_t>(bytes));
  }

  // Sends bytes to rank peer (matched by its recv).
  void send(int peer, std::span<const std::byte> bytes) {
    MOEKIT_CHECK_RANGE(peer, 0, size_);
    nccl(ncclSend(bytes.data(), bytes.size(), ncclChar, peer, comm_, stream_), "ncclSend");
    wait("send", peer);
    count(peer == rank_ ? 0 : static_cast<index_t>(bytes.size()));
  }

  // Receives exactly bytes.size() bytes from rank peer.
  void recv(int peer, std::span<std::byte> bytes) {
    MOEKIT_CHECK_RANGE(peer, 0, size_);
    nccl(ncclRecv(bytes.data(), bytes.size(), ncclChar, peer, comm_, stream_), "ncclRecv");
    wait("recv", peer);
    ++traffic_.operations;
  }

  // Collective: root's bytes to every rank.
  void broadcast(int root, std::span<std::byte> bytes) {
    MOEKIT_CHECK_RANGE(root, 0, size_);
    nccl(ncclBroadcast(bytes.data(), bytes.data(), bytes.size(), ncclChar, root, comm_, stream_),
         "ncclBroadcast");
    wait("broadcast");
    count(rank_ == root ? static_cast<index_t>(bytes.size()) * (size_ - 1) : 0);
  }

  // Collective: returns once every rank has called it.
  void barrier() {
    std::int64_t one[1] = {1};
    all_reduce_sum(one);
  }

 private:
  void check_capacity(std::size_t counts) const {
    MOEKIT_CHECK(counts <= capacity_, Errc::kShapeMismatch, counts,
                 " counts exceed the transport's count_capacity = ", capacity_);
  }

  [[noreturn]] void fail(const std::string& message) {
    const std::string what = ::moekit::detail::concat("moekit::dist::NcclTransport (rank ", rank_,
                                                      " of ", size_, "): ", message);
    ncclCommAbort(comm_);  // the communicator cannot finish a half-done collective
    if (options_.on_failure == OnFailure::kAbort) {
      std::fprintf(stderr, "%s [transport error; aborting]\n", what.c_str());
      std::fflush(stderr);
      std::abort();
    }
    throw Error(Errc::kTransportError, what);
  }

  void nccl(ncclResult_t r, const char* call) {
    if (r == ncclSuccess) return;
    fail(::moekit::detail::concat(call, " failed: ", ncclGetErrorString(r), " (",
                                  ncclGetLastError(comm_), ")"));
  }
  void cuda(cudaError_t r, const char* call) {
    if (r == cudaSuccess) return;
    fail(::moekit::detail::concat(call, " failed: ", cudaGetErrorName(r), " (",
                                  cudaGetErrorString(r), ")"));
  }

  // Waits for the stream (the operation and its copies) with the deadline,
  // watching NCCL's asynchronous errors.
  void wait(const char* op, int peer = -1) {
    const auto start = std::chrono::steady_clock::now();
    while (true) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) cuda(q, "cudaStreamQuery");
      ncclResult_t async = ncclSuccess;
      nccl(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
      if (async != ncclSuccess && async != ncclInProgress) {
        fail(::moekit::detail::concat(op, ": NCCL reported ", ncclGetErrorString(async)));
      }
      const auto waited = std::chrono::steady_clock::now() - start;
      if (waited >= options_.timeout) {
        const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(waited).count();
        fail(peer >= 0 ? ::moekit::detail::concat(op, ": waited ", ms, " ms for rank ", peer,
                                                  ", which did not answer")
                       : ::moekit::detail::concat(op, ": waited ", ms,
                                                  " ms for the other ranks, which did not all "
                                                  "arrive"));
      }
      std::this_thread::yield();
    }
  }

  void count(index_t bytes) {
    traffic_.bytes_sent += bytes;
    ++traffic_.operations;
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  TransportOptions options_;
  std::size_t capacity_;
  int rank_ = 0, size_ = 1;
  std::int64_t* counts_ = nullptr;  // device: 2 x capacity_ staged counts
  Traffic traffic_{};
};

static_assert(Transport<NcclTransport>);

}  // namespace dist
MOEKIT_NAMESPACE_END
