"""Every Triton kernel builds for the GPUs it targets, without a GPU.

Each kernel of fastelbo.kernels is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` for sm_80 and sm_90 and float32 / float16 /
bfloat16, in its heaviest variant (all optional operands present, every
gradient wanted, strided operands) and its densest tile (16 elements per
thread per operand, the most the autotuner may pick). The test asserts that a
cubin comes out and that ptxas reports zero spills, and prints the registers
per kernel.

The compilation runs in a subprocess (this file, run as a script) because the
rest of the test session imports the kernels under TRITON_INTERPRET=1, which
turns @triton.jit into the interpreter; the script imports them without it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")

# kernel -> variants: (label, constexpr values, num_warps), in the densest tile the autotuner may
# pick (kernels/_launch.py): ROWS * BLOCK = 2048 elements on 4 warps (16 per thread) for the row
# kernels, BLOCK = 1024 on 4 warps (8 per thread) for the flat Philox kernels. The first variant of
# a kernel (the one using the most registers) is compiled for every dtype and arch; the others,
# there so that every code path is compiled once, for float32 on sm_90 only. float64 (accumulated
# in float64; its tiles hold half as many elements per thread) is compiled too, primary variants.
_ROW = {"FP64": 0, "ROWS": 2, "BLOCK": 1024}
_ELBO = {"FP64": 0, "ROWS": 2, "BLOCK_X": 1024, "BLOCK_Z": 64}
_ALL_GRADS = {"WANT_X": 1, "WANT_R": 1, "WANT_S": 1, "WANT_MU": 1, "WANT_LV": 1, "WANT_PMU": 1, "WANT_PLV": 1}
_IW_ALL = {**_ALL_GRADS, "WANT_Z": 1}
VARIANTS = {
    "rsample_fwd": [("philox, strided", {"HAS_EPS": 0, "DENSE": 0, "FP64": 0, "BLOCK": 1024}, 4)],
    "rsample_bwd": [("philox, strided", {"HAS_EPS": 0, "WANT_DLV": 1, "WANT_DEPS": 1, "DENSE": 0, "FP64": 0,
                                         "BLOCK": 1024}, 4)],
    "kl_fwd": [("prior", {**_ROW, "HAS_PRIOR": 1}, 4)],
    "kl_bwd": [("prior", {**_ROW, "HAS_PRIOR": 1, "WANT_MU": 1, "WANT_LV": 1, "WANT_PMU": 1, "WANT_PLV": 1}, 4)],
    "loglik_fwd": [("bernoulli+validate", {**_ROW, "GAUSSIAN": 0, "VALIDATE": 1}, 4),
                   ("gaussian", {**_ROW, "GAUSSIAN": 1, "VALIDATE": 0}, 4)],
    "loglik_bwd": [("gaussian, [1,Dx] reduce", {**_ROW, "GAUSSIAN": 1, "WANT_R": 1, "WANT_X": 1, "WANT_S": 1,
                                                 "REDUCE_S": 1}, 4),
                   ("gaussian, per row", {**_ROW, "GAUSSIAN": 1, "WANT_R": 1, "WANT_X": 1, "WANT_S": 1,
                                          "REDUCE_S": 0}, 4),
                   ("bernoulli", {**_ROW, "GAUSSIAN": 0, "WANT_R": 1, "WANT_X": 1, "WANT_S": 0, "REDUCE_S": 0}, 4)],
    "elbo_fwd": [("bernoulli+validate, prior", {**_ELBO, "GAUSSIAN": 0, "HAS_PRIOR": 1, "VALIDATE": 1}, 4),
                 ("gaussian, prior", {**_ELBO, "GAUSSIAN": 1, "HAS_PRIOR": 1, "VALIDATE": 0}, 4)],
    "elbo_bwd": [("gaussian, prior, reduce", {**_ELBO, **_ALL_GRADS, "REDUCE_S": 1, "GAUSSIAN": 1, "HAS_PRIOR": 1,
                                              "HAS_GE": 1, "HAS_GL": 1, "HAS_GK": 1}, 4),
                 ("gaussian, prior, per row", {**_ELBO, **_ALL_GRADS, "REDUCE_S": 0, "GAUSSIAN": 1, "HAS_PRIOR": 1,
                                               "HAS_GE": 1, "HAS_GL": 1, "HAS_GK": 1}, 4),
                 ("bernoulli, prior", {**_ELBO, **_ALL_GRADS, "WANT_S": 0, "REDUCE_S": 0, "GAUSSIAN": 0,
                                       "HAS_PRIOR": 1, "HAS_GE": 1, "HAS_GL": 1, "HAS_GK": 1}, 4)],
    "iwae_fwd": [("gaussian, prior", {**_ELBO, "GAUSSIAN": 1, "HAS_PRIOR": 1, "VALIDATE": 0}, 4),
                 ("bernoulli+validate, prior", {**_ELBO, "GAUSSIAN": 0, "HAS_PRIOR": 1, "VALIDATE": 1}, 4)],
    "iwae_bwd": [("gaussian, prior, reduce", {**_ELBO, **_IW_ALL, "REDUCE_S": 1, "GAUSSIAN": 1, "HAS_PRIOR": 1}, 4),
                 ("gaussian, per row", {**_ELBO, **_IW_ALL, "REDUCE_S": 0, "GAUSSIAN": 1, "HAS_PRIOR": 0,
                                        "WANT_PMU": 0, "WANT_PLV": 0}, 4),
                 ("bernoulli, prior", {**_ELBO, **_IW_ALL, "WANT_S": 0, "REDUCE_S": 0, "GAUSSIAN": 0,
                                       "HAS_PRIOR": 1}, 4)],
    "free_bits_cols": [("prior", {**_ROW, "HAS_PRIOR": 1}, 4)],
    "free_bits_fwd": [("prior", {**_ROW, "HAS_PRIOR": 1}, 4)],
    "free_bits_bwd": [("prior", {**_ROW, "HAS_PRIOR": 1, "WANT_MU": 1, "WANT_LV": 1, "WANT_PMU": 1,
                                 "WANT_PLV": 1}, 4)],
}
_POINTER_TYPES = {"seed_ptr": "*i64", "bad_ptr": "*i8"}
_FLOAT_ARGS = {"beta_hi", "beta_lo", "fb_hi", "fb_lo"}
# Buffers in the accumulation dtype (float32; float64 for float64 inputs): log-weights, partial sums, kl_dims,
# the IWAE backward's per-sample weights.
_ACC_PTRS = {"lw_ptr", "part_ptr", "kd_ptr", "c_ptr"}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _ACC_PTRS:
            sig[name] = "*fp64" if dtype == "fp64" else "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = _POINTER_TYPES.get(name, "*" + dtype)
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"  # sizes and strides, not specialized: the general (strided) code
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr(s) {missing}")
    return sig


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v on the kernel's PTX."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spills.group(1)), int(spills.group(2))


def _compile_one(job):
    kernel, label, constexprs, num_warps, dtype, arch = job
    import triton
    from triton.backends.compiler import GPUTarget

    from fastelbo.kernels import KERNELS

    fn = KERNELS[kernel]
    t0 = time.perf_counter()
    src = triton.compiler.ASTSource(fn, _signature(fn, dtype, constexprs), constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    seconds = time.perf_counter() - t0
    cubin = compiled.asm.get("cubin", b"")
    regs, spill_st, spill_ld = _ptxas_report(compiled.asm["ptx"], arch)
    return {"kernel": kernel, "variant": label, "dtype": dtype, "arch": f"sm_{arch}", "num_warps": num_warps,
            "cubin_bytes": len(cubin), "registers": regs, "spill_stores": spill_st, "spill_loads": spill_ld,
            "seconds": round(seconds, 2)}


def _fp64(constexprs: dict) -> dict:
    """The densest float64 tile: 8 elements per thread on 4 warps (row kernels: ROWS halved)."""
    c = {**constexprs, "FP64": 1}
    if "ROWS" in c:
        c["ROWS"] //= 2
    return c


def jobs():
    out = []
    for k, variants in VARIANTS.items():
        (label, c, w), rest = variants[0], variants[1:]
        out += [(k, label, c, w, d, a) for d in DTYPES for a in ARCHS]
        out += [(k, label, c, w, "fp32", 90) for label, c, w in rest]
        out += [(k, label, _fp64(c), w, "fp64", a) for a in ARCHS]
    return out


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile the real kernels: unset TRITON_INTERPRET"
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(_compile_one, jobs()))
    print(json.dumps(results))
    return 0


def _table(results) -> str:
    lines = [f"{'kernel':12s} {'variant':26s} {'dtype':5s} {'arch':6s} {'warps':>5s} {'regs':>5s} {'spills':>7s} "
             f"{'cubin':>7s} {'s':>5s}"]
    for r in results:
        lines.append(f"{r['kernel']:12s} {r['variant']:26s} {r['dtype']:5s} {r['arch']:6s} {r['num_warps']:5d} "
                     f"{r['registers']:5d} {r['spill_stores'] + r['spill_loads']:7d} {r['cubin_bytes']:7d} "
                     f"{r['seconds']:5.1f}")
    return "\n".join(lines)


def run_as_script(path: str, timeout: int) -> list:
    """The JSON results a compile script prints last, run in a child without TRITON_INTERPRET
    (the interpreter replaces the compiler this needs)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, path], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"kernel compilation failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_kernel_builds_for_sm80_sm90_without_spills():
    results = run_as_script(__file__, timeout=900)
    print("\n" + _table(results))
    assert len(results) == len(jobs())
    for kernel in VARIANTS:  # every kernel x dtype x arch
        built = {(r["dtype"], r["arch"]) for r in results if r["kernel"] == kernel}
        assert built == {(d, f"sm_{a}") for d in DTYPES + ("fp64",) for a in ARCHS}, kernel
    no_cubin = [f"{r['kernel']} {r['variant']} {r['dtype']} {r['arch']}" for r in results if r["cubin_bytes"] == 0]
    assert not no_cubin, f"no cubin for {no_cubin}"
    spilled = [f"{r['kernel']} {r['variant']} {r['dtype']} {r['arch']}: {r['spill_stores']} B stored, "
               f"{r['spill_loads']} B loaded" for r in results if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_variants_cover_every_kernel():
    """A new kernel in fastelbo.kernels.KERNELS must get a compile variant here."""
    pytest.importorskip("triton")
    from fastelbo.kernels import KERNELS

    assert set(KERNELS) == set(VARIANTS)


if __name__ == "__main__":
    sys.exit(main())
