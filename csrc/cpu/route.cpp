// route (CPU twin of csrc/cuda/route.cu): router logits -> expert choice per token.
//
// Formula: probs[t] = softmax_fp32(logits[t]) over all E experts; NaN counts as -inf, +inf
//   experts share the mass equally (+inf -> FLT_MAX), a row of only -inf/NaN -> all-zero probs. Slot 0 takes force_expert when set; the other
//   slots j < k take the highest remaining probability (ties -> lower expert id), skipping masked
//   experts under MaskMode::reroute; under MaskMode::zero a masked expert is chosen as usual and
//   its weight set to 0. renormalize divides the kept weights by their sum when it is > 0.
//   Slots k <= j < k_max: id -1, weight 0. k is read from *p.k at run time. The mask and the
//   forced expert are one value for every row (stride 0) or one per row (mask_stride >= E,
//   force_stride 1): per-token and per-position interventions.
// Algorithm: one row per iteration, rows split across OpenMP threads; selection is k passes of
//   an ascending scan (k*E compares; E=64, k=6: 384), which gives the tie rule for free and never
//   repeats an id. Rows are independent, so any thread count gives the same bits.
// Traffic: T*E*(logit bytes [+ 4 probs tap]) + T*k_max*8; compute-trivial.
// Limits: E <= kMaxExperts (stack row buffer). Reference: src/moe_engine/ops/route.py (route_ref);
//   test: tests/test_ops.py; tolerances: tests/tolerances.py.
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>

#include "common.h"
#include "pool.h"

namespace moe {
namespace {

constexpr int32_t kMaxExperts = 4096;

void route_row(const RouteParams& p, int32_t k, int64_t t) {
  const int32_t forced = p.force_expert ? p.force_expert[t * p.force_stride] : -1;
  const int32_t E = p.E;
  float prob[kMaxExperts];
  bool taken[kMaxExperts];
  const char* row = static_cast<const char*>(p.router_logits) +
                    t * p.logits_stride * cpu::esize(p.logits_dtype);
  float m = -INFINITY;
  for (int32_t e = 0; e < E; ++e) {
    float v = cpu::load(row, p.logits_dtype, e);
    if (std::isnan(v)) v = -INFINITY;
    if (v == INFINITY) v = FLT_MAX;
    prob[e] = v;
    m = std::max(m, v);
  }
  if (m > -INFINITY) {
    float sum = 0.f;
    for (int32_t e = 0; e < E; ++e) sum += (prob[e] = std::exp(prob[e] - m));
    const float inv = 1.f / sum;
    for (int32_t e = 0; e < E; ++e) prob[e] *= inv;
  } else {
    std::fill(prob, prob + E, 0.f);
  }
  if (p.router_probs) std::copy(prob, prob + E, p.router_probs + t * E);

  const uint8_t* mask = p.expert_mask ? p.expert_mask + t * p.mask_stride : nullptr;
  auto masked = [&](int32_t e) { return mask && mask[e] != 0; };
  const bool reroute = p.mask_mode == MaskMode::reroute;
  std::fill(taken, taken + E, false);
  int32_t* ids = p.topk_ids + t * p.k_max;
  float* w = p.topk_weights + t * p.k_max;
  int32_t j = 0;
  if (k > 0 && forced >= 0) {
    ids[0] = forced;
    taken[forced] = true;
    j = 1;
  }
  for (; j < k; ++j) {
    int32_t best = -1;
    for (int32_t e = 0; e < E; ++e) {
      if (taken[e] || (reroute && masked(e))) continue;
      if (best < 0 || prob[e] > prob[best]) best = e;
    }
    ids[j] = best;
    if (best >= 0) taken[best] = true;
  }
  float kept = 0.f;
  for (j = 0; j < k; ++j) {
    const int32_t e = ids[j];
    // A forced expert keeps its slot even when masked under reroute (the caller asked for it).
    w[j] = (e < 0 || (masked(e) && !reroute)) ? 0.f : prob[e];
    kept += w[j];
  }
  if (p.renormalize && kept > 0.f)
    for (j = 0; j < k; ++j) w[j] /= kept;
  for (j = k; j < p.k_max; ++j) {
    ids[j] = -1;
    w[j] = 0.f;
  }
  if (p.usage_counts)
    for (j = 0; j < k; ++j)
      if (ids[j] >= 0) {
        std::atomic_ref<int32_t>(p.usage_counts[ids[j]]).fetch_add(1, std::memory_order_relaxed);
      }
}

}  // namespace

void route_cpu(const RouteParams& p) {
  if (p.T < 0 || p.E <= 0 || p.E > kMaxExperts || p.k_max < 0 || p.k_max > p.E)
    cpu::fail("route_cpu", "bad sizes T=" + std::to_string(p.T) + " E=" + std::to_string(p.E) +
                               " k_max=" + std::to_string(p.k_max));
  if (p.logits_stride < p.E) cpu::fail("route_cpu", "logits_stride " + std::to_string(p.logits_stride) + " < E");
  cpu::need_dtype("route_cpu", p.logits_dtype);
  if (p.mask_mode != MaskMode::reroute && p.mask_mode != MaskMode::zero)
    cpu::fail("route_cpu", "mask_mode " + std::to_string(int(p.mask_mode)) + " is not reroute or zero");
  cpu::need("route_cpu", p.k, "k");
  if (p.T > 0) {
    cpu::need("route_cpu", p.router_logits, "router_logits");
    if (p.k_max > 0) cpu::need("route_cpu", p.topk_ids, "topk_ids"), cpu::need("route_cpu", p.topk_weights, "topk_weights");
  }
  const int32_t k = *p.k;
  if (k < 0 || k > p.k_max)
    cpu::fail("route_cpu", "k=" + std::to_string(k) + " outside [0, k_max=" + std::to_string(p.k_max) + "]");
  if (p.mask_stride != 0 && p.mask_stride < p.E)
    cpu::fail("route_cpu", "mask_stride " + std::to_string(p.mask_stride) + " is neither 0 nor >= E=" + std::to_string(p.E));
  if (p.force_stride != 0 && p.force_stride != 1)
    cpu::fail("route_cpu", "force_stride " + std::to_string(p.force_stride) + " is neither 0 nor 1");
  const int64_t T = p.T;
  if (p.force_expert)  // every row checked before any is written
    for (int64_t t = 0; t < (p.force_stride ? T : std::min<int64_t>(T, 1)); ++t)
      if (p.force_expert[t] < -1 || p.force_expert[t] >= p.E)
        cpu::fail("route_cpu", "force_expert[" + std::to_string(t) + "]=" + std::to_string(p.force_expert[t]) +
                                   " outside [-1, E)");
  cpu::parallel_ranges(T, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) route_row(p, k, t);
  }, T * p.E >= cpu::kParallelMinWork);
}

}  // namespace moe
