"""Free bits (Kingma et al. 2016), Triton; reference: fastelbo.reference.free_bits_kl:
    kl_dims[j] = (1/B) sum_b KL[b, j]                        (KL[b, j]: _math.kl_element, as gaussian_kl)
    kl[b]      = sum_j (kl_dims[j] < free_bits ? free_bits : KL[b, j])
so that mean_b kl[b] = sum_j max(free_bits, kl_dims[j]) as torch.clamp forms it: a dimension of
NaN kl_dims is NaN in every row, value and gradient (_math.free_bits_weight: 1 kept, 0 floored, NaN).
forward   two passes over [B, Dz]: the column sums (grid (slots) x Dz chunks, per-slot partials
          [slots, Dz] in the accumulation type, then one sum), then the rows (tiles of [ROWS, BLOCK]).
backward  dX[b, j] = (kl_dims[j] < free_bits ? 0 : grad[b] * dKL[b, j]/dX)   (kernels/kl.py kl_grad_tile,
          the upstream gradient weighted per column).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from fastelbo._dtypes import acc_dtype

from . import _checks as C
from . import _launch as L
from . import _math as M
from . import _tiles as T
from .kl import kl_grad_tile, kl_operands, launch_kl_grads


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@triton.jit
def _dim_weight(kd_ptr, cols, col_mask, fb, FP64: tl.constexpr):
    """The weight of dimensions `cols` under the floor fb (_math.free_bits_weight), from kl_dims."""
    return M.free_bits_weight(M.acc(tl.load(kd_ptr + cols, mask=col_mask, other=0.0), FP64), fb)


@triton.jit
def _free_bits_cols_kernel(
    mu_ptr, lv_ptr,  # [B, D] posterior, strides (s_m0, s_m1), (s_l0, s_l1)
    pmu_ptr, plv_ptr,  # [B, D] prior (expanded), read when HAS_PRIOR
    part_ptr,  # [slots, D] out, accumulation type: sum of KL[b, j] over the rows of slot program_id(0)
    B, D,
    s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
    HAS_PRIOR: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < D
    total = M.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
    for t in range(tl.program_id(0), tl.cdiv(B, ROWS), tl.num_programs(0)):
        rows = T.row_ids(tl.full([], t, tl.int64), ROWS)
        mask = (rows < B)[:, None] & col_mask[None, :]
        mu, lv, pmu, plv = T.load_posterior_prior(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, cols, s_m0, s_m1, s_l0, s_l1,
                                                  s_pm0, s_pm1, s_pl0, s_pl1, mask, HAS_PRIOR, FP64)
        total += tl.where(mask, M.kl_element(mu, lv, pmu, plv, HAS_PRIOR), 0.0)
    tl.store(part_ptr + tl.program_id(0).to(tl.int64) * D + cols, tl.sum(total, axis=0), mask=col_mask)


@triton.jit
def _free_bits_fwd_kernel(
    kd_ptr,  # [D] kl_dims, accumulation type, contiguous
    mu_ptr, lv_ptr,  # [B, D] posterior
    pmu_ptr, plv_ptr,  # [B, D] prior (expanded), read when HAS_PRIOR
    kl_ptr,  # [B] out
    B, D,
    fb_hi, fb_lo,  # free_bits = hi + lo (float32 pair: exact for float64 kernels too)
    s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
    HAS_PRIOR: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = T.row_ids(pid, ROWS)
    row_mask = rows < B
    fb = T.float_pair(fb_hi, fb_lo, BLOCK, FP64)
    total = M.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
    for j0 in range(0, D, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        w = _dim_weight(kd_ptr, cols, col_mask, fb, FP64)[None, :]
        mu, lv, pmu, plv = T.load_posterior_prior(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, cols, s_m0, s_m1, s_l0, s_l1,
                                                  s_pm0, s_pm1, s_pl0, s_pl1, mask, HAS_PRIOR, FP64)
        term = M.free_bits_select(w, M.kl_element(mu, lv, pmu, plv, HAS_PRIOR), fb[None, :])
        total += tl.where(mask, term, 0.0)
    tl.store(kl_ptr + rows, tl.sum(total, axis=1).to(kl_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _free_bits_bwd_kernel(
    # _kl_bwd_kernel's arguments, then the floor's: kl.launch_kl_grads launches both
    g_ptr,  # [B] upstream gradient, stride s_g (0: expanded)
    mu_ptr, lv_ptr,  # [B, D] posterior
    pmu_ptr, plv_ptr,  # [B, D] prior (expanded), read when HAS_PRIOR
    dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr,  # [B, D] out, contiguous, written when WANT_*
    B, D, s_g,
    s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
    kd_ptr,  # [D] kl_dims, accumulation type, contiguous
    fb_hi, fb_lo,  # free_bits = hi + lo
    HAS_PRIOR: tl.constexpr, WANT_MU: tl.constexpr, WANT_LV: tl.constexpr, WANT_PMU: tl.constexpr,
    WANT_PLV: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = T.row_ids(pid, ROWS)
    row_mask = rows < B
    g = T.load_row_scalar(g_ptr, rows, s_g, row_mask, True, FP64)
    fb = T.float_pair(fb_hi, fb_lo, BLOCK, FP64)
    for j0 in range(0, D, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        w = _dim_weight(kd_ptr, cols, col_mask, fb, FP64)[None, :]
        gg = M.free_bits_select(w, g[:, None], 0.0)  # a floored dimension passes no gradient, a NaN one NaN
        kl_grad_tile(gg, mu_ptr, lv_ptr, pmu_ptr, plv_ptr, dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr, rows, cols, mask, D,
                     s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1, HAS_PRIOR, WANT_MU, WANT_LV, WANT_PMU,
                     WANT_PLV, FP64)


_free_bits_cols_tuned = L.row_autotune(_free_bits_cols_kernel, key=["D"])
_free_bits_fwd_tuned = L.row_autotune(_free_bits_fwd_kernel, key=["D"])
_free_bits_bwd_tuned = L.row_autotune(_free_bits_bwd_kernel, key=["D"])


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------
def free_bits_fwd(mu, logvar, prior_mu, prior_logvar, free_bits):
    C.check_kl_args(mu, logvar, prior_mu, prior_logvar)
    C.check_free_bits(free_bits)
    B, D = mu.shape
    kl = mu.new_empty(B)
    if B == 0:  # the mean over no rows, as torch.mean
        return kl, mu.new_full((D,), math.nan, dtype=acc_dtype(mu.dtype))
    ptrs, strides = kl_operands(mu, logvar, prior_mu, prior_logvar)
    block = L.block_for(D)
    chunks = triton.cdiv(max(D, 1), block)
    slots = L.reduce_slots(B, chunks)
    part = L.row_partials(mu, slots)
    L.launch_rows_2d(_free_bits_cols_kernel, _free_bits_cols_tuned, B, D, (*ptrs, part, B, D, *strides), block, block,
                     slots, HAS_PRIOR=int(prior_mu is not None), FP64=L.fp64(mu), BLOCK=block)
    kl_dims = part.sum(0) / B
    L.launch_rows(_free_bits_fwd_kernel, _free_bits_fwd_tuned, B,
                  (kl_dims, *ptrs, kl, B, D, *L.split_float(free_bits), *strides), block,
                  HAS_PRIOR=int(prior_mu is not None), FP64=L.fp64(mu), BLOCK=block)
    return kl, kl_dims


def free_bits_bwd(grad, kl_dims, mu, logvar, prior_mu, prior_logvar, free_bits, output_mask):
    C.check_kl_args(mu, logvar, prior_mu, prior_logvar)
    C.check_row_grad(grad, "grad", mu)
    C.check_free_bits_backward(kl_dims, mu, free_bits)
    return launch_kl_grads(_free_bits_bwd_kernel, _free_bits_bwd_tuned, grad, mu, logvar, prior_mu, prior_logvar,
                           output_mask, kl_dims.contiguous(), *L.split_float(free_bits))


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------
@triton_op("fastelbo::triton_free_bits_kl", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_free_bits_kl")
def triton_free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None,
                        prior_logvar: torch.Tensor | None, free_bits: float) -> tuple[torch.Tensor, torch.Tensor]:
    return free_bits_fwd(mu, logvar, prior_mu, prior_logvar, free_bits)


@triton_op("fastelbo::triton_free_bits_kl_backward", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_free_bits_kl_backward")
def triton_free_bits_kl_backward(grad: torch.Tensor, kl_dims: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                                 prior_mu: torch.Tensor | None, prior_logvar: torch.Tensor | None, free_bits: float,
                                 output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    return free_bits_bwd(grad, kl_dims, mu, logvar, prior_mu, prior_logvar, free_bits, output_mask)
