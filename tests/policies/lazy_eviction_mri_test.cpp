// MRI measurement for choosing LazyEviction's W and alpha on the real model (docs/lazyeviction.md):
// the paper's rule takes the W that covers the maximum recurrence intervals (MRIs) of 80% of the
// tokens, measured offline with the full cache. This runs stories260K (llama2.c engine in
// examples/llama2) over teacher-forced 512-token windows with one never-evicting LazyEviction per
// alpha sharing the full cache, then prints the MRI distribution per alpha. Hidden test (it needs
// the model files and prints a table): run `kvevict-tests "[.mri]" -s`.
#include <catch2/catch.hpp>

#if __has_include("../../examples/llama2/eval.hpp")

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#ifndef KVEVICT_LLAMA2_DEFAULT_MODEL_DIR
#define KVEVICT_LLAMA2_DEFAULT_MODEL_DIR KVEVICT_DEFAULT_MODEL_DIR
#endif
#include "../../examples/llama2/eval.hpp"
#include "kvevict/kvevict.hpp"

namespace {

using Cache = llama2::Cache;
using Obs = kvevict::Observation<float, kvevict::HostSpace>;
using Lazy = kvevict::LazyEviction<Cache>;

// Hands every hook to several LazyEviction trackers over one cache. Their budget is the whole
// window, so none ever evicts and they only differ in alpha.
class Trackers {
 public:
  Trackers(Cache& cache, std::int64_t length, const std::vector<float>& alphas) {
    for (const float a : alphas)
      lazies_.push_back(
          std::make_unique<Lazy>(cache, kvevict::LazyEvictionConfig{.budget = length, .window = 1, .alpha = a}));
  }
  [[nodiscard]] std::string_view name() const { return "mri_trackers"; }
  void on_prefill(Cache& cache, std::int64_t layer, const Obs& obs) {
    for (auto& p : lazies_) p->on_prefill(cache, layer, obs);
  }
  void on_decode(Cache& cache, std::int64_t layer, const Obs& obs) {
    for (auto& p : lazies_) p->on_decode(cache, layer, obs);
  }
  [[nodiscard]] kvevict::MemoryReport report(const Cache& cache) const { return lazies_.front()->report(cache); }
  [[nodiscard]] Lazy& at(std::size_t i) { return *lazies_[i]; }

 private:
  std::vector<std::unique_ptr<Lazy>> lazies_;
};
static_assert(kvevict::EvictionPolicy<Trackers, Cache>);

// The q-th quantile (nearest rank) of a sorted list.
std::int64_t quantile(const std::vector<std::int64_t>& sorted, double q) {
  if (sorted.empty()) return 0;
  const auto rank = static_cast<std::size_t>(std::ceil(q * static_cast<double>(sorted.size())));
  return sorted[std::min(sorted.size(), std::max<std::size_t>(rank, 1)) - 1];
}

}  // namespace

TEST_CASE("MRIs of stories260K over 512-token windows, per alpha (the data for choosing W)", "[.mri]") {
  std::string reason;
  const std::filesystem::path dir = llama2::model_dir();
  for (const char* f : {"stories260K.bin", "tok512.bin", "tinystories_sample.txt"})
    if (!std::filesystem::exists(dir / f)) {
      WARN("SKIPPED: " << (dir / f).string() << " not found (set KVEVICT_MODEL_DIR)");
      return;
    }
  const llama2::Model model(dir / "stories260K.bin");
  const llama2::Tokenizer tok(dir / "tok512.bin", model.config().vocab_size);
  const std::int64_t length = model.config().seq_len, windows = 8;
  const std::uint64_t seed = 7;
  CAPTURE(seed, length, windows);
  const auto stories = llama2::read_stories(dir / "tinystories_sample.txt");
  const auto seqs = llama2::make_windows(tok, stories, windows, length, seed);
  const std::vector<float> alphas{1e-4f, 5e-4f, 1e-3f, 2e-3f, 5e-3f, 1e-2f, 2e-2f, 5e-2f};

  // mris[a] = every (window, layer, kv_head, token) MRI at the end of the window.
  std::vector<std::vector<std::int64_t>> mris(alphas.size());
  llama2::Transformer transformer(model);
  std::int64_t resident_short = 0;
  for (const auto& seq : seqs) {
    Cache cache(model.config().cache_shape(length + 1));
    Trackers trackers(cache, length, alphas);
    for (const int token : seq) (void)transformer.forward(token, cache, trackers);
    for (std::size_t a = 0; a < alphas.size(); ++a)
      for (std::int64_t l = 0; l < model.config().num_layers; ++l)
        for (std::int64_t h = 0; h < model.config().num_kv_heads; ++h) {
          const auto st = trackers.at(a).scorer().state(cache, l, h);
          resident_short += static_cast<std::int64_t>(st.positions.size()) != length;  // nothing may be evicted
          for (const float m : st.mri) mris[a].push_back(static_cast<std::int64_t>(m));
        }
  }
  CHECK(resident_short == 0);
  std::ostringstream table;
  table << "stories260K, " << windows << " windows x " << length << " tokens, kv-head granularity (rule any), "
        << model.config().num_layers << " layers x " << model.config().num_kv_heads << " kv-heads\n"
        << "alpha     MRI=0   p50  p80  p90  p95  max | W80 (80% of the tokens with MRI >= 1)\n";
  double previous_zero = -1.0;
  for (std::size_t a = 0; a < alphas.size(); ++a) {
    auto& all = mris[a];
    std::sort(all.begin(), all.end());
    const auto zeros = static_cast<double>(std::count(all.begin(), all.end(), 0));
    const double zero_frac = zeros / static_cast<double>(all.size());
    std::vector<std::int64_t> recurring(all.begin() + static_cast<std::ptrdiff_t>(zeros), all.end());
    table << std::setw(8) << alphas[a] << "  " << std::fixed << std::setprecision(3) << zero_frac << std::defaultfloat
          << std::setw(6) << quantile(recurring, 0.5) << std::setw(5) << quantile(recurring, 0.8) << std::setw(5)
          << quantile(recurring, 0.9) << std::setw(5) << quantile(recurring, 0.95) << std::setw(5)
          << (recurring.empty() ? 0 : recurring.back()) << " | " << quantile(recurring, 0.8) << "\n";
    // A higher alpha keeps a subset of the events (same probabilities: nothing is evicted), so the
    // share of never-recurring tokens can only grow.
    CHECK(zero_frac >= previous_zero);
    previous_zero = zero_frac;
    CHECK(all.back() < length);
  }
  std::cout << table.str();
}

#endif  // the llama2 engine is part of this source tree
