// The routed-expert pipeline of the cuda backend, end to end on the real kernels:
//   align_cuda (csrc/cuda/align.cu, block_m = expert_gemm_block_m) -> expert_gemm up -> down,
// and for T <= 16 also moe_decode_cuda on the same inputs.
//
//   expert_ffn_test T k_max E D F scenario seed
//
// Checks (tolerances of moe_test_util.h):
//   align     its slot list / tile experts / num_padded equal the plain align contract
//             (align_ref) bit for bit: the two branches agree on what the GEMM consumes
//   gemm      expert_out of real slots vs the whole expert MLP in double
//   decode    (T <= 16) the same against the double MLP, and against the GEMM path's output
// Built from separate translation units (this file + align.cu + expert_gemm.cu + moe_decode.cu),
// as in the extension. Exit 0 when all pass.
#include "cuda/common.cuh"
#include "moe_test_util.h"
#include "ops.h"

using namespace moe_test;

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s T k_max E D F scenario seed\n", argv[0]);
    return 2;
  }
  const int T = std::atoi(argv[1]), k_max = std::atoi(argv[2]), E = std::atoi(argv[3]);
  const int D = std::atoi(argv[4]), F = std::atoi(argv[5]);
  const std::string scenario = argv[6];
  Rng rng(std::strtoull(argv[7], nullptr, 10));
  const int R = T * k_max, block_m = moe::expert_gemm_block_m(T, k_max, E);
  const int capacity = static_cast<int>(moe::align_capacity(T, k_max, E, block_m));
  std::printf("case T=%d k_max=%d E=%d D=%d F=%d %s: block_m=%d capacity=%d\n", T, k_max, E, D, F,
              scenario.c_str(), block_m, capacity);

  const auto x = randn(static_cast<size_t>(T) * D, 1.0, rng);
  const auto gate_up = randn(static_cast<size_t>(E) * 2 * F * D, weight_scale(D), rng);
  const auto down = randn(static_cast<size_t>(E) * D * F, weight_scale(F), rng);
  const auto ids = make_topk_ids(T, k_max, E, scenario, rng);
  const Aligned want = align_ref(ids, E, block_m);

  bf16* d_x = to_device(x);
  bf16* d_gate_up = to_device(gate_up);
  bf16* d_down = to_device(down);
  int32_t* d_ids = to_device(ids);
  int32_t* d_counts = to_device(std::vector<int32_t>(E));
  int32_t* d_offsets = to_device(std::vector<int32_t>(E + 1));
  int32_t* d_slots = to_device(std::vector<int32_t>(capacity));
  int32_t* d_tiles = to_device(std::vector<int32_t>(capacity / block_m));
  int32_t* d_num_padded = to_device(std::vector<int32_t>(1));
  int32_t* d_ws = to_device(std::vector<int32_t>(std::max<int64_t>(moe::align_workspace_size(T, k_max, E), 1)));
  bf16* d_act = to_device(std::vector<bf16>(static_cast<size_t>(std::max(capacity, R)) * F));
  bf16* d_out = canary_rows(R, D);

  moe::AlignParams ap{};
  ap.topk_ids = d_ids, ap.T = T, ap.k_max = k_max, ap.E = E, ap.block_m = block_m;
  ap.expert_counts = d_counts, ap.expert_offsets = d_offsets, ap.sorted_slots = d_slots;
  ap.tile_experts = d_tiles, ap.num_padded = d_num_padded, ap.workspace = d_ws;
  moe::align_cuda(ap, nullptr);

  Check al{"align"};
  const int num_padded = to_host(d_num_padded, 1)[0];
  const auto slots = to_host(d_slots, capacity);
  const auto tiles = to_host(d_tiles, capacity / block_m);
  if (num_padded != want.num_padded) al.fail("num_padded " + std::to_string(num_padded) + " want " + std::to_string(want.num_padded));
  for (int i = 0; i < want.num_padded && !al.bad; ++i)
    if (slots[i] != want.sorted_slots[i]) al.fail("sorted_slots[" + std::to_string(i) + "]");
  for (int b = 0; b < want.num_padded / block_m && !al.bad; ++b)
    if (tiles[b] != want.tile_experts[b]) al.fail("tile_experts[" + std::to_string(b) + "]");

  moe::ExpertGemmParams p{};
  p.sorted_slots = d_slots, p.tile_experts = d_tiles, p.num_padded = d_num_padded;
  p.T = T, p.k_max = k_max, p.E = E, p.D = D, p.F = F, p.capacity = capacity, p.block_m = block_m;
  p.a = d_x, p.a_stride = D, p.w = d_gate_up, p.c = d_act, p.up = true;
  moe::expert_gemm_cuda(p, nullptr);
  p.a = d_act, p.a_stride = F, p.w = d_down, p.c = d_out, p.up = false;
  moe::expert_gemm_cuda(p, nullptr);
  const auto out_gemm = to_host(d_out, static_cast<size_t>(R) * D);

  std::vector<bf16> out_dec;
  if (T <= 16) {
    CHECK_CUDA(cudaMemset(d_out, 0xFF, static_cast<size_t>(R) * D * sizeof(bf16)));
    const moe::MoeDecodeParams dp{d_x, d_ids, d_gate_up, d_down, d_act, d_out, T, k_max, E, D, F};
    moe::moe_decode_cuda(dp, nullptr);
    out_dec = to_host(d_out, static_cast<size_t>(R) * D);
  }

  Check gemm{"gemm"}, dec{"decode"}, agree{"dec~gemm"};
  for (int j = 0; j < R; ++j) {
    const int e = ids[j];
    if (e < 0 || e >= E) continue;
    const auto ref = down_ref(swiglu_ref(&x[static_cast<size_t>(j / k_max) * D], &gate_up[static_cast<size_t>(e) * 2 * F * D], D, F),
                              &down[static_cast<size_t>(e) * D * F], D, F);
    for (int d = 0; d < D; ++d) {
      const size_t o = static_cast<size_t>(j) * D + d;
      const std::string where = "slot " + std::to_string(j) + " col " + std::to_string(d);
      gemm.add(f(out_gemm[o]), ref[d], where);
      if (T <= 16) {
        dec.add(f(out_dec[o]), ref[d], where);
        agree.add(f(out_dec[o]), f(out_gemm[o]), where);
      }
    }
  }
  bool ok = al.report() & gemm.report();
  if (T <= 16) ok = ok & dec.report() & agree.report();
  for (void* ptr : {(void*)d_x, (void*)d_gate_up, (void*)d_down, (void*)d_ids, (void*)d_counts, (void*)d_offsets,
                    (void*)d_slots, (void*)d_tiles, (void*)d_num_padded, (void*)d_ws, (void*)d_act, (void*)d_out})
    CHECK_CUDA(cudaFree(ptr));
  return ok ? 0 : 1;
}
