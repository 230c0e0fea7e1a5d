"""``fastelbo check``: build the kernels, then run every op of the public API,
forward and backward, on every backend and device that can run it, against
fastelbo.reference on random inputs, and print a table.

The reference runs in float64 on CPU, on the very values the backend gets
(inputs and upstream gradients rounded to --dtype first), so the error shown
is the backend's own. The error allowed is derived per op and dtype from one
rule (TOLERANCE below): a fixed per-value tolerance, or twice plain PyTorch's
own error in the same dtype where that is larger. Exit status 1 when a check fails (or the C++ kernels do
not build), 0 otherwise; a backend that cannot run here is listed as
"unavailable: why", never as ok.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _build, functional, reference
from .._accuracy import BASELINE_FACTOR, baseline_bound
from ._common import (KERNEL_BACKENDS, NO_CUDA, TARGET_DEVICES, add_device_option, add_dtype_option, add_shape_option,
                      availability, csv, cuda_present, error, one_line, parse_dtypes, parse_shape, table)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The rule (fastelbo/_accuracy.py, shared with the test suite): a result may be off its float64
# reference by at most
#   float32/float64, per value: max(TOLERANCE * max(1, |ref|), 2 * max|torch - ref|)
#   float16/bfloat16, per tensor: 2 * max|torch - ref| + ULP * max(1, max|ref|)
# where torch is fastelbo.reference (plain PyTorch) run in the checked dtype on the same inputs and
# its error is the largest of the tensor (the flash-attention rule).
# TOLERANCE: a row sum of n terms carries at most ~n*u relative rounding error (u = 2^-24 resp.
# 2^-53); with n up to Dx = 784 that is 4.7e-5 resp. 8.7e-14, under the tolerances with margin for
# exp/log1p's few ulps. It is the floor for well-conditioned results. The 2x-PyTorch part holds for
# ill-conditioned float32 results: the IWAE gradients carry softmax weights of log-weights summed
# over Dx + 2 Dz terms, good to ~1e-4 relative in any float32 implementation (plain PyTorch misses
# TOLERANCE by 3-4x on some of them), so a per-value 1e-4 fails correct kernels on some seeds.
# float64 has no such results at these sizes: its PyTorch baseline is the reference itself.
# ULP: one unit of rounding of the result, which any kernel pays once: gradients of broadcast
# operands (a [Dx] logvar, a [Dz] prior) are sums of B rounded per-element gradients and cannot
# meet a per-value bound in 8 or 11 bits of mantissa, in PyTorch either.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-12}
LOW_PRECISION_ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def tolerance_note(dtype: torch.dtype, terms: int) -> str:
    """The footer line stating the tolerance; `terms`: the most terms one result sums over."""
    name = str(dtype).replace("torch.", "")
    torch_is = f"torch = fastelbo.reference run in {name} on the same inputs (plain PyTorch's own error, per tensor)"
    if dtype == torch.float32:
        u = torch.finfo(dtype).eps / 2
        return (f"tolerance ({name}): |out - ref| <= max({TOLERANCE[dtype]:g} * max(1, |ref|), "
                f"{BASELINE_FACTOR:g} * max|torch - ref|) per value; {TOLERANCE[dtype]:g}: {name} rounding "
                f"u = 2^{int(math.log2(u))} summed over <= {terms} terms: n*u = {terms * u:.1e}; {torch_is}: "
                "ill-conditioned results (the IWAE gradients) are only that good in any float32 implementation.")
    if dtype in TOLERANCE:
        u = torch.finfo(dtype).eps / 2
        return (f"tolerance ({name}): |out - ref| <= {TOLERANCE[dtype]:g} * max(1, |ref|) per value "
                f"({name} rounding u = 2^{int(math.log2(u))} summed over <= {terms} terms: n*u = {terms * u:.1e}).")
    ulp = f"2^{int(math.log2(LOW_PRECISION_ULP[dtype]))}"
    return (f"tolerance ({name}): per tensor, max|out - ref| <= {BASELINE_FACTOR:g} * max|torch - ref| + "
            f"{ulp} * max(1, max|ref|), {torch_is}, {ulp} = one ulp of the result.")


# Under TRITON_INTERPRET=1 every program runs in numpy: keep the CPU shapes tiny.
TRITON_CPU_SHAPE = (8, 40, 6)


def add_arguments(parser) -> None:
    add_dtype_option(parser, "float32", "float32")
    add_shape_option(parser, None, "64x784x32")
    add_device_option(parser, "cpu or cuda: check only this device type; auto: cpu, and cuda when present")
    parser.add_argument("--backend", choices=list(KERNEL_BACKENDS), action="append", default=None,
                        help="check only this backend (repeatable; default: all of them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and of rsample (default 0)")
    # fastelbo 0.1's spelling of --shape, kept working (not advertised): --shape BxDXxDZ as in bench.
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--x-dim", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--z-dim", type=int, default=None, help=argparse.SUPPRESS)


DEFAULT_SHAPE = (64, 784, 32)


# ---------------------------------------------------------------------------
# The cases: one per op (and variant) of the public API.
# ---------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    inputs: dict[str, torch.Tensor]  # float32 master values, rounded to --dtype; every one gets a gradient
    call: Callable  # call(api, **inputs) -> tuple of outputs; api(name) -> the function


def make_cases(batch: int, x_dim: int, z_dim: int, seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=g) * scale

    def rand(*shape):
        return torch.rand(shape, generator=g)

    B, Dx, Dz = batch, x_dim, z_dim
    latent = lambda: {"mu": randn(B, Dz), "logvar": randn(B, Dz, scale=0.5)}  # noqa: E731
    rsample_seed = seed + 1234
    return [
        Case("rsample", latent(),
             lambda api, mu, logvar: (api("rsample")(mu, logvar, seed=rsample_seed),)),
        Case("gaussian_kl", latent(),
             lambda api, mu, logvar: (api("gaussian_kl")(mu, logvar),)),
        Case("gaussian_kl (prior)",
             {**latent(), "prior_mu": randn(Dz, scale=0.5), "prior_logvar": randn(Dz, scale=0.3)},
             lambda api, mu, logvar, prior_mu, prior_logvar: (
                 api("gaussian_kl")(mu, logvar, prior_mu, prior_logvar),)),
        Case("bernoulli_log_prob", {"logits": randn(B, Dx, scale=2.0), "x": rand(B, Dx)},
             lambda api, logits, x: (api("bernoulli_log_prob")(logits, x),)),
        Case("gaussian_log_prob", {"mean": randn(B, Dx), "x": randn(B, Dx), "logvar": randn(Dx, scale=0.3)},
             lambda api, mean, x, logvar: (api("gaussian_log_prob")(mean, x, logvar),)),
        Case("elbo (bernoulli)", {"x": rand(B, Dx), "recon": randn(B, Dx, scale=2.0), **latent()},
             lambda api, x, recon, mu, logvar: tuple(api("elbo")(recon=recon, x=x, mu=mu, logvar=logvar, likelihood="bernoulli"))),
        Case("elbo (gaussian)",
             {"x": randn(B, Dx), "recon": randn(B, Dx), **latent(), "obs_logvar": randn(Dx, scale=0.3),
              "prior_mu": randn(Dz, scale=0.5), "prior_logvar": randn(Dz, scale=0.3)},
             lambda api, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar: tuple(
                 api("elbo")(recon=recon, x=x, mu=mu, logvar=logvar, likelihood="gaussian", obs_logvar=obs_logvar, prior_mu=prior_mu,
                             prior_logvar=prior_logvar, beta=0.5))),
        Case("rsample (K=4)", latent(),
             lambda api, mu, logvar: (api("rsample")(mu, logvar, num_samples=4, seed=rsample_seed),)),
        Case("elbo (K=4 samples)", {"x": rand(B, Dx), "recon": randn(4, B, Dx, scale=2.0), **latent()},
             lambda api, x, recon, mu, logvar: tuple(api("elbo")(recon=recon, x=x, mu=mu, logvar=logvar, beta=0.7))),
        Case("iwae_bound (K=4)",
             {"x": rand(B, Dx), "recon": randn(4, B, Dx, scale=2.0), "z": randn(4, B, Dz), **latent()},
             lambda api, x, recon, z, mu, logvar: (api("iwae_bound")(recon=recon, x=x, z=z, mu=mu, logvar=logvar),)),
        Case("free_bits_kl", latent(),
             lambda api, mu, logvar: (api("free_bits_kl")(mu, logvar, 0.3),)),
    ]


def _backend_api(backend: str) -> Callable:
    return lambda name: functools.partial(getattr(functional, name), backend=backend)


def _reference_api(name: str) -> Callable:
    return getattr(reference, name)


# ---------------------------------------------------------------------------
# Running one case and measuring the error.
# ---------------------------------------------------------------------------
@dataclass
class Result:
    fwd_err: float | None = None
    grad_err: float | None = None
    ratio: float | None = None  # worst error / allowed error; <= 1 passes
    failure: str | None = None


def _abs_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out - ref| in float64 on CPU; NaN against NaN and equal infinities count 0, NaN on one side inf."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    diff = (out - ref).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    same = (torch.isnan(out) & torch.isnan(ref)) | (torch.isinf(out) & (out == ref))
    return torch.where(same, torch.zeros_like(diff), diff)


def _compare(out, ref: torch.Tensor, low: torch.Tensor | None, dtype: torch.dtype, what: str,
             res: Result, failures: list[str]) -> float:
    """Max abs error of one tensor against its float64 reference; records the worst
    error/bound ratio in res and a failure naming the worst index."""
    if out is None:
        failures.append(f"{what}: missing")
        return float("inf")
    if tuple(out.shape) != tuple(ref.shape):
        failures.append(f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        return float("inf")
    if out.numel() == 0:
        return 0.0
    diff = _abs_err(out, ref)
    ref64 = ref.detach().to("cpu", torch.float64)
    if dtype in TOLERANCE:  # per value, at least the tensor's 2x-PyTorch bound (float32)
        bound = TOLERANCE[dtype] * torch.clamp(ref64.abs(), min=1.0)
        if low is not None:
            bound = torch.clamp(bound, min=baseline_bound(low, ref64, 0.0))
    else:  # per tensor, against plain PyTorch in the same dtype
        if low is None:
            raise ValueError(f"{what}: the {dtype} rule needs the reference run in {dtype}")
        bound = torch.full_like(diff, baseline_bound(low, ref64, LOW_PRECISION_ULP[dtype]))
    ratio = diff / bound
    worst_ratio = float(ratio.max())
    res.ratio = max(res.ratio or 0.0, worst_ratio)
    if worst_ratio > 1.0:
        i = int(torch.argmax(ratio))
        idx = [int(k) for k in torch.unravel_index(torch.tensor(i), tuple(out.shape))]
        failures.append(f"{what}{idx}: got {out.detach().reshape(-1)[i].item():.6g}, "
                        f"expected {ref64.reshape(-1)[i].item():.6g}")
    return float(diff.max())


def _forward_backward(case: Case, api: Callable, values: list[torch.Tensor], upstream: list[torch.Tensor],
                      dtype: torch.dtype, device: str):
    """Outputs and input gradients of one case on one implementation."""
    names = list(case.inputs)
    inputs = [v.to(device=device, dtype=dtype).requires_grad_() for v in values]
    out = case.call(api, **dict(zip(names, inputs)))
    grads = torch.autograd.grad(out, inputs, [u.to(device=device, dtype=dtype) for u in upstream],
                                allow_unused=True)
    return out, grads


def run_case(case: Case, backend: str, device: str, dtype: torch.dtype, seed: int) -> Result:
    names = list(case.inputs)
    values = [case.inputs[n].to(dtype) for n in names]  # rounded once: every side sees these values
    shapes = case.call(_reference_api, **dict(zip(names, values)))
    g = torch.Generator().manual_seed(seed + 99)
    upstream = [torch.randn(o.shape, generator=g).to(dtype) for o in shapes]  # not 1: catches missed scaling
    ref_out, ref_grads = _forward_backward(case, _reference_api, values, upstream, torch.float64, "cpu")
    low_out, low_grads = [None] * len(ref_out), [None] * len(ref_grads)
    if dtype != torch.float64:  # plain PyTorch's own error in the checked dtype (float64's is the reference)
        low_out, low_grads = _forward_backward(case, _reference_api, values, upstream, dtype, "cpu")

    res, failures = Result(), []
    try:
        out, grads = _forward_backward(case, _backend_api(backend), values, upstream, dtype, device)
        errors = []
        for k, (o, r, lo) in enumerate(zip(out, ref_out, low_out)):
            what = "out" if len(out) == 1 else f"out{k}"
            if o.dtype != dtype:
                failures.append(f"{what}: dtype {o.dtype}, expected {dtype}")
            errors.append(_compare(o, r, lo, dtype, what, res, failures))
        res.fwd_err = max(errors)
        errors = [_compare(gr, rg, lo, dtype, f"d{name}", res, failures)
                  for name, gr, rg, lo in zip(names, grads, ref_grads, low_grads) if rg is not None]
        res.grad_err = max(errors) if errors else 0.0
    except Exception as exc:  # a crash is a failure, with its message
        failures.append(f"{type(exc).__name__}: {one_line(exc)}")
    if failures:
        res.failure = "; ".join(failures[:2]) + ("; ..." if len(failures) > 2 else "")
    return res


@contextlib.contextmanager
def _strict():
    """FASTELBO_STRICT=1 while checking: a silent fallback to the reference
    would compare the reference with itself and pass."""
    old = os.environ.get("FASTELBO_STRICT")
    os.environ["FASTELBO_STRICT"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTELBO_STRICT", None)
        else:
            os.environ["FASTELBO_STRICT"] = old


def _err(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


# ---------------------------------------------------------------------------
def _shapes(args) -> list[tuple[int, int, int]]:
    old = (args.batch, args.x_dim, args.z_dim)
    if any(v is not None for v in old):
        if args.shapes:
            raise ValueError("pass --shape BxDXxDZ, not --shape with --batch/--x-dim/--z-dim")
        shape = tuple(d if v is None else v for v, d in zip(old, DEFAULT_SHAPE))
        if min(shape) < 1:
            raise ValueError("--batch, --x-dim and --z-dim must be at least 1 (prefer --shape BxDXxDZ)")
        return [shape]
    return [parse_shape(text) for text in csv(args.shapes)] if args.shapes else [DEFAULT_SHAPE]


def run(args) -> int:
    try:
        dtype_names, shapes = parse_dtypes(args.dtypes), _shapes(args)
    except ValueError as exc:
        return error("check", str(exc))
    device = None if args.device == "auto" else args.device
    if device == "cuda" and not cuda_present():
        return error("check", f"--device cuda: {NO_CUDA}")
    status = 0
    for i, (name, shape) in enumerate((n, s) for n in dtype_names for s in shapes):
        if i:
            print()
        status = max(status, _run_one(args, name, shape, device))
    return status


def _run_one(args, dtype_name: str, full_shape: tuple[int, int, int], device_choice: str | None) -> int:
    """One dtype and shape: the table, its footer, 1 when a check failed."""
    dtype = DTYPES[dtype_name]
    batch, x_dim, z_dim = full_shape
    devices = [device_choice] if device_choice else ["cpu"] + (["cuda"] if cuda_present() else [])

    print(f"fastelbo check: dtype {dtype_name}, shape {batch}x{x_dim}x{z_dim} (B={batch} Dx={x_dim} Dz={z_dim}), "
          f"seed {args.seed}")
    start = time.perf_counter()
    build_failure = None
    if not args.backend or "cpu" in args.backend:
        try:
            _build.load_cpu_extension()
            print(f"C++ CPU kernels: ready in {time.perf_counter() - start:.1f} s "
                  f"({_build.cpu_extension_status()[1]})")
        except _build.BuildError as exc:
            build_failure = str(exc)
            print(f"C++ CPU kernels: BUILD FAILED\n{build_failure}")
    print()

    headers = ["backend", "device", "op", "fwd max abs err", "grad max abs err", "err/tol", "status"]
    rows: list[list[str]] = []
    counts = {"ok": 0, "FAIL": 0, "unavailable": 0, "skipped": 0}

    def add(backend, device, op, status, fwd=None, grad=None, ratio=None):
        counts[status.split(":")[0]] += 1
        rows.append([backend, device, op, _err(fwd), _err(grad), "-" if ratio is None else f"{ratio:.2f}", status])

    for backend in KERNEL_BACKENDS:
        if args.backend and backend not in args.backend:
            continue
        targets = TARGET_DEVICES[backend]
        present = [d for d in targets if d in devices]
        if not present:  # say why this backend gets no row of its own
            device = targets[-1]
            ok, reason = availability(backend, device)
            if not ok:
                why = f"unavailable: {one_line(reason)}"
            elif device_choice and device_choice not in targets:
                why = f"skipped: --device {device_choice}"
            else:  # pragma: no cover - availability() already says so without a device
                why = f"unavailable: {NO_CUDA}"
            add(backend, device, "all", why)
            continue
        for device in present:
            ok, reason = availability(backend, device)
            if not ok:
                add(backend, device, "all", f"unavailable: {one_line(reason)}")
                continue
            shape = full_shape
            if backend == "triton" and device == "cpu":
                shape = tuple(min(a, b) for a, b in zip(shape, TRITON_CPU_SHAPE))
            with _strict():
                for case in make_cases(*shape, seed=args.seed):
                    res = run_case(case, backend, device, dtype, args.seed)
                    status = "ok" if res.failure is None else f"FAIL: {res.failure}"
                    label = case.name if shape == full_shape else \
                        f"{case.name} [{shape[0]}x{shape[1]}/{shape[2]}]"
                    add(backend, device, label, status, res.fwd_err, res.grad_err, res.ratio)

    print(table(headers, rows))
    print()
    print(tolerance_note(dtype, max(full_shape)))
    print("err/tol: the worst error over the error allowed (<= 1 is ok).")
    print("reference: fastelbo.reference (torch.distributions) in float64 on the same rounded inputs; "
          "backward with random upstream gradients.")
    print(", ".join(f"{n} {k}" for k, n in counts.items() if n)
          + f"; {time.perf_counter() - start:.1f} s")
    if build_failure is not None:
        print("FAILED: the C++ CPU kernels did not build (see above).")
        return 1
    if counts["FAIL"]:
        print(f"FAILED: {counts['FAIL']} check(s) outside the tolerance or crashed.")
        return 1
    if not counts["ok"]:
        print("note: no backend could run here, nothing was checked.")
    return 0
