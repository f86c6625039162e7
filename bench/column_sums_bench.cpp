// H2O prefill scoring: causal column sums of softmax(Q K^T * scale) over T queries x T keys.
// Streaming (CpuBackend::accumulate_query_column_sums, kQueryTile x T scratch) beside the naive
// Eigen version that materialises the T x T probabilities. Bound: compute (the Q K^T GEMM and
// T^2/2 exps). Bytes processed = Q + K bytes read; items processed = T^2 logits.
// One kv-head and one q-head: the per-head cost (every head repeats it). T = 16k is not run:
// the naive T x T fp32 matrix alone would be 1 GiB.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bench_support.hpp"

namespace kvevict::bench {
namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct ColumnSumsSetup {
  Cache cache;
  std::vector<float> queries;  // [q_head = 1, T, head_dim]
  float scale;

  ColumnSumsSetup(std::int64_t t, std::int64_t head_dim)
      : cache(one_layer_shape(1, 1, head_dim, t)),
        queries(random_floats(t * head_dim, 21)),
        scale(1.0f / std::sqrt(static_cast<float>(head_dim))) {
    fill(cache, t, 11);  // slot j holds position j: query i sees slots [0, i]
  }
};

void streaming(Cache& cache, const float* q, std::int64_t t, float scale, float* scores) {
  const std::int64_t fresh_from = 0;  // every entry is new: scores restart from zero each call
  cache.backend().accumulate_query_column_sums(cache.view(0), q, t, 0, scale, scores, &fresh_from);
}

// Materialise P = causal softmax(Q K^T * scale) [T, T], then sum its columns.
void naive(const RowMatrix& q, const RowMatrix& k, float scale, RowMatrix& p, Eigen::RowVectorXf& sums) {
  const Eigen::Index t = p.rows();
  p.noalias() = (q * k.transpose()) * scale;
  for (Eigen::Index i = 0; i < t; ++i) {
    const Eigen::Index n = i + 1;  // keys 0..i are visible to query i
    const float mx = p.row(i).head(n).maxCoeff();
    p.row(i).head(n) = (p.row(i).head(n).array() - mx).exp().matrix();
    p.row(i).head(n) /= p.row(i).head(n).sum();
    p.row(i).tail(t - n).setZero();
  }
  sums.noalias() = p.colwise().sum();
}

void set_throughput(benchmark::State& state, std::int64_t t, std::int64_t head_dim) {
  const auto iters = static_cast<std::int64_t>(state.iterations());
  state.SetBytesProcessed(iters * 2 * t * head_dim * static_cast<std::int64_t>(sizeof(float)));
  state.SetItemsProcessed(iters * t * t);
}

void BM_ColumnSumsStreaming(benchmark::State& state) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  ColumnSumsSetup s(t, head_dim);
  std::vector<float> scores(static_cast<std::size_t>(t));
  streaming(s.cache, s.queries.data(), t, s.scale, scores.data());  // warm-up
  for (auto _ : state) {
    streaming(s.cache, s.queries.data(), t, s.scale, scores.data());
    benchmark::DoNotOptimize(scores.data());
    benchmark::ClobberMemory();
  }
  set_throughput(state, t, head_dim);
}

void BM_ColumnSumsNaive(benchmark::State& state) {
  const std::int64_t t = state.range(0), head_dim = state.range(1);
  ColumnSumsSetup s(t, head_dim);
  const RowMatrix q = Eigen::Map<const RowMatrix>(s.queries.data(), t, head_dim);
  const std::vector<float> keys = s.cache.keys(0, 0);
  const RowMatrix k = Eigen::Map<const RowMatrix>(keys.data(), t, head_dim);
  RowMatrix p(t, t);
  Eigen::RowVectorXf sums(t);
  naive(q, k, s.scale, p, sums);  // warm-up (and first touch of the T x T matrix)

  // The pair must compute the same thing: check against the streaming sums once, untimed.
  std::vector<float> ref(static_cast<std::size_t>(t));
  streaming(s.cache, s.queries.data(), t, s.scale, ref.data());
  float max_err = 0.0f;
  for (std::int64_t j = 0; j < t; ++j)
    max_err = std::max(max_err, std::abs(sums[j] - ref[static_cast<std::size_t>(j)]) / std::max(1.0f, std::abs(ref[static_cast<std::size_t>(j)])));
  if (!(max_err < 1e-3f)) {
    state.SkipWithError("naive and streaming column sums disagree");
    return;
  }

  for (auto _ : state) {
    naive(q, k, s.scale, p, sums);
    benchmark::DoNotOptimize(sums.data());
    benchmark::ClobberMemory();
  }
  set_throughput(state, t, head_dim);
}

[[maybe_unused]] const int kRegistered = [] {
  for (const std::int64_t t : {1024, 4096})
    for (const std::int64_t head_dim : {64, 128}) {
      benchmark::RegisterBenchmark("BM_ColumnSumsStreaming", BM_ColumnSumsStreaming)
          ->Args({t, head_dim})
          ->ArgNames({"T", "dim"})
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark("BM_ColumnSumsNaive", BM_ColumnSumsNaive)
          ->Args({t, head_dim})
          ->ArgNames({"T", "dim"})
          ->Unit(benchmark::kMillisecond);
    }
  return 0;
}();

}  // namespace
}  // namespace kvevict::bench
