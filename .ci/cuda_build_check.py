"""Build check of fastelbo's CUDA extension against the CUDA build of torch, on a machine without a GPU.

Run with the python of an environment that has the CUDA build of torch (see .ci/cuda-build-check):
builds csrc/cuda (the .cu kernels + binding.cpp) through fastelbo's own JIT builder with
TORCH_CUDA_ARCH_LIST="8.0;9.0" (unless set), links it, loads it with torch.ops.load_library and
checks that every fastelbo op has a kernel registered for the CUDA dispatch key. Exit status 0
when all of that holds; prints what failed otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sys.path.insert(0, str(ROOT))
    t0 = time.time()
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")
    if torch.version.cuda is None:
        print("FAIL: this torch was built without CUDA; the build check needs the CUDA build of torch")
        return 1
    import fastelbo  # noqa: F401  (defines the fastelbo:: ops)
    from fastelbo import _backend, _build
    from fastelbo._ops import _SCHEMAS

    ok, why = _build.cuda_compatibility()
    if not ok:
        print(f"FAIL: cannot build the CUDA extension here: {why}")
        return 1
    print(f"CUDA toolkit: {_build.cuda_home()}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    t1 = time.time()
    try:
        _build.load_cuda_extension()
    except _build.BuildError as exc:
        print(f"FAIL: {exc}")
        return 1
    directory = _build._CUDA.path
    libs = sorted(directory.glob("*.so"))
    print(f"built and loaded in {time.time() - t1:.1f} s: {libs[0] if libs else directory}")
    if not libs:
        print("FAIL: no shared library in the build directory")
        return 1
    torch.ops.load_library(str(libs[0]))  # idempotent: the builder loaded it the same way

    ninja = (directory / "build.ninja").read_text() if (directory / "build.ninja").is_file() else ""
    for arch in ("80", "90"):
        flag = f"arch=compute_{arch},code=sm_{arch}"
        if flag not in ninja:
            print(f"FAIL: the build did not target sm_{arch} (no {flag} in build.ninja)")
            return 1
    missing = [op for op in _SCHEMAS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastelbo::{op}", "CUDA")]
    for op in _SCHEMAS:
        print(f"  fastelbo::{op:28} CUDA kernel {'registered' if op not in missing else 'MISSING'}")
    if missing:
        print(f"FAIL: no CUDA kernel for {', '.join(missing)}")
        return 1
    available, why = _backend.available("cuda", "cuda")
    print(f"backend 'cuda' available here: {available}{'' if available else f' ({why})'}")
    print(f"OK: CUDA extension builds, links, loads, all {len(_SCHEMAS)} ops have CUDA kernels "
          f"({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
