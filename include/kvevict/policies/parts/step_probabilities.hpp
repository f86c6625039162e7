// The current step's attention probabilities for scorers that read one query row per q-head
// (TOVA's LayerAttentionScorer, LazyEviction's RecurrenceScorer): computed from the observation's
// queries, or the engine's probabilities used in place (or repacked where a scorer needs it).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kvevict/core/backend.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/observation.hpp"

namespace kvevict {

// The row stride a scorer needs when the engine supplied the probabilities.
enum class StepProbsStride {
  as_given,  // the engine's rows in place, stride probs_stride (RecurrenceScorer)
  capacity,  // stride == capacity: rows repacked into the workspace when probs_stride differs
             // (LayerAttentionScorer, whose layer_mean reads [q_head, capacity])
};

// A view of one step's probabilities in the backend's memory space: [q_head, stride], slots
// [0, len) of each row valid. Points into the observation or into the caller's workspace.
struct StepProbabilities {
  const float* ptr = nullptr;  // [q_head, stride]
  std::int64_t stride = 0;
};

// The step's probabilities for the observation's single query. With queries:
// b.attention_probs(v, queries, obs.logit_scale(v.head_dim), workspace), stride = capacity
// (attention_probs sees every live slot; first_position is not consulted). With probabilities:
// obs.probs at probs_stride, or with StepProbsStride::capacity and probs_stride != capacity,
// b.window_column_stats_from_probs(v, probs, 1, probs_stride, workspace, nullptr), stride = capacity.
// Preconditions: obs is not empty and obs.num_queries == 1 (the caller checks both);
// workspace holds [q_head, capacity] floats in the backend's memory space. Does not allocate,
// never dereferences observation pointers on the host, and synchronizes only as the backend's
// primitives do (CUDA: enqueued on the backend's stream).
template <StepProbsStride Stride, Backend B, class T, class Space>
[[nodiscard]] StepProbabilities step_probabilities(B& b, const LayerView<T>& v, const Observation<T, Space>& obs,
                                                   float* workspace) {
  static_assert(std::is_same_v<Space, typename B::memory_space>,
                "step_probabilities: the observation must live in the backend's memory space");
  if (obs.has_queries()) {
    b.attention_probs(v, obs.queries.ptr, obs.logit_scale(v.head_dim), workspace);
    return {workspace, v.capacity};
  }
  if constexpr (Stride == StepProbsStride::capacity) {
    static_assert(WindowScoringBackend<B>,
                  "step_probabilities: repacking engine probabilities to stride capacity needs "
                  "window_column_stats_from_probs (a WindowScoringBackend)");
    if (obs.probs_stride != v.capacity) {
      b.window_column_stats_from_probs(v, obs.probs.ptr, 1, obs.probs_stride, workspace, nullptr);
      return {workspace, v.capacity};
    }
  }
  return {obs.probs.ptr, obs.probs_stride};
}

}  // namespace kvevict
