// kvevict-replay: replays one golden case through kvevict and writes kvevict's outputs in the
// case's file conventions. Compiled by g++/clang++ against the CPU backend; the same file compiled
// by nvcc (with include/kvevict/cuda.cuh) also serves --backend cuda.
//
//   kvevict-replay CASE_DIR OUT_DIR [--backend cpu|cuda]
//
// Exit codes: 0 success (one summary line on stdout); 2 usage errors, unsupported sets or options,
// unreadable or malformed cases, unwritable OUT_DIR; 1 any other failure.
#include <cstdio>
#include <exception>
#include <filesystem>
#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#if defined(__CUDACC__)
#include "kvevict/cuda.cuh"  // includes kvevict.hpp (and silences nvcc's notes about Eigen)
#else
#include "kvevict/kvevict.hpp"
#endif
#include "golden/replay.hpp"

namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

void usage(std::ostream& os) {
  os << "usage: kvevict-replay CASE_DIR OUT_DIR [--backend cpu|cuda]\n"
        "  Replays the golden case in CASE_DIR (a directory with params.json and .npy inputs) and writes\n"
        "  keep_indices.npy, step_keep_indices.npy (multi-step cases) and the output tensors to OUT_DIR.\n";
}

template <class Cache>
int run(const std::filesystem::path& case_dir, const std::filesystem::path& out_dir) {
  const kvevict::golden::ReplayResult r = kvevict::golden::replay<Cache>(case_dir, out_dir);
  std::cout << r.summary() << '\n';
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string backend = "cpu";
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "-h" || a == "--help") {
      usage(std::cout);
      return 0;
    }
    if (a == "--backend" || a.starts_with("--backend=")) {
      if (a == "--backend") {
        if (i + 1 >= argc) {
          std::cerr << "kvevict-replay: --backend needs a value (cpu or cuda)\n";
          usage(std::cerr);
          return kExitUsage;
        }
        backend = argv[++i];
      } else {
        backend = std::string(a.substr(std::string_view("--backend=").size()));
      }
      if (backend != "cpu" && backend != "cuda") {
        std::cerr << "kvevict-replay: unknown backend '" << backend << "' (cpu or cuda)\n";
        return kExitUsage;
      }
      continue;
    }
    if (a.size() > 1 && a.front() == '-') {
      std::cerr << "kvevict-replay: unknown option '" << a << "'\n";
      usage(std::cerr);
      return kExitUsage;
    }
    positional.emplace_back(a);
  }
  if (positional.size() != 2) {
    std::cerr << "kvevict-replay: expected CASE_DIR and OUT_DIR, got " << positional.size() << " argument"
              << (positional.size() == 1 ? "" : "s") << "\n";
    usage(std::cerr);
    return kExitUsage;
  }
  const std::filesystem::path case_dir = positional[0], out_dir = positional[1];

  try {
    if (backend == "cuda") {
#if defined(__CUDACC__)
      return run<kvevict::KVCache<kvevict::CudaBackend>>(case_dir, out_dir);
#else
      std::cerr << "kvevict-replay: this build has no CUDA backend (rebuild with nvcc to use --backend cuda)\n";
      return kExitUsage;
#endif
    }
    return run<kvevict::KVCache<kvevict::CpuBackend>>(case_dir, out_dir);
  } catch (const kvevict::Error& e) {
    std::cerr << e.what() << '\n';
    const bool usage_like = e.code() == kvevict::ErrorCode::unsupported || e.code() == kvevict::ErrorCode::io;
    return usage_like ? kExitUsage : kExitFailure;
  } catch (const std::exception& e) {
    std::cerr << "kvevict-replay: " << e.what() << '\n';
    return kExitFailure;
  }
}
