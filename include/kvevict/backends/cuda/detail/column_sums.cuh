// Column sums of softmax rows (H2O's accumulated attention), two ways:
// - from probabilities: one thread per (q_head, slot) adds the rows in query order, the same
//   order as the CPU backend, so results agree bit for bit;
// - from queries, for blocks of queries (prefill, windows): two tiled passes that never hold a
//   T x T matrix. Pass 1 (row_stats) streams key tiles and keeps each query's running max and
//   sum (online softmax); pass 2 (column_sums_tiled) owns a tile of keys, streams query tiles,
//   recomputes the logits and adds exp(l - max) / sum into per-column registers, then writes
//   each column once (deterministic; no atomics). Tiles that causality masks entirely are skipped
//   (half of them for a prompt in position order). Logits are 64 x 64 register tiles built from
//   16-wide head_dim slices in shared memory (fp32 SIMT, no tensor cores: fp32 is the contract).
// Causality is by position: query i (position first + i) sees keys with position <= first + i.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/block_ops.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"

namespace kvevict::cuda::detail {

struct ProbColumnSumsParams {
  DeviceLayer layer;
  const float* probs;         // [q_head, num_queries, probs_stride]
  std::int64_t num_queries;
  std::int64_t probs_stride;
  float* scores;              // [q_head, capacity]
  PerHead fresh_from;         // [kv_head] clamped to [0, capacity]
};
static_assert(std::is_trivially_copyable_v<ProbColumnSumsParams>);

inline constexpr int kColumnThreads = 256;

template <int kThreads>
__global__ void __launch_bounds__(kThreads) prob_column_sums_kernel(ProbColumnSumsParams p) {
  const std::int64_t qh = blockIdx.y;
  const int h = static_cast<int>(qh / p.layer.group_size);
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= p.layer.lens.v[h]) return;
  float* s = p.scores + qh * p.layer.capacity + j;
  float acc = j >= p.fresh_from.v[h] ? 0.0f : *s;
  const float* col = p.probs + qh * p.num_queries * p.probs_stride + j;
  for (std::int64_t i = 0; i < p.num_queries; ++i) acc += col[i * p.probs_stride];
  *s = acc;
}

inline void launch_prob_column_sums(const ProbColumnSumsParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kColumnThreads)),
                  static_cast<unsigned>(p.layer.num_q_heads));
  prob_column_sums_kernel<kColumnThreads><<<grid, kColumnThreads, 0, stream>>>(p);
  check_launch(where, "prob_column_sums_kernel");
}

// ---- tiled query column sums ----

inline constexpr int kTile = 64;     // queries x keys per tile
inline constexpr int kSlice = 16;    // head_dim columns per shared-memory slice
inline constexpr int kTileThreads = 256;  // 16 x 16 threads, each owning 4 x 4 logits

struct QueryColumnSumsParams {
  DeviceLayer layer;
  const float* queries;           // [q_head, num_queries, head_dim]
  std::int64_t num_queries;
  std::int64_t chunk_begin;       // this launch covers queries [chunk_begin, chunk_begin + chunk_rows)
  std::int64_t chunk_rows;
  std::int64_t first_position;    // position of query 0
  float scale;
  float* row_max;                 // workspace [q_head, stats_stride]
  float* row_inv;                 // workspace [q_head, stats_stride]: 1 / sum, 0 for a query that sees nothing
  std::int64_t stats_stride;
  float* scores;                  // [q_head, capacity]
  PerHead fresh_from;             // [kv_head] clamped to [0, capacity]
  bool zero_fresh;                // first chunk only
};
static_assert(std::is_trivially_copyable_v<QueryColumnSumsParams>);

struct TileSmem {
  float q[kSlice][kTile + 1];  // [dim, query] (+1 breaks bank conflicts on the transposed store)
  float k[kSlice][kTile + 1];  // [dim, key]
};

// acc[a][b] = Q[ty + 16a] . K[tx + 16b] over all of head_dim, where Q rows start at `q` (stride
// head_dim, q_rows valid) and K rows at `k` (stride slot_stride, k_rows valid); missing rows are 0.
// Every thread of the block must call it.
__device__ inline void logit_tile(const float* q, std::int64_t q_rows, const float* k, std::int64_t k_rows,
                                  int d, std::int64_t slot_stride, TileSmem& sm, float (&acc)[4][4]) {
  const int tx = static_cast<int>(threadIdx.x) & 15;
  const int ty = static_cast<int>(threadIdx.x) >> 4;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
  for (int d0 = 0; d0 < d; d0 += kSlice) {
    for (int e = threadIdx.x; e < kTile * kSlice; e += kTileThreads) {
      const int r = e / kSlice;
      const int c = e - r * kSlice;
      const int col = d0 + c;
      sm.q[c][r] = (r < q_rows && col < d) ? q[static_cast<std::int64_t>(r) * d + col] : 0.0f;
      sm.k[c][r] = (r < k_rows && col < d) ? k[static_cast<std::int64_t>(r) * slot_stride + col] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kSlice; ++c) {
      float qa[4], kb[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) qa[a] = sm.q[c][ty + 16 * a];
#pragma unroll
      for (int b = 0; b < 4; ++b) kb[b] = sm.k[c][tx + 16 * b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] += qa[a] * kb[b];
    }
    __syncthreads();
  }
}

// Sum or max over the 16 threads that share a tile row (lanes tx = 0..15 of one half-warp).
template <class Op>
__device__ inline float row_reduce16(float v, Op op) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(QueryColumnSumsParams p) {
  __shared__ TileSmem sm;
  __shared__ std::int64_t s_scratch[32];
  const int tx = static_cast<int>(threadIdx.x) & 15;
  const int ty = static_cast<int>(threadIdx.x) >> 4;
  const std::int64_t qh = blockIdx.y;
  const int h = static_cast<int>(qh / p.layer.group_size);
  const std::int64_t n = p.layer.lens.v[h];
  const int d = p.layer.head_dim;
  const std::int64_t i0 = static_cast<std::int64_t>(blockIdx.x) * kTile;  // within the chunk
  const std::int64_t q_rows = min(static_cast<std::int64_t>(kTile), p.chunk_rows - i0);
  const float* q = p.queries + (qh * p.num_queries + p.chunk_begin + i0) * d;
  const std::int32_t* pos = p.layer.head_positions(h);
  const std::int64_t qpos0 = p.first_position + p.chunk_begin + i0;
  float m[4], l[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    m[a] = negative_infinity();
    l[a] = 0.0f;
  }
  const std::int64_t qpos_last = qpos0 + q_rows - 1;
  for (std::int64_t j0 = 0; j0 < n; j0 += kTile) {
    std::int64_t kpos[4];
    std::int64_t kmin = INT64_MAX;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const std::int64_t j = j0 + tx + 16 * b;
      kpos[b] = j < n ? pos[j] : INT64_MAX;
      kmin = MinOp{}(kmin, kpos[b]);
    }
    // Causal skip: when no query of this tile sees any key of it, the tile adds nothing.
    if (block_reduce(kmin, s_scratch, MinOp{}, static_cast<std::int64_t>(INT64_MAX)) > qpos_last) continue;
    float acc[4][4];
    logit_tile(q, q_rows, p.layer.key(h, j0), min(static_cast<std::int64_t>(kTile), n - j0), d, p.layer.slot_stride, sm, acc);
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const std::int64_t qpos = qpos0 + ty + 16 * a;
      float x[4];
      float tile_max = negative_infinity();
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        x[b] = kpos[b] <= qpos ? __fmul_rn(acc[a][b], p.scale) : negative_infinity();  // _rn: no fma with the next subtraction
        tile_max = MaxOp{}(tile_max, x[b]);
      }
      tile_max = row_reduce16(tile_max, MaxOp{});
      const float new_m = MaxOp{}(m[a], tile_max);
      const float correction = m[a] == negative_infinity() ? 0.0f : expf(m[a] - new_m);
      float sum = 0.0f;
#pragma unroll
      for (int b = 0; b < 4; ++b) sum += kpos[b] <= qpos ? expf(x[b] - new_m) : 0.0f;
      sum = row_reduce16(sum, SumOp{});
      l[a] = l[a] * correction + sum;
      m[a] = new_m;
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const std::int64_t r = i0 + ty + 16 * a;
      if (r < p.chunk_rows) {
        p.row_max[qh * p.stats_stride + r] = m[a];
        p.row_inv[qh * p.stats_stride + r] = m[a] == negative_infinity() ? 0.0f : 1.0f / l[a];
      }
    }
  }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) column_sums_tiled_kernel(QueryColumnSumsParams p) {
  __shared__ TileSmem sm;
  __shared__ float s_max[kTile];
  __shared__ float s_inv[kTile];
  __shared__ float s_red[16][kTile + 1];
  __shared__ std::int64_t s_scratch[32];
  const int tx = static_cast<int>(threadIdx.x) & 15;
  const int ty = static_cast<int>(threadIdx.x) >> 4;
  const std::int64_t qh = blockIdx.y;
  const int h = static_cast<int>(qh / p.layer.group_size);
  const std::int64_t n = p.layer.lens.v[h];
  const int d = p.layer.head_dim;
  const std::int64_t j0 = static_cast<std::int64_t>(blockIdx.x) * kTile;
  if (j0 >= n) return;  // the whole block: this head is shorter
  const std::int64_t k_rows = min(static_cast<std::int64_t>(kTile), n - j0);
  const std::int32_t* pos = p.layer.head_positions(h);
  std::int64_t kpos[4];
  std::int64_t kmin = INT64_MAX;
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const std::int64_t j = j0 + tx + 16 * b;
    kpos[b] = j < n ? pos[j] : INT64_MAX;
    kmin = MinOp{}(kmin, kpos[b]);
  }
  kmin = block_reduce(kmin, s_scratch, MinOp{}, static_cast<std::int64_t>(INT64_MAX));
  float col[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (std::int64_t i0 = 0; i0 < p.chunk_rows; i0 += kTile) {
    const std::int64_t q_rows = min(static_cast<std::int64_t>(kTile), p.chunk_rows - i0);
    // Causal skip: the tile's last query precedes every key of this block.
    if (p.first_position + p.chunk_begin + i0 + q_rows - 1 < kmin) continue;
    if (threadIdx.x < kTile) {
      const std::int64_t r = i0 + threadIdx.x;
      s_max[threadIdx.x] = r < p.chunk_rows ? p.row_max[qh * p.stats_stride + r] : negative_infinity();
      s_inv[threadIdx.x] = r < p.chunk_rows ? p.row_inv[qh * p.stats_stride + r] : 0.0f;
    }
    const float* q = p.queries + (qh * p.num_queries + p.chunk_begin + i0) * d;
    float acc[4][4];
    logit_tile(q, q_rows, p.layer.key(h, j0), k_rows, d, p.layer.slot_stride, sm, acc);  // syncs: s_max visible
    const std::int64_t qpos0 = p.first_position + p.chunk_begin + i0;
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int r = ty + 16 * a;
      const float mx = s_max[r];
      const float inv = s_inv[r];
      const std::int64_t qpos = qpos0 + r;
      const bool row_ok = r < q_rows && mx != negative_infinity();
#pragma unroll
      for (int b = 0; b < 4; ++b)
        col[b] += (row_ok && kpos[b] <= qpos) ? expf(__fmul_rn(acc[a][b], p.scale) - mx) * inv : 0.0f;
    }
    __syncthreads();  // s_max / s_inv are rewritten next iteration
  }
#pragma unroll
  for (int b = 0; b < 4; ++b) s_red[ty][tx + 16 * b] = col[b];
  __syncthreads();
  if (ty == 0) {
    const std::int64_t fresh = p.fresh_from.v[h];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int c = tx + 16 * b;
      float sum = 0.0f;
      for (int t = 0; t < 16; ++t) sum += s_red[t][c];
      const std::int64_t j = j0 + c;
      if (j < n) {
        float* s = p.scores + qh * p.layer.capacity + j;
        *s = ((p.zero_fresh && j >= fresh) ? 0.0f : *s) + sum;
      }
    }
  }
}

// One chunk of queries: row statistics, then column sums. Precondition: chunk_rows <= stats_stride.
inline void launch_query_column_sums_tiled(const QueryColumnSumsParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0 || p.chunk_rows <= 0) return;
  const dim3 stats_grid(static_cast<unsigned>(ceil_div(p.chunk_rows, kTile)), static_cast<unsigned>(p.layer.num_q_heads));
  row_stats_kernel<kTileThreads><<<stats_grid, kTileThreads, 0, stream>>>(p);
  check_launch(where, "row_stats_kernel");
  const dim3 sums_grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kTile)), static_cast<unsigned>(p.layer.num_q_heads));
  column_sums_tiled_kernel<kTileThreads><<<sums_grid, kTileThreads, 0, stream>>>(p);
  check_launch(where, "column_sums_tiled_kernel");
}

}  // namespace kvevict::cuda::detail
