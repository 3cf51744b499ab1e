// moe_decode_q and qrepack (csrc/cuda/moe_decode_q.cu) against a double-precision
// dequantise-then-matmul reference computed from the GPTQ tensors themselves.
//
//   moe_decode_q_test T k_max E D F bits group sym scales scenario seed
//       sym: 1 symmetric (qzeros null, z = 2^(bits-1)) | 0 asymmetric (random zeros in [1, 2^bits-1])
//       scales: fp16 | bf16 (the raw bits the checkpoint stores)
//       scenario: moe_test_util.h's, or "dense" (topk_ids null: every slot is expert 0)
//   moe_decode_q_test errors      (launcher precondition messages)
//
// One case: random codes, scales (so that weights are ~Dout(0, 1/Din)-sized) and zeros in the GPTQ
// layout (qweight [E, Din/p, Dout], scales [E, G, Dout], qzeros [E, G, Dout/p]) for w13 [E, 2F, D] and
// w2 [E, D, F], repacked on the device by qrepack_cuda, then moe_decode_q_cuda. Checks
// (tolerances in moe_test_util.h):
//   act    rows of real slots vs silu(x.Wg)*(x.Wu) in double, W = s (q - z) from the GPTQ tensors
//   down   expert_out rows vs (the kernel's act).Wd in double; sentinel slots exactly zero
//   layer  expert_out vs the whole expert MLP in double (act unrounded)
// Exit 0 when all pass. Builds with g++ -DMOE_EMU or, unchanged, with nvcc for a real GPU.
#include "cuda/common.cuh"
#include "cuda/moe_decode_q.cu"
#include "moe_test_util.h"
#include "quant_test_util.h"

#include <stdexcept>

using namespace moe_test;

namespace {

int errors_case() {
  int failures = 0;
  auto expect_throw = [&](const char* what, auto fn) { failures += expect_invalid(what, fn); };
  alignas(16) static uint8_t buf[256];
  static int32_t ids[64];
  const moe::QFormat fmt{4, 32, false};
  const moe::MoeDecodeQParams p{buf, ids, buf, buf, buf, buf, fmt, 4, 2, 4, 64, 64};
  auto q = p; q.T = 17; expect_throw("T = 17", [&] { moe::moe_decode_q_cuda(q, nullptr); });
  q = p; q.fmt.bits = 5; expect_throw("bits = 5", [&] { moe::moe_decode_q_cuda(q, nullptr); });
  q = p; q.fmt.group_size = 48; expect_throw("group 48", [&] { moe::moe_decode_q_cuda(q, nullptr); });
  q = p; q.w2 = buf + 4; expect_throw("misaligned w2", [&] { moe::moe_decode_q_cuda(q, nullptr); });
  q = p; q.D = 36; expect_throw("D not a multiple of 8", [&] { moe::moe_decode_q_cuda(q, nullptr); });
  const moe::QRepackParams r{reinterpret_cast<int32_t*>(buf), reinterpret_cast<uint16_t*>(buf), nullptr, buf,
                             fmt, 1, 8, 64, false};
  expect_throw("repack without qzeros, asymmetric", [&] { moe::qrepack_cuda(r, nullptr); });
  auto r2 = r; r2.sym = true; r2.Din = 60;
  expect_throw("repack Din not a multiple of 8", [&] { moe::qrepack_cuda(r2, nullptr); });
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "errors") return errors_case();
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s T k_max E D F bits group sym fp16|bf16 scenario seed | errors\n", argv[0]);
    return 2;
  }
  const int T = std::atoi(argv[1]), k_max = std::atoi(argv[2]), E = std::atoi(argv[3]);
  const int D = std::atoi(argv[4]), F = std::atoi(argv[5]), nbits = std::atoi(argv[6]), g = std::atoi(argv[7]);
  const bool sym = std::atoi(argv[8]) != 0, bf16_scales = std::string(argv[9]) == "bf16";
  const std::string scenario = argv[10];
  Rng rng(std::strtoull(argv[11], nullptr, 10));
  const int R = T * k_max;
  const bool dense = scenario == "dense";
  std::printf("case T=%d k_max=%d E=%d D=%d F=%d bits=%d g=%d sym=%d scales=%s %s\n", T, k_max, E, D, F, nbits, g,
              sym, argv[9], scenario.c_str());
  const moe::QFormat fmt{nbits, g, bf16_scales};

  const auto x = randn(static_cast<size_t>(T) * D, 1.0, rng);
  const auto w13 = make_weight(E, 2 * F, D, nbits, g, sym, bf16_scales, rng);
  const auto w2 = make_weight(E, D, F, nbits, g, sym, bf16_scales, rng);
  const auto ids = dense ? std::vector<int32_t>(R, 0) : make_topk_ids(T, k_max, E, scenario, rng);

  void* d_w13 = repack(w13, E, 2 * F, D, fmt, sym);
  void* d_w2 = repack(w2, E, D, F, fmt, sym);
  bf16* d_x = to_device(x);
  int32_t* d_ids = dense ? nullptr : to_device(ids);
  bf16* d_act = canary_rows(R, F);
  bf16* d_out = canary_rows(R, D);
  moe::moe_decode_q_cuda({d_x, d_ids, d_w13, d_w2, d_act, d_out, fmt, T, k_max, E, D, F}, nullptr);
  const auto act = to_host(d_act, static_cast<size_t>(R) * F);
  const auto out = to_host(d_out, static_cast<size_t>(R) * D);

  Check ca{"act"}, dn{"down"}, layer{"layer"};
  for (int j = 0; j < R; ++j) {
    const int e = ids[j];
    if (e < 0 || e >= E) {
      if (!row_is(out, j, D, 0)) dn.fail("sentinel slot " + std::to_string(j) + " (id " + std::to_string(e) + ") is not zero");
      continue;
    }
    const bf16* h = &x[static_cast<size_t>(j / k_max) * D];
    const double* wgu = &w13.w[static_cast<size_t>(e) * 2 * F * D];
    std::vector<double> exact(F), a(F);
    for (int c = 0; c < F; ++c) {
      double gs = 0, us = 0;
      for (int d = 0; d < D; ++d) {
        gs += f(h[d]) * wgu[static_cast<size_t>(c) * D + d];
        us += f(h[d]) * wgu[static_cast<size_t>(F + c) * D + d];
      }
      exact[c] = gs / (1.0 + std::exp(-gs)) * us;
      a[c] = f(act[static_cast<size_t>(j) * F + c]);
      ca.add(a[c], exact[c], "slot " + std::to_string(j) + " col " + std::to_string(c));
    }
    const double* wd = &w2.w[static_cast<size_t>(e) * D * F];
    for (int d = 0; d < D; ++d) {
      double s = 0, s_exact = 0;
      for (int c = 0; c < F; ++c) {
        s += a[c] * wd[static_cast<size_t>(d) * F + c];
        s_exact += exact[c] * wd[static_cast<size_t>(d) * F + c];
      }
      const std::string where = "slot " + std::to_string(j) + " col " + std::to_string(d);
      dn.add(f(out[static_cast<size_t>(j) * D + d]), s, where);
      layer.add(f(out[static_cast<size_t>(j) * D + d]), s_exact, where);
    }
  }
  const bool ok = ca.report() & dn.report() & layer.report();
  for (void* ptr : {d_w13, d_w2, (void*)d_x, (void*)d_act, (void*)d_out}) CHECK_CUDA(cudaFree(ptr));
  if (d_ids) CHECK_CUDA(cudaFree(d_ids));
  return ok ? 0 : 1;
}
