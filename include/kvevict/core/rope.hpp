// Rotary position embedding description, used to re-rotate cached keys by a position delta.
#pragma once

#include <cstdint>

#include "kvevict/core/error.hpp"

namespace kvevict {

enum class RopeLayout {
  interleaved_pairs,  // llama2.c / GPT-J: dims (2i, 2i+1) form a pair
  halves,             // GPT-NeoX / Hugging Face: dims (i, i + rotary_dim/2) form a pair
};

struct RopeSpec {
  double base = 10000.0;
  std::int64_t rotary_dim = 0;  // leading dims that rotate; the rest pass through
  RopeLayout layout = RopeLayout::interleaved_pairs;

  void check(const char* where, std::int64_t head_dim) const {
    if (!(base > 1.0)) detail::fail<ArgumentError>(where, "rope.base", base, "must be > 1");
    if (rotary_dim <= 0 || rotary_dim > head_dim || rotary_dim % 2 != 0)
      detail::fail<ArgumentError>(where, "rope.rotary_dim", rotary_dim,
                                  "must be even and in (0, head_dim]");
  }
  // Inverse frequency of pair i: base^(-2i / rotary_dim), in both layouts.
};

}  // namespace kvevict
