"""The plan of the GPU check: every stage's command, time cap and environment.

Groups run one after another; the stages of one group run at the same time
(the correctness stages share the GPU and the cores; the benchmark runs
alone). Each group has a planned cap; the caps and a reserve for the report
sum to the budget (8 minutes by default), so the whole check ends in time
even when every stage hangs. Time a group leaves unused goes to the next
ones (runner.py), never past the budget.

Placeholders in a command, filled in when the stage starts:
  {python}  the Python of the environment the install stage made (the machine's python3 before it)
  {cap}     the seconds this stage may run
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = "{python}"
CAP = "{cap}"

BUDGET_S = 480.0  # the whole check, on one H100 with 16 cores
REPORT_RESERVE_S = 10.0  # kept for the report and a late plot

# Planned caps of the groups, in seconds (they sum to BUDGET_S - REPORT_RESERVE_S).
CAPS = {"install": 30.0, "versions": 20.0, "build": 150.0, "correctness": 140.0, "bench": 130.0}

# The test files with CUDA cases, most important first: each shard runs its share in this order, so a
# shard stopped by the cap has run the core suite before the property tests. select_tests.py keeps,
# in them, the cases of the cuda and triton backends on CUDA tensors (and device-agnostic checks of the
# Triton launch path); the CPU, interpreter and emulator cases are deselected.
TEST_FILES = (
    "tests/test_accuracy.py",
    "tests/test_bounds.py",
    "tests/test_ops.py",
    "tests/test_launch_geometry.py",
    "tests/test_triton.py",
    "tests/test_rng.py",
    "tests/test_bad_input.py",
    "tests/test_integration_autocast.py",
    "tests/test_compile.py",
    "tests/test_triton_autotune_path.py",
    "tests/test_properties.py",
)

SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
SANITIZER_EXIT = 86  # compute-sanitizer's exit status when it found an error (--error-exitcode)


@dataclass
class Stage:
    name: str
    argv: list[str]
    doc: str
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # stages that must have succeeded first (else: skipped, with the reason)
    skip_reason: str = ""  # set: cannot run on this machine (a tool is missing), skipped with this reason


@dataclass
class Group:
    name: str
    cap_s: float
    stages: list[Stage]


@dataclass
class Paths:
    root: Path  # the checkout
    out: Path  # what the check writes and brings back
    work: Path  # caches and the environment: large, not brought back

    @property
    def venv(self) -> Path:
        return self.work / "venv"


def shard_count(cores: int) -> int:
    """Test shards: most of the cores, a few left to the sanitizer runs of the same group."""
    return max(1, min(8, cores - 4))


def find_compute_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    for home in filter(None, homes):
        for candidate in (Path(home) / "bin" / "compute-sanitizer",
                          Path(home) / "compute-sanitizer" / "compute-sanitizer"):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def common_env(paths: Paths, cores: int) -> dict[str, str]:
    """What every stage sees: private caches under the work directory, all cores for the builds, the
    check's own modules importable, and never the Triton interpreter."""
    bench_dir = str(paths.root / "bench")
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != bench_dir]
    return {
        "PYTHONPATH": os.pathsep.join([bench_dir] + pythonpath),
        "PYTHONUNBUFFERED": "1",
        "FASTELBO_CACHE_DIR": str(paths.work / "fastelbo-cache"),
        "TRITON_CACHE_DIR": str(paths.work / "triton-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(paths.work / "inductor-cache"),
        "MAX_JOBS": str(cores),
        "GPUCHECK_OUT": str(paths.out),
    }


# Removed from every stage's environment: the GPU compiles the Triton kernels, never the interpreter.
UNSET_ENV = ("TRITON_INTERPRET",)


def build_plan(paths: Paths, cores: int | None = None, sanitizer: str | None = "auto") -> list[Group]:
    cores = cores or os.cpu_count() or 1
    out = paths.out
    if sanitizer == "auto":
        sanitizer = find_compute_sanitizer()
    gc = "gpucheck"

    install = Stage(
        "install", [PYTHON, "-m", f"{gc}.install", "--root", str(paths.root), "--venv", str(paths.venv),
                    "--out", str(out / "install.json")],
        "a virtual environment over the machine's Python (its torch, triton, pytest), fastelbo installed "
        "into it from the checkout: pip install --no-deps --no-build-isolation --no-index -e .")
    versions = Stage(
        "versions", [PYTHON, "-m", f"{gc}.versions", "--out", str(out / "versions.json")],
        "Python, torch, CUDA, Triton, numpy, pytest, nvcc, compute-sanitizer, the GPU (name, capability, "
        "SMs, memory, L2), the driver and the cores", needs=("install",))
    build = Stage(
        "build", [PYTHON, "-m", f"{gc}.build_ext", "--out", str(out / "build.json"), "--info",
                  str(out / "info.txt")],
        f"the C++ CPU and the CUDA extensions built at the same time, MAX_JOBS={cores} each, timed; then "
        "`fastelbo info`", needs=("install",))

    shards = shard_count(cores)
    tests = []
    for k in range(1, shards + 1):
        tests.append(Stage(
            f"tests-{k}", [PYTHON, "-m", "pytest", "-p", f"{gc}.select_tests", "-p", "no:cacheprovider", "-q",
                           "-rfE", "--basetemp", str(paths.work / f"pytest-{k}"), *TEST_FILES],
            f"pytest shard {k} of {shards}: the cuda and triton backends on CUDA tensors",
            env={"GPUCHECK_SHARD": f"{k}/{shards}", "GPUCHECK_RESULTS": str(out / "tests" / f"shard-{k}.jsonl"),
                 "FASTELBO_TEST_CUDA_EMULATED": "0", "TORCHINDUCTOR_COMPILE_THREADS": "1"},
            needs=("install",)))
    coverage = Stage(
        "kernels", [PYTHON, "-m", f"{gc}.sanitize_ops", "--list-kernels", str(out / "sanitizer" / "kernels.json")],
        "the sanitizer script once without the sanitizer, under torch.profiler: which CUDA kernels of "
        "csrc/cuda it launches (each must be)", needs=("build",))
    checks = [coverage]
    for tool in SANITIZER_TOOLS:
        log = out / "sanitizer" / f"{tool}.log"
        argv = [
            sanitizer or "compute-sanitizer", "--tool", tool, "--error-exitcode", str(SANITIZER_EXIT), "--print-limit", "200",
            "--launch-timeout", "120", "--log-file", str(log), PYTHON, "-m", f"{gc}.sanitize_ops",
            "--sizes", "all" if tool == "memcheck" else "sync"]
        checks.append(Stage(
            tool, argv,
            f"compute-sanitizer --tool {tool} over every CUDA kernel, forward and backward, "
            + ("all dtypes, odd sizes, three layouts" if tool == "memcheck" else "float32 and float16, odd sizes")
            + " and the launch geometries of a large GPU"
            + (" (PyTorch's caching allocator off: each tensor is its own allocation, so an access past it is "
               "caught)" if tool == "memcheck" else ""),
            env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else {}, needs=("build",),
            skip_reason="" if sanitizer else "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)"))
    bench = Stage(
        "bench", [PYTHON, "-m", f"{gc}.bench_gpu", "--out", str(out / "bench"), "--budget-s", CAP],
        "fastelbo bench's cases on the GPU, most important first: every op family and the training step, "
        "fwd+bwd, fastelbo cuda and triton against eager and torch.compile, GB/s against the copy bandwidth "
        "of the same run, peak memory; shapes above the L2 cache for the bandwidth figures",
        needs=("install",))

    return [
        Group("install", CAPS["install"], [install]),
        Group("versions", CAPS["versions"], [versions]),
        Group("build", CAPS["build"], [build]),
        Group("correctness", CAPS["correctness"], tests + checks),
        Group("bench", CAPS["bench"], [bench]),
    ]


def planned_total(groups: list[Group]) -> float:
    return sum(g.cap_s for g in groups) + REPORT_RESERVE_S
