// The CUDA backend's own contract: memory-space checks (DeviceError for host pointers, cache left
// unchanged), NaN/Inf detection, buffers, copies, workspace and head-count limits, and CUDA
// runtime failures surfacing as kvevict errors.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cuda_test_support.cuh"

namespace kvevict::cuda_test {
namespace {

const CacheShape kShape{2, 2, 4, 64, 96};

TEST_CASE("CUDA append rejects host sources with DeviceError and leaves the cache unchanged", "[cuda][contract]") {
  if (!device_available()) return;
  KVCache<CudaBackend> cache(kShape);
  Rng rng(5);
  const std::int64_t n = kShape.num_kv_heads * 3 * kShape.head_dim;
  const auto k = random_floats(rng, n);
  const auto v = random_floats(rng, n);
  const auto d_k = to_device(k);
  const auto d_v = to_device(v);
  cache.append(1, CudaSpan<const float>{d_k.data(), n}, CudaSpan<const float>{d_v.data(), n}, 3);
  const std::uint64_t before = cache.state_hash();
  // A host pointer smuggled in as a device span: the type system cannot see it, the backend does.
  REQUIRE_THROWS_AS(cache.append(1, CudaSpan<const float>{k.data(), n}, CudaSpan<const float>{d_v.data(), n}, 3), DeviceError);
  REQUIRE_THROWS_AS(cache.append(1, CudaSpan<const float>{d_k.data(), n}, CudaSpan<const float>{v.data(), n}, 3), DeviceError);
  float* pinned = nullptr;
  REQUIRE(cudaMallocHost(&pinned, static_cast<std::size_t>(n) * sizeof(float)) == cudaSuccess);
  REQUIRE_THROWS_AS(cache.append(1, CudaSpan<const float>{pinned, n}, CudaSpan<const float>{d_v.data(), n}, 3), DeviceError);
  REQUIRE(cudaFreeHost(pinned) == cudaSuccess);
  REQUIRE(cache.state_hash() == before);
  REQUIRE(cache.len(1, 0) == 3);
  REQUIRE(cache.next_position(1) == 3);
  // The failed pointer queries must not surface as a launch error later.
  cache.append(1, CudaSpan<const float>{d_k.data(), n}, CudaSpan<const float>{d_v.data(), n}, 3);
  REQUIRE(cache.kept_positions(1, 1) == std::vector<std::int32_t>{0, 1, 2, 3, 4, 5});
}

TEST_CASE("CUDA append accepts managed memory", "[cuda][contract]") {
  if (!device_available()) return;
  KVCache<CudaBackend> cache(kShape);
  const std::int64_t n = kShape.num_kv_heads * kShape.head_dim;
  float* managed = nullptr;
  REQUIRE(cudaMallocManaged(&managed, static_cast<std::size_t>(n) * sizeof(float)) == cudaSuccess);
  for (std::int64_t i = 0; i < n; ++i) managed[i] = static_cast<float>(i);
  cache.append_token(0, CudaSpan<const float>{managed, n}, CudaSpan<const float>{managed, n});
  const auto keys = cache.keys(0, 1);
  REQUIRE(cudaFree(managed) == cudaSuccess);
  REQUIRE(keys.size() == static_cast<std::size_t>(kShape.head_dim));
  REQUIRE(keys[0] == static_cast<float>(kShape.head_dim));  // kv-head 1's row starts at element head_dim
}

TEST_CASE("CUDA all_finite finds a NaN or an Inf anywhere and rejects host pointers", "[cuda][contract]") {
  if (!device_available()) return;
  CudaBackend backend;
  const CpuBackend cpu;
  for (const std::int64_t n : {std::int64_t{1}, std::int64_t{1000}, std::int64_t{3'000'001}}) {
    Rng rng(static_cast<std::uint64_t>(n));
    auto data = random_floats(rng, n);
    auto d = to_device(data);
    CAPTURE(n);
    REQUIRE(backend.all_finite(d.data(), n));
    const std::int64_t spots[] = {0, n / 2, n - 1};
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity()}) {
      for (const std::int64_t at : spots) {
        CAPTURE(bad, at);
        auto poisoned = data;
        poisoned[static_cast<std::size_t>(at)] = bad;
        upload(d, poisoned);
        REQUIRE_FALSE(backend.all_finite(d.data(), n));
        REQUIRE_FALSE(cpu.all_finite(poisoned.data(), n));  // the reference agrees
        if (at > 0) REQUIRE(backend.all_finite(d.data(), at));  // the prefix before it is clean
      }
    }
    upload(d, data);
    REQUIRE(backend.all_finite(d.data(), n));  // the flag is cleared between calls
  }
  const std::vector<float> host(16, 1.0f);
  REQUIRE_THROWS_AS(backend.all_finite(host.data(), 16), DeviceError);
  REQUIRE(backend.all_finite(host.data(), 0));  // nothing to read, nothing to check
}

TEST_CASE("a CUDA policy rejects non-finite or host-resident observations before touching the cache",
          "[cuda][contract]") {
  if (!device_available()) return;
  using Cache = KVCache<CudaBackend>;
  Cache cache(kShape);
  H2O<Cache> policy(cache, H2OConfig{8, 8});
  Rng rng(9);
  const std::int64_t n = kShape.num_kv_heads * 20 * kShape.head_dim;
  const auto d_k = to_device(random_floats(rng, n));
  cache.append(0, CudaSpan<const float>{d_k.data(), n}, CudaSpan<const float>{d_k.data(), n}, 20);
  auto q = random_floats(rng, kShape.num_q_heads * 20 * kShape.head_dim);
  q[17] = std::numeric_limits<float>::quiet_NaN();
  const auto d_q = to_device(q);
  const std::uint64_t before = cache.state_hash();
  const auto q_span = CudaSpan<const float>{d_q.data(), static_cast<std::int64_t>(q.size())};
  REQUIRE_THROWS_AS(policy.on_prefill(cache, 0, Observation<float, CudaSpace>::from_queries(q_span, 20)), NonFiniteError);
  const auto host_span = CudaSpan<const float>{q.data(), static_cast<std::int64_t>(q.size())};
  REQUIRE_THROWS_AS(policy.on_prefill(cache, 0, Observation<float, CudaSpace>::from_queries(host_span, 20)), DeviceError);
  REQUIRE(cache.state_hash() == before);
}

TEST_CASE("DeviceBuffer is zeroed and move-only, CudaBackend copies share the stream and own their workspace",
          "[cuda][contract]") {
  if (!device_available()) return;
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
  {
    CudaBackend backend(stream);
    REQUIRE(backend.stream() == stream);
    REQUIRE(std::string(backend.name()) == "cuda");
    auto buf = backend.allocate<std::int32_t>(1000);
    REQUIRE(buf.size() == 1000);
    std::vector<std::int32_t> host(1000, -1);
    backend.copy_to_host(buf.data(), host.data(), 1000);
    REQUIRE(host == std::vector<std::int32_t>(1000, 0));
    std::vector<std::int32_t> ramp(1000);
    for (int i = 0; i < 1000; ++i) ramp[static_cast<std::size_t>(i)] = i;
    backend.copy_from_host(ramp.data(), buf.data(), 1000);
    auto moved = std::move(buf);
    REQUIRE(buf.data() == nullptr);
    REQUIRE(buf.size() == 0);
    backend.copy_to_host(moved.data(), host.data(), 1000);
    REQUIRE(host == ramp);
    static_assert(!std::is_copy_constructible_v<CudaBackend::Buffer<float>>, "device buffers are move-only");

    // A cache built from a copy of a reserved backend works on its own workspace and stream.
    backend.reserve(kShape);
    KVCache<CudaBackend> cache(kShape, backend);
    REQUIRE(cache.backend().stream() == stream);
    const std::int64_t n = kShape.num_kv_heads * 5 * kShape.head_dim;
    Rng rng(3);
    const auto d_k = to_device(random_floats(rng, n));
    cache.append(0, CudaSpan<const float>{d_k.data(), n}, CudaSpan<const float>{d_k.data(), n}, 5);
    REQUIRE(cache.kept_positions(0, 1) == std::vector<std::int32_t>{0, 1, 2, 3, 4});
  }
  REQUIRE(cudaStreamDestroy(stream) == cudaSuccess);
}

TEST_CASE("CUDA primitives refuse layers beyond the reserved workspace or kMaxKvHeads", "[cuda][contract]") {
  if (!device_available()) return;
  const LayerCase small{2, 4, 64, 100, 0, false, 51};
  const LayerCase big{2, 4, 64, 400, 0, false, 52};
  TwinLayer t(big);
  CudaBackend backend;
  backend.reserve(small.shape());
  Rng rng(1);
  const auto d_q = to_device(random_floats(rng, big.num_q_heads * 40 * big.head_dim));
  cuda::DeviceBuffer<float> probs(big.num_q_heads * big.capacity), out(big.num_q_heads * big.head_dim),
      scores(big.num_q_heads * big.capacity);
  const std::vector<std::int64_t> fresh(2, 0);
  REQUIRE_THROWS_AS(backend.attend(t.gpu_view(), d_q.data(), 0.125f, probs.data(), out.data()), ShapeError);
  REQUIRE_THROWS_AS(
      backend.accumulate_query_column_sums(t.gpu_view(), d_q.data(), 4, 0, 0.125f, scores.data(), fresh.data()),
      ShapeError);
  backend.reserve(big.shape());  // grows: now it fits
  backend.attend(t.gpu_view(), d_q.data(), 0.125f, probs.data(), out.data());
  backend.accumulate_query_column_sums(t.gpu_view(), d_q.data(), 4, 0, 0.125f, scores.data(), fresh.data());

  const CacheShape too_many{1, CudaBackend::kMaxKvHeads + 1, CudaBackend::kMaxKvHeads + 1, 16, 8};
  CudaBackend other;
  REQUIRE_THROWS_AS(other.reserve(too_many), UnsupportedError);
}

TEST_CASE("CUDA runtime failures become CudaError naming the call", "[cuda][contract]") {
  if (!device_available()) return;
  try {
    cuda::check(cudaErrorInvalidValue, "somewhere", "a call");
    FAIL("cuda::check did not throw");
  } catch (const CudaError& e) {
    REQUIRE(e.status() == cudaErrorInvalidValue);
    REQUIRE(e.code() == ErrorCode::device_mismatch);
    REQUIRE(std::string(e.what()).find("somewhere: a call failed: cudaErrorInvalidValue") != std::string::npos);
  }
  // A real allocation failure: more bytes than any device has.
  REQUIRE_THROWS_AS(cuda::DeviceBuffer<float>(std::int64_t{1} << 50), CudaError);
  REQUIRE(cudaGetLastError() == cudaSuccess);  // nothing left behind for the next launch check
}

}  // namespace
}  // namespace kvevict::cuda_test
