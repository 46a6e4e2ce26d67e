#pragma once
// AdamW with parameter groups, global gradient-norm clipping, checkpointable
// state, and a warm-up + cosine learning-rate schedule (host only).
//
// Update (decoupled weight decay, Loshchilov & Hutter 2019; the update of
// torch.optim.AdamW, bias correction on). A step increments t, then for every
// registered tensor of group g, with lr = g.lr * lr_scale and wd =
// g.weight_decay, element by element:
//   w <- w (1 - lr wd)
//   m <- b1 m + (1 - b1) grad              (computed as m + (1 - b1)(grad - m))
//   v <- b2 v + (1 - b2) grad^2
//   w <- w - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),   bc1 = 1 - b1^t, bc2 = 1 - b2^t
// i.e. w -= lr m_hat / (sqrt(v_hat) + eps) with m_hat = m / bc1, v_hat = v /
// bc2. A parameter with a zero gradient still decays; moments start at zero.
// The per-step scalars (1 - lr wd, lr / bc1, sqrt(bc2), 1 - b1, 1 - b2) are
// computed in double once per step and rounded to float; the element loop runs
// in float in the operation order of PyTorch's single-tensor AdamW. Float is
// enough there: w, m and v are stored as float, so each step's error is
// already bounded by their rounding (about 2^-24 relative), and the update
// itself is ~lr relative to w, so its own few float roundings move w by far
// less than an ulp. Double would only halve the SIMD width of the sqrt and the
// division. Betas are used as the float values given (0.9f, not 0.9), in the
// moment updates and in the bias corrections alike, so a constant gradient
// gives m_hat = grad exactly in exact arithmetic.
//
// Parameters. The optimizer never owns parameter or gradient memory: add()
// registers a flat view of a tensor's values and a same-size view of its
// gradient, which must stay valid (and not move) while the optimizer is used.
// add() allocates the tensor's moments m and v (zeros) once; step(),
// grad_norm() and clip_grad_norm() allocate nothing (grad_norm on more than
// cpu::kLightParallelGrain elements allocates one double per 64 Ki elements).
// Registered views must not overlap one another. An empty tensor is allowed;
// it takes part in save/load (as a [0] tensor) and nothing else.
//
// Gradient norm. grad_norm() = sqrt(sum over every registered gradient
// element of grad^2), squares summed in double: each chunk of at most
// kNormChunk elements of one tensor is summed in element order, and the chunk
// sums in registration order, so the value does not depend on the thread
// count. A tensor registered with a segment (add()'s last argument, e.g. the
// size of one expert in a stack of experts) has no chunk that crosses a
// multiple of the segment, so the chunk sums of a stack's experts are the
// same whether one process holds them all or expert-parallel ranks hold
// some each; grad_norm_partials() gives the chunk sums themselves. clip_grad_norm(max_norm) returns
// that norm and, when it exceeds max_norm, scales every gradient by max_norm / (norm + 1e-6)
// (PyTorch's clip_grad_norm_ coefficient; PyTorch also scales when max_norm - 1e-6 < norm <=
// max_norm, by a factor within 1e-6 / max_norm of 1, which this one skips). A non-finite norm (a
// NaN or Inf gradient, or an overflowing sum) changes nothing and is returned as is: the caller
// should then skip the step (step() itself does not inspect gradients; a NaN gradient gives NaN
// parameters).
//
// Checkpoints. save_state(out, prefix) adds to a SafetensorsWriter, for
// every registered tensor `name`, F32 tensors of shape [n]
//   <prefix><name>.exp_avg       m
//   <prefix><name>.exp_avg_sq    v
// and the metadata key "<prefix>step" = t as a decimal string. The writer
// keeps views of the optimizer's moments: do not step, load or destroy the
// optimizer before out.write() / out.to_bytes(). Group settings (lr, weight
// decay) are configuration, not state: the caller rebuilds the groups and
// re-registers the same tensors (same names and sizes) before load_state,
// which restores m, v and t exactly. With the same parameter values loaded
// too, the continued run is bit-identical to an uninterrupted one (the
// schedule below is a pure function of the step, so it needs no state).
// load_state checks everything first (the metadata present and a
// non-negative integer, every tensor present, of a float dtype and of shape
// [n]; tensors of other names are ignored), so a rejected load changes
// nothing. F16 / BF16 files are accepted and converted exactly, but only F32
// round-trips the state bit for bit.
//
// Errors (moekit::Error; every check runs before anything is changed):
//   kInvalidArgument  betas outside [0, 1), eps not finite and > 0; lr or
//                     weight decay negative or not finite; a group name empty
//                     or used twice; a parameter name empty or used twice;
//                     overlapping views; lr_scale negative or not finite;
//                     max_norm not > 0 (NaN included); a bad schedule
//   kOutOfRange       a group index outside [0, num_groups())
//   kShapeMismatch    value and grad of different sizes; a state tensor whose
//                     shape is not [n]
//   kNullPointer      a view with elements and no data
//   kFormatError      a state tensor or the step metadata missing, or the step
//                     not a non-negative decimal integer
//   kUnsupported      a state tensor in a dtype other than F32, F16, BF16
//   (and whatever SafetensorsWriter::add reports, e.g. a name used twice).
//
// Threading and determinism. Each tensor's element loop is an OpenMP
// parallel loop when it has more than cpu::kLightParallelGrain elements
// (moekit/cpu/parallel.hpp); elements are independent, so results are
// bit-identical whatever the thread count, and also without OpenMP. An AdamW
// object is not safe to use from two threads at once.
//
//   moekit::train::AdamW opt({.beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f});
//   const int heads = opt.add_group({.name = "heads", .lr = 1e-3f, .weight_decay = 0.01f});
//   opt.add(heads, "head.weight", {w.data(), n}, {dw.data(), n});
//   const moekit::train::WarmupCosine schedule{.warmup_steps = 500, .total_steps = 20000};
//   for (std::int64_t s = 0; s < 20000; ++s) {
//     compute_gradients();
//     if (std::isfinite(opt.clip_grad_norm(1.0))) opt.step(schedule(s));
//   }

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <numbers>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "moekit/core/config.hpp"
#include "moekit/core/error.hpp"
#include "moekit/core/types.hpp"
#include "moekit/core/view.hpp"
#include "moekit/cpu/parallel.hpp"
#include "moekit/io/safetensors.hpp"

MOEKIT_NAMESPACE_BEGIN
namespace train {

// Elements of one tensor summed serially into one partial sum of grad_norm().
inline constexpr index_t kNormChunk = index_t{1} << 16;

// AdamW's hyperparameters shared by every group (learning rates and weight
// decay are per group: ParamGroupConfig).
struct AdamWConfig {
  float beta1 = 0.9f;    // in [0, 1)
  float beta2 = 0.999f;  // decay of the second moment v, in [0, 1)
  float eps = 1e-8f;     // finite, > 0
};

// A set of tensors sharing a learning rate and weight decay (e.g. one
// component of the model).
struct ParamGroupConfig {
  std::string name;           // non-empty, unique within the optimizer
  float lr = 0.0f;            // base learning rate, finite, >= 0
  float weight_decay = 0.0f;  // decoupled decay coefficient, finite, >= 0
};

// AdamW over registered tensors in named groups (the update at the top of
// this file); the moments are owned, values and gradients are the caller's.
class AdamW {
 public:
  // Checks `config` (kInvalidArgument naming the field); no groups yet.
  explicit AdamW(const AdamWConfig& config = {}) : config_(config) {
    MOEKIT_API("train::AdamW::AdamW");
    MOEKIT_CHECK_ARG(config.beta1 >= 0.0f && config.beta1 < 1.0f, "config.beta1 = ", config.beta1,
                     " must lie in [0, 1)");
    MOEKIT_CHECK_ARG(config.beta2 >= 0.0f && config.beta2 < 1.0f, "config.beta2 = ", config.beta2,
                     " must lie in [0, 1)");
    MOEKIT_CHECK_ARG(std::isfinite(config.eps) && config.eps > 0.0f, "config.eps = ", config.eps,
                     " must be finite and > 0");
  }

  // The config given at construction.
  const AdamWConfig& config() const { return config_; }

  // ---- groups ---------------------------------------------------------------------------------

  // Adds a parameter group; returns its index (0, 1, ...).
  int add_group(const ParamGroupConfig& group) {
    MOEKIT_API("train::AdamW::add_group");
    MOEKIT_CHECK_ARG(!group.name.empty(), "group.name is empty");
    for (std::size_t i = 0; i < groups_.size(); ++i) {
      MOEKIT_CHECK_ARG(groups_[i].name != group.name, "group.name = '", group.name,
                       "' is already the name of group ", i);
    }
    check_lr(group.lr, "group.lr");
    MOEKIT_CHECK_ARG(std::isfinite(group.weight_decay) && group.weight_decay >= 0.0f,
                     "group.weight_decay = ", group.weight_decay, " (group '", group.name,
                     "') must be finite and >= 0");
    MOEKIT_CHECK_ARG(groups_.size() < static_cast<std::size_t>(std::numeric_limits<int>::max()),
                     "too many groups");
    groups_.push_back(group);
    return static_cast<int>(groups_.size() - 1);
  }

  // Groups added so far.
  int num_groups() const { return static_cast<int>(groups_.size()); }

  // Group `index` in [0, num_groups()) as it is now (its lr after set_lr).
  const ParamGroupConfig& group(int index) const {
    MOEKIT_API("train::AdamW::group");
    MOEKIT_CHECK_RANGE(index, 0, num_groups());
    return groups_[static_cast<std::size_t>(index)];
  }

  // Sets the base learning rate of group `index` (from the next step on).
  void set_lr(int index, float lr) {
    MOEKIT_API("train::AdamW::set_lr");
    MOEKIT_CHECK_RANGE(index, 0, num_groups());
    check_lr(lr, "lr");
    groups_[static_cast<std::size_t>(index)].lr = lr;
  }

  // ---- parameters -----------------------------------------------------------------------------

  // Registers one tensor of group `group`: its values and its gradient (same
  // size; neither owned, see the top of this file), and the segment its norm
  // chunks never cross (0: none). Allocates its moments.
  void add(int group, std::string name, VectorView<float> value, VectorView<float> grad,
           index_t segment = 0) {
    MOEKIT_API("train::AdamW::add");
    MOEKIT_CHECK_RANGE(group, 0, num_groups());
    MOEKIT_CHECK_ARG(!name.empty(), "parameter name is empty");
    MOEKIT_CHECK_ARG(segment >= 0, "segment = ", segment, " is negative");
    MOEKIT_CHECK_ARG(index_.find(name) == index_.end(), "parameter '", name, "' was already added");
    check_view(value, "value");
    check_view(grad, "grad");
    MOEKIT_CHECK(value.size() == grad.size(), Errc::kShapeMismatch, "parameter '", name,
                 "': value has ", value.size(), " elements but grad has ", grad.size());
    MOEKIT_CHECK_ARG(!overlap(value, grad), "parameter '", name,
                     "': value and grad overlap in memory");
    for (const Param& p : params_) {
      MOEKIT_CHECK_ARG(!overlap(value, p.value) && !overlap(value, p.grad) &&
                           !overlap(grad, p.value) && !overlap(grad, p.grad),
                       "parameter '", name, "' overlaps parameter '", p.name, "' in memory");
    }
    Param p;
    p.name = std::move(name);
    p.group = group;
    p.value = value;
    p.grad = grad;
    p.m.assign(static_cast<std::size_t>(value.size()), 0.0f);
    p.v.assign(static_cast<std::size_t>(value.size()), 0.0f);
    // Allocate first; the map insertion is the only later step that can
    // throw, and it comes before any member changes.
    const index_t seg = segment > 0 ? segment : std::max<index_t>(value.size(), 1);
    params_.reserve(params_.size() + 1);
    chunks_.reserve(chunks_.size() + static_cast<std::size_t>(norm_chunks(value.size(), segment)));
    index_.emplace(p.name, params_.size());
    for (index_t s0 = 0; s0 < value.size(); s0 += seg) {
      const index_t s1 = std::min(value.size(), s0 + seg);
      for (index_t b = s0; b < s1; b += kNormChunk) {
        chunks_.push_back({params_.size(), b, std::min(s1, b + kNormChunk)});
      }
    }
    params_.push_back(std::move(p));
    total_ += value.size();
  }

  // Registered tensors, and their elements in total.
  index_t num_tensors() const { return static_cast<index_t>(params_.size()); }
  // Elements of all registered tensors together.
  index_t num_params() const { return total_; }

  // Steps taken (t), including those restored by load_state.
  std::int64_t steps() const { return step_; }

  // The moments of tensor `name` (kInvalidArgument if none is registered).
  VectorView<const float> exp_avg(std::string_view name) const {
    MOEKIT_API("train::AdamW::exp_avg");
    const Param& p = find(name);
    return {p.m.data(), static_cast<index_t>(p.m.size())};
  }
  // The second moment v of tensor `name` (kInvalidArgument if none is registered).
  VectorView<const float> exp_avg_sq(std::string_view name) const {
    MOEKIT_API("train::AdamW::exp_avg_sq");
    const Param& p = find(name);
    return {p.v.data(), static_cast<index_t>(p.v.size())};
  }

  // Sets every registered gradient to zero.
  void zero_grad() {
    for (const Param& p : params_) {
      for (float& g : p.grad) g = 0.0f;
    }
  }

  // ---- update ---------------------------------------------------------------------------------

  // One AdamW step with every group's lr multiplied by lr_scale (a schedule's
  // value; see the top of this file).
  void step(float lr_scale = 1.0f) {
    MOEKIT_API("train::AdamW::step");
    MOEKIT_CHECK_ARG(std::isfinite(lr_scale) && lr_scale >= 0.0f, "lr_scale = ", lr_scale,
                     " must be finite and >= 0");
    ++step_;
    const double b1 = config_.beta1, b2 = config_.beta2;
    const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step_));
    const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step_));
    const auto one_minus_b1 = static_cast<float>(1.0 - b1);
    const auto one_minus_b2 = static_cast<float>(1.0 - b2);
    const float beta2 = config_.beta2;
    const auto sqrt_bc2 = static_cast<float>(std::sqrt(bc2));
    const float eps = config_.eps;
    for (Param& p : params_) {
      const ParamGroupConfig& g = groups_[static_cast<std::size_t>(p.group)];
      const double lr = static_cast<double>(g.lr) * static_cast<double>(lr_scale);
      const auto decay = static_cast<float>(1.0 - lr * static_cast<double>(g.weight_decay));
      const auto step_size = static_cast<float>(lr / bc1);
      float* const w = p.value.data();
      const float* const grad = p.grad.data();
      float* const m = p.m.data();
      float* const v = p.v.data();
      const index_t n = p.value.size();
      MOEKIT_PARALLEL_FOR_IF(n > cpu::kLightParallelGrain)
      for (index_t i = 0; i < n; ++i) {
        const float gi = grad[i];
        const float mi = m[i] + one_minus_b1 * (gi - m[i]);
        const float vi = v[i] * beta2 + one_minus_b2 * gi * gi;
        const float denom = std::sqrt(vi) / sqrt_bc2 + eps;
        m[i] = mi;
        v[i] = vi;
        w[i] = w[i] * decay - step_size * (mi / denom);
      }
    }
  }

  // ---- gradient norm --------------------------------------------------------------------------

  // Chunks of a tensor of n elements registered with `segment` (the rule above).
  static index_t norm_chunks(index_t n, index_t segment) {
    if (n == 0) return 0;
    const index_t seg = segment > 0 ? std::min(segment, n) : n;
    const index_t per_segment = (seg + kNormChunk - 1) / kNormChunk;
    const index_t full = n / seg, rest = n % seg;
    return full * per_segment + (rest + kNormChunk - 1) / kNormChunk;
  }
  // The norm chunks of every registered tensor (grad_norm_partials()'s size).
  index_t num_norm_chunks() const { return static_cast<index_t>(chunks_.size()); }

  // out[c] = the sum of grad^2 over chunk c (in registration order), each in
  // element order: the partial sums grad_norm() adds up in this order.
  void grad_norm_partials(std::span<double> out) const {
    MOEKIT_API("train::AdamW::grad_norm_partials");
    MOEKIT_CHECK(out.size() == chunks_.size(), Errc::kShapeMismatch, "out has ", out.size(),
                 " entries, the optimizer has ", chunks_.size(), " norm chunks");
    const auto chunks = static_cast<index_t>(chunks_.size());
    MOEKIT_PARALLEL_FOR_IF(total_ > cpu::kLightParallelGrain)
    for (index_t c = 0; c < chunks; ++c) {
      out[static_cast<std::size_t>(c)] = chunk_sum(chunks_[static_cast<std::size_t>(c)]);
    }
  }

  // The global L2 norm of every registered gradient (deterministic order).
  double grad_norm() const {
    double sum = 0.0;
    if (total_ > cpu::kLightParallelGrain) {
      std::vector<double> partial(chunks_.size());
      grad_norm_partials(partial);
      for (const double s : partial) sum += s;
    } else {
      for (const Chunk& c : chunks_) sum += chunk_sum(c);
    }
    return std::sqrt(sum);
  }

  // Returns grad_norm() and, when it is finite and > max_norm, scales every
  // gradient by max_norm / (norm + 1e-6). A non-finite norm changes nothing.
  double clip_grad_norm(double max_norm) {
    MOEKIT_API("train::AdamW::clip_grad_norm");
    MOEKIT_CHECK_ARG(max_norm > 0.0, "max_norm = ", max_norm, " must be > 0");
    const double norm = grad_norm();
    clip_to(norm, max_norm);
    return norm;
  }

  // The scaling of clip_grad_norm for a norm computed elsewhere (the norm of
  // gradients spread over expert-parallel ranks).
  void clip_to(double norm, double max_norm) {
    MOEKIT_API("train::AdamW::clip_to");
    MOEKIT_CHECK_ARG(max_norm > 0.0, "max_norm = ", max_norm, " must be > 0");
    if (!std::isfinite(norm) || !(norm > max_norm)) return;
    const auto coef = static_cast<float>(max_norm / (norm + 1e-6));
    for (const Param& p : params_) {
      float* const g = p.grad.data();
      const index_t n = p.grad.size();
      MOEKIT_PARALLEL_FOR_IF(n > cpu::kLightParallelGrain)
      for (index_t i = 0; i < n; ++i) g[i] *= coef;
    }
  }

  // ---- checkpoints ----------------------------------------------------------------------------

  // Adds the state to `out` (names and format at the top of this file); all
  // tensors or, on a rejected one, none. `out` keeps views of the moments.
  void save_state(io::SafetensorsWriter& out, std::string_view prefix) const {
    MOEKIT_API("train::AdamW::save_state");
    std::vector<io::TensorSource> tensors;
    tensors.reserve(2 * params_.size());
    for (const Param& p : params_) {
      const auto n = static_cast<index_t>(p.m.size());
      tensors.push_back({m_name(prefix, p.name), io::Shape{n}, flat<const float>(p.m.data(), n)});
      tensors.push_back({v_name(prefix, p.name), io::Shape{n}, flat<const float>(p.v.data(), n)});
    }
    out.add(tensors, io::Dtype::kF32);
    out.set_metadata(step_key(prefix), std::to_string(step_));
  }

  // Restores m, v and t from `in` (saved by save_state with the same prefix,
  // for the same registered tensors); checks everything before it changes
  // anything.
  void load_state(const io::SafetensorsReader& in, std::string_view prefix) {
    MOEKIT_API("train::AdamW::load_state");
    const std::string key = step_key(prefix);
    const auto it = in.metadata().find(key);
    MOEKIT_CHECK(it != in.metadata().end(), Errc::kFormatError, "'", in.source(),
                 "' has no metadata key '", key, "' (the optimizer step)");
    const std::string& text = it->second;
    std::int64_t t = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), t);
    MOEKIT_CHECK(!text.empty() && ec == std::errc() && end == text.data() + text.size() && t >= 0,
                 Errc::kFormatError, "metadata '", key, "' = '", text, "' of '", in.source(),
                 "' is not a non-negative decimal integer");
    std::vector<io::TensorTarget> targets;
    targets.reserve(2 * params_.size());
    for (Param& p : params_) {
      const auto n = static_cast<index_t>(p.m.size());
      targets.push_back({m_name(prefix, p.name), io::Shape{n}, flat<float>(p.m.data(), n)});
      targets.push_back({v_name(prefix, p.name), io::Shape{n}, flat<float>(p.v.data(), n)});
    }
    in.load(targets);  // checks every target before it copies any
    step_ = t;
  }

 private:
  struct Param {
    std::string name;
    int group = 0;
    VectorView<float> value{};
    VectorView<float> grad{};
    std::vector<float> m;
    std::vector<float> v;
  };

  // Elements [begin, end) of params[param]'s gradient: one partial sum of grad_norm.
  struct Chunk {
    std::size_t param = 0;
    index_t begin = 0;
    index_t end = 0;
  };

  double chunk_sum(const Chunk& c) const {
    const float* const g = params_[c.param].grad.data();
    double s = 0.0;
    for (index_t i = c.begin; i < c.end; ++i) {
      const auto x = static_cast<double>(g[i]);
      s += x * x;
    }
    return s;
  }

  static void check_lr(float lr, const char* what) {
    MOEKIT_CHECK_ARG(std::isfinite(lr) && lr >= 0.0f, what, " = ", lr, " must be finite and >= 0");
  }

  // Whether two views share an element (empty views share none): the
  // library's one overlap test (core/view.hpp).
  static bool overlap(VectorView<const float> a, VectorView<const float> b) {
    return ::moekit::overlap(Footprint(a, ""), Footprint(b, ""));
  }

  const Param& find(std::string_view name) const {
    const auto it = index_.find(name);
    MOEKIT_CHECK_ARG(it != index_.end(), "no parameter named '", name, "' is registered");
    return params_[it->second];
  }

  // n elements as the matrix a NamedTensor of shape [n] takes: 1 x n, or
  // 0 x 0 when empty (so no row of a null pointer is ever formed or copied).
  template <class T>
  static MatrixView<T> flat(T* data, index_t n) {
    return n == 0 ? MatrixView<T>() : MatrixView<T>(data, 1, n);
  }

  static std::string m_name(std::string_view prefix, const std::string& name) {
    return std::string(prefix) + name + ".exp_avg";
  }
  static std::string v_name(std::string_view prefix, const std::string& name) {
    return std::string(prefix) + name + ".exp_avg_sq";
  }
  static std::string step_key(std::string_view prefix) { return std::string(prefix) + "step"; }

  AdamWConfig config_;
  std::vector<ParamGroupConfig> groups_;
  std::vector<Param> params_;
  std::vector<Chunk> chunks_;
  std::map<std::string, std::size_t, std::less<>> index_;  // name -> index into params_
  index_t total_ = 0;
  std::int64_t step_ = 0;
};

// ---- learning-rate schedule -------------------------------------------------------------------

// The multiplier of the base learning rate at 0-based step `step`:
//   step < W              (step + 1) / W                           linear warm-up
//   W <= step < T         r + (1 - r) (1 + cos(pi (step - W) / (T - W))) / 2
//   step >= T             r
// with W = warmup_steps, T = total_steps, r = min_ratio: 1 at step W, falling
// to r at step T (continuous there), r after. With W = T there is no decay
// phase: r from step T on. A pure function of the step, so a resumed run
// needs no schedule state. Computed in double, returned as float.
struct WarmupCosine {
  std::int64_t warmup_steps = 0;  // W, in [0, T]
  std::int64_t total_steps = 0;   // T, >= 1
  float min_ratio = 0.0f;         // r, in [0, 1]

  // Rejects a configuration outside the ranges above (kInvalidArgument).
  void validate() const {
    MOEKIT_CHECK_ARG(total_steps >= 1, "total_steps = ", total_steps, " must be at least 1");
    MOEKIT_CHECK_ARG(warmup_steps >= 0 && warmup_steps <= total_steps,
                     "warmup_steps = ", warmup_steps,
                     " must lie in [0, total_steps = ", total_steps, "]");
    MOEKIT_CHECK_ARG(min_ratio >= 0.0f && min_ratio <= 1.0f, "min_ratio = ", min_ratio,
                     " must lie in [0, 1]");
  }

  // The multiplier at `step` >= 0 (validates the configuration first).
  float operator()(std::int64_t step) const {
    validate();
    MOEKIT_CHECK_ARG(step >= 0, "step = ", step, " must be >= 0");
    if (step < warmup_steps) {
      return static_cast<float>(static_cast<double>(step + 1) / static_cast<double>(warmup_steps));
    }
    if (step >= total_steps) return min_ratio;
    const double progress =
        static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
    const double r = min_ratio;
    return static_cast<float>(r + (1.0 - r) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
  }
};

}  // namespace train
MOEKIT_NAMESPACE_END
