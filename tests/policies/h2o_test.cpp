// H2O against ref::H2OReference (the official real-drop rule, with the library's GQA aggregation),
// step by step, plus hand-computed cases for the tie rule, the aggregation and the decode-time
// slot reuse.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <vector>

#include "kvevict/kvevict.hpp"
#include "support/generators.hpp"
#include "support/reference.hpp"

namespace {

using namespace kvevict;
using test::Rng;
using Cache = KVCache<CpuBackend>;
using Obs = Observation<float, HostSpace>;

ref::GroupAgg to_ref(GroupAgg a) {
  switch (a) {
    case GroupAgg::mean: return ref::GroupAgg::mean;
    case GroupAgg::max: return ref::GroupAgg::max;
    case GroupAgg::sum: return ref::GroupAgg::sum;
  }
  return ref::GroupAgg::mean;
}

ref::Positions kept(const Cache& cache, std::int64_t layer, std::int64_t h) {
  const auto p = cache.kept_positions(layer, h);
  return {p.begin(), p.end()};
}

// The library's per-q-head scores of kv-head h, listed in the reference's (ascending position) order.
std::vector<ref::Vec> scores_by_position(const Cache& cache, H2O<Cache>& policy, std::int64_t layer, std::int64_t h,
                                         const ref::Positions& order) {
  const CacheShape& s = cache.shape();
  const std::int64_t g = s.group_size();
  const auto pos = cache.positions(layer, h);
  const float* sc = policy.scorer().q_head_scores(layer);
  std::vector<ref::Vec> out(static_cast<std::size_t>(g));
  for (std::int64_t p : order) {
    const auto slot = std::find(pos.begin(), pos.end(), static_cast<std::int32_t>(p)) - pos.begin();
    for (std::int64_t gi = 0; gi < g; ++gi) out[static_cast<std::size_t>(gi)].push_back(sc[(h * g + gi) * s.capacity + slot]);
  }
  return out;
}

// One kv-head's reference plus the bookkeeping to build slot-aligned library inputs from it.
struct RefHead {
  ref::H2OReference ref;
  std::int64_t next = 0;  // positions appended so far
};

// Drives H2O and one H2OReference per kv-head with the same attention rows. `rows_of` gives, for q-head
// qh, new-query row i and the list of visible positions (reference order), the row's weights.
class H2OHarness {
 public:
  H2OHarness(const CacheShape& shape, const H2OConfig& cfg, std::uint64_t seed)
      : shape_(shape), cfg_(cfg), cache_(shape), policy_(cache_, cfg), seed_(seed) {
    for (std::int64_t h = 0; h < shape.num_kv_heads; ++h)
      refs_.push_back(RefHead{ref::H2OReference(cfg.num_heavy, cfg.num_recent, shape.group_size(), to_ref(cfg.group_agg)), 0});
  }

  Cache& cache() { return cache_; }
  H2O<Cache>& policy() { return policy_; }
  const ref::H2OReference& reference(std::int64_t h) const { return refs_[static_cast<std::size_t>(h)].ref; }

  // Appends n tokens, feeds both sides the probabilities `weights(qh, i, visible)` (causal rows of the
  // n new queries over the reference's slots), and calls on_prefill (n > 1) or on_decode.
  template <class Weights>
  void step_with_probs(std::int64_t n, Weights&& weights) {
    test::append_source(cache_, seed_, 0, n);
    const std::int64_t g = shape_.group_size();
    const std::int64_t stride = cache_.max_len(0) + 1;
    std::vector<float> probs(static_cast<std::size_t>(shape_.num_q_heads * n * stride), 0.0f);
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) {
      RefHead& rh = refs_[static_cast<std::size_t>(h)];
      ref::Positions order = rh.ref.kept_positions();
      for (std::int64_t t = 0; t < n; ++t) order.push_back(rh.next + t);
      const auto pos = cache_.positions(0, h);
      std::vector<ref::Mat> attn(static_cast<std::size_t>(g));
      for (std::int64_t gi = 0; gi < g; ++gi)
        for (std::int64_t i = 0; i < n; ++i) {
          const std::int64_t qpos = rh.next + i;
          std::int64_t visible = 0;
          while (visible < static_cast<std::int64_t>(order.size()) && order[static_cast<std::size_t>(visible)] <= qpos) ++visible;
          ref::Vec row = weights(h * g + gi, i, visible);
          row.resize(order.size(), 0.0);
          attn[static_cast<std::size_t>(gi)].push_back(row);
          float* dst = probs.data() + ((h * g + gi) * n + i) * stride;
          for (std::size_t j = 0; j < order.size(); ++j) {
            const auto slot = std::find(pos.begin(), pos.end(), static_cast<std::int32_t>(order[j])) - pos.begin();
            dst[slot] = static_cast<float>(row[j]);
          }
        }
      rh.ref.update(attn);
      rh.next += n;
    }
    const Obs obs = Obs::from_probs(test::cspan(probs), n, stride);
    if (n > 1)
      policy_.on_prefill(cache_, 0, obs);
    else
      policy_.on_decode(cache_, 0, obs);
  }

  // The same with queries: the reference gets double softmax rows over its own slots.
  void step_with_queries(std::int64_t n, float amplitude) {
    const std::int64_t first = cache_.next_position(0);
    test::append_source(cache_, seed_, 0, n);
    const std::int64_t g = shape_.group_size(), d = shape_.head_dim;
    const auto q = test::source_block(seed_, test::Stream::query, 0, shape_.num_q_heads, first, n, d, amplitude);
    const double scale = 1.0f / std::sqrt(static_cast<float>(d));
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) {
      RefHead& rh = refs_[static_cast<std::size_t>(h)];
      ref::Positions order = rh.ref.kept_positions();
      for (std::int64_t t = 0; t < n; ++t) order.push_back(rh.next + t);
      std::vector<ref::Mat> attn(static_cast<std::size_t>(g));
      for (std::int64_t gi = 0; gi < g; ++gi)
        for (std::int64_t i = 0; i < n; ++i) {
          const float* qi = q.data() + ((h * g + gi) * n + i) * d;
          ref::Vec logits(order.size(), -std::numeric_limits<double>::infinity());
          for (std::size_t j = 0; j < order.size(); ++j) {
            if (order[j] > first + i) continue;
            const auto k = test::source_row(seed_, test::Stream::key, 0, h, order[j], d);
            double dot = 0.0;
            for (std::int64_t c = 0; c < d; ++c) dot += static_cast<double>(qi[c]) * k[static_cast<std::size_t>(c)];
            logits[j] = dot * scale;
          }
          attn[static_cast<std::size_t>(gi)].push_back(ref::softmax_row(logits));
        }
      note_boundary_gap(rh.ref, attn);
      rh.ref.update(attn);
      rh.next += n;
    }
    const Obs obs = Obs::from_queries(test::cspan(q), n);
    if (n > 1)
      policy_.on_prefill(cache_, 0, obs);
    else
      policy_.on_decode(cache_, 0, obs);
  }

  // Smallest relative score gap between the last kept and the first evicted candidate over every
  // eviction the reference decided from fp64 query scores. fp32 scores can only rank differently
  // across a gap far below 1e-5, so a larger gap makes exact keep-set equality a fair requirement.
  [[nodiscard]] double min_boundary_gap() const { return min_gap_; }

  // Keep-sets equal the reference's; scores equal it within `tol` relative (0: bit-exact).
  void require_matches_reference(double tol) {
    cache_.check_invariants();
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) {
      INFO("kv_head " << h);
      const ref::H2OReference& r = reference(h);
      REQUIRE(kept(cache_, 0, h) == r.kept_positions());
      const auto got = scores_by_position(cache_, policy_, 0, h, r.kept_positions());
      for (std::size_t gi = 0; gi < got.size(); ++gi)
        for (std::size_t j = 0; j < got[gi].size(); ++j) {
          const double want = r.head_scores()[gi][j];
          if (tol == 0.0)
            REQUIRE(got[gi][j] == want);
          else
            REQUIRE(std::abs(got[gi][j] - want) <= tol * std::max(1.0, std::abs(want)));
        }
    }
  }

 private:
  void note_boundary_gap(const ref::H2OReference& r, const std::vector<ref::Mat>& attn) {
    const auto old_len = static_cast<std::size_t>(r.len());
    const std::size_t T = old_len + attn[0].size();
    if (static_cast<std::int64_t>(T) <= cfg_.num_heavy + cfg_.num_recent || cfg_.num_heavy == 0) return;
    ref::Vec agg(T, cfg_.group_agg == GroupAgg::max ? -1e300 : 0.0);
    for (std::size_t g = 0; g < attn.size(); ++g)
      for (std::size_t j = 0; j < T; ++j) {
        double sj = j < old_len ? r.head_scores()[g][j] : 0.0;
        for (const ref::Vec& row : attn[g]) sj += row[j];
        agg[j] = cfg_.group_agg == GroupAgg::max ? std::max(agg[j], sj) : agg[j] + sj;
      }
    ref::Vec cand(agg.begin(), agg.end() - cfg_.num_recent);
    std::sort(cand.begin(), cand.end(), std::greater<>());
    const auto k = static_cast<std::size_t>(cfg_.num_heavy);
    if (k >= cand.size()) return;
    min_gap_ = std::min(min_gap_, (cand[k - 1] - cand[k]) / std::max(std::abs(cand[k - 1]), 1e-30));
  }

  CacheShape shape_;
  H2OConfig cfg_;
  double min_gap_ = std::numeric_limits<double>::infinity();
  Cache cache_;
  H2O<Cache> policy_;
  std::uint64_t seed_;
  std::vector<RefHead> refs_;
};

}  // namespace

TEST_CASE("H2O's keep-sets and accumulated scores equal ref::H2OReference after every prefill and decode step, for MHA "
          "and GQA with mean, max and sum aggregation (exact probabilities, ties included)",
          "[policies][h2o]") {
  for (std::uint64_t seed = 1; seed <= 240; ++seed) {
    Rng rng(seed);
    CacheShape shape;
    shape.num_layers = 1;
    shape.num_kv_heads = rng.uniform_int(1, 3);
    shape.num_q_heads = shape.num_kv_heads * (seed <= 60 ? 1 : rng.pick<std::int64_t>({2, 4, 8}));
    shape.head_dim = 4;
    H2OConfig cfg;
    cfg.num_heavy = rng.uniform_int(0, 10);
    cfg.num_recent = rng.uniform_int(cfg.num_heavy == 0 ? 1 : 0, 10);
    cfg.group_agg = rng.pick({GroupAgg::mean, GroupAgg::max, GroupAgg::sum});
    const std::int64_t prefill = rng.uniform_int(1, 30), steps = rng.uniform_int(1, 40);
    const std::int64_t units = rng.pick<std::int64_t>({4, 64, 1024});  // 4: ties everywhere
    shape.capacity = std::max(prefill, cfg.num_heavy + cfg.num_recent + 1);
    INFO("seed " << seed << " " << test::describe(shape) << " heavy " << cfg.num_heavy << " recent " << cfg.num_recent
                 << " agg " << to_string(cfg.group_agg) << " prefill " << prefill << " units " << units);
    H2OHarness run(shape, cfg, seed);
    auto weights = [&](std::int64_t, std::int64_t, std::int64_t visible) {
      return test::dyadic_distribution(rng, visible, units);
    };
    run.step_with_probs(prefill, weights);
    run.require_matches_reference(0.0);
    for (std::int64_t t = 0; t < steps; ++t) {
      INFO("decode step " << t);
      run.step_with_probs(1, weights);
      run.require_matches_reference(0.0);
    }
  }
}

TEST_CASE("H2O fed queries equals ref::H2OReference fed double-precision causal softmax rows, for MHA and GQA",
          "[policies][h2o]") {
  double min_gap = std::numeric_limits<double>::infinity();
  for (std::uint64_t seed = 1; seed <= 24; ++seed) {
    Rng rng(seed);
    CacheShape shape{1, rng.uniform_int(1, 2), 0, rng.pick<std::int64_t>({4, 8, 16}), 0};
    shape.num_q_heads = shape.num_kv_heads * rng.pick<std::int64_t>({1, 2, 4});
    H2OConfig cfg{rng.uniform_int(1, 8), rng.uniform_int(0, 8), rng.pick({GroupAgg::mean, GroupAgg::max, GroupAgg::sum}),
                  Schedule::prefill_and_every_step};
    const std::int64_t prefill = rng.uniform_int(2, 70);  // > 64 queries on some seeds: two tiles
    shape.capacity = std::max(prefill, cfg.num_heavy + cfg.num_recent + 1);
    INFO("seed " << seed << " " << test::describe(shape) << " heavy " << cfg.num_heavy << " recent " << cfg.num_recent
                 << " agg " << to_string(cfg.group_agg) << " prefill " << prefill);
    H2OHarness run(shape, cfg, seed);
    run.step_with_queries(prefill, 3.0f);
    run.require_matches_reference(1e-4);
    for (int t = 0; t < 30; ++t) {
      INFO("decode step " << t);
      run.step_with_queries(1, 3.0f);
      run.require_matches_reference(1e-4);
    }
    min_gap = std::min(min_gap, run.min_boundary_gap());
  }
  // The precondition that makes exact keep-set equality fair (see min_boundary_gap()).
  INFO("smallest relative gap at an eviction boundary: " << min_gap);
  REQUIRE(min_gap > 1e-5);
}

TEST_CASE("H2O prefill of 8 tokens with heavy 3 and recent 2 keeps the 3 largest column sums among positions 0 to 5 plus positions 6 and 7",
          "[policies][h2o]") {
  // The spec's confirmed example. Causal rows chosen so that the column sums over [0, 6) are
  // {1, 2.5, 0.5, 2, 1.5, 0}: positions 1, 3 and 4 are the heavy hitters.
  const CacheShape shape{1, 1, 1, 4, 8};
  H2OHarness run(shape, H2OConfig{3, 2, GroupAgg::mean, Schedule::prefill_and_every_step}, 5);
  const std::vector<ref::Vec> rows{{1},
                                   {0, 1},
                                   {0, 0.5, 0.5},
                                   {0, 0, 0, 1},
                                   {0, 0, 0, 0, 1},
                                   {0, 0.5, 0, 0.5, 0, 0},
                                   {0, 0.5, 0, 0, 0.5, 0, 0},
                                   {0, 0, 0, 0.5, 0, 0, 0, 0.5}};
  run.step_with_probs(8, [&](std::int64_t, std::int64_t i, std::int64_t visible) {
    REQUIRE(static_cast<std::int64_t>(rows[static_cast<std::size_t>(i)].size()) == visible);
    return rows[static_cast<std::size_t>(i)];
  });
  REQUIRE(kept(run.cache(), 0, 0) == ref::Positions{1, 3, 4, 6, 7});
  run.require_matches_reference(0.0);
}

TEST_CASE("H2O accumulates scores while the cache is within budget and evicts nothing", "[policies][h2o]") {
  const CacheShape shape{1, 2, 4, 4, 32};
  H2OHarness run(shape, H2OConfig{10, 10, GroupAgg::sum, Schedule::prefill_and_every_step}, 8);
  Rng rng(8);
  auto weights = [&](std::int64_t, std::int64_t, std::int64_t visible) { return test::dyadic_distribution(rng, visible, 256); };
  run.step_with_probs(12, weights);
  for (int t = 0; t < 8; ++t) run.step_with_probs(1, weights);
  REQUIRE(run.cache().len(0, 0) == 20);
  run.require_matches_reference(0.0);
  // The first entry's score is the sum of its column over all 20 rows seen: positive.
  REQUIRE(run.policy().scorer().q_head_scores(0)[0] > 0.0f);
}

TEST_CASE("H2O ties rank by lower position: with all-zero attention it keeps the oldest candidates and evicts the "
          "newest non-recent entry at each decode step",
          "[policies][h2o]") {
  const CacheShape shape{1, 1, 1, 4, 8};
  H2OHarness run(shape, H2OConfig{3, 2, GroupAgg::mean, Schedule::prefill_and_every_step}, 2);
  auto zeros = [](std::int64_t, std::int64_t, std::int64_t visible) { return ref::Vec(static_cast<std::size_t>(visible), 0.0); };
  run.step_with_probs(8, zeros);
  REQUIRE(kept(run.cache(), 0, 0) == ref::Positions{0, 1, 2, 6, 7});
  run.step_with_probs(1, zeros);  // 8 arrives; candidates {0, 1, 2, 6} tie; 6 (newest) goes
  REQUIRE(kept(run.cache(), 0, 0) == ref::Positions{0, 1, 2, 7, 8});
  run.step_with_probs(1, zeros);
  REQUIRE(kept(run.cache(), 0, 0) == ref::Positions{0, 1, 2, 8, 9});
  run.require_matches_reference(0.0);
}

TEST_CASE("H2O with heavy 0 keeps only the recent window, and with recent 0 every entry competes on score",
          "[policies][h2o]") {
  Rng rng(4);
  auto weights = [&](std::int64_t, std::int64_t, std::int64_t visible) { return test::dyadic_distribution(rng, visible, 64); };
  {
    const CacheShape shape{1, 1, 2, 4, 16};
    H2OHarness run(shape, H2OConfig{0, 5, GroupAgg::max, Schedule::prefill_and_every_step}, 4);
    run.step_with_probs(12, weights);
    REQUIRE(kept(run.cache(), 0, 0) == ref::Positions{7, 8, 9, 10, 11});
    for (int t = 0; t < 4; ++t) run.step_with_probs(1, weights);
    REQUIRE(kept(run.cache(), 0, 0) == ref::Positions{11, 12, 13, 14, 15});
    run.require_matches_reference(0.0);
  }
  {
    const CacheShape shape{1, 1, 1, 4, 16};
    H2OHarness run(shape, H2OConfig{5, 0, GroupAgg::mean, Schedule::prefill_and_every_step}, 4);
    run.step_with_probs(12, weights);
    for (int t = 0; t < 10; ++t) {
      run.step_with_probs(1, weights);
      run.require_matches_reference(0.0);
    }
  }
}

TEST_CASE("H2O's max aggregation is the max over q-heads of accumulated scores, not the accumulation of per-step "
          "maxima",
          "[policies][h2o]") {
  // One kv-head with 2 q-heads; positions 0 (b) and 1 (a) compete for the one heavy slot, 2 is recent.
  //   prefill, query row 1: q-head 0 gives b 3/8 and a 1/4; q-head 1 gives nothing
  //   decode (position 2):  q-head 0 gives nothing;      q-head 1 gives a 1/4
  // Max of accumulated: a max(1/4, 1/4) = 1/4 < b max(3/8, 0) = 3/8 -> keeps b.
  // Accumulated per-step maxima would give a 1/4 + 1/4 = 1/2 > b 3/8 -> would keep a (as would mean and sum).
  const CacheShape shape{1, 1, 2, 4, 8};
  H2OHarness run(shape, H2OConfig{1, 1, GroupAgg::max, Schedule::prefill_and_every_step}, 3);
  run.step_with_probs(2, [](std::int64_t qh, std::int64_t i, std::int64_t visible) {
    ref::Vec row(static_cast<std::size_t>(visible), 0.0);
    if (qh == 0 && i == 1) row = {0.375, 0.25};
    return row;
  });
  REQUIRE(kept(run.cache(), 0, 0) == ref::Positions{0, 1});
  run.step_with_probs(1, [](std::int64_t qh, std::int64_t, std::int64_t visible) {
    ref::Vec row(static_cast<std::size_t>(visible), 0.0);
    if (qh == 1) row[1] = 0.25;
    return row;
  });
  REQUIRE(kept(run.cache(), 0, 0) == ref::Positions{0, 2});
  run.require_matches_reference(0.0);
}

TEST_CASE("H2O's defaults are the official class's (hh_size 4, recent_size 512) with the spec's mean over a GQA "
          "group, which ranks and reports scores as mean does, not as max or sum",
          "[policies][h2o]") {
  const H2OConfig defaults;
  CHECK(defaults.num_heavy == 4);
  CHECK(defaults.num_recent == 512);
  CHECK(defaults.group_agg == GroupAgg::mean);
  CHECK(defaults.schedule == Schedule::prefill_and_every_step);

  // The max-aggregation scenario above with the aggregation left at its default. Accumulated
  // q-head scores after the decode step: b (position 0) {3/8, 0}, a (position 1) {1/4, 1/4}.
  // mean: a 1/4 > b 3/16 keeps a; max would keep b; sum ranks as mean but reports a as 1/2.
  const CacheShape shape{1, 1, 2, 4, 8};
  H2OConfig cfg;
  cfg.num_heavy = 1;
  cfg.num_recent = 1;
  H2OHarness run(shape, cfg, 3);
  run.step_with_probs(2, [](std::int64_t qh, std::int64_t i, std::int64_t visible) {
    ref::Vec row(static_cast<std::size_t>(visible), 0.0);
    if (qh == 0 && i == 1) row = {0.375, 0.25};
    return row;
  });
  run.step_with_probs(1, [](std::int64_t qh, std::int64_t, std::int64_t visible) {
    ref::Vec row(static_cast<std::size_t>(visible), 0.0);
    if (qh == 1) row[1] = 0.25;
    return row;
  });
  REQUIRE(kept(run.cache(), 0, 0) == ref::Positions{1, 2});
  const auto pos = run.cache().positions(0, 0);
  const auto slot_a = std::find(pos.begin(), pos.end(), 1) - pos.begin();
  CHECK(run.policy().scorer().kv_scores(run.cache(), 0)[slot_a] == 0.25f);
}

TEST_CASE("H2O's decode eviction puts the new token into the victim's slot and leaves every other slot in place",
          "[policies][h2o]") {
  const CacheShape shape{1, 2, 2, 4, 9};
  H2OHarness run(shape, H2OConfig{4, 4, GroupAgg::mean, Schedule::prefill_and_every_step}, 6);
  Rng rng(6);
  auto weights = [&](std::int64_t, std::int64_t, std::int64_t visible) { return test::dyadic_distribution(rng, visible, 1024); };
  run.step_with_probs(8, weights);
  for (int t = 0; t < 20; ++t) {
    std::vector<std::vector<std::int32_t>> before;
    for (std::int64_t h = 0; h < 2; ++h) before.push_back(run.cache().positions(0, h));
    run.step_with_probs(1, weights);
    const std::int32_t newest = static_cast<std::int32_t>(run.cache().next_position(0) - 1);
    for (std::int64_t h = 0; h < 2; ++h) {
      const auto after = run.cache().positions(0, h);
      REQUIRE(after.size() == 8);
      std::int64_t changed = 0;
      for (std::size_t j = 0; j < 8; ++j)
        if (after[j] != before[static_cast<std::size_t>(h)][j]) {
          ++changed;
          REQUIRE(after[j] == newest);
        }
      REQUIRE(changed == 1);  // the newest token is recent, so it is never its own victim
    }
    run.require_matches_reference(0.0);
  }
}

TEST_CASE("H2O's KVCache-Factory variant keeps top(C - w) column sums over all prompt queries plus the last w, and "
          "never evicts during decode",
          "[policies][h2o]") {
  for (std::uint64_t seed = 1; seed <= 20; ++seed) {
    Rng rng(seed);
    const std::int64_t C = rng.uniform_int(3, 12), w = rng.uniform_int(1, C - 1), S = rng.uniform_int(1, 30);
    const CacheShape shape{1, 2, 4, 8, std::max(S, C) + 5};
    INFO("seed " << seed << " C " << C << " w " << w << " S " << S);
    Cache cache(shape);
    const auto cfg = H2OConfig::kvcache_factory(C, w, GroupAgg::mean);
    REQUIRE(cfg.schedule == Schedule::prefill_only);
    H2O<Cache> policy(cache, cfg);
    test::append_source(cache, seed, 0, S);
    const auto q = test::source_block(seed, test::Stream::query, 0, 4, 0, S, 8, 2.0f);
    policy.on_prefill(cache, 0, Obs::from_queries(test::cspan(q), S));
    const double scale = 1.0f / std::sqrt(8.0f);
    for (std::int64_t h = 0; h < 2; ++h) {
      ref::Mat keys;
      ref::Positions pos;
      for (std::int64_t p = 0; p < S; ++p) {
        const auto k = test::source_row(seed, test::Stream::key, 0, h, p, 8);
        keys.emplace_back(k.begin(), k.end());
        pos.push_back(p);
      }
      ref::Vec mean(static_cast<std::size_t>(S), 0.0);
      for (std::int64_t gi = 0; gi < 2; ++gi) {
        ref::Mat qm;
        for (std::int64_t i = 0; i < S; ++i)
          qm.emplace_back(q.begin() + ((h * 2 + gi) * S + i) * 8, q.begin() + ((h * 2 + gi) * S + i + 1) * 8);
        const auto cs = ref::column_sums(qm, keys, pos, 0, scale);
        for (std::size_t j = 0; j < cs.size(); ++j) mean[j] += cs[j] / 2.0;
      }
      const auto want = S <= C ? pos : ref::topk_keep(mean, pos, C - w, 0, S - w);
      REQUIRE(kept(cache, 0, h) == want);
    }
    const std::int64_t len = cache.len(0, 0);
    for (int t = 0; t < 4; ++t) {
      test::append_source(cache, seed, 0, 1);
      const auto q1 = test::source_block(seed, test::Stream::query, 0, 4, S + t, 1, 8);
      policy.on_decode(cache, 0, Obs::from_queries(test::cspan(q1), 1));
    }
    REQUIRE(cache.len(0, 0) == len + 4);
    cache.check_invariants();
  }
}

TEST_CASE("H2O keeps layers independent: scoring and evicting one layer leaves another's entries and scores alone",
          "[policies][h2o]") {
  const CacheShape shape{3, 1, 2, 4, 12};
  Cache cache(shape);
  H2O<Cache> policy(cache, H2OConfig{3, 3, GroupAgg::mean, Schedule::prefill_and_every_step});
  for (std::int64_t l = 0; l < 3; ++l) test::append_source(cache, 1, l, 10);
  const auto q = test::source_block(1, test::Stream::query, 0, 2, 0, 10, 4);
  policy.on_prefill(cache, 0, Obs::from_queries(test::cspan(q), 10));
  const std::vector<float> l0(policy.scorer().q_head_scores(0), policy.scorer().q_head_scores(0) + 2 * 12);
  const auto p0 = cache.positions(0, 0);
  policy.on_prefill(cache, 2, Obs::from_queries(test::cspan(q), 10));
  REQUIRE(std::equal(l0.begin(), l0.end(), policy.scorer().q_head_scores(0)));
  REQUIRE(cache.positions(0, 0) == p0);
  REQUIRE(cache.len(1, 0) == 10);
  REQUIRE(cache.len(2, 0) == 6);
  // Layer 1 was never observed: its scores are still the zeros they were allocated with.
  const float* s1 = policy.scorer().q_head_scores(1);
  REQUIRE(std::all_of(s1, s1 + 2 * 12, [](float x) { return x == 0.0f; }));
}

TEST_CASE("H2O reports entries, bytes and its score state per (layer, kv_head)", "[policies][h2o]") {
  const CacheShape shape{2, 2, 8, 4, 16};
  Cache cache(shape);
  H2O<Cache> policy(cache, H2OConfig{3, 2, GroupAgg::sum, Schedule::prefill_and_every_step});
  test::append_source(cache, 1, 0, 10);
  test::append_source(cache, 1, 1, 3);
  const auto q = test::source_block(1, test::Stream::query, 0, 8, 0, 2, 4);
  policy.on_prefill(cache, 0, Obs::from_queries(test::cspan(q), 2));
  policy.on_prefill(cache, 1, Obs::from_queries(test::cspan(q), 2));
  const MemoryReport r = policy.report(cache);
  REQUIRE(r.policy == "h2o");
  REQUIRE(r.entries_per_head == std::vector<std::int64_t>{5, 5, 3, 3});
  REQUIRE(r.entries == 16);
  REQUIRE(r.kv_bytes == 16 * 2 * 4 * static_cast<std::int64_t>(sizeof(float)));
  REQUIRE(r.state_bytes == (2 * 8 * 16 + 2 * 16) * static_cast<std::int64_t>(sizeof(float)));
  STATIC_REQUIRE(EvictionPolicy<H2O<Cache>, Cache>);
}

TEST_CASE("H2O's attend_and_decode equals the backend's attend followed by on_decode, and rejects bad arguments "
          "leaving the cache as it was",
          "[policies][h2o]") {
  const CacheShape shape{2, 2, 8, 16, 48};
  Cache a(shape), b(shape);
  H2O<Cache> pa(a, H2OConfig{12, 20}), pb(b, H2OConfig{12, 20});
  const std::int64_t qn = shape.num_q_heads * shape.head_dim;
  std::vector<float> probs_a(static_cast<std::size_t>(shape.num_q_heads * shape.capacity), 0.0f), probs_b = probs_a;
  std::vector<float> out_a(static_cast<std::size_t>(qn), 0.0f), out_b = out_a;
  auto span = [](std::vector<float>& v) { return HostSpan<float>{v.data(), static_cast<std::int64_t>(v.size())}; };
  for (std::int64_t layer = 0; layer < 2; ++layer) {
    test::append_source(a, 3, layer, 30);
    test::append_source(b, 3, layer, 30);
    const auto q = test::source_block(3, test::Stream::query, layer, shape.num_q_heads, 0, 30, shape.head_dim);
    pa.on_prefill(a, layer, Obs::from_queries(test::cspan(q), 30));
    pb.on_prefill(b, layer, Obs::from_queries(test::cspan(q), 30));
  }
  for (std::int64_t step = 0; step < 25; ++step) {
    for (std::int64_t layer = 0; layer < 2; ++layer) {
      CAPTURE(step, layer);
      test::append_source(a, 3, layer, 1);
      test::append_source(b, 3, layer, 1);
      const auto q = test::source_block(3, test::Stream::query, layer, shape.num_q_heads, a.next_position(layer) - 1, 1,
                                        shape.head_dim);
      const float scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
      a.backend().attend(a.view(layer), q.data(), scale, probs_a.data(), out_a.data());
      pa.on_decode(a, layer, Obs::from_probs(test::cspan(probs_a), 1, shape.capacity));
      pb.attend_and_decode(b, layer, test::cspan(q), 0.0f, span(probs_b), span(out_b));  // 0: 1/sqrt(head_dim)
      REQUIRE(out_b == out_a);
      REQUIRE(probs_b == probs_a);
      for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) {
        REQUIRE(b.len(layer, h) == std::min<std::int64_t>(32, 31 + step));
        REQUIRE(b.positions(layer, h) == a.positions(layer, h));  // the same slots, not only the same set
      }
      const float* sa = pa.scorer().q_head_scores(layer);
      const float* sb = pb.scorer().q_head_scores(layer);
      REQUIRE(std::equal(sa, sa + shape.num_q_heads * shape.capacity, sb));
    }
  }

  // Bad arguments: the typed error names the argument; the cache, the scores and the outputs stay.
  test::append_source(b, 3, 0, 1);
  const auto q = test::source_block(3, test::Stream::query, 0, shape.num_q_heads, b.next_position(0) - 1, 1, shape.head_dim);
  const std::uint64_t before = b.state_hash();
  const std::vector<float> scores_before(pb.scorer().q_head_scores(0), pb.scorer().q_head_scores(0) + shape.num_q_heads * shape.capacity);
  const auto out_before = out_b;
  std::vector<float> short_probs(probs_b.size() - 1), short_out(out_b.size() - 1);
  const std::vector<float> short_q(q.begin(), q.end() - 1);
  test::require_throws_exactly<ShapeError>([&] { pb.attend_and_decode(b, 0, test::cspan(short_q), 0.0f, span(probs_b), span(out_b)); }, "q.size");
  test::require_throws_exactly<ShapeError>([&] { pb.attend_and_decode(b, 0, test::cspan(q), 0.0f, span(short_probs), span(out_b)); }, "probs.size");
  test::require_throws_exactly<ShapeError>([&] { pb.attend_and_decode(b, 0, test::cspan(q), 0.0f, span(probs_b), span(short_out)); }, "out.size");
  for (const float bad : {-1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()})
    test::require_throws_exactly<ArgumentError>([&] { pb.attend_and_decode(b, 0, test::cspan(q), bad, span(probs_b), span(out_b)); }, "scale");
  test::require_throws_exactly<ArgumentError>([&] { pb.attend_and_decode(b, 2, test::cspan(q), 0.0f, span(probs_b), span(out_b)); }, "layer");
  REQUIRE(out_b == out_before);  // the argument errors are raised before the attention runs
  auto nan_q = q;  // a NaN query: attended, then rejected by the step's probability check
  nan_q[5] = std::numeric_limits<float>::quiet_NaN();
  test::require_throws_exactly<NonFiniteError>([&] { pb.attend_and_decode(b, 0, test::cspan(nan_q), 0.0f, span(probs_b), span(out_b)); }, "probs");
  REQUIRE(b.state_hash() == before);
  REQUIRE(std::equal(scores_before.begin(), scores_before.end(), pb.scorer().q_head_scores(0)));
  Cache empty(shape);
  H2O<Cache> pe(empty, H2OConfig{12, 20});
  test::require_throws_exactly<EmptyCacheError>([&] { pe.attend_and_decode(empty, 0, test::cspan(q), 0.0f, span(probs_b), span(out_b)); }, "layer");
  // The valid call still goes through: one entry in, one out.
  pb.attend_and_decode(b, 0, test::cspan(q), 0.0f, span(probs_b), span(out_b));
  for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) REQUIRE(b.len(0, h) == 32);
}

// A CPU backend that offers attend_evict_one as attend + evict_one: it takes the policy's and the
// cache's AttentionEvictionBackend path on the CPU (the CUDA backend's fused kernels have their own
// GPU tests) and counts how often.
struct AttendEvictCpuBackend : CpuBackend {
  std::int64_t fused_calls = 0;
  void attend_evict_one(const LayerView<float>& v, const DecodeAttention& att, const DecodeEviction& step,
                        std::span<const SlotExtra> extras) {
    ++fused_calls;
    if (step.probs != nullptr) {  // a scoring step scores the attention's own probabilities
      REQUIRE(step.probs == att.probs);
      REQUIRE(step.probs_stride == v.capacity);
    }
    attend(v, att.q, att.scale, att.probs, att.out);
    evict_one(v, step, extras);
  }
};
static_assert(AttentionEvictionBackend<AttendEvictCpuBackend>);
static_assert(!AttentionEvictionBackend<CpuBackend>);

TEST_CASE("H2O's attend_and_decode on an AttentionEvictionBackend takes KVCache::apply(DecodeAttention, DecodeEviction) "
          "once full, with the results of attend + on_decode; that apply rejects bad arguments changing nothing",
          "[policies][h2o]") {
  using FusedCache = KVCache<AttendEvictCpuBackend>;
  const CacheShape shape{1, 2, 8, 16, 40};
  Cache a(shape);
  FusedCache b(shape);
  H2O<Cache> pa(a, H2OConfig{10, 20, GroupAgg::max});
  H2O<FusedCache> pb(b, H2OConfig{10, 20, GroupAgg::max});
  std::vector<float> probs_a(static_cast<std::size_t>(shape.num_q_heads * shape.capacity), 0.0f), probs_b = probs_a;
  std::vector<float> out_a(static_cast<std::size_t>(shape.num_q_heads * shape.head_dim), 0.0f), out_b = out_a;
  auto span = [](std::vector<float>& v) { return HostSpan<float>{v.data(), static_cast<std::int64_t>(v.size())}; };
  test::append_source(a, 4, 0, 25);
  test::append_source(b, 4, 0, 25);
  for (std::int64_t step = 0; step < 30; ++step) {
    CAPTURE(step);
    test::append_source(a, 4, 0, 1);
    test::append_source(b, 4, 0, 1);
    const auto q = test::source_block(4, test::Stream::query, 0, shape.num_q_heads, a.next_position(0) - 1, 1, shape.head_dim);
    a.backend().attend(a.view(0), q.data(), 0.25f, probs_a.data(), out_a.data());
    pa.on_decode(a, 0, Obs::from_probs(test::cspan(probs_a), 1, shape.capacity));
    pb.attend_and_decode(b, 0, test::cspan(q), 0.25f, span(probs_b), span(out_b));
    REQUIRE(out_b == out_a);
    for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) REQUIRE(b.positions(0, h) == a.positions(0, h));
    const float* sa = pa.scorer().q_head_scores(0);
    REQUIRE(std::equal(sa, sa + shape.num_q_heads * shape.capacity, pb.scorer().q_head_scores(0)));
  }
  REQUIRE(b.backend().fused_calls == 25);  // every step from the sixth on: 25 + 5 tokens fill the budget of 30

  // A NaN query: the fused call rejects the step, nothing changes, the next valid step proceeds.
  test::append_source(b, 4, 0, 1);
  const std::uint64_t before = b.state_hash();
  const std::vector<float> scores_before(pb.scorer().q_head_scores(0), pb.scorer().q_head_scores(0) + shape.num_q_heads * shape.capacity);
  auto q = test::source_block(4, test::Stream::query, 0, shape.num_q_heads, b.next_position(0) - 1, 1, shape.head_dim);
  auto nan_q = q;
  nan_q[11] = std::numeric_limits<float>::quiet_NaN();
  test::require_throws_exactly<NonFiniteError>([&] { pb.attend_and_decode(b, 0, test::cspan(nan_q), 0.0f, span(probs_b), span(out_b)); }, "probs");
  REQUIRE(b.state_hash() == before);
  REQUIRE(std::equal(scores_before.begin(), scores_before.end(), pb.scorer().q_head_scores(0)));

  // KVCache::apply(DecodeAttention, DecodeEviction) itself: each bad argument is named, nothing changes.
  DecodeEviction recency;  // no scores: the oldest unprotected entry goes
  recency.rule = ProtectRule{0, b.next_position(0) - 4};
  const DecodeAttention good{q.data(), 0.25f, probs_b.data(), out_b.data()};
  DecodeAttention no_q = good, no_probs = good, no_out = good, zero_scale = good, nan_scale = good;
  no_q.q = nullptr;
  no_probs.probs = nullptr;
  no_out.out = nullptr;
  zero_scale.scale = 0.0f;
  nan_scale.scale = std::numeric_limits<float>::quiet_NaN();
  const std::int64_t calls = b.backend().fused_calls;
  test::require_throws_exactly<ArgumentError>([&] { b.apply(0, no_q, recency); }, "att.q");
  test::require_throws_exactly<ArgumentError>([&] { b.apply(0, no_probs, recency); }, "att.probs");
  test::require_throws_exactly<ArgumentError>([&] { b.apply(0, no_out, recency); }, "att.out");
  test::require_throws_exactly<ArgumentError>([&] { b.apply(0, zero_scale, recency); }, "att.scale");
  test::require_throws_exactly<ArgumentError>([&] { b.apply(0, nan_scale, recency); }, "att.scale");
  test::require_throws_exactly<ArgumentError>([&] { b.apply(1, good, recency); }, "layer");
  REQUIRE(b.backend().fused_calls == calls);  // rejected before the backend was called
  REQUIRE(b.state_hash() == before);
  b.apply(0, good, recency);  // the valid call: one entry fewer per head
  for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) REQUIRE(b.len(0, h) == 30);
  FusedCache empty(shape);
  test::require_throws_exactly<EmptyCacheError>([&] { empty.apply(0, good, recency); }, "kv_head");
}
