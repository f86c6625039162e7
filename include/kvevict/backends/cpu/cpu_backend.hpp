// CPU backend: Eigen maps over raw host buffers. Every primitive documented in
// core/backend.hpp; workspace is sized once by reserve() so no primitive allocates.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <vector>

#include "kvevict/backends/cpu/host_buffer.hpp"
#include "kvevict/core/backend.hpp"
#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/memory_space.hpp"
#include "kvevict/core/rope.hpp"
#include "kvevict/core/shape.hpp"

namespace kvevict {

class CpuBackend {
 public:
  using memory_space = HostSpace;
  template <class U>
  using Buffer = cpu::HostBuffer<U>;

  // Query rows per tile in the streaming column sums: the only T-sized scratch is
  // kQueryTile x capacity floats, never T x T.
  static constexpr std::int64_t kQueryTile = 64;
#ifdef __FAST_MATH__
  static constexpr bool kFastMath = true;
#else
  static constexpr bool kFastMath = false;
#endif

  [[nodiscard]] const char* name() const noexcept { return "cpu"; }

  template <class U>
  [[nodiscard]] Buffer<U> allocate(std::int64_t n) const {
    return Buffer<U>(n);
  }
  template <class U>
  void copy_to_host(const U* src, U* dst, std::int64_t n) const {
    if (n > 0) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(U));
  }
  template <class U>
  void copy_from_host(const U* src, U* dst, std::int64_t n) const {
    if (n > 0) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(U));
  }

  // Sizes the scratch every primitive may need for caches of this shape. Allocates; call once.
  void reserve(const CacheShape& shape) {
    const auto cap = static_cast<std::size_t>(shape.capacity);
    if (tile_.size() < static_cast<std::size_t>(kQueryTile) * cap) tile_.assign(static_cast<std::size_t>(kQueryTile) * cap, 0.0f);
    if (order_.size() < cap) order_.assign(cap, 0);
    if (victims_.size() < static_cast<std::size_t>(shape.num_kv_heads)) victims_.assign(static_cast<std::size_t>(shape.num_kv_heads), -1);
    if (keep_mark_.size() < cap) keep_mark_.assign(cap, 0);
    const auto layer_entries = static_cast<std::size_t>(shape.num_kv_heads) * cap;
    if (layer_pool_.size() < layer_entries) layer_pool_.assign(layer_entries, PoolEntry{});
    if (group_scores_.size() < layer_entries) group_scores_.assign(layer_entries, 0.0f);
    const auto half = static_cast<std::size_t>(shape.head_dim / 2 + 1);
    if (rope_cos_.size() < half) {
      rope_cos_.assign(half, 0.0);
      rope_sin_.assign(half, 0.0);
    }
  }

  // x - x is exactly +-0 for a finite x in every rounding mode and NaN for NaN or +-Inf, so the
  // sum of x - x over the array is 0 iff every element is finite. Eight independent float lanes
  // let the loop vectorize without reassociating (plain SSE2): twice the speed of testing
  // exponent bits, which matters as it runs on every decode step. Under -ffast-math x - x folds
  // to 0, so that build tests the bits instead.
  [[nodiscard]] bool all_finite(const float* p, std::int64_t n) const noexcept {
    if constexpr (kFastMath) {
      std::uint32_t bad = 0;
      for (std::int64_t i = 0; i < n; ++i) {
        std::uint32_t bits;
        std::memcpy(&bits, p + i, sizeof bits);
        bad |= static_cast<std::uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
      }
      return bad == 0;
    } else {
      float lanes[8] = {};
      std::int64_t i = 0;
      for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) lanes[k] += p[i + k] - p[i + k];
      float total = 0.0f;
      for (; i < n; ++i) total += p[i] - p[i];
      for (const float x : lanes) total += x;
      return total == 0.0f;
    }
  }

  // Writes [kv_head, token, head_dim] source rows to slots lens[h] .. lens[h]+n-1.
  void append(const LayerView<float>& v, const float* keys, const float* values, std::int64_t num_tokens,
              std::int64_t first_pos) const {
    const auto row_bytes = static_cast<std::size_t>(v.head_dim) * sizeof(float);
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t base = v.lens[h];
      for (std::int64_t t = 0; t < num_tokens; ++t) {
        const std::int64_t src = (h * num_tokens + t) * v.head_dim;
        std::memcpy(v.key(h, base + t), keys + src, row_bytes);
        std::memcpy(v.value(h, base + t), values + src, row_bytes);
        v.head_positions(h)[base + t] = static_cast<std::int32_t>(first_pos + t);
      }
    }
  }

  // probs[qh, j] = softmax_j(q[qh] . K[qh/G, j] * scale) over the live slots, fp32.
  void attention_probs(const LayerView<float>& v, const float* q, float scale, float* probs) const {
    const std::int64_t g = v.group_size();
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t n = v.lens[h];
      if (n == 0) continue;
      auto k = keys_of(v, h);
      ConstRowMap qg(q + h * g * v.head_dim, g, v.head_dim, Stride(v.head_dim, 1));
      RowMap p(probs + h * g * v.capacity, g, n, Stride(v.capacity, 1));
      p.noalias() = (qg * k.transpose()) * scale;
      for (std::int64_t r = 0; r < g; ++r) softmax_in_place(probs + (h * g + r) * v.capacity, n);
    }
  }

  // Reference attention: out[qh] = sum_j probs[qh, j] V[qh/G, j]; probs_ws gets the probabilities.
  void attend(const LayerView<float>& v, const float* q, float scale, float* probs_ws, float* out) const {
    attention_probs(v, q, scale, probs_ws);
    const std::int64_t g = v.group_size();
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t n = v.lens[h];
      RowMap o(out + h * g * v.head_dim, g, v.head_dim, Stride(v.head_dim, 1));
      if (n == 0) {
        o.setZero();
        continue;
      }
      ConstRowMap p(probs_ws + h * g * v.capacity, g, n, Stride(v.capacity, 1));
      o.noalias() = p * values_of(v, h);
    }
  }

  // scores[qh, j] = (j < fresh_from[kv] ? scores[qh, j] : 0) + sum_i probs[qh, i, j]: H2O's rule
  // that old entries accumulate and new ones start from their own column sums.
  void accumulate_column_sums(const LayerView<float>& v, const float* probs, std::int64_t num_queries,
                              std::int64_t probs_stride, float* scores, const std::int64_t* fresh_from) const {
    const std::int64_t g = v.group_size();
    for (std::int64_t qh = 0; qh < v.num_q_heads; ++qh) {
      const std::int64_t h = qh / g;
      const std::int64_t n = v.lens[h];
      float* s = scores + qh * v.capacity;
      for (std::int64_t j = std::max<std::int64_t>(0, fresh_from[h]); j < n; ++j) s[j] = 0.0f;
      for (std::int64_t i = 0; i < num_queries; ++i) {
        const float* row = probs + (qh * num_queries + i) * probs_stride;
        for (std::int64_t j = 0; j < n; ++j) s[j] += row[j];
      }
    }
  }

  // The same accumulation from queries, streaming over tiles of kQueryTile rows: query i (position
  // first_pos + i) sees the keys whose position <= first_pos + i. Never materialises T x T.
  void accumulate_query_column_sums(const LayerView<float>& v, const float* queries, std::int64_t num_queries,
                                    std::int64_t first_pos, float scale, float* scores,
                                    const std::int64_t* fresh_from) {
    const std::int64_t g = v.group_size();
    for (std::int64_t qh = 0; qh < v.num_q_heads; ++qh) {
      const std::int64_t h = qh / g;
      const std::int64_t n = v.lens[h];
      float* s = scores + qh * v.capacity;
      for (std::int64_t j = std::max<std::int64_t>(0, fresh_from[h]); j < n; ++j) s[j] = 0.0f;
      if (n == 0) continue;
      auto k = keys_of(v, h);
      const std::int32_t* pos = v.head_positions(h);
      for (std::int64_t i0 = 0; i0 < num_queries; i0 += kQueryTile) {
        const std::int64_t rows = std::min(kQueryTile, num_queries - i0);
        ConstRowMap qt(queries + (qh * num_queries + i0) * v.head_dim, rows, v.head_dim, Stride(v.head_dim, 1));
        RowMap logits(tile_.data(), rows, n, Stride(n, 1));
        logits.noalias() = (qt * k.transpose()) * scale;
        for (std::int64_t r = 0; r < rows; ++r) {
          float* row = tile_.data() + r * n;
          if (!masked_softmax(row, pos, n, first_pos + i0 + r)) continue;  // sees no key
          for (std::int64_t j = 0; j < n; ++j) s[j] += row[j];
        }
      }
    }
  }

  // out[kv, j] = agg over the group's q-heads of in[qh, j], for the live slots.
  void group_reduce(const LayerView<float>& v, const float* in, float* out, GroupAgg agg) const {
    const std::int64_t g = v.group_size();
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t n = v.lens[h];
      float* o = out + h * v.capacity;
      const float* first = in + h * g * v.capacity;
      std::copy(first, first + n, o);
      const float inv = 1.0f / static_cast<float>(g);
      for (std::int64_t r = 1; r < g; ++r) {
        const float* row = first + r * v.capacity;
        if (agg == GroupAgg::max)
          for (std::int64_t j = 0; j < n; ++j) o[j] = std::max(o[j], row[j]);
        else if (agg == GroupAgg::mean && r == g - 1)  // the last sum and the mean's scaling in one pass
          for (std::int64_t j = 0; j < n; ++j) o[j] = (o[j] + row[j]) * inv;
        else
          for (std::int64_t j = 0; j < n; ++j) o[j] += row[j];
      }
    }
  }

  // victims[h] = the unprotected slot that ranks last by (score desc, position asc): the lowest
  // score, ties to the newest position. With scores == nullptr: the oldest unprotected entry.
  // -1 where a head has no unprotected entry.
  void select_victims(const LayerView<float>& v, const float* scores, ProtectRule rule, std::int32_t* victims) const {
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t n = v.lens[h];
      const std::int32_t* pos = v.head_positions(h);
      if (scores != nullptr) {
        victims[h] = lowest_scored_slot(scores + h * v.capacity, pos, n, rule);
        continue;
      }
      victims[h] = oldest_unprotected_slot(pos, n, rule);
    }
  }

  // Moves slot lens[h]-1 into victims[h] (K, V, position, extras). Checks every victim first, so
  // a bad plan throws before anything moves.
  void replace_with_last(const LayerView<float>& v, const std::int32_t* victims, std::span<const SlotExtra> extras) const {
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h)
      if (victims[h] < 0 || victims[h] >= v.lens[h])
        detail::fail<ArgumentError>("CpuBackend::replace_with_last", "victims[" + std::to_string(h) + "]", victims[h],
                                    "must be a live slot in [0, " + std::to_string(v.lens[h]) + ")");
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t last = v.lens[h] - 1;
      const std::int64_t dst = victims[h];
      if (dst != last) move_slot(v, extras, h, last, dst);
    }
  }

  // One decode step's scoring and eviction (DecodeEvictionBackend), validated as a whole before
  // anything is written: NonFiniteError for a NaN/Inf anywhere in the step's [q_head,
  // probs_stride] probabilities, InvariantError for a head whose entries are all protected;
  // either leaves the cache and the scores unchanged. The same primitives as the step-by-step
  // path (all_finite, accumulate_column_sums, group_reduce, select_victims, replace_with_last),
  // without the policy's intermediate plan and its checks.
  void evict_one(const LayerView<float>& v, const DecodeEviction& step, std::span<const SlotExtra> extras) {
    constexpr const char* where = "CpuBackend::evict_one";
    if (step.probs != nullptr) {
      if (step.q_scores == nullptr || step.fresh_from == nullptr)
        detail::fail<ArgumentError>(where, step.q_scores == nullptr ? "step.q_scores" : "step.fresh_from", "null",
                                    "must be set with probs");
      if (!all_finite(step.probs, v.num_q_heads * step.probs_stride))
        detail::fail<NonFiniteError>(where, "probs", "NaN/Inf", "every probability must be finite");
    }
    if (victims_.size() < static_cast<std::size_t>(v.num_kv_heads))  // reserve() sized it; a view may not have
      victims_.assign(static_cast<std::size_t>(v.num_kv_heads), -1);
    if (step.probs == nullptr) {  // by recency: every victim is known before anything moves
      select_victims(v, nullptr, step.rule, victims_.data());
      for (std::int64_t h = 0; h < v.num_kv_heads; ++h)
        if (victims_[static_cast<std::size_t>(h)] < 0)
          detail::fail<InvariantError>(where, "kv_head", h, "has no unprotected entry to evict");
      move_newest_into_victims(v, extras);
      return;
    }
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {  // usually ends at the first non-sink slot
      const std::int32_t* pos = v.head_positions(h);
      std::int64_t j = 0;
      while (j < v.lens[h] && step.rule.protects(pos[j])) ++j;
      if (j == v.lens[h]) detail::fail<InvariantError>(where, "kv_head", h, "has no unprotected entry to evict");
    }
    const auto layer_slots = static_cast<std::size_t>(v.num_kv_heads * v.capacity);
    if (group_scores_.size() < layer_slots) group_scores_.assign(layer_slots, 0.0f);  // reserve() sized it
    accumulate_column_sums(v, step.probs, 1, step.probs_stride, step.q_scores, step.fresh_from);
    group_reduce(v, step.q_scores, group_scores_.data(), step.agg);
    select_victims(v, group_scores_.data(), step.rule, victims_.data());
    move_newest_into_victims(v, extras);
  }

  // keep_slots[h, :keep_count[h]] = every protected slot plus the best unprotected ones by
  // (score desc, position asc), listed in ascending slot order. scores == nullptr ranks by
  // recency (newest first). Throws BudgetError if the protected entries alone exceed keep_count.
  void select_topk(const LayerView<float>& v, const float* scores, ProtectRule rule, const std::int64_t* keep_count,
                   std::int32_t* keep_slots) {
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t n = v.lens[h];
      const std::int64_t k = std::min(keep_count[h], n);
      std::int32_t* out = keep_slots + h * v.capacity;
      const std::int32_t* pos = v.head_positions(h);
      const float* s = scores != nullptr ? scores + h * v.capacity : nullptr;
      std::int64_t num_candidates = 0, num_protected = 0;
      for (std::int64_t j = 0; j < n; ++j) {
        const bool prot = rule.protects(pos[j]);
        keep_mark_[static_cast<std::size_t>(j)] = prot ? 1 : 0;
        if (prot)
          ++num_protected;
        else
          order_[static_cast<std::size_t>(num_candidates++)] = static_cast<std::int32_t>(j);
      }
      const std::int64_t need = k - num_protected;
      if (need < 0)
        detail::fail<BudgetError>("select_topk", "keep_count[" + std::to_string(h) + "]", k,
                                  "is smaller than the " + std::to_string(num_protected) + " protected entries");
      auto before = [&](std::int32_t a, std::int32_t b) {
        if (s == nullptr) return pos[a] > pos[b];
        return s[a] > s[b] || (s[a] == s[b] && pos[a] < pos[b]);
      };
      auto* first = order_.data();
      if (need < num_candidates) std::nth_element(first, first + need, first + num_candidates, before);
      for (std::int64_t i = 0; i < std::min(need, num_candidates); ++i) keep_mark_[static_cast<std::size_t>(order_[static_cast<std::size_t>(i)])] = 1;
      std::int64_t w = 0;
      for (std::int64_t j = 0; j < n; ++j)
        if (keep_mark_[static_cast<std::size_t>(j)] != 0) out[w++] = static_cast<std::int32_t>(j);
    }
  }

  // Stable in-place gather: slot keep_slots[h, i] moves to slot i. Ascending keep slots make the
  // forward copy safe (source >= destination). K and V move one run of consecutive kept slots at
  // a time (a single memmove when rows are contiguous); positions and extras are gathered per row.
  // Every head's keep slots are checked before anything moves: strictly ascending live slots (an
  // out-of-range slot would read outside the head, a repeated or descending one would overwrite a
  // row before it is read).
  void compact(const LayerView<float>& v, const std::int32_t* keep_slots, const std::int64_t* keep_count,
               std::span<const SlotExtra> extras) const {
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h)
      if (!keep_slots_valid(keep_slots + h * v.capacity, keep_count[h], v.lens[h]))
        fail_keep_slots(keep_slots + h * v.capacity, keep_count[h], v.lens[h], h);
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int32_t* keep = keep_slots + h * v.capacity;
      const std::int64_t k = keep_count[h];
      std::int64_t first = 0;  // the leading slots that stay where they are
      while (first < k && keep[first] == first) ++first;
      move_runs(v, v.key(h, 0), keep, first, k);  // all of K, then all of V: two streams, not four
      move_runs(v, v.value(h, 0), keep, first, k);
      std::int32_t* pos = v.head_positions(h);
      for (std::int64_t i = first; i < k; ++i) pos[i] = pos[keep[i]];
      for (const SlotExtra& e : extras)
        for (std::int64_t r = 0; r < e.rows_per_kv_head; ++r) {
          float* row = e.data + (h * e.rows_per_kv_head + r) * v.capacity;
          for (std::int64_t i = first; i < k; ++i) row[i] = row[keep[i]];
        }
    }
  }

  // Rotates every live key whose position >= min_position by `delta` positions (RoPE is a
  // rotation, so RoPE(p) followed by this equals RoPE(p + delta)).
  void rotate_keys(const LayerView<float>& v, std::int64_t min_position, std::int64_t delta, const RopeSpec& rope) {
    if (delta == 0) return;
    rope.check("CpuBackend::rotate_keys", v.head_dim);  // an odd or oversized rotary_dim would write past the row
    const std::int64_t half = rope.rotary_dim / 2;
    for (std::int64_t i = 0; i < half; ++i) {
      const double inv_freq = std::pow(rope.base, -2.0 * static_cast<double>(i) / static_cast<double>(rope.rotary_dim));
      const double angle = static_cast<double>(delta) * inv_freq;
      rope_cos_[static_cast<std::size_t>(i)] = std::cos(angle);
      rope_sin_[static_cast<std::size_t>(i)] = std::sin(angle);
    }
    const bool interleaved = rope.layout == RopeLayout::interleaved_pairs;
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int32_t* pos = v.head_positions(h);
      for (std::int64_t j = 0; j < v.lens[h]; ++j) {
        if (pos[j] < min_position) continue;
        float* k = v.key(h, j);
        for (std::int64_t i = 0; i < half; ++i) {
          const std::int64_t a = interleaved ? 2 * i : i;
          const std::int64_t b = interleaved ? 2 * i + 1 : i + half;
          const double c = rope_cos_[static_cast<std::size_t>(i)], sn = rope_sin_[static_cast<std::size_t>(i)];
          const double x = k[a], y = k[b];
          k[a] = static_cast<float>(x * c - y * sn);
          k[b] = static_cast<float>(x * sn + y * c);
        }
      }
    }
  }

  // ---- Observation-window primitives (WindowScoringBackend) ----

  // Copies n floats within backend memory; the ranges may overlap (memmove).
  void copy_within(const float* src, float* dst, std::int64_t n) const {
    if (n > 0) std::memmove(dst, src, static_cast<std::size_t>(n) * sizeof(float));
  }

  // Window statistics from queries: sums[qh, j] = sum_i p_i(j) and, when sumsq != nullptr,
  // sumsq[qh, j] = sum_i p_i(j)^2, where p_i is query i's fp32 softmax over the keys it sees
  // (position <= first_pos + i). Overwrites both outputs for the live slots. Streams over tiles.
  // The GEMM writes logits in base 2 (log2 e folded into its scale), so each softmax term is one
  // 2^x (window_softmax, relative error <= 3.7e-7): the sums agree with an expf-based softmax to
  // the rounding error of the fp32 logits.
  void window_column_stats(const LayerView<float>& v, const float* queries, std::int64_t num_queries,
                           std::int64_t first_pos, float scale, float* sums, float* sumsq) {
    const std::int64_t g = v.group_size();
    const float log2_scale = scale * 1.44269504088896341f;  // scale * log2(e)
    for (std::int64_t qh = 0; qh < v.num_q_heads; ++qh) {
      const std::int64_t h = qh / g;
      const std::int64_t n = v.lens[h];
      float* s = sums + qh * v.capacity;
      float* sq = sumsq != nullptr ? sumsq + qh * v.capacity : nullptr;
      std::fill(s, s + n, 0.0f);
      if (sq != nullptr) std::fill(sq, sq + n, 0.0f);
      if (n == 0) continue;
      auto k = keys_of(v, h);
      const std::int32_t* pos = v.head_positions(h);
      // Keys some query cannot see (position > first_pos); every other key is visible to all of
      // them, so only these need masking per row (a window's worth at prefill). order_ is free
      // scratch here.
      std::int64_t num_late = 0;
      for (std::int64_t j = 0; j < n; ++j)
        if (pos[j] > first_pos) order_[static_cast<std::size_t>(num_late++)] = static_cast<std::int32_t>(j);
      for (std::int64_t i0 = 0; i0 < num_queries; i0 += kQueryTile) {
        const std::int64_t rows = std::min(kQueryTile, num_queries - i0);
        ConstRowMap qt(queries + (qh * num_queries + i0) * v.head_dim, rows, v.head_dim, Stride(v.head_dim, 1));
        RowMap logits(tile_.data(), rows, n, Stride(n, 1));
        logits.noalias() = (qt * k.transpose()) * log2_scale;
        for (std::int64_t r = 0; r < rows; ++r) {
          float* row = tile_.data() + r * n;
          const float inv = window_softmax(row, pos, n, first_pos + i0 + r, order_.data(), num_late);
          if (inv == 0.0f) continue;  // sees no key
          // p = e * inv, added in one pass over the row (in L1 by now).
          if (sq == nullptr) {
            for (std::int64_t j = 0; j < n; ++j) s[j] += row[j] * inv;
          } else {
            for (std::int64_t j = 0; j < n; ++j) {
              const float p = row[j] * inv;
              s[j] += p;
              sq[j] += p * p;
            }
          }
        }
      }
    }
  }

  // The same statistics from engine-supplied probabilities [q_head, num_queries, probs_stride].
  void window_column_stats_from_probs(const LayerView<float>& v, const float* probs, std::int64_t num_queries,
                                      std::int64_t probs_stride, float* sums, float* sumsq) const {
    const std::int64_t g = v.group_size();
    for (std::int64_t qh = 0; qh < v.num_q_heads; ++qh) {
      const std::int64_t n = v.lens[qh / g];
      float* s = sums + qh * v.capacity;
      float* sq = sumsq != nullptr ? sumsq + qh * v.capacity : nullptr;
      std::fill(s, s + n, 0.0f);
      if (sq != nullptr) std::fill(sq, sq + n, 0.0f);
      for (std::int64_t i = 0; i < num_queries; ++i) {
        const float* row = probs + (qh * num_queries + i) * probs_stride;
        for (std::int64_t j = 0; j < n; ++j) s[j] += row[j];
        if (sq != nullptr)
          for (std::int64_t j = 0; j < n; ++j) sq[j] += row[j] * row[j];
      }
    }
  }

  // out[r, j] = pool over in[r, j - k/2 .. j + k/2] restricted to slots [0, span[h]) of each row r
  // (rows_per_kv_head rows per kv-head; slots are in position order, as bulk compaction keeps
  // them). Slots >= span are copied through. Odd kernel (checked by the policy).
  void pool_tokens(const LayerView<float>& v, const float* in, float* out, std::int64_t rows_per_kv_head,
                   const std::int64_t* span, std::int64_t kernel, PoolKind kind) const {
    const std::int64_t r = kernel / 2;
    const float inv_k = 1.0f / static_cast<float>(kernel);
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t n = v.lens[h];
      const std::int64_t m = std::min(span[h], n);
      for (std::int64_t row = 0; row < rows_per_kv_head; ++row) {
        const float* x = in + (h * rows_per_kv_head + row) * v.capacity;
        float* y = out + (h * rows_per_kv_head + row) * v.capacity;
        auto edge = [&](std::int64_t j) {
          const std::int64_t lo = std::max<std::int64_t>(0, j - r), hi = std::min(m - 1, j + r);
          if (kind == PoolKind::avg) {
            float acc = 0.0f;
            for (std::int64_t t = lo; t <= hi; ++t) acc += x[t];
            y[j] = acc * inv_k;
          } else {
            float mx = x[lo];
            for (std::int64_t t = lo + 1; t <= hi; ++t) mx = std::max(mx, x[t]);
            y[j] = mx;
          }
        };
        // Full windows, outputs [r, m - r): `kernel` shifted whole-range passes that vectorize,
        // combining x[j - r] .. x[j + r] in the same order as edge(), so results are identical.
        const std::int64_t inner = m - 2 * r;
        if (inner > 0) {
          Eigen::Map<Eigen::ArrayXf> yi(y + r, inner);
          yi = Eigen::Map<const Eigen::ArrayXf>(x, inner);
          for (std::int64_t t = 1; t < kernel; ++t) {
            const Eigen::Map<const Eigen::ArrayXf> xt(x + t, inner);
            if (kind == PoolKind::avg)
              yi += xt;
            else
              yi = yi.max(xt);
          }
          if (kind == PoolKind::avg) yi *= inv_k;
          for (std::int64_t j = 0; j < r; ++j) edge(j);
          for (std::int64_t j = m - r; j < m; ++j) edge(j);
        } else {
          for (std::int64_t j = 0; j < m; ++j) edge(j);
        }
        std::copy(x + m, x + n, y + m);
      }
    }
  }

  // out[h, j] = mean over ALL q-heads of in[qh, j] (TOVA's layer-level score), written to every
  // kv-head row. Needs every kv-head to share its slot-to-position map (TOVA keeps them equal).
  void layer_mean(const LayerView<float>& v, const float* in, float* out) const {
    const std::int64_t n = v.lens[0];
    float* o = out;
    std::fill(o, o + n, 0.0f);
    for (std::int64_t qh = 0; qh < v.num_q_heads; ++qh) {
      const float* row = in + qh * v.capacity;
      for (std::int64_t j = 0; j < n; ++j) o[j] += row[j];
    }
    const float inv = 1.0f / static_cast<float>(v.num_q_heads);
    for (std::int64_t j = 0; j < n; ++j) o[j] *= inv;
    for (std::int64_t h = 1; h < v.num_kv_heads; ++h) std::copy(o, o + n, out + h * v.capacity);
  }

  // out[h, j] = -||k_j||_2 (Knorm keeps the lowest-norm keys).
  void key_norm_scores(const LayerView<float>& v, float* out) const {
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t n = v.lens[h];
      if (n == 0) continue;
      Eigen::Map<Eigen::VectorXf> o(out + h * v.capacity, n);
      o = -keys_of(v, h).rowwise().norm();
    }
  }

  // out[h, j] = -cos(k_j, a) with a = mean_j k_j / max(||k_j||, 1e-12) (KeyDiff; torch's
  // F.normalize and cosine_similarity epsilons).
  void key_diff_scores(const LayerView<float>& v, float* out) const {
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t n = v.lens[h];
      if (n == 0) continue;
      auto k = keys_of(v, h);
      Eigen::Map<Eigen::VectorXf> o(out + h * v.capacity, n);
      o = k.rowwise().norm();  // norms first, reused below
      Eigen::RowVectorXf anchor = Eigen::RowVectorXf::Zero(v.head_dim);
      for (std::int64_t j = 0; j < n; ++j) anchor += k.row(j) / std::max(o[j], 1e-12f);
      anchor /= static_cast<float>(n);
      const float anchor_norm = anchor.norm();
      for (std::int64_t j = 0; j < n; ++j) {
        const float denom = std::max(o[j], 1e-8f) * std::max(anchor_norm, 1e-8f);
        o[j] = -(k.row(j).dot(anchor)) / denom;
      }
    }
  }

  // kvpress's window padding: every protected entry's score becomes max(unprotected) + 1, so a
  // plain top-k keeps protected entries first (ties among them by position).
  void raise_protected(const LayerView<float>& v, float* scores, ProtectRule rule) const {
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t n = v.lens[h];
      const std::int32_t* pos = v.head_positions(h);
      float* s = scores + h * v.capacity;
      float mx = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = 0; j < n; ++j)
        if (!rule.protects(pos[j])) mx = std::max(mx, s[j]);
      if (mx == -std::numeric_limits<float>::infinity()) mx = 0.0f;
      for (std::int64_t j = 0; j < n; ++j)
        if (rule.protects(pos[j])) s[j] = mx + 1.0f;
    }
  }

  // AdaKV-style allocation of one layer's budget across kv-heads: each head first keeps its best
  // min(floor, candidates) unprotected entries, then the remaining `total - sum(floors)` go to
  // the best remaining entries of the whole layer, ranked by (score desc, position asc, head
  // asc). Writes counts[h] = protected entries of head h + its unprotected allocation (host):
  // the keep_count a select_topk call then honours.
  void head_budgets(const LayerView<float>& v, const float* scores, ProtectRule rule, std::int64_t total,
                    std::int64_t floor, std::int64_t* counts) {
    std::int64_t pool_size = 0, assigned = 0;
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t n = v.lens[h];
      const std::int32_t* pos = v.head_positions(h);
      const float* s = scores + h * v.capacity;
      std::int64_t c = 0;
      for (std::int64_t j = 0; j < n; ++j)
        if (!rule.protects(pos[j])) order_[static_cast<std::size_t>(c++)] = static_cast<std::int32_t>(j);
      const std::int64_t num_protected = n - c;
      const std::int64_t f = std::min(floor, c);
      auto before = [&](std::int32_t a, std::int32_t b) { return s[a] > s[b] || (s[a] == s[b] && pos[a] < pos[b]); };
      if (f < c) std::nth_element(order_.data(), order_.data() + f, order_.data() + c, before);
      counts[h] = num_protected + f;
      assigned += f;
      for (std::int64_t i = f; i < c; ++i) {
        const std::int32_t j = order_[static_cast<std::size_t>(i)];
        layer_pool_[static_cast<std::size_t>(pool_size++)] = {s[j], pos[j], static_cast<std::int32_t>(h)};
      }
    }
    const std::int64_t rest = std::clamp<std::int64_t>(total - assigned, 0, pool_size);
    auto first = layer_pool_.begin();
    auto before = [](const PoolEntry& a, const PoolEntry& b) {
      if (a.score != b.score) return a.score > b.score;
      if (a.pos != b.pos) return a.pos < b.pos;
      return a.head < b.head;
    };
    if (rest < pool_size) std::nth_element(first, first + rest, first + pool_size, before);
    for (std::int64_t i = 0; i < rest; ++i) counts[layer_pool_[static_cast<std::size_t>(i)].head] += 1;
  }

 private:
  struct PoolEntry {
    float score;
    std::int32_t pos;
    std::int32_t head;
  };

  // Softmax of one logit row over the keys with position <= qpos; masked entries become 0.
  // Returns false when the query sees no key.
  static bool masked_softmax(float* row, const std::int32_t* pos, std::int64_t n, std::int64_t qpos) {
    float mx = -std::numeric_limits<float>::infinity();
    for (std::int64_t j = 0; j < n; ++j)
      if (pos[j] <= qpos) mx = std::max(mx, row[j]);
    if (mx == -std::numeric_limits<float>::infinity()) return false;
    float sum = 0.0f;
    for (std::int64_t j = 0; j < n; ++j) {
      const float e = pos[j] <= qpos ? std::exp(row[j] - mx) : 0.0f;
      row[j] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
    for (std::int64_t j = 0; j < n; ++j) row[j] *= inv;
    return true;
  }

  // 2^(x - m) for a base-2 logit x in [m - 127, m], where m is an integer with |m| <= 2^20 and
  // magic = 1.5 * 2^23 + 127 - m. x + magic rounds to an integer whose low mantissa bits hold
  // round(x) - m + 127, the biased exponent of 2^(round(x) - m); f = x - round(x) in [-0.5, 0.5]
  // is exact; 2^f = q(f)^2 with q the degree-4 minimax fit of 2^(f/2) on [-0.5, 0.5]. Relative
  // error <= 3.7e-7 (measured over every float f in [-0.5, 0.5]), below the rounding error the
  // fp32 logit itself carries once |x| > 4. Exponent field 0 (x < m - 126.5) gives +0.
  // Straight-line code, so the loop calling it vectorizes on plain SSE2: 13 float operations and
  // a shift, where Cephes' expf after a Cody-Waite reduction by ln 2 takes 22 and 3 integer ones.
  static float exp2_shifted(float x, float magic) noexcept {
    const float biased = x + magic;
    const float f = x - (biased - magic);
    float q = 6.0353289024047449e-4f;
    q = q * f + 6.9518440775235954e-3f;
    q = q * f + 6.0056361473567533e-2f;
    q = q * f + 3.4657267182036006e-1f;
    q = q * f + 1.0f;
    return (q * q) * std::bit_cast<float>(std::bit_cast<std::uint32_t>(biased) << 23);
  }

  // One window query's softmax numerators over a row of base-2 logits: row[j] = 2^(row[j] - m) for
  // an integer shift m, and 0 for the keys it cannot see (late[i] with position > qpos; every other
  // key is visible). Returns 1 / sum(row), or 0 when the query sees no key. m cancels exactly in
  // e * (1 / sum) (a power of two) while every term is a normal float, so it only has to keep them
  // in range: when every |logit| <= 62, m = 0 and one pass (max |x|) replaces max and min; otherwise
  // m = ceil(max) and a min pass rules out logits below m - 127 (-inf, or a spread over 127
  // octaves), which are clamped. Logits more than 126.5 below the max (2^-126 relative) give 0.
  // A NaN logit, or a max of +inf, gives NaN, as expf would.
  static float window_softmax(float* row, const std::int32_t* pos, std::int64_t n, std::int64_t qpos,
                              const std::int32_t* late, std::int64_t num_late) {
    auto set_masked = [&](float value) {
      std::int64_t count = 0;
      for (std::int64_t i = 0; i < num_late; ++i)
        if (pos[late[i]] > qpos) {
          row[late[i]] = value;
          ++count;
        }
      return count;
    };
    if (set_masked(0.0f) == n) return 0.0f;  // 0 leaves max |x| as the visible keys have it
    Eigen::Map<Eigen::ArrayXf> x(row, n);
    float m = 0.0f;
    if (x.abs().maxCoeff() <= 62.0f) {
      set_masked(-127.0f);  // 2^-127 is built as exactly +0 below
    } else {
      set_masked(-std::numeric_limits<float>::infinity());
      const float mx = x.maxCoeff();
      if (mx == -std::numeric_limits<float>::infinity()) return 0.0f;
      m = std::ceil(mx);
      if (std::abs(m) <= 0x1p20f) {
        const float lo = m - 127.0f;
        set_masked(lo);
        if (x.minCoeff() < lo)
          for (std::int64_t j = 0; j < n; ++j) row[j] = std::max(row[j], lo);
      } else {  // NaN, +inf, or beyond the magic-number rounding: shift first, as expf(x - max) would
        for (std::int64_t j = 0; j < n; ++j) row[j] = std::max(row[j] - mx, -127.0f);
        m = 0.0f;
      }
    }
    const float magic = 12582912.0f + (127.0f - m);
    // Eight running sums in a fixed order: the same result whether or not the compiler vectorizes.
    float acc[8] = {};
    std::int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (std::int64_t l = 0; l < 8; ++l) {
        const float e = exp2_shifted(row[j + l], magic);
        row[j + l] = e;
        acc[l] += e;
      }
    for (; j < n; ++j) {
      const float e = exp2_shifted(row[j], magic);
      row[j] = e;
      acc[j & 7] += e;
    }
    return 1.0f / (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])));
  }

  using Stride = Eigen::Stride<Eigen::Dynamic, 1>;
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using RowMap = Eigen::Map<RowMatrix, Eigen::Unaligned, Stride>;
  using ConstRowMap = Eigen::Map<const RowMatrix, Eigen::Unaligned, Stride>;

  static ConstRowMap keys_of(const LayerView<float>& v, std::int64_t h) {
    return ConstRowMap(v.key(h, 0), v.lens[h], v.head_dim, Stride(v.slot_stride, 1));
  }
  static ConstRowMap values_of(const LayerView<float>& v, std::int64_t h) {
    return ConstRowMap(v.value(h, 0), v.lens[h], v.head_dim, Stride(v.slot_stride, 1));
  }

  static void softmax_in_place(float* row, std::int64_t n) {
    float mx = -std::numeric_limits<float>::infinity();
    for (std::int64_t j = 0; j < n; ++j) mx = std::max(mx, row[j]);
    float sum = 0.0f;
    for (std::int64_t j = 0; j < n; ++j) {
      row[j] = std::exp(row[j] - mx);
      sum += row[j];
    }
    const float inv = 1.0f / sum;
    for (std::int64_t j = 0; j < n; ++j) row[j] *= inv;
  }

  // Strictly ascending slots in [0, len): first >= 0, last < len, and each above the one before,
  // tested as one branch-free pass (it vectorizes) since it runs before every compaction.
  static bool keep_slots_valid(const std::int32_t* keep, std::int64_t k, std::int64_t len) {
    if (k == 0) return true;
    if (keep[0] < 0 || keep[k - 1] >= len) return false;
    std::int32_t not_ascending = 0;
    for (std::int64_t i = 1; i < k; ++i) not_ascending |= static_cast<std::int32_t>(keep[i] <= keep[i - 1]);
    return not_ascending == 0;
  }
  // The first slot that breaks keep_slots_valid, named with its head and index.
  [[noreturn]] static void fail_keep_slots(const std::int32_t* keep, std::int64_t k, std::int64_t len, std::int64_t h) {
    std::int64_t prev = -1, i = 0;
    while (i < k - 1 && keep[i] > prev && keep[i] < len) prev = keep[i++];
    detail::fail<ArgumentError>("CpuBackend::compact", "keep_slots[" + std::to_string(h) + "][" + std::to_string(i) + "]",
                                keep[i],
                                "must be a live slot in (" + std::to_string(prev) + ", " + std::to_string(len) +
                                    "): ascending, each slot once");
  }

  // Row keep[i] -> row i for i in [first, k) of one kv-head's K (or V) block, one run of
  // consecutive kept slots at a time. With keep[i] > i, copying a run forward row by row never
  // reads a row it already wrote, so one memmove of the run (rows contiguous: slot_stride ==
  // head_dim) gives the same result.
  static void move_runs(const LayerView<float>& v, float* head_base, const std::int32_t* keep, std::int64_t first,
                        std::int64_t k) {
    const auto row_bytes = static_cast<std::size_t>(v.head_dim) * sizeof(float);
    const bool contiguous = v.slot_stride == v.head_dim;
    for (std::int64_t i = first; i < k;) {
      const std::int64_t src = keep[i];
      std::int64_t run = 1;
      while (i + run < k && keep[i + run] == src + run) ++run;
      if (contiguous && src > i) {
        std::memmove(head_base + i * v.slot_stride, head_base + src * v.slot_stride, row_bytes * static_cast<std::size_t>(run));
      } else if (src != i) {
        for (std::int64_t r = 0; r < run; ++r)
          std::memcpy(head_base + (i + r) * v.slot_stride, head_base + (src + r) * v.slot_stride, row_bytes);
      }
      i += run;
    }
  }

  // Unprotected positions of a ProtectRule as an int32 interval [lo, hi], exact for every int32
  // position; false when the rule protects every int32 position.
  static bool unprotected_interval(ProtectRule rule, std::int32_t& lo, std::int32_t& hi) {
    if (rule.sink_end > INT32_MAX || rule.recent_begin <= INT32_MIN) return false;
    lo = static_cast<std::int32_t>(std::max<std::int64_t>(rule.sink_end, INT32_MIN));
    hi = static_cast<std::int32_t>(std::min<std::int64_t>(rule.recent_begin - 1, INT32_MAX));
    return true;
  }

  // All bits set where position p is unprotected ([lo, hi]), else 0. Masks rather than branches
  // or bools so the loops below vectorize (plain SSE2).
  static std::int32_t unprotected_mask(std::int32_t p, std::int32_t lo, std::int32_t hi) {
    return -static_cast<std::int32_t>(p >= lo) & -static_cast<std::int32_t>(p <= hi);
  }

  // The unprotected slot a scan settles on: the first one, then j whenever worse(j, best). -1
  // when every slot is protected. Its branches follow the protect rule (predictable when most
  // slots are protected, as in StreamingLLM) and `worse`.
  template <class Worse>
  static std::int32_t scan_unprotected(const std::int32_t* pos, std::int64_t n, ProtectRule rule, Worse worse) {
    std::int32_t best = -1;
    for (std::int64_t j = 0; j < n; ++j) {
      if (rule.protects(pos[j])) continue;
      if (best < 0) {
        best = static_cast<std::int32_t>(j);
        continue;
      }
      if (worse(j, best)) best = static_cast<std::int32_t>(j);
    }
    return best;
  }

  // select_victims with scores, as a scan: move to j whenever s[j] < s[best] or (s[j] == s[best]
  // and pos[j] > pos[best]). It stays on a NaN first candidate and never moves to a NaN.
  static std::int32_t lowest_scored_slot_scan(const float* s, const std::int32_t* pos, std::int64_t n, ProtectRule rule) {
    return scan_unprotected(pos, n, rule, [&](std::int64_t j, std::int64_t best) {
      return s[j] < s[best] || (s[j] == s[best] && pos[j] > pos[best]);
    });
  }

  // Order-preserving integer key of a non-NaN float: x < y iff key(x) < key(y), and -0, +0 share
  // key 0. NaNs get keys above +inf's (positive sign) or below -inf's (negative sign).
  static constexpr std::int32_t score_key(float x) noexcept {
    const auto i = std::bit_cast<std::int32_t>(x);
    const std::int32_t zero = -static_cast<std::int32_t>((i & 0x7FFFFFFF) == 0);
    return (i ^ ((i >> 31) & 0x7FFFFFFF)) & ~zero;
  }

  // The scan's result without its branches (they are unpredictable once replacements have
  // shuffled the slots): unless the first candidate is NaN, the victim is the first unprotected
  // slot of least score key among the non-NaN ones, or, when several hold it, the newest of them.
  // A negative NaN would have the least key: such heads take the scan. Every pass is a plain
  // integer reduction, which g++ and clang vectorize on SSE2 in any calling context (a float min
  // needs -ffast-math to vectorize): the min pass, a blockwise search for the first slot at the
  // minimum, a check for a second one; only ties pay for the pass that finds the newest.
  static std::int32_t lowest_scored_slot(const float* s, const std::int32_t* pos, std::int64_t n, ProtectRule rule) {
    std::int32_t lo = 0, hi = 0;
    if (!unprotected_interval(rule, lo, hi)) return -1;
    std::int64_t j0 = 0;
    while (j0 < n && unprotected_mask(pos[j0], lo, hi) == 0) ++j0;
    if (j0 == n) return -1;
    if (std::isnan(s[j0])) return static_cast<std::int32_t>(j0);
    std::int32_t min_key = INT32_MAX;  // ends at most key(s[j0]), a non-NaN key below INT32_MAX
    for (std::int64_t j = j0; j < n; ++j) {
      const std::int32_t m = unprotected_mask(pos[j], lo, hi);
      min_key = std::min(min_key, (score_key(s[j]) & m) | (INT32_MAX & ~m));
    }
    if (min_key < score_key(-std::numeric_limits<float>::infinity())) return lowest_scored_slot_scan(s, pos, n, rule);
    // All bits set where slot j is unprotected and holds the minimum.
    const auto at_min = [&](std::int64_t j) {
      return -static_cast<std::int32_t>(score_key(s[j]) == min_key) & unprotected_mask(pos[j], lo, hi);
    };
    std::int64_t first = j0;
    for (; first + 32 <= n; first += 32) {  // blocks without the minimum are skipped whole
      std::int32_t hit = 0;
      for (std::int64_t k = first; k < first + 32; ++k) hit |= at_min(k);
      if (hit != 0) break;
    }
    while (at_min(first) == 0) ++first;
    std::int32_t ties = 0;
    for (std::int64_t j = first + 1; j < n; ++j) ties |= at_min(j);
    if (ties == 0) return static_cast<std::int32_t>(first);
    std::int32_t newest = INT32_MIN;
    for (std::int64_t j = first; j < n; ++j) {
      const std::int32_t m = at_min(j);
      newest = std::max(newest, (pos[j] & m) | (INT32_MIN & ~m));
    }
    while (pos[first] != newest || at_min(first) == 0) ++first;
    return static_cast<std::int32_t>(first);
  }

  // The unprotected slot of least position (the first of equals), or -1.
  static std::int32_t oldest_unprotected_slot(const std::int32_t* pos, std::int64_t n, ProtectRule rule) {
    return scan_unprotected(pos, n, rule, [&](std::int64_t j, std::int64_t best) { return pos[j] < pos[best]; });
  }

  // evict_one's replacement: each head's newest slot moves into victims_[h] (nothing moves when
  // the newest entry is the victim).
  void move_newest_into_victims(const LayerView<float>& v, std::span<const SlotExtra> extras) const {
    for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
      const std::int64_t newest = v.lens[h] - 1;
      const std::int64_t victim = victims_[static_cast<std::size_t>(h)];
      if (victim != newest) move_slot(v, extras, h, newest, victim);
    }
  }

  static void move_slot(const LayerView<float>& v, std::span<const SlotExtra> extras, std::int64_t h, std::int64_t src,
                        std::int64_t dst) {
    const auto row_bytes = static_cast<std::size_t>(v.head_dim) * sizeof(float);
    std::memcpy(v.key(h, dst), v.key(h, src), row_bytes);
    std::memcpy(v.value(h, dst), v.value(h, src), row_bytes);
    v.head_positions(h)[dst] = v.head_positions(h)[src];
    for (const SlotExtra& e : extras)
      for (std::int64_t r = 0; r < e.rows_per_kv_head; ++r) {
        float* row = e.data + (h * e.rows_per_kv_head + r) * v.capacity;
        row[dst] = row[src];
      }
  }

  std::vector<float> tile_;            // [kQueryTile, capacity] logits of one query tile
  std::vector<std::int32_t> order_;    // [capacity] candidate slots for top-k
  std::vector<float> group_scores_;    // [kv_head, capacity] evict_one's group scores
  std::vector<std::int32_t> victims_;  // [kv_head] evict_one's victims
  std::vector<std::uint8_t> keep_mark_;  // [capacity] kept flags
  std::vector<double> rope_cos_, rope_sin_;  // [head_dim / 2]
  std::vector<PoolEntry> layer_pool_;  // [kv_head * capacity] candidates of head_budgets
};

static_assert(Backend<CpuBackend>, "CpuBackend must satisfy the kvevict::Backend concept");
static_assert(WindowScoringBackend<CpuBackend>, "CpuBackend must satisfy kvevict::WindowScoringBackend");
static_assert(DecodeEvictionBackend<CpuBackend>, "CpuBackend must satisfy kvevict::DecodeEvictionBackend");

}  // namespace kvevict
