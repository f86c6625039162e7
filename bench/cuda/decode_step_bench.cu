// One decode step over a cache of T entries per kv-head (8 kv-heads, GQA 4), each policy's full
// step beside the engine's step it accompanies. Bandwidth-bound (K and V are read once per step).
// BM_CudaAttentionStep/T/d: the engine's own work: append the step's token (lengths frozen at T,
//   so every append writes slot T again) and CudaBackend::attend for one query per q-head.
// BM_CudaStepAppend/T/d: the append alone (one kernel), for the record.
// BM_CudaStepH2O/T/d: append the token, attend, H2O.on_decode with the step's probabilities: one
//   cooperative kernel (NaN/Inf check, column sums, group mean, victim, replacement) and one
//   stream synchronisation to read its verdict.
// BM_CudaStepStreamingLLM/T/d: append, attend, StreamingLLM.on_decode (the same kernel, victim by
//   recency).
// BM_CudaStep<Policy>Deferred/T/d: the same steps with CudaBackend::defer_step_errors(true): the
//   kernel's verdict is not waited for, so the host never synchronises inside the step (each
//   iteration still ends with one synchronisation, as the attention step's does).
// BM_CudaStep<Policy>Fused/T/d: append, then policy.attend_and_decode (deferred verdicts): the
//   step folded into the attention's own launches (CudaBackend::attend_evict_one).
// BM_CudaKernels<Step>/T/d: where the GPU time of BM_Cuda<Step> goes (kernel_profile.cuh): the
//   step's GPU time without host launch latency, the same launches as one CUDA graph, and each
//   kernel alone (counters in microseconds). For comparing steps kernel by kernel; no baseline.
// The cache sits at its budget, so every step evicts exactly one entry; the difference to
// BM_CudaAttentionStep is the policy's per-step overhead, host synchronisation included.
// Bytes processed = the K and V bytes of the T entries.
#include <cmath>
#include <cstdint>

#include "cuda_bench_support.cuh"
#include "kernel_profile.cuh"

namespace kvevict::cuda_bench {
namespace {

using Cache = KVCache<CudaBackend>;

struct DecodeFixture {
  DecodeFixture(std::int64_t t_, std::int64_t d_, std::int64_t layers_ = 1, cudaStream_t stream = nullptr)
      : t(t_), d(d_), layers(layers_), shape{layers_, kKvHeads, kQHeads, d_, t_ + 1}, cache(shape, CudaBackend(stream)),
        q(random_device(kQHeads * d_, 7)), token_k(random_device(kKvHeads * d_, 8)), token_v(random_device(kKvHeads * d_, 9)),
        probs(kQHeads * (t_ + 1)), out(kQHeads * d_), scale(1.0f / std::sqrt(static_cast<float>(d_))) {
    constexpr std::int64_t kChunk = 1024;
    auto k = random_device(kKvHeads * kChunk * d, 10);
    auto v = random_device(kKvHeads * kChunk * d, 11);
    for (std::int64_t l = 0; l < layers; ++l)
      for (std::int64_t done = 0; done < t; done += kChunk) {
        const std::int64_t n = std::min(kChunk, t - done);
        cache.append(l, {k.data(), kKvHeads * n * d}, {v.data(), kKvHeads * n * d}, n);
      }
  }
  void attend(std::int64_t layer = 0) { cache.backend().attend(cache.view(layer), q.data(), scale, probs.data(), out.data()); }
  // policy.attend_and_decode with this fixture's query and workspaces.
  template <class Policy>
  void attend_and_decode(Policy& policy, std::int64_t layer = 0) {
    policy.attend_and_decode(cache, layer, {q.data(), q.size()}, scale, {probs.data(), probs.size()}, {out.data(), out.size()});
  }
  void append_token(std::int64_t layer = 0) {
    cache.append_token(layer, {token_k.data(), token_k.size()}, {token_v.data(), token_v.size()});
  }
  [[nodiscard]] Observation<float, CudaSpace> probs_observation() const {
    return Observation<float, CudaSpace>::from_probs({probs.data(), probs.size()}, 1, t + 1);
  }
  void counters(benchmark::State& state) const {
    state.SetBytesProcessed(state.iterations() * layers * 2 * kKvHeads * t * d * static_cast<std::int64_t>(sizeof(float)));
  }

  std::int64_t t, d, layers;
  CacheShape shape;
  Cache cache;
  cuda::DeviceBuffer<float> q, token_k, token_v, probs, out;
  float scale;
};

void BM_CudaAttentionStep(benchmark::State& state) {
  if (!start(state, "bandwidth-bound (baseline)")) return;
  DecodeFixture f(state.range(0), state.range(1));
  time_loop(state, f.cache.backend().stream(), [&] {
    f.cache.backend().append(f.cache.view(0), f.token_k.data(), f.token_v.data(), 1, f.t);
    f.attend();
  });
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

// A whole token of an 8-layer model: per layer the engine appends and attends, then H2O steps.
// With immediate verdicts the host waits for the GPU once per layer; deferred, never inside the
// token (each iteration still ends with one synchronisation).
constexpr std::int64_t kModelLayers = 8;

// How the policy's step meets the GPU: its own kernel with the verdict waited for, its own kernel
// with the verdict deferred, or folded into the attention's launches (verdict deferred).
enum class StepMode { immediate, deferred, fused };

// H2O's step after the engine's append and attention, for every layer of a token.
void run_step_h2o(benchmark::State& state, StepMode mode, std::int64_t layers) {
  if (!start(state, layers > 1 ? "launch-bound" : "bandwidth-bound")) return;
  DecodeFixture f(state.range(0), state.range(1), layers);
  f.cache.backend().defer_step_errors(mode != StepMode::immediate);
  H2O<Cache> policy(f.cache, H2OConfig{f.t / 2, f.t - f.t / 2});  // budget T: one eviction per step
  time_loop(state, f.cache.backend().stream(), [&] {
    for (std::int64_t l = 0; l < layers; ++l) {
      f.append_token(l);
      if (mode == StepMode::fused) {
        f.attend_and_decode(policy, l);
      } else {
        f.attend(l);
        policy.on_decode(f.cache, l, f.probs_observation());
      }
    }
  });
  f.cache.backend().check_step_errors();
  f.counters(state);
}
void BM_CudaStepH2O(benchmark::State& state) { run_step_h2o(state, StepMode::immediate, 1); }
void BM_CudaStepH2ODeferred(benchmark::State& state) { run_step_h2o(state, StepMode::deferred, 1); }
void BM_CudaStepH2OFused(benchmark::State& state) { run_step_h2o(state, StepMode::fused, 1); }

void run_step_streaming_llm(benchmark::State& state, StepMode mode) {
  if (!start(state, "bandwidth-bound")) return;
  DecodeFixture f(state.range(0), state.range(1));
  f.cache.backend().defer_step_errors(mode != StepMode::immediate);
  StreamingLLM<Cache> policy(f.cache, StreamingLLMConfig{4, f.t - 4});  // budget T
  time_loop(state, f.cache.backend().stream(), [&] {
    f.append_token();
    if (mode == StepMode::fused) {
      f.attend_and_decode(policy);
    } else {
      f.attend();
      policy.on_decode(f.cache, 0, Observation<float, CudaSpace>::none());
    }
  });
  f.cache.backend().check_step_errors();
  f.counters(state);
}
void BM_CudaStepStreamingLLM(benchmark::State& state) { run_step_streaming_llm(state, StepMode::immediate); }
void BM_CudaStepStreamingLLMDeferred(benchmark::State& state) { run_step_streaming_llm(state, StepMode::deferred); }
void BM_CudaStepStreamingLLMFused(benchmark::State& state) { run_step_streaming_llm(state, StepMode::fused); }

void BM_CudaAttentionStep8Layers(benchmark::State& state) {
  if (!start(state, "launch-bound (baseline)")) return;
  DecodeFixture f(state.range(0), state.range(1), kModelLayers);
  // Lengths frozen at T: every append writes slot T again, as in BM_CudaStepAppend.
  time_loop(state, f.cache.backend().stream(), [&] {
    for (std::int64_t l = 0; l < kModelLayers; ++l) {
      f.cache.backend().append(f.cache.view(l), f.token_k.data(), f.token_v.data(), 1, f.t);
      f.attend(l);
    }
  });
  f.counters(state);
}

void BM_CudaStepH2O8Layers(benchmark::State& state) { run_step_h2o(state, StepMode::immediate, kModelLayers); }
void BM_CudaStepH2O8LayersDeferred(benchmark::State& state) { run_step_h2o(state, StepMode::deferred, kModelLayers); }
void BM_CudaStepH2O8LayersFused(benchmark::State& state) { run_step_h2o(state, StepMode::fused, kModelLayers); }

// Kernel by kernel: the attention step, and H2O's and StreamingLLM's fused steps.
void BM_CudaKernelsAttentionStep(benchmark::State& state) {
  if (!start(state, "per-kernel GPU time")) return;
  const OwnedStream stream;
  DecodeFixture f(state.range(0), state.range(1), 1, stream.get());
  profile_step_kernels(state, f.cache.backend().stream(), [&] {
    f.cache.backend().append(f.cache.view(0), f.token_k.data(), f.token_v.data(), 1, f.t);
    f.attend();
  });
  f.counters(state);
}
// A policy's fused step (append, attend_and_decode), kernel by kernel.
template <class Policy, class Config>
void profile_fused_step(benchmark::State& state, Config (*config)(std::int64_t t)) {
  if (!start(state, "per-kernel GPU time")) return;
  const OwnedStream stream;
  DecodeFixture f(state.range(0), state.range(1), 1, stream.get());
  f.cache.backend().defer_step_errors(true);  // nothing in the step may synchronise (graph capture)
  Policy policy(f.cache, config(f.t));        // budget T: one eviction per step
  profile_step_kernels(state, f.cache.backend().stream(), [&] {
    f.append_token();
    f.attend_and_decode(policy);
  });
  if (state.error_occurred()) return;  // a failed profile is reported; a throw here would end the run
  f.cache.backend().check_step_errors();
  f.counters(state);
}
void BM_CudaKernelsStepH2OFused(benchmark::State& state) {
  profile_fused_step<H2O<Cache>>(state, +[](std::int64_t t) { return H2OConfig{t / 2, t - t / 2}; });
}
void BM_CudaKernelsStepStreamingLLMFused(benchmark::State& state) {
  profile_fused_step<StreamingLLM<Cache>>(state, +[](std::int64_t t) { return StreamingLLMConfig{4, t - 4}; });
}

// T in {1k, 4k, 16k} x head_dim in {64, 128}; GPU time from events, in microseconds.
void decode_step_args(benchmark::internal::Benchmark* b) {
  b->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_CudaAttentionStep)->Apply(decode_step_args);
BENCHMARK(BM_CudaStepAppend)->Apply(decode_step_args);
BENCHMARK(BM_CudaStepH2O)->Apply(decode_step_args);
BENCHMARK(BM_CudaStepStreamingLLM)->Apply(decode_step_args);
BENCHMARK(BM_CudaStepH2ODeferred)->Apply(decode_step_args);
BENCHMARK(BM_CudaStepStreamingLLMDeferred)->Apply(decode_step_args);
BENCHMARK(BM_CudaStepH2OFused)->Apply(decode_step_args);
BENCHMARK(BM_CudaStepStreamingLLMFused)->Apply(decode_step_args);
BENCHMARK(BM_CudaAttentionStep8Layers)->Apply(decode_step_args);
BENCHMARK(BM_CudaStepH2O8Layers)->Apply(decode_step_args);
BENCHMARK(BM_CudaStepH2O8LayersDeferred)->Apply(decode_step_args);
BENCHMARK(BM_CudaStepH2O8LayersFused)->Apply(decode_step_args);
BENCHMARK(BM_CudaKernelsAttentionStep)->Apply(decode_step_args)->Iterations(1);
BENCHMARK(BM_CudaKernelsStepH2OFused)->Apply(decode_step_args)->Iterations(1);
BENCHMARK(BM_CudaKernelsStepStreamingLLMFused)->Apply(decode_step_args)->Iterations(1);

}  // namespace
}  // namespace kvevict::cuda_bench
