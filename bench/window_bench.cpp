// Observation-window primitives of the CPU backend, each beside the baseline that bounds it, with
// identical arguments:
//   BM_WindowScoring  CpuBackend::window_column_stats (w = 32 window queries over T keys, GQA group 4)
//   BM_WindowGemm     the Eigen GEMM inside it, alone: [w, d] x [d, T] per q-head (bench_support.hpp's
//                     window_gemm_baseline, shared with cake_bench.cpp). Bound: compute.
//   BM_PoolAvg/Max    CpuBackend::pool_tokens over [0, T - w) of 8 kv-heads x 4 rows
//   BM_ReadBytesPool  a plain sum over the same input bytes. Bound: bandwidth (k reads per output).
//   BM_SelectTopK     CpuBackend::select_topk keeping half of T per kv-head (8 heads)
//   BM_ReadBytesTopK  a plain sum over the same scores.
//   BM_CompactPerHead CpuBackend::compact with AdaKV-style per-head counts (head_budgets)
//   BM_MemcpyPerHead  memcpy of the bytes that compaction moves. Bound: bandwidth.
// Allocation and warm-up happen outside the timed loops; bytes processed are the bytes read (or
// moved), so the pair's GB/s compare directly.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bench_support.hpp"

namespace kvevict::bench {
namespace {

constexpr std::int64_t kWindow = 32;
constexpr std::int64_t kGroup = 4;      // q-heads per kv-head in the scoring pair
constexpr std::int64_t kPoolHeads = 8;  // kv-heads of the pool / top-k / compaction pairs
constexpr std::int64_t kPoolRows = 4;   // q-head rows per kv-head pooled (kvpress: pool, then group mean)

float sum_of(const float* p, std::int64_t n) {
  float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, acc3 = 0.0f;
  std::int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    acc0 += p[i];
    acc1 += p[i + 1];
    acc2 += p[i + 2];
    acc3 += p[i + 3];
  }
  for (; i < n; ++i) acc0 += p[i];
  return (acc0 + acc1) + (acc2 + acc3);
}

// ---- window scoring vs its GEMM ----

struct ScoringSetup {
  Cache cache;
  std::vector<float> queries;  // [q_head, w, head_dim]
  std::vector<float> sums;     // [q_head, T]
  float scale;

  ScoringSetup(std::int64_t t, std::int64_t head_dim)
      : cache(one_layer_shape(1, kGroup, head_dim, t)),
        queries(random_floats(kGroup * kWindow * head_dim, kWindowQuerySeed)),
        sums(static_cast<std::size_t>(kGroup * t)),
        scale(1.0f / std::sqrt(static_cast<float>(head_dim))) {
    fill(cache, t, kWindowKeySeed);
  }
};

void BM_WindowScoring(benchmark::State& state) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  ScoringSetup s(t, head_dim);
  auto run = [&] {
    s.cache.backend().window_column_stats(s.cache.view(0), s.queries.data(), kWindow, t - kWindow, s.scale, s.sums.data(),
                                          nullptr);
  };
  run();  // warm-up
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(s.sums.data());
    benchmark::ClobberMemory();
  }
  set_window_scoring_throughput(state, kWindow, kGroup, t, head_dim);
}

// ---- pooling vs a read of its input ----

struct PoolSetup {
  Cache cache;  // only its view is used: lens = T per kv-head
  std::vector<float> in, out;  // [kv_head * rows, T]
  std::vector<std::int64_t> span;

  explicit PoolSetup(std::int64_t t)
      : cache(one_layer_shape(kPoolHeads, kPoolHeads * kPoolRows, 4, t)),
        in(random_floats(kPoolHeads * kPoolRows * t, 41)),
        out(in.size()),
        span(static_cast<std::size_t>(kPoolHeads), t - kWindow) {
    fill(cache, t, 17);
  }
};

void set_bytes(benchmark::State& state, std::int64_t bytes) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * bytes);
}

template <PoolKind Kind>
void BM_Pool(benchmark::State& state) {
  const std::int64_t t = state.range(0), kernel = state.range(1);
  PoolSetup s(t);
  auto run = [&] { s.cache.backend().pool_tokens(s.cache.view(0), s.in.data(), s.out.data(), kPoolRows, s.span.data(), kernel, Kind); };
  run();
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(s.out.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, static_cast<std::int64_t>(s.in.size() * sizeof(float)));
}

void BM_ReadBytesPool(benchmark::State& state) {
  const std::int64_t t = state.range(0);
  PoolSetup s(t);
  for (auto _ : state) {
    float acc = sum_of(s.in.data(), static_cast<std::int64_t>(s.in.size()));
    benchmark::DoNotOptimize(acc);
  }
  set_bytes(state, static_cast<std::int64_t>(s.in.size() * sizeof(float)));
}

// ---- top-k selection vs a read of the scores ----

struct TopKSetup {
  Cache cache;
  std::vector<float> scores;  // [kv_head, T]
  std::vector<std::int64_t> keep;
  std::vector<std::int32_t> slots;

  explicit TopKSetup(std::int64_t t)
      : cache(one_layer_shape(kPoolHeads, kPoolHeads, 4, t)),
        scores(random_floats(kPoolHeads * t, 43)),
        keep(static_cast<std::size_t>(kPoolHeads), t / 2),
        slots(static_cast<std::size_t>(kPoolHeads * t)) {
    fill(cache, t, 19);
  }
};

void BM_SelectTopK(benchmark::State& state) {
  const std::int64_t t = state.range(0);
  TopKSetup s(t);
  const ProtectRule window{0, t - kWindow};  // SnapKV's protected window
  auto run = [&] { s.cache.backend().select_topk(s.cache.view(0), s.scores.data(), window, s.keep.data(), s.slots.data()); };
  run();
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(s.slots.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, static_cast<std::int64_t>(s.scores.size() * sizeof(float)));
}

void BM_ReadBytesTopK(benchmark::State& state) {
  const std::int64_t t = state.range(0);
  TopKSetup s(t);
  for (auto _ : state) {
    float acc = sum_of(s.scores.data(), static_cast<std::int64_t>(s.scores.size()));
    benchmark::DoNotOptimize(acc);
  }
  set_bytes(state, static_cast<std::int64_t>(s.scores.size() * sizeof(float)));
}

// ---- per-head compaction (adaptive budgets) vs memcpy of the moved bytes ----

struct CompactSetup {
  Cache cache;
  std::vector<std::int64_t> counts;  // [kv_head] from head_budgets: different per head
  std::vector<std::int32_t> slots;   // [kv_head, T]
  std::int64_t moved_rows = 0;

  CompactSetup(std::int64_t t, std::int64_t head_dim)
      : cache(one_layer_shape(kPoolHeads, kPoolHeads, head_dim, t)),
        counts(static_cast<std::size_t>(kPoolHeads)),
        slots(static_cast<std::size_t>(kPoolHeads * t)) {
    fill(cache, t, 23);
    // Scores whose spread differs per head, so the layer-wide allocation gives heads different
    // budgets (half of the layer kept overall, floor 20 % of the uniform share).
    std::vector<float> scores = random_floats(kPoolHeads * t, 47);
    for (std::int64_t h = 0; h < kPoolHeads; ++h)
      for (std::int64_t j = 0; j < t; ++j) scores[static_cast<std::size_t>(h * t + j)] *= 1.0f + 0.25f * static_cast<float>(h);
    const ProtectRule window{0, t - kWindow};
    const std::int64_t share = t / 2 - kWindow;
    auto& b = cache.backend();
    b.head_budgets(cache.view(0), scores.data(), window, kPoolHeads * share, share / 5, counts.data());
    b.select_topk(cache.view(0), scores.data(), window, counts.data(), slots.data());
    for (std::int64_t h = 0; h < kPoolHeads; ++h)
      for (std::int64_t i = 0; i < counts[static_cast<std::size_t>(h)]; ++i) moved_rows += slots[static_cast<std::size_t>(h * t + i)] != i ? 1 : 0;
  }
  [[nodiscard]] std::int64_t moved_bytes(std::int64_t head_dim) const {
    return moved_rows * (kv_row_bytes(head_dim) + static_cast<std::int64_t>(sizeof(std::int32_t)));
  }
};

void BM_CompactPerHead(benchmark::State& state) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  CompactSetup s(t, head_dim);
  // compact() leaves lens alone (the cache updates them), so the same plan moves the same rows
  // every iteration: no refill inside the loop.
  auto run = [&] { s.cache.backend().compact(s.cache.view(0), s.slots.data(), s.counts.data(), {}); };
  run();
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  set_bytes(state, s.moved_bytes(head_dim));
  state.counters["min_budget"] = static_cast<double>(*std::min_element(s.counts.begin(), s.counts.end()));
  state.counters["max_budget"] = static_cast<double>(*std::max_element(s.counts.begin(), s.counts.end()));
}

void BM_MemcpyPerHead(benchmark::State& state) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  CompactSetup s(t, head_dim);
  // Per head: one memcpy each of the moved K rows, V rows and positions.
  std::vector<std::int64_t> moved(static_cast<std::size_t>(kPoolHeads), 0);
  for (std::int64_t h = 0; h < kPoolHeads; ++h)
    for (std::int64_t i = 0; i < s.counts[static_cast<std::size_t>(h)]; ++i)
      moved[static_cast<std::size_t>(h)] += s.slots[static_cast<std::size_t>(h * t + i)] != i ? 1 : 0;
  const std::int64_t head_elems = t * head_dim;
  std::vector<float> src_k = random_floats(kPoolHeads * head_elems, 51), src_v = random_floats(kPoolHeads * head_elems, 52);
  std::vector<float> dst_k(src_k.size()), dst_v(src_v.size());
  std::vector<std::int32_t> src_p(static_cast<std::size_t>(kPoolHeads * t), 1), dst_p(src_p.size());
  auto run = [&] {
    for (std::int64_t h = 0; h < kPoolHeads; ++h) {
      const auto rows = static_cast<std::size_t>(moved[static_cast<std::size_t>(h)]);
      const auto bytes = rows * static_cast<std::size_t>(head_dim) * sizeof(float);
      std::memcpy(dst_k.data() + h * head_elems, src_k.data() + h * head_elems + head_dim, bytes);
      std::memcpy(dst_v.data() + h * head_elems, src_v.data() + h * head_elems + head_dim, bytes);
      std::memcpy(dst_p.data() + h * t, src_p.data() + h * t + 1, rows * sizeof(std::int32_t));
    }
  };
  run();
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(dst_k.data());
    benchmark::DoNotOptimize(dst_v.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, s.moved_bytes(head_dim));
}

[[maybe_unused]] const int kRegistered = [] {
  for (const std::int64_t t : {1024, 4096, 16384})
    for (const std::int64_t head_dim : {64, 128}) {
      benchmark::RegisterBenchmark("BM_WindowScoring", BM_WindowScoring)->Args({t, head_dim})->ArgNames({"T", "dim"});
      benchmark::RegisterBenchmark("BM_WindowGemm", window_gemm_baseline, kWindow, kGroup)
          ->Args({t, head_dim})
          ->ArgNames({"T", "dim"});
    }
  for (const std::int64_t t : {4096, 32768})
    for (const std::int64_t kernel : {5, 7}) {
      benchmark::RegisterBenchmark("BM_PoolAvg", BM_Pool<PoolKind::avg>)->Args({t, kernel})->ArgNames({"T", "k"});
      benchmark::RegisterBenchmark("BM_PoolMax", BM_Pool<PoolKind::max>)->Args({t, kernel})->ArgNames({"T", "k"});
      benchmark::RegisterBenchmark("BM_ReadBytesPool", BM_ReadBytesPool)->Args({t, kernel})->ArgNames({"T", "k"});
    }
  for (const std::int64_t t : {4096, 32768}) {
    benchmark::RegisterBenchmark("BM_SelectTopK", BM_SelectTopK)->Args({t})->ArgNames({"T"});
    benchmark::RegisterBenchmark("BM_ReadBytesTopK", BM_ReadBytesTopK)->Args({t})->ArgNames({"T"});
  }
  for (const std::int64_t t : {4096, 16384})
    for (const std::int64_t head_dim : {64, 128}) {
      benchmark::RegisterBenchmark("BM_CompactPerHead", BM_CompactPerHead)->Args({t, head_dim})->ArgNames({"T", "dim"});
      benchmark::RegisterBenchmark("BM_MemcpyPerHead", BM_MemcpyPerHead)->Args({t, head_dim})->ArgNames({"T", "dim"});
    }
  return 0;
}();

}  // namespace
}  // namespace kvevict::bench
