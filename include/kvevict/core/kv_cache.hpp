// KVCache<Backend, T>: head-major keys and values per layer, per-(layer, kv_head) lengths and
// original positions, fixed capacity. Owns its memory or views an engine's buffers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "kvevict/core/backend.hpp"
#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/memory_space.hpp"
#include "kvevict/core/plan.hpp"
#include "kvevict/core/shape.hpp"

namespace kvevict {

// An engine's K/V storage, described by pointers and element strides. K and V share strides.
// Slot s of kv-head h of layer l starts at base + l*layer_stride + h*head_stride + s*slot_stride.
template <class T, class Space>
struct ExternalKV {
  T* keys = nullptr;
  T* values = nullptr;
  std::int64_t layer_stride = 0;
  std::int64_t head_stride = 0;
  std::int64_t slot_stride = 0;
};

template <Backend B, class T = float>
class KVCache {
  static_assert(std::is_same_v<T, float>,
                "kvevict backends store float32 keys and values; T must be float");

 public:
  using backend_type = B;
  using value_type = T;
  using memory_space = typename B::memory_space;
  template <class U>
  using Span = MemorySpan<U, memory_space>;

  // Owning cache: allocates K, V and positions once, here. Throws on an invalid shape.
  explicit KVCache(const CacheShape& shape, B backend = B{}) : backend_(std::move(backend)), shape_(shape) {
    shape_.check("KVCache");
    const std::int64_t n = shape_.num_layers * shape_.layer_elements();
    owned_keys_ = backend_.template allocate<T>(n);
    owned_values_ = backend_.template allocate<T>(n);
    keys_ = owned_keys_.data();
    values_ = owned_values_.data();
    layer_stride_ = shape_.layer_elements();
    head_stride_ = shape_.capacity * shape_.head_dim;
    slot_stride_ = shape_.head_dim;
    init_metadata();
  }

  // Non-owning view over an engine's K/V buffers; positions and lengths are still kvevict's.
  KVCache(const CacheShape& shape, ExternalKV<T, memory_space> kv, B backend = B{})
      : backend_(std::move(backend)), shape_(shape) {
    shape_.check("KVCache");
    if (kv.keys == nullptr) detail::fail<ArgumentError>("KVCache", "kv.keys", "null", "must point at the engine's key buffer");
    if (kv.values == nullptr) detail::fail<ArgumentError>("KVCache", "kv.values", "null", "must point at the engine's value buffer");
    if (kv.slot_stride < shape_.head_dim)
      detail::fail<ShapeError>("KVCache", "kv.slot_stride", kv.slot_stride, "must be >= head_dim");
    if (kv.head_stride < shape_.capacity * kv.slot_stride)
      detail::fail<ShapeError>("KVCache", "kv.head_stride", kv.head_stride, "must be >= capacity * slot_stride");
    if (shape_.num_layers > 1 && kv.layer_stride < shape_.num_kv_heads * kv.head_stride)
      detail::fail<ShapeError>("KVCache", "kv.layer_stride", kv.layer_stride,
                               "must be >= num_kv_heads * head_stride");
    keys_ = kv.keys;
    values_ = kv.values;
    layer_stride_ = kv.layer_stride;
    head_stride_ = kv.head_stride;
    slot_stride_ = kv.slot_stride;
    init_metadata();
  }

  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;
  KVCache(KVCache&&) noexcept = default;
  KVCache& operator=(KVCache&&) noexcept = default;

  [[nodiscard]] const CacheShape& shape() const noexcept { return shape_; }
  [[nodiscard]] B& backend() noexcept { return backend_; }
  [[nodiscard]] const B& backend() const noexcept { return backend_; }
  [[nodiscard]] bool owns_memory() const noexcept { return owned_keys_.data() != nullptr; }

  // Live entries of one (layer, kv_head).
  [[nodiscard]] std::int64_t len(std::int64_t layer, std::int64_t kv_head) const {
    check_layer("KVCache::len", layer);
    check_head("KVCache::len", kv_head);
    return lens_[static_cast<std::size_t>(layer * shape_.num_kv_heads + kv_head)];
  }
  [[nodiscard]] std::span<const std::int64_t> lens(std::int64_t layer) const {
    check_layer("KVCache::lens", layer);
    return {lens_.data() + layer * shape_.num_kv_heads, static_cast<std::size_t>(shape_.num_kv_heads)};
  }
  [[nodiscard]] std::int64_t max_len(std::int64_t layer) const {
    auto l = lens(layer);
    return *std::max_element(l.begin(), l.end());
  }
  // Tokens appended to this layer so far: the position the next appended token receives.
  [[nodiscard]] std::int64_t next_position(std::int64_t layer) const {
    check_layer("KVCache::next_position", layer);
    return next_pos_[static_cast<std::size_t>(layer)];
  }

  // The backend-facing view of one layer. Cheap; valid until the cache is moved or destroyed.
  [[nodiscard]] LayerView<T> view(std::int64_t layer) {
    check_layer("KVCache::view", layer);
    return make_view(layer);
  }

  // Appends `num_tokens` tokens to every kv-head of `layer`. `keys`/`values` are
  // [kv_head, token, head_dim] in the backend's memory space; the tokens get positions
  // next_position(layer) ... + num_tokens - 1. Throws (changing nothing) when a head would
  // exceed capacity or the spans are mis-sized. Does not allocate.
  void append(std::int64_t layer, Span<const T> keys, Span<const T> values, std::int64_t num_tokens) {
    constexpr const char* where = "KVCache::append";
    check_layer(where, layer);
    if (num_tokens <= 0) detail::fail<ArgumentError>(where, "num_tokens", num_tokens, "must be > 0");
    const std::int64_t expected = shape_.num_kv_heads * num_tokens * shape_.head_dim;
    if (keys.ptr == nullptr) detail::fail<ArgumentError>(where, "keys", "null", "must point at [kv_head, token, head_dim]");
    if (values.ptr == nullptr) detail::fail<ArgumentError>(where, "values", "null", "must point at [kv_head, token, head_dim]");
    if (keys.size != expected)
      detail::fail<ShapeError>(where, "keys.size", keys.size,
                               "must equal num_kv_heads * num_tokens * head_dim = " + std::to_string(expected));
    if (values.size != expected)
      detail::fail<ShapeError>(where, "values.size", values.size,
                               "must equal num_kv_heads * num_tokens * head_dim = " + std::to_string(expected));
    auto l = lens(layer);
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h)
      if (l[static_cast<std::size_t>(h)] + num_tokens > shape_.capacity)
        detail::fail<CapacityError>(where, "num_tokens", num_tokens,
                                    "kv_head " + std::to_string(h) + " holds " + std::to_string(l[static_cast<std::size_t>(h)]) +
                                        " of capacity " + std::to_string(shape_.capacity));
    const std::int64_t first = next_pos_[static_cast<std::size_t>(layer)];
    if (first + num_tokens > INT32_MAX)
      detail::fail<CapacityError>(where, "num_tokens", num_tokens, "positions must fit 32 bits");
    backend_.append(make_view(layer), keys.ptr, values.ptr, num_tokens, first);
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) lens_[idx(layer, h)] += num_tokens;
    next_pos_[static_cast<std::size_t>(layer)] += num_tokens;
  }
  // One decode token: keys/values are [kv_head, head_dim].
  void append_token(std::int64_t layer, Span<const T> keys, Span<const T> values) {
    append(layer, keys, values, 1);
  }

  // Applies a keep plan (stable compaction). `extras` move with their entries.
  void apply(std::int64_t layer, const KeepPlan& plan, std::span<const SlotExtra> extras = {}) {
    constexpr const char* where = "KVCache::apply(KeepPlan)";
    check_layer(where, layer);
    if (plan.keep_slots == nullptr || plan.keep_count == nullptr)
      detail::fail<ArgumentError>(where, "plan", "null", "keep_slots and keep_count must be set");
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) {
      const std::int64_t k = plan.keep_count[h];
      if (k < 0 || k > lens_[idx(layer, h)])
        detail::fail<BudgetError>(where, "keep_count[" + std::to_string(h) + "]", k,
                                  "must be in [0, len] with len = " + std::to_string(lens_[idx(layer, h)]));
    }
    backend_.compact(make_view(layer), plan.keep_slots, plan.keep_count, extras);
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) lens_[idx(layer, h)] = plan.keep_count[h];
  }

  // Applies a replace plan: every kv-head loses one entry, its newest slot filling the victim's.
  void apply(std::int64_t layer, const ReplacePlan& plan, std::span<const SlotExtra> extras = {}) {
    constexpr const char* where = "KVCache::apply(ReplacePlan)";
    check_layer(where, layer);
    if (plan.victims == nullptr) detail::fail<ArgumentError>(where, "plan.victims", "null", "must be set");
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h)
      if (lens_[idx(layer, h)] == 0)
        detail::fail<EmptyCacheError>(where, "kv_head", h, "has no entry to evict");
    backend_.replace_with_last(make_view(layer), plan.victims, extras);
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) lens_[idx(layer, h)] -= 1;
  }

  // Applies one decode step's scoring and eviction (DecodeEvictionBackend only): every kv-head
  // loses one entry. Throws, with the cache and the scores unchanged, for non-finite
  // probabilities (NonFiniteError) or a head whose entries are all protected (InvariantError).
  // A backend that defers its verdict (CudaBackend::defer_step_errors) throws later instead; the
  // rejected step then changes no entry or score and leaves out its newest entry.
  void apply(std::int64_t layer, const DecodeEviction& step, std::span<const SlotExtra> extras = {})
    requires DecodeEvictionBackend<B>
  {
    constexpr const char* where = "KVCache::apply(DecodeEviction)";
    check_decode_eviction(where, layer, step);
    backend_.evict_one(make_view(layer), step, extras);
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) lens_[idx(layer, h)] -= 1;
  }

  // The step's attention and its eviction in one backend call (AttentionEvictionBackend only):
  // `att` receives attend's probabilities and output, then every kv-head loses one entry as
  // apply(layer, step) would do it, with the same errors (a non-finite attention logit is a
  // NonFiniteError), the same all-or-nothing rule and the same deferred verdicts.
  void apply(std::int64_t layer, const DecodeAttention& att, const DecodeEviction& step,
             std::span<const SlotExtra> extras = {})
    requires AttentionEvictionBackend<B>
  {
    constexpr const char* where = "KVCache::apply(DecodeAttention, DecodeEviction)";
    check_decode_eviction(where, layer, step);
    if (att.q == nullptr) detail::fail<ArgumentError>(where, "att.q", "null", "must point at [q_head, head_dim] queries");
    if (att.probs == nullptr) detail::fail<ArgumentError>(where, "att.probs", "null", "must point at [q_head, capacity] workspace");
    if (att.out == nullptr) detail::fail<ArgumentError>(where, "att.out", "null", "must point at [q_head, head_dim] outputs");
    if (!(att.scale > 0.0f) || !std::isfinite(att.scale))
      detail::fail<ArgumentError>(where, "att.scale", att.scale, "must be finite and > 0");
    backend_.attend_evict_one(make_view(layer), att, step, extras);
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) lens_[idx(layer, h)] -= 1;
  }

  // Forgets every entry (capacity and memory stay).
  void clear() noexcept {
    std::fill(lens_.begin(), lens_.end(), 0);
    std::fill(next_pos_.begin(), next_pos_.end(), 0);
  }

  // Host copies for reports and tests (they allocate).
  [[nodiscard]] std::vector<std::int32_t> positions(std::int64_t layer, std::int64_t kv_head) const {
    const std::int64_t n = len(layer, kv_head);
    std::vector<std::int32_t> out(static_cast<std::size_t>(n));
    if (n > 0) backend_.copy_to_host(positions_.data() + (layer * shape_.num_kv_heads + kv_head) * shape_.capacity, out.data(), n);
    return out;
  }
  // Original positions kept by (layer, kv_head), ascending: the report order of golden files.
  [[nodiscard]] std::vector<std::int32_t> kept_positions(std::int64_t layer, std::int64_t kv_head) const {
    auto p = positions(layer, kv_head);
    std::sort(p.begin(), p.end());
    return p;
  }
  // Key (or value) rows of one head, [len, head_dim] in slot order.
  [[nodiscard]] std::vector<T> keys(std::int64_t layer, std::int64_t kv_head) const { return rows(layer, kv_head, keys_); }
  [[nodiscard]] std::vector<T> values(std::int64_t layer, std::int64_t kv_head) const { return rows(layer, kv_head, values_); }

  [[nodiscard]] std::int64_t entries_kept() const noexcept {
    std::int64_t n = 0;
    for (auto l : lens_) n += l;
    return n;
  }
  // Bytes of K and V held by live entries (positions and policy state not counted).
  [[nodiscard]] std::int64_t bytes_kept() const noexcept {
    return entries_kept() * 2 * shape_.head_dim * static_cast<std::int64_t>(sizeof(T));
  }

  // Throws InvariantError if lengths, positions or next_position disagree. Allocates (debug use).
  void check_invariants() const {
    constexpr const char* where = "KVCache::check_invariants";
    for (std::int64_t l = 0; l < shape_.num_layers; ++l) {
      const std::int64_t next = next_pos_[static_cast<std::size_t>(l)];
      for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h) {
        const std::int64_t n = lens_[idx(l, h)];
        if (n < 0 || n > shape_.capacity || n > next)
          detail::fail_state<InvariantError>(where, "layer " + std::to_string(l) + " kv_head " + std::to_string(h) +
                                                        ": len " + std::to_string(n) + " outside [0, min(capacity, next_position)]");
        auto p = kept_positions(l, h);
        for (std::size_t i = 0; i < p.size(); ++i) {
          if (p[i] < 0 || p[i] >= next)
            detail::fail_state<InvariantError>(where, "layer " + std::to_string(l) + " kv_head " + std::to_string(h) +
                                                          ": position " + std::to_string(p[i]) + " outside [0, next_position)");
          if (i > 0 && p[i] == p[i - 1])
            detail::fail_state<InvariantError>(where, "layer " + std::to_string(l) + " kv_head " + std::to_string(h) +
                                                          ": position " + std::to_string(p[i]) + " held twice");
        }
      }
    }
  }

  // FNV-1a over every byte the cache owns or views (live or not), lengths and counters: two
  // equal hashes mean a failed call left the cache exactly as it was. Allocates (debug use).
  [[nodiscard]] std::uint64_t state_hash() const {
    std::uint64_t hash = 1469598103934665603ull;
    auto mix = [&](const void* p, std::size_t n) {
      const auto* b = static_cast<const unsigned char*>(p);
      for (std::size_t i = 0; i < n; ++i) hash = (hash ^ b[i]) * 1099511628211ull;
    };
    std::vector<T> row(static_cast<std::size_t>(shape_.head_dim));
    for (std::int64_t l = 0; l < shape_.num_layers; ++l)
      for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h)
        for (std::int64_t s = 0; s < shape_.capacity; ++s) {
          const std::int64_t off = l * layer_stride_ + h * head_stride_ + s * slot_stride_;
          backend_.copy_to_host(keys_ + off, row.data(), shape_.head_dim);
          mix(row.data(), row.size() * sizeof(T));
          backend_.copy_to_host(values_ + off, row.data(), shape_.head_dim);
          mix(row.data(), row.size() * sizeof(T));
        }
    std::vector<std::int32_t> pos(static_cast<std::size_t>(positions_.size()));
    backend_.copy_to_host(positions_.data(), pos.data(), positions_.size());
    mix(pos.data(), pos.size() * sizeof(std::int32_t));
    mix(lens_.data(), lens_.size() * sizeof(std::int64_t));
    mix(next_pos_.data(), next_pos_.size() * sizeof(std::int64_t));
    return hash;
  }

 private:
  using KBuffer = typename B::template Buffer<T>;
  using PosBuffer = typename B::template Buffer<std::int32_t>;

  void init_metadata() {
    backend_.reserve(shape_);
    positions_ = backend_.template allocate<std::int32_t>(shape_.num_layers * shape_.num_kv_heads * shape_.capacity);
    lens_.assign(static_cast<std::size_t>(shape_.num_layers * shape_.num_kv_heads), 0);
    next_pos_.assign(static_cast<std::size_t>(shape_.num_layers), 0);
  }

  [[nodiscard]] std::size_t idx(std::int64_t layer, std::int64_t h) const noexcept {
    return static_cast<std::size_t>(layer * shape_.num_kv_heads + h);
  }
  // What every single-eviction decode step needs of the cache and of its DecodeEviction.
  void check_decode_eviction(const char* where, std::int64_t layer, const DecodeEviction& step) const {
    check_layer(where, layer);
    if (step.probs != nullptr && (step.q_scores == nullptr || step.fresh_from == nullptr))
      detail::fail<ArgumentError>(where, step.q_scores == nullptr ? "step.q_scores" : "step.fresh_from", "null",
                                  "scores and fresh_from must be set with probs");
    if (step.probs != nullptr && step.probs_stride < max_len(layer))
      detail::fail<ShapeError>(where, "step.probs_stride", step.probs_stride,
                               "must be >= the layer's longest head (" + std::to_string(max_len(layer)) + ")");
    for (std::int64_t h = 0; h < shape_.num_kv_heads; ++h)
      if (lens_[idx(layer, h)] == 0)
        detail::fail<EmptyCacheError>(where, "kv_head", h, "has no entry to evict");
  }
  void check_layer(const char* where, std::int64_t layer) const {
    if (layer < 0 || layer >= shape_.num_layers)
      detail::fail<ArgumentError>(where, "layer", layer, "must be in [0, " + std::to_string(shape_.num_layers) + ")");
  }
  void check_head(const char* where, std::int64_t h) const {
    if (h < 0 || h >= shape_.num_kv_heads)
      detail::fail<ArgumentError>(where, "kv_head", h, "must be in [0, " + std::to_string(shape_.num_kv_heads) + ")");
  }

  [[nodiscard]] LayerView<T> make_view(std::int64_t layer) const noexcept {
    LayerView<T> v;
    v.keys = keys_ + layer * layer_stride_;
    v.values = values_ + layer * layer_stride_;
    v.head_stride = head_stride_;
    v.slot_stride = slot_stride_;
    v.positions = const_cast<std::int32_t*>(positions_.data()) + layer * shape_.num_kv_heads * shape_.capacity;
    v.lens = lens_.data() + layer * shape_.num_kv_heads;
    v.num_kv_heads = shape_.num_kv_heads;
    v.num_q_heads = shape_.num_q_heads;
    v.head_dim = shape_.head_dim;
    v.capacity = shape_.capacity;
    return v;
  }

  [[nodiscard]] std::vector<T> rows(std::int64_t layer, std::int64_t kv_head, const T* base) const {
    const std::int64_t n = len(layer, kv_head);
    std::vector<T> out(static_cast<std::size_t>(n * shape_.head_dim));
    for (std::int64_t s = 0; s < n; ++s)
      backend_.copy_to_host(base + layer * layer_stride_ + kv_head * head_stride_ + s * slot_stride_,
                            out.data() + s * shape_.head_dim, shape_.head_dim);
    return out;
  }

  B backend_;
  CacheShape shape_;
  KBuffer owned_keys_{};
  KBuffer owned_values_{};
  T* keys_ = nullptr;
  T* values_ = nullptr;
  std::int64_t layer_stride_ = 0, head_stride_ = 0, slot_stride_ = 0;  // elements
  PosBuffer positions_{};                // [layer, kv_head, capacity], backend memory
  std::vector<std::int64_t> lens_;       // [layer, kv_head], host
  std::vector<std::int64_t> next_pos_;   // [layer], host
};

}  // namespace kvevict
