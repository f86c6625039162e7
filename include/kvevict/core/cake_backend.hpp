// CAKE's backend primitives (Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with
// Layer Preferences", ICLR 2025): the plain parameter types and the CakeScoringBackend concept.
// Backends implement the primitives as free functions found by argument-dependent lookup (CPU:
// backends/cpu/cake_primitives.hpp, CUDA: backends/cuda/cake_primitives.cuh), so a backend adopts
// them without touching its class.
#pragma once

#include <cstdint>

#include "kvevict/core/backend.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/shape.hpp"

namespace kvevict {

// One layer's window statistics, returned to the host (they decide the cross-layer budgets).
// fp32 values, as the reference's torch scalars; the backends accumulate them in fp64.
struct CakeWindowStats {
  float entropy = 0.0f;   // H = -sum p ln(p + 1e-10) over q-heads, window queries and prefix keys
  float variance = 0.0f;  // V = sum over q-heads and prefix keys of the unbiased variance over the window queries
};

// Scratch of the CAKE primitives in the backend's memory, sized once by cake_workspace_size.
// What each backend keeps there is its own business (CPU: one q-head's window probabilities in
// rows; CUDA: the rows' max and 1/sum in rows, per-key terms in terms).
struct CakeWorkspace {
  float* rows = nullptr;          // [window, capacity + 2 * q_head]
  float* terms = nullptr;         // [2 * q_head * capacity + 2]: per-key entropy and variance terms, then the totals
  std::int32_t* slots = nullptr;  // [kv_head, capacity]: slots in pooling order, or sort scratch
};

struct CakeWorkspaceSize {
  std::int64_t rows = 0;   // floats
  std::int64_t terms = 0;  // floats
  std::int64_t slots = 0;  // int32
};

// Element counts of the workspace for caches of `shape` observed by windows of `window` queries.
constexpr CakeWorkspaceSize cake_workspace_size(const CacheShape& shape, std::int64_t window) noexcept {
  return {window * (shape.capacity + 2 * shape.num_q_heads), 2 * shape.num_q_heads * shape.capacity + 2,
          shape.num_kv_heads * shape.capacity};
}

// The CAKE primitives, on top of Backend. Rows are [q_head, stride] floats slot-aligned with the
// cache; per-kv-head rows are [kv_head, capacity]. "Prefix keys" are the live entries whose
// position is < first_pos (the keys the window does not cover).
//   cake_window_scores(b, view, queries [q_head, num_queries, head_dim], num_queries, first_pos,
//       scale, gamma, indicator [q_head, capacity], stats&, workspace):
//       p_i = fp32 softmax of query i (position first_pos + i) over the keys with position <=
//       first_pos + i (the window-causal mask); for every live slot indicator = mean_i p_i +
//       gamma * var_i p_i (unbiased, num_queries >= 2); stats over the prefix keys, from the same
//       rows (not renormalised). Synchronises a device backend (stats is a host value).
//   cake_window_scores_from_probs(b, view, probs [q_head, num_queries, probs_stride], num_queries,
//       probs_stride, first_pos, gamma, indicator, stats&, workspace): the same from engine rows.
//   cake_pool_in_order(b, view, rows, row_stride, order [kv_head, capacity], fresh_from, next_pos,
//       window, kernel, out [kv_head, capacity], workspace): orders each head's entries by
//       order[slot], except entries with position >= fresh_from, which follow in position order
//       (rank len - next_pos + pos); the first len - window entries of that order get
//       out[slot] = mean over the group's q-heads of the zero-padded average (odd kernel, divided
//       by kernel) of the q-head's row along that order. Other slots of out are left as they are.
//       Throws InvariantError (CPU) when the ranks are not a permutation of [0, len).
//   cake_rank_entries(b, view, scores [kv_head, capacity], rule, by_score, order [kv_head, capacity],
//       workspace): order[slot] = the entry's rank: by_score ranks unprotected entries by
//       (score desc, position asc), then protected ones by position; otherwise every entry by
//       position.
// None allocates. Device backends run them asynchronously except where noted.
template <class B>
concept CakeScoringBackend =
    Backend<B> &&
    requires(B& b, const LayerView<float>& v, const float* cf, float* f, std::int64_t n, float x,
             ProtectRule rule, bool flag, CakeWindowStats& stats, const CakeWorkspace& ws) {
      cake_window_scores(b, v, cf, n, n, x, x, f, stats, ws);
      cake_window_scores_from_probs(b, v, cf, n, n, n, x, f, stats, ws);
      cake_pool_in_order(b, v, cf, n, cf, n, n, n, n, f, ws);
      cake_rank_entries(b, v, cf, rule, flag, f, ws);
    };

}  // namespace kvevict
