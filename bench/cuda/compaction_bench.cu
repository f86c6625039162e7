// Stable compaction against its physical limit. Bandwidth-bound.
// BM_CudaCompact/T/d: one layer of 8 kv-heads holding T entries each, compacted to its even slots
//   (T/2 kept; every kept slot but 0 moves): K, V and positions in place, one launch, every
//   moving row read and written once.
// BM_CudaMemcpyD2D/T/d: one cudaMemcpyAsync of the same bytes (the kept K and V rows and
//   positions), read and written once: the floor for moving them.
// BM_CudaGatherRows/T/d: a plain out-of-place gather of the same rows (one 16-byte unit per
//   thread, grid-stride, into separate buffers): what the access pattern alone costs, with no
//   ordering constraint at all (the naive implementation; in place it would be a race).
// All three report bytes processed = the kept bytes, so their bytes/s compare directly.
#include <cstdint>
#include <vector>

#include "cuda_bench_support.cuh"

namespace kvevict::cuda_bench {
namespace {

std::int64_t kept_bytes(std::int64_t t, std::int64_t d) {
  return kKvHeads * (t / 2) * (2 * d * static_cast<std::int64_t>(sizeof(float)) + static_cast<std::int64_t>(sizeof(std::int32_t)));
}

void BM_CudaCompact(benchmark::State& state) {
  if (!start(state, "bandwidth-bound")) return;
  const std::int64_t t = state.range(0), d = state.range(1);
  const CacheShape shape{1, kKvHeads, kQHeads, d, t};
  CudaBackend backend;
  backend.reserve(shape);
  BenchLayer layer(t, d, 1);  // T live entries per head; its lens stay T, so every iteration repeats the same moves
  std::vector<std::int32_t> keep(static_cast<std::size_t>(kKvHeads * t), 0);
  for (std::int64_t h = 0; h < kKvHeads; ++h)
    for (std::int64_t i = 0; i < t / 2; ++i) keep[static_cast<std::size_t>(h * t + i)] = static_cast<std::int32_t>(2 * i);
  auto d_keep = to_device(keep);
  const std::vector<std::int64_t> keep_count(kKvHeads, t / 2);
  const LayerView<float>& v = layer.view;
  time_loop(state, backend.stream(), [&] { backend.compact(v, d_keep.data(), keep_count.data(), {}); });
  state.SetBytesProcessed(state.iterations() * kept_bytes(t, d));
}

void BM_CudaMemcpyD2D(benchmark::State& state) {
  if (!start(state, "bandwidth-bound (baseline)")) return;
  const std::int64_t t = state.range(0), d = state.range(1);
  const std::int64_t bytes = kept_bytes(t, d);
  cuda::DeviceBuffer<std::uint8_t> src(bytes), dst(bytes);
  const cudaStream_t stream = nullptr;
  time_loop(state, stream, [&] {
    cuda::check(cudaMemcpyAsync(dst.data(), src.data(), static_cast<std::size_t>(bytes), cudaMemcpyDeviceToDevice, stream),
                "BM_CudaMemcpyD2D", "cudaMemcpyAsync");
  });
  state.SetBytesProcessed(state.iterations() * bytes);
}

// out[h, i] = in[h, keep[h, i]] for K and V (rows of `units` uint4) and positions.
__global__ void gather_rows_kernel(const uint4* k, const uint4* v, const std::int32_t* pos, const std::int32_t* keep,
                                   uint4* out_k, uint4* out_v, std::int32_t* out_pos, std::int64_t t, std::int64_t kept,
                                   std::int64_t units) {
  const std::int64_t total = kKvHeads * kept * units;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const std::int64_t row = e / units, u = e - row * units;
    const std::int64_t h = row / kept, i = row - h * kept;
    const std::int64_t src = h * t + keep[h * t + i], dst = h * t + i;
    out_k[dst * units + u] = k[src * units + u];
    out_v[dst * units + u] = v[src * units + u];
    if (u == 0) out_pos[dst] = pos[src];
  }
}

void BM_CudaGatherRows(benchmark::State& state) {
  if (!start(state, "bandwidth-bound (baseline)")) return;
  const std::int64_t t = state.range(0), d = state.range(1);
  BenchLayer layer(t, d, 1);
  std::vector<std::int32_t> keep(static_cast<std::size_t>(kKvHeads * t), 0);
  for (std::int64_t h = 0; h < kKvHeads; ++h)
    for (std::int64_t i = 0; i < t / 2; ++i) keep[static_cast<std::size_t>(h * t + i)] = static_cast<std::int32_t>(2 * i);
  auto d_keep = to_device(keep);
  cuda::DeviceBuffer<float> out_k(kKvHeads * t * d), out_v(kKvHeads * t * d);
  cuda::DeviceBuffer<std::int32_t> out_pos(kKvHeads * t);
  const std::int64_t units = d / 4;
  int sms = 0;
  cuda::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "BM_CudaGatherRows", "cudaDeviceGetAttribute");
  const cudaStream_t stream = nullptr;
  time_loop(state, stream, [&] {
    gather_rows_kernel<<<sms * 8, 256, 0, stream>>>(
        reinterpret_cast<const uint4*>(layer.keys.data()), reinterpret_cast<const uint4*>(layer.values.data()),
        layer.positions.data(), d_keep.data(), reinterpret_cast<uint4*>(out_k.data()), reinterpret_cast<uint4*>(out_v.data()),
        out_pos.data(), t, t / 2, units);
    cuda::check(cudaGetLastError(), "BM_CudaGatherRows", "gather_rows_kernel");
  });
  state.SetBytesProcessed(state.iterations() * kept_bytes(t, d));
}

BENCHMARK(BM_CudaCompact)->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaMemcpyD2D)->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaGatherRows)->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvevict::cuda_bench
