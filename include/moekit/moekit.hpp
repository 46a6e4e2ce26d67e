#pragma once
// Umbrella header for moekit's portable and CPU parts. CUDA users include
// moekit/moekit.cuh in addition.
//
// What it includes depends on what the target links (docs/getting_started.md):
//   moekit::moekit  (Eigen)                 core/, cpu/, nn/, text/, spec, version
//   moekit::io      (+ nlohmann_json)       all of the above, plus io/ (safetensors
//                                           weights, checkpoints) and train/ (AdamW,
//                                           data, metrics, the trainer)
// moekit::io defines MOEKIT_WITH_IO for its users; without CMake, define it
// yourself where nlohmann/json.hpp is on the include path. io/ and train/
// headers can also be included one by one (each needs nlohmann_json).

#include "moekit/core/activation.hpp"
#include "moekit/core/classification.hpp"
#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/lora.hpp"
#include "moekit/core/random.hpp"
#include "moekit/core/routing.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/aux_losses.hpp"
#include "moekit/cpu/dispatch.hpp"
#include "moekit/cpu/distillation.hpp"
#include "moekit/cpu/early_exit.hpp"
#include "moekit/cpu/eigen.hpp"
#include "moekit/cpu/expert_ffn.hpp"
#include "moekit/cpu/expert_lora.hpp"
#include "moekit/cpu/lora.hpp"
#include "moekit/cpu/memory_kernels.hpp"
#include "moekit/cpu/router.hpp"
#include "moekit/cpu/task_heads.hpp"
#include "moekit/nn/bert_encoder.hpp"
#include "moekit/nn/mlp_encoder.hpp"
#include "moekit/nn/moe_layer.hpp"
#include "moekit/nn/multitask_model.hpp"
#include "moekit/nn/param_count.hpp"
#include "moekit/nn/session_memory.hpp"
#include "moekit/spec.hpp"
#include "moekit/text/wordpiece.hpp"
#include "moekit/version.hpp"

#if defined(MOEKIT_WITH_IO)
#include "moekit/io/atomic_write.hpp"
#include "moekit/io/bert.hpp"
#include "moekit/io/checksum.hpp"
#include "moekit/io/safetensors.hpp"
#include "moekit/io/weights.hpp"
#include "moekit/train/data.hpp"
#include "moekit/train/metrics.hpp"
#include "moekit/train/optimizer.hpp"
#include "moekit/train/quality.hpp"
#include "moekit/train/trainer.hpp"
#endif
