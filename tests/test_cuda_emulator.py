"""Self-tests of the CUDA emulation (csrc/emu) that the "cuda-emulated" backend runs the kernels on.

tests/cuda_emu_selftest.cpp holds small kernels in the CUDA subset
(csrc/cuda/SUBSET.md) and csrc/cuda/reduce_kernel.h itself with switchable
barriers; it is compiled here with the host compiler against csrc/emu and run
in subprocesses (the wrong launches abort the process, as they should):

  * a missing __syncthreads is caught: a reduction without one of its barriers
    gives a wrong result under the randomized schedules, for every seed tried
    (the first barrier of csrc/cuda's group_sum) or for most (the barrier that
    guards shared memory reuse across the grid-stride loop), the correct one
    never; one seed always replays the same schedule and result;
  * shuffle semantics are the CUDA documentation's, for __shfl_xor_sync and
    __shfl_down_sync, widths 32 and 16, 4- and 8-byte values;
  * __shared__ is per block (also with blocks running concurrently), dynamic
    shared memory is per block and uninitialized (NaN bytes), atomics are atomic;
  * wrong launches abort with a message naming the fault instead of hanging:
    a partial warp at a shuffle, lanes that exited or wait at a barrier, lanes
    at different shuffles, a barrier not reached by every thread or reached at
    two places, a non-full mask, an invalid configuration, a spinning thread
    (timeout), a built-in used outside a kernel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SELFTEST = Path(__file__).resolve().parent / "cuda_emu_selftest.cpp"
SEEDS = list(range(8))


def _cxx() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build(out: Path, *defines: str) -> Path:
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++/clang++) on PATH")
    cmd = [cxx, "-std=c++17", "-O1", "-g", "-Wall", "-Wextra", "-Wno-unknown-pragmas", *defines, f"-I{CSRC}",
           str(SELFTEST), str(CSRC / "emu" / "cuda_emu.cpp"), "-o", str(out), "-lpthread", "-ldl"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"building the emulator self-test failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("cuda_emu") / "selftest")


def run(exe: Path, *args, seed: int = 0, workers: int | None = None, timeout_s: float | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTELBO_EMU_SEED=str(seed))
    if workers is not None:
        env["FASTELBO_EMU_WORKERS"] = str(workers)
    if timeout_s is not None:
        env["FASTELBO_EMU_TIMEOUT"] = str(timeout_s)
    res = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert res.returncode == 0, f"{exe.name} {args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def _field(line: str, name: str) -> int:
    return int(re.search(rf"\b{name}=(\d+)", line)[1])


# ---------------------------------------------------------------------------
# A missing barrier is caught
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant,what", [(1, "after the stores"), (2, "between the levels of the tree")])
def test_missing_syncthreads_in_a_tree_reduction_is_caught(selftest, variant, what):
    """A shared-memory tree reduction (8 blocks of 256 threads): correct with its barriers for every seed; with the
    barrier {what} removed, wrong for every seed. The same seed gives the same (wrong) answer again."""
    for seed in SEEDS:
        ok = run(selftest, "block_sum", 0, 8, 256, seed=seed).stdout
        assert _field(ok, "wrong_blocks") == 0, f"seed {seed}: the correct reduction failed: {ok}"
        bad = run(selftest, "block_sum", variant, 8, 256, seed=seed).stdout
        assert _field(bad, "wrong_blocks") > 0, f"seed {seed}: the barrier {what} was removed and nothing noticed"
        again = run(selftest, "block_sum", variant, 8, 256, seed=seed, workers=1).stdout
        assert again == bad, f"seed {seed}: the schedule is not a function of the seed:\n{bad}\n{again}"


def test_missing_barriers_of_the_real_group_sum_are_caught(selftest):
    """csrc/cuda/reduce_kernel.h's row_reduce_kernel (a block of 128 threads per row, 40 rows on 32 blocks: some
    blocks sum two rows): exact with both barriers of group_sum, for every seed; without the first (warp sums
    stored, then read by warp 0) wrong for every seed; without the second (warp 0 must have read the shared
    sums before the next row overwrites them) wrong for most seeds, i.e. caught by a CI run."""
    wrong = {skip: [] for skip in (0, 1, 2)}
    for seed in SEEDS:
        for skip in (0, 1, 2):
            out = run(selftest, "row_reduce", skip, 40, 2048, 1, seed=seed).stdout
            assert "block=128 group=128 grid=32" in out, out  # the geometry this test is about
            wrong[skip].append(_field(out, "wrong_rows"))
    assert wrong[0] == [0] * len(SEEDS), f"the correct kernel gave wrong rows: {wrong[0]}"
    assert all(w > 0 for w in wrong[1]), f"first barrier removed, rows wrong per seed: {wrong[1]}"
    assert sum(w > 0 for w in wrong[2]) >= len(SEEDS) // 2, f"second barrier removed, rows wrong per seed: {wrong[2]}"
    # the failing seeds fail again, identically, with another number of worker threads
    seed = SEEDS[[w > 0 for w in wrong[2]].index(True)]
    first = run(selftest, "row_reduce", 2, 40, 2048, 1, seed=seed, workers=1).stdout
    assert _field(first, "wrong_rows") == wrong[2][SEEDS.index(seed)]


# ---------------------------------------------------------------------------
# Shuffles, per the CUDA C++ Programming Guide ("Warp Shuffle Functions")
# ---------------------------------------------------------------------------
def _expected(kind: str, width: int, param: int, values: list[float]) -> list[float]:
    out = []
    for t, own in enumerate(values):
        base, lane = t - t % 32, t % 32
        if kind == "xor":
            # "the value of var held by the resulting lane ID [laneId ^ laneMask] is returned [...] If width is
            # less than warpSize then each group of width consecutive threads are able to access elements from
            # earlier groups of threads, however if they attempt to access elements from later groups of threads
            # their own value of var will be returned."
            src = lane ^ param
            out.append(own if src // width > lane // width else values[base + src])
        else:
            # "adding delta to the caller's lane ID [...] each subsection of the warp behaves as a separate entity
            # [...] the ID number of the source lane will not wrap around the value of width and so the upper
            # delta lanes will remain unchanged."
            out.append(own if lane % width + param >= width else values[base + lane + param])
    return out


@pytest.mark.parametrize("dtype", ["float", "double", "int"])
@pytest.mark.parametrize("width", [32, 16])
@pytest.mark.parametrize("kind", ["xor", "down"])
def test_shuffle_semantics(selftest, kind, width, dtype):
    """Two warps, every lane mask / delta 0-31: each lane's result is the documented source lane's value."""
    out = run(selftest, "shfl", kind, width, dtype).stdout.splitlines()
    assert len(out) == 32
    values = [1000 + 3 * t + (0.5 if dtype == "double" else 0.0) for t in range(64)]
    for line in out:
        head, _, tail = line.partition(":")
        param = _field(head, "param")
        got = [float(v) for v in tail.split()]
        want = _expected(kind, width, param, values)
        assert got == want, f"{head}: lanes differ at {[t for t in range(64) if got[t] != want[t]]}"


# ---------------------------------------------------------------------------
# Memory: shared per block, dynamic shared, atomics
# ---------------------------------------------------------------------------
def test_shared_memory_is_per_block_with_concurrent_blocks(selftest):
    out = run(selftest, "shared_per_block", workers=4).stdout
    assert _field(out, "bad") == 0, out


def test_dynamic_shared_memory_is_per_block_and_uninitialized(selftest):
    out = run(selftest, "dynamic_smem", workers=3).stdout
    assert _field(out, "wrong") == 0, out
    assert _field(out, "initialized_reads") == 0, f"dynamic shared memory read as numbers before any write: {out}"


def test_atomics_are_atomic(selftest):
    """7 blocks x 96 threads, on 4 OS threads: atomicAdd on float, double, int (shared and global), ull."""
    out = run(selftest, "atomics", workers=4).stdout
    assert out.split() == ["atomics", "float=672.0", "double=336.0", "int=672", "ull=1344"], out


def test_whole_warps_shuffle_fine(selftest):
    out = run(selftest, "whole_warps_ok").stdout
    assert out.split() == ["warp_sum", "lane0=496", "lane63=1520"], out  # sum of lanes 0-31 and 32-63


# ---------------------------------------------------------------------------
# Wrong launches abort with a message (never hang)
# ---------------------------------------------------------------------------
WRONG = {
    "partial_warp": r"full-mask __shfl_xor_sync at .*cuda_emu_selftest\.cpp:\d+ in warp 1, which has only 16 lanes: "
                    r"the block has 48 threads, not a multiple of 32",
    # (which comes first, a lane exiting or a lane reaching the shuffle, is the schedule's choice)
    "exited_lanes": r"shuffle reached by only part of a warp: (lane \d+ of warp 1 reached the full-mask "
                    r"__shfl_down_sync at .*:\d+ after lanes? [\d, -]+ exited the kernel|lane \d+ \(thread \d+\) of "
                    r"warp 1 exited the kernel while lanes? [\d, -]+ waits? at the full-mask shuffle at .*:\d+)",
    "lanes_at_barrier": r"deadlock: .*\n.*__syncthreads\(\) at .* reached by threads 8-31, 40-63 only.*\n"
                        r"\s+warp 0 \(threads 0-31\): a shuffle at .* reached by lanes 0-7 only; the other lanes: "
                        r"8-31 __syncthreads\(\)",
    "divergent_shuffles": r"warp divergence: the lanes of warp 0 meet at different shuffles",
    "barrier_some": r"barrier divergence: thread \d+ (reached __syncthreads\(\) at .* after threads? [\d, -]+ exited|"
                    r"exited the kernel while threads? [\d, -]+ waits? at __syncthreads\(\))",
    "barrier_two_places": r"barrier divergence: the threads of the block wait at different __syncthreads\(\)",
    "mask": r"__shfl_xor_sync at .* with mask 0x0000ffff: the subset has full-mask shuffles only",
    "block_too_big": r"invalid launch configuration: block of 2048 threads",
    "empty_grid": r"invalid launch configuration: empty grid",
    "outside": r"threadIdx used outside a kernel launch",
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_launch_aborts_with_a_message(selftest, case):
    res = run(selftest, case, workers=1, check=False)  # one OS thread: the first faulty block is the seed's
    assert res.returncode != 0, f"{case}: the wrong launch ran to completion:\n{res.stdout}"
    assert "fastelbo CUDA emulation: " in res.stderr, res.stderr
    assert re.search(WRONG[case], res.stderr), f"{case}: unexpected message:\n{res.stderr}"
    if case != "outside":  # the message locates the launch
        assert re.search(r"launched at .*cuda_emu_selftest\.cpp:\d+", res.stderr), res.stderr


def test_a_spinning_thread_times_out_with_a_message(selftest):
    """Threads switch only at barriers and shuffles: a spin on memory never yields. The launch's watchdog ends it."""
    res = run(selftest, "spin", timeout_s=1, check=False)
    assert res.returncode != 0
    assert re.search(r"launch #0 still running after 1 s \(FASTELBO_EMU_TIMEOUT\)", res.stderr), res.stderr


# ---------------------------------------------------------------------------
# The portable context switch (ucontext, used where the x86-64 one is not)
# ---------------------------------------------------------------------------
def test_ucontext_fallback(tmp_path):
    exe = _build(tmp_path / "selftest_ucontext", "-DFASTELBO_EMU_UCONTEXT")
    assert _field(run(exe, "block_sum", 0, 4, 256).stdout, "wrong_blocks") == 0
    assert _field(run(exe, "block_sum", 1, 4, 256).stdout, "wrong_blocks") > 0
    assert _field(run(exe, "row_reduce", 0, 40, 2048, 1).stdout, "wrong_rows") == 0
    out = run(exe, "shfl", "xor", 16, "double").stdout.splitlines()
    values = [1000 + 3 * t + 0.5 for t in range(64)]
    for line in out:
        head, _, tail = line.partition(":")
        assert [float(v) for v in tail.split()] == _expected("xor", 16, _field(head, "param"), values), head
    res = run(exe, "partial_warp", check=False)
    assert res.returncode != 0 and "which has only 16 lanes" in res.stderr
