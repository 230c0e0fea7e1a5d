// map_kernel.h: the elementwise kernel (rsample and every backward):
//   out...[i, j] = f(g[i], in...[i, j])
// Work item = one chunk of N = kChunkElems<T> columns of one row (16-byte
// vectors where the operands allow, see load_chunk), items = rows * ceil(cols / N),
// a flat 1-D grid-stride loop over them (any number of rows). One launch runs
// up to two independent jobs (the ELBO backward: the [B, Dx] likelihood part
// and the [B, Dz] KL part), each on its own share of the blocks.
//
// A job is a struct with
//   int64_t rows, cols;                               its [rows, cols] extent
//   FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const
//                                                     chunk of row i, columns [j, j + n)
#pragma once

#include "device.h"

namespace fastelbo {
namespace cuda {

constexpr int kMapThreads = 256;

// Geometry of one job, filled on the host. The job owns blocks
// [first_block, first_block + blocks) of the launch and walks its items with
// a grid-stride loop of `step` items, kept as (rows, chunks) increments so the
// kernel never divides in 64 bits (a subroutine call on the GPU).
struct MapShape {
  int64_t rows = 0, cols = 0, chunks_per_row = 0, items = 0;
  int64_t step_rows = 0, step_chunks = 0;
  unsigned first_block = 0, blocks = 0;
  int chunk = 1;
};

struct NoJob {
  int64_t rows = 0, cols = 0;
  FASTELBO_DEVICE void operator()(int64_t, int64_t, int) const {}
};

template <class Job>
FASTELBO_DEVICE void map_job(const Job& job, const MapShape& s, unsigned block) {
  // First item of this thread: < 2^31, so one 32-bit division finds its row.
  const int64_t w = static_cast<int64_t>(block) * blockDim.x + threadIdx.x;
  if (w >= s.items) return;
  int64_t i = 0, c = w;
  if (s.chunks_per_row <= 0xffffffffLL) {
    const uint32_t a = static_cast<uint32_t>(w), d = static_cast<uint32_t>(s.chunks_per_row);
    i = a / d;
    c = a - static_cast<uint32_t>(i) * d;
  }
  while (i < s.rows) {
    const int64_t j = c * s.chunk, left = s.cols - j;
    job(i, j, static_cast<int>(left < s.chunk ? left : s.chunk));
    c += s.step_chunks;
    i += s.step_rows;
    if (c >= s.chunks_per_row) {
      c -= s.chunks_per_row;
      ++i;
    }
  }
}

template <class JobA, class JobB>
FASTELBO_GLOBAL void FASTELBO_BOUNDS(kMapThreads) map_kernel(JobA a, MapShape sa, JobB b, MapShape sb) {
  if (blockIdx.x < sb.first_block) {
    map_job(a, sa, blockIdx.x);
  } else {
    map_job(b, sb, blockIdx.x - sb.first_block);
  }
}

template <class Job>
MapShape map_shape(const Job& job, int chunk) {
  MapShape s;
  s.rows = job.rows;
  s.cols = job.cols;
  s.chunk = chunk;
  s.chunks_per_row = ceil_div(job.cols, chunk);
  s.items = job.rows * s.chunks_per_row;
  return s;
}

// Blocks for `items` out of a launch of at most `cap` blocks shared by `total` items.
inline void map_blocks(MapShape& s, int64_t total, int64_t cap) {
  if (s.items == 0) return;
  int64_t share = cap * s.items / total;
  if (share < 1) share = 1;
  const int64_t need = ceil_div(s.items, kMapThreads);
  s.blocks = static_cast<unsigned>(need < share ? need : share);
  const int64_t step = static_cast<int64_t>(s.blocks) * kMapThreads;
  s.step_rows = step / s.chunks_per_row;
  s.step_chunks = step - s.step_rows * s.chunks_per_row;
}

// Launches a (and b) on `stream`; nothing when there is no item.
template <class JobA, class JobB = NoJob>
void launch_map(const JobA& a, int chunk, int num_sms, cudaStream_t stream, const JobB& b = JobB{}) {
  MapShape sa = map_shape(a, chunk), sb = map_shape(b, chunk);
  const int64_t total = sa.items + sb.items;
  if (total == 0) return;
  // Enough resident blocks for latency hiding (8 per SM, 2 waves), then grid-stride.
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 16;
  map_blocks(sa, total, cap);
  map_blocks(sb, total, cap);
  sb.first_block = sa.blocks;
  const unsigned grid = sa.blocks + sb.blocks;
  const auto kernel = &map_kernel<JobA, JobB>;
  FASTELBO_LAUNCH(kernel, grid, kMapThreads, 0, stream, a, sa, b, sb);
}


// ---------------------------------------------------------------------------
// The elementwise kernel with column sums (issue 6 item 4): a job whose
// gradient of a [1, cols] operand (a per-feature observation log-variance) or
// whose per-column statistic (free bits' batch-mean KL) is summed over rows.
// No [rows, cols] temporary and no atomics: each block owns a tile of C chunk
// columns of a slab of rows; its R = kMapThreads / C row lanes walk the slab's
// rows (lane r: rows r, r + R, ...), accumulating in registers, then the lanes'
// sums meet in shared memory and lane 0 writes the block's partial row
//   partial[slab, cols]   (accumulation type; slabs = a few per tile)
// and col_finalize_kernel sums the slabs of each column in order. Every sum has
// a fixed order for a given plan: deterministic.
//
// A column job is a map job (rows, cols) with
//   FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n, acc_t<T> (&acc)[N]) const
// which does the row's elementwise work and adds its column terms to acc.
// ---------------------------------------------------------------------------
struct ColShape {
  int64_t rows = 0, cols = 0, chunks = 0;  // chunks per row
  int64_t tiles = 0, slabs = 0, rows_per_slab = 0, tasks = 0;
  int chunk = 1, lanes_c = 1, lanes_r = 1;  // C (a power of two) x R = kMapThreads
  unsigned grid = 1;
};

// The plan: C chunk columns per block (up to a warp: coalesced rows), slabs of
// rows so that about 16 blocks per SM have work, each row lane at least two rows
// (the partials stay under a sixteenth of a [rows, cols] tensor).
inline ColShape col_shape(int64_t rows, int64_t cols, int chunk, int num_sms) {
  ColShape s;
  s.rows = rows;
  s.cols = cols;
  s.chunk = chunk;
  s.chunks = ceil_div(cols, chunk);
  int c = pow2_ceil(s.chunks < 1 ? 1 : s.chunks);
  s.lanes_c = c < 32 ? c : 32;
  s.lanes_r = kMapThreads / s.lanes_c;
  s.tiles = ceil_div(s.chunks, s.lanes_c);
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 16;
  int64_t slabs = s.tiles > 0 ? ceil_div(cap, s.tiles) : 1;
  const int64_t most = ceil_div(rows, 2 * static_cast<int64_t>(s.lanes_r));  // every row lane has two rows
  if (slabs > most) slabs = most;
  if (slabs < 1) slabs = 1;
  s.rows_per_slab = rows > 0 ? ceil_div(rows, slabs) : 0;
  s.slabs = s.rows_per_slab > 0 ? ceil_div(rows, s.rows_per_slab) : 0;
  s.tasks = s.slabs * s.tiles;
  s.grid = static_cast<unsigned>(s.tasks < cap ? (s.tasks > 0 ? s.tasks : 1) : cap);
  return s;
}

// The partials' bytes: [slabs, cols] in the accumulation type.
template <class T>
size_t col_workspace_bytes(const ColShape& s) {
  return static_cast<size_t>(s.slabs * s.cols) * sizeof(acc_t<T>);
}

template <class T, class Job>
FASTELBO_GLOBAL void FASTELBO_BOUNDS(kMapThreads) col_map_kernel(Job job, ColShape s, acc_t<T>* partial) {
  using A = acc_t<T>;
  constexpr int N = kChunkElems<T>;
  __shared__ A lanes[kMapThreads * N];
  const int C = s.lanes_c, R = s.lanes_r;
  const int cl = static_cast<int>(threadIdx.x) & (C - 1);
  const int rl = static_cast<int>(threadIdx.x) / C;
  // Uniform trip count for the whole block: the barriers meet.
  for (int64_t task = blockIdx.x; task < s.tasks; task += gridDim.x) {
    const int64_t slab = task / s.tiles, c = (task - slab * s.tiles) * C + cl;
    const int64_t j = c * s.chunk, left = s.cols - j;
    const int n = static_cast<int>(left < s.chunk ? left : s.chunk);
    A acc[N];
#pragma unroll
    for (int k = 0; k < N; ++k) acc[k] = A(0);
    if (c < s.chunks) {
      const int64_t i0 = slab * s.rows_per_slab;
      const int64_t i1 = i0 + s.rows_per_slab < s.rows ? i0 + s.rows_per_slab : s.rows;
      for (int64_t i = i0 + rl; i < i1; i += R) job(i, j, n, acc);
    }
    if (R > 1) {  // the row lanes' sums, lane 0 adds them in lane order
#pragma unroll
      for (int k = 0; k < N; ++k) lanes[(rl * C + cl) * N + k] = acc[k];
      FASTELBO_SYNC();
      if (rl == 0) {
        for (int r = 1; r < R; ++r) {
#pragma unroll
          for (int k = 0; k < N; ++k) acc[k] += lanes[(r * C + cl) * N + k];
        }
      }
      FASTELBO_SYNC();  // lanes is reused by the block's next task
    }
    if (rl == 0 && c < s.chunks) {
      A* out = partial + slab * s.cols + j;
#pragma unroll
      for (int k = 0; k < N; ++k)
        if (k < n) out[k] = acc[k];
    }
  }
}

// Second pass: out[j] = (sum over slabs of partial[., j]) / divisor, in slab order, as O
// (the input dtype T for a gradient, the accumulation type for a statistic).
template <class T, class O>
FASTELBO_GLOBAL void FASTELBO_BOUNDS(256) col_finalize_kernel(const acc_t<T>* partial, int64_t slabs, int64_t cols,
                                                              acc_t<T> divisor, O* out, int64_t out_stride) {
  using A = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols; j += stride) {
    A a = A(0);
    for (int64_t q = 0; q < slabs; ++q) a += partial[q * cols + j];
    out[j * out_stride] = from_acc<O>(a / divisor);
  }
}

// Launches the column job, then the finalize pass into out ([cols], stride out_stride).
// rows == 0 still writes out (0 / divisor).
template <class T, class Job, class O>
void launch_col_map(const Job& job, const ColShape& s, void* workspace, O* out, int64_t out_stride,
                    acc_t<T> divisor, cudaStream_t stream) {
  if (s.cols == 0) return;
  auto* partial = static_cast<acc_t<T>*>(workspace);
  if (s.tasks > 0) {
    const auto kernel = &col_map_kernel<T, Job>;
    FASTELBO_LAUNCH(kernel, s.grid, kMapThreads, 0, stream, job, s, partial);
  }
  const int64_t blocks = ceil_div(s.cols, 256);
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  const auto finalize = &col_finalize_kernel<T, O>;
  FASTELBO_LAUNCH(finalize, grid, 256, 0, stream, static_cast<const acc_t<T>*>(partial), s.slabs, s.cols, divisor,
                  out, out_stride);
}

}  // namespace cuda
}  // namespace fastelbo
