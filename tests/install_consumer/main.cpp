// Uses the installed umbrella header: a StreamingLLM cache trimmed to sink + recent.
#include <kvevict/kvevict.hpp>

#include <cstdio>
#include <vector>

int main() {
  using Cache = kvevict::KVCache<kvevict::CpuBackend>;
  Cache cache({.num_layers = 1, .num_kv_heads = 1, .num_q_heads = 1, .head_dim = 4, .capacity = 16});
  kvevict::StreamingLLM<Cache> policy(cache, {.num_sink = 2, .num_recent = 4});
  std::vector<float> kv(16 * 4, 1.0f);
  cache.append(0, {kv.data(), 40}, {kv.data(), 40}, 10);
  policy.on_prefill(cache, 0, kvevict::Observation<float, kvevict::HostSpace>::none());
  const auto kept = cache.kept_positions(0, 0);
  const std::vector<std::int32_t> expected{0, 1, 6, 7, 8, 9};
  std::printf("consumer: kept %zu entries\n", kept.size());
  return kept == expected ? 0 : 1;
}
