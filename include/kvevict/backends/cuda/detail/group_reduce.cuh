// group_reduce: out[kv, j] = mean / max / sum over the group's q-heads of in[qh, j], live slots
// only. Same operation order as the CPU backend (first row, then rows 1..G-1, then * (1/G)), so
// the results agree bit for bit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"
#include "kvevict/core/layer_view.hpp"

namespace kvevict::cuda::detail {

struct GroupReduceParams {
  DeviceLayer layer;
  const float* in;  // [q_head, capacity]
  float* out;       // [kv_head, capacity]
  GroupAgg agg;
};
static_assert(std::is_trivially_copyable_v<GroupReduceParams>);

inline constexpr int kGroupReduceThreads = 256;

template <int kThreads>
__global__ void __launch_bounds__(kThreads) group_reduce_kernel(GroupReduceParams p) {
  const std::int64_t h = blockIdx.y;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= p.layer.lens.v[h]) return;
  const std::int64_t g = p.layer.group_size;
  const std::int64_t cap = p.layer.capacity;
  const float* first = p.in + h * g * cap + j;
  float o = first[0];
  for (std::int64_t r = 1; r < g; ++r) {
    const float x = first[r * cap];
    if (p.agg == GroupAgg::max)
      o = o < x ? x : o;  // std::max's exact choice (keeps the first of equal values, e.g. +-0)
    else
      o += x;
  }
  if (p.agg == GroupAgg::mean && g > 1) o *= 1.0f / static_cast<float>(g);
  p.out[h * cap + j] = o;
}

inline void launch_group_reduce(const GroupReduceParams& p, cudaStream_t stream) {
  if (p.layer.max_len == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kGroupReduceThreads)),
                  static_cast<unsigned>(p.layer.num_kv_heads));
  group_reduce_kernel<kGroupReduceThreads><<<grid, kGroupReduceThreads, 0, stream>>>(p);
  check_launch("CudaBackend::group_reduce", "group_reduce_kernel");
}

}  // namespace kvevict::cuda::detail
