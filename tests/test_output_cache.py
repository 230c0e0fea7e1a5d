"""The CPU kernels' cache of large results (csrc/cpu/output_cache.h).

A freed result of >= 1 MiB is kept and handed to the next request of the same
size, so a training loop does not fault fresh pages in every step. These tests
check what makes that safe: a live result is never handed out twice, freed
blocks are reused, the cap (FASTELBO_CPU_CACHE_MB) holds, results stay
ordinary tensors (resizable, writable), and memory profiling still sees them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

B, DX, DZ = 512, 1024, 16  # [B, DX] float32 = 2 MiB: cached; [B, DZ] = 32 KiB: not


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, DX, generator=g)
    recon = torch.randn(B, DX, generator=g)
    mu, lv = torch.randn(B, DZ, generator=g), torch.randn(B, DZ, generator=g) * 0.1
    return x, recon, mu, lv


def _drecon(cpu_ops, x, recon, mu, lv):
    mask = [False, True, False, False, False, False, False]
    return cpu_ops.elbo_backward(torch.ones(B), None, None, x, recon, mu, lv, None, None, None, "bernoulli", 1.0, mask)[1]


def test_freed_result_is_reused_and_live_results_are_distinct(cpu_ops):
    x, recon, mu, lv = _inputs()
    first = _drecon(cpu_ops, x, recon, mu, lv)
    second = _drecon(cpu_ops, x, recon, mu, lv)  # first still alive: must get its own memory
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    freed = second.data_ptr()
    del second
    third = _drecon(cpu_ops, x, recon, mu, lv)
    assert third.data_ptr() == freed, "a freed 2 MiB result of the same size was not reused"
    torch.testing.assert_close(third, first, rtol=0, atol=0)


def test_cached_results_are_ordinary_tensors(cpu_ops):
    x, recon, mu, lv = _inputs()
    d = _drecon(cpu_ops, x, recon, mu, lv)
    assert d.is_contiguous() and d.device.type == "cpu" and d.shape == (B, DX)
    d.mul_(2)  # writable in place
    d.resize_(2 * B, DX)  # the storage grows through the same allocator
    d[B:] = 1.0
    assert torch.equal(d[B:], torch.ones(B, DX))
    z = cpu_ops.rsample(torch.zeros(B, 2 * DX), torch.zeros(B, 2 * DX), torch.tensor(3), None)  # 4 MiB z
    assert torch.isfinite(z).all() and z.shape == (B, 2 * DX)


def test_profiler_sees_cached_results(cpu_ops):
    """fastelbo bench's peak-memory figure comes from the profiler's allocation events."""
    from fastelbo.bench.measure import peak_bytes

    x, recon, mu, lv = _inputs()
    peak = peak_bytes(lambda: _drecon(cpu_ops, x, recon, mu, lv))
    if peak is None:
        pytest.skip("this torch's profiler gives no CPU allocation events")
    assert peak >= B * DX * 4, f"peak {peak} B: the [B, Dx] result ({B * DX * 4} B) was not reported"


_CAP_SCRIPT = """
import resource, torch
from fastelbo import _backend
ops = _backend.impl("cpu", torch.device("cpu"))
x = torch.rand({B}, {DX}); recon = torch.randn({B}, {DX}); mu = torch.randn({B}, {DZ}); lv = torch.zeros({B}, {DZ})
mask = [False, True, False, False, False, False, False]
def run():
    return ops.elbo_backward(torch.ones({B}), None, None, x, recon, mu, lv, None, None, None, "bernoulli", 1.0, mask)[1]
for _ in range(3):  # warm: code, thread pool, the first result's block
    run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

PAGES = B * DX * 4 // 4096  # of one [B, DX] float32 result


@pytest.mark.parametrize("cap_mb, cached", [("0", False), ("1", False), ("4", True)])
def test_cap_from_environment(cpu_ops, cap_mb, cached):
    """What the cache is for: a step's result lands on pages already mapped (no
    page faults) instead of fresh ones (one fault per 4 KiB page). glibc is made
    to map and unmap every block itself (MALLOC_MMAP_THRESHOLD_), the worst case.
    FASTELBO_CPU_CACHE_MB caps the idle bytes: 0 turns the cache off, a cap below
    a block's size keeps none of that size."""
    env = dict(os.environ, FASTELBO_CPU_CACHE_MB=cap_mb, MALLOC_MMAP_THRESHOLD_="65536")
    script = _CAP_SCRIPT.format(B=B, DX=DX, DZ=DZ)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    faults = int(out.stdout.strip().splitlines()[-1])
    if cached:
        assert faults < PAGES // 8, f"{faults} page faults for a cached {PAGES}-page result"
    else:
        assert faults >= PAGES // 2, f"only {faults} page faults for an uncached {PAGES}-page result"
