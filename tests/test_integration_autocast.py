"""fastelbo under torch.autocast (CPU bfloat16 here; CUDA float16/bfloat16 where present).

Policy (fastelbo/_autocast.py, docs/training.md): inside autocast every
fastelbo op casts its float16/bfloat16/float32 inputs to float32 and returns
float32, like PyTorch's own losses; the public API accepts the dtype mix that
autocast produces (bfloat16 recon from a Linear, float32 data x).

Tolerances, on the tensors the autocast region produced:
  * fastelbo vs the float64 reference on the same inputs: the float32 rule of
    helpers.TOL (the cast to float32 is exact, the kernels run in float32);
  * fastelbo vs the reference under the same autocast: the reference computes
    the KL in bfloat16, so they differ by its rounding, at most 2**-8 (half a
    bfloat16 ulp) of max(1, max |ELBO|);
  * gradients (bfloat16, as the autocast inputs): the low-precision 2x rule of
    helpers.assert_close against the reference under autocast.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import fastelbo
from fastelbo import reference

B, DX, DZ = 16, 40, 6

DEVICES = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")]
if torch.cuda.is_available():
    DEVICES += [pytest.param("cuda", torch.float16, id="cuda-f16"), pytest.param("cuda", torch.bfloat16,
                                                                                   id="cuda-bf16")]


def _vae(device):
    torch.manual_seed(0)
    return torch.nn.Linear(DX, 2 * DZ).to(device), torch.nn.Linear(DZ, DX).to(device)


def _autocast_inputs(device, dtype, likelihood):
    """recon, mu, logvar as an autocast region makes them (low dtype) and x as data (float32)."""
    enc, dec = _vae(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(B, DX, generator=gen) if likelihood == "bernoulli" else torch.randn(B, DX, generator=gen)
    x = x.to(device)
    with torch.autocast(device, dtype=dtype):
        mu, logvar = enc(x).chunk(2, dim=-1)
        recon = dec(fastelbo.rsample(mu, logvar, seed=7))
    assert recon.dtype == mu.dtype == dtype and x.dtype == torch.float32
    return x, recon.detach(), mu.detach(), logvar.detach()


def _skip_without_autocast_rule(fused):
    op = {"triton": "fastelbo::triton_elbo", "cuda-emulated": "fastelbo::emu_elbo"}.get(fused.name, "fastelbo::elbo")
    key = "Autocast" + ("CUDA" if fused.device == "cuda" else "CPU")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key):
        pytest.xfail(f"{op} has no {key} rule: its backend must call fastelbo._autocast.register() for each of "
                     "its forward ops")


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("device,dtype", DEVICES)
def test_loss_under_autocast_matches_reference(fused, device, dtype, likelihood):
    if fused.device != device:
        pytest.skip(f"backend {fused.name} runs on {fused.device}, this case on {device}")
    _skip_without_autocast_rule(fused)
    x, recon, mu, logvar = _autocast_inputs(device, dtype, likelihood)
    # A learned per-feature observation log-variance stays a float32 parameter under autocast.
    obs_logvar = torch.linspace(-0.5, 0.5, DX, device=device) if likelihood == "gaussian" else None
    leaves = [t.clone().requires_grad_() for t in (recon, mu, logvar)]
    kwargs = dict(likelihood=likelihood, obs_logvar=obs_logvar)
    with torch.autocast(device, dtype=dtype):
        fused_out = fastelbo.elbo(leaves[0], x, *leaves[1:], backend=fused.name, **kwargs).elbo
        ref_out = reference.elbo(leaves[0], x, *leaves[1:], **kwargs).elbo
    assert fused_out.dtype == torch.float32, "autocast runs fastelbo's ops in float32, like torch's losses"

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    obs64 = None if obs_logvar is None else obs_logvar.double()
    truth = reference.elbo(leaves64[0], x.double(), *leaves64[1:], likelihood=likelihood, obs_logvar=obs64).elbo

    assert_close(fused_out, truth.float(), n=DX, name="elbo under autocast vs float64")
    scale = max(1.0, truth.abs().max().item())
    gap = (fused_out.double() - ref_out.double()).abs().max().item()
    assert gap <= 2.0**-8 * scale, f"elbo: fused vs reference under autocast differ by {gap:.3e} > {2**-8 * scale:.3e}"

    upstream = torch.linspace(0.5, 2.0, B, device=device)
    grads = torch.autograd.grad(fused_out, leaves, upstream)
    ref_grads = torch.autograd.grad(ref_out, leaves, upstream)
    truth_grads = torch.autograd.grad(truth, leaves64, upstream.double())
    for name, g, rg, tg in zip(("d recon", "d mu", "d logvar"), grads, ref_grads, truth_grads):
        assert g.dtype == dtype, f"{name}: the gradient of an autocast input comes back in its dtype"
        assert_close(g, rg, ref64=tg, n=1, name=f"{name} under autocast")


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_training_step_under_autocast(device, dtype):
    """A user's step: ELBOLoss on an autocast VAE raises nothing and gives the reference's parameter gradients."""
    enc, dec = _vae(device)
    x = torch.rand(B, DX, generator=torch.Generator().manual_seed(2)).to(device)
    grads = {}
    for impl in ("fused", "reference"):
        enc.zero_grad(), dec.zero_grad()
        with torch.autocast(device, dtype=dtype):
            mu, logvar = enc(x).chunk(2, dim=-1)
            if impl == "fused":
                z = fastelbo.rsample(mu, logvar, seed=3)
                loss = fastelbo.ELBOLoss()(dec(z), x, mu, logvar)
            else:
                z = reference.rsample(mu, logvar, seed=3)
                loss = -reference.elbo(dec(z), x, mu, logvar).elbo.mean()
        assert loss.dtype == torch.float32
        if impl == "fused":
            assert z.dtype == torch.float32
        loss.backward()
        grads[impl] = [p.grad.clone() for p in (*enc.parameters(), *dec.parameters())]
    for g, rg in zip(grads["fused"], grads["reference"]):
        # Both paths round activations to bfloat16 (z, recon); they differ by a few bfloat16 ulps normwise.
        err = (g - rg).norm() / rg.norm().clamp_min(1e-12)
        assert err < 3e-2, f"parameter gradient differs from the reference under autocast by {err:.2e} (normwise)"


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_rsample_under_autocast(device, dtype):
    gen = torch.Generator().manual_seed(4)
    mu = torch.randn(B, DZ, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    logvar = torch.randn(B, DZ, generator=gen).to(device).requires_grad_()  # float32, e.g. a learned parameter
    eps = torch.randn(B, DZ, generator=gen).to(device)
    with torch.autocast(device, dtype=dtype):
        z_seed = fastelbo.rsample(mu, logvar, seed=11)
        z_eps = fastelbo.rsample(mu, logvar, eps=eps)
    for z, ref in ((z_seed, reference.rsample(mu.float(), logvar, seed=11)),
                   (z_eps, reference.rsample(mu.float(), logvar, eps=eps))):
        assert z.dtype == torch.float32
        assert_close(z, ref, name="z under autocast")
    z_seed.sum().backward()
    assert mu.grad.dtype == dtype and logvar.grad.dtype == torch.float32


def test_mixed_dtypes_still_refused_outside_autocast_and_with_float64():
    x = torch.rand(B, DX)
    recon, mu, logvar = (torch.randn(B, d, dtype=torch.bfloat16) for d in (DX, DZ, DZ))
    with pytest.raises(TypeError, match="dtype of recon"):
        fastelbo.ELBOLoss()(recon, x, mu, logvar)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="dtype of recon"):
        fastelbo.ELBOLoss()(recon, x.double(), mu, logvar)
    with torch.autocast("cpu", enabled=False), pytest.raises(TypeError, match="dtype of recon"):
        fastelbo.ELBOLoss()(recon, x, mu, logvar)


def test_autocast_one_dtype_still_float32():
    """Inside autocast even all-bfloat16 inputs run in float32 (one rule, whatever the mix)."""
    x, recon, mu, logvar = (torch.rand(B, d, dtype=torch.bfloat16) for d in (DX, DX, DZ, DZ))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastelbo.elbo(recon, x, mu, logvar)
    assert all(t.dtype == torch.float32 for t in out)
    assert_close(out.elbo, reference.elbo(recon.float(), x.float(), mu.float(), logvar.float()).elbo, n=DX,
                 name="elbo")


def test_compile_under_autocast():
    """torch.compile(fullgraph=True) traces the autocast rule and the mixed-dtype check (aot_eager: no C++ build)."""
    x, recon, mu, logvar = _autocast_inputs("cpu", torch.bfloat16, "bernoulli")
    loss_fn = fastelbo.ELBOLoss()

    def step(recon, x, mu, logvar):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(recon, x, mu, logvar)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (recon, mu, logvar)]
    leaves_c = [t.clone().requires_grad_() for t in (recon, mu, logvar)]
    out, out_c = step(leaves[0], x, *leaves[1:]), compiled(leaves_c[0], x, *leaves_c[1:])
    assert out_c.dtype == torch.float32
    torch.testing.assert_close(out_c, out)
    out.backward(), out_c.backward()
    for a, b in zip(leaves_c, leaves):
        torch.testing.assert_close(a.grad, b.grad)

