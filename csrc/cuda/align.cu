// align: group the R = T*k_max (token, slot) pairs by expert for the grouped GEMM.
//
// Formula: expert_counts[e]    = #{s < R : topk_ids[s] == e}      (ids < 0 or >= E are skipped)
//          expert_offsets[e]   = sum_{e' < e} round_up(counts[e'], block_m); offsets[E] = num_padded
//          sorted_slots[offsets[e] + i] = the i-th slot s of expert e in ascending s; -1 in each
//                                expert's padding and from num_padded to capacity
//          tile_experts[b]     = expert owning rows [b*block_m, (b+1)*block_m), -1 past num_padded
//          capacity = round_up(R + E*(block_m-1), block_m) (worst case: a decode step can be
//          captured in a CUDA graph with every buffer allocated once)
// Algorithm: slots are cut into chunks of 1024, one thread per slot. In a warp, __match_any_sync
//   finds the lanes holding the same expert: a slot's rank in its warp is the popcount of the
//   lower peers, and the lowest peer writes the warp's count of that expert to shared memory.
//   An exclusive scan over warps (per expert) and over chunks gives every slot its place without
//   atomics, so the order is deterministic (ascending slot index) on every path.
//   R <= 1024: one block does everything (one launch: decode). R > 1024: three launches:
//   count (one block per chunk -> workspace[chunk][E]), scan (one block: per-expert scan over
//   chunks, padded offsets), scatter (one block per chunk; every block also fills a stride of
//   the padding and tile_experts).
// Traffic: 4R read (x2 on the multi-block path) + 4*capacity + 4*capacity/block_m + 8E written.
// Launch: small: 1 block of max(256, round_up(R, 32)) threads, (nwarps*E + 2E + 1)*4 B shared;
//   large: ceil(R/1024) blocks of 1024 threads, (32E + 2E + 1)*4 B shared (<= 34.8 KB at E=256).
// Limits: 1 <= E <= 256, block_m >= 1, capacity < 2^31. Workspace (R > 1024 only):
//   ceil(R/1024)*E int32, within align_workspace_size() of csrc/ops.h.
// Tie rule: within an expert, ascending slot index t*k_max + j.
// Reference: src/moe_engine/ops/align.py (align_ref); CPU twin: csrc/cpu/align.cpp; tests:
//   tests/emu/cpp/align_test.cu (bitwise vs a C++ counting sort, via tests/emu/test_kernels.py)
//   and tests/test_ops.py.
#include "common.cuh"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "../ops.h"

namespace moe {
namespace {

constexpr int kAlignChunk = 1024;  // slots per block on the multi-block path
constexpr int kAlignMaxExperts = 256;
constexpr int kAlignSmallMinThreads = 256;  // enough threads for the padding fill of a decode step
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// One slot per thread: returns its expert (-1 if skipped) and its rank among the slots of the
// same expert in its warp; warp_counts[warp*E + e] receives the warp's count of expert e
// (entries of experts absent from the warp are left as they are: zero them first).
__device__ __forceinline__ int rank_in_warp(const AlignParams& p, int64_t slot, int64_t R, int* warp_counts,
                                            int* rank) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int id = slot < R ? p.topk_ids[slot] : -1;
  if (id < 0 || id >= p.E) id = -1;
  const unsigned peers = __match_any_sync(kFullMask, id);
  *rank = __popc(peers & ((1u << lane) - 1u));
  if (id >= 0 && lane == __ffs(peers) - 1) warp_counts[warp * p.E + id] = __popc(peers);
  return id;
}

// In place: warp_counts[w*E + e] -> exclusive prefix over w; per-expert totals to `total` if non-null.
__device__ __forceinline__ void scan_over_warps(int* warp_counts, int nwarps, int E, int* total) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = 0;
    for (int w = 0; w < nwarps; ++w) {
      const int c = warp_counts[w * E + e];
      warp_counts[w * E + e] = run;
      run += c;
    }
    if (total) total[e] = run;
  }
}

// Warp 0: offs[e] = sum_{e' < e} round_up(counts[e'], block_m), offs[E] = total. Lane l owns a
// run of ceil(E/32) consecutive experts.
__device__ __forceinline__ void padded_offsets(const int* counts, int E, int block_m, int* offs) {
  const int lane = threadIdx.x & 31;
  const int per = (E + 31) / 32, e0 = min(lane * per, E), e1 = min(e0 + per, E);
  int local = 0;
  for (int e = e0; e < e1; ++e) local += (counts[e] + block_m - 1) / block_m * block_m;
  int incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += v;
  }
  int run = incl - local;
  for (int e = e0; e < e1; ++e) {
    offs[e] = run;
    run += (counts[e] + block_m - 1) / block_m * block_m;
  }
  if (lane == 31) offs[E] = incl;
}

// Positions [begin, capacity) with step `stride`: -1 in the padding of each expert and past
// num_padded; tile_experts for every tile start in the same stride pattern.
__device__ __forceinline__ void fill_padding(const AlignParams& p, const int* offs, const int* counts, int capacity,
                                             int64_t begin, int64_t stride) {
  const int E = p.E, num_padded = offs[E];
  auto owner = [&](int pos) {  // the expert e with offs[e] <= pos < offs[e+1]
    int lo = 0, hi = E;        // invariant: offs[lo] <= pos < offs[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (offs[mid] <= pos) lo = mid;
      else hi = mid;
    }
    return lo;
  };
  for (int64_t i = begin; i < capacity; i += stride) {
    const int pos = (int)i;
    if (pos >= num_padded || pos >= offs[owner(pos)] + counts[owner(pos)]) p.sorted_slots[pos] = -1;
  }
  const int tiles = capacity / p.block_m;
  for (int64_t b = begin; b < tiles; b += stride) {
    const int row = (int)b * p.block_m;
    p.tile_experts[b] = row < num_padded ? owner(row) : -1;
  }
}

__device__ __forceinline__ void write_header(const AlignParams& p, const int* offs, const int* counts) {
  for (int e = threadIdx.x; e <= p.E; e += blockDim.x) {
    p.expert_offsets[e] = offs[e];
    if (e < p.E) p.expert_counts[e] = counts[e];
    else p.num_padded[0] = offs[e];
  }
}

// R <= blockDim.x: everything in one block.
__global__ void __launch_bounds__(1024) align_small_kernel(const AlignParams p, int capacity) {
  MOE_DYNAMIC_SHARED(int, smem);
  const int E = p.E, nwarps = blockDim.x / 32;
  int* warp_counts = smem;              // [nwarps][E]
  int* offs = warp_counts + nwarps * E; // [E+1]
  int* counts = offs + E + 1;           // [E]
  const int64_t R = (int64_t)p.T * p.k_max;
  for (int i = threadIdx.x; i < nwarps * E; i += blockDim.x) warp_counts[i] = 0;
  __syncthreads();
  int rank;
  const int id = rank_in_warp(p, threadIdx.x, R, warp_counts, &rank);
  __syncthreads();
  scan_over_warps(warp_counts, nwarps, E, counts);
  __syncthreads();
  if (threadIdx.x < 32) padded_offsets(counts, E, p.block_m, offs);
  __syncthreads();
  write_header(p, offs, counts);
  if (id >= 0) p.sorted_slots[offs[id] + warp_counts[(threadIdx.x >> 5) * E + id] + rank] = (int)threadIdx.x;
  fill_padding(p, offs, counts, capacity, threadIdx.x, blockDim.x);
}

// Multi-block, step 1: workspace[chunk*E + e] = slots of expert e in the chunk.
__global__ void __launch_bounds__(kAlignChunk) align_count_kernel(const AlignParams p) {
  MOE_DYNAMIC_SHARED(int, smem);
  const int E = p.E, nwarps = kAlignChunk / 32;
  int* warp_counts = smem;
  const int64_t R = (int64_t)p.T * p.k_max, chunk = blockIdx.x;
  for (int i = threadIdx.x; i < nwarps * E; i += blockDim.x) warp_counts[i] = 0;
  __syncthreads();
  int rank;
  rank_in_warp(p, chunk * kAlignChunk + threadIdx.x, R, warp_counts, &rank);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int total = 0;
    for (int w = 0; w < nwarps; ++w) total += warp_counts[w * E + e];
    p.workspace[chunk * E + e] = total;
  }
}

// Multi-block, step 2 (one block): workspace -> exclusive prefix over chunks; header.
__global__ void __launch_bounds__(kAlignChunk) align_scan_kernel(const AlignParams p, int chunks) {
  MOE_DYNAMIC_SHARED(int, smem);
  const int E = p.E;
  int* offs = smem;            // [E+1]
  int* counts = offs + E + 1;  // [E]
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = 0;
    for (int c = 0; c < chunks; ++c) {
      const int v = p.workspace[(int64_t)c * E + e];
      p.workspace[(int64_t)c * E + e] = run;
      run += v;
    }
    counts[e] = run;
  }
  __syncthreads();
  if (threadIdx.x < 32) padded_offsets(counts, E, p.block_m, offs);
  __syncthreads();
  write_header(p, offs, counts);
}

// Multi-block, step 3: scatter each chunk's slots; fill a stride of the padding.
__global__ void __launch_bounds__(kAlignChunk) align_scatter_kernel(const AlignParams p, int capacity) {
  MOE_DYNAMIC_SHARED(int, smem);
  const int E = p.E, nwarps = kAlignChunk / 32;
  int* warp_counts = smem;
  int* offs = warp_counts + nwarps * E;
  int* counts = offs + E + 1;
  const int64_t R = (int64_t)p.T * p.k_max, chunk = blockIdx.x;
  for (int i = threadIdx.x; i < nwarps * E; i += blockDim.x) warp_counts[i] = 0;
  for (int e = threadIdx.x; e <= E; e += blockDim.x) {
    offs[e] = p.expert_offsets[e];
    if (e < E) counts[e] = p.expert_counts[e];
  }
  __syncthreads();
  int rank;
  const int64_t slot = chunk * kAlignChunk + threadIdx.x;
  const int id = rank_in_warp(p, slot, R, warp_counts, &rank);
  __syncthreads();
  scan_over_warps(warp_counts, nwarps, E, nullptr);
  __syncthreads();
  if (id >= 0)
    p.sorted_slots[offs[id] + p.workspace[chunk * E + id] + warp_counts[(threadIdx.x >> 5) * E + id] + rank] =
        (int)slot;
  fill_padding(p, offs, counts, capacity, (int64_t)blockIdx.x * blockDim.x + threadIdx.x,
               (int64_t)gridDim.x * blockDim.x);
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("align_cuda: " + what); }

}  // namespace

void align_cuda(const AlignParams& p, void* stream, int device) {
  const DeviceGuard device_guard(device);
  if (p.T < 0 || p.k_max < 0)
    bad("T = " + std::to_string(p.T) + ", k_max = " + std::to_string(p.k_max) + ": negative size");
  if (p.E < 1 || p.E > kAlignMaxExperts)
    bad("E = " + std::to_string(p.E) + " is outside 1.." + std::to_string(kAlignMaxExperts));
  if (p.block_m < 1) bad("block_m = " + std::to_string(p.block_m) + " must be >= 1");
  const int64_t R = (int64_t)p.T * p.k_max;
  const int64_t capacity = align_capacity(p.T, p.k_max, p.E, p.block_m);
  if (capacity >= (int64_t(1) << 31)) bad("capacity = " + std::to_string(capacity) + " does not fit int32");
  if ((R > 0 && !p.topk_ids) || !p.expert_counts || !p.expert_offsets || !p.sorted_slots || !p.tile_experts ||
      !p.num_padded)
    bad("topk_ids and every output pointer must be non-null");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (R <= kAlignChunk) {
    const int threads = (int)std::max<int64_t>(kAlignSmallMinThreads, (R + 31) / 32 * 32);
    const size_t smem = ((size_t)(threads / 32) * p.E + 2 * p.E + 1) * sizeof(int);
    MOE_LAUNCH(align_small_kernel, dim3(1), dim3(threads), smem, s, p, (int)capacity);
  } else {
    const int64_t chunks = (R + kAlignChunk - 1) / kAlignChunk;
    if (!p.workspace)
      bad("T*k_max = " + std::to_string(R) + " > " + std::to_string(kAlignChunk) + " needs a workspace of " +
          std::to_string(chunks * p.E) + " int32 (align_workspace_size)");
    const size_t smem_chunk = ((size_t)(kAlignChunk / 32) * p.E + 2 * p.E + 1) * sizeof(int);
    MOE_LAUNCH(align_count_kernel, dim3((unsigned)chunks), dim3(kAlignChunk), smem_chunk, s, p);
    MOE_LAUNCH(align_scan_kernel, dim3(1), dim3(kAlignChunk), (2 * p.E + 1) * sizeof(int), s, p, (int)chunks);
    MOE_LAUNCH(align_scatter_kernel, dim3((unsigned)chunks), dim3(kAlignChunk), smem_chunk, s, p, (int)capacity);
  }
  MOE_CUDA_CHECK(cudaGetLastError());  // launch errors only; never synchronises
}

}  // namespace moe
