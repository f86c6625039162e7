// H2O prefill scoring (column sums of the causal softmax over T queries and T keys) against a
// naive version of the same sums. Compute-bound: q_heads x T^2 x head_dim multiply-adds per pass.
// BM_CudaColumnSums/T/d: CudaBackend::accumulate_query_column_sums, the tiled two-pass kernels
//   (no T x T scratch; logits computed twice).
// BM_CudaNaiveColumnSums/T/d: per q-head, materialise the T x T logits, softmax each row with the
//   causal mask, then sum the columns (T^2 floats of scratch; logits computed once).
// 8 kv-heads, GQA 4; items processed = q_heads x T^2 attention entries; bytes processed = the
// queries and keys read (the minimum traffic).
#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda_bench_support.cuh"

namespace kvevict::cuda_bench {
namespace {

constexpr int kNaiveThreads = 256;

// logits[i, j] = q_i . k_j * scale for j <= i, -inf above the diagonal.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) naive_logits_kernel(const float* q, const float* k, std::int64_t t, int d,
                                                                float scale, float* logits) {
  const std::int64_t i = blockIdx.y;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= t) return;
  float dot = 0.0f;
  for (int c = 0; c < d; ++c) dot += q[i * d + c] * k[j * d + c];
  logits[i * t + j] = j <= i ? dot * scale : -INFINITY;
}

// Row softmax in place, one block per row.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) naive_softmax_kernel(float* logits, std::int64_t t) {
  __shared__ float scratch[32];
  float* row = logits + static_cast<std::int64_t>(blockIdx.x) * t;
  float m = -INFINITY;
  for (std::int64_t j = threadIdx.x; j < t; j += blockDim.x) m = fmaxf(m, row[j]);
  m = cuda::detail::block_reduce(m, scratch, cuda::detail::MaxOp{}, -INFINITY);
  float sum = 0.0f;
  for (std::int64_t j = threadIdx.x; j < t; j += blockDim.x) {
    row[j] = expf(row[j] - m);
    sum += row[j];
  }
  sum = cuda::detail::block_reduce(sum, scratch, cuda::detail::SumOp{}, 0.0f);
  for (std::int64_t j = threadIdx.x; j < t; j += blockDim.x) row[j] /= sum;
}

// scores[j] += sum_i probs[i, j], one thread per column.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) naive_column_sum_kernel(const float* probs, std::int64_t t, float* scores) {
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= t) return;
  float s = 0.0f;
  for (std::int64_t i = 0; i < t; ++i) s += probs[i * t + j];
  scores[j] += s;
}

void set_counters(benchmark::State& state, std::int64_t t, std::int64_t d) {
  state.SetItemsProcessed(state.iterations() * kQHeads * t * t);
  state.SetBytesProcessed(state.iterations() * (kQHeads + kKvHeads) * t * d * static_cast<std::int64_t>(sizeof(float)));
}

void BM_CudaColumnSums(benchmark::State& state) {
  if (!start(state, "compute-bound")) return;
  const std::int64_t t = state.range(0), d = state.range(1);
  const CacheShape shape{1, kKvHeads, kQHeads, d, t};
  KVCache<CudaBackend> cache(shape);
  auto k = random_device(kKvHeads * t * d, 3);
  auto v = random_device(kKvHeads * t * d, 4);
  cache.append(0, {k.data(), k.size()}, {v.data(), v.size()}, t);
  auto q = random_device(kQHeads * t * d, 5);
  cuda::DeviceBuffer<float> scores(kQHeads * t);
  const std::vector<std::int64_t> fresh(kKvHeads, 0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  auto& backend = cache.backend();
  const auto view = cache.view(0);
  EventTimer timer(backend.stream());
  backend.accumulate_query_column_sums(view, q.data(), t, 0, scale, scores.data(), fresh.data());  // warm-up
  for (auto _ : state) {
    timer.start();
    backend.accumulate_query_column_sums(view, q.data(), t, 0, scale, scores.data(), fresh.data());
    state.SetIterationTime(timer.stop_seconds());
  }
  set_counters(state, t, d);
}

void BM_CudaNaiveColumnSums(benchmark::State& state) {
  if (!start(state, "compute-bound (naive baseline)")) return;
  const std::int64_t t = state.range(0), d = state.range(1);
  auto k = random_device(kKvHeads * t * d, 3);
  auto q = random_device(kQHeads * t * d, 5);
  cuda::DeviceBuffer<float> scores(kQHeads * t), matrix(t * t);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const cudaStream_t stream = nullptr;
  const std::int64_t g = kQHeads / kKvHeads;
  auto run = [&] {
    for (std::int64_t qh = 0; qh < kQHeads; ++qh) {
      const dim3 grid(static_cast<unsigned>(cuda::detail::ceil_div(t, kNaiveThreads)), static_cast<unsigned>(t));
      naive_logits_kernel<kNaiveThreads><<<grid, kNaiveThreads, 0, stream>>>(q.data() + qh * t * d, k.data() + (qh / g) * t * d,
                                                                             t, static_cast<int>(d), scale, matrix.data());
      naive_softmax_kernel<kNaiveThreads><<<static_cast<unsigned>(t), kNaiveThreads, 0, stream>>>(matrix.data(), t);
      naive_column_sum_kernel<kNaiveThreads><<<static_cast<unsigned>(cuda::detail::ceil_div(t, kNaiveThreads)), kNaiveThreads, 0,
                                               stream>>>(matrix.data(), t, scores.data() + qh * t);
    }
    cuda::check_launch("BM_CudaNaiveColumnSums", "naive kernels");
  };
  time_loop(state, stream, run);
  set_counters(state, t, d);
}

BENCHMARK(BM_CudaColumnSums)->ArgsProduct({{1024, 4096}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_CudaNaiveColumnSums)->ArgsProduct({{1024, 4096}, {64, 128}})->ArgNames({"T", "d"})->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvevict::cuda_bench
