// The CUDA backend's one-launch paths: evict_one (a decode step's accumulation, group score,
// victim choice and replacement in one cooperative kernel) against the CPU backend's four
// primitives, its all-or-nothing rejection of bad steps, H2O taking that path through a policy;
// and the in-place compaction kernel under the plans that make its work items wait on each
// other (long shifts, repeated calls on one backend, large capacity).
#include <algorithm>
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


// ---- attend_evict_one: the step folded into the attention's launches ----

// The message of the E that `fn` throws (a test failure when it throws nothing).
template <class E, class F>
std::string message_of(F&& fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.what();
  }
  FAIL("no exception thrown");
  return {};
}

// One layer's attention inputs and outputs on the device.
struct AttentionIo {
  AttentionIo(Rng& rng, const LayerCase& c)
      : q(to_device(random_floats(rng, c.num_q_heads * c.head_dim, -2.0f, 2.0f))),
        probs(c.num_q_heads * c.capacity),
        out(c.num_q_heads * c.head_dim),
        scale(1.0f / std::sqrt(static_cast<float>(c.head_dim))) {}
  DecodeAttention attention() { return {q.data(), scale, probs.data(), out.data()}; }
  cuda::DeviceBuffer<float> q, probs, out;
  float scale;
};

// Everything the two GPU paths may write, compared bit for bit (NaN sums as "both NaN").
void require_same_gpu_state(TwinLayer& a, TwinLayer& b, const std::vector<cuda::DeviceBuffer<float>*>& a_arrays,
                            const std::vector<cuda::DeviceBuffer<float>*>& b_arrays, const std::string& what) {
  require_identical(to_host(b.d_positions), to_host(a.d_positions), what + ": positions");
  require_identical(to_host(b.d_keys), to_host(a.d_keys), what + ": keys");
  require_identical(to_host(b.d_values), to_host(a.d_values), what + ": values");
  for (std::size_t i = 0; i < a_arrays.size(); ++i)
    require_identical(canonical_nans(to_host(*b_arrays[i])), canonical_nans(to_host(*a_arrays[i])),
                      what + ": array " + std::to_string(i));
}

TEST_CASE("attend_evict_one on CUDA equals attend followed by evict_one on CUDA, bit for bit", "[cuda][parity][fused]") {
  if (!device_available()) return;
  std::vector<LayerCase> cases = parity_cases();
  cases.push_back({2, 16, 64, 700, 0, false, 31});  // G = 8: the largest group folded into the attention
  cases.push_back({2, 8, 256, 300, 0, false, 32});  // more words per slot than one round of preloaded moves
  for (const LayerCase& c : cases) {
    if (c.empty_head) continue;  // every head must have an entry to evict
    for (const GroupAgg agg : {GroupAgg::mean, GroupAgg::max, GroupAgg::sum}) {
      for (const int mode : {0, 1, 2}) {  // 0: scores, 1: scores with NaN sums, 2: recency (no scores)
        for (const int rule_kind : {0, 1}) {
          CAPTURE(c, static_cast<int>(agg), mode, rule_kind);
          TwinLayer two(c), one(c);  // the same seed: identical layers
          CudaBackend gpu_two, gpu_one;
          gpu_two.reserve(c.shape());
          gpu_one.reserve(c.shape());
          StepData d_two(two.rng(), c, mode == 1), d_one(one.rng(), c, mode == 1);
          const ProtectRule rule = rule_kind == 0 ? ProtectRule{0, INT64_MAX}
                                                  : ProtectRule{4, std::max<std::int64_t>(5, two.max_position() - 16)};
          if (!every_head_has_victim(two, rule)) continue;
          TwinExtras e_two(two.rng(), c, {1, 2, 1, 3, 1, 2}), e_one(one.rng(), c, {1, 2, 1, 3, 1, 2});
          AttentionIo io_two(two.rng(), c), io_one(one.rng(), c);
          std::vector<SlotExtra> x_two = e_two.gpu, x_one = e_one.gpu;
          DecodeEviction s_two, s_one;
          if (mode != 2) {
            x_two.insert(x_two.begin(), SlotExtra{d_two.d_scores.data(), c.group_size()});
            x_one.insert(x_one.begin(), SlotExtra{d_one.d_scores.data(), c.group_size()});
            s_two = gpu_step(&d_two, c.capacity, agg, rule);
            s_one = gpu_step(&d_one, c.capacity, agg, rule);
            s_two.probs = io_two.probs.data();
            s_one.probs = io_one.probs.data();
          } else {
            s_two = s_one = gpu_step(nullptr, c.capacity, agg, rule);
          }
          gpu_two.attend(two.gpu_view(), io_two.q.data(), io_two.scale, io_two.probs.data(), io_two.out.data());
          gpu_two.evict_one(two.gpu_view(), s_two, x_two);
          gpu_one.attend_evict_one(one.gpu_view(), io_one.attention(), s_one, x_one);
          std::vector<cuda::DeviceBuffer<float>*> a_two{&io_two.probs, &io_two.out, &d_two.d_scores};
          std::vector<cuda::DeviceBuffer<float>*> a_one{&io_one.probs, &io_one.out, &d_one.d_scores};
          for (std::size_t i = 0; i < e_two.device.size(); ++i) {
            a_two.push_back(&e_two.device[i]);
            a_one.push_back(&e_one.device[i]);
          }
          require_same_gpu_state(two, one, a_two, a_one, "attend_evict_one");
          REQUIRE(to_host(two.d_positions) != two.positions);  // the step did evict (the host copy is the start)
        }
      }
    }
  }
}

TEST_CASE("attend_evict_one on CUDA rejects a non-finite logit, immediately or deferred, and changes nothing of the step",
          "[cuda][contract][fused]") {
  if (!device_available()) return;
  const LayerCase c{4, 16, 64, 1500, 0, false, 79};
  TwinLayer t(c);
  CudaBackend gpu;
  gpu.reserve(c.shape());
  StepData data(t.rng(), c, false);
  AttentionIo io(t.rng(), c);
  const ProtectRule rule{4, std::max<std::int64_t>(5, t.max_position() - 16)};
  const std::vector<SlotExtra> extras{SlotExtra{data.d_scores.data(), c.group_size()}};
  DecodeEviction step = gpu_step(&data, c.capacity, GroupAgg::mean, rule);
  step.probs = io.probs.data();
  const std::vector<float> q = to_host(io.q);
  for (const bool deferred : {false, true}) {
    gpu.defer_step_errors(deferred);
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      CAPTURE(deferred, bad);
      std::vector<float> bad_q = q;
      bad_q[static_cast<std::size_t>(9 * c.head_dim + 3)] = bad;  // one q-head of kv-head 2
      upload(io.q, bad_q);
      if (!deferred) {
        const std::string message = message_of<NonFiniteError>([&] { gpu.attend_evict_one(t.gpu_view(), io.attention(), step, extras); });
        CHECK_THAT(message, Catch::Matchers::Contains("'q'"));
      } else {
        REQUIRE_NOTHROW(gpu.attend_evict_one(t.gpu_view(), io.attention(), step, extras));
      }
      t.require_same_state("after the rejected step");  // no entry moved
      require_identical(to_host(data.d_scores), data.scores, "sums after the rejected step");
      if (deferred) {
        std::string message;
        try {
          gpu.check_step_errors();
        } catch (const NonFiniteError& e) {
          message = e.what();
        }
        CHECK_THAT(message, Catch::Matchers::Contains("deferred decode step") && Catch::Matchers::Contains("left out its newest entry"));
        REQUIRE_NOTHROW(gpu.check_step_errors());  // thrown once
      }
    }
  }
  // The flags hold no stale verdict: a valid step afterwards equals attend + evict_one.
  upload(io.q, q);
  TwinLayer ref(c);
  CudaBackend gpu_ref;
  gpu_ref.reserve(c.shape());
  StepData ref_data(ref.rng(), c, false);
  AttentionIo ref_io(ref.rng(), c);
  DecodeEviction ref_step = gpu_step(&ref_data, c.capacity, GroupAgg::mean, rule);
  ref_step.probs = ref_io.probs.data();
  gpu_ref.attend(ref.gpu_view(), ref_io.q.data(), ref_io.scale, ref_io.probs.data(), ref_io.out.data());
  gpu_ref.evict_one(ref.gpu_view(), ref_step, std::vector<SlotExtra>{SlotExtra{ref_data.d_scores.data(), c.group_size()}});
  gpu.attend_evict_one(t.gpu_view(), io.attention(), step, extras);
  gpu.check_step_errors();
  require_same_gpu_state(ref, t, {&ref_io.probs, &ref_io.out, &ref_data.d_scores}, {&io.probs, &io.out, &data.d_scores},
                         "a valid step after the rejections");

  // A rule protecting everything leaves no victim: nothing moves and InvariantError names the head.
  TwinLayer u(c);
  CudaBackend gpu_u;
  gpu_u.reserve(c.shape());
  AttentionIo io_u(u.rng(), c);
  DecodeEviction recency = gpu_step(nullptr, c.capacity, GroupAgg::mean, ProtectRule{INT64_MAX, INT64_MAX});
  const std::string message = message_of<InvariantError>([&] { gpu_u.attend_evict_one(u.gpu_view(), io_u.attention(), recency, {}); });
  CHECK_THAT(message, Catch::Matchers::Contains("kv_head' = 0"));
  u.require_same_state("after a step without victims");
}

TEST_CASE("H2O and StreamingLLM attend_and_decode on CUDA equal attend + on_decode step after step, deferred or not",
          "[cuda][policy][fused]") {
  if (!device_available()) return;
  using GpuCache = KVCache<CudaBackend>;
  for (const CacheShape& shape : {CacheShape{2, 2, 8, 32, 96}, CacheShape{1, 1, 16, 64, 80}}) {  // G = 4; G = 16 (two calls)
    for (const bool deferred : {false, true}) {
      for (const bool h2o : {true, false}) {
        CAPTURE(shape.num_q_heads, deferred, h2o);
        GpuCache a(shape), b(shape);
        b.backend().defer_step_errors(deferred);
        H2O<GpuCache> ha(a, H2OConfig{24, 40, GroupAgg::max}), hb(b, H2OConfig{24, 40, GroupAgg::max});
        StreamingLLM<GpuCache> sa(a, StreamingLLMConfig{4, 60}), sb(b, StreamingLLMConfig{4, 60});
        Rng rng(40 + static_cast<std::uint64_t>(shape.num_q_heads));
        const std::int64_t qn = shape.num_q_heads * shape.head_dim;
        cuda::DeviceBuffer<float> probs_a(shape.num_q_heads * shape.capacity), probs_b(shape.num_q_heads * shape.capacity);
        cuda::DeviceBuffer<float> out_a(qn), out_b(qn);
        auto push = [&](std::int64_t layer, std::int64_t tokens) {
          const auto k = to_device(random_floats(rng, shape.num_kv_heads * tokens * shape.head_dim));
          const auto v = to_device(random_floats(rng, shape.num_kv_heads * tokens * shape.head_dim));
          const auto n = k.size();
          a.append(layer, CudaSpan<const float>{k.data(), n}, CudaSpan<const float>{v.data(), n}, tokens);
          b.append(layer, CudaSpan<const float>{k.data(), n}, CudaSpan<const float>{v.data(), n}, tokens);
        };
        for (std::int64_t layer = 0; layer < shape.num_layers; ++layer) {
          push(layer, 64);
          if (h2o) {  // prefill: the prompt's last query seeds the sums
            const auto q = to_device(random_floats(rng, qn, -2.0f, 2.0f));
            a.backend().attend(a.view(layer), q.data(), 0.125f, probs_a.data(), out_a.data());
            const auto obs = Observation<float, CudaSpace>::from_probs({probs_a.data(), probs_a.size()}, 1, shape.capacity);
            ha.on_prefill(a, layer, obs);
            hb.on_prefill(b, layer, obs);
          }
        }
        for (std::int64_t step = 0; step < 30; ++step) {
          for (std::int64_t layer = 0; layer < shape.num_layers; ++layer) {
            CAPTURE(step, layer);
            push(layer, 1);
            const auto q = to_device(random_floats(rng, qn, -2.0f, 2.0f));
            const float scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
            a.backend().attend(a.view(layer), q.data(), scale, probs_a.data(), out_a.data());
            const auto obs = Observation<float, CudaSpace>::from_probs({probs_a.data(), probs_a.size()}, 1, shape.capacity);
            const CudaSpan<const float> qs{q.data(), qn};
            if (h2o) {
              ha.on_decode(a, layer, obs);
              hb.attend_and_decode(b, layer, qs, 0.0f, {probs_b.data(), probs_b.size()}, {out_b.data(), qn});
            } else {
              sa.on_decode(a, layer, Observation<float, CudaSpace>::none());
              sb.attend_and_decode(b, layer, qs, 0.0f, {probs_b.data(), probs_b.size()}, {out_b.data(), qn});
            }
            require_identical(to_host(out_b), to_host(out_a), "attention output");
            require_identical(to_host(probs_b), to_host(probs_a), "probabilities");
            for (std::int64_t h = 0; h < shape.num_kv_heads; ++h) {
              REQUIRE(b.len(layer, h) == a.len(layer, h));
              REQUIRE(b.positions(layer, h) == a.positions(layer, h));  // the same slots, not only the same set
            }
            if (h2o)
              require_identical(to_host(hb.scorer().q_head_scores(layer), shape.num_q_heads * shape.capacity),
                                to_host(ha.scorer().q_head_scores(layer), shape.num_q_heads * shape.capacity), "sums");
          }
        }
        REQUIRE(a.len(0, 0) == 64);  // the steps did evict
        REQUIRE(a.state_hash() == b.state_hash());
        REQUIRE_NOTHROW(b.backend().check_step_errors());

        // A NaN query. H2O rejects the step and changes nothing of it (deferred: the appended
        // token is the one left out, the error surfaces at check_step_errors); StreamingLLM reads
        // no probabilities and evicts as usual.
        const auto before = b.positions(0, 0);
        push(0, 1);
        auto bad = random_floats(rng, qn);
        bad[7] = std::numeric_limits<float>::quiet_NaN();
        const auto q = to_device(bad);
        const auto call = [&] {
          if (h2o)
            hb.attend_and_decode(b, 0, {q.data(), qn}, 0.0f, {probs_b.data(), probs_b.size()}, {out_b.data(), qn});
          else
            sb.attend_and_decode(b, 0, {q.data(), qn}, 0.0f, {probs_b.data(), probs_b.size()}, {out_b.data(), qn});
        };
        if (h2o && !deferred) {
          REQUIRE_THROWS_AS(call(), NonFiniteError);
          const auto after = b.positions(0, 0);
          REQUIRE(after.size() == before.size() + 1);  // the appended token is still there, nothing moved
          REQUIRE(std::equal(before.begin(), before.end(), after.begin()));
        } else if (h2o) {
          REQUIRE_NOTHROW(call());
          REQUIRE(b.positions(0, 0) == before);
          REQUIRE_THROWS_AS(b.backend().check_step_errors(), NonFiniteError);
        } else {
          REQUIRE_NOTHROW(call());
          REQUIRE(b.positions(0, 0) != before);  // the oldest unsunk entry gave its slot to the new token
          REQUIRE_NOTHROW(b.backend().check_step_errors());
        }
      }
    }
  }
}

}  // namespace
}  // namespace kvevict::cuda_test
