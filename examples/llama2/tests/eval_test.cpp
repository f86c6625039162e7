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
  const llama2::Config& cfg = model.config();
  const llama2::Tokenizer tok(dir / "tok512.bin", cfg.vocab_size);
  const auto windows = llama2::make_windows(tok, llama2::read_stories(dir / "tinystories_sample.txt"), 1, 48, 3);
  const std::vector<std::string> names = llama2::policy_names();  // every registered policy, `full` included
  const std::int64_t num_bounded = static_cast<std::int64_t>(names.size()) - 1;
  const llama2::EvalResult r = llama2::run_eval(model, windows, names, {8, 16, 64});

  const std::vector<std::string> lines = csv_lines(r);
  REQUIRE(static_cast<std::int64_t>(lines.size()) == 1 + 1 + num_bounded * 3);
  const std::vector<std::string> header = fields(lines[0]);
  for (const char* col : {"policy", "budget", "kl", "top1", "ppl", "ppl_full", "kv_bytes", "tokens_per_s", "capacity"})
    CHECK(std::find(header.begin(), header.end(), col) != header.end());
  std::set<std::pair<std::string, std::string>> seen;
  for (std::size_t i = 1; i < lines.size(); ++i) {
    const std::vector<std::string> f = fields(lines[i]);
    REQUIRE(f.size() == header.size());
    CHECK(seen.emplace(f[0], f[1]).second);
  }
  CHECK(seen.contains({"full", "48"}));
  for (const auto& p : names)
    if (p != "full")
      for (const char* b : {"8", "16", "64"}) CHECK(seen.contains({p, b}));

  constexpr std::int64_t kEntryBytes = 5 * 4 * 2 * 8 * 4;  // layers x kv-heads x (K, V) x head_dim x fp32
  for (const auto& row : r.rows) {
    INFO(row.policy << " @ " << row.budget);
    CHECK(row.quality.positions == 47);
    CHECK(row.quality.ppl_full == r.full.ppl);
    CHECK(row.tokens_per_s > 0);
    CHECK(row.kv_bytes <= row.capacity * kEntryBytes);
    if (row.policy == "full") {
      CHECK(row.capacity == cfg.seq_len);
    } else {
      const std::int64_t spare = std::visit([&]<class Entry>(Entry) { return Entry::spare(row.budget); }, llama2::policy_entry(row.policy));
      CHECK(row.capacity == row.budget + spare);
    }
    if (row.policy == "full" || row.budget >= 48) {  // nothing evicted: exactly the full cache
      CHECK(row.quality.kl == 0.0);
      CHECK(row.quality.top1 == 1.0);
      CHECK(row.quality.ppl == r.full.ppl);
    } else {
      CHECK(row.quality.kl > 0.0);
      if (row.capacity == row.budget + 1) CHECK(row.kv_bytes == row.budget * kEntryBytes);  // evicts every step
    }
  }
  // Budgets a policy rejects (StreamingLLM needs room for its 4 sinks, CAKE a window of 2) fail before any run.
  CHECK_THROWS_AS(llama2::run_eval(model, windows, {"streaming_llm"}, {2}), kvevict::Error);
  CHECK_THROWS_AS(llama2::run_eval(model, windows, {"h2o", "cake"}, {32, 4}), kvevict::Error);
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
  CHECK(names == std::vector<std::string>{"full", "streaming_llm", "h2o", "snapkv", "pyramidkv", "tova", "knorm", "keydiff",
                                          "cake", "lazyeviction"});
  CHECK(std::set<std::string>(names.begin(), names.end()).size() == names.size());
  CHECK(std::holds_alternative<llama2::H2OEntry>(*llama2::find_policy("h2o")));
  CHECK(std::holds_alternative<llama2::StreamingLLMEntry>(*llama2::find_policy("streaming_llm")));
  CHECK(std::holds_alternative<llama2::LazyEvictionEntry>(*llama2::find_policy("lazyeviction")));
  CHECK(std::holds_alternative<llama2::KeyDiffEntry>(*llama2::find_policy("keydiff")));
  CHECK(!llama2::find_policy("H2O").has_value());
  CHECK(!llama2::find_policy("lazy_eviction").has_value());
  CHECK_THROWS_AS(llama2::policy_entry("no_such_policy"), kvevict::ArgumentError);
  CHECK(llama2::H2OEntry::config(64).num_heavy == 32);
  CHECK(llama2::H2OEntry::config(64).num_recent == 32);
  CHECK(llama2::StreamingLLMEntry::config(64).num_sink == 4);
  CHECK(llama2::StreamingLLMEntry::config(64).num_recent == 60);
}

TEST_CASE("the registry's parameters follow docs/eval.md at the default budgets", "[eval]") {
  // Windows of the SnapKV family: min(32, B / 4); SnapKV and PyramidKV re-score every window steps.
  for (const auto& [b, w] : std::vector<std::pair<std::int64_t, std::int64_t>>{{32, 8}, {64, 16}, {128, 32}, {256, 32}}) {
    INFO("budget " << b);
    const kvevict::SnapKVConfig s = llama2::SnapKVEntry::config(b);
    CHECK(s.capacity == b);
    CHECK(s.scoring.window == w);
    CHECK(s.scoring.kernel == 5);
    CHECK(s.schedule == kvevict::Schedule::prefill_and_every_n_steps);
    CHECK(s.decode_interval == w);
    CHECK(llama2::SnapKVEntry::spare(b) == w);
    const llama2::PyramidKVDecode::Config p = llama2::PyramidKVEntry::config(b);
    CHECK(p.pyramid.capacity == b);
    CHECK(p.pyramid.scoring.window == w);
    CHECK(p.pyramid.beta == 20);
    CHECK(p.decode_interval == w);
    CHECK(llama2::CAKEEntry::config(b).cache_size == b);
    CHECK(llama2::CAKEEntry::config(b).window == w);
    CHECK(llama2::TOVAEntry::config(b).cache_size == b);
    CHECK(llama2::KnormEntry::config(b).budget == b);
    CHECK(llama2::KnormEntry::config(b).num_sink + llama2::KnormEntry::config(b).num_recent == 0);
    CHECK(llama2::KeyDiffEntry::config(b).num_sink + llama2::KeyDiffEntry::config(b).num_recent == 0);
  }
  // PyramidKV's largest layer budget, 2(C - w) - (C - w) / 20 + w, plus the interval.
  CHECK(llama2::PyramidKVEntry::spare(32) == 55 - 32 + 8);
  CHECK(llama2::PyramidKVEntry::spare(256) == 469 - 256 + 32);
  // LazyEviction (docs/lazyeviction.md): alpha 1e-3, W = 58 when B >= 4 W, else B / 4.
  CHECK(llama2::LazyEvictionEntry::config(256).window == 58);
  CHECK(llama2::LazyEvictionEntry::config(232).window == 58);
  CHECK(llama2::LazyEvictionEntry::config(231).window == 57);
  CHECK(llama2::LazyEvictionEntry::config(128).window == 32);
  CHECK(llama2::LazyEvictionEntry::config(32).window == 8);
  CHECK(llama2::LazyEvictionEntry::config(64).alpha == 1e-3f);
  CHECK(llama2::LazyEvictionEntry::spare(256) == 58);
  // Every policy constructs at every default budget in a stories260K-shaped cache of the size the
  // registry gives, which stays within the context.
  llama2::Config cfg;
  cfg.dim = 64;
  cfg.num_layers = 5;
  cfg.num_q_heads = 8;
  cfg.num_kv_heads = 4;
  cfg.seq_len = 512;
  for (const auto& name : llama2::policy_names())
    for (std::int64_t b : {32, 64, 128, 256}) {
      INFO(name << " @ " << b);
      std::visit(
          [&]<class Entry>(Entry) {
            const std::int64_t capacity = llama2::cache_capacity<Entry>(cfg, b);
            CHECK(capacity <= cfg.seq_len);
            llama2::Cache cache(cfg.cache_shape(capacity));
            CHECK_NOTHROW(typename Entry::Policy(cache, Entry::config(b)));
          },
          llama2::policy_entry(name));
    }
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
