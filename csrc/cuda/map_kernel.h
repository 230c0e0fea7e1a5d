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

}  // namespace cuda
}  // namespace fastelbo
