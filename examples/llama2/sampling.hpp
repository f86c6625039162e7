// Turning logits into tokens and log-probabilities: greedy argmax (run.c at temperature 0) and a
// numerically stable log-softmax for the quality metrics.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>

namespace llama2 {

// Index of the largest logit; ties go to the lowest index (as run.c's argmax).
inline int argmax(std::span<const float> logits) {
  return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// out[i] = logits[i] - log(sum_j exp(logits[j])), in double. Does not allocate.
inline void log_softmax(std::span<const float> logits, std::span<double> out) {
  const double mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - mx);
  const double log_z = mx + std::log(sum);
  for (std::size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<double>(logits[i]) - log_z;
}

}  // namespace llama2
