"""Shapes chosen for the launch geometry of the fused kernels, on every fused backend.

The accuracy suite's shapes are small (the Triton interpreter runs them too);
these add what only larger inputs reach in the CUDA kernels (csrc/cuda), with
the multiprocessor count the "cuda-emulated" backend plans for (FASTELBO_EMU_SMS,
default 1; on a real GPU the same paths need more rows):

  long rows, few of them   a row cut into slices summed by several blocks, then the
                           finalize kernel (reduce_kernel.h: splits > 1);
  long rows, many of them  one block per row and more rows than the grid: each block
                           reuses its shared memory for a second and third row (the
                           barrier that guards the reuse);
  short rows, many         a warp (or one thread) per row, more rows than the grid
                           covers: the grid-stride loops of both kernels;

and the vectorized (16-byte) path next to the scalar one: contiguous rows whose
length is a multiple of the vector, and the same rows one element off alignment.
Values and gradients against the reference, as in test_accuracy.py.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from cases import bernoulli_case, elbo_case, kl_case, rsample_case, run
from helpers import dtype_params, generator_for

DTYPES = dtype_params()
# 4-element chunks (f32; f64 has its geometry) and 8-element chunks (f16; bf16 has its geometry).
GEOMETRY_DTYPES = [p for p in DTYPES if p.id in ("f32", "f16")]

# (B, D) for the single-term ops, (B, Dx, Dz) for the ELBO; the geometry with 1 SM (cuda-emulated).
SHAPES = {
    "split_rows": ((2, 33000), (2, 33000, 17)),  # 2 (f16) or 4 (f32) slices per row, then the finalize pass
    "block_rows": ((66, 2100), (66, 2100, 40)),  # a block (128/256 threads) per row, 66 rows on 32 blocks
    "warp_rows": ((300, 130), (300, 130, 9)),  # a warp per row, 300 rows > 256 per grid pass; map: > 4096 chunks
    "thread_rows": ((9000, 3), (9000, 3, 2)),  # a thread (ELBO: two) per row, > 8192 (4096) rows per grid pass
}


def _cases(kind, gen):
    (b, d), (eb, dx, dz) = SHAPES[kind]
    return {
        "rsample": rsample_case(b, d, "seed", gen),  # map kernel, noise regenerated in the backward
        "kl_prior": kl_case(b, d, "row", gen),  # one-term reduction, map backward with 4 operands
        "elbo_bernoulli": elbo_case(eb, dx, dz, "bernoulli", None, "full", 1.3, gen),  # two-term reduction, two jobs
    }


def _skip_interpreter(fused):
    if fused.name == "triton" and fused.device == "cpu":
        pytest.skip("sizes for the CUDA kernels' launch geometry: too slow for the Triton interpreter "
                    "(the Triton kernels run them on a GPU)")


@pytest.mark.parametrize("kind", list(SHAPES))
def test_shapes_reach_their_geometry(kind):
    """The launch plans of the CUDA kernels for these shapes, as the cuda-emulated backend makes them (1 SM),
    are the ones the shapes are named after; a change of reduce_shape/map_blocks that moves them fails here."""
    from fastelbo import _backend, _build

    ok, why = _backend.available("cuda-emulated", "cpu")
    if not ok:
        pytest.skip(f"backend 'cuda-emulated': {why}")
    lib = ctypes.CDLL(str(_build.emulated_library()))
    out = (ctypes.c_int64 * 5)()
    (b, d), (eb, dx, dz) = SHAPES[kind]
    for chunk, dt in ((4, "f32"), (8, "f16")):
        for rows, cols_a, cols_b in ((b, d, 0), (eb, dx, dz)):
            lib.fastelbo_emu_reduce_plan(ctypes.c_int64(rows), ctypes.c_int64(cols_a), ctypes.c_int64(cols_b),
                                         chunk, out)
            block, group, grid, splits, per_pass = list(out)
            what = f"{kind} {dt} reduce of [{rows}, {cols_a}+{cols_b}]: block {block}, group {group}, grid {grid}, " \
                   f"splits {splits}"
            if kind == "split_rows":
                assert splits > 1 and group == block, what
            elif kind == "block_rows":
                assert splits == 1 and group == block and rows >= 2 * grid, what  # every block: 2 rows or more
            else:
                assert splits == 1 and (group == 32 if kind == "warp_rows" else group <= 2), what
                assert rows > grid * per_pass, what  # more rows than one pass of the grid covers
        if kind in ("warp_rows", "thread_rows", "block_rows"):
            lib.fastelbo_emu_map_plan(ctypes.c_int64(b), ctypes.c_int64(d), chunk, out)
            blocks, items, threads = list(out)[:3]
            assert items > blocks * threads, f"{kind} {dt} map of [{b}, {d}]: {items} items, {blocks} x {threads}"


@pytest.mark.parametrize("dtype", GEOMETRY_DTYPES)
@pytest.mark.parametrize("op", list(_cases("warp_rows", generator_for(0))))
@pytest.mark.parametrize("kind", list(SHAPES))
def test_launch_geometry(fused, dtype, kind, op):
    _skip_interpreter(fused)
    run(_cases(kind, generator_for("geometry", kind, op))[op], fused, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_vector_path_and_scalar_fallback(fused, dtype, offset):
    """Rows of 1024 elements (a whole number of 16-byte vectors in every dtype): at offset 0 every operand
    takes the vector loads and stores, at offset 1 the same values sit one element off a 16-byte boundary and
    every access takes the scalar path; both against the reference."""
    _skip_interpreter(fused)
    gen = generator_for("vector", offset)
    case = elbo_case(6, 1024, 64, "gaussian", "full", "full", 0.5, gen)
    for name, t in case.tensors.items():
        if offset and t.dim() == 2:
            case.layout[name] = "offset1"
    T, _, _ = run(case, fused, dtype)
    for name, t in T.items():
        if t.dim() == 2:
            misaligned = (t.data_ptr() % 16) != 0
            assert misaligned == bool(offset), f"{name}: data_ptr % 16 = {t.data_ptr() % 16}"
