"""Bernoulli and Gaussian log-likelihood per row (docs/design.md §1), Triton (the per-element
formulas: _math.bernoulli_element, gaussian_element and their _grad):
    Bernoulli, logits l, x in [0, 1], t = e^-|l|   (fastelbo_math.h bernoulli_ll / bernoulli_ll_grad)
        forward   sum(x l - softplus(l)) = -sum((1 - x) l + max(-l, 0) + log1p(t))
        backward  dl = g (x - sigmoid(l)), sigmoid(l) = 1/(1+t) for l >= 0, t/(1+t) otherwise;  dx = g l
    Gaussian, mean m, log-variance s   (gaussian_ll / gaussian_ll_grad)
        forward   -0.5 sum(log 2pi + s + (x - m)^2 e^-s)
        backward  w = (x - m) e^-s: dm = g w, dx = -dm, ds = -g (1 - (x - m) w) / 2
s is [B, D] (per row) or [1, D] (per feature, read with row stride 0): the [1, D] gradient is
reduced over rows inside the backward, per-slot partials [slots, D] then one sum (no [B, D]).
The row helpers take K samples of recon ([K, B, D], x [B, D] shared: the fused ELBO and IWAE
bound, kernels/elbo.py and iwae.py); here K = 1. Forward: tiles of [ROWS, BLOCK], each program
loops over column chunks. Backward: a 2-D grid, (row tiles or slots) x column chunks.
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
# Row helpers (also used by the fused ELBO and IWAE kernels)
# ---------------------------------------------------------------------------
@triton.jit
def loglik_rows(r_ptr, x_ptr, s_ptr, rows, row_mask, D, K, s_rk, s_r0, s_r1, s_x0, s_x1, s_s0, s_s1,
                GAUSSIAN: tl.constexpr, VALIDATE: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr):
    """sum_k log p(x | recon[k]) of each row of the tile (K samples of recon, k stride s_rk), [ROWS], in
    the accumulation type, and (VALIDATE) whether the row has an x outside [0, 1] ([ROWS] int32; NaN
    passes, as in the C++ kernels)."""
    total = M.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
    bad = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    for j0 in range(0, D, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = T.load_tile(x_ptr, rows, cols, s_x0, s_x1, mask, FP64)
        if GAUSSIAN:
            s = T.load_tile(s_ptr, rows, cols, s_s0, s_s1, mask, FP64)
            inv_var = tl.exp(0.0 - s)
        elif VALIDATE:
            bad = tl.where(mask & ((x < 0.0) | (x > 1.0)), 1, bad)
        for k in range(K):
            r = T.load_tile(r_ptr + tl.full([], k, tl.int64) * s_rk, rows, cols, s_r0, s_r1, mask, FP64)
            if GAUSSIAN:
                term = M.gaussian_element(r, x, s, inv_var)
            else:
                term = M.bernoulli_element(r, x, FP64)
            total += tl.where(mask, term, 0.0)
    return tl.sum(total, axis=1), tl.max(bad, axis=1)


@triton.jit
def outside_unit_rows(x_ptr, rows, row_mask, D, s_x0, s_x1, FP64: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Whether each row of the tile has an x outside [0, 1] ([ROWS] int32; NaN passes): loglik_rows'
    VALIDATE as a pass of its own (the IWAE forward checks x once, not once per sample)."""
    bad = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    for j0 in range(0, D, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = T.load_tile(x_ptr, rows, cols, s_x0, s_x1, mask, FP64)
        bad = tl.where(mask & ((x < 0.0) | (x > 1.0)), 1, bad)
    return tl.max(bad, axis=1)


@triton.jit
def loglik_grad_cols(cols, ga_ptr, gb_ptr, s_ga, s_gb, c_ptr, s_ck, s_cb,
                     r_ptr, x_ptr, s_ptr, dr_ptr, dx_ptr, ds_ptr, part_ptr,
                     B, D, K, s_rk, s_r0, s_r1, s_x0, s_x1, s_s0, s_s1,
                     GAUSSIAN: tl.constexpr, HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, PER_K: tl.constexpr,
                     WANT_R: tl.constexpr, WANT_X: tl.constexpr, WANT_S: tl.constexpr, REDUCE_S: tl.constexpr,
                     FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Writes the wanted gradients of the log-likelihood terms of column chunk `cols`, for the row
    tiles program_id(0), + num_programs(0), ...; sample k of row b has the upstream gradient
    c[k, b] (PER_K, strides s_ck, s_cb) or (ga[b] + gb[b]) / K. drecon [K, B, D] per sample;
    dx [B, D] and ds summed over k; ds stored per row, or (REDUCE_S, s [1, D]) summed over the
    program's rows too into part[program_id(0), cols] (the caller sums the slots)."""
    col_mask = cols < D
    s_acc = M.acc(tl.zeros([BLOCK], dtype=tl.float32), FP64)
    for t in range(tl.program_id(0), tl.cdiv(B, ROWS), tl.num_programs(0)):
        rows = T.row_ids(tl.full([], t, tl.int64), ROWS)
        row_mask = rows < B
        mask = row_mask[:, None] & col_mask[None, :]
        if not PER_K:
            g = (T.load_row_scalar(ga_ptr, rows, s_ga, row_mask, HAS_GA, FP64)
                 + T.load_row_scalar(gb_ptr, rows, s_gb, row_mask, HAS_GB, FP64)) / K
        if GAUSSIAN or WANT_R:
            x = T.load_tile(x_ptr, rows, cols, s_x0, s_x1, mask, FP64)
        if GAUSSIAN:
            inv_var = tl.exp(0.0 - T.load_tile(s_ptr, rows, cols, s_s0, s_s1, mask, FP64))
        dx = M.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
        ds = M.acc(tl.zeros([ROWS, BLOCK], dtype=tl.float32), FP64)
        for k in range(K):
            kk = tl.full([], k, tl.int64)
            if PER_K:
                gg = T.load_row_scalar(c_ptr + kk * s_ck, rows, s_cb, row_mask, True, FP64)[:, None]
            else:
                gg = g[:, None]
            r = T.load_tile(r_ptr + kk * s_rk, rows, cols, s_r0, s_r1, mask, FP64)
            if GAUSSIAN:
                dm, dsk = M.gaussian_element_grad(gg, r, x, inv_var)
                if WANT_R:
                    T.store_tile(dr_ptr + kk * B * D, rows, cols, D, dm, mask)
                dx -= dm
                ds += dsk
            else:
                if WANT_R:
                    T.store_tile(dr_ptr + kk * B * D, rows, cols, D, M.bernoulli_element_grad(gg, r, x), mask)
                dx += gg * r  # d/dx of x l
        if WANT_X:
            T.store_tile(dx_ptr, rows, cols, D, dx, mask)
        if WANT_S:
            if REDUCE_S:
                s_acc += tl.sum(tl.where(mask, ds, 0.0), axis=0)
            else:
                T.store_tile(ds_ptr, rows, cols, D, ds, mask)
    if WANT_S and REDUCE_S:
        tl.store(part_ptr + tl.program_id(0).to(tl.int64) * D + cols, s_acc, mask=col_mask)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@triton.jit
def _loglik_fwd_kernel(
    r_ptr,  # [B, D] recon: Bernoulli logits or Gaussian mean, strides (s_r0, s_r1)
    x_ptr,  # [B, D] data, strides (s_x0, s_x1)
    s_ptr,  # [B, D] / [1, D] Gaussian log-variance (s_s0 = 0 for [1, D]), read when GAUSSIAN
    ll_ptr,  # [B] out
    bad_ptr,  # [B] int8 out: x of the row outside [0, 1]; written when VALIDATE
    B, D,
    s_r0, s_r1, s_x0, s_x1, s_s0, s_s1,
    GAUSSIAN: tl.constexpr, VALIDATE: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = T.row_ids(pid, ROWS)
    row_mask = rows < B
    ll, bad = loglik_rows(r_ptr, x_ptr, s_ptr, rows, row_mask, D, 1, 0, s_r0, s_r1, s_x0, s_x1, s_s0, s_s1,
                          GAUSSIAN, VALIDATE, FP64, ROWS, BLOCK)
    tl.store(ll_ptr + rows, ll.to(ll_ptr.dtype.element_ty), mask=row_mask)
    if VALIDATE:
        tl.store(bad_ptr + rows, bad.to(tl.int8), mask=row_mask)


@triton.jit
def _loglik_bwd_kernel(
    g_ptr,  # [B] upstream gradient, stride s_g (0: expanded)
    r_ptr,  # [B, D] recon: logits or mean, strides (s_r0, s_r1)
    x_ptr,  # [B, D] data, strides (s_x0, s_x1)
    s_ptr,  # [B, D] / [1, D] Gaussian log-variance (s_s0 = 0 for [1, D]), read when GAUSSIAN
    dr_ptr, dx_ptr,  # [B, D] out, contiguous, written when WANT_*
    ds_ptr,  # [B, D] out, contiguous, written when WANT_S and not REDUCE_S
    part_ptr,  # [slots, D] out, accumulation type: per-slot row sums of ds, written when WANT_S and REDUCE_S
    B, D, s_g,
    s_r0, s_r1, s_x0, s_x1, s_s0, s_s1,
    GAUSSIAN: tl.constexpr, WANT_R: tl.constexpr, WANT_X: tl.constexpr, WANT_S: tl.constexpr,
    REDUCE_S: tl.constexpr, FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    loglik_grad_cols(cols, g_ptr, g_ptr, s_g, 0, g_ptr, 0, 0, r_ptr, x_ptr, s_ptr, dr_ptr, dx_ptr, ds_ptr,
                     part_ptr, B, D, 1, 0, s_r0, s_r1, s_x0, s_x1, s_s0, s_s1, GAUSSIAN, True, False, False,
                     WANT_R, WANT_X, WANT_S, REDUCE_S, FP64, ROWS, BLOCK)


_loglik_fwd_tuned = L.row_autotune(_loglik_fwd_kernel, key=["D"])
_loglik_bwd_tuned = L.row_autotune(_loglik_bwd_kernel, key=["D"])


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------
def loglik_operands(recon, x, s):
    """Pointer and stride arguments of loglik_rows / loglik_grad_cols (recon [B, D]: k stride
    separate; s [1, D] read with row stride 0)."""
    return (recon, x, L.or_dummy(s, recon)), (*recon.stride()[-2:], *L.strides(x), *L.bcast_strides(s))


def reduce_obs_logvar(part, s):
    """The [1, D] gradient of s from the per-slot partials: one sum over the slots, in s's dtype."""
    return part.sum(0, keepdim=True).to(s.dtype)


def obs_logvar_grad(want, s, rows, chunks, like):
    """(ds: s's shape or empty, partials [slots, D] or empty, slots or None) for the gradient of s
    (want: asked for and s given); `like` gives the empty tensors their dtype and device."""
    if want and L.reduces_rows(s, rows):
        slots = L.reduce_slots(rows, chunks)
        return like.new_empty(0), L.row_partials(s, slots), slots
    return (s.new_empty(s.shape) if want else like.new_empty(0)), like.new_empty(0), None


def loglik_flags(gaussian, want_r, want_x, want_s, slots):
    """The GAUSSIAN, WANT_R/X/S and REDUCE_S constexprs of loglik_grad_cols (slots: obs_logvar_grad's)."""
    return dict(GAUSSIAN=int(gaussian), WANT_R=int(want_r), WANT_X=int(want_x), WANT_S=int(want_s),
                REDUCE_S=int(slots is not None))


def loglik_fwd(recon, x, s, validate_x=False):
    B, D = recon.shape
    ll = recon.new_empty(B)
    bad = recon.new_empty(B if validate_x else 0, dtype=torch.int8)
    ptrs, strides = loglik_operands(recon, x, s)
    block = L.block_for(D)
    L.launch_rows(_loglik_fwd_kernel, _loglik_fwd_tuned, B, (*ptrs, ll, bad, B, D, *strides),
                  block, GAUSSIAN=int(s is not None), VALIDATE=int(validate_x), FP64=L.fp64(recon), BLOCK=block)
    if validate_x:
        C.check_unit_interval(bad)
    return ll


def loglik_bwd(grad, recon, x, s, want):
    """Gradients (recon, x, s) for want = three bools (s: Gaussian only; its gradient in s's shape)."""
    C.check_row_grad(grad, "grad", recon)
    dr, dx = (L.grad_or_empty(w, recon) for w in want[:2])
    B, D = recon.shape
    block = L.block_for(D)
    ds, part, slots = obs_logvar_grad(want[2] and s is not None, s, B, triton.cdiv(max(D, 1), block), recon)
    if any(want) and B > 0:
        ptrs, strides = loglik_operands(recon, x, s)
        L.launch_rows_2d(_loglik_bwd_kernel, _loglik_bwd_tuned, B, D,
                         (grad, *ptrs, dr, dx, ds, part, B, D, grad.stride(0), *strides), block, block, slots,
                         **loglik_flags(s is not None, *want, slots), FP64=L.fp64(recon), BLOCK=block)
        if slots is not None:
            ds = reduce_obs_logvar(part, s)
    elif want[2]:
        ds.zero_()  # no rows: an empty sum
    return [dr, dx, ds]


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------
@triton_op("fastelbo::triton_bernoulli_log_prob", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_bernoulli_log_prob")
def triton_bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor, validate_x: bool = False) -> torch.Tensor:
    C.check_like(logits, "logits", x, "x")
    return loglik_fwd(logits, x, None, validate_x)


@triton_op("fastelbo::triton_bernoulli_log_prob_backward", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_bernoulli_log_prob_backward")
def triton_bernoulli_log_prob_backward(grad: torch.Tensor, logits: torch.Tensor, x: torch.Tensor,
                                       output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    C.check_like(logits, "logits", x, "x")
    d = loglik_bwd(grad, logits, x, None, [bool(output_mask[0]), bool(output_mask[1]), False])
    return d[0], d[1]


@triton_op("fastelbo::triton_gaussian_log_prob", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_gaussian_log_prob")
def triton_gaussian_log_prob(mean: torch.Tensor, x: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    C.check_gaussian_args(mean, x, logvar)
    return loglik_fwd(mean, x, logvar)


@triton_op("fastelbo::triton_gaussian_log_prob_backward", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_gaussian_log_prob_backward")
def triton_gaussian_log_prob_backward(grad: torch.Tensor, mean: torch.Tensor, x: torch.Tensor, logvar: torch.Tensor,
                                      output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    C.check_gaussian_args(mean, x, logvar)
    d = loglik_bwd(grad, mean, x, logvar, [bool(m) for m in output_mask])
    return d[0], d[1], d[2]
