// kvevict-eval in-process: stories, windows, the policy registry, CSV and SVG output.
#include <catch2/catch.hpp>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

#include "eval.hpp"
#include "model_files.hpp"
#include "plot.hpp"

namespace {

std::vector<std::string> csv_lines(const llama2::EvalResult& r) {
  std::ostringstream out;
  llama2::write_csv(out, r);
  std::vector<std::string> lines;
  std::istringstream in(out.str());
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::vector<std::string> fields(const std::string& line) {
  std::vector<std::string> f;
  std::stringstream in(line);
  for (std::string x; std::getline(in, x, ',');) f.push_back(x);
  return f;
}

}  // namespace

TEST_CASE("the CSV has one row per (policy, budget) plus the full cache, with the required columns", "[eval]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  const auto dir = llama2::model_dir();
  const llama2::Model model(dir / "stories260K.bin");
  const llama2::Tokenizer tok(dir / "tok512.bin", model.config().vocab_size);
  const auto windows = llama2::make_windows(tok, llama2::read_stories(dir / "tinystories_sample.txt"), 1, 48, 3);
  const llama2::EvalResult r = llama2::run_eval(model, windows, {"full", "streaming_llm", "h2o"}, {8, 16, 64});

  const std::vector<std::string> lines = csv_lines(r);
  REQUIRE(lines.size() == 1 + 1 + 2 * 3);
  const std::vector<std::string> header = fields(lines[0]);
  for (const char* col : {"policy", "budget", "kl", "top1", "ppl", "ppl_full", "kv_bytes", "tokens_per_s"})
    CHECK(std::find(header.begin(), header.end(), col) != header.end());
  std::set<std::pair<std::string, std::string>> seen;
  for (std::size_t i = 1; i < lines.size(); ++i) {
    const std::vector<std::string> f = fields(lines[i]);
    REQUIRE(f.size() == header.size());
    CHECK(seen.emplace(f[0], f[1]).second);
  }
  CHECK(seen.contains({"full", "48"}));
  for (const char* p : {"streaming_llm", "h2o"})
    for (const char* b : {"8", "16", "64"}) CHECK(seen.contains({p, b}));

  for (const auto& row : r.rows) {
    INFO(row.policy << " @ " << row.budget);
    CHECK(row.quality.positions == 47);
    CHECK(row.quality.ppl_full == r.full.ppl);
    CHECK(row.tokens_per_s > 0);
    if (row.policy == "full" || row.budget >= 48) {  // nothing evicted: exactly the full cache
      CHECK(row.quality.kl == 0.0);
      CHECK(row.quality.top1 == 1.0);
      CHECK(row.quality.ppl == r.full.ppl);
    } else {
      CHECK(row.quality.kl > 0.0);
      CHECK(row.kv_bytes == row.budget * 5 * 4 * 2 * 8 * 4);  // budget x layers x kv-heads x (K, V) x head_dim x fp32
    }
  }
  // Budgets a policy rejects (StreamingLLM needs room for its 4 sinks) fail before any run.
  CHECK_THROWS_AS(llama2::run_eval(model, windows, {"streaming_llm"}, {2}), kvevict::Error);
  CHECK_THROWS_AS(llama2::run_eval(model, windows, {"no_such_policy"}, {32}), kvevict::ArgumentError);
}

TEST_CASE("windows are deterministic for a seed, start with BOS and differ between seeds", "[eval]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  const auto dir = llama2::model_dir();
  const llama2::Tokenizer tok(dir / "tok512.bin", 512);
  const auto stories = llama2::read_stories(dir / "tinystories_sample.txt");
  CHECK(stories.size() == 1092);
  const auto a = llama2::make_windows(tok, stories, 3, 100, 11);
  REQUIRE(a.size() == 3);
  CHECK(a[0].size() == 100);
  CHECK(a[0][0] == llama2::Tokenizer::kBos);
  CHECK(llama2::make_windows(tok, stories, 3, 100, 11) == a);
  CHECK(llama2::make_windows(tok, stories, 3, 100, 12) != a);
  CHECK_THROWS_AS(llama2::make_windows(tok, {"A short story."}, 2, 100, 1), kvevict::ArgumentError);
}

TEST_CASE("stories are split on <|endoftext|> lines and trimmed", "[eval]") {
  const auto path = std::filesystem::temp_directory_path() / "kvevict_llama2_stories_test.txt";
  {
    std::ofstream out(path, std::ios::binary);
    out << "One day.\r\n\r\nThe end.\r\n<|endoftext|>\r\n  Second story.\n<|endoftext|>\n\n<|endoftext|>\nThird.";
  }
  const auto stories = llama2::read_stories(path);
  std::filesystem::remove(path);
  CHECK(stories == std::vector<std::string>{"One day.\n\nThe end.", "Second story.", "Third."});
}

TEST_CASE("policies are found by their lower-case names and unknown names are rejected", "[eval]") {
  const std::vector<std::string> names = llama2::policy_names();
  for (const char* n : {"full", "streaming_llm", "h2o"}) CHECK(std::find(names.begin(), names.end(), n) != names.end());
  CHECK(std::set<std::string>(names.begin(), names.end()).size() == names.size());
  CHECK(std::holds_alternative<llama2::H2OEntry>(*llama2::find_policy("h2o")));
  CHECK(std::holds_alternative<llama2::StreamingLLMEntry>(*llama2::find_policy("streaming_llm")));
  CHECK(!llama2::find_policy("H2O").has_value());
  CHECK_THROWS_AS(llama2::policy_entry("no_such_policy"), kvevict::ArgumentError);
  CHECK(llama2::H2OEntry::config(64).num_heavy == 32);
  CHECK(llama2::H2OEntry::config(64).num_recent == 32);
  CHECK(llama2::StreamingLLMEntry::config(64).num_sink == 4);
  CHECK(llama2::StreamingLLMEntry::config(64).num_recent == 60);
}

TEST_CASE("the SVG plot has one polyline per policy and panel, a legend and the budget ticks", "[eval]") {
  llama2::EvalResult r;
  r.rows.push_back({"full", 512, {0.0, 1.0, 5.0, 5.0, 100}, 1000, 1.0});
  for (std::int64_t b : {32, 64, 128, 256}) {
    const double x = 1.0 / static_cast<double>(b);
    r.rows.push_back({"streaming_llm", b, {x, 1 - x, 5 + x, 5.0, 100}, b, 1.0});
    r.rows.push_back({"h2o", b, {x / 2, 1 - x / 2, 5 + x / 2, 5.0, 100}, b, 1.0});
  }
  std::ostringstream out;
  llama2::write_svg(out, r, "test <plot>");
  const std::string svg = out.str();
  auto count = [&](const std::string& s) {
    std::size_t n = 0;
    for (auto p = svg.find(s); p != std::string::npos; p = svg.find(s, p + 1)) ++n;
    return n;
  };
  CHECK(svg.starts_with("<svg"));
  CHECK(svg.ends_with("</svg>\n"));
  CHECK(count("<polyline") == 3 * 2);
  CHECK(count("<circle") == 3 * 2 * 4);
  CHECK(count(">streaming_llm</text>") == 1);
  CHECK(count(">h2o</text>") == 1);
  CHECK(count(">full cache</text>") == 1);
  CHECK(count(">256</text>") == 3);
  CHECK(count("test &lt;plot&gt;") == 1);
  CHECK(svg.find("nan") == std::string::npos);
}
