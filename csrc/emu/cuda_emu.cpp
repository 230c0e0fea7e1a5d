// cuda_emu.cpp: the runtime of cuda_emu.h (see there for what it emulates).
// TEST-ONLY.
//
// Design: one fiber per CUDA thread. A fiber is a stack (mmap'ed, with a guard
// page) and a saved stack pointer; switching is a dozen instructions of
// assembly on x86-64 (callee-saved registers, MXCSR and the x87 control word),
// ucontext elsewhere. A block runs on one OS thread: its scheduler picks the
// next runnable fiber, which runs until it waits (barrier, shuffle) or exits.
// Fibers rather than OS threads because a 256-thread block would otherwise cost
// 256 kernel threads and two futex round trips per thread per barrier or
// shuffle (~100x slower on a 2-core machine), and because with fibers the
// schedule is a pure function of the seed (a failure replays exactly) and a
// deadlock is detected exactly (no runnable fiber) instead of by a timeout.
// Blocks share nothing but global memory: up to `workers` OS threads run
// different blocks at the same time, each from a shuffled list of the grid,
// each block on an OS thread of its own (its static __shared__ memory, which is
// thread_local, starts zeroed: per block, and the same whatever ran before).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__) || defined(FASTELBO_EMU_UCONTEXT)
#define FASTELBO_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

#include <cxxabi.h>
#include <dlfcn.h>

#include "cuda_emu.h"

namespace fastelbo_emu {
namespace detail {
namespace {

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------
std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  return std::strtoull(v, nullptr, 0);
}

double env_double(const char* name, double fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  return std::strtod(v, nullptr);
}

std::atomic<std::uint64_t> g_seed{env_u64("FASTELBO_EMU_SEED", 0)};
std::atomic<std::uint64_t> g_launches{0};
std::atomic<int> g_workers{[] {
  const std::uint64_t w = env_u64("FASTELBO_EMU_WORKERS", 0);
  if (w > 0) return static_cast<int>(std::min<std::uint64_t>(w, 64));
  const unsigned hw = std::thread::hardware_concurrency();
  return static_cast<int>(std::max(1u, std::min(4u, hw)));
}()};

constexpr unsigned kMaxBlock = 1024;
constexpr std::size_t kMaxDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute opt-in
constexpr std::size_t kStackBytes = 128 * 1024;

// splitmix64: seeds and the schedules' random numbers.
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

struct Rng {
  std::uint64_t s;
  std::uint64_t next() { return mix(s++); }
  unsigned below(unsigned n) { return static_cast<unsigned>(next() % n); }
};

// ---------------------------------------------------------------------------
// Context switching
// ---------------------------------------------------------------------------
#if defined(FASTELBO_EMU_USE_UCONTEXT)
struct Context {
  ucontext_t uc;
};

void fiber_entry_u(unsigned hi, unsigned lo);
void (*g_entry)(void*) = nullptr;

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void make_context(Context& c, char* stack_lo, std::size_t bytes, void (*fn)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack_lo;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  g_entry = fn;
  const auto p = reinterpret_cast<std::uintptr_t>(arg);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(&fiber_entry_u), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p & 0xffffffffu));
}

void fiber_entry_u(unsigned hi, unsigned lo) {
  g_entry(reinterpret_cast<void*>((static_cast<std::uintptr_t>(hi) << 32) | lo));
}
#else
// x86-64 System V: save the callee-saved registers, MXCSR and the x87 control
// word on the current stack, swap stack pointers, restore, return.
extern "C" void fastelbo_emu_switch(void** save_sp, void* load_sp);
extern "C" void fastelbo_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl fastelbo_emu_switch
  .hidden fastelbo_emu_switch
  .type fastelbo_emu_switch, @function
fastelbo_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastelbo_emu_switch, .-fastelbo_emu_switch

  .p2align 4
  .globl fastelbo_emu_trampoline
  .hidden fastelbo_emu_trampoline
  .type fastelbo_emu_trampoline, @function
fastelbo_emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size fastelbo_emu_trampoline, .-fastelbo_emu_trampoline
)");

struct Context {
  void* sp = nullptr;
};

void switch_context(Context& from, Context& to) { fastelbo_emu_switch(&from.sp, to.sp); }

// The first switch into c pops this frame: control words, r15..rbp (r12 = arg,
// r13 = fn) and returns into the trampoline with a 16-byte aligned stack.
void make_context(Context& c, char* stack_lo, std::size_t bytes, void (*fn)(void*), void* arg) {
  auto top = reinterpret_cast<std::uintptr_t>(stack_lo + bytes) & ~std::uintptr_t(15);
  auto* r = reinterpret_cast<std::uint64_t*>(top - 16);  // after `ret`: rsp = r, 16-byte aligned
  r[-1] = reinterpret_cast<std::uint64_t>(&fastelbo_emu_trampoline);
  r[-2] = 0;                                        // rbp
  r[-3] = 0;                                        // rbx
  r[-4] = reinterpret_cast<std::uint64_t>(arg);     // r12
  r[-5] = reinterpret_cast<std::uint64_t>(fn);      // r13
  r[-6] = 0;                                        // r14
  r[-7] = 0;                                        // r15
  std::uint32_t mxcsr;
  std::uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  auto* ctl = reinterpret_cast<unsigned char*>(r - 9);  // 16 bytes: x87 control word, then MXCSR at +8
  std::memset(ctl, 0, 16);
  std::memcpy(ctl, &fpucw, sizeof(fpucw));
  std::memcpy(ctl + 8, &mxcsr, sizeof(mxcsr));
  c.sp = ctl;
}
#endif

// ---------------------------------------------------------------------------
// Stacks: sets of kMaxBlock fiber stacks with a guard page below each, pooled.
// ---------------------------------------------------------------------------
struct StackSet {
  char* base = nullptr;
  std::size_t stride = 0;
  char* stack(unsigned i) const { return base + i * stride + page(); }
  static std::size_t page() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
};

std::mutex g_pool_mu;
std::vector<StackSet> g_pool;

StackSet acquire_stacks();  // below (uses fail())
void release_stacks(const StackSet& s) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_pool.push_back(s);
}

// ---------------------------------------------------------------------------
// Blocks, warps, fibers
// ---------------------------------------------------------------------------
enum class State : unsigned char { kRunnable, kRunning, kBarrier, kShuffle, kExited };

struct Fiber {
  Context ctx;
  ThreadCtx tctx;
  unsigned tid = 0, warp = 0, lane = 0, prio = 0;
  State state = State::kRunnable;
  const char* file = nullptr;  // where it waits
  int line = 0;
  // the pending shuffle
  Shfl kind = Shfl::kXor;
  unsigned mask = 0, size = 0;
  int param = 0, width = 0;
  std::uint64_t value = 0, result = 0;
};

struct Warp {
  unsigned first = 0, size = 0, arrived = 0, exited = 0;
};

struct Block {
  const LaunchSpec* spec = nullptr;
  std::uint64_t seed = 0, launch = 0;
  unsigned index = 0, n = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;  // dynamic shared memory
  unsigned barrier_arrived = 0, exited = 0;
  Context sched;
  Rng rng{0};
  // Scheduling: a fiber's priority is its index in fiber_of_prio; the runnable
  // fiber of highest priority runs. reprio (of 256): chance that a fiber that
  // starts to wait swaps priorities with a random fiber (0: one fixed order
  // for the whole block, 256: close to a uniformly random pick each time).
  std::vector<unsigned> fiber_of_prio;
  std::vector<std::uint64_t> ready;
  unsigned reprio = 0, policy = 0;
};

thread_local Block* tl_block = nullptr;
thread_local Fiber* tl_fiber = nullptr;
thread_local const LaunchSpec* tl_spec = nullptr;

void set_ready(Block& b, unsigned prio) { b.ready[prio >> 6] |= std::uint64_t(1) << (prio & 63); }
void clear_ready(Block& b, unsigned prio) { b.ready[prio >> 6] &= ~(std::uint64_t(1) << (prio & 63)); }
bool is_ready(const Block& b, unsigned prio) { return (b.ready[prio >> 6] >> (prio & 63)) & 1u; }

int highest_ready(const Block& b) {
  for (std::size_t w = b.ready.size(); w-- > 0;) {
    if (b.ready[w]) return static_cast<int>(w * 64 + 63 - static_cast<unsigned>(__builtin_clzll(b.ready[w])));
  }
  return -1;
}

bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

void make_runnable(Block& b, Fiber& f) {
  f.state = State::kRunnable;
  set_ready(b, f.prio);
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------
std::string base_name(const char* file) {
  if (file == nullptr) return "?";
  std::string s(file);
  const auto slash = s.find_last_of('/');
  if (slash == std::string::npos) return s;
  const auto prev = slash == 0 ? std::string::npos : s.find_last_of('/', slash - 1);
  return s.substr(prev == std::string::npos ? 0 : prev + 1);  // "cuda/reduce_kernel.h"
}

std::string where(const char* file, int line) { return base_name(file) + ":" + std::to_string(line); }

// "0-15, 17, 20-31"
std::string ranges(const std::vector<unsigned>& v) {
  std::ostringstream os;
  for (std::size_t i = 0; i < v.size();) {
    std::size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (i) os << ", ";
    os << v[i];
    if (j > i) os << "-" << v[j];
    i = j + 1;
  }
  return os.str();
}

// The kernel: its symbol when the dynamic linker knows it, else its parameter
// types (from the launch template's signature).
std::string kernel_of(const LaunchSpec& spec) {
  Dl_info info;
  if (spec.kernel != nullptr && dladdr(spec.kernel, &info) && info.dli_sname != nullptr &&
      info.dli_saddr == spec.kernel) {
    int status = 0;
    char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    if (status == 0 && name != nullptr) {
      std::string out(name);
      std::free(name);
      return out;
    }
    return info.dli_sname;
  }
  std::string s(spec.signature ? spec.signature : "");
  const auto p = s.find("P = {");
  if (p == std::string::npos) return s;
  int depth = 0;
  for (std::size_t i = p + 4; i < s.size(); ++i) {
    if (s[i] == '{') ++depth;
    if (s[i] == '}' && --depth == 0) return "a kernel(" + s.substr(p + 5, i - p - 5) + ")";
  }
  return s;
}

// "lane 3" / "lanes 0-7, 9"
std::string plural(const char* word, const std::vector<unsigned>& v) {
  return std::string(word) + (v.size() == 1 ? " " : "s ") + ranges(v);
}

const char* what_waits(State s) {
  switch (s) {
    case State::kBarrier:
      return "__syncthreads()";
    case State::kShuffle:
      return "a shuffle";
    case State::kExited:
      return "exited";
    default:
      return "running";
  }
}

std::mutex g_fail_mu;

[[noreturn]] void fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(g_fail_mu);
  std::ostringstream os;
  os << "\nfastelbo CUDA emulation: " << what << "\n";
  const LaunchSpec* spec = tl_block ? tl_block->spec : tl_spec;
  if (spec != nullptr) {
    os << "  kernel: " << kernel_of(*spec) << "\n";
    os << "  launched at " << where(spec->file, spec->line) << " by " << (spec->caller ? spec->caller : "?")
       << "\n  grid " << spec->grid.x << ", block " << spec->block.x << ", dynamic shared memory " << spec->smem
       << " B\n";
  }
  if (tl_block != nullptr) {
    os << "  block " << tl_block->index << ", launch #" << tl_block->launch << " of the process, schedule seed "
       << tl_block->seed << " (FASTELBO_EMU_SEED=" << g_seed.load() << ")\n";
  }
  std::fputs(os.str().c_str(), stderr);
  std::fflush(stderr);
  std::abort();
}

StackSet acquire_stacks() {
  {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    if (!g_pool.empty()) {
      StackSet s = g_pool.back();
      g_pool.pop_back();
      return s;
    }
  }
  StackSet s;
  s.stride = kStackBytes + StackSet::page();
  const std::size_t bytes = s.stride * kMaxBlock;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fail("cannot map " + std::to_string(bytes >> 20) + " MiB of fiber stacks");
  s.base = static_cast<char*>(p);
  for (unsigned i = 0; i < kMaxBlock; ++i) mprotect(s.base + i * s.stride, StackSet::page(), PROT_NONE);
  return s;
}

// ---------------------------------------------------------------------------
// Switching between a fiber and its block's scheduler
// ---------------------------------------------------------------------------
// A fiber that starts to wait may swap priorities with a random fiber.
void maybe_reprioritize(Block& b, Fiber& f) {
  if (b.reprio == 0 || b.n < 2) return;
  if (b.reprio < 256 && (b.rng.next() & 255u) >= b.reprio) return;
  Fiber& g = b.fibers[b.rng.below(b.n)];
  if (&g == &f) return;
  const bool f_ready = is_ready(b, f.prio), g_ready = is_ready(b, g.prio);
  clear_ready(b, f.prio);
  clear_ready(b, g.prio);
  std::swap(f.prio, g.prio);
  b.fiber_of_prio[f.prio] = f.tid;
  b.fiber_of_prio[g.prio] = g.tid;
  if (f_ready) set_ready(b, f.prio);
  if (g_ready) set_ready(b, g.prio);
}

void yield_to_scheduler(Block& b, Fiber& f) { switch_context(f.ctx, b.sched); }

void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
  Block& b = *tl_block;
  try {
    b.spec->body(b.spec->params);
  } catch (const std::exception& e) {
    fail(std::string("thread ") + std::to_string(f.tid) + " threw a C++ exception: " + e.what());
  } catch (...) {
    fail("thread " + std::to_string(f.tid) + " threw a C++ exception");
  }
  Fiber& self = f;  // (named for the messages below)
  self.state = State::kExited;
  ++b.exited;
  Warp& w = b.warps[self.warp];
  ++w.exited;
  if (b.barrier_arrived > 0) {
    std::vector<unsigned> waiting;
    const char* file = nullptr;
    int line = 0;
    for (const Fiber& o : b.fibers) {
      if (o.state == State::kBarrier) {
        waiting.push_back(o.tid);
        file = o.file;
        line = o.line;
      }
    }
    fail("barrier divergence: thread " + std::to_string(self.tid) + " exited the kernel while " +
         plural("thread", waiting) + (waiting.size() == 1 ? " waits" : " wait") + " at __syncthreads() at " +
         where(file, line) + " (every thread of the block must reach each __syncthreads())");
  }
  if (w.arrived > 0) {
    std::vector<unsigned> waiting;
    const char* file = nullptr;
    int line = 0;
    for (unsigned l = 0; l < w.size; ++l) {
      const Fiber& o = b.fibers[w.first + l];
      if (o.state == State::kShuffle) {
        waiting.push_back(l);
        file = o.file;
        line = o.line;
      }
    }
    fail("shuffle reached by only part of a warp: lane " + std::to_string(self.lane) + " (thread " +
         std::to_string(self.tid) + ") of warp " + std::to_string(self.warp) + " exited the kernel while " +
         plural("lane", waiting) + (waiting.size() == 1 ? " waits" : " wait") + " at the full-mask shuffle at " +
         where(file, line) + " (all 32 lanes must reach it)");
  }
  yield_to_scheduler(b, self);
  std::abort();  // an exited fiber is never resumed
}

[[noreturn]] void deadlock(Block& b) {
  std::ostringstream os;
  os << "deadlock: no thread of block " << b.index << " can run (" << b.exited << " of " << b.n << " exited)";
  // The barrier: who waits there, who is elsewhere.
  std::vector<unsigned> at_barrier;
  const char* bfile = nullptr;
  int bline = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kBarrier) {
      at_barrier.push_back(f.tid);
      bfile = f.file;
      bline = f.line;
    }
  }
  if (!at_barrier.empty()) {
    os << "\n  __syncthreads() at " << where(bfile, bline) << " reached by threads " << ranges(at_barrier)
       << " only; the others wait at a shuffle (barrier divergence)";
  }
  for (const Warp& w : b.warps) {
    if (w.arrived == 0) continue;
    std::vector<unsigned> lanes;
    const Fiber* any = nullptr;
    for (unsigned l = 0; l < w.size; ++l) {
      const Fiber& f = b.fibers[w.first + l];
      if (f.state == State::kShuffle) {
        lanes.push_back(l);
        any = &f;
      }
    }
    os << "\n  warp " << (w.first / 32) << " (threads " << w.first << "-" << (w.first + w.size - 1)
       << "): a shuffle at " << where(any->file, any->line) << " reached by " << plural("lane", lanes)
       << " only; the other lanes:";
    // the other lanes, grouped by where they are
    std::vector<bool> told(w.size, false);
    for (unsigned l = 0; l < w.size; ++l) {
      const Fiber& f = b.fibers[w.first + l];
      if (f.state == State::kShuffle || told[l]) continue;
      std::vector<unsigned> same;
      for (unsigned m = l; m < w.size; ++m) {
        const Fiber& g = b.fibers[w.first + m];
        if (!told[m] && g.state == f.state && (f.state != State::kBarrier || same_site(f, g))) {
          same.push_back(m);
          told[m] = true;
        }
      }
      os << " " << ranges(same) << " " << what_waits(f.state);
      if (f.state == State::kBarrier) os << " at " << where(f.file, f.line);
      os << ";";
    }
    os << " (shuffle reached by only part of a warp)";
  }
  fail(os.str());
}

// A new priority order for the whole block (fiber_of_prio; the fibers' prio is
// set from it by the caller): policy 0 groups each warp's lanes.
void draw_priorities(Block& b) {
  const unsigned n = b.n;
  if (b.policy == 0) {
    std::vector<unsigned> warp_order(b.warps.size());
    for (unsigned w = 0; w < warp_order.size(); ++w) warp_order[w] = w;
    for (unsigned i = static_cast<unsigned>(warp_order.size()); i > 1; --i)
      std::swap(warp_order[i - 1], warp_order[b.rng.below(i)]);
    unsigned p = 0;
    for (unsigned w : warp_order) {
      const unsigned first = p;
      for (unsigned l = 0; l < b.warps[w].size; ++l) b.fiber_of_prio[p++] = b.warps[w].first + l;
      for (unsigned i = p - first; i > 1; --i)
        std::swap(b.fiber_of_prio[first + i - 1], b.fiber_of_prio[first + b.rng.below(i)]);
    }
  } else {
    for (unsigned i = 0; i < n; ++i) b.fiber_of_prio[i] = i;
    for (unsigned i = n; i > 1; --i) std::swap(b.fiber_of_prio[i - 1], b.fiber_of_prio[b.rng.below(i)]);
  }
}

void run_block(Block& b, const LaunchSpec& spec, const StackSet& stacks, unsigned index, std::uint64_t launch_seed) {
  const unsigned n = spec.block.x;
  b.spec = &spec;
  b.index = index;
  b.n = n;
  b.seed = mix(launch_seed ^ mix(index));
  b.rng = Rng{b.seed};
  b.barrier_arrived = 0;
  b.exited = 0;
  b.fibers.resize(n);
  b.warps.assign((n + 31) / 32, Warp{});
  for (unsigned w = 0; w < b.warps.size(); ++w) {
    b.warps[w].first = w * 32;
    b.warps[w].size = std::min(32u, n - w * 32);
  }
  if (spec.smem) {
    b.smem.assign(spec.smem + 16, 0xff);
  }
  unsigned char* smem = nullptr;
  if (spec.smem) {
    auto p = reinterpret_cast<std::uintptr_t>(b.smem.data());
    smem = b.smem.data() + ((16 - (p & 15)) & 15);
  }
  // Priorities, one of four policies per block (the first drawn half the time):
  //   0: warps in a random order, each warp's lanes together, the order re-drawn
  //      at half the barriers (a warp that runs late runs late until the next
  //      barrier at least: the races between warps around shared memory);
  //   1: the threads in one random order for the whole block;
  //   2: the same, re-drawn for a thread with chance 1/8 each time it waits;
  //   3: re-drawn each time (close to a uniformly random pick at every switch).
  b.fiber_of_prio.resize(n);
  static constexpr unsigned kPolicy[8] = {0, 0, 0, 0, 1, 2, 3, 3};
  static constexpr unsigned kReprio[4] = {0, 0, 32, 256};
  b.policy = kPolicy[b.rng.below(8)];
  b.reprio = kReprio[b.policy];
  draw_priorities(b);
  b.ready.assign((n + 63) / 64, 0);
  for (unsigned p = 0; p < n; ++p) {
    Fiber& f = b.fibers[b.fiber_of_prio[p]];
    f = Fiber{};
    f.tid = b.fiber_of_prio[p];
    f.warp = f.tid / 32;
    f.lane = f.tid % 32;
    f.prio = p;
    f.tctx = ThreadCtx{uint3{f.tid, 0, 0}, uint3{index, 0, 0}, spec.block, spec.grid, smem, spec.smem};
    make_context(f.ctx, stacks.stack(f.tid), kStackBytes, &fiber_main, &f);
    set_ready(b, p);
  }
  tl_block = &b;
  for (;;) {
    const int p = highest_ready(b);
    if (p < 0) {
      if (b.exited == n) break;
      deadlock(b);
    }
    Fiber& f = b.fibers[b.fiber_of_prio[static_cast<unsigned>(p)]];
    clear_ready(b, f.prio);
    f.state = State::kRunning;
    tl_fiber = &f;
    tl_ctx = &f.tctx;
    switch_context(b.sched, f.ctx);
    tl_ctx = nullptr;
    tl_fiber = nullptr;
  }
  tl_block = nullptr;
}

Fiber& current(const char* what) {
  if (tl_fiber == nullptr || tl_block == nullptr) outside_kernel(what);
  return *tl_fiber;
}

}  // namespace

// ---------------------------------------------------------------------------
// Built-ins
// ---------------------------------------------------------------------------
void outside_kernel(const char* what) {
  fail(std::string(what) + " used outside a kernel launch (only code running inside FASTELBO_LAUNCH may)");
}

void barrier(const char* file, int line) {
  Fiber& f = current("__syncthreads()");
  Block& b = *tl_block;
  if (b.exited > 0) {
    std::vector<unsigned> gone;
    for (const Fiber& o : b.fibers)
      if (o.state == State::kExited) gone.push_back(o.tid);
    fail("barrier divergence: thread " + std::to_string(f.tid) + " reached __syncthreads() at " + where(file, line) +
         " after " + plural("thread", gone) +
         " exited the kernel (every thread of the block must reach each __syncthreads())");
  }
  f.state = State::kBarrier;
  f.file = file;
  f.line = line;
  if (++b.barrier_arrived == b.n) {
    for (const Fiber& o : b.fibers) {
      if (!same_site(o, f)) {
        fail("barrier divergence: the threads of the block wait at different __syncthreads(): thread " +
             std::to_string(o.tid) + " at " + where(o.file, o.line) + ", thread " + std::to_string(f.tid) + " at " +
             where(f.file, f.line));
      }
    }
    b.barrier_arrived = 0;
    if (b.policy == 0 && b.rng.below(2) == 0) {  // every fiber waits here: a new order for all of them
      draw_priorities(b);
      for (unsigned p = 0; p < b.n; ++p) b.fibers[b.fiber_of_prio[p]].prio = p;
    }
    for (Fiber& o : b.fibers) make_runnable(b, o);  // f too: it runs again when the scheduler picks it
  }
  maybe_reprioritize(b, f);
  yield_to_scheduler(b, f);
}

std::uint64_t shuffle(Shfl kind, unsigned mask, std::uint64_t bits, int param, int width, unsigned size,
                      const char* file, int line) {
  const char* name = kind == Shfl::kXor ? "__shfl_xor_sync" : "__shfl_down_sync";
  Fiber& f = current(name);
  Block& b = *tl_block;
  Warp& w = b.warps[f.warp];
  if (mask != 0xffffffffu) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%08x", mask);
    fail(std::string(name) + " at " + where(file, line) + " with mask " + hex +
         ": the subset has full-mask shuffles only (0xffffffff)");
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(std::string(name) + " at " + where(file, line) + " with width " + std::to_string(width) +
         ": width must be a power of two in [1, 32]");
  }
  if (w.size < 32) {
    fail(std::string("full-mask ") + name + " at " + where(file, line) + " in warp " + std::to_string(f.warp) +
         ", which has only " + std::to_string(w.size) + " lanes: the block has " + std::to_string(b.n) +
         " threads, not a multiple of 32 (launch whole warps where shuffles are used)");
  }
  if (w.exited > 0) {
    std::vector<unsigned> gone;
    for (unsigned l = 0; l < 32; ++l)
      if (b.fibers[w.first + l].state == State::kExited) gone.push_back(l);
    fail(std::string("shuffle reached by only part of a warp: lane ") + std::to_string(f.lane) + " of warp " +
         std::to_string(f.warp) + " reached the full-mask " + name + " at " + where(file, line) + " after " +
         plural("lane", gone) + " exited the kernel (all 32 lanes must reach it)");
  }
  f.state = State::kShuffle;
  f.file = file;
  f.line = line;
  f.kind = kind;
  f.mask = mask;
  f.size = size;
  f.param = param;
  f.width = width;
  f.value = bits;
  if (++w.arrived == 32) {
    Fiber* lanes = &b.fibers[w.first];
    for (unsigned l = 0; l < 32; ++l) {
      const Fiber& o = lanes[l];
      if (!same_site(o, f) || o.kind != f.kind || o.size != f.size) {
        fail("warp divergence: the lanes of warp " + std::to_string(f.warp) + " meet at different shuffles: lane " +
             std::to_string(o.lane) + " at " + where(o.file, o.line) + ", lane " + std::to_string(f.lane) + " at " +
             where(f.file, f.line) + " (a full-mask shuffle must be the same call in all 32 lanes)");
      }
    }
    // PTX shfl.sync with c = ((32 - width) << 8) | 0x1f, as the CUDA headers build it:
    // segmask = 32 - width, maxLane = (lane & segmask) | (31 & ~segmask); the source
    // lane j = lane ^ b (bfly) or lane + b (down), b = the lane's operand & 31; a j past
    // maxLane (a later width-segment, or past the warp) reads the lane's own value.
    for (unsigned l = 0; l < 32; ++l) {
      Fiber& o = lanes[l];
      const unsigned seg = 32u - static_cast<unsigned>(o.width);
      const unsigned max_lane = (l & seg) | (31u & ~seg);
      const unsigned bv = static_cast<unsigned>(o.param) & 31u;
      const unsigned j = o.kind == Shfl::kXor ? (l ^ bv) : (l + bv);
      o.result = j <= max_lane ? lanes[j].value : o.value;
    }
    w.arrived = 0;
    for (unsigned l = 0; l < 32; ++l) make_runnable(b, lanes[l]);
  }
  maybe_reprioritize(b, f);
  yield_to_scheduler(b, f);
  return f.result;
}

// ---------------------------------------------------------------------------
// The launch
// ---------------------------------------------------------------------------
void run(const LaunchSpec& spec) {
  if (tl_block != nullptr) fail("a kernel launched another kernel: dynamic parallelism is not in the subset");
  tl_spec = &spec;
  const auto bad = [&](const std::string& why) { fail("invalid launch configuration: " + why); };
  if (spec.grid.y != 1 || spec.grid.z != 1 || spec.block.y != 1 || spec.block.z != 1) {
    bad("grids and blocks are 1-D in the subset (x only)");
  }
  if (spec.grid.x == 0) bad("empty grid (the launcher must not launch when there is no work)");
  if (spec.block.x == 0 || spec.block.x > kMaxBlock) {
    bad("block of " + std::to_string(spec.block.x) + " threads (1 to 1024)");
  }
  if (spec.smem > kMaxDynamicSmem) {
    bad(std::to_string(spec.smem) + " bytes of dynamic shared memory (> 48 KiB needs an opt-in the subset lacks)");
  }
  const std::uint64_t launch = g_launches.fetch_add(1);
  const std::uint64_t seed = mix(g_seed.load() ^ mix(launch));
  std::vector<unsigned> order(spec.grid.x);
  for (unsigned i = 0; i < spec.grid.x; ++i) order[i] = i;
  Rng rng{seed};
  for (unsigned i = spec.grid.x; i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);

  const unsigned workers = std::min<unsigned>(static_cast<unsigned>(std::max(1, g_workers.load())), spec.grid.x);
  std::atomic<unsigned> next{0};
  std::mutex mu;
  std::condition_variable cv;
  unsigned done = 0;
  auto work = [&] {
    const StackSet stacks = acquire_stacks();
    Block b;
    b.launch = launch;
    for (unsigned k; (k = next.fetch_add(1)) < spec.grid.x;) {
      // Each block on a fresh OS thread: its static __shared__ variables (thread_local) start zeroed,
      // not with what the worker's previous block left, so a block's result never depends on which
      // blocks ran before it on the same worker (the run is a function of the seed).
      std::thread block_thread([&] {
        tl_spec = &spec;
        run_block(b, spec, stacks, order[k], seed);
        tl_spec = nullptr;
      });
      block_thread.join();
    }
    release_stacks(stacks);
    std::lock_guard<std::mutex> lock(mu);
    ++done;
    cv.notify_all();
  };
  std::vector<std::thread> threads;
  threads.reserve(workers);
  for (unsigned i = 0; i < workers; ++i) threads.emplace_back(work);
  const double timeout = env_double("FASTELBO_EMU_TIMEOUT", 600.0);
  {
    std::unique_lock<std::mutex> lock(mu);
    const auto finished = [&] { return done == workers; };
    if (timeout > 0) {
      if (!cv.wait_for(lock, std::chrono::duration<double>(timeout), finished)) {
        fail("launch #" + std::to_string(launch) + " still running after " +
             std::to_string(static_cast<long>(timeout)) +
             " s (FASTELBO_EMU_TIMEOUT): a thread spinning on memory that another thread writes? Emulated threads "
             "switch only at __syncthreads() and shuffles");
      }
    } else {
      cv.wait(lock, finished);
    }
  }
  for (auto& t : threads) t.join();
  tl_spec = nullptr;
}

}  // namespace detail

void set_seed(std::uint64_t seed) {
  detail::g_seed.store(seed);
  detail::g_launches.store(0);
}

void set_workers(int workers) { detail::g_workers.store(workers < 1 ? 1 : workers); }

std::uint64_t launch_count() { return detail::g_launches.load(); }

}  // namespace fastelbo_emu
