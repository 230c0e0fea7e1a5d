"""The CPU kernels on an AVX2 machine: built and checked here by asking torch for its AVX2 kernels.

fastelbo picks its SIMD flags from torch.backends.cpu.get_cpu_capability(), and ATEN_CPU_CAPABILITY=avx2
makes torch report AVX2 on this AVX-512 machine. The AVX-512-only fast paths (vectorized Philox,
table exp, polynomial log1p) then fall back to their portable versions: that build must compile and
give the reference's numbers and the same noise bits, and its 16-bit Bernoulli tables must equal its
float32 kernel bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import torch, fastelbo
    from fastelbo import _build, _philox, reference as R
    assert torch.backends.cpu.get_cpu_capability() == "AVX2", torch.backends.cpu.get_cpu_capability()
    flags = _build.cpu_cflags()
    assert "-mavx2" in flags and not any("avx512" in f for f in flags), flags
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)):
        x = torch.rand(33, 785, generator=g).to(dtype)
        recon = (3 * torch.randn(3, 33, 785, generator=g)).to(dtype).requires_grad_()
        mu = torch.randn(33, 17, generator=g).to(dtype).requires_grad_()
        lv = torch.randn(33, 17, generator=g).to(dtype).requires_grad_()
        out = []
        for be in ("cpu", "reference"):
            z = fastelbo.rsample(mu, lv, num_samples=3, seed=123, backend=be)
            loss = fastelbo.ELBOLoss(backend=be)(recon, x, mu, lv) + (z.float() ** 2).mean()
            out.append([loss.detach(), z.detach(), *torch.autograd.grad(loss, [recon, mu, lv])])
        for a, b in zip(*out):
            err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1)).item()
            assert err < tol, (dtype, err)
    # Every 16-bit logit: the AVX2 tables of csrc/cpu/half_tables.h (in use: FASTELBO_HALF_TABLES=1)
    # equal the float32 kernel bit for bit (tests/test_cpu_half_io.py does the same on AVX-512).
    tables = ["log1p_exp_neg_abs", "sigmoid"]
    assert _build.cpu_half_tables() == {"bfloat16": tables, "float16": tables}, _build.cpu_half_tables()
    import sys, os
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from fastelbo import _backend
    from test_cpu_half_io import test_bernoulli_every_16bit_logit
    for dtype in (torch.bfloat16, torch.float16):
        test_bernoulli_every_16bit_logit(_backend.impl("cpu", torch.device("cpu")), dtype)
    n = 4 * 1031 + 3
    bits = torch.ops.fastelbo.philox_noise(torch.tensor(77), n, False, torch.float32)
    assert torch.equal(bits, _philox.uniforms(torch.tensor(77), n)), "uniform bits differ"
    print("AVX2 OK")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the JIT build of the CPU kernels is Linux-only")
def test_avx2_build_matches_the_reference():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU runs {torch.backends.cpu.get_cpu_capability()}, not AVX2")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "FASTELBO_STRICT": "1", "FASTELBO_HALF_TABLES": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "AVX2 OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
