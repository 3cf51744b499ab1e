// The whole C++ interface of moe_engine on one screen: one Params struct per op.
//
// Shape legend: T tokens, D hidden, E routed experts, K top-k (runtime, 0..k_max),
// k_max buffer width of the top-k outputs, F expert width, S shared width,
// R = T*k_max slots, block_m GEMM tile height, capacity = padded slot capacity.
//
// Conventions (every backend: cuda, cpu, emu):
// - Pointers are device pointers for the cuda backend and host pointers for cpu / emu.
// - Slot j of token t is slot index t*k_max + j; slots are in rank order (weight descending,
//   ties -> lower expert id). Unused slots (j >= k) carry expert id -1 and weight 0; any id
//   < 0 or >= E is a "skip" sentinel for every op downstream of route.
// - Launchers never allocate and never synchronise; every buffer is caller-provided and sized
//   for the worst case, so a decode step can be captured in a CUDA graph. Interventions that
//   may change between calls (k, expert mask, forced expert) are read from memory, not baked
//   into the launch.
// - Bad arguments throw std::invalid_argument with a message naming the value.
#pragma once
#include <cstdint>

namespace moe {

enum class DType : int32_t { f32 = 0, bf16 = 1 };
enum class MaskMode : int32_t { reroute = 0, zero = 1 };

// route: logits [T,E] -> fp32 softmax over all E -> mask -> top-k (runtime k) -> renormalise.
struct RouteParams {
  const void* router_logits;  // [T, E] logits_dtype, row stride logits_stride (elements)
  DType logits_dtype;
  int64_t logits_stride;
  int32_t T, E, k_max;
  const int32_t* k;            // [1] active top-k, 0 <= k <= k_max
  const uint8_t* expert_mask;  // row t at expert_mask + t*mask_stride: [E] nonzero = masked out; nullable
  int64_t mask_stride;         // 0: one [E] row for every token; >= E: [T, E] rows, one per token
  MaskMode mask_mode;          // reroute: cannot be chosen; zero: chosen, weight set to 0
  const int32_t* force_expert; // force_expert[t*force_stride]: forced into slot 0, -1 = none; nullable
  int64_t force_stride;        // 0: one id for every token; 1: [T] ids, one per token
  bool renormalize;            // divide kept weights by their sum (when > 0)
  int32_t* topk_ids;           // [T, k_max]
  float* topk_weights;         // [T, k_max]
  float* router_probs;         // [T, E] tap; nullable
  int32_t* usage_counts;       // [E] per-layer counters, += chosen slots; nullable
};

// align: group slots by expert, each expert's segment padded to block_m.
struct AlignParams {
  const int32_t* topk_ids;   // [T, k_max]
  int32_t T, k_max, E, block_m;
  int32_t* expert_counts;    // [E] slots per expert (unpadded)
  int32_t* expert_offsets;   // [E+1] start of each expert's padded segment
  int32_t* sorted_slots;     // [capacity] slot index t*k_max+j, ascending within an expert; -1 pad
  int32_t* tile_experts;     // [capacity / block_m] expert of each tile, -1 unused
  int32_t* num_padded;       // [1] used length of sorted_slots (multiple of block_m)
  int32_t* workspace;        // multi-block path scratch; see align_workspace_size(); nullable
};
// int32 elements of workspace the multi-block CUDA path may use (csrc/cuda/align.cu uses
// ceil(T*k_max/1024) * E of them; this bound matches src/moe_engine/ops/align.py).
inline int64_t align_workspace_size(int64_t T, int64_t k_max, int64_t E) {
  const int64_t chunks = (T * k_max + 1023) / 1024 + 1;
  return (chunks > 1 ? chunks : 1) * (E + 1);
}
// capacity = round_up(T*k_max + E*(block_m-1), block_m)
inline int64_t align_capacity(int64_t T, int64_t k_max, int64_t E, int64_t block_m) {
  const int64_t n = T * k_max + E * (block_m - 1);
  return (n + block_m - 1) / block_m * block_m;
}

// combine: out = residual + shared_out + sum_j topk_weights[t,j] * expert_out[t,j] (fp32, j ascending).
struct CombineParams {
  const void* expert_out;     // [T, k_max, D] unweighted (the hook_expert_out tap)
  const float* topk_weights;  // [T, k_max]
  const int32_t* topk_ids;    // [T, k_max]; sentinel slots are skipped
  const void* shared_out;     // [T, D]; nullable
  const void* residual;       // [T, D]; nullable
  void* out;                  // [T, D]
  void* routed_out;           // [T, D] tap (routed sum only); nullable
  DType dtype;
  int32_t T, k_max, D;
};

// ---- launchers -------------------------------------------------------------------------
// CUDA (csrc/cuda/*.cu): compiled into _C by nvcc and into _C_emu through csrc/emu.
// `stream` is a cudaStream_t (ignored by the emulator). `device`: the CUDA device of the
// tensors; each launcher makes it current for its launches and restores the caller's device
// (csrc/cuda/common.cuh DeviceGuard). -1 = whatever device is current (kernel self-tests).
void route_cuda(const RouteParams& p, void* stream, int device = -1);
void align_cuda(const AlignParams& p, void* stream, int device = -1);
void combine_cuda(const CombineParams& p, void* stream, int device = -1);

// CPU twins (csrc/cpu/*.cpp), same contracts.
void route_cpu(const RouteParams& p);
void align_cpu(const AlignParams& p);
void combine_cpu(const CombineParams& p);

// ---- CPU expert FFN ----------------------------------------------------------------------
// Packed weights ("panels", csrc/cpu/expert_ffn.cpp): W [N, K] (y = x W^T) is stored as
// ceil(N/32) panels of 32 output rows (zero-padded), each panel contiguous:
//   bf16: [ceil(K/2)][32][2]  (k pairs interleaved: the vdpbf16ps operand layout)
//   f32:  [K][32]
// With gate_up, src rows are [gate F | up F] and panel p holds gate rows 16p..16p+15 in lanes
// 0..15 and up rows 16p..16p+15 in lanes 16..31, so one panel yields 16 SiLU(gate)*up outputs.
struct PackParams {
  const void* src;  // [E, N, K] dtype, contiguous
  void* dst;        // pack_size_bytes(...)
  DType dtype;
  int32_t E, N, K;
  bool gate_up;     // N = 2F, rows [gate | up]
};
int64_t pack_size_bytes(DType dtype, int64_t E, int64_t N, int64_t K, bool gate_up);

// expert_out[t,j,:] = down_e(SiLU(gate_e(x_t)) * up_e(x_t)) for e = topk_ids[t,j] (unweighted:
// the hook_expert_out tap); sentinel slots get zero rows. Each chosen expert's weights are
// streamed once per call for all tokens that chose it.
struct ExpertFFNParams {
  const void* x;            // [T, D] dtype, contiguous
  const void* w13;          // packed gate|up: E x pack(2F, D, gate_up)
  const void* w2;           // packed down:    E x pack(D, F)
  const int32_t* topk_ids;  // [T, k_max]
  void* expert_out;         // [T, k_max, D] dtype
  void* workspace;          // expert_ffn_workspace_bytes(...)
  DType dtype;
  int32_t T, k_max, D, F, E;
};
int64_t expert_ffn_workspace_bytes(DType dtype, int64_t T, int64_t k_max, int64_t E, int64_t F);

// y = x W^T with W packed (E = 1): the small-T (decode) dense mat-vec of the cpu backend.
struct LinearParams {
  const void* x;  // [T, K] dtype, contiguous
  const void* w;  // packed [N, K]
  void* y;        // [T, N] dtype
  DType dtype;
  int32_t T, N, K;
};

void pack_weights_cpu(const PackParams& p);
void expert_ffn_cpu(const ExpertFFNParams& p);
void linear_cpu(const LinearParams& p);

// ---- CPU quantized weights (csrc/cpu/quant_gemm.cpp) ------------------------------------------
// Weight-only 4- or 8-bit, group-wise along K: w[n,k] = s[k/g, n] * (q[k,n] - z[k/g, n]).
// Input: the GPTQ tensors of W [N, K] per expert (packing along K / N low bits first, element i
// of a 32-bit word at bit offset (i % (32/bits)) * bits):
//   qweight int32 [K*bits/32, N], scales fp16|bf16 [ceil(K/g), N], qzeros int32
//   [ceil(K/g), ceil(N*bits/32)] (the zero as the caller means it; ignored when sym: z = 2^(bits-1)).
// Packed ("quantized panels"): like the bf16 panels above, ceil(N/32) panels of 32 output rows
// (zero-padded; gate_up: gate rows 16p.. in lanes 0-15, up rows in lanes 16-31), each panel
// contiguous, per group gi of len = min(g, K - gi*g) k's in ascending order:
//   codes  len x 32*bits/8 B: per k, int8: byte l = lane l; int4: byte l = lane l (low nibble)
//          | lane l+16 (high nibble)
//   scales 32 x 2 B (the input's raw fp16 or bf16 bits, lane order)
//   zeros  32 x 1 B
// so a panel is K*4*bits + ceil(K/g)*96 bytes (int8 g128: 32.75 KiB per 1024 k; int4 g128:
// 16.75 KiB); padding lanes have code, scale and zero 0 and yield exact zeros.
struct QFormat {
  int32_t bits;        // 4 or 8
  int32_t group_size;  // 32, 64 or 128
  bool scales_bf16;    // raw scale bits are bf16 (else fp16)
};
struct QPackParams {
  const int32_t* qweight;  // [E, K*bits/32, N]
  const uint16_t* scales;  // [E, ceil(K/g), N] fp16 or bf16 bits
  const int32_t* qzeros;   // [E, ceil(K/g), ceil(N*bits/32)]; nullable when sym
  void* dst;               // qpack_size_bytes(...)
  QFormat fmt;
  int32_t E, N, K;
  bool sym, gate_up;
};
int64_t qpack_size_bytes(int64_t E, int64_t N, int64_t K, const QFormat& f, bool gate_up);
// dst[e, n, k] = s * (q - z) in dtype (fp32 is exact): the dense view for reference paths.
struct QDequantParams {
  const void* src;  // packed
  void* dst;        // [E, N, K] dtype
  QFormat fmt;
  DType dtype;
  int32_t E, N, K;
  bool gate_up;
};
// y = x W^T with W quantized-packed (E = 1, not gate_up); fp32 accumulation.
struct QLinearParams {
  const void* x;     // [T, K] dtype, contiguous
  const void* w;     // packed [N, K]
  void* y;           // [T, N] dtype
  void* workspace;   // linear_q_workspace_bytes(...)
  QFormat fmt;
  DType dtype;
  int32_t T, N, K;
};
int64_t linear_q_workspace_bytes(int64_t T, int64_t K, const QFormat& f);
// expert_ffn_cpu's contract (ExpertFFNParams) on quantized-packed weights.
struct QExpertFFNParams {
  const void* x;            // [T, D] dtype, contiguous
  const void* w13;          // packed gate|up: E x qpack(2F, D, gate_up), format fmt13
  const void* w2;           // packed down:    E x qpack(D, F), format fmt2
  const int32_t* topk_ids;  // [T, k_max]
  void* expert_out;         // [T, k_max, D] dtype
  void* workspace;          // expert_ffn_q_workspace_bytes(...)
  QFormat fmt13, fmt2;
  DType dtype;
  int32_t T, k_max, D, F, E;
};
int64_t expert_ffn_q_workspace_bytes(int64_t T, int64_t k_max, int64_t E, int64_t D, int64_t F,
                                     const QFormat& f13, const QFormat& f2);
// Round-to-nearest GPTQ quantization of w [E, N, K] (csrc/cpu/quantize_rtn.cpp; the reference
// is quant.quantize_reference): writes qweight int32 [E, K/p, N], scales fp16 bits [E, G, N] and
// qzeros int32 [E, G, N/p] (p = 32/bits values per word, low bits first; stored zero = z -
// zero_offset). N and K multiples of p; the last group may be partial.
struct QRtnParams {
  const void* w;       // [E, N, K] dtype, contiguous
  int32_t* qweight;    // [E, K/p, N]
  uint16_t* scales;    // [E, ceil(K/g), N] fp16 bits
  int32_t* qzeros;     // [E, ceil(K/g), N/p]
  DType dtype;
  int32_t E, N, K, bits, group_size, zero_offset;
  bool sym;
};
void quantize_rtn_cpu(const QRtnParams& p);
void pack_quantized_cpu(const QPackParams& p);
void dequantize_packed_cpu(const QDequantParams& p);
void linear_q_cpu(const QLinearParams& p);
void expert_ffn_q_cpu(const QExpertFFNParams& p);

// ---- CUDA expert FFN -----------------------------------------------------------------------
// The cuda / emu path of expert_ffn: align (above, block_m = expert_gemm_block_m) + expert_gemm up +
// expert_gemm down, or moe_decode for T <= 16; plus the shared experts as one dense SwiGLU.
// One grouped GEMM over the aligned slots (csrc/cuda/expert_gemm.cu), bf16 in and out, fp32 accumulate.
//  up   (up = true):  act[i, :]  = silu(h . Wg[e]^T) * (h . Wu[e]^T),  h = a[sorted_slots[i] / k_max]
//  down (up = false): c[sorted_slots[i], :] = a[i] . Wd[e]^T          (unweighted, token order)
// with e = tile_experts[i / block_m]; rows with sorted_slots[i] < 0 are padding (not written).
// Dense mode: sorted_slots, tile_experts and num_padded all null -> row i is slot i for
// i < T*k_max, expert 0 (used for the shared experts).
struct ExpertGemmParams {
  const void* a; int64_t a_stride;  // up: x [T, D]; down: act [capacity, F]   (bf16, row stride in elements)
  const void* w;                    // up: experts_gate_up [E, 2F, D]; down: experts_down [E, D, F]
  void* c;                          // up: act [capacity, F]; down: expert_out [T*k_max, D]
  const int32_t* sorted_slots;      // [capacity] slot t*k_max+j in expert order, -1 = padding
  const int32_t* tile_experts;      // [capacity / block_m] expert of each tile
  const int32_t* num_padded;        // [1] used length of sorted_slots (device value)
  int32_t T, k_max, E, D, F, capacity, block_m;
  bool up;
  const int32_t* topk_ids;          // [T, k_max]; down only, nullable: the rows of c of sentinel
                                    // slots (id < 0 or >= E) are written as zeros, as moe_decode does
};

// Small-batch path (csrc/cuda/moe_decode.cu), T <= 16: no sort, no align.
//  act[t*k_max+j, :] = silu(x[t] . Wg[e]^T) * (x[t] . Wu[e]^T),  expert_out[t, j, :] = act[..] . Wd[e]^T
// with e = topk_ids[t, j]; slots with e < 0 or e >= E get expert_out = 0.
// topk_ids null -> every slot is expert 0 (dense mode, used for the shared experts).
struct MoeDecodeParams {
  const void* x;                 // [T, D] bf16, contiguous
  const int32_t* topk_ids;       // [T, k_max]
  const void* experts_gate_up;   // [E, 2F, D]
  const void* experts_down;      // [E, D, F]
  void* act;                     // [T*k_max, F] scratch
  void* expert_out;              // [T*k_max, D]
  int32_t T, k_max, E, D, F;
};

// Shared experts (csrc/cuda/shared_expert.cu): one dense SwiGLU MLP of width S.
//  shared_out[t] = (silu(x[t] . Wg^T) * (x[t] . Wu^T)) . Wd^T
struct SharedExpertParams {
  const void* x;         // [T, D] bf16, row stride x_stride (elements)
  int64_t x_stride;
  const void* gate_up;   // [2S, D]
  const void* down;      // [D, S]
  void* act;             // [T, S] scratch
  void* shared_out;      // [T, D] (the hook_shared_out tap)
  int32_t T, D, S;
};

// ---- CUDA quantized experts (csrc/cuda/moe_decode_q.cu; layout and bytes in its header) ----
// Weight-only 4/8-bit experts in the "qrow" layout: row n of a [E, N, K] weight is
// qcuda_row_bytes(K, fmt) bytes, codes (K rounded up to 32, GPTQ order along K) then one 32-bit
// word per group (G rounded up to 4): raw scale bits | zero offset << 16. The kernels call them
// too (host and device under nvcc; plain functions for every other compiler).
#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif
MOE_HOST_DEVICE constexpr int64_t qcuda_code_bytes(int64_t K, const QFormat& f) { return (K + 31) / 32 * 32 * f.bits / 8; }
MOE_HOST_DEVICE constexpr int64_t qcuda_row_bytes(int64_t K, const QFormat& f) {
  return qcuda_code_bytes(K, f) + ((K + f.group_size - 1) / f.group_size + 3) / 4 * 16;
}
// GPTQ tensors (true zeros, as QPackParams) -> qrow layout, on the device.
struct QRepackParams {
  const int32_t* qweight;  // [E, K*bits/32, N]
  const uint16_t* scales;  // [E, ceil(K/g), N] fp16 or bf16 bits
  const int32_t* qzeros;   // [E, ceil(K/g), N*bits/32]; nullable when sym (z = 2^(bits-1))
  void* dst;               // [E, N, qcuda_row_bytes(K, fmt)] bytes, 16-byte aligned
  QFormat fmt;
  int32_t E, N, K;
  bool sym;
};
// moe_decode (MoeDecodeParams) on qrow weights: same slots, sentinels, dense mode and T <= 16.
struct MoeDecodeQParams {
  const void* x;                 // [T, D] bf16, contiguous
  const int32_t* topk_ids;       // [T, k_max]; null = dense mode (every slot expert 0)
  const void* w13;               // qrow [E, 2F, D]: rows [gate F | up F]
  const void* w2;                // qrow [E, D, F]
  void* act;                     // [T*k_max, F] bf16 scratch
  void* expert_out;              // [T*k_max, D] bf16
  QFormat fmt;                   // one format for w13 and w2
  int32_t T, k_max, E, D, F;
};
// expert_gemm (ExpertGemmParams: slots, taps, dense mode, sentinel zeroing) on qrow weights
// (csrc/cuda/expert_gemm_q.cu): w is qrow [E, 2F, D] (up) or [E, D, F] (down) in format fmt.
struct ExpertGemmQParams {
  const void* a; int64_t a_stride;  // up: x [T, D]; down: act [capacity, F]   (bf16, row stride in elements)
  const void* w;                    // qrow weights
  void* c;                          // up: act [capacity, F]; down: expert_out [T*k_max, D]
  const int32_t* sorted_slots;      // [capacity]; null with the next two = dense mode
  const int32_t* tile_experts;      // [capacity / block_m]
  const int32_t* num_padded;        // [1] device value
  int32_t T, k_max, E, D, F, capacity, block_m;
  bool up;
  const int32_t* topk_ids;          // [T, k_max]; down only, nullable: sentinel slots' rows -> zeros
  QFormat fmt;
};
void qrepack_cuda(const QRepackParams& p, void* stream, int device = -1);
void expert_gemm_q_cuda(const ExpertGemmQParams& p, void* stream, int device = -1);
void moe_decode_q_cuda(const MoeDecodeQParams& p, void* stream, int device = -1);

// launchers (csrc/cuda/expert_gemm.cu, moe_decode.cu, shared_expert.cu):
void expert_gemm_cuda(const ExpertGemmParams& p, void* stream, int device = -1);
void moe_decode_cuda(const MoeDecodeParams& p, void* stream, int device = -1);
void shared_expert_cuda(const SharedExpertParams& p, void* stream, int device = -1);
// The tile height expert_gemm uses for this batch; align must pad each expert to it.
int expert_gemm_block_m(int T, int k_max, int E);
// moe_layer: the whole MoE FFN of one layer for the cpu backend in one call (decode: the Python
// work per layer is one attribute write and one call). In order, with the ops above:
//   router_logits = linear(x, router)                     [T, E]   dtype
//   route(router_logits, *k, expert_mask, force_expert)   -> topk_ids, topk_weights, router_probs
//   expert_out = expert_ffn(x, experts)                   [T, k_max, D]
//   shared_out = expert_ffn(x, shared, every token -> expert 0)   [T, D] (when shared_w13)
//   out = combine(expert_out, topk_weights, shared_out, residual) -> routed_out tap
// Every intermediate is a caller buffer, so the taps can be read after the call.
struct MoELayerParams {
  const void* x;               // [T, D] dtype, the post-attention RMSNorm output
  const void* residual;        // [T, D] dtype; may alias out
  const void* router;          // packed [E, D]
  const void* w13;             // packed experts gate|up
  const void* w2;              // packed experts down
  const void* shared_w13;      // packed shared gate|up (E = 1, F = S); nullable
  const void* shared_w2;       // packed shared down; nullable
  const int32_t* k;            // [1] runtime top-k
  const uint8_t* expert_mask;  // [E] or [T, E] rows, as RouteParams; nullable
  int64_t mask_stride;         // as RouteParams (0 = broadcast)
  MaskMode mask_mode;
  const int32_t* force_expert; // [1] or [T], as RouteParams; nullable
  int64_t force_stride;        // as RouteParams (0 = broadcast)
  bool renormalize;
  void* router_logits;         // [T, E] dtype
  int32_t* topk_ids;           // [T, k_max]
  float* topk_weights;         // [T, k_max]
  float* router_probs;         // [T, E]; nullable
  int32_t* usage_counts;       // [E]; nullable
  void* expert_out;            // [T, k_max, D] dtype
  void* shared_out;            // [T, D] dtype (when shared_w13)
  int32_t* shared_ids;         // [T] all 0 (when shared_w13)
  void* routed_out;            // [T, D] dtype; nullable
  void* out;                   // [T, D] dtype
  void* workspace;             // max of the experts' and the shared experts' workspace bytes:
                               // expert_ffn_workspace_bytes(T, k_max, E, F) and (T, 1, 1, S), or
                               // expert_ffn_q_workspace_bytes for quantized ones
  DType dtype;
  int32_t T, D, E, F, S, k_max;
  // Per weight: bits 0 = bf16/fp32 panels, 4 or 8 = quantized panels in that format (w13 and w2
  // of one expert set are the same kind); zero-initialised = all bf16/fp32 panels.
  QFormat fmt13, fmt2, shared_fmt13, shared_fmt2;
};
void moe_layer_cpu(const MoELayerParams& p);

// attention_decode: one new query per sequence against its KV cache (the decode step of the cpu
// backend; PyTorch's CPU SDPA costs ~10x the cache read at these sizes, bench/kernels.py).
//   out[b,h] = sum_s softmax_s(scale * q[b,h].k[b,g,s]) v[b,g,s],  g = h / (H / Hkv),
//   over s < S with valid[b,s] or s == S-1 (the query's own column); fp32 math.
struct AttnDecodeParams {
  const void* q;          // [B, H, hd] dtype
  const void* k_cache;    // [B, Hkv, S_cap, hd] dtype (one layer)
  const void* v_cache;    // [B, Hkv, S_cap, hd] dtype
  const uint8_t* valid;   // [B, valid_stride] nonzero = a real key
  void* out;              // [B, H, hd] dtype
  float* workspace;       // [B * H * S] fp32 scores
  float scale;
  DType dtype;
  int32_t B, H, Hkv, hd, S, S_cap, valid_stride;
};
void attention_decode_cpu(const AttnDecodeParams& p);

// attention_block_decode: a decoder layer's whole attention for one new token per sequence
// (cpu backend decode; replaces ~30 small torch ops per layer):
//   q|k|v = linear(x, qkv); q, k = rope(q, k) (rotate-half layout, each op rounded to dtype as
//   the model's torch code does); cache[:, :, pos] = k, v; o = attention_decode; out = linear(o, o_w)
struct AttnBlockParams {
  const void* x;          // [B, D] dtype, the input RMSNorm output
  const void* qkv;        // packed [(H + 2 Hkv) hd, D]
  const void* o;          // packed [D, H hd]
  const void* cos;        // [B, hd] dtype
  const void* sin;        // [B, hd] dtype
  void* k_cache;          // [B, Hkv, S_cap, hd] dtype (this layer); column pos is written
  void* v_cache;
  const uint8_t* valid;   // [B, valid_stride]
  void* qkv_buf;          // [B, (H + 2 Hkv) hd] dtype scratch
  void* attn_buf;         // [B, H hd] dtype scratch
  float* scores;          // [B * H * (pos + 1)] fp32 scratch
  void* out;              // [B, D] dtype
  float scale;
  DType dtype;
  int32_t B, D, H, Hkv, hd, pos, S_cap, valid_stride;
  QFormat qkv_fmt, o_fmt;  // bits 0 = bf16/fp32 panels, else quantized panels (as MoELayerParams)
  void* workspace;         // linear_q_workspace_bytes(B, K) of each quantized weight; nullable if none
};
void attention_block_decode_cpu(const AttnBlockParams& p);

// out = w * round_dt(x * rsqrt(mean(x^2) + eps)) (fp32 statistics, the model's rounding order).
struct RMSNormParams {
  const void* x;  // [T, D] dtype
  const void* w;  // [D] dtype
  void* out;      // [T, D] dtype
  float eps;
  DType dtype;
  int32_t T, D;
};
void rms_norm_cpu(const RMSNormParams& p);

// decode_step: a whole decode step of the model on the cpu backend -- one new token per
// sequence, no taps -- in one call, so the Python work per step is one call, not ~4 per layer
// plus ~30 small torch ops (bench/throughput.py --profile-overhead). It sequences the kernels
// above on a workspace, in the order and with the roundings of Model.forward's cpu path, so its
// logits are bit-identical to that path (tests/test_model_backends.py):
//   x = embed[ids]; cos, sin = rope table rows next_pos
//   for each layer l: h = rms_norm(x, input_norm);  x = x + attention_block_decode(h)
//                     h = rms_norm(x, post_norm);   x = moe_layer(h, residual x)   (MoE layer)
//                                                   x = x + expert_ffn(h, the MLP as one expert)
//   logits = fp32(linear(rms_norm(x, final_norm), lm_head))
// and the cache bookkeeping: valid[b, pos] = 1, next_pos[b] += 1. Every id and position is
// checked before anything is written.
struct DecodeLayer {
  const void* input_norm;   // [D] dtype
  const void* post_norm;    // [D] dtype
  const void* qkv;          // packed [(H + 2 Hkv) hd, D]
  const void* o;            // packed [D, H hd]
  const void* router;       // packed [E, D]: an MoE layer; nullptr: a dense layer
  const void* w13;          // packed gate|up: the routed experts (MoE) or the MLP as one expert
  const void* w2;           // packed down, likewise
  const void* shared_w13;   // packed shared gate|up (E = 1); nullable
  const void* shared_w2;    // packed shared down; nullable
  int32_t F;                // expert width (MoE) or intermediate_size (dense)
  int32_t S;                // shared width; 0 = no shared experts
  // Per weight: bits 0 = bf16/fp32 panels, 4 or 8 = quantized panels (as MoELayerParams).
  QFormat qkv_fmt, o_fmt, fmt13, fmt2, shared_fmt13, shared_fmt2;
};
struct DecodeStepParams {
  const DecodeLayer* layers;   // [L]
  const int64_t* ids;          // [B] this step's token per sequence, checked against [0, V)
  const void* embed;           // [V, D] dtype
  const void* rope_cos;        // [rope_len, hd] dtype: row p is position p
  const void* rope_sin;        // [rope_len, hd] dtype
  int64_t* next_pos;           // [B] the token's position (< rope_len); incremented
  void* k_cache;               // [L, B, Hkv, S_cap, hd] dtype; column pos is written
  void* v_cache;
  int64_t cache_bytes;         // bytes the caller's k_cache (and v_cache) each hold: must be
                               // exactly L*B*Hkv*S_cap*hd*sizeof(dtype), else the call refuses
  uint8_t* valid;              // [B, valid_stride]; column pos is set
  const int32_t* k;            // [L] top-k per layer
  const int32_t* force_expert; // [L] (force_stride 0) or [L, B] (force_stride 1), -1 = none
  int64_t force_stride;        // 0: one id per layer; 1: one per sequence (its token's position)
  const uint8_t* expert_mask;  // [L, E] (mask_stride 0) or [L, B, E] (mask_stride E), nonzero = masked; nullable
  int64_t mask_stride;         // 0: one row per layer; E: one row per sequence
  MaskMode mask_mode;
  bool renormalize;
  int32_t* usage_counts;       // [L, E]; nullable
  const void* final_norm;      // [D] dtype
  const void* lm_head;         // packed [V, D]: bf16/fp32 panels or quantized (lm_head_fmt)
  QFormat lm_head_fmt;         // bits 0: panels in dtype; 4/8: quantized panels (either_panels.h)
  float* logits;               // [B, V]
  void* workspace;             // decode_step_workspace_bytes(p) bytes, 64-byte aligned
  float eps, scale;
  DType dtype;
  int32_t L, B, D, H, Hkv, hd, E, k_max, V, pos, S_cap, valid_stride, rope_len;
};
int64_t decode_step_workspace_bytes(const DecodeStepParams& p);  // reads sizes and layers[].F/S
void decode_step_cpu(const DecodeStepParams& p);

}  // namespace moe
