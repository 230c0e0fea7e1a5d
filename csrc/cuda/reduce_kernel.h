// reduce_kernel.h: the per-row reduction kernel (every forward but rsample):
//   a_i = sum_j fa(in_a...[i, j]),  b_i = sum_j fb(in_b...[i, j]),  epilogue(i, a_i, b_i)
// Two terms per row so the fused ELBO reads its [B, Dx] and [B, Dz] rows in one
// launch; single-term ops pass NoTerm as b.
//
// A row (or a slice of it, see splits) is summed by a group of G threads, G a
// power of two, in chunks of N = kChunkElems<T> columns (16-byte vectors where
// the operands allow):
//   G <= 32 (short rows): 32 / G rows per warp, reduced with xor shuffles only;
//   G == blockDim (long rows): one row slice per block, shuffles within each
//     warp, then the warps' sums through shared memory.
// Very long rows with few of them are cut into `splits` slices, one group each;
// the slices write float partials to a workspace and row_finalize_kernel sums
// them in a fixed order (deterministic, no atomics). Accumulation in acc_t<T>.
//
// A term is a struct with
//   int64_t cols;
//   FASTELBO_DEVICE acc_t<T> operator()(int64_t i, int64_t j, int n) const
//                                  sum over the chunk of row i, columns [j, j + n)
// An epilogue: FASTELBO_DEVICE void operator()(int64_t i, acc_t<T> a, acc_t<T> b) const.
#pragma once

#include "device.h"

namespace fastelbo {
namespace cuda {

constexpr int kReduceMaxThreads = 512;

template <class T>
struct NoTerm {
  int64_t cols = 0;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t, int64_t, int) const { return acc_t<T>(0); }
};

// The host's launch plan (see plan_reduce in launchers.h for the public face).
struct ReduceShape {
  int64_t rows = 0, splits = 1, groups = 0;        // groups = rows * splits
  int64_t chunks_a = 0, chunks_b = 0;              // chunks per row of each term
  int64_t per_split_a = 0, per_split_b = 0;        // chunks of each term per slice
  int chunk = 1, group = 1, block = 256;
  unsigned grid = 1;
};

// Sum over the G threads of a group (G a power of two); the result is valid in
// the group's first thread. Every thread of the block must call it (uniformly).
template <class A>
FASTELBO_DEVICE void group_sum(A& a, A& b, int G, A (*smem)[32]) {
  const int top = G < 32 ? G : 32;
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    if (off < top) {
      a += FASTELBO_SHFL_XOR(a, off);
      b += FASTELBO_SHFL_XOR(b, off);
    }
  }
  if (G <= 32) return;
  // G == blockDim: warp sums through shared memory, then warp 0 folds them.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = G >> 5;
  if (lane == 0) {
    smem[0][warp] = a;
    smem[1][warp] = b;
  }
  FASTELBO_SYNC();
  if (warp == 0) {
    a = lane < warps ? smem[0][lane] : A(0);
    b = lane < warps ? smem[1][lane] : A(0);
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) {
      a += FASTELBO_SHFL_XOR(a, off);
      b += FASTELBO_SHFL_XOR(b, off);
    }
  }
  FASTELBO_SYNC();  // smem is reused by the next row of a grid-stride loop
}

template <class T, class TermA, class TermB, class Epi>
FASTELBO_GLOBAL void FASTELBO_BOUNDS(kReduceMaxThreads)
    row_reduce_kernel(TermA ta, TermB tb, Epi epi, ReduceShape sh, acc_t<T>* partial) {
  using A = acc_t<T>;
  __shared__ A smem[2][32];
  const int G = sh.group;
  const int lane = static_cast<int>(threadIdx.x) & (G - 1);
  const int64_t per_block = blockDim.x / G;
  const int64_t local = threadIdx.x / G;
  // Uniform trip count for the whole block: shuffles and barriers meet.
  for (int64_t tile = blockIdx.x; tile * per_block < sh.groups; tile += gridDim.x) {
    const int64_t gid = tile * per_block + local;
    A a = A(0), b = A(0);
    int64_t row = 0;
    if (gid < sh.groups) {
      int64_t s = 0;
      if (sh.splits == 1) {
        row = gid;
      } else {  // sliced rows are few: groups < 2^31 (see reduce_shape), a 32-bit division
        const uint32_t q = static_cast<uint32_t>(gid) / static_cast<uint32_t>(sh.splits);
        row = q;
        s = gid - static_cast<int64_t>(q) * sh.splits;
      }
      const int64_t a0 = s * sh.per_split_a, b0 = s * sh.per_split_b;
      const int64_t a1 = a0 + sh.per_split_a < sh.chunks_a ? a0 + sh.per_split_a : sh.chunks_a;
      const int64_t b1 = b0 + sh.per_split_b < sh.chunks_b ? b0 + sh.per_split_b : sh.chunks_b;
      for (int64_t c = a0 + lane; c < a1; c += G) {
        const int64_t j = c * sh.chunk, left = ta.cols - j;
        a += ta(row, j, static_cast<int>(left < sh.chunk ? left : sh.chunk));
      }
      for (int64_t c = b0 + lane; c < b1; c += G) {
        const int64_t j = c * sh.chunk, left = tb.cols - j;
        b += tb(row, j, static_cast<int>(left < sh.chunk ? left : sh.chunk));
      }
    }
    group_sum(a, b, G, smem);
    if (lane == 0 && gid < sh.groups) {
      if (sh.splits == 1) {
        epi(row, a, b);
      } else {
        partial[2 * gid] = a;
        partial[2 * gid + 1] = b;
      }
    }
  }
}

// Second pass of split rows: one thread per row sums its slices in order.
template <class T, class Epi>
FASTELBO_GLOBAL void FASTELBO_BOUNDS(256) row_finalize_kernel(Epi epi, const acc_t<T>* partial, int64_t rows,
                                                              int64_t splits) {
  using A = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows; i += stride) {
    A a = A(0), b = A(0);
    for (int64_t s = 0; s < splits; ++s) {
      a += partial[2 * (i * splits + s)];
      b += partial[2 * (i * splits + s) + 1];
    }
    epi(i, a, b);
  }
}

// The plan: threads per row, slices per row, grid, workspace.
inline ReduceShape reduce_shape(int64_t rows, int64_t cols_a, int64_t cols_b, int chunk, int num_sms) {
  ReduceShape sh;
  sh.rows = rows;
  sh.chunk = chunk;
  sh.chunks_a = ceil_div(cols_a, chunk);
  sh.chunks_b = ceil_div(cols_b, chunk);
  const int64_t chunks = sh.chunks_a + sh.chunks_b;
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  if (chunks <= 256) {
    // Short rows: up to a warp per row, about one to eight chunks per thread.
    sh.group = pow2_ceil(chunks < 1 ? 1 : chunks);
    if (sh.group > 32) sh.group = 32;
    sh.block = 256;
  } else {
    // Long rows: a block per row slice, about four chunks per thread per slice.
    int64_t t = pow2_ceil(ceil_div(chunks, 4));
    if (t < 64) t = 64;
    if (t > kReduceMaxThreads) t = kReduceMaxThreads;
    sh.group = sh.block = static_cast<int>(t);
    // Too few rows to fill the GPU: cut rows into slices of >= 4 chunks per thread.
    const int64_t want_blocks = sms * (2048 / sh.block) * 2;
    if (rows < want_blocks) {
      const int64_t max_splits = chunks / (static_cast<int64_t>(sh.block) * 4);
      int64_t splits = ceil_div(want_blocks, rows);
      if (splits > max_splits) splits = max_splits;
      if (splits > 1 && rows * splits < (int64_t(1) << 31)) sh.splits = splits;
    }
  }
  sh.per_split_a = ceil_div(sh.chunks_a, sh.splits);
  sh.per_split_b = ceil_div(sh.chunks_b, sh.splits);
  sh.groups = rows * sh.splits;
  const int64_t per_block = sh.block / sh.group;
  const int64_t tiles = ceil_div(sh.groups, per_block);
  const int64_t cap = sms * 32;
  sh.grid = static_cast<unsigned>(tiles < cap ? (tiles > 0 ? tiles : 1) : cap);
  return sh;
}

template <class T>
size_t reduce_workspace_bytes(const ReduceShape& sh) {
  return sh.splits > 1 ? static_cast<size_t>(2 * sh.groups) * sizeof(acc_t<T>) : 0;
}

template <class T, class TermA, class TermB, class Epi>
void launch_reduce(const TermA& ta, const TermB& tb, const Epi& epi, const ReduceShape& sh, void* workspace,
                   cudaStream_t stream) {
  if (sh.rows == 0) return;
  auto* partial = static_cast<acc_t<T>*>(workspace);
  const auto kernel = &row_reduce_kernel<T, TermA, TermB, Epi>;
  FASTELBO_LAUNCH(kernel, sh.grid, sh.block, 0, stream, ta, tb, epi, sh, partial);
  if (sh.splits > 1) {
    const int64_t blocks = ceil_div(sh.rows, 256);
    const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
    const auto finalize = &row_finalize_kernel<T, Epi>;
    FASTELBO_LAUNCH(finalize, grid, 256, 0, stream, epi, static_cast<const acc_t<T>*>(partial), sh.rows, sh.splits);
  }
}

}  // namespace cuda
}  // namespace fastelbo
