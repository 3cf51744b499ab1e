// Standalone check of the tensor-core wrappers in csrc/cuda/ptx.cuh. The same source builds
//   for a GPU:      nvcc -std=c++20 -arch=sm_80 -I DIR -x cu mma_selftest.cu -o mma_selftest
//   for emulation:  g++ -std=c++20 -O2 -DMOE_EMU -I<cuda>/include -I DIR -x c++ mma_selftest.cu
// (DIR holds the generated test_tolerances.h: python tests/tolerances.py > DIR/test_tolerances.h)
// and prints "OK mma_selftest" when every check passes (exit 1 otherwise). The fragment layouts
// come from the PTX documentation, not from a run on hardware: run this on a GPU whenever one is
// available; on the emulator it shows that ldmatrix, the formulas and mma agree with each other.
//
// Checks:
//  1. every ldmatrix variant (x1/x2/x4, with and without .trans) against the documented layout;
//  2. D = A·B + C three ways: fragments through ldmatrix (A by x4, B by x2 from Bᵀ, by x2.trans
//     and x4.trans from row-major B), fragments built straight from the formulas, and a plain
//     matmul in double on the host. Data set "exact" (multiples of 1/8) is exact in fp32 on any
//     hardware; data set "random" (random bf16) is exact in the emulator and within the rtol of
//     fp32_sum_vs_double (tests/tolerances.py) of the products' magnitude on a GPU (tensor cores do not round like one double sum).
// Shared memory is filled with cp.async (cp_async_16 + commit + wait<0>).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../../../csrc/cuda/common.cuh"
#include "../../../csrc/cuda/ptx.cuh"
#include "test_tolerances.h"  // generated from tests/tolerances.py (tests/emu/emu_harness.py)

static uint16_t f2bf(float f) {  // round to nearest even; inputs here are finite
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static float bf2f(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------- 1. ldmatrix layouts
template <int NUM, bool TRANS>
__global__ void ldmatrix_kernel(const uint16_t* mats, uint32_t* out) {  // mats: 4 x 8 x 8
  MOE_SHARED_ARRAY(uint16_t, s, 4 * 64);
  const int lane = threadIdx.x;
  for (int i = lane; i < 4 * 64; i += 32) s[i] = mats[i];
  __syncthreads();
  const int m = (lane / 8) % NUM, r = lane % 8;  // lanes past 8*NUM repeat valid addresses
  uint32_t reg[4] = {0, 0, 0, 0};
  const void* p = &s[m * 64 + r * 8];
  if (NUM == 1 && !TRANS) ldmatrix_x1(reg, p);
  if (NUM == 2 && !TRANS) ldmatrix_x2(reg, p);
  if (NUM == 4 && !TRANS) ldmatrix_x4(reg, p);
  if (NUM == 1 && TRANS) ldmatrix_x1_trans(reg, p);
  if (NUM == 2 && TRANS) ldmatrix_x2_trans(reg, p);
  if (NUM == 4 && TRANS) ldmatrix_x4_trans(reg, p);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = reg[i];
}

template <int NUM, bool TRANS>
static int check_ldmatrix(const uint16_t* d_mats, uint32_t* d_out, const std::vector<uint16_t>& mats) {
  auto* k = &ldmatrix_kernel<NUM, TRANS>;
  MOE_LAUNCH(k, 1, 32, 0, nullptr, d_mats, d_out);
  MOE_CUDA_CHECK(cudaGetLastError());
  std::vector<uint32_t> out(128);
  MOE_CUDA_CHECK(cudaMemcpy(out.data(), d_out, 128 * 4, cudaMemcpyDeviceToHost));
  int bad = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int m = 0; m < NUM; ++m) {
      const uint16_t* M = &mats[m * 64];
      const uint32_t lo = TRANS ? M[(2 * t) * 8 + g] : M[g * 8 + 2 * t];
      const uint32_t hi = TRANS ? M[(2 * t + 1) * 8 + g] : M[g * 8 + 2 * t + 1];
      if (out[lane * 4 + m] != (lo | hi << 16)) {
        if (bad++ < 5)
          std::printf("FAIL ldmatrix x%d%s lane %d r[%d]: %08x want %08x\n", NUM, TRANS ? ".trans" : "", lane, m,
                      out[lane * 4 + m], lo | hi << 16);
      }
    }
  }
  return bad;
}

// ---------------------------------------------------------------- 2. mma three ways
// A [16,16] row-major, Bt [8,16] row-major (= B column-major), B2 [16,16] row-major (two n-tiles;
// tile 0 equals B), C [16,8]. Outputs: d_ld [16,8] via x4 + x2, d_tr [16,8] via x2.trans,
// d_tr4 [16,16] via x4.trans (both n-tiles), d_fr [16,8] from formula-built fragments.
__global__ void mma_ldmatrix_kernel(const uint16_t* A, const uint16_t* Bt, const uint16_t* B2, const float* C,
                                    float* d_ld, float* d_tr, float* d_tr4) {
  MOE_SHARED_ARRAY(uint16_t, sA, 16 * 16);
  MOE_SHARED_ARRAY(uint16_t, sBt, 8 * 16);
  MOE_SHARED_ARRAY(uint16_t, sB2, 16 * 16);
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  cp_async_16(&sA[lane * 8], &A[lane * 8]);  // 32 chunks of 16 bytes
  cp_async_16(&sB2[lane * 8], &B2[lane * 8]);
  if (lane < 16) cp_async_16(&sBt[lane * 8], &Bt[lane * 8]);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  uint32_t a[4], b[2], b4[4];
  float d[4];
  ldmatrix_x4(a, &sA[(lane % 16) * 16 + 8 * (lane / 16)]);
  ldmatrix_x2(b, &sBt[(lane % 8) * 16 + 8 * ((lane / 8) % 2)]);
  mma_m16n8k16_bf16(d, a, b, c);
  auto store = [&](float* D, int ld, int col0, const float* v) {
    D[g * ld + col0 + 2 * t] = v[0];
    D[g * ld + col0 + 2 * t + 1] = v[1];
    D[(g + 8) * ld + col0 + 2 * t] = v[2];
    D[(g + 8) * ld + col0 + 2 * t + 1] = v[3];
  };
  store(d_ld, 8, 0, d);
  ldmatrix_x2_trans(b, &sB2[(lane % 16) * 16]);
  mma_m16n8k16_bf16(d, a, b, c);
  store(d_tr, 8, 0, d);
  ldmatrix_x4_trans(b4, &sB2[(lane % 16) * 16 + 8 * (lane / 16)]);
  for (int n = 0; n < 2; ++n) {
    mma_m16n8k16_bf16(d, a, &b4[2 * n], c);
    store(d_tr4, 16, 8 * n, d);
  }
}

__global__ void mma_formula_kernel(const uint16_t* A, const uint16_t* Bt, const float* C, float* d_fr) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  auto pack = [](uint16_t lo, uint16_t hi) { return (uint32_t)lo | (uint32_t)hi << 16; };
  auto a_at = [&](int r, int k) { return A[r * 16 + k]; };
  auto b_at = [&](int k, int n) { return Bt[n * 16 + k]; };
  const uint32_t a[4] = {pack(a_at(g, 2 * t), a_at(g, 2 * t + 1)), pack(a_at(g + 8, 2 * t), a_at(g + 8, 2 * t + 1)),
                         pack(a_at(g, 2 * t + 8), a_at(g, 2 * t + 9)),
                         pack(a_at(g + 8, 2 * t + 8), a_at(g + 8, 2 * t + 9))};
  const uint32_t b[2] = {pack(b_at(2 * t, g), b_at(2 * t + 1, g)), pack(b_at(2 * t + 8, g), b_at(2 * t + 9, g))};
  const float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  float d[4];
  mma_m16n8k16_bf16(d, a, b, c);
  d_fr[g * 8 + 2 * t] = d[0];
  d_fr[g * 8 + 2 * t + 1] = d[1];
  d_fr[(g + 8) * 8 + 2 * t] = d[2];
  d_fr[(g + 8) * 8 + 2 * t + 1] = d[3];
}

template <class T>
static T* to_device(const std::vector<T>& h) {
  T* d;
  MOE_CUDA_CHECK(cudaMalloc(&d, h.size() * sizeof(T)));
  MOE_CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <class T>
static std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  MOE_CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

static int check_mma(const char* name, bool exact_everywhere, unsigned seed) {
  unsigned s = seed;
  auto rnd = [&] {  // LCG in [-1, 1)
    s = s * 1664525u + 1013904223u;
    return (float)((s >> 8) & 0xFFFF) / 32768.0f - 1.0f;
  };
  auto value = [&] { return exact_everywhere ? (float)((int)(rnd() * 16)) / 8.0f : rnd(); };
  std::vector<uint16_t> A(256), B2(256), Bt(128);
  std::vector<float> C(128);
  for (auto& x : A) x = f2bf(value());
  for (auto& x : B2) x = f2bf(value());
  for (auto& x : C) x = exact_everywhere ? value() : rnd();
  for (int n = 0; n < 8; ++n)
    for (int k = 0; k < 16; ++k) Bt[n * 16 + k] = B2[k * 16 + n];
  uint16_t *dA = to_device(A), *dBt = to_device(Bt), *dB2 = to_device(B2);
  float* dC = to_device(C);
  float *d_ld, *d_tr, *d_tr4, *d_fr;
  MOE_CUDA_CHECK(cudaMalloc(&d_ld, 128 * 4));
  MOE_CUDA_CHECK(cudaMalloc(&d_tr, 128 * 4));
  MOE_CUDA_CHECK(cudaMalloc(&d_tr4, 256 * 4));
  MOE_CUDA_CHECK(cudaMalloc(&d_fr, 128 * 4));
  MOE_LAUNCH(mma_ldmatrix_kernel, 1, 32, 0, nullptr, dA, dBt, dB2, dC, d_ld, d_tr, d_tr4);
  MOE_LAUNCH(mma_formula_kernel, 1, 32, 0, nullptr, dA, dBt, dC, d_fr);
  MOE_CUDA_CHECK(cudaGetLastError());
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto ld = to_host(d_ld, 128), tr = to_host(d_tr, 128), tr4 = to_host(d_tr4, 256), fr = to_host(d_fr, 128);
#if defined(MOE_EMU)
  const bool exact = true;
#else
  const bool exact = exact_everywhere;
#endif
  int bad = 0;
  for (int n_tile = 0; n_tile < 2; ++n_tile)
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j) {
        const int col = 8 * n_tile + j;
        double ref = C[i * 8 + j], mag = std::fabs(ref);
        for (int k = 0; k < 16; ++k) {
          const double p = (double)bf2f(A[i * 16 + k]) * bf2f(B2[k * 16 + col]);
          ref += p;
          mag += std::fabs(p);
        }
        const float want = (float)ref;
        const double tol = exact ? 0.0 : moe_test::tol::fp32_sum_vs_double_f32.rtol * mag + 1e-30;
        const float got[4] = {tr4[i * 16 + col], n_tile ? want : ld[i * 8 + j], n_tile ? want : tr[i * 8 + j],
                              n_tile ? want : fr[i * 8 + j]};
        const char* how[4] = {"x4.trans", "x4+x2", "x2.trans", "formula"};
        for (int w = 0; w < 4; ++w)
          if (!(std::fabs((double)got[w] - (double)want) <= tol)) {
            if (bad++ < 8)
              std::printf("FAIL mma %s (%s) D[%d][%d] = %.9g, matmul %.9g\n", name, how[w], i, col, got[w], want);
          }
      }
  cudaFree(dA), cudaFree(dBt), cudaFree(dB2), cudaFree(dC);
  cudaFree(d_ld), cudaFree(d_tr), cudaFree(d_tr4), cudaFree(d_fr);
  return bad;
}

int main() {
  std::vector<uint16_t> mats(256);
  for (int i = 0; i < 256; ++i) mats[i] = (uint16_t)(i * 3 + 1);  // distinct 16-bit patterns
  uint16_t* d_mats = to_device(mats);
  uint32_t* d_out;
  MOE_CUDA_CHECK(cudaMalloc(&d_out, 128 * 4));
  int bad = 0;
  bad += check_ldmatrix<1, false>(d_mats, d_out, mats);
  bad += check_ldmatrix<2, false>(d_mats, d_out, mats);
  bad += check_ldmatrix<4, false>(d_mats, d_out, mats);
  bad += check_ldmatrix<1, true>(d_mats, d_out, mats);
  bad += check_ldmatrix<2, true>(d_mats, d_out, mats);
  bad += check_ldmatrix<4, true>(d_mats, d_out, mats);
  bad += check_mma("exact", true, 12345u);
  bad += check_mma("random", false, 777u);
  bad += check_mma("random2", false, 4242u);
  cudaFree(d_mats);
  cudaFree(d_out);
  if (bad) {
    std::printf("FAIL mma_selftest: %d mismatches\n", bad);
    return 1;
  }
  std::printf("OK mma_selftest\n");
  return 0;
}
