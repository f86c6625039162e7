// Cache geometry: layers, heads, head_dim, capacity. Validated once, at construction.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvevict/core/error.hpp"

namespace kvevict {

// How many entries a layout fits per (layer, kv_head) and how they are grouped.
struct CacheShape {
  std::int64_t num_layers = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t num_q_heads = 0;  // a multiple of num_kv_heads (GQA group = q / kv)
  std::int64_t head_dim = 0;
  std::int64_t capacity = 0;  // slots per (layer, kv_head), fixed for the cache's lifetime

  [[nodiscard]] constexpr std::int64_t group_size() const noexcept {
    return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0;
  }
  // Elements of one K (or V) tensor of one layer: [kv_head, slot, head_dim].
  [[nodiscard]] constexpr std::int64_t layer_elements() const noexcept {
    return num_kv_heads * capacity * head_dim;
  }

  // Non-throwing check for callers that cannot use exceptions.
  [[nodiscard]] constexpr ErrorCode validate() const noexcept {
    if (num_layers <= 0 || num_kv_heads <= 0 || num_q_heads <= 0 || head_dim <= 0 || capacity <= 0)
      return ErrorCode::invalid_argument;
    if (num_q_heads % num_kv_heads != 0) return ErrorCode::shape_mismatch;
    if (capacity > INT32_MAX) return ErrorCode::invalid_argument;  // slot indices are stored in 32 bits
    return ErrorCode::ok;
  }

  void check(const char* where) const {
    auto positive = [&](const char* name, std::int64_t v) {
      if (v <= 0) detail::fail<ArgumentError>(where, name, v, "must be > 0");
    };
    positive("num_layers", num_layers);
    positive("num_kv_heads", num_kv_heads);
    positive("num_q_heads", num_q_heads);
    positive("head_dim", head_dim);
    positive("capacity", capacity);
    if (num_q_heads % num_kv_heads != 0)
      detail::fail<ShapeError>(where, "num_q_heads", num_q_heads,
                               "must be a multiple of num_kv_heads (GQA groups)");
    if (capacity > INT32_MAX)
      detail::fail<ArgumentError>(where, "capacity", capacity, "must fit a 32-bit slot index");
  }

  friend constexpr bool operator==(const CacheShape&, const CacheShape&) = default;
};

namespace detail {
// A cache handed to an object built for another shape: ShapeError naming the first field that
// differs, its value in the cache and the value expected (e.g. a mismatched GQA group).
[[noreturn]] inline void fail_shape_mismatch(std::string_view where, const CacheShape& expected, const CacheShape& cache) {
  const auto field = [&](const char* name, std::int64_t got, std::int64_t want) {
    if (got != want)
      fail<ShapeError>(where, std::string("cache.shape().") + name, got,
                       "must be " + std::to_string(want) + ", as in the shape this was built for");
  };
  field("num_layers", cache.num_layers, expected.num_layers);
  field("num_kv_heads", cache.num_kv_heads, expected.num_kv_heads);
  field("num_q_heads", cache.num_q_heads, expected.num_q_heads);
  field("head_dim", cache.head_dim, expected.head_dim);
  field("capacity", cache.capacity, expected.capacity);
  fail_state<ShapeError>(where, "the cache's shape differs from the one this was built for");
}
}  // namespace detail

}  // namespace kvevict
