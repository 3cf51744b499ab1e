// expert_gemm: the grouped GEMM of the MoE layer over the aligned slots (bf16 tensor cores).
//
// Shape legend: T tokens, D hidden, E experts, k_max top-k width, F expert width,
// R = T*k_max slots, capacity = padded slot capacity (ops.h align_capacity), BM = block_m.
//
// Formula (i = sorted position, e = tile_experts[i / BM], s = sorted_slots[i], s < 0 = padding):
//   up:   act[i, f]         = silu(h . Wg[e, f]) * (h . Wu[e, f]),  h = x[s / k_max],
//         Wg = experts_gate_up[e, 0:F), Wu = experts_gate_up[e, F:2F)      act [capacity, F]
//   down: expert_out[s, d]  = act[i] . experts_down[e, d]                     expert_out [R, D]
//   Unweighted and in token order: expert_out is the hook_expert_out tap; combine applies the
//   routing weights. Padding rows are neither read (their A rows are zero-filled) nor written.
//   Slots whose id is a sentinel never appear in sorted_slots; with topk_ids given, the down
//   launch writes their expert_out rows as zeros (CTA column x zeroes slots x, x + grid.x, ...
//   in its N tile), the same as moe_decode, so every path leaves the same bits there (combine
//   skips sentinel slots by id either way).
//
// Algorithm (tiles, tile rows, mma k-tile and epilogue in csrc/cuda/expert_gemm_common.cuh,
//   shared with expert_gemm_q.cu): one CTA per (BM-row tile, N tile). A rows are gathered
//   through sorted_slots straight
//   from x (no activation copy). K is walked in steps of 64 (one 128-byte smem row per tile row)
//   through a cp.async ring of STAGES buffers (zero-fill for padding rows and the N / K tails);
//   fragments come from XOR-swizzled smem (chunk ^ (row & 7): the 8 rows one ldmatrix phase
//   reads hit 8 distinct 16-byte bank groups) through ldmatrix.x4 into mma.sync.m16n8k16 bf16
//   with fp32 accumulators. The up CTA stages 64 gate rows and the 64 matching up rows, so every
//   lane holds the gate and up accumulator of the same (row, column) and the epilogue writes
//   silu(g)*u in bf16 (the [.., 2F] intermediate never reaches memory; rounded once).
//   Tiles at or past num_padded (a device value) exit at once, so the grid is sized for the
//   worst case (capacity / BM tiles) and the launch is CUDA-graph safe.
//   Split-K (k_splits > 1; dense mode; shared_expert.cu's small batches): grid z = k_splits,
//   CTA z walks k-tiles [z c, (z + 1) c), c = ceil(KT / k_splits), and stores its fp32 accumulators
//   to partial [k_splits, capacity, D] (down) or [k_splits, capacity, 2F] (up: gate and up sums;
//   silu needs the whole sums, so the caller's reduce applies it); the caller adds the ranges in
//   order z = 0, 1, ... Registers of the split kernels: shared_expert.cu.
//
// Tiles (128 threads = 4 warps; each stage = BM x 64 of A + 128 x 64 of W):
//   BM = 16: 4 stages, warps 1 x 4, warp tile 16 x 16 (up: gate+up) / 16 x 32 (down);
//            smem 4 x (2 KB + 16 KB) = 72 KB.   For batches with few rows per expert.
//   BM = 64: 3 stages, warps 2 x 2, warp tile 32 x 32 (up: gate+up) / 32 x 64 (down);
//            smem 3 x (8 KB + 16 KB) = 72 KB.
//   N tile: up 64 act columns (128 weight rows), down 128 output columns. F = 1408 = 22 x 64,
//   D = 2048 = 16 x 128 and K (= D or F) = 32 or 22 steps of 64: the 16B layer has no tails;
//   other sizes are handled by zero-fill and masked stores (D, F multiples of 8).
//   Grid: x = capacity / BM row tiles (fastest, so the CTAs of one expert and N tile run side by
//   side and share its weights in L2), y = N tiles. 72 KB lets 3 CTAs share an H100 SM
//   (2 on A100); the (STAGES - 1) stages in flight per CTA are more than an SM needs to hide
//   memory latency at full bandwidth (worked out in bench/README.md).
//   expert_gemm_block_m(T, k_max, E) = 64 when R >= 32 E (>= 32 rows per expert on average),
//   else 16; align pads to it (vLLM's H100 tables switch near the same point).
//
// Memory traffic (bf16): weights 2 bytes x (2F D + D F) per touched expert and row tile
//   (re-reads of one expert's weights by its further row tiles come from L2), x rows
//   2 D x R (L2 hits after the first), act written 2 F x R and read back once, expert_out 2 D x R.
//   DeepSeekMoE-16B layer (D 2048, F 1408, E 64, k 6), one expert = 17.3 MB; experts touched
//   64 (1 - (58/64)^T):
//     T = 1, 8   -> moe_decode.cu (no sort, no padding waste).
//     T = 64     BM 16: 63.9 experts, ~6 rows each, 1.106 GB + ~3 MB x/act/out.
//                ~64 row tiles x (22 up + 16 down) N tiles = ~2,400 working CTAs (another ~20
//                row tiles past num_padded exit at once).
//     T = 512    BM 64: 64 experts, ~48 rows each (~1 % need a second tile), 1.107 GB +
//                ~25 MB act/x/out; its 53 GFLOP take mma.sync far less time than the weight
//                stream, so still bandwidth bound; ~65 x 22 + 65 x 16 CTAs.
//   H100 floors and expected fractions (projections, no GPU has run this yet): bench/README.md.
// Address generation (issue-bound before): each thread's cp.async sources are fixed per CTA (its
//   chunk column of rows r0 + 16 i), kept as int32 offsets and advanced by k0 per stage: no
//   div/mod, no per-chunk branch, no 64-bit multiply in the K loop (9 / 12 cp.async per thread and
//   stage, fully unrolled). Results are bit for bit those of the former per-chunk loop (checked on
//   the emulator, dense and gathered, BM 16 and 64, K and N tails). ptxas (CUDA 13.0, -O3),
//   registers sm_80 / sm_90a and whole-kernel PTX instructions, before -> after:
//     BM 16 up    50 / 48 regs, 1500 PTX  ->  55 / 56 regs, 1142 PTX
//     BM 16 down  58 / 59 regs, 2160 PTX  ->  64 / 56 regs, 1136 PTX
//     BM 64 up   127 / 124 regs, 2116 PTX -> 128 / 128 regs, 1974 PTX
//     BM 64 down 130 / 123 regs, 2193 PTX -> 128 / 128 regs, 1553 PTX
//   zero spills throughout. CTAs per SM: registers allow 8-10 (BM 16) and 3-4 (BM 64) before and
//   after; the 72 KB of shared memory caps both at 3 on H100/H200 and 2 on A100. (No SASS
//   disassembler in this toolkit: the SASS instruction counts wait for a GPU machine.)
// Batch invariance: bitwise for T > 16 (at block_m 16 and 64 alike): each output row
//   accumulates its k-steps of 64 (4 mma of k 16) in the same order in any tile, and no value
//   mixes rows. moe_decode (T <= 16) gives other low bits, within tolerance:
//   tests/emu/test_batch_invariance.py.
// Launch: grid (ceil(capacity / BM), ceil(N / BN)), block 128, dynamic smem 72 KB (attribute set once
//   per instantiation and device: DeviceOnce).
// Limits: D, F multiples of 8 (16-byte cp.async); a, w 16-byte aligned; a_stride multiple of 8;
//   block_m in {16, 64}; R and capacity < 2^31; N tiles < 65536.
// Reference: src/moe_engine/ops/expert_ffn.py expert_ffn_ref (align + up + down together);
//   CPU twin: csrc/cpu/expert_ffn.cpp; test: tests/emu/cpp/expert_gemm_test.cu driven by
//   tests/emu/test_expert_gemm.py (double-precision reference; tolerances in
//   tests/emu/cpp/moe_test_util.h);
//   nvcc build / spill check: tests/emu/test_nvcc_build.py.
#include "common.cuh"
#include "expert_gemm_common.cuh"
#include "ptx.cuh"
#include "ops.h"

#include <stdexcept>
#include <string>

namespace moe {
namespace gemm_detail {  // named, so the kernel files can share one translation unit in tests

using bf16 = __nv_bfloat16;

using namespace gemm_common;  // kThreads, kBK, kChunks, kWRows, Tile, swz and the shared steps

template <int BM> constexpr int stage_bytes() { return (BM + kWRows) * kBK * 2; }
template <int BM> constexpr int smem_bytes() { return Tile<BM>::kStages * stage_bytes<BM>(); }

// SPLIT (dense mode): CTA z = blockIdx.z walks k-tiles [z c, min(KT, (z + 1) c)),
// c = ceil(KT / gridDim.z), and writes fp32 sums to p.partial + z capacity D (down) or
// + z capacity 2F (up: gate and up sums, store_tile); an empty range writes zeros.
template <int BM, bool UP, bool SPLIT = false>
__global__ void __launch_bounds__(kThreads) expert_gemm_kernel(const ExpertGemmParams p) {
  constexpr int kStages = Tile<BM>::kStages;
  constexpr int kWarpsN = Tile<BM>::kWarpsN;
  constexpr int BN = Warps<BM, UP>::BN;  // output columns per CTA
  constexpr int kAChunks = BM * kChunks, kStageChunks = (BM + kWRows) * kChunks;

  const int m_tile = blockIdx.x, n0 = blockIdx.y * BN;
  const int row0 = m_tile * BM;
  if constexpr (!UP) {
    if (p.topk_ids) zero_sentinel_rows<BN>(p, m_tile, n0);  // (see the header)
  }
  const int num_padded = p.num_padded ? *p.num_padded : p.capacity;
  if (row0 >= num_padded) return;
  const int e = p.tile_experts ? p.tile_experts[m_tile] : 0;
  if (e < 0 || e >= p.E) return;  // align never emits such a tile below num_padded

  const int N = UP ? p.F : p.D, K = UP ? p.D : p.F;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  MOE_DYNAMIC_SHARED(uint4, smem);
  MOE_SHARED_ARRAY(int, s_src, BM);  // A row of each tile row, -1 = padding
  MOE_SHARED_ARRAY(int, s_dst, BM);  // output row of each tile row, -1 = padding
  tile_rows<BM, UP>(p, row0, num_padded, s_src, s_dst);
  __syncthreads();

  const bf16* A = static_cast<const bf16*>(p.a);
  const bf16* W = static_cast<const bf16*>(p.w) + static_cast<int64_t>(e) * (UP ? 2 : 1) * N * K;

  // Address generation, once per CTA. With 128 threads and 8 16-byte chunks per 64-wide smem
  // row, thread tid always copies chunk ch = tid % 8 of rows r0 + 16 i (r0 = tid / 8): the A rows
  // i < BM / 16, then 8 weight rows. So its source pointers at k = ch * 8 and its swizzled smem
  // slots are fixed for the whole K walk; a stage only adds k0 (no div/mod, no per-chunk branch).
  constexpr int kARows = BM / 16, kWRowsPer = kWRows / 16;  // rows per thread and stage
  static_assert(kThreads == 16 * kChunks, "each thread owns one chunk column of every 16th row");
  const int ch = tid % kChunks, r0 = tid / kChunks;
  const int dst0 = swz(r0, ch);  // (r0 + 16 i) & 7 == r0 & 7: row i's slot is dst0 + 16 i kChunks
  // Offsets, not 64-bit pointers, keep the registers of the BM = 64 tiles within 3 CTAs per SM:
  // int32 is enough (launcher check: a's rows x a_stride and one expert's weights < 2^31).
  int a_off[kARows];  // A row start + ch * 8; -1 = padding row (zero-filled)
#pragma unroll
  for (int i = 0; i < kARows; ++i) {
    const int row = s_src[r0 + 16 * i];
    a_off[i] = row >= 0 ? row * static_cast<int>(p.a_stride) + ch * 8 : -1;
  }
  // Weight row of stage row r = r0 + 16 i: down: n0 + r; up: gate row n0 + r for r < 64 (i < 4),
  // up row N + n0 + r - 64 after. Row i exists when 16 (i % 4) (up) / 16 i (down) < w_left.
  const bf16* w_src = W + static_cast<int64_t>(n0 + r0) * K + ch * 8;
  const int w_left = N - n0 - r0, up_off = (N - BN) * K;

  auto load_stage = [&](int stage, int kt) {
    uint4* st = smem + stage * kStageChunks + dst0;
    const int k0 = kt * kBK;
    const bool k_ok = k0 + ch * 8 < K;
#pragma unroll
    for (int i = 0; i < kARows; ++i) {
      const bool ok = k_ok && a_off[i] >= 0;
      cp_async_16_zfill(st + 16 * i * kChunks, A + (ok ? a_off[i] + k0 : 0), ok);
    }
#pragma unroll
    for (int i = 0; i < kWRowsPer; ++i) {
      const bool up_row = UP && 16 * i >= BN;
      const bool ok = k_ok && 16 * (up_row ? i - BN / 16 : i) < w_left;
      cp_async_16_zfill(st + kAChunks + 16 * i * kChunks,
                        ok ? w_src + (16 * i * K + (up_row ? up_off : 0) + k0) : W, ok);
    }
  };

  float acc[Warps<BM, UP>::NMAT][Warps<BM, UP>::MI][Warps<BM, UP>::NI][4] = {};
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  int KT = (K + kBK - 1) / kBK, kt0 = 0;  // this CTA's k-tiles: [kt0, kt0 + KT)
  if constexpr (SPLIT) {
    const int chunk = (KT + static_cast<int>(gridDim.z) - 1) / static_cast<int>(gridDim.z);
    kt0 = static_cast<int>(blockIdx.z) * chunk;
    KT = max(0, min(KT - kt0, chunk));
  }

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_stage(s, kt0 + s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for everyone; stage kt-1 is no longer being read
    if (kt + kStages - 1 < KT) load_stage((kt + kStages - 1) % kStages, kt0 + kt + kStages - 1);
    cp_async_commit();

    const uint4* sA = smem + (kt % kStages) * kStageChunks;
    const uint4* sW = sA + kAChunks;
    mma_ktile<BM, UP>(acc, sA, sW, wm, wn, lane);
  }

  cp_async_wait<0>();  // only empty groups remain; retire them so no copy outlives the CTA

  if constexpr (SPLIT)
    store_tile<BM, UP>(acc, p.partial + static_cast<int64_t>(blockIdx.z) * p.capacity * (UP ? 2 : 1) * N, s_dst, n0,
                       N, wm, wn, lane);
  else
    store_tile<BM, UP>(acc, static_cast<bf16*>(p.c), s_dst, n0, N, wm, wn, lane);
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("expert_gemm: " + what); }

template <int BM, bool UP, bool SPLIT = false>
void launch(const ExpertGemmParams& p, cudaStream_t stream) {
  constexpr int BN = Warps<BM, UP>::BN;
  const int N = UP ? p.F : p.D;
  const dim3 grid((p.capacity + BM - 1) / BM, (N + BN - 1) / BN, SPLIT ? p.k_splits : 1);
  constexpr int smem = smem_bytes<BM>();
  auto* expert_gemm = &expert_gemm_kernel<BM, UP, SPLIT>;  // one token for MOE_LAUNCH (and its messages)
  static DeviceOnce smem_attribute;  // per instantiation and device; not on every launch
  smem_attribute.run(
      [&] { MOE_CUDA_CHECK(cudaFuncSetAttribute(expert_gemm, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)); });
  MOE_LAUNCH(expert_gemm, grid, dim3(kThreads), smem, stream, p);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace gemm_detail

int expert_gemm_block_m(int T, int k_max, int E) {
  return static_cast<int64_t>(T) * k_max >= 32LL * E ? 64 : 16;
}

void expert_gemm_cuda(const ExpertGemmParams& p, void* stream, int device) {
  const DeviceGuard device_guard(device);
  using namespace gemm_detail;
  auto s = [](int64_t v) { return std::to_string(v); };
  if (p.T < 0 || p.k_max < 1 || p.E < 1 || p.capacity < 0)
    bad("need T >= 0, k_max >= 1, E >= 1, capacity >= 0; got T=" + s(p.T) + " k_max=" + s(p.k_max) +
        " E=" + s(p.E) + " capacity=" + s(p.capacity));
  if (p.D <= 0 || p.F <= 0 || p.D % 8 || p.F % 8)
    bad("D and F must be positive multiples of 8 (16-byte loads); got D=" + s(p.D) + " F=" + s(p.F));
  if (p.block_m != 16 && p.block_m != 64) bad("block_m must be 16 or 64; got " + s(p.block_m));
  if (static_cast<int64_t>(p.T) * p.k_max >= (1LL << 31)) bad("T*k_max overflows int32");
  if (2LL * p.F * p.D >= (1LL << 31)) bad("an expert's weight matrix must have < 2^31 elements (int32 offsets)");
  const int64_t a_rows = p.up ? p.T : p.capacity;
  if (a_rows * p.a_stride >= (1LL << 31)) bad("a must have < 2^31 elements (int32 offsets)");
  const bool dense = !p.sorted_slots && !p.tile_experts && !p.num_padded;
  if (!dense && (!p.sorted_slots || !p.tile_experts || !p.num_padded))
    bad("sorted_slots, tile_experts and num_padded must be all set or all null (dense mode)");
  if (!p.a || !p.w || !p.c) bad("a, w and c must be non-null");
  const int K = p.up ? p.D : p.F;
  if (p.a_stride < K || p.a_stride % 8)
    bad("a_stride must be >= " + s(K) + " and a multiple of 8; got " + s(p.a_stride));
  auto misaligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 != 0; };
  if (misaligned(p.a) || misaligned(p.w) || misaligned(p.c)) bad("a, w and c must be 16-byte aligned");
  const bool split = p.k_splits > 1;
  if (p.k_splits < 0 || p.k_splits > 64) bad("k_splits must be in [0, 64]; got " + s(p.k_splits));
  if (split && (!dense || p.topk_ids || !p.partial))
    bad("k_splits > 1 needs dense mode (no topk_ids) and a partial buffer [k_splits, capacity, D] "
        "(down) or [k_splits, capacity, 2F] (up)");
  if (split && misaligned(p.partial)) bad("partial must be 16-byte aligned");
  if (p.capacity == 0 || p.T == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  if (split && p.block_m == 16) p.up ? launch<16, true, true>(p, st) : launch<16, false, true>(p, st);
  else if (split) p.up ? launch<64, true, true>(p, st) : launch<64, false, true>(p, st);
  else if (p.block_m == 16) p.up ? launch<16, true>(p, st) : launch<16, false>(p, st);
  else p.up ? launch<64, true>(p, st) : launch<64, false>(p, st);
}

}  // namespace moe
