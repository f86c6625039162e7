// Moving entries between slots: stable compaction (KeepPlan) and single-slot replacement
// (ReplacePlan). Every per-slot array (K, V, positions, policy extras) is described as rows of
// 32-bit words, so one kernel moves them all bit for bit.
//
// Compaction runs in place in one pass: every moving row is read once and written once, as a
// memcpy would. Work items (kv-head, run of output slots) are numbered by an atomic ticket in the
// order blocks start. An item stages its moving rows in shared memory, publishes "read done",
// waits until the earlier items that may read its destination slots have published too, then
// writes. Those items are this one or earlier ones: keep slots ascend with keep[j] >= j, so
// output slot i (written only by its own item) is the source of an output j <= i. A warp finds
// the outputs whose sources lie in the item's destination slots (two searches of keep: a
// contiguous run, as keep ascends), and the item waits for the items holding them, usually one or
// two, so writes of different items overlap instead of following each other. Reads never wait,
// so a wait lasts at most one staging latency, and waits point only to earlier tickets (blocks
// already resident or finished), so they cannot deadlock.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"

namespace kvevict::cuda::detail {

inline constexpr int kMaxSlotArrays = 8;  // arrays moved per launch; more are split over launches
inline constexpr int kMoveThreads = 256;

// Word w of slot s in row r of kv-head h: base[(h * rows + r) * row_stride + s * slot_stride + w].
struct SlotArray {
  std::uint32_t* base;
  std::int64_t row_stride;   // words
  std::int64_t slot_stride;  // words
  std::int32_t rows;         // rows per kv-head
  std::int32_t width;        // words per slot
};

struct MoveParams {
  SlotArray arrays[kMaxSlotArrays];
  std::int32_t num_arrays;
  std::int32_t num_kv_heads;
  std::int64_t capacity;
  // compaction
  const std::int32_t* keep_slots;  // [kv_head, capacity], ascending per head
  PerHead keep_count;              // [kv_head]
  std::int32_t slots_per_item;     // output slots one work item moves (<= kMaxItemSlots)
  std::int32_t items_per_head;
  std::int32_t stage_offset[kMaxSlotArrays];  // words; each array's region in the stage, 16-byte aligned
  std::int32_t vec4[kMaxSlotArrays];          // 1: the array moves in 16-byte units
  unsigned long long* ticket;      // work-item counter, 0 between launches (the last item resets it)
  unsigned int* read_done;         // [kv_head * items_per_head]: == epoch once the item has staged
  unsigned int epoch;              // this launch's mark, never 0 and never reused
  // replacement
  const std::int32_t* victims;     // [kv_head]
  PerHead lens;                    // [kv_head]
};
static_assert(std::is_trivially_copyable_v<MoveParams>);

inline constexpr int kMaxItemSlots = 1024;                // output slots per compaction work item
// 40 KiB of shared memory per work item (with s_src, under the 48 KiB a block gets without an
// opt-in): an item's fixed latency (ticket, keep searches, waits) is spread over more bytes.
inline constexpr int kStageWords = 10240;
inline constexpr unsigned kStageBytes = kStageWords * 4u;

// True when every slot of `arr` starts on 16 bytes and spans whole 16-byte units.
inline bool moves_in_vec4(const SlotArray& arr) {
  return arr.width % 4 == 0 && arr.slot_stride % 4 == 0 && arr.row_stride % 4 == 0 &&
         reinterpret_cast<std::uintptr_t>(arr.base) % 16 == 0;
}

// Copies the moving rows of output slots [begin, begin + n) between the array and the stage,
// U-sized units (uint4 or uint32). kToStage: array -> stage; else stage -> array. Each thread
// issues kUnroll independent loads before it stores any, so loads overlap.
template <class U, bool kToStage, int kThreads>
__device__ inline void move_stage(const SlotArray& arr, std::uint32_t* stage, const std::int32_t* s_src,
                                  std::int64_t h, std::int64_t begin, int n) {
  constexpr int kWords = static_cast<int>(sizeof(U) / 4);
  constexpr int kUnroll = 4;
  const int units_per_row = arr.width / kWords;
  const int units_per_slot = arr.rows * units_per_row;
  U* st = reinterpret_cast<U*>(stage);
  const int total = n * units_per_slot;
  for (int e0 = static_cast<int>(threadIdx.x); e0 < total; e0 += kThreads * kUnroll) {
    U v[kUnroll];
    std::uint32_t* at[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int e = e0 + k * kThreads;
      at[k] = nullptr;
      if (e >= total) continue;
      const int i = e / units_per_slot;
      const std::int64_t src = s_src[i];
      const std::int64_t dst = begin + i;
      if (src == dst) continue;  // already in place
      const int u = e - i * units_per_slot;
      const int r = u / units_per_row;
      const int w = (u - r * units_per_row) * kWords;
      std::uint32_t* row = arr.base + (h * arr.rows + r) * arr.row_stride + w;
      if constexpr (kToStage) {
        at[k] = row;
        v[k] = *reinterpret_cast<const U*>(row + src * arr.slot_stride);
      } else {
        at[k] = row + dst * arr.slot_stride;
        v[k] = st[e];
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (at[k] == nullptr) continue;
      if constexpr (kToStage)
        st[e0 + k * kThreads] = v[k];
      else
        *reinterpret_cast<U*>(at[k]) = v[k];
    }
  }
}

// First output j in [0, limit] of the head whose source keep[j] >= slot (keep ascends and
// keep[limit] >= limit >= slot, so one exists): a 32-ary search by one warp, every lane gets it.
__device__ inline std::int64_t first_source_at_or_after(const std::int32_t* keep, std::int64_t limit, std::int64_t slot) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  std::int64_t lo = 0, hi = limit;  // the answer lies in [lo, hi]
  while (hi - lo >= 32) {
    const std::int64_t step = (hi - lo + 31) / 32;
    const std::int64_t idx = min(lo + lane * step, hi);
    const unsigned ballot = __ballot_sync(0xffffffffu, keep[idx] >= slot);
    if (ballot == 0) {
      lo = lo + 31 * step + 1;  // lane 31 probed below hi and found an earlier source
    } else {
      const int k = __ffs(ballot) - 1;
      hi = min(lo + k * step, hi);
      lo = k == 0 ? lo : lo + (k - 1) * step + 1;
    }
  }
  const std::int64_t idx = min(lo + lane, hi);
  const unsigned ballot = __ballot_sync(0xffffffffu, keep[idx] >= slot);
  return lo + (__ffs(ballot) - 1);
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) compact_kernel(MoveParams p) {
  static_assert(kThreads >= 64, "two warps search the keep list");
  extern __shared__ uint4 stage_raw[];  // kStageBytes, 16-byte aligned
  __shared__ std::int32_t s_src[kMaxItemSlots];
  __shared__ unsigned long long s_item;
  __shared__ std::int64_t s_readers[2];  // [r0, r1): the earlier outputs that read this item's destinations
  std::uint32_t* stage = reinterpret_cast<std::uint32_t*>(stage_raw);
  const unsigned long long items = static_cast<unsigned long long>(p.num_kv_heads) * p.items_per_head;
  if (threadIdx.x == 0) {
    s_item = atomicAdd(p.ticket, 1ull);
    if (s_item == items - 1) *p.ticket = 0;  // every other item took its ticket already
  }
  __syncthreads();
  const auto item = static_cast<std::int64_t>(s_item);
  const std::int64_t h = item / p.items_per_head;
  const std::int64_t c = item - h * p.items_per_head;
  const std::int64_t begin = c * p.slots_per_item;
  const std::int64_t end = min(begin + p.slots_per_item, static_cast<std::int64_t>(p.keep_count.v[h]));
  const int n = end > begin ? static_cast<int>(end - begin) : 0;
  const std::int32_t* keep = p.keep_slots + h * p.capacity;
  bool moves = false;
  for (int i = static_cast<int>(threadIdx.x); i < n; i += kThreads) {
    s_src[i] = keep[begin + i];
    moves |= s_src[i] != begin + i;
  }
  // The readers of destinations [begin, end) are the outputs whose sources lie there: a
  // contiguous run [r0, r1) of keep (it ascends), below begin. Two warps search for its ends
  // while the others stage (the searches are chains of dependent loads; staging overlaps them).
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  if (n > 0 && warp == 0) {
    const std::int64_t r0 = first_source_at_or_after(keep, begin, begin);
    if ((threadIdx.x & 31) == 0) s_readers[0] = r0;
  } else if (n > 0 && warp == 1) {
    const std::int64_t r1 = keep[begin] >= end ? first_source_at_or_after(keep, begin, end) : begin;
    if ((threadIdx.x & 31) == 0) s_readers[1] = r1;
  }
  moves = __syncthreads_or(moves) != 0;
  for (int a = 0; moves && a < p.num_arrays; ++a) {
    if (p.vec4[a])
      move_stage<uint4, true, kThreads>(p.arrays[a], stage + p.stage_offset[a], s_src, h, begin, n);
    else
      move_stage<std::uint32_t, true, kThreads>(p.arrays[a], stage + p.stage_offset[a], s_src, h, begin, n);
  }
  __syncthreads();  // the whole item's reads (and the searches) are done
  if (threadIdx.x == 0) {
    __threadfence();
    atomicExch(p.read_done + item, p.epoch);
  }
  if (!moves) return;
  if (threadIdx.x < 32) {  // wait for the reads of the earlier items whose sources this item overwrites
    const std::int64_t r0 = s_readers[0], r1 = s_readers[1];
    const unsigned* flags = p.read_done + h * p.items_per_head;
    if (r1 > r0) {
      const std::int64_t last = min(c - 1, (r1 - 1) / p.slots_per_item);
      for (std::int64_t e = r0 / p.slots_per_item + threadIdx.x; e <= last; e += 32)
        while (*reinterpret_cast<const volatile unsigned*>(flags + e) != p.epoch) __nanosleep(64);
    }
    __threadfence();
  }
  __syncthreads();
  for (int a = 0; a < p.num_arrays; ++a) {
    if (p.vec4[a])
      move_stage<uint4, false, kThreads>(p.arrays[a], stage + p.stage_offset[a], s_src, h, begin, n);
    else
      move_stage<std::uint32_t, false, kThreads>(p.arrays[a], stage + p.stage_offset[a], s_src, h, begin, n);
  }
}

// Sizes the work items for these arrays (fills slots_per_item, items_per_head, stage_offset,
// vec4) for heads keeping at most max_keep entries; returns the number of work items.
inline std::int64_t plan_compaction(MoveParams& p, std::int64_t max_keep) {
  std::int64_t words_per_slot = 0;
  for (int a = 0; a < p.num_arrays; ++a) {
    words_per_slot += static_cast<std::int64_t>(p.arrays[a].rows) * p.arrays[a].width;
    p.vec4[a] = moves_in_vec4(p.arrays[a]) ? 1 : 0;
  }
  // 4 words of alignment padding per array always fit next to slots_per_item * words_per_slot.
  std::int64_t slots = (kStageWords - 4 * p.num_arrays) / std::max<std::int64_t>(words_per_slot, 1);
  slots = std::clamp<std::int64_t>(slots, 1, kMaxItemSlots);
  std::int64_t offset = 0;
  for (int a = 0; a < p.num_arrays; ++a) {
    p.stage_offset[a] = static_cast<std::int32_t>(offset);
    offset += slots * p.arrays[a].rows * p.arrays[a].width;
    offset = (offset + 3) / 4 * 4;
  }
  p.slots_per_item = static_cast<std::int32_t>(slots);
  p.items_per_head = static_cast<std::int32_t>(ceil_div(max_keep, slots));
  return static_cast<std::int64_t>(p.num_kv_heads) * p.items_per_head;
}

// One launch moves every array of `p` (plan_compaction first). Precondition: p.read_done holds
// at least the returned item count of flags, none equal to p.epoch; p.ticket is 0.
inline void launch_compact(const MoveParams& p, std::int64_t items, cudaStream_t stream) {
  if (items <= 0 || p.num_arrays == 0) return;
  compact_kernel<kMoveThreads><<<static_cast<unsigned>(items), kMoveThreads, kStageBytes, stream>>>(p);
  check_launch("CudaBackend::compact", "compact_kernel");
}

// Words per slot over `arrays` (K, V, positions, extras, in that order).
__device__ inline int slot_words(const SlotArray* arrays, int num_arrays) {
  int total = 0;
  for (int a = 0; a < num_arrays; ++a) total += arrays[a].rows * arrays[a].width;
  return total;
}

// Word e (< slot_words) of kv-head h's slots: its address in slot 0; `slot_stride` receives the
// stride of its array, so slot s holds it at the returned pointer + s * slot_stride.
__device__ inline std::uint32_t* slot_word(const SlotArray* arrays, std::int64_t h, int e, std::int64_t& slot_stride) {
  int a = 0;
  while (e >= arrays[a].rows * arrays[a].width) {
    e -= arrays[a].rows * arrays[a].width;
    ++a;
  }
  const int r = e / arrays[a].width;
  slot_stride = arrays[a].slot_stride;
  return arrays[a].base + (h * arrays[a].rows + r) * arrays[a].row_stride + (e - r * arrays[a].width);
}

// Words of a slot a thread loads before it stores any in move_slot.
inline constexpr int kMoveWordsPerThread = 4;

// Every word of slot src of kv-head h from word first_word on moves to slot dst (src != dst), in
// each of the arrays; the block's threads share the words, each loading kMoveWordsPerThread before
// it stores any (one memory round trip per round, not one per array). Loads bypass L1 (__ldcg):
// the evict_one kernel moves words that other blocks wrote before its grid barrier.
__device__ inline void move_slot(const SlotArray* arrays, int num_arrays, std::int64_t h, std::int64_t src,
                                 std::int64_t dst, int first_word = 0) {
  const int total = slot_words(arrays, num_arrays);
  const int threads = static_cast<int>(blockDim.x);
  for (int e0 = first_word + static_cast<int>(threadIdx.x); e0 < total; e0 += threads * kMoveWordsPerThread) {
    std::uint32_t v[kMoveWordsPerThread];
    std::uint32_t* at[kMoveWordsPerThread];
#pragma unroll
    for (int k = 0; k < kMoveWordsPerThread; ++k) {
      at[k] = nullptr;
      const int e = e0 + k * threads;
      if (e >= total) continue;
      std::int64_t stride = 0;
      std::uint32_t* word = slot_word(arrays, h, e, stride);
      v[k] = __ldcg(word + src * stride);
      at[k] = word + dst * stride;
    }
#pragma unroll
    for (int k = 0; k < kMoveWordsPerThread; ++k)
      if (at[k] != nullptr) *at[k] = v[k];
  }
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
  move_slot(p.arrays, p.num_arrays, h, src, dst);
}

inline void launch_replace_with_last(const MoveParams& p, cudaStream_t stream) {
  if (p.num_arrays == 0) return;
  replace_with_last_kernel<kMoveThreads><<<static_cast<unsigned>(p.num_kv_heads), kMoveThreads, 0, stream>>>(p);
  check_launch("CudaBackend::replace_with_last", "replace_with_last_kernel");
}

}  // namespace kvevict::cuda::detail
