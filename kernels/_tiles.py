"""The loads and stores of the Triton kernels, @triton.jit: [ROWS, BLOCK] tiles of [B, D] operands
of any strides (stride 0: broadcast), per-row values, and scalar arguments, each read in the
accumulation type (_math.acc) and stored rounded to the result's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._math import acc


@triton.jit
def row_ids(pid, ROWS: tl.constexpr):
    """The int64 row indices of program pid's tile."""
    return pid * ROWS + tl.arange(0, ROWS).to(tl.int64)


@triton.jit
def float_pair(hi, lo, ROWS: tl.constexpr, FP64: tl.constexpr):
    """hi + lo (two float32 kernel arguments, see split_float) in the accumulation type, as [ROWS]."""
    return acc(tl.full([ROWS], hi, tl.float32), FP64) + acc(tl.full([ROWS], lo, tl.float32), FP64)


@triton.jit
def load_tile(ptr, rows, cols, s0, s1, mask, FP64: tl.constexpr):
    """[ROWS, BLOCK] tile of a [B, D] operand with strides (s0, s1) (0 = broadcast), upcast."""
    offs = rows[:, None] * s0 + cols[None, :].to(tl.int64) * s1
    return acc(tl.load(ptr + offs, mask=mask, other=0.0), FP64)


@triton.jit
def load_prior(pmu_ptr, plv_ptr, rows, cols, s_pm0, s_pm1, s_pl0, s_pl1, mask, mu, lv,
               HAS_PRIOR: tl.constexpr, FP64: tl.constexpr):
    """(pmu, plv) tiles of the prior N(pmu, e^plv); without a prior (N(0, 1)) nothing is read and
    the given tiles (mu, lv) stand in: the latent math below never reads them then."""
    if HAS_PRIOR:
        return (load_tile(pmu_ptr, rows, cols, s_pm0, s_pm1, mask, FP64),
                load_tile(plv_ptr, rows, cols, s_pl0, s_pl1, mask, FP64))
    else:
        return mu, lv


@triton.jit
def load_posterior_prior(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, cols,
                         s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1, mask,
                         HAS_PRIOR: tl.constexpr, FP64: tl.constexpr):
    """(mu, lv, pmu, plv) tiles of q = N(mu, e^lv) and of the prior (load_prior), upcast."""
    mu = load_tile(mu_ptr, rows, cols, s_m0, s_m1, mask, FP64)
    lv = load_tile(lv_ptr, rows, cols, s_l0, s_l1, mask, FP64)
    pmu, plv = load_prior(pmu_ptr, plv_ptr, rows, cols, s_pm0, s_pm1, s_pl0, s_pl1, mask, mu, lv, HAS_PRIOR, FP64)
    return mu, lv, pmu, plv


@triton.jit
def store_tile(ptr, rows, cols, D, value, mask):
    """Stores a [ROWS, BLOCK] tile into a contiguous [B, D] result (rounded to its dtype)."""
    offs = rows[:, None] * D + cols[None, :]
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_row_scalar(ptr, rows, s0, row_mask, HAS: tl.constexpr, FP64: tl.constexpr):
    """A [B] per-row value (upstream gradient, maybe expanded with stride 0); 0 when absent."""
    if HAS:
        return acc(tl.load(ptr + rows * s0, mask=row_mask, other=0.0), FP64)
    else:
        return acc(tl.zeros(rows.shape, dtype=tl.float32), FP64)
