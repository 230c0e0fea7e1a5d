"""torch.compile: a small VAE whose loss is ELBOLoss with fastelbo.rsample
trains under torch.compile(fullgraph=True) on the CPU (fullgraph: no graph
break, or compile raises); compiled and eager agree on the loss and every
gradient when the noise is the same (explicit seed tensor: Inductor draws
random numbers differently from eager); dynamic=True over two batch sizes
compiles once. Few graphs are compiled: Inductor is slow on 2 cores."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastelbo
from fastelbo import functional as F
from helpers import assert_close, generator_for, rand, randn

pytestmark = pytest.mark.slow

DX, H, DZ = 48, 32, 6


class VAE(nn.Module):
    def __init__(self, likelihood="bernoulli"):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(DX, H), nn.Tanh(), nn.Linear(H, 2 * DZ))
        self.dec = nn.Sequential(nn.Linear(DZ, H), nn.Tanh(), nn.Linear(H, DX))
        self.loss = fastelbo.ELBOLoss(likelihood=likelihood, beta=0.8)

    def forward(self, x, seed):
        mu, logvar = self.enc(x).chunk(2, dim=-1)  # column slices of one [B, 2 Dz] tensor: strided inputs
        z = fastelbo.rsample(mu, logvar, seed=seed)
        return self.loss(self.dec(z), x, mu, logvar)


def _data(n, gen):
    """Binary data from two prototypes with 10% flips: learnable, so the loss must fall."""
    protos = (torch.rand(2, DX, generator=gen) < 0.5).float()
    rows = protos[torch.randint(0, 2, (n,), generator=gen)]
    flip = (torch.rand(n, DX, generator=gen) < 0.1).float()
    return (rows - flip).abs()


def _seed(gen):
    return torch.randint(0, 2**62, (), generator=gen, dtype=torch.int64)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _compare_with_eager(model, compiled_fn, x, seed, what):
    eager_model = copy.deepcopy(model)
    eager_model.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    loss_c = compiled_fn(model, x, seed)
    loss_c.backward()
    loss_e = eager_model(x, seed)
    loss_e.backward()
    # the loss sums B * (Dx + Dz) terms; parameter gradients sum over the batch
    assert_close(loss_c.detach(), loss_e.detach(), n=x.shape[0] * (DX + DZ), name=f"{what}: loss")
    ge, gc = _grads(eager_model), _grads(model)
    for name in ge:
        assert_close(gc[name], ge[name], n=x.shape[0], name=f"{what}: grad of {name}")


def test_vae_trains_under_compile_fullgraph():
    torch.manual_seed(0)
    gen = generator_for("vae-train")
    model = VAE()
    x = _data(64, gen)

    def step(m, xb, seed):
        return m(xb, seed)

    compiled = torch.compile(step, fullgraph=True)  # a graph break raises
    _compare_with_eager(model, compiled, x, _seed(gen), "compiled vs eager")
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        loss = compiled(model, x, _seed(gen))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.8 * first, f"loss did not decrease enough under torch.compile: {first:.2f} -> {last:.2f}"
    # after training (other weights, other regime) compiled and eager still agree
    _compare_with_eager(model, compiled, x, _seed(gen), "after training")


def test_compile_dynamic_two_batch_sizes():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    gen = generator_for("vae-dynamic")
    model = VAE(likelihood="gaussian")
    counter = CompileCounterWithBackend("inductor")

    def step(m, xb, seed):
        return m(xb, seed)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for batch in (24, 41):
        x = randn((batch, DX), gen)
        _compare_with_eager(model, compiled, x, _seed(gen), f"dynamic, batch {batch}")
        frames.append(counter.frame_count)
    # (one compile may count 2 frames: Dynamo restarts its analysis once to tensorify Python scalars)
    assert frames[0] >= 1 and frames[1] == frames[0], f"dynamic=True recompiled for the second batch size: {frames}"


# ---------------------------------------------------------------------------
# Every public op traces without a graph break (aot_eager: cheap), on every fused backend,
# including rsample drawing its seed from the default generator inside the graph.
# ---------------------------------------------------------------------------
def test_every_op_fullgraph_aot_eager(fused):
    torch._dynamo.reset()
    gen = generator_for("aot-eager")
    d, be = fused.device, fused.name
    B = 5
    x = rand((B, DX), gen, 0, 1).to(d)
    recon, mu, lv = randn((B, DX), gen).to(d), randn((B, DZ), gen).to(d), rand((B, DZ), gen, -1, 1).to(d)
    pmu, s = randn((DZ,), gen).to(d), rand((DX,), gen, -1, 1).to(d)
    seed = torch.tensor(1234, device=d)
    leaves = [t.requires_grad_() for t in (recon, mu, lv, pmu, s)]

    def fn(x, recon, mu, lv, pmu, s, seed):
        z = F.rsample(mu, lv, seed=seed, backend=be)
        z_default = F.rsample(mu, lv, backend=be)  # seed drawn in the graph from the default generator
        kl = F.gaussian_kl(mu, lv, pmu, None, backend=be)
        bern = F.bernoulli_log_prob(recon, x, backend=be)
        gauss = F.gaussian_log_prob(recon, x, s, backend=be)
        terms = F.elbo(recon, x, mu, lv, likelihood="gaussian", obs_logvar=s, prior_mu=pmu, beta=0.5, backend=be)
        loss = fastelbo.ELBOLoss(backend=be)(recon, x, mu, lv)
        return z, z_default, kl, bern, gauss, *terms, loss

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c = compiled(x, *leaves, seed)
    out_e = fn(x, *leaves, seed)
    for k, (a, b) in enumerate(zip(out_c, out_e)):
        if k == 1:  # the default-generator sample: only its shape and finiteness are comparable
            assert a.shape == b.shape and torch.isfinite(a).all()
            continue
        assert_close(a.detach().cpu(), b.detach().cpu(), n=DX + DZ, name=f"output {k}")
    w = [torch.linspace(-1, 1, o.numel(), device=d).reshape(o.shape) for o in out_c]
    g_c = torch.autograd.grad([o for k, o in enumerate(out_c) if k != 1], leaves,
                              [g for k, g in enumerate(w) if k != 1])
    g_e = torch.autograd.grad([o for k, o in enumerate(out_e) if k != 1], leaves,
                              [g for k, g in enumerate(w) if k != 1])
    for name, a, b in zip(("recon", "mu", "logvar", "prior_mu", "obs_logvar"), g_c, g_e):
        assert_close(a.cpu(), b.cpu(), n=B, name=f"grad of {name}")


def test_compiled_autograd_runs_the_step_backward(fused):
    """An eager forward whose backward runs under compiled autograd (torch._dynamo.compiled_autograd) gives
    the gradients of the plain backward: on CPU tensors rsample's and elbo's autograd nodes are C++
    (csrc/cpu/autograd.cpp), elsewhere torch.library's Python ones."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no torch._dynamo.compiled_autograd._enable")
    g = generator_for("compiled_autograd")
    dev = fused.device
    x = rand((6, 11), g, 0, 1, dtype=torch.float64).to(dev)
    leaves = [t.to(dev).requires_grad_() for t in (randn((6, 11), g, dtype=torch.float64),
                                                   randn((6, 3), g, dtype=torch.float64),
                                                   rand((6, 3), g, -1, 1, dtype=torch.float64))]
    recon, mu, lv = leaves
    loss_fn = fastelbo.ELBOLoss(backend=fused.name)

    def loss():
        z = F.rsample(mu, lv, seed=5, backend=fused.name)
        return loss_fn(recon, x, mu, lv) + z.square().mean()

    expected = torch.autograd.grad(loss(), leaves)
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        loss().backward()
    for t, e in zip(leaves, expected):
        torch.testing.assert_close(t.grad, e, rtol=1e-12, atol=1e-12)
