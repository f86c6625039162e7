// all_finite: raises a device flag when any element is NaN or +-Inf. The caller reads the flag
// back (the one synchronising primitive whose result the host needs by design).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"

namespace kvevict::cuda::detail {

struct FiniteParams {
  const float* data;  // [n], device memory
  std::int64_t n;
  std::int32_t* flag;  // set to 1 when a non-finite element exists (cleared by the launcher)
};
static_assert(std::is_trivially_copyable_v<FiniteParams>);

inline constexpr int kFiniteThreads = 256;

template <int kThreads>
__global__ void __launch_bounds__(kThreads) all_finite_kernel(FiniteParams p) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  bool bad = false;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride)
    bad |= (__float_as_uint(p.data[i]) & 0x7f800000u) == 0x7f800000u;  // exponent all ones: Inf or NaN
  if (__syncthreads_or(bad) && threadIdx.x == 0) *p.flag = 1;
}

// Clears the flag and queues the scan; the flag is valid once the stream reaches this point.
inline void launch_all_finite(const FiniteParams& p, cudaStream_t stream) {
  check(cudaMemsetAsync(p.flag, 0, sizeof(std::int32_t), stream), "CudaBackend::all_finite", "cudaMemsetAsync");
  if (p.n <= 0) return;
  const std::int64_t blocks = std::min<std::int64_t>(ceil_div(p.n, kFiniteThreads), 1024);
  all_finite_kernel<kFiniteThreads><<<static_cast<unsigned>(blocks), kFiniteThreads, 0, stream>>>(p);
  check_launch("CudaBackend::all_finite", "all_finite_kernel");
}

}  // namespace kvevict::cuda::detail
