// LazyEviction's scorer: per (layer, kv_head, slot) recurrence state (`last` = step of the last
// importance event, `mri` = maximum recurrence interval) updated from each decode step's attention,
// and the MRI-centric eviction score. The state rows move with compaction as SlotExtra.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/observation.hpp"
#include "kvevict/core/recurrence.hpp"
#include "kvevict/policies/parts/step_probabilities.hpp"
#include "kvevict/policies/parts/topk_eviction_policy.hpp"

namespace kvevict {

struct RecurrenceTracking {
  float alpha = 1e-4f;  // importance threshold on the step's softmax probability, in (0, 1]
  GroupEventRule group_event = GroupEventRule::any;
  bool fp16_compat = false;     // official fp16 storage of last/mri and fp16 score arithmetic
  bool paper_h1 = false;        // H1 without the official "1 +"
  bool protect_prompt = false;  // entries resident at on_prefill are never evicted
  std::int64_t max_protected = 0;  // with protect_prompt: the most entries the prompt may hold (B - W)
  bool trace = false;           // keep the last step's events and the last eviction's inputs (debug)

  void check(const char* where) const {
    if (!(alpha > 0.0f && alpha <= 1.0f))
      detail::fail<ArgumentError>(where, "alpha", alpha, "must be in (0, 1] (an absolute probability threshold)");
  }
};

// Host copies of one (layer, kv_head), in the cache's slot order at the time they were taken.
struct RecurrenceSnapshot {
  std::int64_t step = 0;                // decode step t the data belongs to
  std::vector<std::int32_t> positions;  // [slot] original token positions
  std::vector<float> last;              // [slot]
  std::vector<float> mri;               // [slot]
  std::vector<float> scores;            // [slot] eviction scores (eviction snapshots only)
  std::vector<std::uint8_t> events;     // [slot] importance events of the step (event snapshots only)
};

template <class Cache>
class RecurrenceScorer {
 public:
  using Backend = typename Cache::backend_type;
  using Obs = Observation<typename Cache::value_type, typename Cache::memory_space>;
  // Prefill needs no observation (the official code never tracks prefill attention); decode
  // does, which observe() checks itself.
  static constexpr bool needs_observation = false;

  static_assert(RecurrenceBackend<Backend>,
                "LazyEviction needs the recurrence primitives for this backend: include "
                "kvevict/backends/cpu/recurrence.hpp (or kvevict/kvevict.hpp) for CpuBackend");

  // Allocates every buffer once. Throws ArgumentError for an alpha outside (0, 1].
  RecurrenceScorer(Cache& cache, RecurrenceTracking cfg) : cfg_(cfg) {
    cfg_.check("RecurrenceScorer");
    const auto& s = cache.shape();
    layers_ = s.num_layers;
    kv_heads_ = s.num_kv_heads;
    capacity_ = s.capacity;
    auto& b = cache.backend();
    const std::int64_t rows = layers_ * kv_heads_ * capacity_;
    last_ = b.template allocate<float>(rows);
    mri_ = b.template allocate<float>(rows);
    kv_scores_ = b.template allocate<float>(kv_heads_ * capacity_);
    q_probs_ = b.template allocate<float>(s.num_q_heads * capacity_);
    tracked_len_.assign(static_cast<std::size_t>(layers_ * kv_heads_), 0);
    clock_.assign(static_cast<std::size_t>(layers_), 0);
    prompt_end_.assign(static_cast<std::size_t>(layers_), 0);
    if (cfg_.trace) {
      events_ = b.template allocate<float>(rows);
      const auto n = static_cast<std::size_t>(rows);
      trace_event_pos_.assign(n, 0);
      trace_events_.assign(n, 0.0f);
      trace_event_len_.assign(static_cast<std::size_t>(layers_ * kv_heads_), 0);
      trace_event_step_.assign(static_cast<std::size_t>(layers_), 0);
      snap_pos_.assign(n, 0);
      snap_last_.assign(n, 0.0f);
      snap_mri_.assign(n, 0.0f);
      snap_scores_.assign(n, 0.0f);
      snap_len_.assign(static_cast<std::size_t>(layers_ * kv_heads_), 0);
      snap_step_.assign(static_cast<std::size_t>(layers_), 0);
    }
  }

  [[nodiscard]] const RecurrenceTracking& config() const noexcept { return cfg_; }

  // Prefill: the resident entries start tracking (last = the decode steps completed so far, 0 for
  // a first prompt; mri = 0); nothing is scored. Decode: the clock advances to t, new entries get
  // last = t - 1, and the step's single query row (queries, or the engine's probabilities over
  // every live slot) records importance events. Validates before changing anything.
  void observe(Cache& cache, std::int64_t layer, const Obs& obs, Phase phase) {
    const auto l = static_cast<std::size_t>(layer);
    if (phase == Phase::prefill) {
      if (cfg_.protect_prompt && cache.max_len(layer) > cfg_.max_protected)
        detail::fail<BudgetError>("LazyEviction::on_prefill", "prompt entries", cache.max_len(layer),
                                  "protect_prompt needs the prompt to fit budget - window (" +
                                      std::to_string(cfg_.max_protected) + ")");
      init_fresh(cache, layer);
      if (cfg_.protect_prompt) prompt_end_[l] = cache.next_position(layer);
      return;
    }
    constexpr const char* where = "LazyEviction::on_decode";
    if (obs.empty())
      detail::fail<ArgumentError>(where, "observation", "empty",
                                  "decode steps need the step's query or its attention probabilities");
    if (obs.num_queries != 1)
      detail::fail<ArgumentError>(where, "num_queries", obs.num_queries,
                                  "must be 1: LazyEviction tracks the current step's single query");
    const std::int64_t t = clock_[l] + 1;
    const std::int64_t limit = cfg_.fp16_compat ? kFp16RecurrenceSteps : kExactRecurrenceSteps;
    if (t > limit)
      detail::fail<UnsupportedError>(where, "decode step", t,
                                     cfg_.fp16_compat ? "the fp16-compatible clock overflows fp16 beyond step 65504"
                                                      : "the exact clock is limited to 2^24 decode steps");
    auto v = cache.view(layer);
    auto& b = cache.backend();
    // record_recurrence takes any row stride, so engine rows are read in place.
    const StepProbabilities p = step_probabilities<StepProbsStride::as_given>(b, v, obs, q_probs_.data());
    init_fresh(cache, layer);
    const RecurrenceEventParams params{t, cfg_.alpha, cfg_.group_event, cfg_.fp16_compat};
    float* events = cfg_.trace ? events_.data() + layer * kv_heads_ * capacity_ : nullptr;
    record_recurrence(b, v, p.ptr, p.stride, params, layer_last(layer), layer_mri(layer), events);
    clock_[l] = t;
    if (cfg_.trace) trace_step(cache, layer, t);
  }

  // Eviction scores of one layer at the current step, [kv_head, capacity]; valid until the next
  // call. Entries appended since the last observation are scored as born now.
  [[nodiscard]] float* kv_scores(Cache& cache, std::int64_t layer) {
    init_fresh(cache, layer);
    const RecurrenceScoreParams params{clock_[static_cast<std::size_t>(layer)], cfg_.fp16_compat, cfg_.paper_h1,
                                       cfg_.protect_prompt ? prompt_end_[static_cast<std::size_t>(layer)] : 0};
    recurrence_scores(cache.backend(), cache.view(layer), layer_last(layer), layer_mri(layer), params,
                      kv_scores_.data());
    if (cfg_.trace) trace_eviction(cache, layer);
    return kv_scores_.data();
  }

  // The state rows that move with their entries: [0] = last, [1] = mri, each [kv_head, capacity].
  [[nodiscard]] std::span<const SlotExtra> extras(std::int64_t layer) {
    extras_ = {SlotExtra{layer_last(layer), 1}, SlotExtra{layer_mri(layer), 1}};
    return {extras_.data(), extras_.size()};
  }
  void after_eviction(const Cache& cache, std::int64_t layer) { mark_tracked(cache, layer); }

  [[nodiscard]] std::int64_t state_bytes() const noexcept {
    return (last_.size() + mri_.size() + kv_scores_.size() + q_probs_.size() + events_.size()) *
           static_cast<std::int64_t>(sizeof(float));
  }

  // Decode steps observed by `layer` (the clock t of its last step).
  [[nodiscard]] std::int64_t step(std::int64_t layer) const { return clock_[static_cast<std::size_t>(layer)]; }

  // Host copy of one (layer, kv_head)'s live state in slot order. Allocates (reports, tests).
  [[nodiscard]] RecurrenceSnapshot state(const Cache& cache, std::int64_t layer, std::int64_t kv_head) const {
    RecurrenceSnapshot s;
    s.step = clock_[static_cast<std::size_t>(layer)];
    s.positions = cache.positions(layer, kv_head);
    const auto n = static_cast<std::int64_t>(s.positions.size());
    s.last.resize(s.positions.size());
    s.mri.resize(s.positions.size());
    const std::int64_t off = (layer * kv_heads_ + kv_head) * capacity_;
    cache.backend().copy_to_host(last_.data() + off, s.last.data(), n);
    cache.backend().copy_to_host(mri_.data() + off, s.mri.data(), n);
    return s;
  }

  // With trace: the events of the layer's last observed step, per slot of the cache as it was
  // then (before that step's eviction). Allocates.
  [[nodiscard]] RecurrenceSnapshot last_events(std::int64_t layer, std::int64_t kv_head) const {
    require_trace("last_events");
    RecurrenceSnapshot s;
    const auto i = static_cast<std::size_t>(layer * kv_heads_ + kv_head);
    s.step = trace_event_step_[static_cast<std::size_t>(layer)];
    const auto off = i * static_cast<std::size_t>(capacity_), n = static_cast<std::size_t>(trace_event_len_[i]);
    s.positions.assign(trace_event_pos_.begin() + static_cast<std::ptrdiff_t>(off),
                       trace_event_pos_.begin() + static_cast<std::ptrdiff_t>(off + n));
    s.events.resize(n);
    for (std::size_t j = 0; j < n; ++j) s.events[j] = trace_events_[off + j] != 0.0f ? 1 : 0;
    return s;
  }

  // With trace: positions, state and scores of the layer's last eviction, before it (the inputs
  // of the selection), in that cache's slot order. step == 0 when none happened yet. Allocates.
  [[nodiscard]] RecurrenceSnapshot last_eviction(std::int64_t layer, std::int64_t kv_head) const {
    require_trace("last_eviction");
    RecurrenceSnapshot s;
    const auto i = static_cast<std::size_t>(layer * kv_heads_ + kv_head);
    s.step = snap_step_[static_cast<std::size_t>(layer)];
    const auto off = static_cast<std::ptrdiff_t>(i * static_cast<std::size_t>(capacity_));
    const auto n = static_cast<std::ptrdiff_t>(snap_len_[i]);
    s.positions.assign(snap_pos_.begin() + off, snap_pos_.begin() + off + n);
    s.last.assign(snap_last_.begin() + off, snap_last_.begin() + off + n);
    s.mri.assign(snap_mri_.begin() + off, snap_mri_.begin() + off + n);
    s.scores.assign(snap_scores_.begin() + off, snap_scores_.begin() + off + n);
    return s;
  }

 private:
  float* layer_last(std::int64_t layer) { return last_.data() + layer * kv_heads_ * capacity_; }
  float* layer_mri(std::int64_t layer) { return mri_.data() + layer * kv_heads_ * capacity_; }

  // Entries appended since the layer was last tracked start at last = steps completed so far
  // (t - 1 for the step about to observe them), mri = 0.
  void init_fresh(Cache& cache, std::int64_t layer) {
    const std::int64_t* fresh = tracked_len_.data() + layer * kv_heads_;
    init_recurrence(cache.backend(), cache.view(layer), fresh, clock_[static_cast<std::size_t>(layer)],
                    cfg_.fp16_compat, layer_last(layer), layer_mri(layer));
    mark_tracked(cache, layer);
  }
  void mark_tracked(const Cache& cache, std::int64_t layer) {
    const auto lens = cache.lens(layer);
    for (std::int64_t h = 0; h < kv_heads_; ++h)
      tracked_len_[static_cast<std::size_t>(layer * kv_heads_ + h)] = lens[static_cast<std::size_t>(h)];
  }

  void require_trace(const char* what) const {
    if (!cfg_.trace)
      detail::fail<UnsupportedError>(std::string("RecurrenceScorer::") + what, "trace", "false",
                                     "construct the policy with trace = true to record it");
  }

  void trace_step(Cache& cache, std::int64_t layer, std::int64_t t) {
    auto v = cache.view(layer);
    trace_event_step_[static_cast<std::size_t>(layer)] = t;
    for (std::int64_t h = 0; h < kv_heads_; ++h) {
      const auto i = static_cast<std::size_t>(layer * kv_heads_ + h);
      const std::int64_t n = v.lens[h], off = static_cast<std::int64_t>(i) * capacity_;
      trace_event_len_[i] = n;
      cache.backend().copy_to_host(v.head_positions(h), trace_event_pos_.data() + off, n);
      cache.backend().copy_to_host(events_.data() + off, trace_events_.data() + off, n);
    }
  }
  void trace_eviction(Cache& cache, std::int64_t layer) {
    auto v = cache.view(layer);
    snap_step_[static_cast<std::size_t>(layer)] = clock_[static_cast<std::size_t>(layer)];
    for (std::int64_t h = 0; h < kv_heads_; ++h) {
      const auto i = static_cast<std::size_t>(layer * kv_heads_ + h);
      const std::int64_t n = v.lens[h], off = static_cast<std::int64_t>(i) * capacity_;
      snap_len_[i] = n;
      cache.backend().copy_to_host(v.head_positions(h), snap_pos_.data() + off, n);
      cache.backend().copy_to_host(last_.data() + off, snap_last_.data() + off, n);
      cache.backend().copy_to_host(mri_.data() + off, snap_mri_.data() + off, n);
      cache.backend().copy_to_host(kv_scores_.data() + h * capacity_, snap_scores_.data() + off, n);
    }
  }

  RecurrenceTracking cfg_;
  std::int64_t layers_ = 0, kv_heads_ = 0, capacity_ = 0;
  typename Backend::template Buffer<float> last_;       // [layer, kv_head, capacity] step of the last event
  typename Backend::template Buffer<float> mri_;        // [layer, kv_head, capacity] maximum recurrence interval
  typename Backend::template Buffer<float> kv_scores_;  // [kv_head, capacity] eviction scores (scratch)
  typename Backend::template Buffer<float> q_probs_;    // [q_head, capacity] probabilities from queries
  typename Backend::template Buffer<float> events_;     // [layer, kv_head, capacity] trace only
  std::vector<std::int64_t> tracked_len_;               // [layer, kv_head] host: slots >= this are new
  std::vector<std::int64_t> clock_;                     // [layer] decode steps observed
  std::vector<std::int64_t> prompt_end_;                // [layer] protect_prompt: positions below are kept
  std::array<SlotExtra, 2> extras_{};
  // Trace (host): [layer, kv_head, capacity] rows plus their lengths [layer, kv_head] and steps [layer].
  std::vector<std::int32_t> trace_event_pos_, snap_pos_;
  std::vector<float> trace_events_, snap_last_, snap_mri_, snap_scores_;
  std::vector<std::int64_t> trace_event_len_, snap_len_, trace_event_step_, snap_step_;
};

}  // namespace kvevict
