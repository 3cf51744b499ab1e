// quant_gemm (CPU): weight-only quantized (4- or 8-bit, group-wise along Din) linear layer and
// fused routed-expert FFN, on weights repacked once from the GPTQ tensors (ops.h "Quantized
// weights" gives the panel layout and its bytes).
//
// Formula: w[n,k] = s[k/g, n] * (q[k,n] - z[k/g, n]) (q, z unsigned `bits`-bit codes, s fp16/bf16)
//   y[t,n] = sum_k x[t,k] w[n,k] is computed per group as
//     y = sum_gi s[gi,n] * (d[gi] - z[gi,n] * xs[t,gi]),  d[gi] = sum_{k in gi} x[t,k] q[k,n],
//   xs[t,gi] = sum_{k in gi} x[t,k], all in fp32: the inner loop is one FMA per weight on the
//   integer code widened to fp32 (exact), the scale and zero are applied once per group.
//   bf16 activations are widened to fp32 once per call (exact); the expert FFN's SiLU*up
//   intermediate is rounded to the activation dtype, as expert_ffn_cpu does.
// Fixed summation order: d over k ascending in two interleaved partial sums (even k, odd k;
//   added at the group's end), xs over k ascending, y over groups ascending. Every token row sees
//   that sequence whatever tile it lands in and whichever thread runs it, so 1 and 2 threads
//   give the same bits and a row's bits never depend on its tile or on T.
// Algorithm: as expert_ffn.cpp. A tile of M <= kMaxM token rows times one 32-row panel: per k
//   the panel's codes are loaded once (32 B int8, 16 B int4), widened to fp32 in registers and
//   FMA'd against the M rows' broadcasts; per group the 2x16 scales and zeros (96 B) update the
//   accumulators. The pool's chunks (pool.h) are ranges of panels (linear) or of (expert, panel)
//   units cut by cost (expert FFN), so each streams a contiguous range of quantized bytes, each
//   panel once per call.
//   Decode (T <= 16) streams the codes at ~1 FMA per weight per token (AVX-512 one-row tiles
//   run two groups' sums at once to hide FMA latency, each in its own order); prefill reuses each
//   panel from L1/L2 across token tiles (no separate dequantized buffer).
// ISA (simd.h): AVX-512 (zmm, vpmovzxbd + vcvtdq2ps, int4: vpermps of float(0..15) on the
//   nibbles; vcvtph2ps for fp16 scales; tiles of up to
//   6 rows: 4M accumulators for the even/odd partial sums), AVX2+FMA+F16C (ymm, tiles of up to
//   2 rows, 4 ymm per panel row), else portable loops. Any Dout, Din (Din a multiple of 32/bits,
//   groups = ceil(Din/g), the last one may be short), T, E.
// Reference: the dequantize-then-matmul formula in tests/test_quant_kernels.py; Python entry
//   points: src/moe_engine/ops/quant.py.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "common.h"
#include "either_panels.h"
#include "pool.h"
#include "simd.h"

namespace moe {
namespace {

using cpu::align64;
using cpu::esize;
using cpu::for_my_units;
using cpu::kHalf;
using cpu::kPanel;
constexpr int64_t kGroupMetaBytes = kPanel * 2 + kPanel;  // 32 raw 16-bit scales + 32 uint8 zeros

#if MOE_AVX512
constexpr int kMaxM = 6;  // 4M accumulators + 2 weight vectors + 1 broadcast <= 32 zmm
#elif MOE_AVX2
constexpr int kMaxM = 2;  // 4M accumulators + M broadcasts + 2 temporaries <= 16 ymm
#else
constexpr int kMaxM = 4;
#endif
using AccT = float[kMaxM][kPanel];

// One packed weight's geometry.
struct QGeom {
  int bits, g;
  bool scales_bf16;
  int64_t Din, groups, panel_bytes;
};
QGeom geom(const QFormat& f, int64_t Din) {
  QGeom q{f.bits, f.group_size, f.scales_bf16, Din, (Din + f.group_size - 1) / f.group_size, 0};
  q.panel_bytes = Din * kPanel * f.bits / 8 + q.groups * kGroupMetaBytes;
  return q;
}

void check_format(const char* op, const QFormat& f, int64_t Din) {
  if (f.bits != 4 && f.bits != 8)
    cpu::fail(op, "bits=" + std::to_string(f.bits) + ", expected 4 or 8");
  if (f.group_size != 32 && f.group_size != 64 && f.group_size != 128)
    cpu::fail(op, "group_size=" + std::to_string(f.group_size) + ", expected 32, 64 or 128");
  if (Din <= 0 || Din % (32 / f.bits))
    cpu::fail(op, "Din=" + std::to_string(Din) + ", expected a positive multiple of " + std::to_string(32 / f.bits));
}

// fp32 row stride (elements) of the widened activations: 16-aligned, and never a multiple of
// 4 KiB, whose rows would share their L1 set (see expert_ffn.cpp tile_rows).
inline int64_t row_stride(int64_t Din) {
  const int64_t s = (Din + 15) / 16 * 16;
  return s % 1024 == 0 ? s + 16 : s;
}
// Output columns of the gate|up phase: F rounded up to whole half-panels.
inline int64_t h_cols(int64_t F) { return (F + kHalf - 1) / kHalf * kHalf; }

inline float half_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
  else if (exp != 0) u = sign | ((exp + 112) << 23) | (man << 13);
  else if (man == 0) u = sign;
  else {  // subnormal: normalise
    int e = 113;
    uint32_t m = man;
    while (!(m & 0x400u)) m <<= 1, --e;
    u = sign | (uint32_t(e) << 23) | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float scale_f32(const uint8_t* meta, int l, bool bf16) {
  uint16_t v;
  std::memcpy(&v, meta + 2 * l, 2);
  return bf16 ? cpu::bf16_to_f32(v) : half_to_f32(v);
}
// Code of lane l at one k (codes: that k's 32*bits/8 bytes).
inline int code_at(const uint8_t* codes, int l, int bits) {
  if (bits == 8) return codes[l];
  return l < kHalf ? codes[l] & 15 : codes[l - kHalf] >> 4;
}
inline float round_to(DType dt, float v) { return dt == DType::bf16 ? cpu::bf16_to_f32(cpu::f32_to_bf16(v)) : v; }

// ---- microkernel: acc[m][0..31] = 32 outputs of one panel for M token rows ------------------
// a[m]: token m's fp32 Din-vector; as[m]: its group sums; panel: the packed panel.
#if MOE_AVX512
template <int B>
inline void decode_k(const uint8_t* c, __m512& w0, __m512& w1) {
  if constexpr (B == 8) {
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16))));
  } else {
    // vpermps reads only the low 4 bits of each index lane: the low nibble needs no mask, and
    // the lookup of float(0..15) replaces the int -> float conversion (same values, same bits)
    const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    w0 = _mm512_permutexvar_ps(b, codes);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), codes);
  }
}
inline __m512 load_scales16(const uint8_t* meta, int half, bool bf16) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(meta) + 16 * half;
  return bf16 ? cpu::load16(s) : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
}
inline __m512 load_zeros16(const uint8_t* meta, int half) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(meta + 2 * kPanel + 16 * half))));
}

// acc[0..31] += s * ((d_even + d_odd) - z * xs) for one group: d[0..3] as in qtile_b, meta its
// 2x16 scales and zeros, xs its activation sum.
inline void apply_group(const QGeom& w, const __m512* d, const uint8_t* meta, float xs_v, float* acc) {
  const __m512 s0 = load_scales16(meta, 0, w.scales_bf16), s1 = load_scales16(meta, 1, w.scales_bf16);
  const __m512 z0 = load_zeros16(meta, 0), z1 = load_zeros16(meta, 1), xs = _mm512_set1_ps(xs_v);
  const __m512 c0 = _mm512_fnmadd_ps(z0, xs, _mm512_add_ps(d[0], d[2]));
  const __m512 c1 = _mm512_fnmadd_ps(z1, xs, _mm512_add_ps(d[1], d[3]));
  _mm512_store_ps(acc, _mm512_fmadd_ps(s0, c0, _mm512_load_ps(acc)));
  _mm512_store_ps(acc + 16, _mm512_fmadd_ps(s1, c1, _mm512_load_ps(acc + 16)));
}

// One token row (decode), two full groups gi, gi + 1 at once: each group's partial sums in the
// same order as qtile_b's loop, applied to acc in group order, so the same bits. Why: at M = 1
// the loop has only 4 FMA chains, and interleaving two groups' chains hides the FMA latency
// (bench/int4_matvec.cpp, "two-groups"; bench/README.md).
template <int B>
inline void group_pair(const QGeom& w, const float* a, const float* as, int64_t gi, const uint8_t* p, float* acc) {
  constexpr int64_t kb = kPanel * B / 8;
  const int64_t g = w.g, k0 = gi * g;
  const uint8_t* q = p + g * kb + kGroupMetaBytes;  // the second group
  __m512 d[4], e[4];
  for (int j = 0; j < 4; ++j) d[j] = e[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < g; k += 2) {  // g is even (32, 64 or 128)
    __m512 w0, w1, v0, v1;
    decode_k<B>(p + k * kb, w0, w1);
    decode_k<B>(q + k * kb, v0, v1);
    __m512 x = _mm512_set1_ps(a[k0 + k]), y = _mm512_set1_ps(a[k0 + g + k]);
    d[0] = _mm512_fmadd_ps(x, w0, d[0]), d[1] = _mm512_fmadd_ps(x, w1, d[1]);
    e[0] = _mm512_fmadd_ps(y, v0, e[0]), e[1] = _mm512_fmadd_ps(y, v1, e[1]);
    decode_k<B>(p + (k + 1) * kb, w0, w1);
    decode_k<B>(q + (k + 1) * kb, v0, v1);
    x = _mm512_set1_ps(a[k0 + k + 1]), y = _mm512_set1_ps(a[k0 + g + k + 1]);
    d[2] = _mm512_fmadd_ps(x, w0, d[2]), d[3] = _mm512_fmadd_ps(x, w1, d[3]);
    e[2] = _mm512_fmadd_ps(y, v0, e[2]), e[3] = _mm512_fmadd_ps(y, v1, e[3]);
  }
  apply_group(w, d, p + g * kb, as[gi], acc);
  apply_group(w, e, q + g * kb, as[gi + 1], acc);
}

template <int M, int B>
inline void qtile_b(const QGeom& w, const float* const* a, const float* const* as, const uint8_t* panel, AccT& acc) {
  for (int m = 0; m < M; ++m) _mm512_store_ps(acc[m], _mm512_setzero_ps()), _mm512_store_ps(acc[m] + 16, _mm512_setzero_ps());
  constexpr int64_t kb = kPanel * B / 8;  // code bytes per k
  const uint8_t* p = panel;
  int64_t gi = 0;
  if constexpr (M == 1)
    for (; gi + 1 < w.groups && (gi + 2) * w.g <= w.Din; gi += 2, p += 2 * (w.g * kb + kGroupMetaBytes))
      group_pair<B>(w, a[0], as[0], gi, p, acc[0]);
  for (; gi < w.groups; ++gi) {
    const int64_t k0 = gi * w.g, len = std::min<int64_t>(w.g, w.Din - k0);
    __m512 d[M][4];  // [even k lanes 0-15, even 16-31, odd 0-15, odd 16-31]
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < 4; ++j) d[m][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= len; k += 2) {
      __m512 w0, w1;
      decode_k<B>(p + k * kb, w0, w1);
#pragma GCC unroll 6
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_set1_ps(a[m][k0 + k]);
        d[m][0] = _mm512_fmadd_ps(xv, w0, d[m][0]);
        d[m][1] = _mm512_fmadd_ps(xv, w1, d[m][1]);
      }
      decode_k<B>(p + (k + 1) * kb, w0, w1);
#pragma GCC unroll 6
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_set1_ps(a[m][k0 + k + 1]);
        d[m][2] = _mm512_fmadd_ps(xv, w0, d[m][2]);
        d[m][3] = _mm512_fmadd_ps(xv, w1, d[m][3]);
      }
    }
    if (k < len) {  // odd group length (never for GPTQ shapes): the last k into the even sums
      __m512 w0, w1;
      decode_k<B>(p + k * kb, w0, w1);
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_set1_ps(a[m][k0 + k]);
        d[m][0] = _mm512_fmadd_ps(xv, w0, d[m][0]);
        d[m][1] = _mm512_fmadd_ps(xv, w1, d[m][1]);
      }
    }
    p += len * kb;
    for (int m = 0; m < M; ++m) apply_group(w, d[m], p, as[m][gi], acc[m]);
    p += kGroupMetaBytes;
  }
}

inline __m512 round16(DType dt, __m512 v) {
  if (dt == DType::f32) return v;
  const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
// h[m][col..col+15] = round(SiLU(gate) * up) as fp32.
inline void epi_silu(DType dt, const AccT& acc, int M, float* const* h_rows, int64_t col) {
  for (int m = 0; m < M; ++m) {
    const __m512 g = _mm512_load_ps(acc[m]), u = _mm512_load_ps(acc[m] + kHalf);
    const __m512 e = cpu::exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(h_rows[m] + col, round16(dt, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u)));
  }
}
inline void store16(void* dst, DType dt, __m512 v, __mmask16 mask) {
  if (dt == DType::f32) _mm512_mask_storeu_ps(dst, mask, v);
  else _mm256_mask_storeu_epi16(dst, mask, (__m256i)_mm512_cvtneps_pbh(v));
}
inline void epi_store(DType dt, const AccT& acc, int M, void* const* out_rows, int64_t col, int64_t Dout) {
  const int64_t n = std::min<int64_t>(kPanel, Dout - col);
  const __mmask16 m0 = n >= 16 ? 0xffff : __mmask16((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? 0xffff : n <= 16 ? 0 : __mmask16((1u << (n - 16)) - 1);
  for (int m = 0; m < M; ++m) {
    char* row = static_cast<char*>(out_rows[m]) + col * esize(dt);
    store16(row, dt, _mm512_load_ps(acc[m]), m0);
    store16(row + 16 * esize(dt), dt, _mm512_load_ps(acc[m] + 16), m1);
  }
}

#elif MOE_AVX2
// Lane vector j (8 lanes, j = 0..3) of one k's codes. int4: byte i holds lane i (low nibble)
// and lane i + 16 (high nibble), so vectors 0, 1 are low nibbles of bytes 0-7, 8-15, vectors
// 2, 3 the high nibbles.
template <int B>
inline __m256 decode_vec(const uint8_t* c, int j) {
  if constexpr (B == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * j))));
  } else {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * (j & 1))));
    return _mm256_cvtepi32_ps(j < 2 ? _mm256_and_si256(b, _mm256_set1_epi32(15)) : _mm256_srli_epi32(b, 4));
  }
}

template <int M, int B>
inline void qtile_b(const QGeom& w, const float* const* a, const float* const* as, const uint8_t* panel, AccT& acc) {
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < 4; ++j) _mm256_store_ps(acc[m] + 8 * j, _mm256_setzero_ps());
  constexpr int64_t kb = kPanel * B / 8;
  const uint8_t* p = panel;
  for (int64_t gi = 0; gi < w.groups; ++gi) {
    const int64_t k0 = gi * w.g, len = std::min<int64_t>(w.g, w.Din - k0);
    // Two passes over the group, even k then odd k, each with 4M accumulators: the same
    // even/odd partial sums as the AVX-512 build in 16 ymm.
    __m256 d[2][M][4];
    for (int par = 0; par < 2; ++par) {
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j) d[par][m][j] = _mm256_setzero_ps();
      for (int64_t k = par; k < len; k += 2) {
        const uint8_t* c = p + k * kb;
        __m256 xv[M];
        for (int m = 0; m < M; ++m) xv[m] = _mm256_broadcast_ss(a[m] + k0 + k);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256 wv = decode_vec<B>(c, j);
          for (int m = 0; m < M; ++m) d[par][m][j] = _mm256_fmadd_ps(xv[m], wv, d[par][m][j]);
        }
      }
    }
    p += len * kb;
    const uint16_t* sp = reinterpret_cast<const uint16_t*>(p);
    for (int j = 0; j < 4; ++j) {
      const __m256 s = w.scales_bf16 ? cpu::load8(sp + 8 * j)
                                     : _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + 8 * j)));
      const __m256 z = _mm256_cvtepi32_ps(
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 * kPanel + 8 * j))));
      for (int m = 0; m < M; ++m) {
        const __m256 c = _mm256_fnmadd_ps(z, _mm256_broadcast_ss(as[m] + gi), _mm256_add_ps(d[0][m][j], d[1][m][j]));
        _mm256_store_ps(acc[m] + 8 * j, _mm256_fmadd_ps(s, c, _mm256_load_ps(acc[m] + 8 * j)));
      }
    }
    p += kGroupMetaBytes;
  }
}

inline __m256 round8(DType dt, __m256 v) {
  if (dt == DType::f32) return v;
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(cpu::to_bf16x8(v)), 16));
}
inline void epi_silu(DType dt, const AccT& acc, int M, float* const* h_rows, int64_t col) {
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < kHalf; j += 8) {
      const __m256 g = _mm256_load_ps(acc[m] + j), u = _mm256_load_ps(acc[m] + kHalf + j);
      const __m256 e = cpu::exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
      _mm256_storeu_ps(h_rows[m] + col + j,
                       round8(dt, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u)));
    }
}
inline void epi_store(DType dt, const AccT& acc, int M, void* const* out_rows, int64_t col, int64_t Dout) {
  const int64_t n = std::min<int64_t>(kPanel, Dout - col), n8 = n / 8 * 8;
  for (int m = 0; m < M; ++m) {
    for (int64_t l = 0; l < n8; l += 8) {
      const __m256 v = _mm256_load_ps(acc[m] + l);
      if (dt == DType::f32) cpu::store8(static_cast<float*>(out_rows[m]) + col + l, v);
      else cpu::store8(static_cast<uint16_t*>(out_rows[m]) + col + l, v);
    }
    for (int64_t l = n8; l < n; ++l) cpu::store(out_rows[m], dt, col + l, acc[m][l]);
  }
}

#else  // portable: plain loops over 32 lanes, the same even/odd partial sums
template <int M, int B>
inline void qtile_b(const QGeom& w, const float* const* a, const float* const* as, const uint8_t* panel, AccT& acc) {
  for (int m = 0; m < M; ++m)
    for (int l = 0; l < kPanel; ++l) acc[m][l] = 0.f;
  constexpr int64_t kb = kPanel * B / 8;
  const uint8_t* p = panel;
  for (int64_t gi = 0; gi < w.groups; ++gi) {
    const int64_t k0 = gi * w.g, len = std::min<int64_t>(w.g, w.Din - k0);
    float d[2][M][kPanel] = {};
    for (int64_t k = 0; k < len; ++k) {
      float wv[kPanel];
      for (int l = 0; l < kPanel; ++l) wv[l] = float(code_at(p + k * kb, l, B));
      for (int m = 0; m < M; ++m) {
        const float xv = a[m][k0 + k];
        for (int l = 0; l < kPanel; ++l) d[k & 1][m][l] += xv * wv[l];
      }
    }
    p += len * kb;
    for (int l = 0; l < kPanel; ++l) {
      const float s = scale_f32(p, l, w.scales_bf16), z = float(p[2 * kPanel + l]);
      for (int m = 0; m < M; ++m) acc[m][l] += s * ((d[0][m][l] + d[1][m][l]) - z * as[m][gi]);
    }
    p += kGroupMetaBytes;
  }
}
inline void epi_silu(DType dt, const AccT& acc, int M, float* const* h_rows, int64_t col) {
  for (int m = 0; m < M; ++m)
    for (int l = 0; l < kHalf; ++l) {
      const float g = acc[m][l], u = acc[m][kHalf + l];
      h_rows[m][col + l] = round_to(dt, g / (1.f + std::exp(-g)) * u);
    }
}
inline void epi_store(DType dt, const AccT& acc, int M, void* const* out_rows, int64_t col, int64_t Dout) {
  const int64_t n = std::min<int64_t>(kPanel, Dout - col);
  for (int m = 0; m < M; ++m)
    for (int64_t l = 0; l < n; ++l) cpu::store(out_rows[m], dt, col + l, acc[m][l]);
}
#endif

template <int M>
inline void qtile(const QGeom& w, const float* const* a, const float* const* as, const uint8_t* panel, AccT& acc) {
  if (w.bits == 8) qtile_b<M, 8>(w, a, as, panel, acc);
  else qtile_b<M, 4>(w, a, as, panel, acc);
}
// Runs the M-specialised microkernel for 1 <= m <= kMaxM.
template <int M = kMaxM>
inline void qtile_dispatch(int m, const QGeom& w, const float* const* a, const float* const* as, const uint8_t* panel,
                           AccT& acc) {
  if constexpr (M >= 1) {
    if (m == M) return qtile<M>(w, a, as, panel, acc);
    return qtile_dispatch<M - 1>(m, w, a, as, panel, acc);
  }
}

// sums[gi] = sum of row over group gi, k ascending.
void group_sums(const float* row, int64_t Din, int64_t g, float* sums) {
  for (int64_t k0 = 0, gi = 0; k0 < Din; k0 += g, ++gi) {
    float s = 0.f;
    for (int64_t k = k0; k < std::min(Din, k0 + g); ++k) s += row[k];
    sums[gi] = s;
  }
}
// dst[0..Din) = fp32(src row) and its group sums.
void widen_row(const void* src, DType dt, int64_t Din, int64_t g, float* dst, float* sums) {
  for (int64_t k = 0; k < Din; ++k) dst[k] = cpu::load(src, dt, k);
  group_sums(dst, Din, g, sums);
}


void check_dt(const char* op, DType dt) {
  if (dt != DType::f32 && dt != DType::bf16) cpu::fail(op, "dtype must be f32 or bf16");
}

// The source row of lane l of panel q (-1: zero padding), as pack_weights_cpu lays them out.
inline int64_t lane_row(int64_t q, int l, int64_t Dout, bool gate_up) {
  if (gate_up) {
    const int64_t F = Dout / 2, f = q * kHalf + l % kHalf;
    return f < F ? (l < kHalf ? f : F + f) : -1;
  }
  return q * kPanel + l < Dout ? q * kPanel + l : -1;
}
inline int64_t n_panels(int64_t Dout, bool gate_up) {
  return gate_up ? (Dout / 2 + kHalf - 1) / kHalf : (Dout + kPanel - 1) / kPanel;
}

struct QWorkspace {
  int32_t *counts, *offsets, *order;
  float *xf, *xsum, *hf, *hsum;
};

}  // namespace

int64_t qpack_size_bytes(int64_t E, int64_t Dout, int64_t Din, const QFormat& f, bool gate_up) {
  return E * n_panels(Dout, gate_up) * geom(f, Din).panel_bytes;
}

void pack_quantized_cpu(const QPackParams& p) {
  check_format("pack_quantized_cpu", p.fmt, p.Din);
  if (p.E <= 0 || p.Dout <= 0 || (p.gate_up && p.Dout % 2))
    cpu::fail("pack_quantized_cpu", "bad sizes E=" + std::to_string(p.E) + " Dout=" + std::to_string(p.Dout) +
                                        (p.gate_up ? " (gate_up: Dout even)" : ""));
  const QGeom w = geom(p.fmt, p.Din);
  const int bits = w.bits, per = 32 / bits;
  const uint32_t mask = (1u << bits) - 1;
  const int64_t Dout = p.Dout, Din = p.Din, np = n_panels(Dout, p.gate_up), G = w.groups;
  const int64_t qw_rows = Din / per, qz_cols = (Dout * bits + 31) / 32;
  const int64_t kb = kPanel * bits / 8;
  const uint32_t sym_zero = 1u << (bits - 1);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t e = 0; e < p.E; ++e)
    for (int64_t q = 0; q < np; ++q) {
      const uint32_t* qw = reinterpret_cast<const uint32_t*>(p.qweight) + e * qw_rows * Dout;
      const uint16_t* sc = p.scales + e * G * Dout;
      const uint32_t* qz = p.qzeros ? reinterpret_cast<const uint32_t*>(p.qzeros) + e * G * qz_cols : nullptr;
      uint8_t* dst = static_cast<uint8_t*>(p.dst) + (e * np + q) * w.panel_bytes;
      int64_t rows[kPanel];
      for (int l = 0; l < kPanel; ++l) rows[l] = lane_row(q, l, Dout, p.gate_up);
      for (int64_t gi = 0; gi < G; ++gi) {
        const int64_t k0 = gi * w.g, len = std::min<int64_t>(w.g, Din - k0);
        std::memset(dst, 0, len * kb + kGroupMetaBytes);
        for (int64_t k = k0; k < k0 + len; ++k) {
          uint8_t* c = dst + (k - k0) * kb;
          for (int l = 0; l < kPanel; ++l) {
            if (rows[l] < 0) continue;
            const uint32_t v = (qw[(k / per) * Dout + rows[l]] >> ((k % per) * bits)) & mask;
            if (bits == 8) c[l] = uint8_t(v);
            else if (l < kHalf) c[l] |= uint8_t(v);
            else c[l - kHalf] |= uint8_t(v << 4);
          }
        }
        uint8_t* meta = dst + len * kb;
        for (int l = 0; l < kPanel; ++l) {
          if (rows[l] < 0) continue;  // scale 0, zero 0: the lane contributes exact zeros
          const int64_t n = rows[l];
          std::memcpy(meta + 2 * l, sc + gi * Dout + n, 2);
          meta[2 * kPanel + l] = uint8_t(
              p.sym ? sym_zero : (qz[gi * qz_cols + n / per] >> ((n % per) * bits)) & mask);
        }
        dst += len * kb + kGroupMetaBytes;
      }
    }
}

void dequantize_packed_cpu(const QDequantParams& p) {
  check_format("dequantize_packed_cpu", p.fmt, p.Din);
  check_dt("dequantize_packed_cpu", p.dtype);
  if (p.E <= 0 || p.Dout <= 0 || (p.gate_up && p.Dout % 2))
    cpu::fail("dequantize_packed_cpu", "bad sizes E=" + std::to_string(p.E) + " Dout=" + std::to_string(p.Dout));
  const QGeom w = geom(p.fmt, p.Din);
  const int64_t Dout = p.Dout, Din = p.Din, np = n_panels(Dout, p.gate_up), kb = kPanel * w.bits / 8;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t e = 0; e < p.E; ++e)
    for (int64_t q = 0; q < np; ++q) {
      const uint8_t* src = static_cast<const uint8_t*>(p.src) + (e * np + q) * w.panel_bytes;
      for (int64_t gi = 0; gi < w.groups; ++gi) {
        const int64_t k0 = gi * w.g, len = std::min<int64_t>(w.g, Din - k0);
        const uint8_t* meta = src + len * kb;
        for (int l = 0; l < kPanel; ++l) {
          const int64_t n = lane_row(q, l, Dout, p.gate_up);
          if (n < 0) continue;
          const float s = scale_f32(meta, l, w.scales_bf16);
          const int z = meta[2 * kPanel + l];
          for (int64_t k = k0; k < k0 + len; ++k)
            cpu::store(p.dst, p.dtype, (e * Dout + n) * Din + k, s * float(code_at(src + (k - k0) * kb, l, w.bits) - z));
        }
        src += len * kb + kGroupMetaBytes;
      }
    }
}

int64_t linear_q_workspace_bytes(int64_t T, int64_t Din, const QFormat& f) {
  return align64(T * row_stride(Din) * 4) + align64(T * geom(f, Din).groups * 4);
}

void linear_q_cpu(const QLinearParams& p) {
  check_dt("linear_q_cpu", p.dtype);
  check_format("linear_q_cpu", p.fmt, p.Din);
  if (p.T < 0 || p.Dout <= 0)
    cpu::fail("linear_q_cpu", "bad sizes T=" + std::to_string(p.T) + " Dout=" + std::to_string(p.Dout));
  const QGeom w = geom(p.fmt, p.Din);
  const DType dt = p.dtype;
  const int64_t T = p.T, Din = p.Din, Dout = p.Dout, xs = row_stride(Din), np = n_panels(Dout, false);
  float* xf = reinterpret_cast<float*>(p.workspace);
  float* xsum = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + align64(T * xs * 4));
  const char* x = static_cast<const char*>(p.x);
  char* y = static_cast<char*>(p.y);
  const uint8_t* wp = static_cast<const uint8_t*>(p.w);
  // Parallel from 64K multiply-adds, as linear_cpu.
  const bool parallel = np * kPanel * Din * T >= 4 * cpu::kParallelMinWork;
  cpu::parallel_ranges(T, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) widen_row(x + t * Din * esize(dt), dt, Din, w.g, xf + t * xs, xsum + t * w.groups);
  }, parallel);
  cpu::parallel_ranges(np, [&](int64_t q0, int64_t q1) {
    alignas(64) AccT acc;
    const float* a[kMaxM];
    const float* as[kMaxM];
    void* o[kMaxM];
    for (int64_t q = q0; q < q1; ++q)
      for (int64_t t0 = 0; t0 < T; t0 += kMaxM) {
        const int M = int(std::min<int64_t>(kMaxM, T - t0));
        for (int m = 0; m < M; ++m) {
          a[m] = xf + (t0 + m) * xs;
          as[m] = xsum + (t0 + m) * w.groups;
          o[m] = y + (t0 + m) * Dout * esize(dt);
        }
        qtile_dispatch(M, w, a, as, wp + q * w.panel_bytes, acc);
        epi_store(dt, acc, M, o, q * kPanel, Dout);
      }
  }, parallel);
}

int64_t expert_ffn_q_workspace_bytes(int64_t T, int64_t k_max, int64_t E, int64_t D, int64_t F,
                                     const QFormat& f13, const QFormat& f2) {
  const int64_t R = T * k_max;
  return align64(E * 4) + align64((E + 1) * 4) + align64(R * 4) + align64(T * row_stride(D) * 4) +
         align64(T * geom(f13, D).groups * 4) + align64(R * row_stride(h_cols(F)) * 4) +
         align64(R * geom(f2, F).groups * 4);
}

void expert_ffn_q_cpu(const QExpertFFNParams& p) {
  check_dt("expert_ffn_q_cpu", p.dtype);
  check_format("expert_ffn_q_cpu (w13)", p.fmt13, p.D);
  check_format("expert_ffn_q_cpu (w2)", p.fmt2, p.F);
  if (p.T < 0 || p.k_max < 0 || p.E <= 0)
    cpu::fail("expert_ffn_q_cpu", "bad sizes T=" + std::to_string(p.T) + " k_max=" + std::to_string(p.k_max) +
                                      " E=" + std::to_string(p.E));
  const DType dt = p.dtype;
  const int64_t R = int64_t(p.T) * p.k_max, D = p.D, F = p.F, E = p.E, T = p.T, bytes = esize(dt);
  const QGeom w13 = geom(p.fmt13, D), w2 = geom(p.fmt2, F);
  const int64_t np13 = n_panels(2 * F, true), np2 = n_panels(D, false);
  const int64_t xs = row_stride(D), hs = row_stride(h_cols(F));
  char* c = static_cast<char*>(p.workspace);
  QWorkspace ws;
  ws.counts = reinterpret_cast<int32_t*>(c), c += align64(E * 4);
  ws.offsets = reinterpret_cast<int32_t*>(c), c += align64((E + 1) * 4);
  ws.order = reinterpret_cast<int32_t*>(c), c += align64(R * 4);
  ws.xf = reinterpret_cast<float*>(c), c += align64(T * xs * 4);
  ws.xsum = reinterpret_cast<float*>(c), c += align64(T * w13.groups * 4);
  ws.hf = reinterpret_cast<float*>(c), c += align64(R * hs * 4);
  ws.hsum = reinterpret_cast<float*>(c);
  char* out = static_cast<char*>(p.expert_out);

  // 1. group slots by expert (align's counting sort, ascending slot order); zero the rows of sentinel slots
  cpu::group_by_expert(p.topk_ids, R, p.E, 1, ws.counts, ws.offsets, ws.order,
                       [&](int64_t s) { std::memset(out + s * D * bytes, 0, D * bytes); });
  const int64_t n_slots = ws.offsets[E];
  if (n_slots == 0) return;

  const char* x = static_cast<const char*>(p.x);
  const uint8_t* q13 = static_cast<const uint8_t*>(p.w13);
  const uint8_t* q2 = static_cast<const uint8_t*>(p.w2);
  int64_t active = 0;  // units (expert, panel) cut into chunks as in expert_ffn_cpu
  for (int32_t e = 0; e < p.E; ++e) active += ws.counts[e] > 0;
  // 2. activations to fp32 with their group sums
  cpu::parallel_ranges(T, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      widen_row(x + t * D * bytes, dt, D, w13.g, ws.xf + t * xs, ws.xsum + t * w13.groups);
  }, T * D >= cpu::kParallelMinWork);
  // 3. gate|up -> h (fp32 values rounded to dtype)
  const int64_t nc13 = cpu::chunk_count(active * np13);
  cpu::parallel_for(nc13, [&](int64_t c) {
    alignas(64) AccT acc;
    const float* a[kMaxM];
    const float* as[kMaxM];
    float* hrow[kMaxM];
    for_my_units(int(c), int(nc13), p.E, ws.counts, np13, [&](int32_t e, int64_t q) {
      const uint8_t* panel = q13 + (e * np13 + q) * w13.panel_bytes;
      for (int32_t i = ws.offsets[e]; i < ws.offsets[e + 1]; i += kMaxM) {
        const int M = std::min<int>(kMaxM, ws.offsets[e + 1] - i);
        for (int m = 0; m < M; ++m) {
          const int64_t t = ws.order[i + m] / p.k_max;
          a[m] = ws.xf + t * xs;
          as[m] = ws.xsum + t * w13.groups;
          hrow[m] = ws.hf + (i + m) * hs;
        }
        qtile_dispatch(M, w13, a, as, panel, acc);
        epi_silu(dt, acc, M, hrow, q * kHalf);
      }
    });
  });
  // 4. group sums of h
  cpu::parallel_ranges(n_slots, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) group_sums(ws.hf + i * hs, F, w2.g, ws.hsum + i * w2.groups);
  }, n_slots * F >= cpu::kParallelMinWork);
  // 5. down -> expert_out
  const int64_t nc2 = cpu::chunk_count(active * np2);
  cpu::parallel_for(nc2, [&](int64_t c) {
    alignas(64) AccT acc;
    const float* a[kMaxM];
    const float* as[kMaxM];
    void* o[kMaxM];
    for_my_units(int(c), int(nc2), p.E, ws.counts, np2, [&](int32_t e, int64_t q) {
      const uint8_t* panel = q2 + (e * np2 + q) * w2.panel_bytes;
      for (int32_t i = ws.offsets[e]; i < ws.offsets[e + 1]; i += kMaxM) {
        const int M = std::min<int>(kMaxM, ws.offsets[e + 1] - i);
        for (int m = 0; m < M; ++m) {
          a[m] = ws.hf + (i + m) * hs;
          as[m] = ws.hsum + (i + m) * w2.groups;
          o[m] = out + int64_t(ws.order[i + m]) * D * bytes;
        }
        qtile_dispatch(M, w2, a, as, panel, acc);
        epi_store(dt, acc, M, o, q * kPanel, D);
      }
    });
  });
}

}  // namespace moe

// ---- either kind of panel (either_panels.h) ----------------------------------------------------
namespace moe::cpu {
namespace {
void same_kind(const char* op, const QFormat& f13, const QFormat& f2) {
  if (quantized(f13) != quantized(f2))
    fail(op, "w13 (bits=" + std::to_string(f13.bits) + ") and w2 (bits=" + std::to_string(f2.bits) +
                 ") must both be quantized or both bf16/fp32 panels");
}
}  // namespace

void check_either(const char* op, const QFormat& f, int64_t Din, const QFormat* pair) {
  if (pair) same_kind(op, f, *pair);
  if (quantized(f)) moe::check_format(op, f, Din);
}

int64_t either_linear_workspace_bytes(int64_t T, int64_t Din, const QFormat& f) {
  return quantized(f) ? linear_q_workspace_bytes(T, Din, f) : 0;
}
void either_linear(const LinearParams& p, const QFormat& f, void* workspace) {
  if (!quantized(f)) return linear_cpu(p);
  need("either_linear", workspace, "workspace (quantized weight)");
  linear_q_cpu(QLinearParams{p.x, p.w, p.y, workspace, f, p.dtype, p.T, p.Dout, p.Din});
}

int64_t either_expert_ffn_workspace_bytes(DType dt, int64_t T, int64_t k_max, int64_t E, int64_t D, int64_t F,
                                          const QFormat& f13, const QFormat& f2) {
  same_kind("either_expert_ffn_workspace_bytes", f13, f2);
  return quantized(f13) ? expert_ffn_q_workspace_bytes(T, k_max, E, D, F, f13, f2)
                        : expert_ffn_workspace_bytes(dt, T, k_max, E, F);
}
void either_expert_ffn(const ExpertFFNParams& p, const QFormat& f13, const QFormat& f2) {
  same_kind("either_expert_ffn", f13, f2);
  if (!quantized(f13)) return expert_ffn_cpu(p);
  expert_ffn_q_cpu(QExpertFFNParams{p.x, p.w13, p.w2, p.topk_ids, p.expert_out, p.workspace, f13, f2, p.dtype,
                                    p.T, p.k_max, p.D, p.F, p.E});
}
}  // namespace moe::cpu
