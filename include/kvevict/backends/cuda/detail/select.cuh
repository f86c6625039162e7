// Selection kernels, one block per kv-head, exact and deterministic.
// - select_victims: block-wide arg-min under the order (score asc, position desc): the lowest
//   score, ties to the newest position; without scores, the oldest position. Positions are
//   unique per head, so the order is total and the reduction order cannot change the answer.
//   NaN scores follow the CPU backend's scan: a NaN in the first unprotected slot is the victim,
//   any other NaN never is.
// - select_topk: radix select on a 64-bit key that encodes (score desc, position asc) exactly:
//   key = orderable_bits(score) << 32 | ~position (or the position alone without scores, newest
//   first). Eight-bit digits from the top; a pass stops as soon as the bucket that holds the
//   k-th largest key is taken whole. Keys are unique, so exactly `need` candidates have
//   key >= threshold. Survivors (protected or selected) are written in ascending slot order by
//   a block-wide scan. Reads scores and positions once per pass; no workspace.
// select_topk scores must not be NaN (the CPU order is undefined there too); -0.0 ranks equal
// to +0.0 in both selections.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/block_ops.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"

namespace kvevict::cuda::detail {

struct SelectParams {
  DeviceLayer layer;
  const float* scores;         // [kv_head, capacity] or nullptr (rank by recency)
  std::int64_t sink_end;       // ProtectRule: position < sink_end or >= recent_begin is kept
  std::int64_t recent_begin;
  // select_victims
  std::int32_t* victims;       // [kv_head] out
  // select_topk
  PerHead keep_count;          // [kv_head] min(keep_count, len), may be negative
  std::int32_t* keep_slots;    // [kv_head, capacity] out
  std::int32_t* num_protected; // [kv_head] out, for the host's budget check

  __device__ bool protects(std::int64_t pos) const { return pos < sink_end || pos >= recent_begin; }
};
static_assert(std::is_trivially_copyable_v<SelectParams>);

inline constexpr int kVictimThreads = 256;
inline constexpr int kTopkThreads = 1024;

// On the bits, so that fast-math flags cannot fold it away.
__device__ inline bool is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

// A victim candidate: slot -1 means none.
struct VictimCandidate {
  float score;
  std::int32_t pos;
  std::int32_t slot;
};

// True when `a` should be evicted before `b`.
__device__ inline bool evict_before(const VictimCandidate& a, const VictimCandidate& b, bool has_scores) {
  if (a.slot < 0) return false;
  if (b.slot < 0) return true;
  if (!has_scores) return a.pos < b.pos;
  return a.score < b.score || (a.score == b.score && a.pos > b.pos);
}

__device__ inline VictimCandidate shfl_candidate(const VictimCandidate& c, int offset) {
  return {__shfl_xor_sync(kFullMask, c.score, offset), __shfl_xor_sync(kFullMask, c.pos, offset),
          __shfl_xor_sync(kFullMask, c.slot, offset)};
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) select_victims_kernel(SelectParams p) {
  __shared__ VictimCandidate s_warp[32];
  __shared__ std::int32_t s_first[32];
  const std::int64_t h = blockIdx.x;
  const std::int64_t n = p.layer.lens.v[h];
  const std::int32_t* pos = p.layer.head_positions(h);
  const float* s = p.scores != nullptr ? p.scores + h * p.layer.capacity : nullptr;
  const bool has_scores = s != nullptr;
  VictimCandidate best{0.0f, 0, -1};
  std::int32_t first = INT32_MAX;  // first unprotected slot, for the CPU's NaN rule
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    if (p.protects(pos[j])) continue;
    first = min(first, static_cast<std::int32_t>(j));
    const VictimCandidate c{has_scores ? s[j] : 0.0f, pos[j], static_cast<std::int32_t>(j)};
    if (has_scores && is_nan(c.score)) continue;
    if (evict_before(c, best, has_scores)) best = c;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const VictimCandidate o = shfl_candidate(best, offset);
    if (evict_before(o, best, has_scores)) best = o;
    first = min(first, __shfl_xor_sync(kFullMask, first, offset));
  }
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  if (lane == 0) {
    s_warp[warp] = best;
    s_first[warp] = first;
  }
  __syncthreads();
  if (warp == 0) {
    const int num_warps = static_cast<int>(blockDim.x) >> 5;
    best = lane < num_warps ? s_warp[lane] : VictimCandidate{0.0f, 0, -1};
    first = lane < num_warps ? s_first[lane] : INT32_MAX;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const VictimCandidate o = shfl_candidate(best, offset);
      if (evict_before(o, best, has_scores)) best = o;
      first = min(first, __shfl_xor_sync(kFullMask, first, offset));
    }
    // The CPU's scan starts at the first unprotected slot and never moves to or away from a NaN:
    // a NaN there is the victim, NaNs elsewhere never are.
    if (lane == 0) p.victims[h] = (has_scores && first != INT32_MAX && is_nan(s[first])) ? first : best.slot;
  }
}

inline void launch_select_victims(const SelectParams& p, cudaStream_t stream) {
  select_victims_kernel<kVictimThreads><<<static_cast<unsigned>(p.layer.num_kv_heads), kVictimThreads, 0, stream>>>(p);
  check_launch("CudaBackend::select_victims", "select_victims_kernel");
}

// Monotone map of a non-NaN float onto uint32 (larger float, larger key); -0.0 maps as +0.0.
__device__ inline std::uint32_t orderable_bits(float x) {
  const std::uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (u & 0x80000000u) != 0u ? ~u : (u | 0x80000000u);
}

__device__ inline std::uint64_t rank_key(const float* s, const std::int32_t* pos, std::int64_t j) {
  const auto p = static_cast<std::uint32_t>(pos[j]);
  if (s == nullptr) return p;  // newest first
  return (static_cast<std::uint64_t>(orderable_bits(s[j])) << 32) | static_cast<std::uint64_t>(~p);
}

struct RadixState {
  int hist[256];
  int scratch[32];
  int digit;
  int above;  // keys under the prefix with a larger digit
  int count;  // keys under the prefix with this digit
};

// The `need`-th largest key among the unprotected live slots (1 <= need < candidates): returns a
// threshold t with exactly `need` candidate keys >= t.
__device__ inline std::uint64_t radix_threshold(const SelectParams& p, const float* s, const std::int32_t* pos,
                                                std::int64_t n, int need, RadixState& st) {
  std::uint64_t prefix = 0, mask = 0;
  int remaining = need;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  for (int shift = s != nullptr ? 56 : 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) st.hist[b] = 0;
    __syncthreads();
    // Every lane runs every iteration so that lanes hitting the same bin combine their
    // increments (one shared atomic per distinct bin per warp: equal scores stay cheap).
    for (std::int64_t j0 = 0; j0 < n; j0 += blockDim.x) {
      const std::int64_t j = j0 + threadIdx.x;
      int bin = -1;
      if (j < n && !p.protects(pos[j])) {
        const std::uint64_t key = rank_key(s, pos, j);
        if ((key & mask) == prefix) bin = static_cast<int>((key >> shift) & 0xffu);
      }
      const unsigned peers = __match_any_sync(kFullMask, bin);
      if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(&st.hist[bin], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l owns bins [8l, 8l + 8); suffix sums over lanes find the bucket of the
      // remaining-th largest key, scanning from the top bin down.
      int own = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) own += st.hist[8 * lane + b];
      int suffix = own;
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int down = __shfl_down_sync(kFullMask, suffix, offset);
        if (lane + offset < 32) suffix += down;
      }
      int above = suffix - own;
      if (above < remaining && remaining <= suffix) {
        for (int b = 8 * lane + 7; b >= 8 * lane; --b) {
          if (above + st.hist[b] >= remaining) {
            st.digit = b;
            st.above = above;
            st.count = st.hist[b];
            break;
          }
          above += st.hist[b];
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<std::uint64_t>(st.digit) << shift;
    mask |= static_cast<std::uint64_t>(0xffu) << shift;
    remaining -= st.above;
    const bool whole_bucket = remaining == st.count;
    __syncthreads();  // st is rewritten by the next pass
    if (whole_bucket) break;
  }
  return prefix;  // keys >= prefix (lower bits zero) are exactly the selected ones
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) select_topk_kernel(SelectParams p) {
  __shared__ RadixState st;
  const std::int64_t h = blockIdx.x;
  const std::int64_t n = p.layer.lens.v[h];
  const std::int32_t* pos = p.layer.head_positions(h);
  const float* s = p.scores != nullptr ? p.scores + h * p.layer.capacity : nullptr;
  int local = 0;
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) local += p.protects(pos[j]) ? 1 : 0;
  const int num_protected = block_reduce(local, st.scratch, SumOp{}, 0);
  if (threadIdx.x == 0) p.num_protected[h] = num_protected;
  const std::int64_t need = static_cast<std::int64_t>(p.keep_count.v[h]) - num_protected;
  if (need < 0) return;  // the host throws BudgetError
  const std::int64_t num_candidates = n - num_protected;
  const bool keep_all = need >= num_candidates;
  const bool keep_none = need == 0;
  std::uint64_t threshold = 0;
  if (!keep_all && !keep_none) threshold = radix_threshold(p, s, pos, n, static_cast<int>(need), st);
  std::int32_t* out = p.keep_slots + h * p.layer.capacity;
  std::int64_t written = 0;
  for (std::int64_t j0 = 0; j0 < n; j0 += blockDim.x) {
    const std::int64_t j = j0 + threadIdx.x;
    int keep = 0;
    if (j < n) {
      if (p.protects(pos[j]) || keep_all)
        keep = 1;
      else if (!keep_none)
        keep = rank_key(s, pos, j) >= threshold ? 1 : 0;
    }
    int total = 0;
    const int offset = block_exclusive_scan(keep, st.scratch, total);
    if (keep != 0) out[written + offset] = static_cast<std::int32_t>(j);
    written += total;
  }
}

inline void launch_select_topk(const SelectParams& p, cudaStream_t stream) {
  select_topk_kernel<kTopkThreads><<<static_cast<unsigned>(p.layer.num_kv_heads), kTopkThreads, 0, stream>>>(p);
  check_launch("CudaBackend::select_topk", "select_topk_kernel");
}

}  // namespace kvevict::cuda::detail
