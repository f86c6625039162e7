// Golden parity of CAKE against antgroup/cakekv (golden/README.md §6.5): every case of the `cake`
// set is replayed in-process (tests/golden/replay_cake.hpp) and compared with the official outputs:
// kept positions after prefill and after every decode token exactly, the budget of every layer and
// every cascade step's allocation exactly, preferences and stored indicators within 1e-5 relative,
// K/V rows byte-identical. Also: the same replay with position-order decode pooling departs from
// the official decode steps (the reason the reference order is tracked), and kvevict-replay's
// dispatcher serves the set.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "golden/replay_cake.hpp"
#include "kvevict/kvevict.hpp"

namespace {

namespace fs = std::filesystem;
using Cache = kvevict::KVCache<kvevict::CpuBackend>;
using kvevict::test::GoldenCase;
using kvevict::test::NpyArray;

constexpr double kRelTolerance = 1e-5;  // golden/README.md §5.8: float32 reductions in another order

std::string list(const std::vector<std::int64_t>& v) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? " " : "") << v[i];
  return os.str() + "]";
}

// Rows of an int64 [..., width] array with the -1 padding dropped.
std::vector<std::vector<std::int64_t>> unpadded_rows(const NpyArray& a) {
  const auto data = a.as<std::int64_t>();
  const std::int64_t width = a.shape.back();
  std::vector<std::vector<std::int64_t>> rows;
  for (std::int64_t r = 0; r * width < static_cast<std::int64_t>(data.size()); ++r) {
    std::vector<std::int64_t> row;
    for (std::int64_t i = 0; i < width; ++i)
      if (const auto v = data[static_cast<std::size_t>(r * width + i)]; v >= 0) row.push_back(v);
    rows.push_back(row);
  }
  return rows;
}

// Flattened [step][layer][head] keep sets of a replay, in the golden files' row order.
std::vector<std::vector<std::int64_t>> our_rows(const kvevict::golden::ReplayResult& r, bool steps) {
  std::vector<std::vector<std::int64_t>> rows;
  if (steps) {
    for (const auto& step : r.step_keep)
      for (const auto& layer : step)
        for (const auto& head : layer) rows.push_back(head);
  } else {
    for (const auto& layer : r.keep)
      for (const auto& head : layer) rows.push_back(head);
  }
  return rows;
}

double rel_diff(double a, double b) { return std::abs(a - b) / std::max({std::abs(a), std::abs(b), 1e-30}); }

void check_case(const fs::path& dir) {
  const GoldenCase c(dir);
  INFO("case " << c.id());
  kvevict::golden::CakeReplay rep;
  try {
    rep = kvevict::golden::replay_cake_detailed<Cache>(c);
  } catch (const std::exception& e) {
    FAIL("replay threw: " << e.what());
  }
  const auto& r = rep.result;
  CHECK_FALSE(c.params.value("tie_sensitive", true));  // every cake case is tie-free, so the sets must be equal

  // Kept positions: after the last call, and after prefill and every decode token.
  {
    const auto want = unpadded_rows(c.load("keep_indices")), got = our_rows(r, false);
    REQUIRE(got.size() == want.size());
    for (std::size_t i = 0; i < want.size(); ++i) {
      INFO("keep_indices row " << i << " (layer " << i / static_cast<std::size_t>(r.out_heads) << ")");
      CHECK(list(got[i]) == list(want[i]));
    }
  }
  if (c.has("step_keep_indices")) {
    const auto want = unpadded_rows(c.load("step_keep_indices")), got = our_rows(r, true);
    REQUIRE(got.size() == want.size());
    const auto per_step = static_cast<std::size_t>(r.num_layers * r.out_heads);
    for (std::size_t i = 0; i < want.size(); ++i) {
      INFO("step " << i / per_step << ", layer*head " << i % per_step);
      CHECK(list(got[i]) == list(want[i]));
    }
  }

  // Budgets: after prefill, and the allocation of every cascade step (the official printed lists).
  CHECK(list(rep.layer_budgets) == list(c.load("out_layer_budgets").as<std::int64_t>()));
  CHECK(rep.prefill_evicted == c.params.at("prefill_evicted").get<bool>());
  const bool cascading = c.params.at("hyperparameters").at("use_cascading").get<bool>();
  if (c.params.contains("cascade_budget_history") && !c.params.at("cascade_budget_history").is_null()) {
    const auto& history = c.params.at("cascade_budget_history");
    REQUIRE(rep.allocation_history.size() == history.size());
    for (std::size_t i = 0; i < history.size(); ++i) {
      INFO("cascade step " << i);
      CHECK(rep.allocated_after[i] == history[i].at("after_layer").get<std::int64_t>());
      CHECK(list(rep.allocation_history[i]) == list(history[i].at("budgets").get<std::vector<std::int64_t>>()));
    }
  } else if (!cascading && rep.prefill_evicted) {
    REQUIRE(rep.allocated_after.size() == 1);  // once, after the last layer
    CHECK(rep.allocated_after[0] == r.num_layers - 1);
  }

  // Preferences.
  const auto prefs = c.load("out_pref_scores").as<double>();
  REQUIRE(prefs.size() == rep.preferences.size());
  for (std::size_t l = 0; l < prefs.size(); ++l) {
    INFO("preference of layer " << l << ": kvevict " << rep.preferences[l] << ", official " << prefs[l]);
    CHECK(rel_diff(rep.preferences[l], prefs[l]) <= kRelTolerance);
  }

  // Stored indicator after prefill. Official order is top-k order (descending) when prefill
  // evicted, else positions; ours is ascending positions, so evicted cases compare sorted values.
  for (std::int64_t l = 0; l < r.num_layers; ++l) {
    const std::string name = "out_evict_score_l" + std::to_string(l);
    INFO(name);
    const NpyArray want = c.load(name);
    const auto& got = r.tensors.at(name);
    REQUIRE(got.shape == want.shape);
    const auto w = want.as<double>();
    const std::int64_t n = want.shape.back();
    double worst = 0.0;
    for (std::int64_t h = 0; h < want.shape[1]; ++h) {
      std::vector<double> a(got.data.begin() + h * n, got.data.begin() + (h + 1) * n), b(w.begin() + h * n, w.begin() + (h + 1) * n);
      if (rep.prefill_evicted) {
        CHECK(std::is_sorted(b.begin(), b.end(), std::greater<>()));
        std::sort(a.begin(), a.end(), std::greater<>());
      }
      for (std::int64_t i = 0; i < n; ++i)
        worst = std::max(worst, rel_diff(a[static_cast<std::size_t>(i)], b[static_cast<std::size_t>(i)]));
    }
    CHECK(worst <= kRelTolerance);
  }

  // K/V rows: ours ascending by position, official in official order (out_positions); eviction
  // only copies rows, so every row must be byte-identical.
  const NpyArray op = c.load("out_positions");
  const auto official_pos = op.as<std::int64_t>();
  const std::int64_t owidth = op.shape.back();
  for (std::int64_t l = 0; l < r.num_layers; ++l)
    for (const char* kind : {"out_keys_l", "out_values_l"}) {
      const std::string name = kind + std::to_string(l);
      INFO(name);
      const NpyArray want = c.load(name);
      const auto& got = r.tensors.at(name);
      REQUIRE(got.shape == want.shape);
      const auto w = want.as<float>();
      const std::int64_t heads = want.shape[1], n = want.shape[2], d = want.shape[3];
      std::int64_t mismatched = 0;
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t i = 0; i < n; ++i) {
          const std::int64_t pos = r.keep[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)][static_cast<std::size_t>(i)];
          std::int64_t j = 0;
          while (j < n && official_pos[static_cast<std::size_t>((l * heads + h) * owidth + j)] != pos) ++j;
          if (j == n || std::memcmp(got.data.data() + (h * n + i) * d, w.data() + (h * n + j) * d,
                                    static_cast<std::size_t>(d) * sizeof(float)) != 0)
            ++mismatched;
        }
      CHECK(mismatched == 0);
    }
}

bool have_golden() {
  const fs::path root = kvevict::test::golden_root();
  if (root.empty() || !fs::is_directory(root / "cake")) {
    WARN("SKIPPED: golden vectors not found at '" << root.string() << "' (set KVEVICT_GOLDEN_DIR)");
    return false;
  }
  return true;
}

}  // namespace

TEST_CASE("kvevict CAKE reproduces every cake golden case: keep sets after prefill and each decode token, budgets, "
          "cascade steps, preferences, indicators and K/V rows",
          "[golden][cake]") {
  if (!have_golden()) return;
  const auto cases = kvevict::test::list_cases("cake");
  std::int64_t dirs = 0;
  for (const auto& e : fs::directory_iterator(kvevict::test::golden_root() / "cake"))
    if (e.is_directory()) ++dirs;
  REQUIRE(dirs == 11);
  REQUIRE(static_cast<std::int64_t>(cases.size()) == dirs);
  for (const auto& dir : cases) check_case(dir);
}

TEST_CASE("pooling decode scores along positions instead of the reference's storage order departs from the official "
          "decode steps",
          "[golden][cake]") {
  if (!have_golden()) return;
  std::int64_t decode_cases = 0;
  for (const auto& dir : kvevict::test::list_cases("cake")) {
    const GoldenCase c(dir);
    if (c.params.at("hyperparameters").at("T").get<std::int64_t>() == 0) continue;
    ++decode_cases;
    INFO("case " << c.id());
    const auto rep = kvevict::golden::replay_cake_detailed<Cache>(c, kvevict::CakeDecodeOrder::position);
    const auto want = unpadded_rows(c.load("step_keep_indices")), got = our_rows(rep.result, true);
    REQUIRE(got.size() == want.size());
    const auto per_step = static_cast<std::size_t>(rep.result.num_layers * rep.result.out_heads);
    // Prefill (step 0) does not depend on the order; some later step does.
    CHECK(std::equal(want.begin(), want.begin() + static_cast<std::ptrdiff_t>(per_step), got.begin()));
    CHECK_FALSE(std::equal(want.begin(), want.end(), got.begin()));
  }
  CHECK(decode_cases == 5);
}

TEST_CASE("kvevict-replay's dispatcher serves the cake set and writes the official keep_indices and step_keep_indices",
          "[golden][cake][cli]") {
  if (!have_golden()) return;
  const fs::path out_root = fs::temp_directory_path() / ("kvevict-cake-" + std::to_string(::getpid()));
  std::int64_t replayed = 0;
  for (const auto& dir : kvevict::test::list_cases("cake")) {
    INFO("case " << dir.string());
    const fs::path out = out_root / dir.filename();
    const auto r = kvevict::golden::replay<Cache>(dir, out);  // finds the set through replay_sets()
    CHECK(r.set == "cake");
    const GoldenCase c(dir);
    for (const char* name : {"keep_indices", "step_keep_indices"}) {
      if (!c.has(name)) continue;
      const NpyArray got = kvevict::test::load_npy(out / (std::string(name) + ".npy")), want = c.load(name);
      CHECK(got.dtype == want.dtype);
      CHECK(got.shape == want.shape);
      CHECK(got.as<std::int64_t>() == want.as<std::int64_t>());
    }
    ++replayed;
  }
  std::error_code ec;
  fs::remove_all(out_root, ec);
  CHECK(replayed == 11);
}
