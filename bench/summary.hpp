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
  RecordingReporter() : ConsoleReporter(OO_Tabular) {}

  // Keeps each run's time; with --benchmark_repetitions, the median of the
  // repetitions (reported after them) replaces it: on a shared machine that
  // is steadier than any single repetition.
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      if ((run.run_type == Run::RT_Iteration && run.iterations > 0) || median) {
        std::string name = run.run_name.str();
        const std::string suffix = "/real_time";  // added by UseRealTime()
        if (name.size() > suffix.size() && name.ends_with(suffix)) {
          name.resize(name.size() - suffix.size());
        }
        seconds_[name] =
            run.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(run.time_unit);
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
  std::map<std::string, double> seconds_;
};

// Registers a benchmark timed in milliseconds of wall time (the threads'
// work, not one thread's CPU time).
inline void add_wall_ms(const std::string& name, std::function<void(benchmark::State&)> f) {
  benchmark::RegisterBenchmark(name.c_str(), std::move(f))
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

}  // namespace moekit_bench
