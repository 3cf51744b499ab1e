// expert_gemm_q (csrc/cuda/expert_gemm_q.cu) against a double-precision dequantise-then-matmul
// reference computed from the GPTQ tensors (quant_test_util.h), weights repacked on the device.
// The reference rounds the dequantised weights to bf16, as the kernel does before the tensor
// cores (its documented numerics); tests/test_quant_cuda.py compares with the exact weights.
//
//   expert_gemm_q_test T k_max E D F block_m bits group sym fp16|bf16 scenario seed
//       scenario: moe_test_util.h's, or "dense" (slot lists null: row i is slot i, expert 0)
//   expert_gemm_q_test errors     (launcher precondition messages)
//
// Checks (tolerances in moe_test_util.h), as expert_gemm_test.cu:
//   up     act rows of real slots vs silu(h.Wg)*(h.Wu) in double; padding rows and rows past
//          num_padded keep their canary (never written)
//   down   fed the kernel's act with NaN in every padding row (read instead of zero-filled
//          poisons the result): expert_out rows of real slots vs act.Wd in double; sentinel
//          slots exactly zero (topk_ids given to the down launch)
//   layer  expert_out vs the whole expert MLP in double (act unrounded)
// Exit 0 when all pass. Builds with g++ -DMOE_EMU or, unchanged, with nvcc for a real GPU.
#include "cuda/common.cuh"
#include "cuda/expert_gemm_q.cu"
#include "cuda/moe_decode_q.cu"
#include "moe_test_util.h"
#include "quant_test_util.h"

#include <stdexcept>

using namespace moe_test;

static int errors_case() {
  int failures = 0;
  auto expect_throw = [&](const char* what, moe::ExpertGemmQParams p) {
    failures += expect_invalid(what, [&] { moe::expert_gemm_q_cuda(p, nullptr); });
  };
  alignas(16) static uint8_t buf[64];
  moe::ExpertGemmQParams p{};
  p.a = buf, p.a_stride = 64, p.w = buf, p.c = buf, p.fmt = {4, 128, false};
  p.T = 4, p.k_max = 2, p.E = 4, p.D = 64, p.F = 64, p.capacity = 64, p.block_m = 16, p.up = true;
  auto q = p; q.D = 100; expect_throw("D not a multiple of 8", q);
  q = p; q.block_m = 32; expect_throw("block_m 32", q);
  q = p; q.fmt.bits = 3; expect_throw("bits 3", q);
  q = p; q.fmt.group_size = 16; expect_throw("group 16", q);
  q = p; q.w = buf + 8; expect_throw("misaligned w", q);
  static int32_t ints[4];
  q = p; q.sorted_slots = ints; expect_throw("slot list half given", q);
  return failures ? 1 : 0;
}

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "errors") return errors_case();
  if (argc != 13) {
    std::fprintf(stderr, "usage: %s T k_max E D F block_m bits group sym fp16|bf16 scenario seed | errors\n", argv[0]);
    return 2;
  }
  const int T = std::atoi(argv[1]), k_max = std::atoi(argv[2]), E = std::atoi(argv[3]);
  const int D = std::atoi(argv[4]), F = std::atoi(argv[5]), block_m = std::atoi(argv[6]);
  const int nbits = std::atoi(argv[7]), g = std::atoi(argv[8]);
  const bool sym = std::atoi(argv[9]) != 0, bf16_scales = std::string(argv[10]) == "bf16";
  const std::string scenario = argv[11];
  Rng rng(std::strtoull(argv[12], nullptr, 10));
  const bool dense = scenario == "dense";
  const int R = T * k_max;
  const moe::QFormat fmt{nbits, g, bf16_scales};

  const auto x = randn(static_cast<size_t>(T) * D, 1.0, rng);
  const auto w13 = make_weight(E, 2 * F, D, nbits, g, sym, bf16_scales, rng);
  const auto w2 = make_weight(E, D, F, nbits, g, sym, bf16_scales, rng);
  const auto ids = dense ? std::vector<int32_t>(R, 0) : make_topk_ids(T, k_max, E, scenario, rng);
  Aligned al = align_ref(ids, E, block_m);
  if (dense) {  // row i is slot i: capacity R, no lists
    al.capacity = R;
    al.num_padded = R;
    al.sorted_slots.resize(R);
    for (int i = 0; i < R; ++i) al.sorted_slots[i] = i;
  }
  std::printf("case T=%d k_max=%d E=%d D=%d F=%d block_m=%d bits=%d g=%d sym=%d scales=%s %s: capacity=%d num_padded=%d\n",
              T, k_max, E, D, F, block_m, nbits, g, sym, argv[10], scenario.c_str(), al.capacity, al.num_padded);

  void* d_w13 = repack(w13, E, 2 * F, D, fmt, sym);
  void* d_w2 = repack(w2, E, D, F, fmt, sym);
  bf16* d_x = to_device(x);
  int32_t* d_ids = to_device(ids);
  int32_t* d_slots = to_device(al.sorted_slots);
  int32_t* d_tiles = to_device(al.tile_experts);
  int32_t* d_num_padded = to_device(std::vector<int32_t>{al.num_padded});
  bf16* d_act = canary_rows(al.capacity, F);
  bf16* d_out = canary_rows(R, D);

  moe::ExpertGemmQParams p{};
  if (!dense) p.sorted_slots = d_slots, p.tile_experts = d_tiles, p.num_padded = d_num_padded;
  p.T = T, p.k_max = k_max, p.E = E, p.D = D, p.F = F, p.capacity = al.capacity, p.block_m = block_m, p.fmt = fmt;

  p.a = d_x, p.a_stride = D, p.w = d_w13, p.c = d_act, p.up = true;
  moe::expert_gemm_q_cuda(p, nullptr);
  auto act = to_host(d_act, static_cast<size_t>(al.capacity) * F);
  Check up{"up"};
  std::vector<std::vector<double>> act_exact(R);
  for (int i = 0; i < al.capacity; ++i) {
    const int slot = i < al.num_padded ? al.sorted_slots[i] : -1;
    if (slot < 0) {
      if (!row_is(act, i, F, kCanary)) up.fail("padding row " + std::to_string(i) + " was written");
      continue;
    }
    const int e = dense ? 0 : al.tile_experts[i / block_m];
    const bf16* h = &x[static_cast<size_t>(slot / k_max) * D];
    const double* wgu = &w13.w_bf16[static_cast<size_t>(e) * 2 * F * D];
    act_exact[slot].resize(F);
    for (int c = 0; c < F; ++c) {
      double gs = 0, us = 0;
      for (int d = 0; d < D; ++d) {
        gs += f(h[d]) * wgu[static_cast<size_t>(c) * D + d];
        us += f(h[d]) * wgu[static_cast<size_t>(F + c) * D + d];
      }
      act_exact[slot][c] = gs / (1.0 + std::exp(-gs)) * us;
      up.add(f(act[static_cast<size_t>(i) * F + c]), act_exact[slot][c],
             "row " + std::to_string(i) + " (slot " + std::to_string(slot) + ") col " + std::to_string(c));
    }
  }

  for (int i = 0; i < al.capacity; ++i)
    if (i >= al.num_padded || al.sorted_slots[i] < 0)
      for (int c = 0; c < F; ++c) act[static_cast<size_t>(i) * F + c] = from_bits(kNaN);
  CHECK_CUDA(cudaMemcpy(d_act, act.data(), act.size() * sizeof(bf16), cudaMemcpyHostToDevice));
  p.a = d_act, p.a_stride = F, p.w = d_w2, p.c = d_out, p.up = false, p.topk_ids = dense ? nullptr : d_ids;
  moe::expert_gemm_q_cuda(p, nullptr);
  const auto out = to_host(d_out, static_cast<size_t>(R) * D);
  Check dn{"down"}, layer{"layer"};
  std::vector<int> sorted_pos(R, -1);
  for (int i = 0; i < al.num_padded; ++i)
    if (al.sorted_slots[i] >= 0) sorted_pos[al.sorted_slots[i]] = i;
  for (int j = 0; j < R; ++j) {
    if (ids[j] < 0 || ids[j] >= E) {
      if (!row_is(out, j, D, 0)) dn.fail("sentinel slot " + std::to_string(j) + " is not zero");
      continue;
    }
    const int i = sorted_pos[j];
    if (i < 0) { dn.fail("slot " + std::to_string(j) + " missing from the slot list"); continue; }
    const double* wd = &w2.w_bf16[static_cast<size_t>(ids[j]) * D * F];
    for (int d = 0; d < D; ++d) {
      double s = 0, s_exact = 0;
      for (int c = 0; c < F; ++c) {
        s += f(act[static_cast<size_t>(i) * F + c]) * wd[static_cast<size_t>(d) * F + c];
        s_exact += act_exact[j][c] * wd[static_cast<size_t>(d) * F + c];
      }
      const std::string where = "slot " + std::to_string(j) + " col " + std::to_string(d);
      dn.add(f(out[static_cast<size_t>(j) * D + d]), s, where);
      layer.add(f(out[static_cast<size_t>(j) * D + d]), s_exact, where);
    }
  }
  const bool ok = up.report() & dn.report() & layer.report();
  for (void* ptr : {d_w13, d_w2, (void*)d_x, (void*)d_ids, (void*)d_slots, (void*)d_tiles, (void*)d_num_padded,
                    (void*)d_act, (void*)d_out})
    CHECK_CUDA(cudaFree(ptr));
  return ok ? 0 : 1;
}
