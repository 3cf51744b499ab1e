// The slot scheduling and epilogue of the T <= 16 MoE path, written once for its two kernels:
// moe_decode.cu (bf16 experts) and moe_decode_q.cu (quantized experts). Only the weight stream
// and the inner product differ between them; everything here is moe_decode.cu's algorithm (its
// header explains it), and every function is force-inlined into the kernels, so the generated
// code and its registers are those of the kernels before this header existed.
//
//   zero_sentinel_rows   down CTAs: the sentinel slots' expert_out rows of the CTA's features = 0
//   cta_first_slot       warp 0: the first slot of the blockIdx.x-th distinct expert, or -1
//   fill_pass            warp 0: the next <= kPass slots that chose the CTA's expert
//   pass_offsets         each pass slot's input row offset (up: its token's x row; down: its act row)
//   store_pass           lane sums reduced with xor shuffles; lane 0 writes silu(gate) * up or down
#pragma once

#include "common.cuh"

namespace moe {
namespace decode_common {

constexpr int kMaxT = 16;          // beyond this: align + expert_gemm (tensor cores; no passes of 8)
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;    // weight rows one warp streams together
constexpr int kPass = 8;           // slots served per pass over an expert's weight rows
constexpr int kStep = 32 * 8;      // bf16 weights: K elements a warp step (16 bytes a lane)

template <bool UP> constexpr int kFeatPerCta = kWarps * kRowsPerWarp / (UP ? 2 : 1);

__device__ inline float silu(float g) { return g / (1.0f + expf(-g)); }

// Down CTAs: sentinel slots' rows of out [R, N] are zeros over this CTA's features; CTA x takes
// slots x, x + grid.x, ...
template <class IdOf, class Valid>
__device__ __forceinline__ void zero_sentinel_rows(__nv_bfloat16* out, int R, int N, int f0, IdOf id_of, Valid valid) {
  const int f1 = f0 + kFeatPerCta<false> < N ? f0 + kFeatPerCta<false> : N;
  for (int jj = blockIdx.x; jj < R; jj += gridDim.x)
    if (!valid(id_of(jj)))
      for (int d = f0 + static_cast<int>(threadIdx.x); d < f1; d += kThreads)
        out[static_cast<int64_t>(jj) * N + d] = __float2bfloat16(0.0f);
}

// Warp 0 (all its lanes): CTA x serves the x-th distinct expert in slot order, from its first
// slot: each slot that is the first of its expert (a scan of the slots before it) is marked and
// the marks ranked with ballots. The grid has min(R, E) columns, so at most min(R, E) - distinct
// CTAs get -1 and exit.
template <class IdOf, class Valid>
__device__ __forceinline__ int cta_first_slot(int R, int lane, IdOf id_of, Valid valid) {
  int found = -1;
  for (int base = 0, seen = 0; base < R && found < 0; base += 32) {
    const int jj = base + lane;
    bool first = jj < R && valid(id_of(jj));
    for (int i = 0; i < jj && first; ++i) first = id_of(i) != id_of(jj);
    const unsigned m = __ballot_sync(~0u, first);
    const int want = static_cast<int>(blockIdx.x) - seen;
    if (want < __popc(m)) {
      const unsigned hit = __ballot_sync(~0u, first && __popc(m & ((1u << lane) - 1u)) == want);
      found = base + __ffs(hit) - 1;
    }
    seen += __popc(m);
  }
  return found;
}

// Warp 0 (all its lanes): the next up to kPass slots from `cursor` on that chose the CTA's expert
// (chose(jj)) into s_list; s_pass[0] = their count, s_pass[1] = where the next pass resumes.
template <class Chose>
__device__ __forceinline__ void fill_pass(int cursor, int R, int lane, Chose chose, int* s_list, int* s_pass) {
  int n = 0, pos = cursor;
  while (pos < R && n < kPass) {
    const bool match = chose(pos + lane);
    const unsigned m = __ballot_sync(~0u, match);
    const int rank = __popc(m & ((1u << lane) - 1u));
    if (match && n + rank < kPass) s_list[n + rank] = pos + lane;
    if (n + __popc(m) <= kPass) {
      n += __popc(m);
      pos += 32;
    } else {  // resume at the first match that did not fit
      pos += __ffs(__ballot_sync(~0u, match && n + rank == kPass)) - 1;
      n = kPass;
    }
  }
  if (lane == 0) { s_pass[0] = n; s_pass[1] = pos; }
}

// Element offset of each pass slot's input row (K elements a row): up reads its token's x row,
// down its own act row; 0 past n.
template <bool UP>
__device__ __forceinline__ void pass_offsets(int (&in_off)[kPass], int n, const int* s_list, int k_max, int K) {
#pragma unroll
  for (int r = 0; r < kPass; ++r)
    in_off[r] = r < n ? (UP ? s_list[r] / k_max : s_list[r]) * K : 0;
}

__device__ __forceinline__ void store_as(__nv_bfloat16* dst, float v) { *dst = __float2bfloat16(v); }
__device__ __forceinline__ void store_as(float* dst, float v) { *dst = v; }  // split-K partial sums

// The pass's lane partial sums reduced with xor shuffles; lane 0 writes feature feat[q] of each
// slot's row of out [R, N]: up silu(gate) * up (rows q and q + kFeatPerWarp), down the sum
// (bf16, or fp32 for a split-K partial).
template <bool UP, class OutT>
__device__ __forceinline__ void store_pass(float (&acc)[kRowsPerWarp][kPass], int n, const int* s_list,
                                           const int (&feat)[kRowsPerWarp], int N, OutT* out, int lane) {
  constexpr int kMats = UP ? 2 : 1;
  constexpr int kFeatPerWarp = kRowsPerWarp / kMats;
#pragma unroll
  for (int r = 0; r < kPass; ++r) {
    if (r >= n) break;
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q)
#pragma unroll
      for (int o = 16; o > 0; o /= 2) acc[q][r] += __shfl_xor_sync(~0u, acc[q][r], o);
    if (lane == 0) {
      const int64_t row = static_cast<int64_t>(s_list[r]) * N;
#pragma unroll
      for (int q = 0; q < kFeatPerWarp; ++q) {
        if (feat[q] >= N) continue;
        const float v = UP ? silu(acc[q][r]) * acc[q + kFeatPerWarp * (kMats - 1)][r] : acc[q][r];
        store_as(out + row + feat[q], v);
      }
    }
  }
}

}  // namespace decode_common
}  // namespace moe
