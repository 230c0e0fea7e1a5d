"""The core suite: every op, every fused backend, every dtype, forward values AND
gradients of every differentiable input against fastelbo.reference, with an
upstream gradient that is not 1. Harness: tests/cases.py; tolerances:
tests/helpers.py (TOL).

Shapes are kept small (the same suite runs through the Triton interpreter):
odd sizes, one long row crossing the 512-column chunk, an empty batch;
non-contiguous layouts; extreme values; NaN/inf parity.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastelbo

from cases import (ELBO_SHAPES, ELBO_VARIANTS, OBS, PRIORS, X_SHAPES, Z_SHAPES, Api, _leaves, _sid, _upstream,
                   bernoulli_case, elbo_case, gaussian_case, kl_case, loss_case, rsample_case, run)
from helpers import TOL, dtype_params, generator_for, rand, tree_tensors

DTYPES = dtype_params()
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------
# The parametrized suite.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", Z_SHAPES, ids=_sid)
@pytest.mark.parametrize("mode", ["seed", "eps"])
def test_rsample(fused, dtype, shape, mode):
    case = rsample_case(*shape, mode, generator_for("rsample", shape, mode))
    run(case, fused, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", Z_SHAPES, ids=_sid)
@pytest.mark.parametrize("prior", PRIORS)
def test_gaussian_kl(fused, dtype, shape, prior):
    run(kl_case(*shape, prior, generator_for("kl", shape, prior)), fused, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", X_SHAPES, ids=_sid)
@pytest.mark.parametrize("xkind", ["binary", "continuous"])
def test_bernoulli_log_prob(fused, dtype, shape, xkind):
    run(bernoulli_case(*shape, xkind, generator_for("bern", shape, xkind)), fused, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", X_SHAPES, ids=_sid)
@pytest.mark.parametrize("obs", OBS)
def test_gaussian_log_prob(fused, dtype, shape, obs):
    run(gaussian_case(*shape, obs, generator_for("gauss", shape, obs)), fused, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ELBO_SHAPES, ids=_sid)
@pytest.mark.parametrize("variant", ELBO_VARIANTS, ids=lambda v: f"{v[0]}-obs_{v[1]}-prior_{v[2]}-beta{v[3]}")
def test_elbo(fused, dtype, shape, variant):
    run(elbo_case(*shape, *variant, generator_for("elbo", shape, variant)), fused, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7, 5), (4, 785, 17), (0, 7, 5)], ids=_sid)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_elbo_loss(fused, dtype, shape, likelihood, reduction):
    # (B = 0 with reduction "mean" is NaN, as in the reference: the parity check covers it)
    run(loss_case(*shape, likelihood, reduction, generator_for("loss", shape, likelihood, reduction)), fused, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elbo_loss_reduction_is_that_of_the_rows(fused, dtype):
    """ELBOLoss reduces the fused op's per-row ELBO exactly as torch reduces -elbo (bit for bit):
    float16/bfloat16 means accumulate in float32 (a float16 sum of 4096 rows of ~18 nats overflows)."""
    from fastelbo import functional as F

    gen = generator_for("loss_reduction")
    B, Dx, Dz = 4096, 20, 3
    x = torch.rand(B, Dx, generator=gen).to(dtype).to(fused.device)
    recon = torch.randn(B, Dx, generator=gen).to(dtype).to(fused.device)
    mu, lv = (torch.randn(B, Dz, generator=gen).to(dtype).to(fused.device) for _ in range(2))
    rows = F.elbo(recon, x, mu, lv, backend=fused.name).elbo
    for reduction, reduce in (("mean", torch.mean), ("sum", torch.sum), ("none", lambda t: t)):
        loss = fastelbo.ELBOLoss(reduction=reduction, backend=fused.name)(recon, x, mu, lv)
        assert torch.equal(loss, reduce(-rows)), (reduction, loss, reduce(-rows))


def test_elbo_single_output_grads(fused):
    """Only one of the three outputs feeds the loss: the other upstream gradients are None."""
    for k in range(3):
        case = elbo_case(4, 9, 3, "gaussian", "vec", "vec", 0.8, generator_for("single", k))
        call = case.call
        case.call = lambda api, t, call=call, k=k: call(api, t)[k]
        case.n_out = (case.n_out[k],)
        case.unused_ok = True  # e.g. mu does not reach the log-likelihood: zero gradient on both sides
        run(case, fused, torch.float64)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")])
def test_bernoulli_confident_binary_targets_relative_accuracy(fused, dtype):
    """x = 1 with l >> 0 (and x = 0 with l << 0), what a trained VAE on binarized data sees most: the
    log-likelihood is -log1p(e^-|l|), tiny, and must be accurate RELATIVE to itself, as torch's
    binary_cross_entropy_with_logits is. The form x*l - softplus(l) cancels x*l against max(l, 0)
    and loses every digit (relative error up to 100%) here."""
    from fastelbo import functional as F

    logits = torch.cat([torch.linspace(3, 25, 48), -torch.linspace(3, 25, 48)]).to(dtype).reshape(-1, 1)
    x = (logits > 0).to(dtype)
    # Exact here: log sigmoid(|l|) = -log1p(e^-|l|). (Not the reference: torch's form (1 - x) l - log_sigmoid(l)
    # itself cancels for x = 0, l << 0, 7e-5 relative error at l = -24.5 even in float64.)
    truth = -torch.log1p(torch.exp(-logits.double().abs())).reshape(-1)
    dev, be = fused.device, fused.name
    results = {
        "bernoulli_log_prob": F.bernoulli_log_prob(logits.to(dev), x.to(dev), backend=be),
        "elbo": F.elbo(logits.to(dev), x.to(dev), torch.zeros(96, 1, dtype=dtype, device=dev),
                       torch.zeros(96, 1, dtype=dtype, device=dev), backend=be).log_likelihood,
    }
    rtol = TOL[dtype].rtol
    for name, out in results.items():
        rel = ((out.cpu().double() - truth) / truth).abs()
        k = int(rel.argmax())
        assert rel[k] <= rtol, (f"{name}: relative error {rel[k]:.2e} > {rtol:.0e} at logit {logits[k, 0].item()}, "
                                f"x = {x[k, 0].item()}: {out[k].item()!r} vs {truth[k].item()!r}")


# ---------------------------------------------------------------------------
# Non-contiguous inputs: transposed dense, column slice (row stride), stride-2 columns.
# ---------------------------------------------------------------------------
LAYOUT_SHAPE = (3, 600, 17)  # (B, Dx, Dz): Dx crosses a 512-column chunk


def _layout_cases(gen):
    B, Dx, Dz = LAYOUT_SHAPE
    return {
        "rsample_seed": rsample_case(B, Dz, "seed", gen),
        "rsample_eps": rsample_case(B, Dz, "eps", gen),
        "kl_full_prior": kl_case(B, Dz, "full", gen),
        "bernoulli": bernoulli_case(B, Dx, "continuous", gen),
        "gaussian_full": gaussian_case(B, Dx, "full", gen),
        "elbo_gaussian": elbo_case(B, Dx, Dz, "gaussian", "full", "full", 0.37, gen),
        "elbo_bernoulli": elbo_case(B, Dx, Dz, "bernoulli", None, "row", 1.3, gen),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "colslice", "stride2", "mixed"])
@pytest.mark.parametrize("op", list(_layout_cases(generator_for(0))))
def test_layouts(fused, dtype, layout, op):
    case = _layout_cases(generator_for("layout", op))[op]
    cycle = ["transposed", "colslice", "stride2", "contiguous"]
    for k, (name, t) in enumerate(case.tensors.items()):
        if t.dim() == 2 and t.shape[0] > 1:
            case.layout[name] = cycle[k % 4] if layout == "mixed" else layout
    T, _, _ = run(case, fused, dtype)
    if layout != "mixed":  # the layout really reached the op
        assert any(not t.is_contiguous() for t in T.values())


# ---------------------------------------------------------------------------
# Extreme finite values: logits +-1e4, logvar +-80. Results are finite wherever
# the reference's are (the parity check of assert_close) and accurate.
# ---------------------------------------------------------------------------
def _extreme(shape, gen, values):
    """A tensor of the given shape whose entries are drawn from `values` (a list of floats)."""
    v = torch.tensor(values, dtype=torch.float64)
    return v[torch.randint(0, len(values), shape, generator=gen)]


LOGITS_X = [-1e4, 1e4, -30.0, 30.0, -1e-3, 0.0, 2.5]
LOGVARS_X = [-80.0, 80.0, -20.0, 20.0, 0.0, -1.5]


def _extreme_cases(gen):
    B, Dx, Dz = 6, 37, 5
    cases = {}
    c = bernoulli_case(B, Dx, "binary", gen)
    c.tensors["logits"] = _extreme((B, Dx), gen, LOGITS_X)
    cases["bernoulli_binary"] = c
    c = bernoulli_case(B, Dx, "continuous", gen)
    c.tensors["logits"] = _extreme((B, Dx), gen, LOGITS_X)
    cases["bernoulli_continuous"] = c
    c = gaussian_case(B, Dx, "full", gen)
    c.tensors["s"] = _extreme((B, Dx), gen, LOGVARS_X)
    c.tensors["x"] = c.tensors["mean"] + rand((B, Dx), gen, -1, 1, dtype=torch.float64)
    cases["gaussian"] = c
    c = kl_case(B, Dz, "none", gen)
    c.tensors["logvar"] = _extreme((B, Dz), gen, LOGVARS_X)
    cases["kl_std"] = c
    c = kl_case(B, Dz, "full", gen)
    c.tensors["logvar"] = _extreme((B, Dz), gen, LOGVARS_X)
    c.tensors["prior_logvar"] = c.tensors["logvar"] + _extreme((B, Dz), gen, [0.0, 1.0, -1.0, 10.0])
    cases["kl_prior_same_scale"] = c
    c = kl_case(B, Dz, "full", gen)
    c.tensors["logvar"] = _extreme((B, Dz), gen, LOGVARS_X)
    c.tensors["prior_logvar"] = _extreme((B, Dz), gen, [-80.0, 80.0, 0.0])
    cases["kl_prior_extreme"] = c
    c = rsample_case(B, Dz, "eps", gen)
    c.tensors["logvar"] = _extreme((B, Dz), gen, LOGVARS_X)
    cases["rsample_eps"] = c
    c = rsample_case(B, Dz, "seed", gen)
    c.tensors["logvar"] = _extreme((B, Dz), gen, LOGVARS_X)
    cases["rsample_seed"] = c
    c = elbo_case(B, Dx, Dz, "bernoulli", None, "none", 1.0, gen)
    c.tensors["recon"] = _extreme((B, Dx), gen, LOGITS_X)
    c.tensors["logvar"] = _extreme((B, Dz), gen, LOGVARS_X)
    cases["elbo_bernoulli"] = c
    c = elbo_case(B, Dx, Dz, "gaussian", "full", "vec", 0.5, gen)
    c.tensors["s"] = _extreme((B, Dx), gen, LOGVARS_X)
    c.tensors["x"] = c.tensors["recon"] + rand((B, Dx), gen, -1, 1, dtype=torch.float64)
    cases["elbo_gaussian"] = c
    return cases


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow warnings of the Triton interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(_extreme_cases(generator_for(0))))
def test_extreme_values(fused, dtype, op):
    case = _extreme_cases(generator_for("extreme", op))[op]
    _, outs, _ = run(case, fused, dtype, overflow_ok=True)
    if dtype in (torch.float32, torch.float64, torch.bfloat16) and not op.startswith(("kl_prior_extreme",)):
        # these inputs are chosen so that every result fits float32: all must be finite
        for k, o in enumerate(outs):
            assert torch.isfinite(o).all(), f"output {k} of {op} has non-finite values: {o}"


# Log-variances beyond the range of the scale e^(lv/2) and of its square, which torch.distributions'
# kl_divergence forms (float32: below about -104 the square underflows and its KL is inf): the KL is
# finite, about -lv/2, and d/dlogvar -1/2, on every backend and in the reference. (Row sums stay
# within float16's range.)
KL_LOGVARS_BEYOND = {
    torch.float32: [-300.0, -120.0, -104.5, -90.0, 0.5, -1.5],
    torch.float64: [-1500.0, -800.0, -746.0, -120.0, 0.5],
    torch.float16: [-20000.0, -120.0, -20.0, 0.5],
    torch.bfloat16: [-10000.0, -200.0, -120.0, 0.5],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior", ["none", "full"])
def test_kl_logvar_beyond_the_scale_range(fused, dtype, prior):
    case = kl_case(6, 5, prior, generator_for("kl_beyond", prior))
    case.tensors["logvar"] = _extreme((6, 5), generator_for("kl_beyond_values", prior), KL_LOGVARS_BEYOND[dtype])
    _, outs, grads = run(case, fused, dtype)
    assert torch.isfinite(outs[0]).all(), outs[0]
    assert all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------
# NaN / inf: propagate exactly as in the reference, never silently become numbers.
# ---------------------------------------------------------------------------
def _nan_cases(gen):
    B, Dx, Dz = 4, 9, 5
    return {
        "rsample_eps": rsample_case(B, Dz, "eps", gen),
        "rsample_seed": rsample_case(B, Dz, "seed", gen),
        "kl_std": kl_case(B, Dz, "none", gen),
        "kl_prior": kl_case(B, Dz, "full", gen),
        "bernoulli": bernoulli_case(B, Dx, "continuous", gen),
        "gaussian": gaussian_case(B, Dx, "full", gen),
        "elbo_bernoulli": elbo_case(B, Dx, Dz, "bernoulli", None, "full", 0.7, gen),
        "elbo_gaussian": elbo_case(B, Dx, Dz, "gaussian", "full", "full", 0.7, gen),
    }


def _nan_params():
    params = []
    for op, case in _nan_cases(generator_for(0)).items():
        for name, t in case.tensors.items():
            if t.dim() == 2:
                params.append(pytest.param(op, name, id=f"{op}-{name}"))
    return params


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow/invalid warnings of the Triton interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,target", _nan_params())
def test_nan_inf_propagation(fused, dtype, op, target):
    """Row 0 gets a NaN, row 1 +inf, row 2 -inf in one input; row 3 stays finite.

    Forward values: exact NaN/+inf/-inf parity. Gradients: exact parity everywhere
    except at the positions of the infinite inputs themselves, where the kernels'
    closed forms give the finite limit (e.g. d KL / d logvar -> -g/2 as logvar -> -inf)
    and autograd through torch.distributions gives NaN (exp(-inf) = 0 in a division).
    NaN inputs: exact parity in every gradient.
    """
    case = _nan_cases(generator_for("nan", op, target))[op]
    t = case.tensors[target].clone()
    t[0, 1], t[1, 0], t[2, t.shape[1] - 1] = NAN, INF, -INF
    case.tensors[target] = t
    infinite = torch.isinf(t)
    with validation(target != "x"):  # x = +-inf is outside [0, 1]: the Bernoulli value check would (rightly) refuse it
        _, outs, _ = run(case, fused, dtype, ignore={target: infinite})
    for k, o in enumerate(outs):
        untouched = o[3]
        assert torch.isfinite(untouched).all(), f"output {k}: the untouched row 3 must stay finite, got {untouched}"


@contextlib.contextmanager
def validation(enabled: bool):
    from fastelbo import _validate

    old = _validate._VALIDATE_ARGS
    _validate._VALIDATE_ARGS = enabled
    try:
        yield
    finally:
        _validate._VALIDATE_ARGS = old


# ---------------------------------------------------------------------------
# Outputs are fresh contiguous tensors; no op writes into its inputs.
# ---------------------------------------------------------------------------
def _storage_ptr(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("op", list(_layout_cases(generator_for(0))))
def test_no_input_mutation_fresh_outputs(fused, op):
    case = _layout_cases(generator_for("mut", op))[op]
    case.layout = {n: "colslice" for n, t in case.tensors.items() if t.dim() == 2}
    T = _leaves(case, torch.float32, fused.device, True, False)
    before = {n: t.detach().clone() for n, t in T.items()}
    outs = tree_tensors(case.call(Api(fused.name), T))
    ups = [u.float().to(fused.device) for u in _upstream(outs, generator_for("mut-up", op))]
    up_before = [u.clone() for u in ups]
    grads = torch.autograd.grad(outs, [T[n] for n in case.diff], ups)
    in_ptrs = {_storage_ptr(t) for t in T.values()} | {_storage_ptr(u) for u in ups}
    for n, t in T.items():
        assert torch.equal(t.detach(), before[n]), f"{op} wrote into its input {n}"
    for u, ub in zip(ups, up_before):
        assert torch.equal(u, ub), f"{op} wrote into the upstream gradient"
    for k, o in enumerate(outs):
        assert o.is_contiguous(), f"output {k} of {op} is not contiguous"
        assert _storage_ptr(o) not in in_ptrs, f"output {k} of {op} aliases an input"
    for name, g in zip(case.diff, grads):
        if op.startswith("rsample") and name == "mu":
            continue  # dz/dmu = 1: autograd passes the upstream gradient through, as torch's own add does
        assert _storage_ptr(g) not in in_ptrs, f"gradient of {name} ({op}) aliases an input"
        assert not torch.isnan(g).any(), f"gradient of {name} ({op}) read the NaN padding around a column slice"
