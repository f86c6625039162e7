// Shared pieces of kvevict-cuda-tests: the device check that turns every test into a visible
// skip on machines without a GPU, a seeded RNG, host<->device copies, a layer mirrored on the
// CPU and the GPU, and exact / tolerance comparisons that report the first differences.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "kvevict/cuda.cuh"

namespace kvevict::cuda_test {

// True when a CUDA device is usable. Otherwise WARNs "SKIPPED: no CUDA device: <reason>" so the
// calling test returns (passing) and the skip shows in the output.
inline bool device_available() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaSuccess && count > 0) return true;
  (void)cudaGetLastError();
  const std::string reason = status != cudaSuccess
                                 ? std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")"
                                 : std::string("cudaGetDeviceCount found 0 devices");
  WARN("SKIPPED: no CUDA device: " << reason);
  return false;
}

// KVEVICT_CUDA_TEST_SMALL=1 (set for compute-sanitizer runs) drops the large shapes and shortens
// the decode loops; every kernel still runs.
inline bool small_run() {
  const char* v = std::getenv("KVEVICT_CUDA_TEST_SMALL");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

// splitmix64 stream: portable, so a seed names the same case everywhere.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed * 0x9e3779b97f4a7c15ull + 0x6b7665766963745full) {}
  std::uint64_t next() {
    std::uint64_t x = (state_ += 0x9e3779b97f4a7c15ull);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  }
  std::int64_t uniform_int(std::int64_t lo, std::int64_t hi) {  // inclusive
    return lo + static_cast<std::int64_t>(next() % static_cast<std::uint64_t>(hi - lo + 1));
  }
  float uniform(float lo, float hi) {
    return lo + (hi - lo) * static_cast<float>(static_cast<double>(next() >> 11) * 0x1.0p-53);
  }
  template <class T>
  void shuffle(std::vector<T>& v) {
    for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[static_cast<std::size_t>(next() % i)]);
  }

 private:
  std::uint64_t state_;
};

inline std::vector<float> random_floats(Rng& rng, std::int64_t n, float lo = -1.0f, float hi = 1.0f) {
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = rng.uniform(lo, hi);
  return v;
}

template <class T>
cuda::DeviceBuffer<T> to_device(const std::vector<T>& host) {
  cuda::DeviceBuffer<T> d(static_cast<std::int64_t>(host.size()));
  if (!host.empty())
    cuda::check(cudaMemcpy(d.data(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "test", "cudaMemcpy");
  return d;
}

template <class T>
std::vector<T> to_host(const T* device, std::int64_t n) {
  std::vector<T> h(static_cast<std::size_t>(n));
  if (n > 0)
    cuda::check(cudaMemcpy(h.data(), device, h.size() * sizeof(T), cudaMemcpyDeviceToHost), "test", "cudaMemcpy");
  return h;
}
template <class T>
std::vector<T> to_host(const cuda::DeviceBuffer<T>& d) {
  return to_host(d.data(), d.size());
}

template <class T>
void upload(cuda::DeviceBuffer<T>& d, const std::vector<T>& host) {
  REQUIRE(static_cast<std::int64_t>(host.size()) <= d.size());
  if (!host.empty())
    cuda::check(cudaMemcpy(d.data(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "test", "cudaMemcpy");
}

// Bitwise equality, reporting the first differences (floats compare as bits: +0 != -0).
template <class T>
void require_identical(const std::vector<T>& gpu, const std::vector<T>& cpu, const std::string& what) {
  REQUIRE(gpu.size() == cpu.size());
  std::size_t bad = 0;
  std::ostringstream first;
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    if (std::memcmp(&gpu[i], &cpu[i], sizeof(T)) == 0) continue;
    if (bad < 5) first << "  [" << i << "] cuda " << gpu[i] << " cpu " << cpu[i] << "\n";
    ++bad;
  }
  INFO(what << ": " << bad << " of " << gpu.size() << " elements differ\n" << first.str());
  REQUIRE(bad == 0);
}

// |gpu - cpu| <= abs_tol + rel_tol * |cpu| (the brief's 1e-6 absolute / 1e-5 relative); non-finite
// values must match exactly.
inline void require_close(const std::vector<float>& gpu, const std::vector<float>& cpu, const std::string& what,
                          double rel_tol = 1e-5, double abs_tol = 1e-6) {
  REQUIRE(gpu.size() == cpu.size());
  std::size_t bad = 0;
  double worst = 0.0;
  std::ostringstream first;
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    const double g = gpu[i], c = cpu[i];
    bool ok;
    if (!std::isfinite(g) || !std::isfinite(c))
      ok = (std::isnan(g) && std::isnan(c)) || g == c;
    else
      ok = std::abs(g - c) <= abs_tol + rel_tol * std::abs(c);
    if (std::isfinite(g) && std::isfinite(c)) worst = std::max(worst, std::abs(g - c) / (abs_tol + rel_tol * std::abs(c)));
    if (ok) continue;
    if (bad < 5) first << "  [" << i << "] cuda " << gpu[i] << " cpu " << cpu[i] << "\n";
    ++bad;
  }
  INFO(what << ": " << bad << " of " << gpu.size() << " elements outside tolerance (worst error / tolerance = " << worst
            << ")\n"
            << first.str());
  REQUIRE(bad == 0);
}

// The shape of one mirrored layer.
struct LayerCase {
  std::int64_t num_kv_heads = 2;
  std::int64_t num_q_heads = 2;
  std::int64_t head_dim = 64;
  std::int64_t capacity = 128;
  std::int64_t slot_pad = 0;   // slot_stride = head_dim + slot_pad (an engine's padded rows)
  bool empty_head = false;     // the last kv-head holds no entry
  std::uint64_t seed = 1;

  [[nodiscard]] CacheShape shape() const { return {1, num_kv_heads, num_q_heads, head_dim, capacity}; }
  [[nodiscard]] std::int64_t group_size() const { return num_q_heads / num_kv_heads; }
};

inline std::ostream& operator<<(std::ostream& os, const LayerCase& c) {
  return os << "{kv_heads " << c.num_kv_heads << ", q_heads " << c.num_q_heads << ", head_dim " << c.head_dim
            << ", capacity " << c.capacity << ", slot_pad " << c.slot_pad << ", empty_head " << c.empty_head << ", seed "
            << c.seed << "}";
}

// The parity sweep: GQA groups 1/2/4 (and 12, two q-head batches), head_dim 64/128 (and 80),
// padded slots, lengths differing per head, capacity up to 8k.
inline std::vector<LayerCase> parity_cases() {
  std::vector<LayerCase> cases = {
      {2, 2, 64, 300, 0, false, 11},    // G = 1
      {2, 4, 128, 1000, 3, false, 12},  // G = 2, padded slots
      {4, 16, 64, 2048, 0, false, 13},  // G = 4
      {1, 12, 80, 257, 1, false, 14},   // G = 12, head_dim not a multiple of 16
      {3, 3, 64, 129, 0, true, 15},     // an empty head
  };
  if (!small_run()) cases.push_back({2, 8, 128, 8192, 0, false, 16});  // G = 4, capacity 8k
  return cases;
}

// One layer held twice: host arrays the CPU backend works on, device copies the CUDA backend works
// on. Live slots get random distinct positions in random slot order (slot order carries no
// meaning); dead slots hold random data too, so a stray write shows up as a difference.
class TwinLayer {
 public:
  explicit TwinLayer(const LayerCase& c) : case_(c), rng_(c.seed) {
    slot_stride_ = c.head_dim + c.slot_pad;
    head_stride_ = c.capacity * slot_stride_ + c.slot_pad;  // padded heads too
    keys = random_floats(rng_, c.num_kv_heads * head_stride_);
    values = random_floats(rng_, c.num_kv_heads * head_stride_);
    positions.assign(static_cast<std::size_t>(c.num_kv_heads * c.capacity), 0);
    lens.assign(static_cast<std::size_t>(c.num_kv_heads), 0);
    for (std::int64_t h = 0; h < c.num_kv_heads; ++h) {
      std::int64_t n = h == 0 ? c.capacity : rng_.uniform_int(1, c.capacity);
      if (c.empty_head && h == c.num_kv_heads - 1) n = 0;
      lens[static_cast<std::size_t>(h)] = n;
      // n distinct positions out of [0, n + gaps), in random slot order.
      const std::int64_t span = n + rng_.uniform_int(0, n);
      std::vector<std::int32_t> all(static_cast<std::size_t>(span));
      std::iota(all.begin(), all.end(), 0);
      rng_.shuffle(all);
      for (std::int64_t s = 0; s < c.capacity; ++s)
        positions[static_cast<std::size_t>(h * c.capacity + s)] =
            s < n ? all[static_cast<std::size_t>(s)] : static_cast<std::int32_t>(rng_.uniform_int(0, 1 << 20));
    }
    d_keys = to_device(keys);
    d_values = to_device(values);
    d_positions = to_device(positions);
  }

  [[nodiscard]] const LayerCase& spec() const { return case_; }
  [[nodiscard]] Rng& rng() { return rng_; }
  [[nodiscard]] std::int64_t max_position() const {
    std::int32_t m = 0;
    for (std::int64_t h = 0; h < case_.num_kv_heads; ++h)
      for (std::int64_t s = 0; s < lens[static_cast<std::size_t>(h)]; ++s)
        m = std::max(m, positions[static_cast<std::size_t>(h * case_.capacity + s)]);
    return m;
  }

  [[nodiscard]] LayerView<float> cpu_view() { return view(keys.data(), values.data(), positions.data()); }
  [[nodiscard]] LayerView<float> gpu_view() { return view(d_keys.data(), d_values.data(), d_positions.data()); }

  // K, V and positions of both sides, compared bit for bit over every slot (live or not).
  void require_same_state(const std::string& what) {
    require_identical(to_host(d_positions), positions, what + ": positions");
    require_identical(to_host(d_keys), keys, what + ": keys");
    require_identical(to_host(d_values), values, what + ": values");
  }

  std::vector<float> keys, values;         // [kv_head, head_stride]
  std::vector<std::int32_t> positions;     // [kv_head, capacity]
  std::vector<std::int64_t> lens;          // [kv_head], host (shared by both views)
  cuda::DeviceBuffer<float> d_keys, d_values;
  cuda::DeviceBuffer<std::int32_t> d_positions;

 private:
  LayerView<float> view(float* k, float* v, std::int32_t* pos) {
    LayerView<float> lv;
    lv.keys = k;
    lv.values = v;
    lv.head_stride = head_stride_;
    lv.slot_stride = slot_stride_;
    lv.positions = pos;
    lv.lens = lens.data();
    lv.num_kv_heads = case_.num_kv_heads;
    lv.num_q_heads = case_.num_q_heads;
    lv.head_dim = case_.head_dim;
    lv.capacity = case_.capacity;
    return lv;
  }

  LayerCase case_;
  Rng rng_;
  std::int64_t slot_stride_ = 0, head_stride_ = 0;
};

// A CpuBackend and a CudaBackend reserved for the same shape.
struct BackendPair {
  explicit BackendPair(const CacheShape& shape) {
    cpu.reserve(shape);
    gpu.reserve(shape);
  }
  CpuBackend cpu;
  CudaBackend gpu;
};

// Extras (per-entry policy state) mirrored on both sides.
struct TwinExtras {
  TwinExtras(Rng& rng, const LayerCase& c, const std::vector<std::int64_t>& rows) {
    for (const std::int64_t r : rows) {
      host.push_back(random_floats(rng, c.num_kv_heads * r * c.capacity));
      device.push_back(to_device(host.back()));
    }
    for (std::size_t i = 0; i < rows.size(); ++i) {
      cpu.push_back(SlotExtra{host[i].data(), rows[i]});
      gpu.push_back(SlotExtra{device[i].data(), rows[i]});
    }
  }
  void require_same(const std::string& what) const {
    for (std::size_t i = 0; i < host.size(); ++i) require_identical(to_host(device[i]), host[i], what + " extra " + std::to_string(i));
  }
  std::vector<std::vector<float>> host;
  std::vector<cuda::DeviceBuffer<float>> device;
  std::vector<SlotExtra> cpu, gpu;
};

}  // namespace kvevict::cuda_test
