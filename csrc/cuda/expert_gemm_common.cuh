// The parts of the grouped expert GEMM written once for its two kernels: expert_gemm.cu (bf16
// experts) and expert_gemm_q.cu (quantized experts, whose B tile is dequantised into shared memory
// first). Everything here is expert_gemm.cu's algorithm (its header explains it); every function
// is force-inlined, so the kernels' code and registers are those they had before this header.
//
//   Tile<BM>, swz        the CTA tiles and the XOR swizzle of a [rows, kChunks] smem tile
//   zero_sentinel_rows   down with topk_ids: the sentinel slots' expert_out rows of the N tile = 0
//   tile_rows            each tile row's A row (s_src) and output row (s_dst); -1 = padding
//   mma_ktile            one k-tile: ldmatrix A and B fragments, mma.sync m16n8k16 into acc
//   store_tile           the epilogue: silu(gate) * up (up) or the sum (down), bf16 pairs to C
// Params is ExpertGemmParams or ExpertGemmQParams (ops.h): the fields read here are common.
#pragma once

#include "common.cuh"
#include "ptx.cuh"

namespace moe {
namespace gemm_common {

constexpr int kThreads = 128;
constexpr int kBK = 64;               // K elements per stage: a 128-byte smem row per tile row
constexpr int kChunks = kBK / 8;      // 16-byte chunks per smem row
constexpr int kWRows = 128;           // weight rows per stage (up: 64 gate + 64 up; down: 128)

template <int BM> struct Tile;
template <> struct Tile<16> { static constexpr int kStages = 4, kWarpsM = 1, kWarpsN = 4; };
template <> struct Tile<64> { static constexpr int kStages = 3, kWarpsM = 2, kWarpsN = 2; };

// The warp tiling of a BM x BN output tile (BN = 64 act columns for up, 128 for down).
template <int BM, bool UP> struct Warps {
  static constexpr int kWarpsN = Tile<BM>::kWarpsN;
  static constexpr int BN = UP ? kWRows / 2 : kWRows;  // output columns per CTA
  static constexpr int WTM = BM / Tile<BM>::kWarpsM, WTN = BN / kWarpsN;
  static constexpr int MI = WTM / 16, NI = WTN / 8, NMAT = UP ? 2 : 1;
  static_assert(NI % 2 == 0, "B fragments are loaded two n8 tiles per ldmatrix.x4");
};

// Offset, in 16-byte units, of chunk c of row r in a swizzled [rows, kChunks] tile.
__device__ inline int swz(int r, int c) { return r * kChunks + (c ^ (r & 7)); }

__device__ inline float silu(float g) { return g / (1.0f + expf(-g)); }

// Down launches with topk_ids: the sentinel slots' rows of expert_out [R, D] are zeros over the
// N tile [n0, n0 + BN); CTA row m_tile takes slots m_tile, m_tile + grid.x, ...
template <int BN, class Params>
__device__ __forceinline__ void zero_sentinel_rows(const Params& p, int m_tile, int n0) {
  const int n1 = n0 + BN < p.D ? n0 + BN : p.D;
  for (int jj = m_tile; jj < p.T * p.k_max; jj += gridDim.x) {
    const int id = p.topk_ids[jj];
    if (id >= 0 && id < p.E) continue;
    for (int col = n0 + 8 * static_cast<int>(threadIdx.x); col < n1; col += 8 * kThreads)
      *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.c) + static_cast<int64_t>(jj) * p.D + col) =
          uint4{0, 0, 0, 0};
  }
}

// Tile row r's A row (up: the slot's token; down: the sorted position) and output row (up: the
// sorted position; down: the slot), -1 for padding; dense mode (no sorted_slots): row i is slot i.
template <int BM, bool UP, class Params>
__device__ __forceinline__ void tile_rows(const Params& p, int row0, int num_padded, int* s_src, int* s_dst) {
  const int R = p.T * p.k_max;
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int i = row0 + r;
    int slot = -1;
    if (i < num_padded && i < p.capacity) slot = p.sorted_slots ? p.sorted_slots[i] : (i < R ? i : -1);
    const bool valid = slot >= 0 && slot < R;
    s_src[r] = !valid ? -1 : UP ? slot / p.k_max : i;
    s_dst[r] = !valid ? -1 : UP ? i : slot;
  }
}

// One k-tile of the main loop: A fragments from the swizzled sA [BM, kChunks], B fragments from
// the swizzled sB [kWRows, kChunks] (up: gate rows then up rows), accumulated in fp32.
template <int BM, bool UP>
__device__ __forceinline__ void mma_ktile(float (&acc)[Warps<BM, UP>::NMAT][Warps<BM, UP>::MI][Warps<BM, UP>::NI][4],
                                          const uint4* sA, const uint4* sB, int wm, int wn, int lane) {
  using W = Warps<BM, UP>;
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk) {
    uint32_t a[W::MI][4];
#pragma unroll
    for (int mi = 0; mi < W::MI; ++mi)
      ldmatrix_x4(a[mi], sA + swz(wm * W::WTM + mi * 16 + lane % 16, kk * 2 + lane / 16));
#pragma unroll
    for (int mat = 0; mat < W::NMAT; ++mat) {
#pragma unroll
      for (int nj = 0; nj < W::NI; nj += 2) {
        uint32_t b[4];  // b[0..1]: n8 tile nj, b[2..3]: n8 tile nj+1
        const int wr = mat * W::BN + wn * W::WTN + nj * 8 + lane % 8 + 8 * (lane / 16);
        ldmatrix_x4(b, sB + swz(wr, kk * 2 + (lane / 8) % 2));
#pragma unroll
        for (int mi = 0; mi < W::MI; ++mi) {
          mma_m16n8k16_bf16(acc[mat][mi][nj], a[mi], b, acc[mat][mi][nj]);
          mma_m16n8k16_bf16(acc[mat][mi][nj + 1], a[mi], b + 2, acc[mat][mi][nj + 1]);
        }
      }
    }
  }
}

__device__ __forceinline__ void store_pair(__nv_bfloat16* dst, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
}
__device__ __forceinline__ void store_pair(float* dst, float v0, float v1) {  // split-K partial sums
  dst[0] = v0;
  dst[1] = v1;
}

// The epilogue: each accumulator pair to its output row s_dst (padding rows skipped), up as
// silu(gate) * up, rounded to bf16 once. OutT float = a split-K partial, kept in fp32: down the
// sums (rows of N), up the gate and up sums side by side (rows of 2N: gate at col, up at N + col;
// silu waits for the reduce, which has the whole sums).
template <int BM, bool UP, class OutT>
__device__ __forceinline__ void store_tile(const float (&acc)[Warps<BM, UP>::NMAT][Warps<BM, UP>::MI][Warps<BM, UP>::NI][4],
                                           OutT* C, const int* s_dst, int n0, int N, int wm, int wn, int lane) {
  using W = Warps<BM, UP>;
  constexpr bool kRawUp = UP && sizeof(OutT) == sizeof(float);
#pragma unroll
  for (int mi = 0; mi < W::MI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < W::NI; ++ni) {
      const int col = n0 + wn * W::WTN + ni * 8 + 2 * (lane % 4);
      if (col >= N) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int dst = s_dst[wm * W::WTM + mi * 16 + lane / 4 + 8 * h];
        if (dst < 0) continue;
        float v0 = acc[0][mi][ni][2 * h], v1 = acc[0][mi][ni][2 * h + 1];
        if constexpr (kRawUp) {
          OutT* out = C + static_cast<int64_t>(dst) * 2 * N + col;
          store_pair(out, v0, v1);
          store_pair(out + N, acc[W::NMAT - 1][mi][ni][2 * h], acc[W::NMAT - 1][mi][ni][2 * h + 1]);
          continue;
        } else if constexpr (UP) {
          v0 = silu(v0) * acc[W::NMAT - 1][mi][ni][2 * h];
          v1 = silu(v1) * acc[W::NMAT - 1][mi][ni][2 * h + 1];
        }
        store_pair(C + static_cast<int64_t>(dst) * N + col, v0, v1);
      }
    }
  }
}

}  // namespace gemm_common
}  // namespace moe
