"""The fused ELBO (DESIGN §1 row 6), Triton: per row, log p(x | recon) over Dx and
KL(q || p) over Dz in ONE launch, elbo = loglik - beta * KL; the backward is one
launch too, the upstream gradients of (elbo, loglik, kl) folded into one scale
per term (csrc/cpu/elbo.cpp):
    g_ll = g_elbo + g_loglik,   g_kl = g_kl - beta * g_elbo   (absent gradients are 0)
The per-row math is kernels/loglik.py (loglik_rows / loglik_grad_rows) and
kernels/kl.py (kl_rows / kl_grad_rows); a program takes ROWS rows of both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _tiles as T
from .kl import check_kl_args, kl_grad_rows, kl_operands, kl_rows
from .loglik import loglik_grad_rows, loglik_operands, loglik_rows

LIKELIHOODS = ("bernoulli", "gaussian")


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@triton.jit
def _elbo_fwd_kernel(
    x_ptr,  # [B, Dx] data, strides (s_x0, s_x1)
    r_ptr,  # [B, Dx] recon: Bernoulli logits or Gaussian mean, strides (s_r0, s_r1)
    s_ptr,  # [B, Dx] Gaussian observation log-variance (expanded), read when GAUSSIAN
    mu_ptr,  # [B, Dz] posterior mean, strides (s_m0, s_m1)
    lv_ptr,  # [B, Dz] posterior log-variance, strides (s_l0, s_l1)
    pmu_ptr,  # [B, Dz] prior mean (expanded), read when HAS_PRIOR
    plv_ptr,  # [B, Dz] prior log-variance (expanded), read when HAS_PRIOR
    elbo_ptr, ll_ptr, kl_ptr,  # [B] out
    bad_ptr,  # [B] int8 out: x of the row outside [0, 1]; written when VALIDATE
    B, DX, DZ,
    beta_hi, beta_lo,  # beta = hi + lo (float32 pair: exact for float64 kernels too)
    s_x0, s_x1, s_r0, s_r1, s_s0, s_s1, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
    GAUSSIAN: tl.constexpr, HAS_PRIOR: tl.constexpr, VALIDATE: tl.constexpr, FP64: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Z: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = T.row_ids(pid, ROWS)
    row_mask = rows < B
    ll, bad = loglik_rows(r_ptr, x_ptr, s_ptr, rows, row_mask, DX, s_r0, s_r1, s_x0, s_x1, s_s0, s_s1, GAUSSIAN,
                          VALIDATE, FP64, ROWS, BLOCK_X)
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
    r_ptr,  # [B, Dx] recon: logits or mean
    s_ptr,  # [B, Dx] Gaussian observation log-variance (expanded), read when GAUSSIAN
    mu_ptr,  # [B, Dz] posterior mean
    lv_ptr,  # [B, Dz] posterior log-variance
    pmu_ptr,  # [B, Dz] prior mean (expanded), read when HAS_PRIOR
    plv_ptr,  # [B, Dz] prior log-variance (expanded), read when HAS_PRIOR
    dx_ptr, dr_ptr, ds_ptr,  # [B, Dx] out, contiguous, written when WANT_*
    dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr,  # [B, Dz] out, contiguous, written when WANT_*
    B, DX, DZ, s_ge, s_gl, s_gk,
    beta_hi, beta_lo,  # beta = hi + lo
    s_x0, s_x1, s_r0, s_r1, s_s0, s_s1, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
    GAUSSIAN: tl.constexpr, HAS_PRIOR: tl.constexpr, HAS_GE: tl.constexpr, HAS_GL: tl.constexpr,
    HAS_GK: tl.constexpr, WANT_X: tl.constexpr, WANT_R: tl.constexpr, WANT_S: tl.constexpr,
    WANT_MU: tl.constexpr, WANT_LV: tl.constexpr, WANT_PMU: tl.constexpr, WANT_PLV: tl.constexpr,
    FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Z: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = T.row_ids(pid, ROWS)
    row_mask = rows < B
    g_elbo = T.load_row_scalar(ge_ptr, rows, s_ge, row_mask, HAS_GE, FP64)
    g_ll = g_elbo + T.load_row_scalar(gl_ptr, rows, s_gl, row_mask, HAS_GL, FP64)
    beta = T.float_pair(beta_hi, beta_lo, ROWS, FP64)
    g_kl = T.load_row_scalar(gk_ptr, rows, s_gk, row_mask, HAS_GK, FP64) - beta * g_elbo
    if WANT_R or WANT_X or WANT_S:
        loglik_grad_rows(g_ll, r_ptr, x_ptr, s_ptr, dr_ptr, dx_ptr, ds_ptr, rows, row_mask, DX, s_r0, s_r1, s_x0,
                         s_x1, s_s0, s_s1, GAUSSIAN, WANT_R, WANT_X, WANT_S, FP64, BLOCK_X)
    if WANT_MU or WANT_LV or WANT_PMU or WANT_PLV:
        kl_grad_rows(g_kl, mu_ptr, lv_ptr, pmu_ptr, plv_ptr, dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr, rows, row_mask, DZ,
                     s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1, HAS_PRIOR, WANT_MU, WANT_LV, WANT_PMU,
                     WANT_PLV, FP64, BLOCK_Z)


_elbo_fwd_tuned = T.row_autotune(_elbo_fwd_kernel, key=["DX", "DZ"])
_elbo_bwd_tuned = T.row_autotune(_elbo_bwd_kernel, key=["DX", "DZ"])


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------
def check_elbo_args(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood):
    torch._check(likelihood in LIKELIHOODS,
                 lambda: f"fastelbo: likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
    T.check_like(recon, "recon", x, "x")
    T.check_like(recon, "recon", obs_logvar, "obs_logvar")
    check_kl_args(mu, logvar, prior_mu, prior_logvar)
    torch._check(mu.shape[0] == recon.shape[0],
                 lambda: f"fastelbo: mu must have the batch size of recon ({recon.shape[0]}), got {mu.shape[0]}")
    torch._check(mu.dtype == recon.dtype, lambda: f"fastelbo: mu must have dtype {recon.dtype}, got {mu.dtype}")
    torch._check(likelihood != "gaussian" or obs_logvar is not None,
                 lambda: "fastelbo: the gaussian likelihood needs obs_logvar (the Python API fills 0)")


def _blocks(x, mu):
    bx, bz = T.block_for(x.shape[1]), T.block_for(mu.shape[1])
    return bx, bz, max(bx, bz)


def elbo_fwd(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta, validate_x=False):
    check_elbo_args(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood)
    gaussian = likelihood == "gaussian"
    s = obs_logvar if gaussian else None
    B, DX = recon.shape
    DZ = mu.shape[1]
    elbo, ll, kl = recon.new_empty(B), recon.new_empty(B), recon.new_empty(B)
    validate = bool(validate_x) and not gaussian
    bad = recon.new_empty(B if validate else 0, dtype=torch.int8)
    (r_p, x_p, s_p), (s_r0, s_r1, s_x0, s_x1, s_s0, s_s1) = loglik_operands(recon, x, s)
    kl_ptrs, kl_strides = kl_operands(mu, logvar, prior_mu, prior_logvar)
    bx, bz, widest = _blocks(x, mu)
    T.launch_rows(_elbo_fwd_kernel, _elbo_fwd_tuned, B,
                  (x_p, r_p, s_p, *kl_ptrs, elbo, ll, kl, bad, B, DX, DZ, *T.split_float(beta),
                   s_x0, s_x1, s_r0, s_r1, s_s0, s_s1, *kl_strides), widest,
                  GAUSSIAN=int(gaussian), HAS_PRIOR=int(prior_mu is not None), VALIDATE=int(validate),
                  FP64=T.fp64(recon), BLOCK_X=bx, BLOCK_Z=bz)
    if validate:
        T.check_unit_interval(bad)
    return elbo, ll, kl


def elbo_bwd(grad_elbo, grad_loglik, grad_kl, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood,
             beta, output_mask):
    check_elbo_args(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood)
    for g, name in ((grad_elbo, "grad_elbo"), (grad_loglik, "grad_loglik"), (grad_kl, "grad_kl")):
        T.check_row_grad(g, name, recon)
    gaussian, has_prior = likelihood == "gaussian", prior_mu is not None
    want = [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]), bool(output_mask[3]),
            bool(output_mask[4]) and gaussian, bool(output_mask[5]) and has_prior, bool(output_mask[6]) and has_prior]
    likes = (x, recon, mu, mu, recon, mu, mu)
    d = [T.grad_or_empty(w, like) for w, like in zip(want, likes)]  # dx, drecon, dmu, dlv, ds, dpmu, dplv
    if not any(want):
        return tuple(d)
    s = obs_logvar if gaussian else None
    B, DX = recon.shape
    DZ = mu.shape[1]
    (r_p, x_p, s_p), (s_r0, s_r1, s_x0, s_x1, s_s0, s_s1) = loglik_operands(recon, x, s)
    kl_ptrs, kl_strides = kl_operands(mu, logvar, prior_mu, prior_logvar)
    gs = [g if g is not None else recon for g in (grad_elbo, grad_loglik, grad_kl)]
    bx, bz, widest = _blocks(x, mu)
    T.launch_rows(_elbo_bwd_kernel, _elbo_bwd_tuned, B,
                  (*gs, x_p, r_p, s_p, *kl_ptrs, d[0], d[1], d[4], d[2], d[3], d[5], d[6], B, DX, DZ,
                   *(0 if g is None else g.stride(0) for g in (grad_elbo, grad_loglik, grad_kl)),
                   *T.split_float(beta), s_x0, s_x1, s_r0, s_r1, s_s0, s_s1, *kl_strides), widest,
                  GAUSSIAN=int(gaussian), HAS_PRIOR=int(has_prior), HAS_GE=int(grad_elbo is not None),
                  HAS_GL=int(grad_loglik is not None), HAS_GK=int(grad_kl is not None), WANT_X=int(want[0]),
                  WANT_R=int(want[1]), WANT_S=int(want[4]), WANT_MU=int(want[2]), WANT_LV=int(want[3]),
                  WANT_PMU=int(want[5]), WANT_PLV=int(want[6]), FP64=T.fp64(recon), BLOCK_X=bx, BLOCK_Z=bz)
    return tuple(d)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------
@triton_op("fastelbo::triton_elbo", mutates_args=())
@T.opaque_under_interpreter("fastelbo::triton_elbo")
def triton_elbo(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                obs_logvar: torch.Tensor | None, prior_mu: torch.Tensor | None, prior_logvar: torch.Tensor | None,
                likelihood: str, beta: float, validate_x: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    return elbo_fwd(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta, validate_x)


@triton_op("fastelbo::triton_elbo_backward", mutates_args=())
@T.opaque_under_interpreter("fastelbo::triton_elbo_backward")
def triton_elbo_backward(grad_elbo: torch.Tensor | None, grad_loglik: torch.Tensor | None,
                         grad_kl: torch.Tensor | None, x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor,
                         logvar: torch.Tensor, obs_logvar: torch.Tensor | None, prior_mu: torch.Tensor | None,
                         prior_logvar: torch.Tensor | None, likelihood: str, beta: float,
                         output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor, torch.Tensor, torch.Tensor]:
    return elbo_bwd(grad_elbo, grad_loglik, grad_kl, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar,
                    likelihood, beta, output_mask)
