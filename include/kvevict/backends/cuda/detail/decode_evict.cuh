// One decode-time eviction per kv-head in a single cooperative launch (CudaBackend::evict_one):
// add the step's probabilities to the per-q-head scores, aggregate them over each GQA group,
// pick each head's victim under select_victims' order, and move the head's newest slot into it.
// The same expressions as accumulate_column_sums + group_reduce + select_victims +
// replace_with_last, so results are bit-identical to those four primitives (and to the CPU).
//
// All or nothing: phase 1 validates (every probability finite, every head has an unprotected
// entry) and finds per-chunk candidates without writing; a grid-wide barrier; phase 2 writes the
// scores and reduces each head's candidates only if the whole layer validated; a barrier; phase 3
// moves the newest slots. A rejected step changes nothing and reports why in `status` (and, with
// deferred verdicts, in host-mapped memory the host reads without waiting for the kernel).
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/block_ops.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"
#include "kvevict/backends/cuda/detail/move_slots.cuh"
#include "kvevict/backends/cuda/detail/select.cuh"
#include "kvevict/core/layer_view.hpp"

namespace kvevict::cuda::detail {

inline constexpr int kEvictThreads = 256;
inline constexpr std::int64_t kEvictChunk = 2 * kEvictThreads;  // slots per work item

// One chunk's result: its best victim candidate, and its first unprotected slot with that slot's
// group score (the CPU's NaN rule looks at the head's first unprotected slot).
struct EvictPartial {
  VictimCandidate best;
  std::int32_t first;   // INT32_MAX: none in this chunk
  float first_score;
};
static_assert(sizeof(EvictPartial) == 20, "load_partial reads five words");

// Data another block wrote before a grid barrier is read around L1 (__ldcg).
__device__ inline EvictPartial load_partial(const EvictPartial* part) {
  const auto* w = reinterpret_cast<const unsigned int*>(part);
  EvictPartial r;
  r.best.score = __uint_as_float(__ldcg(w));
  r.best.pos = static_cast<std::int32_t>(__ldcg(w + 1));
  r.best.slot = static_cast<std::int32_t>(__ldcg(w + 2));
  r.first = static_cast<std::int32_t>(__ldcg(w + 3));
  r.first_score = __uint_as_float(__ldcg(w + 4));
  return r;
}

// What the kernels of a single-eviction step share (evict_one's decode_evict_kernel and
// attend_evict_one's fused kernels): how slots score and which are protected, where the chunk
// candidates and the victims go, what moves into the victim, where the verdict goes.
struct StepEvictFields {
  float* q_scores;             // [q_head, capacity] running sums, or nullptr: rank by recency
  PerHead fresh_from;          // [kv_head] slots >= this start from 0 (clamped to [0, capacity])
  GroupAgg agg;
  std::int64_t sink_end;       // ProtectRule
  std::int64_t recent_begin;
  SlotArray arrays[kMaxSlotArrays];  // moved from the newest slot to the victim: K, V, positions, extras
  std::int32_t num_arrays;
  std::int32_t chunks_per_head;      // candidates per kv-head
  EvictPartial* partials;            // [kv_head, chunks_per_head]
  std::int32_t* victims;             // [kv_head] out (-1: nothing moved)
  std::int32_t* status;              // [2] out: [0] 1 if the step was not finite; [1] the lowest head
                                     // without a victim (none: -1 from decode_evict, INT32_MAX from
                                     // attend_evict)
  // Deferred verdicts (nullptr: off): host-mapped [3] {kind, kv_head, step}, written by a rejected
  // step only while kind is 0 (the earliest rejection waits there for the host). kind 1: not
  // finite; 2: a head without an unprotected entry.
  std::int32_t* deferred;

  __device__ bool protects(std::int64_t pos) const { return pos < sink_end || pos >= recent_begin; }
};

struct DecodeEvictParams : StepEvictFields {
  DeviceLayer layer;
  const float* probs;          // [q_head, probs_stride] (one query), or nullptr: rank by recency
  std::int64_t probs_stride;
  std::int64_t probs_count;    // elements checked for NaN/Inf: q_head * probs_stride
  std::int32_t* flags;         // [1 + kv_head], zero between launches: non-finite seen; head h has an unprotected entry
  std::int32_t step_id;        // the deferred verdict's step
};
static_assert(std::is_trivially_copyable_v<DecodeEvictParams>);

// The new running sum of q-head row `qh` at slot j (accumulate_column_sums for one query).
__device__ inline float evict_new_sum(const DecodeEvictParams& p, std::int64_t qh, std::int64_t j, std::int64_t fresh) {
  const float base = j >= fresh ? 0.0f : p.q_scores[qh * p.layer.capacity + j];
  return base + p.probs[qh * p.probs_stride + j];
}

// The group score of slot j of head h from the new sums (group_reduce's operation order).
__device__ inline float evict_group_score(const DecodeEvictParams& p, std::int64_t h, std::int64_t j) {
  const std::int64_t g = p.layer.group_size;
  const std::int64_t fresh = p.fresh_from.v[h];
  float o = evict_new_sum(p, h * g, j, fresh);
  for (std::int64_t r = 1; r < g; ++r) {
    const float x = evict_new_sum(p, h * g + r, j, fresh);
    if (p.agg == GroupAgg::max)
      o = o < x ? x : o;
    else
      o += x;
  }
  if (p.agg == GroupAgg::mean && g > 1) o *= 1.0f / static_cast<float>(g);
  return o;
}

// A running victim candidate: the best slot under evict_before (NaN scores never), and the first
// unprotected slot with its score (the CPU's NaN rule looks at a head's first unprotected slot).
// A thread visits its slots in ascending order, then the scans merge over the warp, the block,
// and across chunks (EvictPartial).
struct CandidateScan {
  VictimCandidate best{0.0f, 0, -1};
  std::int32_t first = INT32_MAX;  // INT32_MAX: none
  float first_score = 0.0f;

  __device__ static CandidateScan of(const EvictPartial& part) { return {part.best, part.first, part.first_score}; }
  [[nodiscard]] __device__ EvictPartial partial() const { return {best, first, first_score}; }

  // Slot j (unprotected, score s, position pos), visited after every smaller slot of this scan.
  __device__ void visit(std::int64_t j, float s, std::int32_t pos, bool has_scores) {
    if (first == INT32_MAX) {
      first = static_cast<std::int32_t>(j);
      first_score = s;
    }
    if (has_scores && is_nan(s)) return;
    const VictimCandidate cand{s, pos, static_cast<std::int32_t>(j)};
    if (evict_before(cand, best, has_scores)) best = cand;
  }
  __device__ void merge(const EvictPartial& part, bool has_scores) {
    if (evict_before(part.best, best, has_scores)) best = part.best;
    if (part.first < first) {
      first = part.first;
      first_score = part.first_score;
    }
  }
  // Over the warp; every lane gets the result.
  __device__ void merge_warp(bool has_scores) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const VictimCandidate o = shfl_candidate(best, offset);
      if (evict_before(o, best, has_scores)) best = o;
      const std::int32_t f = __shfl_xor_sync(kFullMask, first, offset);
      const float fs = __shfl_xor_sync(kFullMask, first_score, offset);
      if (f < first) {
        first = f;
        first_score = fs;
      }
    }
  }
  // Over the block (every thread calls it; s_warps holds kThreads / 32 entries); warp 0 gets the
  // result. The leading barrier lets a loop merge once per work item with the same s_warps.
  template <int kThreads>
  __device__ void merge_block(bool has_scores, EvictPartial* s_warps) {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    merge_warp(has_scores);
    __syncthreads();
    if (lane == 0) s_warps[warp] = partial();
    __syncthreads();
    if (warp == 0) {
      *this = lane < kThreads / 32 ? of(s_warps[lane]) : CandidateScan{};
      merge_warp(has_scores);
    }
  }
  // The head's victim once every candidate is merged: a NaN in its first unprotected slot is the
  // victim, NaNs elsewhere never are; -1 when every slot is protected.
  [[nodiscard]] __device__ std::int32_t victim(bool has_scores) const {
    return (has_scores && first != INT32_MAX && is_nan(first_score)) ? first : best.slot;
  }
};

// Leaves a rejected step's verdict (kind 1: not finite, 2: a head without a victim) in host-mapped
// memory for the host, unless an earlier one still waits there. deferred == nullptr: immediate
// verdicts, nothing to do. Callers from several blocks of one launch (attend_reduce_evict: one per
// head without a victim) may pass the kind check together; all write the same kind and step, so the
// host reads one of their heads, not necessarily the lowest that the immediate verdict names.
__device__ inline void record_deferred_verdict(std::int32_t* deferred, std::int32_t kind, std::int32_t head,
                                               std::int32_t step) {
  if (deferred == nullptr || kind == 0 || *reinterpret_cast<volatile std::int32_t*>(deferred) != 0) return;
  deferred[1] = head;
  deferred[2] = step;
  __threadfence_system();  // the host reads kind first, then the fields
  *reinterpret_cast<volatile std::int32_t*>(deferred) = kind;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) decode_evict_kernel(DecodeEvictParams p) {
  namespace cg = cooperative_groups;
  __shared__ EvictPartial s_warps[kThreads / 32];
  cg::grid_group grid = cg::this_grid();
  const bool has_scores = p.probs != nullptr;
  const std::int64_t items = static_cast<std::int64_t>(p.layer.num_kv_heads) * p.chunks_per_head;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;

  // ---- phase 1: validate, find candidates; nothing is written but the workspace
  if (has_scores) {  // NaN/Inf: exponent bits all ones; 16-byte loads where the rows allow them
    unsigned bad = 0;
    const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
    const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (reinterpret_cast<std::uintptr_t>(p.probs) % 16 == 0 && p.probs_count % 4 == 0) {
      const auto* v = reinterpret_cast<const uint4*>(p.probs);
      for (std::int64_t i = first; i < p.probs_count / 4; i += stride) {
        const uint4 x = v[i];
        bad |= ((x.x & 0x7f800000u) == 0x7f800000u) | ((x.y & 0x7f800000u) == 0x7f800000u) |
               ((x.z & 0x7f800000u) == 0x7f800000u) | ((x.w & 0x7f800000u) == 0x7f800000u);
      }
    } else {
      for (std::int64_t i = first; i < p.probs_count; i += stride)
        bad |= (__float_as_uint(p.probs[i]) & 0x7f800000u) == 0x7f800000u;
    }
    if (__syncthreads_or(bad != 0) && threadIdx.x == 0) atomicOr(p.flags, 1);
  }
  for (std::int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const std::int64_t h = item / p.chunks_per_head;
    const std::int64_t c = item - h * p.chunks_per_head;
    const std::int64_t n = p.layer.lens.v[h];
    const std::int32_t* pos = p.layer.head_positions(h);
    CandidateScan scan;
    const std::int64_t end = min(n, (c + 1) * kEvictChunk);
    for (std::int64_t j = c * kEvictChunk + threadIdx.x; j < end; j += kThreads)
      if (!p.protects(pos[j])) scan.visit(j, has_scores ? evict_group_score(p, h, j) : 0.0f, pos[j], has_scores);
    scan.merge_block<kThreads>(has_scores, s_warps);
    if (threadIdx.x == 0) {
      p.partials[item] = scan.partial();
      if (scan.first != INT32_MAX) atomicOr(p.flags + 1 + h, 1);
    }
  }
  grid.sync();

  // ---- phase 2: if the layer validated, write the new sums and pick each head's victim
  bool ok = true;
  for (std::int64_t h = threadIdx.x; h < p.layer.num_kv_heads; h += kThreads) ok &= __ldcg(p.flags + 1 + h) != 0;
  ok = __syncthreads_and(ok && __ldcg(p.flags) == 0) != 0;
  if (ok && has_scores) {
    for (std::int64_t item = blockIdx.x; item < items; item += gridDim.x) {
      const std::int64_t h = item / p.chunks_per_head;
      const std::int64_t c = item - h * p.chunks_per_head;
      const std::int64_t end = min(static_cast<std::int64_t>(p.layer.lens.v[h]), (c + 1) * kEvictChunk);
      const std::int64_t fresh = p.fresh_from.v[h];
      for (std::int64_t r = 0; r < p.layer.group_size; ++r) {
        const std::int64_t qh = h * p.layer.group_size + r;
        for (std::int64_t j = c * kEvictChunk + threadIdx.x; j < end; j += kThreads)
          p.q_scores[qh * p.layer.capacity + j] = evict_new_sum(p, qh, j, fresh);
      }
    }
  }
  if (warp == 0) {
    for (std::int64_t h = blockIdx.x; h < p.layer.num_kv_heads; h += gridDim.x) {
      CandidateScan scan;
      for (std::int64_t c = lane; c < p.chunks_per_head; c += 32)
        scan.merge(load_partial(p.partials + h * p.chunks_per_head + c), has_scores);
      scan.merge_warp(has_scores);
      if (lane == 0) p.victims[h] = ok ? scan.victim(has_scores) : -1;
    }
  }
  grid.sync();

  // ---- phase 3: the newest slot of each head moves into its victim; the workspace is reset
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) {
      std::int32_t missing = -1;
      for (std::int32_t h = 0; h < p.layer.num_kv_heads && missing < 0; ++h)
        if (__ldcg(p.flags + 1 + h) == 0) missing = h;
      const bool nonfinite = __ldcg(p.flags) != 0;
      p.status[0] = nonfinite ? 1 : 0;
      p.status[1] = missing;
      record_deferred_verdict(p.deferred, nonfinite ? 1 : (missing >= 0 ? 2 : 0), missing, p.step_id);
    }
    __syncthreads();  // status read the flags before they are cleared
    for (std::int64_t i = threadIdx.x; i <= p.layer.num_kv_heads; i += kThreads) p.flags[i] = 0;
  }
  if (!ok) return;
  for (std::int64_t h = blockIdx.x; h < p.layer.num_kv_heads; h += gridDim.x) {
    const std::int64_t src = p.layer.lens.v[h] - 1;
    const std::int64_t dst = __ldcg(p.victims + h);
    if (dst < 0 || dst >= src) continue;  // the newest entry is the victim: nothing moves
    move_slot(p.arrays, p.num_arrays, h, src, dst);  // the sums came from phase 2
  }
}

// Queues the cooperative launch on `stream` with `blocks` blocks (at most the device's co-resident
// limit for this kernel; see max_decode_evict_blocks).
inline void launch_decode_evict(const DecodeEvictParams& p, int blocks, cudaStream_t stream) {
  DecodeEvictParams copy = p;
  void* args[] = {&copy};
  check(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&decode_evict_kernel<kEvictThreads>),
                                    dim3(static_cast<unsigned>(blocks)), dim3(kEvictThreads), args, 0, stream),
        "CudaBackend::evict_one", "cudaLaunchCooperativeKernel(decode_evict_kernel)");
}

// Blocks of decode_evict_kernel the current device keeps resident at once (0: no cooperative
// launch); *sms receives the multiprocessor count.
inline int max_decode_evict_blocks(int* sms_out) {
  int dev = 0, sms = 0, coop = 0, per_sm = 0;
  check(cudaGetDevice(&dev), "CudaBackend::evict_one", "cudaGetDevice");
  check(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev), "CudaBackend::evict_one",
        "cudaDeviceGetAttribute(cooperative launch)");
  *sms_out = 0;
  if (coop == 0) return 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "CudaBackend::evict_one",
        "cudaDeviceGetAttribute(multiprocessors)");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_evict_kernel<kEvictThreads>, kEvictThreads, 0),
        "CudaBackend::evict_one", "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  *sms_out = sms;
  return sms * per_sm;
}

}  // namespace kvevict::cuda::detail
