"""fastelbo.DiagonalGaussian against diffusers' DiagonalGaussianDistribution (values and gradients, every
fused backend, 4-D and 5-D latents, contiguous and channels_last), and its sample() against fastelbo's
noise contract (the reference on the same Philox stream; statistics; determinism; gradients)."""

from __future__ import annotations

import math

import pytest
import torch

import fastelbo
from fastelbo import reference as R
from fastelbo._rows import rows_for
from helpers import LOW_PRECISION, assert_close, dtype_params, generator_for, rand, randn


@pytest.fixture(scope="module")
def diffusers_cls():
    mod = pytest.importorskip("diffusers.models.autoencoders.vae",
                              reason="diffusers is not installed (pip install 'fastelbo[compat]'): the comparison "
                                     "with its DiagonalGaussianDistribution cannot run")
    return mod.DiagonalGaussianDistribution


FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
SHAPES = {4: (3, 6, 5, 4), 5: (2, 4, 3, 2, 3)}  # [B, 2C, H, W], [B, 2C, T, H, W]; odd sizes


def _parameters(shape, gen, extremes: bool):
    """[mean; logvar] on dim 1, float64; logvar in [-3, 2], with values the clamp cuts when `extremes`."""
    c = shape[1] // 2
    p = torch.cat([randn((shape[0], c, *shape[2:]), gen), rand((shape[0], c, *shape[2:]), gen, -3, 2,
                                                                 dtype=torch.float64)], 1)
    if extremes:  # beyond the clamp on both sides, and at its edges (the clamp's gradient passes there)
        p[0, c, 0, 0] = 24.0
        p[-1, -1, -1, -1] = -33.0
        p[0, c + 1, 0, 0] = 20.0
        p[-1, c, 0, 0] = -30.0
    return p


def _in_layout(t, layout):
    return t.contiguous(memory_format=FORMATS[t.dim()]) if layout == "channels_last" else t.contiguous()


def _call(cls, method, tensors, **kw):
    """method's result from `cls` built on `tensors` (its parameters, the other's, the sample)."""
    d = cls(tensors["p"], **kw)
    if method == "kl":
        return d.kl()
    if method == "kl_other":
        return d.kl(cls(tensors["q"], **kw))
    if method == "nll":
        return d.nll(tensors["s"])
    if method == "nll_dims":
        return d.nll(tensors["s"], dims=[1, -1])
    raise ValueError(method)


def _forward_backward(cls, method, masters, dtype, device, layout, upstream_seed, upcast=False, **kw):
    tensors = {}
    for name, m in masters.items():
        t = m.to(dtype)
        t = (t.double() if upcast else t).to(device)
        tensors[name] = _in_layout(t, layout).requires_grad_(True)
    out = _call(cls, method, tensors, **kw)
    g = randn(out.shape, torch.Generator().manual_seed(upstream_seed)).to(dtype).to(out.dtype).to(device)
    grads = torch.autograd.grad(out, list(tensors.values()), g)
    return out, dict(zip(tensors, grads))


METHODS = ["kl", "kl_other", "nll", "nll_dims"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ndim", [4, 5])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", dtype_params())
def test_matches_diffusers(diffusers_cls, fused, dtype, method, ndim, layout):
    """Every method's value and the gradients of every input tensor, against diffusers' class in the same
    dtype (and, for float16 / bfloat16, on the inputs upcast to float64: helpers' 2x rule)."""
    gen = generator_for("posterior", method, ndim, layout)
    shape = SHAPES[ndim]
    low = dtype in LOW_PRECISION  # exp(20) overflows float16: the clamp's edges are tested in float32 / float64
    masters = {"p": _parameters(shape, gen, extremes=not low)}
    if method == "kl_other":
        masters["q"] = _parameters(shape, gen, extremes=False)
    if method.startswith("nll"):
        masters["s"] = randn((shape[0], shape[1] // 2, *shape[2:]), gen)
    out, grads = _forward_backward(fastelbo.DiagonalGaussian, method, masters, dtype, fused.device, layout, 7,
                                   backend=fused.name)
    ref, ref_grads = _forward_backward(diffusers_cls, method, masters, dtype, "cpu", layout, 7)
    ref64, ref64_grads = None, dict.fromkeys(ref_grads)
    if low:
        ref64, ref64_grads = _forward_backward(diffusers_cls, method, masters, dtype, "cpu", layout, 7, upcast=True)
        ref64, ref64_grads = ref64.detach(), {k: g for k, g in ref64_grads.items()}
    c = shape[1] // 2
    summed = c * shape[-1] if method == "nll_dims" else c * shape[2] * shape[3]  # dims [1, -1] or [1, 2, 3]
    assert out.shape == ref.shape
    assert_close(out, ref.detach(), ref64=ref64, n=summed, name=f"{method}")
    for name, g in grads.items():
        assert_close(g, ref_grads[name], ref64=ref64_grads[name], name=f"grad of {name}")


def test_attributes_match_diffusers(diffusers_cls):
    """mean, logvar (clamped, with the clamp's gradient), std, var, mode(), deterministic, parameters."""
    p = _parameters(SHAPES[4], generator_for("attrs"), extremes=True).requires_grad_(True)
    a, b = fastelbo.DiagonalGaussian(p), diffusers_cls(p)
    assert a.parameters is p
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        ga, = torch.autograd.grad(getattr(a, name).sum(), p, retain_graph=True)
        gb, = torch.autograd.grad(getattr(b, name).sum(), p, retain_graph=True)
        assert torch.equal(ga, gb), f"grad of {name}"
    c = SHAPES[4][1] // 2
    g, = torch.autograd.grad(a.logvar.sum(), p)
    assert g[0, c, 0, 0] == 0 and g[-1, -1, -1, -1] == 0  # clamped away: no gradient
    assert g[0, c + 1, 0, 0] == 1 and g[-1, c, 0, 0] == 1  # at the clamp's edges: torch.clamp passes it
    assert a.mode() is a.mean and torch.equal(a.mode(), b.mode())
    assert a.deterministic is False


def test_deterministic_matches_diffusers(diffusers_cls):
    p = _parameters(SHAPES[4], generator_for("det"), extremes=False).requires_grad_(True)
    a, b = fastelbo.DiagonalGaussian(p, deterministic=True), diffusers_cls(p, deterministic=True)
    assert torch.equal(a.std, b.std) and torch.equal(a.var, b.var) and not a.std.any()
    z = a.sample()
    assert torch.equal(z, b.sample())  # mean + 0 * noise: the mean, whatever the noise
    g, = torch.autograd.grad(z.sum(), p)
    gb, = torch.autograd.grad(b.sample().sum(), p)
    assert torch.equal(g, gb)
    s = torch.randn_like(a.mean)
    for mine, theirs in ((a.kl(), b.kl()), (a.kl(a), b.kl(b)), (a.nll(s), b.nll(s))):
        # diffusers returns a CPU float32 tensor([0.]); here a zero of the parameters' dtype and device.
        assert mine.shape == theirs.shape == (1,) and mine.dtype == p.dtype and torch.equal(mine.float(), theirs)


# ---------------------------------------------------------------------------
# sample(): fastelbo's noise, not torch.randn's.
# ---------------------------------------------------------------------------
def _memory_rows(t):
    return rows_for(t, tuple(range(1, t.dim())))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", dtype_params())
def test_sample_is_reference_rsample(fused, dtype, layout):
    """sample(generator) is fastelbo.rsample keyed by one seed from the generator, over the latent read in
    memory order: the reference on that stream gives the same z and the same gradients."""
    p64 = _parameters(SHAPES[4], generator_for("sample", layout), extremes=dtype not in LOW_PRECISION)
    p = _in_layout(p64.to(dtype).to(fused.device), layout).requires_grad_(True)
    d = fastelbo.DiagonalGaussian(p, backend=fused.name)
    g = torch.Generator(device=fused.device).manual_seed(11)
    seed = torch.randint(0, 2**63 - 1, (), generator=torch.Generator(device=fused.device).manual_seed(11))
    z = d.sample(g)
    assert z.shape == d.mean.shape and z.dtype == dtype
    assert z.is_contiguous(memory_format=FORMATS[4]) == (layout == "channels_last")

    up = randn(z.shape, generator_for("up")).to(dtype)
    gz, = torch.autograd.grad(z, p, up.to(fused.device))
    zr, gr = _reference_sample(p64.to(dtype), layout, int(seed), up)
    zr64, gr64 = _reference_sample(p64.to(dtype).double(), layout, int(seed), up.double()) if (
        dtype in LOW_PRECISION) else (None, None)
    assert_close(z, zr, ref64=zr64, name="z")
    assert_close(gz, gr, ref64=gr64, name="grad of parameters")


def _reference_sample(p, layout, seed, up):
    """z and the gradient of <z, up> w.r.t. the parameters, written out with torch and fastelbo.reference."""
    p = _in_layout(p, layout).requires_grad_(True)
    mean, logvar = torch.chunk(p, 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    rows = _memory_rows(mean)
    z = rows.back(R.rsample(rows.of(mean), rows.of(logvar), seed=seed), mean.shape)
    g, = torch.autograd.grad(z, p, up)
    return z.detach(), g


def test_sample_is_reproducible_and_moves_the_generator(fused):
    p = _parameters(SHAPES[4], generator_for("repro"), extremes=False).float().to(fused.device)
    d = fastelbo.DiagonalGaussian(p, backend=fused.name)
    g = torch.Generator(device=fused.device).manual_seed(3)
    z1, z2 = d.sample(g), d.sample(g)
    assert not torch.equal(z1, z2)  # each call takes a new seed from the generator
    g.manual_seed(3)
    assert torch.equal(d.sample(g), z1)
    torch.manual_seed(5)
    z3 = d.sample()
    torch.manual_seed(5)
    assert torch.equal(d.sample(), z3)  # the default generator: torch.manual_seed reproduces it


def test_sample_generator_list(fused):
    """A list of B generators (diffusers' per-image generators): sample i is drawn from generator i alone."""
    p = _parameters(SHAPES[4], generator_for("list"), extremes=False).float().to(fused.device)
    d = fastelbo.DiagonalGaussian(p, backend=fused.name)
    gens = [torch.Generator(device=fused.device).manual_seed(i) for i in range(p.shape[0])]
    z = d.sample(gens)
    for i in range(p.shape[0]):
        one = fastelbo.DiagonalGaussian(p[i:i + 1], backend=fused.name)
        assert torch.equal(z[i:i + 1], one.sample(torch.Generator(device=fused.device).manual_seed(i)))
    with pytest.raises(ValueError, match="list of 2 generators for a batch of 3"):
        d.sample(gens[:2])


def test_sample_statistics(fused):
    """(z - mean) / std is N(0, 1): its mean and variance over 2 x 4 x 32 x 32 = 8192 draws lie within 5
    standard errors (a failure by chance: about 1 in 1.7 million per statistic)."""
    gen = generator_for("stats")
    shape = (2, 8, 32, 32)
    p = _parameters(shape, gen, extremes=False).float().to(fused.device)
    d = fastelbo.DiagonalGaussian(p, backend=fused.name)
    eps = ((d.sample(torch.Generator(device=fused.device).manual_seed(1)) - d.mean) / d.std).double()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n)
    # and independent of the mean and std it is scaled by: no correlation with the logvar
    lv = d.logvar.double().flatten()
    corr = torch.corrcoef(torch.stack([eps.flatten().abs(), lv]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(n)


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------
def test_bad_input():
    p = torch.randn(2, 6, 3, 3)
    with pytest.raises(TypeError, match="parameters must be a torch.Tensor"):
        fastelbo.DiagonalGaussian(p.numpy())
    with pytest.raises(TypeError, match="floating-point"):
        fastelbo.DiagonalGaussian(p.long())
    with pytest.raises(ValueError, match=r"even size; got shape \(2, 5, 3, 3\)"):
        fastelbo.DiagonalGaussian(p[:, :5])
    with pytest.raises(ValueError, match=r"\[B, 2C, \.\.\.\]"):
        fastelbo.DiagonalGaussian(torch.randn(4))
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        fastelbo.DiagonalGaussian(p, deterministic=1)
    d = fastelbo.DiagonalGaussian(p)
    with pytest.raises(ValueError, match=r"4-D or larger mean; got shape \(2, 3, 9\)"):
        fastelbo.DiagonalGaussian(p.flatten(2)).kl()
    with pytest.raises(ValueError, match=r"other's mean \(2, 3, 3, 2\).*this mean's shape \(2, 3, 3, 3\)"):
        d.kl(fastelbo.DiagonalGaussian(p[..., :2]))
    with pytest.raises(ValueError, match="point mass"):
        d.kl(fastelbo.DiagonalGaussian(p, deterministic=True))
    with pytest.raises(TypeError, match="other must be a DiagonalGaussian"):
        d.kl(p)
    with pytest.raises(ValueError, match=r"sample has shape \(2, 3, 3\); expected the mean's \(2, 3, 3, 3\)"):
        d.nll(torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="dim 4 is out of range for a 4-D tensor"):
        d.nll(d.mean, dims=[1, 4])
    with pytest.raises(ValueError, match="names a dim twice"):
        d.nll(d.mean, dims=[1, -3])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        d.sample(3)
