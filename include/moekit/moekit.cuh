#pragma once
// Umbrella header for moekit's CUDA backend (namespace moekit::gpu). It
// includes no Eigen, so it is safe in any .cu file.

#include "moekit/core/activation.hpp"
#include "moekit/core/classification.hpp"
#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cuda/aux_losses.cuh"
#include "moekit/cuda/device.cuh"
#include "moekit/cuda/dispatch.cuh"
#include "moekit/cuda/distillation.cuh"
#include "moekit/cuda/early_exit.cuh"
#include "moekit/cuda/error.cuh"
#include "moekit/cuda/expert_ffn.cuh"
#include "moekit/cuda/lora.cuh"
#include "moekit/cuda/router.cuh"
#include "moekit/cuda/task_heads.cuh"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"
