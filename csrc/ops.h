// The whole C++ interface of moe_engine on one screen: one Params struct per op.
// (Branch `gemm`: only the grouped-GEMM / decode / shared-expert structs; the lead reconciles this
// file with the RouteParams / AlignParams / CombineParams version.)
//
// Shape legend: T tokens, D hidden, E routed experts, k_max width of the top-k outputs,
// F expert width, S shared width, R = T*k_max slots, block_m GEMM tile height,
// capacity = padded slot capacity = align_capacity(T, k_max, E, block_m).
//
// Pointers are device pointers for the cuda backend and host pointers for emu. Launchers never
// allocate and never synchronise; bad arguments throw std::invalid_argument naming the value.
#pragma once
#include <cstdint>

namespace moe {

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

// ---- launchers (stream is a cudaStream_t; ignored by the emulator) ----------------------
void expert_gemm_cuda(const ExpertGemmParams& p, void* stream);
void moe_decode_cuda(const MoeDecodeParams& p, void* stream);
void shared_expert_cuda(const SharedExpertParams& p, void* stream);
// The tile height expert_gemm uses for this batch; align must pad each expert to it.
int expert_gemm_block_m(int T, int k_max, int E);

}  // namespace moe
