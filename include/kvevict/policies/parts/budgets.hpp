// Budget parts: how many entries each (layer, kv_head) keeps, given the sequence length seen.
// Every budget answers entries(layer, seq_len) = the per-head target including protected
// entries; seq_len itself means "keep everything".
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kvevict/core/error.hpp"
#include "kvevict/core/shape.hpp"

namespace kvevict {

// The same absolute number of entries for every layer and kv-head.
struct UniformBudget {
  std::int64_t entries_per_head = 0;

  [[nodiscard]] std::int64_t entries(std::int64_t /*layer*/, std::int64_t /*seq_len*/) const noexcept {
    return entries_per_head;
  }
  void check(const char* where, const CacheShape& shape, std::int64_t protected_entries) const {
    if (entries_per_head <= 0) detail::fail<BudgetError>(where, "budget", entries_per_head, "must be > 0");
    if (entries_per_head > shape.capacity)
      detail::fail<BudgetError>(where, "budget", entries_per_head,
                                "must be <= capacity (" + std::to_string(shape.capacity) + ")");
    if (entries_per_head < protected_entries)
      detail::fail<BudgetError>(where, "budget", entries_per_head,
                                "must be >= sink + recent (" + std::to_string(protected_entries) + ")");
  }
};

// kvpress presses: keep n_kept = int(S * (1 - compression_ratio)) of the S entries (window
// included); ratio 0 keeps everything.
struct RatioBudget {
  double compression_ratio = 0.0;

  [[nodiscard]] std::int64_t entries(std::int64_t /*layer*/, std::int64_t seq_len) const noexcept {
    return static_cast<std::int64_t>(static_cast<double>(seq_len) * (1.0 - compression_ratio));
  }
  void check(const char* where, const CacheShape& /*shape*/, std::int64_t /*protected_entries*/) const {
    if (!(compression_ratio >= 0.0 && compression_ratio < 1.0))
      detail::fail<BudgetError>(where, "compression_ratio", compression_ratio, "must be in [0, 1)");
  }
};

// PyramidKV (KVCache-Factory PyramidKVCluster, integer arithmetic): for prompt length S,
// S < C keeps all; C <= S < 2(C - w) keeps C in every layer (the reference's uniform middle
// branch); otherwise layer l keeps B_l + w with min = (C-w)//beta, max = 2(C-w) - min
// (capped at S - w, then min = 2(C-w) - max), steps = (max-min)//(L-1), B_l = max - l*steps.
// `layer_ids` maps cache layers to the model's layer index (default: identity).
struct PyramidBudget {
  std::int64_t capacity = 2048;  // C, window included
  std::int64_t window = 32;      // w
  std::int64_t beta = 20;
  std::int64_t num_model_layers = 0;  // num_hidden_layers of the model
  std::vector<std::int64_t> layer_ids{};

  [[nodiscard]] std::int64_t layer_index(std::int64_t layer) const {
    return layer_ids.empty() ? layer : layer_ids[static_cast<std::size_t>(layer)];
  }
  [[nodiscard]] std::int64_t entries(std::int64_t layer, std::int64_t seq_len) const {
    const std::int64_t c = capacity, w = window, s = seq_len;
    if (s < c) return s;
    if (s < 2 * (c - w)) return c;
    std::int64_t min_num = (c - w) / beta;
    std::int64_t max_num = 2 * (c - w) - min_num;
    if (max_num >= s - w) {
      max_num = s - w;
      min_num = 2 * (c - w) - max_num;
    }
    const std::int64_t steps = (max_num - min_num) / (num_model_layers - 1);
    return max_num - layer_index(layer) * steps + w;
  }
  void check(const char* where, const CacheShape& shape, std::int64_t /*protected_entries*/) const {
    if (window <= 0) detail::fail<BudgetError>(where, "window", window, "must be > 0");
    if (capacity <= window)
      detail::fail<BudgetError>(where, "capacity", capacity, "must be > window (" + std::to_string(window) + ")");
    if (beta < 1) detail::fail<BudgetError>(where, "beta", beta, "must be >= 1");
    if (num_model_layers < 2)
      detail::fail<BudgetError>(where, "num_model_layers", num_model_layers, "must be >= 2 (the reference divides by L - 1)");
    if (!layer_ids.empty() && static_cast<std::int64_t>(layer_ids.size()) != shape.num_layers)
      detail::fail<ShapeError>(where, "layer_ids.size", layer_ids.size(), "must equal the cache's num_layers");
    for (std::int64_t id : layer_ids)
      if (id < 0 || id >= num_model_layers)
        detail::fail<ArgumentError>(where, "layer_ids[]", id, "must be in [0, num_model_layers)");
  }
};

// PyramidKV as kvpress computes it (PyramidKVPress): float arithmetic and Python's round
// (half to even); n_kept includes the window; falls back to SnapKV's round(S(1-ratio)) when
// not (S >= max >= min >= w).
struct PyramidPressBudget {
  double compression_ratio = 0.0;
  std::int64_t window = 64;
  double beta = 20.0;
  std::int64_t num_model_layers = 0;
  std::vector<std::int64_t> layer_ids{};

  [[nodiscard]] std::int64_t entries(std::int64_t layer, std::int64_t seq_len) const {
    if (compression_ratio == 0.0) return seq_len;
    const double s = static_cast<double>(seq_len), w = static_cast<double>(window);
    const double cap = w + s * (1.0 - compression_ratio);
    double min_num = (cap - w) / beta;
    double max_num = 2.0 * (cap - w) - min_num;
    if (max_num >= s - w) {
      max_num = s - w;
      min_num = 2.0 * (cap - w) - max_num;
    }
    if (!(s >= max_num && max_num >= min_num && min_num >= w)) return round_half_even(s * (1.0 - compression_ratio));
    const double steps = (max_num - min_num) / static_cast<double>(num_model_layers - 1);
    const std::int64_t l = layer_ids.empty() ? layer : layer_ids[static_cast<std::size_t>(layer)];
    return round_half_even(max_num - static_cast<double>(l) * steps);
  }
  void check(const char* where, const CacheShape& shape, std::int64_t /*protected_entries*/) const {
    if (!(compression_ratio >= 0.0 && compression_ratio < 1.0))
      detail::fail<BudgetError>(where, "compression_ratio", compression_ratio, "must be in [0, 1)");
    if (!(beta >= 1.0)) detail::fail<BudgetError>(where, "beta", beta, "must be >= 1");
    if (num_model_layers < 2)
      detail::fail<BudgetError>(where, "num_model_layers", num_model_layers, "must be >= 2");
    if (!layer_ids.empty() && static_cast<std::int64_t>(layer_ids.size()) != shape.num_layers)
      detail::fail<ShapeError>(where, "layer_ids.size", layer_ids.size(), "must equal the cache's num_layers");
  }

 private:
  static std::int64_t round_half_even(double x) { return static_cast<std::int64_t>(std::nearbyint(x)); }
};

}  // namespace kvevict
