// expert_ffn (CPU): the fused routed-expert FFN, plus the packed dense mat-vec it is built on.
//
// Formula: expert_out[t,j,:] = W2_e (SiLU(W1_e x_t) * (W3_e x_t)), e = topk_ids[t,j], fp32
//   accumulation; unweighted (the hook_expert_out tap); sentinel slots (id < 0) get zero rows.
//   bf16: the SiLU*up intermediate is rounded to bf16 (as the reference does), fp32 stays fp32.
// Algorithm: one microkernel serves decode and prefill. Weights are pre-packed into panels of
//   32 output rows (ops.h "Packed weights"); a tile of M <= kMaxM token rows times one panel
//   keeps M x 2 zmm accumulators and per k-pair does 2 panel loads + M broadcasts of the
//   token's (x[k], x[k+1]) + 2M vdpbf16ps (bf16) or 2M FMAs per k (fp32). No horizontal sums,
//   no activation copies: token rows are read in place through their slot's pointer.
//   1. group slots by expert (cpu::group_by_expert, align's counting sort; ascending slot order);
//   2. gate|up phase: units (expert, panel) over the chosen experts only, cut by cost (tokens +
//      panel streaming) into the chunks of one pool job (pool.h), each panel read once for all
//      the expert's tokens, epilogue h = SiLU(g)*u (vectorised exp) into the workspace;
//   3. a second job once the first is complete: units (expert, down panel), A = h rows, stores
//      into expert_out.
//   Each output element has one fixed summation order, so neither the thread count nor which
//   thread runs a chunk changes results.
// Traffic (decode, bf16): sum over distinct chosen experts of 3*D*F*2 B, read once per call;
//   + T*k_max*(D + 2F)*2 B of activations. Prefill: the same weight bytes (all experts once)
//   and 2*T*k_max*3*D*F FLOP. The AVX-512 microkernel runs level with oneDNN's bf16 GEMM, and
//   the routed experts of a prefill slightly beat torch's single dense GEMM pair of the same
//   FLOPs (bench/throughput.py "routed experts"; figures in bench/README.md).
// ISA (simd.h): AVX-512 (bf16 via avx512_bf16, fp32 FMA; tiles of up to 12 rows); AVX2+FMA
//   (ymm, tiles of up to 2 rows, bf16 widened to fp32 by shift/and; several times torch's bf16
//   GEMM, which has no fast path there: bench/README.md); else portable loops.
// Limits: any T, D, F, E (panels zero-pad Dout to 32 and Din to even). Reference:
//   src/moe_engine/ops/expert_ffn.py (expert_ffn_ref); test: tests/test_ops.py.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "common.h"
#include "pool.h"
#include "simd.h"

namespace moe {
namespace {

using cpu::align64;
using cpu::esize;
using cpu::for_my_units;
using cpu::kHalf;
using cpu::kPanel;

#if MOE_AVX512
using cpu::exp512;
constexpr int kMaxM = 12;  // 24 accumulators + 2 panel vectors + 1 broadcast <= 32 zmm
#elif MOE_AVX2
constexpr int kMaxM = 2;  // 8 accumulators + 4 broadcasts + 1 weight vector (see tile below)
using AccT = float[kMaxM][kPanel];
#else
constexpr int kMaxM = 4;
using AccT = float[kMaxM][kPanel];
#endif

// Token rows whose stride is a multiple of 4 KiB (D = 2048 bf16: the 16B model's hidden size)
// share their L1 set at every k; a tile of more rows than the L1's 8 ways then evicts its own
// rows between broadcasts (measured: bench/README.md, kAliasM).
// Such strides get tiles of at most kAliasM rows. A row's result does not depend on its tile.
constexpr int kAliasM = kMaxM < 6 ? kMaxM : 6;
inline int tile_rows(int64_t row_bytes) { return row_bytes % 4096 == 0 ? kAliasM : kMaxM; }

inline int64_t k_step(DType dt) { return dt == DType::bf16 ? 2 : 1; }
inline int64_t panels(int64_t Dout) { return (Dout + kPanel - 1) / kPanel; }
// Elements (bf16 or f32) per panel for reduction length Din.
inline int64_t panel_elems(DType dt, int64_t Din) {
  return dt == DType::bf16 ? (Din + 1) / 2 * kPanel * 2 : Din * kPanel;
}
// Row stride of the SiLU*up intermediate h: F rounded up to whole half-panels, so the down
// kernel may read k pairs up to round_up(F, 2) and every padded column is an exact 0.
inline int64_t h_stride(int64_t F) { return (F + kHalf - 1) / kHalf * kHalf; }

// ---- microkernel: acc[m][0..1] = 32 outputs of one panel for M token rows --------------
// a[m] points at token m's Din-vector; b at the panel.
#if MOE_AVX512
template <int M>
inline void tile_bf16(const uint16_t* const* a, int64_t Din, const uint16_t* b, __m512 (&acc)[kMaxM][2]) {
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const int64_t pairs = Din / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kp * 64);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kp * 64 + 32);
#pragma GCC unroll 12
    for (int m = 0; m < M; ++m) {
      int32_t pair;
      std::memcpy(&pair, a[m] + 2 * kp, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], av, b0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], av, b1);
    }
  }
  if (Din & 1) {  // last k alone: its partner is the panel's zero padding, the token's is 0
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + pairs * 64);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + pairs * 64 + 32);
    for (int m = 0; m < M; ++m) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int32_t(a[m][Din - 1]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], av, b0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], av, b1);
    }
  }
}

template <int M>
inline void tile_f32(const float* const* a, int64_t Din, const float* b, __m512 (&acc)[kMaxM][2]) {
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Din; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * 32), b1 = _mm512_loadu_ps(b + k * 32 + 16);
#pragma GCC unroll 12
    for (int m = 0; m < M; ++m) {
      const __m512 av = _mm512_set1_ps(a[m][k]);
      acc[m][0] = _mm512_fmadd_ps(av, b0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(av, b1, acc[m][1]);
    }
  }
}

inline __m512 silu_mul(__m512 g, __m512 u) {
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u);
}

// Round-to-nearest-even fp32 -> bf16 for 16 lanes (vcvtneps2bf16; NaN stays NaN).
inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

inline void store16(void* dst, DType dt, __m512 v, __mmask16 mask) {
  if (dt == DType::f32) _mm512_mask_storeu_ps(dst, mask, v);
  else _mm256_mask_storeu_epi16(dst, mask, to_bf16(v));
}

template <int M>
inline void tile(DType dt, const void* const* a, int64_t Din, const void* b, __m512 (&acc)[kMaxM][2]) {
  if (dt == DType::bf16)
    tile_bf16<M>(reinterpret_cast<const uint16_t* const*>(a), Din, static_cast<const uint16_t*>(b), acc);
  else
    tile_f32<M>(reinterpret_cast<const float* const*>(a), Din, static_cast<const float*>(b), acc);
}
using AccT = __m512[kMaxM][2];

// Epilogues consume a tile's accumulators.
inline void epi_silu(DType dt, const AccT& acc, int M, void* const* h_rows, int64_t col) {
  for (int m = 0; m < M; ++m)
    store16(static_cast<char*>(h_rows[m]) + col * esize(dt), dt, silu_mul(acc[m][0], acc[m][1]), 0xffff);
}
inline void epi_store(DType dt, const AccT& acc, int M, void* const* out_rows, int64_t col, int64_t Dout) {
  const int64_t n = std::min<int64_t>(kPanel, Dout - col);
  const __mmask16 m0 = n >= 16 ? 0xffff : __mmask16((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? 0xffff : n <= 16 ? 0 : __mmask16((1u << (n - 16)) - 1);
  for (int m = 0; m < M; ++m) {
    char* row = static_cast<char*>(out_rows[m]) + col * esize(dt);
    store16(row, dt, acc[m][0], m0);
    store16(row + 16 * esize(dt), dt, acc[m][1], m1);
  }
}

#elif MOE_AVX2
// A tile of M <= 2 token rows runs the whole 32-lane panel in one pass: 4M accumulators, the
// rows' 2M broadcasts of a k pair, one weight vector at a time (<= 13 of the 16 ymm), so each
// weight line is streamed once. (Tiles of 4 rows in two half-panel passes, which fit 16 ymm
// the other way round, ran the 16B experts slower (bench/README.md): the half passes read
// alternate 64-byte lines.) Sums per pass are added into acc in memory.
// bf16 weights: a k-pair of 8 lanes is one 32-byte load; the even k is the low half of each
// 32-bit lane (<< 16 makes it fp32), the odd k the high half (& 0xffff0000). A one-row tile
// broadcasts its token's k pair the same way, in place; two-row tiles widen their rows once
// per tile into a stack buffer, kChunk k at a time. Each accumulator sees the same FMAs in
// the same order in every variant, so a row's bits never depend on its tile.
constexpr int kChunk = 1024;  // k per widened chunk (even)
constexpr int kG = 4;         // 8-lane vectors per panel

// acc[m] += the panel's k in [0, kc) against x0/x1 = the broadcasts of k pair kp for row m.
template <int M, class Bcast>
inline void pass_bf16(int64_t kc, const uint16_t* b, AccT& acc, Bcast bcast) {
  __m256 r[M][kG];
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < kG; ++g) r[m][g] = _mm256_setzero_ps();
  const __m256i odd = _mm256_set1_epi32(int32_t(0xffff0000u));
  for (int64_t k = 0; k < kc; k += 2) {
    const uint16_t* bp = b + k * kPanel;
    __m256 x0[M], x1[M];
    for (int m = 0; m < M; ++m) bcast(m, k, x0[m], x1[m]);
#pragma GCC unroll 4
    for (int g = 0; g < kG; ++g) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 16 * g));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(w, odd));
      for (int m = 0; m < M; ++m) {
        r[m][g] = _mm256_fmadd_ps(x0[m], we, r[m][g]);
        r[m][g] = _mm256_fmadd_ps(x1[m], wo, r[m][g]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < kG; ++g) {
      float* dst = acc[m] + 8 * g;
      _mm256_store_ps(dst, _mm256_add_ps(_mm256_load_ps(dst), r[m][g]));
    }
}

template <int M>
inline void tile_f32(const float* const* a, int64_t Din, const float* b, AccT& acc) {
  __m256 r[M][kG];
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < kG; ++g) r[m][g] = _mm256_setzero_ps();
  for (int64_t k = 0; k < Din; ++k) {
    __m256 w[kG];
    for (int g = 0; g < kG; ++g) w[g] = _mm256_loadu_ps(b + k * kPanel + 8 * g);
    for (int m = 0; m < M; ++m) {
      const __m256 av = _mm256_broadcast_ss(a[m] + k);
      for (int g = 0; g < kG; ++g) r[m][g] = _mm256_fmadd_ps(av, w[g], r[m][g]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < kG; ++g) _mm256_store_ps(acc[m] + 8 * g, r[m][g]);
}

template <int M>
inline void tile(DType dt, const void* const* a, int64_t Din, const void* b, AccT& acc) {
  if (dt == DType::f32)
    return tile_f32<M>(reinterpret_cast<const float* const*>(a), Din, static_cast<const float*>(b), acc);
  for (int m = 0; m < M; ++m)
    for (int l = 0; l < kPanel; ++l) acc[m][l] = 0.f;
  const uint16_t* const* ab = reinterpret_cast<const uint16_t* const*>(a);
  const __m256i odd = _mm256_set1_epi32(int32_t(0xffff0000u));
  alignas(32) float buf[M][kChunk];
  for (int64_t k0 = 0; k0 < Din; k0 += kChunk) {
    const int64_t kc = std::min<int64_t>(kChunk, Din - k0), kc2 = (kc + 1) & ~int64_t(1);
    const uint16_t* bk = static_cast<const uint16_t*>(b) + k0 * kPanel;
    if constexpr (M == 1) {  // the token's (k, k+1) as one 32-bit broadcast, split like a weight pair
      const uint16_t* row = ab[0] + k0;
      pass_bf16<1>(kc2, bk, acc, [&](int, int64_t k, __m256& x0, __m256& x1) {
        if (k + 2 <= kc) {
          int32_t pair;
          std::memcpy(&pair, row + k, 4);
          const __m256i pv = _mm256_set1_epi32(pair);
          x0 = _mm256_castsi256_ps(_mm256_slli_epi32(pv, 16));
          x1 = _mm256_castsi256_ps(_mm256_and_si256(pv, odd));
        } else {  // odd Din: the last k alone, its partner the panel's zero padding
          x0 = _mm256_set1_ps(cpu::bf16_to_f32(row[k]));
          x1 = _mm256_setzero_ps();
        }
      });
    } else {
      for (int m = 0; m < M; ++m) {
        const uint16_t* src = ab[m] + k0;
        int64_t k = 0;
        for (; k + 8 <= kc; k += 8) cpu::store8(buf[m] + k, cpu::load8(src + k));
        for (; k < kc; ++k) buf[m][k] = cpu::bf16_to_f32(src[k]);
        if (kc2 > kc) buf[m][kc] = 0.f;  // odd Din: the panel's padding partner
      }
      pass_bf16<M>(kc2, bk, acc, [&](int m, int64_t k, __m256& x0, __m256& x1) {
        x0 = _mm256_broadcast_ss(buf[m] + k);
        x1 = _mm256_broadcast_ss(buf[m] + k + 1);
      });
    }
  }
}

template <typename X>
inline void store_row8(void* row, int64_t col, __m256 v) {
  cpu::store8(static_cast<X*>(row) + col, v);
}
inline void epi_silu(DType dt, const AccT& acc, int M, void* const* h_rows, int64_t col) {
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < kHalf; j += 8) {
      const __m256 g = _mm256_load_ps(acc[m] + j), u = _mm256_load_ps(acc[m] + kHalf + j);
      const __m256 e = cpu::exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const __m256 h = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
      if (dt == DType::f32) store_row8<float>(h_rows[m], col + j, h);
      else store_row8<uint16_t>(h_rows[m], col + j, h);
    }
}
inline void epi_store(DType dt, const AccT& acc, int M, void* const* out_rows, int64_t col, int64_t Dout) {
  const int64_t n = std::min<int64_t>(kPanel, Dout - col), n8 = n / 8 * 8;
  for (int m = 0; m < M; ++m) {
    for (int64_t l = 0; l < n8; l += 8) {
      const __m256 v = _mm256_load_ps(acc[m] + l);
      if (dt == DType::f32) store_row8<float>(out_rows[m], col + l, v);
      else store_row8<uint16_t>(out_rows[m], col + l, v);
    }
    for (int64_t l = n8; l < n; ++l) cpu::store(out_rows[m], dt, col + l, acc[m][l]);
  }
}

#else  // portable: plain loops over 32 lanes
template <int M>
inline void tile(DType dt, const void* const* a, int64_t Din, const void* b, AccT& acc) {
  for (int m = 0; m < M; ++m)
    for (int l = 0; l < kPanel; ++l) acc[m][l] = 0.f;
  if (dt == DType::bf16) {
    const uint16_t* const* ab = reinterpret_cast<const uint16_t* const*>(a);
    const uint16_t* bb = static_cast<const uint16_t*>(b);
    for (int64_t k = 0; k < Din; ++k) {
      const uint16_t* bp = bb + (k / 2) * 64 + (k & 1);
      float bw[kPanel];
      for (int l = 0; l < kPanel; ++l) bw[l] = cpu::bf16_to_f32(bp[2 * l]);
      for (int m = 0; m < M; ++m) {
        const float av = cpu::bf16_to_f32(ab[m][k]);
        for (int l = 0; l < kPanel; ++l) acc[m][l] += av * bw[l];
      }
    }
  } else {
    const float* const* af = reinterpret_cast<const float* const*>(a);
    const float* bf = static_cast<const float*>(b);
    for (int64_t k = 0; k < Din; ++k)
      for (int m = 0; m < M; ++m) {
        const float av = af[m][k];
        for (int l = 0; l < kPanel; ++l) acc[m][l] += av * bf[k * kPanel + l];
      }
  }
}
inline void epi_silu(DType dt, const AccT& acc, int M, void* const* h_rows, int64_t col) {
  for (int m = 0; m < M; ++m)
    for (int l = 0; l < kHalf; ++l) {
      const float g = acc[m][l], u = acc[m][kHalf + l];
      cpu::store(h_rows[m], dt, col + l, g / (1.f + std::exp(-g)) * u);
    }
}
inline void epi_store(DType dt, const AccT& acc, int M, void* const* out_rows, int64_t col, int64_t Dout) {
  const int64_t n = std::min<int64_t>(kPanel, Dout - col);
  for (int m = 0; m < M; ++m)
    for (int64_t l = 0; l < n; ++l) cpu::store(out_rows[m], dt, col + l, acc[m][l]);
}
#endif

// Runs the M-specialised microkernel for 1 <= M <= kMaxM.
template <int M = kMaxM>
inline void tile_dispatch(int m, DType dt, const void* const* a, int64_t Din, const void* b, AccT& acc) {
  if constexpr (M >= 1) {
    if (m == M) return tile<M>(dt, a, Din, b, acc);
    return tile_dispatch<M - 1>(m, dt, a, Din, b, acc);
  }
}


struct Workspace {
  int32_t* counts;   // [E]
  int32_t* offsets;  // [E+1]
  int32_t* order;    // [R] slot indices grouped by expert
  char* h;           // [R, h_stride(F)] dtype
};
Workspace carve(void* ws, DType dt, int64_t R, int64_t E, int64_t F) {
  char* p = static_cast<char*>(ws);
  Workspace w;
  w.counts = reinterpret_cast<int32_t*>(p);
  p += align64(E * 4);
  w.offsets = reinterpret_cast<int32_t*>(p);
  p += align64((E + 1) * 4);
  w.order = reinterpret_cast<int32_t*>(p);
  p += align64(R * 4);
  w.h = p;
  return w;
}

void check_dt(const char* op, DType dt) {
  if (dt != DType::f32 && dt != DType::bf16) cpu::fail(op, "dtype must be f32 or bf16");
}

}  // namespace

int64_t pack_size_bytes(DType dtype, int64_t E, int64_t Dout, int64_t Din, bool gate_up) {
  const int64_t rows = gate_up ? (Dout / 2 + kHalf - 1) / kHalf * kPanel : Dout;
  return E * panels(rows) * panel_elems(dtype, Din) * esize(dtype);
}

namespace {
// Panel q of one expert: lane l of k-group g (g = k / ks) at dst[(g*kPanel + l)*ks + k%ks].
template <typename W>
void pack_panel(const W* src, W* dst, int64_t Din, int64_t ks, const int64_t (&rows)[kPanel]) {
  const int64_t groups = (Din + ks - 1) / ks;
  std::memset(dst, 0, groups * kPanel * ks * sizeof(W));
  for (int64_t l = 0; l < kPanel; ++l) {
    if (rows[l] < 0) continue;
    const W* row = src + rows[l] * Din;
    W* d = dst + l * ks;
    for (int64_t k = 0; k < Din; ++k) d[(k / ks) * kPanel * ks + k % ks] = row[k];
  }
}
}  // namespace

void pack_weights_cpu(const PackParams& p) {
  check_dt("pack_weights_cpu", p.dtype);
  if (p.E <= 0 || p.Dout <= 0 || p.Din <= 0 || (p.gate_up && p.Dout % 2))
    cpu::fail("pack_weights_cpu", "bad sizes E=" + std::to_string(p.E) + " Dout=" + std::to_string(p.Dout) +
                                      " Din=" + std::to_string(p.Din) + (p.gate_up ? " (gate_up: Dout even)" : ""));
  cpu::need("pack_weights_cpu", p.src, "src");
  cpu::need("pack_weights_cpu", p.dst, "dst");
  const int64_t F = p.Dout / 2, Din = p.Din, ks = k_step(p.dtype), pe = panel_elems(p.dtype, Din);
  const int64_t np = p.gate_up ? (F + kHalf - 1) / kHalf : panels(p.Dout);
  const int64_t bytes = esize(p.dtype);
#pragma omp parallel for collapse(2) schedule(static) num_threads(cpu::max_threads())
  for (int64_t e = 0; e < p.E; ++e)
    for (int64_t q = 0; q < np; ++q) {
      int64_t rows[kPanel];  // source row of each lane, -1 = zero padding
      for (int64_t l = 0; l < kPanel; ++l) {
        if (p.gate_up) {
          const int64_t f = q * kHalf + l % kHalf;
          rows[l] = f < F ? (l < kHalf ? f : F + f) : -1;
        } else {
          rows[l] = q * kPanel + l < p.Dout ? q * kPanel + l : -1;
        }
      }
      const char* src = static_cast<const char*>(p.src) + e * p.Dout * Din * bytes;
      char* dst = static_cast<char*>(p.dst) + (e * np + q) * pe * bytes;
      if (p.dtype == DType::bf16)
        pack_panel(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), Din, ks, rows);
      else
        pack_panel(reinterpret_cast<const float*>(src), reinterpret_cast<float*>(dst), Din, ks, rows);
    }
}

int64_t expert_ffn_workspace_bytes(DType dtype, int64_t T, int64_t k_max, int64_t E, int64_t F) {
  const int64_t R = T * k_max;
  return align64(E * 4) + align64((E + 1) * 4) + align64(R * 4) + R * h_stride(F) * esize(dtype);
}

void expert_ffn_cpu(const ExpertFFNParams& p) {
  check_dt("expert_ffn_cpu", p.dtype);
  if (p.T < 0 || p.k_max < 0 || p.D <= 0 || p.F <= 0 || p.E <= 0)
    cpu::fail("expert_ffn_cpu", "bad sizes T=" + std::to_string(p.T) + " k_max=" + std::to_string(p.k_max) +
                                    " D=" + std::to_string(p.D) + " F=" + std::to_string(p.F) +
                                    " E=" + std::to_string(p.E));
  if (int64_t(p.T) * p.k_max > 0) {
    cpu::need("expert_ffn_cpu", p.x, "x");
    cpu::need("expert_ffn_cpu", p.w13, "w13");
    cpu::need("expert_ffn_cpu", p.w2, "w2");
    cpu::need("expert_ffn_cpu", p.topk_ids, "topk_ids");
    cpu::need("expert_ffn_cpu", p.expert_out, "expert_out");
    cpu::need("expert_ffn_cpu", p.workspace, "workspace");
  }
  const DType dt = p.dtype;
  const int64_t R = int64_t(p.T) * p.k_max, D = p.D, F = p.F, E = p.E, bytes = esize(dt);
  const int64_t hs = h_stride(F);
  const int64_t np13 = (F + kHalf - 1) / kHalf, np2 = panels(D);
  const int64_t pe13 = panel_elems(dt, D), pe2 = panel_elems(dt, F);
  const Workspace ws = carve(p.workspace, dt, R, E, F);
  char* out = static_cast<char*>(p.expert_out);

  // 1. group slots by expert (align's counting sort, no padding); zero the rows of sentinel slots
  cpu::group_by_expert(p.topk_ids, R, p.E, 1, ws.counts, ws.offsets, ws.order,
                       [&](int64_t s) { std::memset(out + s * D * bytes, 0, D * bytes); });
  if (ws.offsets[E] == 0) return;

  const char* x = static_cast<const char*>(p.x);
  const char* w13 = static_cast<const char*>(p.w13);
  const char* w2 = static_cast<const char*>(p.w2);
  // units (expert, panel) of the chosen experts, cut by cost into chunks (cpu::for_my_units with
  // chunk c of nc in place of a thread); every unit writes its own output rows
  int64_t active = 0;
  for (int32_t e = 0; e < p.E; ++e) active += ws.counts[e] > 0;
  const int mg = tile_rows(D * bytes), md = tile_rows(hs * bytes);
  // 2. gate|up -> h
  const int64_t nc13 = cpu::chunk_count(active * np13);
  cpu::parallel_for(nc13, [&](int64_t c) {
    alignas(64) AccT acc;
    const void* a[kMaxM];
    void* o[kMaxM];
    for_my_units(int(c), int(nc13), p.E, ws.counts, np13, [&](int32_t e, int64_t q) {
      const char* panel = w13 + ((e * np13 + q) * pe13) * bytes;
      for (int32_t i = ws.offsets[e]; i < ws.offsets[e + 1]; i += mg) {
        const int M = std::min<int>(mg, ws.offsets[e + 1] - i);
        for (int m = 0; m < M; ++m) {
          a[m] = x + (ws.order[i + m] / p.k_max) * D * bytes;
          o[m] = ws.h + (i + m) * hs * bytes;
        }
        tile_dispatch(M, dt, a, D, panel, acc);
        epi_silu(dt, acc, M, o, q * kHalf);
      }
    });
  });
  // 3. down -> expert_out (the job above is complete: every h row is written)
  const int64_t nc2 = cpu::chunk_count(active * np2);
  cpu::parallel_for(nc2, [&](int64_t c) {
    alignas(64) AccT acc;
    const void* a[kMaxM];
    void* o[kMaxM];
    for_my_units(int(c), int(nc2), p.E, ws.counts, np2, [&](int32_t e, int64_t q) {
      const char* panel = w2 + ((e * np2 + q) * pe2) * bytes;
      for (int32_t i = ws.offsets[e]; i < ws.offsets[e + 1]; i += md) {
        const int M = std::min<int>(md, ws.offsets[e + 1] - i);
        for (int m = 0; m < M; ++m) {
          a[m] = ws.h + (i + m) * hs * bytes;
          o[m] = out + int64_t(ws.order[i + m]) * D * bytes;
        }
        tile_dispatch(M, dt, a, F, panel, acc);
        epi_store(dt, acc, M, o, q * kPanel, D);
      }
    });
  });
}

void linear_cpu(const LinearParams& p) {
  check_dt("linear_cpu", p.dtype);
  if (p.T < 0 || p.Dout <= 0 || p.Din <= 0)
    cpu::fail("linear_cpu", "bad sizes T=" + std::to_string(p.T) + " Dout=" + std::to_string(p.Dout) +
                                " Din=" + std::to_string(p.Din));
  if (p.T > 0) {
    cpu::need("linear_cpu", p.x, "x");
    cpu::need("linear_cpu", p.w, "w");
    cpu::need("linear_cpu", p.y, "y");
  }
  const DType dt = p.dtype;
  const int64_t bytes = esize(dt), np = panels(p.Dout), pe = panel_elems(dt, p.Din);
  const int64_t mr = tile_rows(p.Din * bytes), mt = (p.T + mr - 1) / mr;
  const char* x = static_cast<const char*>(p.x);
  char* y = static_cast<char*>(p.y);
  // Panel-major units so each chunk streams a contiguous range of the weight; token tiles
  // inner, so a panel is reused from L1/L2 across tiles. Parallel from 64K multiply-adds (a
  // 128 KB bf16 mat-vec): one thread streams a weight at well under the machine's bandwidth,
  // so a decode step's o projection (512 x 512) is faster split than serial (the router,
  // 64 x 512, is not).
  cpu::parallel_ranges(np, [&](int64_t q0, int64_t q1) {
    alignas(64) AccT acc;
    const void* a[kMaxM];
    void* o[kMaxM];
    for (int64_t q = q0; q < q1; ++q)
      for (int64_t i = 0; i < mt; ++i) {
        const int M = int(std::min<int64_t>(mr, p.T - i * mr));
        for (int m = 0; m < M; ++m) {
          a[m] = x + (i * mr + m) * p.Din * bytes;
          o[m] = y + (i * mr + m) * p.Dout * bytes;
        }
        tile_dispatch(M, dt, a, p.Din, static_cast<const char*>(p.w) + q * pe * bytes, acc);
        epi_store(dt, acc, M, o, q * kPanel, p.Dout);
      }
  }, np * kPanel * p.Din * p.T >= 4 * cpu::kParallelMinWork);
}

}  // namespace moe
