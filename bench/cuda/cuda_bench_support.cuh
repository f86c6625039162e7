// Shared pieces of kvevict-cuda-bench: the device check (benchmarks skip with an error where no
// GPU exists), CUDA-event timing for manual time, and seeded device data.
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "kvevict/cuda.cuh"

namespace kvevict::cuda_bench {

// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79 GiB)", or the reason no device is usable.
inline std::string device_description(bool* ok = nullptr) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    if (ok != nullptr) *ok = false;
    return std::string("no CUDA device: ") +
           (status != cudaSuccess ? cudaGetErrorString(status) : "cudaGetDeviceCount found 0 devices");
  }
  int dev = 0;
  cudaDeviceProp prop{};
  (void)cudaGetDevice(&dev);
  (void)cudaGetDeviceProperties(&prop, dev);
  if (ok != nullptr) *ok = true;
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major * 10 + prop.minor) + ", " +
         std::to_string(prop.multiProcessorCount) + " SMs, " + std::to_string(prop.totalGlobalMem >> 30) + " GiB)";
}

// Skips the benchmark (with the reason) where no device exists; otherwise labels it with the
// device and what bounds it.
inline bool start(benchmark::State& state, const char* bound) {
  bool ok = false;
  static const std::string description = device_description(&ok);
  static const bool available = ok;
  if (!available) {
    state.SkipWithError(description.c_str());
    return false;
  }
  state.SetLabel(description + "; " + bound);
  return true;
}

// Elapsed GPU time between two events on a stream, for State::SetIterationTime. stop() waits for
// the stop event, so host-side synchronisation inside the timed region is included (it is part of
// a step's latency).
class EventTimer {
 public:
  explicit EventTimer(cudaStream_t stream) : stream_(stream) {
    cuda::check(cudaEventCreate(&start_), "EventTimer", "cudaEventCreate");
    cuda::check(cudaEventCreate(&stop_), "EventTimer", "cudaEventCreate");
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  ~EventTimer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  void start() { cuda::check(cudaEventRecord(start_, stream_), "EventTimer", "cudaEventRecord"); }
  double stop_seconds() {
    cuda::check(cudaEventRecord(stop_, stream_), "EventTimer", "cudaEventRecord");
    cuda::check(cudaEventSynchronize(stop_), "EventTimer", "cudaEventSynchronize");
    float ms = 0.0f;
    cuda::check(cudaEventElapsedTime(&ms, start_, stop_), "EventTimer", "cudaEventElapsedTime");
    return static_cast<double>(ms) * 1e-3;
  }

 private:
  cudaStream_t stream_;
  cudaEvent_t start_{}, stop_{};
};

// Times `run` (queued on `stream`) once per iteration, after one warm-up call, as manual time.
// Counter host_us: the host's time inside run() (queueing, plus any wait run() does itself); near
// the manual time, the step is bound by the host, not by the GPU.
template <class Run>
void time_loop(benchmark::State& state, cudaStream_t stream, Run&& run) {
  EventTimer timer(stream);
  run();  // warm-up
  double host_seconds = 0.0;
  for (auto _ : state) {
    timer.start();
    const auto t0 = std::chrono::steady_clock::now();
    run();
    host_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(timer.stop_seconds());
  }
  state.counters["host_us"] = benchmark::Counter(host_seconds * 1e6, benchmark::Counter::kAvgIterations);
}

// n uniform floats in [lo, hi) from a fixed seed, on the device.
inline cuda::DeviceBuffer<float> random_device(std::int64_t n, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::vector<float> host(static_cast<std::size_t>(n));
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& v : host) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    v = lo + (hi - lo) * static_cast<float>(static_cast<double>(x >> 11) * 0x1.0p-53);
  }
  cuda::DeviceBuffer<float> d(n);
  cuda::check(cudaMemcpy(d.data(), host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice), "random_device",
              "cudaMemcpy");
  return d;
}

template <class T>
cuda::DeviceBuffer<T> to_device(const std::vector<T>& host) {
  cuda::DeviceBuffer<T> d(static_cast<std::int64_t>(host.size()));
  cuda::check(cudaMemcpy(d.data(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "to_device",
              "cudaMemcpy");
  return d;
}

// The shape every benchmark here uses: 8 kv-heads, GQA 4 (32 q-heads), one layer.
constexpr std::int64_t kKvHeads = 8;
constexpr std::int64_t kQHeads = 32;

// One layer: K and V [kv_head, slot, head_dim] contiguous (head_stride T * d, slot_stride d), T
// live entries per kv-head at positions 0 .. T-1. The view points into the members, so a BenchLayer
// stays where it was built.
struct BenchLayer {
  BenchLayer(std::int64_t t, std::int64_t d, std::uint64_t seed)
      : keys(random_device(kKvHeads * t * d, seed)), values(random_device(kKvHeads * t * d, seed + 1)),
        positions(to_device(iota_positions(t))), lens(static_cast<std::size_t>(kKvHeads), t) {
    view.keys = keys.data();
    view.values = values.data();
    view.head_stride = t * d;
    view.slot_stride = d;
    view.positions = positions.data();
    view.lens = lens.data();
    view.num_kv_heads = kKvHeads;
    view.num_q_heads = kQHeads;
    view.head_dim = d;
    view.capacity = t;
  }
  BenchLayer(const BenchLayer&) = delete;
  BenchLayer& operator=(const BenchLayer&) = delete;

  static std::vector<std::int32_t> iota_positions(std::int64_t t) {
    std::vector<std::int32_t> pos(static_cast<std::size_t>(kKvHeads * t));
    for (std::int64_t h = 0; h < kKvHeads; ++h)
      for (std::int64_t i = 0; i < t; ++i) pos[static_cast<std::size_t>(h * t + i)] = static_cast<std::int32_t>(i);
    return pos;
  }

  cuda::DeviceBuffer<float> keys, values;     // [kv_head, slot, head_dim]
  cuda::DeviceBuffer<std::int32_t> positions;  // [kv_head, capacity]
  std::vector<std::int64_t> lens;              // host [kv_head], T each
  LayerView<float> view;
};

}  // namespace kvevict::cuda_bench
