"""validate_args on CUDA without a host sync (issue 19 item 4).

The check that Bernoulli targets lie in [0, 1] must not read a flag back to the
host on a GPU: one sync per call, and a CUDA-graph capture error. On CPU
tensors it stays a ValueError raised at once (tests/test_bad_input.py). Here,
without a GPU:
- the Python paths (reference backend, the Triton launchers' check) on a
  non-CPU device only queue torch._assert_async: no aten op that reads a value
  to the host runs (the dispatch mode records every op);
- the C++ CUDA path: csrc/cuda/binding.cpp checks the flag by launching the
  device-assert kernel of csrc/cuda/loglik.cu, and no host read of device
  memory (.item, _local_scalar_dense, cudaMemcpy, a synchronize) appears in
  the CUDA ops' host code; the kernel's message is the CPU kernels' message.
On a GPU (skipped here, with the reason): a training step with validate_args
on is captured and replayed with torch.cuda.graphs on the cuda and triton
backends, and a bad x fails with a device-side assert.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastelbo
import fastelbo.functional as F
from fastelbo._validate import raise_if_flagged, unit_interval

ROOT = Path(__file__).resolve().parents[1]
HOST_READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default",
              "aten.equal.default"}
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops_of(fn) -> list[str]:
    with RecordOps() as rec:
        fn()
    return rec.ops


# ---------------------------------------------------------------------------
# Python paths
# ---------------------------------------------------------------------------
def test_accelerator_flags_queue_an_assert_without_a_host_read():
    # meta stands in for a GPU: any non-CPU tensor takes the asynchronous branch (a host read of
    # a meta tensor would raise, so the old code fails here)
    x = torch.rand(4, 5, device="meta")
    ops = _ops_of(lambda: unit_interval(x))
    assert "aten._assert_async.msg" in ops
    assert not HOST_READS & set(ops), ops


def test_triton_launcher_check_queues_an_assert_without_a_host_read():
    from kernels._checks import X_RANGE_MESSAGE, check_unit_interval

    bad_rows = torch.zeros(8, dtype=torch.int8, device="meta")
    ops = _ops_of(lambda: check_unit_interval(bad_rows))
    assert "aten._assert_async.msg" in ops
    assert not HOST_READS & set(ops), ops
    assert X_RANGE_MESSAGE.startswith("fastelbo: x must lie in [0, 1]")


def test_cpu_flags_still_raise_value_error_at_once():
    with pytest.raises(ValueError, match=r"\bx\b.*\[0, 1\]"):
        unit_interval(torch.tensor([[0.5, 1.5]]))
    unit_interval(torch.tensor([[0.0, 1.0, float("nan")]]))  # NaN passes
    with pytest.raises(ValueError, match="boom"):
        raise_if_flagged(torch.tensor([False, True]), "boom")


# ---------------------------------------------------------------------------
# The C++ CUDA path (its host code; the kernels run only on a GPU)
# ---------------------------------------------------------------------------
def _code(path: Path) -> str:
    """The file without // comments (they may name what the code avoids)."""
    return re.sub(r"//[^\n]*", "", path.read_text())


def test_cuda_ops_host_code_reads_nothing_back():
    for name in ("torch_ops.h", "binding.cpp"):
        code = _code(ROOT / "csrc" / "cuda" / name)
        for pattern in (r"\.item\s*<", r"\.item\s*\(", r"_local_scalar_dense", r"cudaMemcpy", r"Synchronize",
                        r"\.cpu\s*\(", r"at::kCPU"):
            assert not re.search(pattern, code), f"csrc/cuda/{name}: host read {pattern!r}"


def test_cuda_device_checks_the_flag_with_the_assert_kernel():
    binding = _code(ROOT / "csrc" / "cuda" / "binding.cpp")
    body = re.search(r"static void check_x_flag\(const at::Tensor& flag\) \{(.*?)\n  \}", binding, re.S)
    assert body, "CudaDevice::check_x_flag is missing"
    assert "assert_x_in_unit_interval(" in body.group(1)
    ops = _code(ROOT / "csrc" / "cuda" / "torch_ops.h")
    assert ops.count("Device::check_x_flag(flag)") == 3  # bernoulli_log_prob, elbo, iwae_bound
    kernel = _code(ROOT / "csrc" / "cuda" / "loglik.cu")
    assert re.search(r"if \(\*x_out_of_range != 0\) assert_fail\(FASTELBO_X_RANGE_MESSAGE", kernel)
    assert "__assert_fail(msg" in _code(ROOT / "csrc" / "cuda" / "device.h")


def test_device_assert_message_is_the_cpu_message():
    launchers = (ROOT / "csrc" / "cuda" / "launchers.h").read_text()
    checks = (ROOT / "csrc" / "checks.h").read_text()
    device = re.search(r'#define FASTELBO_X_RANGE_MESSAGE \\\n\s*"([^"]+)"', launchers).group(1)
    cpu = "".join(re.findall(r'"([^"]*)"', re.search(r"check_x_in_unit_interval\(bool.*?\);", checks, re.S).group(0)))
    assert device == cpu


# ---------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------
def _step_inputs(device, B=64, DX=784, DZ=16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand(B, DX, generator=g).to(device)
    enc = torch.nn.Linear(DX, 2 * DZ).to(device)
    dec = torch.nn.Linear(DZ, DX).to(device)
    return x, enc, dec


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_training_step_with_validation_captures_in_a_cuda_graph(backend):
    x, enc, dec = _step_inputs("cuda")
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3)
    loss_fn = fastelbo.ELBOLoss(backend=backend, validate_args=True)
    eps = torch.randn(x.shape[0], 16, device="cuda")  # static noise: a seed drawn per call would copy from the host

    def step():
        opt.zero_grad(set_to_none=False)
        mu, logvar = enc(x).chunk(2, dim=1)
        z = F.rsample(mu, logvar, eps=eps, backend=backend)
        loss = loss_fn(dec(z), x, mu, logvar)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: Triton compiles, autotunes, allocator settles
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    before = [p.detach().clone() for p in params]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss).all()
    assert any(not torch.equal(b, p) for b, p in zip(before, params)), "the replay did not update the weights"


_BAD_X = """
import torch, fastelbo.functional as F
x = torch.rand(8, 32, device="cuda") + 1.5
out = F.bernoulli_log_prob(torch.zeros(8, 32, device="cuda"), x, backend="{backend}")
torch.cuda.synchronize()
print("NO ERROR")
"""


@GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bad_x_on_cuda_is_a_device_side_assert(backend):
    # a device assert poisons the CUDA context: in a child process
    proc = subprocess.run([sys.executable, "-c", _BAD_X.format(backend=backend)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "NO ERROR" not in proc.stdout
    assert proc.returncode != 0
    assert "device-side assert" in proc.stderr, proc.stderr[-2000:]
    if backend == "cuda":  # our kernel's assert names the rule (torch's own async assert prints only its condition)
        assert "x must lie in [0, 1]" in proc.stderr, proc.stderr[-2000:]
