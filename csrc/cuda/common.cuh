// The one header every kernel file includes first. Under nvcc: the real CUDA headers. Under a plain
// C++ compiler: the CPU emulator (csrc/emu/emu.h), so the same source runs in correctness tests.
//
//   MOE_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)   kernel<<<grid, block, smem, stream>>>(args...)
//       `kernel` must be one token: for a template instance take a pointer first,
//       `auto* kernel = &route_kernel<64>;`.
//   MOE_DYNAMIC_SHARED(type, name)        extern __shared__ type name[] (16-byte aligned)
//   MOE_SHARED_ARRAY(type, name, count)   __shared__ type name[count] (16-byte aligned); the emulator
//       fills it with 0xFF before every block (a plain `__shared__` keeps the previous block's data
//       there and hides missing initialisation) and accepts it as ldmatrix / cp.async memory.
//   MOE_CUDA_CHECK(expr)                  throw std::runtime_error naming expr, file, line and error
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#define MOE_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__)
#define MOE_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#define MOE_SHARED_ARRAY(type, name, count) __shared__ __align__(16) type name[count]

#else
#include "../emu/emu.h"

#define MOE_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::moe_emu::launch(#kernel, kernel, (grid), (block), (smem_bytes), (stream) __VA_OPT__(, ) __VA_ARGS__)
#define MOE_DYNAMIC_SHARED(type, name) type* const name = reinterpret_cast<type*>(::moe_emu::dynamic_smem())
#define MOE_SHARED_ARRAY(type, name, count)              \
  static type name[count] __attribute__((aligned(16))); \
  ::moe_emu::shared_static(name, sizeof(name))
#endif

#define MOE_CUDA_CHECK(expr)                                                                       \
  do {                                                                                             \
    const cudaError_t moe_cuda_err_ = (expr);                                                      \
    if (moe_cuda_err_ != cudaSuccess)                                                              \
      throw std::runtime_error(std::string(#expr) + " failed at " + __FILE__ + ":" +              \
                               std::to_string(__LINE__) + ": " + cudaGetErrorString(moe_cuda_err_)); \
  } while (0)
