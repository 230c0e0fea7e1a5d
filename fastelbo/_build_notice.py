"""What a user sees while the kernels build: a line when a build starts (what, where, roughly how
long), a line every `period` seconds with the objects compiled so far, a line when it is done.
Nothing when the kernels come from the cache (their library is there and loading is quick).
FASTELBO_QUIET_BUILD=1 silences it."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ._config import _flag

# A compile of one kernel file takes 15-60 s on a 2-core AMD EPYC (AVX2, g++ 12); files build in
# parallel, one per core.
SECONDS_PER_FILE = (15, 60)


def quiet() -> bool:
    return _flag("FASTELBO_QUIET_BUILD")


def estimate(num_files: int, cores: int | None = None) -> str:
    rounds = math.ceil(max(num_files, 1) / max(cores or os.cpu_count() or 1, 1))
    lo, hi = (rounds * s for s in SECONDS_PER_FILE)
    return f"{_span(lo)} to {_span(hi)}" if hi < 120 or lo >= 120 else f"{lo} s to {_span(hi)}"


def _span(seconds: int) -> str:
    return f"{seconds} s" if seconds < 120 else f"{round(seconds / 60)} minutes"


def _busy() -> str:
    """A machine already busy compiles slower: say so rather than promise the idle figure."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        return ""
    cores = os.cpu_count() or 1
    return f", longer while the load average is {load:.0f}" if load > cores else ""


def _objects_done(directory: Path, since: float) -> int:
    try:
        return sum(1 for p in directory.glob("*.o") if p.stat().st_mtime >= since)
    except OSError:  # the directory changes under us
        return 0


@contextmanager
def announce(what: str, directory: Path, library: Path, num_files: int, *, period: float = 15.0,
             stream=None):
    """Wraps one build-and-load. A library already there is a cache hit: silent unless the load
    still takes longer than `period` (ninja found something to rebuild), then it speaks up."""
    stream = stream if stream is not None else sys.stderr
    if quiet():
        yield
        return
    start_wall, start = time.time(), time.perf_counter()
    said = threading.Event()
    done = threading.Event()

    def say(line: str) -> None:
        try:
            stream.write(f"fastelbo: {line}\n")
            stream.flush()
        except (OSError, ValueError):  # a closed stream must not break the build
            pass

    def opening() -> None:
        said.set()
        say(f"building {what} ({num_files} files, first use; about {estimate(num_files)} on "
            f"{os.cpu_count()} cores{_busy()}) in {directory}; later runs load them from there")

    cached = library.is_file()
    if not cached:
        opening()

    def tick() -> None:
        while not done.wait(period):
            if not said.is_set():
                opening()
            say(f"still building {what}: {_objects_done(directory, start_wall - 1)}/{num_files} files compiled, "
                f"{time.perf_counter() - start:.0f} s")

    watcher = threading.Thread(target=tick, name="fastelbo-build-notice", daemon=True)
    watcher.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        done.set()
        watcher.join()
        if said.is_set():
            say(f"{'built' if ok else 'failed to build'} {what} in {time.perf_counter() - start:.0f} s")
