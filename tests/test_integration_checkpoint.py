"""fastelbo.rsample inside torch.utils.checkpoint (non-reentrant, and reentrant).

The recomputed forward must see the eps of the first forward, so gradients
with checkpointing equal those without, bit for bit:
  * seed drawn from the default generator: checkpoint restores the default
    generator's state before recomputing (preserve_rng_state=True), so the
    torch.randint that draws the seed draws it again; the generator is left
    where the run without checkpointing leaves it;
  * explicit seed= (int or tensor) or eps=: they are inputs of the region;
  * with preserve_rng_state=False nothing is replayed and the default
    generator's seed differs too (shown below, as the tests' own sensitivity);
  * a user's torch.Generator: checkpoint does not replay it, so the
    recomputation would draw another seed; rsample refuses to run then
    (RuntimeError naming the fix) instead of silently changing the gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fastelbo

B, DX, DH, DZ = 8, 20, 16, 4


def _model():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(DX, DH), torch.nn.Tanh(), torch.nn.Linear(DH, 2 * DZ))
    dec = torch.nn.Sequential(torch.nn.Linear(DZ, DH), torch.nn.Tanh(), torch.nn.Linear(DH, DX))
    return enc, dec


X = torch.rand(B, DX, generator=torch.Generator().manual_seed(1))


def _step(noise: str, use_checkpoint: bool, use_reentrant: bool = False, preserve_rng_state: bool = True):
    """Loss, parameter gradients and the state of the random streams after one step."""
    enc, dec = _model()
    torch.manual_seed(123)  # the default generator, as a training loop leaves it
    user_gen = torch.Generator().manual_seed(5)
    seed_tensor = torch.tensor(987654321)
    eps = torch.randn(B, DZ, generator=torch.Generator().manual_seed(6))

    def block(h):  # the checkpointed region: sample, decode
        mu, logvar = h.chunk(2, dim=-1)
        if noise == "default":
            z = fastelbo.rsample(mu, logvar)
        elif noise == "seed_int":
            z = fastelbo.rsample(mu, logvar, seed=42)
        elif noise == "seed_tensor":
            z = fastelbo.rsample(mu, logvar, seed=seed_tensor)
        elif noise == "eps":
            z = fastelbo.rsample(mu, logvar, eps=eps)
        elif noise == "generator":
            z = fastelbo.rsample(mu, logvar, generator=user_gen)
        elif noise == "generator_seed_outside":
            z = fastelbo.rsample(mu, logvar, seed=outside_seed)
        return dec(z), mu, logvar

    # The recommended pattern with a user generator: draw the seed before the region.
    outside_seed = torch.randint(0, 2**62, (), generator=user_gen) if noise == "generator_seed_outside" else None
    h = enc(X)
    if use_checkpoint:
        recon, mu, logvar = checkpoint(block, h, use_reentrant=use_reentrant, preserve_rng_state=preserve_rng_state)
    else:
        recon, mu, logvar = block(h)
    loss = fastelbo.ELBOLoss()(recon, X, mu, logvar)
    loss.backward()
    grads = [p.grad for p in (*enc.parameters(), *dec.parameters())]
    return loss.detach(), grads, torch.rand(3), torch.rand(3, generator=user_gen)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("noise", ["default", "seed_int", "seed_tensor", "eps", "generator_seed_outside"])
def test_checkpoint_recomputes_the_same_eps(noise, use_reentrant):
    loss, grads, after_default, after_user = _step(noise, use_checkpoint=False)
    loss_c, grads_c, after_default_c, after_user_c = _step(noise, use_checkpoint=True, use_reentrant=use_reentrant)
    assert torch.equal(loss_c, loss)
    for i, (g, gc) in enumerate(zip(grads, grads_c)):
        assert torch.equal(gc, g), f"parameter {i}: gradient with checkpointing differs (max |diff| " \
                                   f"{(gc - g).abs().max().item():.3e}): the recomputed eps differs"
    assert torch.equal(after_default_c, after_default), "checkpointing moved the default generator"
    assert torch.equal(after_user_c, after_user), "checkpointing moved the user's generator"


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpoint_with_user_generator_refuses_recompute(use_reentrant):
    with pytest.raises(RuntimeError, match="does not replay a user's torch.Generator"):
        _step("generator", use_checkpoint=True, use_reentrant=use_reentrant)


def test_user_generator_without_checkpoint_still_works():
    loss, grads, *_ = _step("generator", use_checkpoint=False)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


def test_the_comparison_sees_a_different_recomputed_eps():
    """Sensitivity of the test above: with preserve_rng_state=False the default generator is not replayed, the
    recomputation draws another seed and the gradients change (documented: keep the default True)."""
    _, grads, *_ = _step("default", use_checkpoint=False)
    _, grads_c, *_ = _step("default", use_checkpoint=True, preserve_rng_state=False)
    assert not all(torch.equal(g, gc) for g, gc in zip(grads, grads_c))
