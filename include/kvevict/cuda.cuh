// kvevict umbrella for nvcc: core, policies, the CPU backend and the CUDA backend. Eigen (the CPU
// backend) needs nvcc's --expt-relaxed-constexpr; the CUDA backend headers alone do not.
#pragma once

// Eigen 3.4's DenseStorage marks defaulted members __host__ __device__, which nvcc 12.x/13
// reports (20012-D) on every translation unit; the note is about Eigen, not kvevict's code.
#if defined(__NVCC__)
#pragma nv_diagnostic push
#pragma nv_diag_suppress 20012
#endif
#include "kvevict/kvevict.hpp"
#if defined(__NVCC__)
#pragma nv_diagnostic pop
#endif

#include "kvevict/backends/cuda/cuda_backend.cuh"
#include "kvevict/backends/cuda/cuda_check.cuh"
#include "kvevict/backends/cuda/device_buffer.cuh"
#include "kvevict/backends/cuda/cake_primitives.cuh"
