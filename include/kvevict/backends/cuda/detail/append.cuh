// append: copies [kv_head, token, head_dim] source rows into slots lens[h] .. lens[h]+n-1 and
// writes their positions. One warp per (token, kv_head) row, lanes over head_dim.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"

namespace kvevict::cuda::detail {

struct AppendParams {
  DeviceLayer layer;
  const float* keys;         // [kv_head, token, head_dim], device memory
  const float* values;       // [kv_head, token, head_dim], device memory
  std::int64_t num_tokens;
  std::int64_t first_position;
};
static_assert(std::is_trivially_copyable_v<AppendParams>);

inline constexpr int kAppendThreads = 256;  // one warp per (token, kv_head) row

template <int kThreads>
__global__ void __launch_bounds__(kThreads) append_kernel(AppendParams p) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const std::int64_t h = blockIdx.y;
  if (t >= p.num_tokens) return;
  const std::int64_t d = p.layer.head_dim;
  const std::int64_t slot = p.layer.lens.v[h] + t;
  const std::int64_t src = (h * p.num_tokens + t) * d;
  float* k = p.layer.keys + h * p.layer.head_stride + slot * p.layer.slot_stride;
  float* v = p.layer.values + h * p.layer.head_stride + slot * p.layer.slot_stride;
  for (std::int64_t i = lane; i < d; i += 32) {
    k[i] = p.keys[src + i];
    v[i] = p.values[src + i];
  }
  if (lane == 0) p.layer.positions[h * p.layer.capacity + slot] = static_cast<std::int32_t>(p.first_position + t);
}

// Precondition (checked by KVCache): lens[h] + num_tokens <= capacity for every head.
inline void launch_append(const AppendParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.num_tokens, kAppendThreads / 32)),
                  static_cast<unsigned>(p.layer.num_kv_heads));
  append_kernel<kAppendThreads><<<grid, kAppendThreads, 0, stream>>>(p);
  check_launch("CudaBackend::append", "append_kernel");
}

}  // namespace kvevict::cuda::detail
