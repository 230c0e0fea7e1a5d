// Self-tests of the CUDA emulation (csrc/emu), driven by tests/test_cuda_emulator.py.
// Kernels written in the CUDA subset, compiled as host C++ against cuda_emu.h:
//
//   cuda_emu_selftest <case> [args...]
//
// prints one result line per launch (or aborts with the emulator's message, for
// the cases that are wrong launches on purpose). FASTELBO_EMU_SEED picks the
// schedules.
#include "emu/cuda_emu.h"

#include <atomic>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// The real reduction of csrc/cuda, with its barriers switchable: SYNC_SKIP = 1
// drops the first __syncthreads of group_sum (after the warps' partial sums are
// stored), 2 the second (before shared memory is reused by the next row).
static int g_skip = 0;
static std::atomic<int> g_first_sync_line{-1};
inline void selftest_sync(int line) {
  int unset = -1;  // the first barrier any thread reaches is group_sum's first
  g_first_sync_line.compare_exchange_strong(unset, line);
  const int which = line == g_first_sync_line.load() ? 1 : 2;
  if (which != g_skip) __syncthreads();
}
#undef FASTELBO_SYNC
#define FASTELBO_SYNC() selftest_sync(__LINE__)
#include "cuda/reduce_kernel.h"

namespace fc = fastelbo::cuda;

// ---------------------------------------------------------------------------
// A shared-memory tree reduction, one sum per block; `variant` drops a barrier.
// ---------------------------------------------------------------------------
__global__ void block_sum(const float* in, float* out, int n, int variant) {
  __shared__ float s[1024];
  const unsigned t = threadIdx.x;
  const unsigned i = blockIdx.x * blockDim.x + t;
  s[t] = i < static_cast<unsigned>(n) ? in[i] : 0.0f;
  if (variant != 1) __syncthreads();  // variant 1: no barrier between the stores and the first reads
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    if (variant != 2) __syncthreads();  // variant 2: no barrier between the levels of the tree
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

static int run_block_sum(int variant, unsigned blocks, unsigned threads) {
  const int n = static_cast<int>(blocks * threads) - 3;
  std::vector<float> in(static_cast<size_t>(n)), out(blocks, -1.0f);
  for (int i = 0; i < n; ++i) in[static_cast<size_t>(i)] = static_cast<float>((i * 7) % 13);  // exact sums
  const auto kernel = &block_sum;
  FASTELBO_LAUNCH(kernel, blocks, threads, 0, nullptr, in.data(), out.data(), n, variant);
  int wrong = 0;
  for (unsigned b = 0; b < blocks; ++b) {
    double want = 0;
    for (unsigned t = 0; t < threads; ++t) {
      const unsigned i = b * threads + t;
      if (i < static_cast<unsigned>(n)) want += in[i];
    }
    if (out[b] != want) ++wrong;
  }
  std::printf("block_sum variant=%d wrong_blocks=%d of %u checksum=", variant, wrong, blocks);
  for (float v : out) std::printf("%.0f,", v);
  std::printf("\n");
  return 0;
}

// ---------------------------------------------------------------------------
// csrc/cuda/reduce_kernel.h's row_reduce_kernel, summing integer-valued rows.
// ---------------------------------------------------------------------------
struct SumTerm {
  int64_t cols;
  const float* p;
  FASTELBO_DEVICE float operator()(int64_t i, int64_t j, int n) const {
    float s = 0;
    for (int k = 0; k < n; ++k) s += p[i * cols + j + k];
    return s;
  }
};

struct Store {
  float* out;
  FASTELBO_DEVICE void operator()(int64_t i, float a, float) const { out[i] = a; }
};

static int run_row_reduce(int skip, int64_t rows, int64_t cols, int sms) {
  g_skip = skip;
  std::vector<float> x(static_cast<size_t>(rows * cols)), out(static_cast<size_t>(rows), -1.0f);
  for (size_t k = 0; k < x.size(); ++k) x[k] = static_cast<float>((k * 5) % 11);
  const fc::ReduceShape sh = fc::reduce_shape(rows, cols, 0, 4, sms);
  std::vector<float> ws(fc::reduce_workspace_bytes<float>(sh) / sizeof(float) + 1);
  fc::launch_reduce<float>(SumTerm{cols, x.data()}, fc::NoTerm<float>{}, Store{out.data()}, sh, ws.data(), nullptr);
  int wrong = 0;
  for (int64_t i = 0; i < rows; ++i) {
    double want = 0;
    for (int64_t j = 0; j < cols; ++j) want += x[static_cast<size_t>(i * cols + j)];
    if (out[static_cast<size_t>(i)] != want) ++wrong;
  }
  std::printf("row_reduce skip=%d rows=%" PRId64 " cols=%" PRId64 " block=%d group=%d grid=%u splits=%" PRId64
              " wrong_rows=%d\n",
              skip, rows, cols, sh.block, sh.group, sh.grid, sh.splits, wrong);
  return 0;
}

// ---------------------------------------------------------------------------
// Shuffles: every lane's result for each operand, as CSV lines.
// ---------------------------------------------------------------------------
template <class T>
__global__ void shfl_kernel(int kind, int param, int width, T* out) {
  const unsigned t = threadIdx.x;
  const T v = static_cast<T>(1000 + 3 * t + 0.5 * (sizeof(T) == 8));  // distinct per lane
  const T r = kind == 0 ? __shfl_xor_sync(0xffffffffu, v, param, width)
                        : __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(param), width);
  out[t] = r;
}

template <class T>
static void run_shfl(const char* type, int kind, int width, unsigned threads) {
  for (int param = 0; param < 32; ++param) {
    std::vector<T> out(threads);
    const auto kernel = &shfl_kernel<T>;
    FASTELBO_LAUNCH(kernel, 2u, threads, 0, nullptr, kind, param, width, out.data());
    std::printf("shfl %s %s width=%d param=%d:", type, kind == 0 ? "xor" : "down", width, param);
    for (unsigned t = 0; t < threads; ++t) std::printf(" %.1f", static_cast<double>(out[t]));
    std::printf("\n");
  }
}

// ---------------------------------------------------------------------------
// Atomics, dynamic shared memory, per-block shared memory
// ---------------------------------------------------------------------------
__global__ void atomic_kernel(float* f, double* d, int* i, unsigned long long* u) {
  __shared__ int local;
  if (threadIdx.x == 0) local = 0;
  __syncthreads();
  atomicAdd(&local, 1);
  atomicAdd(f, 1.0f);
  atomicAdd(d, 0.5);
  atomicAdd(u, 2ull);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(i, local);
}

__global__ void dynamic_smem_kernel(float* out, int* poisoned) {
  FASTELBO_DYNAMIC_SHARED(float, buf);
  const unsigned t = threadIdx.x;
  if (buf[t] == buf[t]) atomicAdd(poisoned, 1);  // uninitialized: NaN bytes in the emulation
  __syncthreads();
  buf[t] = static_cast<float>(t + blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = buf[blockDim.x - 1 - t];
}

__global__ void shared_per_block_kernel(int* bad) {
  __shared__ unsigned owner[256];
  owner[threadIdx.x] = blockIdx.x;
  __syncthreads();
  for (unsigned k = 0; k < blockDim.x; ++k)
    if (owner[k] != blockIdx.x) atomicAdd(bad, 1);
  __syncthreads();
}

// ---------------------------------------------------------------------------
// Wrong launches (each aborts with a message)
// ---------------------------------------------------------------------------
__global__ void warp_sum_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[threadIdx.x] = v;
}

__global__ void exited_lanes_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;  // half of each warp leaves
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

__global__ void barrier_some_kernel(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();  // only two warps reach it
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void barrier_two_places_kernel(float* out) {
  if ((threadIdx.x / 32) % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void lanes_at_barrier_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 32 < 8) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);  // lanes 0-7 shuffle while lanes 8-31 wait at the barrier
  }
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void divergent_shuffles_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 2) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  }
  out[threadIdx.x] = v;
}

__global__ void spin_kernel(volatile int* flag) {
  while (*flag == 0) {
  }
}

__global__ void mask_kernel(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1); }

static int wrong_launch(const std::string& what) {
  std::vector<float> out(1024);
  if (what == "partial_warp") {  // 48 threads: warp 1 has 16 lanes
    const auto kernel = &warp_sum_kernel;
    FASTELBO_LAUNCH(kernel, 1u, 48u, 0, nullptr, out.data());
  } else if (what == "whole_warps_ok") {
    const auto kernel = &warp_sum_kernel;
    FASTELBO_LAUNCH(kernel, 3u, 64u, 0, nullptr, out.data());
    std::printf("warp_sum lane0=%.0f lane63=%.0f\n", out[0], out[63]);
  } else if (what == "exited_lanes") {
    const auto kernel = &exited_lanes_kernel;
    FASTELBO_LAUNCH(kernel, 1u, 64u, 0, nullptr, out.data());
  } else if (what == "barrier_some") {
    const auto kernel = &barrier_some_kernel;
    FASTELBO_LAUNCH(kernel, 2u, 256u, 0, nullptr, out.data());
  } else if (what == "barrier_two_places") {
    const auto kernel = &barrier_two_places_kernel;
    FASTELBO_LAUNCH(kernel, 1u, 128u, 0, nullptr, out.data());
  } else if (what == "lanes_at_barrier") {
    const auto kernel = &lanes_at_barrier_kernel;
    FASTELBO_LAUNCH(kernel, 1u, 64u, 0, nullptr, out.data());
  } else if (what == "divergent_shuffles") {
    const auto kernel = &divergent_shuffles_kernel;
    FASTELBO_LAUNCH(kernel, 1u, 32u, 0, nullptr, out.data());
  } else if (what == "spin") {
    int flag = 0;
    const auto kernel = &spin_kernel;
    FASTELBO_LAUNCH(kernel, 1u, 32u, 0, nullptr, &flag);
  } else if (what == "mask") {
    const auto kernel = &mask_kernel;
    FASTELBO_LAUNCH(kernel, 1u, 32u, 0, nullptr, out.data());
  } else if (what == "block_too_big") {
    const auto kernel = &warp_sum_kernel;
    FASTELBO_LAUNCH(kernel, 1u, 2048u, 0, nullptr, out.data());
  } else if (what == "empty_grid") {
    const auto kernel = &warp_sum_kernel;
    FASTELBO_LAUNCH(kernel, 0u, 32u, 0, nullptr, out.data());
  } else if (what == "outside") {
    std::printf("%u\n", threadIdx.x);
  } else {
    std::fprintf(stderr, "unknown wrong launch %s\n", what.c_str());
    return 2;
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s case [args]\n", argv[0]);
    return 2;
  }
  const std::string what = argv[1];
  const auto arg = [&](int k, long fallback) { return argc > k ? std::atol(argv[k]) : fallback; };
  if (what == "block_sum") {
    return run_block_sum(static_cast<int>(arg(2, 0)), static_cast<unsigned>(arg(3, 4)),
                         static_cast<unsigned>(arg(4, 256)));
  }
  if (what == "row_reduce") {
    return run_row_reduce(static_cast<int>(arg(2, 0)), arg(3, 40), arg(4, 2048), static_cast<int>(arg(5, 1)));
  }
  if (what == "shfl") {
    const int kind = std::strcmp(argv[2], "xor") == 0 ? 0 : 1;
    const int width = static_cast<int>(arg(3, 32));
    const std::string type = argc > 4 ? argv[4] : "float";
    if (type == "float") run_shfl<float>("float", kind, width, 64);
    if (type == "double") run_shfl<double>("double", kind, width, 64);
    if (type == "int") run_shfl<int>("int", kind, width, 64);
    return 0;
  }
  if (what == "atomics") {
    float f = 0;
    double d = 0;
    int i = 0;
    unsigned long long u = 0;
    const auto kernel = &atomic_kernel;
    FASTELBO_LAUNCH(kernel, 7u, 96u, 0, nullptr, &f, &d, &i, &u);
    std::printf("atomics float=%.1f double=%.1f int=%d ull=%llu\n", f, d, i, u);
    return 0;
  }
  if (what == "dynamic_smem") {
    const unsigned blocks = 3, threads = 128;
    std::vector<float> out(blocks * threads);
    int poisoned = 0;
    const auto kernel = &dynamic_smem_kernel;
    FASTELBO_LAUNCH(kernel, blocks, threads, threads * sizeof(float), nullptr, out.data(), &poisoned);
    int wrong = 0;
    for (unsigned b = 0; b < blocks; ++b)
      for (unsigned t = 0; t < threads; ++t)
        if (out[b * threads + t] != static_cast<float>(threads - 1 - t + b)) ++wrong;
    std::printf("dynamic_smem wrong=%d initialized_reads=%d\n", wrong, poisoned);
    return 0;
  }
  if (what == "shared_per_block") {
    int bad = 0;
    const auto kernel = &shared_per_block_kernel;
    FASTELBO_LAUNCH(kernel, 64u, 256u, 0, nullptr, &bad);
    std::printf("shared_per_block bad=%d launches=%llu\n", bad,
                static_cast<unsigned long long>(fastelbo_emu::launch_count()));
    return 0;
  }
  return wrong_launch(what);
}
