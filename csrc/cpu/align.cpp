// align (CPU twin of csrc/cuda/align.cu): group the T*k_max slots by expert for grouped GEMMs.
//
// Output: expert_counts[e] = #slots with id e (sentinels skipped); expert_offsets[e+1] =
//   expert_offsets[e] + round_up(counts[e], block_m); sorted_slots[offsets[e] + i] = the i-th
//   slot index (t*k_max + j, ascending) of expert e, -1 in the padding and beyond num_padded;
//   tile_experts[i] = expert of tile i, -1 past the last used tile; num_padded = offsets[E].
// Algorithm: counting sort in two passes over topk_ids (count, then stable scatter). Serial:
//   it is O(T*k_max + capacity) integer work (3072 slots for a 512-token prefill at k=6 take
//   a few us), and serial keeps the order trivially deterministic. workspace is unused on CPU.
// Traffic: 2 reads of topk_ids (4*T*k_max B) + writes of capacity*4 B.
// Reference: src/moe_engine/ops/align.py (align_ref); test: tests/test_ops.py (bitwise).
#include <algorithm>

#include "common.h"

namespace moe {

void align_cpu(const AlignParams& p) {
  if (p.T < 0 || p.k_max < 0 || p.E <= 0 || p.block_m <= 0)
    cpu::fail("align_cpu", "bad sizes T=" + std::to_string(p.T) + " k_max=" + std::to_string(p.k_max) +
                               " E=" + std::to_string(p.E) + " block_m=" + std::to_string(p.block_m));
  constexpr int32_t kStackE = 4096;  // the scatter's cursors live on the stack
  if (p.E > kStackE) cpu::fail("align_cpu", "E=" + std::to_string(p.E) + " > " + std::to_string(kStackE));
  if (int64_t(p.T) * p.k_max > 0) cpu::need("align_cpu", p.topk_ids, "topk_ids");
  cpu::need("align_cpu", p.expert_counts, "expert_counts");
  cpu::need("align_cpu", p.expert_offsets, "expert_offsets");
  cpu::need("align_cpu", p.sorted_slots, "sorted_slots");
  cpu::need("align_cpu", p.tile_experts, "tile_experts");
  cpu::need("align_cpu", p.num_padded, "num_padded");
  const int64_t R = int64_t(p.T) * p.k_max;
  const int64_t capacity = align_capacity(p.T, p.k_max, p.E, p.block_m);
  std::fill(p.expert_counts, p.expert_counts + p.E, 0);
  for (int64_t s = 0; s < R; ++s) {
    const int32_t e = p.topk_ids[s];
    if (e >= 0 && e < p.E) ++p.expert_counts[e];
  }
  p.expert_offsets[0] = 0;
  for (int32_t e = 0; e < p.E; ++e) {
    const int32_t padded = (p.expert_counts[e] + p.block_m - 1) / p.block_m * p.block_m;
    p.expert_offsets[e + 1] = p.expert_offsets[e] + padded;
  }
  const int32_t used = p.expert_offsets[p.E];
  std::fill(p.sorted_slots, p.sorted_slots + capacity, -1);
  // Stable scatter: each expert's write cursor starts at its segment offset.
  int32_t cursor[kStackE];
  std::copy(p.expert_offsets, p.expert_offsets + p.E, cursor);
  for (int64_t s = 0; s < R; ++s) {
    const int32_t e = p.topk_ids[s];
    if (e >= 0 && e < p.E) p.sorted_slots[cursor[e]++] = int32_t(s);
  }
  const int64_t tiles = capacity / p.block_m;
  for (int64_t i = 0; i < tiles; ++i) p.tile_experts[i] = -1;
  for (int32_t e = 0; e < p.E; ++e)
    for (int32_t o = p.expert_offsets[e]; o < p.expert_offsets[e + 1]; o += p.block_m)
      p.tile_experts[o / p.block_m] = e;
  *p.num_padded = used;
}

}  // namespace moe
