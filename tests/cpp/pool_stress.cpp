// Stress test of the cpu kernels' thread pool (csrc/cpu/pool.h), built by tests/test_pool.py
// plain and with -fsanitize=thread (a missing ordering between a chunk's writes and the caller's
// reads, or between two jobs' bookkeeping, is a data race TSan reports). Built without OpenMP, so
// it calls detail::pool_run with the team it wants. Exits non-zero with a message on any wrong count.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cpu/pool.h"

using moe::cpu::detail::pool_run;

namespace {
int failures = 0;
void expect(bool ok, const char* what, long a, long b) {
  if (!ok) {
    std::fprintf(stderr, "FAIL %s: %ld != %ld\n", what, a, b);
    ++failures;
  }
}

// One job of n chunks on `team`; each chunk writes its own slot (plain writes: the caller's
// reads after the job must be ordered after them) and counts its runs.
void job(int64_t n, int team, std::vector<long>& out, int64_t throw_at = -1) {
  out.assign(size_t(n), 0);
  auto fn = [&](int64_t i) {
    if (i == throw_at) throw std::runtime_error("chunk threw");
    out[size_t(i)] += i + 1;
  };
  using F = decltype(fn);
  pool_run(n, team, [](const void* ctx, int64_t i) { (*static_cast<F*>(const_cast<void*>(ctx)))(i); }, &fn);
}

void check(const std::vector<long>& out, const char* what) {
  for (size_t i = 0; i < out.size(); ++i) expect(out[i] == long(i) + 1, what, out[i], long(i) + 1);
}
}  // namespace

int main() {
  std::vector<long> out;
  // back-to-back jobs of varying size and team: late workers must never run a chunk twice
  for (int rep = 0; rep < 2000; ++rep) {
    job(1 + rep % 37, 2 + rep % 3, out);
    check(out, "back-to-back");
  }
  // a job that throws, then a normal one
  for (int rep = 0; rep < 50; ++rep) {
    bool threw = false;
    try {
      job(64, 4, out, rep % 64);
    } catch (const std::runtime_error&) {
      threw = true;
    }
    expect(threw, "exception reaches the caller", threw, 1);
    job(64, 4, out);
    check(out, "after an exception");
  }
  // two callers at once: one holds the pool, the other runs its chunks itself
  std::atomic<int> bad{0};
  auto caller = [&] {
    std::vector<long> mine;
    for (int rep = 0; rep < 500; ++rep) {
      job(1 + rep % 29, 3, mine);
      for (size_t i = 0; i < mine.size(); ++i)
        if (mine[i] != long(i) + 1) bad.fetch_add(1);
    }
  };
  std::thread a(caller), b(caller);
  a.join();
  b.join();
  expect(bad.load() == 0, "concurrent callers", bad.load(), 0);
  // nested: a chunk that runs a job runs it serially on its own thread
  std::vector<std::atomic<int>> inner(16);
  auto outer = [&](int64_t i) {
    auto in = [&](int64_t) { inner[size_t(i)].fetch_add(1); };
    using G = decltype(in);
    pool_run(5, 4, [](const void* ctx, int64_t j) { (*static_cast<G*>(const_cast<void*>(ctx)))(j); }, &in);
  };
  using O = decltype(outer);
  pool_run(16, 4, [](const void* ctx, int64_t i) { (*static_cast<O*>(const_cast<void*>(ctx)))(i); }, &outer);
  for (auto& c : inner) expect(c.load() == 5, "nested", c.load(), 5);
  if (failures) return 1;
  std::puts("pool_stress: ok");
  return 0;
}
