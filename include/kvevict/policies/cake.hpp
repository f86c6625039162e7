// CAKE (Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences",
// ICLR 2025, arXiv 2503.12491; official antgroup/cakekv@c4675ce: cake/model/modify_llama.py
// llama_attn_forward_cake, cake/cake_cache.py, cake/utils.py adjust_budgets). Spec:
// shared/specs/cake.md. Layer preferences P_l = H_l^(1/tau1) * V_l^(1/tau2) (entropy and variance
// of the observation window's attention) split a total budget (cache_size - w) * layers across
// layers (parts/layer_budgets.hpp); entries rank by mean + gamma * variance of the window's
// attention, avg-pooled, group-meaned; with cascading every prefilled layer is re-evicted after
// each layer, so memory never exceeds the total. Decode evicts by the current query's attention.
//
// Deviations and choices:
// - Ties rank by (score desc, position asc); the reference's torch.topk picks among ties arbitrarily.
// - Bulk compaction is stable, so kept entries stay in slot order. The reference's storage order
//   (top-k order, then the window, then decoded tokens) matters only to its decode-time pooling,
//   which runs along that order: it is tracked as a per-entry rank, and CakeDecodeOrder::reference
//   (default) pools along it, reproducing the reference exactly; CakeDecodeOrder::position pools
//   along positions, as the paper's pooling of neighbouring tokens intends [library option].
// - Budget shares: the ratio P_k / sum(P) in fp32 (the reference's numpy float32 scalars), times
//   the total in fp64, truncated. Entropy and variance sums accumulate in fp64 (the reference's
//   torch sums are fp32); both end as fp32 values.
// - Cascading is the default: the paper's method and the reference README's runs
//   (--cascading); the reference script's flag itself defaults to off (cascading = false here).
// - Library extensions: probability observations at prefill (the window's rows) and decode (the
//   step's row); decoding with no prefill at all (an engine feeding every token as a decode step)
//   keeps the initial budgets cache_size - w for every layer; a prompt of at most `window` tokens
//   gets preference 0 and is not scored (the reference fails on shorter prompts); the pooling
//   kernel is a parameter (hard-coded 5 in the reference).
// - Restrictions: prefill once per layer, in layer order, on the whole unevicted prompt (no
//   chunked prefill), every layer with the same prompt length; decode one query per step, after
//   every layer was prefilled (or none).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvevict/core/cake_backend.hpp"
#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/observation.hpp"
#include "kvevict/core/plan.hpp"
#include "kvevict/core/policy.hpp"
#include "kvevict/core/shape.hpp"
#include "kvevict/policies/parts/layer_budgets.hpp"
#include "kvevict/policies/parts/observation_check.hpp"

namespace kvevict {

// Preference temperatures: P = H^(1/tau1) * V^(1/tau2).
struct CakeTau {
  double tau1 = 1.0;
  double tau2 = 1.0;
};

// The reference's published temperatures (experiments/LongBench/config/model2tau.json), keyed by
// the model names of its scripts and the cache_size they were tuned for.
struct CakeTauEntry {
  std::string_view model;
  std::int64_t cache_size;
  CakeTau tau;
};
inline constexpr std::array<CakeTauEntry, 10> kCakePublishedTau{{
    {"llama3.1-8b-128k", 1024, {1.6, 0.4}},
    {"llama3.1-8b-128k", 128, {1.6, 0.6}},
    {"llama2-7b-chat-4k", 1024, {1.9, 1.8}},
    {"llama2-7b-chat-4k", 128, {0.9, 2.3}},
    {"llama2-13b-chat-4k", 1024, {0.5, 0.4}},
    {"llama2-13b-chat-4k", 128, {1.8, 2.0}},
    {"mistral-0.3-7b-32k", 1024, {0.8, 0.5}},
    {"mistral-0.3-7b-32k", 128, {1.0, 0.8}},
    {"qwen2.5-7b-instruct", 1024, {1.5, 0.6}},
    {"qwen2.5-7b-instruct", 128, {0.4, 0.6}},
}};

// The published (tau1, tau2) of `model` at `cache_size`, if the table has them.
constexpr std::optional<CakeTau> find_cake_tau(std::string_view model, std::int64_t cache_size) noexcept {
  for (const auto& e : kCakePublishedTau)
    if (e.model == model && e.cache_size == cache_size) return e.tau;
  return std::nullopt;
}
// As the reference's pred_cake.py: the published pair, else (1.0, 1.0).
constexpr CakeTau cake_tau(std::string_view model, std::int64_t cache_size) noexcept {
  return find_cake_tau(model, cache_size).value_or(CakeTau{});
}

// The order CAKE's decode-time pooling runs along (see the file header).
enum class CakeDecodeOrder { reference, position };

struct CAKEConfig {
  std::int64_t cache_size = 1024;  // per-layer capacity including the window; total = (cache_size - window) * layers
  std::int64_t window = 32;        // w: observation queries, and the newest w entries always kept (>= 2)
  double gamma = 200.0;            // weight of the variance in the eviction indicator (>= 0)
  CakeTau tau{};                   // cake_tau(model, cache_size) gives the published pairs
  bool cascading = true;           // re-allocate and re-evict after every prefilled layer
  std::int64_t kernel = 5;         // average-pooling kernel over tokens (odd)
  CakeDecodeOrder decode_order = CakeDecodeOrder::reference;
};

// The cache capacity CAKE needs for a prompt of `prompt_len` tokens: the whole prompt at prefill,
// and one free slot at decode (a layer keeps at most max(prompt_len, cache_size) entries).
constexpr std::int64_t cake_capacity(const CAKEConfig& cfg, std::int64_t prompt_len) noexcept {
  return std::max(prompt_len, cfg.cache_size) + 1;
}

template <class Cache>
class CAKE {
 public:
  using cache_type = Cache;
  using Backend = typename Cache::backend_type;
  using Obs = Observation<typename Cache::value_type, typename Cache::memory_space>;
  static_assert(CakeScoringBackend<Backend>,
                "CAKE needs the CAKE primitives of its backend: include kvevict/kvevict.hpp (CPU) or "
                "kvevict/backends/cuda/cake_primitives.cuh (CUDA) before instantiating CAKE");

  // Validates the configuration against the cache and allocates all state, once.
  CAKE(Cache& cache, const CAKEConfig& cfg)
      : cfg_(checked(cache.shape(), cfg)),
        shape_(cache.shape()),
        budgets_(shape_.num_layers, cfg.cache_size - cfg.window, ProportionalAllocation{},
                 cfg.cascading ? LayerSchedule::cascading : LayerSchedule::after_last_layer, "CAKE (constructor)"),
        inv_tau1_(static_cast<float>(1.0 / cfg.tau.tau1)),
        inv_tau2_(static_cast<float>(1.0 / cfg.tau.tau2)) {
    auto& b = cache.backend();
    const std::int64_t per_layer = shape_.num_kv_heads * shape_.capacity;
    scores_ = b.template allocate<float>(shape_.num_layers * per_layer);
    order_ = b.template allocate<float>(shape_.num_layers * per_layer);
    rows_ = b.template allocate<float>(shape_.num_q_heads * shape_.capacity);
    const CakeWorkspaceSize ws = cake_workspace_size(shape_, cfg_.window);
    ws_rows_ = b.template allocate<float>(ws.rows);
    ws_terms_ = b.template allocate<float>(ws.terms);
    ws_slots_ = b.template allocate<std::int32_t>(ws.slots);
    keep_slots_ = b.template allocate<std::int32_t>(per_layer);
    victims_ = b.template allocate<std::int32_t>(shape_.num_kv_heads);
    keep_count_.assign(static_cast<std::size_t>(shape_.num_kv_heads), 0);
    fresh_from_.assign(static_cast<std::size_t>(shape_.num_layers), 0);
    allocation_.assign(static_cast<std::size_t>(shape_.num_layers), 0);
    last_allocation_.reserve(static_cast<std::size_t>(shape_.num_layers));
  }

  [[nodiscard]] std::string_view name() const noexcept { return "cake"; }
  [[nodiscard]] const CAKEConfig& config() const noexcept { return cfg_; }

  // Per-sequence state, read-only. Budgets count non-window entries per kv-head.
  [[nodiscard]] std::int64_t num_prefilled() const noexcept { return budgets_.num_seen(); }
  [[nodiscard]] std::span<const float> preferences() const noexcept { return budgets_.weights(); }
  [[nodiscard]] std::span<const std::int64_t> layer_budgets() const noexcept { return budgets_.budgets(); }
  [[nodiscard]] std::int64_t total_budget() const noexcept { return budgets_.total(); }
  // The last allocation as adjust_budgets returned it (before the prompt - window cap), one entry
  // per layer it covered, and how many allocations this sequence ran (one per cascade step).
  [[nodiscard]] std::span<const std::int64_t> last_allocation() const noexcept { return last_allocation_; }
  [[nodiscard]] std::int64_t num_allocations() const noexcept { return num_allocations_; }
  // Eviction indicator of layer `layer`, [kv_head, capacity] in backend memory, slot-aligned:
  // prefill indicator after prefill, the last step's pooled attention after a decode eviction.
  [[nodiscard]] const float* scores(std::int64_t layer) const { return scores_.data() + layer_offset(layer); }

  // A new sequence (after cache.clear()): no layer prefilled, every budget cache_size - window.
  void reset() noexcept {
    budgets_.reset();
    std::fill(fresh_from_.begin(), fresh_from_.end(), 0);
    last_allocation_.clear();
    num_allocations_ = 0;
    prompt_len_ = 0;
    decoding_ = false;
  }

  // After layer `layer`'s prompt was appended (the whole prompt, nothing evicted yet), with the
  // last min(window, prompt) queries (or their window-causal probabilities, slot-aligned):
  // scores the layer, records its preference and, with cascading (or at the last layer), splits
  // the total over the layers prefilled so far and re-evicts all of them. Layers come in order.
  void on_prefill(Cache& cache, std::int64_t layer, const Obs& obs) {
    constexpr const char* where = "CAKE::on_prefill";
    check_cache(where, cache, layer);
    if (decoding_)
      detail::fail<UnsupportedError>(where, "layer", layer, "prefill after decoding started: call reset() for a new sequence");
    if (layer != budgets_.num_seen())
      detail::fail<ArgumentError>(where, "layer", layer,
                                  "CAKE prefills every layer once, in order: the next is layer " +
                                      std::to_string(budgets_.num_seen()));
    const std::int64_t prompt = cache.next_position(layer);
    if (prompt == 0) detail::fail<EmptyCacheError>(where, "layer", layer, "has no entries: append the prompt first");
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h)
      if (cache.len(layer, h) != prompt)
        detail::fail<UnsupportedError>(where, "len(layer, kv_head " + std::to_string(h) + ")", cache.len(layer, h),
                                       "must equal the prompt length " + std::to_string(prompt) +
                                           " (CAKE scores the whole unevicted prompt once)");
    if (layer > 0 && prompt != prompt_len_)
      detail::fail<ArgumentError>(where, "next_position(layer)", prompt,
                                  "must equal the prompt length of layer 0 (" + std::to_string(prompt_len_) + ")");
    detail::check_observation(where, cache, layer, obs, true);
    const std::int64_t queries = std::min(cfg_.window, prompt);
    if (obs.num_queries != queries)
      detail::fail<ArgumentError>(where, "num_queries", obs.num_queries,
                                  "must be min(window, prompt) = " + std::to_string(queries));
    if (obs.has_queries() && obs.first_position != -1 && obs.first_position != prompt - queries)
      detail::fail<ArgumentError>(where, "first_position", obs.first_position,
                                  "must be -1 or prompt - num_queries = " + std::to_string(prompt - queries) +
                                      " (the window is the prompt's last queries)");

    // Score (scratch only), then plan the allocation (may throw), then change state.
    const bool scored = prompt > cfg_.window;
    float preference = 0.0f;
    auto& b = cache.backend();
    const CakeWorkspace ws = workspace();
    if (scored) {
      CakeWindowStats stats;
      const std::int64_t first = prompt - queries;
      if (obs.has_queries())
        cake_window_scores(b, cache.view(layer), obs.queries.ptr, queries, first, scale_of(obs),
                           static_cast<float>(cfg_.gamma), rows_.data(), stats, ws);
      else
        cake_window_scores_from_probs(b, cache.view(layer), obs.probs.ptr, queries, obs.probs_stride, first,
                                      static_cast<float>(cfg_.gamma), rows_.data(), stats, ws);
      preference = std::pow(stats.entropy, inv_tau1_) * std::pow(stats.variance, inv_tau2_);
    }
    const bool evict = triggers(prompt) && budgets_.allocates_after(layer);
    const std::int64_t count = evict ? budgets_.plan(prompt - cfg_.window, allocation_, &preference) : 0;

    if (scored)
      cake_pool_in_order(b, cache.view(layer), rows_.data(), shape_.capacity, order_.data() + layer_offset(layer), 0,
                         prompt, cfg_.window, cfg_.kernel, scores_.data() + layer_offset(layer), ws);
    fresh_from_[static_cast<std::size_t>(layer)] = 0;  // slot order = position order = the reference's
    budgets_.record(preference);
    prompt_len_ = prompt;
    if (evict) apply_allocation(cache, count, prompt);
  }

  // One cascade step on demand: splits the total over the layers prefilled so far and re-evicts
  // them (what on_prefill does after every layer with cascading). A no-op while the prompt fits
  // (prompt <= cache_size + window) or before any prefill. Prefill phase only.
  void rebalance(Cache& cache) {
    constexpr const char* where = "CAKE::rebalance";
    if (!(cache.shape() == shape_)) detail::fail_shape_mismatch(where, shape_, cache.shape());
    if (decoding_) detail::fail<UnsupportedError>(where, "phase", "decode", "rebalancing is a prefill-time step");
    if (budgets_.num_seen() == 0 || !triggers(prompt_len_)) return;
    const std::int64_t count = budgets_.plan(prompt_len_ - cfg_.window, allocation_);
    apply_allocation(cache, count, prompt_len_);
  }

  // After the step's token was appended to `layer` (with that token's query, or its probability
  // row over the cache's slots): once the layer holds more than budget + window entries, keeps
  // the budget best older entries by the pooled, group-meaned attention of this query, and the
  // newest `window`. One eviction replaces the victim's slot (O(head_dim)).
  void on_decode(Cache& cache, std::int64_t layer, const Obs& obs) {
    constexpr const char* where = "CAKE::on_decode";
    check_cache(where, cache, layer);
    if (cache.max_len(layer) == 0)
      detail::fail<EmptyCacheError>(where, "layer", layer, "has no entries: append before calling the hook");
    const std::int64_t seen = budgets_.num_seen();
    if (seen != 0 && seen != shape_.num_layers)
      detail::fail<UnsupportedError>(where, "layers prefilled", seen,
                                     "decode needs every layer prefilled (or none): prefill the remaining layers first");
    detail::check_observation(where, cache, layer, obs, true);
    if (obs.num_queries != 1)
      detail::fail<ArgumentError>(where, "num_queries", obs.num_queries, "must be 1 (one decode step)");
    decoding_ = true;

    const std::int64_t limit = budgets_.budget(layer) + cfg_.window;
    const auto lens = cache.lens(layer);
    bool over = false, single = true;
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) {
      const std::int64_t len = lens[static_cast<std::size_t>(h)];
      keep_count_[static_cast<std::size_t>(h)] = std::min(len, limit);
      over |= len > limit;
      single &= len == limit + 1;
    }
    if (!over) return;

    auto& b = cache.backend();
    const CakeWorkspace ws = workspace();
    const float* rows = obs.probs.ptr;
    std::int64_t stride = obs.probs_stride;
    if (obs.has_queries()) {
      b.attention_probs(cache.view(layer), obs.queries.ptr, scale_of(obs), rows_.data());
      rows = rows_.data();
      stride = shape_.capacity;
    }
    const std::int64_t next = cache.next_position(layer);
    float* scores = scores_.data() + layer_offset(layer);
    cake_pool_in_order(b, cache.view(layer), rows, stride, order_.data() + layer_offset(layer),
                       fresh_from_[static_cast<std::size_t>(layer)], next, cfg_.window, cfg_.kernel, scores, ws);
    evict(cache, layer, ProtectRule{0, next - cfg_.window}, single);
  }

  [[nodiscard]] MemoryReport report(const Cache& cache) const {
    MemoryReport r;
    r.policy = "cake";
    r.entries = cache.entries_kept();
    r.kv_bytes = cache.bytes_kept();
    r.state_bytes = (scores_.size() + order_.size() + rows_.size() + ws_rows_.size() + ws_terms_.size()) *
                        static_cast<std::int64_t>(sizeof(float)) +
                    (ws_slots_.size() + keep_slots_.size() + victims_.size()) *
                        static_cast<std::int64_t>(sizeof(std::int32_t));
    for (std::int64_t l = 0; l < shape_.num_layers; ++l)
      for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) r.entries_per_head.push_back(cache.len(l, h));
    return r;
  }

 private:
  static CAKEConfig checked(const CacheShape& shape, const CAKEConfig& cfg) {
    constexpr const char* where = "CAKE (constructor)";
    if (cfg.window < 2)
      detail::fail<ArgumentError>(where, "window", cfg.window, "must be >= 2 (the window variance is unbiased: w - 1 divides)");
    if (cfg.cache_size <= cfg.window)
      detail::fail<BudgetError>(where, "cache_size", cfg.cache_size,
                                "must be > window (" + std::to_string(cfg.window) + "): it counts the window");
    if (cfg.cache_size >= shape.capacity)
      detail::fail<BudgetError>(where, "cache_size", cfg.cache_size,
                                "must be < the cache capacity (" + std::to_string(shape.capacity) +
                                    "): decode appends one token before it evicts");
    if (!(cfg.tau.tau1 > 0.0) || !std::isfinite(cfg.tau.tau1))
      detail::fail<ArgumentError>(where, "tau.tau1", cfg.tau.tau1, "must be finite and > 0");
    if (!(cfg.tau.tau2 > 0.0) || !std::isfinite(cfg.tau.tau2))
      detail::fail<ArgumentError>(where, "tau.tau2", cfg.tau.tau2, "must be finite and > 0");
    if (!(cfg.gamma >= 0.0) || !std::isfinite(cfg.gamma))
      detail::fail<ArgumentError>(where, "gamma", cfg.gamma, "must be finite and >= 0");
    if (cfg.kernel <= 0 || cfg.kernel % 2 == 0)
      detail::fail<ArgumentError>(where, "kernel", cfg.kernel,
                                  "must be odd and > 0 (an even kernel shifts the pooled window off-centre)");
    if (shape.capacity > kExactRanks)
      detail::fail<UnsupportedError>(where, "capacity", shape.capacity,
                                     "must be <= 2^24: entry ranks are stored exactly as fp32");
    return cfg;
  }

  static constexpr std::int64_t kExactRanks = std::int64_t{1} << 24;

  [[nodiscard]] std::int64_t layer_offset(std::int64_t layer) const noexcept {
    return layer * shape_.num_kv_heads * shape_.capacity;
  }
  [[nodiscard]] float scale_of(const Obs& obs) const noexcept {
    return obs.logit_scale(shape_.head_dim);
  }
  // The reference evicts at prefill only when the prompt exceeds cache_size + window (note the + w).
  [[nodiscard]] bool triggers(std::int64_t prompt) const noexcept { return prompt > cfg_.cache_size + cfg_.window; }
  [[nodiscard]] CakeWorkspace workspace() noexcept { return {ws_rows_.data(), ws_terms_.data(), ws_slots_.data()}; }

  void check_cache(const char* where, const Cache& cache, std::int64_t layer) const {
    if (!(cache.shape() == shape_)) detail::fail_shape_mismatch(where, shape_, cache.shape());
    if (layer < 0 || layer >= shape_.num_layers)
      detail::fail<ArgumentError>(where, "layer", layer, "must be in [0, " + std::to_string(shape_.num_layers) + ")");
  }

  // Caps the planned budgets of layers [0, count) at prompt - window and evicts each layer to them
  // (its stored scores; the newest window positions kept). Records the allocation.
  void apply_allocation(Cache& cache, std::int64_t count, std::int64_t prompt) {
    last_allocation_.assign(allocation_.begin(), allocation_.begin() + count);  // capacity reserved: no allocation
    ++num_allocations_;
    for (std::int64_t k = 0; k < count; ++k) {
      const std::int64_t budget = std::min(allocation_[static_cast<std::size_t>(k)], prompt - cfg_.window);
      const auto lens = cache.lens(k);
      bool single = true;
      for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) {
        const std::int64_t len = lens[static_cast<std::size_t>(h)];
        keep_count_[static_cast<std::size_t>(h)] = std::min(len, budget + cfg_.window);
        single &= len == budget + cfg_.window + 1;
      }
      evict(cache, k, ProtectRule{0, prompt - cfg_.window}, single);
      budgets_.set_budget(k, budget);
    }
  }

  // Keeps keep_count_ entries per head of `layer` (the protected ones and the best by the layer's
  // scores), moving the scores with their entries, then re-ranks the layer's entries in the
  // reference's storage order (the top-k order, then the protected window), or by position.
  void evict(Cache& cache, std::int64_t layer, ProtectRule rule, bool single) {
    auto& b = cache.backend();
    float* scores = scores_.data() + layer_offset(layer);
    const std::array<SlotExtra, 1> extras{SlotExtra{scores, 1}};
    const auto lens = cache.lens(layer);
    bool any = false;
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h)
      any |= keep_count_[static_cast<std::size_t>(h)] < lens[static_cast<std::size_t>(h)];
    if (any && single) {
      b.select_victims(cache.view(layer), scores, rule, victims_.data());
      cache.apply(layer, ReplacePlan{victims_.data()}, extras);
    } else if (any) {
      b.select_topk(cache.view(layer), scores, rule, keep_count_.data(), keep_slots_.data());
      cache.apply(layer, KeepPlan{keep_slots_.data(), keep_count_.data()}, extras);
    }
    // The reference gathers in top-k order even when nothing is evicted, so the ranks are redone.
    cake_rank_entries(b, cache.view(layer), scores, rule, cfg_.decode_order == CakeDecodeOrder::reference,
                      order_.data() + layer_offset(layer), workspace());
    fresh_from_[static_cast<std::size_t>(layer)] = cache.next_position(layer);
  }

  using FloatBuffer = typename Backend::template Buffer<float>;
  using IndexBuffer = typename Backend::template Buffer<std::int32_t>;

  CAKEConfig cfg_;
  CacheShape shape_;
  LayerBudgets<ProportionalAllocation> budgets_;  // preferences and budgets per layer (host)
  float inv_tau1_ = 1.0f, inv_tau2_ = 1.0f;       // fp32 exponents, as torch's pow with a scalar
  FloatBuffer scores_;      // [layer, kv_head, capacity] eviction indicator, moved with its entries
  FloatBuffer order_;       // [layer, kv_head, capacity] rank of each entry in the reference's storage order
  FloatBuffer rows_;        // [q_head, capacity] window indicator (prefill) or attention row (decode)
  FloatBuffer ws_rows_;     // CakeWorkspace::rows  [window, capacity]
  FloatBuffer ws_terms_;    // CakeWorkspace::terms [2 * q_head * capacity + 2]
  IndexBuffer ws_slots_;    // CakeWorkspace::slots [kv_head, capacity]
  IndexBuffer keep_slots_;  // [kv_head, capacity]
  IndexBuffer victims_;     // [kv_head]
  std::vector<std::int64_t> keep_count_;       // [kv_head], host
  std::vector<std::int64_t> fresh_from_;       // [layer] positions >= this were appended since the layer was ranked
  std::vector<std::int64_t> allocation_;       // [layer] planned allocation (scratch)
  std::vector<std::int64_t> last_allocation_;  // [layers covered] the last allocation
  std::int64_t num_allocations_ = 0;
  std::int64_t prompt_len_ = 0;
  bool decoding_ = false;
};

}  // namespace kvevict
