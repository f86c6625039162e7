// Cross-backend parity of selection and slot movement: select_victims, select_topk (including
// capacity 64k), compact and replace_with_last. Selections must equal the CPU's exactly, under
// heavy ties, signed zeros, protection rules and recency ranking; moves must leave K, V,
// positions and extras bit-identical.
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_support.cuh"

namespace kvevict::cuda_test {
namespace {

enum class ScoreMode { random, ties, all_equal, signed_zeros, none, with_nan };

const char* to_string(ScoreMode m) {
  switch (m) {
    case ScoreMode::random: return "random";
    case ScoreMode::ties: return "ties";
    case ScoreMode::all_equal: return "all_equal";
    case ScoreMode::signed_zeros: return "signed_zeros";
    case ScoreMode::none: return "none (recency)";
    case ScoreMode::with_nan: return "with_nan";
  }
  return "?";
}

// The modes select_topk is defined for (the CPU's top-k order is undefined with NaN).
constexpr ScoreMode kScoreModes[] = {ScoreMode::random, ScoreMode::ties, ScoreMode::all_equal, ScoreMode::signed_zeros,
                                     ScoreMode::none};

// [kv_head, capacity] scores for a mode (empty for ScoreMode::none).
std::vector<float> make_scores(Rng& rng, ScoreMode mode, std::int64_t n) {
  std::vector<float> s;
  if (mode == ScoreMode::none) return s;
  s.resize(static_cast<std::size_t>(n));
  for (auto& x : s) {
    switch (mode) {
      case ScoreMode::random: x = rng.uniform(-3.0f, 3.0f); break;
      case ScoreMode::ties: x = 0.5f * static_cast<float>(rng.uniform_int(0, 6)); break;
      case ScoreMode::all_equal: x = 1.25f; break;
      case ScoreMode::signed_zeros: {
        const auto k = rng.uniform_int(0, 3);
        x = k == 0 ? 0.0f : k == 1 ? -0.0f : k == 2 ? -1.0f : 1.0f;
        break;
      }
      case ScoreMode::with_nan:  // the CPU's scan defines victims around NaN; top-k does not
        x = rng.uniform_int(0, 2) == 0 ? std::numeric_limits<float>::quiet_NaN() : rng.uniform(-3.0f, 3.0f);
        break;
      case ScoreMode::none: break;
    }
  }
  return s;
}

// Protection rules: none, sinks plus a recent window, and everything protected.
std::vector<ProtectRule> make_rules(std::int64_t max_pos) {
  return {ProtectRule{0, INT64_MAX}, ProtectRule{5, std::max<std::int64_t>(6, max_pos - 20)},
          ProtectRule{INT64_MAX, INT64_MAX}};
}

std::int64_t count_protected(const TwinLayer& t, std::int64_t h, const ProtectRule& rule) {
  std::int64_t np = 0;
  for (std::int64_t s = 0; s < t.lens[static_cast<std::size_t>(h)]; ++s)
    np += rule.protects(t.positions[static_cast<std::size_t>(h * t.spec().capacity + s)]) ? 1 : 0;
  return np;
}

TEST_CASE("select_victims on CUDA picks the CPU's victim under every score mode (NaN included) and protection rule",
          "[cuda][parity][select]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    TwinLayer t(c);
    BackendPair b(c.shape());
    for (const ScoreMode mode : {ScoreMode::random, ScoreMode::ties, ScoreMode::all_equal, ScoreMode::signed_zeros,
                                 ScoreMode::none, ScoreMode::with_nan}) {
      for (const ProtectRule& rule : make_rules(t.max_position())) {
        CAPTURE(c, to_string(mode), rule.sink_end, rule.recent_begin);
        const auto scores = make_scores(t.rng(), mode, c.num_kv_heads * c.capacity);
        const auto d_scores = to_device(scores);
        const float* cpu_scores = scores.empty() ? nullptr : scores.data();
        const float* gpu_scores = scores.empty() ? nullptr : d_scores.data();
        std::vector<std::int32_t> victims(static_cast<std::size_t>(c.num_kv_heads), 12345);
        auto d_victims = to_device(victims);
        b.cpu.select_victims(t.cpu_view(), cpu_scores, rule, victims.data());
        b.gpu.select_victims(t.gpu_view(), gpu_scores, rule, d_victims.data());
        require_identical(to_host(d_victims), victims, "select_victims");
      }
    }
  }
}

// Runs select_topk on both backends; both must agree on success or on the BudgetError message.
void check_topk(BackendPair& b, TwinLayer& t, const std::vector<float>& scores, const ProtectRule& rule,
                const std::vector<std::int64_t>& keep_count) {
  const LayerCase& c = t.spec();
  const auto d_scores = to_device(scores);
  const float* cpu_scores = scores.empty() ? nullptr : scores.data();
  const float* gpu_scores = scores.empty() ? nullptr : d_scores.data();
  std::vector<std::int32_t> keep(static_cast<std::size_t>(c.num_kv_heads * c.capacity), -7);
  auto d_keep = to_device(keep);
  std::string cpu_error, gpu_error;
  try {
    b.cpu.select_topk(t.cpu_view(), cpu_scores, rule, keep_count.data(), keep.data());
  } catch (const BudgetError& e) {
    cpu_error = e.what();
  }
  try {
    b.gpu.select_topk(t.gpu_view(), gpu_scores, rule, keep_count.data(), d_keep.data());
  } catch (const BudgetError& e) {
    gpu_error = e.what();
  }
  REQUIRE(gpu_error == cpu_error);
  if (cpu_error.empty()) require_identical(to_host(d_keep), keep, "select_topk keep slots");
}

TEST_CASE("select_topk on CUDA keeps exactly the CPU's slots under ties, protection and every budget",
          "[cuda][parity][select]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    TwinLayer t(c);
    BackendPair b(c.shape());
    for (const ScoreMode mode : kScoreModes) {
      for (const ProtectRule& rule : make_rules(t.max_position())) {
        const auto scores = make_scores(t.rng(), mode, c.num_kv_heads * c.capacity);
        // Budgets per head: exactly the protected ones, one more, random, all, more than all.
        for (int budget_kind = 0; budget_kind < 5; ++budget_kind) {
          std::vector<std::int64_t> keep_count;
          for (std::int64_t h = 0; h < c.num_kv_heads; ++h) {
            const std::int64_t n = t.lens[static_cast<std::size_t>(h)];
            const std::int64_t np = count_protected(t, h, rule);
            const std::int64_t k = budget_kind == 0   ? np
                                   : budget_kind == 1 ? std::min(n, np + 1)
                                   : budget_kind == 2 ? t.rng().uniform_int(np, n)
                                   : budget_kind == 3 ? n
                                                      : n + 5;
            keep_count.push_back(k);
          }
          CAPTURE(c, to_string(mode), rule.sink_end, rule.recent_begin, budget_kind, keep_count);
          check_topk(b, t, scores, rule, keep_count);
        }
      }
    }
  }
}

TEST_CASE("select_topk on CUDA throws the CPU's BudgetError when protected entries exceed the budget",
          "[cuda][parity][select]") {
  if (!device_available()) return;
  const LayerCase c{3, 6, 64, 500, 0, false, 21};
  TwinLayer t(c);
  BackendPair b(c.shape());
  const ProtectRule rule{50, t.max_position() - 50};
  const auto scores = make_scores(t.rng(), ScoreMode::random, c.num_kv_heads * c.capacity);
  std::vector<std::int64_t> keep_count;
  for (std::int64_t h = 0; h < c.num_kv_heads; ++h) keep_count.push_back(count_protected(t, h, rule) - (h == 1 ? 1 : 0));
  REQUIRE(count_protected(t, 1, rule) > 0);
  CAPTURE(keep_count);
  std::string gpu_error;
  try {
    b.gpu.select_topk(t.gpu_view(), to_device(scores).data(), rule, keep_count.data(),
                      b.gpu.allocate<std::int32_t>(c.num_kv_heads * c.capacity).data());
  } catch (const BudgetError& e) {
    gpu_error = e.what();
  }
  REQUIRE_FALSE(gpu_error.empty());
  REQUIRE(gpu_error.find("keep_count[1]") != std::string::npos);
  check_topk(b, t, scores, rule, keep_count);  // and the CPU says the same
}

TEST_CASE("select_topk on CUDA is exact at capacity 65536", "[cuda][parity][select]") {
  if (!device_available()) return;
  LayerCase c{2, 2, 16, 65536, 0, false, 31};
  TwinLayer t(c);
  t.lens[1] = 40000;
  BackendPair b(c.shape());
  for (const ScoreMode mode : kScoreModes) {
    const ProtectRule rule{4, t.max_position() - 1000};
    const auto scores = make_scores(t.rng(), mode, c.num_kv_heads * c.capacity);
    for (const std::int64_t k : {std::int64_t{3000}, std::int64_t{30000}, std::int64_t{65535}}) {
      CAPTURE(to_string(mode), k);
      check_topk(b, t, scores, rule, {k, k});
    }
  }
}

TEST_CASE("compact on CUDA moves K, V, positions and extras exactly like the CPU", "[cuda][parity][move]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    // One extra per GQA group row (H2O's scores), and ten arrays in all (two launch groups).
    for (const auto& extra_rows :
         {std::vector<std::int64_t>{c.group_size()}, std::vector<std::int64_t>{1, 2, 3, 1, 2, 3, 1}}) {
      for (const int plan_kind : {0, 1, 2}) {  // keep half at random, keep all, keep none of some heads
        CAPTURE(c, extra_rows.size(), plan_kind);
        TwinLayer t(c);
        BackendPair b(c.shape());
        TwinExtras extras(t.rng(), c, extra_rows);
        // Plan: ascending keep slots from the CPU's select_topk over random scores.
        const auto scores = make_scores(t.rng(), ScoreMode::random, c.num_kv_heads * c.capacity);
        std::vector<std::int64_t> keep_count;
        for (std::int64_t h = 0; h < c.num_kv_heads; ++h) {
          const std::int64_t n = t.lens[static_cast<std::size_t>(h)];
          keep_count.push_back(plan_kind == 0 ? n / 2 : plan_kind == 1 ? n : (h % 2 == 0 ? 0 : std::max<std::int64_t>(n - 1, 0)));
        }
        std::vector<std::int32_t> keep(static_cast<std::size_t>(c.num_kv_heads * c.capacity), 0);
        b.cpu.select_topk(t.cpu_view(), scores.data(), ProtectRule{}, keep_count.data(), keep.data());
        const auto d_keep = to_device(keep);
        b.cpu.compact(t.cpu_view(), keep.data(), keep_count.data(), extras.cpu);
        b.gpu.compact(t.gpu_view(), d_keep.data(), keep_count.data(), extras.gpu);
        t.require_same_state("compact");
        extras.require_same("compact");
      }
    }
  }
}

TEST_CASE("replace_with_last on CUDA moves the newest slot into the victim exactly like the CPU",
          "[cuda][parity][move]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    if (c.empty_head) continue;  // an empty head has no victim
    CAPTURE(c);
    TwinLayer t(c);
    BackendPair b(c.shape());
    TwinExtras extras(t.rng(), c, {c.group_size(), 1});
    std::vector<std::int32_t> victims;
    for (std::int64_t h = 0; h < c.num_kv_heads; ++h) {
      const std::int64_t n = t.lens[static_cast<std::size_t>(h)];
      victims.push_back(static_cast<std::int32_t>(h == 0 ? n - 1 : t.rng().uniform_int(0, n - 1)));  // head 0: no-op
    }
    const auto d_victims = to_device(victims);
    b.cpu.replace_with_last(t.cpu_view(), victims.data(), extras.cpu);
    b.gpu.replace_with_last(t.gpu_view(), d_victims.data(), extras.gpu);
    t.require_same_state("replace_with_last");
    extras.require_same("replace_with_last");
  }
}

TEST_CASE("replace_with_last on CUDA rejects an invalid victim with ArgumentError and moves nothing",
          "[cuda][parity][move]") {
  if (!device_available()) return;
  const LayerCase c{3, 6, 64, 200, 0, false, 41};
  for (const std::int32_t bad : {-1, 0}) {  // -1, or lens[h] (one past the live slots)
    CAPTURE(bad);
    TwinLayer t(c);
    BackendPair b(c.shape());
    TwinExtras extras(t.rng(), c, {2});
    std::vector<std::int32_t> victims = {0, bad < 0 ? bad : static_cast<std::int32_t>(t.lens[1]), 0};
    const auto d_victims = to_device(victims);
    REQUIRE_THROWS_AS(b.cpu.replace_with_last(t.cpu_view(), victims.data(), extras.cpu), ArgumentError);
    REQUIRE_THROWS_AS(b.gpu.replace_with_last(t.gpu_view(), d_victims.data(), extras.gpu), ArgumentError);
    t.require_same_state("after the rejected replacement");  // neither side moved anything
    extras.require_same("after the rejected replacement");
  }
}

}  // namespace
}  // namespace kvevict::cuda_test
