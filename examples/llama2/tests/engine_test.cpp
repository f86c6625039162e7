// The forward pass on kvevict's cache: run.c's greedy story, and policies that never evict being
// bit-identical to the full cache.
#include <catch2/catch.hpp>
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "eval.hpp"
#include "model_files.hpp"
#include "policies.hpp"
#include "sampling.hpp"
#include "tokenizer.hpp"
#include "transformer.hpp"

namespace {

const llama2::Model& model() {
  static const llama2::Model m(llama2::model_dir() / "stories260K.bin");
  return m;
}
const llama2::Tokenizer& tokenizer() {
  static const llama2::Tokenizer t(llama2::model_dir() / "tok512.bin", model().config().vocab_size);
  return t;
}
std::vector<int> story_tokens(std::int64_t n) {
  return llama2::make_windows(tokenizer(), llama2::read_stories(llama2::model_dir() / "tinystories_sample.txt"), 1, n, 7)[0];
}

// Logits [token, vocab] of feeding `tokens` one by one through an `Entry` policy at `budget`.
template <class Entry>
std::vector<float> run_logits(const std::vector<int>& tokens, std::int64_t budget, llama2::Cache* keep = nullptr) {
  const llama2::Config& cfg = model().config();
  llama2::Cache cache(cfg.cache_shape(llama2::cache_capacity<Entry>(cfg, budget)));
  typename Entry::Policy policy(cache, Entry::config(budget));
  llama2::Transformer transformer(model());
  std::vector<float> out;
  for (int t : tokens) {
    const auto logits = transformer.forward(t, cache, policy);
    out.insert(out.end(), logits.begin(), logits.end());
    cache.check_invariants();
  }
  if (keep != nullptr) *keep = std::move(cache);
  return out;
}

}  // namespace

TEST_CASE("greedy decoding from BOS with the full cache reproduces run.c's story for 40 tokens", "[engine]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  const llama2::Config& cfg = model().config();
  REQUIRE(cfg.dim == 64);
  REQUIRE(cfg.num_layers == 5);
  REQUIRE(cfg.num_q_heads == 8);
  REQUIRE(cfg.num_kv_heads == 4);
  REQUIRE(cfg.vocab_size == 512);
  REQUIRE(cfg.seq_len == 512);
  llama2::Cache cache(cfg.cache_shape(cfg.seq_len));
  llama2::FullCache full(cache, {});
  llama2::Transformer transformer(model());
  std::vector<int> generated;
  int token = llama2::Tokenizer::kBos;
  for (int i = 0; i < 40; ++i) {
    token = llama2::argmax(transformer.forward(token, cache, full));
    generated.push_back(token);
  }
  const std::string text = tokenizer().decode(generated);
  INFO("generated: " << text);
  CHECK(text.size() > 80);
  CHECK(std::string(llama2::test::kGreedyStory).starts_with(text));
  CHECK(cache.len(0, 0) == 40);
}

TEST_CASE("a policy whose budget covers the sequence gives logits bit-equal to the full cache", "[engine]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  const std::vector<int> tokens = story_tokens(96);
  const std::vector<float> full = run_logits<llama2::FullEntry>(tokens, 0);
  CHECK(run_logits<llama2::StreamingLLMEntry>(tokens, 96) == full);
  CHECK(run_logits<llama2::H2OEntry>(tokens, 96) == full);
  CHECK(run_logits<llama2::H2OEntry>(tokens, 200) == full);
}

TEST_CASE("evicting policies hold their budget per head and keep their protected positions", "[engine]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  const std::vector<int> tokens = story_tokens(80);
  const std::int64_t n = static_cast<std::int64_t>(tokens.size()), budget = 16;
  const std::vector<float> full = run_logits<llama2::FullEntry>(tokens, 0);
  const llama2::Config& cfg = model().config();

  llama2::Cache streaming(cfg.cache_shape(1));
  const std::vector<float> s = run_logits<llama2::StreamingLLMEntry>(tokens, budget, &streaming);
  llama2::Cache h2o(cfg.cache_shape(1));
  const std::vector<float> h = run_logits<llama2::H2OEntry>(tokens, budget, &h2o);
  std::vector<std::int32_t> sinks_and_recent = {0, 1, 2, 3};
  for (std::int64_t p = n - 12; p < n; ++p) sinks_and_recent.push_back(static_cast<std::int32_t>(p));
  for (std::int64_t l = 0; l < cfg.num_layers; ++l)
    for (std::int64_t kv = 0; kv < cfg.num_kv_heads; ++kv) {
      CHECK(streaming.len(l, kv) == budget);
      CHECK(streaming.kept_positions(l, kv) == sinks_and_recent);
      const std::vector<std::int32_t> kept = h2o.kept_positions(l, kv);
      REQUIRE(static_cast<std::int64_t>(kept.size()) == budget);
      CHECK(kept.back() == n - 1);
      CHECK(kept[budget / 2] == n - budget / 2);  // the recent half
    }
  // Identical while nothing was evicted (the first `budget` tokens), different afterwards.
  const auto row = static_cast<std::ptrdiff_t>(cfg.vocab_size);
  CHECK(std::equal(s.begin(), s.begin() + budget * row, full.begin()));
  CHECK(std::equal(h.begin(), h.begin() + budget * row, full.begin()));
  CHECK(!std::equal(s.begin() + (budget + 1) * row, s.end(), full.begin() + (budget + 1) * row));
  CHECK(!std::equal(h.begin() + (budget + 1) * row, h.end(), full.begin() + (budget + 1) * row));
}

TEST_CASE("the forward pass rejects a cache shaped for another model and tokens outside the vocabulary", "[engine]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  llama2::Transformer transformer(model());
  llama2::Cache wrong(kvevict::CacheShape{5, 4, 8, 16, 8});
  llama2::FullCache full(wrong, {});
  CHECK_THROWS_AS(transformer.forward(1, wrong, full), kvevict::ShapeError);
  llama2::Cache cache(model().config().cache_shape(8));
  CHECK_THROWS_AS(transformer.forward(512, cache, full), kvevict::ArgumentError);
  CHECK(cache.len(0, 0) == 0);
}

TEST_CASE("a checkpoint shorter than its header says is rejected with an IoError", "[engine]") {
  const auto path = std::filesystem::temp_directory_path() / "kvevict_llama2_truncated.bin";
  {
    std::ofstream out(path, std::ios::binary);
    const std::int32_t header[7] = {64, 172, 5, 8, 4, 512, 512};
    out.write(reinterpret_cast<const char*>(header), sizeof header);
    const std::vector<float> some(1000, 0.5f);
    out.write(reinterpret_cast<const char*>(some.data()), static_cast<std::streamsize>(some.size() * sizeof(float)));
  }
  CHECK_THROWS_AS(llama2::Model(path), kvevict::IoError);
  std::filesystem::remove(path);
  CHECK_THROWS_AS(llama2::Model(path), kvevict::IoError);  // missing file
}
