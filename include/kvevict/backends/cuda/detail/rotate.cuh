// rotate_keys: rotates every live key whose position >= min_position by a fixed angle per RoPE
// pair. The cos/sin table is computed on the host in double exactly as the CPU backend does and
// travels by value; products and differences use explicit round-to-nearest double intrinsics
// (no fused multiply-add), so results agree with the CPU backend bit for bit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/detail/device_layer.cuh"

namespace kvevict::cuda::detail {

inline constexpr int kMaxRotaryPairs = 256;  // rotary_dim <= 512
inline constexpr int kRotateThreads = 256;
inline constexpr int kRotateSlotsPerBlock = 16;

struct RotateParams {
  DeviceLayer layer;
  std::int64_t min_position;
  std::int32_t half;          // rotary_dim / 2 pairs
  bool interleaved;           // pairs (2i, 2i+1); otherwise (i, i + half)
  double cos[kMaxRotaryPairs];
  double sin[kMaxRotaryPairs];
};
static_assert(std::is_trivially_copyable_v<RotateParams>);

template <int kThreads>
__global__ void __launch_bounds__(kThreads) rotate_keys_kernel(RotateParams p) {
  __shared__ double s_cos[kMaxRotaryPairs];
  __shared__ double s_sin[kMaxRotaryPairs];
  for (int i = threadIdx.x; i < p.half; i += blockDim.x) {
    s_cos[i] = p.cos[i];
    s_sin[i] = p.sin[i];
  }
  __syncthreads();
  const std::int64_t h = blockIdx.y;
  const std::int64_t n = p.layer.lens.v[h];
  const std::int64_t slot0 = static_cast<std::int64_t>(blockIdx.x) * kRotateSlotsPerBlock;
  const std::int32_t* pos = p.layer.head_positions(h);
  for (int e = threadIdx.x; e < kRotateSlotsPerBlock * p.half; e += blockDim.x) {
    const int s = e / p.half;
    const int i = e - s * p.half;
    const std::int64_t j = slot0 + s;
    if (j >= n || pos[j] < p.min_position) continue;
    float* k = p.layer.keys + h * p.layer.head_stride + j * p.layer.slot_stride;
    const int ia = p.interleaved ? 2 * i : i;
    const int ib = p.interleaved ? 2 * i + 1 : i + p.half;
    const double c = s_cos[i];
    const double sn = s_sin[i];
    const double x = k[ia];
    const double y = k[ib];
    k[ia] = __double2float_rn(__dsub_rn(__dmul_rn(x, c), __dmul_rn(y, sn)));
    k[ib] = __double2float_rn(__dadd_rn(__dmul_rn(x, sn), __dmul_rn(y, c)));
  }
}

inline void launch_rotate_keys(const RotateParams& p, cudaStream_t stream) {
  if (p.layer.max_len == 0 || p.half == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.layer.max_len, kRotateSlotsPerBlock)),
                  static_cast<unsigned>(p.layer.num_kv_heads));
  rotate_keys_kernel<kRotateThreads><<<grid, kRotateThreads, 0, stream>>>(p);
  check_launch("CudaBackend::rotate_keys", "rotate_keys_kernel");
}

}  // namespace kvevict::cuda::detail
