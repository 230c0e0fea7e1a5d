"""examples/kl_autoencoder.py, hierarchical_vae.py and conv_vae.py: they run on a small subset and learn
(the second epoch beats the first, from a fixed seed); the KL-autoencoder uses fastelbo's posterior, the
hierarchical KL reaches both of its Gaussians, the convolutional VAE flattens nothing.
examples/train_vae.py is tested in test_demo.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastelbo

pytest.importorskip("sklearn", reason="the examples need scikit-learn (pip install 'fastelbo[demo]')")

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    env = dict(os.environ)
    env.pop("FASTELBO_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--epochs", "2", "--subset", "300", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines] == [["epoch", "1"], ["epoch", "2"]], proc.stdout
    return [[float(v) for v in ln.split()[2:] if v.replace(".", "").lstrip("-").isdigit()] for ln in lines]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kl_autoencoder_runs_and_learns(layout):
    epochs = _run("kl_autoencoder.py", *(["--channels-last"] if layout == "channels_last" else []))
    (rec1, kl1, test1), (rec2, kl2, test2) = epochs
    assert 0 < test2 < test1 and rec2 < rec1, epochs  # L1 falls
    assert kl1 >= 0 and kl2 >= 0, epochs


def test_hierarchical_vae_runs_and_learns():
    epochs = _run("hierarchical_vae.py")
    (train1, top1, bottom1, test1), (train2, top2, bottom2, test2) = epochs
    assert -70 < test1 < test2 < 0 and train1 < train2, epochs  # the ELBO rises
    assert min(top1, bottom1, top2, bottom2) >= 0, epochs


def _load(script):
    spec = importlib.util.spec_from_file_location(script, ROOT / "examples" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kl_autoencoder_posterior_is_fastelbos():
    """The one changed import: the model's posterior is fastelbo's class, and its KL is the fused op's."""
    ex = _load("kl_autoencoder")
    assert ex.DiagonalGaussianDistribution is fastelbo.DiagonalGaussian
    torch.manual_seed(0)
    posterior = ex.KLAutoencoder().encode(torch.rand(3, 1, 8, 8))
    assert isinstance(posterior, fastelbo.DiagonalGaussian) and posterior.mean.shape == (3, 4, 4, 4)
    expected = fastelbo.reference.gaussian_kl(posterior.mean.flatten(1), posterior.logvar.flatten(1))
    assert torch.allclose(posterior.kl(), expected, rtol=1e-5, atol=1e-6)


def test_hierarchical_kl_reaches_both_sides():
    """The bottom layer's KL is between two learned Gaussians: it sends gradients to q's and p's weights."""
    ex = _load("hierarchical_vae")
    torch.manual_seed(0)
    model = ex.HierarchicalVAE()
    _, _, kl_bottom = model((torch.rand(5, 1, 8, 8) > 0.5).float())
    g_q, g_p = torch.autograd.grad(kl_bottom.sum(), [model.q1.weight, model.p1.weight])
    assert g_q.abs().sum() > 0 and g_p.abs().sum() > 0


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_vae_runs_and_learns(layout):
    """Image-shaped tensors straight into rsample and ELBOLoss: no flatten in the example."""
    epochs = _run("conv_vae.py", *(["--channels-last"] if layout == "channels_last" else []))
    (train1, test1), (train2, test2) = epochs
    assert -70 < test1 < test2 < 0 and train1 < train2, epochs
    assert ".flatten(" not in (ROOT / "examples" / "conv_vae.py").read_text()
