// The views and small plain-data descriptors that backends operate on. Trivially copyable, so a
// CUDA backend can pass them to kernels by value.
#pragma once

#include <cstdint>

namespace kvevict {

// One layer of a cache as a backend sees it. K and V share the strides; each head holds `lens[h]`
// live entries in slots [0, lens[h]). Slot order carries no meaning (positions give the order).
template <class T>
struct LayerView {
  T* keys = nullptr;                    // [kv_head, slot, head_dim] with the strides below
  T* values = nullptr;                  // [kv_head, slot, head_dim]
  std::int64_t head_stride = 0;         // elements between kv-heads
  std::int64_t slot_stride = 0;         // elements between slots (>= head_dim)
  std::int32_t* positions = nullptr;    // [kv_head, capacity], backend memory: original token index
  const std::int64_t* lens = nullptr;   // [kv_head], host memory: live slots per head
  std::int64_t num_kv_heads = 0;
  std::int64_t num_q_heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t capacity = 0;

  [[nodiscard]] std::int64_t group_size() const noexcept { return num_q_heads / num_kv_heads; }
  [[nodiscard]] T* key(std::int64_t kv_head, std::int64_t slot) const noexcept {
    return keys + kv_head * head_stride + slot * slot_stride;
  }
  [[nodiscard]] T* value(std::int64_t kv_head, std::int64_t slot) const noexcept {
    return values + kv_head * head_stride + slot * slot_stride;
  }
  [[nodiscard]] std::int32_t* head_positions(std::int64_t kv_head) const noexcept {
    return positions + kv_head * capacity;
  }
};

// Per-entry state that must move with its entry when slots are compacted or replaced:
// `rows_per_kv_head` rows of `capacity` floats per kv-head (1 for kv-head scores, the GQA group
// size for per-q-head scores). Layout [kv_head * rows_per_kv_head + row, slot].
struct SlotExtra {
  float* data = nullptr;
  std::int64_t rows_per_kv_head = 1;
};

// Entries that a selection may never evict: position < sink_end or position >= recent_begin.
struct ProtectRule {
  std::int64_t sink_end = 0;
  std::int64_t recent_begin = INT64_MAX;

  [[nodiscard]] constexpr bool protects(std::int64_t pos) const noexcept {
    return pos < sink_end || pos >= recent_begin;
  }
};

// 1-D pooling over the token axis (stride 1, padding kernel/2, odd kernel): avg zero-pads and
// divides by the kernel (PyTorch count_include_pad=True); max ignores padding.
enum class PoolKind { avg, max };

// How the scores of the q-heads of one GQA group become one kv-head score.
enum class GroupAgg { mean, max, sum };

constexpr const char* to_string(GroupAgg a) noexcept {
  switch (a) {
    case GroupAgg::mean: return "mean";
    case GroupAgg::max: return "max";
    case GroupAgg::sum: return "sum";
  }
  return "?";
}

}  // namespace kvevict
