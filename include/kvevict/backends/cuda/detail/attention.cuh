// Decode-shaped attention: one query per q-head against every live slot of its kv-head.
// - group_logits: logits[qh, j] = q[qh] . K[qh/G, j] * scale (-inf where the key's position is
//   past mask_position). One warp per key, lanes over head_dim; the q-heads of a GQA group share
//   each key row (batches of kGroupBatch q-heads per block).
// - softmax_rows: one block per q-head; normalises in place (attention_probs) or adds the
//   probabilities to running column sums (single-query column sums).
// - attend: out[qh] = sum_j probs[qh, j] V[qh/G, j], chunked over slots into a workspace of
//   partial sums, then reduced in chunk order (deterministic, no atomics).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/block_ops.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"

namespace kvevict::cuda::detail {

inline constexpr int kGroupBatch = 8;        // q-heads per block in the GQA-shared kernels
inline constexpr int kLogitsWarps = 8;       // keys per block in group_logits
inline constexpr int kSoftmaxThreads = 512;
inline constexpr std::int64_t kAttendChunk = 64;  // slots per partial sum in attend

struct GroupLogitsParams {
  DeviceLayer layer;
  const float* q;               // row of q-head qh at q + qh * q_head_stride, head_dim floats
  std::int64_t q_head_stride;   // elements
  float scale;
  std::int64_t mask_position;   // keys with position > mask_position get -inf; INT64_MAX: none
  float* logits;                // [q_head, logits_stride]
  std::int64_t logits_stride;
};
static_assert(std::is_trivially_copyable_v<GroupLogitsParams>);

template <int kThreads>
__global__ void __launch_bounds__(kThreads) group_logits_kernel(GroupLogitsParams p) {
  extern __shared__ float s_q[];  // [kGroupBatch, head_dim]
  const int g_batches = static_cast<int>((p.layer.group_size + kGroupBatch - 1) / kGroupBatch);
  const int h = static_cast<int>(blockIdx.y) / g_batches;
  const int g0 = (static_cast<int>(blockIdx.y) % g_batches) * kGroupBatch;
  const int g_count = min(kGroupBatch, p.layer.group_size - g0);
  const int d = p.layer.head_dim;
  const std::int64_t qh0 = static_cast<std::int64_t>(h) * p.layer.group_size + g0;
  for (int e = threadIdx.x; e < g_count * d; e += blockDim.x) {
    const int g = e / d;
    s_q[e] = p.q[(qh0 + g) * p.q_head_stride + (e - g * d)];
  }
  __syncthreads();
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kLogitsWarps + (threadIdx.x >> 5);
  if (j >= p.layer.lens.v[h]) return;  // whole warps leave together
  const float* k = p.layer.key(h, j);
  float acc[kGroupBatch];
#pragma unroll
  for (int g = 0; g < kGroupBatch; ++g) acc[g] = 0.0f;
  for (int t = lane; t < d; t += 32) {
    const float kv = k[t];
#pragma unroll
    for (int g = 0; g < kGroupBatch; ++g)
      if (g < g_count) acc[g] += s_q[g * d + t] * kv;
  }
  const bool masked = p.layer.head_positions(h)[j] > p.mask_position;
#pragma unroll
  for (int g = 0; g < kGroupBatch; ++g) {
    const float dot = warp_reduce(acc[g], SumOp{});
    if (lane == g && g < g_count)
      p.logits[(qh0 + g) * p.logits_stride + j] = masked ? negative_infinity() : dot * p.scale;
  }
}

inline void launch_group_logits(const GroupLogitsParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0) return;
  const std::int64_t g_batches = ceil_div(p.layer.group_size, kGroupBatch);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kLogitsWarps)),
                  static_cast<unsigned>(p.layer.num_kv_heads * g_batches));
  const auto smem = static_cast<std::size_t>(kGroupBatch) * static_cast<std::size_t>(p.layer.head_dim) * sizeof(float);
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(group_logits_kernel<kLogitsWarps * 32>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
          where, "cudaFuncSetAttribute(group_logits_kernel)");
  group_logits_kernel<kLogitsWarps * 32><<<grid, kLogitsWarps * 32, smem, stream>>>(p);
  check_launch(where, "group_logits_kernel");
}

struct SoftmaxRowsParams {
  DeviceLayer layer;
  float* rows;              // [q_head, row_stride] logits of the live slots, -inf where masked
  std::int64_t row_stride;
  // nullptr: rows become probabilities in place. Otherwise scores[qh, j] receives
  // (zero_fresh && j >= fresh_from[h] ? 0 : scores[qh, j]) + probability, and rows keep exp().
  float* scores;            // [q_head, scores_stride]
  std::int64_t scores_stride;
  PerHead fresh_from;       // [kv_head], clamped to [0, capacity]
  bool zero_fresh;
  // Normalising only (nullptr: off): receives step_id when a row is not finite (a NaN/Inf logit,
  // or no finite one), for the fused decode step of attend_evict.cuh.
  std::int32_t* nonfinite;
  std::int32_t step_id;
};
static_assert(std::is_trivially_copyable_v<SoftmaxRowsParams>);

template <int kThreads>
__global__ void __launch_bounds__(kThreads) softmax_rows_kernel(SoftmaxRowsParams p) {
  __shared__ float scratch[32];
  const std::int64_t qh = blockIdx.x;
  const int h = static_cast<int>(qh / p.layer.group_size);
  const std::int64_t n = p.layer.lens.v[h];
  if (n == 0) return;
  float* row = p.rows + qh * p.row_stride;
  float m = negative_infinity();
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) m = MaxOp{}(m, row[j]);
  m = block_reduce(m, scratch, MaxOp{}, negative_infinity());
  float* s = p.scores != nullptr ? p.scores + qh * p.scores_stride : nullptr;
  const std::int64_t fresh = p.fresh_from.v[h];
  if (m == negative_infinity()) {  // this query sees no key: it contributes nothing
    if (p.nonfinite != nullptr && threadIdx.x == 0) *p.nonfinite = p.step_id;
    if (s != nullptr && p.zero_fresh)
      for (std::int64_t j = fresh + threadIdx.x; j < n; j += blockDim.x) s[j] = 0.0f;
    return;
  }
  float sum = 0.0f;
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float e = expf(row[j] - m);
    row[j] = e;
    sum += e;
  }
  sum = block_reduce(sum, scratch, SumOp{}, 0.0f);
  // A NaN or +Inf logit makes the sum NaN (exp of NaN, or of inf - inf).
  if (p.nonfinite != nullptr && threadIdx.x == 0 && !isfinite(sum)) *p.nonfinite = p.step_id;
  const float inv = 1.0f / sum;
  if (s == nullptr) {
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) row[j] *= inv;
  } else {
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float base = (p.zero_fresh && j >= fresh) ? 0.0f : s[j];
      s[j] = base + row[j] * inv;
    }
  }
}

inline void launch_softmax_rows(const SoftmaxRowsParams& p, cudaStream_t stream, const char* where) {
  if (p.layer.max_len == 0) return;
  softmax_rows_kernel<kSoftmaxThreads><<<static_cast<unsigned>(p.layer.num_q_heads), kSoftmaxThreads, 0, stream>>>(p);
  check_launch(where, "softmax_rows_kernel");
}

struct AttendParams {
  DeviceLayer layer;
  const float* probs;            // [q_head, probs_stride]
  std::int64_t probs_stride;
  float* partial;                // workspace [q_head, max_chunks, head_dim]
  std::int64_t max_chunks;       // chunks per q-head the workspace holds
  float* out;                    // [q_head, head_dim]
};
static_assert(std::is_trivially_copyable_v<AttendParams>);

inline constexpr int kAttendThreads = 128;
// Blocks per multiprocessor the attend kernels are compiled for (caps registers at 48): the loop
// over a chunk's slots is latency-bound, so more resident warps beat more unrolled loads
// (measured: 80 registers otherwise, and a slower attention).
inline constexpr int kAttendMinBlocks = 10;

// One block's share of attend: q-heads qh0 .. qh0 + g_count - 1 (kv-head h) over chunk c.
__device__ inline void attend_partial_chunk(const AttendParams& p, int h, std::int64_t qh0, int g_count, std::int64_t c) {
  const std::int64_t n = p.layer.lens.v[h];
  const std::int64_t j0 = c * kAttendChunk;
  if (j0 >= n) return;
  const std::int64_t j1 = min(n, j0 + kAttendChunk);
  const int d = p.layer.head_dim;
  for (int t = threadIdx.x; t < d; t += blockDim.x) {
    float acc[kGroupBatch];
#pragma unroll
    for (int g = 0; g < kGroupBatch; ++g) acc[g] = 0.0f;
    for (std::int64_t j = j0; j < j1; ++j) {
      const float v = p.layer.value(h, j)[t];
#pragma unroll
      for (int g = 0; g < kGroupBatch; ++g)
        if (g < g_count) acc[g] += p.probs[(qh0 + g) * p.probs_stride + j] * v;
    }
#pragma unroll
    for (int g = 0; g < kGroupBatch; ++g)
      if (g < g_count) p.partial[((qh0 + g) * p.max_chunks + c) * d + t] = acc[g];
  }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads, kAttendMinBlocks) attend_partial_kernel(AttendParams p) {
  const int g_batches = static_cast<int>((p.layer.group_size + kGroupBatch - 1) / kGroupBatch);
  const int h = static_cast<int>(blockIdx.y) / g_batches;
  const int g0 = (static_cast<int>(blockIdx.y) % g_batches) * kGroupBatch;
  const int g_count = min(kGroupBatch, p.layer.group_size - g0);
  attend_partial_chunk(p, h, static_cast<std::int64_t>(h) * p.layer.group_size + g0, g_count, blockIdx.x);
}

// out[qh] = the sum of q-head qh's partial sums over its kv-head's chunks, in chunk order.
__device__ inline void attend_reduce_row(const AttendParams& p, std::int64_t qh) {
  const int h = static_cast<int>(qh / p.layer.group_size);
  const std::int64_t chunks = ceil_div(p.layer.lens.v[h], kAttendChunk);
  const int d = p.layer.head_dim;
  for (int t = threadIdx.x; t < d; t += blockDim.x) {
    float acc = 0.0f;
    for (std::int64_t c = 0; c < chunks; ++c) acc += p.partial[(qh * p.max_chunks + c) * d + t];
    p.out[qh * d + t] = acc;
  }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) attend_reduce_kernel(AttendParams p) {
  attend_reduce_row(p, blockIdx.x);
}

// Precondition: max_chunks >= ceil(max_len / kAttendChunk) (the backend checks its workspace).
inline void launch_attend(const AttendParams& p, cudaStream_t stream) {
  const std::int64_t g_batches = ceil_div(p.layer.group_size, kGroupBatch);
  if (p.layer.max_len > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kAttendChunk)),
                    static_cast<unsigned>(p.layer.num_kv_heads * g_batches));
    attend_partial_kernel<kAttendThreads><<<grid, kAttendThreads, 0, stream>>>(p);
    check_launch("CudaBackend::attend", "attend_partial_kernel");
  }
  attend_reduce_kernel<kAttendThreads><<<static_cast<unsigned>(p.layer.num_q_heads), kAttendThreads, 0, stream>>>(p);
  check_launch("CudaBackend::attend", "attend_reduce_kernel");
}

}  // namespace kvevict::cuda::detail
