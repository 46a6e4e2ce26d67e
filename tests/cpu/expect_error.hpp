#pragma once
// Runs a call that must fail: checks it throws moekit::Error with `code` and
// returns the message, so a test can check the values it names.

#include <gtest/gtest.h>

#include <string>

#include "moekit/core/error.hpp"

namespace moekit_test {

template <class F>
std::string expect_error(F&& f, moekit::Errc code) {
  try {
    f();
  } catch (const moekit::Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    return e.what();
  } catch (...) {
    ADD_FAILURE() << "threw something other than moekit::Error";
    return {};
  }
  ADD_FAILURE() << "did not throw";
  return {};
}

}  // namespace moekit_test
