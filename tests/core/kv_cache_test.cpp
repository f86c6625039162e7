// KVCache: owning and non-owning (engine buffer) storage, appends, plans, bookkeeping, the
// invariant check and the state hash.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "kvevict/kvevict.hpp"
#include "support/generators.hpp"

namespace {

using namespace kvevict;
using test::Rng;
using Cache = KVCache<CpuBackend>;
using Obs = Observation<float, HostSpace>;

constexpr float kSentinel = -12345.0f;

// An engine's K/V buffers with padding between slots, heads and layers, filled with a sentinel.
struct EngineBuffers {
  CacheShape shape;
  std::int64_t slot_stride, head_stride, layer_stride;
  std::vector<float> keys, values;

  EngineBuffers(const CacheShape& s, std::int64_t slot_pad, std::int64_t head_pad, std::int64_t layer_pad)
      : shape(s),
        slot_stride(s.head_dim + slot_pad),
        head_stride(s.capacity * (s.head_dim + slot_pad) + head_pad),
        layer_stride(s.num_kv_heads * (s.capacity * (s.head_dim + slot_pad) + head_pad) + layer_pad) {
    keys.assign(static_cast<std::size_t>(s.num_layers * layer_stride), kSentinel);
    values.assign(keys.size(), kSentinel);
  }
  ExternalKV<float, HostSpace> external() {
    return {keys.data(), values.data(), layer_stride, head_stride, slot_stride};
  }
  std::int64_t offset(std::int64_t l, std::int64_t h, std::int64_t slot) const {
    return l * layer_stride + h * head_stride + slot * slot_stride;
  }
  // True for elements that belong to some slot's head_dim row; everything else is padding.
  std::vector<bool> data_mask() const {
    std::vector<bool> m(keys.size(), false);
    for (std::int64_t l = 0; l < shape.num_layers; ++l)
      for (std::int64_t h = 0; h < shape.num_kv_heads; ++h)
        for (std::int64_t s = 0; s < shape.capacity; ++s)
          for (std::int64_t c = 0; c < shape.head_dim; ++c) m[static_cast<std::size_t>(offset(l, h, s) + c)] = true;
    return m;
  }
  bool padding_untouched() const {
    const auto m = data_mask();
    for (std::size_t i = 0; i < keys.size(); ++i)
      if (!m[i] && (keys[i] != kSentinel || values[i] != kSentinel)) return false;
    return true;
  }
};

// Live rows of a cache, read through its public accessors: [layer][kv_head] -> (positions, keys, values).
struct Snapshot {
  std::vector<std::vector<std::int32_t>> positions;
  std::vector<std::vector<float>> keys, values;
  explicit Snapshot(const Cache& c) {
    for (std::int64_t l = 0; l < c.shape().num_layers; ++l)
      for (std::int64_t h = 0; h < c.shape().num_kv_heads; ++h) {
        positions.push_back(c.positions(l, h));
        keys.push_back(c.keys(l, h));
        values.push_back(c.values(l, h));
      }
  }
  bool operator==(const Snapshot&) const = default;
};

}  // namespace

TEST_CASE("A new owning cache is empty: every len and next_position is zero and it owns its memory", "[core][cache]") {
  const CacheShape shape{3, 2, 4, 8, 16};
  const Cache cache(shape);
  REQUIRE(cache.owns_memory());
  REQUIRE(cache.shape() == shape);
  REQUIRE(cache.entries_kept() == 0);
  REQUIRE(cache.bytes_kept() == 0);
  for (std::int64_t l = 0; l < 3; ++l) {
    REQUIRE(cache.next_position(l) == 0);
    REQUIRE(cache.max_len(l) == 0);
    for (std::int64_t h = 0; h < 2; ++h) {
      REQUIRE(cache.len(l, h) == 0);
      REQUIRE(cache.positions(l, h).empty());
      REQUIRE(cache.keys(l, h).empty());
    }
  }
  REQUIRE_NOTHROW(cache.check_invariants());
}

TEST_CASE("append writes each kv-head's rows to the n slots after its live ones with consecutive positions, and touches only its "
          "layer",
          "[core][cache]") {
  for (std::uint64_t seed = 1; seed <= 50; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    const CacheShape shape = test::random_shape(rng, 3, 4, {1, 3, 8, 64}, rng.uniform_int(1, 40));
    Cache cache(shape);
    std::vector<std::int64_t> appended(static_cast<std::size_t>(shape.num_layers), 0);
    for (int round = 0; round < 6; ++round) {
      const std::int64_t l = rng.uniform_int(0, shape.num_layers - 1);
      const std::int64_t room = shape.capacity - cache.len(l, 0);
      if (room == 0) continue;
      const std::int64_t n = rng.uniform_int(1, room);
      const auto other = Snapshot(cache);
      test::append_source(cache, seed, l, n);
      appended[static_cast<std::size_t>(l)] += n;
      REQUIRE(cache.next_position(l) == appended[static_cast<std::size_t>(l)]);
      // Other layers are bit-identical.
      const Snapshot now(cache);
      for (std::int64_t ol = 0; ol < shape.num_layers; ++ol) {
        if (ol == l) continue;
        for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) {
          const auto i = static_cast<std::size_t>(ol * shape.num_kv_heads + h);
          REQUIRE(now.positions[i] == other.positions[i]);
          REQUIRE(now.keys[i] == other.keys[i]);
        }
      }
    }
    // Without eviction slot j holds position j, and its rows are the source rows of j.
    for (std::int64_t l = 0; l < shape.num_layers; ++l)
      for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) {
        const auto pos = cache.positions(l, h);
        REQUIRE(static_cast<std::int64_t>(pos.size()) == appended[static_cast<std::size_t>(l)]);
        const auto k = cache.keys(l, h), v = cache.values(l, h);
        for (std::size_t j = 0; j < pos.size(); ++j) {
          REQUIRE(pos[j] == static_cast<std::int32_t>(j));
          const auto sk = test::source_row(seed, test::Stream::key, l, h, pos[j], shape.head_dim);
          const auto sv = test::source_row(seed, test::Stream::value, l, h, pos[j], shape.head_dim);
          REQUIRE(std::equal(sk.begin(), sk.end(), k.begin() + static_cast<std::ptrdiff_t>(j) * shape.head_dim));
          REQUIRE(std::equal(sv.begin(), sv.end(), v.begin() + static_cast<std::ptrdiff_t>(j) * shape.head_dim));
        }
      }
    cache.check_invariants();
  }
}

TEST_CASE("A view over engine buffers with padded slot, head and layer strides writes appends at the engine's offsets "
          "and never touches a padding element",
          "[core][cache][view]") {
  for (std::uint64_t seed = 1; seed <= 30; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    const CacheShape shape = test::random_shape(rng, 3, 3, {1, 4, 6, 16}, rng.uniform_int(2, 20));
    EngineBuffers eng(shape, rng.uniform_int(1, 5), rng.uniform_int(0, 7), rng.uniform_int(0, 9));
    Cache view(shape, eng.external());
    REQUIRE_FALSE(view.owns_memory());
    for (std::int64_t l = 0; l < shape.num_layers; ++l) {
      const std::int64_t n1 = rng.uniform_int(1, shape.capacity);
      test::append_source(view, seed, l, n1);
      if (n1 < shape.capacity) test::append_source(view, seed, l, rng.uniform_int(1, shape.capacity - n1));
    }
    for (std::int64_t l = 0; l < shape.num_layers; ++l)
      for (std::int64_t h = 0; h < shape.num_kv_heads; ++h)
        for (std::int64_t s = 0; s < view.len(l, h); ++s) {
          const auto sk = test::source_row(seed, test::Stream::key, l, h, s, shape.head_dim);
          const auto sv = test::source_row(seed, test::Stream::value, l, h, s, shape.head_dim);
          const auto at = static_cast<std::ptrdiff_t>(eng.offset(l, h, s));
          REQUIRE(std::equal(sk.begin(), sk.end(), eng.keys.begin() + at));
          REQUIRE(std::equal(sv.begin(), sv.end(), eng.values.begin() + at));
        }
    REQUIRE(eng.padding_untouched());
    view.check_invariants();
  }
}

TEST_CASE("Policies running on an engine-buffer view keep the same entries and rows as on an owning cache and never "
          "touch padding (H2O with decode eviction, StreamingLLM with pos-shift)",
          "[core][cache][view]") {
  for (std::uint64_t seed = 1; seed <= 12; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    CacheShape shape = test::random_shape(rng, 2, 3, {2, 4, 8}, 0);
    shape.capacity = 14;
    EngineBuffers eng(shape, rng.uniform_int(1, 3), rng.uniform_int(0, 5), rng.uniform_int(0, 5));
    Cache view(shape, eng.external());
    Cache owned(shape);
    const bool h2o = seed % 2 == 0;
    std::optional<H2O<Cache>> hv, ho;
    std::optional<StreamingLLM<Cache>> sv, so;
    if (h2o) {
      const H2OConfig cfg{4, 3, GroupAgg::max, Schedule::prefill_and_every_step};
      hv.emplace(view, cfg);
      ho.emplace(owned, cfg);
    } else {
      const StreamingLLMConfig cfg{2, 5, Schedule::prefill_and_every_step, RopeSpec{10000.0, shape.head_dim, RopeLayout::halves}};
      sv.emplace(view, cfg);
      so.emplace(owned, cfg);
    }
    for (std::int64_t t = 0; t < 40; ++t) {
      for (std::int64_t l = 0; l < shape.num_layers; ++l) {
        const std::int64_t n = t == 0 ? 12 : 1;
        const std::int64_t first = owned.next_position(l);
        test::append_source(view, seed, l, n);
        test::append_source(owned, seed, l, n);
        const auto q = test::source_block(seed, test::Stream::query, l, shape.num_q_heads, first, n, shape.head_dim, 2.0f);
        const Obs obs = h2o ? Obs::from_queries(test::cspan(q), n) : Obs::none();
        if (h2o) {
          n > 1 ? hv->on_prefill(view, l, obs) : hv->on_decode(view, l, obs);
          n > 1 ? ho->on_prefill(owned, l, obs) : ho->on_decode(owned, l, obs);
        } else {
          n > 1 ? sv->on_prefill(view, l, obs) : sv->on_decode(view, l, obs);
          n > 1 ? so->on_prefill(owned, l, obs) : so->on_decode(owned, l, obs);
        }
      }
      REQUIRE(Snapshot(view) == Snapshot(owned));
      REQUIRE(eng.padding_untouched());
      view.check_invariants();
    }
    REQUIRE(view.entries_kept() == owned.entries_kept());
  }
}

TEST_CASE("apply(KeepPlan) keeps the listed slots of each head in order and sets each head's len, which may then differ "
          "between heads",
          "[core][cache]") {
  const CacheShape shape{2, 3, 3, 4, 10};
  Cache cache(shape);
  test::append_source(cache, 4, 1, 10);
  test::append_source(cache, 4, 0, 10);
  const Snapshot before(cache);
  std::vector<std::int32_t> slots(30, 0);
  const std::vector<std::int32_t> keep0{0, 3, 4, 9}, keep1{}, keep2{1, 2, 3, 4, 5, 6, 7, 8, 9};
  std::copy(keep0.begin(), keep0.end(), slots.begin());
  std::copy(keep2.begin(), keep2.end(), slots.begin() + 20);
  const std::vector<std::int64_t> count{4, 0, 9};
  cache.apply(1, KeepPlan{slots.data(), count.data()});
  REQUIRE(cache.len(1, 0) == 4);
  REQUIRE(cache.len(1, 1) == 0);
  REQUIRE(cache.len(1, 2) == 9);
  REQUIRE(cache.max_len(1) == 9);
  REQUIRE(cache.positions(1, 0) == std::vector<std::int32_t>{0, 3, 4, 9});
  REQUIRE(cache.positions(1, 2) == std::vector<std::int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9});
  const auto k0 = cache.keys(1, 0);
  for (std::size_t i = 0; i < keep0.size(); ++i)
    REQUIRE(std::equal(k0.begin() + static_cast<std::ptrdiff_t>(i * 4), k0.begin() + static_cast<std::ptrdiff_t>(i * 4 + 4),
                       before.keys[3].begin() + keep0[i] * 4));
  // Layer 0 untouched; next_position unchanged; the next append continues after each head's own len.
  REQUIRE(Snapshot(cache).positions[0] == before.positions[0]);
  REQUIRE(cache.next_position(1) == 10);
  test::append_source(cache, 4, 1, 1);
  REQUIRE(cache.positions(1, 0) == std::vector<std::int32_t>{0, 3, 4, 9, 10});
  REQUIRE(cache.positions(1, 1) == std::vector<std::int32_t>{10});
  cache.check_invariants();
}

TEST_CASE("apply(ReplacePlan) moves each head's newest slot into its victim's slot and shrinks every len by one",
          "[core][cache]") {
  const CacheShape shape{1, 2, 2, 4, 6};
  Cache cache(shape);
  test::append_source(cache, 9, 0, 6);
  const Snapshot before(cache);
  const std::vector<std::int32_t> victims{2, 5};  // head 1 evicts its newest slot: nothing moves
  cache.apply(0, ReplacePlan{victims.data()});
  REQUIRE(cache.positions(0, 0) == std::vector<std::int32_t>{0, 1, 5, 3, 4});
  REQUIRE(cache.positions(0, 1) == std::vector<std::int32_t>{0, 1, 2, 3, 4});
  const auto k = cache.keys(0, 0);
  REQUIRE(std::equal(k.begin() + 8, k.begin() + 12, before.keys[0].begin() + 20));
  cache.check_invariants();
}

TEST_CASE("clear forgets every entry and restarts positions at zero, leaving the cache reusable", "[core][cache]") {
  const CacheShape shape{2, 2, 2, 4, 8};
  Cache cache(shape);
  test::append_source(cache, 1, 0, 8);
  test::append_source(cache, 1, 1, 3);
  cache.clear();
  REQUIRE(cache.entries_kept() == 0);
  REQUIRE(cache.next_position(0) == 0);
  REQUIRE(cache.next_position(1) == 0);
  test::append_source(cache, 2, 0, 8);
  REQUIRE(cache.positions(0, 1) == std::vector<std::int32_t>{0, 1, 2, 3, 4, 5, 6, 7});
  cache.check_invariants();
}

TEST_CASE("state_hash is equal for equal states and changes with any key, value, position, length or next_position",
          "[core][cache]") {
  const CacheShape shape{2, 2, 2, 4, 8};
  Cache a(shape), b(shape);
  REQUIRE(a.state_hash() == b.state_hash());
  test::append_source(a, 1, 1, 5);
  test::append_source(b, 1, 1, 5);
  const std::uint64_t h0 = a.state_hash();
  REQUIRE(h0 == b.state_hash());

  auto v = a.view(1);
  const float old_key = v.key(1, 4)[3];
  v.key(1, 4)[3] = old_key + 1.0f;
  REQUIRE(a.state_hash() != h0);
  v.key(1, 4)[3] = old_key;
  REQUIRE(a.state_hash() == h0);

  const float old_value = v.value(0, 0)[0];
  v.value(0, 0)[0] = -old_value - 1.0f;
  REQUIRE(a.state_hash() != h0);
  v.value(0, 0)[0] = old_value;

  // A dead slot's bytes count too: a failed call must not scribble beyond len either.
  v.key(0, 7)[0] = 42.0f;
  REQUIRE(a.state_hash() != h0);
  v.key(0, 7)[0] = 0.0f;
  REQUIRE(a.state_hash() == h0);

  v.head_positions(0)[2] = 6;
  REQUIRE(a.state_hash() != h0);
  v.head_positions(0)[2] = 2;
  REQUIRE(a.state_hash() == h0);

  // Length: drop the last entry of every head; next_position: append then compact it away.
  const std::vector<std::int32_t> keep{0, 1, 2, 3, 0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0};
  const std::vector<std::int64_t> four{4, 4};
  Cache c(shape);
  test::append_source(c, 1, 1, 5);
  c.apply(1, KeepPlan{keep.data(), four.data()});
  REQUIRE(c.state_hash() != h0);
  Cache d(shape);
  test::append_source(d, 1, 1, 5);
  test::append_source(d, 1, 0, 1);
  const std::vector<std::int64_t> none{0, 0};
  d.apply(0, KeepPlan{keep.data(), none.data()});
  REQUIRE(d.next_position(0) == 1);
  REQUIRE(d.state_hash() != h0);
  // next_position alone: an all-zero token at position 0, appended and dropped again, leaves every
  // row, position and length byte as a fresh cache has them.
  Cache e(shape);
  const std::vector<float> zeros(static_cast<std::size_t>(shape.num_kv_heads * shape.head_dim), 0.0f);
  e.append_token(0, test::cspan(zeros), test::cspan(zeros));
  e.apply(0, KeepPlan{keep.data(), none.data()});
  REQUIRE(e.next_position(0) == 1);
  REQUIRE(e.state_hash() != Cache(shape).state_hash());
}

TEST_CASE("check_invariants throws InvariantError for a position held twice or at/after next_position",
          "[core][cache]") {
  const CacheShape shape{2, 2, 2, 4, 8};
  Cache cache(shape);
  test::append_source(cache, 1, 1, 5);
  REQUIRE_NOTHROW(cache.check_invariants());
  auto v = cache.view(1);
  v.head_positions(1)[3] = 1;
  test::require_state_error<InvariantError>([&] { cache.check_invariants(); }, "held twice");
  v.head_positions(1)[3] = 5;
  test::require_state_error<InvariantError>([&] { cache.check_invariants(); }, "outside [0, next_position)");
  v.head_positions(1)[3] = -1;
  test::require_state_error<InvariantError>([&] { cache.check_invariants(); }, "outside [0, next_position)");
  v.head_positions(1)[3] = 3;
  REQUIRE_NOTHROW(cache.check_invariants());
}

TEST_CASE("entries_kept and bytes_kept count the live entries of every layer and kv-head", "[core][cache]") {
  const CacheShape shape{2, 3, 6, 5, 9};
  Cache cache(shape);
  test::append_source(cache, 1, 0, 9);
  test::append_source(cache, 1, 1, 2);
  REQUIRE(cache.entries_kept() == 3 * 9 + 3 * 2);
  REQUIRE(cache.bytes_kept() == (3 * 9 + 3 * 2) * 2 * 5 * static_cast<std::int64_t>(sizeof(float)));
  REQUIRE(cache.lens(0).size() == 3);
  REQUIRE(cache.max_len(1) == 2);
}

TEST_CASE("A moved cache keeps its entries, memory and bookkeeping", "[core][cache]") {
  const CacheShape shape{1, 2, 4, 8, 12};
  Cache a(shape);
  test::append_source(a, 5, 0, 7);
  const std::uint64_t h = a.state_hash();
  const Snapshot snap(a);
  Cache b(std::move(a));
  REQUIRE(b.state_hash() == h);
  REQUIRE(Snapshot(b) == snap);
  Cache c(shape);
  c = std::move(b);
  REQUIRE(Snapshot(c) == snap);
  test::append_source(c, 5, 0, 5);
  REQUIRE(c.len(0, 1) == 12);
  c.check_invariants();
}

TEST_CASE("CacheShape reports its group size and layer size and validate() agrees with check() without throwing",
          "[core][shape]") {
  const CacheShape s{4, 2, 8, 16, 100};
  REQUIRE(s.group_size() == 4);
  REQUIRE(s.layer_elements() == 2 * 100 * 16);
  REQUIRE(s.validate() == ErrorCode::ok);
  REQUIRE_NOTHROW(s.check("test"));
  CacheShape bad = s;
  bad.num_q_heads = 7;
  REQUIRE(bad.validate() == ErrorCode::shape_mismatch);
  bad = s;
  bad.capacity = 0;
  REQUIRE(bad.validate() == ErrorCode::invalid_argument);
  bad = s;
  bad.capacity = std::int64_t{INT32_MAX} + 1;
  REQUIRE(bad.validate() == ErrorCode::invalid_argument);
  REQUIRE(CacheShape{}.group_size() == 0);
  // Products are 64-bit: a large shape's layer size does not wrap.
  const CacheShape big{80, 64, 64, 256, 1 << 20};
  REQUIRE(big.layer_elements() == std::int64_t{64} * (1 << 20) * 256);
}
