// Golden replays of the observation-window and key-score policies: SnapKV (official and
// KVCache-Factory), PyramidKV (KVCache-Factory), and the kvpress SnapKV / PyramidKV / TOVA / Knorm
// / KeyDiff presses (golden/README.md §6.3, §6.4, §6.7). Each replay drives the public policy API
// as an engine would: append the prompt of a layer, then on_prefill with the case's window queries.
//
// replay.hpp declares these replays for its dispatch table and includes this file at its end;
// including this file first works too (replay.hpp's own include of it is then a no-op). A backend
// without the window-scoring primitives (WindowScoringBackend) gets an UnsupportedError at run
// time instead of a compile error, so kvevict-replay still builds for it.
//
// Besides keep sets and K/V rows, every replay records kvevict's pre-selection scores of each layer
// as "scores_l{l}" [1, cache_heads, S], position-indexed (slot j holds position j right after the
// prompt is appended). They are read from the policy's own scorer (scorer().kv_scores) just before
// on_prefill selects, so a scoring stage can be compared with the case's topk_###_scores files.
// They are kvevict's raw scores: window sums for the SnapKV family (kvpress averages over the
// window, an equivalent ranking), and before kvpress's window padding (max + 1), which
// pad_protected_scores applies inside the selection.
#pragma once

#include "golden/replay.hpp"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvevict/core/backend.hpp"
#include "kvevict/policies/key_policies.hpp"
#include "kvevict/policies/snapkv.hpp"
#include "kvevict/policies/tova.hpp"

namespace kvevict::golden {

namespace impl {

template <class Cache>
inline constexpr bool has_window_primitives = WindowScoringBackend<typename Cache::backend_type>;

[[noreturn]] inline void no_window_primitives(const GoldenCase& c) {
  unsupported(c, "this backend lacks the window-scoring primitives (WindowScoringBackend) these policies need");
}

// The last n_tail query rows of one layer, [q_head, n_tail, head_dim] (queries_tail.npy, README §5.3).
struct TailQueries {
  std::int64_t n_tail = 0;
  std::vector<float> rows;  // [layer, q_head, n_tail, head_dim]

  [[nodiscard]] std::vector<float> layer(const Shapes& s, std::int64_t l) const {
    const std::int64_t per_layer = s.q_heads * n_tail * s.head_dim;
    return {rows.begin() + l * per_layer, rows.begin() + (l + 1) * per_layer};
  }
};
inline TailQueries load_tail_queries(const GoldenCase& c, const Shapes& s) {
  if (!c.has("queries_tail")) io_fail(c, "queries_tail.npy is missing (window policies read the last rows only)");
  const NpyArray t = load(c, "queries_tail");
  if (t.dtype != "<f4" || t.shape.size() != 5 || t.shape[0] != s.layers || t.shape[1] != 1 || t.shape[2] != s.q_heads ||
      t.shape[3] <= 0 || t.shape[3] > s.seq_len || t.shape[4] != s.head_dim)
    io_fail(c, "queries_tail.npy must be float32 [layers, 1, q_heads, n_tail <= seq_len, head_dim]");
  if (const auto it = c.params.find("n_tail"); it != c.params.end() && it->is_number_integer() && it->get<std::int64_t>() != t.shape[3])
    io_fail(c, "params.json n_tail disagrees with queries_tail.npy");
  return TailQueries{t.shape[3], t.as<float>()};
}

// Tail queries for the cache's q-heads: with query-head granularity every q-head is its own
// cache kv-head (the cache's q_heads == its kv_heads), which is the same [q_head, n, d] layout.
template <class Cache>
Obs<Cache> tail_observation(Uploaded<Cache>& q, std::int64_t n_tail, std::int64_t seq_len) {
  return Obs<Cache>::from_queries(q.span(), n_tail, 0.0f, seq_len - n_tail);
}

// Reads the policy's pre-selection scores of `layer` through its scorer, records them as
// scores_l{layer}, then runs on_prefill. The layer was appended into an empty cache, so slot j
// holds position j; checked, since the recorded tensor is position-indexed.
template <class Cache, class Policy>
void score_then_prefill(const GoldenCase& c, Cache& cache, Policy& policy, std::int64_t layer, const Obs<Cache>& obs,
                        ReplayResult& r) {
  const auto& sh = cache.shape();
  const std::int64_t S = cache.len(layer, 0);
  for (std::int64_t h = 0; h < sh.num_kv_heads; ++h) {
    const auto pos = cache.positions(layer, h);
    for (std::size_t j = 0; j < pos.size(); ++j)
      if (pos[j] != static_cast<std::int32_t>(j)) io_fail(c, "prompt slots are not in position order before prefill");
  }
  policy.scorer().observe(cache, layer, obs, Phase::prefill);
  const float* device_scores = policy.scorer().kv_scores(cache, layer);
  std::vector<float> all(static_cast<std::size_t>(sh.num_kv_heads * sh.capacity));
  cache.backend().copy_to_host(device_scores, all.data(), sh.num_kv_heads * sh.capacity);
  OutputTensor t{{1, sh.num_kv_heads, S}, std::vector<float>(static_cast<std::size_t>(sh.num_kv_heads * S))};
  for (std::int64_t h = 0; h < sh.num_kv_heads; ++h)
    std::copy_n(all.begin() + h * sh.capacity, S, t.data.begin() + h * S);
  r.tensors["scores_l" + std::to_string(layer)] = std::move(t);
  policy.on_prefill(cache, layer, obs);
}

inline PoolKind pooling(const GoldenCase& c) {
  const std::string p = get_string(c, "hyperparameters", "pooling", "avgpool");
  if (p == "avgpool") return PoolKind::avg;
  if (p == "maxpool") return PoolKind::max;
  unsupported(c, "pooling '" + p + "' (avgpool and maxpool are supported)");
}

// KVCache-Factory / official SnapKV scoring: sum over the window queries, group reduction before
// pooling (kv_head mode; with query-head granularity every group has one q-head).
inline WindowScoring cluster_scoring(const GoldenCase& c, bool query_head) {
  const std::string merge = get_string(c, "hyperparameters", "merge", "");
  if (!merge.empty()) unsupported(c, "merge '" + merge + "' (KVCache-Factory merge variants are out of scope)");
  return WindowScoring{.window = get_int(c, "hyperparameters", "window_size"),
                       .kernel = get_int(c, "hyperparameters", "kernel_size"),
                       .pool = pooling(c),
                       .group_agg = query_head ? GroupAgg::mean : group_agg(c),
                       .aggregation = AggregationPoint::before_pool};
}

inline std::vector<std::int64_t> layer_ids(const GoldenCase& c, std::int64_t layers) {
  const json& hp = section(c, "hyperparameters");
  const auto it = hp.find("layer_idx_per_layer");
  if (it == hp.end() || it->is_null()) {
    std::vector<std::int64_t> ids;
    for (std::int64_t l = 0; l < layers; ++l) ids.push_back(l);
    return ids;
  }
  std::vector<std::int64_t> ids;
  try {
    ids = it->get<std::vector<std::int64_t>>();
  } catch (const json::exception&) {
    io_fail(c, "hyperparameters.layer_idx_per_layer is not a list of integers");
  }
  if (static_cast<std::int64_t>(ids.size()) != layers) io_fail(c, "layer_idx_per_layer needs one id per layer");
  return ids;
}

// The SnapKV-family clusters (SnapKV official, KVCache-Factory SnapKV / PyramidKV): one prefill
// call per layer with the window queries.
template <class Cache, class Policy>
void run_cluster(const GoldenCase& c, Cache& cache, Policy& policy, const ClusterSetup& u, ReplayResult& r) {
  const TailQueries tail = load_tail_queries(c, u.s);
  for (std::int64_t l = 0; l < u.s.layers; ++l) {
    append_tokens(cache, l, u.in, u.head_map, 0, u.s.seq_len);
    Uploaded<Cache> q(cache, tail.layer(u.s, l));
    score_then_prefill(c, cache, policy, l, tail_observation(q, tail.n_tail, u.s.seq_len), r);
  }
  record_keep(cache, r);
  record_kv(c, cache, r, false);
}

template <class Cache>
CacheShape cluster_cache_shape(const ClusterSetup& u, std::int64_t min_capacity) {
  return CacheShape{u.s.layers, u.cache_heads, u.query_head ? u.cache_heads : u.s.q_heads, u.s.head_dim,
                    std::max(u.s.seq_len, min_capacity)};
}

// SnapKVCluster.update_kv (official SnapKV and KVCache-Factory share the algorithm, README §6.4).
template <class Cache>
ReplayResult replay_snapkv_cluster(const GoldenCase& c, const std::string& set) {
  ReplayResult r = new_result(c, set);
  const ClusterSetup u = cluster_setup(c);
  const std::int64_t cap = get_int(c, "hyperparameters", "max_capacity_prompt");
  Cache cache(cluster_cache_shape<Cache>(u, cap));
  SnapKV<Cache> policy(cache, SnapKVConfig{.capacity = cap, .scoring = cluster_scoring(c, u.query_head)});
  run_cluster(c, cache, policy, u, r);
  return r;
}

// kvpress presses: the cache holds the case's kv-heads; the window (or last) queries come from
// queries_tail; the presses run at prefill only.
struct PressSetup {
  Shapes s;
  std::vector<std::int64_t> head_map;
  KVInputs in;
};
inline PressSetup press_setup(const GoldenCase& c) {
  PressSetup p{read_shapes(c), {}, {}};
  p.head_map = cache_head_map(c, p.s, false);
  p.in = load_kv(c, p.s, false);
  return p;
}

template <class Cache, class Policy>
void run_press(const GoldenCase& c, Cache& cache, Policy& policy, const PressSetup& p, bool needs_queries,
               ReplayResult& r) {
  std::optional<TailQueries> tail;
  if (needs_queries) tail = load_tail_queries(c, p.s);
  for (std::int64_t l = 0; l < p.s.layers; ++l) {
    append_tokens(cache, l, p.in, p.head_map, 0, p.s.seq_len);
    if (tail) {
      Uploaded<Cache> q(cache, tail->layer(p.s, l));
      score_then_prefill(c, cache, policy, l, tail_observation(q, tail->n_tail, p.s.seq_len), r);
    } else {
      score_then_prefill(c, cache, policy, l, Obs<Cache>::none(), r);
    }
  }
  record_keep(cache, r);
  record_kv(c, cache, r, false);
}

}  // namespace impl

// FasterDecoding/SnapKV SnapKVCluster.update_kv, query-head granularity (README §6.4).
template <class Cache>
ReplayResult replay_snapkv_official(const GoldenCase& c) {
  if constexpr (!impl::has_window_primitives<Cache>) {
    impl::no_window_primitives(c);
  } else {
    return impl::replay_snapkv_cluster<Cache>(c, "snapkv_official");
  }
}

// KVCache-Factory SnapKVCluster.update_kv (README §6.3): query_head = one cache kv-head per query
// head (K/V repeated); kv_head = GQA cache, gqa_score_agg before pooling.
template <class Cache>
ReplayResult replay_kvfactory_snapkv(const GoldenCase& c) {
  if constexpr (!impl::has_window_primitives<Cache>) {
    impl::no_window_primitives(c);
  } else {
    return impl::replay_snapkv_cluster<Cache>(c, "kvfactory_snapkv");
  }
}

// KVCache-Factory PyramidKVCluster.update_kv (README §6.3): integer per-layer budgets from the
// model's num_hidden_layers and each cache layer's model layer id (layer_idx_per_layer).
template <class Cache>
ReplayResult replay_kvfactory_pyramidkv(const GoldenCase& c) {
  if constexpr (!impl::has_window_primitives<Cache>) {
    impl::no_window_primitives(c);
  } else {
    using namespace impl;
    ReplayResult r = new_result(c, "kvfactory_pyramidkv");
    const ClusterSetup u = cluster_setup(c);
    const std::int64_t cap = get_int(c, "hyperparameters", "max_capacity_prompt");
    Cache cache(cluster_cache_shape<Cache>(u, cap));
    PyramidKV<Cache> policy(cache, PyramidKVConfig{.capacity = cap,
                                                   .scoring = cluster_scoring(c, u.query_head),
                                                   .beta = get_int(c, "hyperparameters", "beta"),
                                                   .num_model_layers = get_int(c, "hyperparameters", "num_hidden_layers"),
                                                   .layer_ids = layer_ids(c, u.s.layers)});
    run_cluster(c, cache, policy, u, r);
    return r;
  }
}

// kvpress SnapKVPress.compress (README §6.7): mean over the window, avg-pool, group mean after
// pooling, window padded with max + 1, n_kept = int(S (1 - compression_ratio)).
template <class Cache>
ReplayResult replay_kvpress_snapkv(const GoldenCase& c) {
  if constexpr (!impl::has_window_primitives<Cache>) {
    impl::no_window_primitives(c);
  } else {
    using namespace impl;
    ReplayResult r = new_result(c, "kvpress_snapkv");
    const PressSetup p = press_setup(c);
    Cache cache(CacheShape{p.s.layers, p.s.kv_heads, p.s.q_heads, p.s.head_dim, p.s.seq_len});
    SnapKVPress<Cache> policy(cache, SnapKVPressConfig{.compression_ratio = get_double(c, "hyperparameters", "compression_ratio"),
                                                       .window = get_int(c, "hyperparameters", "window_size"),
                                                       .kernel = get_int(c, "hyperparameters", "kernel_size")});
    run_press(c, cache, policy, p, true, r);
    return r;
  }
}

// kvpress PyramidKVPress.compress (README §6.7): float budgets with banker's rounding, SnapKV
// fallback unless S >= max >= min >= w; the module's layer_idx is layer_idx_per_layer[l].
template <class Cache>
ReplayResult replay_kvpress_pyramidkv(const GoldenCase& c) {
  if constexpr (!impl::has_window_primitives<Cache>) {
    impl::no_window_primitives(c);
  } else {
    using namespace impl;
    ReplayResult r = new_result(c, "kvpress_pyramidkv");
    const PressSetup p = press_setup(c);
    Cache cache(CacheShape{p.s.layers, p.s.kv_heads, p.s.q_heads, p.s.head_dim, p.s.seq_len});
    PyramidKVPress<Cache> policy(
        cache, PyramidKVPressConfig{.compression_ratio = get_double(c, "hyperparameters", "compression_ratio"),
                                    .window = get_int(c, "hyperparameters", "window_size"),
                                    .kernel = get_int(c, "hyperparameters", "kernel_size"),
                                    .beta = get_double(c, "hyperparameters", "beta"),
                                    .num_model_layers = get_int(c, "hyperparameters", "num_hidden_layers"),
                                    .layer_ids = layer_ids(c, p.s.layers)});
    run_press(c, cache, policy, p, true, r);
    return r;
  }
}

// kvpress TOVAPress.compress (README §6.7): the last query's attention averaged over all q-heads,
// one keep set for every kv-head, last token padded with max + 1.
template <class Cache>
ReplayResult replay_kvpress_tova(const GoldenCase& c) {
  if constexpr (!impl::has_window_primitives<Cache>) {
    impl::no_window_primitives(c);
  } else {
    using namespace impl;
    ReplayResult r = new_result(c, "kvpress_tova");
    const PressSetup p = press_setup(c);
    Cache cache(CacheShape{p.s.layers, p.s.kv_heads, p.s.q_heads, p.s.head_dim, p.s.seq_len});
    TOVAPress<Cache> policy(cache, TOVAPressConfig{.compression_ratio = get_double(c, "hyperparameters", "compression_ratio")});
    run_press(c, cache, policy, p, true, r);
    return r;
  }
}

// kvpress KnormPress.compress (README §6.7): keeps the lowest-norm keys; queries unused.
template <class Cache>
ReplayResult replay_kvpress_knorm(const GoldenCase& c) {
  if constexpr (!impl::has_window_primitives<Cache>) {
    impl::no_window_primitives(c);
  } else {
    using namespace impl;
    ReplayResult r = new_result(c, "kvpress_knorm");
    const PressSetup p = press_setup(c);
    Cache cache(CacheShape{p.s.layers, p.s.kv_heads, p.s.q_heads, p.s.head_dim, p.s.seq_len});
    KnormPress<Cache> policy(cache, KeyScorePressConfig{.compression_ratio = get_double(c, "hyperparameters", "compression_ratio")});
    run_press(c, cache, policy, p, false, r);
    return r;
  }
}

// kvpress KeyDiffPress.compress (README §6.7): keeps the keys least similar to the mean unit key.
template <class Cache>
ReplayResult replay_kvpress_keydiff(const GoldenCase& c) {
  if constexpr (!impl::has_window_primitives<Cache>) {
    impl::no_window_primitives(c);
  } else {
    using namespace impl;
    ReplayResult r = new_result(c, "kvpress_keydiff");
    const PressSetup p = press_setup(c);
    Cache cache(CacheShape{p.s.layers, p.s.kv_heads, p.s.q_heads, p.s.head_dim, p.s.seq_len});
    KeyDiffPress<Cache> policy(cache, KeyScorePressConfig{.compression_ratio = get_double(c, "hyperparameters", "compression_ratio")});
    run_press(c, cache, policy, p, false, r);
    return r;
  }
}

}  // namespace kvevict::golden
