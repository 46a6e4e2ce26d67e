#pragma once
// Counts heap allocations made while a CountAllocations scope lives. The test
// binary replaces the global operator new (test_gemm.cpp) to feed it, except
// under AddressSanitizer, which owns operator new: there `available` is
// false and the allocation tests skip.

#include <atomic>

#if defined(__SANITIZE_ADDRESS__)
#define MOEKIT_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOEKIT_TEST_SANITIZED 1
#endif
#endif
#if !defined(MOEKIT_TEST_SANITIZED)
#define MOEKIT_TEST_SANITIZED 0
#endif

namespace moekit_test {

struct AllocationCounter {
  static constexpr bool available = !MOEKIT_TEST_SANITIZED;
  static std::atomic<long>& count() {
    static std::atomic<long> n{0};
    return n;
  }
  static std::atomic<bool>& on() {
    static std::atomic<bool> counting{false};
    return counting;
  }
};

// Allocations (any thread) between construction and allocations().
class CountAllocations {
 public:
  CountAllocations() {
    AllocationCounter::count() = 0;
    AllocationCounter::on() = true;
  }
  ~CountAllocations() { AllocationCounter::on() = false; }
  long allocations() const { return AllocationCounter::count().load(); }
  CountAllocations(const CountAllocations&) = delete;
  CountAllocations& operator=(const CountAllocations&) = delete;
};

}  // namespace moekit_test
