// Where a step's GPU time goes, without nsys or ncu: the step's launches are captured once as a
// CUDA graph, then the step as normally queued, the captured graph, and each kernel of it alone
// are timed with CUDA events. A spin kernel runs first every time, so the host has queued all of a
// measurement's work before the GPU reaches it: each figure is GPU time (kernels and the gaps
// between them), free of the host's launch latency, which the step benchmarks include.
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>
#include <cxxabi.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "kvevict/backends/cuda/cuda_check.cuh"

namespace kvevict::cuda_bench {

// Keeps the GPU busy for `cycles` SM clock cycles (a template: one definition however many
// translation units include this header).
template <int kUnused = 0>
__global__ void spin_kernel(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

// A stream of its own (the legacy default stream, which backends use by default, cannot be
// captured).
class OwnedStream {
 public:
  OwnedStream() {
    cuda::check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "OwnedStream", "cudaStreamCreateWithFlags");
  }
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  ~OwnedStream() { (void)cudaStreamDestroy(stream_); }
  [[nodiscard]] cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// One kernel node of a captured step: what it launches, and a short name for reports.
struct CapturedKernel {
  std::string name;  // e.g. attend_partial_evict_kernel
  cudaKernelNodeParams params{};
  bool cooperative = false;
};

// "kvevict::cuda::detail::attend_reduce_kernel<128>(...)" -> "attend_reduce_kernel".
inline std::string short_kernel_name(const void* func) {
  const char* mangled = nullptr;
  if (cudaFuncGetName(&mangled, func) != cudaSuccess || mangled == nullptr) {
    (void)cudaGetLastError();
    return "kernel";
  }
  int status = 0;
  char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled != nullptr ? demangled : mangled;
  std::free(demangled);
  name = name.substr(0, name.find_first_of("<("));
  const std::size_t scope = name.rfind("::");
  return scope == std::string::npos ? name : name.substr(scope + 2);
}

// A step captured from a stream as a graph (its launches in queue order) and instantiated.
class CapturedStep {
 public:
  template <class Run>
  CapturedStep(cudaStream_t stream, Run&& run) {
    constexpr const char* where = "CapturedStep";
    cuda::check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), where, "cudaStreamBeginCapture");
    try {
      run();
    } catch (...) {
      cudaGraph_t partial = nullptr;
      (void)cudaStreamEndCapture(stream, &partial);
      if (partial != nullptr) (void)cudaGraphDestroy(partial);
      throw;
    }
    cuda::check(cudaStreamEndCapture(stream, &graph_), where, "cudaStreamEndCapture");
    cuda::check(cudaGraphInstantiate(&exec_, graph_, 0), where, "cudaGraphInstantiate");
    for (cudaGraphNode_t node : nodes_in_order()) {
      cudaGraphNodeType type{};
      cuda::check(cudaGraphNodeGetType(node, &type), where, "cudaGraphNodeGetType");
      if (type != cudaGraphNodeTypeKernel) {
        ++other_nodes_;
        continue;
      }
      CapturedKernel k;
      cuda::check(cudaGraphKernelNodeGetParams(node, &k.params), where, "cudaGraphKernelNodeGetParams");
      cudaLaunchAttributeValue coop{};
      if (cudaGraphKernelNodeGetAttribute(node, cudaLaunchAttributeCooperative, &coop) == cudaSuccess)
        k.cooperative = coop.cooperative != 0;
      (void)cudaGetLastError();
      k.name = short_kernel_name(k.params.func);
      kernels_.push_back(std::move(k));
    }
  }
  CapturedStep(const CapturedStep&) = delete;
  CapturedStep& operator=(const CapturedStep&) = delete;
  ~CapturedStep() {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) (void)cudaGraphDestroy(graph_);
  }

  [[nodiscard]] const std::vector<CapturedKernel>& kernels() const { return kernels_; }
  [[nodiscard]] int other_nodes() const { return other_nodes_; }  // memsets, copies: not timed alone
  void launch_graph(cudaStream_t stream) const {
    cuda::check(cudaGraphLaunch(exec_, stream), "CapturedStep", "cudaGraphLaunch");
  }
  // Kernel i alone, with the arguments it was captured with.
  void launch_kernel(std::size_t i, cudaStream_t stream) const {
    const cudaKernelNodeParams& p = kernels_[i].params;
    const cudaError_t status =
        kernels_[i].cooperative
            ? cudaLaunchCooperativeKernel(p.func, p.gridDim, p.blockDim, p.kernelParams, p.sharedMemBytes, stream)
            : cudaLaunchKernel(p.func, p.gridDim, p.blockDim, p.kernelParams, p.sharedMemBytes, stream);
    cuda::check(status, "CapturedStep", "cudaLaunchKernel");
  }

 private:
  // A stream capture is a chain: the root, then each node's single dependent. Anything else falls
  // back to the graph's own node order.
  std::vector<cudaGraphNode_t> nodes_in_order() const {
    constexpr const char* where = "CapturedStep";
    std::size_t count = 0;
    cuda::check(cudaGraphGetNodes(graph_, nullptr, &count), where, "cudaGraphGetNodes");
    std::vector<cudaGraphNode_t> all(count);
    cuda::check(cudaGraphGetNodes(graph_, all.data(), &count), where, "cudaGraphGetNodes");
    std::size_t roots = 0;
    cuda::check(cudaGraphGetRootNodes(graph_, nullptr, &roots), where, "cudaGraphGetRootNodes");
    if (roots != 1) return all;
    std::vector<cudaGraphNode_t> chain(1);
    cuda::check(cudaGraphGetRootNodes(graph_, chain.data(), &roots), where, "cudaGraphGetRootNodes");
    while (chain.size() < count) {
      std::size_t next = 0;
      cuda::check(cudaGraphNodeGetDependentNodes(chain.back(), nullptr, nullptr, &next), where,
                  "cudaGraphNodeGetDependentNodes");
      if (next != 1) return all;
      cudaGraphNode_t node = nullptr;
      cuda::check(cudaGraphNodeGetDependentNodes(chain.back(), &node, nullptr, &next), where,
                  "cudaGraphNodeGetDependentNodes");
      chain.push_back(node);
    }
    return chain;
  }

  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  std::vector<CapturedKernel> kernels_;
  int other_nodes_ = 0;
};

// Median GPU time of `queue()` over `reps` runs, each queued behind a spin kernel long enough
// (`spin_us`) for the host to have queued all of it before the GPU gets there.
class QueuedTimer {
 public:
  QueuedTimer(cudaStream_t stream, double spin_us) : stream_(stream) {
    constexpr const char* where = "QueuedTimer";
    int device = 0, khz = 0;
    cuda::check(cudaGetDevice(&device), where, "cudaGetDevice");
    cuda::check(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device), where, "cudaDeviceGetAttribute(ClockRate)");
    spin_cycles_ = static_cast<long long>(spin_us * 1e-3 * static_cast<double>(khz > 0 ? khz : 2'000'000));
    cuda::check(cudaEventCreate(&start_), where, "cudaEventCreate");
    cuda::check(cudaEventCreate(&stop_), where, "cudaEventCreate");
  }
  QueuedTimer(const QueuedTimer&) = delete;
  QueuedTimer& operator=(const QueuedTimer&) = delete;
  ~QueuedTimer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }

  template <class Queue>
  double median_us(int reps, Queue&& queue) {
    constexpr const char* where = "QueuedTimer";
    std::vector<float> ms(static_cast<std::size_t>(reps));
    for (float& m : ms) {
      spin_kernel<<<1, 1, 0, stream_>>>(spin_cycles_);
      cuda::check(cudaGetLastError(), where, "spin_kernel");
      cuda::check(cudaEventRecord(start_, stream_), where, "cudaEventRecord");
      queue();
      cuda::check(cudaEventRecord(stop_, stream_), where, "cudaEventRecord");
      cuda::check(cudaEventSynchronize(stop_), where, "cudaEventSynchronize");
      cuda::check(cudaEventElapsedTime(&m, start_, stop_), where, "cudaEventElapsedTime");
    }
    std::nth_element(ms.begin(), ms.begin() + reps / 2, ms.end());
    return 1e3 * static_cast<double>(ms[static_cast<std::size_t>(reps / 2)]);
  }

 private:
  cudaStream_t stream_;
  long long spin_cycles_ = 0;
  cudaEvent_t start_{}, stop_{};
};

// Counters for one step (`run`, re-runnable, queued on `stream`): gpu_step_us (the step's
// launches as run() queues them), graph_us (the same launches as one graph), and per kernel
// "k<i>_<name>_us" (kernel i of the step alone); sum_kernels_us adds those up. Manual time:
// gpu_step_us. untimed_nodes: memsets and copies of the step, in gpu_step_us but not timed alone.
template <class Run>
void profile_step_kernels(benchmark::State& state, cudaStream_t stream, Run&& run) {
  constexpr int kReps = 51;
  constexpr double kSpinUs = 400.0;  // above any one step's host queueing time here (<= 40 us)
  try {
    run();  // warm-up: workspaces are allocated outside the capture
    cuda::check(cudaStreamSynchronize(stream), "profile_step_kernels", "cudaStreamSynchronize");
    CapturedStep step(stream, run);
    QueuedTimer timer(stream, kSpinUs);
    for (auto _ : state) {
      const double step_us = timer.median_us(kReps, run);
      state.counters["gpu_step_us"] = step_us;
      state.counters["graph_us"] = timer.median_us(kReps, [&] { step.launch_graph(stream); });
      double sum = 0.0;
      for (std::size_t i = 0; i < step.kernels().size(); ++i) {
        const double us = timer.median_us(kReps, [&] { step.launch_kernel(i, stream); });
        state.counters["k" + std::to_string(i) + "_" + step.kernels()[i].name + "_us"] = us;
        sum += us;
      }
      state.counters["sum_kernels_us"] = sum;
      state.counters["untimed_nodes"] = step.other_nodes();
      state.SetIterationTime(step_us * 1e-6);
    }
  } catch (const std::exception& e) {  // a diagnostic: report and let the other benchmarks run
    state.SkipWithError(e.what());
  }
}

}  // namespace kvevict::cuda_bench
