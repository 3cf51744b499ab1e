// moe_decode_q: moe_decode (the T <= 16 MoE path, csrc/cuda/moe_decode.cu) on weight-only
// quantized experts (4 or 8 bits, group-wise along Din), plus the load-time repack of the GPTQ
// tensors into the layout it streams.
//
// Shape legend: T tokens, D hidden, E experts, k_max top-k width, F expert width, R = T*k_max
// slots; a quantized weight is [E, Dout, Din] (y = x W^T), b bits, group size g, G = ceil(Din / g).
//
// Formula: w[n, k] = s[k / g, n] * (q[k, n] - z[k / g, n]) (docs/quantization.md; z the true
//   zero point), then exactly moe_decode's contract on w: for every slot j = t*k_max + s with
//   e = topk_ids[t, s] in [0, E):
//     act[j, f]        = silu(x[t] . Wg[e, f]) * (x[t] . Wu[e, f])      (bf16, rounded once)
//     expert_out[j, d] = act[j] . Wd[e, d]                              (unweighted, token order)
//   Sentinel slots (id < 0 or >= E) get zero expert_out rows and no act row; topk_ids null =
//   dense mode (every slot is expert 0: shared experts and dense projections).
//
// Kernel layout ("qrow", written once at load by qrepack_kernel below, on the device): row n of
//   expert e is one contiguous, 16-byte aligned run of qcuda_row_bytes(Din, fmt) bytes (ops.h):
//     codes  Kp * b / 8 bytes, Kp = Din rounded up to 32: 32-bit word i holds k = p*i + j (p = 32/b)
//            at bits [b*j, b*j + b), low bits first: GPTQ's own order along Din, so the repack is
//            a transpose of qweight [Din/p, Dout] to [Dout, Din/p]; padding words are 0.
//     meta   one 32-bit word per group, G rounded up to 4 (padding words 0), right behind the
//            codes: bits 0..15 the scale's raw fp16 / bf16 bits, bits 16..31 the zero offset
//            zoff = z + 128 (4-bit) or z (8-bit): the zero point folded with the 4-bit
//            conversion's magic constant, so one word gives the kernel s and bias = -zoff * s.
//   Symmetric weights (qzeros absent) get z = 2^(b-1) written into the same field: one kernel
//   path for both symmetries. Rows are [gate F | up F] for w13 ([E, 2F, D]), as in moe_decode.
//   The tile one warp step fetches is 32 lanes x 16 bytes of one row (1024 k at 4 bits, 512 at
//   8), plus each lane's 4-byte meta word from the same row. Bytes per row (D 2048 / F 1408):
//     4-bit g128: 1024 + 64 (Din 2048) / 704 + 48 (Din 1408)   (6.3 / 6.8 % over the codes)
//     8-bit g128: 2048 + 64 / 1408 + 48;   g32 adds 4 B per 32 k (4-bit: 25 %, 8-bit: 12.5 %).
//
// Dequantisation in registers (csrc/cuda/dequant_q.cuh): a lane's 16-byte chunk of codes lies in
//   one group (g >= 32, chunks of 32 (4-bit) or 16 (8-bit) k aligned), so one meta word gives s
//   and bias = -zoff * s; 4-bit: one LOP3 per 2 codes makes bf16 128 + q (magic number), widened
//   to fp32 by a shift or mask; 8-bit: byte -> float; then w = fma(code, s, bias) = s (q - z),
//   exact in fp32 (the reference's dequantised weight); products with bf16 x accumulate in fp32.
// Algorithm: moe_decode's (its header), unchanged, its scheduling and epilogue from the same code
//   (csrc/cuda/moe_decode_common.cuh): grid column x serves the x-th distinct expert
//   in slot order, passes of up to 8 slots, each warp streams 4 weight rows (up: gate and up rows
//   of 2 features; down: 4 output features) with 16-byte loads; lane
//   partial sums reduced with xor shuffles; the down CTAs zero the sentinel slots' rows. Each
//   8-k slice of a chunk is dequantised once for the 4 rows and used for every slot of the pass.
//
// Memory traffic: per touched expert (2F + D) rows of qcuda_row_bytes, read once per pass of 8.
//   DeepSeekMoE-16B (D 2048, F 1408, E 64, k 6), 4-bit g128: 2 x 1408 x 1088 + 2048 x 752 =
//   4.60 MB per expert (bf16: 17.3 MB); T = 1: 6 experts = 27.6 MB. 8-bit g128: 8.93 MB per expert.
// Batch invariance: bitwise for T <= 16, as moe_decode: a slot's sums run over Din in the same lane
//   order and shuffle tree whatever else shares the call or its pass.
// Launch: as moe_decode: up grid (min(R, E), ceil(F / 16)), down grid (min(R, E), ceil(D / 32))
//   (dense mode: 1 column), block 256, static smem 52 B; repack: grid-stride, block 256, no smem.
// ptxas (CUDA 13.0, -O3; tools/check_ptxas.py), registers sm_80 / sm_90a, 0 spills, no stack:
//   up   4-bit 123 / 124, 8-bit 127 / 127;  down 4-bit 122 / 122, 8-bit 121 / 128
//   (bound 128: 2 CTAs of 256 per SM); repack 48 / 42. Static smem 52 B per block (s_list,
//   s_pass), no dynamic smem. One warp step of codes in flight per row (kUnroll 1: 4 x 16 B a
//   lane, each 16 B 4x (4-bit) or 2x (8-bit) the k of moe_decode's 16 B); two steps spill.
// Limits: 1 <= T <= 16, D and F multiples of 8, bits 4 or 8, g 32 / 64 / 128, all pointers 16-byte
//   aligned, x / act / expert_out contiguous.
// What the emulator shows (tests/emu/test_moe_decode_q.py): indexing of the layout, the repack,
//   the in-register conversion and the slot logic against a double-precision dequantise-then-
//   matmul reference, in every thread order. What it cannot: bandwidth, occupancy, registers
//   (ptxas above), FMA contraction on the device (compare with tolerances).
// Reference: tests/emu/cpp/moe_decode_q_test.cu (double precision on the GPTQ tensors);
//   Python: src/moe_engine/ops/quant.py (repack_quantized_cuda, expert_ffn_q_cuda).
#include "common.cuh"
#include "dequant_q.cuh"
#include "moe_decode_common.cuh"
#include "ops.h"

#include <stdexcept>
#include <string>

namespace moe {
namespace decode_q_detail {  // named, so the kernel files can share one translation unit in tests

using bf16 = __nv_bfloat16;

using namespace decode_common;  // moe_decode's constants, slot scheduling and epilogue
constexpr int kUnroll = 1;  // 2 spills (wd, acc and two steps of codes exceed 128 registers)
template <int BITS> constexpr int kChunkK = 128 / BITS;          // k per 16-byte code chunk
template <int BITS> constexpr int kStepK = 32 * kChunkK<BITS>;   // k per warp step

// acc + sum of 8 weights times the 8 bf16 of v, k ascending.
__device__ inline float dot8(const float (&w)[8], const uint4& v, float acc) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t x = qdq::word_of(v, i);
    acc += w[2 * i] * __uint_as_float(x << 16);
    acc += w[2 * i + 1] * __uint_as_float(x & 0xFFFF0000u);
  }
  return acc;
}

template <int BITS, bool UP>
__global__ void __launch_bounds__(kThreads, 2) moe_decode_q_kernel(const MoeDecodeQParams p) {
  constexpr int kMats = UP ? 2 : 1;
  constexpr int kFeatPerWarp = kRowsPerWarp / kMats;
  constexpr int kSubs = kChunkK<BITS> / 8;
  const int R = p.T * p.k_max;
  const int Dout = UP ? p.F : p.D, Din = UP ? p.D : p.F;
  const int f0 = blockIdx.y * kFeatPerCta<UP>;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int* ids = p.topk_ids;
  bf16* out = static_cast<bf16*>(UP ? p.act : p.expert_out);
  auto id_of = [&](int jj) { return ids ? ids[jj] : 0; };
  auto valid = [&](int e) { return e >= 0 && e < p.E; };

  if constexpr (!UP) zero_sentinel_rows(out, R, Dout, f0, id_of, valid);

  MOE_SHARED_ARRAY(int, s_list, kPass);
  MOE_SHARED_ARRAY(int, s_pass, 2);
  // CTA x serves the x-th distinct expert in slot order (moe_decode_common.cuh).
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

  const int64_t row_bytes = qcuda_row_bytes(Din, p.fmt);
  const int64_t code_bytes = qcuda_code_bytes(Din, p.fmt);
  const uint8_t* W = static_cast<const uint8_t*>(UP ? p.w13 : p.w2) + static_cast<int64_t>(e) * kMats * Dout * row_bytes;
  const bf16* in = static_cast<const bf16*>(UP ? p.x : p.act);
  const uint8_t* wrow[kRowsPerWarp];
  int feat[kRowsPerWarp];
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    feat[q] = f0 + warp * kFeatPerWarp + q % kFeatPerWarp;
    const int mat = q / kFeatPerWarp;
    wrow[q] = W + static_cast<int64_t>(feat[q] < Dout ? mat * Dout + feat[q] : 0) * row_bytes;
  }
  const int g = p.fmt.group_size;
  const bool scales_bf16 = p.fmt.scales_bf16;

  for (int cursor = j;;) {
    if (warp == 0) fill_pass(cursor, R, lane, chose_e, s_list, s_pass);
    __syncthreads();
    const int n = s_pass[0];
    cursor = s_pass[1];
    if (n == 0) return;

    int in_off[kPass];
    pass_offsets<UP>(in_off, n, s_list, p.k_max, Din);
    float acc[kRowsPerWarp][kPass] = {};
    for (int k0 = lane * kChunkK<BITS>; k0 < Din; k0 += kUnroll * kStepK<BITS>) {
      uint4 w[kUnroll][kRowsPerWarp];
      uint32_t meta[kUnroll][kRowsPerWarp];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int kk = k0 + u * kStepK<BITS>;
#pragma unroll
        for (int q = 0; q < kRowsPerWarp; ++q) {
          w[u][q] = kk < Din ? *reinterpret_cast<const uint4*>(wrow[q] + kk * BITS / 8) : uint4{};
          meta[u][q] = kk < Din ? reinterpret_cast<const uint32_t*>(wrow[q] + code_bytes)[kk / g] : 0u;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int kk = k0 + u * kStepK<BITS>;
        if (kk >= Din) break;
        float s[kRowsPerWarp], bias[kRowsPerWarp];
#pragma unroll
        for (int q = 0; q < kRowsPerWarp; ++q) {
          qdq::scale_bias(meta[u][q], scales_bf16, s[q], bias[q]);
        }
#pragma unroll
        for (int sub = 0; sub < kSubs; ++sub) {
          if (kk + 8 * sub >= Din) break;  // Din % 8 == 0: a slice is all in or all out
          // One row's 8 weights at a time (the input slices are L1 hits): dequantising all 4
          // rows first needs 32 more registers and spills.
#pragma unroll
          for (int q = 0; q < kRowsPerWarp; ++q) {
            float wd[8];
            qdq::dequant8<BITS>(w[u][q], sub, s[q], bias[q], wd);
#pragma unroll
            for (int r = 0; r < kPass; ++r) {
              if (r >= n) break;
              const uint4 v = *reinterpret_cast<const uint4*>(in + in_off[r] + kk + 8 * sub);
              acc[q][r] = dot8(wd, v, acc[q][r]);
            }
          }
        }
      }
    }
    store_pass<UP>(acc, n, s_list, feat, Dout, out, lane);
    if (cursor >= R) return;
    __syncthreads();  // everyone has read s_list before warp 0 refills it
  }
}

// One thread per 32-bit word of the qrow layout (grid-stride): codes are qweight transposed,
// meta words pack the scale bits with the folded zero offset (the header's layout).
__global__ void __launch_bounds__(kThreads) qrepack_kernel(const QRepackParams p) {
  const int b = p.fmt.bits, per = 32 / b;
  const int64_t Din = p.Din, Dout = p.Dout;
  const int64_t G = (Din + p.fmt.group_size - 1) / p.fmt.group_size;
  const int64_t code_words = qcuda_code_bytes(Din, p.fmt) / 4, row_words = qcuda_row_bytes(Din, p.fmt) / 4;
  const int64_t zwords = (Dout * b + 31) / 32;
  const int64_t total = static_cast<int64_t>(p.E) * Dout * row_words;
  uint32_t* dst = static_cast<uint32_t*>(p.dst);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % row_words, en = idx / row_words, n = en % Dout, e = en / Dout;
    uint32_t v = 0;
    if (i < code_words) {
      if (i < Din / per) v = static_cast<uint32_t>(p.qweight[(e * (Din / per) + i) * Dout + n]);
    } else if (i - code_words < G) {
      const int64_t gi = i - code_words;
      const uint32_t mask = (1u << b) - 1u;
      const uint32_t z = p.qzeros ? (static_cast<uint32_t>(p.qzeros[(e * G + gi) * zwords + n / per]) >> (b * (n % per))) & mask
                                  : 1u << (b - 1);
      v = p.scales[(e * G + gi) * Dout + n] | ((z + (b == 4 ? 128u : 0u)) << 16);
    }
    dst[idx] = v;
  }
}

[[noreturn]] void bad(const char* op, const std::string& what) { throw std::invalid_argument(std::string(op) + ": " + what); }

void check_format(const char* op, const QFormat& f) {
  if (f.bits != 4 && f.bits != 8) bad(op, "bits=" + std::to_string(f.bits) + ", expected 4 or 8");
  if (f.group_size != 32 && f.group_size != 64 && f.group_size != 128)
    bad(op, "group_size=" + std::to_string(f.group_size) + ", expected 32, 64 or 128");
}

template <int BITS, bool UP>
void launch(const MoeDecodeQParams& p, cudaStream_t stream) {
  const int Dout = UP ? p.F : p.D;
  const int R = p.T * p.k_max;
  const int experts = p.topk_ids ? (R < p.E ? R : p.E) : 1;
  const dim3 grid(experts, (Dout + kFeatPerCta<UP> - 1) / kFeatPerCta<UP>);
  auto* moe_decode_q = &moe_decode_q_kernel<BITS, UP>;
  MOE_LAUNCH(moe_decode_q, grid, dim3(kThreads), 0, stream, p);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace decode_q_detail

void qrepack_cuda(const QRepackParams& p, void* stream, int device) {
  const DeviceGuard device_guard(device);
  using namespace decode_q_detail;
  const char* op = "qrepack";
  check_format(op, p.fmt);
  auto s = [](int64_t v) { return std::to_string(v); };
  if (p.E < 1 || p.Dout < 1 || p.Din < 1) bad(op, "need E, Dout, Din >= 1; got E=" + s(p.E) + " Dout=" + s(p.Dout) + " Din=" + s(p.Din));
  const int per = 32 / p.fmt.bits;
  if (p.Din % per || p.Dout % per)
    bad(op, "Din and Dout must be multiples of " + s(per) + " at " + s(p.fmt.bits) + " bits; got Din=" + s(p.Din) + " Dout=" + s(p.Dout));
  if (!p.qweight || !p.scales || !p.dst) bad(op, "qweight, scales and dst must be non-null");
  if (!p.qzeros && !p.sym) bad(op, "qzeros is required when sym is false");
  if (reinterpret_cast<uintptr_t>(p.dst) % 16) bad(op, "dst must be 16-byte aligned");
  const int64_t words = static_cast<int64_t>(p.E) * p.Dout * (qcuda_row_bytes(p.Din, p.fmt) / 4);
  const int64_t blocks = (words + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(blocks < 4096 ? blocks : 4096));
  auto* qrepack = &qrepack_kernel;
  MOE_LAUNCH(qrepack, grid, dim3(kThreads), 0, static_cast<cudaStream_t>(stream), p);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void moe_decode_q_cuda(const MoeDecodeQParams& p, void* stream, int device) {
  const DeviceGuard device_guard(device);
  using namespace decode_q_detail;
  const char* op = "moe_decode_q";
  auto s = [](int64_t v) { return std::to_string(v); };
  check_format(op, p.fmt);
  if (p.T < 0 || p.T > kMaxT)
    bad(op, "T must be in [0, " + s(kMaxT) + "] (larger batches: the grouped GEMM path); got T=" + s(p.T));
  if (p.k_max < 1 || p.E < 1) bad(op, "need k_max >= 1 and E >= 1; got k_max=" + s(p.k_max) + " E=" + s(p.E));
  if (p.D <= 0 || p.F <= 0 || p.D % 8 || p.F % 8)
    bad(op, "D and F must be positive multiples of 8 (16-byte loads); got D=" + s(p.D) + " F=" + s(p.F));
  if (!p.x || !p.w13 || !p.w2 || !p.act || !p.expert_out) bad(op, "x, w13, w2, act and expert_out must be non-null");
  auto misaligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 != 0; };
  if (misaligned(p.x) || misaligned(p.w13) || misaligned(p.w2) || misaligned(p.act) || misaligned(p.expert_out))
    bad(op, "x, w13, w2, act and expert_out must be 16-byte aligned");
  if (p.T == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  if (p.fmt.bits == 4) {
    launch<4, true>(p, st);
    launch<4, false>(p, st);
  } else {
    launch<8, true>(p, st);
    launch<8, false>(p, st);
  }
}

}  // namespace moe
