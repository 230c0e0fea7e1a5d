"""torch.func transforms through fastelbo's public API on every fused backend, against the reference
(plain PyTorch, which torch.func runs natively) under the same transform:

  * grad over every differentiable input, jacrev, vmap of the forward, and vmap over grad
    (per-sample gradients) with every input vmapped or only the first one (the others shared:
    their gradients, e.g. of a per-feature [Dx] log-variance, must still be per slice);
  * every op family and its awkward spots: rsample's noise (one seed: the same eps in every slice;
    randomness="different": a seed per slice), K samples, [Dx] parameters the kernels reduce over
    rows, free bits' batch mean (per slice), the Bernoulli range check (on, as by default, for the
    reference too);
  * the vmap rules run, never PyTorch's slow per-slice fallback (switched to an error here);
  * the per-sample gradients of a small VAE equal a loop of plain eager backward passes;
  * a second derivative (grad of grad) raises fastelbo's error instead of returning zeros.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jacrev, vmap

import fastelbo
from helpers import assert_close, generator_for, rand, randn

B, DX, DZ, K, N = 3, 7, 5, 2, 3  # rows per slice, features, samples, vmapped slices


@pytest.fixture(autouse=True)
def vmap_rules_only():
    """Any op without a vmap rule is an error here, not a silent loop over the slices."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(True)


# name -> (input makers (gen -> float64 master tensor of ONE slice), call(backend, *inputs) -> tensor)
CASES = {
    "rsample": ((lambda g: randn((B, DZ), g), lambda g: rand((B, DZ), g, -1, 1)),
                lambda be, mu, lv: fastelbo.rsample(mu, lv, seed=1234, backend=be)),
    "rsample_k": ((lambda g: randn((B, DZ), g), lambda g: rand((B, DZ), g, -1, 1)),
                  lambda be, mu, lv: fastelbo.rsample(mu, lv, num_samples=K, seed=99, backend=be)),
    "rsample_eps": ((lambda g: randn((B, DZ), g), lambda g: rand((B, DZ), g, -1, 1), lambda g: randn((B, DZ), g)),
                    lambda be, mu, lv, eps: fastelbo.rsample(mu, lv, eps=eps, backend=be)),
    "gaussian_kl": ((lambda g: randn((B, DZ), g), lambda g: rand((B, DZ), g, -1, 1), lambda g: randn((DZ,), g),
                     lambda g: rand((DZ,), g, -1, 1)),
                    lambda be, mu, lv, pm, pl: fastelbo.gaussian_kl(mu, lv, pm, pl, backend=be)),
    "bernoulli_log_prob": ((lambda g: randn((B, DX), g, 2.0), lambda g: rand((B, DX), g, 0, 1)),
                           lambda be, logits, x: fastelbo.bernoulli_log_prob(logits, x, backend=be)),
    "gaussian_log_prob": ((lambda g: randn((B, DX), g), lambda g: randn((B, DX), g), lambda g: rand((DX,), g, -1, 1)),
                          lambda be, mean, x, lv: fastelbo.gaussian_log_prob(mean, x, lv, backend=be)),
    "elbo": ((lambda g: rand((B, DX), g, 0, 1), lambda g: randn((B, DX), g, 2.0), lambda g: randn((B, DZ), g),
              lambda g: rand((B, DZ), g, -1, 1)),
             lambda be, x, recon, mu, lv: fastelbo.elbo(recon, x, mu, lv, beta=0.7, backend=be).elbo),
    "elbo_gaussian_k": ((lambda g: randn((B, DX), g), lambda g: randn((K, B, DX), g), lambda g: randn((B, DZ), g),
                         lambda g: rand((B, DZ), g, -1, 1), lambda g: rand((DX,), g, -1, 1),
                         lambda g: randn((DZ,), g)),
                        lambda be, x, recon, mu, lv, obs, pm: _terms(fastelbo.elbo(
                            recon, x, mu, lv, likelihood="gaussian", obs_logvar=obs, prior_mu=pm, beta=0.5,
                            backend=be))),
    "iwae_bound": ((lambda g: randn((B, DX), g), lambda g: randn((K, B, DX), g), lambda g: randn((K, B, DZ), g),
                    lambda g: randn((B, DZ), g), lambda g: rand((B, DZ), g, -1, 1), lambda g: rand((DX,), g, -1, 1)),
                   lambda be, x, recon, z, mu, lv, obs: fastelbo.iwae_bound(
                       recon, x, z, mu, lv, likelihood="gaussian", obs_logvar=obs, backend=be)),
    "free_bits_kl": ((lambda g: randn((B, DZ), g), lambda g: rand((B, DZ), g, -1, 1)),
                     lambda be, mu, lv: fastelbo.free_bits_kl(mu, lv, 0.4, backend=be)),
    "loss_free_bits": ((lambda g: randn((B, DX), g, 2.0), lambda g: rand((B, DX), g, 0, 1), lambda g: randn((B, DZ), g),
                        lambda g: rand((B, DZ), g, -1, 1)),
                       lambda be, recon, x, mu, lv: fastelbo.ELBOLoss(free_bits=0.3, reduction="none", backend=be)(
                           recon, x, mu, lv)),
}


def _terms(t):
    """All three ELBO outputs enter the loss (each has its own upstream gradient)."""
    return t.elbo + 0.3 * t.log_likelihood - 0.2 * t.kl


def _loss(out):
    """A scalar whose upstream gradient is neither 1 nor the same for every value (and O(1), so that
    the 16-bit tolerance, one ulp of the largest gradient, stays small against the gradients)."""
    weights = torch.linspace(-1.5, 1.0, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
    return (out * weights).sum()


def _inputs(name, dtype, device, slices=None):
    gen = generator_for("functorch", name, slices)
    makers = CASES[name][0]
    if slices is None:
        return [m(gen).to(dtype=dtype, device=device) for m in makers]
    return [torch.stack([m(gen) for _ in range(slices)]).to(dtype=dtype, device=device) for m in makers]


def _compare(actual, expected, expected64, what):
    for i, (a, e, e64) in enumerate(zip(actual, expected, expected64)):
        assert_close(a, e, ref64=e64, n=max(B, DX), name=f"{what}[{i}]")


def _both(transform, name, inputs, backend):
    """transform(f) applied to the case on `backend` and on the reference (in the inputs' dtype and,
    for the low-precision rule, in float64)."""
    call = CASES[name][1]
    got = transform(lambda *t: call(backend, *t))(*inputs)
    want = transform(lambda *t: call("reference", *t))(*inputs)
    want64 = transform(lambda *t: call("reference", *t))(*[t.double() for t in inputs])
    as_tuple = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    return as_tuple(got), as_tuple(want), as_tuple(want64)


@pytest.mark.parametrize("name", list(CASES))
def test_grad(fused, name):
    backend, device = fused
    inputs = _inputs(name, torch.float32, device)
    argnums = tuple(range(len(inputs)))
    _compare(*_both(lambda f: grad(lambda *t: _loss(f(*t)), argnums=argnums), name, inputs, backend), f"{name} grad")


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_forward(fused, name):
    backend, device = fused
    inputs = _inputs(name, torch.float32, device, slices=N)
    _compare(*_both(vmap, name, inputs, backend), f"{name} vmap")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("shared", [False, True], ids=["all_vmapped", "first_vmapped"])
@pytest.mark.parametrize("name", list(CASES))
def test_per_sample_grad(fused, name, shared, dtype):
    """vmap(grad(f)): each slice's gradients, as the reference gives them. first_vmapped: only the
    first input has slices; the others are shared, and their gradients still come per slice."""
    backend, device = fused
    batched = _inputs(name, dtype, device, slices=N)
    inputs = [batched[0]] + [t[0] for t in batched[1:]] if shared else batched
    in_dims = tuple(0 if i == 0 or not shared else None for i in range(len(inputs)))
    argnums = tuple(range(len(inputs)))

    def transform(f):
        return vmap(grad(lambda *t: _loss(f(*t)), argnums=argnums), in_dims=in_dims)

    got, want, want64 = _both(transform, name, inputs, backend)
    for g, t, d in zip(got, inputs, in_dims):
        assert g.shape == (t.shape if d == 0 else (N, *t.shape)), f"{name}: a gradient per slice"
    _compare(got, want, want64, f"{name} per-sample grad")


@pytest.mark.parametrize("name", ["rsample_k", "gaussian_log_prob", "elbo_gaussian_k", "iwae_bound"])
def test_vmap_layouts(fused, name):
    """The slices along a middle dimension (in_dims=1), two nested vmaps (per-sample gradients of
    per-group batches), and an empty batch: as the reference gives them."""
    backend, device = fused
    argnums = tuple(range(len(CASES[name][0])))
    per_sample = lambda f: grad(lambda *t: _loss(f(*t)), argnums=argnums)  # noqa: E731
    inner = _inputs(name, torch.float32, device, slices=N)
    middle = [t.movedim(0, 1) for t in inner]
    _compare(*_both(lambda f: vmap(per_sample(f), in_dims=1), name, middle, backend), f"{name} in_dims=1")
    nested = [torch.stack([t, t.flip(0)]) for t in inner]
    _compare(*_both(lambda f: vmap(vmap(per_sample(f))), name, nested, backend), f"{name} nested vmap")
    empty = [t[:, :, :0] if t.dim() == 4 else t[:, :0] if t.dim() == 3 else t for t in inner]
    _compare(*_both(lambda f: vmap(per_sample(f)), name, empty, backend), f"{name} empty batch")


@pytest.mark.parametrize("name", ["gaussian_kl", "elbo", "iwae_bound"])
def test_jacrev(fused, name):
    backend, device = fused
    inputs = _inputs(name, torch.float32, device)
    argnums = (0, len(inputs) - 1)
    _compare(*_both(lambda f: jacrev(f, argnums=argnums), name, inputs, backend), f"{name} jacrev")


def test_rsample_randomness_different_draws_a_seed_per_slice(fused):
    """vmap(randomness="different"): a seed per slice (drawn from the default generator, as the
    reference draws it), so the slices' noise differs; "same": one seed, the same noise."""
    backend, device = fused
    mu = torch.zeros(N, B, DZ, device=device)
    lv = torch.zeros(N, B, DZ, device=device)
    for randomness in ("different", "same"):
        results = []
        for be in (backend, "reference"):
            torch.manual_seed(7)
            results.append(vmap(lambda m, v: fastelbo.rsample(m, v, backend=be), randomness=randomness)(mu, lv))
        got, want = results
        assert_close(got, want, name=f"rsample randomness={randomness}")
        assert (randomness == "same") == bool(torch.equal(got[0], got[1])), randomness


def test_vmap_bernoulli_range_check_still_raises(fused):
    """One slice's x outside [0, 1] fails the call, as it fails that slice's own call (the fused
    kernels check inside the kernel; the reference's Python check sees every slice at once)."""
    backend, device = fused
    logits, x = _inputs("bernoulli_log_prob", torch.float32, device, slices=N)
    x[1, 0, 0] = 1.5
    for be in (backend, "reference"):
        with pytest.raises(ValueError, match="x must lie in"):
            vmap(lambda lg, t: fastelbo.bernoulli_log_prob(lg, t, backend=be))(logits, x)
        with pytest.raises(ValueError, match="x must lie in"):
            vmap(vmap(lambda lg, t: fastelbo.elbo(lg, t, lg[:, :2], lg[:, :2], backend=be).elbo))(
                torch.stack([logits, logits]), torch.stack([x * 0.5, x]))
        vmap(lambda lg, t: fastelbo.bernoulli_log_prob(lg, t, backend=be, validate_args=False))(logits, x)


def _vae(params, x, backend):
    """A tiny VAE loss on one example x [Dx] (per-sample gradients vmap over examples)."""
    x = x.unsqueeze(0)
    mu, lv = (x @ params["enc"]).chunk(2, dim=-1)
    z = fastelbo.rsample(mu, lv, seed=2024, backend=backend)
    recon = torch.tanh(z @ params["dec"])
    return fastelbo.ELBOLoss(likelihood="gaussian", backend=backend)(recon, x, mu, lv, obs_logvar=params["obs"])


def test_per_sample_gradients_of_a_vae_equal_a_loop_of_eager_backward(fused):
    backend, device = fused
    gen = generator_for("functorch vae")
    params = {"enc": randn((DX, 2 * DZ), gen, 0.3), "dec": randn((DZ, DX), gen, 0.3), "obs": rand((DX,), gen, -1, 1)}
    params = {k: v.to(device) for k, v in params.items()}
    xs = randn((5, DX), gen).to(device)
    per_sample = vmap(grad(_vae), in_dims=(None, 0, None))(params, xs, backend)
    reference = vmap(grad(_vae), in_dims=(None, 0, None))(params, xs, "reference")
    for i in range(xs.shape[0]):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        eager = torch.autograd.grad(_vae(leaves, xs[i], backend), list(leaves.values()))
        for (key, got), want in zip(per_sample.items(), eager):
            assert_close(got[i], want, n=DX, name=f"d{key} of example {i} vs eager")
            assert_close(got[i], reference[key][i], n=DX, name=f"d{key} of example {i} vs reference")


def test_second_derivative_raises(fused):
    backend, device = fused
    mu, lv = _inputs("rsample", torch.float32, device)
    first = grad(lambda m: fastelbo.gaussian_kl(m, lv, backend=backend).sum())
    assert_close(first(mu), mu, name="d KL / d mu = mu")  # the first derivative itself is fine
    with pytest.raises(RuntimeError, match="not differentiable"):
        grad(lambda m: first(m).sum())(mu)
