// CUDA implementation of CAKE's primitives (core/cake_backend.hpp documents them): free functions
// on CudaBackend found by argument-dependent lookup, each queuing kernels on the backend's stream.
// Kept in this one file (kernels in kvevict::cuda::detail, launches taking a stream) because it
// is CAKE's alone.
//
// Window statistics never materialise the window's rows: pass 1 (one block per (q-head, window
// query)) finds each row's max and 1/sum over its visible keys; pass 2 (one thread per (q-head,
// key)) recomputes the window's logits of its key, and accumulates the fp32 mean, the fp64 Welford
// variance and the fp64 entropy terms; pass 3 (one block) adds the per-key terms in fp64 in a fixed
// order, so the result is deterministic. Logits are fp32 dot products in head_dim order, exp/log
// the CUDA libm ones: results agree with the CPU backend within fp32 rounding (not bit for bit).
// Pooling along the reference order and ranking are exact (same operation order as the CPU).
// Ranking counts, for every entry, the entries ranked before it: O(len^2) work per head, done in
// shared-memory tiles; deterministic, with no sort.
//
// Synchronisation: cake_window_scores* synchronise the stream once (the two statistics are host
// values); the others only queue work. Host pointers in device arguments are not checked here
// (the policy passes its own device buffers).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_backend.cuh"
#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/block_ops.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"
#include "kvevict/core/cake_backend.hpp"
#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"

namespace kvevict::cuda::detail {

inline constexpr int kCakeThreads = 128;       // threads per block of the per-key kernels
inline constexpr int kCakeRowThreads = 256;    // threads per block of the row statistics
inline constexpr int kCakeTotalThreads = 1024; // the one block of the final reduction

// ---- window statistics ----

struct CakeStatsParams {
  DeviceLayer layer;
  const float* queries;       // [q_head, num_queries, head_dim] (query mode), or null
  const float* probs;         // [q_head, num_queries, probs_stride] (probability mode), or null
  std::int64_t probs_stride;
  std::int64_t num_queries;
  std::int64_t first_pos;     // query i sits at first_pos + i; prefix keys have position < first_pos
  float scale;
  float gamma;
  float* row_max;             // [q_head, num_queries] (query mode)
  float* row_inv;             // [q_head, num_queries]: 1 / sum, 0 for a query that sees no key
  float* indicator;           // [q_head, capacity]
  float* terms;               // [2, q_head, capacity] per-key entropy and variance terms, then 2 totals
};
static_assert(std::is_trivially_copyable_v<CakeStatsParams>, "kernel parameters must be trivially copyable");

__device__ inline float cake_logit(const CakeStatsParams& p, std::int64_t qh, std::int64_t h, std::int64_t i,
                                   std::int64_t slot) {
  const float* q = p.queries + (qh * p.num_queries + i) * p.layer.head_dim;
  const float* k = p.layer.key(h, slot);
  float acc = 0.0f;
  for (int e = 0; e < p.layer.head_dim; ++e) acc += q[e] * k[e];
  return acc * p.scale;
}

// Pass 1: blockIdx.x = window query i, blockIdx.y = q-head. Max over the visible keys, then the
// sum of exp(l - max).
template <int = 0>
__global__ void __launch_bounds__(kCakeRowThreads) cake_row_stats_kernel(CakeStatsParams p) {
  __shared__ float scratch[32];
  const std::int64_t i = blockIdx.x, qh = blockIdx.y;
  const std::int64_t h = qh / p.layer.group_size;
  const std::int64_t n = p.layer.lens.v[h];
  const std::int64_t qpos = p.first_pos + i;
  const std::int32_t* pos = p.layer.head_positions(h);
  float mx = negative_infinity();
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x)
    if (pos[j] <= qpos) mx = fmaxf(mx, cake_logit(p, qh, h, i, j));
  mx = block_reduce(mx, scratch, MaxOp{}, negative_infinity());
  float sum = 0.0f;
  if (mx != negative_infinity())
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x)
      if (pos[j] <= qpos) sum += expf(cake_logit(p, qh, h, i, j) - mx);
  sum = block_reduce(sum, scratch, SumOp{}, 0.0f);
  if (threadIdx.x == 0) {
    p.row_max[qh * p.num_queries + i] = mx;
    p.row_inv[qh * p.num_queries + i] = mx == negative_infinity() ? 0.0f : 1.0f / sum;
  }
}

// Pass 2: one thread per (key slot, q-head): the key's window probabilities, their statistics.
template <int = 0>
__global__ void __launch_bounds__(kCakeThreads) cake_column_stats_kernel(CakeStatsParams p) {
  const std::int64_t qh = blockIdx.y;
  const std::int64_t h = qh / p.layer.group_size;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= p.layer.lens.v[h]) return;
  const std::int64_t kpos = p.layer.head_positions(h)[j];
  float sum = 0.0f;
  double mean = 0.0, m2 = 0.0, ent = 0.0;
  for (std::int64_t i = 0; i < p.num_queries; ++i) {
    float prob;
    if (p.probs != nullptr) {
      prob = p.probs[(qh * p.num_queries + i) * p.probs_stride + j];
    } else {
      const float inv = p.row_inv[qh * p.num_queries + i];
      prob = (inv != 0.0f && kpos <= p.first_pos + i)
                 ? expf(cake_logit(p, qh, h, i, j) - p.row_max[qh * p.num_queries + i]) * inv
                 : 0.0f;
    }
    sum += prob;
    const double x = prob, delta = x - mean;  // Welford, fp64
    mean += delta / static_cast<double>(i + 1);
    m2 += delta * (x - mean);
    ent += static_cast<double>(prob * logf(prob + 1e-10f));
  }
  const float var = static_cast<float>(m2 / static_cast<double>(p.num_queries - 1));
  const std::int64_t at = qh * p.layer.capacity + j;
  p.indicator[at] = sum / static_cast<float>(p.num_queries) + p.gamma * var;
  const bool prefix = kpos < p.first_pos;
  p.terms[at] = prefix ? static_cast<float>(-ent) : 0.0f;
  p.terms[static_cast<std::int64_t>(p.layer.num_q_heads) * p.layer.capacity + at] = prefix ? var : 0.0f;
}

// Pass 3: one block adds every live key's terms in fp64, in a fixed order.
template <int = 0>
__global__ void __launch_bounds__(kCakeTotalThreads) cake_stats_total_kernel(CakeStatsParams p) {
  __shared__ double scratch[32];
  const std::int64_t per = static_cast<std::int64_t>(p.layer.num_q_heads) * p.layer.capacity;
  double e = 0.0, v = 0.0;
  for (std::int64_t at = threadIdx.x; at < per; at += blockDim.x) {
    const std::int64_t qh = at / p.layer.capacity, j = at % p.layer.capacity;
    if (j >= p.layer.lens.v[qh / p.layer.group_size]) continue;
    e += static_cast<double>(p.terms[at]);
    v += static_cast<double>(p.terms[per + at]);
  }
  e = block_reduce(e, scratch, SumOp{}, 0.0);
  v = block_reduce(v, scratch, SumOp{}, 0.0);
  if (threadIdx.x == 0) {
    p.terms[2 * per] = static_cast<float>(e);
    p.terms[2 * per + 1] = static_cast<float>(v);
  }
}

// Queues the three passes and reads the two totals back (synchronises the stream).
inline CakeWindowStats launch_cake_window_stats(const CakeStatsParams& p, cudaStream_t stream, const char* where) {
  const std::int64_t per = static_cast<std::int64_t>(p.layer.num_q_heads) * p.layer.capacity;
  check(cudaMemsetAsync(p.terms, 0, static_cast<std::size_t>(2 * per) * sizeof(float), stream), where,
        "cudaMemsetAsync(terms)");
  if (p.queries != nullptr) {
    const dim3 rows(static_cast<unsigned>(p.num_queries), static_cast<unsigned>(p.layer.num_q_heads));
    cake_row_stats_kernel<><<<rows, kCakeRowThreads, 0, stream>>>(p);
    check_launch(where, "cake_row_stats_kernel");
  }
  if (p.layer.max_len > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kCakeThreads)),
                    static_cast<unsigned>(p.layer.num_q_heads));
    cake_column_stats_kernel<><<<grid, kCakeThreads, 0, stream>>>(p);
    check_launch(where, "cake_column_stats_kernel");
  }
  cake_stats_total_kernel<><<<1, kCakeTotalThreads, 0, stream>>>(p);
  check_launch(where, "cake_stats_total_kernel");
  float totals[2] = {0.0f, 0.0f};
  check(cudaMemcpyAsync(totals, p.terms + 2 * per, sizeof(totals), cudaMemcpyDeviceToHost, stream), where,
        "cudaMemcpyAsync(totals)");
  check(cudaStreamSynchronize(stream), where, "cudaStreamSynchronize");
  return CakeWindowStats{totals[0], totals[1]};
}

// ---- pooling along the reference order ----

struct CakePoolParams {
  DeviceLayer layer;
  const float* rows;          // [q_head, row_stride]
  std::int64_t row_stride;
  const float* order;         // [kv_head, capacity] ranks
  std::int64_t fresh_from;    // entries at positions >= fresh_from rank len - next_pos + pos
  std::int64_t next_pos;
  std::int64_t window;
  std::int64_t kernel;        // odd
  float* out;                 // [kv_head, capacity]
  std::int32_t* slot_of;      // [kv_head, capacity] workspace: slot of each rank
};
static_assert(std::is_trivially_copyable_v<CakePoolParams>, "kernel parameters must be trivially copyable");

// slot_of[h, rank(slot)] = slot. Ranks outside [0, len) are ignored (the ranks are a permutation by
// the policy's construction; the CPU backend checks it).
template <int = 0>
__global__ void __launch_bounds__(kCakeThreads) cake_invert_order_kernel(CakePoolParams p) {
  const std::int64_t h = blockIdx.y;
  const std::int64_t s = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t n = p.layer.lens.v[h];
  if (s >= n) return;
  const std::int64_t pos = p.layer.head_positions(h)[s];
  const std::int64_t r = pos >= p.fresh_from ? n - p.next_pos + pos : static_cast<std::int64_t>(p.order[h * p.layer.capacity + s]);
  if (r >= 0 && r < n) p.slot_of[h * p.layer.capacity + r] = static_cast<std::int32_t>(s);
}

// out[slot of rank k] for k < len - window: the CPU backend's loop, term for term (bit-identical).
template <int = 0>
__global__ void __launch_bounds__(kCakeThreads) cake_pool_kernel(CakePoolParams p) {
  const std::int64_t h = blockIdx.y;
  const std::int64_t k = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t m = p.layer.lens.v[h] - p.window;
  if (k >= m) return;
  const std::int32_t* slot_of = p.slot_of + h * p.layer.capacity;
  const std::int64_t radius = p.kernel / 2;
  const std::int64_t lo = k - radius > 0 ? k - radius : 0, hi = k + radius < m - 1 ? k + radius : m - 1;
  const std::int64_t g = p.layer.group_size;
  const float kf = static_cast<float>(p.kernel), gf = static_cast<float>(g);
  float group = 0.0f;
  for (std::int64_t r = 0; r < g; ++r) {
    const float* row = p.rows + (h * g + r) * p.row_stride;
    float acc = 0.0f;
    for (std::int64_t t = lo; t <= hi; ++t) acc += row[slot_of[t]];
    const float pooled = __fdiv_rn(acc, kf);
    group = r == 0 ? pooled : __fadd_rn(group, pooled);
  }
  p.out[h * p.layer.capacity + slot_of[k]] = g == 1 ? group : __fdiv_rn(group, gf);
}

inline void launch_cake_pool(const CakePoolParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kCakeThreads)),
                  static_cast<unsigned>(p.layer.num_kv_heads));
  cake_invert_order_kernel<><<<grid, kCakeThreads, 0, stream>>>(p);
  check_launch(where, "cake_invert_order_kernel");
  cake_pool_kernel<><<<grid, kCakeThreads, 0, stream>>>(p);
  check_launch(where, "cake_pool_kernel");
}

// ---- ranking ----

struct CakeRankParams {
  DeviceLayer layer;
  const float* scores;        // [kv_head, capacity]
  std::int64_t sink_end;      // ProtectRule
  std::int64_t recent_begin;
  bool by_score;
  float* order;               // [kv_head, capacity]
};
static_assert(std::is_trivially_copyable_v<CakeRankParams>, "kernel parameters must be trivially copyable");

// Sort key of one entry: by_score puts unprotected entries first by (score desc, position asc),
// then protected ones by position; otherwise position alone.
struct CakeRankKey {
  int group;  // 0 unprotected, 1 protected (by_score); always 0 otherwise
  float score;
  std::int32_t pos;
};

__device__ inline bool cake_ranks_before(const CakeRankKey& a, const CakeRankKey& b, bool by_score) {
  if (!by_score) return a.pos < b.pos;
  if (a.group != b.group) return a.group < b.group;
  if (a.group == 0 && a.score != b.score) return a.score > b.score;
  return a.pos < b.pos;
}

__device__ inline CakeRankKey cake_rank_key(const CakeRankParams& p, std::int64_t h, std::int64_t s) {
  const std::int32_t pos = p.layer.head_positions(h)[s];
  const bool prot = pos < p.sink_end || pos >= p.recent_begin;
  return {p.by_score && prot ? 1 : 0, p.by_score && !prot ? p.scores[h * p.layer.capacity + s] : 0.0f, pos};
}

// blockIdx.y = kv-head; each thread owns one slot and counts the entries ranked before it,
// streaming the head through shared-memory tiles of kCakeThreads entries.
template <int = 0>
__global__ void __launch_bounds__(kCakeThreads) cake_rank_kernel(CakeRankParams p) {
  __shared__ CakeRankKey tile[kCakeThreads];
  const std::int64_t h = blockIdx.y;
  const std::int64_t n = p.layer.lens.v[h];
  const std::int64_t s = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool live = s < n;
  const CakeRankKey mine = live ? cake_rank_key(p, h, s) : CakeRankKey{0, 0.0f, 0};
  std::int64_t rank = 0;
  for (std::int64_t t0 = 0; t0 < n; t0 += kCakeThreads) {
    const std::int64_t t = t0 + threadIdx.x;
    if (t < n) tile[threadIdx.x] = cake_rank_key(p, h, t);
    __syncthreads();
    const std::int64_t count = n - t0 < kCakeThreads ? n - t0 : kCakeThreads;
    if (live)
      for (std::int64_t i = 0; i < count; ++i) rank += cake_ranks_before(tile[i], mine, p.by_score) ? 1 : 0;
    __syncthreads();
  }
  if (live) p.order[h * p.layer.capacity + s] = static_cast<float>(rank);
}

inline void launch_cake_rank(const CakeRankParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kCakeThreads)),
                  static_cast<unsigned>(p.layer.num_kv_heads));
  cake_rank_kernel<><<<grid, kCakeThreads, 0, stream>>>(p);
  check_launch(where, "cake_rank_kernel");
}

inline void cake_check_window(const char* where, std::int64_t num_queries) {
  if (num_queries < 2)
    kvevict::detail::fail<ArgumentError>(where, "num_queries", num_queries, "must be >= 2 (the variance is unbiased)");
}

}  // namespace kvevict::cuda::detail

namespace kvevict {

// Window statistics from queries (see core/cake_backend.hpp). workspace.rows holds the rows' max
// and 1/sum ([2, q_head, num_queries], within its [window, capacity + 2 q_head] floats),
// workspace.terms the per-key terms. Synchronises the stream.
inline void cake_window_scores(CudaBackend& backend, const LayerView<float>& v, const float* queries,
                               std::int64_t num_queries, std::int64_t first_pos, float scale, float gamma,
                               float* indicator, CakeWindowStats& stats, const CakeWorkspace& ws) {
  constexpr const char* where = "cake_window_scores(CudaBackend)";
  cuda::detail::cake_check_window(where, num_queries);
  cuda::detail::CakeStatsParams p{};
  p.layer = cuda::detail::make_device_layer(where, v);
  p.queries = queries;
  p.num_queries = num_queries;
  p.first_pos = first_pos;
  p.scale = scale;
  p.gamma = gamma;
  p.row_max = ws.rows;
  p.row_inv = ws.rows + v.num_q_heads * num_queries;
  p.indicator = indicator;
  p.terms = ws.terms;
  stats = cuda::detail::launch_cake_window_stats(p, backend.stream(), where);
}

// Window statistics from probabilities [q_head, num_queries, probs_stride] (device memory).
inline void cake_window_scores_from_probs(CudaBackend& backend, const LayerView<float>& v, const float* probs,
                                          std::int64_t num_queries, std::int64_t probs_stride, std::int64_t first_pos,
                                          float gamma, float* indicator, CakeWindowStats& stats,
                                          const CakeWorkspace& ws) {
  constexpr const char* where = "cake_window_scores_from_probs(CudaBackend)";
  cuda::detail::cake_check_window(where, num_queries);
  cuda::detail::CakeStatsParams p{};
  p.layer = cuda::detail::make_device_layer(where, v);
  p.probs = probs;
  p.probs_stride = probs_stride;
  p.num_queries = num_queries;
  p.first_pos = first_pos;
  p.gamma = gamma;
  p.indicator = indicator;
  p.terms = ws.terms;
  stats = cuda::detail::launch_cake_window_stats(p, backend.stream(), where);
}

// Group-mean of avg-pooled rows along each head's reference order; workspace.slots receives the
// inverse order. Asynchronous.
inline void cake_pool_in_order(CudaBackend& backend, const LayerView<float>& v, const float* rows,
                               std::int64_t row_stride, const float* order, std::int64_t fresh_from,
                               std::int64_t next_pos, std::int64_t window, std::int64_t kernel, float* out,
                               const CakeWorkspace& ws) {
  constexpr const char* where = "cake_pool_in_order(CudaBackend)";
  cuda::detail::CakePoolParams p{};
  p.layer = cuda::detail::make_device_layer(where, v);
  p.rows = rows;
  p.row_stride = row_stride;
  p.order = order;
  p.fresh_from = fresh_from;
  p.next_pos = next_pos;
  p.window = window;
  p.kernel = kernel;
  p.out = out;
  p.slot_of = ws.slots;
  cuda::detail::launch_cake_pool(p, backend.stream(), where);
}

// Ranks of every live entry (see core/cake_backend.hpp). Asynchronous.
inline void cake_rank_entries(CudaBackend& backend, const LayerView<float>& v, const float* scores, ProtectRule rule,
                              bool by_score, float* order, const CakeWorkspace& /*ws*/) {
  constexpr const char* where = "cake_rank_entries(CudaBackend)";
  cuda::detail::CakeRankParams p{};
  p.layer = cuda::detail::make_device_layer(where, v);
  p.scores = scores;
  p.sink_end = rule.sink_end;
  p.recent_begin = rule.recent_begin;
  p.by_score = by_score;
  p.order = order;
  cuda::detail::launch_cake_rank(p, backend.stream(), where);
}

static_assert(CakeScoringBackend<CudaBackend>, "CudaBackend with cake_primitives.cuh must satisfy CakeScoringBackend");

}  // namespace kvevict
