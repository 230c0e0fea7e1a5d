"""The machinery of ``fastelbo demo``: the digits data, a small MLP VAE, one
training epoch, the test ELBO, the IWAE estimate and the figure.

The model and the loop are those of examples/train_vae.py (which stays a
standalone script a user can copy); here they take the backend as an argument
so that the same code trains once with the fused kernels and once with the
reference, from the same seed, the same data order and the same noise, and a
third time in plain PyTorch (torch.randn noise) as the timing baseline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import diagnostics
from . import functional as F
from . import reference
from .evaluation import estimate_log_likelihood
from .loss import ELBOLoss

IWAE_K = 64
TEST_FRACTION = 1 / 6  # 1,797 digits -> 1,497 train, 300 test
SPLIT_SEED = 0  # the train/test split does not move with --seed
HIDDEN = 256
# The third, timing-only run: what a user has before adopting fastelbo. Its noise is
# torch's own (not fastelbo's Philox stream), so its curve is statistically, not
# numerically, the same as the other two.
PYTORCH = "pytorch"


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
def load_data(likelihood: str, subset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as [N, 64] float32 in [0, 1], split into (train, test).

    bernoulli: pixels binarized at half intensity; gaussian: intensities / 16.
    subset: keep the first N images of the fixed shuffle (for quick tests).
    """
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    x = torch.from_numpy(load_digits().data).to(torch.float32) / 16.0
    if likelihood == "bernoulli":
        x = (x > 0.5).to(torch.float32)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))]
    if subset is not None:
        x = x[:subset]
    n_test = max(1, round(len(x) * TEST_FRACTION))
    return x[n_test:].contiguous(), x[:n_test].contiguous()


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
class VAE(nn.Module):
    """MLP encoder x -> (mu, logvar), MLP decoder z -> Bernoulli logits or Gaussian mean.

    For the Gaussian likelihood the observation log-variance is one learned scalar.
    backend: the fastelbo backend of rsample, or PYTORCH for plain torch.randn noise.
    """

    def __init__(self, x_dim: int = 64, z_dim: int = 8, hidden: int = HIDDEN, likelihood: str = "bernoulli",
                 backend: str = "auto"):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, x_dim))
        self.obs_logvar = nn.Parameter(torch.zeros(())) if likelihood == "gaussian" else None
        self.backend = backend
        self.torch_noise: torch.Generator | None = None  # the PYTORCH run's generator

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def forward(self, x, seed):
        """(decoder output, mu, logvar); seed: 0-dim int64 tensor keying the noise of z."""
        mu, logvar = self.encode(x)
        if self.backend == PYTORCH:  # z = mu + exp(logvar / 2) * randn: plain PyTorch, its own noise
            eps = torch.randn(mu.shape, generator=self.torch_noise, dtype=mu.dtype, device=mu.device)
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            z = F.rsample(mu, logvar, seed=seed, backend=self.backend)
        return self.decoder(z), mu, logvar

    def mean_image(self, z):
        """E[x | z]: sigmoid of the logits, or the Gaussian mean clipped to [0, 1]."""
        out = self.decoder(z)
        return torch.sigmoid(out) if self.obs_logvar is None else out.clamp(0.0, 1.0)


def log_likelihood(model: VAE, out, x, backend: str):
    """log p(x | z) per row from the decoder output."""
    if model.obs_logvar is None:
        return F.bernoulli_log_prob(out, x, backend=backend)
    return F.gaussian_log_prob(out, x, model.obs_logvar, backend=backend)


def draw_seed(gen: torch.Generator) -> torch.Tensor:
    """A 0-dim int64 Philox seed from a (CPU) generator; a tensor, so torch.compile does not specialize on it."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=gen)


# ---------------------------------------------------------------------------
# One run: model + optimizer + its generators
# ---------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one training run owns. Runs built with the same seed draw the
    same initial weights, batch order and (fastelbo backends) noise seeds."""

    name: str
    backend: str
    model: nn.Module
    forward: Callable  # the model, or torch.compile(model)
    loss_fn: Callable  # (out, x, mu, logvar, obs_logvar=) -> -ELBO, mean over the batch
    optimizer: torch.optim.Optimizer
    order_gen: torch.Generator
    noise_gen: torch.Generator
    train_elbo: list = field(default_factory=list)
    test_elbo: list = field(default_factory=list)
    epoch_time: list = field(default_factory=list)


def _param_groups(model: VAE, lr: float) -> list[dict]:
    """The networks at lr; the Gaussian observation log-variance (one scalar, starting at 0,
    i.e. unit variance on [0, 1] data) at 10 lr, or it lags and the posterior collapses."""
    nets = [p for n, p in model.named_parameters() if n != "obs_logvar"]
    groups = [{"params": nets}]
    if model.obs_logvar is not None:
        groups.append({"params": [model.obs_logvar], "lr": 10 * lr})
    return groups


class TorchLoss(nn.Module):
    """The negative ELBO in plain torch.distributions (fastelbo.reference.elbo, no argument checks)."""

    def __init__(self, likelihood: str):
        super().__init__()
        self.likelihood = likelihood

    def forward(self, out, x, mu, logvar, obs_logvar=None):
        return -reference.elbo(recon=out, x=x, mu=mu, logvar=logvar, likelihood=self.likelihood, obs_logvar=obs_logvar).elbo.mean()


def make_run(name: str, backend: str, *, seed: int, latent: int, likelihood: str, device: torch.device,
             compile: bool = False, lr: float = 1e-3) -> Run:
    """backend: a fastelbo backend for ELBOLoss and rsample, or PYTORCH (torch.randn + TorchLoss)."""
    torch.manual_seed(seed)  # initial weights
    model = VAE(z_dim=latent, likelihood=likelihood, backend=backend).to(device)
    if backend == PYTORCH:
        model.torch_noise = torch.Generator(device=device).manual_seed(seed + 2)
    forward = torch.compile(model) if compile else model
    return Run(
        name=name, backend=backend, model=model, forward=forward,
        loss_fn=TorchLoss(likelihood) if backend == PYTORCH else ELBOLoss(likelihood=likelihood, backend=backend),
        optimizer=torch.optim.Adam(_param_groups(model, lr), lr=lr),
        order_gen=torch.Generator().manual_seed(seed + 1),
        noise_gen=torch.Generator().manual_seed(seed + 2),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(run: Run, x_train: torch.Tensor, batch_size: int,
                on_batch: Callable[[int, int], None] | None = None) -> tuple[float, float]:
    """One pass over x_train in a shuffled order. Returns (mean train ELBO, seconds)."""
    model, device = run.model, x_train.device
    model.train()
    n = len(x_train)
    order = torch.randperm(n, generator=run.order_gen).to(device)
    n_batches = math.ceil(n / batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    _sync(device)
    start = time.perf_counter()
    for b in range(n_batches):
        x = x_train[order[b * batch_size:(b + 1) * batch_size]]
        out, mu, logvar = run.forward(x, draw_seed(run.noise_gen))
        loss = run.loss_fn(out, x, mu, logvar, obs_logvar=model.obs_logvar)  # -ELBO, mean over the batch
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        total += loss.detach().to(torch.float64) * len(x)
        if on_batch is not None:
            on_batch(b + 1, n_batches)
    _sync(device)
    seconds = time.perf_counter() - start
    return -total.item() / n, seconds


@torch.no_grad()
def test_elbo(run: Run, x: torch.Tensor, seed: int, batch_size: int = 1024) -> float:
    """Mean ELBO over x, one z per image from the fixed noise `seed`."""
    run.model.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        out, mu, logvar = run.forward(xb, torch.tensor(seed + i, dtype=torch.int64))
        total += (-run.loss_fn(out, xb, mu, logvar, obs_logvar=run.model.obs_logvar)).item() * len(xb)
    return total / len(x)


@torch.no_grad()
def iwae_log_likelihood(model: VAE, x: torch.Tensor, backend: str, seed: int, k: int = IWAE_K,
                        batch_size: int = 256) -> float:
    """Mean over x of the IWAE estimate of log p(x) with k importance samples:

        log (1/k) sum_k exp(log p(x|z_k) + log p(z_k) - log q(z_k|x)),  z_k ~ q(z|x),

    fastelbo.estimate_log_likelihood per batch (one fused iwae_bound op per batch).
    """
    backend = "reference" if backend == PYTORCH else backend
    model.eval()
    likelihood = "bernoulli" if model.obs_logvar is None else "gaussian"
    total = 0.0
    for i in range(0, len(x), batch_size):
        est = estimate_log_likelihood((model.encode, model.decoder), x[i:i + batch_size], K=k, likelihood=likelihood,
                                      obs_logvar=model.obs_logvar, seed=seed + i, progress=False, backend=backend)
        total += est.sum().item()
    return total / len(x)


@torch.no_grad()
def diagnose(model: VAE, x: torch.Tensor, backend: str, seed: int, k: int = IWAE_K) -> dict:
    """fastelbo.diagnostics on x: the batch-mean KL per latent dimension, the active units and the
    posterior gap IWAE_k - ELBO (one draw of k samples per image, Philox seed `seed`)."""
    model.eval()
    likelihood = "bernoulli" if model.obs_logvar is None else "gaussian"
    mu, logvar = model.encode(x)
    z = F.rsample(mu, logvar, num_samples=k, seed=seed, backend=backend)
    gap = diagnostics.posterior_gap(x, model.decoder(z), z, mu, logvar, likelihood=likelihood,
                                    obs_logvar=model.obs_logvar, backend=backend)
    return {"kl_per_dim": diagnostics.kl_per_dim(mu, logvar, backend=backend).tolist(),
            "active_units": diagnostics.active_units(mu).count, "latent": mu.shape[1],
            "posterior_gap": gap.gap, "posterior_gap_stderr": gap.stderr, "posterior_gap_k": gap.k}


# ---------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------
def _image_strip(images: torch.Tensor, rows: int) -> torch.Tensor:
    """[n, 64] -> one [rows*9-1, cols*9-1] mosaic of 8x8 images, 1-pixel gaps (NaN: drawn blank)."""
    n = images.shape[0]
    cols = math.ceil(n / rows)
    canvas = torch.full((rows * 9 - 1, cols * 9 - 1), float("nan"))
    for j in range(n):
        r, c = divmod(j, cols)
        canvas[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = images[j].reshape(8, 8)
    return canvas


@torch.no_grad()
def save_figure(path, fused: Run, ref: Run, x_test: torch.Tensor, *, seed: int, title: str, plain: Run | None = None,
                n_recon: int = 10, n_samples: int = 30) -> None:
    """Loss curves, |fused - reference| per epoch, reconstructions and prior samples, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 7.2), dpi=100, layout="constrained")
    fig.suptitle(title, fontsize=12)
    grid = fig.add_gridspec(2, 2, height_ratios=[2.1, 1.0])
    epochs = list(range(1, len(fused.train_elbo) + 1))

    ax = fig.add_subplot(grid[0, 0])
    for key, color, label in (("train_elbo", "tab:blue", "train"), ("test_elbo", "tab:orange", "test")):
        ax.plot(epochs, getattr(fused, key), color=color, lw=3.0, alpha=0.55, label=f"{label}, fastelbo")
        ax.plot(epochs, getattr(ref, key), color="black", lw=1.0, ls="--", label=f"{label}, reference")
        if plain is not None:
            ax.plot(epochs, getattr(plain, key), color=color, lw=0.8, ls=":",
                    label=f"{label}, plain PyTorch (own noise)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per image, higher is better)")
    ax.set_title("ELBO per epoch: fastelbo (thick) vs reference (dashed)"
                 + ("\nand plain PyTorch with its own noise (dotted)" if plain is not None else ""), fontsize=11)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")

    ax = fig.add_subplot(grid[0, 1])
    floor = 1e-9
    top = floor
    for key, color, label in (("train_elbo", "tab:blue", "train"), ("test_elbo", "tab:orange", "test")):
        d = [max(abs(a - b), floor) for a, b in zip(getattr(fused, key), getattr(ref, key))]
        ax.semilogy(epochs, d, color=color, marker="o", ms=3, lw=1.2, label=label)
        top = max(top, *d)
    biggest = max(abs(v) for v in fused.train_elbo + fused.test_elbo) or 1.0
    ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(biggest))
    ax.axhline(ulp, color="0.4", ls="--", lw=1.0, label=f"1 float32 ulp at {biggest:.0f}")
    ax.set_xlabel(f"epoch   (an exact 0 is drawn at {floor:g})")
    ax.set_ylabel("|fastelbo - reference| (nats)")
    ax.set_title("|difference| between the two runs' curves\n(training can amplify last-bit differences "
                 "over many epochs)", fontsize=11)
    ax.set_ylim(floor / 3, max(top, ulp) * 300)  # headroom for the legend
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9, loc="upper center", ncol=3, framealpha=0.9)

    # reconstructions: E[x | z = mu(x)] for the first test images, both models
    x = x_test[:n_recon]
    rows = [x.cpu()]
    for run in (fused, ref):
        run.model.eval()
        mu, _ = run.model.encode(x)
        rows.append(run.model.mean_image(mu).cpu())
    ax = fig.add_subplot(grid[1, 0])
    ax.imshow(_image_strip(torch.cat(rows), rows=3).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([3.5, 12.5, 21.5], ["test image", "fastelbo", "reference"])
    ax.set_xticks([])
    ax.set_title("reconstructions E[x | z = mu(x)]")

    # samples from the prior, decoded by the fastelbo-trained model
    gen = torch.Generator().manual_seed(seed + 3)
    z = torch.randn(n_samples, fused.model.decoder[0].in_features, generator=gen).to(x_test.device)
    fused.model.eval()
    ax = fig.add_subplot(grid[1, 1])
    ax.imshow(_image_strip(fused.model.mean_image(z).cpu(), rows=3).numpy(), cmap="gray_r", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("samples from the prior: E[x | z], z ~ N(0, I) (fastelbo model)")
    fig.savefig(path)
