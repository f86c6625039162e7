// Cross-layer budget parts: a total budget of entries split over the layers of a model, by an
// Allocation rule, on a schedule (after every layer with re-allocation of the layers seen so far =
// CAKE's cascading, or once after the last layer). The first budget part whose decision spans
// layers; CAKE uses ProportionalAllocation (layer preferences), and PyramidKV's per-layer budgets
// are the same component with PyramidAllocation. Budgets here count non-window entries per
// (layer, kv_head); the policy adds its protected window. Nothing here allocates after construction.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvevict/core/error.hpp"

namespace kvevict {

// cakekv utils.adjust_budgets (antgroup/cakekv@c4675ce cake/utils.py:L21-67), exactly, on budgets
// already truncated to integers: (1) cap every layer at `cap`, adding up the excess; (2) if the
// excess is > 0 and some layers are below the cap, give each of those excess // count and one more
// to the first excess % count of them in layer order (which can push them above the cap); (3) if
// the sum differs from `total`, add (or, when above, subtract) |diff| // count to each layer below
// the cap (or above 1), and one more to the first |diff| % count of them. In place; no allocation.
inline void adjust_budgets(std::span<std::int64_t> budgets, std::int64_t total, std::int64_t cap) {
  std::int64_t excess = 0;
  for (auto& b : budgets) {
    excess += std::max<std::int64_t>(b - cap, 0);
    b = std::min(b, cap);
  }
  // Spreads `amount` over the layers whose budget satisfies `member`: amount // count each and one
  // more to the first amount % count in layer order; sign -1 takes instead of gives. Membership
  // depends on a layer's own budget only and is read before that budget changes, so this is
  // numpy's mask computed once.
  auto spread = [&](std::int64_t amount, std::int64_t sign, auto member) {
    std::int64_t count = 0;
    for (auto b : budgets) count += member(b) ? 1 : 0;
    if (count == 0) return;
    const std::int64_t each = amount / count;
    std::int64_t extra = amount % count;
    for (auto& b : budgets) {
      if (!member(b)) continue;
      b += sign * (each + (extra > 0 ? 1 : 0));
      if (extra > 0) --extra;
    }
  };
  if (excess > 0) spread(excess, 1, [&](std::int64_t b) { return b < cap; });
  std::int64_t sum = 0;
  for (auto b : budgets) sum += b;
  const std::int64_t diff = total - sum;
  if (diff > 0) spread(diff, 1, [&](std::int64_t b) { return b < cap; });
  if (diff < 0) spread(-diff, -1, [](std::int64_t b) { return b > 1; });
}

// The published form: float shares, truncated toward zero as numpy's astype(int), then adjusted.
inline void adjust_budgets(std::span<const double> shares, std::int64_t total, std::int64_t cap,
                           std::span<std::int64_t> out) {
  if (out.size() != shares.size())
    detail::fail<ShapeError>("adjust_budgets", "out.size", out.size(), "must equal shares.size");
  for (std::size_t k = 0; k < shares.size(); ++k)
    if (!(shares[k] >= 0.0) || !(shares[k] < 9.0e18))
      detail::fail<ArgumentError>("adjust_budgets", "shares[" + std::to_string(k) + "]", shares[k],
                                  "must be finite, >= 0 and fit a 64-bit budget");
  for (std::size_t k = 0; k < shares.size(); ++k) out[k] = static_cast<std::int64_t>(shares[k]);
  adjust_budgets(out, total, cap);
}

// What an Allocation sees: the total to split, the most one layer can use, the model's layers.
struct LayerAllocationContext {
  std::int64_t total = 0;       // non-window entries per kv-head, summed over all layers
  std::int64_t cap = 0;         // most non-window entries one layer can hold (CAKE: prompt - window)
  std::int64_t num_layers = 0;  // layers of the model; an allocation may cover fewer (those seen)
};

// An allocation rule: budgets for the layers seen so far (out.size() of them, each with its
// weight) from the context. Validates its inputs and throws before writing anything.
template <class A>
concept LayerAllocation =
    std::copy_constructible<A> &&
    requires(const A& a, std::span<const float> weights, const LayerAllocationContext& ctx, std::span<std::int64_t> out,
             const char* where) {
      a.allocate(weights, ctx, out);
      a.check(where);
    };

// CAKE: b_k = int(w_k / sum(w) * total), then adjust_budgets. The ratio is fp32 (the reference's
// numpy float32 scalars: Python's sum of them, then a float32 division); the product with the
// total is fp64. Weights must be finite, >= 0, with a positive sum.
struct ProportionalAllocation {
  void allocate(std::span<const float> weights, const LayerAllocationContext& ctx, std::span<std::int64_t> out) const {
    constexpr const char* where = "ProportionalAllocation::allocate";
    float sum = 0.0f;
    for (std::size_t k = 0; k < weights.size(); ++k) {
      if (!(weights[k] >= 0.0f) || !std::isfinite(weights[k]))
        detail::fail<ArgumentError>(where, "weights[" + std::to_string(k) + "]", weights[k], "must be finite and >= 0");
      sum += weights[k];
    }
    if (!(sum > 0.0f) || !std::isfinite(sum))
      detail::fail<ArgumentError>(where, "sum(weights)", sum,
                                  "must be finite and > 0 (every layer seen so far has preference 0)");
    for (std::size_t k = 0; k < weights.size(); ++k) {
      const float ratio = weights[k] / sum;
      out[k] = static_cast<std::int64_t>(static_cast<double>(ratio) * static_cast<double>(ctx.total));
    }
    adjust_budgets(out, ctx.total, ctx.cap);
  }
  void check(const char* /*where*/) const noexcept {}
};

// PyramidKV (KVCache-Factory PyramidKVCluster, integer arithmetic, its pyramid branch): with
// avg = total / num_layers, min = avg // beta, max = 2 avg - min (if max >= cap: max = cap,
// min = 2 avg - max), steps = (max - min) // (num_layers - 1), layer l gets max - l * steps.
// Weights are ignored: the shape is fixed by the layer index.
struct PyramidAllocation {
  std::int64_t beta = 20;

  void allocate(std::span<const float> /*weights*/, const LayerAllocationContext& ctx,
                std::span<std::int64_t> out) const {
    if (ctx.num_layers < 2)
      detail::fail<BudgetError>("PyramidAllocation::allocate", "num_layers", ctx.num_layers,
                                "must be >= 2 (the pyramid divides by num_layers - 1)");
    const std::int64_t avg = ctx.total / ctx.num_layers;
    std::int64_t min_num = avg / beta;
    std::int64_t max_num = 2 * avg - min_num;
    if (max_num >= ctx.cap) {
      max_num = ctx.cap;
      min_num = 2 * avg - max_num;
    }
    const std::int64_t steps = (max_num - min_num) / (ctx.num_layers - 1);
    for (std::size_t l = 0; l < out.size(); ++l) out[l] = max_num - static_cast<std::int64_t>(l) * steps;
  }
  void check(const char* where) const {
    if (beta < 1) detail::fail<BudgetError>(where, "beta", beta, "must be >= 1");
  }
};

// When a cross-layer allocation runs during prefill.
enum class LayerSchedule {
  cascading,         // after every layer, over the layers seen so far, re-applied to all of them
  after_last_layer,  // once, when the last layer has been seen
};

// The per-sequence state of a cross-layer budget: the weight and the budget of every layer, the
// total (per_layer_budget * num_layers). Allocation is split in plan (may throw, changes nothing)
// and record/set_budget (never throw), so a policy can validate before it evicts. Host memory,
// allocated at construction. Not thread-safe (plan uses a scratch array).
template <LayerAllocation Allocation>
class LayerBudgets {
 public:
  LayerBudgets(std::int64_t num_layers, std::int64_t per_layer_budget, Allocation allocation,
               LayerSchedule schedule, const char* where = "LayerBudgets")
      : num_layers_(num_layers), per_layer_(per_layer_budget), allocation_(std::move(allocation)), schedule_(schedule) {
    if (num_layers <= 0) detail::fail<ArgumentError>(where, "num_layers", num_layers, "must be > 0");
    if (per_layer_budget < 0) detail::fail<BudgetError>(where, "per_layer_budget", per_layer_budget, "must be >= 0");
    allocation_.check(where);
    weights_.reserve(static_cast<std::size_t>(num_layers));
    budgets_.assign(static_cast<std::size_t>(num_layers), per_layer_budget);
    scratch_.assign(static_cast<std::size_t>(num_layers), 0.0f);
  }

  [[nodiscard]] std::int64_t num_layers() const noexcept { return num_layers_; }
  [[nodiscard]] std::int64_t total() const noexcept { return per_layer_ * num_layers_; }
  [[nodiscard]] std::int64_t per_layer_budget() const noexcept { return per_layer_; }
  [[nodiscard]] LayerSchedule schedule() const noexcept { return schedule_; }
  [[nodiscard]] const Allocation& allocation() const noexcept { return allocation_; }
  // Layers whose weight has been recorded (layers 0 .. num_seen() - 1).
  [[nodiscard]] std::int64_t num_seen() const noexcept { return static_cast<std::int64_t>(weights_.size()); }
  [[nodiscard]] std::span<const float> weights() const noexcept { return weights_; }
  [[nodiscard]] std::span<const std::int64_t> budgets() const noexcept { return budgets_; }
  [[nodiscard]] std::int64_t budget(std::int64_t layer) const { return budgets_.at(static_cast<std::size_t>(layer)); }

  // Whether the schedule allocates once `layer` has been seen.
  [[nodiscard]] bool allocates_after(std::int64_t layer) const noexcept {
    return schedule_ == LayerSchedule::cascading || layer == num_layers_ - 1;
  }

  // Budgets of the layers seen so far plus, when `next_weight` is given, one more layer with that
  // weight, into out[0 .. count) (count returned). Changes nothing; throws the allocation's errors.
  std::int64_t plan(std::int64_t cap, std::span<std::int64_t> out, const float* next_weight = nullptr) const {
    const std::int64_t count = num_seen() + (next_weight != nullptr ? 1 : 0);
    if (count > num_layers_)
      detail::fail<ArgumentError>("LayerBudgets::plan", "layers", count, "exceeds num_layers");
    if (static_cast<std::int64_t>(out.size()) < count)
      detail::fail<ShapeError>("LayerBudgets::plan", "out.size", out.size(), "must hold one budget per layer seen");
    std::copy(weights_.begin(), weights_.end(), scratch_.begin());
    if (next_weight != nullptr) scratch_[static_cast<std::size_t>(count - 1)] = *next_weight;
    allocation_.allocate(std::span<const float>(scratch_.data(), static_cast<std::size_t>(count)),
                         LayerAllocationContext{total(), cap, num_layers_}, out.first(static_cast<std::size_t>(count)));
    return count;
  }

  // Records the next layer's weight; its budget starts at per_layer_budget.
  void record(float weight) {
    if (num_seen() >= num_layers_)
      detail::fail<ArgumentError>("LayerBudgets::record", "layers", num_seen() + 1, "exceeds num_layers");
    budgets_[weights_.size()] = per_layer_;
    weights_.push_back(weight);  // capacity reserved at construction: no allocation
  }
  void set_budget(std::int64_t layer, std::int64_t budget) { budgets_.at(static_cast<std::size_t>(layer)) = budget; }

  // A new sequence: no layer seen, every budget back to per_layer_budget.
  void reset() noexcept {
    weights_.clear();
    std::fill(budgets_.begin(), budgets_.end(), per_layer_);
  }

 private:
  std::int64_t num_layers_ = 0;
  std::int64_t per_layer_ = 0;
  Allocation allocation_;
  LayerSchedule schedule_;
  std::vector<float> weights_;         // [layers seen]
  std::vector<std::int64_t> budgets_;  // [layer] non-window entries per kv-head
  mutable std::vector<float> scratch_;  // [layer] weights handed to the allocation by plan()
};

static_assert(LayerAllocation<ProportionalAllocation>, "ProportionalAllocation must satisfy LayerAllocation");
static_assert(LayerAllocation<PyramidAllocation>, "PyramidAllocation must satisfy LayerAllocation");

}  // namespace kvevict
