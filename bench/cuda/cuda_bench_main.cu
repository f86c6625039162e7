// kvevict-cuda-bench's main: Google Benchmark plus the CUDA device in the run's context.
#include <benchmark/benchmark.h>

#include "cuda_bench_support.cuh"

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("cuda_device", kvevict::cuda_bench::device_description());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
