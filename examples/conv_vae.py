"""Train a small convolutional VAE on scikit-learn's handwritten digits with fastelbo, on image-shaped tensors.

    pip install "fastelbo[demo]"          # fastelbo + scikit-learn (the digits ship with it)
    python examples/conv_vae.py           # --epochs N, --channels-last

The digits are [B, 1, 8, 8] images, the latent is [B, 4, 2, 2], the decoder returns [B, 1, 8, 8]
Bernoulli logits: fastelbo.rsample and fastelbo.ELBOLoss take them as they are (each image's terms
summed per row, contiguous or channels_last, no flatten in user code).
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import fastelbo


class ConvVAE(nn.Module):
    def __init__(self, latent_channels=4, width=32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(),  # 8x8 -> 4x4
            nn.Conv2d(width, 2 * latent_channels, 4, stride=2, padding=1))  # -> 2x2: mu and logvar
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_channels, width, 4, stride=2, padding=1), nn.SiLU(),  # 2x2 -> 4x4
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU(),  # -> 8x8
            nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # q(z|x) = N(mu, exp(logvar)), each [B, C, 2, 2]
        z = fastelbo.rsample(mu, logvar)  # [B, C, 2, 2]
        return self.decoder(z), mu, logvar  # Bernoulli logits [B, 1, 8, 8]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--channels-last", action="store_true", help="images and weights in channels_last")
    parser.add_argument("--subset", type=int, default=None, help="train on the first N digits (quick runs)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    x = (torch.tensor(load_digits().data, dtype=torch.float32) / 16.0 > 0.5).float().reshape(-1, 1, 8, 8)
    x = x[torch.randperm(len(x))][:args.subset]
    n_test = max(1, len(x) // 6)
    x_test, x_train = x[:n_test], x[n_test:]
    model = ConvVAE()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x_train, x_test = (t.contiguous(memory_format=torch.channels_last) for t in (x_train, x_test))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = fastelbo.ELBOLoss(likelihood="bernoulli")  # negative ELBO, mean over the batch

    for epoch in range(1, args.epochs + 1):
        model.train()
        total = 0.0
        for batch in torch.randperm(len(x_train)).split(64):
            xb = x_train[batch]
            logits, mu, logvar = model(xb)
            loss = loss_fn(logits, xb, mu, logvar)  # [B, 1, 8, 8] and [B, 4, 2, 2], as they are
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
        model.eval()
        with torch.no_grad():
            logits, mu, logvar = model(x_test)
            test = -loss_fn(logits, x_test, mu, logvar).item()
        print(f"epoch {epoch:3d}   train ELBO {-total / len(x_train):9.3f}   test ELBO {test:9.3f}")


if __name__ == "__main__":
    main()
