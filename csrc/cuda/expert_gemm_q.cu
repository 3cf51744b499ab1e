// expert_gemm_q: expert_gemm (the grouped GEMM over aligned slots, csrc/cuda/expert_gemm.cu) on
// weight-only quantized experts (4 or 8 bits, group-wise along Din) in the qrow layout that
// qrepack_cuda writes at load (csrc/cuda/moe_decode_q.cu's header: layout and bytes per row).
//
// Shape legend: T tokens, D hidden, E experts, k_max top-k width, F expert width,
// R = T*k_max slots, capacity = padded slot capacity, BM = block_m; b bits, g group size.
//
// Formula: expert_gemm's, with W[e, n, k] = s[k / g] (q - z) of row n (docs/quantization.md):
//   up:   act[i, f] = silu(h . Wg[e, f]) * (h . Wu[e, f]),  h = x[s / k_max]      act [capacity, F]
//   down: expert_out[s, d] = act[i] . Wd[e, d]                                   expert_out [R, D]
//   (i sorted position, e = tile_experts[i / BM], s = sorted_slots[i]); the same slot gather,
//   padding rows neither read nor written, sentinel slots' expert_out rows written as zeros
//   (topk_ids given, down), dense mode (slot lists null: row i is slot i, expert 0).
//
// Algorithm: expert_gemm's CTA tiles, warp layout, A gather (cp.async, XOR swizzle) and
//   (from the same code, csrc/cuda/expert_gemm_common.cuh: tile rows, mma k-tile, epilogue)
//   ldmatrix + mma.sync.m16n8k16 bf16 main loop with fp32 accumulators; only W differs. Each
//   stage of the cp.async ring holds the A tile and the raw codes of the CTA's 128 weight rows for
//   64 k (32 B a row at 4 bits, 64 B at 8; one or two 16-byte chunks per thread and row pair, no
//   swizzle: they are read once, row by row). After a stage lands, thread r dequantises weight
//   row r's 64 k into a bf16 tile (128 x 64, expert_gemm's swizzled layout) with the
//   csrc/cuda/dequant_q.cuh conversion (its meta word, 1 or 2 per k-tile, read from global: L1/L2
//   hits, 4 B per 32-64 codes); a barrier; then the mma loop reads A from the stage and B from
//   that tile through ldmatrix exactly as expert_gemm does. The next stage's copies are in flight
//   during both. The weights enter the tensor cores rounded to bf16 (s (q - z) has up to 20
//   significant bits): the only numeric difference from the exact dequantised reference.
//
// Tiles (128 threads): BM 16: 4 stages, warps 1 x 4; BM 64: 3 stages, warps 2 x 2 (as expert_gemm).
//   Dynamic smem = stages x (BM x 128 B of A + 128 rows x 64 b / 8 B of codes) + 16 KB bf16 tile:
//     BM 16: 4-bit 40 KB, 8-bit 56 KB;   BM 64: 4-bit 52 KB, 8-bit 64 KB (attribute set once).
//   Dout tile: up 64 act columns (128 weight rows: 64 gate + 64 up), down 128 output columns.
// Memory traffic: per touched expert and row tile the (2F + D) rows of qcuda_row_bytes (further
//   row tiles of one expert hit L2), x / act / expert_out as expert_gemm. DeepSeekMoE-16B 4-bit
//   g128: 4.60 MB per expert (bf16 17.3 MB), 8-bit g128 8.93 MB.
// Batch invariance: bitwise for T > 16, as expert_gemm (each output row accumulates its k-steps in
//   the same order in any tile; the dequantised tile does not depend on the rows).
// ptxas (CUDA 13.0, -O3; tools/check_ptxas.py), registers sm_80 / sm_90a, 0 spills, no stack:
//   BM 16  up 4-bit 71 / 72, 8-bit 80 / 72;  down 4-bit 72 / 71, 8-bit 80 / 72
//   BM 64  up 4-bit 166 / 166, 8-bit 166 / 166;  down 4-bit 129 / 128, 8-bit 160 / 160
//   Static smem 128 B (BM 16) / 512 B (BM 64) (s_src, s_dst) + the dynamic smem above. Registers
//   allow 3 CTAs per SM at BM 64 (4 for 4-bit down on sm_90a), 6-7 at BM 16; the dynamic smem
//   caps BM 64 at 3-4 CTAs on H100 / H200 and 2-3 on A100. (expert_gemm's BM 64 tiles are
//   128 registers; the dequantisation's meta pointer, scale and bias add to that here.)
// Launch: grid (ceil(capacity / BM), ceil(Dout / BN)), block 128, dynamic smem as above.
// Limits: D, F multiples of 8; a, w 16-byte aligned; a_stride a multiple of 8; block_m 16 or 64;
//   bits 4 or 8, g 32 / 64 / 128; one expert's qrow bytes < 2^31.
// What the emulator shows (tests/emu/test_expert_gemm_q.py): the gather, the code ring, the
//   dequantised tile's layout and barriers, the fragments, against a double-precision
//   dequantise-then-matmul reference. What it cannot: timing, occupancy, bank conflicts, the
//   tensor cores' accumulation order, weak-memory effects between the ring and its barriers.
#include "common.cuh"
#include "expert_gemm_common.cuh"
#include "dequant_q.cuh"
#include "ptx.cuh"
#include "ops.h"

#include <stdexcept>
#include <string>

namespace moe {
namespace gemm_q_detail {  // named, so the kernel files can share one translation unit in tests

using bf16 = __nv_bfloat16;

using namespace gemm_common;  // expert_gemm's kThreads, kBK, kChunks, kWRows, Tile, swz and shared steps

template <int BITS> constexpr int kCodeChunksPerRow = kBK * BITS / 8 / 16;  // 2 (4-bit) or 4 (8-bit)
// 16-byte chunks per stage (A tile + codes); variable templates, so device code reads them too
template <int BM, int BITS> constexpr int kStageChunksQ = BM * kChunks + kWRows * kCodeChunksPerRow<BITS>;
template <int BM, int BITS> constexpr int kSmemBytes = (Tile<BM>::kStages * kStageChunksQ<BM, BITS> + kWRows * kChunks) * 16;


template <int BM, bool UP, int BITS>
__global__ void __launch_bounds__(kThreads) expert_gemm_q_kernel(const ExpertGemmQParams p) {
  constexpr int kStages = Tile<BM>::kStages;
  constexpr int kWarpsN = Tile<BM>::kWarpsN;
  constexpr int BN = Warps<BM, UP>::BN;
  constexpr int kAChunks = BM * kChunks, kStageChunks = kStageChunksQ<BM, BITS>;
  constexpr int kCPR = kCodeChunksPerRow<BITS>;

  const int m_tile = blockIdx.x, n0 = blockIdx.y * BN;
  const int row0 = m_tile * BM;
  if constexpr (!UP) {
    if (p.topk_ids) zero_sentinel_rows<BN>(p, m_tile, n0);  // (expert_gemm.cu's header)
  }
  const int num_padded = p.num_padded ? *p.num_padded : p.capacity;
  if (row0 >= num_padded) return;
  const int e = p.tile_experts ? p.tile_experts[m_tile] : 0;
  if (e < 0 || e >= p.E) return;

  const int Dout = UP ? p.F : p.D, Din = UP ? p.D : p.F;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  MOE_DYNAMIC_SHARED(uint4, smem);
  MOE_SHARED_ARRAY(int, s_src, BM);
  MOE_SHARED_ARRAY(int, s_dst, BM);
  tile_rows<BM, UP>(p, row0, num_padded, s_src, s_dst);
  __syncthreads();

  const bf16* A = static_cast<const bf16*>(p.a);
  const int row_bytes = static_cast<int>(qcuda_row_bytes(Din, p.fmt));
  const int code_bytes = static_cast<int>(qcuda_code_bytes(Din, p.fmt));
  const uint8_t* W = static_cast<const uint8_t*>(p.w) + static_cast<int64_t>(e) * (UP ? 2 : 1) * Dout * row_bytes;
  // Weight row of tile row r: down n0 + r; up: gate row n0 + r (r < 64), up row Dout + n0 + r - 64.
  auto w_row = [&](int r) {
    const int n = n0 + (UP ? r % BN : r);
    return n < Dout ? (UP && r >= BN ? Dout + n : n) : -1;
  };

  // A: thread tid copies chunk ch = tid % 8 of tile rows r0 + 16 i (expert_gemm's scheme).
  constexpr int kARows = BM / 16;
  const int ch = tid % kChunks, r0 = tid / kChunks;
  const int dst0 = swz(r0, ch);
  int a_off[kARows];
#pragma unroll
  for (int i = 0; i < kARows; ++i) {
    const int row = s_src[r0 + 16 * i];
    a_off[i] = row >= 0 ? row * static_cast<int>(p.a_stride) + ch * 8 : -1;
  }
  // Codes: chunk c = tid + 128 i of the stage is row c / kCPR, chunk c % kCPR (kCPR <= 4 divides
  // 128, so the chunk column is fixed per thread and the row advances by 128 / kCPR).
  constexpr int kCodeIters = kWRows * kCPR / kThreads;
  const int cc = tid % kCPR, cr0 = tid / kCPR;
  int w_off[kCodeIters];  // byte offset of the row's chunk cc at k = 0 in this expert; -1 = no row
#pragma unroll
  for (int i = 0; i < kCodeIters; ++i) {
    const int wr = w_row(cr0 + i * (kThreads / kCPR));
    w_off[i] = wr >= 0 ? wr * row_bytes + cc * 16 : -1;
  }

  auto load_stage = [&](int stage, int kt) {
    uint4* st = smem + stage * kStageChunks;
    const int k0 = kt * kBK;
    const bool k_ok = k0 + ch * 8 < Din;
#pragma unroll
    for (int i = 0; i < kARows; ++i) {
      const bool ok = k_ok && a_off[i] >= 0;
      cp_async_16_zfill(st + dst0 + 16 * i * kChunks, A + (ok ? a_off[i] + k0 : 0), ok);
    }
    const bool kc_ok = k0 + cc * (128 / BITS) < Din;  // the chunk starts below Din, so ends within the padded codes
#pragma unroll
    for (int i = 0; i < kCodeIters; ++i) {
      const bool ok = kc_ok && w_off[i] >= 0;
      cp_async_16_zfill(st + kAChunks + tid + i * kThreads, ok ? W + w_off[i] + k0 * BITS / 8 : W, ok);
    }
  };

  // Thread r dequantises weight row r of the k-tile into the bf16 tile (zeros past Dout and Din).
  uint4* sB = smem + kStages * kStageChunks;
  const int my_row = w_row(tid);
  const uint32_t* my_meta = my_row >= 0 ? reinterpret_cast<const uint32_t*>(W + static_cast<int64_t>(my_row) * row_bytes + code_bytes)
                                        : nullptr;
  const int g = p.fmt.group_size;
  const bool scales_bf16 = p.fmt.scales_bf16;
  auto dequant_tile = [&](int stage, int kt) {
    const uint4* codes = smem + stage * kStageChunks + kAChunks;
    const int k0 = kt * kBK;
#pragma unroll
    for (int c = 0; c < kCPR; ++c) {
      const int kc = k0 + c * (128 / BITS);  // first k of this code chunk (one group)
      float s = 0.0f, bias = 0.0f;
      const bool live = my_meta != nullptr && kc < Din;
      if (live) qdq::scale_bias(my_meta[kc / g], scales_bf16, s, bias);
      const uint4 w = codes[tid * kCPR + c];
#pragma unroll
      for (int sub = 0; sub < (128 / BITS) / 8; ++sub) {  // 8-k slices per code chunk
        const int j = c * ((128 / BITS) / 8) + sub;  // 8-k slice of the tile
        uint4 packed{0, 0, 0, 0};
        if (live && kc + 8 * sub < Din) {
          float v[8];
          qdq::dequant8<BITS>(w, sub, s, bias, v);
          uint32_t words[4];
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            const __nv_bfloat162 b2 = __floats2bfloat162_rn(v[2 * h], v[2 * h + 1]);
            words[h] = static_cast<uint32_t>(static_cast<__nv_bfloat16_raw>(b2.x).x) |
                       (static_cast<uint32_t>(static_cast<__nv_bfloat16_raw>(b2.y).x) << 16);
          }
          packed = uint4{words[0], words[1], words[2], words[3]};
        }
        sB[swz(tid, j)] = packed;
      }
    }
  };

  float acc[Warps<BM, UP>::NMAT][Warps<BM, UP>::MI][Warps<BM, UP>::NI][4] = {};
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int KT = (Din + kBK - 1) / kBK;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed; stage kt-1 and the bf16 tile are no longer being read
    if (kt + kStages - 1 < KT) load_stage((kt + kStages - 1) % kStages, kt + kStages - 1);
    cp_async_commit();
    dequant_tile(kt % kStages, kt);
    __syncthreads();  // the bf16 tile is complete

    const uint4* sA = smem + (kt % kStages) * kStageChunks;
    mma_ktile<BM, UP>(acc, sA, sB, wm, wn, lane);
  }

  cp_async_wait<0>();

  store_tile<BM, UP>(acc, static_cast<bf16*>(p.c), s_dst, n0, Dout, wm, wn, lane);
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("expert_gemm_q: " + what); }

template <int BM, bool UP, int BITS>
void launch(const ExpertGemmQParams& p, cudaStream_t stream) {
  constexpr int BN = Warps<BM, UP>::BN;
  const int Dout = UP ? p.F : p.D;
  const dim3 grid((p.capacity + BM - 1) / BM, (Dout + BN - 1) / BN);
  constexpr int smem = kSmemBytes<BM, BITS>;
  auto* expert_gemm_q = &expert_gemm_q_kernel<BM, UP, BITS>;
  static DeviceOnce smem_attribute;
  smem_attribute.run(
      [&] { MOE_CUDA_CHECK(cudaFuncSetAttribute(expert_gemm_q, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)); });
  MOE_LAUNCH(expert_gemm_q, grid, dim3(kThreads), smem, stream, p);
  MOE_CUDA_CHECK(cudaGetLastError());
}

template <int BM, bool UP>
void launch_bits(const ExpertGemmQParams& p, cudaStream_t stream) {
  if (p.fmt.bits == 4) launch<BM, UP, 4>(p, stream);
  else launch<BM, UP, 8>(p, stream);
}

}  // namespace gemm_q_detail

void expert_gemm_q_cuda(const ExpertGemmQParams& p, void* stream, int device) {
  const DeviceGuard device_guard(device);
  using namespace gemm_q_detail;
  auto s = [](int64_t v) { return std::to_string(v); };
  if (p.fmt.bits != 4 && p.fmt.bits != 8) bad("bits=" + s(p.fmt.bits) + ", expected 4 or 8");
  if (p.fmt.group_size != 32 && p.fmt.group_size != 64 && p.fmt.group_size != 128)
    bad("group_size=" + s(p.fmt.group_size) + ", expected 32, 64 or 128");
  if (p.T < 0 || p.k_max < 1 || p.E < 1 || p.capacity < 0)
    bad("need T >= 0, k_max >= 1, E >= 1, capacity >= 0; got T=" + s(p.T) + " k_max=" + s(p.k_max) +
        " E=" + s(p.E) + " capacity=" + s(p.capacity));
  if (p.D <= 0 || p.F <= 0 || p.D % 8 || p.F % 8)
    bad("D and F must be positive multiples of 8 (16-byte loads); got D=" + s(p.D) + " F=" + s(p.F));
  if (p.block_m != 16 && p.block_m != 64) bad("block_m must be 16 or 64; got " + s(p.block_m));
  if (static_cast<int64_t>(p.T) * p.k_max >= (1LL << 31)) bad("T*k_max overflows int32");
  const int Din = p.up ? p.D : p.F;
  const int64_t rows = p.up ? 2LL * p.F : p.D;
  if (rows * qcuda_row_bytes(Din, p.fmt) >= (1LL << 31)) bad("an expert's qrow bytes must be < 2^31 (int32 offsets)");
  const int64_t a_rows = p.up ? p.T : p.capacity;
  if (a_rows * p.a_stride >= (1LL << 31)) bad("a must have < 2^31 elements (int32 offsets)");
  const bool dense = !p.sorted_slots && !p.tile_experts && !p.num_padded;
  if (!dense && (!p.sorted_slots || !p.tile_experts || !p.num_padded))
    bad("sorted_slots, tile_experts and num_padded must be all set or all null (dense mode)");
  if (!p.a || !p.w || !p.c) bad("a, w and c must be non-null");
  if (p.a_stride < Din || p.a_stride % 8) bad("a_stride must be >= " + s(Din) + " and a multiple of 8; got " + s(p.a_stride));
  auto misaligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 != 0; };
  if (misaligned(p.a) || misaligned(p.w) || misaligned(p.c)) bad("a, w and c must be 16-byte aligned");
  if (p.capacity == 0 || p.T == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  if (p.block_m == 16) p.up ? launch_bits<16, true>(p, st) : launch_bits<16, false>(p, st);
  else p.up ? launch_bits<64, true>(p, st) : launch_bits<64, false>(p, st);
}

}  // namespace moe
