// combine: weighted sum over the k slots, plus the shared experts, plus the residual.
//
// Formula, per element, fp32, in this fixed order (the CPU twin's order):
//   acc = 0; for j = 0..k_max-1 with topk_ids[t,j] >= 0: acc = fma(topk_weights[t,j], expert_out[t,j,d], acc)
//   routed_out[t,d] = round(acc)                       (the hook_routed_out tap, when non-null)
//   acc += shared_out[t,d] (when non-null); acc += residual[t,d] (when non-null)
//   out[t,d] = round(acc)                              (round = to the output dtype, nearest even)
// Sentinel slots (id < 0) are skipped, so their expert_out rows may hold anything (NaN included).
// The explicit fmaf makes the GPU and the emulator produce the same bits.
// Algorithm: one block per token; each thread owns VEC consecutive elements (16-byte loads:
//   8 bf16 or 4 fp32) and loops over D with a block-wide stride. out may alias residual (each
//   element is read before it is written by the same thread).
// Traffic: T*D*bytes*(k_valid + [shared] + [residual] + 1 + [routed]) + T*k_max*8.
// Launch: grid T, block clamp(round_up(ceil(D/VEC), 32), 32, 256), no shared memory.
// Limits: T >= 0, k_max >= 0, D >= 1; VEC > 1 only when D % VEC == 0 and every pointer is
//   16-byte aligned (otherwise one element per thread).
// Reference: src/moe_engine/ops/combine.py (combine_ref); CPU twin: csrc/cpu/combine.cpp; tests:
//   tests/emu/cpp/combine_test.cu (C++ double reference, via tests/emu/test_kernels.py) and
//   tests/test_ops.py; tolerances: tests/tolerances.py.
#include "common.cuh"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../ops.h"

namespace moe {
namespace {

constexpr int kCombineMaxThreads = 256;

template <class X, int VEC>
struct Vec;  // VEC elements of X <-> fp32, one 16-byte (or scalar) access

template <>
struct Vec<float, 4> {
  static __device__ __forceinline__ void load(const float* p, float (&v)[4]) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};
template <>
struct Vec<__nv_bfloat16, 8> {
  static __device__ __forceinline__ void load(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, const float (&v)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      memcpy(&w[i], &h, sizeof(uint32_t));  // a register move; no type-punned pointer
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};
template <>
struct Vec<float, 1> {
  static __device__ __forceinline__ void load(const float* p, float (&v)[1]) { v[0] = *p; }
  static __device__ __forceinline__ void store(float* p, const float (&v)[1]) { *p = v[0]; }
};
template <>
struct Vec<__nv_bfloat16, 1> {
  static __device__ __forceinline__ void load(const __nv_bfloat16* p, float (&v)[1]) { v[0] = __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, const float (&v)[1]) {
    *p = __float2bfloat16_rn(v[0]);
  }
};

template <class X, int VEC>
__global__ void __launch_bounds__(kCombineMaxThreads) combine_kernel(const CombineParams p) {
  using V = Vec<X, VEC>;
  const int64_t t = blockIdx.x, D = p.D, K = p.k_max;
  const X* expert_out = static_cast<const X*>(p.expert_out);
  const X* shared_out = static_cast<const X*>(p.shared_out);
  const X* residual = static_cast<const X*>(p.residual);
  X* out = static_cast<X*>(p.out);
  X* routed_out = static_cast<X*>(p.routed_out);
  for (int64_t d = (int64_t)threadIdx.x * VEC; d < D; d += (int64_t)blockDim.x * VEC) {
    float acc[VEC], x[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      if (p.topk_ids[t * K + j] < 0) continue;
      const float w = p.topk_weights[t * K + j];
      V::load(expert_out + (t * K + j) * D + d, x);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = fmaf(w, x[i], acc[i]);
    }
    if (routed_out) V::store(routed_out + t * D + d, acc);
    if (shared_out) {
      V::load(shared_out + t * D + d, x);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += x[i];
    }
    if (residual) {
      V::load(residual + t * D + d, x);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += x[i];
    }
    V::store(out + t * D + d, acc);
  }
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("combine_cuda: " + what); }

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

template <class X, int VEC>
void launch(const CombineParams& p, cudaStream_t s) {
  const int64_t lanes = (p.D + VEC - 1) / VEC;
  const int threads = (int)std::min<int64_t>(kCombineMaxThreads, std::max<int64_t>(32, (lanes + 31) / 32 * 32));
  auto* kernel = &combine_kernel<X, VEC>;
  MOE_LAUNCH(kernel, dim3((unsigned)p.T), dim3(threads), 0, s, p);
}

}  // namespace

void combine_cuda(const CombineParams& p, void* stream, int device) {
  const DeviceGuard device_guard(device);
  if (p.T < 0 || p.k_max < 0 || p.D < 1)
    bad("T = " + std::to_string(p.T) + ", k_max = " + std::to_string(p.k_max) + ", D = " + std::to_string(p.D) +
        ": need T >= 0, k_max >= 0, D >= 1");
  if (p.dtype != DType::f32 && p.dtype != DType::bf16)
    bad("dtype = " + std::to_string((int)p.dtype) + " is neither f32 nor bf16");
  if (p.T == 0) return;
  if (!p.out || (p.k_max > 0 && (!p.expert_out || !p.topk_weights || !p.topk_ids)))
    bad("out, expert_out, topk_weights and topk_ids must be non-null");
  if (p.T > 0x7FFFFFFF) bad("T = " + std::to_string(p.T) + " exceeds the grid limit");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int vec = p.dtype == DType::bf16 ? 8 : 4;
  const bool vector_ok = p.D % vec == 0 && aligned16(p.expert_out) && aligned16(p.shared_out) &&
                         aligned16(p.residual) && aligned16(p.out) && aligned16(p.routed_out);
  if (p.dtype == DType::bf16) vector_ok ? launch<__nv_bfloat16, 8>(p, s) : launch<__nv_bfloat16, 1>(p, s);
  else vector_ok ? launch<float, 4>(p, s) : launch<float, 1>(p, s);
  MOE_CUDA_CHECK(cudaGetLastError());  // launch errors only; never synchronises
}

}  // namespace moe
