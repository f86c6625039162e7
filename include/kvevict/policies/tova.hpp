// TOVA: Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs",
// arXiv 2401.06104; official schwartz-lab-NLP/TOVA TOVACache.reduce) and kvpress TOVAPress.
// Spec: shared/specs/tova_knorm_keydiff.md.
//
// Deviations and choices:
// - One score per entry per layer: the mean over all q-heads of the last query's attention;
//   every kv-head keeps the same positions (as the reference).
// - Decode eviction moves the newest entry into the victim's slot (O(head_dim)).
// - Ties rank by (score desc, position asc).
// - TOVAPress pads the last token with max + 1 (kept first) and runs at prefill only.
#pragma once

#include <cstdint>

#include "kvevict/policies/parts/budgets.hpp"
#include "kvevict/policies/parts/layer_attention_scorer.hpp"
#include "kvevict/policies/parts/selectors.hpp"
#include "kvevict/policies/parts/topk_eviction_policy.hpp"

namespace kvevict {

struct TOVAConfig {
  std::int64_t cache_size = 512;  // entries kept per layer (and per kv-head)
  Schedule schedule = Schedule::prefill_and_every_step;
};
struct TOVAPressConfig {
  double compression_ratio = 0.0;
};

template <class Cache, class Budget = UniformBudget>
class TOVA : public TopKEvictionPolicy<Cache, LayerAttentionScorer<Cache>, Budget> {
  using Base = TopKEvictionPolicy<Cache, LayerAttentionScorer<Cache>, Budget>;

 public:
  TOVA(Cache& cache, const TOVAConfig& cfg)
    requires std::same_as<Budget, UniformBudget>
      : Base(cache, "tova", LayerAttentionScorer<Cache>(cache), UniformBudget{cfg.cache_size}, SinkRecentSelector{0, 0},
             EvictionOptions{.schedule = cfg.schedule}) {}

  TOVA(Cache& cache, const TOVAPressConfig& cfg)
    requires std::same_as<Budget, RatioBudget>
      : Base(cache, "tova_press", LayerAttentionScorer<Cache>(cache), RatioBudget{cfg.compression_ratio},
             SinkRecentSelector{0, 1},
             EvictionOptions{.schedule = Schedule::prefill_only, .pad_protected_scores = true}) {}
};

template <class Cache>
using TOVAPress = TOVA<Cache, RatioBudget>;

}  // namespace kvevict
