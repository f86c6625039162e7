// One decode step over a cache of T entries per kv-head (8 kv-heads, GQA 4), each policy's full
// step beside the attention it accompanies. Bandwidth-bound (K and V are read once per step).
// BM_CudaAttentionStep/T/d: CudaBackend::attend for one query per q-head (the engine's own work).
// BM_CudaStepAppend/T/d: appending the step's token alone (one kernel), the engine's other
//   per-step work inside the policy steps below; subtract it with the attention step.
// BM_CudaStepH2O/T/d: append the token, attend, H2O.on_decode with the step's probabilities: one
//   cooperative kernel (NaN/Inf check, column sums, group mean, victim, replacement) and one
//   stream synchronisation to read its verdict.
// BM_CudaStepStreamingLLM/T/d: append, attend, StreamingLLM.on_decode (the same kernel, victim by
//   recency).
// The cache sits at its budget, so every step evicts exactly one entry; the difference to
// BM_CudaAttentionStep is the policy's per-step overhead, host synchronisation included.
// Bytes processed = the K and V bytes of the T entries.
#include <cmath>
#include <cstdint>

#include "cuda_bench_support.cuh"

namespace kvevict::cuda_bench {
namespace {

using Cache = KVCache<CudaBackend>;

struct DecodeFixture {
  explicit DecodeFixture(std::int64_t t_, std::int64_t d_)
      : t(t_), d(d_), shape{1, kKvHeads, kQHeads, d_, t_ + 1}, cache(shape), q(random_device(kQHeads * d_, 7)),
        token_k(random_device(kKvHeads * d_, 8)), token_v(random_device(kKvHeads * d_, 9)),
        probs(kQHeads * (t_ + 1)), out(kQHeads * d_), scale(1.0f / std::sqrt(static_cast<float>(d_))) {
    constexpr std::int64_t kChunk = 1024;
    auto k = random_device(kKvHeads * kChunk * d, 10);
    auto v = random_device(kKvHeads * kChunk * d, 11);
    for (std::int64_t done = 0; done < t; done += kChunk) {
      const std::int64_t n = std::min(kChunk, t - done);
      cache.append(0, {k.data(), kKvHeads * n * d}, {v.data(), kKvHeads * n * d}, n);
    }
  }
  void attend() { cache.backend().attend(cache.view(0), q.data(), scale, probs.data(), out.data()); }
  void append_token() {
    cache.append_token(0, {token_k.data(), token_k.size()}, {token_v.data(), token_v.size()});
  }
  [[nodiscard]] Observation<float, CudaSpace> probs_observation() const {
    return Observation<float, CudaSpace>::from_probs({probs.data(), probs.size()}, 1, t + 1);
  }
  void counters(benchmark::State& state) const {
    state.SetBytesProcessed(state.iterations() * 2 * kKvHeads * t * d * static_cast<std::int64_t>(sizeof(float)));
  }

  std::int64_t t, d;
  CacheShape shape;
  Cache cache;
  cuda::DeviceBuffer<float> q, token_k, token_v, probs, out;
  float scale;
};

void BM_CudaAttentionStep(benchmark::State& state) {
  if (!start(state, "bandwidth-bound (baseline)")) return;
  DecodeFixture f(state.range(0), state.range(1));
  time_loop(state, f.cache.backend().stream(), [&] { f.attend(); });
  f.counters(state);
}

void BM_CudaStepAppend(benchmark::State& state) {
  if (!start(state, "latency-bound (baseline)")) return;
  DecodeFixture f(state.range(0), state.range(1));
  // The layer as the backend sees it, lengths frozen at T: every append writes slot T again.
  auto view = f.cache.view(0);
  time_loop(state, f.cache.backend().stream(),
            [&] { f.cache.backend().append(view, f.token_k.data(), f.token_v.data(), 1, f.t); });
  f.counters(state);
}

void BM_CudaStepH2O(benchmark::State& state) {
  if (!start(state, "bandwidth-bound")) return;
  DecodeFixture f(state.range(0), state.range(1));
  H2O<Cache> policy(f.cache, H2OConfig{f.t / 2, f.t - f.t / 2});  // budget T: one eviction per step
  time_loop(state, f.cache.backend().stream(), [&] {
    f.append_token();
    f.attend();
    policy.on_decode(f.cache, 0, f.probs_observation());
  });
  f.counters(state);
}

void BM_CudaStepStreamingLLM(benchmark::State& state) {
  if (!start(state, "bandwidth-bound")) return;
  DecodeFixture f(state.range(0), state.range(1));
  StreamingLLM<Cache> policy(f.cache, StreamingLLMConfig{4, f.t - 4});  // budget T
  time_loop(state, f.cache.backend().stream(), [&] {
    f.append_token();
    f.attend();
    policy.on_decode(f.cache, 0, Observation<float, CudaSpace>::none());
  });
  f.counters(state);
}

BENCHMARK(BM_CudaAttentionStep)->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaStepAppend)->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaStepH2O)->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaStepStreamingLLM)->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvevict::cuda_bench
