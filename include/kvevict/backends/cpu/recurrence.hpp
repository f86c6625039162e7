// CPU implementation of the recurrence primitives (core/recurrence.hpp documents them): free
// functions on CpuBackend, found by argument-dependent lookup. The exact-clock event update is
// branch-free over fixed-size chunks so the compiler vectorises it; the fp16-compatibility paths
// are scalar (they exist for parity, not speed). Nothing here allocates.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kvevict/backends/cpu/cpu_backend.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/recurrence.hpp"

namespace kvevict {

namespace cpu_detail {

// Slots per chunk of the event update: the group-aggregated probabilities of one chunk live on
// the stack (1 KiB), so the update needs no workspace.
inline constexpr std::int64_t kRecurrenceChunk = 256;

// agg[j] = the group's event statistic for slots [j0, j0 + m): the max (rule any) or the mean
// (rule mean) over the q-heads' rows. fp16_compat rounds every probability to fp16 first, as the
// official code casts attention to the model dtype before thresholding.
inline void group_statistic(const float* rows, std::int64_t probs_stride, std::int64_t group, std::int64_t j0,
                            std::int64_t m, GroupEventRule rule, bool fp16_compat, float* agg) {
  const float* r0 = rows + j0;
  if (fp16_compat) {
    for (std::int64_t j = 0; j < m; ++j) agg[j] = round_to_fp16(r0[j]);
    for (std::int64_t r = 1; r < group; ++r) {
      const float* row = r0 + r * probs_stride;
      if (rule == GroupEventRule::any)
        for (std::int64_t j = 0; j < m; ++j) agg[j] = std::max(agg[j], round_to_fp16(row[j]));
      else
        for (std::int64_t j = 0; j < m; ++j) agg[j] += round_to_fp16(row[j]);
    }
  } else {
    std::copy(r0, r0 + m, agg);
    for (std::int64_t r = 1; r < group; ++r) {
      const float* row = r0 + r * probs_stride;
      if (rule == GroupEventRule::any)
        for (std::int64_t j = 0; j < m; ++j) agg[j] = std::max(agg[j], row[j]);
      else
        for (std::int64_t j = 0; j < m; ++j) agg[j] += row[j];
    }
  }
  if (rule == GroupEventRule::mean && group > 1) {
    const auto g = static_cast<float>(group);
    for (std::int64_t j = 0; j < m; ++j) agg[j] /= g;
  }
}

// 2 / (1 + e): the official code's sigmoid form, kept literally so fp32 results match it.
inline float two_over_one_plus(float e) noexcept { return 2.0f / (1.0f + e); }

}  // namespace cpu_detail

// Slots [fresh_from[h], lens[h]) of every kv-head start with last = born, mri = 0.
//   fresh_from: [kv_head] host; last, mri: [kv_head, capacity].
inline void init_recurrence(CpuBackend& /*backend*/, const LayerView<float>& v, const std::int64_t* fresh_from,
                            std::int64_t born, bool fp16_compat, float* last, float* mri) {
  const float b = fp16_compat ? round_to_fp16(static_cast<float>(born)) : static_cast<float>(born);
  for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
    const std::int64_t from = std::clamp<std::int64_t>(fresh_from[h], 0, v.lens[h]);
    std::fill(last + h * v.capacity + from, last + h * v.capacity + v.lens[h], b);
    std::fill(mri + h * v.capacity + from, mri + h * v.capacity + v.lens[h], 0.0f);
  }
}

// One decode step's importance events over every live slot (see core/recurrence.hpp).
//   probs: [q_head, probs_stride], q-head h * G + r of kv-head h; last, mri, events (nullable):
//   [kv_head, capacity].
inline void record_recurrence(CpuBackend& /*backend*/, const LayerView<float>& v, const float* probs,
                              std::int64_t probs_stride, const RecurrenceEventParams& p, float* last, float* mri,
                              float* events) {
  using cpu_detail::kRecurrenceChunk;
  const std::int64_t g = v.group_size();
  // Exact clock: t < 2^24, so the float holds it exactly. fp16: the official `last[mask] = t`.
  const float t = p.fp16_compat ? round_to_fp16(static_cast<float>(p.step)) : static_cast<float>(p.step);
  const float alpha = p.alpha;
  alignas(64) float agg[kRecurrenceChunk];
  for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
    const std::int64_t n = v.lens[h];
    const float* rows = probs + h * g * probs_stride;
    float* lh = last + h * v.capacity;
    float* mh = mri + h * v.capacity;
    float* eh = events != nullptr ? events + h * v.capacity : nullptr;
    for (std::int64_t j0 = 0; j0 < n; j0 += kRecurrenceChunk) {
      const std::int64_t m = std::min(kRecurrenceChunk, n - j0);
      cpu_detail::group_statistic(rows, probs_stride, g, j0, m, p.rule, p.fp16_compat, agg);
      float* lc = lh + j0;
      float* mc = mh + j0;
      if (p.fp16_compat) {
        // period = last - old, rounded to fp16 like every official fp16 tensor op.
        for (std::int64_t j = 0; j < m; ++j) {
          const float old = lc[j];
          const float now = agg[j] >= alpha ? t : old;
          mc[j] = std::max(mc[j], round_to_fp16(now - old));
          lc[j] = now;
        }
      } else {
        // Branch-free: no event leaves last unchanged and adds a gap of 0.
        for (std::int64_t j = 0; j < m; ++j) {
          const float old = lc[j];
          const float now = agg[j] >= alpha ? t : old;
          mc[j] = std::max(mc[j], now - old);
          lc[j] = now;
        }
      }
      if (eh != nullptr)
        for (std::int64_t j = 0; j < m; ++j) eh[j0 + j] = agg[j] >= alpha ? 1.0f : 0.0f;
    }
  }
}

// I = H1 + H2 per live slot (see RecurrenceScoreParams). fp32 in the official op order; with
// fp16_compat every operation is computed in fp32 and rounded once to fp16 (the official fp16
// tensors under CUDA semantics), reproducing its quantised scores and ties.
//   last, mri, scores: [kv_head, capacity].
inline void recurrence_scores(CpuBackend& /*backend*/, const LayerView<float>& v, const float* last,
                              const float* mri, const RecurrenceScoreParams& p, float* scores) {
  using cpu_detail::two_over_one_plus;
  const auto t = static_cast<float>(p.step);
  const float lead = p.paper_h1 ? 0.0f : 1.0f;
  constexpr float kEps = 1e-5f;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
    const std::int64_t n = v.lens[h];
    const float* lh = last + h * v.capacity;
    const float* mh = mri + h * v.capacity;
    const std::int32_t* pos = v.head_positions(h);
    float* sh = scores + h * v.capacity;
    if (p.fp16_compat) {
      auto f16 = round_to_fp16;
      for (std::int64_t j = 0; j < n; ++j) {
        const float m = mh[j];
        const float dt = f16(t - lh[j]);
        const float ratio = f16(dt / f16(m + kEps));
        const float arg = p.paper_h1 ? ratio : f16(1.0f + ratio);
        const float h1 = f16(2.0f / f16(1.0f + f16(std::exp(arg))));
        const float h2 = m == 0.0f ? 0.0f : f16(2.0f / f16(1.0f + f16(std::exp(f16(m - 1.0f)))));
        sh[j] = f16(h1 + h2);
      }
    } else {
      for (std::int64_t j = 0; j < n; ++j) {
        const float m = mh[j];
        const float h1 = two_over_one_plus(std::exp(lead + (t - lh[j]) / (m + kEps)));
        const float h2 = m == 0.0f ? 0.0f : two_over_one_plus(std::exp(m - 1.0f));
        sh[j] = h1 + h2;
      }
    }
    if (p.protect_below > 0)
      for (std::int64_t j = 0; j < n; ++j)
        if (pos[j] < p.protect_below) sh[j] = kInf;
  }
}

static_assert(RecurrenceBackend<CpuBackend>, "CpuBackend must satisfy kvevict::RecurrenceBackend");

}  // namespace kvevict
