// The CUDA backend's one-launch paths: evict_one (a decode step's accumulation, group score,
// victim choice and replacement in one cooperative kernel) against the CPU backend's four
// primitives, its all-or-nothing rejection of bad steps, H2O taking that path through a policy;
// and the in-place compaction kernel under the plans that make its work items wait on each
// other (long shifts, repeated calls on one backend, large capacity).
#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_support.cuh"

namespace kvevict::cuda_test {
namespace {

// Per-q-head running sums and one row of step probabilities for a layer, on both sides.
struct StepData {
  StepData(Rng& rng, const LayerCase& c, bool nan_scores) {
    const std::int64_t n = c.num_q_heads * c.capacity;
    scores = random_floats(rng, n, 0.0f, 4.0f);
    if (nan_scores)  // NaN sums exercise select_victims' first-unprotected-slot rule
      for (std::size_t i = 0; i < scores.size(); i += 7) scores[i] = std::numeric_limits<float>::quiet_NaN();
    probs = random_floats(rng, n, 0.0f, 1.0f);
    for (std::int64_t h = 0; h < c.num_kv_heads; ++h) fresh.push_back(rng.uniform_int(0, c.capacity));
    d_scores = to_device(scores);
    d_probs = to_device(probs);
  }
  std::vector<float> scores, probs;
  std::vector<std::int64_t> fresh;
  cuda::DeviceBuffer<float> d_scores, d_probs;
};

// NaN sums compare as "both NaN": the NaN payload an addition returns is not specified.
std::vector<float> canonical_nans(std::vector<float> v) {
  for (auto& x : v)
    if (std::isnan(x)) x = std::numeric_limits<float>::quiet_NaN();
  return v;
}

// The CPU's step-by-step reference of evict_one.
void cpu_step(CpuBackend& cpu, TwinLayer& t, StepData* data, GroupAgg agg, ProtectRule rule, std::span<const SlotExtra> extras) {
  const LayerCase& c = t.spec();
  std::vector<float> kv(static_cast<std::size_t>(c.num_kv_heads * c.capacity), 0.0f);
  std::vector<std::int32_t> victims(static_cast<std::size_t>(c.num_kv_heads), -1);
  const float* kv_scores = nullptr;
  if (data != nullptr) {
    cpu.accumulate_column_sums(t.cpu_view(), data->probs.data(), 1, c.capacity, data->scores.data(), data->fresh.data());
    cpu.group_reduce(t.cpu_view(), data->scores.data(), kv.data(), agg);
    kv_scores = kv.data();
  }
  cpu.select_victims(t.cpu_view(), kv_scores, rule, victims.data());
  cpu.replace_with_last(t.cpu_view(), victims.data(), extras);
}

// True when every head holds an entry the rule leaves unprotected (evict_one's precondition).
bool every_head_has_victim(const TwinLayer& t, const ProtectRule& rule) {
  const LayerCase& c = t.spec();
  for (std::int64_t h = 0; h < c.num_kv_heads; ++h) {
    bool found = false;
    for (std::int64_t s = 0; s < t.lens[static_cast<std::size_t>(h)] && !found; ++s)
      found = !rule.protects(t.positions[static_cast<std::size_t>(h * c.capacity + s)]);
    if (!found) return false;
  }
  return true;
}

DecodeEviction gpu_step(StepData* data, std::int64_t stride, GroupAgg agg, ProtectRule rule) {
  DecodeEviction step;
  if (data != nullptr) {
    step.probs = data->d_probs.data();
    step.probs_stride = stride;
    step.q_scores = data->d_scores.data();
    step.fresh_from = data->fresh.data();
  }
  step.agg = agg;
  step.rule = rule;
  return step;
}

TEST_CASE("evict_one on CUDA equals accumulate + group_reduce + select_victims + replace_with_last on the CPU",
          "[cuda][parity][fused]") {
  if (!device_available()) return;
  for (const LayerCase& c : parity_cases()) {
    if (c.empty_head) continue;  // every head must have an entry to evict
    for (const GroupAgg agg : {GroupAgg::mean, GroupAgg::max, GroupAgg::sum}) {
      for (const int mode : {0, 1, 2}) {  // 0: scores, 1: scores with NaN sums, 2: recency (no scores)
        for (const int rule_kind : {0, 1}) {
          CAPTURE(c, static_cast<int>(agg), mode, rule_kind);
          TwinLayer t(c);
          BackendPair b(c.shape());
          StepData data(t.rng(), c, mode == 1);
          const ProtectRule rule = rule_kind == 0 ? ProtectRule{0, INT64_MAX}
                                                  : ProtectRule{4, std::max<std::int64_t>(5, t.max_position() - 16)};
          if (!every_head_has_victim(t, rule)) continue;  // the rejection has its own test
          // The policy's extras (the q-head sums) plus six more arrays: the last ones leave the
          // cooperative kernel's first group and take the plain replacement kernel.
          TwinExtras extras(t.rng(), c, {1, 2, 1, 3, 1, 2});
          std::vector<SlotExtra> cpu_extras = extras.cpu, gpu_extras = extras.gpu;
          StepData* d = mode == 2 ? nullptr : &data;
          if (d != nullptr) {
            cpu_extras.insert(cpu_extras.begin(), SlotExtra{data.scores.data(), c.group_size()});
            gpu_extras.insert(gpu_extras.begin(), SlotExtra{data.d_scores.data(), c.group_size()});
          }
          cpu_step(b.cpu, t, d, agg, rule, cpu_extras);
          b.gpu.evict_one(t.gpu_view(), gpu_step(d, c.capacity, agg, rule), gpu_extras);
          t.require_same_state("evict_one");
          extras.require_same("evict_one extras");
          if (d != nullptr)
            require_identical(canonical_nans(to_host(data.d_scores)), canonical_nans(data.scores), "evict_one q-head sums");
        }
      }
    }
  }
}

TEST_CASE("evict_one on CUDA rejects a non-finite probability or an all-protected head and changes nothing",
          "[cuda][contract][fused]") {
  if (!device_available()) return;
  const LayerCase c{4, 8, 64, 3000, 0, false, 77};
  TwinLayer t(c);
  BackendPair b(c.shape());
  StepData data(t.rng(), c, false);
  const std::vector<float> scores_before = data.scores;
  const ProtectRule rule{4, std::max<std::int64_t>(5, t.max_position() - 16)};
  // A NaN or Inf anywhere in [q_head, stride], past a head's live slots included.
  for (const std::int64_t at : {std::int64_t{0}, c.num_q_heads * c.capacity - 1, 5 * c.capacity + t.lens[2] + 1}) {
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
      CAPTURE(at, bad);
      std::vector<float> probs = data.probs;
      probs[static_cast<std::size_t>(std::min(at, c.num_q_heads * c.capacity - 1))] = bad;
      upload(data.d_probs, probs);
      REQUIRE_THROWS_AS(b.gpu.evict_one(t.gpu_view(), gpu_step(&data, c.capacity, GroupAgg::mean, rule),
                                        std::vector<SlotExtra>{SlotExtra{data.d_scores.data(), c.group_size()}}),
                        NonFiniteError);
      require_identical(to_host(data.d_scores), scores_before, "sums after the rejected step");
      require_identical(to_host(t.d_positions), t.positions, "positions after the rejected step");
      require_identical(to_host(t.d_keys), t.keys, "keys after the rejected step");
    }
  }
  upload(data.d_probs, data.probs);
  // Everything protected in every head: no victim anywhere.
  REQUIRE_THROWS_AS(b.gpu.evict_one(t.gpu_view(), gpu_step(&data, c.capacity, GroupAgg::mean, ProtectRule{INT64_MAX, INT64_MAX}),
                                    std::vector<SlotExtra>{}),
                    InvariantError);
  require_identical(to_host(data.d_scores), scores_before, "sums after the all-protected step");
  t.require_same_state("unchanged: the CPU side never moved");
  // The verdict flags were reset: the same backend then runs a valid step exactly.
  std::vector<SlotExtra> cpu_extras{SlotExtra{data.scores.data(), c.group_size()}};
  std::vector<SlotExtra> gpu_extras{SlotExtra{data.d_scores.data(), c.group_size()}};
  cpu_step(b.cpu, t, &data, GroupAgg::mean, rule, cpu_extras);
  b.gpu.evict_one(t.gpu_view(), gpu_step(&data, c.capacity, GroupAgg::mean, rule), gpu_extras);
  t.require_same_state("valid step after rejections");
  require_identical(to_host(data.d_scores), data.scores, "sums after the valid step");
}

TEST_CASE("evict_one with deferred verdicts: valid steps match the CPU, a rejected step changes nothing and throws once, "
          "later",
          "[cuda][contract][fused]") {
  if (!device_available()) return;
  const LayerCase c{4, 8, 64, 3000, 0, false, 78};
  TwinLayer t(c);
  BackendPair b(c.shape());
  b.gpu.defer_step_errors(true);
  REQUIRE(b.gpu.defers_step_errors());
  StepData data(t.rng(), c, false);
  const ProtectRule rule{4, std::max<std::int64_t>(5, t.max_position() - 16)};
  std::vector<SlotExtra> cpu_extras{SlotExtra{data.scores.data(), c.group_size()}};
  std::vector<SlotExtra> gpu_extras{SlotExtra{data.d_scores.data(), c.group_size()}};
  auto valid_step = [&](const char* what) {
    cpu_step(b.cpu, t, &data, GroupAgg::mean, rule, cpu_extras);
    b.gpu.evict_one(t.gpu_view(), gpu_step(&data, c.capacity, GroupAgg::mean, rule), gpu_extras);
    t.require_same_state(what);
    require_identical(to_host(data.d_scores), data.scores, what);
  };
  valid_step("first deferred step");
  REQUIRE_NOTHROW(b.gpu.check_step_errors());

  // A NaN step: no throw when queued; nothing changes; the error waits for the host.
  const std::vector<float> scores_before = data.scores;
  std::vector<float> probs = data.probs;
  probs[17] = std::numeric_limits<float>::quiet_NaN();
  upload(data.d_probs, probs);
  REQUIRE_NOTHROW(b.gpu.evict_one(t.gpu_view(), gpu_step(&data, c.capacity, GroupAgg::mean, rule), gpu_extras));
  t.require_same_state("after the rejected deferred step");
  require_identical(to_host(data.d_scores), scores_before, "sums after the rejected deferred step");
  std::string message;
  try {
    b.gpu.check_step_errors();
  } catch (const NonFiniteError& e) {
    message = e.what();
  }
  CHECK_THAT(message, Catch::Matchers::Contains("deferred decode step 2") && Catch::Matchers::Contains("left out its newest entry"));
  REQUIRE_NOTHROW(b.gpu.check_step_errors());  // thrown once

  // An all-protected step, then the next evict_one reports it (its kernel has finished by then)
  // and does nothing itself.
  upload(data.d_probs, data.probs);
  REQUIRE_NOTHROW(b.gpu.evict_one(t.gpu_view(), gpu_step(&data, c.capacity, GroupAgg::mean, ProtectRule{INT64_MAX, INT64_MAX}),
                                  gpu_extras));
  REQUIRE(cudaStreamSynchronize(b.gpu.stream()) == cudaSuccess);
  REQUIRE_THROWS_AS(b.gpu.evict_one(t.gpu_view(), gpu_step(&data, c.capacity, GroupAgg::mean, rule), gpu_extras), InvariantError);
  t.require_same_state("after the reported step");
  require_identical(to_host(data.d_scores), scores_before, "sums after the reported step");
  valid_step("a valid deferred step after the errors");
  b.gpu.defer_step_errors(false);
  valid_step("back to immediate verdicts");
}

TEST_CASE("H2O on CUDA with deferred verdicts: a NaN step leaves out the appended token and the error surfaces at "
          "check_step_errors",
          "[cuda][policy][fused]") {
  if (!device_available()) return;
  using GpuCache = KVCache<CudaBackend>;
  const CacheShape shape{1, 2, 8, 32, 96};
  GpuCache gpu(shape);
  gpu.backend().defer_step_errors(true);
  H2O<GpuCache> policy(gpu, H2OConfig{24, 40});
  Rng rng(6);
  auto push = [&](std::int64_t tokens) {
    const auto k = to_device(random_floats(rng, shape.num_kv_heads * tokens * shape.head_dim));
    const auto n = k.size();
    gpu.append(0, CudaSpan<const float>{k.data(), n}, CudaSpan<const float>{k.data(), n}, tokens);
  };
  auto probs_row = [&](std::int64_t len, bool nan) {
    std::vector<float> p(static_cast<std::size_t>(shape.num_q_heads * shape.capacity), 0.0f);
    for (std::int64_t qh = 0; qh < shape.num_q_heads; ++qh)
      for (std::int64_t j = 0; j < len; ++j) p[static_cast<std::size_t>(qh * shape.capacity + j)] = rng.uniform(0.0f, 2.0f / static_cast<float>(len));
    if (nan) p[5] = std::numeric_limits<float>::quiet_NaN();
    return to_device(p);
  };
  push(64);
  {
    const auto dp = probs_row(64, false);
    policy.on_prefill(gpu, 0, Observation<float, CudaSpace>::from_probs({dp.data(), dp.size()}, 1, shape.capacity));
  }
  for (std::int64_t step = 0; step < 12; ++step) {
    CAPTURE(step);
    const auto before = gpu.kept_positions(0, 0);
    const auto scores_before = to_host(policy.scorer().q_head_scores(0), shape.num_q_heads * shape.capacity);
    push(1);
    const auto dp = probs_row(gpu.len(0, 0), step == 7);
    REQUIRE_NOTHROW(policy.on_decode(gpu, 0, Observation<float, CudaSpace>::from_probs({dp.data(), dp.size()}, 1, shape.capacity)));
    for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) REQUIRE(gpu.len(0, h) == 64);
    if (step == 7) {
      REQUIRE(gpu.kept_positions(0, 0) == before);  // the token appended for the step is the one left out
      const auto scores_after = to_host(policy.scorer().q_head_scores(0), shape.num_q_heads * shape.capacity);
      for (std::int64_t qh = 0; qh < shape.num_q_heads; ++qh)  // live slots keep their sums
        for (std::int64_t j = 0; j < 64; ++j) {
          const auto i = static_cast<std::size_t>(qh * shape.capacity + j);
          REQUIRE(std::memcmp(&scores_after[i], &scores_before[i], sizeof(float)) == 0);
        }
      REQUIRE_THROWS_AS(gpu.backend().check_step_errors(), NonFiniteError);
    } else {
      REQUIRE(gpu.kept_positions(0, 0) != before);  // a valid step keeps the new token or evicted an old one
    }
  }
  REQUIRE_NOTHROW(gpu.backend().check_step_errors());
}

TEST_CASE("H2O on CUDA takes the fused decode step: a NaN step throws and changes nothing, later steps match the CPU",
          "[cuda][policy][fused]") {
  if (!device_available()) return;
  using CpuCache = KVCache<CpuBackend>;
  using GpuCache = KVCache<CudaBackend>;
  const CacheShape shape{1, 2, 8, 32, 96};
  CpuCache cpu(shape);
  GpuCache gpu(shape);
  H2O<CpuCache> cpu_policy(cpu, H2OConfig{24, 40});
  H2O<GpuCache> gpu_policy(gpu, H2OConfig{24, 40});
  Rng rng(5);
  const std::int64_t prompt = 64;
  auto push = [&](std::int64_t tokens) {
    const auto k = random_floats(rng, shape.num_kv_heads * tokens * shape.head_dim);
    const auto v = random_floats(rng, shape.num_kv_heads * tokens * shape.head_dim);
    const auto dk = to_device(k), dv = to_device(v);
    const auto n = static_cast<std::int64_t>(k.size());
    cpu.append(0, {k.data(), n}, {v.data(), n}, tokens);
    gpu.append(0, CudaSpan<const float>{dk.data(), n}, CudaSpan<const float>{dv.data(), n}, tokens);
  };
  auto probs_row = [&](std::int64_t len) {  // one softmax-like row per q-head over `len` slots
    std::vector<float> p(static_cast<std::size_t>(shape.num_q_heads * shape.capacity), 0.0f);
    for (std::int64_t qh = 0; qh < shape.num_q_heads; ++qh)
      for (std::int64_t j = 0; j < len; ++j) p[static_cast<std::size_t>(qh * shape.capacity + j)] = rng.uniform(0.0f, 2.0f / static_cast<float>(len));
    return p;
  };
  push(prompt);
  {
    const auto p = probs_row(prompt);  // prefill: one observed row is enough to seed the sums
    const auto dp = to_device(p);
    cpu_policy.on_prefill(cpu, 0, Observation<float, HostSpace>::from_probs({p.data(), static_cast<std::int64_t>(p.size())}, 1, shape.capacity));
    gpu_policy.on_prefill(gpu, 0, Observation<float, CudaSpace>::from_probs({dp.data(), dp.size()}, 1, shape.capacity));
  }
  for (std::int64_t step = 0; step < 40; ++step) {
    CAPTURE(step);
    push(1);
    auto p = probs_row(cpu.len(0, 0));
    if (step == 10) {  // a bad step: both reject it and stay as they were
      p[3] = std::numeric_limits<float>::quiet_NaN();
      const auto dp = to_device(p);
      const std::uint64_t before = gpu.state_hash();
      const auto scores_before = to_host(gpu_policy.scorer().q_head_scores(0), shape.num_q_heads * shape.capacity);
      REQUIRE_THROWS_AS(gpu_policy.on_decode(gpu, 0, Observation<float, CudaSpace>::from_probs({dp.data(), dp.size()}, 1, shape.capacity)),
                        NonFiniteError);
      REQUIRE_THROWS_AS(cpu_policy.on_decode(cpu, 0, Observation<float, HostSpace>::from_probs({p.data(), static_cast<std::int64_t>(p.size())}, 1, shape.capacity)),
                        NonFiniteError);
      REQUIRE(gpu.state_hash() == before);
      require_identical(to_host(gpu_policy.scorer().q_head_scores(0), shape.num_q_heads * shape.capacity), scores_before,
                        "sums after the rejected step");
      p[3] = 0.25f;
    }
    const auto dp = to_device(p);
    cpu_policy.on_decode(cpu, 0, Observation<float, HostSpace>::from_probs({p.data(), static_cast<std::int64_t>(p.size())}, 1, shape.capacity));
    gpu_policy.on_decode(gpu, 0, Observation<float, CudaSpace>::from_probs({dp.data(), dp.size()}, 1, shape.capacity));
    for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) {
      REQUIRE(gpu.len(0, h) == 64);
      REQUIRE(gpu.positions(0, h) == cpu.positions(0, h));  // same slots, not only the same set
    }
  }
}

TEST_CASE("KVCache::apply(DecodeEviction) rejects missing sums, a short stride, an empty head and host probabilities, changing nothing",
          "[cuda][contract][fused]") {
  if (!device_available()) return;
  using GpuCache = KVCache<CudaBackend>;
  const CacheShape shape{1, 2, 4, 16, 40};
  GpuCache cache(shape);
  Rng rng(21);
  const std::int64_t n = shape.num_kv_heads * 20 * shape.head_dim;
  const auto k = to_device(random_floats(rng, n));
  cache.append(0, CudaSpan<const float>{k.data(), n}, CudaSpan<const float>{k.data(), n}, 20);
  const auto probs = to_device(random_floats(rng, shape.num_q_heads * shape.capacity, 0.0f, 0.05f));
  auto scores = to_device(std::vector<float>(static_cast<std::size_t>(shape.num_q_heads * shape.capacity), 0.0f));
  const std::vector<std::int64_t> fresh(static_cast<std::size_t>(shape.num_kv_heads), 0);
  DecodeEviction good;
  good.probs = probs.data();
  good.probs_stride = shape.capacity;
  good.q_scores = scores.data();
  good.fresh_from = fresh.data();
  const std::uint64_t before = cache.state_hash();

  DecodeEviction no_scores = good;
  no_scores.q_scores = nullptr;
  REQUIRE_THROWS_AS(cache.apply(0, no_scores), ArgumentError);
  DecodeEviction short_stride = good;
  short_stride.probs_stride = 19;  // the heads hold 20 entries
  REQUIRE_THROWS_AS(cache.apply(0, short_stride), ShapeError);
  const std::vector<float> host_probs(static_cast<std::size_t>(shape.num_q_heads * shape.capacity), 0.01f);
  DecodeEviction host = good;
  host.probs = host_probs.data();
  REQUIRE_THROWS_AS(cache.apply(0, host), DeviceError);
  REQUIRE(cache.state_hash() == before);
  for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) REQUIRE(cache.len(0, h) == 20);
  require_identical(to_host(scores), std::vector<float>(static_cast<std::size_t>(shape.num_q_heads * shape.capacity), 0.0f),
                    "sums after the rejected calls");

  cache.apply(0, good);  // the valid step goes through: one entry fewer per head
  for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) REQUIRE(cache.len(0, h) == 19);

  GpuCache empty(shape);  // nothing appended: no entry to evict
  REQUIRE_THROWS_AS(empty.apply(0, DecodeEviction{}), EmptyCacheError);
}

TEST_CASE("compact on CUDA stays exact when work items wait on each other, over repeated calls on one backend",
          "[cuda][parity][move]") {
  if (!device_available()) return;
  const std::int64_t cap = small_run() ? 4096 : 32768;
  for (const std::int64_t d : {std::int64_t{64}, std::int64_t{128}}) {
    const LayerCase c{4, 16, d, cap, 0, false, static_cast<std::uint64_t>(90 + d)};
    TwinLayer t(c);
    for (auto& n : t.lens) n = cap;  // full heads: every plan below moves long stretches
    BackendPair b(c.shape());
    TwinExtras extras(t.rng(), c, {c.group_size()});
    for (int round = 0; round < 4; ++round) {  // the same backend: tickets and epochs roll over
      CAPTURE(d, round);
      std::vector<std::int64_t> keep_count;
      std::vector<std::int32_t> keep(static_cast<std::size_t>(c.num_kv_heads * c.capacity), 0);
      for (std::int64_t h = 0; h < c.num_kv_heads; ++h) {
        const std::int64_t n = t.lens[static_cast<std::size_t>(h)];
        std::vector<std::int32_t> slots;
        const std::int64_t pattern = (h + round) % 4;
        for (std::int64_t s = 0; s < n; ++s) {
          const bool kept = pattern == 0   ? s != 3                      // drop one early slot: everything shifts by one
                            : pattern == 1 ? s % 2 == 0                  // every other slot
                            : pattern == 2 ? t.rng().uniform_int(0, 2) != 0  // a random two thirds
                                           : s >= n / 3;                 // a long prefix dropped
          if (kept) slots.push_back(static_cast<std::int32_t>(s));
        }
        keep_count.push_back(static_cast<std::int64_t>(slots.size()));
        std::copy(slots.begin(), slots.end(), keep.begin() + h * c.capacity);
      }
      const auto d_keep = to_device(keep);
      b.cpu.compact(t.cpu_view(), keep.data(), keep_count.data(), extras.cpu);
      b.gpu.compact(t.gpu_view(), d_keep.data(), keep_count.data(), extras.gpu);
      t.require_same_state("compact round " + std::to_string(round));
      extras.require_same("compact round " + std::to_string(round));
      for (std::int64_t h = 0; h < c.num_kv_heads; ++h) t.lens[static_cast<std::size_t>(h)] = keep_count[static_cast<std::size_t>(h)];
    }
  }
}

}  // namespace
}  // namespace kvevict::cuda_test
