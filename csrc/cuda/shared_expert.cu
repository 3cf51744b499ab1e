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
//     16B), and a dense launch can run on a second stream beside the routed path, which is where
//     the peers' 15-34 % came from. What the fused variant would save is two launches.
//     (Not done here yet: the layer runs it on the caller's stream after the routed experts.)
//   So it reuses the same kernels with no new device code: T <= 16 (and x contiguous) runs
//   moe_decode in dense mode (topk_ids null: one expert, k_max 1); larger T runs expert_gemm in
//   dense mode (no slot list: row i = token i, expert 0, capacity T).
// Memory traffic: 2 x 3 S D bytes of weights (34.6 MB in 16B; H100 floor: bench/README.md) plus
//   2 T (2 D + 2 S) bytes of activations.
// Launch / limits: those of moe_decode.cu (T <= 16) and expert_gemm.cu (T > 16);
//   D and S multiples of 8, pointers 16-byte aligned.
// Test: tests/emu/cpp/shared_expert_test.cu via tests/emu/test_expert_gemm.py.
#include "common.cuh"
#include "ops.h"

#include <stdexcept>
#include <string>

namespace moe {

void shared_expert_cuda(const SharedExpertParams& p, void* stream, int device) {
  const DeviceGuard device_guard(device);
  if (p.T < 0) throw std::invalid_argument("shared_expert: T must be >= 0; got " + std::to_string(p.T));
  if (p.T <= 16 && p.x_stride == p.D) {
    MoeDecodeParams d{};
    d.x = p.x;
    d.topk_ids = nullptr;  // dense: every slot is expert 0
    d.experts_gate_up = p.gate_up;
    d.experts_down = p.down;
    d.act = p.act;
    d.expert_out = p.shared_out;
    d.T = p.T, d.k_max = 1, d.E = 1, d.D = p.D, d.F = p.S;
    moe_decode_cuda(d, stream);
    return;
  }
  ExpertGemmParams g{};
  g.sorted_slots = nullptr, g.tile_experts = nullptr, g.num_padded = nullptr;  // dense: row i = token i
  g.T = p.T, g.k_max = 1, g.E = 1, g.D = p.D, g.F = p.S, g.capacity = p.T;
  g.block_m = expert_gemm_block_m(p.T, 1, 1);
  g.a = p.x, g.a_stride = p.x_stride, g.w = p.gate_up, g.c = p.act, g.up = true;
  expert_gemm_cuda(g, stream);
  g.a = p.act, g.a_stride = p.S, g.w = p.down, g.c = p.shared_out, g.up = false;
  expert_gemm_cuda(g, stream);
}

}  // namespace moe
