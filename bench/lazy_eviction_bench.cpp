// LazyEviction's per-decode-step cost beside the attention step it rides on. One layer, 8 kv-heads,
// GQA 4 (32 q-heads), T live entries on average, W = 64 (budget T - W/2, capacity T + W/2, so the
// lagged cache oscillates around T).
// - BM_AttentionStepLazy: CpuBackend::attend of one query block over T entries (the baseline, as
//   BM_AttentionStep). Bound: bandwidth; bytes = K + V.
// - BM_StepLazyEvictionTrackProbs / ...TrackQueries: on_decode at a step that does not evict (the
//   every-step cost): importance events from the engine's probabilities, or from the query (kvevict
//   recomputes q.K and the softmax: about the first half of an attention step). Bound: bandwidth;
//   bytes = probabilities (or keys) read + last/mri read and written.
// - BM_StepLazyEvictionAmortizedProbs: every step timed, the lagged eviction every W steps included
//   (scoring, top-k and compaction of B + W entries, amortised over W steps).
// The engine's token append is untimed (manual timing of the one call), as in decode_step_bench.
#include <cmath>
#include <cstdint>
#include <vector>

#include "bench_support.hpp"

namespace kvevict::bench {
namespace {

using Obs = Observation<float, HostSpace>;

constexpr std::int64_t kWindow = 64;
constexpr float kAlpha = 1e-4f;  // the official Qwen setting
constexpr int kWarmupSteps = 2 * kWindow;

struct LazySetup {
  std::int64_t t;
  Cache cache;
  LazyEviction<Cache> policy;
  std::vector<float> token_keys, token_values;  // [kv_head, head_dim]
  std::vector<float> query;                     // [q_head, head_dim]
  std::vector<float> probs;                     // [q_head, capacity]: the step's probabilities
  float scale;

  LazySetup(std::int64_t t_avg, std::int64_t head_dim)
      : t(t_avg),
        cache(one_layer_shape(kNumKvHeads, kNumQHeads, head_dim, t_avg + kWindow / 2)),
        policy(cache, LazyEvictionConfig{.budget = t_avg - kWindow / 2, .window = kWindow, .alpha = kAlpha}),
        token_keys(random_floats(kNumKvHeads * head_dim, 31)),
        token_values(random_floats(kNumKvHeads * head_dim, 32)),
        query(random_floats(kNumQHeads * head_dim, 33)),
        probs(static_cast<std::size_t>(kNumQHeads * cache.shape().capacity), 0.0f),
        scale(1.0f / std::sqrt(static_cast<float>(head_dim))) {
    fill(cache, t_avg - kWindow / 2, 41);
    policy.on_prefill(cache, 0, Obs::none());
    // The engine's probabilities over a full cache, reused every step (their values only decide
    // which entries have events, not the work done).
    append_token();
    cache.backend().attention_probs(cache.view(0), query.data(), scale, probs.data());
    policy.on_decode(cache, 0, probs_obs());
  }
  void append_token() {
    const auto n = static_cast<std::int64_t>(token_keys.size());
    cache.append_token(0, HostSpan<const float>(token_keys.data(), n), HostSpan<const float>(token_values.data(), n));
  }
  [[nodiscard]] Obs probs_obs() const {
    return Obs::from_probs(HostSpan<const float>(probs.data(), static_cast<std::int64_t>(probs.size())), 1,
                           cache.shape().capacity);
  }
  [[nodiscard]] Obs query_obs() const {
    return Obs::from_queries(HostSpan<const float>(query.data(), static_cast<std::int64_t>(query.size())), 1);
  }
  [[nodiscard]] bool next_step_evicts() { return (policy.scorer().step(0) + 1) % kWindow == 0; }
};

void BM_AttentionStepLazy(benchmark::State& state) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  Cache cache(one_layer_shape(kNumKvHeads, kNumQHeads, head_dim, t));
  fill(cache, t, 41);
  const std::vector<float> query = random_floats(kNumQHeads * head_dim, 33);
  std::vector<float> probs(static_cast<std::size_t>(kNumQHeads * t)),
      out(static_cast<std::size_t>(kNumQHeads * head_dim));
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const LayerView<float> view = cache.view(0);
  const CpuBackend& backend = cache.backend();
  backend.attend(view, query.data(), scale, probs.data(), out.data());  // warm-up
  for (auto _ : state) {
    time_call(state, [&] { backend.attend(view, query.data(), scale, probs.data(), out.data()); });
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * kNumKvHeads * t * kv_row_bytes(head_dim));
}

enum class LazyObservation { probs, queries };

// Tracking-only steps: a step that would evict runs untimed first, so every timed step tracks.
void BM_StepLazyEvictionTrack(benchmark::State& state, LazyObservation kind) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  LazySetup s(t, head_dim);
  auto obs = [&] { return kind == LazyObservation::probs ? s.probs_obs() : s.query_obs(); };
  for (int i = 0; i < kWarmupSteps; ++i) {
    s.append_token();
    s.policy.on_decode(s.cache, 0, obs());
  }
  std::int64_t slots = 0;
  for (auto _ : state) {
    if (s.next_step_evicts()) {
      s.append_token();
      s.policy.on_decode(s.cache, 0, obs());
    }
    s.append_token();
    slots += s.cache.len(0, 0);
    const Obs o = obs();
    time_call(state, [&] { s.policy.on_decode(s.cache, 0, o); });
    benchmark::ClobberMemory();
  }
  if (s.cache.len(0, 0) > t + kWindow / 2) state.SkipWithError("the lagged eviction did not run");
  // Per slot: the probabilities of the group (or its keys, once per q-head), last and mri read and written.
  const std::int64_t per_slot = kind == LazyObservation::probs
                                    ? kNumQHeads * 4 + kNumKvHeads * 16
                                    : kNumQHeads * head_dim * 4 + kNumKvHeads * 16;
  state.SetBytesProcessed(slots * per_slot);
  state.counters["slots"] = benchmark::Counter(static_cast<double>(slots), benchmark::Counter::kAvgIterations);
}

void BM_StepLazyEvictionAmortizedProbs(benchmark::State& state) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  LazySetup s(t, head_dim);
  for (int i = 0; i < kWarmupSteps; ++i) {
    s.append_token();
    s.policy.on_decode(s.cache, 0, s.probs_obs());
  }
  for (auto _ : state) {
    s.append_token();
    const Obs o = s.probs_obs();
    time_call(state, [&] { s.policy.on_decode(s.cache, 0, o); });
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * t * (kNumQHeads * 4 + kNumKvHeads * 16));
}

[[maybe_unused]] const int kRegistered = [] {
  // Each configuration's benchmarks run back to back, so a pair shares the machine's state.
  for (const std::int64_t t : {1024, 4096})
    for (const std::int64_t head_dim : {64, 128}) {
      auto common = [&](benchmark::internal::Benchmark* b) {
        b->Args({t, head_dim})->ArgNames({"T", "dim"})->UseManualTime()->Unit(benchmark::kMicrosecond);
      };
      common(benchmark::RegisterBenchmark("BM_AttentionStepLazy", BM_AttentionStepLazy));
      common(benchmark::RegisterBenchmark("BM_StepLazyEvictionTrackProbs", [](benchmark::State& st) {
        BM_StepLazyEvictionTrack(st, LazyObservation::probs);
      }));
      common(benchmark::RegisterBenchmark("BM_StepLazyEvictionTrackQueries", [](benchmark::State& st) {
        BM_StepLazyEvictionTrack(st, LazyObservation::queries);
      }));
      common(benchmark::RegisterBenchmark("BM_StepLazyEvictionAmortizedProbs", BM_StepLazyEvictionAmortizedProbs));
    }
  return 0;
}();

}  // namespace
}  // namespace kvevict::bench
