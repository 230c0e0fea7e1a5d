"""`fastelbo demo` and examples/train_vae.py: they run, write their outputs, the
fused and reference runs agree, and bad arguments are one line and status 2."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastelbo import cli
from fastelbo._backend import available

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install 'fastelbo[demo]')")
pytest.importorskip("matplotlib", reason="the demo needs matplotlib (pip install 'fastelbo[demo]')")

ROOT = Path(__file__).resolve().parents[1]

# Agreement of the two runs. Both start from the same weights and see the same
# batches and the same noise (one Philox stream); they differ only in how the
# loss and its gradients are rounded: each per-row value sums 64 pixel terms
# and 8 latent terms, so fused and reference values differ by at most a few
# tens of float32 units of rounding (u = 2^-24 ~ 6e-8) relative to |ELBO|, and
# the weights after one short epoch differ at that level too. 1e-5 * |ELBO|
# is ~170 u. (Over many epochs training amplifies such last-bit differences,
# as it would a 1-ulp change to one weight, which is why the test trains one
# epoch only; measured here: <= 4e-7 nats at |ELBO| ~ 40, i.e. ~1e-8 relative.)
RTOL = 1e-5

RUN_KEYS = {"backend", "train_elbo", "test_elbo", "epoch_time_s", "median_epoch_time_s", "final_test_elbo",
            "test_iwae_log_likelihood"}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _agree(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(1.0, abs(a), abs(b))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_demo_one_epoch(tmp_path, capsys, likelihood):
    out = tmp_path / "demo-out"
    threads = torch.get_num_threads()
    rc = cli.main(["demo", "--epochs", "1", "--subset", "200", "--likelihood", likelihood, "--out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert torch.get_num_threads() == threads  # the demo's --threads is undone on return
    assert "IWAE K=64" in stdout and "max |fastelbo - reference|" in stdout
    assert "latent dimensions active" in stdout and "posterior gap IWAE_64 - ELBO" in stdout

    width, height = _png_size(out / "demo.png")
    assert width >= 800 and height >= 500, (width, height)

    result = json.loads((out / "demo.json").read_text())
    assert {"config", "runs", "max_abs_diff", "first_epoch_abs_diff", "speedup_over",
            "fastelbo_version", "torch_version", "png"} <= set(result)
    cfg = result["config"]
    assert (cfg["epochs"], cfg["likelihood"], cfg["subset"], cfg["n_train"] + cfg["n_test"]) == (1, likelihood, 200,
                                                                                                    200)
    if available("cpu", "cpu")[0]:  # the fused run must really be fused when the kernels build here
        assert cfg["backend_used"] == "cpu"
    runs = result["runs"]
    assert set(runs) == {"fastelbo", "reference", "pytorch"}
    for run in runs.values():
        assert RUN_KEYS <= set(run)
        assert len(run["train_elbo"]) == len(run["test_elbo"]) == len(run["epoch_time_s"]) == 1
        values = run["train_elbo"] + run["test_elbo"] + [run["test_iwae_log_likelihood"]]
        assert all(math.isfinite(v) for v in values), values
    assert runs["reference"]["backend"] == "reference"

    fused, ref = runs["fastelbo"], runs["reference"]
    for key in ("train_elbo", "test_elbo"):
        for a, b in zip(fused[key], ref[key]):
            assert _agree(a, b), (key, a, b)
        assert result["max_abs_diff"][key] == max(abs(a - b) for a, b in zip(fused[key], ref[key]))
    assert _agree(fused["test_iwae_log_likelihood"], ref["test_iwae_log_likelihood"])
    diag = result["diagnostics"]
    assert len(diag["kl_per_dim"]) == diag["latent"] == 8 and 0 <= diag["active_units"] <= 8
    assert diag["posterior_gap_k"] == 64 and math.isfinite(diag["posterior_gap"]) and diag["posterior_gap_stderr"] > 0
    # the IWAE bound with 64 samples is at least the one-sample ELBO, up to the noise of 33 test images
    assert fused["test_iwae_log_likelihood"] > fused["final_test_elbo"] - 1.0


def test_iwae_k1_is_an_unbiased_elbo():
    """The demo's IWAE estimate with K=1 averages to the ELBO (analytic KL) of the same model."""
    from fastelbo import _demo

    torch.manual_seed(0)
    model = _demo.VAE(z_dim=4, hidden=32)
    x = (torch.rand(4000, 64) > 0.5).float()
    iwae1 = _demo.iwae_log_likelihood(model, x, "auto", seed=1, k=1)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        kl = 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum(-1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=torch.Generator().manual_seed(2))
        elbo = (_demo.log_likelihood(model, model.decoder(z), x, "reference") - kl).mean().item()
    assert abs(iwae1 - elbo) < 0.005 * abs(elbo), (iwae1, elbo)  # measured: 0.02 nats of 45
    iwae64 = _demo.iwae_log_likelihood(model, x[:500], "auto", seed=1, k=64)
    assert iwae64 >= _demo.iwae_log_likelihood(model, x[:500], "auto", seed=1, k=1) - 1e-3


BAD_ARGS = [
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--backend", "cuda"], "backend 'cuda' cannot run on cpu"),
    (["--likelihood", "poisson"], "unknown likelihood 'poisson'"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
]
if not torch.cuda.is_available():
    BAD_ARGS.append((["--device", "cuda"], "--device cuda: no CUDA device here"))


@pytest.mark.parametrize("args,message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_demo_bad_arguments(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    rc = cli.main(["demo", *args, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fastelbo demo: error: ") and message in lines[0], lines[0]
    assert captured.out == ""
    assert not out.exists()


def test_demo_bad_backend_process_exit_status(tmp_path):
    """Through a real process: exit status 2 and exactly one line on stderr (no warning, no traceback)."""
    proc = subprocess.run([sys.executable, "-m", "fastelbo.cli", "demo", "--backend", "nope", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "fastelbo demo: error: unknown backend 'nope'; choose one of: auto, cpu, cuda, triton, reference"]


def test_demo_missing_extra_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    assert cli.main(["demo", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pip install 'fastelbo[demo]'" in err[0], err


def test_example_script_runs():
    env = dict(os.environ)
    env.pop("FASTELBO_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_vae.py"), "--epochs", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch   1"), proc.stdout
    train, test = (float(v) for v in lines[0].split()[4::3])
    assert -70 < train < 0 and -70 < test < 0, lines[0]


def test_example_marks_three_lines():
    text = (ROOT / "examples" / "train_vae.py").read_text()
    marked = [ln for ln in text.splitlines() if "# fastelbo (" in ln]
    assert [m.split("# fastelbo (")[1][:3] for m in marked] == ["1/3", "2/3", "3/3"], marked
