#pragma once
// Umbrella header for moekit's portable and CPU parts. CUDA users include
// moekit/moekit.cuh in addition.

#include "moekit/core/activation.hpp"
#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/aux_losses.hpp"
#include "moekit/cpu/dispatch.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/expert_ffn.hpp"
#include "moekit/cpu/router.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "moekit/nn/param_count.hpp"
#include "moekit/spec.hpp"
#include "moekit/version.hpp"
