// moe_emu: run the project's CUDA kernels on the CPU, for correctness tests on machines with no GPU.
// Design, what it proves and cannot, CI steps: docs/emulator.md. Compile kernel sources as C++:
//   g++ -std=c++20 -O2 -DMOE_EMU -I<cuda>/include   (never include this header under nvcc)
//
// Model
//   * Blocks run one after another (order: MOE_EMU_ORDER). Each CUDA thread of a block is a fiber
//     (fiber.h) or, with MOE_EMU_BACKEND=threads (for ThreadSanitizer), a std::thread.
//   * `__shared__` is a plain `static`, correct only because blocks are sequential. Arrays declared
//     with MOE_SHARED_ARRAY (common.cuh) and dynamic shared memory are filled with 0xFF before every
//     block, so reading shared memory nobody wrote shows up as NaN / -1.
//   * Every wait (__syncthreads, warp collectives) is a rendezvous; the last arrival does the work
//     and wakes the others. When every live thread waits and none can be released, that is a
//     deadlock: the emulator prints where each thread waits and aborts.
//   * Misuse that is undefined behaviour on a GPU aborts with the source location: divergent
//     __syncthreads, warp masks that disagree / name exited or absent lanes / exclude the caller,
//     shuffles from lanes outside the mask, ldmatrix/cp.async outside shared memory or misaligned.
//
// Environment (read at every launch)
//   MOE_EMU_ORDER     forward | reverse | random   thread (and block) scheduling order
//   MOE_EMU_SEED      seed for `random` (default 1); the launch index is mixed in
//   MOE_EMU_BACKEND   fibers | threads             (threads is forced under -fsanitize=thread)
//   MOE_EMU_WATCHDOG_S  abort when no thread makes progress this long (default 60): a spin-wait
//                     on memory never ends on fibers and may not on threads
//   MOE_EMU_ARCH      sm_80 (default) | sm_90: whose shared-memory limits launches are checked against
//
// Hardware limits it enforces (abort with the numbers): threads per block and block / grid
// dimensions; dynamic shared memory above 48 KB without cudaFuncSetAttribute(kernel,
// cudaFuncAttributeMaxDynamicSharedMemorySize, >= bytes); static shared memory (MOE_SHARED_ARRAY)
// above 48 KB; static + dynamic above the per-block maximum of MOE_EMU_ARCH. Registers per thread
// against __launch_bounds__ are checked by tools/check_ptxas.py, not here.
//
// What it cannot show: timing, occupancy, registers, bank conflicts, plain `__shared__` arrays'
// size (only MOE_SHARED_ARRAYs are counted);
// weak-memory effects (every access is sequentially consistent here); real divergence
// (__activemask() returns the live lanes); preemption (a spin-wait on a plain load hangs);
// inter-block waiting (blocks never run concurrently); exact device numerics (__expf, FMA
// contraction, tensor-core accumulation order); faults of misaligned vector loads.
#pragma once

#if defined(__CUDACC__)
#error "csrc/emu/emu.h is for plain C++ compilers; under nvcc include the real CUDA headers"
#endif
#ifndef MOE_EMU
#define MOE_EMU 1
#endif

// Execution-space keywords must exist before the CUDA headers see them (host_defines.h keeps
// ours). __shared__ is a plain static: see the model above.
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __constant__
#define __managed__
#define __grid_constant__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>
// CUDA's __noinline__ macro breaks libstdc++'s __attribute__((__noinline__)).
#undef __noinline__
#undef __launch_bounds__
#define __launch_bounds__(...)

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <source_location>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fiber.h"
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

namespace moe_emu {

// ------------------------------------------------------------------------------------------------
// Runtime state
// ------------------------------------------------------------------------------------------------

using Loc = std::source_location;

enum class Order { forward, reverse, random };
enum class Backend { fibers, threads };
enum class Wait : uint8_t { none, barrier, warp };

struct Copy {  // one deferred cp.async
  void* dst;
  const void* src;
  uint32_t bytes;
  bool valid;
};

struct Thread {
  uint3 tid{}, bid{};
  int linear = 0, lane = 0, warp = 0;
  bool started = false, done = false;
  Wait wait = Wait::none;
  Loc where{};
  const char* what = "";
  // warp-collective slot, valid while waiting in a collective
  const void* in = nullptr;
  void* out = nullptr;
  int b = 0;
  int bar_result = 0;
  // cp.async groups: `open` is not yet committed
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> committed;
  fiber::Fiber fib;
  std::thread os;
};

struct Warp;
using WarpExec = void (*)(Warp&, uint32_t mask, int arg);

struct Group {  // lanes of one mask waiting in one warp collective
  uint32_t mask = 0, arrived = 0;
  WarpExec exec = nullptr;
  int arg = 0;
  const char* name = "";
  Loc loc{};
};

struct Warp {
  Thread* lanes[32] = {};
  uint32_t exists = 0, live = 0;
  std::vector<Group> pending;
};

struct SharedRange {
  const unsigned char* p;
  size_t n;
};

struct Runtime {
  std::mutex launch_mutex;  // one launch at a time, whatever host thread launches
  Order order = Order::forward;
  Backend backend = Backend::fibers;
  uint64_t seed = 1, launches = 0;
  double watchdog_s = 60;
  cudaError_t last_error = cudaSuccess;
  const char* kernel_name = "";

  dim3 grid, block;
  uint3 bid{};
  int nthreads = 0, live = 0, waiting = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  std::mt19937_64 rng;

  // barrier of the current phase
  int bar_arrived = 0, bar_sum = 0, bar_first = -1;
  Loc bar_loc{};

  // shared memory
  std::vector<unsigned char> dyn_storage;
  unsigned char* dyn = nullptr;
  size_t dyn_bytes = 0;
  std::vector<SharedRange> statics;  // MOE_SHARED_ARRAYs met in the current block
  bool cp_async_leak_warned = false;

  // fibers
  fiber::Scheduler sched;
  std::vector<fiber::Stack> stacks;

  // fibers watchdog: counts switches; a running fiber that never yields stops the count
  std::atomic<uint64_t> switches{0};
  std::atomic<bool> fibers_running{false};

  // threads backend
  std::mutex m;
  std::condition_variable cv;
  std::chrono::steady_clock::time_point last_progress;

  // emulated device allocations (pointer -> bytes)
  std::mutex alloc_mutex;
  std::map<const void*, size_t> allocs;

  // per-kernel attributes and the shared memory the hardware limits are checked against
  const void* kernel = nullptr;              // the kernel being launched
  size_t static_smem = 0;                    // MOE_SHARED_ARRAY bytes met in the current block
  std::mutex attr_mutex;
  std::map<const void*, int> max_dyn_smem;   // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
  std::map<const void*, int> attr_calls;     // cudaFuncSetAttribute calls per kernel (any attribute)
  std::vector<std::pair<std::string, int>> launch_log;  // (kernel, device) of every launch, for tests
};
inline thread_local int t_device = 0;  // the host thread's current fake device (api::cudaSetDevice)

inline Runtime& rt() {
  static Runtime* r = new Runtime;  // never destroyed: the fiber watchdog thread may outlive main
  return *r;
}
inline thread_local Thread* t_cur = nullptr;

// Locks the block state on the threads backend; fibers never run concurrently.
struct Lock {
  std::unique_lock<std::mutex> lk;
  Lock() {
    if (rt().backend == Backend::threads) lk = std::unique_lock<std::mutex>(rt().m);
  }
};

inline const char* base_name(const char* f) {
  const char* s = std::strrchr(f, '/');
  return s ? s + 1 : f;
}

[[noreturn]] inline void fail(const Loc& loc, const char* fmt, ...) {
  Runtime& R = rt();
  std::fprintf(stderr, "moe_emu: error in kernel %s at %s:%u", R.kernel_name, base_name(loc.file_name()),
               loc.line());
  if (Thread* t = t_cur)
    std::fprintf(stderr, " (block (%u,%u,%u), thread (%u,%u,%u), warp %d lane %d)", t->bid.x, t->bid.y,
                 t->bid.z, t->tid.x, t->tid.y, t->tid.z, t->warp, t->lane);
  std::fprintf(stderr, ":\n  ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

inline Thread& cur(const Loc& loc, const char* what) {
  Thread* t = t_cur;
  if (!t) fail(loc, "%s called outside a kernel launch", what);
  return *t;
}

// Prints where every unfinished thread waits, grouped by place, and aborts.
[[noreturn]] inline void report_stuck(const char* headline) {
  Runtime& R = rt();
  std::fprintf(stderr, "moe_emu: %s in kernel %s, block (%u,%u,%u): %d of %d threads unfinished\n", headline,
               R.kernel_name, R.bid.x, R.bid.y, R.bid.z, R.live, R.nthreads);
  struct Place {
    std::string key;
    std::vector<int> ids;
  };
  std::vector<Place> places;
  for (Thread& t : R.threads) {
    if (t.done) continue;
    char buf[512];
    if (!t.started)
      std::snprintf(buf, sizeof buf, "not started yet");
    else if (t.wait == Wait::none)
      std::snprintf(buf, sizeof buf, "running or runnable (in no emulator wait: a spin-wait or an endless loop?)");
    else
      std::snprintf(buf, sizeof buf, "waits in %s at %s:%u", t.what, base_name(t.where.file_name()),
                    t.where.line());
    auto it = std::find_if(places.begin(), places.end(), [&](const Place& p) { return p.key == buf; });
    if (it == places.end()) places.push_back({buf, {t.linear}});
    else it->ids.push_back(t.linear);
  }
  for (const Place& p : places) {
    std::fprintf(stderr, "  %zu thread(s) %s: linear ids", p.ids.size(), p.key.c_str());
    for (size_t i = 0; i < p.ids.size() && i < 16; ++i) std::fprintf(stderr, " %d", p.ids[i]);
    std::fprintf(stderr, p.ids.size() > 16 ? " ...\n" : "\n");
  }
  if (R.bar_arrived > 0)
    std::fprintf(stderr, "  barrier: %d of %d live threads arrived at %s:%u\n", R.bar_arrived, R.live,
                 base_name(R.bar_loc.file_name()), R.bar_loc.line());
  std::fflush(stderr);
  std::abort();
}

inline void progress() {
  if (rt().backend == Backend::threads) rt().last_progress = std::chrono::steady_clock::now();
}

// Current thread waits until some other thread sets its `wait` back to none. Caller holds Lock.
inline void block_current(Thread& t, Lock& lock, Wait w, const Loc& loc, const char* what) {
  Runtime& R = rt();
  t.wait = w;
  t.where = loc;
  t.what = what;
  if (++R.waiting == R.live) report_stuck("deadlock: every live thread waits and none can release the others");
  if (R.backend == Backend::fibers) {
    fiber::switch_back(R.sched, t.fib, false);
  } else {
    R.cv.wait(lock.lk, [&] { return t.wait == Wait::none; });
  }
}

inline void wake(Thread& t) {
  t.wait = Wait::none;
  --rt().waiting;
}
inline void wake_done() {
  progress();
  if (rt().backend == Backend::threads) rt().cv.notify_all();
}

// ------------------------------------------------------------------------------------------------
// Block-wide barrier
// ------------------------------------------------------------------------------------------------

inline void release_barrier() {
  Runtime& R = rt();
  for (Thread& t : R.threads)
    if (!t.done && t.wait == Wait::barrier) {
      t.bar_result = R.bar_sum;
      wake(t);
    }
  R.bar_arrived = 0;
  R.bar_sum = 0;
  R.bar_first = -1;
  wake_done();
}

inline bool same_place(const Loc& a, const Loc& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

// Counting barrier over the live threads of the block; returns the number of nonzero `pred`.
inline int barrier(int pred, const Loc& loc, const char* what) {
  Runtime& R = rt();
  Thread& t = cur(loc, what);
  Lock lock;
  if (R.bar_arrived == 0) {
    R.bar_loc = loc;
    R.bar_first = t.linear;
  } else if (!same_place(R.bar_loc, loc)) {
    fail(loc,
         "divergent %s: this thread arrived at %s:%u (column %u) while thread %d (and %d others) of the "
         "same barrier phase wait at %s:%u (column %u); a barrier must be reached by all threads of the "
         "block at the same place",
         what, base_name(loc.file_name()), loc.line(), loc.column(), R.bar_first, R.bar_arrived - 1,
         base_name(R.bar_loc.file_name()), R.bar_loc.line(), R.bar_loc.column());
  }
  R.bar_sum += pred != 0;
  if (++R.bar_arrived == R.live) {
    int sum = R.bar_sum;
    release_barrier();
    return sum;
  }
  block_current(t, lock, Wait::barrier, loc, what);
  return t.bar_result;
}

// ------------------------------------------------------------------------------------------------
// Warp collectives: one rendezvous over the lanes of the mask
// ------------------------------------------------------------------------------------------------

inline void warp_collective(const Loc& loc, const char* name, uint32_t mask, WarpExec exec, int arg, const void* in,
                            void* out, int b = 0) {
  Runtime& R = rt();
  Thread& t = cur(loc, name);
  Lock lock;
  Warp& w = R.warps[t.warp];
  const uint32_t bit = 1u << t.lane;
  if (!(mask & bit)) fail(loc, "%s: the calling lane %d is not in mask 0x%08x", name, t.lane, mask);
  if (mask & ~w.exists)
    fail(loc, "%s: mask 0x%08x names lanes that do not exist in this block (warp %d has lanes 0x%08x)", name, mask,
         t.warp, w.exists);
  if (mask & ~w.live)
    fail(loc, "%s: mask 0x%08x names lanes that have already exited (live lanes 0x%08x)", name, mask, w.live);
  // Lanes meet the group of exactly their mask. Groups of overlapping masks may coexist (lanes at
  // different points of their program), but if a waiting group needs this lane while this mask
  // needs one of its waiting lanes, neither can ever complete: the masks disagree.
  Group* g = nullptr;
  for (Group& p : w.pending) {
    if (p.mask == mask) {
      g = &p;
    } else if ((p.mask & bit) && (mask & p.arrived)) {
      fail(loc, "%s: mask 0x%08x disagrees with mask 0x%08x of lanes 0x%08x already waiting in %s at %s:%u", name,
           mask, p.mask, p.arrived, p.name, base_name(p.loc.file_name()), p.loc.line());
    }
  }
  if (g) {
    if (g->exec != exec || g->arg != arg)
      fail(loc, "%s: lanes of mask 0x%08x execute different warp collectives: lanes 0x%08x wait in %s at %s:%u",
           name, mask, g->arrived, g->name, base_name(g->loc.file_name()), g->loc.line());
  } else {
    w.pending.push_back(Group{mask, 0, exec, arg, name, loc});
    g = &w.pending.back();
  }
  t.in = in;
  t.out = out;
  t.b = b;
  g->arrived |= bit;
  if (g->arrived != mask) {
    block_current(t, lock, Wait::warp, loc, name);
    return;
  }
  exec(w, mask, arg);
  for (Group& p : w.pending)
    if (&p == g) {
      p = w.pending.back();
      w.pending.pop_back();
      break;
    }
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1) && l != t.lane) wake(*w.lanes[l]);
  wake_done();
}

// shfl.sync lane arithmetic, exactly as the PTX ISA pseudocode (mode: 0 idx, 1 up, 2 down, 3 bfly).
// c = ((32 - width) << 8) | clamp, clamp = 0 for up and 31 otherwise, as CUDA's __shfl*_sync build it.
inline int shfl_source_lane(int mode, int lane, int b, int width, bool* pval) {
  const int c = ((32 - width) << 8) | (mode == 1 ? 0 : 31);
  const int bval = b & 31, cval = c & 31, segmask = (c >> 8) & 31;
  const int maxLane = (lane & segmask) | (cval & ~segmask);
  const int minLane = lane & segmask;
  int j = 0;
  bool p = false;
  switch (mode) {
    case 0: j = minLane | (bval & ~segmask); p = j <= maxLane; break;
    case 1: j = lane - bval; p = j >= maxLane; break;
    case 2: j = lane + bval; p = j <= maxLane; break;
    default: j = lane ^ bval; p = j <= maxLane; break;
  }
  *pval = p;
  return p ? j : lane;
}

// arg = mode | width << 2 | bytes << 8
inline void exec_shfl(Warp& w, uint32_t mask, int arg) {
  const int mode = arg & 3, width = (arg >> 2) & 63, bytes = arg >> 8;
  unsigned char result[32][8];
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    bool pval;
    int j = shfl_source_lane(mode, l, w.lanes[l]->b, width, &pval);
    if (!(mask >> j & 1)) {
      static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
      t_cur = w.lanes[l];  // report the reading lane
      fail(w.lanes[l]->where.line() ? w.lanes[l]->where : Loc::current(),
           "%s: lane %d reads lane %d, which is outside mask 0x%08x (width %d, operand %d)", names[mode], l, j, mask,
           width, w.lanes[l]->b);
    }
    std::memcpy(result[l], w.lanes[j]->in, bytes);
  }
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) std::memcpy(w.lanes[l]->out, result[l], bytes);
}

template <class T>
inline T shfl(const Loc& loc, const char* name, int mode, uint32_t mask, T v, int b, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a type larger than 8 bytes");
  if (width < 1 || width > 32) fail(loc, "%s: width %d outside 1..32", name, width);
  T r;
  // the lane's own source location is kept so a bad read is reported where the reader called
  Thread& t = cur(loc, name);
  t.where = loc;
  warp_collective(loc, name, mask, exec_shfl, mode | width << 2 | (int)sizeof(T) << 8, &v, &r, b);
  return r;
}

// arg: 0 ballot, 1 any, 2 all, 3 syncwarp
inline void exec_vote(Warp& w, uint32_t mask, int arg) {
  uint32_t ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1) && *(const int*)w.lanes[l]->in) ballot |= 1u << l;
  if (arg == 3) return;
  uint32_t r = arg == 0 ? ballot : arg == 1 ? (ballot != 0) : (ballot == mask);
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) *(uint32_t*)w.lanes[l]->out = r;
}

inline uint32_t vote(const Loc& loc, const char* name, int kind, uint32_t mask, int pred) {
  uint32_t r = 0;
  warp_collective(loc, name, mask, exec_vote, kind, &pred, &r);
  return r;
}

// arg = bytes of the value: each lane gets the lanes of the mask holding a bitwise-equal value.
inline void exec_match_any(Warp& w, uint32_t mask, int bytes) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    uint32_t r = 0;
    for (int j = 0; j < 32; ++j)
      if ((mask >> j & 1) && std::memcmp(w.lanes[l]->in, w.lanes[j]->in, bytes) == 0) r |= 1u << j;
    *(uint32_t*)w.lanes[l]->out = r;
  }
}

inline uint32_t activemask(const Loc& loc) {
  Thread& t = cur(loc, "__activemask");
  Lock lock;
  return rt().warps[t.warp].live;
}

// ------------------------------------------------------------------------------------------------
// Hardware limits (compute capability 8.0 and 9.0; CUDA C++ Programming Guide, "Technical
// Specifications per Compute Capability"). MOE_EMU_ARCH=sm_80 (default: the smaller shared memory,
// so a kernel that passes here fits both builds) or sm_90. A launch or a shared-memory use past a
// limit is a bug in our host or kernel code, so it aborts with the numbers instead of returning an
// error code a caller might not check (a GPU returns cudaErrorInvalidConfiguration /
// cudaErrorInvalidValue or "too many resources requested for launch").
// ------------------------------------------------------------------------------------------------

inline constexpr unsigned kMaxThreadsPerBlock = 1024;
inline constexpr unsigned kMaxBlockXY = 1024, kMaxBlockZ = 64;
inline constexpr unsigned kMaxGridX = 0x7FFFFFFFu, kMaxGridYZ = 65535;
inline constexpr size_t kDefaultSmem = 48 * 1024;  // static + dynamic without the opt-in attribute
// Opt-in maximum per block (static + dynamic): 163 KB on sm_80, 227 KB on sm_90.
inline int emu_arch() {  // read at every use, like the other MOE_EMU_* settings
  const char* a = std::getenv("MOE_EMU_ARCH");
  if (!a || !std::strcmp(a, "sm_80")) return 80;
  if (!std::strcmp(a, "sm_90") || !std::strcmp(a, "sm_90a")) return 90;
  std::fprintf(stderr, "moe_emu: error: MOE_EMU_ARCH=%s (expected sm_80 or sm_90)\n", a);
  std::abort();
}
inline size_t max_smem_optin() { return emu_arch() >= 90 ? 227 * 1024 : 163 * 1024; }
inline const char* arch_name() { return emu_arch() >= 90 ? "sm_90" : "sm_80"; }

inline int dyn_smem_attribute(const void* kernel) {
  std::lock_guard<std::mutex> g(rt().attr_mutex);
  auto it = rt().max_dyn_smem.find(kernel);
  return it == rt().max_dyn_smem.end() ? 0 : it->second;
}

// Static shared memory of a block (MOE_SHARED_ARRAYs met so far) against the 48 KB static limit
// and, with the launch's dynamic bytes, against the per-block maximum.
inline void check_static_smem(const Loc& loc) {
  Runtime& R = rt();
  if (R.static_smem > kDefaultSmem)
    fail(loc, "static shared memory of this block reached %zu bytes, above the %zu-byte limit of static "
         "__shared__ arrays (larger tiles must use dynamic shared memory and the opt-in attribute)",
         R.static_smem, kDefaultSmem);
  if (R.static_smem + R.dyn_bytes > max_smem_optin())
    fail(loc, "shared memory of this block is %zu static + %zu dynamic = %zu bytes, above the %zu bytes "
         "one block may use on %s (MOE_EMU_ARCH)", R.static_smem, R.dyn_bytes, R.static_smem + R.dyn_bytes,
         max_smem_optin(), arch_name());
}

// ------------------------------------------------------------------------------------------------
// Shared memory
// ------------------------------------------------------------------------------------------------

inline void poison(void* p, size_t n) { std::memset(p, 0xFF, n); }

// Called by every thread at a MOE_SHARED_ARRAY declaration: the first one in each block poisons.
inline void shared_static(void* p, size_t n) {
  Lock lock;
  Runtime& R = rt();
  for (const SharedRange& r : R.statics)
    if (r.p == p) return;
  poison(p, n);
  R.statics.push_back({(const unsigned char*)p, n});
  R.static_smem += n;
  check_static_smem(Loc::current());
}

inline void* dynamic_smem() { return rt().dyn; }

inline bool in_shared(const void* p, size_t n) {
  Runtime& R = rt();
  auto inside = [&](const unsigned char* b, size_t bn) {
    auto q = (const unsigned char*)p;
    return q >= b && q + n <= b + bn;
  };
  if (R.dyn && inside(R.dyn, R.dyn_bytes)) return true;
  for (const SharedRange& r : R.statics)
    if (inside(r.p, r.n)) return true;
  return false;
}

inline void check_shared_16(const Loc& loc, const char* name, const void* p, int lane) {
  if ((uintptr_t)p & 15) fail(loc, "%s: address %p (lane %d) is not 16-byte aligned", name, p, lane);
  if (!in_shared(p, 16))
    fail(loc,
         "%s: address %p (lane %d) is not in shared memory (dynamic shared memory, or an array declared "
         "with MOE_SHARED_ARRAY so the emulator knows it)",
         name, p, lane);
}

// ------------------------------------------------------------------------------------------------
// Tensor-core and async-copy instructions (the emulated bodies of csrc/cuda/ptx.cuh)
// ------------------------------------------------------------------------------------------------

inline float bf16_bits_to_float(uint32_t h) {
  uint32_t u = (h & 0xFFFFu) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};

// Rebuilds A (16x16), B (16x8), C (16x8) from the 32 lanes' fragments (layouts in
// csrc/cuda/ptx.cuh), computes D exactly in double and rounds once.
inline void exec_mma(Warp& w, uint32_t, int) {
  double A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaIn& in = *(const MmaIn*)w.lanes[lane]->in;
    const int g = lane >> 2, t = lane & 3;
    auto lo = [](uint32_t r) { return (double)bf16_bits_to_float(r); };
    auto hi = [](uint32_t r) { return (double)bf16_bits_to_float(r >> 16); };
    A[g][2 * t] = lo(in.a[0]);     A[g][2 * t + 1] = hi(in.a[0]);
    A[g + 8][2 * t] = lo(in.a[1]); A[g + 8][2 * t + 1] = hi(in.a[1]);
    A[g][2 * t + 8] = lo(in.a[2]); A[g][2 * t + 9] = hi(in.a[2]);
    A[g + 8][2 * t + 8] = lo(in.a[3]); A[g + 8][2 * t + 9] = hi(in.a[3]);
    B[2 * t][g] = lo(in.b[0]);     B[2 * t + 1][g] = hi(in.b[0]);
    B[2 * t + 8][g] = lo(in.b[1]); B[2 * t + 9][g] = hi(in.b[1]);
    C[g][2 * t] = in.c[0];     C[g][2 * t + 1] = in.c[1];
    C[g + 8][2 * t] = in.c[2]; C[g + 8][2 * t + 1] = in.c[3];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    float* d = (float*)w.lanes[lane]->out;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
      double s = C[rows[i]][cols[i]];
      for (int k = 0; k < 16; ++k) s += A[rows[i]][k] * B[k][cols[i]];
      d[i] = (float)s;
    }
  }
}

inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                              const Loc& loc) {
  MmaIn in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  float out[4];
  warp_collective(loc, "mma.m16n8k16.bf16", 0xFFFFFFFFu, exec_mma, 0, &in, out);
  std::memcpy(d, out, sizeof out);
}

// arg = number of 8x8 matrices | trans << 3. Lane 8m + r supplies the address of row r of matrix m.
inline void exec_ldmatrix(Warp& w, uint32_t, int arg) {
  const int num = arg & 7;
  const bool trans = arg >> 3;
  uint16_t M[4][8][8];
  Thread* const self = t_cur;  // check_shared_16 reports the lane that supplied the address
  for (int m = 0; m < num; ++m)
    for (int r = 0; r < 8; ++r) {
      Thread& src = *w.lanes[8 * m + r];
      const void* p = *(const void* const*)src.in;
      t_cur = &src;
      check_shared_16(src.where, "ldmatrix", p, 8 * m + r);
      std::memcpy(M[m][r], p, 16);
    }
  t_cur = self;
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* out = (uint32_t*)w.lanes[lane]->out;
    const int g = lane >> 2, t = lane & 3;
    for (int m = 0; m < num; ++m) {
      uint32_t lo = trans ? M[m][2 * t][g] : M[m][g][2 * t];
      uint32_t hi = trans ? M[m][2 * t + 1][g] : M[m][g][2 * t + 1];
      out[m] = lo | hi << 16;
    }
  }
}

inline void ldmatrix(uint32_t* r, int num, bool trans, const void* p, const Loc& loc) {
  static const char* names[2][5] = {
      {"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
      {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
  Thread& t = cur(loc, names[trans][num]);
  t.where = loc;
  uint32_t out[4];
  warp_collective(loc, names[trans][num], 0xFFFFFFFFu, exec_ldmatrix, num | (trans ? 8 : 0), &p, out);
  std::memcpy(r, out, 4 * num);
}

inline void cp_async(void* dst, const void* src, uint32_t bytes, bool valid, const Loc& loc) {
  Thread& t = cur(loc, "cp.async");
  if ((uintptr_t)dst % bytes) fail(loc, "cp.async: shared destination %p is not %u-byte aligned", dst, bytes);
  if (valid && (uintptr_t)src % bytes) fail(loc, "cp.async: global source %p is not %u-byte aligned", src, bytes);
  {
    Lock lock;
    if (!in_shared(dst, bytes))
      fail(loc,
           "cp.async: destination %p is not in shared memory (dynamic shared memory, or an array declared "
           "with MOE_SHARED_ARRAY)",
           dst);
  }
  t.open.push_back(Copy{dst, src, bytes, valid});
}

inline void cp_async_commit(const Loc& loc) {
  Thread& t = cur(loc, "cp.async.commit_group");
  t.committed.push_back(std::move(t.open));
  t.open.clear();
}

// Completes every committed group but the newest n: only now does shared memory receive the data.
inline void cp_async_wait(int n, const Loc& loc) {
  Thread& t = cur(loc, "cp.async.wait_group");
  while ((int)t.committed.size() > n) {
    for (const Copy& c : t.committed.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, c.bytes);
      else std::memset(c.dst, 0, c.bytes);
    }
    t.committed.erase(t.committed.begin());
  }
}

// ------------------------------------------------------------------------------------------------
// Launch
// ------------------------------------------------------------------------------------------------

inline void thread_exit(Thread& t) {
  Runtime& R = rt();
  Lock lock;
  Warp& w = R.warps[t.warp];
  for (const Group& g : w.pending)
    if (g.mask >> t.lane & 1)
      fail(g.loc, "lane %d exited while lanes 0x%08x wait for it in %s (mask 0x%08x)", t.lane, g.arrived, g.name,
           g.mask);
  if ((!t.open.empty() || !t.committed.empty()) && !R.cp_async_leak_warned) {
    R.cp_async_leak_warned = true;
    std::fprintf(stderr,
                 "moe_emu: warning: kernel %s: thread %d exited with cp.async copies never waited for (their "
                 "shared-memory destinations keep the poison)\n",
                 R.kernel_name, t.linear);
  }
  t.done = true;
  w.live &= ~(1u << t.lane);
  --R.live;
  if (R.bar_arrived > 0 && R.bar_arrived == R.live) release_barrier();
  else if (R.live > 0 && R.waiting == R.live)
    report_stuck("deadlock: every remaining thread waits and none can release the others");
  wake_done();
}

inline void fiber_entry() {
  Runtime& R = rt();
  Thread& t = *t_cur;
  fiber::on_fiber_start(R.sched);
  t.started = true;
  R.body(R.body_ctx);
  thread_exit(t);
  fiber::switch_back(R.sched, t.fib, true);
  __builtin_unreachable();
}

inline std::vector<int> schedule_order(int n) {
  Runtime& R = rt();
  std::vector<int> v(n);
  for (int i = 0; i < n; ++i) v[i] = i;
  if (R.order == Order::reverse) std::reverse(v.begin(), v.end());
  if (R.order == Order::random) std::shuffle(v.begin(), v.end(), R.rng);
  return v;
}

// Fibers are never preempted, so a spin-wait on memory hangs the launch. This thread notices that
// no fiber switch happened for MOE_EMU_WATCHDOG_S seconds and aborts with the stuck report.
inline void fiber_watchdog() {
  Runtime& R = rt();
  uint64_t last = ~0ull;
  auto since = std::chrono::steady_clock::now();
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto now = std::chrono::steady_clock::now();
    const uint64_t s = R.switches.load();
    if (!R.fibers_running.load() || s != last) {
      last = s;
      since = now;
      continue;
    }
    if (std::chrono::duration<double>(now - since).count() > R.watchdog_s)
      report_stuck("watchdog: no fiber switch for MOE_EMU_WATCHDOG_S seconds (a spin-wait on memory? fibers are "
                   "never preempted)");
  }
}

inline void run_block_fibers() {
  Runtime& R = rt();
  static std::once_flag watchdog_started;
  std::call_once(watchdog_started, [] { std::thread(fiber_watchdog).detach(); });
  if (R.stacks.size() < (size_t)R.nthreads) {
    size_t old = R.stacks.size();
    R.stacks.resize(R.nthreads);
    for (size_t i = old; i < R.stacks.size(); ++i) R.stacks[i].allocate();
  }
  for (int i = 0; i < R.nthreads; ++i) fiber::init(R.threads[i].fib, R.stacks[i], fiber_entry);
  while (R.live > 0) {
    bool ran = false;
    for (int i : schedule_order(R.nthreads)) {
      Thread& t = R.threads[i];
      if (t.done || t.wait != Wait::none) continue;
      t_cur = &t;
      R.switches.fetch_add(1, std::memory_order_relaxed);
      fiber::switch_to(R.sched, t.fib);
      t_cur = nullptr;
      ran = true;
    }
    if (!ran && R.live > 0) report_stuck("deadlock: no thread can run");
  }
}

inline void run_block_threads() {
  Runtime& R = rt();
  R.last_progress = std::chrono::steady_clock::now();
  std::vector<int> order = schedule_order(R.nthreads);  // start order
  for (int i : order) {
    Thread& t = R.threads[i];
    t.os = std::thread([&t] {
      t_cur = &t;
      {
        Lock lock;
        t.started = true;
      }
      rt().body(rt().body_ctx);
      thread_exit(t);
      t_cur = nullptr;
    });
  }
  {
    std::unique_lock<std::mutex> lk(R.m);
    while (R.live > 0) {
      R.cv.wait_for(lk, std::chrono::milliseconds(100));
      double idle = std::chrono::duration<double>(std::chrono::steady_clock::now() - R.last_progress).count();
      if (R.live > 0 && idle > R.watchdog_s) report_stuck("watchdog: no progress (hang)");
    }
  }
  for (Thread& t : R.threads) t.os.join();
}

inline void configure_from_env() {
  Runtime& R = rt();
  const char* o = std::getenv("MOE_EMU_ORDER");
  std::string os = o ? o : "forward";
  if (os == "forward") R.order = Order::forward;
  else if (os == "reverse") R.order = Order::reverse;
  else if (os == "random") R.order = Order::random;
  else {
    std::fprintf(stderr, "moe_emu: error: MOE_EMU_ORDER=%s (expected forward, reverse or random)\n", o);
    std::abort();
  }
  const char* s = std::getenv("MOE_EMU_SEED");
  R.seed = s ? std::strtoull(s, nullptr, 10) : 1;
  R.rng.seed(R.seed * 0x9E3779B97F4A7C15ull + R.launches);
  const char* b = std::getenv("MOE_EMU_BACKEND");
  std::string bs = b ? b : "fibers";
  if (bs == "fibers") R.backend = Backend::fibers;
  else if (bs == "threads") R.backend = Backend::threads;
  else {
    std::fprintf(stderr, "moe_emu: error: MOE_EMU_BACKEND=%s (expected fibers or threads)\n", b);
    std::abort();
  }
#if defined(__SANITIZE_THREAD__)
  R.backend = Backend::threads;  // TSan cannot follow the hand-written fiber switch
#endif
  const char* wd = std::getenv("MOE_EMU_WATCHDOG_S");
  R.watchdog_s = wd ? std::atof(wd) : 60.0;
}

// Aborts when a launch breaks a hardware limit (see "Hardware limits" above).
inline void check_launch_config(dim3 g, dim3 b, size_t smem) {
  Runtime& R = rt();
  auto reject = [&](const char* fmt, auto... a) {
    std::fprintf(stderr, "moe_emu: error: launch of kernel %s (grid (%u,%u,%u), block (%u,%u,%u), dynamic shared "
                 "memory %zu bytes, %s) is invalid on a GPU: ", R.kernel_name, g.x, g.y, g.z, b.x, b.y, b.z, smem,
                 arch_name());
    std::fprintf(stderr, fmt, a...);
    std::fprintf(stderr, "\n");
    std::fflush(stderr);
    std::abort();
  };
  if (!g.x || !g.y || !g.z || !b.x || !b.y || !b.z) reject("a zero grid or block dimension");
  if ((uint64_t)b.x * b.y * b.z > kMaxThreadsPerBlock)
    reject("%llu threads per block, more than %u", (unsigned long long)b.x * b.y * b.z, kMaxThreadsPerBlock);
  if (b.x > kMaxBlockXY || b.y > kMaxBlockXY || b.z > kMaxBlockZ)
    reject("block dimensions above (%u, %u, %u)", kMaxBlockXY, kMaxBlockXY, kMaxBlockZ);
  if (g.x > kMaxGridX || g.y > kMaxGridYZ || g.z > kMaxGridYZ)
    reject("grid dimensions above (%u, %u, %u)", kMaxGridX, kMaxGridYZ, kMaxGridYZ);
  if (smem > max_smem_optin())
    reject("dynamic shared memory above the %zu bytes one block may use", max_smem_optin());
  if (smem > kDefaultSmem) {
    const int attr = dyn_smem_attribute(R.kernel);
    if ((size_t)attr < smem)
      reject("more than %zu bytes of dynamic shared memory need cudaFuncSetAttribute(kernel, "
             "cudaFuncAttributeMaxDynamicSharedMemorySize, >= %zu) before the launch; this kernel's attribute is %d",
             kDefaultSmem, smem, attr);
  }
}

inline void run_grid(const char* name, const void* kernel, dim3 g, dim3 b, size_t smem, void (*body)(void*),
                     void* ctx) {
  Runtime& R = rt();
  std::lock_guard<std::mutex> guard(R.launch_mutex);
  R.kernel_name = name;
  R.kernel = kernel;
  if (t_cur) fail(Loc::current(), "kernel launch from inside a kernel (dynamic parallelism) is not emulated");
  configure_from_env();
  check_launch_config(g, b, smem);
  if (R.launch_log.size() < (1u << 16)) R.launch_log.emplace_back(name, t_device);  // bounded: tests read it
  ++R.launches;
  R.grid = g;
  R.block = b;
  R.body = body;
  R.body_ctx = ctx;
  R.cp_async_leak_warned = false;
  R.nthreads = (int)(b.x * b.y * b.z);
  R.dyn_storage.assign(smem + 128, 0);
  R.dyn = smem ? (unsigned char*)(((uintptr_t)R.dyn_storage.data() + 127) & ~(uintptr_t)127) : nullptr;
  R.dyn_bytes = smem;
  const int nwarps = (R.nthreads + 31) / 32;
  const int nblocks = (int)(g.x * g.y * g.z);
  for (int blk : schedule_order(nblocks)) {
    R.bid = uint3{(unsigned)(blk % g.x), (unsigned)(blk / g.x % g.y), (unsigned)(blk / (g.x * g.y))};
    R.threads.clear();
    R.threads.resize(R.nthreads);
    R.warps.assign(nwarps, Warp{});
    for (int i = 0; i < R.nthreads; ++i) {
      Thread& t = R.threads[i];
      t.linear = i;
      t.tid = uint3{(unsigned)(i % b.x), (unsigned)(i / b.x % b.y), (unsigned)(i / (b.x * b.y))};
      t.bid = R.bid;
      t.lane = i % 32;
      t.warp = i / 32;
      R.warps[t.warp].lanes[t.lane] = &t;
      R.warps[t.warp].exists |= 1u << t.lane;
    }
    for (Warp& w : R.warps) w.live = w.exists;
    R.live = R.nthreads;
    R.waiting = 0;
    R.bar_arrived = R.bar_sum = 0;
    R.bar_first = -1;
    R.statics.clear();
    R.static_smem = 0;
    if (R.dyn) poison(R.dyn, R.dyn_bytes);
    if (R.backend == Backend::fibers) {
      R.fibers_running = true;
      run_block_fibers();
      R.fibers_running = false;
    } else {
      run_block_threads();
    }
  }
  R.threads.clear();
  R.kernel_name = "";
}

template <class Tuple, class K>
struct LaunchCtx {
  K kernel;
  Tuple* params;
  static void call(void* p) {
    auto* c = (LaunchCtx*)p;
    std::apply(c->kernel, *c->params);  // each thread receives its own copy of the parameters
  }
};

template <class... P, class... A>
inline void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
  LaunchCtx<decltype(params), void (*)(P...)> ctx{kernel, &params};
  run_grid(name, reinterpret_cast<const void*>(kernel), grid, block, smem, &decltype(ctx)::call, &ctx);
}

// ------------------------------------------------------------------------------------------------
// Host runtime API shims (host memory stands in for device memory)
// ------------------------------------------------------------------------------------------------

namespace api {

inline cudaError_t set_error(cudaError_t e) {
  if (e != cudaSuccess) rt().last_error = e;
  return e;
}

// The bytes cudaMalloc(bytes) really allocates: aligned_alloc takes a multiple of its alignment,
// so round up, plus one more block so that a zero-byte allocation is still a distinct pointer.
inline size_t malloc_padded(size_t bytes) { return (bytes + 255) / 256 * 256 + 256; }

inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  if (!p) return set_error(cudaErrorInvalidValue);
  const size_t padded = malloc_padded(bytes);
  void* q = std::aligned_alloc(256, padded);
  if (!q) return set_error(cudaErrorMemoryAllocation);
  std::memset(q, 0xCD, bytes);  // fresh device memory is garbage, not zeros
#if defined(__SANITIZE_ADDRESS__)
  // the rounding is ours, not the caller's: a kernel access past `bytes` is out of bounds
  ASAN_POISON_MEMORY_REGION((char*)q + bytes, padded - bytes);
#endif
  std::lock_guard<std::mutex> g(rt().alloc_mutex);
  rt().allocs[q] = bytes;
  *p = q;
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t bytes) {
  return cudaMalloc((void**)p, bytes);
}
inline cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> g(rt().alloc_mutex);
  auto it = rt().allocs.find(p);
  if (it == rt().allocs.end()) {
    std::fprintf(stderr, "moe_emu: error: cudaFree(%p) of a pointer cudaMalloc never returned\n", p);
    std::abort();
  }
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION((char*)p + it->second, malloc_padded(it->second) - it->second);
#endif
  rt().allocs.erase(it);
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  if (n) std::memmove(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind k, cudaStream_t = nullptr) {
  return api::cudaMemcpy(dst, src, n, k);
}
inline cudaError_t cudaMemset(void* p, int v, size_t n) {
  if (n) std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) { return cudaMemset(p, v, n); }
inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
  static std::atomic<uintptr_t> next{0x1000};
  *s = (cudaStream_t)(next += 16);  // an opaque non-null handle; launches run synchronously anyway
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }

// Fake devices: MOE_EMU_DEVICES (default 1) ids, one current device per host thread, so host code
// that picks the device (ops.h launchers' DeviceGuard) can be tested; every launch records the
// device it ran on (launch_log). Memory is shared by all of them: a pointer of another device is
// not caught here.
inline int device_count() {  // (t_device is declared beside Runtime)
  const char* d = std::getenv("MOE_EMU_DEVICES");
  const int n = d ? std::atoi(d) : 1;
  return n > 0 ? n : 1;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  if (!n) return set_error(cudaErrorInvalidValue);
  *n = device_count();
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  if (!d) return set_error(cudaErrorInvalidValue);
  *d = t_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= device_count()) return set_error(cudaErrorInvalidDevice);
  t_device = d;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetLastError() {
  cudaError_t e = rt().last_error;
  rt().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return rt().last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "emulated CUDA error";
  }
}
// Records the opt-in dynamic shared memory a launch is checked against, and counts calls per
// kernel (host code should set an attribute once per function, not before every launch).
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
  const void* k = reinterpret_cast<const void*>(f);
  std::lock_guard<std::mutex> g(rt().attr_mutex);
  ++rt().attr_calls[k];
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || (size_t)value > max_smem_optin()) return set_error(cudaErrorInvalidValue);
    rt().max_dyn_smem[k] = value;
  }
  return cudaSuccess;
}
// Test hook: (kernel name, device) of every launch since the last call, which clears the log.
inline std::vector<std::pair<std::string, int>> take_launch_log() {
  std::lock_guard<std::mutex> g(rt().launch_mutex);
  return std::exchange(rt().launch_log, {});
}
// Test hook: cudaFuncSetAttribute calls made so far, all kernels together.
inline int func_attribute_calls_total() {
  std::lock_guard<std::mutex> g(rt().attr_mutex);
  int n = 0;
  for (const auto& [k, c] : rt().attr_calls) n += c;
  return n;
}
// Test hook: cudaFuncSetAttribute calls made so far for `f`.
template <class F>
inline int func_attribute_calls(F* f) {
  std::lock_guard<std::mutex> g(rt().attr_mutex);
  auto it = rt().attr_calls.find(reinterpret_cast<const void*>(f));
  return it == rt().attr_calls.end() ? 0 : it->second;
}

}  // namespace api
}  // namespace moe_emu

// cuda_runtime_api.h (pulled in by cuda_bf16.h) declares the real functions; the kernels' host code
// must reach the shims instead.
#define cudaDeviceSynchronize ::moe_emu::api::cudaDeviceSynchronize
#define cudaFree ::moe_emu::api::cudaFree
#define cudaFuncSetAttribute ::moe_emu::api::cudaFuncSetAttribute
#define cudaGetDevice ::moe_emu::api::cudaGetDevice
#define cudaGetDeviceCount ::moe_emu::api::cudaGetDeviceCount
#define cudaGetErrorString ::moe_emu::api::cudaGetErrorString
#define cudaGetLastError ::moe_emu::api::cudaGetLastError
#define cudaMalloc ::moe_emu::api::cudaMalloc
#define cudaMemcpy ::moe_emu::api::cudaMemcpy
#define cudaMemcpyAsync ::moe_emu::api::cudaMemcpyAsync
#define cudaMemset ::moe_emu::api::cudaMemset
#define cudaMemsetAsync ::moe_emu::api::cudaMemsetAsync
#define cudaPeekAtLastError ::moe_emu::api::cudaPeekAtLastError
#define cudaSetDevice ::moe_emu::api::cudaSetDevice
#define cudaStreamCreate ::moe_emu::api::cudaStreamCreate
#define cudaStreamDestroy ::moe_emu::api::cudaStreamDestroy
#define cudaStreamSynchronize ::moe_emu::api::cudaStreamSynchronize

// ------------------------------------------------------------------------------------------------
// Device built-ins, in the global namespace as on a GPU
// ------------------------------------------------------------------------------------------------

#define threadIdx (::moe_emu::cur(std::source_location::current(), "threadIdx").tid)
#define blockIdx (::moe_emu::cur(std::source_location::current(), "blockIdx").bid)
#define blockDim (::moe_emu::rt().block)
#define gridDim (::moe_emu::rt().grid)
#define warpSize 32

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  moe_emu::barrier(0, loc, "__syncthreads");
}
inline int __syncthreads_count(int pred, std::source_location loc = std::source_location::current()) {
  return moe_emu::barrier(pred, loc, "__syncthreads_count");
}
inline int __syncthreads_or(int pred, std::source_location loc = std::source_location::current()) {
  return moe_emu::barrier(pred, loc, "__syncthreads_or") != 0;
}
inline int __syncthreads_and(int pred, std::source_location loc = std::source_location::current()) {
  return moe_emu::barrier(!pred, loc, "__syncthreads_and") == 0;
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, std::source_location loc = std::source_location::current()) {
  int zero = 0;
  moe_emu::warp_collective(loc, "__syncwarp", mask, moe_emu::exec_vote, 3, &zero, nullptr);
}
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return moe_emu::vote(loc, "__ballot_sync", 0, mask, pred);
}
inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return (int)moe_emu::vote(loc, "__any_sync", 1, mask, pred);
}
inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return (int)moe_emu::vote(loc, "__all_sync", 2, mask, pred);
}
template <class T>
  requires(std::is_integral_v<T> && (sizeof(T) == 4 || sizeof(T) == 8))
inline unsigned __match_any_sync(unsigned mask, T value, std::source_location loc = std::source_location::current()) {
  uint32_t r = 0;
  moe_emu::warp_collective(loc, "__match_any_sync", mask, moe_emu::exec_match_any, (int)sizeof(T), &value, &r);
  return r;
}
inline unsigned __activemask(std::source_location loc = std::source_location::current()) {
  return moe_emu::activemask(loc);
}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32,
                     std::source_location loc = std::source_location::current()) {
  return moe_emu::shfl(loc, "__shfl_sync", 0, mask, v, src, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                        std::source_location loc = std::source_location::current()) {
  return moe_emu::shfl(loc, "__shfl_up_sync", 1, mask, v, (int)delta, width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                          std::source_location loc = std::source_location::current()) {
  return moe_emu::shfl(loc, "__shfl_down_sync", 2, mask, v, (int)delta, width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         std::source_location loc = std::source_location::current()) {
  return moe_emu::shfl(loc, "__shfl_xor_sync", 3, mask, v, lane_mask, width);
}

// Atomics: real atomics, because the threads backend runs CUDA threads concurrently.
#define MOE_EMU_ATOMIC_RMW(name, op, ...)                                   \
  template <class T>                                                        \
    requires(std::is_same_v<T, int> || std::is_same_v<T, unsigned> ||      \
             std::is_same_v<T, unsigned long long> || std::is_same_v<T, long long> __VA_ARGS__) \
  inline T name(T* p, T v) {                                                \
    return std::atomic_ref<T>(*p).op(v);                                    \
  }
MOE_EMU_ATOMIC_RMW(atomicAdd, fetch_add, || std::is_same_v<T, float> || std::is_same_v<T, double>)
MOE_EMU_ATOMIC_RMW(atomicSub, fetch_sub, )
MOE_EMU_ATOMIC_RMW(atomicAnd, fetch_and, )
MOE_EMU_ATOMIC_RMW(atomicOr, fetch_or, )
MOE_EMU_ATOMIC_RMW(atomicXor, fetch_xor, )
#undef MOE_EMU_ATOMIC_RMW

template <class T>
  requires(std::is_integral_v<T>)
inline T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <class T>
  requires(std::is_integral_v<T>)
inline T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old > v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <class T>
  requires(std::is_integral_v<T>)
inline T atomicCAS(T* p, T compare, T v) {
  std::atomic_ref<T>(*p).compare_exchange_strong(compare, v);
  return compare;  // the old value either way
}
template <class T>
inline T atomicExch(T* p, T v) {
  return std::atomic_ref<T>(*p).exchange(v);
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// Fast-math intrinsics: the host libm versions (more accurate than the GPU's; compare with tolerances).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : std::min(std::max(x, 0.0f), 1.0f); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
  return (x >> 16) | (x << 16);
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
