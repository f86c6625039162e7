// Next-token quality of a compressed cache against the full cache, accumulated over predicted
// positions: mean KL(full || policy) in nats, top-1 agreement, and both perplexities.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "sampling.hpp"

namespace llama2 {

struct Quality {
  double kl = 0.0;        // mean over positions of sum_v p_full(v) (log p_full(v) - log p_policy(v))
  double top1 = 0.0;      // fraction of positions where both argmaxes agree (ties: lowest id)
  double ppl = 0.0;       // exp(mean -log p_policy(target))
  double ppl_full = 0.0;  // exp(mean -log p_full(target))
  std::int64_t positions = 0;
};

class QualityMeter {
 public:
  // Allocates its two log-probability rows once.
  explicit QualityMeter(std::int64_t vocab_size)
      : full_(static_cast<std::size_t>(vocab_size)), policy_(static_cast<std::size_t>(vocab_size)) {}

  // One predicted position: both caches' logits [vocab] and the token that actually came next.
  void add(std::span<const float> full_logits, std::span<const float> policy_logits, int target) {
    log_softmax(full_logits, full_);
    log_softmax(policy_logits, policy_);
    double kl = 0.0;
    for (std::size_t v = 0; v < full_.size(); ++v) kl += std::exp(full_[v]) * (full_[v] - policy_[v]);
    kl_sum_ += kl;
    agree_ += argmax(full_logits) == argmax(policy_logits) ? 1 : 0;
    nll_sum_ -= policy_[static_cast<std::size_t>(target)];
    nll_full_sum_ -= full_[static_cast<std::size_t>(target)];
    ++positions_;
  }

  [[nodiscard]] Quality result() const {
    if (positions_ == 0) return {};
    const auto n = static_cast<double>(positions_);
    return {kl_sum_ / n, static_cast<double>(agree_) / n, std::exp(nll_sum_ / n), std::exp(nll_full_sum_ / n), positions_};
  }

 private:
  std::vector<double> full_, policy_;  // [vocab] log-probabilities of the current position
  double kl_sum_ = 0.0, nll_sum_ = 0.0, nll_full_sum_ = 0.0;
  std::int64_t agree_ = 0, positions_ = 0;
};

}  // namespace llama2
