// The EvictionPolicy concept: what an engine loop relies on, plus the memory report every policy
// returns. Policies are resolved at compile time; a runtime choice happens once per request.
#pragma once

#include <concepts>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kvevict/core/observation.hpp"

namespace kvevict {

// Entries and bytes kept, per (layer, kv_head) and in total.
struct MemoryReport {
  std::string policy;
  std::int64_t entries = 0;
  std::int64_t kv_bytes = 0;     // K and V of live entries
  std::int64_t state_bytes = 0;  // per-entry policy state (scores etc.), allocated once
  std::vector<std::int64_t> entries_per_head;  // [layer, kv_head]
};

// The engine calls, per layer: on_prefill after appending the prompt block (with the window
// queries or the probabilities it has), on_decode after appending each token and attending.
template <class P, class Cache>
concept EvictionPolicy =
    requires { typename Cache::memory_space; } &&
    requires(P& p, const P& cp, Cache& cache, std::int64_t layer,
             const Observation<typename Cache::value_type, typename Cache::memory_space>& obs) {
      { cp.name() } -> std::convertible_to<std::string_view>;
      p.on_prefill(cache, layer, obs);
      p.on_decode(cache, layer, obs);
      { cp.report(cache) } -> std::same_as<MemoryReport>;
    };

}  // namespace kvevict
