// Round-to-nearest GPTQ quantization of a weight [E, Dout, Din] in one pass over it: what
// `python -m moe_engine.quantize` and `load(quant=...)` run on every quantizable linear.
// The rule (docs/quantization.md, src/moe_engine/quant.py's module docstring) and the reference
// it must equal bit for bit is quant.quantize_reference (PyTorch); tests/test_quant.py
// compares them. Each step is the reference's fp32 operation in the same order:
//   sym:  s = fp16up(max(2 * max|w| / maxq, 2^-14)),                 z = 2^(bits-1)
//   asym: lo = min(min w, 0), hi = max(max w, 0),
//         s = fp16up(max((hi - lo) / maxq, 2^-14)),   z = roundeven(-lo / s);
//         z < 1 -> s = fp16up(max(hi / (maxq - 1), 2^-14)), z = 1;  z = min(z, maxq)
//   q = clamp(roundeven(w / s) + z, 0, maxq)   (a true division, as torch's)
// fp16up(x) rounds x to the nearest fp16 and steps one ulp up when that is below x, so the
// group's extreme stays inside the grid. Rows are independent: threads split blocks of rows,
// so the bits do not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common.h"

namespace moe {
namespace {

constexpr float kMinScale = 1.0f / 16384.0f;  // 2^-14, the smallest normal fp16
constexpr int kRowBlock = 16;                  // rows per task: 64-byte stores into qweight

// Nearest-even fp16 of a positive finite fp32, stepped up one ulp if it lies below x.
// Returns 0x7c00 (inf) on overflow.
inline uint16_t fp16_up(float x) {
  const _Float16 h = static_cast<_Float16>(x);  // IEEE round to nearest even
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  if (static_cast<float>(h) < x && bits < 0x7c00) ++bits;  // positive: next fp16 up
  return bits;
}
inline float fp16_to_f32(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

}  // namespace

void quantize_rtn_cpu(const QRtnParams& p) {
  const char* op = "quantize_rtn_cpu";
  cpu::need(op, p.w, "w");
  cpu::need(op, p.qweight, "qweight");
  cpu::need(op, p.scales, "scales");
  cpu::need(op, p.qzeros, "qzeros");
  cpu::need_dtype(op, p.dtype);
  if (p.bits != 4 && p.bits != 8) cpu::fail(op, "bits=" + std::to_string(p.bits) + " must be 4 or 8");
  if (p.group_size != 32 && p.group_size != 64 && p.group_size != 128)
    cpu::fail(op, "group_size=" + std::to_string(p.group_size) + " must be 32, 64 or 128");
  if (p.zero_offset != 0 && p.zero_offset != 1)
    cpu::fail(op, "zero_offset=" + std::to_string(p.zero_offset) + " must be 0 or 1");
  cpu::need_sizes(op, {{"E", p.E, 1}, {"Dout", p.Dout, 1}, {"Din", p.Din, 1}});
  const int bits = p.bits, per = 32 / bits;
  if (p.Dout % per || p.Din % per)
    cpu::fail(op, "Dout=" + std::to_string(p.Dout) + " and Din=" + std::to_string(p.Din) + " must be multiples of " +
                      std::to_string(per) + " for " + std::to_string(bits) + "-bit packing");
  const int64_t Dout = p.Dout, Din = p.Din, g = p.group_size, G = (Din + g - 1) / g;
  const int64_t kw = Din / per, zc = Dout / per;
  const int maxq = (1 << bits) - 1;
  const float fmaxq = float(maxq);
  const int64_t blocks_per_e = (Dout + kRowBlock - 1) / kRowBlock, tasks = p.E * blocks_per_e;
  std::atomic<int> bad{0};  // 1: non-finite weight, 2: a scale overflows fp16
  uint32_t* const qweight = reinterpret_cast<uint32_t*>(p.qweight);
  uint32_t* const qzeros = reinterpret_cast<uint32_t*>(p.qzeros);

#pragma omp parallel num_threads(cpu::max_threads())
  {
    std::vector<float> x(Din);
    std::vector<int32_t> code(g), zrow(kRowBlock * G);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      if (bad.load(std::memory_order_relaxed)) continue;
      const int64_t e = task / blocks_per_e, n0 = (task % blocks_per_e) * kRowBlock;
      const int64_t rows = std::min<int64_t>(kRowBlock, Dout - n0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r, base = (e * Dout + n) * Din;
        if (p.dtype == DType::f32) {
          std::memcpy(x.data(), static_cast<const float*>(p.w) + base, Din * 4);
        } else {
          const uint16_t* src = static_cast<const uint16_t*>(p.w) + base;
          for (int64_t k = 0; k < Din; ++k) x[k] = cpu::bf16_to_f32(src[k]);
        }
        for (int64_t gi = 0; gi < G; ++gi) {
          const int64_t k0 = gi * g, k1 = std::min(Din, k0 + g);
          float lo = 0.f, hi = 0.f, amax = 0.f;
          bool finite = true;
          for (int64_t k = k0; k < k1; ++k) {
            const float v = x[k];
            finite &= std::isfinite(v);
            lo = std::min(lo, v);
            hi = std::max(hi, v);
          }
          if (!finite) {
            bad.store(1);
            break;
          }
          uint16_t s16;
          int z;
          if (p.sym) {
            amax = std::max(hi, -lo);
            s16 = fp16_up(std::max(2.f * amax / fmaxq, kMinScale));
            z = 1 << (bits - 1);
          } else {
            s16 = fp16_up(std::max((hi - lo) / fmaxq, kMinScale));
            float zf = __builtin_roundevenf(-lo / fp16_to_f32(s16));
            if (zf < 1.f) {
              s16 = fp16_up(std::max(hi / float(maxq - 1), kMinScale));
              zf = 1.f;
            }
            z = int(std::min(zf, fmaxq));
          }
          if (s16 >= 0x7c00) {
            bad.store(2);
            break;
          }
          p.scales[(e * G + gi) * Dout + n] = s16;
          zrow[r * G + gi] = z;
          // codes of this group, packed along Din into column n of qweight
          const float s = fp16_to_f32(s16), fz = float(z);
          for (int64_t k = k0; k < k1; ++k)  // vectorises: div, roundeven, clamp, convert
            code[k - k0] = int32_t(std::min(std::max(__builtin_roundevenf(x[k] / s) + fz, 0.f), fmaxq));
          for (int64_t k = k0; k < k1; k += per) {
            uint32_t word = 0;
            for (int j = 0; j < per; ++j) word |= uint32_t(code[k - k0 + j]) << (bits * j);
            qweight[(e * kw + k / per) * Dout + n] = word;
          }
        }
        if (bad.load(std::memory_order_relaxed)) break;
      }
      if (bad.load(std::memory_order_relaxed)) continue;
      // zeros packed along Dout: a block starts on a word boundary (kRowBlock % per == 0)
      for (int64_t gi = 0; gi < G; ++gi)
        for (int64_t r = 0; r < rows; r += per) {
          uint32_t word = 0;
          for (int j = 0; j < per; ++j)
            word |= uint32_t((zrow[(r + j) * G + gi] - p.zero_offset) & maxq) << (bits * j);
          qzeros[(e * G + gi) * zc + (n0 + r) / per] = word;
        }
    }
  }
  if (bad.load() == 1) cpu::fail(op, "weight has non-finite values; cannot quantize");
  if (bad.load() == 2)
    cpu::fail(op, "a group scale overflows fp16; weights this large cannot be stored in the GPTQ format");
}

}  // namespace moe
