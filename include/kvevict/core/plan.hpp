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

// One decode step's scoring and eviction in one backend call (DecodeEvictionBackend): every
// kv-head loses one entry, exactly as accumulate_column_sums (one query) + group_reduce +
// select_victims + ReplacePlan would do it, but validated as a whole first: non-finite
// probabilities or a head without an unprotected entry throw and change nothing.
struct DecodeEviction {
  const float* probs = nullptr;               // backend memory [q_head, probs_stride], one query;
                                              // nullptr: no scores, the oldest unprotected entry goes
  std::int64_t probs_stride = 0;
  float* q_scores = nullptr;                  // backend memory [q_head, capacity], running sums (with probs)
  const std::int64_t* fresh_from = nullptr;   // host [kv_head]: slots >= this start their sum at 0
  GroupAgg agg = GroupAgg::mean;
  ProtectRule rule{};
};

// The engine's decode attention, run together with a DecodeEviction by an
// AttentionEvictionBackend: out[qh] = sum_j probs[qh, j] V[qh/G, j] with probs[qh, j] =
// softmax_j(q[qh] . K[qh/G, j] * scale) over the live slots (the step's token appended). When the
// step scores with probabilities, they are these: step.probs == probs, step.probs_stride == capacity.
struct DecodeAttention {
  const float* q = nullptr;  // backend memory [q_head, head_dim]
  float scale = 0.0f;
  float* probs = nullptr;    // backend memory [q_head, capacity], receives the probabilities
  float* out = nullptr;      // backend memory [q_head, head_dim]
};

}  // namespace kvevict
