// The persistent thread pool of the cpu kernels: cpu::parallel_for(n, fn) runs fn(i) for every
// chunk i in [0, n) on a team of cpu::max_threads() threads (the caller and team - 1 workers).
//
// Why not an OpenMP region: a decode step is dozens of short parallel regions, and each OpenMP
// region ends in a barrier that waits for EVERY team member, including one the scheduler has just
// taken off its core to run another process; beside busy processes each step then waits for time
// slices it cannot use (bench/README.md, contention.py). Here chunks are claimed one at a time
// from an atomic counter and a job is done when the number of COMPLETED chunks reaches n, not
// when every thread has arrived: a worker that is descheduled while holding no chunk delays
// nothing (the caller and the others take the chunks; it finds none left when it runs again).
// Only a chunk that is in flight on a descheduled thread is waited for.
//
// Contract:
// - fn(i) must write outputs that do not depend on which thread runs chunk i or in which order
//   chunks run (the cpu kernels' fixed summation order): results are then the same bits for any
//   team size and any claim order.
// - Every chunk runs exactly once. If one throws, the chunks not yet started are skipped and the
//   first exception is rethrown on the caller once the chunks in flight have finished.
// - The team is cpu::max_threads() of the calling thread (_C.kernel_threads sets it), so the
//   adaptive decode team (src/moe_engine/decode_threads.py) sizes pool jobs as it sized OpenMP
//   regions.
// - A call from inside a chunk (nested), or while another thread's job holds the pool
//   (two Python threads in kernels at once), runs its chunks serially on the calling thread:
//   the same results, never a deadlock.
// - Idle workers spin for a bounded time (a decode step's regions follow each other within
//   microseconds) and then sleep on a futex, so they give the cores back between steps.
// - Across fork: the child starts with a fresh pool (the parent's workers do not exist there).
// - MOE_ENGINE_POOL=0 (read once, at the first job) runs the same chunks as an OpenMP
//   `parallel for` instead, to compare the two on one build (bench/contention.py --modes).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace moe::cpu {

namespace detail {
using ChunkCall = void (*)(const void* ctx, int64_t i);
void pool_run(int64_t n, int team, ChunkCall call, const void* ctx);
}  // namespace detail

// fn(i) for i in [0, n) on the pool; serially on the calling thread when `parallel` is false
// (a kernel's work threshold: below it waking the team costs more than it saves), n <= 1, or the
// team is 1.
template <class Fn>
void parallel_for(int64_t n, Fn&& fn, bool parallel = true) {
  if (n <= 0) return;
  const int team = parallel && n > 1 ? max_threads() : 1;
  if (team <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  using F = std::remove_reference_t<Fn>;
  detail::pool_run(n, team, [](const void* ctx, int64_t i) { (*static_cast<F*>(const_cast<void*>(ctx)))(i); },
                   static_cast<const void*>(&fn));
}

// Chunks for n units of roughly equal cost: at most kChunksPerThread per team member, so a
// thread that loses its core while it runs a chunk holds back one chunk, a small share of the job,
// and claims (each a write to a shared cache line) stay rare next to the work.
constexpr int kChunksPerThread = 4;
inline int64_t chunk_count(int64_t units) {
  return std::min<int64_t>(units, int64_t(kChunksPerThread) * max_threads());
}

// fn(lo, hi) over contiguous ranges that cover [0, units) once: chunk_count(units) of them.
template <class Fn>
void parallel_ranges(int64_t units, Fn&& fn, bool parallel = true) {
  const int64_t n = parallel ? chunk_count(units) : std::min<int64_t>(units, 1);
  parallel_for(n, [&](int64_t c) { fn(units * c / n, units * (c + 1) / n); }, parallel);
}

// Threads the pool holds now (its workers + 1), for tests; 0 before the first parallel job.
int pool_threads();

}  // namespace moe::cpu
