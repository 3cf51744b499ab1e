// align_cuda (csrc/cuda/align.cu) against a C++ counting sort, bit for bit, on the emulator (or
// a GPU: nvcc -std=c++20 -arch=sm_80 -I DIR align_test.cu ../../../csrc/cuda/align.cu;
// DIR holds the generated test_tolerances.h: python tests/tolerances.py > DIR/test_tolerances.h).
// Every output is compared over its whole length (sorted_slots over the full capacity,
// tile_experts over capacity/block_m), canaries past every buffer (workspace included, sized by
// align_workspace_size) must survive, and a second run must give the same bits.
// Sweep: T in {0,1,2,7,16,17,129,257} x k in {0,1,2,6,8} x E in {8,64} with rotating block_m
// in {1,16,64,128} and id distributions (uniform, with sentinels -1/E/E+5/INT_MIN, all to one
// expert, only even experts), plus both sides of the single-block limit (1024 slots), multi-block
// sizes up to 12k slots, E in {1, 256}, and launcher preconditions.
#include <algorithm>
#include <climits>

#include "../../../csrc/ops.h"
#include "kernel_test_util.h"

using namespace moe;

struct Case {
  int T, k_max, E, block_m, dist;
  uint64_t seed;
};

static void run_case(const Case& c) {
  char name[160];
  std::snprintf(name, sizeof name, "T=%d k_max=%d E=%d block_m=%d dist=%d", c.T, c.k_max, c.E, c.block_m, c.dist);
  g_case = name;
  Rng rng(c.seed);
  const int64_t R = (int64_t)c.T * c.k_max;
  const int64_t cap = align_capacity(c.T, c.k_max, c.E, c.block_m);
  const int hot = rng.uniform(c.E);
  std::vector<int32_t> ids(R);
  for (auto& id : ids) {
    switch (c.dist) {
      case 0: id = rng.uniform(c.E); break;
      case 1: {
        const int r = rng.uniform(10);
        id = r == 0 ? -1 : r == 1 ? c.E : r == 2 ? c.E + 5 : r == 3 ? INT_MIN : rng.uniform(c.E);
        break;
      }
      case 2: id = hot; break;
      default: id = 2 * rng.uniform((c.E + 1) / 2); break;
    }
  }
  // reference: counting sort
  std::vector<int32_t> counts(c.E, 0), offs(c.E + 1, 0), sorted(cap, -1), tiles(cap / c.block_m, -1);
  for (int32_t id : ids)
    if (id >= 0 && id < c.E) ++counts[id];
  for (int e = 0; e < c.E; ++e) offs[e + 1] = offs[e] + (counts[e] + c.block_m - 1) / c.block_m * c.block_m;
  std::vector<int32_t> cursor(offs.begin(), offs.end() - 1);
  for (int64_t s = 0; s < R; ++s)
    if (ids[s] >= 0 && ids[s] < c.E) sorted[cursor[ids[s]]++] = (int32_t)s;
  for (int e = 0; e < c.E; ++e)
    for (int b = offs[e] / c.block_m; b < offs[e + 1] / c.block_m; ++b) tiles[b] = e;

  const int canary = 3;
  const int64_t ws_n = align_workspace_size(c.T, c.k_max, c.E);
  Buf<int32_t> d_ids(R);
  d_ids.h = ids;
  d_ids.up();
  Buf<int32_t> d_counts(c.E + canary, -7), d_offs(c.E + 1 + canary, -7), d_sorted(cap + canary, -7),
      d_tiles(cap / c.block_m + canary, -7), d_np(1 + canary, -7), d_ws(ws_n + canary, -7);
  AlignParams p{};
  p.topk_ids = d_ids.d, p.T = c.T, p.k_max = c.k_max, p.E = c.E, p.block_m = c.block_m;
  p.expert_counts = d_counts.d, p.expert_offsets = d_offs.d, p.sorted_slots = d_sorted.d;
  p.tile_experts = d_tiles.d, p.num_padded = d_np.d, p.workspace = d_ws.d;
  for (int run = 0; run < 2; ++run) {
    align_cuda(p, nullptr);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    d_counts.down(), d_offs.down(), d_sorted.down(), d_tiles.down(), d_np.down(), d_ws.down();
    for (int e = 0; e < c.E; ++e)
      EXPECT(d_counts.h[e] == counts[e], "run %d counts[%d] = %d, want %d", run, e, d_counts.h[e], counts[e]);
    for (int e = 0; e <= c.E; ++e)
      EXPECT(d_offs.h[e] == offs[e], "run %d offsets[%d] = %d, want %d", run, e, d_offs.h[e], offs[e]);
    EXPECT(d_np.h[0] == offs[c.E], "run %d num_padded = %d, want %d", run, d_np.h[0], offs[c.E]);
    for (int64_t i = 0; i < cap; ++i)
      EXPECT(d_sorted.h[i] == sorted[i], "run %d sorted_slots[%lld] = %d, want %d", run, (long long)i,
             d_sorted.h[i], sorted[i]);
    for (int64_t b = 0; b < cap / c.block_m; ++b)
      EXPECT(d_tiles.h[b] == tiles[b], "run %d tile_experts[%lld] = %d, want %d", run, (long long)b, d_tiles.h[b],
             tiles[b]);
    for (int i = 0; i < canary; ++i) {
      EXPECT(d_counts.h[c.E + i] == -7 && d_offs.h[c.E + 1 + i] == -7 && d_sorted.h[cap + i] == -7 &&
                 d_tiles.h[cap / c.block_m + i] == -7 && d_np.h[1 + i] == -7 && d_ws.h[ws_n + i] == -7,
             "write past the end of an output (canary %d)", i);
    }
  }
}

static void launcher_checks() {
  g_case = "launcher preconditions";
  Buf<int32_t> ids(2048, 0), out(4096);
  AlignParams p{};
  p.topk_ids = ids.d, p.T = 2, p.k_max = 2, p.E = 8, p.block_m = 16;
  p.expert_counts = p.expert_offsets = p.sorted_slots = p.tile_experts = p.num_padded = out.d;
  auto with = [&](auto change) {
    AlignParams q = p;
    change(q);
    return [q] { align_cuda(q, nullptr); };
  };
  expect_invalid("E=0", "E = 0", with([](AlignParams& q) { q.E = 0; }));
  expect_invalid("E=300", "E = 300", with([](AlignParams& q) { q.E = 300; }));
  expect_invalid("block_m=0", "block_m = 0", with([](AlignParams& q) { q.block_m = 0; }));
  expect_invalid("T<0", "T = -3", with([](AlignParams& q) { q.T = -3; }));
  expect_invalid("null output", "non-null", with([](AlignParams& q) { q.sorted_slots = nullptr; }));
  expect_invalid("no workspace", "workspace", with([](AlignParams& q) { q.T = 1025, q.k_max = 1; }));
}

int main(int argc, char** argv) {
  // "quick": T <= 17; "tiny": T <= 2 plus one multi-block case (the threads backend)
  const std::string mode = argc > 1 ? argv[1] : "full";
  const int max_T = mode == "tiny" ? 2 : mode == "quick" ? 17 : 1 << 30;
  std::vector<Case> cases;
  uint64_t seed = 100;
  int v = 0;
  const int bms[] = {1, 16, 64, 128};
  for (int E : {8, 64})
    for (int T : {0, 1, 2, 7, 16, 17, 129, 257}) {
      if (T > max_T) continue;
      for (int k : {0, 1, 2, 6, 8}) {
        cases.push_back(Case{T, k, E, bms[v % 4], (v / 4) % 4, seed++});
        ++v;
      }
    }
  for (int R : {1023, 1024, 1025}) cases.push_back(Case{R, 1, 64, 16, R % 4, seed++});
  if (mode == "tiny") cases.erase(cases.end() - 3, cases.end() - 1);  // keep 1025: two chunks
  if (mode != "tiny") {
  cases.push_back(Case{171, 6, 64, 16, 0, seed++});   // 1026 slots: multi-block, 2 chunks
  cases.push_back(Case{683, 6, 64, 64, 1, seed++});   // 4098 slots: 5 chunks, sentinels
  cases.push_back(Case{2048, 6, 64, 128, 0, seed++}); // 12288 slots: 12 chunks
  cases.push_back(Case{1500, 2, 8, 16, 2, seed++});   // all to one expert, multi-block
  cases.push_back(Case{1200, 1, 256, 32, 3, seed++}); // E = 256, empty experts, multi-block
  cases.push_back(Case{100, 8, 256, 16, 0, seed++});  // E = 256 single block
  }
  cases.push_back(Case{9, 3, 1, 4, 1, seed++});       // E = 1
  for (const Case& c : cases) run_case(c);
  launcher_checks();
  return finish("align_test", (int)cases.size());
}
