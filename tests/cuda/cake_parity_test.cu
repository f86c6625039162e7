// CPU/CUDA parity of CAKE's primitives (backends/cuda/cake_primitives.cuh against
// backends/cpu/cake_primitives.hpp) and of the CAKE policy on a KVCache<CudaBackend>. Every test
// skips with "SKIPPED: no CUDA device" where no GPU exists.
// Tolerances: pooling and ranking are bit-identical (same operation order); the window
// statistics agree within fp32 rounding (logits in another summation order, the CUDA libm's exp
// and log): indicator 1e-4 relative / 1e-7 absolute (gamma = 200 scales the variance's rounding),
// entropy and variance 1e-5 relative.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "cuda_test_support.cuh"
#include "kvevict/backends/cuda/cake_primitives.cuh"

namespace kvevict::cuda_test {
namespace {

// One workspace per side, sized for the case's shape and window.
struct CakeWorkspaces {
  CakeWorkspaces(const CacheShape& shape, std::int64_t window) {
    const CakeWorkspaceSize s = cake_workspace_size(shape, window);
    rows.assign(static_cast<std::size_t>(s.rows), 0.0f);
    terms.assign(static_cast<std::size_t>(s.terms), 0.0f);
    slots.assign(static_cast<std::size_t>(s.slots), 0);
    d_rows = cuda::DeviceBuffer<float>(s.rows);
    d_terms = cuda::DeviceBuffer<float>(s.terms);
    d_slots = cuda::DeviceBuffer<std::int32_t>(s.slots);
  }
  CakeWorkspace cpu() { return {rows.data(), terms.data(), slots.data()}; }
  CakeWorkspace gpu() { return {d_rows.data(), d_terms.data(), d_slots.data()}; }

  std::vector<float> rows, terms;
  std::vector<std::int32_t> slots;
  cuda::DeviceBuffer<float> d_rows, d_terms;
  cuda::DeviceBuffer<std::int32_t> d_slots;
};

void require_stats_close(const CakeWindowStats& gpu, const CakeWindowStats& cpu) {
  INFO("entropy cuda " << gpu.entropy << " cpu " << cpu.entropy << "; variance cuda " << gpu.variance << " cpu "
                       << cpu.variance);
  CHECK(std::abs(gpu.entropy - cpu.entropy) <= 1e-5 * std::abs(cpu.entropy) + 1e-30);
  CHECK(std::abs(gpu.variance - cpu.variance) <= 1e-5 * std::abs(cpu.variance) + 1e-30);
}

TEST_CASE("cake_window_scores on CUDA matches the CPU: indicator per slot, entropy and variance over prefix keys",
          "[cuda][parity][cake]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases())
    for (const std::int64_t window : {2, 8, 32})
      for (const float gamma : {0.0f, 200.0f}) {
        CAPTURE(c, window, gamma);
        TwinLayer t(c);
        BackendPair b(c.shape());
        CakeWorkspaces ws(c.shape(), window);
        // Window queries at the newest positions, so the causal mask cuts through the layer.
        const std::int64_t first = t.max_position() + 1 - window;
        const auto q = random_floats(t.rng(), c.num_q_heads * window * c.head_dim, -3.0f, 3.0f);
        const auto d_q = to_device(q);
        const auto sentinel = random_floats(t.rng(), c.num_q_heads * c.capacity, 5.0f, 6.0f);
        auto ind = sentinel;
        auto d_ind = to_device(sentinel);
        const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
        CakeWindowStats cpu_stats, gpu_stats;
        cake_window_scores(b.cpu, t.cpu_view(), q.data(), window, first, scale, gamma, ind.data(), cpu_stats, ws.cpu());
        cake_window_scores(b.gpu, t.gpu_view(), d_q.data(), window, first, scale, gamma, d_ind.data(), gpu_stats,
                           ws.gpu());
        require_close(to_host(d_ind), ind, "indicator", 1e-4, 1e-7);
        require_stats_close(gpu_stats, cpu_stats);
      }
}

TEST_CASE("cake_window_scores_from_probs on CUDA matches the CPU on the same probability rows", "[cuda][parity][cake]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    CAPTURE(c);
    TwinLayer t(c);
    BackendPair b(c.shape());
    const std::int64_t window = 16, stride = c.capacity + 3;
    CakeWorkspaces ws(c.shape(), window);
    const auto probs = random_floats(t.rng(), c.num_q_heads * window * stride, 0.0f, 0.05f);
    const auto d_probs = to_device(probs);
    const auto sentinel = random_floats(t.rng(), c.num_q_heads * c.capacity, 5.0f, 6.0f);
    auto ind = sentinel;
    auto d_ind = to_device(sentinel);
    const std::int64_t first = t.max_position() / 2;
    CakeWindowStats cpu_stats, gpu_stats;
    cake_window_scores_from_probs(b.cpu, t.cpu_view(), probs.data(), window, stride, first, 200.0f, ind.data(),
                                  cpu_stats, ws.cpu());
    cake_window_scores_from_probs(b.gpu, t.gpu_view(), d_probs.data(), window, stride, first, 200.0f, d_ind.data(),
                                  gpu_stats, ws.gpu());
    require_close(to_host(d_ind), ind, "indicator from probabilities", 1e-5, 1e-7);
    require_stats_close(gpu_stats, cpu_stats);
  }
}

// Ranks of the entries of each head: a random permutation of the older ones, the newest `fresh`
// positions unranked (they follow by position).
struct OrderCase {
  std::vector<float> order;  // [kv_head, capacity]
  std::int64_t fresh_from = 0, next_pos = 0;
};
OrderCase random_order(TwinLayer& t, std::int64_t fresh) {
  const LayerCase& c = t.spec();
  OrderCase o;
  o.order.assign(static_cast<std::size_t>(c.num_kv_heads * c.capacity), -1.0f);
  o.next_pos = t.max_position() + 1;
  o.fresh_from = o.next_pos - fresh;
  for (std::int64_t h = 0; h < c.num_kv_heads; ++h) {
    std::vector<std::int64_t> ranked;
    for (std::int64_t s = 0; s < t.lens[static_cast<std::size_t>(h)]; ++s)
      if (t.positions[static_cast<std::size_t>(h * c.capacity + s)] < o.fresh_from) ranked.push_back(s);
    t.rng().shuffle(ranked);
    for (std::size_t r = 0; r < ranked.size(); ++r) o.order[static_cast<std::size_t>(h * c.capacity + ranked[r])] = static_cast<float>(r);
  }
  return o;
}

TEST_CASE("cake_pool_in_order on CUDA is bit-identical to the CPU", "[cuda][parity][cake]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    TwinLayer t(c);
    // TwinLayer's positions have gaps; the fresh entries must be the newest positions present and
    // contiguous for the rank formula, so give each head positions 0..len-1 in random slot order.
    for (std::int64_t h = 0; h < c.num_kv_heads; ++h) {
      std::vector<std::int32_t> p(static_cast<std::size_t>(t.lens[static_cast<std::size_t>(h)]));
      std::iota(p.begin(), p.end(), 0);
      t.rng().shuffle(p);
      std::copy(p.begin(), p.end(), t.positions.begin() + h * c.capacity);
    }
    // Every head must end at the same next position for one fresh_from: equal lengths.
    for (auto& n : t.lens) n = t.lens[0];
    for (std::int64_t h = 1; h < c.num_kv_heads; ++h)
      std::copy_n(t.positions.begin(), c.capacity, t.positions.begin() + h * c.capacity);
    upload(t.d_positions, t.positions);
    for (const std::int64_t window : {0, 4, 32})
      for (const std::int64_t kernel : {1, 5, 7})
        for (const std::int64_t fresh : {0, 1, 9}) {
          CAPTURE(c, window, kernel, fresh);
          BackendPair b(c.shape());
          CakeWorkspaces ws(c.shape(), 2);
          const OrderCase o = random_order(t, std::min(fresh, t.lens[0]));
          const auto d_order = to_device(o.order);
          const std::int64_t stride = c.capacity + 1;
          const auto rows = random_floats(t.rng(), c.num_q_heads * stride, 0.0f, 1.0f);
          const auto d_rows = to_device(rows);
          const auto sentinel = random_floats(t.rng(), c.num_kv_heads * c.capacity, 5.0f, 6.0f);
          auto out = sentinel;
          auto d_out = to_device(sentinel);
          cake_pool_in_order(b.cpu, t.cpu_view(), rows.data(), stride, o.order.data(), o.fresh_from, o.next_pos, window,
                             kernel, out.data(), ws.cpu());
          cake_pool_in_order(b.gpu, t.gpu_view(), d_rows.data(), stride, d_order.data(), o.fresh_from, o.next_pos,
                             window, kernel, d_out.data(), ws.gpu());
          require_identical(to_host(d_out), out, "pooled scores");
        }
  }
}

TEST_CASE("cake_rank_entries on CUDA gives the CPU's ranks, ties by position", "[cuda][parity][cake]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases())
    for (const bool by_score : {true, false}) {
      CAPTURE(c, by_score);
      TwinLayer t(c);
      BackendPair b(c.shape());
      CakeWorkspaces ws(c.shape(), 2);
      std::vector<float> scores(static_cast<std::size_t>(c.num_kv_heads * c.capacity));
      for (auto& s : scores) s = static_cast<float>(t.rng().uniform_int(0, 9));  // many exact ties
      const auto d_scores = to_device(scores);
      const ProtectRule rule{3, t.max_position() - 5};
      const auto sentinel = random_floats(t.rng(), c.num_kv_heads * c.capacity, -6.0f, -5.0f);
      auto order = sentinel;
      auto d_order = to_device(sentinel);
      cake_rank_entries(b.cpu, t.cpu_view(), scores.data(), rule, by_score, order.data(), ws.cpu());
      cake_rank_entries(b.gpu, t.gpu_view(), d_scores.data(), rule, by_score, d_order.data(), ws.gpu());
      require_identical(to_host(d_order), order, "ranks");
    }
}

// ---- the policy on both backends ----

using CpuCache = KVCache<CpuBackend>;
using GpuCache = KVCache<CudaBackend>;

std::vector<float> rows_of(Rng& rng, std::int64_t n, float amp) { return random_floats(rng, n, -amp, amp); }

// Window-causal probabilities of `num_queries` queries over the cache's slots (fp64, rounded),
// [q_head, num_queries, capacity]; causal = false for a decode row.
std::vector<float> probabilities(const CpuCache& cache, std::int64_t layer, const std::vector<float>& q,
                                 std::int64_t num_queries, std::int64_t first, bool causal) {
  const CacheShape& s = cache.shape();
  const std::int64_t g = s.num_q_heads / s.num_kv_heads;
  std::vector<float> out(static_cast<std::size_t>(s.num_q_heads * num_queries * s.capacity), 0.0f);
  for (std::int64_t qh = 0; qh < s.num_q_heads; ++qh) {
    const auto pos = cache.positions(layer, qh / g);
    const auto keys = cache.keys(layer, qh / g);
    for (std::int64_t i = 0; i < num_queries; ++i) {
      constexpr double kMasked = -std::numeric_limits<double>::infinity();
      std::vector<double> l(pos.size(), kMasked);
      double mx = kMasked, z = 0.0;
      for (std::size_t j = 0; j < pos.size(); ++j) {
        if (causal && pos[j] > first + i) continue;
        double d = 0.0;
        for (std::int64_t e = 0; e < s.head_dim; ++e)
          d += static_cast<double>(q[static_cast<std::size_t>((qh * num_queries + i) * s.head_dim + e)]) *
               keys[static_cast<std::size_t>(static_cast<std::int64_t>(j) * s.head_dim + e)];
        l[j] = d / std::sqrt(static_cast<double>(s.head_dim));
        mx = std::max(mx, l[j]);
      }
      for (double x : l) z += std::isinf(x) ? 0.0 : std::exp(x - mx);
      for (std::size_t j = 0; j < pos.size(); ++j)
        out[static_cast<std::size_t>((qh * num_queries + i) * s.capacity) + j] =
            std::isinf(l[j]) ? 0.0f : static_cast<float>(std::exp(l[j] - mx) / z);
    }
  }
  return out;
}

template <class Cache>
std::vector<std::vector<std::int32_t>> slot_positions(const Cache& cache) {
  std::vector<std::vector<std::int32_t>> out;
  for (std::int64_t l = 0; l < cache.shape().num_layers; ++l)
    for (std::int64_t h = 0; h < cache.shape().num_kv_heads; ++h) out.push_back(cache.positions(l, h));
  return out;
}

TEST_CASE("CAKE on a CUDA cache keeps exactly what it keeps on the CPU, through cascading prefill and decode",
          "[cuda][parity][cake][policy]") {
  if (!device_available()) return;
  // Probability observations: both backends score the same fp32 rows, so every decision is taken
  // on bit-identical (pooling) or fp64-accumulated (indicator) values.
  for (const bool cascading : {true, false})
    for (const std::int64_t group : {1, 4}) {
      CAPTURE(cascading, group);
      Rng rng(cascading ? 101 : 202);
      const std::int64_t layers = 3, kv = 2, d = 32, prompt = 300, steps = small_run() ? 4 : 20;
      CAKEConfig cfg;
      cfg.cache_size = 64;
      cfg.window = 8;
      cfg.cascading = cascading;
      const CacheShape shape{layers, kv, kv * group, d, cake_capacity(cfg, prompt)};
      CpuCache cpu(shape);
      GpuCache gpu(shape);
      CAKE<CpuCache> cpu_policy(cpu, cfg);
      CAKE<GpuCache> gpu_policy(gpu, cfg);
      auto append = [&](std::int64_t l, std::int64_t n) {
        const auto k = rows_of(rng, kv * n * d, 1.0f), v = rows_of(rng, kv * n * d, 1.0f);
        cpu.append(l, {k.data(), static_cast<std::int64_t>(k.size())}, {v.data(), static_cast<std::int64_t>(v.size())}, n);
        const auto dk = to_device(k), dv = to_device(v);
        gpu.append(l, {dk.data(), dk.size()}, {dv.data(), dv.size()}, n);
      };
      for (std::int64_t l = 0; l < layers; ++l) {
        append(l, prompt);
        const auto q = rows_of(rng, kv * group * cfg.window * d, 3.0f);
        const auto p = probabilities(cpu, l, q, cfg.window, prompt - cfg.window, true);
        const auto dp = to_device(p);
        cpu_policy.on_prefill(cpu, l, Observation<float, HostSpace>::from_probs({p.data(), static_cast<std::int64_t>(p.size())},
                                                                                cfg.window, shape.capacity));
        gpu_policy.on_prefill(gpu, l, Observation<float, CudaSpace>::from_probs({dp.data(), dp.size()}, cfg.window, shape.capacity));
        REQUIRE(slot_positions(gpu) == slot_positions(cpu));
      }
      CHECK(std::vector<std::int64_t>(gpu_policy.layer_budgets().begin(), gpu_policy.layer_budgets().end()) ==
            std::vector<std::int64_t>(cpu_policy.layer_budgets().begin(), cpu_policy.layer_budgets().end()));
      for (std::int64_t l = 0; l < layers; ++l)
        CHECK(std::abs(gpu_policy.preferences()[static_cast<std::size_t>(l)] - cpu_policy.preferences()[static_cast<std::size_t>(l)]) <=
              1e-5f * cpu_policy.preferences()[static_cast<std::size_t>(l)]);
      for (std::int64_t t = 0; t < steps; ++t)
        for (std::int64_t l = 0; l < layers; ++l) {
          CAPTURE(t, l);
          append(l, 1);
          const auto q = rows_of(rng, kv * group * d, 3.0f);
          const auto p = probabilities(cpu, l, q, 1, 0, false);
          const auto dp = to_device(p);
          cpu_policy.on_decode(cpu, l, Observation<float, HostSpace>::from_probs({p.data(), static_cast<std::int64_t>(p.size())}, 1,
                                                                                 shape.capacity));
          gpu_policy.on_decode(gpu, l, Observation<float, CudaSpace>::from_probs({dp.data(), dp.size()}, 1, shape.capacity));
          REQUIRE(slot_positions(gpu) == slot_positions(cpu));
        }
      gpu.check_invariants();
    }
}

TEST_CASE("CAKE's preferences from window queries on a CUDA cache match the CPU's within fp32 tolerance",
          "[cuda][parity][cake][policy]") {
  if (!device_available()) return;
  Rng rng(303);
  const std::int64_t layers = 2, kv = 2, group = 2, d = 64, prompt = 500;
  CAKEConfig cfg;
  cfg.cache_size = 128;
  const CacheShape shape{layers, kv, kv * group, d, cake_capacity(cfg, prompt)};
  CpuCache cpu(shape);
  GpuCache gpu(shape);
  CAKE<CpuCache> cpu_policy(cpu, cfg);
  CAKE<GpuCache> gpu_policy(gpu, cfg);
  for (std::int64_t l = 0; l < layers; ++l) {
    const auto k = rows_of(rng, kv * prompt * d, 1.0f), v = rows_of(rng, kv * prompt * d, 1.0f);
    const auto q = rows_of(rng, kv * group * cfg.window * d, 2.0f);
    cpu.append(l, {k.data(), static_cast<std::int64_t>(k.size())}, {v.data(), static_cast<std::int64_t>(v.size())}, prompt);
    const auto dk = to_device(k), dv = to_device(v), dq = to_device(q);
    gpu.append(l, {dk.data(), dk.size()}, {dv.data(), dv.size()}, prompt);
    cpu_policy.on_prefill(cpu, l, Observation<float, HostSpace>::from_queries({q.data(), static_cast<std::int64_t>(q.size())}, cfg.window));
    gpu_policy.on_prefill(gpu, l, Observation<float, CudaSpace>::from_queries({dq.data(), dq.size()}, cfg.window));
    CAPTURE(l);
    CHECK(std::abs(gpu_policy.preferences()[static_cast<std::size_t>(l)] - cpu_policy.preferences()[static_cast<std::size_t>(l)]) <=
          1e-4f * cpu_policy.preferences()[static_cast<std::size_t>(l)]);
  }
  gpu.check_invariants();
}

}  // namespace
}  // namespace kvevict::cuda_test
