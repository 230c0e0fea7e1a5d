"""Registration and gradients of the fastelbo:: custom ops.

* gradcheck in float64 of every op through the public API, on every fused backend;
* torch.library.opcheck (schema, autograd registration, fake tensors, AOT
  dispatch) of every fastelbo:: op of every fused backend, forward AND backward
  ops, with requires_grad True and False, a permuted dense layout and a
  zero-size batch (extension-cpp's test style). opcheck proves the
  registration, not the numbers: test_accuracy.py does those.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.library import opcheck

import fastelbo
from fastelbo import _backend, _ops
from fastelbo import functional as F
from helpers import FUSED_BACKENDS, generator_for, rand, randn

F64 = torch.float64


# ---------------------------------------------------------------------------
# gradcheck through the public API
# ---------------------------------------------------------------------------
def _gradcheck_cases(B=3, Dx=6, Dz=4):
    """name -> (function of the differentiable tensors, float64 inputs)."""
    g = generator_for("gradcheck")
    mu, lv = randn((B, Dz), g, dtype=F64), rand((B, Dz), g, -1, 1, dtype=F64)
    eps = randn((B, Dz), g, dtype=F64)
    pmu, plv = randn((Dz,), g, 0.5, dtype=F64), rand((Dz,), g, -1, 1, dtype=F64)
    pmu_full, plv_full = randn((B, Dz), g, 0.5, dtype=F64), rand((B, Dz), g, -1, 1, dtype=F64)
    logits, xb = randn((B, Dx), g, 2.0, dtype=F64), rand((B, Dx), g, 0.1, 0.9, dtype=F64)  # x inside (0, 1)
    mean, xg = randn((B, Dx), g, dtype=F64), randn((B, Dx), g, dtype=F64)
    s_vec, s_full = rand((Dx,), g, -1, 1, dtype=F64), rand((B, Dx), g, -1, 1, dtype=F64)
    s0 = torch.tensor(0.3, dtype=F64)
    return {
        "rsample_seed": (lambda be: lambda m, v: F.rsample(m, v, seed=1234, backend=be), (mu, lv)),
        "rsample_eps": (lambda be: lambda m, v, e: F.rsample(m, v, eps=e, backend=be), (mu, lv, eps)),
        "kl_std": (lambda be: lambda m, v: F.gaussian_kl(m, v, backend=be), (mu, lv)),
        "kl_prior_vec": (lambda be: lambda m, v, a, b: F.gaussian_kl(m, v, a, b, backend=be), (mu, lv, pmu, plv)),
        "kl_prior_full": (lambda be: lambda m, v, a, b: F.gaussian_kl(m, v, a, b, backend=be),
                          (mu, lv, pmu_full, plv_full)),
        "bernoulli": (lambda be: lambda l, x: F.bernoulli_log_prob(l, x, backend=be, validate_args=False),
                      (logits, xb)),
        "gaussian_vec": (lambda be: lambda m, x, s: F.gaussian_log_prob(m, x, s, backend=be), (mean, xg, s_vec)),
        "gaussian_full": (lambda be: lambda m, x, s: F.gaussian_log_prob(m, x, s, backend=be), (mean, xg, s_full)),
        "gaussian_scalar": (lambda be: lambda m, x, s: F.gaussian_log_prob(m, x, s, backend=be), (mean, xg, s0)),
        "elbo_bernoulli": (lambda be: lambda x, r, m, v, a, b: tuple(F.elbo(
            r, x, m, v, prior_mu=a, prior_logvar=b, beta=0.7, backend=be, validate_args=False)),
            (xb, logits, mu, lv, pmu, plv)),
        "elbo_gaussian": (lambda be: lambda x, r, m, v, s: tuple(F.elbo(
            r, x, m, v, likelihood="gaussian", obs_logvar=s, beta=1.3, backend=be)), (xg, mean, mu, lv, s_vec)),
        "elbo_loss_mean": (lambda be: lambda r, x, m, v: fastelbo.ELBOLoss(
            beta=2.0, backend=be, validate_args=False)(r, x, m, v), (logits, xb, mu, lv)),
    }


@pytest.mark.parametrize("case", list(_gradcheck_cases()))
def test_gradcheck(fused, case):
    make, inputs = _gradcheck_cases()[case]
    inputs = tuple(t.to(fused.device).requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(make(fused.name), inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_double_backward_is_never_silently_wrong(fused, request):
    """A second derivative through a fastelbo op is either right or a loud error, never a silent None."""
    g = generator_for("double")
    mu = randn((3, 4), g, dtype=F64).to(fused.device).requires_grad_()
    lv = rand((3, 4), g, -1, 1, dtype=F64).to(fused.device).requires_grad_()
    kl = F.gaussian_kl(mu, lv, backend=fused.name).sum()
    (gmu,) = torch.autograd.grad(kl, mu, create_graph=True)  # d KL / d mu = mu
    try:
        (hess_diag,) = torch.autograd.grad(gmu.sum(), mu, allow_unused=True)
    except RuntimeError:
        return  # refusing double backward loudly is acceptable
    assert hess_diag is not None and torch.allclose(hess_diag, torch.ones_like(mu)), hess_diag


SECOND_DERIVATIVES = ["elbo", "rsample", "kl", "gaussian", "bernoulli", "free_bits", "iwae"]


def _second_derivative_case(which, backend, dev):
    """(mu, a scalar of mu through the op, its known d2 / d mu2 diagonal)."""
    g = generator_for("double", which)
    mu = randn((3, 4), g, dtype=F64).to(dev).requires_grad_()
    lv = rand((3, 4), g, -1, 1, dtype=F64).to(dev).requires_grad_()
    if which == "elbo":
        x, recon = rand((3, 5), g, 0, 1, dtype=F64).to(dev), randn((3, 5), g, dtype=F64).to(dev)
        out, expected = F.elbo(recon, x, mu, lv, backend=backend).kl.sum(), torch.ones_like(mu)  # d2 KL / d mu2
    elif which == "rsample":
        z = F.rsample(mu, lv, seed=3, backend=backend)
        out, expected = (z * z).sum(), torch.full_like(mu, 2.0)  # d2 sum(z^2) / d mu2, z = mu + ...
    elif which == "kl":
        out, expected = F.gaussian_kl(mu, lv, backend=backend).sum(), torch.ones_like(mu)
    elif which == "gaussian":  # mu as the mean of x ~ N(mu, 1): d2 / d mu2 = -1
        x = randn((3, 4), g, dtype=F64).to(dev)
        out, expected = F.gaussian_log_prob(mu, x, backend=backend).sum(), -torch.ones_like(mu)
    elif which == "free_bits":  # no floor: every dimension active, the KL's d2 / d mu2 = 1
        out, expected = F.free_bits_kl(mu, lv, 0.0, backend=backend).sum(), torch.ones_like(mu)
    elif which == "iwae":  # K = 1, z fixed: -log q(z | mu, lv) gives d2 / d mu2 = e^-lv
        x, recon = rand((3, 5), g, 0, 1, dtype=F64).to(dev), randn((1, 3, 5), g, dtype=F64).to(dev)
        z = randn((1, 3, 4), g, dtype=F64).to(dev)
        out, expected = F.iwae_bound(recon, x, z, mu, lv, backend=backend).sum(), torch.exp(-lv.detach())
    else:  # mu as logits: d2 / d l2 = -sigmoid(l) (1 - sigmoid(l))
        x = rand((3, 4), g, 0, 1, dtype=F64).to(dev)
        out = F.bernoulli_log_prob(mu, x, backend=backend).sum()
        expected = (-torch.sigmoid(mu) * (1 - torch.sigmoid(mu))).detach()
    return mu, out, expected


@pytest.mark.parametrize("which", SECOND_DERIVATIVES)
def test_second_derivative_cases_hold_on_the_reference(which):
    """The expected values below are right: torch.distributions' autograd agrees."""
    mu, out, expected = _second_derivative_case(which, "reference", "cpu")
    (gmu,) = torch.autograd.grad(out, mu, create_graph=True)
    (hess_diag,) = torch.autograd.grad(gmu.sum(), mu)
    torch.testing.assert_close(hess_diag, expected)


@pytest.mark.parametrize("which", SECOND_DERIVATIVES)
def test_double_backward_through_the_c_autograd_ops_is_never_silently_wrong(fused, which):
    """The same, with the error named, for every op family (on CPU their autograd is C++, csrc/cpu/autograd.cpp)."""
    mu, out, expected = _second_derivative_case(which, fused.name, fused.device)
    (gmu,) = torch.autograd.grad(out, mu, create_graph=True)
    try:
        (hess_diag,) = torch.autograd.grad(gmu.sum(), mu, allow_unused=True)
    except RuntimeError as err:
        assert "not differentiable" in str(err) or "double backward" in str(err), err
        return
    assert hess_diag is not None and torch.allclose(hess_diag, expected), hess_diag


# ---------------------------------------------------------------------------
# opcheck on every op
# ---------------------------------------------------------------------------
DEFAULT_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
FORWARD = _ops.FAMILIES
# elbo_loss: ELBOLoss's one-pass reduced loss with its gradients (docs/design.md §5); no backward op.
OPS = FORWARD + tuple(f + "_backward" for f in FORWARD) + ("philox_noise", "elbo_loss")


def _permuted(t):
    return t.t().contiguous().t() if t.dim() == 2 else t


def sample_inputs(op: str, device, requires_grad: bool, B=3, Dx=7, Dz=5):
    """Argument tuples for op: contiguous, permuted dense layout, zero-size batch, stride-0 broadcasts."""
    samples = []
    for rows, layout in ((B, "contiguous"), (B, "permuted"), (0, "contiguous")):
        g = generator_for(op, rows, layout)

        def t(shape, lo=-1.0, hi=1.0, grad=True):
            x = rand(shape, g, lo, hi, dtype=torch.float32)
            x = _permuted(x) if layout == "permuted" else x
            return x.to(device).detach().requires_grad_(requires_grad and grad)

        def rowv(n=rows):
            return t((n,))

        seed = torch.tensor(20240601, dtype=torch.int64, device=device)
        z = (rows, Dz)
        x = (rows, Dx)
        pmu = rand((Dz,), g, dtype=torch.float32).to(device).expand(rows, Dz)  # broadcast prior: stride 0
        plv = rand((1, Dz), g, dtype=torch.float32).to(device).expand(rows, Dz)
        unit = lambda: t(x, 0.0, 1.0)  # noqa: E731
        if op == "rsample":
            samples += [(t(z), t(z), seed, None), (t(z), t(z), seed, t(z)), (t(z), t(z), seed, None, 3),
                        (t(z), t(z), seed, t((2, *z)), 2)]
        elif op == "rsample_backward":
            samples += [(t(z), t(z), seed, None, [True, False]), (t(z), t(z), seed, t(z), [True, True]),
                        (t((3, *z)), t(z), seed, None, [True, True]), (t((2, *z)), t(z), seed, t((2, *z)), [True, True])]
        elif op == "gaussian_kl":
            samples += [(t(z), t(z), None, None), (t(z), t(z), t(z), t(z)), (t(z), t(z), pmu, plv)]
        elif op == "gaussian_kl_backward":
            samples += [(rowv(), t(z), t(z), None, None, [True, True, False, False]),
                        (rowv(), t(z), t(z), t(z), t(z), [True, True, True, True]),
                        (rowv(), t(z), t(z), pmu, plv, [False, True, False, True])]
        elif op == "bernoulli_log_prob":
            samples += [(t(x, -4, 4), unit()), (t(x, -4, 4), unit(), True)]
        elif op == "bernoulli_log_prob_backward":
            samples += [(rowv(), t(x, -4, 4), unit(), [True, True]), (rowv(), t(x, -4, 4), unit(), [True, False])]
        elif op == "gaussian_log_prob":
            s_vec = rand((Dx,), g, dtype=torch.float32).to(device).expand(rows, Dx)
            samples += [(t(x), t(x), t(x)), (t(x), t(x), s_vec), (t(x), t(x), t((1, Dx)))]
        elif op == "gaussian_log_prob_backward":
            samples += [(rowv(), t(x), t(x), t(x), [True, True, True]),
                        (rowv(), t(x), t(x), t(x), [True, False, False]),
                        (rowv(), t(x), t(x), t((1, Dx)), [True, True, True])]
        elif op == "elbo":
            samples += [(unit(), t(x, -4, 4), t(z), t(z), None, None, None, "bernoulli", 1.0),
                        (unit(), t(x, -4, 4), t(z), t(z), None, pmu, plv, "bernoulli", 0.5, True),
                        (t(x), t(x), t(z), t(z), t(x), t(z), t(z), "gaussian", 2.0),
                        (unit(), t((2, *x), -4, 4), t(z), t(z), None, None, None, "bernoulli", 1.0, True),
                        (t(x), t((3, *x)), t(z), t(z), t((1, Dx)), pmu, plv, "gaussian", 0.5)]
        elif op == "elbo_backward":
            all7 = [True] * 7
            samples += [(rowv(), None, None, unit(), t(x, -4, 4), t(z), t(z), None, None, None, "bernoulli", 1.0,
                         [False, True, True, True, False, False, False]),
                        (rowv(), rowv(), rowv(), t(x), t(x), t(z), t(z), t(x), t(z), t(z), "gaussian", 0.3, all7),
                        (None, rowv(), None, t(x), t(x), t(z), t(z), t(x), pmu, plv, "gaussian", 0.3, all7),
                        (rowv(), None, rowv(), t(x), t((3, *x)), t(z), t(z), t((1, Dx)), None, None, "gaussian", 0.3,
                         all7),
                        (rowv(), rowv(), None, unit(), t((2, *x), -4, 4), t(z), t(z), None, pmu, plv, "bernoulli",
                         1.0, all7)]
        elif op == "elbo_loss":
            # output_mask as ELBOLoss builds it: the inputs that require grad (fastelbo/loss.py).
            def loss_args(*a, validate=None):
                mask = [isinstance(v, torch.Tensor) and v.requires_grad for v in a[:7]]
                return (*a, mask) if validate is None else (*a, mask, validate)

            if rows == 0:  # "mean" of no rows is NaN (as torch.mean) and opcheck's NaN != NaN; "sum" is 0.
                samples += [loss_args(unit(), t(x, -4, 4), t(z), t(z), None, pmu, plv, "bernoulli", 0.5, "sum")]
                continue   # the empty "mean" batch is covered by tests/test_onepass.py
            samples += [loss_args(unit(), t(x, -4, 4), t(z), t(z), None, None, None, "bernoulli", 1.0, "mean"),
                        loss_args(unit(), t(x, -4, 4), t(z), t(z), None, pmu, plv, "bernoulli", 0.5, "sum",
                                  validate=True),
                        loss_args(t(x), t((3, *x)), t(z), t(z), t((1, Dx)), pmu, plv, "gaussian", 0.5, "mean")]
        elif op == "iwae_bound":
            samples += [(unit(), t((3, *x), -4, 4), t((3, *z)), t(z), t(z), None, None, None, "bernoulli"),
                        (unit(), t((2, *x), -4, 4), t((2, *z)), t(z), t(z), None, pmu, plv, "bernoulli", True),
                        (t(x), t((3, *x)), t((3, *z)), t(z), t(z), t((1, Dx)), t(z), t(z), "gaussian")]
        elif op == "iwae_bound_backward":
            all8 = [True] * 8
            samples += [(t((3, rows), grad=False), unit(), t((3, *x), -4, 4), t((3, *z)), t(z), t(z), None, None, None,
                         "bernoulli", all8),
                        (t((2, rows), grad=False), t(x), t((2, *x)), t((2, *z)), t(z), t(z), t((1, Dx)), pmu, plv,
                         "gaussian", all8),
                        (t((2, rows), grad=False), t(x), t((2, *x)), t((2, *z)), t(z), t(z), t(x), None, None,
                         "gaussian", [False, True, False, True, False, True, False, False])]
        elif op == "free_bits_kl":
            if rows == 0:  # kl_dims is NaN (a mean over no rows, as torch.mean), and opcheck's NaN != NaN;
                continue   # the empty batch is covered by tests/test_bounds.py
            samples += [(t(z), t(z), None, None, 0.1), (t(z), t(z), pmu, plv, 0.3), (t(z), t(z), t(z), t(z), 0.0)]
        elif op == "free_bits_kl_backward":
            samples += [(rowv(), t((Dz,), 0.0, 0.2, grad=False), t(z), t(z), None, None, 0.1,
                         [True, True, False, False]),
                        (rowv(), t((Dz,), 0.0, 0.6, grad=False), t(z), t(z), pmu, plv, 0.3, [True, True, True, True])]
        elif op == "philox_noise":
            samples += [(seed, 4 * rows + 3, False, torch.float32), (seed, 4 * rows + 1, True, torch.float64)]
        else:
            raise ValueError(op)
    return samples


def _op_params():
    params = []
    for bp in FUSED_BACKENDS:
        for op in OPS:
            params.append(pytest.param(bp.values[0], op, id=f"{bp.id}-{op}", marks=bp.marks))
    return params


def _resolve_op(backend, op):
    """The torch op behind `op` for a backend (the namespace the API dispatches to)."""
    if op == "elbo_loss":  # ELBOLoss reaches the one-pass ops through fastelbo/_onepass.py, not the API's namespace
        from fastelbo import _onepass
        from fastelbo.loss import ONEPASS_OPS

        packet = _onepass.op_for(ONEPASS_OPS[backend.name])
        return packet.default if isinstance(packet, torch._ops.OpOverloadPacket) else packet
    ns = _backend.impl(backend.name, torch.device(backend.device))
    packet = getattr(ns, op, None)
    if packet is None and op == "philox_noise" and backend.name == "triton":
        pytest.skip("the Triton backend draws its noise inside its kernels (tl.randn4x); it has no separate "
                    "philox_noise op (the C++ one is checked under the cpu/cuda backends)")
    if packet is None:
        pytest.fail(f"backend {backend.name!r} has no {op} op")
    return packet.default if isinstance(packet, torch._ops.OpOverloadPacket) else packet


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("backend,op", _op_params())
def test_opcheck(backend, op, requires_grad):
    target = _resolve_op(backend, op)
    assert "fastelbo::" in str(target.name() if hasattr(target, "name") else target)
    utils = DEFAULT_UTILS
    if requires_grad and op.endswith("_backward"):
        # Backward ops are not differentiable (no double backward): with inputs that require grad, only the
        # schema and fake-tensor checks apply; the autograd checks would backprop through them, which
        # test_double_backward_is_never_silently_wrong covers.
        utils = ("test_schema", "test_faketensor")
    for args in sample_inputs(op, backend.device, requires_grad):
        opcheck(target, args, test_utils=utils)


def test_every_registered_op_is_opchecked():
    """No fastelbo:: op escapes the opcheck list above (a new op must be added to sample_inputs)."""
    registered = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("fastelbo::")}
    covered = set(OPS) | {f"triton_{op}" for op in OPS if op != "philox_noise"} | {f"emu_{op}" for op in OPS}
    missing = registered - covered
    assert not missing, f"fastelbo:: ops without opcheck coverage: {sorted(missing)}"
    assert set(OPS) <= registered, f"ops listed but not registered: {sorted(set(OPS) - registered)}"


# ---------------------------------------------------------------------------
# Mixed devices: a direct op call refuses them, naming the argument and both devices
# ---------------------------------------------------------------------------
def _other_devices(device: str) -> list[str]:
    """Devices to mix into a call on `device`: meta always (its key outranks every backend's, so the
    call goes to the fake kernel), the CPU too where the tensors live on a GPU (the GPU kernel runs)."""
    return ["meta"] + (["cpu"] if torch.device(device).type != "cpu" else [])


def _assert_refused(call, args, moved: int, names, device: str, other: str):
    """call(*args) with args[moved] (alone, or all but it) on `other` raises an error that names
    argument `moved` and both device types; only a CPU seed may be taken (the CUDA kernels copy it),
    and then every result is on the device of the other tensors."""
    name = names[moved]
    try:
        out = call(*args)
    except (RuntimeError, ValueError, TypeError) as e:
        msg = str(e).lower()
        assert re.search(rf"\b{name}\b", msg), f"the error does not name {name}: {e!r}"
        for dev in {torch.device(device).type, torch.device(other).type}:
            assert dev in msg, f"the error does not name device {dev}: {e!r}"
        return
    seed_on_cpu = name == "seed" and args[moved].device.type == "cpu"
    assert seed_on_cpu, f"{name} on {args[moved].device} mixed with tensors on other devices was accepted"
    rest = {a.device for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i != moved}
    outs = out if isinstance(out, tuple) else (out,)
    assert {o.device for o in outs} <= rest, f"results on {[o.device for o in outs]}, inputs on {rest}"


@pytest.mark.parametrize("backend,op", _op_params())
def test_mixed_devices_are_refused(backend, op):
    """Each tensor argument on another device than the rest, and the rest on another device than it.
    (A meta tensor among CPU ones used to reach the fake kernel, which handed back uninitialized CPU
    memory.)"""
    target = _resolve_op(backend, op)
    names = [a.name for a in target._schema.arguments]
    for other in _other_devices(backend.device):
        for args in sample_inputs(op, backend.device, False):
            tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            for i in tensors if len(tensors) > 1 else ():
                for moved in ([i], [j for j in tensors if j != i]):
                    mixed = [a.to(other) if j in moved else a for j, a in enumerate(args)]
                    _assert_refused(target, mixed, i, names, backend.device, other)


def _cpu_key_params():
    return [p for p in _op_params() if p.values[0].name in ("cpu", "cuda-emulated")]


@pytest.mark.parametrize("backend,op", _cpu_key_params())
def test_cpu_key_kernels_check_devices(backend, op):
    """The C++ kernels of the CPU key (csrc/cpu, and the CUDA kernels on the emulation) check devices
    themselves: called past the fake kernel with an explicit dispatch key, a meta tensor among CPU ones
    is refused before anything is read."""
    target = _resolve_op(backend, op)
    names = [a.name for a in target._schema.arguments]
    cpu_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    for args in sample_inputs(op, "cpu", False):
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                mixed = [t.to("meta") if j == i else t for j, t in enumerate(args)]
                with pytest.raises(RuntimeError) as info:
                    target.redispatch(cpu_key, *mixed)
                msg = str(info.value).lower()
                assert re.search(rf"\b{names[i]}\b", msg) and "cpu" in msg and "meta" in msg, info.value
