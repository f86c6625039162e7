// Knorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
// Compression", arXiv 2406.11430) and KeyDiff (Park et al., arXiv 2504.15364), as kvpress's
// KnormPress / KeyDiffPress compute them. Spec: shared/specs/tova_knorm_keydiff.md.
//
// Deviations and choices:
// - Beyond the presses (prefill, n_kept from a ratio, nothing protected), both run with an
//   absolute budget, optional sinks/recent window and decode-time eviction [library option].
// - KeyDiff's block-wise paper variant (kvpress BlockPress) is not implemented.
// - Ties rank by (score desc, position asc).
#pragma once

#include <cstdint>
#include <string>

#include "kvevict/policies/parts/budgets.hpp"
#include "kvevict/policies/parts/key_scorers.hpp"
#include "kvevict/policies/parts/selectors.hpp"
#include "kvevict/policies/parts/topk_eviction_policy.hpp"

namespace kvevict {

struct KeyScoreConfig {
  std::int64_t budget = 512;  // entries per kv-head, sinks and recent included
  std::int64_t num_sink = 0;
  std::int64_t num_recent = 0;
  Schedule schedule = Schedule::prefill_and_every_step;
};
struct KeyScorePressConfig {
  double compression_ratio = 0.0;
};

template <class Cache, KeyScore Kind, class Budget = UniformBudget>
class KeyScorePolicy : public TopKEvictionPolicy<Cache, KeyScorer<Cache, Kind>, Budget> {
  using Base = TopKEvictionPolicy<Cache, KeyScorer<Cache, Kind>, Budget>;
  static constexpr const char* kName = Kind == KeyScore::norm ? "knorm" : "keydiff";

 public:
  KeyScorePolicy(Cache& cache, const KeyScoreConfig& cfg)
    requires std::same_as<Budget, UniformBudget>
      : Base(cache, kName, KeyScorer<Cache, Kind>(cache), UniformBudget{cfg.budget},
             SinkRecentSelector{cfg.num_sink, cfg.num_recent}, EvictionOptions{.schedule = cfg.schedule}) {}

  KeyScorePolicy(Cache& cache, const KeyScorePressConfig& cfg)
    requires std::same_as<Budget, RatioBudget>
      : Base(cache, std::string(kName) + "_press", KeyScorer<Cache, Kind>(cache), RatioBudget{cfg.compression_ratio},
             SinkRecentSelector{0, 0}, EvictionOptions{.schedule = Schedule::prefill_only}) {}
};

template <class Cache>
using Knorm = KeyScorePolicy<Cache, KeyScore::norm>;
template <class Cache>
using KeyDiff = KeyScorePolicy<Cache, KeyScore::diff>;
template <class Cache>
using KnormPress = KeyScorePolicy<Cache, KeyScore::norm, RatioBudget>;
template <class Cache>
using KeyDiffPress = KeyScorePolicy<Cache, KeyScore::diff, RatioBudget>;

}  // namespace kvevict
