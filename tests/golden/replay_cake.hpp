// Golden replay of the `cake` set (golden/README.md §6.5): antgroup/cakekv's attention forward
// called per layer over the whole prompt, then T decode tokens with every layer per token, driven
// through kvevict's CAKE exactly as an engine would (append the layer's prompt, on_prefill with the
// window queries; append a token, on_decode with its query). The dispatcher in replay.hpp calls
// replay_cake; replay_cake_detailed also returns the integer budget history for the parity test.
#pragma once

// replay.hpp declares replay_cake for its dispatch table and includes this file at its end;
// including this file first works too (replay.hpp's own include of it is then a no-op).
#include "golden/replay.hpp"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kvevict/policies/cake.hpp"
#if defined(__CUDACC__)
// kvevict-replay built by nvcc (--backend cuda) instantiates CAKE on KVCache<CudaBackend>.
#include "kvevict/backends/cuda/cake_primitives.cuh"
#endif

namespace kvevict::golden {

// kvevict's CAKE run of one case, with the integer outputs ReplayResult cannot carry.
struct CakeReplay {
  ReplayResult result;
  std::vector<float> preferences;                              // [layer] P_l
  std::vector<std::int64_t> layer_budgets;                     // [layer] after prefill (non-window entries)
  std::vector<std::int64_t> allocated_after;                   // layer whose prefill ran each allocation
  std::vector<std::vector<std::int64_t>> allocation_history;   // [allocation][layers covered], uncapped
  bool prefill_evicted = false;
};

namespace impl {

// The case's CAKEConfig: hyperparameters as pred_cake.py passes them.
inline CAKEConfig cake_config(const GoldenCase& c) {
  CAKEConfig cfg;
  cfg.cache_size = get_int(c, "hyperparameters", "cache_size");
  cfg.window = get_int(c, "hyperparameters", "window_size");
  cfg.gamma = get_double(c, "hyperparameters", "gamma");
  cfg.tau = CakeTau{get_double(c, "hyperparameters", "tau1"), get_double(c, "hyperparameters", "tau2")};
  cfg.kernel = opt_int(c, "hyperparameters", "pooling_kernel").value_or(5);
  const json& hp = section(c, "hyperparameters");
  const auto casc = hp.find("use_cascading");
  if (casc == hp.end() || !casc->is_boolean()) io_fail(c, "params.json lacks boolean hyperparameters.use_cascading");
  cfg.cascading = casc->get<bool>();
  return cfg;
}

// Rows of layer `layer` of queries_tail [layer, 1, q_head, n_tail, head_dim]: rows [row0, row0 + n)
// of every q-head, as [q_head, n, head_dim].
inline std::vector<float> tail_rows(const std::vector<float>& tail, const Shapes& s, std::int64_t n_tail,
                                    std::int64_t layer, std::int64_t row0, std::int64_t n) {
  std::vector<float> q(static_cast<std::size_t>(s.q_heads * n * s.head_dim));
  for (std::int64_t h = 0; h < s.q_heads; ++h)
    std::copy_n(tail.begin() + ((layer * s.q_heads + h) * n_tail + row0) * s.head_dim, n * s.head_dim,
                q.begin() + h * n * s.head_dim);
  return q;
}

// out_evict_score_l{l}: the non-window entries' indicator after prefill, [1, kv_head, n] in
// ascending position order (the official tensor is in top-k order when prefill evicted).
template <class Cache>
void record_evict_scores(const Cache& cache, const CAKE<Cache>& policy, std::int64_t window, ReplayResult& r) {
  const auto& sh = cache.shape();
  std::vector<float> all(static_cast<std::size_t>(sh.num_kv_heads * sh.capacity));
  for (std::int64_t l = 0; l < sh.num_layers; ++l) {
    cache.backend().copy_to_host(policy.scores(l), all.data(), sh.num_kv_heads * sh.capacity);
    const std::int64_t n = std::max<std::int64_t>(cache.len(l, 0) - window, 0);
    OutputTensor t{{1, sh.num_kv_heads, n}, std::vector<float>(static_cast<std::size_t>(sh.num_kv_heads * n))};
    for (std::int64_t h = 0; h < sh.num_kv_heads; ++h) {
      const auto order = positional_order(cache.positions(l, h));
      for (std::int64_t i = 0; i < n; ++i)
        t.data[static_cast<std::size_t>(h * n + i)] =
            all[static_cast<std::size_t>(h * sh.capacity + static_cast<std::int64_t>(order[static_cast<std::size_t>(i)]))];
    }
    r.tensors["out_evict_score_l" + std::to_string(l)] = std::move(t);
  }
}

}  // namespace impl

// `order` other than reference is for showing that the official decode depends on it.
template <class Cache>
CakeReplay replay_cake_detailed(const GoldenCase& c, CakeDecodeOrder order = CakeDecodeOrder::reference) {
  using namespace impl;
  CakeReplay out;
  ReplayResult& r = out.result;
  r = new_result(c, "cake");
  const Shapes s = read_shapes(c);
  CAKEConfig cfg = cake_config(c);
  cfg.decode_order = order;
  const std::int64_t S = get_int(c, "hyperparameters", "S"), T = get_int(c, "hyperparameters", "T");
  if (S <= cfg.window || T < 0 || S + T != s.seq_len)
    io_fail(c, "needs window < S, T >= 0 and S + T == shapes.seq_len");
  if (const auto L = opt_int(c, "hyperparameters", "num_layers"); L && *L != s.layers)
    io_fail(c, "hyperparameters.num_layers disagrees with shapes.layers");
  const KVInputs in = load_kv(c, s, false);
  const auto head_map = cache_head_map(c, s, false);
  const std::int64_t n_tail = cfg.window + T;
  const auto tail = load_f32(c, "queries_tail", {s.layers, 1, s.q_heads, n_tail, s.head_dim});

  Cache cache(CacheShape{s.layers, s.kv_heads, s.q_heads, s.head_dim, std::max(S + T, cake_capacity(cfg, S))});
  CAKE<Cache> policy(cache, cfg);
  r.step_keep.resize(static_cast<std::size_t>(T + 1));

  for (std::int64_t l = 0; l < s.layers; ++l) {
    append_tokens(cache, l, in, head_map, 0, S);
    Uploaded<Cache> q(cache, tail_rows(tail, s, n_tail, l, 0, cfg.window));
    const std::int64_t before = policy.num_allocations();
    policy.on_prefill(cache, l, Obs<Cache>::from_queries(q.span(), cfg.window));
    if (policy.num_allocations() != before) {
      const auto a = policy.last_allocation();
      out.allocated_after.push_back(l);
      out.allocation_history.emplace_back(a.begin(), a.end());
      OutputTensor t{{static_cast<std::int64_t>(a.size())}, std::vector<float>(a.begin(), a.end())};
      r.tensors["cascade_budgets_after_l" + std::to_string(l)] = std::move(t);
    }
  }
  out.prefill_evicted = policy.num_allocations() > 0;
  out.preferences.assign(policy.preferences().begin(), policy.preferences().end());
  out.layer_budgets.assign(policy.layer_budgets().begin(), policy.layer_budgets().end());
  for (std::int64_t l = 0; l < s.layers; ++l) r.step_keep[0].push_back(kept_positions(cache, l));
  record_evict_scores(cache, policy, cfg.window, r);
  r.tensors["out_pref_scores"] = OutputTensor{{s.layers}, out.preferences};
  r.tensors["out_layer_budgets"] =
      OutputTensor{{s.layers}, std::vector<float>(out.layer_budgets.begin(), out.layer_budgets.end())};

  for (std::int64_t t = 1; t <= T; ++t)
    for (std::int64_t l = 0; l < s.layers; ++l) {
      append_tokens(cache, l, in, head_map, S + t - 1, 1);
      Uploaded<Cache> q(cache, tail_rows(tail, s, n_tail, l, cfg.window + t - 1, 1));
      policy.on_decode(cache, l, Obs<Cache>::from_queries(q.span(), 1));
      r.step_keep[static_cast<std::size_t>(t)].push_back(kept_positions(cache, l));
    }
  record_keep(cache, r);
  record_kv(c, cache, r, false);
  return out;
}

// antgroup/cakekv (README §6.5): kept positions after prefill and after every decode token, the
// final K/V, out_evict_score_l{l} (after prefill, ascending positions), out_pref_scores,
// out_layer_budgets and cascade_budgets_after_l{l} (the uncapped allocation each prefill ran; the
// integer budgets are written as float32, exact).
template <class Cache>
ReplayResult replay_cake(const GoldenCase& c) {
  return replay_cake_detailed<Cache>(c).result;
}

}  // namespace kvevict::golden
