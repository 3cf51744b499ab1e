// The whole C++ interface of moe_engine on one screen: one Params struct per op.
//
// Shape legend: T tokens, D hidden, E routed experts, K top-k (runtime, 0..k_max),
// k_max buffer width of the top-k outputs, F expert width, S shared width,
// Tkv / Tkv_cap cache columns in use / allocated, Dout / Din output rows / input features of a weight,
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

// Each struct's fields are written once, as a list MOE_..._PARAMS(X) of X(type, name) entries in
// member order (callers aggregate-initialise some structs, so the order is part of the contract):
// the struct expands it with MOE_DECLARE, csrc/bindings.cpp with one Python property per field.
#define MOE_DECLARE(type, name) type name;

// route: logits [T,E] -> fp32 softmax over all E -> mask -> top-k (runtime k) -> renormalise.
#define MOE_ROUTE_PARAMS(X)                                                                            \
  X(const void*, router_logits)    /* [T, E] logits_dtype, row stride logits_stride (elements) */      \
  X(DType, logits_dtype)                                                                               \
  X(int64_t, logits_stride)                                                                            \
  X(int32_t, T) X(int32_t, E) X(int32_t, k_max)                                                        \
  X(const int32_t*, k)             /* [1] active top-k, 0 <= k <= k_max */                             \
  /* row t at expert_mask + t*mask_stride: [E] nonzero = masked out; nullable */                       \
  X(const uint8_t*, expert_mask)                                                                       \
  X(int64_t, mask_stride)          /* 0: one [E] row for every token; >= E: [T, E] rows, one per token */ \
  X(MaskMode, mask_mode)           /* reroute: cannot be chosen; zero: chosen, weight set to 0 */      \
  /* force_expert[t*force_stride]: forced into slot 0, -1 = none; nullable */                          \
  X(const int32_t*, force_expert)                                                                      \
  X(int64_t, force_stride)         /* 0: one id for every token; 1: [T] ids, one per token */          \
  X(bool, renormalize)             /* divide kept weights by their sum (when > 0) */                   \
  X(int32_t*, topk_ids)            /* [T, k_max] */                                                    \
  X(float*, topk_weights)          /* [T, k_max] */                                                    \
  X(float*, router_probs)          /* [T, E] tap; nullable */                                          \
  X(int32_t*, usage_counts)        /* [E] per-layer counters, += chosen slots; nullable */
struct RouteParams { MOE_ROUTE_PARAMS(MOE_DECLARE) };

// align: group slots by expert, each expert's segment padded to block_m.
#define MOE_ALIGN_PARAMS(X)                                                                            \
  X(const int32_t*, topk_ids)  /* [T, k_max] */                                                        \
  X(int32_t, T) X(int32_t, k_max) X(int32_t, E) X(int32_t, block_m)                                    \
  X(int32_t*, expert_counts)   /* [E] slots per expert (unpadded) */                                   \
  X(int32_t*, expert_offsets)  /* [E+1] start of each expert's padded segment */                       \
  X(int32_t*, sorted_slots)    /* [capacity] slot index t*k_max+j, ascending within an expert; -1 pad */ \
  X(int32_t*, tile_experts)    /* [capacity / block_m] expert of each tile, -1 unused */               \
  X(int32_t*, num_padded)      /* [1] used length of sorted_slots (multiple of block_m) */             \
  X(int32_t*, workspace)       /* multi-block path scratch; see align_workspace_size(); nullable */
struct AlignParams { MOE_ALIGN_PARAMS(MOE_DECLARE) };
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
#define MOE_COMBINE_PARAMS(X)                                                                          \
  X(const void*, expert_out)     /* [T, k_max, D] unweighted (the hook_expert_out tap) */              \
  X(const float*, topk_weights)  /* [T, k_max] */                                                      \
  X(const int32_t*, topk_ids)    /* [T, k_max]; sentinel slots are skipped */                          \
  X(const void*, shared_out)     /* [T, D]; nullable */                                                \
  X(const void*, residual)       /* [T, D]; nullable */                                                \
  X(void*, out)                  /* [T, D] */                                                          \
  X(void*, routed_out)           /* [T, D] tap (routed sum only); nullable */                          \
  X(DType, dtype)                                                                                      \
  X(int32_t, T) X(int32_t, k_max) X(int32_t, D)
struct CombineParams { MOE_COMBINE_PARAMS(MOE_DECLARE) };

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
// Packed weights ("panels", csrc/cpu/expert_ffn.cpp): W [Dout, Din] (y = x W^T) is stored as
// ceil(Dout/32) panels of 32 output rows (zero-padded), each panel contiguous:
//   bf16: [ceil(Din/2)][32][2]  (k pairs interleaved: the vdpbf16ps operand layout)
//   f32:  [Din][32]
// With gate_up, src rows are [gate F | up F] and panel p holds gate rows 16p..16p+15 in lanes
// 0..15 and up rows 16p..16p+15 in lanes 16..31, so one panel yields 16 SiLU(gate)*up outputs.
#define MOE_PACK_PARAMS(X)                                                                             \
  X(const void*, src)  /* [E, Dout, Din] dtype, contiguous */                                          \
  X(void*, dst)        /* pack_size_bytes(...) */                                                      \
  X(DType, dtype)                                                                                      \
  X(int32_t, E) X(int32_t, Dout) X(int32_t, Din)                                                       \
  X(bool, gate_up)     /* Dout = 2F, rows [gate | up] */
struct PackParams { MOE_PACK_PARAMS(MOE_DECLARE) };
int64_t pack_size_bytes(DType dtype, int64_t E, int64_t Dout, int64_t Din, bool gate_up);

// expert_out[t,j,:] = down_e(SiLU(gate_e(x_t)) * up_e(x_t)) for e = topk_ids[t,j] (unweighted:
// the hook_expert_out tap); sentinel slots get zero rows. Each chosen expert's weights are
// streamed once per call for all tokens that chose it.
#define MOE_EXPERT_FFN_PARAMS(X)                                                                       \
  X(const void*, x)            /* [T, D] dtype, contiguous */                                          \
  X(const void*, w13)          /* packed gate|up: E x pack(2F, D, gate_up) */                          \
  X(const void*, w2)           /* packed down:    E x pack(D, F) */                                    \
  X(const int32_t*, topk_ids)  /* [T, k_max] */                                                        \
  X(void*, expert_out)         /* [T, k_max, D] dtype */                                               \
  X(void*, workspace)          /* expert_ffn_workspace_bytes(...) */                                   \
  X(DType, dtype)                                                                                      \
  X(int32_t, T) X(int32_t, k_max) X(int32_t, D) X(int32_t, F) X(int32_t, E)
struct ExpertFFNParams { MOE_EXPERT_FFN_PARAMS(MOE_DECLARE) };
int64_t expert_ffn_workspace_bytes(DType dtype, int64_t T, int64_t k_max, int64_t E, int64_t F);

// y = x W^T with W packed (E = 1): the small-T (decode) dense mat-vec of the cpu backend.
#define MOE_LINEAR_PARAMS(X)                                                                           \
  X(const void*, x)  /* [T, Din] dtype, contiguous */                                                  \
  X(const void*, w)  /* packed [Dout, Din] */                                                          \
  X(void*, y)        /* [T, Dout] dtype */                                                             \
  X(DType, dtype)                                                                                      \
  X(int32_t, T) X(int32_t, Dout) X(int32_t, Din)
struct LinearParams { MOE_LINEAR_PARAMS(MOE_DECLARE) };

void pack_weights_cpu(const PackParams& p);
void expert_ffn_cpu(const ExpertFFNParams& p);
void linear_cpu(const LinearParams& p);

// ---- CPU quantized weights (csrc/cpu/quant_gemm.cpp) ------------------------------------------
// Weight-only 4- or 8-bit, group-wise along Din: w[n,k] = s[k/g, n] * (q[k,n] - z[k/g, n]).
// Input: the GPTQ tensors of W [Dout, Din] per expert (packing along Din / Dout low bits first, element i
// of a 32-bit word at bit offset (i % (32/bits)) * bits):
//   qweight int32 [Din*bits/32, Dout], scales fp16|bf16 [ceil(Din/g), Dout], qzeros int32
//   [ceil(Din/g), ceil(Dout*bits/32)] (the zero as the caller means it; ignored when sym: z = 2^(bits-1)).
// Packed ("quantized panels"): like the bf16 panels above, ceil(Dout/32) panels of 32 output rows
// (zero-padded; gate_up: gate rows 16p.. in lanes 0-15, up rows in lanes 16-31), each panel
// contiguous, per group gi of len = min(g, Din - gi*g) k's in ascending order:
//   codes  len x 32*bits/8 B: per k, int8: byte l = lane l; int4: byte l = lane l (low nibble)
//          | lane l+16 (high nibble)
//   scales 32 x 2 B (the input's raw fp16 or bf16 bits, lane order)
//   zeros  32 x 1 B
// so a panel is Din*4*bits + ceil(Din/g)*96 bytes (int8 g128: 32.75 KiB per 1024 k; int4 g128:
// 16.75 KiB); padding lanes have code, scale and zero 0 and yield exact zeros.
#define MOE_QFORMAT(X)                                                                                 \
  X(int32_t, bits)        /* 4 or 8 */                                                                 \
  X(int32_t, group_size)  /* 32, 64 or 128 */                                                          \
  X(bool, scales_bf16)    /* raw scale bits are bf16 (else fp16) */
struct QFormat { MOE_QFORMAT(MOE_DECLARE) };
#define MOE_QPACK_PARAMS(X)                                                                            \
  X(const int32_t*, qweight)  /* [E, Din*bits/32, Dout] */                                             \
  X(const uint16_t*, scales)  /* [E, ceil(Din/g), Dout] fp16 or bf16 bits */                           \
  X(const int32_t*, qzeros)   /* [E, ceil(Din/g), ceil(Dout*bits/32)]; nullable when sym */            \
  X(void*, dst)               /* qpack_size_bytes(...) */                                              \
  X(QFormat, fmt)                                                                                      \
  X(int32_t, E) X(int32_t, Dout) X(int32_t, Din)                                                       \
  X(bool, sym) X(bool, gate_up)
struct QPackParams { MOE_QPACK_PARAMS(MOE_DECLARE) };
int64_t qpack_size_bytes(int64_t E, int64_t Dout, int64_t Din, const QFormat& f, bool gate_up);
// dst[e, n, k] = s * (q - z) in dtype (fp32 is exact): the dense view for reference paths.
#define MOE_QDEQUANT_PARAMS(X)                                                                         \
  X(const void*, src)  /* packed */                                                                    \
  X(void*, dst)        /* [E, Dout, Din] dtype */                                                      \
  X(QFormat, fmt)                                                                                      \
  X(DType, dtype)                                                                                      \
  X(int32_t, E) X(int32_t, Dout) X(int32_t, Din)                                                       \
  X(bool, gate_up)
struct QDequantParams { MOE_QDEQUANT_PARAMS(MOE_DECLARE) };
// y = x W^T with W quantized-packed (E = 1, not gate_up); fp32 accumulation.
#define MOE_QLINEAR_PARAMS(X)                                                                          \
  X(const void*, x)    /* [T, Din] dtype, contiguous */                                                \
  X(const void*, w)    /* packed [Dout, Din] */                                                        \
  X(void*, y)          /* [T, Dout] dtype */                                                           \
  X(void*, workspace)  /* linear_q_workspace_bytes(...) */                                             \
  X(QFormat, fmt)                                                                                      \
  X(DType, dtype)                                                                                      \
  X(int32_t, T) X(int32_t, Dout) X(int32_t, Din)
struct QLinearParams { MOE_QLINEAR_PARAMS(MOE_DECLARE) };
int64_t linear_q_workspace_bytes(int64_t T, int64_t Din, const QFormat& f);
// expert_ffn_cpu's contract (ExpertFFNParams) on quantized-packed weights.
#define MOE_QEXPERT_FFN_PARAMS(X)                                                                      \
  X(const void*, x)            /* [T, D] dtype, contiguous */                                          \
  X(const void*, w13)          /* packed gate|up: E x qpack(2F, D, gate_up), format fmt13 */           \
  X(const void*, w2)           /* packed down:    E x qpack(D, F), format fmt2 */                      \
  X(const int32_t*, topk_ids)  /* [T, k_max] */                                                        \
  X(void*, expert_out)         /* [T, k_max, D] dtype */                                               \
  X(void*, workspace)          /* expert_ffn_q_workspace_bytes(...) */                                 \
  X(QFormat, fmt13) X(QFormat, fmt2)                                                                   \
  X(DType, dtype)                                                                                      \
  X(int32_t, T) X(int32_t, k_max) X(int32_t, D) X(int32_t, F) X(int32_t, E)
struct QExpertFFNParams { MOE_QEXPERT_FFN_PARAMS(MOE_DECLARE) };
int64_t expert_ffn_q_workspace_bytes(int64_t T, int64_t k_max, int64_t E, int64_t D, int64_t F,
                                     const QFormat& f13, const QFormat& f2);
// Round-to-nearest GPTQ quantization of w [E, Dout, Din] (csrc/cpu/quantize_rtn.cpp; the reference
// is quant.quantize_reference): writes qweight int32 [E, Din/p, Dout], scales fp16 bits [E, G, Dout] and
// qzeros int32 [E, G, Dout/p] (p = 32/bits values per word, low bits first; stored zero = z -
// zero_offset). Dout and Din multiples of p; the last group may be partial.
#define MOE_QRTN_PARAMS(X)                                                                             \
  X(const void*, w)     /* [E, Dout, Din] dtype, contiguous */                                         \
  X(int32_t*, qweight)  /* [E, Din/p, Dout] */                                                         \
  X(uint16_t*, scales)  /* [E, ceil(Din/g), Dout] fp16 bits */                                         \
  X(int32_t*, qzeros)   /* [E, ceil(Din/g), Dout/p] */                                                 \
  X(DType, dtype)                                                                                      \
  X(int32_t, E) X(int32_t, Dout) X(int32_t, Din) X(int32_t, bits) X(int32_t, group_size)               \
  X(int32_t, zero_offset)                                                                              \
  X(bool, sym)
struct QRtnParams { MOE_QRTN_PARAMS(MOE_DECLARE) };
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
#define MOE_EXPERT_GEMM_PARAMS(X)                                                                      \
  /* up: x [T, D]; down: act [capacity, F]   (bf16, row stride in elements) */                         \
  X(const void*, a) X(int64_t, a_stride)                                                               \
  X(const void*, w)                /* up: experts_gate_up [E, 2F, D]; down: experts_down [E, D, F] */  \
  X(void*, c)                      /* up: act [capacity, F]; down: expert_out [T*k_max, D] */          \
  X(const int32_t*, sorted_slots)  /* [capacity] slot t*k_max+j in expert order, -1 = padding */       \
  X(const int32_t*, tile_experts)  /* [capacity / block_m] expert of each tile */                      \
  X(const int32_t*, num_padded)    /* [1] used length of sorted_slots (device value) */                \
  X(int32_t, T) X(int32_t, k_max) X(int32_t, E) X(int32_t, D) X(int32_t, F) X(int32_t, capacity)       \
  X(int32_t, block_m)                                                                                  \
  X(bool, up)                                                                                          \
  X(const int32_t*, topk_ids)      /* [T, k_max]; down only, nullable: the rows of c of sentinel */    \
  /* slots (id < 0 or >= E) are written as zeros, as moe_decode does */                                \
  /* split-K (dense mode, used by shared_expert.cu): k_splits > 1 splits K into k_splits ranges */    \
  /* and writes each range's fp32 sums to partial instead of c: down [k_splits, capacity, D], up */     \
  /* [k_splits, capacity, 2F] (gate sums, then up sums); the caller reduces them in a fixed order */    \
  /* (and applies silu for up). 0 or 1: no split. */                                                   \
  X(float*, partial) X(int32_t, k_splits)
struct ExpertGemmParams { MOE_EXPERT_GEMM_PARAMS(MOE_DECLARE) };

// Small-batch path (csrc/cuda/moe_decode.cu), T <= 16: no sort, no align.
//  act[t*k_max+j, :] = silu(x[t] . Wg[e]^T) * (x[t] . Wu[e]^T),  expert_out[t, j, :] = act[..] . Wd[e]^T
// with e = topk_ids[t, j]; slots with e < 0 or e >= E get expert_out = 0.
// topk_ids null -> every slot is expert 0 (dense mode, used for the shared experts).
#define MOE_MOE_DECODE_PARAMS(X)                                                                       \
  X(const void*, x)                /* [T, D] bf16, contiguous */                                       \
  X(const int32_t*, topk_ids)      /* [T, k_max] */                                                    \
  X(const void*, experts_gate_up)  /* [E, 2F, D] */                                                    \
  X(const void*, experts_down)     /* [E, D, F] */                                                     \
  X(void*, act)                    /* [T*k_max, F] scratch */                                          \
  X(void*, expert_out)             /* [T*k_max, D] */                                                  \
  X(int32_t, T) X(int32_t, k_max) X(int32_t, E) X(int32_t, D) X(int32_t, F)                          \
  /* split-K of the down launch (dense mode, used by shared_expert.cu): k_splits > 1 splits F */       \
  /* into k_splits ranges and writes fp32 sums to partial [k_splits, T*k_max, D] instead of */         \
  /* expert_out; the caller reduces them in a fixed order. 0 or 1: no split. */                        \
  X(float*, partial) X(int32_t, k_splits)
struct MoeDecodeParams { MOE_MOE_DECODE_PARAMS(MOE_DECLARE) };

// Shared experts (csrc/cuda/shared_expert.cu): one dense SwiGLU MLP of width S.
//  shared_out[t] = (silu(x[t] . Wg^T) * (x[t] . Wu^T)) . Wd^T
#define MOE_SHARED_EXPERT_PARAMS(X)                                                                    \
  X(const void*, x)        /* [T, D] bf16, row stride x_stride (elements) */                           \
  X(int64_t, x_stride)                                                                                 \
  X(const void*, gate_up)  /* [2S, D] */                                                               \
  X(const void*, down)     /* [D, S] */                                                                \
  X(void*, act)            /* [T, S] scratch */                                                        \
  X(void*, shared_out)     /* [T, D] (the hook_shared_out tap) */                                      \
  X(int32_t, T) X(int32_t, D) X(int32_t, S)                                                          \
  X(float*, partial)       /* [shared_expert_plan(T, D, S).partial_floats] fp32 scratch; nullable */   \
  /* when that is 0 */
struct SharedExpertParams { MOE_SHARED_EXPERT_PARAMS(MOE_DECLARE) };
// How shared_expert_cuda runs a batch (csrc/cuda/shared_expert.cu explains the choice). Two
// batches give a token's row the same bits whenever their plans have the same (decode, up_splits,
// down_splits) (the batch-invariance property of the shared experts on cuda; block_m does not
// change bits).
//   decode: moe_decode in dense mode (else expert_gemm in dense mode, tile height block_m)
//   up_splits: split-K of the gate_up projection over D (1 = none; expert_gemm path only)
//   down_splits: split-K of the down projection over S (1 = none)
//   partial_floats: fp32 scratch elements the caller passes as SharedExpertParams::partial
struct SharedExpertPlan {
  bool decode = false;
  int32_t block_m = 0;
  int32_t up_splits = 1;
  int32_t down_splits = 1;
  int64_t partial_floats = 0;
};
SharedExpertPlan shared_expert_plan(int T, int D, int S, bool x_contiguous = true);

// ---- CUDA quantized experts (csrc/cuda/moe_decode_q.cu; layout and bytes in its header) ----
// Weight-only 4/8-bit experts in the "qrow" layout: row n of a [E, Dout, Din] weight is
// qcuda_row_bytes(Din, fmt) bytes, codes (Din rounded up to 32, GPTQ order along Din) then one 32-bit
// word per group (G rounded up to 4): raw scale bits | zero offset << 16. The kernels call them
// too (host and device under nvcc; plain functions for every other compiler).
#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif
MOE_HOST_DEVICE constexpr int64_t qcuda_code_bytes(int64_t Din, const QFormat& f) { return (Din + 31) / 32 * 32 * f.bits / 8; }
MOE_HOST_DEVICE constexpr int64_t qcuda_row_bytes(int64_t Din, const QFormat& f) {
  return qcuda_code_bytes(Din, f) + ((Din + f.group_size - 1) / f.group_size + 3) / 4 * 16;
}
// GPTQ tensors (true zeros, as QPackParams) -> qrow layout, on the device.
#define MOE_QREPACK_PARAMS(X)                                                                          \
  X(const int32_t*, qweight)  /* [E, Din*bits/32, Dout] */                                             \
  X(const uint16_t*, scales)  /* [E, ceil(Din/g), Dout] fp16 or bf16 bits */                           \
  X(const int32_t*, qzeros)   /* [E, ceil(Din/g), Dout*bits/32]; nullable when sym (z = 2^(bits-1)) */ \
  X(void*, dst)               /* [E, Dout, qcuda_row_bytes(Din, fmt)] bytes, 16-byte aligned */        \
  X(QFormat, fmt)                                                                                      \
  X(int32_t, E) X(int32_t, Dout) X(int32_t, Din)                                                       \
  X(bool, sym)
struct QRepackParams { MOE_QREPACK_PARAMS(MOE_DECLARE) };
// moe_decode (MoeDecodeParams) on qrow weights: same slots, sentinels, dense mode and T <= 16.
#define MOE_MOE_DECODE_Q_PARAMS(X)                                                                     \
  X(const void*, x)            /* [T, D] bf16, contiguous */                                           \
  X(const int32_t*, topk_ids)  /* [T, k_max]; null = dense mode (every slot expert 0) */               \
  X(const void*, w13)          /* qrow [E, 2F, D]: rows [gate F | up F] */                             \
  X(const void*, w2)           /* qrow [E, D, F] */                                                    \
  X(void*, act)                /* [T*k_max, F] bf16 scratch */                                         \
  X(void*, expert_out)         /* [T*k_max, D] bf16 */                                                 \
  X(QFormat, fmt)              /* one format for w13 and w2 */                                         \
  X(int32_t, T) X(int32_t, k_max) X(int32_t, E) X(int32_t, D) X(int32_t, F)
struct MoeDecodeQParams { MOE_MOE_DECODE_Q_PARAMS(MOE_DECLARE) };
// expert_gemm (ExpertGemmParams: slots, taps, dense mode, sentinel zeroing) on qrow weights
// (csrc/cuda/expert_gemm_q.cu): w is qrow [E, 2F, D] (up) or [E, D, F] (down) in format fmt.
#define MOE_EXPERT_GEMM_Q_PARAMS(X)                                                                    \
  /* up: x [T, D]; down: act [capacity, F]   (bf16, row stride in elements) */                         \
  X(const void*, a) X(int64_t, a_stride)                                                               \
  X(const void*, w)                /* qrow weights */                                                  \
  X(void*, c)                      /* up: act [capacity, F]; down: expert_out [T*k_max, D] */          \
  X(const int32_t*, sorted_slots)  /* [capacity]; null with the next two = dense mode */               \
  X(const int32_t*, tile_experts)  /* [capacity / block_m] */                                          \
  X(const int32_t*, num_padded)    /* [1] device value */                                              \
  X(int32_t, T) X(int32_t, k_max) X(int32_t, E) X(int32_t, D) X(int32_t, F) X(int32_t, capacity)       \
  X(int32_t, block_m)                                                                                  \
  X(bool, up)                                                                                          \
  X(const int32_t*, topk_ids)      /* [T, k_max]; down only, nullable: sentinel slots' rows -> zeros */ \
  X(QFormat, fmt)
struct ExpertGemmQParams { MOE_EXPERT_GEMM_Q_PARAMS(MOE_DECLARE) };
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
#define MOE_LAYER_PARAMS(X)                                                                            \
  X(const void*, x)                /* [T, D] dtype, the post-attention RMSNorm output */               \
  X(const void*, residual)         /* [T, D] dtype; may alias out */                                   \
  X(const void*, router)           /* packed [E, D] */                                                 \
  X(const void*, w13)              /* packed experts gate|up */                                        \
  X(const void*, w2)               /* packed experts down */                                           \
  X(const void*, shared_w13)       /* packed shared gate|up (E = 1, F = S); nullable */                \
  X(const void*, shared_w2)        /* packed shared down; nullable */                                  \
  X(const int32_t*, k)             /* [1] runtime top-k */                                             \
  X(const uint8_t*, expert_mask)   /* [E] or [T, E] rows, as RouteParams; nullable */                  \
  X(int64_t, mask_stride)          /* as RouteParams (0 = broadcast) */                                \
  X(MaskMode, mask_mode)                                                                               \
  X(const int32_t*, force_expert)  /* [1] or [T], as RouteParams; nullable */                          \
  X(int64_t, force_stride)         /* as RouteParams (0 = broadcast) */                                \
  X(bool, renormalize)                                                                                 \
  X(void*, router_logits)          /* [T, E] dtype */                                                  \
  X(int32_t*, topk_ids)            /* [T, k_max] */                                                    \
  X(float*, topk_weights)          /* [T, k_max] */                                                    \
  X(float*, router_probs)          /* [T, E]; nullable */                                              \
  X(int32_t*, usage_counts)        /* [E]; nullable */                                                 \
  X(void*, expert_out)             /* [T, k_max, D] dtype */                                           \
  X(void*, shared_out)             /* [T, D] dtype (when shared_w13) */                                \
  X(int32_t*, shared_ids)          /* [T] all 0 (when shared_w13) */                                   \
  X(void*, routed_out)             /* [T, D] dtype; nullable */                                        \
  X(void*, out)                    /* [T, D] dtype */                                                  \
  X(void*, workspace)              /* max of the experts' and the shared experts' workspace bytes: */  \
  /* expert_ffn_workspace_bytes(T, k_max, E, F) and (T, 1, 1, S), or */                                \
  /* expert_ffn_q_workspace_bytes for quantized ones */                                                \
  X(DType, dtype)                                                                                      \
  X(int32_t, T) X(int32_t, D) X(int32_t, E) X(int32_t, F) X(int32_t, S) X(int32_t, k_max)              \
  /* Per weight: bits 0 = bf16/fp32 panels, 4 or 8 = quantized panels in that format (w13 and w2 */    \
  /* of one expert set are the same kind); zero-initialised = all bf16/fp32 panels. */                 \
  X(QFormat, fmt13) X(QFormat, fmt2) X(QFormat, shared_fmt13) X(QFormat, shared_fmt2)
struct MoELayerParams { MOE_LAYER_PARAMS(MOE_DECLARE) };
void moe_layer_cpu(const MoELayerParams& p);

// attention_decode: one new query per sequence against its KV cache (the decode step of the cpu
// backend; PyTorch's CPU SDPA costs ~10x the cache read at these sizes, bench/kernels.py).
//   out[b,h] = sum_s softmax_s(scale * q[b,h].k[b,g,s]) v[b,g,s],  g = h / (H / Hkv),
//   over s < Tkv with valid[b,s] or s == Tkv-1 (the query's own column); fp32 math.
#define MOE_ATTN_DECODE_PARAMS(X)                                                                      \
  X(const void*, q)         /* [B, H, hd] dtype */                                                     \
  X(const void*, k_cache)   /* [B, Hkv, Tkv_cap, hd] dtype (one layer) */                              \
  X(const void*, v_cache)   /* [B, Hkv, Tkv_cap, hd] dtype */                                          \
  X(const uint8_t*, valid)  /* [B, valid_stride] nonzero = a real key */                               \
  X(void*, out)             /* [B, H, hd] dtype */                                                     \
  X(float*, workspace)      /* [B * H * Tkv] fp32 scores */                                            \
  X(float, scale)                                                                                      \
  X(DType, dtype)                                                                                      \
  X(int32_t, B) X(int32_t, H) X(int32_t, Hkv) X(int32_t, hd) X(int32_t, Tkv) X(int32_t, Tkv_cap)       \
  X(int32_t, valid_stride)
struct AttnDecodeParams { MOE_ATTN_DECODE_PARAMS(MOE_DECLARE) };
void attention_decode_cpu(const AttnDecodeParams& p);

// attention_block_decode: a decoder layer's whole attention for one new token per sequence
// (cpu backend decode; replaces ~30 small torch ops per layer):
//   q|k|v = linear(x, qkv); q, k = rope(q, k) (rotate-half layout, each op rounded to dtype as
//   the model's torch code does); cache[:, :, pos] = k, v; o = attention_decode; out = linear(o, o_w)
#define MOE_ATTN_BLOCK_PARAMS(X)                                                                       \
  X(const void*, x)         /* [B, D] dtype, the input RMSNorm output */                               \
  X(const void*, qkv)       /* packed [(H + 2 Hkv) hd, D] */                                           \
  X(const void*, o)         /* packed [D, H hd] */                                                     \
  X(const void*, cos)       /* [B, hd] dtype */                                                        \
  X(const void*, sin)       /* [B, hd] dtype */                                                        \
  X(void*, k_cache)         /* [B, Hkv, Tkv_cap, hd] dtype (this layer); column pos is written */      \
  X(void*, v_cache)                                                                                    \
  X(const uint8_t*, valid)  /* [B, valid_stride] */                                                    \
  X(void*, qkv_buf)         /* [B, (H + 2 Hkv) hd] dtype scratch */                                    \
  X(void*, attn_buf)        /* [B, H hd] dtype scratch */                                              \
  X(float*, scores)         /* [B * H * (pos + 1)] fp32 scratch */                                     \
  X(void*, out)             /* [B, D] dtype */                                                         \
  X(float, scale)                                                                                      \
  X(DType, dtype)                                                                                      \
  X(int32_t, B) X(int32_t, D) X(int32_t, H) X(int32_t, Hkv) X(int32_t, hd) X(int32_t, pos)             \
  X(int32_t, Tkv_cap) X(int32_t, valid_stride)                                                         \
  /* bits 0 = bf16/fp32 panels, else quantized panels (as MoELayerParams) */                           \
  X(QFormat, qkv_fmt) X(QFormat, o_fmt)                                                                \
  X(void*, workspace)       /* linear_q_workspace_bytes(B, Din) of each quantized weight; nullable if none */
struct AttnBlockParams { MOE_ATTN_BLOCK_PARAMS(MOE_DECLARE) };
void attention_block_decode_cpu(const AttnBlockParams& p);

// out = w * round_dt(x * rsqrt(mean(x^2) + eps)) (fp32 statistics, the model's rounding order).
#define MOE_RMS_NORM_PARAMS(X)                                                                         \
  X(const void*, x)  /* [T, D] dtype */                                                                \
  X(const void*, w)  /* [D] dtype */                                                                   \
  X(void*, out)      /* [T, D] dtype */                                                                \
  X(float, eps)                                                                                        \
  X(DType, dtype)                                                                                      \
  X(int32_t, T) X(int32_t, D)
struct RMSNormParams { MOE_RMS_NORM_PARAMS(MOE_DECLARE) };
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
#define MOE_DECODE_LAYER(X)                                                                            \
  X(const void*, input_norm)  /* [D] dtype */                                                          \
  X(const void*, post_norm)   /* [D] dtype */                                                          \
  X(const void*, qkv)         /* packed [(H + 2 Hkv) hd, D] */                                         \
  X(const void*, o)           /* packed [D, H hd] */                                                   \
  X(const void*, router)      /* packed [E, D]: an MoE layer; nullptr: a dense layer */                \
  X(const void*, w13)         /* packed gate|up: the routed experts (MoE) or the MLP as one expert */  \
  X(const void*, w2)          /* packed down, likewise */                                              \
  X(const void*, shared_w13)  /* packed shared gate|up (E = 1); nullable */                            \
  X(const void*, shared_w2)   /* packed shared down; nullable */                                       \
  X(int32_t, F)               /* expert width (MoE) or intermediate_size (dense) */                    \
  X(int32_t, S)               /* shared width; 0 = no shared experts */                                \
  /* Per weight: bits 0 = bf16/fp32 panels, 4 or 8 = quantized panels (as MoELayerParams). */          \
  X(QFormat, qkv_fmt) X(QFormat, o_fmt) X(QFormat, fmt13) X(QFormat, fmt2) X(QFormat, shared_fmt13)    \
  X(QFormat, shared_fmt2)
struct DecodeLayer { MOE_DECODE_LAYER(MOE_DECLARE) };
#define MOE_DECODE_STEP_PARAMS(X, SET_BY_LAUNCHER)                                                     \
  SET_BY_LAUNCHER(const DecodeLayer*, layers)  /* [L] */                                               \
  /* [B] this step's token per sequence, checked against [0, V) */                                     \
  X(const int64_t*, ids)                                                                               \
  X(const void*, embed)                        /* [V, D] dtype */                                      \
  X(const void*, rope_cos)                     /* [rope_len, hd] dtype: row p is position p */         \
  X(const void*, rope_sin)                     /* [rope_len, hd] dtype */                              \
  X(int64_t*, next_pos)                        /* [B] the token's position (< rope_len); incremented */ \
  X(void*, k_cache)                            /* [L, B, Hkv, Tkv_cap, hd] dtype; column pos is written */ \
  X(void*, v_cache)                                                                                    \
  /* bytes the caller's k_cache (and v_cache) each hold: must be */                                    \
  X(int64_t, cache_bytes)                                                                              \
  /* exactly L*B*Hkv*Tkv_cap*hd*sizeof(dtype), else the call refuses */                                \
  X(uint8_t*, valid)                           /* [B, valid_stride]; column pos is set */              \
  X(const int32_t*, k)                         /* [L] top-k per layer */                               \
  /* [L] (force_stride 0) or [L, B] (force_stride 1), -1 = none */                                     \
  X(const int32_t*, force_expert)                                                                      \
  /* 0: one id per layer; 1: one per sequence (its token's position) */                                \
  X(int64_t, force_stride)                                                                             \
  /* [L, E] (mask_stride 0) or [L, B, E] (mask_stride E), nonzero = masked; nullable */                \
  X(const uint8_t*, expert_mask)                                                                       \
  X(int64_t, mask_stride)                      /* 0: one row per layer; E: one row per sequence */     \
  X(MaskMode, mask_mode)                                                                               \
  X(bool, renormalize)                                                                                 \
  X(int32_t*, usage_counts)                    /* [L, E]; nullable */                                  \
  X(const void*, final_norm)                   /* [D] dtype */                                         \
  X(const void*, lm_head)                      /* packed [V, D]: bf16/fp32 panels or quantized */      \
  X(QFormat, lm_head_fmt)                      /* bits 0: panels in dtype; 4/8: quantized (either_panels.h) */ \
  X(float*, logits)                            /* [B, V] */                                            \
  X(void*, workspace)                          /* decode_step_workspace_bytes(p) bytes, 64-byte aligned */ \
  X(float, eps) X(float, scale)                                                                        \
  X(DType, dtype)                                                                                      \
  SET_BY_LAUNCHER(int32_t, L) X(int32_t, B) X(int32_t, D) X(int32_t, H) X(int32_t, Hkv)                \
  X(int32_t, hd) X(int32_t, E) X(int32_t, k_max) X(int32_t, V) X(int32_t, pos) X(int32_t, Tkv_cap)     \
  X(int32_t, valid_stride) X(int32_t, rope_len)
struct DecodeStepParams { MOE_DECODE_STEP_PARAMS(MOE_DECLARE, MOE_DECLARE) };
int64_t decode_step_workspace_bytes(const DecodeStepParams& p);  // reads sizes and layers[].F/S
void decode_step_cpu(const DecodeStepParams& p);

}  // namespace moe
