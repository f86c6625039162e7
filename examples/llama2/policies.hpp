// The policies the engine can run, chosen from a string once per run: a std::variant of registry
// entries, each naming a kvevict policy type and its parameters at a given budget.
#pragma once

#include <algorithm>
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

// PyramidKV's layer budgets in a run with no prefill: kvevict::PyramidBudget (KVCache-Factory's
// integer arithmetic) evaluated at the number of tokens the layer has seen, as if the sequence so
// far were the prompt being compressed. Fewer than C tokens keep everything, up to 2(C - w) every
// layer keeps C, beyond that the pyramid (largest at layer 0) with its top capped at seen - w, as
// the reference caps it at S - w. Holds a pointer to the cache it was built for (next_position):
// the policy must not outlive or follow a moved cache, as with every kvevict policy.
struct SeenTokensPyramidBudget {
  kvevict::PyramidBudget pyramid;
  const Cache* cache = nullptr;

  [[nodiscard]] std::int64_t entries(std::int64_t layer, std::int64_t /*len*/) const {
    return pyramid.entries(layer, cache->next_position(layer));
  }
  // The most entries any layer keeps at any length: layer 0's budget once the sequence is long
  // (2(C - w) - (C - w) / beta + w), or C; independent of the number of layers.
  [[nodiscard]] static constexpr std::int64_t largest(std::int64_t capacity, std::int64_t window, std::int64_t beta) {
    return std::max(capacity, 2 * (capacity - window) - (capacity - window) / beta + window);
  }
  void check(const char* where, const kvevict::CacheShape& shape, std::int64_t protected_entries) const {
    pyramid.check(where, shape, protected_entries);
    if (cache == nullptr) kvevict::detail::fail<kvevict::ArgumentError>(where, "cache", "null", "must be the policy's cache");
    const std::int64_t most = largest(pyramid.capacity, pyramid.window, pyramid.beta);
    if (most > shape.capacity)
      kvevict::detail::fail<kvevict::BudgetError>(where, "capacity", pyramid.capacity,
                                                  "gives layer budgets up to " + std::to_string(most) +
                                                      ", which must fit the cache capacity (" +
                                                      std::to_string(shape.capacity) + ")");
  }
};

// PyramidKV (kvevict::SnapKV's scorer with the budget above) re-applied every decode_interval
// steps from the ring buffer of the last `window` decode queries, as SnapKVEntry runs SnapKV.
class PyramidKVDecode : public kvevict::SnapKV<Cache, SeenTokensPyramidBudget> {
 public:
  struct Config {
    kvevict::PyramidKVConfig pyramid{};  // C (window included), scoring, beta, layers: as kvevict::PyramidKV
    std::int64_t decode_interval = 1;
  };
  PyramidKVDecode(Cache& cache, const Config& cfg)
      : kvevict::SnapKV<Cache, SeenTokensPyramidBudget>(
            cache, "pyramidkv", cfg.pyramid.scoring,
            SeenTokensPyramidBudget{kvevict::PyramidBudget{cfg.pyramid.capacity, cfg.pyramid.scoring.window, cfg.pyramid.beta,
                                                           cfg.pyramid.num_model_layers > 0 ? cfg.pyramid.num_model_layers
                                                                                            : cache.shape().num_layers,
                                                           cfg.pyramid.layer_ids},
                                    &cache},
            kvevict::EvictionOptions{.schedule = kvevict::Schedule::prefill_and_every_n_steps,
                                     .decode_interval = cfg.decode_interval,
                                     .head_allocation = cfg.pyramid.head_allocation}) {}
};
static_assert(kvevict::EvictionPolicy<PyramidKVDecode, Cache>, "PyramidKVDecode must satisfy kvevict::EvictionPolicy");

// Registry entries: the command-line name (lower case), the policy type, whether it is bounded
// by a budget, what it observes per decode step, its configuration at a budget, and the spare
// slots beyond the budget its cache needs (the most entries it holds between two evictions, the
// step's new token included). Every per-policy eval parameter lives here (docs/eval.md explains
// the choices). Adding a policy: one entry, listed in PolicyEntry.
struct FullEntry {
  static constexpr std::string_view name = "full";
  using Policy = FullCache;
  static constexpr bool bounded = false;  // keeps every token: capacity = context, budget unused
  static constexpr Observe observe = Observe::probabilities;
  static FullCache::Config config(std::int64_t /*budget*/) { return {}; }
  static std::int64_t spare(std::int64_t /*budget*/) { return 0; }  // unused: capacity = context
};

struct StreamingLLMEntry {
  static constexpr std::string_view name = "streaming_llm";
  using Policy = kvevict::StreamingLLM<Cache>;
  static constexpr bool bounded = true;
  static constexpr Observe observe = Observe::probabilities;  // observes nothing; any is accepted
  static kvevict::StreamingLLMConfig config(std::int64_t budget) {  // 4 attention sinks, the rest recent
    kvevict::StreamingLLMConfig c;
    c.num_sink = 4;
    c.num_recent = budget - 4;
    return c;
  }
  static std::int64_t spare(std::int64_t /*budget*/) { return 1; }  // evicts every step
};

struct H2OEntry {
  static constexpr std::string_view name = "h2o";
  using Policy = kvevict::H2O<Cache>;
  static constexpr bool bounded = true;
  static constexpr Observe observe = Observe::probabilities;
  static kvevict::H2OConfig config(std::int64_t budget) {  // half heavy hitters, half recent (the paper's split)
    kvevict::H2OConfig c;
    c.num_heavy = budget / 2;
    c.num_recent = budget - budget / 2;
    return c;
  }
  static std::int64_t spare(std::int64_t /*budget*/) { return 1; }
};

// The observation window of the SnapKV family (SnapKV, PyramidKV, CAKE) at a budget: the papers'
// 32, but at most a quarter of the budget so that most of it stays for scored entries.
constexpr std::int64_t observation_window(std::int64_t budget) { return std::min<std::int64_t>(32, budget / 4); }

// SnapKV compresses only at prefill in the paper; here every token is a decode step, so it runs
// with its decode schedule: every `window` steps back to the budget, scored by the attention of
// the last `window` decode queries (kept in its ring buffer), pooled with kernel 5.
struct SnapKVEntry {
  static constexpr std::string_view name = "snapkv";
  using Policy = kvevict::SnapKV<Cache>;
  static constexpr bool bounded = true;
  static constexpr Observe observe = Observe::queries;  // the ring buffer holds queries, not probabilities
  static kvevict::SnapKVConfig config(std::int64_t budget) {
    kvevict::SnapKVConfig c;
    c.capacity = budget;  // C, the window included
    c.scoring.window = observation_window(budget);
    c.scoring.kernel = 5;
    c.schedule = kvevict::Schedule::prefill_and_every_n_steps;
    c.decode_interval = observation_window(budget);
    return c;
  }
  static std::int64_t spare(std::int64_t budget) { return observation_window(budget); }  // grows decode_interval between evictions
};

// PyramidKV: SnapKV's scoring and schedule, with per-layer budgets (SeenTokensPyramidBudget,
// beta 20) that average C = budget; the cache needs room for the largest layer budget.
struct PyramidKVEntry {
  static constexpr std::string_view name = "pyramidkv";
  using Policy = PyramidKVDecode;
  static constexpr bool bounded = true;
  static constexpr Observe observe = Observe::queries;
  static constexpr std::int64_t kBeta = 20;  // the paper's and KVCache-Factory's default
  static PyramidKVDecode::Config config(std::int64_t budget) {
    PyramidKVDecode::Config c;
    c.pyramid.capacity = budget;
    c.pyramid.scoring.window = observation_window(budget);
    c.pyramid.scoring.kernel = 5;
    c.pyramid.beta = kBeta;
    c.decode_interval = observation_window(budget);
    return c;
  }
  static std::int64_t spare(std::int64_t budget) {
    return SeenTokensPyramidBudget::largest(budget, observation_window(budget), kBeta) - budget + observation_window(budget);
  }
};

// TOVA: keep `budget` entries, evict the one the current query (mean over every q-head) attends
// least, every step (the paper's decode rule).
struct TOVAEntry {
  static constexpr std::string_view name = "tova";
  using Policy = kvevict::TOVA<Cache>;
  static constexpr bool bounded = true;
  static constexpr Observe observe = Observe::probabilities;
  static kvevict::TOVAConfig config(std::int64_t budget) {
    kvevict::TOVAConfig c;
    c.cache_size = budget;
    c.schedule = kvevict::Schedule::prefill_and_every_step;
    return c;
  }
  static std::int64_t spare(std::int64_t /*budget*/) { return 1; }
};

// Knorm and KeyDiff score from the keys alone; as kvpress's presses they protect nothing (no sinks,
// no recent window), here evicting every step down to the budget.
template <kvevict::KeyScore Kind>
struct KeyScoreEntry {
  static constexpr std::string_view name = Kind == kvevict::KeyScore::norm ? "knorm" : "keydiff";
  using Policy = kvevict::KeyScorePolicy<Cache, Kind>;
  static constexpr bool bounded = true;
  static constexpr Observe observe = Observe::probabilities;  // observes nothing; any is accepted
  static kvevict::KeyScoreConfig config(std::int64_t budget) {
    kvevict::KeyScoreConfig c;
    c.budget = budget;
    c.num_sink = 0;
    c.num_recent = 0;
    c.schedule = kvevict::Schedule::prefill_and_every_step;
    return c;
  }
  static std::int64_t spare(std::int64_t /*budget*/) { return 1; }
};
using KnormEntry = KeyScoreEntry<kvevict::KeyScore::norm>;
using KeyDiffEntry = KeyScoreEntry<kvevict::KeyScore::diff>;

// CAKE with no prefill keeps its initial per-layer budget cache_size - window in every layer (no
// layer preferences are measured without a prefill window) and evicts once a layer holds more
// than cache_size, by the current query's pooled attention; tau (1, 1), gamma 200, kernel 5.
struct CAKEEntry {
  static constexpr std::string_view name = "cake";
  using Policy = kvevict::CAKE<Cache>;
  static constexpr bool bounded = true;
  static constexpr Observe observe = Observe::probabilities;
  static kvevict::CAKEConfig config(std::int64_t budget) {
    kvevict::CAKEConfig c;
    c.cache_size = budget;  // the window included
    c.window = observation_window(budget);
    c.kernel = 5;
    return c;
  }
  static std::int64_t spare(std::int64_t /*budget*/) { return 1; }  // kvevict::cake_capacity with no prompt
};

// LazyEviction with docs/lazyeviction.md's choice for this model: alpha = 1e-3 and W = 58 (W80 of
// the measured MRIs) when B >= 4W, else W = B / 4. Evicts every W steps; peaks at B + W entries.
struct LazyEvictionEntry {
  static constexpr std::string_view name = "lazyeviction";
  using Policy = kvevict::LazyEviction<Cache>;
  static constexpr bool bounded = true;
  static constexpr Observe observe = Observe::probabilities;
  static constexpr std::int64_t kWindow = 58;
  static constexpr std::int64_t window(std::int64_t budget) { return budget >= 4 * kWindow ? kWindow : budget / 4; }
  static kvevict::LazyEvictionConfig config(std::int64_t budget) {
    kvevict::LazyEvictionConfig c;
    c.budget = budget;
    c.window = window(budget);
    c.alpha = 1e-3f;
    return c;
  }
  static std::int64_t spare(std::int64_t budget) { return window(budget); }
};
using PolicyEntry = std::variant<FullEntry, StreamingLLMEntry, H2OEntry, SnapKVEntry, PyramidKVEntry, TOVAEntry, KnormEntry,
                                 KeyDiffEntry, CAKEEntry, LazyEvictionEntry>;

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

// Cache slots (per layer and kv-head) a run of `Entry` at `budget` needs: the budget plus the
// entry's spare slots for a bounded policy (e.g. one for a policy that evicts every step: append,
// attend over budget + 1 entries, then on_decode evicts back to budget), else the context.
template <class Entry>
std::int64_t cache_capacity(const Config& cfg, std::int64_t budget) {
  return Entry::bounded ? budget + Entry::spare(budget) : cfg.seq_len;
}

}  // namespace llama2
