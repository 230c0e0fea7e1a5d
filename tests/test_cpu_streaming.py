"""Large [B, Dx] gradients on the C++ CPU backend are written with non-temporal
stores (csrc/cpu/rows.h: map_row's stream, from kStreamElements = 2**20 elements
on AVX-512 builds), small ones with plain stores. Each gradient element depends
on its own row only, so a large call must give the bits of the same rows called
in small slices, for every dtype: whole vectors at aligned and unaligned row
starts (an odd row width leaves every other row unaligned), and masked tails.
"""

from __future__ import annotations

import pytest
import torch

B, DX, DZ = 1300, 809, 7  # 1,051,700 elements: just above the streaming threshold
SLICES = 4  # 325 rows of 809: far below it

DTYPES = [pytest.param(t, id=str(t).removeprefix("torch.")) for t in
          (torch.float32, torch.float64, torch.bfloat16, torch.float16)]


def _inputs(dtype):
    g = torch.Generator().manual_seed(2026)
    x = torch.rand(B, DX, generator=g)
    recon = 3 * torch.randn(B, DX, generator=g)
    obs = 0.3 * torch.randn(B, DX, generator=g)
    mu, lv = torch.randn(B, DZ, generator=g), 0.5 * torch.randn(B, DZ, generator=g)
    up = torch.linspace(-1, 1, B)
    return [t.to(dtype) for t in (x, recon, mu, lv, obs, up)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_large_gradients_equal_small_calls(cpu_ops, dtype, likelihood):
    x, recon, mu, lv, obs, up = _inputs(dtype)
    obs = obs if likelihood == "gaussian" else None
    mask = [True, True, True, True, likelihood == "gaussian", False, False]

    def backward(rows):
        o = obs[rows] if obs is not None else None
        return cpu_ops.elbo_backward(up[rows], None, None, x[rows], recon[rows], mu[rows], lv[rows], o, None, None,
                                     likelihood, 0.7, mask)

    whole = backward(slice(None))
    cut = B // SLICES
    parts = [backward(slice(s * cut, B if s == SLICES - 1 else (s + 1) * cut)) for s in range(SLICES)]
    asked = [i for i, m in enumerate(mask) if m]
    assert [whole[i].shape for i in asked[:2]] == [(B, DX)] * 2  # d/dx and d/drecon are large
    for i in asked:
        joined = torch.cat([p[i] for p in parts])
        assert torch.equal(whole[i], joined), f"output {i}: {(whole[i] != joined).sum()} elements differ"
