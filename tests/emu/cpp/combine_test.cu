// combine_cuda (csrc/cuda/combine.cu) on the emulator (or a GPU: nvcc -std=c++20 -arch=sm_80
// -I DIR combine_test.cu ../../../csrc/cuda/combine.cu; DIR holds
// the generated test_tolerances.h: python tests/tolerances.py > DIR/test_tolerances.h), checked two ways:
//   bitwise against a C++ replica of the documented order in fp32 (fma over j ascending, round
//   the routed tap, + shared, + residual, round once), which pins the fixed order;
//   within fp32_sum_vs_double of tests/tolerances.py + half an output ulp against the same sum in double.
// Sentinel slots hold NaN expert rows and must be skipped. Sweep: T in {1,2,7,16,17,129} x
// k_max in {0,1,2,6,8} with rotating variants (dtype, D in {8, 64, 100, 1, 2048}, shared /
// residual / routed tap present or not, out aliasing residual, pointers misaligned by one
// element to force the scalar path), plus launcher preconditions.
#include <algorithm>
#include <cmath>

#include "../../../csrc/ops.h"
#include "kernel_test_util.h"

using namespace moe;

struct Case {
  int T, k_max, D;
  DType dtype;
  bool shared, residual, routed, alias, misalign;
  uint64_t seed;
};

template <class S>  // storage: float, or uint16_t holding bf16 bits
static void run_typed(const Case& c) {
  Rng rng(c.seed);
  const int64_t T = c.T, K = c.k_max, D = c.D, off = c.misalign ? 1 : 0;
  auto to_s = [](float v) -> S {
    if constexpr (sizeof(S) == 2) return f32_to_bf16_bits(v);
    else return v;
  };
  auto to_f = [](S v) -> float {
    if constexpr (sizeof(S) == 2) return bf16_bits_to_f32(v);
    else return v;
  };
  const double ulp = sizeof(S) == 2 ? 1.0 / 256 : 1.0 / (1 << 23);  // relative, of the output dtype
  const auto& tl = moe_test::tol::fp32_sum_vs_double_f32;
  std::vector<int32_t> ids(T * K);
  std::vector<float> w(T * K);
  for (int64_t i = 0; i < T * K; ++i) {
    ids[i] = rng.uniform(5) == 0 ? -1 - rng.uniform(3) : rng.uniform(64);
    w[i] = (float)rng.real();
  }
  auto rnd = [&] { return to_s((float)(rng.real() * 4 - 2)); };
  Buf<S> eo(T * K * D + off), sh(T * D + off), res(T * D + off), out(T * D + off + 2, to_s(-99.f)),
      routed(T * D + off + 2, to_s(-99.f));
  Buf<int32_t> d_ids(T * K);
  Buf<float> d_w(T * K);
  d_ids.h = ids, d_w.h = w;
  for (int64_t i = 0; i < T * K * D; ++i) eo.h[off + i] = ids[i / D] < 0 ? to_s(NAN) : rnd();
  for (int64_t i = 0; i < T * D; ++i) sh.h[off + i] = rnd(), res.h[off + i] = rnd();
  const std::vector<S> res0 = res.h;
  eo.up(), sh.up(), res.up(), d_ids.up(), d_w.up();
  const bool alias = c.alias && c.residual;
  CombineParams p{};
  p.expert_out = eo.d + off, p.topk_weights = d_w.d, p.topk_ids = d_ids.d;
  p.shared_out = c.shared ? sh.d + off : nullptr;
  p.residual = c.residual ? res.d + off : nullptr;
  p.out = alias ? res.d + off : out.d + off;
  p.routed_out = c.routed ? routed.d + off : nullptr;
  p.dtype = c.dtype, p.T = c.T, p.k_max = c.k_max, p.D = c.D;
  combine_cuda(p, nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  out.down(), routed.down(), res.down();
  const std::vector<S>& got_out = alias ? res.h : out.h;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) {
      float acc = 0.f;
      double exact = 0.0;
      for (int64_t j = 0; j < K; ++j) {
        if (ids[t * K + j] < 0) continue;
        const float x = to_f(eo.h[off + (t * K + j) * D + d]);
        acc = std::fma(w[t * K + j], x, acc);
        exact += (double)w[t * K + j] * x;
      }
      const S routed_want = to_s(acc);
      const double routed_exact = exact;
      if (c.shared) acc += to_f(sh.h[off + t * D + d]), exact += to_f(sh.h[off + t * D + d]);
      if (c.residual) acc += to_f(res0[off + t * D + d]), exact += to_f(res0[off + t * D + d]);
      const S out_want = to_s(acc);
      const S got = got_out[off + t * D + d];
      EXPECT(std::memcmp(&got, &out_want, sizeof(S)) == 0, "out[%lld,%lld] = %.9g, fp32 replica %.9g", (long long)t,
             (long long)d, (double)to_f(got), (double)to_f(out_want));
      EXPECT(std::fabs(to_f(got) - exact) <= tl.atol + (tl.rtol + ulp) * std::fabs(exact),
             "out[%lld,%lld] = %.9g, double %.9g", (long long)t, (long long)d, (double)to_f(got), exact);
      if (c.routed) {
        const S g = routed.h[off + t * D + d];
        EXPECT(std::memcmp(&g, &routed_want, sizeof(S)) == 0, "routed_out[%lld,%lld] = %.9g, want %.9g",
               (long long)t, (long long)d, (double)to_f(g), (double)to_f(routed_want));
        EXPECT(std::fabs(to_f(g) - routed_exact) <= tl.atol + (tl.rtol + ulp) * std::fabs(routed_exact),
               "routed_out[%lld,%lld] vs double", (long long)t, (long long)d);
      }
    }
  for (int i = 0; i < 2; ++i) {
    EXPECT(to_f(out.h[off + T * D + i]) == -99.f || alias, "write past out");
    EXPECT(to_f(routed.h[off + T * D + i]) == -99.f, "write past routed_out");
  }
  if (off) EXPECT(to_f(out.h[0]) == -99.f && to_f(routed.h[0]) == -99.f, "write before out");
}

static void run_case(const Case& c) {
  char name[200];
  std::snprintf(name, sizeof name, "T=%d k_max=%d D=%d %s shared=%d residual=%d routed=%d alias=%d misalign=%d", c.T,
                c.k_max, c.D, c.dtype == DType::bf16 ? "bf16" : "f32", c.shared, c.residual, c.routed, c.alias,
                c.misalign);
  g_case = name;
  if (c.dtype == DType::bf16) run_typed<uint16_t>(c);
  else run_typed<float>(c);
}

static void launcher_checks() {
  g_case = "launcher preconditions";
  Buf<float> x(64);
  Buf<int32_t> ids(8);
  CombineParams p{};
  p.expert_out = x.d, p.topk_weights = x.d, p.topk_ids = ids.d, p.out = x.d;
  p.dtype = DType::f32, p.T = 1, p.k_max = 2, p.D = 4;
  auto with = [&](auto change) {
    CombineParams q = p;
    change(q);
    return [q] { combine_cuda(q, nullptr); };
  };
  expect_invalid("D=0", "D = 0", with([](CombineParams& q) { q.D = 0; }));
  expect_invalid("T<0", "T = -1", with([](CombineParams& q) { q.T = -1; }));
  expect_invalid("null out", "non-null", with([](CombineParams& q) { q.out = nullptr; }));
  expect_invalid("dtype", "dtype = 7", with([](CombineParams& q) { q.dtype = (DType)7; }));
  CombineParams empty = p;
  empty.T = 0, empty.out = nullptr;
  combine_cuda(empty, nullptr);  // T = 0: nothing to do, nothing checked beyond sizes
}

int main(int argc, char** argv) {
  // "quick": T <= 17; "tiny": T <= 2 (the threads backend)
  const std::string mode = argc > 1 ? argv[1] : "full";
  const int max_T = mode == "tiny" ? 2 : mode == "quick" ? 17 : 1 << 30;
  std::vector<Case> cases;
  uint64_t seed = 7;
  int v = 0;
  const int Ds[] = {8, 64, 100, 1, 64, 2048};
  for (int T : {1, 2, 7, 16, 17, 129}) {
    if (T > max_T) continue;
    for (int k : {0, 1, 2, 6, 8}) {
      for (int rep = 0; rep < 2; ++rep, ++v) {
        int D = Ds[v % 6];
        if (D == 2048 && T > 2) D = 256;  // keep the emulated work small
        cases.push_back(Case{T, k, D, v % 2 ? DType::bf16 : DType::f32, v % 3 != 0, (v / 2) % 3 != 0, v % 4 != 1,
                             v % 5 == 2, v % 7 == 3, seed++});
      }
    }
  }
  for (const Case& c : cases) run_case(c);
  launcher_checks();
  return finish("combine_test", (int)cases.size());
}
