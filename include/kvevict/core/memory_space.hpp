// Memory spaces as types: a pointer tagged with the space it lives in, so handing host data to
// a device backend (or the reverse) is a compile error rather than a crash.
#pragma once

#include <cstdint>
#include <type_traits>

namespace kvevict {

struct HostSpace {
  static constexpr const char* name = "host";
};
struct CudaSpace {
  static constexpr const char* name = "cuda";
};

// A non-owning run of `size` elements of T in memory space Space.
template <class T, class Space>
struct MemorySpan {
  using element_type = T;
  using memory_space = Space;

  T* ptr = nullptr;
  std::int64_t size = 0;

  constexpr MemorySpan() = default;
  constexpr MemorySpan(T* p, std::int64_t n) : ptr(p), size(n) {}
  // Non-const to const conversion.
  template <class U>
    requires std::is_same_v<std::add_const_t<U>, T> && (!std::is_same_v<U, T>)
  constexpr MemorySpan(MemorySpan<U, Space> other) : ptr(other.ptr), size(other.size) {}

  [[nodiscard]] constexpr T* data() const noexcept { return ptr; }
  [[nodiscard]] constexpr bool empty() const noexcept { return size == 0; }
};

template <class T>
using HostSpan = MemorySpan<T, HostSpace>;
template <class T>
using CudaSpan = MemorySpan<T, CudaSpace>;

}  // namespace kvevict
