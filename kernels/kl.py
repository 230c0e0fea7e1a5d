"""Gaussian KL of q = N(mu, e^lv) to N(0, I) or to N(pmu, e^plv) (docs/design.md §1), Triton
(the per-element formulas: _math.kl_element / kl_element_grad):
    forward   0.5 * sum(e^lv + mu^2 - 1 - lv)                                 (fastelbo_math.h kl_std)
              0.5 * sum(plv - lv + e^(lv - plv) + (mu - pmu)^2 e^-plv - 1)    (kl_normal)
    backward  dmu = g mu, dlv = g (e^lv - 1) / 2                               (kl_std_grad)
              dmu = g (mu - pmu) e^-plv = -dpmu, dlv = g (e^(lv - plv) - 1) / 2,
              dplv = g (1 - e^(lv - plv) - (mu - pmu)^2 e^-plv) / 2            (kl_normal_grad)
Tiles of [ROWS, BLOCK]; the row helpers are shared with the fused ELBO (kernels/elbo.py) and free
bits (kernels/free_bits.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _checks as C
from . import _launch as L
from . import _math as M
from . import _tiles as T


# ---------------------------------------------------------------------------
# Row helpers (also used by the fused ELBO kernels)
# ---------------------------------------------------------------------------
@triton.jit
def kl_rows(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, row_mask, D,
            s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
            HAS_PRIOR: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """KL of each row of the tile, [ROWS], in the accumulation type."""
    total = M.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
    for j0 in range(0, D, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < D)[None, :]
        mu, lv, pmu, plv = T.load_posterior_prior(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, cols, s_m0, s_m1, s_l0, s_l1,
                                                  s_pm0, s_pm1, s_pl0, s_pl1, mask, HAS_PRIOR, FP64)
        total += tl.where(mask, M.kl_element(mu, lv, pmu, plv, HAS_PRIOR), 0.0)
    return tl.sum(total, axis=1)


@triton.jit
def kl_grad_tile(gg, mu_ptr, lv_ptr, pmu_ptr, plv_ptr, dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr, rows, cols, mask, D,
                 s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
                 HAS_PRIOR: tl.constexpr, WANT_MU: tl.constexpr, WANT_LV: tl.constexpr, WANT_PMU: tl.constexpr,
                 WANT_PLV: tl.constexpr, FP64: tl.constexpr):
    """Writes the wanted KL gradients of one [ROWS, BLOCK] tile, gg the upstream gradient
    ([ROWS, 1] per row, or [ROWS, BLOCK]: free bits masks columns). Reads only what they need."""
    lv = T.load_tile(lv_ptr, rows, cols, s_l0, s_l1, mask, FP64)
    pmu, plv = T.load_prior(pmu_ptr, plv_ptr, rows, cols, s_pm0, s_pm1, s_pl0, s_pl1, mask, lv, lv, HAS_PRIOR, FP64)
    if WANT_MU or (HAS_PRIOR and (WANT_PMU or WANT_PLV)):
        mu = T.load_tile(mu_ptr, rows, cols, s_m0, s_m1, mask, FP64)
    else:
        mu = lv  # not read by the wanted gradients
    dmu, dlv, dpmu, dplv = M.kl_element_grad(mu, lv, pmu, plv, HAS_PRIOR)
    if WANT_MU:
        T.store_tile(dmu_ptr, rows, cols, D, gg * dmu, mask)
    if WANT_LV:
        T.store_tile(dlv_ptr, rows, cols, D, gg * dlv, mask)
    if WANT_PMU:
        T.store_tile(dpmu_ptr, rows, cols, D, gg * dpmu, mask)
    if WANT_PLV:
        T.store_tile(dplv_ptr, rows, cols, D, gg * dplv, mask)


@triton.jit
def kl_grad_rows(g, mu_ptr, lv_ptr, pmu_ptr, plv_ptr, dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr, rows, row_mask, D,
                 s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
                 HAS_PRIOR: tl.constexpr, WANT_MU: tl.constexpr, WANT_LV: tl.constexpr, WANT_PMU: tl.constexpr,
                 WANT_PLV: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """Writes the wanted KL gradients of the tile's rows, g ([ROWS]) the upstream gradient."""
    for j0 in range(0, D, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < D)[None, :]
        kl_grad_tile(g[:, None], mu_ptr, lv_ptr, pmu_ptr, plv_ptr, dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr, rows, cols,
                     mask, D, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1, HAS_PRIOR, WANT_MU, WANT_LV,
                     WANT_PMU, WANT_PLV, FP64)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@triton.jit
def _kl_fwd_kernel(
    mu_ptr,  # [B, D] posterior mean, strides (s_m0, s_m1)
    lv_ptr,  # [B, D] posterior log-variance, strides (s_l0, s_l1)
    pmu_ptr,  # [B, D] prior mean (expanded: stride 0 over B), read when HAS_PRIOR
    plv_ptr,  # [B, D] prior log-variance (expanded), read when HAS_PRIOR
    kl_ptr,  # [B] out
    B, D,
    s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
    HAS_PRIOR: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = T.row_ids(pid, ROWS)
    row_mask = rows < B
    kl = kl_rows(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, row_mask, D, s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0,
                 s_pl1, HAS_PRIOR, FP64, ROWS, BLOCK)
    tl.store(kl_ptr + rows, kl.to(kl_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _kl_bwd_kernel(
    g_ptr,  # [B] upstream gradient, stride s_g (0: expanded)
    mu_ptr,  # [B, D] posterior mean, strides (s_m0, s_m1)
    lv_ptr,  # [B, D] posterior log-variance, strides (s_l0, s_l1)
    pmu_ptr,  # [B, D] prior mean (expanded), read when HAS_PRIOR
    plv_ptr,  # [B, D] prior log-variance (expanded), read when HAS_PRIOR
    dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr,  # [B, D] out, contiguous, written when WANT_*
    B, D, s_g,
    s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1,
    HAS_PRIOR: tl.constexpr, WANT_MU: tl.constexpr, WANT_LV: tl.constexpr, WANT_PMU: tl.constexpr,
    WANT_PLV: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = T.row_ids(pid, ROWS)
    row_mask = rows < B
    g = T.load_row_scalar(g_ptr, rows, s_g, row_mask, True, FP64)
    kl_grad_rows(g, mu_ptr, lv_ptr, pmu_ptr, plv_ptr, dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr, rows, row_mask, D,
                 s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1, HAS_PRIOR, WANT_MU, WANT_LV, WANT_PMU, WANT_PLV,
                 FP64, BLOCK)


_kl_fwd_tuned = L.row_autotune(_kl_fwd_kernel, key=["D"])
_kl_bwd_tuned = L.row_autotune(_kl_bwd_kernel, key=["D"])


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------
def kl_operands(mu, logvar, prior_mu, prior_logvar):
    """Pointer and stride arguments of kl_rows / kl_grad_rows."""
    return ((mu, logvar, L.or_dummy(prior_mu, mu), L.or_dummy(prior_logvar, mu)),
            (*L.strides(mu), *L.strides(logvar), *L.strides(prior_mu), *L.strides(prior_logvar)))


def kl_grads(mu, prior_mu, output_mask):
    """The wanted latent gradients (mu, logvar, prior_mu, prior_logvar; the prior's only with a
    prior): the flags and the fresh (or empty) results, as kl_grad_rows writes them."""
    has_prior = prior_mu is not None
    want = [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]) and has_prior,
            bool(output_mask[3]) and has_prior]
    return want, [L.grad_or_empty(w, mu) for w in want]


def kl_flags(prior_mu, want_mu, want_lv, want_pmu, want_plv):
    """The HAS_PRIOR and WANT_* constexprs of kl_grad_rows / kl_grad_tile / log_pq_grad_rows."""
    return dict(HAS_PRIOR=int(prior_mu is not None), WANT_MU=int(want_mu), WANT_LV=int(want_lv),
                WANT_PMU=int(want_pmu), WANT_PLV=int(want_plv))


def launch_kl_grads(kernel, tuned, grad, mu, logvar, prior_mu, prior_logvar, output_mask, *extra):
    """The wanted KL gradients (kl_grads), written by a [ROWS, BLOCK] backward kernel over the rows:
    _kl_bwd_kernel, or one that takes its arguments and then `extra` (free bits: kl_dims and the
    floor). No launch when none is wanted."""
    want, d = kl_grads(mu, prior_mu, output_mask)
    B, D = mu.shape
    if any(want):
        ptrs, strides = kl_operands(mu, logvar, prior_mu, prior_logvar)
        block = L.block_for(D)
        L.launch_rows(kernel, tuned, B, (grad, *ptrs, *d, B, D, grad.stride(0), *strides, *extra), block,
                      **kl_flags(prior_mu, *want), FP64=L.fp64(mu), BLOCK=block)
    return tuple(d)


def kl_fwd(mu, logvar, prior_mu, prior_logvar):
    C.check_kl_args(mu, logvar, prior_mu, prior_logvar)
    B, D = mu.shape
    kl = mu.new_empty(B)
    ptrs, strides = kl_operands(mu, logvar, prior_mu, prior_logvar)
    block = L.block_for(D)
    L.launch_rows(_kl_fwd_kernel, _kl_fwd_tuned, B, (*ptrs, kl, B, D, *strides), block,
                  HAS_PRIOR=int(prior_mu is not None), FP64=L.fp64(mu), BLOCK=block)
    return kl


def kl_bwd(grad, mu, logvar, prior_mu, prior_logvar, output_mask):
    C.check_kl_args(mu, logvar, prior_mu, prior_logvar)
    C.check_row_grad(grad, "grad", mu)
    return launch_kl_grads(_kl_bwd_kernel, _kl_bwd_tuned, grad, mu, logvar, prior_mu, prior_logvar, output_mask)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------
@triton_op("fastelbo::triton_gaussian_kl", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_gaussian_kl")
def triton_gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None,
                       prior_logvar: torch.Tensor | None) -> torch.Tensor:
    return kl_fwd(mu, logvar, prior_mu, prior_logvar)


@triton_op("fastelbo::triton_gaussian_kl_backward", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_gaussian_kl_backward")
def triton_gaussian_kl_backward(grad: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                                prior_mu: torch.Tensor | None, prior_logvar: torch.Tensor | None,
                                output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    return kl_bwd(grad, mu, logvar, prior_mu, prior_logvar, output_mask)
