// H2O and StreamingLLM on KVCache<CudaBackend> against KVCache<CpuBackend>: the same prompt and
// decode tokens go into both caches, the same policy configuration runs on each, and after every
// hook the two caches must hold the same positions in the same slots (so the same keep-sets).
// With probabilities as the observation, scores are bit-identical by construction and any
// difference is a bug; with queries, the CUDA backend's fp32 sums differ from the CPU's in the
// last bits, so a flip would need two scores within ~1e-6 relative at the eviction boundary
// (the seeds below are fixed; a failure prints the step). Keys and values, moved but never
// recomputed (pos-shift rotations are bit-exact too), must end bit-identical.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cuda_test_support.cuh"

namespace kvevict::cuda_test {
namespace {

using CpuCache = KVCache<CpuBackend>;
using GpuCache = KVCache<CudaBackend>;
using CpuObs = Observation<float, HostSpace>;
using GpuObs = Observation<float, CudaSpace>;

enum class ObsKind { queries, probs, none };

// Deterministic token data: rows of (layer, token) depend only on the seed.
class TokenSource {
 public:
  TokenSource(std::uint64_t seed, const CacheShape& s) : seed_(seed), shape_(s) {}
  // [kv_head, count, head_dim] keys (kind 0) or values (kind 1); [q_head, count, head_dim] queries (kind 2).
  [[nodiscard]] std::vector<float> rows(int kind, std::int64_t layer, std::int64_t first, std::int64_t count) const {
    const std::int64_t heads = kind == 2 ? shape_.num_q_heads : shape_.num_kv_heads;
    const float gain = kind == 2 ? 1.5f : 1.0f;
    std::vector<float> out(static_cast<std::size_t>(heads * count * shape_.head_dim));
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t t = 0; t < count; ++t) {
        Rng rng(seed_ ^ (static_cast<std::uint64_t>(layer) << 48) ^ (static_cast<std::uint64_t>(first + t) << 16) ^
                (static_cast<std::uint64_t>(h) << 4) ^ static_cast<std::uint64_t>(kind));
        for (std::int64_t i = 0; i < shape_.head_dim; ++i)
          out[static_cast<std::size_t>((h * count + t) * shape_.head_dim + i)] = rng.uniform(-gain, gain);
      }
    return out;
  }

 private:
  std::uint64_t seed_;
  CacheShape shape_;
};

// Causal prefill probabilities of a fresh cache (slot j holds position j): [q_head, T, stride],
// computed in double and rounded once, so both caches observe the very same floats.
std::vector<float> causal_probs(const CacheShape& s, const std::vector<float>& q, const std::vector<float>& k,
                                std::int64_t num_tokens, std::int64_t stride) {
  std::vector<float> probs(static_cast<std::size_t>(s.num_q_heads * num_tokens * stride), 0.0f);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  const std::int64_t g = s.group_size();
  std::vector<double> logits(static_cast<std::size_t>(num_tokens));
  for (std::int64_t qh = 0; qh < s.num_q_heads; ++qh)
    for (std::int64_t i = 0; i < num_tokens; ++i) {
      const float* qi = q.data() + (qh * num_tokens + i) * s.head_dim;
      double mx = -INFINITY, sum = 0.0;
      for (std::int64_t j = 0; j <= i; ++j) {
        const float* kj = k.data() + ((qh / g) * num_tokens + j) * s.head_dim;
        double dot = 0.0;
        for (std::int64_t d = 0; d < s.head_dim; ++d) dot += static_cast<double>(qi[d]) * kj[d];
        logits[static_cast<std::size_t>(j)] = dot * scale;
        mx = std::max(mx, dot * scale);
      }
      for (std::int64_t j = 0; j <= i; ++j) sum += std::exp(logits[static_cast<std::size_t>(j)] - mx);
      for (std::int64_t j = 0; j <= i; ++j)
        probs[static_cast<std::size_t>((qh * num_tokens + i) * stride + j)] =
            static_cast<float>(std::exp(logits[static_cast<std::size_t>(j)] - mx) / sum);
    }
  return probs;
}

void require_same_caches(const CpuCache& cpu, const GpuCache& gpu, std::int64_t layer, const std::string& when) {
  for (std::int64_t h = 0; h < cpu.shape().num_kv_heads; ++h) {
    INFO(when << ", layer " << layer << ", kv_head " << h);
    REQUIRE(gpu.len(layer, h) == cpu.len(layer, h));
    REQUIRE(gpu.positions(layer, h) == cpu.positions(layer, h));  // same slots, hence same keep-set
  }
}

struct RunSpec {
  CacheShape shape;
  std::int64_t prompt = 256;
  std::int64_t steps = 200;
  ObsKind obs = ObsKind::queries;
  bool make_room = false;  // StreamingLLM / H2O evict_for_space before each decode append
  std::uint64_t seed = 1;
};

template <template <class> class Policy, class Config>
void run_parity(const RunSpec& r, const Config& cfg) {
  const CacheShape& s = r.shape;
  const std::int64_t steps = small_run() ? std::min<std::int64_t>(r.steps, 30) : r.steps;
  CpuCache cpu(s);
  GpuCache gpu(s);
  Policy<CpuCache> cpu_policy(cpu, cfg);
  Policy<GpuCache> gpu_policy(gpu, cfg);
  const TokenSource src(r.seed, s);
  const std::int64_t kv_rows = s.num_kv_heads * r.prompt * s.head_dim;
  const std::int64_t q_rows = s.num_q_heads * r.prompt * s.head_dim;
  cuda::DeviceBuffer<float> d_k(kv_rows), d_v(kv_rows), d_q(q_rows), d_probs(s.num_q_heads * r.prompt * s.capacity);
  auto obs_pair = [&](std::int64_t layer, std::int64_t count, const std::vector<float>& q,
                      const std::vector<float>& k, std::vector<float>& probs) -> std::pair<CpuObs, GpuObs> {
    switch (r.obs) {
      case ObsKind::queries:
        upload(d_q, q);
        return {CpuObs::from_queries({q.data(), static_cast<std::int64_t>(q.size())}, count),
                GpuObs::from_queries({d_q.data(), static_cast<std::int64_t>(q.size())}, count)};
      case ObsKind::probs: {
        if (count > 1) {
          probs = causal_probs(s, q, k, count, s.capacity);
        } else {  // decode: the CPU cache's own attention row, slot-aligned with both caches
          probs.assign(static_cast<std::size_t>(s.num_q_heads * s.capacity), 0.0f);
          cpu.backend().attention_probs(cpu.view(layer), q.data(), 1.0f / std::sqrt(static_cast<float>(s.head_dim)),
                                        probs.data());
        }
        upload(d_probs, probs);
        const auto n = static_cast<std::int64_t>(probs.size());
        return {CpuObs::from_probs({probs.data(), n}, count, s.capacity), GpuObs::from_probs({d_probs.data(), n}, count, s.capacity)};
      }
      case ObsKind::none: break;
    }
    return {CpuObs::none(), GpuObs::none()};
  };
  std::vector<float> probs;
  for (std::int64_t layer = 0; layer < s.num_layers; ++layer) {
    const auto k = src.rows(0, layer, 0, r.prompt);
    const auto v = src.rows(1, layer, 0, r.prompt);
    const auto q = src.rows(2, layer, 0, r.prompt);
    upload(d_k, k);
    upload(d_v, v);
    const auto n = static_cast<std::int64_t>(k.size());
    cpu.append(layer, {k.data(), n}, {v.data(), n}, r.prompt);
    gpu.append(layer, {d_k.data(), n}, {d_v.data(), n}, r.prompt);
    const auto [cpu_obs, gpu_obs] = obs_pair(layer, r.prompt, q, k, probs);
    cpu_policy.on_prefill(cpu, layer, cpu_obs);
    gpu_policy.on_prefill(gpu, layer, gpu_obs);
    require_same_caches(cpu, gpu, layer, "after prefill");
  }
  for (std::int64_t step = 0; step < steps; ++step) {
    for (std::int64_t layer = 0; layer < s.num_layers; ++layer) {
      const std::int64_t pos = cpu.next_position(layer);
      if (r.make_room) {
        cpu_policy.make_room(cpu, layer, 1);
        gpu_policy.make_room(gpu, layer, 1);
      }
      const auto k = src.rows(0, layer, pos, 1);
      const auto v = src.rows(1, layer, pos, 1);
      const auto q = src.rows(2, layer, pos, 1);
      upload(d_k, k);
      upload(d_v, v);
      const auto n = static_cast<std::int64_t>(k.size());
      cpu.append_token(layer, {k.data(), n}, {v.data(), n});
      gpu.append_token(layer, {d_k.data(), n}, {d_v.data(), n});
      const auto [cpu_obs, gpu_obs] = obs_pair(layer, 1, q, k, probs);
      cpu_policy.on_decode(cpu, layer, cpu_obs);
      gpu_policy.on_decode(gpu, layer, gpu_obs);
      require_same_caches(cpu, gpu, layer, "after decode step " + std::to_string(step));
    }
  }
  cpu.check_invariants();
  gpu.check_invariants();
  for (std::int64_t layer = 0; layer < s.num_layers; ++layer)
    for (std::int64_t h = 0; h < s.num_kv_heads; ++h) {
      INFO("final layer " << layer << " kv_head " << h);
      require_identical(gpu.keys(layer, h), cpu.keys(layer, h), "keys");
      require_identical(gpu.values(layer, h), cpu.values(layer, h), "values");
    }
}

const CacheShape kGqaShape{2, 2, 8, 64, 320};   // G = 4
const CacheShape kMhaShape{1, 3, 3, 128, 300};  // G = 1

TEST_CASE("H2O on CUDA keeps exactly the CPU's positions when both observe the same probabilities",
          "[cuda][policy][h2o]") {
  if (!device_available()) return;
  for (const GroupAgg agg : {GroupAgg::mean, GroupAgg::max}) {
    CAPTURE(to_string(agg));
    run_parity<H2O>({kGqaShape, 256, 200, ObsKind::probs, false, 101}, H2OConfig{48, 80, agg});
    run_parity<H2O>({kMhaShape, 200, 200, ObsKind::probs, false, 102}, H2OConfig{30, 70, agg});
  }
}

TEST_CASE("H2O on CUDA keeps the CPU's positions when both score from queries (tiled prefill, per-query decode)",
          "[cuda][policy][h2o]") {
  if (!device_available()) return;
  for (const GroupAgg agg : {GroupAgg::mean, GroupAgg::sum}) {
    CAPTURE(to_string(agg));
    run_parity<H2O>({kGqaShape, 256, 200, ObsKind::queries, false, 103}, H2OConfig{48, 80, agg});
    run_parity<H2O>({kMhaShape, 200, 200, ObsKind::queries, false, 104}, H2OConfig{30, 70, agg});
  }
}

TEST_CASE("one-shot H2O (KVCache-Factory) on CUDA compresses the prompt like the CPU and then appends freely",
          "[cuda][policy][h2o]") {
  if (!device_available()) return;
  run_parity<H2O>({kGqaShape, 256, 60, ObsKind::queries, false, 105}, H2OConfig::kvcache_factory(96, 16));
}

TEST_CASE("StreamingLLM on CUDA keeps exactly the CPU's sinks and recent window", "[cuda][policy][streaming_llm]") {
  if (!device_available()) return;
  for (const bool make_room : {false, true}) {
    CAPTURE(make_room);
    run_parity<StreamingLLM>({kGqaShape, 256, 200, ObsKind::none, make_room, 106},
                             StreamingLLMConfig{4, 60, Schedule::prefill_and_every_step, std::nullopt});
  }
}

TEST_CASE("StreamingLLM with pos-shift on CUDA re-rotates keys exactly like the CPU", "[cuda][policy][streaming_llm]") {
  if (!device_available()) return;
  for (const RopeLayout layout : {RopeLayout::interleaved_pairs, RopeLayout::halves}) {
    CAPTURE(layout == RopeLayout::halves);
    run_parity<StreamingLLM>({kMhaShape, 150, 120, ObsKind::none, false, 107},
                             StreamingLLMConfig{4, 60, Schedule::prefill_and_every_step, RopeSpec{10000.0, 128, layout}});
  }
}

}  // namespace
}  // namespace kvevict::cuda_test
