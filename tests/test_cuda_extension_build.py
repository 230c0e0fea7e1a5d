"""The full CUDA extension (csrc/cuda: kernels + binding.cpp) builds, links, loads
and registers a CUDA kernel for every fastelbo op, against the CUDA build of torch.

The test environment has the CPU build of torch, so the check runs in another
Python: the one FASTELBO_CUDA_TORCH_PYTHON names (e.g. the environment
.ci/cuda-build-check creates, ~/.cache/fastelbo/venv-cuda-torch2.14.1/bin/python).
Without it the test is skipped; CI runs the same check as its own step,
.ci/cuda-build-check, which also creates that environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / ".ci" / "cuda_build_check.py"
ENV_VAR = "FASTELBO_CUDA_TORCH_PYTHON"


@pytest.mark.slow
def test_cuda_extension_builds_links_and_registers_every_op(tmp_path):
    python = os.environ.get(ENV_VAR)
    if not python:
        pytest.skip(f"set {ENV_VAR} to the python of an environment with the CUDA build of torch to build the "
                    "CUDA extension here (CI: .ci/cuda-build-check creates one and runs this check)")
    if not Path(python).exists():
        pytest.fail(f"{ENV_VAR}={python} does not exist")
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    env.setdefault("FASTELBO_CACHE_DIR", str(tmp_path / "cache"))
    res = subprocess.run([python, str(CHECK)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    sys.stdout.write(res.stdout)
    assert res.returncode == 0, f"CUDA extension build check failed:\n{res.stdout[-8000:]}\n{res.stderr[-8000:]}"
    assert "OK: CUDA extension builds" in res.stdout
