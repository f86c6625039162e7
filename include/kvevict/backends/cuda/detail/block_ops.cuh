// Warp and block collectives used by the kernels: reductions and an exclusive scan. Fixed
// shuffle trees, so results are identical from run to run. Every thread of the block must call
// them (blockDim.x a multiple of 32, at most 1024).
#pragma once

#include <cuda_runtime.h>

namespace kvevict::cuda::detail {

inline constexpr unsigned kFullMask = 0xffffffffu;

struct SumOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return a < b ? b : a; }
};
struct MinOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return b < a ? b : a;
  }
};

template <class T, class Op>
__device__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Reduces one value per thread; every thread receives the result. `scratch`: 32 shared T.
template <class T, class Op>
__device__ T block_reduce(T v, T* scratch, Op op, T identity) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int num_warps = static_cast<int>(blockDim.x + 31) >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : identity;
  return warp_reduce(v, op);
}

// Exclusive prefix sum of one int per thread in thread order; `total` receives the block's sum.
// `scratch`: 32 shared ints.
__device__ inline int block_exclusive_scan(int v, int* scratch, int& total) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int num_warps = static_cast<int>(blockDim.x + 31) >> 5;
  int inclusive = v;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int w = lane < num_warps ? scratch[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int up = __shfl_up_sync(kFullMask, w, offset);
      if (lane >= offset) w += up;
    }
    scratch[lane] = w;  // inclusive prefix over warps
  }
  __syncthreads();
  total = scratch[num_warps - 1];
  const int warp_prefix = warp > 0 ? scratch[warp - 1] : 0;
  return warp_prefix + inclusive - v;
}

}  // namespace kvevict::cuda::detail
