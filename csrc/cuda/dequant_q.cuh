// In-register dequantisation of the qrow layout (csrc/cuda/moe_decode_q.cu's header gives the
// layout), shared by moe_decode_q.cu and expert_gemm_q.cu.
//
// A 16-byte chunk of codes holds 32 (4-bit) or 16 (8-bit) consecutive k of one row; it lies in one
// group, whose meta word gives s (the fp16 / bf16 scale as fp32) and bias = -zoff * s. Slice `sub`
// of a chunk is 8 consecutive k:
//   4-bit: word `sub`; ((word >> 4i) & 0x000F000F) | 0x43004300 is the bf16 pair (128 + q_i,
//          128 + q_{i+4}) (one LOP3); each half widened to fp32 by a shift or a mask, then
//          w = fma(128 + q, s, bias) = s (q - z).
//   8-bit: words 2 sub, 2 sub + 1; w = fma(float(byte), s, bias).
// Exact: s (q - z) has at most 20 significant bits, so w is the reference's dequantised weight.
#pragma once

#include "common.cuh"

namespace moe {
namespace qdq {

// fp16 bits -> fp32, exact for normal and subnormal values: the 15 exponent and mantissa bits
// placed as an fp32 are the value times 2^-112.
__device__ __forceinline__ float half_bits_to_float(uint32_t h) {
  const float v = __uint_as_float((h & 0x7FFFu) << 13) * 5.192296858534828e33f;  // 2^112
  return __uint_as_float(__float_as_uint(v) | ((h & 0x8000u) << 16));
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// The 8 dequantised weights of k slice `sub` (8 k) of a 16-byte code chunk.
template <int BITS>
__device__ __forceinline__ void dequant8(const uint4& w, int sub, float s, float bias, float (&out)[8]) {
  if constexpr (BITS == 4) {
    const uint32_t word = word_of(w, sub);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t v = ((word >> (4 * i)) & 0x000F000Fu) | 0x43004300u;  // bf16 (128 + q_i, 128 + q_{i+4})
      out[i] = fmaf(__uint_as_float(v << 16), s, bias);
      out[i + 4] = fmaf(__uint_as_float(v & 0xFFFF0000u), s, bias);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      out[i] = fmaf(static_cast<float>((word_of(w, 2 * sub + i / 4) >> (8 * (i % 4))) & 0xFFu), s, bias);
  }
}

// s and bias of a meta word (scale bits | zoff << 16).
__device__ __forceinline__ void scale_bias(uint32_t m, bool scales_bf16, float& s, float& bias) {
  s = scales_bf16 ? __uint_as_float(m << 16) : half_bits_to_float(m & 0xFFFFu);
  bias = -static_cast<float>(m >> 16) * s;
}

}  // namespace qdq
}  // namespace moe
