// Selector parts: which entries are protected from eviction. The backend's top-k then ranks the
// rest by (score desc, position asc).
#pragma once

#include <cstdint>

#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"

namespace kvevict {

// Keeps the first `sink` positions and the newest `recent` positions of the sequence.
// "Newest" is counted from next_position, i.e. from tokens seen, so it matches the official
// "last R slots" whenever those tokens are resident (they always are: they are protected).
struct SinkRecentSelector {
  std::int64_t sink = 0;
  std::int64_t recent = 0;

  [[nodiscard]] ProtectRule rule(std::int64_t next_position, std::int64_t incoming = 0) const noexcept {
    return ProtectRule{sink, next_position - recent + incoming};
  }
  [[nodiscard]] std::int64_t protected_entries() const noexcept { return sink + recent; }
  void check(const char* where) const {
    if (sink < 0) detail::fail<ArgumentError>(where, "sink", sink, "must be >= 0");
    if (recent < 0) detail::fail<ArgumentError>(where, "recent", recent, "must be >= 0");
  }
};

}  // namespace kvevict
