// Golden replay engine: feeds one golden case (shared/golden/<set>/<case>) through kvevict's public
// API exactly as an inference engine would, and writes kvevict's outputs in the case's own file
// conventions (golden/README.md §5.4-5.5). Templated on the cache type, so the same code runs on
// every backend; each per-set function is the reference integration for its official source.
//
// Adding a set: write `replay_<set><Cache>(const GoldenCase&) -> ReplayResult` with the helpers in
// `impl`, then add one row to `replay_sets<Cache>()`.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvevict/core/error.hpp"
#include "kvevict/core/kv_cache.hpp"
#include "kvevict/core/observation.hpp"
#include "kvevict/core/shape.hpp"
#include "kvevict/policies/h2o.hpp"
#include "kvevict/policies/streaming_llm.hpp"
#include "support/golden_case.hpp"

namespace kvevict::golden {

using test::GoldenCase;
using test::NpyArray;
using json = nlohmann::json;

// A float output in the case's layout (C order).
struct OutputTensor {
  std::vector<std::int64_t> shape;
  std::vector<float> data;
};

// kvevict's result for one case.
struct ReplayResult {
  std::string case_id;  // "<set>/<case>"
  std::string set;      // the dispatch key (params.json "policy")
  std::int64_t num_layers = 0;
  std::int64_t out_heads = 0;  // heads of the output tensors (cache kv-heads)
  // Kept original positions after the last call, ascending: [layer][out_head][i].
  std::vector<std::vector<std::vector<std::int64_t>>> keep;
  // Kept positions after every call (step 0 = after prefill), ascending: [step][layer][out_head][i].
  // Empty for single-call cases.
  std::vector<std::vector<std::vector<std::vector<std::int64_t>>>> step_keep;
  // Float outputs by file stem ("out_keys_l0", "out_hh_score_l1", ...), in the case's layout, rows in
  // ascending position order.
  std::map<std::string, OutputTensor> tensors;

  // "case: policy P, L layers, kept per head l0: a b; l1: c d".
  [[nodiscard]] std::string summary() const {
    std::ostringstream os;
    os << case_id << ": policy " << set << ", " << num_layers << " layer" << (num_layers == 1 ? "" : "s")
       << ", kept per head";
    for (std::size_t l = 0; l < keep.size(); ++l) {
      os << (l == 0 ? " l" : "; l") << l << ":";
      for (const auto& head : keep[l]) os << ' ' << head.size();
    }
    return os.str();
  }
};

namespace impl {

[[noreturn]] inline void io_fail(const GoldenCase& c, const std::string& what) {
  throw IoError("kvevict-replay: case '" + c.dir.string() + "': " + what);
}
[[noreturn]] inline void unsupported(const GoldenCase& c, const std::string& what) {
  throw UnsupportedError("kvevict-replay: case '" + c.dir.string() + "': " + what);
}

// ---------------------------------------------------------------------------------- params.json

inline const json& section(const GoldenCase& c, const char* name) {
  const auto it = c.params.find(name);
  if (it == c.params.end() || !it->is_object()) io_fail(c, std::string("params.json has no object '") + name + "'");
  return *it;
}
inline std::optional<std::int64_t> opt_int(const GoldenCase& c, const char* sec, const char* key) {
  const json& s = section(c, sec);
  const auto it = s.find(key);
  if (it == s.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer()) io_fail(c, std::string("params.json ") + sec + "." + key + " is not an integer");
  return it->get<std::int64_t>();
}
inline std::int64_t get_int(const GoldenCase& c, const char* sec, const char* key) {
  const auto v = opt_int(c, sec, key);
  if (!v) io_fail(c, std::string("params.json lacks ") + sec + "." + key);
  return *v;
}
inline double get_double(const GoldenCase& c, const char* sec, const char* key) {
  const json& s = section(c, sec);
  const auto it = s.find(key);
  if (it == s.end() || !it->is_number()) io_fail(c, std::string("params.json ") + sec + "." + key + " is not a number");
  return it->get<double>();
}
inline std::string get_string(const GoldenCase& c, const char* key, const std::string& fallback) {
  const auto it = c.params.find(key);
  if (it == c.params.end() || it->is_null()) return fallback;
  if (!it->is_string()) io_fail(c, std::string("params.json '") + key + "' is not a string");
  return it->get<std::string>();
}
inline std::string get_string(const GoldenCase& c, const char* sec, const char* key, const std::string& fallback) {
  const json& s = section(c, sec);
  const auto it = s.find(key);
  if (it == s.end() || it->is_null()) return fallback;
  if (!it->is_string()) io_fail(c, std::string("params.json ") + sec + "." + key + " is not a string");
  return it->get<std::string>();
}

struct Shapes {
  std::int64_t layers = 0, kv_heads = 0, q_heads = 0, groups = 0, seq_len = 0, head_dim = 0;
};
inline Shapes read_shapes(const GoldenCase& c) {
  Shapes s;
  s.layers = get_int(c, "shapes", "layers");
  s.kv_heads = get_int(c, "shapes", "kv_heads");
  s.q_heads = get_int(c, "shapes", "q_heads");
  s.groups = get_int(c, "shapes", "groups");
  s.seq_len = get_int(c, "shapes", "seq_len");
  s.head_dim = get_int(c, "shapes", "head_dim");
  if (s.layers <= 0 || s.kv_heads <= 0 || s.q_heads <= 0 || s.seq_len <= 0 || s.head_dim <= 0 || s.groups <= 0 ||
      s.q_heads != s.kv_heads * s.groups)
    io_fail(c, "params.json shapes are inconsistent (need positive sizes and q_heads = kv_heads * groups)");
  if (get_int(c, "shapes", "batch") != 1) unsupported(c, "batch != 1 (every golden case has batch 1)");
  return s;
}

// Query-head granularity (KVCache-Factory default) builds one cache kv-head per query head.
inline bool query_head_granularity(const GoldenCase& c) {
  const std::string g = get_string(c, "granularity", "query_head");
  if (g != "query_head" && g != "kv_head") unsupported(c, "granularity '" + g + "'");
  return g == "query_head";
}

inline GroupAgg group_agg(const GoldenCase& c) {
  const std::string a = get_string(c, "hyperparameters", "gqa_score_agg", "mean");
  if (a == "mean") return GroupAgg::mean;
  if (a == "max") return GroupAgg::max;
  if (a == "sum") return GroupAgg::sum;
  unsupported(c, "gqa_score_agg '" + a + "'");
}

// Cache kv-head -> input kv-head; checked against the case's head_map where it has one.
inline std::vector<std::int64_t> cache_head_map(const GoldenCase& c, const Shapes& s, bool query_head) {
  std::vector<std::int64_t> map;
  for (std::int64_t h = 0; h < (query_head ? s.q_heads : s.kv_heads); ++h) map.push_back(query_head ? h / s.groups : h);
  if (const auto it = c.params.find("head_map"); it != c.params.end() && !it->is_null()) {
    std::vector<std::int64_t> want;
    try {
      want = it->get<std::vector<std::int64_t>>();
    } catch (const json::exception&) {
      io_fail(c, "params.json head_map is not a list of integers");
    }
    if (want != map) io_fail(c, "params.json head_map disagrees with the case's granularity and group size");
  }
  return map;
}

// ------------------------------------------------------------------------------------ tensors

inline NpyArray load(const GoldenCase& c, const std::string& name) {
  try {
    return c.load(name);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    io_fail(c, e.what());
  }
}
inline std::vector<float> load_f32(const GoldenCase& c, const std::string& name, const std::vector<std::int64_t>& shape) {
  const NpyArray a = load(c, name);
  if (a.dtype != "<f4") io_fail(c, name + ".npy has dtype " + a.dtype + ", expected float32");
  if (a.shape != shape) {
    std::string want = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    io_fail(c, name + ".npy has an unexpected shape, expected " + want + "]");
  }
  return a.as<float>();
}
inline std::vector<std::int64_t> load_i64(const GoldenCase& c, const std::string& name,
                                          const std::vector<std::int64_t>& shape) {
  const NpyArray a = load(c, name);
  if (a.dtype != "<i8") io_fail(c, name + ".npy has dtype " + a.dtype + ", expected int64");
  if (a.shape != shape) io_fail(c, name + ".npy has an unexpected shape");
  return a.as<std::int64_t>();
}

// Shape that params.json "files" records for <name>.npy, if any.
inline std::optional<std::vector<std::int64_t>> file_shape(const GoldenCase& c, const std::string& name) {
  const auto files = c.params.find("files");
  if (files == c.params.end() || !files->is_object()) return std::nullopt;
  const auto it = files->find(name + ".npy");
  if (it == files->end() || !it->contains("shape")) return std::nullopt;
  try {
    return (*it)["shape"].get<std::vector<std::int64_t>>();
  } catch (const json::exception&) {
    io_fail(c, "params.json files['" + name + ".npy'].shape is not a list of integers");
  }
}
inline bool case_has(const GoldenCase& c, const std::string& name) { return c.has(name) || file_shape(c, name).has_value(); }

// keys/values of every input kv-head as [layer][kv_head][seq][head_dim]; `keys_seq_last` reads the
// MPT key layout [layer, 1, kv_head, head_dim, seq] (StreamingLLM k_seq_dim = 3).
struct KVInputs {
  Shapes s;
  std::vector<float> keys, values;

  [[nodiscard]] const float* key(std::int64_t l, std::int64_t h, std::int64_t t) const {
    return keys.data() + ((l * s.kv_heads + h) * s.seq_len + t) * s.head_dim;
  }
  [[nodiscard]] const float* value(std::int64_t l, std::int64_t h, std::int64_t t) const {
    return values.data() + ((l * s.kv_heads + h) * s.seq_len + t) * s.head_dim;
  }
};
inline KVInputs load_kv(const GoldenCase& c, const Shapes& s, bool keys_seq_last) {
  KVInputs in{s, {}, {}};
  in.values = load_f32(c, "values", {s.layers, 1, s.kv_heads, s.seq_len, s.head_dim});
  if (!keys_seq_last) {
    in.keys = load_f32(c, "keys", {s.layers, 1, s.kv_heads, s.seq_len, s.head_dim});
    return in;
  }
  const auto k = load_f32(c, "keys", {s.layers, 1, s.kv_heads, s.head_dim, s.seq_len});
  in.keys.resize(k.size());
  for (std::int64_t lh = 0; lh < s.layers * s.kv_heads; ++lh)
    for (std::int64_t d = 0; d < s.head_dim; ++d)
      for (std::int64_t t = 0; t < s.seq_len; ++t)
        in.keys[static_cast<std::size_t>((lh * s.seq_len + t) * s.head_dim + d)] =
            k[static_cast<std::size_t>((lh * s.head_dim + d) * s.seq_len + t)];
  return in;
}

// All S query rows of one layer, [q_head, seq, head_dim]. Cases that store only queries_tail were
// run with zeros in the earlier rows (README §5.3), so they are rebuilt that way.
inline std::vector<float> load_layer_queries(const GoldenCase& c, const Shapes& s, std::int64_t layer) {
  const std::int64_t per_layer = s.q_heads * s.seq_len * s.head_dim;
  if (c.has("queries")) {
    const auto q = load_f32(c, "queries", {s.layers, 1, s.q_heads, s.seq_len, s.head_dim});
    return {q.begin() + layer * per_layer, q.begin() + (layer + 1) * per_layer};
  }
  if (!c.has("queries_tail")) io_fail(c, "neither queries.npy nor queries_tail.npy exists");
  const NpyArray t = load(c, "queries_tail");
  if (t.shape.size() != 5 || t.shape[0] != s.layers || t.shape[1] != 1 || t.shape[2] != s.q_heads ||
      t.shape[3] > s.seq_len || t.shape[4] != s.head_dim || t.dtype != "<f4")
    io_fail(c, "queries_tail.npy must be float32 [layers, 1, q_heads, n_tail <= seq_len, head_dim]");
  const std::int64_t n_tail = t.shape[3];
  const auto tail = t.as<float>();
  std::vector<float> q(static_cast<std::size_t>(per_layer), 0.0f);
  for (std::int64_t h = 0; h < s.q_heads; ++h)
    for (std::int64_t i = 0; i < n_tail; ++i)
      std::copy_n(tail.begin() + ((layer * s.q_heads + h) * n_tail + i) * s.head_dim, s.head_dim,
                  q.begin() + (h * s.seq_len + s.seq_len - n_tail + i) * s.head_dim);
  return q;
}

// ------------------------------------------------------------------------------ cache plumbing

template <class Cache>
using Obs = Observation<typename Cache::value_type, typename Cache::memory_space>;

// A host array copied once into the cache backend's memory space.
template <class Cache>
class Uploaded {
 public:
  Uploaded(Cache& cache, const std::vector<float>& host)
      : n_(static_cast<std::int64_t>(host.size())), buf_(cache.backend().template allocate<float>(n_)) {
    cache.backend().copy_from_host(host.data(), buf_.data(), n_);
  }
  [[nodiscard]] MemorySpan<const float, typename Cache::memory_space> span() { return {buf_.data(), n_}; }

 private:
  std::int64_t n_;
  typename Cache::backend_type::template Buffer<float> buf_;
};

// The cache's inputs: shapes, granularity, cache kv-head -> input kv-head, K/V unrepeated. The
// KVCache-Factory clusters read the granularity (cluster_setup); every other set's cache holds the
// case's own kv-heads (own_heads_setup).
struct ClusterSetup {
  Shapes s;
  bool query_head = true;
  std::vector<std::int64_t> head_map;  // cache kv-head -> input kv-head
  KVInputs in;
  std::int64_t cache_heads = 0;
};
inline ClusterSetup cluster_setup(const GoldenCase& c) {
  ClusterSetup u;
  u.s = read_shapes(c);
  u.query_head = query_head_granularity(c);
  u.head_map = cache_head_map(c, u.s, u.query_head);
  u.cache_heads = static_cast<std::int64_t>(u.head_map.size());
  if (const auto oh = opt_int(c, "shapes", "out_heads"); oh && *oh != u.cache_heads)
    io_fail(c, "shapes.out_heads disagrees with the granularity");
  u.in = load_kv(c, u.s, false);
  return u;
}
// `s` comes from the caller, which checks its set's options before any tensor is read.
inline ClusterSetup own_heads_setup(const GoldenCase& c, const Shapes& s, bool keys_seq_last) {
  ClusterSetup u;
  u.s = s;
  u.query_head = false;
  u.in = load_kv(c, s, keys_seq_last);
  u.head_map = cache_head_map(c, s, false);
  u.cache_heads = s.kv_heads;
  return u;
}

// Appends tokens [t0, t0 + n) of every cache head (cache head h reads input kv-head head_map[h]).
template <class Cache>
void append_tokens(Cache& cache, std::int64_t layer, const KVInputs& in, const std::vector<std::int64_t>& head_map,
                   std::int64_t t0, std::int64_t n) {
  const std::int64_t d = in.s.head_dim;
  const auto heads = static_cast<std::int64_t>(head_map.size());
  std::vector<float> k(static_cast<std::size_t>(heads * n * d)), v(k.size());
  for (std::int64_t h = 0; h < heads; ++h) {
    std::copy_n(in.key(layer, head_map[static_cast<std::size_t>(h)], t0), n * d, k.begin() + h * n * d);
    std::copy_n(in.value(layer, head_map[static_cast<std::size_t>(h)], t0), n * d, v.begin() + h * n * d);
  }
  Uploaded<Cache> dk(cache, k), dv(cache, v);
  cache.append(layer, dk.span(), dv.span(), n);
}

// Slot order of one head sorted by position: the report order.
inline std::vector<std::size_t> positional_order(const std::vector<std::int32_t>& pos) {
  std::vector<std::size_t> order(pos.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return pos[a] < pos[b]; });
  return order;
}

template <class Cache>
std::vector<std::vector<std::int64_t>> kept_positions(const Cache& cache, std::int64_t layer) {
  std::vector<std::vector<std::int64_t>> out;
  for (std::int64_t h = 0; h < cache.shape().num_kv_heads; ++h) {
    const auto p = cache.kept_positions(layer, h);
    out.emplace_back(p.begin(), p.end());
  }
  return out;
}

template <class Cache>
void record_keep(const Cache& cache, ReplayResult& r) {
  r.num_layers = cache.shape().num_layers;
  r.out_heads = cache.shape().num_kv_heads;
  r.keep.clear();
  for (std::int64_t l = 0; l < r.num_layers; ++l) r.keep.push_back(kept_positions(cache, l));
}

// out_keys_l{l} / out_values_l{l}: [1, heads, n, head_dim] (or keys [1, heads, head_dim, n] with
// keys_seq_last), rows in ascending position order. Every head of a layer must hold the same count.
template <class Cache>
void record_kv(const GoldenCase& c, const Cache& cache, ReplayResult& r, bool keys_seq_last) {
  const auto& sh = cache.shape();
  const std::int64_t d = sh.head_dim;
  for (std::int64_t l = 0; l < sh.num_layers; ++l) {
    const std::int64_t n = cache.len(l, 0);
    for (std::int64_t h = 1; h < sh.num_kv_heads; ++h)
      if (cache.len(l, h) != n)
        unsupported(c, "layer " + std::to_string(l) + " keeps different counts per head; the case's per-layer "
                       "output tensors need one count");
    OutputTensor k{keys_seq_last ? std::vector<std::int64_t>{1, sh.num_kv_heads, d, n}
                                 : std::vector<std::int64_t>{1, sh.num_kv_heads, n, d},
                   std::vector<float>(static_cast<std::size_t>(sh.num_kv_heads * n * d))};
    OutputTensor v{{1, sh.num_kv_heads, n, d}, std::vector<float>(k.data.size())};
    for (std::int64_t h = 0; h < sh.num_kv_heads; ++h) {
      const auto order = positional_order(cache.positions(l, h));
      const auto keys = cache.keys(l, h), values = cache.values(l, h);
      for (std::int64_t i = 0; i < n; ++i) {
        const auto slot = static_cast<std::int64_t>(order[static_cast<std::size_t>(i)]);
        for (std::int64_t e = 0; e < d; ++e) {
          const float kv = keys[static_cast<std::size_t>(slot * d + e)];
          const std::int64_t kidx = keys_seq_last ? (h * d + e) * n + i : (h * n + i) * d + e;
          k.data[static_cast<std::size_t>(kidx)] = kv;
          v.data[static_cast<std::size_t>((h * n + i) * d + e)] = values[static_cast<std::size_t>(slot * d + e)];
        }
      }
    }
    r.tensors["out_keys_l" + std::to_string(l)] = std::move(k);
    r.tensors["out_values_l" + std::to_string(l)] = std::move(v);
  }
}

// The case directory's own name, also when it was given with a trailing separator.
inline std::string case_name(const GoldenCase& c) {
  return (c.dir.has_filename() ? c.dir : c.dir.parent_path()).filename().string();
}
inline std::string set_dir_name(const GoldenCase& c) {
  return (c.dir.has_filename() ? c.dir : c.dir.parent_path()).parent_path().filename().string();
}

inline ReplayResult new_result(const GoldenCase& c, const std::string& set) {
  ReplayResult r;
  r.case_id = set + "/" + case_name(c);
  r.set = set;
  return r;
}

// How every replay ends: the final kept sets and K/V rows.
template <class Cache>
void record_final(const GoldenCase& c, const Cache& cache, ReplayResult& r, bool keys_seq_last) {
  record_keep(cache, r);
  record_kv(c, cache, r, keys_seq_last);
}

// A prefill-only replay: a cache of the setup's heads with max(S, min_capacity) slots, then per
// layer the whole prompt appended and one on_prefill with the observation that
// make_obs(cache, layer, call) passes to call.
template <template <class> class Policy, class Cache, class Config, class MakeObs>
ReplayResult replay_prefill_only(const GoldenCase& c, const std::string& set, const ClusterSetup& u,
                                 std::int64_t min_capacity, const Config& cfg, MakeObs&& make_obs) {
  ReplayResult r = new_result(c, set);
  Cache cache(CacheShape{u.s.layers, u.cache_heads, u.s.q_heads, u.s.head_dim, std::max(u.s.seq_len, min_capacity)});
  Policy<Cache> policy(cache, cfg);
  for (std::int64_t l = 0; l < u.s.layers; ++l) {
    append_tokens(cache, l, u.in, u.head_map, 0, u.s.seq_len);
    make_obs(cache, l, [&](const Obs<Cache>& obs) { policy.on_prefill(cache, l, obs); });
  }
  record_final(c, cache, r, false);
  return r;
}

}  // namespace impl

// ------------------------------------------------------------------------------------ the sets

// mit-han-lab/streaming-llm StartRecentKVCache (golden/README.md §6.1). `call`: append the whole
// cache, run the hook; `evict_for_space`: append, make_room(num_coming); `decode`: the
// eval_long_ppl.py pattern (prefill S0 and trim, then append one token and trim, T times).
template <class Cache>
ReplayResult replay_streaming_llm(const GoldenCase& c) {
  using namespace impl;
  ReplayResult r = new_result(c, "streaming_llm");
  const Shapes s = read_shapes(c);
  const std::int64_t ns = get_int(c, "hyperparameters", "start_size");
  const std::int64_t nr = get_int(c, "hyperparameters", "recent_size");
  const std::int64_t k_seq_dim = opt_int(c, "hyperparameters", "k_seq_dim").value_or(2);
  const std::int64_t v_seq_dim = opt_int(c, "hyperparameters", "v_seq_dim").value_or(2);
  if ((k_seq_dim != 2 && k_seq_dim != 3) || v_seq_dim != 2)
    unsupported(c, "k_seq_dim " + std::to_string(k_seq_dim) + " / v_seq_dim " + std::to_string(v_seq_dim) +
                       " (Llama layout 2/2 and MPT layout 3/2 are supported)");
  if (s.groups != 1) unsupported(c, "GQA input (StartRecentKVCache cases hold one head per kv-head)");
  const std::string mode = get_string(c, "mode", "");
  const bool keys_seq_last = k_seq_dim == 3;
  const ClusterSetup u = own_heads_setup(c, s, keys_seq_last);

  const std::int64_t capacity = std::max(s.seq_len, ns + nr + 1);
  Cache cache(CacheShape{s.layers, s.kv_heads, s.kv_heads, s.head_dim, capacity});
  StreamingLLM<Cache> policy(
      cache, StreamingLLMConfig{.num_sink = ns, .num_recent = nr, .schedule = Schedule::prefill_and_every_step});
  const auto none = Obs<Cache>::none();

  if (mode == "call" || mode == "evict_for_space") {
    std::int64_t coming = 0;
    if (mode == "evict_for_space") {
      const auto n = opt_int(c, "hyperparameters", "num_coming");
      if (!n || *n < 0) io_fail(c, "evict_for_space needs hyperparameters.num_coming >= 0");
      coming = *n;
    }
    for (std::int64_t l = 0; l < s.layers; ++l) {
      append_tokens(cache, l, u.in, u.head_map, 0, s.seq_len);
      if (mode == "call") policy.on_prefill(cache, l, none);
      else policy.make_room(cache, l, coming);
    }
  } else if (mode == "decode") {
    const std::int64_t s0 = get_int(c, "hyperparameters", "S0"), t_steps = get_int(c, "hyperparameters", "T");
    if (s0 <= 0 || t_steps < 0 || s0 + t_steps != s.seq_len) io_fail(c, "decode needs S0 > 0, T >= 0 and S0 + T == seq_len");
    r.step_keep.resize(static_cast<std::size_t>(t_steps + 1));
    for (std::int64_t l = 0; l < s.layers; ++l) {
      append_tokens(cache, l, u.in, u.head_map, 0, s0);
      policy.on_prefill(cache, l, none);
      r.step_keep[0].push_back(kept_positions(cache, l));
    }
    for (std::int64_t t = 1; t <= t_steps; ++t)
      for (std::int64_t l = 0; l < s.layers; ++l) {
        append_tokens(cache, l, u.in, u.head_map, s0 + t - 1, 1);
        policy.on_decode(cache, l, none);
        r.step_keep[static_cast<std::size_t>(t)].push_back(kept_positions(cache, l));
      }
  } else {
    unsupported(c, "streaming_llm mode '" + mode + "' (call, evict_for_space and decode are supported)");
  }
  record_final(c, cache, r, keys_seq_last);
  return r;
}

// Where h2o_real_drop's attention comes from: the stored probabilities, as the official code was
// fed them, or kvevict's own causal softmax of the stored queries (golden README: "consume them
// directly or recompute them from queries"), which takes H2O's query path through the library.
enum class AttentionSource { stored_probs, queries };

// FMInference/H2O H2OKVCache_LayerWise real-drop (README §6.2): prefill with the stored causal
// attention, then T decode steps, each appending the token and observing its attention row. The
// official rows follow the official cache's slot order, which is positional (previous step's kept
// positions, then the new token); kvevict's slot order differs after decode-time evictions (the
// newcomer takes the victim's slot), so each row is permuted into kvevict's slot order through
// cache.positions(): an engine always supplies probabilities in its own slot order.
template <class Cache>
ReplayResult replay_h2o_real_drop_from(const GoldenCase& c, AttentionSource source) {
  using namespace impl;
  ReplayResult r = new_result(c, "h2o_real_drop");
  const Shapes s = read_shapes(c);
  if (s.groups != 1) unsupported(c, "GQA (the official real-drop code is MHA-only; no such golden case)");
  const std::int64_t hh = get_int(c, "hyperparameters", "hh_size"), rec = get_int(c, "hyperparameters", "recent_size");
  const std::int64_t s0 = get_int(c, "hyperparameters", "S0"), t_steps = get_int(c, "hyperparameters", "T");
  if (s0 <= 0 || t_steps < 0 || s0 + t_steps != s.seq_len) io_fail(c, "needs S0 > 0, T >= 0 and S0 + T == seq_len");
  const std::int64_t H = s.kv_heads;
  const ClusterSetup u = own_heads_setup(c, s, false);
  const auto lens = t_steps > 0 ? load_i64(c, "attn_decode_lens", {t_steps}) : std::vector<std::int64_t>{};
  const bool have_steps = case_has(c, "step_keep_indices");
  std::vector<std::int64_t> official_steps;
  std::vector<std::int64_t> steps_shape;
  if (have_steps && t_steps > 0) {
    steps_shape = load(c, "step_keep_indices").shape;
    if (steps_shape.size() != 4 || steps_shape[0] != t_steps + 1 || steps_shape[1] != s.layers || steps_shape[2] != H)
      io_fail(c, "step_keep_indices.npy must be [T + 1, layers, heads, n]");
    official_steps = load_i64(c, "step_keep_indices", steps_shape);
  }

  const std::int64_t capacity = std::max(s.seq_len, hh + rec + 1);
  Cache cache(CacheShape{s.layers, H, H, s.head_dim, capacity});
  H2O<Cache> policy(cache, H2OConfig{.num_heavy = hh,
                                     .num_recent = rec,
                                     .group_agg = GroupAgg::mean,
                                     .schedule = Schedule::prefill_and_every_step});
  r.step_keep.resize(static_cast<std::size_t>(t_steps + 1));

  for (std::int64_t l = 0; l < s.layers; ++l) {
    const std::string ls = std::to_string(l);
    append_tokens(cache, l, u.in, u.head_map, 0, s0);
    // [head, seq, head_dim]: the layer's query rows, read only when the replay scores from them.
    const std::vector<float> layer_q = source == AttentionSource::queries ? load_layer_queries(c, s, l) : std::vector<float>{};
    const auto query_rows = [&](std::int64_t first, std::int64_t n) {  // [head, n, head_dim] from position `first`
      std::vector<float> q(static_cast<std::size_t>(H * n * s.head_dim));
      for (std::int64_t h = 0; h < H; ++h)
        std::copy_n(layer_q.begin() + (h * s.seq_len + first) * s.head_dim, n * s.head_dim,
                    q.begin() + h * n * s.head_dim);
      return q;
    };
    if (source == AttentionSource::queries) {
      Uploaded<Cache> q(cache, query_rows(0, s0));
      policy.on_prefill(cache, l, Obs<Cache>::from_queries(q.span(), s0));
    } else {
      // Prefill rows [head, S0, S0]: kvevict's slots are positions 0..S0-1 here, as officially.
      Uploaded<Cache> probs(cache, load_f32(c, "attn_prefill_l" + ls, {1, H, s0, s0}));
      policy.on_prefill(cache, l, Obs<Cache>::from_probs(probs.span(), s0, s0));
    }
    r.step_keep[0].push_back(kept_positions(cache, l));
    if (t_steps == 0) continue;

    const NpyArray da = load(c, "attn_decode_l" + ls);
    if (da.dtype != "<f4" || da.shape.size() != 4 || da.shape[0] != t_steps || da.shape[1] != 1 || da.shape[2] != H)
      io_fail(c, "attn_decode_l" + ls + ".npy must be float32 [T, 1, heads, max_len]");
    const std::int64_t max_len = da.shape[3];
    const auto rows = da.as<float>();
    for (std::int64_t t = 1; t <= t_steps; ++t) {
      const std::int64_t new_pos = s0 + t - 1, len = lens[static_cast<std::size_t>(t - 1)];
      append_tokens(cache, l, u.in, u.head_map, new_pos, 1);
      if (len > max_len) io_fail(c, "attn_decode_lens exceeds the stored row width");
      std::vector<float> probs(static_cast<std::size_t>(H * len), 0.0f);
      for (std::int64_t h = 0; h < H; ++h) {
        if (cache.len(l, h) != len)
          throw InvariantError("kvevict-replay: " + r.case_id + ": layer " + ls + " head " + std::to_string(h) +
                               " holds " + std::to_string(cache.len(l, h)) + " entries at decode step " +
                               std::to_string(t) + ", the official cache " + std::to_string(len));
        // The official cache's positions in its slot order: the previous step's kept set, ascending,
        // then the new token. Where the case records that set, kvevict must hold exactly it.
        const auto slot_pos = cache.positions(l, h);
        std::vector<std::int64_t> official(slot_pos.begin(), slot_pos.end());
        std::sort(official.begin(), official.end());
        if (!official_steps.empty()) {
          std::vector<std::int64_t> want;
          const std::int64_t w = steps_shape[3];
          for (std::int64_t i = 0; i < w; ++i) {
            const std::int64_t p = official_steps[static_cast<std::size_t>((((t - 1) * s.layers + l) * H + h) * w + i)];
            if (p >= 0) want.push_back(p);
          }
          want.push_back(new_pos);
          if (want != official)
            throw InvariantError("kvevict-replay: " + r.case_id + ": layer " + ls + " head " + std::to_string(h) +
                                 ": kvevict's cache diverged from the official one before decode step " +
                                 std::to_string(t) + " (its kept set differs from step_keep_indices[" +
                                 std::to_string(t - 1) + "]), so the official attention row cannot be mapped");
        }
        const float* row = rows.data() + ((t - 1) * H + h) * max_len;
        for (std::size_t slot = 0; slot < slot_pos.size(); ++slot) {
          const auto j = std::lower_bound(official.begin(), official.end(), slot_pos[slot]) - official.begin();
          probs[static_cast<std::size_t>(h * len) + slot] = row[j];
        }
      }
      if (source == AttentionSource::queries) {
        Uploaded<Cache> q(cache, query_rows(new_pos, 1));
        policy.on_decode(cache, l, Obs<Cache>::from_queries(q.span(), 1));
      } else {
        Uploaded<Cache> dp(cache, probs);
        policy.on_decode(cache, l, Obs<Cache>::from_probs(dp.span(), 1, len));
      }
      r.step_keep[static_cast<std::size_t>(t)].push_back(kept_positions(cache, l));
    }
  }
  record_final(c, cache, r, false);

  // out_hh_score_l{l}: accumulated per-head scores [heads, n] in positional order (the official state).
  for (std::int64_t l = 0; l < s.layers; ++l) {
    std::vector<float> all(static_cast<std::size_t>(H * capacity));
    cache.backend().copy_to_host(policy.scorer().q_head_scores(l), all.data(), H * capacity);
    const std::int64_t n = cache.len(l, 0);
    OutputTensor sc{{H, n}, std::vector<float>(static_cast<std::size_t>(H * n))};
    for (std::int64_t h = 0; h < H; ++h) {
      const auto order = positional_order(cache.positions(l, h));
      for (std::int64_t i = 0; i < n; ++i)
        sc.data[static_cast<std::size_t>(h * n + i)] =
            all[static_cast<std::size_t>(h * capacity + static_cast<std::int64_t>(order[static_cast<std::size_t>(i)]))];
    }
    r.tensors["out_hh_score_l" + std::to_string(l)] = std::move(sc);
  }
  return r;
}

template <class Cache>
ReplayResult replay_h2o_real_drop(const GoldenCase& c) {
  return replay_h2o_real_drop_from<Cache>(c, AttentionSource::stored_probs);
}

// KVCache-Factory StreamingLLMKVCluster (README §6.3): keeps [0, C - w) and the last w when S >= C.
// Query-head granularity = one cache kv-head per query head (K/V repeated, decision 3).
template <class Cache>
ReplayResult replay_kvfactory_streamingllm(const GoldenCase& c) {
  using namespace impl;
  const ClusterSetup u = cluster_setup(c);
  const std::int64_t w = get_int(c, "hyperparameters", "window_size"), cap = get_int(c, "hyperparameters", "max_capacity_prompt");
  return replay_prefill_only<StreamingLLM, Cache>(c, "kvfactory_streamingllm", u, cap,
                                                  StreamingLLMConfig::kvcache_factory(cap, w),
                                                  [](Cache&, std::int64_t, auto&& call) { call(Obs<Cache>::none()); });
}

// kvpress StreamingLLMPress: n_kept = int(S (1 - compression_ratio)); n_sink sinks plus the newest.
template <class Cache>
ReplayResult replay_kvpress_streamingllm(const GoldenCase& c) {
  using namespace impl;
  const ClusterSetup u = own_heads_setup(c, read_shapes(c), false);
  const auto cfg = StreamingLLMConfig::kvpress(u.s.seq_len, get_double(c, "hyperparameters", "compression_ratio"),
                                               get_int(c, "hyperparameters", "n_sink"));
  return replay_prefill_only<StreamingLLM, Cache>(c, "kvpress_streamingllm", u, cfg.num_sink + cfg.num_recent, cfg,
                                                  [](Cache&, std::int64_t, auto&& call) { call(Obs<Cache>::none()); });
}

// KVCache-Factory H2OKVCluster at HEAD (README §6.3): column sums of the full causal attention of
// ALL S queries, top C - w plus the window, prefill only. kv_head granularity reduces the q-heads
// of a group with gqa_score_agg; query_head granularity builds one kv-head per query head.
template <class Cache>
ReplayResult replay_kvfactory_h2o(const GoldenCase& c) {
  using namespace impl;
  const ClusterSetup u = cluster_setup(c);
  const std::int64_t w = get_int(c, "hyperparameters", "window_size"), cap = get_int(c, "hyperparameters", "max_capacity_prompt");
  const auto cfg = H2OConfig::kvcache_factory(cap, w, u.query_head ? GroupAgg::mean : group_agg(c));
  return replay_prefill_only<H2O, Cache>(c, "kvfactory_h2o", u, cap, cfg, [&](Cache& cache, std::int64_t l, auto&& call) {
    Uploaded<Cache> q(cache, load_layer_queries(c, u.s, l));
    call(Obs<Cache>::from_queries(q.span(), u.s.seq_len));
  });
}

// COMPATIBILITY REPLAY. KVCache-Factory H2OKVCluster at 7ee6be0 (2024-12-03, the revision behind the
// published tables): the causal mask is added only to the last w x w block, so the S - w earlier
// queries attend to every key, future ones included. kvevict's query observation is always causal,
// so this replay computes those probabilities itself (fp32 logits q.k / sqrt(d), fp32 softmax, as
// the official code) and passes them as a probability observation; selection is kvevict's H2O.
template <class Cache>
ReplayResult replay_kvfactory_h2o_legacy2024(const GoldenCase& c) {
  using namespace impl;
  const ClusterSetup u = cluster_setup(c);
  if (!u.query_head) unsupported(c, "kv_head granularity (the 2024 revision has no kv_head path)");
  const std::int64_t w = get_int(c, "hyperparameters", "window_size"), cap = get_int(c, "hyperparameters", "max_capacity_prompt");
  const std::int64_t S = u.s.seq_len, D = u.s.head_dim, Hq = u.s.q_heads;
  if (w <= 0 || w > S) io_fail(c, "window_size must be in [1, seq_len]");
  const auto cfg = H2OConfig::kvcache_factory(cap, w);
  const float sqrt_d = std::sqrt(static_cast<float>(D));
  const auto probabilities = [&](Cache& cache, std::int64_t l, auto&& call) {
    const auto q = load_layer_queries(c, u.s, l);
    std::vector<float> probs(static_cast<std::size_t>(Hq * S * S));  // [q_head, query, slot = position]
    std::vector<float> logits(static_cast<std::size_t>(S));
    for (std::int64_t h = 0; h < Hq; ++h) {
      const std::int64_t kvh = h / u.s.groups;
      for (std::int64_t i = 0; i < S; ++i) {
        // Query i sees key j unless both sit in the last w x w block and j > i.
        const std::int64_t visible = i >= S - w ? i + 1 : S;
        const float* qi = q.data() + (h * S + i) * D;
        float mx = -std::numeric_limits<float>::infinity();
        for (std::int64_t j = 0; j < visible; ++j) {
          const float* kj = u.in.key(l, kvh, j);
          float dot = 0.0f;
          for (std::int64_t e = 0; e < D; ++e) dot += qi[e] * kj[e];
          logits[static_cast<std::size_t>(j)] = dot / sqrt_d;
          mx = std::max(mx, logits[static_cast<std::size_t>(j)]);
        }
        float* row = probs.data() + (h * S + i) * S;
        float sum = 0.0f;
        for (std::int64_t j = 0; j < visible; ++j) sum += (row[j] = std::exp(logits[static_cast<std::size_t>(j)] - mx));
        for (std::int64_t j = 0; j < visible; ++j) row[j] /= sum;
      }
    }
    Uploaded<Cache> p(cache, probs);
    call(Obs<Cache>::from_probs(p.span(), S, S));
  };
  return replay_prefill_only<H2O, Cache>(c, "kvfactory_h2o_legacy2024", u, cap, cfg, probabilities);
}

// ------------------------------------------------------------------------------ dispatch table

template <class Cache>
struct SetReplay {
  std::string_view set;  // params.json "policy" = the set directory's name
  ReplayResult (*run)(const GoldenCase&);
};

template <class Cache>
ReplayResult replay_lazyeviction(const GoldenCase& c);  // golden/replay_lazyeviction.hpp, included below
template <class Cache>
ReplayResult replay_cake(const GoldenCase& c);  // golden/replay_cake.hpp, included below
// golden/replay_window.hpp, included below:
template <class Cache>
ReplayResult replay_snapkv_official(const GoldenCase& c);
template <class Cache>
ReplayResult replay_kvfactory_snapkv(const GoldenCase& c);
template <class Cache>
ReplayResult replay_kvfactory_pyramidkv(const GoldenCase& c);
template <class Cache>
ReplayResult replay_kvpress_snapkv(const GoldenCase& c);
template <class Cache>
ReplayResult replay_kvpress_pyramidkv(const GoldenCase& c);
template <class Cache>
ReplayResult replay_kvpress_tova(const GoldenCase& c);
template <class Cache>
ReplayResult replay_kvpress_knorm(const GoldenCase& c);
template <class Cache>
ReplayResult replay_kvpress_keydiff(const GoldenCase& c);

template <class Cache>
std::span<const SetReplay<Cache>> replay_sets() {
  static const SetReplay<Cache> table[] = {
      {"streaming_llm", &replay_streaming_llm<Cache>},
      {"h2o_real_drop", &replay_h2o_real_drop<Cache>},
      {"kvfactory_streamingllm", &replay_kvfactory_streamingllm<Cache>},
      {"kvpress_streamingllm", &replay_kvpress_streamingllm<Cache>},
      {"kvfactory_h2o", &replay_kvfactory_h2o<Cache>},
      {"kvfactory_h2o_legacy2024", &replay_kvfactory_h2o_legacy2024<Cache>},
      {"lazyeviction", &replay_lazyeviction<Cache>},
      {"cake", &replay_cake<Cache>},
      {"snapkv_official", &replay_snapkv_official<Cache>},
      {"kvfactory_snapkv", &replay_kvfactory_snapkv<Cache>},
      {"kvfactory_pyramidkv", &replay_kvfactory_pyramidkv<Cache>},
      {"kvpress_snapkv", &replay_kvpress_snapkv<Cache>},
      {"kvpress_pyramidkv", &replay_kvpress_pyramidkv<Cache>},
      {"kvpress_tova", &replay_kvpress_tova<Cache>},
      {"kvpress_knorm", &replay_kvpress_knorm<Cache>},
      {"kvpress_keydiff", &replay_kvpress_keydiff<Cache>},
  };
  return table;
}

// ---------------------------------------------------------------------------------- outputs

namespace impl {

// [.., width] int64, ascending, -1 padded; width = the case's own (params.json files), else the
// longest list (also when a list outgrows the case's width, so nothing is ever cut off).
inline std::int64_t pad_width(const GoldenCase& c, const std::string& name, std::int64_t longest) {
  const auto shape = file_shape(c, name);
  return std::max(shape && !shape->empty() ? shape->back() : 0, longest);
}
inline void append_padded(std::vector<std::int64_t>& out, const std::vector<std::int64_t>& v, std::int64_t width) {
  out.insert(out.end(), v.begin(), v.end());
  out.insert(out.end(), static_cast<std::size_t>(width - static_cast<std::int64_t>(v.size())), -1);
}

}  // namespace impl

// keep_indices.npy (and step_keep_indices.npy where the case has one) as int64 arrays with the
// case's shape convention: {data, shape}.
inline std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>> keep_indices_array(const GoldenCase& c,
                                                                                           const ReplayResult& r) {
  std::int64_t longest = 0;
  for (const auto& layer : r.keep)
    for (const auto& head : layer) longest = std::max(longest, static_cast<std::int64_t>(head.size()));
  const std::int64_t w = impl::pad_width(c, "keep_indices", longest);
  std::vector<std::int64_t> data;
  for (const auto& layer : r.keep)
    for (const auto& head : layer) impl::append_padded(data, head, w);
  return {data, {r.num_layers, r.out_heads, w}};
}
inline std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>> step_keep_indices_array(const GoldenCase& c,
                                                                                                const ReplayResult& r) {
  std::int64_t longest = 0;
  for (const auto& step : r.step_keep)
    for (const auto& layer : step)
      for (const auto& head : layer) longest = std::max(longest, static_cast<std::int64_t>(head.size()));
  const std::int64_t w = impl::pad_width(c, "step_keep_indices", longest);
  std::vector<std::int64_t> data;
  for (const auto& step : r.step_keep)
    for (const auto& layer : step)
      for (const auto& head : layer) impl::append_padded(data, head, w);
  return {data, {static_cast<std::int64_t>(r.step_keep.size()), r.num_layers, r.out_heads, w}};
}

// Writes keep_indices.npy, step_keep_indices.npy (where the case has one) and every float output.
inline void write_outputs(const GoldenCase& c, const ReplayResult& r, const std::filesystem::path& out_dir) {
  try {
    std::filesystem::create_directories(out_dir);
    const auto [keep, keep_shape] = keep_indices_array(c, r);
    test::save_npy(out_dir / "keep_indices.npy", keep, keep_shape);
    if (!r.step_keep.empty() && impl::case_has(c, "step_keep_indices")) {
      const auto [steps, steps_shape] = step_keep_indices_array(c, r);
      test::save_npy(out_dir / "step_keep_indices.npy", steps, steps_shape);
    }
    for (const auto& [name, t] : r.tensors) test::save_npy(out_dir / (name + ".npy"), t.data, t.shape);
  } catch (const std::exception& e) {
    throw IoError("kvevict-replay: cannot write outputs to '" + out_dir.string() + "': " + e.what());
  }
}

// The set a case belongs to: params.json "policy" (the set directory's name). A case whose parent
// directory is a known set of another name is malformed.
template <class Cache>
const SetReplay<Cache>& find_set(const GoldenCase& c) {
  const std::string parent = impl::set_dir_name(c);
  const std::string policy = impl::get_string(c, "policy", parent);
  const SetReplay<Cache>* found = nullptr;
  bool parent_known = false;
  for (const auto& e : replay_sets<Cache>()) {
    if (e.set == policy) found = &e;
    if (e.set == parent) parent_known = true;
  }
  if (parent_known && parent != policy)
    impl::io_fail(c, "params.json policy '" + policy + "' disagrees with its set directory '" + parent + "'");
  if (found == nullptr) {
    std::string known;
    for (const auto& e : replay_sets<Cache>()) known += (known.empty() ? "" : ", ") + std::string(e.set);
    impl::unsupported(c, "unsupported set/policy '" + policy + "' (supported: " + known + ")");
  }
  return *found;
}

// Replays one case on a cache of type Cache (KVCache<Backend>) and, unless out_dir is empty, writes
// kvevict's outputs there. Throws UnsupportedError for a set or option not covered, IoError for an
// unreadable or malformed case; library errors propagate unchanged.
template <class Cache>
ReplayResult replay(const GoldenCase& c, const std::filesystem::path& out_dir) {
  const SetReplay<Cache>& entry = find_set<Cache>(c);
  ReplayResult r;
  try {
    r = entry.run(c);
  } catch (const Error&) {
    throw;
  } catch (const json::exception& e) {
    impl::io_fail(c, std::string("params.json: ") + e.what());
  }
  if (!out_dir.empty()) write_outputs(c, r, out_dir);
  return r;
}

// Loads the case at `case_dir` (IoError if it has no readable params.json) and replays it.
template <class Cache>
ReplayResult replay(const std::filesystem::path& case_dir, const std::filesystem::path& out_dir) {
  std::optional<GoldenCase> c;
  try {
    c.emplace(case_dir.has_filename() ? case_dir : case_dir.parent_path());
  } catch (const std::exception& e) {
    throw IoError(std::string("kvevict-replay: ") + e.what());
  }
  return replay<Cache>(*c, out_dir);
}

}  // namespace kvevict::golden

#include "golden/replay_lazyeviction.hpp"  // defines replay_lazyeviction, declared above
#include "golden/replay_cake.hpp"  // defines replay_cake, declared above
#include "golden/replay_window.hpp"  // defines the SnapKV/PyramidKV/TOVA/Knorm/KeyDiff replays, declared above
