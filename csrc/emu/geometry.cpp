// TEST-ONLY: the launch plans of csrc/cuda's kernels as the "cuda-emulated"
// backend makes them, for tests/test_launch_geometry.py to check that its
// shapes reach the geometry they are meant to (C functions, called by ctypes).
#include "cuda_emu.h"
// (after the emulation header: the kernels' headers see its macros)
#include "../cuda/map_kernel.h"
#include "../cuda/reduce_kernel.h"

#include <cstdlib>

extern "C" {

// The multiprocessor count the emulated launches are planned for: FASTELBO_EMU_SMS, default 1 (small
// grids: test-sized inputs reach the grid-stride loops, and every block of a long-row reduction sums
// several rows, reusing its shared memory).
int fastelbo_emu_sms() {
  const char* v = std::getenv("FASTELBO_EMU_SMS");
  const int n = v ? std::atoi(v) : 0;
  return n > 0 ? n : 1;
}

// reduce_shape(): out = {block, group, grid, splits, rows per block pass (block / group)}.
void fastelbo_emu_reduce_plan(int64_t rows, int64_t cols_a, int64_t cols_b, int chunk, int64_t* out) {
  const fastelbo::cuda::ReduceShape sh = fastelbo::cuda::reduce_shape(rows, cols_a, cols_b, chunk, fastelbo_emu_sms());
  out[0] = sh.block;
  out[1] = sh.group;
  out[2] = sh.grid;
  out[3] = sh.splits;
  out[4] = sh.block / sh.group;
}

// launch_map()'s plan for one job: out = {blocks, items, threads per block}.
void fastelbo_emu_map_plan(int64_t rows, int64_t cols, int chunk, int64_t* out) {
  struct Job {
    int64_t rows, cols;
  } job{rows, cols};
  fastelbo::cuda::MapShape s = fastelbo::cuda::map_shape(job, chunk);
  const int64_t cap = static_cast<int64_t>(fastelbo_emu_sms()) * 16;
  fastelbo::cuda::map_blocks(s, s.items, cap);
  out[0] = s.blocks;
  out[1] = s.items;
  out[2] = fastelbo::cuda::kMapThreads;
}

// col_shape() (col_map_kernel: column sums of a [1, cols] gradient, free bits' kl_dims):
// out = {grid, lanes_c (chunk columns per block), lanes_r (row lanes), tiles, slabs, tasks}.
void fastelbo_emu_col_plan(int64_t rows, int64_t cols, int chunk, int64_t* out) {
  const fastelbo::cuda::ColShape s = fastelbo::cuda::col_shape(rows, cols, chunk, fastelbo_emu_sms());
  out[0] = s.grid;
  out[1] = s.lanes_c;
  out[2] = s.lanes_r;
  out[3] = s.tiles;
  out[4] = s.slabs;
  out[5] = s.tasks;
}

}  // extern "C"
