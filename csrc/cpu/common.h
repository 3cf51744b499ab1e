// Helpers shared by the CPU kernels in csrc/cpu: bf16 <-> fp32 and the OpenMP threshold.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../ops.h"

namespace moe::cpu {

inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN stays NaN (quiet), as torch's .to(torch.bfloat16).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline int64_t esize(DType dt) { return dt == DType::f32 ? 4 : 2; }  // bytes per element
inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }       // workspace carving

inline float load(const void* base, DType dt, int64_t i) {
  return dt == DType::f32 ? static_cast<const float*>(base)[i]
                          : bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
}
inline void store(void* base, DType dt, int64_t i, float v) {
  if (dt == DType::f32) static_cast<float*>(base)[i] = v;
  else static_cast<uint16_t*>(base)[i] = f32_to_bf16(v);
}

// Below this many elements of work an OpenMP region costs more than it saves (a fork/join
// costs more than a decode step's route or combine; bench/README.md has the measurement).
constexpr int64_t kParallelMinWork = 1 << 14;

[[noreturn]] inline void fail(const std::string& op, const std::string& what) {
  throw std::invalid_argument(op + ": " + what);
}

}  // namespace moe::cpu
