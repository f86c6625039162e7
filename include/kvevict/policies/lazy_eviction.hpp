// LazyEviction: recurrence-interval tracking with lagged, window-wise eviction (Zhang et al.,
// arXiv 2506.15969, ACL 2026; official code Halo-949/LazyEviction, model/kv_utils.py
// Window_LAZYKVCluster.update_kv_in_decoding + model/temp_cacheobs.py TempCache.record_recurrence).
// Spec: shared/specs/lazyeviction.md. Follows the official code where it and the paper differ.
//
// Every decode step t, per layer and kv-head: entries whose softmax probability for the step's
// query is >= alpha have an importance event (gap = t - last, last = t, mri = max(mri, gap)); new
// entries start at last = t - 1 (0 at t = 1), mri = 0; prompt entries at 0 / 0. Only when the
// layer holds more than `budget` (B) entries and t % window == 0: keep the newest W entries plus
// the best B - W of the rest by I = 2 sigma(-(1 + dt / (mri + 1e-5))) + (mri == 0 ? 0 : 2 sigma(1 - mri)),
// dt = t - last. B includes the prompt and the window; the cache peaks at B + W entries.
//
// Deviations and choices:
// - Exact clock by default: integer timestamps (exact below 2^24 steps) and fp32 scores. The
//   official run stores last/mri in the model's fp16 and rounds timestamps above step 2048;
//   fp16_compat reproduces that (and its fp16 score arithmetic) [named compatibility option].
// - paper_h1 drops the code's "1 +" in H1 (the paper's transcribed form) [named option].
// - protect_prompt never evicts the entries resident at on_prefill (PORT's adaptation; the
//   prompt then must fit B - W, and B still counts it) [named option; the official code protects
//   only the W newest entries].
// - GQA: the official code keeps one token set per query head (K/V repeat_kv-expanded before the
//   cache); that is a cache with one kv-head per q-head. kvevict's default keeps kv-heads and
//   aggregates the group's events: an entry has an event when ANY of its q-heads crosses alpha
//   (GroupEventRule::any; ::mean thresholds the group's mean) [library extension; docs/lazyeviction.md].
// - Ties rank by (score desc, position asc); torch.topk's order among equal scores is unspecified,
//   and ties are common here (every mri = 0 entry scores exactly 0 once silent for a step).
// - Kept entries are stored by stable compaction (the newcomer takes the victim's slot when exactly
//   one entry goes); the official cache is gathered in top-k order. Keep-sets are identical.
// - The step's attention sees the pre-eviction cache: the engine attends, then calls on_decode.
// - Prefill attention is never used and prefill is never compressed (Schedule::every_n_decode_steps).
#pragma once

#include <cstdint>
#include <string>

#include "kvevict/core/error.hpp"
#include "kvevict/core/recurrence.hpp"
#include "kvevict/core/shape.hpp"
#include "kvevict/policies/parts/budgets.hpp"
#include "kvevict/policies/parts/recurrence_scorer.hpp"
#include "kvevict/policies/parts/schedule.hpp"
#include "kvevict/policies/parts/selectors.hpp"
#include "kvevict/policies/parts/topk_eviction_policy.hpp"

namespace kvevict {

struct LazyEvictionConfig {
  std::int64_t budget = 256;  // B = max_kv_capacity: entries per (layer, kv_head) after an eviction
  std::int64_t window = 3;    // W = decoding_recent_size = obs_size: eviction period and newest entries kept
  float alpha = 1e-4f;        // importance threshold (official: 1e-4 Qwen family, 5e-4 R1-Llama-8B)
  GroupEventRule group_event = GroupEventRule::any;
  bool fp16_compat = false;
  bool paper_h1 = false;
  bool protect_prompt = false;
  bool trace = false;  // record each step's events and each eviction's inputs (debugging, parity)
};

template <class Cache>
class LazyEviction : public TopKEvictionPolicy<Cache, RecurrenceScorer<Cache>, UniformBudget> {
  using Base = TopKEvictionPolicy<Cache, RecurrenceScorer<Cache>, UniformBudget>;

 public:
  // Validates the configuration against the cache and allocates all state, once. The cache needs
  // capacity >= budget + window (the peak just before a lagged eviction).
  LazyEviction(Cache& cache, const LazyEvictionConfig& cfg)
      : Base(cache, "lazy_eviction", RecurrenceScorer<Cache>(cache, tracking(checked(cfg, cache.shape()))),
             UniformBudget{cfg.budget}, SinkRecentSelector{0, cfg.window},
             EvictionOptions{.schedule = Schedule::every_n_decode_steps, .decode_interval = cfg.window}),
        cfg_(cfg) {}

  [[nodiscard]] const LazyEvictionConfig& config() const noexcept { return cfg_; }

 private:
  static const LazyEvictionConfig& checked(const LazyEvictionConfig& cfg, const CacheShape& shape) {
    constexpr const char* where = "LazyEviction (constructor)";
    if (cfg.window <= 0) detail::fail<ArgumentError>(where, "window", cfg.window, "must be > 0");
    if (cfg.budget <= cfg.window)
      detail::fail<BudgetError>(
          where, "budget", cfg.budget,
          "must be > window (" + std::to_string(cfg.window) + "): B includes the W newest entries");
    if (!(cfg.alpha > 0.0f && cfg.alpha <= 1.0f))
      detail::fail<ArgumentError>(where, "alpha", cfg.alpha, "must be in (0, 1] (an absolute probability threshold)");
    if (cfg.budget + cfg.window > shape.capacity)
      detail::fail<BudgetError>(where, "budget", cfg.budget,
                                "budget + window (" + std::to_string(cfg.budget + cfg.window) +
                                    ") must fit the cache capacity (" + std::to_string(shape.capacity) +
                                    "): the cache peaks at B + W entries before a lagged eviction");
    return cfg;
  }
  static RecurrenceTracking tracking(const LazyEvictionConfig& cfg) {
    return RecurrenceTracking{cfg.alpha,          cfg.group_event,         cfg.fp16_compat, cfg.paper_h1,
                              cfg.protect_prompt, cfg.budget - cfg.window, cfg.trace};
  }

  LazyEvictionConfig cfg_;
};

}  // namespace kvevict
