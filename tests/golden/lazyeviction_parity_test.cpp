// Golden parity of LazyEviction against the official code (golden/README.md §6.8): every case of
// the `lazyeviction` set is replayed in-process (tests/golden/replay_lazyeviction.hpp), which checks
// every step's importance events, last/mri state, resident lengths, eviction steps, scores and
// kept sets (tie-aware, teacher-forced after official tie choices); this file requires all of it
// to match and compares the final K/V rows byte for byte. Run with -s to print the per-case counts.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "golden/replay_lazyeviction.hpp"
#include "kvevict/kvevict.hpp"

namespace {

namespace fs = std::filesystem;
using Cache = kvevict::KVCache<kvevict::CpuBackend>;
using kvevict::test::GoldenCase;

std::int64_t count_case_dirs(const fs::path& set_dir) {
  std::int64_t n = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(set_dir, ec))
    if (e.is_directory()) ++n;
  return n;
}

// out_keys_l{l} / out_values_l{l}: kvevict's rows (ascending positions) against the official rows
// (official slot order, positions in out_positions), byte for byte. Returns the rows that differ.
std::int64_t differing_rows(const GoldenCase& c, const kvevict::golden::ReplayResult& r, const std::string& stem,
                            std::int64_t layer) {
  const auto ours = r.tensors.find(stem);
  REQUIRE(ours != r.tensors.end());
  const kvevict::test::NpyArray official = c.load(stem);
  REQUIRE(official.shape.size() == 4);
  REQUIRE(ours->second.shape == official.shape);
  const std::int64_t heads = official.shape[1], n = official.shape[2], d = official.shape[3];
  const auto rows = official.as<float>();
  const kvevict::test::NpyArray pos_arr = c.load("out_positions");
  const auto pos = pos_arr.as<std::int64_t>();
  const std::int64_t width = pos_arr.shape[2];
  std::int64_t differing = 0;
  for (std::int64_t h = 0; h < heads; ++h) {
    const auto& keep = r.keep[static_cast<std::size_t>(layer)][static_cast<std::size_t>(h)];
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t p = pos[static_cast<std::size_t>((layer * heads + h) * width + i)];
      const auto at = std::lower_bound(keep.begin(), keep.end(), p);
      if (at == keep.end() || *at != p) {
        ++differing;
        continue;
      }
      const auto k = at - keep.begin();
      differing += std::memcmp(ours->second.data.data() + (h * n + k) * d, rows.data() + (h * n + i) * d,
                               static_cast<std::size_t>(d) * sizeof(float)) != 0;
    }
  }
  return differing;
}

std::string shell_quoted(const fs::path& p) {
  std::string s = "'";
  for (char ch : p.string()) s += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return s + "'";
}

}  // namespace

TEST_CASE("kvevict LazyEviction reproduces every lazyeviction golden case step by step (Window_LAZYKVCluster)",
          "[golden][lazyeviction]") {
  const fs::path root = kvevict::test::golden_root();
  if (root.empty() || !fs::is_directory(root / "lazyeviction")) {
    WARN("SKIPPED: golden vectors not found at '" << root.string() << "' (set KVEVICT_GOLDEN_DIR)");
    return;
  }
  const std::int64_t present = count_case_dirs(root / "lazyeviction");
  REQUIRE(present > 0);
  std::int64_t replayed = 0, tie_valid = 0, forced = 0, exact_selections = 0;
  for (const auto& dir : kvevict::test::list_cases("lazyeviction")) {
    const GoldenCase c(dir);
    const auto r = kvevict::golden::replay_lazyeviction_checked<Cache>(c);
    const auto& p = r.parity;
    {
      INFO(c.id() << ": " << p.summary());
      for (const auto& m : p.messages) UNSCOPED_INFO(m);
      CHECK(p.ok());
      // Nothing was skipped: every step, eviction and final entry was compared.
      CHECK(p.steps == kvevict::golden::impl::get_int(c, "hyperparameters", "decode_steps"));
      CHECK(p.selections == p.official_evictions * r.result.out_heads);
      CHECK(p.selections == p.selections_identical + p.selections_tie_valid + p.selections_invalid);
      CHECK(p.event_checks > 0);
      CHECK(p.final_checks == static_cast<std::int64_t>(r.result.keep.size() * r.result.keep[0].size()));
      // A selection may differ from the official one only where the official top-k met an exact tie.
      CHECK(p.selections_tie_valid <= p.boundary_ties);
      if (!c.params.value("tie_sensitive", false)) CHECK(p.selections_identical == p.selections);
    }
    std::int64_t differing = 0;
    for (std::int64_t l = 0; l < r.result.num_layers; ++l)
      differing += differing_rows(c, r.result, "out_keys_l" + std::to_string(l), l) +
                   differing_rows(c, r.result, "out_values_l" + std::to_string(l), l);
    CHECK(differing == 0);
    SUCCEED(c.id() << ": " << p.summary());
    ++replayed;
    tie_valid += p.selections_tie_valid;
    forced += p.teacher_forced;
    exact_selections += p.selections_identical;
  }
  CHECK(replayed == present);
  CHECK(tie_valid == forced);
  CHECK(exact_selections > 0);
}

TEST_CASE("kvevict-replay replays a lazyeviction case and writes its keep set", "[golden][lazyeviction][cli]") {
  const fs::path root = kvevict::test::golden_root();
  const auto cases = kvevict::test::list_cases("lazyeviction");
  if (root.empty() || cases.empty()) {
    WARN("SKIPPED: golden vectors not found at '" << root.string() << "' (set KVEVICT_GOLDEN_DIR)");
    return;
  }
  const fs::path out = fs::temp_directory_path() / ("kvevict-lazy-cli-" + std::to_string(::getpid()));
  fs::remove_all(out);
  const fs::path& case_dir = cases.front();
  const std::string cmd = shell_quoted(KVEVICT_REPLAY_PATH) + " " + shell_quoted(case_dir) + " " + shell_quoted(out) +
                          " >" + shell_quoted(out.string() + ".log") + " 2>&1";
  const int status = std::system(cmd.c_str());
  REQUIRE(status != -1);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  const auto ours = kvevict::test::load_npy(out / "keep_indices.npy");
  const auto official = kvevict::test::load_npy(case_dir / "keep_indices.npy");
  CHECK(ours.shape == official.shape);
  CHECK(ours.as<std::int64_t>() == official.as<std::int64_t>());
  CHECK(fs::exists(out / "out_last_l0.npy"));
  CHECK(fs::exists(out / "out_mri_l0.npy"));
  std::error_code ec;
  fs::remove_all(out, ec);
  fs::remove(out.string() + ".log", ec);
}
