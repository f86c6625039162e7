// Bad input: every rejected call throws its exact error type, names the argument, leaves the cache
// bit-identical (state_hash), and for policies a following valid call gives the same result as on
// an untouched twin.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kvevict/kvevict.hpp"
#include "support/generators.hpp"

namespace {

using namespace kvevict;
using test::require_throws_exactly;
using Cache = KVCache<CpuBackend>;
using Obs = Observation<float, HostSpace>;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Requires that `fn` throws E naming `needle` and leaves `cache` exactly as it was.
template <class E, class F>
void require_rejected(const Cache& cache, F&& fn, std::string_view needle) {
  const std::uint64_t before = cache.state_hash();
  require_throws_exactly<E>(std::forward<F>(fn), needle);
  REQUIRE(cache.state_hash() == before);
}

// The same for a state error (no single argument to name): E whose message contains `text`.
template <class E, class F>
void require_state_rejected(const Cache& cache, F&& fn, std::string_view text) {
  const std::uint64_t before = cache.state_hash();
  test::require_state_error<E>(std::forward<F>(fn), text);
  REQUIRE(cache.state_hash() == before);
}

// Two identical caches with identical policies; bad calls go to `a`, then both get the same valid call.
template <class Policy, class Config>
struct Twin {
  CacheShape shape;
  Cache a, b;
  Policy pa, pb;
  std::uint64_t seed = 17;

  Twin(const CacheShape& s, const Config& cfg, std::int64_t prefill) : shape(s), a(s), b(s), pa(a, cfg), pb(b, cfg) {
    for (std::int64_t l = 0; l < s.num_layers; ++l) {
      if (prefill == 0) continue;
      valid_step(a, pa, l, prefill);
      valid_step(b, pb, l, prefill);
    }
  }

  void valid_step(Cache& c, Policy& p, std::int64_t l, std::int64_t n) {
    const std::int64_t first = c.next_position(l);
    test::append_source(c, seed, l, n);
    const auto q = test::source_block(seed, test::Stream::query, l, shape.num_q_heads, first, n, shape.head_dim, 2.0f);
    const Obs obs = Obs::from_queries(test::cspan(q), n);
    if (n > 1)
      p.on_prefill(c, l, obs);
    else
      p.on_decode(c, l, obs);
  }

  std::vector<float> scores(Policy& p) {
    if constexpr (std::is_same_v<Policy, H2O<Cache>>) {
      const float* s = p.scorer().q_head_scores(0);
      return {s, s + shape.num_layers * shape.num_q_heads * shape.capacity};
    } else {
      return {};
    }
  }

  // `bad` must throw E naming `needle` without changing `a` or its policy's scores; afterwards a
  // valid decode step on every layer leaves `a` and `b` identical.
  template <class E, class F>
  void require_rejected_then_same(F&& bad, std::string_view needle) {
    const std::uint64_t before = a.state_hash();
    const auto scores_before = scores(pa);
    require_throws_exactly<E>([&] { bad(a, pa); }, needle);
    REQUIRE(a.state_hash() == before);
    REQUIRE(scores(pa) == scores_before);
    for (std::int64_t l = 0; l < shape.num_layers; ++l) {
      valid_step(a, pa, l, 1);
      valid_step(b, pb, l, 1);
    }
    REQUIRE(a.state_hash() == b.state_hash());
    REQUIRE(scores(pa) == scores(pb));
  }
};

using H2OTwin = Twin<H2O<Cache>, H2OConfig>;
using StreamingTwin = Twin<StreamingLLM<Cache>, StreamingLLMConfig>;

}  // namespace

TEST_CASE("A CacheShape with a zero or negative size is rejected with ArgumentError naming the field", "[core][errors]") {
  const CacheShape good{2, 2, 4, 8, 16};
  for (std::int64_t bad : {0, -1, -100}) {
    INFO("value " << bad);
    CacheShape s = good;
    s.num_layers = bad;
    require_throws_exactly<ArgumentError>([&] { Cache c(s); }, "num_layers");
    s = good;
    s.num_kv_heads = bad;
    require_throws_exactly<ArgumentError>([&] { Cache c(s); }, "num_kv_heads");
    s = good;
    s.num_q_heads = bad;
    require_throws_exactly<ArgumentError>([&] { Cache c(s); }, "num_q_heads");
    s = good;
    s.head_dim = bad;
    require_throws_exactly<ArgumentError>([&] { Cache c(s); }, "head_dim");
    s = good;
    s.capacity = bad;
    require_throws_exactly<ArgumentError>([&] { Cache c(s); }, "capacity");
    REQUIRE(s.validate() == ErrorCode::invalid_argument);
  }
  CacheShape s = good;
  s.capacity = std::int64_t{INT32_MAX} + 1;
  require_throws_exactly<ArgumentError>([&] { s.check("test"); }, "capacity");
}

TEST_CASE("A CacheShape whose q_heads is not a multiple of kv_heads is rejected with ShapeError naming num_q_heads",
          "[core][errors]") {
  for (auto [kv, q] : {std::pair<std::int64_t, std::int64_t>{2, 3}, {4, 2}, {3, 8}}) {
    const CacheShape s{1, kv, q, 8, 16};
    const std::string msg = require_throws_exactly<ShapeError>([&] { Cache c(s); }, "num_q_heads");
    CHECK_THAT(msg, Catch::Matchers::Contains(std::to_string(q)));
    REQUIRE(s.validate() == ErrorCode::shape_mismatch);
  }
}

TEST_CASE("An ExternalKV with null pointers or strides too small for the shape is rejected naming the field",
          "[core][errors][view]") {
  const CacheShape shape{2, 2, 2, 8, 10};
  std::vector<float> k(2000), v(2000);
  const ExternalKV<float, HostSpace> good{k.data(), v.data(), 2 * 10 * 9, 10 * 9, 9};
  REQUIRE_NOTHROW(Cache(shape, good));
  auto with = [&](auto mutate) {
    auto e = good;
    mutate(e);
    return e;
  };
  require_throws_exactly<ArgumentError>([&] { Cache c(shape, with([](auto& e) { e.keys = nullptr; })); }, "kv.keys");
  require_throws_exactly<ArgumentError>([&] { Cache c(shape, with([](auto& e) { e.values = nullptr; })); }, "kv.values");
  require_throws_exactly<ShapeError>([&] { Cache c(shape, with([](auto& e) { e.slot_stride = 7; })); }, "kv.slot_stride");
  require_throws_exactly<ShapeError>([&] { Cache c(shape, with([](auto& e) { e.slot_stride = -1; })); }, "kv.slot_stride");
  require_throws_exactly<ShapeError>([&] { Cache c(shape, with([](auto& e) { e.head_stride = 89; })); }, "kv.head_stride");
  require_throws_exactly<ShapeError>([&] { Cache c(shape, with([](auto& e) { e.layer_stride = 179; })); },
                                     "kv.layer_stride");
  // An invalid shape is reported before the buffers are looked at.
  require_throws_exactly<ArgumentError>([&] { Cache c(CacheShape{2, 2, 2, 0, 10}, good); }, "head_dim");
}

TEST_CASE("append rejects a bad layer, token count, null or mis-sized spans and overflow, leaving the cache unchanged",
          "[core][errors]") {
  const CacheShape shape{2, 2, 4, 8, 6};
  Cache cache(shape);
  test::append_source(cache, 1, 0, 4);
  const auto k1 = test::source_block(1, test::Stream::key, 0, 2, 4, 1, 8);
  const auto k3 = test::source_block(1, test::Stream::key, 0, 2, 4, 3, 8);
  const auto wrong_dim = test::source_block(1, test::Stream::key, 0, 2, 4, 1, 9);  // head_dim + 1
  const auto wrong_heads = test::source_block(1, test::Stream::key, 0, 3, 4, 1, 8);
  const HostSpan<const float> null_span{nullptr, 16};

  for (std::int64_t layer : {-1, 2, 100})
    require_rejected<ArgumentError>(cache, [&] { cache.append(layer, test::cspan(k1), test::cspan(k1), 1); }, "layer");
  for (std::int64_t n : {0, -3})
    require_rejected<ArgumentError>(cache, [&] { cache.append(0, test::cspan(k1), test::cspan(k1), n); }, "num_tokens");
  require_rejected<ArgumentError>(cache, [&] { cache.append(0, null_span, test::cspan(k1), 1); }, "keys");
  require_rejected<ArgumentError>(cache, [&] { cache.append(0, test::cspan(k1), null_span, 1); }, "values");
  require_rejected<ShapeError>(cache, [&] { cache.append(0, test::cspan(wrong_dim), test::cspan(k1), 1); }, "keys.size");
  require_rejected<ShapeError>(cache, [&] { cache.append(0, test::cspan(k1), test::cspan(wrong_dim), 1); }, "values.size");
  require_rejected<ShapeError>(cache, [&] { cache.append_token(0, test::cspan(wrong_heads), test::cspan(wrong_heads)); },
                               "keys.size");
  // Spans sized for 1 token but num_tokens = 3.
  require_rejected<ShapeError>(cache, [&] { cache.append(0, test::cspan(k1), test::cspan(k1), 3); }, "keys.size");
  // Capacity 6 holds 4: 3 more do not fit, in any head.
  const std::uint64_t before_overflow = cache.state_hash();
  const std::string msg =
      require_throws_exactly<CapacityError>([&] { cache.append(0, test::cspan(k3), test::cspan(k3), 3); }, "'num_tokens' = 3");
  CHECK_THAT(msg, Catch::Matchers::Contains("capacity 6"));
  REQUIRE(cache.state_hash() == before_overflow);  // not even the tokens that would have fit
  REQUIRE(cache.len(0, 0) == 4);
  REQUIRE(cache.next_position(0) == 4);
  // ... while 2 do.
  const auto k2 = test::source_block(1, test::Stream::key, 0, 2, 4, 2, 8);
  cache.append(0, test::cspan(k2), test::cspan(k2), 2);
  require_rejected<CapacityError>(cache, [&] { cache.append_token(0, test::cspan(k1), test::cspan(k1)); }, "num_tokens");
  cache.check_invariants();
}

TEST_CASE("Accessors reject a layer or kv-head out of range with ArgumentError naming it", "[core][errors]") {
  const CacheShape shape{2, 3, 3, 4, 4};
  Cache cache(shape);
  require_throws_exactly<ArgumentError>([&] { (void)cache.len(2, 0); }, "layer");
  require_throws_exactly<ArgumentError>([&] { (void)cache.len(0, 3); }, "kv_head");
  require_throws_exactly<ArgumentError>([&] { (void)cache.len(0, -1); }, "kv_head");
  require_throws_exactly<ArgumentError>([&] { (void)cache.lens(-1); }, "layer");
  require_throws_exactly<ArgumentError>([&] { (void)cache.view(5); }, "layer");
  require_throws_exactly<ArgumentError>([&] { (void)cache.next_position(2); }, "layer");
  require_throws_exactly<ArgumentError>([&] { (void)cache.positions(0, 7); }, "kv_head");
  require_throws_exactly<ArgumentError>([&] { (void)cache.keys(3, 0); }, "layer");
}

TEST_CASE("append rejects a token when any one kv-head is full, even when the others have room", "[core][errors]") {
  const CacheShape shape{2, 2, 2, 4, 6};
  Cache cache(shape);
  test::append_source(cache, 2, 0, 6);
  std::vector<std::int32_t> keep{0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5};
  const std::vector<std::int64_t> counts{2, 6};  // head 0 holds 2 entries, head 1 is full
  cache.apply(0, KeepPlan{keep.data(), counts.data()});
  const auto k1 = test::source_block(2, test::Stream::key, 0, 2, 6, 1, 4);
  require_rejected<CapacityError>(cache, [&] { cache.append_token(0, test::cspan(k1), test::cspan(k1)); }, "'num_tokens' = 1");
  require_rejected<CapacityError>(cache, [&] { cache.append(0, test::cspan(k1), test::cspan(k1), 1); }, "'num_tokens' = 1");
  REQUIRE(cache.len(0, 0) == 2);
  cache.check_invariants();
}

TEST_CASE("KVCache::apply(DecodeEviction) rejects a bad layer, missing sums or fresh counts, a short stride, an empty "
          "head and non-finite probabilities, changing nothing",
          "[core][errors]") {
  const CacheShape shape{2, 2, 4, 4, 8};
  Cache cache(shape);
  test::append_source(cache, 4, 0, 6);  // layer 1 stays empty
  std::vector<float> probs(static_cast<std::size_t>(shape.num_q_heads * shape.capacity), 1.0f / 6.0f);
  std::vector<float> sums(static_cast<std::size_t>(shape.num_q_heads * shape.capacity), 0.25f);
  const std::vector<float> sums_before = sums;
  const std::vector<std::int64_t> fresh{6, 6};
  const ProtectRule rule{1, 5};
  const auto step = [&](auto&& edit) {
    DecodeEviction s{probs.data(), shape.capacity, sums.data(), fresh.data(), GroupAgg::mean, rule};
    edit(s);
    return s;
  };
  const auto same = [](DecodeEviction&) {};
  require_rejected<ArgumentError>(cache, [&] { cache.apply(2, step(same)); }, "'layer' = 2");
  require_rejected<ArgumentError>(cache, [&] { cache.apply(0, step([](DecodeEviction& s) { s.q_scores = nullptr; })); },
                                  "'step.q_scores' = null");
  require_rejected<ArgumentError>(cache, [&] { cache.apply(0, step([](DecodeEviction& s) { s.fresh_from = nullptr; })); },
                                  "'step.fresh_from' = null");
  require_rejected<ShapeError>(cache, [&] { cache.apply(0, step([](DecodeEviction& s) { s.probs_stride = 5; })); },
                               "'step.probs_stride' = 5");
  require_rejected<EmptyCacheError>(cache, [&] { cache.apply(1, step(same)); }, "'kv_head' = 0");
  for (const float bad : {kNaN, kInf, -kInf}) {
    probs[static_cast<std::size_t>(2 * shape.capacity + 3)] = bad;  // q-head 2, slot 3
    require_rejected<NonFiniteError>(cache, [&] { cache.apply(0, step(same)); }, "probs");
    probs[static_cast<std::size_t>(2 * shape.capacity + 3)] = 1.0f / 6.0f;
  }
  REQUIRE(sums == sums_before);
  cache.apply(0, step(same));  // and the valid step evicts one entry per head
  REQUIRE(cache.len(0, 0) == 5);
  REQUIRE(cache.len(0, 1) == 5);
}

// A span's memory space is part of its type: a CPU cache does not accept device spans.
template <class C, class S>
concept AppendsSpan = requires(C& c, S s) {
  c.append(0, s, s, 1);
  c.append_token(0, s, s);
};
static_assert(AppendsSpan<Cache, HostSpan<const float>>);
static_assert(!AppendsSpan<Cache, CudaSpan<const float>>);

TEST_CASE("apply rejects null plans, keep counts below 0 or above len, an empty head and a dead victim slot before moving "
          "anything",
          "[core][errors]") {
  const CacheShape shape{1, 2, 2, 4, 8};
  Cache cache(shape);
  test::append_source(cache, 3, 0, 5);
  std::vector<std::int32_t> slots{0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7};
  const std::vector<std::int64_t> too_many{3, 6}, negative{-1, 2};
  require_rejected<ArgumentError>(cache, [&] { cache.apply(0, KeepPlan{nullptr, too_many.data()}); }, "plan");
  require_rejected<ArgumentError>(cache, [&] { cache.apply(0, KeepPlan{slots.data(), nullptr}); }, "plan");
  require_rejected<BudgetError>(cache, [&] { cache.apply(0, KeepPlan{slots.data(), too_many.data()}); }, "keep_count[1]");
  require_rejected<BudgetError>(cache, [&] { cache.apply(0, KeepPlan{slots.data(), negative.data()}); }, "keep_count[0]");
  // Keep slots must be strictly ascending live slots, every head checked before any row moves.
  const std::vector<std::int64_t> two{2, 2};
  const auto keep_plan = [&](std::vector<std::int32_t> head0, std::vector<std::int32_t> head1) {
    std::vector<std::int32_t> s(16, 0);
    std::copy(head0.begin(), head0.end(), s.begin());
    std::copy(head1.begin(), head1.end(), s.begin() + 8);
    return s;
  };
  const auto dead_slot = keep_plan({1, 3}, {0, 5}), descending = keep_plan({2, 1}, {0, 1}),
             repeated = keep_plan({3, 3}, {0, 1}), negative_slot = keep_plan({-1, 2}, {0, 1});
  require_rejected<ArgumentError>(cache, [&] { cache.apply(0, KeepPlan{dead_slot.data(), two.data()}); }, "'keep_slots[1][1]' = 5");
  require_rejected<ArgumentError>(cache, [&] { cache.apply(0, KeepPlan{descending.data(), two.data()}); }, "'keep_slots[0][1]' = 1");
  require_rejected<ArgumentError>(cache, [&] { cache.apply(0, KeepPlan{repeated.data(), two.data()}); }, "'keep_slots[0][1]' = 3");
  require_rejected<ArgumentError>(cache, [&] { cache.apply(0, KeepPlan{negative_slot.data(), two.data()}); }, "'keep_slots[0][0]' = -1");
  const std::vector<std::int32_t> dead_victim{1, 5};  // head 1 holds slots [0, 5)
  require_rejected<ArgumentError>(cache, [&] { cache.apply(0, ReplacePlan{dead_victim.data()}); }, "victims[1]");
  const std::vector<std::int32_t> negative_victim{-1, 0};
  require_rejected<ArgumentError>(cache, [&] { cache.apply(0, ReplacePlan{negative_victim.data()}); }, "victims[0]");
  require_rejected<ArgumentError>(cache, [&] { cache.apply(0, ReplacePlan{nullptr}); }, "plan.victims");
  Cache empty(shape);
  const std::vector<std::int32_t> zero{0, 0};
  require_rejected<EmptyCacheError>(empty, [&] { empty.apply(0, ReplacePlan{zero.data()}); }, "kv_head");
  require_rejected<ArgumentError>(cache, [&] { cache.apply(1, ReplacePlan{zero.data()}); }, "layer");
}

TEST_CASE("Policy configurations with a budget above capacity, below sink + recent, or zero are rejected with "
          "BudgetError naming the budget",
          "[policies][errors]") {
  const CacheShape shape{1, 2, 4, 8, 16};
  Cache cache(shape);
  require_throws_exactly<BudgetError>([&] { H2O<Cache> p(cache, H2OConfig{10, 7, GroupAgg::mean, Schedule::prefill_and_every_step}); },
                                      "budget");
  require_throws_exactly<BudgetError>(
      [&] { StreamingLLM<Cache> p(cache, StreamingLLMConfig{4, 13, Schedule::prefill_and_every_step, {}}); }, "budget");
  require_throws_exactly<BudgetError>(
      [&] { StreamingLLM<Cache> p(cache, StreamingLLMConfig{0, 0, Schedule::prefill_and_every_step, {}}); }, "budget");
  require_throws_exactly<BudgetError>([&] { H2O<Cache> p(cache, H2OConfig{0, 0, GroupAgg::mean, Schedule::prefill_and_every_step}); },
                                      "budget");
  // The composition's own check: a budget smaller than what the selector protects.
  const std::string msg = require_throws_exactly<BudgetError>(
      [&] {
        TopKEvictionPolicy<Cache, NoScorer<Cache>> p(cache, "custom", NoScorer<Cache>(cache), UniformBudget{5},
                                                     SinkRecentSelector{2, 4}, EvictionOptions{});
      },
      "budget");
  CHECK_THAT(msg, Catch::Matchers::Contains("sink + recent"));
  // Exactly at the limits is fine.
  REQUIRE_NOTHROW(H2O<Cache>(cache, H2OConfig{10, 6, GroupAgg::mean, Schedule::prefill_and_every_step}));
  REQUIRE_NOTHROW(StreamingLLM<Cache>(cache, StreamingLLMConfig{0, 1, Schedule::prefill_and_every_step, {}}));
}

TEST_CASE("Negative sink, recent or heavy counts are rejected with ArgumentError naming the count", "[policies][errors]") {
  const CacheShape shape{1, 1, 1, 4, 16};
  Cache cache(shape);
  require_throws_exactly<ArgumentError>(
      [&] { StreamingLLM<Cache> p(cache, StreamingLLMConfig{-1, 4, Schedule::prefill_and_every_step, {}}); }, "sink");
  require_throws_exactly<ArgumentError>(
      [&] { StreamingLLM<Cache> p(cache, StreamingLLMConfig{4, -2, Schedule::prefill_and_every_step, {}}); }, "recent");
  require_throws_exactly<ArgumentError>([&] { H2O<Cache> p(cache, H2OConfig{4, -1, GroupAgg::mean, Schedule::prefill_and_every_step}); },
                                        "recent");
  require_throws_exactly<ArgumentError>([&] { H2O<Cache> p(cache, H2OConfig{-1, 4, GroupAgg::mean, Schedule::prefill_and_every_step}); },
                                        "num_heavy");
  require_throws_exactly<ArgumentError>([&] { H2O<Cache> p(cache, H2OConfig{-3, 0, GroupAgg::mean, Schedule::prefill_and_every_step}); },
                                        "num_heavy");
}

TEST_CASE("A pos-shift RoPE with an odd, zero or too large rotary_dim or a base <= 1 is rejected at construction",
          "[policies][errors][rope]") {
  const CacheShape shape{1, 1, 1, 8, 16};
  Cache cache(shape);
  for (std::int64_t rd : {0, -2, 3, 7, 10}) {
    INFO("rotary_dim " << rd);
    const StreamingLLMConfig cfg{2, 4, Schedule::prefill_and_every_step, RopeSpec{10000.0, rd, RopeLayout::halves}};
    require_throws_exactly<ArgumentError>([&] { StreamingLLM<Cache> p(cache, cfg); }, "rope.rotary_dim");
  }
  const StreamingLLMConfig bad_base{2, 4, Schedule::prefill_and_every_step, RopeSpec{1.0, 8, RopeLayout::interleaved_pairs}};
  require_throws_exactly<ArgumentError>([&] { StreamingLLM<Cache> p(cache, bad_base); }, "rope.base");
}

TEST_CASE("The one-shot factories reject a capacity not above the window, a prompt not above the sinks and a "
          "compression ratio below 0 or not below 1",
          "[policies][errors]") {
  require_throws_exactly<BudgetError>([] { (void)H2OConfig::kvcache_factory(8, 8); }, "capacity");
  require_throws_exactly<BudgetError>([] { (void)StreamingLLMConfig::kvcache_factory(4, 6); }, "capacity");
  require_throws_exactly<ArgumentError>([] { (void)StreamingLLMConfig::kvpress(4, 0.5, 4); }, "prompt_len");
  for (double r : {-0.1, 1.0, 1.5, std::nan("")})
    require_throws_exactly<ArgumentError>([&] { (void)StreamingLLMConfig::kvpress(100, r, 4); }, "compression_ratio");
}

TEST_CASE("H2O hooks reject a layer out of range, an empty layer and a cache of another shape, and then behave like an "
          "untouched twin",
          "[policies][errors]") {
  H2OTwin t(CacheShape{2, 2, 4, 8, 16}, H2OConfig{4, 4, GroupAgg::mean, Schedule::prefill_and_every_step}, 0);
  // Nothing appended yet: every hook finds an empty layer.
  const auto q = test::source_block(1, test::Stream::query, 0, 4, 0, 1, 8);
  const Obs obs = Obs::from_queries(test::cspan(q), 1);
  require_rejected<EmptyCacheError>(t.a, [&] { t.pa.on_prefill(t.a, 0, obs); }, "layer");
  require_rejected<EmptyCacheError>(t.a, [&] { t.pa.on_decode(t.a, 1, obs); }, "layer");
  for (std::int64_t l = 0; l < 2; ++l) {
    t.valid_step(t.a, t.pa, l, 12);
    t.valid_step(t.b, t.pb, l, 12);
  }
  for (std::int64_t layer : {-1, 2}) {
    t.require_rejected_then_same<ArgumentError>([&](Cache& c, H2O<Cache>& p) { p.on_prefill(c, layer, obs); }, "layer");
    t.require_rejected_then_same<ArgumentError>([&](Cache& c, H2O<Cache>& p) { p.on_decode(c, layer, obs); }, "layer");
    t.require_rejected_then_same<ArgumentError>([&](Cache& c, H2O<Cache>& p) { p.make_room(c, layer, 1); }, "layer");
  }
  t.require_rejected_then_same<ArgumentError>([&](Cache& c, H2O<Cache>& p) { p.make_room(c, 0, -1); }, "incoming");
  // A cache with another GQA group (8 q-heads per 2 kv-heads instead of 4), or another capacity.
  const std::pair<CacheShape, const char*> others[] = {{CacheShape{2, 2, 8, 8, 16}, "'cache.shape().num_q_heads' = 8"},
                                                       {CacheShape{2, 2, 4, 8, 17}, "'cache.shape().capacity' = 17"},
                                                       {CacheShape{1, 2, 4, 8, 16}, "'cache.shape().num_layers' = 1"}};
  for (const auto& [other, field] : others) {
    Cache c(other);
    test::append_source(c, 1, 0, 4);
    const auto q8 = test::source_block(1, test::Stream::query, 0, other.num_q_heads, 3, 1, 8);
    const Obs o8 = Obs::from_queries(test::cspan(q8), 1);
    require_rejected<ShapeError>(c, [&] { t.pa.on_decode(c, 0, o8); }, field);
    require_rejected<ShapeError>(c, [&] { t.pa.on_prefill(c, 0, o8); }, field);
    require_rejected<ShapeError>(c, [&] { t.pa.make_room(c, 0, 1); }, field);
  }
  // The failed calls left the policy's state alone: it still matches its twin.
  t.require_rejected_then_same<ArgumentError>([&](Cache& c, H2O<Cache>& p) { p.on_decode(c, 9, obs); }, "layer");
}

TEST_CASE("H2O hooks reject bad observations (empty, both kinds, no queries, bad scale, mis-sized, non-finite, bad "
          "first_position, short probs_stride) and then behave like an untouched twin",
          "[policies][errors]") {
  const CacheShape shape{1, 2, 4, 8, 16};
  H2OTwin t(shape, H2OConfig{3, 3, GroupAgg::max, Schedule::prefill_and_every_step}, 10);
  using Fn = std::function<void(Cache&, H2O<Cache>&)>;
  // The layer holds 6 entries per head (budget) and next_position 10.
  const std::int64_t len = t.a.max_len(0);
  REQUIRE(len == 6);
  const auto q1 = test::source_block(1, test::Stream::query, 0, 4, 9, 1, 8);
  const auto q_wrong_dim = test::source_block(1, test::Stream::query, 0, 4, 9, 1, 7);
  const auto q_wrong_heads = test::source_block(1, test::Stream::query, 0, 2, 9, 1, 8);
  std::vector<float> probs(static_cast<std::size_t>(4 * 1 * len), 1.0f / 6.0f);
  const auto decode = [](const Obs& o) -> Fn { return [o](Cache& c, H2O<Cache>& p) { p.on_decode(c, 0, o); }; };
  const auto prefill = [](const Obs& o) -> Fn { return [o](Cache& c, H2O<Cache>& p) { p.on_prefill(c, 0, o); }; };

  t.require_rejected_then_same<ArgumentError>(decode(Obs::none()), "observation");
  t.require_rejected_then_same<ArgumentError>(prefill(Obs::none()), "observation");
  Obs both = Obs::from_queries(test::cspan(q1), 1);
  both.probs = test::cspan(probs);
  both.probs_stride = len;
  t.require_rejected_then_same<ArgumentError>(decode(both), "observation");
  for (std::int64_t n : {0, -1})
    t.require_rejected_then_same<ArgumentError>(decode(Obs::from_queries(test::cspan(q1), n)), "num_queries");
  for (float scale : {-1.0f, kNaN, kInf})
    t.require_rejected_then_same<ArgumentError>(decode(Obs::from_queries(test::cspan(q1), 1, scale)), "scale");
  // head_dim and q-head mismatches show up as a mis-sized query block.
  t.require_rejected_then_same<ShapeError>(decode(Obs::from_queries(test::cspan(q_wrong_dim), 1)), "queries.size");
  t.require_rejected_then_same<ShapeError>(decode(Obs::from_queries(test::cspan(q_wrong_heads), 1)), "queries.size");
  t.require_rejected_then_same<ShapeError>(decode(Obs::from_queries(test::cspan(q1), 2)), "queries.size");
  for (float bad : {kNaN, kInf, -kInf}) {
    for (std::size_t at : {std::size_t{0}, q1.size() - 1}) {
      auto q = q1;
      q[at] = bad;
      t.require_rejected_then_same<NonFiniteError>(decode(Obs::from_queries(test::cspan(q), 1)), "queries");
      auto p = probs;
      p[at % p.size()] = bad;
      t.require_rejected_then_same<NonFiniteError>(decode(Obs::from_probs(test::cspan(p), 1, len)), "probs");
    }
  }
  // first_position: >= -1, and the queries must lie within the tokens appended so far.
  t.require_rejected_then_same<ArgumentError>(decode(Obs::from_queries(test::cspan(q1), 1, 0.0f, -2)), "first_position");
  t.require_rejected_then_same<ArgumentError>(
      decode(Obs::from_queries(test::cspan(q1), 1, 0.0f, t.a.next_position(0))), "first_position");
  // probs_stride shorter than the longest head, and probabilities sized for another stride.
  t.require_rejected_then_same<ShapeError>(decode(Obs::from_probs(test::cspan(probs), 1, len - 1)), "probs_stride");
  t.require_rejected_then_same<ShapeError>(decode(Obs::from_probs(test::cspan(probs), 1, len + 1)), "probs.size");
  t.require_rejected_then_same<ShapeError>(prefill(Obs::from_probs(test::cspan(probs), 2, len)), "probs.size");
}

TEST_CASE("A query block longer than the tokens appended so far is rejected (first_position = -1 would be negative)",
          "[policies][errors]") {
  const CacheShape shape{1, 1, 1, 4, 16};
  H2OTwin t(shape, H2OConfig{2, 2, GroupAgg::mean, Schedule::prefill_and_every_step}, 3);
  // next_position is 3: four queries cannot be "the last four tokens".
  const auto q4 = test::source_block(1, test::Stream::query, 0, 1, 0, 4, 4);
  t.require_rejected_then_same<ArgumentError>(
      [&](Cache& c, H2O<Cache>& p) { p.on_prefill(c, 0, Obs::from_queries(test::cspan(q4), 4)); }, "first_position");
  const auto q5 = test::source_block(1, test::Stream::query, 0, 1, 0, 5, 4);
  t.require_rejected_then_same<ArgumentError>(
      [&](Cache& c, H2O<Cache>& p) { p.on_prefill(c, 0, Obs::from_queries(test::cspan(q5), 5)); }, "first_position");
}

TEST_CASE("StreamingLLM hooks validate the observations they ignore and reject empty layers, bad layers and foreign "
          "caches, then behave like an untouched twin",
          "[policies][errors]") {
  const CacheShape shape{2, 1, 2, 4, 12};
  StreamingTwin t(shape, StreamingLLMConfig{1, 4, Schedule::prefill_and_every_step, RopeSpec{10000.0, 4, RopeLayout::halves}}, 0);
  require_rejected<EmptyCacheError>(t.a, [&] { t.pa.on_prefill(t.a, 1, Obs::none()); }, "layer");
  for (std::int64_t l = 0; l < 2; ++l) {
    t.valid_step(t.a, t.pa, l, 8);
    t.valid_step(t.b, t.pb, l, 8);
  }
  auto q = test::source_block(1, test::Stream::query, 0, 2, 7, 1, 4);
  q[3] = kNaN;
  t.require_rejected_then_same<NonFiniteError>(
      [&](Cache& c, StreamingLLM<Cache>& p) { p.on_decode(c, 0, Obs::from_queries(test::cspan(q), 1)); }, "queries");
  t.require_rejected_then_same<ArgumentError>([&](Cache& c, StreamingLLM<Cache>& p) { p.on_decode(c, 2, Obs::none()); },
                                              "layer");
  t.require_rejected_then_same<ArgumentError>([&](Cache& c, StreamingLLM<Cache>& p) { p.make_room(c, 0, -4); }, "incoming");
  Cache other(CacheShape{2, 1, 1, 4, 12});
  test::append_source(other, 1, 0, 3);
  require_rejected<ShapeError>(other, [&] { t.pa.on_decode(other, 0, Obs::none()); }, "cache.shape().");
}

TEST_CASE("pos-shift refuses, before changing anything, to evict when kv-heads would evict different numbers of "
          "entries",
          "[policies][errors][rope]") {
  const CacheShape shape{1, 2, 2, 4, 12};
  Cache cache(shape);
  StreamingLLM<Cache> policy(cache, StreamingLLMConfig{1, 3, Schedule::prefill_and_every_step, RopeSpec{10000.0, 4, RopeLayout::halves}});
  test::append_source(cache, 1, 0, 10);
  // Shorten head 1 by hand: heads now hold 10 and 7 entries.
  std::vector<std::int32_t> slots(24, 0);
  for (std::int32_t i = 0; i < 10; ++i) slots[static_cast<std::size_t>(i)] = i;
  for (std::int32_t i = 0; i < 7; ++i) slots[static_cast<std::size_t>(12 + i)] = i + 3;
  const std::vector<std::int64_t> count{10, 7};
  cache.apply(0, KeepPlan{slots.data(), count.data()});
  require_state_rejected<UnsupportedError>(cache, [&] { policy.on_prefill(cache, 0, Obs::none()); }, "pos-shift");
  require_state_rejected<UnsupportedError>(cache, [&] { policy.make_room(cache, 0, 1); }, "pos-shift");
}

TEST_CASE("Every kvevict error derives from kvevict::Error and std::runtime_error and carries its code",
          "[core][errors]") {
  const CacheShape shape{1, 1, 1, 4, 2};
  Cache cache(shape);
  test::append_source(cache, 1, 0, 2);
  try {
    test::append_source(cache, 1, 0, 1);
    FAIL("append beyond capacity did not throw");
  } catch (const Error& e) {
    REQUIRE(e.code() == ErrorCode::capacity);
    REQUIRE(to_string(e.code()) == "capacity");
    const std::runtime_error& base = e;
    CHECK_THAT(std::string(base.what()), Catch::Matchers::StartsWith("kvevict: KVCache::append: argument 'num_tokens' = 1"));
  }
}
