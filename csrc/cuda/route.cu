// route: router logits -> expert choice per token, fused in one kernel (one warp per row).
//
// Formula (T tokens, E experts, k = *p.k active slots, k_max buffer width):
//   x[e]    = logits[t, e] (bf16 or fp32, row stride logits_stride); NaN -> -inf, +inf -> FLT_MAX
//   probs   = softmax_fp32(x) over all E (a row whose max is -inf gets all-zero probs; +inf
//             experts share the whole mass equally, since exp(FLT_MAX - FLT_MAX) = 1)
//   slot 0  = force_expert when set (>= 0) and k >= 1, with its own probability
//   slots   = the remaining experts by probability descending, ties -> lower expert id;
//             mask_mode reroute: masked experts are never candidates (next-best takes the slot);
//             mask_mode zero: chosen as usual, weight 0 (id kept)
//   weights = probs of the chosen ids (raw, over ALL E), then / sum(kept) when renormalize and
//             the sum > 0; slots j >= k: id -1, weight 0; more slots than candidates: id -1
//   usage_counts[id] += 1 per valid chosen slot; router_probs[t] = probs when non-null
//   mask and forced expert: row t reads expert_mask + t*mask_stride and force_expert[t*force_stride]
//   (stride 0: one value for every token; per-token / per-position interventions pass rows)
// Algorithm: lane l of the row's warp owns experts l, l+32, ... (EPL = ceil(E/32) registers).
//   Max and sum are butterfly reductions. Selection is k rounds of a butterfly arg-max over a
//   64-bit key (prob bits << 32 | ~expert): the float bits of a probability >= 0 order like the
//   value, and ~e makes the lower id win a tie, so every lane agrees on one winner and an id is
//   never chosen twice (its owner marks it taken). The forced expert enters round 0 with bit 63
//   set. Kept weights are summed in slot order (the CPU twin's order).
// Traffic: T*E*sizeof(logit) read + T*k_max*8 written (+ T*E*4 for router_probs, + k*T atomics).
//   E=64, bf16, k=6, T=1: ~0.2 KB; latency-bound (~5*(2+k) shuffles per row).
// Launch: grid ceil(T/4), block 128 (4 warps = 4 rows), no shared memory. E <= 32/64/128/256
//   pick EPL = 1/2/4/8 (E = 64 is the 2-register fast path).
// Limits: 1 <= E <= 256, 0 <= k_max <= E, logits_stride >= E, mask_stride 0 or >= E,
//   force_stride 0 or 1. Device-side values are clamped:
//   k to [0, k_max], force_expert outside [0, E) means none.
// Tie rule: equal fp32 probabilities -> lower expert id (equal logits give equal probabilities).
// Reference: src/moe_engine/ops/route.py (route_ref); CPU twin: csrc/cpu/route.cpp; tests:
//   tests/emu/cpp/route_test.cu (C++ double reference, via tests/emu/test_kernels.py) and
//   tests/test_ops.py; tolerances: tests/tolerances.py.
#include "common.cuh"

#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../ops.h"

namespace moe {
namespace {

constexpr int kRouteRowsPerBlock = 4;
constexpr int kRouteMaxExperts = 256;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

template <int EPL>
__global__ void __launch_bounds__(kRouteRowsPerBlock * 32) route_kernel(const RouteParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t t = (int64_t)blockIdx.x * kRouteRowsPerBlock + (threadIdx.x >> 5);
  if (t >= p.T) return;  // whole warps exit together
  const int E = p.E;
  const int k = min(max(*p.k, 0), p.k_max);
  int forced = p.force_expert ? p.force_expert[t * p.force_stride] : -1;
  const uint8_t* mask = p.expert_mask ? p.expert_mask + t * p.mask_stride : nullptr;
  if (forced < 0 || forced >= E) forced = -1;
  const bool reroute = p.mask_mode == MaskMode::reroute;

  // ---- load, sanitise, mark experts that can never be chosen
  float prob[EPL];
  uint32_t blocked = 0;  // bit i: expert i*32+lane is absent or masked under reroute
  const float* row_f = static_cast<const float*>(p.router_logits) + t * p.logits_stride;
  const __nv_bfloat16* row_h = static_cast<const __nv_bfloat16*>(p.router_logits) + t * p.logits_stride;
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = i * 32 + lane;
    float v = -INFINITY;
    if (e < E) {
      v = p.logits_dtype == DType::bf16 ? __bfloat162float(row_h[e]) : row_f[e];
      if (v != v) v = -INFINITY;
      if (v == INFINITY) v = FLT_MAX;
      if (reroute && mask && mask[e]) blocked |= 1u << i;
    } else {
      blocked |= 1u << i;
    }
    prob[i] = v;
    m = fmaxf(m, v);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));

  // ---- softmax in fp32 over all E
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    prob[i] = m == -INFINITY ? 0.f : expf(prob[i] - m);
    sum += prob[i];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
  if (sum > 0.f) {
#pragma unroll
    for (int i = 0; i < EPL; ++i) prob[i] = prob[i] / sum;
  }
  if (p.router_probs) {
#pragma unroll
    for (int i = 0; i < EPL; ++i)
      if (i * 32 + lane < E) p.router_probs[t * E + i * 32 + lane] = prob[i];
  }

  // ---- k rounds of warp arg-max; slot j lives in register j/32 of lane j%32
  int slot_id[EPL];
  float slot_w[EPL];
#pragma unroll
  for (int s = 0; s < EPL; ++s) slot_id[s] = -1, slot_w[s] = 0.f;
  uint32_t taken = 0;
  float kept = 0.f;
  for (int j = 0; j < k; ++j) {
    const bool force_now = j == 0 && forced >= 0;
    unsigned long long best = 0;  // 0 = no candidate
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = i * 32 + lane;
      const bool cand = force_now ? e == forced : !((blocked | taken) >> i & 1u);
      const unsigned long long key = (unsigned long long)__float_as_uint(prob[i]) << 32 | (uint32_t)~e |
                                     (force_now ? 1ull << 63 : 0ull);
      if (cand && key > best) best = key;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const unsigned long long other = __shfl_xor_sync(kFullMask, best, o);
      best = other > best ? other : best;
    }
    if (best == 0) break;  // fewer candidates than slots: the rest stay -1
    const int e = (int)~(uint32_t)best;
    if ((e & 31) == lane) taken |= 1u << (e >> 5);
    float w = __uint_as_float((uint32_t)(best >> 32) & 0x7FFFFFFFu);
    if (!reroute && mask && mask[e]) w = 0.f;
    kept += w;
#pragma unroll
    for (int s = 0; s < EPL; ++s)
      if (s * 32 + lane == j) slot_id[s] = e, slot_w[s] = w;
  }

  // ---- renormalise, write slots, count usage
  const bool renorm = p.renormalize && kept > 0.f;
#pragma unroll
  for (int s = 0; s < EPL; ++s) {
    const int j = s * 32 + lane;
    if (j >= p.k_max) break;
    p.topk_ids[t * p.k_max + j] = slot_id[s];
    p.topk_weights[t * p.k_max + j] = renorm ? slot_w[s] / kept : slot_w[s];
    if (p.usage_counts && slot_id[s] >= 0) atomicAdd(&p.usage_counts[slot_id[s]], 1);
  }
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("route_cuda: " + what); }

}  // namespace

void route_cuda(const RouteParams& p, void* stream, int device) {
  const DeviceGuard device_guard(device);
  if (p.T < 0) bad("T = " + std::to_string(p.T) + " is negative");
  if (p.E < 1 || p.E > kRouteMaxExperts)
    bad("E = " + std::to_string(p.E) + " is outside 1.." + std::to_string(kRouteMaxExperts));
  if (p.k_max < 0 || p.k_max > p.E)
    bad("k_max = " + std::to_string(p.k_max) + " is outside 0..E = " + std::to_string(p.E));
  if (p.logits_stride < p.E)
    bad("logits_stride = " + std::to_string(p.logits_stride) + " is smaller than E = " + std::to_string(p.E));
  if (p.logits_dtype != DType::f32 && p.logits_dtype != DType::bf16)
    bad("logits_dtype = " + std::to_string((int)p.logits_dtype) + " is neither f32 nor bf16");
  if (p.mask_mode != MaskMode::reroute && p.mask_mode != MaskMode::zero)
    bad("mask_mode = " + std::to_string((int)p.mask_mode) + " is neither reroute nor zero");
  if (p.mask_stride != 0 && p.mask_stride < p.E)
    bad("mask_stride = " + std::to_string(p.mask_stride) + " is neither 0 nor >= E = " + std::to_string(p.E));
  if (p.force_stride != 0 && p.force_stride != 1)
    bad("force_stride = " + std::to_string(p.force_stride) + " is neither 0 nor 1");
  if (p.T == 0) return;
  if (!p.router_logits || !p.k || !p.topk_ids || !p.topk_weights)
    bad("router_logits, k, topk_ids and topk_weights must be non-null");
  const int64_t blocks = (p.T + kRouteRowsPerBlock - 1) / kRouteRowsPerBlock;
  auto* kernel = p.E <= 32 ? &route_kernel<1> : p.E <= 64 ? &route_kernel<2> : p.E <= 128 ? &route_kernel<4>
                                                                                           : &route_kernel<8>;
  MOE_LAUNCH(kernel, dim3((unsigned)blocks), dim3(kRouteRowsPerBlock * 32), 0, static_cast<cudaStream_t>(stream),
             p);
  MOE_CUDA_CHECK(cudaGetLastError());  // launch errors only; never synchronises
}

}  // namespace moe
