"""Backend choice: the build-failure fallback (FallbackWarning, FASTELBO_STRICT)
and FASTELBO_BACKEND. The real build state of the process is never touched:
only fastelbo._build.cpu_extension_status is replaced, for one test."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastelbo
from fastelbo import _backend, _build
from fastelbo import functional as F
from fastelbo import reference as R

B, DX, DZ = 4, 9, 5


class SpyOps:
    """Wraps reference.OPS and records which ops ran: proof that the reference, not a kernel, ran."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        return call


@pytest.fixture
def spy(monkeypatch):
    s = SpyOps(R.OPS)
    monkeypatch.setattr(R, "OPS", s)
    return s


@pytest.fixture
def broken_cpu_build(monkeypatch):
    """The CPU extension 'failed to build' (for _backend only); warnings state reset, restored after."""
    reason = "simulated: building fastelbo's C++ CPU kernels failed (g++ not found); install g++"
    monkeypatch.setattr(_build, "cpu_extension_status", lambda: (False, reason))
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("FASTELBO_STRICT", raising=False)
    monkeypatch.delenv("FASTELBO_BACKEND", raising=False)
    return reason


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.rand(B, DX, generator=g), torch.randn(B, DX, generator=g), torch.randn(B, DZ, generator=g),
            torch.randn(B, DZ, generator=g))


def test_available_reports_the_failure(broken_cpu_build):
    ok, why = _backend.available("cpu", "cpu")
    assert not ok and why == broken_cpu_build


def test_fallback_warns_once_and_matches_reference(broken_cpu_build, spy):
    x, recon, mu, lv = _inputs()
    with pytest.warns(fastelbo.FallbackWarning, match=r"'cpu'.*reference.*g\+\+"):
        kl = F.gaussian_kl(mu, lv, backend="cpu")
    assert spy.calls == ["gaussian_kl"]
    assert torch.equal(kl, R.gaussian_kl(mu, lv))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastelbo.FallbackWarning)  # once per backend, not per call
        terms = F.elbo(recon, x, mu, lv, backend="cpu")
        z = F.rsample(mu, lv, seed=9, backend="cpu")
        loss = fastelbo.ELBOLoss(backend="cpu")(recon, x, mu, lv)
    assert spy.calls[1:] == ["elbo", "rsample", "elbo"]
    for a, b in zip(terms, R.elbo(recon, x, mu, lv)):
        assert torch.equal(a, b)
    assert torch.equal(z, R.rsample(mu, lv, seed=9))
    assert torch.equal(loss, -R.elbo(recon, x, mu, lv).elbo.mean())


def test_auto_falls_back_too(broken_cpu_build, spy):
    _, _, mu, lv = _inputs()
    with pytest.warns(fastelbo.FallbackWarning):
        F.gaussian_kl(mu, lv)  # backend="auto" on CPU tensors wants "cpu"
    assert spy.calls == ["gaussian_kl"]


def test_strict_mode_raises(broken_cpu_build, spy, monkeypatch):
    monkeypatch.setenv("FASTELBO_STRICT", "1")
    _, _, mu, lv = _inputs()
    with pytest.raises(RuntimeError, match=r"FASTELBO_STRICT.*g\+\+"):
        F.gaussian_kl(mu, lv, backend="cpu")
    with pytest.raises(RuntimeError, match="FASTELBO_STRICT"):
        F.gaussian_kl(mu, lv)
    assert spy.calls == []


def test_real_build_state_untouched():
    """After the tests above the genuine CPU extension state is as it was (monkeypatch undone)."""
    assert _build.cpu_extension_status.__module__ == "fastelbo._build"
    ok, _ = _build.cpu_extension_status()
    if ok:
        assert _backend.resolve("cpu", "cpu") == "cpu"


@pytest.mark.parametrize("env,expect_reference", [("reference", True), ("auto", False), ("cpu", False)])
def test_env_backend(monkeypatch, spy, env, expect_reference):
    ok, why = _backend.available("cpu", "cpu")
    if not ok and not expect_reference:
        pytest.skip(f"C++ CPU kernels unavailable: {why}")
    monkeypatch.setenv("FASTELBO_BACKEND", env)
    x, recon, mu, lv = _inputs()
    F.gaussian_kl(mu, lv)
    F.elbo(recon, x, mu, lv)
    assert spy.calls == (["gaussian_kl", "elbo"] if expect_reference else [])
    # an explicit backend= wins over the environment
    spy.calls.clear()
    F.gaussian_kl(mu, lv, backend="reference")
    assert spy.calls == ["gaussian_kl"]


def test_env_backend_read_at_call_time(monkeypatch, spy):
    _, _, mu, lv = _inputs()
    monkeypatch.setenv("FASTELBO_BACKEND", "reference")
    F.gaussian_kl(mu, lv)
    monkeypatch.setenv("FASTELBO_BACKEND", "REFERENCE ")  # case and spaces forgiven
    F.gaussian_kl(mu, lv)
    assert spy.calls == ["gaussian_kl", "gaussian_kl"]


# ---------------------------------------------------------------------------
# The test-only "cuda-emulated" backend (fastelbo._emulated): never a user's choice by accident.
# ---------------------------------------------------------------------------
def test_cuda_emulated_is_hidden_from_users(monkeypatch):
    from fastelbo._config import BACKENDS

    assert "cuda-emulated" not in BACKENDS  # the documented list
    _, _, mu, lv = _inputs()
    monkeypatch.setenv("FASTELBO_TEST_CUDA_EMULATED", "1")
    monkeypatch.delenv("FASTELBO_BACKEND", raising=False)
    assert _backend.resolve("auto", "cpu") != "cuda-emulated"  # auto never picks it
    monkeypatch.setenv("FASTELBO_BACKEND", "cuda-emulated")
    with pytest.raises(ValueError, match="FASTELBO_BACKEND"):  # nor does the environment's auto
        F.gaussian_kl(mu, lv)
    monkeypatch.delenv("FASTELBO_BACKEND")
    monkeypatch.setenv("FASTELBO_TEST_CUDA_EMULATED", "0")
    with pytest.raises(ValueError, match=r"test-only.*FASTELBO_TEST_CUDA_EMULATED=1"):
        F.gaussian_kl(mu, lv, backend="cuda-emulated")
    ok, why = _backend.available("cuda-emulated", "cpu")
    assert not ok and "FASTELBO_TEST_CUDA_EMULATED" in why


def test_cuda_emulated_runs_cpu_tensors_and_never_falls_back(monkeypatch, spy):
    from fastelbo import _emulated

    monkeypatch.setenv("FASTELBO_TEST_CUDA_EMULATED", "1")
    assert not _backend.available("cuda-emulated", "cuda")[0]
    with pytest.raises(ValueError, match="CPU tensors"):
        _backend.resolve("cuda-emulated", "cuda")

    def broken():
        raise _build.BuildError("simulated: the emulated kernels failed to build")

    monkeypatch.setattr(_emulated, "load", broken)
    monkeypatch.delenv("FASTELBO_STRICT", raising=False)
    _, _, mu, lv = _inputs()
    with pytest.raises(RuntimeError, match="cuda-emulated.*simulated"):  # the reference would pass every test
        F.gaussian_kl(mu, lv, backend="cuda-emulated")
    assert spy.calls == []


def test_triton_loads_where_it_is_installed():
    """triton is a dependency on Linux: if it imports, the Triton backend must load here (CPU tensors under the
    interpreter, which tests/conftest.py switches on). A broken install -- e.g. an editable install pointing at
    another checkout, where fastelbo.kernels does not import -- would otherwise turn every Triton test into a
    skip."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1 (set by tests/conftest.py when there is no GPU)")
    ok, why = _backend.available("triton", device)
    assert ok, f"triton is installed but fastelbo's Triton backend does not load: {why}"


def test_cuda_emulated_builds_where_the_cpu_backend_does():
    """The emulated CUDA backend needs what the C++ CPU backend needs (a C++ compiler, ninja, torch's headers):
    where the one builds, the other must. Otherwise a compile error in csrc/cuda (torch_ops.h included) would turn
    every emulated case into a skip and leave the CUDA kernels' logic untested while the suite stays green."""
    import os

    if os.environ.get("FASTELBO_TEST_CUDA_EMULATED") != "1":
        pytest.skip("FASTELBO_TEST_CUDA_EMULATED is not 1 (tests/conftest.py sets it unless told otherwise)")
    cpu_ok, why_cpu = _backend.available("cpu", "cpu")
    if not cpu_ok:
        pytest.skip(f"the C++ CPU backend does not build here either: {why_cpu}")
    ok, why = _backend.available("cuda-emulated", "cpu")
    assert ok, f"the C++ CPU backend builds but the emulated CUDA backend does not: {why}"
