// StreamingLLM against the reference StartRecentKVCache rules (ref::streaming_llm_keep and
// ref::streaming_llm_evict_for_space), its one-shot variants, pos-shift re-indexing and
// rope_position().
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvevict/kvevict.hpp"
#include "support/generators.hpp"
#include "support/reference.hpp"

namespace {

using namespace kvevict;
using test::Rng;
using Cache = KVCache<CpuBackend>;
using Obs = Observation<float, HostSpace>;

ref::Positions kept(const Cache& cache, std::int64_t layer, std::int64_t h) {
  const auto p = cache.kept_positions(layer, h);
  return {p.begin(), p.end()};
}

// Every (layer, kv_head) of the cache keeps `want`.
void require_all_heads_keep(const Cache& cache, const ref::Positions& want) {
  for (std::int64_t l = 0; l < cache.shape().num_layers; ++l)
    for (std::int64_t h = 0; h < cache.shape().num_kv_heads; ++h) {
      INFO("layer " << l << " kv_head " << h);
      REQUIRE(kept(cache, l, h) == want);
    }
}

// Kept rows are the source rows of their positions, bit for bit.
void require_rows_intact(const Cache& cache, std::uint64_t seed) {
  const CacheShape& s = cache.shape();
  for (std::int64_t l = 0; l < s.num_layers; ++l)
    for (std::int64_t h = 0; h < s.num_kv_heads; ++h) {
      const auto pos = cache.positions(l, h);
      const auto k = cache.keys(l, h), v = cache.values(l, h);
      for (std::size_t j = 0; j < pos.size(); ++j) {
        const auto sk = test::source_row(seed, test::Stream::key, l, h, pos[j], s.head_dim);
        const auto sv = test::source_row(seed, test::Stream::value, l, h, pos[j], s.head_dim);
        REQUIRE(std::equal(sk.begin(), sk.end(), k.begin() + static_cast<std::ptrdiff_t>(j) * s.head_dim));
        REQUIRE(std::equal(sv.begin(), sv.end(), v.begin() + static_cast<std::ptrdiff_t>(j) * s.head_dim));
      }
    }
}

}  // namespace

TEST_CASE("StreamingLLM prefill keeps exactly ref::streaming_llm_keep(T, sink, recent) for every small T, sink and "
          "recent, sink = 0 included",
          "[policies][streaming_llm]") {
  for (std::int64_t sink : {0, 1, 2, 4}) {
    for (std::int64_t recent : {0, 1, 3, 8}) {
      if (sink + recent == 0) continue;
      for (std::int64_t T = 1; T <= 24; ++T) {
        INFO("T " << T << " sink " << sink << " recent " << recent);
        const CacheShape shape{2, 2, 4, 4, std::max<std::int64_t>(T, sink + recent)};
        Cache cache(shape);
        StreamingLLM<Cache> policy(cache, StreamingLLMConfig{sink, recent, Schedule::prefill_and_every_step, {}});
        for (std::int64_t l = 0; l < 2; ++l) {
          test::append_source(cache, 7, l, T);
          policy.on_prefill(cache, l, Obs::none());
        }
        require_all_heads_keep(cache, ref::streaming_llm_keep(T, sink, recent));
        require_rows_intact(cache, 7);
        cache.check_invariants();
      }
    }
  }
}

TEST_CASE("StreamingLLM decode (append one token, then on_decode) keeps ref::streaming_llm_keep of the whole sequence "
          "after every step",
          "[policies][streaming_llm]") {
  for (std::uint64_t seed = 1; seed <= 60; ++seed) {
    Rng rng(seed);
    const std::int64_t sink = rng.uniform_int(0, 5), recent = rng.uniform_int(sink == 0 ? 1 : 0, 12);
    const std::int64_t prefill = rng.uniform_int(1, 30);
    CacheShape s{1, rng.uniform_int(1, 3), 0, 8, std::max(prefill, sink + recent + 1)};
    s.num_q_heads = s.num_kv_heads * rng.pick<std::int64_t>({1, 2, 4, 8});
    INFO("seed " << seed << " sink " << sink << " recent " << recent << " prefill " << prefill);
    Cache cache(s);
    StreamingLLM<Cache> policy(cache, StreamingLLMConfig{sink, recent, Schedule::prefill_and_every_step, {}});
    test::append_source(cache, seed, 0, prefill);
    policy.on_prefill(cache, 0, Obs::none());
    require_all_heads_keep(cache, ref::streaming_llm_keep(prefill, sink, recent));
    for (std::int64_t t = prefill; t < prefill + 60; ++t) {
      INFO("after token " << t);
      test::append_source(cache, seed, 0, 1);
      policy.on_decode(cache, 0, Obs::none());
      require_all_heads_keep(cache, ref::streaming_llm_keep(t + 1, sink, recent));
      cache.check_invariants();
    }
    require_rows_intact(cache, seed);
  }
}

TEST_CASE("StreamingLLM make_room(n) keeps exactly ref::streaming_llm_evict_for_space(T, sink, recent, n), n >= recent "
          "and n = 0 included",
          "[policies][streaming_llm]") {
  for (std::int64_t sink : {0, 1, 4}) {
    for (std::int64_t recent : {1, 2, 5, 8}) {
      for (std::int64_t T = 1; T <= 20; ++T) {
        for (std::int64_t n : {0, 1, 2, 4, 5, 8, 9, 30}) {
          INFO("T " << T << " sink " << sink << " recent " << recent << " n " << n);
          const CacheShape shape{1, 2, 2, 4, std::max<std::int64_t>(T, sink + recent)};
          Cache cache(shape);
          StreamingLLM<Cache> policy(cache, StreamingLLMConfig{sink, recent, Schedule::prefill_and_every_step, {}});
          // The cache holds all T tokens (appended without a hook), as the official evict_for_space sees it.
          test::append_source(cache, 3, 0, T);
          policy.make_room(cache, 0, n);
          require_all_heads_keep(cache, ref::streaming_llm_evict_for_space(T, sink, recent, n));
          require_rows_intact(cache, 3);
          cache.check_invariants();
        }
      }
    }
  }
}

TEST_CASE("StreamingLLM make_room on a trimmed streaming cache equals evict_for_space applied to its slots in "
          "position order, and the next turn fits",
          "[policies][streaming_llm]") {
  for (std::uint64_t seed = 1; seed <= 40; ++seed) {
    Rng rng(seed);
    const std::int64_t sink = rng.uniform_int(0, 4), recent = rng.uniform_int(1, 10), n = rng.uniform_int(0, 14);
    INFO("seed " << seed << " sink " << sink << " recent " << recent << " n " << n);
    const CacheShape shape{1, 1, 2, 4, sink + recent + n + 1};
    Cache cache(shape);
    StreamingLLM<Cache> policy(cache, StreamingLLMConfig{sink, recent, Schedule::prefill_and_every_step, {}});
    const std::int64_t steps = rng.uniform_int(1, 40);
    for (std::int64_t t = 0; t < steps; ++t) {
      test::append_source(cache, seed, 0, 1);
      policy.on_decode(cache, 0, Obs::none());
    }
    const auto before = kept(cache, 0, 0);
    policy.make_room(cache, 0, n);
    // The official cache is the position-ordered list; its slot i holds before[i].
    const auto ref_slots = ref::streaming_llm_evict_for_space(static_cast<std::int64_t>(before.size()), sink, recent, n);
    ref::Positions want;
    for (auto i : ref_slots) want.push_back(before[static_cast<std::size_t>(i)]);
    REQUIRE(kept(cache, 0, 0) == want);
    if (n > 0) {
      const std::int64_t next = cache.next_position(0);
      test::append_source(cache, seed, 0, n);  // fits: make_room left room for the whole turn
      for (std::int64_t p = next; p < next + n; ++p) want.push_back(p);
      REQUIRE(kept(cache, 0, 0) == want);
      REQUIRE(cache.len(0, 0) <= sink + recent + std::max<std::int64_t>(0, n - recent));
    }
    cache.check_invariants();
    require_rows_intact(cache, seed);
  }
}

TEST_CASE("StreamingLLM's KVCache-Factory variant keeps the first C - w and the last w tokens at prefill (everything when "
          "S <= C) and never evicts during decode",
          "[policies][streaming_llm]") {
  for (std::int64_t C : {4, 6, 10}) {
    for (std::int64_t w : {1, 3}) {
      for (std::int64_t S : {2, 4, 6, 9, 10, 11, 20}) {
        INFO("C " << C << " w " << w << " S " << S);
        const CacheShape shape{1, 2, 4, 4, std::max(S, C) + 5};
        Cache cache(shape);
        const auto cfg = StreamingLLMConfig::kvcache_factory(C, w);
        REQUIRE(cfg.schedule == Schedule::prefill_only);
        StreamingLLM<Cache> policy(cache, cfg);
        test::append_source(cache, 1, 0, S);
        policy.on_prefill(cache, 0, Obs::none());
        ref::Positions want;
        for (std::int64_t p = 0; p < S; ++p)
          if (S <= C || p < C - w || p >= S - w) want.push_back(p);
        require_all_heads_keep(cache, want);
        const std::int64_t len = cache.len(0, 0);
        for (int step = 0; step < 5; ++step) {
          test::append_source(cache, 1, 0, 1);
          policy.on_decode(cache, 0, Obs::none());
        }
        REQUIRE(cache.len(0, 0) == len + 5);
      }
    }
  }
}

TEST_CASE("StreamingLLM's kvpress variant keeps the n_sink sinks and every position from n_sink + n_pruned on, with "
          "n_pruned = S - int(S (1 - ratio))",
          "[policies][streaming_llm]") {
  for (std::int64_t S : {5, 8, 13, 32}) {
    for (double ratio : {0.0, 0.25, 0.5, 0.7}) {
      for (std::int64_t n_sink : {1, 4}) {
        if (S <= n_sink) continue;
        INFO("S " << S << " ratio " << ratio << " n_sink " << n_sink);
        const CacheShape shape{1, 1, 1, 4, S};
        Cache cache(shape);
        const auto cfg = StreamingLLMConfig::kvpress(S, ratio, n_sink);
        if (cfg.num_sink + cfg.num_recent == 0) continue;
        StreamingLLM<Cache> policy(cache, cfg);
        test::append_source(cache, 2, 0, S);
        policy.on_prefill(cache, 0, Obs::none());
        const auto n_pruned = S - static_cast<std::int64_t>(static_cast<double>(S) * (1.0 - ratio));
        ref::Positions want;
        for (std::int64_t p = 0; p < S; ++p)
          if (p < n_sink || p >= n_sink + n_pruned) want.push_back(p);
        REQUIRE(kept(cache, 0, 0) == want);
      }
    }
  }
}

TEST_CASE("rope_position() is the next token's original position without pos-shift and its rank in the cache with it",
          "[policies][streaming_llm][rope]") {
  const CacheShape shape{2, 1, 1, 4, 16};
  Cache plain(shape), shifted(shape);
  StreamingLLM<Cache> p_plain(plain, StreamingLLMConfig{2, 4, Schedule::prefill_and_every_step, {}});
  StreamingLLM<Cache> p_shift(shifted, StreamingLLMConfig{2, 4, Schedule::prefill_and_every_step,
                                                          RopeSpec{10000.0, 4, RopeLayout::halves}});
  REQUIRE(p_plain.rope_position(plain, 0) == 0);
  REQUIRE(p_shift.rope_position(shifted, 0) == 0);
  for (std::int64_t t = 0; t < 20; ++t) {
    test::append_source(plain, 1, 0, 1);
    test::append_source(shifted, 1, 0, 1);
    p_plain.on_decode(plain, 0, Obs::none());
    p_shift.on_decode(shifted, 0, Obs::none());
    REQUIRE(p_plain.rope_position(plain, 0) == t + 1);
    REQUIRE(p_shift.rope_position(shifted, 0) == std::min<std::int64_t>(t + 1, 6));
    // Layer 1 saw no tokens.
    REQUIRE(p_plain.rope_position(plain, 1) == 0);
    REQUIRE(p_shift.rope_position(shifted, 1) == 0);
  }
}

TEST_CASE("With pos-shift, after every prefill, decode and make_room the key in each slot equals RoPE of its raw key "
          "at its rank, for both layouts and partial rotary dims, and values stay untouched",
          "[policies][streaming_llm][rope]") {
  for (std::uint64_t seed = 1; seed <= 48; ++seed) {
    Rng rng(seed);
    const std::int64_t d = rng.pick<std::int64_t>({2, 4, 8, 16});
    RopeSpec r;
    r.layout = seed % 2 == 0 ? RopeLayout::interleaved_pairs : RopeLayout::halves;
    r.rotary_dim = rng.coin(0.5) ? d : 2 * rng.uniform_int(1, d / 2);
    r.base = rng.pick({10000.0, 1000000.0});
    const std::int64_t sink = rng.uniform_int(0, 4), recent = rng.uniform_int(1, 12);
    const std::int64_t max_chunk = 6;
    const CacheShape shape{2, 2, 4, d, sink + recent + 40};
    INFO("seed " << seed << " layout " << test::describe(r.layout) << " head_dim " << d << " rotary_dim " << r.rotary_dim
                 << " sink " << sink << " recent " << recent);
    Cache cache(shape);
    StreamingLLM<Cache> policy(cache, StreamingLLMConfig{sink, recent, Schedule::prefill_and_every_step, r});
    auto rope_at = [&](std::vector<float> raw, std::int64_t pos) {
      const ref::Vec x(raw.begin(), raw.end());
      return r.layout == RopeLayout::interleaved_pairs ? ref::rope_interleaved(x, pos, r.base, r.rotary_dim)
                                                       : ref::rope_halves(x, pos, r.base, r.rotary_dim);
    };
    // The engine rotates each new key at rope_position() + t, as a pos-shift model does.
    auto append = [&](std::int64_t l, std::int64_t n) {
      const std::int64_t first = cache.next_position(l), rank0 = policy.rope_position(cache, l);
      std::vector<float> k(static_cast<std::size_t>(2 * n * d));
      const auto v = test::source_block(seed, test::Stream::value, l, 2, first, n, d);
      for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t t = 0; t < n; ++t) {
          const auto rot = rope_at(test::source_row(seed, test::Stream::key, l, h, first + t, d), rank0 + t);
          for (std::int64_t c = 0; c < d; ++c) k[static_cast<std::size_t>((h * n + t) * d + c)] = static_cast<float>(rot[static_cast<std::size_t>(c)]);
        }
      cache.append(l, test::cspan(k), test::cspan(v), n);
    };
    auto check = [&](std::int64_t l) {
      cache.check_invariants();
      for (std::int64_t h = 0; h < 2; ++h) {
        const auto pos = cache.positions(l, h);
        const auto sorted = cache.kept_positions(l, h);
        const auto keys = cache.keys(l, h), vals = cache.values(l, h);
        for (std::size_t j = 0; j < pos.size(); ++j) {
          const auto rank = std::lower_bound(sorted.begin(), sorted.end(), pos[j]) - sorted.begin();
          const auto want = rope_at(test::source_row(seed, test::Stream::key, l, h, pos[j], d), rank);
          for (std::int64_t c = 0; c < d; ++c)
            REQUIRE(std::abs(keys[j * static_cast<std::size_t>(d) + static_cast<std::size_t>(c)] - want[static_cast<std::size_t>(c)]) <= 2e-5);
          const auto sv = test::source_row(seed, test::Stream::value, l, h, pos[j], d);
          REQUIRE(std::equal(sv.begin(), sv.end(), vals.begin() + static_cast<std::ptrdiff_t>(j) * d));
        }
      }
    };
    for (std::int64_t l = 0; l < 2; ++l) {
      append(l, rng.uniform_int(1, 30));
      policy.on_prefill(cache, l, Obs::none());
      check(l);
    }
    for (int step = 0; step < 150; ++step) {
      const double u = rng.uniform();
      for (std::int64_t l = 0; l < 2; ++l) {
        if (u < 0.1) {
          const std::int64_t n = rng.uniform_int(0, max_chunk);
          policy.make_room(cache, l, n);
          check(l);
          if (n > 0) {
            append(l, n);
            policy.on_prefill(cache, l, Obs::none());
          }
        } else {
          append(l, 1);
          policy.on_decode(cache, l, Obs::none());
        }
        check(l);
      }
    }
  }
}

TEST_CASE("Without pos-shift StreamingLLM never modifies a kept key or value", "[policies][streaming_llm]") {
  const CacheShape shape{1, 2, 2, 8, 20};
  Cache cache(shape);
  StreamingLLM<Cache> policy(cache, StreamingLLMConfig{3, 9, Schedule::prefill_and_every_step, {}});
  test::append_source(cache, 21, 0, 20);
  policy.on_prefill(cache, 0, Obs::none());
  for (int t = 0; t < 100; ++t) {
    test::append_source(cache, 21, 0, 1);
    policy.on_decode(cache, 0, Obs::none());
  }
  require_rows_intact(cache, 21);
  require_all_heads_keep(cache, ref::streaming_llm_keep(120, 3, 9));
}

TEST_CASE("StreamingLLM ignores (but validates) query and probability observations", "[policies][streaming_llm]") {
  const CacheShape shape{1, 1, 2, 4, 12};
  Cache a(shape), b(shape);
  StreamingLLM<Cache> pa(a, StreamingLLMConfig{1, 4, Schedule::prefill_and_every_step, {}});
  StreamingLLM<Cache> pb(b, StreamingLLMConfig{1, 4, Schedule::prefill_and_every_step, {}});
  test::append_source(a, 4, 0, 10);
  test::append_source(b, 4, 0, 10);
  const auto q = test::source_block(4, test::Stream::query, 0, 2, 0, 3, 4);
  pa.on_prefill(a, 0, Obs::from_queries(test::cspan(q), 3));
  pb.on_prefill(b, 0, Obs::none());
  REQUIRE(a.state_hash() == b.state_hash());
  const std::vector<float> probs(2 * 1 * 8, 0.125f);
  test::append_source(a, 4, 0, 1);
  test::append_source(b, 4, 0, 1);
  pa.on_decode(a, 0, Obs::from_probs(test::cspan(probs), 1, 8));
  pb.on_decode(b, 0, Obs::none());
  REQUIRE(a.state_hash() == b.state_hash());
}

TEST_CASE("StreamingLLM reports its entries and bytes per (layer, kv_head)", "[policies][streaming_llm]") {
  const CacheShape shape{2, 3, 3, 8, 16};
  Cache cache(shape);
  StreamingLLM<Cache> policy(cache, StreamingLLMConfig{2, 5, Schedule::prefill_and_every_step, {}});
  test::append_source(cache, 1, 0, 12);
  test::append_source(cache, 1, 1, 4);
  policy.on_prefill(cache, 0, Obs::none());
  policy.on_prefill(cache, 1, Obs::none());
  const MemoryReport r = policy.report(cache);
  REQUIRE(r.policy == "streaming_llm");
  REQUIRE(r.entries_per_head == std::vector<std::int64_t>{7, 7, 7, 4, 4, 4});
  REQUIRE(r.entries == 33);
  REQUIRE(r.kv_bytes == 33 * 2 * 8 * static_cast<std::int64_t>(sizeof(float)));
  REQUIRE(r.state_bytes == 0);
  STATIC_REQUIRE(EvictionPolicy<StreamingLLM<Cache>, Cache>);
}

TEST_CASE("StreamingLLM's attend_and_decode attends and keeps ref::streaming_llm_keep, even for a non-finite query it "
          "does not read",
          "[policies][streaming_llm]") {
  const CacheShape shape{1, 2, 4, 8, 21};
  Cache cache(shape);
  StreamingLLM<Cache> policy(cache, StreamingLLMConfig{4, 16});
  std::vector<float> probs(static_cast<std::size_t>(shape.num_q_heads * shape.capacity), 0.0f);
  std::vector<float> out(static_cast<std::size_t>(shape.num_q_heads * shape.head_dim), 0.0f), ref_out = out;
  std::vector<float> ref_probs = probs;
  test::append_source(cache, 9, 0, 12);
  policy.on_prefill(cache, 0, Obs::none());
  for (std::int64_t t = 12; t < 40; ++t) {
    CAPTURE(t);
    test::append_source(cache, 9, 0, 1);
    auto q = test::source_block(9, test::Stream::query, 0, shape.num_q_heads, t, 1, shape.head_dim);
    if (t == 30) q[3] = std::numeric_limits<float>::quiet_NaN();  // the recency rule reads no probabilities
    cache.backend().attend(cache.view(0), q.data(), 0.5f, ref_probs.data(), ref_out.data());
    policy.attend_and_decode(cache, 0, test::cspan(q), 0.5f, {probs.data(), static_cast<std::int64_t>(probs.size())},
                             {out.data(), static_cast<std::int64_t>(out.size())});
    // The attention ran over the cache as it was before the eviction: the same output as attend.
    REQUIRE(std::equal(out.begin(), out.end(), ref_out.begin(), [](float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }));
    require_all_heads_keep(cache, ref::streaming_llm_keep(t + 1, 4, 16));
  }
}
