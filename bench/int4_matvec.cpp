// Single-thread microbenchmark of the 4-bit decode mat-vec's inner loop (one token, M = 1) at
// full-16B expert shapes, g64, run interleaved in one process (best of 30 x 20 calls each).
//   one-group      csrc/cpu/quant_gemm.cpp's qtile_b loop as multi-row tiles run it (AVX-512:
//                  vpmovzxbd + vpermps of float(0..15), two FMAs per k, even/odd partial sums)
//   inlane-cvt     a panel layout whose 64 bytes per 4 k hold lanes (l, l+16) of k..k+3 in dword l,
//                  so no cross-lane shuffle: shift + and + vcvtdq2ps        (same bits)
//   inlane-perm    the same layout, shift + vpermps of float(0..15)           (same bits)
//   two-groups     the one-group loop on two groups at once (8 independent FMA chains, each in its
//                  own order): what quant_gemm.cpp's one-row tiles run (group_pair) (same bits)
//   bf16-pairs     vdpbf16ps: bf16 activation pairs x bf16 codes, 2 multiply-adds per lane per
//                  instruction (codes decoded by vpmovzxbw + vpermw); a DIFFERENT summation rule
//                  (speed only: it reads the same bytes as if they were pair-interleaved)
// Then which rounding this CPU's vdpbf16ps uses (what a bf16-pair rule would have to reproduce in
// the AVX2 and portable builds). The copies here must follow quant_gemm.cpp to mean anything.
//   g++ -O3 -march=native -std=c++20 bench/int4_matvec.cpp -o /tmp/int4_matvec && /tmp/int4_matvec
// Needs AVX-512 F/BW/BF16. Results: bench/README.md ("Why 4-bit decode stays near llama.cpp's").
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>
#include <random>
#include <algorithm>
constexpr int kPanel = 32, kMeta = 96;
static inline __m512 sc16(const uint8_t* p, int h) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 32 * h))); }
static inline __m512 z16(const uint8_t* p, int h) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 64 + 16 * h)))); }
__attribute__((noinline)) void one_group_panel(const float* a, const float* as, const uint8_t* panel, int K, int g, float* out) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint8_t* p = panel;
  for (int k0 = 0, gi = 0; k0 < K; k0 += g, ++gi) {
    int len = std::min(g, K - k0);
    __m512 d0 = _mm512_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
    for (int k = 0; k < len; k += 2) {
      __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + k * 16)));
      __m512 xv = _mm512_set1_ps(a[k0 + k]);
      d0 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(b, codes), d0);
      d1 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), codes), d1);
      b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + (k + 1) * 16)));
      xv = _mm512_set1_ps(a[k0 + k + 1]);
      d2 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(b, codes), d2);
      d3 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), codes), d3);
    }
    p += len * 16;
    __m512 xs = _mm512_set1_ps(as[gi]);
    acc0 = _mm512_fmadd_ps(sc16(p, 0), _mm512_fnmadd_ps(z16(p, 0), xs, _mm512_add_ps(d0, d2)), acc0);
    acc1 = _mm512_fmadd_ps(sc16(p, 1), _mm512_fnmadd_ps(z16(p, 1), xs, _mm512_add_ps(d1, d3)), acc1);
    p += kMeta;
  }
  _mm512_storeu_ps(out, acc0); _mm512_storeu_ps(out + 16, acc1);
}
// new layout: per 4 k, 64 bytes; dword j holds nibbles (lane j, lane j+16) for k, k+1, k+2, k+3 at bits 8i, 8i+4
template <int VARIANT>
__attribute__((noinline)) void inlane_panel(const float* a, const float* as, const uint8_t* panel, int K, int g, float* out) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512i m15 = _mm512_set1_epi32(15);
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint8_t* p = panel;
  auto cv = [&](__m512i v, int s) -> __m512 {
    if constexpr (VARIANT == 0) return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, s), m15));
    else if constexpr (VARIANT == 1) return _mm512_permutexvar_ps(_mm512_srli_epi32(v, s), codes);
    else {
      const __m512i magic = _mm512_set1_epi32(0x4B000000);
      return _mm512_sub_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_srli_epi32(v, s), m15, magic, 0xEA)), _mm512_castsi512_ps(magic));
    }
  };
  for (int k0 = 0, gi = 0; k0 < K; k0 += g, ++gi) {
    int len = std::min(g, K - k0);
    __m512 d0 = _mm512_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
    for (int k = 0; k < len; k += 4) {
      const __m512i v = _mm512_loadu_si512(p + k * 16);
      __m512 xv = _mm512_set1_ps(a[k0 + k]);
      d0 = _mm512_fmadd_ps(xv, cv(v, 0), d0); d1 = _mm512_fmadd_ps(xv, cv(v, 4), d1);
      xv = _mm512_set1_ps(a[k0 + k + 1]);
      d2 = _mm512_fmadd_ps(xv, cv(v, 8), d2); d3 = _mm512_fmadd_ps(xv, cv(v, 12), d3);
      xv = _mm512_set1_ps(a[k0 + k + 2]);
      d0 = _mm512_fmadd_ps(xv, cv(v, 16), d0); d1 = _mm512_fmadd_ps(xv, cv(v, 20), d1);
      xv = _mm512_set1_ps(a[k0 + k + 3]);
      d2 = _mm512_fmadd_ps(xv, cv(v, 24), d2); d3 = _mm512_fmadd_ps(xv, cv(v, 28), d3);
    }
    p += len * 16;
    __m512 xs = _mm512_set1_ps(as[gi]);
    acc0 = _mm512_fmadd_ps(sc16(p, 0), _mm512_fnmadd_ps(z16(p, 0), xs, _mm512_add_ps(d0, d2)), acc0);
    acc1 = _mm512_fmadd_ps(sc16(p, 1), _mm512_fnmadd_ps(z16(p, 1), xs, _mm512_add_ps(d1, d3)), acc1);
    p += kMeta;
  }
  _mm512_storeu_ps(out, acc0); _mm512_storeu_ps(out + 16, acc1);
}

__attribute__((noinline)) void two_groups_panel(const float* a, const float* as, const uint8_t* panel, int K, int g, float* out) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint8_t* p = panel;
  int gi = 0, k0 = 0;
  for (; k0 + 2 * g <= K; k0 += 2 * g, gi += 2) {
    const uint8_t* q = p + g * 16 + kMeta;
    __m512 d0 = _mm512_setzero_ps(), d1 = d0, d2 = d0, d3 = d0, e0 = d0, e1 = d0, e2 = d0, e3 = d0;
    for (int k = 0; k < g; k += 2) {
      __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + k * 16)));
      __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + k * 16)));
      __m512 xv = _mm512_set1_ps(a[k0 + k]), yv = _mm512_set1_ps(a[k0 + g + k]);
      d0 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(b, codes), d0);
      d1 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), codes), d1);
      e0 = _mm512_fmadd_ps(yv, _mm512_permutexvar_ps(c, codes), e0);
      e1 = _mm512_fmadd_ps(yv, _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), codes), e1);
      b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + (k + 1) * 16)));
      c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + (k + 1) * 16)));
      xv = _mm512_set1_ps(a[k0 + k + 1]); yv = _mm512_set1_ps(a[k0 + g + k + 1]);
      d2 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(b, codes), d2);
      d3 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), codes), d3);
      e2 = _mm512_fmadd_ps(yv, _mm512_permutexvar_ps(c, codes), e2);
      e3 = _mm512_fmadd_ps(yv, _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), codes), e3);
    }
    p += g * 16;
    __m512 xs = _mm512_set1_ps(as[gi]);
    acc0 = _mm512_fmadd_ps(sc16(p, 0), _mm512_fnmadd_ps(z16(p, 0), xs, _mm512_add_ps(d0, d2)), acc0);
    acc1 = _mm512_fmadd_ps(sc16(p, 1), _mm512_fnmadd_ps(z16(p, 1), xs, _mm512_add_ps(d1, d3)), acc1);
    p = q + g * 16;
    xs = _mm512_set1_ps(as[gi + 1]);
    acc0 = _mm512_fmadd_ps(sc16(p, 0), _mm512_fnmadd_ps(z16(p, 0), xs, _mm512_add_ps(e0, e2)), acc0);
    acc1 = _mm512_fmadd_ps(sc16(p, 1), _mm512_fnmadd_ps(z16(p, 1), xs, _mm512_add_ps(e1, e3)), acc1);
    p += kMeta;
  }
  for (; k0 < K; k0 += g, ++gi) {
    int len = std::min(g, K - k0);
    __m512 d0 = _mm512_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
    for (int k = 0; k < len; k += 2) {
      __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + k * 16)));
      __m512 xv = _mm512_set1_ps(a[k0 + k]);
      d0 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(b, codes), d0);
      d1 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), codes), d1);
      b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + (k + 1) * 16)));
      xv = _mm512_set1_ps(a[k0 + k + 1]);
      d2 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(b, codes), d2);
      d3 = _mm512_fmadd_ps(xv, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), codes), d3);
    }
    p += len * 16;
    __m512 xs = _mm512_set1_ps(as[gi]);
    acc0 = _mm512_fmadd_ps(sc16(p, 0), _mm512_fnmadd_ps(z16(p, 0), xs, _mm512_add_ps(d0, d2)), acc0);
    acc1 = _mm512_fmadd_ps(sc16(p, 1), _mm512_fnmadd_ps(z16(p, 1), xs, _mm512_add_ps(d1, d3)), acc1);
    p += kMeta;
  }
  _mm512_storeu_ps(out, acc0); _mm512_storeu_ps(out + 16, acc1);
}

// bf16 pair variant: layout per k pair: 32 bytes, byte 2l = lanes (l, l+16) at k, byte 2l+1 at k+1
__attribute__((noinline)) void dp_panel(const uint32_t* xp, const float* as, const uint8_t* panel, int K, int g, float* out) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  alignas(64) uint16_t tab[32];
  for (int i = 0; i < 32; ++i) { float f = float(i & 15); uint32_t u; memcpy(&u, &f, 4); tab[i] = u >> 16; }
  const __m512i t = _mm512_load_si512(tab);
  const uint8_t* p = panel;
  for (int k0 = 0, gi = 0; k0 < K; k0 += g, ++gi) {
    int len = std::min(g, K - k0);
    __m512 d0 = _mm512_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
    for (int k = 0; k < len; k += 4) {
      __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + k * 16)));
      __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[(k0 + k) / 2]);
      d0 = _mm512_dpbf16_ps(d0, xv, (__m512bh)_mm512_permutexvar_epi16(w, t));
      d1 = _mm512_dpbf16_ps(d1, xv, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), t));
      w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + (k + 2) * 16)));
      xv = (__m512bh)_mm512_set1_epi32(xp[(k0 + k) / 2 + 1]);
      d2 = _mm512_dpbf16_ps(d2, xv, (__m512bh)_mm512_permutexvar_epi16(w, t));
      d3 = _mm512_dpbf16_ps(d3, xv, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), t));
    }
    p += len * 16;
    __m512 xs = _mm512_set1_ps(as[gi]);
    acc0 = _mm512_fmadd_ps(sc16(p, 0), _mm512_fnmadd_ps(z16(p, 0), xs, _mm512_add_ps(d0, d2)), acc0);
    acc1 = _mm512_fmadd_ps(sc16(p, 1), _mm512_fnmadd_ps(z16(p, 1), xs, _mm512_add_ps(d1, d3)), acc1);
    p += kMeta;
  }
  _mm512_storeu_ps(out, acc0); _mm512_storeu_ps(out + 16, acc1);
}
static float bf(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; memcpy(&f, &u, 4); return f; }
void dp_semantics() {
  std::mt19937 rng(3);
  long n = 0, seq_odd_first = 0, seq_even_first = 0, fused = 0;
  for (int it = 0; it < 200000; ++it) {
    alignas(64) uint16_t a[32], b[32]; alignas(64) float c[16], r[16];
    for (int i = 0; i < 32; ++i) {
      float fa = std::normal_distribution<float>(0, 1)(rng) * std::ldexp(1.f, int(rng() % 20) - 10);
      uint32_t u; memcpy(&u, &fa, 4); a[i] = u >> 16;
      b[i] = [&] { float fb = float(rng() % 16); uint32_t v; memcpy(&v, &fb, 4); return uint16_t(v >> 16); }();
    }
    for (int i = 0; i < 16; ++i) c[i] = std::normal_distribution<float>(0, 1)(rng) * std::ldexp(1.f, int(rng() % 20) - 10);
    __m512 acc = _mm512_load_ps(c);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_load_si512(a), (__m512bh)_mm512_load_si512(b));
    _mm512_store_ps(r, acc);
    for (int i = 0; i < 16; ++i) {
      float p0 = bf(a[2 * i]) * bf(b[2 * i]), p1 = bf(a[2 * i + 1]) * bf(b[2 * i + 1]);  // exact
      float o = (c[i] + p1) + p0, e = (c[i] + p0) + p1;
      float f = float(double(c[i]) + double(p0) + double(p1));
      ++n; seq_odd_first += r[i] == o; seq_even_first += r[i] == e; fused += r[i] == f;
    }
  }
  printf("vdpbf16ps on %ld lanes: equal to (c + odd) + even %ld, (c + even) + odd %ld, one rounding %ld\n", n, seq_odd_first, seq_even_first, fused);
  if (0) printf("%ld equal to (c+odd)+even %ld, (c+even)+odd %ld, one rounding %ld\n", n, seq_odd_first, seq_even_first, fused);
}
int main() {
  std::mt19937 rng(1);
  for (auto [N, K] : {std::pair{1408, 2048}, std::pair{2048, 1408}}) {
    const int g = 64, G = (K + g - 1) / g, np = N / 32;
    const size_t pb = size_t(K) * 16 + size_t(G) * kMeta;
    std::vector<uint8_t> oldp(np * pb), newp(np * pb);
    for (auto& b : oldp) b = rng();
    for (int q = 0; q < np; ++q) for (int gi = 0; gi < G; ++gi) {  // fp16 scales 0.01, zeros 8
      uint8_t* m = &oldp[q * pb + size_t(gi) * (g * 16 + kMeta) + g * 16];
      for (int l = 0; l < 32; ++l) { m[2 * l] = 0x1F; m[2 * l + 1] = 0x21; m[64 + l] = 8; }
    }
    for (int q = 0; q < np; ++q) {  // the in-lane layout of the same codes
      const uint8_t* s = &oldp[q * pb]; uint8_t* d = &newp[q * pb];
      for (int gi = 0; gi < G; ++gi) {
        int len = std::min(g, K - gi * g);
        std::memset(d, 0, len * 16);
        for (int k = 0; k < len; ++k) for (int l = 0; l < 32; ++l) {
          int c = l < 16 ? s[k * 16 + l] & 15 : s[k * 16 + l - 16] >> 4;
          d[(k / 4) * 64 + 4 * (l % 16) + k % 4] |= c << (l < 16 ? 0 : 4);
        }
        std::memcpy(d + len * 16, s + len * 16, kMeta);
        s += len * 16 + kMeta; d += len * 16 + kMeta;
      }
    }
    std::vector<uint32_t> xp(K / 2);
    std::vector<float> a(K), as(G);
    for (auto& x : a) x = std::uniform_real_distribution<float>(-1, 1)(rng);
    for (int gi = 0; gi < G; ++gi) { float s = 0; for (int k = gi * g; k < std::min(K, gi * g + g); ++k) s += a[k]; as[gi] = s; }
    for (int k = 0; k < K; k += 2) { uint32_t u0, u1; memcpy(&u0, &a[k], 4); memcpy(&u1, &a[k + 1], 4); xp[k / 2] = (u0 >> 16) | (u1 & 0xffff0000u); }
    using Fn = void (*)(const float*, const float*, const uint8_t*, int, int, float*);
    static const uint32_t* xpp; xpp = xp.data();
    struct V { const char* name; Fn f; bool inlane, same_bits; };
    const V vs[] = {{"one-group", one_group_panel, false, true}, {"inlane-cvt", inlane_panel<0>, true, true},
                    {"inlane-perm", inlane_panel<1>, true, true}, {"two-groups", two_groups_panel, false, true},
                    {"bf16-pairs", [](const float*, const float* s, const uint8_t* P, int K_, int g_, float* o) {
                       dp_panel(xpp, s, P, K_, g_, o); }, false, false}};
    constexpr int nv = sizeof(vs) / sizeof(vs[0]);
    std::vector<std::vector<float>> y(nv, std::vector<float>(N));
    double best[nv];
    for (double& b : best) b = 1e9;
    for (int rep = 0; rep < 30; ++rep)
      for (int i = 0; i < nv; ++i) {
        const std::vector<uint8_t>& P = vs[i].inlane ? newp : oldp;
        auto t0 = std::chrono::steady_clock::now();
        for (int it = 0; it < 20; ++it)
          for (int q = 0; q < np; ++q) vs[i].f(a.data(), as.data(), P.data() + q * pb, K, g, y[i].data() + q * 32);
        best[i] = std::min(best[i], std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 20);
      }
    printf("[N=%d, K=%d] g%d:", N, K, g);
    for (int i = 0; i < nv; ++i)
      printf(" %s %.1f us (%.2fx%s)", vs[i].name, best[i] * 1e6, best[0] / best[i],
             vs[i].same_bits ? (memcmp(y[0].data(), y[i].data(), N * 4) ? ", BITS DIFFER" : ", same bits") : "");
    printf("\n");
  }
  dp_semantics();
}
