// Fibers for the CUDA emulator: one per emulated CUDA thread, all on the launching OS thread.
//
// Two implementations of the same three calls (fiber_init, fiber_switch_to, fiber_switch_back):
//  - a hand-written x86-64 System V context switch (six callee-saved registers, MXCSR and the x87
//    control word; ~10x cheaper than swapcontext, which makes a sigprocmask syscall per switch);
//  - glibc ucontext, on other architectures or when MOE_EMU_UCONTEXT is defined.
// Under AddressSanitizer either one is wrapped in ASan's fiber annotations
// (__sanitizer_start/finish_switch_fiber), so ASan knows which stack is live; the annotations,
// not the switch, are what ASan needs. (The ASan builds used ucontext until 2026-12: the
// sigprocmask syscall per switch made them ~13x slower than they need to be.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__) && !defined(MOE_EMU_UCONTEXT)
#define MOE_EMU_UCONTEXT 1  // the asm switch below is x86-64 only
#endif

#if defined(MOE_EMU_UCONTEXT)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(MOE_EMU_UCONTEXT)
// moe_emu_switch(void** save_sp, void* load_sp): push callee-saved state, swap stacks, pop.
// A naked inline function rather than top-level asm: inline gives it COMDAT linkage, so every
// translation unit may include this header, link-time optimisation included (LTO pastes all
// top-level asm of a module into one file, where a second definition is an error).
[[gnu::naked, gnu::noinline]] inline void moe_emu_switch(void** /*save_sp: rdi*/, void* /*load_sp: rsi*/) {
  asm(R"(
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq  $8, %rsp
  stmxcsr (%rsp)
  fnstcw  4(%rsp)
  movq  %rsp, (%rdi)
  movq  %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw   4(%rsp)
  addq  $8, %rsp
  popq  %r15
  popq  %r14
  popq  %r13
  popq  %r12
  popq  %rbx
  popq  %rbp
  ret
)");
}
#endif

namespace moe_emu::fiber {

#if defined(__SANITIZE_ADDRESS__)
inline constexpr size_t kStackBytes = 1u << 20;  // ASan frames are several times larger
#else
inline constexpr size_t kStackBytes = 256u << 10;
#endif

// A stack with a PROT_NONE guard page below it, so an overflow faults instead of corrupting.
struct Stack {
  char* base = nullptr;  // lowest usable byte
  size_t size = 0;
  void allocate() {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "moe_emu: error: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(p, page, PROT_NONE);
    base = (char*)p + page;
    size = kStackBytes;
  }
};

struct Fiber {
#if defined(MOE_EMU_UCONTEXT)
  ucontext_t ctx;
#else
  void* sp = nullptr;
#endif
  Stack* stack = nullptr;
  void* asan_fake = nullptr;
};

struct Scheduler {
#if defined(MOE_EMU_UCONTEXT)
  ucontext_t ctx;
#else
  void* sp = nullptr;
#endif
  void* asan_fake = nullptr;
  const void* stack_bottom = nullptr;  // the scheduler's own stack, learnt by ASan on first switch
  size_t stack_size = 0;
};

// Prepare `f` so that the first switch to it calls entry() on its own stack. entry never returns.
inline void init(Fiber& f, Stack& s, void (*entry)()) {
  f.stack = &s;
#if defined(MOE_EMU_UCONTEXT)
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = s.base;
  f.ctx.uc_stack.ss_size = s.size;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, entry, 0);
#else
  // Frame popped by moe_emu_switch: [mxcsr|fpucw][r15 r14 r13 r12 rbx rbp][ret = entry][0].
  // After `ret`, rsp = top - 8, i.e. 8 mod 16, exactly as if entry had been called.
  uintptr_t top = ((uintptr_t)(s.base + s.size)) & ~(uintptr_t)15;
  uint64_t* p = (uint64_t*)top;
  *--p = 0;                  // fake return address of entry
  *--p = (uint64_t)entry;    // consumed by ret
  for (int i = 0; i < 6; ++i) *--p = 0;
  uint32_t mx = __builtin_ia32_stmxcsr();
  uint16_t cw;
  asm volatile("fnstcw %0" : "=m"(cw));
  *--p = (uint64_t)mx | ((uint64_t)cw << 32);
  f.sp = p;
#endif
}

// Scheduler -> fiber.
inline void switch_to(Scheduler& s, Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&s.asan_fake, f.stack->base, f.stack->size);
#endif
#if defined(MOE_EMU_UCONTEXT)
  swapcontext(&s.ctx, &f.ctx);
#else
  moe_emu_switch(&s.sp, f.sp);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(s.asan_fake, nullptr, nullptr);
#endif
}

// Fiber -> scheduler. `last` = the fiber will never run again (ASan then frees its fake stack).
inline void switch_back(Scheduler& s, Fiber& f, bool last) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(last ? nullptr : &f.asan_fake, s.stack_bottom, s.stack_size);
#else
  (void)last;
#endif
#if defined(MOE_EMU_UCONTEXT)
  swapcontext(&f.ctx, &s.ctx);
#else
  moe_emu_switch(&f.sp, s.sp);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.asan_fake, nullptr, nullptr);
#endif
}

// First thing a fresh fiber does (ASan bookkeeping: learn the scheduler's stack).
inline void on_fiber_start(Scheduler& s) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &s.stack_bottom, &s.stack_size);
#else
  (void)s;
#endif
}

}  // namespace moe_emu::fiber
