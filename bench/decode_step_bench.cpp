// Per-decode-step policy cost beside the attention step it rides on. One layer, 8 kv-heads,
// GQA 4 (32 q-heads), a cache of T live entries.
// - BM_AttentionStep: CpuBackend::attend of one query block [q_head, head_dim] over T entries.
//   Bound: compute/bandwidth of K and V (streamed once); bytes processed = K + V bytes.
// - BM_StepStreamingLLM, BM_StepH2O/probs, BM_StepH2O/queries: one engine step of the policy on
//   a cache kept full (capacity T, budget T - 1): append the step's token, then on_decode, which
//   evicts exactly one entry per kv-head. The append is inside the timed loop (timing only
//   on_decode would need a clock read per iteration: ~1.3 us for a thread-CPU clock on this VM,
//   and wall clocks count other tenants' time); BM_StepAppend times the append alone.
#include <cmath>
#include <cstdint>
#include <vector>

#include "bench_support.hpp"

namespace kvevict::bench {
namespace {

using Obs = Observation<float, HostSpace>;

// Warm-up steps (untimed, once per configuration), so H2O's scores and the slot order reach a
// steady state.
constexpr int kWarmupSteps = 64;

struct StepSetup {
  Cache cache;
  std::vector<float> token_keys;    // [kv_head, head_dim]
  std::vector<float> token_values;  // [kv_head, head_dim]
  std::vector<float> query;         // [q_head, head_dim]
  std::vector<float> probs;         // [q_head, T]: the step's attention probabilities
  std::vector<float> out;           // [q_head, head_dim]
  float scale;

  StepSetup(std::int64_t t, std::int64_t head_dim, std::int64_t initial_len)
      : cache(one_layer_shape(kNumKvHeads, kNumQHeads, head_dim, t)),
        token_keys(random_floats(kNumKvHeads * head_dim, 31)),
        token_values(random_floats(kNumKvHeads * head_dim, 32)),
        query(random_floats(kNumQHeads * head_dim, 33)),
        probs(static_cast<std::size_t>(kNumQHeads * t), 0.0f),
        out(static_cast<std::size_t>(kNumQHeads * head_dim), 0.0f),
        scale(1.0f / std::sqrt(static_cast<float>(head_dim))) {
    fill(cache, initial_len, 41);
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
};

void BM_AttentionStep(benchmark::State& state) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  StepSetup& s = shared_setup<StepSetup>(t, head_dim, t);
  const LayerView<float> view = s.cache.view(0);
  const CpuBackend& backend = s.cache.backend();
  backend.attend(view, s.query.data(), s.scale, s.probs.data(), s.out.data());  // warm-up
  for (auto _ : state) {
    backend.attend(view, s.query.data(), s.scale, s.probs.data(), s.out.data());
    benchmark::DoNotOptimize(s.out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * kNumKvHeads * t * kv_row_bytes(head_dim));
}

// The engine's part of a policy step: append one token (2 rows per kv-head and a position).
// When the cache is full it is cleared (O(kv_heads), no memory traffic) and refilled.
void BM_StepAppend(benchmark::State& state) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  StepSetup& s = shared_setup<StepSetup>(t, head_dim, t - 1);
  for (auto _ : state) {
    if (s.cache.len(0, 0) == t) s.cache.clear();
    s.append_token();
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * kNumKvHeads * kv_row_bytes(head_dim));
}

// StreamingLLM on a full cache (4 sinks + T - 5 recent = budget T - 1), prefilled and warmed up.
struct StreamingLLMStep {
  StepSetup s;
  StreamingLLM<Cache> policy;

  StreamingLLMStep(std::int64_t t, std::int64_t head_dim)
      : s(t, head_dim, t - 1), policy(s.cache, StreamingLLMConfig{4, t - 1 - 4, Schedule::prefill_and_every_step, {}}) {
    policy.on_prefill(s.cache, 0, Obs::none());
    for (int i = 0; i < kWarmupSteps; ++i) step();
  }
  // One engine step: append the token, then the hook (one eviction per kv-head).
  void step() {
    s.append_token();
    policy.on_decode(s.cache, 0, Obs::none());
  }
};

enum class H2OObservation { probs, queries };

// H2O on a full cache, heavy = recent = half the budget T - 1 (the paper's setting), prefilled
// and warmed up. The engine's probabilities (for the prompt's last query, then for every step)
// are computed once on the full cache and reused: their values do not change the work done.
struct H2OStep {
  StepSetup s;
  H2O<Cache> policy;
  H2OObservation kind;

  H2OStep(std::int64_t t, std::int64_t head_dim, H2OObservation k)
      : s(t, head_dim, t - 1),
        policy(s.cache, H2OConfig{t - 1 - (t - 1) / 2, (t - 1) / 2, GroupAgg::mean, Schedule::prefill_and_every_step}),
        kind(k) {
    s.cache.backend().attention_probs(s.cache.view(0), s.query.data(), s.scale, s.probs.data());
    policy.on_prefill(s.cache, 0, s.probs_obs());
    s.append_token();
    s.cache.backend().attention_probs(s.cache.view(0), s.query.data(), s.scale, s.probs.data());
    policy.on_decode(s.cache, 0, s.probs_obs());
    for (int i = 0; i < kWarmupSteps; ++i) step();
  }
  void step() {
    s.append_token();
    policy.on_decode(s.cache, 0, kind == H2OObservation::probs ? s.probs_obs() : s.query_obs());
  }
};

// The timed engine steps; the cache must end as full as it started.
template <class Step>
void run_steps(benchmark::State& state, Step& step) {
  for (auto _ : state) {
    step.step();
    benchmark::ClobberMemory();
  }
  if (step.s.cache.len(0, 0) != step.s.cache.shape().capacity - 1)
    state.SkipWithError("the cache did not stay full: not one eviction per step");
}

void BM_StepStreamingLLM(benchmark::State& state) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  run_steps(state, shared_setup<StreamingLLMStep>(t, head_dim));
  // Scanned per step: the positions of every live slot.
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * kNumKvHeads * t *
                          static_cast<std::int64_t>(sizeof(std::int32_t)));
}

void BM_StepH2O(benchmark::State& state, H2OObservation kind) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  run_steps(state, shared_setup<H2OStep>(t, head_dim, kind));
  // Read per step: with probabilities, those of every q-head (checked, then accumulated); with
  // queries, the keys once per q-head (the probabilities are recomputed).
  const std::int64_t per_step = kind == H2OObservation::probs ? kNumQHeads * t : kNumQHeads * t * head_dim;
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * per_step *
                          static_cast<std::int64_t>(sizeof(float)));
}

[[maybe_unused]] const int kRegistered = [] {
  // Each configuration's four benchmarks run back to back, so a pair shares the machine's state.
  for (const std::int64_t t : {1024, 4096, 16384})
    for (const std::int64_t head_dim : {64, 128}) {
      auto common = [&](benchmark::internal::Benchmark* b) {
        b->Args({t, head_dim})->ArgNames({"T", "dim"})->Unit(benchmark::kMicrosecond);
      };
      common(benchmark::RegisterBenchmark("BM_AttentionStep", BM_AttentionStep));
      common(benchmark::RegisterBenchmark("BM_StepAppend", BM_StepAppend));
      common(benchmark::RegisterBenchmark("BM_StepStreamingLLM", BM_StepStreamingLLM));
      common(benchmark::RegisterBenchmark("BM_StepH2O/probs",
                                          [](benchmark::State& st) { BM_StepH2O(st, H2OObservation::probs); }));
      common(benchmark::RegisterBenchmark("BM_StepH2O/queries",
                                          [](benchmark::State& st) { BM_StepH2O(st, H2OObservation::queries); }));
    }
  return 0;
}();

}  // namespace
}  // namespace kvevict::bench
