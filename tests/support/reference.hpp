// Naive double-precision reference implementations used to check the library. Deliberately written from
// the specs (../shared/specs) with plain loops and no code shared with include/kvevict, so that a bug
// in the library cannot hide behind the same bug here.
// Conventions (specs/README.md): GQA query head h reads kv head h / G; causal masking by original
// positions; every top-k ranks by (score desc, position asc).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvevict::ref {

using Vec = std::vector<double>;
using Mat = std::vector<Vec>;  // row-major: Mat[row][col]
using Positions = std::vector<int64_t>;

inline double dot(const Vec& a, const Vec& b) {
  if (a.size() != b.size()) throw std::invalid_argument("ref::dot: size mismatch");
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Numerically stable softmax; -inf logits (masked) get probability 0. All -inf has no distribution: throws.
inline Vec softmax_row(const Vec& logits) {
  if (logits.empty()) return {};
  const double m = *std::max_element(logits.begin(), logits.end());
  if (m == -std::numeric_limits<double>::infinity()) throw std::invalid_argument("ref::softmax_row: all logits -inf");
  Vec p(logits.size());
  double z = 0.0;
  for (size_t j = 0; j < logits.size(); ++j) z += (p[j] = std::exp(logits[j] - m));
  for (double& v : p) v /= z;
  return p;
}

// q [G][d] (the query heads of one group), keys [len][d] -> probabilities [G][len]; no mask.
inline Mat attention_probs(const Mat& q, const Mat& keys, double scale) {
  Mat out;
  out.reserve(q.size());
  for (const Vec& qi : q) {
    Vec logits(keys.size());
    for (size_t j = 0; j < keys.size(); ++j) logits[j] = dot(qi, keys[j]) * scale;
    out.push_back(softmax_row(logits));
  }
  return out;
}

// Σ_i softmax_j(q_i·k_j·scale) over query rows i (row i sits at position first_query_pos + i); row i sees
// only keys with key_positions[j] <= first_query_pos + i, the others get probability 0. A row that sees no
// key contributes nothing. -> [len]
inline Vec column_sums(const Mat& q, const Mat& keys, const Positions& key_positions, int64_t first_query_pos,
                       double scale) {
  if (keys.size() != key_positions.size()) throw std::invalid_argument("ref::column_sums: keys/positions mismatch");
  Vec sums(keys.size(), 0.0);
  for (size_t i = 0; i < q.size(); ++i) {
    const int64_t qpos = first_query_pos + static_cast<int64_t>(i);
    Vec logits(keys.size(), -std::numeric_limits<double>::infinity());
    bool any = false;
    for (size_t j = 0; j < keys.size(); ++j)
      if (key_positions[j] <= qpos) {
        logits[j] = dot(q[i], keys[j]) * scale;
        any = true;
      }
    if (!any) continue;
    const Vec p = softmax_row(logits);
    for (size_t j = 0; j < keys.size(); ++j) sums[j] += p[j];
  }
  return sums;
}

// Keeps every protected entry plus the k best unprotected ones by (score desc, position asc); fewer than
// k unprotected entries are all kept. Returns kept positions ascending.
inline Positions topk_keep(const Vec& scores, const Positions& positions, int64_t k,
                           const std::function<bool(int64_t pos)>& is_protected) {
  if (scores.size() != positions.size()) throw std::invalid_argument("ref::topk_keep: scores/positions mismatch");
  if (k < 0) throw std::invalid_argument("ref::topk_keep: negative k");
  Positions kept;
  std::vector<size_t> cand;
  for (size_t j = 0; j < scores.size(); ++j) {
    if (is_protected(positions[j])) kept.push_back(positions[j]);
    else cand.push_back(j);
  }
  std::sort(cand.begin(), cand.end(), [&](size_t a, size_t b) {
    return scores[a] != scores[b] ? scores[a] > scores[b] : positions[a] < positions[b];
  });
  for (size_t r = 0; r < cand.size() && static_cast<int64_t>(r) < k; ++r) kept.push_back(positions[cand[r]]);
  std::sort(kept.begin(), kept.end());
  return kept;
}

// Protected = pos < sink_end or pos >= recent_begin.
inline Positions topk_keep(const Vec& scores, const Positions& positions, int64_t k, int64_t sink_end,
                           int64_t recent_begin) {
  return topk_keep(scores, positions, k, [=](int64_t p) { return p < sink_end || p >= recent_begin; });
}

// StreamingLLM StartRecentKVCache.__call__ on a cache of T slots (slot = position here):
// T <= n_sink + n_recent keeps all, else [0, n_sink) ∪ [T - n_recent, T).
inline Positions streaming_llm_keep(int64_t T, int64_t n_sink, int64_t n_recent) {
  Positions kept;
  for (int64_t p = 0; p < T; ++p)
    if (T <= n_sink + n_recent || p < n_sink || p >= T - n_recent) kept.push_back(p);
  return kept;
}

// StartRecentKVCache.evict_for_space(n_coming): T + n <= n_sink + n_recent keeps all, else
// [0, n_sink) ∪ [T - n_recent + n, T) (empty recent part once n >= n_recent).
inline Positions streaming_llm_evict_for_space(int64_t T, int64_t n_sink, int64_t n_recent, int64_t n_coming) {
  Positions kept;
  for (int64_t p = 0; p < T; ++p)
    if (T + n_coming <= n_sink + n_recent || p < n_sink || p >= T - n_recent + n_coming) kept.push_back(p);
  return kept;
}

enum class GroupAgg { mean, max, sum };

// H2O real-drop (specs/h2o.md, H2OKVCache_LayerWise) on one kv head. Each query head g of the group keeps its
// own accumulated column sums; at eviction they are reduced over the group with `agg` (the library's GQA
// extension; G = 1 is the official MHA behaviour) and every head's scores are compacted to the kept slots.
class H2OReference {
 public:
  H2OReference(int64_t hh_size, int64_t recent_size, int64_t group_size = 1, GroupAgg agg = GroupAgg::mean,
               int64_t first_pos = 0)
      : hh_(hh_size), recent_(recent_size), agg_(agg), next_pos_(first_pos),
        scores_(static_cast<size_t>(group_size)) {
    if (hh_size < 0 || recent_size < 0 || group_size < 1) throw std::invalid_argument("H2OReference: bad sizes");
  }

  // attn[g][i][j]: attention of new query row i of query head g over all T = len() + n_new current slots
  // (old slots in kept order, then the n_new new tokens). Accumulates, then evicts if T > hh + recent.
  void update(const std::vector<Mat>& attn) {
    if (attn.size() != scores_.size()) throw std::invalid_argument("H2OReference: wrong number of query heads");
    const size_t n_new = attn[0].size();
    const size_t T = kept_.size() + n_new;
    for (size_t g = 0; g < attn.size(); ++g) {
      if (attn[g].size() != n_new) throw std::invalid_argument("H2OReference: heads disagree on row count");
      Vec s(T, 0.0);
      for (size_t j = 0; j < kept_.size(); ++j) s[j] = scores_[g][j];  // old slots accumulate
      for (const Vec& row : attn[g]) {
        if (row.size() != T) throw std::invalid_argument("H2OReference: row length != len() + n_new");
        for (size_t j = 0; j < T; ++j) s[j] += row[j];  // new slots start at their own column sum
      }
      scores_[g] = std::move(s);
    }
    for (size_t i = 0; i < n_new; ++i) kept_.push_back(next_pos_++);

    if (static_cast<int64_t>(T) <= hh_ + recent_) return;
    // Recent window = last `recent` slots; positions ascend with slots, so it is a position threshold.
    const int64_t recent_begin = recent_ > 0 ? kept_[T - static_cast<size_t>(recent_)]
                                             : std::numeric_limits<int64_t>::max();
    const Positions keep = topk_keep(scores(), kept_, hh_, std::numeric_limits<int64_t>::min(), recent_begin);
    std::vector<Vec> new_scores(scores_.size());
    Positions new_kept;
    for (size_t j = 0; j < T; ++j) {
      if (!std::binary_search(keep.begin(), keep.end(), kept_[j])) continue;
      new_kept.push_back(kept_[j]);
      for (size_t g = 0; g < scores_.size(); ++g) new_scores[g].push_back(scores_[g][j]);
    }
    kept_ = std::move(new_kept);
    scores_ = std::move(new_scores);
  }

  // G = 1 conveniences: prefill block attn [S][S] (causal rows), decode row [len() + 1].
  void prefill(const Mat& attn) { update({attn}); }
  void step(const Vec& row) { update({Mat{row}}); }

  int64_t len() const { return static_cast<int64_t>(kept_.size()); }
  const Positions& kept_positions() const { return kept_; }  // ascending
  const std::vector<Vec>& head_scores() const { return scores_; }  // [G][slot]

  // Group-reduced accumulated score per slot [slot] (the head's own scores when G = 1).
  Vec scores() const {
    Vec out(kept_.size(), agg_ == GroupAgg::max ? -std::numeric_limits<double>::infinity() : 0.0);
    for (const Vec& s : scores_)
      for (size_t j = 0; j < out.size(); ++j) out[j] = agg_ == GroupAgg::max ? std::max(out[j], s[j]) : out[j] + s[j];
    if (agg_ == GroupAgg::mean)
      for (double& v : out) v /= static_cast<double>(scores_.size());
    return out;
  }

 private:
  int64_t hh_, recent_;
  GroupAgg agg_;
  int64_t next_pos_;
  Positions kept_;            // [slot] original positions, ascending
  std::vector<Vec> scores_;   // [G][slot] accumulated column sums per query head
};

namespace detail {
inline void check_rope_args(const Vec& v, int64_t rotary_dim, const char* who) {
  if (rotary_dim < 0 || rotary_dim % 2 != 0 || rotary_dim > static_cast<int64_t>(v.size()))
    throw std::invalid_argument(std::string(who) + ": rotary_dim must be even and <= the vector size");
}
inline void rotate_pair(Vec& v, size_t a, size_t b, double theta) {
  const double x = v[a], y = v[b];
  v[a] = x * std::cos(theta) - y * std::sin(theta);
  v[b] = x * std::sin(theta) + y * std::cos(theta);
}
}  // namespace detail

// llama2.c / GPT-J layout: pair (2i, 2i+1) rotated by pos * base^(-2i/rotary_dim); dims >= rotary_dim untouched.
inline Vec rope_interleaved(Vec v, int64_t pos, double base, int64_t rotary_dim) {
  detail::check_rope_args(v, rotary_dim, "ref::rope_interleaved");
  for (int64_t i = 0; 2 * i < rotary_dim; ++i) {
    const double theta = static_cast<double>(pos) * std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(rotary_dim));
    detail::rotate_pair(v, static_cast<size_t>(2 * i), static_cast<size_t>(2 * i + 1), theta);
  }
  return v;
}

// GPT-NeoX / HF layout: pair (i, i + rotary_dim/2) with the same frequency base^(-2i/rotary_dim).
inline Vec rope_halves(Vec v, int64_t pos, double base, int64_t rotary_dim) {
  detail::check_rope_args(v, rotary_dim, "ref::rope_halves");
  const int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const double theta = static_cast<double>(pos) * std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(rotary_dim));
    detail::rotate_pair(v, static_cast<size_t>(i), static_cast<size_t>(i + half), theta);
  }
  return v;
}

// softmax(q·Kᵀ·scale)·V over all rows of keys/values -> [value dim].
inline Vec attend(const Vec& q, const Mat& keys, const Mat& values, double scale) {
  if (keys.size() != values.size() || keys.empty()) throw std::invalid_argument("ref::attend: bad keys/values");
  const Vec p = attention_probs(Mat{q}, keys, scale)[0];
  Vec out(values[0].size(), 0.0);
  for (size_t j = 0; j < values.size(); ++j)
    for (size_t c = 0; c < out.size(); ++c) out[c] += p[j] * values[j][c];
  return out;
}

}  // namespace kvevict::ref
