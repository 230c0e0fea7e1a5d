"""The SASS of the CUDA kernels, without a GPU (issue 19 item 3, issue 22).

Every csrc/cuda/*.cu is compiled standalone (the .cu files see no torch header)
with nvcc to an sm_90 cubin and disassembled with the nvdisasm that the triton
wheel ships (the CUDA toolkit here has none). Per kernel instantiation the
table gives registers, stack, the global loads and stores by width, local
memory instructions and the static instruction count; the checks:
- no local memory (LDL/STL) and no stack frame in any kernel;
- the kernels that stream [B, D] float32/bfloat16/float16 operands move them in
  128-bit loads (LDG.E.128 carries most of their static load bytes).
pytest -s prints the table; ``python tests/test_cuda_sass.py`` prints it as JSON.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_build import CU_FILES, _demangle, _nvcc, _short  # noqa: E402
from test_triton_sass import occupancy, sass_stats  # noqa: E402

ARCH = "sm_90"
THREADS = 256  # the block of every map/reduce kernel (csrc/cuda/map_kernel.h, reduce_kernel.h)


def _nvdisasm() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = Path(get_ptxas(90).path).with_name("nvdisasm")
        return str(path) if path.is_file() else None
    except Exception:
        return None


def _cuobjdump() -> str | None:
    d = _nvdisasm()
    return str(Path(d).with_name("cuobjdump")) if d else None


def kernel_stats(cubin: Path, nvdisasm: str, cuobjdump: str) -> list[dict]:
    res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+)", res)}
    sass = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"^\.text\.(\S+):\s*$", sass, flags=re.M)
    names = parts[1::2]
    full = _demangle(names)
    out = []
    for name, body in zip(names, parts[2::2]):
        regs, stack = usage.get(name, (-1, -1))
        demangled = full[name]
        short = _short(demangled)
        hits = [(short.find(t), d) for t, d in (("BFloat16", "bf16"), ("Half", "fp16"), ("double", "fp64"),
                                                ("float", "fp32")) if t in short]
        dtype = min(hits)[1] if hits else "-"  # the first storage type named: the kernel's dtype
        out.append({"file": cubin.stem, "kernel": short, "dtype": dtype, "registers": regs,
                    "stack": stack, "occupancy": occupancy(regs, THREADS // 32) if regs > 0 else 0.0,
                    **sass_stats(body)})
    return out


def collect() -> list[dict]:
    nvcc, nvdisasm, cuobjdump = _nvcc(), _nvdisasm(), _cuobjdump()
    if nvcc is None or nvdisasm is None:
        raise RuntimeError("needs nvcc and the triton wheel's nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        def one(src: Path):
            cubin = Path(tmp) / (src.stem + ".cubin")
            subprocess.run([nvcc, "-std=c++17", "-O3", "-cubin", f"-arch={ARCH}", str(src), "-o", str(cubin)],
                           check=True, capture_output=True, text=True)
            return kernel_stats(cubin, nvdisasm, cuobjdump)

        with ThreadPoolExecutor(max_workers=2) as pool:
            return [r for rs in pool.map(one, CU_FILES) for r in rs]


def table(results) -> str:
    fmt = lambda d: " ".join(f"{w}:{n}" for w, n in d.items())  # noqa: E731
    lines = [f"{'kernel':70s} {'dtype':5s} {'regs':>4s} {'occ':>5s} {'stack':>5s} {'LDG bits:count':24s} "
             f"{'STG bits:count':16s} {'local':>5s} {'SASS':>5s}"]
    for r in results:
        lines.append(f"{r['kernel'][:70]:70s} {r['dtype']:5s} {r['registers']:4d} {r['occupancy']:5.0%} "
                     f"{r['stack']:5d} {fmt(r['ldg']):24s} {fmt(r['stg']):16s} {r['local']:5d} {r['instructions']:5d}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def results():
    if _nvcc() is None or _nvdisasm() is None:
        pytest.skip("nvcc or the triton wheel's nvdisasm not found: the CUDA kernels' SASS is not checked")
    r = collect()
    print("\n" + table(r))
    return r


@pytest.mark.slow
def test_every_kernel_is_disassembled(results):
    assert {r["file"] for r in results} == {f.stem for f in CU_FILES}
    assert all(r["registers"] > 0 and r["instructions"] > 0 for r in results)


# rsample: sinf/cosf keep their far-range path (a stack frame); issue 22 item 3 is not done yet.
KNOWN_LOCAL = {"rsample"}


@pytest.mark.slow
def test_no_local_memory(results):
    bad = [f"{r['kernel']} {r['dtype']}: stack {r['stack']} B, {r['local']} LDL/STL" for r in results
           if (r["local"] or r["stack"]) and r["file"] not in KNOWN_LOCAL]
    assert not bad, "local memory in:\n" + "\n".join(bad)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="sinf/cosf far-range path: issue 22 item 3 (sincospi Box-Muller) not done")
def test_no_local_memory_in_rsample(results):
    assert not [r for r in results if r["file"] in KNOWN_LOCAL and (r["local"] or r["stack"])]


@pytest.mark.slow
def test_streaming_kernels_load_128_bits(results):
    # static counts: the tail of a row (a remainder of under one 16-byte chunk) takes the narrow loads, so
    # the check is that every streaming kernel of a 16/32-bit dtype has its 128-bit chunk loads
    streaming = [r for r in results if r["dtype"] in ("fp32", "bf16", "fp16")
                 and r["kernel"].startswith(("map_kernel", "row_reduce_kernel", "col_map_kernel"))]
    assert streaming
    narrow = [f"{r['kernel']} {r['dtype']}: {r['ldg']}" for r in streaming if r["ldg"].get("128", 0) < 2]
    assert not narrow, "no 128-bit chunk loads:\n" + "\n".join(narrow)


if __name__ == "__main__":
    print(json.dumps(collect()))
