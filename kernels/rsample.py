"""Reparameterized sample (DESIGN §1 row 1, noise per §2), Triton:
    forward   z = mu + e^(lv/2) * eps                 (fastelbo_math.h reparam)
    backward  deps = g * e^(lv/2), dlv = deps * eps / 2 (fastelbo_math.h reparam_grad; dmu = g needs no kernel)
eps is Philox4x32-10 of (seed, n // 4), lane n % 4, for logical element n of the
row-major [B, D] tensor, regenerated in the backward: nothing [B, D] is saved.
Both kernels are flat: each program takes BLOCK consecutive logical elements
(a multiple of 4, so every counter group lies in one program) and maps them to
(row, column) for strided operands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _tiles as T


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
def _eps_block(n, start, D, eps_ptr, s_e0, s_e1, seed_ptr, pid, mask, HAS_EPS: tl.constexpr, DENSE: tl.constexpr,
               BLOCK: tl.constexpr, FP64: tl.constexpr):
    """eps of logical elements n: the caller's tensor, or Philox of the seed."""
    if HAS_EPS:
        return T.acc(tl.load(eps_ptr + _element_offsets(n, start, D, s_e0, s_e1, DENSE), mask=mask, other=0.0), FP64)
    else:
        seed = tl.load(seed_ptr)
        groups = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
        return T.normals(seed, groups, FP64)


@triton.jit
def _rsample_fwd_kernel(
    mu_ptr,  # [B, D] mean, strides (s_m0, s_m1)
    lv_ptr,  # [B, D] log-variance, strides (s_l0, s_l1)
    eps_ptr,  # [B, D] caller's noise, strides (s_e0, s_e1); read only when HAS_EPS
    seed_ptr,  # [] int64 Philox key; read only when not HAS_EPS
    z_ptr,  # [B, D] out, contiguous
    N, D,  # B * D logical elements, D columns
    s_m0, s_m1, s_l0, s_l1, s_e0, s_e1,
    HAS_EPS: tl.constexpr, DENSE: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK
    n = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = n < N
    mu = T.acc(tl.load(mu_ptr + _element_offsets(n, start, D, s_m0, s_m1, DENSE), mask=mask, other=0.0), FP64)
    lv = T.acc(tl.load(lv_ptr + _element_offsets(n, start, D, s_l0, s_l1, DENSE), mask=mask, other=0.0), FP64)
    eps = _eps_block(n, start, D, eps_ptr, s_e0, s_e1, seed_ptr, pid, mask, HAS_EPS, DENSE, BLOCK, FP64)
    z = mu + tl.exp(0.5 * lv) * eps
    tl.store(z_ptr + n, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rsample_bwd_kernel(
    g_ptr,  # [B, D] upstream gradient of z, strides (s_g0, s_g1) (0: expanded)
    lv_ptr,  # [B, D] log-variance, strides (s_l0, s_l1)
    eps_ptr,  # [B, D] caller's noise, strides (s_e0, s_e1); read only when HAS_EPS
    seed_ptr,  # [] int64 Philox key; read only when not HAS_EPS
    dlv_ptr,  # [B, D] out d/dlogvar, contiguous; written when WANT_DLV
    deps_ptr,  # [B, D] out d/deps, contiguous; written when WANT_DEPS
    N, D,
    s_g0, s_g1, s_l0, s_l1, s_e0, s_e1,
    HAS_EPS: tl.constexpr, WANT_DLV: tl.constexpr, WANT_DEPS: tl.constexpr, DENSE: tl.constexpr,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK
    n = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = n < N
    g = T.acc(tl.load(g_ptr + _element_offsets(n, start, D, s_g0, s_g1, DENSE), mask=mask, other=0.0), FP64)
    lv = T.acc(tl.load(lv_ptr + _element_offsets(n, start, D, s_l0, s_l1, DENSE), mask=mask, other=0.0), FP64)
    deps = g * tl.exp(0.5 * lv)
    if WANT_DEPS:
        tl.store(deps_ptr + n, deps.to(deps_ptr.dtype.element_ty), mask=mask)
    if WANT_DLV:
        eps = _eps_block(n, start, D, eps_ptr, s_e0, s_e1, seed_ptr, pid, mask, HAS_EPS, DENSE, BLOCK, FP64)
        tl.store(dlv_ptr + n, (0.5 * deps * eps).to(dlv_ptr.dtype.element_ty), mask=mask)


_rsample_fwd_tuned = T.flat_autotune(_rsample_fwd_kernel, key=["D"])
_rsample_bwd_tuned = T.flat_autotune(_rsample_bwd_kernel, key=["D"])


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------
def _dense(*tensors) -> int:
    return int(all(t is None or t.is_contiguous() for t in tensors))


def rsample_fwd(mu, logvar, seed, eps):
    T.check_like(mu, "mu", logvar, "logvar")
    T.check_like(mu, "mu", eps, "eps")
    z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    B, D = mu.shape
    e = T.or_dummy(eps, mu)
    T.launch_flat(_rsample_fwd_kernel, _rsample_fwd_tuned, B * D,
                  (mu, logvar, e, seed, z, B * D, D, *T.strides(mu), *T.strides(logvar), *T.strides(eps)),
                  HAS_EPS=int(eps is not None), DENSE=_dense(mu, logvar, eps), FP64=T.fp64(mu))
    return z


def rsample_bwd(grad_z, logvar, seed, eps, output_mask):
    T.check_like(logvar, "logvar", grad_z, "grad_z")
    T.check_like(logvar, "logvar", eps, "eps")
    want_lv, want_eps = bool(output_mask[0]), bool(output_mask[1])
    dlv, deps = T.grad_or_empty(want_lv, logvar), T.grad_or_empty(want_eps, logvar)
    if not (want_lv or want_eps):
        return dlv, deps
    B, D = logvar.shape
    T.launch_flat(_rsample_bwd_kernel, _rsample_bwd_tuned, B * D,
                  (grad_z, logvar, T.or_dummy(eps, logvar), seed, dlv,
                   deps, B * D, D, *T.strides(grad_z), *T.strides(logvar),
                   *T.strides(eps)),
                  HAS_EPS=int(eps is not None), WANT_DLV=int(want_lv), WANT_DEPS=int(want_eps),
                  DENSE=_dense(grad_z, logvar, eps), FP64=T.fp64(logvar))
    return dlv, deps


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------
@triton_op("fastelbo::triton_rsample", mutates_args=())
@T.opaque_under_interpreter("fastelbo::triton_rsample")
def triton_rsample(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                   eps: torch.Tensor | None) -> torch.Tensor:
    return rsample_fwd(mu, logvar, seed, eps)


@triton_op("fastelbo::triton_rsample_backward", mutates_args=())
@T.opaque_under_interpreter("fastelbo::triton_rsample_backward")
def triton_rsample_backward(grad_z: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                            eps: torch.Tensor | None, output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    return rsample_bwd(grad_z, logvar, seed, eps, output_mask)
