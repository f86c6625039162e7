// The Backend concept: memory placement plus the primitives every policy is written against.
// Each requirement sits on its own line so a compiler error names the missing piece.
#pragma once

#include <concepts>
#include <cstdint>
#include <span>

#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/plan.hpp"
#include "kvevict/core/rope.hpp"
#include "kvevict/core/shape.hpp"

namespace kvevict {

// Conventions shared by all primitives (documented once here, implemented by each backend):
// - `q` blocks are [q_head, query, head_dim]; q-head h reads kv-head h / group_size.
// - probabilities and q-head scores are [q_head, capacity] (decode) or [q_head, query, stride]
//   (a block), slot-aligned with the cache; kv-head scores are [kv_head, capacity].
// - softmax and every accumulation run in fp32.
// - selections rank by (score desc, position asc); victims are the last entry of that order.
// - no primitive allocates: workspace is sized once by reserve(shape).
template <class B>
concept Backend =
    std::copy_constructible<B> &&
    requires { typename B::memory_space; } &&
    requires { typename B::template Buffer<float>; } &&
    requires(B& b, const B& cb, const CacheShape& shape, const LayerView<float>& v, const float* cq,
             float* f, std::int32_t* i32, const std::int32_t* ci32, const std::int64_t* ci64,
             std::span<const SlotExtra> extras, ProtectRule rule, GroupAgg agg, RopeSpec rope,
             std::int64_t n, float x) {
      { cb.name() } -> std::convertible_to<const char*>;
      { b.template allocate<float>(n) } -> std::same_as<typename B::template Buffer<float>>;
      b.reserve(shape);
      b.copy_to_host(cq, f, n);
      b.copy_from_host(cq, f, n);
      b.copy_to_host(ci32, i32, n);
      b.copy_from_host(ci32, i32, n);
      { b.all_finite(cq, n) } -> std::same_as<bool>;
      b.append(v, cq, cq, n, n);
      b.attention_probs(v, cq, x, f);
      b.attend(v, cq, x, f, f);
      b.accumulate_column_sums(v, cq, n, n, f, ci64);
      b.accumulate_query_column_sums(v, cq, n, n, x, f, ci64);
      b.group_reduce(v, cq, f, agg);
      b.select_victims(v, cq, rule, i32);
      b.replace_with_last(v, ci32, extras);
      b.select_topk(v, cq, rule, ci64, i32);
      b.compact(v, ci32, ci64, extras);
      b.rotate_keys(v, n, n, rope);
    };

}  // namespace kvevict

namespace kvevict {

// The primitives of observation-window policies (SnapKV, PyramidKV, TOVA, Knorm, KeyDiff,
// per-head budgets), on top of Backend. A separate concept so a backend can be adopted before it
// implements them; policies that need them constrain on this one.
template <class B>
concept WindowScoringBackend =
    Backend<B> &&
    requires(B& b, const LayerView<float>& v, const float* cq, float* f, const std::int64_t* ci64, std::int64_t* i64,
             ProtectRule rule, PoolKind pool, std::int64_t n, float x) {
      b.copy_within(cq, f, n);
      b.window_column_stats(v, cq, n, n, x, f, f);
      b.window_column_stats_from_probs(v, cq, n, n, f, f);
      b.pool_tokens(v, cq, f, n, ci64, n, pool);
      b.layer_mean(v, cq, f);
      b.key_norm_scores(v, f);
      b.key_diff_scores(v, f);
      b.raise_protected(v, f, rule);
      b.head_budgets(v, cq, rule, n, n, i64);
    };

}  // namespace kvevict

namespace kvevict {

// A backend that performs a whole decode-step eviction (DecodeEviction) in one call. Worth it
// where each primitive is a kernel launch and reading a result back stalls the stream (CUDA);
// the CPU offers it too, skipping the policy's intermediate plan. Policies with one eviction per
// step take this path when the backend offers it.
template <class B>
concept DecodeEvictionBackend =
    Backend<B> && requires(B& b, const LayerView<float>& v, const DecodeEviction& step, std::span<const SlotExtra> extras) {
      b.evict_one(v, step, extras);
    };

}  // namespace kvevict

namespace kvevict {

// A backend that folds a decode step's eviction into the attention it computes for that step
// (attend + evict_one with the same results, the eviction costing no launch of its own). For
// engines that use the backend's attention; TopKEvictionPolicy::attend_and_decode takes it.
template <class B>
concept AttentionEvictionBackend =
    DecodeEvictionBackend<B> &&
    requires(B& b, const LayerView<float>& v, const DecodeAttention& att, const DecodeEviction& step,
             std::span<const SlotExtra> extras) { b.attend_evict_one(v, att, step, extras); };

}  // namespace kvevict
