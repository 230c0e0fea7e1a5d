"""Test configuration shared by every test file.

The Triton backend runs on CPU tensors under TRITON_INTERPRET=1 when there is
no GPU: set it before anything imports triton (i.e. before fastelbo). The CUDA
kernels run on CPU tensors as the test-only "cuda-emulated" backend
(FASTELBO_TEST_CUDA_EMULATED=1, csrc/emu).
"""

import os

import pytest
import torch  # importing torch does not import triton; fastelbo (via torch._dynamo) does

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The test-only "cuda-emulated" backend: the CUDA kernels of csrc/cuda on CPU tensors through the CUDA
# emulation of csrc/emu, a fused backend of every parametrized test (=0 turns it into a skip).
os.environ.setdefault("FASTELBO_TEST_CUDA_EMULATED", "1")

import fastelbo  # noqa: E402,F401  (registers the ops)
from helpers import FUSED_BACKENDS, Backend  # noqa: E402  (asks every backend whether it runs: builds the C++ kernels)

try:  # hypothesis: bounded and deterministic enough for CI
    from hypothesis import HealthCheck, settings

    settings.register_profile("fastelbo", deadline=None, max_examples=25, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastelbo"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(params=FUSED_BACKENDS)
def fused(request) -> Backend:
    """Each fused backend as (name, device); an unavailable one is a skip that gives the reason."""
    return request.param


@pytest.fixture
def restore_validate_args():
    """Leaves fastelbo's global validate_args as it found it."""
    from fastelbo import _validate

    old = _validate._VALIDATE_ARGS
    yield
    _validate._VALIDATE_ARGS = old


@pytest.fixture(scope="session")
def cpu_ops():
    """The C++ CPU backend's ops (torch.ops.fastelbo), for tests of that backend alone; a skip with the
    reason when it is not built."""
    from fastelbo import _backend

    ok, why = _backend.available("cpu", "cpu")
    if not ok:
        pytest.skip(f"the C++ CPU backend is not available: {why}")
    return _backend.impl("cpu", torch.device("cpu"))
