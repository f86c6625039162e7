// The re-rotation primitive (rotate_keys) against the reference RoPE: rotating a key cached at
// RoPE(p) by delta must give RoPE(p + delta), for both layouts and partial rotary dims.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "kvevict/kvevict.hpp"
#include "support/generators.hpp"
#include "support/reference.hpp"

namespace {

using namespace kvevict;
using test::Rng;
using Cache = KVCache<CpuBackend>;

ref::Vec apply_rope(const RopeSpec& r, ref::Vec x, std::int64_t pos) {
  return r.layout == RopeLayout::interleaved_pairs ? ref::rope_interleaved(std::move(x), pos, r.base, r.rotary_dim)
                                                   : ref::rope_halves(std::move(x), pos, r.base, r.rotary_dim);
}

// Fills a cache whose key at position p is RoPE(raw_p, p); returns the raw rows [kv_head][pos].
std::vector<std::vector<ref::Vec>> fill_rotated(Cache& cache, const RopeSpec& r, std::uint64_t seed, std::int64_t first_pos,
                                                std::int64_t n) {
  const CacheShape& s = cache.shape();
  std::vector<std::vector<ref::Vec>> raw(static_cast<std::size_t>(s.num_kv_heads));
  std::vector<float> k(static_cast<std::size_t>(s.num_kv_heads * n * s.head_dim)), v(k.size(), 0.5f);
  for (std::int64_t h = 0; h < s.num_kv_heads; ++h)
    for (std::int64_t t = 0; t < n; ++t) {
      const auto row = test::source_row(seed, test::Stream::key, 0, h, first_pos + t, s.head_dim);
      raw[static_cast<std::size_t>(h)].emplace_back(row.begin(), row.end());
      const auto rot = apply_rope(r, raw[static_cast<std::size_t>(h)].back(), first_pos + t);
      for (std::int64_t c = 0; c < s.head_dim; ++c)
        k[static_cast<std::size_t>((h * n + t) * s.head_dim + c)] = static_cast<float>(rot[static_cast<std::size_t>(c)]);
    }
  cache.append(0, test::cspan(k), test::cspan(v), n);
  return raw;
}

// Appends `n` tokens in capacity-sized blocks and drops them, so the next token gets position n.
void skip_positions(Cache& cache, std::int64_t n) {
  const CacheShape& s = cache.shape();
  const std::vector<std::int64_t> none(static_cast<std::size_t>(s.num_kv_heads), 0);
  const std::vector<std::int32_t> slots(static_cast<std::size_t>(s.num_kv_heads * s.capacity), 0);
  while (n > 0) {
    const std::int64_t b = std::min(n, s.capacity);
    const std::vector<float> zeros(static_cast<std::size_t>(s.num_kv_heads * b * s.head_dim), 0.0f);
    cache.append(0, test::cspan(zeros), test::cspan(zeros), b);
    cache.apply(0, KeepPlan{slots.data(), none.data()});
    n -= b;
  }
}

}  // namespace

TEST_CASE("rotate_keys by delta turns RoPE(p) into RoPE(p + delta) for keys at or past min_position, both layouts and "
          "partial rotary dims, and leaves the other keys and the pass-through dims exactly alone",
          "[backends][cpu][rope]") {
  for (std::uint64_t seed = 1; seed <= 120; ++seed) {
    INFO("seed " << seed);
    Rng rng(seed);
    const std::int64_t d = rng.pick<std::int64_t>({2, 4, 6, 8, 16, 64});
    RopeSpec r;
    r.layout = rng.pick({RopeLayout::interleaved_pairs, RopeLayout::halves});
    r.rotary_dim = rng.coin(0.5) ? d : 2 * rng.uniform_int(1, d / 2);
    r.base = rng.pick({10000.0, 500000.0, 2.5});
    INFO("head_dim " << d << " layout " << test::describe(r.layout) << " rotary_dim " << r.rotary_dim << " base " << r.base);
    const CacheShape shape{1, 2, 2, d, 24};
    Cache cache(shape);
    const std::int64_t n = rng.uniform_int(1, 24);
    // Large positions on some seeds: keys of 8k-token sequences must re-rotate as precisely.
    const std::int64_t first_pos = rng.coin(0.5) ? 0 : rng.uniform_int(1, 8000);
    skip_positions(cache, first_pos);
    const auto raw = fill_rotated(cache, r, seed, first_pos, n);
    const std::int64_t delta = rng.uniform_int(-first_pos - 3000, 3000);
    const std::int64_t min_position = rng.uniform_int(0, n);
    auto view = cache.view(0);
    const auto before = cache.keys(0, 0);
    cache.backend().rotate_keys(view, first_pos + min_position, delta, r);
    for (std::int64_t h = 0; h < 2; ++h) {
      const auto keys = cache.keys(0, h);
      const auto untouched = h == 0 ? before : keys;
      for (std::int64_t j = 0; j < n; ++j) {
        const std::int64_t p = first_pos + j;
        const bool moved = j >= min_position && delta != 0;
        const auto want = apply_rope(r, raw[static_cast<std::size_t>(h)][static_cast<std::size_t>(j)], moved ? p + delta : p);
        for (std::int64_t c = 0; c < d; ++c) {
          const float got = keys[static_cast<std::size_t>(j * d + c)];
          REQUIRE(std::abs(got - want[static_cast<std::size_t>(c)]) <= 1e-5);
          if (c >= r.rotary_dim) REQUIRE(got == static_cast<float>(raw[static_cast<std::size_t>(h)][static_cast<std::size_t>(j)][static_cast<std::size_t>(c)]));
          if (h == 0 && !moved) REQUIRE(got == untouched[static_cast<std::size_t>(j * d + c)]);
        }
      }
    }
  }
}

TEST_CASE("rotate_keys by delta then by -delta restores the keys within 1e-5, and delta 0 changes no bit",
          "[backends][cpu][rope]") {
  for (RopeLayout layout : {RopeLayout::interleaved_pairs, RopeLayout::halves}) {
    const CacheShape shape{1, 1, 1, 16, 32};
    Cache cache(shape);
    test::append_source(cache, 3, 0, 32);
    const RopeSpec r{10000.0, 12, layout};
    const auto original = cache.keys(0, 0);
    cache.backend().rotate_keys(cache.view(0), 0, 0, r);
    REQUIRE(cache.keys(0, 0) == original);
    cache.backend().rotate_keys(cache.view(0), 0, 4321, r);
    REQUIRE(cache.keys(0, 0) != original);
    cache.backend().rotate_keys(cache.view(0), 0, -4321, r);
    const auto back = cache.keys(0, 0);
    for (std::size_t i = 0; i < back.size(); ++i) REQUIRE(std::abs(back[i] - original[i]) <= 1e-5);
  }
}

TEST_CASE("rotate_keys composes: rotating by a then by b equals rotating by a + b", "[backends][cpu][rope]") {
  const CacheShape shape{1, 1, 1, 8, 16};
  Cache one(shape), two(shape);
  test::append_source(one, 11, 0, 16);
  test::append_source(two, 11, 0, 16);
  const RopeSpec r{500000.0, 8, RopeLayout::halves};
  one.backend().rotate_keys(one.view(0), 0, 37, r);
  one.backend().rotate_keys(one.view(0), 0, -5, r);
  two.backend().rotate_keys(two.view(0), 0, 32, r);
  const auto a = one.keys(0, 0), b = two.keys(0, 0);
  for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(std::abs(a[i] - b[i]) <= 1e-5);
}

TEST_CASE("RopeSpec::check rejects an odd, zero, negative or too large rotary_dim and a base <= 1, naming the field",
          "[core][rope]") {
  for (std::int64_t rd : {-2, 0, 3, 7, 10}) {
    INFO("rotary_dim " << rd);
    const RopeSpec r{10000.0, rd, RopeLayout::halves};
    test::require_throws_exactly<ArgumentError>([&] { r.check("test", 8); }, "rope.rotary_dim");
  }
  for (double base : {1.0, 0.5, -3.0, std::nan("")}) {
    const RopeSpec r{base, 8, RopeLayout::interleaved_pairs};
    test::require_throws_exactly<ArgumentError>([&] { r.check("test", 8); }, "rope.base");
  }
  REQUIRE_NOTHROW(RopeSpec{10000.0, 2, RopeLayout::halves}.check("test", 8));
  REQUIRE_NOTHROW(RopeSpec{10000.0, 8, RopeLayout::halves}.check("test", 8));
}

TEST_CASE("CpuBackend::rotate_keys rejects an odd or too large rotary_dim and a base <= 1 before rotating anything",
          "[backends][cpu][rope]") {
  // A full cache: a rotary_dim past head_dim would otherwise write into the next slot, or past the
  // buffer at the last one.
  Cache cache(CacheShape{1, 2, 2, 8, 6});
  test::append_source(cache, 5, 0, 6);
  const std::uint64_t before = cache.state_hash();
  for (const auto& [rd, needle] : {std::pair<std::int64_t, const char*>{7, "'rope.rotary_dim' = 7"},
                                   {10, "'rope.rotary_dim' = 10"}, {0, "'rope.rotary_dim' = 0"}}) {
    const RopeSpec r{10000.0, rd, RopeLayout::interleaved_pairs};
    test::require_throws_exactly<ArgumentError>([&] { cache.backend().rotate_keys(cache.view(0), 0, 3, r); }, needle);
    REQUIRE(cache.state_hash() == before);
  }
  const RopeSpec bad_base{1.0, 8, RopeLayout::halves};
  test::require_throws_exactly<ArgumentError>([&] { cache.backend().rotate_keys(cache.view(0), 0, 3, bad_base); },
                                              "'rope.base' = 1");
  REQUIRE(cache.state_hash() == before);
}
