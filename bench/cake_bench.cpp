// CAKE on the CPU backend, each figure beside its baseline from the same run:
//   BM_CakeScoring          one layer's prefill scoring: cake_window_scores (window GEMM, masked
//                           softmax, mean + gamma * var, entropy and variance) then
//                           cake_pool_in_order (avg pool 5, group mean). w = 32 window queries
//                           over T keys, GQA group 4. Bound: compute (GEMM, exp, log).
//   BM_WindowGemm/cake      the Eigen GEMM inside it, alone: [w, d] x [d, T] per q-head
//                           (bench_support.hpp's window_gemm_baseline, as BM_WindowGemm).
//   BM_CakeCascade          one cascade step, CAKE::rebalance(): split the total over `layers`
//                           prefilled layers of T tokens and re-evict them all (top-k selection,
//                           stable compaction of K, V and scores, re-ranking). 4 kv-heads.
//                           Timed by thread CPU time (see time_thread_cpu).
//   BM_MemcpyCascade        memcpy of the bytes that step moves (the rows whose slot changes, K +
//                           V + score). Bound: bandwidth. Compare its CPU time.
// Bytes processed: scoring pairs count the queries and keys read; cascade pairs the bytes moved.
#include <time.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bench_support.hpp"

namespace kvevict::bench {
namespace {

constexpr std::int64_t kWindow = 32;
constexpr std::int64_t kGroup = 4;  // q-heads per kv-head of the scoring pair

// ---- scoring vs its GEMM ----

struct ScoringSetup {
  Cache cache;
  std::vector<float> queries;    // [q_head, w, head_dim]
  std::vector<float> indicator;  // [q_head, T]
  std::vector<float> scores;     // [kv_head, T]
  std::vector<float> order;      // [kv_head, T] (unused: every entry is fresh at prefill)
  std::vector<float> ws_rows, ws_terms;
  std::vector<std::int32_t> ws_slots;
  float scale;

  ScoringSetup(std::int64_t t, std::int64_t head_dim)
      : cache(one_layer_shape(1, kGroup, head_dim, t)),
        queries(random_floats(kGroup * kWindow * head_dim, kWindowQuerySeed)),
        indicator(static_cast<std::size_t>(kGroup * t)),
        scores(static_cast<std::size_t>(t)),
        order(static_cast<std::size_t>(t)),
        scale(1.0f / std::sqrt(static_cast<float>(head_dim))) {
    fill(cache, t, kWindowKeySeed);
    const CakeWorkspaceSize ws = cake_workspace_size(cache.shape(), kWindow);
    ws_rows.resize(static_cast<std::size_t>(ws.rows));
    ws_terms.resize(static_cast<std::size_t>(ws.terms));
    ws_slots.resize(static_cast<std::size_t>(ws.slots));
  }
  [[nodiscard]] CakeWorkspace workspace() { return {ws_rows.data(), ws_terms.data(), ws_slots.data()}; }
};

void BM_CakeScoring(benchmark::State& state) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  ScoringSetup s(t, head_dim);
  CakeWindowStats stats;
  auto run = [&] {
    CpuBackend& b = s.cache.backend();
    const LayerView<float> v = s.cache.view(0);
    cake_window_scores(b, v, s.queries.data(), kWindow, t - kWindow, s.scale, 200.0f, s.indicator.data(), stats,
                       s.workspace());
    cake_pool_in_order(b, v, s.indicator.data(), t, s.order.data(), 0, t, kWindow, 5, s.scores.data(), s.workspace());
  };
  run();  // warm-up
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(s.scores.data());
    benchmark::DoNotOptimize(stats);
    benchmark::ClobberMemory();
  }
  set_window_scoring_throughput(state, kWindow, kGroup, t, head_dim);  // items: window probabilities
}

// ---- one cascade step vs memcpy of what it moves ----

constexpr std::int64_t kCascadeKvHeads = 4;
constexpr std::int64_t kCascadeIterations = 20;  // each needs an untimed prefill of every layer

// `layers` prefilled (scored, nothing evicted yet: the policy is non-cascading and the cache has
// one more layer than were prefilled), ready for rebalance().
struct CascadeSetup {
  std::int64_t layers, t, head_dim;
  CAKEConfig cfg;
  Cache cache;
  CAKE<Cache> policy;
  std::vector<float> keys, values, queries;

  static CAKEConfig config(std::int64_t t) {
    CAKEConfig c;
    c.cache_size = t / 4;  // a 4x compression on average
    c.window = kWindow;
    c.cascading = false;
    return c;
  }
  CascadeSetup(std::int64_t layers_, std::int64_t t_, std::int64_t head_dim_)
      : layers(layers_), t(t_), head_dim(head_dim_), cfg(config(t_)),
        cache(CacheShape{layers_ + 1, kCascadeKvHeads, kCascadeKvHeads, head_dim_, cake_capacity(cfg, t_)}),
        policy(cache, cfg) {}

  void prefill() {
    cache.clear();
    policy.reset();
    const std::int64_t n = kCascadeKvHeads * t * head_dim, nq = kCascadeKvHeads * kWindow * head_dim;
    for (std::int64_t l = 0; l < layers; ++l) {
      // Different data per layer, so the preferences (and the split) differ.
      keys = random_floats(n, 100 + static_cast<std::uint64_t>(l));
      values = random_floats(n, 200 + static_cast<std::uint64_t>(l));
      queries = random_floats(nq, 300 + static_cast<std::uint64_t>(l));
      for (float& q : queries) q *= 1.0f + static_cast<float>(l);  // sharper attention in deeper layers
      cache.append(l, HostSpan<const float>(keys.data(), n), HostSpan<const float>(values.data(), n), t);
      policy.on_prefill(cache, l, Observation<float, HostSpace>::from_queries({queries.data(), nq}, kWindow));
    }
  }
  // Rows whose slot the step changes, per (layer, kv_head): the kept entries are positions in
  // ascending slot order, and slot == position before the step.
  [[nodiscard]] std::vector<std::int64_t> moved_rows() const {
    std::vector<std::int64_t> moved;
    for (std::int64_t l = 0; l < layers; ++l)
      for (std::int64_t h = 0; h < kCascadeKvHeads; ++h) {
        const auto kept = cache.kept_positions(l, h);
        std::int64_t m = 0;
        for (std::size_t i = 0; i < kept.size(); ++i) m += kept[i] != static_cast<std::int32_t>(i) ? 1 : 0;
        moved.push_back(m);
      }
    return moved;
  }
};

// Runs `f` once and records its thread CPU time as the iteration's time (UseManualTime): the
// step needs an untimed prefill before it, and CPU time is what compares with the memcpy
// baseline's CPU time on a shared machine (on an idle one they equal the wall times).
template <class F>
void time_thread_cpu(benchmark::State& state, F&& f) {
  timespec t0{}, t1{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  f();
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  state.SetIterationTime(static_cast<double>(t1.tv_sec - t0.tv_sec) + 1e-9 * static_cast<double>(t1.tv_nsec - t0.tv_nsec));
}

std::int64_t cascade_bytes(const std::vector<std::int64_t>& moved, std::int64_t head_dim) {
  std::int64_t rows = 0;
  for (auto m : moved) rows += m;
  return rows * (kv_row_bytes(head_dim) + static_cast<std::int64_t>(sizeof(float)));
}

void BM_CakeCascade(benchmark::State& state) {
  const std::int64_t layers = state.range(0), t = state.range(1), head_dim = state.range(2);
  CascadeSetup s(layers, t, head_dim);
  s.prefill();
  s.policy.rebalance(s.cache);  // warm-up, and the rows it moves
  const std::int64_t bytes = cascade_bytes(s.moved_rows(), head_dim);
  for (auto _ : state) {
    s.prefill();
    time_thread_cpu(state, [&] { s.policy.rebalance(s.cache); });
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * bytes);
  state.counters["kept_entries"] = static_cast<double>(s.cache.entries_kept());
}

// Baseline: per (layer, kv_head) one memcpy of the moved K rows, one of the V rows and one of the
// score floats, between two buffers of the cache's layout.
void BM_MemcpyCascade(benchmark::State& state) {
  const std::int64_t layers = state.range(0), t = state.range(1), head_dim = state.range(2);
  std::vector<std::int64_t> moved;
  {
    CascadeSetup s(layers, t, head_dim);
    s.prefill();
    s.policy.rebalance(s.cache);
    moved = s.moved_rows();
  }
  const std::int64_t head_elems = t * head_dim, heads = layers * kCascadeKvHeads;
  std::vector<float> src_k = random_floats(heads * head_elems, 5), src_v = random_floats(heads * head_elems, 6);
  std::vector<float> dst_k(src_k.size()), dst_v(src_v.size()), src_s(static_cast<std::size_t>(heads * t), 1.0f),
      dst_s(src_s.size());
  auto copy_all = [&] {
    for (std::int64_t i = 0; i < heads; ++i) {
      const std::int64_t m = moved[static_cast<std::size_t>(i)];
      const auto bytes = static_cast<std::size_t>(m * head_dim) * sizeof(float);
      std::memcpy(dst_k.data() + i * head_elems, src_k.data() + i * head_elems + (t - m) * head_dim, bytes);
      std::memcpy(dst_v.data() + i * head_elems, src_v.data() + i * head_elems + (t - m) * head_dim, bytes);
      std::memcpy(dst_s.data() + i * t, src_s.data() + i * t + (t - m), static_cast<std::size_t>(m) * sizeof(float));
    }
  };
  copy_all();
  for (auto _ : state) {
    copy_all();
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * cascade_bytes(moved, head_dim));
}

// Pairs registered next to each other so both see the same noise.
[[maybe_unused]] const int kRegistered = [] {
  for (const std::int64_t t : {1024, 4096})
    for (const std::int64_t head_dim : {64, 128}) {
      benchmark::RegisterBenchmark("BM_CakeScoring", BM_CakeScoring)->Args({t, head_dim})->ArgNames({"T", "dim"});
      benchmark::RegisterBenchmark(bench_name("BM_WindowGemm", "cake").c_str(), window_gemm_baseline, kWindow, kGroup)
          ->Args({t, head_dim})
          ->ArgNames({"T", "dim"});
    }
  for (const std::int64_t layers : {8, 16})
    for (const std::int64_t t : {1024, 2048}) {
      benchmark::RegisterBenchmark("BM_CakeCascade", BM_CakeCascade)
          ->Args({layers, t, 128})
          ->ArgNames({"layers", "T", "dim"})
          ->UseManualTime()
          ->Iterations(kCascadeIterations)
          ->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark("BM_MemcpyCascade", BM_MemcpyCascade)
          ->Args({layers, t, 128})
          ->ArgNames({"layers", "T", "dim"})
          ->Unit(benchmark::kMicrosecond);
    }
  return 0;
}();

}  // namespace
}  // namespace kvevict::bench
