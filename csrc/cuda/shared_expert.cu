// shared_expert: the always-on shared experts of a DeepSeekMoE layer as one dense SwiGLU MLP.
//
// Shape legend: T tokens, D hidden, S shared width (n_shared_experts x F; 2 x 1408 = 2816 in 16B).
//
// Formula: shared_out[t] = (silu(x[t] . Wg^T) * (x[t] . Wu^T)) . Wd^T,
//   Wg = gate_up[0:S), Wu = gate_up[S:2S) ([2S, D]), Wd = down ([D, S]); act [T, S] scratch.
//   shared_out is the hook_shared_out tap; combine adds it to the routed sum.
//
// Decision: dense SwiGLU, not "an always-selected extra expert inside the grouped GEMM".
//   - The shared width S is n_shared x F (2816 vs 1408 in 16B): as extra experts it would have to
//     be split into n_shared F-wide experts packed into [E + n_shared, 2F, D] at load time, and
//     every token would carry n_shared extra slots through align, the usage counters and combine.
//   - The extra slots would also land in expert_out, whose [T, k_max, D] layout IS the
//     hook_expert_out tap (routed experts only, slot order = rank); keeping the shared MLP apart
//     keeps that tap, the counters (sum = k T) and the ABI of align / combine unchanged.
//   - Traffic is the same either way: the shared weights are read once per layer (34.6 MB in
//     16B), and the dense launches run on a second stream beside the routed path: moe.py forks
//     a side stream after the router input is ready and joins it before combine
//     (src/moe_engine/streams.py; inside a captured decode step the graph records both branches).
//     What the fused variant would save is two launches.
//   So it reuses the same kernels: T <= 16 (and x contiguous) runs moe_decode in dense mode
//   (topk_ids null: one expert, k_max 1); larger T runs expert_gemm in dense mode (no slot list:
//   row i = token i, expert 0, capacity T). The only code of its own is the plan below and the
//   split-K reduce.
//
// Small-T grids (shared_expert_plan; an H100 / H200 has 132 SMs, an A100 108, so the target is
//   kFillCtas = 132 CTAs a launch, and a launch below 3/4 of it is split):
//   - split-K: a launch of fewer CTAs (moe_decode down: ceil(D / 32); expert_gemm:
//     ceil(T / BM) x ceil(N / BN), BN 64 act columns up, 128 down) cuts its K (S for down, D for
//     up) into k_splits = ceil(kFillCtas / CTAs) ranges (whole 256-element warp steps for
//     moe_decode, whole 64-wide k-tiles for expert_gemm; at most the number of steps and
//     kMaxSplits). Each CTA writes its range's fp32 sums to the scratch `partial`, and
//     splitk_reduce adds the ranges in order z = 0, 1, ... in fp32, then rounds to bf16 once
//     (down: [k_splits, T, D] -> shared_out; up: gate and up sums [k_splits, T, 2S] -> act =
//     silu(gate) * up, expert_gemm's epilogue moved into the reduce, since silu needs the whole
//     sums). No atomics: the bits do not depend on which CTA finishes first. moe_decode's up
//     launch already has ceil(S / 16) CTAs (176 in 16B) and is never split.
//   - tile height: expert_gemm takes BM = 16 up to T = 64 (up to 4 row tiles; BM 64 would leave
//     one row tile of 44 up CTAs at 33-64 tokens in 16B), expert_gemm_block_m above. A tile height
//     never changes the bits (expert_gemm.cu, "Batch invariance").
//   16B (D 2048, S 2816), CTAs up / down (x k_splits):
//     T 1-16    moe_decode    176 / 64 x 3 = 192
//     T 17-32   BM 16         88 x 2 = 176 / 32 x 5 = 160
//     T 33-64   BM 16         132-176 / 48-64 x 3 = 144-192
//     T 65-128  BM 64         88 x 2 = 176 / 32 x 5 = 160
//     T 129-256 BM 64         132-176 / 48-64 x 3 = 144-192
//     T 257-384 BM 64         220-264 / 80-96 x 2 = 160-192;   T > 384: no split
//   Whether BM 16's re-reads of the weights from L2 (up to 4 row tiles) cost more than the idle
//   SMs of BM 64 at 33-64 tokens, and what the splits' fp32 traffic costs against the SMs they
//   fill, are GPU measurements (bench/kernels.py times the shared experts at T = 1, 8, 64, 512).
// Batch invariance (stated and tested: tests/emu/test_shared_expert_plan.py): a token's
//   shared_out row has the same bits in two batches whenever shared_expert_plan gives them the
//   same (decode, up_splits, down_splits): every row's sums run in an order fixed by the path and
//   the split ranges (moe_decode lane order, expert_gemm k-order, splits added z = 0, 1, ...),
//   never by the other rows; the tile height does not matter. Between plans (T = 16 / 17 and
//   wherever a split count changes) the rows agree within the expert_ffn tolerance
//   (tests/tolerances.py).
// Memory traffic: 2 x 3 S D bytes of weights (34.6 MB in 16B; H100 floor: bench/README.md) plus
//   2 T (2 D + 2 S) bytes of activations, plus the fp32 partial sums, written once and read once
//   by the reduce: 4 k_splits T D bytes (down) and 8 k_splits T S (up); in 16B 0.15 MB at T = 1,
//   2.6 MB at T = 32, 11 MB at T = 128 (mostly L2).
// Launch / limits: those of moe_decode.cu (T <= 16) and expert_gemm.cu (T > 16); splitk_reduce:
//   grid ceil(T N / 4 / 256) (N = D down, S up), block 256, no shared memory (4 elements a
//   thread, float4 loads); the up reduce needs T S < 2^31;
//   D and S multiples of 8, pointers 16-byte aligned.
// ptxas (CUDA 13.0, -O3; tools/check_ptxas.py), registers sm_80 / sm_90a, CTAs per SM that
//   registers and threads allow, PTX instructions; zero spills; split twin vs unsplit kernel:
//     moe_decode_kernel<down, split>       123 / 127 regs, 2 CTAs (launch bounds), 3188 PTX
//                                          (unsplit down 113 / 115, 2, 3269)
//     expert_gemm_kernel<16, up, split>     64 / 64 regs, 8 CTAs, 1102 PTX (unsplit 55 / 56, 9, 1142)
//     expert_gemm_kernel<16, down, split>   66 / 62 regs, 7 / 8 CTAs, 1222 PTX (unsplit 64 / 56, 8 / 9, 1136)
//     expert_gemm_kernel<64, up, split>    162 / 128 regs, 3 / 4 CTAs, 1540 PTX (unsplit 128 / 128, 4, 1974)
//     expert_gemm_kernel<64, down, split>  128 / 128 regs, 4 CTAs, 1679 PTX (unsplit 128 / 128, 4, 1553)
//     splitk_reduce_kernel<down / up>       64 / 62 and 62 / 62 regs, 4 CTAs (launch bounds), 84 / 238 PTX
//       (__launch_bounds__(256, 4): with no CTA count ptxas squeezed the up reduce into 32
//       registers and spilled 8 bytes on sm_80)
//   expert_gemm's 72 KB of dynamic shared memory caps its CTAs per SM as before (3 on H100/H200,
//   2 on A100), so the split kernels' registers cost no occupancy.
// Test: tests/emu/cpp/shared_expert_test.cu via tests/emu/test_expert_gemm.py (every plan, awkward
//   sizes, three thread orders); the plan and the invariance: tests/emu/test_shared_expert_plan.py.
#include "common.cuh"
#include "expert_gemm_common.cuh"
#include "moe_decode_common.cuh"
#include "ops.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace moe {
namespace shared_detail {  // named, so the kernel files can share one translation unit in tests

constexpr int kFillCtas = 132;     // CTAs a launch should have (see the header)
constexpr int kMaxSplits = 16;     // at most this many ranges (each adds 4 T N bytes of fp32 partials)
constexpr int kReduceThreads = 256;
// The tiles of the kernels it launches (their split ranges are whole steps / k-tiles).
constexpr int kDecodeFeatPerCta = decode_common::kFeatPerCta<false>;  // moe_decode down features a CTA
constexpr int kDecodeStep = decode_common::kStep;                     // moe_decode K elements a step
constexpr int kGemmBN = gemm_common::Warps<16, false>::BN;            // expert_gemm down N tile
constexpr int kGemmUpBN = gemm_common::Warps<16, true>::BN;           // expert_gemm up N tile (act columns)
constexpr int kGemmBK = gemm_common::kBK;                             // expert_gemm k-tile
static_assert(gemm_common::Warps<64, false>::BN == kGemmBN, "one down N tile for both tile heights");

// k_splits for a launch of `ctas` CTAs over `steps` K steps: 1 when the launch is near the target,
// else enough to reach it, then trimmed so no range is empty (steps spread evenly).
int splits_for(int64_t ctas, int steps) {
  if (ctas >= kFillCtas * 3 / 4) return 1;
  int splits = static_cast<int>((kFillCtas + ctas - 1) / ctas);
  splits = std::min({splits, steps, kMaxSplits});
  if (splits <= 1) return 1;
  const int per = (steps + splits - 1) / splits;
  return (steps + per - 1) / per;
}

__device__ __forceinline__ float4 sum_splits(const float* p, int64_t stride, int splits) {
  float4 acc = *reinterpret_cast<const float4*>(p);
  for (int z = 1; z < splits; ++z) {
    const float4 v = *reinterpret_cast<const float4*>(p + z * stride);
    acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
  }
  return acc;
}

// The split ranges added in order z = 0, 1, ... in fp32 (fixed order: deterministic bits), 4
// elements a thread (rows hold multiples of 8). out [rows, N] bf16.
//   SWIGLU false (down): partial [splits, rows, N];  out[r, c] = bf16(sum_z partial[z, r, c])
//   SWIGLU true (up):    partial [splits, rows, 2N] (gate sums, then up sums);
//                        out[r, c] = bf16(silu(sum_z gate) * sum_z up)   (expert_gemm's epilogue)
template <bool SWIGLU>
__global__ void __launch_bounds__(kReduceThreads, 4) splitk_reduce_kernel(const float* partial, __nv_bfloat16* out,
                                                                       int splits, int64_t rows, int N) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x) * 4;
  if (i >= rows * N) return;
  float4 v;
  if constexpr (SWIGLU) {
    const int r = static_cast<int>(i) / N, c = static_cast<int>(i) - r * N;  // rows N < 2^31 (launcher)
    const float* g = partial + static_cast<int64_t>(r) * 2 * N + c;
    const float4 gate = sum_splits(g, rows * 2 * N, splits), up = sum_splits(g + N, rows * 2 * N, splits);
    using gemm_common::silu;  // expert_gemm's epilogue
    v = make_float4(silu(gate.x) * up.x, silu(gate.y) * up.y, silu(gate.z) * up.z, silu(gate.w) * up.w);
  } else {
    v = sum_splits(partial + i, rows * N, splits);
  }
  reinterpret_cast<__nv_bfloat162*>(out + i)[0] = __floats2bfloat162_rn(v.x, v.y);
  reinterpret_cast<__nv_bfloat162*>(out + i)[1] = __floats2bfloat162_rn(v.z, v.w);
}

template <bool SWIGLU>
void reduce(const float* partial, void* out, int splits, int64_t rows, int N, cudaStream_t stream) {
  const int64_t blocks = (rows * N / 4 + kReduceThreads - 1) / kReduceThreads;
  if (blocks >= (1LL << 31) || (SWIGLU && rows * N >= (1LL << 31)))
    throw std::invalid_argument("shared_expert: T=" + std::to_string(rows) + " too large for the split-K reduce");
  auto* splitk_reduce = &splitk_reduce_kernel<SWIGLU>;
  MOE_LAUNCH(splitk_reduce, dim3(static_cast<unsigned>(blocks)), dim3(kReduceThreads), 0, stream, partial,
             static_cast<__nv_bfloat16*>(out), splits, rows, N);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace shared_detail

SharedExpertPlan shared_expert_plan(int T, int D, int S, bool x_contiguous) {
  using namespace shared_detail;
  SharedExpertPlan p;
  if (T <= 0 || D <= 0 || S <= 0) return p;
  p.decode = T <= 16 && x_contiguous;
  if (p.decode) {
    p.down_splits = splits_for((D + kDecodeFeatPerCta - 1) / kDecodeFeatPerCta, (S + kDecodeStep - 1) / kDecodeStep);
  } else {
    p.block_m = T <= 64 ? 16 : expert_gemm_block_m(T, 1, 1);
    const int64_t row_tiles = (T + p.block_m - 1) / p.block_m;
    p.up_splits = splits_for(row_tiles * ((S + kGemmUpBN - 1) / kGemmUpBN), (D + kGemmBK - 1) / kGemmBK);
    p.down_splits = splits_for(row_tiles * ((D + kGemmBN - 1) / kGemmBN), (S + kGemmBK - 1) / kGemmBK);
  }
  // One scratch for both: the up reduce has read it before the down launch writes it (one stream).
  const int64_t up = p.up_splits > 1 ? 2LL * p.up_splits * T * S : 0;
  const int64_t down = p.down_splits > 1 ? static_cast<int64_t>(p.down_splits) * T * D : 0;
  p.partial_floats = std::max(up, down);
  return p;
}

void shared_expert_cuda(const SharedExpertParams& p, void* stream, int device) {
  const DeviceGuard device_guard(device);
  auto s = [](int64_t v) { return std::to_string(v); };
  if (p.T < 0) throw std::invalid_argument("shared_expert: T must be >= 0; got " + s(p.T));
  if (p.T == 0) return;
  const SharedExpertPlan plan = shared_expert_plan(p.T, p.D, p.S, p.x_stride == p.D);
  if (plan.partial_floats > 0 && !p.partial)
    throw std::invalid_argument("shared_expert: T=" + s(p.T) + " D=" + s(p.D) + " S=" + s(p.S) +
                                " splits a projection: partial must hold shared_expert_plan(...)"
                                ".partial_floats = " + s(plan.partial_floats) + " floats");
  auto st = static_cast<cudaStream_t>(stream);
  if (plan.decode) {
    MoeDecodeParams d{};
    d.x = p.x;
    d.topk_ids = nullptr;  // dense: every slot is expert 0
    d.experts_gate_up = p.gate_up;
    d.experts_down = p.down;
    d.act = p.act;
    d.expert_out = p.shared_out;
    d.T = p.T, d.k_max = 1, d.E = 1, d.D = p.D, d.F = p.S;
    d.partial = p.partial, d.k_splits = plan.down_splits;
    moe_decode_cuda(d, stream);
  } else {
    ExpertGemmParams g{};
    g.sorted_slots = nullptr, g.tile_experts = nullptr, g.num_padded = nullptr;  // dense: row i = token i
    g.T = p.T, g.k_max = 1, g.E = 1, g.D = p.D, g.F = p.S, g.capacity = p.T;
    g.block_m = plan.block_m;
    g.a = p.x, g.a_stride = p.x_stride, g.w = p.gate_up, g.c = p.act, g.up = true;
    g.partial = p.partial, g.k_splits = plan.up_splits;
    expert_gemm_cuda(g, stream);
    if (plan.up_splits > 1) shared_detail::reduce<true>(p.partial, p.act, plan.up_splits, p.T, p.S, st);
    g.a = p.act, g.a_stride = p.S, g.w = p.down, g.c = p.shared_out, g.up = false;
    g.k_splits = plan.down_splits;
    expert_gemm_cuda(g, stream);
  }
  if (plan.down_splits > 1) shared_detail::reduce<false>(p.partial, p.shared_out, plan.down_splits, p.T, p.D, st);
}

}  // namespace moe
