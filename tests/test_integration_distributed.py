"""fastelbo under torch.distributed: DDP and FSDP2 on 2 CPU processes (gloo, loopback).

One spawn serves every test of this file (starting processes costs seconds):
two ranks train a small VAE with ELBOLoss and fastelbo.rsample for a few SGD
steps, under DDP and then under FSDP2 (fully_shard), and save their
gradients and parameters; the tests compare them with one process training
on the concatenated batch with the same eps.

Noise per rank (docs/training.md): each rank samples with its own generator
seeded base_seed + rank (or its own seed= per step), so the ranks' eps are
independent; the single process reproduces rank r's eps for rows r of the
concatenated batch from the same generator or seed. A generator seeded alike
on every rank gives identical eps on every rank.

Reduction: ELBOLoss(reduction="mean") averages over the local batch and
DDP/FSDP average gradients over ranks, so with equal local batches the result
is the mean over the global batch. With unequal local batches it is a mean of
per-rank means (checked below); reduction="sum" scaled by
world_size / global_batch gives the global mean again.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastelbo
from fastelbo import reference

WORLD = 2
DX, DH, DZ = 12, 16, 3
STEPS, LR = 3, 0.5
BASE_SEED = 1000
SPLIT = {"equal": (4, 4), "unequal": (5, 3)}  # local batch sizes per rank
SPAWN_TIMEOUT_S = 150  # whole spawn: start, train, shut down
PG_TIMEOUT_S = 30  # one collective


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # every rank and the single process start from the same weights
        self.enc = nn.Sequential(nn.Linear(DX, DH), nn.Tanh(), nn.Linear(DH, 2 * DZ))
        self.dec = nn.Sequential(nn.Linear(DZ, DH), nn.Tanh(), nn.Linear(DH, DX))

    def forward(self, x, *, generator=None, seed=None, eps=None):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        z = fastelbo.rsample(mu, logvar, generator=generator, seed=seed, eps=eps)
        return self.dec(z), mu, logvar


def _data(split="equal"):
    return torch.rand(sum(SPLIT[split]), DX, generator=torch.Generator().manual_seed(42))


def _rows(split, rank):
    sizes = SPLIT[split]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _step_seed(step, rank):
    return BASE_SEED + 1000 * step + rank


# ---------------------------------------------------------------------------
# The ranks.
# ---------------------------------------------------------------------------
def _train_rank(model, rank, mode, split, reduction, *, grads_of=lambda p: p.grad, full=lambda p: p):
    """STEPS steps on this rank's rows; per step the gradients after the collective, then the parameters."""
    x = _data(split)[_rows(split, rank)]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = fastelbo.ELBOLoss(reduction=reduction)
    gen = torch.Generator().manual_seed(BASE_SEED + rank)  # independent eps per rank
    grads = []
    for step in range(STEPS):
        opt.zero_grad()
        if mode == "generator":
            recon, mu, logvar = model(x, generator=gen)
        else:
            recon, mu, logvar = model(x, seed=_step_seed(step, rank))
        loss = loss_fn(recon, x, mu, logvar)
        if reduction == "sum":
            loss = loss * WORLD / sum(SPLIT[split])  # DDP averages over ranks: this makes it the global mean
        loss.backward()
        grads.append([grads_of(p).detach().clone() for p in model.parameters()])
        opt.step()
    return {"grads": grads, "params": [full(p).detach().clone() for p in model.parameters()]}


def _noise_check(rank):
    """eps drawn with a per-rank generator and with one generator seeded alike on every rank."""
    zeros = torch.zeros(4, DZ)
    own = fastelbo.rsample(zeros, zeros, generator=torch.Generator().manual_seed(BASE_SEED + rank))
    shared = fastelbo.rsample(zeros, zeros, generator=torch.Generator().manual_seed(BASE_SEED))
    gathered_own, gathered_shared = [torch.empty_like(own) for _ in range(WORLD)], [torch.empty_like(own)
                                                                                     for _ in range(WORLD)]
    dist.all_gather(gathered_own, own)
    dist.all_gather(gathered_shared, shared)
    return {"own": gathered_own, "shared": gathered_shared}


def _worker(rank, out_dir):
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    # A file store, not tcp://: no rank hosts the store's server (whose exit while the
    # other rank still tears down is one way to crash at shutdown), and no port is
    # picked, released and hoped to be free.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = {"noise": _noise_check(rank)}
        for name, mode, split, reduction in (("generator", "generator", "equal", "mean"),
                                             ("seed", "seed", "equal", "mean"),
                                             ("unequal_mean", "seed", "unequal", "mean"),
                                             ("unequal_sum", "seed", "unequal", "sum")):
            ddp[name] = _train_rank(DDP(VAE()), rank, mode, split, reduction)
        torch.save(ddp, os.path.join(out_dir, f"ddp{rank}.pt"))

        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:
            torch.save({"skip": f"torch {torch.__version__} has no FSDP2 fully_shard: {e}"},
                       os.path.join(out_dir, f"fsdp{rank}.pt"))
            return
        model = VAE()
        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model.enc, mesh=mesh)
        fully_shard(model.dec, mesh=mesh)
        fully_shard(model, mesh=mesh)
        fsdp = _train_rank(model, rank, "seed", "equal", "mean", grads_of=lambda p: p.grad.full_tensor(),
                           full=lambda p: p.full_tensor())
        torch.save(fsdp, os.path.join(out_dir, f"fsdp{rank}.pt"))
        del model, fsdp  # FSDP2's hooks and DTensors go before the group they use
        dist.barrier()  # neither rank tears down while the other may still be talking to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs both ranks once; returns {"ddp": [rank0, rank1], "fsdp": [...]} or raises with the ranks' error."""
    fastelbo._build.cpu_extension_status()  # build/load the kernels here first: the ranks then only load them
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    ctx = mp.start_processes(_worker, args=(out_dir,), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    except mp.ProcessExitedException as e:
        written = sorted(f for f in os.listdir(out_dir) if f.endswith(".pt"))
        raise AssertionError(f"{e}; result files written before it: {written or 'none'} "
                             f"(all {2 * WORLD} written: the rank died while shutting down)") from e
    finally:
        for p in ctx.processes:  # only on failure are any still alive
            if p.is_alive():
                p.kill()
                p.join(5)
    return {kind: [torch.load(os.path.join(out_dir, f"{kind}{r}.pt")) for r in range(WORLD)]
            for kind in ("ddp", "fsdp")}


# ---------------------------------------------------------------------------
# One process on the concatenated batch.
# ---------------------------------------------------------------------------
def _single(mode, split="equal", per_rank_means=False):
    """The global-batch mean loss, eps of rank r for rows r: from its generator or its seed."""
    model = VAE()
    x = _data(split)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gens = [torch.Generator().manual_seed(BASE_SEED + r) for r in range(WORLD)]
    grads = []
    for step in range(STEPS):
        opt.zero_grad()
        mu, logvar = model.enc(x).chunk(2, dim=-1)
        if mode == "generator":  # rank r's generator draws rank r's rows, as on the rank
            z = torch.cat([fastelbo.rsample(mu[_rows(split, r)], logvar[_rows(split, r)], generator=gens[r])
                           for r in range(WORLD)])
        else:  # eps of seed s is the Philox stream of s (docs/design.md §3): rebuild it, sample the whole batch at once
            eps = torch.cat([reference.standard_normal(_step_seed(step, r), (SPLIT[split][r], DZ))
                             for r in range(WORLD)])
            z = fastelbo.rsample(mu, logvar, eps=eps)
        per_row = fastelbo.ELBOLoss(reduction="none")(model.dec(z), x, mu, logvar)
        if per_rank_means:  # what DDP computes from per-rank "mean" losses: the mean of the ranks' means
            loss = torch.stack([per_row[_rows(split, r)].mean() for r in range(WORLD)]).mean()
        else:
            loss = per_row.mean()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return {"grads": grads, "params": [p.detach().clone() for p in model.parameters()]}


def _assert_matches(dist_run, single, what):
    for step, (g_dist, g_one) in enumerate(zip(dist_run["grads"], single["grads"])):
        for i, (a, b) in enumerate(zip(g_dist, g_one)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{what}: step {step}, gradient of parameter {i}: {m}")
    for i, (a, b) in enumerate(zip(dist_run["params"], single["params"])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: parameter {i}: {m}")


def _ranks_agree(runs, what):
    for a, b in zip(runs[0]["params"], runs[1]["params"]):
        assert torch.equal(a, b), f"{what}: the ranks' parameters diverged"


# ---------------------------------------------------------------------------
# The tests.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["generator", "seed"])
def test_ddp_equals_one_process_on_the_concatenated_batch(ranks, mode):
    runs = [r[mode] for r in ranks["ddp"]]
    _ranks_agree(runs, f"DDP ({mode})")
    _assert_matches(runs[0], _single(mode), f"DDP with per-rank {mode}")


def test_ddp_unequal_local_batches(ranks):
    """mean: DDP gives the mean of per-rank means, not the global mean; sum * world / global_batch fixes it."""
    _assert_matches(ranks["ddp"][0]["unequal_sum"], _single("seed", "unequal"), "DDP, unequal batches, sum")
    mean_run = ranks["ddp"][0]["unequal_mean"]
    _assert_matches(mean_run, _single("seed", "unequal", per_rank_means=True), "DDP, unequal batches, mean")
    global_mean = _single("seed", "unequal")
    assert not torch.allclose(mean_run["grads"][0][0], global_mean["grads"][0][0], rtol=1e-3), \
        "with unequal local batches, per-rank means should differ from the global mean"


def test_noise_per_rank(ranks):
    noise = ranks["ddp"][0]["noise"]
    zeros = torch.zeros(4, DZ)
    for r in range(WORLD):  # rank r's eps is what its generator gives in any process
        expected = fastelbo.rsample(zeros, zeros, generator=torch.Generator().manual_seed(BASE_SEED + r))
        assert torch.equal(noise["own"][r], expected)
    assert not torch.equal(noise["own"][0], noise["own"][1]), "generators seeded base + rank: independent eps"
    assert torch.equal(noise["shared"][0], noise["shared"][1]), "one seed on every rank: identical eps"


def test_fsdp2_equals_one_process_on_the_concatenated_batch(ranks):
    runs = ranks["fsdp"]
    if "skip" in runs[0]:
        pytest.skip(runs[0]["skip"])
    _ranks_agree(runs, "FSDP2")
    _assert_matches(runs[0], _single("seed"), "FSDP2 (fully_shard) with per-rank seeds")
