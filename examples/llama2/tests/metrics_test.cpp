// QualityMeter on hand-computed cases.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "metrics.hpp"

TEST_CASE("KL, top-1 agreement and perplexities match a hand-computed two-token case", "[metrics]") {
  llama2::QualityMeter meter(2);
  // Position 1: full p = (1/2, 1/2), policy q = (3/4, 1/4); target 0. Both argmaxes are 0 (the
  // full tie goes to the lowest id). KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
  const std::vector<float> full1 = {0.0f, 0.0f}, pol1 = {static_cast<float>(std::log(3.0)), 0.0f};
  meter.add(full1, pol1, 0);
  // Position 2: identical distributions p = q = (1/5, 4/5) with argmax 1; target 0.
  const std::vector<float> full2 = {0.0f, static_cast<float>(std::log(4.0))};
  meter.add(full2, full2, 0);
  // Position 3: full favours 0, policy favours 1: disagreement. p = (e/(e+1), 1/(e+1)), q = swap.
  const std::vector<float> full3 = {1.0f, 0.0f}, pol3 = {0.0f, 1.0f};
  meter.add(full3, pol3, 1);

  const double e = std::exp(1.0), a = e / (e + 1), b = 1 / (e + 1);
  const double kl3 = a * std::log(a / b) + b * std::log(b / a);
  const llama2::Quality q = meter.result();
  CHECK(q.positions == 3);
  CHECK(q.kl == Approx((0.5 * std::log(4.0 / 3.0) + 0.0 + kl3) / 3).epsilon(1e-6));
  CHECK(q.top1 == Approx(2.0 / 3.0));
  const double nll = -std::log(0.75) - std::log(0.2) - std::log(a);      // policy: q(0), q(0), q(1) = a
  const double nll_full = -std::log(0.5) - std::log(0.2) - std::log(b);  // full: p(0), p(0), p(1) = b
  CHECK(q.ppl == Approx(std::exp(nll / 3)).epsilon(1e-6));
  CHECK(q.ppl_full == Approx(std::exp(nll_full / 3)).epsilon(1e-6));
}

TEST_CASE("identical distributions give zero KL, full agreement and equal perplexities", "[metrics]") {
  llama2::QualityMeter meter(4);
  const std::vector<float> logits = {0.5f, -1.0f, 2.0f, 0.0f};
  meter.add(logits, logits, 3);
  const llama2::Quality q = meter.result();
  CHECK(q.kl == 0.0);
  CHECK(q.top1 == 1.0);
  CHECK(q.ppl == q.ppl_full);
}

TEST_CASE("log_softmax is stable for large logits and argmax breaks ties to the lowest id", "[metrics]") {
  const std::vector<float> logits = {1000.0f, 1000.0f};
  std::vector<double> out(2);
  llama2::log_softmax(logits, out);
  CHECK(out[0] == Approx(-std::log(2.0)));
  CHECK(out[1] == Approx(-std::log(2.0)));
  CHECK(llama2::argmax(logits) == 0);
}
