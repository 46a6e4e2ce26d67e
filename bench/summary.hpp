#pragma once
// A console reporter that also keeps every run's time, so a benchmark binary
// can end with a table of ratios between runs of the same invocation (a
// component beside its ceiling), not only raw times.

#include <benchmark/benchmark.h>

#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace moekit_bench {

class RecordingReporter : public benchmark::ConsoleReporter {
 public:
  // Plain text: logs and the closing table are read by scripts and tests.
  // With cpu_time the runs measure the process's CPU time
  // (MeasureProcessCPUTime) and that is what is kept.
  explicit RecordingReporter(bool cpu_time = false)
      : ConsoleReporter(OO_Tabular), cpu_time_(cpu_time) {}

  // Keeps each run's time; with --benchmark_repetitions, the median of the
  // repetitions (reported after them) replaces it: on a shared machine that
  // is steadier than any single repetition.
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      if ((run.run_type == Run::RT_Iteration && run.iterations > 0) || median) {
        std::string name = run.run_name.str();
        // Added by UseRealTime() / MeasureProcessCPUTime().
        for (const std::string suffix : {"/real_time", "/process_time"}) {
          if (name.size() > suffix.size() && name.ends_with(suffix)) {
            name.resize(name.size() - suffix.size());
          }
        }
        seconds_[name] = (cpu_time_ ? run.GetAdjustedCPUTime() : run.GetAdjustedRealTime()) /
                         benchmark::GetTimeUnitMultiplier(run.time_unit);
      }
    }
    ConsoleReporter::ReportRuns(runs);
  }

  // Seconds per iteration of the named run, or a negative number if it did not run.
  double seconds(const std::string& name) const {
    const auto it = seconds_.find(name);
    return it == seconds_.end() ? -1.0 : it->second;
  }

 private:
  bool cpu_time_ = false;
  std::map<std::string, double> seconds_;
};

// Registers a benchmark timed in milliseconds of wall time (the threads'
// work, not one thread's CPU time).
inline void add_wall_ms(const std::string& name, std::function<void(benchmark::State&)> f) {
  benchmark::RegisterBenchmark(name.c_str(), std::move(f))
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

// The same, or with `cpu_time` timed in the process's CPU time (work per
// CPU second, which a machine shared with other jobs distorts less).
inline void add_ms(const std::string& name, std::function<void(benchmark::State&)> f,
                   bool cpu_time) {
  if (!cpu_time) return add_wall_ms(name, std::move(f));
  benchmark::RegisterBenchmark(name.c_str(), std::move(f))
      ->Unit(benchmark::kMillisecond)
      ->MeasureProcessCPUTime();
}

// Whether `flag` is among the arguments; removes it (before
// benchmark::Initialize sees them).
inline bool take_flag(int& argc, char** argv, const std::string& flag) {
  for (int i = 1; i < argc; ++i) {
    if (flag == argv[i]) {
      for (int j = i; j + 1 < argc; ++j) argv[j] = argv[j + 1];
      --argc;
      return true;
    }
  }
  return false;
}

}  // namespace moekit_bench
