"""The SASS a GPU runs for each Triton kernel, without a GPU (issue 22 item 2, issue 19 item 3).

tests/test_triton_cubin.py compiles every size and stride as a plain i32: the
general code. At launch Triton specializes integer arguments (the value 1
becomes a constant, multiples of 16 get a divisibility hint) and 16-byte aligned
pointers, and that is what lets it emit 128-bit loads. This file compiles each
kernel the way a launch on a representative contiguous call specializes it
(B = 4096 rows, Dx = 784, Dz = 32, K = 1: inner strides 1, row strides and
sizes multiples of 16, pointers aligned), for float32 and bfloat16 on sm_90,
disassembles the cubin with the cuobjdump that the triton wheel ships, and
checks from the SASS:
- the [B, D] operands move in 128-bit global loads and stores (the 128-bit
  instructions carry most of the kernel's static load bytes);
- no local memory (no LDL/STL: nothing spilled, no stack arrays);
- registers per thread, and the occupancy they allow on an H100 (65536
  registers, 64 warps per SM) at the kernel's 4 warps, are reported.
Run as a script (``python tests/test_triton_sass.py``, TRITON_INTERPRET unset)
it prints the table as JSON; pytest -s prints it as text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_triton_cubin import VARIANTS, _ptxas_report, _signature, run_as_script  # noqa: E402

ARCH = 90
DTYPES = ("fp32", "bf16")
SHAPE = {"B": 4096, "DX": 784, "DZ": 32}
H100_REGS, H100_WARPS = 65536, 64


def launch_value(kernel: str, name: str) -> int:
    """The value an integer argument has on the representative contiguous call (only whether it
    is 1, or a multiple of 16, matters to the specialization)."""
    if name == "K":
        return 1
    if name.startswith("s_") and name.endswith("1"):
        return 1  # inner strides of contiguous operands
    if name in ("s_g", "s_ge", "s_gl", "s_cb") or (name == "s_gk" and not kernel.startswith("rsample")):
        return 1  # [B] upstream gradients
    return 16 * 49  # sizes, row strides, sample strides: all multiples of 16 here (784, 4096, 32, ...)


def specialize(kernel: str, fn, dtype: str, constexprs: dict):
    """(signature, constants, attrs) as Triton's launcher builds them for that call."""
    sig = _signature(fn, dtype, constexprs)
    consts, attrs = dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        kind = sig[name]
        if kind.startswith("*"):
            attrs[(i, )] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif kind == "i32":
            v = launch_value(kernel, name)
            if v == 1:
                sig[name], consts[name] = "constexpr", 1
            elif v % 16 == 0:
                attrs[(i, )] = [["tt.divisibility", 16]]
    return sig, consts, attrs


_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def _width(op: str) -> int:
    mods = op.split(".")[1:]
    for m, w in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if m in mods:
            return w
    return 32


def sass_stats(sass: str) -> dict:
    """Static counts from cuobjdump -sass: global loads/stores by width, local memory, instructions."""
    ops = _OP.findall(sass)
    ldg = [_width(o) for o in ops if o.split(".")[0] == "LDG"]
    stg = [_width(o) for o in ops if o.split(".")[0] == "STG"]
    return {"instructions": len(ops),
            "ldg": {str(w): ldg.count(w) for w in sorted(set(ldg))},
            "stg": {str(w): stg.count(w) for w in sorted(set(stg))},
            "ldg128_byte_share": round(sum(w for w in ldg if w == 128) / max(1, sum(ldg)), 3),
            "local": sum(1 for o in ops if o.split(".")[0] in ("LDL", "STL"))}


def occupancy(regs: int, warps: int) -> float:
    """Resident warps / 64 on an H100 from the register file alone (registers are allocated per warp,
    per thread rounded up to a multiple of 8)."""
    per_warp = ((regs + 7) // 8) * 8 * 32
    blocks = H100_REGS // (per_warp * warps)
    return min(H100_WARPS, blocks * warps) / H100_WARPS


def _compile_one(job):
    kernel, label, constexprs, num_warps, dtype = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    from fastelbo.kernels import KERNELS

    fn = KERNELS[kernel]
    sig, consts, attrs = specialize(kernel, fn, dtype, constexprs)
    compiled = triton.compile(triton.compiler.ASTSource(fn, sig, consts, attrs),
                              target=GPUTarget("cuda", ARCH, 32), options={"num_warps": num_warps})
    cuobjdump = Path(get_ptxas(ARCH).path).with_name("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([str(cuobjdump), "-sass", path], capture_output=True, text=True, check=True).stdout
    regs, spill_st, spill_ld = _ptxas_report(compiled.asm["ptx"], ARCH)
    return {"kernel": kernel, "variant": label, "dtype": dtype, "num_warps": num_warps, "registers": regs,
            "spills": spill_st + spill_ld, "occupancy": occupancy(regs, num_warps), **sass_stats(sass)}


def jobs():
    return [(k, *VARIANTS[k][0], d) for k in VARIANTS for d in DTYPES]


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile the real kernels: unset TRITON_INTERPRET"
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        print(json.dumps(list(pool.map(_compile_one, jobs()))))
    return 0


def table(results) -> str:
    lines = [f"{'kernel':14s} {'dtype':5s} {'regs':>4s} {'occ':>5s} {'LDG by width (bits:count)':28s} "
             f"{'STG by width':16s} {'128b share':>10s} {'local':>5s} {'SASS':>5s}"]
    for r in results:
        fmt = lambda d: " ".join(f"{w}:{n}" for w, n in d.items())  # noqa: E731
        lines.append(f"{r['kernel']:14s} {r['dtype']:5s} {r['registers']:4d} {r['occupancy']:5.0%} "
                     f"{fmt(r['ldg']):28s} {fmt(r['stg']):16s} {r['ldg128_byte_share']:10.0%} {r['local']:5d} "
                     f"{r['instructions']:5d}")
    return "\n".join(lines)


def test_launch_value_rules():
    assert launch_value("elbo_bwd", "K") == 1 and launch_value("elbo_bwd", "s_x1") == 1
    assert launch_value("elbo_bwd", "s_gk") == 1 and launch_value("rsample_bwd", "s_gk") % 16 == 0
    assert launch_value("loglik_fwd", "D") % 16 == 0 and launch_value("loglik_fwd", "s_r0") % 16 == 0


def test_sass_parser_on_a_sample():
    sample = """
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/               @!P0 LDG.E.U16 R8, desc[UR4][R6.64] ;
        /*0120*/                   STG.E.128 desc[UR4][R10.64], R12 ;
        /*0130*/                   STL [R1], R3 ;
        /*0140*/                   FADD R0, R1, R2 ;
    """
    s = sass_stats(sample)
    assert s["ldg"] == {"16": 1, "128": 1} and s["stg"] == {"128": 1} and s["local"] == 1 and s["instructions"] == 5
    assert s["ldg128_byte_share"] == round(128 / 144, 3)


# The Box-Muller step calls sin/cos of 2 pi u: libdevice's sinf/cosf keep their far-range (Payne-Hanek)
# path, whose table lives in local memory. Issue 22 item 3 (a sincospi-style Box-Muller) is not done yet;
# strict, so the mark must go when it is.
KNOWN_LOCAL = {"rsample_fwd", "rsample_bwd"}


@pytest.fixture(scope="module")
def results():
    out = run_as_script(__file__, timeout=1500)
    print("\n" + table(out))
    assert len(out) == len(jobs())
    return {(r["kernel"], r["dtype"]): r for r in out}


@pytest.mark.slow
@pytest.mark.parametrize("kernel,dtype", [
    pytest.param(k, d, marks=pytest.mark.xfail(k in KNOWN_LOCAL, strict=True,
                                               reason="sinf/cosf far-range path in local memory (issue 22 item 3)"))
    for k in VARIANTS for d in DTYPES])
def test_specialized_cubin_loads_128_bits_without_local_memory(results, kernel, dtype):
    r = results[(kernel, dtype)]
    assert r["local"] == 0 and r["spills"] == 0, f"local memory: {r['local']} LDL/STL, {r['spills']} B spilled"
    # 128-bit loads carry at least half the static load bytes (the rest: per-row values, [B] gradients)
    assert r["ldg"].get("128", 0) > 0 and r["ldg128_byte_share"] >= 0.5, r["ldg"]


if __name__ == "__main__":
    sys.exit(main())
