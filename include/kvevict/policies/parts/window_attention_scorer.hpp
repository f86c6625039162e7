// SnapKV-family scorer: attention of an observation window of queries, summed per key, pooled
// over neighbouring tokens and aggregated over each GQA group. Used by SnapKV and PyramidKV.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/observation.hpp"
#include "kvevict/policies/parts/topk_eviction_policy.hpp"

namespace kvevict {

// Where the group aggregation happens relative to pooling (with max pooling they differ):
// KVCache-Factory's kv_head mode reduces before pooling; kvpress and CAKE after.
enum class AggregationPoint { before_pool, after_pool };

struct WindowScoring {
  std::int64_t window = 32;  // w: queries observed, and the newest w entries that are always kept
  std::int64_t kernel = 5;   // pooling kernel, odd; 1 disables pooling
  PoolKind pool = PoolKind::avg;
  GroupAgg group_agg = GroupAgg::mean;
  AggregationPoint aggregation = AggregationPoint::before_pool;

  void check(const char* where) const {
    if (window <= 0) detail::fail<ArgumentError>(where, "window", window, "must be > 0");
    if (kernel <= 0 || kernel % 2 == 0)
      detail::fail<ArgumentError>(where, "kernel", kernel,
                                  "must be odd and > 0 (an even kernel shifts the pooled window off-centre)");
  }
};

// Scores the non-window entries from the window's attention. At prefill the observation holds
// the window queries (or their probabilities). At decode, for policies re-applied every N steps,
// the scorer keeps the last `window` decode queries in a ring buffer and re-scores from them.
// Pooling runs over slots in position order, which bulk compaction preserves; needs_position_order
// keeps TopKEvictionPolicy off its single-slot replacement path.
template <class Cache>
class WindowAttentionScorer {
 public:
  using Backend = typename Cache::backend_type;
  using Obs = Observation<typename Cache::value_type, typename Cache::memory_space>;
  static constexpr bool needs_observation = true;
  // Pooling reads neighbouring slots as neighbouring positions: evictions must compact stably.
  static constexpr bool needs_position_order = true;

  WindowAttentionScorer(Cache& cache, WindowScoring cfg) : cfg_(cfg) {
    cfg_.check("WindowAttentionScorer");
    const auto& s = cache.shape();
    q_heads_ = s.num_q_heads;
    kv_heads_ = s.num_kv_heads;
    capacity_ = s.capacity;
    head_dim_ = s.head_dim;
    auto& b = cache.backend();
    q_scores_ = b.template allocate<float>(q_heads_ * capacity_);
    q_pooled_ = b.template allocate<float>(q_heads_ * capacity_);
    kv_scores_ = b.template allocate<float>(s.num_layers * kv_heads_ * capacity_);
    kv_tmp_ = b.template allocate<float>(kv_heads_ * capacity_);
    ring_ = b.template allocate<float>(s.num_layers * q_heads_ * cfg_.window * head_dim_);
    ring_tmp_ = b.template allocate<float>(q_heads_ * cfg_.window * head_dim_);
    ring_count_.assign(static_cast<std::size_t>(s.num_layers), 0);
    dirty_.assign(static_cast<std::size_t>(s.num_layers), 0);
    span_.assign(static_cast<std::size_t>(kv_heads_), 0);
  }

  [[nodiscard]] const WindowScoring& config() const noexcept { return cfg_; }

  void observe(Cache& cache, std::int64_t layer, const Obs& obs, Phase phase) {
    if (phase == Phase::decode) {
      if (!obs.has_queries())
        detail::fail<UnsupportedError>("WindowAttentionScorer::observe", "observation", "probabilities",
                                       "decode-time re-scoring needs the step's query (it buffers the last window)");
      push_decode_queries(cache, layer, obs);
      dirty_[static_cast<std::size_t>(layer)] = 1;
      return;
    }
    // Every row given is summed: more rows than the window would silently score with earlier
    // queries too (the references read Q[S - w:] only).
    if (obs.num_queries > cfg_.window)
      detail::fail<ArgumentError>("WindowAttentionScorer::observe", "num_queries", obs.num_queries,
                                  "must be <= window (" + std::to_string(cfg_.window) +
                                      "): pass the last window queries (or their probability rows) only");
    auto v = cache.view(layer);
    auto& b = cache.backend();
    if (obs.has_probs()) {
      b.window_column_stats_from_probs(v, obs.probs.ptr, obs.num_queries, obs.probs_stride, q_scores_.data(), nullptr);
    } else {
      const std::int64_t first = obs.first_position >= 0 ? obs.first_position : cache.next_position(layer) - obs.num_queries;
      b.window_column_stats(v, obs.queries.ptr, obs.num_queries, first, scale_of(obs), q_scores_.data(), nullptr);
    }
    reduce_and_pool(cache, layer);
    dirty_[static_cast<std::size_t>(layer)] = 0;
  }

  [[nodiscard]] float* kv_scores(Cache& cache, std::int64_t layer) {
    if (dirty_[static_cast<std::size_t>(layer)] != 0) rescore_from_ring(cache, layer);
    return layer_kv(layer);
  }
  [[nodiscard]] std::span<const SlotExtra> extras(std::int64_t) const { return {}; }
  void after_eviction(const Cache&, std::int64_t) {}
  [[nodiscard]] std::int64_t state_bytes() const noexcept {
    return (q_scores_.size() + q_pooled_.size() + kv_scores_.size() + kv_tmp_.size() + ring_.size() + ring_tmp_.size()) *
           static_cast<std::int64_t>(sizeof(float));
  }

 private:
  float* layer_kv(std::int64_t layer) { return kv_scores_.data() + layer * kv_heads_ * capacity_; }
  float scale_of(const Obs& obs) const {
    return obs.logit_scale(head_dim_);
  }

  // q_scores_ (window sums per q-head) -> layer_kv(layer): aggregate and pool in the reference's order.
  void reduce_and_pool(Cache& cache, std::int64_t layer) {
    auto v = cache.view(layer);
    auto& b = cache.backend();
    for (std::int64_t h = 0; h < kv_heads_; ++h) span_[static_cast<std::size_t>(h)] = std::max<std::int64_t>(0, v.lens[h] - cfg_.window);
    float* out = layer_kv(layer);
    if (cfg_.aggregation == AggregationPoint::before_pool) {
      b.group_reduce(v, q_scores_.data(), kv_tmp_.data(), cfg_.group_agg);
      b.pool_tokens(v, kv_tmp_.data(), out, 1, span_.data(), cfg_.kernel, cfg_.pool);
    } else {
      b.pool_tokens(v, q_scores_.data(), q_pooled_.data(), q_heads_ / kv_heads_, span_.data(), cfg_.kernel, cfg_.pool);
      b.group_reduce(v, q_pooled_.data(), out, cfg_.group_agg);
    }
  }

  // The last `window` decode queries, [q_head, window, head_dim] per layer, oldest first: a full
  // buffer shifts down one row per step (O(window * head_dim), window is small).
  void push_decode_queries(Cache& cache, std::int64_t layer, const Obs& obs) {
    auto& count = ring_count_[static_cast<std::size_t>(layer)];
    const std::int64_t w = cfg_.window, d = head_dim_;
    float* base = ring_.data() + layer * q_heads_ * w * d;
    for (std::int64_t i = 0; i < obs.num_queries; ++i) {
      for (std::int64_t qh = 0; qh < q_heads_; ++qh) {
        float* rows = base + qh * w * d;
        const typename Cache::value_type* src = obs.queries.ptr + (qh * obs.num_queries + i) * d;
        if (count == w) cache.backend().copy_within(rows + d, rows, (w - 1) * d);
        cache.backend().copy_within(src, rows + std::min(count, w - 1) * d, d);
      }
      count = std::min(count + 1, w);
    }
    last_scale_ = scale_of(obs);
  }

  void rescore_from_ring(Cache& cache, std::int64_t layer) {
    const std::int64_t count = ring_count_[static_cast<std::size_t>(layer)];
    const std::int64_t w = cfg_.window, d = head_dim_;
    const float* base = ring_.data() + layer * q_heads_ * w * d;
    auto v = cache.view(layer);
    // The ring holds `count` rows per q-head at stride w*d; the primitive wants [q_head, n, d],
    // which is the same layout when count == w. Before that, score with what is there.
    if (count == w) {
      cache.backend().window_column_stats(v, base, w, cache.next_position(layer) - w, last_scale_, q_scores_.data(), nullptr);
    } else {
      for (std::int64_t qh = 0; qh < q_heads_; ++qh)
        cache.backend().copy_within(base + qh * w * d, ring_tmp_.data() + qh * count * d, count * d);
      cache.backend().window_column_stats(v, ring_tmp_.data(), count, cache.next_position(layer) - count, last_scale_,
                                          q_scores_.data(), nullptr);
    }
    reduce_and_pool(cache, layer);
    dirty_[static_cast<std::size_t>(layer)] = 0;
  }

  WindowScoring cfg_;
  std::int64_t q_heads_ = 0, kv_heads_ = 0, capacity_ = 0, head_dim_ = 0;
  typename Backend::template Buffer<float> q_scores_;   // [q_head, capacity] window sums
  typename Backend::template Buffer<float> q_pooled_;   // [q_head, capacity] scratch
  typename Backend::template Buffer<float> kv_scores_;  // [layer, kv_head, capacity] final scores
  typename Backend::template Buffer<float> kv_tmp_;     // [kv_head, capacity] scratch
  typename Backend::template Buffer<float> ring_;       // [layer, q_head, window, head_dim] decode queries
  typename Backend::template Buffer<float> ring_tmp_;   // [q_head, window, head_dim] packed partial ring
  std::vector<std::int64_t> ring_count_;                // [layer]
  std::vector<std::int64_t> span_;                      // [kv_head] non-window entries (host)
  std::vector<std::uint8_t> dirty_;                     // [layer] decode queries arrived since scoring
  float last_scale_ = 1.0f;
};

}  // namespace kvevict
