// Seeded generators for kvevict's tests: a portable RNG, random cache configurations, source
// K/V/Q rows addressable by (layer, head, position), and exact (dyadic) probability rows.
// Everything here is a pure function of its seed, so a failing case is replayed from the seed
// that Catch's INFO/CAPTURE printed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <typeinfo>
#include <vector>

#include <catch2/catch.hpp>

#include "kvevict/core/error.hpp"
#include "kvevict/core/layer_view.hpp"
#include "kvevict/core/memory_space.hpp"
#include "kvevict/core/rope.hpp"
#include "kvevict/core/shape.hpp"

namespace kvevict::test {

// splitmix64: the finaliser doubles as a hash of (seed, coordinates).
constexpr std::uint64_t mix64(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A small deterministic RNG with its own distributions (std:: distributions differ between
// standard libraries, which would make a seed mean different cases on g++ and clang).
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(mix64(seed ^ 0x6b7665766963745full)) {}

  std::uint64_t next() noexcept { return mix64(state_++); }
  // Uniform integer in [lo, hi] (inclusive). The modulo bias is irrelevant for tests.
  std::int64_t uniform_int(std::int64_t lo, std::int64_t hi) noexcept {
    const auto span = static_cast<std::uint64_t>(hi - lo) + 1u;
    return lo + static_cast<std::int64_t>(next() % span);
  }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  float uniform_float(float lo, float hi) noexcept {
    return lo + (hi - lo) * static_cast<float>(uniform());
  }
  bool coin(double p_true) noexcept { return uniform() < p_true; }
  template <class T>
  T pick(std::initializer_list<T> options) noexcept {
    const auto i = static_cast<std::size_t>(uniform_int(0, static_cast<std::int64_t>(options.size()) - 1));
    return *(options.begin() + i);
  }
  // Log-uniform integer in [lo, hi]: short and long lengths both get their share of cases.
  std::int64_t log_uniform_int(std::int64_t lo, std::int64_t hi) noexcept {
    const double a = std::log(static_cast<double>(lo)), b = std::log(static_cast<double>(hi) + 1.0);
    const auto v = static_cast<std::int64_t>(std::exp(a + (b - a) * uniform()));
    return std::clamp(v, lo, hi);
  }

 private:
  std::uint64_t state_;
};

// Which generated tensor a source row belongs to.
enum class Stream : std::uint64_t { key = 1, value = 2, query = 3 };

// Element `dim` of the row of (layer, head, pos) in `stream`: uniform in [-1, 1), a pure function
// of its coordinates, so any position's row can be regenerated without storing the sequence.
inline float source_value(std::uint64_t seed, Stream stream, std::int64_t layer, std::int64_t head,
                          std::int64_t pos, std::int64_t dim) noexcept {
  std::uint64_t h = mix64(seed ^ (static_cast<std::uint64_t>(stream) << 56));
  h = mix64(h ^ static_cast<std::uint64_t>(layer));
  h = mix64(h ^ static_cast<std::uint64_t>(head));
  h = mix64(h ^ static_cast<std::uint64_t>(pos));
  h = mix64(h ^ static_cast<std::uint64_t>(dim));
  return static_cast<float>(static_cast<double>(h >> 40) * 0x1.0p-23 - 1.0);
}

inline std::vector<float> source_row(std::uint64_t seed, Stream stream, std::int64_t layer, std::int64_t head,
                                     std::int64_t pos, std::int64_t head_dim, float amplitude = 1.0f) {
  std::vector<float> row(static_cast<std::size_t>(head_dim));
  for (std::int64_t c = 0; c < head_dim; ++c)
    row[static_cast<std::size_t>(c)] = amplitude * source_value(seed, stream, layer, head, pos, c);
  return row;
}

// [head, token, head_dim] rows of positions first .. first + num_tokens - 1: the block layout
// KVCache::append and Observation queries take.
inline std::vector<float> source_block(std::uint64_t seed, Stream stream, std::int64_t layer, std::int64_t num_heads,
                                       std::int64_t first, std::int64_t num_tokens, std::int64_t head_dim,
                                       float amplitude = 1.0f) {
  std::vector<float> out(static_cast<std::size_t>(num_heads * num_tokens * head_dim));
  for (std::int64_t h = 0; h < num_heads; ++h)
    for (std::int64_t t = 0; t < num_tokens; ++t)
      for (std::int64_t c = 0; c < head_dim; ++c)
        out[static_cast<std::size_t>((h * num_tokens + t) * head_dim + c)] =
            amplitude * source_value(seed, stream, layer, h, first + t, c);
  return out;
}

// Random weights over n entries that are multiples of 1/units and sum to exactly 1 (units is a
// power of two). Float sums of such values are exact while they stay below 2^24 / units, so a
// library accumulating them in fp32 must match a double reference bit for bit, ties included.
inline std::vector<double> dyadic_distribution(Rng& rng, std::int64_t n, std::int64_t units) {
  std::vector<double> w(static_cast<std::size_t>(n), 0.0);
  if (n <= 0) return w;
  const double quantum = 1.0 / static_cast<double>(units);
  for (std::int64_t u = 0; u < units; ++u) w[static_cast<std::size_t>(rng.uniform_int(0, n - 1))] += quantum;
  return w;
}

// A cache shape drawn from the sizes the library must serve: GQA groups 1/2/4/8.
inline CacheShape random_shape(Rng& rng, std::int64_t max_layers, std::int64_t max_kv_heads,
                               std::initializer_list<std::int64_t> head_dims, std::int64_t capacity) {
  CacheShape s;
  s.num_layers = rng.uniform_int(1, max_layers);
  s.num_kv_heads = rng.uniform_int(1, max_kv_heads);
  s.num_q_heads = s.num_kv_heads * rng.pick<std::int64_t>({1, 2, 4, 8});
  s.head_dim = rng.pick<std::int64_t>(head_dims);
  s.capacity = capacity;
  return s;
}

inline std::string describe(const CacheShape& s) {
  std::ostringstream os;
  os << "CacheShape{layers " << s.num_layers << ", kv_heads " << s.num_kv_heads << ", q_heads " << s.num_q_heads
     << ", head_dim " << s.head_dim << ", capacity " << s.capacity << "}";
  return os.str();
}

inline const char* describe(GroupAgg a) noexcept { return to_string(a); }
inline const char* describe(RopeLayout l) noexcept {
  return l == RopeLayout::interleaved_pairs ? "interleaved_pairs" : "halves";
}

// ---- Small helpers shared by the test files ----

template <class T>
HostSpan<const T> cspan(const std::vector<T>& v) {
  return {v.data(), static_cast<std::int64_t>(v.size())};
}

// Appends `num_tokens` generated tokens (source rows of their positions) to every kv-head of `layer`.
template <class Cache>
void append_source(Cache& cache, std::uint64_t seed, std::int64_t layer, std::int64_t num_tokens) {
  const CacheShape& s = cache.shape();
  const std::int64_t first = cache.next_position(layer);
  const auto k = source_block(seed, Stream::key, layer, s.num_kv_heads, first, num_tokens, s.head_dim);
  const auto v = source_block(seed, Stream::value, layer, s.num_kv_heads, first, num_tokens, s.head_dim);
  cache.append(layer, cspan(k), cspan(v), num_tokens);
}

// Whether `message` names an argument and its value the way detail::fail writes them
// ("argument 'name' = value: rule"): `needle` is the name or its start ("victims["), or, quoted, the
// name and the value ("'head_dim' = -7").
inline bool names_argument(const std::string& message, std::string_view needle) {
  if (!needle.empty() && needle.front() == '\'') return message.find("argument " + std::string(needle)) != std::string::npos;
  const std::string head = "argument '" + std::string(needle);
  const std::size_t at = message.find(head);
  if (at == std::string::npos) return false;
  const std::size_t close = message.find('\'', at + head.size());  // the name's closing quote
  return close != std::string::npos && message.compare(close, 4, "' = ") == 0 && close + 4 < message.size() &&
         message[close + 4] != ':';
}

// Runs `fn` and requires that it throws exactly E (not a sibling or a base); returns the message.
template <class E, class F>
std::string throws_exactly(F&& fn) {
  std::string message;
  bool thrown = false;
  try {
    fn();
  } catch (const E& e) {
    thrown = true;
    message = e.what();
    CHECK(typeid(e) == typeid(E));
  }
  INFO("expected exception type " << typeid(E).name());
  REQUIRE(thrown);
  return message;
}

// Exactly E, whose message names the argument `needle` and a value (names_argument). Returns the
// message for further checks.
template <class E, class F>
std::string require_throws_exactly(F&& fn, std::string_view needle) {
  INFO("naming '" << needle << "'");
  std::string message = throws_exactly<E>(std::forward<F>(fn));
  INFO("message: " << message);
  CHECK(names_argument(message, needle));
  return message;
}

// The same for an error about the state of an object rather than one argument (a broken invariant,
// an unsupported combination): exactly E, whose message contains `text`.
template <class E, class F>
std::string require_state_error(F&& fn, std::string_view text) {
  std::string message = throws_exactly<E>(std::forward<F>(fn));
  CHECK_THAT(message, Catch::Matchers::Contains(std::string(text)));
  return message;
}

}  // namespace kvevict::test
