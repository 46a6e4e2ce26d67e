// Overlapping device arguments (issue 21 item 3): the CUDA entry points run
// the library's one overlap check (core/view.hpp) on their device pointers
// before anything is launched, so these tests need no GPU: fake, aligned
// pointers stand for device memory, and the call must refuse, naming itself
// and both arguments.
#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <span>

#include "gpu_test.cuh"
#include "moekit/cuda/aux_losses.cuh"
#include "moekit/cuda/distillation.cuh"
#include "moekit/cuda/early_exit.cuh"
#include "moekit/cuda/lora.cuh"
#include "moekit/cuda/router.cuh"

namespace {

using moekit::Errc;
using moekit::index_t;
using moekit::MoeSpec;
using moekit_test::expect_error;
using moekit_test::fake;
namespace gpu = moekit::gpu;

constexpr std::size_t kBytes = std::size_t{1} << 20;

TEST(GpuOverlap, RoutingAndLossesRefuseAliasedOutputs) {
  using S = MoeSpec<8, 2>;
  const index_t T = 16;
  void* ws = fake<void>(100);
  std::size_t bytes = kBytes;
  // Scores written over the logits they are computed from.
  const gpu::RouteArgs<S, float> route{
      {fake<float>(1), T, 8}, {}, {}, {fake<float>(1), T, 8}, {fake<std::int32_t>(2), T, 2},
      {fake<float>(3), T, 2}};
  expect_error([&] { (void)gpu::route(ws, bytes, route); }, Errc::kInvalidArgument,
               "gpu::route: args.scores overlaps args.logits");
  gpu::ZLossArgs<S, float> z{{fake<float>(1), T, 8}, 1.0f, fake<double>(4), {fake<float>(1), T, 8}};
  expect_error([&] { (void)gpu::z_loss(ws, bytes, z); }, Errc::kInvalidArgument,
               "gpu::z_loss: args.dlogits overlaps args.logits");
  z.dlogits = {fake<float>(5), T, 8};
  z.loss = reinterpret_cast<double*>(fake<char>(100) + 8);  // inside the temp storage
  expect_error([&] { (void)gpu::z_loss(ws, bytes, z); }, Errc::kInvalidArgument,
               "gpu::z_loss: args.loss overlaps d_temp_storage");
}

TEST(GpuOverlap, DistillationExitsAndAdaptersRefuseAliasedOutputs) {
  const index_t n = 8, c = 4;
  gpu::DistillationArgs<float> kd{{2.0f, 0.5f},           {fake<float>(1), n, c},
                                  {fake<float>(2), n, c}, {fake<std::int32_t>(3), n},
                                  {fake<float>(2), n, c}, fake<moekit::DistillationLoss>(4)};
  std::size_t bytes = kBytes;
  expect_error([&] { (void)gpu::distillation_loss(fake<void>(5), bytes, kd); },
               Errc::kInvalidArgument,
               "gpu::distillation_loss: args.dstudent overlaps args.teacher");

  // gather_rows moves rows in parallel: dst must not overlap src.
  expect_error(
      [&] {
        (void)gpu::gather_rows<float>({fake<float>(1), n, c}, {fake<index_t>(2), n - 1},
                                      fake<index_t>(3), {fake<float>(1) + c, n - 1, c});
      },
      Errc::kInvalidArgument, "gpu::gather_rows: dst overlaps src");
  const std::array<moekit::MatrixView<const float>, 2> z = {
      moekit::MatrixView<const float>(fake<float>(1), n, c),
      moekit::MatrixView<const float>(fake<float>(2), n, c)};
  const std::array<moekit::MatrixView<float>, 2> dz = {
      moekit::MatrixView<float>(fake<float>(6), n, c),
      moekit::MatrixView<float>(fake<float>(2), n, c)};
  gpu::MultiExitLossArgs<float> me{z, {fake<std::int32_t>(3), n}, {}, dz, {}, fake<double>(7)};
  expect_error([&] { (void)gpu::multi_exit_loss(fake<void>(5), bytes, me); },
               Errc::kInvalidArgument, "gpu::multi_exit_loss: dlogits[1] overlaps logits[1]");

  using L = moekit::LoraSpec<4>;
  const gpu::LoraLinear<L, float> lora({.d_in = 16, .d_out = 16});
  const gpu::LoraWeights<float> w{
      {fake<float>(10), 16, 16}, {}, {fake<float>(11), 4, 16}, {fake<float>(12), 16, 4}};
  auto* handle = reinterpret_cast<cublasHandle_t>(fake<char>(13));
  expect_error(
      [&] {
        lora.forward(handle, {fake<float>(1), n, 16}, w, {fake<float>(1), n, 16}, {}, {},
                     fake<void>(14), kBytes);
      },
      Errc::kInvalidArgument, "gpu::LoraLinear::forward: y overlaps x");
}

}  // namespace
