// moe_decode: the small-batch MoE path (T <= 16): no sort, no align, weights read once per expert.
//
// Shape legend: T tokens, D hidden, E experts, k_max top-k width, F expert width, R = T*k_max slots.
//
// Formula, for every slot j = t*k_max + s with e = topk_ids[t, s] in [0, E):
//   act[j, f]        = silu(x[t] . Wg[e, f]) * (x[t] . Wu[e, f])      (bf16, rounded once)
//   expert_out[j, d] = act[j] . Wd[e, d]                              (unweighted, token order)
//   Wg = experts_gate_up[e, 0:F), Wu = experts_gate_up[e, F:2F), Wd = experts_down[e].
//   Sentinel slots (id < 0 or >= E; k is a runtime value and unused slots carry -1) get
//   expert_out[j] = 0 and no act row. topk_ids null = dense mode: every slot is expert 0 (the
//   shared experts, shared_expert.cu).
//
// Algorithm (the slot scheduling and epilogue are csrc/cuda/moe_decode_common.cuh, shared with
//   moe_decode_q.cu): two launches (down needs every column of act). Grid column x serves the x-th
//   distinct expert in slot order (warp 0 marks each slot that is its expert's first, by a scan of
//   the slots before it, at most R = 16 k_max reads a lane, and ranks the marks with ballots);
//   there are min(R, E) columns, so only min(R, E) - distinct ones exit at once (was R columns,
//   ~45 % exiting at 8-16 tokens). From that first slot j the CTA collects the slots j' >= j that
//   chose e (ascending, up to 8 per pass; a 9th or later token of one expert starts another pass,
//   whose weight reads hit L2) and streams its weight rows once for all of them. Each warp owns 4
//   weight rows (up: gate and up rows of 2 features; down: 4 output features) and walks K with
//   16-byte loads, 32 lanes x 8 bf16 = 256 elements a step; the input rows (x or act, a few KB)
//   come from L1/L2 for every pass over the weights. Sentinel slots: the down CTAs of column x
//   zero the expert_out rows x, x + min(R, E), ... whose id is a sentinel.
//   Lane partial sums are reduced with xor shuffles; lane 0 writes.
//   Split-K (k_splits > 1; down, dense mode; shared_expert.cu's small batches): the down grid
//   gets a z dimension, CTA z walks F range z (whole warp steps) and writes its fp32 sums to
//   partial [k_splits, R, D] instead of expert_out; the caller adds the ranges in order z = 0, 1, ...
//
// Memory traffic (bf16): per touched expert 2 (2F D + D F) bytes of weights, read once
//   (more than 8 tokens on one expert: once per pass of 8); plus 2 D x T (x), 2 F x R (act,
//   written then read), 2 D x R (expert_out). DeepSeekMoE-16B (D 2048, F 1408, E 64, k 6):
//     T = 1: 6 experts = 103.8 MB; grid 6 x 88 (up) + 6 x 64 (down) CTAs.
//     T = 8: ~34.9 experts = 604 MB; grid 48 x 88 + 48 x 64 CTAs, of which the ~35 columns
//            with an expert work and the rest exit after the ranking scan.
//     T = 16: ~49.6 experts; grid 64 (= E) columns instead of 96 (= R).
//   H100 floors and expected fractions (projections, no GPU has run this): bench/README.md.
//   Bytes in flight: each lane issues the weight loads of two warp steps before any math
//   (2 x 4 x 16 B); __launch_bounds__ (256, 2) caps registers at 128 so 2 CTAs share an SM:
//   16 warps x 4 KB = 64 KB per SM, more than an SM needs to hide memory latency at full
//   bandwidth (bench/README.md).
// Batch invariance: bitwise. A slot's sums run over K in the same lane order and are reduced by
//   the same shuffle tree whatever other tokens share the call or its pass, so a token's rows do
//   not depend on the batch for T <= 16. Across the switch to align + expert_gemm at T = 17 the
//   bits change (mma k-order), within the expert_ffn tolerance: tests/emu/test_batch_invariance.py.
// Launch: up grid (min(R, E), ceil(F / 16)), down grid (min(R, E), ceil(D / 32)) (dense mode: 1 column),
//   block 256, static smem < 64 B.
// Limits: 1 <= T <= 16 (larger batches: align + expert_gemm), D and F multiples of 8, all
//   pointers 16-byte aligned, x / act / expert_out contiguous.
// Reference: src/moe_engine/ops/expert_ffn.py expert_ffn_ref; CPU twin: csrc/cpu/expert_ffn.cpp;
//   test: tests/emu/cpp/moe_decode_test.cu via tests/emu/test_moe_decode.py (double-precision
//   reference; tolerances in tests/emu/cpp/moe_test_util.h);
//   nvcc build / spill check: tests/emu/test_nvcc_build.py.
#include "common.cuh"
#include "moe_decode_common.cuh"
#include "ops.h"

#include <stdexcept>
#include <string>

namespace moe {
namespace decode_detail {  // named, so the kernel files can share one translation unit in tests

using bf16 = __nv_bfloat16;

using namespace decode_common;  // kMaxT, kThreads, kRowsPerWarp, kPass, kStep, the scheduling and epilogue
constexpr int kUnroll = 2;         // warp steps whose weight loads are issued together

// Dot product of 8 bf16 pairs held in two uint4. The words are unpacked with shifts (a bf16 is
// the high half of an fp32), not by casting the uint4 to __nv_bfloat162: that cast breaks C++
// aliasing rules, and g++ -O2 (the emulator build) then reads stale values.
__device__ inline float dot_word(uint32_t a, uint32_t b, float acc) {
  acc += __uint_as_float(a << 16) * __uint_as_float(b << 16);
  acc += __uint_as_float(a & 0xFFFF0000u) * __uint_as_float(b & 0xFFFF0000u);
  return acc;
}
__device__ inline float dot8(const uint4& a, const uint4& b, float acc) {
  acc = dot_word(a.x, b.x, acc);
  acc = dot_word(a.y, b.y, acc);
  acc = dot_word(a.z, b.z, acc);
  return dot_word(a.w, b.w, acc);
}

// SPLIT (down, dense mode): CTA z = blockIdx.z sums K range z of gridDim.z (whole warp steps of
// kStep, ceil(K / kStep / gridDim.z) of them each) and writes fp32 to p.partial + z R N.
template <bool UP, bool SPLIT = false>
__global__ void __launch_bounds__(kThreads, 2) moe_decode_kernel(const MoeDecodeParams p) {
  static_assert(!(UP && SPLIT), "split-K is for the down projection only");
  constexpr int kMats = UP ? 2 : 1;                  // up: gate and up rows
  constexpr int kFeatPerWarp = kRowsPerWarp / kMats;
  const int R = p.T * p.k_max;
  const int N = UP ? p.F : p.D, K = UP ? p.D : p.F;
  const int f0 = blockIdx.y * kFeatPerCta<UP>;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int* ids = p.topk_ids;
  bf16* out = static_cast<bf16*>(UP ? p.act : p.expert_out);
  auto id_of = [&](int jj) { return ids ? ids[jj] : 0; };
  auto valid = [&](int e) { return e >= 0 && e < p.E; };

  if constexpr (!UP && !SPLIT) zero_sentinel_rows(out, R, N, f0, id_of, valid);  // (split: dense, none)
  int k_begin = 0, k_end = K;
  if constexpr (SPLIT) {
    const int splits = static_cast<int>(gridDim.z), z = static_cast<int>(blockIdx.z);
    const int steps = ((K + kStep - 1) / kStep + splits - 1) / splits;
    k_begin = z * steps * kStep;
    k_end = min(K, k_begin + steps * kStep);
  }

  MOE_SHARED_ARRAY(int, s_list, kPass);  // slots served in this pass
  MOE_SHARED_ARRAY(int, s_pass, 2);      // [0] their count, [1] where the next pass resumes
  // CTA x serves the x-th distinct expert in slot order, from its first slot j.
  if (warp == 0) {
    const int found = cta_first_slot(R, lane, id_of, valid);
    if (lane == 0) s_pass[0] = found;
  }
  __syncthreads();
  const int j = s_pass[0];
  if (j < 0) return;
  const int e = id_of(j);
  __syncthreads();  // everyone has read s_pass before warp 0 reuses it
  auto chose_e = [&](int jj) { return jj < R && id_of(jj) == e; };

  const bf16* W = static_cast<const bf16*>(UP ? p.experts_gate_up : p.experts_down) +
                  static_cast<int64_t>(e) * kMats * N * K;
  const bf16* in = static_cast<const bf16*>(UP ? p.x : p.act);
  const bf16* wrow[kRowsPerWarp];
  int feat[kRowsPerWarp];
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    feat[q] = f0 + warp * kFeatPerWarp + q % kFeatPerWarp;
    const int mat = q / kFeatPerWarp;
    wrow[q] = W + static_cast<int64_t>(feat[q] < N ? mat * N + feat[q] : 0) * K;
  }

  for (int cursor = j;;) {
    if (warp == 0) fill_pass(cursor, R, lane, chose_e, s_list, s_pass);
    __syncthreads();
    const int n = s_pass[0];
    cursor = s_pass[1];
    if (n == 0) return;

    int in_off[kPass];
    pass_offsets<UP>(in_off, n, s_list, p.k_max, K);
    float acc[kRowsPerWarp][kPass] = {};
    // kUnroll steps of weight loads are issued before any math, so each lane keeps
    // kUnroll x kRowsPerWarp 16-byte loads in flight (the input rows are L1/L2 hits).
    for (int k0 = k_begin + lane * 8; k0 < k_end; k0 += kUnroll * kStep) {
      uint4 w[kUnroll][kRowsPerWarp];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int q = 0; q < kRowsPerWarp; ++q)
          w[u][q] = k0 + u * kStep < k_end ? *reinterpret_cast<const uint4*>(wrow[q] + k0 + u * kStep) : uint4{};
#pragma unroll
      for (int r = 0; r < kPass; ++r) {
        if (r >= n) break;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (k0 + u * kStep >= k_end) break;
          const uint4 v = *reinterpret_cast<const uint4*>(in + in_off[r] + k0 + u * kStep);
#pragma unroll
          for (int q = 0; q < kRowsPerWarp; ++q) acc[q][r] = dot8(w[u][q], v, acc[q][r]);
        }
      }
    }
    if constexpr (SPLIT)
      store_pass<UP>(acc, n, s_list, feat, N, p.partial + static_cast<int64_t>(blockIdx.z) * R * N, lane);
    else
      store_pass<UP>(acc, n, s_list, feat, N, out, lane);
    if (cursor >= R) return;
    __syncthreads();  // everyone has read s_list before warp 0 refills it
  }
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("moe_decode: " + what); }

template <bool UP, bool SPLIT = false>
void launch(const MoeDecodeParams& p, cudaStream_t stream) {
  const int N = UP ? p.F : p.D;
  const int R = p.T * p.k_max;
  const int experts = p.topk_ids ? (R < p.E ? R : p.E) : 1;  // distinct experts at most (dense: one)
  const dim3 grid(experts, (N + kFeatPerCta<UP> - 1) / kFeatPerCta<UP>, SPLIT ? p.k_splits : 1);
  auto* moe_decode = &moe_decode_kernel<UP, SPLIT>;  // one token for MOE_LAUNCH (and its messages)
  MOE_LAUNCH(moe_decode, grid, dim3(kThreads), 0, stream, p);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace decode_detail

void moe_decode_cuda(const MoeDecodeParams& p, void* stream, int device) {
  const DeviceGuard device_guard(device);
  using namespace decode_detail;
  auto s = [](int64_t v) { return std::to_string(v); };
  if (p.T < 0 || p.T > kMaxT)
    bad("T must be in [0, " + s(kMaxT) + "] (use align + expert_gemm for more); got T=" + s(p.T));
  if (p.k_max < 1 || p.E < 1) bad("need k_max >= 1 and E >= 1; got k_max=" + s(p.k_max) + " E=" + s(p.E));
  if (p.D <= 0 || p.F <= 0 || p.D % 8 || p.F % 8)
    bad("D and F must be positive multiples of 8 (16-byte loads); got D=" + s(p.D) + " F=" + s(p.F));
  if (!p.x || !p.experts_gate_up || !p.experts_down || !p.act || !p.expert_out)
    bad("x, experts_gate_up, experts_down, act and expert_out must be non-null");
  auto misaligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 != 0; };
  if (misaligned(p.x) || misaligned(p.experts_gate_up) || misaligned(p.experts_down) || misaligned(p.act) ||
      misaligned(p.expert_out))
    bad("x, experts_gate_up, experts_down, act and expert_out must be 16-byte aligned");
  const bool split = p.k_splits > 1;
  if (p.k_splits < 0 || p.k_splits > 64) bad("k_splits must be in [0, 64]; got " + s(p.k_splits));
  if (split && (p.topk_ids || !p.partial))
    bad("k_splits > 1 needs dense mode (topk_ids null) and a partial buffer [k_splits, T*k_max, D]");
  if (split && misaligned(p.partial)) bad("partial must be 16-byte aligned");
  if (p.T == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  launch<true>(p, st);
  split ? launch<false, true>(p, st) : launch<false>(p, st);
}

}  // namespace moe
