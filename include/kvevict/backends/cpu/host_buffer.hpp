// Owning, 64-byte aligned, zero-initialised host array: the CPU backend's Buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <utility>

namespace kvevict::cpu {

template <class U>
class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(std::int64_t n) : size_(n) {
    if (n > 0) {
      const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(U);
      data_ = static_cast<U*>(::operator new[](bytes, std::align_val_t{64}));
      std::memset(static_cast<void*>(data_), 0, bytes);
    }
  }
  HostBuffer(HostBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  HostBuffer& operator=(HostBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  ~HostBuffer() { release(); }

  [[nodiscard]] U* data() noexcept { return data_; }
  [[nodiscard]] const U* data() const noexcept { return data_; }
  [[nodiscard]] std::int64_t size() const noexcept { return size_; }

 private:
  void release() noexcept {
    if (data_ != nullptr) ::operator delete[](static_cast<void*>(data_), std::align_val_t{64});
    data_ = nullptr;
  }
  U* data_ = nullptr;
  std::int64_t size_ = 0;
};

}  // namespace kvevict::cpu
