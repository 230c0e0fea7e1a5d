"""The CUDA kernels build for the GPUs fastelbo targets, without a GPU.

Every csrc/cuda/*.cu is compiled by nvcc for sm_80 (A100) and sm_90 (H100) with
`-Xptxas -v`; ptxas' report is parsed and every kernel must have zero spill
stores and loads. The registers per kernel are printed (pytest -s, or -rA)
as a table. Also checked: the sources keep to the CUDA subset of
csrc/cuda/SUBSET.md that the CPU emulation of csrc/emu compiles (issue 8): no
torch header in the kernels, no `<<<...>>>` outside the one launch macro, only
the keywords, intrinsics and atomics the emulation provides.

Skipped with the reason when nvcc is absent. The full extension (binding.cpp +
kernels, linked against the CUDA build of torch) is checked by
tests/test_cuda_extension_build.py / .ci/cuda-build-check.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
_FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
_REGS = re.compile(r"Used (?P<regs>\d+) registers")


def _nvcc() -> str | None:
    try:
        from fastelbo._build import cuda_home

        home = cuda_home()
        if home is not None:
            return str(home / "bin" / "nvcc")
    except Exception:
        pass
    return shutil.which("nvcc")


def parse_ptxas(text: str) -> list[dict]:
    """One record per (kernel, arch): name, arch, regs, stack, spill_stores, spill_loads."""
    kernels: list[dict] = []
    current = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"name": m["name"], "arch": m["arch"], "regs": None, "stack": None, "spill_stores": None,
                       "spill_loads": None}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m and current["stack"] is None:
            current.update(stack=int(m["stack"]), spill_stores=int(m["st"]), spill_loads=int(m["ld"]))
        m = _REGS.search(line)
        if m and current["regs"] is None:
            current["regs"] = int(m["regs"])
    return kernels


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(name: str) -> str:
    """map_kernel<KLNormalGrad<double>, NoJob> from the demangled signature."""
    name = name.replace("fastelbo::cuda::", "").replace("(anonymous namespace)::", "")
    depth, end = 0, len(name)
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            end = i
            break
    name = name[:end]
    return name[5:] if name.startswith("void ") else name


def compile_cu(nvcc: str, src: Path, out_dir: Path) -> tuple[int, str, list[str]]:
    cmd = [nvcc, "-std=c++17", "-O3", "-c", str(src), "-o", str(out_dir / (src.stem + ".o")), "-Xptxas", "-v"]
    for arch in ARCHS:
        num = arch[3:]
        cmd += ["-gencode", f"arch=compute_{num},code={arch}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr, cmd


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): the CUDA kernels' build is not checked")
    out_dir = tmp_path_factory.mktemp("nvcc")
    with ThreadPoolExecutor(max_workers=max(1, min(len(CU_FILES), os.cpu_count() or 1))) as pool:
        results = dict(zip(CU_FILES, pool.map(lambda f: compile_cu(nvcc, f, out_dir), CU_FILES)))
    return results


def test_there_are_cuda_sources():
    names = {f.name for f in CU_FILES}
    assert {"rsample.cu", "kl.cu", "loglik.cu", "elbo.cu"} <= names
    assert (CUDA_DIR / "launchers.h").is_file() and (CUDA_DIR / "binding.cpp").is_file()


@pytest.mark.parametrize("src", CU_FILES, ids=[f.name for f in CU_FILES])
def test_cu_compiles_without_spills(ptxas_reports, src):
    rc, log, cmd = ptxas_reports[src]
    assert rc == 0, f"nvcc failed on {src.name}:\n{' '.join(cmd)}\n{log[-6000:]}"
    kernels = parse_ptxas(log)
    for arch in ARCHS:
        assert any(k["arch"] == arch for k in kernels), f"no kernel compiled for {arch} in {src.name}:\n{log[-3000:]}"
    names = _demangle(sorted({k["name"] for k in kernels}))
    rows = sorted(kernels, key=lambda k: (_short(names[k["name"]]), k["arch"]))
    print(f"\n{src.name}: registers / stack / spills per kernel")
    print(f"  {'arch':6} {'regs':>4} {'stack':>5} {'spill st/ld':>11}  kernel")
    for k in rows:
        print(f"  {k['arch']:6} {k['regs']:>4} {k['stack']:>5} {k['spill_stores']:>5}/{k['spill_loads']:<5}  "
              f"{_short(names[k['name']])}")
    spilled = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
    assert not spilled, "kernels spill registers:\n" + "\n".join(
        f"  {k['arch']} {_short(names[k['name']])}: {k['spill_stores']} B stores, {k['spill_loads']} B loads, "
        f"{k['regs']} registers" for k in spilled)
    incomplete = [k for k in kernels if k["regs"] is None or k["stack"] is None]
    assert not incomplete, f"unparsed ptxas report for {[k['name'] for k in incomplete]}"


def test_parse_ptxas_report():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 7 registers, used 1 barriers
"""
    assert parse_ptxas(text) == [
        {"name": "_Z3fooPf", "arch": "sm_80", "regs": 40, "stack": 8, "spill_stores": 4, "spill_loads": 12},
        {"name": "_Z3barv", "arch": "sm_90", "regs": 7, "stack": 0, "spill_stores": 0, "spill_loads": 0},
    ]


# ---------------------------------------------------------------------------
# The CUDA subset the kernels keep to (issue 8's emulation compiles them as C++)
# ---------------------------------------------------------------------------
# torch_ops.h is the torch side of the ops (with binding.cpp), not a kernel source.
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*.cu")) + sorted(p for p in CUDA_DIR.glob("*.h") if p.name != "torch_ops.h")

# The keywords and intrinsics of the subset (csrc/cuda/SUBSET.md), all defined by csrc/emu/cuda_emu.h.
SUBSET_KEYWORDS = ("__global__", "__device__", "__host__", "__forceinline__", "__shared__", "__launch_bounds__",
                   "__align__", "__restrict__", "__syncthreads", "__shfl_xor_sync", "__shfl_down_sync")
# Used by device.h only inside #if defined(__CUDA_ARCH__) (the emulation takes the host branch): the
# float16/bfloat16 conversions and the device-side assert.
DEVICE_ONLY_INTRINSICS = ("__half2float", "__ushort_as_half", "__half_as_ushort", "__float2half_rn",
                          "__bfloat162float", "__ushort_as_bfloat16", "__bfloat16_as_ushort", "__float2bfloat16_rn", "__assert_fail")


def _code(path: Path) -> str:
    """The source without comments and string literals."""
    text = path.read_text()
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r'"(\\.|[^"\\])*"', '""', text)


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=[p.name for p in KERNEL_SOURCES])
def test_kernels_keep_to_the_cuda_subset(path):
    code = _code(path)
    assert not re.search(r"#\s*include\s*[<\"](torch|ATen|c10)/", path.read_text()), \
        f"{path.name} includes torch headers: only binding.cpp and torch_ops.h may"
    launches = [m.start() for m in re.finditer(r"<<<", code)]
    if path.name == "device.h":
        assert len(launches) == 1, "device.h must hold exactly one <<<...>>>: the FASTELBO_LAUNCH macro"
    else:
        assert not launches, f"{path.name} launches a kernel with <<<...>>>: use FASTELBO_LAUNCH"
    # Warp shuffles and barriers only through the macros an emulation redefines.
    for raw in ("__shfl_xor_sync", "__shfl_down_sync", "__syncthreads", "__launch_bounds__"):
        if path.name != "device.h":
            assert raw not in code, f"{path.name} uses {raw} directly: use the FASTELBO_* macro of device.h"
    for banned in ("__ldg", "asm(", "asm volatile", "cooperative_groups", "__shfl_sync", "__ballot", "atomicCAS",
                   "blockIdx.y", "blockIdx.z", "threadIdx.y", "threadIdx.z", "blockDim.y", "blockDim.z", "gridDim.y",
                   "gridDim.z", "cudaMalloc", "__nanosleep", "__constant__", "__managed__"):
        assert banned not in code, f"{path.name} uses {banned!r}, outside the documented CUDA subset"
    # Every CUDA keyword and intrinsic (lower-case __name) is one the emulation (csrc/emu/cuda_emu.h) provides;
    # device.h alone may also use the float16/bfloat16 conversion instructions, under __CUDA_ARCH__.
    allowed = set(SUBSET_KEYWORDS) | (set(DEVICE_ONLY_INTRINSICS) if path.name == "device.h" else set())
    unknown = sorted(set(re.findall(r"\b__[a-z]\w*", code)) - allowed)
    assert not unknown, (f"{path.name} uses {unknown}, outside the documented CUDA subset (csrc/cuda/SUBSET.md); "
                         "the emulation of csrc/emu could not compile it")
    atomics = sorted(set(re.findall(r"\batomic[A-Z]\w*", code)) - {"atomicAdd"})
    assert not atomics, f"{path.name} uses {atomics}: atomicAdd is the subset's only atomic"
    if path.name != "device.h":
        assert not re.search(r"\bextern\s+__shared__", code), \
            f"{path.name} declares extern __shared__: dynamic shared memory only through FASTELBO_DYNAMIC_SHARED"
