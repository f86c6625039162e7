// Shared setup for kvevict-bench: deterministic random data and caches filled outside the timed
// loop. Every benchmark pairs with a baseline of the same run.
#pragma once

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "kvevict/kvevict.hpp"

namespace kvevict::bench {

using Cache = KVCache<CpuBackend>;

// The decode-step geometry of the brief: 8 kv-heads, GQA group 4 (32 q-heads).
inline constexpr std::int64_t kNumKvHeads = 8;
inline constexpr std::int64_t kNumQHeads = 32;

// Uniform floats in [-2, 2) from a fixed seed (splitmix64: cheap, so filling a 128 MiB cache
// outside the timed loop takes milliseconds, not seconds). Values only need to be finite and
// varied; the benchmarks time data movement and arithmetic, not accuracy.
inline std::vector<float> random_floats(std::int64_t n, std::uint64_t seed) {
  std::vector<float> out(static_cast<std::size_t>(n));
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& f : out) {
    x += 0x9E3779B97F4A7C15ull;
    std::uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    f = static_cast<float>(z >> 40) * (4.0f / 16777216.0f) - 2.0f;
  }
  return out;
}

inline CacheShape one_layer_shape(std::int64_t num_kv_heads, std::int64_t num_q_heads, std::int64_t head_dim,
                                  std::int64_t capacity) {
  return CacheShape{1, num_kv_heads, num_q_heads, head_dim, capacity};
}

// Appends `len` random tokens to layer 0 in one block: slot j holds position j afterwards.
inline void fill(Cache& cache, std::int64_t len, std::uint64_t seed) {
  const CacheShape& s = cache.shape();
  const std::int64_t n = s.num_kv_heads * len * s.head_dim;
  const std::vector<float> k = random_floats(n, seed);
  const std::vector<float> v = random_floats(n, seed + 1);
  cache.append(0, HostSpan<const float>(k.data(), n), HostSpan<const float>(v.data(), n), len);
}

// Bytes of one K row plus one V row.
inline std::int64_t kv_row_bytes(std::int64_t head_dim) {
  return 2 * head_dim * static_cast<std::int64_t>(sizeof(float));
}

// The setup of one configuration, kept alive between the runs Google Benchmark makes of a
// benchmark (it calls the function again for every iteration-count trial and repetition), so a
// cache of up to 128 MiB is allocated, filled and warmed up once per configuration rather than
// once per trial. One live setup per Setup type: a new configuration frees the previous one.
// The timed loops must leave a setup reusable (same lengths, same plan), which ours do.
template <class Setup, class... Args>
Setup& shared_setup(Args... args) {
  static std::tuple<Args...> key{};
  static std::unique_ptr<Setup> setup;
  if (setup == nullptr || key != std::tuple<Args...>(args...)) {
    setup.reset();
    setup = std::make_unique<Setup>(args...);
    key = std::tuple<Args...>(args...);
  }
  return *setup;
}

// Runs `f` once under steady_clock and records it as this iteration's time (UseManualTime):
// for loops whose iterations also do untimed engine work. steady_clock costs ~30 ns a read here,
// but it is wall time: on a shared machine it also counts other tenants' time slices.
template <class F>
inline void time_call(benchmark::State& state, F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  const auto t1 = std::chrono::steady_clock::now();
  state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
}

// "BM_X/<tag>": Args()/ArgNames() then append "/T:1024/dim:64", shared by every member of a pair.
inline std::string bench_name(const char* family, const char* tag) {
  std::string name = family;
  if (tag != nullptr && tag[0] != '\0') name += std::string("/") + tag;
  return name;
}

// ---- Observation-window scoring: shared inputs and the GEMM baseline ----
// window_bench.cpp (BM_WindowScoring) and cake_bench.cpp (BM_CakeScoring) each sit beside the GEMM
// inside them; both build their inputs from these seeds so the pair sees the same data.

// One kv-head of T keys: fill(cache, T, kWindowKeySeed). Queries [q_head, window, head_dim]:
// random_floats(group * window * head_dim, kWindowQuerySeed).
inline constexpr std::uint64_t kWindowKeySeed = 13;
inline constexpr std::uint64_t kWindowQuerySeed = 31;

// Per iteration: bytes read (one GQA group's window queries and the T keys) and logits computed.
inline void set_window_scoring_throughput(benchmark::State& state, std::int64_t window, std::int64_t group,
                                          std::int64_t t, std::int64_t head_dim) {
  const auto iters = static_cast<std::int64_t>(state.iterations());
  state.SetBytesProcessed(iters * (group * window + t) * head_dim * static_cast<std::int64_t>(sizeof(float)));
  state.SetItemsProcessed(iters * group * window * t);
}

// The Eigen GEMM inside window scoring, alone, with the scoring benchmark's arguments (range(0) = T,
// range(1) = head_dim): per q-head of one GQA group, logits[w, T] = (Q[w, d] x K[T, d]^T) * scale,
// scale = 1 / sqrt(d). Register it with the pair's window and group. Bound: compute.
inline void window_gemm_baseline(benchmark::State& state, std::int64_t window, std::int64_t group) {
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  Cache cache(one_layer_shape(1, group, head_dim, t));
  fill(cache, t, kWindowKeySeed);
  const std::vector<float> keys = cache.keys(0, 0);
  const std::vector<float> queries = random_floats(group * window * head_dim, kWindowQuerySeed);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const Eigen::Map<const RowMatrix> k(keys.data(), t, head_dim);
  RowMatrix logits(window, t);
  auto run = [&] {
    for (std::int64_t qh = 0; qh < group; ++qh) {
      const Eigen::Map<const RowMatrix> q(queries.data() + qh * window * head_dim, window, head_dim);
      logits.noalias() = (q * k.transpose()) * scale;
      benchmark::DoNotOptimize(logits.data());
    }
  };
  run();  // warm-up
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  set_window_scoring_throughput(state, window, group, t, head_dim);
}

}  // namespace kvevict::bench
