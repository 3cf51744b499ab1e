// GPTQ test weights for the quantized kernel test programs (moe_decode_q_test.cu,
// expert_gemm_q_test.cu): random codes, scales and zeros in the GPTQ layout
// (docs/quantization.md), their dequantised values in double, and the device repack.
#pragma once

#include "moe_test_util.h"

namespace moe_test {

// A quantized [E, Dout, Din] weight in GPTQ layout, with its dequantised values in double.
struct GptqWeight {
  std::vector<int32_t> qweight, qzeros;
  std::vector<uint16_t> scales;
  std::vector<double> w;       // [E, Dout, Din] = s (q - z), exact
  std::vector<double> w_bf16;  // the same rounded to bf16: what expert_gemm_q feeds the tensor cores
};

inline double half_to_double(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double v = e ? std::ldexp(1024 + m, e - 25) : std::ldexp(m, -24);
  return h & 0x8000 ? -v : v;
}

inline GptqWeight make_weight(int E, int Dout, int Din, int nb, int g, bool sym, bool bf16_scales, Rng& rng) {
  const int per = 32 / nb, G = (Din + g - 1) / g, levels = 1 << nb;
  GptqWeight q;
  q.qweight.assign(static_cast<size_t>(E) * (Din / per) * Dout, 0);
  q.qzeros.assign(static_cast<size_t>(E) * G * (Dout / per), 0);
  q.scales.resize(static_cast<size_t>(E) * G * Dout);
  q.w.resize(static_cast<size_t>(E) * Dout * Din);
  q.w_bf16.resize(q.w.size());
  std::vector<int> z(static_cast<size_t>(E) * G * Dout);
  std::vector<double> sv(z.size());
  // weights ~ s * uniform(+-2^(b-1)): std ~ s 2^(b-1) / sqrt(3); aim at weight_scale(Din)
  const double target = weight_scale(Din) * std::sqrt(3.0) / (levels / 2);
  for (size_t i = 0; i < z.size(); ++i) {
    // asymmetric zeros near the middle (weights stay ~Dout(0, 1/Din)-sized, so the bf16 tests'
    // tolerances mean the same here), 1 in 16 row-groups at the ends of the range (1, 2^b - 1)
    // with a 4x smaller scale (their weights are mostly of one sign)
    const int extreme = !sym && rng.below(16) == 0 ? (rng.below(2) ? 1 : levels - 1) : 0;
    const double want = target * (0.5 + (rng.below(1000) / 1000.0)) / (extreme ? 4 : 1);
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
    z[i] = sym ? levels / 2 : extreme ? extreme : levels / 2 - levels / 8 + rng.below(levels / 4 + 1);
  }
  for (int e = 0; e < E; ++e)
    for (int gi = 0; gi < G; ++gi)
      for (int n = 0; n < Dout; ++n) {
        const size_t zi = (static_cast<size_t>(e) * G + gi) * Dout + n;
        q.qzeros[(static_cast<size_t>(e) * G + gi) * (Dout / per) + n / per] |=
            static_cast<int32_t>(static_cast<uint32_t>(z[zi]) << (nb * (n % per)));
      }
  for (int e = 0; e < E; ++e)
    for (int k = 0; k < Din; ++k)
      for (int n = 0; n < Dout; ++n) {
        const int code = rng.below(levels);
        q.qweight[(static_cast<size_t>(e) * (Din / per) + k / per) * Dout + n] |=
            static_cast<int32_t>(static_cast<uint32_t>(code) << (nb * (k % per)));
        const size_t zi = (static_cast<size_t>(e) * G + k / g) * Dout + n;
        q.w[(static_cast<size_t>(e) * Dout + n) * Din + k] = sv[zi] * (code - z[zi]);
        q.w_bf16[(static_cast<size_t>(e) * Dout + n) * Din + k] = f(__float2bfloat16(static_cast<float>(sv[zi] * (code - z[zi]))));
      }
  return q;
}

inline void* repack(const GptqWeight& q, int E, int Dout, int Din, const moe::QFormat& fmt, bool sym) {
  const size_t bytes = static_cast<size_t>(E) * Dout * moe::qcuda_row_bytes(Din, fmt);
  void* dst = nullptr;
  CHECK_CUDA(cudaMalloc(&dst, bytes));
  int32_t* d_qw = to_device(q.qweight);
  uint16_t* d_s = to_device(q.scales);
  int32_t* d_z = sym ? nullptr : to_device(q.qzeros);
  moe::qrepack_cuda({d_qw, d_s, d_z, dst, fmt, E, Dout, Din, sym}, nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaFree(d_qw));
  CHECK_CUDA(cudaFree(d_s));
  if (d_z) CHECK_CUDA(cudaFree(d_z));
  return dst;
}

}  // namespace moe_test
