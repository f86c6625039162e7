// Attention-free scorers computed from the cached keys alone: Knorm (-||k||) and KeyDiff
// (-cos(k, mean unit key)). They observe nothing; scores are computed when eviction runs.
#pragma once

#include <cstdint>
#include <span>

#include "kvevict/core/layer_view.hpp"
#include "kvevict/policies/parts/topk_eviction_policy.hpp"

namespace kvevict {

enum class KeyScore { norm, diff };

template <class Cache, KeyScore Kind>
class KeyScorer {
 public:
  using Backend = typename Cache::backend_type;
  static constexpr bool needs_observation = false;

  explicit KeyScorer(Cache& cache) {
    const auto& s = cache.shape();
    capacity_ = s.capacity;
    kv_heads_ = s.num_kv_heads;
    scores_ = cache.backend().template allocate<float>(s.num_kv_heads * s.capacity);
  }

  template <class Obs>
  void observe(Cache&, std::int64_t, const Obs&, Phase) {}

  [[nodiscard]] float* kv_scores(Cache& cache, std::int64_t layer) {
    if constexpr (Kind == KeyScore::norm)
      cache.backend().key_norm_scores(cache.view(layer), scores_.data());
    else
      cache.backend().key_diff_scores(cache.view(layer), scores_.data());
    return scores_.data();
  }
  [[nodiscard]] std::span<const SlotExtra> extras(std::int64_t) const { return {}; }
  void after_eviction(const Cache&, std::int64_t) {}
  [[nodiscard]] std::int64_t state_bytes() const noexcept {
    return scores_.size() * static_cast<std::int64_t>(sizeof(float));
  }

 private:
  std::int64_t capacity_ = 0, kv_heads_ = 0;
  typename Backend::template Buffer<float> scores_;  // [kv_head, capacity] scratch
};

}  // namespace kvevict
