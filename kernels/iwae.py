"""The importance-weighted bound (IWAE, Burda et al. 2016; docs/design.md §1), Triton; reference:
fastelbo.reference.iwae_log_weights / iwae_bound:
    log w[k, b] = ll(recon[k, b], x[b]) + sum_j log p(z[k, b, j]) - log q(z[k, b, j] | x[b])
    bound[b]    = logsumexp_k log w[k, b] - log K
forward   per row tile, for each sample k: the log-likelihood over Dx (kernels/loglik.py
          loglik_rows) plus the latent term over Dz (_math.log_pq_element, fastelbo_math.h
          log_pq_std / log_pq_normal), stored as log_weights [K, B] (accumulation type), and an
          online log-sum-exp over k (running max and rescaled sum: no overflow for log-weights
          of +-1e4; the bound is the max when it is +-inf, NaN when any log-weight is NaN).
backward  c[k, b] = dL/dlog w[k, b] (the glue forms softmax_k(log w) * grad_bound):
          drecon[k] = c * dll/drecon, dx = sum_k c * dll/dx, d obs_logvar summed over k
          (and over rows for a [1, Dx] one: per-slot partials) -- loglik_grad_cols with a
          per-sample scale; dz[k] = c * dlog_pq/dz and dmu, dlv, dpmu, dplv = sum_k c * d/d.
          (_math.log_pq_element_grad). Grid (row tiles or slots) x Dx chunks; the programs
          of chunk 0 do the latent terms.
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
from .elbo import _blocks, recon_strides
from .kl import kl_flags, kl_operands
from .loglik import (loglik_flags, loglik_grad_cols, loglik_operands, loglik_rows, obs_logvar_grad,
                     outside_unit_rows, reduce_obs_logvar)


# ---------------------------------------------------------------------------
# Row helpers: the latent term log p(z) - log q(z | x) of one sample
# ---------------------------------------------------------------------------
@triton.jit
def log_pq_rows(z_ptr, mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, row_mask, D,
                s_z0, s_z1, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
                HAS_PRIOR: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """sum_j log p(z[b, j]) - log q(z[b, j] | x[b]) of each row of the tile, [ROWS], accumulation type."""
    total = M.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
    for j0 in range(0, D, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < D)[None, :]
        z = T.load_tile(z_ptr, rows, cols, s_z0, s_z1, mask, FP64)
        mu, lv, pmu, plv = T.load_posterior_prior(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, cols, s_m0, s_m1, s_l0, s_l1,
                                                  s_pm0, s_pm1, s_pl0, s_pl1, mask, HAS_PRIOR, FP64)
        total += tl.where(mask, M.log_pq_element(z, mu, lv, pmu, plv, HAS_PRIOR), 0.0)
    return tl.sum(total, axis=1)


@triton.jit
def log_pq_grad_rows(c_ptr, s_ck, s_cb, z_ptr, mu_ptr, lv_ptr, pmu_ptr, plv_ptr,
                     dz_ptr, dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr, rows, row_mask, B, D, K,
                     s_zk, s_z0, s_z1, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
                     HAS_PRIOR: tl.constexpr, WANT_Z: tl.constexpr, WANT_MU: tl.constexpr, WANT_LV: tl.constexpr,
                     WANT_PMU: tl.constexpr, WANT_PLV: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Writes the wanted latent gradients of the tile's rows: dz[k] = c[k] * d/dz per sample
    ([K, B, D], contiguous), the others summed over the K samples ([B, D], contiguous)."""
    for j0 in range(0, D, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < D)[None, :]
        mu, lv, pmu, plv = T.load_posterior_prior(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, cols, s_m0, s_m1, s_l0, s_l1,
                                                  s_pm0, s_pm1, s_pl0, s_pl1, mask, HAS_PRIOR, FP64)
        dmu = M.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
        dlv = M.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
        dpmu = M.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
        dplv = M.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
        for k in range(K):
            kk = tl.full([], k, tl.int64)
            cc = T.load_row_scalar(c_ptr + kk * s_ck, rows, s_cb, row_mask, True, FP64)[:, None]
            z = T.load_tile(z_ptr + kk * s_zk, rows, cols, s_z0, s_z1, mask, FP64)
            gz, gmu, glv, gpmu, gplv = M.log_pq_element_grad(z, mu, lv, pmu, plv, HAS_PRIOR)
            if WANT_Z:
                T.store_tile(dz_ptr + kk * B * D, rows, cols, D, cc * gz, mask)
            dmu += cc * gmu
            dlv += cc * glv
            dpmu += cc * gpmu
            dplv += cc * gplv
        if WANT_MU:
            T.store_tile(dmu_ptr, rows, cols, D, dmu, mask)
        if WANT_LV:
            T.store_tile(dlv_ptr, rows, cols, D, dlv, mask)
        if WANT_PMU:
            T.store_tile(dpmu_ptr, rows, cols, D, dpmu, mask)
        if WANT_PLV:
            T.store_tile(dplv_ptr, rows, cols, D, dplv, mask)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@triton.jit
def _iwae_fwd_kernel(
    x_ptr,  # [B, Dx] data, strides (s_x0, s_x1)
    r_ptr,  # [K, B, Dx] recon: Bernoulli logits or Gaussian mean, strides (s_rk, s_r0, s_r1)
    s_ptr,  # [B, Dx] / [1, Dx] Gaussian observation log-variance (s_s0 = 0 for [1, Dx]), read when GAUSSIAN
    z_ptr,  # [K, B, Dz] samples of q(z | x), strides (s_zk, s_z0, s_z1)
    mu_ptr,  # [B, Dz] posterior mean, strides (s_m0, s_m1)
    lv_ptr,  # [B, Dz] posterior log-variance, strides (s_l0, s_l1)
    pmu_ptr,  # [B, Dz] prior mean (expanded), read when HAS_PRIOR
    plv_ptr,  # [B, Dz] prior log-variance (expanded), read when HAS_PRIOR
    bound_ptr,  # [B] out, the input dtype
    lw_ptr,  # [K, B] out, contiguous, the accumulation type: log-weights
    bad_ptr,  # [B] int8 out: x of the row outside [0, 1]; written when VALIDATE
    B, DX, DZ, K,
    s_x0, s_x1, s_rk, s_r0, s_r1, s_s0, s_s1, s_zk, s_z0, s_z1, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
    GAUSSIAN: tl.constexpr, HAS_PRIOR: tl.constexpr, VALIDATE: tl.constexpr, FP64: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Z: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = T.row_ids(pid, ROWS)
    row_mask = rows < B
    m = M.acc(tl.full([ROWS], float("-inf"), tl.float32), FP64)  # running max of log w over k
    total = M.acc(tl.zeros([ROWS], dtype=tl.float32), FP64)  # running sum of e^(log w - m)
    has_nan = tl.zeros([ROWS], dtype=tl.int1)
    if VALIDATE:  # x in [0, 1], once (not once per sample)
        tl.store(bad_ptr + rows, outside_unit_rows(x_ptr, rows, row_mask, DX, s_x0, s_x1, FP64, ROWS,
                                                   BLOCK_X).to(tl.int8), mask=row_mask)
    for k in range(K):
        kk = tl.full([], k, tl.int64)
        ll, _ = loglik_rows(r_ptr + kk * s_rk, x_ptr, s_ptr, rows, row_mask, DX, 1, 0, s_r0, s_r1, s_x0, s_x1,
                            s_s0, s_s1, GAUSSIAN, False, FP64, ROWS, BLOCK_X)
        lw = ll + log_pq_rows(z_ptr + kk * s_zk, mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, row_mask, DZ, s_z0, s_z1,
                              s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1, HAS_PRIOR, FP64, ROWS, BLOCK_Z)
        tl.store(lw_ptr + kk * B + rows, lw.to(lw_ptr.dtype.element_ty), mask=row_mask)
        # Online log-sum-exp; equal values (both -inf or both +inf included) rescale by exactly 1.
        has_nan = has_nan | (lw != lw)
        m_new = tl.maximum(m, lw)
        total = (total * tl.where(m_new == m, 1.0, tl.exp(m - m_new))
                 + tl.where(lw == m_new, 1.0, tl.exp(lw - m_new)))
        m = m_new
    lse = tl.where(tl.abs(m) == float("inf"), m, m + tl.log(total))
    log_k = tl.log(M.acc(tl.full([ROWS], K, tl.int32), FP64))
    bound = tl.where(has_nan, float("nan"), lse - log_k)
    tl.store(bound_ptr + rows, bound.to(bound_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _iwae_bwd_kernel(
    c_ptr,  # [K, B] dL/dlog w (accumulation type), strides (s_ck, s_cb)
    x_ptr,  # [B, Dx] data
    r_ptr,  # [K, B, Dx] recon: logits or mean
    s_ptr,  # [B, Dx] / [1, Dx] Gaussian observation log-variance (s_s0 = 0 for [1, Dx]), read when GAUSSIAN
    z_ptr,  # [K, B, Dz] samples
    mu_ptr, lv_ptr,  # [B, Dz] posterior
    pmu_ptr, plv_ptr,  # [B, Dz] prior (expanded), read when HAS_PRIOR
    dx_ptr,  # [B, Dx] out, contiguous, written when WANT_X
    dr_ptr,  # [K, B, Dx] out, contiguous, written when WANT_R
    ds_ptr,  # [B, Dx] out, contiguous, written when WANT_S and not REDUCE_S
    part_ptr,  # [slots, Dx] out, accumulation type: per-slot sums of ds over rows, when WANT_S and REDUCE_S
    dz_ptr,  # [K, B, Dz] out, contiguous, written when WANT_Z
    dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr,  # [B, Dz] out, contiguous, written when WANT_*
    B, DX, DZ, K, s_ck, s_cb,
    s_x0, s_x1, s_rk, s_r0, s_r1, s_s0, s_s1, s_zk, s_z0, s_z1, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
    GAUSSIAN: tl.constexpr, HAS_PRIOR: tl.constexpr, WANT_X: tl.constexpr, WANT_R: tl.constexpr,
    WANT_S: tl.constexpr, REDUCE_S: tl.constexpr, WANT_Z: tl.constexpr, WANT_MU: tl.constexpr,
    WANT_LV: tl.constexpr, WANT_PMU: tl.constexpr, WANT_PLV: tl.constexpr, FP64: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Z: tl.constexpr,
):
    if WANT_R or WANT_X or WANT_S:  # log-likelihood terms of Dx chunk program_id(1), sample k scaled by c[k, b]
        cols = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
        loglik_grad_cols(cols, c_ptr, c_ptr, 0, 0, c_ptr, s_ck, s_cb, r_ptr, x_ptr, s_ptr, dr_ptr, dx_ptr, ds_ptr,
                         part_ptr, B, DX, K, s_rk, s_r0, s_r1, s_x0, s_x1, s_s0, s_s1, GAUSSIAN, False, False, True,
                         WANT_R, WANT_X, WANT_S, REDUCE_S, FP64, ROWS, BLOCK_X)
    if WANT_Z or WANT_MU or WANT_LV or WANT_PMU or WANT_PLV:
        if tl.program_id(1) == 0:  # latent terms: the programs of the first Dx chunk
            for t in range(tl.program_id(0), tl.cdiv(B, ROWS), tl.num_programs(0)):
                rows = T.row_ids(tl.full([], t, tl.int64), ROWS)
                log_pq_grad_rows(c_ptr, s_ck, s_cb, z_ptr, mu_ptr, lv_ptr, pmu_ptr, plv_ptr, dz_ptr, dmu_ptr, dlv_ptr,
                                 dpmu_ptr, dplv_ptr, rows, rows < B, B, DZ, K, s_zk, s_z0, s_z1, s_m0, s_m1, s_l0,
                                 s_l1, s_pm0, s_pm1, s_pl0, s_pl1, HAS_PRIOR, WANT_Z, WANT_MU, WANT_LV, WANT_PMU,
                                 WANT_PLV, FP64, ROWS, BLOCK_Z)


_iwae_fwd_tuned = L.row_autotune(_iwae_fwd_kernel, key=["DX", "DZ"])
_iwae_bwd_tuned = L.row_autotune(_iwae_bwd_kernel, key=["DX", "DZ"])


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------
def iwae_fwd(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, validate_x=False):
    C.check_iwae_args(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood)
    gaussian = likelihood == "gaussian"
    s = obs_logvar if gaussian else None
    B, DX = x.shape
    K, DZ = recon.shape[0], mu.shape[1]
    bound = x.new_empty(B)
    lw = x.new_empty((K, B), dtype=acc_dtype(x.dtype))
    validate = bool(validate_x) and not gaussian
    bad = x.new_empty(B if validate else 0, dtype=torch.int8)
    if K == 0:  # log of an empty mean
        bound.fill_(math.nan)
        return bound, lw
    (r_p, x_p, s_p), (_, _, s_x0, s_x1, s_s0, s_s1) = loglik_operands(recon, x, s)
    kl_ptrs, kl_strides = kl_operands(mu, logvar, prior_mu, prior_logvar)
    bx, bz, widest = _blocks(x, mu)
    L.launch_rows(_iwae_fwd_kernel, _iwae_fwd_tuned, B,
                  (x_p, r_p, s_p, z, *kl_ptrs, bound, lw, bad, B, DX, DZ, K, s_x0, s_x1, *recon_strides(recon),
                   s_s0, s_s1, *z.stride(), *kl_strides), widest,
                  GAUSSIAN=int(gaussian), HAS_PRIOR=int(prior_mu is not None), VALIDATE=int(validate),
                  FP64=L.fp64(x), BLOCK_X=bx, BLOCK_Z=bz)
    if validate:
        C.check_unit_interval(bad)
    return bound, lw


def iwae_bwd(grad_log_weights, x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, output_mask):
    C.check_iwae_args(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood)
    c = grad_log_weights
    C.check_log_weights_grad(c, recon, x)
    gaussian, has_prior = likelihood == "gaussian", prior_mu is not None
    want = [bool(m) for m in output_mask[:5]] + [bool(output_mask[5]) and gaussian,
                                                bool(output_mask[6]) and has_prior, bool(output_mask[7]) and has_prior]
    s = obs_logvar if gaussian else None
    B, DX = x.shape
    K, DZ = recon.shape[0], mu.shape[1]
    bx, bz, widest = _blocks(x, mu)
    dx, dr, dz, dmu, dlv, dpmu, dplv = (L.grad_or_empty(want[i], like) for i, like in
                                        ((0, x), (1, recon), (2, z), (3, mu), (4, mu), (6, mu), (7, mu)))
    ds, part, slots = obs_logvar_grad(want[5], s, B, triton.cdiv(max(DX, 1), bx), x)
    if any(want) and B > 0:
        (r_p, x_p, s_p), (_, _, s_x0, s_x1, s_s0, s_s1) = loglik_operands(recon, x, s)
        kl_ptrs, kl_strides = kl_operands(mu, logvar, prior_mu, prior_logvar)
        L.launch_rows_2d(_iwae_bwd_kernel, _iwae_bwd_tuned, B, DX,
                         (c, x_p, r_p, s_p, z, *kl_ptrs, dx, dr, ds, part, dz, dmu, dlv, dpmu, dplv, B, DX, DZ, K,
                          *c.stride(), s_x0, s_x1, *recon_strides(recon), s_s0, s_s1, *z.stride(), *kl_strides),
                         widest, bx, slots,
                         WANT_Z=int(want[2]), **loglik_flags(gaussian, want[1], want[0], want[5], slots),
                         **kl_flags(prior_mu, *want[3:5], *want[6:]), FP64=L.fp64(x), BLOCK_X=bx, BLOCK_Z=bz)
        if slots is not None:
            ds = reduce_obs_logvar(part, s)
    else:
        for d in (dx, ds, dmu, dlv, dpmu, dplv):  # no rows: empty sums ([1, Dx] ds)
            d.zero_()
    return dx, dr, dz, dmu, dlv, ds, dpmu, dplv


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------
@triton_op("fastelbo::triton_iwae_bound", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_iwae_bound")
def triton_iwae_bound(x: torch.Tensor, recon: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                      obs_logvar: torch.Tensor | None, prior_mu: torch.Tensor | None,
                      prior_logvar: torch.Tensor | None, likelihood: str,
                      validate_x: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return iwae_fwd(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, validate_x)


@triton_op("fastelbo::triton_iwae_bound_backward", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_iwae_bound_backward")
def triton_iwae_bound_backward(grad_log_weights: torch.Tensor, x: torch.Tensor, recon: torch.Tensor, z: torch.Tensor,
                               mu: torch.Tensor, logvar: torch.Tensor, obs_logvar: torch.Tensor | None,
                               prior_mu: torch.Tensor | None, prior_logvar: torch.Tensor | None, likelihood: str,
                               output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor]:
    return iwae_bwd(grad_log_weights, x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood,
                    output_mask)
