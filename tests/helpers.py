"""Shared test machinery: the tolerance table (written once), the fused-backend
parametrization, input makers and the verbose comparison helper.

Accuracy rule (docs/design.md §6; flash-attention style):
  * float32 / float64: compare with the reference computed in the same dtype,
        |out - ref| <= rtol * |ref| + atol * sqrt(n) * max(1, max|ref|)
    (n = number of terms a value sums over: the feature count D for per-row
    results, the batch for gradients of broadcast parameters, 1 otherwise;
    the atol part is normwise, scaled by the tensor's largest value, so that
    cancellation inside one element -- e.g. x*l - softplus(l) -- is judged
    against the size of what was summed, not the size of the result).
  * float16 / bfloat16: with ref64 the reference on the inputs upcast to
    float64 and ref_low the reference computed in the low dtype,
        max|out - ref64| <= 2 * max|ref_low - ref64| + atol * max(1, max|ref64|)
    (atol: one unit of rounding of the result, which any kernel pays once).
    This 2x rule is fastelbo._accuracy.baseline_bound, which `fastelbo check` applies too.
NaN / +inf / -inf positions must match exactly (for the low dtypes: those of
ref64 rounded to the dtype).
  * ill-conditioned results (baseline_rule=True): the IWAE gradients carry the
    softmax weights exp(log w - logsumexp log w) of log-weights that are sums
    of Dx + 2 Dz terms (hundreds of nats). A float32 sum of them is only good
    to ~sqrt(Dx) ulp of its size, e.g. 1e-4 nats at 600 features, so the
    weights -- and every gradient -- are only good to ~1e-4 relative, in
    PyTorch itself. There the float32 result is judged like the low dtypes:
    at most 2x PyTorch's own float32 error against float64, plus atol.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch

from fastelbo import _backend
from fastelbo._accuracy import baseline_bound


# ---------------------------------------------------------------------------
# Tolerances: written once, one line of justification each.
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Tol:
    rtol: float  # relative part (float32/float64 only)
    atol: float  # absolute part, in units of max(1, max|ref|)


TOL = {
    # Kernels accumulate in float64 like the reference; only summation order and Sleef-vs-libm last-ulp
    # differences (~1e-16 relative) remain, so 1e-12 keeps 4 orders of headroom and still catches any slip.
    torch.float64: Tol(rtol=1e-12, atol=1e-12),
    # float32 math in both, different but correctly rounded-to-a-few-ulp transcendentals (Sleef vs ATen) and
    # different summation order: ~8 ulp per element (1e-6) normwise, ~80 ulp (1e-5) elementwise relative.
    torch.float32: Tol(rtol=1e-5, atol=1e-6),
    # 2x-rule slack: one float16 ulp (2**-10) of the result, the rounding of the output itself.
    torch.float16: Tol(rtol=0.0, atol=2.0**-10),
    # 2x-rule slack: one bfloat16 ulp (2**-7) of the result, the rounding of the output itself.
    torch.bfloat16: Tol(rtol=0.0, atol=2.0**-7),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f64", "f16", "bf16"]


def dtype_params():
    return [pytest.param(d, id=i) for d, i in zip(DTYPES, DTYPE_IDS)]


# ---------------------------------------------------------------------------
# Backends.
# ---------------------------------------------------------------------------
class Backend(NamedTuple):
    """A fused backend and the device its test tensors live on: `name, device = backend`."""

    name: str  # what is passed as backend=
    device: str  # where the test tensors live

    def __str__(self):
        return f"{self.name}@{self.device}"


def backend_device(name: str) -> str:
    if name == "cpu":
        return "cpu"
    if name == "triton":
        # Triton kernels run on CPU tensors under TRITON_INTERPRET=1 when there is no GPU.
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return "cuda"
    if name == "cuda-emulated":  # test-only: the CUDA kernels on the CPU emulation of csrc/emu (conftest.py)
        return "cpu"
    raise ValueError(name)


FUSED = ("cpu", "triton", "cuda", "cuda-emulated")


def fused_backend_params():
    """One pytest param per fused backend; an unavailable one is a SKIP with the reason, never dropped."""
    params = []
    for name in FUSED:
        device = backend_device(name)
        ok, why = _backend.available(name, device)
        marks = () if ok else (pytest.mark.skip(reason=f"backend {name!r} on {device}: {why}"),)
        params.append(pytest.param(Backend(name, device), id=name, marks=marks))
    return params


FUSED_BACKENDS = fused_backend_params()


# ---------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------
def generator_for(*key) -> torch.Generator:
    """A CPU generator seeded from a stable hash of `key` (e.g. the test id)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


LAYOUTS = ("contiguous", "transposed", "colslice", "stride2")


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as t (2-D), in the given memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":  # column-major dense (extension-cpp's permuted layout)
        return t.t().contiguous().t()
    rows, cols = t.shape
    if layout == "colslice":  # a column slice: row stride larger than the row
        base = torch.full((rows, cols + 5), float("nan"), dtype=t.dtype, device=t.device)
        base[:, 2:cols + 2] = t
        return base[:, 2:cols + 2]
    if layout == "offset1":  # dense rows, one element past a 16-byte boundary: no vector loads
        base = torch.full((rows * cols + 1,), float("nan"), dtype=t.dtype, device=t.device)
        out = base[1:].view(rows, cols)
        out.copy_(t)
        return out
    if layout == "stride2":  # every other column
        base = torch.full((rows, 2 * cols), float("nan"), dtype=t.dtype, device=t.device)
        base[:, ::2] = t
        return base[:, ::2]
    raise ValueError(layout)


def rand(shape, gen, lo=-2.0, hi=2.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Uniform values drawn in float64 (identical across dtypes up to rounding), then cast."""
    t = torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    return t.to(dtype=dtype, device=device)


def randn(shape, gen, scale=1.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def row_grad(rows, gen, dtype, device) -> torch.Tensor:
    """An upstream gradient that is not 1: random per row, mixed signs, |g| in [0.5, 2]."""
    mag = torch.rand(rows, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    sign = torch.where(torch.rand(rows, generator=gen, dtype=torch.float64) < 0.3, -1.0, 1.0)
    return (mag * sign).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------
# Comparison.
# ---------------------------------------------------------------------------
def _fmt_index(flat_index: int, shape) -> tuple:
    if len(shape) == 0:
        return ()
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), tuple(shape)))


def _nonfinite_parity(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    for what, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, e = fn(actual), fn(expected)
        if not torch.equal(a, e):
            bad = (a != e).nonzero()
            first = tuple(int(i) for i in bad[0])
            raise AssertionError(
                f"{name}: {what} positions differ from the reference at {bad.shape[0]} place(s); first at "
                f"{first}: actual={actual[first].item()!r}, expected={expected[first].item()!r}")


def assert_close(actual, expected, *, ref64=None, n: int = 1, name: str = "value", overflow_ok: bool = False,
                 ignore=None, baseline_rule: bool = False) -> None:
    """Checks `actual` against the reference per the rule in the module docstring.

    expected: the reference in actual's dtype. ref64 (required for float16 /
    bfloat16): the reference on the inputs upcast to float64.
    overflow_ok (extreme inputs, float32/float64): where the same-dtype reference
    overflowed to inf/NaN in an intermediate, `actual` may instead be finite, but
    then it must match ref64 (required) to the dtype's tolerance; where the
    reference is finite, `actual` must be finite and close (one-directional parity).
    ignore: a bool mask of positions not checked at all (e.g. the gradient at an
    input that was itself infinite, where the reference gives an autograd NaN).
    """
    if ignore is not None and actual.numel():
        keep = ~ignore.to(actual.device).expand_as(actual)
        actual, expected = actual[keep], expected[keep.to(expected.device)]
        ref64 = None if ref64 is None else ref64[keep.to(ref64.device)]
    assert isinstance(actual, torch.Tensor), f"{name}: expected a tensor, got {type(actual).__name__}"
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != reference {expected.dtype}")
    if actual.numel() == 0:
        return
    dtype = actual.dtype
    tol = TOL[dtype]
    a = actual.detach().cpu().double()
    if dtype in LOW_PRECISION or (baseline_rule and dtype == torch.float32):
        if ref64 is None:
            raise ValueError(f"{name}: the low-precision rule needs the float64 reference")
        truth = ref64.detach().cpu().double()
        low = expected.detach().cpu().double()
        _nonfinite_parity(name, a, truth.to(dtype).double())
        finite = torch.isfinite(a) & torch.isfinite(truth)
        err = torch.where(finite, (a - truth).abs(), torch.zeros_like(a))
        # The rule fastelbo check applies too (fastelbo/_accuracy.py): 2 x plain PyTorch's own error + atol x scale.
        bound = baseline_bound(low, truth, tol.atol, where=torch.isfinite(a))
        worst = int(err.reshape(-1).argmax())
        if err.reshape(-1)[worst].item() > bound:
            idx = _fmt_index(worst, a.shape)
            raise AssertionError(
                f"{name} ({dtype}): max error vs float64 reference {err.reshape(-1)[worst].item():.3e} at {idx} "
                f"(actual={a[idx].item()!r}, float64 ref={truth[idx].item()!r}, low-dtype ref={low[idx].item()!r}) "
                f"exceeds the baseline bound {bound:.3e} (2 x plain PyTorch's {dtype} error + atol {tol.atol:.1e} "
                f"x max(1, max|ref|))")
        return
    e = expected.detach().cpu().double()
    if overflow_ok:
        if ref64 is None:
            raise ValueError(f"{name}: overflow_ok needs the float64 reference")
        truth = ref64.detach().cpu().double()
        lost = torch.isfinite(e) & ~torch.isfinite(a)
        if lost.any():
            first = tuple(int(i) for i in lost.nonzero()[0])
            raise AssertionError(f"{name} ({dtype}): non-finite {a[first].item()!r} at {first} where the reference is "
                                 f"finite ({e[first].item()!r}); {int(lost.sum())} such place(s)")
        rescued = ~torch.isfinite(e) & torch.isfinite(a)
        if rescued.any():  # the reference overflowed, we did not: then we must be right
            assert_close(a[rescued].to(dtype), truth[rescued].to(dtype), n=n, name=f"{name} (where the {dtype} "
                         "reference overflowed, vs the float64 reference)")
        both = torch.isfinite(e) & torch.isfinite(a)
        a, e = a[both], e[both]
    _nonfinite_parity(name, a, e)
    finite = torch.isfinite(e)
    if not finite.any():
        return
    scale = max(1.0, e[finite].abs().max().item())
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    allowed = tol.rtol * e.abs() + tol.atol * math.sqrt(max(n, 1)) * scale
    excess = torch.where(finite, err - allowed, torch.full_like(a, -math.inf))
    worst = int(excess.reshape(-1).argmax())
    if excess.reshape(-1)[worst].item() > 0:
        idx = _fmt_index(worst, a.shape)
        nbad = int((excess > 0).sum())
        raise AssertionError(
            f"{name} ({dtype}): {nbad}/{a.numel()} values out of tolerance; worst at {idx}: actual={a[idx].item()!r} "
            f"expected={e[idx].item()!r} |err|={err[idx].item():.3e} > allowed {allowed[idx].item():.3e} "
            f"(rtol={tol.rtol:.0e}, atol={tol.atol:.0e} x sqrt(n={n}) x scale {scale:.3e}); "
            f"max |err| overall {err.max().item():.3e}")


def tree_tensors(out):
    """The tensors of an op result (a tensor or a tuple of tensors) as a tuple."""
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(out)
