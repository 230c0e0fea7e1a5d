"""Train a small VAE on scikit-learn's handwritten digits with fastelbo.

    pip install "fastelbo[demo]"          # fastelbo + scikit-learn (the digits ship with it)
    python examples/train_vae.py          # --epochs N, --likelihood gaussian

Adopting fastelbo in your own VAE changes three lines, marked "fastelbo (n/3)"
below; the comment above each one is the plain PyTorch it replaces. Same
numbers as torch.distributions, computed by fused kernels.
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import fastelbo  # fastelbo (1/3)


class VAE(nn.Module):
    def __init__(self, x_dim=64, z_dim=8, hidden=256):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, x_dim))

    def forward(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)  # q(z|x) = N(mu, exp(logvar))
        # z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        z = fastelbo.rsample(mu, logvar)  # fastelbo (2/3)
        return self.decoder(z), mu, logvar  # decoder output: Bernoulli logits or Gaussian mean


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--likelihood", choices=["bernoulli", "gaussian"], default="bernoulli")
    args = parser.parse_args()
    torch.manual_seed(0)

    # 1,797 8x8 digits as [N, 64] in [0, 1]: binarized for Bernoulli, intensities for Gaussian
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    if args.likelihood == "bernoulli":
        x = (x > 0.5).float()
    x = x[torch.randperm(len(x))]
    x_test, x_train = x[:300], x[300:]

    model = VAE()
    obs_logvar = nn.Parameter(torch.zeros(()))  # Gaussian only: learned log-variance of p(x|z)
    params = [{"params": model.parameters()}, {"params": [obs_logvar], "lr": 1e-2}]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    # def loss_fn(out, x, mu, logvar, obs_logvar=None):  # negative ELBO, mean over the batch
    #     if args.likelihood == "bernoulli":
    #         log_px = -nn.functional.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
    #     else:
    #         log_px = torch.distributions.Normal(out, torch.exp(0.5 * obs_logvar)).log_prob(x).sum(-1)
    #     kl = 0.5 * (torch.exp(logvar) + mu**2 - 1 - logvar).sum(-1)
    #     return (kl - log_px).mean()
    loss_fn = fastelbo.ELBOLoss(likelihood=args.likelihood)  # fastelbo (3/3)
    extra = {"obs_logvar": obs_logvar} if args.likelihood == "gaussian" else {}

    for epoch in range(1, args.epochs + 1):
        model.train()
        total = 0.0
        for batch in torch.randperm(len(x_train)).split(64):
            xb = x_train[batch]
            out, mu, logvar = model(xb)
            loss = loss_fn(out, xb, mu, logvar, **extra)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
        model.eval()
        with torch.no_grad():
            out, mu, logvar = model(x_test)
            test = -loss_fn(out, x_test, mu, logvar, **extra).item()
        print(f"epoch {epoch:3d}   train ELBO {-total / len(x_train):9.3f}   test ELBO {test:9.3f}")


if __name__ == "__main__":
    main()
