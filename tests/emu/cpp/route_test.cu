// route_cuda (csrc/cuda/route.cu) against a C++ reference in double, on the emulator (or a GPU:
// nvcc -std=c++20 -arch=sm_80 -I DIR route_test.cu ../../../csrc/cuda/route.cu;
// DIR holds the generated test_tolerances.h: python tests/tolerances.py > DIR/test_tolerances.h).
//
// Inputs are multiples of 1/16 in [-4, 4] (exact in bf16): distinct logits give probabilities at
// least 6% apart, so the fp32 kernel and the double reference rank them identically, and equal
// logits are exact ties (lower id must win). Ids, slot order and usage counts are compared
// exactly; weights and probs to route_weights of tests/tolerances.py (fp32 softmax vs double).
// Sweep: E in {8, 64} x T in {1,2,7,16,17,129,257} x k in {0,1,2,6,8,E}, each with a rotating
// variant (dtype, padded stride, mask reroute/zero, force, renormalise, probs tap, usage,
// data: ties / non-finite rows / all equal / all tokens to one expert), plus E in
// {1, 31, 32, 33, 100, 128, 200, 256} and k_max > k, plus launcher precondition checks.
#include <algorithm>
#include <cfloat>
#include <limits>

#include "../../../csrc/ops.h"
#include "kernel_test_util.h"

using namespace moe;

struct Case {
  int T, E, k, k_max;
  DType dtype;
  int stride_pad;
  int mask;  // 0 none, 1 reroute, 2 zero
  bool force, renorm, probs, usage;
  int data;  // 0 ties, 1 non-finite rows, 2 all equal, 3 all to one expert
  uint64_t seed;
};

static void reference_row(const Case& c, const double* x_in, const uint8_t* mask, int forced, int* ids, double* w,
                          double* probs) {
  const int E = c.E;
  std::vector<double> x(x_in, x_in + E);
  int n_pinf = 0;
  double m = -INFINITY;
  for (double& v : x) {
    if (std::isnan(v)) v = -INFINITY;
    n_pinf += v == INFINITY;
    m = std::max(m, v);
  }
  for (int e = 0; e < E; ++e) {
    if (n_pinf) probs[e] = x[e] == INFINITY ? 1.0 / n_pinf : 0.0;
    else if (m == -INFINITY) probs[e] = 0.0;
    else probs[e] = std::exp(x[e] - m);
  }
  if (!n_pinf && m != -INFINITY) {
    double s = 0;
    for (int e = 0; e < E; ++e) s += probs[e];
    for (int e = 0; e < E; ++e) probs[e] /= s;
  }
  std::vector<int> cand;
  for (int e = 0; e < E; ++e)
    if (!(c.mask == 1 && mask[e]) && e != forced) cand.push_back(e);
  std::stable_sort(cand.begin(), cand.end(), [&](int a, int b) { return probs[a] > probs[b]; });
  if (forced >= 0 && c.k > 0) cand.insert(cand.begin(), forced);
  double kept = 0;
  for (int j = 0; j < c.k_max; ++j) {
    ids[j] = j < c.k && j < (int)cand.size() ? cand[j] : -1;
    w[j] = ids[j] < 0 ? 0.0 : (c.mask == 2 && mask[ids[j]]) ? 0.0 : probs[ids[j]];
    if (j < c.k) kept += w[j];
  }
  if (c.renorm && kept > 0)
    for (int j = 0; j < c.k; ++j) w[j] /= kept;
}

static bool close(double got, double want) { return moe_test::tol::route_weights_f32.ok(got, want); }

static void run_case(const Case& c) {
  char name[256];
  std::snprintf(name, sizeof name,
                "T=%d E=%d k=%d k_max=%d %s stride+%d mask=%d force=%d renorm=%d probs=%d usage=%d data=%d", c.T,
                c.E, c.k, c.k_max, c.dtype == DType::bf16 ? "bf16" : "f32", c.stride_pad, c.mask, c.force, c.renorm,
                c.probs, c.usage, c.data);
  g_case = name;
  Rng rng(c.seed);
  const int T = c.T, E = c.E;
  const int64_t stride = E + c.stride_pad;
  std::vector<double> x((size_t)T * E);  // the values the kernel sees (after bf16 rounding)
  const int hot = rng.uniform(E);
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) {
      double v = (rng.uniform(129) - 64) / 16.0;
      if (c.data == 2) v = 0.75;
      if (c.data == 3) v = e == hot ? 6.0 : v;
      if (c.data == 1) {
        switch (t % 6) {
          case 0: v = NAN; break;
          case 1: v = -INFINITY; break;
          case 2: v = (e % 7 == 3 || e == E - 1) ? INFINITY : v; break;
          case 3: v = e % 3 == 0 ? NAN : v; break;
          case 4: v = e == E / 2 ? v : (e % 2 ? -INFINITY : NAN); break;
          default: break;
        }
      }
      x[(size_t)t * E + e] = v;
    }
  std::vector<uint8_t> mask(E, 0);
  if (c.mask)
    for (int e = 0; e < E; ++e) mask[e] = rng.uniform(4) == 0;
  int forced = -1;
  if (c.force) {
    forced = rng.uniform(E);
    if (c.mask == 1) mask[forced] = 0;  // the dispatcher refuses a forced expert that is masked
  }

  Buf<float> logits_f(c.dtype == DType::f32 ? (size_t)T * stride : 0, NAN);
  Buf<uint16_t> logits_h(c.dtype == DType::bf16 ? (size_t)T * stride : 0, 0x7FC0);
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) {
      const float v = (float)x[(size_t)t * E + e];
      if (c.dtype == DType::f32) logits_f.h[t * stride + e] = v;
      else logits_h.h[t * stride + e] = f32_to_bf16_bits(v);
    }
  logits_f.up(), logits_h.up();
  Buf<int32_t> k_dev(1, c.k), force_dev(1, forced);
  Buf<uint8_t> mask_dev(E);
  mask_dev.h = mask;
  mask_dev.up();
  const int canary = 4;  // must stay untouched past the end of every output
  Buf<int32_t> ids((size_t)T * c.k_max + canary, 12345);
  Buf<float> w((size_t)T * c.k_max + canary, 777.f);
  Buf<float> probs((size_t)T * E + canary, 777.f);
  Buf<int32_t> usage(E + canary, 0);
  for (int e = 0; e < E; ++e) usage.h[e] = e * 3;  // counters accumulate across calls
  usage.up();

  RouteParams p{};
  p.router_logits = c.dtype == DType::f32 ? (const void*)logits_f.d : (const void*)logits_h.d;
  p.logits_dtype = c.dtype;
  p.logits_stride = stride;
  p.T = T, p.E = E, p.k_max = c.k_max;
  p.k = k_dev.d;
  p.expert_mask = c.mask ? mask_dev.d : nullptr;
  p.mask_mode = c.mask == 2 ? MaskMode::zero : MaskMode::reroute;
  p.force_expert = c.force ? force_dev.d : nullptr;
  p.renormalize = c.renorm;
  p.topk_ids = ids.d, p.topk_weights = w.d;
  p.router_probs = c.probs ? probs.d : nullptr;
  p.usage_counts = c.usage ? usage.d : nullptr;
  route_cuda(p, nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());
  ids.down(), w.down(), probs.down(), usage.down();

  std::vector<int> want_ids(c.k_max), want_usage(E);
  for (int e = 0; e < E; ++e) want_usage[e] = e * 3;
  std::vector<double> want_w(c.k_max), want_p(E);
  std::vector<double> xr(E);
  for (int t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e)
      xr[e] = c.dtype == DType::f32 ? (double)(float)x[(size_t)t * E + e]
                                    : (double)bf16_bits_to_f32(f32_to_bf16_bits((float)x[(size_t)t * E + e]));
    reference_row(c, xr.data(), mask.data(), forced, want_ids.data(), want_w.data(), want_p.data());
    std::vector<int> seen;
    for (int j = 0; j < c.k_max; ++j) {
      const int got_id = ids.h[(size_t)t * c.k_max + j];
      const float got_w = w.h[(size_t)t * c.k_max + j];
      EXPECT(got_id == want_ids[j], "row %d slot %d: id %d, want %d", t, j, got_id, want_ids[j]);
      EXPECT(close(got_w, want_w[j]), "row %d slot %d: weight %.9g, want %.9g", t, j, got_w, want_w[j]);
      if (got_id >= 0) {
        EXPECT(std::find(seen.begin(), seen.end(), got_id) == seen.end(), "row %d: id %d twice", t, got_id);
        seen.push_back(got_id);
        want_usage[got_id] += 1;
      }
    }
    if (c.probs)
      for (int e = 0; e < E; ++e)
        EXPECT(close(probs.h[(size_t)t * E + e], want_p[e]), "row %d expert %d: prob %.9g, want %.9g", t, e,
               probs.h[(size_t)t * E + e], want_p[e]);
  }
  for (int e = 0; e < E; ++e)
    EXPECT(usage.h[e] == (c.usage ? want_usage[e] : e * 3), "usage[%d] = %d, want %d", e, usage.h[e],
           c.usage ? want_usage[e] : e * 3);
  for (int i = 0; i < canary; ++i) {
    EXPECT(ids.h[(size_t)T * c.k_max + i] == 12345, "write past topk_ids");
    EXPECT(w.h[(size_t)T * c.k_max + i] == 777.f, "write past topk_weights");
    EXPECT(probs.h[(size_t)T * E + i] == 777.f, "write past router_probs");
    EXPECT(usage.h[E + i] == 0, "write past usage_counts");
  }
}

static void launcher_checks() {
  g_case = "launcher preconditions";
  Buf<float> logits(64 * 4);
  Buf<int32_t> k(1, 2), ids(64), out_i(64);
  Buf<float> w(64);
  RouteParams p{};
  p.router_logits = logits.d, p.logits_dtype = DType::f32, p.logits_stride = 8;
  p.T = 2, p.E = 8, p.k_max = 2, p.k = k.d, p.mask_mode = MaskMode::reroute;
  p.topk_ids = ids.d, p.topk_weights = w.d;
  auto with = [&](auto change) {
    RouteParams q = p;
    change(q);
    return [q] { route_cuda(q, nullptr); };
  };
  expect_invalid("E=0", "E = 0", with([](RouteParams& q) { q.E = 0; }));
  expect_invalid("E=257", "E = 257", with([](RouteParams& q) { q.E = 257, q.logits_stride = 300; }));
  expect_invalid("k_max>E", "k_max = 9", with([](RouteParams& q) { q.k_max = 9; }));
  expect_invalid("stride<E", "logits_stride = 7", with([](RouteParams& q) { q.logits_stride = 7; }));
  expect_invalid("null ids", "non-null", with([](RouteParams& q) { q.topk_ids = nullptr; }));
  expect_invalid("T<0", "T = -1", with([](RouteParams& q) { q.T = -1; }));
  RouteParams empty = p;  // T = 0 launches nothing and touches nothing
  empty.T = 0, empty.topk_ids = nullptr;
  route_cuda(empty, nullptr);
  // k read from the device above k_max is clamped to k_max
  k.h[0] = 50, k.up();
  for (int e = 0; e < 16; ++e) logits.h[e] = (float)e;
  logits.up();
  route_cuda(p, nullptr);
  ids.down();
  EXPECT(ids.h[0] == 7 && ids.h[1] == 6 && ids.h[2] == 7 && ids.h[3] == 6, "k clamp: %d %d %d %d", ids.h[0],
         ids.h[1], ids.h[2], ids.h[3]);
}

int main(int argc, char** argv) {
  // "quick": T <= 17; "tiny": T <= 2 and no extra shapes (the threads backend: one OS thread per
  // CUDA thread)
  const std::string mode = argc > 1 ? argv[1] : "full";
  const int max_T = mode == "tiny" ? 2 : mode == "quick" ? 17 : 1 << 30;
  std::vector<Case> cases;
  uint64_t seed = 1;
  int variant = 0;
  const int Ts[] = {1, 2, 7, 16, 17, 129, 257};
  for (int E : {8, 64})
    for (int T : Ts) {
      if (T > max_T) continue;
      for (int k : {0, 1, 2, 6, 8, E}) {
        if (k > E || (k == E && E == 8)) continue;  // E = 8: k = 8 is already in the list
        for (int rep = 0; rep < 2; ++rep, ++variant) {
          Case c{T, E, k, k, (variant % 2) ? DType::bf16 : DType::f32, (variant / 2) % 3 == 0 ? 0 : 5,
                 variant % 3, variant % 5 == 1, (variant / 3) % 2 == 1, variant % 4 != 3, variant % 3 != 2,
                 (variant / 7) % 4, seed++};
          if (c.data == 3 && rep) c.data = 0;
          cases.push_back(c);
        }
      }
    }
  // other expert counts (EPL = 1, 2, 4, 8 and ragged E), and k_max wider than k
  for (int E : {1, 31, 32, 33, 100, 128, 200, 256})
    for (int T : {1, 7, 33}) {
      if (T > max_T) continue;
      const int k = std::min(E, 6);
      cases.push_back(Case{T, E, k, std::min(E, k + 3), T % 2 ? DType::bf16 : DType::f32, T % 3, E % 3, E % 2 == 0,
                           T == 7, true, true, (E + T) % 4, seed++});
      cases.push_back(Case{T, E, E, E, DType::f32, 0, 0, false, true, true, true, 0, seed++});
    }
  for (const Case& c : cases) run_case(c);
  launcher_checks();
  return finish("route_test", (int)cases.size());
}
