// StreamingLLM: attention sinks plus a recent window (Xiao et al., "Efficient Streaming Language
// Models with Attention Sinks", arXiv 2309.17453; official code mit-han-lab/streaming-llm,
// StartRecentKVCache). Spec: shared/specs/streaming_llm.md.
//
// Deviations and choices:
// - Decode-time eviction moves the newest entry into the evicted slot instead of shifting the
//   cache; order is derived from positions (keep-sets equal the official ones).
// - pos-shift is realised by re-rotating surviving keys by -evicted (kvpress KeyRerotationPress
//   style) instead of caching pre-RoPE keys; the engine rotates new tokens at rope_position().
// - The KVCache-Factory one-shot variant is {sink = C - w, recent = w, prefill_only}; the kvpress
//   press is {sink = n_sink, recent = n_kept - n_sink, prefill_only} (see the factories below).
#pragma once

#include <cstdint>
#include <optional>

#include "kvevict/core/rope.hpp"
#include "kvevict/policies/parts/scorers.hpp"
#include "kvevict/policies/parts/topk_eviction_policy.hpp"

namespace kvevict {

struct StreamingLLMConfig {
  std::int64_t num_sink = 4;      // start_size
  std::int64_t num_recent = 512;  // recent_size
  Schedule schedule = Schedule::prefill_and_every_step;
  std::optional<RopeSpec> pos_shift{};  // set to re-index positions inside the cache

  // KVCache-Factory StreamingLLMKVCluster: keeps [0, C - w) and the last w at prefill.
  static StreamingLLMConfig kvcache_factory(std::int64_t capacity, std::int64_t window) {
    if (capacity <= window)
      detail::fail<BudgetError>("StreamingLLMConfig::kvcache_factory", "capacity", capacity,
                                "must be > window (" + std::to_string(window) + ")");
    return {capacity - window, window, Schedule::prefill_only, {}};
  }
  // kvpress StreamingLLMPress: n_kept = int(S * (1 - ratio)); keeps n_sink sinks and the rest recent.
  static StreamingLLMConfig kvpress(std::int64_t prompt_len, double compression_ratio, std::int64_t n_sink = 4) {
    if (prompt_len <= n_sink)
      detail::fail<ArgumentError>("StreamingLLMConfig::kvpress", "prompt_len", prompt_len,
                                  "must be > n_sink (" + std::to_string(n_sink) + ")");
    if (!(compression_ratio >= 0.0 && compression_ratio < 1.0))
      detail::fail<ArgumentError>("StreamingLLMConfig::kvpress", "compression_ratio", compression_ratio, "must be in [0, 1)");
    const auto kept = static_cast<std::int64_t>(static_cast<double>(prompt_len) * (1.0 - compression_ratio));
    return {n_sink, std::max<std::int64_t>(kept - n_sink, 0), Schedule::prefill_only, {}};
  }
};

template <class Cache>
class StreamingLLM : public TopKEvictionPolicy<Cache, NoScorer<Cache>> {
  using Base = TopKEvictionPolicy<Cache, NoScorer<Cache>>;

 public:
  StreamingLLM(Cache& cache, const StreamingLLMConfig& cfg)
      : Base(cache, "streaming_llm", NoScorer<Cache>(cache), UniformBudget{cfg.num_sink + cfg.num_recent},
             SinkRecentSelector{cfg.num_sink, cfg.num_recent}, EvictionOptions{.schedule = cfg.schedule, .pos_shift = cfg.pos_shift}) {}
};

}  // namespace kvevict
