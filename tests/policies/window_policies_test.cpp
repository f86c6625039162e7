// SnapKV, PyramidKV, their kvpress presses, TOVA (+ press), Knorm and KeyDiff (+ presses) over
// seeded random configurations. After every hook: invariants, kept K/V rows equal to their source
// rows, the expected count per head, protected entries kept, and the kept set a valid top-k of a
// naive double-precision reference of the policy's scores computed on the entries resident before
// the hook (README §5.7's rule with a float tolerance). Also decode re-scoring, AdaKV-style per-head
// budgets, TOVA at decode, the tie rule, and bad input leaving the cache untouched.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "kvevict/kvevict.hpp"
#include "support/generators.hpp"

namespace {

using namespace kvevict;
using test::cspan;
using test::Rng;
using test::Stream;
using Cache = KVCache<CpuBackend>;
using Obs = Observation<float, HostSpace>;
using Positions = std::vector<std::int32_t>;

constexpr float kQueryAmp = 2.5f;  // sharper attention than unit-range queries give

std::vector<double> row_of(std::uint64_t seed, Stream stream, std::int64_t layer, std::int64_t head, std::int64_t pos,
                           std::int64_t d, float amp = 1.0f) {
  const auto r = test::source_row(seed, stream, layer, head, pos, d, amp);
  return {r.begin(), r.end()};
}
double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Query rows [q_head, n, head_dim] of positions first .. first + n - 1.
std::vector<float> queries(std::uint64_t seed, const CacheShape& s, std::int64_t layer, std::int64_t first, std::int64_t n) {
  return test::source_block(seed, Stream::query, layer, s.num_q_heads, first, n, s.head_dim, kQueryAmp);
}

// Resident positions of every (layer, kv_head), ascending.
using Snapshot = std::vector<std::vector<Positions>>;
Snapshot snapshot(const Cache& c) {
  Snapshot s(static_cast<std::size_t>(c.shape().num_layers));
  for (std::int64_t l = 0; l < c.shape().num_layers; ++l)
    for (std::int64_t h = 0; h < c.shape().num_kv_heads; ++h) s[static_cast<std::size_t>(l)].push_back(c.kept_positions(l, h));
  return s;
}

// Invariants hold and every resident K/V row is the source row of its position, bit for bit.
void check_intact(const Cache& cache, std::uint64_t seed) {
  REQUIRE_NOTHROW(cache.check_invariants());
  const auto& s = cache.shape();
  std::int64_t bad = 0;
  for (std::int64_t l = 0; l < s.num_layers; ++l)
    for (std::int64_t h = 0; h < s.num_kv_heads; ++h) {
      const auto pos = cache.positions(l, h);
      const auto k = cache.keys(l, h), v = cache.values(l, h);
      for (std::size_t j = 0; j < pos.size(); ++j) {
        const auto kr = test::source_row(seed, Stream::key, l, h, pos[j], s.head_dim);
        const auto vr = test::source_row(seed, Stream::value, l, h, pos[j], s.head_dim);
        for (std::int64_t e = 0; e < s.head_dim; ++e)
          bad += (k[j * static_cast<std::size_t>(s.head_dim) + static_cast<std::size_t>(e)] != kr[static_cast<std::size_t>(e)]) +
                 (v[j * static_cast<std::size_t>(s.head_dim) + static_cast<std::size_t>(e)] != vr[static_cast<std::size_t>(e)]);
      }
    }
  CHECK(bad == 0);
}

// README §5.7 with a float tolerance: `after` (ascending) holds `count` entries of `before`, every
// protected one first (the oldest ones when count < #protected), and no dropped unprotected entry
// outscores a kept one by more than `tol` under the reference scores (aligned with `before`).
void check_selection(const Positions& before, const Positions& after, const std::vector<double>& ref, std::int64_t count,
                     const std::function<bool(std::int64_t)>& protects, double tol) {
  INFO("before " << before.size() << " entries, kept " << after.size() << ", expected " << count);
  REQUIRE(static_cast<std::int64_t>(after.size()) == count);
  const std::set<std::int32_t> kept(after.begin(), after.end());
  for (std::int32_t p : after) CHECK(std::binary_search(before.begin(), before.end(), p));
  std::int64_t num_protected = 0;
  for (std::int32_t p : before) num_protected += protects(p) ? 1 : 0;
  std::int64_t seen_protected = 0;
  double min_kept = std::numeric_limits<double>::infinity(), max_dropped = -std::numeric_limits<double>::infinity();
  for (std::size_t j = 0; j < before.size(); ++j) {
    const bool in = kept.count(before[j]) != 0;
    if (protects(before[j])) {
      // All protected are kept; with fewer slots than protected entries, the oldest are (tie rule).
      CHECK(in == (seen_protected < count));
      ++seen_protected;
      continue;
    }
    if (in) min_kept = std::min(min_kept, ref[j]);
    else max_dropped = std::max(max_dropped, ref[j]);
  }
  if (num_protected > count) return;
  INFO("lowest kept reference score " << min_kept << ", highest dropped " << max_dropped << ", tolerance " << tol);
  CHECK(min_kept >= max_dropped - tol);
}

double tolerance(const std::vector<double>& ref, double rel) {
  double m = 0.0;
  for (double v : ref) m = std::max(m, std::abs(v));
  return rel * m + 1e-9;
}

// ---- naive references of the scores (double) ----

struct RefWindow {
  std::int64_t window = 0, kernel = 1;
  PoolKind pool = PoolKind::avg;
  GroupAgg agg = GroupAgg::mean;
  AggregationPoint point = AggregationPoint::before_pool;
};

std::vector<double> ref_pool(const std::vector<double>& x, std::int64_t m, std::int64_t k, PoolKind kind) {
  std::vector<double> y = x;
  for (std::int64_t j = 0; j < m; ++j) {
    double acc = 0.0, mx = -std::numeric_limits<double>::infinity();
    for (std::int64_t t = std::max<std::int64_t>(0, j - k / 2); t <= std::min(m - 1, j + k / 2); ++t) {
      acc += x[static_cast<std::size_t>(t)];
      mx = std::max(mx, x[static_cast<std::size_t>(t)]);
    }
    y[static_cast<std::size_t>(j)] = kind == PoolKind::avg ? acc / static_cast<double>(k) : mx;
  }
  return y;
}

// SnapKV-family scores of the resident positions `res` (ascending) of (layer, kv_head): per q-head
// of the group, the column sums of the causal softmax of the queries at positions qfirst ..
// qfirst + nq - 1; reduced over the group and pooled over the non-window entries (all but the last
// `window` of res, in position order), in the configured order.
std::vector<double> ref_window_scores(std::uint64_t seed, const CacheShape& s, std::int64_t layer, std::int64_t kvh,
                                      const Positions& res, std::int64_t qfirst, std::int64_t nq, const RefWindow& cfg) {
  const std::int64_t g = s.group_size(), n = static_cast<std::int64_t>(res.size());
  const std::int64_t m = std::max<std::int64_t>(0, n - cfg.window);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  std::vector<std::vector<double>> keys;
  for (std::int32_t p : res) keys.push_back(row_of(seed, Stream::key, layer, kvh, p, s.head_dim));
  std::vector<std::vector<double>> per_q;
  for (std::int64_t r = 0; r < g; ++r) {
    const std::int64_t qh = kvh * g + r;
    std::vector<double> sums(static_cast<std::size_t>(n), 0.0);
    for (std::int64_t i = 0; i < nq; ++i) {
      const std::int64_t qp = qfirst + i;
      const auto q = row_of(seed, Stream::query, layer, qh, qp, s.head_dim, kQueryAmp);
      double mx = -std::numeric_limits<double>::infinity();
      std::vector<double> logit(static_cast<std::size_t>(n));
      for (std::int64_t j = 0; j < n; ++j)
        if (res[static_cast<std::size_t>(j)] <= qp) mx = std::max(mx, logit[static_cast<std::size_t>(j)] = dot(q, keys[static_cast<std::size_t>(j)]) * scale);
      if (mx == -std::numeric_limits<double>::infinity()) continue;
      double z = 0.0;
      for (std::int64_t j = 0; j < n; ++j)
        if (res[static_cast<std::size_t>(j)] <= qp) z += std::exp(logit[static_cast<std::size_t>(j)] - mx);
      for (std::int64_t j = 0; j < n; ++j)
        if (res[static_cast<std::size_t>(j)] <= qp) sums[static_cast<std::size_t>(j)] += std::exp(logit[static_cast<std::size_t>(j)] - mx) / z;
    }
    per_q.push_back(sums);
  }
  auto reduce = [&](const std::vector<std::vector<double>>& rows, GroupAgg agg) {
    std::vector<double> out = rows[0];
    for (std::size_t r = 1; r < rows.size(); ++r)
      for (std::size_t j = 0; j < out.size(); ++j)
        out[j] = agg == GroupAgg::max ? std::max(out[j], rows[r][j]) : out[j] + rows[r][j];
    if (agg == GroupAgg::mean)
      for (double& v : out) v /= static_cast<double>(rows.size());
    return out;
  };
  if (cfg.point == AggregationPoint::before_pool) return ref_pool(reduce(per_q, cfg.agg), m, cfg.kernel, cfg.pool);
  for (auto& row : per_q) row = ref_pool(row, m, cfg.kernel, cfg.pool);
  return reduce(per_q, cfg.agg);
}

// TOVA: the query at qpos, softmax over every resident entry, averaged over ALL q-heads of the layer.
std::vector<double> ref_tova_scores(std::uint64_t seed, const CacheShape& s, std::int64_t layer, const Positions& res,
                                    std::int64_t qpos) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  std::vector<double> mean(res.size(), 0.0);
  for (std::int64_t qh = 0; qh < s.num_q_heads; ++qh) {
    const auto q = row_of(seed, Stream::query, layer, qh, qpos, s.head_dim, kQueryAmp);
    std::vector<double> logit;
    for (std::int32_t p : res) logit.push_back(dot(q, row_of(seed, Stream::key, layer, qh / s.group_size(), p, s.head_dim)) * scale);
    const double mx = *std::max_element(logit.begin(), logit.end());
    double z = 0.0;
    for (double v : logit) z += std::exp(v - mx);
    for (std::size_t j = 0; j < res.size(); ++j) mean[j] += std::exp(logit[j] - mx) / z / static_cast<double>(s.num_q_heads);
  }
  return mean;
}

std::vector<double> ref_key_scores(std::uint64_t seed, const CacheShape& s, std::int64_t layer, std::int64_t kvh,
                                   const Positions& res, KeyScore kind) {
  std::vector<std::vector<double>> keys;
  for (std::int32_t p : res) keys.push_back(row_of(seed, Stream::key, layer, kvh, p, s.head_dim));
  std::vector<double> out;
  if (kind == KeyScore::norm) {
    for (const auto& k : keys) out.push_back(-std::sqrt(dot(k, k)));
    return out;
  }
  std::vector<double> anchor(static_cast<std::size_t>(s.head_dim), 0.0);
  for (const auto& k : keys)
    for (std::size_t e = 0; e < k.size(); ++e) anchor[e] += k[e] / std::max(std::sqrt(dot(k, k)), 1e-12) / static_cast<double>(keys.size());
  for (const auto& k : keys) out.push_back(-dot(k, anchor) / (std::sqrt(dot(k, k)) * std::sqrt(dot(anchor, anchor))));
  return out;
}

// ---- naive budgets (from the spec's formulas) ----

std::int64_t ref_pyramid_entries(std::int64_t C, std::int64_t w, std::int64_t beta, std::int64_t L, std::int64_t id, std::int64_t S) {
  if (S < C) return S;
  if (S < 2 * (C - w)) return C;
  std::int64_t min_num = (C - w) / beta, max_num = 2 * (C - w) - min_num;
  if (max_num >= S - w) {
    max_num = S - w;
    min_num = 2 * (C - w) - max_num;
  }
  return max_num - id * ((max_num - min_num) / (L - 1)) + w;
}

double round_half_even(double x) {
  const double f = std::floor(x), diff = x - f;
  if (diff > 0.5) return f + 1.0;
  if (diff < 0.5) return f;
  return std::fmod(f, 2.0) == 0.0 ? f : f + 1.0;
}
std::int64_t ref_pyramid_press_entries(double cr, std::int64_t w, double beta, std::int64_t L, std::int64_t id, std::int64_t S) {
  if (cr == 0.0) return S;
  const double q = static_cast<double>(S), wd = static_cast<double>(w);
  const double cap = wd + q * (1.0 - cr);
  double min_num = (cap - wd) / beta, max_num = (cap - wd) * 2.0 - min_num;
  if (max_num >= q - wd) {
    max_num = q - wd;
    min_num = (cap - wd) * 2.0 - max_num;
  }
  if (!(q >= max_num && max_num >= min_num && min_num >= wd)) return static_cast<std::int64_t>(round_half_even(q * (1.0 - cr)));
  return static_cast<std::int64_t>(round_half_even(max_num - static_cast<double>(id) * ((max_num - min_num) / static_cast<double>(L - 1))));
}

std::int64_t ratio_entries(double cr, std::int64_t S) { return static_cast<std::int64_t>(static_cast<double>(S) * (1.0 - cr)); }

// ---- the driver ----

// What one configuration runs: S prompt tokens, then `steps` decode tokens; what the policy keeps.
struct Run {
  std::int64_t prompt = 0;
  std::int64_t prefill_queries = 0;  // window queries given at prefill (0: an empty observation)
  std::int64_t steps = 0;
  bool decode_queries = false;       // the step's query at decode (else an empty observation)
  // Reference scores of (layer, kv_head) over `res` before the hook; `decode_step` 0 = prefill.
  std::function<std::vector<double>(std::int64_t layer, std::int64_t kvh, const Positions& res, std::int64_t decode_step)> ref;
  // Entries kept per head after the hook, given the count before it.
  std::function<std::int64_t(std::int64_t layer, std::int64_t before, std::int64_t decode_step)> count;
  // Positions the hook must not evict, given the layer's next position.
  std::function<bool(std::int64_t pos, std::int64_t next)> protects;
  double rel_tol = 1e-5;
  bool same_positions_across_heads = false;  // TOVA: one keep set per layer
};

template <class Policy>
void drive(Cache& cache, Policy& policy, std::uint64_t seed, const Run& run) {
  const auto& s = cache.shape();
  auto check_hook = [&](const Snapshot& before, std::int64_t step) {
    const Snapshot after = snapshot(cache);
    for (std::int64_t l = 0; l < s.num_layers; ++l) {
      const std::int64_t next = cache.next_position(l);
      for (std::int64_t h = 0; h < s.num_kv_heads; ++h) {
        INFO("layer " << l << " kv_head " << h << " decode step " << step);
        const auto& b = before[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)];
        const auto& a = after[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)];
        const std::int64_t count = run.count(l, static_cast<std::int64_t>(b.size()), step);
        if (count == static_cast<std::int64_t>(b.size())) {
          CHECK(a == b);
          continue;
        }
        const auto ref = run.ref(l, h, b, step);
        check_selection(b, a, ref, count, [&](std::int64_t p) { return run.protects(p, next); }, tolerance(ref, run.rel_tol));
        if (run.same_positions_across_heads) CHECK(a == after[static_cast<std::size_t>(l)][0]);
      }
    }
    check_intact(cache, seed);
  };

  for (std::int64_t l = 0; l < s.num_layers; ++l) test::append_source(cache, seed, l, run.prompt);
  Snapshot before = snapshot(cache);
  for (std::int64_t l = 0; l < s.num_layers; ++l) {
    if (run.prefill_queries > 0) {
      const auto q = queries(seed, s, l, run.prompt - run.prefill_queries, run.prefill_queries);
      policy.on_prefill(cache, l, Obs::from_queries(cspan(q), run.prefill_queries));
    } else {
      policy.on_prefill(cache, l, Obs::none());
    }
  }
  check_hook(before, 0);
  for (std::int64_t t = 1; t <= run.steps; ++t) {
    for (std::int64_t l = 0; l < s.num_layers; ++l) test::append_source(cache, seed, l, 1);
    before = snapshot(cache);
    for (std::int64_t l = 0; l < s.num_layers; ++l) {
      if (run.decode_queries) {
        const auto q = queries(seed, s, l, cache.next_position(l) - 1, 1);
        policy.on_decode(cache, l, Obs::from_queries(cspan(q), 1));
      } else {
        policy.on_decode(cache, l, Obs::none());
      }
    }
    check_hook(before, t);
  }
  // The report mirrors the cache.
  const MemoryReport rep = policy.report(cache);
  CHECK(rep.entries == cache.entries_kept());
  CHECK(rep.kv_bytes == cache.bytes_kept());
  std::size_t i = 0;
  for (std::int64_t l = 0; l < s.num_layers; ++l)
    for (std::int64_t h = 0; h < s.num_kv_heads; ++h) CHECK(rep.entries_per_head.at(i++) == cache.len(l, h));
}

CacheShape sweep_shape(Rng& rng, std::int64_t capacity) {
  CacheShape s;
  s.num_layers = rng.uniform_int(1, 2);
  s.num_kv_heads = rng.uniform_int(1, 3);
  s.num_q_heads = s.num_kv_heads * rng.pick<std::int64_t>({1, 2, 4});
  s.head_dim = rng.pick<std::int64_t>({4, 8, 16});
  s.capacity = capacity;
  return s;
}

RefWindow random_window(Rng& rng) {
  RefWindow w;
  w.window = rng.uniform_int(1, 12);
  w.kernel = rng.pick<std::int64_t>({1, 3, 5, 7});
  w.pool = rng.coin(0.5) ? PoolKind::avg : PoolKind::max;
  w.agg = rng.pick<GroupAgg>({GroupAgg::mean, GroupAgg::max, GroupAgg::sum});
  w.point = rng.coin(0.5) ? AggregationPoint::before_pool : AggregationPoint::after_pool;
  return w;
}
WindowScoring to_scoring(const RefWindow& w) { return WindowScoring{w.window, w.kernel, w.pool, w.agg, w.point}; }

constexpr std::uint64_t kSeeds = 40;

}  // namespace

TEST_CASE("SnapKV at prefill keeps the window plus a valid top C - w of the reference window scores, every GQA mode",
          "[policy][snapkv][sweep]") {
  for (std::uint64_t seed = 1; seed <= kSeeds; ++seed) {
    CAPTURE(seed);
    Rng rng(seed);
    const RefWindow w = random_window(rng);
    const std::int64_t C = w.window + rng.uniform_int(1, 40), S = rng.uniform_int(1, C + 80);
    Cache cache(sweep_shape(rng, std::max(S, C)));
    CAPTURE(test::describe(cache.shape()), w.window, w.kernel, w.pool == PoolKind::avg, test::describe(w.agg),
            w.point == AggregationPoint::before_pool, C, S);
    SnapKV<Cache> policy(cache, SnapKVConfig{.capacity = C, .scoring = to_scoring(w)});
    Run run;
    run.prompt = S;
    run.prefill_queries = std::min(w.window, S);
    run.ref = [&](std::int64_t l, std::int64_t h, const Positions& res, std::int64_t) {
      return ref_window_scores(seed, cache.shape(), l, h, res, S - run.prefill_queries, run.prefill_queries, w);
    };
    run.count = [&](std::int64_t, std::int64_t before, std::int64_t) { return std::min(before, C); };
    run.protects = [&](std::int64_t p, std::int64_t next) { return p >= next - w.window; };
    drive(cache, policy, seed, run);
  }
}

TEST_CASE("SnapKV re-scoring every N decode steps keeps C entries after each Nth step, the window, and the reference top-k",
          "[policy][snapkv][decode][sweep]") {
  for (std::uint64_t seed = 1; seed <= kSeeds; ++seed) {
    CAPTURE(seed);
    Rng rng(1000 + seed);
    const RefWindow w = random_window(rng);
    const std::int64_t C = w.window + rng.uniform_int(1, 30), S = rng.uniform_int(C, C + 60);
    const std::int64_t interval = rng.pick<std::int64_t>({1, 2, 3, 7}), steps = rng.uniform_int(1, 3 * w.window + 5);
    Cache cache(sweep_shape(rng, S + steps));
    CAPTURE(test::describe(cache.shape()), w.window, w.kernel, w.pool == PoolKind::avg, test::describe(w.agg),
            w.point == AggregationPoint::before_pool, C, S, interval, steps);
    SnapKV<Cache> policy(cache, SnapKVConfig{.capacity = C,
                                             .scoring = to_scoring(w),
                                             .schedule = Schedule::prefill_and_every_n_steps,
                                             .decode_interval = interval});
    Run run;
    run.prompt = S;
    run.prefill_queries = w.window;
    run.steps = steps;
    run.decode_queries = true;
    run.ref = [&](std::int64_t l, std::int64_t h, const Positions& res, std::int64_t step) {
      if (step == 0) return ref_window_scores(seed, cache.shape(), l, h, res, S - w.window, w.window, w);
      // Re-scoring uses the last min(step, w) decode queries (the scorer's ring buffer).
      const std::int64_t nq = std::min(step, w.window);
      return ref_window_scores(seed, cache.shape(), l, h, res, S + step - nq, nq, w);
    };
    run.count = [&](std::int64_t, std::int64_t before, std::int64_t step) {
      return step == 0 || step % interval == 0 ? std::min(before, C) : before;
    };
    run.protects = [&](std::int64_t p, std::int64_t next) { return p >= next - w.window; };
    drive(cache, policy, seed, run);
  }
}

TEST_CASE("PyramidKV keeps the integer pyramid budget of each layer's model index, the window and the reference top-k",
          "[policy][pyramidkv][sweep]") {
  for (std::uint64_t seed = 1; seed <= kSeeds; ++seed) {
    CAPTURE(seed);
    Rng rng(2000 + seed);
    const RefWindow w = random_window(rng);
    const std::int64_t C = w.window + rng.uniform_int(1, 40), beta = rng.pick<std::int64_t>({1, 2, 5, 20});
    const std::int64_t S = rng.uniform_int(1, 3 * C + 20);
    Cache cache(sweep_shape(rng, S));
    const std::int64_t L = cache.shape().num_layers + rng.uniform_int(1, 30);
    std::vector<std::int64_t> ids;
    for (std::int64_t l = 0; l < cache.shape().num_layers; ++l) ids.push_back(rng.uniform_int(0, L - 1));
    CAPTURE(test::describe(cache.shape()), w.window, w.kernel, C, S, beta, L, ids);
    PyramidKV<Cache> policy(cache, PyramidKVConfig{.capacity = C, .scoring = to_scoring(w), .beta = beta, .num_model_layers = L, .layer_ids = ids});
    Run run;
    run.prompt = S;
    run.prefill_queries = std::min(w.window, S);
    run.ref = [&](std::int64_t l, std::int64_t h, const Positions& res, std::int64_t) {
      return ref_window_scores(seed, cache.shape(), l, h, res, S - run.prefill_queries, run.prefill_queries, w);
    };
    run.count = [&](std::int64_t l, std::int64_t before, std::int64_t) {
      return std::min(before, ref_pyramid_entries(C, w.window, beta, L, ids[static_cast<std::size_t>(l)], before));
    };
    run.protects = [&](std::int64_t p, std::int64_t next) { return p >= next - w.window; };
    drive(cache, policy, seed, run);
  }
}

TEST_CASE("SnapKVPress and PyramidKVPress keep int or rounded ratio budgets, the window first, and the reference top-k",
          "[policy][snapkv][pyramidkv][kvpress][sweep]") {
  for (std::uint64_t seed = 1; seed <= 2 * kSeeds; ++seed) {
    CAPTURE(seed);
    Rng rng(3000 + seed);
    const bool pyramid = seed % 2 == 0;
    RefWindow w;
    w.window = rng.uniform_int(1, 16);
    w.kernel = rng.pick<std::int64_t>({1, 3, 5, 7});
    w.point = AggregationPoint::after_pool;
    const double cr = rng.pick<double>({0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.95});
    const double beta = rng.pick<double>({1.0, 2.0, 20.0});
    const std::int64_t S = w.window + rng.uniform_int(1, 150);
    Cache cache(sweep_shape(rng, S));
    const std::int64_t L = cache.shape().num_layers + rng.uniform_int(1, 30);
    std::vector<std::int64_t> ids;
    for (std::int64_t l = 0; l < cache.shape().num_layers; ++l) ids.push_back(rng.uniform_int(0, L - 1));
    CAPTURE(pyramid, test::describe(cache.shape()), w.window, w.kernel, cr, beta, S, L, ids);
    Run run;
    run.prompt = S;
    run.prefill_queries = w.window;
    run.ref = [&](std::int64_t l, std::int64_t h, const Positions& res, std::int64_t) {
      return ref_window_scores(seed, cache.shape(), l, h, res, S - w.window, w.window, w);
    };
    run.count = [&](std::int64_t l, std::int64_t before, std::int64_t) {
      return pyramid ? ref_pyramid_press_entries(cr, w.window, beta, L, ids[static_cast<std::size_t>(l)], before)
                     : ratio_entries(cr, before);
    };
    run.protects = [&](std::int64_t p, std::int64_t next) { return p >= next - w.window; };
    if (pyramid) {
      PyramidKVPress<Cache> policy(cache, PyramidKVPressConfig{.compression_ratio = cr, .window = w.window, .kernel = w.kernel,
                                                               .beta = beta, .num_model_layers = L, .layer_ids = ids});
      drive(cache, policy, seed, run);
    } else {
      SnapKVPress<Cache> policy(cache, SnapKVPressConfig{.compression_ratio = cr, .window = w.window, .kernel = w.kernel});
      drive(cache, policy, seed, run);
    }
  }
}

TEST_CASE("TOVA evicts exactly one entry per decode step, the same position from every kv-head, the reference's lowest",
          "[policy][tova][decode][sweep]") {
  for (std::uint64_t seed = 1; seed <= kSeeds; ++seed) {
    CAPTURE(seed);
    Rng rng(4000 + seed);
    const std::int64_t budget = rng.uniform_int(1, 40), S = rng.uniform_int(1, budget + 40), steps = rng.uniform_int(1, 50);
    Cache cache(sweep_shape(rng, std::max(S + steps, budget)));
    CAPTURE(test::describe(cache.shape()), budget, S, steps);
    TOVA<Cache> policy(cache, TOVAConfig{.cache_size = budget});
    Run run;
    run.prompt = S;
    run.prefill_queries = 1;  // the prompt's last token
    run.steps = steps;
    run.decode_queries = true;
    run.same_positions_across_heads = true;
    run.ref = [&](std::int64_t l, std::int64_t, const Positions& res, std::int64_t step) {
      return ref_tova_scores(seed, cache.shape(), l, res, S - 1 + step);
    };
    run.count = [&](std::int64_t, std::int64_t before, std::int64_t step) {
      const std::int64_t kept = std::min(before, budget);
      if (step > 0 && before > budget) CHECK(before == budget + 1);  // one eviction per step
      return kept;
    };
    run.protects = [](std::int64_t, std::int64_t) { return false; };
    drive(cache, policy, seed, run);
  }
}

TEST_CASE("TOVAPress keeps int(S (1 - ratio)) entries per layer, the last token first, one keep set for all kv-heads",
          "[policy][tova][kvpress][sweep]") {
  for (std::uint64_t seed = 1; seed <= kSeeds; ++seed) {
    CAPTURE(seed);
    Rng rng(5000 + seed);
    const double cr = rng.pick<double>({0.0, 0.3, 0.5, 0.75, 0.9, 0.99});
    const std::int64_t S = rng.uniform_int(1, 200);
    Cache cache(sweep_shape(rng, S));
    CAPTURE(test::describe(cache.shape()), cr, S);
    TOVAPress<Cache> policy(cache, TOVAPressConfig{.compression_ratio = cr});
    Run run;
    run.prompt = S;
    run.prefill_queries = 1;
    run.same_positions_across_heads = true;
    run.ref = [&](std::int64_t l, std::int64_t, const Positions& res, std::int64_t) { return ref_tova_scores(seed, cache.shape(), l, res, S - 1); };
    run.count = [&](std::int64_t, std::int64_t before, std::int64_t) { return ratio_entries(cr, before); };
    run.protects = [](std::int64_t p, std::int64_t next) { return p == next - 1; };
    drive(cache, policy, seed, run);
  }
}

TEST_CASE("Knorm and KeyDiff keep sinks, the recent window and the reference's best keys, at prefill and every decode step",
          "[policy][keyscore][decode][sweep]") {
  for (std::uint64_t seed = 1; seed <= 2 * kSeeds; ++seed) {
    CAPTURE(seed);
    Rng rng(6000 + seed);
    const KeyScore kind = seed % 2 == 0 ? KeyScore::norm : KeyScore::diff;
    const std::int64_t sink = rng.uniform_int(0, 4), recent = rng.uniform_int(0, 8);
    const std::int64_t budget = sink + recent + rng.uniform_int(rng.coin(0.2) ? 0 : 1, 30);
    const std::int64_t S = rng.uniform_int(1, budget + 60), steps = rng.uniform_int(0, 40);
    const Schedule schedule = rng.coin(0.3) ? Schedule::prefill_only : Schedule::prefill_and_every_step;
    Cache cache(sweep_shape(rng, std::max(S + steps, budget)));
    CAPTURE(kind == KeyScore::norm, test::describe(cache.shape()), sink, recent, budget, S, steps, schedule == Schedule::prefill_only);
    const KeyScoreConfig cfg{.budget = budget, .num_sink = sink, .num_recent = recent, .schedule = schedule};
    Run run;
    run.prompt = S;
    run.steps = steps;
    run.ref = [&](std::int64_t l, std::int64_t h, const Positions& res, std::int64_t) { return ref_key_scores(seed, cache.shape(), l, h, res, kind); };
    run.count = [&](std::int64_t, std::int64_t before, std::int64_t step) {
      return step > 0 && schedule == Schedule::prefill_only ? before : std::min(before, budget);
    };
    run.protects = [&](std::int64_t p, std::int64_t next) { return p < sink || p >= next - recent; };
    if (kind == KeyScore::norm) {
      Knorm<Cache> policy(cache, cfg);
      drive(cache, policy, seed, run);
    } else {
      KeyDiff<Cache> policy(cache, cfg);
      drive(cache, policy, seed, run);
    }
  }
}

TEST_CASE("KnormPress and KeyDiffPress keep int(S (1 - ratio)) keys per kv-head chosen by the reference scores",
          "[policy][keyscore][kvpress][sweep]") {
  for (std::uint64_t seed = 1; seed <= 2 * kSeeds; ++seed) {
    CAPTURE(seed);
    Rng rng(7000 + seed);
    const KeyScore kind = seed % 2 == 0 ? KeyScore::norm : KeyScore::diff;
    const double cr = rng.pick<double>({0.0, 0.2, 0.37, 0.5, 0.8, 0.9});
    const std::int64_t S = rng.uniform_int(1, 200);
    Cache cache(sweep_shape(rng, S));
    CAPTURE(kind == KeyScore::norm, test::describe(cache.shape()), cr, S);
    Run run;
    run.prompt = S;
    run.ref = [&](std::int64_t l, std::int64_t h, const Positions& res, std::int64_t) { return ref_key_scores(seed, cache.shape(), l, h, res, kind); };
    run.count = [&](std::int64_t, std::int64_t before, std::int64_t) { return ratio_entries(cr, before); };
    run.protects = [](std::int64_t, std::int64_t) { return false; };
    if (kind == KeyScore::norm) {
      KnormPress<Cache> policy(cache, KeyScorePressConfig{.compression_ratio = cr});
      drive(cache, policy, seed, run);
    } else {
      KeyDiffPress<Cache> policy(cache, KeyScorePressConfig{.compression_ratio = cr});
      drive(cache, policy, seed, run);
    }
  }
}

namespace {

// AdaKV-style allocation of one layer (README-free reconstruction documented on HeadAllocation):
// each head's kept set is a valid top-k of its own reference scores; beyond each head's floor,
// no dropped entry of any head outranks a kept one by more than `tol` (one layer-wide ranking).
void check_adaptive_layer(const std::vector<Positions>& before, const std::vector<Positions>& after,
                          const std::vector<std::vector<double>>& ref, std::int64_t floor,
                          const std::function<bool(std::int64_t)>& protects, double tol) {
  double min_pool_kept = std::numeric_limits<double>::infinity(), max_dropped = -std::numeric_limits<double>::infinity();
  for (std::size_t h = 0; h < before.size(); ++h) {
    INFO("kv_head " << h);
    const std::set<std::int32_t> kept(after[h].begin(), after[h].end());
    std::vector<double> kept_scores;
    std::int64_t cand = 0;
    for (std::size_t j = 0; j < before[h].size(); ++j) {
      const std::int32_t p = before[h][j];
      if (protects(p)) {
        CHECK(kept.count(p) == 1);
        continue;
      }
      ++cand;
      if (kept.count(p) != 0) kept_scores.push_back(ref[h][j]);
      else max_dropped = std::max(max_dropped, ref[h][j]);
    }
    for (std::int32_t p : after[h]) CHECK(std::binary_search(before[h].begin(), before[h].end(), p));
    CHECK(static_cast<std::int64_t>(kept_scores.size()) >= std::min(floor, cand));
    std::sort(kept_scores.rbegin(), kept_scores.rend());
    for (std::size_t r = static_cast<std::size_t>(std::min<std::int64_t>(floor, static_cast<std::int64_t>(kept_scores.size())));
         r < kept_scores.size(); ++r)
      min_pool_kept = std::min(min_pool_kept, kept_scores[r]);
    // Within the head: a valid top-k of its own scores.
    if (!kept_scores.empty()) {
      double own_dropped = -std::numeric_limits<double>::infinity();
      for (std::size_t j = 0; j < before[h].size(); ++j)
        if (!protects(before[h][j]) && kept.count(before[h][j]) == 0) own_dropped = std::max(own_dropped, ref[h][j]);
      CHECK(kept_scores.back() >= own_dropped - tol);
    }
  }
  INFO("lowest kept above the floors " << min_pool_kept << ", highest dropped " << max_dropped);
  CHECK(min_pool_kept >= max_dropped - tol);
}

}  // namespace

TEST_CASE("Adaptive head budgets keep heads x C entries per layer in heads of different lengths, floors first, one layer-wide ranking",
          "[policy][snapkv][adaptive][sweep]") {
  std::int64_t unequal_layers = 0;
  for (std::uint64_t seed = 1; seed <= kSeeds; ++seed) {
    CAPTURE(seed);
    Rng rng(8000 + seed);
    RefWindow w = random_window(rng);
    const std::int64_t C = w.window + rng.uniform_int(2, 30), S = rng.uniform_int(C + 1, C + 80);
    const double alpha = rng.pick<double>({0.0, 0.2, 0.5, 1.0});
    const bool decode = rng.coin(0.5);
    const std::int64_t interval = rng.pick<std::int64_t>({1, 4}), steps = decode ? rng.uniform_int(1, 20) : 0;
    CacheShape shape = sweep_shape(rng, S + steps);
    shape.num_kv_heads = rng.uniform_int(2, 4);
    shape.num_q_heads = shape.num_kv_heads * rng.pick<std::int64_t>({1, 2});
    Cache cache(shape);
    const std::int64_t floor = static_cast<std::int64_t>(alpha * static_cast<double>(C - w.window));
    CAPTURE(test::describe(shape), w.window, w.kernel, w.pool == PoolKind::avg, test::describe(w.agg), C, S, alpha, interval, steps);
    SnapKV<Cache> policy(cache, SnapKVConfig{.capacity = C,
                                             .scoring = to_scoring(w),
                                             .schedule = decode ? Schedule::prefill_and_every_n_steps : Schedule::prefill_only,
                                             .decode_interval = interval,
                                             .head_allocation = HeadAllocation{.adaptive = true, .floor_alpha = alpha}});
    auto check_layers = [&](const Snapshot& before, std::int64_t step) {
      const Snapshot after = snapshot(cache);
      for (std::int64_t l = 0; l < shape.num_layers; ++l) {
        INFO("layer " << l << " decode step " << step);
        const std::int64_t next = cache.next_position(l);
        std::vector<std::vector<double>> ref;
        double scale = 0.0;
        std::int64_t total = 0;
        for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) {
          const auto& b = before[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)];
          const std::int64_t nq = step == 0 ? w.window : std::min(step, w.window);
          ref.push_back(ref_window_scores(seed, shape, l, h, b, next - nq, nq, w));
          for (double v : ref.back()) scale = std::max(scale, std::abs(v));
          const std::int64_t len = cache.len(l, h);
          total += len;
          CHECK(len >= w.window + floor);
        }
        CHECK(total == shape.num_kv_heads * C);
        check_adaptive_layer(before[static_cast<std::size_t>(l)], after[static_cast<std::size_t>(l)], ref, floor,
                             [&](std::int64_t p) { return p >= next - w.window; }, 1e-5 * scale + 1e-9);
        const auto lens = cache.lens(l);
        if (std::adjacent_find(lens.begin(), lens.end(), std::not_equal_to<>()) != lens.end()) ++unequal_layers;
      }
      check_intact(cache, seed);
    };
    for (std::int64_t l = 0; l < shape.num_layers; ++l) test::append_source(cache, seed, l, S);
    Snapshot before = snapshot(cache);
    for (std::int64_t l = 0; l < shape.num_layers; ++l) {
      const auto q = queries(seed, shape, l, S - w.window, w.window);
      policy.on_prefill(cache, l, Obs::from_queries(cspan(q), w.window));
    }
    check_layers(before, 0);
    for (std::int64_t t = 1; t <= steps; ++t) {
      for (std::int64_t l = 0; l < shape.num_layers; ++l) test::append_source(cache, seed, l, 1);
      before = snapshot(cache);
      for (std::int64_t l = 0; l < shape.num_layers; ++l) {
        const auto q = queries(seed, shape, l, cache.next_position(l) - 1, 1);
        policy.on_decode(cache, l, Obs::from_queries(cspan(q), 1));
      }
      if (t % interval == 0) {
        check_layers(before, t);
      } else {  // grew by one per head, nothing evicted
        for (std::int64_t l = 0; l < shape.num_layers; ++l)
          for (std::int64_t h = 0; h < shape.num_kv_heads; ++h)
            CHECK(cache.kept_positions(l, h) == before[static_cast<std::size_t>(l)][static_cast<std::size_t>(h)]);
      }
    }
    // The report shows the saving: heads x C per layer where a full cache would hold every token.
    const MemoryReport rep = policy.report(cache);
    if (steps % interval == 0) CHECK(rep.entries == shape.num_layers * shape.num_kv_heads * C);
    CHECK(rep.entries < shape.num_layers * shape.num_kv_heads * (S + steps));
    CHECK(rep.kv_bytes == rep.entries * 2 * shape.head_dim * static_cast<std::int64_t>(sizeof(float)));
    std::int64_t sum = 0;
    for (std::int64_t e : rep.entries_per_head) sum += e;
    CHECK(sum == rep.entries);
  }
  CHECK(unequal_layers > 0);
}

TEST_CASE("Equal scores keep the oldest positions: SnapKV and SnapKVPress with uniform attention, TOVA evicting the newcomer",
          "[policy][snapkv][tova][ties]") {
  const std::int64_t S = 40, w = 6, C = 16, d = 8;
  const std::vector<float> zero_q(static_cast<std::size_t>(4 * w * d), 0.0f);  // every visible key equally likely
  auto expected = [](std::int64_t kept_old, std::int64_t first_window) {
    std::vector<std::int32_t> p;
    for (std::int32_t i = 0; i < kept_old; ++i) p.push_back(i);
    for (std::int32_t i = static_cast<std::int32_t>(first_window); i < S; ++i) p.push_back(i);
    return p;
  };
  for (const auto& [kernel, pool] : {std::pair{1, PoolKind::avg}, std::pair{5, PoolKind::max}}) {
    CAPTURE(kernel);
    Cache cache(CacheShape{1, 2, 4, d, S});
    SnapKV<Cache> policy(cache, SnapKVConfig{.capacity = C, .scoring = WindowScoring{.window = w, .kernel = kernel, .pool = pool}});
    test::append_source(cache, 3, 0, S);
    policy.on_prefill(cache, 0, Obs::from_queries(cspan(zero_q), w));
    for (std::int64_t h = 0; h < 2; ++h) CHECK(cache.kept_positions(0, h) == expected(C - w, S - w));
  }
  {
    Cache cache(CacheShape{1, 2, 4, d, S});
    SnapKVPress<Cache> policy(cache, SnapKVPressConfig{.compression_ratio = 0.5, .window = w, .kernel = 1});
    test::append_source(cache, 3, 0, S);
    policy.on_prefill(cache, 0, Obs::from_queries(cspan(zero_q), w));
    for (std::int64_t h = 0; h < 2; ++h) CHECK(cache.kept_positions(0, h) == expected(20 - w, S - w));
  }
  {
    Cache cache(CacheShape{1, 2, 4, d, S + 1});
    TOVA<Cache> policy(cache, TOVAConfig{.cache_size = C});
    test::append_source(cache, 3, 0, S);
    const std::vector<float> one(static_cast<std::size_t>(4 * d), 0.0f);
    policy.on_prefill(cache, 0, Obs::from_queries(cspan(one), 1));
    for (std::int64_t h = 0; h < 2; ++h) CHECK(cache.kept_positions(0, h) == expected(C, S));
    // A tie at decode evicts the last of (score desc, position asc): the newest entry.
    test::append_source(cache, 3, 0, 1);
    policy.on_decode(cache, 0, Obs::from_queries(cspan(one), 1));
    for (std::int64_t h = 0; h < 2; ++h) CHECK(cache.kept_positions(0, h) == expected(C, S));
  }
}

TEST_CASE("TOVA's decode trajectory equals an independent naive TOVA simulation, position for position",
          "[policy][tova][decode]") {
  for (std::uint64_t seed = 1; seed <= 12; ++seed) {
    CAPTURE(seed);
    Rng rng(9000 + seed);
    const std::int64_t budget = rng.uniform_int(2, 30), S = rng.uniform_int(1, budget + 30), steps = 60;
    Cache cache(sweep_shape(rng, std::max(S + steps, budget)));
    const CacheShape& shape = cache.shape();
    CAPTURE(test::describe(shape), budget, S);
    TOVA<Cache> policy(cache, TOVAConfig{.cache_size = budget});
    // The naive model: one resident list per layer; keep the top `budget` by (score desc, pos asc).
    std::vector<Positions> model(static_cast<std::size_t>(shape.num_layers));
    auto model_evict = [&](std::int64_t l, std::int64_t qpos) {
      auto& res = model[static_cast<std::size_t>(l)];
      if (static_cast<std::int64_t>(res.size()) <= budget) return;
      const auto sc = ref_tova_scores(seed, shape, l, res, qpos);
      std::vector<std::size_t> order(res.size());
      for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
      std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return sc[a] != sc[b] ? sc[a] > sc[b] : res[a] < res[b]; });
      // A decision within float noise would make this comparison meaningless: the seeds avoid it.
      const double gap = sc[order[static_cast<std::size_t>(budget - 1)]] - sc[order[static_cast<std::size_t>(budget)]];
      REQUIRE(gap > 1e-6 * sc[order[0]]);
      Positions kept;
      for (std::int64_t i = 0; i < budget; ++i) kept.push_back(res[order[static_cast<std::size_t>(i)]]);
      std::sort(kept.begin(), kept.end());
      res = kept;
    };
    for (std::int64_t l = 0; l < shape.num_layers; ++l) {
      test::append_source(cache, seed, l, S);
      for (std::int32_t p = 0; p < S; ++p) model[static_cast<std::size_t>(l)].push_back(p);
      const auto q = queries(seed, shape, l, S - 1, 1);
      policy.on_prefill(cache, l, Obs::from_queries(cspan(q), 1));
      model_evict(l, S - 1);
    }
    for (std::int64_t t = 0; t <= steps; ++t) {
      if (t > 0)
        for (std::int64_t l = 0; l < shape.num_layers; ++l) {
          test::append_source(cache, seed, l, 1);
          model[static_cast<std::size_t>(l)].push_back(static_cast<std::int32_t>(S + t - 1));
          const auto q = queries(seed, shape, l, S + t - 1, 1);
          policy.on_decode(cache, l, Obs::from_queries(cspan(q), 1));
          model_evict(l, S + t - 1);
        }
      for (std::int64_t l = 0; l < shape.num_layers; ++l)
        for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) {
          INFO("step " << t << " layer " << l << " kv_head " << h);
          REQUIRE(cache.kept_positions(l, h) == model[static_cast<std::size_t>(l)]);
        }
    }
    check_intact(cache, seed);
  }
}

// ---- bad input ----

namespace {

// `fn` throws exactly E naming `needle`, and the cache is byte-for-byte what it was.
template <class E, class F>
void rejects_unchanged(const Cache& cache, F&& fn, std::string_view needle) {
  const std::uint64_t before = cache.state_hash();
  test::require_throws_exactly<E>(std::forward<F>(fn), needle);
  CHECK(cache.state_hash() == before);
}

Cache filled_cache(std::int64_t layers, std::int64_t S, std::int64_t capacity) {
  Cache cache(CacheShape{layers, 2, 4, 8, capacity});
  for (std::int64_t l = 0; l < layers; ++l) test::append_source(cache, 5, l, S);
  return cache;
}

}  // namespace

TEST_CASE("An even or non-positive pooling kernel is an ArgumentError naming 'kernel' for SnapKV, PyramidKV and SnapKVPress",
          "[policy][snapkv][pyramidkv][errors]") {
  Cache cache = filled_cache(2, 30, 64);
  for (std::int64_t k : {0, 2, 4, 8, -1, -3}) {
    CAPTURE(k);
    const WindowScoring sc{.window = 4, .kernel = k};
    rejects_unchanged<ArgumentError>(cache, [&] { SnapKV<Cache> p(cache, SnapKVConfig{.capacity = 16, .scoring = sc}); }, "kernel");
    rejects_unchanged<ArgumentError>(cache, [&] { PyramidKV<Cache> p(cache, PyramidKVConfig{.capacity = 16, .scoring = sc}); }, "kernel");
    rejects_unchanged<ArgumentError>(
        cache, [&] { SnapKVPress<Cache> p(cache, SnapKVPressConfig{.compression_ratio = 0.5, .window = 4, .kernel = k}); }, "kernel");
    rejects_unchanged<ArgumentError>(
        cache, [&] { PyramidKVPress<Cache> p(cache, PyramidKVPressConfig{.compression_ratio = 0.5, .window = 4, .kernel = k}); }, "kernel");
  }
}

TEST_CASE("A window <= 0 is an ArgumentError naming 'window'", "[policy][snapkv][pyramidkv][errors]") {
  Cache cache = filled_cache(2, 30, 64);
  for (std::int64_t w : {0, -1, -32}) {
    CAPTURE(w);
    const WindowScoring sc{.window = w, .kernel = 5};
    rejects_unchanged<ArgumentError>(cache, [&] { SnapKV<Cache> p(cache, SnapKVConfig{.capacity = 16, .scoring = sc}); }, "window");
    rejects_unchanged<ArgumentError>(cache, [&] { PyramidKV<Cache> p(cache, PyramidKVConfig{.capacity = 16, .scoring = sc}); }, "window");
    rejects_unchanged<ArgumentError>(
        cache, [&] { SnapKVPress<Cache> p(cache, SnapKVPressConfig{.compression_ratio = 0.5, .window = w}); }, "window");
  }
}

TEST_CASE("PyramidKV with capacity <= window, or a model of fewer than 2 layers, is a BudgetError naming the argument",
          "[policy][pyramidkv][errors]") {
  Cache cache = filled_cache(2, 30, 64);
  for (std::int64_t C : {8, 7, 1, 0}) {
    CAPTURE(C);
    rejects_unchanged<BudgetError>(
        cache, [&] { PyramidKV<Cache> p(cache, PyramidKVConfig{.capacity = C, .scoring = WindowScoring{.window = 8}}); }, "capacity");
  }
  Cache one = filled_cache(1, 30, 64);
  rejects_unchanged<BudgetError>(
      one, [&] { PyramidKV<Cache> p(one, PyramidKVConfig{.capacity = 16, .scoring = WindowScoring{.window = 4}}); }, "num_model_layers");
  rejects_unchanged<ArgumentError>(
      cache,
      [&] {
        PyramidKV<Cache> p(cache, PyramidKVConfig{.capacity = 16, .scoring = WindowScoring{.window = 4}, .num_model_layers = 4,
                                                  .layer_ids = {0, 4}});
      },
      "layer_ids");
}

TEST_CASE("A compression_ratio outside (0, 1) is a BudgetError naming 'compression_ratio' for every press",
          "[policy][kvpress][errors]") {
  Cache cache = filled_cache(2, 30, 64);
  for (double cr : {-0.1, 1.0, 1.5, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    CAPTURE(cr);
    rejects_unchanged<BudgetError>(cache, [&] { SnapKVPress<Cache> p(cache, SnapKVPressConfig{.compression_ratio = cr}); }, "compression_ratio");
    rejects_unchanged<BudgetError>(cache, [&] { PyramidKVPress<Cache> p(cache, PyramidKVPressConfig{.compression_ratio = cr}); },
                                   "compression_ratio");
    rejects_unchanged<BudgetError>(cache, [&] { TOVAPress<Cache> p(cache, TOVAPressConfig{.compression_ratio = cr}); }, "compression_ratio");
    rejects_unchanged<BudgetError>(cache, [&] { KnormPress<Cache> p(cache, KeyScorePressConfig{.compression_ratio = cr}); },
                                   "compression_ratio");
    rejects_unchanged<BudgetError>(cache, [&] { KeyDiffPress<Cache> p(cache, KeyScorePressConfig{.compression_ratio = cr}); },
                                   "compression_ratio");
  }
}

TEST_CASE("TOVA given other than one query or probability row is an ArgumentError naming 'num_queries', cache unchanged",
          "[policy][tova][errors]") {
  Cache cache = filled_cache(1, 30, 64);
  TOVA<Cache> policy(cache, TOVAConfig{.cache_size = 16});
  TOVAPress<Cache> press(cache, TOVAPressConfig{.compression_ratio = 0.5});
  const auto q = queries(5, cache.shape(), 0, 27, 3);
  const std::vector<float> probs(static_cast<std::size_t>(4 * 2 * 30), 1.0f / 30.0f);
  rejects_unchanged<ArgumentError>(cache, [&] { policy.on_prefill(cache, 0, Obs::from_queries(cspan(q), 3)); }, "num_queries");
  rejects_unchanged<ArgumentError>(cache, [&] { press.on_prefill(cache, 0, Obs::from_queries(cspan(q), 3)); }, "num_queries");
  rejects_unchanged<ArgumentError>(cache, [&] { policy.on_prefill(cache, 0, Obs::from_probs(cspan(probs), 2, 30)); }, "num_queries");
  test::append_source(cache, 5, 0, 1);
  const std::vector<float> probs31(static_cast<std::size_t>(4 * 2 * 31), 1.0f / 31.0f);
  rejects_unchanged<ArgumentError>(cache, [&] { policy.on_decode(cache, 0, Obs::from_probs(cspan(probs31), 2, 31)); }, "num_queries");
  // The same hook with one row works.
  const auto one = queries(5, cache.shape(), 0, 30, 1);
  policy.on_decode(cache, 0, Obs::from_queries(cspan(one), 1));
  CHECK(cache.len(0, 0) == 16);
}

TEST_CASE("SnapKV re-scoring at decode from probabilities is an UnsupportedError, cache unchanged, queries then work",
          "[policy][snapkv][decode][errors]") {
  Cache cache = filled_cache(1, 30, 64);
  SnapKV<Cache> policy(cache, SnapKVConfig{.capacity = 16,
                                           .scoring = WindowScoring{.window = 4, .kernel = 3},
                                           .schedule = Schedule::prefill_and_every_n_steps,
                                           .decode_interval = 1});
  const auto w = queries(5, cache.shape(), 0, 26, 4);
  policy.on_prefill(cache, 0, Obs::from_queries(cspan(w), 4));
  REQUIRE(cache.len(0, 0) == 16);
  test::append_source(cache, 5, 0, 1);
  const std::vector<float> probs(static_cast<std::size_t>(4 * 17), 1.0f / 17.0f);
  rejects_unchanged<UnsupportedError>(cache, [&] { policy.on_decode(cache, 0, Obs::from_probs(cspan(probs), 1, 17)); }, "observation");
  const auto q = queries(5, cache.shape(), 0, 30, 1);
  policy.on_decode(cache, 0, Obs::from_queries(cspan(q), 1));
  CHECK(cache.len(0, 0) == 16);
  CHECK(cache.kept_positions(0, 0).back() == 30);
}

TEST_CASE("NaN or Inf in the observed queries is a NonFiniteError naming 'queries' and leaves the cache unchanged",
          "[policy][snapkv][pyramidkv][tova][errors]") {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    CAPTURE(bad);
    Cache cache = filled_cache(2, 30, 64);
    SnapKV<Cache> snap(cache, SnapKVConfig{.capacity = 16,
                                           .scoring = WindowScoring{.window = 4},
                                           .schedule = Schedule::prefill_and_every_n_steps});
    PyramidKV<Cache> pyramid(cache, PyramidKVConfig{.capacity = 16, .scoring = WindowScoring{.window = 4}});
    SnapKVPress<Cache> press(cache, SnapKVPressConfig{.compression_ratio = 0.5, .window = 4});
    TOVA<Cache> tova(cache, TOVAConfig{.cache_size = 16});
    auto w = queries(5, cache.shape(), 0, 26, 4);
    w[w.size() / 2] = bad;
    auto one = queries(5, cache.shape(), 0, 29, 1);
    one.back() = bad;
    rejects_unchanged<NonFiniteError>(cache, [&] { snap.on_prefill(cache, 0, Obs::from_queries(cspan(w), 4)); }, "queries");
    rejects_unchanged<NonFiniteError>(cache, [&] { pyramid.on_prefill(cache, 0, Obs::from_queries(cspan(w), 4)); }, "queries");
    rejects_unchanged<NonFiniteError>(cache, [&] { press.on_prefill(cache, 0, Obs::from_queries(cspan(w), 4)); }, "queries");
    rejects_unchanged<NonFiniteError>(cache, [&] { tova.on_prefill(cache, 0, Obs::from_queries(cspan(one), 1)); }, "queries");
    rejects_unchanged<NonFiniteError>(cache, [&] { snap.on_decode(cache, 1, Obs::from_queries(cspan(one), 1)); }, "queries");
  }
}

TEST_CASE("SnapKV given more prefill query or probability rows than its window is an ArgumentError naming 'num_queries'",
          "[policy][snapkv][errors]") {
  Cache cache = filled_cache(1, 30, 64);
  SnapKV<Cache> policy(cache, SnapKVConfig{.capacity = 16, .scoring = WindowScoring{.window = 4, .kernel = 3}});
  const auto q = queries(5, cache.shape(), 0, 25, 5);
  const std::vector<float> probs(static_cast<std::size_t>(4 * 5 * 30), 1.0f / 30.0f);
  rejects_unchanged<ArgumentError>(cache, [&] { policy.on_prefill(cache, 0, Obs::from_queries(cspan(q), 5)); }, "num_queries");
  rejects_unchanged<ArgumentError>(cache, [&] { policy.on_prefill(cache, 0, Obs::from_probs(cspan(probs), 5, 30)); }, "num_queries");
  // The window itself, or fewer rows, are accepted.
  const auto w = queries(5, cache.shape(), 0, 26, 4);
  policy.on_prefill(cache, 0, Obs::from_queries(cspan(w), 4));
  CHECK(cache.len(0, 0) == 16);
}
