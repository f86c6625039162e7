// CUDA runtime errors as kvevict errors, and the memory-space check for pointers that a kernel
// will dereference. Everything here runs on the host, at the boundary of a backend call.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "kvevict/core/error.hpp"

namespace kvevict {

// A CUDA runtime call or kernel launch failed (out of memory, invalid configuration, a fault of
// an earlier kernel reported at this boundary). Carries the runtime's code. ErrorCode has no
// dedicated "device runtime" entry; device_mismatch is the closest family.
class CudaError : public Error {
 public:
  CudaError(cudaError_t status, const std::string& message) : Error(ErrorCode::device_mismatch, message), status_(status) {}
  [[nodiscard]] cudaError_t status() const noexcept { return status_; }

 private:
  cudaError_t status_;
};

namespace cuda {

// Throws CudaError naming `where` and `what` when `status` is not cudaSuccess.
inline void check(cudaError_t status, std::string_view where, std::string_view what) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();  // a failed call also sets the last error; it must not resurface at the next check
  std::string msg = "kvevict: ";
  msg.append(where).append(": ").append(what).append(" failed: ").append(cudaGetErrorName(status));
  msg.append(" (").append(cudaGetErrorString(status)).append(")");
  throw CudaError(status, msg);
}

// After a kernel launch: reports a bad launch configuration (or an earlier asynchronous fault)
// without synchronising.
inline void check_launch(std::string_view where, std::string_view kernel) {
  check(cudaGetLastError(), where, std::string(kernel).append(" launch"));
}

// Throws DeviceError unless `p` is device or managed memory of this process: a host pointer
// handed to a kernel would fault asynchronously, far from the call that caused it.
// Costs one driver query (no synchronisation).
inline void require_device_pointer(std::string_view where, std::string_view name, const void* p) {
  cudaPointerAttributes attr{};
  const cudaError_t status = cudaPointerGetAttributes(&attr, p);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();  // the query's failure must not surface at the next launch check
    kvevict::detail::fail<DeviceError>(where, name, p,
                                       std::string("is not a CUDA pointer (") + cudaGetErrorName(status) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    kvevict::detail::fail<DeviceError>(where, name, p,
                                       attr.type == cudaMemoryTypeHost
                                           ? "is pinned host memory; the CUDA backend needs device or managed memory"
                                           : "is host memory; the CUDA backend needs device or managed memory");
}

}  // namespace cuda
}  // namespace kvevict
