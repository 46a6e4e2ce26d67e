// 06_heads_and_exits: task heads on a shared encoder's features, trained with
// uncertainty-weighted per-task losses; a knowledge-distillation loss; early
// exit with results kept in the batch's original order. docs/heads_and_exits.md
// is cut from this file.
#include <moekit/moekit.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using moekit::index_t;

std::vector<float> random_vector(std::mt19937& rng, std::size_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

}  // namespace

int main() {
  std::mt19937 rng(6);

  // [heads]
  // Three task branches on 32-wide features: 10, 4 and 7 classes. Weights of
  // all heads are one (21 x 32) block, head h at rows class_offset(h).
  using Heads = moekit::HeadSpec<3>;
  constexpr index_t n = 240, d = 32;
  const moekit::cpu::TaskHeads<Heads> heads({.d_model = d, .classes = {10, 4, 7}});
  const index_t rows = heads.total_classes(), width = heads.max_classes();

  // A multi-task batch: each sample has a task id; task 2 is absent from it.
  std::vector<float> x = random_vector(rng, n * d, 1.0f);
  std::vector<std::int32_t> tasks(n), labels(n);
  const std::vector<float> teacher_w = random_vector(rng, rows * d, 1.0f);  // makes the labels
  for (index_t i = 0; i < n; ++i) {
    tasks[i] = static_cast<std::int32_t>((i * 7) % 2);
    const index_t first = heads.class_offset(tasks[i]);
    int best = 0;
    float best_score = -1e30f;
    for (int c = 0; c < heads.classes(tasks[i]); ++c) {
      float score = 0.0f;
      for (index_t j = 0; j < d; ++j) score += teacher_w[(first + c) * d + j] * x[i * d + j];
      if (score > best_score) {
        best_score = score;
        best = c;
      }
    }
    labels[i] = best;
  }
  // [heads]

  // [train]
  std::vector<float> w = random_vector(rng, rows * d, 0.01f), b(rows, 0.0f);
  std::vector<float> log_vars(3, 0.0f), dlog_vars(3);  // uncertainty weighting: learned s_h
  std::vector<float> logits(n * width), dlogits(n * width), dw(rows * d), db(rows);
  std::vector<std::byte> workspace(heads.workspace_size(n));
  const moekit::VectorView<std::byte> ws(workspace.data(), static_cast<index_t>(workspace.size()));
  const moekit::VectorView<const std::int32_t> task_ids(tasks.data(), n), y(labels.data(), n);

  for (int step = 0; step <= 200; ++step) {
    const moekit::cpu::HeadWeights params{{w.data(), rows, d}, {b.data(), rows}};
    heads.forward({x.data(), n, d}, task_ids, params, {logits.data(), n, width}, ws);
    const moekit::cpu::TaskLosses<Heads> l = heads.loss(
        {logits.data(), n, width}, task_ids, y,
        {.kind = moekit::cpu::TaskWeighting::kUncertainty, .log_vars = {log_vars.data(), 3}},
        {dlogits.data(), n, width}, {dlog_vars.data(), 3});
    // The features are frozen here (an empty dx): only dW and db are computed.
    heads.backward({dlogits.data(), n, width}, {x.data(), n, d}, task_ids, params, {},
                   {{dw.data(), rows, d}, {db.data(), rows}}, ws);
    for (index_t i = 0; i < rows * d; ++i) w[i] -= 0.5f * dw[i];
    for (index_t i = 0; i < rows; ++i) b[i] -= 0.5f * db[i];
    for (int h = 0; h < 3; ++h) log_vars[h] -= 0.05f * dlog_vars[h];
    if (step % 100 == 0) {
      std::printf("step %3d: loss %.4f |", step, l.total);
      for (int h = 0; h < 3; ++h) {
        std::printf(" task %d: %3td samples, CE %.3f, accuracy %.2f |", h, l.count[h], l.loss[h],
                    l.accuracy[h]);
      }
      std::printf("\n");
    }
  }
  // [train]

  // [distill]
  // A student's logits for task 0's samples, distilled from the trained head
  // (the teacher) at temperature 2; dstudent is dL/dstudent.
  index_t n0 = 0;
  std::vector<float> teacher, student;
  std::vector<std::int32_t> y0;
  for (index_t i = 0; i < n; ++i) {
    if (tasks[i] != 0) continue;
    teacher.insert(teacher.end(), &logits[i * width], &logits[i * width] + 10);
    y0.push_back(labels[i]);
    ++n0;
  }
  student = random_vector(rng, teacher.size(), 1.0f);
  std::vector<float> dstudent(student.size());
  const moekit::cpu::DistillationLoss kd = moekit::cpu::distillation_loss(
      {.temperature = 2.0f, .alpha = 0.7f}, {student.data(), n0, 10}, {teacher.data(), n0, 10},
      {y0.data(), n0}, {dstudent.data(), n0, 10});
  std::printf("distillation: L %.4f = 0.7 * 4 * KL %.4f + 0.3 * CE %.4f\n", kd.loss, kd.kl, kd.ce);
  // [distill]

  // [exits]
  // Three exit classifiers (heads with one task) over a 4-class problem, each
  // sharper than the last. A sample leaves at the first exit whose max
  // probability reaches 0.9, or whose argmax is the same as at the exit before.
  constexpr index_t batch = 12, classes = 4;
  constexpr int kExits = 3;
  const moekit::cpu::TaskHeads<moekit::HeadSpec<1>> exit_head({.d_model = d, .classes = {classes}});
  const moekit::cpu::EarlyExit exits(
      {.criteria = {.min_confidence = 0.9f, .patience = 1}, .num_exits = kExits});
  std::vector<float> acts = random_vector(rng, batch * d, 1.0f);  // the batch's activations
  const std::vector<float> exit_w = random_vector(rng, classes * d, 0.3f), exit_b(classes, 0.0f);

  std::vector<index_t> original(batch), kept(batch);  // state of the live rows
  std::vector<std::int32_t> previous(batch), agree(batch), prediction(batch), exit_taken(batch);
  std::vector<float> confidence(batch), exit_logits(batch * classes);
  const moekit::cpu::ExitState state{
      {original.data(), batch}, {previous.data(), batch}, {agree.data(), batch}};
  const moekit::cpu::ExitResults results{
      {prediction.data(), batch}, {confidence.data(), batch}, {exit_taken.data(), batch}};

  index_t live = exits.begin(batch, state, results);
  for (int e = 0; e < kExits; ++e) {
    // ... layer e would transform the `live` rows of acts here ...
    std::vector<float> w_e(exit_w);
    for (float& v : w_e) v *= static_cast<float>(e + 1);
    exit_head.forward({acts.data(), live, d}, {},
                      {{w_e.data(), classes, d}, {exit_b.data(), classes}},
                      {exit_logits.data(), live, classes}, {});
    const index_t before = live;
    live = exits.step(e, {exit_logits.data(), live, classes}, state, results, {kept.data(), batch});
    // Survivors move up, in order, for the next layer.
    moekit::cpu::compact_rows(moekit::MatrixView<float>(acts.data(), before, d),
                              {kept.data(), live});
    std::printf("exit %d: %td of %td samples leave\n", e, before - live, before);
  }
  for (index_t i = 0; i < batch; ++i) {  // in the batch's original order
    std::printf("sample %2td: class %d, confidence %.2f, exit %d\n", i, prediction[i],
                confidence[i], exit_taken[i]);
  }
  // [exits]
  return 0;
}
