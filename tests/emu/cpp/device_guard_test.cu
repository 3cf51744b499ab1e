// Device guard of the ops.h launchers, on the emulator's fake devices (MOE_EMU_DEVICES=2):
//
//   device_guard_test <case>     every_launcher | invalid_device | throw_restores | attribute_once
//
// every_launcher: with device 0 current, each of route / align / expert_gemm (up, down) /
//   moe_decode / shared_expert / combine called with device 1 launches all its kernels on device 1
//   and leaves device 0 current. invalid_device: device 2 is refused with an exception naming it,
//   nothing is launched, device 0 stays current. throw_restores: a launcher that rejects its
//   parameters after the guard was opened still restores device 0. attribute_once: expert_gemm
//   sets its shared-memory attribute once per device, not before every launch.
// Prints "OK <case>" and exits 0, or "FAIL ..." and exits 1. Emulator only (the launch log and
// fake devices are csrc/emu test hooks); tests/emu/test_device_guard.py drives it.
#include "cuda/common.cuh"
#include "ops.h"
#include "moe_test_util.h"

#include <functional>
#include <stdexcept>

using namespace moe_test;

namespace {

int g_fail = 0;
#define EXPECT(cond, ...)                                \
  do {                                                   \
    if (!(cond)) {                                       \
      ++g_fail;                                          \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);  \
      std::printf(__VA_ARGS__);                          \
      std::printf("\n");                                 \
    }                                                    \
  } while (0)

int current() {
  int d = -1;
  CHECK_CUDA(cudaGetDevice(&d));
  return d;
}

// Tiny but valid inputs for every launcher: T 2, E 4, k_max 2, D = F = S = 16.
struct Inputs {
  static constexpr int T = 2, E = 4, K = 2, D = 16, F = 16, BM = 16;
  static constexpr int R = T * K;
  const int cap = static_cast<int>(moe::align_capacity(T, K, E, BM));
  Rng rng{7};
  float* logits = to_device(std::vector<float>{0.1f, 0.9f, 0.3f, 0.2f, 0.8f, 0.1f, 0.4f, 0.5f});
  int32_t* k = to_device(std::vector<int32_t>{K});
  int32_t* ids = to_device(std::vector<int32_t>(R, 0));
  float* weights = to_device(std::vector<float>(R, 0.0f));
  int32_t* counts = to_device(std::vector<int32_t>(E, 0));
  int32_t* offsets = to_device(std::vector<int32_t>(E + 1, 0));
  int32_t* sorted = to_device(std::vector<int32_t>(cap, 0));
  int32_t* tiles = to_device(std::vector<int32_t>(cap / BM, 0));
  int32_t* num_padded = to_device(std::vector<int32_t>(1, 0));
  int32_t* workspace = to_device(std::vector<int32_t>(moe::align_workspace_size(T, K, E), 0));
  bf16* x = to_device(randn(T * D, 1.0, rng));
  bf16* gate_up = to_device(randn(size_t(E) * 2 * F * D, weight_scale(D), rng));
  bf16* down = to_device(randn(size_t(E) * D * F, weight_scale(F), rng));
  bf16* act = to_device(std::vector<bf16>(size_t(cap) * F));
  bf16* expert_out = to_device(std::vector<bf16>(size_t(R) * D));
  bf16* shared_out = to_device(std::vector<bf16>(size_t(T) * D));
  bf16* out = to_device(std::vector<bf16>(size_t(T) * D));

  moe::RouteParams route() const {
    moe::RouteParams p{};
    p.router_logits = logits, p.logits_dtype = moe::DType::f32, p.logits_stride = E;
    p.T = T, p.E = E, p.k_max = K, p.k = k, p.mask_mode = moe::MaskMode::reroute, p.renormalize = true;
    p.topk_ids = ids, p.topk_weights = weights;
    return p;
  }
  moe::AlignParams align() const {
    return moe::AlignParams{ids, T, K, E, BM, counts, offsets, sorted, tiles, num_padded, workspace};
  }
  moe::ExpertGemmParams gemm(bool up) const {
    moe::ExpertGemmParams p{};
    p.a = up ? (const void*)x : act, p.a_stride = up ? D : F, p.w = up ? gate_up : down;
    p.c = up ? (void*)act : expert_out;
    p.sorted_slots = sorted, p.tile_experts = tiles, p.num_padded = num_padded;
    p.T = T, p.k_max = K, p.E = E, p.D = D, p.F = F, p.capacity = cap, p.block_m = BM, p.up = up;
    return p;
  }
  moe::MoeDecodeParams decode() const { return moe::MoeDecodeParams{x, ids, gate_up, down, act, expert_out, T, K, E, D, F}; }
  moe::SharedExpertParams shared() const { return moe::SharedExpertParams{x, D, gate_up, down, act, shared_out, T, D, F}; }
  moe::CombineParams combine() const {
    return moe::CombineParams{expert_out, weights, ids, shared_out, nullptr, out, nullptr, moe::DType::bf16, T, K, D};
  }
};

void every_launcher(const Inputs& in) {
  const std::vector<std::pair<const char*, std::function<void(int)>>> launchers = {
      {"route", [&](int d) { moe::route_cuda(in.route(), nullptr, d); }},
      {"align", [&](int d) { moe::align_cuda(in.align(), nullptr, d); }},
      {"expert_gemm up", [&](int d) { moe::expert_gemm_cuda(in.gemm(true), nullptr, d); }},
      {"expert_gemm down", [&](int d) { moe::expert_gemm_cuda(in.gemm(false), nullptr, d); }},
      {"moe_decode", [&](int d) { moe::moe_decode_cuda(in.decode(), nullptr, d); }},
      {"shared_expert", [&](int d) { moe::shared_expert_cuda(in.shared(), nullptr, d); }},
      {"combine", [&](int d) { moe::combine_cuda(in.combine(), nullptr, d); }},
  };
  for (const auto& [name, run] : launchers) {
    CHECK_CUDA(cudaSetDevice(0));
    moe_emu::api::take_launch_log();
    run(1);
    const auto log = moe_emu::api::take_launch_log();
    EXPECT(!log.empty(), "%s launched nothing", name);
    for (const auto& [kernel, device] : log)
      EXPECT(device == 1, "%s: kernel %s ran on device %d, expected the tensors' device 1", name, kernel.c_str(), device);
    EXPECT(current() == 0, "%s left device %d current, expected the caller's 0", name, current());
  }
  CHECK_CUDA(cudaSetDevice(1));  // and back: device 0 requested while 1 is current
  moe::route_cuda(in.route(), nullptr, 0);
  for (const auto& [kernel, device] : moe_emu::api::take_launch_log())
    EXPECT(device == 0, "route: kernel %s ran on device %d, expected 0", kernel.c_str(), device);
  EXPECT(current() == 1, "route left device %d current, expected 1", current());
}

void invalid_device(const Inputs& in) {
  CHECK_CUDA(cudaSetDevice(0));
  moe_emu::api::take_launch_log();
  bool threw = false;
  try {
    moe::moe_decode_cuda(in.decode(), nullptr, 2);
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()).find("device 2") != std::string::npos;
    if (!threw) std::printf("message does not name device 2: %s\n", e.what());
  }
  EXPECT(threw, "device 2 of 2 fake devices was not refused");
  EXPECT(moe_emu::api::take_launch_log().empty(), "something was launched for an invalid device");
  EXPECT(current() == 0, "device %d current after the refusal, expected 0", current());
}

void throw_restores(const Inputs& in) {
  CHECK_CUDA(cudaSetDevice(0));
  auto p = in.gemm(true);
  p.block_m = 5;  // rejected by expert_gemm_cuda's checks, which run inside the guard
  bool threw = false;
  try {
    moe::expert_gemm_cuda(p, nullptr, 1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw, "block_m 5 was accepted");
  EXPECT(current() == 0, "device %d current after the exception, expected 0", current());
}

void attribute_once(const Inputs& in) {
  moe::align_cuda(in.align(), nullptr, 0);
  const int before = moe_emu::api::func_attribute_calls_total();
  for (int i = 0; i < 3; ++i) moe::expert_gemm_cuda(in.gemm(true), nullptr, 0);
  EXPECT(moe_emu::api::func_attribute_calls_total() - before == 1, "3 launches on device 0 set the attribute %d times",
         moe_emu::api::func_attribute_calls_total() - before);
  for (int i = 0; i < 2; ++i) moe::expert_gemm_cuda(in.gemm(true), nullptr, 1);
  EXPECT(moe_emu::api::func_attribute_calls_total() - before == 2,
         "device 1 needs its own attribute, once: %d calls in all", moe_emu::api::func_attribute_calls_total() - before);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s every_launcher|invalid_device|throw_restores\n", argv[0]);
    return 2;
  }
  int n = 0;
  CHECK_CUDA(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::printf("FAIL: needs MOE_EMU_DEVICES=2 (have %d device)\n", n);
    return 1;
  }
  const Inputs in;
  const std::string c = argv[1];
  if (c == "every_launcher") every_launcher(in);
  else if (c == "invalid_device") invalid_device(in);
  else if (c == "throw_restores") throw_restores(in);
  else if (c == "attribute_once") attribute_once(in);
  else {
    std::fprintf(stderr, "unknown case %s\n", c.c_str());
    return 2;
  }
  if (g_fail) return 1;
  std::printf("OK %s\n", c.c_str());
  return 0;
}
