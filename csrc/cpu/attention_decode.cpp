// attention_decode (CPU): one query per sequence against its KV cache, for the decode step.
//
// Formula: out[b,h] = sum_s p_s v[b,g,s],  p = softmax_s(scale * q[b,h].k[b,g,s]) over the keys
//   s < Tkv that are real (valid[b,s]) or the query's own column Tkv-1; g = h / (H/Hkv). fp32 math.
// Algorithm: one (b, h) per iteration across threads; pass 1 scores (a dot per key), pass 2
//   exp and sum, pass 3 the weighted sum of values. Built three ways (simd.h): AVX-512 for
//   hd 64/128/256, AVX2 for hd % 8 == 0, portable loops for the rest.
// Traffic: 2*B*Hkv*Tkv*hd*bytes (the cache, once per query head group) -- the floor for decode
//   attention; PyTorch's CPU SDPA spends ~10x that at decode sizes.
// Reference: torch SDPA in src/moe_engine/model.py (Model._attention); test: tests/test_ops.py.
#include <algorithm>
#include <cmath>

#include "common.h"
#include "either_panels.h"
#include "pool.h"
#include "simd.h"

namespace moe {
namespace {

constexpr int kLanes = 16;

// sc[s] = dot(s) for the keys the query may see (real, or its own column Tkv-1), -inf for the
// rest; returns the max score.
template <class Dot>
inline float score_keys(const uint8_t* valid, int64_t Tkv, float* sc, Dot dot) {
  float m = -INFINITY;
  for (int64_t s = 0; s < Tkv; ++s) {
    sc[s] = valid[s] || s == Tkv - 1 ? dot(s) : -INFINITY;
    m = std::max(m, sc[s]);
  }
  return m;
}

// One query head per iteration, across threads: fn(bh, its query row, the key and value cache
// rows [Tkv_cap, hd] of its group g = h / (H/Hkv), its sequence's valid row, its score row).
template <typename X, class Fn>
void for_each_head(const AttnDecodeParams& p, Fn fn) {
  const int64_t B = p.B, H = p.H, Tkv = p.Tkv, hd = p.hd, group = p.H / p.Hkv;
  const X* q = static_cast<const X*>(p.q);
  const X* kc = static_cast<const X*>(p.k_cache);
  const X* vc = static_cast<const X*>(p.v_cache);
  cpu::parallel_for(B * H, [&](int64_t bh) {  // one head per chunk: its output is its own
    const int64_t b = bh / H, g = bh % H / group, cache = (b * p.Hkv + g) * int64_t(p.Tkv_cap) * hd;
    fn(bh, q + bh * hd, kc + cache, vc + cache, p.valid + b * int64_t(p.valid_stride), p.workspace + bh * Tkv);
  }, B * H * Tkv * hd >= cpu::kParallelMinWork);
}

template <typename X>
void attn_impl(const AttnDecodeParams& p) {
  const int64_t hd = p.hd, Tkv = p.Tkv;
  X* out = static_cast<X*>(p.out);
  for_each_head<X>(p, [&](int64_t bh, const X* qr, const X* kb, const X* vb, const uint8_t* valid, float* sc) {
    float qf[1024];
    for (int64_t d = 0; d < hd; ++d) qf[d] = cpu::load(qr, d) * p.scale;
    const float m = score_keys(valid, Tkv, sc, [&](int64_t s) {
      const X* kr = kb + s * hd;
      // kLanes independent partial sums in a fixed order: the compiler vectorises this (a
      // single running sum is a serial FMA chain it may not reorder)
      float part[kLanes] = {};
      int64_t d = 0;
      for (; d + kLanes <= hd; d += kLanes)
        for (int l = 0; l < kLanes; ++l) part[l] += qf[d + l] * cpu::load(kr, d + l);
      for (; d < hd; ++d) part[d % kLanes] += qf[d] * cpu::load(kr, d);
      float acc = 0.f;
      for (int l = 0; l < kLanes; ++l) acc += part[l];
      return acc;
    });
    float sum = 0.f;
    for (int64_t s = 0; s < Tkv; ++s) sum += (sc[s] = sc[s] == -INFINITY ? 0.f : std::exp(sc[s] - m));
    float acc[1024];
    std::fill(acc, acc + hd, 0.f);
    for (int64_t s = 0; s < Tkv; ++s) {
      const float w = sc[s];
      if (w == 0.f) continue;
      const X* vr = vb + s * hd;
      for (int64_t d = 0; d < hd; ++d) acc[d] += w * cpu::load(vr, d);
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < hd; ++d) cpu::store(out, p.dtype, bh * hd + d, acc[d] * inv);
  });
}

#if MOE_AVX512
// The same three passes with zmm registers, for hd = 16 * NC: a key's dot product is NC FMAs
// into one accumulator (lane l sums d = l mod 16, as the portable loop) and one reduction;
// exp 16 scores at a time; the value pass keeps the NC output vectors in registers.
template <typename X, int NC>
void attn_avx512(const AttnDecodeParams& p) {
  constexpr int64_t hd = 16 * NC;  // == p.hd (attn_vector dispatches on it)
  const int64_t Tkv = p.Tkv;
  for_each_head<X>(p, [&](int64_t bh, const X* qr, const X* kb, const X* vb, const uint8_t* valid, float* sc) {
    __m512 qv[NC];
    for (int c = 0; c < NC; ++c) qv[c] = _mm512_mul_ps(cpu::load16(qr + 16 * c), _mm512_set1_ps(p.scale));
    const float m = score_keys(valid, Tkv, sc, [&](int64_t s) {
      const X* kr = kb + s * hd;
      __m512 acc = _mm512_mul_ps(qv[0], cpu::load16(kr));
      for (int c = 1; c < NC; ++c) acc = _mm512_fmadd_ps(qv[c], cpu::load16(kr + 16 * c), acc);
      return _mm512_reduce_add_ps(acc);
    });
    // masked scores are -inf: exp gives 0 (exp512 clamps, so zero them by mask)
    __m512 vsum = _mm512_setzero_ps();
    const __m512 vm = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t s = 0; s < Tkv; s += 16) {
      const __mmask16 lanes = Tkv - s >= 16 ? __mmask16(0xffff) : __mmask16((1u << (Tkv - s)) - 1);
      const __m512 x = _mm512_mask_loadu_ps(ninf, lanes, sc + s);
      const __mmask16 live = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(live, cpu::exp512(_mm512_sub_ps(x, vm)));
      _mm512_mask_storeu_ps(sc + s, lanes, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    const float inv = 1.f / _mm512_reduce_add_ps(vsum);
    __m512 acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < Tkv; ++t) {
      if (sc[t] == 0.f) continue;
      const __m512 w = _mm512_set1_ps(sc[t]);
      const X* vr = vb + t * hd;
      for (int c = 0; c < NC; ++c) acc[c] = _mm512_fmadd_ps(w, cpu::load16(vr + 16 * c), acc[c]);
    }
    for (int c = 0; c < NC; ++c) {
      const __m512 o = _mm512_mul_ps(acc[c], _mm512_set1_ps(inv));
      if constexpr (sizeof(X) == 4) _mm512_storeu_ps(static_cast<float*>(p.out) + bh * hd + 16 * c, o);
      else _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p.out) + bh * hd + 16 * c),
                               (__m256i)_mm512_cvtneps_pbh(o));
    }
  });
}

template <typename X>
bool attn_vector(const AttnDecodeParams& p) {
  switch (p.hd) {
    case 64: attn_avx512<X, 4>(p); return true;
    case 128: attn_avx512<X, 8>(p); return true;
    case 256: attn_avx512<X, 16>(p); return true;
    default: return false;  // other head dims: the portable loops
  }
}
#elif MOE_AVX2
// The same three passes with ymm registers, for hd a multiple of 8: a key's dot product runs
// two accumulator chains (even and odd 8-lane chunks) and one reduction; exp 8 scores at a
// time; the value pass keeps up to NV = 8 output vectors (64 dims) in registers and walks the
// keys once per 64-dim chunk (each chunk is a different part of every value row, so the cache
// is still read once).
template <int NV, typename X>
inline void value_chunk(const float* sc, int64_t Tkv, const X* vb, int64_t hd, int64_t d0, float inv, X* out) {
  __m256 acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < Tkv; ++t) {
    if (sc[t] == 0.f) continue;
    const __m256 w = _mm256_set1_ps(sc[t]);
    const X* vr = vb + t * hd + d0;
    for (int c = 0; c < NV; ++c) acc[c] = _mm256_fmadd_ps(w, cpu::load8(vr + 8 * c), acc[c]);
  }
  for (int c = 0; c < NV; ++c) cpu::store8(out + d0 + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
}

template <int NV = 8, typename X>
inline void value_chunk_n(int nv, const float* sc, int64_t Tkv, const X* vb, int64_t hd, int64_t d0, float inv, X* out) {
  if constexpr (NV >= 1) {
    if (nv == NV) return value_chunk<NV>(sc, Tkv, vb, hd, d0, inv, out);
    return value_chunk_n<NV - 1>(nv, sc, Tkv, vb, hd, d0, inv, out);
  }
}

template <typename X>
void attn_avx2(const AttnDecodeParams& p) {
  const int64_t Tkv = p.Tkv, hd = p.hd;
  X* out = static_cast<X*>(p.out);
  for_each_head<X>(p, [&](int64_t bh, const X* qr, const X* kb, const X* vb, const uint8_t* valid, float* sc) {
    alignas(32) float qf[1024];
    for (int64_t d = 0; d < hd; d += 8)
      _mm256_store_ps(qf + d, _mm256_mul_ps(cpu::load8(qr + d), _mm256_set1_ps(p.scale)));
    const float m = score_keys(valid, Tkv, sc, [&](int64_t s) {
      const X* kr = kb + s * hd;
      __m256 a0 = _mm256_mul_ps(_mm256_load_ps(qf), cpu::load8(kr)), a1 = _mm256_setzero_ps();
      int64_t d = 8;
      for (; d + 16 <= hd; d += 16) {
        a1 = _mm256_fmadd_ps(_mm256_load_ps(qf + d), cpu::load8(kr + d), a1);
        a0 = _mm256_fmadd_ps(_mm256_load_ps(qf + d + 8), cpu::load8(kr + d + 8), a0);
      }
      if (d < hd) a1 = _mm256_fmadd_ps(_mm256_load_ps(qf + d), cpu::load8(kr + d), a1);
      return cpu::hsum8(_mm256_add_ps(a0, a1));
    });
    // masked scores are -inf: exp gives 0 (exp256 clamps, so zero them by mask)
    __m256 vsum = _mm256_setzero_ps();
    const __m256 vm = _mm256_set1_ps(m), ninf = _mm256_set1_ps(-INFINITY);
    int64_t s = 0;
    for (; s + 8 <= Tkv; s += 8) {
      const __m256 x = _mm256_loadu_ps(sc + s);
      const __m256 e = _mm256_and_ps(_mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ), cpu::exp256(_mm256_sub_ps(x, vm)));
      _mm256_storeu_ps(sc + s, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = cpu::hsum8(vsum);
    for (; s < Tkv; ++s) sum += (sc[s] = sc[s] == -INFINITY ? 0.f : std::exp(sc[s] - m));
    const float inv = 1.f / sum;
    for (int64_t d0 = 0; d0 < hd; d0 += 64)
      value_chunk_n(int(std::min<int64_t>(8, (hd - d0) / 8)), sc, Tkv, vb, hd, d0, inv, out + bh * hd);
  });
}
#endif

}  // namespace

void attention_decode_cpu(const AttnDecodeParams& p) {
  if (p.B < 0 || p.H <= 0 || p.Hkv <= 0 || p.H % p.Hkv || p.hd <= 0 || p.hd > 1024 || p.Tkv <= 0 ||
      p.Tkv > p.Tkv_cap || p.valid_stride < p.Tkv)
    cpu::fail("attention_decode_cpu", "bad sizes B=" + std::to_string(p.B) + " H=" + std::to_string(p.H) +
                                          " Hkv=" + std::to_string(p.Hkv) + " hd=" + std::to_string(p.hd) +
                                          " Tkv=" + std::to_string(p.Tkv) + " Tkv_cap=" + std::to_string(p.Tkv_cap));
  cpu::need_dtype("attention_decode_cpu", p.dtype);
  if (p.B > 0) {
    cpu::need("attention_decode_cpu", p.q, "q");
    cpu::need("attention_decode_cpu", p.k_cache, "k_cache");
    cpu::need("attention_decode_cpu", p.v_cache, "v_cache");
    cpu::need("attention_decode_cpu", p.valid, "valid");
    cpu::need("attention_decode_cpu", p.out, "out");
    cpu::need("attention_decode_cpu", p.workspace, "workspace");
  }
#if MOE_AVX512
  if (p.dtype == DType::f32 ? attn_vector<float>(p) : attn_vector<uint16_t>(p)) return;
#elif MOE_AVX2
  if (p.hd % 8 == 0) return p.dtype == DType::f32 ? attn_avx2<float>(p) : attn_avx2<uint16_t>(p);
#endif
  if (p.dtype == DType::f32) attn_impl<float>(p);
  else attn_impl<uint16_t>(p);
}

}  // namespace moe

namespace moe {
namespace {
// The model's torch code rounds after every elementwise op in the model dtype; so does this.
inline float rnd(DType dt, float v) { return dt == DType::f32 ? v : cpu::bf16_to_f32(cpu::f32_to_bf16(v)); }
}  // namespace

void attention_block_decode_cpu(const AttnBlockParams& p) {
  const int64_t B = p.B, H = p.H, Hkv = p.Hkv, hd = p.hd, half = p.hd / 2;
  const int64_t nq = H * hd, nkv = Hkv * hd, nqkv = nq + 2 * nkv;
  const DType dt = p.dtype;
  const char* op = "attention_block_decode_cpu";
  if (p.pos < 0 || p.pos >= p.Tkv_cap || hd % 2)
    cpu::fail(op, "pos=" + std::to_string(p.pos) + " Tkv_cap=" + std::to_string(p.Tkv_cap) + " hd=" + std::to_string(hd));
  cpu::need_dtype(op, dt);
  // hd <= 1024: the rope below rotates a head in a stack buffer of 1024 floats
  cpu::need_sizes(op, {{"B", p.B, 0}, {"D", p.D, 1}, {"H", p.H, 1}, {"Hkv", p.Hkv, 1}, {"hd", p.hd, 2}});
  if (p.H % p.Hkv || p.hd > 1024 || p.valid_stride <= p.pos)
    cpu::fail(op, "H=" + std::to_string(p.H) + " must be a multiple of Hkv=" + std::to_string(p.Hkv) +
                      ", hd=" + std::to_string(p.hd) + " <= 1024, valid_stride=" + std::to_string(p.valid_stride) +
                      " > pos=" + std::to_string(p.pos));
  if (B == 0) return;
  cpu::need(op, p.x, "x"), cpu::need(op, p.qkv, "qkv"), cpu::need(op, p.o, "o");
  cpu::need(op, p.cos, "cos"), cpu::need(op, p.sin, "sin");
  cpu::need(op, p.k_cache, "k_cache"), cpu::need(op, p.v_cache, "v_cache"), cpu::need(op, p.valid, "valid");
  cpu::need(op, p.qkv_buf, "qkv_buf"), cpu::need(op, p.attn_buf, "attn_buf");
  cpu::need(op, p.scores, "scores"), cpu::need(op, p.out, "out");
  // both weights' formats before the cache column is written
  cpu::check_either("attention_block_decode_cpu (qkv)", p.qkv_fmt, p.D);
  cpu::check_either("attention_block_decode_cpu (o)", p.o_fmt, nq);
  if (cpu::quantized(p.qkv_fmt) || cpu::quantized(p.o_fmt)) cpu::need(op, p.workspace, "workspace");
  cpu::either_linear(LinearParams{p.x, p.qkv, p.qkv_buf, dt, p.B, int32_t(nqkv), p.D}, p.qkv_fmt, p.workspace);
  // rope (rotate-half) on q and k heads in place; v copied; k and v written to the cache column
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = b * nqkv;
    for (int64_t head = 0; head < H + Hkv; ++head) {
      const int64_t base = row + head * hd;
      float tmp[1024];
      for (int64_t d = 0; d < hd; ++d) {
        const float x = cpu::load(p.qkv_buf, dt, base + d);
        const float rot = d < half ? -cpu::load(p.qkv_buf, dt, base + d + half)
                                   : cpu::load(p.qkv_buf, dt, base + d - half);
        const float c = cpu::load(p.cos, dt, b * hd + d), s = cpu::load(p.sin, dt, b * hd + d);
        tmp[d] = rnd(dt, rnd(dt, x * c) + rnd(dt, rot * s));
      }
      for (int64_t d = 0; d < hd; ++d) cpu::store(p.qkv_buf, dt, base + d, tmp[d]);
    }
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t dst = ((b * Hkv + g) * int64_t(p.Tkv_cap) + p.pos) * hd;
      for (int64_t d = 0; d < hd; ++d) {
        cpu::store(p.k_cache, dt, dst + d, cpu::load(p.qkv_buf, dt, row + nq + g * hd + d));
        cpu::store(p.v_cache, dt, dst + d, cpu::load(p.qkv_buf, dt, row + nq + nkv + g * hd + d));
      }
    }
  }
  // attention over the cache: q rows are strided by nqkv, so gather them into attn_buf first
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(static_cast<char*>(p.attn_buf) + b * nq * cpu::esize(dt),
                static_cast<const char*>(p.qkv_buf) + b * nqkv * cpu::esize(dt), nq * cpu::esize(dt));
  AttnDecodeParams a{p.attn_buf, p.k_cache, p.v_cache, p.valid, p.qkv_buf, p.scores, p.scale, dt,
                     p.B, p.H, p.Hkv, p.hd, p.pos + 1, p.Tkv_cap, p.valid_stride};
  attention_decode_cpu(a);  // writes into qkv_buf (free again): [B, H hd]
  cpu::either_linear(LinearParams{p.qkv_buf, p.o, p.out, dt, p.B, p.D, int32_t(nq)}, p.o_fmt, p.workspace);
}

void rms_norm_cpu(const RMSNormParams& p) {
  cpu::need_dtype("rms_norm_cpu", p.dtype);
  cpu::need_sizes("rms_norm_cpu", {{"T", p.T, 0}, {"D", p.D, 1}});
  if (p.T > 0) {
    cpu::need("rms_norm_cpu", p.x, "x");
    cpu::need("rms_norm_cpu", p.w, "w");
    cpu::need("rms_norm_cpu", p.out, "out");
  }
  const int64_t T = p.T, D = p.D;
  cpu::parallel_ranges(T, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float v = cpu::load(p.x, p.dtype, t * D + d);
        ss += v * v;
      }
      const float r = 1.f / std::sqrt(ss / float(D) + p.eps);
      for (int64_t d = 0; d < D; ++d) {
        const float n = rnd(p.dtype, cpu::load(p.x, p.dtype, t * D + d) * r);
        cpu::store(p.out, p.dtype, t * D + d, cpu::load(p.w, p.dtype, d) * n);
      }
    }
  }, T * D >= cpu::kParallelMinWork);
}

}  // namespace moe
