// The CPU backend's observation-window primitives (WindowScoringBackend) against naive
// double-precision references written here from the specs: window_column_stats (from queries and
// from probabilities), pool_tokens, layer_mean, key_norm_scores, key_diff_scores, raise_protected
// and head_budgets. Layers are built by hand so slot order differs from position order, heads hold
// different lengths and slots are padded (slot_stride > head_dim).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "kvevict/backends/cpu/cpu_backend.hpp"
#include "support/generators.hpp"

namespace {

using namespace kvevict;
using test::Rng;

constexpr float kSentinel = -12345.0f;  // outputs beyond a head's live slots must keep it

// One layer owned by the test: [kv_head, slot, slot_stride] keys/values, [kv_head, capacity] positions.
struct ManualLayer {
  std::int64_t kv = 0, q = 0, d = 0, cap = 0, stride = 0;
  std::vector<float> keys, values;
  std::vector<std::int32_t> pos;
  std::vector<std::int64_t> lens;

  ManualLayer(std::int64_t kv_heads, std::int64_t q_heads, std::int64_t head_dim, std::int64_t capacity)
      : kv(kv_heads), q(q_heads), d(head_dim), cap(capacity), stride(head_dim + 3),
        keys(static_cast<std::size_t>(kv * cap * stride), 0.0f), values(keys.size(), 0.0f),
        pos(static_cast<std::size_t>(kv * cap), -1), lens(static_cast<std::size_t>(kv), 0) {}

  [[nodiscard]] LayerView<float> view() {
    LayerView<float> v;
    v.keys = keys.data();
    v.values = values.data();
    v.head_stride = cap * stride;
    v.slot_stride = stride;
    v.positions = pos.data();
    v.lens = lens.data();
    v.num_kv_heads = kv;
    v.num_q_heads = q;
    v.head_dim = d;
    v.capacity = cap;
    return v;
  }
  [[nodiscard]] CacheShape shape() const { return CacheShape{1, kv, q, d, cap}; }
  float& key(std::int64_t h, std::int64_t s, std::int64_t e) { return keys[static_cast<std::size_t>((h * cap + s) * stride + e)]; }
  std::int32_t& position(std::int64_t h, std::int64_t s) { return pos[static_cast<std::size_t>(h * cap + s)]; }
  std::int64_t len(std::int64_t h) const { return lens[static_cast<std::size_t>(h)]; }
};

// Random lengths in [0, cap] (at least one head non-empty), distinct positions in shuffled slot
// order, keys uniform in [-amp, amp).
ManualLayer random_layer(Rng& rng, std::int64_t kv, std::int64_t g, std::int64_t d, std::int64_t cap, float amp) {
  ManualLayer m(kv, kv * g, d, cap);
  for (std::int64_t h = 0; h < kv; ++h) {
    m.lens[static_cast<std::size_t>(h)] = rng.coin(0.15) ? 0 : rng.uniform_int(1, cap);
    std::vector<std::int32_t> p(static_cast<std::size_t>(2 * cap));
    std::iota(p.begin(), p.end(), 0);
    for (std::size_t i = p.size() - 1; i > 0; --i) std::swap(p[i], p[static_cast<std::size_t>(rng.uniform_int(0, static_cast<std::int64_t>(i)))]);
    for (std::int64_t s = 0; s < m.len(h); ++s) {
      m.position(h, s) = p[static_cast<std::size_t>(s)];
      for (std::int64_t e = 0; e < d; ++e) m.key(h, s, e) = rng.uniform_float(-amp, amp);
    }
  }
  if (std::all_of(m.lens.begin(), m.lens.end(), [](std::int64_t n) { return n == 0; })) {
    m.lens[0] = 1;
    m.position(0, 0) = 0;
  }
  return m;
}

bool close(double got, double want, double rel, double abs_floor) {
  return std::abs(got - want) <= rel * std::abs(want) + abs_floor;
}

// Walks a [q_head, cap] output: dead(at) for the slots past the q-head's kv-head length (which
// must keep their sentinel), live(qh, j, at) for the live ones.
template <class Dead, class Live>
void for_each_output_slot(const ManualLayer& m, std::int64_t cap, Dead&& dead, Live&& live) {
  const std::int64_t g = m.q / m.kv;
  for (std::int64_t qh = 0; qh < m.q; ++qh)
    for (std::int64_t j = 0; j < cap; ++j) {
      const auto at = static_cast<std::size_t>(qh * cap + j);
      if (j >= m.len(qh / g))
        dead(at);
      else
        live(qh, j, at);
    }
}

// ---- naive references (double) ----

// sums[qh][slot], sumsq[qh][slot]: query i of q-head qh (position first + i) softmaxes over the
// keys of kv-head qh / G whose position <= first + i.
struct RefStats {
  std::vector<std::vector<double>> sums, sumsq;
};
RefStats ref_window_stats(ManualLayer& m, const std::vector<float>& queries, std::int64_t nq, std::int64_t first,
                          double scale) {
  const std::int64_t g = m.q / m.kv;
  RefStats r;
  for (std::int64_t qh = 0; qh < m.q; ++qh) {
    const std::int64_t h = qh / g, n = m.len(h);
    std::vector<double> s(static_cast<std::size_t>(n), 0.0), sq(s.size(), 0.0);
    for (std::int64_t i = 0; i < nq; ++i) {
      std::vector<double> logit(s.size(), 0.0);
      double mx = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < n; ++j) {
        if (m.position(h, j) > first + i) continue;
        double dot = 0.0;
        for (std::int64_t e = 0; e < m.d; ++e)
          dot += static_cast<double>(queries[static_cast<std::size_t>((qh * nq + i) * m.d + e)]) * m.key(h, j, e);
        logit[static_cast<std::size_t>(j)] = dot * scale;
        mx = std::max(mx, dot * scale);
      }
      if (mx == -std::numeric_limits<double>::infinity()) continue;  // sees no key
      double z = 0.0;
      for (std::int64_t j = 0; j < n; ++j)
        if (m.position(h, j) <= first + i) z += std::exp(logit[static_cast<std::size_t>(j)] - mx);
      for (std::int64_t j = 0; j < n; ++j) {
        if (m.position(h, j) > first + i) continue;
        const double p = std::exp(logit[static_cast<std::size_t>(j)] - mx) / z;
        s[static_cast<std::size_t>(j)] += p;
        sq[static_cast<std::size_t>(j)] += p * p;
      }
    }
    r.sums.push_back(s);
    r.sumsq.push_back(sq);
  }
  return r;
}

// PyTorch avg_pool1d(k, stride 1, padding k/2, count_include_pad) / max_pool1d over x[0, m).
std::vector<double> ref_pool(const std::vector<double>& x, std::int64_t k, PoolKind kind) {
  const auto m = static_cast<std::int64_t>(x.size());
  std::vector<double> y(x.size());
  for (std::int64_t j = 0; j < m; ++j) {
    double acc = 0.0, mx = -std::numeric_limits<double>::infinity();
    for (std::int64_t t = j - k / 2; t <= j + k / 2; ++t) {
      if (t < 0 || t >= m) continue;  // zero padding adds nothing to the sum; max ignores it
      acc += x[static_cast<std::size_t>(t)];
      mx = std::max(mx, x[static_cast<std::size_t>(t)]);
    }
    y[static_cast<std::size_t>(j)] = kind == PoolKind::avg ? acc / static_cast<double>(k) : mx;
  }
  return y;
}

}  // namespace

TEST_CASE("window_column_stats equals a double reference of causal-by-position softmax sums and sums of squares",
          "[backend][cpu][window]") {
  for (std::uint64_t seed = 1; seed <= 40; ++seed) {
    CAPTURE(seed);
    Rng rng(seed);
    const std::int64_t kv = rng.uniform_int(1, 3), g = rng.pick<std::int64_t>({1, 2, 4}), d = rng.pick<std::int64_t>({4, 16, 33});
    const std::int64_t cap = rng.uniform_int(1, 90);
    ManualLayer m = random_layer(rng, kv, g, d, cap, 1.5f);
    // Up to 150 queries: several kQueryTile tiles; positions from before the first key to past the last.
    const std::int64_t nq = rng.pick<std::int64_t>({1, 7, 64, 65, 150});
    const std::int64_t first = rng.uniform_int(-3, 2 * cap);
    std::vector<float> queries(static_cast<std::size_t>(m.q * nq * d));
    for (float& x : queries) x = rng.uniform_float(-1.5f, 1.5f);
    const float scale = rng.coin(0.5) ? 1.0f / std::sqrt(static_cast<float>(d)) : 0.7f;
    CAPTURE(kv, g, d, cap, nq, first, scale);

    CpuBackend b;
    b.reserve(m.shape());
    std::vector<float> sums(static_cast<std::size_t>(m.q * cap), kSentinel), sumsq(sums.size(), kSentinel),
        sums_only(sums.size(), kSentinel);
    b.window_column_stats(m.view(), queries.data(), nq, first, scale, sums.data(), sumsq.data());
    b.window_column_stats(m.view(), queries.data(), nq, first, scale, sums_only.data(), nullptr);
    const RefStats ref = ref_window_stats(m, queries, nq, first, scale);
    for_each_output_slot(
        m, cap,
        [&](std::size_t at) {
          CHECK(sums[at] == kSentinel);
          CHECK(sumsq[at] == kSentinel);
        },
        [&](std::int64_t qh, std::int64_t j, std::size_t at) {
          INFO("q-head " << qh << " slot " << j << " position " << m.position(qh / g, j));
          CHECK(close(sums[at], ref.sums[static_cast<std::size_t>(qh)][static_cast<std::size_t>(j)], 2e-5, 1e-7));
          CHECK(close(sumsq[at], ref.sumsq[static_cast<std::size_t>(qh)][static_cast<std::size_t>(j)], 4e-5, 1e-7));
          CHECK(sums_only[at] == sums[at]);
        });
  }
}

TEST_CASE("window_column_stats gives zero to keys no query can see and counts a query that sees nothing as nothing",
          "[backend][cpu][window]") {
  ManualLayer m(1, 1, 2, 4);
  m.lens[0] = 4;
  const std::int32_t positions[] = {7, 2, 9, 5};
  for (std::int64_t s = 0; s < 4; ++s) {
    m.position(0, s) = positions[s];
    m.key(0, s, 0) = static_cast<float>(s);
  }
  // Queries at positions 1 (sees nothing), 2..4 (see position 2 only) and 5..6 (see 2 and 5); 7 and 9
  // are never visible.
  const std::vector<float> q(6 * 2, 0.0f);
  CpuBackend b;
  b.reserve(m.shape());
  std::vector<float> sums(4, kSentinel), sumsq(4, kSentinel);
  b.window_column_stats(m.view(), q.data(), 6, 1, 1.0f, sums.data(), sumsq.data());
  // Zero queries: uniform over the visible keys.
  CHECK(sums == std::vector<float>{0.0f, 4.0f, 0.0f, 1.0f});
  CHECK(sumsq == std::vector<float>{0.0f, 3.5f, 0.0f, 0.5f});
}

// Logits far from zero take other paths through the softmax (an exponent anchored at the row's
// maximum, a clamp, a subtraction first); these cases need them. Inputs are multiples of 1/4 so
// every dot product is exact in fp32 and the reference sees the logits the backend sees, up to
// the final scaling.
TEST_CASE("window_column_stats matches the double reference for logits beyond 43 nats, spreads beyond 88 nats and "
          "logits beyond 700000 nats",
          "[backend][cpu][window]") {
  for (std::uint64_t seed = 1; seed <= 12; ++seed) {
    CAPTURE(seed);
    Rng rng(300 + seed);
    const std::int64_t kv = rng.uniform_int(1, 2), g = rng.pick<std::int64_t>({1, 2}), d = 16;
    const std::int64_t cap = rng.uniform_int(9, 80), nq = rng.pick<std::int64_t>({3, 33, 70});
    ManualLayer m = random_layer(rng, kv, g, d, cap, 1.0f);
    const bool huge = seed % 3 == 0;  // one key dominates each row by far more than 2^20 octaves
    for (std::int64_t h = 0; h < kv; ++h)
      for (std::int64_t s = 0; s < m.len(h); ++s)
        for (std::int64_t e = 0; e < d; ++e)
          m.key(h, s, e) = huge ? (e == 0 ? static_cast<float>(rng.uniform_int(-40, 40)) : 0.0f)
                                : static_cast<float>(rng.uniform_int(-16, 16)) * 0.25f;
    std::vector<float> queries(static_cast<std::size_t>(m.q * nq * d));
    for (std::size_t i = 0; i < queries.size(); ++i)
      queries[i] = huge ? (i % static_cast<std::size_t>(d) == 0 ? 0x1p22f : 0.0f)
                        : static_cast<float>(rng.uniform_int(-16, 16)) * 0.25f;
    const std::int64_t first = rng.uniform_int(-2, 2 * cap);
    const float scale = huge ? 1.0f : rng.pick<float>({0.5f, 1.0f});
    CAPTURE(kv, g, cap, nq, first, scale, huge);

    CpuBackend b;
    b.reserve(m.shape());
    std::vector<float> sums(static_cast<std::size_t>(m.q * cap), kSentinel), sumsq(sums.size(), kSentinel);
    b.window_column_stats(m.view(), queries.data(), nq, first, scale, sums.data(), sumsq.data());
    const RefStats ref = ref_window_stats(m, queries, nq, first, scale);
    for_each_output_slot(
        m, cap, [&](std::size_t at) { CHECK(sums[at] == kSentinel); },
        [&](std::int64_t qh, std::int64_t j, std::size_t at) {
          INFO("q-head " << qh << " slot " << j << " position " << m.position(qh / g, j));
          // Logits up to ~200 nats: fp32 rounding of the scaled logit alone is ~1e-5 relative.
          CHECK(close(sums[at], ref.sums[static_cast<std::size_t>(qh)][static_cast<std::size_t>(j)], 5e-5, 1e-7));
          CHECK(close(sumsq[at], ref.sumsq[static_cast<std::size_t>(qh)][static_cast<std::size_t>(j)], 1e-4, 1e-7));
        });
  }
}

TEST_CASE("a key 60 nats below every other leaves the other keys' window statistics bit-identical",
          "[backend][cpu][window]") {
  // Its probability is ~1e-26 of the row's, far below fp32 resolution, yet its logit moves the
  // softmax off its small-logit path: both paths must give the same bits. Keys are multiples of 1/8,
  // so every logit is exact whatever order the GEMM sums in (Eigen's order depends on the shape).
  for (std::uint64_t seed = 1; seed <= 8; ++seed) {
    CAPTURE(seed);
    Rng rng(400 + seed);
    const std::int64_t d = 8, n = rng.uniform_int(8, 70), nq = rng.pick<std::int64_t>({5, 40});
    ManualLayer without(1, 2, d, n + 1), with(1, 2, d, n + 1);
    without.lens[0] = n;
    with.lens[0] = n + 1;
    for (std::int64_t s = 0; s < n; ++s) {
      const auto p = static_cast<std::int32_t>(rng.uniform_int(0, 3 * n));
      without.position(0, s) = with.position(0, s) = p;
      for (std::int64_t e = 0; e < d; ++e)
        without.key(0, s, e) = with.key(0, s, e) = static_cast<float>(rng.uniform_int(0, 7)) * 0.125f;
    }
    with.position(0, n) = 0;  // seen by every query
    with.key(0, n, 0) = -60.0f;
    std::vector<float> queries(static_cast<std::size_t>(2 * nq * d));
    for (std::size_t i = 0; i < queries.size(); ++i) queries[i] = i % static_cast<std::size_t>(d) == 0 ? 1.0f : 0.5f;
    const std::int64_t first = rng.uniform_int(0, 3 * n);
    CAPTURE(n, nq, first);
    CpuBackend b;
    b.reserve(with.shape());
    std::vector<float> s0(static_cast<std::size_t>(2 * (n + 1))), q0(s0.size()), s1(s0.size()), q1(s0.size());
    b.window_column_stats(without.view(), queries.data(), nq, first, 1.0f, s0.data(), q0.data());
    b.window_column_stats(with.view(), queries.data(), nq, first, 1.0f, s1.data(), q1.data());
    for (std::int64_t qh = 0; qh < 2; ++qh)
      for (std::int64_t j = 0; j < n; ++j) {
        const auto at = static_cast<std::size_t>(qh * (n + 1) + j);
        CHECK(s1[at] == s0[at]);
        CHECK(q1[at] == q0[at]);
      }
  }
}

TEST_CASE("window_column_stats_from_probs sums given probability rows and their squares over live slots only",
          "[backend][cpu][window]") {
  for (std::uint64_t seed = 1; seed <= 20; ++seed) {
    CAPTURE(seed);
    Rng rng(100 + seed);
    const std::int64_t kv = rng.uniform_int(1, 3), g = rng.pick<std::int64_t>({1, 2, 3}), cap = rng.uniform_int(1, 50);
    ManualLayer m = random_layer(rng, kv, g, 4, cap, 1.0f);
    const std::int64_t nq = rng.uniform_int(1, 70), stride = cap + rng.uniform_int(0, 5);
    std::vector<float> probs(static_cast<std::size_t>(m.q * nq * stride));
    for (float& p : probs) p = rng.uniform_float(0.0f, 1.0f);
    CpuBackend b;
    b.reserve(m.shape());
    std::vector<float> sums(static_cast<std::size_t>(m.q * cap), kSentinel), sumsq(sums.size(), kSentinel);
    b.window_column_stats_from_probs(m.view(), probs.data(), nq, stride, sums.data(), sumsq.data());
    for_each_output_slot(
        m, cap, [&](std::size_t at) { CHECK(sums[at] == kSentinel); },
        [&](std::int64_t qh, std::int64_t j, std::size_t at) {
          double s = 0.0, sq = 0.0;
          for (std::int64_t i = 0; i < nq; ++i) {
            const double p = probs[static_cast<std::size_t>((qh * nq + i) * stride + j)];
            s += p;
            sq += p * p;
          }
          CHECK(close(sums[at], s, 1e-5, 1e-7));
          CHECK(close(sumsq[at], sq, 1e-5, 1e-7));
        });
  }
}

TEST_CASE("window statistics from probabilities equal those from the queries that produced them",
          "[backend][cpu][window]") {
  Rng rng(7);
  ManualLayer m = random_layer(rng, 2, 2, 8, 30, 1.0f);
  m.lens = {30, 30};
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t s = 0; s < 30; ++s) {
      m.position(h, s) = static_cast<std::int32_t>(29 - s);  // reversed slot order
      for (std::int64_t e = 0; e < 8; ++e) m.key(h, s, e) = rng.uniform_float(-1, 1);
    }
  const std::int64_t nq = 6, first = 24;
  std::vector<float> q(static_cast<std::size_t>(4 * nq * 8));
  for (float& x : q) x = rng.uniform_float(-1, 1);
  // The engine's probabilities: causal softmax rows, slot-aligned, computed in double (one query at
  // a time) then rounded to float.
  std::vector<float> probs(static_cast<std::size_t>(4 * nq * 30), 0.0f);
  for (std::int64_t qh = 0; qh < 4; ++qh)
    for (std::int64_t i = 0; i < nq; ++i) {
      std::vector<float> single(static_cast<std::size_t>(4 * 8), 0.0f);
      for (std::int64_t e = 0; e < 8; ++e)
        single[static_cast<std::size_t>(qh * 8 + e)] = q[static_cast<std::size_t>((qh * nq + i) * 8 + e)];
      const RefStats r = ref_window_stats(m, single, 1, first + i, 0.5);
      for (std::int64_t j = 0; j < 30; ++j)
        probs[static_cast<std::size_t>((qh * nq + i) * 30 + j)] =
            static_cast<float>(r.sums[static_cast<std::size_t>(qh)][static_cast<std::size_t>(j)]);
    }
  CpuBackend b;
  b.reserve(m.shape());
  std::vector<float> from_q(4 * 30), from_p(4 * 30), sq_q(4 * 30), sq_p(4 * 30);
  b.window_column_stats(m.view(), q.data(), nq, first, 0.5f, from_q.data(), sq_q.data());
  b.window_column_stats_from_probs(m.view(), probs.data(), nq, 30, from_p.data(), sq_p.data());
  for (std::size_t i = 0; i < from_q.size(); ++i) {
    CHECK(close(from_q[i], from_p[i], 2e-5, 1e-7));
    CHECK(close(sq_q[i], sq_p[i], 4e-5, 1e-7));
  }
}

TEST_CASE("avg pooling of an all-ones length-5 row with kernel 5 gives .6 .8 1 .8 .6 (zero padding, divide by k)",
          "[backend][cpu][window][pool]") {
  ManualLayer m(1, 1, 1, 8);
  m.lens[0] = 7;
  std::vector<float> in(8, 1.0f), out(8, kSentinel);
  in[5] = 42.0f;  // slots >= span are copied through, never pooled
  in[6] = -3.0f;
  const std::int64_t span = 5;
  CpuBackend b;
  b.reserve(m.shape());
  b.pool_tokens(m.view(), in.data(), out.data(), 1, &span, 5, PoolKind::avg);
  CHECK(out[0] == Approx(0.6).epsilon(1e-6));
  CHECK(out[1] == Approx(0.8).epsilon(1e-6));
  CHECK(out[2] == Approx(1.0).epsilon(1e-6));
  CHECK(out[3] == Approx(0.8).epsilon(1e-6));
  CHECK(out[4] == Approx(0.6).epsilon(1e-6));
  CHECK(out[5] == 42.0f);
  CHECK(out[6] == -3.0f);
  CHECK(out[7] == kSentinel);
}

TEST_CASE("max pooling ignores padding: negative rows keep their edge values instead of a padded zero",
          "[backend][cpu][window][pool]") {
  ManualLayer m(1, 1, 1, 6);
  m.lens[0] = 6;
  const std::vector<float> in = {-5.f, -1.f, -7.f, -2.f, -9.f, 100.f};
  std::vector<float> out(6, kSentinel);
  const std::int64_t span = 5;
  CpuBackend b;
  b.reserve(m.shape());
  b.pool_tokens(m.view(), in.data(), out.data(), 1, &span, 3, PoolKind::max);
  // The window slot (100) is outside [0, span) and must not leak into position 4.
  CHECK(out == std::vector<float>{-1.f, -1.f, -1.f, -2.f, -2.f, 100.f});
}

TEST_CASE("pool_tokens equals PyTorch-style avg and max pooling over (0, span) for every row of every kv-head",
          "[backend][cpu][window][pool]") {
  for (std::uint64_t seed = 1; seed <= 60; ++seed) {
    CAPTURE(seed);
    Rng rng(300 + seed);
    const std::int64_t kv = rng.uniform_int(1, 3), rows = rng.uniform_int(1, 4), cap = rng.uniform_int(1, 40);
    const std::int64_t k = rng.pick<std::int64_t>({1, 3, 5, 7, 9, 41});
    const PoolKind kind = rng.coin(0.5) ? PoolKind::avg : PoolKind::max;
    ManualLayer m(kv, kv * rows, 1, cap);
    std::vector<std::int64_t> span(static_cast<std::size_t>(kv));
    for (std::int64_t h = 0; h < kv; ++h) {
      m.lens[static_cast<std::size_t>(h)] = rng.uniform_int(0, cap);
      span[static_cast<std::size_t>(h)] = rng.uniform_int(0, cap + 3);  // may exceed len: clamped
    }
    std::vector<float> in(static_cast<std::size_t>(kv * rows * cap)), out(in.size(), kSentinel);
    for (float& x : in) x = rng.uniform_float(-2.0f, 2.0f);
    CAPTURE(kv, rows, cap, k, kind == PoolKind::avg);
    CpuBackend b;
    b.reserve(m.shape());
    b.pool_tokens(m.view(), in.data(), out.data(), rows, span.data(), k, kind);
    for (std::int64_t h = 0; h < kv; ++h)
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t n = m.len(h), sp = std::min(span[static_cast<std::size_t>(h)], n);
        const float* x = in.data() + (h * rows + r) * cap;
        const float* y = out.data() + (h * rows + r) * cap;
        const auto ref = ref_pool(std::vector<double>(x, x + sp), k, kind);
        for (std::int64_t j = 0; j < cap; ++j) {
          INFO("kv-head " << h << " row " << r << " slot " << j << " span " << sp << " len " << n);
          if (j < sp)
            CHECK(close(y[j], ref[static_cast<std::size_t>(j)], 1e-6, 1e-6));
          else if (j < n)
            CHECK(y[j] == x[j]);
          else
            CHECK(y[j] == kSentinel);
        }
      }
  }
}

TEST_CASE("layer_mean averages every q-head of the layer and writes the same row to every kv-head",
          "[backend][cpu][tova]") {
  for (std::uint64_t seed = 1; seed <= 10; ++seed) {
    CAPTURE(seed);
    Rng rng(500 + seed);
    const std::int64_t kv = rng.uniform_int(1, 4), g = rng.pick<std::int64_t>({1, 2, 4}), cap = rng.uniform_int(1, 30);
    ManualLayer m(kv, kv * g, 1, cap);
    const std::int64_t n = rng.uniform_int(1, cap);
    std::fill(m.lens.begin(), m.lens.end(), n);
    std::vector<float> in(static_cast<std::size_t>(m.q * cap)), out(static_cast<std::size_t>(kv * cap), kSentinel);
    for (float& x : in) x = rng.uniform_float(0.0f, 1.0f);
    CpuBackend b;
    b.reserve(m.shape());
    b.layer_mean(m.view(), in.data(), out.data());
    for (std::int64_t j = 0; j < cap; ++j) {
      double mean = 0.0;
      for (std::int64_t qh = 0; qh < m.q; ++qh) mean += in[static_cast<std::size_t>(qh * cap + j)];
      mean /= static_cast<double>(m.q);
      for (std::int64_t h = 0; h < kv; ++h) {
        const float got = out[static_cast<std::size_t>(h * cap + j)];
        if (j < n)
          CHECK(close(got, mean, 1e-6, 0.0));
        else
          CHECK(got == kSentinel);
      }
    }
  }
}

TEST_CASE("key_norm_scores is minus the L2 norm of every live key", "[backend][cpu][keyscore]") {
  for (std::uint64_t seed = 1; seed <= 10; ++seed) {
    CAPTURE(seed);
    Rng rng(600 + seed);
    ManualLayer m = random_layer(rng, rng.uniform_int(1, 4), 1, rng.pick<std::int64_t>({1, 16, 64}), rng.uniform_int(1, 40), 3.0f);
    std::vector<float> out(static_cast<std::size_t>(m.kv * m.cap), kSentinel);
    CpuBackend b;
    b.reserve(m.shape());
    b.key_norm_scores(m.view(), out.data());
    for (std::int64_t h = 0; h < m.kv; ++h)
      for (std::int64_t j = 0; j < m.cap; ++j) {
        const float got = out[static_cast<std::size_t>(h * m.cap + j)];
        if (j >= m.len(h)) {
          CHECK(got == kSentinel);
          continue;
        }
        double sq = 0.0;
        for (std::int64_t e = 0; e < m.d; ++e) sq += static_cast<double>(m.key(h, j, e)) * m.key(h, j, e);
        CHECK(close(got, -std::sqrt(sq), 1e-6, 0.0));
      }
  }
}

TEST_CASE("key_diff_scores is minus the cosine to the mean unit key of the head, a zero key scores 0",
          "[backend][cpu][keyscore]") {
  for (std::uint64_t seed = 1; seed <= 10; ++seed) {
    CAPTURE(seed);
    Rng rng(700 + seed);
    ManualLayer m = random_layer(rng, rng.uniform_int(1, 4), 1, rng.pick<std::int64_t>({2, 16, 64}), rng.uniform_int(1, 40), 2.0f);
    // A zero key in head 0 (torch's normalize / cosine epsilons keep it finite).
    if (m.len(0) > 1)
      for (std::int64_t e = 0; e < m.d; ++e) m.key(0, 0, e) = 0.0f;
    std::vector<float> out(static_cast<std::size_t>(m.kv * m.cap), kSentinel);
    CpuBackend b;
    b.reserve(m.shape());
    b.key_diff_scores(m.view(), out.data());
    for (std::int64_t h = 0; h < m.kv; ++h) {
      const std::int64_t n = m.len(h);
      std::vector<double> anchor(static_cast<std::size_t>(m.d), 0.0);
      for (std::int64_t j = 0; j < n; ++j) {
        double norm = 0.0;
        for (std::int64_t e = 0; e < m.d; ++e) norm += static_cast<double>(m.key(h, j, e)) * m.key(h, j, e);
        norm = std::max(std::sqrt(norm), 1e-12);
        for (std::int64_t e = 0; e < m.d; ++e) anchor[static_cast<std::size_t>(e)] += m.key(h, j, e) / norm / static_cast<double>(n);
      }
      double anorm = 0.0;
      for (double a : anchor) anorm += a * a;
      anorm = std::sqrt(anorm);
      for (std::int64_t j = 0; j < m.cap; ++j) {
        const float got = out[static_cast<std::size_t>(h * m.cap + j)];
        if (j >= n) {
          CHECK(got == kSentinel);
          continue;
        }
        double dot = 0.0, knorm = 0.0;
        for (std::int64_t e = 0; e < m.d; ++e) {
          dot += m.key(h, j, e) * anchor[static_cast<std::size_t>(e)];
          knorm += static_cast<double>(m.key(h, j, e)) * m.key(h, j, e);
        }
        const double want = knorm == 0.0 ? 0.0 : -dot / (std::sqrt(knorm) * anorm);
        INFO("kv-head " << h << " slot " << j);
        REQUIRE(std::isfinite(got));
        CHECK(close(got, want, 0.0, 2e-6));  // cosines: absolute, their scale is 1
      }
    }
  }
}

TEST_CASE("raise_protected sets every protected entry to the head's unprotected maximum plus one and leaves the rest",
          "[backend][cpu][window]") {
  for (std::uint64_t seed = 1; seed <= 20; ++seed) {
    CAPTURE(seed);
    Rng rng(800 + seed);
    ManualLayer m = random_layer(rng, rng.uniform_int(1, 4), 1, 1, rng.uniform_int(1, 40), 1.0f);
    const ProtectRule rule{rng.uniform_int(0, 5), rng.uniform_int(0, 2 * m.cap)};
    std::vector<float> s(static_cast<std::size_t>(m.kv * m.cap));
    for (float& x : s) x = rng.uniform_float(-3.0f, 3.0f);
    const std::vector<float> before = s;
    CpuBackend b;
    b.reserve(m.shape());
    b.raise_protected(m.view(), s.data(), rule);
    for (std::int64_t h = 0; h < m.kv; ++h) {
      float mx = -std::numeric_limits<float>::infinity();
      bool any = false;
      for (std::int64_t j = 0; j < m.len(h); ++j)
        if (!rule.protects(m.position(h, j))) mx = std::max(mx, before[static_cast<std::size_t>(h * m.cap + j)]), any = true;
      for (std::int64_t j = 0; j < m.cap; ++j) {
        const auto at = static_cast<std::size_t>(h * m.cap + j);
        if (j < m.len(h) && rule.protects(m.position(h, j))) {
          if (any) CHECK(s[at] == mx + 1.0f);
          // Protected entries still rank above everything (any unprotected value is <= mx).
        } else {
          CHECK(s[at] == before[at]);
        }
      }
    }
  }
}

namespace {

struct Cand {
  double score;
  std::int32_t pos;
  std::int64_t head;
};

// AdaKV-style allocation from the spec of head_budgets: per head the best min(floor, candidates)
// unprotected entries by (score desc, pos asc); the remaining total goes to the best remaining
// entries of the layer by (score desc, pos asc, head asc).
std::vector<std::int64_t> ref_head_budgets(ManualLayer& m, const std::vector<float>& s, ProtectRule rule,
                                           std::int64_t total, std::int64_t floor) {
  std::vector<std::int64_t> counts(static_cast<std::size_t>(m.kv), 0);
  std::vector<Cand> pool;
  std::int64_t assigned = 0;
  for (std::int64_t h = 0; h < m.kv; ++h) {
    std::vector<Cand> c;
    for (std::int64_t j = 0; j < m.len(h); ++j) {
      if (rule.protects(m.position(h, j))) {
        ++counts[static_cast<std::size_t>(h)];
        continue;
      }
      c.push_back({s[static_cast<std::size_t>(h * m.cap + j)], m.position(h, j), h});
    }
    std::sort(c.begin(), c.end(), [](const Cand& a, const Cand& b) { return a.score != b.score ? a.score > b.score : a.pos < b.pos; });
    const auto f = std::min<std::int64_t>(floor, static_cast<std::int64_t>(c.size()));
    counts[static_cast<std::size_t>(h)] += f;
    assigned += f;
    pool.insert(pool.end(), c.begin() + f, c.end());
  }
  std::sort(pool.begin(), pool.end(), [](const Cand& a, const Cand& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.pos != b.pos) return a.pos < b.pos;
    return a.head < b.head;
  });
  const std::int64_t rest = std::clamp<std::int64_t>(total - assigned, 0, static_cast<std::int64_t>(pool.size()));
  for (std::int64_t i = 0; i < rest; ++i) ++counts[static_cast<std::size_t>(pool[static_cast<std::size_t>(i)].head)];
  return counts;
}

}  // namespace

TEST_CASE("head_budgets equals the allocation reference: floors respected, totals exact, ties by score, position, head",
          "[backend][cpu][window][adaptive]") {
  for (std::uint64_t seed = 1; seed <= 80; ++seed) {
    CAPTURE(seed);
    Rng rng(900 + seed);
    ManualLayer m = random_layer(rng, rng.uniform_int(1, 5), 1, 1, rng.uniform_int(1, 40), 1.0f);
    const ProtectRule rule{rng.uniform_int(0, 3), rng.coin(0.5) ? INT64_MAX : rng.uniform_int(0, 2 * m.cap)};
    std::vector<float> s(static_cast<std::size_t>(m.kv * m.cap));
    // Coarse scores so that ties across heads and positions are frequent.
    for (float& x : s) x = static_cast<float>(rng.uniform_int(0, 6)) * 0.25f;
    std::int64_t candidates = 0, protected_total = 0;
    for (std::int64_t h = 0; h < m.kv; ++h)
      for (std::int64_t j = 0; j < m.len(h); ++j) (rule.protects(m.position(h, j)) ? protected_total : candidates) += 1;
    const std::int64_t total = rng.uniform_int(0, candidates + 3), floor = rng.uniform_int(0, 8);
    CAPTURE(m.kv, m.cap, total, floor, candidates);
    CpuBackend b;
    b.reserve(m.shape());
    std::vector<std::int64_t> counts(static_cast<std::size_t>(m.kv), -1);
    b.head_budgets(m.view(), s.data(), rule, total, floor, counts.data());
    CHECK(counts == ref_head_budgets(m, s, rule, total, floor));
    // The properties on their own.
    std::int64_t sum_floor = 0, sum = 0;
    for (std::int64_t h = 0; h < m.kv; ++h) {
      std::int64_t prot = 0, cand = 0;
      for (std::int64_t j = 0; j < m.len(h); ++j) (rule.protects(m.position(h, j)) ? prot : cand) += 1;
      CHECK(counts[static_cast<std::size_t>(h)] - prot >= std::min(floor, cand));
      CHECK(counts[static_cast<std::size_t>(h)] <= m.len(h));
      sum_floor += std::min(floor, cand);
      sum += counts[static_cast<std::size_t>(h)];
    }
    CHECK(sum - protected_total == std::min(std::max(total, sum_floor), candidates));
  }
}

TEST_CASE("head_budgets breaks equal scores by lower position, then by lower kv-head", "[backend][cpu][window][adaptive]") {
  ManualLayer m(3, 3, 1, 4);
  m.lens = {4, 4, 4};
  // Head 2 holds the oldest positions; heads 0 and 1 share theirs.
  for (std::int64_t s = 0; s < 4; ++s) {
    m.position(0, s) = static_cast<std::int32_t>(10 + s);
    m.position(1, s) = static_cast<std::int32_t>(10 + s);
    m.position(2, s) = static_cast<std::int32_t>(s);
  }
  const std::vector<float> scores(12, 1.0f);
  CpuBackend b;
  b.reserve(m.shape());
  std::vector<std::int64_t> counts(3);
  // 6 entries, no floor: head 2's positions 0..3 first, then position 10 of head 0, then of head 1.
  b.head_budgets(m.view(), scores.data(), ProtectRule{}, 6, 0, counts.data());
  CHECK(counts == std::vector<std::int64_t>{1, 1, 4});
  b.head_budgets(m.view(), scores.data(), ProtectRule{}, 5, 0, counts.data());
  CHECK(counts == std::vector<std::int64_t>{1, 0, 4});
  // A higher score beats any position.
  std::vector<float> s2 = scores;
  s2[static_cast<std::size_t>(1 * 4 + 3)] = 2.0f;  // head 1, position 13
  b.head_budgets(m.view(), s2.data(), ProtectRule{}, 1, 0, counts.data());
  CHECK(counts == std::vector<std::int64_t>{0, 1, 0});
  // Floors come first: each head keeps 2 of its own, the rest follows the ranking.
  b.head_budgets(m.view(), scores.data(), ProtectRule{}, 7, 2, counts.data());
  CHECK(counts == std::vector<std::int64_t>{2, 2, 3});
}
