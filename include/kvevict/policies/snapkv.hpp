// SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
// arXiv 2404.14469; official FasterDecoding/SnapKV SnapKVCluster.update_kv) and PyramidKV (Cai et
// al., arXiv 2406.02069; official KVCache-Factory PyramidKVCluster), plus their kvpress presses.
// Spec: shared/specs/snapkv_pyramidkv.md.
//
// Deviations and choices:
// - Scores in fp32 (the references cast window attention back to the model dtype).
// - The cache holds kv-heads. Query-head granularity (official SnapKV, KVCache-Factory default)
//   = a cache with one kv-head per q-head; kv_head mode aggregates mean|max|sum before pooling
//   (KVCache-Factory), kvpress after pooling (mean).
// - Kept entries are stored in ascending position order (the references gather in top-k order).
// - Ties rank by (score desc, position asc).
// - Even pooling kernels are rejected (the reference indexes out of range with them).
// - Decode: prefill-only by default, as the paper; Schedule::prefill_and_every_n_steps re-scores
//   with the last `window` decode queries (kept in a ring buffer) every N steps [library option].
// - head_allocation.adaptive gives AdaKV-style per-head budgets (heads of different lengths);
//   the allocation rule is documented on HeadAllocation [reconstruction of AdaKV's idea].
#pragma once

#include <concepts>
#include <cstdint>
#include <string>
#include <vector>

#include "kvevict/policies/parts/budgets.hpp"
#include "kvevict/policies/parts/selectors.hpp"
#include "kvevict/policies/parts/topk_eviction_policy.hpp"
#include "kvevict/policies/parts/window_attention_scorer.hpp"

namespace kvevict {

struct SnapKVConfig {
  std::int64_t capacity = 2048;  // C = max_capacity_prompt, window included
  WindowScoring scoring{};       // window 32, kernel 5, avg pooling, group mean before pooling
  Schedule schedule = Schedule::prefill_only;
  std::int64_t decode_interval = 1;
  HeadAllocation head_allocation{};
};

struct PyramidKVConfig {
  std::int64_t capacity = 2048;  // C, window included; the average per-layer budget
  WindowScoring scoring{};
  std::int64_t beta = 20;
  std::int64_t num_model_layers = 0;         // 0: the cache's num_layers
  std::vector<std::int64_t> layer_ids{};      // cache layer -> model layer index (default identity)
  HeadAllocation head_allocation{};
};

// kvpress SnapKVPress / PyramidKVPress: n_kept from a compression ratio, window padded with
// max + 1 instead of protected, mean over window queries, avg pooling, group mean after pooling.
struct SnapKVPressConfig {
  double compression_ratio = 0.0;
  std::int64_t window = 64;
  std::int64_t kernel = 5;
};
struct PyramidKVPressConfig {
  double compression_ratio = 0.0;
  std::int64_t window = 64;
  std::int64_t kernel = 5;
  double beta = 20.0;
  std::int64_t num_model_layers = 0;
  std::vector<std::int64_t> layer_ids{};
};

template <class Cache, class Budget = UniformBudget>
class SnapKV : public TopKEvictionPolicy<Cache, WindowAttentionScorer<Cache>, Budget> {
  using Base = TopKEvictionPolicy<Cache, WindowAttentionScorer<Cache>, Budget>;

 public:
  // General form: any budget part with the window scorer.
  SnapKV(Cache& cache, std::string name, const WindowScoring& scoring, Budget budget, EvictionOptions options)
      : Base(cache, std::move(name), WindowAttentionScorer<Cache>(cache, scoring), std::move(budget),
             SinkRecentSelector{0, scoring.window}, std::move(options)) {}

  SnapKV(Cache& cache, const SnapKVConfig& cfg)
    requires std::same_as<Budget, UniformBudget>
      : SnapKV(cache, "snapkv", cfg.scoring, UniformBudget{cfg.capacity},
               EvictionOptions{.schedule = cfg.schedule, .decode_interval = cfg.decode_interval,
                               .head_allocation = cfg.head_allocation}) {}

  SnapKV(Cache& cache, const PyramidKVConfig& cfg)
    requires std::same_as<Budget, PyramidBudget>
      : SnapKV(cache, "pyramidkv", cfg.scoring,
               PyramidBudget{cfg.capacity, cfg.scoring.window, cfg.beta,
                             cfg.num_model_layers > 0 ? cfg.num_model_layers : cache.shape().num_layers, cfg.layer_ids},
               EvictionOptions{.schedule = Schedule::prefill_only, .head_allocation = cfg.head_allocation}) {}

  SnapKV(Cache& cache, const SnapKVPressConfig& cfg)
    requires std::same_as<Budget, RatioBudget>
      : SnapKV(cache, "snapkv_press", press_scoring(cfg.window, cfg.kernel), RatioBudget{cfg.compression_ratio},
               EvictionOptions{.schedule = Schedule::prefill_only, .pad_protected_scores = true}) {}

  SnapKV(Cache& cache, const PyramidKVPressConfig& cfg)
    requires std::same_as<Budget, PyramidPressBudget>
      : SnapKV(cache, "pyramidkv_press", press_scoring(cfg.window, cfg.kernel),
               PyramidPressBudget{cfg.compression_ratio, cfg.window, cfg.beta,
                                  cfg.num_model_layers > 0 ? cfg.num_model_layers : cache.shape().num_layers,
                                  cfg.layer_ids},
               EvictionOptions{.schedule = Schedule::prefill_only, .pad_protected_scores = true}) {}

 private:
  static WindowScoring press_scoring(std::int64_t window, std::int64_t kernel) {
    return WindowScoring{window, kernel, PoolKind::avg, GroupAgg::mean, AggregationPoint::after_pool};
  }
};

template <class Cache>
using PyramidKV = SnapKV<Cache, PyramidBudget>;
template <class Cache>
using SnapKVPress = SnapKV<Cache, RatioBudget>;
template <class Cache>
using PyramidKVPress = SnapKV<Cache, PyramidPressBudget>;

}  // namespace kvevict
