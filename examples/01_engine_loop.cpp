// The whole lifecycle an engine goes through with kvevict: size a cache, build a policy (which
// validates its configuration), prefill, then decode token by token with eviction once full.
// Random keys/values stand in for a model; examples/llama2 runs a real one.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kvevict/kvevict.hpp"

using Cache = kvevict::KVCache<kvevict::CpuBackend>;
using Obs = kvevict::Observation<float, kvevict::HostSpace>;

int main() {
  // 1. Size: 2 layers, GQA 8 query heads over 2 kv-heads, head_dim 64. The policy keeps 96
  //    entries per head; one spare slot holds the decode token before it is evicted.
  const kvevict::CacheShape shape{.num_layers = 2, .num_kv_heads = 2, .num_q_heads = 8, .head_dim = 64, .capacity = 97};
  Cache cache(shape);  // allocates once; nothing below allocates per token
  kvevict::H2O<Cache> policy(cache, {.num_heavy = 48, .num_recent = 48});

  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  auto fill = [&](std::vector<float>& v) {
    for (float& x : v) x = normal(rng);
  };
  const std::int64_t kv_row = shape.num_kv_heads * shape.head_dim;
  const std::int64_t q_row = shape.num_q_heads * shape.head_dim;

  // 2. Prefill: a 80-token prompt fits, so nothing is evicted yet; the policy scores it.
  const std::int64_t prompt = 80;
  std::vector<float> k(static_cast<std::size_t>(prompt * kv_row)), v(k.size()), q(static_cast<std::size_t>(prompt * q_row));
  fill(k), fill(v), fill(q);
  for (std::int64_t layer = 0; layer < shape.num_layers; ++layer) {
    cache.append(layer, {k.data(), prompt * kv_row}, {v.data(), prompt * kv_row}, prompt);
    policy.on_prefill(cache, layer, Obs::from_queries({q.data(), prompt * q_row}, prompt));
  }

  // 3. Decode: append the token, attend over the cache (kvevict's reference kernel returns the
  //    probabilities too), and hand those probabilities to the policy, which evicts once full.
  std::vector<float> kt(static_cast<std::size_t>(kv_row)), vt(kt.size()), qt(static_cast<std::size_t>(q_row));
  std::vector<float> probs(static_cast<std::size_t>(shape.num_q_heads * shape.capacity)), out(qt.size());
  const float scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
  for (int step = 0; step < 200; ++step) {
    fill(kt), fill(vt), fill(qt);
    for (std::int64_t layer = 0; layer < shape.num_layers; ++layer) {
      cache.append_token(layer, {kt.data(), kv_row}, {vt.data(), kv_row});
      cache.backend().attend(cache.view(layer), qt.data(), scale, probs.data(), out.data());
      policy.on_decode(cache, layer, Obs::from_probs({probs.data(), static_cast<std::int64_t>(probs.size())}, 1, shape.capacity));
    }
  }

  // 4. Read results: 280 tokens seen, 96 kept per head.
  cache.check_invariants();
  const kvevict::MemoryReport report = policy.report(cache);
  std::printf("%s: %lld tokens seen, %lld entries kept (%lld KiB of K/V), %lld per head\n", report.policy.c_str(),
              static_cast<long long>(cache.next_position(0)), static_cast<long long>(report.entries),
              static_cast<long long>(report.kv_bytes / 1024), static_cast<long long>(cache.len(0, 0)));
  return report.entries == shape.num_layers * shape.num_kv_heads * 96 ? 0 : 1;
}
