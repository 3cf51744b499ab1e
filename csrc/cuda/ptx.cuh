// Inline-PTX wrappers for sm_80+ (mma.sync bf16, ldmatrix, cp.async), with one body per compiler:
//   defined(__CUDA_ARCH__)   the PTX instruction (nvcc device pass)
//   nvcc host pass           empty (the host never runs these; nvcc still parses them)
//   !defined(__CUDACC__)     the emulator (csrc/emu/emu.h): warp rendezvous, exact arithmetic,
//                            address checks, cp.async deferred until its wait_group
// Never `#else` (the host pass would take the emulator) and never `#if __CUDA_ARCH__ >= 800`
// around an algorithm (emulation would silently take the other path).
//
// Fragment layouts (PTX ISA; g = lane >> 2, t = lane & 3; low 16 bits = lower index):
//   a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..2t+9]   a[3] = A[g+8][2t+8..2t+9]
//   b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   c/d  = {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}
//   ldmatrix: lane 8m+r gives the address of row r of 8x8 matrix m (16 bytes, 16-byte aligned,
//   shared memory); r[m] = {M_m[g][2t], M_m[g][2t+1]}, .trans: {M_m[2t][g], M_m[2t+1][g]}.
// In emulation each wrapper takes a hidden defaulted source location so errors name the caller.
#pragma once

#include "common.cuh"

#if !defined(__CUDACC__)
#define MOE_PTX_LOC_ONLY std::source_location moe_loc = std::source_location::current()
#define MOE_PTX_LOC , MOE_PTX_LOC_ONLY
#else
#define MOE_PTX_LOC_ONLY
#define MOE_PTX_LOC
#endif

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ uint32_t moe_smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// D = A(16x16 row, bf16) * B(16x8 col, bf16) + C, fp32 accumulate.
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4] MOE_PTX_LOC) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
#if !defined(__CUDACC__)
  moe_emu::mma_m16n8k16_bf16(d, a, b, c, moe_loc);
#endif
}

__device__ __forceinline__ void ldmatrix_x1(uint32_t r[1], const void* smem_row_ptr MOE_PTX_LOC) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(moe_smem_addr(smem_row_ptr)));
#endif
#if !defined(__CUDACC__)
  moe_emu::ldmatrix(r, 1, false, smem_row_ptr, moe_loc);
#endif
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* smem_row_ptr MOE_PTX_LOC) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(moe_smem_addr(smem_row_ptr)));
#endif
#if !defined(__CUDACC__)
  moe_emu::ldmatrix(r, 2, false, smem_row_ptr, moe_loc);
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row_ptr MOE_PTX_LOC) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(moe_smem_addr(smem_row_ptr)));
#endif
#if !defined(__CUDACC__)
  moe_emu::ldmatrix(r, 4, false, smem_row_ptr, moe_loc);
#endif
}

__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t r[1], const void* smem_row_ptr MOE_PTX_LOC) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(moe_smem_addr(smem_row_ptr)));
#endif
#if !defined(__CUDACC__)
  moe_emu::ldmatrix(r, 1, true, smem_row_ptr, moe_loc);
#endif
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* smem_row_ptr MOE_PTX_LOC) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(moe_smem_addr(smem_row_ptr)));
#endif
#if !defined(__CUDACC__)
  moe_emu::ldmatrix(r, 2, true, smem_row_ptr, moe_loc);
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row_ptr MOE_PTX_LOC) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(moe_smem_addr(smem_row_ptr)));
#endif
#if !defined(__CUDACC__)
  moe_emu::ldmatrix(r, 4, true, smem_row_ptr, moe_loc);
#endif
}

// cp.async.cg: 16 bytes global -> shared, bypassing L1.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src MOE_PTX_LOC) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(moe_smem_addr(smem_dst)), "l"(gmem_src)
               : "memory");
#endif
#if !defined(__CUDACC__)
  moe_emu::cp_async(smem_dst, gmem_src, 16, true, moe_loc);
#endif
}

// As cp_async_16, but writes 16 zero bytes (reading nothing) when !valid: src-size 0.
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* gmem_src, bool valid MOE_PTX_LOC) {
#if defined(__CUDA_ARCH__)
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(moe_smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
#endif
#if !defined(__CUDACC__)
  moe_emu::cp_async(smem_dst, gmem_src, 16, valid, moe_loc);
#endif
}

__device__ __forceinline__ void cp_async_commit(MOE_PTX_LOC_ONLY) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
#if !defined(__CUDACC__)
  moe_emu::cp_async_commit(moe_loc);
#endif
}

// cp.async.wait_group N: wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait(MOE_PTX_LOC_ONLY) {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7");
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
#if !defined(__CUDACC__)
  moe_emu::cp_async_wait(N, moe_loc);
#endif
}
