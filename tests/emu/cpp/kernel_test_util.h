// Shared helpers of the kernel test programs (route_test, align_test, combine_test): device
// buffers with host mirrors, a counted EXPECT, a deterministic RNG and bf16 conversions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../../csrc/cuda/common.cuh"
#include "test_tolerances.h"  // generated from tests/tolerances.py (see moe_test_util.h)

inline int g_failures = 0;
inline std::string g_case;  // printed with every failure
#define EXPECT(cond, ...)                                                  \
  do {                                                                     \
    if (!(cond)) {                                                         \
      if (g_failures++ < 12) {                                             \
        std::printf("FAIL [%s] %s:%d: ", g_case.c_str(), __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                                          \
        std::printf("\n");                                                 \
      }                                                                    \
    }                                                                      \
  } while (0)

template <class T>
struct Buf {  // device buffer + host mirror; `n` may be 0
  std::vector<T> h;
  T* d = nullptr;
  explicit Buf(size_t n, T fill = T()) : h(n, fill) {
    MOE_CUDA_CHECK(cudaMalloc(&d, (n ? n : 1) * sizeof(T)));
    up();
  }
  Buf(const Buf&) = delete;
  ~Buf() { cudaFree(d); }
  void up() { MOE_CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); }
  void down() { MOE_CUDA_CHECK(cudaMemcpy(h.data(), d, h.size() * sizeof(T), cudaMemcpyDeviceToHost)); }
};

struct Rng {  // splitmix64: same stream on every platform
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int uniform(int n) { return (int)(next() % (uint64_t)n); }
  double real() { return (double)(next() >> 11) / 9007199254740992.0; }  // [0, 1)
};

inline uint16_t f32_to_bf16_bits(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_f32(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Runs f and expects std::invalid_argument whose message contains `needle`.
template <class F>
inline void expect_invalid(const char* what, const char* needle, F&& f) {
  try {
    f();
    EXPECT(false, "%s: no std::invalid_argument", what);
  } catch (const std::invalid_argument& e) {
    EXPECT(std::strstr(e.what(), needle) != nullptr, "%s: message '%s' lacks '%s'", what, e.what(), needle);
  }
}

inline int finish(const char* name, int cases) {
  if (g_failures) {
    std::printf("FAIL %s: %d check(s) failed\n", name, g_failures);
    return 1;
  }
  std::printf("OK %s (%d cases)\n", name, cases);
  return 0;
}
