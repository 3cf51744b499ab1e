// Shared pieces of the MoE kernel test programs: bf16 data, routing scenarios, the align reference
// that drives the grouped GEMM, and the comparison metrics. Device buffers go through cudaMalloc /
// cudaMemcpy, so the same programs also build with `nvcc -x cu` and run unchanged on a real GPU.
//
// Shape legend: T tokens, D hidden, E experts, k_max top-k width, F expert width, R = T*k_max.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "test_tolerances.h"

namespace moe_test {

using bf16 = __nv_bfloat16;

// Tolerances: tests/tolerances.py, the suite's one table, generated as test_tolerances.h
// (tests/emu/emu_harness.py writes it; by hand: python tests/tolerances.py > DIR/test_tolerances.h):
//   element: |got - ref| <= atol + rtol |ref| of tol::kernel_vs_double_bf16
//   global:  1 - 2 sum(got*ref) / sum(got^2 + ref^2) < tol::global_diff_vs_double (DeepGEMM's calc_diff)

constexpr uint16_t kCanary = 0xBEEF;  // bf16 bits of rows a kernel must not write (-0.467)
constexpr uint16_t kNaN = 0x7FC0;     // bf16 quiet NaN: rows a kernel must not read

inline uint16_t bits(bf16 v) { return static_cast<__nv_bfloat16_raw>(v).x; }
inline bf16 from_bits(uint16_t b) {
  __nv_bfloat16_raw r;
  r.x = b;
  return bf16(r);
}
inline double f(bf16 v) { return static_cast<double>(__bfloat162float(v)); }

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t seed) : g(seed) {}
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(g); }
  int below(int n) { return static_cast<int>(std::uniform_int_distribution<int>(0, n - 1)(g)); }
};

// Weights ~ N(0, 1/K) for a reduction of length K: about the 1/10 of the usual bf16 GEMM tests
// at the emulated sizes (K = 64..256), and it keeps every output O(1) at the real 16B shape
// (K = 2048 / 1408) too, so one absolute tolerance means the same thing everywhere.
inline double weight_scale(int K) { return 1.0 / std::sqrt(static_cast<double>(K)); }

inline std::vector<bf16> randn(size_t n, double scale, Rng& rng) {
  std::vector<bf16> v(n);
  for (auto& x : v) x = __float2bfloat16(static_cast<float>(scale * rng.normal()));
  return v;
}

#define CHECK_CUDA(expr)                                                                     \
  do {                                                                                       \
    cudaError_t e_ = (expr);                                                                 \
    if (e_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(2);                                                                          \
    }                                                                                        \
  } while (0)

template <class T> T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&d), std::max<size_t>(h.size(), 1) * sizeof(T)));
  if (!h.empty()) CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <class T> std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  CHECK_CUDA(cudaDeviceSynchronize());
  if (n) CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// Routing scenarios for topk_ids [T, k_max]; each token's valid ids are distinct.
//   uniform   k_max distinct experts per token
//   one       every token's slot 0 is expert E-1 (all tokens to one expert), the rest uniform
//   sparse    only even experts are ever chosen (odd experts get no tokens); slots that cannot
//             be filled carry -1
//   sentinel  only the first k = max(k_max - 2, 1) slots are used (k < k_max at run time),
//             the rest are -1; every third token also has one id >= E (a skip sentinel)
//   dup       slot 1 repeats slot 0's expert (route never emits this; the kernels work per slot
//             and must still give both slots the expert's output)
inline std::vector<int32_t> make_topk_ids(int T, int k_max, int E, const std::string& scenario, Rng& rng) {
  std::vector<int32_t> ids(static_cast<size_t>(T) * k_max, -1);
  for (int t = 0; t < T; ++t) {
    std::vector<int> pool;
    for (int e = 0; e < E; ++e)
      if (scenario != "sparse" || e % 2 == 0) pool.push_back(e);
    std::shuffle(pool.begin(), pool.end(), rng.g);
    int k = scenario == "sentinel" ? std::max(k_max - 2, 1) : k_max;
    if (scenario == "one") {
      pool.erase(std::find(pool.begin(), pool.end(), E - 1));
      pool.insert(pool.begin(), E - 1);
    }
    k = std::min<int>(k, static_cast<int>(pool.size()));
    for (int j = 0; j < k; ++j) ids[static_cast<size_t>(t) * k_max + j] = pool[j];
    if (scenario == "sentinel" && t % 3 == 0) ids[static_cast<size_t>(t) * k_max + rng.below(k)] = E + t % 5;
    if (scenario == "dup" && k_max > 1) ids[static_cast<size_t>(t) * k_max + 1] = ids[static_cast<size_t>(t) * k_max];
    if (scenario != "uniform" && scenario != "one" && scenario != "sparse" && scenario != "sentinel" &&
        scenario != "dup") {
      std::fprintf(stderr, "unknown scenario %s\n", scenario.c_str());
      std::exit(2);
    }
  }
  return ids;
}

// The align contract (ops.h AlignParams), written plainly: slots grouped by expert in ascending
// slot order, each expert's segment padded with -1 to a multiple of block_m. Entries past
// num_padded are filled with garbage the GEMM must never read.
struct Aligned {
  int capacity = 0, num_padded = 0;
  std::vector<int32_t> sorted_slots, tile_experts;
};
inline Aligned align_ref(const std::vector<int32_t>& ids, int E, int block_m) {
  const int R = static_cast<int>(ids.size());
  Aligned a;
  const int64_t n = static_cast<int64_t>(R) + static_cast<int64_t>(E) * (block_m - 1);
  a.capacity = static_cast<int>((n + block_m - 1) / block_m * block_m);
  a.sorted_slots.assign(a.capacity, 0x5EADBEEF);
  a.tile_experts.assign(a.capacity / block_m, E + 1000);
  int pos = 0;
  for (int e = 0; e < E; ++e) {
    const int start = pos;
    for (int j = 0; j < R; ++j)
      if (ids[j] == e) a.sorted_slots[pos++] = j;
    while ((pos - start) % block_m) a.sorted_slots[pos++] = -1;
    for (int t = start / block_m; t < pos / block_m; ++t) a.tile_experts[t] = e;
  }
  a.num_padded = pos;
  return a;
}

// Double-precision SwiGLU of one row: act[f] = silu(h . Wg[f]) * (h . Wu[f]), gate_up [2F, D].
inline std::vector<double> swiglu_ref(const bf16* h, const bf16* gate_up, int D, int F) {
  std::vector<double> act(F);
  for (int fi = 0; fi < F; ++fi) {
    double g = 0, u = 0;
    for (int d = 0; d < D; ++d) {
      g += f(h[d]) * f(gate_up[static_cast<size_t>(fi) * D + d]);
      u += f(h[d]) * f(gate_up[static_cast<size_t>(F + fi) * D + d]);
    }
    act[fi] = g / (1.0 + std::exp(-g)) * u;
  }
  return act;
}
// out[d] = act . Wd[d], down [D, F].
template <class A> std::vector<double> down_ref(const A& act, const bf16* down, int D, int F) {
  std::vector<double> out(D);
  for (int d = 0; d < D; ++d) {
    double s = 0;
    for (int fi = 0; fi < F; ++fi) s += static_cast<double>(act[fi]) * f(down[static_cast<size_t>(d) * F + fi]);
    out[d] = s;
  }
  return out;
}

// Accumulates element and global errors of one output tensor.
struct Check {
  explicit Check(std::string n) : name(std::move(n)) {}
  std::string name;
  double max_err = 0, sxy = 0, sxx = 0, n = 0;
  long bad = 0;
  std::string first_bad;
  void add(double got, double ref, const std::string& where) {
    const double err = std::fabs(got - ref);
    if (!tol::kernel_vs_double_bf16.ok(got, ref)) {
      if (!bad) first_bad = where + ": got " + std::to_string(got) + " want " + std::to_string(ref);
      ++bad;
    }
    if (err > max_err || err != err) max_err = err;
    sxy += got * ref;
    sxx += got * got + ref * ref;
    n += 1;
  }
  void fail(const std::string& where) {
    if (!bad) first_bad = where;
    ++bad;
  }
  double diff() const { return sxx == 0 ? 0 : 1 - 2 * sxy / sxx; }  // NaN stays NaN (fails)
  bool ok() const { return bad == 0 && diff() < tol::global_diff_vs_double; }
  bool report() const {
    std::printf("%-10s %s  values=%.0f max_abs_err=%.3g diff=%.3g bad=%ld%s%s\n", name.c_str(),
                ok() ? "ok  " : "FAIL", n, max_err, diff(), bad, bad ? "  first: " : "", first_bad.c_str());
    return ok();
  }
};

// A launcher's precondition check: fn() must throw std::invalid_argument (its message is
// printed). Returns 1 when it did not (a failure), else 0, so an errors case sums them.
template <class Fn> int expect_invalid(const char* what, Fn fn) {
  try {
    fn();
    std::printf("FAIL %s: no exception\n", what);
    return 1;
  } catch (const std::invalid_argument& e) {
    std::printf("ok   %s: %s\n", what, e.what());
    return 0;
  }
}

// A device buffer of rows x cols bf16 canaries: what a kernel must not write stays kCanary.
inline bf16* canary_rows(size_t rows, size_t cols) {
  return to_device(std::vector<bf16>(rows * cols, from_bits(kCanary)));
}

// Whether row j of out [R, D] holds `want` (raw bf16 bits) in every column: a sentinel slot's
// expert_out row (zeros where the kernel writes them, the canary where it must not write).
inline bool row_is(const std::vector<bf16>& out, int j, int D, uint16_t want) {
  for (int d = 0; d < D; ++d)
    if (bits(out[static_cast<size_t>(j) * D + d]) != want) return false;
  return true;
}

}  // namespace moe_test
