// combine (CPU twin of csrc/cuda/combine.cu): weighted sum over the k slots + shared + residual.
//
// Formula, per element, accumulated in fp32 in this fixed order:
//   acc = sum_{j ascending, id valid} topk_weights[t,j] * expert_out[t,j,:]   -> routed_out tap
//   acc += shared_out[t,:];  acc += residual[t,:];  out[t,:] = cast(acc)
// Sentinel slots (id < 0) are skipped, so their expert_out may hold anything.
// Algorithm: rows split across threads; inner loop over D is vectorised by the compiler (the
//   order over j is fixed per element, so results do not depend on the thread count).
//   out may alias residual (each element is read before it is written).
// Traffic: T*D*(k_max + 3 or 4) * bytes(dtype) + T*k_max*8.
// Reference: src/moe_engine/ops/combine.py (combine_ref); test: tests/test_ops.py.
#include "common.h"
#include "pool.h"

namespace moe {
namespace {

template <typename X>
void combine_impl(const CombineParams& p) {
  const int64_t T = p.T, K = p.k_max, D = p.D;
  const X* eo = static_cast<const X*>(p.expert_out);
  const X* sh = static_cast<const X*>(p.shared_out);
  const X* res = static_cast<const X*>(p.residual);
  X* out = static_cast<X*>(p.out);
  X* routed = static_cast<X*>(p.routed_out);
  constexpr int64_t kChunk = 256;  // fp32 accumulator strip that stays in registers / L1
  const int64_t chunks = (D + kChunk - 1) / kChunk;
  cpu::parallel_for(T * chunks, [&](int64_t item) {
    const int64_t t = item / chunks, d0 = item % chunks * kChunk, n = std::min(kChunk, D - d0);
    float acc[kChunk];
    for (int64_t d = 0; d < n; ++d) acc[d] = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      const int32_t id = p.topk_ids[t * K + j];
      if (id < 0) continue;
      const float w = p.topk_weights[t * K + j];
      const X* row = eo + (t * K + j) * D + d0;
      for (int64_t d = 0; d < n; ++d) acc[d] += w * cpu::load(row, d);
    }
    if (routed)
      for (int64_t d = 0; d < n; ++d) cpu::store(routed, t * D + d0 + d, acc[d]);
    if (sh)
      for (int64_t d = 0; d < n; ++d) acc[d] += cpu::load(sh, t * D + d0 + d);
    if (res)
      for (int64_t d = 0; d < n; ++d) acc[d] += cpu::load(res, t * D + d0 + d);
    for (int64_t d = 0; d < n; ++d) cpu::store(out, t * D + d0 + d, acc[d]);
  }, T * D * (K + 2) >= cpu::kParallelMinWork);
}

}  // namespace

void combine_cpu(const CombineParams& p) {
  if (p.T < 0 || p.k_max < 0 || p.D <= 0)
    cpu::fail("combine_cpu", "bad sizes T=" + std::to_string(p.T) + " k_max=" + std::to_string(p.k_max) +
                                 " D=" + std::to_string(p.D));
  cpu::need_dtype("combine_cpu", p.dtype);
  if (p.T > 0) {
    cpu::need("combine_cpu", p.out, "out");
    if (p.k_max > 0) {
      cpu::need("combine_cpu", p.expert_out, "expert_out");
      cpu::need("combine_cpu", p.topk_weights, "topk_weights");
      cpu::need("combine_cpu", p.topk_ids, "topk_ids");
    }
  }
  if (p.dtype == DType::f32) combine_impl<float>(p);
  else combine_impl<uint16_t>(p);
}

}  // namespace moe
