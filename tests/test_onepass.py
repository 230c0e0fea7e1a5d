"""The one-pass reduced ELBOLoss (docs/design.md §5): gradients computed in the forward, handed back by the backward.

The accuracy of the reduced loss in every dtype and layout is tests/test_accuracy.py::test_elbo_loss (upstream
gradient 1.7, so the scaled path); here: which path runs, and that the stored gradients survive every way
autograd can use them (retained graphs with upstream 1 then 3, 3 then 1, 0 then 1; scaled and summed losses;
accumulation into a leaf's .grad over micro-batches; torch.autograd.grad), on every fused backend.
"""

from __future__ import annotations

import pytest
import torch

import fastelbo
from fastelbo import _onepass
from fastelbo import loss as loss_module
from fastelbo import reference as R
from helpers import generator_for


@pytest.fixture(autouse=True)
def one_pass_on_every_backend(monkeypatch):
    """ELBOLoss takes the one-pass path only where its op is one fused kernel (the CPU); the other backends'
    one-pass ops are tested here by routing ELBOLoss to them."""
    monkeypatch.setattr(loss_module, "_ONEPASS_PREFIX", dict(loss_module.ONEPASS_OPS))


def test_default_routing_is_one_pass_only_where_fused(fused, monkeypatch):
    monkeypatch.undo()
    x, recon, mu, lv = _inputs(fused.device, generator_for("default route"))
    loss = fastelbo.ELBOLoss(backend=fused.name)(recon, x, mu, lv)
    assert _one_pass_node(loss) == (fused.name == "cpu"), loss.grad_fn.name()
    loss.backward()
    expected = _reference_grads(x, recon, mu, lv, 1.0, beta=1.0)
    _close((recon.grad, mu.grad, lv.grad), expected)


def _inputs(device, gen, B=6, Dx=37, Dz=4, dtype=torch.float32):
    x = torch.rand(B, Dx, generator=gen).round().to(dtype).to(device)
    recon = (torch.randn(B, Dx, generator=gen) * 2).to(dtype).to(device).requires_grad_()
    mu = torch.randn(B, Dz, generator=gen).to(dtype).to(device).requires_grad_()
    lv = (torch.rand(B, Dz, generator=gen) - 0.5).to(dtype).to(device).requires_grad_()
    return x, recon, mu, lv


def _reference_grads(x, recon, mu, lv, scale, reduction="mean", beta=1.3):
    leaves = [t.detach().requires_grad_() for t in (recon, mu, lv)]
    rows = -R.elbo(leaves[0], x, *leaves[1:], beta=beta).elbo
    loss = rows.mean() if reduction == "mean" else rows.sum()
    return torch.autograd.grad(loss * scale, leaves)


def _close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def _one_pass_node(loss):
    return loss.grad_fn is not None and any(n in loss.grad_fn.name() for n in ("elbo_loss", "ElboLoss"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_routes_to_one_pass_only_when_a_gradient_is_wanted(fused, reduction):
    x, recon, mu, lv = _inputs(fused.device, generator_for("route", reduction))
    loss_fn = fastelbo.ELBOLoss(beta=1.3, reduction=reduction, backend=fused.name)
    loss = loss_fn(recon, x, mu, lv)
    assert _one_pass_node(loss), loss.grad_fn.name()
    assert fastelbo.ELBOLoss(reduction="none", backend=fused.name)(recon, x, mu, lv).grad_fn is not None
    assert not _one_pass_node(fastelbo.ELBOLoss(reduction="none", backend=fused.name)(recon, x, mu, lv).sum())
    # Per-row results, no_grad, inference_mode, nothing requiring grad: the plain forward, no gradient computed.
    calls = []
    real = _onepass.op_for
    try:
        _onepass.op_for = lambda prefix: calls.append(prefix) or real(prefix)
        with torch.no_grad():
            plain = loss_fn(recon, x, mu, lv)
        with torch.inference_mode():
            inference = loss_fn(recon, x, mu, lv)
        detached = loss_fn(recon.detach(), x, mu.detach(), lv.detach())
        fastelbo.ELBOLoss(reduction="none", backend=fused.name)(recon, x, mu, lv)
    finally:
        _onepass.op_for = real
    assert calls == []
    for other in (plain, inference, detached):
        assert other.grad_fn is None
        assert torch.equal(other, loss.detach())


@pytest.mark.parametrize("ups", [(1.0, 3.0), (3.0, 1.0), (0.0, 1.0), (1.0, 1.0)], ids=str)
def test_retained_graph_twice(fused, ups):
    """A second backward through a retained graph reads the stored gradients as the forward wrote them."""
    x, recon, mu, lv = _inputs(fused.device, generator_for("retain", ups))
    loss = fastelbo.ELBOLoss(beta=1.3, backend=fused.name)(recon, x, mu, lv)
    for i, up in enumerate(ups):
        grads = torch.autograd.grad(loss, (recon, mu, lv), torch.tensor(up, device=fused.device),
                                    retain_graph=i == 0)
        _close(grads, _reference_grads(x, recon, mu, lv, up))


def test_backward_retain_graph_accumulates_twice(fused):
    x, recon, mu, lv = _inputs(fused.device, generator_for("retain-acc"))
    loss = fastelbo.ELBOLoss(beta=1.3, backend=fused.name)(recon, x, mu, lv)
    loss.backward(retain_graph=True)
    loss.backward()
    _close((recon.grad, mu.grad, lv.grad), [2 * g for g in _reference_grads(x, recon, mu, lv, 1.0)])


def test_scaled_and_summed_losses(fused):
    x, recon, mu, lv = _inputs(fused.device, generator_for("scaled"))
    loss_fn = fastelbo.ELBOLoss(beta=1.3, reduction="sum", backend=fused.name)
    (loss_fn(recon, x, mu, lv) * 3).backward()
    _close((recon.grad, mu.grad, lv.grad), _reference_grads(x, recon, mu, lv, 3.0, "sum"))
    for t in (recon, mu, lv):
        t.grad = None
    # The loss in a sum with another loss of the same inputs: both gradients reach recon.
    total = loss_fn(recon, x, mu, lv) + (recon ** 2).sum() + mu.sum()
    total.backward()
    ref = _reference_grads(x, recon, mu, lv, 1.0, "sum")
    _close((recon.grad, mu.grad, lv.grad), (ref[0] + 2 * recon.detach(), ref[1] + 1, ref[2]))


def test_accumulation_over_micro_batches(fused):
    """Gradient accumulation into leaves' .grad: a handed-over gradient may become a leaf's .grad, and the
    next micro-batch accumulates into it; no buffer a later backward reads is ever that tensor."""
    gen = generator_for("micro")
    batches = [_inputs(fused.device, gen) for _ in range(3)]
    recon = batches[0][1].detach().clone().requires_grad_()
    mu, lv = (t.detach().clone().requires_grad_() for t in batches[0][2:])
    loss_fn = fastelbo.ELBOLoss(beta=1.3, backend=fused.name)
    expected = [torch.zeros_like(t) for t in (recon, mu, lv)]
    for k, (x, *_rest) in enumerate(batches):
        loss = loss_fn(recon, x, mu, lv)
        if k == 1:  # one micro-batch also retains its graph and runs a second, scaled backward
            loss.backward(retain_graph=True)
            (loss * 0.5).backward()
            scales = (1.0, 0.5)
        else:
            loss.backward()
            scales = (1.0,)
        for s in scales:
            expected = [e + g for e, g in zip(expected, _reference_grads(x, recon, mu, lv, s))]
        _close((recon.grad, mu.grad, lv.grad), expected)


def test_graph_not_retained_refuses_a_second_backward(fused):
    x, recon, mu, lv = _inputs(fused.device, generator_for("spent"))
    loss = fastelbo.ELBOLoss(backend=fused.name)(recon, x, mu, lv)
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_double_backward_is_refused(fused):
    x, recon, mu, lv = _inputs(fused.device, generator_for("double"))
    loss = fastelbo.ELBOLoss(backend=fused.name)(recon, x, mu, lv)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(loss, recon, torch.ones((), requires_grad=True), create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_is_the_two_pass_loss_bit_for_bit(fused, dtype):
    """The one-pass loss reduces the same rounded rows as the two-pass path."""
    x, recon, mu, lv = _inputs(fused.device, generator_for("bits", str(dtype)), B=33, dtype=dtype)
    for reduction in ("mean", "sum"):
        loss_fn = fastelbo.ELBOLoss(beta=1.3, reduction=reduction, backend=fused.name)
        one = loss_fn(recon, x, mu, lv)
        assert _one_pass_node(one)
        with torch.no_grad():
            two = loss_fn(recon, x, mu, lv)
        assert torch.equal(one.detach(), two), (reduction, one, two)


def test_only_wanted_gradients(fused):
    """x and the posterior not requiring grad: only drecon comes back (the others are neither computed nor
    returned)."""
    x, recon, mu, lv = _inputs(fused.device, generator_for("mask"))
    mu, lv = mu.detach(), lv.detach()
    loss = fastelbo.ELBOLoss(beta=1.3, backend=fused.name)(recon, x, mu, lv)
    loss.backward()
    assert mu.grad is None and lv.grad is None
    _close((recon.grad,), _reference_grads(x, recon, mu, lv, 1.0)[:1])


def test_compile_fullgraph_routes_by_grad_mode(fused):
    x, recon, mu, lv = _inputs(fused.device, generator_for("compile"))
    loss_fn = fastelbo.ELBOLoss(beta=1.3, backend=fused.name)
    step = torch.compile(lambda r, m, v: loss_fn(r, x, m, v) * 2, fullgraph=True, backend="aot_eager")
    loss = step(recon, mu, lv)
    loss.backward()
    _close((recon.grad, mu.grad, lv.grad), _reference_grads(x, recon, mu, lv, 2.0))
    with torch.no_grad():
        torch.testing.assert_close(step(recon, mu, lv), loss.detach())


def test_torch_func_grad_takes_the_two_pass_path(fused):
    x, recon, mu, lv = _inputs(fused.device, generator_for("func"))
    loss_fn = fastelbo.ELBOLoss(beta=1.3, backend=fused.name)
    grads = torch.func.grad(lambda r, m, v: loss_fn(r, x, m, v), argnums=(0, 1, 2))(recon, mu, lv)
    _close(grads, _reference_grads(x, recon, mu, lv, 1.0))
