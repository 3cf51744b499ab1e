// The cpu kernels' thread pool (pool.h has the contract and why it exists).
//
// Protocol. One job at a time holds the pool (call_mu). The caller writes the job into one of two
// slots (job g uses slot g % 2), resets `done`, and publishes it by storing state = (g << 32 | 0):
// the high half is the job's generation, the low half the next unclaimed chunk. It then bumps
// `gen` (the futex word sleeping workers wait on) and wakes sleepers, if any. Every participant
// (the caller too) claims chunk i with a compare-exchange (g, i) -> (g, i + 1), which fails once
// the pool has moved on to another job, so a worker that wakes late can never claim (or run) a
// chunk of a job it did not read. It reads the slot BEFORE the claim: the slot of job g is only
// rewritten for job g + 2, after state has left generation g, so a successful claim proves the
// slot it read belonged to g. When a participant finds no chunk left it adds the number of chunks
// it ran to `done` (one write to that shared line per participant and job, not per chunk); the
// caller returns when done == n. A job cannot finish while a claimed chunk is running or not yet
// counted, so `done` and the exception below are never touched by a job other than their own.
#include "pool.h"

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOE_PAUSE() _mm_pause()
#else
#define MOE_PAUSE() std::this_thread::yield()
#endif

namespace moe::cpu {
namespace {

using Clock = std::chrono::steady_clock;

// How long an idle worker spins for the next job before it sleeps, and how long the caller spins
// for chunks in flight before it yields its core. Long enough to bridge the gaps between the
// parallel regions of one decode step, short enough that the workers sleep soon after the step.
constexpr std::chrono::microseconds kSpin{100};

struct Slot {
  std::atomic<int64_t> n{0};
  std::atomic<int> team{0};
  std::atomic<detail::ChunkCall> call{nullptr};
  std::atomic<const void*> ctx{nullptr};
};

thread_local bool t_in_pool = false;  // this thread is a worker, or a caller inside its job

class Pool {
 public:
  ~Pool() = delete;  // never destroyed: detached workers may still read it at process exit

  void run(int64_t n, int team, detail::ChunkCall call, const void* ctx) {
    std::unique_lock<std::mutex> lock(call_mu_, std::try_to_lock);
    if (!lock.owns_lock()) return serial(n, call, ctx);  // another thread's job holds the pool
    grow(team - 1);
    const uint64_t g = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    Slot& s = slots_[g & 1];
    s.n.store(n, std::memory_order_release);
    s.team.store(team, std::memory_order_release);
    s.call.store(call, std::memory_order_release);
    s.ctx.store(ctx, std::memory_order_release);
    done_.store(0, std::memory_order_relaxed);
    failed_.store(false, std::memory_order_relaxed);
    error_ = nullptr;
    state_.store(g << 32, std::memory_order_seq_cst);  // publish
    gen_.store(uint32_t(g), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) gen_.notify_all();
    t_in_pool = true;
    work(-1);
    t_in_pool = false;
    // wait for the chunks in flight on other threads; yield the core while they take long (their
    // thread may be waiting for it)
    const auto until = Clock::now() + kSpin;
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
      if ((spins & 63) != 63 || Clock::now() < until) MOE_PAUSE();
      else std::this_thread::yield();
    }
    if (failed_.load(std::memory_order_acquire)) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

  static void serial(int64_t n, detail::ChunkCall call, const void* ctx) {
    for (int64_t i = 0; i < n; ++i) call(ctx, i);
  }

  int threads() {
    std::lock_guard<std::mutex> lock(call_mu_);
    return workers_ == 0 ? 0 : workers_ + 1;
  }

 private:
  // Claims and runs chunks of the current job until none is left; `id` is the worker's index
  // (-1: the caller). Returns false at once if the job's team has no place for this worker.
  bool work(int id) {
    int64_t finished = 0;  // chunks run here, added to done_ once (one write to a shared line per job)
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      const Slot& slot = slots_[(s >> 32) & 1];
      const int64_t n = slot.n.load(std::memory_order_acquire);
      const int team = slot.team.load(std::memory_order_acquire);
      const detail::ChunkCall call = slot.call.load(std::memory_order_acquire);
      const void* ctx = slot.ctx.load(std::memory_order_acquire);
      if (id + 1 >= team) return false;
      if (int64_t(s & 0xffffffffu) >= n) break;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      if (!failed_.load(std::memory_order_relaxed)) {
        try {
          call(ctx, int64_t(s & 0xffffffffu));
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mu_);
          if (!failed_.load(std::memory_order_relaxed)) {
            error_ = std::current_exception();
            failed_.store(true, std::memory_order_release);
          }
        }
      }
      ++finished;
    }
    // The chunks counted here all belong to the job the last claim came from: that job cannot
    // be complete before this add, so no later job can have started.
    if (finished) done_.fetch_add(finished, std::memory_order_acq_rel);
    return true;
  }

  void worker(int id) {
    t_in_pool = true;  // a kernel called from a chunk runs its own chunks serially
    uint32_t seen = gen_.load(std::memory_order_acquire);
    bool member = true;  // whether the last job's team had a place for this worker
    for (;;) {
      // a worker outside the current team (a larger team ran before) sleeps at once instead of
      // spinning beside the threads that work
      const auto until = member ? Clock::now() + kSpin : Clock::now();
      for (int spins = 0; gen_.load(std::memory_order_acquire) == seen; ++spins) {
        if ((spins & 63) != 63 || Clock::now() < until) {
          MOE_PAUSE();
          continue;
        }
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        while (gen_.load(std::memory_order_seq_cst) == seen) gen_.wait(seen, std::memory_order_seq_cst);
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      }
      seen = gen_.load(std::memory_order_acquire);
      member = work(id);
    }
  }

  void grow(int want) {  // called with call_mu_ held
    for (; workers_ < want; ++workers_) std::thread(&Pool::worker, this, workers_).detach();
  }

  std::mutex call_mu_;
  int workers_ = 0;
  Slot slots_[2];
  alignas(64) std::atomic<uint64_t> state_{0};
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<uint32_t> gen_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> failed_{false};
  std::mutex error_mu_;
  std::exception_ptr error_;
};

std::atomic<Pool*> g_pool{nullptr};

// The child of a fork has none of the parent's workers: it starts a fresh pool on its first job
// (the parent's is left as it was: its mutex may have been held by a thread that does not exist
// in the child).
void after_fork_child() { g_pool.store(nullptr, std::memory_order_relaxed); }

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, after_fork_child); });
  Pool* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
  ::operator delete(fresh);  // another thread won; no worker of `fresh` was started
  return *p;
}

bool use_openmp() {
  static const bool omp = [] {
    const char* v = std::getenv("MOE_ENGINE_POOL");
    return v && std::string(v) == "0";
  }();
  return omp;
}

}  // namespace

namespace detail {
void pool_run(int64_t n, int team, ChunkCall call, const void* ctx) {
  if (n > int64_t(0xffffffffu)) fail("parallel_for", "n=" + std::to_string(n) + " chunks; at most 2^32 - 1");
  if (t_in_pool) return Pool::serial(n, call, ctx);  // nested: this thread is already in a job
  if (use_openmp()) {
    // The comparison path (MOE_ENGINE_POOL=0): the same chunks, an OpenMP region as before the
    // pool. An exception cannot leave an OpenMP region, so it is carried out by hand.
    std::exception_ptr error;
    std::atomic<bool> failed{false};
#pragma omp parallel for schedule(static) num_threads(team)
    for (int64_t i = 0; i < n; ++i) {
      if (failed.load(std::memory_order_relaxed)) continue;
      try {
        call(ctx, i);
      } catch (...) {
#pragma omp critical(moe_pool_error)
        if (!failed.exchange(true)) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
  pool().run(n, team, call, ctx);
}
}  // namespace detail

int pool_threads() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  return p ? p->threads() : 0;
}

}  // namespace moe::cpu
