// Owning, zero-initialised device array (the CUDA backend's Buffer) and a pinned host array for
// the few results that must come back to the host. Both move-only RAII.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "kvevict/backends/cuda/cuda_check.cuh"

namespace kvevict::cuda {

// `n` elements of U in device memory, zeroed by cudaMemsetAsync on `stream` (so work queued on
// that stream sees zeros; other streams must order themselves after it). Allocates; never call
// in a per-token path. Freeing uses cudaFree, which waits for the device.
template <class U>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::int64_t n, cudaStream_t stream = nullptr) : size_(n) {
    if (n < 0) kvevict::detail::fail<ArgumentError>("DeviceBuffer", "n", n, "must be >= 0");
    if (n == 0) return;
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(U);
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "DeviceBuffer", "cudaMalloc of " + std::to_string(bytes) + " bytes");
    data_ = static_cast<U*>(p);
    const cudaError_t status = cudaMemsetAsync(p, 0, bytes, stream);
    if (status != cudaSuccess) {
      release();
      check(status, "DeviceBuffer", "cudaMemsetAsync");
    }
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }

  [[nodiscard]] U* data() noexcept { return data_; }
  [[nodiscard]] const U* data() const noexcept { return data_; }
  [[nodiscard]] std::int64_t size() const noexcept { return size_; }

 private:
  void release() noexcept {
    if (data_ != nullptr) (void)cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }
  U* data_ = nullptr;
  std::int64_t size_ = 0;
};

// `n` elements of U in page-locked host memory (cudaMallocHost), zeroed. Used as the landing
// place of the small device-to-host reads that a host decision needs.
template <class U>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(std::int64_t n) : size_(n) {
    if (n <= 0) {
      size_ = 0;
      return;
    }
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(U);
    void* p = nullptr;
    check(cudaMallocHost(&p, bytes), "PinnedBuffer", "cudaMallocHost of " + std::to_string(bytes) + " bytes");
    data_ = static_cast<U*>(p);
    for (std::int64_t i = 0; i < n; ++i) data_[i] = U{};
  }
  PinnedBuffer(PinnedBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { release(); }

  [[nodiscard]] U* data() noexcept { return data_; }
  [[nodiscard]] const U* data() const noexcept { return data_; }
  [[nodiscard]] std::int64_t size() const noexcept { return size_; }

 private:
  void release() noexcept {
    if (data_ != nullptr) (void)cudaFreeHost(data_);
    data_ = nullptr;
    size_ = 0;
  }
  U* data_ = nullptr;
  std::int64_t size_ = 0;
};

}  // namespace kvevict::cuda
