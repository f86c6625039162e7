// Invariants after every operation, over seeded random configurations: H2O (MHA and GQA, mean /
// max / sum, query and probability observations) and StreamingLLM (with and without pos-shift).
// An independent position-keyed model of every (layer, kv_head) decides what must be resident and
// what each entry's accumulated score is; the cache and the policy are compared against it after
// every append, hook and make_room.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "kvevict/kvevict.hpp"
#include "support/generators.hpp"
#include "support/reference.hpp"

namespace {

using namespace kvevict;
using test::Rng;
using test::Stream;
using Cache = KVCache<CpuBackend>;
using Obs = Observation<float, HostSpace>;

enum class ObsKind { queries, probs, mixed, none };

const char* to_string(ObsKind k) {
  switch (k) {
    case ObsKind::queries: return "queries";
    case ObsKind::probs: return "probs";
    case ObsKind::mixed: return "mixed";
    case ObsKind::none: return "none";
  }
  return "?";
}

struct Case {
  std::uint64_t seed = 0;
  CacheShape shape;
  bool h2o = true;
  std::int64_t sink = 0, recent = 0, heavy = 0;
  GroupAgg agg = GroupAgg::mean;
  ObsKind obs = ObsKind::probs;
  std::optional<RopeSpec> pos_shift;
  std::int64_t seq_len = 0;    // tokens appended per layer over the whole run (at least)
  std::int64_t prefill = 0;    // first block
  std::int64_t window = 1;     // observation queries of a multi-token block
  std::int64_t max_chunk = 1;  // later blocks (chunked prefill, make_room)
  double p_chunk = 0.0, p_make_room = 0.0, p_explicit_first = 0.0;
  std::int64_t units = 256;    // probability quantum 1/units
  float query_amplitude = 1.0f;

  [[nodiscard]] std::int64_t budget() const { return h2o ? heavy + recent : sink + recent; }
  [[nodiscard]] std::string describe() const {
    std::ostringstream os;
    os << (h2o ? "H2O" : "StreamingLLM") << " seed " << seed << " " << test::describe(shape) << " sink " << sink
       << " heavy " << heavy << " recent " << recent << " agg " << kvevict::to_string(agg) << " obs "
       << to_string(obs) << " seq_len " << seq_len << " prefill " << prefill << " window " << window
       << " max_chunk " << max_chunk << " units " << units;
    if (pos_shift)
      os << " pos_shift{" << test::describe(pos_shift->layout) << ", rotary_dim " << pos_shift->rotary_dim << ", base "
         << pos_shift->base << "}";
    return os.str();
  }
};

// Draws one configuration. About 4% are long sequences (2k-8k tokens) on a small head so the
// whole sweep stays within a minute in a Debug build.
Case draw_case(std::uint64_t seed, bool h2o) {
  Rng rng(seed);
  Case c;
  c.seed = seed;
  c.h2o = h2o;
  const bool long_seq = rng.coin(0.04);
  std::int64_t max_budget_part = 0;
  if (long_seq) {
    c.seq_len = rng.uniform_int(2048, 8192);
    c.shape = test::random_shape(rng, 1, 1, {2, 4}, 0);
    if (c.shape.group_size() > 2) c.shape.num_q_heads = c.shape.num_kv_heads * 2;
    max_budget_part = 64;
  } else {
    c.shape = test::random_shape(rng, 3, 4, {2, 4, 4, 8, 8, 16, 64}, 0);
    max_budget_part = 40;
  }
  c.recent = rng.coin(0.1) ? 0 : rng.uniform_int(1, max_budget_part);
  c.heavy = rng.coin(0.1) ? 0 : rng.uniform_int(1, max_budget_part);
  c.sink = rng.coin(0.2) ? 0 : rng.uniform_int(1, 8);
  if (h2o) c.sink = 0;
  if (c.budget() == 0) c.recent = 1;
  // Most sequences outgrow the budget (the invariants under eviction are the point); one in ten
  // stays within it, where nothing may be evicted.
  if (!long_seq)
    c.seq_len = rng.coin(0.1) ? rng.log_uniform_int(1, c.budget()) : c.budget() + rng.log_uniform_int(1, 320);
  c.agg = rng.pick({GroupAgg::mean, GroupAgg::max, GroupAgg::sum});
  c.max_chunk = rng.uniform_int(1, 12);
  c.prefill = rng.log_uniform_int(1, std::max<std::int64_t>(c.seq_len, 1));
  c.window = rng.pick<std::int64_t>({1, 4, 16, 64, 100});
  c.p_chunk = rng.pick({0.0, 0.05, 0.2});
  c.p_make_room = rng.pick({0.0, 0.05, 0.2});
  c.p_explicit_first = rng.pick({0.0, 0.3});
  c.units = rng.pick<std::int64_t>({16, 256});
  c.query_amplitude = rng.pick({1.0f, 3.0f});
  if (h2o) {
    c.obs = rng.pick({ObsKind::queries, ObsKind::probs, ObsKind::mixed});
  } else {
    c.obs = rng.pick({ObsKind::none, ObsKind::none, ObsKind::queries, ObsKind::probs});
    if (rng.coin(0.5)) {
      RopeSpec r;
      r.layout = rng.pick({RopeLayout::interleaved_pairs, RopeLayout::halves});
      r.rotary_dim = 2 * rng.uniform_int(1, c.shape.head_dim / 2);
      r.base = rng.pick({10000.0, 500000.0, 100.0});
      c.pos_shift = r;
    }
  }
  // Room for a full budget plus the largest block appended before its hook evicts.
  c.shape.capacity = std::max(c.prefill, c.budget() + c.max_chunk) + rng.uniform_int(0, 8);
  return c;
}

// The model of one (layer, kv_head): which positions are resident and their per-q-head scores.
struct HeadModel {
  std::vector<std::int64_t> resident;       // ascending positions
  std::vector<std::vector<double>> score;   // [q_head of the group][pos]
  std::vector<std::uint8_t> scored;         // [pos]: observed at least once since appended
};

template <class Policy>
class Runner {
 public:
  explicit Runner(const Case& c)
      : c_(c),
        rng_(c.seed ^ 0x5eedull),
        cache_(c.shape),
        policy_(make_policy(cache_, c)),
        max_pos_(c.seq_len + c.max_chunk + c.shape.capacity + 1) {
    const CacheShape& s = c.shape;
    const auto g = static_cast<std::size_t>(s.group_size());
    models_.resize(static_cast<std::size_t>(s.num_layers * s.num_kv_heads));
    for (auto& m : models_) {
      m.score.assign(g, std::vector<double>(static_cast<std::size_t>(max_pos_), 0.0));
      m.scored.assign(static_cast<std::size_t>(max_pos_), 0);
    }
    const auto n = static_cast<std::size_t>(s.num_layers * s.num_kv_heads * max_pos_ * s.head_dim);
    src_keys_.resize(n);
    src_values_.resize(n);
    for (std::int64_t l = 0; l < s.num_layers; ++l)
      for (std::int64_t h = 0; h < s.num_kv_heads; ++h)
        for (std::int64_t p = 0; p < max_pos_; ++p)
          for (std::int64_t d = 0; d < s.head_dim; ++d) {
            const std::size_t i = src_index(l, h, p) + static_cast<std::size_t>(d);
            src_keys_[i] = test::source_value(c.seed, Stream::key, l, h, p, d);
            src_values_[i] = test::source_value(c.seed, Stream::value, l, h, p, d);
          }
  }

  struct Outcome {
    std::int64_t near_ties = 0;  // near-tie decisions accepted (query scores only)
    bool evicted = false;        // the model saw an eviction
    bool decoded = false;        // at least one single-token decode hook ran
  };

  // Runs the whole sequence.
  Outcome run() {
    const CacheShape& s = c_.shape;
    for (std::int64_t l = 0; l < s.num_layers; ++l) {
      append(l, c_.prefill);
      hook(l, std::min(c_.prefill, c_.window), /*prefill=*/true);
    }
    while (cache_.next_position(0) < c_.seq_len) {
      const double u = rng_.uniform();
      if (u < c_.p_make_room) {
        const std::int64_t n = rng_.uniform_int(0, c_.max_chunk);
        for (std::int64_t l = 0; l < s.num_layers; ++l) {
          make_room(l, n);
          if (n > 0) {
            append(l, n);
            hook(l, std::min(n, c_.window), true);
          }
        }
      } else if (u < c_.p_make_room + c_.p_chunk && c_.max_chunk >= 2) {
        const std::int64_t n = rng_.uniform_int(2, c_.max_chunk);
        for (std::int64_t l = 0; l < s.num_layers; ++l) {
          append(l, n);
          hook(l, std::min(n, c_.window), true);
        }
      } else {
        for (std::int64_t l = 0; l < s.num_layers; ++l) {
          append(l, 1);
          hook(l, 1, false);
        }
        decoded_ = true;
      }
    }
    return {near_ties_, evicted_, decoded_};
  }

 private:
  static Policy make_policy(Cache& cache, const Case& c) {
    if constexpr (std::is_same_v<Policy, H2O<Cache>>) {
      return Policy(cache, H2OConfig{c.heavy, c.recent, c.agg, Schedule::prefill_and_every_step});
    } else {
      return Policy(cache, StreamingLLMConfig{c.sink, c.recent, Schedule::prefill_and_every_step, c.pos_shift});
    }
  }
  static constexpr bool kH2O = std::is_same_v<Policy, H2O<Cache>>;

  [[nodiscard]] std::size_t src_index(std::int64_t l, std::int64_t h, std::int64_t p) const {
    const CacheShape& s = c_.shape;
    return static_cast<std::size_t>(((l * s.num_kv_heads + h) * max_pos_ + p) * s.head_dim);
  }
  HeadModel& model(std::int64_t l, std::int64_t h) {
    return models_[static_cast<std::size_t>(l * c_.shape.num_kv_heads + h)];
  }

  void fail(const std::string& what) {
    FAIL("at next_position " << cache_.next_position(0) << ": " << what);
  }

  // ---- operations ----

  void append(std::int64_t l, std::int64_t n) {
    const CacheShape& s = c_.shape;
    const std::int64_t first = cache_.next_position(l);
    std::vector<float> k(static_cast<std::size_t>(s.num_kv_heads * n * s.head_dim));
    std::vector<float> v(k.size());
    // With pos-shift, the engine rotates a new key at rope_position(): its rank in the cache.
    const std::int64_t rank0 = policy_.rope_position(cache_, l);
    if (c_.pos_shift && rank0 != cache_.len(l, 0)) fail("rope_position() != len with pos-shift");
    if (!c_.pos_shift && rank0 != first) fail("rope_position() != next_position without pos-shift");
    for (std::int64_t h = 0; h < s.num_kv_heads; ++h)
      for (std::int64_t t = 0; t < n; ++t) {
        const std::size_t dst = static_cast<std::size_t>((h * n + t) * s.head_dim);
        const std::size_t src = src_index(l, h, first + t);
        if (c_.pos_shift) {
          const auto rot = rope(raw_key(l, h, first + t), rank0 + t);
          for (std::int64_t d = 0; d < s.head_dim; ++d)
            k[dst + static_cast<std::size_t>(d)] = static_cast<float>(rot[static_cast<std::size_t>(d)]);
        } else {
          std::copy_n(src_keys_.begin() + static_cast<std::ptrdiff_t>(src), s.head_dim, k.begin() + static_cast<std::ptrdiff_t>(dst));
        }
        std::copy_n(src_values_.begin() + static_cast<std::ptrdiff_t>(src), s.head_dim, v.begin() + static_cast<std::ptrdiff_t>(dst));
      }
    cache_.append(l, test::cspan(k), test::cspan(v), n);
    for (std::int64_t h = 0; h < s.num_kv_heads; ++h) {
      HeadModel& m = model(l, h);
      for (std::int64_t t = 0; t < n; ++t) {
        m.resident.push_back(first + t);
        m.scored[static_cast<std::size_t>(first + t)] = 0;
      }
    }
    check_layer(l, /*after_policy=*/false, 0);
  }

  void make_room(std::int64_t l, std::int64_t n) {
    policy_.make_room(cache_, l, n);
    evict_model(l, n);
    check_layer(l, true, n);
  }

  void hook(std::int64_t l, std::int64_t nq, bool prefill) {
    ObsKind kind = c_.obs;
    if (kind == ObsKind::mixed) kind = rng_.coin(0.5) ? ObsKind::queries : ObsKind::probs;
    Obs obs;
    std::vector<float> buf;
    if (kind == ObsKind::probs) {
      obs = probs_observation(l, nq, buf);
    } else if (kind == ObsKind::queries) {
      obs = query_observation(l, nq, buf);
    } else {
      obs = Obs::none();
    }
    if (kind == ObsKind::queries) queries_seen_ = true;
    if (prefill)
      policy_.on_prefill(cache_, l, obs);
    else
      policy_.on_decode(cache_, l, obs);
    evict_model(l, 0);
    check_layer(l, true, 0);
  }

  // ---- observations (and the model's score update) ----

  std::vector<double> raw_key(std::int64_t l, std::int64_t h, std::int64_t p) const {
    const std::size_t i = src_index(l, h, p);
    return {src_keys_.begin() + static_cast<std::ptrdiff_t>(i),
            src_keys_.begin() + static_cast<std::ptrdiff_t>(i) + c_.shape.head_dim};
  }
  std::vector<double> rope(std::vector<double> x, std::int64_t pos) const {
    const RopeSpec& r = *c_.pos_shift;
    return r.layout == RopeLayout::interleaved_pairs ? ref::rope_interleaved(std::move(x), pos, r.base, r.rotary_dim)
                                                     : ref::rope_halves(std::move(x), pos, r.base, r.rotary_dim);
  }

  // Slot of every resident position of (l, h), read from the cache (slot order is the library's).
  std::vector<std::int32_t> slot_of(std::int64_t l, std::int64_t h) {
    const auto pos = cache_.positions(l, h);
    std::vector<std::int32_t> slot(static_cast<std::size_t>(max_pos_), -1);
    for (std::size_t j = 0; j < pos.size(); ++j) slot[static_cast<std::size_t>(pos[j])] = static_cast<std::int32_t>(j);
    return slot;
  }

  void start_fresh(HeadModel& m) {
    for (std::int64_t p : m.resident) {
      auto& f = m.scored[static_cast<std::size_t>(p)];
      if (f == 0)
        for (auto& row : m.score) row[static_cast<std::size_t>(p)] = 0.0;
      f = 1;
    }
  }

  Obs probs_observation(std::int64_t l, std::int64_t nq, std::vector<float>& buf) {
    const CacheShape& s = c_.shape;
    const std::int64_t g = s.group_size();
    const std::int64_t stride = cache_.max_len(l) + rng_.uniform_int(0, 3);
    // Padding beyond each head's live slots holds finite junk the library must not read.
    buf.assign(static_cast<std::size_t>(s.num_q_heads * nq * stride), 0.75f);
    const std::int64_t first = cache_.next_position(l) - nq;
    for (std::int64_t h = 0; h < s.num_kv_heads; ++h) {
      HeadModel& m = model(l, h);
      const auto slot = slot_of(l, h);
      const std::int64_t len = cache_.len(l, h);
      for (std::int64_t gi = 0; gi < g; ++gi) {
        const std::int64_t qh = h * g + gi;
        for (std::int64_t i = 0; i < nq; ++i) {
          float* row = buf.data() + (qh * nq + i) * stride;
          std::fill(row, row + len, 0.0f);
          // Causal rows: query i (position first + i) spreads its mass over the keys it sees.
          std::int64_t visible = 0;
          while (visible < static_cast<std::int64_t>(m.resident.size()) &&
                 m.resident[static_cast<std::size_t>(visible)] <= first + i)
            ++visible;
          const auto w = test::dyadic_distribution(rng_, visible, c_.units);
          for (std::int64_t j = 0; j < visible; ++j)
            row[slot[static_cast<std::size_t>(m.resident[static_cast<std::size_t>(j)])]] =
                static_cast<float>(w[static_cast<std::size_t>(j)]);
        }
      }
      if (kH2O) {
        start_fresh(m);
        for (std::int64_t gi = 0; gi < g; ++gi)
          for (std::int64_t i = 0; i < nq; ++i) {
            const float* row = buf.data() + ((h * g + gi) * nq + i) * stride;
            for (std::int64_t p : m.resident)
              m.score[static_cast<std::size_t>(gi)][static_cast<std::size_t>(p)] +=
                  static_cast<double>(row[slot[static_cast<std::size_t>(p)]]);
          }
      }
    }
    return Obs::from_probs(test::cspan(buf), nq, stride);
  }

  Obs query_observation(std::int64_t l, std::int64_t nq, std::vector<float>& buf) {
    const CacheShape& s = c_.shape;
    const std::int64_t g = s.group_size();
    const std::int64_t next = cache_.next_position(l);
    std::int64_t first = next - nq, first_arg = -1;
    if (rng_.coin(c_.p_explicit_first)) first = first_arg = rng_.uniform_int(0, next - nq);
    float scale = 0.0f;
    if (rng_.coin(0.25)) scale = rng_.uniform_float(0.1f, 1.5f);
    buf = test::source_block(c_.seed, Stream::query, l, s.num_q_heads, first, nq, s.head_dim, c_.query_amplitude);
    if (kH2O) {
      const double eff_scale = scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(s.head_dim));
      std::vector<double> logits;
      for (std::int64_t h = 0; h < s.num_kv_heads; ++h) {
        HeadModel& m = model(l, h);
        start_fresh(m);
        for (std::int64_t gi = 0; gi < g; ++gi)
          for (std::int64_t i = 0; i < nq; ++i) {
            const float* q = buf.data() + ((h * g + gi) * nq + i) * s.head_dim;
            logits.clear();
            double mx = -INFINITY;
            for (std::int64_t p : m.resident) {
              if (p > first + i) break;
              const float* k = src_keys_.data() + src_index(l, h, p);
              double dot = 0.0;
              for (std::int64_t d = 0; d < s.head_dim; ++d) dot += static_cast<double>(q[d]) * static_cast<double>(k[d]);
              logits.push_back(dot * eff_scale);
              mx = std::max(mx, logits.back());
            }
            double z = 0.0;
            for (double& x : logits) z += (x = std::exp(x - mx));
            for (std::size_t j = 0; j < logits.size(); ++j)
              m.score[static_cast<std::size_t>(gi)][static_cast<std::size_t>(m.resident[j])] += logits[j] / z;
          }
      }
    }
    return Obs::from_queries(test::cspan(buf), nq, scale, first_arg);
  }

  // ---- the model's eviction, compared with what the library kept ----

  double agg_score(const HeadModel& m, std::int64_t p) const {
    const auto j = static_cast<std::size_t>(p);
    double out = m.score[0][j];
    for (std::size_t g = 1; g < m.score.size(); ++g)
      out = c_.agg == GroupAgg::max ? std::max(out, m.score[g][j]) : out + m.score[g][j];
    if (c_.agg == GroupAgg::mean) out /= static_cast<double>(m.score.size());
    return out;
  }

  void evict_model(std::int64_t l, std::int64_t incoming) {
    const std::int64_t next = cache_.next_position(l);
    const std::int64_t budget = c_.budget();
    for (std::int64_t h = 0; h < c_.shape.num_kv_heads; ++h) {
      HeadModel& m = model(l, h);
      const auto got = cache_.kept_positions(l, h);
      const std::vector<std::int64_t> kept(got.begin(), got.end());
      const auto len = static_cast<std::int64_t>(m.resident.size());
      const std::int64_t keep =
          len + incoming > budget ? std::min(len, budget - std::min(incoming, c_.recent)) : len;
      if (keep == len) {
        if (kept != m.resident) fail("kv_head " + std::to_string(h) + ": entries evicted within budget");
        continue;
      }
      evicted_ = true;
      const std::int64_t recent_begin = next - c_.recent + incoming;
      std::vector<std::int64_t> prot, cand;
      for (std::int64_t p : m.resident) (p < c_.sink || p >= recent_begin ? prot : cand).push_back(p);
      const std::int64_t need = keep - static_cast<std::int64_t>(prot.size());
      if (need < 0) fail("model: protected entries exceed the budget");
      std::vector<double> sc(static_cast<std::size_t>(max_pos_), 0.0);
      if (kH2O)
        for (std::int64_t p : cand) sc[static_cast<std::size_t>(p)] = agg_score(m, p);
      std::sort(cand.begin(), cand.end(), [&](std::int64_t a, std::int64_t b) {
        if (!kH2O) return a > b;  // StreamingLLM ranks by recency
        const double sa = sc[static_cast<std::size_t>(a)], sb = sc[static_cast<std::size_t>(b)];
        return sa != sb ? sa > sb : a < b;
      });
      std::vector<std::int64_t> expect = prot;
      expect.insert(expect.end(), cand.begin(), cand.begin() + need);
      std::sort(expect.begin(), expect.end());
      if (kept != expect) {
        // Scores from queries are fp32 in the library and fp64 here: accept a different choice only
        // between entries whose scores agree to within the accumulation error.
        bool ok = kH2O && queries_seen_ && static_cast<std::int64_t>(kept.size()) == keep &&
                  std::includes(kept.begin(), kept.end(), prot.begin(), prot.end());
        if (ok) {
          double min_kept = INFINITY, max_evicted = -INFINITY;
          for (std::int64_t p : cand) {
            const double v = sc[static_cast<std::size_t>(p)];
            if (std::binary_search(kept.begin(), kept.end(), p))
              min_kept = std::min(min_kept, v);
            else
              max_evicted = std::max(max_evicted, v);
          }
          ok = min_kept + 4e-4 * std::max(std::abs(min_kept), std::abs(max_evicted)) + 1e-7 >= max_evicted;
        }
        if (!ok) {
          std::ostringstream os;
          os << "layer " << l << " kv_head " << h << " incoming " << incoming << ": kept {";
          for (auto p : kept) os << p << " ";
          os << "} expected {";
          for (auto p : expect) os << p << " ";
          os << "}";
          fail(os.str());
        }
        ++near_ties_;
      }
      m.resident = kept;
    }
  }

  // ---- invariants ----

  void check_layer(std::int64_t l, bool after_policy, std::int64_t incoming) {
    const CacheShape& s = c_.shape;
    try {
      cache_.check_invariants();
    } catch (const InvariantError& e) {
      fail(std::string("check_invariants: ") + e.what());
    }
    const std::int64_t next = cache_.next_position(l);
    const std::int64_t g = s.group_size();
    const float* scores = nullptr;
    if constexpr (kH2O) scores = policy_.scorer().q_head_scores(l);
    for (std::int64_t h = 0; h < s.num_kv_heads; ++h) {
      HeadModel& m = model(l, h);
      const auto pos = cache_.positions(l, h);
      const auto len = static_cast<std::int64_t>(pos.size());
      std::vector<std::int64_t> sorted(pos.begin(), pos.end());
      std::sort(sorted.begin(), sorted.end());
      if (sorted != m.resident) fail("kv_head " + std::to_string(h) + ": resident positions differ from the model");
      if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) fail("duplicate positions");
      if (after_policy && len > c_.budget()) fail("budget exceeded: len " + std::to_string(len));
      // Sinks and the recent window (shortened by `incoming` in make_room) are always resident.
      for (std::int64_t p = 0; p < std::min(c_.sink, next); ++p)
        if (!std::binary_search(sorted.begin(), sorted.end(), p)) fail("sink " + std::to_string(p) + " evicted");
      for (std::int64_t p = std::max<std::int64_t>(0, next - c_.recent + incoming); p < next; ++p)
        if (!std::binary_search(sorted.begin(), sorted.end(), p)) fail("recent " + std::to_string(p) + " evicted");
      // Every kept entry's key and value are its source rows (keys re-rotated to their rank with pos-shift).
      const auto keys = cache_.keys(l, h);
      const auto values = cache_.values(l, h);
      for (std::int64_t j = 0; j < len; ++j) {
        const std::int64_t p = pos[static_cast<std::size_t>(j)];
        const std::size_t src = src_index(l, h, p);
        const std::size_t at = static_cast<std::size_t>(j * s.head_dim);
        if (!std::equal(values.begin() + static_cast<std::ptrdiff_t>(at),
                        values.begin() + static_cast<std::ptrdiff_t>(at) + s.head_dim,
                        src_values_.begin() + static_cast<std::ptrdiff_t>(src)))
          fail("value of position " + std::to_string(p) + " altered");
        if (c_.pos_shift) {
          const auto rank = std::lower_bound(sorted.begin(), sorted.end(), p) - sorted.begin();
          const auto expect = rope(raw_key(l, h, p), rank);
          for (std::int64_t d = 0; d < s.head_dim; ++d)
            if (std::abs(keys[at + static_cast<std::size_t>(d)] - expect[static_cast<std::size_t>(d)]) > 1e-4)
              fail("key of position " + std::to_string(p) + " is not RoPE at its rank " + std::to_string(rank));
        } else if (!std::equal(keys.begin() + static_cast<std::ptrdiff_t>(at),
                               keys.begin() + static_cast<std::ptrdiff_t>(at) + s.head_dim,
                               src_keys_.begin() + static_cast<std::ptrdiff_t>(src))) {
          fail("key of position " + std::to_string(p) + " altered");
        }
        // Per-q-head accumulated scores stay aligned with their entries' slots.
        if (kH2O && after_policy)
          for (std::int64_t gi = 0; gi < g; ++gi) {
            const double want = m.score[static_cast<std::size_t>(gi)][static_cast<std::size_t>(p)];
            const double have = scores[(h * g + gi) * s.capacity + j];
            const double tol = queries_seen_ ? 2e-4 * std::abs(want) + 1e-6 : 0.0;
            if (!(std::abs(have - want) <= tol)) {
              std::ostringstream os;
              os << "q_head " << h * g + gi << " slot " << j << " (position " << p << "): score " << have
                 << ", model " << want;
              fail(os.str());
            }
          }
      }
    }
  }

  Case c_;
  Rng rng_;
  Cache cache_;
  Policy policy_;
  std::int64_t max_pos_;
  std::vector<HeadModel> models_;       // [layer, kv_head]
  std::vector<float> src_keys_;         // [layer, kv_head, pos, head_dim]: raw source rows
  std::vector<float> src_values_;       // [layer, kv_head, pos, head_dim]
  bool queries_seen_ = false;           // scores are exact (dyadic) until a query observation arrives
  std::int64_t near_ties_ = 0;
  bool evicted_ = false, decoded_ = false;
};

template <class Policy>
void sweep(std::uint64_t first_seed, std::int64_t num_cases, bool h2o) {
  std::int64_t near_ties = 0, long_cases = 0, gqa_cases = 0, evicting_cases = 0, decoding_cases = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (std::int64_t i = 0; i < num_cases; ++i) {
    const Case c = draw_case(first_seed + static_cast<std::uint64_t>(i), h2o);
    INFO(c.describe());
    Runner<Policy> runner(c);
    const auto outcome = runner.run();
    near_ties += outcome.near_ties;
    evicting_cases += outcome.evicted ? 1 : 0;
    decoding_cases += outcome.decoded ? 1 : 0;
    long_cases += c.seq_len >= 2048 ? 1 : 0;
    gqa_cases += c.shape.group_size() > 1 ? 1 : 0;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(num_cases << " cases (" << long_cases << " long, " << gqa_cases << " GQA, " << evicting_cases << " evicting, "
                 << decoding_cases << " with decode steps), " << near_ties << " near-tie decisions accepted, " << secs
                 << " s");
  // Coverage of the draw itself: long sequences, GQA, and cases that evict and decode (the
  // invariants above are only tested under eviction where one happens).
  CHECK(long_cases > 0);
  CHECK(gqa_cases > num_cases / 2);
  CHECK(evicting_cases >= num_cases * 8 / 10);
  CHECK(decoding_cases >= num_cases * 8 / 10);
  // Near ties are rare (none in these seeds with g++ 12): a systematic misranking within the
  // fp32-vs-fp64 allowance would show up as several of them.
  CHECK(near_ties <= num_cases / 200 + 1);
}

}  // namespace

TEST_CASE("H2O keeps budget, recent window, unique positions, intact rows and slot-aligned scores after every "
          "operation on 800 random configurations",
          "[policies][h2o][sweep]") {
  sweep<H2O<Cache>>(1000, 800, true);
}

TEST_CASE("StreamingLLM keeps budget, sinks, recent window, unique positions and intact (or re-rotated) rows after "
          "every operation on 450 random configurations",
          "[policies][streaming_llm][sweep]") {
  sweep<StreamingLLM<Cache>>(50000, 450, false);
}
