// Observation-window primitives of the CUDA backend, each beside the baseline that bounds it, with
// identical arguments (8 kv-heads, GQA 4; T live entries per kv-head at positions 0 .. T-1):
//   BM_CudaWindowScoring/T/d   window_column_stats: w = 32 window queries of 32 q-heads over T keys,
//                              sums only (masked logits, fp32 softmax, column sums).
//   BM_CudaWindowGemm/T/d      the GEMM inside it, alone, by cuBLAS (fp32 SGEMM, default math mode,
//                              so no TF32): [4w, d] x [d, T] per kv-head (its GQA group's queries
//                              stacked), batched over the 8 kv-heads; logits scaled, nothing else.
//                              Bound: compute. Target: scoring <= 1.2x the GEMM's time.
//   BM_CudaPoolAvg/Max/T/k     pool_tokens (kernel k) over [0, T - w) of 8 kv-heads x 4 rows.
//   BM_CudaReadBytesPool/T/k   a float4 grid-stride sum over the same input bytes. Bound: bandwidth.
//   BM_CudaSelectTopK/T        select_topk keeping T/2 per kv-head, sink 4 / recent 32 protected,
//                              random scores (the host read-back of the protected counts included).
//   BM_CudaReadBytesTopK/T     the same sum over as many bytes as the scores and positions.
//   BM_CudaCompactPerHead/T/d  compact with AdaKV-style per-head counts (head_budgets, then
//                              select_topk, in the setup): K, V and positions of the moved rows.
//   BM_CudaMemcpyPerHead/T/d   per kv-head, one cudaMemcpyAsync D2D each for the moved K rows, V rows
//                              and positions (24 copies). Bound: bandwidth. (BM_CudaMemcpyD2D in
//                              compaction_bench.cu is the single-copy floor.)
// Bytes processed are the bytes read (scoring: queries + keys; pool, top-k: their inputs) or moved
// (compaction), so each pair's bytes/s compare directly. At these sizes the inputs of the pool and
// top-k pairs fit in L2, as they do for the baselines. Allocation and warm-up stay outside the
// timed loops; times are CUDA events on the backend's stream.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef KVEVICT_BENCH_HAVE_CUBLAS
#include <cublas_v2.h>
#endif

#include "cuda_bench_support.cuh"

namespace kvevict::cuda_bench {
namespace {

constexpr std::int64_t kWindow = 32;    // window queries per q-head; also the protected recent entries
constexpr std::int64_t kSink = 4;       // protected sink entries of the top-k and compaction pairs
constexpr std::int64_t kPoolRows = 4;   // rows pooled per kv-head (its q-heads: kvpress pools, then averages)
constexpr std::int64_t kSmallHeadDim = 4;  // pooling and top-k read no keys: a small head keeps the layer cheap

constexpr std::int64_t kFloat = static_cast<std::int64_t>(sizeof(float));
constexpr std::int64_t kInt32 = static_cast<std::int64_t>(sizeof(std::int32_t));

CacheShape one_layer(std::int64_t t, std::int64_t d) { return CacheShape{1, kKvHeads, kQHeads, d, t}; }

void set_bytes(benchmark::State& state, std::int64_t bytes) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * bytes);
}

// ---- the read baseline: every byte of a buffer read once, summed, one float per block ----

constexpr int kReadThreads = 256;

// block_sums[b] = the sum of the floats block b read. Grid-stride over float4 (cudaMalloc'd
// buffers are 256-byte aligned), four independent loads in flight per thread, then the n % 4 tail.
__global__ void __launch_bounds__(kReadThreads) read_sum_kernel(const float* __restrict__ in, std::int64_t n,
                                                                float* __restrict__ block_sums) {
  __shared__ float warp_sums[kReadThreads / 32];
  const auto* in4 = reinterpret_cast<const float4*>(in);
  const std::int64_t n4 = n / 4;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kReadThreads;
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kReadThreads + threadIdx.x;
  float acc = 0.0f;
  std::int64_t i = first;
  for (; i + 3 * stride < n4; i += 4 * stride) {
    const float4 a = in4[i], b = in4[i + stride], c = in4[i + 2 * stride], d = in4[i + 3 * stride];
    acc += ((a.x + a.y) + (a.z + a.w)) + ((b.x + b.y) + (b.z + b.w)) + ((c.x + c.y) + (c.z + c.w)) +
           ((d.x + d.y) + (d.z + d.w));
  }
  for (; i < n4; i += stride) {
    const float4 a = in4[i];
    acc += (a.x + a.y) + (a.z + a.w);
  }
  for (std::int64_t j = 4 * n4 + first; j < n; j += stride) acc += in[j];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < kReadThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) block_sums[blockIdx.x] = s;
  }
}

// `floats` random floats and the launch that reads them: as many blocks as are resident at once,
// fewer when the input has less than one float4 per thread.
class ReadBaseline {
 public:
  explicit ReadBaseline(std::int64_t floats) : n_(floats), in_(random_device(floats, 97)) {
    int device = 0, sms = 0, per_sm = 0;
    cuda::check(cudaGetDevice(&device), "ReadBaseline", "cudaGetDevice");
    cuda::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "ReadBaseline",
                "cudaDeviceGetAttribute");
    cuda::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, read_sum_kernel, kReadThreads, 0), "ReadBaseline",
                "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    const std::int64_t resident = std::max<std::int64_t>(1, static_cast<std::int64_t>(sms) * per_sm);
    const std::int64_t needed = std::max<std::int64_t>(1, cuda::detail::ceil_div(floats / 4, kReadThreads));
    blocks_ = static_cast<unsigned>(std::min(resident, needed));
    block_sums_ = cuda::DeviceBuffer<float>(static_cast<std::int64_t>(blocks_));
  }
  void run(cudaStream_t stream) {
    read_sum_kernel<<<blocks_, kReadThreads, 0, stream>>>(in_.data(), n_, block_sums_.data());
    cuda::check(cudaGetLastError(), "ReadBaseline", "read_sum_kernel launch");
  }
  [[nodiscard]] std::int64_t bytes() const { return n_ * kFloat; }

 private:
  std::int64_t n_;
  cuda::DeviceBuffer<float> in_;
  cuda::DeviceBuffer<float> block_sums_;  // [blocks]
  unsigned blocks_ = 1;
};


// ---- window scoring vs its GEMM ----

std::int64_t scoring_bytes(std::int64_t t, std::int64_t d) { return (kQHeads * kWindow + kKvHeads * t) * d * kFloat; }

void set_scoring_counters(benchmark::State& state, std::int64_t t, std::int64_t d) {
  set_bytes(state, scoring_bytes(t, d));
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * kQHeads * kWindow * t);  // logits
}

void BM_CudaWindowScoring(benchmark::State& state) {
  if (!start(state, "compute-bound")) return;
  const std::int64_t t = state.range(0), d = state.range(1);
  CudaBackend backend;
  backend.reserve(one_layer(t, d));
  BenchLayer layer(t, d, 13);
  auto queries = random_device(kQHeads * kWindow * d, 31);  // [q_head, w, head_dim]
  cuda::DeviceBuffer<float> sums(kQHeads * t);              // [q_head, T]
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  time_loop(state, backend.stream(), [&] {
    backend.window_column_stats(layer.view, queries.data(), kWindow, t - kWindow, scale, sums.data(), nullptr);
  });
  set_scoring_counters(state, t, d);
}

#ifdef KVEVICT_BENCH_HAVE_CUBLAS
constexpr std::int64_t kGroup = kQHeads / kKvHeads;  // q-heads per kv-head, stacked in one GEMM

void check_cublas(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw std::runtime_error(std::string("kvevict-cuda-bench: ") + what + " failed: " + cublasGetStatusName(status) +
                           " (" + cublasGetStatusString(status) + ")");
}

class CublasHandle {
 public:
  explicit CublasHandle(cudaStream_t stream) {
    check_cublas(cublasCreate(&handle_), "cublasCreate");
    check_cublas(cublasSetStream(handle_, stream), "cublasSetStream");
    check_cublas(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");  // fp32, no TF32
  }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  ~CublasHandle() { (void)cublasDestroy(handle_); }
  [[nodiscard]] cublasHandle_t get() const { return handle_; }

 private:
  cublasHandle_t handle_{};
};
#endif

void BM_CudaWindowGemm(benchmark::State& state) {
  if (!start(state, "compute-bound (baseline)")) return;
#ifdef KVEVICT_BENCH_HAVE_CUBLAS
  const std::int64_t t = state.range(0), d = state.range(1);
  BenchLayer layer(t, d, 13);
  auto queries = random_device(kQHeads * kWindow * d, 31);  // [q_head, w, head_dim]
  cuda::DeviceBuffer<float> logits(kQHeads * kWindow * t);  // [q_head, w, T] row-major
  const float alpha = 1.0f / std::sqrt(static_cast<float>(d)), beta = 0.0f;
  const cudaStream_t stream = nullptr;
  CublasHandle handle(stream);
  // Per kv-head h, the rows of its q-heads 4h .. 4h+3 are contiguous in `queries`, so the group's
  // logits are one row-major [4w, T] = Q_h [4w, d] x K_h^T. cuBLAS is column-major: compute
  // C^T [T, 4w] = K_h [T, d] x Q_h^T, with K_h read as a column-major [d, T] matrix (ld =
  // slot_stride) transposed and Q_h as a column-major [d, 4w] matrix (ld = d).
  const int m = static_cast<int>(t), n = static_cast<int>(kGroup * kWindow), k = static_cast<int>(d);
  const int lda = static_cast<int>(layer.view.slot_stride), ldb = k, ldc = m;
  const long long stride_a = layer.view.head_stride, stride_b = kGroup * kWindow * d, stride_c = kGroup * kWindow * t;
  time_loop(state, stream, [&] {
    check_cublas(cublasSgemmStridedBatched(handle.get(), CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, layer.view.keys, lda,
                                           stride_a, queries.data(), ldb, stride_b, &beta, logits.data(), ldc, stride_c,
                                           static_cast<int>(kKvHeads)),
                 "cublasSgemmStridedBatched");
  });
  set_scoring_counters(state, t, d);
#else
  state.SkipWithError("built without cuBLAS (CMake found no CUDA::cublas target): no GEMM baseline");
#endif
}

// ---- pooling vs a read of its input ----

void run_pool(benchmark::State& state, PoolKind kind) {
  const std::int64_t t = state.range(0), kernel = state.range(1);
  CudaBackend backend;
  backend.reserve(one_layer(t, kSmallHeadDim));
  BenchLayer layer(t, kSmallHeadDim, 17);
  const std::int64_t floats = kKvHeads * kPoolRows * t;
  auto in = random_device(floats, 41);  // [kv_head * rows, T]
  cuda::DeviceBuffer<float> out(floats);
  const std::vector<std::int64_t> span(static_cast<std::size_t>(kKvHeads), t - kWindow);
  time_loop(state, backend.stream(),
            [&] { backend.pool_tokens(layer.view, in.data(), out.data(), kPoolRows, span.data(), kernel, kind); });
  set_bytes(state, floats * kFloat);
}

void BM_CudaPoolAvg(benchmark::State& state) {
  if (!start(state, "bandwidth-bound (k reads per output, from cache)")) return;
  run_pool(state, PoolKind::avg);
}

void BM_CudaPoolMax(benchmark::State& state) {
  if (!start(state, "bandwidth-bound (k reads per output, from cache)")) return;
  run_pool(state, PoolKind::max);
}

void BM_CudaReadBytesPool(benchmark::State& state) {
  if (!start(state, "bandwidth-bound (baseline)")) return;
  ReadBaseline read(kKvHeads * kPoolRows * state.range(0));
  const cudaStream_t stream = nullptr;
  time_loop(state, stream, [&] { read.run(stream); });
  set_bytes(state, read.bytes());
}

// ---- top-k selection vs a read of the scores and positions ----

std::int64_t topk_bytes(std::int64_t t) { return kKvHeads * t * (kFloat + kInt32); }

void BM_CudaSelectTopK(benchmark::State& state) {
  if (!start(state, "bandwidth-bound (one read of scores + positions per radix pass)")) return;
  const std::int64_t t = state.range(0);
  CudaBackend backend;
  backend.reserve(one_layer(t, kSmallHeadDim));
  BenchLayer layer(t, kSmallHeadDim, 19);
  auto scores = random_device(kKvHeads * t, 43);             // [kv_head, T]
  cuda::DeviceBuffer<std::int32_t> keep_slots(kKvHeads * t);  // [kv_head, T]
  const std::vector<std::int64_t> keep(static_cast<std::size_t>(kKvHeads), t / 2);
  const ProtectRule rule{kSink, t - kWindow};
  time_loop(state, backend.stream(),
            [&] { backend.select_topk(layer.view, scores.data(), rule, keep.data(), keep_slots.data()); });
  set_bytes(state, topk_bytes(t));
}

void BM_CudaReadBytesTopK(benchmark::State& state) {
  if (!start(state, "bandwidth-bound (baseline)")) return;
  const std::int64_t t = state.range(0);
  ReadBaseline read(topk_bytes(t) / kFloat);
  const cudaStream_t stream = nullptr;
  time_loop(state, stream, [&] { read.run(stream); });
  set_bytes(state, read.bytes());
}

// ---- per-head compaction (adaptive budgets) vs memcpy of the moved bytes ----

// The compaction plan of window_bench.cpp on the device: scores whose spread grows with the head
// (x (1 + h/4)), head_budgets over half of the layer (floor 20 % of the uniform share), then
// select_topk with those counts. moved[h] = kept rows of head h that change slot.
struct CompactSetup {
  CompactSetup(std::int64_t t_, std::int64_t d)
      : t(t_), layer(t_, d, 23), counts(static_cast<std::size_t>(kKvHeads)), moved(static_cast<std::size_t>(kKvHeads), 0),
        keep_slots(kKvHeads * t_) {
    backend.reserve(one_layer(t, d));
    auto scores = random_device(kKvHeads * t, 47);  // [kv_head, T]
    std::vector<float> host(static_cast<std::size_t>(kKvHeads * t));
    backend.copy_to_host(scores.data(), host.data(), kKvHeads * t);
    for (std::int64_t h = 0; h < kKvHeads; ++h)
      for (std::int64_t j = 0; j < t; ++j) host[static_cast<std::size_t>(h * t + j)] *= 1.0f + 0.25f * static_cast<float>(h);
    backend.copy_from_host(host.data(), scores.data(), kKvHeads * t);
    const ProtectRule rule{kSink, t - kWindow};
    const std::int64_t share = t / 2 - (kSink + kWindow);  // unprotected entries per head at a uniform T/2
    backend.head_budgets(layer.view, scores.data(), rule, kKvHeads * share, share / 5, counts.data());
    backend.select_topk(layer.view, scores.data(), rule, counts.data(), keep_slots.data());
    std::vector<std::int32_t> slots(static_cast<std::size_t>(kKvHeads * t));
    backend.copy_to_host(keep_slots.data(), slots.data(), kKvHeads * t);
    for (std::int64_t h = 0; h < kKvHeads; ++h)
      for (std::int64_t i = 0; i < counts[static_cast<std::size_t>(h)]; ++i)
        moved[static_cast<std::size_t>(h)] += slots[static_cast<std::size_t>(h * t + i)] != i ? 1 : 0;
  }
  [[nodiscard]] std::int64_t moved_bytes(std::int64_t d) const {
    std::int64_t rows = 0;
    for (const std::int64_t m : moved) rows += m;
    return rows * (2 * d * kFloat + kInt32);
  }

  std::int64_t t;
  CudaBackend backend;
  BenchLayer layer;
  std::vector<std::int64_t> counts;         // host [kv_head]: keep counts, different per head
  std::vector<std::int64_t> moved;          // host [kv_head]: kept rows whose slot changes
  cuda::DeviceBuffer<std::int32_t> keep_slots;  // [kv_head, T], ascending per head
};

void BM_CudaCompactPerHead(benchmark::State& state) {
  if (!start(state, "bandwidth-bound")) return;
  const std::int64_t t = state.range(0), d = state.range(1);
  CompactSetup s(t, d);
  // compact() leaves lens alone (the cache updates them) and keep slots ascend (slot >= its
  // target), so every iteration repeats the same moves: no restore inside the loop.
  time_loop(state, s.backend.stream(), [&] { s.backend.compact(s.layer.view, s.keep_slots.data(), s.counts.data(), {}); });
  set_bytes(state, s.moved_bytes(d));
  state.counters["min_budget"] = static_cast<double>(*std::min_element(s.counts.begin(), s.counts.end()));
  state.counters["max_budget"] = static_cast<double>(*std::max_element(s.counts.begin(), s.counts.end()));
}

void BM_CudaMemcpyPerHead(benchmark::State& state) {
  if (!start(state, "bandwidth-bound (baseline)")) return;
  const std::int64_t t = state.range(0), d = state.range(1);
  CompactSetup s(t, d);
  const std::int64_t head_elems = t * d;
  auto src_k = random_device(kKvHeads * head_elems, 51), src_v = random_device(kKvHeads * head_elems, 52);
  cuda::DeviceBuffer<float> dst_k(kKvHeads * head_elems), dst_v(kKvHeads * head_elems);
  cuda::DeviceBuffer<std::int32_t> src_p(kKvHeads * t), dst_p(kKvHeads * t);
  const cudaStream_t stream = nullptr;
  auto copy = [&](void* dst, const void* src, std::int64_t bytes) {
    cuda::check(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(bytes), cudaMemcpyDeviceToDevice, stream),
                "BM_CudaMemcpyPerHead", "cudaMemcpyAsync");
  };
  // Per head: the moved rows as one block starting one row in (sink slot 0 never moves, so
  // moved[h] <= T - 1 and the source stays inside the head).
  time_loop(state, stream, [&] {
    for (std::int64_t h = 0; h < kKvHeads; ++h) {
      const std::int64_t rows = std::min(s.moved[static_cast<std::size_t>(h)], t - 1);
      if (rows == 0) continue;
      copy(dst_k.data() + h * head_elems, src_k.data() + h * head_elems + d, rows * d * kFloat);
      copy(dst_v.data() + h * head_elems, src_v.data() + h * head_elems + d, rows * d * kFloat);
      copy(dst_p.data() + h * t, src_p.data() + h * t + 1, rows * kInt32);
    }
  });
  set_bytes(state, s.moved_bytes(d));
}

BENCHMARK(BM_CudaWindowScoring)->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaWindowGemm)->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaPoolAvg)->ArgsProduct({{1024, 4096, 16384}, {5, 7}})->ArgNames({"T", "k"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaPoolMax)->ArgsProduct({{1024, 4096, 16384}, {5, 7}})->ArgNames({"T", "k"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaReadBytesPool)->ArgsProduct({{1024, 4096, 16384}, {5, 7}})->ArgNames({"T", "k"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaSelectTopK)->ArgsProduct({{1024, 4096, 16384}})->ArgNames({"T"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaReadBytesTopK)->ArgsProduct({{1024, 4096, 16384}})->ArgNames({"T"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaCompactPerHead)->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaMemcpyPerHead)->ArgsProduct({{1024, 4096, 16384}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvevict::cuda_bench
