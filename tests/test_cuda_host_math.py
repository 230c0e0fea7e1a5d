"""The math the CUDA kernels run, compiled as host code, against the CPU backend.

csrc/fastelbo_math.h holds every formula, the Philox counter RNG and
Box-Muller once, for the CPU loops and the CUDA kernels alike; csrc/cuda/device.h
adds what only the CUDA kernels need on top of it (the noise of a chunk of
columns, the float16/bfloat16 conversions). tests/cuda_host_probe.cpp includes
both and is built here with the plain host compiler, with the macro definitions
a CPU emulation of the kernels uses. Its answers are compared with:

  * torch.ops.fastelbo on CPU tensors (the C++ CPU backend): the RNG bits and
    uniforms bit for bit; the normals and every formula to a few ulp (the CPU
    build evaluates the same templates on SIMD vectors, whose exp/log/sin/cos
    are Sleef's, not libm's: a last-bit difference, never a different formula);
  * torch's own float16/bfloat16 conversions, bit for bit, exhaustively on the
    16-bit side.

No GPU and no nvcc needed: what is proven is that the one shared code path
gives the CPU backend's numbers when built for another target.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import fastelbo  # noqa: F401  (registers the ops)
from fastelbo import _build

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
PROBE_SRC = Path(__file__).resolve().parent / "cuda_host_probe.cpp"
OPS = torch.ops.fastelbo

SEEDS = [0, 1, 12345, 2**32 - 1, 2**32 + 7, 2**63 - 25, 2**64 - 1]


def _cxx() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++/clang++) on PATH")
    exe = tmp_path_factory.mktemp("cuda_host_probe") / "probe"
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wno-unknown-pragmas", f"-I{CSRC}", str(PROBE_SRC), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"host build of the shared CUDA math failed:\n{' '.join(cmd)}\n{res.stderr}"

    def ask(lines: list[str]) -> list[list[str]]:
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
        answers = [line.split() for line in out.stdout.splitlines()]
        assert len(answers) == len(lines)
        return answers

    return ask


@pytest.fixture(scope="module")
def cpu_ops():
    ok, why = _build.cpu_extension_status()
    if not ok:
        pytest.skip(f"the C++ CPU backend is unavailable: {why}")
    return OPS


def _f(tok: str) -> float:
    return math.nan if "nan" in tok else float.fromhex(tok)


def _seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)


def _ulps(a: np.ndarray, b: np.ndarray, dtype) -> np.ndarray:
    """|a - b| in units of the last place of b (in dtype), NaN-aware (NaN == NaN)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    same = (a == b) | both_nan
    spacing = np.spacing(np.abs(b).astype(dtype)).astype(np.float64)
    with np.errstate(invalid="ignore"):
        err = np.where(same, 0.0, np.abs(a - b) / spacing)
    return np.where(np.isnan(err), np.inf, err)


# ---------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------
def test_philox_words_match_the_torch_reference(probe):
    from fastelbo import _philox

    groups = [0, 1, 2, 3, 1000, 2**32 - 1, 2**32, 2**40 + 5]
    lines = [f"philox {s} {g}" for s in SEEDS for g in groups]
    got = [[int(w) for w in ans] for ans in probe(lines)]
    for s_idx, seed in enumerate(SEEDS):
        words = _philox.philox4x32_10(torch.tensor(groups, dtype=torch.int64), seed)
        for g_idx in range(len(groups)):
            want = [int(w[g_idx]) & 0xFFFFFFFF for w in words]
            assert got[s_idx * len(groups) + g_idx] == want, (seed, groups[g_idx])


@pytest.mark.parametrize("seed", SEEDS)
def test_uniforms_bit_exact_with_cpu_backend(probe, cpu_ops, seed):
    n = 1031
    cpu = cpu_ops.philox_noise(_seed_tensor(seed), n, False, torch.float32).numpy()
    host = np.array([_f(a[0]) for a in probe([f"uniform {seed} {k}" for k in range(n)])], dtype=np.float32)
    np.testing.assert_array_equal(host, cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 7, 2**63 - 25, 2**64 - 1])
def test_normals_match_cpu_backend(probe, cpu_ops, seed, dtype):
    n = 1031
    t = "f" if dtype == torch.float32 else "d"
    cpu = cpu_ops.philox_noise(_seed_tensor(seed), n, True, dtype).numpy()
    host = np.array([_f(a[0]) for a in probe([f"normal {t} {seed} {k}" for k in range(n)])])
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    # Same uniforms bit for bit (above); Box-Muller's log/sqrt/cos/sin are Sleef on the CPU, libm here.
    ulps = _ulps(host, cpu, np_dtype)
    assert ulps.max() <= 8, f"worst {ulps.max()} ulp at element {ulps.argmax()}: host {host[ulps.argmax()]!r} " \
        f"cpu {cpu[ulps.argmax()]!r}"
    np.testing.assert_allclose(host, cpu, rtol=0, atol=4e-6 if dtype == torch.float32 else 1e-14)


@pytest.mark.parametrize("kind,width", [("f8", 8), ("f4", 4), ("d4", 4)])
def test_noise_chunk_equals_normal_at(probe, kind, width):
    """noise_chunk (the kernels' path: N/4 Philox groups, or N/4 + 1 with selects when the chunk
    straddles groups) gives normal_at of each element, for every offset within a group."""
    t = "f" if kind[0] == "f" else "d"
    seed = 987654321
    starts = list(range(0, 13)) + [2**32 - 2, 2**33 + 1]
    chunks = probe([f"chunk {kind} {seed} {n0}" for n0 in starts])
    singles = probe([f"normal {t} {seed} {n0 + k}" for n0 in starts for k in range(width)])
    for i, n0 in enumerate(starts):
        assert len(chunks[i]) == width
        for k in range(width):
            assert chunks[i][k] == singles[i * width + k][0], (n0, k)


# ---------------------------------------------------------------------------
# Formulas: per-element values through [N, 1] rows of the CPU ops
# ---------------------------------------------------------------------------
def _inputs(n: int, count: int, dtype, seed: int = 0, extreme: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cols = []
    for _ in range(count):
        v = torch.randn(n, generator=g, dtype=torch.float64) * 3
        if extreme:
            v[:8] = torch.tensor([0.0, -0.0, 1e-30, -40.0, 40.0, 80.0, -80.0, 1.0])
        cols.append(v.to(dtype))
    return cols


def _hexes(cols: list[torch.Tensor]) -> list[str]:
    return [" ".join(float(c[i]).hex() for c in cols) for i in range(cols[0].numel())]


def _host(probe, name: str, dtype, cols) -> np.ndarray:
    t = "f" if dtype == torch.float32 else "d"
    answers = probe([f"{name} {t} {args}" for args in _hexes(cols)])
    return np.array([[_f(x) for x in a] for a in answers])


def _col(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1)


def _check(host: np.ndarray, cpu: list[torch.Tensor], dtype, what: str) -> None:
    """Same values to rounding: exp/log1p/log are Sleef's on the CPU's SIMD lanes and libm's here, so an
    element may differ in its last bits (more where the formula cancels, e.g. 1 - e^(lv-plv) - d^2 e^-plv
    near 0); a different formula would differ everywhere. So: nearly all elements within 4 ulp, every
    element within 64 ulp or 64 eps of the column's typical magnitude, and NaN where the CPU has NaN."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    eps = float(np.finfo(np_dtype).eps)
    for k, c in enumerate(cpu):
        c = c.reshape(-1).double().numpy()
        h = host[:, k]
        np.testing.assert_array_equal(np.isnan(h), np.isnan(c), err_msg=f"{what}[{k}] NaN parity")
        ulps = _ulps(h, c, np_dtype)
        assert np.mean(ulps <= 4) >= 0.95, f"{what}[{k}]: only {np.mean(ulps <= 4):.1%} of elements within 4 ulp"
        finite = np.isfinite(c)
        scale = max(1.0, float(np.median(np.abs(c[finite])))) if finite.any() else 1.0
        ok = (ulps <= 64) | (np.abs(h - c) <= 64 * eps * scale)
        worst = int(np.argmin(ok))
        assert ok.all(), (f"{what}[{k}]: host {h[worst]!r} vs cpu {c[worst]!r} ({ulps[worst]} ulp) "
                          f"at element {worst}")


DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reparam_and_grad(probe, cpu_ops, dtype):
    mu, lv, eps, g = _inputs(257, 4, dtype, seed=1)
    lv = lv.clamp(-60, 60)
    z = cpu_ops.rsample(_col(mu), _col(lv), torch.zeros((), dtype=torch.int64), _col(eps))
    _check(_host(probe, "reparam", dtype, [mu, lv, eps]), [z], dtype, "reparam")
    dlv, deps = cpu_ops.rsample_backward(_col(g), _col(lv), torch.zeros((), dtype=torch.int64), _col(eps),
                                         [True, True])
    _check(_host(probe, "reparam_grad", dtype, [g, lv, eps]), [dlv, deps], dtype, "reparam_grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_std_and_grad(probe, cpu_ops, dtype):
    mu, lv, g = _inputs(257, 3, dtype, seed=2)
    _check(_host(probe, "kl_std", dtype, [mu, lv]), [cpu_ops.gaussian_kl(_col(mu), _col(lv), None, None)], dtype,
           "kl_std")
    grads = cpu_ops.gaussian_kl_backward(g, _col(mu), _col(lv), None, None, [True, True, False, False])
    _check(_host(probe, "kl_std_grad", dtype, [g, mu, lv]), grads[:2], dtype, "kl_std_grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_normal_and_grad(probe, cpu_ops, dtype):
    mu, lv, pmu, plv, g = _inputs(257, 5, dtype, seed=3)
    kl = cpu_ops.gaussian_kl(_col(mu), _col(lv), _col(pmu), _col(plv))
    _check(_host(probe, "kl_normal", dtype, [mu, lv, pmu, plv]), [kl], dtype, "kl_normal")
    grads = cpu_ops.gaussian_kl_backward(g, _col(mu), _col(lv), _col(pmu), _col(plv), [True] * 4)
    _check(_host(probe, "kl_normal_grad", dtype, [g, mu, lv, pmu, plv]), grads, dtype, "kl_normal_grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bernoulli_and_grad(probe, cpu_ops, dtype):
    logits, g = _inputs(257, 2, dtype, seed=4)
    x = torch.rand(257, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    x[:4] = torch.tensor([0.0, 1.0, 0.5, 1.0], dtype=dtype)
    ll = cpu_ops.bernoulli_log_prob(_col(logits), _col(x))
    _check(_host(probe, "bernoulli_ll", dtype, [logits, x]), [ll], dtype, "bernoulli_ll")
    grads = cpu_ops.bernoulli_log_prob_backward(g, _col(logits), _col(x), [True, True])
    _check(_host(probe, "bernoulli_ll_grad", dtype, [g, logits, x]), grads, dtype, "bernoulli_ll_grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_and_grad(probe, cpu_ops, dtype):
    m, x, s, g = _inputs(257, 4, dtype, seed=6)
    s = s.clamp(-60, 60)
    ll = cpu_ops.gaussian_log_prob(_col(m), _col(x), _col(s))
    _check(_host(probe, "gaussian_ll", dtype, [m, x, s]), [ll], dtype, "gaussian_ll")
    grads = cpu_ops.gaussian_log_prob_backward(g, _col(m), _col(x), _col(s), [True, True, True])
    _check(_host(probe, "gaussian_ll_grad", dtype, [g, m, x, s]), grads, dtype, "gaussian_ll_grad")


# ---------------------------------------------------------------------------
# float16 / bfloat16 conversions of device.h (host path) against torch
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("op,dtype", [("h2f", torch.float16), ("b2f", torch.bfloat16)])
def test_16bit_to_float_exhaustive(probe, op, dtype):
    bits = torch.arange(65536, dtype=torch.int32)
    want = bits.to(torch.int16).view(dtype).float().numpy()
    got = np.array([_f(a[0]) for a in probe([f"{op} {b}" for b in range(65536)])], dtype=np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # signed zeros too


@pytest.mark.parametrize("op,dtype", [("f2h", torch.float16), ("f2b", torch.bfloat16)])
def test_float_to_16bit_round_to_nearest_even(probe, op, dtype):
    g = torch.Generator().manual_seed(8)
    # Random bit patterns over the whole float range, values near the 16-bit type's
    # range edges and ties (exactly halfway between two 16-bit values).
    xs = torch.randint(-(2**31), 2**31 - 1, (40000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    near = torch.cat([torch.randn(20000, generator=g) * s for s in (1e-8, 1e-6, 1e-4, 1.0, 6e4, 1e38)])
    lo = torch.arange(-2048, 2048, dtype=torch.int32).to(torch.int16).view(dtype).float()
    hi = (torch.arange(-2048, 2048, dtype=torch.int32) + 1).to(torch.int16).view(dtype).float()
    ties = (lo.double() + hi.double()).div(2).float()
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.99, 65520.0, 6.0e-8, 2.98e-8,
                            2.9802322387695312e-08, 5.960464477539063e-08, 3.4e38, 1e-45])
    xs = torch.cat([xs, near, ties, special]).float()
    want = xs.to(dtype).view(torch.int16).to(torch.int32).numpy() & 0xFFFF
    got = np.array([int(a[0]) for a in probe([f"{op} {float(x).hex()}" for x in xs])])
    is_nan = torch.isnan(xs).numpy()
    assert np.array_equal(got[~is_nan], want[~is_nan]), \
        f"first mismatch at {xs[~torch.from_numpy(is_nan)][np.argmax(got[~is_nan] != want[~is_nan])].item()!r}"
    # NaN stays NaN (the payload may differ from torch's canonical one).
    back = torch.from_numpy(got[is_nan].astype(np.int32)).to(torch.int16).view(dtype)
    assert torch.isnan(back).all()
