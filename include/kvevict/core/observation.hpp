// What a policy observes at a hook: the step's queries, or attention probabilities the engine
// already computed. Pointers live in the backend's memory space (checked by type).
#pragma once

#include <cmath>
#include <cstdint>

#include "kvevict/core/memory_space.hpp"

namespace kvevict {

template <class T, class Space>
struct Observation {
  // Queries: [q_head, num_queries, head_dim], post-RoPE like the cached keys.
  MemorySpan<const T, Space> queries{};
  // Or probabilities: [q_head, num_queries, probs_stride], slot-aligned with the cache as it is
  // at the hook (after the engine appended this step's tokens), rows summing to 1.
  MemorySpan<const float, Space> probs{};
  std::int64_t num_queries = 0;
  std::int64_t probs_stride = 0;
  // Position of query 0, for the causal mask (query i sees keys with position <= first + i).
  // -1 means "the last num_queries positions appended", the usual prefill/decode case.
  std::int64_t first_position = -1;
  float scale = 0.0f;  // logit scale; 0 means 1/sqrt(head_dim)

  // The logit scale to use: `scale`, or 1/sqrt(head_dim) when it is 0.
  [[nodiscard]] float logit_scale(std::int64_t head_dim) const noexcept {
    return scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
  }

  [[nodiscard]] bool has_queries() const noexcept { return queries.ptr != nullptr; }
  [[nodiscard]] bool has_probs() const noexcept { return probs.ptr != nullptr; }
  [[nodiscard]] bool empty() const noexcept { return !has_queries() && !has_probs(); }

  static Observation from_queries(MemorySpan<const T, Space> q, std::int64_t num_queries,
                                  float scale = 0.0f, std::int64_t first_position = -1) {
    Observation o;
    o.queries = q;
    o.num_queries = num_queries;
    o.scale = scale;
    o.first_position = first_position;
    return o;
  }
  static Observation from_probs(MemorySpan<const float, Space> p, std::int64_t num_queries,
                                std::int64_t probs_stride) {
    Observation o;
    o.probs = p;
    o.num_queries = num_queries;
    o.probs_stride = probs_stride;
    return o;
  }
  // For policies that score nothing (StreamingLLM).
  static Observation none() { return Observation{}; }
};

}  // namespace kvevict
