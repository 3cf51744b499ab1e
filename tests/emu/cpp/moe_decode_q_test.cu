// moe_decode_q and qrepack (csrc/cuda/moe_decode_q.cu) against a double-precision
// dequantise-then-matmul reference computed from the GPTQ tensors themselves.
//
//   moe_decode_q_test T k_max E D F bits group sym scales scenario seed
//       sym: 1 symmetric (qzeros null, z = 2^(bits-1)) | 0 asymmetric (random zeros in [1, 2^bits-1])
//       scales: fp16 | bf16 (the raw bits the checkpoint stores)
//       scenario: moe_test_util.h's, or "dense" (topk_ids null: every slot is expert 0)
//   moe_decode_q_test errors      (launcher precondition messages)
//
// One case: random codes, scales (so that weights are ~N(0, 1/K)-sized) and zeros in the GPTQ
// layout (qweight [E, K/p, N], scales [E, G, N], qzeros [E, G, N/p]) for w13 [E, 2F, D] and
// w2 [E, D, F], repacked on the device by qrepack_cuda, then moe_decode_q_cuda. Checks
// (tolerances in moe_test_util.h):
//   act    rows of real slots vs silu(x.Wg)*(x.Wu) in double, W = s (q - z) from the GPTQ tensors
//   down   expert_out rows vs (the kernel's act).Wd in double; sentinel slots exactly zero
//   layer  expert_out vs the whole expert MLP in double (act unrounded)
// Exit 0 when all pass. Builds with g++ -DMOE_EMU or, unchanged, with nvcc for a real GPU.
#include "cuda/common.cuh"
#include "cuda/moe_decode_q.cu"
#include "moe_test_util.h"

#include <stdexcept>

using namespace moe_test;

namespace {

// A quantized [E, N, K] weight in GPTQ layout, with its dequantised values in double.
struct GptqWeight {
  std::vector<int32_t> qweight, qzeros;
  std::vector<uint16_t> scales;
  std::vector<double> w;  // [E, N, K] = s (q - z)
};

double half_to_double(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double v = e ? std::ldexp(1024 + m, e - 25) : std::ldexp(m, -24);
  return h & 0x8000 ? -v : v;
}

GptqWeight make_weight(int E, int N, int K, int nb, int g, bool sym, bool bf16_scales, Rng& rng) {
  const int per = 32 / nb, G = (K + g - 1) / g, levels = 1 << nb;
  GptqWeight q;
  q.qweight.assign(static_cast<size_t>(E) * (K / per) * N, 0);
  q.qzeros.assign(static_cast<size_t>(E) * G * (N / per), 0);
  q.scales.resize(static_cast<size_t>(E) * G * N);
  q.w.resize(static_cast<size_t>(E) * N * K);
  std::vector<int> z(static_cast<size_t>(E) * G * N);
  std::vector<double> sv(z.size());
  // weights ~ s * uniform(+-2^(b-1)): std ~ s 2^(b-1) / sqrt(3); aim at weight_scale(K)
  const double target = weight_scale(K) * std::sqrt(3.0) / (levels / 2);
  for (size_t i = 0; i < z.size(); ++i) {
    const double want = target * (0.5 + (rng.below(1000) / 1000.0));
    uint16_t b;
    if (bf16_scales) {
      b = bits(__float2bfloat16(static_cast<float>(want)));
      sv[i] = f(from_bits(b));
    } else {
      const int ex = static_cast<int>(std::floor(std::log2(want)));
      b = static_cast<uint16_t>(((ex + 15) << 10) | rng.below(1024));
      sv[i] = half_to_double(b);
    }
    q.scales[i] = b;
    // asymmetric zeros near the middle (weights stay ~N(0, 1/K)-sized, so the bf16 tests'
    // tolerances mean the same here), 1 in 16 groups at the ends of the range (1, 2^b - 1)
    const int extreme = rng.below(16) == 0 ? (rng.below(2) ? 1 : levels - 1) : 0;
    z[i] = sym ? levels / 2 : extreme ? extreme : levels / 2 - levels / 8 + rng.below(levels / 4 + 1);
  }
  for (int e = 0; e < E; ++e)
    for (int gi = 0; gi < G; ++gi)
      for (int n = 0; n < N; ++n) {
        const size_t zi = (static_cast<size_t>(e) * G + gi) * N + n;
        q.qzeros[(static_cast<size_t>(e) * G + gi) * (N / per) + n / per] |=
            static_cast<int32_t>(static_cast<uint32_t>(z[zi]) << (nb * (n % per)));
      }
  for (int e = 0; e < E; ++e)
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) {
        const int code = rng.below(levels);
        q.qweight[(static_cast<size_t>(e) * (K / per) + k / per) * N + n] |=
            static_cast<int32_t>(static_cast<uint32_t>(code) << (nb * (k % per)));
        const size_t zi = (static_cast<size_t>(e) * G + k / g) * N + n;
        q.w[(static_cast<size_t>(e) * N + n) * K + k] = sv[zi] * (code - z[zi]);
      }
  return q;
}

void* repack(const GptqWeight& q, int E, int N, int K, const moe::QFormat& fmt, bool sym) {
  const size_t bytes = static_cast<size_t>(E) * N * moe::qcuda_row_bytes(K, fmt);
  void* dst = nullptr;
  CHECK_CUDA(cudaMalloc(&dst, bytes));
  int32_t* d_qw = to_device(q.qweight);
  uint16_t* d_s = to_device(q.scales);
  int32_t* d_z = sym ? nullptr : to_device(q.qzeros);
  moe::qrepack_cuda({d_qw, d_s, d_z, dst, fmt, E, N, K, sym}, nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaFree(d_qw));
  CHECK_CUDA(cudaFree(d_s));
  if (d_z) CHECK_CUDA(cudaFree(d_z));
  return dst;
}

int errors_case() {
  int failures = 0;
  auto expect_throw = [&](const char* what, auto fn) {
    try {
      fn();
      std::printf("FAIL %s: no exception\n", what);
      ++failures;
    } catch (const std::invalid_argument& e) {
      std::printf("ok   %s: %s\n", what, e.what());
    }
  };
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
  auto r2 = r; r2.sym = true; r2.K = 60;
  expect_throw("repack K not a multiple of 8", [&] { moe::qrepack_cuda(r2, nullptr); });
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
  bf16* d_act = to_device(std::vector<bf16>(static_cast<size_t>(R) * F, from_bits(kCanary)));
  bf16* d_out = to_device(std::vector<bf16>(static_cast<size_t>(R) * D, from_bits(kCanary)));
  moe::moe_decode_q_cuda({d_x, d_ids, d_w13, d_w2, d_act, d_out, fmt, T, k_max, E, D, F}, nullptr);
  const auto act = to_host(d_act, static_cast<size_t>(R) * F);
  const auto out = to_host(d_out, static_cast<size_t>(R) * D);

  Check ca{"act"}, dn{"down"}, layer{"layer"};
  for (int j = 0; j < R; ++j) {
    const int e = ids[j];
    if (e < 0 || e >= E) {
      for (int d = 0; d < D; ++d)
        if (bits(out[static_cast<size_t>(j) * D + d]) != 0) {
          dn.fail("sentinel slot " + std::to_string(j) + " (id " + std::to_string(e) + ") is not zero");
          break;
        }
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
