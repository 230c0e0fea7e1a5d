"""Bad input gives a clear error (TypeError / ValueError / RuntimeError) whose
message names the argument; an empty batch gives empty results."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fastelbo
from fastelbo import _backend
from fastelbo import functional as F
from fastelbo import reference as R

B, DX, DZ = 3, 6, 4


def _t(*shape, dtype=torch.float32, device="cpu", lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(sum(shape) + 7)
    return (torch.rand(shape, generator=g) * (hi - lo) + lo).to(dtype=dtype, device=device)


def mu_lv(**kw):
    return _t(B, DZ, **kw), _t(B, DZ, **kw)


def unit(*shape):
    return _t(*shape, lo=0.0, hi=1.0)


MU, LV = mu_lv()
X, RECON = unit(B, DX), _t(B, DX)
META = torch.empty(B, DZ, device="meta")
NAN, INF = float("nan"), float("inf")


# (id, callable, exception type, regex the message must match: it names the argument)
CASES = [
    # mismatched shapes
    ("kl-shape", lambda: F.gaussian_kl(MU, _t(B, DZ + 1)), ValueError, r"\blogvar\b.*shape"),
    ("rsample-shape", lambda: F.rsample(MU, _t(B + 1, DZ)), ValueError, r"\blogvar\b.*shape"),
    ("rsample-eps-shape", lambda: F.rsample(MU, LV, eps=_t(B, DZ + 2)), ValueError, r"\beps\b.*shape"),
    ("bernoulli-shape", lambda: F.bernoulli_log_prob(RECON, unit(B, DX + 1)), ValueError, r"\bx\b.*shape"),
    ("gaussian-shape", lambda: F.gaussian_log_prob(RECON, _t(B - 1, DX)), ValueError, r"\bx\b.*shape"),
    ("elbo-x-shape", lambda: F.elbo(RECON, unit(B, DX + 1), MU, LV), ValueError, r"\bx\b.*shape"),
    ("elbo-batch", lambda: F.elbo(RECON, X, _t(B + 1, DZ), _t(B + 1, DZ)), ValueError, r"\bmu\b.*batch"),
    ("loss-batch", lambda: fastelbo.ELBOLoss()(RECON, X, _t(B + 2, DZ), _t(B + 2, DZ)), ValueError, r"\bmu\b.*batch"),
    # non-floating dtypes
    ("kl-int", lambda: F.gaussian_kl(MU.long(), LV.long()), TypeError, r"\bmu\b.*floating"),
    ("kl-int-logvar", lambda: F.gaussian_kl(MU, LV.int()), TypeError, r"\blogvar\b.*floating"),
    ("bernoulli-bool-x", lambda: F.bernoulli_log_prob(RECON, X > 0.5), TypeError, r"\bx\b.*floating"),
    ("rsample-int-eps", lambda: F.rsample(MU, LV, eps=MU.long()), TypeError, r"\beps\b.*floating"),
    ("elbo-int-recon", lambda: F.elbo(RECON.long(), X, MU, LV), TypeError, r"\brecon\b.*floating"),
    # mixed dtypes
    ("kl-mixed", lambda: F.gaussian_kl(MU, LV.double()), TypeError, r"\blogvar\b.*dtype"),
    ("gaussian-mixed", lambda: F.gaussian_log_prob(RECON, X.double()), TypeError, r"\bx\b.*dtype"),
    ("elbo-mixed", lambda: F.elbo(RECON, X, MU.double(), LV.double()), TypeError, r"\bmu\b.*dtype"),
    ("elbo-mixed-x", lambda: F.elbo(RECON, X.half(), MU, LV), TypeError, r"\bx\b.*dtype"),
    ("prior-mixed", lambda: F.gaussian_kl(MU, LV, _t(DZ, dtype=torch.float64)), TypeError, r"\bprior_mu\b.*dtype"),
    # mixed devices (a meta tensor stands for another device)
    ("kl-device", lambda: F.gaussian_kl(MU, META), ValueError, r"\blogvar\b.*device"),
    ("rsample-device", lambda: F.rsample(MU, LV, eps=META), ValueError, r"\beps\b.*device"),
    ("elbo-device", lambda: F.elbo(RECON, X, META, META), ValueError, r"\bmu\b.*device"),
    ("prior-device", lambda: F.gaussian_kl(MU, LV, torch.empty(DZ, device="meta")), ValueError,
     r"\bprior_mu\b.*device"),
    ("cpu-backend-on-meta", lambda: F.gaussian_kl(META, META, backend="cpu"), ValueError, r"backend.*cpu"),
    # wrong ranks
    ("kl-1d", lambda: F.gaussian_kl(_t(DZ), _t(DZ)), ValueError, r"\bmu\b.*2-D"),
    # [B, *] inputs are read as [B, D] (tests/test_nd_shapes.py); shapes that disagree name both
    ("kl-3d-vs-2d", lambda: F.gaussian_kl(_t(2, B, DZ), _t(B, DZ)), ValueError,
     r"\blogvar\b.*\(2, 3, 4\); got \(3, 4\)"),
    ("bernoulli-0d", lambda: F.bernoulli_log_prob(torch.tensor(0.5), torch.tensor(0.5)), ValueError,
     r"\blogits\b.*2-D"),
    ("rsample-1d-logvar", lambda: F.rsample(MU, _t(DZ)), ValueError, r"\blogvar\b.*2-D"),
    ("not-a-tensor", lambda: F.gaussian_kl([[0.0]], LV), TypeError, r"\bmu\b.*Tensor"),
    # x outside [0, 1] for Bernoulli
    ("bernoulli-x>1", lambda: F.bernoulli_log_prob(RECON, X + 1.5), ValueError, r"\bx\b.*\[0, 1\]"),
    ("bernoulli-x<0", lambda: F.bernoulli_log_prob(RECON, X - 1.5), ValueError, r"\bx\b.*\[0, 1\]"),
    ("elbo-x>1", lambda: F.elbo(RECON, X * 3, MU, LV), ValueError, r"\bx\b.*\[0, 1\]"),
    ("loss-x<0", lambda: fastelbo.ELBOLoss()(RECON, -X, MU, LV), ValueError, r"\bx\b.*\[0, 1\]"),
    # unknown names
    ("elbo-likelihood", lambda: F.elbo(RECON, X, MU, LV, likelihood="poisson"), ValueError, r"\blikelihood\b"),
    ("loss-likelihood", lambda: fastelbo.ELBOLoss(likelihood="laplace"), ValueError, r"\blikelihood\b"),
    ("loss-reduction", lambda: fastelbo.ELBOLoss(reduction="avg"), ValueError, r"\breduction\b"),
    ("backend-name", lambda: F.gaussian_kl(MU, LV, backend="gpu"), ValueError, r"\bbackend\b"),
    ("backend-type", lambda: F.gaussian_kl(MU, LV, backend=None), ValueError, r"\bbackend\b"),
    ("loss-backend-name", lambda: fastelbo.ELBOLoss(backend="fast")(RECON, X, MU, LV), ValueError, r"\bbackend\b"),
    # bad prior / observation log-variance shapes
    ("prior-mu-shape", lambda: F.gaussian_kl(MU, LV, _t(DZ + 1), _t(DZ)), ValueError, r"\bprior_mu\b.*shape"),
    ("prior-lv-shape", lambda: F.gaussian_kl(MU, LV, _t(DZ), _t(B + 1, DZ)), ValueError, r"\bprior_logvar\b.*shape"),
    ("prior-lv-3d", lambda: F.gaussian_kl(MU, LV, None, _t(1, B, DZ)), ValueError, r"\bprior_logvar\b.*shape"),
    ("prior-int", lambda: F.gaussian_kl(MU, LV, torch.zeros(DZ, dtype=torch.long)), TypeError, r"\bprior_mu\b"),
    ("prior-str", lambda: F.gaussian_kl(MU, LV, "zero"), TypeError, r"\bprior_mu\b"),
    ("elbo-prior-shape", lambda: F.elbo(RECON, X, MU, LV, prior_mu=_t(DX)), ValueError, r"\bprior_mu\b"),
    ("gaussian-logvar-shape", lambda: F.gaussian_log_prob(RECON, X, _t(DX + 1)), ValueError, r"\blogvar\b.*shape"),
    ("obs-shape", lambda: F.elbo(RECON, X, MU, LV, likelihood="gaussian", obs_logvar=_t(DZ)), ValueError,
     r"\bobs_logvar\b"),
    ("obs-with-bernoulli", lambda: F.elbo(RECON, X, MU, LV, obs_logvar=0.5), ValueError, r"\bobs_logvar\b"),
    # bad seeds / generators / eps combinations
    ("seed-float", lambda: F.rsample(MU, LV, seed=1.5), TypeError, r"\bseed\b"),
    ("seed-str", lambda: F.rsample(MU, LV, seed="7"), TypeError, r"\bseed\b"),
    ("seed-bool", lambda: F.rsample(MU, LV, seed=True), TypeError, r"\bseed\b"),
    ("seed-too-big", lambda: F.rsample(MU, LV, seed=2**64), ValueError, r"\bseed\b.*64"),
    ("seed-too-small", lambda: F.rsample(MU, LV, seed=-(2**63) - 1), ValueError, r"\bseed\b.*64"),
    ("seed-float-tensor", lambda: F.rsample(MU, LV, seed=torch.tensor(3.0)), ValueError, r"\bseed\b"),
    ("seed-2-elements", lambda: F.rsample(MU, LV, seed=torch.tensor([1, 2])), ValueError, r"\bseed\b"),
    ("seed-and-generator", lambda: F.rsample(MU, LV, seed=1, generator=torch.Generator()), ValueError,
     r"\bseed\b.*\bgenerator\b"),
    ("eps-and-seed", lambda: F.rsample(MU, LV, seed=1, eps=MU), ValueError, r"\beps\b.*\bseed\b"),
    ("generator-type", lambda: F.rsample(MU, LV, generator=42), TypeError, r"\bgenerator\b"),
    # scalars
    ("beta-str", lambda: F.elbo(RECON, X, MU, LV, beta="1"), TypeError, r"\bbeta\b"),
    ("beta-bool", lambda: fastelbo.ELBOLoss(beta=True), TypeError, r"\bbeta\b"),
    ("validate-args-type", lambda: fastelbo.set_default_validate_args(1), TypeError, r"validate_args"),
    ("beta-nan", lambda: F.elbo(RECON, X, MU, LV, beta=NAN), ValueError, r"\bbeta\b.*finite.*nan"),
    ("beta-inf", lambda: F.elbo(RECON, X, MU, LV, beta=-INF), ValueError, r"\bbeta\b.*finite.*-inf"),
    ("loss-beta-inf", lambda: fastelbo.ELBOLoss(beta=INF), ValueError, r"\bbeta\b.*finite"),
    ("loss-beta-numpy-nan", lambda: fastelbo.ELBOLoss(beta=np.float32("nan")), ValueError, r"\bbeta\b.*finite"),
    # non-finite NUMBERS as priors / log-variances (values inside tensors propagate as NaN, unchecked)
    ("kl-prior-mu-nan", lambda: F.gaussian_kl(MU, LV, NAN), ValueError, r"\bprior_mu\b.*finite.*nan"),
    ("kl-prior-lv-ninf", lambda: F.gaussian_kl(MU, LV, None, -INF), ValueError, r"\bprior_logvar\b.*finite.*-inf"),
    ("kl-prior-huge-int", lambda: F.gaussian_kl(MU, LV, 10**400), ValueError, r"\bprior_mu\b.*finite"),
    ("free-bits-prior-inf", lambda: F.free_bits_kl(MU, LV, 0.1, INF), ValueError, r"\bprior_mu\b.*finite"),
    ("elbo-prior-lv-nan", lambda: F.elbo(RECON, X, MU, LV, prior_logvar=NAN), ValueError,
     r"\bprior_logvar\b.*finite"),
    ("iwae-prior-mu-ninf", lambda: F.iwae_bound(RECON[None], X, MU[None], MU, LV, prior_mu=-INF), ValueError,
     r"\bprior_mu\b.*finite"),
    ("loss-prior-lv-inf", lambda: fastelbo.ELBOLoss()(RECON, X, MU, LV, prior_logvar=INF), ValueError,
     r"\bprior_logvar\b.*finite"),
    ("elbo-obs-logvar-nan", lambda: F.elbo(RECON, X, MU, LV, likelihood="gaussian", obs_logvar=NAN), ValueError,
     r"\bobs_logvar\b.*finite"),
    ("gaussian-logvar-inf", lambda: F.gaussian_log_prob(RECON, X, INF), ValueError, r"\blogvar\b.*finite"),
    # validate_args: None or a bool (a string or 0/1 would be read by truthiness)
    ("validate-args-str", lambda: F.bernoulli_log_prob(RECON, X * 3, validate_args="false"), TypeError,
     r"validate_args must be a bool or None; got str"),
    ("validate-args-zero", lambda: F.bernoulli_log_prob(RECON, X * 3, validate_args=0), TypeError,
     r"validate_args must be a bool or None; got int"),
    ("elbo-validate-args-int", lambda: F.elbo(RECON, X, MU, LV, validate_args=1), TypeError, r"validate_args.*int"),
    ("elbo-gaussian-validate-args", lambda: F.elbo(RECON, X, MU, LV, likelihood="gaussian", validate_args="no"),
     TypeError, r"validate_args.*str"),
    ("iwae-validate-args", lambda: F.iwae_bound(RECON[None], X, MU[None], MU, LV, validate_args=np.bool_(True)),
     TypeError, r"validate_args must be a bool or None; got numpy\.bool"),
    ("loss-validate-args", lambda: fastelbo.ELBOLoss(validate_args="false"), TypeError, r"validate_args.*str"),
    # ELBOLoss checks every argument it keeps when it is built
    ("loss-backend-at-construction", lambda: fastelbo.ELBOLoss(backend="nope"), ValueError,
     r"backend must be one of .*; got 'nope'"),
    ("loss-bound-name", lambda: fastelbo.ELBOLoss(bound="vimco"), ValueError, r"\bbound\b"),
    ("loss-free-bits-nan", lambda: fastelbo.ELBOLoss(free_bits=NAN), ValueError, r"\bfree_bits\b"),
    # num_samples whose z could not be a tensor: K or z's bytes beyond int64
    ("num-samples-2**63", lambda: F.rsample(MU, LV, num_samples=2**63, seed=0), ValueError,
     r"num_samples must fit in int64 .*; got 9223372036854775808"),
    ("num-samples-2**62", lambda: F.rsample(MU, LV, num_samples=2**62, seed=0), ValueError,
     r"num_samples is too large .*z of shape \[4611686018427387904, 3, 4\]"),
    ("num-samples-bytes", lambda: F.rsample(MU[:1, :1].double(), LV[:1, :1].double(), num_samples=2**60, seed=0),
     ValueError, r"num_samples is too large .*z of shape \[1152921504606846976, 1, 1\] \(9223372036854775808 bytes\)"),
    ("seed-numpy-bool", lambda: F.rsample(MU, LV, seed=np.bool_(True)), TypeError, r"\bseed\b"),
    # issue 21's leftovers: each names its argument (these raised OverflowError, nothing, or too late)
    ("free-bits-huge-int", lambda: F.free_bits_kl(MU, LV, 10**400), ValueError,
     r"^free_bits must be a finite number >= 0 .*; got an int of 401 digits$"),
    ("loss-free-bits-huge-int", lambda: fastelbo.ELBOLoss(free_bits=10**400), ValueError, r"\bfree_bits\b.*finite"),
    ("reference-rsample-num-samples-0", lambda: R.rsample(MU, LV, num_samples=0, seed=0), ValueError,
     r"num_samples must be >= 1; got 0"),
    ("reference-rsample-num-samples-float", lambda: R.rsample(MU, LV, num_samples=2.0, seed=0), TypeError,
     r"num_samples must be an int or None; got float"),
    ("reference-rsample-num-samples-2**62", lambda: R.rsample(MU, LV, num_samples=2**62, seed=0), ValueError,
     r"num_samples is too large"),
    ("loss-obs-logvar-nan-at-construction", lambda: fastelbo.ELBOLoss(likelihood="gaussian", obs_logvar=NAN),
     ValueError, r"\bobs_logvar\b.*finite.*nan"),
    ("loss-obs-logvar-inf-at-construction", lambda: fastelbo.ELBOLoss(likelihood="gaussian", obs_logvar=-INF),
     ValueError, r"\bobs_logvar\b.*finite"),
    ("chunk-size-too-large", lambda: fastelbo.estimate_log_likelihood((lambda x: (MU, LV), lambda z: z), X, K=2**62,
                                                                      chunk_size=2**62, seed=0),
     ValueError, r"^estimate_log_likelihood: chunk_size=4611686018427387904 samples per chunk is too large"),
]


if torch.cuda.is_available():  # a real second device where there is one
    CASES += [
        ("kl-cuda-cpu", lambda: F.gaussian_kl(MU.cuda(), LV), ValueError, r"\blogvar\b.*device"),
        ("elbo-cuda-cpu", lambda: F.elbo(RECON, X, MU.cuda(), LV.cuda()), ValueError, r"\bmu\b.*device"),
    ]


@pytest.mark.parametrize("fn,exc,pattern", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_message(fn, exc, pattern):
    with pytest.raises(exc) as info:
        fn()
    assert re.search(pattern, str(info.value)), f"message does not name the argument: {info.value!r}"


def test_numpy_integer_seeds(fused):
    """A numpy integer is a seed (num_samples takes them too), the same as the int of its value."""
    mu, lv, be = MU.to(fused.device), LV.to(fused.device), fused.name
    assert torch.equal(F.rsample(mu, lv, seed=np.int64(5), backend=be), F.rsample(mu, lv, seed=5, backend=be))
    top = F.rsample(mu, lv, seed=np.uint64(2**64 - 1), backend=be)  # the same 64 bits as -1
    assert torch.equal(top, F.rsample(mu, lv, seed=-1, backend=be))


def test_num_samples_beyond_memory_names_num_samples(fused):
    """A z that could be a tensor but cannot be allocated (3.4 PB here, more than any address space):
    the allocator's error, re-raised as its own type, naming num_samples, z's shape and bytes."""
    k = 2**46
    for be in (fused.name, "reference"):
        with pytest.raises(RuntimeError) as info:
            F.rsample(MU.to(fused.device), LV.to(fused.device), num_samples=k, seed=0, backend=be)
        expected = rf"\bnum_samples={k}\b.*\[{k}, {B}, {DZ}\], {k * B * DZ * 4} bytes"
        assert re.search(expected, str(info.value)), info.value
        assert info.value.__cause__ is not None, "the allocator's own error is chained"


def test_env_backend_name_checked(monkeypatch):
    monkeypatch.setenv("FASTELBO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTELBO_BACKEND"):
        F.gaussian_kl(MU, LV)


# ---------------------------------------------------------------------------
# The Bernoulli value check runs in each backend's kernel (validate_x): check it there.
# ---------------------------------------------------------------------------
def _bern_calls(backend, device):
    logits, x = RECON.to(device), (X + 1.0).to(device)
    mu, lv = MU.to(device), LV.to(device)
    return {
        "bernoulli_log_prob": lambda **kw: F.bernoulli_log_prob(logits, x, backend=backend, **kw),
        "elbo": lambda **kw: F.elbo(logits, x, mu, lv, backend=backend, **kw),
        "ELBOLoss": lambda **kw: fastelbo.ELBOLoss(backend=backend, **kw)(logits, x, mu, lv),
    }


@pytest.mark.parametrize("call", ["bernoulli_log_prob", "elbo", "ELBOLoss"])
def test_bernoulli_range_check_and_switches(fused, call, restore_validate_args):
    fn = _bern_calls(fused.name, fused.device)[call]
    with pytest.raises(ValueError, match=r"\bx\b.*\[0, 1\]"):
        fn()
    out = fn(validate_args=False)  # per call
    assert torch.isfinite(torch.as_tensor(out[0] if isinstance(out, tuple) else out)).all()
    fastelbo.set_default_validate_args(False)  # globally, like torch.distributions
    fn()
    with pytest.raises(ValueError, match=r"\bx\b"):
        fn(validate_args=True)  # an explicit True wins over the default
    fastelbo.set_default_validate_args(True)
    with pytest.raises(ValueError, match=r"\bx\b"):
        fn()


def test_bernoulli_range_check_edges(fused):
    """0, 1 and NaN pass the check (NaN propagates); just outside does not."""
    logits = RECON.to(fused.device)
    edge = torch.tensor([[0.0, 1.0, 0.5, float("nan"), 0.0, 1.0]] * B, device=fused.device)
    out = F.bernoulli_log_prob(logits, edge, backend=fused.name)
    assert torch.isnan(out).all()
    for bad in (-1e-6, 1 + 1e-6, float("inf")):
        x = unit(B, DX).to(fused.device)
        x[1, 2] = bad
        with pytest.raises(ValueError, match=r"\bx\b"):
            F.bernoulli_log_prob(logits, x, backend=fused.name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("where", ["body", "second chunk", "row tail"])
def test_bernoulli_range_check_anywhere_in_a_row(fused, dtype, where):
    """A target outside [0, 1] is caught in every part of a row a kernel walks
    separately (whole vectors, a later chunk, the ragged tail), also when NaNs
    sit in the same vector lane before and after it (a NaN must not hide it)."""
    rows, cols = 4, 1037  # two 512-column chunks and a 13-column tail (CPU); odd for every tile
    col = {"body": 37, "second chunk": 600, "row tail": cols - 2}[where]
    logits = torch.randn(rows, cols, dtype=dtype, device=fused.device)
    for bad in (-0.5, 1.5):
        x = unit(rows, cols).to(device=fused.device, dtype=dtype)
        x[2, col] = bad
        for lane_mate in (col - 16, col + 16):  # the same SIMD lane, before and after it
            if lane_mate < cols:
                x[2, lane_mate] = float("nan")
        with pytest.raises(ValueError, match=r"\bx\b.*\[0, 1\]"):
            F.bernoulli_log_prob(logits, x, backend=fused.name)
        with pytest.raises(ValueError, match=r"\bx\b.*\[0, 1\]"):
            F.elbo(logits, x, MU[:1].expand(rows, DZ).to(fused.device, dtype),
                   LV[:1].expand(rows, DZ).to(fused.device, dtype), backend=fused.name)
    x = unit(rows, cols).to(device=fused.device, dtype=dtype)
    x[2, col] = float("nan")
    assert torch.isnan(F.bernoulli_log_prob(logits, x, backend=fused.name)[2])


# ---------------------------------------------------------------------------
# Direct op calls (torch.ops.fastelbo.* / the Triton ops) check their arguments too.
# ---------------------------------------------------------------------------
def test_direct_op_checks(fused):
    ops = _backend.impl(fused.name, torch.device(fused.device))
    d = fused.device
    mu, lv = MU.to(d), LV.to(d)
    seed = torch.tensor(1, device=d)
    calls = [
        (lambda: ops.gaussian_kl(mu, _t(B, DZ + 1, device=d), None, None), r"\blogvar\b"),
        (lambda: ops.gaussian_kl(mu, lv.double(), None, None), r"\blogvar\b"),
        (lambda: ops.rsample(mu, lv, seed, _t(B + 1, DZ, device=d)), r"\beps\b"),
        (lambda: ops.bernoulli_log_prob(RECON.to(d), _t(B, DX + 1, device=d)), r"\bx\b"),
        (lambda: ops.gaussian_log_prob(RECON.to(d), X.to(d), _t(B, DX - 1, device=d)), r"\blogvar\b"),
        (lambda: ops.elbo(X.to(d), RECON.to(d), _t(B + 1, DZ, device=d), _t(B + 1, DZ, device=d), None, None, None,
                          "bernoulli", 1.0), r"\bmu\b"),
        (lambda: ops.elbo(X.to(d), RECON.to(d), mu, lv, None, None, None, "poisson", 1.0), r"likelihood"),
        (lambda: ops.gaussian_kl_backward(_t(B + 1, device=d), mu, lv, None, None, [True] * 4), r"\bgrad\b"),
    ]
    for fn, pattern in calls:
        with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
            fn()
        assert re.search(pattern, str(info.value)), f"message does not name the argument: {info.value!r}"


# ---------------------------------------------------------------------------
# Empty batch: empty results (and gradients), on every backend and through the module.
# ---------------------------------------------------------------------------
def test_empty_batch(fused):
    d = fused.device
    mu = torch.zeros(0, DZ, device=d, requires_grad=True)
    lv = torch.zeros(0, DZ, device=d, requires_grad=True)
    recon = torch.zeros(0, DX, device=d, requires_grad=True)
    x = torch.zeros(0, DX, device=d)
    be = fused.name
    assert F.rsample(mu, lv, backend=be).shape == (0, DZ)
    assert F.rsample(mu, lv, eps=torch.zeros(0, DZ, device=d), backend=be).shape == (0, DZ)
    assert F.gaussian_kl(mu, lv, backend=be).shape == (0,)
    assert F.gaussian_kl(mu, lv, torch.zeros(DZ, device=d), 1.0, backend=be).shape == (0,)
    assert F.bernoulli_log_prob(recon, x, backend=be).shape == (0,)
    assert F.gaussian_log_prob(recon, x, torch.zeros(DX, device=d), backend=be).shape == (0,)
    for likelihood in ("bernoulli", "gaussian"):
        terms = F.elbo(recon, x, mu, lv, likelihood=likelihood, backend=be)
        assert [t.shape for t in terms] == [(0,)] * 3
        none = fastelbo.ELBOLoss(likelihood, reduction="none", backend=be)(recon, x, mu, lv)
        total = fastelbo.ELBOLoss(likelihood, reduction="sum", backend=be)(recon, x, mu, lv)
        mean = fastelbo.ELBOLoss(likelihood, reduction="mean", backend=be)(recon, x, mu, lv)
        assert none.shape == (0,) and total.item() == 0.0
        assert torch.isnan(mean), "the mean over an empty batch is NaN, as torch's own losses give"
        total.backward()
        assert recon.grad.shape == (0, DX) and mu.grad.shape == (0, DZ) and lv.grad.shape == (0, DZ)
