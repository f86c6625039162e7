// LazyEviction: hand-made traces with known recurrence intervals, the lagged schedule and its budget,
// the fp16-compatible clock, GQA event rules, tie-breaking, bad input, and a seeded sweep against
// an independent position-keyed reference (below), with cache invariants checked after every step.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "kvevict/kvevict.hpp"
#include "support/generators.hpp"
#include "support/npy.hpp"

namespace {

using namespace kvevict;
using test::cspan;
using test::require_throws_exactly;
using test::Rng;
using Cache = KVCache<CpuBackend>;
using Obs = Observation<float, HostSpace>;
using Policy = LazyEviction<Cache>;

static_assert(EvictionPolicy<Policy, Cache>, "LazyEviction must satisfy kvevict::EvictionPolicy");

// ---------------------------------------------------------------------------------- reference
// Independent of the library: integer clock, std::map keyed by position, sort-based selection.

// x rounded to the nearest binary16 value, ties to even, computed in double (exact for every
// float input) rather than by bit manipulation as the library does.
double ref_fp16(double x) {
  if (x == 0.0 || !std::isfinite(x)) return x;
  const double a = std::abs(x);
  int e = std::ilogb(a);
  e = std::max(e, -14);                          // below 2^-14 the quantum stays 2^-24
  const double quantum = std::ldexp(1.0, e - 10);  // 10 fraction bits
  const double r = std::nearbyint(a / quantum) * quantum;  // default rounding mode: ties to even
  if (r >= 65520.0) return std::copysign(std::numeric_limits<double>::infinity(), x);
  return std::copysign(r, x);
}
float rf16(float x) { return static_cast<float>(ref_fp16(static_cast<double>(x))); }

struct RefOptions {
  std::int64_t budget = 0, window = 0;
  float alpha = 0.0f;
  GroupEventRule rule = GroupEventRule::any;
  bool fp16 = false, paper_h1 = false, protect_prompt = false;
};

// The official score (kv_utils.py L72-73) in its op order, fp32, or fp16 with one rounding per op.
float ref_score(const RefOptions& o, std::int64_t t, float last, float mri) {
  const auto tf = static_cast<float>(t);
  if (!o.fp16) {
    const float arg = (o.paper_h1 ? 0.0f : 1.0f) + (tf - last) / (mri + 1e-5f);
    const float h1 = 2.0f / (1.0f + std::exp(arg));
    const float h2 = mri == 0.0f ? 0.0f : 2.0f / (1.0f + std::exp(mri - 1.0f));
    return h1 + h2;
  }
  const float ratio = rf16(rf16(tf - last) / rf16(mri + 1e-5f));
  const float arg = o.paper_h1 ? ratio : rf16(1.0f + ratio);
  const float h1 = rf16(2.0f / rf16(1.0f + rf16(std::exp(arg))));
  const float h2 = mri == 0.0f ? 0.0f : rf16(2.0f / rf16(1.0f + rf16(std::exp(rf16(mri - 1.0f)))));
  return rf16(h1 + h2);
}

struct RefEntry {
  float last = 0.0f, mri = 0.0f;
};

// One (layer, kv_head) of the official algorithm.
class RefHead {
 public:
  std::map<std::int64_t, RefEntry> entries;  // position -> state
  std::int64_t prompt_end = 0;

  void prefill(std::int64_t next_position, std::int64_t clock, const RefOptions& o) {
    for (std::int64_t p = 0; p < next_position; ++p)
      if (!entries.count(p)) entries[p] = RefEntry{static_cast<float>(clock), 0.0f};
    if (o.protect_prompt) prompt_end = next_position;
  }
  // probs(r, pos): probability of q-head r of the group for position pos.
  void decode(std::int64_t t, std::int64_t new_pos, std::int64_t group, const RefOptions& o,
              const std::function<double(std::int64_t, std::int64_t)>& probs) {
    const auto born = static_cast<float>(t - 1);
    entries[new_pos] = RefEntry{o.fp16 ? rf16(born) : born, 0.0f};
    const float now = o.fp16 ? rf16(static_cast<float>(t)) : static_cast<float>(t);
    for (auto& [pos, e] : entries) {
      double stat = o.rule == GroupEventRule::any ? -1.0 : 0.0;
      for (std::int64_t r = 0; r < group; ++r) {
        double p = probs(r, pos);
        if (o.fp16) p = ref_fp16(p);
        stat = o.rule == GroupEventRule::any ? std::max(stat, p) : stat + p;
      }
      if (o.rule == GroupEventRule::mean) stat /= static_cast<double>(group);
      if (stat >= static_cast<double>(o.alpha)) {
        const float gap = o.fp16 ? rf16(now - e.last) : now - e.last;
        e.mri = std::max(e.mri, gap);
        e.last = now;
      }
    }
    const auto n = static_cast<std::int64_t>(entries.size());
    if (t % o.window != 0 || n <= o.budget) return;
    const std::int64_t recent_begin = new_pos + 1 - o.window;
    std::vector<std::pair<float, std::int64_t>> ranked;
    for (const auto& [pos, e] : entries)
      if (pos < recent_begin) {
        const bool pinned = o.protect_prompt && pos < prompt_end;
        ranked.emplace_back(pinned ? std::numeric_limits<float>::infinity() : ref_score(o, t, e.last, e.mri), pos);
      }
    std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    std::map<std::int64_t, RefEntry> kept;
    for (std::int64_t i = 0; i < o.budget - o.window; ++i) {
      const std::int64_t pos = ranked[static_cast<std::size_t>(i)].second;
      kept[pos] = entries[pos];
    }
    for (const auto& [pos, e] : entries)
      if (pos >= recent_begin) kept[pos] = e;
    entries = std::move(kept);
  }
};

// ------------------------------------------------------------------------------------ harness

// A cache of generated K/V plus a LazyEviction, driven with probability rows given per
// (layer, q_head, position), laid out in the cache's own slot order as an engine would.
struct Harness {
  std::uint64_t seed;
  Cache cache;
  Policy policy;
  std::vector<float> probs;

  Harness(std::uint64_t s, const CacheShape& shape, const LazyEvictionConfig& cfg)
      : seed(s),
        cache(shape),
        policy(cache, cfg),
        probs(static_cast<std::size_t>(shape.num_q_heads * shape.capacity)) {}

  void prefill(std::int64_t prompt_len) {
    for (std::int64_t l = 0; l < cache.shape().num_layers; ++l) {
      test::append_source(cache, seed, l, prompt_len);
      policy.on_prefill(cache, l, Obs::none());
    }
  }
  // Appends one token to every layer and observes p(layer, q_head, position).
  void step(const std::function<float(std::int64_t, std::int64_t, std::int64_t)>& p) {
    const CacheShape& s = cache.shape();
    for (std::int64_t l = 0; l < s.num_layers; ++l) {
      test::append_source(cache, seed, l, 1);
      policy.on_decode(cache, l, probs_obs(l, p));
    }
  }
  Obs probs_obs(std::int64_t l, const std::function<float(std::int64_t, std::int64_t, std::int64_t)>& p) {
    const CacheShape& s = cache.shape();
    const std::int64_t g = s.group_size();
    std::fill(probs.begin(), probs.end(), 0.0f);
    for (std::int64_t qh = 0; qh < s.num_q_heads; ++qh) {
      const auto pos = cache.positions(l, qh / g);
      for (std::size_t j = 0; j < pos.size(); ++j)
        probs[static_cast<std::size_t>(qh * s.capacity) + j] = p(l, qh, pos[j]);
    }
    return Obs::from_probs(cspan(probs), 1, s.capacity);
  }
  // (last, mri) of `pos` in (layer, kv_head); fails the test if it is not resident.
  RefEntry entry(std::int64_t layer, std::int64_t kv_head, std::int64_t pos) const {
    const RecurrenceSnapshot st = const_cast<Policy&>(policy).scorer().state(cache, layer, kv_head);
    for (std::size_t j = 0; j < st.positions.size(); ++j)
      if (st.positions[j] == pos) return {st.last[j], st.mri[j]};
    FAIL("position " << pos << " is not resident in layer " << layer << " kv_head " << kv_head);
    return {};
  }
};

CacheShape one_head(std::int64_t capacity, std::int64_t q_heads = 1) { return CacheShape{1, 1, q_heads, 4, capacity}; }

// A snapshot of everything a failed call must leave untouched: the cache bytes and the policy's
// per-layer clock and state.
struct Fingerprint {
  std::uint64_t cache_hash = 0;
  std::vector<std::int64_t> steps;
  std::vector<std::vector<float>> state;
  bool operator==(const Fingerprint&) const = default;
};
Fingerprint fingerprint(Cache& cache, Policy& policy) {
  Fingerprint f;
  f.cache_hash = cache.state_hash();
  for (std::int64_t l = 0; l < cache.shape().num_layers; ++l) {
    f.steps.push_back(policy.scorer().step(l));
    for (std::int64_t h = 0; h < cache.shape().num_kv_heads; ++h) {
      const auto st = policy.scorer().state(cache, l, h);
      f.state.push_back(st.last);
      f.state.push_back(st.mri);
    }
  }
  return f;
}

}  // namespace

// ------------------------------------------------------------------------------ hand-made traces

TEST_CASE("A token attended at every decode step keeps an MRI of 1", "[lazy_eviction]") {
  Harness hx(11, one_head(64), LazyEvictionConfig{.budget = 40, .window = 4, .alpha = 0.25f});
  hx.prefill(6);
  for (std::int64_t t = 1; t <= 30; ++t) {
    hx.step([](std::int64_t, std::int64_t, std::int64_t pos) { return pos == 2 ? 0.5f : 0.01f; });
    const RefEntry e = hx.entry(0, 0, 2);
    CAPTURE(t);
    CHECK(e.last == static_cast<float>(t));
    CHECK(e.mri == 1.0f);
  }
  // A token never attended keeps MRI 0 and its initial timestamp.
  const RefEntry silent = hx.entry(0, 0, 3);
  CHECK(silent.mri == 0.0f);
  CHECK(silent.last == 0.0f);
}

TEST_CASE("A token attended at steps 5 and 15 and silent in between gets an MRI of 10", "[lazy_eviction]") {
  Harness hx(12, one_head(64), LazyEvictionConfig{.budget = 40, .window = 4, .alpha = 0.25f});
  hx.prefill(4);
  auto attended_at = [](std::int64_t t) { return [t](std::int64_t, std::int64_t, std::int64_t pos) {
    // position 1: steps 5 and 15; position 0 (a prompt token): first event at step 10.
    if (pos == 1 && (t == 5 || t == 15)) return 0.5f;
    if (pos == 0 && t == 10) return 0.5f;
    return 0.01f;
  }; };
  for (std::int64_t t = 1; t <= 16; ++t) {
    hx.step(attended_at(t));
    if (t == 14) {
      const RefEntry mid = hx.entry(0, 0, 1);
      CHECK(mid.mri == 5.0f);  // the first gap, from the virtual event at step 0
      CHECK(mid.last == 5.0f);  // the ongoing silence does not enter MRI
    }
  }
  const RefEntry e = hx.entry(0, 0, 1);
  CHECK(e.last == 15.0f);
  CHECK(e.mri == 10.0f);
  const RefEntry prompt = hx.entry(0, 0, 0);
  CHECK(prompt.last == 10.0f);
  CHECK(prompt.mri == 10.0f);  // a prompt token's first gap counts from step 0
  // A generated token starts at last = t - 1: the token of step 3 (position 4 + 2) was never
  // attended, so it still holds 2.
  CHECK(hx.entry(0, 0, 6).last == 2.0f);
  CHECK(hx.entry(0, 0, 6).mri == 0.0f);
}

TEST_CASE("Lagged eviction runs exactly at multiples of W, never below B, and peaks at B + W", "[lazy_eviction]") {
  const std::int64_t B = 12, W = 5, P = 9;
  Rng rng(2024);
  Harness hx(13, CacheShape{2, 2, 4, 8, B + W}, LazyEvictionConfig{.budget = B, .window = W, .alpha = 0.2f});
  hx.prefill(P);
  std::int64_t peak = 0;
  for (std::int64_t t = 1; t <= 60; ++t) {
    const std::vector<std::int64_t> before{hx.cache.len(0, 0), hx.cache.len(1, 1)};
    const std::uint64_t salt = rng.next();
    hx.step([salt](std::int64_t l, std::int64_t qh, std::int64_t pos) {
      return static_cast<float>(test::mix64(salt ^ static_cast<std::uint64_t>(l * 1000 + qh * 100 + pos)) % 100) /
             250.0f;
    });
    hx.cache.check_invariants();
    for (std::int64_t l = 0; l < 2; ++l)
      for (std::int64_t h = 0; h < 2; ++h) {
        CAPTURE(t, l, h);
        const std::int64_t after = hx.cache.len(l, h), grown = (l == 0 ? before[0] : before[1]) + 1;
        peak = std::max(peak, grown);  // the step's attention sees this many entries
        if (t % W == 0 && grown > B)
          CHECK(after == B);
        else
          CHECK(after == grown);
        // The W newest tokens are always resident.
        const auto kept = hx.cache.kept_positions(l, h);
        for (std::int64_t p = P + t - W; p < P + t; ++p) CHECK(std::binary_search(kept.begin(), kept.end(), p));
      }
  }
  CHECK(peak == B + W);
}

TEST_CASE("A prompt longer than the budget is kept whole until the first multiple of W", "[lazy_eviction]") {
  const std::int64_t B = 8, W = 4, P = 20;
  Harness hx(14, CacheShape{1, 1, 1, 4, P + W}, LazyEvictionConfig{.budget = B, .window = W, .alpha = 0.2f});
  hx.prefill(P);
  CHECK(hx.cache.len(0, 0) == P);  // prefill is never compressed
  for (std::int64_t t = 1; t < W; ++t) {
    hx.step([](std::int64_t, std::int64_t, std::int64_t) { return 0.1f; });
    CHECK(hx.cache.len(0, 0) == P + t);
  }
  hx.step([](std::int64_t, std::int64_t, std::int64_t) { return 0.1f; });
  CHECK(hx.cache.len(0, 0) == B);
}

TEST_CASE("Exact score ties keep the older positions (score desc, position asc)", "[lazy_eviction]") {
  // No probability ever reaches alpha: every entry keeps MRI 0, so every non-recent entry scores
  // exactly 0 once a step old, and the tie rule alone decides.
  const std::int64_t B = 6, W = 2, P = 10;
  Harness hx(15, one_head(P + W), LazyEvictionConfig{.budget = B, .window = W, .alpha = 0.9f});
  hx.prefill(P);
  hx.step([](std::int64_t, std::int64_t, std::int64_t) { return 0.05f; });
  hx.step([](std::int64_t, std::int64_t, std::int64_t) { return 0.05f; });
  CHECK(hx.cache.kept_positions(0, 0) == std::vector<std::int32_t>{0, 1, 2, 3, 10, 11});
}

TEST_CASE("Entries with a short MRI outrank silent and long-MRI entries at eviction", "[lazy_eviction]") {
  // Positions 0..3 recur every step (MRI 1), 4..7 every 4th step (MRI 4), the rest never (MRI 0).
  const std::int64_t B = 8, W = 2, P = 12;
  Harness hx(16, one_head(B + W + P), LazyEvictionConfig{.budget = B, .window = W, .alpha = 0.2f});
  hx.prefill(P);
  for (std::int64_t t = 1; t <= 8; ++t)
    hx.step([t](std::int64_t, std::int64_t, std::int64_t pos) {
      if (pos < 4) return 0.5f;
      if (pos < 8 && t % 4 == 0) return 0.5f;
      return 0.0f;
    });
  const auto kept = hx.cache.kept_positions(0, 0);
  // Steps 2, 4, 6, 8 evicted; the 6 places beside the window go to MRI 1 first, then MRI 4.
  CHECK(kept == std::vector<std::int32_t>{0, 1, 2, 3, 4, 5, P + 6, P + 7});
}

TEST_CASE("The fp16-compatible clock stores step 2049 as 2048 and the exact clock does not", "[lazy_eviction][fp16]") {
  for (const bool fp16 : {false, true}) {
    CAPTURE(fp16);
    const std::int64_t B = 6, W = 3;
    Harness hx(17, one_head(B + W), LazyEvictionConfig{.budget = B, .window = W, .alpha = 0.3f, .fp16_compat = fp16});
    hx.prefill(2);
    // Position 0 is attended at every step; everything else stays below alpha.
    auto step_fn = [](std::int64_t, std::int64_t, std::int64_t pos) { return pos == 0 ? 0.6f : 0.1f; };
    for (std::int64_t t = 1; t <= 2049; ++t) hx.step(step_fn);
    const RefEntry at_2049 = hx.entry(0, 0, 0);
    CHECK(at_2049.last == (fp16 ? 2048.0f : 2049.0f));
    CHECK(at_2049.mri == 1.0f);  // 2048 - 2047 in fp16 too
    hx.step(step_fn);            // step 2050: the token of step 2050 is born at f16(2049) = 2048
    const RefEntry newborn = hx.entry(0, 0, 2 + 2050 - 1);
    CHECK(newborn.last == (fp16 ? 2048.0f : 2049.0f));
    const RefEntry at_2050 = hx.entry(0, 0, 0);
    CHECK(at_2050.last == 2050.0f);
    CHECK(at_2050.mri == (fp16 ? 2.0f : 1.0f));  // 2050 - f16(2049): the official MRI jumps to 2
  }
}

TEST_CASE("The fp16-compatible clock rounds a long recurrence interval as the official fp16 tensors do",
          "[lazy_eviction][fp16]") {
  for (const bool fp16 : {false, true}) {
    CAPTURE(fp16);
    const std::int64_t B = 5, W = 2;
    Harness hx(23, one_head(B + W), LazyEvictionConfig{.budget = B, .window = W, .alpha = 0.3f, .fp16_compat = fp16});
    hx.prefill(1);
    // Position 0 is attended at steps 1 and 4099 only; its MRI of 1 keeps it resident meanwhile.
    for (std::int64_t t = 1; t <= 4099; ++t)
      hx.step([t](std::int64_t, std::int64_t, std::int64_t pos) {
        return pos == 0 && (t == 1 || t == 4099) ? 0.6f : 0.1f;
      });
    const RefEntry e = hx.entry(0, 0, 0);
    // fp16: last = f16(4099) = 4100 and the gap f16(4100 - 1) = 4100; exact: 4099 and 4098.
    CHECK(e.last == (fp16 ? 4100.0f : 4099.0f));
    CHECK(e.mri == (fp16 ? 4100.0f : 4098.0f));
  }
}

TEST_CASE("round_to_fp16 agrees with the nearest binary16 value, ties to even", "[lazy_eviction][fp16]") {
  // Every finite half, decoded independently (test support), sorted.
  std::vector<float> halves;
  for (std::uint32_t h = 0; h < 0x7c00u; ++h)
    halves.push_back(test::detail::half_to_float(static_cast<std::uint16_t>(h)));
  auto nearest = [&](float x) -> float {
    const float a = std::abs(x);
    if (a >= 65520.0f) return std::copysign(std::numeric_limits<float>::infinity(), x);
    const auto hi = std::lower_bound(halves.begin(), halves.end(), a);
    if (hi == halves.end()) return std::copysign(halves.back(), x);
    if (*hi == a || hi == halves.begin()) return std::copysign(*hi, x);
    const auto lo = hi - 1;
    const double dl = static_cast<double>(a) - *lo, dh = static_cast<double>(*hi) - a;
    const bool lo_even = ((lo - halves.begin()) % 2) == 0;  // index parity = mantissa parity
    const float pick = dl < dh ? *lo : dh < dl ? *hi : (lo_even ? *lo : *hi);
    return std::copysign(pick, x);
  };
  Rng rng(99);
  const std::uint64_t seed = 99;
  CAPTURE(seed);
  std::vector<float> xs{0.0f, -0.0f, 1e-5f, 6e-8f, 2.9802322e-8f, 8.9406967e-8f, 6.1035156e-5f, 2049.0f, 2051.0f,
                        4097.0f, 9001.0f, 65504.0f, 65519.0f, 65520.0f, 1e30f, -2049.0f, 0.008f, 1e-4f};
  for (int i = 0; i < 20000; ++i) {
    const float mag = std::ldexp(rng.uniform_float(1.0f, 2.0f), static_cast<int>(rng.uniform_int(-26, 16)));
    xs.push_back(rng.coin(0.5) ? mag : -mag);
  }
  for (int i = 0; i < 2000; ++i) {  // exact midpoints between neighbouring halves
    const auto k = static_cast<std::size_t>(rng.uniform_int(0, static_cast<std::int64_t>(halves.size()) - 2));
    xs.push_back(static_cast<float>((static_cast<double>(halves[k]) + halves[k + 1]) / 2.0));
  }
  for (const float x : xs) {
    CAPTURE(x);
    const float got = round_to_fp16(x), want = nearest(x);
    CHECK(std::bit_cast<std::uint32_t>(got) == std::bit_cast<std::uint32_t>(want));
  }
  CHECK(std::isnan(round_to_fp16(std::numeric_limits<float>::quiet_NaN())));
}

TEST_CASE("Scores follow the official formula and the paper's H1 variant", "[lazy_eviction]") {
  // One head, hand-set (last, mri) per slot, scored by the CPU primitive against closed forms.
  Cache cache(one_head(16));
  test::append_source(cache, 5, 0, 8);
  CpuBackend& b = cache.backend();
  const std::vector<float> last{10, 9, 0, 4, 10, 0, 7, 2}, mri{1, 1, 0, 0, 3, 5, 2, 8};
  std::vector<float> l16(16, 0.0f), m16(16, 0.0f), scores(16, -1.0f);
  std::copy(last.begin(), last.end(), l16.begin());
  std::copy(mri.begin(), mri.end(), m16.begin());
  const std::int64_t t = 10;
  for (const bool paper : {false, true}) {
    for (const bool fp16 : {false, true}) {
      CAPTURE(paper, fp16);
      recurrence_scores(b, cache.view(0), l16.data(), m16.data(), RecurrenceScoreParams{t, fp16, paper, 0},
                        scores.data());
      for (std::size_t j = 0; j < last.size(); ++j) {
        const double dt = static_cast<double>(t) - last[j], m = mri[j];
        const double h1 = 2.0 / (1.0 + std::exp((paper ? 0.0 : 1.0) + dt / (m + 1e-5)));
        const double h2 = m == 0.0 ? 0.0 : 2.0 / (1.0 + std::exp(m - 1.0));
        CAPTURE(j, dt, m);
        CHECK(scores[j] == Approx(h1 + h2).epsilon(fp16 ? 2e-3 : 1e-6).margin(fp16 ? 1e-4 : 1e-12));
      }
    }
  }
  // MRI 0 and silent for a step scores exactly 0 (exp overflows), however recent.
  CHECK(scores[2] == 0.0f);
  // Protection: positions below protect_below score +inf.
  recurrence_scores(b, cache.view(0), l16.data(), m16.data(), RecurrenceScoreParams{t, false, false, 3}, scores.data());
  CHECK(std::isinf(scores[0]));
  CHECK(std::isinf(scores[2]));
  CHECK(std::isfinite(scores[3]));
}

TEST_CASE("GQA events: rule any fires when one q-head of the group crosses alpha, rule mean needs the group's mean",
          "[lazy_eviction][gqa]") {
  for (const GroupEventRule rule : {GroupEventRule::any, GroupEventRule::mean}) {
    CAPTURE(to_string(rule));
    Harness hx(18, CacheShape{1, 2, 8, 4, 32},
               LazyEvictionConfig{.budget = 20, .window = 4, .alpha = 0.25f, .group_event = rule});
    hx.prefill(4);
    // Group of kv-head 0 = q-heads 0..3. Position 1: only q-head 0 crosses (0.5; mean 0.1625).
    // Position 2: every q-head at 0.3 (mean 0.3). Position 3: two at 0.45, two at 0.0 (mean 0.225).
    hx.step([](std::int64_t, std::int64_t qh, std::int64_t pos) {
      const std::int64_t r = qh % 4;
      if (pos == 1) return r == 0 ? 0.5f : 0.05f;
      if (pos == 2) return 0.3f;
      if (pos == 3) return r < 2 ? 0.45f : 0.0f;
      return 0.0f;
    });
    const bool any = rule == GroupEventRule::any;
    for (std::int64_t h = 0; h < 2; ++h) {
      CAPTURE(h);
      CHECK(hx.entry(0, h, 1).mri == (any ? 1.0f : 0.0f));
      CHECK(hx.entry(0, h, 2).mri == 1.0f);
      CHECK(hx.entry(0, h, 3).mri == (any ? 1.0f : 0.0f));
      CHECK(hx.entry(0, h, 0).mri == 0.0f);
    }
  }
}

TEST_CASE("Observing the query gives the same state and keep-sets as observing its probabilities", "[lazy_eviction]") {
  const std::uint64_t seed = 4242;
  CAPTURE(seed);
  const CacheShape shape{2, 2, 4, 16, 40};
  const LazyEvictionConfig cfg{.budget = 24, .window = 6, .alpha = 0.03f, .group_event = GroupEventRule::any};
  Cache qc(shape), pc(shape);
  Policy qp(qc, cfg), pp(pc, cfg);
  std::vector<float> probs(static_cast<std::size_t>(shape.num_q_heads * shape.capacity));
  for (std::int64_t l = 0; l < shape.num_layers; ++l) {
    test::append_source(qc, seed, l, 10);
    test::append_source(pc, seed, l, 10);
    qp.on_prefill(qc, l, Obs::none());
    pp.on_prefill(pc, l, Obs::none());
  }
  for (std::int64_t t = 1; t <= 50; ++t)
    for (std::int64_t l = 0; l < shape.num_layers; ++l) {
      test::append_source(qc, seed, l, 1);
      test::append_source(pc, seed, l, 1);
      const auto q = test::source_block(seed, test::Stream::query, l, shape.num_q_heads, qc.next_position(l) - 1, 1,
                                        shape.head_dim, 3.0f);
      qp.on_decode(qc, l, Obs::from_queries(cspan(q), 1));
      // The engine's probabilities over its cache, in its slot order, with the default scale.
      pc.backend().attention_probs(pc.view(l), q.data(), 1.0f / std::sqrt(16.0f), probs.data());
      pp.on_decode(pc, l, Obs::from_probs(cspan(probs), 1, shape.capacity));
      for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) {
        CAPTURE(t, l, h);
        REQUIRE(qc.kept_positions(l, h) == pc.kept_positions(l, h));
        const auto a = qp.scorer().state(qc, l, h), b = pp.scorer().state(pc, l, h);
        CHECK(a.positions == b.positions);
        CHECK(a.last == b.last);
        CHECK(a.mri == b.mri);
      }
    }
  CHECK(qc.len(0, 0) <= cfg.budget + cfg.window);
}

TEST_CASE("protect_prompt never evicts the prompt and counts it in the budget", "[lazy_eviction]") {
  const std::int64_t B = 10, W = 3, P = 5;
  Harness hx(19, one_head(B + W), LazyEvictionConfig{.budget = B, .window = W, .alpha = 0.2f, .protect_prompt = true});
  hx.prefill(P);
  // The prompt is never attended (MRI 0, score 0), generated tokens always are.
  for (std::int64_t t = 1; t <= 30; ++t) {
    hx.step([](std::int64_t, std::int64_t, std::int64_t pos) { return pos < 5 ? 0.0f : 0.5f; });
    const auto kept = hx.cache.kept_positions(0, 0);
    for (std::int32_t p = 0; p < P; ++p) CHECK(std::binary_search(kept.begin(), kept.end(), p));
    CHECK(hx.cache.len(0, 0) <= B + W);
  }
  CHECK(hx.cache.len(0, 0) == B + (30 % W == 0 ? 0 : 30 % W));
  // Without the option the same trace evicts the silent prompt.
  Harness plain(19, one_head(B + W), LazyEvictionConfig{.budget = B, .window = W, .alpha = 0.2f});
  plain.prefill(P);
  for (std::int64_t t = 1; t <= 30; ++t)
    plain.step([](std::int64_t, std::int64_t, std::int64_t pos) { return pos < 5 ? 0.0f : 0.5f; });
  CHECK(plain.cache.kept_positions(0, 0).front() >= P);
}

// ------------------------------------------------------------------------------------ bad input

TEST_CASE("Invalid configurations throw typed errors naming the argument and its value", "[lazy_eviction][errors]") {
  Cache cache(CacheShape{1, 2, 4, 8, 64});
  auto make = [&](LazyEvictionConfig cfg) { return [&cache, cfg] { Policy p(cache, cfg); }; };
  CHECK_THAT(require_throws_exactly<BudgetError>(make({.budget = 8, .window = 8}), "budget"),
             Catch::Matchers::Contains("= 8"));
  require_throws_exactly<BudgetError>(make({.budget = 4, .window = 8}), "budget");
  CHECK_THAT(require_throws_exactly<ArgumentError>(make({.budget = 16, .window = 0}), "window"),
             Catch::Matchers::Contains("= 0"));
  require_throws_exactly<ArgumentError>(make({.budget = 16, .window = -2}), "window");
  for (const float alpha : {0.0f, -0.1f, 1.5f, std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity()}) {
    CAPTURE(alpha);
    require_throws_exactly<ArgumentError>(make({.budget = 16, .window = 4, .alpha = alpha}), "alpha");
  }
  CHECK_THAT(require_throws_exactly<BudgetError>(make({.budget = 60, .window = 8}), "budget"),
             Catch::Matchers::Contains("capacity"));
  // alpha = 1 is the closed end of the range.
  CHECK_NOTHROW(Policy(cache, LazyEvictionConfig{.budget = 16, .window = 4, .alpha = 1.0f}));
}

TEST_CASE("A rejected decode observation leaves the cache and the policy unchanged", "[lazy_eviction][errors]") {
  Harness hx(21, CacheShape{1, 2, 4, 8, 24}, LazyEvictionConfig{.budget = 12, .window = 4, .alpha = 0.1f});
  hx.prefill(6);
  auto p = [](std::int64_t, std::int64_t qh, std::int64_t pos) { return static_cast<float>((qh + pos) % 5) / 10.0f; };
  for (int t = 0; t < 9; ++t) hx.step(p);  // an eviction at step 8, then one more step
  test::append_source(hx.cache, 21, 0, 1);
  const Fingerprint before = fingerprint(hx.cache, hx.policy);
  const std::int64_t cap = hx.cache.shape().capacity;
  std::vector<float> probs(static_cast<std::size_t>(4 * cap), 0.1f);
  std::vector<float> q(4 * 8, 0.5f), q2(4 * 2 * 8, 0.5f);

  require_throws_exactly<ArgumentError>([&] { hx.policy.on_decode(hx.cache, 0, Obs::none()); }, "observation");
  require_throws_exactly<ArgumentError>([&] { hx.policy.on_decode(hx.cache, 0, Obs::from_queries(cspan(q2), 2)); },
                                        "num_queries");
  require_throws_exactly<ShapeError>(
      [&] { hx.policy.on_decode(hx.cache, 0, Obs::from_probs({probs.data(), 4 * cap - 1}, 1, cap)); }, "probs.size");
  require_throws_exactly<ShapeError>(
      [&] { hx.policy.on_decode(hx.cache, 0, Obs::from_probs({probs.data(), 4 * 3}, 1, 3)); }, "probs_stride");
  probs[5] = std::numeric_limits<float>::quiet_NaN();
  require_throws_exactly<NonFiniteError>(
      [&] { hx.policy.on_decode(hx.cache, 0, Obs::from_probs(cspan(probs), 1, cap)); }, "probs");
  require_throws_exactly<ArgumentError>([&] { hx.policy.on_decode(hx.cache, 3, Obs::from_queries(cspan(q), 1)); },
                                        "layer");
  CHECK(fingerprint(hx.cache, hx.policy) == before);
  // The same step then goes through.
  probs[5] = 0.1f;
  hx.policy.on_decode(hx.cache, 0, Obs::from_probs(cspan(probs), 1, cap));
  CHECK(hx.policy.scorer().step(0) == before.steps[0] + 1);
}

TEST_CASE("protect_prompt rejects a prompt longer than budget - window and leaves everything unchanged",
          "[lazy_eviction][errors]") {
  Cache cache(CacheShape{1, 1, 1, 4, 32});
  Policy policy(cache, LazyEvictionConfig{.budget = 10, .window = 4, .protect_prompt = true});
  test::append_source(cache, 22, 0, 7);
  const Fingerprint before = fingerprint(cache, policy);
  CHECK_THAT(require_throws_exactly<BudgetError>([&] { policy.on_prefill(cache, 0, Obs::none()); }, "prompt entries"),
             Catch::Matchers::Contains("= 7"));
  CHECK(fingerprint(cache, policy) == before);
}

TEST_CASE("The fp16-compatible clock refuses decode steps beyond fp16's range", "[lazy_eviction][fp16][errors]") {
  Cache cache(CacheShape{1, 1, 1, 1, 8});
  Policy policy(cache, LazyEvictionConfig{.budget = 3, .window = 2, .alpha = 0.5f, .fp16_compat = true});
  std::vector<float> kv{1.0f}, probs(8, 0.75f);
  cache.append(0, cspan(kv), cspan(kv), 1);
  policy.on_prefill(cache, 0, Obs::none());
  for (std::int64_t t = 1; t <= kFp16RecurrenceSteps; ++t) {
    cache.append_token(0, cspan(kv), cspan(kv));
    policy.on_decode(cache, 0, Obs::from_probs(cspan(probs), 1, 8));
  }
  CHECK(policy.scorer().state(cache, 0, 0).last.back() == 65504.0f);
  cache.append_token(0, cspan(kv), cspan(kv));
  const Fingerprint before = fingerprint(cache, policy);
  CHECK_THAT(require_throws_exactly<UnsupportedError>(
                 [&] { policy.on_decode(cache, 0, Obs::from_probs(cspan(probs), 1, 8)); }, "decode step"),
             Catch::Matchers::Contains("65505"));
  CHECK(fingerprint(cache, policy) == before);
}

TEST_CASE("The trace is only available when the policy was built with trace = true", "[lazy_eviction][errors]") {
  Cache cache(one_head(16));
  Policy policy(cache, LazyEvictionConfig{.budget = 8, .window = 2});
  require_throws_exactly<UnsupportedError>([&] { (void)policy.scorer().last_events(0, 0); }, "trace");
  require_throws_exactly<UnsupportedError>([&] { (void)policy.scorer().last_eviction(0, 0); }, "trace");
}

// ------------------------------------------------------------------------------- reference sweep

TEST_CASE("LazyEviction matches an independent reference step by step over seeded random configurations",
          "[lazy_eviction][sweep]") {
  constexpr std::int64_t kUnits = 256;  // probabilities are multiples of 1/256: exact in fp32 and fp64
  for (std::uint64_t seed = 1; seed <= 60; ++seed) {
    Rng rng(seed);
    RefOptions o;
    o.window = rng.uniform_int(1, 6);
    o.budget = o.window + rng.uniform_int(1, 12);
    // alpha half-way between two quanta in most configurations; exactly on one in some, where >=
    // must count the equal probability as an event.
    const std::int64_t a = rng.uniform_int(8, 120);
    o.alpha =
        static_cast<float>(rng.coin(0.8) ? (static_cast<double>(a) + 0.5) / kUnits : static_cast<double>(a) / kUnits);
    o.rule = rng.coin(0.5) ? GroupEventRule::any : GroupEventRule::mean;
    o.fp16 = rng.coin(0.25);
    o.paper_h1 = rng.coin(0.25);
    o.protect_prompt = rng.coin(0.2);
    const std::int64_t prompt = o.protect_prompt ? rng.uniform_int(1, o.budget - o.window) : rng.uniform_int(1, 30);
    const std::int64_t steps = rng.uniform_int(20, 90);
    CacheShape shape = test::random_shape(rng, 2, 3, {4, 8}, std::max(prompt, o.budget) + o.window + 1);
    const std::int64_t g = shape.group_size();
    std::ostringstream desc;
    desc << "seed " << seed << " " << test::describe(shape) << " B " << o.budget << " W " << o.window << " alpha "
         << o.alpha << " rule " << to_string(o.rule) << " fp16 " << o.fp16 << " paper_h1 " << o.paper_h1
         << " protect_prompt " << o.protect_prompt << " prompt " << prompt << " steps " << steps;
    INFO(desc.str());

    Harness hx(seed, shape, LazyEvictionConfig{.budget = o.budget,
                                               .window = o.window,
                                               .alpha = o.alpha,
                                               .group_event = o.rule,
                                               .fp16_compat = o.fp16,
                                               .paper_h1 = o.paper_h1,
                                               .protect_prompt = o.protect_prompt});
    std::vector<RefHead> ref(static_cast<std::size_t>(shape.num_layers * shape.num_kv_heads));
    hx.prefill(prompt);
    for (auto& r : ref) r.prefill(prompt, 0, o);

    // Each position recurs with its own period (or never) and phase, per q-head, plus noise: the
    // probability of (step, layer, q_head, position) is a pure function of the seed.
    auto prob = [&](std::int64_t t, std::int64_t l, std::int64_t qh, std::int64_t pos) -> float {
      const std::uint64_t h = test::mix64(seed ^ test::mix64(static_cast<std::uint64_t>((l * 64 + qh) * 100003 + pos)));
      const std::int64_t period = std::array<std::int64_t, 6>{1, 2, 3, 5, 8, 0}[h % 6];
      const std::int64_t phase = static_cast<std::int64_t>((h >> 8) % 8);
      const std::uint64_t noise = test::mix64(h ^ static_cast<std::uint64_t>(t));
      const bool high = (period > 0 && (t + phase) % period == 0) || noise % 13 == 0;
      const std::int64_t k = high ? a + static_cast<std::int64_t>(noise % 64)
                                  : static_cast<std::int64_t>(noise % static_cast<std::uint64_t>(a + 1));
      return static_cast<float>(static_cast<double>(k) / kUnits);
    };
    for (std::int64_t t = 1; t <= steps; ++t) {
      hx.step([&](std::int64_t l, std::int64_t qh, std::int64_t pos) { return prob(t, l, qh, pos); });
      hx.cache.check_invariants();
      for (std::int64_t l = 0; l < shape.num_layers; ++l)
        for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) {
          RefHead& r = ref[static_cast<std::size_t>(l * shape.num_kv_heads + h)];
          r.decode(t, prompt + t - 1, g, o,
                   [&](std::int64_t rr, std::int64_t pos) { return static_cast<double>(prob(t, l, h * g + rr, pos)); });
          CAPTURE(t, l, h);
          const RecurrenceSnapshot st = hx.policy.scorer().state(hx.cache, l, h);
          std::map<std::int64_t, RefEntry> got;
          for (std::size_t j = 0; j < st.positions.size(); ++j) got[st.positions[j]] = RefEntry{st.last[j], st.mri[j]};
          std::vector<std::int64_t> got_pos, want_pos;
          for (const auto& [p, e] : got) got_pos.push_back(p);
          for (const auto& [p, e] : r.entries) want_pos.push_back(p);
          REQUIRE(got_pos == want_pos);
          for (const auto& [p, e] : r.entries) {
            CAPTURE(p);
            REQUIRE(got[p].last == e.last);
            REQUIRE(got[p].mri == e.mri);
          }
        }
    }
    const MemoryReport rep = hx.policy.report(hx.cache);
    CHECK(rep.policy == "lazy_eviction");
    CHECK(rep.entries == hx.cache.entries_kept());
    CHECK(rep.state_bytes >= 2 * shape.num_layers * shape.num_kv_heads * shape.capacity * 4);
  }
}
