// The composition every score-and-select policy shares: a Scorer, a Budget, a
// SinkRecentSelector and a Schedule, plus options: position re-indexing (StreamingLLM pos-shift),
// kvpress-style padding of protected scores, and AdaKV-style per-head budgets. Named policies
// (H2O, StreamingLLM, SnapKV, ...) are thin types over it. No virtual calls; no allocation after
// construction.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kvevict/core/backend.hpp"
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

// Which phase an observation belongs to; scorers that buffer decode queries need to know.
enum class Phase { prefill, decode };

// AdaKV-style allocation: a layer's unprotected budget (heads x per-head budget) goes to the
// best entries of the whole layer, each head keeping at least floor_alpha of its share, so
// heads end up with different lengths in memory.
struct HeadAllocation {
  bool adaptive = false;
  double floor_alpha = 0.2;
};

struct EvictionOptions {
  Schedule schedule = Schedule::prefill_and_every_step;
  std::int64_t decode_interval = 1;     // for Schedule::prefill_and_every_n_steps / every_n_decode_steps
  std::optional<RopeSpec> pos_shift{};  // re-index positions inside the cache (StreamingLLM)
  bool pad_protected_scores = false;    // kvpress: protected entries score max + 1, none is forced
  HeadAllocation head_allocation{};
};

template <class Cache, class Scorer, class Budget = UniformBudget>
class TopKEvictionPolicy {
 public:
  using cache_type = Cache;
  using value_type = typename Cache::value_type;
  using Obs = Observation<value_type, typename Cache::memory_space>;

  // Validates the configuration against the cache's shape and allocates all state, once.
  TopKEvictionPolicy(Cache& cache, std::string name, Scorer scorer, Budget budget, SinkRecentSelector selector,
                     EvictionOptions options = {})
      : name_(std::move(name)),
        shape_(cache.shape()),
        scorer_(std::move(scorer)),
        budget_(std::move(budget)),
        selector_(selector),
        options_(std::move(options)),
        pos_shift_(options_.pos_shift) {
    const std::string where = name_ + " (constructor)";
    selector_.check(where.c_str());
    budget_.check(where.c_str(), shape_, options_.pad_protected_scores ? 0 : selector_.protected_entries());
    if (pos_shift_) pos_shift_->check(where.c_str(), shape_.head_dim);
    if ((options_.schedule == Schedule::prefill_and_every_n_steps ||
         options_.schedule == Schedule::every_n_decode_steps) &&
        options_.decode_interval <= 0)
      detail::fail<ArgumentError>(where, "decode_interval", options_.decode_interval, "must be > 0");
    if (!(options_.head_allocation.floor_alpha >= 0.0 && options_.head_allocation.floor_alpha <= 1.0))
      detail::fail<ArgumentError>(where, "head_allocation.floor_alpha", options_.head_allocation.floor_alpha,
                                  "must be in [0, 1]");
    if (pos_shift_ && (options_.head_allocation.adaptive || options_.pad_protected_scores))
      detail::fail<ArgumentError>(where, "pos_shift", "set", "combines only with uniform, protected selections");
    if (!WindowScoringBackend<typename Cache::backend_type> &&
        (options_.head_allocation.adaptive || options_.pad_protected_scores))
      detail::fail<UnsupportedError>(where, "backend", cache.backend().name(),
                                     "pad_protected_scores and adaptive head allocation need a WindowScoringBackend");
    decode_steps_.assign(static_cast<std::size_t>(shape_.num_layers), 0);
    where_prefill_ = name_ + "::on_prefill";
    where_decode_ = name_ + "::on_decode";
    where_attend_ = name_ + "::attend_and_decode";
    keep_slots_ = cache.backend().template allocate<std::int32_t>(shape_.num_kv_heads * shape_.capacity);
    victims_ = cache.backend().template allocate<std::int32_t>(shape_.num_kv_heads);
    keep_count_.assign(static_cast<std::size_t>(shape_.num_kv_heads), 0);
  }

  [[nodiscard]] std::string_view name() const noexcept { return name_; }
  [[nodiscard]] const Budget& budget() const noexcept { return budget_; }
  [[nodiscard]] const SinkRecentSelector& selector() const noexcept { return selector_; }
  [[nodiscard]] Scorer& scorer() noexcept { return scorer_; }

  // After the prompt block of `layer` was appended: score, then compress to the budget.
  void on_prefill(Cache& cache, std::int64_t layer, const Obs& obs) {
    check_call(where_prefill_, cache, layer, obs);
    scorer_.observe(cache, layer, obs, Phase::prefill);
    if (options_.schedule != Schedule::every_n_decode_steps) evict_to(cache, layer, 0);
  }

  // After the step's token was appended (and attended): score, then evict once over budget.
  // One-shot (prefill_only) policies ignore decode observations: an engine may pass whatever it
  // has, or nothing.
  // On a DecodeEvictionBackend, a step that evicts exactly one entry per head is one backend call
  // (scoring, victim choice and replacement fused, validated as a whole).
  void on_decode(Cache& cache, std::int64_t layer, const Obs& obs) {
    const bool evicts_at_decode = options_.schedule != Schedule::prefill_only;
    const bool fused = fuses_decode_step(cache, layer, obs);
    check_call(where_decode_, cache, layer, obs, evicts_at_decode, !(fused && Scorer::needs_observation));
    if (fused) {
      if constexpr (fusing_scorer()) fused_decode_step(cache, layer, obs);
      return;
    }
    auto& steps = decode_steps_[static_cast<std::size_t>(layer)];
    ++steps;
    if (!evicts_at_decode) return;
    scorer_.observe(cache, layer, obs, Phase::decode);
    switch (options_.schedule) {
      case Schedule::prefill_and_every_step: evict_to(cache, layer, 0); break;
      case Schedule::prefill_and_every_n_steps:
      case Schedule::every_n_decode_steps:
        if (steps % options_.decode_interval == 0) evict_to(cache, layer, 0);
        break;
      case Schedule::prefill_only: break;
    }
  }

  // The engine's attention for the step's query, then on_decode with the probabilities it
  // produced, in one call (the step's token already appended): q [q_head, head_dim]; probs
  // [q_head, capacity] receives the probabilities, out [q_head, head_dim] the attention output;
  // scale 0 means 1/sqrt(head_dim). On an AttentionEvictionBackend a single-eviction step is
  // folded into the attention's kernels (CUDA: no launch and no pass over the cache of its own);
  // otherwise this is backend().attend followed by on_decode. Results and errors are theirs.
  void attend_and_decode(Cache& cache, std::int64_t layer, typename Cache::template Span<const value_type> q, float scale,
                         typename Cache::template Span<float> probs, typename Cache::template Span<float> out) {
    check_call(where_attend_, cache, layer, Obs::none(), false, false);
    const std::int64_t rows = shape_.num_q_heads * shape_.head_dim;
    if (q.size != rows)
      detail::fail<ShapeError>(where_attend_, "q.size", q.size, "must equal num_q_heads * head_dim = " + std::to_string(rows));
    if (out.size != rows)
      detail::fail<ShapeError>(where_attend_, "out.size", out.size, "must equal num_q_heads * head_dim = " + std::to_string(rows));
    if (probs.size != shape_.num_q_heads * shape_.capacity)
      detail::fail<ShapeError>(where_attend_, "probs.size", probs.size,
                               "must equal num_q_heads * capacity = " + std::to_string(shape_.num_q_heads * shape_.capacity));
    if (!(scale >= 0.0f) || !std::isfinite(scale))
      detail::fail<ArgumentError>(where_attend_, "scale", scale, "must be finite and >= 0 (0 means 1/sqrt(head_dim))");
    const float s = scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(shape_.head_dim));
    const Obs obs = Obs::from_probs(probs, 1, shape_.capacity);
    if constexpr (AttentionEvictionBackend<typename Cache::backend_type> && fusing_scorer()) {
      // A single-eviction step leaves every head longer than the protected entries (the budget
      // covers them), so each head has a victim while positions are unique.
      if (fuses_decode_step(cache, layer, obs)) {
        fused_decode_step(cache, layer, obs, DecodeAttention{q.ptr, s, probs.ptr, out.ptr});
        return;
      }
    }
    cache.backend().attend(cache.view(layer), q.ptr, s, probs.ptr, out.ptr);
    on_decode(cache, layer, Scorer::needs_observation ? obs : Obs::none());  // recency reads no probabilities
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
    if (!(cache.shape() == shape_)) detail::fail_shape_mismatch(name_ + "::" + hook, shape_, cache.shape());
  }
  // The backend fuses a decode step and the scorer can describe its step as a DecodeEviction.
  static constexpr bool fusing_scorer() {
    return DecodeEvictionBackend<typename Cache::backend_type> &&
           requires(Scorer& s, Cache& c, const Obs& o) {
             s.fuses_decode(o);
             { s.decode_eviction(c, std::int64_t{0}, o) } -> std::same_as<DecodeEviction>;
           };
  }
  // True when this decode step may take the fused path: the backend has it, the scorer can hand
  // its accumulation over, no option needs the step-by-step path, the step's eviction is due and
  // removes exactly one entry from every head. False for a call the checks will reject.
  bool fuses_decode_step(const Cache& cache, std::int64_t layer, const Obs& obs) const {
    if constexpr (fusing_scorer()) {
      if (options_.schedule == Schedule::prefill_only) return false;
      if constexpr (requires { Scorer::needs_position_order; })
        if (Scorer::needs_position_order) return false;
      if (pos_shift_ || options_.pad_protected_scores || options_.head_allocation.adaptive) return false;
      if (!(cache.shape() == shape_) || layer < 0 || layer >= shape_.num_layers) return false;
      if (!scorer_.fuses_decode(obs)) return false;
      const std::int64_t step = decode_steps_[static_cast<std::size_t>(layer)] + 1;
      if (options_.schedule != Schedule::prefill_and_every_step && step % options_.decode_interval != 0) return false;
      const auto lens = cache.lens(layer);
      for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) {
        const std::int64_t len = lens[static_cast<std::size_t>(h)];
        if (len == 0 || budget_.entries(layer, len) != len - 1) return false;
      }
      return true;
    } else {
      return false;
    }
  }

  // A step fuses_decode_step admitted, as one backend call: the scorer's accumulation and the
  // victim choice (DecodeEviction), with the step's attention first when `att` is given.
  template <class... Attention>
  void fused_decode_step(Cache& cache, std::int64_t layer, const Obs& obs, const Attention&... att) {
    DecodeEviction step = scorer_.decode_eviction(cache, layer, obs);
    step.rule = selector_.rule(cache.next_position(layer), 0);
    cache.apply(layer, att..., step, scorer_.extras(layer));
    scorer_.after_eviction(cache, layer);
    ++decode_steps_[static_cast<std::size_t>(layer)];
  }

  // `where` is built once in the constructor: validation runs on every token and must not allocate.
  void check_call(const std::string& where, Cache& cache, std::int64_t layer, const Obs& obs,
                  bool observation_used = true, bool scan_probs = true) {
    if (!(cache.shape() == shape_)) detail::fail_shape_mismatch(where, shape_, cache.shape());
    if (layer < 0 || layer >= shape_.num_layers)
      detail::fail<ArgumentError>(where, "layer", layer, "must be in [0, " + std::to_string(shape_.num_layers) + ")");
    if (cache.max_len(layer) == 0)
      detail::fail<EmptyCacheError>(where, "layer", layer, "has no entries: append before calling the hook");
    detail::check_observation(where.c_str(), cache, layer, obs, observation_used && Scorer::needs_observation, scan_probs);
  }

  void evict_to(Cache& cache, std::int64_t layer, std::int64_t incoming) {
    const auto lens = cache.lens(layer);
    const std::int64_t reserve = std::min(incoming, selector_.recent);
    bool any = false, single = true;
    std::int64_t unprotected_total = 0, unprotected_share = 0;
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) {
      const std::int64_t len = lens[static_cast<std::size_t>(h)];
      const std::int64_t target = budget_.entries(layer, len);
      const std::int64_t keep = len + incoming > target ? std::clamp<std::int64_t>(target - reserve, 0, len) : len;
      keep_count_[static_cast<std::size_t>(h)] = keep;
      any |= keep < len;
      single &= keep == len - 1;
      // Adaptive allocation shares the layer's full budget: a head below its target (heads differ in
      // length after an adaptive eviction) leaves its unused share to the others.
      const std::int64_t share = std::max<std::int64_t>(0, target - reserve - selector_.protected_entries());
      unprotected_total += share;
      unprotected_share = std::max(unprotected_share, share);
    }
    if (!any) return;
    // Scorers that pool over neighbouring slots (SnapKV family) need slots in position order, which
    // only the stable bulk compaction keeps: the single-slot path moves the newest entry into the
    // victim's slot.
    if constexpr (requires { Scorer::needs_position_order; }) single = single && !Scorer::needs_position_order;
    const std::int64_t evicted = lens[0] - keep_count_[0];
    if (pos_shift_)
      for (std::int64_t h = 1; h < shape_.num_kv_heads; ++h)
        if (lens[static_cast<std::size_t>(h)] - keep_count_[static_cast<std::size_t>(h)] != evicted)
          detail::fail_state<UnsupportedError>(name_ + "::evict", "pos-shift needs every kv-head to evict alike");
    ProtectRule rule = selector_.rule(cache.next_position(layer), incoming);
    auto& backend = cache.backend();
    auto view = cache.view(layer);
    float* scores = scorer_.kv_scores(cache, layer);
    // Only a WindowScoringBackend has these two; the constructor rejects the options otherwise, so
    // a plain Backend (e.g. CUDA) still compiles H2O and StreamingLLM.
    if constexpr (WindowScoringBackend<typename Cache::backend_type>) {
      if (options_.pad_protected_scores && scores != nullptr) {
        backend.raise_protected(view, scores, rule);
        rule = ProtectRule{};
      }
      if (options_.head_allocation.adaptive && scores != nullptr) {
        const auto floor = static_cast<std::int64_t>(options_.head_allocation.floor_alpha * static_cast<double>(unprotected_share));
        backend.head_budgets(view, scores, rule, unprotected_total, floor, keep_count_.data());
        single = false;
      }
    }
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
  std::string where_prefill_, where_decode_, where_attend_;  // error-message prefixes, built once
  CacheShape shape_;
  Scorer scorer_;
  Budget budget_;
  SinkRecentSelector selector_;
  EvictionOptions options_;
  std::optional<RopeSpec> pos_shift_;
  std::vector<std::int64_t> decode_steps_;  // [layer] decode hooks seen
  typename Cache::backend_type::template Buffer<std::int32_t> keep_slots_;  // [kv_head, capacity]
  typename Cache::backend_type::template Buffer<std::int32_t> victims_;     // [kv_head]
  std::vector<std::int64_t> keep_count_;                                    // [kv_head], host
};

}  // namespace kvevict
