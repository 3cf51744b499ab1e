// shared_expert (csrc/cuda/shared_expert.cu: moe_decode for T <= 16, expert_gemm in dense mode
// above, the down projection split over S when its launch is small) against a double-precision
// dense SwiGLU MLP.
//
//   shared_expert_test T D S x_stride seed
//
// x [T, D] with row stride x_stride (scale 1), gate_up [2S, D] and down [D, S] (scale 1/sqrt(K), see weight_scale).
// Checks shared_out [T, D] with the tolerances of moe_test_util.h. A strided x at T <= 16 takes
// the GEMM path (moe_decode needs contiguous rows), so both paths are reachable at small T.
// Prints the plan (path, block_m, up_splits, down_splits); the partial scratch is filled with NaN first, so a
// split range that is never written, or a reduce that reads past the written ones, shows.
#include "cuda/common.cuh"
#include "cuda/expert_gemm.cu"
#include "cuda/moe_decode.cu"
#include "cuda/shared_expert.cu"
#include "moe_test_util.h"

#include <limits>

using namespace moe_test;

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s T D S x_stride seed\n", argv[0]);
    return 2;
  }
  const int T = std::atoi(argv[1]), D = std::atoi(argv[2]), S = std::atoi(argv[3]), xs = std::atoi(argv[4]);
  Rng rng(std::strtoull(argv[5], nullptr, 10));
  std::printf("case T=%d D=%d S=%d x_stride=%d\n", T, D, S, xs);
  const auto x = randn(static_cast<size_t>(T) * xs, 1.0, rng);
  const auto gate_up = randn(static_cast<size_t>(2) * S * D, weight_scale(D), rng);
  const auto down = randn(static_cast<size_t>(D) * S, weight_scale(S), rng);

  bf16* d_x = to_device(x);
  bf16* d_gate_up = to_device(gate_up);
  bf16* d_down = to_device(down);
  bf16* d_act = canary_rows(T, S);
  bf16* d_out = canary_rows(T, D);
  const moe::SharedExpertPlan plan = moe::shared_expert_plan(T, D, S, xs == D);
  std::printf("plan decode=%d block_m=%d up_splits=%d down_splits=%d\n", plan.decode ? 1 : 0, plan.block_m,
              plan.up_splits, plan.down_splits);
  float* d_partial = plan.partial_floats
                         ? to_device(std::vector<float>(plan.partial_floats, std::numeric_limits<float>::quiet_NaN()))
                         : nullptr;
  const moe::SharedExpertParams p{d_x, xs, d_gate_up, d_down, d_act, d_out, T, D, S, d_partial};
  moe::shared_expert_cuda(p, nullptr);
  const auto out = to_host(d_out, static_cast<size_t>(T) * D);

  Check c{"shared"};
  for (int t = 0; t < T; ++t) {
    const auto ref = down_ref(swiglu_ref(&x[static_cast<size_t>(t) * xs], gate_up.data(), D, S), down.data(), D, S);
    for (int d = 0; d < D; ++d)
      c.add(f(out[static_cast<size_t>(t) * D + d]), ref[d], "token " + std::to_string(t) + " col " + std::to_string(d));
  }
  const bool ok = c.report();
  for (void* ptr : {(void*)d_x, (void*)d_gate_up, (void*)d_down, (void*)d_act, (void*)d_out}) CHECK_CUDA(cudaFree(ptr));
  if (d_partial) CHECK_CUDA(cudaFree(d_partial));
  return ok ? 0 : 1;
}
