// 06_heads_and_exits: task heads on a shared encoder's features, trained with
// uncertainty-weighted per-task losses; a knowledge-distillation loss; early
// exit with results kept in the batch's original order. docs/heads_and_exits.md
// is cut from this file. It checks what it computes against recomputations in
// double and exits with 1 when a result is wrong.
#include <moekit/moekit.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using moekit::index_t;
using moekit::to_size;

// softmax(z / temperature) in double.
std::vector<double> softmax(const float* z, index_t c, double temperature) {
  double m = z[0];
  for (index_t k = 1; k < c; ++k) m = std::max(m, double(z[k]));
  std::vector<double> p(to_size(c));
  double sum = 0;
  for (index_t k = 0; k < c; ++k) sum += p[to_size(k)] = std::exp((z[k] - m) / temperature);
  for (double& v : p) v /= sum;
  return p;
}

std::vector<float> random_vector(std::mt19937& rng, index_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(static_cast<std::size_t>(n));
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
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    tasks[i] = static_cast<std::int32_t>((i * 7) % 2);
    const index_t first = heads.class_offset(tasks[i]);
    const float* xi = x.data() + i * d;
    int best = 0;
    float best_score = -1e30f;
    for (int c = 0; c < heads.classes(tasks[i]); ++c) {
      const float* wc = teacher_w.data() + (first + c) * d;
      float score = 0.0f;
      for (index_t j = 0; j < d; ++j) score += wc[j] * xi[j];
      if (score > best_score) {
        best_score = score;
        best = c;
      }
    }
    labels[i] = best;
  }
  // [heads]

  // [train]
  std::vector<float> w = random_vector(rng, rows * d, 0.01f), b(to_size(rows), 0.0f);
  std::vector<float> log_vars(3, 0.0f), dlog_vars(3);  // uncertainty weighting: learned s_h
  std::vector<float> logits(to_size(n * width)), dlogits(logits.size()), dw(to_size(rows * d)),
      db(b.size());
  std::vector<std::byte> workspace(to_size(heads.workspace_size(n)));
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
    for (std::size_t i = 0; i < w.size(); ++i) w[i] -= 0.5f * dw[i];
    for (std::size_t i = 0; i < b.size(); ++i) b[i] -= 0.5f * db[i];
    for (std::size_t h = 0; h < 3; ++h) log_vars[h] -= 0.05f * dlog_vars[h];
    if (step % 100 == 0) {
      std::printf("step %3d: loss %.4f |", step, l.total);
      for (std::size_t h = 0; h < 3; ++h) {
        std::printf(" task %zu: %3td samples, CE %.3f, accuracy %.2f |", h, l.count[h], l.loss[h],
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
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    if (tasks[i] != 0) continue;
    const float* row = logits.data() + i * to_size(width);
    teacher.insert(teacher.end(), row, row + 10);
    y0.push_back(labels[i]);
    ++n0;
  }
  student = random_vector(rng, n0 * 10, 1.0f);
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
  const std::vector<float> inputs = random_vector(rng, batch * d, 1.0f);  // the batch
  std::vector<float> acts = inputs;  // its activations, compacted as samples leave
  const std::vector<float> exit_w = random_vector(rng, classes * d, 0.3f), exit_b(classes, 0.0f);

  std::vector<index_t> original(batch), kept(batch);  // state of the live rows
  std::vector<std::int32_t> previous(batch), agree(batch), prediction(batch), exit_taken(batch);
  std::vector<float> confidence(batch), exit_logits(batch * classes);
  std::vector<std::byte> exit_ws(to_size(exit_head.workspace_size(batch)));
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
                      {exit_logits.data(), live, classes},
                      {exit_ws.data(), static_cast<index_t>(exit_ws.size())});
    const index_t before = live;
    live = exits.step(e, {exit_logits.data(), live, classes}, state, results, {kept.data(), batch});
    // Survivors move up, in order, for the next layer.
    moekit::cpu::compact_rows(moekit::MatrixView<float>(acts.data(), before, d),
                              {kept.data(), live});
    std::printf("exit %d: %td of %td samples leave\n", e, before - live, before);
  }
  for (std::size_t i = 0; i < prediction.size(); ++i) {  // in the batch's original order
    std::printf("sample %2zu: class %d, confidence %.2f, exit %d\n", i, prediction[i],
                confidence[i], exit_taken[i]);
  }
  // [exits]

  // Checks (CTest runs this example), each recomputed here in double; a
  // failure exits with 1.
  // The trained heads: each task's accuracy, from an argmax of its own
  // head's scores, is what loss() reports, and near 1 (the labels are a
  // linear function of x); task 2 has no samples.
  const moekit::cpu::HeadWeights trained{{w.data(), rows, d}, {b.data(), rows}};
  heads.forward({x.data(), n, d}, task_ids, trained, {logits.data(), n, width}, ws);
  const moekit::cpu::TaskLosses<Heads> final_loss =
      heads.loss({logits.data(), n, width}, task_ids, y);
  std::vector<double> correct(3, 0.0);
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const int task = tasks[i];
    const index_t first = heads.class_offset(task);
    const float* xi = x.data() + i * d;
    int best = 0;
    double best_score = -1e300;
    for (int c = 0; c < heads.classes(task); ++c) {
      const float* wc = w.data() + (first + c) * d;
      double score = b[to_size(first + c)];
      for (index_t j = 0; j < d; ++j) score += double(wc[j]) * xi[j];
      if (score > best_score) best_score = score, best = c;
    }
    correct[to_size(task)] += best == labels[i] ? 1.0 : 0.0;
  }
  for (std::size_t h = 0; h < 2; ++h) {
    const double accuracy = correct[h] / static_cast<double>(final_loss.count[h]);
    if (accuracy != final_loss.accuracy[h] || accuracy < 0.95) {
      std::printf("task %zu: accuracy %.3f, loss() says %.3f\n", h, accuracy,
                  final_loss.accuracy[h]);
      return 1;
    }
  }
  if (final_loss.count[2] != 0 || correct[2] != 0.0) return 1;

  // Distillation: L = a T^2 mean KL(p || q) + (1 - a) mean CE(y, softmax(s)).
  double kl = 0, ce = 0, grad_num = 0, grad_den = 0;
  for (std::size_t i = 0; i < y0.size(); ++i) {
    const std::vector<double> p = softmax(teacher.data() + i * 10, 10, 2.0),
                              q = softmax(student.data() + i * 10, 10, 2.0),
                              r = softmax(student.data() + i * 10, 10, 1.0);
    const std::size_t label = to_size(y0[i]);
    for (std::size_t c = 0; c < 10; ++c) {
      kl += p[c] * (std::log(p[c]) - std::log(q[c])) / static_cast<double>(n0);
      const double grad = (0.7 * 2.0 * (q[c] - p[c]) + 0.3 * (r[c] - (c == label ? 1.0 : 0.0))) /
                          static_cast<double>(n0);
      const double got = dstudent[i * 10 + c];
      grad_num += (got - grad) * (got - grad);
      grad_den += grad * grad;
    }
    ce -= std::log(r[label]) / static_cast<double>(n0);
  }
  const double loss = 0.7 * 4.0 * kl + 0.3 * ce;
  if (std::abs(kd.loss - loss) > 1e-5 * loss || std::sqrt(grad_num / grad_den) > 1e-5) {
    std::printf("distillation: L %.6f, recomputed %.6f\n", kd.loss, loss);
    return 1;
  }

  // Early exit: each sample run through the three exits on its own, leaving
  // where the rules say; a probability within 1e-4 of the 0.9 threshold is
  // too close to call in float and is not compared.
  for (std::size_t i = 0; i < prediction.size(); ++i) {
    const float* xi = inputs.data() + i * d;
    int previous_cls = -1, exit_at = kExits - 1, cls = -1;
    double conf = 0.0;
    bool clear = true;
    for (int e = 0; e < kExits; ++e) {
      std::vector<float> z(to_size(classes));
      for (index_t c = 0; c < classes; ++c) {
        double s = 0;
        for (index_t j = 0; j < d; ++j) s += double(exit_w[to_size(c * d + j)]) * (e + 1) * xi[j];
        z[to_size(c)] = static_cast<float>(s);
      }
      const std::vector<double> prob = softmax(z.data(), classes, 1.0);
      cls = static_cast<int>(std::max_element(prob.begin(), prob.end()) - prob.begin());
      conf = prob[to_size(cls)];
      clear = clear && std::abs(conf - 0.9) > 1e-4;
      if (conf >= 0.9 || cls == previous_cls) {
        exit_at = e;
        break;
      }
      previous_cls = cls;
    }
    if (clear && (exit_taken[i] != exit_at || prediction[i] != cls ||
                  std::abs(confidence[i] - conf) > 1e-5)) {
      std::printf("sample %zu: exit %d class %d, recomputed exit %d class %d\n", i, exit_taken[i],
                  prediction[i], exit_at, cls);
      return 1;
    }
  }
  std::printf("checked: head accuracies, the distillation loss and gradient, every exit\n");
  return 0;
}
