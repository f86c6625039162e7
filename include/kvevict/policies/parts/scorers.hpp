// Scorer parts: per-entry importance kept slot-aligned with the cache.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/observation.hpp"
#include "kvevict/core/plan.hpp"

namespace kvevict {

// Scores nothing: selection falls back to recency (StreamingLLM).
template <class Cache>
class NoScorer {
 public:
  explicit NoScorer(Cache& /*cache*/) {}
  static constexpr bool needs_observation = false;
  template <class Obs, class PhaseT>
  void observe(Cache&, std::int64_t, const Obs&, PhaseT) {}
  // A fused decode step (DecodeEviction) without scores: the oldest unprotected entry goes.
  template <class Obs>
  [[nodiscard]] bool fuses_decode(const Obs&) const { return true; }
  template <class Obs>
  [[nodiscard]] DecodeEviction decode_eviction(Cache&, std::int64_t, const Obs&) { return {}; }
  [[nodiscard]] float* kv_scores(Cache&, std::int64_t) { return nullptr; }
  [[nodiscard]] std::span<const SlotExtra> extras(std::int64_t) const { return {}; }
  void after_eviction(const Cache&, std::int64_t) {}
  [[nodiscard]] std::int64_t state_bytes() const noexcept { return 0; }
};

// H2O's accumulated attention: every attention row observed (prefill rows, then one row per
// decode step) adds its probabilities to the entries' running column sums; new entries start
// from their own column sum. State is kept per q-head so that max aggregation over a GQA group
// is taken of accumulated scores (as KVCache-Factory's kv_head mode does), not accumulated maxima.
template <class Cache>
class AccumulatedAttentionScorer {
 public:
  using Backend = typename Cache::backend_type;
  static constexpr bool needs_observation = true;

  AccumulatedAttentionScorer(Cache& cache, GroupAgg agg) : agg_(agg) {
    const auto& s = cache.shape();
    scores_ = cache.backend().template allocate<float>(s.num_layers * s.num_q_heads * s.capacity);
    kv_scores_ = cache.backend().template allocate<float>(s.num_kv_heads * s.capacity);
    scored_len_.assign(static_cast<std::size_t>(s.num_layers * s.num_kv_heads), 0);
    capacity_ = s.capacity;
    q_heads_ = s.num_q_heads;
    kv_heads_ = s.num_kv_heads;
  }

  template <class PhaseT>
  void observe(Cache& cache, std::int64_t layer,
               const Observation<typename Cache::value_type, typename Cache::memory_space>& obs, PhaseT) {
    auto v = cache.view(layer);
    const std::int64_t* fresh = scored_len_.data() + layer * kv_heads_;
    float* s = layer_scores(layer);
    if (obs.has_probs()) {
      cache.backend().accumulate_column_sums(v, obs.probs.ptr, obs.num_queries, obs.probs_stride, s, fresh);
    } else {
      const float scale = obs.logit_scale(v.head_dim);
      const std::int64_t first = obs.first_position >= 0 ? obs.first_position : cache.next_position(layer) - obs.num_queries;
      cache.backend().accumulate_query_column_sums(v, obs.queries.ptr, obs.num_queries, first, scale, s, fresh);
    }
    mark_scored(cache, layer);
  }

  // A decode step fuses with its eviction (DecodeEviction) when it brings one row of probabilities.
  template <class Obs>
  [[nodiscard]] bool fuses_decode(const Obs& obs) const {
    return obs.has_probs() && obs.num_queries == 1;
  }
  // That step's accumulation, for DecodeEviction: the same sums observe() would add.
  template <class Obs>
  [[nodiscard]] DecodeEviction decode_eviction(Cache&, std::int64_t layer, const Obs& obs) {
    DecodeEviction step;
    step.probs = obs.probs.ptr;
    step.probs_stride = obs.probs_stride;
    step.q_scores = layer_scores(layer);
    step.fresh_from = scored_len_.data() + layer * kv_heads_;
    step.agg = agg_;
    return step;
  }

  // Group-aggregated scores of one layer, [kv_head, capacity]; valid until the next call.
  [[nodiscard]] float* kv_scores(Cache& cache, std::int64_t layer) {
    cache.backend().group_reduce(cache.view(layer), layer_scores(layer), kv_scores_.data(), agg_);
    return kv_scores_.data();
  }
  [[nodiscard]] std::span<const SlotExtra> extras(std::int64_t layer) {
    extra_ = SlotExtra{layer_scores(layer), q_heads_ / kv_heads_};
    return {&extra_, 1};
  }
  void after_eviction(const Cache& cache, std::int64_t layer) { mark_scored(cache, layer); }

  // Accumulated per-q-head scores of one layer, [q_head, capacity] (backend memory).
  [[nodiscard]] const float* q_head_scores(std::int64_t layer) const { return scores_.data() + layer * q_heads_ * capacity_; }
  [[nodiscard]] std::int64_t state_bytes() const noexcept {
    return (scores_.size() + kv_scores_.size()) * static_cast<std::int64_t>(sizeof(float));
  }

 private:
  float* layer_scores(std::int64_t layer) { return scores_.data() + layer * q_heads_ * capacity_; }
  void mark_scored(const Cache& cache, std::int64_t layer) {
    auto lens = cache.lens(layer);
    for (std::int64_t h = 0; h < kv_heads_; ++h) scored_len_[static_cast<std::size_t>(layer * kv_heads_ + h)] = lens[static_cast<std::size_t>(h)];
  }

  GroupAgg agg_;
  typename Backend::template Buffer<float> scores_;     // [layer, q_head, capacity]
  typename Backend::template Buffer<float> kv_scores_;  // [kv_head, capacity] scratch
  std::vector<std::int64_t> scored_len_;                // [layer, kv_head]: slots >= this are new
  SlotExtra extra_{};
  std::int64_t capacity_ = 0, q_heads_ = 0, kv_heads_ = 0;
};

}  // namespace kvevict
