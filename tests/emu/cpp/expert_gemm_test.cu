// expert_gemm (csrc/cuda/expert_gemm.cu) against a double-precision reference.
//
//   expert_gemm_test T k_max E D F block_m scenario seed
//   expert_gemm_test errors          (launcher precondition messages)
//
// One case: random bf16 x [T, D] (scale 1), experts_gate_up [E, 2F, D] and experts_down [E, D, F]
// (scale 1/sqrt(K), see weight_scale), topk_ids from the scenario (moe_test_util.h), aligned by the align reference.
// Checks, each with the tolerances of moe_test_util.h:
//   up     act rows of real slots vs silu(h.Wg)*(h.Wu) in double; padding rows and rows past
//          num_padded keep their canary (never written)
//   down   fed the kernel's act with every padding row set to NaN (so a padding row that is read
//          instead of zero-filled poisons nothing it should not, and one that is written shows):
//          expert_out rows of real slots vs act.Wd in double; sentinel slots keep their canary
//   layer  expert_out vs the whole expert MLP in double (act unrounded)
// Exit 0 when all pass. Builds with g++ -DMOE_EMU (emulator) or, unchanged, for a real GPU:
//   nvcc -x cu -std=c++20 -arch=sm_90a -Icsrc -I DIR tests/emu/cpp/<this file> (test_nvcc_build.py;
//   DIR holds the generated test_tolerances.h: python tests/tolerances.py > DIR/test_tolerances.h).
#include "cuda/common.cuh"
#include "cuda/expert_gemm.cu"
#include "moe_test_util.h"

#include <stdexcept>

using namespace moe_test;

static int errors_case() {
  int failures = 0;
  auto expect_throw = [&](const char* what, moe::ExpertGemmParams p) {
    failures += expect_invalid(what, [&] { moe::expert_gemm_cuda(p, nullptr); });
  };
  alignas(16) static uint8_t buf[64];
  moe::ExpertGemmParams p{};
  p.a = buf, p.a_stride = 64, p.w = buf, p.c = buf;
  p.T = 4, p.k_max = 2, p.E = 4, p.D = 64, p.F = 64, p.capacity = 64, p.block_m = 16, p.up = true;
  auto q = p; q.D = 100; expect_throw("D not a multiple of 8", q);
  q = p; q.block_m = 32; expect_throw("block_m 32", q);
  q = p; q.a_stride = 60; expect_throw("a_stride < D", q);
  q = p; q.a = buf + 8; expect_throw("misaligned a", q);
  static int32_t ints[4];
  q = p; q.sorted_slots = ints; expect_throw("slot list half given", q);
  return failures ? 1 : 0;
}

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "errors") return errors_case();
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s T k_max E D F block_m scenario seed | errors\n", argv[0]);
    return 2;
  }
  const int T = std::atoi(argv[1]), k_max = std::atoi(argv[2]), E = std::atoi(argv[3]);
  const int D = std::atoi(argv[4]), F = std::atoi(argv[5]), block_m = std::atoi(argv[6]);
  const std::string scenario = argv[7];
  Rng rng(std::strtoull(argv[8], nullptr, 10));
  const int R = T * k_max;

  const auto x = randn(static_cast<size_t>(T) * D, 1.0, rng);
  const auto gate_up = randn(static_cast<size_t>(E) * 2 * F * D, weight_scale(D), rng);
  const auto down = randn(static_cast<size_t>(E) * D * F, weight_scale(F), rng);
  const auto ids = make_topk_ids(T, k_max, E, scenario, rng);
  const Aligned al = align_ref(ids, E, block_m);
  std::printf("case T=%d k_max=%d E=%d D=%d F=%d block_m=%d %s: capacity=%d num_padded=%d (suggested block_m %d)\n",
              T, k_max, E, D, F, block_m, scenario.c_str(), al.capacity, al.num_padded,
              moe::expert_gemm_block_m(T, k_max, E));

  bf16* d_x = to_device(x);
  bf16* d_gate_up = to_device(gate_up);
  bf16* d_down = to_device(down);
  int32_t* d_slots = to_device(al.sorted_slots);
  int32_t* d_tiles = to_device(al.tile_experts);
  int32_t* d_num_padded = to_device(std::vector<int32_t>{al.num_padded});
  bf16* d_act = canary_rows(al.capacity, F);
  bf16* d_out = canary_rows(R, D);

  moe::ExpertGemmParams p{};
  p.sorted_slots = d_slots, p.tile_experts = d_tiles, p.num_padded = d_num_padded;
  p.T = T, p.k_max = k_max, p.E = E, p.D = D, p.F = F, p.capacity = al.capacity, p.block_m = block_m;

  // up
  p.a = d_x, p.a_stride = D, p.w = d_gate_up, p.c = d_act, p.up = true;
  moe::expert_gemm_cuda(p, nullptr);
  auto act = to_host(d_act, static_cast<size_t>(al.capacity) * F);
  Check up{"up"};
  std::vector<std::vector<double>> act_exact(R);  // unrounded act of each slot, for the layer check
  for (int i = 0; i < al.capacity; ++i) {
    const int slot = i < al.num_padded ? al.sorted_slots[i] : -1;
    if (slot < 0) {
      if (!row_is(act, i, F, kCanary)) up.fail("padding row " + std::to_string(i) + " was written");
      continue;
    }
    const int e = al.tile_experts[i / block_m];
    act_exact[slot] = swiglu_ref(&x[static_cast<size_t>(slot / k_max) * D], &gate_up[static_cast<size_t>(e) * 2 * F * D], D, F);
    for (int c = 0; c < F; ++c)
      up.add(f(act[static_cast<size_t>(i) * F + c]), act_exact[slot][c],
             "row " + std::to_string(i) + " (slot " + std::to_string(slot) + ") col " + std::to_string(c));
  }

  // down, fed the kernel's act with NaN in every row that is not a real slot
  for (int i = 0; i < al.capacity; ++i)
    if (i >= al.num_padded || al.sorted_slots[i] < 0)
      for (int c = 0; c < F; ++c) act[static_cast<size_t>(i) * F + c] = from_bits(kNaN);
  CHECK_CUDA(cudaMemcpy(d_act, act.data(), act.size() * sizeof(bf16), cudaMemcpyHostToDevice));
  p.a = d_act, p.a_stride = F, p.w = d_down, p.c = d_out, p.up = false;
  moe::expert_gemm_cuda(p, nullptr);
  const auto out = to_host(d_out, static_cast<size_t>(R) * D);
  Check dn{"down"}, layer{"layer"};
  std::vector<int> sorted_pos(R, -1);
  for (int i = 0; i < al.num_padded; ++i)
    if (al.sorted_slots[i] >= 0) sorted_pos[al.sorted_slots[i]] = i;
  for (int j = 0; j < R; ++j) {
    const bool real = ids[j] >= 0 && ids[j] < E;
    if (!real) {
      if (!row_is(out, j, D, kCanary)) dn.fail("sentinel slot " + std::to_string(j) + " was written");
      continue;
    }
    const int i = sorted_pos[j];
    if (i < 0) { dn.fail("slot " + std::to_string(j) + " missing from the slot list"); continue; }
    std::vector<double> a(F);
    for (int c = 0; c < F; ++c) a[c] = f(act[static_cast<size_t>(i) * F + c]);
    const bf16* wd = &down[static_cast<size_t>(ids[j]) * D * F];
    const auto ref = down_ref(a, wd, D, F), ref_layer = down_ref(act_exact[j], wd, D, F);
    for (int d = 0; d < D; ++d) {
      const std::string where = "slot " + std::to_string(j) + " col " + std::to_string(d);
      dn.add(f(out[static_cast<size_t>(j) * D + d]), ref[d], where);
      layer.add(f(out[static_cast<size_t>(j) * D + d]), ref_layer[d], where);
    }
  }
  const bool ok = up.report() & dn.report() & layer.report();
  for (void* ptr : {(void*)d_x, (void*)d_gate_up, (void*)d_down, (void*)d_slots, (void*)d_tiles,
                    (void*)d_num_padded, (void*)d_act, (void*)d_out})
    CHECK_CUDA(cudaFree(ptr));
  return ok ? 0 : 1;
}
