#pragma once
// A console reporter that also keeps every run's time, so a benchmark binary
// can end with a table of ratios between runs of the same invocation (a
// component beside its ceiling), not only raw times.

#include <benchmark/benchmark.h>

#include <map>
#include <string>
#include <vector>

namespace moekit_bench {

class RecordingReporter : public benchmark::ConsoleReporter {
 public:
  // Plain text: logs and the closing table are read by scripts and tests.
  RecordingReporter() : ConsoleReporter(OO_Tabular) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.run_type == Run::RT_Iteration && run.iterations > 0) {
        std::string name = run.benchmark_name();
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

}  // namespace moekit_bench
