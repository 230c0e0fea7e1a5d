"""The fused ELBO (docs/design.md §1), Triton: per row, log p(x | recon) over Dx and
KL(q || p) over Dz in ONE launch, elbo = loglik - beta * KL; the backward is one
launch too, the upstream gradients of (elbo, loglik, kl) folded into one scale
per term (csrc/cpu/elbo.cpp):
    g_ll = g_elbo + g_loglik,   g_kl = g_kl - beta * g_elbo   (absent gradients are 0)
recon is [B, Dx] or [K, B, Dx] (K decoded samples, x [B, Dx] shared): loglik is then the
average over k, loglik[b] = (1/K) sum_k ll(recon[k, b], x[b]), and sample k's gradient
scale is g_ll / K (dx and the observation log-variance's gradient sum over k).
The per-row math is kernels/loglik.py (loglik_rows / loglik_grad_cols) and
kernels/kl.py (kl_rows / kl_grad_rows); a forward program takes ROWS rows of both; the
backward grid is (row tiles or slots) x Dx chunks, the programs of chunk 0 doing the KL.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _checks as C
from . import _launch as L
from . import _tiles as T
from .kl import kl_flags, kl_grad_rows, kl_operands, kl_rows
from .loglik import (loglik_flags, loglik_grad_cols, loglik_operands, loglik_rows, obs_logvar_grad,
                     reduce_obs_logvar)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@triton.jit
def _elbo_fwd_kernel(
    x_ptr,  # [B, Dx] data, strides (s_x0, s_x1)
    r_ptr,  # [K, B, Dx] recon: Bernoulli logits or Gaussian mean, strides (s_rk, s_r0, s_r1) (K = 1: s_rk = 0)
    s_ptr,  # [B, Dx] / [1, Dx] Gaussian observation log-variance (s_s0 = 0 for [1, Dx]), read when GAUSSIAN
    mu_ptr,  # [B, Dz] posterior mean, strides (s_m0, s_m1)
    lv_ptr,  # [B, Dz] posterior log-variance, strides (s_l0, s_l1)
    pmu_ptr,  # [B, Dz] prior mean (expanded), read when HAS_PRIOR
    plv_ptr,  # [B, Dz] prior log-variance (expanded), read when HAS_PRIOR
    elbo_ptr, ll_ptr, kl_ptr,  # [B] out
    bad_ptr,  # [B] int8 out: x of the row outside [0, 1]; written when VALIDATE
    B, DX, DZ, K,
    beta_hi, beta_lo,  # beta = hi + lo (float32 pair: exact for float64 kernels too)
    s_x0, s_x1, s_rk, s_r0, s_r1, s_s0, s_s1, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
    GAUSSIAN: tl.constexpr, HAS_PRIOR: tl.constexpr, VALIDATE: tl.constexpr, FP64: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Z: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = T.row_ids(pid, ROWS)
    row_mask = rows < B
    ll, bad = loglik_rows(r_ptr, x_ptr, s_ptr, rows, row_mask, DX, K, s_rk, s_r0, s_r1, s_x0, s_x1, s_s0, s_s1,
                          GAUSSIAN, VALIDATE, FP64, ROWS, BLOCK_X)
    ll = ll / K
    kl = kl_rows(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, row_mask, DZ, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0,
                 s_pl1, HAS_PRIOR, FP64, ROWS, BLOCK_Z)
    beta = T.float_pair(beta_hi, beta_lo, ROWS, FP64)
    tl.store(elbo_ptr + rows, (ll - beta * kl).to(elbo_ptr.dtype.element_ty), mask=row_mask)
    tl.store(ll_ptr + rows, ll.to(ll_ptr.dtype.element_ty), mask=row_mask)
    tl.store(kl_ptr + rows, kl.to(kl_ptr.dtype.element_ty), mask=row_mask)
    if VALIDATE:
        tl.store(bad_ptr + rows, bad.to(tl.int8), mask=row_mask)


@triton.jit
def _elbo_bwd_kernel(
    ge_ptr, gl_ptr, gk_ptr,  # [B] upstream gradients of elbo, loglik, kl (strides s_ge.., 0: expanded); HAS_G*
    x_ptr,  # [B, Dx] data
    r_ptr,  # [K, B, Dx] recon: logits or mean (K = 1: s_rk = 0)
    s_ptr,  # [B, Dx] / [1, Dx] Gaussian observation log-variance (s_s0 = 0 for [1, Dx]), read when GAUSSIAN
    mu_ptr,  # [B, Dz] posterior mean
    lv_ptr,  # [B, Dz] posterior log-variance
    pmu_ptr,  # [B, Dz] prior mean (expanded), read when HAS_PRIOR
    plv_ptr,  # [B, Dz] prior log-variance (expanded), read when HAS_PRIOR
    dx_ptr,  # [B, Dx] out, contiguous, written when WANT_X
    dr_ptr,  # [K, B, Dx] out, contiguous, written when WANT_R
    ds_ptr,  # [B, Dx] out, contiguous, written when WANT_S and not REDUCE_S
    part_ptr,  # [slots, Dx] out, accumulation type: per-slot sums of ds over rows, when WANT_S and REDUCE_S
    dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr,  # [B, Dz] out, contiguous, written when WANT_*
    B, DX, DZ, K, s_ge, s_gl, s_gk,
    beta_hi, beta_lo,  # beta = hi + lo
    s_x0, s_x1, s_rk, s_r0, s_r1, s_s0, s_s1, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
    GAUSSIAN: tl.constexpr, HAS_PRIOR: tl.constexpr, HAS_GE: tl.constexpr, HAS_GL: tl.constexpr,
    HAS_GK: tl.constexpr, WANT_X: tl.constexpr, WANT_R: tl.constexpr, WANT_S: tl.constexpr,
    REDUCE_S: tl.constexpr, WANT_MU: tl.constexpr, WANT_LV: tl.constexpr, WANT_PMU: tl.constexpr,
    WANT_PLV: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Z: tl.constexpr,
):
    if WANT_R or WANT_X or WANT_S:  # log-likelihood terms of Dx chunk program_id(1): g_ll / K per sample
        cols = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
        loglik_grad_cols(cols, ge_ptr, gl_ptr, s_ge, s_gl, ge_ptr, 0, 0, r_ptr, x_ptr, s_ptr, dr_ptr, dx_ptr,
                         ds_ptr, part_ptr, B, DX, K, s_rk, s_r0, s_r1, s_x0, s_x1, s_s0, s_s1, GAUSSIAN, HAS_GE,
                         HAS_GL, False, WANT_R, WANT_X, WANT_S, REDUCE_S, FP64, ROWS, BLOCK_X)
    if WANT_MU or WANT_LV or WANT_PMU or WANT_PLV:
        if tl.program_id(1) == 0:  # KL terms: the programs of the first Dx chunk
            for t in range(tl.program_id(0), tl.cdiv(B, ROWS), tl.num_programs(0)):
                rows = T.row_ids(tl.full([], t, tl.int64), ROWS)
                row_mask = rows < B
                g_elbo = T.load_row_scalar(ge_ptr, rows, s_ge, row_mask, HAS_GE, FP64)
                beta = T.float_pair(beta_hi, beta_lo, ROWS, FP64)
                g_kl = T.load_row_scalar(gk_ptr, rows, s_gk, row_mask, HAS_GK, FP64) - beta * g_elbo
                kl_grad_rows(g_kl, mu_ptr, lv_ptr, pmu_ptr, plv_ptr, dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr, rows,
                             row_mask, DZ, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1, HAS_PRIOR, WANT_MU,
                             WANT_LV, WANT_PMU, WANT_PLV, FP64, BLOCK_Z)


_elbo_fwd_tuned = L.row_autotune(_elbo_fwd_kernel, key=["DX", "DZ"])
_elbo_bwd_tuned = L.row_autotune(_elbo_bwd_kernel, key=["DX", "DZ"])


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------
def recon_strides(recon):
    """(k stride, row stride, column stride) of recon [B, Dx] (k stride 0) or [K, B, Dx]."""
    return (0, *recon.stride()) if recon.dim() == 2 else tuple(recon.stride())


def _blocks(x, mu):
    bx, bz = L.block_for(x.shape[1]), L.block_for(mu.shape[1])
    return bx, bz, max(bx, bz)


def elbo_fwd(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta, validate_x=False):
    C.check_elbo_args(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood)
    gaussian = likelihood == "gaussian"
    s = obs_logvar if gaussian else None
    B, DX = x.shape
    DZ = mu.shape[1]
    K = recon.shape[0] if recon.dim() == 3 else 1
    elbo, ll, kl = x.new_empty(B), x.new_empty(B), x.new_empty(B)
    validate = bool(validate_x) and not gaussian
    bad = x.new_empty(B if validate else 0, dtype=torch.int8)
    (r_p, x_p, s_p), (_, _, s_x0, s_x1, s_s0, s_s1) = loglik_operands(recon, x, s)
    kl_ptrs, kl_strides = kl_operands(mu, logvar, prior_mu, prior_logvar)
    bx, bz, widest = _blocks(x, mu)
    L.launch_rows(_elbo_fwd_kernel, _elbo_fwd_tuned, B,
                  (x_p, r_p, s_p, *kl_ptrs, elbo, ll, kl, bad, B, DX, DZ, K, *L.split_float(beta),
                   s_x0, s_x1, *recon_strides(recon), s_s0, s_s1, *kl_strides), widest,
                  GAUSSIAN=int(gaussian), HAS_PRIOR=int(prior_mu is not None), VALIDATE=int(validate),
                  FP64=L.fp64(x), BLOCK_X=bx, BLOCK_Z=bz)
    if validate:
        C.check_unit_interval(bad)
    return elbo, ll, kl


def elbo_bwd(grad_elbo, grad_loglik, grad_kl, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood,
             beta, output_mask):
    C.check_elbo_args(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood)
    C.check_elbo_upstream(grad_elbo, grad_loglik, grad_kl, x)
    gaussian, has_prior = likelihood == "gaussian", prior_mu is not None
    want = [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]), bool(output_mask[3]),
            bool(output_mask[4]) and gaussian, bool(output_mask[5]) and has_prior, bool(output_mask[6]) and has_prior]
    s = obs_logvar if gaussian else None
    B, DX = x.shape
    DZ = mu.shape[1]
    K = recon.shape[0] if recon.dim() == 3 else 1
    bx, bz, widest = _blocks(x, mu)
    dx, dr, dmu, dlv, dpmu, dplv = (L.grad_or_empty(want[i], like) for i, like in
                                    ((0, x), (1, recon), (2, mu), (3, mu), (5, mu), (6, mu)))
    ds, part, slots = obs_logvar_grad(want[4], s, B, triton.cdiv(max(DX, 1), bx), x)
    if any(want) and B > 0:
        (r_p, x_p, s_p), (_, _, s_x0, s_x1, s_s0, s_s1) = loglik_operands(recon, x, s)
        kl_ptrs, kl_strides = kl_operands(mu, logvar, prior_mu, prior_logvar)
        gs = [g if g is not None else x for g in (grad_elbo, grad_loglik, grad_kl)]
        L.launch_rows_2d(_elbo_bwd_kernel, _elbo_bwd_tuned, B, DX,
                         (*gs, x_p, r_p, s_p, *kl_ptrs, dx, dr, ds, part, dmu, dlv, dpmu, dplv, B, DX, DZ, K,
                          *(0 if g is None else g.stride(0) for g in (grad_elbo, grad_loglik, grad_kl)),
                          *L.split_float(beta), s_x0, s_x1, *recon_strides(recon), s_s0, s_s1, *kl_strides),
                         widest, bx, slots,
                         HAS_GE=int(grad_elbo is not None), HAS_GL=int(grad_loglik is not None),
                         HAS_GK=int(grad_kl is not None), **loglik_flags(gaussian, want[1], want[0], want[4], slots),
                         **kl_flags(prior_mu, *want[2:4], *want[5:]), FP64=L.fp64(x), BLOCK_X=bx, BLOCK_Z=bz)
        if slots is not None:
            ds = reduce_obs_logvar(part, s)
    else:
        for d in (dx, ds, dmu, dlv, dpmu, dplv):  # no rows: empty sums ([1, Dx] ds)
            d.zero_()
    return dx, dr, dmu, dlv, ds, dpmu, dplv


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------
@triton_op("fastelbo::triton_elbo", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_elbo")
def triton_elbo(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                obs_logvar: torch.Tensor | None, prior_mu: torch.Tensor | None, prior_logvar: torch.Tensor | None,
                likelihood: str, beta: float, validate_x: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    return elbo_fwd(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta, validate_x)


@triton_op("fastelbo::triton_elbo_backward", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_elbo_backward")
def triton_elbo_backward(grad_elbo: torch.Tensor | None, grad_loglik: torch.Tensor | None,
                         grad_kl: torch.Tensor | None, x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor,
                         logvar: torch.Tensor, obs_logvar: torch.Tensor | None, prior_mu: torch.Tensor | None,
                         prior_logvar: torch.Tensor | None, likelihood: str, beta: float,
                         output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor, torch.Tensor, torch.Tensor]:
    return elbo_bwd(grad_elbo, grad_loglik, grad_kl, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar,
                    likelihood, beta, output_mask)
