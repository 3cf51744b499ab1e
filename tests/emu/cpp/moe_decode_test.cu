// moe_decode (csrc/cuda/moe_decode.cu) against a double-precision reference.
//
//   moe_decode_test T k_max E D F scenario seed
//   moe_decode_test errors          (launcher precondition messages)
//
// One case: random bf16 x [T, D] (scale 1), experts_gate_up [E, 2F, D], experts_down [E, D, F]
// (scale 1/sqrt(K), see weight_scale), topk_ids from the scenario (moe_test_util.h). Checks (tolerances there):
//   act    rows of real slots vs silu(x.Wg)*(x.Wu) in double
//   down   expert_out rows of real slots vs (the kernel's act).Wd in double;
//          sentinel slots (id -1 or >= E) must be exactly zero
//   layer  expert_out vs the whole expert MLP in double (act unrounded)
// Exit 0 when all pass. Builds with g++ -DMOE_EMU (emulator) or, unchanged, for a real GPU:
//   nvcc -x cu -std=c++20 -arch=sm_90a -Icsrc -I DIR tests/emu/cpp/<this file> (test_nvcc_build.py;
//   DIR holds the generated test_tolerances.h: python tests/tolerances.py > DIR/test_tolerances.h).
#include "cuda/common.cuh"
#include "cuda/moe_decode.cu"
#include "moe_test_util.h"

#include <stdexcept>

using namespace moe_test;

static int errors_case() {
  int failures = 0;
  auto expect_throw = [&](const char* what, moe::MoeDecodeParams p) {
    failures += expect_invalid(what, [&] { moe::moe_decode_cuda(p, nullptr); });
  };
  alignas(16) static uint8_t buf[64];
  static int32_t ids[64];
  moe::MoeDecodeParams p{buf, ids, buf, buf, buf, buf, 4, 2, 4, 64, 64};
  auto q = p; q.T = 17; expect_throw("T = 17", q);
  q = p; q.F = 36; expect_throw("F not a multiple of 8", q);
  q = p; q.x = buf + 4; expect_throw("misaligned x", q);
  q = p; q.act = nullptr; expect_throw("null act", q);
  return failures ? 1 : 0;
}

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "errors") return errors_case();
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s T k_max E D F scenario seed | errors\n", argv[0]);
    return 2;
  }
  const int T = std::atoi(argv[1]), k_max = std::atoi(argv[2]), E = std::atoi(argv[3]);
  const int D = std::atoi(argv[4]), F = std::atoi(argv[5]);
  const std::string scenario = argv[6];
  Rng rng(std::strtoull(argv[7], nullptr, 10));
  const int R = T * k_max;
  std::printf("case T=%d k_max=%d E=%d D=%d F=%d %s\n", T, k_max, E, D, F, scenario.c_str());

  const auto x = randn(static_cast<size_t>(T) * D, 1.0, rng);
  const auto gate_up = randn(static_cast<size_t>(E) * 2 * F * D, weight_scale(D), rng);
  const auto down = randn(static_cast<size_t>(E) * D * F, weight_scale(F), rng);
  const auto ids = make_topk_ids(T, k_max, E, scenario, rng);

  bf16* d_x = to_device(x);
  bf16* d_gate_up = to_device(gate_up);
  bf16* d_down = to_device(down);
  int32_t* d_ids = to_device(ids);
  bf16* d_act = canary_rows(R, F);
  bf16* d_out = canary_rows(R, D);
  const moe::MoeDecodeParams p{d_x, d_ids, d_gate_up, d_down, d_act, d_out, T, k_max, E, D, F};
  moe::moe_decode_cuda(p, nullptr);
  const auto act = to_host(d_act, static_cast<size_t>(R) * F);
  const auto out = to_host(d_out, static_cast<size_t>(R) * D);

  Check ca{"act"}, dn{"down"}, layer{"layer"};
  for (int j = 0; j < R; ++j) {
    const int e = ids[j];
    if (e < 0 || e >= E) {
      if (!row_is(out, j, D, 0)) dn.fail("sentinel slot " + std::to_string(j) + " (id " + std::to_string(e) + ") is not zero");
      continue;
    }
    const auto exact = swiglu_ref(&x[static_cast<size_t>(j / k_max) * D], &gate_up[static_cast<size_t>(e) * 2 * F * D], D, F);
    std::vector<double> a(F);
    for (int c = 0; c < F; ++c) {
      a[c] = f(act[static_cast<size_t>(j) * F + c]);
      ca.add(a[c], exact[c], "slot " + std::to_string(j) + " col " + std::to_string(c));
    }
    const bf16* wd = &down[static_cast<size_t>(e) * D * F];
    const auto ref = down_ref(a, wd, D, F), ref_layer = down_ref(exact, wd, D, F);
    for (int d = 0; d < D; ++d) {
      const std::string where = "slot " + std::to_string(j) + " col " + std::to_string(d);
      dn.add(f(out[static_cast<size_t>(j) * D + d]), ref[d], where);
      layer.add(f(out[static_cast<size_t>(j) * D + d]), ref_layer[d], where);
    }
  }
  const bool ok = ca.report() & dn.report() & layer.report();
  for (void* ptr : {(void*)d_x, (void*)d_gate_up, (void*)d_down, (void*)d_ids, (void*)d_act, (void*)d_out})
    CHECK_CUDA(cudaFree(ptr));
  return ok ? 0 : 1;
}
