// The forward pass on kvevict's cache: run.c's greedy story, policies that never evict being
// bit-identical to the full cache, and every registered policy holding its budget in the cache
// the registry sizes for it.
#include <catch2/catch.hpp>
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <variant>
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

// Logits [token, vocab] of feeding `tokens` one by one through an `Entry` policy at `budget`, in
// the cache the registry sizes for it. `max_len`: the most entries any (layer, kv_head) held
// after a step (the step's own token appended, the policy's eviction done).
template <class Entry>
std::vector<float> run_logits(const std::vector<int>& tokens, std::int64_t budget, llama2::Cache* keep = nullptr,
                              std::int64_t* max_len = nullptr) {
  const llama2::Config& cfg = model().config();
  llama2::Cache cache(cfg.cache_shape(llama2::cache_capacity<Entry>(cfg, budget)));
  typename Entry::Policy policy(cache, Entry::config(budget));
  llama2::Transformer transformer(model());
  std::vector<float> out;
  std::int64_t most = 0;
  for (int t : tokens) {
    const auto logits = transformer.forward<Entry::observe>(t, cache, policy);
    out.insert(out.end(), logits.begin(), logits.end());
    cache.check_invariants();
    for (std::int64_t l = 0; l < cfg.num_layers; ++l) most = std::max(most, cache.max_len(l));
  }
  if (max_len != nullptr) *max_len = most;
  if (keep != nullptr) *keep = std::move(cache);
  return out;
}

// Calls f.template operator()<Entry>() for every registered entry.
template <class F>
void for_each_entry(F&& f) {
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    (f.template operator()<std::variant_alternative_t<I, llama2::PolicyEntry>>(), ...);
  }(std::make_index_sequence<std::variant_size_v<llama2::PolicyEntry>>{});
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
  // Holds for every registered policy: each evicts only once a layer holds more than its budget
  // (PyramidKV: fewer tokens seen than C keep everything), and the extra slots of a larger cache
  // change nothing. SnapKV/PyramidKV also take queries instead of probabilities here.
  const std::vector<int> tokens = story_tokens(96);
  const std::vector<float> full = run_logits<llama2::FullEntry>(tokens, 0);
  for_each_entry([&]<class Entry>() {
    if constexpr (Entry::bounded) {
      INFO(Entry::name);
      CHECK(run_logits<Entry>(tokens, 96) == full);
      CHECK(run_logits<Entry>(tokens, 200) == full);
    }
  });
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

TEST_CASE("every registered policy fills the cache the registry sizes for it, up to its last slot", "[engine]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  // At budget 16 over 80 tokens every policy evicts several times, so each reaches its peak:
  // one slot over the budget for those evicting every step, budget + interval - 1 after a step for
  // SnapKV / LazyEviction (the step's append fills the last slot), the largest layer budget +
  // interval - 1 for PyramidKV. A cache one slot smaller would overflow; a larger one wastes it.
  const std::vector<int> tokens = story_tokens(80);
  const std::int64_t budget = 16;
  const llama2::Config& cfg = model().config();
  const auto row = static_cast<std::ptrdiff_t>(cfg.vocab_size);
  const std::vector<float> full = run_logits<llama2::FullEntry>(tokens, 0);
  for_each_entry([&]<class Entry>() {
    if constexpr (Entry::bounded) {
      INFO(Entry::name);
      std::int64_t most = 0;
      const std::vector<float> logits = run_logits<Entry>(tokens, budget, nullptr, &most);
      CHECK(most == llama2::cache_capacity<Entry>(cfg, budget) - 1);
      CHECK(std::equal(logits.begin(), logits.begin() + budget * row, full.begin()));  // nothing evicted yet
      CHECK(logits != full);
    }
  });
}

TEST_CASE("windowed policies end a run at their budget with their newest window kept", "[engine]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  // 80 tokens: step 80 is an eviction step of every interval used at budget 16 (4 for all).
  const std::vector<int> tokens = story_tokens(80);
  const std::int64_t n = 80, budget = 16, window = 4;
  const llama2::Config& cfg = model().config();
  REQUIRE(llama2::observation_window(budget) == window);
  REQUIRE(llama2::LazyEvictionEntry::window(budget) == window);
  auto check_newest = [&](const llama2::Cache& cache, std::int64_t l, std::int64_t kv) {
    const std::vector<std::int32_t> kept = cache.kept_positions(l, kv);
    for (std::int64_t p = n - window; p < n; ++p)
      CHECK(std::find(kept.begin(), kept.end(), static_cast<std::int32_t>(p)) != kept.end());
  };
  llama2::Cache snapkv(cfg.cache_shape(1)), lazy(cfg.cache_shape(1)), cake(cfg.cache_shape(1)), pyramid(cfg.cache_shape(1));
  run_logits<llama2::SnapKVEntry>(tokens, budget, &snapkv);
  run_logits<llama2::LazyEvictionEntry>(tokens, budget, &lazy);
  run_logits<llama2::CAKEEntry>(tokens, budget, &cake);
  run_logits<llama2::PyramidKVEntry>(tokens, budget, &pyramid);
  // PyramidKV at 80 tokens seen, C = 16, w = 4, beta = 20: min = 12 / 20 = 0, max = 24,
  // steps = 24 / 4 = 6, layer l keeps 24 - 6 l + 4: the pyramid averages the budget.
  const std::vector<std::int64_t> pyramid_lens = {28, 22, 16, 10, 4};
  std::int64_t pyramid_total = 0;
  for (std::int64_t l = 0; l < cfg.num_layers; ++l)
    for (std::int64_t kv = 0; kv < cfg.num_kv_heads; ++kv) {
      INFO("layer " << l << ", kv-head " << kv);
      for (const llama2::Cache* c : {&snapkv, &lazy, &cake}) {
        CHECK(c->len(l, kv) == budget);
        check_newest(*c, l, kv);
      }
      CHECK(pyramid.len(l, kv) == pyramid_lens[static_cast<std::size_t>(l)]);
      check_newest(pyramid, l, kv);
      pyramid_total += pyramid.len(l, kv);
    }
  CHECK(pyramid_total == budget * cfg.num_layers * cfg.num_kv_heads);
}

TEST_CASE("SnapKV's decode schedule needs the step's query, which its registry entry asks for", "[engine]") {
  std::string reason;
  if (!llama2::test::have_model_files(reason)) {
    WARN(reason);
    return;
  }
  STATIC_REQUIRE(llama2::SnapKVEntry::observe == llama2::Observe::queries);
  STATIC_REQUIRE(llama2::PyramidKVEntry::observe == llama2::Observe::queries);
  const llama2::Config& cfg = model().config();
  llama2::Cache cache(cfg.cache_shape(llama2::cache_capacity<llama2::SnapKVEntry>(cfg, 32)));
  llama2::SnapKVEntry::Policy policy(cache, llama2::SnapKVEntry::config(32));
  llama2::Transformer transformer(model());
  CHECK_THROWS_AS(transformer.forward<llama2::Observe::probabilities>(1, cache, policy), kvevict::UnsupportedError);
  cache.clear();
  llama2::SnapKVEntry::Policy fresh(cache, llama2::SnapKVEntry::config(32));
  CHECK_NOTHROW(transformer.forward<llama2::Observe::queries>(1, cache, fresh));
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
