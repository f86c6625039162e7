// PyramidKV budget arithmetic against the worked examples of specs/snapkv_pyramidkv.md (KVCache-Factory
// integer formula and its three regimes, kvpress's float formula with banker's rounding and its SnapKV
// fallback) and kvpress's int(S (1 - ratio)), both on the budget parts and end to end through the
// policies. Expected values are the spec's literals or worked out by hand in the comments.
#include <catch2/catch.hpp>

#include <cstdint>
#include <vector>

#include "kvevict/kvevict.hpp"
#include "support/generators.hpp"

namespace {

using namespace kvevict;
using Cache = KVCache<CpuBackend>;
using Obs = Observation<float, HostSpace>;

CacheShape one_layer_shape(std::int64_t layers, std::int64_t capacity) { return CacheShape{layers, 1, 1, 4, capacity}; }

// Appends S source tokens to every layer and runs on_prefill with the last w queries.
template <class Policy>
void prefill(Cache& cache, Policy& policy, std::int64_t S, std::int64_t w) {
  for (std::int64_t l = 0; l < cache.shape().num_layers; ++l) {
    test::append_source(cache, 11, l, S);
    const auto q = test::source_block(11, test::Stream::query, l, cache.shape().num_q_heads, S - w, w, cache.shape().head_dim);
    policy.on_prefill(cache, l, Obs::from_queries(test::cspan(q), w));
  }
}

}  // namespace

TEST_CASE("PyramidKV with C 512, w 8, 32 layers and S >= 1008 keeps B_l = 983 - 30 l non-window entries, 16576 in all",
          "[policy][pyramidkv][budget]") {
  const PyramidBudget b{.capacity = 512, .window = 8, .beta = 20, .num_model_layers = 32};
  REQUIRE_NOTHROW(b.check("test", one_layer_shape(32, 4096), 8));
  for (std::int64_t S : {1008, 1009, 2048, 100000}) {
    CAPTURE(S);
    std::int64_t total = 0;
    for (std::int64_t l = 0; l < 32; ++l) {
      CHECK(b.entries(l, S) == 983 - 30 * l + 8);
      total += b.entries(l, S) - 8;
    }
    CHECK(total == 16576);  // vs 32 * (512 - 8) = 16128 uniform (+2.8 %)
  }
}

TEST_CASE("PyramidKV's three regimes: S < C keeps all, C <= S < 2(C - w) keeps C in every layer, then the pyramid",
          "[policy][pyramidkv][budget]") {
  const PyramidBudget b{.capacity = 512, .window = 8, .beta = 20, .num_model_layers = 32};
  for (std::int64_t l : {0, 7, 31}) {
    CAPTURE(l);
    CHECK(b.entries(l, 1) == 1);
    CHECK(b.entries(l, 511) == 511);  // S < C: no compression
    CHECK(b.entries(l, 512) == 512);  // S == C: uniform branch (the reference only reorders)
    CHECK(b.entries(l, 700) == 512);
    CHECK(b.entries(l, 1007) == 512);  // 2(C - w) - 1: still uniform, not pyramidal
    CHECK(b.entries(l, 1008) == 991 - 30 * l);
  }
}

TEST_CASE("PyramidKV caps max_num at S - w when (C - w) // beta < w: C 128, w 8 at S 240..242, not at 243",
          "[policy][pyramidkv][budget]") {
  const PyramidBudget b{.capacity = 128, .window = 8, .beta = 20, .num_model_layers = 32};
  // min = 120 // 20 = 6, max = 240 - 6 = 234. S = 240: 234 >= 232 caps max = 232, min = 240 - 232 = 8,
  // steps = 224 // 31 = 7: layer 0 keeps 232 + 8 = 240 (everything), layer 31 keeps 232 - 217 + 8 = 23.
  CHECK(b.entries(0, 240) == 240);
  CHECK(b.entries(31, 240) == 23);
  // S = 242: max = 234, min = 6, steps = 228 // 31 = 7: layer 0 keeps 242 (everything), layer 31 25.
  CHECK(b.entries(0, 242) == 242);
  CHECK(b.entries(31, 242) == 25);
  // S = 243: 234 < 235, no cap: layer 0 keeps 234 + 8 = 242 of 243.
  CHECK(b.entries(0, 243) == 242);
  CHECK(b.entries(31, 243) == 25);
}

TEST_CASE("PyramidKV with C 64, w 8, S 300 in a 32-layer model keeps 118, 73 and 25 entries in layers 0, 15 and 31",
          "[policy][pyramidkv][budget]") {
  Cache cache(CacheShape{3, 2, 4, 8, 300});
  PyramidKV<Cache> policy(cache, PyramidKVConfig{.capacity = 64,
                                                 .scoring = WindowScoring{.window = 8, .kernel = 7, .pool = PoolKind::max},
                                                 .num_model_layers = 32,
                                                 .layer_ids = {0, 15, 31}});
  prefill(cache, policy, 300, 8);
  for (std::int64_t h = 0; h < 2; ++h) {
    CHECK(cache.len(0, h) == 118);
    CHECK(cache.len(1, h) == 73);
    CHECK(cache.len(2, h) == 25);
  }
  CHECK_NOTHROW(cache.check_invariants());
}

TEST_CASE("PyramidKV with C 512, w 64, S 1536 keeps 938 entries in layer 0 of 32, far above C", "[policy][pyramidkv][budget]") {
  Cache cache(CacheShape{2, 1, 1, 4, 1536});
  PyramidKV<Cache> policy(cache, PyramidKVConfig{.capacity = 512,
                                                 .scoring = WindowScoring{.window = 64, .kernel = 5},
                                                 .num_model_layers = 32,
                                                 .layer_ids = {0, 31}});
  prefill(cache, policy, 1536, 64);
  CHECK(cache.len(0, 0) == 938);
  // min = 448 // 20 = 22, max = 874, steps = 852 // 31 = 27: layer 31 keeps 874 - 837 + 64 = 101.
  CHECK(cache.len(1, 0) == 101);
  // The window is always resident.
  for (std::int64_t l = 0; l < 2; ++l) {
    const auto p = cache.kept_positions(l, 0);
    for (std::int32_t t = 0; t < 64; ++t) CHECK(p[p.size() - 64 + static_cast<std::size_t>(t)] == 1536 - 64 + t);
  }
}

TEST_CASE("PyramidKVPress uses float budgets with banker's rounding and falls back to round(S (1 - ratio))",
          "[policy][pyramidkv][kvpress][budget]") {
  // ratio 0.5, w 16, S 256, 4 layers: C' = 144, min = 6.4, max = 249.6 >= 240 caps max = 240, min = 16;
  // 256 >= 240 >= 16 >= 16 holds, steps = 224 / 3: 240, 165.33, 90.67, 16.
  const PyramidPressBudget b{.compression_ratio = 0.5, .window = 16, .beta = 20.0, .num_model_layers = 4};
  CHECK(b.entries(0, 256) == 240);
  CHECK(b.entries(1, 256) == 165);
  CHECK(b.entries(2, 256) == 91);
  CHECK(b.entries(3, 256) == 16);
  // Fallbacks: min = S (1 - ratio) / beta < w.
  const PyramidPressBudget f1{.compression_ratio = 0.7, .window = 32, .beta = 20.0, .num_model_layers = 32};
  CHECK(f1.entries(0, 320) == 96);
  CHECK(f1.entries(31, 320) == 96);
  const PyramidPressBudget f2{.compression_ratio = 0.1, .window = 32, .beta = 20.0, .num_model_layers = 2};
  CHECK(f2.entries(0, 128) == 115);  // round(115.2)
  // Python's round is half to even: round(2.5) = 2, round(3.5) = 4 (C round() would give 3 and 4).
  // Ratio 0.75, w 1: S 10 gives min = 2.5 / 20 < 1, a fallback to round(2.5); S 14 to round(3.5).
  const PyramidPressBudget half{.compression_ratio = 0.75, .window = 1, .beta = 20.0, .num_model_layers = 2};
  CHECK(half.entries(0, 10) == 2);
  CHECK(half.entries(1, 10) == 2);
  CHECK(half.entries(0, 14) == 4);
  // In the pyramid branch too: ratio 0.5, w 16, S 253, 3 layers: max = 237, min = 16, steps = 110.5,
  // layer 1 = 126.5 -> 126.
  const PyramidPressBudget mid{.compression_ratio = 0.5, .window = 16, .beta = 20.0, .num_model_layers = 3};
  CHECK(mid.entries(0, 253) == 237);
  CHECK(mid.entries(1, 253) == 126);
  CHECK(mid.entries(2, 253) == 16);
  // Ratio 0: unchanged.
  const PyramidPressBudget none{.compression_ratio = 0.0, .window = 16, .beta = 20.0, .num_model_layers = 4};
  CHECK(none.entries(2, 256) == 256);
}

TEST_CASE("kvpress presses keep int(S (1 - ratio)) entries: 63 of 100 at 0.37, 9 of 96 and 6 of 64 at 0.9",
          "[policy][kvpress][budget]") {
  CHECK(RatioBudget{0.37}.entries(0, 100) == 63);
  CHECK(RatioBudget{0.9}.entries(0, 96) == 9);
  CHECK(RatioBudget{0.9}.entries(0, 64) == 6);
  CHECK(RatioBudget{0.5}.entries(0, 128) == 64);
  CHECK(RatioBudget{0.0}.entries(0, 77) == 77);
  // End to end: the window is padded, not protected, so 6 < w = 8 keeps the 6 oldest window tokens.
  Cache cache(CacheShape{1, 1, 2, 8, 64});
  SnapKVPress<Cache> policy(cache, SnapKVPressConfig{.compression_ratio = 0.9, .window = 8, .kernel = 5});
  prefill(cache, policy, 64, 8);
  CHECK(cache.kept_positions(0, 0) == std::vector<std::int32_t>{56, 57, 58, 59, 60, 61});
}
