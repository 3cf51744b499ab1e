// Emulator self-test: one binary, one case per run (`emu_selftest <case>`), driven by
// tests/emu/test_emulator.py. Prints "OK <case>" (and sometimes a checksum line) and exits 0, or
// prints "FAIL ..." and exits 1. The negative cases must be stopped by the emulator itself (abort
// with a message), or, for a missing cp.async wait, fail the kernel's own check on poisoned data.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "../../../csrc/cuda/common.cuh"
#include "../../../csrc/cuda/ptx.cuh"

static int g_failures = 0;
#define EXPECT(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      if (g_failures++ < 10) {                             \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);   \
        std::printf(__VA_ARGS__);                          \
        std::printf("\n");                                 \
      }                                                    \
    }                                                      \
  } while (0)

template <class T>
struct Buf {  // a device buffer with a host mirror
  std::vector<T> h;
  T* d = nullptr;
  explicit Buf(size_t n, T fill = T()) : h(n, fill) {
    MOE_CUDA_CHECK(cudaMalloc(&d, n * sizeof(T)));
    up();
  }
  ~Buf() { cudaFree(d); }
  void up() { MOE_CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); }
  void down() { MOE_CUDA_CHECK(cudaMemcpy(h.data(), d, h.size() * sizeof(T), cudaMemcpyDeviceToHost)); }
};

// ---------------------------------------------------------------- shuffles, every width and offset
constexpr int kMaxOff = 40;  // offsets / source lanes 0..39: also beyond the width and the warp
__global__ void shfl_kernel(int* out) {  // out[mode][width-1][off][tid]
  const int tid = threadIdx.x, n = blockDim.x;
  const int v = tid * 1000 + 7;
  for (int width = 1; width <= 32; ++width)
    for (int off = 0; off < kMaxOff; ++off) {
      int* o = out + ((width - 1) * kMaxOff + off) * n + tid;
      o[0 * 32 * kMaxOff * n] = __shfl_sync(0xFFFFFFFFu, v, off, width);
      o[1 * 32 * kMaxOff * n] = __shfl_up_sync(0xFFFFFFFFu, v, off, width);
      o[2 * 32 * kMaxOff * n] = __shfl_down_sync(0xFFFFFFFFu, v, off, width);
      o[3 * 32 * kMaxOff * n] = __shfl_xor_sync(0xFFFFFFFFu, v, off, width);
    }
}

// CUDA Programming Guide semantics (power-of-two widths, offsets < 32).
static int guide_source(int mode, int lane, int off, int w) {
  const int base = lane / w * w, pos = lane % w;
  switch (mode) {
    case 0: return base + off % w;
    case 1: return pos >= off ? lane - off : lane;
    case 2: return pos + off < w ? lane + off : lane;
    default: {
      const int j = lane ^ off;  // reading a later group returns the caller's own value
      return j / w * w > base ? lane : j;
    }
  }
}
// PTX ISA shfl.sync pseudocode, written out again independently of the emulator.
static int ptx_source(int mode, int lane, int b, int width) {
  const unsigned c = ((32u - width) << 8) | (mode == 1 ? 0u : 0x1Fu);
  const int bval = b & 0x1F, cval = c & 0x1F, segmask = (c >> 8) & 0x1F;
  const int maxLane = (lane & segmask) | (cval & ~segmask), minLane = lane & segmask;
  int j;
  bool pval;
  if (mode == 0) { j = minLane | (bval & ~segmask); pval = j <= maxLane; }
  else if (mode == 1) { j = lane - bval; pval = j >= maxLane; }
  else if (mode == 2) { j = lane + bval; pval = j <= maxLane; }
  else { j = lane ^ bval; pval = j <= maxLane; }
  return pval ? j : lane;
}

static void case_shfl() {
  const int n = 64;
  Buf<int> out(4 * 32 * kMaxOff * n, -1);
  MOE_LAUNCH(shfl_kernel, 1, n, 0, nullptr, out.d);
  MOE_CUDA_CHECK(cudaGetLastError());
  out.down();
  const char* names[] = {"idx", "up", "down", "xor"};
  for (int mode = 0; mode < 4; ++mode)
    for (int width = 1; width <= 32; ++width)
      for (int off = 0; off < kMaxOff; ++off)
        for (int tid = 0; tid < n; ++tid) {
          const int warp0 = tid / 32 * 32, lane = tid % 32;
          const int got = out.h[((mode * 32 + width - 1) * kMaxOff + off) * n + tid];
          const int ptx = warp0 + ptx_source(mode, lane, off, width);
          EXPECT(got == ptx * 1000 + 7, "%s width %d off %d tid %d: got %d want %d (PTX)", names[mode], width, off,
                 tid, got, ptx * 1000 + 7);
          if ((width & (width - 1)) == 0 && off < 32) {
            const int guide = warp0 + guide_source(mode, lane, off, width);
            EXPECT(got == guide * 1000 + 7, "%s width %d off %d tid %d: got %d want %d (guide)", names[mode], width,
                   off, tid, got, guide * 1000 + 7);
          }
        }
}

// Two half-warps shuffle independently with disjoint masks; also 64-bit and bf16 payloads.
__global__ void shfl_types_kernel(long long* o64, double* od, float* obf) {
  const int lane = threadIdx.x;
  long long v = (long long)lane << 40 | lane;
  if (lane < 16) {
    o64[lane] = __shfl_down_sync(0x0000FFFFu, v, 3, 16);
  } else {
    o64[lane] = __shfl_xor_sync(0xFFFF0000u, v, 5, 16);
  }
  od[lane] = __shfl_sync(0xFFFFFFFFu, lane * 0.5, 31 - lane);
  __nv_bfloat16 h = __float2bfloat16((float)lane);
  obf[lane] = __bfloat162float(__shfl_up_sync(0xFFFFFFFFu, h, 1));
}

static void case_shfl_types() {
  Buf<long long> o64(32);
  Buf<double> od(32);
  Buf<float> obf(32);
  MOE_LAUNCH(shfl_types_kernel, 1, 32, 0, nullptr, o64.d, od.d, obf.d);
  o64.down(), od.down(), obf.down();
  for (int l = 0; l < 32; ++l) {
    const int src = l < 16 ? (l + 3 < 16 ? l + 3 : l) : 16 + ((l - 16) ^ 5);
    EXPECT(o64.h[l] == ((long long)src << 40 | src), "64-bit lane %d", l);
    EXPECT(od.h[l] == (31 - l) * 0.5, "double lane %d", l);
    EXPECT(obf.h[l] == (float)(l == 0 ? 0 : l - 1), "bf16 lane %d", l);
  }
}

// ---------------------------------------------------------------- ballot / any / all / syncwarp
static int pred_of(int tid, int round) { return ((tid * 7 + round * 13) % 5) < 2 + (round % 3); }
__global__ void vote_kernel(unsigned* out, int rounds) {  // out[round][tid][3]
  const int tid = threadIdx.x;
  for (int r = 0; r < rounds; ++r) {
    const int p = pred_of(tid, r);
    const unsigned mask = r % 2 ? 0xFFFFFFFFu : (tid % 32 < 8 ? 0x000000FFu : 0xFFFFFF00u);
    unsigned* o = out + (r * blockDim.x + tid) * 3;
    o[0] = __ballot_sync(mask, p);
    o[1] = __any_sync(mask, p);
    o[2] = __all_sync(mask, p || r % 4 == 3);
    __syncwarp(mask);
  }
}
static void case_vote() {
  const int n = 96, rounds = 8;
  Buf<unsigned> out(rounds * n * 3);
  MOE_LAUNCH(vote_kernel, 1, n, 0, nullptr, out.d, rounds);
  out.down();
  for (int r = 0; r < rounds; ++r)
    for (int tid = 0; tid < n; ++tid) {
      const int lane = tid % 32, w0 = tid - lane;
      const unsigned mask = r % 2 ? 0xFFFFFFFFu : (lane < 8 ? 0xFFu : 0xFFFFFF00u);
      unsigned ballot = 0;
      bool all = true;
      for (int l = 0; l < 32; ++l)
        if (mask >> l & 1) {
          if (pred_of(w0 + l, r)) ballot |= 1u << l;
          all = all && (pred_of(w0 + l, r) || r % 4 == 3);
        }
      const unsigned* o = &out.h[(r * n + tid) * 3];
      EXPECT(o[0] == ballot, "ballot r %d tid %d: %08x vs %08x", r, tid, o[0], ballot);
      EXPECT(o[1] == (ballot != 0), "any r %d tid %d", r, tid);
      EXPECT(o[2] == (unsigned)all, "all r %d tid %d", r, tid);
    }
}

// ---------------------------------------------------------------- atomics under contention
__global__ void atomics_kernel(int* cnt, float* fsum, int* imax, unsigned* cas_cnt, int* exch, int* hist) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(cnt, 1);
  atomicAdd(fsum, 0.5f);
  atomicMax(imax, (g * 7919) % 10007);
  unsigned old = 0, seen;  // a plain first read would race with the other CASes (TSan says so)
  while ((seen = atomicCAS(cas_cnt, old, old + 2)) != old) old = seen;
  atomicExch(exch, g);
  atomicAdd(&hist[g % 5], 1);
}
static void case_atomics() {
  const int blocks = 6, threads = 192, n = blocks * threads;
  Buf<int> cnt(1, 0), imax(1, -5), exch(1, -1), hist(5, 0);
  Buf<float> fsum(1, 0.f);
  Buf<unsigned> cas(1, 0);
  MOE_LAUNCH(atomics_kernel, blocks, threads, 0, nullptr, cnt.d, fsum.d, imax.d, cas.d, exch.d, hist.d);
  cnt.down(), fsum.down(), imax.down(), cas.down(), exch.down(), hist.down();
  int want_max = -5;
  for (int g = 0; g < n; ++g) want_max = std::max(want_max, (g * 7919) % 10007);
  EXPECT(cnt.h[0] == n, "atomicAdd int %d", cnt.h[0]);
  EXPECT(fsum.h[0] == 0.5f * n, "atomicAdd float %f", fsum.h[0]);
  EXPECT(imax.h[0] == want_max, "atomicMax %d vs %d", imax.h[0], want_max);
  EXPECT(cas.h[0] == 2u * n, "atomicCAS loop %u", cas.h[0]);
  EXPECT(exch.h[0] >= 0 && exch.h[0] < n, "atomicExch %d", exch.h[0]);
  for (int b = 0; b < 5; ++b) EXPECT(hist.h[b] == (n - b + 4) / 5, "hist %d", b);
}

// ---------------------------------------------------------------- static + dynamic shared memory
// Block sum through static shared, block prefix through dynamic shared; also shows the poison.
__global__ void shared_kernel(const float* in, float* sums, float* prefix, unsigned* poison_seen) {
  MOE_SHARED_ARRAY(float, partial, 32);
  MOE_DYNAMIC_SHARED(float, scan);
  const int tid = threadIdx.x, n = blockDim.x, lane = tid % 32, warp = tid / 32;
  if (tid == 0) {  // nothing has written shared memory yet in this block
    unsigned a, b;
    std::memcpy(&a, &partial[5], 4);
    std::memcpy(&b, &scan[n - 1], 4);
    poison_seen[blockIdx.x] = (a == 0xFFFFFFFFu) + (b == 0xFFFFFFFFu);
  }
  __syncthreads();
  const float x = in[blockIdx.x * n + tid];
  float s = x;
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
  if (lane == 0) partial[warp] = s;
  scan[tid] = x;
  __syncthreads();
  if (tid == 0) {
    float t = 0;
    for (int w = 0; w < n / 32; ++w) t += partial[w];
    sums[blockIdx.x] = t;
  }
  for (int o = 1; o < n; o *= 2) {  // Hillis-Steele inclusive scan
    const float add = tid >= o ? scan[tid - o] : 0.f;
    __syncthreads();
    scan[tid] += add;
    __syncthreads();
  }
  prefix[blockIdx.x * n + tid] = scan[tid];
}
static void case_shared() {
  const int blocks = 5, n = 128;
  Buf<float> in(blocks * n), sums(blocks), prefix(blocks * n);
  Buf<unsigned> poison(blocks);
  for (int i = 0; i < blocks * n; ++i) in.h[i] = (float)((i * 37) % 11 - 5);
  in.up();
  MOE_LAUNCH(shared_kernel, blocks, n, n * sizeof(float), nullptr, in.d, sums.d, prefix.d, poison.d);
  MOE_CUDA_CHECK(cudaGetLastError());
  sums.down(), prefix.down(), poison.down();
  for (int b = 0; b < blocks; ++b) {
    float run = 0;
    for (int t = 0; t < n; ++t) {
      run += in.h[b * n + t];
      EXPECT(prefix.h[b * n + t] == run, "prefix b %d t %d", b, t);
    }
    EXPECT(sums.h[b] == run, "sum b %d", b);
#if !defined(__CUDACC__)
    EXPECT(poison.h[b] == 2, "block %d: shared memory not poisoned before the block (%u)", b, poison.h[b]);
#endif
  }
  Buf<float> fresh(4);  // emulated cudaMalloc fills with 0xCD
  unsigned bits;
  std::memcpy(&bits, &fresh.h[0], 4);
#if !defined(__CUDACC__)
  float* raw;
  cudaMalloc(&raw, 16);
  std::memcpy(&bits, raw, 4);
  EXPECT(bits == 0xCDCDCDCDu, "cudaMalloc fill %08x", bits);
  cudaFree(raw);
#endif
}

// ---------------------------------------------------------------- thread order
// `correct`: a reduction with proper barriers; the checksum must not depend on MOE_EMU_ORDER.
// `racy`: the same reduction without the barrier after the write; its result depends on the order.
template <bool kRacy>
__global__ void order_kernel(const int* in, int* out) {
  MOE_SHARED_ARRAY(int, buf, 256);
  const int tid = threadIdx.x;
  buf[tid] = in[blockIdx.x * 256 + tid];
  __syncthreads();
  for (int s = 128; s > 0; s /= 2) {
    int v = tid < s ? buf[tid] + buf[tid + s] : 0;
    __syncthreads();
    if (tid < s) buf[tid] = v;
    if (!kRacy) __syncthreads();  // without it the next round may read a partner's stale value
  }
  if (tid == 0) out[blockIdx.x] = buf[0];
}
static void run_order(bool racy) {
  const int blocks = 4;
  Buf<int> in(blocks * 256), out(blocks);
  for (int i = 0; i < blocks * 256; ++i) in.h[i] = (i * 2654435761u) % 1000;
  in.up();
  auto* k = racy ? &order_kernel<true> : &order_kernel<false>;
  MOE_LAUNCH(k, blocks, 256, 0, nullptr, in.d, out.d);
  out.down();
  unsigned long long checksum = 0;
  for (int b = 0; b < blocks; ++b) {
    checksum = checksum * 1000003 + out.h[b];
    if (!racy) {
      int want = 0;
      for (int t = 0; t < 256; ++t) want += in.h[b * 256 + t];
      EXPECT(out.h[b] == want, "block %d: %d vs %d", b, out.h[b], want);
    }
  }
  std::printf("CHECKSUM %llu\n", checksum);
}

// ---------------------------------------------------------------- cp.async pipeline
// Two-stage pipeline: tile i+1 is in flight while tile i is summed.
template <bool kForgetWait>
__global__ void cp_async_kernel(const float* in, float* out, int tiles) {
  MOE_SHARED_ARRAY(float, stage, 2 * 128);
  MOE_DYNAMIC_SHARED(float, zeros);
  const int tid = threadIdx.x;  // 32 threads x 4 floats = one 128-float tile
  float acc = 0;
  cp_async_16(&stage[tid * 4], in + tid * 4);
  cp_async_commit();
  for (int i = 0; i < tiles; ++i) {
    if (i + 1 < tiles) cp_async_16(&stage[((i + 1) % 2) * 128 + tid * 4], in + (i + 1) * 128 + tid * 4);
    cp_async_commit();
    if (!kForgetWait) cp_async_wait<1>();
    __syncthreads();
    for (int j = 0; j < 4; ++j) acc += stage[(i % 2) * 128 + ((tid + 1) % 32) * 4 + j];
    __syncthreads();
  }
  cp_async_16_zfill(&zeros[tid * 4], in, tid % 2 == 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  for (int j = 0; j < 4; ++j) acc += zeros[((tid + 1) % 32) * 4 + j] * 1000.f;
  out[tid] = acc;
}
static void run_cp_async(bool forget) {
  const int tiles = 5;
  Buf<float> in(tiles * 128), out(32);
  for (int i = 0; i < tiles * 128; ++i) in.h[i] = (float)(i % 17);
  in.up();
  auto* k = forget ? &cp_async_kernel<true> : &cp_async_kernel<false>;
  MOE_LAUNCH(k, 1, 32, 128 * sizeof(float), nullptr, in.d, out.d, tiles);
  out.down();
  for (int t = 0; t < 32; ++t) {
    const int src = (t + 1) % 32;
    float want = 0;
    for (int i = 0; i < tiles; ++i)
      for (int j = 0; j < 4; ++j) want += in.h[i * 128 + src * 4 + j];
    if (src % 2 == 0)
      for (int j = 0; j < 4; ++j) want += in.h[j] * 1000.f;
    EXPECT(out.h[t] == want, "cp.async thread %d: got %f want %f%s", t, out.h[t], want,
           std::isnan(out.h[t]) ? " (NaN: read shared memory the copy had not filled, i.e. poison)" : "");
  }
}

// ---------------------------------------------------------------- negative cases
__global__ void divergent_sync_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}
__global__ void shfl_outside_mask_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000FFFFu, (int)threadIdx.x, 20);
}
__global__ void caller_not_in_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000FFFFu, (int)threadIdx.x, 1);
}
__global__ void mask_disagree_kernel(int* out) {
  const unsigned mask = threadIdx.x < 8 ? 0x000000FFu : 0x0000FFFFu;
  if (threadIdx.x < 16) out[threadIdx.x] = __ballot_sync(mask, 1);
}
__global__ void partial_warp_kernel(int* out) {  // 48 threads: warp 1 has only 16 lanes
  out[threadIdx.x] = __shfl_down_sync(0xFFFFFFFFu, (int)threadIdx.x, 1);
}
__global__ void deadlock_kernel(int* out) {  // lane 5 skips the shuffle its warp waits in
  int v = threadIdx.x;
  if (threadIdx.x != 5) v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, (int)threadIdx.x, 1);
}
__global__ void spin_wait_kernel(int* flag) {  // waits for a flag nobody sets: needs preemption
  if (threadIdx.x == 0)
    while (atomicAdd(flag, 0) == 0) {
    }
}
__global__ void ldmatrix_global_kernel(const uint16_t* g, uint32_t* out) {
  uint32_t r[1];
  ldmatrix_x1(r, g + (threadIdx.x % 8) * 8);  // global memory: not allowed
  out[threadIdx.x] = r[0];
}

// ---------------------------------------------------------------- hardware limits
__global__ void dyn_smem_kernel(int* out, int n) {  // fills n ints of dynamic smem, reads them back
  MOE_DYNAMIC_SHARED(int, s);
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = 3 * i + 1;
  __syncthreads();
  const int i = (int)(threadIdx.x * 7919u % (unsigned)n);
  out[threadIdx.x] = s[i] == 3 * i + 1;
}
__global__ void big_static_smem_kernel(int* out) {  // 49 KB of static shared memory
  MOE_SHARED_ARRAY(int, s, 49 * 256);
  s[threadIdx.x] = 1;
  out[threadIdx.x] = s[threadIdx.x];
}
__global__ void static_plus_dyn_kernel(int* out) {  // 40 KB static beside the launch's dynamic bytes
  MOE_SHARED_ARRAY(int, s, 40 * 256);
  MOE_DYNAMIC_SHARED(int, d);
  s[threadIdx.x] = 1;
  d[threadIdx.x] = 2;
  out[threadIdx.x] = s[threadIdx.x] + d[threadIdx.x];
}
__global__ void plain_kernel(int* out) { out[threadIdx.x % 256] = 1; }

// ---------------------------------------------------------------- AddressSanitizer sees the kernels
// (run under MOE_EMU_SANITIZE=address only: without ASan they are undefined behaviour, not a test)
__global__ void global_oob_kernel(int* out, int n) {  // the last thread writes one int past the end
  out[threadIdx.x + (threadIdx.x == blockDim.x - 1 ? n - blockDim.x + 1 : 0)] = 1;
}
// (UBSan off in it: its bounds and object-size checks would report the read before ASan does)
__global__ __attribute__((no_sanitize("undefined"))) void fiber_stack_oob_kernel(int* out, int i) {
  int local[8];  // a local array on the emulated thread's (fiber's) stack
  for (int j = 0; j < 8; ++j) local[j] = j;
  out[threadIdx.x] = local[threadIdx.x == 5 ? i : 0];  // i = 8 in thread 5: one past the end
}

// Dynamic shared memory of `bytes` after setting the attribute to `attr` (< 0: not set).
static void run_dyn_smem(int attr, size_t bytes, bool expect_abort) {
  Buf<int> out(128, 0);
  if (attr >= 0) {
    const cudaError_t e = cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, attr);
    EXPECT(e == cudaSuccess, "cudaFuncSetAttribute(%d) failed: %s", attr, cudaGetErrorString(e));
  }
  MOE_LAUNCH(dyn_smem_kernel, dim3(2), dim3(128), bytes, nullptr, out.d, (int)(bytes / sizeof(int)));
  if (expect_abort) {
    std::printf("FAIL dyn_smem: the emulator did not stop a launch with %zu bytes (attribute %d)\n", bytes, attr);
    std::exit(1);
  }
  out.down();
  for (int t = 0; t < 128; ++t) EXPECT(out.h[t] == 1, "thread %d read wrong dynamic shared memory", t);
  EXPECT(::moe_emu::api::func_attribute_calls(dyn_smem_kernel) == (attr >= 0 ? 1 : 0), "attribute call count");
}

static void case_attribute_too_large() {  // a GPU refuses an attribute above the per-block maximum
  const cudaError_t e =
      cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024);
  EXPECT(e == cudaErrorInvalidValue, "attribute of 228 KB accepted: %s", cudaGetErrorString(e));
  EXPECT(cudaGetLastError() == cudaErrorInvalidValue, "the error is not sticky until read");
}

template <class... A>
static void launch_negative(void (*k)(A...), const char* name, int threads, A... a) {
  ::moe_emu::launch(name, k, dim3(1), dim3(threads), 0, nullptr, a...);
  std::printf("FAIL %s: the emulator did not stop it\n", name);
  std::exit(1);
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <case>\n", argv[0]);
    return 2;
  }
  const std::string c = argv[1];
  Buf<int> scratch(256, 0);
  Buf<uint16_t> g16(64, 0);
  Buf<uint32_t> g32(32, 0);
  const std::map<std::string, std::function<void()>> cases = {
      {"shfl", case_shfl},
      {"shfl_types", case_shfl_types},
      {"vote", case_vote},
      {"atomics", case_atomics},
      {"shared", case_shared},
      {"order_correct", [] { run_order(false); }},
      {"order_racy", [] { run_order(true); }},
      {"cp_async", [] { run_cp_async(false); }},
      {"neg_missing_cp_async_wait", [] { run_cp_async(true); }},
      {"neg_divergent_syncthreads", [&] { launch_negative(divergent_sync_kernel, "divergent", 64, scratch.d); }},
      {"neg_shfl_outside_mask", [&] { launch_negative(shfl_outside_mask_kernel, "outside", 32, scratch.d); }},
      {"neg_caller_not_in_mask", [&] { launch_negative(caller_not_in_mask_kernel, "caller", 32, scratch.d); }},
      {"neg_mask_disagree", [&] { launch_negative(mask_disagree_kernel, "disagree", 32, scratch.d); }},
      {"neg_partial_warp", [&] { launch_negative(partial_warp_kernel, "partial", 48, scratch.d); }},
      {"neg_deadlock", [&] { launch_negative(deadlock_kernel, "deadlock", 64, scratch.d); }},
      {"neg_exited_lane", [&] { launch_negative(exited_lane_kernel, "exited", 32, scratch.d); }},
      {"neg_spin_wait", [&] { launch_negative(spin_wait_kernel, "spin_wait", 32, scratch.d); }},
      {"dyn_smem_48k_no_attribute", [] { run_dyn_smem(-1, 48 * 1024, false); }},
      {"dyn_smem_with_attribute", [] { run_dyn_smem(100 * 1024, 100 * 1024, false); }},
      {"dyn_smem_200k_sm90", [] { run_dyn_smem(200 * 1024, 200 * 1024, false); }},  // MOE_EMU_ARCH=sm_90
      {"attribute_too_large", case_attribute_too_large},
      {"neg_dyn_smem_no_attribute", [] { run_dyn_smem(-1, 48 * 1024 + 16, true); }},
      {"neg_dyn_smem_attribute_too_small", [] { run_dyn_smem(64 * 1024, 64 * 1024 + 16, true); }},
      {"neg_dyn_smem_capacity_sm80", [] { run_dyn_smem(-1, 164 * 1024, true); }},
      {"neg_static_smem", [&] { launch_negative(big_static_smem_kernel, "big_static_smem", 32, scratch.d); }},
      {"neg_static_plus_dyn", [&] {
         MOE_CUDA_CHECK(cudaFuncSetAttribute(static_plus_dyn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             140 * 1024));
         ::moe_emu::launch("static_plus_dyn", static_plus_dyn_kernel, dim3(1), dim3(32), 140 * 1024, nullptr,
                           scratch.d);
         std::printf("FAIL static_plus_dyn: the emulator did not stop it\n");
         std::exit(1);
       }},
      {"neg_threads_per_block", [&] { launch_negative(plain_kernel, "plain", 1025, scratch.d); }},
      {"neg_block_z", [&] {
         ::moe_emu::launch("plain", plain_kernel, dim3(1), dim3(1, 1, 65), 0, nullptr, scratch.d);
         std::printf("FAIL block_z: the emulator did not stop it\n");
         std::exit(1);
       }},
      {"neg_grid_y", [&] {
         ::moe_emu::launch("plain", plain_kernel, dim3(1, 65536), dim3(32), 0, nullptr, scratch.d);
         std::printf("FAIL grid_y: the emulator did not stop it\n");
         std::exit(1);
       }},
      {"neg_asan_global_oob", [&] { launch_negative(global_oob_kernel, "global_oob", 32, scratch.d, 256); }},
      {"neg_asan_fiber_stack_oob", [&] { launch_negative(fiber_stack_oob_kernel, "fiber_stack_oob", 32, scratch.d, 8); }},
      {"neg_ldmatrix_global", [&] {
         launch_negative(ldmatrix_global_kernel, "ldmatrix_global", 32, (const uint16_t*)g16.d, g32.d);
       }},
  };
  auto it = cases.find(c);
  if (it == cases.end()) {
    std::fprintf(stderr, "unknown case %s\n", c.c_str());
    return 2;
  }
  it->second();
  if (g_failures) {
    std::printf("FAIL %s: %d check(s) failed\n", c.c_str(), g_failures);
    return 1;
  }
  std::printf("OK %s\n", c.c_str());
  return 0;
}
