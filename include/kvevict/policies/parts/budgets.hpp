// Budget parts: how many entries each (layer, kv_head) keeps.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kvevict/core/error.hpp"
#include "kvevict/core/shape.hpp"

namespace kvevict {

// The same absolute number of entries for every layer and kv-head.
struct UniformBudget {
  std::int64_t entries = 0;

  [[nodiscard]] std::int64_t for_head(std::int64_t /*layer*/, std::int64_t /*kv_head*/) const noexcept {
    return entries;
  }
  void check(const char* where, const CacheShape& shape, std::int64_t protected_entries) const {
    if (entries <= 0) detail::fail<BudgetError>(where, "budget", entries, "must be > 0");
    if (entries > shape.capacity)
      detail::fail<BudgetError>(where, "budget", entries,
                                "must be <= capacity (" + std::to_string(shape.capacity) + ")");
    if (entries < protected_entries)
      detail::fail<BudgetError>(where, "budget", entries,
                                "must be >= sink + recent (" + std::to_string(protected_entries) + ")");
  }
};

}  // namespace kvevict
