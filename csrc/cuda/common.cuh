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
//   static DeviceOnce once; once.run(f)  f() once per device (e.g. cudaFuncSetAttribute, an attribute
//       of the function in each device's context), not before every launch
//   DeviceGuard guard(device)             makes `device` current until the scope ends (every
//       launcher in ops.h opens one: with the CUDA runtime linked statically, torch's current
//       device is not ours, so tensors on cuda:1 would otherwise launch on device 0)
#pragma once

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

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

namespace moe {

// Makes `device` the calling thread's current CUDA device for one scope and restores the previous
// one after, also when the scope ends by an exception. device < 0 keeps the current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device < 0) return;
    MOE_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) {
      const cudaError_t e = cudaSetDevice(device);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        throw std::runtime_error("cannot make CUDA device " + std::to_string(device) +
                                 " current for the tensors' launch: " + cudaGetErrorString(e));
      }
      restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
  bool restore_ = false;
};

}  // namespace moe

namespace moe {

// Runs a setup step once per CUDA device (the current one at the call), e.g. a kernel's
// cudaFuncSetAttribute: it belongs to the function in that device's context, so it must be set
// on every device used, but only once there. A step that throws is retried by the next call.
class DeviceOnce {
 public:
  template <class F>
  void run(F&& f) {
    int d = 0;
    MOE_CUDA_CHECK(cudaGetDevice(&d));
    if (d < 0 || d >= kMaxDevices) throw std::runtime_error("DeviceOnce: device " + std::to_string(d) + " out of range");
    std::call_once(flags_[d], std::forward<F>(f));
  }

 private:
  static constexpr int kMaxDevices = 64;
  std::once_flag flags_[kMaxDevices];
};

}  // namespace moe
