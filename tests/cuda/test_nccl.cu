// dist::NcclTransport on every GPU of the machine, one rank per GPU, each
// rank on its own thread of one process (ncclCommInitAll): counts, payload
// all_to_all_v, all_reduce_sum, a ring of send / recv, broadcast and
// barrier, checked against the values each rank sent. Skips (CTest reports
// it as skipped) where there is no GPU. STATUS: compiled; never run (no
// moekit test machine has had a GPU).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "moekit/dist/nccl.cuh"

namespace {

using moekit::index_t;
using moekit::dist::NcclTransport;

// One rank's checks; returns what went wrong (empty: nothing).
std::string run_rank(ncclComm_t comm, int device) {
  if (cudaSetDevice(device) != cudaSuccess) return "cudaSetDevice failed";
  cudaStream_t stream = nullptr;
  if (cudaStreamCreate(&stream) != cudaSuccess) return "cudaStreamCreate failed";
  std::string error;
  try {
    NcclTransport t(comm, stream, {std::chrono::seconds(60), moekit::dist::OnFailure::kThrow});
    const int r = t.rank(), n = t.size();
    // Counts: rank r sends 100 r + p to rank p.
    std::vector<std::int64_t> send(static_cast<std::size_t>(n)), recv(send.size(), -1);
    for (int p = 0; p < n; ++p) send[static_cast<std::size_t>(p)] = 100 * r + p;
    t.all_to_all(send, recv);
    for (int q = 0; q < n; ++q) {
      if (recv[static_cast<std::size_t>(q)] != 100 * q + r) error += "all_to_all; ";
    }
    // Payload: r + p + 1 bytes of value 16 r + p to rank p, through device memory.
    std::vector<index_t> out(static_cast<std::size_t>(n)), in(static_cast<std::size_t>(n));
    std::vector<std::byte> host;
    std::size_t in_total = 0;
    for (int p = 0; p < n; ++p) {
      out[static_cast<std::size_t>(p)] = r + p + 1;
      in[static_cast<std::size_t>(p)] = p + r + 1;
      in_total += static_cast<std::size_t>(p + r + 1);
      host.insert(host.end(), static_cast<std::size_t>(r + p + 1),
                  static_cast<std::byte>(16 * r + p));
    }
    std::byte *d_send = nullptr, *d_recv = nullptr;
    cudaMalloc(&d_send, host.size());
    cudaMalloc(&d_recv, in_total);
    cudaMemcpy(d_send, host.data(), host.size(), cudaMemcpyHostToDevice);
    t.all_to_all_v(d_send, out, d_recv, in);
    std::vector<std::byte> got(in_total);
    cudaMemcpy(got.data(), d_recv, in_total, cudaMemcpyDeviceToHost);
    std::size_t at = 0;
    for (int q = 0; q < n; ++q) {
      for (int i = 0; i < q + r + 1; ++i, ++at) {
        if (got[at] != static_cast<std::byte>(16 * q + r)) error += "all_to_all_v; ";
      }
    }
    // all_reduce_sum, a ring, broadcast, barrier.
    std::vector<std::int64_t> v = {r, 1};
    t.all_reduce_sum(v);
    if (v[0] != n * (n - 1) / 2 || v[1] != n) error += "all_reduce_sum; ";
    std::byte* d_word = nullptr;
    cudaMalloc(&d_word, 8);
    cudaMemset(d_word, r, 8);
    std::byte* d_in = nullptr;
    cudaMalloc(&d_in, 8);
    if (n > 1) {
      // Even ranks send first, odd ranks receive first: no cycle of waits.
      const int next = (r + 1) % n, prev = (r + n - 1) % n;
      if (r % 2 == 0) {
        t.send(next, {d_word, 8});
        t.recv(prev, {d_in, 8});
      } else {
        t.recv(prev, {d_in, 8});
        t.send(next, {d_word, 8});
      }
      unsigned char b = 0;
      cudaMemcpy(&b, d_in, 1, cudaMemcpyDeviceToHost);
      if (b != static_cast<unsigned char>(prev)) error += "send/recv; ";
    }
    t.broadcast(0, {d_word, 8});
    unsigned char b = 1;
    cudaMemcpy(&b, d_word, 1, cudaMemcpyDeviceToHost);
    if (b != 0) error += "broadcast; ";
    t.barrier();
    cudaFree(d_send);
    cudaFree(d_recv);
    cudaFree(d_word);
    cudaFree(d_in);
  } catch (const std::exception& e) {
    error += e.what();
  }
  cudaStreamDestroy(stream);
  return error;
}

TEST(NcclTransport, EveryOperationOnEveryGpu) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    GTEST_SKIP() << "no GPU: the NCCL transport compiles here but runs only on GPUs";
  }
  std::vector<ncclComm_t> comms(static_cast<std::size_t>(devices));
  ASSERT_EQ(ncclCommInitAll(comms.data(), devices, nullptr), ncclSuccess);
  std::vector<std::string> errors(static_cast<std::size_t>(devices));
  std::vector<std::thread> threads;
  for (int d = 0; d < devices; ++d) {
    threads.emplace_back([&, d] {
      errors[static_cast<std::size_t>(d)] = run_rank(comms[static_cast<std::size_t>(d)], d);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int d = 0; d < devices; ++d) {
    EXPECT_EQ(errors[static_cast<std::size_t>(d)], "") << "rank " << d;
    ncclCommDestroy(comms[static_cast<std::size_t>(d)]);
  }
  std::printf("[ nccl ] %d GPU(s)\n", devices);
}

}  // namespace
