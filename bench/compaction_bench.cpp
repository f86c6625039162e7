// Compaction and decode-time replacement on the CPU backend beside memcpy of the same bytes
// (and, for compaction, beside a plain row gather of the same source rows). Bound: memory
// bandwidth. Bytes processed = K + V (+ score) bytes actually moved.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <span>
#include <vector>

#include "bench_support.hpp"

namespace kvevict::bench {
namespace {

// Which half of the slots a stable compaction keeps (each keeps capacity / 2 per kv-head).
enum class KeepPattern {
  alternate,    // every other slot: runs of one row, the worst case for a row-wise gather
  random_half,  // a random half, different per kv-head (H2O/SnapKV-like top-k)
  sink_recent,  // 4 sinks + the newest capacity/2 - 4 (StreamingLLM prefill): one long run
};

struct KeepSet {
  std::vector<std::int32_t> slots;   // [kv_head, capacity], ascending within a head
  std::vector<std::int64_t> counts;  // [kv_head]
  std::vector<std::int64_t> moved;   // [kv_head] rows with keep[i] != i
  std::int64_t moved_rows = 0;
};

KeepSet make_keep_set(KeepPattern pattern, std::int64_t num_kv_heads, std::int64_t capacity) {
  KeepSet ks;
  ks.slots.assign(static_cast<std::size_t>(num_kv_heads * capacity), 0);
  const std::int64_t keep = capacity / 2;
  std::mt19937 gen(1234);
  std::vector<std::int32_t> all(static_cast<std::size_t>(capacity));
  for (std::int64_t h = 0; h < num_kv_heads; ++h) {
    std::int32_t* out = ks.slots.data() + h * capacity;
    switch (pattern) {
      case KeepPattern::alternate:
        for (std::int64_t i = 0; i < keep; ++i) out[i] = static_cast<std::int32_t>(2 * i + 1);
        break;
      case KeepPattern::random_half:
        std::iota(all.begin(), all.end(), 0);
        std::shuffle(all.begin(), all.end(), gen);
        std::sort(all.begin(), all.begin() + keep);
        std::copy(all.begin(), all.begin() + keep, out);
        break;
      case KeepPattern::sink_recent:
        for (std::int64_t i = 0; i < keep; ++i)
          out[i] = static_cast<std::int32_t>(i < 4 ? i : capacity - keep + i);
        break;
    }
    std::int64_t moved = 0;
    for (std::int64_t i = 0; i < keep; ++i) moved += out[i] != i ? 1 : 0;
    ks.counts.push_back(keep);
    ks.moved.push_back(moved);
    ks.moved_rows += moved;
  }
  return ks;
}

const char* pattern_name(KeepPattern p) {
  switch (p) {
    case KeepPattern::alternate: return "alternate";
    case KeepPattern::random_half: return "random_half";
    case KeepPattern::sink_recent: return "sink_recent";
  }
  return "?";
}

// H2O's per-q-head scores travel with their entries: a [kv_head * group, capacity] extra.
constexpr std::int64_t kScoreRows = kNumQHeads / kNumKvHeads;

struct CompactSetup {
  Cache cache;
  std::vector<float> scores;  // [kv_head * kScoreRows, capacity]
  SlotExtra extra;

  CompactSetup(std::int64_t capacity, std::int64_t head_dim)
      : cache(one_layer_shape(kNumKvHeads, kNumQHeads, head_dim, capacity)) {
    fill(cache, capacity, 7);
    scores = random_floats(kNumKvHeads * kScoreRows * capacity, 9);
    extra = SlotExtra{scores.data(), kScoreRows};
  }
};

// CpuBackend::compact straight on a full layer. compact reads only keep_slots/keep_count, so
// repeating the same plan moves the same rows every iteration (lens stay at capacity).
void BM_CompactCpu(benchmark::State& state, KeepPattern pattern, bool with_scores) {
  const std::int64_t capacity = state.range(0), head_dim = state.range(1);
  CompactSetup& s = shared_setup<CompactSetup>(capacity, head_dim);
  const KeepSet ks = make_keep_set(pattern, kNumKvHeads, capacity);
  const LayerView<float> view = s.cache.view(0);
  const std::span<const SlotExtra> extras = with_scores ? std::span<const SlotExtra>(&s.extra, 1) : std::span<const SlotExtra>();
  CpuBackend& backend = s.cache.backend();
  backend.compact(view, ks.slots.data(), ks.counts.data(), extras);  // warm-up
  for (auto _ : state) {
    backend.compact(view, ks.slots.data(), ks.counts.data(), extras);
    benchmark::ClobberMemory();
  }
  const std::int64_t bytes =
      ks.moved_rows * (kv_row_bytes(head_dim) + (with_scores ? kScoreRows * static_cast<std::int64_t>(sizeof(float)) : 0));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * bytes);
  state.counters["moved_rows"] = static_cast<double>(ks.moved_rows);
}

// Baseline: per kv-head one memcpy of the moved K rows, one of the V rows (and one per score
// row), from the upper half of the same buffers into the lower half.
void BM_MemcpyCpu(benchmark::State& state, KeepPattern pattern, bool with_scores) {
  const std::int64_t capacity = state.range(0), head_dim = state.range(1);
  CompactSetup& s = shared_setup<CompactSetup>(capacity, head_dim);
  const KeepSet ks = make_keep_set(pattern, kNumKvHeads, capacity);
  const LayerView<float> view = s.cache.view(0);
  auto copy_all = [&] {
    for (std::int64_t h = 0; h < kNumKvHeads; ++h) {
      const std::int64_t m = ks.moved[static_cast<std::size_t>(h)];
      const auto bytes = static_cast<std::size_t>(m * head_dim) * sizeof(float);
      std::memcpy(view.key(h, 0), view.key(h, capacity - m), bytes);
      std::memcpy(view.value(h, 0), view.value(h, capacity - m), bytes);
      if (with_scores)
        for (std::int64_t r = 0; r < kScoreRows; ++r) {
          float* row = s.scores.data() + (h * kScoreRows + r) * capacity;
          std::memcpy(row, row + capacity - m, static_cast<std::size_t>(m) * sizeof(float));
        }
    }
  };
  copy_all();  // warm-up
  for (auto _ : state) {
    copy_all();
    benchmark::ClobberMemory();
  }
  const std::int64_t bytes =
      ks.moved_rows * (kv_row_bytes(head_dim) + (with_scores ? kScoreRows * static_cast<std::int64_t>(sizeof(float)) : 0));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * bytes);
  state.counters["moved_rows"] = static_cast<double>(ks.moved_rows);
}

// Second baseline, for the access pattern: the same source rows (every kept row that moves),
// copied row by row with memcpy, all of K then all of V, into a separate contiguous buffer. No
// in-place hazard and no run detection: what a row gather costs on this machine for the pattern.
void BM_GatherRowsCpu(benchmark::State& state, KeepPattern pattern) {
  const std::int64_t capacity = state.range(0), head_dim = state.range(1);
  CompactSetup& s = shared_setup<CompactSetup>(capacity, head_dim);
  const KeepSet ks = make_keep_set(pattern, kNumKvHeads, capacity);
  const LayerView<float> view = s.cache.view(0);
  std::vector<float>& dst = shared_setup<std::vector<float>>(static_cast<std::size_t>(ks.moved_rows * 2 * head_dim));
  const auto row_bytes = static_cast<std::size_t>(head_dim) * sizeof(float);
  auto gather = [&] {
    float* out = dst.data();
    for (std::int64_t h = 0; h < kNumKvHeads; ++h) {
      const std::int32_t* keep = ks.slots.data() + h * capacity;
      const std::int64_t k = ks.counts[static_cast<std::size_t>(h)];
      for (const float* head : {view.key(h, 0), view.value(h, 0)})
        for (std::int64_t i = 0; i < k; ++i)
          if (keep[i] != i) {
            std::memcpy(out, head + keep[i] * view.slot_stride, row_bytes);
            out += head_dim;
          }
    }
  };
  gather();  // warm-up
  for (auto _ : state) {
    gather();
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * ks.moved_rows * kv_row_bytes(head_dim));
  state.counters["moved_rows"] = static_cast<double>(ks.moved_rows);
}

// Decode-time eviction: every kv-head's newest slot moves into a victim slot. Victims cycle
// through a precomputed random sequence so rows come from all over the cache, as in decoding.
constexpr std::int64_t kVictimSets = 1024;

std::vector<std::int32_t> victim_sequence(std::int64_t capacity) {
  std::mt19937 gen(77);
  std::uniform_int_distribution<std::int32_t> dist(0, static_cast<std::int32_t>(capacity - 2));
  std::vector<std::int32_t> v(static_cast<std::size_t>(kVictimSets * kNumKvHeads));
  for (auto& x : v) x = dist(gen);
  return v;
}

void BM_ReplaceWithLastCpu(benchmark::State& state, bool with_scores) {
  const std::int64_t capacity = state.range(0), head_dim = state.range(1);
  CompactSetup& s = shared_setup<CompactSetup>(capacity, head_dim);
  const std::vector<std::int32_t> victims = victim_sequence(capacity);
  const LayerView<float> view = s.cache.view(0);
  const std::span<const SlotExtra> extras = with_scores ? std::span<const SlotExtra>(&s.extra, 1) : std::span<const SlotExtra>();
  const CpuBackend& backend = s.cache.backend();
  std::int64_t step = 0;
  for (auto _ : state) {
    backend.replace_with_last(view, victims.data() + (step % kVictimSets) * kNumKvHeads, extras);
    ++step;
    benchmark::ClobberMemory();
  }
  const std::int64_t bytes =
      kNumKvHeads * (kv_row_bytes(head_dim) + (with_scores ? kScoreRows * static_cast<std::int64_t>(sizeof(float)) : 0));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * bytes);
}

// Baseline: per kv-head one memcpy of a K row and one of a V row (and the score floats) from
// the last slot into the same victim slots.
void BM_MemcpyRowCpu(benchmark::State& state, bool with_scores) {
  const std::int64_t capacity = state.range(0), head_dim = state.range(1);
  CompactSetup& s = shared_setup<CompactSetup>(capacity, head_dim);
  const std::vector<std::int32_t> victims = victim_sequence(capacity);
  const LayerView<float> view = s.cache.view(0);
  const auto row_bytes = static_cast<std::size_t>(head_dim) * sizeof(float);
  std::int64_t step = 0;
  for (auto _ : state) {
    const std::int32_t* vict = victims.data() + (step % kVictimSets) * kNumKvHeads;
    for (std::int64_t h = 0; h < kNumKvHeads; ++h) {
      std::memcpy(view.key(h, vict[h]), view.key(h, capacity - 1), row_bytes);
      std::memcpy(view.value(h, vict[h]), view.value(h, capacity - 1), row_bytes);
      if (with_scores)
        for (std::int64_t r = 0; r < kScoreRows; ++r) {
          float* row = s.scores.data() + (h * kScoreRows + r) * capacity;
          row[vict[h]] = row[capacity - 1];
        }
    }
    ++step;
    benchmark::ClobberMemory();
  }
  const std::int64_t bytes =
      kNumKvHeads * (kv_row_bytes(head_dim) + (with_scores ? kScoreRows * static_cast<std::int64_t>(sizeof(float)) : 0));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * bytes);
}

// Pairs registered next to each other (compact, then its memcpy) so both see the same noise.
[[maybe_unused]] const int kRegistered = [] {
  for (const std::int64_t capacity : {4096, 16384})
    for (const std::int64_t head_dim : {64, 128}) {
      for (const KeepPattern p : {KeepPattern::alternate, KeepPattern::random_half, KeepPattern::sink_recent}) {
        benchmark::RegisterBenchmark(bench_name("BM_CompactCpu", pattern_name(p)).c_str(),
                                     [p](benchmark::State& st) { BM_CompactCpu(st, p, false); })
            ->Args({capacity, head_dim})
            ->ArgNames({"cap", "dim"})
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark(bench_name("BM_MemcpyCpu", pattern_name(p)).c_str(),
                                     [p](benchmark::State& st) { BM_MemcpyCpu(st, p, false); })
            ->Args({capacity, head_dim})
            ->ArgNames({"cap", "dim"})
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark(bench_name("BM_GatherRowsCpu", pattern_name(p)).c_str(),
                                     [p](benchmark::State& st) { BM_GatherRowsCpu(st, p); })
            ->Args({capacity, head_dim})
            ->ArgNames({"cap", "dim"})
            ->Unit(benchmark::kMicrosecond);
      }
      benchmark::RegisterBenchmark(bench_name("BM_CompactCpuWithScores", "random_half").c_str(),
                                   [](benchmark::State& st) { BM_CompactCpu(st, KeepPattern::random_half, true); })
          ->Args({capacity, head_dim})
            ->ArgNames({"cap", "dim"})
          ->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(bench_name("BM_MemcpyCpuWithScores", "random_half").c_str(),
                                   [](benchmark::State& st) { BM_MemcpyCpu(st, KeepPattern::random_half, true); })
          ->Args({capacity, head_dim})
            ->ArgNames({"cap", "dim"})
          ->Unit(benchmark::kMicrosecond);
    }
  for (const std::int64_t capacity : {1024, 16384})
    for (const std::int64_t head_dim : {64, 128})
      for (const bool with_scores : {false, true}) {
        const char* tag = with_scores ? "with_scores" : "";
        benchmark::RegisterBenchmark(bench_name("BM_ReplaceWithLastCpu", tag).c_str(),
                                     [with_scores](benchmark::State& st) { BM_ReplaceWithLastCpu(st, with_scores); })
            ->Args({capacity, head_dim})
            ->ArgNames({"cap", "dim"});
        benchmark::RegisterBenchmark(bench_name("BM_MemcpyRowCpu", tag).c_str(),
                                     [with_scores](benchmark::State& st) { BM_MemcpyRowCpu(st, with_scores); })
            ->Args({capacity, head_dim})
            ->ArgNames({"cap", "dim"});
      }
  return 0;
}();

}  // namespace
}  // namespace kvevict::bench
