"""Reparameterized sample (docs/design.md §1, §3), Triton:
    forward   z[k] = mu + e^(lv/2) * eps[k]                  (fastelbo_math.h reparam)
    backward  deps[k] = g[k] * e^(lv/2), dlv = (sum_k g[k] * eps[k]) * e^(lv/2) / 2
                                                             (reparam_*_grad; dmu = sum_k g[k] needs no kernel)
z is [B, D] (num_samples = 0) or [K, B, D] (num_samples = K). eps is Philox4x32-10 of
(seed, n // 4), lane n % 4, for logical element n = (k * B + b) * D + j of the row-major
[K, B, D] tensor (K = 1 gives the [B, D] stream), regenerated in the backward: nothing
[K, B, D] is saved. Both kernels are flat: the forward takes BLOCK consecutive logical
elements of [K, B, D] per program (a multiple of 4, so every counter group lies in one
program); the backward takes BLOCK elements of [B, D] and loops over the K samples,
summing g * eps in registers (sample k's elements start at k * B * D, aligned to a counter
group only when B * D % 4 == 0: _math.normals_at).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _checks as C
from . import _launch as L
from ._math import acc, normals, normals_at, reparam, reparam_eps_grad, reparam_lv_grad, reparam_scale


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
@triton.jit
def _element_offsets(n, start, D, s0, s1, DENSE: tl.constexpr):
    """Storage offsets of logical elements n = start + [0, BLOCK) (int64, row-major over
    [B, D]) in an operand of strides (s0, s1). DENSE: every operand is row-major contiguous."""
    if DENSE:
        return n
    else:
        # One int64 division per program, int32 ones per element (n - r0 * D < BLOCK + D).
        r0 = start // D
        local = (n - r0 * D).to(tl.int32)
        di = local // D
        j = local - di * D
        return (r0 + di) * s0 + j.to(tl.int64) * s1


@triton.jit
def _sample_index(n, start, B, D):
    """(k, b, j) of logical elements n = start + [0, BLOCK) of the row-major [K, B, D]
    (k, b int64, j int32): int64 divisions once per program, int32 ones per element."""
    r0 = start // D  # first row of [K * B] rows
    local = (n - r0 * D).to(tl.int32)
    di = local // D
    j = local - di * D
    k0 = r0 // B
    rb = (r0 - k0 * B).to(tl.int32) + di
    dk = rb // B
    return k0 + dk.to(tl.int64), (rb - dk * B).to(tl.int64), j


@triton.jit
def _rsample_fwd_kernel(
    mu_ptr,  # [B, D] mean, strides (s_m0, s_m1)
    lv_ptr,  # [B, D] log-variance, strides (s_l0, s_l1)
    eps_ptr,  # [K, B, D] caller's noise, strides (s_ek, s_e0, s_e1); read only when HAS_EPS
    seed_ptr,  # [] int64 Philox key; read only when not HAS_EPS
    z_ptr,  # [K, B, D] out, contiguous
    N, B, D,  # K * B * D logical elements, B rows, D columns
    s_m0, s_m1, s_l0, s_l1, s_ek, s_e0, s_e1,
    HAS_EPS: tl.constexpr, DENSE: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK
    n = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = n < N
    if DENSE:  # K = 1, every operand contiguous
        off_m = n
        off_l = n
        off_e = n
    else:
        k, b, j = _sample_index(n, start, B, D)
        jj = j.to(tl.int64)
        off_m = b * s_m0 + jj * s_m1
        off_l = b * s_l0 + jj * s_l1
        off_e = k * s_ek + b * s_e0 + jj * s_e1
    mu = acc(tl.load(mu_ptr + off_m, mask=mask, other=0.0), FP64)
    lv = acc(tl.load(lv_ptr + off_l, mask=mask, other=0.0), FP64)
    if HAS_EPS:
        eps = acc(tl.load(eps_ptr + off_e, mask=mask, other=0.0), FP64)
    else:
        eps = normals(tl.load(seed_ptr), pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64), FP64)
    z = reparam(mu, lv, eps)
    tl.store(z_ptr + n, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rsample_bwd_kernel(
    g_ptr,  # [K, B, D] upstream gradient of z, strides (s_gk, s_g0, s_g1) (0: expanded)
    lv_ptr,  # [B, D] log-variance, strides (s_l0, s_l1)
    eps_ptr,  # [K, B, D] caller's noise, strides (s_ek, s_e0, s_e1); read only when HAS_EPS
    seed_ptr,  # [] int64 Philox key; read only when not HAS_EPS
    dlv_ptr,  # [B, D] out d/dlogvar (summed over k), contiguous; written when WANT_DLV
    deps_ptr,  # [K, B, D] out d/deps, contiguous; written when WANT_DEPS
    M, D, K,  # B * D logical elements per sample, D columns, K samples
    s_gk, s_g0, s_g1, s_l0, s_l1, s_ek, s_e0, s_e1,
    HAS_EPS: tl.constexpr, WANT_DLV: tl.constexpr, WANT_DEPS: tl.constexpr, DENSE: tl.constexpr,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK
    m = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = m < M
    off_g = _element_offsets(m, start, D, s_g0, s_g1, DENSE)
    lv = acc(tl.load(lv_ptr + _element_offsets(m, start, D, s_l0, s_l1, DENSE), mask=mask, other=0.0), FP64)
    std = reparam_scale(lv)
    g_eps = acc(tl.zeros([BLOCK], dtype=tl.float32), FP64)  # sum_k g[k] * eps[k]
    if HAS_EPS:
        off_e = _element_offsets(m, start, D, s_e0, s_e1, DENSE)
    else:
        seed = tl.load(seed_ptr)
    for k in range(K):
        kk = tl.full([], k, tl.int64)
        g = acc(tl.load(g_ptr + kk * s_gk + off_g, mask=mask, other=0.0), FP64)
        if WANT_DEPS:
            tl.store(deps_ptr + kk * M + m, reparam_eps_grad(g, std).to(deps_ptr.dtype.element_ty), mask=mask)
        if WANT_DLV:
            if HAS_EPS:
                eps = acc(tl.load(eps_ptr + kk * s_ek + off_e, mask=mask, other=0.0), FP64)
            else:
                eps = normals_at(seed, kk * M + start, BLOCK // 4, FP64)
            g_eps += g * eps
    if WANT_DLV:
        # The sum over k before the scale: right where std is inf.
        tl.store(dlv_ptr + m, reparam_lv_grad(g_eps, std).to(dlv_ptr.dtype.element_ty), mask=mask)


_rsample_fwd_tuned = L.flat_autotune(_rsample_fwd_kernel, key=["N", "D"], size="N")
_rsample_bwd_tuned = L.flat_autotune(_rsample_bwd_kernel, key=["M", "D"], size="M")


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------
def _dense(*tensors) -> int:
    return int(all(t is None or t.is_contiguous() for t in tensors))


def _strides3(t):
    """(k, row, column) strides of a [K, B, D] or [B, D] (k stride 0) operand; zeros when absent."""
    if t is None:
        return 0, 0, 0
    return (0, *t.stride()) if t.dim() == 2 else tuple(t.stride())


def rsample_fwd(mu, logvar, seed, eps, num_samples=0):
    C.check_rsample_args(mu, logvar, seed, eps, num_samples)
    K = max(num_samples, 1)
    B, D = mu.shape
    z = torch.empty(((num_samples,) if num_samples else ()) + (B, D), dtype=mu.dtype, device=mu.device)
    N = K * B * D
    L.launch_flat(_rsample_fwd_kernel, _rsample_fwd_tuned, N,
                  (mu, logvar, L.or_dummy(eps, mu), seed, z, N, B, D, *L.strides(mu), *L.strides(logvar),
                   *_strides3(eps)),
                  HAS_EPS=int(eps is not None), DENSE=int(K == 1 and _dense(mu, logvar, eps)), FP64=L.fp64(mu))
    return z


def rsample_bwd(grad_z, logvar, seed, eps, output_mask):
    C.check_rsample_backward_args(grad_z, logvar, seed, eps)
    want_lv, want_eps = bool(output_mask[0]), bool(output_mask[1])
    dlv, deps = L.grad_or_empty(want_lv, logvar), L.grad_or_empty(want_eps, grad_z)
    if not (want_lv or want_eps):
        return dlv, deps
    B, D = logvar.shape
    K = grad_z.shape[0] if grad_z.dim() == 3 else 1
    if K == 0:  # no samples: dlogvar is an empty sum
        dlv.zero_()
        return dlv, deps
    dense = _dense(logvar) and all(t is None or t[0].is_contiguous() for t in (
        grad_z if grad_z.dim() == 3 else grad_z[None], None if eps is None else (eps if eps.dim() == 3 else eps[None])))
    L.launch_flat(_rsample_bwd_kernel, _rsample_bwd_tuned, B * D,
                  (grad_z, logvar, L.or_dummy(eps, logvar), seed, dlv, deps, B * D, D, K,
                   *_strides3(grad_z), *L.strides(logvar), *_strides3(eps)),
                  HAS_EPS=int(eps is not None), WANT_DLV=int(want_lv), WANT_DEPS=int(want_eps),
                  DENSE=int(dense), FP64=L.fp64(logvar))
    return dlv, deps


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------
@triton_op("fastelbo::triton_rsample", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_rsample")
def triton_rsample(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                   eps: torch.Tensor | None, num_samples: int = 0) -> torch.Tensor:
    return rsample_fwd(mu, logvar, seed, eps, num_samples)


@triton_op("fastelbo::triton_rsample_backward", mutates_args=())
@L.opaque_under_interpreter("fastelbo::triton_rsample_backward")
def triton_rsample_backward(grad_z: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                            eps: torch.Tensor | None, output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    return rsample_bwd(grad_z, logvar, seed, eps, output_mask)
