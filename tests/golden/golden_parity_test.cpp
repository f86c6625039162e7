// Golden parity of StreamingLLM and H2O against their official implementations: every case of the
// six sets is replayed in-process (tests/golden/replay.hpp) and kvevict's written outputs are
// compared with the case's: kept positions exactly (tie-aware only where the case is flagged
// tie_sensitive, golden/README.md §5.7), K/V rows byte-identical (within 1e-5 at worst), H2O
// accumulated scores within 1e-5 relative. Also runs the kvevict-replay CLI once.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "golden/replay.hpp"
#include "kvevict/kvevict.hpp"

namespace {

namespace fs = std::filesystem;
using Cache = kvevict::KVCache<kvevict::CpuBackend>;
using kvevict::test::GoldenCase;
using kvevict::test::NpyArray;

constexpr double kFloatTolerance = 1e-5;  // absolute for K/V rows, relative for accumulated scores

// A per-process scratch directory, removed on scope exit.
class TempDir {
 public:
  explicit TempDir(const std::string& tag)
      : path_(fs::temp_directory_path() / ("kvevict-golden-" + std::to_string(::getpid()) + "-" + tag)) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  [[nodiscard]] const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// Every subdirectory of the set, params.json or not, so that a case the replay cannot even list
// still counts against "replayed == present".
std::int64_t count_case_dirs(const fs::path& set_dir) {
  std::int64_t n = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(set_dir, ec))
    if (e.is_directory()) ++n;
  return n;
}

std::string list(const std::vector<std::int64_t>& v) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? " " : "") << v[i];
  os << ']';
  return os.str();
}
std::string shape_str(const std::vector<std::int64_t>& s) { return list(s); }

// Row `row` (all leading indices flattened) of an int64 array, padding (-1) dropped.
std::vector<std::int64_t> unpadded_row(const std::vector<std::int64_t>& data, std::int64_t width, std::int64_t row) {
  std::vector<std::int64_t> out;
  for (std::int64_t i = 0; i < width; ++i) {
    const std::int64_t v = data[static_cast<std::size_t>(row * width + i)];
    if (v >= 0) out.push_back(v);
  }
  return out;
}

// Tie-aware acceptance of one (layer, head) keep set (README §5.7) from the case's saved top-k of
// that layer at step 0: our kept candidates (positions inside the ranked range) must be a valid
// top-k under the saved scores, and the protected rest must match the official one exactly.
bool tie_aware_ok(const GoldenCase& c, std::int64_t layer, std::int64_t head, const std::vector<std::int64_t>& ours,
                  const std::vector<std::int64_t>& official) {
  for (const char* key : {"topk_calls", "topk_calls_prefill"}) {
    const auto calls = c.params.find(key);
    if (calls == c.params.end() || !calls->is_array()) continue;
    for (const auto& call : *calls) {
      if (!call.contains("context") || !call.contains("scores_file") || !call.contains("k")) continue;
      const auto& ctx = call["context"];
      if (ctx.value("layer", std::int64_t{-1}) != layer || ctx.value("step", std::int64_t{0}) != 0) continue;
      std::string file = call["scores_file"].get<std::string>();
      file = file.substr(0, file.size() - 4);  // strip ".npy"
      const NpyArray sa = c.load(file);
      const std::int64_t n = sa.shape.back();
      if (n <= 0 || (head + 1) * n > sa.numel()) return false;
      const auto all = sa.as<float>();
      const std::vector<float> row(all.begin() + head * n, all.begin() + (head + 1) * n);
      std::vector<std::int64_t> chosen, rest_ours, rest_official;
      for (std::int64_t p : ours) (p < n ? chosen : rest_ours).push_back(p);
      for (std::int64_t p : official)
        if (p >= n) rest_official.push_back(p);
      return rest_ours == rest_official &&
             kvevict::test::keep_sets_equal_tie_aware(row, chosen, call["k"].get<std::int64_t>());
    }
  }
  return false;
}

// keep_indices.npy / step_keep_indices.npy: same shape, same kept positions per row.
void compare_keep_file(const GoldenCase& c, const fs::path& out_dir, const std::string& name) {
  INFO(name << ".npy");
  REQUIRE(fs::exists(out_dir / (name + ".npy")));
  const NpyArray want = c.load(name), got = kvevict::test::load_npy(out_dir / (name + ".npy"));
  CHECK(got.dtype == "<i8");
  if (got.shape != want.shape) {
    FAIL_CHECK("shape " << shape_str(got.shape) << ", official " << shape_str(want.shape));
    return;
  }
  const auto w = want.as<std::int64_t>(), g = got.as<std::int64_t>();
  const std::int64_t width = want.shape.back(), rows = want.numel() / std::max<std::int64_t>(width, 1);
  const std::int64_t heads = want.shape[want.shape.size() - 2];
  const std::int64_t layers = want.shape[want.shape.size() - 3];
  const bool tie_sensitive = c.params.value("tie_sensitive", false);
  for (std::int64_t r = 0; r < rows; ++r) {
    const auto ours = unpadded_row(g, width, r), official = unpadded_row(w, width, r);
    if (ours == official) continue;
    const std::int64_t head = r % heads, layer = (r / heads) % layers, step = r / (heads * layers);
    // Only step-0 selections have saved top-k scores to judge a tie by.
    if (tie_sensitive && step == 0 && tie_aware_ok(c, layer, head, ours, official)) continue;
    FAIL_CHECK((name == "step_keep_indices" ? "step " + std::to_string(step) + " " : std::string()) << "layer " << layer
               << " head " << head << ": kvevict keeps " << list(ours) << ", official " << list(official));
  }
}

// One output row (all head_dim values) of a [1, heads, n, d] tensor, or of [1, heads, d, n] when
// seq_last.
std::vector<float> tensor_row(const std::vector<float>& t, const std::vector<std::int64_t>& shape, bool seq_last,
                              std::int64_t h, std::int64_t i) {
  const std::int64_t n = seq_last ? shape[3] : shape[2], d = seq_last ? shape[2] : shape[3];
  std::vector<float> row(static_cast<std::size_t>(d));
  for (std::int64_t e = 0; e < d; ++e)
    row[static_cast<std::size_t>(e)] = t[static_cast<std::size_t>(seq_last ? (h * d + e) * n + i : (h * n + i) * d + e)];
  return row;
}

// out_keys_l{l} / out_values_l{l}: official rows are in official order (out_positions), ours in
// ascending position order; rows are matched by position. Eviction copies rows, so every row must
// be byte-identical.
void compare_kv_file(const GoldenCase& c, const fs::path& out_dir, const std::string& name, std::int64_t layer,
                     bool seq_last) {
  INFO(name << ".npy");
  REQUIRE(fs::exists(out_dir / (name + ".npy")));
  const NpyArray want = c.load(name), got = kvevict::test::load_npy(out_dir / (name + ".npy"));
  if (got.shape != want.shape || want.shape.size() != 4) {
    FAIL_CHECK("shape " << shape_str(got.shape) << ", official " << shape_str(want.shape));
    return;
  }
  const NpyArray op = c.load("out_positions"), ki = kvevict::test::load_npy(out_dir / "keep_indices.npy");
  const auto official_pos = op.as<std::int64_t>(), our_pos = ki.as<std::int64_t>();
  const auto w = want.as<float>(), g = got.as<float>();
  const std::int64_t heads = want.shape[1], n = seq_last ? want.shape[3] : want.shape[2];
  const std::int64_t owidth = op.shape.back(), kwidth = ki.shape.back();
  double max_diff = 0.0;
  std::int64_t not_identical = 0, unmatched = 0;
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t pos = our_pos[static_cast<std::size_t>((layer * heads + h) * kwidth + i)];
      std::int64_t j = 0;
      while (j < owidth && official_pos[static_cast<std::size_t>((layer * heads + h) * owidth + j)] != pos) ++j;
      if (pos < 0 || j >= n) {
        ++unmatched;
        continue;
      }
      const auto a = tensor_row(g, got.shape, seq_last, h, i), b = tensor_row(w, want.shape, seq_last, h, j);
      if (std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) != 0) ++not_identical;
      for (std::size_t e = 0; e < a.size(); ++e)
        max_diff = std::max(max_diff, static_cast<double>(std::abs(a[e] - b[e])));
    }
  CHECK(unmatched == 0);
  CHECK(max_diff <= kFloatTolerance);
  CHECK(not_identical == 0);
}

// out_hh_score_l{l}: [heads, n], both in positional order; relative tolerance.
void compare_scores_file(const GoldenCase& c, const fs::path& out_dir, const std::string& name) {
  INFO(name << ".npy");
  REQUIRE(fs::exists(out_dir / (name + ".npy")));
  const NpyArray want = c.load(name), got = kvevict::test::load_npy(out_dir / (name + ".npy"));
  if (got.shape != want.shape) {
    FAIL_CHECK("shape " << shape_str(got.shape) << ", official " << shape_str(want.shape));
    return;
  }
  const auto w = want.as<double>(), g = got.as<double>();
  // A NaN or infinite score makes `rel` NaN, which no `>` comparison catches: count an element
  // as bad unless both sides are finite and `rel <= tolerance` holds.
  double worst = 0.0;
  std::size_t worst_at = 0, bad = 0, first_bad = w.size();
  for (std::size_t i = 0; i < w.size(); ++i) {
    const double scale = std::max({std::abs(w[i]), std::abs(g[i]), 1e-30});
    const double rel = std::abs(w[i] - g[i]) / scale;
    if (rel > worst) worst = rel, worst_at = i;
    if (!std::isfinite(w[i]) || !std::isfinite(g[i]) || !(rel <= kFloatTolerance)) {
      if (bad++ == 0) first_bad = i;
    }
  }
  INFO("worst relative difference " << worst << " at flat index " << worst_at << "; first bad element "
                                    << first_bad << " (kvevict " << (bad ? g[first_bad] : 0.0) << ", official "
                                    << (bad ? w[first_bad] : 0.0) << ")");
  CHECK(bad == 0);
}

// Compares every output the case has with what a replay wrote into `out_dir`.
void compare_outputs(const GoldenCase& c, const fs::path& out_dir) {
  compare_keep_file(c, out_dir, "keep_indices");
  if (c.has("step_keep_indices")) compare_keep_file(c, out_dir, "step_keep_indices");

  const auto& hp = c.params.at("hyperparameters");
  const bool keys_seq_last = hp.contains("k_seq_dim") && hp["k_seq_dim"].is_number() && hp["k_seq_dim"].get<int>() == 3;
  std::int64_t outputs = 0;
  for (const auto& [file, entry] : c.params.at("files").items()) {
    if (entry.value("role", std::string()) != "output") continue;
    const std::string stem = file.substr(0, file.size() - 4);
    ++outputs;
    if (stem.rfind("out_keys_l", 0) == 0)
      compare_kv_file(c, out_dir, stem, std::stoll(stem.substr(10)), keys_seq_last);
    else if (stem.rfind("out_values_l", 0) == 0)
      compare_kv_file(c, out_dir, stem, std::stoll(stem.substr(12)), false);
    else if (stem.rfind("out_hh_score_l", 0) == 0)
      compare_scores_file(c, out_dir, stem);
    else
      FAIL_CHECK("official output " << file << " has no kvevict counterpart in this test");
  }
  CHECK(outputs > 0);
}

// How a case is replayed into `out_dir`: the dispatch table (kvevict-replay's path) by default.
using ReplayInto = void (*)(const GoldenCase&, const fs::path&);
void replay_dispatched(const GoldenCase& c, const fs::path& out_dir) { (void)kvevict::golden::replay<Cache>(c, out_dir); }

// h2o_real_drop scored from the stored queries: H2O's query path through the library.
void replay_h2o_from_queries(const GoldenCase& c, const fs::path& out_dir) {
  const auto r = kvevict::golden::replay_h2o_real_drop_from<Cache>(c, kvevict::golden::AttentionSource::queries);
  kvevict::golden::write_outputs(c, r, out_dir);
}

// Replays one case into `out_dir` and compares every output the case has. Returns whether it replayed.
bool check_case(const fs::path& dir, const fs::path& out_dir, ReplayInto replay) {
  const GoldenCase c(dir);
  INFO("case " << c.id());
  try {
    replay(c, out_dir);
  } catch (const std::exception& e) {
    FAIL_CHECK("replay threw: " << e.what());
    return false;
  }
  compare_outputs(c, out_dir);
  return true;
}

// Every case of `set` replays and matches; the count is pinned so a partial or stale golden copy
// (a case directory missing) fails instead of passing on what is left.
void check_set(const std::string& set, std::int64_t expected_cases, ReplayInto replay = replay_dispatched) {
  const fs::path root = kvevict::test::golden_root();
  if (root.empty() || !fs::is_directory(root)) {
    WARN("SKIPPED: golden vectors not found at '" << root.string() << "' (set KVEVICT_GOLDEN_DIR)");
    return;
  }
  const std::int64_t present = count_case_dirs(root / set);
  INFO("set " << set << " under " << root.string());
  REQUIRE(present > 0);
  CHECK(present == expected_cases);
  TempDir tmp(set);
  std::int64_t replayed = 0;
  for (const auto& dir : kvevict::test::list_cases(set))
    if (check_case(dir, tmp.path() / dir.filename(), replay)) ++replayed;
  CHECK(replayed == present);
}

std::string quoted(const fs::path& p) {
  std::string s = "'";
  for (char ch : p.string()) s += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return s + "'";
}

// std::system's status as an exit code (-1 if the child did not exit normally).
int run_cli(const std::string& args, const fs::path& log) {
  const std::string cmd = quoted(KVEVICT_REPLAY_PATH) + " " + args + " >" + quoted(log) + " 2>&1";
  const int status = std::system(cmd.c_str());
  return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

TEST_CASE("kvevict StreamingLLM reproduces every streaming_llm golden case (StartRecentKVCache)",
          "[golden][streaming_llm]") {
  check_set("streaming_llm", 17);
}

TEST_CASE("kvevict H2O reproduces every h2o_real_drop golden case step by step (H2OKVCache_LayerWise)",
          "[golden][h2o]") {
  check_set("h2o_real_drop", 12);
}

TEST_CASE("kvevict H2O scoring from the stored queries (its own causal softmax, the query path) reproduces every "
          "h2o_real_drop golden case step by step",
          "[golden][h2o]") {
  check_set("h2o_real_drop", 12, replay_h2o_from_queries);
}

TEST_CASE("kvevict StreamingLLM reproduces every kvfactory_streamingllm golden case (StreamingLLMKVCluster)",
          "[golden][streaming_llm][kvfactory]") {
  check_set("kvfactory_streamingllm", 6);
}

TEST_CASE("kvevict StreamingLLM reproduces every kvpress_streamingllm golden case (StreamingLLMPress)",
          "[golden][streaming_llm][kvpress]") {
  check_set("kvpress_streamingllm", 3);
}

TEST_CASE("kvevict H2O reproduces every kvfactory_h2o golden case (H2OKVCluster, causal mask fixed)",
          "[golden][h2o][kvfactory]") {
  check_set("kvfactory_h2o", 8);
}

TEST_CASE("kvevict H2O with replay-computed legacy masks reproduces every kvfactory_h2o_legacy2024 golden case",
          "[golden][h2o][kvfactory]") {
  check_set("kvfactory_h2o_legacy2024", 4);
}

TEST_CASE("kvevict-replay writes the official keep set and exits 2 on bad usage", "[golden][cli]") {
  const fs::path root = kvevict::test::golden_root();
  if (root.empty() || !fs::is_directory(root)) {
    WARN("SKIPPED: golden vectors not found at '" << root.string() << "' (set KVEVICT_GOLDEN_DIR)");
    return;
  }
  // The first case with decode steps, so the program's step keep-sets and scores are checked too.
  fs::path case_dir;
  for (const auto& dir : kvevict::test::list_cases("h2o_real_drop"))
    if (GoldenCase(dir).has("attn_decode_lens")) {
      case_dir = dir;
      break;
    }
  REQUIRE(!case_dir.empty());
  INFO("case " << case_dir.string());
  TempDir tmp("cli");
  const fs::path out = tmp.path() / "out", log = tmp.path() / "log.txt";

  const int rc = run_cli(quoted(case_dir) + " " + quoted(out) + " --backend cpu", log);
  INFO("output: " << read_file(log));
  REQUIRE(rc == 0);
  const GoldenCase c(case_dir);
  const NpyArray got = kvevict::test::load_npy(out / "keep_indices.npy");
  const NpyArray want = c.load("keep_indices");
  CHECK(got.dtype == want.dtype);
  CHECK(got.shape == want.shape);
  CHECK(got.as<std::int64_t>() == want.as<std::int64_t>());
  REQUIRE(c.has("step_keep_indices"));
  compare_outputs(c, out);  // step keep-sets, K/V rows and accumulated scores as the program wrote them

  CHECK(run_cli(quoted(case_dir) + " " + quoted(out) + " --no-such-option", log) == 2);
  CHECK(read_file(log).find("unknown option") != std::string::npos);
  CHECK(run_cli(quoted(case_dir), log) == 2);
  CHECK(run_cli(quoted(tmp.path() / "missing") + " " + quoted(out), log) == 2);

  // A readable case of a set the replay does not cover.
  const fs::path other = tmp.path() / "no_such_set" / "c01";
  fs::create_directories(other);
  std::ofstream(other / "params.json") << R"({"policy": "no_such_set"})";
  CHECK(run_cli(quoted(other) + " " + quoted(out), log) == 2);
  CHECK(read_file(log).find("unsupported") != std::string::npos);
}
