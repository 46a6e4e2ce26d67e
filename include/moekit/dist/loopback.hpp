#pragma once
// N ranks as threads of one process: the transport of moekit's unit tests,
// and of users who want several expert groups in one process. Payload is in
// host memory; collectives copy straight from the senders' buffers.
//
//   moekit::dist::LoopbackGroup group(4);               // 4 ranks
//   group.run([&](moekit::dist::LoopbackTransport& t) {  // one thread per rank
//     ... t.rank(), t.all_to_all_v(...), an expert-parallel layer on t ...
//   });                                                  // rethrows the first failure
//
// Failure (TransportOptions): a rank that waits longer than the timeout in
// an operation, a rank whose transport is destroyed (its thread left, for
// instance by an exception) while others wait for it, or ranks that call
// different operations at the same point fail the whole group: every rank
// waiting or arriving later throws Errc::kTransportError naming the
// operation and the ranks involved, so a broken run ends within the timeout
// instead of hanging. OnFailure::kAbort is not offered (it would end the
// process that hosts every rank): the options' on_failure is ignored.

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "moekit/core/error.hpp"
#include "moekit/dist/transport.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace dist {

class LoopbackTransport;

// N ranks as threads of one process: the shared state of their LoopbackTransports (run() starts one
// thread per rank).
class LoopbackGroup {
 public:
  // A group of `size` ranks (at least 1) whose operations wait at most options.timeout.
  explicit LoopbackGroup(int size, TransportOptions options = {})
      : size_(checked_size(size)),
        options_(options),
        slots_(static_cast<std::size_t>(size)),
        mail_(static_cast<std::size_t>(size) * static_cast<std::size_t>(size)),
        gone_(static_cast<std::size_t>(size), false) {
    MOEKIT_CHECK_ARG(options.timeout.count() > 0, "options.timeout = ", options.timeout.count(),
                     " ms must be positive");
  }

  // The number of ranks.
  int size() const { return size_; }
  // The options it was made with.
  const TransportOptions& options() const { return options_; }

  // Runs body(transport) once per rank, each on its own thread, and joins
  // them. If any rank threw, rethrows the exception thrown first in time
  // (the cause; the others are usually "rank r left the group").
  template <class Body>
  void run(Body&& body);

 private:
  friend class LoopbackTransport;

  // What a rank deposits for a collective.
  struct Slot {
    const char* op = nullptr;
    std::uint64_t sequence = 0;
    const std::byte* send = nullptr;
    std::span<const index_t> send_bytes{};
    std::byte* recv = nullptr;
    std::span<const index_t> recv_bytes{};
    const std::int64_t* counts = nullptr;
    std::size_t count_size = 0;
    int root = 0;
  };

  static int checked_size(int size) {
    MOEKIT_CHECK_ARG(size >= 1, "size = ", size, " must be at least 1");
    return size;
  }

  std::deque<std::vector<std::byte>>& mailbox(int from, int to) {
    return mail_[static_cast<std::size_t>(from) * static_cast<std::size_t>(size_) +
                 static_cast<std::size_t>(to)];
  }

  // Marks the group failed (first message wins) and wakes every waiter.
  void fail_locked(std::string message) {
    if (!failed_) {
      failed_ = true;
      failure_ = std::move(message);
    }
    cv_.notify_all();
  }

  [[noreturn]] void throw_failure(int rank, const char* op) const {
    MOEKIT_FAIL(Errc::kTransportError, "rank ", rank, " in ", op, ": the group failed: ", failure_);
  }

  // The ranks that have not reached `phase` of the current collective.
  std::string missing(int phase) const {
    std::string s;
    for (int r = 0; r < size_; ++r) {
      if (phase_of_[static_cast<std::size_t>(r)] < phase) {
        if (!s.empty()) s += ", ";
        s += std::to_string(r);
      }
    }
    return s;
  }

  // Waits until every rank reached `phase` (1: deposited its slot, 2: done
  // reading the others'), or fails the group on a timeout or a departed rank.
  void wait_phase(std::unique_lock<std::mutex>& lock, int rank, int phase, const char* op) {
    phase_of_[static_cast<std::size_t>(rank)] = phase;
    cv_.notify_all();
    const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
    while (true) {
      if (failed_) throw_failure(rank, op);
      const bool all =
          std::all_of(phase_of_.begin(), phase_of_.end(), [phase](int p) { return p >= phase; });
      if (all) return;
      for (int r = 0; r < size_; ++r) {
        if (gone_[static_cast<std::size_t>(r)] && phase_of_[static_cast<std::size_t>(r)] < phase) {
          fail_locked(::moekit::detail::concat("rank ", r, " left the group while rank ", rank,
                                               " waited for it in ", op));
          throw_failure(rank, op);
        }
      }
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) {
        if (std::all_of(phase_of_.begin(), phase_of_.end(), [phase](int p) { return p >= phase; }))
          return;
        fail_locked(::moekit::detail::concat("rank ", rank, " waited ", options_.timeout.count(),
                                             " ms in ", op, " for rank(s) ", missing(phase),
                                             " that never arrived"));
        throw_failure(rank, op);
      }
    }
  }

  // One collective: deposit `mine`, wait for all, check that every rank is
  // in the same operation, run work(slots) (reading the others' buffers),
  // wait until all are done reading, then reset for the next collective.
  template <class Work>
  void collective(int rank, const Slot& mine, Work&& work) {
    std::unique_lock<std::mutex> lock(m_);
    if (failed_) throw_failure(rank, mine.op);
    // A rank may arrive for the next collective before the last one's reset.
    cv_.wait(lock, [&] { return failed_ || phase_of_[static_cast<std::size_t>(rank)] == 0; });
    if (failed_) throw_failure(rank, mine.op);
    slots_[static_cast<std::size_t>(rank)] = mine;
    wait_phase(lock, rank, 1, mine.op);
    for (int r = 0; r < size_; ++r) {
      const Slot& s = slots_[static_cast<std::size_t>(r)];
      if (s.sequence != mine.sequence || std::strcmp(s.op, mine.op) != 0) {
        fail_locked(::moekit::detail::concat(
            "ranks disagree on the operation: rank ", rank, " called ", mine.op, " (operation ",
            mine.sequence, "), rank ", r, " called ", s.op, " (operation ", s.sequence, ")"));
        throw_failure(rank, mine.op);
      }
    }
    lock.unlock();
    try {
      work(std::span<const Slot>(slots_));
    } catch (const std::exception& e) {  // a mismatch found while reading: fail everyone
      lock.lock();
      fail_locked(e.what());
      throw;
    }
    lock.lock();
    wait_phase(lock, rank, 2, mine.op);
    // The last rank out resets the phases for the next collective.
    if (++leaving_ == size_) {
      leaving_ = 0;
      std::fill(phase_of_.begin(), phase_of_.end(), 0);
      cv_.notify_all();
    }
  }

  void leave(int rank) {
    const std::lock_guard<std::mutex> lock(m_);
    gone_[static_cast<std::size_t>(rank)] = true;
    cv_.notify_all();
  }

  int size_;
  TransportOptions options_;
  std::mutex m_;
  std::condition_variable cv_;
  std::vector<Slot> slots_;
  std::vector<int> phase_of_ = std::vector<int>(slots_.size(), 0);
  int leaving_ = 0;
  std::vector<std::deque<std::vector<std::byte>>> mail_;  // [from * size + to]
  std::vector<bool> gone_;
  bool failed_ = false;
  std::string failure_;
};

// One rank of a LoopbackGroup: the Transport concept (dist/transport.hpp) between threads.
class LoopbackTransport {
 public:
  // Where the payload pointers live.
  static constexpr MemorySpace kMemory = MemorySpace::kHost;

  // Rank `rank` of `group` (one transport per rank and thread).
  LoopbackTransport(LoopbackGroup& group, int rank) : group_(&group), rank_(rank) {
    MOEKIT_CHECK_RANGE(rank, 0, group.size());
  }
  LoopbackTransport(const LoopbackTransport&) = delete;
  LoopbackTransport& operator=(const LoopbackTransport&) = delete;
  // Leaving: peers that wait for this rank fail at once instead of timing out.
  ~LoopbackTransport() { group_->leave(rank_); }

  // This rank, in [0, size()).
  int rank() const { return rank_; }
  // The number of ranks.
  int size() const { return group_->size(); }
  // What this rank has sent so far.
  Traffic traffic() const { return traffic_; }

  // Collective: recv[p] = what rank p sent to this rank (send and recv: size() equal parts).
  void all_to_all(std::span<const std::int64_t> send, std::span<std::int64_t> recv) {
    const std::size_t n = static_cast<std::size_t>(size());
    const std::size_t m = detail::counts_per_rank(send, recv, size());
    LoopbackGroup::Slot mine = slot("all_to_all");
    mine.counts = send.data();
    mine.count_size = send.size();
    group_->collective(rank_, mine, [&](std::span<const LoopbackGroup::Slot> slots) {
      for (std::size_t q = 0; q < n; ++q) {
        MOEKIT_CHECK(slots[q].count_size == send.size(), Errc::kTransportError, "rank ", rank_,
                     " sends ", send.size(), " counts in all_to_all, rank ", q, " ",
                     slots[q].count_size);
        const std::int64_t* from = slots[q].counts + static_cast<std::size_t>(rank_) * m;
        std::copy(from, from + m, recv.begin() + static_cast<std::ptrdiff_t>(q * m));
      }
    });
    count(static_cast<index_t>((n - 1) * m * sizeof(std::int64_t)));
  }

  // Collective: send_bytes[p] bytes from send to rank p, recv_bytes[p] from rank p into recv
  // (segments in rank order).
  void all_to_all_v(const std::byte* send, std::span<const index_t> send_bytes, std::byte* recv,
                    std::span<const index_t> recv_bytes) {
    const int n = size();
    detail::check_segments(send_bytes, n, "send_bytes");
    detail::check_segments(recv_bytes, n, "recv_bytes");
    LoopbackGroup::Slot mine = slot("all_to_all_v");
    mine.send = send;
    mine.send_bytes = send_bytes;
    mine.recv = recv;
    mine.recv_bytes = recv_bytes;
    group_->collective(rank_, mine, [&](std::span<const LoopbackGroup::Slot> slots) {
      for (int q = 0; q < n; ++q) {
        const LoopbackGroup::Slot& s = slots[static_cast<std::size_t>(q)];
        const index_t bytes = s.send_bytes[static_cast<std::size_t>(rank_)];
        MOEKIT_CHECK(bytes == recv_bytes[static_cast<std::size_t>(q)], Errc::kTransportError,
                     "all_to_all_v: rank ", q, " sends ", bytes, " bytes to rank ", rank_,
                     ", which expects ", recv_bytes[static_cast<std::size_t>(q)]);
        if (bytes > 0) {
          std::memcpy(recv + detail::segment_offset(recv_bytes, q),
                      s.send + detail::segment_offset(s.send_bytes, rank_),
                      static_cast<std::size_t>(bytes));
        }
      }
    });
    index_t out = 0;
    for (int p = 0; p < n; ++p) out += p == rank_ ? 0 : send_bytes[static_cast<std::size_t>(p)];
    count(out);
  }

  // Collective: every rank's values summed, element by element (integers: exact).
  void all_reduce_sum(std::span<std::int64_t> values) {
    const std::size_t m = values.size();
    std::vector<std::int64_t> sum(m, 0);  // the others read `values` until all are done
    LoopbackGroup::Slot mine = slot("all_reduce_sum");
    mine.counts = values.data();
    mine.count_size = m;
    group_->collective(rank_, mine, [&](std::span<const LoopbackGroup::Slot> slots) {
      for (const LoopbackGroup::Slot& s : slots) {
        MOEKIT_CHECK(s.count_size == m, Errc::kTransportError, "all_reduce_sum: rank ", rank_,
                     " sums ", m, " values, another rank ", s.count_size);
        for (std::size_t i = 0; i < m; ++i) sum[i] += s.counts[i];
      }
    });
    std::copy(sum.begin(), sum.end(), values.begin());
    count(static_cast<index_t>(m * sizeof(std::int64_t)));
  }

  // Sends bytes to rank peer (matched by its recv).
  void send(int peer, std::span<const std::byte> bytes) {
    MOEKIT_CHECK_RANGE(peer, 0, size());
    {
      const std::lock_guard<std::mutex> lock(group_->m_);
      if (group_->failed_) group_->throw_failure(rank_, "send");
      group_->mailbox(rank_, peer).emplace_back(bytes.begin(), bytes.end());
      group_->cv_.notify_all();
    }
    count(peer == rank_ ? 0 : static_cast<index_t>(bytes.size()));
  }

  // Receives exactly bytes.size() bytes from rank peer.
  void recv(int peer, std::span<std::byte> bytes) {
    MOEKIT_CHECK_RANGE(peer, 0, size());
    std::unique_lock<std::mutex> lock(group_->m_);
    auto& box = group_->mailbox(peer, rank_);
    const auto deadline = std::chrono::steady_clock::now() + group_->options_.timeout;
    while (box.empty()) {
      if (group_->failed_) group_->throw_failure(rank_, "recv");
      if (group_->gone_[static_cast<std::size_t>(peer)]) {
        group_->fail_locked(::moekit::detail::concat("rank ", peer, " left the group while rank ",
                                                     rank_, " waited to receive from it"));
        group_->throw_failure(rank_, "recv");
      }
      if (group_->cv_.wait_until(lock, deadline) == std::cv_status::timeout && box.empty()) {
        group_->fail_locked(
            ::moekit::detail::concat("rank ", rank_, " waited ", group_->options_.timeout.count(),
                                     " ms in recv for rank ", peer, ", which never sent"));
        group_->throw_failure(rank_, "recv");
      }
    }
    std::vector<std::byte> msg = std::move(box.front());
    box.pop_front();
    if (msg.size() != bytes.size()) {
      group_->fail_locked(::moekit::detail::concat("rank ", rank_, " expected ", bytes.size(),
                                                   " bytes from rank ", peer, ", which sent ",
                                                   msg.size()));
      group_->throw_failure(rank_, "recv");
    }
    lock.unlock();
    std::copy(msg.begin(), msg.end(), bytes.begin());
    ++traffic_.operations;
  }

  // Collective: root's bytes to every rank.
  void broadcast(int root, std::span<std::byte> bytes) {
    MOEKIT_CHECK_RANGE(root, 0, size());
    LoopbackGroup::Slot mine = slot("broadcast");
    mine.send = bytes.data();
    mine.root = root;
    mine.count_size = bytes.size();
    group_->collective(rank_, mine, [&](std::span<const LoopbackGroup::Slot> slots) {
      for (const LoopbackGroup::Slot& s : slots) {
        MOEKIT_CHECK(s.root == root, Errc::kTransportError, "broadcast: rank ", rank_,
                     " expects root ", root, ", another rank root ", s.root);
      }
      const LoopbackGroup::Slot& from = slots[static_cast<std::size_t>(root)];
      MOEKIT_CHECK(from.count_size == bytes.size(), Errc::kTransportError, "broadcast: rank ",
                   rank_, " expects ", bytes.size(), " bytes from root ", root, ", the root sends ",
                   from.count_size);
      if (rank_ != root && !bytes.empty()) std::memcpy(bytes.data(), from.send, bytes.size());
    });
    count(rank_ == root ? static_cast<index_t>(bytes.size()) * (size() - 1) : 0);
  }

  // Collective: returns once every rank has called it.
  void barrier() {
    group_->collective(rank_, slot("barrier"), [](std::span<const LoopbackGroup::Slot>) {});
    count(0);
  }

 private:
  LoopbackGroup::Slot slot(const char* op) {
    LoopbackGroup::Slot s;
    s.op = op;
    s.sequence = sequence_++;
    return s;
  }
  void count(index_t bytes) {
    traffic_.bytes_sent += bytes;
    ++traffic_.operations;
  }

  LoopbackGroup* group_;
  int rank_;
  std::uint64_t sequence_ = 0;  // collectives so far: ranks must agree on it
  Traffic traffic_{};
};

template <class Body>
void LoopbackGroup::run(Body&& body) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(size_));
  std::vector<std::int64_t> when(static_cast<std::size_t>(size_), 0);
  std::mutex order_m;
  std::int64_t next = 0;
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(size_));
  for (int r = 0; r < size_; ++r) {
    threads.emplace_back([&, r] {
      try {
        LoopbackTransport t(*this, r);
        body(t);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(order_m);
        errors[static_cast<std::size_t>(r)] = std::current_exception();
        when[static_cast<std::size_t>(r)] = next++;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  std::size_t first = errors.size();
  for (std::size_t r = 0; r < errors.size(); ++r) {
    if (errors[r] && (first == errors.size() || when[r] < when[first])) first = r;
  }
  if (first < errors.size()) std::rethrow_exception(errors[first]);
}

}  // namespace dist
MOEKIT_NAMESPACE_END
