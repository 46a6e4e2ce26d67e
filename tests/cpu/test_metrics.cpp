// Training monitoring (moekit/train/metrics.hpp): the JSON Lines log read back
// with nlohmann-json and read_metrics, the CSV log's header and columns, shape
// checks that write nothing, appending, open errors, progress_line and
// peak_rss_mib.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "expect_error.hpp"
#include "moekit/train/metrics.hpp"

namespace {

namespace fs = std::filesystem;
namespace train = moekit::train;
using moekit::Errc;
using moekit_test::expect_error;
using train::StepRecord;

fs::path temp_path(const std::string& name) {
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("moekit_metrics_" + std::to_string(static_cast<long>(::getpid())));
  fs::create_directories(dir);
  const fs::path p = dir / name;
  fs::remove(p);
  return p;
}

std::vector<std::string> lines_of(const fs::path& p) {
  std::ifstream in(p);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::size_t count_fields(const std::string& csv_line) {
  std::size_t n = 1;
  bool quoted = false;
  for (const char c : csv_line) {
    if (c == '"') quoted = !quoted;
    if (c == ',' && !quoted) ++n;
  }
  return n;
}

StepRecord train_record(std::int64_t step) {
  StepRecord r;
  r.step = step;
  r.lr = 5e-4 * static_cast<double>(step) / 100.0;
  r.loss = 1.25 + 1.0 / static_cast<double>(step + 1);
  r.task_loss = 1.2;
  r.aux_loss = 1.0 + 0.1 / static_cast<double>(step + 1);
  r.grad_norm = 0.7;
  r.accuracy = {0.5, 0.25, 0.125};
  r.expert_load = {{0.25, 0.25, 0.3, 0.2}, {0.5, 0.5}};
  r.tokens_per_s = 12345.5;
  r.peak_rss_mib = 512.25;
  r.elapsed_s = 83.5;
  return r;
}

TEST(MetricsLog, JsonLinesReadBack) {
  const fs::path jsonl = temp_path("log.jsonl");
  StepRecord eval = train_record(20);
  eval.split = "eval";
  eval.expert_load.clear();
  eval.grad_norm = std::numeric_limits<double>::quiet_NaN();
  {
    train::MetricsLog log(jsonl);
    log.write(train_record(10));
    EXPECT_EQ(lines_of(jsonl).size(), 1u);  // flushed at once
    log.write(eval);
    log.write(train_record(30));
    EXPECT_EQ(log.records(), 3);
  }
  const std::vector<std::string> lines = lines_of(jsonl);
  ASSERT_EQ(lines.size(), 3u);
  const nlohmann::json j = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(j.at("split"), "train");
  EXPECT_EQ(j.at("step"), 10);
  EXPECT_DOUBLE_EQ(j.at("lr").get<double>(), 5e-5);
  EXPECT_DOUBLE_EQ(j.at("loss").get<double>(), 1.25 + 1.0 / 11.0);
  EXPECT_DOUBLE_EQ(j.at("task_loss").get<double>(), 1.2);
  EXPECT_DOUBLE_EQ(j.at("aux_loss").get<double>(), 1.0 + 0.1 / 11.0);
  EXPECT_DOUBLE_EQ(j.at("grad_norm").get<double>(), 0.7);
  EXPECT_EQ(j.at("accuracy"), nlohmann::json({0.5, 0.25, 0.125}));
  ASSERT_EQ(j.at("expert_load").size(), 2u);
  EXPECT_EQ(j.at("expert_load")[0], nlohmann::json({0.25, 0.25, 0.3, 0.2}));
  EXPECT_DOUBLE_EQ(j.at("tokens_per_s").get<double>(), 12345.5);
  EXPECT_DOUBLE_EQ(j.at("peak_rss_mib").get<double>(), 512.25);
  EXPECT_DOUBLE_EQ(j.at("elapsed_s").get<double>(), 83.5);
  const nlohmann::json e = nlohmann::json::parse(lines[1]);
  EXPECT_EQ(e.at("split"), "eval");
  EXPECT_TRUE(e.at("grad_norm").is_null());  // NaN
  EXPECT_TRUE(e.at("expert_load").empty());

  // read_metrics gives the records back exactly (NaN as NaN).
  const std::vector<StepRecord> back = train::read_metrics(jsonl);
  ASSERT_EQ(back.size(), 3u);
  const StepRecord want = train_record(30);
  EXPECT_EQ(back[2].step, 30);
  EXPECT_EQ(back[2].loss, want.loss);
  EXPECT_EQ(back[2].lr, want.lr);
  EXPECT_EQ(back[2].accuracy, want.accuracy);
  EXPECT_EQ(back[2].expert_load, want.expert_load);
  EXPECT_EQ(back[1].split, "eval");
  EXPECT_TRUE(std::isnan(back[1].grad_norm));
  EXPECT_TRUE(back[1].expert_load.empty());
}

TEST(MetricsLog, CsvHeaderAndColumns) {
  const fs::path jsonl = temp_path("csv.jsonl"), csv = temp_path("log.csv");
  StepRecord eval = train_record(20);
  eval.split = "eval, held out";  // quoted
  eval.expert_load.clear();
  {
    train::MetricsLog log(jsonl, csv);
    log.write(train_record(10));
    log.write(eval);
    StepRecord partial = train_record(30);
    partial.expert_load[0].clear();  // one layer without statistics
    partial.loss = std::numeric_limits<double>::infinity();
    log.write(partial);
  }
  const std::vector<std::string> lines = lines_of(csv);
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(lines[0],
            "split,step,lr,loss,task_loss,aux_loss,grad_norm,acc_0,acc_1,acc_2,"
            "load_l0_e0,load_l0_e1,load_l0_e2,load_l0_e3,load_l1_e0,load_l1_e1,"
            "tokens_per_s,peak_rss_mib,elapsed_s");
  EXPECT_EQ(lines[0], train::metrics_csv_header(train_record(0)));
  const std::size_t columns = count_fields(lines[0]);
  EXPECT_EQ(columns, 19u);
  for (std::size_t i = 1; i < lines.size(); ++i) EXPECT_EQ(count_fields(lines[i]), columns) << i;
  EXPECT_EQ(lines[1],
            "train,10,5e-05,1.3409090909090908,1.2,1.009090909090909,0.7,0.5,0.25,0.125,"
            "0.25,0.25,0.3,0.2,0.5,0.5,12345.5,512.25,83.5");
  EXPECT_EQ(lines[2].substr(0, 26), "\"eval, held out\",20,1e-04,");
  EXPECT_NE(lines[2].find("0.125,,,,,,,12345.5"), std::string::npos) << lines[2];
  EXPECT_NE(lines[3].find(",inf,"), std::string::npos) << lines[3];
  EXPECT_NE(lines[3].find("0.125,,,,,0.5,0.5,"), std::string::npos) << lines[3];
}

TEST(MetricsLog, MismatchedRecordsWriteNothing) {
  const fs::path jsonl = temp_path("shape.jsonl"), csv = temp_path("shape.csv");
  train::MetricsLog log(jsonl, csv);
  log.write(train_record(1));
  const auto jsonl_size = fs::file_size(jsonl), csv_size = fs::file_size(csv);
  StepRecord more = train_record(2);
  more.accuracy.push_back(0.9);
  std::string msg = expect_error([&] { log.write(more); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("record.accuracy has 4 branches, the CSV log 3"), std::string::npos) << msg;
  more = train_record(2);
  more.expert_load[1].push_back(0.0);
  msg = expect_error([&] { log.write(more); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("record.expert_load[1] has 3 experts, the CSV log 2"), std::string::npos)
      << msg;
  more = train_record(2);
  more.expert_load.pop_back();
  expect_error([&] { log.write(more); }, Errc::kShapeMismatch);
  EXPECT_EQ(fs::file_size(jsonl), jsonl_size);
  EXPECT_EQ(fs::file_size(csv), csv_size);
  EXPECT_EQ(log.records(), 1);
  // Without a CSV any shape goes.
  train::MetricsLog free_log(temp_path("free.jsonl"));
  free_log.write(train_record(1));
  free_log.write(more);
  EXPECT_TRUE(free_log.csv_path().empty());
}

TEST(MetricsLog, AppendContinuesARun) {
  const fs::path jsonl = temp_path("resume.jsonl"), csv = temp_path("resume.csv");
  {
    train::MetricsLog log(jsonl, csv);
    log.write(train_record(1));
  }
  {
    train::MetricsLog log(jsonl, csv, train::MetricsMode::kAppend);
    log.write(train_record(2));
  }
  EXPECT_EQ(lines_of(jsonl).size(), 2u);
  const std::vector<std::string> lines = lines_of(csv);
  ASSERT_EQ(lines.size(), 3u);  // one header
  EXPECT_EQ(lines[2].substr(0, 8), "train,2,");
  EXPECT_EQ(train::read_metrics(jsonl)[1].step, 2);
  // A record of another shape does not fit the existing header.
  train::MetricsLog log(jsonl, csv, train::MetricsMode::kAppend);
  StepRecord other = train_record(3);
  other.accuracy.pop_back();
  const std::string msg = expect_error([&] { log.write(other); }, Errc::kShapeMismatch);
  EXPECT_NE(msg.find("resume.csv' has the header"), std::string::npos) << msg;
  EXPECT_EQ(lines_of(csv).size(), 3u);
  // kTruncate starts over.
  train::MetricsLog fresh(jsonl, csv);
  EXPECT_EQ(fs::file_size(jsonl), 0u);
}

TEST(MetricsLog, OpenAndReadErrors) {
  const fs::path nowhere = temp_path("no_such_dir") / "log.jsonl";
  std::string msg = expect_error([&] { train::MetricsLog log(nowhere); }, Errc::kIoError);
  EXPECT_NE(msg.find("no_such_dir/log.jsonl"), std::string::npos) << msg;
  msg = expect_error(
      [&] { train::MetricsLog log(temp_path("ok.jsonl"), temp_path("no_such_dir") / "log.csv"); },
      Errc::kIoError);
  EXPECT_NE(msg.find("log.csv"), std::string::npos) << msg;
  expect_error([&] { (void)train::read_metrics(nowhere); }, Errc::kIoError);

  const fs::path bad = temp_path("bad.jsonl");
  {
    std::ofstream out(bad);
    out << nlohmann::json(train_record(1)).dump() << "\n\n{\"step\": \"two\"}\n";
  }
  msg = expect_error([&] { (void)train::read_metrics(bad); }, Errc::kFormatError);
  EXPECT_NE(msg.find("bad.jsonl:3:"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"step\""), std::string::npos) << msg;
  {
    std::ofstream out(bad);
    out << "{\"step\": 1}\n{not json\n";
  }
  msg = expect_error([&] { (void)train::read_metrics(bad); }, Errc::kFormatError);
  EXPECT_NE(msg.find("bad.jsonl:2:"), std::string::npos) << msg;
  // Missing fields take their defaults; metadata lines are skipped.
  {
    std::ofstream out(bad);
    out << "{\"chance\": [0.25, 0.5]}\n{\"step\": 7, \"accuracy\": [0.5, null]}\r\n";
  }
  const std::vector<StepRecord> r = train::read_metrics(bad);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].split, "train");
  EXPECT_EQ(r[0].step, 7);
  EXPECT_EQ(r[0].loss, 0.0);
  ASSERT_EQ(r[0].accuracy.size(), 2u);
  EXPECT_TRUE(std::isnan(r[0].accuracy[1]));
}

TEST(Metrics, ProgressLine) {
  StepRecord r = train_record(1200);
  const std::string line = train::progress_line(r, 5000);
  EXPECT_NE(line.find("step 1200/5000"), std::string::npos) << line;
  EXPECT_NE(line.find("24%"), std::string::npos) << line;
  EXPECT_NE(line.find("aux 1.0001"), std::string::npos) << line;
  EXPECT_NE(line.find("acc 29.2%"), std::string::npos) << line;  // mean of 0.5, 0.25, 0.125
  EXPECT_NE(line.find("12.3k tok/s"), std::string::npos) << line;
  EXPECT_NE(line.find("512 MiB"), std::string::npos) << line;
  EXPECT_NE(line.find("1m23s"), std::string::npos) << line;
  EXPECT_EQ(line.find('\n'), std::string::npos);
  EXPECT_LT(line.size(), 120u);
  r.split = "eval";
  r.accuracy.clear();
  const std::string eval = train::progress_line(r, 0);
  EXPECT_EQ(eval.substr(0, 17), "[eval] step 1200 ") << eval;
  EXPECT_NE(eval.find("acc -"), std::string::npos) << eval;
}

TEST(Metrics, PeakRssAndLoadFractions) {
  EXPECT_GT(train::peak_rss_mib(), 0.0);
  EXPECT_LT(train::peak_rss_mib(), 1024.0 * 1024.0);  // MiB, not KiB or bytes
  const std::vector<std::int64_t> counts = {2, 6, 0, 0};
  EXPECT_EQ(train::expert_load_fractions(counts), (std::vector<double>{0.25, 0.75, 0.0, 0.0}));
  EXPECT_EQ(train::expert_load_fractions(std::vector<int>(3, 0)), (std::vector<double>(3, 0.0)));
  EXPECT_TRUE(std::isnan(train::mean_accuracy(StepRecord{})));
}

}  // namespace
