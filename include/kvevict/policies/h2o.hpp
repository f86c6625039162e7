// H2O: Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048; official code
// FMInference/H2O, h2o_hf/utils_real_drop/modify_llama.py H2OKVCache_LayerWise).
// Spec: shared/specs/h2o.md.
//
// Deviations and choices:
// - Scores accumulate in fp32 (the original accumulates in the model dtype and can saturate).
// - GQA: the official real-drop code is MHA-only. Here scores accumulate per q-head and are
//   aggregated over each group (mean by default, max, sum) when selecting, so the cache keeps
//   kv-heads [library extension]. Query-head behaviour = a cache with one kv-head per q-head.
// - Decode-time eviction moves the newest entry into the evicted slot (O(head_dim)); the
//   official code re-gathers the whole cache every step. Keep-sets are identical.
// - Ties rank by (score desc, position asc); torch.topk's order is unspecified.
// - KVCache-Factory's one-shot H2OKVCluster (all-query column sums, top C - w plus the window,
//   prefill only) is {heavy = C - w, recent = w, prefill_only} (see kvcache_factory()).
#pragma once

#include <cstdint>

#include "kvevict/policies/parts/scorers.hpp"
#include "kvevict/policies/parts/topk_eviction_policy.hpp"

namespace kvevict {

struct H2OConfig {
  std::int64_t num_heavy = 4;     // hh_size
  std::int64_t num_recent = 512;  // recent_size
  GroupAgg group_agg = GroupAgg::mean;
  Schedule schedule = Schedule::prefill_and_every_step;

  static H2OConfig kvcache_factory(std::int64_t capacity, std::int64_t window, GroupAgg agg = GroupAgg::mean) {
    if (capacity <= window)
      detail::fail<BudgetError>("H2OConfig::kvcache_factory", "capacity", capacity,
                                "must be > window (" + std::to_string(window) + ")");
    return {capacity - window, window, agg, Schedule::prefill_only};
  }
};

template <class Cache>
class H2O : public TopKEvictionPolicy<Cache, AccumulatedAttentionScorer<Cache>> {
  using Base = TopKEvictionPolicy<Cache, AccumulatedAttentionScorer<Cache>>;

 public:
  H2O(Cache& cache, const H2OConfig& cfg)
      : Base(cache, "h2o", AccumulatedAttentionScorer<Cache>(cache, cfg.group_agg),
             UniformBudget{checked_heavy(cfg) + cfg.num_recent}, SinkRecentSelector{0, cfg.num_recent},
             EvictionOptions{.schedule = cfg.schedule}) {}

 private:
  // Checked before the base validates heavy + recent as a budget, so a negative num_heavy is
  // reported as itself rather than as a budget below the recent window.
  static std::int64_t checked_heavy(const H2OConfig& cfg) {
    if (cfg.num_heavy < 0) detail::fail<ArgumentError>("H2O (constructor)", "num_heavy", cfg.num_heavy, "must be >= 0");
    return cfg.num_heavy;
  }
};

}  // namespace kvevict
