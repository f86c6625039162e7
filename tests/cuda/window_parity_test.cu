// Cross-backend parity of the observation-window primitives (WindowScoringBackend): copy_within,
// window_column_stats (from queries and from probabilities), pool_tokens, layer_mean,
// key_norm_scores, key_diff_scores, raise_protected and head_budgets, plus SnapKV / SnapKVPress /
// adaptive SnapKV and TOVA / TOVAPress prefill on KVCache<CudaBackend> against KVCache<CpuBackend>.
// Floats are compared within 1e-5 relative / 1e-6 absolute over whole buffers (dead slots
// included, so a stray write shows), head_budgets counts and kept positions exactly.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_test_support.cuh"

namespace kvevict::cuda_test {
namespace {

// GQA 1/2/4, head_dim 64/128, padded slots, lengths differing per head, an empty head, capacity to 4k.
std::vector<LayerCase> window_cases() {
  std::vector<LayerCase> cases = {
      {2, 2, 64, 300, 0, false, 31},    // G = 1
      {2, 4, 128, 1000, 3, false, 32},  // G = 2, padded slots
      {4, 16, 64, 2048, 0, false, 33},  // G = 4
      {3, 3, 64, 129, 0, true, 34},     // an empty head
  };
  if (!small_run()) cases.push_back({2, 8, 128, 4096, 0, false, 35});  // G = 4, capacity 4k
  return cases;
}

// window_column_stats' tiled passes on top of window_cases: G = 12 with head_dim 80 (a row tile
// spans q-heads, dims past the last 16-wide slice), and a capacity below the largest window (its
// queries run in several chunks, the later ones adding to the sums).
std::vector<LayerCase> window_stats_cases() {
  auto cases = window_cases();
  cases.push_back({1, 12, 80, 257, 1, false, 36});  // G = 12, head_dim not a multiple of 16
  cases.push_back({2, 2, 64, 300, 0, false, 37});   // w = 100 > 300 / 5 key ranges: two chunks
  cases.push_back({2, 4, 32, 40, 2, false, 38});    // capacity 40 < 64 < w = 100: two chunks, one key tile
  return cases;
}

TEST_CASE("window_column_stats on CUDA matches the CPU within fp32 tolerance", "[cuda][parity][window]") {
  if (!device_available()) return;
  // w: one query, a partial row tile, a whole one, and several row tiles per q-head (rows of two
  // q-heads in one tile). Key tiles: up to 64 per head, as many pass-1 key ranges.
  for (const LayerCase& c : window_stats_cases()) {
    for (const std::int64_t w : {1, 8, 32, 100}) {
      TwinLayer t(c);
      BackendPair b(c.shape());
      const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
      const auto q = random_floats(t.rng(), c.num_q_heads * w * c.head_dim, -1.5f, 1.5f);
      const auto d_q = to_device(q);
      // Late window (the newest keys masked for early queries), a window in the middle (about
      // half the keys masked per query) and a window before every key (the first queries see
      // nothing and add nothing).
      for (const std::int64_t first : {t.max_position() - w + 1, t.max_position() / 2, std::int64_t{-4}}) {
        for (const bool with_sq : {true, false}) {
          CAPTURE(c, w, first, with_sq);
          const auto sentinel = random_floats(t.rng(), c.num_q_heads * c.capacity, 5.0f, 6.0f);
          auto sums = sentinel, sumsq = sentinel;
          auto d_sums = to_device(sentinel), d_sumsq = to_device(sentinel);
          b.cpu.window_column_stats(t.cpu_view(), q.data(), w, first, scale, sums.data(), with_sq ? sumsq.data() : nullptr);
          b.gpu.window_column_stats(t.gpu_view(), d_q.data(), w, first, scale, d_sums.data(),
                                    with_sq ? d_sumsq.data() : nullptr);
          require_close(to_host(d_sums), sums, "window sums");
          require_close(to_host(d_sumsq), sumsq, "window sums of squares");
        }
      }
      // No query: the live slots are zeroed.
      const auto sentinel = random_floats(t.rng(), c.num_q_heads * c.capacity, 5.0f, 6.0f);
      auto sums = sentinel;
      auto d_sums = to_device(sentinel);
      b.cpu.window_column_stats(t.cpu_view(), q.data(), 0, 0, scale, sums.data(), nullptr);
      b.gpu.window_column_stats(t.gpu_view(), d_q.data(), 0, 0, scale, d_sums.data(), nullptr);
      require_close(to_host(d_sums), sums, "window sums of no query");
      t.require_same_state("window_column_stats (read-only)");
    }
  }
}

TEST_CASE("window_column_stats_from_probs on CUDA matches the CPU", "[cuda][parity][window]") {
  if (!device_available()) return;
  for (const LayerCase& c : window_cases()) {
    for (const std::int64_t w : {1, 8, 32}) {
      CAPTURE(c, w);
      TwinLayer t(c);
      BackendPair b(c.shape());
      const std::int64_t stride = c.capacity + 5;
      const auto probs = random_floats(t.rng(), c.num_q_heads * w * stride, 0.0f, 1.0f);
      const auto d_probs = to_device(probs);
      const auto sentinel = random_floats(t.rng(), c.num_q_heads * c.capacity, 5.0f, 6.0f);
      auto sums = sentinel, sumsq = sentinel;
      auto d_sums = to_device(sentinel), d_sumsq = to_device(sentinel);
      b.cpu.window_column_stats_from_probs(t.cpu_view(), probs.data(), w, stride, sums.data(), sumsq.data());
      b.gpu.window_column_stats_from_probs(t.gpu_view(), d_probs.data(), w, stride, d_sums.data(), d_sumsq.data());
      require_identical(to_host(d_sums), sums, "sums from probabilities (same order: bit-identical)");
      require_close(to_host(d_sumsq), sumsq, "sums of squares from probabilities");
    }
  }
}

TEST_CASE("pool_tokens on CUDA matches the CPU for avg and max pooling", "[cuda][parity][window]") {
  if (!device_available()) return;
  for (const LayerCase& c : window_cases()) {
    TwinLayer t(c);
    BackendPair b(c.shape());
    for (const std::int64_t rows : {std::int64_t{1}, c.group_size()}) {
      for (const std::int64_t kernel : {1, 3, 5, 7}) {
        for (const PoolKind kind : {PoolKind::avg, PoolKind::max}) {
          CAPTURE(c, rows, kernel, kind == PoolKind::max);
          std::vector<std::int64_t> span;
          for (const std::int64_t n : t.lens) {
            switch (t.rng().uniform_int(0, 4)) {
              case 0: span.push_back(0); break;
              case 1: span.push_back(std::max<std::int64_t>(0, n - 32)); break;
              case 2: span.push_back(std::min<std::int64_t>(n, kernel / 2)); break;
              case 3: span.push_back(n); break;
              default: span.push_back(n + 7); break;
            }
          }
          const auto in = random_floats(t.rng(), c.num_kv_heads * rows * c.capacity, -2.0f, 3.0f);
          const auto d_in = to_device(in);
          auto out = random_floats(t.rng(), c.num_kv_heads * rows * c.capacity, 5.0f, 6.0f);
          auto d_out = to_device(out);
          b.cpu.pool_tokens(t.cpu_view(), in.data(), out.data(), rows, span.data(), kernel, kind);
          b.gpu.pool_tokens(t.gpu_view(), d_in.data(), d_out.data(), rows, span.data(), kernel, kind);
          require_close(to_host(d_out), out, "pool_tokens");
        }
      }
    }
  }
}

TEST_CASE("layer_mean, key_norm_scores and key_diff_scores on CUDA match the CPU", "[cuda][parity][window]") {
  if (!device_available()) return;
  for (const LayerCase& c : window_cases()) {
    CAPTURE(c);
    TwinLayer t(c);
    BackendPair b(c.shape());
    const auto in = random_floats(t.rng(), c.num_q_heads * c.capacity, 0.0f, 1.0f);
    const auto d_in = to_device(in);
    const auto sentinel = random_floats(t.rng(), c.num_kv_heads * c.capacity, 5.0f, 6.0f);
    auto mean = sentinel;
    auto d_mean = to_device(sentinel);
    b.cpu.layer_mean(t.cpu_view(), in.data(), mean.data());
    b.gpu.layer_mean(t.gpu_view(), d_in.data(), d_mean.data());
    require_close(to_host(d_mean), mean, "layer_mean");

    auto norms = sentinel;
    auto d_norms = to_device(sentinel);
    b.cpu.key_norm_scores(t.cpu_view(), norms.data());
    b.gpu.key_norm_scores(t.gpu_view(), d_norms.data());
    require_close(to_host(d_norms), norms, "key_norm_scores");

    auto diff = sentinel;
    auto d_diff = to_device(sentinel);
    b.cpu.key_diff_scores(t.cpu_view(), diff.data());
    b.gpu.key_diff_scores(t.gpu_view(), d_diff.data());
    require_close(to_host(d_diff), diff, "key_diff_scores");
    t.require_same_state("key scores (read-only)");
  }
}

TEST_CASE("raise_protected and head_budgets on CUDA match the CPU", "[cuda][parity][window]") {
  if (!device_available()) return;
  for (const LayerCase& c : window_cases()) {
    TwinLayer t(c);
    BackendPair b(c.shape());
    const std::int64_t top = t.max_position();
    const ProtectRule rules[] = {{4, top - 10}, {0, INT64_MAX}, {std::int64_t{1} << 40, INT64_MAX}, {0, top / 2}};
    for (const ProtectRule& rule : rules) {
      CAPTURE(c, rule.sink_end, rule.recent_begin);
      // Scores on a 1/16 grid: plenty of ties for the (score desc, position asc, head asc) order.
      auto scores = random_floats(t.rng(), c.num_kv_heads * c.capacity, -4.0f, 4.0f);
      for (auto& s : scores) s = std::round(s * 16.0f) / 16.0f;
      auto d_scores = to_device(scores);
      auto raised = scores;
      auto d_raised = to_device(scores);
      b.cpu.raise_protected(t.cpu_view(), raised.data(), rule);
      b.gpu.raise_protected(t.gpu_view(), d_raised.data(), rule);
      require_close(to_host(d_raised), raised, "raise_protected");

      std::int64_t live = 0;
      for (const std::int64_t n : t.lens) live += n;
      for (const std::int64_t total : {std::int64_t{0}, live / 3, live / 2, live + 100}) {
        for (const std::int64_t floor : {std::int64_t{0}, std::int64_t{5}, live / (4 * c.num_kv_heads) + 1}) {
          CAPTURE(total, floor);
          std::vector<std::int64_t> cpu_counts(static_cast<std::size_t>(c.num_kv_heads), -7);
          std::vector<std::int64_t> gpu_counts(static_cast<std::size_t>(c.num_kv_heads), -9);
          b.cpu.head_budgets(t.cpu_view(), scores.data(), rule, total, floor, cpu_counts.data());
          b.gpu.head_budgets(t.gpu_view(), d_scores.data(), rule, total, floor, gpu_counts.data());
          REQUIRE(gpu_counts == cpu_counts);
        }
      }
    }
  }
}

TEST_CASE("copy_within on CUDA behaves like memmove, overlapping or not", "[cuda][parity][window]") {
  if (!device_available()) return;
  Rng rng(41);
  const std::int64_t size = 400000;  // larger than the bounce buffer: overlapping copies go piecewise
  CudaBackend gpu;
  gpu.reserve(CacheShape{1, 1, 1, 64, 64});
  struct Move {
    std::int64_t src, dst, n;
  };
  const Move moves[] = {
      {64, 0, 31 * 64},              // the decode ring's shift down one row
      {0, 64, 31 * 64},              // shift up
      {100, 0, 300000},              // overlapping, several bounce pieces, downwards
      {0, 1, 300000},                // overlapping by all but one, upwards
      {1000, 200000, 150000},        // disjoint
      {5, 5, 1000},                  // in place
      {7, 3, 0},                     // empty
  };
  for (const Move& m : moves) {
    CAPTURE(m.src, m.dst, m.n);
    auto host = random_floats(rng, size);
    auto dev = to_device(host);
    std::memmove(host.data() + m.dst, host.data() + m.src, static_cast<std::size_t>(m.n) * sizeof(float));
    gpu.copy_within(dev.data() + m.src, dev.data() + m.dst, m.n);
    require_identical(to_host(dev), host, "copy_within");
  }
}

// ---- policies on KVCache<CudaBackend> against KVCache<CpuBackend> ----

using CpuCache = KVCache<CpuBackend>;
using GpuCache = KVCache<CudaBackend>;
using CpuObs = Observation<float, HostSpace>;
using GpuObs = Observation<float, CudaSpace>;

// Seeded [heads, count, head_dim] rows of a layer: the same floats for both caches.
std::vector<float> layer_rows(std::uint64_t seed, std::int64_t heads, std::int64_t count, std::int64_t head_dim, float gain) {
  Rng rng(seed);
  return random_floats(rng, heads * count * head_dim, -gain, gain);
}

// Prefills both caches with the same prompt, hands each policy the last `obs_queries` queries
// of the prompt, and requires the same kept positions in the same slots.
template <class CpuPolicy, class GpuPolicy>
void prefill_parity(const CacheShape& s, std::int64_t prompt, std::int64_t obs_queries, CpuCache& cpu, GpuCache& gpu,
                    CpuPolicy& cpu_policy, GpuPolicy& gpu_policy, std::uint64_t seed) {
  for (std::int64_t layer = 0; layer < s.num_layers; ++layer) {
    const std::uint64_t ls = seed * 1000 + static_cast<std::uint64_t>(layer) * 10;
    const auto k = layer_rows(ls + 1, s.num_kv_heads, prompt, s.head_dim, 1.0f);
    const auto v = layer_rows(ls + 2, s.num_kv_heads, prompt, s.head_dim, 1.0f);
    const auto q = layer_rows(ls + 3, s.num_q_heads, obs_queries, s.head_dim, 1.5f);
    const auto d_k = to_device(k), d_v = to_device(v), d_q = to_device(q);
    const auto n = static_cast<std::int64_t>(k.size());
    const auto nq = static_cast<std::int64_t>(q.size());
    cpu.append(layer, {k.data(), n}, {v.data(), n}, prompt);
    gpu.append(layer, {d_k.data(), n}, {d_v.data(), n}, prompt);
    cpu_policy.on_prefill(cpu, layer, CpuObs::from_queries({q.data(), nq}, obs_queries));
    gpu_policy.on_prefill(gpu, layer, GpuObs::from_queries({d_q.data(), nq}, obs_queries));
    for (std::int64_t h = 0; h < s.num_kv_heads; ++h) {
      INFO("layer " << layer << ", kv_head " << h);
      REQUIRE(cpu.len(layer, h) < prompt);  // something was evicted
      REQUIRE(gpu.len(layer, h) == cpu.len(layer, h));
      REQUIRE(gpu.positions(layer, h) == cpu.positions(layer, h));
    }
  }
  cpu.check_invariants();
  gpu.check_invariants();
}

const CacheShape kGqa{2, 2, 8, 64, 640};   // G = 4
const CacheShape kMha{1, 3, 3, 128, 512};  // G = 1

TEST_CASE("SnapKV on CUDA keeps exactly the CPU's positions after prefill", "[cuda][policy][snapkv]") {
  if (!device_available()) return;
  struct Run {
    CacheShape shape;
    std::int64_t prompt;
    SnapKVConfig cfg;
    std::uint64_t seed;
  };
  const Run runs[] = {
      {kGqa, 600, SnapKVConfig{128, WindowScoring{32, 5, PoolKind::avg, GroupAgg::mean}}, 51},
      {kGqa, 500, SnapKVConfig{96, WindowScoring{8, 7, PoolKind::max, GroupAgg::max}}, 52},
      {kMha, 480, SnapKVConfig{160, WindowScoring{32, 3, PoolKind::avg, GroupAgg::mean, AggregationPoint::after_pool}}, 53},
      {kGqa, 600, SnapKVConfig{128, WindowScoring{32, 1, PoolKind::avg, GroupAgg::sum}}, 54},
      {kGqa, 600,
       SnapKVConfig{128, WindowScoring{32, 5, PoolKind::avg, GroupAgg::mean}, Schedule::prefill_only, 1,
                    HeadAllocation{true, 0.2}},
       55},  // adaptive per-head budgets (head_budgets)
  };
  for (const Run& r : runs) {
    CAPTURE(r.seed);
    CpuCache cpu(r.shape);
    GpuCache gpu(r.shape);
    SnapKV<CpuCache> cpu_policy(cpu, r.cfg);
    SnapKV<GpuCache> gpu_policy(gpu, r.cfg);
    prefill_parity(r.shape, r.prompt, r.cfg.scoring.window, cpu, gpu, cpu_policy, gpu_policy, r.seed);
  }
}

TEST_CASE("SnapKVPress on CUDA keeps exactly the CPU's positions after prefill (raise_protected)",
          "[cuda][policy][snapkv]") {
  if (!device_available()) return;
  CpuCache cpu(kGqa);
  GpuCache gpu(kGqa);
  const SnapKVPressConfig cfg{0.6, 32, 5};
  SnapKVPress<CpuCache> cpu_policy(cpu, cfg);
  SnapKVPress<GpuCache> gpu_policy(gpu, cfg);
  prefill_parity(kGqa, 600, cfg.window, cpu, gpu, cpu_policy, gpu_policy, 56);
}

TEST_CASE("TOVA and TOVAPress on CUDA keep exactly the CPU's positions after prefill", "[cuda][policy][tova]") {
  if (!device_available()) return;
  for (const CacheShape& s : {kGqa, kMha}) {
    CAPTURE(s.num_q_heads);
    {
      CpuCache cpu(s);
      GpuCache gpu(s);
      const TOVAConfig cfg{200};
      TOVA<CpuCache> cpu_policy(cpu, cfg);
      TOVA<GpuCache> gpu_policy(gpu, cfg);
      prefill_parity(s, 450, 1, cpu, gpu, cpu_policy, gpu_policy, 61);
    }
    {
      CpuCache cpu(s);
      GpuCache gpu(s);
      const TOVAPressConfig cfg{0.5};
      TOVAPress<CpuCache> cpu_policy(cpu, cfg);
      TOVAPress<GpuCache> gpu_policy(gpu, cfg);
      prefill_parity(s, 450, 1, cpu, gpu, cpu_policy, gpu_policy, 62);
    }
  }
}

}  // namespace
}  // namespace kvevict::cuda_test
