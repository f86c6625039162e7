// The composition every score-and-select policy shares: a Scorer, a UniformBudget, a
// SinkRecentSelector and a Schedule, plus optional position re-indexing (StreamingLLM pos-shift).
// Named policies (H2O, StreamingLLM) are thin types over it. No virtual calls; no allocation
// after construction.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kvevict/core/error.hpp"
#include "kvevict/core/observation.hpp"
#include "kvevict/core/plan.hpp"
#include "kvevict/core/policy.hpp"
#include "kvevict/core/rope.hpp"
#include "kvevict/policies/parts/budgets.hpp"
#include "kvevict/policies/parts/observation_check.hpp"
#include "kvevict/policies/parts/schedule.hpp"
#include "kvevict/policies/parts/selectors.hpp"

namespace kvevict {

template <class Cache, class Scorer>
class TopKEvictionPolicy {
 public:
  using cache_type = Cache;
  using Obs = Observation<typename Cache::value_type, typename Cache::memory_space>;

  // Validates the configuration against the cache's shape and allocates all state, once.
  TopKEvictionPolicy(Cache& cache, std::string name, Scorer scorer, UniformBudget budget, SinkRecentSelector selector,
                     Schedule schedule, std::optional<RopeSpec> pos_shift)
      : name_(std::move(name)),
        shape_(cache.shape()),
        scorer_(std::move(scorer)),
        budget_(budget),
        selector_(selector),
        schedule_(schedule),
        pos_shift_(pos_shift) {
    const std::string where = name_ + " (constructor)";
    selector_.check(where.c_str());
    budget_.check(where.c_str(), shape_, selector_.protected_entries());
    if (pos_shift_) pos_shift_->check(where.c_str(), shape_.head_dim);
    keep_slots_ = cache.backend().template allocate<std::int32_t>(shape_.num_kv_heads * shape_.capacity);
    victims_ = cache.backend().template allocate<std::int32_t>(shape_.num_kv_heads);
    keep_count_.assign(static_cast<std::size_t>(shape_.num_kv_heads), 0);
  }

  [[nodiscard]] std::string_view name() const noexcept { return name_; }
  [[nodiscard]] const UniformBudget& budget() const noexcept { return budget_; }
  [[nodiscard]] const SinkRecentSelector& selector() const noexcept { return selector_; }
  [[nodiscard]] Scorer& scorer() noexcept { return scorer_; }

  // After the prompt block of `layer` was appended: score, then compress to the budget.
  void on_prefill(Cache& cache, std::int64_t layer, const Obs& obs) {
    check_call("on_prefill", cache, layer, obs);
    scorer_.observe(cache, layer, obs);
    evict_to(cache, layer, 0);
  }

  // After the step's token was appended (and attended): score, then evict once over budget.
  void on_decode(Cache& cache, std::int64_t layer, const Obs& obs) {
    check_call("on_decode", cache, layer, obs);
    scorer_.observe(cache, layer, obs);
    if (schedule_ == Schedule::prefill_and_every_step) evict_to(cache, layer, 0);
  }

  // Makes room for `incoming` tokens before they are appended (StreamingLLM / H2O
  // evict_for_space): keeps budget - min(incoming, recent) entries, the recent window
  // shortened by `incoming`.
  void make_room(Cache& cache, std::int64_t layer, std::int64_t incoming) {
    check_shape("make_room", cache);
    if (incoming < 0) detail::fail<ArgumentError>(name_ + "::make_room", "incoming", incoming, "must be >= 0");
    evict_to(cache, layer, incoming);
  }

  // Position at which the engine must rotate the next token's query and key: its original
  // position, or with pos-shift its rank in the cache.
  [[nodiscard]] std::int64_t rope_position(const Cache& cache, std::int64_t layer) const {
    return pos_shift_ ? cache.len(layer, 0) : cache.next_position(layer);
  }

  [[nodiscard]] MemoryReport report(const Cache& cache) const {
    MemoryReport r;
    r.policy = name_;
    r.entries = cache.entries_kept();
    r.kv_bytes = cache.bytes_kept();
    r.state_bytes = scorer_.state_bytes();
    for (std::int64_t l = 0; l < shape_.num_layers; ++l)
      for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) r.entries_per_head.push_back(cache.len(l, h));
    return r;
  }

 private:
  void check_shape(const char* hook, const Cache& cache) const {
    if (!(cache.shape() == shape_))
      detail::fail_state<ShapeError>(name_ + "::" + hook,
                                     "the cache's shape differs from the one this policy was built for");
  }
  void check_call(const char* hook, Cache& cache, std::int64_t layer, const Obs& obs) {
    const std::string where = name_ + "::" + hook;
    check_shape(hook, cache);
    if (layer < 0 || layer >= shape_.num_layers)
      detail::fail<ArgumentError>(where, "layer", layer, "must be in [0, " + std::to_string(shape_.num_layers) + ")");
    if (cache.max_len(layer) == 0)
      detail::fail<EmptyCacheError>(where, "layer", layer, "has no entries: append before calling the hook");
    detail::check_observation(where.c_str(), cache, layer, obs, Scorer::needs_observation);
  }

  void evict_to(Cache& cache, std::int64_t layer, std::int64_t incoming) {
    const auto lens = cache.lens(layer);
    const std::int64_t reserve = std::min(incoming, selector_.recent);
    bool any = false, single = true;
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) {
      const std::int64_t len = lens[static_cast<std::size_t>(h)];
      const std::int64_t keep = len + incoming > budget_.for_head(layer, h) ? std::min(len, budget_.for_head(layer, h) - reserve) : len;
      keep_count_[static_cast<std::size_t>(h)] = keep;
      any |= keep < len;
      single &= keep == len - 1;
    }
    if (!any) return;
    const std::int64_t evicted = lens[0] - keep_count_[0];
    if (pos_shift_)
      for (std::int64_t h = 1; h < shape_.num_kv_heads; ++h)
        if (lens[static_cast<std::size_t>(h)] - keep_count_[static_cast<std::size_t>(h)] != evicted)
          detail::fail_state<UnsupportedError>(name_ + "::evict", "pos-shift needs every kv-head to evict alike");
    const ProtectRule rule = selector_.rule(cache.next_position(layer), incoming);
    auto& backend = cache.backend();
    auto view = cache.view(layer);
    const float* scores = scorer_.kv_scores(cache, layer);
    if (single) {
      backend.select_victims(view, scores, rule, victims_.data());
      cache.apply(layer, ReplacePlan{victims_.data()}, scorer_.extras(layer));
    } else {
      backend.select_topk(view, scores, rule, keep_count_.data(), keep_slots_.data());
      cache.apply(layer, KeepPlan{keep_slots_.data(), keep_count_.data()}, scorer_.extras(layer));
    }
    // Survivors past the sinks each lose `evicted` ranks: StreamingLLM evicts only the oldest
    // non-sink entries, so every survivor shifts by the same amount.
    if (pos_shift_) backend.rotate_keys(cache.view(layer), selector_.sink, -evicted, *pos_shift_);
    scorer_.after_eviction(cache, layer);
  }

  std::string name_;
  CacheShape shape_;
  Scorer scorer_;
  UniformBudget budget_;
  SinkRecentSelector selector_;
  Schedule schedule_;
  std::optional<RopeSpec> pos_shift_;
  typename Cache::backend_type::template Buffer<std::int32_t> keep_slots_;  // [kv_head, capacity]
  typename Cache::backend_type::template Buffer<std::int32_t> victims_;     // [kv_head]
  std::vector<std::int64_t> keep_count_;                                    // [kv_head], host
};

}  // namespace kvevict
