// Recurrence-interval tracking (LazyEviction): the plain parameter types, the fp16 rounding the
// official-compatibility mode needs, and the RecurrenceBackend concept naming the three backend
// primitives. Backends implement them as free functions found by argument-dependent lookup
// (CPU: backends/cpu/recurrence.hpp), so a backend adopts them without touching its class.
#pragma once

#include <bit>
#include <cstdint>

#include "kvevict/core/backend.hpp"
#include "kvevict/core/layer_view.hpp"

namespace kvevict {

// How the q-heads of one GQA group turn into one importance event for their kv-head's entry:
// `any` = at least one q-head's probability >= alpha (max >= alpha); `mean` = the group's mean
// probability (fp32, summed in q-head order, divided by the group size) >= alpha. Identical when
// the group has one q-head (query-head granularity, the official layout).
enum class GroupEventRule { any, mean };

constexpr const char* to_string(GroupEventRule r) noexcept { return r == GroupEventRule::any ? "any" : "mean"; }

// One decode step's event update (record_recurrence).
struct RecurrenceEventParams {
  std::int64_t step = 0;  // t >= 1, the decode step being observed
  float alpha = 1e-4f;    // absolute probability threshold, compared in fp32 (p >= alpha)
  GroupEventRule rule = GroupEventRule::any;
  bool fp16_compat = false;  // probabilities and timestamps rounded to fp16, as the official fp16 run
};

// Eviction scores at step t (recurrence_scores):
//   I = H1 + H2, H1 = 2 sigma(-(1 + dt / (mri + 1e-5))) (official; paper_h1 drops the "1 +"),
//   H2 = mri == 0 ? 0 : 2 sigma(1 - mri), dt = t - last.
struct RecurrenceScoreParams {
  std::int64_t step = 0;
  bool fp16_compat = false;       // every operation rounded to fp16, in the official op order
  bool paper_h1 = false;          // H1 = 2 sigma(-dt / (mri + 1e-5))
  std::int64_t protect_below = 0;  // entries with position < protect_below score +inf (kept first)
};

// The exact clock stores integer timestamps in fp32 state rows (they move with compaction as
// SlotExtra): exact below 2^24 steps. The fp16 clock overflows to inf above 65504 (the official
// state would too), so the compatibility mode stops there.
inline constexpr std::int64_t kExactRecurrenceSteps = std::int64_t{1} << 24;
inline constexpr std::int64_t kFp16RecurrenceSteps = 65504;

// x rounded to the nearest IEEE binary16 value (ties to even), returned as float: overflow to
// +-inf from 65520 on, subnormal halves below 2^-14, NaN and inf unchanged. constexpr, so the
// compatibility arithmetic can be checked at compile time.
constexpr float round_to_fp16(float x) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t sign = bits & 0x80000000u;
  const std::uint32_t mag = bits & 0x7fffffffu;
  if (mag >= 0x7f800000u) return x;                                      // inf, NaN
  if (mag >= 0x477ff000u) return std::bit_cast<float>(sign | 0x7f800000u);  // >= 65520 rounds to inf
  if (mag < 0x38800000u) {
    // Below 2^-14 the half quantum is 2^-24, the ulp of 0.5f: adding and removing 0.5f rounds to
    // it with the FPU's own ties-to-even.
    const float m = std::bit_cast<float>(mag);
    const float r = (m + 0.5f) - 0.5f;
    return std::bit_cast<float>(sign | std::bit_cast<std::uint32_t>(r));
  }
  // Normal: keep 10 of the 23 mantissa bits, ties to even (a carry correctly bumps the exponent).
  const std::uint32_t lsb = (mag >> 13) & 1u;
  const std::uint32_t rounded = (mag + 0x0fffu + lsb) & ~0x1fffu;
  return std::bit_cast<float>(sign | rounded);
}

static_assert(round_to_fp16(2049.0f) == 2048.0f, "fp16 keeps 2048 for 2049 (spacing 2 above 2048, ties to even)");
static_assert(round_to_fp16(2051.0f) == 2052.0f, "fp16 rounds the tie 2051 to the even 2052");
static_assert(round_to_fp16(9001.0f) == 9000.0f, "fp16 spacing is 8 above 8192");
static_assert(round_to_fp16(65519.0f) == 65504.0f && round_to_fp16(65520.0f) > 65504.0f, "fp16 overflows at 65520");

// The recurrence primitives, on top of Backend. State rows are [kv_head, capacity] floats of one
// layer, slot-aligned with the cache (the policy hands them to compaction as SlotExtra).
//   init_recurrence(b, view, fresh_from[kv_head] (host), born, fp16_compat, last, mri):
//       slots [fresh_from[h], lens[h]) start with last = born (fp16-rounded in compat mode), mri = 0.
//   record_recurrence(b, view, probs [q_head, probs_stride], probs_stride, params, last, mri, events):
//       for every live slot, event = the group's probabilities cross alpha (params.rule); on an
//       event gap = t - last, last = t, mri = max(mri, gap). events ([kv_head, capacity], may be
//       null) receives 1/0 per live slot. probs are the step's single query row per q-head.
//   recurrence_scores(b, view, last, mri, params, scores [kv_head, capacity]): I per live slot.
// None allocates; all run asynchronously on a device backend.
template <class B>
concept RecurrenceBackend =
    Backend<B> &&
    requires(B& b, const LayerView<float>& v, const float* cf, float* f, const std::int64_t* ci64, std::int64_t n,
             bool flag, const RecurrenceEventParams& ep, const RecurrenceScoreParams& sp) {
      init_recurrence(b, v, ci64, n, flag, f, f);
      record_recurrence(b, v, cf, n, ep, f, f, f);
      recurrence_scores(b, v, cf, cf, sp, f);
    };

}  // namespace kvevict
