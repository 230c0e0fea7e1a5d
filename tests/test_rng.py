"""The noise of docs/design.md §3, checked against an INDEPENDENT numpy implementation
of Philox4x32-10 + uint->uniform + Box-Muller written here from the spec
(Random123's Philox, Triton's tl.randint4x / uint_to_uniform_float /
pair_uniform_to_normal), not imported from fastelbo._philox:

  element n of a sampled tensor (row-major over its logical shape) is lane n % 4
  of Philox4x32-10(counter = (lo32(n // 4), hi32(n // 4), 0, 0),
                   key = (lo32(seed), hi32(seed)));
  uniform(u) = float32(int32(u) if >= 0 else ~int32(u)) * float32(4.6566127342e-10);
  (n0, n1) = BoxMuller(u0, u1), (n2, n3) = BoxMuller(u2, u3),
  BoxMuller(a, b) = sqrt(-2 log(max(a, 1e-7))) * (cos, sin)(2 pi b).

Plus: moments of eps, reproducibility (torch.manual_seed, seed=, generator=),
one seed -> one z on every backend, and the backward regenerating eps
(nothing [B, Dz] saved for backward but the inputs themselves).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastelbo
from fastelbo import _philox
from fastelbo import functional as F
from fastelbo import reference as R
from helpers import assert_close, generator_for, rand, randn

# ---------------------------------------------------------------------------
# The independent numpy implementation.
# ---------------------------------------------------------------------------
_MASK32 = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # Philox4x32 multipliers
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # Weyl key increments (golden ratio, sqrt(3) - 1)


def np_philox4x32_10(ctr, key):
    """Random123 Philox4x32-10. ctr: 4 arrays, key: 2 arrays, uint32 values held in uint64. Returns 4 uint32 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in ctr)
    k0, k1 = (np.asarray(k, dtype=np.uint64) & _MASK32 for k in key)
    for rnd in range(10):
        if rnd:  # Random123: the key is bumped between rounds
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        p0, p1 = _M0 * c0, _M1 * c2  # 32 x 32 -> 64 bits: exact in uint64
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c.astype(np.uint32) for c in (c0, c1, c2, c3)]


def np_bits(seed: int, n: int) -> np.ndarray:
    """uint32 word of logical elements [0, n) for a 64-bit seed (Python int, two's complement if negative)."""
    groups = np.arange((n + 3) // 4, dtype=np.uint64)
    s = seed & 0xFFFFFFFFFFFFFFFF
    key = (np.uint64(s & 0xFFFFFFFF), np.uint64(s >> 32))
    words = np_philox4x32_10((groups & _MASK32, groups >> np.uint64(32), np.zeros_like(groups),
                              np.zeros_like(groups)), key)
    return np.stack(words, axis=-1).reshape(-1)[:n]


def np_uniform(bits: np.ndarray) -> np.ndarray:
    x = bits.view(np.int32)
    x = np.where(x < 0, ~x, x)  # -x - 1 without overflow
    return x.astype(np.float32) * np.float32(4.6566127342e-10)  # float32 product, as on the device


def np_normals(seed: int, n: int):
    """(normals in float64 from the exact float32 uniforms, radius r of each) for elements [0, n)."""
    u = np_uniform(np_bits(seed, ((n + 3) // 4) * 4)).astype(np.float64).reshape(-1, 4)
    out, radius = np.empty_like(u), np.empty_like(u)
    for a, b in ((0, 1), (2, 3)):
        r = np.sqrt(-2.0 * np.log(np.maximum(u[:, a], 1e-7)))
        th = 2.0 * math.pi * u[:, b]
        out[:, a], out[:, b] = r * np.cos(th), r * np.sin(th)
        radius[:, a] = radius[:, b] = r
    return out.reshape(-1)[:n], radius.reshape(-1)[:n]


def test_numpy_philox_known_answers():
    """The numpy Philox itself, on Random123's kat_vectors (philox4x32 10)."""
    kats = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in kats:
        got = np_philox4x32_10([np.uint64(c) for c in ctr], [np.uint64(k) for k in key])
        assert [int(w) for w in got] == list(want), (ctr, key, [hex(int(w)) for w in got])


def test_numpy_uniform_mapping_edges():
    """uint_to_uniform_float on the edge words: 0 -> 0, 2^31 - 1 and 2^31 (-> ~) -> just under 1."""
    bits = np.array([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF], dtype=np.uint32)
    u = np_uniform(bits)
    assert u[0] == 0.0 and u[4] == 0.0  # 0xFFFFFFFF = -1 -> ~(-1) = 0
    assert u[2] == u[3] and 0.99 < u[2] <= 1.0
    assert np.all(u >= 0) and np.all(u <= 1)


# ---------------------------------------------------------------------------
# The C++ stream (torch.ops.fastelbo.philox_noise) and fastelbo._philox against it.
# ---------------------------------------------------------------------------
SEEDS = [0, 1, 123456789, -1, -(2**63), 2**62 + 12345, 2**63 - 1, -987654321987]
SIZES = [1, 3, 7, 1030, 4097]  # none a multiple of 4 but... 4097 crosses 512-element chunks and threads


def _cpu_noise_available():
    ok, why = fastelbo._backend.available("cpu", "cpu")
    return pytest.mark.skipif(not ok, reason=f"C++ CPU kernels unavailable: {why}")


def _seed_t(seed):
    return torch.tensor(seed, dtype=torch.int64)


@_cpu_noise_available()
@pytest.mark.parametrize("seed", SEEDS)
def test_philox_noise_uniforms_bit_exact(seed):
    for n in SIZES:
        got = torch.ops.fastelbo.philox_noise(_seed_t(seed), n, False, torch.float32)
        assert got.dtype == torch.float32 and got.shape == (n,)
        want = np_uniform(np_bits(seed, n))
        got_bits, want_bits = got.numpy().view(np.uint32), want.view(np.uint32)
        bad = np.nonzero(got_bits != want_bits)[0]
        assert bad.size == 0, (f"seed {seed} n {n}: {bad.size} uniforms differ; first at {bad[0]}: "
                               f"{got[bad[0]].item()!r} vs numpy {want[bad[0]]!r}")


@_cpu_noise_available()
@pytest.mark.parametrize("seed", SEEDS)
def test_philox_noise_normals(seed):
    """float32 normals to float32 rounding of Box-Muller; float64 normals to float64 rounding."""
    for n in SIZES:
        want, r = np_normals(seed, n)
        got32 = torch.ops.fastelbo.philox_noise(_seed_t(seed), n, True, torch.float32).double().numpy()
        # float32: 2*pi*u rounds by 2^-24 relative (|d theta| <= 4e-7), log/sqrt/cos/sin a few ulp: 16 ulp of r.
        err32 = np.abs(got32 - want)
        k = int(np.argmax(err32 / (16 * 2.0**-23 * np.maximum(r, 1.0))))
        assert err32[k] <= 16 * 2.0**-23 * max(r[k], 1.0), (seed, n, k, got32[k], want[k], r[k])
        got64 = torch.ops.fastelbo.philox_noise(_seed_t(seed), n, True, torch.float64).numpy()
        err64 = np.abs(got64 - want)
        k = int(np.argmax(err64))
        assert err64[k] <= 1e-13 * max(r[k], 1.0), (seed, n, k, got64[k], want[k])


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_reference_philox_matches_numpy(seed):
    """fastelbo._philox (the noise of fastelbo.reference) is the same stream."""
    n = 1030
    got = _philox.uniforms(seed, n)
    assert np.array_equal(got.numpy().view(np.uint32), np_uniform(np_bits(seed, n)).view(np.uint32))
    got_t = _philox.uniforms(_seed_t(seed), n)  # an int64 seed tensor gives the same bits
    assert torch.equal(got, got_t)
    want, r = np_normals(seed, n)
    g32 = _philox.normals(seed, n, torch.float32).double().numpy()
    assert np.all(np.abs(g32 - want) <= 16 * 2.0**-23 * np.maximum(r, 1.0))
    g64 = _philox.normals(seed, n, torch.float64).numpy()
    assert np.all(np.abs(g64 - want) <= 1e-13 * np.maximum(r, 1.0))


@_cpu_noise_available()
def test_philox_noise_prefix_property_and_empty():
    """Element n does not depend on how many are drawn; n = 0 is an empty tensor."""
    s = _seed_t(42)
    long = torch.ops.fastelbo.philox_noise(s, 5003, True, torch.float32)
    for n in (1, 2, 5, 513, 4099):
        assert torch.equal(torch.ops.fastelbo.philox_noise(s, n, True, torch.float32), long[:n])
    assert torch.ops.fastelbo.philox_noise(s, 0, True, torch.float32).shape == (0,)


# ---------------------------------------------------------------------------
# Moments of eps: tolerances from the standard error (5 sigma; fixed seeds, so deterministic).
# ---------------------------------------------------------------------------
def _check_normal_sample(x: torch.Tensor, what: str):
    x = x.double().reshape(-1)
    n = x.numel()
    mean, var = x.mean().item(), x.var().item()
    assert abs(mean) < 5 / math.sqrt(n), f"{what}: mean {mean:.2e} is more than 5 standard errors from 0"
    assert abs(var - 1) < 5 * math.sqrt(2 / n), f"{what}: variance {var:.5f} is more than 5 standard errors from 1"
    skew, kurt = (x**3).mean().item(), (x**4).mean().item()
    assert abs(skew) < 5 * math.sqrt(15 / n), f"{what}: third moment {skew:.2e}"
    assert abs(kurt - 3) < 5 * math.sqrt(96 / n), f"{what}: fourth moment {kurt:.4f} (3 expected)"
    # Kolmogorov-Smirnov against N(0, 1): critical value at alpha = 1e-3 is 1.95 / sqrt(n).
    xs = x.sort().values
    cdf = torch.special.ndtr(xs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.95 / math.sqrt(n), f"{what}: KS distance {ks:.2e} >= {1.95 / math.sqrt(n):.2e}"
    # neighbours (same Philox group, and across groups) are uncorrelated
    for lag in (1, 2, 4):
        c = (x[:-lag] * x[lag:]).mean().item()
        assert abs(c) < 5 / math.sqrt(n), f"{what}: lag-{lag} correlation {c:.2e}"


@_cpu_noise_available()
def test_philox_noise_moments():
    n = 1_000_000
    _check_normal_sample(torch.ops.fastelbo.philox_noise(_seed_t(2024), n, True, torch.float32), "philox normals")
    u = torch.ops.fastelbo.philox_noise(_seed_t(2025), n, False, torch.float32).double()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    assert u.min().item() >= 0 and u.max().item() < 1
    ks = (torch.arange(1, n + 1, dtype=torch.float64) / n - u.sort().values).abs().max().item()
    assert ks < 1.95 / math.sqrt(n) + 1 / n


def test_rsample_eps_moments(fused):
    """eps through the public API (mu = 0, logvar = 0: z = eps), 2^18 samples on every backend."""
    mu = torch.zeros(512, 512, device=fused.device)
    z = F.rsample(mu, torch.zeros_like(mu), seed=777, backend=fused.name)
    _check_normal_sample(z.cpu(), f"rsample eps ({fused})")
    # and scale / shift: z = 3 + e^(ln 4 / 2) eps has mean 3, sd 2
    z = F.rsample(mu + 3, torch.full_like(mu, math.log(4.0)), seed=778, backend=fused.name).double()
    assert abs(z.mean().item() - 3) < 5 * 2 / 512 and abs(z.std().item() - 2) < 5 * 2 * math.sqrt(0.5) / 512


# ---------------------------------------------------------------------------
# The stream as rsample uses it: row-major over the logical shape, whatever the memory layout.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [5, -(2**62) - 3])
def test_rsample_follows_the_stream(fused, seed):
    B, Dz = 7, 301  # B * Dz not a multiple of 4, rows straddle Philox groups
    want, r = np_normals(seed, B * Dz)
    mu = torch.zeros(B, Dz, device=fused.device)
    for layout_mu in (mu, mu.t().contiguous().t(), torch.zeros(B, 2 * Dz, device=fused.device)[:, ::2]):
        z = F.rsample(layout_mu, torch.zeros_like(mu), seed=seed, backend=fused.name).double().cpu().numpy()
        err = np.abs(z.reshape(-1) - want)
        k = int(np.argmax(err))
        assert err[k] <= 16 * 2.0**-23 * max(r[k], 1.0), f"element {k} (row {k // Dz}): {z.reshape(-1)[k]} vs {want[k]}"


def test_same_seed_same_z_everywhere(fused):
    """seed= gives the same z on this backend and the reference (float32 and float64)."""
    g = generator_for("same-seed")
    for dtype in (torch.float32, torch.float64):
        mu, lv = randn((9, 37), g, dtype=dtype), rand((9, 37), g, -2, 2, dtype=dtype)
        for seed in (0, 31337, -5, 2**63 - 2):
            z = F.rsample(mu.to(fused.device), lv.to(fused.device), seed=seed, backend=fused.name)
            zr = R.rsample(mu, lv, seed=seed)
            assert_close(z.cpu(), zr, name=f"z for seed {seed}")
    # the unsigned spelling of a negative seed is the same 64 bits
    mu, lv = randn((3, 5), g).to(fused.device), torch.zeros(3, 5, device=fused.device)
    assert torch.equal(F.rsample(mu, lv, seed=-1, backend=fused.name),
                       F.rsample(mu, lv, seed=2**64 - 1, backend=fused.name))
    assert torch.equal(F.rsample(mu, lv, seed=torch.tensor([-1]), backend=fused.name),
                       F.rsample(mu, lv, seed=-1, backend=fused.name))


def test_seed_reproducibility(fused):
    g = generator_for("repro")
    mu, lv = randn((6, 11), g).to(fused.device), rand((6, 11), g, -1, 1).to(fused.device)
    torch.manual_seed(1234)
    z1 = F.rsample(mu, lv, backend=fused.name)
    z1b = F.rsample(mu, lv, backend=fused.name)
    torch.manual_seed(1234)
    z2 = F.rsample(mu, lv, backend=fused.name)
    assert torch.equal(z1, z2), "torch.manual_seed must make rsample reproducible"
    assert not torch.equal(z1, z1b), "two draws from the default generator must differ"
    # generator=: a private stream, reproducible, and it advances
    gen = torch.Generator(device=fused.device).manual_seed(99)
    a1, a2 = F.rsample(mu, lv, generator=gen, backend=fused.name), F.rsample(mu, lv, generator=gen, backend=fused.name)
    gen.manual_seed(99)
    b1 = F.rsample(mu, lv, generator=gen, backend=fused.name)
    assert torch.equal(a1, b1) and not torch.equal(a1, a2)
    # a private generator leaves the default one alone
    torch.manual_seed(1234)
    F.rsample(mu, lv, generator=torch.Generator(device=fused.device).manual_seed(5), backend=fused.name)
    assert torch.equal(F.rsample(mu, lv, backend=fused.name), z1)
    # different seeds, different noise
    assert not torch.equal(F.rsample(mu, lv, seed=1, backend=fused.name), F.rsample(mu, lv, seed=2, backend=fused.name))


def test_generator_and_default_seed_match_reference(fused):
    """The seed drawn from a generator is the reference's: the same generator state gives the same z."""
    g = generator_for("gen-ref")
    mu, lv = randn((4, 13), g).to(fused.device), rand((4, 13), g, -1, 1).to(fused.device)
    z = F.rsample(mu, lv, generator=torch.Generator(fused.device).manual_seed(8), backend=fused.name)
    zr = R.rsample(mu, lv, generator=torch.Generator(fused.device).manual_seed(8))
    assert_close(z.cpu(), zr.cpu(), name="z from generator=")
    torch.manual_seed(21)
    z = F.rsample(mu, lv, backend=fused.name)
    torch.manual_seed(21)
    assert_close(z.cpu(), R.rsample(mu, lv).cpu(), name="z from the default generator")


# ---------------------------------------------------------------------------
# The backward regenerates eps: nothing [B, Dz] is saved but the inputs themselves.
# ---------------------------------------------------------------------------
def _record_saved(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _assert_only_inputs_saved(saved, inputs, B, D, what):
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    for t in saved:
        nbytes = t.untyped_storage().nbytes()
        if t.untyped_storage().data_ptr() in input_storages:
            continue
        assert nbytes < B * D * t.element_size(), (
            f"{what} saved a tensor of shape {tuple(t.shape)} ({nbytes} bytes of storage) that is not an input: "
            "eps or an intermediate [B, D] was kept for backward")


@pytest.mark.parametrize("requires", ["both", "mu_only", "logvar_only"])
def test_rsample_saves_no_noise(fused, requires):
    B, Dz = 64, 33
    g = generator_for("saved", requires)
    mu = randn((B, Dz), g).to(fused.device).requires_grad_(requires != "logvar_only")
    lv = rand((B, Dz), g, -1, 1).to(fused.device).requires_grad_(requires != "mu_only")
    z, saved = _record_saved(lambda: F.rsample(mu, lv, seed=11, backend=fused.name))
    _assert_only_inputs_saved(saved, [mu, lv], B, Dz, "rsample")
    up = randn((B, Dz), g).to(fused.device)
    z.backward(up)
    # ... and the regenerated eps is the forward's: dlogvar = g * (z - mu) / 2
    if lv.requires_grad:
        assert_close(lv.grad.cpu(), (up * (z.detach() - mu.detach()) / 2).cpu(), name="dlogvar from regenerated eps")
    if mu.requires_grad:
        assert torch.equal(mu.grad, up)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_elbo_saves_only_inputs(fused, likelihood):
    B, Dx, Dz = 32, 50, 17
    g = generator_for("saved-elbo", likelihood)
    dev = fused.device
    x = rand((B, Dx), g, 0, 1).to(dev).requires_grad_()
    recon = randn((B, Dx), g).to(dev).requires_grad_()
    mu, lv = randn((B, Dz), g).to(dev).requires_grad_(), rand((B, Dz), g, -1, 1).to(dev).requires_grad_()
    pmu, plv = randn((Dz,), g).to(dev).requires_grad_(), rand((Dz,), g, -1, 1).to(dev).requires_grad_()
    obs = rand((Dx,), g, -1, 1).to(dev).requires_grad_() if likelihood == "gaussian" else None
    inputs = [x, recon, mu, lv, pmu, plv] + ([obs] if obs is not None else [])
    out, saved = _record_saved(lambda: F.elbo(recon, x, mu, lv, likelihood=likelihood, obs_logvar=obs, prior_mu=pmu,
                                              prior_logvar=plv, beta=0.5, backend=fused.name))
    assert saved, "the elbo op saved nothing at all: its backward could not work"
    _assert_only_inputs_saved(saved, inputs, B, Dz, "elbo")
    out.elbo.backward(torch.linspace(-1, 2, B, device=dev))
    assert all(t.grad is not None for t in inputs)
