// cuda_emu.h: the CUDA execution model on the CPU, for the CUDA subset the
// kernels of csrc/cuda keep to (csrc/cuda/SUBSET.md). TEST-ONLY.
//
// Include it first, then a .cu file, and compile the pair with a host C++
// compiler (g++/clang++, C++17); link csrc/emu/cuda_emu.cpp. The .cu source is
// compiled unchanged: this header defines the CUDA keywords and built-ins of the
// subset and the FASTELBO_* macros of csrc/cuda/device.h, and a launch
// (FASTELBO_LAUNCH) runs the grid on the CPU before it returns:
//
//   * every thread of a block is a fiber (its own stack, cooperative switching
//     in user space); all threads of the block are alive at once, as on a GPU;
//   * __syncthreads() is a block barrier; each __shfl_*_sync is a meeting of
//     the warp's 32 lanes (every lane publishes its value, then each reads its
//     source lane by the PTX rules of shfl.sync); __shared__ memory is per block;
//     atomics are atomic;
//   * which fiber runs next is drawn from a seeded random generator, per launch
//     and block (random priorities, re-drawn at sync points with a per-block
//     probability), so a missing barrier gives a wrong result instead of passing
//     by luck, and the same seed replays the same schedule;
//   * a wrong launch aborts the process with a message naming the kernel, the
//     launch, the block, the threads and the source line: a shuffle reached by
//     part of a warp (a partial warp when the block is not a multiple of 32,
//     exited lanes, lanes at a barrier), lanes at different shuffles, a barrier
//     not reached by every thread or reached at different places, an invalid
//     launch configuration; a launch still running after FASTELBO_EMU_TIMEOUT
//     seconds (a spin on memory: threads switch only at barriers and shuffles).
//     A deadlock cannot hang: when no thread can run, the runtime says why.
//
// Switches: FASTELBO_EMU_SEED (base seed, default 0; launch k of the process
// uses mix(seed, k)), FASTELBO_EMU_WORKERS (OS threads running blocks
// concurrently, default min(4, cores)), FASTELBO_EMU_TIMEOUT (seconds, default
// 600, 0 = none). The same from C++: fastelbo_emu::set_seed / set_workers.
//
// Threads switch only at barriers, shuffles and exit: between two sync points a
// thread runs alone, so a plain (non-atomic) read-modify-write race between two
// threads is NOT found; neither are GPU memory-model effects (weak ordering,
// caches), timing or the real warp scheduler. See SUBSET.md, "What the
// emulation proves".
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is for host compilers: nvcc compiles csrc/cuda for the GPU"
#endif

// Standard headers before the keyword macros below (the kernels' includes are no-ops then).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define FASTELBO_CUDA_EMULATION 1

struct CUstream_st;
using cudaStream_t = CUstream_st*;

// ---------------------------------------------------------------------------
// Types and keywords
// ---------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Per block: every block runs on an OS thread of its own, all its fibers on that
// thread; zeroed at the start of each block (uninitialized on a GPU).
#define __shared__ static thread_local

constexpr int warpSize = 32;

namespace fastelbo_emu {

// Base seed of the schedules; resets the launch counter (launch k uses mix(seed, k)).
void set_seed(std::uint64_t seed);
// OS threads that run blocks concurrently (>= 1).
void set_workers(int workers);
// Launches run so far in this process.
std::uint64_t launch_count();

namespace detail {

// What a thread of a launch sees.
struct ThreadCtx {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  unsigned char* dynamic_smem;
  std::size_t dynamic_smem_bytes;
};

// The running emulated thread (null outside a launch); set by the scheduler at each switch.
inline thread_local const ThreadCtx* tl_ctx = nullptr;

[[noreturn]] void outside_kernel(const char* what);

inline const ThreadCtx& ctx(const char* what) {
  const ThreadCtx* c = tl_ctx;
  if (c == nullptr) outside_kernel(what);
  return *c;
}

enum class Shfl : int { kXor = 0, kDown = 1 };

void barrier(const char* file, int line);
std::uint64_t shuffle(Shfl kind, unsigned mask, std::uint64_t bits, int param, int width, unsigned size,
                      const char* file, int line);

struct LaunchSpec {
  const char* file;  // launch site
  int line;
  const char* caller;     // the launching function's __PRETTY_FUNCTION__
  const void* kernel;     // for its symbol name in messages
  const char* signature;  // the launch template's __PRETTY_FUNCTION__: the kernel's parameter types
  dim3 grid, block;
  std::size_t smem;
  void (*body)(const void* params);  // runs the kernel once, for the calling thread
  const void* params;
};

void run(const LaunchSpec& spec);

template <class T>
std::uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "the emulated shuffles move trivially copyable values of at most 8 bytes");
  std::uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <class T>
T from_bits(std::uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace detail

// The launch: runs every block of the grid, then returns (the stream is ignored:
// launches are synchronous, which is what one stream's ordering allows).
template <class... P, class... A>
void launch(const char* file, int line, const char* caller, void (*kernel)(P...), dim3 grid, dim3 block,
            std::size_t smem, cudaStream_t /*stream*/, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  struct Pack {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;  // converted once, as cudaLaunchKernel copies the parameters
  };
  const Pack pack{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  const detail::LaunchSpec spec{file,
                                line,
                                caller,
                                reinterpret_cast<const void*>(kernel),
                                __PRETTY_FUNCTION__,
                                grid,
                                block,
                                smem,
                                [](const void* p) {
                                  const Pack& k = *static_cast<const Pack*>(p);
                                  std::apply(k.kernel, k.args);  // each thread gets its own copies
                                },
                                &pack};
  detail::run(spec);
}

}  // namespace fastelbo_emu

// ---------------------------------------------------------------------------
// Built-in variables and functions of the subset
// ---------------------------------------------------------------------------
#define threadIdx (::fastelbo_emu::detail::ctx("threadIdx").thread_idx)
#define blockIdx (::fastelbo_emu::detail::ctx("blockIdx").block_idx)
#define blockDim (::fastelbo_emu::detail::ctx("blockDim").block_dim)
#define gridDim (::fastelbo_emu::detail::ctx("gridDim").grid_dim)

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::fastelbo_emu::detail::barrier(file, line);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  using namespace ::fastelbo_emu::detail;
  return from_bits<T>(shuffle(Shfl::kXor, mask, to_bits(var), lane_mask, width, sizeof(T), file, line));
}

template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = warpSize, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  using namespace ::fastelbo_emu::detail;
  return from_bits<T>(
      shuffle(Shfl::kDown, mask, to_bits(var), static_cast<int>(delta), width, sizeof(T), file, line));
}

// atomicAdd on global or shared memory; returns the old value.
inline int atomicAdd(int* address, int val) { return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int val) {
  return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long val) {
  return __atomic_fetch_add(address, val, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* address, float val) {
  float old, want;
  __atomic_load(address, &old, __ATOMIC_SEQ_CST);
  do {
    want = old + val;
  } while (!__atomic_compare_exchange(address, &old, &want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
inline double atomicAdd(double* address, double val) {
  double old, want;
  __atomic_load(address, &old, __ATOMIC_SEQ_CST);
  do {
    want = old + val;
  } while (!__atomic_compare_exchange(address, &old, &want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}

// ---------------------------------------------------------------------------
// The macros of csrc/cuda/device.h (which keeps its nvcc definitions when
// FASTELBO_LAUNCH is not defined before it)
// ---------------------------------------------------------------------------
#define FASTELBO_LAUNCH(kernel, grid, block, smem, stream, ...)                                              \
  ::fastelbo_emu::launch(__FILE__, __LINE__, __PRETTY_FUNCTION__, (kernel), (grid), (block), (smem), (stream), \
                         __VA_ARGS__)
#define FASTELBO_GLOBAL __global__
#define FASTELBO_BOUNDS(threads)
#define FASTELBO_DEVICE __device__ __forceinline__
#define FASTELBO_SHFL_XOR(v, lane_mask) __shfl_xor_sync(0xffffffffu, (v), (lane_mask))
#define FASTELBO_SYNC() __syncthreads()
// The launch's dynamic shared memory (its smem bytes, 16-byte aligned; filled with
// 0xff bytes, NaN as floats, at the start of each block: it is uninitialized on a GPU).
#define FASTELBO_DYNAMIC_SHARED(T, name) \
  T* name = reinterpret_cast<T*>(::fastelbo_emu::detail::ctx("dynamic shared memory").dynamic_smem)
