"""Per-call overhead on the tiny shape (B=32, Dx=64, Dz=8), forward without grad,
through each layer: the Python API (fastelbo.<fn>), the op through the
dispatcher with its Autograd key (torch.ops.fastelbo.<op>), and the raw kernel
(OpOverload.redispatch to the device key); plus one ATen op from Python as the
floor. The differences are the cost of each layer."""

import pytest
import torch

import fastelbo
from fastelbo.bench import cases as C
from fastelbo.bench import measure as M

LAYERS = ("api", "op", "raw")
OPS = ("rsample", "kl", "bernoulli", "gaussian", "elbo", "ELBOLoss")


def _backends():
    names, _ = C.impl_names("cuda" if torch.cuda.is_available() else "cpu")
    return [n[len(C.FASTELBO_PREFIX):] for n in names if n.startswith(C.FASTELBO_PREFIX)]


@pytest.fixture(scope="module")
def calls(device):
    """{(op, layer, backend): callable} built by the same code as `fastelbo bench`'s overhead table."""
    return M.overhead_callables(C.TINY, "float32", device, _backends())


@pytest.mark.benchmark(max_time=0.25, min_rounds=20)
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("op", OPS)
def test_overhead(benchmark, calls, op, layer, backend, device):
    fn = calls[(op, layer, backend)]
    M.warm_up(fn, 20, device)
    benchmark.group = f"overhead {op} {C.TINY.id} float32"
    benchmark(fn)


@pytest.mark.benchmark(max_time=0.25, min_rounds=20)
def test_overhead_aten_floor(benchmark, device):
    x = torch.rand(C.TINY.B, C.TINY.Dx, device=device)
    benchmark.group = "overhead floor"
    benchmark(torch.neg, x)
