"""Bernoulli and Gaussian log-likelihood per row (DESIGN §1 rows 4-5), Triton:
    Bernoulli, logits l, x in [0, 1], t = e^-|l|   (fastelbo_math.h bernoulli_ll / bernoulli_ll_grad)
        forward   sum(x l - softplus(l)) = -sum((1 - x) l + max(-l, 0) + log1p(t))
        backward  dl = g (x - sigmoid(l)), sigmoid(l) = 1/(1+t) for l >= 0, t/(1+t) otherwise;  dx = g l
    Gaussian, mean m, log-variance s (any broadcast: strides)  (gaussian_ll / gaussian_ll_grad)
        forward   -0.5 sum(log 2pi + s + (x - m)^2 e^-s)
        backward  w = (x - m) e^-s: dm = g w, dx = -dm, ds = -g (1 - (x - m) w) / 2
        (ds is per element: autograd sums it over the dimensions s was expanded along)
Tiles of [ROWS, BLOCK]; the row helpers are shared with the fused ELBO (kernels/elbo.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _tiles as T

LOG_2PI = tl.constexpr(1.8378770664093453)  # log(2 pi)


# ---------------------------------------------------------------------------
# Row helpers (also used by the fused ELBO kernels)
# ---------------------------------------------------------------------------
@triton.jit
def loglik_rows(r_ptr, x_ptr, s_ptr, rows, row_mask, D, s_r0, s_r1, s_x0, s_x1, s_s0, s_s1,
                GAUSSIAN: tl.constexpr, VALIDATE: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr):
    """log p(x | recon) of each row of the tile, [ROWS], in the accumulation type, and (VALIDATE)
    whether the row has an x outside [0, 1] ([ROWS] int32; NaN passes, as in the C++ kernels)."""
    total = T.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
    bad = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    for j0 in range(0, D, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < D)[None, :]
        r = T.load_tile(r_ptr, rows, cols, s_r0, s_r1, mask, FP64)
        x = T.load_tile(x_ptr, rows, cols, s_x0, s_x1, mask, FP64)
        if GAUSSIAN:
            s = T.load_tile(s_ptr, rows, cols, s_s0, s_s1, mask, FP64)
            d = x - r
            term = -0.5 * (LOG_2PI + s + d * d * tl.exp(0.0 - s))
        else:
            # In torch's binary_cross_entropy_with_logits form (fastelbo_math.h bernoulli_ll): exact for
            # confident binary targets, the reference's NaN/inf for infinite logits.
            t = tl.exp(0.0 - tl.abs(r))
            neg = 0.0 - r
            term = 0.0 - ((1.0 - x) * r + tl.where(neg < 0.0, 0.0, neg) + T.log1p_unit(t, FP64))
            if VALIDATE:
                bad = tl.where(mask & ((x < 0.0) | (x > 1.0)), 1, bad)
        total += tl.where(mask, term, 0.0)
    return tl.sum(total, axis=1), tl.max(bad, axis=1)


@triton.jit
def loglik_grad_rows(g, r_ptr, x_ptr, s_ptr, dr_ptr, dx_ptr, ds_ptr, rows, row_mask, D,
                     s_r0, s_r1, s_x0, s_x1, s_s0, s_s1,
                     GAUSSIAN: tl.constexpr, WANT_R: tl.constexpr, WANT_X: tl.constexpr, WANT_S: tl.constexpr,
                     FP64: tl.constexpr, BLOCK: tl.constexpr):
    """Writes the wanted gradients (recon, x, s) of the tile's rows, g ([ROWS]) the upstream gradient."""
    gg = g[:, None]
    for j0 in range(0, D, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < D)[None, :]
        r = T.load_tile(r_ptr, rows, cols, s_r0, s_r1, mask, FP64)
        if GAUSSIAN:
            x = T.load_tile(x_ptr, rows, cols, s_x0, s_x1, mask, FP64)
            s = T.load_tile(s_ptr, rows, cols, s_s0, s_s1, mask, FP64)
            d = x - r
            w = d * tl.exp(0.0 - s)
            dm = gg * w
            if WANT_R:
                T.store_tile(dr_ptr, rows, cols, D, dm, mask)
            if WANT_X:
                T.store_tile(dx_ptr, rows, cols, D, 0.0 - dm, mask)
            if WANT_S:
                T.store_tile(ds_ptr, rows, cols, D, gg * -0.5 * (1.0 - d * w), mask)
        else:
            if WANT_R:
                x = T.load_tile(x_ptr, rows, cols, s_x0, s_x1, mask, FP64)
                t = tl.exp(0.0 - tl.abs(r))
                q = 1.0 / (1.0 + t)
                sig = tl.where(r >= 0.0, q, t * q)
                T.store_tile(dr_ptr, rows, cols, D, gg * (x - sig), mask)
            if WANT_X:
                T.store_tile(dx_ptr, rows, cols, D, gg * r, mask)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@triton.jit
def _loglik_fwd_kernel(
    r_ptr,  # [B, D] recon: Bernoulli logits or Gaussian mean, strides (s_r0, s_r1)
    x_ptr,  # [B, D] data, strides (s_x0, s_x1)
    s_ptr,  # [B, D] Gaussian log-variance (expanded: strides 0 where broadcast), read when GAUSSIAN
    ll_ptr,  # [B] out
    bad_ptr,  # [B] int8 out: x of the row outside [0, 1]; written when VALIDATE
    B, D,
    s_r0, s_r1, s_x0, s_x1, s_s0, s_s1,
    GAUSSIAN: tl.constexpr, VALIDATE: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = T.row_ids(pid, ROWS)
    row_mask = rows < B
    ll, bad = loglik_rows(r_ptr, x_ptr, s_ptr, rows, row_mask, D, s_r0, s_r1, s_x0, s_x1, s_s0, s_s1, GAUSSIAN,
                          VALIDATE, FP64, ROWS, BLOCK)
    tl.store(ll_ptr + rows, ll.to(ll_ptr.dtype.element_ty), mask=row_mask)
    if VALIDATE:
        tl.store(bad_ptr + rows, bad.to(tl.int8), mask=row_mask)


@triton.jit
def _loglik_bwd_kernel(
    g_ptr,  # [B] upstream gradient, stride s_g (0: expanded)
    r_ptr,  # [B, D] recon: logits or mean, strides (s_r0, s_r1)
    x_ptr,  # [B, D] data, strides (s_x0, s_x1)
    s_ptr,  # [B, D] Gaussian log-variance (expanded), read when GAUSSIAN
    dr_ptr, dx_ptr, ds_ptr,  # [B, D] out, contiguous, written when WANT_*
    B, D, s_g,
    s_r0, s_r1, s_x0, s_x1, s_s0, s_s1,
    GAUSSIAN: tl.constexpr, WANT_R: tl.constexpr, WANT_X: tl.constexpr, WANT_S: tl.constexpr,
    FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = T.row_ids(pid, ROWS)
    row_mask = rows < B
    g = T.load_row_scalar(g_ptr, rows, s_g, row_mask, True, FP64)
    loglik_grad_rows(g, r_ptr, x_ptr, s_ptr, dr_ptr, dx_ptr, ds_ptr, rows, row_mask, D, s_r0, s_r1, s_x0, s_x1,
                     s_s0, s_s1, GAUSSIAN, WANT_R, WANT_X, WANT_S, FP64, BLOCK)


_loglik_fwd_tuned = T.row_autotune(_loglik_fwd_kernel, key=["D"])
_loglik_bwd_tuned = T.row_autotune(_loglik_bwd_kernel, key=["D"])


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------
def loglik_operands(recon, x, s):
    """Pointer and stride arguments of loglik_rows / loglik_grad_rows."""
    return (recon, x, T.or_dummy(s, recon)), (*T.strides(recon), *T.strides(x), *T.strides(s))


def loglik_fwd(recon, x, s, validate_x=False):
    B, D = recon.shape
    ll = recon.new_empty(B)
    bad = recon.new_empty(B if validate_x else 0, dtype=torch.int8)
    ptrs, strides = loglik_operands(recon, x, s)
    block = T.block_for(D)
    T.launch_rows(_loglik_fwd_kernel, _loglik_fwd_tuned, B, (*ptrs, ll, bad, B, D, *strides),
                  block, GAUSSIAN=int(s is not None), VALIDATE=int(validate_x), FP64=T.fp64(recon), BLOCK=block)
    if validate_x:
        T.check_unit_interval(bad)
    return ll


def loglik_bwd(grad, recon, x, s, want):
    """Gradients (recon, x, s) for want = three bools (s: Gaussian only)."""
    T.check_row_grad(grad, "grad", recon)
    d = [T.grad_or_empty(w, recon) for w in want]
    B, D = recon.shape
    if any(want):
        ptrs, strides = loglik_operands(recon, x, s)
        block = T.block_for(D)
        T.launch_rows(_loglik_bwd_kernel, _loglik_bwd_tuned, B, (grad, *ptrs, *d, B, D, grad.stride(0), *strides),
                      block, GAUSSIAN=int(s is not None), WANT_R=int(want[0]), WANT_X=int(want[1]),
                      WANT_S=int(want[2]), FP64=T.fp64(recon), BLOCK=block)
    return d


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------
@triton_op("fastelbo::triton_bernoulli_log_prob", mutates_args=())
@T.opaque_under_interpreter("fastelbo::triton_bernoulli_log_prob")
def triton_bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor, validate_x: bool = False) -> torch.Tensor:
    T.check_like(logits, "logits", x, "x")
    return loglik_fwd(logits, x, None, validate_x)


@triton_op("fastelbo::triton_bernoulli_log_prob_backward", mutates_args=())
@T.opaque_under_interpreter("fastelbo::triton_bernoulli_log_prob_backward")
def triton_bernoulli_log_prob_backward(grad: torch.Tensor, logits: torch.Tensor, x: torch.Tensor,
                                       output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    T.check_like(logits, "logits", x, "x")
    d = loglik_bwd(grad, logits, x, None, [bool(output_mask[0]), bool(output_mask[1]), False])
    return d[0], d[1]


@triton_op("fastelbo::triton_gaussian_log_prob", mutates_args=())
@T.opaque_under_interpreter("fastelbo::triton_gaussian_log_prob")
def triton_gaussian_log_prob(mean: torch.Tensor, x: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    T.check_like(mean, "mean", x, "x")
    T.check_like(mean, "mean", logvar, "logvar")
    return loglik_fwd(mean, x, logvar)


@triton_op("fastelbo::triton_gaussian_log_prob_backward", mutates_args=())
@T.opaque_under_interpreter("fastelbo::triton_gaussian_log_prob_backward")
def triton_gaussian_log_prob_backward(grad: torch.Tensor, mean: torch.Tensor, x: torch.Tensor, logvar: torch.Tensor,
                                      output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T.check_like(mean, "mean", x, "x")
    T.check_like(mean, "mean", logvar, "logvar")
    d = loglik_bwd(grad, mean, x, logvar, [bool(m) for m in output_mask])
    return d[0], d[1], d[2]
