"""Train a two-layer hierarchical VAE (top-down, as in Ladder VAE / NVAE) on scikit-learn's digits, its KL
terms on fastelbo's fused kernels.

    pip install "fastelbo[demo]"               # fastelbo + scikit-learn (the digits ship with it)
    python examples/hierarchical_vae.py        # --epochs N

Generative model: z2 ~ N(0, I) over [C, 2, 2], z1 | z2 ~ N(mu_p(z2), e^lv_p(z2)) over [C, 4, 4],
x | z1, z2 ~ Bernoulli(decoder). Inference runs top-down too: q(z2 | x), then q(z1 | x, z2). The ELBO is

    log p(x | z1, z2) - KL(q(z2 | x) || N(0, I)) - KL(q(z1 | x, z2) || p(z1 | z2))

where the second KL is between two learned diagonal Gaussians: its gradient reaches both the encoder
(q) and the decoder's prior (p). Each KL is one fused op over the image-shaped latent
(DiagonalGaussian.kl, other=None for the standard normal, other=the prior for the learned one).
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import fastelbo
from fastelbo import DiagonalGaussian


def conv(cin, cout, **kw):
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


class HierarchicalVAE(nn.Module):
    def __init__(self, c=4, width=32):
        super().__init__()
        self.up1 = nn.Sequential(conv(1, width), nn.SiLU(), nn.Conv2d(width, width, 4, 2, 1), nn.SiLU())  # 4x4
        self.up2 = nn.Sequential(nn.Conv2d(width, width, 4, 2, 1), nn.SiLU())  # 2x2
        self.q2 = conv(width, 2 * c)  # q(z2 | x): moments over [c, 2, 2]
        self.down = nn.Sequential(nn.ConvTranspose2d(c, width, 4, 2, 1), nn.SiLU())  # z2 -> features at 4x4
        self.p1 = conv(width, 2 * c)  # p(z1 | z2): the learned prior's moments over [c, 4, 4]
        self.q1 = conv(2 * width, 2 * c)  # q(z1 | x, z2): from the bottom-up and the top-down features
        self.out = nn.Sequential(conv(c + width, width), nn.SiLU(), nn.ConvTranspose2d(width, 1, 4, 2, 1))  # 8x8

    def forward(self, x):
        """(Bernoulli logits [B, 1, 8, 8], KL of the top layer [B], KL of the bottom layer [B])."""
        h1 = self.up1(x)
        q2 = DiagonalGaussian(self.q2(self.up2(h1)))
        z2 = q2.sample()
        d1 = self.down(z2)
        p1 = DiagonalGaussian(self.p1(d1))
        q1 = DiagonalGaussian(self.q1(torch.cat([h1, d1], 1)))
        z1 = q1.sample()
        logits = self.out(torch.cat([z1, d1], 1))
        return logits, q2.kl(), q1.kl(p1)  # KL to N(0, I); KL between two learned Gaussians


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--subset", type=int, default=None, help="train on the first N digits (quick runs)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    x = (torch.tensor(load_digits().data, dtype=torch.float32) / 16.0 > 0.5).float().reshape(-1, 1, 8, 8)
    x = x[torch.randperm(len(x))][:args.subset]
    n_test = max(1, len(x) // 6)
    x_test, x_train = x[:n_test], x[n_test:]
    model = HierarchicalVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def elbo(xb):
        logits, kl2, kl1 = model(xb)
        ll = fastelbo.bernoulli_log_prob(logits, xb)  # [B]: each image's [1, 8, 8] terms summed
        return ll - kl2 - kl1, kl2, kl1

    for epoch in range(1, args.epochs + 1):
        model.train()
        totals = torch.zeros(3)
        for batch in torch.randperm(len(x_train)).split(64):
            bound, kl2, kl1 = elbo(x_train[batch])
            loss = -bound.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals += torch.stack([bound.sum(), kl2.sum(), kl1.sum()]).detach()
        model.eval()
        with torch.no_grad():
            test = elbo(x_test)[0].mean().item()
        train, kl2, kl1 = (totals / len(x_train)).tolist()
        print(f"epoch {epoch:3d}   train ELBO {train:9.3f}   KL top {kl2:7.3f}   KL bottom {kl1:7.3f}   "
              f"test ELBO {test:9.3f}")


if __name__ == "__main__":
    main()
