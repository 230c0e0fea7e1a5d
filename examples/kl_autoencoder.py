"""Train a small convolutional KL-autoencoder (the latent-diffusion autoencoder, diffusers' AutoencoderKL)
on scikit-learn's handwritten digits, with fastelbo.DiagonalGaussian as its posterior.

    pip install "fastelbo[demo]"               # fastelbo + scikit-learn (the digits ship with it)
    python examples/kl_autoencoder.py          # --epochs N, --kl-weight W, --channels-last

The encoder maps an image [B, 1, 8, 8] to the moments [B, 2C, 4, 4] of a
diagonal Gaussian over a [B, C, 4, 4] latent; the decoder maps a sample back
to an image. The loss is latent diffusion's: a reconstruction term (L1, as in
CompVis' ldm) plus kl_weight * KL(q(z|x) || N(0, I)). A diffusers training
script changes one line, the import marked "fastelbo (1/1)": the posterior's
sample(), kl() and nll() then run fastelbo's fused kernels, with the same
numbers as diffusers' class (tests/test_posterior.py).
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

# from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from fastelbo import DiagonalGaussian as DiagonalGaussianDistribution  # fastelbo (1/1)


class KLAutoencoder(nn.Module):
    def __init__(self, latent_channels=4, width=32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(),  # 8x8 -> 4x4
            nn.Conv2d(width, 2 * latent_channels, 3, padding=1))  # the moments: mean and logvar
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU(),  # 4x4 -> 8x8
            nn.Conv2d(width, 1, 3, padding=1))

    def encode(self, x):
        return DiagonalGaussianDistribution(self.encoder(x))  # as AutoencoderKL.encode(x).latent_dist

    def forward(self, x, sample_posterior=True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decoder(z), posterior


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--channels-last", action="store_true", help="images and weights in channels_last")
    parser.add_argument("--subset", type=int, default=None, help="train on the first N digits (quick runs)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    x = torch.tensor(load_digits().data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0  # in [-1, 1]
    x = x[torch.randperm(len(x))][:args.subset]
    n_test = max(1, len(x) // 6)
    x_test, x_train = x[:n_test], x[n_test:]
    model = KLAutoencoder()
    if args.channels_last:  # the posterior reads channels_last latents without a copy of the logvar
        model = model.to(memory_format=torch.channels_last)
        x_train, x_test = (t.contiguous(memory_format=torch.channels_last) for t in (x_train, x_test))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    for epoch in range(1, args.epochs + 1):
        model.train()
        total_rec = total_kl = 0.0
        for batch in torch.randperm(len(x_train)).split(64):
            xb = x_train[batch]
            recon, posterior = model(xb)
            rec = (recon - xb).abs().sum(dim=[1, 2, 3])  # L1 per image
            kl = posterior.kl()  # [B], one fused KL over [B, C, 4, 4]
            loss = (rec + args.kl_weight * kl).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_rec += rec.sum().item()
            total_kl += kl.sum().item()
        model.eval()
        with torch.no_grad():
            recon, posterior = model(x_test, sample_posterior=False)
            test_rec = (recon - x_test).abs().sum(dim=[1, 2, 3]).mean().item()
        n = len(x_train)
        print(f"epoch {epoch:3d}   train L1 {total_rec / n:8.3f}   train KL {total_kl / n:8.3f}   "
              f"test L1 (mode) {test_rec:8.3f}")


if __name__ == "__main__":
    main()
