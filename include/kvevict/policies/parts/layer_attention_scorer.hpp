// TOVA's scorer: the current query's attention, averaged over every q-head of the layer, one
// score per entry shared by all kv-heads (they keep identical slot maps). Nothing accumulates.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>

#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/observation.hpp"
#include "kvevict/policies/parts/step_probabilities.hpp"
#include "kvevict/policies/parts/topk_eviction_policy.hpp"

namespace kvevict {

template <class Cache>
class LayerAttentionScorer {
 public:
  using Backend = typename Cache::backend_type;
  using Obs = Observation<typename Cache::value_type, typename Cache::memory_space>;
  static constexpr bool needs_observation = true;

  explicit LayerAttentionScorer(Cache& cache) {
    const auto& s = cache.shape();
    capacity_ = s.capacity;
    kv_heads_ = s.num_kv_heads;
    q_probs_ = cache.backend().template allocate<float>(s.num_q_heads * s.capacity);
    kv_scores_ = cache.backend().template allocate<float>(s.num_layers * s.num_kv_heads * s.capacity);
  }

  // Scores from the LAST query only: pass one query (or one probability row per q-head); at
  // prefill that is the prompt's last token, as the reference does.
  void observe(Cache& cache, std::int64_t layer, const Obs& obs, Phase) {
    if (obs.num_queries != 1)
      detail::fail<ArgumentError>("LayerAttentionScorer::observe", "num_queries", obs.num_queries,
                                  "must be 1: TOVA scores with the last query's attention only");
    auto lens = cache.lens(layer);
    for (std::int64_t h = 1; h < kv_heads_; ++h)
      if (lens[static_cast<std::size_t>(h)] != lens[0])
        detail::fail_state<ShapeError>("LayerAttentionScorer::observe", "TOVA needs every kv-head of a layer to hold the same entries");
    auto v = cache.view(layer);
    auto& b = cache.backend();
    // layer_mean reads [q_head, capacity]: engine rows at another stride are repacked.
    const StepProbabilities p = step_probabilities<StepProbsStride::capacity>(b, v, obs, q_probs_.data());
    b.layer_mean(v, p.ptr, layer_kv(layer));
  }

  [[nodiscard]] float* kv_scores(Cache&, std::int64_t layer) { return layer_kv(layer); }
  [[nodiscard]] std::span<const SlotExtra> extras(std::int64_t) const { return {}; }  // rescored every step
  void after_eviction(const Cache&, std::int64_t) {}
  [[nodiscard]] std::int64_t state_bytes() const noexcept {
    return (q_probs_.size() + kv_scores_.size()) * static_cast<std::int64_t>(sizeof(float));
  }

 private:
  float* layer_kv(std::int64_t layer) { return kv_scores_.data() + layer * kv_heads_ * capacity_; }

  std::int64_t capacity_ = 0, kv_heads_ = 0;
  typename Backend::template Buffer<float> q_probs_;    // [q_head, capacity]
  typename Backend::template Buffer<float> kv_scores_;  // [layer, kv_head, capacity]
};

}  // namespace kvevict
