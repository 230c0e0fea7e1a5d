// device.h: the pieces every CUDA kernel of fastelbo is built from, on raw
// pointers and without torch headers.
//
// The kernels stick to a small CUDA subset (SUBSET.md) so that the same sources
// also compile as host C++ against the CUDA emulation of ../emu (the test-only
// "cuda-emulated" backend):
//   blockIdx/blockDim/threadIdx/gridDim (x only: every grid is 1-D),
//   __syncthreads, static __shared__ arrays, dynamic shared memory only through
//   FASTELBO_DYNAMIC_SHARED, full-mask warp shuffles, atomicAdd,
//   128-bit loads/stores only in load_chunk/store_chunk below,
//   every formula from ../fastelbo_math.h (float/double Math<V>),
//   every launch through FASTELBO_LAUNCH (no <<<...>>> anywhere else),
//   __launch_bounds__ only through FASTELBO_BOUNDS.
// The emulation (../emu/cuda_emu.h) defines FASTELBO_LAUNCH, FASTELBO_BOUNDS,
// FASTELBO_GLOBAL, FASTELBO_DEVICE, FASTELBO_SHFL_XOR, FASTELBO_SYNC and
// FASTELBO_DYNAMIC_SHARED before this file is included; nvcc gets them here.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "../fastelbo_math.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#ifndef FASTELBO_LAUNCH
// The one place a kernel is launched: 1-D grid and block, dynamic shared bytes, stream.
#define FASTELBO_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define FASTELBO_GLOBAL __global__
#define FASTELBO_BOUNDS(threads) __launch_bounds__(threads, 1)
#define FASTELBO_DEVICE __device__ __forceinline__
#define FASTELBO_SHFL_XOR(v, lane_mask) __shfl_xor_sync(0xffffffffu, (v), (lane_mask))
#define FASTELBO_SYNC() __syncthreads()
// The launch's dynamic shared memory (its smem bytes) as a T*, 16-byte aligned.
#define FASTELBO_DYNAMIC_SHARED(T, name)                                   \
  extern __shared__ __align__(16) unsigned char fastelbo_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(fastelbo_dynamic_smem_)
#endif

namespace fastelbo {
namespace cuda {

// A device-side assert that does not depend on NDEBUG (__assert_fail, what assert()
// and torch's CUDA_KERNEL_ASSERT call): the message goes to stderr and the next
// synchronizing call fails with "device-side assert triggered". In the emulation
// the kernel's thread throws, which fails the launch with the message.
FASTELBO_DEVICE void assert_fail(const char* msg, const char* file, unsigned line, const char* function) {
#if defined(__CUDA_ARCH__)
  __assert_fail(msg, file, line, function);
#else
  (void)file, (void)line, (void)function;
  throw std::runtime_error(msg);
#endif
}

// ---------------------------------------------------------------------------
// Storage types. float16/bfloat16 are moved as their 16 bits and converted
// here, exactly (round to nearest even), with the hardware instruction on the
// device and bit arithmetic on the host (the emulation; tests compare both
// against torch's own conversions).
// ---------------------------------------------------------------------------
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

FASTELBO_HD float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

FASTELBO_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

FASTELBO_HD float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf, nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_to_float(sign);  // +-0
  // subnormal: man * 2^-24, exact in float
  const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
#endif
}

FASTELBO_HD uint16_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // nan stays nan
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a >= 0x38800000u) {  // normal half
    const uint32_t r = a + 0x0fffu + ((a >> 13) & 1u) - 0x38000000u;  // rebias 127 -> 15, RNE on 13 bits
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  if (a < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25): 0
  // subnormal half: value / 2^-24 rounded to nearest even
  const uint32_t e = a >> 23;
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14 + (113 - e) - ... : places the result's lsb at 2^-24
  const uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  const uint32_t r = q + ((rem > halfway || (rem == halfway && (q & 1u))) ? 1u : 0u);
  return static_cast<uint16_t>(sign | r);
#endif
}

FASTELBO_HD float bfloat16_to_float(uint16_t b) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__ushort_as_bfloat16(b));
#else
  return bits_to_float(static_cast<uint32_t>(b) << 16);
#endif
}

FASTELBO_HD uint16_t float_to_bfloat16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet nan
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

FASTELBO_HD float to_acc(Half h) { return half_to_float(h.bits); }
FASTELBO_HD float to_acc(BFloat16 b) { return bfloat16_to_float(b.bits); }
FASTELBO_HD float to_acc(float f) { return f; }
FASTELBO_HD double to_acc(double d) { return d; }

template <class T>
FASTELBO_HD T from_acc(acc_t<T> v);
template <>
FASTELBO_HD Half from_acc<Half>(float v) {
  return Half{float_to_half(v)};
}
template <>
FASTELBO_HD BFloat16 from_acc<BFloat16>(float v) {
  return BFloat16{float_to_bfloat16(v)};
}
template <>
FASTELBO_HD float from_acc<float>(float v) {
  return v;
}
template <>
FASTELBO_HD double from_acc<double>(double v) {
  return v;
}

// ---------------------------------------------------------------------------
// Operands. A [rows, cols] input of any strides (0 is how broadcast priors and
// observation variances arrive); `vec` says its rows may be read 16 bytes at a
// time (unit column stride, 16-byte aligned base and row stride), decided once
// per launch on the host.
// ---------------------------------------------------------------------------
// A [K, rows, cols] operand (K samples: recon, z, their noise) is the same with
// sk, the stride between samples: sample(k) is sample k's [rows, cols] operand
// (sk = 0 for a [rows, cols] operand shared by the samples, e.g. x beside recon).
template <class T>
struct Mat {
  const T* p;
  int64_t s0, s1;
  bool vec;
  int64_t sk = 0;
  FASTELBO_DEVICE Mat sample(int64_t k) const { return Mat{p + k * sk, s0, s1, vec, 0}; }
};

// A [rows] vector of per-row scalars (upstream gradients); p == nullptr reads 0.
template <class T>
struct RowVec {
  const T* p;
  int64_t s0;
  FASTELBO_DEVICE acc_t<T> operator[](int64_t i) const { return p ? to_acc(p[i * s0]) : acc_t<T>(0); }
};

// Elements per chunk: one 16-byte vector (8 x 16-bit, 4 x float), at least 4
// (the noise comes in groups of four), so 4 doubles = two 16-byte vectors.
template <class T>
constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T)) < 4 ? 4 : 16 / static_cast<int>(sizeof(T));

struct alignas(16) Vec16 {
  uint32_t w[4];
};

// THE vector access: n (<= N) elements of row i of m from column j, converted
// to the accumulation type; lanes >= n read 0. 16-byte loads when m.vec and the
// chunk is whole, strided scalar loads otherwise.
template <int N, class T>
FASTELBO_DEVICE void load_chunk(const Mat<T>& m, int64_t i, int64_t j, int n, acc_t<T> (&out)[N]) {
  const T* p = m.p + i * m.s0 + j * m.s1;
  if (m.vec && n == N) {
    constexpr int kPieces = N * static_cast<int>(sizeof(T)) / 16;
    static_assert(kPieces * 16 == N * static_cast<int>(sizeof(T)), "chunk must be whole 16-byte vectors");
    union {
      Vec16 v[kPieces];
      T t[N];
    } u;
#pragma unroll
    for (int q = 0; q < kPieces; ++q) u.v[q] = reinterpret_cast<const Vec16*>(p)[q];
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_acc(u.t[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = k < n ? to_acc(p[k * m.s1]) : acc_t<T>(0);
  }
}

// The store twin: n values into a contiguous row segment p (16-byte stores when vec and whole).
template <int N, class T>
FASTELBO_DEVICE void store_chunk(T* p, int n, bool vec, const acc_t<T> (&in)[N]) {
  if (vec && n == N) {
    constexpr int kPieces = N * static_cast<int>(sizeof(T)) / 16;
    union {
      Vec16 v[kPieces];
      T t[N];
    } u;
#pragma unroll
    for (int k = 0; k < N; ++k) u.t[k] = from_acc<T>(in[k]);
#pragma unroll
    for (int q = 0; q < kPieces; ++q) reinterpret_cast<Vec16*>(p)[q] = u.v[q];
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k < n) p[k] = from_acc<T>(in[k]);
  }
}

// ---------------------------------------------------------------------------
// Noise (docs/design.md §3): the four normals of counter group g, then the N normals of
// logical elements [n0, n0 + N), from the header's Philox and Box-Muller.
// ---------------------------------------------------------------------------
template <class A>
FASTELBO_DEVICE void normals4(uint64_t seed, uint64_t group, A (&z)[4]) {
  const Philox4 b = philox4x32_10(group, seed);
  box_muller(static_cast<A>(philox_uniform(b.v[0])), static_cast<A>(philox_uniform(b.v[1])), z[0], z[1]);
  box_muller(static_cast<A>(philox_uniform(b.v[2])), static_cast<A>(philox_uniform(b.v[3])), z[2], z[3]);
}

// When n0 is a multiple of 4 (every row when cols % 4 == 0) the chunk is N/4
// whole groups; otherwise it straddles N/4 + 1 groups and each element picks
// its normal with selects (no dynamically indexed register arrays).
template <int N, class A>
FASTELBO_DEVICE void noise_chunk(uint64_t seed, uint64_t n0, A (&eps)[N]) {
  static_assert(N % 4 == 0, "noise chunks are whole groups of four");
  constexpr int G = N / 4;
  A z[G + 1][4];
  const uint64_t g0 = n0 >> 2;
  const int o = static_cast<int>(n0 & 3u);
#pragma unroll
  for (int g = 0; g < G; ++g) normals4(seed, g0 + g, z[g]);
  if (o == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) eps[k] = z[k / 4][k % 4];
    return;
  }
  normals4(seed, g0 + G, z[G]);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const A a1 = z[(k + 1) / 4][(k + 1) % 4], a2 = z[(k + 2) / 4][(k + 2) % 4], a3 = z[(k + 3) / 4][(k + 3) % 4];
    eps[k] = o == 1 ? a1 : (o == 2 ? a2 : a3);
  }
}

// ---------------------------------------------------------------------------
// Launch geometry helpers.
// ---------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int pow2_ceil(int64_t x) {
  int p = 1;
  while (p < x && p < (1 << 30)) p <<= 1;
  return p;
}

// The host's decision for Mat::vec (sk: the stride between samples, 0 for one).
template <class T>
bool vectorizable(const void* p, int64_t s0, int64_t s1, int64_t sk = 0) {
  return p != nullptr && s1 == 1 && reinterpret_cast<uintptr_t>(p) % 16 == 0 &&
         (s0 * static_cast<int64_t>(sizeof(T))) % 16 == 0 && (sk * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

}  // namespace cuda
}  // namespace fastelbo
