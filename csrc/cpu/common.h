// Helpers shared by the CPU kernels in csrc/cpu: bf16 <-> fp32 and the OpenMP threshold.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#if defined(_OPENMP)
#include <omp.h>
#endif

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

// Element i as fp32, and v stored rounded to the element type: typed (float = f32, uint16_t =
// bf16 bits) for kernels templated on it, or through the runtime dtype.
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
inline float load(const void* base, DType dt, int64_t i) {
  return dt == DType::f32 ? load(static_cast<const float*>(base), i) : load(static_cast<const uint16_t*>(base), i);
}
inline void store(void* base, DType dt, int64_t i, float v) {
  if (dt == DType::f32) store(static_cast<float*>(base), i, v);
  else store(static_cast<uint16_t*>(base), i, v);
}

// The panel geometry of the packed weights (ops.h "Packed weights"), bf16/fp32 and quantized alike.
constexpr int kPanel = 32;  // output rows per panel
constexpr int kHalf = 16;   // gate (or up) rows per gate|up panel

// Counting sort of the R slots of topk_ids by expert, the one grouping of the cpu kernels (align_cpu
// with its GEMM tile height, the bf16 and quantized expert FFNs with block_m = 1). Ids < 0 or
// >= E are skipped (on_skipped(s) is called for each such slot s). Out: counts[e] = #slots of e;
// offsets[e + 1] = offsets[e] + round_up(counts[e], block_m); slots[offsets[e] + i] = the i-th
// slot of e in ascending slot order (a stable scatter; padding left as it was). Serial: it is
// O(R + E) integer work and its order is deterministic by construction.
template <class OnSkipped>
inline void group_by_expert(const int32_t* topk_ids, int64_t R, int32_t E, int32_t block_m, int32_t* counts,
                            int32_t* offsets, int32_t* slots, OnSkipped on_skipped) {
  std::fill(counts, counts + E, 0);
  for (int64_t s = 0; s < R; ++s) {
    const int32_t e = topk_ids[s];
    if (e >= 0 && e < E) ++counts[e];
    else on_skipped(s);
  }
  offsets[0] = 0;
  for (int32_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + (counts[e] + block_m - 1) / block_m * block_m;
  for (int32_t e = 0; e < E; ++e) counts[e] = offsets[e];  // counts become write cursors
  for (int64_t s = 0; s < R; ++s) {
    const int32_t e = topk_ids[s];
    if (e >= 0 && e < E) slots[counts[e]++] = int32_t(s);
  }
  for (int32_t e = 0; e < E; ++e) counts[e] -= offsets[e];  // and back to counts
}
inline void group_by_expert(const int32_t* topk_ids, int64_t R, int32_t E, int32_t block_m, int32_t* counts,
                            int32_t* offsets, int32_t* slots) {
  group_by_expert(topk_ids, R, E, block_m, counts, offsets, slots, [](int64_t) {});
}

// Below this many elements of work a parallel region costs more than it saves (a fork/join
// costs more than a decode step's route or combine; bench/README.md has the measurement).
constexpr int64_t kParallelMinWork = 1 << 14;

[[noreturn]] inline void fail(const std::string& op, const std::string& what) {
  throw std::invalid_argument(op + ": " + what);
}

// Argument checks every launcher runs before touching memory: the pointers it dereferences
// (a raw address from Python may be 0), the dtype enum (any int converts to it through the
// bindings), and sizes. Buffer lengths cannot be seen behind a raw pointer: the Python
// dispatchers check the tensors (ops/*.py, backend.check) and pass the sizes checked here.
inline void need(const char* op, const void* ptr, const char* name) {
  if (!ptr) fail(op, std::string(name) + " is a null pointer");
}
inline void need_dtype(const char* op, DType dt) {
  if (dt != DType::f32 && dt != DType::bf16)
    fail(op, "dtype " + std::to_string(int(dt)) + " is not f32 or bf16");
}
// Sizes named in one message: need_sizes(op, {{"T", T, 0}, {"D", D, 1}}) checks each >= its minimum.
struct SizeArg { const char* name; int64_t value; int64_t min; };
inline void need_sizes(const char* op, std::initializer_list<SizeArg> sizes) {
  for (const SizeArg& s : sizes)
    if (s.value < s.min)
      fail(op, std::string(s.name) + "=" + std::to_string(s.value) + " must be >= " + std::to_string(s.min));
}

// Threads of a parallel region: torch.set_num_threads(n) sets OpenMP's default for every
// region, and asking libgomp for far more threads than it can create crashes it (100000 did in
// pack_weights_cpu). More threads than 4x the processors only adds fork/join cost, so every
// parallel region of csrc/cpu (a pool job, pool.h, or an OpenMP region) takes this team size.
inline int max_threads() {
#if defined(_OPENMP)
  const int cap = 4 * omp_get_num_procs();
  const int want = omp_get_max_threads();
  return want < 1 ? 1 : (want > cap ? cap : want);
#else
  return 1;
#endif
}

// Per-unit streaming cost, in "token-rows": a unit (expert, panel) of c tokens costs
// c + kPanelCost. Balances a decode step (every unit 1 token) evenly and a prefill by compute.
constexpr int64_t kPanelCost = 4;

// Calls fn(e, panel) for share tid of nth of the units (e, panel), e over experts with count > 0,
// shares cut by cost so they hold equal work and contiguous weight streams (the bf16 and the
// quantized expert kernels cut their pool jobs' chunks alike: share = chunk).
template <class Fn>
void for_my_units(int tid, int nth, int32_t E, const int32_t* counts, int64_t n_panels, Fn fn) {
  int64_t total = 0;
  for (int32_t e = 0; e < E; ++e)
    if (counts[e] > 0) total += (counts[e] + kPanelCost) * n_panels;
  const int64_t lo = total * tid / nth, hi = total * (tid + 1) / nth;
  int64_t c = 0;
  for (int32_t e = 0; e < E; ++e) {
    if (counts[e] <= 0) continue;
    const int64_t u = counts[e] + kPanelCost;
    if (c + u * n_panels <= lo || c >= hi) {
      c += u * n_panels;
      continue;
    }
    for (int64_t p = 0; p < n_panels; ++p, c += u) {
      const int64_t mid = c + u / 2;  // a unit belongs to the share owning its midpoint
      if (mid >= lo && mid < hi) fn(e, p);
    }
  }
}

}  // namespace moe::cpu
