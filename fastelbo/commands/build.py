"""``fastelbo build``: compile (or load from the cache) the C++ CPU kernels,
and the CUDA kernels where torch has CUDA and nvcc is installed (no GPU needed).

Useful before a job starts many processes, or to see the compiler's error:
the first use of the kernels builds them anyway.
"""

from __future__ import annotations

import os
import sys
import time

from .. import _build


def add_arguments(parser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show the compiler's output (the same as FASTELBO_VERBOSE_BUILD=1)")
    parser.add_argument("--no-cuda", action="store_true",
                        help="build only the CPU kernels (by default the CUDA kernels are built too where torch "
                             "has CUDA and nvcc is installed)")


def build_cpu() -> tuple[bool, str, float]:
    """(ok, build directory or error message, seconds)."""
    start = time.perf_counter()
    try:
        _build.load_cpu_extension()
    except _build.BuildError as exc:
        return False, str(exc), time.perf_counter() - start
    ok, where = _build.cpu_extension_status()  # loaded: returns at once with the build directory
    return ok, where, time.perf_counter() - start


def build_cuda() -> tuple[bool | None, str, float]:
    """(ok, build directory or error message, seconds); ok is None where the CUDA
    kernels cannot be built here at all (no CUDA build of torch, no nvcc)."""
    load = getattr(_build, "load_cuda_extension", None)
    if load is None:
        return None, "this fastelbo has no CUDA kernels", 0.0
    ok, why = _build.cuda_compatibility()
    if not ok:
        return None, why, 0.0
    start = time.perf_counter()
    try:
        load()
    except _build.BuildError as exc:
        return False, str(exc), time.perf_counter() - start
    return True, _build.cuda_extension_status()[1], time.perf_counter() - start


def run(args) -> int:
    if args.verbose:
        os.environ["FASTELBO_VERBOSE_BUILD"] = "1"
    print(f"building fastelbo's C++ CPU kernels (cache: {_build.cache_root()}) ...", flush=True)
    ok, where, seconds = build_cpu()
    if not ok:
        print(f"fastelbo build: failed after {seconds:.1f} s\n{where}", file=sys.stderr)
        return 1
    print(f"C++ CPU kernels ready in {seconds:.1f} s")
    print(f"  cache dir: {where}")
    if args.no_cuda:
        return 0
    ok, where, seconds = build_cuda()
    if ok is None:
        print(f"CUDA kernels: not built ({where})")
        return 0
    if not ok:
        print(f"fastelbo build: the CUDA kernels failed after {seconds:.1f} s\n{where}", file=sys.stderr)
        return 1
    print(f"CUDA kernels ready in {seconds:.1f} s")
    print(f"  cache dir: {where}")
    return 0
