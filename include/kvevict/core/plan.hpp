// Plans: what a policy asks the cache to do. Policies never write cache memory themselves; the
// cache validates a plan against its state and a backend applies it.
#pragma once

#include <cstdint>
#include <span>

#include "kvevict/core/layer_view.hpp"

namespace kvevict {

// Keep, per kv-head, `keep_count[h]` entries listed in `keep_slots[h]` (ascending slots,
// backend memory, [kv_head, capacity]); the rest are dropped by a stable compaction.
struct KeepPlan {
  const std::int32_t* keep_slots = nullptr;  // backend memory [kv_head, capacity]
  const std::int64_t* keep_count = nullptr;  // host [kv_head]
};

// Evict one entry per kv-head: the newest slot (lens[h]-1) moves into `victims[h]`.
// This is the O(head_dim) decode-time eviction: the newcomer takes the victim's slot.
struct ReplacePlan {
  const std::int32_t* victims = nullptr;  // backend memory [kv_head]
};

}  // namespace kvevict
