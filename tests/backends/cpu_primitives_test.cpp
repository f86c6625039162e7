// CpuBackend primitives against the naive double references of tests/support/reference.hpp:
// selected indices must match exactly, floats within 1e-5. Layers are built by hand with padded
// strides (padding holds NaN, so a primitive reading it would poison its result) and slots in
// scrambled position order.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "kvevict/kvevict.hpp"
#include "support/generators.hpp"
#include "support/reference.hpp"

namespace {

using namespace kvevict;
using test::Rng;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// One layer's K/V/positions in test-owned memory, with padded strides and shuffled positions.
struct TestLayer {
  std::int64_t num_kv_heads, num_q_heads, head_dim, capacity, slot_stride, head_stride;
  std::vector<float> keys, values;          // [kv_head, slot, slot_stride] (+ head padding)
  std::vector<std::int32_t> positions;      // [kv_head, capacity]
  std::vector<std::int64_t> lens;           // [kv_head]

  TestLayer(Rng& rng, std::int64_t kv, std::int64_t q, std::int64_t d, std::int64_t cap, bool allow_empty_heads = true,
            std::int64_t max_position = -1)
      : num_kv_heads(kv), num_q_heads(q), head_dim(d), capacity(cap) {
    slot_stride = d + rng.uniform_int(0, 3);
    head_stride = cap * slot_stride + rng.uniform_int(0, 5);
    keys.assign(static_cast<std::size_t>(kv * head_stride), kNaN);
    values.assign(keys.size(), kNaN);
    positions.assign(static_cast<std::size_t>(kv * cap), -1);
    lens.assign(static_cast<std::size_t>(kv), 0);
    if (max_position < 0) max_position = 3 * cap;
    for (std::int64_t h = 0; h < kv; ++h) {
      const std::int64_t n = rng.uniform_int(allow_empty_heads ? 0 : 1, cap);
      lens[static_cast<std::size_t>(h)] = n;
      // n distinct positions from [0, max_position), in random slot order.
      std::vector<std::int32_t> pool(static_cast<std::size_t>(std::max(max_position, n)));
      std::iota(pool.begin(), pool.end(), 0);
      for (std::size_t i = 0; i < static_cast<std::size_t>(n); ++i)
        std::swap(pool[i], pool[i + static_cast<std::size_t>(rng.uniform_int(0, static_cast<std::int64_t>(pool.size() - i) - 1))]);
      for (std::int64_t j = 0; j < n; ++j) {
        positions[static_cast<std::size_t>(h * cap + j)] = pool[static_cast<std::size_t>(j)];
        for (std::int64_t c = 0; c < d; ++c) {
          key(h, j)[c] = rng.uniform_float(-1.0f, 1.0f);
          value(h, j)[c] = rng.uniform_float(-1.0f, 1.0f);
        }
      }
    }
  }

  float* key(std::int64_t h, std::int64_t j) { return keys.data() + h * head_stride + j * slot_stride; }
  float* value(std::int64_t h, std::int64_t j) { return values.data() + h * head_stride + j * slot_stride; }
  std::int32_t pos(std::int64_t h, std::int64_t j) const { return positions[static_cast<std::size_t>(h * capacity + j)]; }
  std::int64_t len(std::int64_t h) const { return lens[static_cast<std::size_t>(h)]; }
  std::int64_t group() const { return num_q_heads / num_kv_heads; }

  LayerView<float> view() {
    LayerView<float> v;
    v.keys = keys.data();
    v.values = values.data();
    v.head_stride = head_stride;
    v.slot_stride = slot_stride;
    v.positions = positions.data();
    v.lens = lens.data();
    v.num_kv_heads = num_kv_heads;
    v.num_q_heads = num_q_heads;
    v.head_dim = head_dim;
    v.capacity = capacity;
    return v;
  }
  CacheShape shape() const { return {1, num_kv_heads, num_q_heads, head_dim, capacity}; }
  CpuBackend backend() const {
    CpuBackend b;
    b.reserve(shape());
    return b;
  }

  ref::Mat key_rows(std::int64_t h) {
    ref::Mat m;
    for (std::int64_t j = 0; j < len(h); ++j) m.emplace_back(key(h, j), key(h, j) + head_dim);
    return m;
  }
  ref::Mat value_rows(std::int64_t h) {
    ref::Mat m;
    for (std::int64_t j = 0; j < len(h); ++j) m.emplace_back(value(h, j), value(h, j) + head_dim);
    return m;
  }
  ref::Positions head_positions(std::int64_t h) const {
    ref::Positions p;
    for (std::int64_t j = 0; j < len(h); ++j) p.push_back(pos(h, j));
    return p;
  }
};

TestLayer random_layer(Rng& rng, bool allow_empty_heads = true) {
  const std::int64_t kv = rng.uniform_int(1, 3);
  const std::int64_t q = kv * rng.pick<std::int64_t>({1, 2, 4, 8});
  const std::int64_t d = rng.pick<std::int64_t>({1, 2, 3, 8, 16, 33});
  const std::int64_t cap = rng.uniform_int(1, 40);
  return TestLayer(rng, kv, q, d, cap, allow_empty_heads);
}

std::vector<float> random_floats(Rng& rng, std::int64_t n, float amplitude) {
  std::vector<float> out(static_cast<std::size_t>(n));
  for (float& x : out) x = rng.uniform_float(-amplitude, amplitude);
  return out;
}

ref::Vec row_of(const float* p, std::int64_t n) { return ref::Vec(p, p + n); }

}  // namespace

TEST_CASE("attention_probs equals the double softmax of q.K^T times scale per q-head over its kv-head's live slots",
          "[backends][cpu]") {
  for (std::uint64_t seed = 1; seed <= 200; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    TestLayer t = random_layer(rng);
    CpuBackend b = t.backend();
    // Every fourth seed has logits in the hundreds: exp overflows unless the softmax subtracts the row maximum.
    const auto q = random_floats(rng, t.num_q_heads * t.head_dim, seed % 4 == 0 ? 60.0f : 2.0f);
    const float scale = rng.coin(0.5) ? 1.0f / std::sqrt(static_cast<float>(t.head_dim)) : rng.uniform_float(0.1f, 2.0f);
    std::vector<float> probs(static_cast<std::size_t>(t.num_q_heads * t.capacity), -7.0f);
    b.attention_probs(t.view(), q.data(), scale, probs.data());
    for (std::int64_t qh = 0; qh < t.num_q_heads; ++qh) {
      const std::int64_t h = qh / t.group();
      const float* got = probs.data() + qh * t.capacity;
      if (t.len(h) > 0) {
        const auto want = ref::attention_probs({row_of(q.data() + qh * t.head_dim, t.head_dim)}, t.key_rows(h), scale)[0];
        for (std::int64_t j = 0; j < t.len(h); ++j) REQUIRE(std::abs(got[j] - want[static_cast<std::size_t>(j)]) <= 1e-5);
      }
      // Slots past the live ones (and heads with no entries) are not written.
      for (std::int64_t j = t.len(h); j < t.capacity; ++j) REQUIRE(got[j] == -7.0f);
    }
  }
}

TEST_CASE("attend equals softmax(q.K^T times scale) times V per q-head and writes zeros for an empty kv-head", "[backends][cpu]") {
  for (std::uint64_t seed = 1; seed <= 200; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    TestLayer t = random_layer(rng);
    CpuBackend b = t.backend();
    const auto q = random_floats(rng, t.num_q_heads * t.head_dim, 2.0f);
    const float scale = rng.uniform_float(0.1f, 1.0f);
    std::vector<float> ws(static_cast<std::size_t>(t.num_q_heads * t.capacity), 0.0f);
    std::vector<float> out(static_cast<std::size_t>(t.num_q_heads * t.head_dim), kNaN);
    b.attend(t.view(), q.data(), scale, ws.data(), out.data());
    for (std::int64_t qh = 0; qh < t.num_q_heads; ++qh) {
      const std::int64_t h = qh / t.group();
      const float* got = out.data() + qh * t.head_dim;
      if (t.len(h) == 0) {
        for (std::int64_t c = 0; c < t.head_dim; ++c) REQUIRE(got[c] == 0.0f);
        continue;
      }
      const auto want = ref::attend(row_of(q.data() + qh * t.head_dim, t.head_dim), t.key_rows(h), t.value_rows(h), scale);
      for (std::int64_t c = 0; c < t.head_dim; ++c) REQUIRE(std::abs(got[c] - want[static_cast<std::size_t>(c)]) <= 1e-5);
      // The workspace holds the probabilities it used.
      const auto p = ref::attention_probs({row_of(q.data() + qh * t.head_dim, t.head_dim)}, t.key_rows(h), scale)[0];
      for (std::int64_t j = 0; j < t.len(h); ++j)
        REQUIRE(std::abs(ws[static_cast<std::size_t>(qh * t.capacity + j)] - p[static_cast<std::size_t>(j)]) <= 1e-5);
    }
  }
}

TEST_CASE("accumulate_column_sums adds every row to old slots and restarts slots from fresh_from at their own sums",
          "[backends][cpu]") {
  for (std::uint64_t seed = 1; seed <= 200; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    TestLayer t = random_layer(rng);
    CpuBackend b = t.backend();
    const std::int64_t nq = rng.uniform_int(1, 20);
    const std::int64_t stride = t.capacity + rng.uniform_int(0, 4);
    const auto probs = random_floats(rng, t.num_q_heads * nq * stride, 1.0f);
    std::vector<std::int64_t> fresh(static_cast<std::size_t>(t.num_kv_heads));
    for (std::int64_t h = 0; h < t.num_kv_heads; ++h)
      fresh[static_cast<std::size_t>(h)] = rng.coin(0.2) ? 0 : rng.uniform_int(0, t.len(h) + 1);
    auto scores = random_floats(rng, t.num_q_heads * t.capacity, 5.0f);
    const auto before = scores;
    b.accumulate_column_sums(t.view(), probs.data(), nq, stride, scores.data(), fresh.data());
    for (std::int64_t qh = 0; qh < t.num_q_heads; ++qh) {
      const std::int64_t h = qh / t.group();
      for (std::int64_t j = 0; j < t.capacity; ++j) {
        const auto at = static_cast<std::size_t>(qh * t.capacity + j);
        if (j >= t.len(h)) {
          REQUIRE(scores[at] == before[at]);  // dead slots untouched
          continue;
        }
        double want = j < fresh[static_cast<std::size_t>(h)] ? before[at] : 0.0;
        for (std::int64_t i = 0; i < nq; ++i) want += probs[static_cast<std::size_t>((qh * nq + i) * stride + j)];
        REQUIRE(std::abs(scores[at] - want) <= 1e-5 * std::max(1.0, std::abs(want)));
      }
    }
  }
}

TEST_CASE("accumulate_query_column_sums equals causal column sums by position over more than one 64-query tile, "
          "with slots out of position order",
          "[backends][cpu]") {
  for (std::uint64_t seed = 1; seed <= 60; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    const std::int64_t kv = rng.uniform_int(1, 2);
    const std::int64_t q_heads = kv * rng.pick<std::int64_t>({1, 2, 4});
    const std::int64_t d = rng.pick<std::int64_t>({2, 4, 8});
    const std::int64_t cap = rng.uniform_int(1, 60);
    TestLayer t(rng, kv, q_heads, d, cap, true, 200);
    CpuBackend b = t.backend();
    // 1..200 queries: 64, 65, 128 and 129 are tile boundaries of kQueryTile = 64.
    const std::int64_t nq = rng.pick<std::int64_t>({1, 63, 64, 65, 128, 129, 150, 200});
    // Some queries sit before every key (they see nothing and add nothing).
    const std::int64_t first_pos = rng.uniform_int(-10, 100);
    const float scale = rng.uniform_float(0.2f, 1.2f);
    const auto queries = random_floats(rng, q_heads * nq * d, seed % 4 == 0 ? 60.0f : 2.0f);  // large logits too
    std::vector<std::int64_t> fresh(static_cast<std::size_t>(kv));
    for (std::int64_t h = 0; h < kv; ++h) fresh[static_cast<std::size_t>(h)] = rng.uniform_int(0, t.len(h));
    auto scores = random_floats(rng, q_heads * cap, 3.0f);
    const auto before = scores;
    b.accumulate_query_column_sums(t.view(), queries.data(), nq, first_pos, scale, scores.data(), fresh.data());
    for (std::int64_t qh = 0; qh < q_heads; ++qh) {
      const std::int64_t h = qh / t.group();
      ref::Mat qm;
      for (std::int64_t i = 0; i < nq; ++i) qm.push_back(row_of(queries.data() + (qh * nq + i) * d, d));
      const auto sums = ref::column_sums(qm, t.key_rows(h), t.head_positions(h), first_pos, scale);
      for (std::int64_t j = 0; j < t.len(h); ++j) {
        const auto at = static_cast<std::size_t>(qh * cap + j);
        const double want = (j < fresh[static_cast<std::size_t>(h)] ? before[at] : 0.0) + sums[static_cast<std::size_t>(j)];
        REQUIRE(std::abs(scores[at] - want) <= 1e-5 * std::max(1.0, std::abs(want)));
      }
      for (std::int64_t j = t.len(h); j < cap; ++j)
        REQUIRE(scores[static_cast<std::size_t>(qh * cap + j)] == before[static_cast<std::size_t>(qh * cap + j)]);
    }
  }
}

TEST_CASE("accumulate_query_column_sums on a cache scrambled by compaction and replacement stays causal by position",
          "[backends][cpu]") {
  using Cache = KVCache<CpuBackend>;
  Rng rng(77);
  const CacheShape shape{1, 2, 4, 8, 96};
  Cache cache(shape);
  test::append_source(cache, 77, 0, 90);
  // Keep a scattered subset (stable compaction), then move newest entries into victims' slots.
  std::vector<std::int32_t> keep(static_cast<std::size_t>(2 * shape.capacity));
  std::vector<std::int64_t> count{0, 0};
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int32_t s = 0; s < 90; ++s)
      if (rng.coin(0.6)) keep[static_cast<std::size_t>(h * shape.capacity + count[static_cast<std::size_t>(h)]++)] = s;
  cache.apply(0, KeepPlan{keep.data(), count.data()});
  for (int r = 0; r < 5; ++r) {
    const std::vector<std::int32_t> victims{static_cast<std::int32_t>(r), static_cast<std::int32_t>(2 * r + 1)};
    cache.apply(0, ReplacePlan{victims.data()});
  }
  for (std::int64_t h = 0; h < 2; ++h) {
    const auto p = cache.positions(0, h);
    REQUIRE_FALSE(std::is_sorted(p.begin(), p.end()));
  }
  const std::int64_t nq = 90;  // every appended position queries: two tiles
  const auto queries = test::source_block(77, test::Stream::query, 0, shape.num_q_heads, 0, nq, shape.head_dim, 2.0f);
  std::vector<float> scores(static_cast<std::size_t>(shape.num_q_heads * shape.capacity), 0.0f);
  const std::vector<std::int64_t> fresh{0, 0};
  const float scale = 1.0f / std::sqrt(8.0f);
  cache.backend().accumulate_query_column_sums(cache.view(0), queries.data(), nq, 0, scale, scores.data(), fresh.data());
  for (std::int64_t qh = 0; qh < shape.num_q_heads; ++qh) {
    const std::int64_t h = qh / 2;
    const auto pos = cache.positions(0, h);
    const auto k = cache.keys(0, h);
    ref::Mat keys;
    ref::Positions kp;
    for (std::size_t j = 0; j < pos.size(); ++j) {
      keys.emplace_back(k.begin() + static_cast<std::ptrdiff_t>(j * 8), k.begin() + static_cast<std::ptrdiff_t>(j * 8 + 8));
      kp.push_back(pos[j]);
    }
    ref::Mat qm;
    for (std::int64_t i = 0; i < nq; ++i) qm.push_back(row_of(queries.data() + (qh * nq + i) * 8, 8));
    const auto want = ref::column_sums(qm, keys, kp, 0, scale);
    for (std::size_t j = 0; j < pos.size(); ++j)
      REQUIRE(std::abs(scores[static_cast<std::size_t>(qh) * 96 + j] - want[j]) <= 1e-5 * std::max(1.0, want[j]));
  }
}

TEST_CASE("group_reduce takes the mean, max or sum over each GQA group's q-head rows for the live slots",
          "[backends][cpu]") {
  for (std::uint64_t seed = 1; seed <= 100; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    TestLayer t = random_layer(rng);
    CpuBackend b = t.backend();
    const auto in = random_floats(rng, t.num_q_heads * t.capacity, 4.0f);
    for (GroupAgg agg : {GroupAgg::mean, GroupAgg::max, GroupAgg::sum}) {
      INFO("agg " << to_string(agg));
      std::vector<float> out(static_cast<std::size_t>(t.num_kv_heads * t.capacity), -9.0f);
      b.group_reduce(t.view(), in.data(), out.data(), agg);
      for (std::int64_t h = 0; h < t.num_kv_heads; ++h) {
        for (std::int64_t j = 0; j < t.len(h); ++j) {
          double want = agg == GroupAgg::max ? -1e300 : 0.0;
          for (std::int64_t r = 0; r < t.group(); ++r) {
            const double x = in[static_cast<std::size_t>((h * t.group() + r) * t.capacity + j)];
            want = agg == GroupAgg::max ? std::max(want, x) : want + x;
          }
          if (agg == GroupAgg::mean) want /= static_cast<double>(t.group());
          REQUIRE(std::abs(out[static_cast<std::size_t>(h * t.capacity + j)] - want) <= 1e-5 * std::max(1.0, std::abs(want)));
        }
        for (std::int64_t j = t.len(h); j < t.capacity; ++j) REQUIRE(out[static_cast<std::size_t>(h * t.capacity + j)] == -9.0f);
      }
    }
  }
}

TEST_CASE("select_victims picks the unprotected entry with the lowest score, ties to the newest position, or the "
          "oldest without scores, and -1 when every entry is protected",
          "[backends][cpu]") {
  for (std::uint64_t seed = 1; seed <= 300; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    // Every third seed a longer head, past the blockwise search's 32-slot blocks.
    TestLayer t = seed % 3 == 0 ? TestLayer(rng, 2, 4, 2, rng.uniform_int(60, 400)) : random_layer(rng);
    CpuBackend b = t.backend();
    // Coarse scores (ties are frequent), with signed zeros, infinities and NaNs of both signs.
    const float specials[] = {-0.0f, 0.0f, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                              kNaN, -kNaN};
    std::vector<float> scores(static_cast<std::size_t>(t.num_kv_heads * t.capacity));
    for (float& s : scores)
      s = rng.coin(0.15) ? specials[rng.uniform_int(0, 5)] : static_cast<float>(rng.uniform_int(0, 3));
    ProtectRule rule{rng.uniform_int(0, 10), rng.coin(0.3) ? INT64_MAX : rng.uniform_int(0, 3 * t.capacity)};
    for (bool with_scores : {true, false}) {
      std::vector<std::int32_t> victims(static_cast<std::size_t>(t.num_kv_heads), -5);
      b.select_victims(t.view(), with_scores ? scores.data() : nullptr, rule, victims.data());
      for (std::int64_t h = 0; h < t.num_kv_heads; ++h) {
        std::int32_t want = -1;
        for (std::int64_t j = 0; j < t.len(h); ++j) {
          if (rule.protects(t.pos(h, j))) continue;
          if (want < 0) {
            want = static_cast<std::int32_t>(j);
            continue;
          }
          const float sj = scores[static_cast<std::size_t>(h * t.capacity + j)];
          const float sw = scores[static_cast<std::size_t>(h * t.capacity + want)];
          const bool worse = with_scores ? (sj < sw || (sj == sw && t.pos(h, j) > t.pos(h, want))) : t.pos(h, j) < t.pos(h, want);
          if (worse) want = static_cast<std::int32_t>(j);
        }
        REQUIRE(victims[static_cast<std::size_t>(h)] == want);
        // Independently: without NaNs the victim is the one entry ref::topk_keep drops when it keeps
        // all but one unprotected entry (score desc, then position asc).
        ref::Vec s;
        ref::Positions p;
        bool has_nan = false;
        std::int64_t unprotected = 0;
        for (std::int64_t j = 0; j < t.len(h); ++j) {
          const float sj = scores[static_cast<std::size_t>(h * t.capacity + j)];
          has_nan = has_nan || std::isnan(sj);
          s.push_back(with_scores ? static_cast<double>(sj) : static_cast<double>(t.pos(h, j)));  // recency: newest kept
          p.push_back(t.pos(h, j));
          unprotected += rule.protects(t.pos(h, j)) ? 0 : 1;
        }
        if ((with_scores && has_nan) || unprotected == 0) continue;
        const auto kept = ref::topk_keep(s, p, unprotected - 1, rule.sink_end, rule.recent_begin);
        REQUIRE(kept.size() == p.size() - 1);
        const std::int32_t victim = victims[static_cast<std::size_t>(h)];
        INFO("with_scores " << with_scores << " kv_head " << h << " victim slot " << victim << " score "
                            << scores[static_cast<std::size_t>(h * t.capacity + victim)] << " position " << t.pos(h, victim));
        REQUIRE(victim >= 0);
        REQUIRE_FALSE(std::binary_search(kept.begin(), kept.end(), t.pos(h, victim)));
      }
    }
  }
}

TEST_CASE("select_topk keeps the protected entries plus the best by (score desc, position asc), in ascending slot "
          "order, exactly as ref::topk_keep",
          "[backends][cpu]") {
  for (std::uint64_t seed = 1; seed <= 400; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    TestLayer t = random_layer(rng);
    CpuBackend b = t.backend();
    const int mode = static_cast<int>(rng.uniform_int(0, 3));  // 0 random, 1 coarse ties, 2 all equal, 3 recency
    INFO("mode " << mode);
    std::vector<float> scores(static_cast<std::size_t>(t.num_kv_heads * t.capacity));
    for (float& s : scores)
      s = mode == 0 ? rng.uniform_float(0.0f, 1.0f) : mode == 1 ? static_cast<float>(rng.uniform_int(0, 2)) : 0.5f;
    const ProtectRule rule{rng.uniform_int(0, 6), rng.coin(0.3) ? INT64_MAX : rng.uniform_int(0, 3 * t.capacity)};
    std::vector<std::int64_t> keep_count(static_cast<std::size_t>(t.num_kv_heads));
    std::vector<std::int64_t> num_protected(keep_count.size(), 0);
    for (std::int64_t h = 0; h < t.num_kv_heads; ++h) {
      for (std::int64_t j = 0; j < t.len(h); ++j) num_protected[static_cast<std::size_t>(h)] += rule.protects(t.pos(h, j));
      keep_count[static_cast<std::size_t>(h)] = rng.uniform_int(num_protected[static_cast<std::size_t>(h)], t.len(h) + 2);
    }
    std::vector<std::int32_t> keep(static_cast<std::size_t>(t.num_kv_heads * t.capacity), -3);
    b.select_topk(t.view(), mode == 3 ? nullptr : scores.data(), rule, keep_count.data(), keep.data());
    for (std::int64_t h = 0; h < t.num_kv_heads; ++h) {
      const std::int64_t k = std::min(keep_count[static_cast<std::size_t>(h)], t.len(h));
      const std::int32_t* out = keep.data() + h * t.capacity;
      REQUIRE(std::is_sorted(out, out + k));
      REQUIRE(std::adjacent_find(out, out + k) == out + k);
      ref::Positions got;
      for (std::int64_t i = 0; i < k; ++i) {
        REQUIRE(out[i] >= 0);
        REQUIRE(out[i] < t.len(h));
        got.push_back(t.pos(h, out[i]));
      }
      std::sort(got.begin(), got.end());
      ref::Vec s;
      for (std::int64_t j = 0; j < t.len(h); ++j)
        s.push_back(mode == 3 ? static_cast<double>(t.pos(h, j)) : scores[static_cast<std::size_t>(h * t.capacity + j)]);
      const auto want = ref::topk_keep(s, t.head_positions(h), k - num_protected[static_cast<std::size_t>(h)],
                                       rule.sink_end, rule.recent_begin);
      REQUIRE(got == want);
    }
  }
}

TEST_CASE("select_topk throws BudgetError when the protected entries alone exceed keep_count", "[backends][cpu]") {
  Rng rng(5);
  TestLayer t(rng, 1, 1, 4, 10, false);
  t.lens[0] = 10;
  for (std::int32_t j = 0; j < 10; ++j) t.positions[static_cast<std::size_t>(j)] = j;
  CpuBackend b = t.backend();
  std::vector<float> scores(10, 1.0f);
  const std::vector<std::int64_t> keep_count{3};
  std::vector<std::int32_t> keep(10);
  test::require_throws_exactly<BudgetError>(
      [&] { b.select_topk(t.view(), scores.data(), ProtectRule{2, 8}, keep_count.data(), keep.data()); },
      "keep_count[0]");
}

TEST_CASE("compact gathers the kept slots in order (stable) and moves K, V, positions and every extra row with them",
          "[backends][cpu]") {
  for (std::uint64_t seed = 1; seed <= 200; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    TestLayer t = random_layer(rng);
    TestLayer old = t;
    CpuBackend b = t.backend();
    const std::int64_t g = t.group();
    std::vector<float> extra1 = random_floats(rng, t.num_kv_heads * t.capacity, 1.0f);
    std::vector<float> extra_g = random_floats(rng, t.num_q_heads * t.capacity, 1.0f);
    const auto e1_before = extra1, eg_before = extra_g;
    const std::vector<SlotExtra> extras{{extra1.data(), 1}, {extra_g.data(), g}};
    std::vector<std::int32_t> keep(static_cast<std::size_t>(t.num_kv_heads * t.capacity), -1);
    std::vector<std::int64_t> count(static_cast<std::size_t>(t.num_kv_heads), 0);
    for (std::int64_t h = 0; h < t.num_kv_heads; ++h)
      for (std::int64_t j = 0; j < t.len(h); ++j)
        if (rng.coin(0.5)) keep[static_cast<std::size_t>(h * t.capacity + count[static_cast<std::size_t>(h)]++)] = static_cast<std::int32_t>(j);
    b.compact(t.view(), keep.data(), count.data(), extras);
    for (std::int64_t h = 0; h < t.num_kv_heads; ++h)
      for (std::int64_t i = 0; i < count[static_cast<std::size_t>(h)]; ++i) {
        const std::int64_t src = keep[static_cast<std::size_t>(h * t.capacity + i)];
        REQUIRE(t.pos(h, i) == old.pos(h, src));
        REQUIRE(std::equal(t.key(h, i), t.key(h, i) + t.head_dim, old.key(h, src)));
        REQUIRE(std::equal(t.value(h, i), t.value(h, i) + t.head_dim, old.value(h, src)));
        REQUIRE(extra1[static_cast<std::size_t>(h * t.capacity + i)] == e1_before[static_cast<std::size_t>(h * t.capacity + src)]);
        for (std::int64_t r = 0; r < g; ++r)
          REQUIRE(extra_g[static_cast<std::size_t>((h * g + r) * t.capacity + i)] ==
                  eg_before[static_cast<std::size_t>((h * g + r) * t.capacity + src)]);
      }
    // Slot padding is never written, in K or in V.
    for (std::int64_t h = 0; h < t.num_kv_heads; ++h)
      for (std::int64_t j = 0; j < t.capacity; ++j)
        for (std::int64_t c = t.head_dim; c < t.slot_stride; ++c) {
          REQUIRE(std::isnan(t.key(h, j)[c]));
          REQUIRE(std::isnan(t.value(h, j)[c]));
        }
    for (std::int64_t h = 0; h < t.num_kv_heads; ++h)  // nor the padding after each head
      for (std::int64_t i = t.capacity * t.slot_stride; i < t.head_stride; ++i) {
        REQUIRE(std::isnan(t.keys[static_cast<std::size_t>(h * t.head_stride + i)]));
        REQUIRE(std::isnan(t.values[static_cast<std::size_t>(h * t.head_stride + i)]));
      }
  }
}

TEST_CASE("replace_with_last moves the newest slot into each victim's slot with its extras, and rejects a bad victim "
          "before moving anything",
          "[backends][cpu]") {
  for (std::uint64_t seed = 1; seed <= 200; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    TestLayer t = random_layer(rng, /*allow_empty_heads=*/false);
    TestLayer old = t;
    CpuBackend b = t.backend();
    const std::int64_t g = t.group();
    std::vector<float> extra = random_floats(rng, t.num_q_heads * t.capacity, 1.0f);
    const auto extra_before = extra;
    const std::vector<SlotExtra> extras{{extra.data(), g}};
    std::vector<std::int32_t> victims(static_cast<std::size_t>(t.num_kv_heads));
    for (std::int64_t h = 0; h < t.num_kv_heads; ++h)
      victims[static_cast<std::size_t>(h)] = static_cast<std::int32_t>(rng.uniform_int(0, t.len(h) - 1));

    auto bad = victims;
    bad.back() = static_cast<std::int32_t>(t.len(t.num_kv_heads - 1));  // one past the live slots
    test::require_throws_exactly<ArgumentError>([&] { b.replace_with_last(t.view(), bad.data(), extras); }, "victims[");
    // Keys and values hold NaN padding, so compare bytes.
    REQUIRE(std::memcmp(t.keys.data(), old.keys.data(), t.keys.size() * sizeof(float)) == 0);
    REQUIRE(std::memcmp(t.values.data(), old.values.data(), t.values.size() * sizeof(float)) == 0);
    REQUIRE(t.positions == old.positions);
    REQUIRE(extra == extra_before);

    b.replace_with_last(t.view(), victims.data(), extras);
    for (std::int64_t h = 0; h < t.num_kv_heads; ++h) {
      const std::int64_t last = t.len(h) - 1, v = victims[static_cast<std::size_t>(h)];
      for (std::int64_t j = 0; j < last; ++j) {
        const std::int64_t src = j == v ? last : j;
        REQUIRE(t.pos(h, j) == old.pos(h, src));
        REQUIRE(std::equal(t.key(h, j), t.key(h, j) + t.head_dim, old.key(h, src)));
        REQUIRE(std::equal(t.value(h, j), t.value(h, j) + t.head_dim, old.value(h, src)));
        for (std::int64_t r = 0; r < g; ++r)
          REQUIRE(extra[static_cast<std::size_t>((h * g + r) * t.capacity + j)] ==
                  extra_before[static_cast<std::size_t>((h * g + r) * t.capacity + src)]);
      }
    }
  }
}

TEST_CASE("append writes kv-head-major token rows after each head's live slots with consecutive positions",
          "[backends][cpu]") {
  Rng rng(9);
  TestLayer t(rng, 3, 6, 5, 12, false);
  for (std::int64_t h = 0; h < 3; ++h) t.lens[static_cast<std::size_t>(h)] = std::min<std::int64_t>(t.len(h), 12 - 4);
  const TestLayer old = t;
  CpuBackend b = t.backend();
  const auto k = random_floats(rng, 3 * 4 * 5, 1.0f), v = random_floats(rng, 3 * 4 * 5, 1.0f);
  b.append(t.view(), k.data(), v.data(), 4, 100);
  for (std::int64_t h = 0; h < 3; ++h) {
    for (std::int64_t s = 0; s < 4; ++s) {
      const std::int64_t slot = t.len(h) + s;
      REQUIRE(t.pos(h, slot) == 100 + s);
      REQUIRE(std::equal(t.key(h, slot), t.key(h, slot) + 5, k.data() + (h * 4 + s) * 5));
      REQUIRE(std::equal(t.value(h, slot), t.value(h, slot) + 5, v.data() + (h * 4 + s) * 5));
    }
    for (std::int64_t j = 0; j < t.len(h); ++j) REQUIRE(t.pos(h, j) == old.pos(h, j));
  }
}

TEST_CASE("all_finite rejects NaN, +Inf and -Inf anywhere and accepts finite extremes", "[backends][cpu]") {
  const CpuBackend b;
  std::vector<float> x{0.0f, -0.0f, std::numeric_limits<float>::max(), std::numeric_limits<float>::lowest(),
                       std::numeric_limits<float>::denorm_min()};
  REQUIRE(b.all_finite(x.data(), static_cast<std::int64_t>(x.size())));
  REQUIRE(b.all_finite(x.data(), 0));
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()})
    for (std::size_t at = 0; at < x.size(); ++at) {
      auto y = x;
      y[at] = bad;
      REQUIRE_FALSE(b.all_finite(y.data(), static_cast<std::int64_t>(y.size())));
    }
  // Every length through several rounds of the eight-lane loop and its tail, every index.
  for (std::int64_t n = 1; n <= 40; ++n) {
    std::vector<float> z(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) z[static_cast<std::size_t>(i)] = std::numeric_limits<float>::max() * (i % 2 ? -1.0f : 1.0f);
    REQUIRE(b.all_finite(z.data(), n));
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                      -std::numeric_limits<float>::infinity()})
      for (std::int64_t at = 0; at < n; ++at) {
        auto y = z;
        y[static_cast<std::size_t>(at)] = bad;
        INFO("n " << n << " at " << at << " value " << bad);
        REQUIRE_FALSE(b.all_finite(y.data(), n));
      }
  }
}

namespace {

// The reference of evict_one: the five primitives it fuses, one after another.
void step_by_step(CpuBackend& b, TestLayer& t, const DecodeEviction& step, std::span<const SlotExtra> extras) {
  std::vector<float> kv(static_cast<std::size_t>(t.num_kv_heads * t.capacity), 0.0f);
  std::vector<std::int32_t> victims(static_cast<std::size_t>(t.num_kv_heads), -1);
  const float* kv_scores = nullptr;
  if (step.probs != nullptr) {
    REQUIRE(b.all_finite(step.probs, t.num_q_heads * step.probs_stride));
    b.accumulate_column_sums(t.view(), step.probs, 1, step.probs_stride, step.q_scores, step.fresh_from);
    b.group_reduce(t.view(), step.q_scores, kv.data(), step.agg);
    kv_scores = kv.data();
  }
  b.select_victims(t.view(), kv_scores, step.rule, victims.data());
  b.replace_with_last(t.view(), victims.data(), extras);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// NaN sums compare as "both NaN": the payload an addition returns is not specified.
bool same_or_both_nan(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(std::isnan(a[i]) && std::isnan(b[i])) && std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return false;
  return true;
}

}  // namespace

TEST_CASE("evict_one is bit-identical to all_finite + accumulate_column_sums + group_reduce + select_victims + "
          "replace_with_last, for every aggregation, NaN sums, recency and protect rules",
          "[backends][cpu][fused]") {
  int compared = 0;
  for (std::uint64_t seed = 1; seed <= 400; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    const std::int64_t kv = rng.uniform_int(1, 3);
    const std::int64_t cap = rng.coin(0.3) ? rng.uniform_int(100, 700) : rng.uniform_int(1, 40);
    TestLayer t(rng, kv, kv * rng.pick<std::int64_t>({1, 2, 4, 8}), rng.pick<std::int64_t>({1, 3, 8, 16}), cap, false);
    const std::int64_t stride = cap + rng.uniform_int(0, 3);
    const GroupAgg agg = rng.pick({GroupAgg::mean, GroupAgg::max, GroupAgg::sum});
    const int mode = static_cast<int>(rng.uniform_int(0, 2));  // 0: scores, 1: with NaN sums, 2: recency
    const ProtectRule rule = rng.coin(0.5) ? ProtectRule{}
                                           : ProtectRule{rng.uniform_int(0, 6), rng.uniform_int(cap, 3 * cap)};
    std::vector<float> probs(static_cast<std::size_t>(t.num_q_heads * stride));
    for (float& p : probs) p = rng.coin(0.1) ? 0.0f : rng.uniform_float(0.0f, 1.0f);
    std::vector<float> sums = random_floats(rng, t.num_q_heads * cap, 4.0f);
    if (mode == 1)
      for (std::size_t i = 0; i < sums.size(); i += 5) sums[i] = kNaN;
    std::vector<std::int64_t> fresh;
    for (std::int64_t h = 0; h < kv; ++h) fresh.push_back(rng.uniform_int(-2, cap + 2));
    std::vector<float> extra = random_floats(rng, 2 * kv * cap, 1.0f);

    TestLayer want = t;
    std::vector<float> want_sums = sums, want_extra = extra;
    auto step_for = [&](std::vector<float>& s) {
      DecodeEviction step;
      if (mode != 2) {
        step.probs = probs.data();
        step.probs_stride = stride;
        step.q_scores = s.data();
        step.fresh_from = fresh.data();
      }
      step.agg = agg;
      step.rule = rule;
      return step;
    };
    bool any_unprotected_everywhere = true;
    for (std::int64_t h = 0; h < kv; ++h) {
      bool found = false;
      for (std::int64_t j = 0; j < t.len(h); ++j) found |= !rule.protects(t.pos(h, j));
      any_unprotected_everywhere &= found;
    }
    CpuBackend b = t.backend();
    const std::int64_t g = t.group();
    const std::vector<SlotExtra> extras{{sums.data(), g}, {extra.data(), 2}};
    if (!any_unprotected_everywhere) {
      test::require_throws_exactly<InvariantError>([&] { b.evict_one(t.view(), step_for(sums), extras); }, "kv_head");
      REQUIRE(std::memcmp(t.keys.data(), want.keys.data(), t.keys.size() * sizeof(float)) == 0);
      REQUIRE(t.positions == want.positions);
      REQUIRE(same_bits(sums, want_sums));
      continue;
    }
    CpuBackend ref_backend = want.backend();
    const std::vector<SlotExtra> want_extras{{want_sums.data(), g}, {want_extra.data(), 2}};
    step_by_step(ref_backend, want, step_for(want_sums), want_extras);
    b.evict_one(t.view(), step_for(sums), extras);
    REQUIRE(std::memcmp(t.keys.data(), want.keys.data(), t.keys.size() * sizeof(float)) == 0);
    REQUIRE(std::memcmp(t.values.data(), want.values.data(), t.values.size() * sizeof(float)) == 0);
    REQUIRE(t.positions == want.positions);
    REQUIRE(same_or_both_nan(sums, want_sums));
    REQUIRE(same_bits(extra, want_extra));
    ++compared;
  }
  REQUIRE(compared >= 250);
}

TEST_CASE("evict_one rejects non-finite probabilities anywhere in [q_head, stride], missing sums and an all-protected "
          "head, changing nothing",
          "[backends][cpu][fused][contract]") {
  Rng rng(31);
  TestLayer t(rng, 2, 8, 8, 50, false);
  const TestLayer before = t;
  CpuBackend b = t.backend();
  const std::int64_t stride = 53;
  std::vector<float> probs(static_cast<std::size_t>(8 * stride), 0.01f);
  std::vector<float> sums = random_floats(rng, 8 * 50, 1.0f);
  const std::vector<float> sums_before = sums;
  std::vector<std::int64_t> fresh{10, 60};
  DecodeEviction step;
  step.probs = probs.data();
  step.probs_stride = stride;
  step.q_scores = sums.data();
  step.fresh_from = fresh.data();
  const std::vector<SlotExtra> extras{{sums.data(), 4}};
  auto unchanged = [&] {
    REQUIRE(std::memcmp(t.keys.data(), before.keys.data(), t.keys.size() * sizeof(float)) == 0);
    REQUIRE(t.positions == before.positions);
    REQUIRE(same_bits(sums, sums_before));
  };
  for (const std::size_t at : {std::size_t{0}, std::size_t{3 * stride + 51}, probs.size() - 1})
    for (const float bad : {kNaN, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}) {
      CAPTURE(at, bad);
      probs[at] = bad;
      test::require_throws_exactly<NonFiniteError>([&] { b.evict_one(t.view(), step, extras); }, "probs");
      unchanged();
      probs[at] = 0.01f;
    }
  DecodeEviction no_sums = step;
  no_sums.q_scores = nullptr;
  test::require_throws_exactly<ArgumentError>([&] { b.evict_one(t.view(), no_sums, extras); }, "step.q_scores");
  DecodeEviction no_fresh = step;
  no_fresh.fresh_from = nullptr;
  test::require_throws_exactly<ArgumentError>([&] { b.evict_one(t.view(), no_fresh, extras); }, "step.fresh_from");
  unchanged();
  // Head 1's positions all protected (sinks cover everything below 3 * capacity).
  DecodeEviction all_protected = step;
  all_protected.rule = ProtectRule{3 * 50, INT64_MAX};
  test::require_throws_exactly<InvariantError>([&] { b.evict_one(t.view(), all_protected, extras); }, "kv_head");
  unchanged();
  b.evict_one(t.view(), step, extras);  // the valid step goes through
  REQUIRE_FALSE(same_bits(sums, sums_before));
}
