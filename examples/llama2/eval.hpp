// kvevict-eval's engine: teacher-forced runs over windows of stories, once with the full cache
// and once per (policy, budget), scored against the full cache; plus the table and CSV writers.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iomanip>
#include <numeric>
#include <ostream>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

#include "metrics.hpp"
#include "model.hpp"
#include "policies.hpp"
#include "tokenizer.hpp"
#include "transformer.hpp"

namespace llama2 {

// Stories of a text file separated by lines holding only <|endoftext|>, each trimmed.
inline std::vector<std::string> read_stories(const std::filesystem::path& path) {
  const std::vector<char> bytes = read_file(path);
  std::vector<std::string> stories(1);
  std::istringstream in(std::string(bytes.begin(), bytes.end()));
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line == "<|endoftext|>")
      stories.emplace_back();
    else
      stories.back() += line + '\n';
  }
  constexpr const char* kSpace = " \t\r\n";
  for (auto& s : stories) {
    const auto b = s.find_first_not_of(kSpace);
    s = b == std::string::npos ? std::string() : s.substr(b, s.find_last_not_of(kSpace) - b + 1);
  }
  std::erase_if(stories, [](const std::string& s) { return s.empty(); });
  if (stories.empty()) throw kvevict::IoError("llama2: no stories in '" + path.string() + "'");
  return stories;
}

// `count` windows of `length` tokens: the stories in an order shuffled by `seed`, each encoded as
// BOS + its tokens, concatenated and cut. Only as many stories are encoded as the windows need.
inline std::vector<std::vector<int>> make_windows(const Tokenizer& tok, const std::vector<std::string>& stories,
                                                  std::int64_t count, std::int64_t length, std::uint64_t seed) {
  std::vector<std::size_t> order(stories.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::mt19937_64 rng(seed);  // Fisher-Yates on raw engine output: the same order on every standard library
  for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng() % i]);
  std::vector<int> stream;
  const auto need = static_cast<std::size_t>(count * length);
  for (std::size_t i = 0; i < order.size() && stream.size() < need; ++i) {
    const std::vector<int> t = tok.encode(stories[order[i]], /*bos=*/true, /*eos=*/false);
    stream.insert(stream.end(), t.begin(), t.end());
  }
  if (stream.size() < need)
    throw kvevict::ArgumentError("llama2: the text holds " + std::to_string(stream.size()) + " tokens, fewer than " +
                                 std::to_string(count) + " sequences x " + std::to_string(length));
  std::vector<std::vector<int>> windows;
  for (std::int64_t w = 0; w < count; ++w)
    windows.emplace_back(stream.begin() + w * length, stream.begin() + (w + 1) * length);
  return windows;
}

// One line of the table and the CSV.
struct EvalRow {
  std::string policy;
  std::int64_t budget = 0;  // entries per (layer, kv_head); `full` reports the window length
  Quality quality;
  std::int64_t kv_bytes = 0;  // K and V kept at the end of a window (largest over windows)
  double tokens_per_s = 0.0;  // forward passes (policy hooks included) per second
  std::int64_t capacity = 0;  // cache slots per (layer, kv_head) the run allocated: budget + spare, or the context
};

struct EvalResult {
  std::vector<EvalRow> rows;
  Quality full;  // the full cache's own numbers (its perplexity is every row's ppl_full)
  std::int64_t num_sequences = 0, tokens_per_sequence = 0;
  double seconds = 0.0;
};

// A stderr progress bar over `total` windows.
class Progress {
 public:
  Progress(std::ostream* out, std::int64_t total) : out_(out), total_(total) {}
  void step(const std::string& label) {
    ++done_;
    if (out_ == nullptr) return;
    constexpr int kWidth = 30;
    const auto filled = static_cast<int>(kWidth * done_ / std::max<std::int64_t>(total_, 1));
    *out_ << "\r[" << std::string(static_cast<std::size_t>(filled), '#') << std::string(static_cast<std::size_t>(kWidth - filled), '.')
          << "] " << std::setw(3) << 100 * done_ / std::max<std::int64_t>(total_, 1) << "% " << std::left << std::setw(24)
          << label << std::right << std::flush;
    if (done_ == total_) *out_ << '\n';
  }

 private:
  std::ostream* out_;
  std::int64_t total_, done_ = 0;
};

struct RunStats {
  std::int64_t kv_bytes = 0;
  double forward_seconds = 0.0;
  std::int64_t tokens = 0;
};

// Feeds every window but its last token through a fresh cache and a fresh `Entry` policy (a
// policy's state belongs to one sequence), every token a decode step; calls
// on_logits(window, t, logits) for the prediction of token t + 1. Times the forward passes only.
template <class Entry, class OnLogits>
RunStats run_windows(const Model& model, std::span<const std::vector<int>> windows, std::int64_t budget,
                     OnLogits&& on_logits, Progress& progress, const std::string& label) {
  Cache cache(model.config().cache_shape(cache_capacity<Entry>(model.config(), budget)));
  Transformer transformer(model);
  RunStats stats;
  for (std::size_t w = 0; w < windows.size(); ++w) {
    cache.clear();
    typename Entry::Policy policy(cache, Entry::config(budget));
    for (std::size_t t = 0; t + 1 < windows[w].size(); ++t) {
      const auto start = std::chrono::steady_clock::now();
      const std::span<const float> logits = transformer.forward<Entry::observe>(windows[w][t], cache, policy);
      stats.forward_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      ++stats.tokens;
      on_logits(w, t, logits);
    }
    stats.kv_bytes = std::max(stats.kv_bytes, policy.report(cache).kv_bytes);
    progress.step(label);
  }
  return stats;
}

// The full-cache reference, then every bounded policy at every budget (`full` among `policies`
// adds its own row). Windows must be non-empty and of equal length <= the model's context.
inline EvalResult run_eval(const Model& model, const std::vector<std::vector<int>>& windows,
                           const std::vector<std::string>& policies, const std::vector<std::int64_t>& budgets,
                           std::ostream* progress_out = nullptr) {
  const auto wall_start = std::chrono::steady_clock::now();
  const Config& cfg = model.config();
  const auto length = static_cast<std::int64_t>(windows.at(0).size());
  if (length < 2 || length > cfg.seq_len)
    throw kvevict::ArgumentError("llama2::run_eval: windows must hold 2.." + std::to_string(cfg.seq_len) + " tokens");
  for (const auto& w : windows)
    if (static_cast<std::int64_t>(w.size()) != length)
      throw kvevict::ArgumentError("llama2::run_eval: every window must hold " + std::to_string(length) + " tokens");
  std::vector<std::pair<PolicyEntry, std::int64_t>> runs;  // strings resolved here, once
  bool report_full = false;
  for (const auto& name : policies) {
    const PolicyEntry entry = policy_entry(name);
    if (!std::visit([](auto e) { return decltype(e)::bounded; }, entry)) {
      report_full = true;
      continue;
    }
    for (std::int64_t b : budgets) runs.emplace_back(entry, b);
  }
  for (const auto& [entry, budget] : runs)  // a policy rejects a budget at construction: fail before any run
    std::visit(
        [&, budget = budget]<class Entry>(Entry) {
          Cache cache(cfg.cache_shape(cache_capacity<Entry>(cfg, budget)));
          [[maybe_unused]] typename Entry::Policy check(cache, Entry::config(budget));
        },
        entry);
  Progress progress(progress_out, static_cast<std::int64_t>((runs.size() + 1) * windows.size()));

  const auto predictions = static_cast<std::size_t>(length - 1);
  const auto vocab = static_cast<std::size_t>(cfg.vocab_size);
  std::vector<float> reference(windows.size() * predictions * vocab);  // [window, t, vocab] full-cache logits
  auto full_logits = [&](std::size_t w, std::size_t t) {
    return std::span<const float>(reference.data() + (w * predictions + t) * vocab, vocab);
  };
  QualityMeter full_meter(cfg.vocab_size);
  const RunStats full = run_windows<FullEntry>(
      model, windows, 0,
      [&](std::size_t w, std::size_t t, std::span<const float> logits) {
        std::copy(logits.begin(), logits.end(), reference.begin() + static_cast<std::ptrdiff_t>((w * predictions + t) * vocab));
        full_meter.add(logits, logits, windows[w][t + 1]);
      },
      progress, "full");

  EvalResult result{{}, full_meter.result(), static_cast<std::int64_t>(windows.size()), length, 0.0};
  if (report_full)
    result.rows.push_back({"full", length, full_meter.result(), full.kv_bytes, full.tokens / full.forward_seconds,
                           cache_capacity<FullEntry>(cfg, 0)});
  for (const auto& [entry, budget] : runs) {
    std::visit(
        [&, budget = budget]<class Entry>(Entry) {
          const std::string label = std::string(Entry::name) + " @ " + std::to_string(budget);
          QualityMeter meter(cfg.vocab_size);
          const RunStats s = run_windows<Entry>(
              model, windows, budget,
              [&](std::size_t w, std::size_t t, std::span<const float> logits) { meter.add(full_logits(w, t), logits, windows[w][t + 1]); },
              progress, label);
          result.rows.push_back({std::string(Entry::name), budget, meter.result(), s.kv_bytes, s.tokens / s.forward_seconds,
                                 cache_capacity<Entry>(cfg, budget)});
        },
        entry);
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  return result;
}

inline void write_csv(std::ostream& out, const EvalResult& r) {
  out << "policy,budget,kl,top1,ppl,ppl_full,kv_bytes,tokens_per_s,sequences,tokens_per_sequence,capacity\n";
  out << std::setprecision(9);
  for (const auto& row : r.rows)
    out << row.policy << ',' << row.budget << ',' << row.quality.kl << ',' << row.quality.top1 << ',' << row.quality.ppl << ','
        << row.quality.ppl_full << ',' << row.kv_bytes << ',' << row.tokens_per_s << ',' << r.num_sequences << ','
        << r.tokens_per_sequence << ',' << row.capacity << '\n';
}

// A Markdown table (readable in a terminal, pasteable into a README).
inline void write_table(std::ostream& out, const EvalResult& r) {
  auto fmt = [](const char* f, double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, f, v);
    return std::string(buf);
  };
  out << "| policy        | budget | slots | KL(full‖policy) | top-1 agree | perplexity | KV kept    | tokens/s |\n"
      << "|---------------|-------:|------:|----------------:|------------:|-----------:|-----------:|---------:|\n";
  for (const auto& row : r.rows)
    out << "| " << std::left << std::setw(13) << row.policy << std::right << " | " << std::setw(6) << row.budget << " | "
        << std::setw(5) << row.capacity << " | " << std::setw(15) << fmt("%.4f", row.quality.kl) << " | " << std::setw(11) << fmt("%.2f %%", 100.0 * row.quality.top1)
        << " | " << std::setw(10) << fmt("%.3f", row.quality.ppl) << " | " << std::setw(10)
        << fmt("%.1f KiB", static_cast<double>(row.kv_bytes) / 1024.0) << " | " << std::setw(8) << fmt("%.0f", row.tokens_per_s)
        << " |\n";
}

}  // namespace llama2
