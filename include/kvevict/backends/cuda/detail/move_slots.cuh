// Moving entries between slots: stable compaction (KeepPlan) and single-slot replacement
// (ReplacePlan). Every per-slot array (K, V, positions, policy extras) is described as rows of
// 32-bit words, so one kernel moves them all bit for bit.
// Compaction in parallel cannot be done in place (a slot may be read by one block after another
// block overwrote it), so it gathers a chunk of output slots into a workspace, then writes the
// chunk back. Keep slots ascending (keep[i] >= i) make chunk-by-chunk processing safe: the
// sources of later chunks lie at or beyond their own outputs, past every slot written so far.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"

namespace kvevict::cuda::detail {

inline constexpr int kMaxSlotArrays = 8;  // arrays moved per launch; more are split over launches
inline constexpr int kMoveThreads = 256;  // compaction: 8 slots (one per warp) per block

// Word w of slot s in row r of kv-head h: base[(h * rows + r) * row_stride + s * slot_stride + w].
struct SlotArray {
  std::uint32_t* base;
  std::int64_t row_stride;   // words
  std::int64_t slot_stride;  // words
  std::int32_t rows;         // rows per kv-head
  std::int32_t width;        // words per slot
  std::int64_t ws_offset;    // compaction: start of this array's region in the chunk workspace
};

struct MoveParams {
  SlotArray arrays[kMaxSlotArrays];
  std::int32_t num_arrays;
  std::int32_t num_kv_heads;
  std::int64_t capacity;
  // compaction
  const std::int32_t* keep_slots;  // [kv_head, capacity], ascending per head
  PerHead keep_count;              // [kv_head]
  std::uint32_t* workspace;        // [array region][kv_head, row, chunk slot, word]
  std::int64_t chunk_begin;        // output slots [chunk_begin, chunk_begin + chunk_slots)
  std::int64_t chunk_slots;
  // replacement
  const std::int32_t* victims;     // [kv_head]
  PerHead lens;                    // [kv_head]
};
static_assert(std::is_trivially_copyable_v<MoveParams>);

// One warp per output slot (kSlotsPerBlock per block), lanes over the slot's words.
template <int kThreads, bool kToWorkspace>
__global__ void __launch_bounds__(kThreads) compact_chunk_kernel(MoveParams p) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const std::int64_t h = blockIdx.y;
  const std::int64_t dst = p.chunk_begin + i;
  if (i >= p.chunk_slots || dst >= p.keep_count.v[h]) return;
  const std::int64_t src = p.keep_slots[h * p.capacity + dst];
  if (src == dst) return;  // already in place, and never overwritten (earlier chunks write below it)
  for (int a = 0; a < p.num_arrays; ++a) {
    const SlotArray arr = p.arrays[a];
    const int words = arr.rows * arr.width;
    for (int t = lane; t < words; t += 32) {
      const int r = t / arr.width;
      const int w = t - r * arr.width;
      const std::int64_t row = h * arr.rows + r;
      std::uint32_t* ws = p.workspace + arr.ws_offset + (row * p.chunk_slots + i) * arr.width + w;
      if constexpr (kToWorkspace)
        *ws = arr.base[row * arr.row_stride + src * arr.slot_stride + w];
      else
        arr.base[row * arr.row_stride + dst * arr.slot_stride + w] = *ws;
    }
  }
}

// One chunk: gather the chunk's sources, then write them to their outputs (stream-ordered).
inline void launch_compact_chunk(const MoveParams& p, cudaStream_t stream) {
  if (p.chunk_slots <= 0 || p.num_arrays == 0) return;
  constexpr int kSlotsPerBlock = kMoveThreads / 32;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.chunk_slots, kSlotsPerBlock)), static_cast<unsigned>(p.num_kv_heads));
  compact_chunk_kernel<kMoveThreads, true><<<grid, kMoveThreads, 0, stream>>>(p);
  check_launch("CudaBackend::compact", "compact_chunk_kernel<gather>");
  compact_chunk_kernel<kMoveThreads, false><<<grid, kMoveThreads, 0, stream>>>(p);
  check_launch("CudaBackend::compact", "compact_chunk_kernel<write back>");
}

// Slot lens[h]-1 moves into victims[h]. A victim outside [0, lens[h]) moves nothing (the host
// validated the plan before launching; this guard only keeps a bad plan from writing out of
// bounds).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) replace_with_last_kernel(MoveParams p) {
  const std::int64_t h = blockIdx.x;
  const std::int64_t n = p.lens.v[h];
  const std::int64_t dst = p.victims[h];
  const std::int64_t src = n - 1;
  if (dst < 0 || dst >= n || dst == src) return;
  for (int a = 0; a < p.num_arrays; ++a) {
    const SlotArray arr = p.arrays[a];
    const int words = arr.rows * arr.width;
    for (int t = threadIdx.x; t < words; t += blockDim.x) {
      const int r = t / arr.width;
      const int w = t - r * arr.width;
      std::uint32_t* row = arr.base + (h * arr.rows + r) * arr.row_stride + w;
      row[dst * arr.slot_stride] = row[src * arr.slot_stride];
    }
  }
}

inline void launch_replace_with_last(const MoveParams& p, cudaStream_t stream) {
  if (p.num_arrays == 0) return;
  replace_with_last_kernel<kMoveThreads><<<static_cast<unsigned>(p.num_kv_heads), kMoveThreads, 0, stream>>>(p);
  check_launch("CudaBackend::replace_with_last", "replace_with_last_kernel");
}

}  // namespace kvevict::cuda::detail
