// Observation-window primitives of the CUDA backend (WindowScoringBackend): window column
// statistics (from queries or from probabilities), token pooling, the layer mean, key-norm and
// KeyDiff scores, and the protected-score padding. head_budgets and copy_within need no kernel
// (the backend runs them with copies). Semantics are CpuBackend's; every reduction runs in a
// fixed order, so results are deterministic run to run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"
#include "kvevict/backends/cuda/detail/window_stats_tiled.cuh"
#include "kvevict/core/layer_view.hpp"

namespace kvevict::cuda::detail {

inline constexpr int kWindowThreads = 256;

// Block-wide max / sum of one float per thread (kThreads a multiple of 32); every thread gets it.
template <int kThreads>
__device__ float block_max(float x, float* smem) {
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = x < y ? y : x;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = x;
  __syncthreads();
  float r = smem[0];
  for (int w = 1; w < kThreads / 32; ++w) r = r < smem[w] ? smem[w] : r;
  return r;
}
template <int kThreads>
__device__ float block_sum(float x, float* smem) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = x;
  __syncthreads();
  float r = smem[0];
  for (int w = 1; w < kThreads / 32; ++w) r += smem[w];
  return r;
}

// ---- window_column_stats ----

struct ColumnStatsParams {
  DeviceLayer layer;
  const float* rows;         // row r of q-head qh at rows + (qh * rows_per_head + r) * row_stride (+ row_offset)
  std::int64_t rows_per_head;  // flattened rows per q-head (num_queries)
  std::int64_t row_stride;
  std::int64_t row_begin;    // first flattened row held by `rows` (0 for the probabilities path)
  std::int64_t row_end;      // one past the last
  bool tile;                 // true: `rows` is the tile workspace (row r at (r - row_begin) * row_stride)
  float* sums;               // [q_head, capacity]
  float* sumsq;              // nullable
};
static_assert(std::is_trivially_copyable_v<ColumnStatsParams>);

// Adds, in row order, the rows [row_begin, row_end) that belong to q-head blockIdx.y + y0 into
// its sums (and sums of squares); the q-head's first row overwrites instead of adding.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) column_stats_kernel(ColumnStatsParams p, std::int64_t qh0) {
  const std::int64_t qh = qh0 + blockIdx.y;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const std::int64_t n = p.layer.lens.v[qh / p.layer.group_size];
  if (j >= n) return;
  const std::int64_t head_first = qh * p.rows_per_head, head_end = head_first + p.rows_per_head;
  const std::int64_t r0 = head_first > p.row_begin ? head_first : p.row_begin;
  const std::int64_t r1 = head_end < p.row_end ? head_end : p.row_end;
  const std::int64_t cap = p.layer.capacity;
  const bool fresh = r0 == head_first;
  float s = fresh ? 0.0f : p.sums[qh * cap + j];
  float sq = (p.sumsq == nullptr || fresh) ? 0.0f : p.sumsq[qh * cap + j];
  for (std::int64_t r = r0; r < r1; ++r) {
    const float x = p.tile ? p.rows[(r - p.row_begin) * p.row_stride + j] : p.rows[r * p.row_stride + j];
    s = __fadd_rn(s, x);
    sq = __fadd_rn(sq, __fmul_rn(x, x));
  }
  p.sums[qh * cap + j] = s;
  if (p.sumsq != nullptr) p.sumsq[qh * cap + j] = sq;
}

// Runs the column statistics of flattened rows [p.row_begin, p.row_end) (q-heads covering them).
inline void launch_column_stats(const ColumnStatsParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0 || p.rows_per_head <= 0) return;
  const std::int64_t qh0 = p.row_begin / p.rows_per_head;
  const std::int64_t qh1 = (p.row_end - 1) / p.rows_per_head + 1;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kWindowThreads)), static_cast<unsigned>(qh1 - qh0));
  column_stats_kernel<kWindowThreads><<<grid, kWindowThreads, 0, stream>>>(p, qh0);
  check_launch(where, "column_stats_kernel");
}

struct FillParams {
  DeviceLayer layer;
  float* a;  // [q_head, capacity]
  float* b;  // nullable
};
static_assert(std::is_trivially_copyable_v<FillParams>);

template <int kThreads>
__global__ void __launch_bounds__(kThreads) zero_live_kernel(FillParams p) {
  const std::int64_t qh = blockIdx.y;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= p.layer.lens.v[qh / p.layer.group_size]) return;
  p.a[qh * p.layer.capacity + j] = 0.0f;
  if (p.b != nullptr) p.b[qh * p.layer.capacity + j] = 0.0f;
}

// Zeroes the live slots of every q-head row of a and b.
inline void launch_zero_live(const FillParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kWindowThreads)),
                  static_cast<unsigned>(p.layer.num_q_heads));
  zero_live_kernel<kWindowThreads><<<grid, kWindowThreads, 0, stream>>>(p);
  check_launch(where, "zero_live_kernel");
}

// sums/sumsq of query softmaxes (window_stats_tiled.cuh: row statistics, then column sums, no
// probabilities held); no query zeroes the live slots. workspace: window_workspace_floats floats.
inline void launch_window_column_stats(const DeviceLayer& layer, const float* queries, std::int64_t num_queries,
                                       std::int64_t first_pos, float scale, float* sums, float* sumsq,
                                       float* workspace, cudaStream_t stream, const char* where) {
  if (num_queries <= 0) {
    launch_zero_live({layer, sums, sumsq}, stream, where);
    return;
  }
  launch_window_stats_tiled(layer, queries, num_queries, first_pos, scale, sums, sumsq, workspace, stream, where);
}

// ---- pool_tokens ----

struct PoolParams {
  DeviceLayer layer;
  const float* in;   // [kv_head * rows_per_kv_head, capacity]
  float* out;
  std::int64_t rows_per_kv_head;
  PerHead span;      // min(span[h], lens[h]), >= 0
  std::int32_t radius;
  float inv_kernel;
  bool max;
};
static_assert(std::is_trivially_copyable_v<PoolParams>);

template <int kThreads>
__global__ void __launch_bounds__(kThreads) pool_tokens_kernel(PoolParams p) {
  const std::int64_t row = blockIdx.y;
  const std::int64_t h = row / p.rows_per_kv_head;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const std::int64_t n = p.layer.lens.v[h];
  if (j >= n) return;
  const float* x = p.in + row * p.layer.capacity;
  float* y = p.out + row * p.layer.capacity;
  const std::int64_t m = p.span.v[h];
  if (j >= m) {
    y[j] = x[j];
    return;
  }
  const std::int64_t lo = j - p.radius > 0 ? j - p.radius : 0;
  const std::int64_t hi = j + p.radius < m - 1 ? j + p.radius : m - 1;
  float acc = x[lo];  // the CPU's order: x[lo], then + x[lo+1] ... (max: std::max's choice)
  for (std::int64_t t = lo + 1; t <= hi; ++t) {
    const float v = x[t];
    if (p.max)
      acc = acc < v ? v : acc;
    else
      acc = __fadd_rn(acc, v);
  }
  y[j] = p.max ? acc : __fmul_rn(acc, p.inv_kernel);
}

inline void launch_pool_tokens(const PoolParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0 || p.rows_per_kv_head <= 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kWindowThreads)),
                  static_cast<unsigned>(p.layer.num_kv_heads * p.rows_per_kv_head));
  pool_tokens_kernel<kWindowThreads><<<grid, kWindowThreads, 0, stream>>>(p);
  check_launch(where, "pool_tokens_kernel");
}

// ---- layer_mean ----

struct LayerMeanParams {
  DeviceLayer layer;
  const float* in;  // [q_head, capacity]
  float* out;       // [kv_head, capacity]
};
static_assert(std::is_trivially_copyable_v<LayerMeanParams>);

template <int kThreads>
__global__ void __launch_bounds__(kThreads) layer_mean_kernel(LayerMeanParams p) {
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= p.layer.lens.v[0]) return;
  const std::int64_t cap = p.layer.capacity;
  float o = 0.0f;
  for (std::int64_t qh = 0; qh < p.layer.num_q_heads; ++qh) o = __fadd_rn(o, p.in[qh * cap + j]);
  o = __fmul_rn(o, 1.0f / static_cast<float>(p.layer.num_q_heads));
  for (std::int64_t h = 0; h < p.layer.num_kv_heads; ++h) p.out[h * cap + j] = o;
}

inline void launch_layer_mean(const LayerMeanParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.lens.v[0] == 0) return;
  layer_mean_kernel<kWindowThreads>
      <<<static_cast<unsigned>(ceil_div(p.layer.lens.v[0], kWindowThreads)), kWindowThreads, 0, stream>>>(p);
  check_launch(where, "layer_mean_kernel");
}

// ---- key_norm_scores / key_diff_scores ----

struct KeyScoreParams {
  DeviceLayer layer;
  float* out;  // [kv_head, capacity]
};
static_assert(std::is_trivially_copyable_v<KeyScoreParams>);

// ||k||_2 accumulated in double, rounded once (the CPU's float sum is within a few ulps of it).
__device__ inline float key_norm(const float* k, std::int64_t d) {
  double acc = 0.0;
  for (std::int64_t t = 0; t < d; ++t) acc += static_cast<double>(k[t]) * k[t];
  return static_cast<float>(sqrt(acc));
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) key_norm_kernel(KeyScoreParams p) {
  const std::int64_t h = blockIdx.y;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= p.layer.lens.v[h]) return;
  p.out[h * p.layer.capacity + j] = -key_norm(p.layer.key(h, j), p.layer.head_dim);
}

inline void launch_key_norm_scores(const KeyScoreParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kWindowThreads)),
                  static_cast<unsigned>(p.layer.num_kv_heads));
  key_norm_kernel<kWindowThreads><<<grid, kWindowThreads, 0, stream>>>(p);
  check_launch(where, "key_norm_kernel");
}

// One block per kv-head: norms into out, the anchor (summed in slot order per dimension, as the
// CPU does) in shared memory, then -cos(k_j, anchor).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) key_diff_kernel(KeyScoreParams p) {
  extern __shared__ float anchor[];  // [head_dim]
  __shared__ float anchor_norm;
  const std::int64_t h = blockIdx.x;
  const std::int64_t n = p.layer.lens.v[h];
  if (n == 0) return;
  const std::int64_t d = p.layer.head_dim;
  float* o = p.out + h * p.layer.capacity;
  for (std::int64_t j = threadIdx.x; j < n; j += kThreads) o[j] = key_norm(p.layer.key(h, j), d);
  __syncthreads();
  for (std::int64_t t = threadIdx.x; t < d; t += kThreads) {
    float a = 0.0f;
    for (std::int64_t j = 0; j < n; ++j) {
      const float nj = o[j] < 1e-12f ? 1e-12f : o[j];
      a = __fadd_rn(a, __fdiv_rn(p.layer.key(h, j)[t], nj));
    }
    anchor[t] = __fdiv_rn(a, static_cast<float>(n));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double acc = 0.0;
    for (std::int64_t t = 0; t < d; ++t) acc += static_cast<double>(anchor[t]) * anchor[t];
    anchor_norm = static_cast<float>(sqrt(acc));
  }
  __syncthreads();
  const float an = anchor_norm < 1e-8f ? 1e-8f : anchor_norm;
  for (std::int64_t j = threadIdx.x; j < n; j += kThreads) {
    const float* k = p.layer.key(h, j);
    double dot = 0.0;
    for (std::int64_t t = 0; t < d; ++t) dot += static_cast<double>(k[t]) * anchor[t];
    const float denom = __fmul_rn(o[j] < 1e-8f ? 1e-8f : o[j], an);
    o[j] = __fdiv_rn(-static_cast<float>(dot), denom);
  }
}

inline void launch_key_diff_scores(const KeyScoreParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0) return;
  const std::size_t smem = static_cast<std::size_t>(p.layer.head_dim) * sizeof(float);
  if (smem > 48 * 1024)
    kvevict::detail::fail<UnsupportedError>(where, "head_dim", p.layer.head_dim, "the CUDA KeyDiff takes head_dim <= 12288");
  key_diff_kernel<kWindowThreads><<<static_cast<unsigned>(p.layer.num_kv_heads), kWindowThreads, smem, stream>>>(p);
  check_launch(where, "key_diff_kernel");
}

// ---- raise_protected ----

struct RaiseProtectedParams {
  DeviceLayer layer;
  float* scores;  // [kv_head, capacity]
  std::int64_t sink_end;
  std::int64_t recent_begin;
};
static_assert(std::is_trivially_copyable_v<RaiseProtectedParams>);

template <int kThreads>
__global__ void __launch_bounds__(kThreads) raise_protected_kernel(RaiseProtectedParams p) {
  __shared__ float red[kThreads / 32];
  const std::int64_t h = blockIdx.x;
  const std::int64_t n = p.layer.lens.v[h];
  const std::int32_t* pos = p.layer.head_positions(h);
  float* s = p.scores + h * p.layer.capacity;
  const float ninf = negative_infinity();
  float mx = ninf;
  for (std::int64_t j = threadIdx.x; j < n; j += kThreads) {
    const std::int64_t q = pos[j];
    if (!(q < p.sink_end || q >= p.recent_begin)) mx = mx < s[j] ? s[j] : mx;  // NaN never wins, as std::max
  }
  mx = block_max<kThreads>(mx, red);
  if (mx == ninf) mx = 0.0f;
  const float raised = mx + 1.0f;
  for (std::int64_t j = threadIdx.x; j < n; j += kThreads) {
    const std::int64_t q = pos[j];
    if (q < p.sink_end || q >= p.recent_begin) s[j] = raised;
  }
}

inline void launch_raise_protected(const RaiseProtectedParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0) return;
  raise_protected_kernel<kWindowThreads><<<static_cast<unsigned>(p.layer.num_kv_heads), kWindowThreads, 0, stream>>>(p);
  check_launch(where, "raise_protected_kernel");
}

}  // namespace kvevict::cuda::detail
