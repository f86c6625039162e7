// Decode attention with a single-eviction decode step folded into its own launches
// (CudaBackend::attend_evict_one): the step costs no launch and no pass over the cache of its own.
// - group_logits: unchanged.
// - softmax_rows: normalises as for attend and marks the step (nonfinite = step id) when a row
//   is not finite (a NaN/Inf logit, or no finite logit at all); a step scoring with the
//   probabilities is then rejected, as evict_one rejects non-finite probabilities.
// - attend_partial_evict: attend_partial's blocks (one row of blocks per kv-head: group_size <=
//   kGroupBatch), plus scoring blocks beside them: each adds a chunk's probabilities to the
//   per-q-head sums, aggregates them over the group and leaves the chunk's victim candidate in
//   `partials`; nothing of the step is written when the softmax marked it.
// - attend_reduce_evict: the q-head blocks reduce the partial sums as before; one extra block per
//   kv-head reduces its candidates to the victim and moves the newest slot into it (K and V are
//   no longer read by then), or reports the step's rejection.
// The expressions are evict_one's (evict_new_sum, the group order, evict_before and the NaN rule),
// so the result is bit-identical to attend followed by evict_one on the same probabilities.
// A head without an unprotected entry cannot occur when positions are unique and below the next
// position (the policy takes this path only when lens exceed the protected count); should it
// occur, that head moves nothing and the step reports InvariantError after its sums were added.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/attention.cuh"
#include "kvevict/backends/cuda/detail/block_ops.cuh"
#include "kvevict/backends/cuda/detail/decode_evict.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"
#include "kvevict/backends/cuda/detail/move_slots.cuh"
#include "kvevict/backends/cuda/detail/select.cuh"
#include "kvevict/core/layer_view.hpp"

namespace kvevict::cuda::detail {

// Scoring blocks of attend_partial_evict_kernel take kScoreSlotsPerThread slots per thread,
// every load issued before any store.
inline constexpr int kScoreSlotsPerThread = 2;
template <int kThreads>
inline constexpr std::int64_t kScoreChunk = static_cast<std::int64_t>(kThreads) * kScoreSlotsPerThread;

struct AttendEvictParams : StepEvictFields {
  AttendParams attend;               // probs [q_head, capacity], partial sums, out
  const std::int32_t* nonfinite;     // == step_id when the softmax found a row that is not finite
  std::int32_t step_id;              // never 0
  std::int32_t deferred_step;        // the deferred verdict's step

  // Only a step that scores with the probabilities rejects them (evict_one's rule); a recency
  // step evicts whatever the attention computed.
  __device__ bool rejected() const { return q_scores != nullptr && *nonfinite == step_id; }
};
static_assert(std::is_trivially_copyable_v<AttendEvictParams>);

template <int kThreads>
__global__ void __launch_bounds__(kThreads, kAttendMinBlocks) attend_partial_evict_kernel(AttendEvictParams p) {
  __shared__ EvictPartial s_warps[kThreads / 32];
  const AttendParams& a = p.attend;
  const int h = static_cast<int>(blockIdx.y);  // one block row per kv-head: group_size <= kGroupBatch
  const int g_count = a.layer.group_size;
  const std::int64_t n = a.layer.lens.v[h];
  const std::int64_t qh0 = static_cast<std::int64_t>(h) * g_count;
  const std::int64_t attend_chunks = ceil_div(a.layer.max_len, kAttendChunk);
  if (blockIdx.x < attend_chunks) {  // attend_partial_kernel's block
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) p.status[1] = INT32_MAX;
    attend_partial_chunk(a, h, qh0, g_count, blockIdx.x);
    return;
  }

  // A scoring block: beside the attention blocks (not after them in each), so the step adds no
  // latency to their chain. The chunk's new sums and its victim candidate.
  const std::int64_t c = blockIdx.x - attend_chunks;
  const std::int64_t j0 = c * kScoreChunk<kThreads>;
  if (j0 >= n || p.rejected()) return;  // block-uniform; `nonfinite` was written by the previous launch
  const bool has_scores = p.q_scores != nullptr;
  const std::int64_t fresh = p.fresh_from.v[h];
  const std::int32_t* positions = a.layer.head_positions(h);
  float x[kScoreSlotsPerThread][kGroupBatch];
  std::int32_t pos[kScoreSlotsPerThread];
#pragma unroll
  for (int k = 0; k < kScoreSlotsPerThread; ++k) {  // loads
    const std::int64_t j = j0 + k * kThreads + threadIdx.x;
    pos[k] = j < n ? positions[j] : 0;
#pragma unroll
    for (int g = 0; g < kGroupBatch; ++g) {
      x[k][g] = 0.0f;
      if (!has_scores || g >= g_count || j >= n) continue;
      const float base = j >= fresh ? 0.0f : p.q_scores[(qh0 + g) * a.layer.capacity + j];
      x[k][g] = base + a.probs[(qh0 + g) * a.probs_stride + j];  // evict_new_sum
    }
  }
  CandidateScan scan;
#pragma unroll
  for (int k = 0; k < kScoreSlotsPerThread; ++k) {  // stores, group scores and candidates
    const std::int64_t j = j0 + k * kThreads + threadIdx.x;
    if (j >= n) break;
    float s = 0.0f;
    if (has_scores) {  // evict_group_score's order
      s = x[k][0];
#pragma unroll
      for (int g = 0; g < kGroupBatch; ++g) {
        if (g >= g_count) break;
        p.q_scores[(qh0 + g) * a.layer.capacity + j] = x[k][g];
        if (g == 0) continue;
        s = p.agg == GroupAgg::max ? (s < x[k][g] ? x[k][g] : s) : s + x[k][g];
      }
      if (p.agg == GroupAgg::mean && g_count > 1) s *= 1.0f / static_cast<float>(g_count);
    }
    if (!p.protects(pos[k])) scan.visit(j, s, pos[k], has_scores);  // slots ascend per thread
  }
  scan.merge_block<kThreads>(has_scores, s_warps);
  if (threadIdx.x == 0) p.partials[h * p.chunks_per_head + c] = scan.partial();
}

// The newest slot's first kMoveWordsPerThread x blockDim words, loaded before the victim is known
// (they are final when the launch starts) and stored once it is: the move adds no round trip of
// loads to the block's chain. Longer slots finish with move_slot.
class PendingMove {
 public:
  __device__ void load(const SlotArray* arrays, int num_arrays, std::int64_t h, std::int64_t src) {
    const int total = slot_words(arrays, num_arrays);
#pragma unroll
    for (int k = 0; k < kMoveWordsPerThread; ++k) {
      word_[k] = nullptr;
      const int e = static_cast<int>(threadIdx.x) + k * static_cast<int>(blockDim.x);
      if (src < 0 || e >= total) continue;
      word_[k] = slot_word(arrays, h, e, stride_[k]);
      value_[k] = __ldcg(word_[k] + src * stride_[k]);
    }
  }
  __device__ void store(const SlotArray* arrays, int num_arrays, std::int64_t h, std::int64_t src, std::int64_t dst) const {
#pragma unroll
    for (int k = 0; k < kMoveWordsPerThread; ++k)
      if (word_[k] != nullptr) word_[k][dst * stride_[k]] = value_[k];
    move_slot(arrays, num_arrays, h, src, dst, kMoveWordsPerThread * static_cast<int>(blockDim.x));
  }

 private:
  std::uint32_t* word_[kMoveWordsPerThread];  // slot-0 address of each word this thread moves
  std::int64_t stride_[kMoveWordsPerThread];
  std::uint32_t value_[kMoveWordsPerThread];
};

template <int kThreads>
__global__ void __launch_bounds__(kThreads) attend_reduce_evict_kernel(AttendEvictParams p) {
  const AttendParams& a = p.attend;
  if (blockIdx.x < static_cast<unsigned>(a.layer.num_q_heads)) {  // attend_reduce_kernel's block
    attend_reduce_row(a, blockIdx.x);
    return;
  }
  // One block per kv-head: everything it reads is final when the launch starts, so the verdict,
  // the chunk candidates and the newest slot's words are loaded together (the candidates even for
  // a rejected step, then ignored); then the victim; then the stores.
  __shared__ std::int32_t s_victim;
  const std::int64_t h = blockIdx.x - static_cast<unsigned>(a.layer.num_q_heads);
  const std::int64_t n = a.layer.lens.v[h];
  const std::int64_t src = n - 1;
  const bool rejected = p.rejected();
  const bool has_scores = p.q_scores != nullptr;
  PendingMove move;
  move.load(p.arrays, p.num_arrays, h, src);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  if (threadIdx.x < 32) {  // decode_evict_kernel's phase 2 over this head's chunk candidates
    CandidateScan scan;
    for (std::int64_t c = lane; c < ceil_div(n, kScoreChunk<kThreads>); c += 32)
      scan.merge(p.partials[h * p.chunks_per_head + c], has_scores);
    scan.merge_warp(has_scores);
    if (lane == 0) {
      const std::int32_t victim = scan.victim(has_scores);
      s_victim = rejected ? -1 : victim;
      p.victims[h] = s_victim;
      if (h == 0) p.status[0] = rejected ? 1 : 0;
      if (!rejected && victim < 0) atomicMin(p.status + 1, static_cast<std::int32_t>(h));
      const std::int32_t kind = rejected ? (h == 0 ? 1 : 0) : (victim < 0 ? 2 : 0);
      record_deferred_verdict(p.deferred, kind, kind == 2 ? static_cast<std::int32_t>(h) : -1, p.deferred_step);
    }
  }
  __syncthreads();
  const std::int64_t dst = s_victim;
  if (dst < 0 || dst >= src) return;  // rejected, no victim, or the newest entry is the victim
  move.store(p.arrays, p.num_arrays, h, src, dst);
}

// Queues the step's attention and eviction. Preconditions (the backend checks them): group_size
// <= kGroupBatch, every head non-empty, the workspaces cover the layer, p.nonfinite was written
// by this step's softmax_rows launch (queued before on the same stream).
inline void launch_attend_evict(const AttendEvictParams& p, cudaStream_t stream) {
  const AttendParams& a = p.attend;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.layer.max_len, kAttendChunk) + ceil_div(a.layer.max_len, kScoreChunk<kAttendThreads>)),
                  static_cast<unsigned>(a.layer.num_kv_heads));
  attend_partial_evict_kernel<kAttendThreads><<<grid, kAttendThreads, 0, stream>>>(p);
  check_launch("CudaBackend::attend_evict_one", "attend_partial_evict_kernel");
  attend_reduce_evict_kernel<kAttendThreads>
      <<<static_cast<unsigned>(a.layer.num_q_heads + a.layer.num_kv_heads), kAttendThreads, 0, stream>>>(p);
  check_launch("CudaBackend::attend_evict_one", "attend_reduce_evict_kernel");
}

}  // namespace kvevict::cuda::detail
