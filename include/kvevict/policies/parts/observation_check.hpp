// Validation of an Observation against a cache layer, shared by every scoring part. Runs before
// anything is mutated, so a rejected observation leaves the cache and the policy untouched.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "kvevict/core/error.hpp"
#include "kvevict/core/observation.hpp"

namespace kvevict::detail {

// scan_probs = false leaves the NaN/Inf scan of probabilities to a fused step that validates them
// itself (DecodeEviction); shapes are still checked here.
template <class Cache, class Obs>
void check_observation(const char* where, Cache& cache, std::int64_t layer, const Obs& obs, bool required,
                       bool scan_probs = true) {
  const auto& shape = cache.shape();
  if (obs.empty()) {
    if (required) fail<ArgumentError>(where, "observation", "empty", "this policy needs queries or probabilities");
    return;
  }
  if (obs.has_queries() && obs.has_probs())
    fail<ArgumentError>(where, "observation", "queries and probs", "give exactly one of them");
  if (obs.num_queries <= 0) fail<ArgumentError>(where, "num_queries", obs.num_queries, "must be > 0");
  if (!(obs.scale >= 0.0f) || !std::isfinite(obs.scale))
    fail<ArgumentError>(where, "scale", obs.scale, "must be finite and >= 0 (0 means 1/sqrt(head_dim))");
  if (obs.has_queries()) {
    const std::int64_t expected = shape.num_q_heads * obs.num_queries * shape.head_dim;
    if (obs.queries.size != expected)
      fail<ShapeError>(where, "queries.size", obs.queries.size,
                       "must equal num_q_heads * num_queries * head_dim = " + std::to_string(expected));
    // -1 means first = next_position - num_queries, which must not be negative either.
    const std::int64_t first =
        obs.first_position >= 0 ? obs.first_position : cache.next_position(layer) - obs.num_queries;
    if (obs.first_position < -1 || first < 0 || first + obs.num_queries > cache.next_position(layer))
      fail<ArgumentError>(where, "first_position", obs.first_position,
                          "must be -1 (the last num_queries tokens) or a position with first + num_queries <= " +
                              std::to_string(cache.next_position(layer)));
    if (!cache.backend().all_finite(obs.queries.ptr, obs.queries.size))
      fail<NonFiniteError>(where, "queries", "NaN/Inf", "every query element must be finite");
  } else {
    const std::int64_t max_len = cache.max_len(layer);
    if (obs.probs_stride < max_len)
      fail<ShapeError>(where, "probs_stride", obs.probs_stride,
                       "must be >= the layer's longest head (" + std::to_string(max_len) + ")");
    const std::int64_t expected = shape.num_q_heads * obs.num_queries * obs.probs_stride;
    if (obs.probs.size != expected)
      fail<ShapeError>(where, "probs.size", obs.probs.size,
                       "must equal num_q_heads * num_queries * probs_stride = " + std::to_string(expected));
    if (scan_probs && !cache.backend().all_finite(obs.probs.ptr, obs.probs.size))
      fail<NonFiniteError>(where, "probs", "NaN/Inf", "every probability must be finite");
  }
}

}  // namespace kvevict::detail
