// The kernel-side picture of one cache layer. LayerView::lens is host memory, so per-head lengths
// (and the other per-head host arrays: fresh_from, keep_count) travel by value inside the
// trivially-copyable parameter structs, bounded by kMaxKvHeads.
// Conventions of every detail/*.cuh: kernels are templates on their block size (so a header can
// define them in many translation units), take one parameter struct by value, and are queued by
// a host launch_* function that takes the stream and checks the launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"

namespace kvevict::cuda::detail {

// Most kv-heads one layer may have on the CUDA backend: per-head arrays are passed by value in
// kernel parameters (kMaxKvHeads int32 each, well inside the 32 KiB parameter space of sm_70+).
inline constexpr std::int64_t kMaxKvHeads = 256;

__host__ __device__ constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) noexcept { return (a + b - 1) / b; }

// One int32 per kv-head, by value.
struct PerHead {
  std::int32_t v[kMaxKvHeads];
};

// Throws UnsupportedError when a layer has more kv-heads than the parameter structs can carry.
inline void check_kv_heads(std::string_view where, std::int64_t num_kv_heads) {
  if (num_kv_heads < 1 || num_kv_heads > kMaxKvHeads)
    kvevict::detail::fail<UnsupportedError>(where, "num_kv_heads", num_kv_heads,
                                            "the CUDA backend supports 1 to " + std::to_string(kMaxKvHeads) +
                                                " kv-heads per layer");
}

// LayerView minus the host pointer, plus the lengths themselves.
struct DeviceLayer {
  float* keys;                // [kv_head, slot, head_dim] with the strides below
  float* values;              // [kv_head, slot, head_dim]
  std::int32_t* positions;    // [kv_head, capacity]
  std::int64_t head_stride;   // elements
  std::int64_t slot_stride;   // elements
  std::int64_t capacity;
  std::int32_t num_kv_heads;
  std::int32_t num_q_heads;
  std::int32_t group_size;    // q-heads per kv-head
  std::int32_t head_dim;
  std::int32_t max_len;       // max over heads of lens
  PerHead lens;               // [kv_head] live slots

  __device__ const float* key(std::int64_t h, std::int64_t slot) const {
    return keys + h * head_stride + slot * slot_stride;
  }
  __device__ const float* value(std::int64_t h, std::int64_t slot) const {
    return values + h * head_stride + slot * slot_stride;
  }
  __device__ const std::int32_t* head_positions(std::int64_t h) const { return positions + h * capacity; }
};
static_assert(std::is_trivially_copyable_v<DeviceLayer>, "kernel parameters must be trivially copyable");

// Validates the host-side facts a kernel relies on (head count, lengths within capacity, GQA
// grouping) and copies the lengths. Host only; does not touch device memory.
inline DeviceLayer make_device_layer(std::string_view where, const LayerView<float>& v) {
  check_kv_heads(where, v.num_kv_heads);
  if (v.num_q_heads < v.num_kv_heads || v.num_q_heads % v.num_kv_heads != 0)
    kvevict::detail::fail<ShapeError>(where, "num_q_heads", v.num_q_heads,
                                      "must be a positive multiple of num_kv_heads (" + std::to_string(v.num_kv_heads) + ")");
  if (v.head_dim < 1 || v.head_dim > INT32_MAX)
    kvevict::detail::fail<ShapeError>(where, "head_dim", v.head_dim, "must be in [1, 2^31)");
  if (v.capacity < 1 || v.capacity > INT32_MAX)
    kvevict::detail::fail<ShapeError>(where, "capacity", v.capacity, "must be in [1, 2^31)");
  if (v.lens == nullptr) kvevict::detail::fail<ArgumentError>(where, "lens", "null", "must point at [kv_head] host lengths");
  DeviceLayer d{};
  d.keys = v.keys;
  d.values = v.values;
  d.positions = v.positions;
  d.head_stride = v.head_stride;
  d.slot_stride = v.slot_stride;
  d.capacity = v.capacity;
  d.num_kv_heads = static_cast<std::int32_t>(v.num_kv_heads);
  d.num_q_heads = static_cast<std::int32_t>(v.num_q_heads);
  d.group_size = static_cast<std::int32_t>(v.num_q_heads / v.num_kv_heads);
  d.head_dim = static_cast<std::int32_t>(v.head_dim);
  d.max_len = 0;
  for (std::int64_t h = 0; h < v.num_kv_heads; ++h) {
    const std::int64_t n = v.lens[h];
    if (n < 0 || n > v.capacity)
      kvevict::detail::fail<ArgumentError>(where, "lens[" + std::to_string(h) + "]", n,
                                           "must be in [0, capacity = " + std::to_string(v.capacity) + "]");
    d.lens.v[h] = static_cast<std::int32_t>(n);
    if (n > d.max_len) d.max_len = static_cast<std::int32_t>(n);
  }
  return d;
}

// Bits of -inf, for device code that must not depend on relaxed-constexpr numeric_limits.
__device__ inline float negative_infinity() { return __int_as_float(static_cast<int>(0xff800000u)); }

}  // namespace kvevict::cuda::detail
