// The policies the engine can run, chosen from a string once per run: a std::variant of registry
// entries, each naming a kvevict policy type and its parameters at a given budget.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "kvevict/kvevict.hpp"
#include "transformer.hpp"

namespace llama2 {

// No eviction: the reference the eval compares every policy with.
class FullCache {
 public:
  struct Config {};
  FullCache(Cache& /*cache*/, const Config& /*cfg*/) {}
  [[nodiscard]] std::string_view name() const noexcept { return "full"; }
  void on_prefill(Cache& /*cache*/, std::int64_t /*layer*/, const Observation& /*obs*/) {}
  void on_decode(Cache& /*cache*/, std::int64_t /*layer*/, const Observation& /*obs*/) {}
  [[nodiscard]] kvevict::MemoryReport report(const Cache& cache) const {
    kvevict::MemoryReport r;
    r.policy = "full";
    r.entries = cache.entries_kept();
    r.kv_bytes = cache.bytes_kept();
    for (std::int64_t l = 0; l < cache.shape().num_layers; ++l)
      for (std::int64_t h = 0; h < cache.shape().num_kv_heads; ++h) r.entries_per_head.push_back(cache.len(l, h));
    return r;
  }
};
static_assert(kvevict::EvictionPolicy<FullCache, Cache>, "FullCache must satisfy kvevict::EvictionPolicy");

// Registry entries: the command-line name (lower case), the policy type, whether it is bounded
// by a budget, and its configuration at a budget. Every per-policy eval parameter lives here
// (docs/eval.md explains the choices). Adding a policy: one entry, listed in PolicyEntry.
struct FullEntry {
  static constexpr std::string_view name = "full";
  using Policy = FullCache;
  static constexpr bool bounded = false;  // keeps every token: capacity = context, budget unused
  static FullCache::Config config(std::int64_t /*budget*/) { return {}; }
};

struct StreamingLLMEntry {
  static constexpr std::string_view name = "streaming_llm";
  using Policy = kvevict::StreamingLLM<Cache>;
  static constexpr bool bounded = true;
  static kvevict::StreamingLLMConfig config(std::int64_t budget) {  // 4 attention sinks, the rest recent
    kvevict::StreamingLLMConfig c;
    c.num_sink = 4;
    c.num_recent = budget - 4;
    return c;
  }
};

struct H2OEntry {
  static constexpr std::string_view name = "h2o";
  using Policy = kvevict::H2O<Cache>;
  static constexpr bool bounded = true;
  static kvevict::H2OConfig config(std::int64_t budget) {  // half heavy hitters, half recent (the paper's split)
    kvevict::H2OConfig c;
    c.num_heavy = budget / 2;
    c.num_recent = budget - budget / 2;
    return c;
  }
};

using PolicyEntry = std::variant<FullEntry, StreamingLLMEntry, H2OEntry>;

// Every registered name, in registry order.
inline std::vector<std::string> policy_names() {
  return []<std::size_t... I>(std::index_sequence<I...>) {
    return std::vector<std::string>{std::string(std::variant_alternative_t<I, PolicyEntry>::name)...};
  }(std::make_index_sequence<std::variant_size_v<PolicyEntry>>{});
}

// The entry called `name`, or nullopt.
inline std::optional<PolicyEntry> find_policy(std::string_view name) {
  std::optional<PolicyEntry> found;
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    ((std::variant_alternative_t<I, PolicyEntry>::name == name ? void(found.emplace(std::in_place_index<I>)) : void()), ...);
  }(std::make_index_sequence<std::variant_size_v<PolicyEntry>>{});
  return found;
}

// The entry called `name`; throws kvevict::ArgumentError listing the known names.
inline PolicyEntry policy_entry(std::string_view name) {
  if (auto e = find_policy(name)) return *e;
  std::string known;
  for (const auto& n : policy_names()) known += (known.empty() ? "" : ", ") + n;
  throw kvevict::ArgumentError("llama2: unknown policy '" + std::string(name) + "' (known: " + known + ")");
}

// Cache slots a run of `Entry` at `budget` needs: one spare slot for bounded policies (append,
// attend over budget + 1 entries, then on_decode evicts back to budget), else the context.
template <class Entry>
std::int64_t cache_capacity(const Config& cfg, std::int64_t budget) {
  return Entry::bounded ? budget + 1 : cfg.seq_len;
}

}  // namespace llama2
