// window_column_stats from queries in two tiled passes that never materialise probabilities and
// read each key tile once per 64 query rows (flash-style). The rows of one kv-head are its GQA
// group's (q-head, query) pairs, flattened as g * chunk_queries + i, so a 64 x 64 logit tile mixes
// the group's q-heads and a short window still fills the tile.
// - Pass 1 (window_row_stats_kernel): blocks over (row tile, key range, kv-head) stream key tiles
//   and keep each row's running max and sum of exp (online softmax); one partial pair per key range.
// - Pass 2 (window_column_sums_kernel): blocks over (key tile, kv-head) merge the partials in key
//   range order, recompute the logits row tile by row tile, write p = exp(l - max) / sum to shared
//   memory, and one thread per key column adds the rows in query order into each q-head's sums
//   (and sums of squares). Deterministic: fixed orders everywhere, no atomics.
// Logits are fp32 SIMT fmas over head_dim in order (16-wide shared-memory slices, 4 x 4 register
// blocks read as float4), the same value in both passes. Causality is by position.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/block_ops.cuh"
#include "kvevict/backends/cuda/detail/column_sums.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"

namespace kvevict::cuda::detail {

inline constexpr int kWindowTile = 64;                   // rows x keys of one logit tile
inline constexpr int kWindowSlice = 16;                  // head_dim columns per shared-memory slice
inline constexpr int kWindowPitch = kWindowTile + 4;     // floats per slice row: float4-aligned
inline constexpr int kWindowTileThreads = 256;           // 16 x 16 threads, 4 x 4 logits each
inline constexpr std::int64_t kWindowTargetBlocks = 264;  // pass-1 blocks to aim for (2 per SM of an H100)

// Queries per q-head one chunk of window_column_stats handles: the workspace holds the pass-1
// partials (max and sum, per key range) of that many queries of every q-head.
__host__ __device__ constexpr std::int64_t window_chunk_queries(std::int64_t capacity) {
  return capacity > kWindowTile ? capacity : kWindowTile;
}
// Floats of workspace window_column_stats needs for a layer: 2 x [q_head, window_chunk_queries].
__host__ __device__ constexpr std::int64_t window_workspace_floats(std::int64_t num_q_heads, std::int64_t capacity) {
  return 2 * num_q_heads * window_chunk_queries(capacity);
}

struct WindowStatsParams {
  DeviceLayer layer;
  const float* queries;        // [q_head, num_queries, head_dim]
  std::int64_t num_queries;
  std::int64_t chunk_begin;    // this launch covers queries [chunk_begin, chunk_begin + chunk_queries) of each q-head
  std::int64_t chunk_queries;
  std::int64_t first_pos;      // position of query 0
  float scale;
  std::int64_t num_splits;     // key ranges of pass 1
  std::int64_t split_keys;     // keys per range, a multiple of kWindowTile
  float* part_max;             // [split, q_head, chunk_queries] running max of the range (-inf: saw nothing)
  float* part_sum;             // [split, q_head, chunk_queries] sum of exp(logit - max) over the range
  float* sums;                 // [q_head, capacity]
  float* sumsq;                // [q_head, capacity] or nullptr
  bool accumulate;             // false for the first chunk: the live slots are overwritten
};
static_assert(std::is_trivially_copyable_v<WindowStatsParams>);

struct __align__(16) WindowTileSmem {
  float q[kWindowSlice][kWindowPitch];  // [dim, row]
  float k[kWindowSlice][kWindowPitch];  // [dim, key]
};

// Where the rows of one row tile come from (shared memory, filled by threads < kWindowTile).
struct WindowRowMeta {
  std::int64_t qoff[kWindowTile];  // offset of the query row in `queries`
  std::int64_t qpos[kWindowTile];  // its position; INT64_MIN for a row past the tile's end (sees nothing)
  std::int64_t stat[kWindowTile];  // its index in a [q_head, chunk_queries] partials plane
  std::int32_t qh[kWindowTile];
};

// Row r of the row tile starting at group row gr0 of kv-head h (rows valid rows). Called by
// thread r < kWindowTile; no barrier inside.
__device__ inline void window_fill_row(const WindowStatsParams& p, std::int64_t h, std::int64_t gr0, int rows, int r,
                                       WindowRowMeta& meta) {
  if (r >= rows) {
    meta.qoff[r] = 0;
    meta.qpos[r] = INT64_MIN;
    meta.stat[r] = 0;
    meta.qh[r] = -1;
    return;
  }
  const std::int64_t gr = gr0 + r;
  const std::int64_t g = gr / p.chunk_queries;
  const std::int64_t ii = gr - g * p.chunk_queries;
  const std::int64_t qh = h * p.layer.group_size + g;
  const std::int64_t i = p.chunk_begin + ii;
  meta.qoff[r] = (qh * p.num_queries + i) * p.layer.head_dim;
  meta.qpos[r] = p.first_pos + i;
  meta.stat[r] = qh * p.chunk_queries + ii;
  meta.qh[r] = static_cast<std::int32_t>(qh);
}

// The largest query position among rows [gr0, gr0 + rows) of a group (block-uniform).
__device__ inline std::int64_t window_last_pos(const WindowStatsParams& p, std::int64_t gr0, int rows) {
  const std::int64_t last = gr0 + rows - 1;
  const std::int64_t g_first = gr0 / p.chunk_queries;
  const std::int64_t g_last = last / p.chunk_queries;
  const std::int64_t ii = g_first != g_last ? p.chunk_queries - 1 : last - g_last * p.chunk_queries;
  return p.first_pos + p.chunk_begin + ii;
}

// acc[a][b] = Q[4 ty + a] . K[4 tx + b] over head_dim, in dimension order (one fma chain), for
// the query rows meta.qoff[0 .. q_rows) and the key rows k[0 .. k_rows) (stride slot_stride);
// missing rows and dimensions are 0. Every thread of the block must call it; meta must be
// visible (a barrier after it was written). Ends with a barrier.
__device__ inline void window_logit_tile(const float* queries, const WindowRowMeta& meta, int q_rows, const float* k,
                                         int k_rows, int d, std::int64_t slot_stride, WindowTileSmem& sm,
                                         float (&acc)[4][4]) {
  const int tx = static_cast<int>(threadIdx.x) & 15;
  const int ty = static_cast<int>(threadIdx.x) >> 4;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
  for (int d0 = 0; d0 < d; d0 += kWindowSlice) {
    for (int e = static_cast<int>(threadIdx.x); e < kWindowTile * kWindowSlice; e += kWindowTileThreads) {
      const int r = e / kWindowSlice;
      const int c = e - r * kWindowSlice;
      const int col = d0 + c;
      sm.q[c][r] = (r < q_rows && col < d) ? queries[meta.qoff[r] + col] : 0.0f;
      sm.k[c][r] = (r < k_rows && col < d) ? k[static_cast<std::int64_t>(r) * slot_stride + col] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kWindowSlice; ++c) {
      const float4 q4 = *reinterpret_cast<const float4*>(&sm.q[c][4 * ty]);
      const float4 k4 = *reinterpret_cast<const float4*>(&sm.k[c][4 * tx]);
      const float qa[4] = {q4.x, q4.y, q4.z, q4.w};
      const float kb[4] = {k4.x, k4.y, k4.z, k4.w};
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(qa[a], kb[b], acc[a][b]);
    }
    __syncthreads();  // the slice is overwritten next
  }
}

// Tile keys' positions: kpos[b] of this thread's 4 key columns (INT64_MAX past the tile's
// k_rows keys); returns their minimum.
__device__ inline std::int64_t tile_key_positions(const std::int32_t* pos, std::int64_t j0, int k_rows, int tx,
                                                  std::int64_t (&kpos)[4]) {
  std::int64_t kmin = INT64_MAX;
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const int c = 4 * tx + b;
    kpos[b] = c < k_rows ? static_cast<std::int64_t>(pos[j0 + c]) : INT64_MAX;
    kmin = MinOp{}(kmin, kpos[b]);
  }
  return kmin;
}

// Pass 1: grid (row tiles of the group, key ranges, kv-heads).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) window_row_stats_kernel(WindowStatsParams p) {
  static_assert(kThreads == kWindowTileThreads, "the logit tile is laid out for 16 x 16 threads");
  __shared__ WindowTileSmem sm;
  __shared__ WindowRowMeta meta;
  __shared__ std::int64_t s_scratch[32];
  const int tx = static_cast<int>(threadIdx.x) & 15;
  const int ty = static_cast<int>(threadIdx.x) >> 4;
  const std::int64_t h = blockIdx.z;
  const std::int64_t split = blockIdx.y;
  const std::int64_t gr0 = static_cast<std::int64_t>(blockIdx.x) * kWindowTile;
  const std::int64_t group_rows = p.layer.group_size * p.chunk_queries;
  const int rows = static_cast<int>(min(static_cast<std::int64_t>(kWindowTile), group_rows - gr0));
  const std::int64_t n = p.layer.lens.v[h];
  const int d = p.layer.head_dim;
  if (threadIdx.x < kWindowTile) window_fill_row(p, h, gr0, rows, static_cast<int>(threadIdx.x), meta);
  __syncthreads();
  const std::int64_t qpos_last = window_last_pos(p, gr0, rows);
  std::int64_t qpos[4];
  float m[4], l[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    qpos[a] = meta.qpos[4 * ty + a];
    m[a] = negative_infinity();
    l[a] = 0.0f;
  }
  const std::int32_t* pos = p.layer.head_positions(h);
  const std::int64_t k_begin = split * p.split_keys;
  const std::int64_t k_end = min(n, k_begin + p.split_keys);
  for (std::int64_t j0 = k_begin; j0 < k_end; j0 += kWindowTile) {
    const int k_rows = static_cast<int>(min(static_cast<std::int64_t>(kWindowTile), k_end - j0));
    std::int64_t kpos[4];
    const std::int64_t kmin = tile_key_positions(pos, j0, k_rows, tx, kpos);
    // Causal skip: no row of this tile sees any key of it (block-uniform).
    if (block_reduce(kmin, s_scratch, MinOp{}, static_cast<std::int64_t>(INT64_MAX)) > qpos_last) continue;
    float acc[4][4];
    window_logit_tile(p.queries, meta, rows, p.layer.key(h, j0), k_rows, d, p.layer.slot_stride, sm, acc);
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      float x[4];
      float tile_max = negative_infinity();
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        // _rn: the same rounding as pass 2, never fused with the subtraction that follows.
        x[b] = kpos[b] <= qpos[a] ? __fmul_rn(acc[a][b], p.scale) : negative_infinity();
        tile_max = MaxOp{}(tile_max, x[b]);
      }
      tile_max = row_reduce16(tile_max, MaxOp{});
      const float new_m = MaxOp{}(m[a], tile_max);
      const float correction = m[a] == negative_infinity() ? 0.0f : expf(m[a] - new_m);
      float sum = 0.0f;
#pragma unroll
      for (int b = 0; b < 4; ++b) sum += kpos[b] <= qpos[a] ? expf(x[b] - new_m) : 0.0f;
      sum = row_reduce16(sum, SumOp{});
      l[a] = l[a] * correction + sum;
      m[a] = new_m;
    }
  }
  if (tx == 0) {
    const std::int64_t plane = static_cast<std::int64_t>(p.layer.num_q_heads) * p.chunk_queries;
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int r = 4 * ty + a;
      if (r < rows) {
        p.part_max[split * plane + meta.stat[r]] = m[a];
        p.part_sum[split * plane + meta.stat[r]] = l[a];
      }
    }
  }
}

// Pass 2: grid (key tiles of max_len, kv-heads). Thread c < kWindowTile owns key column j0 + c
// and carries the current q-head's running sums across row tiles; a q-head's rows are
// consecutive group rows, so each is finished (written) once.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) window_column_sums_kernel(WindowStatsParams p) {
  static_assert(kThreads == kWindowTileThreads, "the logit tile is laid out for 16 x 16 threads");
  __shared__ WindowTileSmem sm;
  __shared__ WindowRowMeta meta;
  __shared__ float s_max[kWindowTile];
  __shared__ float s_inv[kWindowTile];                        // 1 / sum; 0 for a row that sees nothing
  __shared__ __align__(16) float s_p[kWindowTile][kWindowPitch];  // [row, key] probabilities of the tile
  __shared__ std::int64_t s_scratch[32];
  const int tx = static_cast<int>(threadIdx.x) & 15;
  const int ty = static_cast<int>(threadIdx.x) >> 4;
  const std::int64_t h = blockIdx.y;
  const std::int64_t n = p.layer.lens.v[h];
  const std::int64_t j0 = static_cast<std::int64_t>(blockIdx.x) * kWindowTile;
  if (j0 >= n) return;  // the whole block: this head is shorter
  const int k_rows = static_cast<int>(min(static_cast<std::int64_t>(kWindowTile), n - j0));
  const int d = p.layer.head_dim;
  const std::int32_t* pos = p.layer.head_positions(h);
  std::int64_t kpos[4];
  std::int64_t kmin = tile_key_positions(pos, j0, k_rows, tx, kpos);
  kmin = block_reduce(kmin, s_scratch, MinOp{}, static_cast<std::int64_t>(INT64_MAX));
  const std::int64_t plane = static_cast<std::int64_t>(p.layer.num_q_heads) * p.chunk_queries;
  const std::int64_t cap = p.layer.capacity;
  const std::int64_t group_rows = p.layer.group_size * p.chunk_queries;
  const int col = static_cast<int>(threadIdx.x);
  const bool owner = col < k_rows;  // k_rows <= kWindowTile
  const std::int64_t j = j0 + col;
  std::int64_t cur_qh = -1;
  float s = 0.0f, sq = 0.0f;
  auto finish = [&](std::int64_t qh) {
    p.sums[qh * cap + j] = s;
    if (p.sumsq != nullptr) p.sumsq[qh * cap + j] = sq;
  };
  for (std::int64_t gr0 = 0; gr0 < group_rows; gr0 += kWindowTile) {
    const int rows = static_cast<int>(min(static_cast<std::int64_t>(kWindowTile), group_rows - gr0));
    if (threadIdx.x < kWindowTile) {
      const int r = static_cast<int>(threadIdx.x);
      window_fill_row(p, h, gr0, rows, r, meta);
      float mx = negative_infinity(), inv = 0.0f;
      if (r < rows) {
        // Merge the key ranges' partials in range order.
        const std::int64_t stat = meta.stat[r];
        for (std::int64_t sp = 0; sp < p.num_splits; ++sp) mx = MaxOp{}(mx, p.part_max[sp * plane + stat]);
        if (mx != negative_infinity()) {
          float l = 0.0f;
          for (std::int64_t sp = 0; sp < p.num_splits; ++sp) {
            const float ms = p.part_max[sp * plane + stat];
            if (ms != negative_infinity()) l += p.part_sum[sp * plane + stat] * expf(ms - mx);
          }
          inv = 1.0f / l;
        }
      }
      s_max[r] = mx;
      s_inv[r] = inv;
    }
    // Causal skip: the tile's last query precedes every key of this block (block-uniform).
    const bool skip = window_last_pos(p, gr0, rows) < kmin;
    __syncthreads();  // meta, s_max, s_inv visible
    if (!skip) {
      float acc[4][4];
      window_logit_tile(p.queries, meta, rows, p.layer.key(h, j0), k_rows, d, p.layer.slot_stride, sm, acc);
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const int r = 4 * ty + a;
        const float mx = s_max[r];
        const float inv = s_inv[r];
        const std::int64_t qpos = meta.qpos[r];
        const bool row_ok = mx != negative_infinity();  // false past the tile's end too
        float pr[4];
#pragma unroll
        for (int b = 0; b < 4; ++b)
          pr[b] = (row_ok && kpos[b] <= qpos) ? expf(__fmul_rn(acc[a][b], p.scale) - mx) * inv : 0.0f;
        *reinterpret_cast<float4*>(&s_p[r][4 * tx]) = make_float4(pr[0], pr[1], pr[2], pr[3]);
      }
      __syncthreads();  // s_p visible
    }
    if (owner) {
      for (int r = 0; r < rows; ++r) {
        const std::int64_t qh = meta.qh[r];
        if (qh != cur_qh) {
          if (cur_qh >= 0) finish(cur_qh);
          cur_qh = qh;
          s = p.accumulate ? p.sums[qh * cap + j] : 0.0f;
          sq = (p.accumulate && p.sumsq != nullptr) ? p.sumsq[qh * cap + j] : 0.0f;
        }
        const float x = skip ? 0.0f : s_p[r][col];
        s = __fadd_rn(s, x);
        sq = __fadd_rn(sq, __fmul_rn(x, x));
      }
    }
    __syncthreads();  // meta, s_max, s_inv and s_p are rewritten by the next row tile
  }
  if (owner && cur_qh >= 0) finish(cur_qh);
}

// sums (and sumsq) of the window queries' softmaxes over the live keys of each q-head's kv-head;
// overwrites the live slots. workspace: window_workspace_floats(num_q_heads, capacity) floats of
// device memory. Queues 2 kernels per chunk of window_chunk_queries / key ranges queries (one
// chunk for any window up to the capacity); no allocation, no synchronisation.
inline void launch_window_stats_tiled(const DeviceLayer& layer, const float* queries, std::int64_t num_queries,
                                      std::int64_t first_pos, float scale, float* sums, float* sumsq, float* workspace,
                                      cudaStream_t stream, const char* where) {
  if (layer.max_len == 0 || num_queries <= 0) return;
  const std::int64_t group = layer.group_size;
  const std::int64_t heads = layer.num_kv_heads;
  const std::int64_t key_tiles = ceil_div(layer.max_len, kWindowTile);
  const std::int64_t chunk_cap = window_chunk_queries(layer.capacity);
  // Split the key axis so that pass 1 has about kWindowTargetBlocks blocks even for a short
  // window; the queries of a chunk shrink so that every range's partials fit the workspace
  // (chunk_cap / splits >= 32, as splits <= ceil(capacity / 64)).
  const std::int64_t row_tiles_full = ceil_div(group * std::min(num_queries, chunk_cap), kWindowTile);
  std::int64_t splits = std::clamp<std::int64_t>(ceil_div(kWindowTargetBlocks, row_tiles_full * heads), 1, key_tiles);
  const std::int64_t chunk = std::min(num_queries, chunk_cap / splits);
  const std::int64_t split_keys = ceil_div(key_tiles, splits) * kWindowTile;
  splits = ceil_div(layer.max_len, split_keys);  // no empty trailing range
  for (std::int64_t cb = 0; cb < num_queries; cb += chunk) {
    const std::int64_t cq = std::min(chunk, num_queries - cb);
    const std::int64_t plane = layer.num_q_heads * cq;
    WindowStatsParams p{layer,  queries,   num_queries, cb,   cq,    first_pos, scale, splits, split_keys,
                        workspace, workspace + splits * plane, sums, sumsq, cb > 0};
    const dim3 stats_grid(static_cast<unsigned>(ceil_div(group * cq, kWindowTile)), static_cast<unsigned>(splits),
                          static_cast<unsigned>(heads));
    window_row_stats_kernel<kWindowTileThreads><<<stats_grid, kWindowTileThreads, 0, stream>>>(p);
    check_launch(where, "window_row_stats_kernel");
    const dim3 sums_grid(static_cast<unsigned>(key_tiles), static_cast<unsigned>(heads));
    window_column_sums_kernel<kWindowTileThreads><<<sums_grid, kWindowTileThreads, 0, stream>>>(p);
    check_launch(where, "window_column_sums_kernel");
  }
}

}  // namespace kvevict::cuda::detail
