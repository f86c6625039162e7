// CPU implementation of CAKE's primitives (core/cake_backend.hpp documents them): free functions
// on CpuBackend, found by argument-dependent lookup. Numerics follow the reference's torch ops:
// fp32 softmax, fp32 mean (sequential sum / n), unbiased variance accumulated in fp64 (torch's CPU
// Welford accumulates in double) and rounded to fp32, entropy terms p * log(p + 1e-10) in fp32
// summed in fp64, average pooling as a sequential fp32 sum divided by the kernel; exp and log are
// Eigen's vectorised ones (within an ulp or two of torch's). Nothing here allocates; scratch comes
// from the CakeWorkspace or, for the column statistics, fixed-size stack blocks.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "kvevict/backends/cpu/cpu_backend.hpp"
#include "kvevict/core/cake_backend.hpp"
#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"

namespace kvevict {

namespace cpu_detail {

// Columns per block of the statistics: the fp64 accumulators of one block live on the stack
// (7 KiB), so the statistics need no workspace and read the rows row by row (contiguously).
inline constexpr std::int64_t kCakeStatsBlock = 256;

// Softmax of one logit row over the keys with position <= qpos (masked entries become 0), the
// reference's row: max, exp(x - max), sum, multiply by 1/sum (torch's vectorised last-dim
// softmax). exp is Eigen's vectorised one. A query that sees no key gets a row of zeros.
inline void cake_masked_softmax(float* row, const std::int32_t* pos, std::int64_t n, std::int64_t qpos) {
  float mx = -std::numeric_limits<float>::infinity();
  for (std::int64_t j = 0; j < n; ++j) mx = pos[j] <= qpos ? std::max(mx, row[j]) : mx;
  if (mx == -std::numeric_limits<float>::infinity()) {
    std::fill(row, row + n, 0.0f);
    return;
  }
  Eigen::Map<Eigen::ArrayXf> r(row, n);
  r = (r - mx).exp();
  float sum = 0.0f;
  for (std::int64_t j = 0; j < n; ++j) {
    row[j] = pos[j] <= qpos ? row[j] : 0.0f;
    sum += row[j];
  }
  r *= 1.0f / sum;
}

// Column statistics of one q-head's window rows (`rows` [num_queries, row_stride]): the indicator
// for every live slot, and this head's entropy and variance sums over the prefix keys (added to
// the fp64 totals). Per column: fp32 sequential sum / n (torch's mean), fp64 two-pass unbiased
// variance rounded to fp32, fp32 terms p * log(p + 1e-10) (Eigen's vectorised log) summed in fp64.
inline void cake_column_stats(const float* rows, std::int64_t row_stride, std::int64_t num_queries,
                              const std::int32_t* pos, std::int64_t n, std::int64_t first_pos, float gamma,
                              float* indicator, double& entropy, double& variance) {
  const auto nq = static_cast<float>(num_queries);
  const double inv_nq = 1.0 / static_cast<double>(num_queries);
  const double inv_dof = 1.0 / static_cast<double>(num_queries - 1);
  float sum[kCakeStatsBlock], term[kCakeStatsBlock];
  double mean[kCakeStatsBlock], m2[kCakeStatsBlock], ent[kCakeStatsBlock];
  for (std::int64_t j0 = 0; j0 < n; j0 += kCakeStatsBlock) {
    const std::int64_t m = std::min(kCakeStatsBlock, n - j0);
    std::fill(sum, sum + m, 0.0f);
    std::fill(mean, mean + m, 0.0);
    std::fill(m2, m2 + m, 0.0);
    std::fill(ent, ent + m, 0.0);
    for (std::int64_t i = 0; i < num_queries; ++i) {
      const float* row = rows + i * row_stride + j0;
      for (std::int64_t j = 0; j < m; ++j) {
        sum[j] += row[j];
        mean[j] += static_cast<double>(row[j]);
      }
      const Eigen::Map<const Eigen::ArrayXf> p(row, m);
      Eigen::Map<Eigen::ArrayXf>(term, m) = p * (p + 1e-10f).log();
      for (std::int64_t j = 0; j < m; ++j) ent[j] += static_cast<double>(term[j]);
    }
    for (std::int64_t j = 0; j < m; ++j) mean[j] *= inv_nq;
    for (std::int64_t i = 0; i < num_queries; ++i) {
      const float* row = rows + i * row_stride + j0;
      for (std::int64_t j = 0; j < m; ++j) {
        const double d = static_cast<double>(row[j]) - mean[j];
        m2[j] += d * d;
      }
    }
    for (std::int64_t j = 0; j < m; ++j) {
      const auto var = static_cast<float>(m2[j] * inv_dof);
      indicator[j0 + j] = sum[j] / nq + gamma * var;
      if (pos[j0 + j] >= first_pos) continue;
      entropy -= ent[j];
      variance += static_cast<double>(var);
    }
  }
}

inline void cake_check_window(const char* where, std::int64_t num_queries) {
  if (num_queries < 2)
    detail::fail<ArgumentError>(where, "num_queries", num_queries, "must be >= 2 (the variance is unbiased)");
}

}  // namespace cpu_detail

// Window statistics from queries (CakeScoringBackend::cake_window_scores). One q-head at a time:
// the window logits are one Eigen GEMM into workspace.rows, then the masked softmax, then the
// column statistics. Throws ArgumentError for fewer than 2 queries (before touching anything).
inline void cake_window_scores(CpuBackend& /*backend*/, const LayerView<float>& v, const float* queries,
                               std::int64_t num_queries, std::int64_t first_pos, float scale, float gamma,
                               float* indicator, CakeWindowStats& stats, const CakeWorkspace& ws) {
  cpu_detail::cake_check_window("cake_window_scores", num_queries);
  using Stride = Eigen::Stride<Eigen::Dynamic, 1>;
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ConstMap = Eigen::Map<const RowMatrix, Eigen::Unaligned, Stride>;
  using Map = Eigen::Map<RowMatrix, Eigen::Unaligned, Stride>;
  const std::int64_t g = v.group_size();
  double entropy = 0.0, variance = 0.0;
  for (std::int64_t qh = 0; qh < v.num_q_heads; ++qh) {
    const std::int64_t h = qh / g;
    const std::int64_t n = v.lens[h];
    if (n == 0) continue;
    const std::int32_t* pos = v.head_positions(h);
    ConstMap k(v.key(h, 0), n, v.head_dim, Stride(v.slot_stride, 1));
    ConstMap q(queries + qh * num_queries * v.head_dim, num_queries, v.head_dim, Stride(v.head_dim, 1));
    Map logits(ws.rows, num_queries, n, Stride(n, 1));
    logits.noalias() = (q * k.transpose()) * scale;
    for (std::int64_t i = 0; i < num_queries; ++i) cpu_detail::cake_masked_softmax(ws.rows + i * n, pos, n, first_pos + i);
    cpu_detail::cake_column_stats(ws.rows, n, num_queries, pos, n, first_pos, gamma, indicator + qh * v.capacity,
                                  entropy, variance);
  }
  stats.entropy = static_cast<float>(entropy);
  stats.variance = static_cast<float>(variance);
}

// Window statistics from engine probabilities [q_head, num_queries, probs_stride].
inline void cake_window_scores_from_probs(CpuBackend& /*backend*/, const LayerView<float>& v, const float* probs,
                                          std::int64_t num_queries, std::int64_t probs_stride, std::int64_t first_pos,
                                          float gamma, float* indicator, CakeWindowStats& stats,
                                          const CakeWorkspace& /*ws*/) {
  cpu_detail::cake_check_window("cake_window_scores_from_probs", num_queries);
  const std::int64_t g = v.group_size();
  double entropy = 0.0, variance = 0.0;
  for (std::int64_t qh = 0; qh < v.num_q_heads; ++qh) {
    const std::int64_t h = qh / g;
    cpu_detail::cake_column_stats(probs + qh * num_queries * probs_stride, probs_stride, num_queries,
                                  v.head_positions(h), v.lens[h], first_pos, gamma, indicator + qh * v.capacity,
                                  entropy, variance);
  }
  stats.entropy = static_cast<float>(entropy);
  stats.variance = static_cast<float>(variance);
}

// Group-mean of avg-pooled rows along each head's reference order (see core/cake_backend.hpp).
// The order is inverted into workspace.slots (slot of each rank), checked to be a permutation.
inline void cake_pool_in_order(CpuBackend& /*backend*/, const LayerView<float>& v, const float* rows,
                               std::int64_t row_stride, const float* order, std::int64_t fresh_from,
                               std::int64_t next_pos, std::int64_t window, std::int64_t kernel, float* out,
                               const CakeWorkspace& ws) {
  constexpr const char* where = "cake_pool_in_order";
  const std::int64_t g = v.group_size();
  const std::int64_t radius = kernel / 2;
  const auto kf = static_cast<float>(kernel), gf = static_cast<float>(g);
  for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
    const std::int64_t n = v.lens[h];
    const std::int64_t m = n - window;
    if (m <= 0) continue;
    const std::int32_t* pos = v.head_positions(h);
    const float* key = order + h * v.capacity;
    std::int32_t* slot_of = ws.slots + h * v.capacity;
    std::fill(slot_of, slot_of + n, -1);
    for (std::int64_t s = 0; s < n; ++s) {
      const std::int64_t r = pos[s] >= fresh_from ? n - next_pos + pos[s] : static_cast<std::int64_t>(key[s]);
      if (r < 0 || r >= n || slot_of[r] != -1)
        detail::fail<InvariantError>(where, "order[" + std::to_string(h) + ", " + std::to_string(s) + "]", r,
                                     "the ranks of a head must be a permutation of [0, len)");
      slot_of[r] = static_cast<std::int32_t>(s);
    }
    float* o = out + h * v.capacity;
    for (std::int64_t k = 0; k < m; ++k) {
      const std::int64_t lo = std::max<std::int64_t>(0, k - radius), hi = std::min(m - 1, k + radius);
      float group = 0.0f;
      for (std::int64_t r = 0; r < g; ++r) {
        const float* row = rows + (h * g + r) * row_stride;
        float acc = 0.0f;
        for (std::int64_t t = lo; t <= hi; ++t) acc += row[slot_of[t]];
        const float pooled = acc / kf;
        group = r == 0 ? pooled : group + pooled;
      }
      o[slot_of[k]] = g == 1 ? group : group / gf;
    }
  }
}

// Ranks of every live entry (see core/cake_backend.hpp), by sorting slot indices in
// workspace.slots. O(len log len) per head.
inline void cake_rank_entries(CpuBackend& /*backend*/, const LayerView<float>& v, const float* scores,
                              ProtectRule rule, bool by_score, float* order, const CakeWorkspace& ws) {
  for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
    const std::int64_t n = v.lens[h];
    const std::int32_t* pos = v.head_positions(h);
    const float* s = scores + h * v.capacity;
    std::int32_t* idx = ws.slots + h * v.capacity;
    auto by_position = [&](std::int32_t a, std::int32_t b) { return pos[a] < pos[b]; };
    std::int64_t num_first = 0;
    if (by_score) {
      std::int64_t back = n;
      for (std::int64_t j = 0; j < n; ++j) {
        if (rule.protects(pos[j])) idx[--back] = static_cast<std::int32_t>(j);
        else idx[num_first++] = static_cast<std::int32_t>(j);
      }
      std::sort(idx, idx + num_first, [&](std::int32_t a, std::int32_t b) {
        return s[a] > s[b] || (s[a] == s[b] && pos[a] < pos[b]);
      });
    } else {
      for (std::int64_t j = 0; j < n; ++j) idx[j] = static_cast<std::int32_t>(j);
    }
    std::sort(idx + num_first, idx + n, by_position);
    float* o = order + h * v.capacity;
    for (std::int64_t k = 0; k < n; ++k) o[idx[k]] = static_cast<float>(k);
  }
}

static_assert(CakeScoringBackend<CpuBackend>, "CpuBackend with cake_primitives.hpp must satisfy CakeScoringBackend");

}  // namespace kvevict
