// align (CPU twin of csrc/cuda/align.cu): group the T*k_max slots by expert for grouped GEMMs.
//
// Output: expert_counts[e] = #slots with id e (sentinels skipped); expert_offsets[e+1] =
//   expert_offsets[e] + round_up(counts[e], block_m); sorted_slots[offsets[e] + i] = the i-th
//   slot index (t*k_max + j, ascending) of expert e, -1 in the padding and beyond num_padded;
//   tile_experts[i] = expert of tile i, -1 past the last used tile; num_padded = offsets[E].
// Algorithm: cpu::group_by_expert (common.h, shared with the expert FFN kernels): a counting
//   sort in two passes over topk_ids (count, then stable scatter), serial; then the -1 fill and
//   the tile owners, O(capacity). workspace is unused on CPU.
// Traffic: 2 reads of topk_ids (4*T*k_max B) + writes of capacity*4 B.
// Reference: src/moe_engine/ops/align.py (align_ref); test: tests/test_ops.py (bitwise).
#include <algorithm>

#include "common.h"

namespace moe {

void align_cpu(const AlignParams& p) {
  if (p.T < 0 || p.k_max < 0 || p.E <= 0 || p.block_m <= 0)
    cpu::fail("align_cpu", "bad sizes T=" + std::to_string(p.T) + " k_max=" + std::to_string(p.k_max) +
                               " E=" + std::to_string(p.E) + " block_m=" + std::to_string(p.block_m));
  // the router (route.cpp) takes at most 4096 experts; a larger E is a wrong argument, and
  // align would write E + 1 offsets into a buffer sized for the model's E
  constexpr int32_t kMaxExperts = 4096;
  if (p.E > kMaxExperts)
    cpu::fail("align_cpu", "E=" + std::to_string(p.E) + " > " + std::to_string(kMaxExperts) + " (the router's limit)");
  if (int64_t(p.T) * p.k_max > 0) cpu::need("align_cpu", p.topk_ids, "topk_ids");
  cpu::need("align_cpu", p.expert_counts, "expert_counts");
  cpu::need("align_cpu", p.expert_offsets, "expert_offsets");
  cpu::need("align_cpu", p.sorted_slots, "sorted_slots");
  cpu::need("align_cpu", p.tile_experts, "tile_experts");
  cpu::need("align_cpu", p.num_padded, "num_padded");
  const int64_t R = int64_t(p.T) * p.k_max;
  const int64_t capacity = align_capacity(p.T, p.k_max, p.E, p.block_m);
  std::fill(p.sorted_slots, p.sorted_slots + capacity, -1);
  cpu::group_by_expert(p.topk_ids, R, p.E, p.block_m, p.expert_counts, p.expert_offsets, p.sorted_slots);
  const int32_t used = p.expert_offsets[p.E];
  const int64_t tiles = capacity / p.block_m;
  for (int64_t i = 0; i < tiles; ++i) p.tile_experts[i] = -1;
  for (int32_t e = 0; e < p.E; ++e)
    for (int32_t o = p.expert_offsets[e]; o < p.expert_offsets[e + 1]; o += p.block_m)
      p.tile_experts[o / p.block_m] = e;
  *p.num_padded = used;
}

}  // namespace moe
